//! The host-copy capability: make a backend buffer from host data, read it back, write host
//! data into it, borrow an owned buffer as the backend's buffer type.
//!
//! Defined once here, at the bottom of the crate graph (as `rand_core` defines `RngCore`), and
//! implemented by each backend in its own crate; checkpoints and the conformance suite are
//! generic over it and depend on no backend. A backend whose buffers are slices gets it from
//! one macro line, [`slice_host_buffers!`](crate::slice_host_buffers).

use core::borrow::BorrowMut;
use core::fmt;

use crate::backend::Backend;
use crate::element::{DType, Element};

/// A copy between host memory and a backend buffer failed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HostError<E> {
    /// The host slice and the buffer differ in length; nothing was copied.
    Length {
        /// Elements in the backend buffer.
        buffer: usize,
        /// Elements in the host slice.
        host: usize,
    },
    /// The backend failed.
    Backend(E),
}

impl<E: fmt::Display> fmt::Display for HostError<E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HostError::Length { buffer, host } => write!(
                f,
                "host slice of {host} elements for a buffer of {buffer} elements"
            ),
            HostError::Backend(e) => write!(f, "{e}"),
        }
    }
}

#[cfg(feature = "std")]
impl<E: fmt::Debug + fmt::Display> std::error::Error for HostError<E> {}

/// Copies between a backend's buffers and host slices. Every copy is blocking: when it
/// returns, it is complete and ordered after everything queued before on the backend.
pub trait HostBuffers: Backend {
    /// A buffer this backend owns (`Vec<E>` for a slice backend, a device allocation for a
    /// GPU), borrowed as the backend's buffer type for steps.
    type Owned<E: Element>: BorrowMut<Self::Buf<E>>;

    /// Writes a short name for reports (`cpu/avx512`, `cuda:0 (NVIDIA H100)`).
    fn describe(&self, out: &mut dyn fmt::Write) -> fmt::Result;

    /// Whether buffers of `d` can be stepped here (f16 needs `cl_khr_fp16` on OpenCL, say).
    fn supports(&self, d: DType) -> bool {
        let _ = d;
        true
    }

    /// A new buffer holding `data`.
    fn upload<E: Element>(&mut self, data: &[E]) -> Result<Self::Owned<E>, Self::Error>;

    /// Copies `buf` into `out`. Called only with `out.len() == len(buf)`
    /// ([`read_host`](Self::read_host) checks it).
    fn copy_to_host<E: Element>(
        &mut self,
        buf: &Self::Buf<E>,
        out: &mut [E],
    ) -> Result<(), Self::Error>;

    /// Copies `data` into `buf`. Called only with `data.len() == len(buf)`
    /// ([`write_host`](Self::write_host) checks it).
    fn copy_from_host<E: Element>(
        &mut self,
        buf: &mut Self::Buf<E>,
        data: &[E],
    ) -> Result<(), Self::Error>;

    /// Copies `buf` into `out`, which must have its length.
    fn read_host<E: Element>(
        &mut self,
        buf: &Self::Buf<E>,
        out: &mut [E],
    ) -> Result<(), HostError<Self::Error>> {
        let n = self.len(buf);
        if n != out.len() {
            return Err(HostError::Length {
                buffer: n,
                host: out.len(),
            });
        }
        self.copy_to_host(buf, out).map_err(HostError::Backend)
    }

    /// Copies `data` into `buf`, which must have its length.
    fn write_host<E: Element>(
        &mut self,
        buf: &mut Self::Buf<E>,
        data: &[E],
    ) -> Result<(), HostError<Self::Error>> {
        let n = self.len(buf);
        if n != data.len() {
            return Err(HostError::Length {
                buffer: n,
                host: data.len(),
            });
        }
        self.copy_from_host(buf, data).map_err(HostError::Backend)
    }

    /// The contents of `buf` as a new vector.
    #[cfg(feature = "alloc")]
    fn to_host<E: Element>(
        &mut self,
        buf: &Self::Buf<E>,
    ) -> Result<alloc::vec::Vec<E>, Self::Error> {
        let mut out = alloc::vec![E::default(); self.len(buf)];
        self.copy_to_host(buf, &mut out)?;
        Ok(out)
    }
}

#[cfg(feature = "alloc")]
#[doc(hidden)]
pub use alloc::vec::Vec as __Vec;

/// Implements [`HostBuffers`] for a backend whose buffers are slices (`Buf<E> = [E]`): owned
/// buffers are `Vec`s, copies are `copy_from_slice`. The optional second argument is the name
/// reports use (default: the type's name). Needs sage-core's `alloc` feature.
///
/// ```
/// # use sage_core::{Backend, Coeffs, Accumulate, ApplyArgs, Element, Infallible, HostBuffers};
/// #[derive(Clone)]
/// struct Mine;
/// # impl Backend for Mine {
/// #   type Error = Infallible; type Buf<E: Element> = [E];
/// #   fn len<E: Element>(&self, b: &[E]) -> usize { b.len() }
/// #   fn sq_norm_chunks<E: Element>(&mut self, _: &[E], _: usize, o: &mut [f64]) -> Result<(), Infallible> { o.fill(0.0); Ok(()) }
/// #   fn accumulate<P: Element, S: Element>(&mut self, _: Accumulate, _: &mut [S], _: &[P], _: &[P], _: &Coeffs) -> Result<(), Infallible> { Ok(()) }
/// #   fn apply<P: Element, S: Element>(&mut self, _: ApplyArgs<'_, Self, P, S>, _: &Coeffs) -> Result<(), Infallible> { Ok(()) }
/// # }
/// sage_core::slice_host_buffers!(Mine, "mine");
/// let buf = Mine.upload(&[1.0f32, 2.0]).unwrap();
/// assert_eq!(Mine.to_host::<f32>(&buf).unwrap(), [1.0, 2.0]);
/// ```
#[cfg(feature = "alloc")]
#[macro_export]
macro_rules! slice_host_buffers {
    ($ty:ty) => {
        $crate::slice_host_buffers!($ty, stringify!($ty));
    };
    ($ty:ty, $name:expr) => {
        impl $crate::HostBuffers for $ty {
            type Owned<E: $crate::Element> = $crate::host::__Vec<E>;
            fn describe(&self, out: &mut dyn ::core::fmt::Write) -> ::core::fmt::Result {
                out.write_str($name)
            }
            fn upload<E: $crate::Element>(
                &mut self,
                data: &[E],
            ) -> Result<$crate::host::__Vec<E>, Self::Error> {
                Ok(data.to_vec())
            }
            fn copy_to_host<E: $crate::Element>(
                &mut self,
                buf: &[E],
                out: &mut [E],
            ) -> Result<(), Self::Error> {
                out.copy_from_slice(buf);
                Ok(())
            }
            fn copy_from_host<E: $crate::Element>(
                &mut self,
                buf: &mut [E],
                data: &[E],
            ) -> Result<(), Self::Error> {
                buf.copy_from_slice(data);
                Ok(())
            }
        }
    };
}
