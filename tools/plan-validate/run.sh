#!/usr/bin/env bash
# The capacity planner's validation on this machine (docs/operations.md, "Validation"):
#   1. a small model (make-tiny-model) and its profile (speedctl profile, threads 1);
#   2. what the nodes' engine time does not hold, measured once on 1P1D with lone requests: TTFT
#      minus the profile's prefill (plan --overhead-ms) and TPOT minus its decode step
#      (plan --step-overhead-ms);
#   3. per workload (short prompts, long prompts): speedctl plan for the host's 2 cores
#      (--host-cores 2, budget 3 nodes), then the recommendation and its two neighbours (one more
#      prefill node, one more decode node) as local clusters under speedctl loadgen;
#   4. the table: predicted against measured TTFT p90 and TPOT p90, measured goodput.
# The machine is shared and its speed moves with the other work on it: right before each cluster
# starts, a one-point profile (prefill of 128 tokens, a decode step of 4) measures how much slower
# the host is than when it was profiled, and that configuration's prediction is the plan's with
# --slowdown of that factor and --host-background the cores the host's other work kept busy over
# the 3 seconds before (from /proc/stat; niced work is not counted: it yields to the cluster).
# The router's and loadgen's own CPU per request and per streamed token are measured once on the
# calibration cluster (plan --client-ms-per-request / --client-ms-per-token). The recommendation
# is the plan's as first made.
#
#   tools/plan-validate/run.sh BUILD_DIR [WORK_DIR]      (~15 minutes; not in the default ctest)
#
# The table's "host load" is the cores the host's other work kept busy right before each run
# (this machine is shared: other work beside a cluster slows it down where the profile did not see it).
# Environment: RATE_SHORT, RATE_LONG (requests/s), REQUESTS (per run, default 240), PORT_BASE
# (default 18600: router +0, prefill grpc +10 / http +20, decode grpc +30 / http +40).
set -euo pipefail

BUILD=$(cd "${1:?usage: run.sh BUILD_DIR [WORK_DIR]}" && pwd)
WORK=${2:-/tmp/plan-validate}
SPEEDCTL=$BUILD/bin/speedctl
REQUESTS=${REQUESTS:-240}
PORT_BASE=${PORT_BASE:-18600}
RATE_SHORT=${RATE_SHORT:-8}
RATE_LONG=${RATE_LONG:-3}
mkdir -p "$WORK"
export UCX_WARN_UNUSED_ENV_VARS=n

log() { printf '[plan-validate] %s\n' "$*" >&2; }

# ---- 1. the model and its profile ----------------------------------------------------------
MODEL=$WORK/model
if [ ! -f "$MODEL/config.json" ]; then
    "$SPEEDCTL" make-tiny-model "$MODEL" --layers 8 --hidden 512 --heads 8 --kv_heads 4 --ffn 1536 \
        --max_position 4096 >&2
fi
if [ ! -f "$WORK/profile.json" ]; then
    log "profiling (threads 1, C = 4 and 8)"
    "$SPEEDCTL" profile --model "$MODEL" --threads 1 --prefill-layers 4,8 \
        --prompt-tokens 8,16,32,64,128,256,384,512 --batch-sizes 1,2,4,8,16 --context-tokens 32,512 \
        --repeat 5 --out "$WORK/profile.json"
fi

UP_PID=
stop_cluster() {
    if [ -n "$UP_PID" ]; then
        kill -TERM "$UP_PID" 2>/dev/null || true
        wait "$UP_PID" 2>/dev/null || true
        UP_PID=
    fi
}
trap stop_cluster EXIT

# start_cluster YAML P D LOGDIR: speedctl up with P prefill and D decode nodes; waits for /v1/models
start_cluster() {
    local yaml=$1 p=$2 d=$3 logdir=$4
    mkdir -p "$logdir"
    "$SPEEDCTL" up "$yaml" --prefill.replicas "$p" --decode.replicas "$d" --log-dir "$logdir" \
        --router.port "$PORT_BASE" --prefill.grpc_port $((PORT_BASE + 10)) --prefill.http_port $((PORT_BASE + 20)) \
        --decode.grpc_port $((PORT_BASE + 30)) --decode.http_port $((PORT_BASE + 40)) --log warn \
        >"$logdir/up.out" 2>&1 &
    UP_PID=$!
    for _ in $(seq 1 600); do
        if curl -sf "http://127.0.0.1:$PORT_BASE/v1/models" >/dev/null 2>&1 && grep -q "^cluster up in" "$logdir/up.out"; then
            sleep 1 # the router's first status poll of every node
            return 0
        fi
        kill -0 "$UP_PID" 2>/dev/null || { cat "$logdir/up.out" >&2; return 1; }
        sleep 0.2
    done
    log "the cluster did not come up; see $logdir"
    return 1
}

