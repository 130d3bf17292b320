/* speed_engine lifecycle, sequences, accessors and KV transfer. The step is in forward.c. */
#include <math.h>
#include <string.h>

#include "alloc.h"
#include "clock.h"
#include "engine_internal.h"
#include "log.h"

speed_engine_params_t speed_engine_default_params(void) {
    return (speed_engine_params_t){
        .kv_dtype = SPEED_KV_DTYPE_AUTO,
        .block_tokens = 16,
        .max_seqs = 8,
        .max_step_tokens = 512,
        .prefill_chunk = 512,
        .depth = speed_depth_default(),
        .tp_size = 1,
        .prefix_cache = speed_prefix_cache_default_params(),
    };
}

/* Resolves a depth (C 0 -> L) for a model of n_layers through the one resolution (depth.h),
 * then checks A and T against the context limit, which only the engine knows. */
static speed_status_t depth_resolve(const speed_depth_t *in, int n_layers, int max_context, speed_depth_t *out) {
    char err[200];
    speed_depth_request_t req = speed_depth_request_of(*in);
    speed_depth_t d;
    if (speed_depth_resolve(&req, NULL, n_layers, &d, err, sizeof err) != SPEED_OK) {
        SPEED_ERROR(SPEED_SUBSYS_ENGINE, "%s", err);
        return SPEED_ERR_INVALID_ARGUMENT;
    }
    if (d.anchors > max_context || d.tail > max_context) {
        SPEED_ERROR(SPEED_SUBSYS_ENGINE, "anchors %d / tail %d exceed the context of %d tokens", d.anchors, d.tail,
                    max_context);
        return SPEED_ERR_INVALID_ARGUMENT;
    }
    *out = d;
    return SPEED_OK;
}

speed_kv_from_t speed_engine_seq_uncached_(const engine_seq_t *s) {
    /* a hit never covers the tail: the compact space holds the cached anchors only */
    return speed_kv_from_cached(s->n_cached, s->n_prompt, s->depth.anchors);
}

void speed_engine_seq_classes_(engine_seq_t *s) {
    s->a = s->depth.anchors < s->n_prompt ? s->depth.anchors : s->n_prompt;
    s->tail_start = s->n_prompt - s->depth.tail > s->a ? s->n_prompt - s->depth.tail : s->a;
}

speed_status_t speed_engine_depth_resolve_(const speed_engine_t *e, const speed_depth_t *in, speed_depth_t *out) {
    return depth_resolve(in ? in : &e->p.depth, e->n_layers, e->max_context, out);
}

static int model_context(const speed_model_t *m, int max_context) {
    int ctx = m->config.max_position;
    return max_context > 0 && max_context < ctx ? max_context : ctx;
}

speed_status_t speed_engine_params_fit_kv(speed_engine_params_t *p, int64_t n_seqs, int64_t n_prompt,
                                          int64_t max_new_tokens) {
    if (!p || !p->model || n_seqs < 1 || n_prompt < 1 || max_new_tokens < 1 || p->block_tokens < 1) {
        SPEED_ERROR(SPEED_SUBSYS_ENGINE, "fit kv: no model, or a count < 1");
        return SPEED_ERR_INVALID_ARGUMENT;
    }
    const speed_model_config_t *cfg = &p->model->config;
    speed_depth_t d;
    SPEED_CHECK(depth_resolve(&p->depth, cfg->n_layers, model_context(p->model, p->max_context), &d));
    int64_t n_full, n_compact, nb[SPEED_KV_POOL_COUNT];
    speed_kv_entries_for(n_prompt, d.anchors, d.tail, max_new_tokens - 1, &n_full, &n_compact);
    speed_kv_cache_blocks_for(cfg->n_layers, d.prefill_layers, p->block_tokens, d.prefill_layers, n_full, n_compact,
                              nb);
    p->n_blocks_lower = nb[0] * n_seqs;
    p->n_blocks_upper = nb[1] * n_seqs;
    return SPEED_OK;
}

/* ---- create / destroy --------------------------------------------------------------------- */

static speed_status_t map_tensor(engine_rank_t *rk, const speed_tensor_t *t, int64_t rows, int64_t cols,
                                 speed_mat_t *m) {
    for (int i = 0; i < rk->n_mapped; i++) { /* a tied lm_head is the embedding: map it once */
        if (rk->mapped[i] == t->data) {
            *m = speed_mat((void *)rk->mapped_dev[i], t->dtype, rows, cols);
            return SPEED_OK;
        }
    }
    const void *dev;
    SPEED_CHECK(speed_backend_map_weights(rk->be, t->data, t->n_bytes, &dev));
    rk->mapped[rk->n_mapped] = t->data;
    rk->mapped_dev[rk->n_mapped] = dev;
    rk->n_mapped++;
    *m = speed_mat((void *)dev, t->dtype, rows, cols);
    return SPEED_OK;
}

/* Zero-copy shards of a row-major [rows][cols] weight: rows [r0, r0 + n) (column-parallel
 * projections) or columns [c0, c0 + n) (row-parallel ones; the row stride stays the width). */
static speed_mat_t shard_rows(speed_mat_t m, int64_t r0, int64_t n) {
    m.data = (char *)m.data + (size_t)(r0 * m.row_stride) * speed_dtype_size(m.dtype);
    m.n_rows = n;
    return m;
}

static speed_mat_t shard_cols(speed_mat_t m, int64_t c0, int64_t n) {
    m.data = (char *)m.data + (size_t)c0 * speed_dtype_size(m.dtype);
    m.n_cols = n;
    return m;
}

static speed_status_t check_op(engine_rank_t *rk, speed_op_t op, speed_dtype_t dtype, const char *what) {
    if (speed_backend_supports_op(rk->be, op, dtype)) return SPEED_OK;
    SPEED_ERROR(SPEED_SUBSYS_ENGINE, "backend %s cannot run %s with %s", speed_backend_name(rk->be), what,
                speed_dtype_name(dtype));
    return SPEED_ERR_UNSUPPORTED;
}

