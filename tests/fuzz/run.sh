#!/usr/bin/env bash
# Builds the libFuzzer targets (clang-14, its own build directory) and runs each one for a
# while on a scratch copy of its seed corpus. Fails if any target crashes, leaks, times out
# or breaks an invariant; prints executions and coverage per target. docs/fuzzing.md.
#
#   tests/fuzz/run.sh                    short form (CI): 6 s per target
#   tests/fuzz/run.sh --seconds 300      long form: 5 minutes per target
#   tests/fuzz/run.sh --seconds 60 fuzz_kv_desc fuzz_http_client    some targets only
#
# Options: --seconds N (per target), --build DIR (default build-fuzz), --keep (leave the
# scratch corpora and artifacts in DIR/fuzz-work), --no-build (use the targets already built).
# A crash leaves its input in DIR/fuzz-work/<target>/ (crash-*, leak-*, timeout-*, oom-*);
# reproduce with DIR/fuzz/<target> <that file> (SPEED_FUZZ_LOG=1 shows the code's own log).
set -euo pipefail
cd "$(dirname "$0")/../.."
src=$PWD

seconds=6
build=build-fuzz
keep=0
do_build=1
targets=()
while [ $# -gt 0 ]; do
  case "$1" in
    --seconds) seconds=$2; shift ;;
    --build) build=$2; shift ;;
    --keep) keep=1 ;;
    --no-build) do_build=0 ;;
    fuzz_*) targets+=("$1") ;;
    *) echo "usage: tests/fuzz/run.sh [--seconds N] [--build DIR] [--keep] [--no-build] [fuzz_TARGET...]" >&2
       exit 2 ;;
  esac
  shift
done

cc=${CC:-clang-14}
if ! command -v "$cc" >/dev/null 2>&1; then
  echo "fuzz: $cc not found (deploy/setup.sh installs clang-14 and libfuzzer-14-dev)" >&2
  exit 1
fi

if [ "$do_build" -eq 1 ]; then
  echo "== fuzz build ($build, $cc)"
  t0=$(date +%s)
  # -O1: the usual fuzzing level (fast to build, keeps the code close to the source)
  CC=$cc cmake -S . -B "$build" -DCMAKE_BUILD_TYPE=RelWithDebInfo -DCMAKE_C_FLAGS_RELWITHDEBINFO="-O1 -g" \
    -DSPEED_WERROR=ON -DSPEED_CUDA=OFF -DSPEED_FUZZ=ON >/dev/null
  if ! cmake --build "$build" -j2 --target speed_fuzz >"$build/fuzz-build.log" 2>&1; then
    cat "$build/fuzz-build.log"; echo "fuzz build failed" >&2; exit 1
  fi
  echo "   built in $(( $(date +%s) - t0 )) s"
fi

if [ ${#targets[@]} -eq 0 ]; then
  for f in "$build"/fuzz/fuzz_*; do targets+=("$(basename "$f")"); done
fi

work=$build/fuzz-work
rm -rf "$work"
mkdir -p "$work"
failed=()
printf '%-22s %12s %10s %8s %8s %6s  %s\n' target executions exec/s cov ft corpus result
for t in "${targets[@]}"; do
  name=${t#fuzz_}
  dir=$work/$t
  mkdir -p "$dir/corpus"
  cp -r "$src/tests/fuzz/corpus/$name/." "$dir/corpus/"
  dict=()
  [ -f "$src/tests/fuzz/dict/$name.dict" ] && dict=(-dict="$src/tests/fuzz/dict/$name.dict")
  set +e
  # -jobs is not used: one process per target keeps the machine usable (two shared cores).
  # -rss_limit_mb: a parser that takes more than this on a small input is a finding too.
  ASAN_OPTIONS=detect_leaks=1:abort_on_error=0 UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1 \
    "$build/fuzz/$t" -max_total_time="$seconds" -timeout=10 -rss_limit_mb=1024 -max_len=16384 \
    -print_final_stats=1 -artifact_prefix="$dir/" "${dict[@]}" "$dir/corpus" >"$dir/log" 2>&1
  rc=$?
  set -e
  execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$dir/log" | tail -1)
  rate=$(sed -n 's/^stat::average_exec_per_sec: *//p' "$dir/log" | tail -1)
  last=$(grep -E '^#[0-9]+' "$dir/log" | tail -1)
  cov=$(sed -n 's/.* cov: \([0-9]*\).*/\1/p' <<<"$last")
  ft=$(sed -n 's/.* ft: \([0-9]*\).*/\1/p' <<<"$last")
  corp=$(sed -n 's/.* corp: \([0-9]*\)\/.*/\1/p' <<<"$last")
  if [ "$rc" -eq 0 ]; then result=ok; else result="FAILED (rc $rc)"; failed+=("$t"); fi
  printf '%-22s %12s %10s %8s %8s %6s  %s\n' "$t" "${execs:-?}" "${rate:-?}" "${cov:-?}" "${ft:-?}" "${corp:-?}" "$result"
done

for t in "${failed[@]}"; do
  echo "== $t: last lines of $work/$t/log"
  grep -v '^#[0-9]' "$work/$t/log" | tail -40
  ls "$work/$t"/crash-* "$work/$t"/leak-* "$work/$t"/timeout-* "$work/$t"/oom-* 2>/dev/null || true
done
if [ ${#failed[@]} -gt 0 ]; then
  echo "fuzz: ${#failed[@]} target(s) failed: ${failed[*]} (inputs kept in $work)" >&2
  exit 1
fi
[ "$keep" -eq 1 ] || rm -rf "$work"
echo "== fuzz: all ${#targets[@]} targets ran ${seconds} s each without a finding"
