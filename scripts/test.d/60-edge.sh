# On-device fine-tuning: the Cortex-M4F firmware trains under QEMU, with no allocator linked,
# and passes only when training reached its bounds.
set -euo pipefail
scripts/edge-demo
