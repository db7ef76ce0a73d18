//! Sensitivity diagnostics: what SAGE's state says about a model, read on any backend through
//! [`HostBuffers`] (one host copy per buffer read).
//!
//! - Ī alone (from the state, or from a [`Checkpoint`]): per-tensor mean, variance, extremes and
//!   quantiles — the smoothed sensitivity `|θ·g|`, the importance score the sensitivity-pruning
//!   literature uses.
//! - U and the modulation `s` need the current θ and gradient `g` as well: they are what the
//!   **next** update would compute (the tensor's own `t = step + 1`, its count in its
//!   [`TensorState`]; the optimizer's count drives the schedule under
//!   `ScheduleCount::Optimizer`), through `sage_core::formula` — Ī advanced
//!   by this `|θ·g|` and rounded to its storage type, `Ī' = Ī/(1 − β0^t)`, `U = |I − Ī'|`,
//!   `s` by the configured modulation. Clipping is not applied unless a `grad_scale` (the
//!   clipping coefficient) is given. The share of elements with `s > 1` (rate raised: low,
//!   unstable sensitivity) and `s < 1` (rate lowered) follows.
//! - [`export_importance`]: Ī of every parameter as an f32 safetensors file, keyed by name.

use std::borrow::Borrow;
use std::collections::HashMap;
use std::fmt;

use sage_core::formula::{self, Accumulate};
use sage_core::{
    Backend, Buffer, Coeffs, Config, Element, HostBuffers, ParamGroup, ParamProblem, StepScalars,
    TensorState,
};

use crate::checkpoint::Checkpoint;
use crate::error::CheckpointError;

/// The quantiles every [`Summary`] reports.
pub const QUANTILES: [f64; 7] = [0.01, 0.1, 0.25, 0.5, 0.75, 0.9, 0.99];

/// Statistics of one tensor's values (non-finite values are counted and left out).
#[derive(Clone, Debug, PartialEq)]
pub struct Summary {
    /// Finite values summarised.
    pub count: usize,
    /// NaN or ±Inf values left out.
    pub non_finite: usize,
    /// Mean.
    pub mean: f64,
    /// Population variance.
    pub variance: f64,
    /// Smallest value.
    pub min: f64,
    /// Largest value.
    pub max: f64,
    /// `(q, value)` for each of [`QUANTILES`], linearly interpolated between order statistics.
    pub quantiles: Vec<(f64, f64)>,
}

impl Summary {
    /// Statistics of `values` (all zero for an empty or all-non-finite tensor).
    pub fn of(values: &[f32]) -> Summary {
        let mut v: Vec<f64> = values
            .iter()
            .filter(|x| x.is_finite())
            .map(|&x| x as f64)
            .collect();
        let non_finite = values.len() - v.len();
        if v.is_empty() {
            return Summary {
                count: 0,
                non_finite,
                mean: 0.0,
                variance: 0.0,
                min: 0.0,
                max: 0.0,
                quantiles: QUANTILES.iter().map(|&q| (q, 0.0)).collect(),
            };
        }
        // Welford: one pass, no cancellation between a large mean and a small spread.
        let (mut mean, mut m2) = (0.0f64, 0.0f64);
        for (i, &x) in v.iter().enumerate() {
            let d = x - mean;
            mean += d / (i + 1) as f64;
            m2 += d * (x - mean);
        }
        v.sort_by(|a, b| a.total_cmp(b));
        let n = v.len();
        let at = |q: f64| {
            let pos = q * (n - 1) as f64;
            let lo = pos.floor() as usize;
            let hi = (lo + 1).min(n - 1);
            v[lo] + (v[hi] - v[lo]) * (pos - lo as f64)
        };
        Summary {
            count: n,
            non_finite,
            mean,
            variance: m2 / n as f64,
            min: v[0],
            max: v[n - 1],
            quantiles: QUANTILES.iter().map(|&q| (q, at(q))).collect(),
        }
    }

    /// The value at quantile `q` if it is one of [`QUANTILES`].
    pub fn quantile(&self, q: f64) -> Option<f64> {
        self.quantiles
            .iter()
            .find(|(x, _)| (*x - q).abs() < 1e-12)
            .map(|(_, v)| *v)
    }
}

