/* speed_engine and its prefix cache (prefix_cache.h, docs/prefix-cache.md): a new sequence's KV
 * reservation reuses a cached prefix, a finished sequence's KV goes to the cache.
 *
 * A hit of n_reuse positions fills the new sequence's KV for those positions exactly as a cold
 * prefill would have (same model, same entries, bit for bit): layers < C for every position,
 * all layers for its anchors. Then the sequence starts prefilling at position n_reuse: the
 * step computes only the suffix, at the sequence's own depth (forward.c needs nothing else:
 * a chunk at positions p.. attends entries 0 .. p, cached or not).
 *
 * Share or copy. Lower-pool blocks fully covered by the hit are shared (no copy, refcounted,
 * read-only) when both the cached sequence and the new one run at a depth >= the pools' split:
 * their lower-pool blocks then hold only position-indexed entries. Below the split a
 * sequence keeps compact entries (anchors, tail, generated) in the first slots of its
 * lower-pool blocks in layers C..split-1, which it writes: such blocks cannot be shared, so
 * the entries are copied. A partial last block, upper-pool layers (position-indexed ones when
 * C > split, and the anchors' compact entries) are always copied into the new sequence's own
 * blocks.
 */
#include "engine_internal.h"
#include "log.h"

static speed_prefix_depth_t prefix_depth(const speed_engine_t *e, const engine_seq_t *s) {
    return (speed_prefix_depth_t){
        .n_layers = e->n_layers, .prefill_layers = s->depth.prefill_layers, .a = s->a, .tail_start = s->tail_start};
}

/* Reserves the sequence's blocks, sharing n_shared lower blocks of src; evicts cache entries
 * (never the pinned one of the hit) while the pools lack blocks. */
static speed_status_t reserve_evicting(speed_engine_t *e, engine_seq_t *s, int64_t n_full, int64_t n_compact,
                                       const speed_kv_seq_t *src, int64_t n_shared) {
    for (;;) {
        speed_status_t st =
            speed_kv_cache_seq_create_shared(e->kv, s->depth.prefill_layers, n_full, n_compact, src, n_shared, &s->kv);
        if (st != SPEED_ERR_CAPACITY || !e->prefix || !speed_prefix_cache_evict_one(e->prefix)) return st;
    }
}

/* Copies positions [0, n_reuse) of every layer the new sequence needs from the hit, except the
 * shared lower-pool blocks. Entry indices are equal on both sides: below either C a position is
 * its own entry; at or above C only anchors (compact index = position) are reused, and a cached
 * position read at or above its C is an anchor or of a sequence with no shallow token (compact
 * index = position again). */
static speed_status_t copy_hit(speed_engine_t *e, engine_seq_t *s, const speed_prefix_hit_t *hit, int64_t n_shared) {
    const int split = speed_kv_cache_split_layer(e->kv), B = speed_kv_cache_block_tokens(e->kv);
    const int64_t h = hit->n_reuse;
    for (int l = 0; l < e->n_layers; l++) {
        int64_t end = l < s->depth.prefill_layers ? h : (h < s->a ? h : s->a);
        int64_t begin = l < split ? n_shared * B : 0;
        if (end <= begin) continue;
        SPEED_ASSERT(l < hit->depth.prefill_layers || end <= hit->depth.a || hit->depth.a == hit->depth.tail_start);
        SPEED_CHECK(speed_kv_cache_seq_copy_entries(e->kv, s->kv, begin, hit->seq, begin, l, end - begin));
    }
    return SPEED_OK;
}

/* A running sequence's prompt, its full blocks only, as a cache entry that shares them (no copy:
 * the sequence never writes them again, it writes from position n_prompt on, in later blocks)
 * plus a copy of its anchors' upper-layer entries. Only at a depth >= the split (else its
 * lower-pool blocks hold compact entries it still writes) and with shallow tokens (else its
 * upper layers would all have to be copied). Best effort: no eviction for it, and a failure
 * just leaves it out (logged by the callee). */