# loadgen OUT.json RATE N PROMPTS OUTPUTS SLO_TTFT SLO_TPOT
loadgen() {
    "$SPEEDCTL" loadgen --url "http://127.0.0.1:$PORT_BASE" --tokenizer "$MODEL" --rate "$2" --requests "$3" \
        --prompt-tokens "$4" --output-tokens "$5" --slo-ttft-ms "$6" --slo-tpot-ms "$7" --seed 7 \
        --json "$1" >/dev/null 2>"$1.log"
}

# slowdown C PROBE.json: how much slower this host is now than in the profile (geometric mean of a
# prefill of 128 tokens and a decode step of 4 sequences of 32 tokens, at C)
slowdown() {
    "$SPEEDCTL" profile --model "$MODEL" --threads 1 --prefill-layers "$1" --prompt-tokens 128 --batch-sizes 4 \
        --context-tokens 32 --repeat 5 --decode-steps 4 --no-transfer --out "$2" 2>/dev/null
    python3 - "$WORK/profile.json" "$2" "$1" <<'EOF'
import json, math, sys
ref, now, c = json.load(open(sys.argv[1])), json.load(open(sys.argv[2])), int(sys.argv[3])
def pts(p):
    d = [x for x in p["depths"] if x["prefill_layers"] == c][0]
    pre = {x["tokens"]: x["ms"] for x in d["prefill"]}
    dec = {(x["batch"], x["context"]): x["ms"] for x in d["decode"]}
    return pre[128], dec[(4, 32)]
a, b = pts(ref), pts(now)
print(f"{math.sqrt(b[0] / a[0] * b[1] / a[1]):.3f}")
EOF
}

# host_busy: cores the host's other work kept busy over the next 3 seconds (/proc/stat: user,
# system, irq, softirq, steal; not nice, which yields to normal-priority work, nor idle/iowait)
host_busy() {
    local a b
    a=$(head -1 /proc/stat)
    sleep 3
    b=$(head -1 /proc/stat)
    python3 - "$a" "$b" <<'EOF'
import os, sys
a, b = ([int(x) for x in s.split()[1:]] for s in sys.argv[1:3])
d = [y - x for x, y in zip(a, b)]
total = sum(d[:8])
busy = d[0] + d[2] + d[5] + d[6] + d[7]  # user system irq softirq steal
print(f"{os.cpu_count() * busy / total if total else 0:.2f}")
EOF
}

# proc_cpu_ms PID: CPU milliseconds (user + system) the process has used so far
proc_cpu_ms() {
    awk -v hz="$(getconf CLK_TCK)" '{ sub(/^.*\) /, ""); print ($12 + $13) * 1000 / hz }' "/proc/$1/stat"
}

# children_cpu_ms: CPU milliseconds of this shell's finished children so far (bash `times`, run in
# this shell: in a pipe or $(...) it would report a subshell's children)
children_cpu_ms() {
    times >"$WORK/.times"
    tail -1 "$WORK/.times" | awk '{ t = 0; for (i = 1; i <= 2; i++) { split($i, m, /[ms]/); t += m[1] * 60 + m[2] } print t * 1000 }'
}

# router_pid: the router speedctl up started
router_pid() { pgrep -P "$UP_PID" -x speed-router | head -1; }

