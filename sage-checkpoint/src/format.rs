//! The on-disk format: metadata keys, the configuration as explicit key/value strings, and
//! the checksum.
//!
//! Numbers are written with Rust's shortest round-trip formatting and read back with
//! `str::parse`, so every `f64` hyper-parameter survives a save/load bit for bit (a JSON
//! number parser without exact rounding would not guarantee that).

use std::collections::BTreeMap;

use sage_core::{
    Algorithm, Config, DecayMode, EpsStyle, Modulation, ParamGroup, Preset, Schedule,
    ScheduleClock, ScheduleCount, SensitivityConfig,
};

use crate::error::CheckpointError;

/// The format version this build writes. Version 2 added each tensor's own step count (and
/// `config.schedule_count`, and spells β1, β2 as `config.betas.0`, `config.betas.1`, the field
/// names of sage-core's `ConfigError`).
pub const FORMAT_VERSION: u32 = 2;
/// The oldest format version this build reads. A version-1 file (one optimizer-wide step
/// count) loads with every tensor's count set to that count, which is what it meant: every
/// tensor had been stepped at every update. Its configuration gets the `schedule_count` of its
/// preset (`paper`: `Optimizer`, `reference`: `Tensor`), as `Config::paper` and
/// `Config::reference` set it; with every count equal the two give the same rates.
pub const OLDEST_VERSION: u32 = 1;
/// Value of the `sage.format` metadata key.
pub const FORMAT_NAME: &str = "sage-checkpoint";

/// Metadata key: [`FORMAT_NAME`].
pub const KEY_FORMAT: &str = "sage.format";
/// Metadata key: [`FORMAT_VERSION`].
pub const KEY_VERSION: &str = "sage.version";
/// Metadata key: the optimizer's step count (each tensor's own count is in the index).
pub const KEY_STEP: &str = "sage.step";
/// Metadata key: the JSON index of parameters (name, group, shape, step count, buffers,
/// checksums).
pub const KEY_PARAMS: &str = "sage.params";
/// Metadata key: checksum over every other metadata entry and every tensor's name, dtype and
/// shape.
pub const KEY_CHECKSUM: &str = "sage.checksum";

/// FNV-1a, 64 bit. Each byte goes through a bijection of the running state, so any change
/// of a single byte always changes the result: exactly the bit-flip detection needed, in ten
/// lines and without a dependency.
#[derive(Clone, Copy, Debug)]
pub struct Fnv64(u64);

impl Default for Fnv64 {
    fn default() -> Self {
        Fnv64(0xcbf2_9ce4_8422_2325)
    }
}

impl Fnv64 {
    /// Feeds `bytes`.
    pub fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 ^= b as u64;
            self.0 = self.0.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
    /// The hash so far.
    pub fn finish(&self) -> u64 {
        self.0
    }
    /// FNV-1a of `bytes`, as 16 hex digits.
    pub fn hex(bytes: &[u8]) -> String {
        let mut h = Fnv64::default();
        h.write(bytes);
        format!("{:016x}", h.finish())
    }
}

fn num(x: f64) -> String {
    format!("{x:?}")
}

fn flag(b: bool) -> String {
    b.to_string()
}

