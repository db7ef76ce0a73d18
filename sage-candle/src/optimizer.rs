//! [`SageOptimizer`]: `candle_nn::Optimizer` over candle `Var`s of any float type, stepping their
//! storage in place, with state saved and loaded through sage-checkpoint.

use std::cell::{Cell, RefCell};
use std::marker::PhantomData;
use std::path::Path;

use candle_core::backend::BackendStorage;
use candle_core::backprop::GradStore;
use candle_core::{
    CpuStorage, DType, Device, Error, InplaceOp1, Layout, Result, Storage, Tensor, Var,
};
use candle_nn::VarMap;
use sage_checkpoint::{Checkpoint, ConfigCheck, Entry, EntryMut};
use sage_core::{
    bf16, f16, Backend, Buffer, Config, Element, HostBuffers, Optimizer as Driver, ParamGroup,
    ParamTensor, StepReport, TensorState,
};
use sage_cpu::SimdCpu;

use crate::groups::GroupRules;

/// A sage-core backend whose buffers are slices of every storage type, with host copies (for
/// checkpoints): every CPU backend of sage-cpu.
pub trait SliceBackend:
    HostBuffers + Backend<Buf<f32> = [f32], Buf<f16> = [f16], Buf<bf16> = [bf16]>
{
}
impl<B> SliceBackend for B where
    B: HostBuffers + Backend<Buf<f32> = [f32], Buf<f16> = [f16], Buf<bf16> = [bf16]>
{
}

/// The configuration of a [`SageOptimizer`]: the SAGE configuration (algorithm, preset, rate,
/// schedule, clipping), the rules that put each named parameter in a group, and the storage
/// type of the state.
#[derive(Clone, Debug)]
pub struct SageParams {
    /// Algorithm, preset, rate, schedule, clipping.
    pub config: Config,
    /// Groups and the name rules choosing them.
    pub rules: GroupRules,
    /// Storage type of every state buffer: `F32` (the default) or `Bf16` (half the memory;
    /// arithmetic stays f32, each value is rounded once when stored). `F16` is refused: `v`
    /// and Ī underflow in f16.
    pub state: sage_core::DType,
}

impl SageParams {
    /// `config` and `rules`, f32 state.
    pub fn new(config: Config, rules: GroupRules) -> Self {
        SageParams {
            config,
            rules,
            state: sage_core::DType::F32,
        }
    }

    /// `config` with the authors' groups ([`GroupRules::authors`]) at `weight_decay`, f32 state.
    pub fn authors(config: Config, weight_decay: f64) -> Self {
        Self::new(config, GroupRules::authors(weight_decay))
    }

    /// The same with bf16 state.
    pub fn bf16_state(mut self) -> Self {
        self.state = sage_core::DType::Bf16;
        self
    }
}

pub(crate) fn sage_err(e: impl std::fmt::Display) -> Error {
    Error::Msg(format!("sage: {e}"))
}

/// One parameter: its name, variable, group and shape.
struct Slot {
    name: String,
    var: Var,
    group: usize,
    shape: Vec<usize>,
}

/// One parameter's state, stored as the optimizer's state type.
pub(crate) enum State<X: HostBuffers> {
    F32(TensorState<X::Owned<f32>>),
    Bf16(TensorState<X::Owned<bf16>>),
}

impl<X: HostBuffers> State<X> {
    fn steps(&self) -> u64 {
        match self {
            State::F32(s) => s.step,
            State::Bf16(s) => s.step,
        }
    }

    /// Fresh state (count 0, zeroed buffers) of `len` elements, of `dtype`, allocated on `x`.
    fn zeros(
        x: &mut X,
        dtype: sage_core::DType,
        layout: sage_core::StateLayout,
        len: usize,
    ) -> Result<Self> {
        Ok(match dtype {
            sage_core::DType::Bf16 => State::Bf16(
                TensorState::try_new(layout, |_| x.upload(&vec![bf16::ZERO; len]))
                    .map_err(sage_err)?,
            ),
            _ => State::F32(
                TensorState::try_new(layout, |_| x.upload(&vec![0f32; len])).map_err(sage_err)?,
            ),
        })
    }
}

