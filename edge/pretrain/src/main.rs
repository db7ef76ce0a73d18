//! The host side of the edge demo, compiled from the firmware's own model and experiment code
//! (`edge/src/model.rs`, `edge/src/finetune.rs`):
//!
//! - `pretrain` (the default): trains the 64-32-10 MLP with AdamW-SAGE on the first
//!   [`PRETRAIN`] digits of `edge/data/digits.bin`, unshifted, and writes
//!   `edge/data/pretrained.bin` (the weights the firmware keeps in flash); then writes
//!   `edge/data/user.bin`: the remaining digits — writers' images the model never saw — in the
//!   device user's handwriting ([`user_hand`]).
//! - `simulate`: runs the on-device experiment on the host from the committed files and
//!   prints its table (accuracies only: the host counts no instructions).
//!
//! Run from the repository root (not from inside `edge/`, whose cargo config targets the MCU):
//! `cargo run --release --manifest-path edge/pretrain/Cargo.toml [-- simulate]`

// The experiment is shared with the firmware, which exercises every item.
#![allow(dead_code)]

#[path = "../../src/finetune.rs"]
mod finetune;
#[path = "../../src/model.rs"]
mod model;

use std::path::PathBuf;

use model::{Images, LayerGrad, CLASSES, HIDDEN, INPUTS, PARAMS, W1, W2};
use sage_core::{Algorithm, Config, Optimizer, ParamGroup, ParamTensor, Schedule, TensorState};
use sage_cpu::Cpu;

/// Images in `digits.bin`.
const SAMPLES: usize = 1797;
/// The first `PRETRAIN` images pretrain the model; the rest become the user's.
const PRETRAIN: usize = 1500;
/// Pretraining passes, batch size, rate, β0 and weight decay (the earlier from-scratch
/// firmware's recipe: 90% on unshifted held-out digits).
const EPOCHS: usize = 8;
const BATCH: usize = 20;
const LR: f64 = 2e-2;
const BETA0: f64 = 0.8;
const WEIGHT_DECAY: f64 = 0.01;

/// The device user's hand: each image of the user's writers is rotated by this many degrees
/// (counter-clockwise, about the image centre) ...
pub const ROTATE_DEG: f32 = 20.0;
/// ... moved by this many pixels right and down ...
pub const OFFSET: (f32, f32) = (0.6, 0.4);
/// ... resampled bilinearly, and its strokes thickened: each pixel becomes at least this
/// fraction of its brightest 4-neighbour.
pub const THICKEN: f32 = 0.7;

fn data_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../data")
}

fn main() {
    let cmd = std::env::args().nth(1).unwrap_or_else(|| "pretrain".into());
    match cmd.as_str() {
        "pretrain" => pretrain(),
        "simulate" => simulate(),
        "sweep" => sweep(),
        other => {
            eprintln!("usage: sage-edge-pretrain [pretrain|simulate|sweep] (got {other:?})");
            std::process::exit(2);
        }
    }
}

