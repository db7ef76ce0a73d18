//! The fused step as vector code, monomorphised per case.
//!
//! `Coeffs::kind`, `flags` and `modulation` pick the algorithm of a tensor. They are read once
//! per tensor ([`pick`]) to choose a kernel instantiated for exactly that case, so the inner
//! loop has no branches: one kernel per instruction set x storage types x algorithm x SAGE on
//! or off x modulation (x SGD momentum variant). Each kernel does, lane by lane, the operations
//! of `sage_core::formula::step` in the same order, so it agrees with the portable path bit for
//! bit (Ī's bias correction, a division there, is a reciprocal and one FMA correction here:
//! the same bits, [`StepOp::corrected_ibar`]). Buffer layouts the cases do not cover (say, a SAGE tensor without `ibar`) return `None`
//! and run on the portable path.

// Targets with no vector level (say, a Cortex-M) use only the portable pieces.
#![cfg_attr(
    not(any(target_arch = "x86_64", target_arch = "aarch64")),
    allow(dead_code, unused_macros, unused_variables)
)]

use core::ptr;

use sage_core::coeffs::{flags, kind};
use sage_core::{Coeffs, Element, Modulation};

use crate::lanes::{load, masked_tail, Access, First, Lanes, Whole};

use crate::level::Level;

/// Widest register, in f32 lanes (AVX-512): sizes the stack buffers of a tail.
const MAX_LANES: usize = 16;

/// How far ahead, in elements (1 KiB of an f32 buffer), every stream is prefetched. The
/// hardware prefetcher alone lets the divisions and square root of a step stall the loads:
/// measured with `sage-bench` on AVX2 and AVX-512, Adam-SAGE went from 1.12–1.40x the floor to
/// 1.00–1.06x with it (distances from 64 to 1024 elements did about as well).
const PREFETCH_AHEAD: usize = 256;

/// Raw pointers to one tensor's buffers, from some element on. Absent state buffers are null.
pub(crate) struct Bufs<P, S> {
    pub p: *mut P,
    pub g: *const P,
    pub m: *mut S,
    pub v: *mut S,
    pub ib: *mut S,
}

impl<P, S> Clone for Bufs<P, S> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<P, S> Copy for Bufs<P, S> {}

impl<P, S> Bufs<P, S> {
    /// The same buffers from element `i` on, keeping absent (null) buffers null: for
    /// handing a range to a kernel, which tells absent buffers by null.
    #[inline]
    pub fn range_from(self, i: usize) -> Self {
        fn off<T>(p: *mut T, i: usize) -> *mut T {
            if p.is_null() {
                p
            } else {
                p.wrapping_add(i)
            }
        }
        Bufs {
            p: self.p.wrapping_add(i),
            g: self.g.wrapping_add(i),
            m: off(self.m, i),
            v: off(self.v, i),
            ib: off(self.ib, i),
        }
    }

    /// The same buffers from element `i` on, inside a kernel, which knows from its case
    /// which buffers are present and never reads an absent one (so offsetting null with
    /// `wrapping_add` is harmless, and the loop needs no null test).
    #[inline(always)]
    pub fn at(self, i: usize) -> Self {
        Bufs {
            p: self.p.wrapping_add(i),
            g: self.g.wrapping_add(i),
            m: self.m.wrapping_add(i),
            v: self.v.wrapping_add(i),
            ib: self.ib.wrapping_add(i),
        }
    }
}

/// A kernel over `n` elements from `Bufs`; returns how many stored parameters are NaN or ±Inf
/// (counted in registers as they are stored: no extra pass). Unsafe: every non-null pointer
/// must be valid for `n` elements, the buffers must not overlap, and the CPU must have the
/// kernel's level.
///
/// The last argument, [`Then`], names what the same thread steps next (the next small
/// tensor, or the rest of this one): near its end a kernel prefetches that instead of
/// running past its own buffers.
///
/// At most [`MAX_CALL`] elements per call (the lanes' non-finite counters are u32).
pub(crate) type KernelFn<P, S> = unsafe fn(&Coeffs, Bufs<P, S>, usize, Then<P, S>) -> u64;

/// The most elements one kernel call may take (callers cut longer ranges).
pub(crate) const MAX_CALL: usize = 1 << 30;

/// The buffers the thread steps after this range, and how many elements of them to
/// prefetch (0: none); only ever prefetched, never read or written, so any value is safe.
pub(crate) struct Then<P, S> {
    pub bufs: Bufs<P, S>,
    pub len: usize,
}

impl<P, S> Clone for Then<P, S> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<P, S> Copy for Then<P, S> {}

impl<P, S> Then<P, S> {
    /// Nothing follows.
    pub fn none() -> Self {
        Then {
            bufs: Bufs {
                p: ptr::null_mut(),
                g: ptr::null(),
                m: ptr::null_mut(),
                v: ptr::null_mut(),
                ib: ptr::null_mut(),
            },
            len: 0,
        }
    }
}

/// One register's worth of work, and which state buffers it touches.
pub(crate) trait Op<L: Lanes> {
    const M: bool;
    const V: bool;
    const IB: bool;
    /// Processes the `L::N` elements at `b` (or those `a` reaches), adding the stored
    /// parameters that are not finite to the lane counters `bad`.
    unsafe fn vec<P: Element, S: Element, A: Access<L>>(&self, b: Bufs<P, S>, a: A, bad: &mut L::C);
}

