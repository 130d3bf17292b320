/* speed_engine: the batched SPEED forward pass over a paged KV cache.
 *
 * An engine owns the KV cache (kv_cache.h), scratch buffers sized once at creation, and the
 * sequences it is running. It borrows a backend (kernels/backend.h) and a loaded model
 * (engine/model/model.h); both must outlive it. One call to speed_engine_step advances every
 * active sequence by one batch of rows (continuous batching):
 *
 *   - a sequence still prefilling contributes its next chunk of prompt tokens (at most
 *     params.prefill_chunk, and what is left of params.max_step_tokens);
 *   - a decoding sequence contributes the one token appended since its last logits;
 *   - sequences may be added and removed between steps; one step mixes both kinds.
 *
 * SPEED (docs/design.md §1): a sequence has depth {C, A, T}. Prompt positions [0, A)
 * are anchors, [A, n-T) shallow, [n-T, n) tail; tail and generated tokens are full depth
 * (A + T >= n: everything is full depth). Layers < C compute and cache every token; layers
 * >= C compute and cache only anchors and full-depth tokens, which attend causally to each
 * other. RoPE always uses the absolute positions. C = L is the standard model.
 *
 * Typical loop (greedy, one sequence):
 *
 *   speed_engine_seq_add(eng, ids, n, NULL, max_new, &id);
 *   for (;;) {
 *       speed_engine_step_result_t r;
 *       speed_engine_step(eng, &r);                 // prefill chunks, then one token per step
 *       for (int i = 0; i < r.n_outputs; i++) {
 *           int32_t tok = argmax(r.outputs[i].logits, vocab);
 *           if (done) speed_engine_seq_remove(eng, r.outputs[i].seq);
 *           else      speed_engine_seq_append(eng, r.outputs[i].seq, tok);
 *       }
 *   }
 *
 * Disaggregated use (the next issue's prefill and decode nodes) goes through the same engine:
 * a prefill node adds the prompt with max_new_tokens 1, gets its per-layer callback while the
 * prefill runs (to push each layer's blocks, see speed_engine_layer_cb_t) and the first
 * logits; a decode node reserves a sequence with speed_engine_seq_reserve, receives the KV
 * (speed_engine_seq_kv_import from a host buffer, or writes into the block addresses of
 * speed_kv_cache_block_addr and then calls speed_engine_seq_kv_ready), appends the first
 * token and decodes.
 *
 * Memory: creation allocates everything the hot path needs (KV pools, activation scratch for
 * max_step_tokens rows, logits for the sequences that can finish a step, host index arrays).
 * speed_engine_step allocates nothing on the host (a backend may grow its own scratch).
 * speed_engine_seq_add / _reserve allocate the sequence's state (prompt copy, block tables).
 *
 * Thread-safety: an engine is used by one thread at a time (all functions, including the
 * accessors). With tp_size > 1 the engine runs threads of its own for ranks 1.., inside
 * speed_engine_step only. Different engines are independent, even when they share a model; two engines
 * sharing one backend must not step concurrently (a backend is single-threaded, backend.h).
 *
 * Errors are logged once, where they are detected (subsystem "engine", or "kv" for the cache);
 * speed_log_last_error() gives the text to a caller that shows it.
 */
#ifndef SPEED_ENGINE_H
#define SPEED_ENGINE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "backend.h"
#include "depth.h"
#include "dtype.h"
#include "kv_cache.h"
#include "model.h"
#include "prefix_cache.h"
#include "status.h"

/* Identifies a sequence of one engine; ids are never reused by that engine. */
typedef int64_t speed_seq_id_t;


/* Called during a prefill step, on the step's thread, after layer `layer` has stored this
 * step's entries of sequence `seq`: the layer now holds n_done of the n_total entries it will
 * hold for the prompt (n_total = n_prompt for layers < C, min(A + T, n_prompt) for layers
 * >= C). n_done == n_total means the layer's prompt KV is complete: its blocks
 * (speed_kv_cache_block_addr, blocks 0 .. ceil(n_total / B) - 1) may be shipped. A
 * sequence's full blocks of earlier chunks may be shipped as soon as they are reported.
 * Layers >= C that store nothing in a step (a chunk of shallow tokens only) are not called.
 * Before calling, the engine synchronizes the backend, so the bytes are in memory.
 * The callback must not call any speed_engine_* function that changes state (add, remove,
 * append, step, import); accessors are fine. A non-OK return aborts the step with that
 * status (the sequences of the step do not advance; stepping again redoes the chunk). */
