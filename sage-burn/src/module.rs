//! [`SageModule`]: one counted SAGE step over every gradient of a burn module — global
//! clipping, one non-finite decision and the optimizer's count, which burn's per-tensor
//! contract cannot give — with state in sage-checkpoint files.

use std::collections::HashMap;

use burn::module::{Module, ModuleMapper, ModuleVisitor, Param, ParamId};
use burn::optim::GradientsParams;
use burn::tensor::{DType, Tensor, TensorData};
use sage_checkpoint::{Checkpoint, ConfigCheck, Entry, EntryMut};
use sage_core::{bf16, f16, Optimizer as Driver, ParamGroup, ParamTensor, StepReport, TensorState};
use sage_cpu::SimdCpu;

use crate::groups::GroupRules;
use crate::state::HostState;
use crate::tensor::{LrSource, Sage, SageConfig, SliceBackend};
use crate::Error;

/// One parameter of the module.
#[derive(Clone, Debug)]
pub(crate) struct Slot {
    pub(crate) path: String,
    pub(crate) shape: Vec<usize>,
    pub(crate) group: usize,
    pub(crate) state: HostState,
}

/// The float parameters of a module: path (burn's module path, as `ModuleOptimizer` sees it),
/// id, shape, in the module's visiting order.
#[derive(Default)]
pub(crate) struct Params {
    path: Vec<String>,
    pub(crate) found: Vec<(String, ParamId, Vec<usize>)>,
}

impl ModuleVisitor for Params {
    fn enter_module(&mut self, name: &str, _: &str) {
        self.path.push(name.to_string());
    }
    fn exit_module(&mut self, _: &str, _: &str) {
        self.path.pop();
    }
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        let shape = param.val().shape().as_slice().to_vec();
        self.found.push((self.path.join("."), param.id, shape));
    }
}

/// Every float parameter's value and gradient on the host, for those that have a gradient.
struct Collect<'g> {
    grads: &'g GradientsParams,
    out: Vec<(ParamId, TensorData, TensorData)>,
}

impl ModuleVisitor for Collect<'_> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        if let Some(g) = self.grads.get::<D>(param.id) {
            self.out
                .push((param.id, param.val().inner().into_data(), g.into_data()));
        }
    }
}

/// Puts the stepped values back, keeping each parameter's autodiff settings.
struct Write {
    new: HashMap<ParamId, TensorData>,
}

impl ModuleMapper for Write {
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
        let (id, tensor, mapper) = param.consume();
        let Some(data) = self.new.remove(&id) else {
            return Param::from_mapped_value(id, tensor, mapper);
        };
        let (require, autodiff, strategy) = (
            tensor.is_require_grad(),
            tensor.is_autodiff(),
            tensor.gradient_checkpointing_strategy(),
        );
        let dtype = tensor.dtype();
        let device = tensor.inner().device();
        let mut t = Tensor::<D>::from_data(data, (&device, dtype));
        if autodiff {
            t = Tensor::from_inner(t);
            if let Some(s) = strategy {
                t = t.with_gradient_checkpointing_strategy(s);
            }
        }
        if require {
            t = t.require_grad();
        }
        Param::from_mapped_value(id, t, mapper)
    }
}

/// SAGE over a whole burn module at once: each call steps every parameter that has a gradient
/// in one sage-core step — one gradient norm for global clipping (the authors' training loop
/// clips the global norm at 1.0), one non-finite decision for all of them (a NaN anywhere
/// skips the step whole), every count advanced once, and the optimizer's count for schedules
/// that follow it. It runs on host copies through sage-cpu, as [`Sage`] does.
///
/// This is not a burn `ModuleOptimizer`, so burn's `Learner` cannot drive it (the `Learner`
/// takes a `ModuleOptimizer`, whose contract is per tensor): use it in your own loop. Its state
/// is saved and restored as a sage-checkpoint file, the format every adapter reads.
///
/// ```
/// use burn::module::Module;
/// use burn::nn::{Linear, LinearConfig};
/// use burn::optim::GradientsParams;
/// use burn::tensor::{Device, Tensor};
/// use sage_burn::{GroupRules, SageConfig};
/// use sage_core::{Algorithm, Config, ParamGroup};
///
/// let device = Device::default().autodiff();
/// let model: Linear = LinearConfig::new(4, 2).init(&device);
/// let config = Config::reference(Algorithm::adamw(), 1e-2).global_clip(1.0);
/// let mut opt = SageConfig::new(config, GroupRules::single(ParamGroup::sage()))
///     .module(&model)
///     .unwrap();
/// let x = Tensor::<2>::ones([3, 4], &device);
/// let grads = GradientsParams::from_grads(model.forward(x).sum().backward(), &model);
/// let model = opt.step(1e-2, model, &grads).map_err(|r| r.error).unwrap();
/// assert_eq!(opt.steps(), 1);
/// # let _ = model;
/// ```
pub struct SageModule<B: SliceBackend = SimdCpu> {
    driver: Driver<B, Vec<ParamGroup>>,
    rules: GroupRules,
    lr: LrSource,
    dtype: sage_core::DType,
    slots: Vec<Slot>,
    by_id: HashMap<ParamId, usize>,
    last: Option<StepReport>,
}

