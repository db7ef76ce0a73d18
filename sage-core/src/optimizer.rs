//! The optimizer driver: owns the configuration, the groups and the optimizer-wide step count;
//! validates a step's tensors, computes norms (or takes them from outside), clipping and each
//! tensor's scalars on the host, and hands the tensors to the backend.

use crate::backend::{Backend, ParamTensor};
use crate::coeffs::{clip_coefficient, Coeffs, StepScalars};
use crate::config::{Config, ParamGroup};
use crate::element::{DType, Element};
use crate::error::{BackendError, Error, Name, ParamProblem};
use crate::norm::chunk_count;
use crate::state::{Buffer, StateLayout};
use crate::tensors::{TensorSet, Visit};

/// What a step did.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Outcome {
    /// The update was applied; every stepped tensor's count and the optimizer's count advanced.
    Applied,
    /// A gradient held NaN or ±Inf: nothing was changed (parameters, state, step counts).
    SkippedNonFinite {
        /// Index (in the step's order) of the first tensor whose gradient is not finite; `None`
        /// when the non-finite value was reported from outside ([`Optimizer::step_with_norms`])
        /// and lies in no tensor of this call.
        param: Option<usize>,
    },
}

/// The report of one [`Optimizer::step`].
///
/// When tensors' own counts differ (some were absent from earlier steps), `step` and `lr`
/// describe the optimizer's count: each tensor's bias corrections, and under a per-tensor
/// schedule ([`ScheduleCount::Tensor`](crate::ScheduleCount)) its rate, follow its own count.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct StepReport {
    /// Applied or skipped.
    pub outcome: Outcome,
    /// The optimizer's count after this call (calls that applied an update).
    pub step: u64,
    /// Global gradient norm before clipping, when it was computed or given (clipping or the
    /// guard on).
    pub grad_norm: Option<f64>,
    /// Global clipping coefficient applied (1 when none).
    pub clip_scale: f64,
    /// The scheduled base rate η_t at the optimizer's count (0 when skipped).
    pub lr: f64,
    /// How many tensors were stepped.
    pub tensors: usize,
    /// The first tensor (in step order) whose updated parameters hold NaN or ±Inf — from a
    /// parameter or state value that was already non-finite, or an update that overflowed —
    /// as the backend counted them in its update pass. The guard cannot undo such a step; it
    /// says where the damage is.
    pub non_finite_params: Option<usize>,
    /// Whether the backend counted non-finite parameters for every tensor of this step (when
    /// `false`, `non_finite_params` is `None` for lack of a count, not for lack of damage).
    pub params_checked: bool,
}

impl StepReport {
    /// Whether the update was applied.
    pub fn applied(&self) -> bool {
        self.outcome == Outcome::Applied
    }
}

/// Squared gradient norms computed outside the optimizer: the sums of every rank's or shard's
/// partials ([`Optimizer::grad_norm_partials`], reduced with [`norm::reduce`](crate::norm::reduce)).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct GlobalNorms<'n> {
    /// Squared norm over every tensor of the whole model (all ranks), in the contract's order.
    /// Non-finite when any gradient anywhere held NaN or ±Inf: the guard then skips the step.
    pub total_sq: f64,
    /// Squared norm of each tensor of this call's set, in step order (the whole tensor's, also
    /// where this call holds only a shard of it): per-tensor clipping reads it.
    pub per_tensor_sq: &'n [f64],
}

/// SAGE over a backend `B`, with parameter groups `G` (any `AsRef<[ParamGroup]>`: an array,
/// a slice, a `Vec`).
///
/// No allocation: the caller owns every buffer and every tensor's [`TensorState`](crate::TensorState)
/// (its step count included) and passes them to each [`step`](Self::step) as [`ParamTensor`]s;
/// the optimizer owns the configuration and its own count.
pub struct Optimizer<B: Backend, G: AsRef<[ParamGroup]> = [ParamGroup; 1]> {
    backend: B,
    config: Config,
    groups: G,
    step: u64,
}

impl<B: Backend, G: AsRef<[ParamGroup]>> Optimizer<B, G> {
    /// Validates the configuration and every group.
    pub fn new(backend: B, config: Config, groups: G) -> Result<Self, Error<B::Error>> {
        config.validate()?;
        for (i, g) in groups.as_ref().iter().enumerate() {
            g.validate(i)?;
        }
        Ok(Optimizer {
            backend,
            config,
            groups,
            step: 0,
        })
    }