typedef speed_status_t (*speed_engine_layer_cb_t)(void *user, speed_seq_id_t seq, int layer, int64_t n_done,
                                                  int64_t n_total);

typedef struct {
    speed_backend_t *backend;   /* borrowed, must outlive the engine */
    const speed_model_t *model; /* borrowed, must outlive the engine */
    speed_dtype_t kv_dtype;     /* cache dtype: f32, bf16, f16 or SPEED_KV_DTYPE_AUTO (the default:
                                 * the model's, speed_model_kv_dtype) */
    int block_tokens;           /* B, tokens per KV block; default 16 */
    /* KV pools (kv_cache.h): blocks of the lower pool (layers < depth C) and of the upper pool
     * (layers >= C). 0 and 0 = the worst case, max_seqs sequences of max_context tokens in
     * BOTH pools (any prompt/generation split and any per-sequence C fit; no saving).
     * The upper pool is smaller only when sized for a workload: speed_engine_params_fit_kv
     * or speed_kv_cache_blocks_for. */
    int64_t n_blocks_lower;
    int64_t n_blocks_upper;
    /* Pinned host mirror of the KV pools for KV transfer (kv_cache.h): AUTO (default) = on when
     * the backend's memory is device memory (CUDA), ON forces it (tests on CPU), OFF disables it
     * (a CUDA-aware UCX registers device memory directly: ucx.cuda_direct). */
    speed_kv_mirror_t kv_host_mirror;
    int max_seqs;                     /* sequences alive at once (added, not yet removed); default 8 */
    int max_step_tokens;              /* rows one step computes (scratch size); default 512 */
    int prefill_chunk;                /* prompt tokens of one sequence per step; default 512,
                                   * clamped to max_step_tokens */
    int max_context;                  /* prompt + max_new_tokens limit; 0 = the model's
                                   * max_position (also the upper bound) */
    speed_depth_t depth;              /* default depth; its C (resolved) splits the KV pools */
    speed_engine_layer_cb_t layer_cb; /* optional, see above */
    void *layer_cb_user;
    /* Tensor parallelism inside this process (docs/architecture.md, "Tensor parallelism"):
     * tp_size ranks, rank r computing on tp_backends[r] (borrowed, distinct, CPU or cpu-ref:
     * the ranks share the KV cache in host memory) with its share of the heads and of the FFN;
     * ranks 1.. run on threads of their own, the caller's thread runs rank 0, and the
     * engine's API and outputs are the same as with one rank. tp_size must divide the model's
     * query and kv heads. 1 (the default): `backend` alone, tp_backends unused. */
    int tp_size;
    speed_backend_t *const *tp_backends; /* [tp_size] when tp_size > 1; `backend` is then ignored */
    /* Outputs as the top k logits instead of all of them (speed_op_topk, on the backend): a
     * step downloads k values, k ids and one log-sum-exp per output instead of vocab floats
     * (docs/gpu.md). 0 (the default): full logits. 1 .. min(vocab, SPEED_TOPK_MAX). */
    int output_topk;
    /* Prefix cache (prefix_cache.h, docs/prefix-cache.md): with prefix_cache.max_blocks > 0, a
     * sequence added with speed_engine_seq_add that finished its prefill leaves its KV in the
     * cache when it is removed, and a later seq_add whose prompt starts with the same tokens
     * reuses what the SPEED rule allows and prefills only the rest (the "decode-local prefill").
     * A running sequence's prompt (its full blocks) is published at the next seq_add already, so
     * concurrent requests with one system prompt share it. Entries are evicted least recently
     * used past max_blocks, and whenever a reservation lacks free blocks. Off by default. With a layer callback (a prefill node) the callback reports
     * only the computed positions: leave the cache off there. */
    speed_prefix_cache_params_t prefix_cache;
} speed_engine_params_t;

#define SPEED_ENGINE_TP_MAX 64

/* backend NULL, model NULL, auto cache dtype, B 16, auto pools, 8 sequences, 512 rows per step,
 * chunk 512, context = model, speed_depth_default(), no callback, tp_size 1, full logits. */
