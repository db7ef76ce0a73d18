//! The paper's Figure 3 in miniature: train a small MLP with AdamW-SAGE on the CPU backend,
//! then prune its weights at several sparsities — lowest Ī first (SAGE's importance score),
//! lowest |θ| first, or at random — and report how much the loss rises.
//!
//! `cargo run --release -p sage-checkpoint --example prune`
//!
//! Also shows the diagnostics (Ī, U and the modulation of each weight matrix), a checkpoint
//! round trip, and the importance export.

use sage_checkpoint::diagnostics::{diagnose, export_importance, lowest_mask, Probe};
use sage_checkpoint::{load, save_optimizer, Checkpoint, ConfigCheck, Entry, EntryMut};
use sage_core::{Algorithm, Config, Optimizer, ParamGroup, ParamTensor, TensorState};
use sage_cpu::Cpu;

const D: usize = 16; // inputs
const H: usize = 32; // hidden units
const N: usize = 512; // samples
const STEPS: usize = 600;

/// splitmix64: a tiny deterministic generator, so the example prints the same numbers
/// everywhere.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    /// Uniform in [-1, 1).
    fn uniform(&mut self) -> f32 {
        (self.next() >> 40) as f32 / (1u64 << 23) as f32 - 1.0
    }
}

/// Parameters: W1 (H×D), b1 (H), W2 (H), b2 (1).
const NAMES: [&str; 4] = ["fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"];
const LENS: [usize; 4] = [H * D, H, H, 1];
/// Weights: SAGE with decay; biases: plain AdamW (as the authors group them).
const GROUP: [usize; 4] = [0, 1, 0, 1];

struct Data {
    x: Vec<[f32; D]>,
    y: Vec<f32>,
}

/// A teacher that depends on 6 of the 16 inputs, through a small tanh layer: the rest of the
/// student's input weights are redundant.
fn data(rng: &mut Rng) -> Data {
    let teacher: Vec<[f32; 6]> = (0..4)
        .map(|_| std::array::from_fn(|_| 2.0 * rng.uniform()))
        .collect();
    let out: Vec<f32> = (0..4).map(|_| rng.uniform()).collect();
    let mut x = Vec::with_capacity(N);
    let mut y = Vec::with_capacity(N);
    for _ in 0..N {
        let xi: [f32; D] = std::array::from_fn(|_| rng.uniform());
        let z: f32 = teacher
            .iter()
            .zip(&out)
            .map(|(w, o)| o * w.iter().zip(&xi).map(|(a, b)| a * b).sum::<f32>().tanh())
            .sum();
        x.push(xi);
        y.push(if z > 0.0 { 1.0 } else { 0.0 });
    }
    Data { x, y }
}

