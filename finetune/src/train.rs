//! One fine-tuning run: the pretrained encoder, a fresh classifier, AdamW or AdamW-SAGE.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use candle_core::{DType, Device, Tensor, D};
use candle_nn::{VarBuilder, VarMap};
use indicatif::{ProgressBar, ProgressStyle};
use sage_candle::bert::{init_var, load_pretrained, BertClassifier, BertConfig, Rng};
use sage_candle::{named_vars, GroupRules, SageOptimizer, SageParams, SliceBackend};
use sage_core::{Algorithm, Config, Schedule};

use crate::analysis::{self, Claims};
use crate::data::shuffle;

/// Sentences as token ids with their labels.
pub struct Encoded {
    /// Token ids per sentence.
    pub ids: Vec<Vec<u32>>,
    /// Labels.
    pub labels: Vec<u32>,
}

/// The optimizer family of a run: the authors' two (each with and without SAGE).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Family {
    /// `UnstructAwareAdamW` (AdamW, decoupled weight decay).
    AdamW,
    /// `UnstructAwareAdamax` (Adamax, the infinity-norm Adam).
    Adamax,
}

impl Family {
    /// "AdamW" or "Adamax".
    pub fn name(self) -> &'static str {
        match self {
            Family::AdamW => "AdamW",
            Family::Adamax => "Adamax",
        }
    }

    /// The sage-core algorithm.
    pub fn algorithm(self) -> Algorithm {
        match self {
            Family::AdamW => Algorithm::adamw(),
            Family::Adamax => Algorithm::adamax(),
        }
    }

    /// Parses "adamw" or "adamax" (any case).
    pub fn parse(s: &str) -> Option<Self> {
        match s.to_ascii_lowercase().as_str() {
            "adamw" => Some(Family::AdamW),
            "adamax" => Some(Family::Adamax),
            _ => None,
        }
    }
}

/// The settings of one run.
#[derive(Clone, Debug)]
pub struct RunConfig {
    /// AdamW or Adamax.
    pub family: Family,
    /// SAGE on the encoder's linear layers (the authors' split), or the plain optimizer.
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
    /// Evaluate on the dev set after every epoch (else after the last only).
    pub eval_every_epoch: bool,
    /// Measure claims 2 and 3 (full-set sensitivity, pruning curve) after training.
    pub claims: bool,
    /// Leave after this many epochs (checkpoint written): a slice of a long run that the next
    /// call with the same checkpoint resumes; the result then covers the epochs done so far.
    pub stop_after: Option<usize>,
    /// Where to keep a checkpoint after each epoch (trained variables, optimizer state through
    /// sage-checkpoint, progress): a run that finds one resumes after its epoch.
    pub checkpoint: Option<PathBuf>,
}

impl RunConfig {
    /// "AdamW", "AdamW-SAGE", "Adamax" or "Adamax-SAGE".
    pub fn label(&self) -> String {
        label(self.family, self.sage)
    }
}

/// "AdamW", "AdamW-SAGE", "Adamax" or "Adamax-SAGE".
pub fn label(family: Family, sage: bool) -> String {
    if sage {
        format!("{}-SAGE", family.name())
    } else {
        family.name().to_string()
    }
}

/// What a run measured.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct RunResult {
    /// "AdamW", "AdamW-SAGE", "Adamax" or "Adamax-SAGE".
    pub label: String,
    /// The seed.
    pub seed: u64,
    /// Base rate.
    pub lr: f64,
    /// β0 (SAGE runs).
    pub beta0: Option<f64>,
    /// Training sentences.
    pub train_size: usize,
    /// Mean training loss of each epoch.
    pub epoch_loss: Vec<f64>,
    /// Dev accuracy after each epoch (the last only, when the run evaluated only at the end).
    pub epoch_dev_acc: Vec<f64>,
    /// Accuracy on the report split after training (when one was given).
    pub test_acc: Option<f64>,
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
    /// Claims 2 and 3 measured on the trained model (when asked for).
    pub claims: Option<Claims>,
}

/// Progress kept beside a run's checkpoint.
#[derive(serde::Serialize, serde::Deserialize)]
struct Progress {
    epochs_done: usize,
    epoch_loss: Vec<f64>,
    epoch_dev_acc: Vec<f64>,
    step_secs: f64,
    opt_secs: f64,
    fwd_secs: f64,
}