speed_engine_params_t speed_engine_default_params(void);

/* Sets n_blocks_lower / n_blocks_upper to hold exactly n_seqs sequences of n_prompt prompt
 * tokens and max_new_tokens at params->depth for params->model (both must be set; the depth
 * C 0 = L); adds nothing for other shapes. Returns SPEED_OK or SPEED_ERR_INVALID_ARGUMENT. */
speed_status_t speed_engine_params_fit_kv(speed_engine_params_t *params, int64_t n_seqs, int64_t n_prompt,
                                          int64_t max_new_tokens);

typedef struct speed_engine speed_engine_t;

/* Creates an engine: maps the weights (speed_backend_map_weights, once), allocates the KV
 * pools and the scratch. Checks that the backend supports every op with the model's weight
 * dtypes and the cache dtype.
 * Returns:
 *   SPEED_OK
 *   SPEED_ERR_INVALID_ARGUMENT  NULL backend/model/out pointer, a parameter out of range
 *                               (named in the log), a depth out of range
 *   SPEED_ERR_UNSUPPORTED       the backend lacks an op for these dtypes
 *   SPEED_ERR_NO_MEMORY         host or backend allocation failed
 *   SPEED_ERR_DEVICE            the backend failed
 * On error nothing stays allocated and *engine_p is untouched. */
speed_status_t speed_engine_create(const speed_engine_params_t *params, speed_engine_t **engine_p);

/* Releases everything; NULL is a no-op. Sequences still alive are freed (the cache's leak
 * report then lists none: removing them is the engine's job). */
void speed_engine_destroy(speed_engine_t *engine);

/* The resolved default depth (C in 1..L) and the context limit. */
speed_depth_t speed_engine_depth(const speed_engine_t *engine);
int speed_engine_max_context(const speed_engine_t *engine);
/* The cache's dtype (SPEED_KV_DTYPE_AUTO resolved against the model). */
speed_dtype_t speed_engine_kv_dtype(const speed_engine_t *engine);
int speed_engine_n_vocab(const speed_engine_t *engine);

/* Adds a sequence: copies the prompt, checks it, reserves its KV for n_prompt + max_new_tokens
 * - 1 entries (the last sampled token is never fed back), so decoding can never run out of
 * blocks. The sequence prefills from the next step. depth NULL = the engine's default.
 * With the prefix cache on (params.prefix_cache), the longest cached prefix the SPEED rule lets
 * this sequence reuse fills its first positions (speed_engine_seq_stats: n_cached), exactly as
 * computing them would, and the prefill computes only the rest; when the pools lack blocks,
 * cache entries are evicted (least recently used first) before SPEED_ERR_CAPACITY.
 * Returns:
 *   SPEED_OK                    *seq_p = the new id
 *   SPEED_ERR_INVALID_ARGUMENT  ids NULL, n_prompt < 1, an id outside [0, vocab),
 *                               max_new_tokens < 1, C/A/T out of range (C in 0..L, A in
 *                               0..context, T in 1..context)
 *   SPEED_ERR_TOO_LONG          n_prompt + max_new_tokens > the context limit
 *   SPEED_ERR_CAPACITY          max_seqs sequences alive, or not enough free KV blocks in a
 *                               pool (retryable; nothing was reserved)
 *   SPEED_ERR_NO_MEMORY
 * Errors are logged (naming the value and the limit), except SPEED_ERR_CAPACITY (debug level
 * only: a normal, retryable condition the caller reports); on error nothing changes. */
speed_status_t speed_engine_seq_add(speed_engine_t *engine, const int32_t *ids, int64_t n_prompt,
                                    const speed_depth_t *depth, int64_t max_new_tokens, speed_seq_id_t *seq_p);

/* Decode side of a disaggregated prefill: reserves a sequence whose prompt KV will arrive from
 * elsewhere (same checks and returns as seq_add, without token ids). It takes no part in
 * steps until speed_engine_seq_kv_import or speed_engine_seq_kv_ready, then waits for its
 * first token (speed_engine_seq_append). */
speed_status_t speed_engine_seq_reserve(speed_engine_t *engine, int64_t n_prompt, const speed_depth_t *depth,
                                        int64_t max_new_tokens, speed_seq_id_t *seq_p);

