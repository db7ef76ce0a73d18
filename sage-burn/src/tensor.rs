//! [`Sage`]: SAGE as burn's per-tensor [`burn::optim::Optimizer`], and [`SageConfig`], which
//! builds a burn [`ModuleOptimizer`] (one `Sage` per SAGE group, chosen by name rules) for a
//! training loop or burn's `Learner`, or a whole-module [`SageModule`](crate::SageModule).

use burn::module::ParamGroup as BurnGroup;
use burn::optim::{LearningRate, ModuleOptimizer};
use burn::tensor::{DType, Device, Tensor};
use sage_core::{
    bf16, f16, Backend, Config, HostBuffers, Optimizer as Driver, ParamGroup, ParamTensor,
    StepReport,
};
use sage_cpu::SimdCpu;

use crate::groups::GroupRules;
use crate::state::{HostState, SageState};
use crate::Error;

/// One tensor's step through the driver, in place in the host copy `$pd`, parameters of type
/// `$p`, state `$s` (a macro: sage-core's buffer types are known per storage type only).
macro_rules! one {
    ($driver:expr, $pd:expr, $gd:expr, $s:expr, $p:ty, $st:ty) => {{
        let g = $gd.as_slice::<$p>().map_err(|e| format!("{e:?}"));
        let p = $pd.as_mut_slice::<$p>().map_err(|e| format!("{e:?}"));
        match (p, g) {
            (Ok(p), Ok(g)) => $driver
                .step(&mut [ParamTensor::<B, $p, $st>::new(p, g, $s.view::<[$st]>())])
                .map(|_: StepReport| ())
                .map_err(|e| e.to_string()),
            (Err(e), _) | (_, Err(e)) => Err(e),
        }
    }};
}

/// A sage-core backend whose buffers are host slices of every storage type, with host copies:
/// every CPU backend of sage-cpu (`SimdCpu`, the portable `Cpu`).
pub trait SliceBackend:
    HostBuffers
    + Backend<Buf<f32> = [f32], Buf<f16> = [f16], Buf<bf16> = [bf16]>
    + Clone
    + Send
    + Sync
    + 'static
{
}
impl<B> SliceBackend for B where
    B: HostBuffers
        + Backend<Buf<f32> = [f32], Buf<f16> = [f16], Buf<bf16> = [bf16]>
        + Clone
        + Send
        + Sync
        + 'static
{
}

/// Where the rate of a step comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum LrSource {
    /// burn's per-step `lr` (from its `LrScheduler`, or the constant `LearningRate` a loop
    /// passes) is SAGE's base rate η: the step uses `η_t = lr · f(t)` with SAGE's own
    /// [`Schedule`](sage_core::Schedule) `f` on each tensor's count, and the reference preset's
    /// AdamW decays at `lr`. A constant burn rate with SAGE's schedule reproduces the authors
    /// exactly; a burn scheduler with SAGE's `Schedule::Constant` gives `η_t = lr`, and the
    /// reference decay then follows the scheduled rate (burn passes no base rate).
    #[default]
    Burn,
    /// burn's `lr` is ignored: the configuration's rate and schedule decide everything.
    Config,
}

/// SAGE for burn: the configuration, the name rules that choose each parameter's group, the
/// storage type of the state and where the rate comes from.
///
/// ```
/// use sage_burn::{GroupRules, SageConfig};
/// use sage_core::{Algorithm, Config, Schedule};
///
/// let config = Config::reference(Algorithm::adamw(), 2e-3)
///     .beta0(0.75)
///     .schedule(Schedule::WarmupLinearPpb { warmup: 0.1, t_total: 1000 });
/// // burn's ModuleOptimizer: plug into a training loop or burn's Learner.
/// let optim = SageConfig::authors(config, 0.01).init().unwrap();
/// # let _ = optim;
/// ```
#[derive(Clone, Debug)]
pub struct SageConfig {
    /// Algorithm, preset, rate, schedule, clipping.
    pub config: Config,
    /// Groups and the name rules choosing them (matched against burn's module paths, such
    /// as `encoder.layers.0.linear.weight`).
    pub rules: GroupRules,
    /// Storage type of the state: `F32` (default) or `Bf16`.
    pub state: sage_core::DType,
    /// Where the rate comes from.
    pub lr: LrSource,
}

