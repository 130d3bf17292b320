/* speed.proto through protoc-c: every message type packed with every field set, unpacked
 * and compared; presence oneofs; garbage and truncated input; allocation failures. */
#include "check.h"
#include "speed_proto.h"
#include "alloc.h"

/* Pack, unpack, pack again: same bytes means every field survived (the comparisons below
 * check the values themselves for the interesting fields). */
static ProtobufCMessage *round_trip(const ProtobufCMessage *msg) {
    uint8_t *a = NULL, *b = NULL;
    size_t na = 0, nb = 0;
    CHECK_INT_EQ(speed_proto_pack(msg, &a, &na), SPEED_OK);
    ProtobufCMessage *out = NULL;
    CHECK_INT_EQ(speed_proto_unpack(msg->descriptor, a, na, &out), SPEED_OK);
    if (out) {
        CHECK_INT_EQ(speed_proto_pack(out, &b, &nb), SPEED_OK);
        CHECK_MSG(na == nb && memcmp(a, b, na) == 0, "%s: repacked bytes differ", msg->descriptor->name);
    }
    /* every field set means the encoding is not empty */
    CHECK_MSG(na > 0 || msg->descriptor->n_fields == 0, "%s packed to 0 bytes", msg->descriptor->name);
    speed_free(a);
    speed_free(b);
    return out;
}

static Speed__V1__SpeedParams speed_params(void) {
    Speed__V1__SpeedParams p = SPEED__V1__SPEED_PARAMS__INIT;
    p.prefill_layers_opt_case = SPEED__V1__SPEED_PARAMS__PREFILL_LAYERS_OPT_PREFILL_FRACTION;
    p.prefill_fraction = 0.7; /* a double: the decimal a client gave, to the last bit */
    p.anchors_opt_case = SPEED__V1__SPEED_PARAMS__ANCHORS_OPT_ANCHORS;
    p.anchors = 0; /* present and zero: the point of the oneof */
    p.tail_opt_case = SPEED__V1__SPEED_PARAMS__TAIL_OPT_TAIL;
    p.tail = 3;
    return p;
}

static char *stops[] = {"\n\n", "User:"};

static Speed__V1__SamplingParams sampling_params(void) {
    Speed__V1__SamplingParams s = SPEED__V1__SAMPLING_PARAMS__INIT;
    s.max_tokens = 128;
    s.temperature = 0.7f;
    s.top_p = 0.95f;
    s.top_k = 40;
    s.seed_opt_case = SPEED__V1__SAMPLING_PARAMS__SEED_OPT_SEED;
    s.seed = 0xfedcba9876543210ull;
    s.top_logprobs = 5;
    s.logprobs = 1;
    s.n_stop = 2;
    s.stop = stops;
    s.ignore_eos = 1;
    return s;
}

static void check_speed_params(const Speed__V1__SpeedParams *p) {
    CHECK(p != NULL);
    if (!p) return;
    CHECK_INT_EQ(p->prefill_layers_opt_case, SPEED__V1__SPEED_PARAMS__PREFILL_LAYERS_OPT_PREFILL_FRACTION);
    CHECK(p->prefill_fraction == 0.7);
    CHECK_INT_EQ(p->anchors_opt_case, SPEED__V1__SPEED_PARAMS__ANCHORS_OPT_ANCHORS);
    CHECK_INT_EQ(p->anchors, 0);
    CHECK_INT_EQ(p->tail_opt_case, SPEED__V1__SPEED_PARAMS__TAIL_OPT_TAIL);
    CHECK_INT_EQ(p->tail, 3);
}

static void check_sampling(const Speed__V1__SamplingParams *s) {
    CHECK(s != NULL);
    if (!s) return;
    CHECK_INT_EQ(s->max_tokens, 128);
    CHECK_NEAR(s->temperature, 0.7f, 0);
    CHECK_NEAR(s->top_p, 0.95f, 0);
    CHECK_INT_EQ(s->top_k, 40);
    CHECK_INT_EQ(s->seed_opt_case, SPEED__V1__SAMPLING_PARAMS__SEED_OPT_SEED);
    CHECK(s->seed == 0xfedcba9876543210ull);
    CHECK_INT_EQ(s->top_logprobs, 5);
    CHECK(s->logprobs);
    CHECK_INT_EQ(s->n_stop, 2);
    if (s->n_stop == 2) {
        CHECK_STR_EQ(s->stop[0], "\n\n");
        CHECK_STR_EQ(s->stop[1], "User:");
    }
    CHECK(s->ignore_eos);
}

