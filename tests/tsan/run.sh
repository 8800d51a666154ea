#!/usr/bin/env bash
# Builds the project with ThreadSanitizer in build/tsan (a third build directory, beside the Release build/test
# and the AddressSanitizer build/asan) and runs the whole CTest suite under it. Exits non-zero if a test fails or
# if any process of the run (a test binary, or a kmsplugin daemon or CLI that a test started) wrote a TSan report.
#
#   bash tests/tsan/run.sh [extra ctest arguments, e.g. -R 'Vault' or -LE soak]
#
# Compiler: gcc-12, the toolchain Debian built the packaged gRPC, protobuf, abseil and libcurl with (same
# libstdc++), and whose libtsan is a shared runtime that every library of the process shares. The packaged
# libraries are not instrumented: what TSan must still be told about them is in tests/tsan/absl_sync_annotations.cc
# (abseil's Mutex) and tests/tsan/tsan.supp (each entry explained).
set -euo pipefail
cd "$(dirname "$0")/../.."
root=$(pwd)
dir=${KMSPLUGIN_TSAN_DIR:-build/tsan}
jobs=$(nproc)

launcher=()
if command -v ccache >/dev/null; then
  launcher=(-DCMAKE_C_COMPILER_LAUNCHER=ccache -DCMAKE_CXX_COMPILER_LAUNCHER=ccache)
fi
cmake -S . -B "$dir" -DCMAKE_BUILD_TYPE=Debug -DKMSPLUGIN_TSAN=ON -DKMSPLUGIN_TESTS=ON -DKMSPLUGIN_BENCH=ON \
  -DCMAKE_C_COMPILER=gcc-12 -DCMAKE_CXX_COMPILER=g++-12 "${launcher[@]}" >/dev/null
cmake --build "$dir" -j"$jobs"

# TSan's runtime (gcc 12's, from LLVM 15) maps its shadow at fixed addresses that assume at most 28 bits of mmap
# randomisation; kernels set to more (vm.mmap_rnd_bits=32 on some distributions) make every instrumented process
# die with "FATAL: ThreadSanitizer: unexpected memory mapping". There the suite runs with ASLR off for it and its
# children (setarch -R; the personality is inherited across fork and exec).
aslr=()
rnd_bits=$(cat /proc/sys/vm/mmap_rnd_bits 2>/dev/null || echo 28)
if ((rnd_bits > 28)); then
  echo "vm.mmap_rnd_bits=$rnd_bits: running the suite under setarch -R (TSan needs at most 28)"
  aslr=(setarch "$(uname -m)" -R)
fi

# Every report of every process goes to its own file (report.<program>.<pid>), whatever the process's exit status
# means to the test that started it: a daemon that a test stops with SIGTERM and whose status it does not check
# still fails the run here. halt_on_error stops a process at its first report.
reports="$root/$dir/tsan-reports"
rm -rf "$reports"
mkdir -p "$reports"
export TSAN_OPTIONS="halt_on_error=1:second_deadlock_stack=1:suppressions=$root/tests/tsan/tsan.supp:log_path=$reports/report:log_exe_name=1:${TSAN_OPTIONS_EXTRA:-}"

status=0
"${aslr[@]}" ctest --test-dir "$dir" --output-on-failure -j"$jobs" --timeout 900 "$@" || status=$?

shopt -s nullglob
found=("$reports"/report.*)
if ((${#found[@]} > 0)); then
  echo "== ThreadSanitizer reports (${#found[@]} processes) =="
  for f in "${found[@]}"; do
    echo "--- $f"
    cat "$f"
  done
  status=1
fi
if ((status == 0)); then
  echo "ThreadSanitizer run: clean"
fi
exit "$status"