    /// Steps applied so far by this optimizer (the optimizer's count; each tensor keeps its own
    /// in its state).
    pub fn steps(&self) -> u64 {
        self.step
    }
    /// Sets the optimizer's count, e.g. when resuming from saved state.
    pub fn set_steps(&mut self, step: u64) {
        self.step = step;
    }
    /// The configuration.
    pub fn config(&self) -> &Config {
        &self.config
    }
    /// Replaces the configuration (e.g. a new rate), validated first; the state is kept, so
    /// the new configuration must use the same state buffers.
    pub fn set_config(&mut self, config: Config) -> Result<(), Error<B::Error>> {
        config.validate()?;
        self.config = config;
        Ok(())
    }
    /// The groups.
    pub fn groups(&self) -> &[ParamGroup] {
        self.groups.as_ref()
    }
    /// The backend.
    pub fn backend(&self) -> &B {
        &self.backend
    }
    /// The backend, mutably (to upload buffers, say).
    pub fn backend_mut(&mut self) -> &mut B {
        &mut self.backend
    }
    /// Gives the backend back.
    pub fn into_backend(self) -> B {
        self.backend
    }

    /// Which state buffers a tensor of group `group` needs, or `None` for an unknown group.
    pub fn state_layout(&self, group: usize) -> Option<StateLayout> {
        let g = self.groups.as_ref().get(group)?;
        Some(self.config.state_layout(g.sage))
    }

    /// The coefficients a tensor of group `group` gets at its update `t` (the optimizer's
    /// update being `t` too) with gradient scale `grad_scale` (what [`step`](Self::step) hands
    /// the backend; public for backends' own tests).
    pub fn coeffs(&self, t: u64, group: usize, grad_scale: f32) -> Option<Coeffs> {
        let g = self.groups.as_ref().get(group)?;
        Some(Coeffs::new(
            &self.config,
            &StepScalars::new(&self.config, t),
            g,
            grad_scale,
        ))
    }

    /// One update of every tensor in `tensors` — a slice of one storage pair, or a tuple of
    /// slices for mixed precisions ([`TensorSet`]). Checks every tensor before touching any
    /// parameter, state or count; computes one norm over all of them when clipping or the
    /// guard needs it; skips the whole step, changing no parameter, state or count, if a
    /// gradient is not finite and the guard is on; advances every stepped tensor's count and
    /// the optimizer's count once. (The per-step fields of each [`ParamTensor`] — its
    /// coefficients, gradient norm and non-finite count — may be set even by a step that
    /// fails or is skipped.)
    ///
    /// Tensors without a gradient at this step are left out of `tensors`: they keep their
    /// parameters, state and count, and global clipping covers the tensors present.
    pub fn step<'a, T: TensorSet<'a, B> + ?Sized>(
        &mut self,
        tensors: &mut T,
    ) -> Result<StepReport, Error<B::Error>> {
        self.run(tensors, None)
    }

    /// [`step`](Self::step) with the gradient norms computed elsewhere (data-parallel or sharded
    /// training: each rank's [`grad_norm_partials`](Self::grad_norm_partials), gathered and
    /// reduced with [`norm::reduce`](crate::norm::reduce)). Given the same partials, the result
    /// equals the step that computes its own norms, bit for bit. `norms.per_tensor_sq` holds
    /// one value per tensor of `tensors`.
    pub fn step_with_norms<'a, T: TensorSet<'a, B> + ?Sized>(
        &mut self,
        tensors: &mut T,
        norms: GlobalNorms<'_>,
    ) -> Result<StepReport, Error<B::Error>> {
        self.run(tensors, Some(norms))
    }

    /// The chunk partials of every gradient of `tensors` on the norm grid
    /// ([`norm`](crate::norm)), back to back in step order, written to `out`, which must hold
    /// [`partials_len`](Self::partials_len) values. Checks the tensors first, as a step does.
    pub fn grad_norm_partials<'a, T: TensorSet<'a, B> + ?Sized>(
        &mut self,
        tensors: &mut T,
        out: &mut [f64],
    ) -> Result<(), Error<B::Error>> {
        self.check(tensors, None)?;
        let need = self.partials_len(tensors)?;
        if out.len() != need {
            return Err(Error::NormCount {
                what: "chunk partials",
                expected: need,
                given: out.len(),
            });
        }
        let mut v = Partials {
            backend: &mut self.backend,
            out,
            at: 0,
        };
        tensors.visit(&mut v)
    }

