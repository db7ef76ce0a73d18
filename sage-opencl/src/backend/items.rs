//! A step's tensors, validated: lengths, contexts and aliasing, and where each buffer lives.

use super::*;

/// One tensor of a fused step, validated.
pub(super) struct Item<'a> {
    /// Position in the caller's list of tensors, and its name, for errors.
    pub(super) tensor: usize,
    pub(super) name: Option<&'a str>,
    pub(super) k: &'a Coeffs,
    pub(super) len: usize,
    pub(super) p: Buf<'a>,
    pub(super) g: Buf<'a>,
    pub(super) m: Option<Buf<'a>>,
    pub(super) v: Option<Buf<'a>>,
    pub(super) b: Option<Buf<'a>>,
}

/// One non-empty buffer of a step: its memory object and where that lives.
#[derive(Clone, Copy)]
pub(super) struct Buf<'a> {
    pub(super) mem: &'a Mem,
    pub(super) place: &'a Place,
}

impl<'a> Buf<'a> {
    pub(super) fn of<E: Element>(b: &'a ClBuffer<E>) -> Self {
        Buf {
            mem: mem_of(b),
            place: b.place.as_ref().expect("non-empty ClBuffer has a place"),
        }
    }
}

impl<'a> Item<'a> {
    /// The buffers in kernel-argument order (param, grad, m, v, ibar).
    pub(super) fn bufs(&self) -> [Option<Buf<'a>>; 5] {
        [Some(self.p), Some(self.g), self.m, self.v, self.b]
    }

    /// The memory objects at the roots (`None` when absent).
    pub(super) fn roots(&self) -> [Option<&'a Mem>; 5] {
        self.bufs().map(|b| b.map(|b| &b.place.root))
    }
}

/// Where a step's items live, for packing launches (from [`OpenCl::check_items`]).
pub(super) struct Placements {
    /// Per item, the memory objects at the roots as addresses (0 when absent): tensors with
    /// equal keys can share a packed launch. `None` when a buffer's offset is not a whole
    /// number of elements, which a kernel cannot address from its root.
    pub(super) keys: Vec<Option<[usize; 5]>>,
    /// Per item, each buffer's offset in elements (0 when absent or not whole).
    pub(super) offsets: Vec<[u64; 5]>,
}

/// Bytes per element of each buffer position (param, grad, m, v, ibar).
pub(super) fn sizes(psize: usize, ssize: usize) -> [usize; 5] {
    [psize, psize, ssize, ssize, ssize]
}

/// Chunks `first .. first + chunks` of one buffer on the norm grid.
pub(super) struct NormItem<'a> {
    /// `None` only for an empty buffer.
    pub(super) mem: Option<&'a Mem>,
    /// Where it lives, and its offset in elements there when a whole number of them.
    pub(super) place: Option<(&'a Place, Option<u64>)>,
    pub(super) len: usize,
    pub(super) first: usize,
    pub(super) chunks: usize,
}

impl<'a> NormItem<'a> {
    pub(super) fn whole<E: Element>(b: &'a ClBuffer<E>) -> Self {
        Self::window(b, 0, norm::chunk_count(b.len))
    }

    pub(super) fn window<E: Element>(b: &'a ClBuffer<E>, first: usize, chunks: usize) -> Self {
        let size = E::DTYPE.size();
        NormItem {
            mem: b.mem.as_ref(),
            place: b.place.as_ref().map(|p| (p, p.elements(size))),
            len: b.len,
            first,
            chunks,
        }
    }

    /// The root's address when this buffer can share a packed launch.
    pub(super) fn root(&self) -> Option<usize> {
        match self.place {
            Some((p, Some(_))) => Some(p.root.as_ptr() as usize),
            _ => None,
        }
    }
}

pub(super) fn check_len(buffer: &'static str, expected: usize, got: usize) -> Result<(), Error> {
    if expected == got {
        Ok(())
    } else {
        Err(Error::LengthMismatch {
            buffer,
            expected,
            got,
        })
    }
}

