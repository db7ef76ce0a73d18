//! A float64 transcription of SAGE (`SAGE.md`) — the oracle of the differential checks.
//!
//! Written independently of sage-core's formula: it reads the configuration's fields for what
//! they document and follows the text step by step, in f64. Storage rounding can be emulated
//! (round θ to the parameter type and state to the state type after every step, state before
//! the parameter update reads it), so half-precision backends are compared like for like.

use sage_core::{
    bf16, f16, Algorithm, Config, DType, DecayMode, EpsStyle, Modulation, ParamGroup, Schedule,
    ScheduleClock, ScheduleCount,
};

/// Rounds `x` the way a buffer of `d` stores it (through f32, nearest even).
pub fn round_to(d: DType, x: f64) -> f64 {
    let f = x as f32;
    match d {
        DType::F32 => f as f64,
        DType::F16 => f16::from_f32(f).to_f64(),
        DType::Bf16 => bf16::from_f32(f).to_f64(),
    }
}

/// The schedule's factor at update `t`, transcribed from each schedule's source.
pub fn schedule_factor(s: &Schedule, clock: ScheduleClock, t: u64) -> f64 {
    let t = match clock {
        ScheduleClock::Current => t as f64,
        ScheduleClock::Lagged => t as f64 - 1.0,
    };
    let done = (t - 1.0).max(0.0);
    match *s {
        Schedule::Constant => 1.0,
        Schedule::WarmupLinearPpb { warmup, t_total } => {
            let x = t.max(0.0) / t_total as f64;
            if x < warmup {
                x / warmup
            } else {
                1.0 - x
            }
        }
        Schedule::LinearWarmupDecay {
            warmup_steps,
            total_steps,
        } => {
            let (w, n) = (warmup_steps as f64, total_steps as f64);
            if done < w {
                done / w
            } else {
                ((n - done) / (n - w).max(1.0)).max(0.0)
            }
        }
        Schedule::CosineWarmup {
            warmup_steps,
            total_steps,
            cycles,
        } => {
            let (w, n) = (warmup_steps as f64, total_steps as f64);
            if done < w {
                done / w
            } else {
                let p = (done - w) / (n - w).max(1.0);
                (0.5 * (1.0 + (std::f64::consts::PI * cycles * 2.0 * p).cos())).max(0.0)
            }
        }
        Schedule::InverseSqrt {
            warmup_steps,
            init_factor,
        } => {
            let w = warmup_steps as f64;
            if done < w {
                init_factor + (1.0 - init_factor) * done / w
            } else {
                (w / done).sqrt()
            }
        }
    }
}

/// The float64 optimizer over host vectors.
#[derive(Clone, Debug)]
pub struct Reference {
    /// Configuration.
    pub cfg: Config,
    /// Groups.
    pub groups: Vec<ParamGroup>,
    /// Group of each tensor.
    pub group_of: Vec<usize>,
    /// Updates made by the optimizer (steps with at least one tensor present count).
    pub t: u64,
    /// Updates made to each tensor (`state['step']` of the authors' code).
    pub tensor_t: Vec<u64>,
    /// Parameters.
    pub theta: Vec<Vec<f64>>,
    /// First moment / momentum.
    pub m: Vec<Vec<f64>>,
    /// Second moment / infinity norm.
    pub v: Vec<Vec<f64>>,
    /// Smoothed sensitivity.
    pub ibar: Vec<Vec<f64>>,
    /// Storage types to emulate per tensor (parameter, state), or exact f64.
    pub storage: Vec<Option<(DType, DType)>>,
    /// What the last applied step reported: the global gradient norm before clipping, the
    /// global clipping coefficient, and the scheduled rate at the optimizer's count.
    pub last: Option<Reported>,
}

/// The oracle's counterpart of a `StepReport`'s numbers.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Reported {
    /// ‖g‖ over the tensors present, before clipping.
    pub grad_norm: f64,
    /// The global clipping coefficient (1 when none).
    pub clip_scale: f64,
    /// η · schedule at the optimizer's count.
    pub lr: f64,
}

