//! Learning-rate schedules: `η_t = η · factor(t)`.
//!
//! Fractions are `f64`, as in the Python code they come from: `t/T < warmup` must compare the
//! same way it does there.
//!
//! `t` is the 1-based index of the update being made (the first `step` call has `t = 1`), after
//! the configuration's [`ScheduleClock`](crate::ScheduleClock) was applied. Each schedule keeps
//! the convention of the code it comes from, so a run reproduces that code's rates exactly.

use crate::error::ConfigError;

/// A learning-rate schedule.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Schedule {
    /// `factor = 1`.
    Constant,
    /// pytorch-pretrained-bert 0.6.0 `warmup_linear`, as the authors used it: with `x = t/T`,
    /// `x/warmup` while `x < warmup`, then `1 − x` (not clamped: past `T` it goes negative,
    /// exactly as in that code).
    WarmupLinearPpb {
        /// Warm-up length as a fraction of `t_total`.
        warmup: f64,
        /// Total number of updates `T`.
        t_total: u64,
    },
    /// Linear warm-up then linear decay to 0 (Hugging Face `get_linear_schedule_with_warmup`:
    /// evaluated at `k = t − 1` updates done).
    LinearWarmupDecay {
        /// Warm-up updates.
        warmup_steps: u64,
        /// Total updates; the rate is 0 from here on.
        total_steps: u64,
    },
    /// Linear warm-up then cosine decay (Hugging Face `get_cosine_schedule_with_warmup`,
    /// evaluated at `k = t − 1`).
    CosineWarmup {
        /// Warm-up updates.
        warmup_steps: u64,
        /// Total updates.
        total_steps: u64,
        /// Number of cosine waves, as Hugging Face counts them: 0.5 decays once from η to 0.
        cycles: f64,
    },
    /// fairseq `inverse_sqrt`: linear warm-up from `init_factor · η` to `η` over `warmup_steps`,
    /// then `η · sqrt(warmup_steps / k)`, evaluated at `k = t − 1` updates done.
    InverseSqrt {
        /// Warm-up updates (at least 1).
        warmup_steps: u64,
        /// Rate at `k = 0` as a fraction of `η` (fairseq's `warmup_init_lr / lr`).
        init_factor: f64,
    },
}

impl Schedule {
    /// The multiplier of the base rate for update `t` (1-based).
    ///
    /// ```
    /// use sage_core::Schedule;
    /// let s = Schedule::WarmupLinearPpb { warmup: 0.1, t_total: 20 };
    /// assert!((s.factor(1) - 0.5).abs() < 1e-12); // x = 0.05 < 0.1: x / 0.1
    /// assert!((s.factor(4) - 0.8).abs() < 1e-12); // x = 0.2: 1 − x
    /// ```
    pub fn factor(&self, t: u64) -> f64 {
        // Updates already made, the clock of Hugging Face and fairseq schedulers.
        let done = t.saturating_sub(1) as f64;
        match *self {
            Schedule::Constant => 1.0,
            Schedule::WarmupLinearPpb { warmup, t_total } => {
                let x = t as f64 / t_total as f64;
                let w = warmup;
                if x < w {
                    x / w
                } else {
                    1.0 - x
                }
            }
            Schedule::LinearWarmupDecay {
                warmup_steps,
                total_steps,
            } => {
                let (w, total) = (warmup_steps as f64, total_steps as f64);
                if done < w {
                    done / w.max(1.0)
                } else {
                    ((total - done) / (total - w).max(1.0)).max(0.0)
                }
            }
            Schedule::CosineWarmup {
                warmup_steps,
                total_steps,
                cycles,
            } => {
                let (w, total) = (warmup_steps as f64, total_steps as f64);
                if done < w {
                    return done / w.max(1.0);
                }
                let progress = (done - w) / (total - w).max(1.0);
                let c = libm::cos(core::f64::consts::PI * cycles * 2.0 * progress);
                (0.5 * (1.0 + c)).max(0.0)
            }
            Schedule::InverseSqrt {
                warmup_steps,
                init_factor,
            } => {
                let w = warmup_steps as f64;
                let init = init_factor;
                if done < w {
                    init + done * (1.0 - init) / w
                } else {
                    libm::sqrt(w / done)
                }
            }
        }
    }

    /// Checks the schedule's own parameters.
    pub fn validate(&self) -> Result<(), ConfigError> {
        match *self {
            Schedule::Constant => Ok(()),
            Schedule::WarmupLinearPpb { warmup, t_total } => {
                if !(warmup.is_finite() && (0.0..1.0).contains(&warmup)) {
                    return Err(ConfigError::new(
                        "schedule.warmup",
                        "must be in [0, 1)",
                        warmup,
                    ));
                }
                if t_total == 0 {
                    return Err(ConfigError::new(
                        "schedule.t_total",
                        "must be at least 1",
                        0.0,
                    ));
                }
                Ok(())
            }
            Schedule::LinearWarmupDecay {
                warmup_steps,
                total_steps,
            }
            | Schedule::CosineWarmup {
                warmup_steps,
                total_steps,
                ..
            } => {
                if total_steps == 0 {
                    return Err(ConfigError::new(
                        "schedule.total_steps",
                        "must be at least 1",
                        0.0,
                    ));
                }
                if warmup_steps > total_steps {
                    return Err(ConfigError::new(
                        "schedule.warmup_steps",
                        "must not exceed total_steps",
                        warmup_steps as f64,
                    ));
                }
                if let Schedule::CosineWarmup { cycles, .. } = *self {
                    if !(cycles.is_finite() && cycles > 0.0) {
                        return Err(ConfigError::new(
                            "schedule.cycles",
                            "must be finite and > 0",
                            cycles,
                        ));
                    }
                }
                Ok(())
            }
            Schedule::InverseSqrt {
                warmup_steps,
                init_factor,
            } => {
                if warmup_steps == 0 {
                    return Err(ConfigError::new(
                        "schedule.warmup_steps",
                        "must be at least 1 for inverse_sqrt",
                        0.0,
                    ));
                }
                if !(init_factor.is_finite() && (0.0..=1.0).contains(&init_factor)) {
                    return Err(ConfigError::new(
                        "schedule.init_factor",
                        "must be in [0, 1]",
                        init_factor,
                    ));
                }
                Ok(())
            }
        }
    }
}
