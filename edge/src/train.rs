//! The model, its forward and backward pass, and the training loop. No I/O and no allocator:
//! the caller lends one [`Workspace`] (a `static` on the MCU) and gets a report per epoch.
//!
//! Model: 64 → 32 (ReLU) → 10, softmax cross-entropy, 2,410 parameters. The optimizer is
//! `sage_core::Optimizer` over `sage_cpu::Cpu`, driven exactly as on a desktop: one
//! `ParamTensor` per weight and bias, SAGE on for the weights, a plain group for the biases.

use sage_core::{
    Algorithm, Config, Error, Infallible, Optimizer, ParamGroup, ParamTensor, Schedule, TensorState,
};
use sage_cpu::Cpu;

/// Pixels per image (8 × 8).
pub const INPUTS: usize = 64;
/// Hidden units.
pub const HIDDEN: usize = 32;
/// Digit classes.
pub const CLASSES: usize = 10;
/// Images in the data set.
pub const SAMPLES: usize = 1797;
/// The first `TRAIN` images train; the rest are held out. The set is ordered by writer, so the
/// held-out images come from writers the model never saw.
pub const TRAIN: usize = 1500;
/// Held-out images.
pub const HELD_OUT: usize = SAMPLES - TRAIN;
/// Passes over the training images.
pub const EPOCHS: usize = 8;
/// Images per mini-batch (one optimizer step each).
pub const BATCH: usize = 20;
/// Optimizer steps in the whole run.
pub const STEPS: usize = EPOCHS * TRAIN.div_ceil(BATCH);

/// Base learning rate (SAGE wants 2–5× the plain optimizer's).
pub const LR: f64 = 2e-2;
/// β0 of the sensitivity moving average.
pub const BETA0: f64 = 0.8;
/// Weight decay of the SAGE group (the authors' 0.01; none for biases).
pub const WEIGHT_DECAY: f64 = 0.01;

/// Success: the last epoch's mean training loss is below this ...
pub const MAX_FINAL_LOSS: f32 = 0.15;
/// ... and the held-out accuracy is above this.
pub const MIN_HELD_OUT_ACCURACY: f32 = 0.85;

/// Optimizer state precision (`f32`, or `bf16` with the `bf16-state` feature).
#[cfg(not(feature = "bf16-state"))]
pub type State = f32;
#[cfg(not(feature = "bf16-state"))]
const STATE_ZERO: State = 0.0;
/// Optimizer state precision (`f32`, or `bf16` with the `bf16-state` feature).
#[cfg(feature = "bf16-state")]
pub type State = sage_core::bf16;
#[cfg(feature = "bf16-state")]
const STATE_ZERO: State = sage_core::bf16::ZERO;

/// Bytes of optimizer state: m and v for all 2,410 parameters, Ī for the 2,368 weights.
pub const STATE_BYTES: usize =
    (2 * (W1 + HIDDEN + W2 + CLASSES) + W1 + W2) * core::mem::size_of::<State>();

/// Pixels (`SAMPLES × INPUTS`, grey levels 0..=16), then labels (`SAMPLES`); written by
/// `edge/digits-gen`, kept in flash.
static DIGITS: &[u8; SAMPLES * (INPUTS + 1)] = include_bytes!("../data/digits.bin");

const W1: usize = HIDDEN * INPUTS;
const W2: usize = CLASSES * HIDDEN;

/// One value per parameter, laid out as the model's four tensors (weights row-major,
/// `[out][in]`).
#[derive(Clone, Copy)]
pub struct Tensors<T: Copy> {
    /// Hidden layer weights.
    pub w1: [T; W1],
    /// Hidden layer biases.
    pub b1: [T; HIDDEN],
    /// Output layer weights.
    pub w2: [T; W2],
    /// Output layer biases.
    pub b2: [T; CLASSES],
}

impl<T: Copy> Tensors<T> {
    const fn splat(x: T) -> Self {
        Tensors {
            w1: [x; W1],
            b1: [x; HIDDEN],
            w2: [x; W2],
            b2: [x; CLASSES],
        }
    }
}

/// Every buffer training needs, allocated once by the caller (all zero, so it lands in .bss).
pub struct Workspace {
    params: Tensors<f32>,
    grads: Tensors<f32>,
    m: Tensors<State>,
    v: Tensors<State>,
    // Ī only for the weights: the biases' group runs without SAGE, so needs none.
    ibar_w1: [State; W1],
    ibar_w2: [State; W2],
    // Each tensor's own step count (fc1.weight, fc1.bias, fc2.weight, fc2.bias).
    steps: [u64; 4],
    order: [u16; TRAIN],
}

impl Workspace {
    /// Zeroed buffers; [`train`] initializes them.
    pub const fn new() -> Self {
        Workspace {
            params: Tensors::splat(0.0),
            grads: Tensors::splat(0.0),
            m: Tensors::splat(STATE_ZERO),
            v: Tensors::splat(STATE_ZERO),
            ibar_w1: [STATE_ZERO; W1],
            ibar_w2: [STATE_ZERO; W2],
            steps: [0; 4],
            order: [0; TRAIN],
        }
    }
}

