//! The paper's protocol (`--protocol paper`): per optimizer a rate grid (and a β0 grid for
//! SAGE) trained with the first seed and selected on the dev split, then every seed at the
//! selected setting reported on a held-out test split, SAGE against its baseline with a paired
//! t-test over seeds, and claims 2 and 3 measured on every model.
//!
//! Every finished run is appended to a journal (one JSON line); a rerun skips what the journal
//! holds and resumes an interrupted run from its last epoch's checkpoint.

use std::io::Write;
use std::path::{Path, PathBuf};

use crate::analysis::PRUNE_RATIOS;
use crate::stats::{mean_std, paired_t, PairedT};
use crate::train::{label, Family, RunResult};

/// The grid and the shared settings of a protocol run.
#[derive(Clone, Debug)]
pub struct Grid {
    /// Training-set sizes, in the order they run (0: the whole set).
    pub sizes: Vec<usize>,
    /// Optimizer families; each runs with and without SAGE.
    pub families: Vec<Family>,
    /// Base rates tried for every optimizer.
    pub rates: Vec<f64>,
    /// β0 values tried for SAGE.
    pub beta0s: Vec<f64>,
    /// Seeds of the report phase; the first also trains the selection grid.
    pub seeds: Vec<u64>,
    /// Epochs of every run.
    pub epochs: usize,
    /// Sentences per step.
    pub batch: usize,
    /// Tokens per sentence.
    pub max_len: usize,
    /// Warm-up fraction.
    pub warmup: f64,
    /// Weight decay.
    pub weight_decay: f64,
    /// Embeddings frozen.
    pub freeze: bool,
}

/// One planned run.
#[derive(Clone, Debug, PartialEq)]
pub struct Planned {
    /// "select" (the grid, first seed) or "report" (the selected setting, every other seed).
    pub phase: &'static str,
    /// Training sentences.
    pub size: usize,
    /// AdamW or Adamax.
    pub family: Family,
    /// With SAGE.
    pub sage: bool,
    /// Base rate.
    pub lr: f64,
    /// β0 (SAGE).
    pub beta0: Option<f64>,
    /// Seed.
    pub seed: u64,
}

impl Planned {
    /// The journal key: every setting that changes the result.
    pub fn key(&self, g: &Grid) -> String {
        format!(
            "n{}/{}/lr{:e}/b0{}/s{}/e{}/bs{}/len{}/wd{}/wu{}/{}",
            self.size,
            label(self.family, self.sage),
            self.lr,
            self.beta0.map_or("-".into(), |b| b.to_string()),
            self.seed,
            g.epochs,
            g.batch,
            g.max_len,
            g.weight_decay,
            g.warmup,
            if g.freeze { "frozen" } else { "trained" }
        )
    }

    /// "AdamW-SAGE" etc.
    pub fn label(&self) -> String {
        label(self.family, self.sage)
    }
}

/// A journal line: a finished run.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct Record {
    /// [`Planned::key`].
    pub key: String,
    /// "select" or "report".
    pub phase: String,
    /// Training sentences.
    pub size: usize,
    /// Wall-clock seconds of the run (the part after a resume, if it was resumed).
    pub seconds: f64,
    /// What the run measured.
    pub result: RunResult,
}

/// Reads the journal; a missing file is empty, and a last line cut short by an interruption
/// is ignored (any other bad line is an error naming it).
pub fn read_journal(path: &Path) -> Result<Vec<Record>, String> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(format!("{}: {e}", path.display())),
    };
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    let mut out = Vec::new();
    for (i, l) in lines.iter().enumerate() {
        match serde_json::from_str(l) {
            Ok(r) => out.push(r),
            Err(_) if i + 1 == lines.len() && !text.ends_with('\n') => break,
            Err(e) => return Err(format!("{} line {}: {e}", path.display(), i + 1)),
        }
    }
    Ok(out)
}

/// Appends one record as a line and syncs it to disk.
pub fn append_journal(path: &Path, r: &Record) -> Result<(), String> {
    let err = |e: std::io::Error| format!("{}: {e}", path.display());
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(err)?;
    }
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(err)?;
    let mut line = serde_json::to_string(r).map_err(|e| e.to_string())?;
    line.push('\n');
    f.write_all(line.as_bytes()).map_err(err)?;
    f.sync_all().map_err(err)
}