impl fmt::Display for Summary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let q = |p| self.quantile(p).unwrap_or(0.0);
        write!(
            f,
            "mean {:.3e} sd {:.3e} | q10 {:.3e} q50 {:.3e} q90 {:.3e} q99 {:.3e} max {:.3e}",
            self.mean,
            self.variance.sqrt(),
            q(0.1),
            q(0.5),
            q(0.9),
            q(0.99),
            self.max
        )?;
        if self.non_finite > 0 {
            write!(f, " ({} non-finite)", self.non_finite)?;
        }
        Ok(())
    }
}

/// Shares of elements by modulation `s` (fractions of the finite ones; they sum to 1).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ModulationShare {
    /// `s > 1`: the rate is raised (sensitivity low or unstable).
    pub above: f64,
    /// `s < 1`: the rate is lowered (sensitivity high and stable).
    pub below: f64,
    /// `s == 1` exactly.
    pub equal: f64,
}

/// Diagnostics of one tensor.
#[derive(Clone, Debug, PartialEq)]
pub struct TensorDiagnostics {
    /// Parameter name.
    pub name: String,
    /// Elements.
    pub len: usize,
    /// The tensor's next update `t` (its count plus one): what the bias corrections use.
    pub t: u64,
    /// The stored Ī (not bias-corrected; Ī' = Ī·`ibar_scale`, which the step computes as a
    /// division by `1 − β0^t` in f32).
    pub ibar: Summary,
    /// `1/(1 − β0^t)` of the next update, or 1 without bias correction.
    pub ibar_scale: f64,
    /// U of the next update (when θ and g were given).
    pub u: Option<Summary>,
    /// The modulation `s` of the next update (when θ and g were given).
    pub s: Option<Summary>,
    /// Shares of `s` above and below 1 (when θ and g were given).
    pub share: Option<ModulationShare>,
}

impl fmt::Display for TensorDiagnostics {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "{} ({} elements)", self.name, self.len)?;
        write!(f, "  Ī  {}", self.ibar)?;
        if let Some(u) = &self.u {
            write!(f, "\n  U  {u}")?;
        }
        if let Some(s) = &self.s {
            write!(f, "\n  s  {s}")?;
        }
        if let Some(sh) = &self.share {
            write!(
                f,
                "\n  s > 1: {:.1}%   s < 1: {:.1}%",
                100.0 * sh.above,
                100.0 * sh.below
            )?;
        }
        Ok(())
    }
}

/// What [`diagnose`] reads for one tensor.
pub struct Probe<'a, B: Backend + ?Sized, P: Element, S: Element> {
    /// Parameter name.
    pub name: &'a str,
    /// Group index (its SAGE settings and rate scale apply).
    pub group: usize,
    /// The tensor's state: its Ī (which must be present) and its step count.
    pub state: TensorState<&'a B::Buf<S>>,
    /// Current θ; without θ and the gradient only Ī is reported.
    pub param: Option<&'a B::Buf<P>>,
    /// The gradient the next step will see.
    pub grad: Option<&'a B::Buf<P>>,
    /// Clipping coefficient of that gradient (1 when none).
    pub grad_scale: f32,
}

impl<'a, B: Backend + ?Sized, S: Element> Probe<'a, B, S, S> {
    /// Ī alone, from a tensor's state (owned, a step's `StateMut`, or references).
    pub fn new<T: Borrow<B::Buf<S>>, N: Borrow<u64>>(
        name: &'a str,
        group: usize,
        state: &'a TensorState<T, N>,
    ) -> Self {
        Probe {
            name,
            group,
            state: TensorState {
                m: state.m.as_ref().map(Borrow::borrow),
                v: state.v.as_ref().map(Borrow::borrow),
                ibar: state.ibar.as_ref().map(Borrow::borrow),
                step: *state.step.borrow(),
            },
            param: None,
            grad: None,
            grad_scale: 1.0,
        }
    }
}

impl<'a, B: Backend + ?Sized, P: Element, S: Element> Probe<'a, B, P, S> {
    /// Adds the current θ and gradient, so U and `s` are reported too.
    pub fn with<Q: Element>(self, param: &'a B::Buf<Q>, grad: &'a B::Buf<Q>) -> Probe<'a, B, Q, S> {
        Probe {
            name: self.name,
            group: self.group,
            state: self.state,
            param: Some(param),
            grad: Some(grad),
            grad_scale: self.grad_scale,
        }
    }
    /// Sets the clipping coefficient the gradient gets.
    pub fn grad_scale(mut self, s: f32) -> Self {
        self.grad_scale = s;
        self
    }
}

