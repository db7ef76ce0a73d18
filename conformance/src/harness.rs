//! What the suite needs from a backend: [`Backend`](sage_core::Backend) plus sage-core's
//! host-copy capability [`HostBuffers`], and `Clone` (the optimizer under test gets its own
//! handle to the same device). [`Harness`] only adds conveniences on top, for every such
//! backend at once: a backend implements nothing here.

use std::borrow::{Borrow, BorrowMut};

#[doc(hidden)]
pub use sage_core::Element;
use sage_core::HostBuffers;

/// A backend the suite can drive; implemented for every `HostBuffers + Clone` backend.
pub trait Harness: HostBuffers + Clone {
    /// Name shown in reports ([`HostBuffers::describe`]).
    fn name(&self) -> String {
        let mut s = String::new();
        if self.describe(&mut s).is_err() || s.is_empty() {
            s = std::any::type_name::<Self>().to_string();
        }
        s
    }
    /// The contents of an owned buffer.
    fn download<E: Element>(&mut self, buf: &Self::Owned<E>) -> Result<Vec<E>, Self::Error> {
        self.to_host(buf.borrow())
    }
    /// Borrow an owned buffer as the backend's buffer type.
    fn buf<E: Element>(o: &Self::Owned<E>) -> &Self::Buf<E> {
        o.borrow()
    }
    /// Borrow an owned buffer mutably.
    fn buf_mut<E: Element>(o: &mut Self::Owned<E>) -> &mut Self::Buf<E> {
        o.borrow_mut()
    }
}

impl<B: HostBuffers + Clone> Harness for B {}
