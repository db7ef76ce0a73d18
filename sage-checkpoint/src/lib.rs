//! # sage-checkpoint
//!
//! Portable checkpoints of a SAGE optimizer's state, and sensitivity diagnostics.
//!
//! - [`save`] / [`load`]: the optimizer's step count, the whole configuration and groups, a
//!   format version, and every tensor's [`TensorState`](sage_core::TensorState) — its state
//!   buffers (`m`, `v`, `ibar`; θ optionally) and its own step count — keyed by its stable
//!   name, as one [safetensors](https://github.com/huggingface/safetensors) file.
//! - Generic over [`sage_core::HostBuffers`], the host-copy capability each backend implements
//!   in its own crate: this crate depends on sage-core only, and a checkpoint saved on one
//!   backend restores on any other.
//! - Loading validates everything before writing anything: format, version, checksums of the
//!   header and of every tensor (a flipped bit anywhere is caught), the configuration, every
//!   name, group, shape, buffer and storage type against the tensors being restored (the
//!   buffer check is sage-core's [`StateLayout::check`](sage_core::StateLayout::check)), and
//!   every step count (`u64::MAX` could not advance), every stored value (NaN or ±Inf
//!   anywhere, a negative `v` or `ibar`: the next step would make θ NaN). Every refusal is a
//!   [`CheckpointError`] naming the tensor (or field) and the reason.
//! - Restoring is all or nothing: every target is snapshotted to the host first, and a device
//!   copy that fails part-way puts back what was written ([`Checkpoint::restore`]).
//! - [`write_file`] is atomic and durable: a unique temporary file (`create_new`) beside the
//!   target, `fsync`, rename, `fsync` of the directory; removed on failure.
//! - Format version 2 ([`FORMAT_VERSION`]) stores each tensor's count; version-1 files (one
//!   optimizer-wide count) still load, every tensor getting that count
//!   ([`format::OLDEST_VERSION`]).
//! - A model that mixes storage types is saved and restored in one call: pass a tuple of entry
//!   slices ([`EntrySet`], [`EntrySetMut`]).
//! - [`diagnostics`]: per-tensor statistics of Ī and U, the share of elements whose
//!   modulation is above or below 1, and an importance-score export for pruning.
#![deny(missing_docs)]

pub mod checkpoint;
pub mod diagnostics;
pub mod error;
pub mod format;
pub mod set;

pub use checkpoint::{
    load, save, save_optimizer, write_file, Checkpoint, ConfigCheck, Entry, EntryMut, ParamInfo,
    Slot,
};
pub use error::CheckpointError;
pub use format::{FORMAT_VERSION, OLDEST_VERSION};
/// The state buffers, as sage-core names them (`m`, `v`, `ibar`).
pub use sage_core::Buffer;
pub use set::{EntrySet, EntrySetMut};

// The README's example compiles and runs as a doc test.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
struct ReadmeDoctests;