/// Token ids, attention mask and labels of the sentences `idx` of `data`.
pub fn batch_tensors(
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

/// The generator of epoch `epoch` (dropout and batch order): derived from the seed and the
/// epoch alone, so a run resumed after an epoch continues exactly as an uninterrupted one.
fn epoch_rng(seed: u64, epoch: usize) -> Rng {
    let mut r = Rng::new(seed ^ (epoch as u64 + 1).wrapping_mul(0xD6E8_FEB8_6659_FD93));
    r.next_u64();
    r
}

fn io_err(path: &Path, e: impl std::fmt::Display) -> candle_core::Error {
    candle_core::Error::Msg(format!("{}: {e}", path.display()))
}

/// Loads the newest checkpoint in `dir` into the variables and the optimizer.
fn resume<B: SliceBackend>(
    dir: &Path,
    vars: &[(String, candle_core::Var)],
    opt: &mut SageOptimizer<B>,
    device: &Device,
) -> candle_core::Result<Option<Progress>> {
    let path = dir.join("progress.json");
    let Ok(bytes) = std::fs::read(&path) else {
        return Ok(None);
    };
    let p: Progress = serde_json::from_slice(&bytes).map_err(|e| io_err(&path, e))?;
    let e = p.epochs_done;
    let saved = candle_core::safetensors::load(dir.join(format!("vars-e{e}.safetensors")), device)?;
    for (name, var) in vars {
        let t = saved
            .get(name)
            .ok_or_else(|| io_err(dir, format!("checkpoint has no `{name}`")))?;
        var.set(t)?;
    }
    opt.load_state(dir.join(format!("optimizer-e{e}.sage")))?;
    Ok(Some(p))
}

/// Writes epoch `p.epochs_done`'s checkpoint, then drops the previous one: the progress file
/// names the epoch whose files are complete, so a crash at any point leaves a usable one.
fn save_checkpoint<B: SliceBackend>(
    dir: &Path,
    vars: &[(String, candle_core::Var)],
    opt: &mut SageOptimizer<B>,
    p: &Progress,
) -> candle_core::Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| io_err(dir, e))?;
    let e = p.epochs_done;
    let tensors: std::collections::HashMap<String, Tensor> = vars
        .iter()
        .map(|(n, v)| (n.clone(), v.as_tensor().clone()))
        .collect();
    candle_core::safetensors::save(&tensors, dir.join(format!("vars-e{e}.safetensors")))?;
    opt.save_state(dir.join(format!("optimizer-e{e}.sage")))?;
    let path = dir.join("progress.json");
    let tmp = dir.join("progress.json.tmp");
    let json = serde_json::to_vec(p).map_err(|e| io_err(&path, e))?;
    std::fs::write(&tmp, json).map_err(|e| io_err(&tmp, e))?;
    std::fs::rename(&tmp, &path).map_err(|e| io_err(&path, e))?;
    if e > 0 {
        let _ = std::fs::remove_file(dir.join(format!("vars-e{}.safetensors", e - 1)));
        let _ = std::fs::remove_file(dir.join(format!("optimizer-e{}.sage", e - 1)));
    }
    Ok(())
}

/// The held-out sets a run evaluates on.
pub struct EvalSets<'a> {
    /// Evaluated after every epoch (selection).
    pub dev: &'a Encoded,
    /// Evaluated once after training, and the split the pruning curve is measured on; `None`:
    /// the dev set serves.
    pub report: Option<&'a Encoded>,
}

