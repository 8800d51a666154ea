#!/usr/bin/env bash
# Fuzzes every parser for a bounded time: tests/fuzz/run.sh [SECONDS_PER_TARGET]  (default 60)
#
# Configures and builds build/fuzz with clang-14 (libFuzzer, ASan+UBSan; KMSPLUGIN_FUZZ=ON), then runs each target
# of tests/fuzz/CMakeLists.txt for SECONDS_PER_TARGET, as many at once as there are cores, over its seed corpus
# (tests/fuzz/corpus/<target>), its regressions and its dictionary. New corpus entries and crash inputs go to a
# temporary directory, never into the repository. Fails (exit 1) on any crash, leak, timeout (-timeout=10) or
# out-of-memory (-rss_limit_mb=2048), printing the reproducer; keep that file in tests/fuzz/regressions/<target>/
# once the parser is fixed, so CTest's fuzz-regression label runs it in every build.
# Wall time: about targets x SECONDS / cores, plus the build.
set -euo pipefail

seconds="${1:-60}"
if ! [[ "$seconds" =~ ^[0-9]+$ ]] || ((seconds < 1)); then
  echo "usage: $0 [SECONDS_PER_TARGET]" >&2
  exit 2
fi
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
build="$root/build/fuzz"
fuzz_dir="$root/tests/fuzz"
jobs="$(nproc)"

launcher=()
if command -v ccache >/dev/null; then
  launcher=(-DCMAKE_C_COMPILER_LAUNCHER=ccache -DCMAKE_CXX_COMPILER_LAUNCHER=ccache)
fi
build_start=$SECONDS
CC=clang-14 CXX=clang++-14 cmake -S "$root" -B "$build" -DCMAKE_BUILD_TYPE=Debug -DKMSPLUGIN_FUZZ=ON \
  -DKMSPLUGIN_TESTS=OFF -DKMSPLUGIN_BENCH=OFF "${launcher[@]}" >"$build.configure.log" 2>&1 ||
  { cat "$build.configure.log"; exit 1; }
mapfile -t targets <"$build/fuzz_targets.txt"
cmake --build "$build" -j"$jobs" --target "${targets[@]}"
echo "build: $((SECONDS - build_start)) s"

work="$(mktemp -d "${TMPDIR:-/tmp}/kmsplugin-fuzz.XXXXXX")"
export ASAN_OPTIONS="detect_leaks=1:abort_on_error=0:symbolize=1"
export UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1"

run_one() {  # target -> logs/<target>.log, artifacts/<target>/, status/<target>
  local t="$1"
  mkdir -p "$work/corpus/$t" "$work/artifacts/$t"
  local args=(-max_total_time="$seconds" -timeout=10 -rss_limit_mb=2048 -detect_leaks=1 -print_final_stats=1
              -artifact_prefix="$work/artifacts/$t/")
  [[ -f "$fuzz_dir/dict/$t.dict" ]] && args+=(-dict="$fuzz_dir/dict/$t.dict")
  local inputs=("$work/corpus/$t" "$fuzz_dir/corpus/$t")
  [[ -d "$fuzz_dir/regressions/$t" ]] && inputs+=("$fuzz_dir/regressions/$t")
  local rc=0 timer=()
  # CPU seconds too (GNU time, if there): on a shared machine exec/s says more about the load than the target.
  [[ -x /usr/bin/time ]] && timer=(/usr/bin/time -f '%U %S' -o "$work/cpu/$t")
  (cd "$work" && "${timer[@]}" "$build/tests/fuzz/$t" "${args[@]}" "${inputs[@]}") >"$work/logs/$t.log" 2>&1 || rc=$?
  echo "$rc" >"$work/status/$t"
  echo "fuzzed $t: exit $rc"
}
export -f run_one
export work seconds fuzz_dir build
mkdir -p "$work/logs" "$work/status" "$work/cpu"
run_start=$SECONDS
printf '%s\n' "${targets[@]}" | xargs -P "$jobs" -I{} bash -c 'run_one "$@"' _ {}
echo "fuzzing: $((SECONDS - run_start)) s for ${#targets[@]} targets x ${seconds} s, ${jobs} at a time"

failed=0
printf '\n%-26s %12s %9s %7s %8s %8s  %s\n' target executions exec/s cov ft cpu_s result
for t in "${targets[@]}"; do
  log="$work/logs/$t.log"
  rc="$(cat "$work/status/$t" 2>/dev/null || echo missing)"
  # libFuzzer's last status line: "#N DONE cov: C ft: F corp: ... exec/s: E rss: ..." (or the last "#N ..." before a crash).
  last="$(grep -E '^#[0-9]+' "$log" | tail -n 1 || true)"
  runs="$(sed -nE 's/^stat::number_of_executed_units: *([0-9]+).*/\1/p' "$log" | tail -n 1)"
  [[ -z "$runs" ]] && runs="$(sed -nE 's/^#([0-9]+).*/\1/p' <<<"$last")"
  rate="$(sed -nE 's/^stat::average_exec_per_sec: *([0-9]+).*/\1/p' "$log" | tail -n 1)"
  [[ -z "$rate" ]] && rate="$(sed -nE 's/.*exec\/s: ([0-9]+).*/\1/p' <<<"$last")"
  cov="$(sed -nE 's/.*cov: ([0-9]+).*/\1/p' <<<"$last")"
  ft="$(sed -nE 's/.*ft: ([0-9]+).*/\1/p' <<<"$last")"
  cpu="$(awk 'NF == 2 && $1 ~ /^[0-9.]+$/ { printf "%.0f", $1 + $2 }' "$work/cpu/$t" 2>/dev/null || true)"
  result=ok
  if [[ "$rc" != 0 ]]; then
    failed=1
    reproducer="$(ls -1 "$work/artifacts/$t"/* 2>/dev/null | head -n 1 || true)"
    kind="$(grep -oE 'ERROR: (libFuzzer|AddressSanitizer|LeakSanitizer|UndefinedBehaviorSanitizer): [a-z -]+' "$log" | head -n 1 || true)"
    [[ -z "$kind" ]] && kind="$(grep -m1 -E 'runtime error|deadly signal|timeout|out-of-memory' "$log" || echo "exit $rc")"
    result="FAILED ($kind)"
    {
      echo "== $t failed: $kind"
      grep -m 30 -E '^(==|SUMMARY|    #[0-9]|.*runtime error)' "$log" || true
      echo "   log:        $log"
      echo "   reproducer: ${reproducer:-none written}"
      echo "   reproduce:  $build/tests/fuzz/$t ${reproducer:-<input>}"
      echo "   then fix the parser and keep the input: cp ${reproducer:-<input>} $fuzz_dir/regressions/$t/"
    } >&2
  fi
  printf '%-26s %12s %9s %7s %8s %8s  %s\n' "$t" "${runs:--}" "${rate:--}" "${cov:--}" "${ft:--}" "${cpu:--}" "$result"
done
if ((failed)); then
  echo "fuzzing found problems; inputs and logs kept in $work" >&2
  exit 1
fi
rm -rf "$work"
