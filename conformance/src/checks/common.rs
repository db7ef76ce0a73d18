//! Shared pieces of the checks: random models, the configurations covered, comparisons.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use sage_core::{Algorithm, Config, DType, Element, Modulation, Optimizer, ParamGroup, Schedule};

use crate::failure::{Failure, Worst};
use crate::harness::Harness;
use crate::model::{backend_failure, Model};
use crate::reference::Reference;

/// Tensor lengths that hit every SIMD tail and chunk edge.
pub const LENGTHS: [usize; 10] = [0, 1, 7, 8, 9, 15, 16, 17, 1023, 4097];

/// Groups used by the checks: SAGE on with decay, SAGE off at half rate, SAGE on without decay.
pub fn groups() -> Vec<ParamGroup> {
    vec![
        ParamGroup::sage().weight_decay(0.01),
        ParamGroup::plain().lr_scale(0.5),
        ParamGroup::sage().lr_scale(2.0),
    ]
}

/// [`groups`] with the first group's weight decay set to `case`'s.
pub fn case_groups(case: &Case) -> Vec<ParamGroup> {
    let mut gs = groups();
    gs[0].weight_decay = case.weight_decay;
    gs
}

/// Parameters: uniform in ±0.1, about 5% exactly zero (the reference preset never moves those).
pub fn random_params(rng: &mut StdRng, lens: &[usize]) -> Vec<Vec<f32>> {
    lens.iter()
        .map(|&n| {
            (0..n)
                .map(|_| {
                    if rng.gen_bool(0.05) {
                        0.0
                    } else {
                        rng.gen_range(-0.1f32..0.1)
                    }
                })
                .collect()
        })
        .collect()
}

/// Gradients: uniform in ±scale, about 3% exactly zero.
pub fn random_grads(rng: &mut StdRng, lens: &[usize], scale: f32) -> Vec<Vec<f32>> {
    lens.iter()
        .map(|&n| {
            (0..n)
                .map(|_| {
                    if rng.gen_bool(0.03) {
                        0.0
                    } else {
                        rng.gen_range(-scale..scale)
                    }
                })
                .collect()
        })
        .collect()
}

/// A deterministic generator for a check.
pub fn rng(seed: u64) -> StdRng {
    StdRng::seed_from_u64(seed)
}

/// One configuration the differential checks cover.
pub struct Case {
    /// Short name for reports.
    pub name: String,
    /// The configuration.
    pub cfg: Config,
    /// Multiplies the movement tolerance: ablation 2 divides by `U + ε`, and wherever U ≈ 0
    /// (every element at step 1 under bias correction) f32's rounding of the cancellation in U
    /// becomes a large relative error of the step; its trajectories are only comparable to
    /// about a tenth of the distance moved.
    pub ill_conditioned: f64,
    /// Weight decay of the first of [`groups`] in the differential checks (0.01 there).
    pub weight_decay: f64,
}

fn case(name: impl Into<String>, cfg: Config) -> Case {
    let ill_conditioned = if cfg.sensitivity.modulation == Modulation::ImportanceOverVariation {
        1000.0
    } else {
        1.0
    };
    Case {
        name: name.into(),
        cfg,
        ill_conditioned,
        weight_decay: 0.01,
    }
}

