//! On-device personalization: the pretrained model (host-trained on unshifted digits, in
//! flash) is fine-tuned with a few labelled samples of the device's user, whose handwriting is
//! a fixed shift of the training data (`edge/pretrain`), and measured on other samples of the
//! same user before and after.
//!
//! One *run* fine-tunes from the pretrained weights for [`STEPS`] full-batch steps on the
//! [`SHOTS`] samples one seed chooses (the first [`PER_CLASS`] of each class in a seeded
//! shuffle of the user's first [`POOL`] images), then measures accuracy on the user's
//! remaining images (never chosen by any seed). A *setup* is which layers train × AdamW-SAGE
//! or plain AdamW × f32 or bf16 optimizer state; each setup runs once per seed.
//!
//! No I/O and no allocator: the caller lends an [`Arena`] (a `static` on the device) and a
//! [`Clock`] that counts instructions (or nothing, on the host), and gets a [`Summary`] per
//! setup. The host program compiles this same file to simulate the experiment.

use crate::model::{self, Images, Layer, LayerGrad, Mlp, CLASSES, HIDDEN, PARAMS, W1, W2};
use sage_core::norm;
use sage_core::{
    bf16, Algorithm, Config, DType, Element, Error, GlobalNorms, Infallible, Optimizer, ParamGroup,
    ParamTensor, Schedule, TensorState,
};
use sage_cpu::Cpu;

/// The user's images a seed may choose fine-tuning samples from (the first ones of the user
/// set); the rest of the set is the held-out test, the same for every run.
pub const POOL: usize = 100;
/// Labelled samples per class the user gives.
pub const PER_CLASS: usize = 3;
/// Fine-tuning samples per run.
pub const SHOTS: usize = PER_CLASS * CLASSES;
/// Optimizer steps per run (full batch: every step sees all [`SHOTS`] samples). The same
/// budget for every setup.
pub const STEPS: usize = 30;
/// Seeds of sample choice per setup.
pub const SEEDS: usize = 5;

// Rates and β0: each optimizer's best in `edge/pretrain sweep` (rates 0.005–0.32 in steps of
// 2×, β0 0.7–0.95), by accuracy on validation images (the pool's images a seed did not
// choose), never on the held-out test.
/// Base rate of plain AdamW.
pub const LR_ADAMW: f64 = 4e-2;
/// Base rate of AdamW-SAGE (4× AdamW's: SAGE wants 2–5× the plain optimizer's).
pub const LR_SAGE: f64 = 1.6e-1;
/// β0 of the sensitivity moving average.
pub const BETA0: f64 = 0.9;
/// Decoupled weight decay of the weights (none for biases).
pub const WEIGHT_DECAY: f64 = 0.01;
/// Global clipping norm.
pub const CLIP: f64 = 1.0;

/// Which parameters fine-tuning trains.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Layers {
    /// The output layer (330 parameters); the hidden layer is read from flash.
    Last,
    /// All 2,410 parameters.
    All,
}

impl Layers {
    /// Name in the table.
    pub const fn name(self) -> &'static str {
        match self {
            Layers::Last => "last",
            Layers::All => "all",
        }
    }
    /// Trainable parameters.
    pub const fn params(self) -> usize {
        match self {
            Layers::Last => model::LAST_PARAMS,
            Layers::All => PARAMS,
        }
    }
}

/// One setup of the comparison.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Setup {
    /// Which layers train.
    pub layers: Layers,
    /// AdamW-SAGE (true) or plain AdamW.
    pub sage: bool,
    /// Optimizer state precision (`F32` or `Bf16`).
    pub state: DType,
    /// Base rate.
    pub lr: f64,
    /// β0 (read only with SAGE on).
    pub beta0: f64,
}

impl Setup {
    /// The setup with this experiment's rate and β0 for the optimizer.
    pub const fn new(layers: Layers, sage: bool, state: DType) -> Self {
        Setup {
            layers,
            sage,
            state,
            lr: if sage { LR_SAGE } else { LR_ADAMW },
            beta0: BETA0,
        }
    }