/* A token with two alternatives. */
typedef struct {
    Speed__V1__TopLogprob alt[2];
    Speed__V1__TopLogprob *alts[2];
    Speed__V1__Token tok;
} token_t;

static void token_init(token_t *t, int id) {
    for (int i = 0; i < 2; i++) {
        Speed__V1__TopLogprob a = SPEED__V1__TOP_LOGPROB__INIT;
        a.id = id + i;
        a.logprob = -0.25f * (float)(i + 1);
        t->alt[i] = a;
        t->alts[i] = &t->alt[i];
    }
    Speed__V1__Token tok = SPEED__V1__TOKEN__INIT;
    tok.id = id;
    tok.logprob = -0.25f;
    tok.n_top_logprobs = 2;
    tok.top_logprobs = t->alts;
    tok.text = "h\xc3\xa9llo";
    t->tok = tok;
}

static void check_token(const Speed__V1__Token *t, int id) {
    CHECK(t != NULL);
    if (!t) return;
    CHECK_INT_EQ(t->id, id);
    CHECK_NEAR(t->logprob, -0.25, 0);
    CHECK_STR_EQ(t->text, "h\xc3\xa9llo");
    CHECK_INT_EQ(t->n_top_logprobs, 2);
    if (t->n_top_logprobs == 2) {
        CHECK_INT_EQ(t->top_logprobs[1]->id, id + 1);
        CHECK_NEAR(t->top_logprobs[1]->logprob, -0.5, 0);
    }
}

/* A descriptor for 4 layers in 2 pools with 3 blocks each. */
typedef struct {
    uint8_t rkey[25], worker[46];
    Speed__V1__KvRegion region;
    Speed__V1__KvRegion *regions[1];
    int32_t blocks[2][3];
    Speed__V1__KvPool pool[2];
    Speed__V1__KvPool *pools[2];
    Speed__V1__KvLayer layer[4];
    Speed__V1__KvLayer *layers[4];
    Speed__V1__KvDescriptor kv;
} kv_t;

static void kv_init(kv_t *k) {
    for (int i = 0; i < 25; i++) k->rkey[i] = (uint8_t)(i * 7);
    for (int i = 0; i < 46; i++) k->worker[i] = (uint8_t)(255 - i);
    Speed__V1__KvRegion r = SPEED__V1__KV_REGION__INIT;
    r.addr = 0x7f0000000000ull;
    r.length = 1ull << 32;
    r.rkey = (ProtobufCBinaryData){25, k->rkey};
    k->region = r;
    k->regions[0] = &k->region;
    for (int p = 0; p < 2; p++) {
        for (int b = 0; b < 3; b++) k->blocks[p][b] = p * 100 + b * 7;
        Speed__V1__KvPool pool = SPEED__V1__KV_POOL__INIT;
        pool.region = 0;
        pool.block0_addr = r.addr + (uint64_t)p * (1ull << 30);
        pool.block_bytes = 65536u * (p + 1);
        pool.n_blocks = 3;
        pool.blocks = k->blocks[p];
        k->pool[p] = pool;
        k->pools[p] = &k->pool[p];
    }
    for (int l = 0; l < 4; l++) {
        Speed__V1__KvLayer layer = SPEED__V1__KV_LAYER__INIT;
        layer.pool = l < 3 ? 0 : 1;
        layer.offset = (uint64_t)(l < 3 ? l : 0) * 16384;
        layer.entries = l < 3 ? 40 : 2;
        layer.first_block = l < 3 ? 2 : 0; /* a partial transfer: 32 of 40 cached below C */
        k->layer[l] = layer;
        k->layers[l] = &k->layer[l];
    }
    Speed__V1__KvDescriptor kv = SPEED__V1__KV_DESCRIPTOR__INIT;
    kv.worker_address = (ProtobufCBinaryData){46, k->worker};
    kv.transport = "shm";
    kv.n_regions = 1;
    kv.regions = k->regions;
    kv.n_pools = 2;
    kv.pools = k->pools;
    kv.n_layers = 4;
    kv.layers = k->layers;
    kv.block_tokens = 16;
    kv.n_kv_heads = 8;
    kv.head_dim = 128;
    kv.head_begin = 2;
    kv.head_end = 6;
    kv.dtype = "bf16";
    kv.unit_bytes = 16384;
    kv.total_bytes = 123456789;
    kv.epoch = 0x1234567890abcdefull;
    kv.lease_ms = 22500;
    kv.prefill_layers = 3;
    kv.anchors = 1;
    kv.tail = 1;
    k->kv = kv;
}

