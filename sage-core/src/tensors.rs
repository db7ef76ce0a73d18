//! What one step takes: a set of [`ParamTensor`]s that may mix storage types.
//!
//! A mixed-precision model (bf16 weights, f32 LayerNorms, f16 adapters) is stepped once: pass
//! one slice per storage pair, bundled in a tuple, and the optimizer computes one norm, makes
//! one guard decision and advances every count once over all of them. No allocation: the
//! optimizer walks the slices with a [`Visit`]or, once per phase, and every phase sees the
//! same tensors because the whole set stays borrowed for the one call.
//!
//! ```ignore
//! opt.step(&mut (&mut bf16_weights[..], &mut f32_norms[..]))?;
//! ```

use crate::backend::{Backend, ParamTensor};
use crate::element::Element;

/// Something that visits every homogeneous slice of a [`TensorSet`], in order.
pub trait Visit<'a, B: Backend + ?Sized> {
    /// What stops the walk.
    type Error;
    /// Called once per slice of tensors stored as `P` with state `S`.
    fn tensors<P: Element, S: Element>(
        &mut self,
        tensors: &mut [ParamTensor<'a, B, P, S>],
    ) -> Result<(), Self::Error>;
}

/// The tensors of one step: a slice (or array, or `Vec`) of [`ParamTensor`]s of one storage
/// pair, or a tuple of such sets for mixed precisions.
pub trait TensorSet<'a, B: Backend + ?Sized> {
    /// Visits every slice in order (the order defines the tensors' indices in errors and
    /// reports, and the order norms are summed in).
    fn visit<V: Visit<'a, B>>(&mut self, v: &mut V) -> Result<(), V::Error>;
}

impl<'a, B: Backend + ?Sized, P: Element, S: Element> TensorSet<'a, B>
    for [ParamTensor<'a, B, P, S>]
{
    fn visit<V: Visit<'a, B>>(&mut self, v: &mut V) -> Result<(), V::Error> {
        v.tensors(self)
    }
}

impl<'a, B: Backend + ?Sized, P: Element, S: Element, const N: usize> TensorSet<'a, B>
    for [ParamTensor<'a, B, P, S>; N]
{
    fn visit<V: Visit<'a, B>>(&mut self, v: &mut V) -> Result<(), V::Error> {
        v.tensors(&mut self[..])
    }
}

#[cfg(feature = "alloc")]
impl<'a, B: Backend + ?Sized, P: Element, S: Element> TensorSet<'a, B>
    for alloc::vec::Vec<ParamTensor<'a, B, P, S>>
{
    fn visit<V: Visit<'a, B>>(&mut self, v: &mut V) -> Result<(), V::Error> {
        v.tensors(&mut self[..])
    }
}

impl<'a, B: Backend + ?Sized, T: TensorSet<'a, B> + ?Sized> TensorSet<'a, B> for &mut T {
    fn visit<V: Visit<'a, B>>(&mut self, v: &mut V) -> Result<(), V::Error> {
        (**self).visit(v)
    }
}

macro_rules! tuple_set {
    ($($t:ident . $i:tt),+) => {
        impl<'a, B: Backend + ?Sized, $($t: TensorSet<'a, B>),+> TensorSet<'a, B> for ($($t,)+) {
            fn visit<V: Visit<'a, B>>(&mut self, v: &mut V) -> Result<(), V::Error> {
                $(self.$i.visit(v)?;)+
                Ok(())
            }
        }
    };
}

tuple_set!(A.0);
tuple_set!(A.0, C.1);
tuple_set!(A.0, C.1, D.2);
tuple_set!(A.0, C.1, D.2, E.3);
tuple_set!(A.0, C.1, D.2, E.3, F.4);
tuple_set!(A.0, C.1, D.2, E.3, F.4, G.5);
tuple_set!(A.0, C.1, D.2, E.3, F.4, G.5, H.6);
tuple_set!(A.0, C.1, D.2, E.3, F.4, G.5, H.6, I.7);
tuple_set!(A.0, C.1, D.2, E.3, F.4, G.5, H.6, I.7, J.8);