/// A step that was refused, with the module it was given (unchanged).
#[derive(Debug)]
pub struct Refused<M> {
    /// The module, as it was.
    pub module: M,
    /// Why.
    pub error: Error,
}

impl SageConfig {
    /// A whole-module optimizer for `module`'s float parameters, on sage-cpu's [`SimdCpu`].
    pub fn module<M: Module>(&self, module: &M) -> Result<SageModule, Error> {
        self.module_with(SimdCpu::new(), module)
    }

    /// [`module`](Self::module) on `backend`.
    pub fn module_with<B: SliceBackend, M: Module>(
        &self,
        backend: B,
        module: &M,
    ) -> Result<SageModule<B>, Error> {
        self.validate()?;
        let mut params = Params::default();
        module.visit(&mut params);
        let groups = self.rules.groups().to_vec();
        let mut slots = Vec::new();
        let mut by_id = HashMap::new();
        for (path, id, shape) in params.found {
            let group = self.rules.assign(&path);
            let layout = self.config.state_layout(groups[group].sage);
            let n = shape.iter().product();
            if by_id.insert(id, slots.len()).is_some() {
                return Err(Error::msg(format!("`{path}` appears twice in the module")));
            }
            slots.push(Slot {
                path,
                shape,
                group,
                state: HostState::zeros(layout, n, self.state),
            });
        }
        Ok(SageModule {
            driver: Driver::new(backend, self.config, groups).map_err(Error::msg)?,
            rules: self.rules.clone(),
            lr: self.lr,
            dtype: self.state,
            slots,
            by_id,
            last: None,
        })
    }
}

impl<B: SliceBackend> SageModule<B> {
    /// One step of every parameter of `module` that `grads` holds a gradient for, at burn's
    /// rate `lr` (see [`LrSource`]). Parameters without a gradient keep their values, state
    /// and count. A refused step (a parameter this optimizer was not built for, a bad rate)
    /// gives the module back unchanged.
    pub fn step<M: Module>(
        &mut self,
        lr: f64,
        module: M,
        grads: &GradientsParams,
    ) -> Result<M, Refused<M>> {
        match self.step_data(lr, &module, grads) {
            Ok(new) => Ok(module.map(&mut Write { new })),
            Err(error) => Err(Refused { module, error }),
        }
    }

    fn step_data<M: Module>(
        &mut self,
        lr: f64,
        module: &M,
        grads: &GradientsParams,
    ) -> Result<HashMap<ParamId, TensorData>, Error> {
        let cfg = Sage::<B>::config_at(self.driver.config(), self.lr, lr);
        if cfg != *self.driver.config() {
            self.driver.set_config(cfg).map_err(Error::msg)?;
        }
        let mut c = Collect {
            grads,
            out: Vec::new(),
        };
        module.visit(&mut c);
        let mut items = c.out;
        let mut chosen = Vec::with_capacity(items.len());
        for (id, p, g) in &items {
            let i = *self.by_id.get(id).ok_or_else(|| {
                Error::msg(format!(
                    "parameter {id} is not one this optimizer was built for"
                ))
            })?;
            if p.dtype() != g.dtype() {
                return Err(Error::msg(format!(
                    "the gradient of `{}` is {:?}, the parameter {:?}",
                    self.slots[i].path,
                    g.dtype(),
                    p.dtype()
                )));
            }
            chosen.push(i);
        }
        let mut states: Vec<Option<&mut Slot>> = self.slots.iter_mut().map(Some).collect();
        let mut set = (
            Vec::<ParamTensor<'_, B, f32, f32>>::new(),
            Vec::<ParamTensor<'_, B, f16, f32>>::new(),
            Vec::<ParamTensor<'_, B, bf16, f32>>::new(),
            Vec::<ParamTensor<'_, B, f32, bf16>>::new(),
            Vec::<ParamTensor<'_, B, f16, bf16>>::new(),
            Vec::<ParamTensor<'_, B, bf16, bf16>>::new(),
        );
        for ((_, p, g), &i) in items.iter_mut().zip(&chosen) {
            let slot = states[i]
                .take()
                .ok_or_else(|| Error::msg("a parameter twice"))?;
            let (name, group) = (slot.path.as_str(), slot.group);
            macro_rules! push {
                ($v:expr, $t:ty, $s:expr) => {
                    $v.push(
                        ParamTensor::new(
                            p.as_mut_slice::<$t>()
                                .map_err(|e| Error::msg(format!("{e:?}")))?,
                            g.as_slice::<$t>()
                                .map_err(|e| Error::msg(format!("{e:?}")))?,
                            $s.view(),
                        )
                        .name(name)
                        .group(group),
                    )
                };
            }
            match (&mut slot.state, p.dtype()) {
                (HostState::F32(s), DType::F32) => push!(set.0, f32, s),
                (HostState::F32(s), DType::F16) => push!(set.1, f16, s),
                (HostState::F32(s), DType::BF16) => push!(set.2, bf16, s),
                (HostState::Bf16(s), DType::F32) => push!(set.3, f32, s),
                (HostState::Bf16(s), DType::F16) => push!(set.4, f16, s),
                (HostState::Bf16(s), DType::BF16) => push!(set.5, bf16, s),
                (_, d) => {
                    return Err(Error::msg(format!(
                        "`{name}` is {d:?}; parameters must be f32, f16 or bf16"
                    )))
                }
            }
        }
        let report = self.driver.step(&mut set).map_err(Error::msg)?;
        drop(set);
        self.last = Some(report);
        Ok(items.into_iter().map(|(id, p, _)| (id, p)).collect())
    }

