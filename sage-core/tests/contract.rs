//! The driver's contract on a minimal slice backend (the primitives only): per-tensor counts,
//! refusals that change nothing, norms from outside.

use sage_core::formula::{self, Accumulate};
use sage_core::norm::{self, chunk_count, NORM_CHUNK};
use sage_core::{
    f16, Algorithm, ApplyArgs, Backend, Coeffs, Config, Element, ErrorKind, GlobalNorms,
    Infallible, Optimizer, Outcome, ParamGroup, ParamTensor, TensorState,
};

#[derive(Clone, Copy)]
struct Slices;

impl Backend for Slices {
    type Error = Infallible;
    type Buf<E: Element> = [E];
    fn len<E: Element>(&self, b: &[E]) -> usize {
        b.len()
    }
    fn sq_norm_chunks<E: Element>(
        &mut self,
        b: &[E],
        first: usize,
        out: &mut [f64],
    ) -> Result<(), Infallible> {
        for (c, o) in out.iter_mut().enumerate() {
            *o = norm::chunk_partial(&b[norm::chunk_range(b.len(), first + c)]);
        }
        Ok(())
    }
    fn accumulate<P: Element, S: Element>(
        &mut self,
        which: Accumulate,
        acc: &mut [S],
        p: &[P],
        g: &[P],
        k: &Coeffs,
    ) -> Result<(), Infallible> {
        for ((a, p), g) in acc.iter_mut().zip(p).zip(g) {
            *a = S::from_f32(formula::accumulate(
                k,
                which,
                a.to_f32(),
                p.to_f32(),
                g.to_f32(),
            ));
        }
        Ok(())
    }
    fn apply<P: Element, S: Element>(
        &mut self,
        t: ApplyArgs<'_, Self, P, S>,
        k: &Coeffs,
    ) -> Result<(), Infallible> {
        let r = |b: Option<&[S]>, i: usize| b.map_or(0.0, |b| b[i].to_f32());
        for (i, (p, g)) in t.param.iter_mut().zip(t.grad).enumerate() {
            *p = P::from_f32(formula::apply(
                k,
                p.to_f32(),
                g.to_f32(),
                r(t.m, i),
                r(t.v, i),
                r(t.ibar, i),
            ));
        }
        Ok(())
    }
}

fn adamw() -> Optimizer<Slices> {
    Optimizer::new(
        Slices,
        Config::reference(Algorithm::adamw(), 1e-3).global_clip(1.0),
        [ParamGroup::sage()],
    )
    .unwrap()
}

#[test]
fn a_count_that_cannot_advance_is_refused_and_nothing_changes() {
    let mut opt = adamw();
    let (mut w, g) = (vec![0.5f32; 8], vec![0.1f32; 8]);
    let mut st = TensorState::<Vec<f32>>::zeros(opt.state_layout(0).unwrap(), 8);
    st.step = u64::MAX;
    let e = opt
        .step(&mut [ParamTensor::new(&mut w[..], &g[..], st.view()).name("w")])
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::StateMismatch);
    assert!(e.to_string().contains("`w`") && e.to_string().contains("cannot advance"));
    assert_eq!((w, st.step, opt.steps()), (vec![0.5; 8], u64::MAX, 0));

    opt.set_steps(u64::MAX);
    st.step = 0;
    let e = opt
        .step(&mut [ParamTensor::new(
            &mut vec![0.5f32; 8][..],
            &g[..],
            st.view(),
        )])
        .unwrap_err();
    assert!(e.to_string().contains("cannot advance"), "{e}");
    assert_eq!(st.step, 0);
}

#[test]
fn f16_state_for_squares_is_refused() {
    let mut opt = adamw();
    let (mut w, g) = (vec![0.5f32; 4], vec![1e-3f32; 4]);
    let mut st = TensorState::<Vec<f16>>::zeros(opt.state_layout(0).unwrap(), 4);
    let e = opt
        .step(&mut [ParamTensor::new(&mut w[..], &g[..], st.view()).name("w")])
        .unwrap_err();
    assert!(e.to_string().contains("f16"), "{e}");
    assert_eq!(w, vec![0.5; 4]);
    // SGD with momentum only keeps a running gradient: f16 holds it as well as the gradient.
    let mut sgd = Optimizer::new(
        Slices,
        Config::paper(Algorithm::sgd(0.9), 0.1),
        [ParamGroup::plain()],
    )
    .unwrap();
    let mut st = TensorState::<Vec<f16>>::zeros(sgd.state_layout(0).unwrap(), 4);
    assert!(sgd
        .step(&mut [ParamTensor::new(&mut w[..], &g[..], st.view())])
        .unwrap()
        .applied());
}

