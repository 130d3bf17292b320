#!/usr/bin/env bash
# The prefix cache's benchmark on this machine (docs/prefix-cache.md, "Measured"): multi-turn chat
# with and without the cache, and a second turn against a cold prompt of the same length.
#
#   tools/prefix-bench/run.sh BUILD_DIR [WORK_DIR]      (~15 minutes; not in the default ctest)
#
# The model: make-tiny-model with 8 layers, hidden 512 (as tools/plan-validate: prefill of
# milliseconds per token on one core), bf16, random weights — the timing does not depend on them
# and the cache's exactness is tested elsewhere (test_prefix_cluster, test_prefix_cache).
#
#   1. deploy/clusters/1p2d.yaml, at C = L (8) and C = 3L/4 (6), cache off (the shipped defaults)
#      and on (decode.prefix_cache_blocks, router.kv_routing affinity,
#      router.decode_local_max_new_tokens LOCAL): CONVERSATIONS conversations of TURNS turns with a
#      shared system prompt of SYSTEM tokens, user messages of USER_TOKENS tokens, answers of ANSWER
#      tokens, THINK ms between turns, CONCURRENCY at once. Per run: TTFT p50 / p90 of the first
#      and of the later turns (speedctl loadgen's latency_by_turn and records), prompt tokens
#      computed per request (the engines' prompt tokens minus what the decode nodes' caches
#      saved), the cache's hit rate (hits / lookups).
#   2. deploy/clusters/1p1d.yaml with the cache on: two-turn conversations one at a time, and
#      then cold prompts (no shared prefix) of the second turns' median length: second-turn TTFT
#      against cold TTFT.
#
# Environment: CONVERSATIONS (16), TURNS (4), SYSTEM (512), USER_TOKENS (40), ANSWER (24), THINK (300),
# CONCURRENCY (4), LOCAL (256), CACHE_BLOCKS (4096), PAIRS (12: part 2's conversations), SUFFIXES
# ("32 128 512": part 3's new tokens per second turn; empty skips part 3).
#   3. the threshold (router.decode_local_max_new_tokens): 2-turn conversations on 1P2D whose
#      second turn adds S tokens, every hit decode-local against every turn through a prefill
#      node: turn 2's TTFT and every request's TPOT, per S.
set -euo pipefail

BUILD=$(cd "${1:?usage: run.sh BUILD_DIR [WORK_DIR]}" && pwd)
WORK=${2:-/tmp/prefix-bench}
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
SPEEDCTL=$BUILD/bin/speedctl
CONVERSATIONS=${CONVERSATIONS:-16}
TURNS=${TURNS:-4}
SYSTEM=${SYSTEM:-512}
USER_TOKENS=${USER_TOKENS:-40}
ANSWER=${ANSWER:-24}
THINK=${THINK:-300}
CONCURRENCY=${CONCURRENCY:-4}
LOCAL=${LOCAL:-256}
CACHE_BLOCKS=${CACHE_BLOCKS:-4096}
PAIRS=${PAIRS:-12}
SUFFIXES=${SUFFIXES-32 128 512}
PORT=18700
mkdir -p "$WORK"
export UCX_WARN_UNUSED_ENV_VARS=n

log() { printf '[prefix-bench] %s\n' "$*" >&2; }

MODEL=$WORK/model
if [ ! -f "$MODEL/config.json" ]; then
    "$SPEEDCTL" make-tiny-model "$MODEL" --layers 8 --hidden 512 --heads 8 --kv_heads 4 --ffn 1536 \
        --max_position 4096 >&2
fi

# shellcheck source=../lib/local_cluster.sh
. "$ROOT/tools/lib/local_cluster.sh"
trap cluster_stop EXIT

# start_cluster YAML LOGDIR [overrides]: speedctl up with the model, on ports of its own
start_cluster() {
    local yaml=$1 logdir=$2
    shift 2
    cluster_start "$PORT" "$logdir" "$yaml" --model "$MODEL" --log warn --router.port "$PORT" \
        --prefill.grpc_port $((PORT + 10)) --prefill.http_port $((PORT + 20)) --decode.grpc_port $((PORT + 30)) \
        --decode.http_port $((PORT + 40)) --router.max_in_flight 64 "$@"
}

# metric PORT NAME: the sum of a metric's samples on one endpoint (0 when absent)
metric() {
    curl -sf "http://127.0.0.1:$1/metrics" | awk -v n="$2" '$1 == n || index($1, n "{") == 1 { s += $2 } END { print s + 0 }'
}

# counters N_DECODE: the router's prompt tokens; prompt tokens the nodes computed (the engines'
# prompt tokens of the prefill node and the decode nodes, minus what the decode nodes' caches
# saved: a decode-local hit counts its whole prompt as the request's and computes only the
# suffix); the decode nodes' cache hits and lookups
counters() {
    local engine saved=0 hits=0 lookups=0 i
    engine=$(metric $((PORT + 20)) speed_engine_prompt_tokens_total)
    for ((i = 0; i < $1; i++)); do
        engine=$((engine + $(metric $((PORT + 40 + i)) speed_engine_prompt_tokens_total)))
        saved=$((saved + $(metric $((PORT + 40 + i)) speed_prefix_cache_tokens_saved_total)))
        hits=$((hits + $(metric $((PORT + 40 + i)) speed_prefix_cache_hits_total)))
        lookups=$((lookups + $(metric $((PORT + 40 + i)) speed_prefix_cache_lookups_total)))
    done
    echo "$(metric "$PORT" speed_router_prompt_tokens_total) $((engine - saved)) $hits $lookups"
}

