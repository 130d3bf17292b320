/* KV descriptor: destroy, self-check, compact byte encoding (kv_transfer.h).
 *
 * Wire format, little endian, every field fixed width:
 *   u32 magic "SKVD"  u16 version (2)  u16 flags (0)
 *   u8 transport  u8 dtype  u16 reserved (0)
 *   i32 block_tokens n_kv_heads head_dim head_begin head_end model_kv_heads
 *   u64 unit_bytes total_bytes epoch lease_deadline_ms cookie
 *   u32 worker_addr_len, bytes
 *   u32 n_regions, { u64 base, u64 length, u32 rkey_len, bytes }
 *   u32 n_pools,   { u32 region, u64 base, u64 block_stride, u32 n_blocks, i32 table[n_blocks] }
 *   u32 n_layers,  { u32 pool, u64 offset, i64 entries }
 *   u32 crc32 (IEEE, reflected, of every byte before it)
 *
 * Versions: 1 had no model_kv_heads (its writers only knew the full head range); 2 adds it for
 * tensor-parallel resharding. A reader refuses any version but its own: prefill and decode nodes
 * of one deployment run one build (the notify message is versioned the same way).
 */
#include <string.h>

#include "alloc.h"
#include "kv_transfer.h"
#include "log.h"

#define DESC_MAGIC 0x44564b53u /* "SKVD" */
#define DESC_VERSION 2

const char *speed_kv_transport_name(speed_kv_transport_t t) {
    switch (t) {
    case SPEED_KV_TRANSPORT_SHM: return "shm";
    case SPEED_KV_TRANSPORT_TCP: return "tcp";
    }
    return "?";
}

void speed_kv_desc_destroy(speed_kv_desc_t *d) {
    if (!d) return;
    speed_free(d->worker_addr);
    for (uint32_t i = 0; d->regions && i < d->n_regions; i++) speed_free(d->regions[i].rkey);
    speed_free(d->regions);
    for (uint32_t i = 0; d->pools && i < d->n_pools; i++) speed_free(d->pools[i].table);
    speed_free(d->pools);
    speed_free(d->layers);
    speed_free(d);
}

static uint32_t crc32_ieee(const uint8_t *p, size_t n) {
    uint32_t c = 0xffffffffu;
    for (size_t i = 0; i < n; i++) {
        c ^= p[i];
        for (int k = 0; k < 8; k++) c = (c >> 1) ^ (0xedb88320u & (0u - (c & 1u)));
    }
    return ~c;
}

/* a + b, or false on overflow */
static bool add_u64(uint64_t a, uint64_t b, uint64_t *r) {
    if (a > UINT64_MAX - b) return false;
    *r = a + b;
    return true;
}

static bool mul_u64(uint64_t a, uint64_t b, uint64_t *r) {
    if (a && b > UINT64_MAX / a) return false;
    *r = a * b;
    return true;
}

#define BAD(...)                                                   \
    do {                                                           \
        SPEED_ERROR(SPEED_SUBSYS_NET, "kv descriptor: " __VA_ARGS__); \
        return SPEED_ERR_FORMAT;                                   \
    } while (0)