static void publish(speed_engine_t *e, engine_seq_t *s) {
    const int split = speed_kv_cache_split_layer(e->kv), B = speed_kv_cache_block_tokens(e->kv);
    const int64_t k = s->n_prompt / B, n = k * B;
    if (s->depth.prefill_layers < split || s->a == s->tail_start || k == 0) return;
    /* an entry serving all of it already (this sequence was a hit of it, or a twin) */
    speed_prefix_depth_t probe = prefix_depth(e, s);
    probe.tail_start = n;
    if (speed_prefix_cache_peek(e->prefix, s->prompt, n, &probe) == n) return;
    engine_seq_t entry = {.depth = s->depth, .n_prompt = n, .a = s->a < n ? s->a : n, .tail_start = s->tail_start};
    speed_prefix_hit_t src = {.seq = s->kv, .depth = prefix_depth(e, s), .n_reuse = n};
    if (speed_kv_cache_seq_create_shared(e->kv, s->depth.prefill_layers, n, entry.a, s->kv, k, &entry.kv) != SPEED_OK)
        return;
    if (copy_hit(e, &entry, &src, k) != SPEED_OK ||
        speed_kv_cache_seq_set_entries(e->kv, entry.kv, n, entry.a) != SPEED_OK) {
        speed_kv_cache_seq_destroy(e->kv, entry.kv);
        return;
    }
    speed_prefix_depth_t d = prefix_depth(e, &entry);
    (void)speed_prefix_cache_insert(e->prefix, entry.kv, s->prompt, n, &d); /* owns entry.kv now */
}

/* Publishes the prompts of the sequences whose prefill finished since the last call: a request
 * sharing a system prompt with a running one hits it. Called where allocation is allowed (seq
 * add), not in the step. */
static void publish_running(speed_engine_t *e) {
    for (int i = 0; i < e->n_seqs; i++) {
        engine_seq_t *s = &e->seqs[e->order[i]];
        if (s->published || !s->prompt || (s->state != SPEED_SEQ_AWAIT_TOKEN && s->state != SPEED_SEQ_DECODE)) continue;
        s->published = true;
        publish(e, s);
    }
}

speed_status_t speed_engine_kv_reserve_(speed_engine_t *e, engine_seq_t *s, const int32_t *ids, int64_t n_full,
                                        int64_t n_compact) {
    speed_prefix_hit_t hit = {0};
    speed_prefix_depth_t mine = prefix_depth(e, s);
    if (e->prefix && ids) publish_running(e);
    if (!e->prefix || !ids || !speed_prefix_cache_lookup(e->prefix, ids, s->n_prompt, &mine, &hit))
        return reserve_evicting(e, s, n_full, n_compact, NULL, 0);

    const int split = speed_kv_cache_split_layer(e->kv), B = speed_kv_cache_block_tokens(e->kv);
    int64_t n_shared = 0;
    if (s->depth.prefill_layers >= split && hit.depth.prefill_layers >= split) n_shared = hit.n_reuse / B;
    speed_status_t st = reserve_evicting(e, s, n_full, n_compact, hit.seq, n_shared);
    if (st == SPEED_OK) st = copy_hit(e, s, &hit, n_shared);
    if (st == SPEED_OK) {
        /* n_reuse <= tail_start: the compact space holds the anchors among them */
        int64_t n_c = hit.n_reuse < s->a ? hit.n_reuse : s->a;
        st = speed_kv_cache_seq_set_entries(e->kv, s->kv, hit.n_reuse, n_c);
    }
    if (st != SPEED_OK) {
        speed_kv_cache_seq_destroy(e->kv, s->kv); /* NULL (reservation failed) is a no-op */
        s->kv = NULL;
    } else {
        s->n_prefilled = hit.n_reuse;
        s->n_cached = hit.n_reuse;
        s->n_shared_blocks = n_shared;
        e->n_cached_tokens += (uint64_t)hit.n_reuse;
        SPEED_DEBUG(SPEED_SUBSYS_ENGINE, "engine: prefix cache hit: %lld of %lld prompt tokens (%lld blocks shared)",
                    (long long)hit.n_reuse, (long long)s->n_prompt, (long long)n_shared);
    }
    speed_prefix_cache_release(e->prefix, &hit);
    return st;
}