    /// Optimizer name in the table.
    pub const fn optimizer(&self) -> &'static str {
        if self.sage {
            "AdamW-SAGE"
        } else {
            "AdamW"
        }
    }

    /// The optimizer configuration: AdamW as the authors ran it (`reference` preset), a
    /// constant rate, global clipping (so the norm pass runs, as it would with the guard
    /// alone).
    pub fn config(&self) -> Config {
        Config::reference(Algorithm::adamw(), self.lr)
            .beta0(self.beta0)
            .schedule(Schedule::Constant)
            .global_clip(CLIP)
    }

    /// Bytes of RAM the run's buffers take: trainable parameters, their gradients and
    /// optimizer state (`m`, `v`, and `Ī` for the weights when SAGE is on), plus the hidden
    /// features of the samples when only the last layer trains.
    pub fn ram_bytes(&self) -> usize {
        let n = self.layers.params();
        let weights = match self.layers {
            Layers::Last => W2,
            Layers::All => W1 + W2,
        };
        let state = if self.state == DType::F32 { 4 } else { 2 };
        let ibar = if self.sage { weights } else { 0 };
        let feats = match self.layers {
            Layers::Last => SHOTS * HIDDEN * 4,
            Layers::All => 0,
        };
        n * 4 * 2 + (2 * n + ibar) * state + feats
    }
}

/// Every setup this build runs: last-layer fine-tuning everywhere, all layers where
/// [`Arena`] has room for them (the Cortex-M4F build; `cfg(edge_all_layers)`).
pub fn setups() -> impl Iterator<Item = Setup> {
    let layers: &[Layers] = if cfg!(edge_all_layers) {
        &[Layers::Last, Layers::All]
    } else {
        &[Layers::Last]
    };
    layers.iter().flat_map(|&layers| {
        [
            (true, DType::F32),
            (false, DType::F32),
            (true, DType::Bf16),
            (false, DType::Bf16),
        ]
        .into_iter()
        .map(move |(sage, state)| Setup::new(layers, sage, state))
    })
}

/// Which images a run is measured on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Eval {
    /// The user's images after the pool: the held-out test (the table's numbers).
    HeldOut,
    /// The pool's images the seed did not choose: for choosing rates on the host
    /// (`edge/pretrain sweep`) without looking at the held-out test.
    #[allow(dead_code)] // the firmware measures on the held-out images only
    Validation,
}

/// Reads an instruction counter (or anything monotonic; the host's may return 0).
pub trait Clock {
    /// The counter now.
    fn now(&mut self) -> u64;
}

/// Instructions spent, by part of the work.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Cost {
    /// Forward and backward passes over the fine-tuning samples (and, for last-layer runs,
    /// computing their hidden features once).
    pub backprop: u64,
    /// The gradient-norm pass (`grad_norm_partials` and the reduction): clipping's norm and
    /// the non-finite guard.
    pub norm: u64,
    /// The update pass (`step_with_norms`: scalars, the fused SAGE/AdamW update of every
    /// tensor, the parameter check).
    pub update: u64,
    /// Evaluating on the held-out images.
    pub eval: u64,
    /// Optimizer steps taken.
    pub steps: u64,
    /// Parameter elements stepped (Σ over steps of the trainable parameters).
    pub elements: u64,
}

impl Cost {
    fn add(&mut self, o: &Cost) {
        self.backprop += o.backprop;
        self.norm += o.norm;
        self.update += o.update;
        self.eval += o.eval;
        self.steps += o.steps;
        self.elements += o.elements;
    }
}

/// What one setup did over every seed.
#[derive(Clone, Copy, Debug)]
pub struct Summary {
    /// The setup.
    pub setup: Setup,
    /// Held-out accuracy of the pretrained model.
    pub before: f32,
    /// Held-out accuracy after fine-tuning, per seed.
    pub after: [f32; SEEDS],
    /// Steps the non-finite guard skipped (all seeds).
    pub skipped: u64,
    /// Instructions, all seeds together.
    pub cost: Cost,
}