fn pretrain() {
    let bytes = std::fs::read(data_dir().join("digits.bin")).expect("read edge/data/digits.bin");
    let digits = Images::new(&bytes).expect("digits.bin is malformed");
    assert_eq!(digits.len(), SAMPLES);

    let mut params = Box::new([0f32; PARAMS]);
    let mut rng = model::XorShift(0x5a6e_2022);
    init(&mut params, &mut rng);
    train(&mut params, &digits, &mut rng);

    let m = model::layers(&params);
    let (acc, loss) = model::evaluate(m, &digits, PRETRAIN..SAMPLES);
    println!(
        "pretrained on {PRETRAIN} unshifted digits: held-out (unshifted, {} images) accuracy {:.1}%, loss {loss:.4}",
        SAMPLES - PRETRAIN,
        acc * 100.0
    );

    // The user's images: the held-out writers, in the user's hand.
    let n = SAMPLES - PRETRAIN;
    let mut user = Vec::with_capacity(n * (INPUTS + 1));
    for i in PRETRAIN..SAMPLES {
        user.extend_from_slice(&user_hand(digits.pixels(i)));
    }
    for i in PRETRAIN..SAMPLES {
        user.push(digits.label(i) as u8);
    }
    let user_set = Images::new(&user).expect("user set");
    let (acc, loss) = model::evaluate(m, &user_set, 0..n);
    println!(
        "the same images in the user's hand: accuracy {:.1}%, loss {loss:.4}",
        acc * 100.0
    );

    let mut w = Vec::with_capacity(PARAMS * 4);
    for x in params.iter() {
        w.extend_from_slice(&x.to_le_bytes());
    }
    for (name, data) in [("pretrained.bin", &w), ("user.bin", &user)] {
        let path = data_dir().join(name);
        std::fs::write(&path, data).expect("write");
        println!("wrote {} bytes to {}", data.len(), path.display());
    }
}

/// The user's hand applied to one image (grey levels 0..=16): rotation by [`ROTATE_DEG`] and
/// offset by [`OFFSET`] in one affine map, sampled bilinearly (outside the image is 0), then
/// [`THICKEN`], then rounded back to 0..=16.
pub fn user_hand(src: &[u8]) -> [u8; INPUTS] {
    let at = |r: i32, c: i32| -> f32 {
        if (0..8).contains(&r) && (0..8).contains(&c) {
            f32::from(src[(r * 8 + c) as usize])
        } else {
            0.0
        }
    };
    let (s, co) = ROTATE_DEG.to_radians().sin_cos();
    let mut moved = [0f32; INPUTS];
    for r in 0..8 {
        for c in 0..8 {
            // Output pixel (r, c) samples the source at the inverse map: undo the offset, then
            // rotate back about the centre (3.5, 3.5). Rows grow downwards, so a
            // counter-clockwise turn on screen is a clockwise one in (x = c, y = r).
            let (x, y) = (c as f32 - 3.5 - OFFSET.0, r as f32 - 3.5 - OFFSET.1);
            let (sx, sy) = (co * x - s * y + 3.5, s * x + co * y + 3.5);
            let (x0, y0) = (sx.floor(), sy.floor());
            let (fx, fy) = (sx - x0, sy - y0);
            let (x0, y0) = (x0 as i32, y0 as i32);
            moved[r * 8 + c] = (1.0 - fy) * ((1.0 - fx) * at(y0, x0) + fx * at(y0, x0 + 1))
                + fy * ((1.0 - fx) * at(y0 + 1, x0) + fx * at(y0 + 1, x0 + 1));
        }
    }
    let mut out = [0u8; INPUTS];
    for r in 0..8i32 {
        for c in 0..8i32 {
            let g = |r: i32, c: i32| {
                if (0..8).contains(&r) && (0..8).contains(&c) {
                    moved[(r * 8 + c) as usize]
                } else {
                    0.0
                }
            };
            let n4 = g(r - 1, c)
                .max(g(r + 1, c))
                .max(g(r, c - 1))
                .max(g(r, c + 1));
            let v = g(r, c).max(THICKEN * n4);
            out[(r * 8 + c) as usize] = v.round().clamp(0.0, 16.0) as u8;
        }
    }
    out
}

/// He-uniform weights (ReLU fan-in scaling), zero biases.
fn init(p: &mut [f32; PARAMS], rng: &mut model::XorShift) {
    p.fill(0.0);
    let a1 = (6.0 / INPUTS as f32).sqrt();
    let a2 = (6.0 / HIDDEN as f32).sqrt();
    p[..W1].iter_mut().for_each(|w| *w = a1 * rng.symmetric());
    p[W1 + HIDDEN..W1 + HIDDEN + W2]
        .iter_mut()
        .for_each(|w| *w = a2 * rng.symmetric());
}

