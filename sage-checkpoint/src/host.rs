//! Host copies of a backend's buffers: the one capability checkpoints and diagnostics need.
//!
//! [`HostAccess`] is implemented here for every backend this project ships (`sage_cpu::Cpu`,
//! `sage_cpu::SimdCpu`, `sage_cuda::Cuda`, `sage_opencl::OpenCl`, each behind its feature);
//! a third-party backend implements it in a few lines with its own copy functions.

use std::fmt;

use sage_core::{Backend, Element};

/// A failed copy between a backend buffer and host memory.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HostError {
    /// What went wrong, in the backend's words.
    pub message: String,
}

impl HostError {
    /// An error with `message`.
    pub fn new(message: impl Into<String>) -> Self {
        HostError {
            message: message.into(),
        }
    }
}

impl fmt::Display for HostError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for HostError {}

/// Copies between a backend's buffers and host slices of the same length.
///
/// Both calls are blocking: when they return, the copy is complete and ordered after every
/// step queued before on the backend.
pub trait HostAccess: Backend {
    /// Copies `buf` into `out` (`out.len()` must equal the buffer's length).
    fn read_host<E: Element>(&mut self, buf: &Self::Buf<E>, out: &mut [E])
        -> Result<(), HostError>;
    /// Copies `data` into `buf` (`data.len()` must equal the buffer's length).
    fn write_host<E: Element>(
        &mut self,
        buf: &mut Self::Buf<E>,
        data: &[E],
    ) -> Result<(), HostError>;

    /// The contents of `buf` as a new vector.
    fn to_host<E: Element>(&mut self, buf: &Self::Buf<E>) -> Result<Vec<E>, HostError> {
        let mut out = vec![E::default(); self.len(buf)];
        self.read_host(buf, &mut out)?;
        Ok(out)
    }
}

// Unused only when no backend feature is on.
#[cfg_attr(
    not(any(feature = "cpu", feature = "cuda", feature = "opencl")),
    allow(dead_code)
)]
fn check_len(buf: usize, host: usize) -> Result<(), HostError> {
    if buf == host {
        Ok(())
    } else {
        Err(HostError::new(format!(
            "host slice of {host} elements for a buffer of {buf}"
        )))
    }
}

/// Slice backends: a copy is a `copy_from_slice`.
#[cfg(feature = "cpu")]
macro_rules! slice_host_access {
    ($t:ty) => {
        impl HostAccess for $t {
            fn read_host<E: Element>(&mut self, buf: &[E], out: &mut [E]) -> Result<(), HostError> {
                check_len(buf.len(), out.len())?;
                out.copy_from_slice(buf);
                Ok(())
            }
            fn write_host<E: Element>(
                &mut self,
                buf: &mut [E],
                data: &[E],
            ) -> Result<(), HostError> {
                check_len(buf.len(), data.len())?;
                buf.copy_from_slice(data);
                Ok(())
            }
        }
    };
}

#[cfg(feature = "cpu")]
slice_host_access!(sage_cpu::Cpu);
#[cfg(feature = "cpu")]
slice_host_access!(sage_cpu::SimdCpu);

#[cfg(feature = "opencl")]
impl HostAccess for sage_opencl::OpenCl {
    fn read_host<E: Element>(
        &mut self,
        buf: &sage_opencl::ClBuffer<E>,
        out: &mut [E],
    ) -> Result<(), HostError> {
        check_len(buf.len(), out.len())?;
        self.read(buf, out)
            .map_err(|e| HostError::new(e.to_string()))
    }
    fn write_host<E: Element>(
        &mut self,
        buf: &mut sage_opencl::ClBuffer<E>,
        data: &[E],
    ) -> Result<(), HostError> {
        check_len(buf.len(), data.len())?;
        self.write(buf, data)
            .map_err(|e| HostError::new(e.to_string()))
    }
}

#[cfg(feature = "cuda")]
mod cuda {
    use std::any::Any;

    use sage_core::{DType, Element};
    use sage_cuda::cudarc::driver::{CudaSlice, DeviceRepr};
    use sage_cuda::Cuda;

    use super::{check_len, HostAccess, HostError};

    fn write_as<E: Element, T: DeviceRepr + Copy + 'static>(
        cuda: &Cuda,
        buf: &mut CudaSlice<E>,
        data: &[E],
    ) -> Result<(), HostError> {
        let confusion = || HostError::new("internal: storage type does not match its DType");
        let typed = (buf as &mut dyn Any)
            .downcast_mut::<CudaSlice<T>>()
            .ok_or_else(confusion)?;
        // Same type, checked through `Any` on an owned copy: no transmute needed.
        let host: Vec<T> = *(Box::new(data.to_vec()) as Box<dyn Any>)
            .downcast::<Vec<T>>()
            .map_err(|_| confusion())?;
        cuda.stream()
            .memcpy_htod(&host, typed)
            .map_err(|e| HostError::new(format!("CUDA host-to-device copy: {e}")))?;
        cuda.synchronize()
            .map_err(|e| HostError::new(e.to_string()))
    }

    impl HostAccess for Cuda {
        fn read_host<E: Element>(
            &mut self,
            buf: &CudaSlice<E>,
            out: &mut [E],
        ) -> Result<(), HostError> {
            check_len(buf.len(), out.len())?;
            if out.is_empty() {
                return Ok(());
            }
            let host = self
                .download(buf)
                .map_err(|e| HostError::new(e.to_string()))?;
            out.copy_from_slice(&host);
            Ok(())
        }
        fn write_host<E: Element>(
            &mut self,
            buf: &mut CudaSlice<E>,
            data: &[E],
        ) -> Result<(), HostError> {
            check_len(buf.len(), data.len())?;
            if data.is_empty() {
                return Ok(());
            }
            // Into the existing allocation: a framework may hold its device pointer.
            match E::DTYPE {
                DType::F32 => write_as::<E, f32>(self, buf, data),
                DType::F16 => write_as::<E, half::f16>(self, buf, data),
                DType::Bf16 => write_as::<E, half::bf16>(self, buf, data),
            }
        }
    }
}
