/* speed_node conversions between protobuf messages and the engine's / transfer's types: see
 * node_proto.h. */
#include "node_proto.h"

#include <stdint.h>
#include <stdio.h>
#include <string.h>

#include "alloc.h"
#include "clock.h"
#include "log.h"

/* ---- request parameters ----------------------------------------------------------------------- */

speed_depth_request_t speed_node_depth_request_from_proto(const Speed__V1__SpeedParams *sp) {
    speed_depth_request_t r = {0};
    if (!sp) return r;
    if (sp->prefill_layers_opt_case == SPEED__V1__SPEED_PARAMS__PREFILL_LAYERS_OPT_PREFILL_LAYERS)
        r.prefill_layers = speed_cutoff_layers(sp->prefill_layers);
    else if (sp->prefill_layers_opt_case == SPEED__V1__SPEED_PARAMS__PREFILL_LAYERS_OPT_PREFILL_FRACTION)
        r.prefill_layers = speed_cutoff_fraction(sp->prefill_fraction);
    r.has_anchors = sp->anchors_opt_case == SPEED__V1__SPEED_PARAMS__ANCHORS_OPT_ANCHORS;
    r.anchors = sp->anchors;
    r.has_tail = sp->tail_opt_case == SPEED__V1__SPEED_PARAMS__TAIL_OPT_TAIL;
    r.tail = sp->tail;
    return r;
}

speed_status_t speed_node_depth_from_proto(const Speed__V1__SpeedParams *sp, int n_layers, speed_depth_t node_depth,
                                           speed_depth_t *depth_p, char *err, size_t err_size) {
    speed_depth_request_t r = speed_node_depth_request_from_proto(sp);
    return speed_depth_resolve(&r, &node_depth, n_layers, depth_p, err, err_size);
}

speed_status_t speed_node_depth_resume(speed_depth_t *depth, int64_t resume_tokens, int64_t n_prompt, char *err,
                                       size_t err_size) {
    if (resume_tokens < 0 || (resume_tokens > 0 && resume_tokens >= n_prompt) ||
        (int64_t)depth->tail + resume_tokens > INT32_MAX) {
        snprintf(err, err_size, "resume_tokens %lld must lie in 0..%lld (below the prompt's %lld tokens)",
                 (long long)resume_tokens, (long long)(n_prompt > 0 ? n_prompt - 1 : 0), (long long)n_prompt);
        return SPEED_ERR_INVALID_ARGUMENT;
    }
    depth->tail += (int)resume_tokens;
    return SPEED_OK;
}

speed_status_t speed_node_gen_from_proto(const Speed__V1__SamplingParams *sp, speed_batch_gen_t *gen_p, char *err,
                                         size_t err_size) {
    speed_batch_gen_t g;
    memset(&g, 0, sizeof g);
    g.sampling = speed_sampling_default_params();
    g.max_tokens = 16;
    if (sp) {
        g.max_tokens = sp->max_tokens;
        g.sampling.temperature = sp->temperature;
        g.sampling.top_p = sp->top_p == 0.0f ? 1.0f : sp->top_p;
        g.sampling.top_k = sp->top_k;
        g.sampling.seed =
            sp->seed_opt_case == SPEED__V1__SAMPLING_PARAMS__SEED_OPT_SEED ? sp->seed : (uint64_t)speed_clock_wall_ms();
        g.sampling.n_top_logprobs = sp->top_logprobs;
        g.stop = (const char *const *)sp->stop;
        g.n_stop = sp->n_stop;
        g.ignore_eos = sp->ignore_eos;
    }
    if (g.max_tokens < 1) {
        snprintf(err, err_size, "max_tokens %lld must be >= 1", (long long)g.max_tokens);
        return SPEED_ERR_INVALID_ARGUMENT;
    }
    if (speed_sampling_params_validate(&g.sampling) != SPEED_OK) {
        snprintf(err, err_size, "%s", speed_log_last_error());
        return SPEED_ERR_INVALID_ARGUMENT;
    }
    *gen_p = g;
    return SPEED_OK;
}

