//! The suite must catch bugs: each backend here is sage-cpu with one planted bug, and the suite
//! must fail on every one of them (and pass on the healthy backend).

use sage_conformance::suite::{run_suite, Options, Status};
use sage_conformance::Harness;
use sage_core::formula::{self, Accumulate};
use sage_core::{ApplyArgs, Backend, Coeffs, Element, Infallible};
use sage_cpu::Cpu;

#[derive(Clone, Copy, Debug, PartialEq)]
enum Bug {
    /// Ī is never divided by 1 − β0^t.
    DropBiasCorrection,
    /// Ī = (1 − β0)·Ī + β0·I.
    SwapBeta0,
    /// U = I − Ī' instead of |I − Ī'|.
    NoAbsInU,
    /// The last element of an odd-length tensor is never stepped.
    OddTail,
    /// The gradient norm skips NaN and ±Inf, so the guard never fires.
    NanThrough,
}

#[derive(Clone, Copy, Debug)]
struct Broken(Bug);

impl Broken {
    fn coeffs(&self, k: &Coeffs) -> Coeffs {
        let mut k = *k;
        match self.0 {
            Bug::DropBiasCorrection => k.ibar_scale = 1.0,
            Bug::SwapBeta0 => (k.beta0, k.alpha0) = (k.alpha0, k.beta0),
            _ => {}
        }
        k
    }
    /// How many leading elements of a tensor of `n` this backend steps.
    fn stepped(&self, n: usize) -> usize {
        if self.0 == Bug::OddTail && n % 2 == 1 {
            n - 1
        } else {
            n
        }
    }
}

impl Backend for Broken {
    type Error = Infallible;
    type Buf<E: Element> = [E];

    fn len<E: Element>(&self, buf: &[E]) -> usize {
        buf.len()
    }

    fn sq_norm<E: Element>(&mut self, buf: &[E]) -> Result<f64, Infallible> {
        if self.0 == Bug::NanThrough {
            let finite = buf
                .iter()
                .map(|x| x.to_f32() as f64)
                .filter(|x| x.is_finite());
            return Ok(finite.map(|x| x * x).sum());
        }
        Cpu.sq_norm(buf)
    }

    fn accumulate<P: Element, S: Element>(
        &mut self,
        which: Accumulate,
        acc: &mut [S],
        param: &[P],
        grad: &[P],
        k: &Coeffs,
    ) -> Result<(), Infallible> {
        let n = self.stepped(acc.len());
        let k = self.coeffs(k);
        Cpu.accumulate(which, &mut acc[..n], &param[..n], &grad[..n], &k)
    }

    fn apply<P: Element, S: Element>(
        &mut self,
        t: ApplyArgs<'_, Self, P, S>,
        k: &Coeffs,
    ) -> Result<(), Infallible> {
        let k = self.coeffs(k);
        let n = self.stepped(t.param.len());
        let read = |b: Option<&[S]>, i: usize| b.map_or(0.0, |b| b[i].to_f32());
        for i in 0..n {
            let (theta, grad) = (t.param[i].to_f32(), t.grad[i].to_f32());
            let (m, v, ib) = (read(t.m, i), read(t.v, i), read(t.ibar, i));
            let new = if self.0 == Bug::NoAbsInU && k.sage() {
                let g = formula::effective_grad(&k, theta, grad);
                let ibar = ib * k.ibar_scale;
                let u = formula::sensitivity(theta, g) - ibar; // the planted bug
                let s = (u + k.eps_num) / (ibar + k.eps_den);
                let mut plain = k;
                plain.flags &= !sage_core::coeffs::flags::SAGE;
                plain.step *= s;
                formula::apply(&plain, theta, grad, m, v, ib)
            } else {
                formula::apply(&k, theta, grad, m, v, ib)
            };
            t.param[i] = P::from_f32(new);
        }
        Ok(())
    }
}

sage_conformance::slice_harness!(Broken, |b| format!("{:?}", b.0));

fn failing_checks<B: Harness + 'static>(b: B) -> Vec<String> {
    run_suite(b, &Options::default())
        .into_iter()
        .filter(|r| matches!(r.status, Status::Fail(_)))
        .map(|r| r.check)
        .collect()
}

#[test]
fn healthy_backend_passes_everything() {
    let rows = run_suite(Cpu, &Options::default());
    let bad: Vec<_> = rows.iter().filter(|r| r.status != Status::Pass).collect();
    assert!(bad.is_empty(), "{bad:#?}");
}

#[test]
fn every_planted_bug_is_caught() {
    let mut missed = Vec::new();
    for bug in [
        Bug::DropBiasCorrection,
        Bug::SwapBeta0,
        Bug::NoAbsInU,
        Bug::OddTail,
        Bug::NanThrough,
    ] {
        let failing = failing_checks(Broken(bug));
        println!("{bug:?} caught by: {failing:?}");
        if failing.is_empty() {
            missed.push(bug);
        }
    }
    assert!(
        missed.is_empty(),
        "the suite passed a broken backend: {missed:?}"
    );
}
