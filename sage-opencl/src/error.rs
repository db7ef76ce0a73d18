//! This backend's error, mapped to the shared [`ErrorKind`].

use std::fmt;

use ocl::core::Status;
use sage_core::{BackendError, ErrorKind};

/// What went wrong on the OpenCL side.
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub enum Error {
    /// No OpenCL platform or no matching device here (the reason says which).
    NotAvailable(String),
    /// A program failed to compile for the device.
    Build {
        /// Which program (e.g. `step f32/f32`).
        program: String,
        /// The compiler's log.
        log: String,
    },
    /// Two buffers of one operation have different lengths.
    LengthMismatch {
        /// Which buffer (`grad`, `m`, `v`, `ibar`, `host slice`).
        buffer: &'static str,
        /// Elements expected (the parameter's).
        expected: usize,
        /// Elements it has.
        got: usize,
    },
    /// A buffer does not fit the device or its index types.
    TooLarge(String),
    /// A sub-buffer region the device cannot make: past its parent's end, or starting off the
    /// device's base-address alignment (the message says which, with the numbers).
    Region(String),
    /// A buffer of a step belongs to another OpenCL context than the backend's (another
    /// device, or the same device opened twice). Found before anything was launched: nothing
    /// changed.
    ForeignBuffer {
        /// Position of the tensor in the step's list.
        tensor: usize,
        /// Its name, when it has one.
        name: Option<String>,
        /// Which buffer (`param`, `grad`, `m`, `v`, `ibar`).
        buffer: &'static str,
    },
    /// A buffer the step writes (θ, `m`, `v`, `ibar`) is also another buffer of the step:
    /// the same memory object (a [`ClBuffer`](crate::ClBuffer) clone passed twice, θ as its own
    /// gradient, one buffer in two tensors) or an overlapping sub-buffer. The results would be
    /// silently wrong. Found before anything was launched: nothing changed.
    Aliased {
        /// Position of the tensor in the step's list (the later of the two).
        tensor: usize,
        /// Its name, when it has one.
        name: Option<String>,
        /// Which of its buffers.
        buffer: &'static str,
        /// The tensor whose buffer it shares (may be `tensor` itself).
        other_tensor: usize,
        /// Which buffer of that tensor.
        other_buffer: &'static str,
    },
    /// A multi-tensor step failed after its first launch had been enqueued (launches take
    /// [`tensors_per_launch`](crate::OpenCl::tensors_per_launch) tensors each): the first
    /// `applied` tensors of the call, in step order, were stepped, the others were not
    /// changed. Retrying the whole step would step the first `applied` twice; the driver
    /// should count them as stepped and retry (or give up on) only the rest.
    Partial {
        /// Tensors at the start of the call that were stepped.
        applied: usize,
        /// Tensors in the call.
        tensors: usize,
        /// The failure that stopped it.
        cause: Box<Error>,
    },
    /// An OpenCL call failed.
    Cl {
        /// What was being done.
        op: &'static str,
        /// The OpenCL status code, when the failure came from the driver.
        status: Option<i32>,
        /// The driver's (or ocl's) message.
        message: String,
    },
}

impl Error {
    /// Wraps an ocl error raised while doing `op`.
    pub(crate) fn cl(op: &'static str, e: ocl::core::Error) -> Self {
        Error::Cl {
            op,
            status: e.api_status().map(|s| s as i32),
            message: e.to_string(),
        }
    }

    /// The build log, when this is a build failure.
    pub fn build_log(&self) -> Option<&str> {
        match self {
            Error::Build { log, .. } => Some(log),
            _ => None,
        }
    }
}

fn kind_of_status(code: i32) -> ErrorKind {
    let is = |s: Status| code == s as i32;
    if is(Status::CL_OUT_OF_RESOURCES)
        || is(Status::CL_OUT_OF_HOST_MEMORY)
        || is(Status::CL_MEM_OBJECT_ALLOCATION_FAILURE)
    {
        ErrorKind::OutOfMemory
    } else if is(Status::CL_INVALID_BUFFER_SIZE) || is(Status::CL_INVALID_GLOBAL_WORK_SIZE) {
        ErrorKind::TooLarge
    } else if is(Status::CL_DEVICE_NOT_AVAILABLE)
        || is(Status::CL_INVALID_COMMAND_QUEUE)
        || is(Status::CL_INVALID_CONTEXT)
        || is(Status::CL_EXEC_STATUS_ERROR_FOR_EVENTS_IN_WAIT_LIST)
    {
        // OpenCL has no "device lost" status: these are what a reset or removed device gives.
        ErrorKind::DeviceLost
    } else if is(Status::CL_DEVICE_NOT_FOUND) || is(Status::CL_PLATFORM_NOT_FOUND_KHR) {
        ErrorKind::NotAvailable
    } else if is(Status::CL_BUILD_PROGRAM_FAILURE) || is(Status::CL_COMPILER_NOT_AVAILABLE) {
        ErrorKind::KernelBuild
    } else {
        ErrorKind::Other
    }
}