/* ---- tokens ----------------------------------------------------------------------------------- */

void speed_node_token_to_proto(const speed_batch_token_t *t, int n_top, Speed__V1__Token *out,
                               Speed__V1__TopLogprob *storage, Speed__V1__TopLogprob **ptrs) {
    speed__v1__token__init(out);
    out->id = t->id;
    out->logprob = t->logprob;
    out->text = (char *)(t->text ? t->text : "");
    if (n_top > t->n_top) n_top = t->n_top;
    if (n_top < 0) n_top = 0;
    for (int i = 0; i < n_top; i++) {
        speed__v1__top_logprob__init(&storage[i]);
        storage[i].id = t->top[i].id;
        storage[i].logprob = t->top[i].logprob;
        ptrs[i] = &storage[i];
    }
    out->n_top_logprobs = (size_t)n_top;
    out->top_logprobs = n_top ? ptrs : NULL;
}

void speed_node_token_from_proto(const Speed__V1__Token *t, speed_batch_token_t *out) {
    memset(out, 0, sizeof *out);
    out->id = t->id;
    out->logprob = t->logprob;
    size_t n = t->n_top_logprobs < SPEED_SAMPLER_MAX_TOP_LOGPROBS ? t->n_top_logprobs : SPEED_SAMPLER_MAX_TOP_LOGPROBS;
    for (size_t i = 0; i < n; i++) {
        out->top[i].id = t->top_logprobs[i]->id;
        out->top[i].logprob = t->top_logprobs[i]->logprob;
    }
    out->n_top = (int)n;
}

/* ---- KV descriptor ↔ proto -------------------------------------------------------------------- */

speed_status_t speed_node_kv_desc_to_proto(const speed_kv_desc_t *d, const speed_depth_t *depth,
                                           Speed__V1__KvDescriptor *out) {
    speed__v1__kv_descriptor__init(out);
    out->worker_address.data = d->worker_addr;
    out->worker_address.len = d->worker_addr_len;
    out->transport = (char *)speed_kv_transport_name(d->transport);
    out->regions = speed_calloc(d->n_regions ? d->n_regions : 1, sizeof *out->regions);
    out->pools = speed_calloc(d->n_pools ? d->n_pools : 1, sizeof *out->pools);
    out->layers = speed_calloc(d->n_layers ? d->n_layers : 1, sizeof *out->layers);
    Speed__V1__KvRegion *regions = speed_calloc(d->n_regions ? d->n_regions : 1, sizeof *regions);
    Speed__V1__KvPool *pools = speed_calloc(d->n_pools ? d->n_pools : 1, sizeof *pools);
    Speed__V1__KvLayer *layers = speed_calloc(d->n_layers ? d->n_layers : 1, sizeof *layers);
    if (!out->regions || !out->pools || !out->layers || !regions || !pools || !layers) {
        speed_free(regions), speed_free(pools), speed_free(layers);
        speed_node_kv_desc_proto_cleanup(out);
        return SPEED_ERR_NO_MEMORY;
    }
    /* slot 0 owns each element array, even when its count is 0 (cleanup frees it from there) */
    out->regions[0] = regions, out->pools[0] = pools, out->layers[0] = layers;
    for (uint32_t i = 0; i < d->n_regions; i++) {
        speed__v1__kv_region__init(&regions[i]);
        regions[i].addr = d->regions[i].base;
        regions[i].length = d->regions[i].length;
        regions[i].rkey.data = d->regions[i].rkey;
        regions[i].rkey.len = d->regions[i].rkey_len;
        out->regions[i] = &regions[i];
    }
    for (uint32_t i = 0; i < d->n_pools; i++) {
        speed__v1__kv_pool__init(&pools[i]);
        pools[i].region = d->pools[i].region;
        pools[i].block0_addr = d->pools[i].base;
        pools[i].block_bytes = d->pools[i].block_stride;
        pools[i].n_blocks = d->pools[i].n_blocks;
        pools[i].blocks = d->pools[i].table;
        out->pools[i] = &pools[i];
    }
    for (uint32_t i = 0; i < d->n_layers; i++) {
        speed__v1__kv_layer__init(&layers[i]);
        layers[i].pool = d->layers[i].pool;
        layers[i].offset = d->layers[i].offset;
        layers[i].entries = (uint64_t)d->layers[i].entries;
        layers[i].first_block = (uint64_t)d->layers[i].first_block;
        out->layers[i] = &layers[i];
    }
    out->n_regions = d->n_regions;
    out->n_pools = d->n_pools;
    out->n_layers = d->n_layers;
    out->block_tokens = (uint32_t)d->block_tokens;
    out->n_kv_heads = (uint32_t)d->n_kv_heads;
    out->head_dim = (uint32_t)d->head_dim;
    out->head_begin = (uint32_t)d->head_begin;
    out->head_end = (uint32_t)d->head_end;
    out->model_kv_heads = (uint32_t)d->model_kv_heads;
    out->dtype = (char *)speed_dtype_name(d->dtype);
    out->unit_bytes = d->unit_bytes;
    out->total_bytes = d->total_bytes;
    out->epoch = d->epoch;
    out->lease_ms = d->lease_ms > 0 ? (d->lease_ms > UINT32_MAX ? UINT32_MAX : (uint32_t)d->lease_ms) : 0;
    if (d->has_nonce) {
        out->nonce.data = (uint8_t *)d->nonce; /* borrowed: lives as long as the descriptor */
        out->nonce.len = sizeof d->nonce;
    }
    out->integrity = d->integrity;
    if (depth) {
        out->prefill_layers = depth->prefill_layers;
        out->anchors = depth->anchors;
        out->tail = depth->tail;
    }
    return SPEED_OK;
}

