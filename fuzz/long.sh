#!/usr/bin/env bash
# The documented long fuzz run (docs/FUZZING.md): every target (or those named as
# arguments) for FUZZ_RUNS executions each (default 10^7), seeded from fuzz/seeds,
# one after the other, on one core. Prints one summary line per target with the
# executions done, the time taken and the corpus size; stops at the first crash
# (libFuzzer writes the input to fuzz/artifacts/TARGET/). FUZZ_SANITIZER picks
# cargo-fuzz's sanitizer (default address; "none" runs the same inputs several
# times faster, with debug assertions and overflow checks still on).
set -euo pipefail
cd "$(dirname "$0")"
runs="${FUZZ_RUNS:-10000000}"
san="${FUZZ_SANITIZER:-address}"
targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
  targets=(cell setup setup_open peerlist policy config keyfile admin backward socks frag elligator)
fi
if ! command -v cargo-fuzz >/dev/null 2>&1; then
  cargo install cargo-fuzz --locked --quiet
fi
export RUSTC_BOOTSTRAP=1
for t in "${targets[@]}"; do
  corpus="corpus/$t"
  mkdir -p "$corpus"
  cp -n seeds/"$t"/* "$corpus"/ 2>/dev/null || true
  log=$(mktemp)
  start=$(date +%s)
  cargo fuzz run -s "$san" "$t" "$corpus" -- -runs="$runs" -rss_limit_mb=4096 -print_final_stats=1 >"$log" 2>&1 ||
    { tail -n 40 "$log"; echo "fuzz $t: FAILED"; exit 1; }
  end=$(date +%s)
  execs=$(awk '/stat::number_of_executed_units/ { print $NF }' "$log")
  echo "fuzz $t ($san): ${execs:-?} executions in $((end - start)) s, corpus $(ls "$corpus" | wc -l) inputs, no crash"
  rm -f "$log"
done