/// The memory object of a buffer that has `len > 0` elements.
pub(super) fn mem_of<E: Element>(b: &ClBuffer<E>) -> &Mem {
    b.mem
        .as_ref()
        .expect("non-empty ClBuffer has a memory object")
}

/// Validates one tensor's lengths; `None` when it is empty (nothing to do). Contexts and
/// aliasing are checked over a whole launch list ([`OpenCl::check_items`]).
pub(super) fn item<'a, P: Element, S: Element>(
    (tensor, name): (usize, Option<&'a str>),
    k: &'a Coeffs,
    param: &'a ClBuffer<P>,
    grad: &'a ClBuffer<P>,
    m: Option<&'a ClBuffer<S>>,
    v: Option<&'a ClBuffer<S>>,
    b: Option<&'a ClBuffer<S>>,
) -> Result<Option<Item<'a>>, Error> {
    let n = param.len;
    check_len("grad", n, grad.len)?;
    for (name, s) in [("m", m), ("v", v), ("ibar", b)] {
        if let Some(s) = s {
            check_len(name, n, s.len)?;
        }
    }
    if n == 0 {
        return Ok(None);
    }
    Ok(Some(Item {
        tensor,
        name,
        k,
        len: n,
        p: Buf::of(param),
        g: Buf::of(grad),
        m: m.map(Buf::of),
        v: v.map(Buf::of),
        b: b.map(Buf::of),
    }))
}

/// The items of a step's non-empty tensors, each with the coefficients `k` gives it. The
/// kernels write through the memory objects, so shared borrows of the tensors are enough: no
/// per-tensor copy of anything.
pub(super) fn items<'a, P: Element, S: Element>(
    tensors: &'a [ParamTensor<'_, OpenCl, P, S>],
    k: impl Fn(&'a ParamTensor<'_, OpenCl, P, S>) -> &'a Coeffs,
) -> Result<Vec<Item<'a>>, Error> {
    let mut items = Vec::with_capacity(tensors.len());
    for (i, t) in tensors.iter().enumerate() {
        let (m, v, b) = t.state();
        if let Some(it) = item((i, t.name_str()), k(t), t.param(), t.grad(), m, v, b)? {
            items.push(it);
        }
    }
    Ok(items)
}