impl Reference {
    /// Starts from `init` (zero state).
    pub fn new(
        cfg: Config,
        groups: Vec<ParamGroup>,
        group_of: Vec<usize>,
        init: &[Vec<f64>],
        storage: Option<(DType, DType)>,
    ) -> Self {
        Self::mixed(cfg, groups, group_of, init, &vec![storage; init.len()])
    }

    /// Starts from `init` with each tensor's own storage types (a mixed-precision model).
    pub fn mixed(
        cfg: Config,
        groups: Vec<ParamGroup>,
        group_of: Vec<usize>,
        init: &[Vec<f64>],
        storage: &[Option<(DType, DType)>],
    ) -> Self {
        let zeros: Vec<Vec<f64>> = init.iter().map(|x| vec![0.0; x.len()]).collect();
        let theta = init
            .iter()
            .zip(storage)
            .map(|(x, st)| {
                x.iter()
                    .map(|&v| st.map_or(v, |(p, _)| round_to(p, v)))
                    .collect()
            })
            .collect();
        Reference {
            cfg,
            groups,
            group_of,
            t: 0,
            tensor_t: vec![0; init.len()],
            theta,
            m: zeros.clone(),
            v: zeros.clone(),
            ibar: zeros,
            storage: storage.to_vec(),
            last: None,
        }
    }

    /// One step with every tensor present.
    pub fn step(&mut self, grads: &[Vec<f64>]) -> bool {
        let some: Vec<Option<Vec<f64>>> = grads.iter().cloned().map(Some).collect();
        self.step_some(&some)
    }

