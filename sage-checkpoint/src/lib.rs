//! # sage-checkpoint
//!
//! Portable checkpoints of a SAGE optimizer's state, and sensitivity diagnostics.
//!
//! - [`save`] / [`load`]: the step counter, the whole configuration and groups, a format
//!   version, and every state buffer (`m`, `v`, `ibar`; θ optionally) of every parameter keyed
//!   by its stable name, as one [safetensors](https://github.com/huggingface/safetensors)
//!   file. A checkpoint saved on one backend loads on any other.
//! - Loading validates everything before writing anything: format, version, checksums of the
//!   header and of every tensor (a flipped bit anywhere is caught), the configuration, and
//!   every name, group, shape, buffer and storage type against the tensors being restored.
//!   Every refusal is a [`CheckpointError`] naming the tensor (or field) and the reason.
//! - [`HostAccess`]: the one backend capability needed (copy a buffer to and from host
//!   memory), implemented for sage-cpu, sage-cuda and sage-opencl.
//! - [`diagnostics`]: per-tensor statistics of Ī and U, the share of elements whose
//!   modulation is above or below 1, and an importance-score export for pruning.
#![deny(missing_docs)]

pub mod checkpoint;
pub mod diagnostics;
pub mod error;
pub mod format;
#[cfg(feature = "cpu")]
#[doc(hidden)]
pub mod fuzzing;
pub mod host;

pub use checkpoint::{
    load, save, save_optimizer, write_file, Buffer, Checkpoint, ConfigCheck, Entry, EntryMut,
    ParamInfo,
};
pub use error::CheckpointError;
pub use format::FORMAT_VERSION;
pub use host::{HostAccess, HostError};

// The README's example compiles and runs as a doc test.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
struct ReadmeDoctests;
