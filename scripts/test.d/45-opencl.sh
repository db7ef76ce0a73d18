# sage-opencl must really run here, not skip: its tests with a device required (PoCL, from
# 05-opencl-deps), then the benchmark's quick run, the PoCL step beside sage-cpu's.
set -euo pipefail
SAGE_REQUIRE_OPENCL=1 cargo test -q -p sage-opencl
cargo run -q --release -p sage-opencl --bin sage-opencl-bench -- --quick
