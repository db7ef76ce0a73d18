# no_std proof: sage-core and sage-cpu's portable path build for a Cortex-M4F, and a #![no_std]
# binary that steps SAGE links with no allocator.
set -euo pipefail
cargo build -p sage-core -p sage-cpu --no-default-features --target thumbv7em-none-eabihf
cargo build --manifest-path tests/nostd-link/Cargo.toml --target thumbv7em-none-eabihf --release