static void check_kv(const Speed__V1__KvDescriptor *kv) {
    CHECK(kv != NULL);
    if (!kv) return;
    CHECK_INT_EQ(kv->worker_address.len, 46);
    CHECK(kv->worker_address.len == 46 && kv->worker_address.data[45] == 255 - 45);
    CHECK_STR_EQ(kv->transport, "shm");
    CHECK_INT_EQ(kv->n_regions, 1);
    CHECK_INT_EQ(kv->n_pools, 2);
    CHECK_INT_EQ(kv->n_layers, 4);
    if (kv->n_regions == 1) {
        CHECK(kv->regions[0]->addr == 0x7f0000000000ull);
        CHECK(kv->regions[0]->length == 1ull << 32);
        CHECK(kv->regions[0]->rkey.len == 25 && kv->regions[0]->rkey.data[24] == 24 * 7);
    }
    if (kv->n_pools == 2) {
        CHECK_INT_EQ(kv->pools[1]->n_blocks, 3);
        CHECK_INT_EQ(kv->pools[1]->blocks[2], 114);
        CHECK(kv->pools[1]->block0_addr == 0x7f0000000000ull + (1ull << 30));
        CHECK_INT_EQ(kv->pools[1]->block_bytes, 131072);
    }
    if (kv->n_layers == 4) {
        CHECK_INT_EQ(kv->layers[3]->pool, 1);
        CHECK_INT_EQ(kv->layers[2]->offset, 32768);
        CHECK_INT_EQ(kv->layers[3]->entries, 2);
        CHECK_INT_EQ(kv->layers[1]->first_block, 2);
        CHECK_INT_EQ(kv->layers[3]->first_block, 0);
    }
    CHECK_INT_EQ(kv->block_tokens, 16);
    CHECK_INT_EQ(kv->n_kv_heads, 8);
    CHECK_INT_EQ(kv->head_dim, 128);
    CHECK_INT_EQ(kv->head_begin, 2);
    CHECK_INT_EQ(kv->head_end, 6);
    CHECK_STR_EQ(kv->dtype, "bf16");
    CHECK_INT_EQ(kv->unit_bytes, 16384);
    CHECK_INT_EQ(kv->total_bytes, 123456789);
    CHECK(kv->epoch == 0x1234567890abcdefull);
    CHECK_INT_EQ(kv->lease_ms, 22500);
    CHECK_INT_EQ(kv->prefill_layers, 3);
    CHECK_INT_EQ(kv->anchors, 1);
    CHECK_INT_EQ(kv->tail, 1);
}

