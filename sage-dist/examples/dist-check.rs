//! The sharded step against one process, bit for bit, over MPI: run under `mpiexec -n N`.
//!
//! ```text
//! mpiexec -n 4 target/release/examples/dist-check            every configuration, 4 storage/backend combinations
//! mpiexec -n 4 target/release/examples/dist-check save DIR   run, save a sharded checkpoint into DIR, run on
//! mpiexec -n 2 target/release/examples/dist-check resume DIR load it (any world size), run on
//! ```
//!
//! Every rank also runs the single-process oracle (sage-core's plain `Optimizer` on the whole
//! model) and compares after every step; any difference aborts every rank with exit status 1.

#[path = "../tests/support/mod.rs"]
mod support;

use std::path::PathBuf;

use sage_core::{bf16, Algorithm, Config, Element, ParamGroup};
use sage_cpu::{Cpu, SimdCpu};
use sage_dist::mpi::MpiComm;
use sage_dist::{Communicator, ShardedOptimizer};
use support::*;

fn fail(comm: &MpiComm, msg: &str) -> ! {
    eprintln!("FAIL {msg}");
    use mpi::traits::Communicator as _;
    comm.raw().abort(1)
}

/// Runs the configurations whose label contains `filter`.
fn run_all<P: Element, S: Element>(
    comm: &mut MpiComm,
    simd: bool,
    what: &str,
    filter: &str,
) -> Seen {
    let mut last = Seen::default();
    let mut n = 0;
    for (label, cfg) in configs().into_iter().filter(|(l, _)| l.contains(filter)) {
        let label = format!("{label} [{what}]");
        let r = if simd {
            run_config::<SimdCpu, P, S, _>(comm, &|| SimdCpu::new().threads(1), &label, cfg)
        } else {
            run_config::<Cpu, P, S, _>(comm, &|| Cpu, &label, cfg)
        };
        match r {
            Ok(s) => {
                let skipped = if cfg.skip_non_finite { 2 } else { 0 };
                if s.skipped != skipped {
                    fail(
                        comm,
                        &format!("{label}: {} steps skipped, expected {skipped}", s.skipped),
                    );
                }
                last = s;
                n += 1;
            }
            Err(e) => fail(comm, &e),
        }
    }
    if comm.rank() == 0 {
        println!(
            "  {what:<34} {n} configurations x {STEPS} steps: parameters, state, counts and reports equal the single process bit for bit"
        );
    }
    last
}

