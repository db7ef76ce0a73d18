# Fuzzes sage-checkpoint's loader (cargo fuzz, target `load`) for a bounded time, starting from
# seed checkpoints written by the crate's `fuzz_seeds` example; fails on any crash.
# cargo-fuzz needs nightly flags: RUSTC_BOOTSTRAP=1 lets the stable toolchain accept them.
# SAGE_FUZZ_SECONDS sets the time (default 30).
set -euo pipefail
source scripts/lib.sh
need_apt g++ # libfuzzer-sys compiles libFuzzer (C++)
if ! command -v cargo-fuzz >/dev/null 2>&1; then
  cargo install --locked cargo-fuzz || { echo "error: cargo install cargo-fuzz failed" >&2; exit 1; }
fi
corpus=sage-checkpoint/fuzz/corpus/load
cargo run -q -p sage-checkpoint --example fuzz_seeds -- "$corpus"
cd sage-checkpoint
RUSTC_BOOTSTRAP=1 cargo fuzz run load "fuzz/corpus/load" -- \
  -max_total_time="${SAGE_FUZZ_SECONDS:-30}" -max_len=65536 -rss_limit_mb=2048