/* Decode side of a disaggregated prefill with the prefix cache (docs/prefix-cache.md): like
 * speed_engine_seq_reserve, but with the prompt's ids, so that a prefix cache hit fills the
 * first n_cached positions (speed_engine_seq_stats; 0 on a miss) and only the rest must arrive:
 * speed_engine_seq_kv_size / _kv_import / the block addresses then cover the units from the
 * block holding the first entry not cached in each layer (kv_cache.h, speed_kv_from_t), and
 * speed_engine_seq_kv_ready stages only those. The sender (speed_engine_seq_kv_export_from with
 * n_skip = n_cached) must hold the cached positions too: the first unit of a layer carries them.
 * The sequence is cached when removed, like one added with speed_engine_seq_add. Same checks
 * and returns as speed_engine_seq_add (ids validated). */
speed_status_t speed_engine_seq_reserve_cached(speed_engine_t *engine, const int32_t *ids, int64_t n_prompt,
                                               const speed_depth_t *depth, int64_t max_new_tokens,
                                               speed_seq_id_t *seq_p);

/* Like speed_engine_seq_reserve (the whole prompt's KV must arrive: no lookup, nothing filled),
 * but with the prompt's ids, so that the sequence is cached when removed, like one added with
 * speed_engine_seq_add: a decode node whose sender cannot skip a cached prefix yet still keeps
 * what it received for the next turn. Same checks and returns as speed_engine_seq_add. */
speed_status_t speed_engine_seq_reserve_keep(speed_engine_t *engine, const int32_t *ids, int64_t n_prompt,
                                             const speed_depth_t *depth, int64_t max_new_tokens, speed_seq_id_t *seq_p);

/* Queues the token sampled from the sequence's last logits; the next step processes it.
 * Returns SPEED_OK; SPEED_ERR_NOT_FOUND (no such sequence); SPEED_ERR_INVALID_ARGUMENT (id
 * outside the vocabulary, or the sequence is still prefilling / awaiting KV / already has a
 * token queued); SPEED_ERR_TOO_LONG (max_new_tokens tokens were already produced: this would
 * be token max_new_tokens + 1, there is no KV room for it). */
speed_status_t speed_engine_seq_append(speed_engine_t *engine, speed_seq_id_t seq, int32_t token);

/* Frees the sequence and its KV blocks; valid in any state. Outputs of the last step for it
 * stay readable until the next step. With the prefix cache on, a sequence added with
 * speed_engine_seq_add whose prefill is done leaves its KV (prompt and generated tokens
 * processed) in the cache instead. Returns SPEED_OK or SPEED_ERR_NOT_FOUND. */
speed_status_t speed_engine_seq_remove(speed_engine_t *engine, speed_seq_id_t seq);

/* One output of a step: the logits following the sequence's last processed token — all of
 * them, or with params.output_topk > 0 the n_topk largest (descending, equal values by lower
 * id) and the log-sum-exp of all of them, so that log p(topk_ids[j]) = topk_logits[j] - lse.
 * Host pointers, valid until the next step or destroy. */
typedef struct {
    speed_seq_id_t seq;
    const float *logits;      /* f32 [vocab]; NULL when output_topk > 0 */
    const int32_t *topk_ids;  /* [n_topk] token ids; NULL when output_topk is 0 */
    const float *topk_logits; /* f32 [n_topk] their logits; NULL when output_topk is 0 */
    int n_topk;               /* params.output_topk */
    float lse;                /* log Σ exp(logits) over the vocabulary (output_topk > 0 only) */
    int64_t position;         /* position of the token these logits follow (n_prompt - 1 for the
                            * first output) */
    bool first;               /* the prefill completed in this step: these are the first logits */
} speed_engine_output_t;

typedef struct {
    const speed_engine_output_t *outputs; /* [n_outputs], valid until the next step */
    int n_outputs;
    int n_seqs;         /* sequences that had rows in this step */
    int n_prefill_rows; /* prompt tokens processed (all layers they run) */
    int n_decode_rows;  /* generated tokens processed */
    uint64_t ns;        /* wall time of the step */
} speed_engine_step_result_t;

