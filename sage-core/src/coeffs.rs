//! Per-step scalars, computed on the host once per step (in f64, then rounded to f32 the way
//! torch rounds Python floats), and the per-tensor [`Coeffs`] every backend's kernel reads.

use crate::config::{
    Algorithm, Config, DecayMode, EpsStyle, ParamGroup, ScheduleClock, ScheduleCount,
};

/// Which algorithm a [`Coeffs`] drives (`Coeffs::kind`).
pub mod kind {
    /// SGD (with or without momentum).
    pub const SGD: u32 = 0;
    /// Adam and AdamW (they differ only in scalars).
    pub const ADAM: u32 = 1;
    /// Adamax.
    pub const ADAMAX: u32 = 2;
}

/// Bits of `Coeffs::flags`.
pub mod flags {
    /// Modulate by sensitivity (SAGE on).
    pub const SAGE: u32 = 1;
    /// SGD steps along `g + μ·b`.
    pub const NESTEROV: u32 = 2;
    /// SGD has a momentum buffer.
    pub const MOMENTUM: u32 = 4;
}

/// Everything the per-element update of one tensor needs at one step.
///
/// `#[repr(C)]` with only 4-byte fields: GPU kernels receive it by value with the same layout
/// (`sage_coeffs` in the shared kernel source). Computed by [`Coeffs::new`]; backends read it.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Default)]
pub struct Coeffs {
    /// One of [`kind`].
    pub kind: u32,
    /// Bits of [`flags`].
    pub flags: u32,
    /// [`Modulation`](crate::Modulation) as its `u32` discriminant.
    pub modulation: u32,
    /// Reserved (keeps the layout a multiple of 8 bytes).
    pub reserved: u32,
    /// Clipping coefficient multiplying the raw gradient.
    pub grad_scale: f32,
    /// L2 weight decay folded into the gradient: `g = grad·grad_scale + l2·θ`.
    pub l2: f32,
    /// EMA coefficients of `m` (SGD: the momentum buffer; 0 and 1 at its first step).
    pub beta1: f32,
    /// Weight of the new value in `m`.
    pub alpha1: f32,
    /// EMA coefficients of `v` (Adamax: decay of `u`).
    pub beta2: f32,
    /// Weight of `g²` in `v`.
    pub alpha2: f32,
    /// β0, the sensitivity EMA coefficient.
    pub beta0: f32,
    /// 1 − β0.
    pub alpha0: f32,
    /// SGD Nesterov μ.
    pub momentum: f32,
    /// Ī' = Ī / ibar_div (1 − β0^t, or 1 without Ī's bias correction). A division, as the
    /// authors' code does (`exp_avg_ipt / bias_correction3`): a multiply by the rounded
    /// reciprocal leaves U = |I − Ī'| off zero at t = 1 for about one element in five, noise
    /// that SAGE's modulation amplifies on parameters near zero.
    pub ibar_div: f32,
    /// ε added to U.
    pub eps_num: f32,
    /// ε added to Ī'.
    pub eps_den: f32,
    /// Step size multiplying `s · direction`: η_t · group scale · moment bias factor.
    pub step: f32,
    /// Adam: `√v · denom_scale + denom_eps`.
    pub denom_scale: f32,
    /// Adam / Adamax denominator ε.
    pub denom_eps: f32,
    /// Adamax: `u = max(β2·u, |g| + inf_eps)`.
    pub inf_eps: f32,
    /// Adamax (authors): weight decay added to the direction.
    pub in_step_decay: f32,
    /// θ is multiplied by this before the update (torch AdamW: 1 − η_t·wd).
    pub pre_keep: f32,
    /// After the update: `θ ← θ − post_decay·θ` (authors' AdamW: η·wd).
    pub post_decay: f32,
    /// Reserved.
    pub reserved2: f32,
}

/// Scalars shared by every tensor of a step.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct StepScalars {
    /// 1-based index of this update.
    pub t: u64,
    /// Scheduled rate η_t (before group multipliers).
    pub lr: f64,
    /// Base rate η.
    pub base_lr: f64,
    /// 1 − β1^t (1 without bias correction).
    pub bc1: f64,
    /// 1 − β2^t (1 without bias correction).
    pub bc2: f64,
    /// 1 − β0^t (1 without Ī's bias correction): Ī' = Ī / bc0.
    pub bc0: f64,
}

impl StepScalars {
    /// Scalars of update `t` (1-based) under `cfg`, when the tensor's count and the
    /// optimizer's agree (every tensor present at every step).
    pub fn new(cfg: &Config, t: u64) -> Self {
        Self::at(cfg, t, t)
    }

