/* speed_engine_step: one batched SPEED forward pass (docs/design.md §1).
 *
 * Rows. The step's rows are the tokens it computes: each scheduled sequence contributes a
 * contiguous run in position order (a prefill chunk, or its one queued token). Row r has its
 * absolute position, its entry index in layers < C (= position) and, when it is full depth
 * (anchor, tail or generated), its compact entry index in layers >= C.
 *
 * Residual stream. x holds the rows still alive. Going up, a sequence's shallow rows die at its
 * layer C, so the set only shrinks: when it does, the survivors are gathered
 * (speed_op_get_rows) into the other buffer and every later op computes fewer rows. Upper
 * layers of a long SPEED prompt therefore cost A + T rows, not n.
 *
 * Layer l, for the alive rows: rmsnorm, q/k/v, RoPE at the absolute positions, kv_store at each
 * row's slot in its entry space, attention over entries 0 .. e (causal: entries are in position
 * order in both spaces, and a row's own chunk is stored before attention reads it), o-proj
 * accumulated into x, rmsnorm, gate/up, SwiGLU, down accumulated into x.
 *
 * Logits: for each sequence whose step ends its prompt, or decodes, its last row (always full
 * depth, so alive at the top) goes through the final norm and lm_head.
 *
 * State changes (prefill positions, queued tokens, KV entry counts) are made only after every
 * op succeeded, so a failed step can simply be retried.
 */
#include <string.h>

#include "clock.h"
#include "engine_internal.h"
#include "log.h"

static bool row_full_depth(const engine_seq_t *s, int64_t pos) { return pos < s->a || pos >= s->tail_start; }

static int32_t compact_index(const engine_seq_t *s, int64_t pos) {
    return (int32_t)(pos < s->a ? pos : s->a + (pos - s->tail_start));
}

/* Entries of the compact space after the first n_prompt_done prompt tokens (+ generated). */
static int64_t compact_count(const engine_seq_t *s, int64_t n_done) {
    if (n_done <= s->a) return n_done;
    return s->a + (n_done > s->tail_start ? n_done - s->tail_start : 0);
}

/* Chooses the step's rows: decode rows first, then prefill chunks, in order of addition. */
static int schedule(speed_engine_t *e, int *n_items_p) {
    int rows = 0, n_items = 0;
    const int R = e->p.max_step_tokens;
    for (int pass = 0; pass < 2; pass++) {
        for (int i = 0; i < e->n_seqs && rows < R; i++) {
            engine_seq_t *s = &e->seqs[e->order[i]];
            engine_batch_item_t *it = &e->items[n_items];
            if (pass == 0 && s->state == SPEED_SEQ_DECODE) {
                *it = (engine_batch_item_t){.slot = e->order[i],
                                            .row_begin = rows,
                                            .n_rows = 1,
                                            .pos_begin = s->n_prompt + s->n_generated,
                                            .prefill = false,
                                            .output = true};
            } else if (pass == 1 && s->state == SPEED_SEQ_PREFILL) {
                int64_t n = s->n_prompt - s->n_prefilled;
                if (n > e->p.prefill_chunk) n = e->p.prefill_chunk;
                if (n > R - rows) n = R - rows;
                *it = (engine_batch_item_t){.slot = e->order[i],
                                            .row_begin = rows,
                                            .n_rows = (int)n,
                                            .pos_begin = s->n_prefilled,
                                            .prefill = true,
                                            .output = s->n_prefilled + n == s->n_prompt};
            } else {
                continue;
            }
            rows += it->n_rows;
            n_items++;
        }
    }
    *n_items_p = n_items;
    return rows;
}

static speed_mat_t rows_of(float *data, int64_t n_rows, int64_t n_cols) {
    return speed_mat(data, SPEED_DTYPE_F32, n_rows, n_cols);
}

