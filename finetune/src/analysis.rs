//! The paper's claims 2 and 3 on a trained model, measured the same way for every optimizer:
//! the sensitivity |θ·g| of each encoder linear weight with `g` the gradient of the loss over
//! the *whole* training set (Appendix A.4.2 — not SAGE's Ī, which AdamW does not have), its
//! distribution (Figure 2), and one-shot pruning of the lowest-sensitivity weights (Figure 3).

use candle_core::{Device, Tensor, Var};
use sage_candle::bert::BertClassifier;

use crate::text::TextEncoder;
use crate::train::{batch_tensors, evaluate, Encoded};

/// log10 bin edges of the stored histogram: [`HIST_LO`, `HIST_HI`) in [`HIST_BINS`] bins
/// (values outside fall in the end bins; exact zeros are counted apart).
pub const HIST_LO: f64 = -14.0;
/// Upper end of the histogram's log10 range.
pub const HIST_HI: f64 = -2.0;
/// Bins of the histogram.
pub const HIST_BINS: usize = 96;

/// Pruning ratios of the paper's Figure 3.
pub const PRUNE_RATIOS: [f64; 5] = [0.0, 0.1, 0.2, 0.3, 0.4];

/// The names of the weights claims 2 and 3 look at: the encoder's linear weight matrices
/// (query, key, value, attention output, intermediate, output); embeddings, LayerNorms, biases
/// and the fresh classifier are left out (the paper excludes embeddings).
pub fn is_scored(name: &str) -> bool {
    name.starts_with("encoder.") && name.ends_with(".weight") && !name.contains("LayerNorm")
}

/// The distribution of the sensitivity scores of one model.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct SensitivitySummary {
    /// Parameters scored.
    pub count: usize,
    /// Mean of |θ·g|.
    pub mean: f64,
    /// Variance of |θ·g| (the paper's "lower variance" claim).
    pub variance: f64,
    /// Median of |θ·g|.
    pub median: f64,
    /// Scores that are exactly zero.
    pub zeros: usize,
    /// Counts of log10 |θ·g| in [`HIST_BINS`] bins over [`HIST_LO`, `HIST_HI`).
    pub log10_hist: Vec<u64>,
}

impl SensitivitySummary {
    /// Standard deviation over mean: the spread without the overall scale (a model whose
    /// gradients are all smaller has a smaller variance without being more concentrated).
    pub fn cv(&self) -> f64 {
        self.variance.sqrt() / self.mean
    }

    /// Summarizes `scores` (reordered in the process: the median is found in place).
    pub fn of(scores: &mut [f32]) -> Self {
        let n = scores.len();
        let mean = scores.iter().map(|&s| s as f64).sum::<f64>() / n.max(1) as f64;
        let variance = scores
            .iter()
            .map(|&s| (s as f64 - mean).powi(2))
            .sum::<f64>()
            / n.max(1) as f64;
        let mut hist = vec![0u64; HIST_BINS];
        let w = (HIST_HI - HIST_LO) / HIST_BINS as f64;
        let mut zeros = 0;
        for &s in scores.iter() {
            if s > 0.0 {
                let b = ((((s as f64).log10() - HIST_LO) / w).floor().max(0.0) as usize)
                    .min(HIST_BINS - 1);
                hist[b] += 1;
            } else {
                zeros += 1;
            }
        }
        let median = if n == 0 {
            0.0
        } else {
            *scores.select_nth_unstable_by(n / 2, f32::total_cmp).1 as f64
        };
        SensitivitySummary {
            count: n,
            mean,
            variance,
            median,
            zeros,
            log10_hist: hist,
        }
    }
}

/// Claims 2 and 3 for one trained model.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct Claims {
    /// The sensitivity distribution over the whole training set.
    pub sensitivity: SensitivitySummary,
    /// Accuracy on the report split after pruning each ratio of [`PRUNE_RATIOS`] (ratio,
    /// accuracy).
    pub pruning: Vec<(f64, f64)>,
}

