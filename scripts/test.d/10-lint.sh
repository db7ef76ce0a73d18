# Formatting and lints: warnings are errors. The edge firmware is its own cargo project
# (bare-metal target), linted for that target.
set -euo pipefail
source scripts/lib.sh
need_target thumbv7em-none-eabihf
cargo fmt --all -- --check
cargo clippy --workspace --all-targets -- -D warnings
(cd edge && cargo fmt --all -- --check && cargo clippy --target thumbv7em-none-eabihf -- -D warnings)
(cd tests/nostd-link && cargo fmt -- --check && cargo clippy --target thumbv7em-none-eabihf -- -D warnings)
