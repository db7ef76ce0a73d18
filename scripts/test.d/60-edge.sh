# On-device fine-tuning: the firmware fine-tunes a host-pretrained model to its user's
# handwriting under QEMU on a Cortex-M4F, a Cortex-M0 and an RV32IMC core, with no allocator
# linked, and passes only when fine-tuning beat its bound on every one.
set -euo pipefail
scripts/edge-demo
