/* The node's conversions between protobuf messages and the engine's types (node_proto.h), with
 * no node running: the SPEED depth a request asks for (layer counts, fractions, anchors and
 * tail, and each refusal), sampling parameters (accepted values, each refusal with its message),
 * tokens, and the KV descriptor — C struct → proto → C struct (directly and through the wire
 * bytes) equals the original, and every malformed message is refused with its exact status,
 * logged, leaving no descriptor. Allocation failures: a clean SPEED_ERR_NO_MEMORY, no leak. */
#include <limits.h>
#include <math.h>
#include <stdbool.h>
#include <stdint.h>

#include "alloc.h"
#include "clock.h"
#include "check.h"
#include "log.h"
#include "node_proto.h"

/* ---- log capture ------------------------------------------------------------------------------ */

static int g_errors_logged; /* ERROR lines since the last reset */

static void counting_sink(void *user, speed_log_level_t level, speed_log_subsys_t subsys, const char *request_id,
                          const char *line) {
    (void)user, (void)subsys, (void)request_id, (void)line;
    if (level == SPEED_LOG_ERROR) g_errors_logged++;
}

/* ---- SPEED depth ------------------------------------------------------------------------------ */

#define MODEL_LAYERS 32

/* The node's resolved default: values unlike the proto's defaults, so a result that takes one
 * from here is told apart from one that takes it from the request. */
static const speed_depth_t NODE_DEPTH = {20, 2, 7};

/* The node's default on a model of n_layers (its C cannot exceed the model's). */
static speed_depth_t node_depth(int n_layers) {
    speed_depth_t d = NODE_DEPTH;
    if (d.prefill_layers > n_layers) d.prefill_layers = n_layers;
    return d;
}

static Speed__V1__SpeedParams sp_none(void) {
    Speed__V1__SpeedParams sp = SPEED__V1__SPEED_PARAMS__INIT;
    return sp;
}

static Speed__V1__SpeedParams sp_layers(int32_t c) {
    Speed__V1__SpeedParams sp = sp_none();
    sp.prefill_layers_opt_case = SPEED__V1__SPEED_PARAMS__PREFILL_LAYERS_OPT_PREFILL_LAYERS;
    sp.prefill_layers = c;
    return sp;
}

static Speed__V1__SpeedParams sp_fraction(double f) {
    Speed__V1__SpeedParams sp = sp_none();
    sp.prefill_layers_opt_case = SPEED__V1__SPEED_PARAMS__PREFILL_LAYERS_OPT_PREFILL_FRACTION;
    sp.prefill_fraction = f;
    return sp;
}

static Speed__V1__SpeedParams with_anchors(Speed__V1__SpeedParams sp, int32_t a) {
    sp.anchors_opt_case = SPEED__V1__SPEED_PARAMS__ANCHORS_OPT_ANCHORS;
    sp.anchors = a;
    return sp;
}

static Speed__V1__SpeedParams with_tail(Speed__V1__SpeedParams sp, int32_t t) {
    sp.tail_opt_case = SPEED__V1__SPEED_PARAMS__TAIL_OPT_TAIL;
    sp.tail = t;
    return sp;
}

/* sp (NULL = none) on a model of n_layers resolves to {c, a, t}. */
static void depth_ok_p(const char *what, const Speed__V1__SpeedParams *sp, int n_layers, int c, int a, int t) {
    char err[256] = "";
    speed_depth_t d = {-99, -99, -99};
    speed_status_t st = speed_node_depth_from_proto(sp, n_layers, node_depth(n_layers), &d, err, sizeof err);
    CHECK_MSG(st == SPEED_OK, "%s: %s (%s)", what, speed_status_string(st), err);
    CHECK_MSG(d.prefill_layers == c && d.anchors == a && d.tail == t, "%s: got C=%d A=%d T=%d, want C=%d A=%d T=%d",
              what, d.prefill_layers, d.anchors, d.tail, c, a, t);
}

static void depth_ok(const char *what, Speed__V1__SpeedParams sp, int n_layers, int c, int a, int t) {
    depth_ok_p(what, &sp, n_layers, c, a, t);
}

/* sp on a model of n_layers is refused, with a message. */
static void depth_refused(const char *what, Speed__V1__SpeedParams sp, int n_layers) {
    char err[256] = "";
    speed_depth_t d;
    speed_status_t st = speed_node_depth_from_proto(&sp, n_layers, node_depth(n_layers), &d, err, sizeof err);
    CHECK_MSG(st == SPEED_ERR_INVALID_ARGUMENT, "%s: %s, want INVALID_ARGUMENT", what, speed_status_string(st));
    CHECK_MSG(err[0] != '\0', "%s: refused without a message", what);
}

