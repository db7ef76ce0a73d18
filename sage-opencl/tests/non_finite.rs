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

/// A buffer holding `data`: piece `i` of `slab` when given, else an allocation of its own.
fn placed<E: Element>(
    cl: &OpenCl,
    slab: Option<&[ClBuffer<E>]>,
    i: usize,
    data: &[E],
) -> ClBuffer<E> {
    match slab {
        Some(pieces) => {
            let mut b = pieces[i].clone();
            cl.write(&mut b, data).unwrap();
            b
        }
        None => cl.upload(data).unwrap(),
    }
}

fn counts_in<P: Element>(cl: &OpenCl, lens: &[usize]) {
    counts_laid_out::<P>(cl, lens, false);
}

/// As [`counts_in`], every stream cut from one slab when `slab` (packed launches).
fn counts_laid_out<P: Element>(cl: &OpenCl, lens: &[usize], slab: bool) {
    let p_slab = slab.then(|| cl.slab::<P>(lens).unwrap().1);
    let g_slab = slab.then(|| cl.slab::<P>(lens).unwrap().1);
    let s_slabs: Option<Vec<Vec<ClBuffer<f32>>>> =
        slab.then(|| (0..3).map(|_| cl.slab::<f32>(lens).unwrap().1).collect());
    let cfg = Config::reference(Algorithm::adamw(), 1e-2);
    let k = Optimizer::new(cl.clone(), cfg, [ParamGroup::sage()])
        .unwrap()
        .coeffs(1, 0, 1.0)
        .unwrap();
    let mut r = rng(31);
    let mut ps: Vec<ClBuffer<P>> = lens
        .iter()
        .enumerate()
        .map(|(t, &n)| {
            let mut v = random(&mut r, n, 1.0);
            for (j, &i) in AT.iter().enumerate() {
                if i < n {
                    v[i] = PLANTED[j % PLANTED.len()];
                }
            }
            placed(cl, p_slab.as_deref(), t, &to::<P>(&v))
        })
        .collect();
    let gs: Vec<ClBuffer<P>> = lens
        .iter()
        .enumerate()
        .map(|(t, &n)| placed(cl, g_slab.as_deref(), t, &to::<P>(&random(&mut r, n, 0.1))))
        .collect();
    let mut st: Vec<TensorState<ClBuffer<f32>>> = lens
        .iter()
        .enumerate()
        .map(|(t, &n)| {
            let mut which = 0;
            TensorState::try_new(cfg.state_layout(true), |_| {
                let zeros = vec![0f32; n];
                let b = placed(cl, s_slabs.as_ref().map(|s| &s[which][..]), t, &zeros);
                which += 1;
                Ok::<_, ()>(b)
            })
            .unwrap()
        })
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
    // Tensors cut from slabs: one packed launch, the counters still per tensor.
    let before = cl.launch_counts().packed_steps;
    counts_laid_out::<f32>(&cl, &[3, 0, 70_001, 300, 0, 257, 4097], true);
    counts_laid_out::<bf16>(&cl, &[3, 0, 70_001, 300, 0, 257, 4097], true);
    assert_eq!(
        cl.launch_counts().packed_steps - before,
        2,
        "one packed launch per step"
    );
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