/// Prefetches the line at `a` of every stream `O` touches (absent ones, null, skipped).
#[inline(always)]
unsafe fn prefetch_streams<L: Lanes, P, S, O: Op<L>>(a: Bufs<P, S>) {
    L::prefetch(a.p.cast());
    L::prefetch(a.g.cast());
    if O::M {
        L::prefetch(a.m.cast());
    }
    if O::V {
        L::prefetch(a.v.cast());
    }
    if O::IB {
        L::prefetch(a.ib.cast());
    }
}

/// Runs `op` over `n` elements: whole registers, then the tail — in place with masked loads
/// and stores where the lanes mask the buffers' types ([`masked_tail`]), otherwise through
/// stack buffers — so that the tail takes the same vector code (the padding lanes are
/// computed and discarded).
/// Returns how many stored parameters are not finite.
///
/// Every stream is prefetched [`PREFETCH_AHEAD`] elements ahead; past the end of this range
/// the prefetches go to `then` (what this thread steps next), as if the two were one buffer:
/// many small tensors, each allocated on its own, then stream like one large one.
#[inline(always)]
pub(crate) unsafe fn drive<L: Lanes, P: Element, S: Element, O: Op<L>>(
    op: &O,
    b: Bufs<P, S>,
    n: usize,
    then: Then<P, S>,
) -> u64 {
    let mut counts = L::zero_c();
    let mut i = 0;
    while i + L::N <= n {
        let ahead = i + PREFETCH_AHEAD;
        if ahead < n {
            prefetch_streams::<L, P, S, O>(b.at(ahead));
        } else if ahead - n < then.len {
            // A prefetch never faults: a null (absent) stream of `then` costs nothing.
            prefetch_streams::<L, P, S, O>(then.bufs.at(ahead - n));
        }
        op.vec::<P, S, _>(b.at(i), Whole, &mut counts);
        i += L::N;
    }
    let rem = n - i;
    if rem > 0 && masked_tail::<L, P, S>() {
        // In place with masked loads and stores: no copies, and the next tensor's first
        // loads do not wait on small stores to the line they share.
        op.vec::<P, S, _>(b.at(i), First(rem), &mut counts);
        return L::sum_c(counts);
    }
    let mut bad = L::sum_c(counts);
    if rem == 0 {
        return bad;
    }
    let t = b.at(i);
    let mut p = [P::default(); MAX_LANES];
    let mut g = [P::default(); MAX_LANES];
    let mut m = [S::default(); MAX_LANES];
    let mut v = [S::default(); MAX_LANES];
    let mut ib = [S::default(); MAX_LANES];
    ptr::copy_nonoverlapping(t.p, p.as_mut_ptr(), rem);
    ptr::copy_nonoverlapping(t.g, g.as_mut_ptr(), rem);
    let local = Bufs {
        p: p.as_mut_ptr(),
        g: g.as_ptr(),
        m: if O::M {
            m.as_mut_ptr()
        } else {
            ptr::null_mut()
        },
        v: if O::V {
            v.as_mut_ptr()
        } else {
            ptr::null_mut()
        },
        ib: if O::IB {
            ib.as_mut_ptr()
        } else {
            ptr::null_mut()
        },
    };
    if O::M {
        ptr::copy_nonoverlapping(t.m, local.m, rem);
    }
    if O::V {
        ptr::copy_nonoverlapping(t.v, local.v, rem);
    }
    if O::IB {
        ptr::copy_nonoverlapping(t.ib, local.ib, rem);
    }
    // The padding lanes' results are discarded: count the real ones.
    op.vec::<P, S, _>(local, Whole, &mut L::zero_c());
    bad += p[..rem].iter().filter(|x| !x.to_f32().is_finite()).count() as u64;
    ptr::copy_nonoverlapping(local.p, t.p, rem);
    if O::M {
        ptr::copy_nonoverlapping(local.m, t.m, rem);
    }
    if O::V {
        ptr::copy_nonoverlapping(local.v, t.v, rem);
    }
    if O::IB {
        ptr::copy_nonoverlapping(local.ib, t.ib, rem);
    }
    bad
}

/// SGD variants (`SGDV`): no momentum buffer, heavy ball, Nesterov.
const SGD_PLAIN: u32 = 0;
const SGD_MOMENTUM: u32 = 1;
const SGD_NESTEROV: u32 = 2;

/// The fused step of one case. `K`: [`kind`]; `SAGE`: modulation on; `MODU`: the
/// [`Modulation`] discriminant; `SGDV`: the SGD variant.
pub(crate) struct StepOp<L: Lanes, const K: u32, const SAGE: bool, const MODU: u32, const SGDV: u32>
{
    gs: L::F,
    l2: L::F,
    b1: L::F,
    a1: L::F,
    b2: L::F,
    a2: L::F,
    b0: L::F,
    a0: L::F,
    mom: L::F,
    ibd: L::F,
    ibr: L::F,
    ib_lo: L::F,
    ib_hi: L::F,
    en: L::F,
    ed: L::F,
    step: L::F,
    ds: L::F,
    de: L::F,
    ie: L::F,
    isd: L::F,
    pk: L::F,
    pd: L::F,
    one: L::F,
}

