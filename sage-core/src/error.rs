//! Errors. Bad input never panics: it returns one of these, naming what was wrong and where.
//!
//! As in embedded-hal, every backend has its own error type, which maps to the shared,
//! non-exhaustive [`ErrorKind`] through [`BackendError`].

use core::fmt;

/// What went wrong, shared by all backends and the driver.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ErrorKind {
    /// A hyper-parameter is out of its range.
    InvalidConfig,
    /// Two buffers that must have the same length do not.
    LengthMismatch,
    /// A parameter names a group that does not exist.
    UnknownGroup,
    /// A state buffer is missing, superfluous, or was built for another configuration.
    StateMismatch,
    /// The backend is not available on this machine (no driver, no device).
    NotAvailable,
    /// The device ran out of memory.
    OutOfMemory,
    /// The device was lost or reset.
    DeviceLost,
    /// A kernel failed to compile (the backend's error carries the log).
    KernelBuild,
    /// The input was too large for the backend (e.g. an index type).
    TooLarge,
    /// Anything else a backend reports.
    Other,
}

/// Implemented by each backend's error type.
pub trait BackendError: fmt::Debug + fmt::Display {
    /// The shared kind of this error.
    fn kind(&self) -> ErrorKind;

    /// For a failed [`step_tensors`](crate::Backend::step_tensors) call: how many of its
    /// tensors (the first ones, in order) were stepped before the failure. `None` (the
    /// default): none were, or the backend cannot tell. The driver turns a positive count into
    /// [`Error::PartialStep`], advancing exactly those tensors' counts.
    fn applied_tensors(&self) -> Option<usize> {
        None
    }
}

/// The error type of backends that cannot fail (e.g. the portable CPU backend).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Infallible {}

impl fmt::Display for Infallible {
    fn fmt(&self, _: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {}
    }
}

impl BackendError for Infallible {
    fn kind(&self) -> ErrorKind {
        match *self {}
    }
}

/// A hyper-parameter out of range: which field, what rule, and the value given.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ConfigError {
    /// Dotted field name, e.g. `betas.1` or `groups[2].weight_decay`.
    pub field: &'static str,
    /// Group index when the field belongs to a parameter group.
    pub group: Option<usize>,
    /// The rule it broke.
    pub problem: &'static str,
    /// The value given (as f64; NaN shows as NaN).
    pub value: f64,
}

impl ConfigError {
    /// A config error for `field`.
    pub fn new(field: &'static str, problem: &'static str, value: impl Into<f64>) -> Self {
        ConfigError {
            field,
            group: None,
            problem,
            value: value.into(),
        }
    }

    pub(crate) fn in_group(mut self, group: usize) -> Self {
        self.group = Some(group);
        self
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(g) = self.group {
            write!(f, "group {g}: ")?;
        }
        write!(f, "`{}` {} (got {})", self.field, self.problem, self.value)
    }
}

/// Up to 47 bytes of a parameter's name, held inline so errors need no allocator.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Name {
    len: u8,
    bytes: [u8; 47],
}

impl Name {
    /// Copies `s`, cut at a character boundary to fit (a cut name ends in `…`).
    pub fn new(s: &str) -> Self {
        let mut bytes = [0u8; 47];
        let mut len = s.len();
        if len > bytes.len() {
            len = bytes.len() - 3;
            while !s.is_char_boundary(len) {
                len -= 1;
            }
            bytes[len..len + 3].copy_from_slice("…".as_bytes());
            bytes[..len].copy_from_slice(&s.as_bytes()[..len]);
            len += 3;
        } else {
            bytes[..len].copy_from_slice(s.as_bytes());
        }
        Name {
            len: len as u8,
            bytes,
        }
    }

    /// The (possibly shortened) name.
    pub fn as_str(&self) -> &str {
        // Only whole characters were copied in `new`.
        core::str::from_utf8(&self.bytes[..self.len as usize]).unwrap_or("")
    }
}

impl fmt::Debug for Name {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self.as_str(), f)
    }
}

impl fmt::Display for Name {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What was wrong with one parameter of a step.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum ParamProblem {
    /// The gradient's length differs from the parameter's.
    GradLength {
        /// Parameter elements.
        param: usize,
        /// Gradient elements.
        grad: usize,
    },
    /// A state buffer's length differs from the parameter's.
    StateLength {
        /// Which buffer (`m`, `v`, `ibar`).
        buffer: &'static str,
        /// Parameter elements.
        param: usize,
        /// Buffer elements.
        state: usize,
    },
    /// The parameter's group index is not one of the optimizer's groups.
    UnknownGroup {
        /// The index given.
        group: usize,
        /// How many groups there are.
        groups: usize,
    },
    /// The configuration needs a state buffer that was not given.
    MissingState {
        /// Which buffer.
        buffer: &'static str,
        /// Why it is needed (e.g. `Adam`, `SAGE`).
        needed_by: &'static str,
    },
    /// A state buffer was given that this configuration does not use: the state was built for
    /// another configuration.
    UnexpectedState {
        /// Which buffer.
        buffer: &'static str,
    },
    /// The state storage type cannot hold this buffer's values: in f16, `v` (squares of
    /// gradients) and `ibar` (|θ·g|) underflow to 0 for ordinary gradients (below 6e-8), which
    /// silently turns Adam's step into a division by ε. Store state as f32 or bf16.
    StateType {
        /// The buffer that cannot be stored.
        buffer: &'static str,
        /// The storage type given.
        dtype: crate::DType,
    },
    /// The tensor's step count cannot advance (it is `u64::MAX`: a corrupt or hostile saved
    /// state); the step was refused before anything changed.
    StepOverflow {
        /// The count found.
        step: u64,
    },
}

impl fmt::Display for ParamProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            ParamProblem::GradLength { param, grad } => write!(
                f,
                "gradient has {grad} elements but the parameter has {param}"
            ),
            ParamProblem::StateLength {
                buffer,
                param,
                state,
            } => write!(
                f,
                "state buffer `{buffer}` has {state} elements but the parameter has {param}"
            ),
            ParamProblem::UnknownGroup { group, groups } => write!(
                f,
                "group {group} does not exist (the optimizer has {groups} groups)"
            ),
            ParamProblem::MissingState { buffer, needed_by } => write!(
                f,
                "state buffer `{buffer}` is missing; {needed_by} needs it (state built for another configuration?)"
            ),
            ParamProblem::UnexpectedState { buffer } => write!(
                f,
                "state buffer `{buffer}` is not used by this configuration (state built for another configuration?)"
            ),
            ParamProblem::StateType { buffer, dtype } => write!(
                f,
                "state buffer `{buffer}` cannot be stored as {dtype}: its values (squares and products of gradients) underflow there; use f32 or bf16 state"
            ),
            ParamProblem::StepOverflow { step } => {
                write!(f, "step count {step} cannot advance (u64 overflow)")
            }
        }
    }
}

