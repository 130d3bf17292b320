#!/usr/bin/env bash
# Sets up the machine, builds speedserve and runs the whole test suite — twice: a normal
# build, then an AddressSanitizer + UBSan build (every leak, overflow or UB fails a test).
#
#   tests/run.sh                 everything (what CI runs)
#   tests/run.sh --fast          the normal build only
#   tests/run.sh -- -L unit      extra arguments after -- go to ctest
#
# Tokenizer conformance tests read ../shared/data (or $SPEED_TEST_DATA) and are reported
# as Skipped when it is absent.
set -euo pipefail
cd "$(dirname "$0")/.."

sanitize=1
ctest_args=()
while [ $# -gt 0 ]; do
  case "$1" in
    --fast) sanitize=0 ;;
    --) shift; ctest_args=("$@"); break ;;
    *) echo "usage: tests/run.sh [--fast] [-- CTEST_ARGS...]" >&2; exit 2 ;;
  esac
  shift
done

deploy/setup.sh

build_and_test() { # dir, extra cmake args...
  local dir=$1; shift
  echo "== build ($dir)"
  cmake -S . -B "$dir" -DCMAKE_BUILD_TYPE=RelWithDebInfo -DSPEED_WERROR=ON "$@" >/dev/null
  if ! cmake --build "$dir" -j2 >"$dir/build.log" 2>&1; then
    cat "$dir/build.log"; echo "build failed ($dir)" >&2; exit 1
  fi
  echo "== test ($dir)"
  (cd "$dir" && ctest --output-on-failure -j2 "${ctest_args[@]}")
}

build_and_test build
if [ "$sanitize" -eq 1 ]; then
  build_and_test build-asan -DSPEED_SANITIZE=ON
fi
echo "== all tests passed"
