//! Diagnostics: statistics are right, U and s are what the next update computes, the
//! importance export reads back, pruning masks mark exactly the lowest scores.

use safetensors::SafeTensors;
use sage_checkpoint::diagnostics::{
    checkpoint_ibar, checkpoint_importance, diagnose, export_importance, lowest_mask, Probe,
    Summary,
};
use sage_checkpoint::{save_optimizer, Checkpoint, CheckpointError, Entry};
use sage_core::{Algorithm, Config, Optimizer, ParamGroup, ParamTensor, TensorState};
use sage_cpu::Cpu;

#[test]
fn summary_statistics() {
    let s = Summary::of(&[4.0, 1.0, 3.0, 2.0, f32::NAN, 0.0]);
    assert_eq!((s.count, s.non_finite), (5, 1));
    assert_eq!((s.min, s.max, s.mean), (0.0, 4.0, 2.0));
    assert!((s.variance - 2.0).abs() < 1e-12);
    assert_eq!(s.quantile(0.5), Some(2.0));
    assert_eq!(s.quantile(0.25), Some(1.0));
    assert!((s.quantile(0.9).unwrap() - 3.6).abs() < 1e-9);
    let e = Summary::of(&[]);
    assert_eq!((e.count, e.mean), (0, 0.0));
}

#[test]
fn next_step_modulation_matches_the_optimizer() {
    let cfg = Config::paper(Algorithm::adam(), 1e-2).beta0(0.7);
    let groups = [ParamGroup::sage()];
    let mut opt = Optimizer::new(Cpu, cfg, groups).unwrap();
    let n = 257;
    let mut p: Vec<f32> = (0..n).map(|i| (i as f32 * 0.37).sin()).collect();
    let mut st = TensorState::new(cfg.state_layout(true), || vec![0f32; n]);
    let grad = |t: usize| -> Vec<f32> {
        (0..n)
            .map(|i| ((i * 13 + t * 7) % 17) as f32 * 0.01 - 0.08)
            .collect()
    };
    for t in 0..4 {
        let g = grad(t);
        opt.step(&mut [ParamTensor::new(&mut p[..], &g[..], st.view())])
            .unwrap();
    }
    let ib = st.ibar.clone().unwrap();
    let g = grad(4);
    let probe = Probe::<Cpu, f32, f32>::new("w", 0, &st).with(&p[..], &g[..]);
    let d = diagnose(&mut Cpu, &cfg, &groups, opt.steps(), &probe).unwrap();
    assert_eq!((d.len, d.t), (n, 5));
    let share = d.share.unwrap();
    assert!((share.above + share.below + share.equal - 1.0).abs() < 1e-12);

    // Recompute s by hand (paper preset: (U + ε)/(Ī' + ε), Ī' bias-corrected) and compare.
    let t = 5.0f64;
    let b0 = 0.7f32;
    let scale = (1.0 / (1.0 - 0.7f64.powf(t))) as f32;
    let mut above = 0;
    let mut u_mean = 0.0f64;
    for i in 0..n {
        let inow = (p[i] * g[i]).abs();
        let next = b0 * ib[i] + (1.0 - b0) * inow;
        let u = (inow - next * scale).abs();
        let s = (u + 1e-6) / (next * scale + 1e-6);
        above += (s > 1.0) as usize;
        u_mean += u as f64 / n as f64;
    }
    assert!((share.above - above as f64 / n as f64).abs() <= 2.0 / n as f64);
    let u = d.u.unwrap();
    assert!(
        (u.mean - u_mean).abs() <= 1e-3 * u_mean,
        "{} vs {u_mean}",
        u.mean
    );
    assert!((d.ibar_scale - scale as f64).abs() < 1e-6);

    // Ī alone, and the same numbers from a checkpoint.
    let only = diagnose(
        &mut Cpu,
        &cfg,
        &groups,
        opt.steps(),
        &Probe::<Cpu, f32, f32>::new("w", 0, &st),
    )
    .unwrap();
    assert!(only.u.is_none() && only.share.is_none());
    let bytes = save_optimizer(&mut opt, &[Entry::<Cpu, f32, f32>::new("w", &st)]).unwrap();
    let c = Checkpoint::parse(&bytes).unwrap();
    assert_eq!(checkpoint_ibar(&c), vec![("w".to_string(), only.ibar)]);

    // Importance export: Ī keyed by name, as f32.
    for file in [
        export_importance::<Cpu, f32>(&mut Cpu, 4, &[("w", &ib[..])]).unwrap(),
        checkpoint_importance(&c).unwrap(),
    ] {
        let st = SafeTensors::deserialize(&file).unwrap();
        let w = st.tensor("w").unwrap();
        let back: Vec<f32> = w
            .data()
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
            .collect();
        assert_eq!(back, ib);
    }
}