    /// How many chunk partials [`grad_norm_partials`](Self::grad_norm_partials) writes for
    /// `tensors`: `Σ chunk_count(len)`.
    pub fn partials_len<'a, T: TensorSet<'a, B> + ?Sized>(
        &self,
        tensors: &mut T,
    ) -> Result<usize, Error<B::Error>> {
        let mut v = Chunks {
            backend: &self.backend,
            n: 0,
        };
        tensors.visit(&mut v)?;
        Ok(v.n)
    }

    fn run<'a, T: TensorSet<'a, B> + ?Sized>(
        &mut self,
        tensors: &mut T,
        given: Option<GlobalNorms<'_>>,
    ) -> Result<StepReport, Error<B::Error>> {
        let cfg = self.config;
        let next = self.step.checked_add(1);
        // Without clipping no coefficient depends on the norms: they are set in the checking
        // pass, and the tensor list is walked once less (it matters for many small tensors).
        let early = cfg.global_clip.is_none() && cfg.per_tensor_clip.is_none();
        let groups = self.groups.as_ref();
        let mut set = next
            .filter(|_| early)
            .map(|opt_t| SetCoeffs::new(&cfg, groups, 1.0, opt_t));
        let count = self.check(tensors, set.as_mut())?;
        let opt_t = next.ok_or(Error::StepOverflow { step: self.step })?;
        let mut report = StepReport {
            outcome: Outcome::Applied,
            step: self.step,
            grad_norm: None,
            clip_scale: 1.0,
            lr: 0.0,
            tensors: count,
            non_finite_params: None,
            params_checked: false,
        };
        let needs_norms =
            cfg.skip_non_finite || cfg.global_clip.is_some() || cfg.per_tensor_clip.is_some();
        let total = match given {
            Some(n) => {
                if n.per_tensor_sq.len() != count {
                    return Err(Error::NormCount {
                        what: "per-tensor squared norms",
                        expected: count,
                        given: n.per_tensor_sq.len(),
                    });
                }
                let mut v = GivenNorms {
                    norms: n.per_tensor_sq,
                    at: 0,
                    first_bad: None,
                };
                tensors.visit(&mut v)?;
                Some((n.total_sq, v.first_bad))
            }
            None if needs_norms => {
                let mut v = OwnNorms {
                    backend: &mut self.backend,
                    total: 0.0,
                    at: 0,
                    first_bad: None,
                };
                tensors.visit(&mut v)?;
                Some((v.total, v.first_bad))
            }
            None => None,
        };
        if let Some((total, first_bad)) = total {
            if cfg.skip_non_finite && !total.is_finite() {
                report.outcome = Outcome::SkippedNonFinite { param: first_bad };
                return Ok(report);
            }
            let norm = libm::sqrt(total);
            report.grad_norm = Some(norm);
            if let Some(max) = cfg.global_clip {
                report.clip_scale = clip_coefficient(max, norm);
            }
        }
        if !early {
            let mut v = SetCoeffs::new(&cfg, self.groups.as_ref(), report.clip_scale, opt_t);
            tensors.visit(&mut v)?;
        }
        let mut apply = Apply {
            backend: &mut self.backend,
            at: 0,
            first_bad: None,
            counted: true,
        };
        if let Err(e) = tensors.visit(&mut apply) {
            return Err(match e {
                Error::Backend(source) => {
                    // `apply.at` tensors (earlier slices, and the applied part of the failing
                    // one) were stepped and counted.
                    if apply.at > 0 {
                        Error::PartialStep {
                            applied: apply.at,
                            tensors: count,
                            total_sq: total.map(|(t, _)| t),
                            source,
                        }
                    } else {
                        Error::Backend(source)
                    }
                }
                other => other,
            });
        }
        report.non_finite_params = apply.first_bad;
        report.params_checked = apply.counted;
        self.step = opt_t;
        report.step = opt_t;
        report.lr = StepScalars::at(&cfg, opt_t, opt_t).lr;
        Ok(report)
    }

    /// Validates every tensor (and sets each valid one's coefficients with `set`, if given);
    /// returns how many there are.
    fn check<'a, T: TensorSet<'a, B> + ?Sized>(
        &self,
        tensors: &mut T,
        set: Option<&mut SetCoeffs<'_>>,
    ) -> Result<usize, Error<B::Error>> {
        let mut v = Check {
            backend: &self.backend,
            config: &self.config,
            groups: self.groups.as_ref(),
            index: 0,
            set,
        };
        tensors.visit(&mut v)?;
        Ok(v.index)
    }
}

