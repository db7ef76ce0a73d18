//! # sage-core
//!
//! SAGE — the sensitivity-guided adaptive learning rate of *No Parameters Left Behind*
//! (Liang et al., ICLR 2022) — as a `#![no_std]` core with no allocator: the math once, a
//! small [`Backend`] trait for where it runs, and an [`Optimizer`] driver.
//!
//! Every parameter gets its own rate each step: with sensitivity `I = |θ·g|`, its moving
//! average `Ī` and the variation `U = |I − Ī|`, the base optimizer's step is multiplied by
//! `s = (U + ε)/(Ī + ε)`, raised where the parameter is under-trained and lowered where its
//! sensitivity is large and stable.
//!
//! - [`config`]: algorithms, the `paper` and `reference` presets, ablations, groups.
//! - [`schedule`]: learning-rate schedules.
//! - [`coeffs`]: the per-step scalars computed on the host; [`Coeffs`] is what kernels read.
//! - [`formula`]: the per-element update.
//! - [`state`]: [`TensorState`], one tensor's `m`, `v`, `Ī` and step count; [`StateLayout`].
//! - [`norm`]: the gradient-norm contract (chunk grid, reduction order).
//! - [`backend`]: the [`Backend`] trait; [`host`]: the host-copy capability.
//! - [`tensors`]: one step over tensors of mixed storage types.
//! - [`optimizer`]: the driver — validation, clipping, the non-finite guard, multi-tensor steps,
//!   norms from outside.
#![no_std]
#![deny(missing_docs)]

#[cfg(feature = "alloc")]
extern crate alloc;
#[cfg(feature = "std")]
extern crate std;

pub mod backend;
pub mod coeffs;
pub mod config;
pub mod element;
pub mod error;
pub mod formula;
pub mod gpu;
pub mod host;
pub mod norm;
pub mod optimizer;
pub mod schedule;
pub mod state;
pub mod tensors;

pub use backend::{composed_step, Accumulate, ApplyArgs, Backend, ParamTensor, TensorMut};
pub use coeffs::{Coeffs, StepScalars};
pub use config::{
    Algorithm, Config, DecayMode, EpsStyle, Modulation, ParamGroup, Preset, ScheduleClock,
    ScheduleCount, SensitivityConfig,
};
pub use element::{DType, Element};
pub use error::{BackendError, ConfigError, Error, ErrorKind, Infallible, Name, ParamProblem};
pub use half::{bf16, f16};
pub use host::{HostBuffers, HostError};
pub use optimizer::{GlobalNorms, Optimizer, Outcome, StepReport};
pub use schedule::Schedule;
pub use state::{Buffer, StateLayout, StateMut, TensorState};
pub use tensors::{TensorSet, Visit};