impl Summary {
    /// Mean accuracy after fine-tuning.
    pub fn mean_after(&self) -> f32 {
        self.after.iter().sum::<f32>() / SEEDS as f32
    }
    /// Spread across seeds of sample choice: the sample standard deviation (n − 1) of the
    /// accuracy after fine-tuning. Every run starts from the same weights and is measured on
    /// the same held-out images, so it is also the spread of the improvement.
    pub fn spread(&self) -> f32 {
        let mean = self.mean_after();
        let ss: f32 = self.after.iter().map(|a| (a - mean) * (a - mean)).sum();
        libm::sqrtf(ss / (SEEDS - 1) as f32)
    }
    /// The lowest and highest accuracy after fine-tuning across seeds.
    pub fn range(&self) -> (f32, f32) {
        let min = self.after.iter().copied().fold(f32::MAX, f32::min);
        let max = self.after.iter().copied().fold(f32::MIN, f32::max);
        (min, max)
    }
    /// Mean improvement in accuracy.
    pub fn gain(&self) -> f32 {
        self.mean_after() - self.before
    }
    /// The pass criterion: the mean improvement exceeds three times the spread across seeds,
    /// and no step was skipped.
    pub fn passed(&self) -> bool {
        self.gain() > 3.0 * self.spread() && self.skipped == 0
    }
}

/// What can stop the experiment.
#[derive(Debug)]
pub enum Problem {
    /// The user's set is malformed or has no more images than [`POOL`].
    UserSet,
    /// The pool lacks [`PER_CLASS`] images of some class.
    Pool {
        /// The class.
        class: usize,
    },
    /// The optimizer refused a step or a configuration.
    Optimizer(Error<Infallible>),
    /// The arena has no room for this setup in this build, or a tensor does not fit the
    /// norm buffers.
    NoRoom,
}

impl core::fmt::Display for Problem {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Problem::UserSet => write!(f, "the user's image set is malformed or too small"),
            Problem::Pool { class } => {
                write!(
                    f,
                    "the pool has fewer than {PER_CLASS} images of class {class}"
                )
            }
            Problem::Optimizer(e) => write!(f, "optimizer error: {e}"),
            Problem::NoRoom => write!(f, "no room for this setup in this build"),
        }
    }
}

impl From<Error<Infallible>> for Problem {
    fn from(e: Error<Infallible>) -> Self {
        Problem::Optimizer(e)
    }
}

/// Buffers of a last-layer run.
pub struct Head<S> {
    w2: [f32; W2],
    b2: [f32; CLASSES],
    g_w2: [f32; W2],
    g_b2: [f32; CLASSES],
    m_w2: [S; W2],
    v_w2: [S; W2],
    ibar_w2: [S; W2],
    m_b2: [S; CLASSES],
    v_b2: [S; CLASSES],
    /// The samples' hidden features: the hidden layer does not change, so they are computed
    /// once per run.
    feats: [[f32; HIDDEN]; SHOTS],
}

/// Buffers of an all-layer run (`w1, b1, w2, b2` back to back).
pub struct Full<S> {
    params: [f32; PARAMS],
    grads: [f32; PARAMS],
    m: [S; PARAMS],
    v: [S; PARAMS],
    ibar_w1: [S; W1],
    ibar_w2: [S; W2],
}

/// The RAM every run borrows: one setup's buffers at a time, so a build's static RAM is its
/// largest setup's, not their sum.
// The variants' sizes differ on purpose: the enum is the shared memory.
#[allow(clippy::large_enum_variant)]
pub enum Arena {
    /// Nothing yet.
    Empty,
    /// A last-layer run with f32 state.
    HeadF32(Head<f32>),
    /// A last-layer run with bf16 state.
    HeadBf16(Head<bf16>),
    /// An all-layer run with f32 state.
    #[cfg(edge_all_layers)]
    FullF32(Full<f32>),
    /// An all-layer run with bf16 state.
    #[cfg(edge_all_layers)]
    FullBf16(Full<bf16>),
}