speed_status_t speed_kv_desc_check(const speed_kv_desc_t *d) {
    if (!d) BAD("NULL");
    if (d->transport != SPEED_KV_TRANSPORT_SHM && d->transport != SPEED_KV_TRANSPORT_TCP)
        BAD("unknown transport %d", (int)d->transport);
    if ((unsigned)d->dtype >= SPEED_DTYPE_COUNT) BAD("unknown dtype %d", (int)d->dtype);
    if (!d->worker_addr || d->worker_addr_len == 0 || d->worker_addr_len > SPEED_KV_DESC_MAX_BLOB)
        BAD("worker address of %u bytes", d->worker_addr_len);
    if (d->block_tokens < 1 || d->n_kv_heads < 1 || d->head_dim < 1 || d->block_tokens > 1 << 16 ||
        d->n_kv_heads > 1 << 16 || d->head_dim > 1 << 16)
        BAD("shape B %d, heads %d, head_dim %d out of range", d->block_tokens, d->n_kv_heads, d->head_dim);
    if (d->head_begin < 0 || d->head_end <= d->head_begin || d->head_end - d->head_begin != d->n_kv_heads)
        BAD("head range [%d, %d) does not hold %d heads", d->head_begin, d->head_end, d->n_kv_heads);
    if (d->model_kv_heads < 0 || (d->model_kv_heads && d->model_kv_heads < d->head_end) || d->model_kv_heads > 1 << 16)
        BAD("head range [%d, %d) of a model with %d KV heads", d->head_begin, d->head_end, d->model_kv_heads);
    uint64_t token_bytes = 2ull * (uint64_t)d->n_kv_heads * (uint64_t)d->head_dim * speed_dtype_size(d->dtype);
    if (d->unit_bytes != token_bytes * (uint64_t)d->block_tokens)
        BAD("unit of %llu bytes, the shape gives %llu", (unsigned long long)d->unit_bytes,
            (unsigned long long)(token_bytes * (uint64_t)d->block_tokens));
    if (d->n_regions < 1 || d->n_regions > SPEED_KV_DESC_MAX_REGIONS || !d->regions) BAD("%u regions", d->n_regions);
    if (d->n_pools < 1 || d->n_pools > SPEED_KV_DESC_MAX_POOLS || !d->pools) BAD("%u pools", d->n_pools);
    if (d->n_layers < 1 || d->n_layers > SPEED_KV_DESC_MAX_LAYERS || !d->layers) BAD("%u layers", d->n_layers);
    for (uint32_t r = 0; r < d->n_regions; r++) {
        const speed_kv_desc_region_t *g = &d->regions[r];
        uint64_t end;
        if (!g->rkey || g->rkey_len == 0 || g->rkey_len > SPEED_KV_DESC_MAX_BLOB) BAD("region %u: rkey of %u bytes", r, g->rkey_len);
        if (g->length == 0 || !add_u64(g->base, g->length, &end)) BAD("region %u: bad extent", r);
    }
    for (uint32_t p = 0; p < d->n_pools; p++) {
        const speed_kv_desc_pool_t *pl = &d->pools[p];
        if (pl->region >= d->n_regions) BAD("pool %u: region %u of %u", p, pl->region, d->n_regions);
        if (pl->n_blocks > SPEED_KV_DESC_MAX_BLOCKS || (pl->n_blocks && !pl->table)) BAD("pool %u: %u blocks", p, pl->n_blocks);
        if (pl->block_stride < d->unit_bytes) BAD("pool %u: block stride %llu < unit", p, (unsigned long long)pl->block_stride);
    }
    uint64_t total = 0;
    for (uint32_t l = 0; l < d->n_layers; l++) {
        const speed_kv_desc_layer_t *ly = &d->layers[l];
        if (ly->pool >= d->n_pools) BAD("layer %u: pool %u of %u", l, ly->pool, d->n_pools);
        const speed_kv_desc_pool_t *pl = &d->pools[ly->pool];
        const speed_kv_desc_region_t *g = &d->regions[pl->region];
        if (ly->entries < 0) BAD("layer %u: %lld entries", l, (long long)ly->entries);
        if (ly->offset > pl->block_stride - d->unit_bytes) BAD("layer %u: offset %llu past the block", l, (unsigned long long)ly->offset);
        uint64_t nb = ((uint64_t)ly->entries + (uint64_t)d->block_tokens - 1) / (uint64_t)d->block_tokens;
        if (nb > pl->n_blocks) BAD("layer %u: %llu blocks, the pool table has %u", l, (unsigned long long)nb, pl->n_blocks);
        for (uint64_t i = 0; i < nb; i++) {
            uint64_t a, end;
            if (pl->table[i] < 0 || !mul_u64((uint64_t)pl->table[i], pl->block_stride, &a) || !add_u64(a, pl->base, &a) ||
                !add_u64(a, ly->offset, &a) || !add_u64(a, d->unit_bytes, &end) || a < g->base ||
                end > g->base + g->length)
                BAD("layer %u block %llu (id %d) lies outside region %u", l, (unsigned long long)i, pl->table[i], pl->region);
        }
        uint64_t bytes;
        if (!mul_u64((uint64_t)ly->entries, token_bytes, &bytes) || !add_u64(total, bytes, &total)) BAD("byte total overflows");
    }
    if (total != d->total_bytes)
        BAD("total of %llu bytes, the layers give %llu", (unsigned long long)d->total_bytes, (unsigned long long)total);
    return SPEED_OK;
}

