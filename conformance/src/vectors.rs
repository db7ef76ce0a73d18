//! Golden trajectories (`sage-vectors/1`, see `vectors/FORMAT.md`): reading them and replaying
//! them on a backend.

use std::path::{Path, PathBuf};

use sage_core::{Algorithm, Config, DecayMode, Optimizer, ParamGroup, Schedule};
use serde::Deserialize;

use crate::failure::{Failure, Worst};
use crate::harness::Harness;
use crate::model::{backend_failure, Model};

/// The directory of the project's own copy of the vectors.
pub fn default_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("vectors")
}

/// One trajectory file.
#[derive(Clone, Debug, Deserialize)]
pub struct VectorFile {
    /// Must be `sage-vectors/1`.
    pub format: String,
    /// Name of the run.
    pub name: String,
    /// `reference` or `paper`.
    #[serde(default)]
    pub source: String,
    /// The optimizer's settings.
    pub optimizer: OptimizerSpec,
    /// Parameter groups.
    pub groups: Vec<GroupSpec>,
    /// Tensors with their initial values.
    pub tensors: Vec<TensorSpec>,
    /// Gradients fed and parameters expected, per step.
    pub steps: Vec<StepSpec>,
    /// Allowed error.
    pub tolerance: Tolerance,
}

/// The `optimizer` object.
#[derive(Clone, Debug, Deserialize)]
#[allow(missing_docs)]
pub struct OptimizerSpec {
    pub algorithm: String,
    pub preset: String,
    pub lr: f64,
    #[serde(default)]
    pub betas: Option<[f64; 2]>,
    #[serde(default)]
    pub momentum: Option<f64>,
    pub beta0: f64,
    pub eps: f64,
    pub bias_correction: bool,
    pub schedule: ScheduleSpec,
    #[serde(default)]
    pub per_tensor_clip: Option<f64>,
    #[serde(default)]
    pub global_clip: Option<f64>,
    #[serde(default)]
    pub weight_decay_mode: Option<String>,
}

/// The `schedule` object.
#[derive(Clone, Debug, Deserialize)]
#[allow(missing_docs)]
pub struct ScheduleSpec {
    pub kind: String,
    #[serde(default)]
    pub warmup: Option<f64>,
    /// A number: recorders write `20` or `20.0`, and `-1` for the authors' "no schedule".
    #[serde(default)]
    pub t_total: Option<f64>,
}

/// One group.
#[derive(Clone, Debug, Deserialize)]
#[allow(missing_docs)]
pub struct GroupSpec {
    pub sage: bool,
    pub weight_decay: f64,
    pub tensors: Vec<usize>,
}

/// One tensor.
#[derive(Clone, Debug, Deserialize)]
#[allow(missing_docs)]
pub struct TensorSpec {
    pub shape: Vec<usize>,
    pub init: Vec<f32>,
}

/// One step.
#[derive(Clone, Debug, Deserialize)]
#[allow(missing_docs)]
pub struct StepSpec {
    /// `None`: the tensor has no gradient at this step (FORMAT.md) and is left out of it.
    pub grads: Vec<Option<Vec<f32>>>,
    pub params: Vec<Vec<f64>>,
}

/// Element tolerance: `|a − e| ≤ abs + rel·|e|`.
#[derive(Clone, Copy, Debug, Deserialize)]
#[allow(missing_docs)]
pub struct Tolerance {
    pub rel: f64,
    pub abs: f64,
}

impl VectorFile {
    /// Reads and checks a file; errors name the file and the problem.
    pub fn load(path: &Path) -> Result<Self, Failure> {
        let check = format!("vectors {}", path.display());
        let text = std::fs::read_to_string(path)
            .map_err(|e| Failure::new(&check, format!("cannot read: {e}")))?;
        let f: VectorFile = serde_json::from_str(&text)
            .map_err(|e| Failure::new(&check, format!("not a sage-vectors/1 file: {e}")))?;
        f.validate().map_err(|d| Failure::new(&check, d))?;
        Ok(f)
    }

    fn validate(&self) -> Result<(), String> {
        if self.format != "sage-vectors/1" {
            return Err(format!("unknown format `{}`", self.format));
        }
        let n = self.tensors.len();
        for (i, t) in self.tensors.iter().enumerate() {
            let len: usize = t.shape.iter().product();
            if len != t.init.len() {
                return Err(format!(
                    "tensor {i}: shape {:?} has {len} elements, init has {}",
                    t.shape,
                    t.init.len()
                ));
            }
        }
        let mut seen = vec![false; n];
        for (gi, g) in self.groups.iter().enumerate() {
            for &t in &g.tensors {
                if t >= n || seen[t] {
                    return Err(format!("group {gi}: tensor {t} unknown or in two groups"));
                }
                seen[t] = true;
            }
        }
        if let Some(t) = seen.iter().position(|s| !s) {
            return Err(format!("tensor {t} is in no group"));
        }
        for (si, s) in self.steps.iter().enumerate() {
            // An absent gradient matches any tensor.
            let grad_lens = s.grads.iter().zip(&self.tensors);
            for (what, lens) in [
                (
                    "grads",
                    grad_lens
                        .map(|(g, t)| g.as_ref().map_or(t.init.len(), Vec::len))
                        .collect::<Vec<_>>(),
                ),
                ("params", s.params.iter().map(Vec::len).collect()),
            ] {
                if lens.len() != n
                    || (what == "grads" && s.grads.len() != n)
                    || lens
                        .iter()
                        .zip(&self.tensors)
                        .any(|(l, t)| *l != t.init.len())
                {
                    return Err(format!(
                        "step {}: `{what}` do not match the tensors",
                        si + 1
                    ));
                }
            }
        }
        Ok(())
    }