/// A state element type the arena has room for.
pub trait StateElem: Element {
    /// The zero of the type.
    const ZERO: Self;
    /// The arena as a last-layer run's buffers (switching it to them, zeroed, if needed).
    fn head(a: &mut Arena) -> &mut Head<Self>;
    /// The arena as an all-layer run's buffers, where this build has them.
    fn full(a: &mut Arena) -> Option<&mut Full<Self>>;
}

macro_rules! state_elem {
    ($t:ty, $zero:expr, $head:ident, $full:ident) => {
        impl StateElem for $t {
            const ZERO: Self = $zero;
            fn head(a: &mut Arena) -> &mut Head<Self> {
                if !matches!(a, Arena::$head(_)) {
                    *a = Arena::$head(Head::ZERO);
                }
                match a {
                    Arena::$head(h) => h,
                    // Set just above.
                    _ => unreachable!(),
                }
            }
            #[cfg(edge_all_layers)]
            fn full(a: &mut Arena) -> Option<&mut Full<Self>> {
                if !matches!(a, Arena::$full(_)) {
                    *a = Arena::$full(Full::ZERO);
                }
                match a {
                    Arena::$full(f) => Some(f),
                    _ => None,
                }
            }
            #[cfg(not(edge_all_layers))]
            fn full(_: &mut Arena) -> Option<&mut Full<Self>> {
                None
            }
        }
    };
}
state_elem!(f32, 0.0, HeadF32, FullF32);
state_elem!(bf16, bf16::ZERO, HeadBf16, FullBf16);

impl<S: StateElem> Head<S> {
    const ZERO: Self = Head {
        w2: [0.0; W2],
        b2: [0.0; CLASSES],
        g_w2: [0.0; W2],
        g_b2: [0.0; CLASSES],
        m_w2: [S::ZERO; W2],
        v_w2: [S::ZERO; W2],
        ibar_w2: [S::ZERO; W2],
        m_b2: [S::ZERO; CLASSES],
        v_b2: [S::ZERO; CLASSES],
        feats: [[0.0; HIDDEN]; SHOTS],
    };
}

impl<S: StateElem> Full<S> {
    #[cfg(edge_all_layers)]
    const ZERO: Self = Full {
        params: [0.0; PARAMS],
        grads: [0.0; PARAMS],
        m: [S::ZERO; PARAMS],
        v: [S::ZERO; PARAMS],
        ibar_w1: [S::ZERO; W1],
        ibar_w2: [S::ZERO; W2],
    };
}

/// The experiment's inputs: the pretrained weights and the user's images.
pub struct Experiment<'a> {
    pretrained: &'a [f32; PARAMS],
    user: Images<'a>,
    /// The shots of each seed (indices into the user set).
    shots: [[u8; SHOTS]; SEEDS],
}

impl<'a> Experiment<'a> {
    /// Checks the inputs and draws each seed's samples.
    pub fn new(pretrained: &'a [f32; PARAMS], user: Images<'a>) -> Result<Self, Problem> {
        if user.len() <= POOL || POOL > 256 {
            return Err(Problem::UserSet);
        }
        let mut shots = [[0u8; SHOTS]; SEEDS];
        for (seed, s) in shots.iter_mut().enumerate() {
            *s = choose(&user, seed)?;
        }
        Ok(Experiment {
            pretrained,
            user,
            shots,
        })
    }

    /// The held-out images: the user's images after the pool.
    pub fn held_out(&self) -> core::ops::Range<usize> {
        POOL..self.user.len()
    }

    /// Held-out accuracy of the pretrained model.
    pub fn before(&self) -> f32 {
        model::evaluate(model::layers(self.pretrained), &self.user, self.held_out()).0
    }

