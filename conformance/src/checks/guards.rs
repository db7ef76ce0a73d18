//! Non-finite gradients and bad inputs: the step is refused or skipped, and nothing changes.

use sage_core::{Algorithm, Config, ErrorKind, Optimizer, Outcome, ParamGroup, ParamTensor};

use super::common::{group_of, groups, random_grads, random_params, rng, LENGTHS};
use crate::failure::Failure;
use crate::harness::Harness;
use crate::model::{backend_failure, Model};

type Snapshot = (Vec<Vec<f32>>, Vec<[Vec<f32>; 3]>);

fn snapshot<B: Harness>(
    b: &mut B,
    m: &Model<B, f32, f32>,
    check: &str,
) -> Result<Snapshot, Failure> {
    Ok((
        m.read_params(b).map_err(|e| backend_failure(check, e))?,
        m.read_state(b).map_err(|e| backend_failure(check, e))?,
    ))
}

fn same_bits(a: &Snapshot, b: &Snapshot) -> bool {
    let bits = |x: &Vec<f32>| x.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
    a.0.iter().map(bits).eq(b.0.iter().map(bits))
        && a.1
            .iter()
            .flatten()
            .map(bits)
            .eq(b.1.iter().flatten().map(bits))
}

/// A gradient holding NaN, +Inf or −Inf anywhere (first element, middle, the last element of an
/// odd-length tensor, the very last element) skips the whole step: parameters, state and the
/// step counter untouched, the report naming the tensor. The next finite step then equals the
/// step of a run that never saw the bad one. With the guard off, the bad element goes non-finite
/// and no other element does.
pub fn non_finite<B: Harness>(b: &mut B) -> Result<(), Failure> {
    let check = "non-finite gradients";
    let cfg = Config::reference(Algorithm::adamw(), 1e-3).global_clip(1.0);
    let gs = groups();
    let gof = group_of(LENGTHS.len());
    let mut r = rng(400);
    let init = random_params(&mut r, &LENGTHS);
    let last = LENGTHS.len() - 1;
    let places = [
        (1usize, 0usize),
        (8, 511),
        (9, LENGTHS[9] - 1),
        (7, LENGTHS[7] - 1),
        (2, 6),
    ];
    for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
        for &(ti, j) in &places {
            let mut model = Model::<B, f32, f32>::new(b, &cfg, &gs, &init, &gof)?;
            let mut clean = Model::<B, f32, f32>::new(b, &cfg, &gs, &init, &gof)?;
            let mut opt = Optimizer::new(b.clone(), cfg, gs.clone())
                .map_err(|e| Failure::new(check, e.to_string()))?;
            let mut opt_clean = Optimizer::new(b.clone(), cfg, gs.clone())
                .map_err(|e| Failure::new(check, e.to_string()))?;
            let g1 = random_grads(&mut r, &LENGTHS, 0.02);
            model
                .step(&mut opt, &g1)
                .map_err(|e| Failure::new(check, e.to_string()))?;
            clean
                .step(&mut opt_clean, &g1)
                .map_err(|e| Failure::new(check, e.to_string()))?;
            let before = snapshot(b, &model, check)?;
            let mut g2 = random_grads(&mut r, &LENGTHS, 0.02);
            g2[ti][j] = bad;
            let rep = model
                .step(&mut opt, &g2)
                .map_err(|e| Failure::new(check, e.to_string()))?;
            let place = format!("{bad} at tensor {ti} [{j}]");
            if rep.outcome != (Outcome::SkippedNonFinite { param: Some(ti) }) {
                return Err(Failure::new(
                    check,
                    format!("{place}: step outcome {:?}", rep.outcome),
                ));
            }
            if opt.steps() != 1 {
                return Err(Failure::new(
                    check,
                    format!("{place}: step counter moved to {}", opt.steps()),
                ));
            }
            if !same_bits(&before, &snapshot(b, &model, check)?) {
                return Err(Failure::new(
                    check,
                    format!("{place}: a skipped step changed a buffer"),
                ));
            }
            let g3 = random_grads(&mut r, &LENGTHS, 0.02);
            model
                .step(&mut opt, &g3)
                .map_err(|e| Failure::new(check, e.to_string()))?;
            clean
                .step(&mut opt_clean, &g3)
                .map_err(|e| Failure::new(check, e.to_string()))?;
            if !same_bits(&snapshot(b, &model, check)?, &snapshot(b, &clean, check)?) {
                return Err(Failure::new(
                    check,
                    format!("{place}: the step after a skipped one differs from a clean run"),
                ));
            }
        }
    }
    // Guard off: the damage stays in its element.
    let cfg = Config::paper(Algorithm::adam(), 1e-3).skip_non_finite(false);
    let mut model = Model::<B, f32, f32>::new(b, &cfg, &gs, &init, &gof)?;
    let mut opt = Optimizer::new(b.clone(), cfg, gs.clone())
        .map_err(|e| Failure::new(check, e.to_string()))?;
    let mut g = random_grads(&mut r, &LENGTHS, 0.02);
    g[last][100] = f32::NAN;
    let rep = model
        .step(&mut opt, &g)
        .map_err(|e| Failure::new(check, e.to_string()))?;
    if !rep.applied() {
        return Err(Failure::new(check, "guard off: the step was skipped"));
    }
    let p = model
        .read_params(b)
        .map_err(|e| backend_failure(check, e))?;
    for (ti, t) in p.iter().enumerate() {
        for (j, x) in t.iter().enumerate() {
            let expect_nan = ti == last && j == 100;
            if x.is_nan() != expect_nan || (!expect_nan && !x.is_finite()) {
                return Err(Failure::new(
                    check,
                    format!("guard off: tensor {ti} θ[{j}] = {x}"),
                ));
            }
        }
    }
    Ok(())
}

