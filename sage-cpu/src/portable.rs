//! The portable backend: scalar loops over [`sage_core::formula`]. `no_std`, no allocator.

use sage_core::formula::{self, Accumulate};
use sage_core::norm;
use sage_core::{ApplyArgs, Backend, Coeffs, Element, Infallible, ParamTensor, TensorMut};

/// The portable CPU backend.
///
/// ```
/// use sage_core::{Algorithm, Config, Optimizer, ParamGroup, ParamTensor, TensorState};
/// use sage_cpu::Cpu;
///
/// let cfg = Config::reference(Algorithm::adamw(), 1e-3).beta0(0.8);
/// let mut opt = Optimizer::new(Cpu, cfg, [ParamGroup::sage().weight_decay(0.01)]).unwrap();
/// let (mut w, g) = ([0.5f32, -0.25, 0.0], [0.1f32, 0.2, 0.3]);
/// // No allocator needed: the state may borrow any buffers (here, arrays on the stack).
/// let (mut m, mut v, mut ibar) = ([0f32; 3], [0f32; 3], [0f32; 3]);
/// let mut state = TensorState { m: Some(&mut m[..]), v: Some(&mut v[..]), ibar: Some(&mut ibar[..]), step: 0 };
/// let report = opt
///     .step(&mut [ParamTensor::new(&mut w[..], &g[..], state.view())])
///     .unwrap();
/// assert!(report.applied());
/// assert_eq!(state.step, 1); // the tensor's own count
/// // First step of the reference preset: Ī' = I, so U = 0 and s = 0; only the decoupled
/// // decay moves θ, toward 0.
/// assert!(w[0] < 0.5 && w[1] > -0.25);
/// assert_eq!(w[2], 0.0); // θ = 0 has zero sensitivity, so s = 0
/// ```
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Cpu;

/// Elements per `f32` block of the norm ([`chunk_partial`]).
pub const NORM_BLOCK: usize = 32;

/// Independent `f32` accumulators within a block (element `i` goes to lane `i % 4`).
const NORM_LANES: usize = 4;

/// A bound on the relative error of [`sq_norm`] and of every chunk partial against the exact
/// `Σ x²`, for finite inputs whose squares are normal `f32` numbers (each square that is
/// subnormal in `f32`, |x| < 2⁻⁶³ ≈ 1.1e-19, may add up to 2⁻¹⁴⁹ ≈ 1.4e-45 of absolute error
/// instead): one rounding per square, at most `NORM_BLOCK / NORM_LANES − 1` per lane sum and
/// 2 in the lanes' tree, each ≤ 2⁻²⁴ relative on non-negative terms, plus one more 2⁻²⁴ for
/// the second-order terms and the `f64` folds (≤ 2⁻⁵³ per block). The norm itself (`√`) is
/// within half of it.
pub const NORM_REL_ERROR: f64 = (NORM_BLOCK / NORM_LANES + 3) as f64 * (1.0 / (1u64 << 24) as f64);

/// `Σ x²` on the contract's chunk grid ([`sage_core::norm`]): each chunk's partial from
/// [`chunk_partial`], the chunks folded first to last in `f64`.
pub fn sq_norm<E: Element>(x: &[E]) -> f64 {
    norm::fold(x.chunks(norm::NORM_CHUNK).map(chunk_partial))
}

/// The partials of chunks `first .. first + out.len()` of `x` ([`sage_core::norm`]).
pub fn sq_norm_chunks<E: Element>(x: &[E], first: usize, out: &mut [f64]) {
    for (c, o) in out.iter_mut().enumerate() {
        *o = chunk_partial(&x[norm::chunk_range(x.len(), first + c)]);
    }
}