/* The kv view of layer l this rank reads and writes: its heads of the shared pool. */
static speed_kv_layer_t rank_kv_layer(const engine_rank_t *rk, int l) {
    speed_kv_layer_t kv = speed_kv_cache_layer(rk->e->kv, l);
    if (rk->n_kv_heads == kv.n_kv_heads) return kv;
    kv.slot_heads = kv.n_kv_heads;
    kv.k_base = (char *)kv.k_base + (size_t)rk->kv_head0 * kv.head_dim * speed_dtype_size(kv.dtype);
    kv.n_kv_heads = rk->n_kv_heads;
    return kv;
}

/* x += out · wᵀ for a projection whose input is this rank's shard (wo, w_down): one rank
 * accumulates straight into x; several sum their partial products first. */
static speed_status_t row_sharded_matmul(engine_rank_t *rk, speed_mat_t x, speed_mat_t in, speed_mat_t w) {
    if (!rk->comm) return speed_op_matmul(rk->be, x, in, w, true);
    speed_mat_t part = rows_of(rk->part, x.n_rows, x.n_cols);
    SPEED_CHECK(speed_op_matmul(rk->be, part, in, w, false));
    SPEED_CHECK(speed_backend_synchronize(rk->be));
    SPEED_CHECK(speed_comm_all_reduce_sum(rk->comm, rk->part, x.n_rows * x.n_cols));
    return speed_op_add(rk->be, x, x, part);
}

