/* speed_json_budget: the allocation-free cost scan before jansson (json_budget.h). */
#include "json_budget.h"

#include <string.h>

bool speed_json_budget_check(const char *text, size_t len, const speed_json_budget_t *budget,
                             speed_json_budget_use_t *use_p, const char **which_p) {
    speed_json_budget_use_t u = {0, 0, 0};
    const char *which = NULL;
    uint32_t depth = 0;
    uint64_t commas = 0;
    const char *p = text, *end = text ? text + len : text;
    while (p < end && !which) {
        /* Skip to the next byte that matters; strings are jumped over whole. */
        char c = *p++;
        switch (c) {
        case '"':
            while (p < end) {
                const char *q = memchr(p, '"', (size_t)(end - p));
                if (!q) {
                    p = end;
                    break;
                }
                /* An odd run of backslashes before the quote escapes it. */
                size_t bs = 0;
                while (q - bs > p && q[-(ptrdiff_t)bs - 1] == '\\') bs++;
                p = q + 1;
                if (bs % 2 == 0) break;
            }
            break;
        case '{':
        case '[':
            u.containers++;
            if (++depth > u.depth) u.depth = depth;
            if (budget->max_containers && u.containers > budget->max_containers) which = "containers";
            if (budget->max_depth && depth > budget->max_depth) which = "depth";
            break;
        case '}':
        case ']':
            if (depth) depth--;
            break;
        case ',':
            commas++;
            if (budget->max_elements && commas + u.containers + 1 > budget->max_elements) which = "elements";
            break;
        default: break;
        }
    }
    u.elements = len ? u.containers + commas + 1 : 0;
    if (!which && budget->max_elements && u.elements > budget->max_elements) which = "elements";
    if (use_p) *use_p = u;
    if (which_p) *which_p = which;
    return which == NULL;
}
