#!/usr/bin/env bash
# The main job, for a newcomer on a fresh machine: set up, build, make a small random-weight
# Llama model in the Hugging Face layout, validate and describe it, round-trip text through its
# tokenizer and chat template, and benchmark SPEED against full depth on it against this
# machine's roofline. Then the project's own trained model (models/fortune-llama, trained here on
# Debian's fortunes and dictionary: tools/speed-tune) answers with SPEED off and on (text,
# timings and KV bytes of each). Last, the main command: a local disaggregated cluster (one prefill node, one decode node, the router) started
# with `speedctl up`, one streaming chat request through the router's OpenAI API with its TTFT
# and TPOT, and the KV bytes the prefill node shipped against full depth.
set -euo pipefail
cd "$(dirname "$0")/.."

deploy/setup.sh
cmake -S . -B build -DCMAKE_BUILD_TYPE=RelWithDebInfo >/dev/null
cmake --build build -j2 >/dev/null
speedctl=build/bin/speedctl
model=build/demo/tiny-llama
trained=models/fortune-llama # 2 M parameters, English-like text (docs/quality.md)

show() { # prints a command as one would type it
  local a out='$'
  for a in "$@"; do
    if [[ "$a" =~ ^[A-Za-z0-9_./:,=+-]+$ ]]; then out+=" $a"; else out+=" '${a//\'/\'\\\'\'}'"; fi
  done
  printf '\n%s\n' "$out"
}
step() { show "$@"; "$@"; }

step $speedctl make-tiny-model $model --layers 8 --hidden 256 --heads 8 --kv-heads 2 --ffn 704 --dtype bf16 --seed 1
step $speedctl inspect $model --prefill-layers 0.75
text='SPEED: shallow prefill, deep decode. Ünïcödé and emoji 🚀 too!'
ids=$($speedctl tokenize --model $model --text "$text")
show $speedctl tokenize --model $model --text "$text"
echo "$ids"
step $speedctl tokenize --model $model --decode "${ids// /,}"
step $speedctl tokenize --model $model --chat 'What does SPEED change?' --system 'You are concise.'

step $speedctl bench --model $model --prompt-tokens 512 --gen-tokens 16 --prefill-layers 0.75 --compare --repeat 3 --roofline-mib 256

llama3=${SPEED_TEST_DATA:-../shared/data}/tokenizers/llama3
if [ -f "$llama3/tokenizer.json" ]; then
  step $speedctl make-tiny-model build/demo/tiny-llama3-vocab --layers 2 --hidden 64 --heads 4 --kv-heads 2 --ffn 160 --tokenizer "$llama3"
  step $speedctl tokenize --model build/demo/tiny-llama3-vocab --text "$text" --json
fi

# Generation with the trained model: SPEED (--prefill-layers below its 8 layers) changes the cost
# and, a little, the answer (what a cutoff costs in quality: speedctl eval, docs/quality.md).
prompt='A wise man once said that the best way to learn is to'
step $speedctl inspect $trained --prefill-layers 0.75
step $speedctl generate --model $trained --prompt "$prompt" --max-tokens 32
step $speedctl generate --model $trained --prompt "$prompt" --max-tokens 32 --prefill-layers 0.5
step $speedctl generate --model $trained --chat 'Tell me a fortune.' --max-tokens 48 --temperature 0.7 --seed 7
step $speedctl generate --model $trained --chat 'What does "serendipity" mean?' --max-tokens 8 --json --top-logprobs 2

# ---- the cluster: speedctl up (docs/cluster.md) ------------------------------------------------
# One prefill node, one decode node and the router on this host, with the ports of
# deploy/clusters/1p1d.yaml (router on 8000). speedctl up runs in the background; the trap stops
# the cluster however this script ends.
up_out=build/demo/up.out
up_pid=
stop_cluster() {
  if [ -n "$up_pid" ] && kill -0 "$up_pid" 2>/dev/null; then
    kill -TERM "$up_pid" 2>/dev/null || true
    wait "$up_pid" 2>/dev/null || true
  fi
  up_pid=
}
trap stop_cluster EXIT

show $speedctl up deploy/clusters/1p1d.yaml --model $trained
$speedctl up deploy/clusters/1p1d.yaml --model $trained >"$up_out" 2>&1 &
up_pid=$!
for _ in $(seq 1200); do # 120 s at most; speedctl up has its own start timeout too
  grep -qx ready "$up_out" && break
  if ! kill -0 "$up_pid" 2>/dev/null; then
    cat "$up_out"
    echo "demo: speedctl up failed (output above)" >&2
    exit 1
  fi
  sleep 0.1
