# The README's main job: the conformance runner (package sage-conformance-runner, binary
# sage-conformance) over every backend found on this machine (debug build: it reuses the test
# step's artifacts, and the suite takes seconds either way).
set -euo pipefail
cargo run -q -p sage-conformance-runner -- --backend all
