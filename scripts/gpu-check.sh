#!/usr/bin/env bash
# The GPU check of sage-cuda, for a machine with an NVIDIA GPU and no Rust, no network:
# the conformance suite on every backend there (cuda, the NVIDIA OpenCL driver, the CPU levels;
# every check, every vector file; checkpoint resume across every pair), sage-cuda's own GPU
# tests (norm partials on the chunk grid, HostBuffers, gathered norms), then the benchmark
# (Adam-SAGE f32 and bf16-params/f32-state at 16M, 110M, 350M parameters against a
# device-to-device copy of the same bytes, in the same run), then torch's fused AdamW on the
# same tensors when python3 has torch; one table at the end. When the machine has an OpenCL GPU
# (NVIDIA's driver) and sage-opencl-bench was carried, the OpenCL benchmark runs there too
# (64M parameters; one tensor, BERT-base's mix, 10,000 small tensors; the norm pass).
#
# Run from the repository root, with these built on the development machine first
# (scripts/gpu-check.sh --build does it there):
#   target/release/sage-conformance    the conformance runner (package sage-conformance-runner)
#   target/release/sage-cuda-gpu-test  sage-cuda's tests/gpu.rs, built as a test binary
#   target/release/sage-cuda-lib-test  sage-cuda's unit tests (those that need a GPU run there)
#   target/release/sage-cuda-bench     the benchmark
#   target/release/sage-opencl-bench   optional: the OpenCL benchmark, run on an OpenCL GPU
#   target/sage-cuda-ptx/              optional: prebuilt PTX, used only when no libnvrtc is found
#   target/gpu-libs/libOpenCL.so.1    optional: used only when the machine has no OpenCL loader
#                                      (sage-conformance links it for its OpenCL backend)
# and from the tracked tree: conformance/vectors/, bench/torch_adamw.py.
#
# Each part runs under `timeout`, so one hang cannot take the whole budget (about 5 minutes
# at most, 7 with the OpenCL benchmark; typically 2–3). Full logs go to $OUT (the device
# tool's folder) or /tmp/sage-gpu-check.
# Exit status: 0 when conformance passes and both performance targets are met, 1 otherwise.
set -uo pipefail
cd "$(dirname "$0")/.."

if [ "${1:-}" = "--build" ]; then
  # On the development machine: the binaries and the PTX fallback this script uses.
  set -e
  cargo build --release -p sage-conformance-runner -p sage-cuda -p sage-opencl
  gpu_test=$(cargo test --release -p sage-cuda --test gpu --no-run 2>&1 \
    | grep -o 'target/release/deps/gpu-[0-9a-f]*' | head -1)
  cp "$gpu_test" target/release/sage-cuda-gpu-test
  lib_test=$(cargo test --release -p sage-cuda --lib --no-run 2>&1 \
    | grep -o 'target/release/deps/sage_cuda-[0-9a-f]*' | head -1)
  cp "$lib_test" target/release/sage-cuda-lib-test
  nvrtc_lib=.cache/nvrtc/nvidia/cu13/lib
  if [ -d "$nvrtc_lib" ]; then
    LD_LIBRARY_PATH="$PWD/$nvrtc_lib:${LD_LIBRARY_PATH:-}" \
      target/release/sage-cuda-bench --emit-ptx target/sage-cuda-ptx --arch compute_90
  else
    echo "no NVRTC in $nvrtc_lib (run scripts/test.d/25-cuda-nvrtc.sh): no PTX fallback built"
  fi
  # sage-conformance links libOpenCL.so.1 (the OpenCL backend); a GPU machine may have no ICD
  # loader. Carry this one (it needs only libc): with no ICDs it just finds no platform.
  mkdir -p target/gpu-libs
  ocl=$(ldconfig -p | awk '/libOpenCL\.so\.1 .*x86-64/ {print $NF; exit}')
  if [ -n "$ocl" ]; then cp -L "$ocl" target/gpu-libs/libOpenCL.so.1; fi
  strip target/release/sage-conformance target/release/sage-cuda-bench \
    target/release/sage-cuda-gpu-test target/release/sage-cuda-lib-test \
    target/release/sage-opencl-bench 2>/dev/null || true
  du -ch target/release/sage-conformance target/release/sage-cuda-bench \
    target/release/sage-cuda-gpu-test target/release/sage-cuda-lib-test \
    target/release/sage-opencl-bench target/sage-cuda-ptx target/gpu-libs 2>/dev/null | tail -1
  echo "carry: target/release/sage-conformance target/release/sage-cuda-bench target/release/sage-cuda-gpu-test target/release/sage-cuda-lib-test target/release/sage-opencl-bench target/sage-cuda-ptx target/gpu-libs"
  exit 0
fi