/// Every algorithm under both presets, the options that change the formula, the Table 12
/// ablations, every schedule, clipping.
pub fn cases() -> Vec<Case> {
    let nesterov = Algorithm::Sgd {
        momentum: 0.9,
        dampening: 0.0,
        nesterov: true,
    };
    let damped = Algorithm::Sgd {
        momentum: 0.8,
        dampening: 0.1,
        nesterov: false,
    };
    let mut v = vec![
        case("paper sgd", Config::paper(Algorithm::sgd(0.0), 0.05)),
        case(
            "paper sgd-momentum",
            Config::paper(Algorithm::sgd(0.9), 0.05),
        ),
        case("paper sgd-nesterov", Config::paper(nesterov, 0.05)),
        case("paper sgd-dampening", Config::paper(damped, 0.05)),
        case("paper adam", Config::paper(Algorithm::adam(), 2e-3)),
        case(
            "paper adam no-bias",
            Config::paper(Algorithm::adam(), 2e-3).bias_correction(false),
        ),
        case("paper adamw", Config::paper(Algorithm::adamw(), 2e-3)),
        case("paper adamax", Config::paper(Algorithm::adamax(), 2e-3)),
        case(
            "reference sgd-momentum",
            Config::reference(Algorithm::sgd(0.9), 0.05),
        ),
        case("reference adam", Config::reference(Algorithm::adam(), 2e-3)),
        case(
            "reference adamw",
            Config::reference(Algorithm::adamw(), 2e-3),
        ),
        case(
            "reference adamw no-bias",
            Config::reference(Algorithm::adamw(), 2e-3).bias_correction(false),
        ),
        case(
            "reference adamax",
            Config::reference(Algorithm::adamax(), 2e-3),
        ),
    ];
    for m in &Modulation::ALL[1..] {
        v.push(case(
            format!("paper adam {m:?}"),
            Config::paper(Algorithm::adam(), 1e-4).modulation(*m),
        ));
    }
    let schedules = [
        Schedule::WarmupLinearPpb {
            warmup: 0.5,
            t_total: 6,
        },
        Schedule::LinearWarmupDecay {
            warmup_steps: 2,
            total_steps: 6,
        },
        Schedule::CosineWarmup {
            warmup_steps: 1,
            total_steps: 5,
            cycles: 0.5,
        },
        Schedule::InverseSqrt {
            warmup_steps: 2,
            init_factor: 0.1,
        },
    ];
    for s in schedules {
        v.push(case(
            format!("reference adamw {}", schedule_name(&s)),
            Config::reference(Algorithm::adamw(), 2e-3).schedule(s),
        ));
    }
    v.push(case(
        "reference adamax warmup (lagged clock)",
        Config::reference(Algorithm::adamax(), 2e-3).schedule(schedules[0]),
    ));
    v.push(case(
        "paper adam clip global+tensor",
        Config::paper(Algorithm::adam(), 2e-3)
            .global_clip(0.5)
            .per_tensor_clip(0.2),
    ));
    v.push(case(
        "paper sgd clip, guard off",
        Config::paper(Algorithm::sgd(0.9), 0.05)
            .global_clip(0.3)
            .skip_non_finite(false),
    ));
    // A decoupled decay large enough to see (η·wd = 1e-3 per step, at the usual rate): I must
    // come from θ before the decay, and the decay's placement must show beyond f32's rounding.
    v.push(Case {
        weight_decay: 0.5,
        ..case(
            "paper adamw strong decay",
            Config::paper(Algorithm::adamw(), 2e-3),
        )
    });
    v
}

fn schedule_name(s: &Schedule) -> &'static str {
    match s {
        Schedule::Constant => "constant",
        Schedule::WarmupLinearPpb { .. } => "warmup_linear_ppb",
        Schedule::LinearWarmupDecay { .. } => "linear warmup-decay",
        Schedule::CosineWarmup { .. } => "cosine",
        Schedule::InverseSqrt { .. } => "inverse sqrt",
    }
}

/// Group of tensor `i` in the checks' models: round robin over [`groups`].
pub fn group_of(n: usize) -> Vec<usize> {
    (0..n).map(|i| i % 3).collect()
}

/// Whether a step's report agrees with the oracle's: the rate exactly as the schedule gives
/// it; the norm and clipping coefficient to 1e-5 relative (backends may sum a chunk's squares
/// in f32 blocks, `sage_core::norm`; a dropped chunk or a wrong scale is far larger).
pub fn same_report(rep: &sage_core::StepReport, oracle: &Reference) -> Result<(), String> {
    let Some(want) = oracle.last.filter(|_| rep.applied()) else {
        return Ok(());
    };
    let close = |a: f64, e: f64, rel: f64| (a - e).abs() <= rel * e.abs().max(1e-300);
    if !close(rep.lr, want.lr, 1e-12) {
        return Err(format!(
            "report lr {} but the oracle's rate is {}",
            rep.lr, want.lr
        ));
    }
    if let Some(n) = rep.grad_norm {
        if !close(n, want.grad_norm, 1e-5) {
            return Err(format!(
                "report grad_norm {n} but the oracle's norm is {}",
                want.grad_norm
            ));
        }
    }
    if !close(rep.clip_scale, want.clip_scale, 1e-5) {
        return Err(format!(
            "report clip_scale {} but the oracle's is {}",
            rep.clip_scale, want.clip_scale
        ));
    }
    Ok(())
}

fn widen(x: &[Vec<f32>]) -> Vec<Vec<f64>> {
    x.iter()
        .map(|t| t.iter().map(|&v| v as f64).collect())
        .collect()
}

/// Tolerance of the differential checks for a parameter type: `|a − e|` may reach
/// `rel·|e| + moved·|e − θ0| + abs` (errors grow with how far an element moved).
#[derive(Clone, Copy, Debug)]
pub struct Tol {
    /// Relative to the expected value.
    pub rel: f64,
    /// Relative to the distance moved from the start.
    pub moved: f64,
    /// Absolute floor.
    pub abs: f64,
}