/* ---- encoding ------------------------------------------------------------------------------ */

typedef struct {
    uint8_t *p;
    size_t n, cap;
} wbuf_t;

static void put_bytes(wbuf_t *w, const void *src, size_t n) {
    if (w->p) memcpy(w->p + w->n, src, n);
    w->n += n;
}
static void put_u8(wbuf_t *w, uint8_t v) { put_bytes(w, &v, 1); }
static void put_u16(wbuf_t *w, uint16_t v) {
    uint8_t b[2] = {(uint8_t)v, (uint8_t)(v >> 8)};
    put_bytes(w, b, 2);
}
static void put_u32(wbuf_t *w, uint32_t v) {
    uint8_t b[4];
    for (int i = 0; i < 4; i++) b[i] = (uint8_t)(v >> (8 * i));
    put_bytes(w, b, 4);
}
static void put_u64(wbuf_t *w, uint64_t v) {
    uint8_t b[8];
    for (int i = 0; i < 8; i++) b[i] = (uint8_t)(v >> (8 * i));
    put_bytes(w, b, 8);
}

/* Writes everything but the CRC; with w->p NULL only counts. */
static void desc_write(wbuf_t *w, const speed_kv_desc_t *d) {
    put_u32(w, DESC_MAGIC);
    put_u16(w, DESC_VERSION);
    put_u16(w, 0);
    put_u8(w, (uint8_t)d->transport);
    put_u8(w, (uint8_t)d->dtype);
    put_u16(w, 0);
    put_u32(w, (uint32_t)d->block_tokens);
    put_u32(w, (uint32_t)d->n_kv_heads);
    put_u32(w, (uint32_t)d->head_dim);
    put_u32(w, (uint32_t)d->head_begin);
    put_u32(w, (uint32_t)d->head_end);
    put_u32(w, (uint32_t)d->model_kv_heads);
    put_u64(w, d->unit_bytes);
    put_u64(w, d->total_bytes);
    put_u64(w, d->epoch);
    put_u64(w, d->lease_deadline_ms);
    put_u64(w, d->cookie);
    put_u32(w, d->worker_addr_len);
    put_bytes(w, d->worker_addr, d->worker_addr_len);
    put_u32(w, d->n_regions);
    for (uint32_t r = 0; r < d->n_regions; r++) {
        put_u64(w, d->regions[r].base);
        put_u64(w, d->regions[r].length);
        put_u32(w, d->regions[r].rkey_len);
        put_bytes(w, d->regions[r].rkey, d->regions[r].rkey_len);
    }
    put_u32(w, d->n_pools);
    for (uint32_t p = 0; p < d->n_pools; p++) {
        put_u32(w, d->pools[p].region);
        put_u64(w, d->pools[p].base);
        put_u64(w, d->pools[p].block_stride);
        put_u32(w, d->pools[p].n_blocks);
        for (uint32_t i = 0; i < d->pools[p].n_blocks; i++) put_u32(w, (uint32_t)d->pools[p].table[i]);
    }
    put_u32(w, d->n_layers);
    for (uint32_t l = 0; l < d->n_layers; l++) {
        put_u32(w, d->layers[l].pool);
        put_u64(w, d->layers[l].offset);
        put_u64(w, (uint64_t)d->layers[l].entries);
    }
}

speed_status_t speed_kv_desc_encode(const speed_kv_desc_t *d, uint8_t **buf_p, size_t *len_p) {
    if (!d || !buf_p || !len_p) {
        SPEED_ERROR(SPEED_SUBSYS_NET, "kv descriptor encode: NULL argument");
        return SPEED_ERR_INVALID_ARGUMENT;
    }
    if (speed_kv_desc_check(d) != SPEED_OK) return SPEED_ERR_INVALID_ARGUMENT;
    wbuf_t w = {0};
    desc_write(&w, d);
    size_t n = w.n + 4;
    w.p = speed_malloc(n);
    if (!w.p) {
        SPEED_ERROR(SPEED_SUBSYS_NET, "kv descriptor encode: out of memory (%zu bytes)", n);
        return SPEED_ERR_NO_MEMORY;
    }
    w.n = 0;
    desc_write(&w, d);
    put_u32(&w, crc32_ieee(w.p, w.n));
    *buf_p = w.p;
    *len_p = w.n;
    return SPEED_OK;
}

