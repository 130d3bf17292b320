/* Private state of speed_engine, shared by engine.c (lifecycle, sequences, transfer) and
 * forward.c (the step). */
#ifndef SPEED_ENGINE_INTERNAL_H
#define SPEED_ENGINE_INTERNAL_H

#include <pthread.h>

#include "comm.h"
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
    speed_depth_t depth; /* resolved */
    int64_t n_prompt, n_prefilled, n_generated, max_new;
    int64_t a, tail_start;
    /* [n_prompt + max_new - 1]: the prompt, then the generated tokens appended (the prefix cache
     * keys on them); NULL for a reserved sequence */
    int32_t *prompt;
    int64_t n_cached, n_shared_blocks; /* prompt positions reused from the prefix cache */
    bool published;                    /* its prompt's full blocks went to the prefix cache while running */
    int32_t pending;                   /* queued token (state DECODE) */
    speed_kv_seq_t *kv;
    uint64_t t_add_ns, prefill_ns, first_output_ns, decode_ns;
} engine_seq_t;

/* What a step computes for one sequence: rows [row_begin, row_begin + n_rows) at positions
 * pos_begin.. */
typedef struct {
    int slot; /* index in engine->seqs */
    int row_begin, n_rows;
    int64_t pos_begin;
    bool prefill;
    bool output; /* its last row makes logits */
} engine_batch_item_t;

/* One tensor-parallel rank (docs/tensor-parallel.md;
 * docs/design.md §8). With one rank it holds the whole model. With t ranks, rank r holds query
 * heads [r*nh/t, ...), kv heads [r*nkv/t, ...) and FFN rows [r*F/t, ...): the column shards of
 * wq/wk/wv/w_gate/w_up and the row shards of wo/w_down, as zero-copy views of the mapped
 * weights. Every rank keeps the whole residual stream; the partial sums of the two row-sharded
 * projections are all-reduced. The output head is split by vocabulary rows. Ranks share the KV cache (one pool in host memory), each
 * writing and reading its heads through a head-range view. */
typedef struct engine_rank {
    struct speed_engine *e;
    int rank;
    speed_backend_t *be;
    speed_comm_t *comm;                     /* NULL with one rank */
    int n_heads, n_kv_heads, kv_head0, ffn; /* this rank's share */

    speed_mat_t tok_embeddings, norm, lm_head;
    engine_layer_t *layers;  /* [n_layers] */
    const void **mapped;     /* [n_mapped] host pointers handed to map_weights... */
    const void **mapped_dev; /* ...and what it returned, for unmap */
    int n_mapped;

    /* backend scratch: one allocation, R = max_step_tokens rows */
    void *scratch;
    size_t scratch_bytes;
    float *x, *x2, *h, *q, *k, *v, *att, *gate, *up; /* [R][...] */
    float *part;                                     /* [R][hidden]: a row-sharded projection's partial sum (t > 1) */
    float *logits_dev;                               /* [max_out][vocab], rank 0 only; every rank writes its
                                   * vocabulary slice [vocab0, vocab0 + lm_head.n_rows) */
    float *topk_vals_dev;                            /* [max_out][output_topk], rank 0 with output_topk > 0 */
    int32_t *topk_ids_dev;                           /* [max_out][output_topk] */
    float *lse_dev;                                  /* [max_out] */
    int vocab0;                                      /* first row of lm_head this rank computes */
    int32_t *out_rows;                               /* [max_out] rows of x that make logits */

    /* host scratch: the rows alive, changed by every layer */
    int32_t *act;                         /* [R] step rows present in x, in order */
    int32_t *gather;                      /* [R] */
    int32_t *act_pos, *slots, *n_visible; /* [R] per active row */
    const int32_t **tables;               /* [R] */
    size_t host_scratch_bytes;

    int n_act;         /* rows alive after the last step's layers */
    speed_status_t st; /* the last step's outcome on this rank */
    pthread_t thread;  /* ranks >= 1 run on their own thread */
    bool thread_started;
} engine_rank_t;

