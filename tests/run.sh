#!/usr/bin/env bash
# Installs what is missing, builds, and runs the whole test suite under CTest (ends with CTest's summary line).
#
# With CI=true (as .ci/run runs it), or KMSPLUGIN_FULL_RUN=1, it first runs the assurance parts of issue 12, each
# of which must be clean:
#   1. the suite under AddressSanitizer + UndefinedBehaviorSanitizer (build/asan), without the long crash, soak and
#      flood tests (labels `long`, `soak`), which run in the Release suite;
#   2. with KMSPLUGIN_FUZZ_RUN=1, every fuzz target for a bounded time (build/fuzz, tests/fuzz/run.sh;
#      KMSPLUGIN_FUZZ_SECONDS, default 60): not yet in CI, see the comment below;
# then, always, the whole suite in Release (build/test), the crash-safety, limits and soak tests included.
# Each part says how long it took.
set -euo pipefail
cd "$(dirname "$0")/.."

bash deploy/install-deps.sh test
jobs=$(nproc)

part_start=$SECONDS
part_done() {  # name
  echo "== $1: $((SECONDS - part_start)) s"
  part_start=$SECONDS
}

# ccache, where installed, only shortens rebuilds; nothing depends on it.
launcher=()
if command -v ccache >/dev/null; then
  launcher=(-DCMAKE_C_COMPILER_LAUNCHER=ccache -DCMAKE_CXX_COMPILER_LAUNCHER=ccache)
fi
build_suite() {  # build-dir, extra cmake args...
  local dir=$1
  shift
  cmake -S . -B "$dir" -DKMSPLUGIN_TESTS=ON -DKMSPLUGIN_BENCH=ON "${launcher[@]}" "$@" >/dev/null
  cmake --build "$dir" -j"$jobs"
}
run_tests() {  # build-dir, extra ctest args...
  local dir=$1
  shift
  ctest --test-dir "$dir" --output-on-failure -j"$jobs" --timeout 600 "$@"
}

part_done "install"
if [[ "${CI:-}" == "true" || "${KMSPLUGIN_FULL_RUN:-}" == "1" || "${KMSPLUGIN_SANITIZE_RUN:-}" == "1" ]]; then
  echo "== AddressSanitizer + UndefinedBehaviorSanitizer run =="
  build_suite build/asan -DCMAKE_BUILD_TYPE=Debug -DKMSPLUGIN_SANITIZE=ON
  part_done "ASan+UBSan build"
  ASAN_OPTIONS=detect_leaks=1:abort_on_error=1:strict_string_checks=1 \
  UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 \
    run_tests build/asan -LE 'long|soak'
  part_done "ASan+UBSan suite"

  # The bounded fuzzing run (tests/fuzz/run.sh) joins CI once the yaml-cpp timeout it found in the
  # EncryptionConfiguration parser is fixed (issue 12); every target's regression inputs run above and below.
  if [[ "${KMSPLUGIN_FUZZ_RUN:-}" == "1" ]]; then
    echo "== Fuzzing =="
    bash tests/fuzz/run.sh "${KMSPLUGIN_FUZZ_SECONDS:-60}"
    part_done "fuzzing"
  fi
  echo "== Release run =="
fi
build_suite build/test -DCMAKE_BUILD_TYPE=Release
part_done "Release build"
run_tests build/test