    /// Scalars of a tensor's own update `t` made during the optimizer's update `optimizer_t`:
    /// bias corrections follow `t`; the schedule follows the count
    /// [`Config::schedule_count`] names.
    pub fn at(cfg: &Config, t: u64, optimizer_t: u64) -> Self {
        let count = match cfg.schedule_count {
            ScheduleCount::Tensor => t,
            ScheduleCount::Optimizer => optimizer_t,
        };
        let sched_t = match cfg.schedule_clock {
            ScheduleClock::Current => count,
            ScheduleClock::Lagged => count.saturating_sub(1),
        };
        let lr = cfg.lr * cfg.schedule.factor(sched_t);
        let pow = |b: f64| libm::pow(b, t as f64);
        let (bc1, bc2) = match cfg.algorithm.betas() {
            Some((b1, b2)) if cfg.bias_correction => (1.0 - pow(b1), 1.0 - pow(b2)),
            _ => (1.0, 1.0),
        };
        let bc0 = if cfg.sensitivity.bias_correction {
            1.0 - pow(cfg.sensitivity.beta0)
        } else {
            1.0
        };
        StepScalars {
            t,
            lr,
            base_lr: cfg.lr,
            bc1,
            bc2,
            bc0,
        }
    }
}

impl Coeffs {
    /// The coefficients of one tensor of group `group` at the step `s`, whose gradient is
    /// multiplied by `grad_scale` (clipping).
    pub fn new(cfg: &Config, s: &StepScalars, group: &ParamGroup, grad_scale: f32) -> Self {
        let lr = s.lr * group.lr_scale;
        let wd = group.weight_decay;
        let sens = &cfg.sensitivity;
        let mut k = Coeffs {
            modulation: sens.modulation as u32,
            grad_scale,
            beta0: sens.beta0 as f32,
            alpha0: (1.0 - sens.beta0) as f32,
            ibar_div: s.bc0 as f32,
            eps_num: sens.eps_num as f32,
            eps_den: sens.eps_den as f32,
            step: lr as f32,
            denom_scale: 1.0,
            pre_keep: 1.0,
            ..Coeffs::default()
        };
        if group.sage {
            k.flags |= flags::SAGE;
        }
        match cfg.algorithm {
            Algorithm::Sgd {
                momentum,
                dampening,
                nesterov,
            } => {
                k.kind = kind::SGD;
                if momentum > 0.0 {
                    k.flags |= flags::MOMENTUM;
                    // torch.optim.SGD: the buffer starts as a copy of the first gradient.
                    (k.beta1, k.alpha1) = if s.t <= 1 {
                        (0.0, 1.0)
                    } else {
                        (momentum as f32, (1.0 - dampening) as f32)
                    };
                    k.momentum = momentum as f32;
                    if nesterov {
                        k.flags |= flags::NESTEROV;
                    }
                }
            }
            Algorithm::Adam { beta1, beta2 } | Algorithm::AdamW { beta1, beta2 } => {
                k.kind = kind::ADAM;
                k.beta1 = beta1 as f32;
                // 1 − β in f64 first, as torch does with Python floats: (1 − 0.999f32) is
                // 1.3e-5 off, enough to leave the authors' trajectories.
                k.alpha1 = (1.0 - beta1) as f32;
                k.beta2 = beta2 as f32;
                k.alpha2 = (1.0 - beta2) as f32;
                k.denom_eps = cfg.eps as f32;
                match cfg.eps_style {
                    // m̂/(√v̂ + ε) = (m/bc1) / (√v/√bc2 + ε)
                    EpsStyle::Torch => {
                        k.step = (lr / s.bc1) as f32;
                        k.denom_scale = (1.0 / libm::sqrt(s.bc2)) as f32;
                    }
                    // (√bc2/bc1) · m/(√v + ε)
                    EpsStyle::Authors => k.step = (lr * libm::sqrt(s.bc2) / s.bc1) as f32,
                }
            }
            Algorithm::Adamax { beta1, beta2 } => {
                k.kind = kind::ADAMAX;
                k.beta1 = beta1 as f32;
                k.alpha1 = (1.0 - beta1) as f32;
                k.beta2 = beta2 as f32;
                k.inf_eps = cfg.eps as f32;
                k.step = (lr / s.bc1) as f32;
                if cfg.eps_style == EpsStyle::Authors {
                    k.denom_eps = cfg.eps as f32;
                }
            }
        }
        match cfg.decay {
            DecayMode::L2 => k.l2 = wd as f32,
            DecayMode::Decoupled => k.pre_keep = (1.0 - lr * wd) as f32,
            DecayMode::DecoupledAfterBaseRate => {
                k.post_decay = (s.base_lr * group.lr_scale * wd) as f32
            }
            DecayMode::InStep => k.in_step_decay = wd as f32,
        }
        k
    }

    /// Whether SAGE modulates this tensor.
    pub const fn sage(&self) -> bool {
        self.flags & flags::SAGE != 0
    }
}

/// The clipping coefficient of `torch.nn.utils.clip_grad_norm_`: `min(1, max/(norm + 1e-6))`.
pub fn clip_coefficient(max_norm: f64, norm: f64) -> f64 {
    let c = max_norm / (norm + 1e-6);
    if c < 1.0 {
        c
    } else {
        1.0
    }
}