impl Tol {
    /// The tolerance for parameters stored as `p`, state as `s`.
    pub fn for_types(p: DType, s: DType) -> Tol {
        // One rounding flip of the storage type per step can separate the f32 run from the
        // rounded f64 oracle; over a few steps that stays within a few units in the last place.
        let ulp = |d: DType| match d {
            DType::F32 => 2e-5,
            DType::F16 => 4.0 * 2f64.powi(-11),
            DType::Bf16 => 4.0 * 2f64.powi(-8),
        };
        let r = ulp(p).max(ulp(s));
        Tol {
            rel: r,
            moved: r.max(1e-4),
            abs: if p == DType::F32 && s == DType::F32 {
                1e-7
            } else {
                1e-5
            },
        }
    }
}

/// Runs `case` for `steps` steps on `b` and on the f64 oracle at [`LENGTHS`], comparing
/// parameters, state and the step's report after every step.
pub fn differential<B: Harness, P: Element, S: Element>(
    b: &mut B,
    check: &str,
    case: &Case,
    steps: usize,
    seed: u64,
) -> Result<(), Failure> {
    differential_with::<B, P, S>(b, check, case, steps, seed, &LENGTHS, 0.02)
}

/// [`differential`] for tensors of lengths `lens`, gradients uniform in ±`grad_scale`.
pub fn differential_with<B: Harness, P: Element, S: Element>(
    b: &mut B,
    check: &str,
    case: &Case,
    steps: usize,
    seed: u64,
    lens: &[usize],
    grad_scale: f32,
) -> Result<(), Failure> {
    let mut r = rng(seed);
    let init = random_params(&mut r, lens);
    let mut groups = case_groups(case);
    if S::DTYPE == DType::F16 {
        // sage-core keeps no Ī (nor v) in f16: SAGE off, the rest as usual.
        for g in &mut groups {
            g.sage = false;
        }
    }
    let gof = group_of(lens.len());
    let mut model = Model::<B, P, S>::new(b, &case.cfg, &groups, &init, &gof)?;
    let mut oracle = Reference::new(
        case.cfg,
        groups.clone(),
        gof.clone(),
        &widen(&init),
        Some((P::DTYPE, S::DTYPE)),
    );
    let start = oracle.theta.clone();
    let mut opt = Optimizer::new(b.clone(), case.cfg, groups)
        .map_err(|e| Failure::new(check, format!("{}: {e}", case.name)))?;
    let tol = Tol::for_types(P::DTYPE, S::DTYPE);
    let mut worst = Worst::default();
    for step in 1..=steps {
        let grads = random_grads(&mut r, lens, grad_scale);
        let rep = model
            .step(&mut opt, &grads)
            .map_err(|e| Failure::new(check, format!("{} step {step}: {e}", case.name)))?;
        let applied = oracle.step(&widen(&grads));
        if rep.applied() != applied {
            return Err(Failure::new(
                check,
                format!(
                    "{} step {step}: applied {} but the reference {applied}",
                    case.name,
                    rep.applied()
                ),
            ));
        }
        if let Err(d) = same_report(&rep, &oracle) {
            return Err(Failure::new(
                check,
                format!("{} step {step}: {d}", case.name),
            ));
        }
        let got = model
            .read_params(opt.backend_mut())
            .map_err(|e| backend_failure(check, e))?;
        let state = model
            .read_state(opt.backend_mut())
            .map_err(|e| backend_failure(check, e))?;
        for (ti, t) in got.iter().enumerate() {
            for (j, &a) in t.iter().enumerate() {
                let e = oracle.theta[ti][j];
                let moved = (e - start[ti][j]).abs();
                let abs = tol.abs + tol.moved * case.ill_conditioned * moved;
                worst.see(a as f64, e, abs, tol.rel, || {
                    format!(
                        "{} step {step} tensor {ti} (len {}) θ[{j}]",
                        case.name,
                        t.len()
                    )
                });
            }
            for (k, name) in ["m", "v", "ibar"].iter().enumerate() {
                let want = match k {
                    0 => &oracle.m[ti],
                    1 => &oracle.v[ti],
                    _ => &oracle.ibar[ti],
                };
                // State values are sums that can cancel (m = μ·b + g): their error scales
                // with the tensor's magnitude, not with each element.
                let scale = want.iter().fold(0.0f64, |a, x| a.max(x.abs()));
                let abs = tol.abs * 1e-2 + tol.rel * 4.0 * case.ill_conditioned * scale;
                for (j, &a) in state[ti][k].iter().enumerate() {
                    worst.see(a as f64, want[j], abs, tol.rel * 4.0, || {
                        format!("{} step {step} tensor {ti} {name}[{j}]", case.name)
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