static void test_depth(void) {
    /* nothing asked: every part from the node */
    depth_ok_p("NULL", NULL, MODEL_LAYERS, 20, 2, 7);
    depth_ok("empty", sp_none(), MODEL_LAYERS, 20, 2, 7);
    /* a count of 0 is stated (the oneof says so) and outside 1..L, as anywhere else */
    depth_refused("layers 0", sp_layers(0), MODEL_LAYERS);

    /* a layer count: 1..L */
    depth_ok("layers 1", sp_layers(1), MODEL_LAYERS, 1, 2, 7);
    depth_ok("layers 24", sp_layers(24), MODEL_LAYERS, 24, 2, 7);
    depth_ok("layers L", sp_layers(MODEL_LAYERS), MODEL_LAYERS, MODEL_LAYERS, 2, 7);
    depth_refused("layers L+1", sp_layers(MODEL_LAYERS + 1), MODEL_LAYERS);
    depth_refused("layers -1", sp_layers(-1), MODEL_LAYERS);
    depth_refused("layers INT32_MIN", sp_layers(INT32_MIN), MODEL_LAYERS);
    depth_refused("layers INT32_MAX", sp_layers(INT32_MAX), MODEL_LAYERS);
    /* the bound is the model's: a one-layer model takes 1 and nothing more */
    depth_ok("layers 1 of 1", sp_layers(1), 1, 1, 2, 7);
    depth_refused("layers 2 of 1", sp_layers(2), 1);
    depth_refused("layers 24 of 12", sp_layers(24), 12);

    /* a fraction of L in (0, 1], rounded to the nearest layer, halves up, at least 1 */
    depth_ok("0.75 of 32", sp_fraction(0.75), MODEL_LAYERS, 24, 2, 7);
    depth_ok("1.0 of 32", sp_fraction(1.0), MODEL_LAYERS, MODEL_LAYERS, 2, 7);
    /* 0.7 * 10 is 7.000000000000001 or 6.999999999999999 depending on rounding: nearest, not truncated */
    depth_ok("0.7 of 10", sp_fraction(0.7), 10, 7, 2, 7);
    depth_ok("0.5 of 3 (1.5)", sp_fraction(0.5), 3, 2, 2, 7);
    depth_ok("0.25 of 10 (2.5)", sp_fraction(0.25), 10, 3, 2, 7);
    depth_ok("0.375 of 4 (1.5)", sp_fraction(0.375), 4, 2, 2, 7);
    depth_ok("0.25 of 7 (1.75)", sp_fraction(0.25), 7, 2, 2, 7);
    depth_ok("0.3 of 7 (2.1)", sp_fraction(0.3), 7, 2, 2, 7);
    depth_ok("0.125 of 4 (0.5)", sp_fraction(0.125), 4, 1, 2, 7);
    depth_ok("0.01 of 32 (0.32): at least 1", sp_fraction(0.01), MODEL_LAYERS, 1, 2, 7);
    depth_ok("1e-30 of 32: at least 1", sp_fraction(1e-30), MODEL_LAYERS, 1, 2, 7);
    depth_ok("0.5 of 1", sp_fraction(0.5), 1, 1, 2, 7);
    depth_refused("fraction 0", sp_fraction(0.0), MODEL_LAYERS);
    depth_refused("fraction -0", sp_fraction(-0.0), MODEL_LAYERS);
    depth_refused("fraction -0.5", sp_fraction(-0.5), MODEL_LAYERS);
    depth_refused("fraction 1.0001", sp_fraction(1.0001), MODEL_LAYERS);
    depth_refused("fraction 2", sp_fraction(2.0), MODEL_LAYERS);
    depth_refused("fraction NaN", sp_fraction(NAN), MODEL_LAYERS);
    depth_refused("fraction +inf", sp_fraction(INFINITY), MODEL_LAYERS);
    depth_refused("fraction -inf", sp_fraction(-INFINITY), MODEL_LAYERS);

    /* anchors and tail: either one alone takes the other from the node */
    depth_ok("anchors 3", with_anchors(sp_none(), 3), MODEL_LAYERS, 20, 3, NODE_DEPTH.tail);
    /* present and zero: no anchors, not "default" */
    depth_ok("anchors 0", with_anchors(sp_none(), 0), MODEL_LAYERS, 20, 0, NODE_DEPTH.tail);
    depth_ok("tail 5", with_tail(sp_none(), 5), MODEL_LAYERS, 20, NODE_DEPTH.anchors, 5);
    depth_ok("tail 1", with_tail(sp_none(), 1), MODEL_LAYERS, 20, NODE_DEPTH.anchors, 1);
    depth_ok("anchors 4 tail 9", with_tail(with_anchors(sp_none(), 4), 9), MODEL_LAYERS, 20, 4, 9);
    depth_ok("layers 16 anchors 0 tail 1", with_tail(with_anchors(sp_layers(16), 0), 1), MODEL_LAYERS, 16, 0, 1);
    depth_ok("0.5 anchors 2 tail 3", with_tail(with_anchors(sp_fraction(0.5), 2), 3), MODEL_LAYERS, 16, 2, 3);
    depth_refused("anchors -1", with_anchors(sp_none(), -1), MODEL_LAYERS);
    depth_refused("anchors INT32_MIN", with_anchors(sp_none(), INT32_MIN), MODEL_LAYERS);
    depth_refused("tail 0", with_tail(sp_none(), 0), MODEL_LAYERS);
    depth_refused("tail -3", with_tail(sp_none(), -3), MODEL_LAYERS);
    depth_refused("anchors -1 tail 5", with_tail(with_anchors(sp_none(), -1), 5), MODEL_LAYERS);
    depth_refused("anchors 3 tail 0", with_tail(with_anchors(sp_none(), 3), 0), MODEL_LAYERS);
    /* a good C does not save a bad T */
    depth_refused("layers 24 tail 0", with_tail(sp_layers(24), 0), MODEL_LAYERS);
}

/* ---- sampling --------------------------------------------------------------------------------- */

static char *g_stops[] = {"\n\n", "User:", "###"};

/* Every field set to something accepted and unlike the defaults. */
static Speed__V1__SamplingParams sampling(void) {
    Speed__V1__SamplingParams s = SPEED__V1__SAMPLING_PARAMS__INIT;
    s.max_tokens = 32;
    s.temperature = 0.7f;
    s.top_p = 0.9f;
    s.top_k = 40;
    s.seed_opt_case = SPEED__V1__SAMPLING_PARAMS__SEED_OPT_SEED;
    s.seed = 42;
    s.top_logprobs = 3;
    s.logprobs = 1;
    s.n_stop = 3;
    s.stop = g_stops;
    s.ignore_eos = 1;
    return s;
}

/* A migrated request's resumed tokens join the tail; out of range is refused with a message. */
static void test_depth_resume(void) {
    char err[200];
    speed_depth_t d = {.prefill_layers = 3, .anchors = 1, .tail = 2};
    CHECK_INT_EQ(speed_node_depth_resume(&d, 0, 10, err, sizeof err), SPEED_OK);
    CHECK_INT_EQ(d.tail, 2);
    CHECK_INT_EQ(speed_node_depth_resume(&d, 7, 10, err, sizeof err), SPEED_OK);
    CHECK(d.prefill_layers == 3 && d.anchors == 1 && d.tail == 9);
    err[0] = '\0';
    CHECK_INT_EQ(speed_node_depth_resume(&d, 10, 10, err, sizeof err), SPEED_ERR_INVALID_ARGUMENT);
    CHECK_CONTAINS(err, "resume_tokens 10");
    CHECK_INT_EQ(speed_node_depth_resume(&d, -1, 10, err, sizeof err), SPEED_ERR_INVALID_ARGUMENT);
    CHECK_INT_EQ(d.tail, 9); /* untouched when refused */
}

static speed_status_t gen_of(const Speed__V1__SamplingParams *sp, speed_batch_gen_t *g, char *err, size_t err_size) {
    speed_log_clear_last_error(); /* a stale error must not pass for this call's message */
    err[0] = '\0';
    memset(g, 0xa5, sizeof *g);
    return speed_node_gen_from_proto(sp, g, err, err_size);
}

static void gen_ok(const char *what, const Speed__V1__SamplingParams *sp, speed_batch_gen_t *g) {
    char err[256];
    speed_status_t st = gen_of(sp, g, err, sizeof err);
    CHECK_MSG(st == SPEED_OK, "%s: %s (%s)", what, speed_status_string(st), err);
}

/* Refused, with a message naming the field. */
static void gen_refused(const char *what, const Speed__V1__SamplingParams *sp, const char *field) {
    char err[256];
    speed_batch_gen_t g;
    speed_status_t st = gen_of(sp, &g, err, sizeof err);
    CHECK_MSG(st == SPEED_ERR_INVALID_ARGUMENT, "%s: %s, want INVALID_ARGUMENT", what, speed_status_string(st));
    CHECK_MSG(err[0] != '\0', "%s: refused without a message", what);
    CHECK_MSG(strstr(err, field) != NULL, "%s: message \"%s\" does not name %s", what, err, field);
}

/* The valid parameters with one change, refused. */
#define GEN_REFUSED(what, field, ...) \
    do {                              \
        s = sampling();               \
        __VA_ARGS__;                  \
        gen_refused(what, &s, field); \
    } while (0)