    /// The optimizer configuration the file describes.
    pub fn config(&self) -> Result<Config, String> {
        let o = &self.optimizer;
        let betas = || {
            o.betas
                .ok_or_else(|| format!("`betas` missing for {}", o.algorithm))
        };
        let algorithm = match o.algorithm.as_str() {
            "sgd" => Algorithm::sgd(o.momentum.unwrap_or(0.0)),
            "adam" => {
                let [beta1, beta2] = betas()?;
                Algorithm::Adam { beta1, beta2 }
            }
            "adamw" => {
                let [beta1, beta2] = betas()?;
                Algorithm::AdamW { beta1, beta2 }
            }
            "adamax" => {
                let [beta1, beta2] = betas()?;
                Algorithm::Adamax { beta1, beta2 }
            }
            a => return Err(format!("unknown algorithm `{a}`")),
        };
        let base = match o.preset.as_str() {
            "paper" => Config::paper(algorithm, o.lr),
            "reference" => Config::reference(algorithm, o.lr),
            p => return Err(format!("unknown preset `{p}`")),
        };
        let schedule = match o.schedule.kind.as_str() {
            // Whatever else it carries (`t_total: -1`, `warmup: -1`) means nothing here.
            "constant" => Schedule::Constant,
            // The authors' optimizers schedule only when `t_total != -1`.
            "warmup_linear_ppb" if o.schedule.t_total == Some(-1.0) => Schedule::Constant,
            "warmup_linear_ppb" => {
                let warmup = o.schedule.warmup.ok_or("schedule.warmup missing")?;
                let t_total = o.schedule.t_total.ok_or("schedule.t_total missing")?;
                if !(t_total >= 1.0 && t_total.fract() == 0.0 && t_total < 2f64.powi(53)) {
                    return Err(format!(
                        "schedule.t_total: {t_total} is not a whole number of steps >= 1"
                    ));
                }
                Schedule::WarmupLinearPpb {
                    // The authors' "no warm-up" is -1 (their default): `x < w` never holds
                    // for a negative w, exactly as for w = 0.
                    warmup: if warmup < 0.0 { 0.0 } else { warmup },
                    t_total: t_total as u64,
                }
            }
            k => return Err(format!("unknown schedule `{k}`")),
        };
        // The authors' Adamax has no bias correction anywhere (SAGE.md): a reference file's
        // flag cannot change its trajectory, whatever the recorder wrote.
        let reference_adamax = o.preset == "reference" && o.algorithm == "adamax";
        let mut cfg = base
            .beta0(o.beta0)
            .eps(o.eps)
            .bias_correction(o.bias_correction && !reference_adamax)
            .schedule(schedule);
        cfg.global_clip = o.global_clip;
        cfg.per_tensor_clip = o.per_tensor_clip;
        if let Some(mode) = &o.weight_decay_mode {
            cfg.decay = match mode.as_str() {
                "l2" => DecayMode::L2,
                "decoupled" => DecayMode::Decoupled,
                m => return Err(format!("unknown weight_decay_mode `{m}`")),
            };
        }
        cfg.validate().map_err(|e| e.to_string())?;
        Ok(cfg)
    }

    /// Groups, and the group of each tensor.
    pub fn groups(&self) -> (Vec<ParamGroup>, Vec<usize>) {
        let mut group_of = vec![0; self.tensors.len()];
        let groups = self
            .groups
            .iter()
            .enumerate()
            .map(|(gi, g)| {
                for &t in &g.tensors {
                    group_of[t] = gi;
                }
                ParamGroup {
                    sage: g.sage,
                    weight_decay: g.weight_decay,
                    lr_scale: 1.0,
                }
            })
            .collect();
        (groups, group_of)
    }
}

/// Every `*.json` file in `dir`, sorted by name.
pub fn files_in(dir: &Path) -> Result<Vec<PathBuf>, Failure> {
    let rd = std::fs::read_dir(dir)
        .map_err(|e| Failure::new("vectors", format!("cannot list {}: {e}", dir.display())))?;
    let mut out: Vec<PathBuf> = rd
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "json"))
        .collect();
    out.sort();
    if out.is_empty() {
        return Err(Failure::new(
            "vectors",
            format!("no *.json files in {}", dir.display()),
        ));
    }
    Ok(out)
}

