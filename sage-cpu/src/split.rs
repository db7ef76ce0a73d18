//! How a multi-tensor pass is shared among threads.
//!
//! Tensors of at most `chunk` elements (biases, LayerNorms, adapters: most tensors of most
//! models) are grouped into [`Unit::Run`]s of consecutive tensors, at least `chunk` elements
//! together (fewer in the last run, and in one a large tensor closes); a thread that takes a run does all of each tensor's work itself — sets up its
//! kernel call, runs it, records the result in the tensor — while the tensor's description
//! is in its cache. Larger tensors are cut into [`Unit::Piece`]s of about `chunk` elements;
//! their calls are set up before the threads start and their results gathered after.
//!
//! So the per-tensor host work of a model of 10,000 small tensors runs on every thread,
//! within the pass, instead of in passes of its own over the tensor list on one thread
//! (the list of `ParamTensor`s is larger than a core's L2 there, and each such pass cost
//! about 0.1 ms).
//!
//! Units are pulled one at a time from a shared counter, in order, so each thread walks
//! memory forward, a noisy machine's slow thread takes fewer units, and one counter
//! increment serves a whole run of small tensors.

use alloc::vec::Vec;
use core::marker::PhantomData;
use std::sync::atomic::{AtomicUsize, Ordering};

/// One unit of work.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Unit {
    /// Tensors `lo..hi`, whole: each of at most `chunk` elements.
    Run { lo: usize, hi: usize },
    /// Elements `start..end` of large tensor number `big` ([`Split::bigs`]`[big]` is its
    /// index in the pass).
    Piece {
        big: usize,
        start: usize,
        end: usize,
    },
}

/// A pass's units, in tensor order.
pub(crate) struct Split {
    pub units: Vec<Unit>,
    /// The indices of the tensors cut into pieces (longer than `chunk`), in order.
    pub bigs: Vec<usize>,
    /// Elements of all tensors together.
    pub total: usize,
}

impl Split {
    /// Units for tensors of lengths `lens`. `cut(tensor, at, len)` gives the end of a piece
    /// of a large tensor that should end near `at` (at or after it, at most `len`).
    pub fn new(
        chunk: usize,
        lens: impl Iterator<Item = usize>,
        mut cut: impl FnMut(usize, usize, usize) -> usize,
    ) -> Split {
        let chunk = chunk.max(1);
        let mut units = Vec::new();
        let mut bigs = Vec::new();
        // The open run: its first tensor and its elements so far.
        let mut run: Option<(usize, usize)> = None;
        let mut count = 0;
        let mut total = 0;
        for (ti, len) in lens.enumerate() {
            count = ti + 1;
            total += len;
            if len <= chunk {
                let (lo, filled) = run.unwrap_or((ti, 0));
                if filled + len >= chunk {
                    units.push(Unit::Run { lo, hi: ti + 1 });
                    run = None;
                } else {
                    run = Some((lo, filled + len));
                }
                continue;
            }
            // A large tensor ends the open run, so that runs hold consecutive tensors.
            if let Some((lo, _)) = run.take() {
                units.push(Unit::Run { lo, hi: ti });
            }
            let big = bigs.len();
            bigs.push(ti);
            let mut start = 0;
            while start < len {
                let end = cut(ti, start + chunk, len).clamp(start + 1, len);
                units.push(Unit::Piece { big, start, end });
                start = end;
            }
        }
        if let Some((lo, _)) = run {
            units.push(Unit::Run { lo, hi: count });
        }
        Split { units, bigs, total }
    }

    /// Runs `f(unit index, unit)` for every unit on up to `threads` threads (the caller's
    /// included; one thread runs them in order on the caller).
    pub fn run(&self, threads: usize, f: impl Fn(usize, Unit) + Sync) {
        let next = AtomicUsize::new(0);
        let work = |_worker: usize| loop {
            let u = next.fetch_add(1, Ordering::Relaxed);
            let Some(&unit) = self.units.get(u) else {
                break;
            };
            f(u, unit);
        };
        crate::pool::global().run(threads.min(self.units.len()), &work);
    }
}

