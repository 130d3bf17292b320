/* Name tables (common/names.h): exact lookup, bounded names, prose lists. */
#include "check.h"
#include "names.h"

static const char *const colours[] = {"red", "green", "blue", NULL};

int main(void) {
    CHECK_INT_EQ(speed_names_find(colours, "red"), 0);
    CHECK_INT_EQ(speed_names_find(colours, "blue"), 2);
    CHECK_INT_EQ(speed_names_find(colours, "Blue"), -1); /* exact: a peer's "TCP" is not "tcp" */
    CHECK_INT_EQ(speed_names_find(colours, "blu"), -1);
    CHECK_INT_EQ(speed_names_find(colours, "blue "), -1);
    CHECK_INT_EQ(speed_names_find(colours, ""), -1);
    CHECK_INT_EQ(speed_names_find(colours, NULL), -1);
    CHECK_INT_EQ(speed_names_find(NULL, "red"), -1);
    CHECK_STR_EQ(speed_names_get(colours, 3, 1, "?"), "green");
    CHECK_STR_EQ(speed_names_get(colours, 3, 3, "?"), "?");
    CHECK_STR_EQ(speed_names_get(colours, 3, -1, "none"), "none");
    char buf[64];
    CHECK_STR_EQ(speed_names_list(colours, buf, sizeof buf), "red, green or blue");
    const char *const two[] = {"a", "b", NULL}, *const one[] = {"a", NULL}, *const none[] = {NULL};
    CHECK_STR_EQ(speed_names_list(two, buf, sizeof buf), "a or b");
    CHECK_STR_EQ(speed_names_list(one, buf, sizeof buf), "a");
    CHECK_STR_EQ(speed_names_list(none, buf, sizeof buf), "");
    char small[8];
    memset(small, 'x', sizeof small);
    speed_names_list(colours, small, 6);
    CHECK(strlen(small) == 5 && small[6] == 'x'); /* cut, terminated, never past size */
    return CHECK_DONE();
}
