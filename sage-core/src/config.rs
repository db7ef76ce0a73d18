//! Configuration: the base algorithm, the SAGE sensitivity settings, the two presets, and
//! parameter groups. Everything is validated before the first step.

use crate::error::ConfigError;
use crate::schedule::Schedule;
use crate::state::StateLayout;

/// The base optimizer SAGE modulates.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Algorithm {
    /// SGD with optional heavy-ball or Nesterov momentum (torch.optim.SGD semantics:
    /// the momentum buffer starts as the first gradient).
    Sgd {
        /// μ; 0 is plain SGD (no state buffer).
        momentum: f64,
        /// τ: the buffer adds `(1 − τ)·g` after the first step.
        dampening: f64,
        /// Step along `g + μ·b` instead of `b`.
        nesterov: bool,
    },
    /// Adam with L2 decay in the gradient (Algorithm 2 of the paper).
    Adam {
        /// β1.
        beta1: f64,
        /// β2.
        beta2: f64,
    },
    /// Adam with decoupled weight decay (the authors' `UnstructAwareAdamW`).
    AdamW {
        /// β1.
        beta1: f64,
        /// β2.
        beta2: f64,
    },
    /// Adamax, the infinity-norm Adam (the authors' `UnstructAwareAdamax`).
    Adamax {
        /// β1.
        beta1: f64,
        /// β2.
        beta2: f64,
    },
}

impl Algorithm {
    /// SGD with heavy-ball momentum `mu` (0: plain SGD).
    pub const fn sgd(momentum: f64) -> Self {
        Algorithm::Sgd {
            momentum,
            dampening: 0.0,
            nesterov: false,
        }
    }
    /// Adam with β = (0.9, 0.999).
    pub const fn adam() -> Self {
        Algorithm::Adam {
            beta1: 0.9,
            beta2: 0.999,
        }
    }
    /// AdamW with β = (0.9, 0.999).
    pub const fn adamw() -> Self {
        Algorithm::AdamW {
            beta1: 0.9,
            beta2: 0.999,
        }
    }
    /// Adamax with β = (0.9, 0.999).
    pub const fn adamax() -> Self {
        Algorithm::Adamax {
            beta1: 0.9,
            beta2: 0.999,
        }
    }

    /// Short name, for messages and reports.
    pub const fn name(&self) -> &'static str {
        match self {
            Algorithm::Sgd { .. } => "SGD",
            Algorithm::Adam { .. } => "Adam",
            Algorithm::AdamW { .. } => "AdamW",
            Algorithm::Adamax { .. } => "Adamax",
        }
    }

    /// Whether this is SGD (no second moment, no moment bias correction).
    pub const fn is_sgd(&self) -> bool {
        matches!(self, Algorithm::Sgd { .. })
    }

    /// (β1, β2) of the Adam family.
    pub const fn betas(&self) -> Option<(f64, f64)> {
        match *self {
            Algorithm::Sgd { .. } => None,
            Algorithm::Adam { beta1, beta2 }
            | Algorithm::AdamW { beta1, beta2 }
            | Algorithm::Adamax { beta1, beta2 } => Some((beta1, beta2)),
        }
    }
}

/// Which text SAGE's details follow.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Preset {
    /// The paper's Algorithms 1–2 and Eq. 4: `s = (U + ε)/(Ī' + ε)`, Ī bias-corrected for the
    /// Adam family, weight decay as L2 in the gradient (AdamW: torch.optim.AdamW's decay).
    Paper,
    /// The authors' code, which produced the paper's tables: `s = U/(Ī' + ε²)`, so an element
    /// whose θ is exactly 0 is never updated; AdamW's decay after the update at the base rate;
    /// Adamax's decay inside the modulated step and its schedule one step behind.
    Reference,
}

