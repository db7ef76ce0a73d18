# sage-dist: SAGE with sharded state (ZeRO stage 1) over MPI and NCCL.
# - MPICH from Debian (mpiexec -n 4 runs on 2 cores) and libclang (rsmpi's bindings).
# - Lints the crate with both transports (the workspace lint builds it without them).
# - Builds the examples with MPI and NCCL (NCCL is loaded at run time: compiled here, run on a
#   GPU machine only, by sage-dist/gpu-check.sh).
# - Under mpiexec -n 1, 2, 3, 4: the sharded step equals one process bit for bit (every
#   algorithm and preset, global and per-tensor clipping, absent tensors, a NaN and an Inf on
#   one rank), and each rank's state memory is printed.
# - A sharded checkpoint saved on 4, 1 and 3 ranks resumes on 1, 2, 3 and 4 bit for bit.
# - Data-parallel training of an MLP on 2 ranks against one process.
set -euo pipefail
source scripts/lib.sh
need_apt mpich libmpich-dev libclang-dev

cargo clippy -p sage-dist --all-targets --features mpi,nccl -- -D warnings
cargo build --release -p sage-dist --features mpi,nccl --examples
bin=target/release/examples
# sed reads all of it: `head` would close the pipe early and, under pipefail, fail the step
# whenever mpiexec is still writing (SIGPIPE; seen on a loaded machine).
mpiexec --version | sed -n 1p

for n in 1 2 3 4; do
  echo "--- mpiexec -n $n dist-check"
  mpiexec -n "$n" "$bin/dist-check"
done

dir=$(mktemp -d)
trap 'rm -rf "$dir"' EXIT
echo "--- sharded checkpoints across world sizes"
mpiexec -n 4 "$bin/dist-check" save "$dir/on4"
for n in 1 2 3; do mpiexec -n "$n" "$bin/dist-check" resume "$dir/on4"; done
mpiexec -n 1 "$bin/dist-check" save "$dir/on1"
mpiexec -n 4 "$bin/dist-check" resume "$dir/on1"
mpiexec -n 3 "$bin/dist-check" save "$dir/on3"
mpiexec -n 2 "$bin/dist-check" resume "$dir/on3"

echo "--- data-parallel training, 2 ranks against one process"
mpiexec -n 2 "$bin/dp-train" --epochs 3

echo "--- the NCCL check: built; it needs a GPU and libnccl (sage-dist/gpu-check.sh)"
"$bin/nccl-check" || [ $? -eq 2 ]
