#!/usr/bin/env bash
# Bounded fuzz smoke run for CI: every target, seeded from fuzz/seeds, for
# FUZZ_SECONDS each (default 20). Uses cargo-fuzz (installed if missing) on the
# stable toolchain with RUSTC_BOOTSTRAP=1 for the sanitizer flags.
set -euo pipefail
cd "$(dirname "$0")"
secs="${FUZZ_SECONDS:-20}"
if ! command -v cargo-fuzz >/dev/null 2>&1; then
  cargo install cargo-fuzz --locked --quiet
fi
export RUSTC_BOOTSTRAP=1
for t in cell setup setup_open peerlist policy config keyfile admin backward socks frag elligator; do
  corpus=$(mktemp -d)
  cp seeds/"$t"/* "$corpus"/ 2>/dev/null || true
  echo "fuzz $t for ${secs}s ($(ls "$corpus" | wc -l) seeds)"
  cargo fuzz run "$t" "$corpus" -- -max_total_time="$secs" -rss_limit_mb=4096 2>&1 | tail -n 3
  rm -rf "$corpus"
done
