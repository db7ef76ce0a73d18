//! What the suite needs from a backend beyond [`Backend`]: owned buffers, upload and download.

use sage_core::{Backend, DType, Element};

/// A backend the suite can drive: it can make buffers from host data and read them back.
/// `Clone` hands the optimizer under test its own handle to the same device.
///
/// Implement it for your own backend and run the whole suite with
/// [`conformance_tests!`](crate::conformance_tests).
pub trait Harness: Backend + Clone {
    /// A buffer this backend owns.
    type Owned<E: Element>;
    /// Name shown in reports (`cpu`, `cuda:0 (NVIDIA H100)`, ...).
    fn name(&self) -> String;
    /// Whether buffers of `d` can be stepped here (e.g. f16 needs `cl_khr_fp16` on OpenCL).
    fn supports(&self, d: DType) -> bool {
        let _ = d;
        true
    }
    /// A new buffer holding `data`.
    fn upload<E: Element>(&mut self, data: &[E]) -> Result<Self::Owned<E>, Self::Error>;
    /// The contents of `buf`.
    fn download<E: Element>(&mut self, buf: &Self::Owned<E>) -> Result<Vec<E>, Self::Error>;
    /// Borrow an owned buffer as the backend's buffer type.
    fn buf<E: Element>(o: &Self::Owned<E>) -> &Self::Buf<E>;
    /// Borrow an owned buffer mutably.
    fn buf_mut<E: Element>(o: &mut Self::Owned<E>) -> &mut Self::Buf<E>;
}
