//! Checkpoints (sage-checkpoint): a run saved to a file after `k` steps and resumed from it
//! equals the uninterrupted run — on the same backend (in [`all`](super::all), so every
//! backend runs it) and across backends (for every pair the runner finds). Both go through
//! each backend's own [`HostBuffers`](sage_core::HostBuffers) copies.

use sage_checkpoint::{load, save_optimizer, ConfigCheck, Entry, EntryMut};
use sage_core::{Config, DType, Element, Optimizer, ParamGroup};

use super::common::{case_groups, cases, group_of, random_grads, random_params, rng, Case, Tol};
use crate::failure::{Failure, Worst};
use crate::harness::Harness;
use crate::model::{backend_failure, Model};

/// Steps before the save, and in all.
const SAVED_AT: usize = 2;
const STEPS: usize = 5;

fn ck_err(check: &str, case: &Case, e: impl std::fmt::Display) -> Failure {
    Failure::new(check, format!("{}: checkpoint: {e}", case.name))
}

/// Saves `model` (parameters, every state buffer, each tensor's count, the optimizer's count
/// and configuration) through its backend's host copies.
fn save_model<B: Harness, P: Element, S: Element>(
    check: &str,
    case: &Case,
    opt: &mut Optimizer<B, Vec<ParamGroup>>,
    model: &Model<B, P, S>,
) -> Result<Vec<u8>, Failure> {
    let entries: Vec<Entry<'_, B, P, S>> = (0..model.params.len())
        .map(|i| {
            Entry::new(&model.names[i], &model.state[i])
                .group(model.group_of[i])
                .param(B::buf(&model.params[i]))
        })
        .collect();
    save_optimizer(opt, &entries).map_err(|e| ck_err(check, case, e))
}

/// Loads `bytes` into `model`'s buffers and counts (all-or-nothing) and `opt`'s count.
fn load_model<B: Harness, P: Element, S: Element>(
    check: &str,
    case: &Case,
    opt: &mut Optimizer<B, Vec<ParamGroup>>,
    model: &mut Model<B, P, S>,
    bytes: &[u8],
) -> Result<(), Failure> {
    let names = model.names.clone();
    let gof = model.group_of.clone();
    let mut targets: Vec<EntryMut<'_, B, P, S>> = model
        .params
        .iter_mut()
        .zip(model.state.iter_mut())
        .enumerate()
        .map(|(i, (p, st))| {
            EntryMut::new(names[i].as_str(), st.view())
                .group(gof[i])
                .param(B::buf_mut(p))
        })
        .collect();
    load(opt, bytes, &mut targets, ConfigCheck::Exact)
        .map(|_| ())
        .map_err(|e| ck_err(check, case, e))
}

/// Runs `steps` of `grads` on `model`.
fn run<B: Harness, P: Element, S: Element>(
    check: &str,
    case: &Case,
    model: &mut Model<B, P, S>,
    opt: &mut Optimizer<B, Vec<ParamGroup>>,
    grads: &[Vec<Vec<f32>>],
    steps: std::ops::Range<usize>,
) -> Result<(), Failure> {
    for s in steps {
        model
            .step(opt, &grads[s])
            .map_err(|e| Failure::new(check, format!("{} step {}: {e}", case.name, s + 1)))?;
    }
    Ok(())
}

/// Compares `got` (on `c`) with `want` (on `a`) element by element within `scale` times the
/// differential checks' tolerance (parameters relative to how far they moved from `init`,
/// state relative to the tensor's magnitude).
#[allow(clippy::too_many_arguments)]
fn compare<A: Harness, C: Harness, P: Element, S: Element>(
    a: &mut A,
    c: &mut C,
    case: &Case,
    init: &[Vec<f32>],
    want: &Model<A, P, S>,
    got: &Model<C, P, S>,
    scale: f64,
    worst: &mut Worst,
) -> Result<(), Failure> {
    let check = "checkpoint";
    let (pw, pg) = (
        want.read_params(a).map_err(|e| backend_failure(check, e))?,
        got.read_params(c).map_err(|e| backend_failure(check, e))?,
    );
    let (sw, sg) = (
        want.read_state(a).map_err(|e| backend_failure(check, e))?,
        got.read_state(c).map_err(|e| backend_failure(check, e))?,
    );
    let tol = Tol::for_types(P::DTYPE, S::DTYPE);
    for ti in 0..pw.len() {
        for j in 0..pw[ti].len() {
            let moved = (pw[ti][j] as f64 - init[ti][j] as f64).abs();
            let abs = scale * (tol.abs + tol.moved * case.ill_conditioned * moved);
            worst.see(
                pg[ti][j] as f64,
                pw[ti][j] as f64,
                abs,
                scale * tol.rel,
                || format!("{} tensor {ti} θ[{j}]", case.name),
            );
        }
        for (k, name) in ["m", "v", "ibar"].iter().enumerate() {
            if sw[ti][k].len() != sg[ti][k].len() {
                return Err(Failure::new(
                    check,
                    format!("{} tensor {ti}: `{name}` differs in length", case.name),
                ));
            }
            let mag = sw[ti][k].iter().fold(0.0f64, |m, x| m.max(x.abs() as f64));
            let abs = scale * (tol.abs * 1e-2 + tol.rel * 4.0 * case.ill_conditioned * mag);
            for j in 0..sw[ti][k].len() {
                worst.see(
                    sg[ti][k][j] as f64,
                    sw[ti][k][j] as f64,
                    abs,
                    scale * tol.rel * 4.0,
                    || format!("{} tensor {ti} {name}[{j}]", case.name),
                );
            }
        }
    }
    Ok(())
}

