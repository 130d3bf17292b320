/* The SPEED depth module: parsing a stated cutoff and the one resolution of a depth (depth.h).
 * The router, both nodes, the batcher, the engine and speedctl all resolve through
 * speed_depth_resolve, so what is checked here is what every one of them answers. */
#include <math.h>

#include "check.h"
#include "depth.h"

/* C for text at L layers, or -1 when parse or resolve refuses it (err gets the reason). */
static int resolve_text(const char *text, int n_layers, char *err, size_t err_size) {
    speed_depth_request_t r = {0};
    speed_depth_t d = {-1, -1, -1};
    err[0] = '\0';
    if (speed_cutoff_parse(text, &r.prefill_layers, err, err_size) != SPEED_OK) return -1;
    if (speed_depth_resolve(&r, NULL, n_layers, &d, err, err_size) != SPEED_OK) {
        CHECK_INT_EQ(d.prefill_layers, -1); /* untouched on error */
        return -1;
    }
    return d.prefill_layers;
}

static void test_text(void) {
    const struct {
        const char *text;
        int n_layers, want;
    } ok[] = {
        {"24", 32, 24},       {"1", 32, 1},
        {"32", 32, 32},       {"0.75", 32, 24},
        {"1.0", 32, 32},      {"1.", 32, 32},
        {".5", 22, 11},       {"0.5", 22, 11},
        {"0.75", 22, 17},                                     /* 16.5 -> 17 */
        {"0.25", 22, 6},      /* 5.5 -> 6 */ {"0.01", 22, 1}, /* 0.22 -> at least 1 */
        {"0.001", 32, 1},     {"007", 32, 7},
        {"0.999999", 32, 32}, {"1", 1, 1},
        {"1.00", 1, 1},       {"", 32, 32}, /* unset: the default, C = L */
    };
    char err[200];
    for (size_t i = 0; i < sizeof ok / sizeof ok[0]; i++) {
        int c = resolve_text(ok[i].text, ok[i].n_layers, err, sizeof err);
        CHECK_MSG(c == ok[i].want, "\"%s\" of %d: %d, want %d (%s)", ok[i].text, ok[i].n_layers, c, ok[i].want, err);
    }
    /* refused by the resolver (a number, out of range) and by the parser (not a number) */
    const struct {
        const char *text, *why;
    } bad[] = {
        {"0", "prefill_layers 0 is outside 1..32"},
        {"33", "prefill_layers 33 is outside 1..32"},
        {"-1", "prefill_layers -1 is outside 1..32"},
        {"2147483648", "prefill_layers 2147483648 is outside 1..32"},
        {"0.0", "prefill_layers 0 is not a fraction in (0, 1]"},
        {"0.", "prefill_layers 0 is not a fraction in (0, 1]"},
        {"1.5", "prefill_layers 1.5 is not a fraction in (0, 1]"},
        {"24.0", "prefill_layers 24 is not a fraction in (0, 1]"},
        {"-0.5", "prefill_layers -0.5 is not a fraction in (0, 1]"},
        {".", "neither a layer count"},
        {"abc", "neither a layer count"},
        {"24x", "neither a layer count"},
        {" 24", "neither a layer count"},
        {"24 ", "neither a layer count"},
        {"1e0", "neither a layer count"},
        {"0.75e0", "neither a layer count"},
        {"+24", "neither a layer count"},
        {"nan", "neither a layer count"},
        {"inf", "neither a layer count"},
        {"0x10", "neither a layer count"},
        {"1..0", "neither a layer count"},
        {"--1", "neither a layer count"},
        {"99999999999999999999", "neither a layer count"},
    };
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        CHECK_MSG(resolve_text(bad[i].text, 32, err, sizeof err) == -1, "\"%s\" accepted", bad[i].text);
        CHECK_CONTAINS(err, bad[i].why);
    }
    speed_cutoff_t c = {SPEED_CUTOFF_LAYERS, 5, 0};
    CHECK_INT_EQ(speed_cutoff_parse(NULL, &c, err, sizeof err), SPEED_OK);
    CHECK_INT_EQ(c.kind, SPEED_CUTOFF_UNSET);
    CHECK_INT_EQ(speed_cutoff_parse("abc", &c, NULL, 0), SPEED_ERR_INVALID_ARGUMENT); /* no err buffer */
}

/* A value stated as text, as a JSON-style number (count / fraction) or through a request built in
 * code resolves to the same C or the same error text. */