static void test_sampling(void) {
    Speed__V1__SamplingParams s;
    speed_batch_gen_t g;

    /* every field carried over */
    s = sampling();
    gen_ok("all set", &s, &g);
    CHECK_INT_EQ(g.max_tokens, 32);
    CHECK(g.sampling.temperature == 0.7f);
    CHECK(g.sampling.top_p == 0.9f);
    CHECK_INT_EQ(g.sampling.top_k, 40);
    CHECK(g.sampling.seed == 42);
    CHECK_INT_EQ(g.sampling.n_top_logprobs, 3);
    CHECK(g.ignore_eos);
    CHECK_INT_EQ(g.n_stop, 3);
    CHECK(g.stop == (const char *const *)s.stop); /* pointing into the request, not copied */
    if (g.stop && g.n_stop == 3) {
        CHECK_STR_EQ(g.stop[0], "\n\n");
        CHECK_STR_EQ(g.stop[1], "User:");
        CHECK_STR_EQ(g.stop[2], "###");
    }

    /* no SamplingParams: the sampler's defaults, 16 tokens */
    gen_ok("NULL", NULL, &g);
    speed_sampling_params_t def = speed_sampling_default_params();
    CHECK_INT_EQ(g.max_tokens, 16);
    CHECK(g.sampling.temperature == def.temperature);
    CHECK(g.sampling.top_p == def.top_p);
    CHECK_INT_EQ(g.sampling.top_k, def.top_k);
    CHECK_INT_EQ(g.sampling.n_top_logprobs, def.n_top_logprobs);
    CHECK(g.sampling.seed == def.seed);
    CHECK_INT_EQ(g.n_stop, 0);
    CHECK(g.stop == NULL);
    CHECK(!g.ignore_eos);

    /* max_tokens >= 1 (the proto's 0 is not "default") */
    s = sampling(), s.max_tokens = 1;
    gen_ok("max_tokens 1", &s, &g);
    CHECK_INT_EQ(g.max_tokens, 1);
    s = sampling(), s.max_tokens = INT32_MAX;
    gen_ok("max_tokens INT32_MAX", &s, &g);
    CHECK_INT_EQ(g.max_tokens, INT32_MAX);
    GEN_REFUSED("max_tokens 0", "max_tokens", s.max_tokens = 0);
    GEN_REFUSED("max_tokens -5", "max_tokens", s.max_tokens = -5);

    /* temperature: finite, >= 0; 0 = greedy */
    s = sampling(), s.temperature = 0.0f;
    gen_ok("temperature 0", &s, &g);
    CHECK(g.sampling.temperature == 0.0f);
    s = sampling(), s.temperature = 2.5f;
    gen_ok("temperature 2.5", &s, &g);
    CHECK(g.sampling.temperature == 2.5f);
    GEN_REFUSED("temperature -0.01", "temperature", s.temperature = -0.01f);
    GEN_REFUSED("temperature NaN", "temperature", s.temperature = NAN);
    GEN_REFUSED("temperature inf", "temperature", s.temperature = INFINITY);

    /* top_k >= 0; 0 = off */
    s = sampling(), s.top_k = 0;
    gen_ok("top_k 0", &s, &g);
    CHECK_INT_EQ(g.sampling.top_k, 0);
    s = sampling(), s.top_k = 1;
    gen_ok("top_k 1", &s, &g);
    CHECK_INT_EQ(g.sampling.top_k, 1);
    GEN_REFUSED("top_k -1", "top_k", s.top_k = -1);

    /* top_p in (0, 1]; the proto's 0 reads as 1 (off) */
    s = sampling(), s.top_p = 0.0f;
    gen_ok("top_p 0", &s, &g);
    CHECK(g.sampling.top_p == 1.0f);
    s = sampling(), s.top_p = 1.0f;
    gen_ok("top_p 1", &s, &g);
    CHECK(g.sampling.top_p == 1.0f);
    s = sampling(), s.top_p = 1e-6f;
    gen_ok("top_p 1e-6", &s, &g);
    CHECK(g.sampling.top_p == 1e-6f);
    GEN_REFUSED("top_p -0.1", "top_p", s.top_p = -0.1f);
    GEN_REFUSED("top_p 1.01", "top_p", s.top_p = 1.01f);
    GEN_REFUSED("top_p NaN", "top_p", s.top_p = NAN);

    /* seed: a set seed is used as given, 0 and the largest included */
    s = sampling(), s.seed = 0;
    gen_ok("seed 0", &s, &g);
    CHECK(g.sampling.seed == 0);
    s = sampling(), s.seed = UINT64_MAX;
    gen_ok("seed max", &s, &g);
    CHECK(g.sampling.seed == UINT64_MAX);
    s = sampling(), s.seed_opt_case = SPEED__V1__SAMPLING_PARAMS__SEED_OPT__NOT_SET, s.seed = 0;
    gen_ok("seed unset", &s, &g); /* the node picks one */

    /* top_logprobs 0..SPEED_SAMPLER_MAX_TOP_LOGPROBS */
    s = sampling(), s.top_logprobs = 0;
    gen_ok("top_logprobs 0", &s, &g);
    CHECK_INT_EQ(g.sampling.n_top_logprobs, 0);
    s = sampling(), s.top_logprobs = SPEED_SAMPLER_MAX_TOP_LOGPROBS;
    gen_ok("top_logprobs max", &s, &g);
    CHECK_INT_EQ(g.sampling.n_top_logprobs, SPEED_SAMPLER_MAX_TOP_LOGPROBS);
    GEN_REFUSED("top_logprobs max+1", "logprobs", s.top_logprobs = SPEED_SAMPLER_MAX_TOP_LOGPROBS + 1);
    GEN_REFUSED("top_logprobs -1", "logprobs", s.top_logprobs = -1);

    /* stop strings and ignore_eos are carried as they are (the batcher checks the strings) */
    s = sampling(), s.n_stop = 0, s.stop = NULL;
    gen_ok("no stops", &s, &g);
    CHECK_INT_EQ(g.n_stop, 0);
    CHECK(g.stop == NULL);
    s = sampling(), s.n_stop = 1;
    gen_ok("one stop", &s, &g);
    CHECK_INT_EQ(g.n_stop, 1);
    CHECK(g.stop && g.stop[0] == g_stops[0]);
    s = sampling(), s.ignore_eos = 0;
    gen_ok("ignore_eos 0", &s, &g);
    CHECK(!g.ignore_eos);
}

/* ---- tokens ----------------------------------------------------------------------------------- */