impl SageConfig {
    /// `config` and `rules`, f32 state, burn's rate as the base rate.
    pub fn new(config: Config, rules: GroupRules) -> Self {
        SageConfig {
            config,
            rules,
            state: sage_core::DType::F32,
            lr: LrSource::Burn,
        }
    }

    /// `config` with the authors' groups ([`GroupRules::authors`]) at `weight_decay`.
    pub fn authors(config: Config, weight_decay: f64) -> Self {
        Self::new(config, GroupRules::authors(weight_decay))
    }

    /// The same with bf16 state.
    pub fn bf16_state(mut self) -> Self {
        self.state = sage_core::DType::Bf16;
        self
    }

    /// Sets where the rate comes from.
    pub fn lr_source(mut self, lr: LrSource) -> Self {
        self.lr = lr;
        self
    }

    /// Checks the configuration, the groups, the rules and the state type.
    pub fn validate(&self) -> Result<(), Error> {
        self.config.validate().map_err(Error::msg)?;
        for (i, g) in self.rules.groups().iter().enumerate() {
            g.validate(i).map_err(Error::msg)?;
        }
        self.rules.validate().map_err(Error::msg)?;
        match self.state {
            sage_core::DType::F32 | sage_core::DType::Bf16 => Ok(()),
            d => Err(Error::msg(format!(
                "{d} state is not offered (v and Ī underflow in f16); use f32 or bf16"
            ))),
        }
    }

    /// burn's [`ModuleOptimizer`] running SAGE on sage-cpu's [`SimdCpu`]: one [`Sage`] per
    /// rule of [`rules`](Self::rules) (burn's path groups, so the first matching rule wins as
    /// in [`GroupRules::assign`]), the fallback group for every other parameter. Global
    /// clipping is refused: burn's per-tensor contract sees one tensor at a time (use
    /// [`module`](Self::module), or burn's per-tensor clipping).
    pub fn init(&self) -> Result<ModuleOptimizer, Error> {
        self.init_with(SimdCpu::new())
    }

    /// [`init`](Self::init) on `backend`.
    pub fn init_with<B: SliceBackend>(&self, backend: B) -> Result<ModuleOptimizer, Error> {
        self.validate()?;
        if self.config.global_clip.is_some() {
            return Err(Error::msg(
                "global clipping needs every gradient at once; burn's per-tensor Optimizer \
                 sees one tensor at a time: use SageConfig::module (a whole-module step), or \
                 per-tensor clipping (Config::per_tensor_clip, the authors' max_grad_norm)",
            ));
        }
        let mut optim = ModuleOptimizer::from(self.build(backend.clone(), self.rules.fallback())?);
        // burn: the last group added that matches wins; GroupRules: the first rule. So the
        // rules go in last to first.
        let rules: Vec<(String, usize)> = self
            .rules
            .rules()
            .map(|(p, g)| (p.to_string(), g))
            .collect();
        for (pattern, g) in rules.into_iter().rev() {
            let group = BurnGroup::from_regex(glob_regex(&pattern))
                .map_err(|e| Error::msg(format!("rule `{pattern}`: {e:?}")))?;
            optim = optim.with_group(group, self.build(backend.clone(), g)?, None);
        }
        Ok(optim)
    }

    /// The per-tensor optimizer of group `group` alone (for `ModuleOptimizer::with_group`
    /// in a setup of your own).
    pub fn build<B: SliceBackend>(&self, backend: B, group: usize) -> Result<Sage<B>, Error> {
        self.validate()?;
        if group >= self.rules.groups().len() {
            return Err(Error::msg(format!(
                "group {group} of {} groups",
                self.rules.groups().len()
            )));
        }
        Ok(Sage {
            backend,
            config: self.config,
            groups: self.rules.groups().to_vec(),
            group,
            state: self.state,
            lr: self.lr,
        })
    }
}

/// A glob rule (`*` matches any run of characters) as an anchored regular expression.
pub(crate) fn glob_regex(pattern: &str) -> String {
    let mut r = String::from("^");
    for c in pattern.chars() {
        match c {
            '*' => r.push_str("(?s:.*)"),
            c if "\\.+?()|[]{}^$#&-~".contains(c) => {
                r.push('\\');
                r.push(c);
            }
            c => r.push(c),
        }
    }
    r.push('$');
    r
}