impl<L: Lanes, const K: u32, const SAGE: bool, const MODU: u32, const SGDV: u32>
    StepOp<L, K, SAGE, MODU, SGDV>
{
    #[inline(always)]
    pub unsafe fn new(k: &Coeffs) -> Self {
        StepOp {
            gs: L::splat(k.grad_scale),
            l2: L::splat(k.l2),
            b1: L::splat(k.beta1),
            a1: L::splat(k.alpha1),
            b2: L::splat(k.beta2),
            a2: L::splat(k.alpha2),
            b0: L::splat(k.beta0),
            a0: L::splat(k.alpha0),
            mom: L::splat(k.momentum),
            ibd: L::splat(k.ibar_div),
            ibr: L::splat(1.0 / k.ibar_div),
            // A divisor this small (β0 within 2^-20 of 1) could take q past f32's range: divide.
            ib_lo: L::splat(if k.ibar_div >= MIN_FUSED_DIVISOR {
                QUOTIENT_LO
            } else {
                f32::INFINITY
            }),
            ib_hi: L::splat(QUOTIENT_HI),
            en: L::splat(k.eps_num),
            ed: L::splat(k.eps_den),
            step: L::splat(k.step),
            ds: L::splat(k.denom_scale),
            de: L::splat(k.denom_eps),
            ie: L::splat(k.inf_eps),
            isd: L::splat(k.in_step_decay),
            pk: L::splat(k.pre_keep),
            pd: L::splat(k.post_decay),
            one: L::splat(1.0),
        }
    }

    /// `Ī' = Ī / ibar_div` with the division's bits but no divide (one fewer in a step that
    /// has three: 25% of an Adam-SAGE step's time where it is compute-bound). `q = Ī·(1/d)`
    /// is within an ulp of the quotient, and `q + (Ī − q·d)·(1/d)`, its remainder exact by
    /// FMA, rounds to it (Markstein's theorem; the tests check it against the division over
    /// every mantissa). The remainder is exact only away from underflow and `q` finite only
    /// away from overflow, and −0 would come out +0: a vector with a lane outside
    /// `{+0} ∪ [QUOTIENT_LO, QUOTIENT_HI]` (or NaN) divides.
    #[inline(always)]
    pub unsafe fn corrected_ibar(&self, ibar: L::F) -> L::F {
        if L::all_zero_or_in(ibar, self.ib_lo, self.ib_hi) {
            let q = L::mul(ibar, self.ibr);
            L::fmadd(L::fnmadd(q, self.ibd, ibar), self.ibr, q)
        } else {
            L::div(ibar, self.ibd)
        }
    }
}

/// Smallest Ī (besides 0) divided by reciprocal and correction: 2^-90, far above where the
/// remainder `Ī − q·d` (a multiple of about Ī·2^-46) could underflow.
const QUOTIENT_LO: f32 = f32::from_bits((127 - 90) << 23);
/// Largest Ī divided by reciprocal and correction: 2^100, so that `q ≤ 2^120` stays finite.
const QUOTIENT_HI: f32 = f32::from_bits((127 + 100) << 23);
/// Smallest divisor `1 − β0^t` for the reciprocal path (2^-20).
const MIN_FUSED_DIVISOR: f32 = f32::from_bits((127 - 20) << 23);

impl<L: Lanes, const K: u32, const SAGE: bool, const MODU: u32, const SGDV: u32> Op<L>
    for StepOp<L, K, SAGE, MODU, SGDV>
{
    const M: bool = K != kind::SGD || SGDV != SGD_PLAIN;
    const V: bool = K != kind::SGD;
    const IB: bool = SAGE;

    #[inline(always)]
    unsafe fn vec<P: Element, S: Element, A: Access<L>>(
        &self,
        b: Bufs<P, S>,
        a: A,
        bad: &mut L::C,
    ) {
        let th = a.load::<P>(b.p);
        let gr = a.load::<P>(b.g);
        // formula::effective_grad
        let g = L::add(L::mul(gr, self.gs), L::mul(self.l2, th));
        // formula::accumulate, each state value rounded to S and read back
        let m = if Self::M {
            let old = a.load::<S>(b.m);
            a.store_round::<S>(b.m, L::add(L::mul(self.b1, old), L::mul(self.a1, g)))
        } else {
            self.one
        };
        let v = if K == kind::ADAM {
            let old = a.load::<S>(b.v);
            let new = L::add(L::mul(self.b2, old), L::mul(self.a2, L::mul(g, g)));
            a.store_round::<S>(b.v, new)
        } else if K == kind::ADAMAX {
            let old = a.load::<S>(b.v);
            let new = L::maxnum(L::mul(self.b2, old), L::add(L::abs(g), self.ie));
            a.store_round::<S>(b.v, new)
        } else {
            self.one
        };
        // formula::apply; with SAGE off s = 1 and step·1 = step exactly.
        let step_s = if SAGE {
            let i = L::abs(L::mul(th, g));
            let old = a.load::<S>(b.ib);
            let ibar = a.store_round::<S>(b.ib, L::add(L::mul(self.b0, old), L::mul(self.a0, i)));
            let ib = self.corrected_ibar(ibar);
            let u = L::abs(L::sub(i, ib));
            let s = if MODU == Modulation::Sage as u32 {
                L::div(L::add(u, self.en), L::add(ib, self.ed))
            } else if MODU == Modulation::ImportanceTimesVariation as u32 {
                L::mul(L::add(ib, self.ed), L::add(u, self.en))
            } else if MODU == Modulation::ImportanceOverVariation as u32 {
                L::div(L::add(ib, self.ed), L::add(u, self.en))
            } else if MODU == Modulation::Importance as u32 {
                L::add(ib, self.ed)
            } else if MODU == Modulation::InverseImportance as u32 {
                L::div(self.one, L::add(ib, self.ed))
            } else {
                L::add(u, self.en)
            };
            L::mul(self.step, s)
        } else {
            self.step
        };
        let dir = if K == kind::ADAM {
            L::div(m, L::add(L::mul(L::sqrt(v), self.ds), self.de))
        } else if K == kind::ADAMAX {
            L::add(L::div(m, L::add(v, self.de)), L::mul(self.isd, th))
        } else if SGDV == SGD_PLAIN {
            g
        } else if SGDV == SGD_NESTEROV {
            L::add(g, L::mul(self.mom, m))
        } else {
            m
        };
        let updated = L::sub(L::mul(th, self.pk), L::mul(step_s, dir));
        let stored = a.store_round::<P>(b.p, L::sub(updated, L::mul(self.pd, updated)));
        *bad = a.add_non_finite(*bad, stored);
    }
}