/* ---- decoding ------------------------------------------------------------------------------ */

typedef struct {
    const uint8_t *p;
    size_t n, off;
    bool short_read;
} rbuf_t;

static const uint8_t *take(rbuf_t *r, size_t n) {
    if (r->short_read || n > r->n - r->off) {
        r->short_read = true;
        return NULL;
    }
    const uint8_t *s = r->p + r->off;
    r->off += n;
    return s;
}
static uint64_t get_le(rbuf_t *r, int n) {
    const uint8_t *s = take(r, (size_t)n);
    uint64_t v = 0;
    for (int i = 0; s && i < n; i++) v |= (uint64_t)s[i] << (8 * i);
    return v;
}
static uint8_t get_u8(rbuf_t *r) { return (uint8_t)get_le(r, 1); }
static uint16_t get_u16(rbuf_t *r) { return (uint16_t)get_le(r, 2); }
static uint32_t get_u32(rbuf_t *r) { return (uint32_t)get_le(r, 4); }
static uint64_t get_u64(rbuf_t *r) { return get_le(r, 8); }

/* A copy of n bytes, or NULL (short read / no memory: *nomem set). */
static uint8_t *get_blob(rbuf_t *r, uint32_t n, bool *nomem) {
    const uint8_t *s = take(r, n);
    if (!s) return NULL;
    uint8_t *b = speed_malloc(n ? n : 1);
    if (!b) {
        *nomem = true;
        return NULL;
    }
    memcpy(b, s, n);
    return b;
}

#define FAIL(st_, ...)                                                \
    do {                                                              \
        if ((st_) == SPEED_ERR_FORMAT) SPEED_ERROR(SPEED_SUBSYS_NET, "kv descriptor: " __VA_ARGS__); \
        st = (st_);                                                   \
        goto fail;                                                    \
    } while (0)