/// The configuration and groups as ordered `(key, value)` pairs, the way they are stored.
/// The order is the comparison order: the first differing key is the one an error names.
///
/// Every key is `config.` (or `group.{i}.`) followed by the field name sage-core's
/// `ConfigError` uses for that field (`config.beta0`, `config.betas.1`,
/// `config.schedule.t_total`, `group.0.weight_decay`), so a validation error names the key.
pub fn config_pairs(cfg: &Config, groups: &[ParamGroup]) -> Vec<(String, String)> {
    let mut v: Vec<(String, String)> = Vec::new();
    let mut put = |k: &str, val: String| v.push((k.to_string(), val));
    put(
        "config.preset",
        match cfg.preset {
            Preset::Paper => "paper",
            Preset::Reference => "reference",
        }
        .into(),
    );
    match cfg.algorithm {
        Algorithm::Sgd {
            momentum,
            dampening,
            nesterov,
        } => {
            put("config.algorithm", "sgd".into());
            put("config.momentum", num(momentum));
            put("config.dampening", num(dampening));
            put("config.nesterov", flag(nesterov));
        }
        Algorithm::Adam { beta1, beta2 }
        | Algorithm::AdamW { beta1, beta2 }
        | Algorithm::Adamax { beta1, beta2 } => {
            let name = match cfg.algorithm {
                Algorithm::Adam { .. } => "adam",
                Algorithm::AdamW { .. } => "adamw",
                _ => "adamax",
            };
            put("config.algorithm", name.into());
            put("config.betas.0", num(beta1));
            put("config.betas.1", num(beta2));
        }
    }
    put("config.lr", num(cfg.lr));
    put("config.eps", num(cfg.eps));
    put("config.bias_correction", flag(cfg.bias_correction));
    put(
        "config.eps_style",
        match cfg.eps_style {
            EpsStyle::Torch => "torch",
            EpsStyle::Authors => "authors",
        }
        .into(),
    );
    put(
        "config.decay",
        match cfg.decay {
            DecayMode::L2 => "l2",
            DecayMode::Decoupled => "decoupled",
            DecayMode::DecoupledAfterBaseRate => "decoupled_after_base_rate",
            DecayMode::InStep => "in_step",
        }
        .into(),
    );
    let s = &cfg.sensitivity;
    put("config.beta0", num(s.beta0));
    put("config.eps_num", num(s.eps_num));
    put("config.eps_den", num(s.eps_den));
    put("config.ibar_bias_correction", flag(s.bias_correction));
    put("config.modulation", modulation_name(s.modulation).into());
    match cfg.schedule {
        Schedule::Constant => put("config.schedule", "constant".into()),
        Schedule::WarmupLinearPpb { warmup, t_total } => {
            put("config.schedule", "warmup_linear_ppb".into());
            put("config.schedule.warmup", num(warmup));
            put("config.schedule.t_total", t_total.to_string());
        }
        Schedule::LinearWarmupDecay {
            warmup_steps,
            total_steps,
        } => {
            put("config.schedule", "linear_warmup_decay".into());
            put("config.schedule.warmup_steps", warmup_steps.to_string());
            put("config.schedule.total_steps", total_steps.to_string());
        }
        Schedule::CosineWarmup {
            warmup_steps,
            total_steps,
            cycles,
        } => {
            put("config.schedule", "cosine_warmup".into());
            put("config.schedule.warmup_steps", warmup_steps.to_string());
            put("config.schedule.total_steps", total_steps.to_string());
            put("config.schedule.cycles", num(cycles));
        }
        Schedule::InverseSqrt {
            warmup_steps,
            init_factor,
        } => {
            put("config.schedule", "inverse_sqrt".into());
            put("config.schedule.warmup_steps", warmup_steps.to_string());
            put("config.schedule.init_factor", num(init_factor));
        }
    }
    put(
        "config.schedule_clock",
        match cfg.schedule_clock {
            ScheduleClock::Current => "current",
            ScheduleClock::Lagged => "lagged",
        }
        .into(),
    );
    put(
        "config.schedule_count",
        match cfg.schedule_count {
            ScheduleCount::Tensor => "tensor",
            ScheduleCount::Optimizer => "optimizer",
        }
        .into(),
    );
    let opt = |x: Option<f64>| x.map_or_else(|| "none".to_string(), num);
    put("config.global_clip", opt(cfg.global_clip));
    put("config.per_tensor_clip", opt(cfg.per_tensor_clip));
    put("config.skip_non_finite", flag(cfg.skip_non_finite));
    put("groups", groups.len().to_string());
    for (i, g) in groups.iter().enumerate() {
        v.push((format!("group.{i}.sage"), flag(g.sage)));
        v.push((format!("group.{i}.weight_decay"), num(g.weight_decay)));
        v.push((format!("group.{i}.lr_scale"), num(g.lr_scale)));
    }
    v
}

fn modulation_name(m: Modulation) -> &'static str {
    match m {
        Modulation::Sage => "sage",
        Modulation::ImportanceTimesVariation => "importance_times_variation",
        Modulation::ImportanceOverVariation => "importance_over_variation",
        Modulation::Importance => "importance",
        Modulation::InverseImportance => "inverse_importance",
        Modulation::Variation => "variation",
    }
}

/// Reads typed values out of the metadata map, naming the key in every error.
struct Reader<'a>(&'a BTreeMap<String, String>);

