//! One fine-tuning run: the pretrained encoder, a fresh classifier, AdamW or AdamW-SAGE.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use candle_core::{DType, Device, Tensor, D};
use candle_nn::{VarBuilder, VarMap};
use indicatif::{ProgressBar, ProgressStyle};
use sage_candle::bert::{init_var, load_pretrained, BertClassifier, BertConfig, Rng};
use sage_candle::{named_vars, GroupRules, SageOptimizer, SageParams, SliceBackend};
use sage_core::{Algorithm, Config, Schedule};

use crate::data::shuffle;

/// Sentences as token ids with their labels.
pub struct Encoded {
    /// Token ids per sentence.
    pub ids: Vec<Vec<u32>>,
    /// Labels.
    pub labels: Vec<u32>,
}

/// The settings of one run.
#[derive(Clone, Debug)]
pub struct RunConfig {
    /// SAGE on the encoder's linear layers (the authors' split), or plain AdamW.
    pub sage: bool,
    /// Base learning rate.
    pub lr: f64,
    /// β0 (SAGE only).
    pub beta0: f64,
    /// Passes over the training set.
    pub epochs: usize,
    /// Sentences per step.
    pub batch: usize,
    /// Seeds the classifier, dropout and the order of batches.
    pub seed: u64,
    /// Weight decay (not on biases and LayerNorm).
    pub weight_decay: f64,
    /// Warm-up fraction of the steps (then linear decay, the authors' schedule).
    pub warmup: f64,
    /// Train no embedding parameter.
    pub freeze_embeddings: bool,
    /// Directory with `config.json` and `model.safetensors`.
    pub model_dir: PathBuf,
    /// Where the model trains: the CPU, or a CUDA device (needs the `cuda` feature; the
    /// optimizer then steps the tensors there through sage-cuda).
    pub device: Device,
}

impl RunConfig {
    /// "AdamW" or "AdamW-SAGE".
    pub fn label(&self) -> &'static str {
        if self.sage {
            "AdamW-SAGE"
        } else {
            "AdamW"
        }
    }
}

/// What a run measured.
#[derive(Clone, Debug, serde::Serialize)]
pub struct RunResult {
    /// "AdamW" or "AdamW-SAGE".
    pub label: String,
    /// The seed.
    pub seed: u64,
    /// Base rate.
    pub lr: f64,
    /// β0 (SAGE runs).
    pub beta0: Option<f64>,
    /// Mean training loss of each epoch.
    pub epoch_loss: Vec<f64>,
    /// Dev accuracy after each epoch.
    pub epoch_dev_acc: Vec<f64>,
    /// Optimizer steps taken.
    pub steps: u64,
    /// Mean seconds per training step (forward, backward, optimizer).
    pub step_secs: f64,
    /// Mean seconds per optimizer step.
    pub opt_secs: f64,
    /// Mean seconds per forward pass (with the loss); the rest of a step is the backward pass.
    pub fwd_secs: f64,
    /// Parameters the optimizer updates.
    pub trained_params: usize,
    /// |θ·g| of every encoder linear weight after training, averaged over a few batches.
    #[serde(skip)]
    pub sensitivity: Vec<f32>,
}

fn batch_tensors(
    enc: &crate::text::TextEncoder,
    data: &Encoded,
    idx: &[usize],
    dev: &Device,
) -> candle_core::Result<(Tensor, Tensor, Tensor)> {
    let seqs: Vec<&[u32]> = idx.iter().map(|&i| data.ids[i].as_slice()).collect();
    let b = enc.pad(&seqs);
    let labels: Vec<u32> = idx.iter().map(|&i| data.labels[i]).collect();
    Ok((
        Tensor::from_vec(b.ids, (b.rows, b.len), dev)?,
        Tensor::from_vec(b.mask, (b.rows, b.len), dev)?,
        Tensor::from_vec(labels, idx.len(), dev)?,
    ))
}

