# no_std proof: sage-core and sage-cpu's portable path build for a Cortex-M4F, and a #![no_std]
# binary that steps SAGE over static buffers links with no allocator.
set -euo pipefail
source scripts/lib.sh
need_target thumbv7em-none-eabihf
cargo build -p sage-core -p sage-cpu --no-default-features --target thumbv7em-none-eabihf
cargo build --manifest-path tests/nostd-link/Cargo.toml --target thumbv7em-none-eabihf --release
elf=tests/nostd-link/target/thumbv7em-none-eabihf/release/sage-nostd-link
syms=$(nm "$elf")
grep -q " T _start" <<<"$syms" || { echo "error: $elf has no _start: the link proof is void" >&2; exit 1; }
if grep -E "__rust_alloc|__rg_alloc|__rust_no_alloc_shim" <<<"$syms"; then
  echo "error: an allocator is linked into the no_std binary" >&2
  exit 1
fi
echo "no_std link ok: $(stat -c %s "$elf") bytes, no allocator symbols"
