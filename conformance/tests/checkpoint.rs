//! The checkpoint checks can fail: a backend whose host copies lose data (the last element
//! dropped, Ī not restored, values rounded) is caught by the cross-backend check, while the
//! healthy CPU backends pass it both ways.

use sage_conformance::checks::checkpoint::{cross_backend, resume_from_checkpoint};
use sage_core::{ApplyArgs, Backend, Coeffs, Element, HostBuffers, Infallible};
use sage_cpu::{Cpu, SimdCpu};

#[derive(Clone, Copy, Debug, PartialEq)]
enum Bug {
    None,
    /// `write_host` leaves the last element of odd-length buffers alone.
    OddTail,
    /// `write_host` rounds every value to bf16 precision.
    Rounds,
    /// `read_host` reads zeros (as if the device copy never happened).
    ReadsZeros,
}

/// The portable CPU backend with a planted bug in its host copies only.
#[derive(Clone, Copy, Debug)]
struct Leaky(Bug);

impl Backend for Leaky {
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
        Cpu.sq_norm_chunks(buf, first, out)
    }
    fn accumulate<P: Element, S: Element>(
        &mut self,
        which: sage_core::Accumulate,
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
        Cpu.apply(
            ApplyArgs {
                param: t.param,
                grad: t.grad,
                m: t.m,
                v: t.v,
                ibar: t.ibar,
            },
            k,
        )
    }
}

impl HostBuffers for Leaky {
    type Owned<E: Element> = Vec<E>;
    fn describe(&self, out: &mut dyn std::fmt::Write) -> std::fmt::Result {
        write!(out, "leaky {:?}", self.0)
    }
    fn upload<E: Element>(&mut self, data: &[E]) -> Result<Vec<E>, Infallible> {
        let mut v = vec![E::default(); data.len()];
        self.copy_from_host(&mut v, data)?;
        Ok(v)
    }
    fn copy_to_host<E: Element>(&mut self, buf: &[E], out: &mut [E]) -> Result<(), Infallible> {
        if self.0 == Bug::ReadsZeros {
            out.fill(E::default());
        } else {
            out.copy_from_slice(buf);
        }
        Ok(())
    }
    fn copy_from_host<E: Element>(&mut self, buf: &mut [E], data: &[E]) -> Result<(), Infallible> {
        let n = if self.0 == Bug::OddTail && data.len() % 2 == 1 {
            data.len() - 1
        } else {
            data.len()
        };
        for (b, d) in buf[..n].iter_mut().zip(data) {
            *b = match self.0 {
                Bug::Rounds => E::from_f32(sage_core::bf16::from_f32(d.to_f32()).to_f32()),
                _ => *d,
            };
        }
        Ok(())
    }
}

#[test]
fn healthy_backends_pass_both_ways() {
    cross_backend(&mut Cpu, &mut Leaky(Bug::None)).unwrap();
    cross_backend(&mut Leaky(Bug::None), &mut SimdCpu::new()).unwrap();
    resume_from_checkpoint(&mut Leaky(Bug::None)).unwrap();
}

#[test]
fn lossy_host_copies_are_caught() {
    for bug in [Bug::OddTail, Bug::Rounds] {
        let e = cross_backend(&mut Cpu, &mut Leaky(bug)).unwrap_err();
        println!("{bug:?}: {e}");
    }
    let e = cross_backend(&mut Leaky(Bug::ReadsZeros), &mut Cpu).unwrap_err();
    println!("ReadsZeros: {e}");
}