/// This epoch's batches: a fresh shuffle, sorted by length within windows of 16 batches so a
/// batch pads little (a batch costs its longest sentence), then the batches shuffled.
pub fn length_buckets(
    order: &mut [usize],
    ids: &[Vec<u32>],
    batch: usize,
    rng: &mut Rng,
) -> Vec<Vec<usize>> {
    shuffle(order, rng);
    let mut batches: Vec<Vec<usize>> = Vec::new();
    for window in order.chunks_mut(batch * 16) {
        window.sort_by_key(|&i| ids[i].len());
        batches.extend(window.chunks(batch).map(<[usize]>::to_vec));
    }
    shuffle(&mut batches, rng);
    batches
}

/// Accuracy of `model` on `data`.
pub fn evaluate(
    model: &BertClassifier,
    enc: &crate::text::TextEncoder,
    data: &Encoded,
    batch: usize,
    dev: &Device,
) -> candle_core::Result<f64> {
    let mut right = 0usize;
    let idx: Vec<usize> = (0..data.ids.len()).collect();
    let mut idx = idx;
    // Sorted by length: evaluation order does not matter, padding does.
    idx.sort_by_key(|&i| data.ids[i].len());
    for c in idx.chunks(batch.max(1)) {
        let (ids, mask, y) = batch_tensors(enc, data, c, dev)?;
        let pred = model.forward(&ids, &mask, None)?.argmax(D::Minus1)?;
        let ok: Vec<u8> = pred.eq(&y)?.to_vec1()?;
        right += ok.iter().filter(|&&x| x == 1).count();
    }
    Ok(right as f64 / data.ids.len().max(1) as f64)
}

