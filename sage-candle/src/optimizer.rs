//! [`SageOptimizer`]: `candle_nn::Optimizer` over candle `Var`s, stepping their storage in place.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::path::Path;

use candle_core::backprop::GradStore;
use candle_core::{
    CpuStorage, DType, Device, Error, InplaceOp1, Layout, Result, Storage, Tensor, Var,
};
use candle_nn::VarMap;
use sage_core::{
    Backend, Buffer, Config, Optimizer as Driver, ParamGroup, ParamTensor, StepReport, TensorState,
};
use sage_cpu::SimdCpu;

use crate::groups::GroupRules;

/// A sage-core backend whose buffers are slices: every CPU backend of sage-cpu.
pub trait SliceBackend: Backend<Buf<f32> = [f32]> {}
impl<B: Backend<Buf<f32> = [f32]>> SliceBackend for B {}

/// The configuration of a [`SageOptimizer`]: the SAGE configuration (algorithm, preset, rate,
/// schedule, clipping) and the rules that put each named parameter in a group.
#[derive(Clone, Debug)]
pub struct SageParams {
    /// Algorithm, preset, rate, schedule, clipping.
    pub config: Config,
    /// Groups and the name rules choosing them.
    pub rules: GroupRules,
}

impl SageParams {
    /// `config` with the authors' groups ([`GroupRules::authors`]) at `weight_decay`.
    pub fn authors(config: Config, weight_decay: f64) -> Self {
        SageParams {
            config,
            rules: GroupRules::authors(weight_decay),
        }
    }
}

fn sage_err(e: impl std::fmt::Display) -> Error {
    Error::Msg(format!("sage: {e}"))
}

/// One parameter: its variable and its state buffers.
struct Slot {
    name: String,
    var: Var,
    group: usize,
    state: State,
}

enum State {
    Cpu(TensorState<Vec<f32>>),
    #[cfg(feature = "cuda")]
    Cuda(TensorState<sage_cuda::cudarc::driver::CudaSlice<f32>>),
}

impl State {
    fn steps(&self) -> u64 {
        match self {
            State::Cpu(c) => c.step,
            #[cfg(feature = "cuda")]
            State::Cuda(c) => c.step,
        }
    }

    fn set_steps(&mut self, t: u64) {
        match self {
            State::Cpu(c) => c.step = t,
            #[cfg(feature = "cuda")]
            State::Cuda(c) => c.step = t,
        }
    }

    fn has(&self, b: Buffer) -> bool {
        match self {
            State::Cpu(c) => c.get(b).is_some(),
            #[cfg(feature = "cuda")]
            State::Cuda(c) => c.get(b).is_some(),
        }
    }
}

enum Engine<B: SliceBackend> {
    Cpu(Driver<B, Vec<ParamGroup>>),
    #[cfg(feature = "cuda")]
    Cuda(Driver<sage_cuda::Cuda, Vec<ParamGroup>>),
}