/// Same backend, through a checkpoint file: the state after [`SAVED_AT`] steps is saved with
/// sage-checkpoint (counts, configuration, every buffer by name), loaded back (every check of
/// the loader) into fresh buffers and a fresh optimizer, and the run goes on; it must equal
/// the uninterrupted run to one unit in the last place.
pub fn resume_from_checkpoint_typed<B: Harness, P: Element, S: Element>(
    b: &mut B,
    check: &str,
) -> Result<(), Failure> {
    let mut worst = Worst::default();
    for (ci, case) in cases().iter().enumerate() {
        let mut r = rng(400 + ci as u64);
        let lens = super::common::LENGTHS;
        let init = random_params(&mut r, &lens);
        let gs = case_groups(case);
        let gof = group_of(lens.len());
        let grads: Vec<_> = (0..STEPS)
            .map(|_| random_grads(&mut r, &lens, 0.02))
            .collect();
        let proto = b.clone();
        let new_opt = |cfg: Config| {
            Optimizer::new(proto.clone(), cfg, gs.clone())
                .map_err(|e| Failure::new(check, e.to_string()))
        };
        let mut whole = Model::<B, P, S>::new(b, &case.cfg, &gs, &init, &gof)?;
        let mut o1 = new_opt(case.cfg)?;
        run(check, case, &mut whole, &mut o1, &grads, 0..STEPS)?;

        let mut first = Model::<B, P, S>::new(b, &case.cfg, &gs, &init, &gof)?;
        let mut o2 = new_opt(case.cfg)?;
        run(check, case, &mut first, &mut o2, &grads, 0..SAVED_AT)?;
        let bytes = save_model(check, case, &mut o2, &first)?;
        // Fresh buffers of the same layout (random θ, to see that θ is restored too).
        let noise = random_params(&mut r, &lens);
        let mut resumed = Model::<B, P, S>::new(b, &case.cfg, &gs, &noise, &gof)?;
        let mut o3 = new_opt(case.cfg)?;
        load_model(check, case, &mut o3, &mut resumed, &bytes)?;
        if o3.steps() != SAVED_AT as u64 || resumed.steps() != first.steps() {
            return Err(Failure::new(
                check,
                format!(
                    "{}: resumed at {} with counts {:?}, saved at {SAVED_AT} with {:?}",
                    case.name,
                    o3.steps(),
                    resumed.steps(),
                    first.steps()
                ),
            ));
        }
        run(check, case, &mut resumed, &mut o3, &grads, SAVED_AT..STEPS)?;
        let mut same = b.clone();
        // One unit in the last place, as the in-memory resume check allows.
        let ulp_of = |d: DType| -> f64 {
            match d {
                DType::F32 => 2.5e-7,
                DType::F16 => 1.0 / 1024.0,
                DType::Bf16 => 1.0 / 128.0,
            }
        };
        let ulp = ulp_of(P::DTYPE).max(ulp_of(S::DTYPE));
        let (pa, pe) = (
            resumed
                .read_params(b)
                .map_err(|e| backend_failure(check, e))?,
            whole
                .read_params(&mut same)
                .map_err(|e| backend_failure(check, e))?,
        );
        let (sa, se) = (
            resumed
                .read_state(b)
                .map_err(|e| backend_failure(check, e))?,
            whole
                .read_state(&mut same)
                .map_err(|e| backend_failure(check, e))?,
        );
        for ti in 0..pa.len() {
            for j in 0..pa[ti].len() {
                worst.see(pa[ti][j] as f64, pe[ti][j] as f64, 1e-30, ulp, || {
                    format!("{} tensor {ti} θ[{j}]", case.name)
                });
            }
            for (k, name) in ["m", "v", "ibar"].iter().enumerate() {
                if sa[ti][k].len() != se[ti][k].len() {
                    return Err(Failure::new(
                        check,
                        format!("{} tensor {ti}: `{name}` differs in length", case.name),
                    ));
                }
                for j in 0..sa[ti][k].len() {
                    worst.see(sa[ti][k][j] as f64, se[ti][k][j] as f64, 1e-30, ulp, || {
                        format!("{} tensor {ti} {name}[{j}]", case.name)
                    });
                }
            }
        }
        if !worst.ok() {
            break;
        }
    }
    worst.into_result(check)
}

