//! The backend's error type and its mapping to the shared [`ErrorKind`].

use std::fmt;

use cudarc::driver::DriverError;
use sage_core::{BackendError, ErrorKind};

/// What went wrong on the CUDA backend. Nothing here panics: a missing driver, a failed
/// kernel compile, an allocation failure or a lost device all come back as one of these.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum CudaError {
    /// No usable driver, device or NVRTC on this machine; the text says which and why.
    NotAvailable(String),
    /// A driver API call failed.
    Driver {
        /// What the backend was doing (`launch sage_mt_step_f32_f32`, `alloc`, ...).
        op: String,
        /// The driver's error.
        error: DriverError,
    },
    /// NVRTC could not compile a kernel program.
    Compile {
        /// Which program (`step f32/f32`, `sqnorm bf16`).
        program: String,
        /// NVRTC's status and log.
        log: String,
    },
    /// Two buffers that must have the same length do not.
    LengthMismatch {
        /// Which buffer.
        what: &'static str,
        /// The length it should have.
        expected: usize,
        /// Its length.
        got: usize,
    },
    /// The input exceeds what one launch can index (more than 2^31 − 1 chunks).
    TooLarge(String),
    /// A [`step_tensors`](sage_core::Backend::step_tensors) call failed after its step kernel
    /// had been launched (reading back the non-finite counts, or the wait for the stream
    /// before it): the first `applied` tensors of the call, in step order, were stepped (or
    /// may have been: a kernel fault also ends here, and its tensors cannot be told apart),
    /// the others were not changed. The same semantics as sage-opencl's `Error::Partial`.
    /// [`applied_tensors`](BackendError::applied_tensors) returns `applied`, which the
    /// optimizer turns into `sage_core::Error::PartialStep`, advancing exactly those tensors'
    /// step counts: retrying the whole step would step the first `applied` twice. A failure
    /// before the launch (lengths, compiling, uploading the launch tables, the launch itself)
    /// is the plain error: nothing changed. Each step is one launch, so after it `applied` is
    /// every tensor of the call.
    Partial {
        /// Tensors at the start of the call that were (or may have been) stepped.
        applied: usize,
        /// Tensors in the call.
        tensors: usize,
        /// The failure that stopped it.
        cause: Box<CudaError>,
    },
}

impl CudaError {
    pub(crate) fn driver(op: impl Into<String>, error: DriverError) -> Self {
        CudaError::Driver {
            op: op.into(),
            error,
        }
    }

    /// The error of a step of `tensors` tensors that failed with `cause` once the launches
    /// stepping its first `applied` tensors had been made: [`CudaError::Partial`], or `cause`
    /// itself when `applied` is 0 (nothing was launched, nothing changed).
    pub(crate) fn partial(applied: usize, tensors: usize, cause: CudaError) -> Self {
        if applied == 0 {
            return cause;
        }
        CudaError::Partial {
            applied: applied.min(tensors),
            tensors,
            cause: Box::new(cause),
        }
    }

    /// The driver's numeric status (`CUresult`), for driver errors (and partial steps that
    /// one stopped).
    pub fn cu_result(&self) -> Option<u32> {
        match self {
            CudaError::Driver { error, .. } => Some(error.0 as u32),
            CudaError::Partial { cause, .. } => cause.cu_result(),
            _ => None,
        }
    }
}

/// The shared kind of a driver status code (numbers from `cuda.h`; matched by number so the
/// mapping does not depend on which CUDA version's enum cudarc was built with).
pub fn kind_of_cu_result(code: u32) -> ErrorKind {
    match code {
        2 => ErrorKind::OutOfMemory,
        // not initialized, deinitialized, stub library, insufficient driver, device
        // unavailable, no device, invalid device, system driver mismatch / not ready
        3 | 4 | 34 | 35 | 46 | 100 | 101 | 802 | 803 | 804 => ErrorKind::NotAvailable,
        // invalid image / PTX, no binary for this GPU, JIT missing or disabled, PTX too new,
        // named symbol not found (a kernel missing from the module)
        200 | 209 | 218 | 221 | 222 | 223 | 500 => ErrorKind::KernelBuild,
        // ECC, illegal address, launch timeout, context destroyed, sticky execution errors:
        // the context is unusable afterwards
        214 | 700 | 702 | 709 | 714 | 715 | 716 | 717 | 718 | 719 => ErrorKind::DeviceLost,
        _ => ErrorKind::Other,
    }
}