/// AdamW-SAGE (reference preset) with linear warm-up and decay and global clipping at 1;
/// SAGE and decay for the weights, plain AdamW for the biases.
fn train(params: &mut [f32; PARAMS], digits: &Images<'_>, rng: &mut model::XorShift) {
    let steps = EPOCHS * PRETRAIN.div_ceil(BATCH);
    let cfg = Config::reference(Algorithm::adamw(), LR)
        .beta0(BETA0)
        .schedule(Schedule::LinearWarmupDecay {
            warmup_steps: (steps / 10) as u64,
            total_steps: steps as u64,
        })
        .global_clip(1.0);
    let groups = [
        ParamGroup::sage().weight_decay(WEIGHT_DECAY),
        ParamGroup::plain(),
    ];
    let mut opt = Optimizer::new(Cpu, cfg, groups).expect("config");
    let lens = [W1, HIDDEN, W2, CLASSES];
    let sage = [true, false, true, false];
    let mut states: Vec<TensorState<Vec<f32>>> = lens
        .iter()
        .zip(sage)
        .map(|(&n, s)| TensorState::new(opt.config().state_layout(s), || vec![0f32; n]))
        .collect();
    let mut grads = vec![0f32; PARAMS];
    let mut order: Vec<usize> = (0..PRETRAIN).collect();
    for epoch in 1..=EPOCHS {
        rng.shuffle(&mut order);
        let mut loss = 0.0;
        for batch in order.chunks(BATCH) {
            grads.fill(0.0);
            let scale = 1.0 / batch.len() as f32;
            for &i in batch {
                let (x, y) = digits.sample(i);
                let (g1w, rest) = grads.split_at_mut(W1);
                let (g1b, rest) = rest.split_at_mut(HIDDEN);
                let (g2w, g2b) = rest.split_at_mut(W2);
                loss += model::backward(
                    model::layers(params),
                    &x,
                    y,
                    scale,
                    LayerGrad { w: g2w, b: g2b },
                    Some(LayerGrad { w: g1w, b: g1b }),
                );
            }
            let mut ps: Vec<&mut [f32]> = Vec::new();
            let mut rest: &mut [f32] = &mut params[..];
            for &n in &lens {
                let (a, b) = rest.split_at_mut(n);
                ps.push(a);
                rest = b;
            }
            let mut gs: Vec<&[f32]> = Vec::new();
            let mut rest: &[f32] = &grads;
            for &n in &lens {
                let (a, b) = rest.split_at(n);
                gs.push(a);
                rest = b;
            }
            let mut ts: Vec<ParamTensor<'_, Cpu, f32, f32>> = ps
                .into_iter()
                .zip(gs)
                .zip(states.iter_mut())
                .enumerate()
                .map(|(k, ((p, g), s))| ParamTensor::new(p, g, s.view()).group(k % 2))
                .collect();
            opt.step(&mut ts[..]).expect("step");
        }
        let (acc, _) = model::evaluate(model::layers(params), digits, PRETRAIN..SAMPLES);
        println!(
            "pretrain epoch {epoch}: train loss {:.4}, held-out accuracy {:.1}%",
            loss / PRETRAIN as f32,
            acc * 100.0
        );
    }
}

struct NoClock;
impl finetune::Clock for NoClock {
    fn now(&mut self) -> u64 {
        0
    }
}

/// Reads a weights file (`PARAMS` little-endian f32: `w1, b1, w2, b2`).
fn read_weights(bytes: &[u8]) -> Box<[f32; PARAMS]> {
    assert_eq!(bytes.len(), PARAMS * 4, "pretrained.bin: wrong length");
    let mut out = Box::new([0f32; PARAMS]);
    for (o, b) in out.iter_mut().zip(bytes.chunks_exact(4)) {
        *o = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
        assert!(o.is_finite(), "pretrained.bin: non-finite weight");
    }
    out
}