static void test_all_messages(void) {
    Speed__V1__SpeedParams sp = speed_params();
    Speed__V1__SamplingParams sa = sampling_params();
    token_t tok;
    token_init(&tok, 9906);
    kv_t kv;
    kv_init(&kv);
    int32_t prompt[] = {128000, 9906, 11, 1917, -1, 2147483647};
    ProtobufCMessage *m;

    m = round_trip(&sp.base);
    check_speed_params((Speed__V1__SpeedParams *)m);
    speed_proto_free(m);

    /* presence: an unset oneof stays unset */
    Speed__V1__SpeedParams empty_sp = SPEED__V1__SPEED_PARAMS__INIT;
    uint8_t *bytes;
    size_t n;
    CHECK_INT_EQ(speed_proto_pack(&empty_sp.base, &bytes, &n), SPEED_OK);
    CHECK_INT_EQ(n, 0);
    CHECK_INT_EQ(speed_proto_unpack(&speed__v1__speed_params__descriptor, bytes, n, &m), SPEED_OK);
    CHECK_INT_EQ(((Speed__V1__SpeedParams *)m)->anchors_opt_case, SPEED__V1__SPEED_PARAMS__ANCHORS_OPT__NOT_SET);
    CHECK_INT_EQ(((Speed__V1__SpeedParams *)m)->tail_opt_case, SPEED__V1__SPEED_PARAMS__TAIL_OPT__NOT_SET);
    speed_proto_free(m);
    speed_free(bytes);
    CHECK_INT_EQ(speed_proto_unpack(&speed__v1__health_request__descriptor, NULL, 0, &m), SPEED_OK);
    speed_proto_free(m);

    m = round_trip(&sa.base);
    check_sampling((Speed__V1__SamplingParams *)m);
    speed_proto_free(m);

    m = round_trip(&tok.alt[0].base);
    speed_proto_free(m);
    m = round_trip(&tok.tok.base);
    check_token((Speed__V1__Token *)m, 9906);
    speed_proto_free(m);

    m = round_trip(&kv.region.base);
    speed_proto_free(m);
    m = round_trip(&kv.pool[0].base);
    speed_proto_free(m);
    m = round_trip(&kv.layer[1].base);
    speed_proto_free(m);
    m = round_trip(&kv.kv.base);
    check_kv((Speed__V1__KvDescriptor *)m);
    speed_proto_free(m);

    Speed__V1__ReserveRequest rq = SPEED__V1__RESERVE_REQUEST__INIT;
    rq.request_id = "req-42";
    rq.n_prompt = 100000;
    rq.max_tokens = 512;
    rq.speed = &sp;
    m = round_trip(&rq.base);
    {
        Speed__V1__ReserveRequest *o = (Speed__V1__ReserveRequest *)m;
        CHECK_STR_EQ(o->request_id, "req-42");
        CHECK_INT_EQ(o->n_prompt, 100000);
        CHECK_INT_EQ(o->max_tokens, 512);
        check_speed_params(o->speed);
    }
    speed_proto_free(m);

    Speed__V1__ReserveReply rr = SPEED__V1__RESERVE_REPLY__INIT;
    rr.kv = &kv.kv;
    rr.cached_tokens = 33;
    m = round_trip(&rr.base);
    check_kv(((Speed__V1__ReserveReply *)m)->kv);
    CHECK_INT_EQ(((Speed__V1__ReserveReply *)m)->cached_tokens, 33);
    speed_proto_free(m);

    Speed__V1__GenerateRequest gr = SPEED__V1__GENERATE_REQUEST__INIT;
    gr.request_id = "req-43";
    gr.first = &tok.tok;
    gr.n_prompt_ids = 6;
    gr.prompt_ids = prompt;
    gr.sampling = &sa;
    gr.speed = &sp;
    gr.epoch = 77;
    m = round_trip(&gr.base);
    {
        Speed__V1__GenerateRequest *o = (Speed__V1__GenerateRequest *)m;
        CHECK_STR_EQ(o->request_id, "req-43");
        check_token(o->first, 9906);
        CHECK_INT_EQ(o->n_prompt_ids, 6);
        CHECK(o->n_prompt_ids == 6 && memcmp(o->prompt_ids, prompt, sizeof prompt) == 0);
        check_sampling(o->sampling);
        check_speed_params(o->speed);
        CHECK_INT_EQ(o->epoch, 77);
    }
    speed_proto_free(m);
    /* decode-only route: no first token */
    gr.first = NULL;
    m = round_trip(&gr.base);
    CHECK(((Speed__V1__GenerateRequest *)m)->first == NULL);
    speed_proto_free(m);

    token_t tok2;
    token_init(&tok2, 11);
    Speed__V1__Token *toks[2] = {&tok.tok, &tok2.tok};
    Speed__V1__Usage us = SPEED__V1__USAGE__INIT;
    us.prompt_tokens = 100;
    us.completion_tokens = 20;
    us.kv_bytes = 1ull << 40;
    Speed__V1__Timing ti = SPEED__V1__TIMING__INIT;
    ti.queue_ms = 1.5;
    ti.prefill_ms = 20.25;
    ti.decode_ms = 300.125;
    Speed__V1__GenerateEvent ev = SPEED__V1__GENERATE_EVENT__INIT;
    ev.n_tokens = 2;
    ev.tokens = toks;
    ev.finish_reason = "error";
    ev.error = "device lost";
    ev.usage = &us;
    ev.timing = &ti;
    ev.status = SPEED_ERR_DEVICE;
    m = round_trip(&us.base);
    speed_proto_free(m);
    m = round_trip(&ti.base);
    speed_proto_free(m);
    m = round_trip(&ev.base);
    {
        Speed__V1__GenerateEvent *o = (Speed__V1__GenerateEvent *)m;
        CHECK_INT_EQ(o->n_tokens, 2);
        if (o->n_tokens == 2) check_token(o->tokens[1], 11);
        CHECK_STR_EQ(o->finish_reason, "error");
        CHECK_STR_EQ(o->error, "device lost");
        CHECK(o->usage && o->usage->kv_bytes == 1ull << 40 && o->usage->completion_tokens == 20);
        CHECK(o->timing && o->timing->decode_ms == 300.125);
        CHECK_INT_EQ(o->status, SPEED_ERR_DEVICE);
    }
    speed_proto_free(m);

    Speed__V1__CancelRequest cr = SPEED__V1__CANCEL_REQUEST__INIT;
    cr.request_id = "req-44";
    m = round_trip(&cr.base);
    CHECK_STR_EQ(((Speed__V1__CancelRequest *)m)->request_id, "req-44");
    speed_proto_free(m);
    Speed__V1__CancelReply cp = SPEED__V1__CANCEL_REPLY__INIT;
    cp.found = 1;
    m = round_trip(&cp.base);
    CHECK(((Speed__V1__CancelReply *)m)->found);
    speed_proto_free(m);

    Speed__V1__PrefillRequest pr = SPEED__V1__PREFILL_REQUEST__INIT;
    pr.request_id = "req-45";
    pr.n_prompt_ids = 6;
    pr.prompt_ids = prompt;
    pr.speed = &sp;
    pr.sampling = &sa;
    pr.kv = &kv.kv;
    m = round_trip(&pr.base);
    {
        Speed__V1__PrefillRequest *o = (Speed__V1__PrefillRequest *)m;
        CHECK_STR_EQ(o->request_id, "req-45");
        CHECK(o->n_prompt_ids == 6 && o->prompt_ids[5] == 2147483647 && o->prompt_ids[4] == -1);
        check_speed_params(o->speed);
        check_sampling(o->sampling);
        check_kv(o->kv);
    }
    speed_proto_free(m);

    Speed__V1__PrefillReply pp = SPEED__V1__PREFILL_REPLY__INIT;
    pp.first = &tok.tok;
    pp.kv_bytes_sent = 987654321;
    pp.prefill_ms = 12.5;
    pp.transfer_ms = 0.75;
    m = round_trip(&pp.base);
    {
        Speed__V1__PrefillReply *o = (Speed__V1__PrefillReply *)m;
        check_token(o->first, 9906);
        CHECK_INT_EQ(o->kv_bytes_sent, 987654321);
        CHECK(o->prefill_ms == 12.5 && o->transfer_ms == 0.75);
    }
    speed_proto_free(m);

    Speed__V1__HealthRequest hq = SPEED__V1__HEALTH_REQUEST__INIT;
    m = round_trip(&hq.base);
    speed_proto_free(m);
    Speed__V1__HealthReply hr = SPEED__V1__HEALTH_REPLY__INIT;
    hr.state = SPEED__V1__NODE_STATE__NODE_STATE_DRAINING;
    hr.role = "decode";
    hr.epoch = 5;
    hr.model_id = "llama-3.1-8b";
    m = round_trip(&hr.base);
    {
        Speed__V1__HealthReply *o = (Speed__V1__HealthReply *)m;
        CHECK_INT_EQ(o->state, SPEED__V1__NODE_STATE__NODE_STATE_DRAINING);
        CHECK_STR_EQ(o->role, "decode");
        CHECK_INT_EQ(o->epoch, 5);
        CHECK_STR_EQ(o->model_id, "llama-3.1-8b");
    }
    speed_proto_free(m);

    Speed__V1__DrainRequest dq = SPEED__V1__DRAIN_REQUEST__INIT;
    dq.grace_ms = 30000;
    m = round_trip(&dq.base);
    CHECK_INT_EQ(((Speed__V1__DrainRequest *)m)->grace_ms, 30000);
    speed_proto_free(m);
    Speed__V1__DrainReply dr = SPEED__V1__DRAIN_REPLY__INIT;
    dr.running = 7;
    m = round_trip(&dr.base);
    CHECK_INT_EQ(((Speed__V1__DrainReply *)m)->running, 7);
    speed_proto_free(m);

    Speed__V1__NodeStatusRequest nq = SPEED__V1__NODE_STATUS_REQUEST__INIT;
    Speed__V1__CacheCursor cc = SPEED__V1__CACHE_CURSOR__INIT;
    cc.instance = 0xfeedface12345678ULL;
    cc.next_seq = 42;
    nq.cache = &cc;
    m = round_trip(&nq.base);
    {
        Speed__V1__NodeStatusRequest *o = (Speed__V1__NodeStatusRequest *)m;
        CHECK(o->cache && o->cache->instance == 0xfeedface12345678ULL && o->cache->next_seq == 42);
    }
    speed_proto_free(m);
    /* cache events: runs of fixed64 hashes keep their order and full 64 bits */
    uint64_t hs[3] = {0xffffffffffffffffULL, 1, 0x8000000000000000ULL}, he[1] = {7};
    Speed__V1__CacheEventRun runs[2] = {SPEED__V1__CACHE_EVENT_RUN__INIT, SPEED__V1__CACHE_EVENT_RUN__INIT};
    Speed__V1__CacheEventRun *rp[2] = {&runs[0], &runs[1]};
    runs[0].kind = SPEED__V1__CACHE_EVENT_KIND__CACHE_EVENT_STORED;
    runs[0].n_hashes = 3;
    runs[0].hashes = hs;
    runs[1].kind = SPEED__V1__CACHE_EVENT_KIND__CACHE_EVENT_EVICTED;
    runs[1].n_hashes = 1;
    runs[1].hashes = he;
    Speed__V1__CacheEvents ce = SPEED__V1__CACHE_EVENTS__INIT;
    ce.instance = 9;
    ce.next_seq = 100;
    ce.snapshot = true;
    ce.more = true;
    ce.n_runs = 2;
    ce.runs = rp;
    ce.hash_seed = 0xabcdef0123456789ULL;
    ce.block_tokens = 16;
    m = round_trip(&runs[1].base);
    speed_proto_free(m);
    m = round_trip(&ce.base);
    {
        Speed__V1__CacheEvents *o = (Speed__V1__CacheEvents *)m;
        CHECK(o->instance == 9 && o->next_seq == 100 && o->snapshot && o->more && o->block_tokens == 16);
        CHECK(o->hash_seed == 0xabcdef0123456789ULL);
        CHECK(o->n_runs == 2 && o->runs[0]->n_hashes == 3 && o->runs[0]->hashes[0] == hs[0] &&
              o->runs[0]->hashes[2] == hs[2] && o->runs[1]->kind == SPEED__V1__CACHE_EVENT_KIND__CACHE_EVENT_EVICTED &&
              o->runs[1]->hashes[0] == 7);
    }
    speed_proto_free(m);
    Speed__V1__KvPoolUsage pu[2] = {SPEED__V1__KV_POOL_USAGE__INIT, SPEED__V1__KV_POOL_USAGE__INIT};
    Speed__V1__KvPoolUsage *pus[2] = {&pu[0], &pu[1]};
    pu[0].name = "lower";
    pu[0].blocks_total = 1000;
    pu[0].blocks_free = 250;
    pu[1].name = "upper";
    pu[1].blocks_total = 100;
    pu[1].blocks_free = 99;
    Speed__V1__NodeStatus ns = SPEED__V1__NODE_STATUS__INIT;
    ns.running = 12;
    ns.waiting = 3;
    ns.n_pools = 2;
    ns.pools = pus;
    ns.kv_usage_ratio = 0.7f;
    ns.queue_limit = 64;
    ns.state = SPEED__V1__NODE_STATE__NODE_STATE_SERVING;
    ns.cache = &ce;
    ns.active_blocks = 750;
    m = round_trip(&pu[0].base);
    speed_proto_free(m);
    m = round_trip(&ns.base);
    {
        Speed__V1__NodeStatus *o = (Speed__V1__NodeStatus *)m;
        CHECK_INT_EQ(o->running, 12);
        CHECK_INT_EQ(o->waiting, 3);
        CHECK(o->n_pools == 2 && strcmp(o->pools[1]->name, "upper") == 0 && o->pools[1]->blocks_free == 99 &&
              o->pools[0]->blocks_total == 1000);
        CHECK_NEAR(o->kv_usage_ratio, 0.7f, 0);
        CHECK_INT_EQ(o->queue_limit, 64);
        CHECK_INT_EQ(o->state, SPEED__V1__NODE_STATE__NODE_STATE_SERVING);
        CHECK_INT_EQ(o->active_blocks, 750);
        CHECK(o->cache && o->cache->n_runs == 2);
    }
    speed_proto_free(m);
}

