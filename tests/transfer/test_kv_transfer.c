/* Disaggregated prefill -> decode over UCX, end to end, with SPEED (C = L/2, A = 1, T = 1):
 *
 *   decode node: reserves the sequence (its pools split at L/2 + 1, not at C: the layouts
 *                differ), builds the descriptor, sends it over a socket as the control plane
 *                does (the protobuf KvDescriptor, xfer_desc_wire.h);
 *   prefill node: unpacks and checks the descriptor, prefills the prompt, pushing each layer's
 *                blocks from the engine's layer callback, finishes (flush + notify), sends the
 *                first token;
 *   decode node: the notify arrives (bytes = the section 1 formula), marks the KV ready, decodes.
 *
 * The greedy tokens and logits must equal those of one engine that did prefill and decode itself
 * (bit for bit: cpu-ref is deterministic). argv: shm|tcp, inproc|fork (fork: the decode node is a
 * child process, as in a deployment) [puts] (puts: the descriptor carries no grant, so the KV goes
 * as one-sided puts instead of the writes the decode side checks against its grant). */
#include <signal.h>
#include <sys/wait.h>

#include "engine_test_util.h"
#include "kv_transfer.h"
#include "xfer_desc_wire.h"
#include "xfer_test_util.h"

#define N_PROMPT 45
#define N_GEN    8
#define BLOCK    8

typedef struct {
    speed_kv_xfer_t *xfer;
    speed_seq_id_t seq;
    int n_calls, n_errors;
} push_ctx_t;

/* The prefill engine's layer callback: ship what the layer completed. A failing push does not
 * fail the step (other sequences of the batch would be redone); the transfer's status says it. */
static speed_status_t on_layer(void *user, speed_seq_id_t seq, int layer, int64_t n_done, int64_t n_total) {
    push_ctx_t *pc = user;
    if (!pc->xfer || seq != pc->seq) return SPEED_OK;
    pc->n_calls++;
    if (speed_kv_xfer_push_layer(pc->xfer, layer, n_done, n_total) != SPEED_OK) pc->n_errors++;
    return SPEED_OK;
}

static speed_engine_params_t eng_params(speed_backend_t *be, const speed_model_t *m, int split) {
    speed_engine_params_t p = speed_engine_default_params();
    p.backend = be;
    p.model = m;
    p.kv_dtype = SPEED_DTYPE_F32; /* the byte counts below are in f32 (the default, auto, is the model's) */
    p.block_tokens = BLOCK;
    p.prefill_chunk = 16; /* 3 chunks: layers report partial progress */
    p.max_step_tokens = 32;
    p.max_seqs = 2;
    p.depth = (speed_depth_t){split, 1, 1};
    p.n_blocks_lower = p.n_blocks_upper = 24;
    return p;
}

typedef struct {
    const char *transport;
    bool puts; /* descriptors without a grant: one-sided puts, not checked writes */
    speed_model_t *model;
    speed_backend_t *backend;
    speed_depth_t depth;
    int32_t prompt[N_PROMPT];
    /* decode node */
    speed_kv_xfer_ctx_t *dctx;
    speed_engine_t *deng;
    speed_seq_id_t dseq;
    xt_inbox_t inbox;
    /* results of the decode node */
    int32_t gen[N_GEN];
    float *logits; /* [N_GEN - 1][V]: the logits after the first token */
} run_t;

/* Decode node, part 1: reserve and describe. Returns the descriptor bytes (speed_malloc). The
 * message carries no cookie (the node daemons build with 0 and match notifies by request id);
 * the cookie's echo is test_kv_transfer_fault's. */