static void test_same_answer_whatever_the_form(void) {
    const double fractions[] = {0.75, 0.5, 0.3, 0.7, 0.1, 1.0, 0.0, 1.5, -0.25};
    for (int L = 1; L <= 40; L += 3) {
        for (size_t i = 0; i < sizeof fractions / sizeof fractions[0]; i++) {
            char text[32], e1[200] = "", e2[200] = "";
            snprintf(text, sizeof text, "%.17g", fractions[i]);
            if (!strchr(text, '.')) strcat(text, ".0");
            int c1 = resolve_text(text, L, e1, sizeof e1);
            speed_depth_request_t r = {.prefill_layers = speed_cutoff_fraction(fractions[i])};
            speed_depth_t d;
            int c2 = speed_depth_resolve(&r, NULL, L, &d, e2, sizeof e2) == SPEED_OK ? d.prefill_layers : -1;
            CHECK_MSG(c1 == c2 && strcmp(e1, e2) == 0, "%s of %d: %d \"%s\" vs %d \"%s\"", text, L, c1, e1, c2, e2);
        }
        for (int v = -2; v <= L + 2; v++) {
            char text[32], e1[200] = "", e2[200] = "";
            snprintf(text, sizeof text, "%d", v);
            int c1 = resolve_text(text, L, e1, sizeof e1);
            speed_depth_request_t r = {.prefill_layers = speed_cutoff_layers(v)};
            speed_depth_t d;
            int c2 = speed_depth_resolve(&r, NULL, L, &d, e2, sizeof e2) == SPEED_OK ? d.prefill_layers : -1;
            CHECK_MSG(c1 == c2 && strcmp(e1, e2) == 0, "%d of %d: %d \"%s\" vs %d \"%s\"", v, L, c1, e1, c2, e2);
            CHECK_INT_EQ(c1, v >= 1 && v <= L ? v : -1); /* counts are never clamped */
        }
    }
}

/* Fractions against an independent rounding: the nearest layer, halves up, at least 1. */
static void test_fraction_rounding(void) {
    int n_bad = 0;
    for (int L = 1; L <= 128; L++)
        for (int k = 1; k <= 1000; k++) {
            double f = k / 1000.0;
            long want = lround(f * L);
            if (want < 1) want = 1;
            speed_depth_request_t r = {.prefill_layers = speed_cutoff_fraction(f)};
            speed_depth_t d;
            if (speed_depth_resolve(&r, NULL, L, &d, NULL, 0) != SPEED_OK || d.prefill_layers != want) n_bad++;
        }
    CHECK_INT_EQ(n_bad, 0);
}

static void test_defaults_and_overrides(void) {
    char err[200];
    speed_depth_t d;
    /* nothing stated, no default: C = L, A = T = 1 */
    CHECK_INT_EQ(speed_depth_resolve(NULL, NULL, 32, &d, err, sizeof err), SPEED_OK);
    CHECK(d.prefill_layers == 32 && d.anchors == 1 && d.tail == 1);
    /* a deployment default (itself resolved, here from "0.75") under an empty request */
    speed_depth_request_t cfg = {
        .prefill_layers = speed_cutoff_fraction(0.75), .has_anchors = true, .anchors = 4, .has_tail = true, .tail = 2};
    speed_depth_t deployment;
    CHECK_INT_EQ(speed_depth_resolve(&cfg, NULL, 32, &deployment, err, sizeof err), SPEED_OK);
    CHECK(deployment.prefill_layers == 24 && deployment.anchors == 4 && deployment.tail == 2);
    speed_depth_request_t none = {0};
    CHECK_INT_EQ(speed_depth_resolve(&none, &deployment, 32, &d, err, sizeof err), SPEED_OK);
    CHECK(d.prefill_layers == 24 && d.anchors == 4 && d.tail == 2);
    /* each part the request states wins, alone */
    speed_depth_request_t c_only = {.prefill_layers = speed_cutoff_layers(8)};
    CHECK_INT_EQ(speed_depth_resolve(&c_only, &deployment, 32, &d, err, sizeof err), SPEED_OK);
    CHECK(d.prefill_layers == 8 && d.anchors == 4 && d.tail == 2);
    speed_depth_request_t a_only = {.has_anchors = true, .anchors = 0};
    CHECK_INT_EQ(speed_depth_resolve(&a_only, &deployment, 32, &d, err, sizeof err), SPEED_OK);
    CHECK(d.prefill_layers == 24 && d.anchors == 0 && d.tail == 2);
    speed_depth_request_t t_only = {.has_tail = true, .tail = 7};
    CHECK_INT_EQ(speed_depth_resolve(&t_only, &deployment, 32, &d, err, sizeof err), SPEED_OK);
    CHECK(d.prefill_layers == 24 && d.anchors == 4 && d.tail == 7);
    /* a default with C 0 means L */
    speed_depth_t off = speed_depth_default();
    CHECK_INT_EQ(off.prefill_layers, 0);
    CHECK_INT_EQ(speed_depth_resolve(&none, &off, 12, &d, err, sizeof err), SPEED_OK);
    CHECK_INT_EQ(d.prefill_layers, 12);
    /* request_of states exactly what it is given, and C 0 stays unset */
    speed_depth_request_t back = speed_depth_request_of((speed_depth_t){5, 0, 3});
    CHECK_INT_EQ(speed_depth_resolve(&back, &deployment, 32, &d, err, sizeof err), SPEED_OK);
    CHECK(d.prefill_layers == 5 && d.anchors == 0 && d.tail == 3);
    back = speed_depth_request_of((speed_depth_t){0, 2, 2});
    CHECK_INT_EQ(back.prefill_layers.kind, SPEED_CUTOFF_UNSET);
}