/// SAGE as burn's per-tensor optimizer, for one SAGE group. Build it with [`SageConfig`].
///
/// Each call steps one tensor through sage-core's driver on the sage-cpu backend `B`, on host
/// data: the parameter and its gradient are read into host buffers (`into_data`), stepped in
/// place, and the parameter comes back as a tensor of its own type on its own device. The state
/// ([`SageState`]) stays on the host between steps, so it costs no copies. The tensor's own
/// count drives its bias corrections and schedule; a tensor burn leaves out (no gradient)
/// keeps its count. A non-finite gradient leaves the tensor and its state untouched.
///
/// burn's contract has no error channel: a step that sage-core refuses (a state recorded for
/// another configuration, a rate burn passes that is not finite) panics with sage-core's
/// message.
#[derive(Clone, Debug)]
pub struct Sage<B: SliceBackend = SimdCpu> {
    backend: B,
    config: Config,
    groups: Vec<ParamGroup>,
    group: usize,
    state: sage_core::DType,
    lr: LrSource,
}

impl<B: SliceBackend> Sage<B> {
    /// The SAGE group this optimizer steps.
    pub fn group(&self) -> usize {
        self.group
    }

    /// The configuration with burn's rate applied.
    pub(crate) fn config_at(config: &Config, source: LrSource, lr: LearningRate) -> Config {
        let mut c = *config;
        if source == LrSource::Burn {
            c.lr = lr;
        }
        c
    }
}

impl<B: SliceBackend> burn::optim::Optimizer for Sage<B> {
    type State<const D: usize> = SageState<D>;

    fn step<const D: usize>(
        &self,
        lr: LearningRate,
        tensor: Tensor<D>,
        grad: Tensor<D>,
        state: Option<SageState<D>>,
    ) -> (Tensor<D>, Option<SageState<D>>) {
        let dims = tensor.dims();
        let device = tensor.device();
        let dtype = tensor.dtype();
        assert_eq!(
            grad.dtype(),
            dtype,
            "sage-burn: the gradient's type differs from the parameter's"
        );
        let n = dims.iter().product();
        let layout = self.config.state_layout(self.groups[self.group].sage);
        let mut st = state.unwrap_or_else(|| SageState {
            state: HostState::zeros(layout, n, self.state),
            shape: dims,
            group: self.group,
        });
        assert_eq!(
            st.group, self.group,
            "sage-burn: a state recorded for SAGE group {} reached group {}",
            st.group, self.group
        );
        let mut pd = tensor.into_data();
        let gd = grad.into_data();
        let cfg = Self::config_at(&self.config, self.lr, lr);
        let mut driver = Driver::new(self.backend.clone(), cfg, [self.groups[self.group]])
            .unwrap_or_else(|e| panic!("sage-burn: {e}"));
        driver.set_steps(st.state.steps());
        let r: Result<(), String> = match (&mut st.state, dtype) {
            (HostState::F32(s), DType::F32) => one!(driver, pd, gd, s, f32, f32),
            (HostState::F32(s), DType::F16) => one!(driver, pd, gd, s, f16, f32),
            (HostState::F32(s), DType::BF16) => one!(driver, pd, gd, s, bf16, f32),
            (HostState::Bf16(s), DType::F32) => one!(driver, pd, gd, s, f32, bf16),
            (HostState::Bf16(s), DType::F16) => one!(driver, pd, gd, s, f16, bf16),
            (HostState::Bf16(s), DType::BF16) => one!(driver, pd, gd, s, bf16, bf16),
            (_, d) => Err(format!("parameters must be f32, f16 or bf16, not {d:?}")),
        };
        if let Err(e) = r {
            panic!("sage-burn: {e}");
        }
        (Tensor::from_data(pd, (&device, dtype)), Some(st))
    }

    /// The state lives on the host wherever the parameter is: nothing moves.
    fn to_device<const D: usize>(state: SageState<D>, _device: &Device) -> SageState<D> {
        state
    }
}