/// Diagnostics of one tensor under `config`/`groups`, at the optimizer's count
/// `optimizer_step` (the tensor's own count is in `probe.state`): its next update is the
/// tensor's `t = probe.state.step + 1` during the optimizer's `optimizer_step + 1`, as
/// `Optimizer::step` would compute it.
pub fn diagnose<B: HostBuffers, P: Element, S: Element>(
    backend: &mut B,
    config: &Config,
    groups: &[ParamGroup],
    optimizer_step: u64,
    probe: &Probe<'_, B, P, S>,
) -> Result<TensorDiagnostics, CheckpointError> {
    let name = probe.name;
    let group = groups.get(probe.group).ok_or_else(|| {
        CheckpointError::tensor(name, format!("group {} does not exist", probe.group))
    })?;
    let next = |step: u64| {
        step.checked_add(1).ok_or_else(|| {
            CheckpointError::tensor(name, ParamProblem::StepOverflow { step }.to_string())
        })
    };
    let (t, opt_t) = (next(probe.state.step)?, next(optimizer_step)?);
    let ibar_buf = probe.state.ibar.ok_or_else(|| {
        CheckpointError::tensor(
            format!("{name}.ibar"),
            "no Ī in this state (its group has SAGE off?)",
        )
    })?;
    let host_err = |which: &str| {
        let key = format!("{name}.{which}");
        move |error| CheckpointError::backend(key, error)
    };
    let ibar = backend.to_host(ibar_buf).map_err(host_err("ibar"))?;
    let ibar_f: Vec<f32> = ibar.iter().map(|x| x.to_f32()).collect();
    let scalars = StepScalars::at(config, t, opt_t);
    let k = Coeffs::new(config, &scalars, group, probe.grad_scale);
    let mut out = TensorDiagnostics {
        name: name.to_string(),
        len: ibar.len(),
        t,
        ibar: Summary::of(&ibar_f),
        ibar_scale: 1.0 / scalars.bc0,
        u: None,
        s: None,
        share: None,
    };
    if let (Some(p), Some(g)) = (probe.param, probe.grad) {
        let theta = backend.to_host(p).map_err(host_err("param"))?;
        let grad = backend.to_host(g).map_err(host_err("grad"))?;
        if theta.len() != ibar.len() || grad.len() != ibar.len() {
            return Err(CheckpointError::tensor(
                name,
                format!(
                    "Ī has {} elements, θ {}, the gradient {}",
                    ibar.len(),
                    theta.len(),
                    grad.len()
                ),
            ));
        }
        let (mut u, mut s) = (
            Vec::with_capacity(ibar.len()),
            Vec::with_capacity(ibar.len()),
        );
        for ((ib, th), gr) in ibar.iter().zip(&theta).zip(&grad) {
            let (th, gr) = (th.to_f32(), gr.to_f32());
            // Exactly the update's order: Ī advanced and stored first, then read back.
            let next = S::from_f32(formula::accumulate(
                &k,
                Accumulate::Sensitivity,
                ib.to_f32(),
                th,
                gr,
            ))
            .to_f32();
            let i = formula::sensitivity(th, formula::effective_grad(&k, th, gr));
            u.push((i - formula::corrected_ibar(&k, next)).abs());
            s.push(formula::modulation(&k, i, next));
        }
        let finite = s.iter().filter(|x| x.is_finite()).count().max(1) as f64;
        out.share = Some(ModulationShare {
            above: s.iter().filter(|&&x| x > 1.0).count() as f64 / finite,
            below: s.iter().filter(|&&x| x < 1.0).count() as f64 / finite,
            equal: s.iter().filter(|&&x| x == 1.0).count() as f64 / finite,
        });
        out.u = Some(Summary::of(&u));
        out.s = Some(Summary::of(&s));
    }
    Ok(out)
}

/// Ī statistics of every SAGE tensor of a checkpoint (no backend needed).
pub fn checkpoint_ibar(c: &Checkpoint<'_>) -> Vec<(String, Summary)> {
    c.params()
        .iter()
        .filter_map(|p| {
            c.read_f32(&p.name, Buffer::Ibar)
                .map(|ib| (p.name.clone(), Summary::of(&ib)))
        })
        .collect()
}

