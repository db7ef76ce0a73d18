//! Properties checked on random inputs with quickcheck (its generator and runner; each
//! property holds a backend, so it is a `Testable` of its own).

use quickcheck::{Arbitrary, Gen, QuickCheck, TestResult, Testable};
use sage_core::{Algorithm, Config, Optimizer, ParamGroup};

use crate::failure::Failure;
use crate::harness::Harness;
use crate::model::Model;
use crate::reference::Reference;

/// A small random problem: a few tensors, parameters and a few steps of gradients.
#[derive(Clone, Debug)]
pub struct Problem {
    /// Algorithm index into [`ALGORITHMS`].
    pub algorithm: usize,
    /// Reference (true) or paper (false) preset.
    pub reference: bool,
    /// β0.
    pub beta0: f64,
    /// Initial parameters.
    pub init: Vec<Vec<f32>>,
    /// Gradients per step.
    pub grads: Vec<Vec<Vec<f32>>>,
}

/// The base algorithms the properties draw from.
pub const ALGORITHMS: [Algorithm; 6] = [
    Algorithm::Sgd {
        momentum: 0.0,
        dampening: 0.0,
        nesterov: false,
    },
    Algorithm::Sgd {
        momentum: 0.9,
        dampening: 0.0,
        nesterov: false,
    },
    Algorithm::Sgd {
        momentum: 0.9,
        dampening: 0.0,
        nesterov: true,
    },
    Algorithm::Adam {
        beta1: 0.9,
        beta2: 0.999,
    },
    Algorithm::AdamW {
        beta1: 0.9,
        beta2: 0.999,
    },
    Algorithm::Adamax {
        beta1: 0.9,
        beta2: 0.999,
    },
];

fn small(g: &mut Gen, scale: f32) -> f32 {
    // Finite values of a training run's size, with exact zeros now and then.
    let x = f32::arbitrary(g);
    if !x.is_finite() || u8::arbitrary(g) % 16 == 0 {
        0.0
    } else {
        (x.abs() % 1.0) * scale * if bool::arbitrary(g) { 1.0 } else { -1.0 }
    }
}

impl Arbitrary for Problem {
    fn arbitrary(g: &mut Gen) -> Self {
        let ntensors = 1 + usize::arbitrary(g) % 3;
        let lens: Vec<usize> = (0..ntensors).map(|_| usize::arbitrary(g) % 40).collect();
        let steps = 1 + usize::arbitrary(g) % 4;
        Problem {
            algorithm: usize::arbitrary(g) % ALGORITHMS.len(),
            reference: bool::arbitrary(g),
            beta0: [0.6, 0.75, 0.85, 0.95][usize::arbitrary(g) % 4],
            init: lens
                .iter()
                .map(|&n| (0..n).map(|_| small(g, 0.1)).collect())
                .collect(),
            grads: (0..steps)
                .map(|_| {
                    lens.iter()
                        .map(|&n| (0..n).map(|_| small(g, 0.02)).collect())
                        .collect()
                })
                .collect(),
        }
    }
}

impl Problem {
    fn config(&self) -> Config {
        let a = ALGORITHMS[self.algorithm];
        let c = if self.reference {
            Config::reference(a, 1e-3)
        } else {
            Config::paper(a, 1e-3)
        };
        c.beta0(self.beta0)
    }
}

type PropFn<B> = fn(&mut B, &Problem) -> Result<(), String>;

/// A model after its steps, with the optimizer that took them.
type Run<B> = (Model<B, f32, f32>, Optimizer<B, Vec<ParamGroup>>);

struct Prop<B: Harness + 'static> {
    backend: B,
    f: PropFn<B>,
}

impl<B: Harness + 'static> Testable for Prop<B> {
    fn result(&self, g: &mut Gen) -> TestResult {
        let p = Problem::arbitrary(g);
        let mut b = self.backend.clone();
        match (self.f)(&mut b, &p) {
            Ok(()) => TestResult::passed(),
            Err(e) => TestResult::error(format!("{e}\n  on {p:?}")),
        }
    }
}

fn run<B: Harness + 'static>(b: &B, check: &str, f: PropFn<B>) -> Result<(), Failure> {
    let prop = Prop {
        backend: b.clone(),
        f,
    };
    // A fixed seed: a failure here reproduces.
    QuickCheck::new()
        .rng(Gen::from_size_and_seed(40, 0x5a6e))
        .tests(60)
        .max_tests(600)
        .quicktest(prop)
        .map(|_| ())
        .map_err(|r| Failure::new(check, format!("{r:?}")))
}

fn steps<B: Harness>(
    b: &mut B,
    p: &Problem,
    cfg: Config,
    groups: Vec<ParamGroup>,
) -> Result<Run<B>, String> {
    let gof = vec![0; p.init.len()];
    let mut model =
        Model::<B, f32, f32>::new(b, &cfg, &groups, &p.init, &gof).map_err(|f| f.to_string())?;
    let mut opt = Optimizer::new(b.clone(), cfg, groups).map_err(|e| e.to_string())?;
    for g in &p.grads {
        model.step(&mut opt, g).map_err(|e| e.to_string())?;
    }
    Ok((model, opt))
}