/// The learning-rate modulation: SAGE's, or one of the paper's Table 12 ablations.
/// `U` terms add `eps_num`, `Ī` terms add `eps_den`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u32)]
pub enum Modulation {
    /// SAGE: `(U + ε)/(Ī + ε)`.
    Sage = 0,
    /// Ablation 1: `(Ī + ε)·(U + ε)`.
    ImportanceTimesVariation = 1,
    /// Ablation 2: `(Ī + ε)/(U + ε)`.
    ImportanceOverVariation = 2,
    /// Ablation 3: `Ī + ε`.
    Importance = 3,
    /// Ablation 4: `1/(Ī + ε)`.
    InverseImportance = 4,
    /// Ablation 5: `U + ε`.
    Variation = 5,
}

impl Modulation {
    /// All six, in the order of Table 12.
    pub const ALL: [Modulation; 6] = [
        Modulation::Sage,
        Modulation::ImportanceTimesVariation,
        Modulation::ImportanceOverVariation,
        Modulation::Importance,
        Modulation::InverseImportance,
        Modulation::Variation,
    ];
    /// Whether `U + eps_num` is a denominator (then `eps_num` must be > 0).
    pub const fn divides_by_variation(self) -> bool {
        matches!(self, Modulation::ImportanceOverVariation)
    }
    /// Whether `Ī + eps_den` is a denominator (then `eps_den` must be > 0).
    pub const fn divides_by_importance(self) -> bool {
        matches!(self, Modulation::Sage | Modulation::InverseImportance)
    }
}

/// How weight decay enters the update.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DecayMode {
    /// L2: `g ← g + wd·θ` after clipping, before anything else (paper; SGD, Adam).
    L2,
    /// torch.optim.AdamW: `θ ← θ·(1 − η_t·wd)` before the update.
    Decoupled,
    /// The authors' AdamW: `θ ← θ − η·wd·θ` after the update, with the *base* rate η.
    DecoupledAfterBaseRate,
    /// The authors' Adamax: `d = m/(u + ε) + wd·θ`, inside the modulated step.
    InStep,
}

/// Where the Adam-family epsilon sits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EpsStyle {
    /// torch / the paper: Adam `m̂/(√v̂ + ε)`; Adamax `m̂/u` (u already holds `|g| + ε`).
    Torch,
    /// The authors' code: Adam `(√(1−β2^t)/(1−β1^t))·m/(√v + ε)`; Adamax `m/(u + ε)`.
    Authors,
}

/// Which step count the schedule sees.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ScheduleClock {
    /// Update `t` is scheduled at `t`.
    Current,
    /// Update `t` is scheduled at `t − 1` (the authors' Adamax reads its counter before
    /// incrementing it, so under warm-up its first step has rate 0).
    Lagged,
}

/// Whose step count drives the schedule when tensors' counts differ (a tensor absent from some
/// steps has fewer updates than the optimizer).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ScheduleCount {
    /// The tensor's own count: the authors' optimizers compute `lr_scheduled` from
    /// `state['step']` of each parameter.
    Tensor,
    /// The optimizer's count, as torch's schedulers (`LambdaLR` and friends) step once per
    /// `optimizer.step()`.
    Optimizer,
}

/// SAGE's own settings.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SensitivityConfig {
    /// β0: coefficient of the sensitivity moving average Ī ("beta3" in the authors' code).
    pub beta0: f64,
    /// ε added to the variation `U`.
    pub eps_num: f64,
    /// ε added to the smoothed sensitivity `Ī'`.
    pub eps_den: f64,
    /// Divide Ī by `1 − β0^t`.
    pub bias_correction: bool,
    /// The modulation formula.
    pub modulation: Modulation,
}

