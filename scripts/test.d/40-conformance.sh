# The conformance runner over every backend found on this machine, as the README's main job.
set -euo pipefail
cargo run -q --release -p sage-conformance -- --backend all
