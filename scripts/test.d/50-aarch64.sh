# aarch64: cross-build for aarch64-unknown-linux-gnu and run, under qemu-user, sage-cpu's tests
# (every level, NEON included, against the portable path) and the conformance suite on the
# portable and NEON backends, so the NEON kernels are checked on every run. No OpenCL loader is
# installed for arm64: nothing here links one.
set -euo pipefail
source scripts/lib.sh
need_apt gcc-aarch64-linux-gnu libc6-dev-arm64-cross qemu-user
need_target aarch64-unknown-linux-gnu

triple=aarch64-unknown-linux-gnu
sysroot=/usr/aarch64-linux-gnu
export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER=aarch64-linux-gnu-gcc
# The cross sysroot's libc first: its ld.so hangs with the (newer) libc of the arm64 multiarch
# packages below, whose other libraries are found after it.
export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_RUNNER="qemu-aarch64 -L $sysroot -E LD_LIBRARY_PATH=$sysroot/lib:/usr/lib/aarch64-linux-gnu"

# Doc tests are left out: they run on the host (20-unit.sh) and exercise no NEON code.
cargo test --release --target "$triple" -p sage-cpu --lib --tests
# The suite's library depends on sage-core alone (no OpenCL loader needed): its own tests run
# it on the portable backend; the runner adds every SIMD level (NEON here) and links OpenCL,
# so it is not used on this target.
cargo test --release --target "$triple" -p sage-conformance --test cpu --test simd