/// The full optimizer configuration. Build it with [`Config::paper`] or [`Config::reference`]
/// and the builder methods; every field is public for research use, and [`Config::validate`]
/// checks them all.
///
/// ```
/// use sage_core::{Algorithm, Config, Schedule};
/// let cfg = Config::reference(Algorithm::adamw(), 2e-3)
///     .beta0(0.75)
///     .schedule(Schedule::WarmupLinearPpb { warmup: 0.1, t_total: 1000 })
///     .global_clip(1.0);
/// cfg.validate().unwrap();
/// assert!(Config::reference(Algorithm::adamw(), f64::NAN).validate().is_err());
/// ```
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Config {
    /// Which text the defaults came from.
    pub preset: Preset,
    /// Base optimizer.
    pub algorithm: Algorithm,
    /// Base learning rate η.
    pub lr: f64,
    /// Adam-family ε.
    pub eps: f64,
    /// Adam-family moment bias correction.
    pub bias_correction: bool,
    /// Where ε sits in the Adam-family step.
    pub eps_style: EpsStyle,
    /// How weight decay enters.
    pub decay: DecayMode,
    /// SAGE settings (used by groups with SAGE on).
    pub sensitivity: SensitivityConfig,
    /// η_t = η · schedule.factor(t).
    pub schedule: Schedule,
    /// Which step count the schedule sees.
    pub schedule_clock: ScheduleClock,
    /// Whose count that is: each tensor's own, or the optimizer's.
    pub schedule_count: ScheduleCount,
    /// Max global gradient norm (torch `clip_grad_norm_`), applied first.
    pub global_clip: Option<f64>,
    /// Max norm of each tensor's gradient (the authors' `max_grad_norm`), applied second.
    pub per_tensor_clip: Option<f64>,
    /// Skip a step whose gradients hold NaN or ±Inf, leaving everything untouched.
    ///
    /// What the guard covers, exactly: every element of every gradient in the step (through the
    /// norm pass, whose chunk partials are non-finite when a chunk holds NaN/±Inf), or, with
    /// [`Optimizer::step_with_norms`](crate::Optimizer::step_with_norms), a non-finite total
    /// reported from outside (any rank's gradients). Then no parameter, state buffer or step
    /// count changes, and the report names the first tensor. What it does not prevent: NaN or
    /// ±Inf already in a parameter or a state buffer (they flow into that element's update and
    /// its Ī; checkpoints refuse to load such state), and an update that overflows from finite
    /// inputs (an ε or a rate out of all proportion). Those are *reported* after the step
    /// ([`StepReport::non_finite_params`](crate::StepReport)) by backends that count non-finite
    /// parameters in their update pass (sage-cpu's, sage-cuda's and sage-opencl's do;
    /// `params_checked` says whether the backend counted). f16 state for `v` and `Ī`, and epsilons that vanish in f32, are
    /// refused before any step.
    pub skip_non_finite: bool,
}

impl Config {
    /// The paper's Algorithms 1–2 (Eq. 4), ε = 1e-6, β0 = 0.8, constant rate.
    pub fn paper(algorithm: Algorithm, lr: f64) -> Self {
        let eps = 1e-6;
        let adam_family = !algorithm.is_sgd();
        Config {
            preset: Preset::Paper,
            algorithm,
            lr,
            eps,
            bias_correction: adam_family,
            eps_style: EpsStyle::Torch,
            decay: match algorithm {
                Algorithm::AdamW { .. } => DecayMode::Decoupled,
                _ => DecayMode::L2,
            },
            sensitivity: SensitivityConfig {
                beta0: 0.8,
                eps_num: eps,
                eps_den: eps,
                bias_correction: adam_family,
                modulation: Modulation::Sage,
            },
            schedule: Schedule::Constant,
            schedule_clock: ScheduleClock::Current,
            schedule_count: ScheduleCount::Optimizer,
            global_clip: None,
            per_tensor_clip: None,
            skip_non_finite: true,
        }
    }

    /// The authors' code (`UnstructAwareAdamW`, `UnstructAwareAdamax`), ε = 1e-6, β0 = 0.8.
    /// SGD and Adam, which that code lacks, get its modulation (`ε_num = 0`, `ε_den = ε²`) over
    /// the paper's base steps.
    pub fn reference(algorithm: Algorithm, lr: f64) -> Self {
        let mut c = Config::paper(algorithm, lr);
        c.preset = Preset::Reference;
        c.eps_style = EpsStyle::Authors;
        c.sensitivity.eps_num = 0.0;
        c.sensitivity.eps_den = c.eps * c.eps;
        c.schedule_count = ScheduleCount::Tensor;
        match algorithm {
            Algorithm::AdamW { .. } => c.decay = DecayMode::DecoupledAfterBaseRate,
            Algorithm::Adamax { .. } => {
                c.decay = DecayMode::InStep;
                c.bias_correction = false;
                c.sensitivity.bias_correction = false;
                c.schedule_clock = ScheduleClock::Lagged;
            }
            _ => {}
        }
        c
    }