/// The bandwidth floor: the same loads and stores as a step with state buffers `M`, `V`, `IB`
/// (storage conversions included) and one add per stored value.
pub(crate) struct FloorOp<L: Lanes, const M: bool, const V: bool, const IB: bool> {
    c: L::F,
}

impl<L: Lanes, const M: bool, const V: bool, const IB: bool> Op<L> for FloorOp<L, M, V, IB> {
    const M: bool = M;
    const V: bool = V;
    const IB: bool = IB;

    #[inline(always)]
    unsafe fn vec<P: Element, S: Element, A: Access<L>>(
        &self,
        b: Bufs<P, S>,
        a: A,
        bad: &mut L::C,
    ) {
        let th = a.load::<P>(b.p);
        let g = L::mul(a.load::<P>(b.g), self.c);
        for (on, s) in [(M, b.m), (V, b.v), (IB, b.ib)] {
            if on {
                a.store_round::<S>(s, L::add(a.load::<S>(s), g));
            }
        }
        a.store_round::<P>(b.p, L::add(th, g));
        // The floor is the traffic alone: it counts nothing.
        let _ = bad;
    }
}

/// Independent f64 sums of a squared norm: enough that the adds' latency never limits it.
const NORM_BLOCK: usize = 32;

/// `Σ x²` in f64 over [`NORM_BLOCK`] independent accumulators, so that the compiler can
/// vectorise it (a single running sum is a serial chain of f64 adds). Any NaN or ±Inf makes
/// it non-finite; f32 squares cannot overflow f64.
#[inline(always)]
pub(crate) fn sq_norm_body<E: Element>(x: &[E]) -> f64 {
    let mut acc = [0f64; NORM_BLOCK];
    add_squares(&mut acc, x);
    acc.iter().sum()
}

#[inline(always)]
fn add_squares<E: Element>(acc: &mut [f64; NORM_BLOCK], x: &[E]) {
    let mut chunks = x.chunks_exact(NORM_BLOCK);
    for c in &mut chunks {
        for (a, v) in acc.iter_mut().zip(c) {
            let f = v.to_f32() as f64;
            *a += f * f;
        }
    }
    for (a, v) in acc.iter_mut().zip(chunks.remainder()) {
        let f = v.to_f32() as f64;
        *a += f * f;
    }
}

/// Registers of squares summed per iteration of the norm.
const NORM_REGS: usize = 4;
/// Iterations per f32 block of the norm: each f32 accumulator lane sums this many squares
/// before the block is widened to f64.
const NORM_BLOCK_ITERS: usize = 8;

/// `Σ x²` of one chunk in vector registers. Elements are widened to f32 in registers (16-bit
/// types as the step loads them) and squared in f32 into [`NORM_REGS`] registers, over blocks
/// of `NORM_REGS · NORM_BLOCK_ITERS` registers (512 elements with AVX-512); each block's sum
/// is added to two f64 registers, or — when it is not finite (a NaN or ±Inf element, or
/// finite squares past f32's range, |x| ≳ 1.8e19) — the block is summed again exactly in f64
/// (NaN and ±Inf then make the result non-finite; finite inputs never overflow). The whole
/// registers after the last whole block (a short tensor) and the last elements (fewer than
/// a register, loaded masked with zeros after them) form one shorter block, the same way;
/// where the lanes cannot mask loads of `E`, the last elements are added in f64 one by one.
///
/// The result depends only on `x` (the contract's requirement for a chunk partial). Each f32
/// lane sums [`NORM_BLOCK_ITERS`] squares, so the relative error is below about
/// 10 · 2⁻²⁴ ≈ 6e-7 (squares below f32's normal range, |x| < 1.1e-19, may be lost: such a
/// gradient's norm is 0 to within 1e-19·√n). About 3 instructions per register (a multiply
/// and an add after the load): the pass runs at read bandwidth, where f64 squares (two
/// widenings, two multiplies and two adds per register) were compute-bound for bf16.
#[inline(always)]
pub(crate) unsafe fn sq_norm_lanes<L: Lanes, E: Element>(x: &[E]) -> f64 {
    let block = NORM_REGS * NORM_BLOCK_ITERS * L::N;
    let mut total = [L::zero_d(); 2];
    let p = x.as_ptr();
    let mut i = 0;
    while i + block <= x.len() {
        let mut acc = [L::splat(0.0); NORM_REGS];
        for it in 0..NORM_BLOCK_ITERS {
            for (k, a) in acc.iter_mut().enumerate() {
                let v = load::<L, E>(p.add(i + (it * NORM_REGS + k) * L::N));
                *a = L::add(*a, L::mul(v, v));
            }
        }
        let sum = L::add(L::add(acc[0], acc[1]), L::add(acc[2], acc[3]));
        total = norm_block::<L, E>(total, sum, p.add(i), block / L::N, 0);
        i += block;
    }
    // The whole registers left (a short tensor, or the end of a chunk) and, where the lanes
    // mask, the last elements as one register with zeros after them: one shorter block.
    let regs = (x.len() - i) / L::N;
    let rem = tail_lanes::<L, E>(x.len() - i - regs * L::N);
    if regs > 0 || rem > 0 {
        // Register r into accumulator r % NORM_REGS, as in a whole block: each lane still
        // sums at most NORM_BLOCK_ITERS squares.
        let mut acc = [L::splat(0.0); NORM_REGS];
        let last = if rem > 0 { regs + 1 } else { regs };
        for r in 0..last {
            let v = if r < regs {
                load::<L, E>(p.add(i + r * L::N))
            } else {
                load_first::<L, E>(p.add(i + r * L::N), rem)
            };
            acc[r % NORM_REGS] = L::add(acc[r % NORM_REGS], L::mul(v, v));
        }
        let sum = L::add(L::add(acc[0], acc[1]), L::add(acc[2], acc[3]));
        total = norm_block::<L, E>(total, sum, p.add(i), regs, rem);
        i += regs * L::N + rem;
    }
    let tail = x[i..].iter().fold(0f64, |s, v| {
        let f = v.to_f32() as f64;
        s + f * f
    });
    L::sum_d(L::add_d(total[0], total[1])) + tail
}