static int decode_setup(run_t *r, uint8_t **desc_p, size_t *len_p) {
    int L = r->model->config.n_layers;
    speed_engine_params_t p = eng_params(r->backend, r->model, L / 2 + 1);
    CHECK(speed_engine_create(&p, &r->deng) == SPEED_OK);
    xt_inbox_init(&r->inbox);
    speed_kv_xfer_ctx_params_t cp = speed_kv_xfer_ctx_default_params();
    cp.notify_cb = xt_inbox_cb;
    cp.notify_user = &r->inbox;
    cp.writes_only = !r->puts; /* as a decode node: the descriptor (its proto too) carries no rkeys */
    CHECK(speed_kv_xfer_ctx_create(&cp, &r->dctx) == SPEED_OK);
    if (!r->deng || !r->dctx) return -1;
    CHECK(speed_kv_xfer_ctx_register_cache(r->dctx, speed_engine_kv_cache(r->deng)) == SPEED_OK);
    CHECK(speed_engine_seq_reserve(r->deng, N_PROMPT, &r->depth, N_GEN, &r->dseq) == SPEED_OK);
    /* with a grant (as a decode node builds them) the KV goes as checked writes; without (the
     * "puts" variant) as one-sided puts */
    speed_kv_desc_params_t dp = {
        .transport = xt_transport(r->transport), .lease_ms = 60000, .grant_id = r->puts ? NULL : "req-e2e"};
    speed_kv_desc_t *d = NULL;
    CHECK(speed_kv_desc_build_engine(r->dctx, r->deng, r->dseq, &dp, &d) == SPEED_OK);
    CHECK(d && d->has_nonce == !r->puts);
    CHECK(d && (d->regions[0].rkey_len == 0) == !r->puts);
    if (!d) return -1;
    CHECK_INT_EQ(d->n_layers, L);
    CHECK_INT_EQ(d->n_pools, 2);
    CHECK_INT_EQ(d->epoch, speed_kv_xfer_ctx_epoch(r->dctx));
    CHECK(xt_desc_pack(d, desc_p, len_p) == SPEED_OK);
    speed_kv_desc_destroy(d);
    return 0;
}

/* Decode node, part 2: wait for the notify, mark ready, decode from the first token. */
static void decode_run(run_t *r, int32_t first) {
    const int V = r->model->config.vocab_size;
    CHECK_INT_EQ(xt_inbox_wait(&r->inbox, 1, 30000), 1);
    size_t want = speed_kv_bytes_for_prompt(&r->model->config, r->depth.prefill_layers, r->depth.anchors, r->depth.tail,
                                            N_PROMPT, SPEED_DTYPE_F32);
    CHECK_INT_EQ(r->inbox.bytes, want);
    CHECK_STR_EQ(r->inbox.request_id, "req-e2e");
    CHECK(speed_engine_seq_kv_ready(r->deng, r->dseq) == SPEED_OK);
    r->gen[0] = first;
    r->logits = calloc((size_t)N_GEN * V, sizeof(float));
    CHECK(speed_engine_seq_append(r->deng, r->dseq, first) == SPEED_OK);
    int n = 1;
    for (int guard = 0; n < N_GEN && guard < 200; guard++) {
        speed_engine_step_result_t sr;
        if (speed_engine_step(r->deng, &sr) != SPEED_OK) {
            CHECK(0);
            break;
        }
        for (int o = 0; o < sr.n_outputs; o++) {
            memcpy(r->logits + (size_t)(n - 1) * V, sr.outputs[o].logits, (size_t)V * sizeof(float));
            r->gen[n] = et_argmax(sr.outputs[o].logits, V);
            if (n + 1 < N_GEN) CHECK(speed_engine_seq_append(r->deng, r->dseq, r->gen[n]) == SPEED_OK);
            n++;
        }
    }
    CHECK_INT_EQ(n, N_GEN);
    speed_kv_xfer_ctx_stats_t st;
    speed_kv_xfer_ctx_stats(r->dctx, &st);
    CHECK_INT_EQ(st.n_notified, 1);
    CHECK_INT_EQ(st.bytes_notified, want);
    /* which path carried the bytes: every one was checked and copied, or none went that way */
    CHECK_INT_EQ(st.bytes_written, r->puts ? 0 : want);
    CHECK_INT_EQ(st.n_writes_dropped, 0);
    speed_kv_xfer_ctx_grant_drop(r->dctx, "req-e2e");
    CHECK(speed_engine_seq_remove(r->deng, r->dseq) == SPEED_OK);
}

static void decode_cleanup(run_t *r) {
    if (r->dctx && r->deng) speed_kv_xfer_ctx_deregister_cache(r->dctx, speed_engine_kv_cache(r->deng));
    speed_kv_xfer_ctx_destroy(r->dctx);
    speed_engine_destroy(r->deng);
    xt_inbox_cleanup(&r->inbox);
    free(r->logits);
}