    /// Sets β0.
    pub fn beta0(mut self, beta0: f64) -> Self {
        self.sensitivity.beta0 = beta0;
        self
    }

    /// Sets ε, and the SAGE epsilons the preset derives from it.
    pub fn eps(mut self, eps: f64) -> Self {
        self.eps = eps;
        match self.preset {
            Preset::Paper => {
                self.sensitivity.eps_num = eps;
                self.sensitivity.eps_den = eps;
            }
            Preset::Reference => {
                self.sensitivity.eps_num = 0.0;
                self.sensitivity.eps_den = eps * eps;
            }
        }
        self
    }

    /// Turns bias correction on or off for the moments and Ī together (SGD has neither:
    /// its Ī is never corrected, as in Algorithm 1).
    pub fn bias_correction(mut self, on: bool) -> Self {
        self.bias_correction = on && !self.algorithm.is_sgd();
        self.sensitivity.bias_correction = on && !self.algorithm.is_sgd();
        self
    }

    /// Sets the schedule.
    pub fn schedule(mut self, schedule: Schedule) -> Self {
        self.schedule = schedule;
        self
    }

    /// Sets the modulation (SAGE or a Table 12 ablation).
    pub fn modulation(mut self, m: Modulation) -> Self {
        self.sensitivity.modulation = m;
        self
    }

    /// Clips the global gradient norm to `max_norm` before the step.
    pub fn global_clip(mut self, max_norm: f64) -> Self {
        self.global_clip = Some(max_norm);
        self
    }

    /// Clips each tensor's gradient norm to `max_norm` before the step.
    pub fn per_tensor_clip(mut self, max_norm: f64) -> Self {
        self.per_tensor_clip = Some(max_norm);
        self
    }

    /// Turns the non-finite guard on or off (on by default).
    pub fn skip_non_finite(mut self, on: bool) -> Self {
        self.skip_non_finite = on;
        self
    }

