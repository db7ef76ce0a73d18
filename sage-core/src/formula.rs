//! The per-element update, in `f32`: the one place SAGE's formula is written for the CPU.
//!
//! Backends either call these functions or implement their vector form and are checked
//! against them by the conformance suite. A state value is rounded to its storage type
//! before the parameter update reads it, so a fused pass and the composed primitives
//! ([`accumulate`] then [`apply`]) agree bit for bit.

use crate::coeffs::{flags, kind, Coeffs};
use crate::config::Modulation;
use crate::element::Element;
// Called as `Float::…` so that no_std builds (no inherent `f32::sqrt`) use libm.
use num_traits::Float;

/// Which state buffer an [`accumulate`] pass advances.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Accumulate {
    /// `m = β1·m + α1·g` (also SGD's momentum buffer).
    Moment,
    /// `v = β2·v + α2·g²`.
    SecondMoment,
    /// Adamax: `u = max(β2·u, |g| + ε)`.
    InfNorm,
    /// SAGE: `Ī = β0·Ī + α0·|θ·g|`.
    Sensitivity,
}

/// The gradient after clipping and L2 decay: `grad·grad_scale + l2·θ`.
#[inline(always)]
pub fn effective_grad(k: &Coeffs, theta: f32, grad: f32) -> f32 {
    grad * k.grad_scale + k.l2 * theta
}

/// Sensitivity `I = |θ·g|`.
#[inline(always)]
pub fn sensitivity(theta: f32, g: f32) -> f32 {
    Float::abs(theta * g)
}

/// Exponential moving average `β·acc + α·x`.
#[inline(always)]
pub fn ema(acc: f32, x: f32, beta: f32, alpha: f32) -> f32 {
    beta * acc + alpha * x
}

/// One state value advanced by one step. `theta` and `grad` are the raw stored values.
#[inline(always)]
pub fn accumulate(k: &Coeffs, which: Accumulate, acc: f32, theta: f32, grad: f32) -> f32 {
    let g = effective_grad(k, theta, grad);
    match which {
        Accumulate::Moment => ema(acc, g, k.beta1, k.alpha1),
        Accumulate::SecondMoment => ema(acc, g * g, k.beta2, k.alpha2),
        Accumulate::InfNorm => Float::max(k.beta2 * acc, Float::abs(g) + k.inf_eps),
        Accumulate::Sensitivity => ema(acc, sensitivity(theta, g), k.beta0, k.alpha0),
    }
}

/// The bias-corrected moving average `Ī' = Ī / (1 − β0^t)` of a stored `ibar`.
#[inline(always)]
pub fn corrected_ibar(k: &Coeffs, ibar: f32) -> f32 {
    ibar / k.ibar_div
}

/// The learning-rate modulation from the sensitivity `i` and the stored moving average `ibar`.
#[inline(always)]
pub fn modulation(k: &Coeffs, i: f32, ibar: f32) -> f32 {
    let ib = corrected_ibar(k, ibar);
    let u = Float::abs(i - ib);
    match k.modulation {
        m if m == Modulation::Sage as u32 => (u + k.eps_num) / (ib + k.eps_den),
        m if m == Modulation::ImportanceTimesVariation as u32 => (ib + k.eps_den) * (u + k.eps_num),
        m if m == Modulation::ImportanceOverVariation as u32 => (ib + k.eps_den) / (u + k.eps_num),
        m if m == Modulation::Importance as u32 => ib + k.eps_den,
        m if m == Modulation::InverseImportance as u32 => 1.0 / (ib + k.eps_den),
        _ => u + k.eps_num,
    }
}

/// The parameter update, reading state values already advanced this step.
/// Unused state values may be anything (they are not read).
#[inline(always)]
pub fn apply(k: &Coeffs, theta: f32, grad: f32, m: f32, v: f32, ibar: f32) -> f32 {
    let g = effective_grad(k, theta, grad);
    let s = if k.flags & flags::SAGE != 0 {
        modulation(k, sensitivity(theta, g), ibar)
    } else {
        1.0
    };
    let dir = match k.kind {
        kind::ADAM => m / (Float::sqrt(v) * k.denom_scale + k.denom_eps),
        kind::ADAMAX => m / (v + k.denom_eps) + k.in_step_decay * theta,
        _ => {
            if k.flags & flags::MOMENTUM == 0 {
                g
            } else if k.flags & flags::NESTEROV != 0 {
                g + k.momentum * m
            } else {
                m
            }
        }
    };
    let updated = theta * k.pre_keep - k.step * s * dir;
    updated - k.post_decay * updated
}

/// One element's whole step, in place: advances the state values that are present, then the
/// parameter. Storage rounding happens once per stored value.
#[inline(always)]
pub fn step<P: Element, S: Element>(
    k: &Coeffs,
    theta: &mut P,
    grad: P,
    m: Option<&mut S>,
    v: Option<&mut S>,
    ibar: Option<&mut S>,
) {
    let th = theta.to_f32();
    let gr = grad.to_f32();
    let advance = |slot: Option<&mut S>, which: Accumulate| -> f32 {
        match slot {
            Some(x) => {
                *x = S::from_f32(accumulate(k, which, x.to_f32(), th, gr));
                x.to_f32()
            }
            None => 0.0,
        }
    };
    let m = advance(m, Accumulate::Moment);
    let second = if k.kind == kind::ADAMAX {
        Accumulate::InfNorm
    } else {
        Accumulate::SecondMoment
    };
    let v = advance(v, second);
    let ib = advance(ibar, Accumulate::Sensitivity);
    *theta = P::from_f32(apply(k, th, gr, m, v, ib));
}