impl BackendError for Error {
    fn kind(&self) -> ErrorKind {
        match self {
            Error::NotAvailable(_) => ErrorKind::NotAvailable,
            Error::Build { .. } => ErrorKind::KernelBuild,
            Error::LengthMismatch { .. } => ErrorKind::LengthMismatch,
            Error::TooLarge(_) => ErrorKind::TooLarge,
            Error::Region(_) => ErrorKind::LengthMismatch,
            Error::ForeignBuffer { .. } | Error::Aliased { .. } => ErrorKind::Other,
            Error::Partial { cause, .. } => cause.kind(),
            Error::Cl { status, .. } => status.map_or(ErrorKind::Other, kind_of_status),
        }
    }

    fn applied_tensors(&self) -> Option<usize> {
        match self {
            Error::Partial { applied, .. } => Some(*applied),
            _ => None,
        }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::NotAvailable(why) => write!(f, "OpenCL not available: {why}"),
            Error::Build { program, log } => {
                write!(f, "OpenCL program `{program}` failed to build:\n{log}")
            }
            Error::LengthMismatch {
                buffer,
                expected,
                got,
            } => write!(
                f,
                "buffer `{buffer}` has {got} elements but the parameter has {expected}"
            ),
            Error::TooLarge(what) => write!(f, "too large for the OpenCL device: {what}"),
            Error::Region(what) => write!(f, "bad sub-buffer region: {what}"),
            Error::ForeignBuffer {
                tensor,
                name,
                buffer,
            } => {
                write_tensor(f, *tensor, name)?;
                write!(
                    f,
                    "buffer `{buffer}` belongs to another OpenCL context than the backend's (nothing was stepped)"
                )
            }
            Error::Aliased {
                tensor,
                name,
                buffer,
                other_tensor,
                other_buffer,
            } => {
                write_tensor(f, *tensor, name)?;
                write!(f, "buffer `{buffer}` is the same memory as ")?;
                if other_tensor == tensor {
                    write!(f, "its `{other_buffer}`")?;
                } else {
                    write!(f, "tensor {other_tensor}'s `{other_buffer}`")?;
                }
                write!(
                    f,
                    ": a buffer the step writes must not alias any other (nothing was stepped)"
                )
            }
            Error::Partial {
                applied,
                tensors,
                cause,
            } => write!(
                f,
                "partial step: the first {applied} of {tensors} tensors were stepped, the rest were not, when the step failed: {cause} (retrying the whole step would step those {applied} twice)"
            ),
            Error::Cl {
                op,
                status,
                message,
            } => {
                write!(f, "OpenCL error while {op}")?;
                if let Some(s) = status {
                    write!(f, " (status {s})")?;
                }
                write!(f, ": {message}")
            }
        }
    }
}

fn write_tensor(f: &mut fmt::Formatter<'_>, tensor: usize, name: &Option<String>) -> fmt::Result {
    write!(f, "tensor {tensor}")?;
    if let Some(n) = name {
        write!(f, " (`{n}`)")?;
    }
    f.write_str(": ")
}

impl std::error::Error for Error {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_map_to_kinds() {
        let e = |s: Status| Error::Cl {
            op: "x",
            status: Some(s as i32),
            message: String::new(),
        };
        assert_eq!(
            e(Status::CL_MEM_OBJECT_ALLOCATION_FAILURE).kind(),
            ErrorKind::OutOfMemory
        );
        assert_eq!(
            e(Status::CL_INVALID_BUFFER_SIZE).kind(),
            ErrorKind::TooLarge
        );
        assert_eq!(
            e(Status::CL_DEVICE_NOT_AVAILABLE).kind(),
            ErrorKind::DeviceLost
        );
        assert_eq!(e(Status::CL_INVALID_VALUE).kind(), ErrorKind::Other);
        let b = Error::Build {
            program: "p".into(),
            log: "line 1: error".into(),
        };
        assert_eq!(b.kind(), ErrorKind::KernelBuild);
        assert!(b.to_string().contains("line 1: error"));
    }
}