    /// The images seed `seed`'s runs are measured on.
    fn eval_set(&self, eval: Eval, seed: usize) -> impl Iterator<Item = usize> + '_ {
        let shots = &self.shots[seed];
        let range = match eval {
            Eval::HeldOut => self.held_out(),
            Eval::Validation => 0..POOL,
        };
        range.filter(move |&i| eval == Eval::HeldOut || !shots.contains(&(i as u8)))
    }

    /// Runs `setup` once per seed, measured on the held-out images.
    pub fn run(
        &self,
        setup: Setup,
        arena: &mut Arena,
        before: f32,
        clock: &mut impl Clock,
    ) -> Result<Summary, Problem> {
        self.run_on(setup, Eval::HeldOut, arena, before, clock)
    }

    /// Runs `setup` once per seed, measured on `eval`.
    pub fn run_on(
        &self,
        setup: Setup,
        eval: Eval,
        arena: &mut Arena,
        before: f32,
        clock: &mut impl Clock,
    ) -> Result<Summary, Problem> {
        let mut sum = Summary {
            setup,
            before,
            after: [0.0; SEEDS],
            skipped: 0,
            cost: Cost::default(),
        };
        for (seed, after) in sum.after.iter_mut().enumerate() {
            let (acc, skipped, cost) = match setup.state {
                DType::F32 => self.run_one::<f32>(setup, eval, seed, arena, clock)?,
                _ => self.run_one::<bf16>(setup, eval, seed, arena, clock)?,
            };
            *after = acc;
            sum.skipped += skipped;
            sum.cost.add(&cost);
        }
        Ok(sum)
    }

    fn run_one<S: StateElem>(
        &self,
        setup: Setup,
        eval: Eval,
        seed: usize,
        arena: &mut Arena,
        clock: &mut impl Clock,
    ) -> Result<(f32, u64, Cost), Problem> {
        let groups = if setup.sage {
            [
                ParamGroup::sage().weight_decay(WEIGHT_DECAY),
                ParamGroup::plain(),
            ]
        } else {
            [
                ParamGroup::plain().weight_decay(WEIGHT_DECAY),
                ParamGroup::plain(),
            ]
        };
        let mut opt = Optimizer::new(Cpu, setup.config(), groups)?;
        let run = Run {
            sage: setup.sage,
            shots: &self.shots[seed],
            eval: self.eval_set(eval, seed),
        };
        match setup.layers {
            Layers::Last => self.run_head(&mut opt, run, S::head(arena), clock),
            Layers::All => {
                let full = S::full(arena).ok_or(Problem::NoRoom)?;
                self.run_full(&mut opt, run, full, clock)
            }
        }
    }

    fn run_head<S: StateElem>(
        &self,
        opt: &mut Optimizer<Cpu, [ParamGroup; 2]>,
        run: Run<'_, impl Iterator<Item = usize>>,
        h: &mut Head<S>,
        clock: &mut impl Clock,
    ) -> Result<(f32, u64, Cost), Problem> {
        let Run { sage, shots, eval } = run;
        let pre = model::layers(self.pretrained);
        let mut cost = Cost::default();
        let t0 = clock.now();
        h.w2.copy_from_slice(pre.l2.w);
        h.b2.copy_from_slice(pre.l2.b);
        for buf in [&mut h.m_w2, &mut h.v_w2, &mut h.ibar_w2] {
            buf.fill(S::ZERO);
        }
        h.m_b2.fill(S::ZERO);
        h.v_b2.fill(S::ZERO);
        for (f, &i) in h.feats.iter_mut().zip(shots) {
            *f = model::hidden(pre.l1, &self.user.sample(usize::from(i)).0);
        }
        cost.backprop += clock.now() - t0;
        let mut counts = [0u64; 2];
        let mut skipped = 0;
        for _ in 0..STEPS {
            let t0 = clock.now();
            h.g_w2.fill(0.0);
            h.g_b2.fill(0.0);
            for (f, &i) in h.feats.iter().zip(shots) {
                let l2 = Layer { w: &h.w2, b: &h.b2 };
                let g2 = LayerGrad {
                    w: &mut h.g_w2,
                    b: &mut h.g_b2,
                };
                model::backward_head(l2, f, self.user.label(usize::from(i)), SCALE, g2);
            }
            let t1 = clock.now();
            let [c_w, c_b] = &mut counts;
            let ibar = if sage { Some(&mut h.ibar_w2[..]) } else { None };
            let mut ts = [
                ParamTensor::new(
                    &mut h.w2[..],
                    &h.g_w2[..],
                    state(&mut h.m_w2[..], &mut h.v_w2[..], ibar, c_w),
                )
                .name("fc2.weight")
                .group(WEIGHTS),
                ParamTensor::new(
                    &mut h.b2[..],
                    &h.g_b2[..],
                    state(&mut h.m_b2[..], &mut h.v_b2[..], None, c_b),
                )
                .name("fc2.bias")
                .group(BIASES),
            ];
            let applied = step(opt, &mut ts, clock, &mut cost)?;
            skipped += u64::from(!applied);
            cost.backprop += t1 - t0;
        }
        cost.elements = (STEPS * model::LAST_PARAMS) as u64;
        let t0 = clock.now();
        let m = Mlp {
            l1: pre.l1,
            l2: Layer { w: &h.w2, b: &h.b2 },
        };
        let acc = model::evaluate(m, &self.user, eval).0;
        cost.eval += clock.now() - t0;
        Ok((acc, skipped, cost))
    }

    fn run_full<S: StateElem>(
        &self,
        opt: &mut Optimizer<Cpu, [ParamGroup; 2]>,
        run: Run<'_, impl Iterator<Item = usize>>,
        f: &mut Full<S>,
        clock: &mut impl Clock,
    ) -> Result<(f32, u64, Cost), Problem> {
        let Run { sage, shots, eval } = run;
        let mut cost = Cost::default();
        f.params.copy_from_slice(self.pretrained);
        for buf in [&mut f.m, &mut f.v] {
            buf.fill(S::ZERO);
        }
        f.ibar_w1.fill(S::ZERO);
        f.ibar_w2.fill(S::ZERO);
        let mut counts = [0u64; 4];
        let mut skipped = 0;
        for _ in 0..STEPS {
            let t0 = clock.now();
            f.grads.fill(0.0);
            for &i in shots {
                let (x, y) = self.user.sample(usize::from(i));
                let (g1, g2) = split_grads(&mut f.grads);
                model::backward(model::layers(&f.params), &x, y, SCALE, g2, Some(g1));
            }
            let t1 = clock.now();
            let (p1, pb1, p2, pb2) = split4(&mut f.params[..]);
            let (g1, gb1, g2, gb2) = split4_ref(&f.grads[..]);
            let (m1, mb1, m2, mb2) = split4(&mut f.m[..]);
            let (v1, vb1, v2, vb2) = split4(&mut f.v[..]);
            let [c1, cb1, c2, cb2] = &mut counts;
            let (ib1, ib2) = if sage {
                (Some(&mut f.ibar_w1[..]), Some(&mut f.ibar_w2[..]))
            } else {
                (None, None)
            };
            let mut ts = [
                ParamTensor::new(p1, g1, state(m1, v1, ib1, c1))
                    .name("fc1.weight")
                    .group(WEIGHTS),
                ParamTensor::new(pb1, gb1, state(mb1, vb1, None, cb1))
                    .name("fc1.bias")
                    .group(BIASES),
                ParamTensor::new(p2, g2, state(m2, v2, ib2, c2))
                    .name("fc2.weight")
                    .group(WEIGHTS),
                ParamTensor::new(pb2, gb2, state(mb2, vb2, None, cb2))
                    .name("fc2.bias")
                    .group(BIASES),
            ];
            let applied = step(opt, &mut ts, clock, &mut cost)?;
            skipped += u64::from(!applied);
            cost.backprop += t1 - t0;
        }
        cost.elements = (STEPS * PARAMS) as u64;
        let t0 = clock.now();
        let acc = model::evaluate(model::layers(&f.params), &self.user, eval).0;
        cost.eval += clock.now() - t0;
        Ok((acc, skipped, cost))
    }
}