struct speed_engine {
    speed_engine_params_t p; /* depth resolved, sizes filled */
    const speed_model_t *model;
    speed_backend_t *be; /* rank 0's: the KV cache lives there */
    int n_layers, hidden, n_heads, n_kv_heads, head_dim, ffn, vocab;
    int max_context;
    float eps, attn_scale;
    speed_rope_t rope;

    engine_rank_t *ranks; /* [n_ranks] */
    int n_ranks;
    speed_comm_group_t *comm_group; /* n_ranks > 1 */
    bool comm_broken;               /* a step failed on some rank: remake the group before the next */
    /* rank threads: a step is published by bumping tp_gen; each rank >= 1 bumps tp_done */
    pthread_mutex_t tp_lock;
    pthread_cond_t tp_start, tp_finished;
    uint64_t tp_gen;
    int tp_done;
    bool tp_stop, tp_sync_init;
    int tp_n_items, tp_n_rows;

    speed_kv_cache_t *kv;
    speed_prefix_cache_t *prefix; /* NULL when off */
    uint64_t n_cached_tokens;

    /* sequences */
    engine_seq_t *seqs; /* [max_seqs] */
    int *order;         /* [n_seqs] slots in the order they were added */
    int n_seqs;
    speed_seq_id_t next_id;

    int max_out;

    /* host scratch shared by the ranks (written before they start), sized at create */
    float *logits;                       /* [max_out][vocab]; NULL with output_topk > 0 */
    float *topk_vals;                    /* [max_out][output_topk] with output_topk > 0, else NULL */
    int32_t *topk_ids;                   /* [max_out][output_topk] */
    float *lse;                          /* [max_out] */
    int32_t *tok, *pos;                  /* [R] per step row */
    int32_t *row_item;                   /* [R] batch item of the row */
    int32_t *entry_full, *entry_compact; /* [R]; compact -1 for shallow rows */
    engine_batch_item_t *items;          /* [max_seqs] */
    speed_engine_output_t *outputs;      /* [max_out] */
    size_t host_scratch_bytes;

    /* counters */
    uint64_t n_steps, n_prefill_tokens, n_decode_tokens, step_ns;
};

/* Runs one step's forward pass on a rank (forward.c): embed, layers, and on rank 0 the logits
 * of the outputs into e->logits. */
speed_status_t speed_engine_rank_forward_(engine_rank_t *rk, int n_items, int n_rows);

engine_seq_t *speed_engine_find_(const speed_engine_t *e, speed_seq_id_t id);

/* The first entries of each space not filled by a prefix cache hit ({0, 0} without one). */
speed_kv_from_t speed_engine_seq_uncached_(const engine_seq_t *s);

/* Sets s->a and s->tail_start from s->depth and s->n_prompt (the classes above). */
void speed_engine_seq_classes_(engine_seq_t *s);

/* A sequence's depth (NULL: the default) resolved and checked as seq_add does (logged). */
speed_status_t speed_engine_depth_resolve_(const speed_engine_t *e, const speed_depth_t *in, speed_depth_t *out);

/* engine_prefix.c. Reserves the KV of a new sequence (its depth, a and tail_start set): when
 * ids is not NULL and the prefix cache hits, reuses what the SPEED rule allows (shared blocks,
 * copied entries) and sets s->n_prefilled past it; when the pools lack blocks, evicts cache
 * entries and retries. Returns as speed_kv_cache_seq_create (nothing held on error). */
speed_status_t speed_engine_kv_reserve_(speed_engine_t *e, engine_seq_t *s, const int32_t *ids, int64_t n_full,
                                        int64_t n_compact);
/* Hands a sequence's KV to the prefix cache when it can serve later prompts (its prefill done,
 * its tokens known), else frees it. s->kv is NULL afterwards. */
void speed_engine_kv_release_(speed_engine_t *e, engine_seq_t *s);

#endif /* SPEED_ENGINE_INTERNAL_H */