LOG=${OUT:-/tmp/sage-gpu-check}
mkdir -p "$LOG"
T_CONF=${SAGE_T_CONFORMANCE:-240}
T_GPUTEST=${SAGE_T_GPUTEST:-60}
T_BENCH=${SAGE_T_BENCH:-110}
T_TORCH=${SAGE_T_TORCH:-80}
T_OPENCL=${SAGE_T_OPENCL_BENCH:-90}
SIZES=${SAGE_BENCH_SIZES:-16M,110M,350M}
started=$(date +%s)
elapsed() { echo "$(( $(date +%s) - started )) s"; }

for b in target/release/sage-conformance target/release/sage-cuda-bench; do
  [ -x "$b" ] || { echo "error: $b missing: build it on the development machine and carry it" >&2; exit 1; }
done

echo "== machine"
timeout 20 nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1 | head -4
echo "$(ldd --version 2>&1 | head -1) (the binaries need glibc 2.34 or newer)"
if ! target/release/sage-conformance --help >/dev/null 2>&1; then
  if [ -f target/gpu-libs/libOpenCL.so.1 ]; then
    export LD_LIBRARY_PATH="$PWD/target/gpu-libs${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
    echo "sage-conformance does not start as is (no libOpenCL.so.1?): adding target/gpu-libs"
  fi
  target/release/sage-conformance --help 2>&1 | grep -i -E 'error|not found' | head -3
fi

# NVRTC: cudarc dlopens libnvrtc.so / libnvrtc.so.13 / .so.12 from the loader path. Look where
# CUDA toolkits and the NVIDIA pip wheels (torch's dependencies) put it.
nvrtc_dir=""
has_nvrtc() { compgen -G "$1/libnvrtc.so*" >/dev/null 2>&1; }
if ldconfig -p 2>/dev/null | grep -q 'libnvrtc\.so'; then
  nvrtc_dir="(system loader path)"
else
  cands=()
  IFS=: read -r -a ldp <<<"${LD_LIBRARY_PATH:-}"
  cands+=("${ldp[@]}")
  if command -v python3 >/dev/null 2>&1; then
    while IFS= read -r d; do cands+=("$d"); done < <(timeout 20 python3 - <<'EOF' 2>/dev/null
import glob, os, site, sys
roots = set(sys.path)
try:
    roots.update(site.getsitepackages())
    roots.add(site.getusersitepackages())
except Exception:
    pass
seen = set()
for r in sorted(roots):
    for pat in ("nvidia/*/lib/libnvrtc.so*", "nvidia/*/lib64/libnvrtc.so*", "nvidia/lib/libnvrtc.so*"):
        for p in sorted(glob.glob(os.path.join(r, pat)), reverse=True):
            d = os.path.dirname(p)
            if d not in seen:
                seen.add(d)
                print(d)
EOF
    )
  fi
  cands+=(/usr/local/cuda/lib64 /usr/local/cuda/targets/x86_64-linux/lib /usr/local/cuda-13*/lib64 \
          /usr/local/cuda-13*/targets/x86_64-linux/lib /usr/local/cuda-12*/lib64 /usr/lib/x86_64-linux-gnu)
  for d in "${cands[@]}"; do
    if [ -n "$d" ] && has_nvrtc "$d"; then
      nvrtc_dir=$d
      export LD_LIBRARY_PATH="$d:${LD_LIBRARY_PATH:-}"
      break
    fi
  done
fi
if [ -n "$nvrtc_dir" ]; then
  echo "NVRTC: $nvrtc_dir (kernels compiled at run time for this GPU)"
elif [ -d target/sage-cuda-ptx ]; then
  export SAGE_CUDA_PTX_DIR="$PWD/target/sage-cuda-ptx"
  echo "NVRTC: not found; using prebuilt PTX from $SAGE_CUDA_PTX_DIR"
else
  echo "NVRTC: not found and no target/sage-cuda-ptx: the backend will report not available"
fi

echo "== conformance (every backend here, all checks, all vector files; limit ${T_CONF} s)"
timeout "$T_CONF" target/release/sage-conformance --backend all --vectors conformance/vectors \
  >"$LOG/conformance.txt" 2>&1
conf_rc=$?
grep -v -E '^\S+ .* pass( |$)' "$LOG/conformance.txt" | grep -v '^vectors from' | head -60
npass=$(grep -c -E ' pass( |$)' "$LOG/conformance.txt" || true)
echo "conformance exit $conf_rc ($npass rows passed) after $(elapsed); full log: $LOG/conformance.txt"
[ "$conf_rc" -eq 124 ] && echo "conformance TIMED OUT after ${T_CONF} s"

gputest_rc=skipped
for t in gpu-test lib-test; do
  bin=target/release/sage-cuda-$t
  [ -x "$bin" ] || continue
  echo "== sage-cuda $t (limit ${T_GPUTEST} s)"
  SAGE_REQUIRE_CUDA=1 timeout "$T_GPUTEST" "$bin" >"$LOG/$t.txt" 2>&1
  rc=$?
  grep -E '^test |test result' "$LOG/$t.txt" | head -40
  echo "$t exit $rc after $(elapsed)"
  if [ "$gputest_rc" = skipped ] || [ "$rc" -ne 0 ]; then gputest_rc=$rc; fi
