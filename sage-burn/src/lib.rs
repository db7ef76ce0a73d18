//! # sage-burn
//!
//! SAGE — the sensitivity-guided adaptive learning rate of *No Parameters Left Behind* (Liang
//! et al., ICLR 2022) — for [burn](https://burn.dev) 0.22, through sage-core's driver and
//! sage-cpu's backends: every algorithm, preset, schedule, ablation and group rule, f32, f16
//! and bf16 parameters, f32 or bf16 state.
//!
//! - [`Sage`]: burn's per-tensor [`Optimizer`](burn::optim::Optimizer). [`SageConfig::init`]
//!   wraps one per SAGE group in a burn [`ModuleOptimizer`](burn::optim::ModuleOptimizer)
//!   (groups by module path, with the same glob rules as sage-candle), which a training loop or
//!   burn's `Learner` drives; its state ([`SageState`]: `m`, `v`, `Ī`, the tensor's own count)
//!   is saved in burn's records like any burn optimizer's.
//! - [`SageModule`]: one counted step over all of a module's gradients, for what burn's
//!   per-tensor contract cannot express: global clipping, one non-finite decision, the
//!   optimizer's count.
//! - [`export_checkpoint`] / [`import_checkpoint`] and [`SageModule::save_checkpoint`] /
//!   [`SageModule::load_checkpoint`]: the same state as a sage-checkpoint file, which
//!   sage-candle and sage-core users load too.
//!
//! Steps run on host data through sage-cpu: bit for bit sage-core's own driver.
#![deny(missing_docs)]

#[path = "../../sage-candle/src/groups.rs"]
mod groups;
mod module;
mod record;
mod state;
mod tensor;

pub use groups::{glob_match, GroupRules, AUTHORS_WEIGHT_DECAY};
pub use module::{Refused, SageModule};
pub use record::{export_checkpoint, import_checkpoint};
pub use sage_checkpoint::ConfigCheck;
pub use state::{HostState, SageState};
pub use tensor::{LrSource, Sage, SageConfig, SliceBackend};

/// An adapter error: what sage-core, sage-checkpoint or burn refused, in words.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Error(String);

impl Error {
    pub(crate) fn msg(e: impl std::fmt::Display) -> Self {
        Error(e.to_string())
    }
    pub(crate) fn dbg(e: impl std::fmt::Debug) -> Self {
        Error(format!("{e:?}"))
    }
}

impl std::fmt::Display for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "sage-burn: {}", self.0)
    }
}

impl std::error::Error for Error {}