/* Runs the layers for the rk->act rows (rk->n_act of them, x holding their residual). */
static speed_status_t run_layers(engine_rank_t *rk, int n_items) {
    speed_engine_t *e = rk->e;
    speed_backend_t *be = rk->be;
    const int H = e->hidden, nh = rk->n_heads, qd = nh * e->head_dim, kvd = rk->n_kv_heads * e->head_dim;
    const int F = rk->ffn;
    int n_act = rk->n_act;

    for (int l = 0; l < e->n_layers && n_act > 0; l++) {
        /* rows that die at this layer: shallow rows of sequences with C == l */
        int n_keep = 0;
        for (int i = 0; i < n_act; i++) {
            int r = rk->act[i];
            const engine_seq_t *s = &e->seqs[e->items[e->row_item[r]].slot];
            if (l < s->depth.prefill_layers || e->entry_compact[r] >= 0) rk->gather[n_keep++] = i;
        }
        if (n_keep < n_act) {
            if (n_keep == 0) {
                n_act = 0;
                break;
            }
            SPEED_CHECK(speed_op_get_rows(be, rows_of(rk->x2, n_keep, H), rows_of(rk->x, n_act, H), rk->gather));
            float *t = rk->x;
            rk->x = rk->x2;
            rk->x2 = t;
            for (int i = 0; i < n_keep; i++) rk->act[i] = rk->act[rk->gather[i]];
            n_act = n_keep;
        }

        const speed_kv_layer_t kv = rank_kv_layer(rk, l);
        for (int i = 0; i < n_act; i++) {
            int r = rk->act[i];
            const engine_seq_t *s = &e->seqs[e->items[e->row_item[r]].slot];
            int32_t entry = l < s->depth.prefill_layers ? e->entry_full[r] : e->entry_compact[r];
            rk->act_pos[i] = e->pos[r];
            rk->slots[i] = speed_kv_seq_slot(s->kv, l, entry);
            rk->n_visible[i] = entry + 1;
            rk->tables[i] = speed_kv_seq_block_table(s->kv, l);
        }

        const engine_layer_t *w = &rk->layers[l];
        speed_mat_t x = rows_of(rk->x, n_act, H), h = rows_of(rk->h, n_act, H);
        speed_mat_t q = rows_of(rk->q, n_act, qd), k = rows_of(rk->k, n_act, kvd), v = rows_of(rk->v, n_act, kvd);
        speed_mat_t att = rows_of(rk->att, n_act, qd);
        speed_mat_t gate = rows_of(rk->gate, n_act, F), up = rows_of(rk->up, n_act, F);
        speed_attn_rows_t arows = {.n_rows = n_act, .block_table = rk->tables, .n_visible = rk->n_visible};

        SPEED_CHECK(speed_op_rmsnorm(be, h, x, w->attn_norm, e->eps));
        SPEED_CHECK(speed_op_matmul(be, q, h, w->wq, false));
        SPEED_CHECK(speed_op_matmul(be, k, h, w->wk, false));
        SPEED_CHECK(speed_op_matmul(be, v, h, w->wv, false));
        SPEED_CHECK(speed_op_rope(be, q, nh, e->head_dim, rk->act_pos, &e->rope));
        SPEED_CHECK(speed_op_rope(be, k, rk->n_kv_heads, e->head_dim, rk->act_pos, &e->rope));
        SPEED_CHECK(speed_op_kv_store(be, &kv, k, v, rk->slots));
        SPEED_CHECK(speed_op_attention(be, att, q, &kv, nh, &arows, e->attn_scale));
        SPEED_CHECK(row_sharded_matmul(rk, x, att, w->wo));
        SPEED_CHECK(speed_op_rmsnorm(be, h, x, w->ffn_norm, e->eps));
        SPEED_CHECK(speed_op_matmul(be, gate, h, w->w_gate, false));
        SPEED_CHECK(speed_op_matmul(be, up, h, w->w_up, false));
        SPEED_CHECK(speed_op_swiglu(be, gate, gate, up));
        SPEED_CHECK(row_sharded_matmul(rk, x, gate, w->w_down));

        /* every rank stored its heads of layer l before the all-reduce above returned */
        if (e->p.layer_cb && rk->rank == 0) {
            bool synced = false;
            for (int it = 0; it < n_items; it++) {
                const engine_batch_item_t *item = &e->items[it];
                if (!item->prefill) continue;
                const engine_seq_t *s = &e->seqs[item->slot];
                int64_t end = item->pos_begin + item->n_rows;
                int64_t done, total, before;
                if (l < s->depth.prefill_layers) {
                    done = end, total = s->n_prompt, before = item->pos_begin;
                } else {
                    done = compact_count(s, end), total = compact_count(s, s->n_prompt);
                    before = compact_count(s, item->pos_begin);
                }
                if (done == before) continue; /* stored nothing in this layer */
                if (!synced) {
                    SPEED_CHECK(speed_backend_synchronize(be));
                    synced = true;
                }
                SPEED_CHECK(e->p.layer_cb(e->p.layer_cb_user, s->id, l, done, total));
            }
        }
    }
    rk->n_act = n_act;
    return SPEED_OK;
}