# ---- 2. the fixed overheads ----------------------------------------------------------------
# What the nodes' engine time does not hold, measured once on 1P1D with requests one at a time
# (prompts of 64 tokens, 16 generated): TTFT p50 measured - predicted (HTTP, router, control RPCs:
# plan --overhead-ms) and TPOT p50 measured - predicted (per decode step: token events, the stream
# to the router, SSE: plan --step-overhead-ms); the prediction with the host's slowdown of the moment.
C_CAL=4
if [ ! -f "$WORK/overheads" ]; then
    log "measuring the fixed TTFT and per-step overheads on 1P1D (prompts of 64 tokens, one at a time)"
    slow=$(slowdown $C_CAL "$WORK/cal-probe.json")
    bg=$(host_busy)
    "$SPEEDCTL" plan --profile "$WORK/profile.json" --rate 1 --prompt-tokens fixed:64 --output-tokens fixed:16 \
        --seed 7 --requests 30 --slo-ttft-p90-ms 10000 --slo-tpot-p90-ms 10000 --max-nodes 2 --prefill-layers $C_CAL \
        --overhead-ms 0 --slowdown "$slow" --host-cores 2 --host-background "$bg" --out "$WORK/cal" >/dev/null
    start_cluster "$WORK/cal/cluster.yaml" 1 1 "$WORK/cal/logs"
    # the router's and loadgen's CPU over two runs of 40 requests, 16 and 2 tokens each: per request
    # and per token by the difference
    rp=$(router_pid)
    children_cpu_ms >"$WORK/.c0"
    r0=$(proc_cpu_ms "$rp") c0=$(cat "$WORK/.c0")
    loadgen "$WORK/cal/loadgen.json" 1 40 fixed:64 fixed:16 10000 10000
    children_cpu_ms >"$WORK/.c1"
    r1=$(proc_cpu_ms "$rp") c1=$(cat "$WORK/.c1")
    loadgen "$WORK/cal/loadgen-2.json" 2 40 fixed:64 fixed:2 10000 10000
    children_cpu_ms >"$WORK/.c2"
    r2=$(proc_cpu_ms "$rp") c2=$(cat "$WORK/.c2")
    stop_cluster
    python3 - "$WORK" "$r0" "$r1" "$r2" "$c0" "$c1" "$c2" <<'EOF' >"$WORK/overheads"
import json, sys
w = sys.argv[1]
r0, r1, r2, c0, c1, c2 = (float(x) for x in sys.argv[2:])
m = json.load(open(f"{w}/cal/loadgen.json"))["latency_ms"]
p = json.load(open(f"{w}/cal/plan.json"))["candidates"][0]
cpu16 = (r1 - r0 + c1 - c0) / 40  # ms per request of 16 tokens
cpu2 = (r2 - r1 + c2 - c1) / 40   # ms per request of 2 tokens
per_token = max(0.0, (cpu16 - cpu2) / 14)
per_request = max(0.0, cpu2 - 2 * per_token)
print(f"{max(0.0, m['ttft']['p50'] - p['ttft_p50_ms']):.2f} {max(0.0, m['tpot']['p50'] - p['tpot_p50_ms']):.2f} "
      f"{per_request:.3f} {per_token:.4f}")
EOF
fi
read -r OVERHEAD STEP_OVERHEAD CLIENT_REQ CLIENT_TOK <"$WORK/overheads"
CLIENT_REQ=${CLIENT_REQ:-0} CLIENT_TOK=${CLIENT_TOK:-0}
log "overheads: TTFT $OVERHEAD ms, decode step $STEP_OVERHEAD ms; router + loadgen CPU $CLIENT_REQ ms per request, $CLIENT_TOK ms per token"