/// Mean binary cross-entropy, and the gradient of every parameter when `grads` is given.
fn loss(p: &[Vec<f32>], d: &Data, mut grads: Option<&mut [Vec<f32>]>) -> f32 {
    if let Some(g) = grads.as_deref_mut() {
        for t in g.iter_mut() {
            t.iter_mut().for_each(|x| *x = 0.0);
        }
    }
    let (w1, b1, w2, b2) = (&p[0], &p[1], &p[2], p[3][0]);
    let mut total = 0.0f64;
    let mut h = [0f32; H];
    for (x, &y) in d.x.iter().zip(&d.y) {
        let mut z = b2;
        for j in 0..H {
            let a: f32 = b1[j] + (0..D).map(|i| w1[j * D + i] * x[i]).sum::<f32>();
            h[j] = a.tanh();
            z += w2[j] * h[j];
        }
        // log(1 + e^z) − y·z, written to stay finite for large |z|.
        total += (z.max(0.0) + (-z.abs()).exp().ln_1p() - y * z) as f64;
        if let Some(g) = grads.as_deref_mut() {
            let dz = (1.0 / (1.0 + (-z).exp()) - y) / N as f32;
            g[3][0] += dz;
            for j in 0..H {
                g[2][j] += dz * h[j];
                let da = dz * w2[j] * (1.0 - h[j] * h[j]);
                g[1][j] += da;
                for i in 0..D {
                    g[0][j * D + i] += da * x[i];
                }
            }
        }
    }
    (total / N as f64) as f32
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut rng = Rng(2022);
    let d = data(&mut rng);
    let scale = [1.0 / (D as f32).sqrt(), 0.0, 1.0 / (H as f32).sqrt(), 0.0];
    let mut p: Vec<Vec<f32>> = LENS
        .iter()
        .zip(scale)
        .map(|(&n, s)| (0..n).map(|_| s * rng.uniform()).collect())
        .collect();
    let mut g: Vec<Vec<f32>> = LENS.iter().map(|&n| vec![0.0; n]).collect();

    // The authors' AdamW-SAGE; SAGE wants a larger rate than plain Adam.
    let cfg = Config::reference(Algorithm::adamw(), 1e-2).beta0(0.85);
    let groups = vec![ParamGroup::sage().weight_decay(1e-3), ParamGroup::plain()];
    // Each tensor's state: m, v, Ī where its group has SAGE, and its own step count.
    let mut state: Vec<TensorState<Vec<f32>>> = (0..4)
        .map(|k| {
            let layout = cfg.state_layout(groups[GROUP[k]].sage);
            TensorState::new(layout, || vec![0.0; LENS[k]])
        })
        .collect();
    let mut opt = Optimizer::new(Cpu, cfg, groups.clone())?;
    let initial = loss(&p, &d, None);
    for _ in 0..STEPS {
        loss(&p, &d, Some(&mut g));
        let mut ts: Vec<ParamTensor<'_, Cpu, f32, f32>> = p
            .iter_mut()
            .zip(&g)
            .zip(state.iter_mut())
            .enumerate()
            .map(|(k, ((pk, gk), st))| {
                ParamTensor::new(&mut pk[..], &gk[..], st.view())
                    .name(NAMES[k])
                    .group(GROUP[k])
            })
            .collect();
        opt.step(&mut ts)?;
    }
    let ibar: Vec<&[f32]> = [0, 2]
        .iter()
        .map(|&k| state[k].ibar.as_deref().ok_or("a SAGE tensor has Ī"))
        .collect::<Result<_, _>>()?;
    let trained = loss(&p, &d, Some(&mut g));
    println!("trained {STEPS} AdamW-SAGE steps: loss {initial:.4} -> {trained:.4}\n");

    // Diagnostics of the weight matrices: Ī, and U and s of the next step.
    println!("diagnostics (next step's U and s from the current θ and gradient):");
    for k in [0, 2] {
        let probe =
            Probe::<Cpu, f32, f32>::new(NAMES[k], GROUP[k], &state[k]).with(&p[k][..], &g[k][..]);
        println!(
            "{}",
            diagnose(&mut Cpu, &cfg, &groups, opt.steps(), &probe)?
        );
    }

    // A checkpoint round trip, and the importance export.
    let entries: Vec<Entry<'_, Cpu, f32, f32>> = (0..4)
        .map(|k| Entry::new(NAMES[k], &state[k]).group(GROUP[k]))
        .collect();
    let bytes = save_optimizer(&mut opt, &entries)?;
    let mut state2: Vec<TensorState<Vec<f32>>> = (0..4)
        .map(|k| {
            let layout = cfg.state_layout(groups[GROUP[k]].sage);
            TensorState::new(layout, || vec![0.0; LENS[k]])
        })
        .collect();
    let mut opt2 = Optimizer::new(Cpu, cfg, groups.clone())?;
    let mut targets: Vec<EntryMut<'_, Cpu, f32, f32>> = state2
        .iter_mut()
        .enumerate()
        .map(|(k, st)| EntryMut::new(NAMES[k], st.view()).group(GROUP[k]))
        .collect();
    load(&mut opt2, &bytes, &mut targets, ConfigCheck::Exact)?;
    drop(targets);
    let parsed = Checkpoint::parse(&bytes)?;
    let importance = export_importance::<Cpu, f32>(
        &mut Cpu,
        opt.steps(),
        &[(NAMES[0], ibar[0]), (NAMES[2], ibar[1])],
    )?;
    println!(
        "\ncheckpoint: {} bytes, step {}, {} tensors, reloaded exactly: {}; importance export: {} bytes\n",
        bytes.len(),
        parsed.step(),
        parsed.params().len(),
        state2 == state && opt2.steps() == opt.steps(),
        importance.len()
    );

    // Pruning: weights only (fc1.weight and fc2.weight together), biases kept.
    let magnitude: Vec<Vec<f32>> = [0, 2]
        .iter()
        .map(|&k| p[k].iter().map(|x| x.abs()).collect())
        .collect();
    let prune = |mask: &[Vec<bool>]| -> f32 {
        let mut q = p.clone();
        for (slot, k) in [0, 2].into_iter().enumerate() {
            for (x, &cut) in q[k].iter_mut().zip(&mask[slot]) {
                if cut {
                    *x = 0.0;
                }
            }
        }
        loss(&q, &d, None) - trained
    };
    println!("loss increase after pruning the weights (trained loss {trained:.4}):");
    println!("sparsity   lowest Ī   lowest |θ|   random (mean of 10)");
    for sparsity in [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7] {
        let by_ibar = prune(&lowest_mask(&ibar, sparsity));
        let by_mag = prune(&lowest_mask(&[&magnitude[0], &magnitude[1]], sparsity));
        let mut random = 0.0;
        for _ in 0..10 {
            let noise: Vec<Vec<f32>> = [0, 2]
                .iter()
                .map(|&k| (0..LENS[k]).map(|_| rng.uniform()).collect())
                .collect();
            random += prune(&lowest_mask(&[&noise[0], &noise[1]], sparsity)) / 10.0;
        }
        println!(
            "{:>7.0}%   {:>+9.4}   {:>+10.4}   {:>+10.4}",
            100.0 * sparsity,
            by_ibar,
            by_mag,
            random
        );
    }
    Ok(())
}
