#!/usr/bin/env bash
# Static checks of deploy/monitoring with the tools Prometheus ships (tests/ops/CMakeLists.txt):
#   promtool check config   prometheus.yml (and the rule files it names)
#   promtool check rules    rules/*.yml
#   promtool test rules     tests/alerts_test.yml: every alert fires on synthetic series that
#                           should fire it and stays quiet on ones that should not
#   targets.sh              writes the targets of deploy/clusters/1p1d.yaml exactly as
#                           targets/local.json has them, and of 2p1d.yaml with the right ports
# Usage: check_monitoring.sh SOURCE_DIR SPEED_ROUTER. Exits 77 when promtool is not installed.
set -euo pipefail
src=$1
router=$2
if ! command -v promtool >/dev/null 2>&1; then
  echo "SKIP: promtool not installed (Debian package prometheus; deploy/setup.sh)"
  exit 77
fi
mon=$src/deploy/monitoring
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
fail=0
run() {
  if ! out=$("$@" 2>&1); then
    echo "FAILED: $*"
    echo "$out"
    fail=1
  fi
}
run promtool check config "$mon/prometheus.yml"
run promtool check rules "$mon"/rules/*.yml
run promtool test rules "$mon/tests/alerts_test.yml"

SPEED_ROUTER=$router "$mon/targets.sh" "$src/deploy/clusters/1p1d.yaml" > "$tmp/1p1d.json"
if ! diff -u "$mon/targets/local.json" "$tmp/1p1d.json"; then
  echo "FAILED: targets/local.json is not what targets.sh writes for deploy/clusters/1p1d.yaml"
  fail=1
fi
SPEED_ROUTER=$router "$mon/targets.sh" "$src/deploy/clusters/2p1d.yaml" --router.metrics_port 9100 > "$tmp/2p1d.json"
want='[
  {"targets": ["127.0.0.1:9100"], "labels": {"component": "router"}},
  {"targets": ["127.0.0.1:8200", "127.0.0.1:8201"], "labels": {"component": "prefill"}},
  {"targets": ["127.0.0.1:8400"], "labels": {"component": "decode"}}
]'
if [ "$(cat "$tmp/2p1d.json")" != "$want" ]; then
  echo "FAILED: targets.sh for 2p1d.yaml:"
  cat "$tmp/2p1d.json"
  fail=1
fi
if SPEED_ROUTER=$router "$mon/targets.sh" "$tmp/missing.yaml" > /dev/null 2>&1; then
  echo "FAILED: targets.sh accepted a missing config"
  fail=1
fi
[ $fail -eq 0 ] && echo "monitoring files: ok"
exit $fail