/// The committed weights and user images.
fn load() -> (Box<[f32; PARAMS]>, Vec<u8>) {
    let w = std::fs::read(data_dir().join("pretrained.bin")).expect("read pretrained.bin");
    let u = std::fs::read(data_dir().join("user.bin")).expect("read user.bin");
    (read_weights(&w), u)
}

/// The firmware's experiment on the host: the same numbers, bit for bit (IEEE f32 and the
/// same libm everywhere), without instruction counts.
fn simulate() {
    let (pretrained, u) = load();
    let user = Images::new(&u).expect("user.bin");
    let exp = finetune::Experiment::new(&pretrained, user).expect("experiment");
    let before = exp.before();
    let mut arena = Box::new(finetune::Arena::Empty);
    println!(
        "held-out: {} user images; before fine-tuning {:.1}%",
        exp.held_out().len(),
        before * 100.0
    );
    let mut ok = true;
    for setup in finetune::setups() {
        let s = exp
            .run(setup, &mut arena, before, &mut NoClock)
            .expect("run");
        ok &= s.passed();
        println!(
            "{:5} {:10} {:?}: after {:5.1}% (seeds {:?}) gain {:+.1} spread (std) {:.1}  {}",
            setup.layers.name(),
            setup.optimizer(),
            setup.state,
            s.mean_after() * 100.0,
            s.after.map(|a| (a * 1000.0).round() / 10.0),
            s.gain() * 100.0,
            s.spread() * 100.0,
            if s.passed() { "pass" } else { "FAIL" }
        );
    }
    std::process::exit(if ok { 0 } else { 1 });
}

/// How the rates in `finetune.rs` were chosen: for each optimizer, the rate (and, for SAGE,
/// β0) with the best mean accuracy over both layer choices and every seed, measured on the
/// validation images (the pool's images a seed did not choose), never on the held-out test.
fn sweep() {
    use finetune::{Eval, Layers, Setup};
    let (pretrained, u) = load();
    let user = Images::new(&u).expect("user.bin");
    let exp = finetune::Experiment::new(&pretrained, user).expect("experiment");
    let mut arena = Box::new(finetune::Arena::Empty);
    let lrs = [5e-3, 1e-2, 2e-2, 4e-2, 8e-2, 1.6e-1, 3.2e-1];
    for sage in [false, true] {
        let beta0s: &[f64] = if sage { &[0.7, 0.8, 0.9, 0.95] } else { &[0.9] };
        let mut best = (0.0f32, 0.0, 0.0);
        for &lr in &lrs {
            for &beta0 in beta0s {
                let mut accs = [0f32; 2];
                for (a, layers) in accs.iter_mut().zip([Layers::Last, Layers::All]) {
                    let setup = Setup {
                        lr,
                        beta0,
                        ..Setup::new(layers, sage, sage_core::DType::F32)
                    };
                    let s = exp
                        .run_on(setup, Eval::Validation, &mut arena, 0.0, &mut NoClock)
                        .expect("run");
                    *a = s.mean_after();
                }
                let mean = (accs[0] + accs[1]) / 2.0;
                println!(
                    "{:10} lr {lr:<6} beta0 {:<4}: validation accuracy last {:.1}%, all {:.1}%, mean {:.1}%",
                    if sage { "AdamW-SAGE" } else { "AdamW" },
                    if sage { beta0.to_string() } else { "-".into() },
                    accs[0] * 100.0,
                    accs[1] * 100.0,
                    mean * 100.0
                );
                if mean > best.0 {
                    best = (mean, lr, beta0);
                }
            }
        }
        println!(
            "best {}: lr {}{} (validation mean {:.1}%)",
            if sage { "AdamW-SAGE" } else { "AdamW" },
            best.1,
            if sage {
                format!(", beta0 {}", best.2)
            } else {
                String::new()
            },
            best.0 * 100.0
        );
    }
}