    /// The report of the last step.
    pub fn last_report(&self) -> Option<&StepReport> {
        self.last.as_ref()
    }

    /// Updates made so far (the optimizer's count).
    pub fn steps(&self) -> u64 {
        self.driver.steps()
    }

    /// Each parameter's path and own step count, in the module's order.
    pub fn param_steps(&self) -> Vec<(&str, u64)> {
        self.slots
            .iter()
            .map(|s| (s.path.as_str(), s.state.steps()))
            .collect()
    }

    /// Each parameter's path and group index.
    pub fn assignments(&self) -> Vec<(&str, usize)> {
        self.slots
            .iter()
            .map(|s| (s.path.as_str(), s.group))
            .collect()
    }

    /// A parameter's state, by path.
    pub fn state(&self, path: &str) -> Option<&HostState> {
        self.slots.iter().find(|s| s.path == path).map(|s| &s.state)
    }

    /// The group rules.
    pub fn rules(&self) -> &GroupRules {
        &self.rules
    }

    /// Bytes of optimizer state held.
    pub fn state_bytes(&self) -> usize {
        self.slots.iter().map(|s| s.state.bytes()).sum()
    }

    /// The whole state as a sage-checkpoint file (names are burn's module paths), loadable by
    /// sage-candle, sage-core users and [`crate::import_checkpoint`].
    pub fn save_checkpoint(&mut self) -> Result<Vec<u8>, Error> {
        let mut f32s: Vec<Entry<'_, B, f32, f32>> = Vec::new();
        let mut bf16s: Vec<Entry<'_, B, bf16, bf16>> = Vec::new();
        for s in &self.slots {
            match &s.state {
                HostState::F32(t) => f32s.push(entry(s, t)),
                HostState::Bf16(t) => bf16s.push(entry(s, t)),
            }
        }
        sage_checkpoint::save_optimizer(&mut self.driver, &(f32s, bf16s)).map_err(Error::msg)
    }

    /// Restores a sage-checkpoint file: validated completely, configuration compared under
    /// `check`, every parameter matched by path, group, shape, buffers and type (none
    /// missing, none extra) before anything is written; restored into fresh buffers that are
    /// swapped in only when every one succeeded. On error nothing changes.
    pub fn load_checkpoint(&mut self, bytes: &[u8], check: ConfigCheck) -> Result<(), Error> {
        let ckpt = Checkpoint::parse(bytes).map_err(Error::msg)?;
        ckpt.check_config(self.driver.config(), self.driver.groups(), check)
            .map_err(Error::msg)?;
        let mut fresh: Vec<HostState> = self
            .slots
            .iter()
            .map(|s| {
                let n = s.shape.iter().product();
                HostState::zeros(s.state.layout(), n, self.dtype)
            })
            .collect();
        {
            let mut f32s: Vec<EntryMut<'_, B, f32, f32>> = Vec::new();
            let mut bf16s: Vec<EntryMut<'_, B, bf16, bf16>> = Vec::new();
            for (s, st) in self.slots.iter().zip(fresh.iter_mut()) {
                match st {
                    HostState::F32(t) => f32s.push(entry_mut(s, t)),
                    HostState::Bf16(t) => bf16s.push(entry_mut(s, t)),
                }
            }
            ckpt.restore(self.driver.backend_mut(), &mut (f32s, bf16s))
                .map_err(Error::msg)?;
        }
        for (s, st) in self.slots.iter_mut().zip(fresh) {
            s.state = st;
        }
        self.driver.set_steps(ckpt.step());
        Ok(())
    }
}

pub(crate) fn entry<'a, B: SliceBackend, S: sage_core::Element>(
    s: &'a Slot,
    t: &'a TensorState<Vec<S>>,
) -> Entry<'a, B, S, S>
where
    Vec<S>: std::borrow::Borrow<B::Buf<S>>,
{
    Entry::new(&s.path, t).group(s.group).shape(&s.shape)
}

pub(crate) fn entry_mut<'a, B: SliceBackend, S: sage_core::Element>(
    s: &'a Slot,
    t: &'a mut TensorState<Vec<S>>,
) -> EntryMut<'a, B, S, S>
where
    Vec<S>: std::borrow::BorrowMut<B::Buf<S>>,
{
    EntryMut::new(&s.path, t.view())
        .group(s.group)
        .shape(&s.shape)
}