static void test_refusals(void) {
    char err[200];
    speed_depth_t d = {-5, -5, -5};
    speed_depth_request_t a = {.has_anchors = true, .anchors = -1};
    CHECK_INT_EQ(speed_depth_resolve(&a, NULL, 32, &d, err, sizeof err), SPEED_ERR_INVALID_ARGUMENT);
    CHECK_CONTAINS(err, "anchors -1 is outside 0..");
    speed_depth_request_t t = {.has_tail = true, .tail = 0};
    CHECK_INT_EQ(speed_depth_resolve(&t, NULL, 32, &d, err, sizeof err), SPEED_ERR_INVALID_ARGUMENT);
    CHECK_CONTAINS(err, "tail 0 is outside 1..");
    t.tail = (int64_t)1 << 40;
    CHECK_INT_EQ(speed_depth_resolve(&t, NULL, 32, &d, err, sizeof err), SPEED_ERR_INVALID_ARGUMENT);
    CHECK_INT_EQ(speed_depth_resolve(NULL, NULL, 0, &d, err, sizeof err), SPEED_ERR_INVALID_ARGUMENT);
    CHECK_CONTAINS(err, "0 layers");
    speed_depth_t bad_default = {40, 1, 1};
    CHECK_INT_EQ(speed_depth_resolve(NULL, &bad_default, 32, &d, err, sizeof err), SPEED_ERR_INVALID_ARGUMENT);
    CHECK_CONTAINS(err, "default depth C=40");
    bad_default = (speed_depth_t){8, 1, 0};
    CHECK_INT_EQ(speed_depth_resolve(NULL, &bad_default, 32, &d, err, sizeof err), SPEED_ERR_INVALID_ARGUMENT);
    speed_depth_request_t nan_c = {.prefill_layers = speed_cutoff_fraction(NAN)};
    CHECK_INT_EQ(speed_depth_resolve(&nan_c, NULL, 32, &d, err, sizeof err), SPEED_ERR_INVALID_ARGUMENT);
    CHECK(d.prefill_layers == -5 && d.anchors == -5 && d.tail == -5); /* untouched */
    /* a short error buffer is cut, never overrun */
    char tiny[8];
    memset(tiny, 'x', sizeof tiny);
    speed_depth_request_t big = {.prefill_layers = speed_cutoff_layers(99)};
    CHECK_INT_EQ(speed_depth_resolve(&big, NULL, 32, &d, tiny, 4), SPEED_ERR_INVALID_ARGUMENT);
    CHECK(tiny[3] == '\0' && tiny[4] == 'x');
}

/* The part a refusal names, for the router's param and speedctl's option. */
static void test_error_part(void) {
    char err[200];
    speed_depth_t d;
    speed_depth_request_t a = {.has_anchors = true, .anchors = -1};
    speed_depth_resolve(&a, NULL, 32, &d, err, sizeof err);
    CHECK_STR_EQ(speed_depth_error_part(err), "anchors");
    speed_depth_request_t t = {.has_tail = true, .tail = 0};
    speed_depth_resolve(&t, NULL, 32, &d, err, sizeof err);
    CHECK_STR_EQ(speed_depth_error_part(err), "tail");
    speed_depth_request_t c = {.prefill_layers = speed_cutoff_layers(40)};
    speed_depth_resolve(&c, NULL, 32, &d, err, sizeof err);
    CHECK_STR_EQ(speed_depth_error_part(err), "prefill_layers");
    CHECK_STR_EQ(speed_depth_error_part(NULL), "prefill_layers");
}

static void test_cutoff_str(void) {
    char buf[32];
    CHECK_STR_EQ(speed_cutoff_str(speed_cutoff_layers(24), buf, sizeof buf), "24");
    CHECK_STR_EQ(speed_cutoff_str(speed_cutoff_fraction(0.75), buf, sizeof buf), "0.75");
    CHECK_STR_EQ(speed_cutoff_str((speed_cutoff_t){0}, buf, sizeof buf), "default");
}

int main(void) {
    test_text();
    test_same_answer_whatever_the_form();
    test_fraction_rounding();
    test_defaults_and_overrides();
    test_refusals();
    test_cutoff_str();
    test_error_part();
    return CHECK_DONE();
}