static speed_status_t map_weights(engine_rank_t *rk) {
    speed_engine_t *e = rk->e;
    const speed_model_t *m = e->model;
    int n_max = 3 + 9 * e->n_layers;
    rk->mapped = speed_calloc((size_t)n_max, sizeof *rk->mapped);
    rk->mapped_dev = speed_calloc((size_t)n_max, sizeof *rk->mapped_dev);
    rk->layers = speed_calloc((size_t)e->n_layers, sizeof *rk->layers);
    if (!rk->mapped || !rk->mapped_dev || !rk->layers) {
        SPEED_ERROR(SPEED_SUBSYS_ENGINE, "engine: out of memory");
        return SPEED_ERR_NO_MEMORY;
    }
    const int hd = e->head_dim, qd = e->n_heads * hd, kvd = e->n_kv_heads * hd;
    const int q0 = rk->kv_head0 * (e->n_heads / e->n_kv_heads) * hd, nq = rk->n_heads * hd;
    const int k0 = rk->kv_head0 * hd, nk = rk->n_kv_heads * hd;
    const int f0 = (int)((int64_t)e->ffn * rk->rank / e->n_ranks), nf = rk->ffn;
    SPEED_CHECK(map_tensor(rk, m->tok_embeddings, e->vocab, e->hidden, &rk->tok_embeddings));
    SPEED_CHECK(map_tensor(rk, m->norm, 1, e->hidden, &rk->norm));
    SPEED_CHECK(map_tensor(rk, m->lm_head, e->vocab, e->hidden, &rk->lm_head));
    SPEED_CHECK(check_op(rk, SPEED_OP_EMBED, rk->tok_embeddings.dtype, "embed"));
    SPEED_CHECK(check_op(rk, SPEED_OP_RMSNORM, rk->norm.dtype, "rmsnorm"));
    SPEED_CHECK(check_op(rk, SPEED_OP_MATMUL, rk->lm_head.dtype, "matmul"));
    rk->vocab0 = (int)((int64_t)e->vocab * rk->rank / e->n_ranks);
    if (e->n_ranks > 1) /* the output head by vocabulary rows */
        rk->lm_head = shard_rows(rk->lm_head, rk->vocab0, (int64_t)e->vocab * (rk->rank + 1) / e->n_ranks - rk->vocab0);
    for (int l = 0; l < e->n_layers; l++) {
        const speed_layer_weights_t *w = &m->layers[l];
        engine_layer_t *L = &rk->layers[l];
        SPEED_CHECK(map_tensor(rk, w->attn_norm, 1, e->hidden, &L->attn_norm));
        SPEED_CHECK(map_tensor(rk, w->wq, qd, e->hidden, &L->wq));
        SPEED_CHECK(map_tensor(rk, w->wk, kvd, e->hidden, &L->wk));
        SPEED_CHECK(map_tensor(rk, w->wv, kvd, e->hidden, &L->wv));
        SPEED_CHECK(map_tensor(rk, w->wo, e->hidden, qd, &L->wo));
        SPEED_CHECK(map_tensor(rk, w->ffn_norm, 1, e->hidden, &L->ffn_norm));
        SPEED_CHECK(map_tensor(rk, w->w_gate, e->ffn, e->hidden, &L->w_gate));
        SPEED_CHECK(map_tensor(rk, w->w_up, e->ffn, e->hidden, &L->w_up));
        SPEED_CHECK(map_tensor(rk, w->w_down, e->hidden, e->ffn, &L->w_down));
        if (e->n_ranks > 1) {
            L->wq = shard_rows(L->wq, q0, nq);
            L->wk = shard_rows(L->wk, k0, nk);
            L->wv = shard_rows(L->wv, k0, nk);
            L->wo = shard_cols(L->wo, q0, nq);
            L->w_gate = shard_rows(L->w_gate, f0, nf);
            L->w_up = shard_rows(L->w_up, f0, nf);
            L->w_down = shard_cols(L->w_down, f0, nf);
        }
        const speed_mat_t *mats[] = {&L->wq, &L->wk, &L->wv, &L->wo, &L->w_gate, &L->w_up, &L->w_down};
        for (size_t i = 0; i < sizeof mats / sizeof mats[0]; i++)
            SPEED_CHECK(check_op(rk, SPEED_OP_MATMUL, mats[i]->dtype, "matmul"));
        SPEED_CHECK(check_op(rk, SPEED_OP_RMSNORM, L->attn_norm.dtype, "rmsnorm"));
        SPEED_CHECK(check_op(rk, SPEED_OP_RMSNORM, L->ffn_norm.dtype, "rmsnorm"));
    }
    const speed_op_t f32_ops[] = {SPEED_OP_ROPE, SPEED_OP_SWIGLU, SPEED_OP_GET_ROWS, SPEED_OP_ADD};
    for (size_t i = 0; i < sizeof f32_ops / sizeof f32_ops[0]; i++)
        SPEED_CHECK(check_op(rk, f32_ops[i], SPEED_DTYPE_F32, "f32 activation ops"));
    SPEED_CHECK(check_op(rk, SPEED_OP_KV_STORE, e->p.kv_dtype, "kv_store"));
    SPEED_CHECK(check_op(rk, SPEED_OP_ATTENTION, e->p.kv_dtype, "attention"));
    if (e->p.output_topk > 0 && rk->rank == 0) SPEED_CHECK(check_op(rk, SPEED_OP_TOPK, SPEED_DTYPE_F32, "topk"));
    return SPEED_OK;
}

static size_t align64(size_t n) { return (n + 63) & ~(size_t)63; }