static void test_tokens(void) {
    speed_batch_token_t t;
    memset(&t, 0, sizeof t);
    t.id = 1234;
    t.logprob = -0.25f;
    t.n_top = 3;
    for (int i = 0; i < 3; i++) t.top[i] = (speed_token_logprob_t){.id = 100 + i, .logprob = -1.0f - (float)i};
    t.text = "hi";
    t.text_len = 2;

    Speed__V1__Token out;
    Speed__V1__TopLogprob storage[SPEED_SAMPLER_MAX_TOP_LOGPROBS], *ptrs[SPEED_SAMPLER_MAX_TOP_LOGPROBS];
    speed_node_token_to_proto(&t, 2, &out, storage, ptrs);
    CHECK_INT_EQ(out.id, 1234);
    CHECK(out.logprob == -0.25f);
    CHECK_STR_EQ(out.text, "hi");
    CHECK_INT_EQ(out.n_top_logprobs, 2); /* as many as asked */
    if (out.n_top_logprobs == 2) {
        CHECK_INT_EQ(out.top_logprobs[0]->id, 100);
        CHECK(out.top_logprobs[1]->logprob == -2.0f);
    }
    speed_node_token_to_proto(&t, 5, &out, storage, ptrs);
    CHECK_INT_EQ(out.n_top_logprobs, 3); /* no more than the token has */
    speed_node_token_to_proto(&t, -1, &out, storage, ptrs);
    CHECK_INT_EQ(out.n_top_logprobs, 0);
    CHECK(out.top_logprobs == NULL);
    t.text = NULL;
    speed_node_token_to_proto(&t, 0, &out, storage, ptrs);
    CHECK_STR_EQ(out.text, "");

    /* back: at most SPEED_SAMPLER_MAX_TOP_LOGPROBS alternatives, no text */
    enum { N_TOP = SPEED_SAMPLER_MAX_TOP_LOGPROBS + 5 };
    Speed__V1__TopLogprob tops[N_TOP], *top_ptrs[N_TOP];
    for (int i = 0; i < N_TOP; i++) {
        speed__v1__top_logprob__init(&tops[i]);
        tops[i].id = 7 * i;
        tops[i].logprob = -0.5f * (float)i;
        top_ptrs[i] = &tops[i];
    }
    Speed__V1__Token in = SPEED__V1__TOKEN__INIT;
    in.id = 99;
    in.logprob = -3.5f;
    in.text = "x";
    in.n_top_logprobs = 2;
    in.top_logprobs = top_ptrs;
    speed_batch_token_t back;
    speed_node_token_from_proto(&in, &back);
    CHECK_INT_EQ(back.id, 99);
    CHECK(back.logprob == -3.5f);
    CHECK_INT_EQ(back.n_top, 2);
    CHECK_INT_EQ(back.top[1].id, 7);
    CHECK(back.top[1].logprob == -0.5f);
    CHECK(back.text == NULL);
    in.n_top_logprobs = N_TOP;
    speed_node_token_from_proto(&in, &back);
    CHECK_INT_EQ(back.n_top, SPEED_SAMPLER_MAX_TOP_LOGPROBS);
    CHECK_INT_EQ(back.top[SPEED_SAMPLER_MAX_TOP_LOGPROBS - 1].id, 7 * (SPEED_SAMPLER_MAX_TOP_LOGPROBS - 1));
}

/* ---- KV descriptor: a valid one --------------------------------------------------------------- */

/* Two pools in two regions, four layers: layers 0-1 (pool 0) hold 40 prompt entries = 3 blocks,
 * layers 2-3 (pool 1) the 5 anchor + tail entries = 1 block. A block holds two layers' units.
 * bf16, 2 heads ([2, 4) of the model's 4) of 8: 64 bytes a token, 1024 a unit. */
#define D_B              16
#define D_HEADS          2
#define D_HEAD_DIM       8
#define D_TOKEN_BYTES    (2 * D_HEADS * D_HEAD_DIM * 2)
#define D_UNIT           ((uint64_t)D_B * D_TOKEN_BYTES)
#define D_STRIDE         (2 * D_UNIT)
#define D_REGION0        0x10000ull
#define D_REGION0_BLOCKS 8 /* region 0 holds blocks 0..7 */
#define D_REGION1        0x200000ull
#define D_REGION1_BLOCKS 4
#define D_LOWER_ENTRIES  40
#define D_UPPER_ENTRIES  5
#define D_TOTAL          ((uint64_t)(2 * D_LOWER_ENTRIES + 2 * D_UPPER_ENTRIES) * D_TOKEN_BYTES)
#define D_EPOCH          0x0123456789abcdefull
#define D_LEASE          22500

static uint8_t g_worker[] = {0xde, 0xad, 0xbe, 0xef, 0x01};
static uint8_t g_rkey0[] = {1, 2, 3};
static uint8_t g_rkey1[] = {4, 5, 6, 7};
static int32_t g_table0[] = {3, 0, 7}; /* out of order, the last block at the region's end */
static int32_t g_table1[] = {2};

/* The C descriptor (test-owned arrays; never passed to speed_kv_desc_destroy). */
typedef struct {
    speed_kv_desc_t d;
    speed_kv_desc_region_t regions[2];
    speed_kv_desc_pool_t pools[2];
    speed_kv_desc_layer_t layers[4];
} c_fixture_t;

static void c_fixture_init(c_fixture_t *f) {
    memset(f, 0, sizeof *f);
    f->regions[0] = (speed_kv_desc_region_t){
        .base = D_REGION0, .length = D_REGION0_BLOCKS * D_STRIDE, .rkey = g_rkey0, .rkey_len = sizeof g_rkey0};
    f->regions[1] = (speed_kv_desc_region_t){
        .base = D_REGION1, .length = D_REGION1_BLOCKS * D_STRIDE, .rkey = g_rkey1, .rkey_len = sizeof g_rkey1};
    f->pools[0] = (speed_kv_desc_pool_t){
        .region = 0, .base = D_REGION0, .block_stride = D_STRIDE, .table = g_table0, .n_blocks = 3};
    f->pools[1] = (speed_kv_desc_pool_t){
        .region = 1, .base = D_REGION1, .block_stride = D_STRIDE, .table = g_table1, .n_blocks = 1};
    f->layers[0] = (speed_kv_desc_layer_t){.pool = 0, .offset = 0, .entries = D_LOWER_ENTRIES};
    f->layers[1] = (speed_kv_desc_layer_t){.pool = 0, .offset = D_UNIT, .entries = D_LOWER_ENTRIES};
    f->layers[2] = (speed_kv_desc_layer_t){.pool = 1, .offset = 0, .entries = D_UPPER_ENTRIES};
    f->layers[3] = (speed_kv_desc_layer_t){.pool = 1, .offset = D_UNIT, .entries = D_UPPER_ENTRIES};
    speed_kv_desc_t *d = &f->d;
    d->worker_addr = g_worker;
    d->worker_addr_len = sizeof g_worker;
    d->transport = SPEED_KV_TRANSPORT_TCP;
    d->regions = f->regions;
    d->n_regions = 2;
    d->pools = f->pools;
    d->n_pools = 2;
    d->layers = f->layers;
    d->n_layers = 4;
    d->block_tokens = D_B;
    d->n_kv_heads = D_HEADS;
    d->head_dim = D_HEAD_DIM;
    d->head_begin = 2;
    d->head_end = 4;
    d->model_kv_heads = 4;
    d->dtype = SPEED_DTYPE_BF16;
    d->unit_bytes = D_UNIT;
    d->total_bytes = D_TOTAL;
    d->epoch = D_EPOCH;
    d->lease_ms = D_LEASE;
    d->cookie = 0; /* not carried by the proto */
}

/* The same descriptor as a proto message, built by hand (test-owned; never freed). Room for
 * one past each limit, for the limit cases. */
