#!/usr/bin/env bash
# The capacity planner's validation on this machine (docs/operations.md, "Validation"):
#   1. a small model (make-tiny-model) and its profile (speedctl profile, threads 1);
#   2. the host's speed against the profile (the median of PROBES one-point probes: a prefill of
#      128 tokens and a decode step of 4), and a calibration on 1P1D with a workload of its own
#      (prompts of 64 tokens, 16 generated): with lone requests, what the nodes' engine time does
#      not hold (TTFT and TPOT minus the profile's: plan --overhead-ms, --step-overhead-ms) and
#      the router's and loadgen's CPU per request and per streamed token (plan --client-ms-*);
#      then a loaded workload of prompts across the planned range (CAL_PROMPTS, CAL_OUTPUTS at
#      RATE_CAL requests/s, CAL_RUNS runs): measured / predicted TTFT and TPOT p90 (medians) are
#      the correction factors for the tails the simulation does not produce (plan --ttft-factor,
#      --tpot-factor; Dynamo's planner keeps such factors from live traffic);
#   3. per workload (short prompts, long prompts): speedctl plan for the host's 2 cores
#      (--host-cores 2, budget 4 nodes), then the recommendation and its two neighbours (one more
#      prefill node, one more decode node) as local clusters under speedctl loadgen, each REPEAT
#      times, interleaved; each configuration's prediction with --host-background the median of
#      the cores the host's other work kept busy in the 3 s before its runs (from /proc/stat;
#      niced work is not counted: it yields to the cluster);
#   4. the table: predicted (corrected, and the model alone) against measured (the median over
#      the runs, every run listed) TTFT p90 and TPOT p90, and goodput. The recommendation is the
#      plan's as first made.
#
#   tools/plan-validate/run.sh BUILD_DIR [WORK_DIR]      (~17 minutes; not in the default ctest)
#
# Environment: RATE_SHORT, RATE_LONG (requests/s, defaults 20 and 8), REQUESTS (per run, default
# 240), REPEAT (runs of every configuration, default 5: the table compares medians), PROBES (speed
# probes, default 5), CAL_PROMPTS, CAL_OUTPUTS, RATE_CAL, CAL_RUNS (the loaded calibration:
# uniform:32,512, fixed:24, 10 requests/s, 3 runs),
# WARMUP (requests sent before every loadgen run and not counted, default 8: loadgen --warmup,
# one alone, then the rest at once; a fresh cluster's first requests pay for connections,
# endpoints, first-touch memory and the first batches),
# PORT_BASE (default 18600: router +0, prefill grpc +10 / http +20, decode grpc +30 / http +40).
set -euo pipefail

BUILD=$(cd "${1:?usage: run.sh BUILD_DIR [WORK_DIR]}" && pwd)
WORK=${2:-/tmp/plan-validate}
SPEEDCTL=$BUILD/bin/speedctl
REQUESTS=${REQUESTS:-240}
PORT_BASE=${PORT_BASE:-18600}
RATE_SHORT=${RATE_SHORT:-20}
RATE_LONG=${RATE_LONG:-8}
REPEAT=${REPEAT:-5}
PROBES=${PROBES:-5}
RATE_CAL=${RATE_CAL:-10}
CAL_PROMPTS=${CAL_PROMPTS:-uniform:32,512}
CAL_OUTPUTS=${CAL_OUTPUTS:-fixed:24}
CAL_RUNS=${CAL_RUNS:-3}
WARMUP=${WARMUP:-8}
mkdir -p "$WORK"
export UCX_WARN_UNUSED_ENV_VARS=n

log() { printf '[plan-validate] %s\n' "$*" >&2; }
median() { sort -n | awk '{ v[NR] = $1 } END { print v[int((NR + 1) / 2)] }'; }

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

ROOT=$(cd "$(dirname "$0")/../.." && pwd)
# shellcheck source=../lib/local_cluster.sh
. "$ROOT/tools/lib/local_cluster.sh"
trap cluster_stop EXIT

# start_cluster YAML P D LOGDIR: speedctl up with P prefill and D decode nodes on ports of its own
start_cluster() {
    local yaml=$1 p=$2 d=$3 logdir=$4
    cluster_start "$PORT_BASE" "$logdir" "$yaml" --prefill.replicas "$p" --decode.replicas "$d" \
        --router.port "$PORT_BASE" --prefill.grpc_port $((PORT_BASE + 10)) --prefill.http_port $((PORT_BASE + 20)) \
        --decode.grpc_port $((PORT_BASE + 30)) --decode.http_port $((PORT_BASE + 40)) --log warn
}