#define HOST_ALLOC(ptr, n, total)                         \
    do {                                                  \
        (ptr) = speed_calloc((size_t)(n), sizeof *(ptr)); \
        if (!(ptr)) goto oom;                             \
        (total) += (size_t)(n) * sizeof *(ptr);           \
    } while (0)

static speed_status_t alloc_rank_scratch(engine_rank_t *rk) {
    speed_engine_t *e = rk->e;
    size_t R = (size_t)e->p.max_step_tokens;
    size_t qd = (size_t)rk->n_heads * e->head_dim, kvd = (size_t)rk->n_kv_heads * e->head_dim;
    size_t part = e->n_ranks > 1 ? R * e->hidden : 0;
    size_t logits = rk->rank == 0 ? (size_t)e->max_out * e->vocab : 0;
    size_t topk = rk->rank == 0 ? (size_t)e->max_out * e->p.output_topk : 0, lse = topk ? (size_t)e->max_out : 0;
    /* the top-k ids are int32: float-sized */
    size_t sizes[] = {R * e->hidden, R * e->hidden, R * e->hidden, R * qd, R * kvd, R * kvd, R * qd,
                      R * rk->ffn,   R * rk->ffn,   part,          logits, topk,    topk,    lse};
    float **ptrs[] = {&rk->x,
                      &rk->x2,
                      &rk->h,
                      &rk->q,
                      &rk->k,
                      &rk->v,
                      &rk->att,
                      &rk->gate,
                      &rk->up,
                      &rk->part,
                      &rk->logits_dev,
                      &rk->topk_vals_dev,
                      (float **)&rk->topk_ids_dev,
                      &rk->lse_dev};
    size_t total = 0;
    for (size_t i = 0; i < sizeof sizes / sizeof sizes[0]; i++) total += align64(sizes[i] * sizeof(float));
    SPEED_CHECK(speed_backend_alloc(rk->be, total, &rk->scratch));
    rk->scratch_bytes = total;
    char *p = rk->scratch;
    for (size_t i = 0; i < sizeof sizes / sizeof sizes[0]; i++) {
        *ptrs[i] = sizes[i] ? (float *)p : NULL;
        p += align64(sizes[i] * sizeof(float));
    }
    int Ri = e->p.max_step_tokens;
    size_t host = 0;
    HOST_ALLOC(rk->act, Ri, host);
    HOST_ALLOC(rk->gather, Ri, host);
    HOST_ALLOC(rk->act_pos, Ri, host);
    HOST_ALLOC(rk->slots, Ri, host);
    HOST_ALLOC(rk->n_visible, Ri, host);
    HOST_ALLOC(rk->tables, Ri, host);
    HOST_ALLOC(rk->out_rows, e->max_out, host);
    rk->host_scratch_bytes = host;
    return SPEED_OK;
oom:
    SPEED_ERROR(SPEED_SUBSYS_ENGINE, "engine: out of memory for host scratch");
    return SPEED_ERR_NO_MEMORY;
}

static speed_status_t alloc_scratch(speed_engine_t *e) {
    int Ri = e->p.max_step_tokens;
    size_t host = 0;
    if (e->p.output_topk > 0) { /* only the top k come to the host */
        HOST_ALLOC(e->topk_vals, (size_t)e->max_out * e->p.output_topk, host);
        HOST_ALLOC(e->topk_ids, (size_t)e->max_out * e->p.output_topk, host);
        HOST_ALLOC(e->lse, e->max_out, host);
    } else {
        HOST_ALLOC(e->logits, (size_t)e->max_out * e->vocab, host);
    }
    HOST_ALLOC(e->tok, Ri, host);
    HOST_ALLOC(e->pos, Ri, host);
    HOST_ALLOC(e->row_item, Ri, host);
    HOST_ALLOC(e->entry_full, Ri, host);
    HOST_ALLOC(e->entry_compact, Ri, host);
    HOST_ALLOC(e->items, e->p.max_seqs, host);
    HOST_ALLOC(e->outputs, e->max_out, host);
    HOST_ALLOC(e->seqs, e->p.max_seqs, host);
    HOST_ALLOC(e->order, e->p.max_seqs, host);
    e->host_scratch_bytes = host;
    return SPEED_OK;
oom:
    SPEED_ERROR(SPEED_SUBSYS_ENGINE, "engine: out of memory for host scratch");
    return SPEED_ERR_NO_MEMORY;
}
#undef HOST_ALLOC

static void rank_free(engine_rank_t *rk) {
    speed_backend_free(rk->be, rk->scratch);
    for (int i = rk->n_mapped - 1; i >= 0; i--) speed_backend_unmap_weights(rk->be, rk->mapped_dev[i]);
    speed_free(rk->mapped);
    speed_free(rk->mapped_dev);
    speed_free(rk->layers);
    speed_free(rk->act);
    speed_free(rk->gather);
    speed_free(rk->act_pos);
    speed_free(rk->slots);
    speed_free(rk->n_visible);
    speed_free((void *)rk->tables);
    speed_free(rk->out_rows);
}

/* Ranks >= 1: wait for a step, run it, report. */
static void *rank_main(void *arg) {
    engine_rank_t *rk = arg;
    speed_engine_t *e = rk->e;
    uint64_t seen = 0;
    for (;;) {
        pthread_mutex_lock(&e->tp_lock);
        while (e->tp_gen == seen && !e->tp_stop) pthread_cond_wait(&e->tp_start, &e->tp_lock);
        if (e->tp_stop) {
            pthread_mutex_unlock(&e->tp_lock);
            return NULL;
        }
        seen = e->tp_gen;
        int n_items = e->tp_n_items, n_rows = e->tp_n_rows;
        pthread_mutex_unlock(&e->tp_lock);
        rk->st = speed_engine_rank_forward_(rk, n_items, n_rows);
        if (rk->st != SPEED_OK) speed_comm_abort(rk->comm); /* no rank may wait for us */
        pthread_mutex_lock(&e->tp_lock);
        e->tp_done++;
        pthread_cond_signal(&e->tp_finished);
        pthread_mutex_unlock(&e->tp_lock);
    }
}