fn main() {
    let universe = mpi::initialize().expect("MPI initialised once");
    let mut comm = MpiComm::new(universe.world());
    let (rank, world) = (comm.rank(), comm.size());
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        None | Some("all") => {
            if rank == 0 {
                println!(
                    "dist-check on {world} MPI process(es) ({}), model: {} tensors, {} elements",
                    MpiComm::library_version().lines().next().unwrap_or(""),
                    LENS.len(),
                    LENS.iter().sum::<usize>()
                );
            }
            // Every configuration on the portable backend; the clipped ones (every algorithm
            // and preset, both clips, warm-up) on the SIMD backend and in bf16.
            let seen = run_all::<f32, f32>(&mut comm, false, "cpu, f32 params, f32 state", "");
            let clip = "both-clips";
            run_all::<f32, f32>(&mut comm, true, "cpu/simd, f32 params, f32 state", clip);
            run_all::<bf16, f32>(&mut comm, false, "cpu, bf16 params, f32 state", clip);
            run_all::<f32, bf16>(&mut comm, false, "cpu, f32 params, bf16 state", clip);
            // Per-rank state memory (of the last configuration: AdamW, m, v, Ī in f32).
            let mine = [seen.state_bytes as f64, seen.pieces as f64];
            let mut all = vec![0.0; 2 * world];
            comm.all_gather_f64(&mine, &vec![2; world], &mut all)
                .unwrap_or_else(|e| fail(&comm, &e.to_string()));
            if rank == 0 {
                let total = seen.total_state_bytes as f64;
                println!("  optimizer state per rank (AdamW-SAGE, f32 m, v, Ī; one process holds {total} bytes):");
                for r in 0..world {
                    let b = all[2 * r];
                    println!(
                        "    rank {r}: {:>3} pieces, {b:>9} bytes = {:.4} of the total (1/N = {:.4})",
                        all[2 * r + 1],
                        b / total,
                        1.0 / world as f64
                    );
                }
                let held: f64 = (0..world).map(|r| all[2 * r]).sum();
                if held != total {
                    fail(&comm, &format!("ranks hold {held} bytes of {total}"));
                }
            }
            // The same at the scale of the fine-tuning job's model: all-MiniLM-L6-v2's 101
            // tensors (22.6M parameters), AdamW-SAGE on the linear weights (m, v, Ī), plain
            // AdamW elsewhere (m, v); state allocated, then measured on its buffers.
            let opt = ShardedOptimizer::<Cpu, f32, f32>::new(
                Cpu,
                Config::reference(Algorithm::adamw(), 1e-4),
                vec![ParamGroup::sage().weight_decay(0.01), ParamGroup::plain()],
                minilm(),
                &comm,
            )
            .unwrap_or_else(|e| fail(&comm, &e.to_string()));
            let mine = [opt.state_bytes() as f64, opt.pieces().len() as f64];
            comm.all_gather_f64(&mine, &vec![2; world], &mut all)
                .unwrap_or_else(|e| fail(&comm, &e.to_string()));
            if rank == 0 {
                let total = opt.total_state_bytes() as f64;
                println!("  optimizer state per rank, MiniLM-L6 shapes (101 tensors, 22.6M parameters; one process holds {:.1} MB):", total / 1e6);
                for r in 0..world {
                    let b = all[2 * r];
                    println!(
                        "    rank {r}: {:>3} pieces, {:>6.1} MB = {:.4} of the total (1/N = {:.4})",
                        all[2 * r + 1],
                        b / 1e6,
                        b / total,
                        1.0 / world as f64
                    );
                    if (b / total - 1.0 / world as f64).abs() > 0.002 {
                        fail(&comm, &format!("rank {r} holds {b} of {total} bytes"));
                    }
                }
                println!("dist-check: ok");
            }
        }
        Some(cmd @ ("save" | "resume")) => {
            let dir = PathBuf::from(args.get(1).cloned().unwrap_or_else(|| {
                fail(&comm, "usage: dist-check save|resume DIR");
            }));
            for (i, (label, cfg)) in reshard_configs().into_iter().enumerate() {
                let sub = dir.join(format!("config-{i}"));
                if cmd == "save" {
                    save_phase::<Cpu, f32, f32, _>(&mut comm, &|| Cpu, &sub, &label, cfg)
                        .unwrap_or_else(|e| fail(&comm, &e));
                    if rank == 0 {
                        println!(
                            "  {label}: {SAVE_AT} steps, saved on {world} rank(s) into {}, {AFTER} more steps equal the single process",
                            sub.display()
                        );
                    }
                } else {
                    let r = resume_phase::<Cpu, f32, f32, _>(&mut comm, &|| Cpu, &sub, &label, cfg)
                        .unwrap_or_else(|e| fail(&comm, &e));
                    let files = format!("{:?}", r.files_read);
                    let mut flat = vec![0.0; world];
                    comm.all_gather_f64(&[r.files_read.len() as f64], &vec![1; world], &mut flat)
                        .unwrap_or_else(|e| fail(&comm, &e.to_string()));
                    if rank == 0 {
                        println!(
                            "  {label}: saved on {} rank(s), resumed on {world}: state, counts and θ equal the uninterrupted run, and {AFTER} more steps too (rank 0 read files {files}; files read per rank {flat:?})",
                            r.saved_world
                        );
                    }
                }
            }
            if rank == 0 {
                println!("dist-check {cmd}: ok");
            }
        }
        Some(other) => fail(&comm, &format!("unknown command {other:?}")),
    }
}
