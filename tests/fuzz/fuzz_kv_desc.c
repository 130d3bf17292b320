/* Fuzzes the KV descriptor a prefill node receives (in Prefill requests; the router gets it
 * in Reserve replies): the protobuf KvDescriptor, unpacked and converted by
 * speed_node_kv_desc_from_proto, whose last step is speed_kv_desc_check (transfer/kv_desc.c).
 * A descriptor that passes is then checked here independently, in 128-bit arithmetic, for
 * what the check promises: every unit a transfer would put (pool base + block id * stride +
 * layer offset, unit_bytes long, for each block the layer's entries need) lies inside the
 * pool's region; each layer's first_block lies in 0..its block count; and total_bytes is the
 * layers' entries from their first blocks on (a partial transfer) times the token bytes. It is also
 * converted back (speed_node_kv_desc_to_proto), packed, unpacked and converted again, and
 * must come back equal.
 *
 * Input: the KvDescriptor's wire bytes. */
#include <stdint.h>
#include <string.h>

#include "alloc.h"
#include "dtype.h"
#include "fuzz_util.h"
#include "kv_transfer.h"
#include "node_proto.h"
#include "speed_proto.h"

typedef unsigned __int128 u128;

int LLVMFuzzerInitialize(int *argc, char ***argv) {
    (void)argc, (void)argv;
    fz_init();
    return 0;
}

static void check_addresses(const speed_kv_desc_t *d) {
    u128 token_bytes = (u128)2 * (u128)d->n_kv_heads * (u128)d->head_dim * speed_dtype_size(d->dtype);
    FZ_ASSERT((u128)d->unit_bytes == token_bytes * (u128)d->block_tokens);
    u128 total = 0;
    for (uint32_t l = 0; l < d->n_layers; l++) {
        const speed_kv_desc_layer_t *ly = &d->layers[l];
        FZ_ASSERT(ly->pool < d->n_pools && ly->entries >= 0);
        const speed_kv_desc_pool_t *pl = &d->pools[ly->pool];
        FZ_ASSERT(pl->region < d->n_regions);
        const speed_kv_desc_region_t *g = &d->regions[pl->region];
        uint64_t nb = ((uint64_t)ly->entries + (uint64_t)d->block_tokens - 1) / (uint64_t)d->block_tokens;
        FZ_ASSERT(nb <= pl->n_blocks);
        for (uint64_t i = 0; i < nb; i++) {
            FZ_ASSERT(pl->table[i] >= 0);
            u128 a = (u128)pl->base + (u128)(uint64_t)pl->table[i] * pl->block_stride + ly->offset;
            FZ_ASSERT(a >= g->base && a + d->unit_bytes <= (u128)g->base + g->length);
        }
        FZ_ASSERT(ly->first_block >= 0 && (uint64_t)ly->first_block <= nb);
        u128 skipped = (u128)(uint64_t)ly->first_block * (u128)(uint64_t)d->block_tokens;
        u128 sent = (u128)(uint64_t)ly->entries > skipped ? (u128)(uint64_t)ly->entries - skipped : 0;
        total += sent * token_bytes;
    }
    FZ_ASSERT(total == d->total_bytes);
}

static void check_same(const speed_kv_desc_t *a, const speed_kv_desc_t *b) {
    FZ_ASSERT(a->worker_addr_len == b->worker_addr_len && !memcmp(a->worker_addr, b->worker_addr, a->worker_addr_len));
    FZ_ASSERT(a->transport == b->transport && a->dtype == b->dtype);
    FZ_ASSERT(a->n_regions == b->n_regions && a->n_pools == b->n_pools && a->n_layers == b->n_layers);
    for (uint32_t i = 0; i < a->n_regions; i++) {
        FZ_ASSERT(a->regions[i].base == b->regions[i].base && a->regions[i].length == b->regions[i].length);
        FZ_ASSERT(a->regions[i].rkey_len == b->regions[i].rkey_len &&
                  !memcmp(a->regions[i].rkey, b->regions[i].rkey, a->regions[i].rkey_len));
    }
    for (uint32_t i = 0; i < a->n_pools; i++) {
        FZ_ASSERT(a->pools[i].region == b->pools[i].region && a->pools[i].base == b->pools[i].base);
        FZ_ASSERT(a->pools[i].block_stride == b->pools[i].block_stride && a->pools[i].n_blocks == b->pools[i].n_blocks);
        FZ_ASSERT(!memcmp(a->pools[i].table, b->pools[i].table, a->pools[i].n_blocks * sizeof(int32_t)));
    }
    for (uint32_t i = 0; i < a->n_layers; i++)
        FZ_ASSERT(a->layers[i].pool == b->layers[i].pool && a->layers[i].offset == b->layers[i].offset &&
                  a->layers[i].entries == b->layers[i].entries && a->layers[i].first_block == b->layers[i].first_block);
    FZ_ASSERT(a->block_tokens == b->block_tokens && a->n_kv_heads == b->n_kv_heads && a->head_dim == b->head_dim);
    FZ_ASSERT(a->head_begin == b->head_begin && a->head_end == b->head_end && a->model_kv_heads == b->model_kv_heads);
    FZ_ASSERT(a->unit_bytes == b->unit_bytes && a->total_bytes == b->total_bytes && a->epoch == b->epoch);
    FZ_ASSERT(a->lease_ms == b->lease_ms && a->has_nonce == b->has_nonce && a->integrity == b->integrity);
    FZ_ASSERT(!a->has_nonce || !memcmp(a->nonce, b->nonce, sizeof a->nonce));
}

static void check_round_trip(const speed_kv_desc_t *d) {
    Speed__V1__KvDescriptor out;
    speed_depth_t depth = {.prefill_layers = 1, .anchors = 1, .tail = 1};
    if (speed_node_kv_desc_to_proto(d, &depth, &out) != SPEED_OK) return;
    uint8_t *bytes = NULL;
    size_t len = 0;
    if (speed_proto_pack(&out.base, &bytes, &len) == SPEED_OK) {
        Speed__V1__KvDescriptor *again = NULL;
        FZ_ASSERT(speed_proto_unpack(&speed__v1__kv_descriptor__descriptor, bytes, len, (ProtobufCMessage **)&again) ==
                  SPEED_OK);
        speed_kv_desc_t *d2 = NULL;
        speed_status_t st = speed_node_kv_desc_from_proto(again, &d2);
        FZ_ASSERT(st == SPEED_OK || st == SPEED_ERR_NO_MEMORY);
        if (d2) check_same(d, d2);
        speed_kv_desc_destroy(d2);
        speed_proto_free(&again->base);
        speed_free(bytes);
    }
    speed_node_kv_desc_proto_cleanup(&out);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    Speed__V1__KvDescriptor *in = NULL;
    if (speed_proto_unpack(&speed__v1__kv_descriptor__descriptor, data, size, (ProtobufCMessage **)&in) != SPEED_OK)
        return 0;
    speed_kv_desc_t *d = NULL;
    if (speed_node_kv_desc_from_proto(in, &d) == SPEED_OK) {
        FZ_ASSERT(speed_kv_desc_check(d) == SPEED_OK);
        check_addresses(d);
        check_round_trip(d);
        speed_kv_desc_destroy(d);
    }
    speed_proto_free(&in->base);
    return 0;
}
