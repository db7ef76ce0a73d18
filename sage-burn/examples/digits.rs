//! Trains a 64-128-10 MLP (`--hidden` sets the width) on the 8x8 digits (the data the edge firmware trains on,
//! `edge/data/digits.bin`) on burn's CPU backend (burn-flex) three ways over several seeds, and
//! prints held-out accuracy, time per training step and the optimizer's share of it:
//!
//! - burn's own AdamW (`AdamWConfig`, a `ModuleOptimizer`), the rate scheduled by the loop;
//! - AdamW-SAGE through sage-burn's `ModuleOptimizer` (burn's per-tensor contract, the path
//!   burn's `Learner` takes), the authors' reference preset with its own warm-up schedule;
//! - AdamW-SAGE through `SageModule` (one step over every gradient, global clipping at 1.0 as
//!   in the authors' training loop).
//!
//! Run: `cargo run --release -p sage-burn --example digits [-- --seeds 1,2,3 --epochs 20
//! --hidden 128 --lr 1e-2 --sage-lr 2e-2 --backend simd|portable]`.

use std::time::{Duration, Instant};

use burn::module::{Module, ParamGroup as BurnGroup};
use burn::nn::loss::CrossEntropyLossConfig;
use burn::nn::{Linear, LinearConfig};
use burn::optim::{AdamWConfig, GradientsParams, ModuleOptimizer};
use burn::tensor::{Device, Int, Tensor, TensorData};
use sage_burn::{GroupRules, SageConfig, SageModule};
use sage_core::{Algorithm, Config, ParamGroup, Schedule};
use sage_cpu::{Cpu, SimdCpu};

static DIGITS: &[u8] = include_bytes!("../../edge/data/digits.bin");
const SAMPLES: usize = 1797;
const TRAIN: usize = 1500;
const INPUTS: usize = 64;
const CLASSES: usize = 10;
const BATCH: usize = 32;

#[derive(Module, Debug)]
struct Mlp {
    fc1: Linear,
    fc2: Linear,
}

impl Mlp {
    fn new(device: &Device, hidden: usize) -> Self {
        Mlp {
            fc1: LinearConfig::new(INPUTS, hidden).init(device),
            fc2: LinearConfig::new(hidden, CLASSES).init(device),
        }
    }
    fn forward(&self, x: Tensor<2>) -> Tensor<2> {
        self.fc2
            .forward(burn::tensor::activation::relu(self.fc1.forward(x)))
    }
}

/// Images `rows` (pixels / 16) and their labels.
fn batch(rows: &[usize], device: &Device) -> (Tensor<2>, Tensor<1, Int>) {
    let mut x = Vec::with_capacity(rows.len() * INPUTS);
    let mut y = Vec::with_capacity(rows.len());
    for &r in rows {
        x.extend(
            DIGITS[r * INPUTS..(r + 1) * INPUTS]
                .iter()
                .map(|&p| p as f32 / 16.0),
        );
        y.push(DIGITS[SAMPLES * INPUTS + r] as i64);
    }
    (
        Tensor::from_data(TensorData::new(x, [rows.len(), INPUTS]), device),
        Tensor::from_data(TensorData::new(y, [rows.len()]), device),
    )
}

fn accuracy(m: &Mlp, device: &Device) -> f64 {
    let rows: Vec<usize> = (TRAIN..SAMPLES).collect();
    let (x, y) = batch(&rows, device);
    let pred = m.forward(x).argmax(1).squeeze_dim::<1>(1);
    let right: i64 = pred.equal(y).int().sum().into_scalar::<i64>();
    right as f64 / rows.len() as f64
}

/// A small seeded generator for the shuffles (the same batches for every optimizer of a seed).
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn shuffle(&mut self, v: &mut [usize]) {
        for i in (1..v.len()).rev() {
            v.swap(i, (self.next() % (i as u64 + 1)) as usize);
        }
    }
}

enum Opt {
    Burn(ModuleOptimizer),
    SageTensor(ModuleOptimizer),
    SageModule(WholeStep),
}

/// A whole-module step, its backend erased.
type WholeStep = Box<dyn FnMut(f64, Mlp, &GradientsParams) -> Mlp>;

/// A whole-module step on `backend`, boxed.
fn whole<B: sage_burn::SliceBackend>(backend: B, cfg: SageConfig, model: &Mlp) -> WholeStep {
    let mut o: SageModule<B> = cfg.module_with(backend, model).expect("valid");
    Box::new(move |lr, m, g| o.step(lr, m, g).map_err(|r| r.error).unwrap())
}

struct Run {
    acc: f64,
    step: Duration,
    opt: Duration,
    loss: f64,
}