impl BackendError for CudaError {
    fn kind(&self) -> ErrorKind {
        match self {
            CudaError::NotAvailable(_) => ErrorKind::NotAvailable,
            CudaError::Driver { error, .. } => kind_of_cu_result(error.0 as u32),
            CudaError::Compile { .. } => ErrorKind::KernelBuild,
            CudaError::LengthMismatch { .. } => ErrorKind::LengthMismatch,
            CudaError::TooLarge(_) => ErrorKind::TooLarge,
            CudaError::Partial { cause, .. } => cause.kind(),
        }
    }

    fn applied_tensors(&self) -> Option<usize> {
        match self {
            CudaError::Partial { applied, .. } => Some(*applied),
            _ => None,
        }
    }
}

impl fmt::Display for CudaError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CudaError::NotAvailable(why) => write!(f, "CUDA not available: {why}"),
            CudaError::Driver { op, error } => {
                let name = error
                    .error_name()
                    .map(|s| s.to_string_lossy().into_owned())
                    .unwrap_or_else(|_| format!("CUresult {}", error.0 as u32));
                let text = error
                    .error_string()
                    .map(|s| s.to_string_lossy().into_owned())
                    .unwrap_or_default();
                write!(f, "{op}: {name}")?;
                if !text.is_empty() {
                    write!(f, " ({text})")?;
                }
                Ok(())
            }
            CudaError::Compile { program, log } => {
                write!(f, "NVRTC failed to compile {program}:\n{log}")
            }
            CudaError::LengthMismatch {
                what,
                expected,
                got,
            } => write!(f, "`{what}` has {got} elements, expected {expected}"),
            CudaError::TooLarge(why) => write!(f, "too large for one launch: {why}"),
            CudaError::Partial {
                applied,
                tensors,
                cause,
            } => write!(
                f,
                "partial step: the first {applied} of {tensors} tensors were (or may have been) stepped, the rest were not, when the step failed: {cause} (retrying the whole step would step those {applied} twice)"
            ),
        }
    }
}

impl std::error::Error for CudaError {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_codes_map_to_kinds() {
        assert_eq!(kind_of_cu_result(2), ErrorKind::OutOfMemory);
        assert_eq!(kind_of_cu_result(100), ErrorKind::NotAvailable);
        assert_eq!(kind_of_cu_result(222), ErrorKind::KernelBuild);
        assert_eq!(kind_of_cu_result(700), ErrorKind::DeviceLost);
        assert_eq!(kind_of_cu_result(1), ErrorKind::Other);
    }

    #[test]
    fn errors_have_kinds_and_say_what() {
        let e = CudaError::LengthMismatch {
            what: "grad",
            expected: 4,
            got: 3,
        };
        assert_eq!(e.kind(), ErrorKind::LengthMismatch);
        assert_eq!(e.to_string(), "`grad` has 3 elements, expected 4");
        let e = CudaError::Compile {
            program: "step f32/f32".into(),
            log: "error: x".into(),
        };
        assert_eq!(e.kind(), ErrorKind::KernelBuild);
        assert!(e.to_string().contains("error: x"));
        assert_eq!(
            CudaError::NotAvailable("no driver".into()).kind(),
            ErrorKind::NotAvailable
        );
    }

    /// A failure once a step's kernel was launched must say what was applied (issue 12):
    /// never a plain error, which the optimizer would take as nothing applied.
    #[test]
    fn failures_after_a_launch_are_partial_steps() {
        let cause = || {
            CudaError::driver(
                "read back the non-finite counts",
                DriverError(cudarc::driver::sys::CUresult::CUDA_ERROR_ILLEGAL_ADDRESS),
            )
        };
        let e = CudaError::partial(3, 3, cause());
        assert!(
            matches!(
                e,
                CudaError::Partial {
                    applied: 3,
                    tensors: 3,
                    ..
                }
            ),
            "{e:?}"
        );
        assert_eq!(e.applied_tensors(), Some(3));
        assert_eq!(e.kind(), ErrorKind::DeviceLost);
        assert_eq!(e.cu_result(), Some(700));
        // (A driver error's text asks the driver for its name: a cause that needs none.)
        let text = CudaError::partial(3, 3, CudaError::TooLarge("the cause".into())).to_string();
        assert!(text.contains("partial step"), "{text}");
        assert!(text.contains("the cause"), "{text}");
        // Nothing launched: the plain error, nothing applied.
        let e = CudaError::partial(0, 3, cause());
        assert!(matches!(e, CudaError::Driver { .. }), "{e:?}");
        assert_eq!(e.applied_tensors(), None);
        // Never more than the call's tensors.
        assert_eq!(CudaError::partial(5, 2, cause()).applied_tensors(), Some(2));
        for e in [
            CudaError::NotAvailable(String::new()),
            CudaError::TooLarge(String::new()),
            cause(),
        ] {
            assert_eq!(e.applied_tensors(), None, "{e:?}");
        }
    }
}
