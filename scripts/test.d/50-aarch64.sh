# aarch64: cross-build for aarch64-unknown-linux-gnu and run, under qemu-user, sage-cpu's tests
# (every level, NEON included, against the portable path) and the conformance suite, so the NEON
# kernels are checked on every run.
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

# sage-opencl links libOpenCL: the arm64 ICD loader lets the suite link; with no OpenCL driver
# for arm64 it reports OpenCL as not available, as on any machine without one.
if cargo tree -q -p sage-conformance --target "$triple" -e normal -i cl-sys >/dev/null 2>&1; then
  if ! dpkg --print-foreign-architectures | grep -qx arm64; then
    dpkg --add-architecture arm64
    unset SAGE_APT_UPDATED
  fi
  need_apt ocl-icd-libopencl1:arm64 ocl-icd-opencl-dev:arm64
fi

# Doc tests are left out: they run on the host (20-unit.sh) and exercise no NEON code.
cargo test --release --target "$triple" -p sage-cpu --lib --tests
cargo run --release --target "$triple" -p sage-conformance -- --backend cpu
