/* speed_engine lifecycle, sequences, accessors and KV transfer. The step is in forward.c. */
#include <math.h>
#include <string.h>
#include <time.h>

#include "alloc.h"
#include "engine_internal.h"
#include "log.h"

uint64_t speed_engine_now_ns_(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

speed_depth_t speed_depth_default(void) { return (speed_depth_t){.prefill_layers = 0, .anchors = 1, .tail = 1}; }

speed_engine_params_t speed_engine_default_params(void) {
    return (speed_engine_params_t){
        .kv_dtype = SPEED_DTYPE_F32,
        .block_tokens = 16,
        .max_seqs = 8,
        .max_step_tokens = 512,
        .prefill_chunk = 512,
        .depth = speed_depth_default(),
    };
}

/* Checks a depth against a model of n_layers and a context limit; resolves C 0 -> L. */
static speed_status_t depth_resolve(const speed_depth_t *in, int n_layers, int max_context, speed_depth_t *out) {
    if (in->prefill_layers < 0 || in->prefill_layers > n_layers) {
        SPEED_ERROR(SPEED_SUBSYS_ENGINE, "prefill_layers %d is out of range [1, %d] (0 = all layers)",
                    in->prefill_layers, n_layers);
        return SPEED_ERR_INVALID_ARGUMENT;
    }
    if (in->anchors < 0 || in->anchors > max_context) {
        SPEED_ERROR(SPEED_SUBSYS_ENGINE, "anchors %d is out of range [0, %d]", in->anchors, max_context);
        return SPEED_ERR_INVALID_ARGUMENT;
    }
    if (in->tail < 1 || in->tail > max_context) {
        SPEED_ERROR(SPEED_SUBSYS_ENGINE,
                    "tail %d is out of range [1, %d] (the last prompt token makes the first output, so it "
                    "runs at full depth)",
                    in->tail, max_context);
        return SPEED_ERR_INVALID_ARGUMENT;
    }
    *out = *in;
    if (out->prefill_layers == 0) out->prefill_layers = n_layers;
    return SPEED_OK;
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

static speed_status_t map_tensor(speed_engine_t *e, const speed_tensor_t *t, int64_t rows, int64_t cols,
                                 speed_mat_t *m) {
    for (int i = 0; i < e->n_mapped; i++) { /* a tied lm_head is the embedding: map it once */
        if (e->mapped[i] == t->data) {
            *m = speed_mat((void *)e->mapped_dev[i], t->dtype, rows, cols);
            return SPEED_OK;
        }
    }
    const void *dev;
    SPEED_CHECK(speed_backend_map_weights(e->be, t->data, t->n_bytes, &dev));
    e->mapped[e->n_mapped] = t->data;
    e->mapped_dev[e->n_mapped] = dev;
    e->n_mapped++;
    *m = speed_mat((void *)dev, t->dtype, rows, cols);
    return SPEED_OK;
}

static speed_status_t check_op(speed_engine_t *e, speed_op_t op, speed_dtype_t dtype, const char *what) {
    if (speed_backend_supports_op(e->be, op, dtype)) return SPEED_OK;
    SPEED_ERROR(SPEED_SUBSYS_ENGINE, "backend %s cannot run %s with %s", speed_backend_name(e->be), what,
                speed_dtype_name(dtype));
    return SPEED_ERR_UNSUPPORTED;
}

static speed_status_t map_weights(speed_engine_t *e) {
    const speed_model_t *m = e->model;
    int n_max = 3 + 9 * e->n_layers;
    e->mapped = speed_calloc((size_t)n_max, sizeof *e->mapped);
    e->mapped_dev = speed_calloc((size_t)n_max, sizeof *e->mapped_dev);
    e->layers = speed_calloc((size_t)e->n_layers, sizeof *e->layers);
    if (!e->mapped || !e->mapped_dev || !e->layers) {
        SPEED_ERROR(SPEED_SUBSYS_ENGINE, "engine: out of memory");
        return SPEED_ERR_NO_MEMORY;
    }
    int qd = e->n_heads * e->head_dim, kvd = e->n_kv_heads * e->head_dim;
    SPEED_CHECK(map_tensor(e, m->tok_embeddings, e->vocab, e->hidden, &e->tok_embeddings));
    SPEED_CHECK(map_tensor(e, m->norm, 1, e->hidden, &e->norm));
    SPEED_CHECK(map_tensor(e, m->lm_head, e->vocab, e->hidden, &e->lm_head));
    SPEED_CHECK(check_op(e, SPEED_OP_EMBED, e->tok_embeddings.dtype, "embed"));
    SPEED_CHECK(check_op(e, SPEED_OP_RMSNORM, e->norm.dtype, "rmsnorm"));
    SPEED_CHECK(check_op(e, SPEED_OP_MATMUL, e->lm_head.dtype, "matmul"));
    for (int l = 0; l < e->n_layers; l++) {
        const speed_layer_weights_t *w = &m->layers[l];
        engine_layer_t *L = &e->layers[l];
        SPEED_CHECK(map_tensor(e, w->attn_norm, 1, e->hidden, &L->attn_norm));
        SPEED_CHECK(map_tensor(e, w->wq, qd, e->hidden, &L->wq));
        SPEED_CHECK(map_tensor(e, w->wk, kvd, e->hidden, &L->wk));
        SPEED_CHECK(map_tensor(e, w->wv, kvd, e->hidden, &L->wv));
        SPEED_CHECK(map_tensor(e, w->wo, e->hidden, qd, &L->wo));
        SPEED_CHECK(map_tensor(e, w->ffn_norm, 1, e->hidden, &L->ffn_norm));
        SPEED_CHECK(map_tensor(e, w->w_gate, e->ffn, e->hidden, &L->w_gate));
        SPEED_CHECK(map_tensor(e, w->w_up, e->ffn, e->hidden, &L->w_up));
        SPEED_CHECK(map_tensor(e, w->w_down, e->hidden, e->ffn, &L->w_down));
        const speed_mat_t *mats[] = {&L->wq, &L->wk, &L->wv, &L->wo, &L->w_gate, &L->w_up, &L->w_down};
        for (size_t i = 0; i < sizeof mats / sizeof mats[0]; i++)
            SPEED_CHECK(check_op(e, SPEED_OP_MATMUL, mats[i]->dtype, "matmul"));
        SPEED_CHECK(check_op(e, SPEED_OP_RMSNORM, L->attn_norm.dtype, "rmsnorm"));
        SPEED_CHECK(check_op(e, SPEED_OP_RMSNORM, L->ffn_norm.dtype, "rmsnorm"));
    }
    const speed_op_t f32_ops[] = {SPEED_OP_ROPE, SPEED_OP_SWIGLU, SPEED_OP_GET_ROWS};
    for (size_t i = 0; i < sizeof f32_ops / sizeof f32_ops[0]; i++)
        SPEED_CHECK(check_op(e, f32_ops[i], SPEED_DTYPE_F32, "f32 activation ops"));
    SPEED_CHECK(check_op(e, SPEED_OP_KV_STORE, e->p.kv_dtype, "kv_store"));
    SPEED_CHECK(check_op(e, SPEED_OP_ATTENTION, e->p.kv_dtype, "attention"));
    return SPEED_OK;
}

static size_t align64(size_t n) { return (n + 63) & ~(size_t)63; }

static speed_status_t alloc_scratch(speed_engine_t *e) {
    size_t R = (size_t)e->p.max_step_tokens;
    size_t qd = (size_t)e->n_heads * e->head_dim, kvd = (size_t)e->n_kv_heads * e->head_dim;
    size_t sizes[] = {R * e->hidden, R * e->hidden, R * e->hidden, R * qd, R * kvd, R * kvd, R * qd,
                      R * e->ffn,    R * e->ffn,    (size_t)e->max_out * e->vocab};
    float **ptrs[] = {&e->x, &e->x2, &e->h, &e->q, &e->k, &e->v, &e->att, &e->gate, &e->up, &e->logits_dev};
    size_t total = 0;
    for (size_t i = 0; i < sizeof sizes / sizeof sizes[0]; i++) total += align64(sizes[i] * sizeof(float));
    SPEED_CHECK(speed_backend_alloc(e->be, total, &e->scratch));
    e->scratch_bytes = total;
    char *p = e->scratch;
    for (size_t i = 0; i < sizeof sizes / sizeof sizes[0]; i++) {
        *ptrs[i] = (float *)p;
        p += align64(sizes[i] * sizeof(float));
    }

    int Ri = e->p.max_step_tokens;
    size_t host = 0;
#define HOST_ALLOC(ptr, n)                                                    \
    do {                                                                      \
        (ptr) = speed_calloc((size_t)(n), sizeof *(ptr));                     \
        if (!(ptr)) goto oom;                                                 \
        host += (size_t)(n) * sizeof *(ptr);                                  \
    } while (0)
    HOST_ALLOC(e->logits, (size_t)e->max_out * e->vocab);
    HOST_ALLOC(e->tok, Ri);
    HOST_ALLOC(e->pos, Ri);
    HOST_ALLOC(e->row_item, Ri);
    HOST_ALLOC(e->entry_full, Ri);
    HOST_ALLOC(e->entry_compact, Ri);
    HOST_ALLOC(e->act, Ri);
    HOST_ALLOC(e->gather, Ri);
    HOST_ALLOC(e->act_pos, Ri);
    HOST_ALLOC(e->slots, Ri);
    HOST_ALLOC(e->n_visible, Ri);
    HOST_ALLOC(e->tables, Ri);
    HOST_ALLOC(e->out_rows, e->max_out);
    HOST_ALLOC(e->items, e->p.max_seqs);
    HOST_ALLOC(e->outputs, e->max_out);
    HOST_ALLOC(e->seqs, e->p.max_seqs);
    HOST_ALLOC(e->order, e->p.max_seqs);
#undef HOST_ALLOC
    e->host_scratch_bytes = host;
    return SPEED_OK;
oom:
    SPEED_ERROR(SPEED_SUBSYS_ENGINE, "engine: out of memory for host scratch");
    return SPEED_ERR_NO_MEMORY;
}

static speed_status_t check_params(const speed_engine_params_t *p) {
    const char *bad = NULL;
    if (!p->backend) bad = "no backend";
    else if (!p->model) bad = "no model";
    else if (speed_dtype_size(p->kv_dtype) == 0) bad = "kv_dtype is not f32, bf16 or f16";
    else if (p->block_tokens < 1 || p->block_tokens > 4096) bad = "block_tokens is out of range [1, 4096]";
    else if (p->n_blocks_lower < 0 || p->n_blocks_upper < 0) bad = "negative n_blocks";
    else if (p->max_seqs < 1 || p->max_seqs > 65536) bad = "max_seqs is out of range [1, 65536]";
    else if (p->max_step_tokens < 1 || p->max_step_tokens > 1 << 20) bad = "max_step_tokens is out of range [1, 2^20]";
    else if (p->prefill_chunk < 1) bad = "prefill_chunk is < 1";
    else if (p->max_context < 0) bad = "max_context is negative";
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
    e->p.depth = depth;
    e->p.max_context = max_context;
    if (e->p.prefill_chunk > e->p.max_step_tokens) e->p.prefill_chunk = e->p.max_step_tokens;
    e->model = params->model;
    e->be = params->backend;
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
    SPEED_CHECK_GOTO(map_weights(e), st, fail);

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
    SPEED_CHECK_GOTO(speed_kv_cache_create(&kp, &e->kv), st, fail);
    SPEED_CHECK_GOTO(alloc_scratch(e), st, fail);
    SPEED_DEBUG(SPEED_SUBSYS_ENGINE,
                "engine: %s, depth C=%d A=%d T=%d, %d sequences, %d rows/step, chunk %d, scratch %zu + %zu host bytes",
                speed_backend_name(e->be), depth.prefill_layers, depth.anchors, depth.tail, e->p.max_seqs,
                e->p.max_step_tokens, e->p.prefill_chunk, e->scratch_bytes, e->host_scratch_bytes);
    *engine_p = e;
    return SPEED_OK;
fail:
    speed_engine_destroy(e);
    return st;
}

void speed_engine_destroy(speed_engine_t *e) {
    if (!e) return;
    if (e->seqs) {
        for (int i = 0; i < e->p.max_seqs; i++) {
            if (!e->seqs[i].used) continue;
            speed_kv_cache_seq_destroy(e->kv, e->seqs[i].kv);
            speed_free(e->seqs[i].prompt);
        }
    }
    speed_kv_cache_destroy(e->kv);
    speed_backend_free(e->be, e->scratch);
    for (int i = e->n_mapped - 1; i >= 0; i--) speed_backend_unmap_weights(e->be, e->mapped_dev[i]);
    speed_free(e->mapped);
    speed_free(e->mapped_dev);
    speed_free(e->layers);
    speed_free(e->logits);
    speed_free(e->tok);
    speed_free(e->pos);
    speed_free(e->row_item);
    speed_free(e->entry_full);
    speed_free(e->entry_compact);
    speed_free(e->act);
    speed_free(e->gather);
    speed_free(e->act_pos);
    speed_free(e->slots);
    speed_free(e->n_visible);
    speed_free((void *)e->tables);
    speed_free(e->out_rows);
    speed_free(e->items);
    speed_free(e->outputs);
    speed_free(e->seqs);
    speed_free(e->order);
    speed_free(e);
}

speed_depth_t speed_engine_depth(const speed_engine_t *e) { return e->p.depth; }
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
static speed_status_t seq_new(speed_engine_t *e, int64_t n_prompt, const speed_depth_t *depth_in,
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
    int64_t n_full, n_compact;
    speed_kv_entries_for(n_prompt, depth.anchors, depth.tail, max_new_tokens - 1, &n_full, &n_compact);
    speed_status_t st = speed_kv_cache_seq_create(e->kv, depth.prefill_layers, n_full, n_compact, &s->kv);
    if (st != SPEED_OK) {
        if (st == SPEED_ERR_CAPACITY)
            SPEED_DEBUG(SPEED_SUBSYS_ENGINE, "engine: no KV room for %lld + %lld tokens", (long long)n_prompt,
                        (long long)max_new_tokens);
        return st;
    }
    s->depth = depth;
    s->n_prompt = n_prompt;
    s->max_new = max_new_tokens;
    s->a = depth.anchors < n_prompt ? depth.anchors : n_prompt;
    s->tail_start = n_prompt - depth.tail > s->a ? n_prompt - depth.tail : s->a;
    s->t_add_ns = speed_engine_now_ns_();
    *seq_p = s;
    return SPEED_OK;
}

static void seq_commit(speed_engine_t *e, engine_seq_t *s, speed_seq_id_t *seq_p) {
    s->used = true;
    s->id = e->next_id++;
    e->order[e->n_seqs++] = (int)(s - e->seqs);
    *seq_p = s->id;
}

speed_status_t speed_engine_seq_add(speed_engine_t *e, const int32_t *ids, int64_t n_prompt,
                                    const speed_depth_t *depth, int64_t max_new_tokens, speed_seq_id_t *seq_p) {
    if (!e || !seq_p || (!ids && n_prompt > 0)) {
        SPEED_ERROR(SPEED_SUBSYS_ENGINE, "engine: seq_add without engine, ids or output pointer");
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
    SPEED_CHECK(seq_new(e, n_prompt, depth, max_new_tokens, &s));
    s->prompt = speed_malloc((size_t)n_prompt * sizeof(int32_t));
    if (!s->prompt) {
        speed_kv_cache_seq_destroy(e->kv, s->kv);
        s->kv = NULL;
        SPEED_ERROR(SPEED_SUBSYS_ENGINE, "engine: out of memory for a prompt of %lld tokens", (long long)n_prompt);
        return SPEED_ERR_NO_MEMORY;
    }
    memcpy(s->prompt, ids, (size_t)n_prompt * sizeof(int32_t));
    s->state = SPEED_SEQ_PREFILL;
    seq_commit(e, s, seq_p);
    return SPEED_OK;
}

speed_status_t speed_engine_seq_reserve(speed_engine_t *e, int64_t n_prompt, const speed_depth_t *depth,
                                        int64_t max_new_tokens, speed_seq_id_t *seq_p) {
    if (!e || !seq_p) {
        SPEED_ERROR(SPEED_SUBSYS_ENGINE, "engine: seq_reserve without engine or output pointer");
        return SPEED_ERR_INVALID_ARGUMENT;
    }
    engine_seq_t *s;
    SPEED_CHECK(seq_new(e, n_prompt, depth, max_new_tokens, &s));
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
    s->state = SPEED_SEQ_DECODE;
    return SPEED_OK;
}

speed_status_t speed_engine_seq_remove(speed_engine_t *e, speed_seq_id_t id) {
    engine_seq_t *s = find_logged(e, id);
    if (!s) return SPEED_ERR_NOT_FOUND;
    int slot = (int)(s - e->seqs);
    speed_kv_cache_seq_destroy(e->kv, s->kv);
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
    speed_kv_usage_t u;
    speed_kv_cache_seq_usage(e->kv, s->kv, &u);
    st->kv_bytes_used = u.bytes_used[0] + u.bytes_used[1];
    st->kv_bytes_reserved = u.bytes_reserved[0] + u.bytes_reserved[1];
    st->kv_bytes_full_depth = (size_t)speed_kv_seq_entries(s->kv, 0) * (size_t)e->n_layers *
                              speed_kv_cache_token_bytes(e->kv);
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
    st->scratch_bytes = e->scratch_bytes + e->host_scratch_bytes;
    st->weight_bytes = speed_model_n_bytes(e->model);
}

/* ---- KV transfer ----------------------------------------------------------------------------- */

speed_status_t speed_engine_seq_kv_size(const speed_engine_t *e, speed_seq_id_t id, size_t *bytes_p) {
    const engine_seq_t *s = find_logged(e, id);
    if (!s) return SPEED_ERR_NOT_FOUND;
    int64_t n_full, n_compact;
    if (s->state == SPEED_SEQ_AWAIT_KV) { /* what import expects */
        speed_kv_entries_for(s->n_prompt, s->depth.anchors, s->depth.tail, 0, &n_full, &n_compact);
    } else {
        n_full = speed_kv_seq_entries(s->kv, 0);
        n_compact = speed_kv_seq_entries(s->kv, e->n_layers - 1); /* = n_full when C = L: unused */
    }
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
    SPEED_CHECK(speed_kv_cache_seq_import(e->kv, s->kv, n_full, n_compact, buf, size));
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