# loadgen OUT.json RATE N PROMPTS OUTPUTS SLO_TTFT SLO_TPOT (fails only without a report)
loadgen() {
    "$SPEEDCTL" loadgen --url "http://127.0.0.1:$PORT_BASE" --tokenizer "$MODEL" --rate "$2" --requests "$3" \
        --prompt-tokens "$4" --output-tokens "$5" --slo-ttft-ms "$6" --slo-tpot-ms "$7" --seed 7 \
        --warmup "$WARMUP" --json "$1" >/dev/null 2>"$1.log" || [ -s "$1" ] # failed requests (a 429 under overload) are in the report
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
router_pid() { pgrep -P "$CLUSTER_PID" -x speed-router | head -1; }

# ---- 2. the host's speed, the fixed overheads and the correction factors --------------------
# The host's speed against the profile: the median of PROBES one-point probes (one probe alone
# read 0.93 to 1.42 within ten minutes on an idle host, and its noise entered every prediction).
C_CAL=4
if [ ! -f "$WORK/slowdown" ]; then
    log "probing the host's speed ($PROBES probes)"
    for i in $(seq 1 "$PROBES"); do slowdown $C_CAL "$WORK/probe-$i.json"; done | median >"$WORK/slowdown"
fi
SLOW=$(cat "$WORK/slowdown")
log "the host is ${SLOW}x slower than when profiled (median of the probes)"

# plan_at OUT RATE PROMPTS OUTPUTS SLO_TTFT SLO_TPOT BG C [more plan flags]: speedctl plan for this
# host (2 cores, the probed speed, BG cores of other work); C empty = every profiled C
plan_at() {
    local out=$1 rate=$2 prompts=$3 outputs=$4 slo_ttft=$5 slo_tpot=$6 bg=$7 c=$8
    shift 8
    "$SPEEDCTL" plan --profile "$WORK/profile.json" --rate "$rate" --prompt-tokens "$prompts" --output-tokens "$outputs" \
        --slo-ttft-p90-ms "$slo_ttft" --slo-tpot-p90-ms "$slo_tpot" --max-nodes 4 --host-cores 2 --seed 7 \
        --requests "$REQUESTS" --slowdown "$SLOW" --host-background "$bg" ${c:+--prefill-layers "$c"} --out "$out" "$@"
}

# What the nodes' engine time does not hold, measured once on 1P1D with requests one at a time
# (prompts of 64 tokens, 16 generated): TTFT p50 measured - predicted (HTTP, router, control RPCs:
# plan --overhead-ms) and TPOT p50 measured - predicted (per decode step: token events, the stream
# to the router, SSE: plan --step-overhead-ms). Then, on the same cluster, CAL_PROMPTS prompts
# (across the lengths to plan for) at RATE_CAL requests/s, CAL_RUNS times: measured / predicted
# TTFT and TPOT p90 (medians over the runs) are the correction factors (plan --ttft-factor /
# --tpot-factor) for the tails the simulation does not produce. The calibration's workload is
# none of the validated ones.
if [ ! -f "$WORK/factors" ]; then
    log "calibrating on 1P1D: prompts of 64 tokens, 16 generated, one at a time; then $CAL_PROMPTS, $CAL_OUTPUTS at $RATE_CAL requests/s"
    plan_at "$WORK/cal" 1 fixed:64 fixed:16 10000 10000 "$(host_busy)" $C_CAL --requests 30 --max-nodes 2 \
        --overhead-ms 0 >/dev/null
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
    cal_bg=$(host_busy)
    for i in $(seq 1 "$CAL_RUNS"); do
        loadgen "$WORK/cal/loaded-$i.json" "$RATE_CAL" "$REQUESTS" "$CAL_PROMPTS" "$CAL_OUTPUTS" 10000 10000
    done
    cluster_stop
    python3 - "$WORK" "$r0" "$r1" "$r2" "$c0" "$c1" "$c2" <<'PY' >"$WORK/overheads"
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
PY
    read -r OVERHEAD STEP_OVERHEAD CLIENT_REQ CLIENT_TOK <"$WORK/overheads"
    plan_at "$WORK/cal-loaded" "$RATE_CAL" "$CAL_PROMPTS" "$CAL_OUTPUTS" 10000 10000 "$cal_bg" $C_CAL --max-nodes 2 \
        --overhead-ms "$OVERHEAD" --step-overhead-ms "$STEP_OVERHEAD" --client-ms-per-request "$CLIENT_REQ" \
        --client-ms-per-token "$CLIENT_TOK" >/dev/null
    python3 - "$WORK" "$CAL_RUNS" <<'PY' >"$WORK/factors"
import json, statistics, sys
w, n = sys.argv[1], int(sys.argv[2])
runs = [json.load(open(f"{w}/cal/loaded-{i}.json"))["latency_ms"] for i in range(1, n + 1)]
c = [x for x in json.load(open(f"{w}/cal-loaded/plan.json"))["candidates"] if x["prefill"] == 1 and x["decode"] == 1][0]
ttft = statistics.median(r["ttft"]["p90"] for r in runs) / c["ttft_p90_ms"]
tpot = statistics.median(r["tpot"]["p90"] for r in runs) / c["tpot_p90_ms"]
print(f"{ttft:.3f} {tpot:.3f}")
PY
fi
read -r OVERHEAD STEP_OVERHEAD CLIENT_REQ CLIENT_TOK <"$WORK/overheads"
read -r TTFT_FACTOR TPOT_FACTOR <"$WORK/factors"
log "overheads: TTFT $OVERHEAD ms, decode step $STEP_OVERHEAD ms; router + loadgen CPU $CLIENT_REQ ms per request, $CLIENT_TOK ms per token"
log "correction factors (1P1D, $CAL_PROMPTS at $RATE_CAL requests/s): TTFT x$TTFT_FACTOR, TPOT x$TPOT_FACTOR"
CAL_FLAGS=(--overhead-ms "$OVERHEAD" --step-overhead-ms "$STEP_OVERHEAD" --client-ms-per-request "$CLIENT_REQ"
    --client-ms-per-token "$CLIENT_TOK" --ttft-factor "$TTFT_FACTOR" --tpot-factor "$TPOT_FACTOR")

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
    if ! plan_at "$dir" "$rate" "$prompts" "$outputs" "$slo_ttft" "$slo_tpot" "$(host_busy)" "" "${CAL_FLAGS[@]}" \
        >"$dir/plan.txt"; then
        cat "$dir/plan.txt" >&2
        log "$name: no plan at $rate requests/s (above); skipped"
        continue
    fi
    cat "$dir/plan.txt" >&2
    read -r P D C <<<"$(jq -r '.candidates[0] | "\(.prefill) \(.decode) \(.prefill_layers)"' "$dir/plan.json")"
    CFGS=("$P $D recommended" "$((P + 1)) $D +1-prefill" "$P $((D + 1)) +1-decode")
    # every configuration REPEAT times, interleaved, so that the host's drift reaches all of them alike
    for rep in $(seq 1 "$REPEAT"); do
        for cfg in "${CFGS[@]}"; do
            read -r p d label <<<"$cfg"
            host_busy >"$dir/bg-${p}p${d}d-$rep"
            log "$name: $p prefill + $d decode ($label), run $rep of $REPEAT"
            start_cluster "$dir/cluster.yaml" "$p" "$d" "$dir/logs-${p}p${d}d-$rep"
            loadgen "$dir/loadgen-${p}p${d}d-$rep.json" "$rate" "$REQUESTS" "$prompts" "$outputs" "$slo_ttft" "$slo_tpot"
            cluster_stop
        done
    done
    # each configuration's prediction, with the median of the other work measured before its runs
    for cfg in "${CFGS[@]}"; do
        read -r p d label <<<"$cfg"
        bg=$(cat "$dir"/bg-"${p}p${d}d"-* | median)
        plan_at "$dir/at-${p}p${d}d" "$rate" "$prompts" "$outputs" "$slo_ttft" "$slo_tpot" "$bg" "$C" "${CAL_FLAGS[@]}" \
            >"$dir/at-${p}p${d}d.txt" 2>&1 || true
        # the model alone: the same without the correction factors
        plan_at "$dir/raw-${p}p${d}d" "$rate" "$prompts" "$outputs" "$slo_ttft" "$slo_tpot" "$bg" "$C" \
            "${CAL_FLAGS[@]:0:8}" >"$dir/raw-${p}p${d}d.txt" 2>&1 || true
        python3 - "$dir" "$p" "$d" "$C" "$name" "$label" "$rate" "$bg" "$SLOW" "$REPEAT" <<'PY' >>"$WORK/rows.jsonl"
import json, os, statistics, sys
d, p, dd, c, name, label, rate, bg, slow, rep = sys.argv[1:]
at = f"{d}/at-{p}p{dd}d/plan.json"
plan = json.load(open(at if os.path.exists(at) else f"{d}/plan.json"))
def pick(plan):
    return [x for x in plan["candidates"] if x["prefill"] == int(p) and x["decode"] == int(dd) and x["prefill_layers"] == int(c)]
cand = pick(plan)
raw_at = f"{d}/raw-{p}p{dd}d/plan.json"
raw = pick(json.load(open(raw_at))) if os.path.exists(raw_at) else []
runs = [json.load(open(f"{d}/loadgen-{p}p{dd}d-{i}.json")) for i in range(1, int(rep) + 1)]
metrics = {"ttft_p90": lambda r: r["latency_ms"]["ttft"]["p90"], "tpot_p90": lambda r: r["latency_ms"]["tpot"]["p90"],
           "goodput": lambda r: r["goodput"]["requests_per_s"], "met": lambda r: r["goodput"]["met"]}
row = {"workload": name, "config": f"{p}P{dd}D", "label": label, "rate": float(rate), "C": int(c), "runs": len(runs),
       "pred_ttft_p90": cand[0]["ttft_p90_ms"] if cand else None,
       "pred_tpot_p90": cand[0]["tpot_p90_ms"] if cand else None,
       "pred_goodput": cand[0]["goodput_rps"] if cand else None,
       "raw_ttft_p90": raw[0]["ttft_p90_ms"] if raw else None,
       "raw_tpot_p90": raw[0]["tpot_p90_ms"] if raw else None,
       "host_busy": float(bg), "slowdown": float(slow),
       "requests": runs[0]["requests"]["requested"]}
for k, f in metrics.items():
    v = [f(r) for r in runs]
    row[k] = statistics.median(v)
    row[k + "_runs"] = v
print(json.dumps(row))
PY
    done
done

# ---- 4. the table ---------------------------------------------------------------------------
python3 - "$WORK/rows.jsonl" <<'PY' | tee "$WORK/table.md"
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
def err(p, m):
    return f"{100 * (p - m) / m:+.0f}%" if p is not None and m else "n/a"
def f(v, k=1):
    return "n/a" if v is None else f"{v:.{k}f}"
def runs(v, k=1):
    return " ".join(f"{x:.{k}f}" for x in v)
print("| workload | rate | cluster | TTFT p90 pred / meas (ms) | err | model alone | runs | TPOT p90 pred / meas (ms) | err "
      "| model alone | runs | goodput pred / meas (req/s) | runs | within SLOs | runs | host busy |")
print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
for r in rows:
    print(f"| {r['workload']} | {r['rate']:g} | {r['config']} {r['label']} (C={r['C']}) "
          f"| {f(r['pred_ttft_p90'])} / {r['ttft_p90']:.1f} | {err(r['pred_ttft_p90'], r['ttft_p90'])} "
          f"| {f(r.get('raw_ttft_p90'))} ({err(r.get('raw_ttft_p90'), r['ttft_p90'])}) | {runs(r['ttft_p90_runs'])} "
          f"| {f(r['pred_tpot_p90'], 2)} / {r['tpot_p90']:.2f} | {err(r['pred_tpot_p90'], r['tpot_p90'])} "
          f"| {f(r.get('raw_tpot_p90'), 2)} ({err(r.get('raw_tpot_p90'), r['tpot_p90'])}) | {runs(r['tpot_p90_runs'], 2)} "
          f"| {f(r['pred_goodput'], 2)} / {r['goodput']:.2f} | {runs(r['goodput_runs'], 2)} "
          f"| {r['met']:.0f} of {r['requests']} | {runs(r['met_runs'], 0)} | {r['host_busy']:.1f} |")
# Goodput at one offered rate: the configurations saw the same requests at the same times, so
# what tells them apart is how many they served within the SLOs. loadgen's requests/s also
# divides by the time the last answer took to finish, tens of ms apart in a 30 s run.
for w in sorted({r["workload"] for r in rows}):
    rs = [r for r in rows if r["workload"] == w]
    top = max(r["met"] for r in rs)
    most = [f"{r['config']} ({r['label']})" for r in rs if r["met"] == top]
    best = max(rs, key=lambda r: r["goodput"])
    print(f"\n{w}: most requests within the SLOs {top:.0f} of {rs[0]['requests']} (median of {rs[0]['runs']} runs): "
          f"{', '.join(most)}; highest goodput {best['goodput']:.2f} req/s: {best['config']} ({best['label']})", end="")
print()
PY