/// The driver on one backend and every parameter's state there.
pub(crate) struct Engine<X: HostBuffers> {
    driver: Driver<X, Vec<ParamGroup>>,
    states: Vec<State<X>>,
    dtype: sage_core::DType,
}

impl<X: HostBuffers> Engine<X> {
    fn new(mut x: X, params: &SageParams, slots: &[Slot]) -> Result<Self> {
        let groups = params.rules.groups();
        let mut states = Vec::with_capacity(slots.len());
        for s in slots {
            let layout = params.config.state_layout(groups[s.group].sage);
            let n = s.shape.iter().product();
            states.push(State::zeros(&mut x, params.state, layout, n)?);
        }
        let driver = Driver::new(x, params.config, groups.to_vec()).map_err(sage_err)?;
        Ok(Engine {
            driver,
            states,
            dtype: params.state,
        })
    }

    fn state_bytes(&self) -> usize {
        let x = self.driver.backend();
        self.states
            .iter()
            .map(|s| match s {
                State::F32(t) => bytes_of::<X, f32>(x, t),
                State::Bf16(t) => bytes_of::<X, bf16>(x, t),
            })
            .sum()
    }

    /// One counted step over the lent parameters (`chosen[i]` is the slot of `params[i]`).
    fn step(
        &mut self,
        slots: &[Slot],
        chosen: &[usize],
        params: Vec<Lent<'_, X>>,
        grads: Vec<GradRef<'_, X>>,
    ) -> Result<StepReport> {
        let mut states: Vec<Option<&mut State<X>>> = self.states.iter_mut().map(Some).collect();
        let mut set = (
            Vec::<ParamTensor<'_, X, f32, f32>>::new(),
            Vec::<ParamTensor<'_, X, f16, f32>>::new(),
            Vec::<ParamTensor<'_, X, bf16, f32>>::new(),
            Vec::<ParamTensor<'_, X, f32, bf16>>::new(),
            Vec::<ParamTensor<'_, X, f16, bf16>>::new(),
            Vec::<ParamTensor<'_, X, bf16, bf16>>::new(),
        );
        for ((&i, p), g) in chosen.iter().zip(params).zip(grads) {
            let slot = &slots[i];
            let state = states[i]
                .take()
                .ok_or_else(|| sage_err(format!("`{}` lent twice", slot.name)))?;
            let (n, gr) = (slot.name.as_str(), slot.group);
            macro_rules! push {
                ($v:expr, $p:expr, $g:expr, $s:expr) => {
                    $v.push(ParamTensor::new($p, $g, $s.view()).name(n).group(gr))
                };
            }
            match (p, g, state) {
                (Lent::F32(p), GradRef::F32(g), State::F32(s)) => push!(set.0, p, g, s),
                (Lent::F16(p), GradRef::F16(g), State::F32(s)) => push!(set.1, p, g, s),
                (Lent::Bf16(p), GradRef::Bf16(g), State::F32(s)) => push!(set.2, p, g, s),
                (Lent::F32(p), GradRef::F32(g), State::Bf16(s)) => push!(set.3, p, g, s),
                (Lent::F16(p), GradRef::F16(g), State::Bf16(s)) => push!(set.4, p, g, s),
                (Lent::Bf16(p), GradRef::Bf16(g), State::Bf16(s)) => push!(set.5, p, g, s),
                _ => {
                    return Err(sage_err(format!(
                        "the gradient of `{n}` has another type than the parameter"
                    )))
                }
            }
        }
        self.driver.step(&mut set).map_err(sage_err)
    }

    fn save(&mut self, slots: &[Slot]) -> Result<Vec<u8>> {
        let mut f32s: Vec<Entry<'_, X, f32, f32>> = Vec::new();
        let mut bf16s: Vec<Entry<'_, X, bf16, bf16>> = Vec::new();
        for (slot, st) in slots.iter().zip(&self.states) {
            match st {
                State::F32(s) => f32s.push(entry(slot, s)),
                State::Bf16(s) => bf16s.push(entry(slot, s)),
            }
        }
        sage_checkpoint::save_optimizer(&mut self.driver, &(f32s, bf16s)).map_err(sage_err)
    }