# ---- 3. the workloads -----------------------------------------------------------------------
# name rate prompts outputs slo_ttft slo_tpot
WORKLOADS=(
    "short $RATE_SHORT uniform:16,64 fixed:32 150 25"
    "long $RATE_LONG uniform:256,512 fixed:16 600 40"
)
: >"$WORK/rows.jsonl"
for wl in "${WORKLOADS[@]}"; do
    read -r name rate prompts outputs slo_ttft slo_tpot <<<"$wl"
    dir=$WORK/$name
    mkdir -p "$dir"
    log "$name: plan at $rate requests/s"
    if ! "$SPEEDCTL" plan --profile "$WORK/profile.json" --rate "$rate" --prompt-tokens "$prompts" \
        --output-tokens "$outputs" --slo-ttft-p90-ms "$slo_ttft" --slo-tpot-p90-ms "$slo_tpot" --max-nodes 4 \
        --host-cores 2 --overhead-ms "$OVERHEAD" --step-overhead-ms "$STEP_OVERHEAD" --client-ms-per-request "$CLIENT_REQ" \
        --client-ms-per-token "$CLIENT_TOK" --requests "$REQUESTS" --seed 7 --out "$dir" >"$dir/plan.txt"; then
        cat "$dir/plan.txt" >&2
        log "$name: no plan at $rate requests/s (above); skipped"
        continue
    fi
    cat "$dir/plan.txt" >&2
    read -r P D C <<<"$(jq -r '.candidates[0] | "\(.prefill) \(.decode) \(.prefill_layers)"' "$dir/plan.json")"
    for cfg in "$P $D recommended" "$((P + 1)) $D +1-prefill" "$P $((D + 1)) +1-decode"; do
        read -r p d label <<<"$cfg"
        slow=$(slowdown "$C" "$dir/probe-${p}p${d}d.json")
        bg=$(host_busy)
        log "$name: the host is ${slow}x slower than when profiled; other work keeps $bg cores busy"
        "$SPEEDCTL" plan --profile "$WORK/profile.json" --rate "$rate" --prompt-tokens "$prompts" \
            --output-tokens "$outputs" --slo-ttft-p90-ms "$slo_ttft" --slo-tpot-p90-ms "$slo_tpot" --max-nodes 4 \
            --host-cores 2 --overhead-ms "$OVERHEAD" --step-overhead-ms "$STEP_OVERHEAD" --client-ms-per-request "$CLIENT_REQ" \
            --client-ms-per-token "$CLIENT_TOK" --requests "$REQUESTS" --seed 7 --prefill-layers "$C" \
            --slowdown "$slow" --host-background "$bg" --out "$dir/at-${p}p${d}d" >"$dir/at-${p}p${d}d.txt" 2>&1 || true
        log "$name: $p prefill + $d decode ($label) under loadgen"
        start_cluster "$dir/cluster.yaml" "$p" "$d" "$dir/logs-${p}p${d}d"
        load=$bg
        loadgen "$dir/loadgen-${p}p${d}d.json" "$rate" "$REQUESTS" "$prompts" "$outputs" "$slo_ttft" "$slo_tpot"
        stop_cluster
        python3 - "$dir" "$p" "$d" "$C" "$name" "$label" "$rate" "$load" "$slow" <<'EOF' >>"$WORK/rows.jsonl"
import json, os, sys
d, p, dd, c, name, label, rate, load, slow = sys.argv[1:]
at = f"{d}/at-{p}p{dd}d/plan.json"
plan = json.load(open(at if os.path.exists(at) else f"{d}/plan.json"))
cand = [x for x in plan["candidates"] if x["prefill"] == int(p) and x["decode"] == int(dd) and x["prefill_layers"] == int(c)]
lg = json.load(open(f"{d}/loadgen-{p}p{dd}d.json"))
lat = lg["latency_ms"]
print(json.dumps({"workload": name, "config": f"{p}P{dd}D", "label": label, "rate": float(rate), "C": int(c),
                  "pred_ttft_p90": cand[0]["ttft_p90_ms"] if cand else None,
                  "pred_tpot_p90": cand[0]["tpot_p90_ms"] if cand else None,
                  "pred_goodput": cand[0]["goodput_rps"] if cand else None,
                  "ttft_p90": lat["ttft"]["p90"], "tpot_p90": lat["tpot"]["p90"],
                  "goodput": lg["goodput"]["requests_per_s"], "throughput": lg["throughput"]["requests_per_s"],
                  "loadavg": float(load), "slowdown": float(slow)}))
EOF
    done
done

# ---- 4. the table ---------------------------------------------------------------------------
python3 - "$WORK/rows.jsonl" <<'EOF' | tee "$WORK/table.md"
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
def err(p, m):
    return f"{100 * (p - m) / m:+.0f}%" if p is not None and m else "n/a"
def f(v, k=1):
    return "n/a" if v is None else f"{v:.{k}f}"
print("| workload | rate | cluster | TTFT p90 pred / meas (ms) | err | TPOT p90 pred / meas (ms) | err | goodput pred / meas (req/s) | host load | slowdown |")
print("|---|---|---|---|---|---|---|---|---|---|")
for r in rows:
    print(f"| {r['workload']} | {r['rate']:g} | {r['config']} {r['label']} (C={r['C']}) | {f(r['pred_ttft_p90'])} / {r['ttft_p90']:.1f} | "
          f"{err(r['pred_ttft_p90'], r['ttft_p90'])} | {f(r['pred_tpot_p90'], 2)} / {r['tpot_p90']:.2f} | "
          f"{err(r['pred_tpot_p90'], r['tpot_p90'])} | {f(r['pred_goodput'], 2)} / {r['goodput']:.2f} | {r['loadavg']:.1f} | {r.get('slowdown', 1):.2f} |")
for w in sorted({r["workload"] for r in rows}):
    rs = [r for r in rows if r["workload"] == w]
    best = max(rs, key=lambda r: r["goodput"])
    print(f"\n{w}: best measured goodput {best['goodput']:.2f} req/s by {best['config']} ({best['label']})", end="")
print()
EOF