/// Adds a norm block's f32 sum `sum` (of the `regs` registers at `p`, then `rem` elements
/// loaded masked) to `total`, or, when it is not finite, the block's squares again in f64.
#[inline(always)]
unsafe fn norm_block<L: Lanes, E: Element>(
    total: [L::D; 2],
    sum: L::F,
    p: *const E,
    regs: usize,
    rem: usize,
) -> [L::D; 2] {
    if L::count_non_finite(sum) == 0 {
        return L::add_wide(total, sum);
    }
    let mut total = total;
    for r in 0..regs {
        total = L::add_squares(total, load::<L, E>(p.add(r * L::N)));
    }
    if rem > 0 {
        total = L::add_squares(total, load_first::<L, E>(p.add(regs * L::N), rem));
    }
    total
}

/// The first `n` elements at `p` widened, zeros in the other lanes.
#[inline(always)]
unsafe fn load_first<L: Lanes, E: Element>(p: *const E, n: usize) -> L::F {
    <First as Access<L>>::load::<E>(First(n), p)
}

/// How many of the `rem < N` elements after the last whole register a pass loads as one
/// masked register (zeros in the other lanes: they add nothing to a sum): all of them where
/// the lanes mask loads of `E`, none otherwise (they are then added one by one).
#[inline(always)]
fn tail_lanes<L: Lanes, E: Element>(rem: usize) -> usize {
    if masked_tail::<L, E, E>() {
        rem
    } else {
        0
    }
}

/// The read floor of a buffer: every element loaded (widened to f32 in registers, as the norm
/// does) and summed in f32 with four independent accumulators; the cheapest pass that still
/// reads every byte. Returns the sum so the loads cannot be dropped.
#[inline(always)]
// Only the threaded benchmark helper `SimdCpu::stream_read_floor` (std) reads through it.
#[cfg_attr(not(feature = "std"), allow(dead_code))]
pub(crate) unsafe fn read_lanes<L: Lanes, E: Element>(x: &[E]) -> f32 {
    let mut acc = [L::splat(0.0); 4];
    let mut i = 0;
    let p = x.as_ptr();
    while i + 4 * L::N <= x.len() {
        for (k, a) in acc.iter_mut().enumerate() {
            *a = L::add(*a, load::<L, E>(p.add(i + k * L::N)));
        }
        i += 4 * L::N;
    }
    // The rest as the norm takes it: whole registers, then the last elements masked.
    while i + L::N <= x.len() {
        acc[0] = L::add(acc[0], load::<L, E>(p.add(i)));
        i += L::N;
    }
    let rem = tail_lanes::<L, E>(x.len() - i);
    if rem > 0 {
        acc[1] = L::add(acc[1], load_first::<L, E>(p.add(i), rem));
        i += rem;
    }
    let mut lanes = [0f32; MAX_LANES];
    L::store_f32(
        lanes.as_mut_ptr(),
        L::add(L::add(acc[0], acc[1]), L::add(acc[2], acc[3])),
    );
    let tail: f32 = x[i..].iter().map(|v| v.to_f32()).sum();
    lanes[..L::N].iter().sum::<f32>() + tail
}

/// An instruction set's kernel entry points.
pub(crate) trait Isa {
    /// [`StepOp::corrected_ibar`] over `x` (whole registers), in place, for divisor `d`.
    #[cfg(test)]
    fn corrected_ibar() -> unsafe fn(&mut [f32], f32);
    fn step<
        P: Element,
        S: Element,
        const K: u32,
        const SAGE: bool,
        const MODU: u32,
        const SGDV: u32,
    >() -> KernelFn<P, S>;
    fn floor<P: Element, S: Element, const M: bool, const V: bool, const IB: bool>(
    ) -> KernelFn<P, S>;
    fn sq_norm<E: Element>() -> unsafe fn(&[E]) -> f64;
    #[cfg_attr(not(feature = "std"), allow(dead_code))]
    fn read<E: Element>() -> unsafe fn(&[E]) -> f32;
}