done
cat "$up_out"
grep -qx ready "$up_out" || { echo "demo: the cluster did not come up in 120 s" >&2; exit 1; }
router=$(sed -n 's/^router: //p' "$up_out")

# "...\"content\":\"TEXT\"..." → TEXT with its JSON escapes undone (enough for a demo: no jq)
json_text() {
  local s=$1
  s=${s//\\\\/$'\x01'}
  s=${s//\\\"/\"}
  s=${s//\\\//\/}
  printf -v s '%b' "$s"
  printf '%s' "${s//$'\x01'/\\}"
}
content_re='"content":"(([^"\\]|\\.)*)"'

chat='{"model": "fortune-llama", "max_tokens": 48, "stream": true, "messages": [{"role": "user", "content": "Tell me something about computers."}]}'
show curl -sN $router/v1/chat/completions -H 'Content-Type: application/json' -d "$chat"
t0=$EPOCHREALTIME t_first= t_last= n_chunks=0
while IFS= read -r line; do
  [[ $line == data:* ]] || continue
  payload=${line#data: }
  [ "$payload" = "[DONE]" ] && break
  if [[ $payload =~ $content_re ]] && [ -n "${BASH_REMATCH[1]}" ]; then
    t_last=$EPOCHREALTIME
    [ -n "$t_first" ] || t_first=$t_last
    n_chunks=$((n_chunks + 1))
    json_text "${BASH_REMATCH[1]}"
  fi
done < <(curl -sN "$router/v1/chat/completions" -H 'Content-Type: application/json' -d "$chat")
echo
if [ "$n_chunks" -gt 1 ]; then
  awk -v t0="$t0" -v a="$t_first" -v b="$t_last" -v n="$n_chunks" 'BEGIN {
    printf "client side: TTFT %.1f ms, TPOT %.2f ms (between the %d chunks that carried text)\n", (a - t0) * 1e3, (b - a) * 1e3 / (n - 1), n }'
fi
# the router's own histograms (docs/design.md §6: TTFT is true only where the router sees it)
curl -s "$router/metrics" | awk '
  /^speed_router_time_to_first_token_seconds_sum / { ts = $2 } /^speed_router_time_to_first_token_seconds_count / { tc = $2 }
  /^speed_router_inter_token_latency_seconds_sum / { is = $2 } /^speed_router_inter_token_latency_seconds_count / { ic = $2 }
  END { if (tc > 0) printf "router /metrics: mean TTFT %.1f ms over %d request(s)", ts / tc * 1e3, tc
        if (ic > 0) printf ", mean TPOT %.2f ms over %d token gaps", is / ic * 1e3, ic
        if (tc > 0) printf "\n" }'

# The KV the prefill node shipped to the decode node: at speed.prefill_layers 0.75 the upper
# quarter of the layers carries only the anchor and tail tokens of the prompt.
prompt_long="$prompt $prompt $prompt"
body='{"model": "fortune-llama", "max_tokens": 4, "messages": [{"role": "user", "content": "'"$prompt_long"'"}]}'
show curl -s $router/v1/chat/completions -H 'Content-Type: application/json' -d "$body"
reply=$(curl -s "$router/v1/chat/completions" -H 'Content-Type: application/json' -d "$body")
usage=$(grep -o '"usage":{[^}]*}' <<<"$reply" || true)
echo "$usage"
kv=$(grep -o '"kv_bytes":[0-9]*' <<<"$usage" | cut -d: -f2 || true)
full=$(grep -o '"kv_full_depth_bytes":[0-9]*' <<<"$usage" | cut -d: -f2 || true)
if [ -n "$kv" ] && [ -n "$full" ] && [ "$full" -gt 0 ]; then
  awk -v k="$kv" -v f="$full" 'BEGIN { printf "KV shipped: %d bytes = %.1f%% of the %d bytes at full depth\n", k, 100 * k / f, f }'
fi

echo
echo '$ kill -TERM <speedctl up>   # or Ctrl-C in a terminal: router, then prefill, then decode'
kill -TERM "$up_pid"
rc=0
wait "$up_pid" || rc=$?
up_pid=
sed -n '/^stopping/,$p' "$up_out"
[ "$rc" -eq 0 ] || { echo "demo: speedctl up exited $rc" >&2; exit 1; }