/// What one run trains on and is measured on.
struct Run<'s, I> {
    sage: bool,
    shots: &'s [u8; SHOTS],
    eval: I,
}

/// Each sample's share of the full-batch mean loss.
const SCALE: f32 = 1.0 / SHOTS as f32;
const WEIGHTS: usize = 0;
const BIASES: usize = 1;

fn state<'b, S>(
    m: &'b mut [S],
    v: &'b mut [S],
    ibar: Option<&'b mut [S]>,
    step: &'b mut u64,
) -> TensorState<&'b mut [S], &'b mut u64> {
    TensorState {
        m: Some(m),
        v: Some(v),
        ibar,
        step,
    }
}

/// One optimizer step, with the norm pass and the update pass counted apart: the chunk
/// partials (`grad_norm_partials`), reduced in the contract's order, then `step_with_norms`
/// — bit for bit what `step` does in one call. Returns whether the step applied.
fn step<'t, S: StateElem, const N: usize>(
    opt: &mut Optimizer<Cpu, [ParamGroup; 2]>,
    ts: &mut [ParamTensor<'t, Cpu, f32, S>; N],
    clock: &mut impl Clock,
    cost: &mut Cost,
) -> Result<bool, Problem> {
    let t0 = clock.now();
    // Every tensor here is shorter than one norm chunk: one partial each.
    let mut partials = [0f64; N];
    let mut per_tensor = [0f64; N];
    let mut lens = [0usize; N];
    for (l, t) in lens.iter_mut().zip(ts.iter()) {
        *l = t.grad().len();
    }
    if opt.partials_len(&mut ts[..])? != N {
        return Err(Problem::NoRoom);
    }
    opt.grad_norm_partials(&mut ts[..], &mut partials)?;
    let total_sq = norm::reduce(&partials, &lens, &mut per_tensor).ok_or(Problem::NoRoom)?;
    let t1 = clock.now();
    let report = opt.step_with_norms(
        &mut ts[..],
        GlobalNorms {
            total_sq,
            per_tensor_sq: &per_tensor,
        },
    )?;
    let t2 = clock.now();
    cost.norm += t1 - t0;
    cost.update += t2 - t1;
    cost.steps += 1;
    Ok(report.applied())
}