/// Defines an [`Isa`] whose entry points are compiled with `$features`.
macro_rules! isa {
    ($(#[$meta:meta])* $isa:ident, $lanes:ty, $features:literal) => {
        $(#[$meta])*
        pub(crate) struct $isa;
        impl Isa for $isa {
            #[cfg(test)]
            fn corrected_ibar() -> unsafe fn(&mut [f32], f32) {
                #[target_feature(enable = $features)]
                unsafe fn run(x: &mut [f32], d: f32) {
                    type L = $lanes;
                    let k = Coeffs {
                        ibar_div: d,
                        ..Coeffs::default()
                    };
                    let op = StepOp::<L, { kind::ADAM }, true, 0, 0>::new(&k);
                    for c in x.chunks_exact_mut(<L as Lanes>::N) {
                        let v = op.corrected_ibar(<L as Lanes>::load_f32(c.as_ptr()));
                        <L as Lanes>::store_f32(c.as_mut_ptr(), v);
                    }
                }
                run
            }
            fn step<
                P: Element,
                S: Element,
                const K: u32,
                const SAGE: bool,
                const MODU: u32,
                const SGDV: u32,
            >() -> KernelFn<P, S> {
                #[target_feature(enable = $features)]
                unsafe fn run<
                    P: Element,
                    S: Element,
                    const K: u32,
                    const SAGE: bool,
                    const MODU: u32,
                    const SGDV: u32,
                >(
                    k: &Coeffs,
                    b: Bufs<P, S>,
                    n: usize,
                    then: Then<P, S>,
                ) -> u64 {
                    let op = StepOp::<$lanes, K, SAGE, MODU, SGDV>::new(k);
                    drive::<$lanes, P, S, _>(&op, b, n, then)
                }
                run::<P, S, K, SAGE, MODU, SGDV>
            }
            fn floor<P: Element, S: Element, const M: bool, const V: bool, const IB: bool>(
            ) -> KernelFn<P, S> {
                #[target_feature(enable = $features)]
                unsafe fn run<P: Element, S: Element, const M: bool, const V: bool, const IB: bool>(
                    k: &Coeffs,
                    b: Bufs<P, S>,
                    n: usize,
                    then: Then<P, S>,
                ) -> u64 {
                    let op = FloorOp::<$lanes, M, V, IB> {
                        c: <$lanes as Lanes>::splat(k.step),
                    };
                    drive::<$lanes, P, S, _>(&op, b, n, then)
                }
                run::<P, S, M, V, IB>
            }
            fn sq_norm<E: Element>() -> unsafe fn(&[E]) -> f64 {
                #[target_feature(enable = $features)]
                unsafe fn run<E: Element>(x: &[E]) -> f64 {
                    sq_norm_lanes::<$lanes, E>(x)
                }
                run::<E>
            }
            fn read<E: Element>() -> unsafe fn(&[E]) -> f32 {
                #[target_feature(enable = $features)]
                unsafe fn run<E: Element>(x: &[E]) -> f32 {
                    read_lanes::<$lanes, E>(x)
                }
                run::<E>
            }
        }
    };
}

#[cfg(target_arch = "x86_64")]
isa!(
    /// AVX2 + FMA + F16C kernels.
    Avx2Isa,
    crate::lanes::avx2::Avx2,
    "avx2,fma,f16c"
);
#[cfg(target_arch = "x86_64")]
isa!(
    /// AVX-512F + BW kernels.
    Avx512Isa,
    crate::lanes::avx512::Avx512<false>,
    "avx512f,avx512bw,avx2,fma,f16c"
);
#[cfg(target_arch = "x86_64")]
isa!(
    /// AVX-512F + BW kernels that round bf16 stores with AVX512-BF16 (used only for tensors
    /// with bf16 storage, where it is the difference).
    Avx512Bf16Isa,
    crate::lanes::avx512::Avx512<true>,
    "avx512f,avx512bw,avx512bf16,avx2,fma,f16c"
);
#[cfg(target_arch = "aarch64")]
isa!(
    /// NEON kernels.
    NeonIsa,
    crate::lanes::neon::Neon,
    "neon"
);

/// Which state buffers a tensor has.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Present {
    pub m: bool,
    pub v: bool,
    pub ib: bool,
}

/// Whether a step over storage `P`, `S` takes the AVX512-BF16 kernels when `native_bf16`.
#[cfg(target_arch = "x86_64")]
fn bf16_kernels<P: Element, S: Element>(native_bf16: bool) -> bool {
    use sage_core::DType;
    native_bf16 && (P::DTYPE == DType::Bf16 || S::DTYPE == DType::Bf16)
}

/// The step kernel of `level` for a tensor with coefficients `k` and buffers `has`, or `None`
/// where the portable path must run it (portable level, or a layout no kernel covers).
/// `native_bf16`: the CPU has AVX512-BF16 and the backend may use it.
pub(crate) fn pick<P: Element, S: Element>(
    level: Level,
    native_bf16: bool,
    k: &Coeffs,
    has: Present,
) -> Option<KernelFn<P, S>> {
    // AVX512-BF16 is x86-64's only.
    #[cfg(not(target_arch = "x86_64"))]
    let _ = native_bf16;
    match level {
        #[cfg(target_arch = "x86_64")]
        Level::Avx2 => pick_in::<Avx2Isa, P, S>(k, has),
        #[cfg(target_arch = "x86_64")]
        Level::Avx512 if bf16_kernels::<P, S>(native_bf16) => {
            pick_in::<Avx512Bf16Isa, P, S>(k, has)
        }
        #[cfg(target_arch = "x86_64")]
        Level::Avx512 => pick_in::<Avx512Isa, P, S>(k, has),
        #[cfg(target_arch = "aarch64")]
        Level::Neon => pick_in::<NeonIsa, P, S>(k, has),
        _ => None,
    }
}

fn pick_in<I: Isa, P: Element, S: Element>(k: &Coeffs, has: Present) -> Option<KernelFn<P, S>> {
    let sage = k.flags & flags::SAGE != 0;
    if has.ib != sage {
        return None;
    }
    match k.kind {
        kind::ADAM if has.m && has.v => by_modulation::<I, P, S, { kind::ADAM }, 0>(sage, k),
        kind::ADAMAX if has.m && has.v => by_modulation::<I, P, S, { kind::ADAMAX }, 0>(sage, k),
        kind::SGD if !has.v => {
            let variant = if k.flags & flags::MOMENTUM == 0 {
                SGD_PLAIN
            } else if k.flags & flags::NESTEROV != 0 {
                SGD_NESTEROV
            } else {
                SGD_MOMENTUM
            };
            if has.m != (variant != SGD_PLAIN) {
                return None;
            }
            match variant {
                SGD_PLAIN => by_modulation::<I, P, S, { kind::SGD }, SGD_PLAIN>(sage, k),
                SGD_MOMENTUM => by_modulation::<I, P, S, { kind::SGD }, SGD_MOMENTUM>(sage, k),
                _ => by_modulation::<I, P, S, { kind::SGD }, SGD_NESTEROV>(sage, k),
            }
        }
        _ => None,
    }
}

fn by_modulation<I: Isa, P: Element, S: Element, const K: u32, const SGDV: u32>(
    sage: bool,
    k: &Coeffs,
) -> Option<KernelFn<P, S>> {
    if !sage {
        return Some(I::step::<P, S, K, false, 0, SGDV>());
    }
    const SAGE: u32 = Modulation::Sage as u32;
    const ITV: u32 = Modulation::ImportanceTimesVariation as u32;
    const IOV: u32 = Modulation::ImportanceOverVariation as u32;
    const IMP: u32 = Modulation::Importance as u32;
    const INV: u32 = Modulation::InverseImportance as u32;
    const VAR: u32 = Modulation::Variation as u32;
    Some(match k.modulation {
        SAGE => I::step::<P, S, K, true, SAGE, SGDV>(),
        ITV => I::step::<P, S, K, true, ITV, SGDV>(),
        IOV => I::step::<P, S, K, true, IOV, SGDV>(),
        IMP => I::step::<P, S, K, true, IMP, SGDV>(),
        INV => I::step::<P, S, K, true, INV, SGDV>(),
        VAR => I::step::<P, S, K, true, VAR, SGDV>(),
        _ => return None,
    })
}

/// The floor kernel of `level` for buffers `has` (`None` on the portable level), with the
/// same stores as the step `pick` gives.
pub(crate) fn pick_floor<P: Element, S: Element>(
    level: Level,
    native_bf16: bool,
    has: Present,
) -> Option<KernelFn<P, S>> {
    // AVX512-BF16 is x86-64's only.
    #[cfg(not(target_arch = "x86_64"))]
    let _ = native_bf16;
    match level {
        #[cfg(target_arch = "x86_64")]
        Level::Avx2 => Some(floor_in::<Avx2Isa, P, S>(has)),
        #[cfg(target_arch = "x86_64")]
        Level::Avx512 if bf16_kernels::<P, S>(native_bf16) => {
            Some(floor_in::<Avx512Bf16Isa, P, S>(has))
        }
        #[cfg(target_arch = "x86_64")]
        Level::Avx512 => Some(floor_in::<Avx512Isa, P, S>(has)),
        #[cfg(target_arch = "aarch64")]
        Level::Neon => Some(floor_in::<NeonIsa, P, S>(has)),
        _ => None,
    }
}

fn floor_in<I: Isa, P: Element, S: Element>(has: Present) -> KernelFn<P, S> {
    match (has.m, has.v, has.ib) {
        (false, false, false) => I::floor::<P, S, false, false, false>(),
        (true, false, false) => I::floor::<P, S, true, false, false>(),
        (false, true, false) => I::floor::<P, S, false, true, false>(),
        (true, true, false) => I::floor::<P, S, true, true, false>(),
        (false, false, true) => I::floor::<P, S, false, false, true>(),
        (true, false, true) => I::floor::<P, S, true, false, true>(),
        (false, true, true) => I::floor::<P, S, false, true, true>(),
        (true, true, true) => I::floor::<P, S, true, true, true>(),
    }
}

/// `Σ x²` of `x` with `level`'s instruction set.
pub(crate) fn sq_norm<E: Element>(level: Level, x: &[E]) -> f64 {
    match level {
        // SAFETY: a `SimdCpu` holds a level only after checking the CPU has it.
        #[cfg(target_arch = "x86_64")]
        Level::Avx2 => unsafe { Avx2Isa::sq_norm::<E>()(x) },
        // SAFETY: as above.
        #[cfg(target_arch = "x86_64")]
        Level::Avx512 => unsafe { Avx512Isa::sq_norm::<E>()(x) },
        // SAFETY: as above.
        #[cfg(target_arch = "aarch64")]
        Level::Neon => unsafe { NeonIsa::sq_norm::<E>()(x) },
        _ => sq_norm_body(x),
    }
}

/// The read floor of `x` with `level`'s instruction set ([`read_lanes`]; scalar on the
/// portable level).
// Only the threaded benchmark helper `SimdCpu::stream_read_floor` (std) reads through it.
#[cfg_attr(not(feature = "std"), allow(dead_code))]
pub(crate) fn read_floor<E: Element>(level: Level, x: &[E]) -> f32 {
    match level {
        // SAFETY: a `SimdCpu` holds a level only after checking the CPU has it.
        #[cfg(target_arch = "x86_64")]
        Level::Avx2 => unsafe { Avx2Isa::read::<E>()(x) },
        // SAFETY: as above.
        #[cfg(target_arch = "x86_64")]
        Level::Avx512 => unsafe { Avx512Isa::read::<E>()(x) },
        // SAFETY: as above.
        #[cfg(target_arch = "aarch64")]
        Level::Neon => unsafe { NeonIsa::read::<E>()(x) },
        _ => {
            let mut acc = [0f32; 4];
            let mut quads = x.chunks_exact(4);
            for q in &mut quads {
                for (a, v) in acc.iter_mut().zip(q) {
                    *a += v.to_f32();
                }
            }
            acc.iter().sum::<f32>() + quads.remainder().iter().map(|v| v.to_f32()).sum::<f32>()
        }
    }
}

/// The floor for the portable level: the same traffic in scalar code.
pub(crate) unsafe fn floor_scalar<P: Element, S: Element>(
    k: &Coeffs,
    b: Bufs<P, S>,
    n: usize,
    _then: Then<P, S>,
) -> u64 {
    for i in 0..n {
        let t = b.range_from(i);
        let g = (*t.g).to_f32() * k.step;
        for s in [t.m, t.v, t.ib] {
            if !s.is_null() {
                *s = S::from_f32((*s).to_f32() + g);
            }
        }
        *t.p = P::from_f32((*t.p).to_f32() + g);
    }
    0
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The reciprocal-and-correction division equals `formula::corrected_ibar`'s division bit
    /// for bit: every mantissa in [1, 2) for divisors the bias correction takes; the edges of
    /// the fused range each in a register of its own (so the fused path, not the fallback,
    /// meets them: +0, 2^-90, 2^100) and past them (−0, subnormals, ±Inf, NaN, negatives).
    #[test]
    fn reciprocal_division_has_the_division_bits() {
        type Divide = unsafe fn(&mut [f32], f32);
        let mut isas: Vec<(&str, Divide)> = Vec::new();
        #[cfg(target_arch = "x86_64")]
        {
            if Level::Avx2.is_available() {
                isas.push(("avx2", Avx2Isa::corrected_ibar()));
            }
            if Level::Avx512.is_available() {
                isas.push(("avx512", Avx512Isa::corrected_ibar()));
            }
            if crate::level::has_avx512_bf16() {
                isas.push(("avx512/bf16", Avx512Bf16Isa::corrected_ibar()));
            }
        }
        #[cfg(target_arch = "aarch64")]
        if Level::Neon.is_available() {
            isas.push(("neon", NeonIsa::corrected_ibar()));
        }
        assert!(
            !isas.is_empty() || !cfg!(any(target_arch = "x86_64", target_arch = "aarch64")),
            "no vector level on this machine: nothing here checks the fused division"
        );
        const W: usize = 16; // a register of the widest level
                             // Under emulation (aarch64 in CI) a sample of the mantissas.
        let stride = if cfg!(target_arch = "x86_64") { 1 } else { 61 };
        let mut xs: Vec<f32> = (0..1u32 << 23)
            .step_by(stride)
            .map(|m| f32::from_bits((127 << 23) | m))
            .collect();
        xs.resize(xs.len().next_multiple_of(W), 1.0);
        let next_up = |x: f32| f32::from_bits(x.to_bits() + 1);
        let next_down = |x: f32| f32::from_bits(x.to_bits() - 1);
        let mut edges = vec![
            0.0,
            -0.0,
            f32::from_bits(1),
            f32::MIN_POSITIVE,
            QUOTIENT_LO,
            next_down(QUOTIENT_LO),
            next_up(QUOTIENT_LO),
            QUOTIENT_HI,
            next_up(QUOTIENT_HI),
            next_down(QUOTIENT_HI),
            f32::MAX,
            f32::INFINITY,
            f32::NEG_INFINITY,
            f32::NAN,
            -1.0,
        ];
        edges.extend((-149..=127).map(|e| 2f32.powi(e) * 1.618_034));
        for e in edges {
            // Alone in a register, and beside ordinary values.
            xs.extend([e; W]);
            xs.extend((0..W).map(|j| if j == 5 { e } else { 1.25 + j as f32 }));
        }
        let mut divisors: Vec<f32> = [
            (0.85f64, 1),
            (0.85, 2),
            (0.85, 7),
            (0.75, 3),
            (0.9, 1),
            (0.9, 13),
            (0.99, 1),
            (0.999, 1),
            (0.999_99, 1),
            (0.5, 40),
        ]
        .iter()
        .map(|&(b, t)| (1.0 - b.powi(t)) as f32)
        .collect();
        // A power of two (exact reciprocal); the smallest divisor on the fused path, and one
        // past it (always divides); the mantissas next to 1.
        divisors.extend([
            1.0,
            MIN_FUSED_DIVISOR,
            next_down(MIN_FUSED_DIVISOR),
            next_down(1.0),
            next_down(next_down(1.0)),
        ]);
        for (name, f) in isas {
            for &d in &divisors {
                let k = Coeffs {
                    ibar_div: d,
                    ..Coeffs::default()
                };
                let mut got = xs.clone();
                // SAFETY: `is_available` checked the CPU has the instruction set.
                unsafe { f(&mut got, d) };
                for (x, g) in xs.iter().zip(&got) {
                    let want = sage_core::formula::corrected_ibar(&k, *x);
                    assert_eq!(g.to_bits(), want.to_bits(), "{name}: {x:e} / {d:e}");
                }
            }
        }
    }
}