/// With SAGE off, the step is the base optimizer's: it matches the float64 reference's base
/// step, and it needs no Ī buffer.
pub fn sage_off_is_base<B: Harness + 'static>(b: &mut B) -> Result<(), Failure> {
    run(b, "property: SAGE off == base optimizer", |b, p| {
        let cfg = p.config();
        let groups = vec![ParamGroup::plain().weight_decay(0.01)];
        let (model, mut opt) = steps(b, p, cfg, groups.clone())?;
        if model.layouts().iter().any(|l| l[2]) {
            return Err("a SAGE-off tensor got an Ī buffer".into());
        }
        let init: Vec<Vec<f64>> = p
            .init
            .iter()
            .map(|t| t.iter().map(|&x| x as f64).collect())
            .collect();
        let mut oracle = Reference::new(cfg, groups, vec![0; init.len()], &init, None);
        for g in &p.grads {
            oracle.step(
                &g.iter()
                    .map(|t| t.iter().map(|&x| x as f64).collect())
                    .collect::<Vec<_>>(),
            );
        }
        let got = model
            .read_params(opt.backend_mut())
            .map_err(|e| e.to_string())?;
        for (ti, t) in got.iter().enumerate() {
            for (j, &a) in t.iter().enumerate() {
                let e = oracle.theta[ti][j];
                if (a as f64 - e).abs() > 1e-6 * e.abs() + 1e-8 {
                    return Err(format!(
                        "tensor {ti} θ[{j}] = {a}, base optimizer gives {e}"
                    ));
                }
            }
        }
        Ok(())
    })
}

/// A zero gradient makes the sensitivity 0, so Ī only decays: Ī ← β0·Ī (weight decay off).
pub fn zero_gradient_decays_ibar<B: Harness + 'static>(b: &mut B) -> Result<(), Failure> {
    run(b, "property: zero gradient decays Ī by β0", |b, p| {
        let cfg = p.config();
        let groups = vec![ParamGroup::sage()];
        let (mut model, mut opt) = steps(b, p, cfg, groups)?;
        let before = model
            .read_state(opt.backend_mut())
            .map_err(|e| e.to_string())?;
        let zeros: Vec<Vec<f32>> = p.init.iter().map(|t| vec![0.0; t.len()]).collect();
        model.step(&mut opt, &zeros).map_err(|e| e.to_string())?;
        let after = model
            .read_state(opt.backend_mut())
            .map_err(|e| e.to_string())?;
        let beta0 = p.beta0 as f32;
        for (ti, (x, y)) in before.iter().zip(&after).enumerate() {
            for (j, (&old, &new)) in x[2].iter().zip(&y[2]).enumerate() {
                let want = beta0 * old;
                if (new - want).abs() > 2.0 * f32::EPSILON * want.abs() {
                    return Err(format!("tensor {ti} Ī[{j}]: {old} → {new}, want {want}"));
                }
            }
        }
        Ok(())
    })
}

/// Under the reference preset an element whose θ is exactly 0 has zero sensitivity, so s = 0:
/// it never moves, weight decay included.
pub fn reference_zero_stays<B: Harness + 'static>(b: &mut B) -> Result<(), Failure> {
    run(
        b,
        "property: reference preset never moves θ = 0",
        |b, p| {
            let mut p = p.clone();
            p.reference = true;
            let cfg = p.config();
            let groups = vec![ParamGroup::sage().weight_decay(0.01)];
            let (model, mut opt) = steps(b, &p, cfg, groups)?;
            let got = model
                .read_params(opt.backend_mut())
                .map_err(|e| e.to_string())?;
            for (ti, (t, init)) in got.iter().zip(&p.init).enumerate() {
                for (j, (&a, &x)) in t.iter().zip(init).enumerate() {
                    if x == 0.0 && a != 0.0 {
                        return Err(format!("tensor {ti} θ[{j}] moved from 0 to {a}"));
                    }
                }
            }
            Ok(())
        },
    )
}

/// A step with a non-finite gradient anywhere changes no buffer and not the step counter.
pub fn skipped_step_changes_nothing<B: Harness + 'static>(b: &mut B) -> Result<(), Failure> {
    run(b, "property: skipped steps change nothing", |b, p| {
        let cfg = p.config();
        let groups = vec![ParamGroup::sage()];
        let (mut model, mut opt) = steps(b, p, cfg, groups)?;
        let total: usize = p.init.iter().map(Vec::len).sum();
        if total == 0 {
            return Ok(());
        }
        let before_p = model
            .read_params(opt.backend_mut())
            .map_err(|e| e.to_string())?;
        let before_s = model
            .read_state(opt.backend_mut())
            .map_err(|e| e.to_string())?;
        let mut g = p.grads[0].clone();
        let pos = (p.beta0 * 1000.0) as usize % total;
        let (mut ti, mut j) = (0, pos);
        while j >= g[ti].len() {
            j -= g[ti].len();
            ti += 1;
        }
        g[ti][j] = [f32::NAN, f32::INFINITY, f32::NEG_INFINITY][pos % 3];
        let t = opt.steps();
        let rep = model.step(&mut opt, &g).map_err(|e| e.to_string())?;
        let after_p = model
            .read_params(opt.backend_mut())
            .map_err(|e| e.to_string())?;
        let after_s = model
            .read_state(opt.backend_mut())
            .map_err(|e| e.to_string())?;
        let bits = |x: &Vec<Vec<f32>>| x.iter().flatten().map(|v| v.to_bits()).collect::<Vec<_>>();
        let sbits = |x: &Vec<[Vec<f32>; 3]>| {
            x.iter()
                .flatten()
                .flatten()
                .map(|v| v.to_bits())
                .collect::<Vec<_>>()
        };
        if rep.applied()
            || opt.steps() != t
            || bits(&before_p) != bits(&after_p)
            || sbits(&before_s) != sbits(&after_s)
        {
            return Err(format!(
                "non-finite at tensor {ti} [{j}] was not skipped cleanly: {rep:?}"
            ));
        }
        Ok(())
    })
}
