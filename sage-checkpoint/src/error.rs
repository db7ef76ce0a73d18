//! Why a checkpoint could not be written or read. Every variant names the tensor (or the
//! configuration field) and the reason; none is a panic.

use std::fmt;

use sage_core::{BackendError, ErrorKind, HostError};

/// A checkpoint that cannot be saved, parsed or loaded.
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub enum CheckpointError {
    /// Not a readable safetensors file (truncated, bit-flipped header, bad offsets...).
    Corrupt {
        /// What the safetensors reader or our own header check found.
        reason: String,
    },
    /// A safetensors file, but not a SAGE checkpoint, or one whose metadata is malformed.
    Format {
        /// The metadata key or tensor concerned.
        what: String,
        /// Why it is refused.
        reason: String,
    },
    /// A checkpoint format version this build does not read.
    Version {
        /// The version in the file.
        found: String,
        /// The version this build writes, the newest it reads
        /// ([`FORMAT_VERSION`](crate::FORMAT_VERSION)); it reads every version from
        /// [`OLDEST_VERSION`](crate::format::OLDEST_VERSION) on.
        supported: u32,
    },
    /// The stored bytes of a tensor (or of the header) do not match their checksum.
    Checksum {
        /// The tensor, or `header`.
        tensor: String,
    },
    /// The configuration differs from the optimizer's.
    Config {
        /// The field, as its metadata key (`config.lr`, `group.1.sage`, ...).
        field: String,
        /// The file's value.
        file: String,
        /// The optimizer's value.
        expected: String,
    },
    /// A problem with one tensor: missing, unexpected, wrong shape, dtype, group, buffers, a
    /// step count that cannot advance.
    Tensor {
        /// The tensor (parameter name, or the safetensors key of one of its buffers).
        tensor: String,
        /// What is wrong.
        reason: String,
    },
    /// A backend copy failed. From [`load`](crate::load) or
    /// [`Checkpoint::restore`](crate::Checkpoint::restore): every buffer it had written was
    /// put back, so nothing changed (see [`Partial`](Self::Partial) for when that fails).
    Backend {
        /// The tensor being copied.
        tensor: String,
        /// The backend error's kind ([`ErrorKind::LengthMismatch`] for a host slice of the
        /// wrong length).
        kind: ErrorKind,
        /// The backend's message.
        message: String,
    },
    /// A restore failed part-way ([`cause`](Self::Partial::cause), a backend copy) and some of
    /// the buffers it had written could not be put back either: their contents are
    /// unspecified. Every buffer not in `unknown` holds what it held before the restore, and
    /// no step count (nor the optimizer's) was changed. (When every buffer could be put back,
    /// the error is the cause itself and nothing changed; see
    /// [`Checkpoint::restore`](crate::Checkpoint::restore).)
    Partial {
        /// What stopped the restore.
        cause: Box<CheckpointError>,
        /// The buffers, as safetensors keys (`enc.weight.m`; θ as `enc.weight`), whose contents
        /// are unspecified.
        unknown: Vec<String>,
    },
    /// The safetensors writer refused the data.
    Write {
        /// Its message.
        reason: String,
    },
}

impl CheckpointError {
    pub(crate) fn tensor(tensor: impl Into<String>, reason: impl Into<String>) -> Self {
        CheckpointError::Tensor {
            tensor: tensor.into(),
            reason: reason.into(),
        }
    }
    pub(crate) fn format(what: impl Into<String>, reason: impl Into<String>) -> Self {
        CheckpointError::Format {
            what: what.into(),
            reason: reason.into(),
        }
    }
    pub(crate) fn backend<E: BackendError>(tensor: impl Into<String>, error: E) -> Self {
        CheckpointError::Backend {
            tensor: tensor.into(),
            kind: error.kind(),
            message: error.to_string(),
        }
    }
    pub(crate) fn host<E: BackendError>(tensor: impl Into<String>, error: HostError<E>) -> Self {
        match error {
            HostError::Backend(e) => Self::backend(tensor, e),
            e @ HostError::Length { .. } => CheckpointError::Backend {
                tensor: tensor.into(),
                kind: ErrorKind::LengthMismatch,
                message: e.to_string(),
            },
        }
    }
}

impl fmt::Display for CheckpointError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CheckpointError::Corrupt { reason } => write!(f, "corrupt checkpoint: {reason}"),
            CheckpointError::Format { what, reason } => {
                write!(f, "not a valid SAGE checkpoint: `{what}`: {reason}")
            }
            CheckpointError::Version { found, supported } => write!(
                f,
                "checkpoint format version {found} is not supported (this build reads versions {} to {supported})",
                crate::format::OLDEST_VERSION
            ),
            CheckpointError::Checksum { tensor } => write!(
                f,
                "tensor `{tensor}`: checksum mismatch (the file is corrupt or was modified)"
            ),
            CheckpointError::Config {
                field,
                file,
                expected,
            } => write!(
                f,
                "configuration mismatch: `{field}` is {file} in the checkpoint but {expected} in the optimizer"
            ),
            CheckpointError::Tensor { tensor, reason } => write!(f, "tensor `{tensor}`: {reason}"),
            CheckpointError::Backend {
                tensor, message, ..
            } => {
                write!(f, "tensor `{tensor}`: backend copy failed: {message}")
            }
            CheckpointError::Partial { cause, unknown } => write!(
                f,
                "{cause}; putting the buffers back failed too, so the contents of {} are unspecified (every other buffer holds what it held before; no step count changed)",
                unknown
                    .iter()
                    .map(|k| format!("`{k}`"))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
            CheckpointError::Write { reason } => write!(f, "cannot write checkpoint: {reason}"),
        }
    }
}

impl std::error::Error for CheckpointError {}