void speed_node_kv_desc_proto_cleanup(Speed__V1__KvDescriptor *out) {
    if (out->regions) speed_free(out->regions[0]);
    if (out->pools) speed_free(out->pools[0]);
    if (out->layers) speed_free(out->layers[0]);
    speed_free(out->regions);
    speed_free(out->pools);
    speed_free(out->layers);
    out->regions = NULL, out->pools = NULL, out->layers = NULL;
    out->n_regions = out->n_pools = out->n_layers = 0;
}

static void *dup_bytes(const void *p, size_t n) {
    void *q = speed_malloc(n ? n : 1);
    if (q && n) memcpy(q, p, n);
    return q;
}

speed_status_t speed_node_kv_desc_from_proto(const Speed__V1__KvDescriptor *in, speed_kv_desc_t **desc_p) {
    if (!in) return SPEED_ERR_INVALID_ARGUMENT;
    if (in->n_regions > SPEED_KV_DESC_MAX_REGIONS || in->n_pools > SPEED_KV_DESC_MAX_POOLS ||
        in->n_layers > SPEED_KV_DESC_MAX_LAYERS || in->worker_address.len > SPEED_KV_DESC_MAX_BLOB) {
        SPEED_ERROR(SPEED_SUBSYS_NET, "kv descriptor: too many regions, pools or layers");
        return SPEED_ERR_PEER_PROTOCOL;
    }
    speed_kv_desc_t *d = speed_calloc(1, sizeof *d);
    if (!d) return SPEED_ERR_NO_MEMORY;
    speed_status_t st = SPEED_ERR_NO_MEMORY;
    d->worker_addr = dup_bytes(in->worker_address.data, in->worker_address.len);
    d->worker_addr_len = (uint32_t)in->worker_address.len;
    d->regions = speed_calloc(in->n_regions ? in->n_regions : 1, sizeof *d->regions);
    d->pools = speed_calloc(in->n_pools ? in->n_pools : 1, sizeof *d->pools);
    d->layers = speed_calloc(in->n_layers ? in->n_layers : 1, sizeof *d->layers);
    if (!d->worker_addr || !d->regions || !d->pools || !d->layers) goto fail;
    d->n_regions = (uint32_t)in->n_regions;
    d->n_pools = (uint32_t)in->n_pools;
    d->n_layers = (uint32_t)in->n_layers;
    for (size_t i = 0; i < in->n_regions; i++) {
        const Speed__V1__KvRegion *r = in->regions[i];
        if (r->rkey.len > SPEED_KV_DESC_MAX_BLOB) {
            st = SPEED_ERR_PEER_PROTOCOL;
            goto fail;
        }
        d->regions[i].base = r->addr;
        d->regions[i].length = r->length;
        d->regions[i].rkey = dup_bytes(r->rkey.data, r->rkey.len);
        d->regions[i].rkey_len = (uint32_t)r->rkey.len;
        if (!d->regions[i].rkey) goto fail;
    }
    for (size_t i = 0; i < in->n_pools; i++) {
        const Speed__V1__KvPool *p = in->pools[i];
        if (p->n_blocks > SPEED_KV_DESC_MAX_BLOCKS) {
            st = SPEED_ERR_PEER_PROTOCOL;
            goto fail;
        }
        d->pools[i].region = p->region;
        d->pools[i].base = p->block0_addr;
        d->pools[i].block_stride = p->block_bytes;
        d->pools[i].n_blocks = (uint32_t)p->n_blocks;
        d->pools[i].table = dup_bytes(p->blocks, p->n_blocks * sizeof(int32_t));
        if (!d->pools[i].table) goto fail;
    }
    for (size_t i = 0; i < in->n_layers; i++) {
        d->layers[i].pool = in->layers[i]->pool;
        d->layers[i].offset = in->layers[i]->offset;
        d->layers[i].entries = (int64_t)in->layers[i]->entries;
        d->layers[i].first_block = (int64_t)in->layers[i]->first_block; /* checked below (desc_check) */
    }
    d->transport = SPEED_KV_TRANSPORT_SHM; /* NULL (none given): shm, the default */
    if (in->transport && speed_kv_transport_parse(in->transport, &d->transport) != SPEED_OK) {
        st = SPEED_ERR_PEER_PROTOCOL;
        goto fail;
    }
    if (!in->dtype || speed_dtype_parse(in->dtype, &d->dtype) != SPEED_OK) {
        st = SPEED_ERR_PEER_PROTOCOL;
        goto fail;
    }
    d->block_tokens = (int32_t)in->block_tokens;
    d->n_kv_heads = (int32_t)in->n_kv_heads;
    d->head_dim = (int32_t)in->head_dim;
    d->head_begin = (int32_t)in->head_begin;
    d->head_end = (int32_t)in->head_end;
    d->model_kv_heads = (int32_t)in->model_kv_heads;
    d->unit_bytes = in->unit_bytes;
    d->total_bytes = in->total_bytes;
    d->epoch = in->epoch;
    d->lease_ms = (int64_t)in->lease_ms;
    d->received_ns = speed_clock_mono_ns(); /* the lease counts from here, on this host's clock */
    if (in->nonce.len != 0 && in->nonce.len != sizeof d->nonce) {
        SPEED_ERROR(SPEED_SUBSYS_NET, "kv descriptor: a nonce of %zu bytes (%zu expected)", in->nonce.len,
                    sizeof d->nonce);
        st = SPEED_ERR_FORMAT;
        goto fail;
    }
    if (in->nonce.len) {
        memcpy(d->nonce, in->nonce.data, sizeof d->nonce);
        d->has_nonce = true;
    }
    d->integrity = in->integrity;
    if (d->integrity && !d->has_nonce) {
        SPEED_ERROR(SPEED_SUBSYS_NET, "kv descriptor: integrity mode without a nonce");
        st = SPEED_ERR_FORMAT;
        goto fail;
    }
    st = speed_kv_desc_check(d);
    if (st != SPEED_OK) goto fail;
    *desc_p = d;
    return SPEED_OK;
fail:
    if (st == SPEED_ERR_PEER_PROTOCOL) SPEED_ERROR(SPEED_SUBSYS_NET, "kv descriptor: malformed");
    speed_kv_desc_destroy(d);
    return st;
}
