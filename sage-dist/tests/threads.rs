//! The sharded step against one process, bit for bit, with ranks as threads (`ThreadComm`):
//! the same scenarios `examples/dist-check.rs` runs under `mpiexec -n 1..4`.

mod support;

use std::path::PathBuf;

use sage_core::{bf16, Algorithm, Config, Element, ParamGroup};
use sage_cpu::{Cpu, SimdCpu};
use sage_dist::{Communicator, DistError, DistTensor, ShardedOptimizer, TensorSpec, ThreadComm};
use support::*;

/// Runs the configurations whose label contains `filter` on `world` ranks.
fn every_config<P: Element, S: Element>(world: usize, simd: bool, filter: &str) {
    let cfgs: Vec<_> = configs()
        .into_iter()
        .filter(|(l, _)| l.contains(filter))
        .collect();
    let results = ThreadComm::run(world, |mut comm| {
        let mut seen = Vec::new();
        for (label, cfg) in cfgs.iter().cloned() {
            let s = if simd {
                run_config::<SimdCpu, P, S, _>(
                    &mut comm,
                    &|| SimdCpu::new().threads(1),
                    &label,
                    cfg,
                )
            } else {
                run_config::<Cpu, P, S, _>(&mut comm, &|| Cpu, &label, cfg)
            };
            seen.push(s.unwrap_or_else(|e| panic!("{e}")));
        }
        seen
    });
    // Each rank holds its share of the state; together, all of it.
    assert!(!cfgs.is_empty());
    for c in 0..results[0].len() {
        let total = results[0][c].total_state_bytes;
        let held: usize = results.iter().map(|r| r[c].state_bytes).sum();
        assert_eq!(held, total, "config {c}: state bytes over ranks");
        for r in &results {
            // Balanced by state bytes, to within one chunk of the heaviest elements (m, v, Ī
            // in f32: 12 bytes) on either side.
            assert!(
                r[c].state_bytes.abs_diff(total / world) <= 2 * 12 * 4096,
                "{}: rank holds {} of {total}",
                cfgs[c].0,
                r[c].state_bytes
            );
            let skipped = if cfgs[c].1.skip_non_finite { 2 } else { 0 };
            assert_eq!(
                r[c].skipped, skipped,
                "{}: the NaN and Inf steps",
                cfgs[c].0
            );
        }
    }
}

// Every configuration on 4 ranks here; the ones with both clips (every algorithm and preset)
// on 2 and 3, and on the SIMD backend and in bf16. The MPI check (scripts/test.d/55-dist.sh)
// runs every configuration on 1, 2, 3 and 4 processes, in release.
#[test]
fn every_config_on_4_ranks() {
    every_config::<f32, f32>(4, false, "");
}

#[test]
fn both_clips_on_2_and_3_ranks() {
    every_config::<f32, f32>(2, false, "both-clips");
    every_config::<f32, f32>(3, false, "both-clips");
}

#[test]
fn simd_backend_on_3_ranks() {
    every_config::<f32, f32>(3, true, "AdamW reference both-clips");
}