/// The selection grid of one size and family, first seed.
pub fn selection(g: &Grid, size: usize, family: Family) -> Vec<Planned> {
    let seed = g.seeds[0];
    let mut v = Vec::new();
    for &lr in &g.rates {
        v.push(Planned {
            phase: "select",
            size,
            family,
            sage: false,
            lr,
            beta0: None,
            seed,
        });
    }
    for &lr in &g.rates {
        for &b in &g.beta0s {
            v.push(Planned {
                phase: "select",
                size,
                family,
                sage: true,
                lr,
                beta0: Some(b),
                seed,
            });
        }
    }
    v
}

/// The chosen setting of one optimizer: the grid point with the best final dev accuracy with
/// the first seed (ties: the first in grid order); `None` until its whole grid is done.
pub fn selected(g: &Grid, grid: &[Planned], sage: bool, done: &[Record]) -> Option<Planned> {
    let mut best: Option<(f64, &Planned)> = None;
    for p in grid.iter().filter(|p| p.sage == sage) {
        let key = p.key(g);
        let r = done.iter().find(|r| r.key == key)?;
        let acc = r.result.epoch_dev_acc.last().copied().unwrap_or(0.0);
        if best.is_none_or(|(b, _)| acc > b) {
            best = Some((acc, p));
        }
    }
    best.map(|(_, p)| p.clone())
}

/// The report runs of one optimizer at its selected setting: every seed; the first seed's run
/// is the selection run itself (the same key), so it is not trained twice.
pub fn report_runs(g: &Grid, chosen: &Planned) -> Vec<Planned> {
    g.seeds
        .iter()
        .map(|&seed| Planned {
            phase: if seed == g.seeds[0] {
                "select"
            } else {
                "report"
            },
            seed,
            ..chosen.clone()
        })
        .collect()
}

/// Runs planned in total for the grid (selection plus the other seeds' report runs).
pub fn planned_count(g: &Grid) -> usize {
    let per_family = g.rates.len() * (1 + g.beta0s.len()) + 2 * (g.seeds.len() - 1);
    g.sizes.len() * g.families.len() * per_family
}

/// The comparison of one family at one size, from the journal.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Comparison {
    /// Training sentences.
    pub size: usize,
    /// AdamW or Adamax.
    pub family: Family,
    /// Selected (lr, β0) of the baseline and of SAGE, with their dev accuracy.
    pub chosen: [Option<(f64, Option<f64>, f64)>; 2],
    /// Test accuracy per seed (seeds in grid order) of the baseline and of SAGE.
    pub test: [Vec<(u64, f64)>; 2],
    /// Paired t-test of SAGE − baseline test accuracy over the seeds both have.
    pub accuracy_t: Option<PairedT>,
    /// Sensitivity variance per seed, baseline and SAGE.
    pub variance: [Vec<(u64, f64)>; 2],
    /// Paired t-test of log10 variance, SAGE − baseline.
    pub variance_t: Option<PairedT>,
    /// Sensitivity std/mean per seed, baseline and SAGE.
    pub cv: [Vec<(u64, f64)>; 2],
    /// Paired t-test of std/mean, SAGE − baseline.
    pub cv_t: Option<PairedT>,
    /// Mean pruning curve (ratio, accuracy) over the seeds, baseline and SAGE.
    pub pruning: [Vec<(f64, f64)>; 2],
    /// Runs done out of planned for this family and size.
    pub runs_done: usize,
    /// Runs planned.
    pub runs_planned: usize,
}

fn paired(a: &[(u64, f64)], b: &[(u64, f64)]) -> Option<PairedT> {
    let (mut x, mut y) = (Vec::new(), Vec::new());
    for (s, va) in a {
        if let Some((_, vb)) = b.iter().find(|(t, _)| t == s) {
            x.push(*va);
            y.push(*vb);
        }
    }
    paired_t(&x, &y)
}

