//! [`SimdCpu`]: the vector kernels of one instruction-set [`Level`], and threads for large
//! steps.

use core::fmt;
use core::ptr;

use sage_core::formula::Accumulate;
use sage_core::norm;
use sage_core::{ApplyArgs, Backend, Coeffs, Element, Infallible, ParamTensor, TensorMut};

use crate::kernel::{self, Bufs, KernelFn, Present, Then};
use crate::level::Level;
use crate::portable::{self, Cpu};
#[cfg(feature = "std")]
use crate::split::{Shared, Split, Unit};
#[cfg(feature = "std")]
use alloc::vec::Vec;

/// The SIMD CPU backend: kernels for one instruction-set [`Level`] (AVX2, AVX-512, NEON or the
/// portable fallback), chosen once, and, with `std`, worker threads for large steps.
///
/// Buffers are slices, as for [`Cpu`]. Results equal [`Cpu`]'s bit for bit at every level
/// and thread count: each lane does the operations of `sage_core::formula` in the same order,
/// and threads split the elements, not the arithmetic.
///
/// ```
/// use sage_core::{Algorithm, Config, Optimizer, ParamGroup, ParamTensor, TensorState};
/// use sage_cpu::{Level, SimdCpu};
///
/// let cpu = SimdCpu::new(); // the best level here, all hardware threads
/// assert!(cpu.level().is_available());
/// let portable = SimdCpu::with_level(Level::Portable).unwrap().threads(1);
/// # let _ = portable;
/// let cfg = Config::paper(Algorithm::adam(), 1e-3);
/// let mut opt = Optimizer::new(cpu, cfg, [ParamGroup::sage()]).unwrap();
/// let (mut w, g) = (vec![0.5f32; 100], vec![0.1f32; 100]);
/// let mut state = TensorState::<Vec<f32>>::zeros(opt.state_layout(0).unwrap(), 100);
/// opt.step(&mut [ParamTensor::new(&mut w[..], &g[..], state.view())]).unwrap();
/// assert!(w[0] < 0.5);
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SimdCpu {
    level: Level,
    threads: usize,
    min_parallel: usize,
    chunk: usize,
    /// Use AVX512-BF16 for bf16 stores on the `avx512` level (only where the CPU has it).
    native_bf16: bool,
}

/// [`SimdCpu::with_level`] was asked for a level this CPU or build lacks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Unavailable(pub Level);

impl fmt::Display for Unavailable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "CPU level `{}` is not available on this machine", self.0)
    }
}

#[cfg(feature = "std")]
impl std::error::Error for Unavailable {}

impl Default for SimdCpu {
    fn default() -> Self {
        SimdCpu::new()
    }
}

/// Steps below this many elements in all run on one thread: waking workers costs more.
pub const DEFAULT_MIN_PARALLEL: usize = 1 << 16;
/// Elements per unit of work handed to a thread.
pub const DEFAULT_CHUNK: usize = 1 << 15;

impl SimdCpu {
    /// The best level this machine has ([`Level::best`]), all hardware threads.
    pub fn new() -> Self {
        SimdCpu {
            level: Level::best(),
            threads: 0,
            min_parallel: DEFAULT_MIN_PARALLEL,
            chunk: DEFAULT_CHUNK,
            native_bf16: crate::level::has_avx512_bf16(),
        }
    }

    /// Forces `level`; an error if this CPU (or build) cannot run it.
    pub fn with_level(level: Level) -> Result<Self, Unavailable> {
        if level.is_available() {
            Ok(SimdCpu {
                level,
                ..SimdCpu::new()
            })
        } else {
            Err(Unavailable(level))
        }
    }

    /// Uses up to `n` threads (the caller's included); 0 means one per hardware thread.
    /// Without `std` every step runs on the caller's thread.
    pub fn threads(mut self, n: usize) -> Self {
        self.threads = n;
        self
    }

    /// Steps with fewer elements than `n` (all tensors together) run on one thread.
    pub fn min_parallel(mut self, n: usize) -> Self {
        self.min_parallel = n;
        self
    }

    /// Hands threads `n` elements at a time (rounded up to a multiple of 16; the split points
    /// are then moved to cache-line boundaries of the parameter buffer).
    pub fn chunk(mut self, n: usize) -> Self {
        self.chunk = n.max(1).next_multiple_of(16);
        self
    }