#[test]
fn bf16_params_and_bf16_state() {
    every_config::<bf16, f32>(2, false, "W reference both-clips");
    every_config::<f32, bf16>(3, false, "W reference both-clips");
}

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("sage-dist-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

#[test]
fn reshard_across_world_sizes() {
    for (from, to) in [(4, 2), (4, 1), (2, 4), (1, 3), (3, 4), (2, 2)] {
        for (i, (label, cfg)) in reshard_configs().into_iter().enumerate() {
            let dir = tmp(&format!("reshard-{from}-{to}-{i}"));
            ThreadComm::run(from, |mut comm| {
                save_phase::<Cpu, f32, f32, _>(&mut comm, &|| Cpu, &dir, &label, cfg)
                    .unwrap_or_else(|e| panic!("save on {from}: {e}"));
            });
            let reports = ThreadComm::run(to, |mut comm| {
                resume_phase::<Cpu, f32, f32, _>(&mut comm, &|| Cpu, &dir, &label, cfg)
                    .unwrap_or_else(|e| panic!("resume {from} -> {to}: {e}"))
            });
            for r in &reports {
                // The optimizer's count: the steps not skipped (the NaN at 3, the Inf at 6).
                let applied = (1..=SAVE_AT).filter(|&s| poison(s).is_none()).count() as u64;
                assert_eq!((r.saved_world, r.step), (from, applied));
                assert!(!r.files_read.is_empty());
            }
            std::fs::remove_dir_all(&dir).unwrap();
        }
    }
}

#[test]
fn a_damaged_checkpoint_changes_nothing_anywhere() {
    let (label, cfg) = reshard_configs().remove(0);
    let dir = tmp("damaged");
    ThreadComm::run(3, |mut comm| {
        save_phase::<Cpu, f32, f32, _>(&mut comm, &|| Cpu, &dir, &label, cfg).unwrap();
    });
    // Flip one byte of rank 1's file: its checksum fails on the rank(s) reading it, and every
    // rank refuses, with nothing written.
    let f = dir.join(sage_dist::checkpoint::rank_file(1, 3));
    let mut bytes = std::fs::read(&f).unwrap();
    let n = bytes.len();
    bytes[n - 9] ^= 0x10;
    std::fs::write(&f, bytes).unwrap();
    let errs = ThreadComm::run(2, |mut comm| {
        let mut run = Run::<Cpu, f32, f32>::new(&mut comm, &|| Cpu, &label, cfg).unwrap();
        let err = run.load(&mut comm, &dir, SAVE_AT).unwrap_err();
        // `load` scrambled them to 7 and the count to 12345 before the refused restore.
        assert!(
            run.params.iter().all(|p| p.iter().all(|&x| x == 7.0)),
            "parameters untouched"
        );
        assert!(run.sharded.states().iter().all(|s| s.step == 12345));
        err
    });
    for e in errs {
        assert!(
            e.contains("checksum") || e.contains("could not read"),
            "{e}"
        );
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn presence_must_agree() {
    let errs = ThreadComm::run(2, |mut comm| {
        let specs = vec![TensorSpec::new("a", 10_000), TensorSpec::new("b", 10)];
        let cfg = Config::paper(Algorithm::adam(), 1e-3);
        let mut opt = ShardedOptimizer::<Cpu, f32, f32, _>::new(
            Cpu,
            cfg,
            vec![ParamGroup::sage()],
            specs,
            &comm,
        )
        .unwrap();
        let (mut a, mut b) = (vec![1f32; 10_000], vec![1f32; 10]);
        let (ga, gb) = (vec![0.5f32; 10_000], vec![0.5f32; 10]);
        let rank = comm.rank();
        let mut ts = vec![
            DistTensor::<Cpu, f32>::new(&mut a[..], &ga[..]),
            if rank == 0 {
                DistTensor::new(&mut b[..], &gb[..])
            } else {
                DistTensor::absent(&mut b[..])
            },
        ];
        let err = opt.step(&mut comm, &mut ts).unwrap_err();
        drop(ts);
        assert!(a.iter().all(|&x| x == 1.0) && b.iter().all(|&x| x == 1.0));
        assert!(opt.states().iter().all(|s| s.step == 0));
        assert_eq!(opt.optimizer().steps(), 0);
        // A wrong length on rank 1 only: rank 1 says why, rank 0 that rank 1 refused; no rank
        // waits for the other, nothing changes.
        let mut short = [1f32; 9];
        let mut b2 = [1f32; 10];
        let mut ts = vec![
            DistTensor::<Cpu, f32>::new(&mut a[..], &ga[..]),
            if rank == 1 {
                DistTensor::new(&mut short[..], &gb[..9])
            } else {
                DistTensor::new(&mut b2[..], &gb[..])
            },
        ];
        match (rank, opt.step(&mut comm, &mut ts)) {
            (
                1,
                Err(DistError::Input {
                    tensor: Some(1), ..
                }),
            ) => {}
            (0, Err(DistError::Disagree { what })) => assert!(what.contains("rank 1 refused")),
            (r, other) => panic!("rank {r}: {other:?}"),
        }
        drop(ts);
        assert!(a.iter().all(|&x| x == 1.0) && b2.iter().all(|&x| x == 1.0));
        assert!(opt.states().iter().all(|s| s.step == 0));
        err
    });
    for e in errs {
        assert!(matches!(e, DistError::Disagree { .. }), "{e}");
        assert!(e.to_string().contains("tensor 1 (b)"), "{e}");
    }
}

#[test]
fn data_parallel_exchange() {
    use sage_dist::data_parallel::{all_reduce_grads, reduce_scatter_grads, Grad};
    use sage_dist::Layout;
    let specs = vec![
        TensorSpec::new("used-by-all", 9000),
        TensorSpec::new("used-by-rank-1", 5000),
        TensorSpec::new("unused", 100),
    ];
    ThreadComm::run(3, |mut comm| {
        let rank = comm.rank();
        let layout = Layout::new(specs.clone(), 3).unwrap();
        let local = |t: usize| -> Vec<f32> {
            (0..specs[t].len)
                .map(|i| (i % 13) as f32 * 0.25 + rank as f32)
                .collect()
        };
        let sum = |t: usize, who: &[usize]| -> Vec<f32> {
            (0..specs[t].len)
                .map(|i| {
                    who.iter()
                        .fold(0f32, |a, &r| a + ((i % 13) as f32 * 0.25 + r as f32))
                })
                .collect()
        };
        for scatter in [false, true] {
            let (mut g0, mut g1, mut g2) = (local(0), local(1), vec![f32::NAN; 100]);
            let mut gs = vec![
                Grad::<Cpu>::new(&mut g0[..]),
                if rank == 1 {
                    Grad::new(&mut g1[..])
                } else {
                    Grad::absent(&mut g1[..])
                },
                Grad::absent(&mut g2[..]),
            ];
            let present = if scatter {
                reduce_scatter_grads(&mut comm, &mut Cpu, &layout, &mut gs).unwrap()
            } else {
                all_reduce_grads(&mut comm, &mut Cpu, &mut gs).unwrap()
            };
            // Present where any rank has it; the others gave zeros (DDP's rule).
            assert_eq!(present, [true, true, false]);
            drop(gs);
            let want = [sum(0, &[0, 1, 2]), sum(1, &[1])];
            for (t, got) in [(0, &g0), (1, &g1)] {
                let range = if scatter {
                    layout
                        .pieces(rank)
                        .iter()
                        .find(|p| p.tensor == t)
                        .map_or(0..0, |p| p.range())
                } else {
                    0..specs[t].len
                };
                assert_eq!(
                    got[range.clone()],
                    want[t][range],
                    "tensor {t}, scatter {scatter}"
                );
            }
            assert!(
                g2.iter().all(|x| x.is_nan()),
                "an unused tensor is left alone"
            );
        }
    });
}

/// A transport that gathers every piece's chunk partials in reverse order: each tensor's norm
/// is then summed in another order than one process sums it — off in the last bits only.
struct Reordering {
    inner: ThreadComm,
    /// Per rank, the chunk count of each of its pieces (after its flags).
    pieces: Vec<Vec<usize>>,
    /// Values before the partials in each rank's block.
    head: usize,
}

impl Communicator for Reordering {
    type Error = sage_dist::CommError;
    fn rank(&self) -> usize {
        self.inner.rank()
    }
    fn size(&self) -> usize {
        self.inner.size()
    }
    fn all_reduce_sum_f64(&mut self, buf: &mut [f64]) -> Result<(), Self::Error> {
        self.inner.all_reduce_sum_f64(buf)
    }
    fn all_gather_f64(
        &mut self,
        mine: &[f64],
        counts: &[usize],
        out: &mut [f64],
    ) -> Result<(), Self::Error> {
        self.inner.all_gather_f64(mine, counts, out)?;
        let mut at = 0;
        for (r, &c) in counts.iter().enumerate() {
            if c > self.head {
                let mut p = at + self.head;
                for &n in &self.pieces[r] {
                    out[p..p + n].reverse();
                    p += n;
                }
            }
            at += c;
        }
        Ok(())
    }
    fn barrier(&mut self) -> Result<(), Self::Error> {
        self.inner.barrier()
    }
}

impl sage_dist::BufferComm<Cpu> for Reordering {
    fn all_reduce_sum(&mut self, b: &mut Cpu, buf: &mut [f32]) -> Result<(), Self::Error> {
        self.inner.all_reduce_sum(b, buf)
    }
    fn reduce_scatter_sum(
        &mut self,
        b: &mut Cpu,
        buf: &mut [f32],
        counts: &[usize],
    ) -> Result<(), Self::Error> {
        self.inner.reduce_scatter_sum(b, buf, counts)
    }
    fn all_gather_parts<E: Element>(
        &mut self,
        b: &mut Cpu,
        buf: &mut [E],
        counts: &[usize],
    ) -> Result<(), Self::Error> {
        self.inner.all_gather_parts(b, buf, counts)
    }
}

#[test]
fn partials_out_of_order_are_caught() {
    // Every configuration with global clipping (every algorithm and preset): the reordered
    // sum shows in the norm, and from there in the parameters.
    let cfgs: Vec<_> = configs()
        .into_iter()
        .filter(|(l, _)| l.contains("global-clip"))
        .collect();
    let results = ThreadComm::run(2, |comm| {
        let mut comm = Some(comm);
        let mut out = Vec::new();
        for (label, cfg) in &cfgs {
            let inner = comm.take().unwrap();
            let layout =
                ShardedOptimizer::<Cpu, f32, f32>::new(Cpu, *cfg, groups(), specs(), &inner)
                    .unwrap()
                    .layout()
                    .clone();
            let pieces = (0..2)
                .map(|r| layout.pieces(r).iter().map(|p| p.chunks()).collect())
                .collect();
            let mut c = Reordering {
                inner,
                pieces,
                // The flag saying the rank takes part, then one presence flag per tensor.
                head: 1 + LENS.len(),
            };
            let r = run_config::<Cpu, f32, f32, _>(&mut c, &|| Cpu, label, *cfg);
            out.push((label.clone(), r));
            comm = Some(c.inner);
        }
        out
    });
    for rank in &results {
        for (label, r) in rank {
            match r {
                Err(e) => assert!(e.contains("report") && e.contains("grad_norm"), "{e}"),
                Ok(_) => panic!("{label}: partials summed out of order went unnoticed"),
            }
        }
    }
}

#[test]
fn malformed_multi_buffer_calls_are_refused_before_any_exchange() {
    use sage_dist::BufferComm;
    ThreadComm::run(2, |mut comm| {
        let (mut a, mut b) = (vec![1f32; 6], vec![2f32; 4]);
        let before = (a.clone(), b.clone());
        // Two buffers, one split: every rank refuses alone, so nobody waits on the other.
        let e = comm
            .all_gather_parts_many::<f32>(&mut Cpu, &mut [&mut a[..], &mut b[..]], &[vec![3, 3]])
            .unwrap_err();
        assert!(e.to_string().contains("2 buffers, 1 splits"), "{e}");
        // The second buffer's split covers 5 elements of 4.
        let splits = [vec![3, 3], vec![2, 3]];
        let e = comm
            .reduce_scatter_sum_many(&mut Cpu, &mut [&mut a[..], &mut b[..]], &splits)
            .unwrap_err();
        assert!(
            e.to_string()
                .contains("parts of 5 elements for a buffer of 4"),
            "{e}"
        );
        assert_eq!((a, b), before, "a refused call wrote into its buffers");
    });
}

#[test]
fn one_rank_refuses_malformed_multi_buffer_calls_too() {
    use sage_dist::{BufferComm, SelfComm};
    let (mut a, mut b) = (vec![1f32; 6], vec![2f32; 4]);
    let mut comm = SelfComm;
    let e = comm
        .reduce_scatter_sum_many(&mut Cpu, &mut [&mut a[..], &mut b[..]], &[vec![6]])
        .unwrap_err();
    assert!(e.to_string().contains("2 buffers, 1 splits"), "{e}");
    let e = comm
        .all_gather_parts_many::<f32>(&mut Cpu, &mut [&mut a[..], &mut b[..]], &[vec![6], vec![5]])
        .unwrap_err();
    assert!(
        e.to_string()
            .contains("parts of 5 elements for a buffer of 4"),
        "{e}"
    );
    assert!(comm
        .all_gather_parts_many::<f32>(&mut Cpu, &mut [&mut a[..], &mut b[..]], &[vec![6], vec![4]])
        .is_ok());
}