#[test]
fn epsilons_that_vanish_in_f32_are_refused() {
    let e = Config::paper(Algorithm::adam(), 1e-3)
        .eps(1e-46)
        .validate()
        .unwrap_err();
    assert_eq!(e.field, "eps");
    // The reference preset divides by eps² — 1e-24² = 1e-48 is 0 in f32.
    let e = Config::reference(Algorithm::adamw(), 1e-3)
        .eps(1e-24)
        .validate()
        .unwrap_err();
    assert_eq!(e.field, "eps_den");
    Config::reference(Algorithm::adamw(), 1e-3)
        .eps(1e-20)
        .validate()
        .unwrap();
}

#[test]
fn absent_tensors_keep_their_counts_and_late_ones_start_at_one() {
    let mut opt = adamw();
    let layout = opt.state_layout(0).unwrap();
    let (mut a, mut b) = (vec![0.5f32; 5], vec![0.5f32; 5]);
    let g = [0.1f32; 5];
    let (mut sa, mut sb) = (
        TensorState::<Vec<f32>>::zeros(layout, 5),
        TensorState::<Vec<f32>>::zeros(layout, 5),
    );
    for _ in 0..3 {
        opt.step(&mut [ParamTensor::new(&mut a[..], &g[..], sa.view())])
            .unwrap();
    }
    assert_eq!((sa.step, sb.step, opt.steps()), (3, 0, 3));
    // b joins now: its first update is its own t = 1, exactly as a fresh optimizer's.
    let mut fresh = adamw();
    let (mut c, mut sc) = (b.clone(), TensorState::<Vec<f32>>::zeros(layout, 5));
    fresh
        .step(&mut [ParamTensor::new(&mut c[..], &g[..], sc.view())])
        .unwrap();
    opt.step(&mut [
        ParamTensor::new(&mut a[..], &g[..], sa.view()),
        ParamTensor::new(&mut b[..], &g[..], sb.view()),
    ])
    .unwrap();
    assert_eq!((sa.step, sb.step, opt.steps()), (4, 1, 4));
    assert_eq!(sb, sc);
}

#[test]
fn norms_from_partials_equal_own_norms_and_bad_counts_are_refused() {
    let lens = [2 * NORM_CHUNK + 3, 7];
    let grads: Vec<Vec<f32>> = lens
        .iter()
        .map(|&n| (0..n).map(|i| ((i % 13) as f32 - 6.0) * 0.03).collect())
        .collect();
    let run = |given: bool| {
        let mut opt = adamw();
        let layout = opt.state_layout(0).unwrap();
        let mut ps: Vec<Vec<f32>> = lens.iter().map(|&n| vec![0.25f32; n]).collect();
        let mut sts: Vec<TensorState<Vec<f32>>> = lens
            .iter()
            .map(|&n| TensorState::zeros(layout, n))
            .collect();
        let mut ts: Vec<ParamTensor<'_, Slices, f32, f32>> = ps
            .iter_mut()
            .zip(&grads)
            .zip(sts.iter_mut())
            .map(|((p, g), s)| ParamTensor::new(&mut p[..], &g[..], s.view()))
            .collect();
        let rep = if given {
            let n = opt.partials_len(&mut ts).unwrap();
            assert_eq!(n, chunk_count(lens[0]) + chunk_count(lens[1]));
            let mut partials = vec![0.0; n];
            opt.grad_norm_partials(&mut ts, &mut partials).unwrap();
            assert!(opt.grad_norm_partials(&mut ts, &mut partials[1..]).is_err());
            let mut per = [0.0; 2];
            let total = norm::reduce(&partials, &lens, &mut per).unwrap();
            let bad = opt.step_with_norms(
                &mut ts,
                GlobalNorms {
                    total_sq: total,
                    per_tensor_sq: &per[..1],
                },
            );
            assert_eq!(bad.unwrap_err().kind(), ErrorKind::LengthMismatch);
            opt.step_with_norms(
                &mut ts,
                GlobalNorms {
                    total_sq: total,
                    per_tensor_sq: &per,
                },
            )
            .unwrap()
        } else {
            opt.step(&mut ts).unwrap()
        };
        drop(ts);
        (rep, ps)
    };
    let (r1, p1) = run(false);
    let (r2, p2) = run(true);
    assert!(r1.clip_scale < 1.0, "the case must clip: {r1:?}");
    assert_eq!(r1, r2);
    assert_eq!(p1, p2);
}