    /// Parses and checks the whole file, then restores it into fresh buffers (every name,
    /// group, shape, buffer and type checked before any is written), and only when every copy
    /// succeeded swaps them in: on any error the optimizer is as it was.
    fn load(&mut self, slots: &[Slot], bytes: &[u8], check: ConfigCheck) -> Result<()> {
        let ckpt = Checkpoint::parse(bytes).map_err(sage_err)?;
        ckpt.check_config(self.driver.config(), self.driver.groups(), check)
            .map_err(sage_err)?;
        let config = *self.driver.config();
        let groups = self.driver.groups().to_vec();
        let mut fresh = Vec::with_capacity(slots.len());
        for s in slots {
            let layout = config.state_layout(groups[s.group].sage);
            let n = s.shape.iter().product();
            fresh.push(State::zeros(
                self.driver.backend_mut(),
                self.dtype,
                layout,
                n,
            )?);
        }
        {
            let mut f32s: Vec<EntryMut<'_, X, f32, f32>> = Vec::new();
            let mut bf16s: Vec<EntryMut<'_, X, bf16, bf16>> = Vec::new();
            for (slot, st) in slots.iter().zip(fresh.iter_mut()) {
                match st {
                    State::F32(s) => f32s.push(entry_mut(slot, s)),
                    State::Bf16(s) => bf16s.push(entry_mut(slot, s)),
                }
            }
            ckpt.restore(self.driver.backend_mut(), &mut (f32s, bf16s))
                .map_err(sage_err)?;
        }
        self.states = fresh;
        self.driver.set_steps(ckpt.step());
        Ok(())
    }

    /// Ī of every parameter that has one, widened to f32.
    fn sensitivities(&mut self, slots: &[Slot]) -> Result<Vec<(String, Vec<f32>)>> {
        let mut out = Vec::new();
        let x = self.driver.backend_mut();
        for (slot, st) in slots.iter().zip(&self.states) {
            let ibar = match st {
                State::F32(s) => s
                    .ibar
                    .as_ref()
                    .map(|b| x.to_host::<f32>(b.borrow()))
                    .transpose()
                    .map_err(sage_err)?,
                State::Bf16(s) => s
                    .ibar
                    .as_ref()
                    .map(|b| x.to_host::<bf16>(b.borrow()))
                    .transpose()
                    .map_err(sage_err)?
                    .map(|v| v.into_iter().map(f32::from).collect()),
            };
            if let Some(v) = ibar {
                out.push((slot.name.clone(), v));
            }
        }
        Ok(out)
    }
}

use std::borrow::Borrow;

fn bytes_of<X: HostBuffers, S: Element>(x: &X, t: &TensorState<X::Owned<S>>) -> usize {
    Buffer::ALL
        .iter()
        .filter_map(|&b| t.get(b))
        .map(|b| x.len::<S>(b.borrow()) * S::DTYPE.size())
        .sum()
}

fn entry<'a, X: HostBuffers, S: Element>(
    slot: &'a Slot,
    s: &'a TensorState<X::Owned<S>>,
) -> Entry<'a, X, S, S> {
    Entry::new(&slot.name, s)
        .group(slot.group)
        .shape(&slot.shape)
}

fn entry_mut<'a, X: HostBuffers, S: Element>(
    slot: &'a Slot,
    s: &'a mut TensorState<X::Owned<S>>,
) -> EntryMut<'a, X, S, S> {
    EntryMut::new(&slot.name, s.view())
        .group(slot.group)
        .shape(&slot.shape)
}

enum Engines<B: SliceBackend> {
    Cpu(Engine<B>),
    /// Boxed: the CUDA backend's handle (context, stream, scratch buffers) is several times
    /// the CPU engine's size, which every CPU optimizer would otherwise carry.
    #[cfg(feature = "cuda")]
    Cuda(Box<Engine<sage_cuda::Cuda>>),
}