/// Replays one trajectory (f32 parameters and state) on `b`, checking every element after
/// every step.
pub fn replay<B: Harness>(b: &mut B, file: &VectorFile) -> Result<(), Failure> {
    replay_worst(b, file).map(|_| ())
}

/// [`replay`], returning the worst element seen (its error as a multiple of the tolerance).
pub fn replay_worst<B: Harness>(b: &mut B, file: &VectorFile) -> Result<Worst, Failure> {
    let check = format!("vectors {}", file.name);
    let cfg = file.config().map_err(|e| Failure::new(&check, e))?;
    let (groups, group_of) = file.groups();
    let init: Vec<Vec<f32>> = file.tensors.iter().map(|t| t.init.clone()).collect();
    let mut model = Model::<B, f32, f32>::new(b, &cfg, &groups, &init, &group_of)?;
    let mut opt =
        Optimizer::new(b.clone(), cfg, groups).map_err(|e| Failure::new(&check, e.to_string()))?;
    let tol = file.tolerance;
    let mut worst = Worst::default();
    for (si, st) in file.steps.iter().enumerate() {
        let report = model
            .step_present(&mut opt, &st.grads)
            .map_err(|e| Failure::new(&check, format!("step {}: {e}", si + 1)))?;
        if !report.applied() {
            return Err(Failure::new(&check, format!("step {} was skipped", si + 1)));
        }
        let got = model
            .read_params(opt.backend_mut())
            .map_err(|e| backend_failure(&check, e))?;
        for (ti, (a, e)) in got.iter().zip(&st.params).enumerate() {
            for (j, (&a, &e)) in a.iter().zip(e).enumerate() {
                worst.see(a as f64, e, tol.abs, tol.rel, || {
                    format!("step {} tensor {ti} [{j}]", si + 1)
                });
            }
        }
        if !worst.ok() {
            break;
        }
    }
    if worst.ok() {
        Ok(worst)
    } else {
        Err(worst.failure(&check))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A one-tensor reference file of `algorithm` with the given flag and schedule object.
    fn file(algorithm: &str, bias: bool, schedule: &str) -> VectorFile {
        let betas = if algorithm == "sgd" {
            ""
        } else {
            r#""betas": [0.9, 0.999],"#
        };
        let text = format!(
            r#"{{"format": "sage-vectors/1", "name": "t", "source": "reference",
                "optimizer": {{"algorithm": "{algorithm}", "preset": "reference", "lr": 0.002,
                  {betas} "beta0": 0.75, "eps": 1e-6, "bias_correction": {bias},
                  "schedule": {schedule}, "per_tensor_clip": null, "global_clip": null}},
                "groups": [{{"sage": true, "weight_decay": 0.0, "tensors": [0]}}],
                "tensors": [{{"shape": [1], "init": [0.5]}}],
                "steps": [], "tolerance": {{"rel": 1e-5, "abs": 1e-7}}}}"#
        );
        let f: VectorFile = serde_json::from_str(&text).expect("parses");
        f.validate().expect("valid");
        f
    }

    #[test]
    fn the_authors_adamax_never_corrects_bias() {
        let c = file("adamax", true, r#"{"kind": "constant"}"#)
            .config()
            .unwrap();
        assert!(!c.bias_correction && !c.sensitivity.bias_correction);
        let c = file("adamw", true, r#"{"kind": "constant"}"#)
            .config()
            .unwrap();
        assert!(c.bias_correction && c.sensitivity.bias_correction);
    }

    #[test]
    fn schedule_numbers_as_recorders_write_them() {
        let ppb = |w: f64, t: u64| Schedule::WarmupLinearPpb {
            warmup: w,
            t_total: t,
        };
        for (json, want) in [
            (
                r#"{"kind": "warmup_linear_ppb", "warmup": 0.1, "t_total": 20}"#,
                ppb(0.1, 20),
            ),
            (
                r#"{"kind": "warmup_linear_ppb", "warmup": 0.1, "t_total": 20.0}"#,
                ppb(0.1, 20),
            ),
            // The authors' default warm-up, -1: none.
            (
                r#"{"kind": "warmup_linear_ppb", "warmup": -1, "t_total": 10}"#,
                ppb(0.0, 10),
            ),
            (
                r#"{"kind": "constant", "warmup": -1, "t_total": -1}"#,
                Schedule::Constant,
            ),
            // Their "no schedule": t_total -1, whatever the kind says.
            (
                r#"{"kind": "warmup_linear_ppb", "warmup": 0.1, "t_total": -1}"#,
                Schedule::Constant,
            ),
        ] {
            let c = file("adamw", true, json).config().unwrap();
            assert_eq!(c.schedule, want, "{json}");
        }
        for bad in [
            r#"{"kind": "warmup_linear_ppb", "warmup": 0.1, "t_total": 20.5}"#,
            r#"{"kind": "warmup_linear_ppb", "warmup": 0.1, "t_total": 0}"#,
            r#"{"kind": "warmup_linear_ppb", "warmup": 0.1}"#,
        ] {
            let e = file("adamw", true, bad).config().unwrap_err();
            assert!(e.contains("t_total"), "{bad}: {e}");
        }
    }
}