typedef struct {
    Speed__V1__KvDescriptor m;
    Speed__V1__KvRegion regions[SPEED_KV_DESC_MAX_REGIONS + 1];
    Speed__V1__KvRegion *region_ptrs[SPEED_KV_DESC_MAX_REGIONS + 1];
    Speed__V1__KvPool pools[SPEED_KV_DESC_MAX_POOLS + 1];
    Speed__V1__KvPool *pool_ptrs[SPEED_KV_DESC_MAX_POOLS + 1];
    Speed__V1__KvLayer layers[SPEED_KV_DESC_MAX_LAYERS + 1];
    Speed__V1__KvLayer *layer_ptrs[SPEED_KV_DESC_MAX_LAYERS + 1];
    int32_t table0[3], table1[1];
} p_fixture_t;

static p_fixture_t g_pf; /* static: the layer array is too big for the stack */

static void p_fixture_init(p_fixture_t *f) {
    Speed__V1__KvDescriptor *m = &f->m;
    speed__v1__kv_descriptor__init(m);
    for (int i = 0; i <= SPEED_KV_DESC_MAX_REGIONS; i++) {
        speed__v1__kv_region__init(&f->regions[i]);
        f->region_ptrs[i] = &f->regions[i];
    }
    for (int i = 0; i <= SPEED_KV_DESC_MAX_POOLS; i++) {
        speed__v1__kv_pool__init(&f->pools[i]);
        f->pool_ptrs[i] = &f->pools[i];
    }
    for (int i = 0; i <= SPEED_KV_DESC_MAX_LAYERS; i++) {
        speed__v1__kv_layer__init(&f->layers[i]);
        f->layer_ptrs[i] = &f->layers[i];
    }
    memcpy(f->table0, g_table0, sizeof f->table0);
    memcpy(f->table1, g_table1, sizeof f->table1);
    f->regions[0].addr = D_REGION0;
    f->regions[0].length = D_REGION0_BLOCKS * D_STRIDE;
    f->regions[0].rkey = (ProtobufCBinaryData){sizeof g_rkey0, g_rkey0};
    f->regions[1].addr = D_REGION1;
    f->regions[1].length = D_REGION1_BLOCKS * D_STRIDE;
    f->regions[1].rkey = (ProtobufCBinaryData){sizeof g_rkey1, g_rkey1};
    f->pools[0].region = 0;
    f->pools[0].block0_addr = D_REGION0;
    f->pools[0].block_bytes = D_STRIDE;
    f->pools[0].n_blocks = 3;
    f->pools[0].blocks = f->table0;
    f->pools[1].region = 1;
    f->pools[1].block0_addr = D_REGION1;
    f->pools[1].block_bytes = D_STRIDE;
    f->pools[1].n_blocks = 1;
    f->pools[1].blocks = f->table1;
    const uint64_t entries[4] = {D_LOWER_ENTRIES, D_LOWER_ENTRIES, D_UPPER_ENTRIES, D_UPPER_ENTRIES};
    for (int l = 0; l < 4; l++) {
        f->layers[l].pool = (uint32_t)(l / 2);
        f->layers[l].offset = (uint64_t)(l % 2) * D_UNIT;
        f->layers[l].entries = entries[l];
    }
    m->worker_address = (ProtobufCBinaryData){sizeof g_worker, g_worker};
    m->transport = "tcp";
    m->n_regions = 2;
    m->regions = f->region_ptrs;
    m->n_pools = 2;
    m->pools = f->pool_ptrs;
    m->n_layers = 4;
    m->layers = f->layer_ptrs;
    m->block_tokens = D_B;
    m->n_kv_heads = D_HEADS;
    m->head_dim = D_HEAD_DIM;
    m->head_begin = 2;
    m->head_end = 4;
    m->model_kv_heads = 4;
    m->dtype = "bf16";
    m->unit_bytes = D_UNIT;
    m->total_bytes = D_TOTAL;
    m->epoch = D_EPOCH;
    m->lease_ms = D_LEASE;
    m->prefill_layers = 24;
    m->anchors = 1;
    m->tail = 3;
}

/* ---- KV descriptor: comparisons --------------------------------------------------------------- */

/* Every field of a equals b's (the cookie too). */
static void desc_equal(const char *what, const speed_kv_desc_t *a, const speed_kv_desc_t *b) {
    CHECK_MSG(a->worker_addr_len == b->worker_addr_len &&
                  memcmp(a->worker_addr, b->worker_addr, a->worker_addr_len) == 0,
              "%s: worker address", what);
    CHECK_MSG(a->transport == b->transport, "%s: transport %d vs %d", what, (int)a->transport, (int)b->transport);
    CHECK_MSG(a->dtype == b->dtype, "%s: dtype %d vs %d", what, (int)a->dtype, (int)b->dtype);
    CHECK_MSG(a->block_tokens == b->block_tokens && a->n_kv_heads == b->n_kv_heads && a->head_dim == b->head_dim,
              "%s: shape", what);
    CHECK_MSG(a->head_begin == b->head_begin && a->head_end == b->head_end && a->model_kv_heads == b->model_kv_heads,
              "%s: head range", what);
    CHECK_MSG(a->unit_bytes == b->unit_bytes && a->total_bytes == b->total_bytes, "%s: sizes", what);
    CHECK_MSG(a->epoch == b->epoch, "%s: epoch", what);
    CHECK_MSG(a->lease_ms == b->lease_ms, "%s: lease %lld vs %lld", what, (long long)a->lease_ms,
              (long long)b->lease_ms);
    CHECK_MSG(a->cookie == b->cookie, "%s: cookie", what);
    CHECK_MSG(a->n_regions == b->n_regions && a->n_pools == b->n_pools && a->n_layers == b->n_layers,
              "%s: counts %u/%u/%u vs %u/%u/%u", what, a->n_regions, a->n_pools, a->n_layers, b->n_regions, b->n_pools,
              b->n_layers);
    for (uint32_t i = 0; i < a->n_regions && i < b->n_regions; i++) {
        const speed_kv_desc_region_t *x = &a->regions[i], *y = &b->regions[i];
        CHECK_MSG(x->base == y->base && x->length == y->length && x->rkey_len == y->rkey_len &&
                      memcmp(x->rkey, y->rkey, x->rkey_len) == 0,
                  "%s: region %u", what, i);
    }
    for (uint32_t i = 0; i < a->n_pools && i < b->n_pools; i++) {
        const speed_kv_desc_pool_t *x = &a->pools[i], *y = &b->pools[i];
        CHECK_MSG(x->region == y->region && x->base == y->base && x->block_stride == y->block_stride &&
                      x->n_blocks == y->n_blocks && memcmp(x->table, y->table, x->n_blocks * sizeof *x->table) == 0,
                  "%s: pool %u", what, i);
    }
    for (uint32_t i = 0; i < a->n_layers && i < b->n_layers; i++) {
        const speed_kv_desc_layer_t *x = &a->layers[i], *y = &b->layers[i];
        CHECK_MSG(x->pool == y->pool && x->offset == y->offset && x->entries == y->entries, "%s: layer %u", what, i);
    }
}