impl Default for Workspace {
    fn default() -> Self {
        Self::new()
    }
}

/// What one epoch did.
#[derive(Clone, Copy, Debug)]
pub struct Epoch {
    /// 1-based epoch number.
    pub epoch: usize,
    /// Mean cross-entropy over this epoch's training images (as they were seen).
    pub train_loss: f32,
    /// Mean cross-entropy over the held-out images after the epoch.
    pub held_out_loss: f32,
    /// Fraction of held-out images classified correctly after the epoch.
    pub held_out_accuracy: f32,
    /// Optimizer steps so far.
    pub steps: u64,
    /// Steps the non-finite guard skipped so far.
    pub skipped: u64,
}

impl Epoch {
    /// Whether training reached the stated bounds.
    pub fn succeeded(&self) -> bool {
        self.train_loss < MAX_FINAL_LOSS && self.held_out_accuracy > MIN_HELD_OUT_ACCURACY
    }
}

/// The optimizer configuration: AdamW-SAGE as the authors ran it (`reference` preset),
/// linear warm-up and decay, global clipping at 1.
pub fn config() -> Config {
    Config::reference(Algorithm::adamw(), LR)
        .beta0(BETA0)
        .schedule(Schedule::LinearWarmupDecay {
            warmup_steps: (STEPS / 10) as u64,
            total_steps: STEPS as u64,
        })
        .global_clip(1.0)
}

const WEIGHTS: usize = 0;
const BIASES: usize = 1;

/// Trains from a fixed seed and reports each epoch to `log`; returns the last epoch.
pub fn train(ws: &mut Workspace, mut log: impl FnMut(&Epoch)) -> Result<Epoch, Error<Infallible>> {
    let groups = [
        ParamGroup::sage().weight_decay(WEIGHT_DECAY),
        ParamGroup::plain(),
    ];
    let mut opt = Optimizer::new(Cpu, config(), groups)?;
    let mut rng = XorShift(0x5a6e_2022);
    let Workspace {
        params,
        grads,
        m,
        v,
        ibar_w1,
        ibar_w2,
        steps,
        order,
    } = ws;
    *steps = [0; 4];
    init(params, &mut rng);
    for (i, o) in order.iter_mut().enumerate() {
        *o = i as u16;
    }
    let mut skipped = 0;
    let mut last = None;
    for epoch in 1..=EPOCHS {
        shuffle(order, &mut rng);
        let mut loss_sum = 0.0;
        for batch in order.chunks(BATCH) {
            *grads = Tensors::splat(0.0);
            let scale = 1.0 / batch.len() as f32;
            for &i in batch {
                loss_sum += backprop(params, grads, i as usize, scale);
            }
            let [s_w1, s_b1, s_w2, s_b2] = &mut *steps;
            let state = |m, v, ibar, step| TensorState {
                m: Some(m),
                v: Some(v),
                ibar,
                step,
            };
            let report = opt.step(&mut [
                ParamTensor::new(
                    &mut params.w1[..],
                    &grads.w1[..],
                    state(&mut m.w1[..], &mut v.w1[..], Some(&mut ibar_w1[..]), s_w1),
                )
                .name("fc1.weight")
                .group(WEIGHTS),
                ParamTensor::new(
                    &mut params.b1[..],
                    &grads.b1[..],
                    state(&mut m.b1[..], &mut v.b1[..], None, s_b1),
                )
                .name("fc1.bias")
                .group(BIASES),
                ParamTensor::new(
                    &mut params.w2[..],
                    &grads.w2[..],
                    state(&mut m.w2[..], &mut v.w2[..], Some(&mut ibar_w2[..]), s_w2),
                )
                .name("fc2.weight")
                .group(WEIGHTS),
                ParamTensor::new(
                    &mut params.b2[..],
                    &grads.b2[..],
                    state(&mut m.b2[..], &mut v.b2[..], None, s_b2),
                )
                .name("fc2.bias")
                .group(BIASES),
            ])?;
            skipped += u64::from(!report.applied());
        }
        let (held_out_loss, held_out_accuracy) = evaluate(params);
        let e = Epoch {
            epoch,
            train_loss: loss_sum / TRAIN as f32,
            held_out_loss,
            held_out_accuracy,
            steps: opt.steps(),
            skipped,
        };
        log(&e);
        last = Some(e);
    }
    // EPOCHS > 0, so some epoch ran.
    Ok(last.unwrap_or(Epoch {
        epoch: 0,
        train_loss: f32::NAN,
        held_out_loss: f32::NAN,
        held_out_accuracy: 0.0,
        steps: 0,
        skipped,
    }))
}

