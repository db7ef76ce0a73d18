#!/usr/bin/env bash
# sage-dist on a machine with an NVIDIA GPU and no Rust: the sharded step through NCCL on CUDA
# buffers against one process (examples/nccl-check.rs). Build it on the development machine
# first, without MPI (the GPU machine need not have an MPI library):
#   sage-dist/gpu-check.sh --build      # -> target/sage-dist-gpu/nccl-check
# then, on the GPU machine, from the repository root:
#   sage-dist/gpu-check.sh
# It finds NVRTC (sage-cuda compiles its kernels at run time) and libnccl in the CUDA toolkit
# or NVIDIA's pip wheels (nvidia-cuda-nvrtc, nvidia-nccl-cu13), links libnccl.so.2 as the
# libnccl.so cudarc loads, and runs the check. Exit status: the check's (0 pass, 1 a
# difference, 2 CUDA or NCCL not available).
set -uo pipefail
cd "$(dirname "$0")/.."
out=target/sage-dist-gpu
if [ "${1:-}" = "--build" ]; then
  set -e
  cargo build --release -p sage-dist --features nccl --example nccl-check
  mkdir -p "$out"
  cp target/release/examples/nccl-check "$out/"
  strip "$out/nccl-check" 2>/dev/null || true
  ls -la "$out/nccl-check"
  exit 0
fi
bin=$out/nccl-check
[ -x "$bin" ] || { echo "error: $bin missing (sage-dist/gpu-check.sh --build, then carry $out)" >&2; exit 1; }
timeout 20 nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
find_lib() { # pattern: prints the first directory holding it
  local pat=$1
  if command -v python3 >/dev/null 2>&1; then
    timeout 20 python3 - "$pat" <<'PY' 2>/dev/null
import glob, os, site, sys
roots = set(sys.path)
try:
    roots.update(site.getsitepackages()); roots.add(site.getusersitepackages())
except Exception:
    pass
for r in sorted(roots):
    for p in sorted(glob.glob(os.path.join(r, "nvidia", "*", "lib", sys.argv[1]))):
        print(p); sys.exit(0)
PY
  fi
  for d in /usr/local/cuda/lib64 /usr/local/cuda/targets/x86_64-linux/lib /usr/lib/x86_64-linux-gnu; do
    compgen -G "$d/$pat" | head -1
  done
}
nvrtc=$(find_lib 'libnvrtc.so*' | head -1)
nccl=$(find_lib 'libnccl.so*' | head -1)
echo "NVRTC: ${nvrtc:-not found}"
echo "NCCL:  ${nccl:-not found}"
links=$(mktemp -d)
if [ -n "$nccl" ]; then ln -sf "$nccl" "$links/libnccl.so"; fi
export LD_LIBRARY_PATH="$links${nvrtc:+:$(dirname "$nvrtc")}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
timeout "${SAGE_T_NCCL:-300}" "$bin"
rc=$?
echo "nccl-check exit $rc"
exit $rc
