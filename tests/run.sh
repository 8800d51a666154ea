#!/usr/bin/env bash
# Installs what is missing, builds, and runs the whole test suite under CTest (ends with CTest's summary line).
# With CI=true (as .ci/run runs it) the suite runs a second time under AddressSanitizer and
# UndefinedBehaviorSanitizer, in a second build directory; both runs must be clean.
set -euo pipefail
cd "$(dirname "$0")/.."

bash deploy/install-deps.sh test
jobs=$(nproc)

run_suite() {  # build-dir, extra cmake args...
  local dir=$1
  shift
  cmake -S . -B "$dir" -DKMSPLUGIN_TESTS=ON -DKMSPLUGIN_BENCH=ON "$@" >/dev/null
  cmake --build "$dir" -j"$jobs"
  ctest --test-dir "$dir" --output-on-failure -j"$jobs" --timeout 600
}

if [[ "${CI:-}" == "true" || "${KMSPLUGIN_SANITIZE_RUN:-}" == "1" ]]; then
  echo "== AddressSanitizer + UndefinedBehaviorSanitizer run =="
  ASAN_OPTIONS=detect_leaks=1:abort_on_error=1:strict_string_checks=1 \
  UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 \
    run_suite build/asan -DCMAKE_BUILD_TYPE=Debug -DKMSPLUGIN_SANITIZE=ON
  echo "== Release run =="
fi
run_suite build/test -DCMAKE_BUILD_TYPE=Release