/// Runs `$body` with `$e` bound to whichever engine this optimizer has.
macro_rules! with_engine {
    ($engines:expr, $e:ident => $body:expr) => {
        match $engines {
            Engines::Cpu($e) => $body,
            #[cfg(feature = "cuda")]
            Engines::Cuda($e) => $body,
        }
    };
}

/// SAGE (and its base optimizers) as a [`candle_nn::Optimizer`].
///
/// Parameters are candle [`Var`]s with names, of type f32, f16 or bf16 in any mix; each gets
/// the group its name's rule picks. Every step runs one multi-tensor sage-core step over all
/// parameters that have a gradient (one norm for global clipping, one non-finite decision, every
/// count advanced once), writing into the variables' storage in place: CPU tensors through the
/// slice backend `B` (default: [`SimdCpu`]; the portable `sage_cpu::Cpu` also fits), CUDA
/// tensors through sage-cuda (feature `cuda`). State is f32 or bf16 ([`SageParams::state`]);
/// it is saved and loaded as a sage-checkpoint file, which every other adapter reads.
///
/// ```
/// use candle_core::{Device, Tensor, Var, DType};
/// use candle_nn::Optimizer as _;
/// use sage_candle::{SageOptimizer, SageParams, GroupRules};
/// use sage_core::{Algorithm, Config, ParamGroup};
///
/// let w = Var::from_tensor(&Tensor::new(&[0.5f32, -1.0, 2.0], &Device::Cpu)?)?;
/// let b = Var::from_tensor(&Tensor::new(&[0.5f32, 1.0], &Device::Cpu)?.to_dtype(DType::BF16)?)?;
/// // SAGE off here: with one fixed loss, U = |I − Ī'| is 0 on the first step, so SAGE waits.
/// let params = SageParams::new(
///     Config::reference(Algorithm::adamw(), 1e-2),
///     GroupRules::single(ParamGroup::plain()),
/// );
/// let mut opt = SageOptimizer::new_named(vec![("w".into(), w.clone()), ("b".into(), b.clone())], params)?;
/// let loss = (w.as_tensor().sqr()?.sum_all()? + b.as_tensor().to_dtype(DType::F32)?.sqr()?.sum_all()?)?;
/// opt.backward_step(&loss)?;
/// assert!(opt.last_report().unwrap().applied());
/// assert!(w.as_tensor().to_vec1::<f32>()?[0] < 0.5);
/// assert_eq!(opt.param_steps(), [("w", 1), ("b", 1)]);
/// # Ok::<(), candle_core::Error>(())
/// ```
pub struct SageOptimizer<B: SliceBackend = SimdCpu> {
    engines: Engines<B>,
    slots: Vec<Slot>,
    rules: GroupRules,
    device: Device,
    last: Option<StepReport>,
}

impl SageOptimizer<SimdCpu> {
    /// Named variables on sage-cpu's fastest backend ([`SimdCpu`]: the best vector level this
    /// CPU has, all hardware threads), or CUDA when they live there.
    pub fn new_named(vars: Vec<(String, Var)>, params: SageParams) -> Result<Self> {
        Self::with_backend(SimdCpu::new(), vars, params)
    }

    /// Every variable of `varmap` (sorted by name, so runs are reproducible).
    pub fn from_varmap(varmap: &VarMap, params: SageParams) -> Result<Self> {
        Self::new_named(named_vars(varmap, |_| true), params)
    }
}

