//! Step time per rank and the communication share of ZeRO-1 SAGE over MPI:
//!
//! ```text
//! cargo build --release -p sage-dist --features mpi --example dist-bench
//! for n in 1 2 4; do mpiexec -n $n target/release/examples/dist-bench; done
//! ```
//!
//! The model has the shapes of all-MiniLM-L6-v2, the fine-tuning job's model (101 tensors,
//! 22.7M parameters; SAGE and decay on the linear weights, plain AdamW elsewhere), f32
//! parameters and state, AdamW-SAGE with global clipping (so the norm exchange runs). Each
//! rank steps with `SimdCpu` on one thread. After warm-up steps, every rank times each part of
//! the sharded step (median over the timed steps): its chunk partials, the exchange of flags
//! and partials, its update, the parameter all-gather, the report's exchange; and, for
//! comparison, the gradient all-reduce that data-parallel training does anyway (and the
//! reduce-scatter that can replace it). Rank 0 prints one row per rank.
//!
//! `--steps N` (default 10), `--spin` (MPI waits spinning instead of yielding).

#[path = "../tests/support/mod.rs"]
mod support;

use std::time::Instant;

use sage_core::{Algorithm, Config, ParamGroup};
use sage_cpu::SimdCpu;
use sage_dist::data_parallel::{all_reduce_grads, reduce_scatter_grads, Grad};
use sage_dist::mpi::MpiComm;
use sage_dist::{Communicator, DistTensor, ShardedOptimizer, StepTimes};
use support::minilm;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    if v.is_empty() {
        0.0
    } else {
        v[v.len() / 2]
    }
}

fn main() {
    let universe = mpi::initialize().expect("MPI initialised once");
    let args: Vec<String> = std::env::args().skip(1).collect();
    let steps: usize = args
        .iter()
        .position(|a| a == "--steps")
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(10);
    let spin = args.iter().any(|a| a == "--spin");
    let mut comm = MpiComm::new(universe.world()).spin(spin);
    let (rank, world) = (comm.rank(), comm.size());
    let specs = minilm();
    let cfg = Config::reference(Algorithm::adamw(), 1e-4)
        .beta0(0.75)
        .global_clip(1.0);
    let groups = vec![ParamGroup::sage().weight_decay(0.01), ParamGroup::plain()];
    let mut opt = ShardedOptimizer::<SimdCpu, f32, f32>::new(
        SimdCpu::new().threads(1),
        cfg,
        groups,
        specs.clone(),
        &comm,
    )
    .expect("optimizer");
    let layout = opt.layout().clone();
    let mut params: Vec<Vec<f32>> = specs
        .iter()
        .enumerate()
        .map(|(t, s)| {
            (0..s.len)
                .map(|i| ((i * 7 + t * 13) % 1000) as f32 * 1e-4 - 0.05)
                .collect()
        })
        .collect();
    let fresh = |step: usize| -> Vec<Vec<f32>> {
        specs
            .iter()
            .enumerate()
            .map(|(t, s)| {
                (0..s.len)
                    .map(|i| ((i * 31 + t * 17 + step * 101) % 2001) as f32 * 1e-6 - 1e-3)
                    .collect()
            })
            .collect()
    };
    let warmup = 2;
    let mut times: Vec<StepTimes> = Vec::new();
    let mut allreduce = Vec::new();
    let mut scatter = Vec::new();
    for s in 0..warmup + steps {
        // The data-parallel exchange training does anyway (timed, for comparison), then the
        // reduce-scatter that can replace it.
        let mut g = fresh(s);
        comm.barrier().expect("barrier");
        let t0 = Instant::now();
        {
            let mut gs: Vec<Grad<'_, SimdCpu>> =
                g.iter_mut().map(|x| Grad::new(&mut x[..])).collect();
            all_reduce_grads(&mut comm, opt.backend_mut(), &mut gs).expect("all-reduce");
        }
        let ar = t0.elapsed().as_secs_f64();
        let mut g2 = fresh(s);
        comm.barrier().expect("barrier");
        let t1 = Instant::now();
        {
            let mut gs: Vec<Grad<'_, SimdCpu>> =
                g2.iter_mut().map(|x| Grad::new(&mut x[..])).collect();
            reduce_scatter_grads(&mut comm, opt.backend_mut(), &layout, &mut gs)
                .expect("reduce-scatter");
        }
        let rs = t1.elapsed().as_secs_f64();
        comm.barrier().expect("barrier");
        let rep = {
            let mut ts: Vec<DistTensor<'_, SimdCpu, f32>> = params
                .iter_mut()
                .zip(&g)
                .map(|(p, g)| DistTensor::new(&mut p[..], &g[..]))
                .collect();
            opt.step(&mut comm, &mut ts).expect("step")
        };
        assert!(rep.report.applied());
        if s >= warmup {
            times.push(rep.times);
            allreduce.push(ar);
            scatter.push(rs);
        }
    }
    let m = |f: fn(&StepTimes) -> f64| median(times.iter().map(f).collect());
    let mine = [
        m(|t| t.partials),
        m(|t| t.norms),
        m(|t| t.step),
        m(|t| t.gather),
        m(|t| t.damage),
        m(|t| t.total()),
        m(|t| t.comm()),
        median(allreduce),
        median(scatter),
        opt.state_bytes() as f64,
        layout.rank_len(rank) as f64,
    ];
    let k = mine.len();
    let mut all = vec![0.0; k * world];
    comm.all_gather_f64(&mine, &vec![k; world], &mut all)
        .expect("gather");
    if rank == 0 {
        let n: usize = specs.iter().map(|s| s.len).sum();
        println!(
            "dist-bench: MiniLM-L6 shapes ({} tensors, {n} parameters), AdamW-SAGE f32, global clipping; {world} MPI rank(s), SimdCpu 1 thread each ({}); median of {steps} steps, ms",
            specs.len(),
            if spin { "spinning waits" } else { "yielding waits" },
        );
        println!("rank | elements | state MB | partials | flags+partials | update | θ all-gather | report | step total | comm share | DP grad all-reduce | reduce-scatter");
        for r in 0..world {
            let v = &all[r * k..(r + 1) * k];
            println!(
                "{r:>4} | {:>8} | {:>8.1} | {:>8.2} | {:>14.2} | {:>6.2} | {:>12.2} | {:>6.2} | {:>10.2} | {:>9.0}% | {:>18.2} | {:>14.2}",
                v[10],
                v[9] / 1e6,
                v[0] * 1e3,
                v[1] * 1e3,
                v[2] * 1e3,
                v[3] * 1e3,
                v[4] * 1e3,
                v[5] * 1e3,
                100.0 * v[6] / v[5],
                v[7] * 1e3,
                v[8] * 1e3,
            );
        }
    }
}