impl Reader<'_> {
    fn str(&self, key: &str) -> Result<&str, CheckpointError> {
        self.0
            .get(key)
            .map(String::as_str)
            .ok_or_else(|| CheckpointError::format(key, "missing"))
    }
    fn f64(&self, key: &str) -> Result<f64, CheckpointError> {
        let s = self.str(key)?;
        s.parse::<f64>()
            .map_err(|_| CheckpointError::format(key, format!("not a number: {s:?}")))
    }
    fn u64(&self, key: &str) -> Result<u64, CheckpointError> {
        let s = self.str(key)?;
        s.parse::<u64>()
            .map_err(|_| CheckpointError::format(key, format!("not an unsigned integer: {s:?}")))
    }
    fn bool(&self, key: &str) -> Result<bool, CheckpointError> {
        match self.str(key)? {
            "true" => Ok(true),
            "false" => Ok(false),
            s => Err(CheckpointError::format(
                key,
                format!("not `true` or `false`: {s:?}"),
            )),
        }
    }
    fn opt_f64(&self, key: &str) -> Result<Option<f64>, CheckpointError> {
        if self.str(key)? == "none" {
            Ok(None)
        } else {
            self.f64(key).map(Some)
        }
    }
    fn choice<T: Copy>(&self, key: &str, options: &[(&str, T)]) -> Result<T, CheckpointError> {
        let s = self.str(key)?;
        options
            .iter()
            .find(|(n, _)| *n == s)
            .map(|(_, v)| *v)
            .ok_or_else(|| CheckpointError::format(key, format!("unknown value {s:?}")))
    }
}

/// Most groups a checkpoint may declare: a corrupt count must not make us allocate wildly.
const MAX_GROUPS: u64 = 1 << 16;

/// The metadata of a version-1 file in version 2's terms: `config.beta1`, `config.beta2`
/// renamed to `config.betas.0`, `config.betas.1`, and `config.schedule_count` from the preset
/// (see [`OLDEST_VERSION`]). Keys version 1 did not have are refused as unknown.
fn upgrade_v1(
    meta: &BTreeMap<String, String>,
) -> Result<BTreeMap<String, String>, CheckpointError> {
    let mut m = meta.clone();
    for k in ["config.betas.0", "config.betas.1", "config.schedule_count"] {
        if m.contains_key(k) {
            return Err(CheckpointError::format(
                k,
                "unknown configuration key (in a version 1 file)",
            ));
        }
    }
    for (old, new) in [
        ("config.beta1", "config.betas.0"),
        ("config.beta2", "config.betas.1"),
    ] {
        if let Some(v) = m.remove(old) {
            m.insert(new.into(), v);
        }
    }
    let count = match m.get("config.preset").map(String::as_str) {
        Some("paper") => "optimizer",
        Some("reference") => "tensor",
        // An unknown preset is refused by the parser, naming `config.preset`.
        _ => return Ok(m),
    };
    m.insert("config.schedule_count".into(), count.into());
    Ok(m)
}