/* Ranks, their shares, weights, scratch, the communicator and the rank threads. */
static speed_status_t create_ranks(speed_engine_t *e) {
    const int t = e->n_ranks;
    e->ranks = speed_calloc((size_t)t, sizeof *e->ranks);
    if (!e->ranks) return SPEED_ERR_NO_MEMORY;
    if (t > 1) {
        SPEED_CHECK(speed_comm_group_cpu_create(t, &e->comm_group));
        pthread_mutex_init(&e->tp_lock, NULL);
        pthread_cond_init(&e->tp_start, NULL);
        pthread_cond_init(&e->tp_finished, NULL);
        e->tp_sync_init = true;
    }
    for (int r = 0; r < t; r++) {
        engine_rank_t *rk = &e->ranks[r];
        rk->e = e;
        rk->rank = r;
        rk->be = t > 1 ? e->p.tp_backends[r] : e->p.backend;
        rk->comm = t > 1 ? speed_comm_group_rank(e->comm_group, r) : NULL;
        rk->n_kv_heads = e->n_kv_heads / t;
        rk->kv_head0 = r * rk->n_kv_heads;
        rk->n_heads = e->n_heads / t;
        rk->ffn = (int)((int64_t)e->ffn * (r + 1) / t - (int64_t)e->ffn * r / t);
        SPEED_CHECK(map_weights(rk));
        SPEED_CHECK(alloc_rank_scratch(rk));
    }
    for (int r = 1; r < t; r++) {
        if (pthread_create(&e->ranks[r].thread, NULL, rank_main, &e->ranks[r]) != 0) {
            SPEED_ERROR(SPEED_SUBSYS_ENGINE, "engine: cannot start the thread of tensor-parallel rank %d", r);
            return SPEED_ERR_NO_MEMORY;
        }
        e->ranks[r].thread_started = true;
    }
    return SPEED_OK;
}

/* Backend scratch and per-rank host scratch of every rank. */
static size_t engine_scratch_bytes(const speed_engine_t *e) {
    size_t n = 0;
    for (int r = 0; r < e->n_ranks; r++) n += e->ranks[r].scratch_bytes + e->ranks[r].host_scratch_bytes;
    return n;
}

static speed_status_t check_params(const speed_engine_params_t *p) {
    const char *bad = NULL;
    if (!p->backend && !(p->tp_size > 1 && p->tp_backends))
        bad = "no backend";
    else if (!p->model)
        bad = "no model";
    else if (p->kv_dtype != SPEED_KV_DTYPE_AUTO && speed_dtype_size(p->kv_dtype) == 0)
        bad = "kv_dtype is not f32, bf16, f16 or auto";
    else if (p->block_tokens < 1 || p->block_tokens > 4096)
        bad = "block_tokens is out of range [1, 4096]";
    else if (p->n_blocks_lower < 0 || p->n_blocks_upper < 0)
        bad = "negative n_blocks";
    else if (p->max_seqs < 1 || p->max_seqs > 65536)
        bad = "max_seqs is out of range [1, 65536]";
    else if (p->max_step_tokens < 1 || p->max_step_tokens > 1 << 20)
        bad = "max_step_tokens is out of range [1, 2^20]";
    else if (p->prefill_chunk < 1)
        bad = "prefill_chunk is < 1";
    else if (p->max_context < 0)
        bad = "max_context is negative";
    else if (p->tp_size < 1 || p->tp_size > SPEED_ENGINE_TP_MAX)
        bad = "tp_size is out of range [1, 64]";
    else if (p->model->config.n_kv_heads % p->tp_size || p->model->config.n_heads % p->tp_size)
        bad = "tp_size does not divide the model's query and kv heads";
    else if (p->model->config.ffn < p->tp_size)
        bad = "tp_size is above the model's FFN width";
    else if (p->tp_size > 1 && !p->tp_backends)
        bad = "tp_size > 1 without tp_backends";
    else if (p->output_topk < 0 || p->output_topk > SPEED_TOPK_MAX || p->output_topk > p->model->config.vocab_size)
        bad = "output_topk is out of range [0, min(vocab, 256)]";
    for (int r = 0; !bad && p->tp_size > 1 && r < p->tp_size; r++) {
        const speed_backend_t *be = p->tp_backends[r];
        if (!be)
            bad = "a tp_backends entry is NULL";
        else if (be->kind != SPEED_BACKEND_CPU && be->kind != SPEED_BACKEND_CPU_REF)
            bad = "tensor parallelism inside one process needs CPU backends (ranks share the KV cache in host "
                  "memory); GPU ranks are one process each (NCCL)";
        for (int q = 0; !bad && q < r; q++)
            if (p->tp_backends[q] == be) bad = "two tensor-parallel ranks share one backend";
    }
    if (bad) {
        SPEED_ERROR(SPEED_SUBSYS_ENGINE, "engine: %s", bad);
        return SPEED_ERR_INVALID_ARGUMENT;
    }
    return SPEED_OK;
}

