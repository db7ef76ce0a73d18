//! Borrowing a range of a backend buffer as a buffer of that backend, so that a rank steps its
//! piece of a tensor in place: a sub-slice for host backends, an alias of the device memory for
//! CUDA ([`crate::nccl`]).
//!
//! sage-core's `Backend` has no such capability (its buffers are whole allocations); this is
//! the one thing sage-dist asks of a backend beyond `HostBuffers`.

use std::ops::{Deref, DerefMut, Range};

use sage_core::{Backend, Element};

/// A backend whose buffers can lend a sub-range as a buffer of the same backend.
///
/// Callers pass ranges within the buffer (sage-dist checks every length against its layout
/// before it takes a view); an implementation may panic on a range out of bounds, as slice
/// indexing does.
pub trait Views: Backend {
    /// A shared view of part of a buffer.
    type View<'b, E: Element>: Deref<Target = Self::Buf<E>>;
    /// A mutable view of part of a buffer.
    type ViewMut<'b, E: Element>: DerefMut<Target = Self::Buf<E>>;

    /// Elements `range` of `buf`.
    fn view<'b, E: Element>(&self, buf: &'b Self::Buf<E>, range: Range<usize>)
        -> Self::View<'b, E>;

    /// Elements `range` of `buf`, mutably.
    fn view_mut<'b, E: Element>(
        &self,
        buf: &'b mut Self::Buf<E>,
        range: Range<usize>,
    ) -> Self::ViewMut<'b, E>;
}

/// A backend whose buffers are host slices (`Buf<E> = [E]`): the MPI and in-process
/// transports read and write them directly.
pub trait HostSlices: Views {
    /// The buffer as a slice.
    fn host<E: Element>(buf: &Self::Buf<E>) -> &[E];
    /// The buffer as a mutable slice.
    fn host_mut<E: Element>(buf: &mut Self::Buf<E>) -> &mut [E];
}

/// Implements [`Views`] and [`HostSlices`] for a backend whose buffers are slices
/// (`type Buf<E: Element> = [E]`): views are sub-slices. sage-dist does it for
/// `sage_cpu::Cpu` and `sage_cpu::SimdCpu`; a third party's slice backend gets it from one line:
///
/// ```ignore
/// sage_dist::host_slices!(my_crate::MyBackend);
/// ```
#[macro_export]
macro_rules! host_slices {
    ($ty:ty) => {
        impl $crate::Views for $ty {
            type View<'b, E: ::sage_core::Element> = &'b [E];
            type ViewMut<'b, E: ::sage_core::Element> = &'b mut [E];
            fn view<'b, E: ::sage_core::Element>(
                &self,
                buf: &'b [E],
                range: ::std::ops::Range<usize>,
            ) -> &'b [E] {
                &buf[range]
            }
            fn view_mut<'b, E: ::sage_core::Element>(
                &self,
                buf: &'b mut [E],
                range: ::std::ops::Range<usize>,
            ) -> &'b mut [E] {
                &mut buf[range]
            }
        }
        impl $crate::HostSlices for $ty {
            fn host<E: ::sage_core::Element>(buf: &[E]) -> &[E] {
                buf
            }
            fn host_mut<E: ::sage_core::Element>(buf: &mut [E]) -> &mut [E] {
                buf
            }
        }
    };
}

host_slices!(sage_cpu::Cpu);
host_slices!(sage_cpu::SimdCpu);