/// Trains one model and reports.
pub fn run<B: SliceBackend>(
    backend: B,
    cfg: &RunConfig,
    enc: &crate::text::TextEncoder,
    train: &Encoded,
    dev_set: &Encoded,
    progress: &ProgressBar,
) -> candle_core::Result<RunResult> {
    let device = cfg.device.clone();
    let bert_cfg: BertConfig =
        serde_json::from_slice(&std::fs::read(cfg.model_dir.join("config.json"))?)
            .map_err(candle_core::Error::wrap)?;
    let vm = VarMap::new();
    let mut model = BertClassifier::new(
        &bert_cfg,
        2,
        VarBuilder::from_varmap(&vm, DType::F32, &device),
    )?;
    model.freeze_embeddings = cfg.freeze_embeddings;
    let missing = load_pretrained(&vm, &cfg.model_dir.join("model.safetensors"), &device)?;
    let mut rng = Rng::new(cfg.seed);
    for (name, var) in named_vars(&vm, |n| missing.iter().any(|m| m == n)) {
        if !name.starts_with("classifier.") {
            return Err(candle_core::Error::Msg(format!(
                "`{name}` is not in the checkpoint"
            )));
        }
        init_var(&name, &var, &mut rng)?;
    }

    let steps_per_epoch = train.ids.len().div_ceil(cfg.batch);
    let total = (steps_per_epoch * cfg.epochs) as u64;
    let config = Config::reference(Algorithm::adamw(), cfg.lr)
        .beta0(cfg.beta0)
        .schedule(Schedule::WarmupLinearPpb {
            warmup: cfg.warmup,
            t_total: total,
        })
        .global_clip(1.0);
    let rules = if cfg.sage {
        GroupRules::authors(cfg.weight_decay)
    } else {
        GroupRules::authors_baseline(cfg.weight_decay)
    };
    let frozen = cfg.freeze_embeddings;
    let vars = named_vars(&vm, |n| !(frozen && n.starts_with("embeddings.")));
    let trained_params = vars.iter().map(|(_, v)| v.as_tensor().elem_count()).sum();
    let mut opt = SageOptimizer::with_backend(backend, vars, SageParams::new(config, rules))?;

    progress.set_length(total);
    progress.set_position(0);
    progress.set_style(
        ProgressStyle::with_template(
            "{prefix:>18} [{bar:30}] {pos}/{len} steps {elapsed_precise} eta {eta} {msg}",
        )
        .expect("valid template")
        .progress_chars("=> "),
    );
    progress.set_prefix(format!("{} seed {}", cfg.label(), cfg.seed));
    let (mut step_time, mut opt_time, mut fwd_time) =
        (Duration::ZERO, Duration::ZERO, Duration::ZERO);
    let (mut epoch_loss, mut epoch_dev_acc) = (Vec::new(), Vec::new());
    let mut order: Vec<usize> = (0..train.ids.len()).collect();
    for epoch in 0..cfg.epochs {
        let batches = length_buckets(&mut order, &train.ids, cfg.batch, &mut rng);
        let mut loss_sum = 0.0;
        for (i, c) in batches.iter().enumerate() {
            let t0 = Instant::now();
            let (ids, mask, y) = batch_tensors(enc, train, c, &device)?;
            let logits = model.forward(&ids, &mask, Some(&mut rng))?;
            let loss = candle_nn::loss::cross_entropy(&logits, &y)?;
            let tf = Instant::now();
            let grads = loss.backward()?;
            let t1 = Instant::now();
            fwd_time += tf - t0;
            opt.step_grads(&grads)?;
            let t2 = Instant::now();
            step_time += t2 - t0;
            opt_time += t2 - t1;
            let l = loss.to_scalar::<f32>()? as f64;
            loss_sum += l;
            progress.inc(1);
            if i % 4 == 0 {
                progress.set_message(format!(
                    "epoch {} loss {:.3}",
                    epoch + 1,
                    loss_sum / (i + 1) as f64
                ));
            }
        }
        epoch_loss.push(loss_sum / steps_per_epoch as f64);
        progress.set_message(format!("epoch {} dev...", epoch + 1));
        epoch_dev_acc.push(evaluate(&model, enc, dev_set, 64, &device)?);
    }

    // Sensitivity |θ·g| of the encoder's linear weights, averaged over a few batches without
    // dropout, for both optimizers alike (the paper's Figure 2).
    let weights = named_vars(&vm, |n| {
        n.starts_with("encoder.") && n.ends_with(".weight") && !n.contains("LayerNorm")
    });
    let mut sens: Vec<f32> = Vec::new();
    let probes = 4.min(steps_per_epoch);
    for c in order.chunks(cfg.batch).take(probes) {
        // `order` is the last epoch's shuffle: the probes see a fixed, seed-chosen sample.
        let (ids, mask, y) = batch_tensors(enc, train, c, &device)?;
        let grads =
            candle_nn::loss::cross_entropy(&model.forward(&ids, &mask, None)?, &y)?.backward()?;
        let mut k = 0;
        for (_, v) in &weights {
            let g = grads
                .get(v.as_tensor())
                .ok_or_else(|| candle_core::Error::Msg("no gradient".into()))?;
            let s: Vec<f32> = (v.as_tensor() * g)?.abs()?.flatten_all()?.to_vec1()?;
            if sens.len() < k + s.len() {
                sens.resize(k + s.len(), 0.0);
            }
            for (a, b) in sens[k..k + s.len()].iter_mut().zip(&s) {
                *a += b / probes as f32;
            }
            k += s.len();
        }
    }
    let steps = opt.steps();
    progress.finish_with_message(format!(
        "dev acc {:.2}%",
        100.0 * epoch_dev_acc.last().copied().unwrap_or(0.0)
    ));
    let n = total.max(1) as f64;
    Ok(RunResult {
        label: cfg.label().into(),
        seed: cfg.seed,
        lr: cfg.lr,
        beta0: cfg.sage.then_some(cfg.beta0),
        epoch_loss,
        epoch_dev_acc,
        steps,
        step_secs: step_time.as_secs_f64() / n,
        opt_secs: opt_time.as_secs_f64() / n,
        fwd_secs: fwd_time.as_secs_f64() / n,
        trained_params,
        sensitivity: sens,
    })
}
