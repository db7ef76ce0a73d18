//! The sharded step over NCCL on CUDA buffers, against one process, bit for bit — the same
//! scenarios as `dist-check` (MPI) — on a machine with an NVIDIA GPU and libnccl:
//!
//! ```text
//! cargo build --release -p sage-dist --features nccl --example nccl-check
//! sage-dist/gpu-check.sh          # on the GPU machine: finds NVRTC and libnccl, runs it
//! ```
//!
//! One process, one GPU: NCCL refuses two ranks on one device, so the world size here is 1
//! (the communicator, the views of device memory and every collective still run through
//! NCCL). Each configuration runs twice: on CUDA through NCCL, and on the CPU through the
//! single-rank communicator (what `mpiexec -n 1 dist-check` runs, and what `-n 2, 3, 4` equal
//! bit for bit); the final parameters of the two are compared and the difference printed.
//!
//! Exit status: 0 when every CUDA run equals its CUDA oracle bit for bit, 1 on a difference,
//! 2 when CUDA or NCCL is not available here.

#[path = "../tests/support/mod.rs"]
mod support;

use sage_core::bf16;
use sage_cpu::Cpu;
use sage_cuda::Cuda;
use sage_dist::nccl::{nccl_version, NcclComm};
use sage_dist::{Communicator, SelfComm};
use support::*;

fn ulps(a: f32, b: f32) -> u64 {
    let key = |x: f32| {
        let i = x.to_bits() as i32;
        (if i < 0 { i32::MIN - i } else { i }) as i64
    };
    (key(a) - key(b)).unsigned_abs()
}

fn main() {
    let cuda = match Cuda::new(0) {
        Ok(c) => c,
        Err(e) => {
            println!("nccl-check: CUDA not available: {e}");
            std::process::exit(2);
        }
    };
    let version = match nccl_version() {
        Ok(v) => v,
        Err(e) => {
            println!("nccl-check: NCCL not available: {e}");
            std::process::exit(2);
        }
    };
    let mut comm = match NcclComm::single(&cuda) {
        Ok(c) => c,
        Err(e) => {
            println!("nccl-check: NCCL communicator: {e}");
            std::process::exit(2);
        }
    };
    println!(
        "nccl-check on {} with NCCL {version}, world size {} (one GPU), model: {} tensors, {} elements",
        cuda.name(),
        comm.size(),
        LENS.len(),
        LENS.iter().sum::<usize>()
    );
    let mut failed = 0;
    let mut worst_vs_cpu = 0u64;
    let mut identical_to_cpu = 0;
    let make = || cuda.clone();
    let mut n = 0;
    for (label, cfg) in configs() {
        let gpu = run_config::<Cuda, f32, f32, _>(&mut comm, &make, &label, cfg);
        let cpu = run_config::<Cpu, f32, f32, _>(&mut SelfComm, &|| Cpu, &label, cfg);
        match (gpu, cpu) {
            (Ok(g), Ok(c)) => {
                n += 1;
                let mut worst = 0;
                for (a, b) in g.final_params.iter().zip(&c.final_params) {
                    for (x, y) in a.iter().zip(b) {
                        if x.is_finite() && y.is_finite() {
                            worst = worst.max(ulps(*x, *y));
                        } else if x.to_bits() != y.to_bits() && !(x.is_nan() && y.is_nan()) {
                            worst = u64::MAX;
                        }
                    }
                }
                if worst == 0 {
                    identical_to_cpu += 1;
                }
                worst_vs_cpu = worst_vs_cpu.max(worst);
                println!(
                    "  {label:<40} cuda+nccl == cuda oracle bit for bit; vs cpu: worst {worst} ulp"
                );
            }
            (Err(e), _) | (_, Err(e)) => {
                failed += 1;
                println!("  FAIL {e}");
            }
        }
    }
    for (label, cfg) in configs()
        .into_iter()
        .filter(|(l, _)| l.contains("both-clips"))
    {
        let label = format!("{label} [bf16 params]");
        match run_config::<Cuda, bf16, f32, _>(&mut comm, &make, &label, cfg) {
            Ok(_) => println!("  {label:<40} cuda+nccl == cuda oracle bit for bit"),
            Err(e) => {
                failed += 1;
                println!("  FAIL {e}");
            }
        }
    }
    // A sharded checkpoint written from device buffers and read back into fresh ones.
    let dir = std::env::temp_dir().join(format!("sage-dist-nccl-{}", std::process::id()));
    for (label, cfg) in reshard_configs() {
        let sub = dir.join(label.replace(' ', "_"));
        let r = save_phase::<Cuda, f32, f32, _>(&mut comm, &make, &sub, &label, cfg)
            .and_then(|_| resume_phase::<Cuda, f32, f32, _>(&mut comm, &make, &sub, &label, cfg));
        match r {
            Ok(_) => println!("  {label:<40} checkpoint from device buffers, resumed: equal to the uninterrupted run"),
            Err(e) => {
                failed += 1;
                println!("  FAIL {e}");
            }
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
    println!(
        "nccl-check: {n} configurations equal their oracle on CUDA through NCCL; {identical_to_cpu} of them equal the CPU (MPI world-1) run bit for bit, worst difference {worst_vs_cpu} ulp; {failed} failure(s)"
    );
    std::process::exit(if failed == 0 { 0 } else { 1 });
}
