//! Why a sharded step, a gradient exchange or a sharded checkpoint failed. Every variant says
//! what and where; none is a panic.

use std::fmt;
use std::path::PathBuf;

use sage_core::{BackendError, ErrorKind};

/// A distributed operation that could not be done.
#[derive(Debug)]
#[non_exhaustive]
pub enum DistError {
    /// The tensors handed to a call do not fit the layout (count, length, a duplicate name), or
    /// the layout itself is malformed. Nothing was changed, and no collective was started.
    Input {
        /// Index of the tensor in the layout, when one is concerned.
        tensor: Option<usize>,
        /// Its name.
        name: Option<String>,
        /// What is wrong.
        reason: String,
    },
    /// The ranks disagree about something that must be the same everywhere (a tensor present
    /// on some ranks only, the world size, a checkpoint's validity on another rank). Nothing
    /// was changed on any rank.
    Disagree {
        /// What they disagree about.
        what: String,
    },
    /// The transport failed.
    Comm(Box<dyn std::error::Error + Send + Sync>),
    /// The optimizer refused the step or the backend failed (sage-core's error: its kind and
    /// message; the step rules of [`sage_core::Optimizer::step`] apply).
    Optimizer {
        /// The shared kind.
        kind: ErrorKind,
        /// sage-core's message (it names the tensor).
        message: String,
    },
    /// A backend copy (upload, download) failed.
    Backend {
        /// What was being copied.
        what: String,
        /// The shared kind.
        kind: ErrorKind,
        /// The backend's message.
        message: String,
    },
    /// A sharded checkpoint that cannot be written, read, or does not fit this optimizer.
    Checkpoint {
        /// The file concerned.
        file: PathBuf,
        /// Why.
        reason: String,
    },
}

impl DistError {
    pub(crate) fn input(tensor: Option<(usize, &str)>, reason: impl Into<String>) -> Self {
        DistError::Input {
            tensor: tensor.map(|t| t.0),
            name: tensor.map(|t| t.1.to_string()),
            reason: reason.into(),
        }
    }

    pub(crate) fn comm<E: std::error::Error + Send + Sync + 'static>(e: E) -> Self {
        DistError::Comm(Box::new(e))
    }

    pub(crate) fn optimizer<E: BackendError>(e: sage_core::Error<E>) -> Self {
        DistError::Optimizer {
            kind: e.kind(),
            message: e.to_string(),
        }
    }

    pub(crate) fn backend<E: BackendError>(what: impl Into<String>, e: E) -> Self {
        DistError::Backend {
            what: what.into(),
            kind: e.kind(),
            message: e.to_string(),
        }
    }

    pub(crate) fn checkpoint(file: impl Into<PathBuf>, reason: impl Into<String>) -> Self {
        DistError::Checkpoint {
            file: file.into(),
            reason: reason.into(),
        }
    }
}

impl fmt::Display for DistError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DistError::Input {
                tensor,
                name,
                reason,
            } => {
                match (tensor, name) {
                    (Some(i), Some(n)) => write!(f, "tensor {i} ({n}): ")?,
                    (Some(i), None) => write!(f, "tensor {i}: ")?,
                    _ => {}
                }
                f.write_str(reason)
            }
            DistError::Disagree { what } => write!(f, "ranks disagree: {what}"),
            DistError::Comm(e) => write!(f, "transport: {e}"),
            DistError::Optimizer { message, .. } => write!(f, "optimizer: {message}"),
            DistError::Backend { what, message, .. } => write!(f, "backend ({what}): {message}"),
            DistError::Checkpoint { file, reason } => {
                write!(f, "sharded checkpoint {}: {reason}", file.display())
            }
        }
    }
}

impl std::error::Error for DistError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            DistError::Comm(e) => Some(&**e),
            _ => None,
        }
    }
}