/* Runs one step (see the top of this file). With nothing to do it returns SPEED_OK with no
 * rows. Sequences waiting for a token or for KV are skipped; when the rows do not all fit,
 * decode rows go first, then prefill chunks, in the order sequences were added, and the rest
 * wait for the next step.
 * Returns SPEED_OK, or the backend's status (SPEED_ERR_DEVICE, SPEED_ERR_NO_MEMORY, ...) or the
 * layer callback's; on error no sequence advances (their queued tokens and prefill positions
 * are as before the step) and result_p->n_outputs is 0. */
speed_status_t speed_engine_step(speed_engine_t *engine, speed_engine_step_result_t *result_p);

/* True while any sequence has work a step would do. */
bool speed_engine_has_work(const speed_engine_t *engine);

typedef enum {
    SPEED_SEQ_PREFILL = 0, /* prompt tokens left to process */
    SPEED_SEQ_AWAIT_KV,    /* reserved, prompt KV not imported yet */
    SPEED_SEQ_AWAIT_TOKEN, /* has logits, waits for speed_engine_seq_append */
    SPEED_SEQ_DECODE,      /* a token is queued for the next step */
} speed_seq_state_t;

typedef struct {
    speed_seq_state_t state;
    speed_depth_t depth; /* resolved: C in 1..L */
    int64_t n_prompt;
    int64_t n_prefilled; /* prompt tokens processed so far */
    int64_t n_generated; /* appended tokens processed (stored in the KV) */
    int64_t max_new_tokens;
    int64_t n_cached;        /* prompt positions reused from the prefix cache (not computed) */
    int64_t n_shared_blocks; /* of them, lower-pool blocks shared rather than copied */
    /* KV bytes (cache dtype), exact: */
    size_t kv_bytes_used;       /* entries stored, both pools: for a finished prefill this is
                                   * speed_kv_bytes_for_prompt(C, A, T, n_prompt) + the
                                   * generated tokens at full depth */
    size_t kv_bytes_full_depth; /* the same tokens at full depth (C = L) */
    size_t kv_bytes_reserved;   /* whole blocks reserved, both pools */
    /* Timing (wall time of the steps the sequence took part in; batch-mates share it): */
    uint64_t prefill_ns;      /* steps with its prompt rows */
    uint64_t first_output_ns; /* from seq_add to the end of the step with its first logits */
    uint64_t decode_ns;       /* steps with its generated rows */
} speed_engine_seq_stats_t;

/* Returns SPEED_OK or SPEED_ERR_NOT_FOUND. */
speed_status_t speed_engine_seq_stats(const speed_engine_t *engine, speed_seq_id_t seq,
                                      speed_engine_seq_stats_t *stats_p);

typedef struct {
    uint64_t n_steps;
    uint64_t n_prefill_tokens;         /* prompt rows processed since creation */
    uint64_t n_decode_tokens;          /* generated rows processed */
    uint64_t step_ns;                  /* total wall time in steps */
    int n_seqs;                        /* alive now */
    speed_kv_cache_stats_t kv;         /* pools: blocks and bytes (kv_cache.h); its usage counts the
                                        * prefix cache's entries too */
    speed_kv_usage_t live;             /* the live sequences' blocks and bytes only (a block shared
                                        * with a cache entry or another sequence counted in each) */
    size_t scratch_bytes;              /* backend activation scratch + host logits and indices */
    size_t weight_bytes;               /* mapped model weights (speed_model_n_bytes) */
    uint64_t n_cached_tokens;          /* prompt positions reused from the prefix cache since creation */
    speed_prefix_cache_stats_t prefix; /* all zero when the cache is off */
} speed_engine_stats_t;

void speed_engine_stats(const speed_engine_t *engine, speed_engine_stats_t *stats_p);

/* The prompt positions speed_engine_seq_add would reuse from the prefix cache right now for
 * this prompt and depth (NULL = the default), without changing anything (no pin, no LRU touch,
 * no counter): a decode node compares n_prompt - *n_reuse_p, the tokens left to compute, with
 * its threshold to prefill the suffix itself or send it to a prefill node. *n_reuse_p is 0 when
 * the cache is off. Returns SPEED_OK or SPEED_ERR_INVALID_ARGUMENT (NULL pointers, n_prompt < 1,
 * a depth out of range; logged). */
speed_status_t speed_engine_prefix_probe(speed_engine_t *engine, const int32_t *ids, int64_t n_prompt,
                                         const speed_depth_t *depth, int64_t *n_reuse_p);