/// The optimizer driver's error: a bad configuration, a bad parameter, or a backend failure.
#[derive(Debug)]
#[non_exhaustive]
pub enum Error<E> {
    /// A hyper-parameter is out of range.
    Config(ConfigError),
    /// A parameter of the step was malformed. Nothing was changed.
    Param {
        /// Position of the parameter in the step's list.
        index: usize,
        /// Its name, when it was given one.
        name: Option<Name>,
        /// What was wrong.
        problem: ParamProblem,
    },
    /// Norms given from outside, or a slice for partials, had the wrong length. Nothing was
    /// changed.
    NormCount {
        /// What was counted (`per-tensor squared norms`, `chunk partials`).
        what: &'static str,
        /// How many the step's tensors need.
        expected: usize,
        /// How many were given.
        given: usize,
    },
    /// The optimizer's own count is `u64::MAX` and cannot advance. Nothing was changed.
    StepOverflow {
        /// The count.
        step: u64,
    },
    /// The backend failed after updating some of the step's tensors: the first `applied`
    /// tensors (in step order) were stepped and their counts advanced, the rest are untouched;
    /// the optimizer's own count did not advance. Retrying only the remaining tensors with
    /// [`Optimizer::step_with_norms`](crate::Optimizer::step_with_norms) and this step's norms
    /// completes the step exactly; retrying the whole step would step the first ones twice.
    PartialStep {
        /// Tensors stepped, from the first.
        applied: usize,
        /// Tensors in the step.
        tensors: usize,
        /// The step's squared gradient norms, when it computed them: `(total, per tensor)` is
        /// what a retry needs; only the total is kept here (per-tensor norms are in the
        /// tensors' slots).
        total_sq: Option<f64>,
        /// The backend's error.
        source: E,
    },
    /// The backend failed. Unless it says otherwise ([`Error::PartialStep`]), nothing of the
    /// step was applied or nothing can be said about it; the step counts were not advanced.
    Backend(E),
}

impl<E: BackendError> Error<E> {
    /// The shared kind of this error.
    pub fn kind(&self) -> ErrorKind {
        match self {
            Error::Config(_) => ErrorKind::InvalidConfig,
            Error::Param { problem, .. } => match problem {
                ParamProblem::GradLength { .. } | ParamProblem::StateLength { .. } => {
                    ErrorKind::LengthMismatch
                }
                ParamProblem::UnknownGroup { .. } => ErrorKind::UnknownGroup,
                ParamProblem::MissingState { .. }
                | ParamProblem::UnexpectedState { .. }
                | ParamProblem::StepOverflow { .. }
                | ParamProblem::StateType { .. } => ErrorKind::StateMismatch,
            },
            Error::NormCount { .. } => ErrorKind::LengthMismatch,
            Error::StepOverflow { .. } => ErrorKind::StateMismatch,
            Error::PartialStep { source, .. } => source.kind(),
            Error::Backend(e) => e.kind(),
        }
    }
}

impl<E> From<ConfigError> for Error<E> {
    fn from(e: ConfigError) -> Self {
        Error::Config(e)
    }
}

impl<E: fmt::Display> fmt::Display for Error<E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Config(e) => write!(f, "invalid configuration: {e}"),
            Error::Param {
                index,
                name,
                problem,
            } => {
                write!(f, "parameter {index}")?;
                if let Some(n) = name {
                    write!(f, " (`{n}`)")?;
                }
                write!(f, ": {problem}")
            }
            Error::NormCount {
                what,
                expected,
                given,
            } => write!(
                f,
                "{given} {what} given, the step's tensors need {expected}"
            ),
            Error::StepOverflow { step } => {
                write!(
                    f,
                    "the optimizer's step count {step} cannot advance (u64 overflow)"
                )
            }
            Error::PartialStep {
                applied,
                tensors,
                source,
                ..
            } => write!(
                f,
                "backend error after {applied} of {tensors} tensors were stepped (their counts advanced; do not retry them): {source}"
            ),
            Error::Backend(e) => write!(f, "backend error: {e}"),
        }
    }
}

#[cfg(feature = "std")]
impl<E: fmt::Debug + fmt::Display> std::error::Error for Error<E> {}
#[cfg(feature = "std")]
impl std::error::Error for ConfigError {}