/// Trains one model and reports.
pub fn run<B: SliceBackend>(
    backend: B,
    cfg: &RunConfig,
    enc: &crate::text::TextEncoder,
    train: &Encoded,
    sets: EvalSets<'_>,
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
    let mut init_rng = Rng::new(cfg.seed);
    for (name, var) in named_vars(&vm, |n| missing.iter().any(|m| m == n)) {
        if !name.starts_with("classifier.") {
            return Err(candle_core::Error::Msg(format!(
                "`{name}` is not in the checkpoint"
            )));
        }
        init_var(&name, &var, &mut init_rng)?;
    }

    let steps_per_epoch = train.ids.len().div_ceil(cfg.batch);
    let total = (steps_per_epoch * cfg.epochs) as u64;
    let config = Config::reference(cfg.family.algorithm(), cfg.lr)
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
    let mut opt =
        SageOptimizer::with_backend(backend, vars.clone(), SageParams::new(config, rules))?;

    let mut done = Progress {
        epochs_done: 0,
        epoch_loss: Vec::new(),
        epoch_dev_acc: Vec::new(),
        step_secs: 0.0,
        opt_secs: 0.0,
        fwd_secs: 0.0,
    };
    if let Some(dir) = &cfg.checkpoint {
        if let Some(p) = resume(dir, &vars, &mut opt, &device)? {
            done = p;
        }
    }

    progress.set_length(total);
    progress.set_position((steps_per_epoch * done.epochs_done) as u64);
    progress.set_style(
        ProgressStyle::with_template(
            "{prefix:>24} [{bar:30}] {pos}/{len} steps {elapsed_precise} eta {eta} {msg}",
        )
        .expect("valid template")
        .progress_chars("=> "),
    );
    progress.set_prefix(format!("{} seed {}", cfg.label(), cfg.seed));
    let (mut step_time, mut opt_time, mut fwd_time) = (
        Duration::from_secs_f64(done.step_secs),
        Duration::from_secs_f64(done.opt_secs),
        Duration::from_secs_f64(done.fwd_secs),
    );
    let mut stopped = false;
    for epoch in done.epochs_done..cfg.epochs {
        let mut rng = epoch_rng(cfg.seed, epoch);
        let mut order: Vec<usize> = (0..train.ids.len()).collect();
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
        done.epoch_loss.push(loss_sum / steps_per_epoch as f64);
        if cfg.eval_every_epoch || epoch + 1 == cfg.epochs {
            progress.set_message(format!("epoch {} dev...", epoch + 1));
            done.epoch_dev_acc
                .push(evaluate(&model, enc, sets.dev, 64, &device)?);
        }
        done.epochs_done = epoch + 1;
        done.step_secs = step_time.as_secs_f64();
        done.opt_secs = opt_time.as_secs_f64();
        done.fwd_secs = fwd_time.as_secs_f64();
        let stop = cfg.stop_after.is_some_and(|n| epoch + 1 >= n) && epoch + 1 < cfg.epochs;
        if let Some(dir) = &cfg.checkpoint {
            if epoch + 1 < cfg.epochs {
                save_checkpoint(dir, &vars, &mut opt, &done)?;
            }
        }
        if stop {
            stopped = true;
            break;
        }
    }

    let report = sets.report.unwrap_or(sets.dev);
    // A run stopped part-way is measured when it finishes.
    let test_acc = match sets.report.filter(|_| !stopped) {
        Some(r) => {
            progress.set_message("test...");
            Some(evaluate(&model, enc, r, 64, &device)?)
        }
        None => None,
    };
    let claims = if cfg.claims && !stopped {
        progress.set_message("sensitivity over the training set, pruning...");
        let weights = named_vars(&vm, analysis::is_scored);
        // The unpruned accuracy on the report split is known already.
        let unpruned = test_acc.or(done.epoch_dev_acc.last().copied());
        Some(analysis::measure(
            &model, &weights, enc, train, report, unpruned, &device,
        )?)
    } else {
        None
    };
    let steps = opt.steps();
    progress.finish_with_message(format!(
        "dev acc {:.2}%",
        100.0 * done.epoch_dev_acc.last().copied().unwrap_or(0.0)
    ));
    let n = total.max(1) as f64;
    Ok(RunResult {
        label: cfg.label(),
        seed: cfg.seed,
        lr: cfg.lr,
        beta0: cfg.sage.then_some(cfg.beta0),
        train_size: train.ids.len(),
        epoch_loss: done.epoch_loss,
        epoch_dev_acc: done.epoch_dev_acc,
        test_acc,
        steps,
        step_secs: done.step_secs / n,
        opt_secs: done.opt_secs / n,
        fwd_secs: done.fwd_secs / n,
        trained_params,
        claims,
    })
}