/// Resume from a checkpoint == uninterrupted, f32 parameters and state.
pub fn resume_from_checkpoint<B: Harness>(b: &mut B) -> Result<(), Failure> {
    resume_from_checkpoint_typed::<B, f32, f32>(b, "resume from checkpoint == uninterrupted")
}

/// ... and bf16 state (the storage type goes through the file unchanged).
pub fn resume_from_checkpoint_bf16<B: Harness>(b: &mut B) -> Result<(), Failure> {
    let check = "resume from checkpoint (bf16 state)";
    super::equivalence::need(b, DType::Bf16, check)?;
    resume_from_checkpoint_typed::<B, f32, sage_core::bf16>(b, check)
}

/// Across backends: [`SAVED_AT`] steps on `a`, saved through `a`'s host copies, loaded into
/// fresh buffers on `c` through `c`'s, the rest of the run on `c`; it must equal the
/// uninterrupted run on `a` within twice the differential checks' tolerance (each backend is
/// within one tolerance of the float64 oracle). Parameters travel in the file too. Returns the
/// worst error as a fraction of the tolerance.
pub fn cross_backend<A, C>(a: &mut A, c: &mut C) -> Result<Worst, Failure>
where
    A: Harness,
    C: Harness,
{
    let check = "checkpoint resume";
    let mut worst = Worst::default();
    for (ci, case) in cases().iter().enumerate() {
        let mut r = rng(500 + ci as u64);
        let lens = super::common::LENGTHS;
        let init = random_params(&mut r, &lens);
        let gs = case_groups(case);
        let gof = group_of(lens.len());
        let grads: Vec<_> = (0..STEPS)
            .map(|_| random_grads(&mut r, &lens, 0.02))
            .collect();
        let opt_on = |cfg: Config, b: A| {
            Optimizer::new(b, cfg, gs.clone()).map_err(|e| Failure::new(check, e.to_string()))
        };
        let mut whole = Model::<A, f32, f32>::new(a, &case.cfg, &gs, &init, &gof)?;
        let mut o1 = opt_on(case.cfg, a.clone())?;
        run(check, case, &mut whole, &mut o1, &grads, 0..STEPS)?;

        let mut first = Model::<A, f32, f32>::new(a, &case.cfg, &gs, &init, &gof)?;
        let mut o2 = opt_on(case.cfg, a.clone())?;
        run(check, case, &mut first, &mut o2, &grads, 0..SAVED_AT)?;
        let bytes = save_model(check, case, &mut o2, &first)?;

        // On `c`: zeroed buffers of the same layout (random θ, to see that θ is restored).
        let noise = random_params(&mut r, &lens);
        let mut resumed = Model::<C, f32, f32>::new(c, &case.cfg, &gs, &noise, &gof)?;
        let mut o3 = Optimizer::new(c.clone(), case.cfg, gs.clone())
            .map_err(|e| Failure::new(check, e.to_string()))?;
        load_model(check, case, &mut o3, &mut resumed, &bytes)?;
        if o3.steps() != SAVED_AT as u64 {
            return Err(Failure::new(
                check,
                format!(
                    "{}: resumed at step {}, saved at {SAVED_AT}",
                    case.name,
                    o3.steps()
                ),
            ));
        }
        run(check, case, &mut resumed, &mut o3, &grads, SAVED_AT..STEPS)?;
        compare(a, c, case, &init, &whole, &resumed, 2.0, &mut worst)?;
        if !worst.ok() {
            return Err(worst.failure(check));
        }
    }
    Ok(worst)
}