#[test]
fn a_non_finite_norm_from_outside_skips_everything() {
    let mut opt = adamw();
    let (mut w, g) = (vec![0.5f32; 4], vec![0.1f32; 4]);
    let mut st = TensorState::<Vec<f32>>::zeros(opt.state_layout(0).unwrap(), 4);
    let rep = opt
        .step_with_norms(
            &mut [ParamTensor::new(&mut w[..], &g[..], st.view())],
            GlobalNorms {
                total_sq: f64::INFINITY,
                per_tensor_sq: &[0.04],
            },
        )
        .unwrap();
    assert_eq!(rep.outcome, Outcome::SkippedNonFinite { param: None });
    assert_eq!((w, st.step, opt.steps()), (vec![0.5; 4], 0, 0));
}

/// A backend whose multi-tensor step fails after stepping its first tensor.
#[derive(Clone, Copy)]
struct FailsAfterOne;

#[derive(Debug)]
struct AfterOne;

impl core::fmt::Display for AfterOne {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str("launch 2 failed")
    }
}

impl sage_core::BackendError for AfterOne {
    fn kind(&self) -> ErrorKind {
        ErrorKind::DeviceLost
    }
    fn applied_tensors(&self) -> Option<usize> {
        Some(1)
    }
}

impl Backend for FailsAfterOne {
    type Error = AfterOne;
    type Buf<E: Element> = [E];
    fn len<E: Element>(&self, b: &[E]) -> usize {
        b.len()
    }
    fn sq_norm_chunks<E: Element>(
        &mut self,
        b: &[E],
        first: usize,
        out: &mut [f64],
    ) -> Result<(), AfterOne> {
        Slices.sq_norm_chunks(b, first, out).map_err(|e| match e {})
    }
    fn accumulate<P: Element, S: Element>(
        &mut self,
        which: Accumulate,
        acc: &mut [S],
        p: &[P],
        g: &[P],
        k: &Coeffs,
    ) -> Result<(), AfterOne> {
        Slices
            .accumulate(which, acc, p, g, k)
            .map_err(|e| match e {})
    }
    fn apply<P: Element, S: Element>(
        &mut self,
        t: ApplyArgs<'_, Self, P, S>,
        k: &Coeffs,
    ) -> Result<(), AfterOne> {
        let ApplyArgs {
            param,
            grad,
            m,
            v,
            ibar,
        } = t;
        Slices
            .apply(
                ApplyArgs {
                    param,
                    grad,
                    m,
                    v,
                    ibar,
                },
                k,
            )
            .map_err(|e| match e {})
    }
    fn step_tensors<P: Element, S: Element>(
        &mut self,
        tensors: &mut [ParamTensor<'_, Self, P, S>],
    ) -> Result<(), AfterOne> {
        if let Some(t) = tensors.first_mut() {
            let k = *t.coeffs();
            self.fused_step(t.view(), &k)?;
        }
        Err(AfterOne)
    }
}

#[test]
fn a_partial_step_counts_exactly_the_tensors_it_applied() {
    // The paper preset moves θ at the first step (the reference preset's s is 0 there).
    let cfg = Config::paper(Algorithm::adamw(), 1e-3).global_clip(1.0);
    let mut opt = Optimizer::new(FailsAfterOne, cfg, [ParamGroup::sage()]).unwrap();
    let layout = opt.state_layout(0).unwrap();
    let (mut a, mut b) = (vec![0.5f32; 4], vec![0.5f32; 4]);
    let g = [0.1f32; 4];
    let (mut sa, mut sb) = (
        TensorState::<Vec<f32>>::zeros(layout, 4),
        TensorState::<Vec<f32>>::zeros(layout, 4),
    );
    let e = opt
        .step(&mut [
            ParamTensor::new(&mut a[..], &g[..], sa.view()),
            ParamTensor::new(&mut b[..], &g[..], sb.view()),
        ])
        .unwrap_err();
    match e {
        sage_core::Error::PartialStep {
            applied: 1,
            tensors: 2,
            total_sq: Some(_),
            ..
        } => {}
        other => panic!("{other:?}"),
    }
    assert_eq!(e.kind(), ErrorKind::DeviceLost);
    assert_eq!((sa.step, sb.step, opt.steps()), (1, 0, 0));
    assert_ne!(a, vec![0.5; 4]);
    assert_eq!(b, vec![0.5; 4]);
}
