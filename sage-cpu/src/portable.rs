//! The portable backend: scalar loops over [`sage_core::formula`]. `no_std`, no allocator.

use sage_core::formula::{self, Accumulate};
use sage_core::norm;
use sage_core::{ApplyArgs, Backend, Coeffs, Element, Infallible, TensorMut};

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

/// `Σ x²` on the contract's chunk grid ([`sage_core::norm`]): each chunk summed in f64 in
/// order, the chunks folded first to last. NaN and ±Inf propagate; f32 squares cannot overflow.
pub fn sq_norm<E: Element>(x: &[E]) -> f64 {
    norm::fold(x.chunks(norm::NORM_CHUNK).map(norm::chunk_partial))
}

/// The partials of chunks `first .. first + out.len()` of `x` ([`sage_core::norm`]).
pub fn sq_norm_chunks<E: Element>(x: &[E], first: usize, out: &mut [f64]) {
    for (c, o) in out.iter_mut().enumerate() {
        *o = norm::chunk_partial(&x[norm::chunk_range(x.len(), first + c)]);
    }
}

/// The fused step over slices of equal length (checked by the caller).
pub fn fused<P: Element, S: Element>(t: TensorMut<'_, Cpu, P, S>, k: &Coeffs) {
    let TensorMut {
        param,
        grad,
        mut m,
        mut v,
        mut ibar,
    } = t;
    for (i, (p, g)) in param.iter_mut().zip(grad.iter()).enumerate() {
        formula::step::<P, S>(
            k,
            p,
            *g,
            m.as_deref_mut().map(|b| &mut b[i]),
            v.as_deref_mut().map(|b| &mut b[i]),
            ibar.as_deref_mut().map(|b| &mut b[i]),
        );
    }
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
}

#[cfg(feature = "alloc")]
sage_core::slice_host_buffers!(Cpu, "cpu/portable");
