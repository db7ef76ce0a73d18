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
}

impl CudaError {
    pub(crate) fn driver(op: impl Into<String>, error: DriverError) -> Self {
        CudaError::Driver {
            op: op.into(),
            error,
        }
    }

    /// The driver's numeric status (`CUresult`), for driver errors.
    pub fn cu_result(&self) -> Option<u32> {
        match self {
            CudaError::Driver { error, .. } => Some(error.0 as u32),
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
}
