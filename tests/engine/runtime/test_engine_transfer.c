/* The disaggregated path in miniature: a "prefill" engine runs the shallow prefill of a prompt
 * (max_new_tokens 1), reports each layer through the layer callback, exports the KV in the
 * canonical layout; a "decode" engine with a different pool split reserves the sequence,
 * imports the KV (or receives it block by block at the addresses of speed_kv_cache_block_addr),
 * appends the first token and decodes. Tokens and logits must equal a colocated run. */
#include "engine_test_util.h"
#include "kv_cache.h"

#define N_PROMPT 30
#define N_GEN    8

typedef struct {
    int n_events;
    int layer[256];
    int64_t done[256], total[256];
    int fail_at; /* event index whose callback fails (-1 = none) */
} cb_log_t;

static speed_status_t layer_cb(void *user, speed_seq_id_t seq, int layer, int64_t n_done, int64_t n_total) {
    (void)seq;
    cb_log_t *log = user;
    if (log->n_events == log->fail_at) {
        log->fail_at = -1;
        return SPEED_ERR_TRANSFER;
    }
    if (log->n_events < 256) {
        log->layer[log->n_events] = layer;
        log->done[log->n_events] = n_done;
        log->total[log->n_events] = n_total;
    }
    log->n_events++;
    return SPEED_OK;
}

static speed_engine_params_t params(speed_backend_t *be, const speed_model_t *m, int C_engine) {
    speed_engine_params_t p = speed_engine_default_params();
    p.backend = be;
    p.model = m;
    p.kv_dtype = SPEED_DTYPE_F32; /* the byte counts below are in f32 (the default, auto, is the model's) */
    p.block_tokens = 8;
    p.prefill_chunk = 8;
    p.max_step_tokens = 16;
    p.max_seqs = 2;
    p.depth = (speed_depth_t){C_engine, 1, 1};
    p.n_blocks_lower = p.n_blocks_upper = 16;
    return p;
}