fn train(kind: usize, lr: f64, seed: u64, epochs: usize, hidden: usize, portable: bool) -> Run {
    let device = Device::default().autodiff();
    device.seed(seed);
    let mut model = Mlp::new(&device, hidden);
    let steps_per_epoch = TRAIN.div_ceil(BATCH);
    let total = (steps_per_epoch * epochs) as u64;
    let warmup = 0.1;
    let schedule = Schedule::WarmupLinearPpb {
        warmup,
        t_total: total,
    };
    // The authors' split: SAGE and decay on the weights, plain AdamW without decay on biases.
    let rules = GroupRules::new(
        vec![ParamGroup::sage().weight_decay(0.01), ParamGroup::plain()],
        1,
    )
    .rule("*.weight", 0);
    let sage = Config::reference(Algorithm::adamw(), lr)
        .beta0(0.8)
        .schedule(schedule);
    let mut opt = match kind {
        0 => Opt::Burn(
            AdamWConfig::new()
                .with_epsilon(1e-6)
                .with_weight_decay(0.01)
                .init()
                .with_group(
                    BurnGroup::from_predicate("bias"),
                    AdamWConfig::new()
                        .with_epsilon(1e-6)
                        .with_weight_decay(0.0)
                        .build(),
                    None,
                ),
        ),
        1 if portable => {
            Opt::SageTensor(SageConfig::new(sage, rules).init_with(Cpu).expect("valid"))
        }
        1 => Opt::SageTensor(SageConfig::new(sage, rules).init().expect("valid")),
        _ => {
            let cfg = SageConfig::new(sage.global_clip(1.0), rules);
            Opt::SageModule(if portable {
                whole(Cpu, cfg, &model)
            } else {
                whole(SimdCpu::new(), cfg, &model)
            })
        }
    };
    let loss_fn = CrossEntropyLossConfig::new().init(&device);
    let mut order: Vec<usize> = (0..TRAIN).collect();
    let mut rng = Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1);
    let (mut step_t, mut opt_t) = (Duration::ZERO, Duration::ZERO);
    let mut t = 0u64;
    let mut last_loss = 0.0;
    for _ in 0..epochs {
        rng.shuffle(&mut order);
        let mut sum = 0.0;
        for rows in order.chunks(BATCH) {
            t += 1;
            let t0 = Instant::now();
            let (x, y) = batch(rows, &device);
            let loss = loss_fn.forward(model.forward(x), y);
            let grads = GradientsParams::from_grads(loss.backward(), &model);
            let t1 = Instant::now();
            model = match &mut opt {
                // burn's loop schedules the rate: the same warm-up and decay, passed per step.
                Opt::Burn(o) => o.step(lr * schedule.factor(t), model, grads),
                // SAGE schedules on each tensor's own count; burn passes the base rate.
                Opt::SageTensor(o) => o.step(lr, model, grads),
                Opt::SageModule(o) => o(lr, model, &grads),
            };
            let t2 = Instant::now();
            step_t += t2 - t0;
            opt_t += t2 - t1;
            sum += loss.into_scalar::<f32>() as f64;
        }
        last_loss = sum / steps_per_epoch as f64;
    }
    Run {
        acc: accuracy(&model, &device),
        step: step_t / t as u32,
        opt: opt_t / t as u32,
        loss: last_loss,
    }
}

fn main() {
    let mut seeds = vec![1u64, 2, 3];
    let mut epochs = 20;
    let mut hidden = 128;
    let mut portable = false;
    let mut lrs = [1e-2, 2e-2, 2e-2];
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut i = 0;
    while i < args.len() {
        let v = args.get(i + 1).cloned().unwrap_or_default();
        match args[i].as_str() {
            "--seeds" => seeds = v.split(',').map(|s| s.parse().expect("seed")).collect(),
            "--epochs" => epochs = v.parse().expect("epochs"),
            "--hidden" => hidden = v.parse().expect("hidden"),
            "--backend" => portable = v == "portable",
            "--lr" => lrs[0] = v.parse().expect("lr"),
            "--sage-lr" => {
                lrs[1] = v.parse().expect("lr");
                lrs[2] = lrs[1];
            }
            _ => panic!("unknown argument {}", args[i]),
        }
        i += 2;
    }
    let names = [
        "AdamW (burn)",
        "AdamW-SAGE (ModuleOptimizer)",
        "AdamW-SAGE (SageModule, clip 1.0)",
    ];
    println!(
        "digits MLP {INPUTS}-{hidden}-{CLASSES} ({} parameters), {TRAIN} train / {} held out, batch {BATCH}, {epochs} epochs ({} steps), burn-flex CPU",
        INPUTS * hidden + hidden + hidden * CLASSES + CLASSES,
        SAMPLES - TRAIN,
        TRAIN.div_ceil(BATCH) * epochs
    );
    println!("| optimizer | lr | held-out accuracy % (mean ± std) | per seed | last-epoch loss | step (ms) | optimizer (ms, share) |");
    println!("|---|---|---|---|---|---|---|");
    for (k, name) in names.iter().enumerate() {
        let runs: Vec<Run> = seeds
            .iter()
            .map(|&s| train(k, lrs[k], s, epochs, hidden, portable))
            .collect();
        let accs: Vec<f64> = runs.iter().map(|r| 100.0 * r.acc).collect();
        let n = accs.len() as f64;
        let mean = accs.iter().sum::<f64>() / n;
        let std =
            (accs.iter().map(|a| (a - mean).powi(2)).sum::<f64>() / (n - 1.0).max(1.0)).sqrt();
        let step = runs.iter().map(|r| r.step.as_secs_f64()).sum::<f64>() / n * 1e3;
        let opt = runs.iter().map(|r| r.opt.as_secs_f64()).sum::<f64>() / n * 1e3;
        let loss = runs.iter().map(|r| r.loss).sum::<f64>() / n;
        let per: Vec<String> = accs.iter().map(|a| format!("{a:.1}")).collect();
        println!(
            "| {name} | {:e} | {mean:.2} ± {std:.2} | {} | {loss:.4} | {step:.3} | {opt:.3} ({:.0}%) |",
            lrs[k],
            per.join(" / "),
            100.0 * opt / step
        );
    }
}