speed_status_t speed_engine_create(const speed_engine_params_t *params, speed_engine_t **engine_p) {
    if (!params || !engine_p) {
        SPEED_ERROR(SPEED_SUBSYS_ENGINE, "engine: no params or output pointer");
        return SPEED_ERR_INVALID_ARGUMENT;
    }
    SPEED_CHECK(check_params(params));
    const speed_model_config_t *cfg = &params->model->config;
    int max_context = model_context(params->model, params->max_context);
    speed_depth_t depth;
    SPEED_CHECK(depth_resolve(&params->depth, cfg->n_layers, max_context, &depth));

    speed_engine_t *e = speed_calloc(1, sizeof *e);
    if (!e) {
        SPEED_ERROR(SPEED_SUBSYS_ENGINE, "engine: out of memory");
        return SPEED_ERR_NO_MEMORY;
    }
    speed_status_t st;
    e->p = *params;
    e->p.kv_dtype = speed_model_kv_dtype_resolve(params->model, params->kv_dtype);
    e->p.depth = depth;
    e->p.max_context = max_context;
    if (e->p.prefill_chunk > e->p.max_step_tokens) e->p.prefill_chunk = e->p.max_step_tokens;
    e->model = params->model;
    e->n_ranks = params->tp_size;
    e->be = e->n_ranks > 1 ? params->tp_backends[0] : params->backend;
    e->p.backend = e->be;
    e->n_layers = cfg->n_layers;
    e->hidden = cfg->hidden;
    e->n_heads = cfg->n_heads;
    e->n_kv_heads = cfg->n_kv_heads;
    e->head_dim = cfg->head_dim;
    e->ffn = cfg->ffn;
    e->vocab = cfg->vocab_size;
    e->max_context = max_context;
    e->eps = cfg->rms_norm_eps;
    e->attn_scale = 1.0f / sqrtf((float)cfg->head_dim);
    e->rope = (speed_rope_t){
        .theta = cfg->rope_theta,
        .llama3_scaling = cfg->rope_scaling.type == SPEED_ROPE_SCALING_LLAMA3,
        .factor = cfg->rope_scaling.factor,
        .low_freq_factor = cfg->rope_scaling.low_freq_factor,
        .high_freq_factor = cfg->rope_scaling.high_freq_factor,
        .original_max_position = cfg->rope_scaling.original_max_position,
    };
    e->max_out = e->p.max_seqs < e->p.max_step_tokens ? e->p.max_seqs : e->p.max_step_tokens;
    e->next_id = 1;

    if (e->p.n_blocks_lower == 0 && e->p.n_blocks_upper == 0) {
        int64_t per_seq = (max_context + e->p.block_tokens - 1) / e->p.block_tokens;
        e->p.n_blocks_lower = e->p.n_blocks_upper = per_seq * e->p.max_seqs;
    }
    SPEED_CHECK_GOTO(alloc_scratch(e), st, fail);
    SPEED_CHECK_GOTO(create_ranks(e), st, fail);

    speed_kv_cache_params_t kp = speed_kv_cache_default_params();
    kp.backend = e->be;
    kp.n_layers = e->n_layers;
    kp.split_layer = depth.prefill_layers;
    kp.n_kv_heads = e->n_kv_heads;
    kp.head_dim = e->head_dim;
    kp.dtype = e->p.kv_dtype;
    kp.block_tokens = e->p.block_tokens;
    kp.n_blocks[SPEED_KV_POOL_LOWER] = e->p.n_blocks_lower;
    kp.n_blocks[SPEED_KV_POOL_UPPER] = e->p.n_blocks_upper;
    kp.host_mirror = e->p.kv_host_mirror;
    SPEED_CHECK_GOTO(speed_kv_cache_create(&kp, &e->kv), st, fail);
    if (e->p.prefix_cache.max_blocks != 0)
        SPEED_CHECK_GOTO(speed_prefix_cache_create(&e->p.prefix_cache, e->kv, &e->prefix), st, fail);
    SPEED_DEBUG(SPEED_SUBSYS_ENGINE,
                "engine: %s x %d rank(s), depth C=%d A=%d T=%d, %d sequences, %d rows/step, chunk %d, scratch %zu + "
                "%zu host bytes",
                speed_backend_name(e->be), e->n_ranks, depth.prefill_layers, depth.anchors, depth.tail, e->p.max_seqs,
                e->p.max_step_tokens, e->p.prefill_chunk, engine_scratch_bytes(e), e->host_scratch_bytes);
    *engine_p = e;
    return SPEED_OK;
fail:
    speed_engine_destroy(e);
    return st;
}

void speed_engine_destroy(speed_engine_t *e) {
    if (!e) return;
    if (e->tp_sync_init) {
        pthread_mutex_lock(&e->tp_lock);
        e->tp_stop = true;
        pthread_cond_broadcast(&e->tp_start);
        pthread_mutex_unlock(&e->tp_lock);
    }
    for (int r = 1; e->ranks && r < e->n_ranks; r++)
        if (e->ranks[r].thread_started) pthread_join(e->ranks[r].thread, NULL);
    if (e->seqs) {
        for (int i = 0; i < e->p.max_seqs; i++) {
            if (!e->seqs[i].used) continue;
            speed_kv_cache_seq_destroy(e->kv, e->seqs[i].kv);
            speed_free(e->seqs[i].prompt);
        }
    }
    speed_prefix_cache_destroy(e->prefix);
    speed_kv_cache_destroy(e->kv);
    for (int r = 0; e->ranks && r < e->n_ranks; r++) rank_free(&e->ranks[r]);
    speed_free(e->ranks);
    speed_comm_group_destroy(e->comm_group);
    if (e->tp_sync_init) {
        pthread_mutex_destroy(&e->tp_lock);
        pthread_cond_destroy(&e->tp_start);
        pthread_cond_destroy(&e->tp_finished);
    }
    speed_free(e->logits);
    speed_free(e->topk_vals);
    speed_free(e->topk_ids);
    speed_free(e->lse);
    speed_free(e->tok);
    speed_free(e->pos);
    speed_free(e->row_item);
    speed_free(e->entry_full);
    speed_free(e->entry_compact);
    speed_free(e->items);
    speed_free(e->outputs);
    speed_free(e->seqs);
    speed_free(e->order);
    speed_free(e);
}

speed_depth_t speed_engine_depth(const speed_engine_t *e) { return e->p.depth; }