void speed_engine_kv_release_(speed_engine_t *e, engine_seq_t *s) {
    bool done = s->state == SPEED_SEQ_AWAIT_TOKEN || s->state == SPEED_SEQ_DECODE;
    if (e->prefix && s->prompt && done) {
        speed_prefix_depth_t d = prefix_depth(e, s);
        /* errors are logged by the cache, and the KV is freed either way: nothing to undo */
        (void)speed_prefix_cache_insert(e->prefix, s->kv, s->prompt, s->n_prompt + s->n_generated, &d);
    } else {
        speed_kv_cache_seq_destroy(e->kv, s->kv);
    }
    s->kv = NULL;
}

speed_status_t speed_engine_prefix_probe(speed_engine_t *e, const int32_t *ids, int64_t n_prompt,
                                         const speed_depth_t *depth, int64_t *n_reuse_p) {
    if (!e || !ids || !n_reuse_p || n_prompt < 1) {
        SPEED_ERROR(SPEED_SUBSYS_ENGINE, "engine: prefix probe without engine, ids or output, or an empty prompt");
        return SPEED_ERR_INVALID_ARGUMENT;
    }
    *n_reuse_p = 0;
    speed_depth_t d;
    SPEED_CHECK(speed_engine_depth_resolve_(e, depth, &d));
    if (!e->prefix) return SPEED_OK;
    /* the classes seq_new would give it */
    engine_seq_t s = {.depth = d, .n_prompt = n_prompt};
    speed_engine_seq_classes_(&s);
    speed_prefix_depth_t mine = prefix_depth(e, &s);
    *n_reuse_p = speed_prefix_cache_peek(e->prefix, ids, n_prompt, &mine);
    return SPEED_OK;
}

/* The prefill side of a partial transfer: `from` of a sequence whose first n_skip prompt
 * positions the receiver already holds. */
static speed_status_t skip_from(const speed_engine_t *e, speed_seq_id_t id, int64_t n_skip, engine_seq_t **s_p,
                                speed_kv_from_t *from_p) {
    engine_seq_t *s = speed_engine_find_(e, id);
    if (!s) {
        SPEED_ERROR(SPEED_SUBSYS_ENGINE, "engine: no sequence %lld", (long long)id);
        return SPEED_ERR_NOT_FOUND;
    }
    if (n_skip < 0 || n_skip > s->tail_start) {
        SPEED_ERROR(SPEED_SUBSYS_ENGINE, "engine: sequence %lld: cannot skip %lld positions (its tail starts at %lld)",
                    (long long)id, (long long)n_skip, (long long)s->tail_start);
        return SPEED_ERR_INVALID_ARGUMENT;
    }
    engine_seq_t probe = *s;
    probe.n_cached = n_skip;
    *from_p = speed_engine_seq_uncached_(&probe);
    *s_p = s;
    return SPEED_OK;
}

speed_status_t speed_engine_seq_kv_size_from(const speed_engine_t *e, speed_seq_id_t id, int64_t n_skip,
                                             size_t *bytes_p) {
    engine_seq_t *s;
    speed_kv_from_t from;
    SPEED_CHECK(skip_from(e, id, n_skip, &s, &from));
    *bytes_p = speed_kv_cache_seq_wire_bytes_from(e->kv, s->kv, from, speed_kv_seq_entries(s->kv, 0),
                                                  speed_kv_seq_entries(s->kv, e->n_layers - 1));
    return SPEED_OK;
}

speed_status_t speed_engine_seq_kv_export_from(speed_engine_t *e, speed_seq_id_t id, int64_t n_skip, void *buf,
                                               size_t size) {
    engine_seq_t *s;
    speed_kv_from_t from;
    SPEED_CHECK(skip_from(e, id, n_skip, &s, &from));
    if (s->state != SPEED_SEQ_AWAIT_TOKEN && s->state != SPEED_SEQ_DECODE) {
        SPEED_ERROR(SPEED_SUBSYS_ENGINE, "engine: sequence %lld has not finished its prefill: nothing to export",
                    (long long)id);
        return SPEED_ERR_INVALID_ARGUMENT;
    }
    return speed_kv_cache_seq_export_from(e->kv, s->kv, from, buf, size);
}

void speed_engine_prefix_cache_clear(speed_engine_t *e) {
    if (e && e->prefix) speed_prefix_cache_clear(e->prefix);
}
