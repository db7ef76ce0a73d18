# sage-candle's `cuda` feature (and sage-finetune's, which forwards to it) must compile, here,
# with no GPU: candle 0.9 compiles its CUDA kernels with nvcc at build time and has cudarc link
# the CUDA libraries (`dynamic-linking`), so sage-cuda is built in its `dynamic-linking` mode in
# the same cudarc. nvcc and the headers candle's kernels include come from NVIDIA's PyPI wheels
# of CUDA 13.0 (the version sage-cuda's run-time loading names), installed into the ignored
# .cache/ under a name keyed by the pinned versions. Only libraries (rlibs) and type-checked,
# linted tests are built: nothing is linked into an executable, so cuBLAS, cuRAND, NVRTC and a
# libcuda stub are not needed. Its own target directory: candle's CUDA build does not invalidate the main
# one's artifacts, nor wait on its lock.
set -euo pipefail
source scripts/lib.sh
WHEELS=(
  nvidia-cuda-nvcc==13.0.88
  nvidia-nvvm==13.0.88
  nvidia-cuda-crt==13.0.88
  nvidia-cuda-runtime==13.0.96
  nvidia-cuda-cccl==13.0.85
)
key=$(printf '%s\n' "${WHEELS[@]}" | sha256sum | cut -c1-12)
dir=.cache/cuda-nvcc-$key
root=$PWD/$dir/nvidia/cu13
if [ ! -f "$dir/.complete" ]; then
  python3 -m pip --version >/dev/null 2>&1 || need_apt python3-pip
  echo "installing ${WHEELS[*]} into $dir"
  # Into a fresh directory, marked complete only at the end: an interrupted install is redone.
  rm -rf "$dir"
  python3 -m pip install --quiet --disable-pip-version-check --root-user-action=ignore --no-deps \
    --target "$dir" "${WHEELS[@]}" \
    || { echo "error: pip install ${WHEELS[*]} failed" >&2; exit 1; }
  # The linker looks for unversioned names; the wheels ship only the versioned runtime.
  ln -sfn libcudart.so.13 "$root/lib/libcudart.so"
  touch "$dir/.complete"
fi
for f in bin/nvcc include/cuda.h lib/libcudart.so.13 lib/libcudart.so; do
  [ -e "$root/$f" ] || { echo "error: $root/$f missing after install" >&2; exit 1; }
done
export PATH="$root/bin:$PATH"
# cudarc's build script (link search) and bindgen_cuda's (headers: `$root/include/cuda.h`).
export CUDA_ROOT="$root" CUDA_PATH="$root"
# candle's kernels are compiled for one architecture; with no GPU to ask, the H100's sm_90.
export CUDA_COMPUTE_CAP=90
export LIBRARY_PATH="$root/lib${LIBRARY_PATH:+:$LIBRARY_PATH}"
export LD_LIBRARY_PATH="$root/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export CARGO_TARGET_DIR=target/candle-cuda
nvcc --version | tail -1
cargo build -p sage-candle --features cuda --lib
# Type-checks the tests (and examples) with the feature, and lints what step 10 cannot reach.
cargo clippy -p sage-candle --features cuda --all-targets -- -D warnings
# sage-cuda's own linking mode, alone: its `cfg`s around the run-time loader's probes.
cargo clippy -p sage-cuda --no-default-features --features dynamic-linking --all-targets -- -D warnings
cargo build -p sage-finetune --features cuda --lib
