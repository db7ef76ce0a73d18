//! Equivalences a backend must keep: its fused step equals its composed primitives, a
//! multi-tensor step equals one tensor at a time, and resuming from saved state equals an
//! uninterrupted run.

use sage_core::{composed_step, Config, Element, Optimizer, TensorMut};

use super::common::{
    case_groups, cases, group_of, random_grads, random_params, rng, Case, LENGTHS,
};
use crate::failure::{Failure, Worst};
use crate::harness::Harness;
use crate::model::{backend_failure, Model};

/// Allowed difference between two paths of the same backend: one unit in the last place of
/// the storage type (a backend may order a multiply differently), nothing more.
fn same_tol<E: Element>() -> f64 {
    match E::DTYPE {
        sage_core::DType::F32 => 2.5e-7,
        sage_core::DType::F16 => 1.0 / 1024.0,
        sage_core::DType::Bf16 => 1.0 / 128.0,
    }
}

fn compare_models<B: Harness, P: Element, S: Element>(
    b: &mut B,
    check: &str,
    what: &str,
    a: &Model<B, P, S>,
    e: &Model<B, P, S>,
    worst: &mut Worst,
) -> Result<(), Failure> {
    let (pa, pe) = (
        a.read_params(b).map_err(|x| backend_failure(check, x))?,
        e.read_params(b).map_err(|x| backend_failure(check, x))?,
    );
    let (sa, se) = (
        a.read_state(b).map_err(|x| backend_failure(check, x))?,
        e.read_state(b).map_err(|x| backend_failure(check, x))?,
    );
    let (tp, ts) = (same_tol::<P>(), same_tol::<S>());
    for ti in 0..pa.len() {
        for j in 0..pa[ti].len() {
            worst.see(pa[ti][j] as f64, pe[ti][j] as f64, 1e-30, tp, || {
                format!("{what} tensor {ti} θ[{j}]")
            });
        }
        for (k, name) in ["m", "v", "ibar"].iter().enumerate() {
            if sa[ti][k].len() != se[ti][k].len() {
                return Err(Failure::new(
                    check,
                    format!("{what} tensor {ti}: `{name}` differs in length"),
                ));
            }
            for j in 0..sa[ti][k].len() {
                worst.see(sa[ti][k][j] as f64, se[ti][k][j] as f64, 1e-30, ts, || {
                    format!("{what} tensor {ti} {name}[{j}]")
                });
            }
        }
    }
    Ok(())
}

fn cases_without_global_clip() -> Vec<Case> {
    cases()
        .into_iter()
        .filter(|c| c.cfg.global_clip.is_none())
        .collect()
}

/// The backend's `fused_step` equals [`composed_step`] over its own primitives.
pub fn fused_matches_composed_typed<B: Harness, P: Element, S: Element>(
    b: &mut B,
    check: &str,
) -> Result<(), Failure> {
    let mut worst = Worst::default();
    for (ci, case) in cases().iter().enumerate() {
        let mut r = rng(100 + ci as u64);
        let init = random_params(&mut r, &LENGTHS);
        let gs = case_groups(case);
        let gof = group_of(LENGTHS.len());
        let mut fused = Model::<B, P, S>::new(b, &case.cfg, &gs, &init, &gof)?;
        let mut composed = Model::<B, P, S>::new(b, &case.cfg, &gs, &init, &gof)?;
        let opt = Optimizer::new(b.clone(), case.cfg, gs.clone())
            .map_err(|e| Failure::new(check, e.to_string()))?;
        for t in 1..=3u64 {
            let grads = random_grads(&mut r, &LENGTHS, 0.02);
            for (ti, g) in grads.iter().enumerate() {
                let host: Vec<P> = g.iter().map(|&v| P::from_f32(v)).collect();
                let gbuf = b.upload(&host).map_err(|e| backend_failure(check, e))?;
                let scale = 0.75; // as if clipped: the coefficient must reach the gradient
                let k = opt
                    .coeffs(t, gof[ti], scale)
                    .ok_or_else(|| Failure::new(check, "group missing"))?;
                for (model, use_fused) in [(&mut fused, true), (&mut composed, false)] {
                    let st = &mut model.state[ti];
                    let view = TensorMut::<B, P, S> {
                        param: B::buf_mut(&mut model.params[ti]),
                        grad: B::buf(&gbuf),
                        m: st.m.as_mut().map(B::buf_mut),
                        v: st.v.as_mut().map(B::buf_mut),
                        ibar: st.ibar.as_mut().map(B::buf_mut),
                    };
                    let r = if use_fused {
                        b.fused_step(view, &k)
                    } else {
                        composed_step(b, view, &k)
                    };
                    r.map_err(|e| backend_failure(check, e))?;
                }
            }
            compare_models(
                b,
                check,
                &format!("{} step {t}", case.name),
                &fused,
                &composed,
                &mut worst,
            )?;
            if !worst.ok() {
                return worst.into_result(check);
            }
        }
    }
    worst.into_result(check)
}