/// The variables of `varmap` whose name `keep` accepts, sorted by name.
pub fn named_vars(varmap: &VarMap, keep: impl Fn(&str) -> bool) -> Vec<(String, Var)> {
    let data = varmap.data().lock().expect("VarMap lock poisoned");
    let mut v: Vec<(String, Var)> = data
        .iter()
        .filter(|(k, _)| keep(k))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

impl<B: SliceBackend> SageOptimizer<B> {
    /// Named variables, CPU tensors stepped by `backend` (CUDA tensors by sage-cuda).
    pub fn with_backend(backend: B, vars: Vec<(String, Var)>, params: SageParams) -> Result<Self> {
        params.rules.validate().map_err(sage_err)?;
        params.config.validate().map_err(sage_err)?;
        match params.state {
            sage_core::DType::F32 | sage_core::DType::Bf16 => {}
            d => {
                return Err(sage_err(format!(
                    "{d} state is not offered (v and Ī underflow in f16); use f32 or bf16"
                )))
            }
        }
        let device = vars
            .first()
            .map_or(Device::Cpu, |(_, v)| v.as_tensor().device().clone());
        let mut ids = std::collections::HashSet::new();
        let mut slots = Vec::with_capacity(vars.len());
        for (name, var) in vars {
            let t = var.as_tensor();
            if !matches!(t.dtype(), DType::F32 | DType::F16 | DType::BF16) {
                return Err(sage_err(format!(
                    "`{name}` is {:?}; parameters must be f32, f16 or bf16",
                    t.dtype()
                )));
            }
            if !t.device().same_device(&device) {
                return Err(sage_err(format!(
                    "`{name}` is on {:?}, the first parameter on {device:?}",
                    t.device()
                )));
            }
            if !t.is_contiguous() {
                return Err(sage_err(format!("`{name}` is not contiguous")));
            }
            // The same storage twice would be locked twice in one step.
            if !ids.insert(t.id()) {
                return Err(sage_err(format!("`{name}` is passed twice")));
            }
            let group = params.rules.assign(&name);
            let shape = t.dims().to_vec();
            slots.push(Slot {
                name,
                var,
                group,
                shape,
            });
        }
        let engines = match &device {
            Device::Cpu => Engines::Cpu(Engine::new(backend, &params, &slots)?),
            #[cfg(feature = "cuda")]
            Device::Cuda(dev) => {
                let cuda = sage_cuda::Cuda::with_stream(dev.cuda_stream()).map_err(sage_err)?;
                Engines::Cuda(Box::new(Engine::new(cuda, &params, &slots)?))
            }
            other => {
                return Err(sage_err(format!(
                    "no SAGE backend for {other:?} in this build"
                )))
            }
        };
        Ok(SageOptimizer {
            engines,
            slots,
            rules: params.rules,
            device,
            last: None,
        })
    }

    /// The report of the last step (`None` before the first, or when no parameter had a gradient).
    pub fn last_report(&self) -> Option<&StepReport> {
        self.last.as_ref()
    }

    /// Each parameter's own step count (updates applied to it; a parameter without a gradient
    /// at a step keeps its count), in step order.
    pub fn param_steps(&self) -> Vec<(&str, u64)> {
        let counts: Vec<u64> =
            with_engine!(&self.engines, e => e.states.iter().map(State::steps).collect());
        self.slots
            .iter()
            .zip(counts)
            .map(|(s, c)| (s.name.as_str(), c))
            .collect()
    }

    /// Updates made so far (the optimizer's count).
    pub fn steps(&self) -> u64 {
        with_engine!(&self.engines, e => e.driver.steps())
    }

    /// The SAGE configuration.
    pub fn config(&self) -> &Config {
        with_engine!(&self.engines, e => e.driver.config())
    }

    /// The group rules.
    pub fn rules(&self) -> &GroupRules {
        &self.rules
    }

    /// Storage type of the state.
    pub fn state_dtype(&self) -> sage_core::DType {
        with_engine!(&self.engines, e => e.dtype)
    }

    /// Each parameter's name and group index, in step order.
    pub fn assignments(&self) -> Vec<(&str, usize)> {
        self.slots
            .iter()
            .map(|s| (s.name.as_str(), s.group))
            .collect()
    }

    /// The device the parameters live on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Bytes of optimizer state held.
    pub fn state_bytes(&self) -> usize {
        with_engine!(&self.engines, e => e.state_bytes())
    }

    /// The whole optimizer state as a sage-checkpoint file's bytes: the optimizer's count, the
    /// configuration and groups, and each parameter's `m`, `v`, `ibar` (those its group uses)
    /// and its own count, by parameter name. sage-burn, sage-core users and every backend load
    /// the same file.
    pub fn state_to_bytes(&mut self) -> Result<Vec<u8>> {
        with_engine!(&mut self.engines, e => e.save(&self.slots))
    }

    /// Restores state from a sage-checkpoint file's bytes. The file is validated completely
    /// (format, checksums), its configuration compared with this optimizer's under `check`,
    /// and every parameter matched by name, group, shape, buffers and storage type — none
    /// missing, none extra — before anything is written; the buffers are filled off to the
    /// side and swapped in only when every copy succeeded. On any error nothing has changed.
    pub fn load_state_bytes(&mut self, bytes: &[u8], check: ConfigCheck) -> Result<()> {
        with_engine!(&mut self.engines, e => e.load(&self.slots, bytes, check))
    }

    /// Saves [`state_to_bytes`](Self::state_to_bytes) to `path` atomically (a temporary file
    /// beside it, then a rename: a crash never leaves a truncated file under the name).
    pub fn save_state(&mut self, path: impl AsRef<Path>) -> Result<()> {
        let bytes = self.state_to_bytes()?;
        sage_checkpoint::write_file(path, &bytes).map_err(Error::wrap)
    }

    /// Loads a file written by [`save_state`](Self::save_state) (or by any adapter through
    /// sage-checkpoint) whose configuration equals this optimizer's
    /// ([`load_state_bytes`](Self::load_state_bytes) with [`ConfigCheck::Exact`]).
    pub fn load_state(&mut self, path: impl AsRef<Path>) -> Result<()> {
        self.load_state_with(path, ConfigCheck::Exact)
    }

    /// [`load_state`](Self::load_state) with the configuration compared under `check`
    /// (`ConfigCheck::StateCompatible` to resume with, say, a new rate).
    pub fn load_state_with(&mut self, path: impl AsRef<Path>, check: ConfigCheck) -> Result<()> {
        let bytes = std::fs::read(path)?;
        self.load_state_bytes(&bytes, check)
    }

    /// Each SAGE parameter's Ī (smoothed sensitivity), copied to the host as f32: the data of
    /// the paper's Figure 2.
    pub fn sensitivities(&mut self) -> Result<Vec<(String, Vec<f32>)>> {
        with_engine!(&mut self.engines, e => e.sensitivities(&self.slots))
    }

    fn set_lr(&mut self, lr: f64) -> Result<()> {
        let mut c = *self.config();
        c.lr = lr;
        with_engine!(&mut self.engines, e => e.driver.set_config(c).map_err(sage_err))
    }

    /// One step from `grads`; parameters without a gradient are left out of it (they keep
    /// their values, state and count).
    pub fn step_grads(&mut self, grads: &GradStore) -> Result<()> {
        let mut chosen = Vec::new();
        let mut params = Vec::new();
        let mut gts = Vec::new();
        for (i, s) in self.slots.iter().enumerate() {
            let p = s.var.as_tensor();
            let Some(g) = grads.get(p) else {
                continue;
            };
            if g.shape() != p.shape() || g.dtype() != p.dtype() {
                return Err(sage_err(format!(
                    "gradient of `{}` is {:?} {:?}, the parameter {:?} {:?}",
                    s.name,
                    g.dtype(),
                    g.shape(),
                    p.dtype(),
                    p.shape()
                )));
            }
            chosen.push(i);
            params.push(p.clone());
            gts.push(dense(g)?);
        }
        if params.is_empty() {
            self.last = None;
            return Ok(());
        }
        let slots = &self.slots;
        let report = match &mut self.engines {
            Engines::Cpu(e) => step_on::<CpuLender<B>>(e, slots, &chosen, &params, &gts)?,
            #[cfg(feature = "cuda")]
            Engines::Cuda(e) => {
                step_on::<crate::optimizer::cuda::CudaLender>(e, slots, &chosen, &params, &gts)?
            }
        };
        self.last = Some(report);
        Ok(())
    }
}

/// Reads every gradient, lends every parameter's storage, and steps them all at once.
fn step_on<L: Lender>(
    engine: &mut Engine<L::X>,
    slots: &[Slot],
    chosen: &[usize],
    params: &[Tensor],
    grads: &[Tensor],
) -> Result<StepReport> {
    let guards: Vec<_> = grads.iter().map(|g| g.storage_and_layout()).collect();
    let mut grefs = Vec::with_capacity(guards.len());
    for (s, l) in &guards {
        grefs.push(L::grad(s, l)?);
    }
    let mut out = None;
    let mut body = |lent: Vec<Lent<'_, L::X>>| -> Result<()> {
        out = Some(engine.step(slots, chosen, lent, std::mem::take(&mut grefs))?);
        Ok(())
    };
    with_lent::<L>(params, &mut body)?;
    out.ok_or_else(|| sage_err("no step ran"))
}

