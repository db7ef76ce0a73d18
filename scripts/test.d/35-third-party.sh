# A backend crate outside the workspace (tests/third-party-backend: path dependencies on
# sage-core and sage-conformance only) runs the whole suite with one macro line. Its dependency
# tree must hold no backend of this project, no OpenCL and no CUDA binding, and its test binary
# must not link libOpenCL: the suite is usable on a machine with no OpenCL loader.
set -euo pipefail
dir=tests/third-party-backend
# Shares the workspace's target directory: the suite's dependencies are already built there.
export CARGO_TARGET_DIR="$PWD/target"
tree=$(cargo tree --manifest-path "$dir/Cargo.toml" -e normal,dev --prefix none)
if grep -E "^(ocl|ocl-core|cl-sys|cudarc|sage-cpu|sage-cuda|sage-opencl) " <<<"$tree"; then
  echo "error: the third-party crate's dependency tree holds a backend (above)" >&2
  exit 1
fi
echo "third-party dependency tree: $(wc -l <<<"$tree") crates, no backend, no ocl, no cudarc"
(cd "$dir" && cargo fmt -- --check && cargo clippy --all-targets -- -D warnings)
cargo test --manifest-path "$dir/Cargo.toml" --no-run 2>&1 | tee /tmp/third-party-build.log
bin=$(grep -m1 -o "target/debug/deps/conformance-[0-9a-f]*" /tmp/third-party-build.log)
[ -n "$bin" ] || { echo "error: no conformance test binary found" >&2; exit 1; }
if ldd "$bin" | grep -i opencl; then
  echo "error: $bin links libOpenCL" >&2
  exit 1
fi
echo "$bin links no OpenCL loader"
cargo test --manifest-path "$dir/Cargo.toml"
