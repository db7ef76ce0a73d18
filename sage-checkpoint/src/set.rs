//! What one save or restore takes: [`Entry`]s (or [`EntryMut`]s) of one storage pair, or a
//! tuple of such sets for a model that mixes storage types (bf16 weights, f32 LayerNorms),
//! the way `sage_core::TensorSet` bundles a mixed-precision step. One checkpoint holds them
//! all, and one restore checks every entry of every set before it writes into any.
//!
//! ```ignore
//! save_optimizer(&mut opt, &(&bf16_entries[..], &f32_entries[..]))?;
//! load(&mut opt, &bytes, &mut (&mut bf16_targets[..], &mut f32_targets[..]), ConfigCheck::Exact)?;
//! ```
//!
//! Callers only pass sets; the visitor traits are how this crate walks them.

use sage_core::{Backend, Element};

use crate::checkpoint::{Entry, EntryMut};

/// Something that visits every homogeneous slice of an [`EntrySet`], in order.
pub trait VisitEntries<'a, B: Backend + ?Sized> {
    /// What stops the walk.
    type Error;
    /// Called once per slice of entries with θ stored as `P` and state as `S`.
    fn entries<P: Element, S: Element>(
        &mut self,
        entries: &[Entry<'a, B, P, S>],
    ) -> Result<(), Self::Error>;
}

/// Something that visits every homogeneous slice of an [`EntrySetMut`], in order.
pub trait VisitEntriesMut<'a, B: Backend + ?Sized> {
    /// What stops the walk.
    type Error;
    /// Called once per slice of entries with θ stored as `P` and state as `S`.
    fn entries<P: Element, S: Element>(
        &mut self,
        entries: &mut [EntryMut<'a, B, P, S>],
    ) -> Result<(), Self::Error>;
}

/// The entries of one save: a slice (or array, or `Vec`) of [`Entry`]s of one storage pair,
/// a tuple of such sets, or `()` for none.
pub trait EntrySet<'a, B: Backend + ?Sized> {
    /// Visits every slice in order (the order of the parameters in the file's index).
    fn visit<V: VisitEntries<'a, B>>(&self, v: &mut V) -> Result<(), V::Error>;
}

/// The entries of one restore: the mutable twin of [`EntrySet`].
pub trait EntrySetMut<'a, B: Backend + ?Sized> {
    /// Visits every slice in order.
    fn visit_mut<V: VisitEntriesMut<'a, B>>(&mut self, v: &mut V) -> Result<(), V::Error>;
}

impl<'a, B: Backend + ?Sized, P: Element, S: Element> EntrySet<'a, B> for [Entry<'a, B, P, S>] {
    fn visit<V: VisitEntries<'a, B>>(&self, v: &mut V) -> Result<(), V::Error> {
        v.entries(self)
    }
}

impl<'a, B: Backend + ?Sized, P: Element, S: Element, const N: usize> EntrySet<'a, B>
    for [Entry<'a, B, P, S>; N]
{
    fn visit<V: VisitEntries<'a, B>>(&self, v: &mut V) -> Result<(), V::Error> {
        v.entries(&self[..])
    }
}

impl<'a, B: Backend + ?Sized, P: Element, S: Element> EntrySet<'a, B> for Vec<Entry<'a, B, P, S>> {
    fn visit<V: VisitEntries<'a, B>>(&self, v: &mut V) -> Result<(), V::Error> {
        v.entries(&self[..])
    }
}

impl<'a, B: Backend + ?Sized, T: EntrySet<'a, B> + ?Sized> EntrySet<'a, B> for &T {
    fn visit<V: VisitEntries<'a, B>>(&self, v: &mut V) -> Result<(), V::Error> {
        (**self).visit(v)
    }
}

impl<'a, B: Backend + ?Sized, T: EntrySet<'a, B> + ?Sized> EntrySet<'a, B> for &mut T {
    fn visit<V: VisitEntries<'a, B>>(&self, v: &mut V) -> Result<(), V::Error> {
        (**self).visit(v)
    }
}

impl<'a, B: Backend + ?Sized> EntrySet<'a, B> for () {
    fn visit<V: VisitEntries<'a, B>>(&self, _: &mut V) -> Result<(), V::Error> {
        Ok(())
    }
}

impl<'a, B: Backend + ?Sized, P: Element, S: Element> EntrySetMut<'a, B>
    for [EntryMut<'a, B, P, S>]
{
    fn visit_mut<V: VisitEntriesMut<'a, B>>(&mut self, v: &mut V) -> Result<(), V::Error> {
        v.entries(self)
    }
}

impl<'a, B: Backend + ?Sized, P: Element, S: Element, const N: usize> EntrySetMut<'a, B>
    for [EntryMut<'a, B, P, S>; N]
{
    fn visit_mut<V: VisitEntriesMut<'a, B>>(&mut self, v: &mut V) -> Result<(), V::Error> {
        v.entries(&mut self[..])
    }
}

impl<'a, B: Backend + ?Sized, P: Element, S: Element> EntrySetMut<'a, B>
    for Vec<EntryMut<'a, B, P, S>>
{
    fn visit_mut<V: VisitEntriesMut<'a, B>>(&mut self, v: &mut V) -> Result<(), V::Error> {
        v.entries(&mut self[..])
    }
}

impl<'a, B: Backend + ?Sized, T: EntrySetMut<'a, B> + ?Sized> EntrySetMut<'a, B> for &mut T {
    fn visit_mut<V: VisitEntriesMut<'a, B>>(&mut self, v: &mut V) -> Result<(), V::Error> {
        (**self).visit_mut(v)
    }
}

impl<'a, B: Backend + ?Sized> EntrySetMut<'a, B> for () {
    fn visit_mut<V: VisitEntriesMut<'a, B>>(&mut self, _: &mut V) -> Result<(), V::Error> {
        Ok(())
    }
}

macro_rules! tuple_sets {
    ($($t:ident . $i:tt),+) => {
        impl<'a, B: Backend + ?Sized, $($t: EntrySet<'a, B>),+> EntrySet<'a, B> for ($($t,)+) {
            fn visit<V: VisitEntries<'a, B>>(&self, v: &mut V) -> Result<(), V::Error> {
                $(self.$i.visit(v)?;)+
                Ok(())
            }
        }
        impl<'a, B: Backend + ?Sized, $($t: EntrySetMut<'a, B>),+> EntrySetMut<'a, B>
            for ($($t,)+)
        {
            fn visit_mut<V: VisitEntriesMut<'a, B>>(&mut self, v: &mut V) -> Result<(), V::Error> {
                $(self.$i.visit_mut(v)?;)+
                Ok(())
            }
        }
    };
}

tuple_sets!(A.0);
tuple_sets!(A.0, C.1);
tuple_sets!(A.0, C.1, D.2);
tuple_sets!(A.0, C.1, D.2, E.3);
tuple_sets!(A.0, C.1, D.2, E.3, F.4);
tuple_sets!(A.0, C.1, D.2, E.3, F.4, G.5);
tuple_sets!(A.0, C.1, D.2, E.3, F.4, G.5, H.6);
tuple_sets!(A.0, C.1, D.2, E.3, F.4, G.5, H.6, I.7);
tuple_sets!(A.0, C.1, D.2, E.3, F.4, G.5, H.6, I.7, J.8);