/// One multi-tensor `step` equals stepping each tensor alone (per-tensor clipping included;
/// global clipping couples tensors by design and is left out).
pub fn multi_matches_single_typed<B: Harness, P: Element, S: Element>(
    b: &mut B,
    check: &str,
) -> Result<(), Failure> {
    let mut worst = Worst::default();
    for (ci, case) in cases_without_global_clip().iter().enumerate() {
        let mut r = rng(200 + ci as u64);
        let init = random_params(&mut r, &LENGTHS);
        let gs = case_groups(case);
        let gof = group_of(LENGTHS.len());
        let mut multi = Model::<B, P, S>::new(b, &case.cfg, &gs, &init, &gof)?;
        let mut single = Model::<B, P, S>::new(b, &case.cfg, &gs, &init, &gof)?;
        let proto = b.clone();
        let mk = || Optimizer::new(proto.clone(), case.cfg, gs.clone());
        let mut opt = mk().map_err(|e| Failure::new(check, e.to_string()))?;
        let mut opts: Vec<_> = (0..LENGTHS.len())
            .map(|_| mk().map_err(|e| Failure::new(check, e.to_string())))
            .collect::<Result<_, _>>()?;
        for t in 1..=3 {
            let grads = random_grads(&mut r, &LENGTHS, 0.02);
            let mut gbufs = Vec::new();
            for g in &grads {
                let host: Vec<P> = g.iter().map(|&v| P::from_f32(v)).collect();
                gbufs.push(b.upload(&host).map_err(|e| backend_failure(check, e))?);
            }
            multi
                .step_with(&mut opt, &gbufs, None)
                .map_err(|e| Failure::new(check, format!("{}: {e}", case.name)))?;
            for (i, o) in opts.iter_mut().enumerate() {
                single
                    .step_with(o, &gbufs, Some(&[i]))
                    .map_err(|e| Failure::new(check, format!("{}: {e}", case.name)))?;
            }
            compare_models(
                b,
                check,
                &format!("{} step {t}", case.name),
                &multi,
                &single,
                &mut worst,
            )?;
            if !worst.ok() {
                return worst.into_result(check);
            }
        }
    }
    worst.into_result(check)
}

/// Saving the state after `k` steps (download), restoring it into fresh buffers and a fresh
/// optimizer set to step `k`, and going on equals never stopping.
pub fn resume_matches_uninterrupted_typed<B: Harness, P: Element, S: Element>(
    b: &mut B,
    check: &str,
) -> Result<(), Failure> {
    let mut worst = Worst::default();
    for (ci, case) in cases().iter().enumerate() {
        let mut r = rng(300 + ci as u64);
        let init = random_params(&mut r, &LENGTHS);
        let gs = case_groups(case);
        let gof = group_of(LENGTHS.len());
        let grads: Vec<_> = (0..5)
            .map(|_| random_grads(&mut r, &LENGTHS, 0.02))
            .collect();
        let run = |model: &mut Model<B, P, S>,
                   opt: &mut Optimizer<B, Vec<_>>,
                   steps: std::ops::Range<usize>| {
            for s in steps {
                model.step(opt, &grads[s]).map_err(|e| {
                    Failure::new(check, format!("{} step {}: {e}", case.name, s + 1))
                })?;
            }
            Ok::<(), Failure>(())
        };
        let proto = b.clone();
        let new_opt = |cfg: Config| Optimizer::new(proto.clone(), cfg, gs.clone());
        let mut whole = Model::<B, P, S>::new(b, &case.cfg, &gs, &init, &gof)?;
        let mut o1 = new_opt(case.cfg).map_err(|e| Failure::new(check, e.to_string()))?;
        run(&mut whole, &mut o1, 0..5)?;

        let mut first = Model::<B, P, S>::new(b, &case.cfg, &gs, &init, &gof)?;
        let mut o2 = new_opt(case.cfg).map_err(|e| Failure::new(check, e.to_string()))?;
        run(&mut first, &mut o2, 0..2)?;
        let saved_p = first
            .read_params(b)
            .map_err(|e| backend_failure(check, e))?;
        let saved_s = first.read_state(b).map_err(|e| backend_failure(check, e))?;
        let mut resumed = Model::<B, P, S>::restore(
            b,
            &saved_p,
            &saved_s,
            &first.steps(),
            &gof,
            &first.layouts(),
        )?;
        let mut o3 = new_opt(case.cfg).map_err(|e| Failure::new(check, e.to_string()))?;
        o3.set_steps(o2.steps());
        run(&mut resumed, &mut o3, 2..5)?;
        compare_models(b, check, &case.name, &resumed, &whole, &mut worst)?;
        if !worst.ok() {
            break;
        }
    }
    worst.into_result(check)
}

/// The three equivalences for f32 parameters and state.
pub fn fused_matches_composed<B: Harness>(b: &mut B) -> Result<(), Failure> {
    fused_matches_composed_typed::<B, f32, f32>(b, "fused == composed")
}
/// ... and for bf16 parameters with bf16 state, where rounding placement matters most.
pub fn fused_matches_composed_bf16<B: Harness>(b: &mut B) -> Result<(), Failure> {
    need(b, sage_core::DType::Bf16, "fused == composed (bf16)")?;
    fused_matches_composed_typed::<B, sage_core::bf16, sage_core::bf16>(
        b,
        "fused == composed (bf16)",
    )
}
/// Multi-tensor == one at a time, f32.
pub fn multi_matches_single<B: Harness>(b: &mut B) -> Result<(), Failure> {
    multi_matches_single_typed::<B, f32, f32>(b, "multi-tensor == one at a time")
}
/// Resume == uninterrupted, f32.
pub fn resume_matches_uninterrupted<B: Harness>(b: &mut B) -> Result<(), Failure> {
    resume_matches_uninterrupted_typed::<B, f32, f32>(b, "resume == uninterrupted")
}

/// Not available when the backend cannot store `d`.
pub fn need<B: Harness>(b: &B, d: sage_core::DType, check: &str) -> Result<(), Failure> {
    if b.supports(d) {
        Ok(())
    } else {
        Err(Failure::not_available(
            check,
            format!("{} cannot store {d}", b.name()),
        ))
    }
}