speed_dtype_t speed_engine_kv_dtype(const speed_engine_t *e) { return e->p.kv_dtype; }
int speed_engine_max_context(const speed_engine_t *e) { return e->max_context; }
int speed_engine_n_vocab(const speed_engine_t *e) { return e->vocab; }

/* ---- sequences ------------------------------------------------------------------------------- */

engine_seq_t *speed_engine_find_(const speed_engine_t *e, speed_seq_id_t id) {
    for (int i = 0; i < e->n_seqs; i++) {
        engine_seq_t *s = &e->seqs[e->order[i]];
        if (s->id == id) return s;
    }
    return NULL;
}

static engine_seq_t *find_logged(const speed_engine_t *e, speed_seq_id_t id) {
    engine_seq_t *s = speed_engine_find_(e, id);
    if (!s) SPEED_ERROR(SPEED_SUBSYS_ENGINE, "engine: no sequence %lld", (long long)id);
    return s;
}

/* Common part of seq_add and seq_reserve: checks, KV reservation, slot. */
static speed_status_t seq_new(speed_engine_t *e, const int32_t *ids, int64_t n_prompt, const speed_depth_t *depth_in,
                              int64_t max_new_tokens, engine_seq_t **seq_p) {
    if (n_prompt < 1) {
        SPEED_ERROR(SPEED_SUBSYS_ENGINE, "engine: empty prompt (%lld tokens)", (long long)n_prompt);
        return SPEED_ERR_INVALID_ARGUMENT;
    }
    if (max_new_tokens < 1) {
        SPEED_ERROR(SPEED_SUBSYS_ENGINE, "engine: max_new_tokens %lld must be at least 1", (long long)max_new_tokens);
        return SPEED_ERR_INVALID_ARGUMENT;
    }
    speed_depth_t depth;
    SPEED_CHECK(depth_resolve(depth_in ? depth_in : &e->p.depth, e->n_layers, e->max_context, &depth));
    if (n_prompt > e->max_context || max_new_tokens > e->max_context - n_prompt) {
        SPEED_ERROR(SPEED_SUBSYS_ENGINE,
                    "engine: prompt of %lld tokens + max_new_tokens %lld exceeds the context limit of %d tokens",
                    (long long)n_prompt, (long long)max_new_tokens, e->max_context);
        return SPEED_ERR_TOO_LONG;
    }
    if (e->n_seqs >= e->p.max_seqs) {
        SPEED_DEBUG(SPEED_SUBSYS_ENGINE, "engine: %d sequences already (max_seqs)", e->n_seqs);
        return SPEED_ERR_CAPACITY;
    }
    int slot = 0;
    while (e->seqs[slot].used) slot++;
    engine_seq_t *s = &e->seqs[slot];
    memset(s, 0, sizeof *s);
    s->depth = depth;
    s->n_prompt = n_prompt;
    s->max_new = max_new_tokens;
    speed_engine_seq_classes_(s);
    s->t_add_ns = speed_clock_mono_ns();
    int64_t n_full, n_compact;
    speed_kv_entries_for(n_prompt, depth.anchors, depth.tail, max_new_tokens - 1, &n_full, &n_compact);
    /* a prefix cache hit fills the first positions and moves n_prefilled past them */
    speed_status_t st = speed_engine_kv_reserve_(e, s, ids, n_full, n_compact);
    if (st != SPEED_OK) {
        if (st == SPEED_ERR_CAPACITY)
            SPEED_DEBUG(SPEED_SUBSYS_ENGINE, "engine: no KV room for %lld + %lld tokens", (long long)n_prompt,
                        (long long)max_new_tokens);
        memset(s, 0, sizeof *s);
        return st;
    }
    *seq_p = s;
    return SPEED_OK;
}

static void seq_commit(speed_engine_t *e, engine_seq_t *s, speed_seq_id_t *seq_p) {
    s->used = true;
    s->id = e->next_id++;
    e->order[e->n_seqs++] = (int)(s - e->seqs);
    *seq_p = s->id;
}

/* seq_add, or (await_kv) seq_reserve_cached / seq_reserve_keep (no lookup): a sequence with its
 * prompt ids, cached when removed. */
static speed_status_t seq_add_ids(speed_engine_t *e, const int32_t *ids, int64_t n_prompt, const speed_depth_t *depth,
                                  int64_t max_new_tokens, bool await_kv, bool lookup, speed_seq_id_t *seq_p) {
    if (!e || !seq_p || (!ids && n_prompt > 0)) {
        SPEED_ERROR(SPEED_SUBSYS_ENGINE, "engine: %s without engine, ids or output pointer",
                    await_kv ? "seq_reserve_cached" : "seq_add");
        return SPEED_ERR_INVALID_ARGUMENT;
    }
    for (int64_t i = 0; i < n_prompt; i++) {
        if (ids[i] < 0 || ids[i] >= e->vocab) {
            SPEED_ERROR(SPEED_SUBSYS_ENGINE, "engine: prompt token %lld is id %d, outside the vocabulary [0, %d)",
                        (long long)i, ids[i], e->vocab);
            return SPEED_ERR_INVALID_ARGUMENT;
        }
    }
    engine_seq_t *s;
    SPEED_CHECK(seq_new(e, lookup ? ids : NULL, n_prompt, depth, max_new_tokens, &s));
    /* room for the generated tokens fed back too: a finished sequence's prefix cache key */
    s->prompt = speed_malloc((size_t)(n_prompt + max_new_tokens - 1) * sizeof(int32_t));
    if (!s->prompt) {
        speed_kv_cache_seq_destroy(e->kv, s->kv);
        s->kv = NULL;
        SPEED_ERROR(SPEED_SUBSYS_ENGINE, "engine: out of memory for a prompt of %lld tokens", (long long)n_prompt);
        return SPEED_ERR_NO_MEMORY;
    }
    memcpy(s->prompt, ids, (size_t)n_prompt * sizeof(int32_t));
    s->state = await_kv ? SPEED_SEQ_AWAIT_KV : SPEED_SEQ_PREFILL;
    seq_commit(e, s, seq_p);
    return SPEED_OK;
}