/* Every field of the message states d's (and depth's; NULL = zeros). */
static void desc_matches_proto(const char *what, const speed_kv_desc_t *d, const Speed__V1__KvDescriptor *m,
                               const speed_depth_t *depth) {
    CHECK_MSG(m->worker_address.len == d->worker_addr_len &&
                  memcmp(m->worker_address.data, d->worker_addr, d->worker_addr_len) == 0,
              "%s: worker address", what);
    CHECK_MSG(m->transport && strcmp(m->transport, d->transport == SPEED_KV_TRANSPORT_TCP ? "tcp" : "shm") == 0,
              "%s: transport \"%s\"", what, m->transport ? m->transport : "(null)");
    CHECK_MSG(m->dtype && strcmp(m->dtype, speed_dtype_name(d->dtype)) == 0, "%s: dtype \"%s\"", what,
              m->dtype ? m->dtype : "(null)");
    CHECK_MSG(m->block_tokens == (uint32_t)d->block_tokens && m->n_kv_heads == (uint32_t)d->n_kv_heads &&
                  m->head_dim == (uint32_t)d->head_dim,
              "%s: shape", what);
    CHECK_MSG(m->head_begin == (uint32_t)d->head_begin && m->head_end == (uint32_t)d->head_end &&
                  m->model_kv_heads == (uint32_t)d->model_kv_heads,
              "%s: head range", what);
    CHECK_MSG(m->unit_bytes == d->unit_bytes && m->total_bytes == d->total_bytes, "%s: sizes", what);
    CHECK_MSG(m->epoch == d->epoch, "%s: epoch", what);
    CHECK_MSG((int64_t)m->lease_ms == d->lease_ms, "%s: lease", what);
    CHECK_MSG(m->n_regions == d->n_regions && m->n_pools == d->n_pools && m->n_layers == d->n_layers, "%s: counts",
              what);
    for (uint32_t i = 0; i < d->n_regions && i < m->n_regions; i++) {
        const Speed__V1__KvRegion *x = m->regions[i];
        const speed_kv_desc_region_t *y = &d->regions[i];
        CHECK_MSG(x->addr == y->base && x->length == y->length && x->rkey.len == y->rkey_len &&
                      memcmp(x->rkey.data, y->rkey, y->rkey_len) == 0,
                  "%s: region %u", what, i);
    }
    for (uint32_t i = 0; i < d->n_pools && i < m->n_pools; i++) {
        const Speed__V1__KvPool *x = m->pools[i];
        const speed_kv_desc_pool_t *y = &d->pools[i];
        CHECK_MSG(x->region == y->region && x->block0_addr == y->base && x->block_bytes == y->block_stride &&
                      x->n_blocks == y->n_blocks && memcmp(x->blocks, y->table, y->n_blocks * sizeof *y->table) == 0,
                  "%s: pool %u", what, i);
    }
    for (uint32_t i = 0; i < d->n_layers && i < m->n_layers; i++) {
        const Speed__V1__KvLayer *x = m->layers[i];
        const speed_kv_desc_layer_t *y = &d->layers[i];
        CHECK_MSG(x->pool == y->pool && x->offset == y->offset && x->entries == (uint64_t)y->entries, "%s: layer %u",
                  what, i);
    }
    speed_depth_t z = {0, 0, 0};
    if (!depth) depth = &z;
    CHECK_MSG(m->prefill_layers == depth->prefill_layers && m->anchors == depth->anchors && m->tail == depth->tail,
              "%s: depth C=%d A=%d T=%d", what, m->prefill_layers, m->anchors, m->tail);
}

/* ---- KV descriptor: round trips --------------------------------------------------------------- */

static void test_desc_round_trip(void) {
    c_fixture_t f;
    c_fixture_init(&f);
    CHECK_INT_EQ(speed_kv_desc_check(&f.d), SPEED_OK); /* the fixture itself is valid */

    /* C → proto: every field stated */
    const speed_depth_t depth = {24, 1, 3};
    Speed__V1__KvDescriptor m;
    CHECK_INT_EQ(speed_node_kv_desc_to_proto(&f.d, &depth, &m), SPEED_OK);
    desc_matches_proto("to_proto", &f.d, &m, &depth);
    CHECK_STR_EQ(m.transport, "tcp");
    CHECK_STR_EQ(m.dtype, "bf16");

    /* proto → C: equals the original */
    speed_kv_desc_t *back = NULL;
    CHECK_INT_EQ(speed_node_kv_desc_from_proto(&m, &back), SPEED_OK);
    if (back) desc_equal("to_proto, from_proto", &f.d, back);
    speed_kv_desc_destroy(back);

    /* and through the wire bytes */
    uint8_t *buf = NULL;
    size_t len = 0;
    CHECK_INT_EQ(speed_proto_pack(&m.base, &buf, &len), SPEED_OK);
    speed_node_kv_desc_proto_cleanup(&m);
    CHECK(m.regions == NULL && m.pools == NULL && m.layers == NULL && m.n_regions == 0);
    Speed__V1__KvDescriptor *wire = NULL;
    CHECK_INT_EQ(speed_proto_unpack(&speed__v1__kv_descriptor__descriptor, buf, len, (ProtobufCMessage **)&wire),
                 SPEED_OK);
    speed_free(buf);
    if (wire) {
        desc_matches_proto("wire", &f.d, wire, &depth);
        back = NULL;
        CHECK_INT_EQ(speed_node_kv_desc_from_proto(wire, &back), SPEED_OK);
        if (back) desc_equal("to_proto, pack, unpack, from_proto", &f.d, back);
        speed_kv_desc_destroy(back);
        speed_proto_free(&wire->base);
    }

    /* no depth: zeros; shm; no lease */
    f.d.transport = SPEED_KV_TRANSPORT_SHM;
    f.d.lease_ms = 0;
    CHECK_INT_EQ(speed_node_kv_desc_to_proto(&f.d, NULL, &m), SPEED_OK);
    desc_matches_proto("to_proto, no depth", &f.d, &m, NULL);
    CHECK_STR_EQ(m.transport, "shm");
    back = NULL;
    CHECK_INT_EQ(speed_node_kv_desc_from_proto(&m, &back), SPEED_OK);
    if (back) desc_equal("shm, no lease", &f.d, back);
    speed_kv_desc_destroy(back);
    speed_node_kv_desc_proto_cleanup(&m);

    /* the cookie stays on the decode side */
    c_fixture_init(&f);
    f.d.cookie = 99;
    CHECK_INT_EQ(speed_node_kv_desc_to_proto(&f.d, &depth, &m), SPEED_OK);
    back = NULL;
    CHECK_INT_EQ(speed_node_kv_desc_from_proto(&m, &back), SPEED_OK);
    if (back) CHECK_INT_EQ(back->cookie, 0);
    speed_kv_desc_destroy(back);
    speed_node_kv_desc_proto_cleanup(&m);

    /* proto → C → proto, from the hand-built message */
    p_fixture_init(&g_pf);
    back = NULL;
    CHECK_INT_EQ(speed_node_kv_desc_from_proto(&g_pf.m, &back), SPEED_OK);
    if (back) {
        const speed_depth_t d = {24, 1, 3};
        desc_matches_proto("from_proto", back, &g_pf.m, &d);
        CHECK_INT_EQ(back->transport, SPEED_KV_TRANSPORT_TCP);
        CHECK_INT_EQ(back->dtype, SPEED_DTYPE_BF16);
        CHECK_INT_EQ(speed_node_kv_desc_to_proto(back, &d, &m), SPEED_OK);
        desc_matches_proto("from_proto, to_proto", back, &m, &d);
        c_fixture_init(&f);
        desc_equal("from_proto of the hand-built message", &f.d, back);
        speed_node_kv_desc_proto_cleanup(&m);
    }
    speed_kv_desc_destroy(back);
}