/// Compares SAGE with its baseline for `family` at `size` from the journal `done`.
pub fn compare(g: &Grid, size: usize, family: Family, done: &[Record]) -> Comparison {
    let grid = selection(g, size, family);
    let mut c = Comparison {
        size,
        family,
        chosen: [None, None],
        test: [Vec::new(), Vec::new()],
        accuracy_t: None,
        variance: [Vec::new(), Vec::new()],
        variance_t: None,
        cv: [Vec::new(), Vec::new()],
        cv_t: None,
        pruning: [Vec::new(), Vec::new()],
        runs_done: 0,
        runs_planned: grid.len() + 2 * (g.seeds.len() - 1),
    };
    let mut keys: Vec<String> = grid.iter().map(|p| p.key(g)).collect();
    for (k, sage) in [false, true].into_iter().enumerate() {
        let Some(chosen) = selected(g, &grid, sage, done) else {
            continue;
        };
        let dev = done
            .iter()
            .find(|r| r.key == chosen.key(g))
            .and_then(|r| r.result.epoch_dev_acc.last().copied())
            .unwrap_or(0.0);
        c.chosen[k] = Some((chosen.lr, chosen.beta0, dev));
        let mut curves: Vec<&Vec<(f64, f64)>> = Vec::new();
        for p in report_runs(g, &chosen) {
            let key = p.key(g);
            if !keys.contains(&key) {
                keys.push(key.clone());
            }
            let Some(r) = done.iter().find(|r| r.key == key) else {
                continue;
            };
            if let Some(t) = r.result.test_acc {
                c.test[k].push((p.seed, t));
            }
            if let Some(cl) = &r.result.claims {
                c.variance[k].push((p.seed, cl.sensitivity.variance));
                c.cv[k].push((p.seed, cl.sensitivity.cv()));
                curves.push(&cl.pruning);
            }
        }
        c.pruning[k] = PRUNE_RATIOS
            .iter()
            .enumerate()
            .map(|(i, &ratio)| {
                let v: Vec<f64> = curves
                    .iter()
                    .filter_map(|c| c.get(i))
                    .map(|p| p.1)
                    .collect();
                (ratio, mean_std(&v).0)
            })
            .collect();
    }
    c.runs_done = keys
        .iter()
        .filter(|k| done.iter().any(|r| &r.key == *k))
        .count();
    c.accuracy_t = paired(&c.test[0], &c.test[1]);
    let log = |v: &[(u64, f64)]| -> Vec<(u64, f64)> {
        v.iter()
            .map(|&(s, x)| (s, x.max(f64::MIN_POSITIVE).log10()))
            .collect()
    };
    c.variance_t = paired(&log(&c.variance[0]), &log(&c.variance[1]));
    c.cv_t = paired(&c.cv[0], &c.cv[1]);
    c
}

