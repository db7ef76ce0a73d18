//! A step's launch kept for the next one. When every tensor of a step went into one packed
//! launch (all cut from the same five buffers, as slabs are), its slot and work-group tables
//! stay on the device; a later step whose tensors sit at exactly the same places — the same
//! root objects, offsets and lengths, buffer for buffer — and whose coefficients fall into the
//! same records reuses them and uploads only its coefficients. Training steps the same tensors
//! every time, so after the first step a tensor costs a comparison of its buffers' places and
//! of its coefficients' bits on the host.
//!
//! Why that is as safe as the full check: the full step checked the kept layout (contexts, no
//! buffer it writes overlapping another) and its verdict depends only on which byte ranges of
//! which root objects the buffers cover, which a match reproduces exactly. Roots are compared
//! by address, so a root freed and another allocated at its address still matches only with
//! the same layout, which the verdict then holds for as well.

use ocl::core::Mem;
use sage_core::{Coeffs, DType, Element, ParamTensor};

use crate::backend::OpenCl;
use crate::buffer::ClBuffer;
use crate::table::Table;

/// One tensor of a kept launch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct KeptTensor {
    len: usize,
    /// Bytes from each position's root (0 when absent).
    offsets: [usize; 5],
    /// Its coefficients' record.
    k: u32,
}

/// A packed launch over every tensor of a step, kept on the device.
pub(crate) struct Kept {
    /// Parameter and state storage.
    dtypes: (DType, DType),
    /// The root objects of param, grad, m, v, ibar as addresses (0: absent).
    roots: [usize; 5],
    tensors: Vec<KeptTensor>,
    /// The slot table and each work-group's slot, as uploaded.
    pub slots: Mem,
    pub group_slot: Mem,
    /// Work-groups of the launch, and their size.
    pub groups: usize,
    pub wg: usize,
}

/// Where a buffer of a step is: its root object as an address (0 when the buffer is empty),
/// its offset there in bytes, its context, its length.
#[derive(Clone, Copy)]
struct Where {
    root: usize,
    offset: usize,
    context: usize,
    len: usize,
}

fn where_is<E: Element>(b: &ClBuffer<E>) -> Where {
    let (root, offset, context) = b.place.as_ref().map_or((0, 0, 0), |p| {
        (p.root.as_ptr() as usize, p.offset, p.context)
    });
    Where {
        root,
        offset,
        context,
        len: b.len,
    }
}

/// The five buffers of a tensor in kernel-argument order (`None`: an absent state buffer).
fn buffers<P: Element, S: Element>(t: &ParamTensor<'_, OpenCl, P, S>) -> [Option<Where>; 5] {
    let (m, v, b) = t.state();
    [
        Some(where_is(t.param())),
        Some(where_is(t.grad())),
        m.map(where_is),
        v.map(where_is),
        b.map(where_is),
    ]
}

impl Kept {
    /// Keeps a launch: `tensors` are every tensor of the step, in order, as (elements, byte
    /// offsets per position, coefficient record); `roots` the five root addresses.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        dtypes: (DType, DType),
        roots: [usize; 5],
        tensors: impl Iterator<Item = (usize, [usize; 5], u32)>,
        slots: Mem,
        group_slot: Mem,
        groups: usize,
        wg: usize,
    ) -> Self {
        Kept {
            dtypes,
            roots,
            tensors: tensors
                .map(|(len, offsets, k)| KeptTensor { len, offsets, k })
                .collect(),
            slots,
            group_slot,
            groups,
            wg,
        }
    }

    /// The coefficient table of a step over `tensors` (each with the coefficients `k` gives
    /// it) when they are laid out as kept, in the backend's `context`; `None` when anything
    /// differs (the step then takes the full path, which also reports any error).
    pub fn matches<'a, P: Element, S: Element>(
        &self,
        context: usize,
        tensors: &'a [ParamTensor<'_, OpenCl, P, S>],
        k: impl Fn(&'a ParamTensor<'_, OpenCl, P, S>) -> &'a Coeffs,
    ) -> Option<Table> {
        if self.dtypes != (P::DTYPE, S::DTYPE) || tensors.len() != self.tensors.len() {
            return None;
        }
        let mut table = Table::with_capacity(0);
        for (t, kept) in tensors.iter().zip(&self.tensors) {
            for (j, at) in buffers(t).into_iter().enumerate() {
                // An absent state buffer matches where the kept step had none (root 0); an
                // empty buffer (root 0) never matches a kept one.
                let same = at.map_or(self.roots[j] == 0, |w| {
                    w.root != 0
                        && w.root == self.roots[j]
                        && w.offset == kept.offsets[j]
                        && w.context == context
                        && w.len == kept.len
                });
                if !same {
                    return None;
                }
            }
            if table.coeffs_index(k(t)) != kept.k {
                return None;
            }
        }
        Some(table)
    }

    /// The memory objects at the roots, from a step's first tensor (the current objects, for
    /// the launch's arguments).
    pub fn roots_of<'t, P: Element, S: Element>(
        t: &'t ParamTensor<'_, OpenCl, P, S>,
    ) -> [Option<&'t Mem>; 5] {
        fn root<E: Element>(b: Option<&ClBuffer<E>>) -> Option<&Mem> {
            b.and_then(|b| b.place.as_ref()).map(|p| &p.root)
        }
        let (m, v, b) = t.state();
        [
            root(Some(t.param())),
            root(Some(t.grad())),
            root(m),
            root(v),
            root(b),
        ]
    }
}
