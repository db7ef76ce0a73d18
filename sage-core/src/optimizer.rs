//! The optimizer driver: owns the configuration, the groups and the step counter; validates a
//! step's tensors, computes norms, clipping and the step's scalars on the host, and hands the
//! tensors to the backend in one call.

use crate::backend::{Backend, ParamTensor};
use crate::coeffs::{clip_coefficient, Coeffs, StepScalars};
use crate::config::{Config, ParamGroup, StateLayout};
use crate::element::Element;
use crate::error::{Error, Name, ParamProblem};

/// What a step did.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Outcome {
    /// The update was applied; the step counter advanced.
    Applied,
    /// A gradient held NaN or ±Inf: nothing was changed (parameters, state, step counter).
    SkippedNonFinite {
        /// Index (in the step's list) of the first tensor whose gradient is not finite.
        param: usize,
    },
}

/// The report of one [`Optimizer::step`].
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct StepReport {
    /// Applied or skipped.
    pub outcome: Outcome,
    /// The step counter after this call.
    pub step: u64,
    /// Global gradient norm before clipping, when it was computed (clipping or the guard on).
    pub grad_norm: Option<f64>,
    /// Global clipping coefficient applied (1 when none).
    pub clip_scale: f64,
    /// The scheduled base rate η_t of this step (0 when skipped).
    pub lr: f64,
}

impl StepReport {
    /// Whether the update was applied.
    pub fn applied(&self) -> bool {
        self.outcome == Outcome::Applied
    }
}

/// SAGE over a backend `B`, with parameter groups `G` (any `AsRef<[ParamGroup]>`: an array,
/// a slice, a `Vec`).
///
/// No allocation: the caller owns every buffer and passes them to each [`step`](Self::step)
/// as [`ParamTensor`]s; the optimizer owns the configuration and the step counter.
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

    /// Updates made so far (the next step is `steps() + 1`).
    pub fn steps(&self) -> u64 {
        self.step
    }
    /// Sets the step counter, e.g. when resuming from saved state.
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

    /// The coefficients tensor `group` gets at update `t` with gradient scale `grad_scale`
    /// (what [`step`](Self::step) hands the backend; public for backends' own tests).
    pub fn coeffs(&self, t: u64, group: usize, grad_scale: f32) -> Option<Coeffs> {
        let g = self.groups.as_ref().get(group)?;
        Some(Coeffs::new(
            &self.config,
            &StepScalars::new(&self.config, t),
            g,
            grad_scale,
        ))
    }

    /// One update of every tensor in `tensors` (one call for all parameters). Checks every
    /// tensor before touching any; skips the whole step if a gradient is not finite and the
    /// guard is on.
    pub fn step<P: Element, S: Element>(
        &mut self,
        tensors: &mut [ParamTensor<'_, B, P, S>],
    ) -> Result<StepReport, Error<B::Error>> {
        self.check(tensors)?;
        let cfg = self.config;
        let needs_norms =
            cfg.skip_non_finite || cfg.global_clip.is_some() || cfg.per_tensor_clip.is_some();
        let mut report = StepReport {
            outcome: Outcome::Applied,
            step: self.step,
            grad_norm: None,
            clip_scale: 1.0,
            lr: 0.0,
        };
        if needs_norms {
            self.backend
                .grad_sq_norms(tensors)
                .map_err(Error::Backend)?;
            if cfg.skip_non_finite {
                if let Some(i) = tensors.iter().position(|t| !t.sq_norm.is_finite()) {
                    report.outcome = Outcome::SkippedNonFinite { param: i };
                    return Ok(report);
                }
            }
            let total: f64 = tensors.iter().map(|t| t.sq_norm).sum();
            let norm = libm::sqrt(total);
            report.grad_norm = Some(norm);
            if let Some(max) = cfg.global_clip {
                report.clip_scale = clip_coefficient(max, norm);
            }
        }
        let t = self.step + 1;
        let scalars = StepScalars::new(&cfg, t);
        let groups = self.groups.as_ref();
        for tensor in tensors.iter_mut() {
            let mut scale = report.clip_scale;
            if let Some(max) = cfg.per_tensor_clip {
                let own = scale * libm::sqrt(tensor.sq_norm);
                scale *= clip_coefficient(max, own);
            }
            tensor.coeffs = Coeffs::new(&cfg, &scalars, &groups[tensor.group], scale as f32);
        }
        self.backend.step_tensors(tensors).map_err(Error::Backend)?;
        self.step = t;
        report.step = t;
        report.lr = scalars.lr;
        Ok(report)
    }

    fn check<P: Element, S: Element>(
        &self,
        tensors: &[ParamTensor<'_, B, P, S>],
    ) -> Result<(), Error<B::Error>> {
        let groups = self.groups.as_ref();
        for (index, t) in tensors.iter().enumerate() {
            let fail = |problem| Error::Param {
                index,
                name: t.name.map(Name::new),
                problem,
            };
            let Some(group) = groups.get(t.group) else {
                return Err(fail(ParamProblem::UnknownGroup {
                    group: t.group,
                    groups: groups.len(),
                }));
            };
            let n = self.backend.len(&*t.param);
            let ng = self.backend.len(t.grad);
            if ng != n {
                return Err(fail(ParamProblem::GradLength { param: n, grad: ng }));
            }
            let layout = self.config.state_layout(group.sage);
            let needed_by = self.config.algorithm.name();
            for (buffer, needed, given, by) in [
                ("m", layout.m, t.m.as_deref(), needed_by),
                ("v", layout.v, t.v.as_deref(), needed_by),
                ("ibar", layout.ibar, t.ibar.as_deref(), "SAGE"),
            ] {
                match (needed, given) {
                    (true, None) => {
                        return Err(fail(ParamProblem::MissingState {
                            buffer,
                            needed_by: by,
                        }))
                    }
                    (false, Some(_)) => return Err(fail(ParamProblem::UnexpectedState { buffer })),
                    (true, Some(buf)) => {
                        let len = self.backend.len(buf);
                        if len != n {
                            return Err(fail(ParamProblem::StateLength {
                                buffer,
                                param: n,
                                state: len,
                            }));
                        }
                    }
                    (false, None) => {}
                }
            }
        }
        Ok(())
    }
}