/* ---- KV descriptor: refusals ------------------------------------------------------------------ */

/* from_proto(in) returns want; a refusal leaves *desc_p alone and logs why. */
static void desc_expect(const char *what, const Speed__V1__KvDescriptor *in, speed_status_t want) {
    speed_kv_desc_t *d = NULL;
    g_errors_logged = 0;
    speed_status_t st = speed_node_kv_desc_from_proto(in, &d);
    CHECK_MSG(st == want, "%s: %s, want %s", what, speed_status_string(st), speed_status_string(want));
    if (want == SPEED_OK) {
        CHECK_MSG(d != NULL, "%s: no descriptor", what);
    } else {
        CHECK_MSG(d == NULL, "%s: a descriptor on error", what);
        if (want != SPEED_ERR_INVALID_ARGUMENT) CHECK_MSG(g_errors_logged > 0, "%s: refused silently", what);
    }
    speed_kv_desc_destroy(d);
}

/* Each case starts from the valid message and changes one thing. */
#define CASE(what, want, ...)                 \
    do {                                      \
        p_fixture_init(&g_pf);                \
        Speed__V1__KvDescriptor *m = &g_pf.m; \
        (void)m;                              \
        __VA_ARGS__;                          \
        desc_expect(what, m, want);           \
    } while (0)

static uint8_t g_big_blob[SPEED_KV_DESC_MAX_BLOB + 1];

/* Valid regions (unused by the pools) up to n in all. */
static void add_regions(size_t n) {
    for (size_t i = 2; i < n; i++) {
        g_pf.regions[i].addr = 0x1000000ull + (uint64_t)i * 0x10000;
        g_pf.regions[i].length = 4096;
        g_pf.regions[i].rkey = (ProtobufCBinaryData){1, g_rkey0};
    }
    g_pf.m.n_regions = n;
}

/* Valid empty pools (unused by the layers) up to n in all. */
static void add_pools(size_t n) {
    for (size_t i = 2; i < n; i++) {
        g_pf.pools[i].block0_addr = D_REGION0;
        g_pf.pools[i].block_bytes = D_STRIDE;
    }
    g_pf.m.n_pools = n;
}

static void test_desc_refusals(void) {
    const speed_status_t OK = SPEED_OK, PEER = SPEED_ERR_PEER_PROTOCOL, FORMAT = SPEED_ERR_FORMAT;
    memset(g_big_blob, 0x5a, sizeof g_big_blob);

    desc_expect("NULL", NULL, SPEED_ERR_INVALID_ARGUMENT);
    CASE("valid", OK, );

    /* limits of kv_transfer.h: at the limit taken, one past it refused */
    CASE("16 regions", OK, add_regions(SPEED_KV_DESC_MAX_REGIONS));
    CASE("17 regions", PEER, add_regions(SPEED_KV_DESC_MAX_REGIONS + 1));
    CASE("16 pools", OK, add_pools(SPEED_KV_DESC_MAX_POOLS));
    CASE("17 pools", PEER, add_pools(SPEED_KV_DESC_MAX_POOLS + 1));
    CASE("4096 layers", OK, m->n_layers = SPEED_KV_DESC_MAX_LAYERS); /* the others: pool 0, no entries */
    CASE("4097 layers", PEER, m->n_layers = SPEED_KV_DESC_MAX_LAYERS + 1);
    CASE("worker address at the limit", OK,
         m->worker_address = (ProtobufCBinaryData){SPEED_KV_DESC_MAX_BLOB, g_big_blob});
    CASE("worker address past the limit", PEER,
         m->worker_address = (ProtobufCBinaryData){SPEED_KV_DESC_MAX_BLOB + 1, g_big_blob});
    CASE("rkey at the limit", OK, g_pf.regions[1].rkey = (ProtobufCBinaryData){SPEED_KV_DESC_MAX_BLOB, g_big_blob});
    CASE("rkey past the limit", PEER,
         g_pf.regions[1].rkey = (ProtobufCBinaryData){SPEED_KV_DESC_MAX_BLOB + 1, g_big_blob});
    {
        /* a table one past the limit (calloc: the pages are never touched unless it is copied) */
        int32_t *huge = calloc((size_t)SPEED_KV_DESC_MAX_BLOCKS + 1, sizeof *huge);
        CHECK(huge != NULL);
        if (huge) {
            memcpy(huge, g_table1, sizeof g_table1);
            CASE("pool table past the limit", PEER, {
                g_pf.pools[1].blocks = huge;
                g_pf.pools[1].n_blocks = (size_t)SPEED_KV_DESC_MAX_BLOCKS + 1;
            });
        }
        free(huge);
    }

    /* transport and dtype by name */
    CASE("transport shm", OK, m->transport = "shm");
    CASE("transport empty", PEER, m->transport = "");
    CASE("transport rdma", PEER, m->transport = "rdma");
    CASE("transport TCP", PEER, m->transport = "TCP");
    CASE("dtype f16", OK, m->dtype = "f16"); /* same size as bf16: the sizes still hold */
    CASE("dtype f32 with bf16 sizes", FORMAT, m->dtype = "f32");
    CASE("dtype empty", PEER, m->dtype = "");
    CASE("dtype NULL", PEER, m->dtype = NULL);
    CASE("dtype int4", PEER, m->dtype = "int4");

    /* missing parts */
    CASE("no worker address", FORMAT, m->worker_address = (ProtobufCBinaryData){0, NULL});
    CASE("no regions", FORMAT, m->n_regions = 0);
    CASE("no pools", FORMAT, m->n_pools = 0);
    CASE("no layers", FORMAT, m->n_layers = 0);
    CASE("no rkey", FORMAT, g_pf.regions[0].rkey = (ProtobufCBinaryData){0, NULL});
    CASE("empty region", FORMAT, g_pf.regions[1].length = 0);
    CASE("block_tokens 0", FORMAT, m->block_tokens = 0);
    CASE("n_kv_heads 0", FORMAT, m->n_kv_heads = 0);
    CASE("head_dim 0", FORMAT, m->head_dim = 0);

    /* a shape that does not add up */
    CASE("head range wider than n_kv_heads", FORMAT, m->head_end = 5);
    CASE("head range reversed", FORMAT, m->head_begin = 4, m->head_end = 2);
    CASE("head_begin negative as int32", FORMAT, m->head_begin = 0x80000000u);
    CASE("model_kv_heads not stated", OK, m->model_kv_heads = 0);
    CASE("model_kv_heads below head_end", FORMAT, m->model_kv_heads = 3);
    CASE("model_kv_heads past 65536", FORMAT, m->model_kv_heads = 65537);
    CASE("unit_bytes + 1", FORMAT, m->unit_bytes = D_UNIT + 1);
    CASE("unit_bytes - 1", FORMAT, m->unit_bytes = D_UNIT - 1);
    CASE("total_bytes + 1", FORMAT, m->total_bytes = D_TOTAL + 1);
    CASE("total_bytes - 1", FORMAT, m->total_bytes = D_TOTAL - 1);

    /* indices out of range */
    CASE("pool's region = n_regions", FORMAT, g_pf.pools[1].region = 2);
    CASE("layer's pool = n_pools", FORMAT, g_pf.layers[3].pool = 2);

    /* a block table shorter than the entries need; entries that fill it exactly are fine */
    CASE("48 entries in 3 blocks", OK, {
        g_pf.layers[0].entries = 3 * D_B;
        m->total_bytes = D_TOTAL + (3 * D_B - D_LOWER_ENTRIES) * D_TOKEN_BYTES;
    });
    CASE("49 entries in 3 blocks", FORMAT, {
        g_pf.layers[0].entries = 3 * D_B + 1;
        m->total_bytes = D_TOTAL + (3 * D_B + 1 - D_LOWER_ENTRIES) * D_TOKEN_BYTES;
    });
    CASE("table of 2 for 40 entries", FORMAT, g_pf.pools[0].n_blocks = 2);
    CASE("entries negative as int64", FORMAT, g_pf.layers[2].entries = UINT64_MAX);
    CASE("entries past 32 bits", FORMAT, g_pf.layers[2].entries = (1ull << 32) + D_UPPER_ENTRIES); /* not cut */

    /* blocks outside their region; the fixture's last block ends exactly at region 0's end */
    CASE("block id -1", FORMAT, g_pf.table0[1] = -1);
    CASE("block id past the region", FORMAT, g_pf.table0[2] = D_REGION0_BLOCKS);
    CASE("region 0 a byte short", FORMAT, g_pf.regions[0].length = D_REGION0_BLOCKS * D_STRIDE - 1);
    CASE("region 0 starts a byte late", FORMAT, g_pf.regions[0].addr = D_REGION0 + 1);
    CASE("region extent overflows", FORMAT, g_pf.regions[1].addr = UINT64_MAX - 100);
    CASE("block stride below the unit", FORMAT, g_pf.pools[1].block_bytes = D_UNIT - 1);
    CASE("layer offset past the block", FORMAT, g_pf.layers[1].offset = D_UNIT + 1);
    CASE("pool base below its region", FORMAT, g_pf.pools[0].block0_addr = D_REGION0 - D_STRIDE);

    /* the lease is a duration counted from receipt on this host's clock; a nonce of another
     * length is refused, and so is integrity mode without a nonce */
    {
        p_fixture_init(&g_pf);
        g_pf.m.lease_ms = 5;
        uint64_t t0 = speed_clock_mono_ns();
        speed_kv_desc_t *d = NULL;
        CHECK_INT_EQ(speed_node_kv_desc_from_proto(&g_pf.m, &d), SPEED_OK);
        if (d) CHECK_INT_EQ(d->lease_ms, 5);
        if (d) CHECK(d->received_ns >= t0 && !d->has_nonce);
        speed_kv_desc_destroy(d);
        uint8_t nonce[17] = {1, 2, 3};
        g_pf.m.nonce.data = nonce;
        g_pf.m.nonce.len = 16;
        d = NULL;
        CHECK_INT_EQ(speed_node_kv_desc_from_proto(&g_pf.m, &d), SPEED_OK);
        if (d) CHECK(d->has_nonce && d->nonce[0] == 1 && d->nonce[2] == 3);
        speed_kv_desc_destroy(d);
        g_pf.m.nonce.len = 17;
        d = NULL;
        CHECK_INT_EQ(speed_node_kv_desc_from_proto(&g_pf.m, &d), SPEED_ERR_FORMAT);
        g_pf.m.nonce.len = 0;
        g_pf.m.integrity = true;
        CHECK_INT_EQ(speed_node_kv_desc_from_proto(&g_pf.m, &d), SPEED_ERR_FORMAT);
        g_pf.m.integrity = false;
        g_pf.m.nonce.data = NULL;
    }
}