int main(int argc, char **argv) {
    const char *backend = argc > 1 ? argv[1] : "cpu-ref";
    tu_tmp_init("engine-transfer");
    speed_backend_t *be = et_backend(backend);
    if (!be) {
        tu_rm_rf(tu_root);
        SKIP_TEST("backend %s is not available", backend);
    }
    et_model_spec_t spec = {"bf16-gqa", SPEED_DTYPE_BF16, false, 2, false};
    speed_model_t *m = et_model_make(&spec);
    CHECK(m != NULL);
    if (!m) return CHECK_DONE();
    const int L = m->config.n_layers, V = m->config.vocab_size;
    const speed_depth_t depth = {2, 2, 3}; /* C = L/2, A = 2, T = 3 */

    /* colocated reference */
    et_seq_t ref;
    memset(&ref, 0, sizeof ref);
    ref.depth = depth;
    ref.n_prompt = N_PROMPT;
    ref.n_gen = N_GEN;
    et_prompt(ref.prompt, N_PROMPT, 77, V);
    speed_engine_params_t pr = params(be, m, 2);
    speed_engine_t *er = NULL;
    CHECK(speed_engine_create(&pr, &er) == SPEED_OK);
    CHECK(et_run(er, &ref, 1) == SPEED_OK);
    speed_engine_destroy(er);

    /* prefill node: split at L (SPEED off by default), this request at depth 2 */
    cb_log_t log = {.fail_at = 2};
    speed_engine_params_t pp = params(be, m, 0);
    pp.layer_cb = layer_cb;
    pp.layer_cb_user = &log;
    speed_engine_t *ep = NULL;
    CHECK(speed_engine_create(&pp, &ep) == SPEED_OK);
    speed_seq_id_t sp;
    CHECK(speed_engine_seq_add(ep, ref.prompt, N_PROMPT, &depth, 1, &sp) == SPEED_OK);
    speed_engine_step_result_t r;
    /* the first step's callback fails at its 3rd event (layer 2): the step fails, nothing advances */
    CHECK(speed_engine_step(ep, &r) == SPEED_ERR_TRANSFER);
    CHECK_INT_EQ(r.n_outputs, 0);
    speed_engine_seq_stats_t ss;
    CHECK(speed_engine_seq_stats(ep, sp, &ss) == SPEED_OK);
    CHECK_INT_EQ(ss.n_prefilled, 0);
    CHECK_INT_EQ(ss.kv_bytes_used, 0);
    log.n_events = 0;
    float *first_logits = malloc((size_t)V * sizeof(float));
    int guard = 0;
    do {
        CHECK(speed_engine_step(ep, &r) == SPEED_OK);
    } while (r.n_outputs == 0 && ++guard < 100);
    CHECK_INT_EQ(r.n_outputs, 1);
    CHECK(r.outputs[0].first);
    memcpy(first_logits, r.outputs[0].logits, (size_t)V * sizeof(float));
    CHECK(memcmp(first_logits, ref.logits, (size_t)V * sizeof(float)) == 0);
    int32_t first = et_argmax(first_logits, V);
    CHECK_INT_EQ(first, ref.gen[0]);
    CHECK(speed_engine_seq_append(ep, sp, first) == SPEED_ERR_TOO_LONG); /* max_new 1: prefill only */

    /* the layer callback: chunks of 8 over 30 tokens. Layers < 2 report 8, 16, 24, 30 of 30;
     * layers >= 2 hold anchors 0-1 and tail 27-29: reported in the first chunk (2 of 5) and the
     * last (5 of 5) only. Every layer ends complete, in layer order within a step. */
    int complete[64] = {0}, n_upper_events = 0;
    for (int i = 0; i < log.n_events; i++) {
        int l = log.layer[i];
        CHECK(log.done[i] <= log.total[i]);
        CHECK_INT_EQ(log.total[i], l < 2 ? N_PROMPT : 5);
        if (l >= 2) n_upper_events++;
        if (log.done[i] == log.total[i]) complete[l]++;
    }
    CHECK_INT_EQ(log.n_events, 2 * 4 + (L - 2) * 2);
    CHECK_INT_EQ(n_upper_events, (L - 2) * 2);
    for (int l = 0; l < L; l++) CHECK_INT_EQ(complete[l], 1);

    /* export: the canonical layout, ~ the section 1 formula */
    size_t wire = 0;
    CHECK(speed_engine_seq_kv_size(ep, sp, &wire) == SPEED_OK);
    size_t formula = speed_kv_bytes_for_prompt(&m->config, 2, 2, 3, N_PROMPT, SPEED_DTYPE_F32);
    size_t unit = speed_kv_cache_unit_bytes(speed_engine_kv_cache(ep));
    CHECK(wire >= formula && wire - formula < (size_t)L * unit);
    CHECK_INT_EQ(wire, (2 * 4 + (L - 2) * 1) * unit); /* 30 entries = 4 blocks of 8; 5 = 1 block */
    CHECK(speed_engine_seq_stats(ep, sp, &ss) == SPEED_OK);
    CHECK_INT_EQ(ss.kv_bytes_used, formula);
    char *buf = malloc(wire);
    CHECK(speed_engine_seq_kv_export(ep, sp, buf, wire) == SPEED_OK);

    /* decode node A: split at 3, import from the buffer */
    speed_engine_params_t pd = params(be, m, 3);
    speed_engine_t *ed = NULL;
    CHECK(speed_engine_create(&pd, &ed) == SPEED_OK);
    speed_seq_id_t sd, sd2;
    CHECK(speed_engine_seq_reserve(ed, N_PROMPT, &depth, N_GEN, &sd) == SPEED_OK);
    CHECK(speed_engine_seq_append(ed, sd, first) == SPEED_ERR_INVALID_ARGUMENT); /* no KV yet */
    CHECK(speed_engine_step(ed, &r) == SPEED_OK && r.n_seqs == 0);               /* waits */
    size_t expected = 0;
    CHECK(speed_engine_seq_kv_size(ed, sd, &expected) == SPEED_OK);
    CHECK_INT_EQ(expected, wire);
    CHECK(speed_engine_seq_kv_import(ed, sd, buf, wire - 8) == SPEED_ERR_INVALID_ARGUMENT);
    CHECK(speed_engine_seq_kv_import(ed, sd, buf, wire) == SPEED_OK);
    CHECK(speed_engine_seq_kv_import(ed, sd, buf, wire) == SPEED_ERR_INVALID_ARGUMENT); /* once */

    /* decode node B (same engine, second sequence): block by block at the cache addresses,
     * as a UCX put would, then kv_ready */
    CHECK(speed_engine_seq_reserve(ed, N_PROMPT, &depth, N_GEN, &sd2) == SPEED_OK);
    {
        speed_kv_cache_t *cp = speed_engine_kv_cache(ep), *cd = speed_engine_kv_cache(ed);
        speed_kv_seq_t *kp, *kd;
        CHECK(speed_engine_seq_kv(ep, sp, &kp) == SPEED_OK);
        CHECK(speed_engine_seq_kv(ed, sd2, &kd) == SPEED_OK);
        char *tmp = malloc(unit);
        size_t moved = 0;
        for (int l = 0; l < L; l++) {
            int64_t nb = (speed_kv_seq_entries(kp, l) + 7) / 8;
            for (int64_t b = 0; b < nb; b++) {
                void *src, *dst;
                size_t n1, n2;
                CHECK(speed_kv_cache_block_addr(cp, kp, l, b, &src, &n1) == SPEED_OK);
                CHECK(speed_kv_cache_block_addr(cd, kd, l, b, &dst, &n2) == SPEED_OK);
                CHECK(n1 == unit && n2 == unit);
                CHECK(speed_backend_download(be, tmp, src, unit) == SPEED_OK);
                CHECK(speed_backend_upload(be, dst, tmp, unit) == SPEED_OK);
                moved += unit;
            }
        }
        CHECK_INT_EQ(moved, wire);
        free(tmp);
    }
    CHECK(speed_engine_seq_kv_ready(ed, sd2) == SPEED_OK);
    CHECK(speed_engine_seq_remove(ep, sp) == SPEED_OK);
    speed_engine_destroy(ep);

    /* both decode: identical to the colocated run, token by token and bit for bit on cpu-ref */
    speed_seq_id_t ids[2] = {sd, sd2};
    int n_out[2] = {1, 1};
    int32_t last[2] = {first, first};
    double maxd = 0;
    int token_diff = 0;
    for (int k = 0; k < 2; k++) CHECK(speed_engine_seq_append(ed, ids[k], first) == SPEED_OK);
    for (guard = 0; (n_out[0] < N_GEN || n_out[1] < N_GEN) && guard < 100; guard++) {
        CHECK(speed_engine_step(ed, &r) == SPEED_OK);
        for (int o = 0; o < r.n_outputs; o++) {
            int k = r.outputs[o].seq == sd ? 0 : 1;
            CHECK(!r.outputs[o].first);
            const float *want = ref.logits + (size_t)n_out[k] * V;
            for (int i = 0; i < V; i++) maxd = fmax(maxd, fabs((double)r.outputs[o].logits[i] - want[i]));
            last[k] = et_argmax(r.outputs[o].logits, V);
            if (last[k] != ref.gen[n_out[k]]) token_diff++;
            n_out[k]++;
            if (n_out[k] < N_GEN)
                CHECK(speed_engine_seq_append(ed, ids[k], last[k]) == SPEED_OK);
            else
                CHECK(speed_engine_seq_append(ed, ids[k], last[k]) == SPEED_ERR_TOO_LONG);
        }
    }
    CHECK_INT_EQ(n_out[0], N_GEN);
    CHECK_INT_EQ(n_out[1], N_GEN);
    CHECK_INT_EQ(token_diff, 0);
    if (strcmp(backend, "cpu-ref") == 0)
        CHECK_MSG(maxd == 0.0, "decode after import differs by %g", maxd);
    else
        CHECK_MSG(maxd < 1e-2, "decode after import differs by %g", maxd);
    fprintf(stderr, "%s: prefill -> export (%zu bytes, formula %zu) -> import -> %d tokens: max |dlogit| %g\n", backend,
            wire, formula, N_GEN, maxd);
    /* the upper layers of the decode side hold only A + T + generated entries */
    speed_kv_seq_t *kd;
    CHECK(speed_engine_seq_kv(ed, sd, &kd) == SPEED_OK);
    CHECK_INT_EQ(speed_kv_seq_entries(kd, L - 1), 5 + N_GEN - 1);
    CHECK_INT_EQ(speed_kv_seq_entries(kd, 0), N_PROMPT + N_GEN - 1);
    CHECK(speed_engine_seq_remove(ed, sd) == SPEED_OK);
    CHECK(speed_engine_seq_remove(ed, sd2) == SPEED_OK);
    speed_engine_destroy(ed);

    free(buf);
    free(first_logits);
    et_seq_free(&ref);
    speed_model_destroy(m);
    speed_backend_destroy(be);
    tu_rm_rf(tu_root);
    return CHECK_DONE();
}