speed_status_t speed_engine_rank_forward_(engine_rank_t *rk, int n_items, int n_rows) {
    speed_engine_t *e = rk->e;
    speed_backend_t *be = rk->be;
    const int H = e->hidden;
    for (int r = 0; r < n_rows; r++) rk->act[r] = r;
    rk->n_act = n_rows;
    SPEED_CHECK(speed_op_embed(be, rows_of(rk->x, n_rows, H), rk->tok_embeddings, e->tok));
    SPEED_CHECK(run_layers(rk, n_items));
    /* Logits for the last row of each finishing sequence. With several ranks each computes its
     * slice of the vocabulary straight into rank 0's buffer (host memory: CPU ranks), then they
     * meet at a barrier (a zero-length all-reduce) before rank 0 reads it. */
    int n_out = 0, i = 0;
    for (int it = 0; it < n_items; it++) {
        const engine_batch_item_t *item = &e->items[it];
        if (!item->output) continue;
        int last = item->row_begin + item->n_rows - 1;
        while (i < rk->n_act && rk->act[i] != last) i++;
        SPEED_ASSERT(i < rk->n_act); /* the last row is full depth: alive at the top */
        rk->out_rows[n_out++] = i;
    }
    if (n_out > 0) {
        speed_mat_t h = rows_of(rk->h, n_out, H);
        speed_mat_t logits = {e->ranks[0].logits_dev + rk->vocab0, SPEED_DTYPE_F32, n_out, rk->lm_head.n_rows,
                              e->vocab};
        SPEED_CHECK(speed_op_get_rows(be, h, rows_of(rk->x, rk->n_act, H), rk->out_rows));
        SPEED_CHECK(speed_op_rmsnorm(be, h, h, rk->norm, e->eps));
        SPEED_CHECK(speed_op_matmul(be, logits, h, rk->lm_head, false));
    }
    SPEED_CHECK(speed_backend_synchronize(be));
    if (rk->comm) SPEED_CHECK(speed_comm_all_reduce_sum(rk->comm, NULL, 0));
    if (rk->rank == 0 && n_out > 0 && e->p.output_topk > 0) { /* k values per output cross to the host */
        const int k = e->p.output_topk;
        SPEED_CHECK(speed_op_topk(be, speed_mat(rk->topk_vals_dev, SPEED_DTYPE_F32, n_out, k), rk->topk_ids_dev,
                                  rk->lse_dev, speed_mat(rk->logits_dev, SPEED_DTYPE_F32, n_out, e->vocab), k));
        SPEED_CHECK(speed_backend_download(be, e->topk_vals, rk->topk_vals_dev, (size_t)n_out * k * sizeof(float)));
        SPEED_CHECK(speed_backend_download(be, e->topk_ids, rk->topk_ids_dev, (size_t)n_out * k * sizeof(int32_t)));
        SPEED_CHECK(speed_backend_download(be, e->lse, rk->lse_dev, (size_t)n_out * sizeof(float)));
    } else if (rk->rank == 0 && n_out > 0) {
        SPEED_CHECK(speed_backend_download(be, e->logits, rk->logits_dev, (size_t)n_out * e->vocab * sizeof(float)));
    }
    return speed_backend_synchronize(be);
}

/* Runs the forward pass on every rank: ranks >= 1 on their threads, rank 0 here. */
static speed_status_t forward_all(speed_engine_t *e, int n_items, int n_rows) {
    if (e->n_ranks == 1) return speed_engine_rank_forward_(&e->ranks[0], n_items, n_rows);
    if (e->comm_broken) { /* every rank is idle between steps: safe to remake the group */
        speed_comm_group_t *g;
        SPEED_CHECK(speed_comm_group_cpu_create(e->n_ranks, &g));
        speed_comm_group_destroy(e->comm_group);
        e->comm_group = g;
        for (int r = 0; r < e->n_ranks; r++) e->ranks[r].comm = speed_comm_group_rank(g, r);
        e->comm_broken = false;
    }
    pthread_mutex_lock(&e->tp_lock);
    e->tp_n_items = n_items;
    e->tp_n_rows = n_rows;
    e->tp_done = 0;
    e->tp_gen++;
    pthread_cond_broadcast(&e->tp_start);
    pthread_mutex_unlock(&e->tp_lock);

    engine_rank_t *rk0 = &e->ranks[0];
    rk0->st = speed_engine_rank_forward_(rk0, n_items, n_rows);
    if (rk0->st != SPEED_OK) speed_comm_abort(rk0->comm); /* no rank may wait for us */

    pthread_mutex_lock(&e->tp_lock);
    while (e->tp_done < e->n_ranks - 1) pthread_cond_wait(&e->tp_finished, &e->tp_lock);
    pthread_mutex_unlock(&e->tp_lock);
    /* the first failure is the cause; the others saw SPEED_ERR_CANCELLED from the abort */
    speed_status_t st = SPEED_OK;
    for (int r = 0; r < e->n_ranks; r++) {
        if (e->ranks[r].st == SPEED_OK) continue;
        e->comm_broken = true;
        if (st == SPEED_OK || st == SPEED_ERR_CANCELLED) st = e->ranks[r].st;
    }
    return st;
}