    /// Checks every field; the error names the field and the rule.
    pub fn validate(&self) -> Result<(), ConfigError> {
        fn unit(field: &'static str, x: f64) -> Result<(), ConfigError> {
            if x.is_finite() && (0.0..1.0).contains(&x) {
                Ok(())
            } else {
                Err(ConfigError::new(field, "must be in [0, 1)", x))
            }
        }
        fn nonneg(field: &'static str, x: f64) -> Result<(), ConfigError> {
            if x.is_finite() && x >= 0.0 {
                Ok(())
            } else {
                Err(ConfigError::new(field, "must be finite and >= 0", x))
            }
        }
        nonneg("lr", self.lr)?;
        nonneg("eps", self.eps)?;
        match self.algorithm {
            Algorithm::Sgd {
                momentum,
                dampening,
                nesterov,
            } => {
                unit("momentum", momentum)?;
                if !(dampening.is_finite() && (0.0..=1.0).contains(&dampening)) {
                    return Err(ConfigError::new(
                        "dampening",
                        "must be in [0, 1]",
                        dampening,
                    ));
                }
                if nesterov && (momentum <= 0.0 || dampening != 0.0) {
                    return Err(ConfigError::new(
                        "nesterov",
                        "needs momentum > 0 and dampening 0",
                        momentum,
                    ));
                }
            }
            Algorithm::Adam { beta1, beta2 }
            | Algorithm::AdamW { beta1, beta2 }
            | Algorithm::Adamax { beta1, beta2 } => {
                unit("betas.0", beta1)?;
                unit("betas.1", beta2)?;
            }
        }
        // The Adam-family denominator (√v + ε, or u ≥ |g| + ε) must stay non-zero — in f32,
        // where the kernels compute: an ε below f32's smallest subnormal rounds to 0 there.
        if !self.algorithm.is_sgd() && (self.eps as f32) <= 0.0 {
            return Err(ConfigError::new(
                "eps",
                "must be > 0 in f32 for the Adam family (it keeps the denominator non-zero; below ~1.4e-45 it rounds to 0)",
                self.eps,
            ));
        }
        if self.decay == DecayMode::InStep && !matches!(self.algorithm, Algorithm::Adamax { .. }) {
            return Err(ConfigError::new(
                "decay",
                "InStep decay exists only for Adamax",
                0.0,
            ));
        }
        let s = &self.sensitivity;
        unit("beta0", s.beta0)?;
        nonneg("eps_num", s.eps_num)?;
        nonneg("eps_den", s.eps_den)?;
        // In f32, as the kernels read them: the reference preset's eps_den = ε² rounds to 0
        // for ε below ~3.7e-23, and then an element with no history computes 0/0.
        if s.modulation.divides_by_importance() && (s.eps_den as f32) <= 0.0 {
            return Err(ConfigError::new(
                "eps_den",
                "must be > 0 in f32: this modulation divides by Ī + eps_den (the reference preset's eps_den is eps²)",
                s.eps_den,
            ));
        }
        if s.modulation.divides_by_variation() && (s.eps_num as f32) <= 0.0 {
            return Err(ConfigError::new(
                "eps_num",
                "must be > 0 in f32: this modulation divides by U + eps_num",
                s.eps_num,
            ));
        }
        self.schedule.validate()?;
        for (field, clip) in [
            ("global_clip", self.global_clip),
            ("per_tensor_clip", self.per_tensor_clip),
        ] {
            if let Some(c) = clip {
                if !(c.is_finite() && c > 0.0) {
                    return Err(ConfigError::new(field, "must be finite and > 0", c));
                }
            }
        }
        Ok(())
    }

    /// Which state buffers a tensor of a group with SAGE `sage` needs.
    pub fn state_layout(&self, sage: bool) -> StateLayout {
        let (m, v) = match self.algorithm {
            Algorithm::Sgd { momentum, .. } => (momentum > 0.0, false),
            _ => (true, true),
        };
        StateLayout { m, v, ibar: sage }
    }
}

/// A parameter group: SAGE on or off, weight decay, and a rate multiplier.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ParamGroup {
    /// Modulate this group's rates by sensitivity.
    pub sage: bool,
    /// Weight decay coefficient (how it enters: [`Config::decay`]).
    pub weight_decay: f64,
    /// Multiplies this group's learning rate.
    pub lr_scale: f64,
}

impl ParamGroup {
    /// SAGE on, no decay, rate × 1.
    pub const fn sage() -> Self {
        ParamGroup {
            sage: true,
            weight_decay: 0.0,
            lr_scale: 1.0,
        }
    }
    /// SAGE off (the plain base optimizer), no decay, rate × 1.
    pub const fn plain() -> Self {
        ParamGroup {
            sage: false,
            weight_decay: 0.0,
            lr_scale: 1.0,
        }
    }
    /// Sets the weight decay.
    pub const fn weight_decay(mut self, wd: f64) -> Self {
        self.weight_decay = wd;
        self
    }
    /// Sets the rate multiplier.
    pub const fn lr_scale(mut self, s: f64) -> Self {
        self.lr_scale = s;
        self
    }

    /// Checks the group's fields; `index` goes into the error.
    pub fn validate(&self, index: usize) -> Result<(), ConfigError> {
        if !(self.weight_decay.is_finite() && self.weight_decay >= 0.0) {
            return Err(ConfigError::new(
                "weight_decay",
                "must be finite and >= 0",
                self.weight_decay,
            )
            .in_group(index));
        }
        if !(self.lr_scale.is_finite() && self.lr_scale >= 0.0) {
            return Err(
                ConfigError::new("lr_scale", "must be finite and >= 0", self.lr_scale)
                    .in_group(index),
            );
        }
        Ok(())
    }
}
