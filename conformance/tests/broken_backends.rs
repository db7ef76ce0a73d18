//! The suite must catch bugs: each backend here is sage-cpu with one planted bug, and the suite
//! must fail on every one of them (and pass on the healthy backend). Like the real backends,
//! each counts non-finite parameters (after its update, in a pass of its own) and is run as one
//! that must (`Options::counts_non_finite`), so the counting bugs are planted too.

use sage_conformance::suite::{run_suite, Options, Status};
use sage_conformance::Harness;
use sage_core::formula::{self, Accumulate};
use sage_core::{
    bf16, f16, ApplyArgs, Backend, Coeffs, DType, Element, Infallible, Modulation, ParamTensor,
    TensorMut,
};
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
    /// A `grad_sq_norms` override that sums each gradient last element first, off the
    /// contract's chunk grid: close to the right norm, but not the bits a sharded run gets.
    NormOffGrid,
    /// A `step_tensors` override that steps every tensor with the first tensor's coefficients
    /// (fine while every count is the same).
    SharedCoeffs,
    /// A size-dependent path: the `step_tensors` override leaves the last 3 elements of tensors
    /// longer than 65,536 unstepped (a GPU chunk's tail).
    LongTail,
    /// A `grad_sq_norms` override that drops the last chunk of tensors longer than 16 chunks.
    LongNorm,
    /// A storage-type-only path: the `fused_step` override uses β2 for β1 when the parameters
    /// are bf16.
    Bf16Beta,
    /// Claims to have counted non-finite parameters in its update pass but never finds any.
    MiscountsNonFinite,
    /// Counts non-finite parameters in the first 65,536 elements of each tensor only (a GPU
    /// kernel that counts in its first chunk, or drops the other chunks' counts).
    CountsFirstChunk,
    /// Stops counting non-finite parameters (reports `params_checked: false`) while it is run
    /// as a backend that counts.
    NeverCounts,
    /// The gradient's scale (clipping) is never applied.
    IgnoreGradScale,
    /// No ε under Adam's denominator.
    IgnoreDenomEps,
    /// No ε in SAGE's numerator `U + ε`.
    IgnoreEpsNum,
    /// AdamW's decoupled weight decay never applied.
    NoDecoupledDecay,
    /// L2 weight decay (added to the gradient) never applied.
    NoL2,
    /// bf16 parameters stored by truncation instead of rounding to nearest even.
    Bf16Truncate,
    /// Nesterov momentum run as heavy ball.
    NesterovAsHeavyBall,
    /// Adamax run as Adam.
    AdamaxAsAdam,
    /// The `Importance` and `ImportanceOverVariation` modulations swapped.
    ModulationSwap,
    /// The first moment kept without its `1 − β1` factor.
    NoMomentumDampening,
    /// Subnormal values read as zero and results flushed to zero (FTZ/DAZ), in every buffer.
    FlushSubnormals,
    /// I = |θ·g| from θ after AdamW's decoupled decay (torch's order) instead of before.
    SensitivityAfterDecay,
    /// The authors' AdamW decay `θ ← θ − η·wd·θ` applied before the update instead of after.
    DecayBeforeUpdate,
    /// Adamax's in-step decay `wd·θ` applied outside the modulation s (as a decoupled decay).
    InStepDecayUnmodulated,
    /// The second moment accumulates |g| instead of g².
    SecondMomentAbs,
    /// A `fused_step` override whose modulation reads Ī from before this step's update.
    StaleIbar,
    /// f16 parameters stored by truncation instead of rounding to nearest even.
    F16Truncate,
    /// bf16 state stored by truncation instead of rounding to nearest even.
    Bf16StateTruncate,
    /// A storage-type-only path: the `fused_step` override uses β2 for β1 when the state is f16.
    F16StateBeta,
    /// Counts the non-finite parameters it read, not the ones it stored.
    CountsBeforeUpdate,
    /// A `step_tensors` override in batches of 16 that steps each batch's last tensor again
    /// with the next batch.
    BatchOverlap,
    /// The clipping scale applied after L2 decay: `(grad + l2·θ)·scale`.
    GradScaleAfterL2,
}

#[derive(Clone, Copy, Debug)]
struct Broken(Bug);

