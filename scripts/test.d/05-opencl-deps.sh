# OpenCL for sage-opencl: the ICD loader (libOpenCL, needed to link the workspace) and PoCL (an
# OpenCL driver for the CPU), so the whole conformance suite runs on OpenCL on every CI run.
set -euo pipefail
source scripts/lib.sh
need_apt ocl-icd-opencl-dev pocl-opencl-icd
