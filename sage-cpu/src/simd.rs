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
        let level = self.level;
        self.run_tensors(tensors, |_: &Coeffs, has| {
            kernel::pick_floor::<P, S>(level, has).unwrap_or(kernel::floor_scalar::<P, S>)
        });
    }

    /// Steps every tensor (each with the kernel `choose` gives it), split across threads when
    /// large enough, and records in each tensor how many of its updated parameters are not
    /// finite (counted by the kernels as they store θ).
    fn run_tensors<P: Element, S: Element>(
        &mut self,
        tensors: &mut [ParamTensor<'_, Self, P, S>],
        choose: impl Fn(&Coeffs, Present) -> KernelFn<P, S>,
    ) {
        #[cfg(feature = "alloc")]
        {
            let mut jobs = alloc::vec::Vec::with_capacity(tensors.len());
            // Tensors the vector kernels do not take (mismatched lengths) run here at once.
            let mut direct = alloc::vec::Vec::new();
            for (i, t) in tensors.iter_mut().enumerate() {
                let (view, k) = t.view_and_coeffs();
                match Job::new(view, k, &choose) {
                    Ok(job) => jobs.push((i, job)),
                    Err(view) => direct.push((i, portable::fused(as_cpu(view), k))),
                }
            }
            let counts = self.run_jobs(&jobs);
            let counted: alloc::vec::Vec<(usize, u64)> =
                jobs.iter().map(|(i, _)| *i).zip(counts).collect();
            // The jobs borrow the tensors' coefficients: gone before the counts are recorded.
            drop(jobs);
            for (i, n) in counted.into_iter().chain(direct) {
                tensors[i].set_non_finite(n);
            }
        }
        #[cfg(not(feature = "alloc"))]
        for t in tensors.iter_mut() {
            let (view, k) = t.view_and_coeffs();
            let n = match Job::new(view, k, &choose) {
                Ok(job) => job.run(0, job.len, None),
                Err(view) => portable::fused(as_cpu(view), k),
            };
            t.set_non_finite(n);
        }
    }

    /// The kernel for a step of a tensor.
    fn step_kernel<P: Element, S: Element>(&self) -> impl Fn(&Coeffs, Present) -> KernelFn<P, S> {
        let level = self.level;
        move |k, has| kernel::pick::<P, S>(level, k, has).unwrap_or(portable_kernel::<P, S>)
    }

    /// Runs every job; returns each job's count of non-finite parameters.
    #[cfg(feature = "alloc")]
    fn run_jobs<P: Element, S: Element>(
        &self,
        jobs: &[(usize, Job<'_, P, S>)],
    ) -> alloc::vec::Vec<u64> {
        let total: usize = jobs.iter().map(|(_, j)| j.len).sum();
        #[cfg(feature = "std")]
        {
            let threads = self.thread_count();
            if threads > 1 && total >= self.min_parallel && total > 0 {
                return self.run_parallel(jobs, threads);
            }
        }
        let _ = total;
        (0..jobs.len())
            .map(|i| {
                let then = jobs.get(i + 1).map(|(_, t)| (t, 0, t.len));
                jobs[i].1.run(0, jobs[i].1.len, then)
            })
            .collect()
    }

    /// Cuts every tensor into pieces whose starts fall on 64-byte boundaries of the parameter
    /// buffer, groups them into units of about `chunk` elements ([`Plan`]), and lets the
    /// threads pull units until none is left.
    #[cfg(feature = "std")]
    fn run_parallel<P: Element, S: Element>(
        &self,
        jobs: &[(usize, Job<'_, P, S>)],
        threads: usize,
    ) -> alloc::vec::Vec<u64> {
        use std::sync::atomic::{AtomicU64, Ordering};
        let plan = Plan::new(
            self.chunk,
            jobs.iter().map(|(_, j)| j.len),
            |ji, at, len| aligned_split(jobs[ji].1.bufs.p, at, len),
        );
        let bad: alloc::vec::Vec<AtomicU64> = jobs.iter().map(|_| AtomicU64::new(0)).collect();
        plan.run(threads, |(ji, start, end), then| {
            let then = then.map(|(tj, s, e)| (&jobs[tj].1, s, e));
            let n = jobs[ji].1.run(start, end, then);
            if n > 0 {
                bad[ji].fetch_add(n, Ordering::Relaxed);
            }
        });
        // The pool's join orders these loads after the workers' adds.
        bad.into_iter().map(AtomicU64::into_inner).collect()
    }
}

/// How a multi-tensor pass is shared among threads: every tensor cut into pieces of at most
/// `chunk` elements (at split points the pass chooses), consecutive pieces grouped into units
/// of at least `chunk` elements, and the units pulled by the threads one at a time, in order.
///
/// Grouping is what keeps many small tensors (biases, LayerNorms: a few hundred elements
/// each) cheap: one shared counter increment per unit, not per tensor, and each thread walks
/// consecutive tensors, as a single-threaded pass would.
#[cfg(feature = "std")]
struct Plan {
    /// (tensor, start, end).
    pieces: alloc::vec::Vec<(usize, usize, usize)>,
    /// Unit `u` is `pieces[units[u]..units[u + 1]]`.
    units: alloc::vec::Vec<usize>,
}

#[cfg(feature = "std")]
impl Plan {
    /// `split(tensor, at, len)` gives the end of a piece that should end near `at` (at or
    /// after it, at most `len`).
    fn new(
        chunk: usize,
        lens: impl Iterator<Item = usize>,
        split: impl Fn(usize, usize, usize) -> usize,
    ) -> Plan {
        let chunk = chunk.max(1);
        let mut pieces = alloc::vec::Vec::new();
        let mut units = alloc::vec![0];
        let mut filled = 0;
        for (ti, len) in lens.enumerate() {
            let mut start = 0;
            while start < len {
                let end = split(ti, start + chunk, len).max(start + 1);
                pieces.push((ti, start, end));
                filled += end - start;
                if filled >= chunk {
                    units.push(pieces.len());
                    filled = 0;
                }
                start = end;
            }
        }
        if filled > 0 {
            units.push(pieces.len());
        }
        Plan { pieces, units }
    }

    /// Runs `f(piece, next)` for every piece (`(tensor, start, end)`), on up to `threads`
    /// threads; `next` is the piece the same thread runs next (in the same unit), if any.
    #[allow(clippy::type_complexity)]
    fn run(
        &self,
        threads: usize,
        f: impl Fn((usize, usize, usize), Option<(usize, usize, usize)>) + Sync,
    ) {
        use std::sync::atomic::{AtomicUsize, Ordering};
        let count = self.units.len() - 1;
        let next = AtomicUsize::new(0);
        let work = |_worker: usize| loop {
            let u = next.fetch_add(1, Ordering::Relaxed);
            if u >= count {
                break;
            }
            let unit = &self.pieces[self.units[u]..self.units[u + 1]];
            for (k, &piece) in unit.iter().enumerate() {
                f(piece, unit.get(k + 1).copied());
            }
        };
        crate::pool::global().run(threads.min(count), &work);
    }
}

/// The first index at or after `at` (capped at `len`) whose element in `p` starts a 64-byte
/// cache line, so that two threads never write the same line of the parameter buffer.
#[cfg(feature = "std")]
fn aligned_split<P>(p: *mut P, at: usize, len: usize) -> usize {
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

// SAFETY: a `Job` is built from exclusive borrows that outlive it (`run_tensors` holds them),
// and threads only ever run disjoint element ranges of it.
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
    /// `then`: the range this thread runs next, if any (prefetched near the end).
    fn run(&self, start: usize, end: usize, then: Option<(&Self, usize, usize)>) -> u64 {
        let then = then.map_or(Then::none(), |(j, s, e)| Then {
            bufs: j.bufs.range_from(s),
            len: e - s,
        });
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
            #[cfg(feature = "alloc")]
            Ok(job) => {
                self.run_jobs(&[(0, job)]);
            }
            #[cfg(not(feature = "alloc"))]
            Ok(job) => {
                job.run(0, job.len, None);
            }
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
        {
            let total: usize = tensors.iter().map(|t| t.grad().len()).sum();
            let threads = self.thread_count();
            if threads > 1 && total >= self.min_parallel {
                self.sq_norms_parallel(tensors, threads);
                return Ok(());
            }
        }
        for t in tensors.iter_mut() {
            let x = self.chunked_sq_norm(t.grad());
            t.set_grad_sq_norm(x);
        }
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
}

#[cfg(feature = "std")]
impl SimdCpu {
    /// Gradient norms of many tensors across threads. Each tensor is cut on the contract's
    /// chunk grid ([`sage_core::norm`]), every chunk's partial is computed by whichever thread
    /// takes it (threads take runs of consecutive chunks, [`Plan`]), and each tensor's
    /// partials are folded in order, so the result does not depend on the thread count or on
    /// which thread took which chunk.
    fn sq_norms_parallel<P: Element, S: Element>(
        &self,
        tensors: &mut [ParamTensor<'_, Self, P, S>],
        threads: usize,
    ) {
        use std::sync::atomic::{AtomicU64, Ordering};
        let grads: alloc::vec::Vec<&[P]> = tensors.iter().map(|t| t.grad()).collect();
        // Tensor i's partials are partial[first[i]..first[i + 1]].
        let mut first = alloc::vec::Vec::with_capacity(grads.len() + 1);
        first.push(0);
        for g in &grads {
            first.push(first[first.len() - 1] + norm::chunk_count(g.len()));
        }
        let partial: alloc::vec::Vec<AtomicU64> =
            (0..first[grads.len()]).map(|_| AtomicU64::new(0)).collect();
        let level = self.level;
        self.norm_plan(&grads).run(threads, |(ti, start, end), _| {
            let g = grads[ti];
            for (c, at) in (start..end).step_by(norm::NORM_CHUNK).enumerate() {
                let x = kernel::sq_norm(level, &g[at..(at + norm::NORM_CHUNK).min(end)]);
                let slot = first[ti] + start / norm::NORM_CHUNK + c;
                partial[slot].store(x.to_bits(), Ordering::Relaxed);
            }
        });
        for (ti, t) in tensors.iter_mut().enumerate() {
            // The pool's join (a mutex hand-off) orders these loads after the stores.
            let own = &partial[first[ti]..first[ti + 1]];
            t.set_grad_sq_norm(norm::fold(
                own.iter()
                    .map(|x| f64::from_bits(x.load(Ordering::Relaxed))),
            ));
        }
    }

    /// The norm pass's split: pieces on the chunk grid, in units of about `chunk` elements.
    fn norm_plan<P: Element>(&self, grads: &[&[P]]) -> Plan {
        Plan::new(self.chunk, grads.iter().map(|g| g.len()), |_, at, len| {
            at.next_multiple_of(norm::NORM_CHUNK).min(len)
        })
    }

    /// The bandwidth floor of the gradient-norm pass, for benchmarks: every gradient read
    /// once (widened to f32 in registers, as the norm does) on the same threads and split as
    /// [`Backend::grad_sq_norms`], with one add per element instead of the squares in `f64`.
    /// Returns the sum of every gradient element (so that the reads happen).
    pub fn stream_read_floor<P: Element, S: Element>(
        &mut self,
        tensors: &[ParamTensor<'_, Self, P, S>],
    ) -> f32 {
        let grads: alloc::vec::Vec<&[P]> = tensors.iter().map(|t| t.grad()).collect();
        let total: usize = grads.iter().map(|g| g.len()).sum();
        let threads = self.thread_count();
        let level = self.level;
        if threads <= 1 || total < self.min_parallel {
            return grads.iter().map(|g| kernel::read_floor(level, g)).sum();
        }
        use std::sync::atomic::{AtomicU32, Ordering};
        // A result slot per chunk, as the norm keeps (no lock per piece): a piece's sum goes
        // to the slot of its first chunk.
        let mut first = alloc::vec::Vec::with_capacity(grads.len());
        let mut chunks = 0;
        for g in &grads {
            first.push(chunks);
            chunks += norm::chunk_count(g.len());
        }
        let slots: alloc::vec::Vec<AtomicU32> = (0..chunks).map(|_| AtomicU32::new(0)).collect();
        self.norm_plan(&grads).run(threads, |(ti, start, end), _| {
            let x = kernel::read_floor(level, &grads[ti][start..end]);
            let at = first[ti] + start / norm::NORM_CHUNK;
            slots[at].store(x.to_bits(), Ordering::Relaxed);
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