fn param_error<E>(index: usize, name: Option<&str>, problem: ParamProblem) -> Error<E> {
    Error::Param {
        index,
        name: name.map(Name::new),
        problem,
    }
}

/// Every tensor's group, lengths, state and count; then, if given, its coefficients.
struct Check<'o, 's, 'c, B: Backend> {
    backend: &'o B,
    config: &'o Config,
    groups: &'o [ParamGroup],
    index: usize,
    set: Option<&'s mut SetCoeffs<'c>>,
}

impl<'a, B: Backend> Visit<'a, B> for Check<'_, '_, '_, B> {
    type Error = Error<B::Error>;
    fn tensors<P: Element, S: Element>(
        &mut self,
        ts: &mut [ParamTensor<'a, B, P, S>],
    ) -> Result<(), Self::Error> {
        for t in ts.iter_mut() {
            let index = self.index;
            let fail = |problem| param_error(index, t.name, problem);
            let Some(group) = self.groups.get(t.group) else {
                return Err(fail(ParamProblem::UnknownGroup {
                    group: t.group,
                    groups: self.groups.len(),
                }));
            };
            let n = self.backend.len(&*t.param);
            let ng = self.backend.len(t.grad);
            if ng != n {
                return Err(fail(ParamProblem::GradLength { param: n, grad: ng }));
            }
            let layout = self.config.state_layout(group.sage);
            t.state
                .check(layout, n, self.config.algorithm.name(), |b| {
                    self.backend.len(&**b)
                })
                .map_err(fail)?;
            if S::DTYPE == DType::F16 {
                for b in [Buffer::V, Buffer::Ibar] {
                    if layout.needs(b) {
                        return Err(fail(ParamProblem::StateType {
                            buffer: b.name(),
                            dtype: S::DTYPE,
                        }));
                    }
                }
            }
            if t.state.step.checked_add(1).is_none() {
                return Err(fail(ParamProblem::StepOverflow {
                    step: *t.state.step,
                }));
            }
            if let Some(set) = self.set.as_deref_mut() {
                set.set(t);
            }
            self.index += 1;
        }
        Ok(())
    }
}

/// The backend's norms; the total folded in step order.
struct OwnNorms<'o, B: Backend> {
    backend: &'o mut B,
    total: f64,
    at: usize,
    first_bad: Option<usize>,
}

impl<'a, B: Backend> Visit<'a, B> for OwnNorms<'_, B> {
    type Error = Error<B::Error>;
    fn tensors<P: Element, S: Element>(
        &mut self,
        ts: &mut [ParamTensor<'a, B, P, S>],
    ) -> Result<(), Self::Error> {
        self.backend.grad_sq_norms(ts).map_err(Error::Backend)?;
        for t in ts.iter() {
            if self.first_bad.is_none() && !t.sq_norm.is_finite() {
                self.first_bad = Some(self.at);
            }
            self.total += t.sq_norm;
            self.at += 1;
        }
        Ok(())
    }
}

/// Norms from outside, into each tensor's slot.
struct GivenNorms<'n> {
    norms: &'n [f64],
    at: usize,
    first_bad: Option<usize>,
}

impl<'a, B: Backend> Visit<'a, B> for GivenNorms<'_> {
    type Error = Error<B::Error>;
    fn tensors<P: Element, S: Element>(
        &mut self,
        ts: &mut [ParamTensor<'a, B, P, S>],
    ) -> Result<(), Self::Error> {
        for t in ts.iter_mut() {
            t.sq_norm = self.norms[self.at];
            if self.first_bad.is_none() && !t.sq_norm.is_finite() {
                self.first_bad = Some(self.at);
            }
            self.at += 1;
        }
        Ok(())
    }
}

/// Each tensor's coefficients from its own count (scalars reused while counts repeat).
struct SetCoeffs<'o> {
    cfg: &'o Config,
    groups: &'o [ParamGroup],
    clip_scale: f64,
    opt_t: u64,
    memo: Option<StepScalars>,
    /// The last tensor's group, own count, gradient scale (bits) and coefficients: tensors of
    /// a group come together and usually share all three, so most get a copy.
    last: Option<(usize, u64, u32, Coeffs)>,
}