speed_status_t speed_engine_step(speed_engine_t *e, speed_engine_step_result_t *result_p) {
    if (!e || !result_p) {
        SPEED_ERROR(SPEED_SUBSYS_ENGINE, "engine: step without engine or result pointer");
        return SPEED_ERR_INVALID_ARGUMENT;
    }
    uint64_t t0 = speed_clock_mono_ns();
    memset(result_p, 0, sizeof *result_p);
    result_p->outputs = e->outputs;

    int n_items;
    int n_rows = schedule(e, &n_items);
    if (n_rows == 0) return SPEED_OK;

    /* per-row host arrays */
    int n_prefill_rows = 0;
    for (int it = 0; it < n_items; it++) {
        const engine_batch_item_t *item = &e->items[it];
        const engine_seq_t *s = &e->seqs[item->slot];
        for (int i = 0; i < item->n_rows; i++) {
            int r = item->row_begin + i;
            int64_t pos = item->pos_begin + i;
            e->tok[r] = item->prefill ? s->prompt[pos] : s->pending;
            e->pos[r] = (int32_t)pos;
            e->row_item[r] = it;
            e->entry_full[r] = (int32_t)pos;
            e->entry_compact[r] = row_full_depth(s, pos) ? compact_index(s, pos) : -1;
        }
        if (item->prefill) n_prefill_rows += item->n_rows;
    }

    speed_status_t st = forward_all(e, n_items, n_rows);
    if (st != SPEED_OK) {
        SPEED_ERROR(SPEED_SUBSYS_ENGINE, "engine: step of %d rows failed: %s (no sequence advanced)", n_rows,
                    speed_status_string(st));
        return st;
    }

    /* commit */
    uint64_t t1 = speed_clock_mono_ns(), dt = t1 - t0;
    int n_out = 0;
    for (int it = 0; it < n_items; it++) {
        const engine_batch_item_t *item = &e->items[it];
        engine_seq_t *s = &e->seqs[item->slot];
        if (item->prefill) {
            s->n_prefilled += item->n_rows;
            s->prefill_ns += dt;
        } else {
            s->n_generated++;
            s->decode_ns += dt;
        }
        int64_t n_full = s->n_prefilled + s->n_generated;
        int64_t n_compact = compact_count(s, s->n_prefilled) + s->n_generated;
        speed_status_t set = speed_kv_cache_seq_set_entries(e->kv, s->kv, n_full, n_compact);
        SPEED_ASSERT(set == SPEED_OK); /* within the reservation by construction */
        if (item->output) {
            const int k = e->p.output_topk;
            e->outputs[n_out] = (speed_engine_output_t){
                .seq = s->id,
                .logits = k ? NULL : e->logits + (size_t)n_out * e->vocab,
                .topk_ids = k ? e->topk_ids + (size_t)n_out * k : NULL,
                .topk_logits = k ? e->topk_vals + (size_t)n_out * k : NULL,
                .n_topk = k,
                .lse = k ? e->lse[n_out] : 0.0f,
                .position = item->pos_begin + item->n_rows - 1,
                .first = item->prefill,
            };
            n_out++;
            if (item->prefill) s->first_output_ns = t1 - s->t_add_ns;
            s->state = SPEED_SEQ_AWAIT_TOKEN;
        }
    }
    e->n_steps++;
    e->n_prefill_tokens += (uint64_t)n_prefill_rows;
    e->n_decode_tokens += (uint64_t)(n_rows - n_prefill_rows);
    e->step_ns += dt;
    result_p->n_outputs = n_out;
    result_p->n_seqs = n_items;
    result_p->n_prefill_rows = n_prefill_rows;
    result_p->n_decode_rows = n_rows - n_prefill_rows;
    result_p->ns = dt;
    return SPEED_OK;
}