/* Evicts every prefix cache entry (no-op when the cache is off): their blocks go back to the
 * pools, except those live sequences share. */
void speed_engine_prefix_cache_clear(speed_engine_t *engine);

/* ---- KV transfer (canonical layout, docs/design.md §4) -------------------------
 * The sequence's KV as a host buffer: for each layer 0..L-1, for each block i of the layer's
 * entries (ceil(n_entries(layer) / B) blocks), K then V, each [B][n_kv_heads][head_dim] in
 * the cache dtype. n_entries(layer) = n_prompt + n_generated for layers < C, and
 * min(A + T, n_prompt) + n_generated for layers >= C. Slots of a last partial block past
 * the entries are carried as they are (zero in a fresh pool). */

/* Bytes speed_engine_seq_kv_export writes now (0 while nothing is stored); for a reserved
 * sequence (AWAIT_KV), the bytes speed_engine_seq_kv_import expects.
 * Returns SPEED_OK or SPEED_ERR_NOT_FOUND. */
speed_status_t speed_engine_seq_kv_size(const speed_engine_t *engine, speed_seq_id_t seq, size_t *bytes_p);

/* Copies the sequence's KV into buf (host memory of `size` >= speed_engine_seq_kv_size bytes).
 * Valid between steps, for a sequence that finished its prefill (AWAIT_TOKEN or DECODE).
 * Returns SPEED_OK, SPEED_ERR_NOT_FOUND, SPEED_ERR_INVALID_ARGUMENT (state, size), or a
 * backend status. */
speed_status_t speed_engine_seq_kv_export(speed_engine_t *engine, speed_seq_id_t seq, void *buf, size_t size);

/* Fills a reserved sequence (state AWAIT_KV) with the prompt KV exported by an engine with the
 * same model, cache dtype, B and sequence depth (n_generated 0: size must be exactly what
 * export of the n_prompt prompt tokens writes). The sequence then waits for its first token.
 * Returns SPEED_OK, SPEED_ERR_NOT_FOUND, SPEED_ERR_INVALID_ARGUMENT (state or size mismatch),
 * or a backend status. */
speed_status_t speed_engine_seq_kv_import(speed_engine_t *engine, speed_seq_id_t seq, const void *buf, size_t size);

/* The prefill side of a partial transfer to a decode node that holds the first n_skip prompt
 * positions (its n_cached; n_skip <= the first tail position): the bytes of / a copy of the
 * sequence's units from the block holding its first entry past them, per layer
 * (speed_kv_from_t). Like speed_engine_seq_kv_size / _kv_export otherwise (export: after the
 * prefill). Returns SPEED_OK, SPEED_ERR_NOT_FOUND, SPEED_ERR_INVALID_ARGUMENT (n_skip, state,
 * size; logged), or a backend status. */
speed_status_t speed_engine_seq_kv_size_from(const speed_engine_t *engine, speed_seq_id_t seq, int64_t n_skip,
                                             size_t *bytes_p);
speed_status_t speed_engine_seq_kv_export_from(speed_engine_t *engine, speed_seq_id_t seq, int64_t n_skip, void *buf,
                                               size_t size);

/* For a transfer that wrote the prompt KV into the sequence's blocks: marks a reserved
 * sequence's prompt entries present (as import does). When the cache has a host mirror the
 * transfer wrote the mirror's blocks (speed_kv_cache_xfer_block_addr): the prompt entries are
 * first copied mirror -> pool (speed_kv_cache_stage_in, backend copies: call this on the
 * engine's thread, after the transfer's notify). Returns SPEED_OK, SPEED_ERR_NOT_FOUND,
 * SPEED_ERR_INVALID_ARGUMENT (not AWAIT_KV) or the backend's status (the sequence then still
 * awaits its KV). */
speed_status_t speed_engine_seq_kv_ready(speed_engine_t *engine, speed_seq_id_t seq);

/* The engine's cache and the sequence's handle in it, for block addresses
 * (speed_kv_cache_block_addr). The handle is valid until the sequence is removed. */
speed_kv_cache_t *speed_engine_kv_cache(speed_engine_t *engine);
speed_status_t speed_engine_seq_kv(const speed_engine_t *engine, speed_seq_id_t seq, speed_kv_seq_t **kv_seq_p);

#endif /* SPEED_ENGINE_H */