/// The configuration and groups back from the metadata of a file of format `version`,
/// validated (the error names the key).
pub fn parse_config(
    meta: &BTreeMap<String, String>,
    version: u32,
) -> Result<(Config, Vec<ParamGroup>), CheckpointError> {
    let upgraded;
    let meta = if version == 1 {
        upgraded = upgrade_v1(meta)?;
        &upgraded
    } else {
        meta
    };
    let r = Reader(meta);
    let preset = r.choice(
        "config.preset",
        &[("paper", Preset::Paper), ("reference", Preset::Reference)],
    )?;
    let algorithm = match r.str("config.algorithm")? {
        "sgd" => Algorithm::Sgd {
            momentum: r.f64("config.momentum")?,
            dampening: r.f64("config.dampening")?,
            nesterov: r.bool("config.nesterov")?,
        },
        name @ ("adam" | "adamw" | "adamax") => {
            let (beta1, beta2) = (r.f64("config.betas.0")?, r.f64("config.betas.1")?);
            match name {
                "adam" => Algorithm::Adam { beta1, beta2 },
                "adamw" => Algorithm::AdamW { beta1, beta2 },
                _ => Algorithm::Adamax { beta1, beta2 },
            }
        }
        s => {
            return Err(CheckpointError::format(
                "config.algorithm",
                format!("unknown value {s:?}"),
            ))
        }
    };
    let modulations: Vec<(&str, Modulation)> = Modulation::ALL
        .iter()
        .map(|&m| (modulation_name(m), m))
        .collect();
    let schedule = match r.str("config.schedule")? {
        "constant" => Schedule::Constant,
        "warmup_linear_ppb" => Schedule::WarmupLinearPpb {
            warmup: r.f64("config.schedule.warmup")?,
            t_total: r.u64("config.schedule.t_total")?,
        },
        "linear_warmup_decay" => Schedule::LinearWarmupDecay {
            warmup_steps: r.u64("config.schedule.warmup_steps")?,
            total_steps: r.u64("config.schedule.total_steps")?,
        },
        "cosine_warmup" => Schedule::CosineWarmup {
            warmup_steps: r.u64("config.schedule.warmup_steps")?,
            total_steps: r.u64("config.schedule.total_steps")?,
            cycles: r.f64("config.schedule.cycles")?,
        },
        "inverse_sqrt" => Schedule::InverseSqrt {
            warmup_steps: r.u64("config.schedule.warmup_steps")?,
            init_factor: r.f64("config.schedule.init_factor")?,
        },
        s => {
            return Err(CheckpointError::format(
                "config.schedule",
                format!("unknown value {s:?}"),
            ))
        }
    };
    let cfg = Config {
        preset,
        algorithm,
        lr: r.f64("config.lr")?,
        eps: r.f64("config.eps")?,
        bias_correction: r.bool("config.bias_correction")?,
        eps_style: r.choice(
            "config.eps_style",
            &[("torch", EpsStyle::Torch), ("authors", EpsStyle::Authors)],
        )?,
        decay: r.choice(
            "config.decay",
            &[
                ("l2", DecayMode::L2),
                ("decoupled", DecayMode::Decoupled),
                (
                    "decoupled_after_base_rate",
                    DecayMode::DecoupledAfterBaseRate,
                ),
                ("in_step", DecayMode::InStep),
            ],
        )?,
        sensitivity: SensitivityConfig {
            beta0: r.f64("config.beta0")?,
            eps_num: r.f64("config.eps_num")?,
            eps_den: r.f64("config.eps_den")?,
            bias_correction: r.bool("config.ibar_bias_correction")?,
            modulation: r.choice("config.modulation", &modulations)?,
        },
        schedule,
        schedule_clock: r.choice(
            "config.schedule_clock",
            &[
                ("current", ScheduleClock::Current),
                ("lagged", ScheduleClock::Lagged),
            ],
        )?,
        schedule_count: r.choice(
            "config.schedule_count",
            &[
                ("tensor", ScheduleCount::Tensor),
                ("optimizer", ScheduleCount::Optimizer),
            ],
        )?,
        global_clip: r.opt_f64("config.global_clip")?,
        per_tensor_clip: r.opt_f64("config.per_tensor_clip")?,
        skip_non_finite: r.bool("config.skip_non_finite")?,
    };
    cfg.validate().map_err(|e| {
        CheckpointError::format(format!("config.{}", e.field), format!("invalid: {e}"))
    })?;
    let n = r.u64("groups")?;
    if n > MAX_GROUPS {
        return Err(CheckpointError::format(
            "groups",
            format!("{n} groups is more than {MAX_GROUPS}"),
        ));
    }
    let mut groups = Vec::with_capacity(n as usize);
    for i in 0..n {
        let g = ParamGroup {
            sage: r.bool(&format!("group.{i}.sage"))?,
            weight_decay: r.f64(&format!("group.{i}.weight_decay"))?,
            lr_scale: r.f64(&format!("group.{i}.lr_scale"))?,
        };
        g.validate(i as usize).map_err(|e| {
            CheckpointError::format(format!("group.{i}.{}", e.field), format!("invalid: {e}"))
        })?;
        groups.push(g);
    }
    // Keys nobody reads would be silently ignored settings: refuse them.
    let known: std::collections::BTreeSet<String> = config_pairs(&cfg, &groups)
        .into_iter()
        .map(|(k, _)| k)
        .collect();
    if let Some(extra) = meta
        .keys()
        .find(|k| (k.starts_with("config.") || k.starts_with("group.")) && !known.contains(*k))
    {
        return Err(CheckpointError::format(
            extra.clone(),
            "unknown configuration key",
        ));
    }
    Ok((cfg, groups))
}

/// The first difference between the file's configuration and the optimizer's, as an error;
/// `Ok` when they are equal (compared as values: `-0.0 == 0.0`).
pub fn compare_config(
    file: (&Config, &[ParamGroup]),
    live: (&Config, &[ParamGroup]),
) -> Result<(), CheckpointError> {
    if file.0 == live.0 && file.1 == live.1 {
        return Ok(());
    }
    let f: BTreeMap<String, String> = config_pairs(file.0, file.1).into_iter().collect();
    for (k, v) in config_pairs(live.0, live.1) {
        let fv = f.get(&k).cloned().unwrap_or_else(|| "absent".into());
        if fv != v {
            return Err(CheckpointError::Config {
                field: k,
                file: fv,
                expected: v,
            });
        }
    }
    // Only keys the file has and the optimizer lacks remain (e.g. more groups).
    let live_keys: BTreeMap<String, String> = config_pairs(live.0, live.1).into_iter().collect();
    let (k, v) = f
        .iter()
        .find(|(k, _)| !live_keys.contains_key(*k))
        .map(|(k, v)| (k.clone(), v.clone()))
        .unwrap_or_else(|| ("config".into(), "different".into()));
    Err(CheckpointError::Config {
        field: k,
        file: v,
        expected: "absent".into(),
    })
}