/// SAGE (and its base optimizers) as a [`candle_nn::Optimizer`].
///
/// Parameters are candle [`Var`]s with names; each gets the group its name's rule picks.
/// Every step runs one multi-tensor sage-core step over all parameters that have a gradient
/// (global clipping and the non-finite guard see them all), writing into the variables'
/// storage in place: CPU tensors through the slice backend `B` (default: [`SimdCpu`]; the
/// portable `sage_cpu::Cpu` also fits),
/// CUDA tensors through sage-cuda (feature `cuda`). Parameters must be f32, all on one device;
/// state is f32.
///
/// ```
/// use candle_core::{Device, Tensor, Var, DType};
/// use candle_nn::Optimizer as _;
/// use sage_candle::{SageOptimizer, SageParams, GroupRules};
/// use sage_core::{Algorithm, Config, ParamGroup};
///
/// let w = Var::from_tensor(&Tensor::new(&[0.5f32, -1.0, 2.0], &Device::Cpu)?)?;
/// // SAGE off here: with one fixed loss, U = |I − Ī'| is 0 on the first step, so SAGE waits.
/// let params = SageParams {
///     config: Config::reference(Algorithm::adamw(), 1e-2),
///     rules: GroupRules::single(ParamGroup::plain()),
/// };
/// let mut opt = SageOptimizer::new_named(vec![("w".into(), w.clone())], params)?;
/// let loss = w.as_tensor().sqr()?.sum_all()?;
/// opt.backward_step(&loss)?;
/// assert!(opt.last_report().unwrap().applied());
/// assert!(w.as_tensor().to_vec1::<f32>()?[0] < 0.5);
/// # Ok::<(), candle_core::Error>(())
/// ```
pub struct SageOptimizer<B: SliceBackend = SimdCpu> {
    engine: Engine<B>,
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
        let SageParams { config, rules } = params;
        rules.validate().map_err(sage_err)?;
        let device = vars
            .first()
            .map_or(Device::Cpu, |(_, v)| v.as_tensor().device().clone());
        let mut ids = std::collections::HashSet::new();
        for (name, v) in &vars {
            let t = v.as_tensor();
            if t.dtype() != DType::F32 {
                return Err(sage_err(format!(
                    "`{name}` is {:?}; only f32 parameters are supported",
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
        }
        let groups = rules.groups().to_vec();
        let engine = match &device {
            Device::Cpu => Engine::Cpu(Driver::new(backend, config, groups).map_err(sage_err)?),
            #[cfg(feature = "cuda")]
            Device::Cuda(dev) => {
                let cuda = sage_cuda::Cuda::with_stream(dev.cuda_stream()).map_err(sage_err)?;
                Engine::Cuda(Driver::new(cuda, config, groups).map_err(sage_err)?)
            }
            other => {
                return Err(sage_err(format!(
                    "no SAGE backend for {other:?} in this build"
                )))
            }
        };
        let mut slots = Vec::with_capacity(vars.len());
        for (name, var) in vars {
            let group = rules.assign(&name);
            let layout = config.state_layout(rules.groups()[group].sage);
            let n = var.as_tensor().elem_count();
            let state = match &engine {
                Engine::Cpu(_) => State::Cpu(TensorState::zeros(layout, n)),
                #[cfg(feature = "cuda")]
                Engine::Cuda(d) => State::Cuda(
                    TensorState::try_new(layout, |_| d.backend().zeros::<f32>(n))
                        .map_err(sage_err)?,
                ),
            };
            slots.push(Slot {
                name,
                var,
                group,
                state,
            });
        }
        Ok(SageOptimizer {
            engine,
            slots,
            rules,
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
        self.slots
            .iter()
            .map(|s| (s.name.as_str(), s.state.steps()))
            .collect()
    }

    /// Updates made so far (the optimizer's count).
    pub fn steps(&self) -> u64 {
        match &self.engine {
            Engine::Cpu(d) => d.steps(),
            #[cfg(feature = "cuda")]
            Engine::Cuda(d) => d.steps(),
        }
    }

    /// The SAGE configuration.
    pub fn config(&self) -> &Config {
        match &self.engine {
            Engine::Cpu(d) => d.config(),
            #[cfg(feature = "cuda")]
            Engine::Cuda(d) => d.config(),
        }
    }

    /// The group rules.
    pub fn rules(&self) -> &GroupRules {
        &self.rules
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
        self.slots
            .iter()
            .map(|s| match &s.state {
                State::Cpu(c) => c.bytes(),
                #[cfg(feature = "cuda")]
                State::Cuda(c) => Buffer::ALL
                    .iter()
                    .filter_map(|&b| c.get(b))
                    .map(|b| b.len() * 4)
                    .sum(),
            })
            .sum()
    }

    /// The optimizer state as named tensors on the parameters' device — `{name}.m`,
    /// `{name}.v`, `{name}.ibar` for each buffer a parameter has, `{name}.step` (its own step
    /// count) and `sage.step` (the optimizer's; one-element i64 tensors) — ready for
    /// `candle_core::safetensors::save`.
    pub fn state_tensors(&self) -> Result<HashMap<String, Tensor>> {
        let mut out = HashMap::new();
        for s in &self.slots {
            let shape = s.var.as_tensor().shape().clone();
            for (suffix, t) in self.slot_state(s, &shape)? {
                out.insert(format!("{}.{suffix}", s.name), t);
            }
            out.insert(
                format!("{}.step", s.name),
                Tensor::new(&[step_i64(s.state.steps())?], &Device::Cpu)?,
            );
        }
        out.insert(
            "sage.step".into(),
            Tensor::new(&[step_i64(self.steps())?], &Device::Cpu)?,
        );
        Ok(out)
    }

    fn slot_state(
        &self,
        s: &Slot,
        shape: &candle_core::Shape,
    ) -> Result<Vec<(&'static str, Tensor)>> {
        let mut v = Vec::new();
        match &s.state {
            State::Cpu(c) => {
                for buf in Buffer::ALL {
                    if let Some(b) = c.get(buf) {
                        v.push((buf.name(), Tensor::from_slice(b, shape, &Device::Cpu)?));
                    }
                }
            }
            #[cfg(feature = "cuda")]
            State::Cuda(c) => {
                let Engine::Cuda(d) = &self.engine else {
                    unreachable!()
                };
                for buf in Buffer::ALL {
                    if let Some(b) = c.get(buf) {
                        let host = d.backend().download(b).map_err(sage_err)?;
                        v.push((
                            buf.name(),
                            Tensor::from_vec(host, shape, &Device::Cpu)?.to_device(&self.device)?,
                        ));
                    }
                }
            }
        }
        Ok(v)
    }

    /// Restores state saved by [`state_tensors`](Self::state_tensors): every buffer this
    /// optimizer holds must be present with its parameter's shape; nothing changes on error.
    pub fn load_state_tensors(&mut self, map: &HashMap<String, Tensor>) -> Result<()> {
        let step =
            read_step(map, "sage.step")?.ok_or_else(|| sage_err("state has no `sage.step`"))?;
        // Read and check everything before writing anything.
        let mut loaded = Vec::new();
        let mut counts = Vec::new();
        for (i, s) in self.slots.iter().enumerate() {
            let shape = s.var.as_tensor().shape();
            // Files without per-parameter counts come from before they existed: every
            // parameter had the optimizer's count then.
            counts.push(read_step(map, &format!("{}.step", s.name))?.unwrap_or(step));
            let names: Vec<&str> = Buffer::ALL
                .into_iter()
                .filter(|&b| s.state.has(b))
                .map(Buffer::name)
                .collect();
            for n in names {
                let key = format!("{}.{n}", s.name);
                let t = map
                    .get(&key)
                    .ok_or_else(|| sage_err(format!("state has no `{key}`")))?;
                if t.shape() != shape {
                    return Err(sage_err(format!(
                        "`{key}` has shape {:?}, the parameter {:?}",
                        t.shape(),
                        shape
                    )));
                }
                let data = t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
                loaded.push((i, n, data));
            }
        }
        for (i, n, data) in loaded {
            let buf = match n {
                "m" => Buffer::M,
                "v" => Buffer::V,
                _ => Buffer::Ibar,
            };
            match &mut self.slots[i].state {
                State::Cpu(c) => {
                    if let Some(b) = c.get_mut(buf) {
                        *b = data;
                    }
                }
                #[cfg(feature = "cuda")]
                State::Cuda(c) => {
                    let Engine::Cuda(d) = &mut self.engine else {
                        unreachable!()
                    };
                    if let Some(b) = c.get_mut(buf) {
                        *b = d.backend().upload(&data).map_err(sage_err)?;
                    }
                }
            }
        }
        for (s, t) in self.slots.iter_mut().zip(counts) {
            s.state.set_steps(t);
        }
        match &mut self.engine {
            Engine::Cpu(d) => d.set_steps(step),
            #[cfg(feature = "cuda")]
            Engine::Cuda(d) => d.set_steps(step),
        }
        Ok(())
    }

    /// Saves [`state_tensors`](Self::state_tensors) as safetensors.
    pub fn save_state(&self, path: impl AsRef<Path>) -> Result<()> {
        candle_core::safetensors::save(&self.state_tensors()?, path)
    }

    /// Loads state written by [`save_state`](Self::save_state).
    pub fn load_state(&mut self, path: impl AsRef<Path>) -> Result<()> {
        let map = candle_core::safetensors::load(path, &self.device)?;
        self.load_state_tensors(&map)
    }

    /// Each SAGE parameter's Ī (smoothed sensitivity), copied to the host: the data of the
    /// paper's Figure 2.
    pub fn sensitivities(&self) -> Result<Vec<(String, Vec<f32>)>> {
        let mut out = Vec::new();
        for s in &self.slots {
            let shape = s.var.as_tensor().shape().clone();
            for (suffix, t) in self.slot_state(s, &shape)? {
                if suffix == "ibar" {
                    out.push((s.name.clone(), t.flatten_all()?.to_vec1::<f32>()?));
                }
            }
        }
        Ok(out)
    }

    fn set_lr(&mut self, lr: f64) -> Result<()> {
        let mut c = *self.config();
        c.lr = lr;
        match &mut self.engine {
            Engine::Cpu(d) => d.set_config(c).map_err(sage_err),
            #[cfg(feature = "cuda")]
            Engine::Cuda(d) => d.set_config(c).map_err(sage_err),
        }
    }

    /// One step from `grads`; parameters without a gradient are left out of it.
    pub fn step_grads(&mut self, grads: &GradStore) -> Result<()> {
        let mut chosen = vec![false; self.slots.len()];
        let mut params = Vec::new();
        let mut gts = Vec::new();
        for (i, s) in self.slots.iter().enumerate() {
            let Some(g) = grads.get(s.var.as_tensor()) else {
                continue;
            };
            if g.shape() != s.var.as_tensor().shape() || g.dtype() != DType::F32 {
                return Err(sage_err(format!(
                    "gradient of `{}` is {:?} {:?}, the parameter f32 {:?}",
                    s.name,
                    g.dtype(),
                    g.shape(),
                    s.var.as_tensor().shape()
                )));
            }
            chosen[i] = true;
            params.push(s.var.as_tensor().clone());
            gts.push(dense(g)?);
        }
        if params.is_empty() {
            self.last = None;
            return Ok(());
        }
        let report = match &mut self.engine {
            Engine::Cpu(driver) => {
                let guards: Vec<_> = gts.iter().map(|g| g.storage_and_layout()).collect();
                let mut gslices: Vec<&[f32]> = Vec::with_capacity(guards.len());
                for (s, l) in &guards {
                    let Storage::Cpu(cs) = &**s else {
                        return Err(sage_err("a gradient is not on the CPU"));
                    };
                    let (a, b) = l
                        .contiguous_offsets()
                        .ok_or_else(|| sage_err("gradient not contiguous"))?;
                    gslices.push(&cs.as_slice::<f32>()?[a..b]);
                }
                let mut states: Vec<(&str, usize, &mut TensorState<Vec<f32>>)> = self
                    .slots
                    .iter_mut()
                    .zip(&chosen)
                    .filter(|(_, c)| **c)
                    .map(|(s, _)| match &mut s.state {
                        State::Cpu(c) => (s.name.as_str(), s.group, c),
                        #[cfg(feature = "cuda")]
                        State::Cuda(_) => unreachable!("CUDA state under the CPU engine"),
                    })
                    .collect();
                let mut out = None;
                let mut body = |ps: &mut [&mut [f32]]| -> Result<()> {
                    let mut ts: Vec<ParamTensor<'_, B, f32, f32>> = ps
                        .iter_mut()
                        .zip(states.iter_mut())
                        .zip(&gslices)
                        .map(|((p, (name, group, st)), g)| {
                            ParamTensor::new(&mut **p, *g, st.view())
                                .name(name)
                                .group(*group)
                        })
                        .collect();
                    out = Some(driver.step(&mut ts).map_err(sage_err)?);
                    Ok(())
                };
                with_slices_mut::<[f32]>(&params, &mut body)?;
                out
            }
            #[cfg(feature = "cuda")]
            Engine::Cuda(driver) => {
                Some(cuda::step(driver, &mut self.slots, &chosen, &params, &gts)?)
            }
        };
        self.last = report;
        Ok(())
    }
}

/// A step count as the i64 safetensors stores.
fn step_i64(t: u64) -> Result<i64> {
    i64::try_from(t).map_err(|_| sage_err(format!("step count {t} does not fit an i64")))
}

/// A one-element step count from `map`, if present; negative or malformed is an error.
fn read_step(map: &HashMap<String, Tensor>, key: &str) -> Result<Option<u64>> {
    let Some(t) = map.get(key) else {
        return Ok(None);
    };
    let v = t.to_dtype(DType::I64)?.flatten_all()?.to_vec1::<i64>()?;
    match v.as_slice() {
        [x] => u64::try_from(*x)
            .map(Some)
            .map_err(|_| sage_err(format!("`{key}` is {x}, not a step count"))),
        _ => Err(sage_err(format!("`{key}` has {} elements, not 1", v.len()))),
    }
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

/// Locks every tensor's storage for writing, one inside the other (candle lends a storage
/// mutably only inside an in-place op's callback), and runs `body` on all of them at once at
/// the innermost level.
pub(crate) fn with_slices_mut<T: ?Sized>(
    tensors: &[Tensor],
    body: &mut dyn FnMut(&mut [&mut T]) -> Result<()>,
) -> Result<()>
where
    for<'a, 'b> Nest<'a, 'b, T>: InplaceOp1,
{
    let Some(first) = tensors.first() else {
        return body(&mut []);
    };
    let nest = Nest {
        tensors,
        depth: Cell::new(0),
        ptrs: RefCell::new(Vec::with_capacity(tensors.len())),
        body: RefCell::new(body),
    };
    first.inplace_op1(&nest)
}

/// What runs once every buffer is lent: it sees them all at once.
type Body<'b, T> = &'b mut dyn FnMut(&mut [&mut T]) -> Result<()>;

pub(crate) struct Nest<'a, 'b, T: ?Sized> {
    tensors: &'a [Tensor],
    depth: Cell<usize>,
    ptrs: RefCell<Vec<*mut T>>,
    body: RefCell<Body<'b, T>>,
}

impl<T: ?Sized> Nest<'_, '_, T>
where
    Self: InplaceOp1,
{
    /// Records this level's buffer, then goes one tensor deeper or, at the bottom, runs the body.
    fn descend(&self, p: *mut T) -> Result<()> {
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
        let mut bufs: Vec<&mut T> = ptrs.iter().map(|&p| unsafe { &mut *p }).collect();
        (self.body.borrow_mut())(&mut bufs)
    }
}

impl InplaceOp1 for Nest<'_, '_, [f32]> {
    fn name(&self) -> &'static str {
        "sage-step"
    }
    fn cpu_fwd(&self, storage: &mut CpuStorage, layout: &Layout) -> Result<()> {
        let CpuStorage::F32(v) = storage else {
            return Err(sage_err("parameter storage is not f32"));
        };
        let (a, b) = layout
            .contiguous_offsets()
            .ok_or_else(|| sage_err("parameter not contiguous"))?;
        self.descend(&mut v[a..b] as *mut [f32])
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
mod cuda;