/// A slice of which threads borrow disjoint parts mutably: a [`Unit::Run`]'s tensors, or one
/// large tensor while its jobs are set up and after they ran.
pub(crate) struct Shared<'s, T> {
    ptr: *mut T,
    len: usize,
    _slice: PhantomData<&'s mut [T]>,
}

// SAFETY: `Shared` hands out `&mut T` across threads only through the unsafe `part`, whose
// callers promise that the parts are disjoint; so it is as `Sync` as `&mut [T]` is `Send`.
unsafe impl<T: Send> Sync for Shared<'_, T> {}

impl<'s, T> Shared<'s, T> {
    /// Shares `slice` for as long as it is borrowed.
    pub fn new(slice: &'s mut [T]) -> Self {
        Shared {
            ptr: slice.as_mut_ptr(),
            len: slice.len(),
            _slice: PhantomData,
        }
    }

    /// Elements `lo..hi` (a bounds panic past the end).
    ///
    /// # Safety
    /// No other reference to any of these elements may be alive while the part is: callers
    /// take disjoint ranges.
    #[allow(clippy::mut_from_ref)]
    pub unsafe fn part(&self, lo: usize, hi: usize) -> &'s mut [T] {
        assert!(
            lo <= hi && hi <= self.len,
            "part {lo}..{hi} of {}",
            self.len
        );
        // SAFETY: in bounds (checked); exclusive by the caller's promise.
        unsafe { core::slice::from_raw_parts_mut(self.ptr.add(lo), hi - lo) }
    }

    /// Element `i`, as [`part`](Self::part)`(i, i + 1)`.
    ///
    /// # Safety
    /// As for [`part`](Self::part).
    #[allow(clippy::mut_from_ref)]
    pub unsafe fn one(&self, i: usize) -> &'s mut T {
        // SAFETY: the caller's promise, passed on.
        let part = unsafe { self.part(i, i + 1) };
        &mut part[0]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn split(chunk: usize, lens: &[usize]) -> Split {
        Split::new(chunk, lens.iter().copied(), |_, at, len| at.min(len))
    }

    /// Small tensors group into runs of at least `chunk` elements; a large tensor closes the
    /// open run and is cut into pieces; every element of every tensor is in exactly one unit.
    #[test]
    fn units_cover_every_element_once() {
        let s = split(10, &[3, 4, 5, 25, 2, 10, 0, 1]);
        assert_eq!(
            s.units,
            [
                Unit::Run { lo: 0, hi: 3 },
                Unit::Piece {
                    big: 0,
                    start: 0,
                    end: 10
                },
                Unit::Piece {
                    big: 0,
                    start: 10,
                    end: 20
                },
                Unit::Piece {
                    big: 0,
                    start: 20,
                    end: 25
                },
                Unit::Run { lo: 4, hi: 6 },
                Unit::Run { lo: 6, hi: 8 },
            ]
        );
        assert_eq!(s.bigs, [3]);
        // A large tensor right after an open run closes it.
        let s = split(10, &[3, 11]);
        assert_eq!(s.units[0], Unit::Run { lo: 0, hi: 1 });
        assert_eq!(s.units.len(), 3);
        assert!(split(10, &[]).units.is_empty());
        // Only empty tensors: one run still records them.
        assert_eq!(split(10, &[0, 0]).units, [Unit::Run { lo: 0, hi: 2 }]);
    }

    /// Every unit runs once, on any number of threads.
    #[test]
    fn every_unit_runs_once() {
        let s = split(4, &[1, 2, 3, 9, 1, 1, 30, 2]);
        for threads in [1, 2, 5] {
            let seen: Vec<AtomicUsize> = s.units.iter().map(|_| AtomicUsize::new(0)).collect();
            s.run(threads, |u, unit| {
                assert_eq!(s.units[u], unit);
                seen[u].fetch_add(1, Ordering::Relaxed);
            });
            assert!(
                seen.iter().all(|n| n.load(Ordering::Relaxed) == 1),
                "{threads}"
            );
        }
    }
}