speed_status_t speed_engine_seq_add(speed_engine_t *e, const int32_t *ids, int64_t n_prompt, const speed_depth_t *depth,
                                    int64_t max_new_tokens, speed_seq_id_t *seq_p) {
    return seq_add_ids(e, ids, n_prompt, depth, max_new_tokens, false, true, seq_p);
}

speed_status_t speed_engine_seq_reserve_cached(speed_engine_t *e, const int32_t *ids, int64_t n_prompt,
                                               const speed_depth_t *depth, int64_t max_new_tokens,
                                               speed_seq_id_t *seq_p) {
    return seq_add_ids(e, ids, n_prompt, depth, max_new_tokens, true, true, seq_p);
}

speed_status_t speed_engine_seq_reserve_keep(speed_engine_t *e, const int32_t *ids, int64_t n_prompt,
                                             const speed_depth_t *depth, int64_t max_new_tokens,
                                             speed_seq_id_t *seq_p) {
    return seq_add_ids(e, ids, n_prompt, depth, max_new_tokens, true, false, seq_p);
}

speed_status_t speed_engine_seq_reserve(speed_engine_t *e, int64_t n_prompt, const speed_depth_t *depth,
                                        int64_t max_new_tokens, speed_seq_id_t *seq_p) {
    if (!e || !seq_p) {
        SPEED_ERROR(SPEED_SUBSYS_ENGINE, "engine: seq_reserve without engine or output pointer");
        return SPEED_ERR_INVALID_ARGUMENT;
    }
    engine_seq_t *s;
    SPEED_CHECK(seq_new(e, NULL, n_prompt, depth, max_new_tokens, &s));
    s->state = SPEED_SEQ_AWAIT_KV;
    seq_commit(e, s, seq_p);
    return SPEED_OK;
}

speed_status_t speed_engine_seq_append(speed_engine_t *e, speed_seq_id_t id, int32_t token) {
    engine_seq_t *s = find_logged(e, id);
    if (!s) return SPEED_ERR_NOT_FOUND;
    if (token < 0 || token >= e->vocab) {
        SPEED_ERROR(SPEED_SUBSYS_ENGINE, "engine: sequence %lld: token id %d is outside the vocabulary [0, %d)",
                    (long long)id, token, e->vocab);
        return SPEED_ERR_INVALID_ARGUMENT;
    }
    if (s->state != SPEED_SEQ_AWAIT_TOKEN) {
        static const char *const why[] = {"is still prefilling", "awaits its KV", "", "already has a token queued"};
        SPEED_ERROR(SPEED_SUBSYS_ENGINE, "engine: sequence %lld %s: cannot append a token", (long long)id,
                    why[s->state]);
        return SPEED_ERR_INVALID_ARGUMENT;
    }
    /* Output k (1-based) follows n_generated = k - 1 fed tokens; feeding token max_new would
     * ask for output max_new + 1. */
    if (s->n_generated + 1 >= s->max_new) {
        SPEED_ERROR(SPEED_SUBSYS_ENGINE, "engine: sequence %lld produced its max_new_tokens (%lld)", (long long)id,
                    (long long)s->max_new);
        return SPEED_ERR_TOO_LONG;
    }
    s->pending = token;
    if (s->prompt) s->prompt[s->n_prompt + s->n_generated] = token; /* its position once processed */
    s->state = SPEED_SEQ_DECODE;
    return SPEED_OK;
}

speed_status_t speed_engine_seq_remove(speed_engine_t *e, speed_seq_id_t id) {
    engine_seq_t *s = find_logged(e, id);
    if (!s) return SPEED_ERR_NOT_FOUND;
    int slot = (int)(s - e->seqs);
    speed_engine_kv_release_(e, s); /* to the prefix cache, or freed */
    speed_free(s->prompt);
    memset(s, 0, sizeof *s);
    int j = 0;
    for (int i = 0; i < e->n_seqs; i++)
        if (e->order[i] != slot) e->order[j++] = e->order[i];
    e->n_seqs = j;
    return SPEED_OK;
}

bool speed_engine_has_work(const speed_engine_t *e) {
    for (int i = 0; i < e->n_seqs; i++) {
        speed_seq_state_t st = e->seqs[e->order[i]].state;
        if (st == SPEED_SEQ_PREFILL || st == SPEED_SEQ_DECODE) return true;
    }
    return false;
}

speed_status_t speed_engine_seq_stats(const speed_engine_t *e, speed_seq_id_t id, speed_engine_seq_stats_t *st) {
    const engine_seq_t *s = find_logged(e, id);
    if (!s) return SPEED_ERR_NOT_FOUND;
    memset(st, 0, sizeof *st);
    st->state = s->state;
    st->depth = s->depth;
    st->n_prompt = s->n_prompt;
    st->n_prefilled = s->n_prefilled;
    st->n_generated = s->n_generated;
    st->max_new_tokens = s->max_new;
    st->n_cached = s->n_cached;
    st->n_shared_blocks = s->n_shared_blocks;
    speed_kv_usage_t u;
    speed_kv_cache_seq_usage(e->kv, s->kv, &u);
    st->kv_bytes_used = u.bytes_used[0] + u.bytes_used[1];
    st->kv_bytes_reserved = u.bytes_reserved[0] + u.bytes_reserved[1];
    st->kv_bytes_full_depth =
        (size_t)speed_kv_seq_entries(s->kv, 0) * (size_t)e->n_layers * speed_kv_cache_token_bytes(e->kv);
    st->prefill_ns = s->prefill_ns;
    st->first_output_ns = s->first_output_ns;
    st->decode_ns = s->decode_ns;
    return SPEED_OK;
}

