# Unit, integration and doc tests of every workspace crate (the conformance suite runs here as
# #[test]s for every backend available on the machine).
set -euo pipefail
cargo test --workspace
