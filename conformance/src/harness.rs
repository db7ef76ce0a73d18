//! What the suite needs from a backend beyond [`Backend`]: owned buffers, upload and download.

#[doc(hidden)]
pub use sage_core::Element;
use sage_core::{Backend, DType};

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

/// Implements [`Harness`] for a backend whose buffers are slices (`Buf<E> = [E]`): owned
/// buffers are `Vec`s, upload and download are copies. The second argument names an instance.
///
/// ```ignore
/// sage_conformance::slice_harness!(MyCpuBackend, |b: &MyCpuBackend| format!("mine/{}", b.level()));
/// ```
#[macro_export]
macro_rules! slice_harness {
    ($ty:ty, $name:expr) => {
        impl $crate::Harness for $ty {
            type Owned<E: $crate::harness::Element> = Vec<E>;
            fn name(&self) -> String {
                let name: fn(&$ty) -> String = $name;
                name(self)
            }
            fn upload<E: $crate::harness::Element>(
                &mut self,
                data: &[E],
            ) -> Result<Vec<E>, Self::Error> {
                Ok(data.to_vec())
            }
            fn download<E: $crate::harness::Element>(
                &mut self,
                buf: &Vec<E>,
            ) -> Result<Vec<E>, Self::Error> {
                Ok(buf.clone())
            }
            fn buf<E: $crate::harness::Element>(o: &Vec<E>) -> &[E] {
                o
            }
            fn buf_mut<E: $crate::harness::Element>(o: &mut Vec<E>) -> &mut [E] {
                o
            }
        }
    };
}