impl OpenCl {
    /// Checks every buffer of `items` before anything is launched: it belongs to this
    /// backend's context ([`Error::ForeignBuffer`]), and no buffer the step writes (θ, `m`,
    /// `v`, `ibar`) shares memory with any other buffer of the step — the same memory object
    /// (a [`ClBuffer`] clone), or overlapping sub-buffers of one ([`Error::Aliased`]). Two
    /// tensors may share a gradient (it is only read). `psize`/`ssize`: bytes per parameter
    /// and state element. Returns where the items live, read in the same pass.
    pub(super) fn check_items<'a>(
        &self,
        items: &[Item<'a>],
        psize: usize,
        ssize: usize,
    ) -> Result<Placements, Error> {
        /// One buffer of one tensor: bytes `start..end` of memory object `root`; `who` is
        /// the tensor's index in `items` times 5 plus the buffer's position. Small, so that
        /// sorting tens of thousands of them stays cheap.
        #[derive(Clone, Copy)]
        struct Use {
            root: usize,
            start: usize,
            end: usize,
            who: usize,
            written: bool,
        }
        const NAMES: [&str; 5] = ["param", "grad", "m", "v", "ibar"];
        let sizes = sizes(psize, ssize);
        let ctx = self.shared.context.as_ptr() as usize;
        // The common layout is checked in one pass with no allocation: each buffer position
        // (param, grad, m, v, ibar) cut from one memory object of its own, tensor after
        // tensor at increasing offsets (slabs). `lane[slot]`: that object and the end of the
        // previous tensor's buffer in it. Anything else (own allocations, buffers out of
        // order, one gradient for two tensors) goes through the general check below.
        let mut lane: [Option<(usize, usize)>; 5] = [None; 5];
        let mut ordered = true;
        let mut placed = Placements {
            keys: Vec::with_capacity(items.len()),
            offsets: Vec::with_capacity(items.len()),
        };
        for it in items {
            let (mut key, mut offsets, mut whole) = ([0; 5], [0; 5], true);
            for (slot, (buf, size)) in it.bufs().into_iter().zip(sizes).enumerate() {
                let Some(buf) = buf else { continue };
                if buf.place.context != ctx {
                    return Err(Error::ForeignBuffer {
                        tensor: it.tensor,
                        name: it.name.map(str::to_string),
                        buffer: NAMES[slot],
                    });
                }
                let root = buf.place.root.as_ptr() as usize;
                key[slot] = root;
                match buf.place.elements(size) {
                    Some(o) => offsets[slot] = o,
                    None => whole = false,
                }
                if ordered {
                    let start = buf.place.offset;
                    ordered = lane[slot].is_none_or(|(r, end)| r == root && start >= end);
                    lane[slot] = Some((root, start.saturating_add(it.len.saturating_mul(size))));
                }
            }
            placed.keys.push(whole.then_some(key));
            placed.offsets.push(offsets);
        }
        // One object per position, and no object in two positions.
        let roots = lane.map(|l| l.map(|(r, _)| r));
        let distinct = (0..5).all(|a| (0..a).all(|b| roots[a].is_none() || roots[a] != roots[b]));
        if ordered && distinct {
            return Ok(placed);
        }
        let mut by_slot: [Vec<Use>; 5] = Default::default();
        for (index, it) in items.iter().enumerate() {
            for (slot, (buf, size)) in it.bufs().into_iter().zip(sizes).enumerate() {
                let Some(buf) = buf else { continue };
                let offset = buf.place.offset;
                by_slot[slot].push(Use {
                    root: buf.place.root.as_ptr() as usize,
                    start: offset,
                    end: offset.saturating_add(it.len.saturating_mul(size)),
                    who: index * 5 + slot,
                    // Every buffer but the gradient is written.
                    written: slot != 1,
                });
            }
        }
        // Grouped by memory object and sorted by start within each: every overlapping pair
        // meets when its later member is reached, against the furthest-reaching earlier use
        // (any, or written). Sorting tens of thousands of uses costs milliseconds; slabs are
        // already in that order, which a scan confirms.
        let mut uses = by_slot.concat();
        // Each memory object in one run of non-decreasing starts (few runs: slab-like).
        let grouped_by_root = |uses: &[Use]| {
            let mut roots: Vec<usize> = uses.first().map(|u| u.root).into_iter().collect();
            for w in uses.windows(2) {
                if w[0].root != w[1].root {
                    roots.push(w[1].root);
                    if roots.len() > 64 {
                        return false;
                    }
                } else if w[1].start < w[0].start {
                    return false;
                }
            }
            let n = roots.len();
            roots.sort_unstable();
            roots.dedup();
            roots.len() == n
        };
        if !grouped_by_root(&uses) {
            uses.sort_unstable_by_key(|u| (u.root, u.start, u.who));
        }
        let (mut any, mut written): (Option<usize>, Option<usize>) = (None, None);
        for i in 0..uses.len() {
            let u = uses[i];
            if i > 0 && uses[i - 1].root != u.root {
                (any, written) = (None, None);
            }
            let reaches = |j: Option<usize>| j.filter(|&j| uses[j].end > u.start);
            let clash = if u.written {
                reaches(any)
            } else {
                reaches(written)
            };
            if let Some(j) = clash {
                // Name the later buffer in step order, the other one beside it.
                let (a, b) = (u.who.max(uses[j].who), u.who.min(uses[j].who));
                let (ta, tb) = (&items[a / 5], &items[b / 5]);
                return Err(Error::Aliased {
                    tensor: ta.tensor,
                    name: ta.name.map(str::to_string),
                    buffer: NAMES[a % 5],
                    other_tensor: tb.tensor,
                    other_buffer: NAMES[b % 5],
                });
            }
            if any.is_none_or(|j| uses[j].end < u.end) {
                any = Some(i);
            }
            if u.written && written.is_none_or(|j| uses[j].end < u.end) {
                written = Some(i);
            }
        }
        Ok(placed)
    }
}