static void test_garbage(void) {
    ProtobufCMessage *m = (ProtobufCMessage *)1;
    /* 16 bytes that are not a message: field 0 / wire type 7 / truncated varints */
    static const uint8_t garbage[16] = {0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff,
                                        0xff, 0xff, 0xff, 0x07, 0x00, 0x00, 0x00, 0x00};
    CHECK_INT_EQ(speed_proto_unpack(&speed__v1__generate_event__descriptor, garbage, sizeof garbage, &m),
                 SPEED_ERR_PARSE);
    CHECK(m == NULL);
    /* a length-delimited field claiming more bytes than there are */
    static const uint8_t truncated[] = {0x0a, 0x40, 'a', 'b'};
    CHECK_INT_EQ(speed_proto_unpack(&speed__v1__cancel_request__descriptor, truncated, sizeof truncated, &m),
                 SPEED_ERR_PARSE);
    /* a wrong wire type for a known field (request_id as varint) */
    static const uint8_t wrong_type[] = {0x08, 0x01};
    CHECK_INT_EQ(speed_proto_unpack(&speed__v1__cancel_request__descriptor, wrong_type, sizeof wrong_type, &m),
                 SPEED_ERR_PARSE);
    /* random bytes of many lengths never crash; they either parse or fail cleanly */
    uint32_t x = 12345;
    uint8_t buf[512];
    int parsed = 0, failed = 0;
    for (int round = 0; round < 2000; round++) {
        size_t len = (size_t)(round % 512);
        for (size_t i = 0; i < len; i++) {
            x = x * 1664525u + 1013904223u;
            buf[i] = (uint8_t)(x >> 24);
        }
        speed_status_t st = speed_proto_unpack(&speed__v1__prefill_request__descriptor, buf, len, &m);
        if (st == SPEED_OK) {
            parsed++;
            speed_proto_free(m);
        } else {
            CHECK_INT_EQ(st, SPEED_ERR_PARSE);
            failed++;
        }
    }
    CHECK(failed > 0);
    printf("proto: random bytes as PrefillRequest: %d parsed, %d rejected\n", parsed, failed);
    CHECK_INT_EQ(speed_proto_unpack(NULL, buf, 1, &m), SPEED_ERR_INVALID_ARGUMENT);
    CHECK_INT_EQ(speed_proto_unpack(&speed__v1__cancel_request__descriptor, NULL, 3, &m), SPEED_ERR_INVALID_ARGUMENT);
    speed_proto_free(NULL);
}