done
if [ "$gputest_rc" != skipped ] && [ "$gputest_rc" -ne 0 ]; then conf_rc=$gputest_rc; fi

echo "== benchmark (sage-cuda-bench; limit ${T_BENCH} s)"
timeout "$T_BENCH" target/release/sage-cuda-bench --sizes "$SIZES" >"$LOG/bench.txt" 2>&1
bench_rc=$?
grep -v '^ROW' "$LOG/bench.txt" | tail -40
echo "bench exit $bench_rc after $(elapsed)"
[ "$bench_rc" -eq 124 ] && echo "bench TIMED OUT after ${T_BENCH} s"

ocl=target/release/sage-opencl-bench
if [ -x "$ocl" ] && timeout 20 "$ocl" --list 2>/dev/null | grep -q '\[GPU\]'; then
  echo "== OpenCL benchmark on the GPU (sage-opencl-bench; limit ${T_OPENCL} s)"
  timeout 20 "$ocl" --list 2>&1 | grep '\[GPU\]' | head -2
  timeout "$T_OPENCL" "$ocl" --params 64e6 --reps 5 --precision f32,bf16 >"$LOG/opencl-bench.txt" 2>&1
  ocl_rc=$?
  grep -v -E '^\s*$' "$LOG/opencl-bench.txt" | head -90
  echo "opencl bench exit $ocl_rc after $(elapsed)"
  [ "$ocl_rc" -eq 124 ] && echo "opencl bench TIMED OUT after ${T_OPENCL} s"
else
  echo "== OpenCL benchmark: no sage-opencl-bench carried or no OpenCL GPU here, skipped"
fi

torch_rc=skipped
: >"$LOG/torch.txt"
if command -v python3 >/dev/null 2>&1 && timeout 60 python3 -c 'import torch' 2>/dev/null; then
  echo "== torch.optim.AdamW(fused=True) (limit ${T_TORCH} s)"
  timeout "$T_TORCH" python3 bench/torch_adamw.py --sizes "$SIZES" >"$LOG/torch.txt" 2>"$LOG/torch.err"
  torch_rc=$?
  tail -5 "$LOG/torch.err"
  echo "torch exit $torch_rc after $(elapsed)"
else
  echo "== torch: python3 with torch not found, skipped"
fi

echo
echo "== results ($(timeout 10 nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1))"
grep -h '^ROW' "$LOG/bench.txt" "$LOG/torch.txt" 2>/dev/null | awk -F'\t' -v conf_rc="$conf_rc" '
  { n++; impl[n]=$2; st[n]=$3; p[n]=$4; ms[n]=$5; by[n]=$6
    gbs[n] = $6 * $4 / ($5 * 1e-3) / 1e9
    if ($2 == "copy") { copy[$4 "/" $6] = gbs[n]; if (!($4 in anycopy)) anycopy[$4] = gbs[n] } }
  END {
    printf "%-18s %-9s %11s %9s %9s %6s %8s %8s\n", "impl", "storage", "params", "ms", "ns/param", "B/par", "GB/s", "vs copy"
    for (i = 1; i <= n; i++) {
      c = copy[p[i] "/" by[i]]; if (c == "") c = anycopy[p[i]]
      r = (c != "" && c > 0) ? sprintf("%.2f", gbs[i] / c) : "-"
      printf "%-18s %-9s %11d %9.3f %9.4f %6d %8.0f %8s\n", impl[i], st[i], p[i], ms[i], ms[i] * 1e6 / p[i], by[i], gbs[i], r
      if (impl[i] == "sage-adamw" && st[i] == "f32") { sage[p[i]] = ms[i] / p[i]; sager[p[i]] = r }
      if (impl[i] == "torch-adamw-fused" && st[i] == "f32") torch[p[i]] = ms[i] / p[i]
    }
    ok = (conf_rc == 0)
    print ""
    printf "conformance (all backends) and GPU tests: %s\n", conf_rc == 0 ? "PASS" : "FAIL (exit " conf_rc ")"
    key = 110000000
    if (key in sage) {
      good = (sager[key] + 0 >= 0.85)
      printf "f32 Adam-SAGE at 110M: %s of copy bandwidth (target >= 0.85): %s\n", sager[key], good ? "PASS" : "FAIL"
      ok = ok && good
      if (key in torch) {
        q = sage[key] / torch[key]
        printf "f32 Adam-SAGE / torch fused AdamW time per parameter at 110M: %.3f (target <= 1.35; bytes ratio 36/28 = 1.29): %s\n", q, q <= 1.35 ? "PASS" : "FAIL"
        ok = ok && (q <= 1.35)
      } else print "torch fused AdamW: not measured here"
    } else { print "no 110M f32 measurement"; ok = 0 }
    printf "overall: %s\n", ok ? "PASS" : "FAIL"
    exit ok ? 0 : 1
  }' | tee "$LOG/table.txt"
final=${PIPESTATUS[1]}
echo "gpu-check finished in $(elapsed) (logs in $LOG)"
exit "$final"