/// The protocol's markdown report from the journal (partial while runs are missing).
pub fn report_markdown(g: &Grid, done: &[Record], machine: &str) -> String {
    let mut s = String::new();
    let pct = |x: f64| format!("{:.2}", 100.0 * x);
    s.push_str(&format!(
        "Grid: rates {:?}, SAGE β0 {:?}, seeds {:?}, {} epochs of batch {}, max {} tokens, \
         warm-up {}, weight decay {}, embeddings {}. Machine: {machine}.\n\n",
        g.rates,
        g.beta0s,
        g.seeds,
        g.epochs,
        g.batch,
        g.max_len,
        g.warmup,
        g.weight_decay,
        if g.freeze { "frozen" } else { "trained" }
    ));
    for &size in &g.sizes {
        for &family in &g.families {
            let c = compare(g, size, family, done);
            let names = [label(family, false), label(family, true)];
            // Size 0 is the whole training pool (its count needs the data; the report may not).
            let sentences = match size {
                0 => "all".to_string(),
                n => n.to_string(),
            };
            s.push_str(&format!(
                "### {} vs {} — {} training sentences ({} of {} runs done)\n\n",
                names[1], names[0], sentences, c.runs_done, c.runs_planned
            ));
            // The selection grid: dev accuracy of every grid point.
            s.push_str("Selection (seed ");
            s.push_str(&g.seeds[0].to_string());
            s.push_str(
                ", dev split, last epoch; test accuracy and claims of the same model, for \
                 reading only — selection never looks at them):\n\n\
                 | optimizer | lr | β0 | dev accuracy | test accuracy | sensitivity variance | \
                 std/mean | test accuracy pruned 10/20/30/40% | minutes |\n\
                 |---|---|---|---|---|---|---|---|---|\n",
            );
            for p in selection(g, size, family) {
                let key = p.key(g);
                let head = format!(
                    "| {} | {:e} | {} |",
                    p.label(),
                    p.lr,
                    p.beta0.map_or("–".into(), |b| b.to_string())
                );
                let Some(r) = done.iter().find(|r| r.key == key) else {
                    s.push_str(&format!("{head} (not run yet) | | | | | |\n"));
                    continue;
                };
                let cl = r.result.claims.as_ref();
                s.push_str(&format!(
                    "{head} {} | {} | {} | {} | {} | {:.1} |\n",
                    r.result
                        .epoch_dev_acc
                        .last()
                        .map_or("–".into(), |&a| pct(a)),
                    r.result.test_acc.map_or("–".into(), pct),
                    cl.map_or("–".into(), |c| format!("{:.3e}", c.sensitivity.variance)),
                    cl.map_or("–".into(), |c| format!("{:.2}", c.sensitivity.cv())),
                    cl.map_or("–".into(), |c| c
                        .pruning
                        .iter()
                        .skip(1)
                        .map(|p| format!("{:.1}", 100.0 * p.1))
                        .collect::<Vec<_>>()
                        .join(" / ")),
                    r.seconds / 60.0
                ));
            }
            s.push_str("\nReport (test split, selected setting, every seed):\n\n");
            s.push_str("| optimizer | selected lr | β0 | test accuracy (mean ± std) | per seed | sensitivity variance (mean) | std/mean (mean) | pruned 0/10/20/30/40% (mean test accuracy) |\n|---|---|---|---|---|---|---|---|\n");
            for (k, name) in names.iter().enumerate() {
                let Some((lr, b0, _)) = c.chosen[k] else {
                    s.push_str(&format!("| {name} | (grid not done) | | | | | | |\n"));
                    continue;
                };
                let acc: Vec<f64> = c.test[k].iter().map(|x| 100.0 * x.1).collect();
                let (m, sd) = mean_std(&acc);
                let var: Vec<f64> = c.variance[k].iter().map(|x| x.1).collect();
                s.push_str(&format!(
                    "| {name} | {lr:e} | {} | {m:.2} ± {sd:.2} (n = {}) | {} | {:.3e} | {:.2} | {} |\n",
                    b0.map_or("–".into(), |b| b.to_string()),
                    acc.len(),
                    c.test[k]
                        .iter()
                        .map(|(sd, a)| format!("{sd}: {:.1}", 100.0 * a))
                        .collect::<Vec<_>>()
                        .join(", "),
                    mean_std(&var).0,
                    mean_std(&c.cv[k].iter().map(|x| x.1).collect::<Vec<_>>()).0,
                    c.pruning[k]
                        .iter()
                        .map(|p| format!("{:.1}", 100.0 * p.1))
                        .collect::<Vec<_>>()
                        .join(" / ")
                ));
            }
            let t = |t: &Option<PairedT>, unit: &str, scale: f64| match t {
                Some(t) => format!(
                    "{:+.3}{unit} over {} paired seeds, t = {:.2}, p = {:.3}",
                    scale * t.mean_diff,
                    t.n,
                    t.t,
                    t.p
                ),
                None => "not enough paired seeds yet".into(),
            };
            s.push_str(&format!(
                "\n- Claim 1 (test accuracy), {1} − {0}: {2}.\n\
                 - Claim 2 (log10 sensitivity variance), {1} − {0}: {3}.\n\
                 - Claim 2, scale removed (sensitivity std/mean), {1} − {0}: {4}.\n\
                 - Claim 3 (test accuracy pruned 40% minus unpruned), {1}: {5}; {0}: {6}.\n\n",
                names[0],
                names[1],
                t(&c.accuracy_t, " points", 100.0),
                t(&c.variance_t, "", 1.0),
                t(&c.cv_t, "", 1.0),
                drop40(&c.pruning[1]),
                drop40(&c.pruning[0]),
            ));
        }
    }
    s
}

/// "−x.xx points" from a mean pruning curve's first to last point (at 40%).
fn drop40(curve: &[(f64, f64)]) -> String {
    match (curve.first(), curve.last()) {
        (Some(a), Some(b)) if curve.len() > 1 => {
            format!("{:+.2} points at {:.0}%", 100.0 * (b.1 - a.1), 100.0 * b.0)
        }
        _ => "not measured yet".into(),
    }
}

/// Where the checkpoint of an unfinished run lives.
pub fn checkpoint_dir(root: &Path, key: &str) -> PathBuf {
    root.join(key.replace(['/', '.', '+'], "_"))
}