/* Prefill node: everything from the descriptor bytes to the first token. */
static int32_t prefill_run(run_t *r, const void *desc_bytes, size_t desc_len, speed_kv_xfer_ctx_t *pctx) {
    const int V = r->model->config.vocab_size;
    push_ctx_t pc = {0};
    speed_engine_params_t p = eng_params(r->backend, r->model, r->depth.prefill_layers);
    p.layer_cb = on_layer;
    p.layer_cb_user = &pc;
    speed_engine_t *e = NULL;
    CHECK(speed_engine_create(&p, &e) == SPEED_OK);
    if (!e) return -1;
    CHECK(speed_kv_xfer_ctx_register_cache(pctx, speed_engine_kv_cache(e)) == SPEED_OK);
    speed_kv_desc_t *d = NULL;
    CHECK(xt_desc_unpack(desc_bytes, desc_len, &d) == SPEED_OK);
    CHECK(speed_engine_seq_add(e, r->prompt, N_PROMPT, &r->depth, 1, &pc.seq) == SPEED_OK);
    if (d) CHECK(speed_kv_xfer_create_engine(pctx, d, e, pc.seq, "req-e2e", &pc.xfer) == SPEED_OK);
    int32_t first = -1;
    for (int guard = 0; guard < 100 && first < 0; guard++) {
        speed_engine_step_result_t sr;
        CHECK(speed_engine_step(e, &sr) == SPEED_OK);
        if (sr.n_outputs == 1) first = et_argmax(sr.outputs[0].logits, V);
    }
    CHECK(first >= 0);
    CHECK_INT_EQ(pc.n_errors, 0);
    CHECK(pc.n_calls > r->model->config.n_layers); /* chunks: layers reported more than once */
    size_t want = speed_kv_bytes_for_prompt(&r->model->config, r->depth.prefill_layers, r->depth.anchors, r->depth.tail,
                                            N_PROMPT, SPEED_DTYPE_F32);
    size_t wire = 0;
    CHECK(speed_engine_seq_kv_size(e, pc.seq, &wire) == SPEED_OK);
    if (pc.xfer) {
        CHECK(speed_kv_xfer_finish(pc.xfer) == SPEED_OK);
        speed_status_t st = speed_kv_xfer_wait(pc.xfer, -1);
        CHECK_MSG(st == SPEED_OK, "transfer: %s", speed_status_string(st));
        speed_kv_xfer_info_t info;
        speed_kv_xfer_info(pc.xfer, &info);
        CHECK(info.state == SPEED_KV_XFER_DONE);
        CHECK_INT_EQ(info.bytes_put, want);
        CHECK_INT_EQ(info.total_bytes, want);
        CHECK(info.bytes_put <= wire); /* whole units would be seq_kv_size */
        fprintf(stderr,
                "%s: %llu bytes put in %llu puts (formula %zu, whole units %zu); push %.3f ms, finish %.3f ms\n",
                r->transport, (unsigned long long)info.bytes_put, (unsigned long long)info.n_puts, want, wire,
                info.push_ns / 1e6, info.finish_ns / 1e6);
        speed_kv_xfer_destroy(pc.xfer);
    }
    speed_kv_xfer_ctx_stats_t cs;
    speed_kv_xfer_ctx_stats(pctx, &cs);
    CHECK_INT_EQ(cs.n_done, 1);
    CHECK_INT_EQ(cs.bytes_put, want);
    CHECK(speed_engine_seq_remove(e, pc.seq) == SPEED_OK);
    speed_kv_xfer_ctx_deregister_cache(pctx, speed_engine_kv_cache(e));
    speed_engine_destroy(e);
    speed_kv_desc_destroy(d);
    return first;
}