/* ---- KV descriptor: allocation failures ------------------------------------------------------- */

static void test_desc_alloc_failures(void) {
    int64_t live = speed_alloc_live_count();
    c_fixture_t f;
    c_fixture_init(&f);
    p_fixture_init(&g_pf);
    bool to_done = false, from_done = false;
    for (int64_t k = 0; k < 64 && !(to_done && from_done); k++) {
        Speed__V1__KvDescriptor m;
        speed_alloc_fail_after(k, 0);
        speed_status_t st = speed_node_kv_desc_to_proto(&f.d, NULL, &m);
        speed_alloc_fail_after(-1, 0);
        CHECK_MSG(st == SPEED_OK || st == SPEED_ERR_NO_MEMORY, "to_proto, allocation %lld fails: %s", (long long)k,
                  speed_status_string(st));
        if (st == SPEED_OK) {
            to_done = true;
            speed_node_kv_desc_proto_cleanup(&m);
        }
        speed_kv_desc_t *d = NULL;
        speed_alloc_fail_after(k, 0);
        st = speed_node_kv_desc_from_proto(&g_pf.m, &d);
        speed_alloc_fail_after(-1, 0);
        CHECK_MSG(st == SPEED_OK || st == SPEED_ERR_NO_MEMORY, "from_proto, allocation %lld fails: %s", (long long)k,
                  speed_status_string(st));
        CHECK_MSG((st == SPEED_OK) == (d != NULL), "from_proto, allocation %lld fails: descriptor %p", (long long)k,
                  (void *)d);
        if (st == SPEED_OK) from_done = true;
        speed_kv_desc_destroy(d);
        CHECK_MSG(speed_alloc_live_count() == live, "allocation %lld fails: %lld live allocations left", (long long)k,
                  (long long)(speed_alloc_live_count() - live));
    }
    CHECK(to_done && from_done);
}

/* Empty arrays: to_proto + cleanup give back every allocation (the element storage of a count
 * of 0 used to leak: it was freed only through element 0 when the count was not 0). */
static void test_desc_empty_counts(void) {
    int64_t live = speed_alloc_live_count();
    c_fixture_t f;
    c_fixture_init(&f);
    speed_kv_desc_t d = f.d;
    d.n_regions = 0, d.n_pools = 0, d.n_layers = 0;
    Speed__V1__KvDescriptor m;
    CHECK_INT_EQ(speed_node_kv_desc_to_proto(&d, NULL, &m), SPEED_OK);
    CHECK(m.n_regions == 0 && m.n_pools == 0 && m.n_layers == 0);
    speed_node_kv_desc_proto_cleanup(&m);
    CHECK_MSG(speed_alloc_live_count() == live, "%lld allocations left", (long long)(speed_alloc_live_count() - live));
}

int main(void) {
    speed_log_set_sink(counting_sink, NULL); /* the refusals below are expected */
    test_depth();
    test_depth_resume();
    test_sampling();
    test_tokens();
    test_desc_round_trip();
    test_desc_refusals();
    test_desc_alloc_failures();
    test_desc_empty_counts();
    speed_log_set_sink(NULL, NULL);
    return CHECK_DONE();
}