/// |θ·ḡ| of every scored weight, `ḡ` the gradient of the mean loss over all of `train`
/// (dropout off), in the order of `weights` and their elements.
pub fn full_set_sensitivity(
    model: &BertClassifier,
    weights: &[(String, Var)],
    enc: &TextEncoder,
    train: &Encoded,
    batch: usize,
    dev: &Device,
) -> candle_core::Result<Vec<f32>> {
    let n = train.ids.len();
    let mut acc: Vec<Vec<f32>> = weights
        .iter()
        .map(|(_, v)| vec![0.0; v.as_tensor().elem_count()])
        .collect();
    let mut idx: Vec<usize> = (0..n).collect();
    // Sorted by length: the order does not change a sum's meaning, padding costs time.
    idx.sort_by_key(|&i| train.ids[i].len());
    for c in idx.chunks(batch.max(1)) {
        let (ids, mask, y) = batch_tensors(enc, train, c, dev)?;
        // The batch's mean loss weighted by its share: the sum over batches is the mean loss
        // over the whole set, so the gradients add up to the full-set gradient.
        let loss = (candle_nn::loss::cross_entropy(&model.forward(&ids, &mask, None)?, &y)?
            * (c.len() as f64 / n as f64))?;
        let grads = loss.backward()?;
        for ((name, v), a) in weights.iter().zip(&mut acc) {
            let g = grads
                .get(v.as_tensor())
                .ok_or_else(|| candle_core::Error::Msg(format!("no gradient for `{name}`")))?;
            let g: Vec<f32> = g.flatten_all()?.to_vec1()?;
            for (a, g) in a.iter_mut().zip(g) {
                *a += g;
            }
        }
    }
    let mut out = Vec::with_capacity(acc.iter().map(Vec::len).sum());
    for ((_, v), g) in weights.iter().zip(acc) {
        let theta: Vec<f32> = v.as_tensor().flatten_all()?.to_vec1()?;
        out.extend(theta.iter().zip(&g).map(|(t, g)| (t * g).abs()));
    }
    Ok(out)
}

/// Marks exactly `k` of `scores` (capped at their count): every score below the k-th lowest,
/// then scores equal to it in order. NaN sorts last (never pruned before a number).
pub fn lowest(scores: &[f32], k: usize) -> Vec<bool> {
    let k = k.min(scores.len());
    let mut out = vec![false; scores.len()];
    if k == 0 {
        return out;
    }
    let key = |s: f32| if s.is_nan() { f32::INFINITY } else { s };
    let mut sorted: Vec<f32> = scores.iter().map(|&s| key(s)).collect();
    let threshold = *sorted.select_nth_unstable_by(k - 1, f32::total_cmp).1;
    let mut ties = k - scores.iter().filter(|&&s| key(s) < threshold).count();
    for (o, &s) in out.iter_mut().zip(scores) {
        let s = key(s);
        if s < threshold {
            *o = true;
        } else if s == threshold && ties > 0 {
            *o = true;
            ties -= 1;
        }
    }
    out
}

/// One-shot unstructured pruning: for each ratio, zeros the scored weights whose `scores` are
/// the lowest `ratio` of all (one global threshold), evaluates on `report`, and puts the
/// weights back. `scores` are in the order [`full_set_sensitivity`] returns; `unpruned`, the
/// model's accuracy on `report` when already known, stands for ratio 0.
#[allow(clippy::too_many_arguments)]
pub fn pruning_curve(
    model: &BertClassifier,
    weights: &[(String, Var)],
    scores: &[f32],
    ratios: &[f64],
    enc: &TextEncoder,
    report: &Encoded,
    unpruned: Option<f64>,
    batch: usize,
    dev: &Device,
) -> candle_core::Result<Vec<(f64, f64)>> {
    let originals: Vec<Tensor> = weights
        .iter()
        .map(|(_, v)| v.as_tensor().copy())
        .collect::<candle_core::Result<_>>()?;
    // Host copies read once: every ratio masks the same original weights.
    let host: Vec<Vec<f32>> = originals
        .iter()
        .map(|t| t.flatten_all()?.to_vec1())
        .collect::<candle_core::Result<_>>()?;
    let mut curve = Vec::new();
    for &ratio in ratios {
        let k = ((ratio * scores.len() as f64).round() as usize).min(scores.len());
        if let (0, Some(acc)) = (k, unpruned) {
            curve.push((ratio, acc));
            continue;
        }
        if k > 0 {
            let prune = lowest(scores, k);
            let mut off = 0;
            for (((_, v), orig), w) in weights.iter().zip(&originals).zip(&host) {
                let len = w.len();
                let mut w = w.clone();
                for (w, &p) in w.iter_mut().zip(&prune[off..off + len]) {
                    if p {
                        *w = 0.0;
                    }
                }
                v.set(&Tensor::from_vec(w, orig.shape(), dev)?)?;
                off += len;
            }
        }
        curve.push((ratio, evaluate(model, enc, report, batch, dev)?));
        for ((_, v), orig) in weights.iter().zip(&originals) {
            v.set(orig)?;
        }
    }
    Ok(curve)
}

/// Claims 2 and 3 for `model`: the full-set sensitivity's summary and the pruning curve on
/// `report` (`unpruned`: the model's accuracy there, when already measured).
pub fn measure(
    model: &BertClassifier,
    weights: &[(String, Var)],
    enc: &TextEncoder,
    train: &Encoded,
    report: &Encoded,
    unpruned: Option<f64>,
    dev: &Device,
) -> candle_core::Result<Claims> {
    let mut scores = full_set_sensitivity(model, weights, enc, train, 64, dev)?;
    let pruning = pruning_curve(
        model,
        weights,
        &scores,
        &PRUNE_RATIOS,
        enc,
        report,
        unpruned,
        64,
        dev,
    )?;
    Ok(Claims {
        sensitivity: SensitivitySummary::of(&mut scores),
        pruning,
    })
}