    /// One step; `None` marks a tensor with no gradient, which is skipped (its values and
    /// count stay). Returns false (and changes nothing) when a gradient is not finite and the
    /// guard is on.
    pub fn step_some(&mut self, grads: &[Option<Vec<f64>>]) -> bool {
        let cfg = self.cfg;
        let grads: Vec<Option<Vec<f64>>> = grads
            .iter()
            .zip(&self.storage)
            .map(|(g, st)| {
                g.as_ref().map(|g| {
                    g.iter()
                        .map(|&x| st.map_or(x, |(p, _)| round_to(p, x)))
                        .collect()
                })
            })
            .collect();
        if cfg.skip_non_finite && grads.iter().flatten().flatten().any(|x| !x.is_finite()) {
            return false;
        }
        // Clipping: torch.nn.utils.clip_grad_norm_, global then per tensor.
        let clip = |max: f64, norm: f64| {
            let c = max / (norm + 1e-6);
            if c < 1.0 {
                c
            } else {
                1.0
            }
        };
        // Global clipping covers the tensors present.
        let total: f64 = grads
            .iter()
            .flatten()
            .flatten()
            .map(|x| x * x)
            .sum::<f64>()
            .sqrt();
        let global = cfg.global_clip.map_or(1.0, |m| clip(m, total));
        self.t += 1;
        let opt_t = self.t;
        self.last = Some(Reported {
            grad_norm: total,
            clip_scale: global,
            lr: cfg.lr * schedule_factor(&cfg.schedule, cfg.schedule_clock, opt_t),
        });
        let sens = cfg.sensitivity;
        for (ti, g_raw) in grads.iter().enumerate() {
            let Some(g_raw) = g_raw else { continue };
            self.tensor_t[ti] += 1;
            // Bias corrections follow the tensor's own count; the schedule the count the
            // configuration names.
            let t = self.tensor_t[ti];
            let sched_t = match cfg.schedule_count {
                ScheduleCount::Tensor => t,
                ScheduleCount::Optimizer => opt_t,
            };
            let lr_t = cfg.lr * schedule_factor(&cfg.schedule, cfg.schedule_clock, sched_t);
            let (st_p, st_s) = match self.storage[ti] {
                Some((p, s)) => (Some(p), Some(s)),
                None => (None, None),
            };
            let rp = |x: f64| st_p.map_or(x, |d| round_to(d, x));
            let rs = |x: f64| st_s.map_or(x, |d| round_to(d, x));
            let group = self.groups[self.group_of[ti]];
            let wd = group.weight_decay;
            let lr = lr_t * group.lr_scale;
            let own: f64 = g_raw
                .iter()
                .map(|x| x * x * global * global)
                .sum::<f64>()
                .sqrt();
            let scale = global * cfg.per_tensor_clip.map_or(1.0, |m| clip(m, own));
            for (j, &raw) in g_raw.iter().enumerate() {
                let theta = self.theta[ti][j];
                let mut g = raw * scale;
                if cfg.decay == DecayMode::L2 {
                    g += wd * theta;
                }
                let s = if group.sage {
                    let i = (theta * g).abs();
                    let ib = rs(sens.beta0 * self.ibar[ti][j] + (1.0 - sens.beta0) * i);
                    self.ibar[ti][j] = ib;
                    let ibc = if sens.bias_correction {
                        ib / (1.0 - sens.beta0.powi(t as i32))
                    } else {
                        ib
                    };
                    let u = (i - ibc).abs();
                    let (en, ed) = (sens.eps_num, sens.eps_den);
                    match sens.modulation {
                        Modulation::Sage => (u + en) / (ibc + ed),
                        Modulation::ImportanceTimesVariation => (ibc + ed) * (u + en),
                        Modulation::ImportanceOverVariation => (ibc + ed) / (u + en),
                        Modulation::Importance => ibc + ed,
                        Modulation::InverseImportance => 1.0 / (ibc + ed),
                        Modulation::Variation => u + en,
                    }
                } else {
                    1.0
                };
                let d = match cfg.algorithm {
                    Algorithm::Sgd {
                        momentum,
                        dampening,
                        nesterov,
                    } => {
                        if momentum > 0.0 {
                            let b = if t == 1 {
                                g
                            } else {
                                momentum * self.m[ti][j] + (1.0 - dampening) * g
                            };
                            let b = rs(b);
                            self.m[ti][j] = b;
                            if nesterov {
                                g + momentum * b
                            } else {
                                b
                            }
                        } else {
                            g
                        }
                    }
                    Algorithm::Adam { beta1, beta2 } | Algorithm::AdamW { beta1, beta2 } => {
                        let m = rs(beta1 * self.m[ti][j] + (1.0 - beta1) * g);
                        let v = rs(beta2 * self.v[ti][j] + (1.0 - beta2) * g * g);
                        self.m[ti][j] = m;
                        self.v[ti][j] = v;
                        let (bc1, bc2) = if cfg.bias_correction {
                            (1.0 - beta1.powi(t as i32), 1.0 - beta2.powi(t as i32))
                        } else {
                            (1.0, 1.0)
                        };
                        match cfg.eps_style {
                            EpsStyle::Torch => (m / bc1) / ((v / bc2).sqrt() + cfg.eps),
                            EpsStyle::Authors => bc2.sqrt() / bc1 * m / (v.sqrt() + cfg.eps),
                        }
                    }
                    Algorithm::Adamax { beta1, beta2 } => {
                        let m = rs(beta1 * self.m[ti][j] + (1.0 - beta1) * g);
                        let u = rs((beta2 * self.v[ti][j]).max(g.abs() + cfg.eps));
                        self.m[ti][j] = m;
                        self.v[ti][j] = u;
                        let bc1 = if cfg.bias_correction {
                            1.0 - beta1.powi(t as i32)
                        } else {
                            1.0
                        };
                        let mut d = match cfg.eps_style {
                            EpsStyle::Torch => m / bc1 / u,
                            EpsStyle::Authors => m / bc1 / (u + cfg.eps),
                        };
                        if cfg.decay == DecayMode::InStep {
                            d += wd * theta;
                        }
                        d
                    }
                };
                let mut th = theta;
                if cfg.decay == DecayMode::Decoupled {
                    th *= 1.0 - lr * wd;
                }
                th -= lr * s * d;
                if cfg.decay == DecayMode::DecoupledAfterBaseRate {
                    th -= cfg.lr * group.lr_scale * wd * th;
                }
                self.theta[ti][j] = rp(th);
            }
        }
        true
    }
}
