//! A slice backend as a third party would write it: only the four required primitives of
//! [`sage_core::Backend`], each a plain loop, and nothing else. Everything the conformance
//! suite needs beyond that comes from `sage_core::slice_host_buffers!`.

use sage_core::formula::{self, Accumulate};
use sage_core::norm;
use sage_core::{ApplyArgs, Backend, Coeffs, Element, Infallible};

/// The outsider's backend: scalar loops over slices.
#[derive(Clone, Copy, Debug, Default)]
pub struct Outsider;

impl Backend for Outsider {
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
            *o = norm::chunk_partial(&buf[norm::chunk_range(buf.len(), first + c)]);
        }
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
            let x = formula::accumulate(k, which, a.to_f32(), p.to_f32(), g.to_f32());
            *a = S::from_f32(x);
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
            let th = formula::apply(
                k,
                p.to_f32(),
                g.to_f32(),
                read(t.m, i),
                read(t.v, i),
                read(t.ibar, i),
            );
            *p = P::from_f32(th);
        }
        Ok(())
    }
}

// The host-copy capability checkpoints and the suite use: one line for a slice backend.
sage_core::slice_host_buffers!(Outsider, "outsider");