static void test_alloc_failures(void) {
    kv_t kv;
    kv_init(&kv);
    Speed__V1__ReserveReply rr = SPEED__V1__RESERVE_REPLY__INIT;
    rr.kv = &kv.kv;
    uint8_t *bytes = NULL;
    size_t n = 0;
    CHECK_INT_EQ(speed_proto_pack(&rr.base, &bytes, &n), SPEED_OK);

    int64_t live = speed_alloc_live_count();
    int failures = 0;
    for (int64_t k = 0;; k++) {
        speed_alloc_fail_after(k, 0);
        ProtobufCMessage *m = NULL;
        speed_status_t st = speed_proto_unpack(&speed__v1__reserve_reply__descriptor, bytes, n, &m);
        speed_alloc_fail_after(-1, 0);
        if (st == SPEED_OK) {
            check_kv(((Speed__V1__ReserveReply *)m)->kv);
            speed_proto_free(m);
            break;
        }
        CHECK_INT_EQ(st, SPEED_ERR_NO_MEMORY);
        CHECK_INT_EQ(speed_alloc_live_count(), live);
        failures++;
        if (k > 1000) break;
    }
    CHECK(failures > 5);
    speed_alloc_fail_after(0, 0);
    uint8_t *b2 = NULL;
    size_t n2 = 0;
    CHECK_INT_EQ(speed_proto_pack(&rr.base, &b2, &n2), SPEED_ERR_NO_MEMORY);
    speed_alloc_fail_after(-1, 0);
    CHECK(b2 == NULL);
    CHECK_INT_EQ(speed_alloc_live_count(), live);
    speed_free(bytes);
}

