//! The checkpoint checks can fail: a backend whose host copies lose data (the last element
//! dropped, Ī not restored, values rounded) is caught by the cross-backend check, while the
//! healthy CPU backends pass it both ways.

use sage_checkpoint::{HostAccess, HostError};
use sage_conformance::checks::checkpoint::{cross_backend, resume_from_checkpoint};
use sage_core::{ApplyArgs, Backend, Coeffs, Element, Infallible};
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
    fn sq_norm<E: Element>(&mut self, buf: &[E]) -> Result<f64, Infallible> {
        Cpu.sq_norm(buf)
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

sage_conformance::slice_harness!(Leaky, |b| format!("{:?}", b.0));

impl HostAccess for Leaky {
    fn read_host<E: Element>(&mut self, buf: &[E], out: &mut [E]) -> Result<(), HostError> {
        if self.0 == Bug::ReadsZeros {
            out.fill(E::default());
        } else {
            out.copy_from_slice(buf);
        }
        Ok(())
    }
    fn write_host<E: Element>(&mut self, buf: &mut [E], data: &[E]) -> Result<(), HostError> {
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

/// OpenCL ↔ CPU through each backend's own host copies, both ways, when an OpenCL device is
/// here (PoCL on CI); with `SAGE_REQUIRE_OPENCL` set, a missing device fails the test.
#[test]
fn opencl_and_cpu_resume_each_other() {
    let mut cl = match sage_opencl::OpenCl::new() {
        Ok(b) => b,
        Err(e) => {
            assert!(
                std::env::var_os("SAGE_REQUIRE_OPENCL").is_none(),
                "SAGE_REQUIRE_OPENCL is set but: {e}"
            );
            eprintln!("skipped: no OpenCL device ({e})");
            return;
        }
    };
    let w = cross_backend(&mut cl.clone(), &mut Cpu).unwrap();
    println!("opencl -> cpu: worst {:e}x tolerance", w.ratio);
    let w = cross_backend(&mut Cpu, &mut cl).unwrap();
    println!("cpu -> opencl: worst {:e}x tolerance", w.ratio);
    resume_from_checkpoint(&mut cl).unwrap();
}