/// Ī of each named tensor as an f32 safetensors file keyed by the parameter name, with
/// metadata `sage.kind = importance`, `sage.score = ibar`, `sage.step` (the optimizer's count
/// `step`). Ī is stored as is, not bias-corrected: with every tensor stepped alike, the
/// correction scales them all by the same factor, so rankings do not change (tensors whose
/// own counts differ get slightly different factors, `1/(1 − β0^t)`, negligible once
/// `β0^t` is small).
pub fn export_importance<B: HostBuffers, S: Element>(
    backend: &mut B,
    step: u64,
    tensors: &[(&str, &B::Buf<S>)],
) -> Result<Vec<u8>, CheckpointError> {
    let mut host = Vec::with_capacity(tensors.len());
    for (name, buf) in tensors {
        let v = backend
            .to_host(*buf)
            .map_err(|error| CheckpointError::backend(format!("{name}.ibar"), error))?;
        host.push((name.to_string(), v.iter().map(|x| x.to_f32()).collect()));
    }
    write_importance(step, host)
}

/// [`export_importance`] from a checkpoint's stored Ī.
pub fn checkpoint_importance(c: &Checkpoint<'_>) -> Result<Vec<u8>, CheckpointError> {
    let host = c
        .params()
        .iter()
        .filter_map(|p| {
            c.read_f32(&p.name, Buffer::Ibar)
                .map(|v| (p.name.clone(), v))
        })
        .collect();
    write_importance(c.step(), host)
}

fn write_importance(step: u64, host: Vec<(String, Vec<f32>)>) -> Result<Vec<u8>, CheckpointError> {
    let bytes: Vec<(String, Vec<usize>, Vec<u8>)> = host
        .into_iter()
        .map(|(n, v)| {
            let shape = vec![v.len()];
            (n, shape, v.iter().flat_map(|x| x.to_le_bytes()).collect())
        })
        .collect();
    let mut views = Vec::with_capacity(bytes.len());
    for (n, shape, data) in &bytes {
        let view =
            safetensors::tensor::TensorView::new(safetensors::Dtype::F32, shape.clone(), data)
                .map_err(|e| CheckpointError::Write {
                    reason: format!("{n}: {e}"),
                })?;
        views.push((n.as_str(), view));
    }
    let meta: HashMap<String, String> = [
        ("sage.kind", "importance".to_string()),
        ("sage.score", "ibar".to_string()),
        ("sage.step", step.to_string()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    safetensors::serialize(views, Some(meta)).map_err(|e| CheckpointError::Write {
        reason: e.to_string(),
    })
}

/// Marks the `fraction` of all elements (across every tensor of `scores`) with the lowest
/// score: `true` = prune. Ties at the threshold are broken by position, so exactly
/// `round(fraction · total)` elements are marked. NaN scores, of either sign, sort after
/// every number (so they are pruned last, not first: x86 makes `0/0` a NaN with the sign bit
/// set, which `f32::total_cmp` would put before −∞).
pub fn lowest_mask(scores: &[&[f32]], fraction: f64) -> Vec<Vec<bool>> {
    let total: usize = scores.iter().map(|s| s.len()).sum();
    let k = ((fraction.clamp(0.0, 1.0) * total as f64).round() as usize).min(total);
    let mut order: Vec<(f32, usize, usize)> = scores
        .iter()
        .enumerate()
        .flat_map(|(t, s)| s.iter().enumerate().map(move |(i, &x)| (x, t, i)))
        .collect();
    // NaN scores of either sign sort last: never pruned for being "lowest". Among numbers,
    // `total_cmp` (−0 before +0); among NaNs, position.
    order.sort_by(|a, b| {
        let by_value = match (a.0.is_nan(), b.0.is_nan()) {
            (false, false) => a.0.total_cmp(&b.0),
            (x, y) => x.cmp(&y),
        };
        by_value.then((a.1, a.2).cmp(&(b.1, b.2)))
    });
    let mut mask: Vec<Vec<bool>> = scores.iter().map(|s| vec![false; s.len()]).collect();
    for &(_, t, i) in order.iter().take(k) {
        mask[t][i] = true;
    }
    mask
}