fn split4<T>(x: &mut [T]) -> (&mut [T], &mut [T], &mut [T], &mut [T]) {
    let (w1, rest) = x.split_at_mut(W1);
    let (b1, rest) = rest.split_at_mut(HIDDEN);
    let (w2, b2) = rest.split_at_mut(W2);
    (w1, b1, w2, b2)
}

fn split4_ref<T>(x: &[T]) -> (&[T], &[T], &[T], &[T]) {
    let (w1, rest) = x.split_at(W1);
    let (b1, rest) = rest.split_at(HIDDEN);
    let (w2, b2) = rest.split_at(W2);
    (w1, b1, w2, b2)
}

fn split_grads(g: &mut [f32; PARAMS]) -> (LayerGrad<'_>, LayerGrad<'_>) {
    let (w1, b1, w2, b2) = split4(&mut g[..]);
    (LayerGrad { w: w1, b: b1 }, LayerGrad { w: w2, b: b2 })
}

/// Seed `seed`'s fine-tuning samples: the first [`PER_CLASS`] images of each class in a seeded
/// shuffle of the pool, in shuffle order.
fn choose(user: &Images<'_>, seed: usize) -> Result<[u8; SHOTS], Problem> {
    let mut order = [0u8; POOL];
    for (i, o) in order.iter_mut().enumerate() {
        *o = i as u8;
    }
    let mut rng = model::XorShift(0x5a6e_0000 ^ (0x9e37_79b9u32.wrapping_mul(seed as u32 + 1)));
    rng.shuffle(&mut order);
    let mut shots = [0u8; SHOTS];
    let mut taken = [0usize; CLASSES];
    let mut n = 0;
    for &i in &order {
        let y = user.label(usize::from(i));
        if taken[y] < PER_CLASS {
            taken[y] += 1;
            shots[n] = i;
            n += 1;
        }
    }
    match taken.iter().position(|&t| t < PER_CLASS) {
        Some(class) => Err(Problem::Pool { class }),
        None => Ok(shots),
    }
}