speed_status_t speed_kv_desc_decode(const void *buf, size_t len, speed_kv_desc_t **desc_p) {
    if ((!buf && len) || !desc_p) {
        SPEED_ERROR(SPEED_SUBSYS_NET, "kv descriptor decode: NULL argument");
        return SPEED_ERR_INVALID_ARGUMENT;
    }
    speed_status_t st = SPEED_OK;
    if (len < 8) {
        SPEED_ERROR(SPEED_SUBSYS_NET, "kv descriptor: %zu bytes is too short", len);
        return SPEED_ERR_FORMAT;
    }
    rbuf_t r = {buf, len - 4, 0, false};
    const uint8_t *b = buf;
    uint32_t crc = (uint32_t)b[len - 4] | (uint32_t)b[len - 3] << 8 | (uint32_t)b[len - 2] << 16 |
                   (uint32_t)b[len - 1] << 24;
    uint32_t magic = get_u32(&r);
    if (magic != DESC_MAGIC) {
        SPEED_ERROR(SPEED_SUBSYS_NET, "kv descriptor: bad magic 0x%08x", magic);
        return SPEED_ERR_FORMAT;
    }
    if (crc32_ieee(b, len - 4) != crc) {
        SPEED_ERROR(SPEED_SUBSYS_NET, "kv descriptor: checksum mismatch (%zu bytes: corrupt or truncated)", len);
        return SPEED_ERR_FORMAT;
    }
    uint16_t version = get_u16(&r);
    if (version != DESC_VERSION) {
        SPEED_ERROR(SPEED_SUBSYS_NET, "kv descriptor: version %u, this build reads %d", version, DESC_VERSION);
        return SPEED_ERR_FORMAT;
    }
    (void)get_u16(&r);
    bool nomem = false;
    speed_kv_desc_t *d = speed_calloc(1, sizeof *d);
    if (!d) return SPEED_ERR_NO_MEMORY;
    d->transport = (speed_kv_transport_t)get_u8(&r);
    d->dtype = (speed_dtype_t)get_u8(&r);
    (void)get_u16(&r);
    d->block_tokens = (int32_t)get_u32(&r);
    d->n_kv_heads = (int32_t)get_u32(&r);
    d->head_dim = (int32_t)get_u32(&r);
    d->head_begin = (int32_t)get_u32(&r);
    d->head_end = (int32_t)get_u32(&r);
    d->model_kv_heads = (int32_t)get_u32(&r);
    d->unit_bytes = get_u64(&r);
    d->total_bytes = get_u64(&r);
    d->epoch = get_u64(&r);
    d->lease_deadline_ms = get_u64(&r);
    d->cookie = get_u64(&r);
    d->worker_addr_len = get_u32(&r);
    if (d->worker_addr_len == 0 || d->worker_addr_len > SPEED_KV_DESC_MAX_BLOB)
        FAIL(SPEED_ERR_FORMAT, "worker address of %u bytes", d->worker_addr_len);
    d->worker_addr = get_blob(&r, d->worker_addr_len, &nomem);
    if (nomem) FAIL(SPEED_ERR_NO_MEMORY, "");
    uint32_t n = get_u32(&r);
    if (n < 1 || n > SPEED_KV_DESC_MAX_REGIONS) FAIL(SPEED_ERR_FORMAT, "%u regions", n);
    if (!(d->regions = speed_calloc(n, sizeof *d->regions))) FAIL(SPEED_ERR_NO_MEMORY, "");
    d->n_regions = n;
    for (uint32_t i = 0; i < n && !r.short_read; i++) {
        d->regions[i].base = get_u64(&r);
        d->regions[i].length = get_u64(&r);
        d->regions[i].rkey_len = get_u32(&r);
        if (d->regions[i].rkey_len == 0 || d->regions[i].rkey_len > SPEED_KV_DESC_MAX_BLOB)
            FAIL(SPEED_ERR_FORMAT, "region %u: rkey of %u bytes", i, d->regions[i].rkey_len);
        d->regions[i].rkey = get_blob(&r, d->regions[i].rkey_len, &nomem);
        if (nomem) FAIL(SPEED_ERR_NO_MEMORY, "");
    }
    n = get_u32(&r);
    if (!r.short_read && (n < 1 || n > SPEED_KV_DESC_MAX_POOLS)) FAIL(SPEED_ERR_FORMAT, "%u pools", n);
    if (!r.short_read) {
        if (!(d->pools = speed_calloc(n, sizeof *d->pools))) FAIL(SPEED_ERR_NO_MEMORY, "");
        d->n_pools = n;
    }
    for (uint32_t i = 0; i < d->n_pools && !r.short_read; i++) {
        speed_kv_desc_pool_t *pl = &d->pools[i];
        pl->region = get_u32(&r);
        pl->base = get_u64(&r);
        pl->block_stride = get_u64(&r);
        uint32_t nb = get_u32(&r);
        if (nb > SPEED_KV_DESC_MAX_BLOCKS || (size_t)nb * 4 > r.n - r.off) FAIL(SPEED_ERR_FORMAT, "pool %u: %u blocks", i, nb);
        if (!(pl->table = speed_malloc((size_t)(nb ? nb : 1) * sizeof(int32_t)))) FAIL(SPEED_ERR_NO_MEMORY, "");
        pl->n_blocks = nb;
        for (uint32_t k = 0; k < nb; k++) pl->table[k] = (int32_t)get_u32(&r);
    }
    n = get_u32(&r);
    if (!r.short_read && (n < 1 || n > SPEED_KV_DESC_MAX_LAYERS)) FAIL(SPEED_ERR_FORMAT, "%u layers", n);
    if (!r.short_read) {
        if (!(d->layers = speed_calloc(n, sizeof *d->layers))) FAIL(SPEED_ERR_NO_MEMORY, "");
        d->n_layers = n;
    }
    for (uint32_t i = 0; i < d->n_layers && !r.short_read; i++) {
        d->layers[i].pool = get_u32(&r);
        d->layers[i].offset = get_u64(&r);
        d->layers[i].entries = (int64_t)get_u64(&r);
    }
    if (r.short_read) FAIL(SPEED_ERR_FORMAT, "truncated (%zu bytes)", len);
    if (r.off != r.n) FAIL(SPEED_ERR_FORMAT, "%zu trailing bytes", r.n - r.off);
    if (speed_kv_desc_check(d) != SPEED_OK) { /* logged there */
        st = SPEED_ERR_FORMAT;
        goto fail;
    }
    *desc_p = d;
    return SPEED_OK;
fail:
    if (st == SPEED_ERR_NO_MEMORY) SPEED_ERROR(SPEED_SUBSYS_NET, "kv descriptor: out of memory");
    speed_kv_desc_destroy(d);
    return st;
}