void speed_engine_stats(const speed_engine_t *e, speed_engine_stats_t *st) {
    memset(st, 0, sizeof *st);
    st->n_steps = e->n_steps;
    st->n_prefill_tokens = e->n_prefill_tokens;
    st->n_decode_tokens = e->n_decode_tokens;
    st->step_ns = e->step_ns;
    st->n_seqs = e->n_seqs;
    speed_kv_cache_stats(e->kv, &st->kv);
    for (int i = 0; i < e->n_seqs; i++) {
        const engine_seq_t *s = &e->seqs[e->order[i]];
        if (!s->kv) continue;
        speed_kv_usage_t u;
        speed_kv_cache_seq_usage(e->kv, s->kv, &u);
        for (int p = 0; p < SPEED_KV_POOL_COUNT; p++) {
            st->live.n_blocks[p] += u.n_blocks[p];
            st->live.bytes_reserved[p] += u.bytes_reserved[p];
            st->live.bytes_used[p] += u.bytes_used[p];
        }
    }
    st->scratch_bytes = engine_scratch_bytes(e) + e->host_scratch_bytes;
    st->weight_bytes = speed_model_n_bytes(e->model);
    st->n_cached_tokens = e->n_cached_tokens;
    if (e->prefix) speed_prefix_cache_stats(e->prefix, &st->prefix);
}

/* ---- KV transfer ----------------------------------------------------------------------------- */

speed_status_t speed_engine_seq_kv_size(const speed_engine_t *e, speed_seq_id_t id, size_t *bytes_p) {
    const engine_seq_t *s = find_logged(e, id);
    if (!s) return SPEED_ERR_NOT_FOUND;
    int64_t n_full, n_compact;
    if (s->state == SPEED_SEQ_AWAIT_KV) { /* what import expects: the entries not cached */
        speed_kv_entries_for(s->n_prompt, s->depth.anchors, s->depth.tail, 0, &n_full, &n_compact);
        *bytes_p = speed_kv_cache_seq_wire_bytes_from(e->kv, s->kv, speed_engine_seq_uncached_(s), n_full, n_compact);
        return SPEED_OK;
    }
    n_full = speed_kv_seq_entries(s->kv, 0);
    n_compact = speed_kv_seq_entries(s->kv, e->n_layers - 1); /* = n_full when C = L: unused */
    *bytes_p = speed_kv_cache_seq_wire_bytes(e->kv, s->kv, n_full, n_compact);
    return SPEED_OK;
}

speed_status_t speed_engine_seq_kv_export(speed_engine_t *e, speed_seq_id_t id, void *buf, size_t size) {
    engine_seq_t *s = find_logged(e, id);
    if (!s) return SPEED_ERR_NOT_FOUND;
    if (s->state != SPEED_SEQ_AWAIT_TOKEN && s->state != SPEED_SEQ_DECODE) {
        SPEED_ERROR(SPEED_SUBSYS_ENGINE, "engine: sequence %lld has not finished its prefill: nothing to export",
                    (long long)id);
        return SPEED_ERR_INVALID_ARGUMENT;
    }
    return speed_kv_cache_seq_export(e->kv, s->kv, buf, size);
}

static speed_status_t kv_arrived(speed_engine_t *e, engine_seq_t *s) {
    s->n_prefilled = s->n_prompt;
    s->state = SPEED_SEQ_AWAIT_TOKEN;
    (void)e;
    return SPEED_OK;
}

speed_status_t speed_engine_seq_kv_import(speed_engine_t *e, speed_seq_id_t id, const void *buf, size_t size) {
    engine_seq_t *s = find_logged(e, id);
    if (!s) return SPEED_ERR_NOT_FOUND;
    if (s->state != SPEED_SEQ_AWAIT_KV) {
        SPEED_ERROR(SPEED_SUBSYS_ENGINE, "engine: sequence %lld does not await KV", (long long)id);
        return SPEED_ERR_INVALID_ARGUMENT;
    }
    int64_t n_full, n_compact;
    speed_kv_entries_for(s->n_prompt, s->depth.anchors, s->depth.tail, 0, &n_full, &n_compact);
    SPEED_CHECK(
        speed_kv_cache_seq_import_from(e->kv, s->kv, speed_engine_seq_uncached_(s), n_full, n_compact, buf, size));
    return kv_arrived(e, s);
}

speed_status_t speed_engine_seq_kv_ready(speed_engine_t *e, speed_seq_id_t id) {
    engine_seq_t *s = find_logged(e, id);
    if (!s) return SPEED_ERR_NOT_FOUND;
    if (s->state != SPEED_SEQ_AWAIT_KV) {
        SPEED_ERROR(SPEED_SUBSYS_ENGINE, "engine: sequence %lld does not await KV", (long long)id);
        return SPEED_ERR_INVALID_ARGUMENT;
    }
    int64_t n_full, n_compact;
    speed_kv_entries_for(s->n_prompt, s->depth.anchors, s->depth.tail, 0, &n_full, &n_compact);
    /* the transfer wrote the mirror (pinned host memory), not the pool */
    if (speed_kv_cache_host_mirror(e->kv))
        SPEED_CHECK(speed_kv_cache_stage_in_from(e->kv, s->kv, speed_engine_seq_uncached_(s), n_full, n_compact));
    SPEED_CHECK(speed_kv_cache_seq_set_entries(e->kv, s->kv, n_full, n_compact));
    return kv_arrived(e, s);
}

speed_kv_cache_t *speed_engine_kv_cache(speed_engine_t *e) { return e->kv; }

speed_status_t speed_engine_seq_kv(const speed_engine_t *e, speed_seq_id_t id, speed_kv_seq_t **kv_seq_p) {
    const engine_seq_t *s = find_logged(e, id);
    if (!s) return SPEED_ERR_NOT_FOUND;
    *kv_seq_p = s->kv;
    return SPEED_OK;
}