#[test]
fn the_next_update_follows_the_tensors_own_count() {
    let cfg = Config::paper(Algorithm::adam(), 1e-2).beta0(0.7);
    let groups = [ParamGroup::sage(), ParamGroup::plain()];
    let mut st = TensorState::new(cfg.state_layout(true), || vec![0.5f32; 8]);
    // Absent from most of the optimizer's 9 steps: its next update is its own 2nd.
    st.step = 1;
    let d = diagnose(
        &mut Cpu,
        &cfg,
        &groups,
        9,
        &Probe::<Cpu, f32, f32>::new("w", 0, &st),
    )
    .unwrap();
    assert_eq!(d.t, 2);
    assert!((d.ibar_scale - 1.0 / (1.0 - 0.7f64.powi(2))).abs() < 1e-6);
    // A count that cannot advance, and a state without Ī, are errors naming the tensor.
    st.step = u64::MAX;
    let e = diagnose(
        &mut Cpu,
        &cfg,
        &groups,
        9,
        &Probe::<Cpu, f32, f32>::new("w", 0, &st),
    );
    assert!(matches!(e, Err(CheckpointError::Tensor { tensor, .. }) if tensor == "w"));
    let plain = TensorState::new(cfg.state_layout(false), || vec![0.5f32; 8]);
    let e = diagnose(
        &mut Cpu,
        &cfg,
        &groups,
        9,
        &Probe::<Cpu, f32, f32>::new("b", 1, &plain),
    );
    assert!(matches!(e, Err(CheckpointError::Tensor { tensor, .. }) if tensor == "b.ibar"));
}

#[test]
fn masks_mark_the_lowest() {
    let a = [0.5f32, 0.1, 0.9];
    let b = [0.2f32, f32::NAN, 0.05];
    let mask = lowest_mask(&[&a, &b], 0.5);
    assert_eq!(
        mask,
        vec![vec![false, true, false], vec![true, false, true]]
    );
    assert_eq!(lowest_mask(&[&a, &b], 0.0), vec![vec![false; 3]; 2]);
    let all = lowest_mask(&[&a, &b], 1.0);
    assert!(all.iter().flatten().all(|&x| x));
}

/// NaN scores of either sign are pruned last. x86 gives `0/0` the sign bit: a negative NaN,
/// which `total_cmp` alone would sort before −∞, so it would be pruned first.
#[test]
fn nan_scores_of_either_sign_are_pruned_last() {
    let neg_nan = f32::from_bits(0xffc0_0000);
    let zero = std::hint::black_box(0.0f32);
    let x86_nan = zero / zero;
    assert!(neg_nan.is_nan() && neg_nan.is_sign_negative());
    let a = [neg_nan, 0.3, f32::NEG_INFINITY, x86_nan];
    let b = [f32::NAN, -0.0, 0.1, -f32::NAN];
    // The four numbers first (−∞, −0, 0.1, 0.3), then the NaNs by position.
    let mask = lowest_mask(&[&a, &b], 0.5);
    assert_eq!(
        mask,
        vec![
            vec![false, true, true, false],
            vec![false, true, true, false]
        ]
    );
    // At 75%: every number and the first two NaNs by position (a[0] and a[3]).
    let mask = lowest_mask(&[&a, &b], 0.75);
    assert_eq!(
        mask,
        vec![vec![true, true, true, true], vec![false, true, true, false]]
    );
    // Only NaNs and one number: the number goes first whatever the NaN's sign.
    let only = [-f32::NAN, 5.0, f32::NAN];
    assert_eq!(lowest_mask(&[&only], 0.34), vec![vec![false, true, false]]);
}