impl<'o> SetCoeffs<'o> {
    /// Coefficients for the optimizer's update `opt_t`, every gradient scaled by `clip_scale`.
    fn new(cfg: &'o Config, groups: &'o [ParamGroup], clip_scale: f64, opt_t: u64) -> Self {
        SetCoeffs {
            cfg,
            groups,
            clip_scale,
            opt_t,
            memo: None,
            last: None,
        }
    }

    /// Sets one checked tensor's coefficients.
    fn set<B: Backend, P: Element, S: Element>(&mut self, t: &mut ParamTensor<'_, B, P, S>) {
        // Checked in `Check`: the count is below u64::MAX.
        let own_t = *t.state.step + 1;
        let scalars = match self.memo {
            Some(s) if s.t == own_t => s,
            _ => {
                let s = StepScalars::at(self.cfg, own_t, self.opt_t);
                self.memo = Some(s);
                s
            }
        };
        let mut scale = self.clip_scale;
        if let Some(max) = self.cfg.per_tensor_clip {
            let own = scale * libm::sqrt(t.sq_norm);
            scale *= clip_coefficient(max, own);
        }
        // Not counted until the backend counts it in this step.
        t.non_finite = None;
        let key = (t.group, own_t, (scale as f32).to_bits());
        t.coeffs = match self.last {
            Some((g, n, sc, k)) if (g, n, sc) == key => k,
            _ => {
                let k = Coeffs::new(self.cfg, &scalars, &self.groups[t.group], scale as f32);
                self.last = Some((key.0, key.1, key.2, k));
                k
            }
        };
    }
}

impl<'a, B: Backend> Visit<'a, B> for SetCoeffs<'_> {
    type Error = Error<B::Error>;
    fn tensors<P: Element, S: Element>(
        &mut self,
        ts: &mut [ParamTensor<'a, B, P, S>],
    ) -> Result<(), Self::Error> {
        for t in ts.iter_mut() {
            self.set(t);
        }
        Ok(())
    }
}

/// The backend's step, then the counts; collects the backend's non-finite counts.
struct Apply<'o, B: Backend> {
    backend: &'o mut B,
    at: usize,
    first_bad: Option<usize>,
    counted: bool,
}

impl<'a, B: Backend> Visit<'a, B> for Apply<'_, B> {
    type Error = Error<B::Error>;
    fn tensors<P: Element, S: Element>(
        &mut self,
        ts: &mut [ParamTensor<'a, B, P, S>],
    ) -> Result<(), Self::Error> {
        // `SetCoeffs` reset each tensor's count, in its pass over them.
        if let Err(e) = self.backend.step_tensors(ts) {
            // The first `n` tensors of this slice were stepped: advance exactly their counts.
            let n = e.applied_tensors().unwrap_or(0).min(ts.len());
            for t in ts[..n].iter_mut() {
                *t.state.step += 1;
            }
            self.at += n;
            return Err(Error::Backend(e));
        }
        for t in ts.iter_mut() {
            *t.state.step += 1;
            match t.non_finite {
                Some(n) if n > 0 && self.first_bad.is_none() => self.first_bad = Some(self.at),
                Some(_) => {}
                None => self.counted = false,
            }
            self.at += 1;
        }
        Ok(())
    }
}

/// Chunk counts.
struct Chunks<'o, B: Backend> {
    backend: &'o B,
    n: usize,
}

impl<'a, B: Backend> Visit<'a, B> for Chunks<'_, B> {
    type Error = Error<B::Error>;
    fn tensors<P: Element, S: Element>(
        &mut self,
        ts: &mut [ParamTensor<'a, B, P, S>],
    ) -> Result<(), Self::Error> {
        for t in ts.iter() {
            self.n += chunk_count(self.backend.len(t.grad));
        }
        Ok(())
    }
}

/// Chunk partials, back to back.
struct Partials<'o, B: Backend> {
    backend: &'o mut B,
    out: &'o mut [f64],
    at: usize,
}

impl<'a, B: Backend> Visit<'a, B> for Partials<'_, B> {
    type Error = Error<B::Error>;
    fn tensors<P: Element, S: Element>(
        &mut self,
        ts: &mut [ParamTensor<'a, B, P, S>],
    ) -> Result<(), Self::Error> {
        let n: usize = ts
            .iter()
            .map(|t| chunk_count(self.backend.len(t.grad)))
            .sum();
        let out = &mut self.out[self.at..self.at + n];
        self.backend
            .grad_norm_partials(ts, out)
            .map_err(Error::Backend)?;
        self.at += n;
        Ok(())
    }
}