/// Image `i` scaled to [0, 1], and its label.
fn sample(i: usize) -> ([f32; INPUTS], usize) {
    let mut x = [0.0; INPUTS];
    for (x, &p) in x.iter_mut().zip(&DIGITS[i * INPUTS..(i + 1) * INPUTS]) {
        *x = f32::from(p) * (1.0 / 16.0);
    }
    (x, usize::from(DIGITS[SAMPLES * INPUTS + i]))
}

/// Hidden activations and logits.
fn forward(p: &Tensors<f32>, x: &[f32; INPUTS]) -> ([f32; HIDDEN], [f32; CLASSES]) {
    let mut h = [0.0; HIDDEN];
    for (j, h) in h.iter_mut().enumerate() {
        let row = &p.w1[j * INPUTS..(j + 1) * INPUTS];
        let z = p.b1[j] + row.iter().zip(x).map(|(w, x)| w * x).sum::<f32>();
        *h = z.max(0.0);
    }
    let mut z = [0.0; CLASSES];
    for (k, z) in z.iter_mut().enumerate() {
        let row = &p.w2[k * HIDDEN..(k + 1) * HIDDEN];
        *z = p.b2[k] + row.iter().zip(&h).map(|(w, h)| w * h).sum::<f32>();
    }
    (h, z)
}

/// Softmax probabilities (in place) and the cross-entropy of class `y`.
fn softmax_xent(z: &mut [f32; CLASSES], y: usize) -> f32 {
    // Subtracting the max keeps exp() finite.
    let max = z.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut sum = 0.0;
    for z in z.iter_mut() {
        *z = libm::expf(*z - max);
        sum += *z;
    }
    for z in z.iter_mut() {
        *z /= sum;
    }
    -libm::logf(z[y].max(f32::MIN_POSITIVE))
}

/// Forward and backward for image `i`: adds `scale ×` its gradient to `g`, returns its loss.
fn backprop(p: &Tensors<f32>, g: &mut Tensors<f32>, i: usize, scale: f32) -> f32 {
    let (x, y) = sample(i);
    let (h, mut z) = forward(p, &x);
    let loss = softmax_xent(&mut z, y);
    // d loss / d logits = softmax − one-hot.
    let mut dz = z;
    dz[y] -= 1.0;
    let mut dh = [0.0f32; HIDDEN];
    for (k, &d) in dz.iter().enumerate() {
        let d = d * scale;
        g.b2[k] += d;
        let (gw, w) = (
            &mut g.w2[k * HIDDEN..(k + 1) * HIDDEN],
            &p.w2[k * HIDDEN..(k + 1) * HIDDEN],
        );
        for j in 0..HIDDEN {
            gw[j] += d * h[j];
            dh[j] += d * w[j];
        }
    }
    for (j, &d) in dh.iter().enumerate() {
        // ReLU passes the gradient only where the unit was active.
        if h[j] <= 0.0 {
            continue;
        }
        g.b1[j] += d;
        for (gw, &x) in g.w1[j * INPUTS..(j + 1) * INPUTS].iter_mut().zip(&x) {
            *gw += d * x;
        }
    }
    loss
}

/// Mean loss and accuracy on the held-out images.
fn evaluate(p: &Tensors<f32>) -> (f32, f32) {
    let (mut loss, mut correct) = (0.0, 0u32);
    for i in TRAIN..SAMPLES {
        let (x, y) = sample(i);
        let (_, mut z) = forward(p, &x);
        let best = (0..CLASSES).fold(0, |b, k| if z[k] > z[b] { k } else { b });
        correct += u32::from(best == y);
        loss += softmax_xent(&mut z, y);
    }
    (loss / HELD_OUT as f32, correct as f32 / HELD_OUT as f32)
}

/// He-uniform weights (ReLU fan-in scaling), zero biases.
fn init(p: &mut Tensors<f32>, rng: &mut XorShift) {
    *p = Tensors::splat(0.0);
    let a1 = libm::sqrtf(6.0 / INPUTS as f32);
    let a2 = libm::sqrtf(6.0 / HIDDEN as f32);
    p.w1.iter_mut().for_each(|w| *w = a1 * rng.symmetric());
    p.w2.iter_mut().for_each(|w| *w = a2 * rng.symmetric());
}

fn shuffle(order: &mut [u16], rng: &mut XorShift) {
    for i in (1..order.len()).rev() {
        order.swap(i, rng.below(i + 1));
    }
}

/// Marsaglia's xorshift32: tiny, and the same sequence on every target.
struct XorShift(u32);

impl XorShift {
    fn next(&mut self) -> u32 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        self.0 = x;
        x
    }
    /// Uniform in [-1, 1).
    fn symmetric(&mut self) -> f32 {
        (self.next() >> 8) as f32 * (2.0 / (1u32 << 24) as f32) - 1.0
    }
    /// Uniform-enough in 0..n for a shuffle (n ≤ 2^16, so the modulo bias is < 2^-16).
    fn below(&mut self, n: usize) -> usize {
        self.next() as usize % n
    }
}
