#!/usr/bin/env bash
# Writes the Prometheus file-service-discovery targets (JSON, on stdout) of a cluster config:
# the router's metrics address and every prefill and decode replica's HTTP port, each group
# labelled component=router|prefill|decode. The config is resolved by speed-router itself
# (--print-config: file, SPEED_* environment and defaults), so it agrees with what the
# processes listen on.
#   deploy/monitoring/targets.sh CLUSTER.yaml [cluster options...] > deploy/monitoring/targets/mine.json
# speed-router is taken from $SPEED_ROUTER, else from PATH.
set -euo pipefail
if [ $# -lt 1 ]; then
  echo "usage: $0 CLUSTER.yaml [cluster options...]" >&2
  exit 2
fi
router=${SPEED_ROUTER:-speed-router}
config=$1
shift
if ! resolved=$("$router" --config "$config" "$@" --print-config 2>&1); then
  echo "$0: $router could not resolve $config: $resolved" >&2
  exit 1
fi
# The printed config is YAML, one key per line, sections by indentation; flatten to key=value.
flat=$(printf '%s\n' "$resolved" | awk '
  /^[a-z_]+:[ ]*$/ { section = $1; sub(":", "", section); next }
  /^[a-z_]+:/ { key = $1; sub(":", "", key); v = $0; sub(/^[^:]*:[ ]*/, "", v); sub(/[ ]+#.*/, "", v);
                gsub(/"/, "", v); print key "=" v; next }
  /^  [a-z_]+:/ { key = $1; sub(":", "", key); v = $0; sub(/^[^:]*:[ ]*/, "", v); sub(/[ ]+#.*/, "", v);
                  gsub(/"/, "", v); print section "." key "=" v }')
get() { printf '%s\n' "$flat" | awk -F= -v k="$1" '$1 == k { sub(/^[^=]*=/, ""); print; exit }'; }

host=$(get host)
listen=$(get router.listen)
case "$listen" in "" | 0.0.0.0 | ::) listen=$host ;; esac
mport=$(get router.metrics_port)
rport=$(get router.port)
[ "${mport:-0}" != 0 ] && rport=$mport
metrics_listen=$(get metrics.listen)
case "$metrics_listen" in "" | 0.0.0.0 | ::) metrics_listen=$host ;; esac
[ "${mport:-0}" != 0 ] && listen=$metrics_listen

pool() { # pool name -> a JSON list of "addr:port"
  local n base hosts out="" i addr
  n=$(get "$1.replicas")
  base=$(get "$1.http_port")
  hosts=$(get "$1.hosts")
  IFS=, read -r -a list <<< "$hosts"
  for ((i = 0; i < n; i++)); do
    addr=$host
    if [ ${#list[@]} -gt 0 ]; then addr=$(echo "${list[$i]}" | tr -d ' '); fi
    out+="${out:+, }\"$addr:$((base + i))\""
  done
  printf '[%s]' "$out"
}

printf '[\n'
printf '  {"targets": ["%s:%s"], "labels": {"component": "router"}},\n' "$listen" "$rport"
printf '  {"targets": %s, "labels": {"component": "prefill"}},\n' "$(pool prefill)"
printf '  {"targets": %s, "labels": {"component": "decode"}}\n' "$(pool decode)"
printf ']\n'
