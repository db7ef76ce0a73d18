//! The step kernel counts each tensor's non-finite stored parameters exactly, as sage-cpu
//! reports them: NaN and ±Inf planted at the first element, in tails and far into a tensor,
//! across launches (tensors past a launch's batch: the counters are indexed by the step's
//! tensor, not the launch's slot), empty tensors among them (no item, a count of 0), and for
//! f32, f16 and bf16 parameters (1e5 is +Inf in f16). Through the optimizer, the report names
//! the first such tensor and says it counted.

mod common;

use common::{device, random, rng, to};
use sage_core::{
    bf16, f16, Algorithm, Backend, Config, Element, Optimizer, ParamGroup, ParamTensor, TensorState,
};
use sage_opencl::{ClBuffer, OpenCl};

const PLANTED: [f32; 4] = [f32::NAN, f32::INFINITY, f32::NEG_INFINITY, 1e5];
const AT: [usize; 6] = [0, 2, 255, 256, 4096, 70_000];

/// The planted values of a tensor of `n` that are non-finite once stored as `P`.
fn planted_bad<P: Element>(n: usize) -> u64 {
    AT.iter()
        .enumerate()
        .filter(|&(j, &i)| i < n && !P::from_f32(PLANTED[j % PLANTED.len()]).to_f32().is_finite())
        .count() as u64
}

fn counts_in<P: Element>(cl: &OpenCl, lens: &[usize]) {
    let cfg = Config::reference(Algorithm::adamw(), 1e-2);
    let k = Optimizer::new(cl.clone(), cfg, [ParamGroup::sage()])
        .unwrap()
        .coeffs(1, 0, 1.0)
        .unwrap();
    let mut r = rng(31);
    let mut ps: Vec<ClBuffer<P>> = lens
        .iter()
        .map(|&n| {
            let mut v = random(&mut r, n, 1.0);
            for (j, &i) in AT.iter().enumerate() {
                if i < n {
                    v[i] = PLANTED[j % PLANTED.len()];
                }
            }
            cl.upload(&to::<P>(&v)).unwrap()
        })
        .collect();
    let gs: Vec<ClBuffer<P>> = lens
        .iter()
        .map(|&n| cl.upload(&to::<P>(&random(&mut r, n, 0.1))).unwrap())
        .collect();
    let mut st: Vec<TensorState<ClBuffer<f32>>> = lens
        .iter()
        .map(|&n| TensorState::try_new(cfg.state_layout(true), |_| cl.zeros(n)).unwrap())
        .collect();
    let mut ts: Vec<ParamTensor<'_, OpenCl, P, f32>> = ps
        .iter_mut()
        .zip(&gs)
        .zip(&mut st)
        .map(|((p, g), s)| {
            let mut t = ParamTensor::new(p, g, s.view());
            t.set_coeffs(k);
            t
        })
        .collect();
    let mut backend = cl.clone();
    backend.step_tensors(&mut ts).unwrap();
    let counted: Vec<Option<u64>> = ts.iter().map(|t| t.non_finite()).collect();
    drop(ts);
    for (t, p) in ps.iter().enumerate() {
        let stored = cl.download(p).unwrap();
        let want = stored.iter().filter(|x| !x.to_f32().is_finite()).count() as u64;
        assert_eq!(
            counted[t],
            Some(want),
            "{} tensor {t} of {lens:?}",
            P::DTYPE
        );
        // The update is elementwise: exactly the planted non-finite values.
        assert_eq!(want, planted_bad::<P>(lens[t]), "{} tensor {t}", P::DTYPE);
    }
}

fn counts<P: Element>(cl: &OpenCl) {
    // Five tensors past two per launch, empty ones among them; one tensor alone.
    counts_in::<P>(cl, &[3, 0, 70_001, 300, 0, 257, 4097]);
    counts_in::<P>(cl, &[70_001]);
}

#[test]
fn step_kernel_counts_non_finite_parameters() {
    let Some(cl) = device() else { return };
    counts::<f32>(&cl);
    counts::<f16>(&cl);
    counts::<bf16>(&cl);
    let two = OpenCl::builder().max_tensors_per_launch(2).build().unwrap();
    counts::<f32>(&two);
}

/// Through the optimizer: the report names the first tensor with a non-finite parameter and
/// says the backend counted; a clean step names none.
#[test]
fn step_report_names_the_first_bad_tensor() {
    let Some(cl) = device() else { return };
    let cfg = Config::reference(Algorithm::adamw(), 1e-2);
    let lens = [5usize, 300, 17];
    let mut opt = Optimizer::new(cl.clone(), cfg, [ParamGroup::sage()]).unwrap();
    for bad_at in [None, Some(1), Some(2)] {
        let mut ps: Vec<ClBuffer<f32>> = lens
            .iter()
            .enumerate()
            .map(|(t, &n)| {
                let mut v = vec![0.5f32; n];
                if Some(t) == bad_at {
                    v[n - 1] = f32::NAN;
                }
                cl.upload(&v).unwrap()
            })
            .collect();
        let gs: Vec<ClBuffer<f32>> = lens
            .iter()
            .map(|&n| cl.upload(&vec![0.1f32; n]).unwrap())
            .collect();
        let mut st: Vec<TensorState<ClBuffer<f32>>> = lens
            .iter()
            .map(|&n| TensorState::try_new(cfg.state_layout(true), |_| cl.zeros(n)).unwrap())
            .collect();
        let mut ts: Vec<ParamTensor<'_, OpenCl, f32, f32>> = ps
            .iter_mut()
            .zip(&gs)
            .zip(&mut st)
            .map(|((p, g), s)| ParamTensor::new(p, g, s.view()))
            .collect();
        let rep = opt.step(&mut ts).unwrap();
        assert!(rep.params_checked, "{rep:?}");
        assert_eq!(rep.non_finite_params, bad_at, "{rep:?}");
    }
}