/// A gradient with contiguous storage from offset 0 (a copy only when it is not already).
fn dense(g: &Tensor) -> Result<Tensor> {
    let (a, _) = g.layout().contiguous_offsets().unwrap_or((1, 0));
    if g.is_contiguous() && a == 0 {
        Ok(g.clone())
    } else {
        g.copy()
    }
}

/// A parameter's buffer, lent mutably for one step, of its storage type.
pub(crate) enum Lent<'a, X: Backend + ?Sized> {
    F32(&'a mut X::Buf<f32>),
    F16(&'a mut X::Buf<f16>),
    Bf16(&'a mut X::Buf<bf16>),
}

/// A gradient's buffer, of its storage type.
pub(crate) enum GradRef<'a, X: Backend + ?Sized> {
    F32(&'a X::Buf<f32>),
    F16(&'a X::Buf<f16>),
    Bf16(&'a X::Buf<bf16>),
}

/// A [`Lent`] buffer while the locks are being taken.
pub(crate) enum Raw<X: Backend + ?Sized> {
    F32(*mut X::Buf<f32>),
    F16(*mut X::Buf<f16>),
    Bf16(*mut X::Buf<bf16>),
}

/// How a device's candle storage becomes sage-core buffers.
pub(crate) trait Lender {
    /// The sage-core backend of that device.
    type X: HostBuffers;
    /// A parameter's CPU storage, lent.
    fn lend_cpu(_: &mut CpuStorage, _: &Layout) -> Result<Raw<Self::X>> {
        Err(sage_err("a CPU parameter under a non-CPU engine"))
    }
    /// A parameter's CUDA storage, lent.
    #[cfg(feature = "cuda")]
    fn lend_cuda(_: &mut candle_core::CudaStorage, _: &Layout) -> Result<Raw<Self::X>> {
        Err(sage_err("a CUDA parameter under the CPU engine"))
    }
    /// A gradient's storage, read.
    fn grad<'g>(s: &'g Storage, l: &Layout) -> Result<GradRef<'g, Self::X>>;
}

/// CPU tensors as slices, for a [`SliceBackend`].
pub(crate) struct CpuLender<B>(PhantomData<B>);

impl<B: SliceBackend> Lender for CpuLender<B> {
    type X = B;
    fn lend_cpu(storage: &mut CpuStorage, layout: &Layout) -> Result<Raw<B>> {
        let (a, b) = layout
            .contiguous_offsets()
            .ok_or_else(|| sage_err("parameter not contiguous"))?;
        Ok(match storage {
            CpuStorage::F32(v) => Raw::F32(&mut v[a..b] as *mut [f32]),
            CpuStorage::F16(v) => Raw::F16(&mut v[a..b] as *mut [f16]),
            CpuStorage::BF16(v) => Raw::Bf16(&mut v[a..b] as *mut [bf16]),
            other => {
                return Err(sage_err(format!(
                    "parameter storage is {:?}, not f32, f16 or bf16",
                    other.dtype()
                )))
            }
        })
    }
    fn grad<'g>(s: &'g Storage, l: &Layout) -> Result<GradRef<'g, B>> {
        let Storage::Cpu(cs) = s else {
            return Err(sage_err("a gradient is not on the CPU"));
        };
        let (a, b) = l
            .contiguous_offsets()
            .ok_or_else(|| sage_err("gradient not contiguous"))?;
        Ok(match cs {
            CpuStorage::F32(v) => GradRef::F32(&v[a..b]),
            CpuStorage::F16(v) => GradRef::F16(&v[a..b]),
            CpuStorage::BF16(v) => GradRef::Bf16(&v[a..b]),
            other => {
                return Err(sage_err(format!(
                    "gradient is {:?}, not f32, f16 or bf16",
                    other.dtype()
                )))
            }
        })
    }
}

/// What runs once every buffer is lent: it sees them all at once.
type Body<'b, X> = &'b mut dyn FnMut(Vec<Lent<'_, X>>) -> Result<()>;

/// Locks every tensor's storage for writing, one inside the other (candle lends a storage
/// mutably only inside an in-place op's callback), and runs `body` on all of them at once at
/// the innermost level.
pub(crate) fn with_lent<L: Lender>(tensors: &[Tensor], body: Body<'_, L::X>) -> Result<()> {
    let Some(first) = tensors.first() else {
        return body(Vec::new());
    };
    let nest = Nest::<L> {
        tensors,
        depth: Cell::new(0),
        ptrs: RefCell::new(Vec::with_capacity(tensors.len())),
        body: RefCell::new(body),
        lender: PhantomData,
    };
    first.inplace_op1(&nest)
}

pub(crate) struct Nest<'a, 'b, L: Lender> {
    tensors: &'a [Tensor],
    depth: Cell<usize>,
    ptrs: RefCell<Vec<Raw<L::X>>>,
    body: RefCell<Body<'b, L::X>>,
    lender: PhantomData<L>,
}

impl<L: Lender> Nest<'_, '_, L> {
    /// Records this level's buffer, then goes one tensor deeper or, at the bottom, runs the body.
    fn descend(&self, p: Raw<L::X>) -> Result<()> {
        self.ptrs.borrow_mut().push(p);
        let d = self.depth.get() + 1;
        if d < self.tensors.len() {
            self.depth.set(d);
            return self.tensors[d].inplace_op1(self);
        }
        let ptrs = self.ptrs.borrow();
        // SAFETY: each pointer comes from the `&mut` storage candle lent to an enclosing
        // callback that is still running (so its write lock is held and the buffer alive),
        // and is not used by that callback again before it returns; the tensors are distinct
        // variables (checked when the optimizer was built), so the buffers do not overlap.
        let bufs: Vec<Lent<'_, L::X>> = ptrs
            .iter()
            .map(|p| unsafe {
                match *p {
                    Raw::F32(p) => Lent::F32(&mut *p),
                    Raw::F16(p) => Lent::F16(&mut *p),
                    Raw::Bf16(p) => Lent::Bf16(&mut *p),
                }
            })
            .collect();
        (self.body.borrow_mut())(bufs)
    }
}

impl<L: Lender> InplaceOp1 for Nest<'_, '_, L> {
    fn name(&self) -> &'static str {
        "sage-step"
    }
    fn cpu_fwd(&self, storage: &mut CpuStorage, layout: &Layout) -> Result<()> {
        self.descend(L::lend_cpu(storage, layout)?)
    }
    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, storage: &mut candle_core::CudaStorage, layout: &Layout) -> Result<()> {
        self.descend(L::lend_cuda(storage, layout)?)
    }
}

impl<B: SliceBackend> candle_nn::Optimizer for SageOptimizer<B>
where
    B: Default,
{
    type Config = SageParams;

    /// Unnamed variables are called `param{i}`, so name rules see those names; use
    /// [`SageOptimizer::new_named`] or [`SageOptimizer::from_varmap`] for name-based groups.
    fn new(vars: Vec<Var>, config: SageParams) -> Result<Self> {
        let named = vars
            .into_iter()
            .enumerate()
            .map(|(i, v)| (format!("param{i}"), v))
            .collect();
        Self::with_backend(B::default(), named, config)
    }

    fn step(&mut self, grads: &GradStore) -> Result<()> {
        self.step_grads(grads)
    }

    fn learning_rate(&self) -> f64 {
        self.config().lr
    }

    fn set_learning_rate(&mut self, lr: f64) {
        // The trait cannot return an error; an invalid rate keeps the old one.
        let _ = self.set_lr(lr);
    }
}

#[cfg(feature = "cuda")]
pub(crate) mod cuda;