loadgen_conv() { # OUT CONVERSATIONS TURNS CONCURRENCY SEED
    "$SPEEDCTL" loadgen --url "http://127.0.0.1:$PORT" --tokenizer "$MODEL" --endpoint chat --conversations "$2" \
        --turns "$3" --concurrency "$4" --system-tokens "$SYSTEM" --prompt-tokens "fixed:$USER_TOKENS" \
        --output-tokens "fixed:$ANSWER" --think-ms "fixed:$THINK" --seed "$5" --json "$1.json" --records "$1.jsonl" \
        >/dev/null 2>"$1.log"
}

# ---- 1. multi-turn on 1P2D: cache off vs on, C = 8 and 6 -----------------------------------
: >"$WORK/multi.jsonl"
for c in 8 6; do
    for cache in off on; do
        run=$WORK/1p2d-c$c-$cache
        flags=(--speed.prefill_layers "$c")
        [ "$cache" = on ] && flags+=(--decode.prefix_cache_blocks "$CACHE_BLOCKS" --router.kv_routing affinity
            --router.decode_local_max_new_tokens "$LOCAL")
        log "1P2D, C = $c, cache $cache"
        start_cluster "$ROOT/deploy/clusters/1p2d.yaml" "$run.logs" "${flags[@]}"
        read -r p0 c0 h0 l0 <<<"$(counters 2)"
        loadgen_conv "$run" "$CONVERSATIONS" "$TURNS" "$CONCURRENCY" 7
        read -r p1 c1 h1 l1 <<<"$(counters 2)"
        cluster_stop
        python3 - "$run" "$c" "$cache" "$p0" "$c0" "$h0" "$l0" "$p1" "$c1" "$h1" "$l1" <<'PY' >>"$WORK/multi.jsonl"
