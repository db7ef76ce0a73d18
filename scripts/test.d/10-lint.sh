# Formatting and lints: warnings are errors. The edge firmware is its own cargo project
# (bare-metal target), linted for that target.
set -euo pipefail
source scripts/lib.sh
need_target thumbv7em-none-eabihf thumbv6m-none-eabi riscv32imc-unknown-none-elf
cargo fmt --all -- --check
cargo clippy --workspace --all-targets -- -D warnings
(cd edge && cargo fmt --all -- --check \
  && for t in thumbv7em-none-eabihf thumbv6m-none-eabi riscv32imc-unknown-none-elf; do
    cargo clippy --target "$t" -- -D warnings || exit 1
  done)
# The host pretraining program, from the root (edge/.cargo/config.toml sets a bare-metal target).
cargo fmt --manifest-path edge/pretrain/Cargo.toml -- --check
cargo clippy --manifest-path edge/pretrain/Cargo.toml -- -D warnings
(cd tests/nostd-link && cargo fmt -- --check && cargo clippy --target thumbv7em-none-eabihf -- -D warnings)