/// One chunk's `Σ x²` as the portable backend computes it, the same on every target: blocks
/// of [`NORM_BLOCK`] elements summed in `f32` (squares in [`NORM_LANES`] accumulators, added
/// pairwise), each block's sum widened to `f64` and the blocks added in order in `f64`.
///
/// `f32` arithmetic is what a single-precision FPU (Cortex-M4F, M33F) does in hardware and
/// an FPU-less core does with half the soft-float work of `f64`; the `f64` adds run once per
/// block. The contract's guarantees hold exactly:
/// - the result depends on the chunk's contents only (a fixed order of operations);
/// - a block whose `f32` sum is not finite — a NaN or ±Inf element, or finite elements whose
///   squares overflow `f32` (|x| ≳ 1.8e19) — is summed again exactly in `f64`
///   ([`norm::chunk_partial`]): NaN and ±Inf make the partial non-finite, and finite inputs
///   never overflow it (4096 squares of `f32::MAX` are 4.7e80);
/// - otherwise the relative error is within [`NORM_REL_ERROR`] (≈ 6e-7).
///
/// ```
/// use sage_cpu::portable::{chunk_partial, NORM_REL_ERROR};
/// let x = [3.0f32, 4.0, 1e-3];
/// assert!((chunk_partial(&x) - 25.000001).abs() <= NORM_REL_ERROR * 25.0);
/// // 2⁶⁴ squared overflows f32: the block is summed again in f64, exactly.
/// let big = 2f32.powi(64);
/// assert_eq!(chunk_partial(&[big, big]), 2.0 * 2f64.powi(128));
/// assert!(chunk_partial(&[1.0f32, f32::NAN]).is_nan());
/// assert_eq!(chunk_partial(&[1.0f32, f32::NEG_INFINITY]), f64::INFINITY);
/// ```
pub fn chunk_partial<E: Element>(chunk: &[E]) -> f64 {
    let mut total = 0f64;
    for block in chunk.chunks(NORM_BLOCK) {
        let s = block_sq(block);
        total += if s.is_finite() {
            f64::from(s)
        } else {
            norm::chunk_partial(block)
        };
    }
    total
}

/// `Σ x²` of at most [`NORM_BLOCK`] elements in `f32`: lane `i % 4` takes element `i`.
#[inline(always)]
fn block_sq<E: Element>(block: &[E]) -> f32 {
    let mut acc = [0f32; NORM_LANES];
    let mut quads = block.chunks_exact(NORM_LANES);
    for q in &mut quads {
        for (a, x) in acc.iter_mut().zip(q) {
            let x = x.to_f32();
            *a += x * x;
        }
    }
    for (a, x) in acc.iter_mut().zip(quads.remainder()) {
        let x = x.to_f32();
        *a += x * x;
    }
    (acc[0] + acc[1]) + (acc[2] + acc[3])
}

/// The fused step over slices of equal length (checked by the caller); returns how many
/// updated parameters are NaN or ±Inf (counted as they are stored).
pub fn fused<P: Element, S: Element>(t: TensorMut<'_, Cpu, P, S>, k: &Coeffs) -> u64 {
    let TensorMut {
        param,
        grad,
        mut m,
        mut v,
        mut ibar,
    } = t;
    let mut bad = 0u64;
    for (i, (p, g)) in param.iter_mut().zip(grad.iter()).enumerate() {
        formula::step::<P, S>(
            k,
            p,
            *g,
            m.as_deref_mut().map(|b| &mut b[i]),
            v.as_deref_mut().map(|b| &mut b[i]),
            ibar.as_deref_mut().map(|b| &mut b[i]),
        );
        bad += u64::from(!p.to_f32().is_finite());
    }
    bad
}

impl Backend for Cpu {
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
        sq_norm_chunks(buf, first, out);
        Ok(())
    }

    fn accumulate<P: Element, S: Element>(
        &mut self,
        which: Accumulate,
        acc: &mut [S],
        param: &[P],
        grad: &[P],
        k: &Coeffs,
    ) -> Result<(), Infallible> {
        for ((a, p), g) in acc.iter_mut().zip(param).zip(grad) {
            *a = S::from_f32(formula::accumulate(
                k,
                which,
                a.to_f32(),
                p.to_f32(),
                g.to_f32(),
            ));
        }
        Ok(())
    }

    fn apply<P: Element, S: Element>(
        &mut self,
        t: ApplyArgs<'_, Self, P, S>,
        k: &Coeffs,
    ) -> Result<(), Infallible> {
        let read = |b: Option<&[S]>, i: usize| b.map_or(0.0, |b| b[i].to_f32());
        for (i, (p, g)) in t.param.iter_mut().zip(t.grad).enumerate() {
            let new = formula::apply(
                k,
                p.to_f32(),
                g.to_f32(),
                read(t.m, i),
                read(t.v, i),
                read(t.ibar, i),
            );
            *p = P::from_f32(new);
        }
        Ok(())
    }

    fn fused_step<P: Element, S: Element>(
        &mut self,
        t: TensorMut<'_, Self, P, S>,
        k: &Coeffs,
    ) -> Result<(), Infallible> {
        fused(t, k);
        Ok(())
    }

    fn step_tensors<P: Element, S: Element>(
        &mut self,
        tensors: &mut [ParamTensor<'_, Self, P, S>],
    ) -> Result<(), Infallible> {
        for t in tensors.iter_mut() {
            let k = *t.coeffs();
            let bad = fused(t.view(), &k);
            t.set_non_finite(bad);
        }
        Ok(())
    }
}

#[cfg(feature = "alloc")]
sage_core::slice_host_buffers!(Cpu, "cpu/portable");
