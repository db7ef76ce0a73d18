# sage-cuda: every kernel program compiles with NVRTC (PTX for compute_75, a CUBIN for the
# H100's sm_90), here, with no GPU: a kernel that does not compile fails now, not on a GPU.
# NVRTC comes from NVIDIA's PyPI wheel of CUDA 13.0, the version of cudarc's `cuda-13000`
# feature (driver 580 and newer run what it builds), installed into the ignored .cache/.
set -euo pipefail
source scripts/lib.sh
NVRTC_VERSION=13.0.88
dir=.cache/nvrtc
lib=$dir/nvidia/cu13/lib
if ! compgen -G "$lib/libnvrtc.so.13" >/dev/null; then
  python3 -m pip --version >/dev/null 2>&1 || need_apt python3-pip
  echo "installing nvidia-cuda-nvrtc==$NVRTC_VERSION into $dir"
  python3 -m pip install --quiet --disable-pip-version-check --no-deps --upgrade \
    --target "$dir" "nvidia-cuda-nvrtc==$NVRTC_VERSION" \
    || { echo "error: pip install nvidia-cuda-nvrtc==$NVRTC_VERSION failed" >&2; exit 1; }
fi
compgen -G "$lib/libnvrtc.so.13" >/dev/null \
  || { echo "error: $lib/libnvrtc.so.13 missing after install" >&2; exit 1; }
export LD_LIBRARY_PATH="$PWD/$lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
SAGE_CUDA_REQUIRE_NVRTC=1 cargo test -p sage-cuda --test nvrtc
