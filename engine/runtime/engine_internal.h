/* Private state of speed_engine, shared by engine.c (lifecycle, sequences, transfer) and
 * forward.c (the step). */
#ifndef SPEED_ENGINE_INTERNAL_H
#define SPEED_ENGINE_INTERNAL_H

#include "engine.h"

typedef struct {
    speed_mat_t attn_norm, wq, wk, wv, wo, ffn_norm, w_gate, w_up, w_down;
} engine_layer_t;

/* One sequence. SPEED classes of its prompt (n = n_prompt): anchors [0, a), shallow
 * [a, tail_start), tail [tail_start, n); a = min(A, n), tail_start = max(n - T, a). */
typedef struct {
    bool used;
    speed_seq_id_t id;
    speed_seq_state_t state;
    speed_depth_t depth;          /* resolved */
    int64_t n_prompt, n_prefilled, n_generated, max_new;
    int64_t a, tail_start;
    int32_t *prompt;              /* [n_prompt]; NULL for a reserved sequence */
    int32_t pending;              /* queued token (state DECODE) */
    speed_kv_seq_t *kv;
    uint64_t t_add_ns, prefill_ns, first_output_ns, decode_ns;
} engine_seq_t;

/* What a step computes for one sequence: rows [row_begin, row_begin + n_rows) at positions
 * pos_begin.. */
typedef struct {
    int slot;                     /* index in engine->seqs */
    int row_begin, n_rows;
    int64_t pos_begin;
    bool prefill;
    bool output;                  /* its last row makes logits */
} engine_batch_item_t;

struct speed_engine {
    speed_engine_params_t p;      /* depth resolved, sizes filled */
    const speed_model_t *model;
    speed_backend_t *be;
    int n_layers, hidden, n_heads, n_kv_heads, head_dim, ffn, vocab;
    int max_context;
    float eps, attn_scale;
    speed_rope_t rope;

    /* weights, mapped once */
    speed_mat_t tok_embeddings, norm, lm_head;
    engine_layer_t *layers;       /* [n_layers] */
    const void **mapped;          /* [n_mapped] host pointers handed to map_weights... */
    const void **mapped_dev;      /* ...and what it returned, for unmap */
    int n_mapped;

    speed_kv_cache_t *kv;

    /* sequences */
    engine_seq_t *seqs;           /* [max_seqs] */
    int *order;                   /* [n_seqs] slots in the order they were added */
    int n_seqs;
    speed_seq_id_t next_id;

    /* backend scratch: one allocation, R = max_step_tokens rows */
    void *scratch;
    size_t scratch_bytes;
    float *x, *x2, *h, *q, *k, *v, *att, *gate, *up; /* [R][...] */
    float *logits_dev;            /* [max_out][vocab] */
    int max_out;

    /* host scratch, sized at create */
    float *logits;                /* [max_out][vocab] */
    int32_t *tok, *pos;           /* [R] per step row */
    int32_t *row_item;            /* [R] batch item of the row */
    int32_t *entry_full, *entry_compact; /* [R]; compact -1 for shallow rows */
    int32_t *act;                 /* [R] step rows present in x, in order */
    int32_t *gather;              /* [R] */
    int32_t *act_pos, *slots, *n_visible; /* [R] per active row */
    const int32_t **tables;       /* [R] */
    int32_t *out_rows;            /* [max_out] */
    engine_batch_item_t *items;   /* [max_seqs] */
    speed_engine_output_t *outputs; /* [max_out] */
    size_t host_scratch_bytes;

    /* counters */
    uint64_t n_steps, n_prefill_tokens, n_decode_tokens, step_ns;
};

uint64_t speed_engine_now_ns_(void);
engine_seq_t *speed_engine_find_(const speed_engine_t *e, speed_seq_id_t id);

#endif /* SPEED_ENGINE_INTERNAL_H */