/// Instructions of the optimizer's per-element kernels alone, on one tensor (the output
/// layer's 320 weights, f32 state), [`KernelCost::REPS`] times each: what an element costs
/// once the per-step, per-tensor overhead (validation, scalars in f64) is set aside.
#[derive(Clone, Copy, Debug, Default)]
pub struct KernelCost {
    /// `sage_cpu::portable::sq_norm`: the norm pass as the firmware runs it (f32 blocks).
    pub norm: u64,
    /// `sage_core::norm::chunk_partial`: every square summed in f64 (the earlier norm pass).
    pub norm_f64: u64,
    /// `Cpu::fused_step` of AdamW-SAGE (m, v, Ī).
    pub update_sage: u64,
    /// `Cpu::fused_step` of plain AdamW (m, v).
    pub update_adamw: u64,
    /// Elements each of the above processed (REPS × 320).
    pub elements: u64,
}

impl KernelCost {
    /// Passes over the tensor per kernel.
    pub const REPS: usize = 20;
}

/// Measures [`KernelCost`] in the arena's last-layer buffers.
pub fn kernel_cost(arena: &mut Arena, clock: &mut impl Clock) -> Result<KernelCost, Problem> {
    use core::hint::black_box;
    use sage_core::{Backend, TensorMut};
    let h = f32::head(arena);
    let mut rng = model::XorShift(0x0bad_5eed);
    for (g, w) in h.g_w2.iter_mut().zip(h.w2.iter_mut()) {
        *g = 1e-2 * rng.symmetric();
        *w = 0.1 * rng.symmetric();
    }
    for buf in [&mut h.m_w2, &mut h.v_w2, &mut h.ibar_w2] {
        buf.fill(0.0);
    }
    let mut c = KernelCost {
        elements: (KernelCost::REPS * W2) as u64,
        ..KernelCost::default()
    };
    let mut sink = 0.0;
    let t0 = clock.now();
    for _ in 0..KernelCost::REPS {
        sink += sage_cpu::portable::sq_norm(black_box(&h.g_w2[..]));
    }
    let t1 = clock.now();
    for _ in 0..KernelCost::REPS {
        sink += norm::chunk_partial(black_box(&h.g_w2[..]));
    }
    let t2 = clock.now();
    c.norm = t1 - t0;
    c.norm_f64 = t2 - t1;
    black_box(sink);
    for sage in [true, false] {
        let setup = Setup::new(Layers::Last, sage, DType::F32);
        let group = if sage {
            ParamGroup::sage()
        } else {
            ParamGroup::plain()
        };
        let opt = Optimizer::new(Cpu, setup.config(), [group.weight_decay(WEIGHT_DECAY)])?;
        let k = opt.coeffs(2, 0, 1.0).ok_or(Problem::NoRoom)?;
        let t0 = clock.now();
        for _ in 0..KernelCost::REPS {
            let ibar = if sage { Some(&mut h.ibar_w2[..]) } else { None };
            let t = TensorMut {
                param: &mut h.w2[..],
                grad: black_box(&h.g_w2[..]),
                m: Some(&mut h.m_w2[..]),
                v: Some(&mut h.v_w2[..]),
                ibar,
            };
            let Ok(()) = Cpu.fused_step(t, &k);
        }
        let spent = clock.now() - t0;
        if sage {
            c.update_sage = spent;
        } else {
            c.update_adamw = spent;
        }
    }
    Ok(c)
}