/// Every malformed step returns the right error kind, naming the tensor, and changes nothing;
/// out-of-range hyper-parameters are refused with the field's name.
pub fn bad_inputs<B: Harness>(b: &mut B) -> Result<(), Failure> {
    let check = "bad inputs give errors";
    let fail = |d: String| Failure::new(check, d);
    let cfg = Config::paper(Algorithm::adam(), 1e-3);
    let gs = vec![ParamGroup::sage(), ParamGroup::plain()];
    let lens = [5usize, 9, 3];
    let mut r = rng(500);
    let init = random_params(&mut r, &lens);
    let gof = vec![0, 1, 0];
    let mut model = Model::<B, f32, f32>::new(b, &cfg, &gs, &init, &gof)?;
    let mut opt = Optimizer::new(b.clone(), cfg, gs.clone()).map_err(|e| fail(e.to_string()))?;
    let up = |b: &mut B, n: usize| {
        b.upload(&vec![0.01f32; n])
            .map_err(|e| backend_failure(check, e))
    };
    let before = snapshot(b, &model, check)?;
    let grads: Vec<_> = lens.iter().map(|&n| up(b, n)).collect::<Result<_, _>>()?;
    let short_grad = up(b, 8)?;
    let mut short_buf = up(b, 2)?;
    let mut extra_buf = up(b, 9)?;

    // Each case: the step's tensors with one defect in tensor 1, and the kind expected.
    let cases = [
        ErrorKind::LengthMismatch, // gradient too short
        ErrorKind::LengthMismatch, // state buffer too short
        ErrorKind::UnknownGroup,
        ErrorKind::StateMismatch, // missing `m`
        ErrorKind::StateMismatch, // Ī given to a group with SAGE off
    ];
    for (case, expect) in cases.into_iter().enumerate() {
        let mut short_state = Some(&mut short_buf);
        let mut extra = Some(&mut extra_buf);
        let mut ts: Vec<ParamTensor<'_, B, f32, f32>> = Vec::new();
        for (i, ((p, st), g)) in model
            .params
            .iter_mut()
            .zip(model.state.iter_mut())
            .zip(&grads)
            .enumerate()
        {
            let defect = i == 1;
            let grad = if defect && case == 0 {
                B::buf(&short_grad)
            } else {
                B::buf(g)
            };
            let mut state = st.view();
            let mut group = gof[i];
            if defect {
                match case {
                    1 => state.v = short_state.take().map(|x| B::buf_mut(x)),
                    2 => group = 7,
                    3 => state.m = None,
                    4 => state.ibar = extra.take().map(|x| B::buf_mut(x)),
                    _ => {}
                }
            }
            ts.push(
                ParamTensor::new(B::buf_mut(p), grad, state)
                    .name(["t0", "t1", "t2"][i])
                    .group(group),
            );
        }
        match opt.step(&mut ts) {
            Ok(_) => return Err(fail(format!("case {case}: a malformed step was accepted"))),
            Err(e) => {
                let msg = e.to_string();
                if e.kind() != expect || !msg.contains("parameter 1") || !msg.contains("t1") {
                    return Err(fail(format!(
                        "case {case}: wrong error {:?}: {msg}",
                        e.kind()
                    )));
                }
            }
        }
        drop(ts);
        if opt.steps() != 0 || !same_bits(&before, &snapshot(b, &model, check)?) {
            return Err(fail(format!(
                "case {case}: a refused step changed something"
            )));
        }
    }
    // Hyper-parameters.
    let bad_cfgs: [(&str, Config); 7] = [
        (
            "betas.1",
            Config::paper(
                Algorithm::Adam {
                    beta1: 0.9,
                    beta2: 1.0,
                },
                1e-3,
            ),
        ),
        ("lr", Config::paper(Algorithm::adam(), f64::NAN)),
        ("lr", Config::paper(Algorithm::adam(), -1e-3)),
        ("beta0", Config::paper(Algorithm::adam(), 1e-3).beta0(1.5)),
        ("eps_den", {
            let mut c = Config::paper(Algorithm::adam(), 1e-3);
            c.sensitivity.eps_den = 0.0;
            c
        }),
        ("momentum", Config::paper(Algorithm::sgd(-0.5), 1e-3)),
        (
            "global_clip",
            Config::paper(Algorithm::adam(), 1e-3).global_clip(f64::NAN),
        ),
    ];
    for (field, c) in bad_cfgs {
        match Optimizer::new(b.clone(), c, [ParamGroup::sage()]) {
            Ok(_) => return Err(fail(format!("`{field}` out of range was accepted"))),
            Err(e) if e.kind() == ErrorKind::InvalidConfig && e.to_string().contains(field) => {}
            Err(e) => return Err(fail(format!("`{field}`: wrong error: {e}"))),
        }
    }
    match Optimizer::new(
        b.clone(),
        cfg,
        [
            ParamGroup::sage(),
            ParamGroup::plain().weight_decay(f64::NAN),
        ],
    ) {
        Err(e) if e.kind() == ErrorKind::InvalidConfig && e.to_string().contains("group 1") => {
            Ok(())
        }
        other => Err(fail(format!(
            "a NaN group weight decay: {:?}",
            other.err().map(|e| e.to_string())
        ))),
    }
}