import json, statistics, sys
run, c, cache = sys.argv[1:4]
p0, c0, h0, l0, p1, c1, h1, l1 = (float(x) for x in sys.argv[4:])
recs = [json.loads(l) for l in open(run + ".jsonl")]
ok = [r for r in recs if r["outcome"] == "ok" and "ttft_ms" in r]
def q(v, p):
    v = sorted(v)
    return v[min(len(v) - 1, max(0, int(-(-p * len(v) // 1)) - 1))] if v else float("nan")
first = [r["ttft_ms"] for r in ok if r["turn"] == 0]
later = [r["ttft_ms"] for r in ok if r["turn"] > 0]
n = len(recs)
print(json.dumps({"C": int(c), "cache": cache, "requests": n, "ok": len(ok),
                  "first_p50": q(first, 0.5), "first_p90": q(first, 0.9),
                  "later_p50": q(later, 0.5), "later_p90": q(later, 0.9),
                  "prompt_tokens_per_request": (p1 - p0) / n, "computed_per_request": (c1 - c0) / n,
                  "hit_rate": (h1 - h0) / (l1 - l0) if l1 > l0 else None,
                  "tpot_p50": json.load(open(run + ".json"))["latency_ms"]["tpot"]["p50"]}))
PY
    done
done

# ---- 2. 1P1D: a second turn against a cold prompt of the same length ------------------------
run=$WORK/1p1d
log "1P1D, cache on: $PAIRS two-turn conversations, then cold prompts of the second turns' length"
start_cluster "$ROOT/deploy/clusters/1p1d.yaml" "$run.logs" --decode.prefix_cache_blocks "$CACHE_BLOCKS" \
    --router.kv_routing affinity --router.decode_local_max_new_tokens "$LOCAL"
loadgen_conv "$run-turns" "$PAIRS" 2 1 11
len=$(python3 -c 'import json, statistics, sys
v = [json.loads(l)["prompt_tokens"] for l in open(sys.argv[1]) if json.loads(l).get("turn") == 1]
print(int(statistics.median(v)))' "$run-turns.jsonl")
"$SPEEDCTL" loadgen --url "http://127.0.0.1:$PORT" --tokenizer "$MODEL" --endpoint chat --concurrency 1 \
    --requests "$PAIRS" --prompt-tokens "fixed:$len" --output-tokens "fixed:$ANSWER" --seed 13 \
    --json "$run-cold.json" --records "$run-cold.jsonl" >/dev/null 2>"$run-cold.log"
cluster_stop

# ---- 3. the threshold: decode-local against the prefill node, by the new suffix's length ----
# 2-turn conversations whose second turn adds S tokens, CONCURRENCY at once on 1P2D (cache on, C
# of the shipped file): router.decode_local_max_new_tokens 0 (every turn through a prefill node,
# which computes the whole prompt and ships the part past the hit) against 100000 (every hit
# decode-local: the decode node computes the suffix inside its steps). Turn 2's TTFT, and the
# TPOT of all requests (what the decode node's running requests pay for local suffixes).
: >"$WORK/threshold.jsonl"
for S in $SUFFIXES; do
    for local in 0 100000; do
        run=$WORK/threshold-s$S-l$local
        log "threshold: suffix $S tokens, decode_local_max_new_tokens $local"
        start_cluster "$ROOT/deploy/clusters/1p2d.yaml" "$run.logs" --decode.prefix_cache_blocks "$CACHE_BLOCKS" \
            --router.kv_routing affinity --router.decode_local_max_new_tokens "$local"
        "$SPEEDCTL" loadgen --url "http://127.0.0.1:$PORT" --tokenizer "$MODEL" --endpoint chat \
            --conversations "$CONVERSATIONS" --turns 2 --concurrency "$CONCURRENCY" --system-tokens "$SYSTEM" \
            --prompt-tokens "fixed:$S" --output-tokens "fixed:$ANSWER" --think-ms "fixed:$THINK" --seed 17 \
            --json "$run.json" --records "$run.jsonl" >/dev/null 2>"$run.log"
        cluster_stop
        python3 - "$run" "$S" "$local" <<'PY' >>"$WORK/threshold.jsonl"
import json, statistics, sys
run, S, local = sys.argv[1:]
recs = [json.loads(l) for l in open(run + ".jsonl")]
t2 = [r["ttft_ms"] for r in recs if r.get("turn") == 1 and "ttft_ms" in r]
tp = sorted(r["tpot_ms"] for r in recs if "tpot_ms" in r)
print(json.dumps({"suffix": int(S), "local": int(local), "turn2_ttft_p50": statistics.median(t2),
                  "tpot_p50": statistics.median(tp), "tpot_p90": tp[max(0, int(0.9 * len(tp)) - 1)]}))
PY
    done
done

# ---- 4. the tables ------------------------------------------------------------------------
python3 - "$WORK" "$len" <<'PY' | tee "$WORK/table.md"
import json, statistics, sys
w, length = sys.argv[1], int(sys.argv[2])
rows = [json.loads(l) for l in open(f"{w}/multi.jsonl")]
f = lambda v, k=1: "n/a" if v is None else f"{v:.{k}f}"
print("| C | cache | requests ok | TTFT p50 / p90, turn 1 (ms) | TTFT p50 / p90, turns 2+ (ms) | prompt tokens / request | computed / request | hit rate | TPOT p50 (ms) |")
print("|---|---|---|---|---|---|---|---|---|")
for r in rows:
    print(f"| {r['C']} | {r['cache']} | {r['ok']}/{r['requests']} | {f(r['first_p50'])} / {f(r['first_p90'])} | "
          f"{f(r['later_p50'])} / {f(r['later_p90'])} | {r['prompt_tokens_per_request']:.0f} | {r['computed_per_request']:.0f} | "
          f"{f(r['hit_rate'], 2)} | {f(r['tpot_p50'], 2)} |")
for c in sorted({r["C"] for r in rows}, reverse=True):
    off = [r for r in rows if r["C"] == c and r["cache"] == "off"][0]
    on = [r for r in rows if r["C"] == c and r["cache"] == "on"][0]
    print(f"\nC = {c}: later turns' TTFT p50 {off['later_p50'] / on['later_p50']:.1f}x lower with the cache "
          f"(p90 {off['later_p90'] / on['later_p90']:.1f}x)", end="")
th = [json.loads(l) for l in open(f"{w}/threshold.jsonl")]
if th:
    print("\n\n| new tokens in turn 2 | turn 2 TTFT p50, prefill node / decode-local (ms) | TPOT p50 | TPOT p90, prefill node / decode-local (ms) |")
    print("|---|---|---|---|")
    for S in sorted({r["suffix"] for r in th}):
        a = [r for r in th if r["suffix"] == S and r["local"] == 0][0]
        b = [r for r in th if r["suffix"] == S and r["local"] != 0][0]
        print(f"| {S} | {a['turn2_ttft_p50']:.1f} / {b['turn2_ttft_p50']:.1f} | {a['tpot_p50']:.2f} / {b['tpot_p50']:.2f} "
              f"| {a['tpot_p90']:.2f} / {b['tpot_p90']:.2f} |")
turns = [json.loads(l) for l in open(f"{w}/1p1d-turns.jsonl")]
cold = [json.loads(l) for l in open(f"{w}/1p1d-cold.jsonl")]
t2 = [r["ttft_ms"] for r in turns if r.get("turn") == 1 and "ttft_ms" in r]
tc = [r["ttft_ms"] for r in cold if "ttft_ms" in r]
lc = statistics.median(r["prompt_tokens"] for r in cold)
print(f"\n\n1P1D: second turn TTFT p50 {statistics.median(t2):.1f} ms (n {len(t2)}, median prompt {length} tokens) against "
      f"a cold prompt of {lc:.0f} tokens {statistics.median(tc):.1f} ms (n {len(tc)}): "
      f"{statistics.median(tc) / statistics.median(t2):.1f}x sooner")
PY