int main(int argc, char **argv) {
    const char *transport = argc > 1 ? argv[1] : "shm";
    const char *mode = argc > 2 ? argv[2] : "inproc";
    const bool puts = argc > 3 && strcmp(argv[3], "puts") == 0;
    xt_ucx_env();
    tu_tmp_init("kv-transfer");
    run_t r;
    memset(&r, 0, sizeof r);
    r.transport = transport;
    r.puts = puts;
    r.backend = et_backend("cpu-ref");
    et_model_spec_t spec = {"bf16-gqa", SPEED_DTYPE_BF16, false, 2, false};
    r.model = r.backend ? et_model_make(&spec) : NULL;
    CHECK(r.model != NULL);
    if (!r.model) return CHECK_DONE();
    const int L = r.model->config.n_layers, V = r.model->config.vocab_size;
    r.depth = (speed_depth_t){L / 2, 1, 1};
    et_prompt(r.prompt, N_PROMPT, 5, V);

    /* colocated reference: one engine, prefill + decode */
    et_seq_t ref;
    memset(&ref, 0, sizeof ref);
    ref.depth = r.depth;
    ref.n_prompt = N_PROMPT;
    ref.n_gen = N_GEN;
    memcpy(ref.prompt, r.prompt, sizeof r.prompt);
    {
        speed_engine_params_t p = eng_params(r.backend, r.model, r.depth.prefill_layers);
        speed_engine_t *e = NULL;
        CHECK(speed_engine_create(&p, &e) == SPEED_OK);
        CHECK(e && et_run(e, &ref, 1) == SPEED_OK);
        speed_engine_destroy(e);
    }

    speed_kv_xfer_ctx_params_t pp = speed_kv_xfer_ctx_default_params();
    if (strcmp(mode, "fork") == 0) {
        int sv[2];
        CHECK(socketpair(AF_UNIX, SOCK_STREAM, 0, sv) == 0);
        fflush(NULL);
        pid_t pid = fork();
        if (pid == 0) { /* decode node */
            close(sv[0]);
            uint8_t *desc = NULL;
            size_t len = 0;
            if (decode_setup(&r, &desc, &len) == 0 && xt_send(sv[1], desc, len) == 0) {
                void *msg = NULL;
                size_t n = 0;
                if (xt_recv(sv[1], &msg, &n, 60000) == 0 && n == sizeof(int32_t)) {
                    int32_t first;
                    memcpy(&first, msg, sizeof first);
                    decode_run(&r, first);
                    CHECK(xt_send(sv[1], r.gen, sizeof r.gen) == 0);
                    CHECK(xt_send(sv[1], r.logits, (size_t)(N_GEN - 1) * V * sizeof(float)) == 0);
                } else {
                    CHECK_MSG(0, "decode node: no first token");
                }
                free(msg);
            }
            speed_free(desc);
            decode_cleanup(&r);
            close(sv[1]);
            et_seq_free(&ref);
            speed_model_destroy(r.model);
            speed_backend_destroy(r.backend);
            _exit(CHECK_DONE());
        }
        close(sv[1]);
        speed_kv_xfer_ctx_t *pctx = NULL;
        CHECK(speed_kv_xfer_ctx_create(&pp, &pctx) == SPEED_OK);
        void *desc = NULL, *gen = NULL, *logits = NULL;
        size_t len = 0, n1 = 0, n2 = 0;
        CHECK(xt_recv(sv[0], &desc, &len, 60000) == 0);
        int32_t first = desc && pctx ? prefill_run(&r, desc, len, pctx) : -1;
        CHECK_INT_EQ(first, ref.gen[0]);
        CHECK(xt_send(sv[0], &first, sizeof first) == 0);
        CHECK(xt_recv(sv[0], &gen, &n1, 60000) == 0 && n1 == sizeof r.gen);
        CHECK(xt_recv(sv[0], &logits, &n2, 60000) == 0 && n2 == (size_t)(N_GEN - 1) * V * sizeof(float));
        if (gen) memcpy(r.gen, gen, sizeof r.gen);
        if (logits && n2 == (size_t)(N_GEN - 1) * V * sizeof(float)) {
            r.logits = malloc(n2);
            memcpy(r.logits, logits, n2);
        }
        free(desc);
        free(gen);
        free(logits);
        int status = 0;
        CHECK(waitpid(pid, &status, 0) == pid);
        CHECK_MSG(WIFEXITED(status) && WEXITSTATUS(status) == 0, "decode node exit status 0x%x", status);
        close(sv[0]);
        speed_kv_xfer_ctx_destroy(pctx);
    } else {
        speed_kv_xfer_ctx_t *pctx = NULL;
        CHECK(speed_kv_xfer_ctx_create(&pp, &pctx) == SPEED_OK);
        uint8_t *desc = NULL;
        size_t len = 0;
        if (pctx && decode_setup(&r, &desc, &len) == 0) {
            int32_t first = prefill_run(&r, desc, len, pctx);
            CHECK_INT_EQ(first, ref.gen[0]);
            decode_run(&r, first);
        }
        speed_free(desc);
        float *keep = r.logits;
        r.logits = NULL;
        decode_cleanup(&r);
        r.logits = keep;
        speed_kv_xfer_ctx_destroy(pctx);
    }

    /* the disaggregated run equals the colocated one: tokens, logits, hence logprobs */
    int token_diff = 0;
    double maxd = 0;
    for (int g = 0; g < N_GEN; g++) token_diff += r.gen[g] != ref.gen[g];
    for (int g = 1; r.logits && g < N_GEN; g++)
        for (int i = 0; i < V; i++)
            maxd = fmax(maxd, fabs((double)r.logits[(size_t)(g - 1) * V + i] - ref.logits[(size_t)g * V + i]));
    CHECK(r.logits != NULL);
    CHECK_INT_EQ(token_diff, 0);
    CHECK_MSG(maxd == 0.0, "decode after the transfer differs from the colocated run by %g", maxd);
    fprintf(stderr, "%s/%s: %d tokens equal to the colocated run, max |dlogit| %g\n", transport, mode, N_GEN, maxd);

    free(r.logits);
    et_seq_free(&ref);
    speed_model_destroy(r.model);
    speed_backend_destroy(r.backend);
    tu_rm_rf(tu_root);
    return CHECK_DONE();
}
