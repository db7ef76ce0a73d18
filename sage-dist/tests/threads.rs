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
            // Balanced by elements (within one chunk of L/N); bytes per element depend on the
            // group (SAGE adds Ī), at most 3 f32 buffers.
            let elems: usize = LENS.iter().sum();
            assert!(
                r[c].state_bytes <= 3 * 4 * (elems / world + 4096),
                "rank holds {} of {total}",
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
        // A wrong length is refused before any collective.
        let mut short = [1f32; 9];
        let mut ts = vec![
            DistTensor::<Cpu, f32>::new(&mut a[..], &ga[..]),
            DistTensor::new(&mut short[..], &gb[..9]),
        ];
        assert!(matches!(
            opt.step(&mut comm, &mut ts),
            Err(DistError::Input {
                tensor: Some(1),
                ..
            })
        ));
        err
    });
    for e in errs {
        assert!(matches!(e, DistError::Disagree { .. }), "{e}");
        assert!(e.to_string().contains("tensor 1 (b)"), "{e}");
    }
}