impl Broken {
    fn coeffs(&self, k: &Coeffs) -> Coeffs {
        let mut k = *k;
        match self.0 {
            Bug::DropBiasCorrection => k.ibar_div = 1.0,
            Bug::SwapBeta0 => (k.beta0, k.alpha0) = (k.alpha0, k.beta0),
            Bug::IgnoreGradScale => k.grad_scale = 1.0,
            Bug::IgnoreDenomEps => k.denom_eps = 0.0,
            Bug::IgnoreEpsNum => k.eps_num = 0.0,
            Bug::NoDecoupledDecay => (k.pre_keep, k.post_decay, k.in_step_decay) = (1.0, 0.0, 0.0),
            Bug::NoL2 => k.l2 = 0.0,
            Bug::NesterovAsHeavyBall => k.flags &= !sage_core::coeffs::flags::NESTEROV,
            Bug::AdamaxAsAdam if k.kind == sage_core::coeffs::kind::ADAMAX => {
                k.kind = sage_core::coeffs::kind::ADAM
            }
            Bug::ModulationSwap => {
                let (a, b) = (
                    Modulation::Importance as u32,
                    Modulation::ImportanceOverVariation as u32,
                );
                if k.modulation == a {
                    k.modulation = b
                } else if k.modulation == b {
                    k.modulation = a
                }
            }
            Bug::NoMomentumDampening => k.alpha1 = 1.0,
            Bug::DecayBeforeUpdate => {
                (k.pre_keep, k.post_decay) = (k.pre_keep * (1.0 - k.post_decay), 0.0)
            }
            Bug::InStepDecayUnmodulated => {
                (k.pre_keep, k.in_step_decay) = (1.0 - k.step * k.in_step_decay, 0.0)
            }
            Bug::GradScaleAfterL2 => k.l2 *= k.grad_scale,
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
    /// A value as this backend reads it (`FlushSubnormals`: subnormals are zero).
    fn read(&self, x: f32) -> f32 {
        if self.0 == Bug::FlushSubnormals && x.abs() < f32::MIN_POSITIVE {
            0.0f32.copysign(x)
        } else {
            x
        }
    }
    /// `x` stored as `E`, a parameter or (`state`) a state value.
    fn store<E: Element>(&self, x: f32, state: bool) -> E {
        let x = self.read(x);
        let truncate = match (self.0, E::DTYPE) {
            (Bug::Bf16Truncate, DType::Bf16) | (Bug::F16Truncate, DType::F16) => !state,
            (Bug::Bf16StateTruncate, DType::Bf16) => state,
            _ => false,
        };
        if !truncate {
            return E::from_f32(x);
        }
        // Round to nearest, then one step back toward zero where that rounded away from it.
        let r = E::from_f32(x).to_f32();
        if r.abs() <= x.abs() || r == 0.0 {
            return E::from_f32(r);
        }
        let down = match E::DTYPE {
            DType::F16 => f16::from_bits(f16::from_f32(r).to_bits() - 1).to_f32(),
            _ => bf16::from_bits(bf16::from_f32(r).to_bits() - 1).to_f32(),
        };
        E::from_f32(down)
    }
}

impl Backend for Broken {
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
        if self.0 == Bug::NanThrough {
            for (c, o) in out.iter_mut().enumerate() {
                let chunk = &buf[sage_core::norm::chunk_range(buf.len(), first + c)];
                let finite = chunk
                    .iter()
                    .map(|x| x.to_f32() as f64)
                    .filter(|x| x.is_finite());
                *o = finite.map(|x| x * x).sum();
            }
            return Ok(());
        }
        Cpu.sq_norm_chunks(buf, first, out)
    }

    fn grad_sq_norms<P: Element, S: Element>(
        &mut self,
        tensors: &mut [ParamTensor<'_, Self, P, S>],
    ) -> Result<(), Infallible> {
        for t in tensors.iter_mut() {
            let g = t.grad();
            let x = if self.0 == Bug::LongNorm && g.len() > 16 * sage_core::norm::NORM_CHUNK {
                let keep =
                    (sage_core::norm::chunk_count(g.len()) - 1) * sage_core::norm::NORM_CHUNK;
                self.sq_norm(&g[..keep])?
            } else if self.0 == Bug::NormOffGrid {
                t.grad().iter().rev().fold(0.0f64, |a, v| {
                    let v = v.to_f32() as f64;
                    a + v * v
                })
            } else {
                self.sq_norm(t.grad())?
            };
            t.set_grad_sq_norm(x);
        }
        Ok(())
    }

    fn step_tensors<P: Element, S: Element>(
        &mut self,
        tensors: &mut [ParamTensor<'_, Self, P, S>],
    ) -> Result<(), Infallible> {
        let first = tensors.first().map(|t| *t.coeffs());
        let n_tensors = tensors.len();
        for (i, t) in tensors.iter_mut().enumerate() {
            let mut k = *t.coeffs();
            if self.0 == Bug::SharedCoeffs {
                if let Some(f) = first {
                    // The first tensor's scalars, this tensor's group flags.
                    (k.step, k.ibar_div, k.denom_scale) = (f.step, f.ibar_div, f.denom_scale);
                }
            }
            // Counted as read, before the update, where that is the bug.
            let read_bad = (self.0 == Bug::CountsBeforeUpdate)
                .then(|| t.param().iter().filter(|x| !x.to_f32().is_finite()).count());
            if self.0 == Bug::BatchOverlap && i % 16 == 15 && i + 1 < n_tensors {
                // Stepped here, and again below as the next batch's first.
                self.fused_step(t.view(), &k)?;
            }
            let mut view = t.view();
            if self.0 == Bug::LongTail && view.param.len() > 65_536 {
                let n = view.param.len() - 3;
                view = sage_core::TensorMut {
                    param: &mut view.param[..n],
                    grad: &view.grad[..n],
                    m: view.m.map(|b| &mut b[..n]),
                    v: view.v.map(|b| &mut b[..n]),
                    ibar: view.ibar.map(|b| &mut b[..n]),
                };
            }
            self.fused_step(view, &k)?;
            let counted = match self.0 {
                Bug::NeverCounts => continue,
                Bug::MiscountsNonFinite => 0,
                Bug::CountsFirstChunk => t.param().len().min(65_536),
                _ => t.param().len(),
            };
            let bad = t.param()[..counted]
                .iter()
                .filter(|x| !x.to_f32().is_finite())
                .count();
            t.set_non_finite(read_bad.unwrap_or(bad) as u64);
        }
        Ok(())
    }

    fn fused_step<P: Element, S: Element>(
        &mut self,
        t: TensorMut<'_, Self, P, S>,
        k: &Coeffs,
    ) -> Result<(), Infallible> {
        let mut k = *k;
        if (self.0 == Bug::Bf16Beta && P::DTYPE == DType::Bf16)
            || (self.0 == Bug::F16StateBeta && S::DTYPE == DType::F16)
        {
            k.beta1 = k.beta2;
        }
        if self.0 != Bug::StaleIbar {
            return sage_core::composed_step(self, t, &k);
        }
        // Every state buffer advanced from θ before the update, but the update reads the Ī
        // that was there before.
        let TensorMut {
            param,
            grad,
            mut m,
            mut v,
            ibar,
        } = t;
        let stale: Option<Vec<S>> = ibar.as_deref().map(<[S]>::to_vec);
        let second = if k.kind == sage_core::coeffs::kind::ADAMAX {
            Accumulate::InfNorm
        } else {
            Accumulate::SecondMoment
        };
        for (which, buf) in [
            (Accumulate::Sensitivity, ibar),
            (Accumulate::Moment, m.as_deref_mut()),
            (second, v.as_deref_mut()),
        ] {
            if let Some(buf) = buf {
                self.accumulate(which, buf, param, grad, &k)?;
            }
        }
        let args = ApplyArgs {
            param,
            grad,
            m: m.as_deref(),
            v: v.as_deref(),
            ibar: stale.as_deref(),
        };
        self.apply(args, &k)
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
        for i in 0..n {
            let a = self.read(acc[i].to_f32());
            let (theta, grad) = (self.read(param[i].to_f32()), self.read(grad[i].to_f32()));
            let new = match (self.0, which) {
                (Bug::SecondMomentAbs, Accumulate::SecondMoment) => {
                    let g = formula::effective_grad(&k, theta, grad);
                    formula::ema(a, g.abs(), k.beta2, k.alpha2)
                }
                (Bug::SensitivityAfterDecay, Accumulate::Sensitivity) => {
                    formula::accumulate(&k, which, a, theta * k.pre_keep, grad)
                }
                _ => formula::accumulate(&k, which, a, theta, grad),
            };
            acc[i] = self.store(new, true);
        }
        Ok(())
    }

    fn apply<P: Element, S: Element>(
        &mut self,
        t: ApplyArgs<'_, Self, P, S>,
        k: &Coeffs,
    ) -> Result<(), Infallible> {
        let k = self.coeffs(k);
        let n = self.stepped(t.param.len());
        let read = |b: Option<&[S]>, i: usize| self.read(b.map_or(0.0, |b| b[i].to_f32()));
        for i in 0..n {
            let (theta, grad) = (
                self.read(t.param[i].to_f32()),
                self.read(t.grad[i].to_f32()),
            );
            let (m, v, ib) = (read(t.m, i), read(t.v, i), read(t.ibar, i));
            let g = formula::effective_grad(&k, theta, grad);
            // A planted modulation, where there is one.
            let s = match self.0 {
                Bug::NoAbsInU if k.sage() => {
                    let ibar = formula::corrected_ibar(&k, ib);
                    let u = formula::sensitivity(theta, g) - ibar; // the planted bug
                    Some((u + k.eps_num) / (ibar + k.eps_den))
                }
                Bug::SensitivityAfterDecay if k.sage() => Some(formula::modulation(
                    &k,
                    formula::sensitivity(theta * k.pre_keep, g),
                    ib,
                )),
                _ => None,
            };
            let new = match s {
                Some(s) => {
                    let mut plain = k;
                    plain.flags &= !sage_core::coeffs::flags::SAGE;
                    plain.step *= s;
                    formula::apply(&plain, theta, grad, m, v, ib)
                }
                None => formula::apply(&k, theta, grad, m, v, ib),
            };
            t.param[i] = self.store(new, false);
        }
        Ok(())
    }
}

sage_core::slice_host_buffers!(Broken, "broken");

/// Options of a backend that counts non-finite parameters, as sage-cpu's do.
fn counting() -> Options {
    Options {
        counts_non_finite: true,
        ..Options::default()
    }
}

fn failing_checks<B: Harness + 'static>(b: B) -> Vec<String> {
    run_suite(b, &counting())
        .into_iter()
        .filter(|r| matches!(r.status, Status::Fail(_)))
        .map(|r| r.check)
        .collect()
}

#[test]
fn healthy_backend_passes_everything() {
    let rows = run_suite(Cpu, &counting());
    let bad: Vec<_> = rows.iter().filter(|r| r.status != Status::Pass).collect();
    assert!(bad.is_empty(), "{bad:#?}");
    assert!(rows
        .iter()
        .any(|r| r.check == "non-finite parameters counted"));
}

/// The counting bugs are caught by the checks on non-finite parameters themselves, not by
/// chance elsewhere; a backend that does not count passes where it is not required to.
#[test]
fn counting_bugs_are_caught_by_the_count_checks() {
    use sage_conformance::checks::contract::{
        non_finite_params_counted, non_finite_params_reported,
    };
    for bug in [
        Bug::MiscountsNonFinite,
        Bug::CountsFirstChunk,
        Bug::CountsBeforeUpdate,
    ] {
        assert!(
            non_finite_params_reported(&mut Broken(bug)).is_err(),
            "{bug:?}"
        );
        assert!(
            non_finite_params_counted(&mut Broken(bug)).is_err(),
            "{bug:?}"
        );
    }
    let mut silent = Broken(Bug::NeverCounts);
    assert!(non_finite_params_reported(&mut silent).is_ok());
    assert!(non_finite_params_counted(&mut silent).is_err());
    for mut healthy in [Broken(Bug::OddTail), Broken(Bug::SharedCoeffs)] {
        // Bugs of the update, not of the count: both count checks pass.
        assert!(
            non_finite_params_counted(&mut healthy).is_ok(),
            "{healthy:?}"
        );
    }
}

#[test]
fn every_planted_bug_is_caught() {
    let bugs = [
        Bug::DropBiasCorrection,
        Bug::SwapBeta0,
        Bug::NoAbsInU,
        Bug::OddTail,
        Bug::NanThrough,
        Bug::NormOffGrid,
        Bug::SharedCoeffs,
        Bug::LongTail,
        Bug::LongNorm,
        Bug::Bf16Beta,
        Bug::MiscountsNonFinite,
        Bug::CountsFirstChunk,
        Bug::NeverCounts,
        Bug::IgnoreGradScale,
        Bug::IgnoreDenomEps,
        Bug::IgnoreEpsNum,
        Bug::NoDecoupledDecay,
        Bug::NoL2,
        Bug::Bf16Truncate,
        Bug::NesterovAsHeavyBall,
        Bug::AdamaxAsAdam,
        Bug::ModulationSwap,
        Bug::NoMomentumDampening,
        Bug::FlushSubnormals,
        Bug::SensitivityAfterDecay,
        Bug::DecayBeforeUpdate,
        Bug::InStepDecayUnmodulated,
        Bug::SecondMomentAbs,
        Bug::StaleIbar,
        Bug::F16Truncate,
        Bug::Bf16StateTruncate,
        Bug::F16StateBeta,
        Bug::CountsBeforeUpdate,
        Bug::BatchOverlap,
        Bug::GradScaleAfterL2,
    ];
    // Two at a time: the suite runs whole for each.
    let caught: Vec<(Bug, Vec<String>)> = std::thread::scope(|s| {
        let (a, b) = bugs.split_at(bugs.len() / 2);
        let run = |list: &'static [Bug]| {
            move || {
                list.iter()
                    .map(|&bug| (bug, failing_checks(Broken(bug))))
                    .collect::<Vec<_>>()
            }
        };
        let (a, b): (&'static [Bug], &'static [Bug]) = (a.to_vec().leak(), b.to_vec().leak());
        let ha = s.spawn(run(a));
        let hb = s.spawn(run(b));
        let mut out = ha.join().expect("suite thread");
        out.extend(hb.join().expect("suite thread"));
        out
    });
    let mut missed = Vec::new();
    for (bug, failing) in caught {
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