    /// Whether bf16 stores on the `avx512` level use AVX512-BF16's conversion instruction
    /// (default: when the CPU has it; same bits either way — subnormal values take the
    /// integer path, as the instruction flushes them). `false` forces the integer rounding;
    /// `true` is ignored on a CPU without it.
    pub fn native_bf16(mut self, on: bool) -> Self {
        self.native_bf16 = on && crate::level::has_avx512_bf16();
        self
    }

    /// Whether bf16 stores use AVX512-BF16 ([`native_bf16`](Self::native_bf16)).
    pub fn uses_native_bf16(&self) -> bool {
        self.native_bf16 && self.level == Level::Avx512
    }

    /// The instruction-set level.
    pub fn level(&self) -> Level {
        self.level
    }

    /// Threads a large step uses.
    pub fn thread_count(&self) -> usize {
        #[cfg(feature = "std")]
        {
            if self.threads == 0 {
                crate::pool::hardware_threads()
            } else {
                self.threads
            }
        }
        #[cfg(not(feature = "std"))]
        {
            1
        }
    }

    /// The bandwidth floor of a step, for benchmarks: for every tensor, the same loads and
    /// stores as its fused step (the buffers it has, the same storage conversions, the same
    /// threads and split) with one add per stored value instead of the update. Changes the
    /// buffers' contents; reads `coeffs().step` as the gradient factor.
    pub fn stream_floor<P: Element, S: Element>(
        &mut self,
        tensors: &mut [ParamTensor<'_, Self, P, S>],
    ) {
        let (level, bf16) = (self.level, self.native_bf16);
        self.run_tensors(tensors, |_: &Coeffs, has| {
            kernel::pick_floor::<P, S>(level, bf16, has).unwrap_or(kernel::floor_scalar::<P, S>)
        });
    }

    /// Steps every tensor (each with the kernel `choose` gives it), split across threads when
    /// large enough ([`crate::split`]), and records in each tensor how many of its updated
    /// parameters are not finite (counted by the kernels as they store θ).
    fn run_tensors<P: Element, S: Element>(
        &mut self,
        tensors: &mut [ParamTensor<'_, Self, P, S>],
        choose: impl Fn(&Coeffs, Present) -> KernelFn<P, S> + Sync,
    ) {
        #[cfg(feature = "std")]
        if self.thread_count() > 1 {
            return self.run_split(tensors, &choose);
        }
        step_in_order(tensors, &choose);
    }

    /// The kernel for a step of a tensor.
    fn step_kernel<P: Element, S: Element>(
        &self,
    ) -> impl Fn(&Coeffs, Present) -> KernelFn<P, S> + Sync {
        let (level, bf16) = (self.level, self.native_bf16);
        move |k, has| kernel::pick::<P, S>(level, bf16, k, has).unwrap_or(portable_kernel::<P, S>)
    }

    /// Threads a pass over `total` elements uses.
    #[cfg(feature = "std")]
    fn threads_for(&self, total: usize) -> usize {
        if total >= self.min_parallel && total > 0 {
            self.thread_count()
        } else {
            1
        }
    }

    /// [`run_tensors`](Self::run_tensors) on several threads: runs of small tensors are
    /// stepped whole by whichever thread takes them; large tensors' pieces, by any thread.
    #[cfg(feature = "std")]
    fn run_split<P: Element, S: Element>(
        &self,
        tensors: &mut [ParamTensor<'_, Self, P, S>],
        choose: &(impl Fn(&Coeffs, Present) -> KernelFn<P, S> + Sync),
    ) {
        use std::sync::atomic::{AtomicU64, Ordering};
        let split = Split::new(
            self.chunk,
            tensors.iter().map(|t| t.param().len()),
            |ti, at, len| aligned_split(tensors[ti].param().as_ptr(), at, len),
        );
        let threads = self.threads_for(split.total);
        if threads <= 1 {
            return step_in_order(tensors, choose);
        }
        let shared = Shared::new(tensors);
        // The large tensors' jobs, set up here; one no kernel takes (mismatched lengths, the
        // caller's bug) runs on the portable path here at once, as `Cpu` would run it.
        let mut bigs = Vec::with_capacity(split.bigs.len());
        let mut counts: Vec<Option<u64>> = Vec::with_capacity(split.bigs.len());
        for &ti in &split.bigs {
            // SAFETY: each large tensor is borrowed once, here; runs hold only small ones.
            let t = unsafe { shared.one(ti) };
            let (view, k) = t.view_and_coeffs();
            match Job::new(view, k, choose) {
                Ok(job) => {
                    bigs.push(Some(job));
                    counts.push(None);
                }
                Err(view) => {
                    bigs.push(None);
                    counts.push(Some(portable::fused(as_cpu(view), k)));
                }
            }
        }
        let bad: Vec<AtomicU64> = bigs.iter().map(|_| AtomicU64::new(0)).collect();
        split.run(threads, |_, unit| match unit {
            // SAFETY: runs are disjoint and hold no large tensor, whose borrows `bigs` keeps.
            Unit::Run { lo, hi } => step_in_order(unsafe { shared.part(lo, hi) }, choose),
            Unit::Piece { big, start, end } => {
                if let Some(job) = &bigs[big] {
                    let n = job.run(start, end, Then::none());
                    if n > 0 {
                        bad[big].fetch_add(n, Ordering::Relaxed);
                    }
                }
            }
        });
        // The jobs borrow the large tensors' coefficients: gone before their counts go in.
        drop(bigs);
        for ((&ti, bad), count) in split.bigs.iter().zip(bad).zip(counts) {
            // SAFETY: the threads are done and the jobs gone: this is the only borrow.
            let t = unsafe { shared.one(ti) };
            // The pool's join orders this load after the workers' adds.
            t.set_non_finite(count.unwrap_or(bad.into_inner()));
        }
    }

    /// Runs one job, split across threads when large enough.
    fn run_job<P: Element, S: Element>(&self, job: &Job<'_, P, S>) {
        #[cfg(feature = "std")]
        if let threads @ 2.. = self.threads_for(job.len) {
            let split = Split::new(self.chunk, core::iter::once(job.len), |_, at, len| {
                aligned_split(job.bufs.p, at, len)
            });
            split.run(threads, |_, unit| {
                let (start, end) = match unit {
                    Unit::Run { .. } => (0, job.len),
                    Unit::Piece { start, end, .. } => (start, end),
                };
                job.run(start, end, Then::none());
            });
            return;
        }
        job.run(0, job.len, Then::none());
    }
}

/// Steps `tensors` one after another on this thread and records each one's count of
/// non-finite parameters; near the end of each tensor its kernel prefetches the next one.
fn step_in_order<P: Element, S: Element>(
    tensors: &mut [ParamTensor<'_, SimdCpu, P, S>],
    choose: &impl Fn(&Coeffs, Present) -> KernelFn<P, S>,
) {
    let mut rest = tensors;
    while let Some((t, after)) = rest.split_first_mut() {
        let then = after.first().map_or(Then::none(), prefetch_of);
        let (view, k) = t.view_and_coeffs();
        let n = match Job::new(view, k, choose) {
            Ok(job) => job.run(0, job.len, then),
            Err(view) => portable::fused(as_cpu(view), k),
        };
        t.set_non_finite(n);
        rest = after;
    }
}

/// Where a tensor's buffers are, for prefetching only (never read or written through).
fn prefetch_of<P: Element, S: Element>(t: &ParamTensor<'_, SimdCpu, P, S>) -> Then<P, S> {
    let (m, v, ib) = t.state();
    let at = |s: Option<&[S]>| s.map_or(ptr::null_mut(), |s| s.as_ptr().cast_mut());
    Then {
        bufs: Bufs {
            p: t.param().as_ptr().cast_mut(),
            g: t.grad().as_ptr(),
            m: at(m),
            v: at(v),
            ib: at(ib),
        },
        len: t.param().len(),
    }
}

/// The first index at or after `at` (capped at `len`) whose element in `p` starts a 64-byte
/// cache line, so that two threads never write the same line of the parameter buffer.
#[cfg(feature = "std")]
fn aligned_split<P>(p: *const P, at: usize, len: usize) -> usize {
    if at >= len {
        return len;
    }
    let size = core::mem::size_of::<P>();
    let addr = (p as usize).wrapping_add(at * size);
    let pad = addr.wrapping_neg() % 64;
    if !pad.is_multiple_of(size) {
        return at; // not element-aligned to lines: any split is as good
    }
    (at + pad / size).min(len)
}

/// The same buffers, typed for [`Cpu`] (both backends' buffers are slices).
fn as_cpu<P: Element, S: Element>(t: TensorMut<'_, SimdCpu, P, S>) -> TensorMut<'_, Cpu, P, S> {
    TensorMut {
        param: t.param,
        grad: t.grad,
        m: t.m,
        v: t.v,
        ibar: t.ibar,
    }
}

/// The portable step as a kernel, for tensors no vector kernel covers.
///
/// # Safety
/// As [`KernelFn`]: every non-null pointer valid for `n` elements, no overlap.
unsafe fn portable_kernel<P: Element, S: Element>(
    k: &Coeffs,
    b: Bufs<P, S>,
    n: usize,
    _then: Then<P, S>,
) -> u64 {
    // SAFETY: the caller guarantees each non-null buffer is valid and exclusive for `n`.
    let state =
        |s: *mut S| (!s.is_null()).then(|| unsafe { core::slice::from_raw_parts_mut(s, n) });
    // SAFETY: as above.
    let (param, grad) = unsafe {
        (
            core::slice::from_raw_parts_mut(b.p, n),
            core::slice::from_raw_parts(b.g, n),
        )
    };
    portable::fused(
        TensorMut {
            param,
            grad,
            m: state(b.m),
            v: state(b.v),
            ibar: state(b.ib),
        },
        k,
    )
}

/// One tensor's step, as raw pointers so that threads can take disjoint ranges of it, with
/// its coefficients borrowed where they are (64 bytes, where a copy made it 152).
struct Job<'k, P, S> {
    k: &'k Coeffs,
    kernel: KernelFn<P, S>,
    bufs: Bufs<P, S>,
    len: usize,
}

// SAFETY: a `Job` is built from exclusive borrows that outlive it (its maker — `run_split`,
// `step_in_order`, `fused_step` — holds them while it runs), and threads only ever run
// disjoint element ranges of it.
unsafe impl<P: Send, S: Send> Sync for Job<'_, P, S> {}

impl<'k, P: Element, S: Element> Job<'k, P, S> {
    /// The job of one tensor, or the tensor back when its buffers' lengths differ: that is
    /// the caller's bug, and the portable path handles it as `Cpu` does (the common prefix,
    /// or a bounds panic), never out of bounds.
    fn new<'a>(
        t: TensorMut<'a, SimdCpu, P, S>,
        k: &'k Coeffs,
        choose: &impl Fn(&Coeffs, Present) -> KernelFn<P, S>,
    ) -> Result<Self, TensorMut<'a, SimdCpu, P, S>> {
        let n = t.param.len();
        let same = |s: &Option<&mut [S]>| s.as_ref().is_none_or(|s| s.len() == n);
        if t.grad.len() != n || !same(&t.m) || !same(&t.v) || !same(&t.ibar) {
            return Err(t);
        }
        let has = Present {
            m: t.m.is_some(),
            v: t.v.is_some(),
            ib: t.ibar.is_some(),
        };
        let ptr_of = |s: Option<&mut [S]>| s.map_or(ptr::null_mut(), |s| s.as_mut_ptr());
        Ok(Job {
            k,
            kernel: choose(k, has),
            len: n,
            bufs: Bufs {
                p: t.param.as_mut_ptr(),
                g: t.grad.as_ptr(),
                m: ptr_of(t.m),
                v: ptr_of(t.v),
                ib: ptr_of(t.ibar),
            },
        })
    }

    /// Runs elements `start..end`; returns how many stored parameters are not finite.
    /// `then`: what this thread runs next (prefetched near the end).
    fn run(&self, start: usize, end: usize, then: Then<P, S>) -> u64 {
        let mut bad = 0;
        let mut at = start;
        while at < end {
            // Kernels take at most MAX_CALL elements (their counters are u32 lanes).
            let to = end.min(at + kernel::MAX_CALL);
            let next = if to < end {
                Then {
                    bufs: self.bufs.range_from(to),
                    len: end - to,
                }
            } else {
                then
            };
            // SAFETY: the pointers come from live, exclusive slices of `len` elements each
            // (checked in `new`), `at..to` is within them, callers hand out disjoint ranges,
            // and the kernel's level was checked available when the `SimdCpu` was made.
            // `next` is only prefetched.
            bad += unsafe { (self.kernel)(self.k, self.bufs.range_from(at), to - at, next) };
            at = to;
        }
        bad
    }
}

impl Backend for SimdCpu {
    type Error = Infallible;
    type Buf<E: Element> = [E];

    fn len<E: Element>(&self, buf: &[E]) -> usize {
        buf.len()
    }

    fn sq_norm_chunks<E: Element>(
        &mut self,
        buf: &[E],
        first: usize,
        out: &mut [f64],
    ) -> Result<(), Infallible> {
        for (c, o) in out.iter_mut().enumerate() {
            *o = kernel::sq_norm(self.level, &buf[norm::chunk_range(buf.len(), first + c)]);
        }
        Ok(())
    }

    fn sq_norm<E: Element>(&mut self, buf: &[E]) -> Result<f64, Infallible> {
        Ok(self.chunked_sq_norm(buf))
    }

    // The primitives only serve the composed step (and its comparison with the fused one):
    // the portable ones are the definition.
    fn accumulate<P: Element, S: Element>(
        &mut self,
        which: Accumulate,
        acc: &mut [S],
        param: &[P],
        grad: &[P],
        k: &Coeffs,
    ) -> Result<(), Infallible> {
        Cpu.accumulate(which, acc, param, grad, k)
    }

    fn apply<P: Element, S: Element>(
        &mut self,
        t: ApplyArgs<'_, Self, P, S>,
        k: &Coeffs,
    ) -> Result<(), Infallible> {
        let ApplyArgs {
            param,
            grad,
            m,
            v,
            ibar,
        } = t;
        Cpu.apply(
            ApplyArgs {
                param,
                grad,
                m,
                v,
                ibar,
            },
            k,
        )
    }

    fn fused_step<P: Element, S: Element>(
        &mut self,
        t: TensorMut<'_, Self, P, S>,
        k: &Coeffs,
    ) -> Result<(), Infallible> {
        let choose = self.step_kernel::<P, S>();
        match Job::new(t, k, &choose) {
            Ok(job) => self.run_job(&job),
            Err(view) => {
                portable::fused(as_cpu(view), k);
            }
        }
        Ok(())
    }

    fn grad_sq_norms<P: Element, S: Element>(
        &mut self,
        tensors: &mut [ParamTensor<'_, Self, P, S>],
    ) -> Result<(), Infallible> {
        #[cfg(feature = "std")]
        if self.thread_count() > 1 {
            self.sq_norms_split(tensors);
            return Ok(());
        }
        self.sq_norms_in_order(tensors);
        Ok(())
    }

    fn step_tensors<P: Element, S: Element>(
        &mut self,
        tensors: &mut [ParamTensor<'_, Self, P, S>],
    ) -> Result<(), Infallible> {
        let choose = self.step_kernel::<P, S>();
        self.run_tensors(tensors, choose);
        Ok(())
    }
}

impl SimdCpu {
    /// A buffer's squared norm on the contract's grid: chunk partials folded in order.
    fn chunked_sq_norm<E: Element>(&self, x: &[E]) -> f64 {
        norm::fold(
            x.chunks(norm::NORM_CHUNK)
                .map(|c| kernel::sq_norm(self.level, c)),
        )
    }

    /// Every tensor's gradient norm, one after another on this thread.
    fn sq_norms_in_order<P: Element, S: Element>(
        &self,
        tensors: &mut [ParamTensor<'_, Self, P, S>],
    ) {
        for t in tensors.iter_mut() {
            let x = self.chunked_sq_norm(t.grad());
            t.set_grad_sq_norm(x);
        }
    }
}

#[cfg(feature = "std")]
impl SimdCpu {
    /// Gradient norms of many tensors across threads: a run of small tensors by one thread,
    /// each tensor's norm set as it is computed; a large tensor's chunks by any thread, each
    /// chunk's partial kept and the tensor's partials folded in order after. The result does
    /// not depend on the thread count or on which thread took which chunk.
    fn sq_norms_split<P: Element, S: Element>(&self, tensors: &mut [ParamTensor<'_, Self, P, S>]) {
        use std::sync::atomic::{AtomicU64, Ordering};
        let split = self.norm_split(tensors);
        let threads = self.threads_for(split.total);
        if threads <= 1 {
            return self.sq_norms_in_order(tensors);
        }
        // Large tensor b's partials are partial[first[b]..first[b + 1]].
        let big_grads: Vec<&[P]> = split.bigs.iter().map(|&ti| tensors[ti].grad()).collect();
        let mut first = Vec::with_capacity(big_grads.len() + 1);
        first.push(0);
        for g in &big_grads {
            first.push(first[first.len() - 1] + norm::chunk_count(g.len()));
        }
        let partial: Vec<AtomicU64> = (0..first[big_grads.len()])
            .map(|_| AtomicU64::new(0))
            .collect();
        let level = self.level;
        let shared = Shared::new(tensors);
        split.run(threads, |_, unit| match unit {
            // SAFETY: runs are disjoint, and nothing else borrows the tensors meanwhile.
            Unit::Run { lo, hi } => self.sq_norms_in_order(unsafe { shared.part(lo, hi) }),
            Unit::Piece { big, start, end } => {
                let g = big_grads[big];
                for (c, at) in (start..end).step_by(norm::NORM_CHUNK).enumerate() {
                    let x = kernel::sq_norm(level, &g[at..(at + norm::NORM_CHUNK).min(end)]);
                    let slot = first[big] + start / norm::NORM_CHUNK + c;
                    partial[slot].store(x.to_bits(), Ordering::Relaxed);
                }
            }
        });
        for (b, &ti) in split.bigs.iter().enumerate() {
            // The pool's join (a mutex hand-off) orders these loads after the stores.
            let own = &partial[first[b]..first[b + 1]];
            let x = norm::fold(
                own.iter()
                    .map(|x| f64::from_bits(x.load(Ordering::Relaxed))),
            );
            // SAFETY: the threads are done: this is the only borrow.
            unsafe { shared.one(ti) }.set_grad_sq_norm(x);
        }
    }

    /// The norm pass's split of the gradients of `tensors`: large ones cut on the chunk grid.
    fn norm_split<P: Element, S: Element>(&self, tensors: &[ParamTensor<'_, Self, P, S>]) -> Split {
        Split::new(
            self.chunk,
            tensors.iter().map(|t| t.grad().len()),
            |_, at, len| at.next_multiple_of(norm::NORM_CHUNK).min(len),
        )
    }

    /// The bandwidth floor of the gradient-norm pass, for benchmarks: every gradient read
    /// once (widened to f32 in registers, as the norm does) on the same threads and split as
    /// [`Backend::grad_sq_norms`], with one add per element instead of the squares in `f64`.
    /// Returns the sum of every gradient element (so that the reads happen).
    pub fn stream_read_floor<P: Element, S: Element>(
        &mut self,
        tensors: &[ParamTensor<'_, Self, P, S>],
    ) -> f32 {
        use std::sync::atomic::{AtomicU32, Ordering};
        let level = self.level;
        let in_order = |ts: &[ParamTensor<'_, Self, P, S>]| -> f32 {
            ts.iter().map(|t| kernel::read_floor(level, t.grad())).sum()
        };
        let split = self.norm_split(tensors);
        let threads = self.threads_for(split.total);
        if threads <= 1 {
            return in_order(tensors);
        }
        // A result slot per unit, as the norm keeps one per chunk (no lock per unit).
        let slots: Vec<AtomicU32> = split.units.iter().map(|_| AtomicU32::new(0)).collect();
        split.run(threads, |u, unit| {
            let x = match unit {
                Unit::Run { lo, hi } => in_order(&tensors[lo..hi]),
                Unit::Piece { big, start, end } => {
                    kernel::read_floor(level, &tensors[split.bigs[big]].grad()[start..end])
                }
            };
            slots[u].store(x.to_bits(), Ordering::Relaxed);
        });
        slots
            .into_iter()
            .map(|x| f32::from_bits(x.into_inner()))
            .sum()
    }
}

#[cfg(feature = "alloc")]
impl sage_core::HostBuffers for SimdCpu {
    type Owned<E: Element> = alloc::vec::Vec<E>;
    /// `cpu/avx2`, `cpu/avx512`, `cpu/neon`, `cpu/portable-simd` (this type on its portable
    /// level); `/mt` when steps are split across threads.
    fn describe(&self, out: &mut dyn fmt::Write) -> fmt::Result {
        match self.level {
            Level::Portable => out.write_str("cpu/portable-simd")?,
            l => write!(out, "cpu/{}", l.name())?,
        }
        if self.thread_count() > 1 {
            out.write_str("/mt")?;
        }
        Ok(())
    }
    fn upload<E: Element>(&mut self, data: &[E]) -> Result<alloc::vec::Vec<E>, Infallible> {
        Ok(data.to_vec())
    }
    fn copy_to_host<E: Element>(&mut self, buf: &[E], out: &mut [E]) -> Result<(), Infallible> {
        out.copy_from_slice(buf);
        Ok(())
    }
    fn copy_from_host<E: Element>(&mut self, buf: &mut [E], data: &[E]) -> Result<(), Infallible> {
        buf.copy_from_slice(data);
        Ok(())
    }
}