/* speed_methods.h agrees with the services in speed.proto. */
static void test_method_paths(void) {
    static const struct {
        const ProtobufCServiceDescriptor *svc;
        const char *paths[4];
    } svcs[] = {
        {&speed__v1__decode__descriptor,
         {SPEED_METHOD_DECODE_RESERVE, SPEED_METHOD_DECODE_GENERATE, SPEED_METHOD_DECODE_CANCEL}},
        {&speed__v1__prefill__descriptor, {SPEED_METHOD_PREFILL_PREFILL, SPEED_METHOD_PREFILL_CANCEL}},
        {&speed__v1__node__descriptor, {SPEED_METHOD_NODE_HEALTH, SPEED_METHOD_NODE_DRAIN, SPEED_METHOD_NODE_STATUS}},
    };
    for (size_t i = 0; i < sizeof svcs / sizeof svcs[0]; i++) {
        const ProtobufCServiceDescriptor *d = svcs[i].svc;
        unsigned n = 0;
        while (n < 4 && svcs[i].paths[n]) n++;
        CHECK_INT_EQ(d->n_methods, n);
        for (unsigned k = 0; k < d->n_methods && k < n; k++) {
            char path[128];
            snprintf(path, sizeof path, "/%s/%s", d->name, d->methods[k].name);
            int found = 0;
            for (unsigned j = 0; j < n; j++) found |= strcmp(path, svcs[i].paths[j]) == 0;
            CHECK_MSG(found, "%s has no SPEED_METHOD_* macro", path);
        }
    }
}

int main(void) {
    test_method_paths();
    int64_t live0 = speed_alloc_live_count();
    test_all_messages();
    test_garbage();
    test_alloc_failures();
    CHECK_STR_EQ(SPEED_METHOD_DECODE_RESERVE, "/speed.v1.Decode/Reserve");
    CHECK_STR_EQ(SPEED_METHOD_DECODE_GENERATE, "/speed.v1.Decode/Generate");
    CHECK_STR_EQ(SPEED_METHOD_NODE_STATUS, "/speed.v1.Node/Status");
    CHECK_INT_EQ(speed_alloc_live_count(), live0);
    return CHECK_DONE();
}
