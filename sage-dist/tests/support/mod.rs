//! The bit-identity scenarios, shared by the in-process tests (`tests/threads.rs`, ranks as
//! threads), the MPI check (`examples/dist-check.rs`, under `mpiexec -n 1..4`) and the NCCL
//! check (`examples/nccl-check.rs`, on a GPU).
//!
//! Every rank runs the single-process oracle itself — sage-core's plain `Optimizer::step` over
//! the whole model, on the same backend type — and compares after every step: the step's
//! report, every parameter of every tensor (after the all-gather), and every element and count
//! of the state this rank holds. Gradients are handed to each rank correct on its own pieces
//! only, NaN everywhere else: a rank that read outside its pieces would not match.
#![allow(dead_code)]

use std::borrow::{Borrow, BorrowMut};
use std::path::Path;

use sage_checkpoint::ConfigCheck;
use sage_core::{
    Algorithm, Buffer, Config, Element, HostBuffers, Optimizer, ParamGroup, ParamTensor, Schedule,
    StepReport, TensorState,
};
use sage_dist::{BufferComm, DistTensor, Layout, LoadReport, ShardedOptimizer, TensorSpec, Views};

/// Tensor lengths: chunk-sized, chunk±1, tiny, empty, and a few large ones, so that pieces
/// start mid-tensor at N = 2, 3, 4; the first has 16 chunks, whose partials (of different
/// magnitudes, see [`grad`]) give a different sum in almost any other order.
pub const LENS: [usize; 10] = [61_441, 1, 4096, 0, 5000, 13, 4095, 8193, 300, 7000];

/// Steps of one scenario.
pub const STEPS: u64 = 7;

pub fn specs() -> Vec<TensorSpec> {
    LENS.iter()
        .enumerate()
        .map(|(i, &n)| TensorSpec::new(format!("layer{i}.weight"), n).group(i % 3))
        .collect()
}

/// all-MiniLM-L6-v2's parameters (BERT layout, hidden 384, 6 layers, intermediate 1536).
pub fn minilm() -> Vec<TensorSpec> {
    let (h, i, v) = (384, 1536, 30_522);
    let mut t = vec![
        TensorSpec::new("embeddings.word_embeddings.weight", v * h).group(1),
        TensorSpec::new("embeddings.position_embeddings.weight", 512 * h).group(1),
        TensorSpec::new("embeddings.token_type_embeddings.weight", 2 * h).group(1),
        TensorSpec::new("embeddings.LayerNorm.weight", h).group(1),
        TensorSpec::new("embeddings.LayerNorm.bias", h).group(1),
    ];
    for l in 0..6 {
        let p = format!("encoder.layer.{l}");
        for (name, len, group) in [
            ("attention.self.query.weight", h * h, 0),
            ("attention.self.query.bias", h, 1),
            ("attention.self.key.weight", h * h, 0),
            ("attention.self.key.bias", h, 1),
            ("attention.self.value.weight", h * h, 0),
            ("attention.self.value.bias", h, 1),
            ("attention.output.dense.weight", h * h, 0),
            ("attention.output.dense.bias", h, 1),
            ("attention.output.LayerNorm.weight", h, 1),
            ("attention.output.LayerNorm.bias", h, 1),
            ("intermediate.dense.weight", i * h, 0),
            ("intermediate.dense.bias", i, 1),
            ("output.dense.weight", h * i, 0),
            ("output.dense.bias", h, 1),
            ("output.LayerNorm.weight", h, 1),
            ("output.LayerNorm.bias", h, 1),
        ] {
            t.push(TensorSpec::new(format!("{p}.{name}"), len).group(group));
        }
    }
    t
}

pub fn groups() -> Vec<ParamGroup> {
    vec![
        ParamGroup::sage().weight_decay(0.01),
        ParamGroup::plain(),
        ParamGroup::sage().lr_scale(0.5),
    ]
}

/// Every algorithm in both presets, each without clipping, with global clipping, with
/// per-tensor clipping and with both (the clipping norms are set low enough to bite), plus
/// a warm-up schedule (whose rate follows each tensor's own count in the reference preset)
/// and the guard off.
pub fn configs() -> Vec<(String, Config)> {
    let algs = [
        Algorithm::sgd(0.0),
        Algorithm::sgd(0.9),
        Algorithm::adam(),
        Algorithm::adamw(),
        Algorithm::adamax(),
    ];
    let mut out = Vec::new();
    for alg in algs {
        for (preset, base) in [
            ("paper", Config::paper(alg, 1e-2)),
            ("reference", Config::reference(alg, 1e-2)),
        ] {
            let name = format!("{}{} {preset}", alg.name(), momentum(alg));
            out.push((name.clone(), base));
            out.push((format!("{name} global-clip"), base.global_clip(2.0)));
            out.push((format!("{name} per-tensor-clip"), base.per_tensor_clip(0.7)));
            out.push((
                format!("{name} both-clips warmup"),
                base.global_clip(3.0)
                    .per_tensor_clip(0.9)
                    .schedule(Schedule::WarmupLinearPpb {
                        warmup: 0.3,
                        t_total: 10,
                    }),
            ));
        }
    }
    out.push((
        "AdamW reference guard-off".into(),
        Config::reference(Algorithm::adamw(), 1e-2).skip_non_finite(false),
    ));
    out
}

fn momentum(a: Algorithm) -> &'static str {
    match a {
        Algorithm::Sgd { momentum, .. } if momentum > 0.0 => "(momentum)",
        _ => "",
    }
}

fn mix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

fn unit(step: u64, t: usize, i: usize) -> f32 {
    let h = mix(mix(mix(step) ^ t as u64) ^ i as u64);
    ((h >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
}

/// Initial parameters: small values, every 7th exactly 0 (the reference preset never moves
/// those).
pub fn init(t: usize) -> Vec<f32> {
    (0..LENS[t])
        .map(|i| if i % 7 == 3 { 0.0 } else { 0.1 * unit(0, t, i) })
        .collect()
}

/// Which tensors have no gradient at step `s` (on every rank).
pub fn absent(s: u64) -> Vec<usize> {
    match s % 7 {
        2 => vec![2, 5],
        5 => vec![0, 3, 8],
        _ => vec![],
    }
}

/// A non-finite gradient planted at step `s`: (tensor, element, value).
pub fn poison(s: u64) -> Option<(usize, usize, f32)> {
    match s % 7 {
        3 => Some((7, 8193 - 5, f32::NAN)),
        6 => Some((0, 10_001, f32::INFINITY)),
        _ => None,
    }
}

/// The whole gradient of tensor `t` at step `s`: per-tensor scales so that per-tensor
/// clipping treats tensors differently, and per-chunk scales (1, 2^5, 2^10, 2^15) so that the
/// chunk partials span 2^30 in magnitude: their f64 sum needs more than 53 bits and depends on
/// its order (backends compute partials in f32 blocks, whose sums are otherwise exact in any
/// order); every 11th element 0.
pub fn grad(s: u64, t: usize) -> Vec<f32> {
    let scale = [0.3, 0.2, 3.0, 0.5][t % 4];
    let mut g: Vec<f32> = (0..LENS[t])
        .map(|i| {
            let chunk = (1u32 << (5 * ((i / 4096) % 4))) as f32;
            if i % 11 == 5 {
                0.0
            } else {
                scale * chunk * unit(s, t, i)
            }
        })
        .collect();
    if let Some((pt, pi, v)) = poison(s) {
        if pt == t {
            g[pi] = v;
        }
    }
    g
}

fn cast<E: Element>(x: &[f32]) -> Vec<E> {
    x.iter().map(|&v| E::from_f32(v)).collect()
}

fn bits<E: Element>(x: &[E]) -> Vec<u32> {
    x.iter().map(|v| v.to_f32().to_bits()).collect()
}

/// First difference between two bit patterns, described.
fn diff(what: &str, a: &[u32], b: &[u32]) -> Result<(), String> {
    if a.len() != b.len() {
        return Err(format!("{what}: {} elements, oracle {}", a.len(), b.len()));
    }
    match a.iter().zip(b).position(|(x, y)| x != y) {
        None => Ok(()),
        Some(i) => Err(format!(
            "{what}: element {i} is {} ({:#010x}), the oracle has {} ({:#010x})",
            f32::from_bits(a[i]),
            a[i],
            f32::from_bits(b[i]),
            b[i]
        )),
    }
}

/// What one rank saw in a run.
#[derive(Clone, Debug, Default)]
pub struct Seen {
    pub steps: u64,
    pub skipped: u64,
    pub state_bytes: usize,
    pub total_state_bytes: usize,
    pub pieces: usize,
    /// Every parameter after the last step (as f32).
    pub final_params: Vec<Vec<f32>>,
}

/// The oracle (one process, the whole model) and this rank's sharded optimizer, stepped
/// side by side.
pub struct Run<B, P, S>
where
    B: HostBuffers + Views,
    B::Error: Send + Sync + 'static,
    P: Element,
    S: Element,
{
    pub label: String,
    oracle: Optimizer<B, Vec<ParamGroup>>,
    oracle_params: Vec<B::Owned<P>>,
    oracle_states: Vec<TensorState<B::Owned<S>>>,
    pub sharded: ShardedOptimizer<B, P, S>,
    pub params: Vec<B::Owned<P>>,
    dl: B,
    pub step: u64,
    pub seen: Seen,
}

fn e<E: std::fmt::Display>(ctx: &str) -> impl Fn(E) -> String + '_ {
    move |e| format!("{ctx}: {e}")
}

impl<B, P, S> Run<B, P, S>
where
    B: HostBuffers + Views,
    B::Error: Send + Sync + 'static + std::fmt::Display,
    P: Element,
    S: Element,
{
    pub fn new<C: BufferComm<B>>(
        comm: &mut C,
        make: &dyn Fn() -> B,
        label: &str,
        cfg: Config,
    ) -> Result<Self, String> {
        let mut ob = make();
        let mut oracle_params = Vec::new();
        let mut oracle_states = Vec::new();
        let mut params = Vec::new();
        for (t, spec) in specs().iter().enumerate() {
            let v: Vec<P> = cast(&init(t));
            oracle_params.push(ob.upload(&v).map_err(e("upload"))?);
            params.push(ob.upload(&v).map_err(e("upload"))?);
            let layout = cfg.state_layout(groups()[spec.group].sage);
            let zeros = vec![S::default(); spec.len];
            oracle_states
                .push(TensorState::try_new(layout, |_| ob.upload(&zeros)).map_err(e("upload"))?);
        }
        let oracle = Optimizer::new(ob, cfg, groups()).map_err(e("oracle"))?;
        let sharded = ShardedOptimizer::new(make(), cfg, groups(), specs(), comm)
            .map_err(e("sharded optimizer"))?;
        let seen = Seen {
            state_bytes: sharded.state_bytes(),
            total_state_bytes: sharded.total_state_bytes(),
            pieces: sharded.pieces().len(),
            ..Seen::default()
        };
        Ok(Run {
            label: label.to_string(),
            oracle,
            oracle_params,
            oracle_states,
            sharded,
            params,
            dl: make(),
            step: 0,
            seen,
        })
    }

    fn ctx(&self, comm_rank: usize, world: usize) -> String {
        format!(
            "[{} | rank {comm_rank} of {world} | step {}]",
            self.label, self.step
        )
    }

    /// Host copies of this rank's parameters and state pieces (for the unchanged check).
    fn snapshot(&mut self) -> Result<Vec<Vec<u32>>, String> {
        let mut out = Vec::new();
        for p in &self.params {
            out.push(bits(
                &self.dl.to_host::<P>(p.borrow()).map_err(e("download"))?,
            ));
        }
        for st in self.sharded.states() {
            for b in Buffer::ALL {
                if let Some(buf) = st.get(b) {
                    out.push(bits(
                        &self.dl.to_host::<S>(buf.borrow()).map_err(e("download"))?,
                    ));
                }
            }
            out.push(vec![st.step as u32, (st.step >> 32) as u32]);
        }
        Ok(out)
    }

    /// One step of both; compares everything this rank holds.
    pub fn step<C: BufferComm<B>>(&mut self, comm: &mut C) -> Result<StepReport, String> {
        self.step += 1;
        let s = self.step;
        let ctx = self.ctx(comm.rank(), comm.size());
        let gone = absent(s);
        let specs = specs();

        // Oracle: the whole model, whole gradients.
        let whole: Vec<Vec<f32>> = (0..specs.len()).map(|t| grad(s, t)).collect();
        let mut ograds = Vec::new();
        for g in &whole {
            ograds.push(self.dl.upload::<P>(&cast(g)).map_err(e(&ctx))?);
        }
        let oreport = {
            let mut set: Vec<ParamTensor<'_, B, P, S>> = Vec::new();
            for (t, ((p, g), st)) in self
                .oracle_params
                .iter_mut()
                .zip(&ograds)
                .zip(&mut self.oracle_states)
                .enumerate()
            {
                if gone.contains(&t) {
                    continue;
                }
                set.push(
                    ParamTensor::new(p.borrow_mut(), g.borrow(), st.view())
                        .name(&specs[t].name)
                        .group(specs[t].group),
                );
            }
            self.oracle.step(&mut set).map_err(e(&ctx))?
        };

        // This rank: gradients correct on its own pieces only.
        let layout: Layout = self.sharded.layout().clone();
        let rank = comm.rank();
        let mut grads = Vec::new();
        for (t, spec) in specs.iter().enumerate() {
            let mut g = vec![f32::NAN; spec.len];
            for p in layout.pieces(rank).iter().filter(|p| p.tensor == t) {
                g[p.range()].copy_from_slice(&whole[t][p.range()]);
            }
            grads.push(self.dl.upload::<P>(&cast(&g)).map_err(e(&ctx))?);
        }
        let before = if poison(s).is_some() {
            Some(self.snapshot()?)
        } else {
            None
        };
        let rep = {
            let mut ts: Vec<DistTensor<'_, B, P>> = self
                .params
                .iter_mut()
                .zip(&grads)
                .enumerate()
                .map(|(t, (p, g))| {
                    if gone.contains(&t) {
                        DistTensor::absent(p.borrow_mut())
                    } else {
                        DistTensor::new(p.borrow_mut(), g.borrow())
                    }
                })
                .collect();
            self.sharded.step(comm, &mut ts).map_err(e(&ctx))?
        };
        if rep.report != oreport {
            return Err(format!(
                "{ctx} report {:?}, the oracle's {:?}",
                rep.report, oreport
            ));
        }
        self.seen.steps += 1;
        if !oreport.applied() {
            self.seen.skipped += 1;
            if poison(s).is_none() {
                return Err(format!("{ctx} skipped with no poison planted"));
            }
        } else if poison(s).is_some() && self.oracle.config().skip_non_finite {
            return Err(format!("{ctx} applied a step with a non-finite gradient"));
        }
        if let (Some(before), false) = (before, oreport.applied()) {
            let after = self.snapshot()?;
            for (i, (a, b)) in after.iter().zip(&before).enumerate() {
                diff(&format!("{ctx} skipped step changed buffer {i}"), a, b)?;
            }
        }
        self.compare(comm.rank(), comm.size())?;
        Ok(oreport)
    }

    /// Every parameter, and this rank's state pieces and counts, against the oracle.
    pub fn compare(&mut self, rank: usize, world: usize) -> Result<(), String> {
        let ctx = self.ctx(rank, world);
        let specs = specs();
        for (t, spec) in specs.iter().enumerate() {
            let a = self
                .dl
                .to_host::<P>(self.params[t].borrow())
                .map_err(e(&ctx))?;
            let b = self
                .dl
                .to_host::<P>(self.oracle_params[t].borrow())
                .map_err(e(&ctx))?;
            diff(
                &format!("{ctx} parameter {}", spec.name),
                &bits(&a),
                &bits(&b),
            )?;
        }
        let pieces = self.sharded.pieces().to_vec();
        for (p, st) in pieces.iter().zip(self.sharded.states()) {
            let ost = &self.oracle_states[p.tensor];
            if st.step != ost.step {
                return Err(format!(
                    "{ctx} {} count {}, the oracle's {}",
                    specs[p.tensor].name, st.step, ost.step
                ));
            }
            for b in Buffer::ALL {
                match (st.get(b), ost.get(b)) {
                    (Some(x), Some(y)) => {
                        let x = self.dl.to_host::<S>(x.borrow()).map_err(e(&ctx))?;
                        let y = self.dl.to_host::<S>(y.borrow()).map_err(e(&ctx))?;
                        diff(
                            &format!(
                                "{ctx} {}.{b} elements {}..{}",
                                specs[p.tensor].name, p.start, p.end
                            ),
                            &bits(&x),
                            &bits(&y[p.range()]),
                        )?;
                    }
                    (None, None) => {}
                    _ => {
                        return Err(format!(
                            "{ctx} {}.{b} present on one side",
                            specs[p.tensor].name
                        ))
                    }
                }
            }
        }
        if self.sharded.optimizer().steps() != self.oracle.steps() {
            return Err(format!(
                "{ctx} optimizer count {}, the oracle's {}",
                self.sharded.optimizer().steps(),
                self.oracle.steps()
            ));
        }
        Ok(())
    }

    pub fn save<C: BufferComm<B>>(&mut self, comm: &mut C, dir: &Path) -> Result<(), String> {
        let params: Vec<&B::Buf<P>> = self.params.iter().map(|p| p.borrow()).collect();
        self.sharded
            .save(comm, dir, &params)
            .map_err(e(&format!("{} save", self.label)))
    }

    /// Loads into this run's sharded side (after scrambling its parameters and state), and
    /// advances the oracle to the saved step first.
    pub fn load<C: BufferComm<B>>(
        &mut self,
        comm: &mut C,
        dir: &Path,
        saved_at: u64,
    ) -> Result<LoadReport, String> {
        let ctx = format!("{} load", self.label);
        // The oracle catches up alone: it is the uninterrupted run.
        while self.step < saved_at {
            self.step += 1;
            let s = self.step;
            let gone = absent(s);
            let specs = specs();
            let mut ograds = Vec::new();
            for t in 0..specs.len() {
                ograds.push(self.dl.upload::<P>(&cast(&grad(s, t))).map_err(e(&ctx))?);
            }
            let mut set: Vec<ParamTensor<'_, B, P, S>> = Vec::new();
            for (t, ((p, g), st)) in self
                .oracle_params
                .iter_mut()
                .zip(&ograds)
                .zip(&mut self.oracle_states)
                .enumerate()
            {
                if !gone.contains(&t) {
                    set.push(
                        ParamTensor::new(p.borrow_mut(), g.borrow(), st.view())
                            .name(&specs[t].name)
                            .group(specs[t].group),
                    );
                }
            }
            self.oracle.step(&mut set).map_err(e(&ctx))?;
        }
        // Scramble what the load must overwrite.
        for p in &mut self.params {
            let buf: &mut B::Buf<P> = p.borrow_mut();
            let n = self.dl.len(&*buf);
            self.dl
                .write_host(buf, &vec![P::from_f32(7.0); n])
                .map_err(e(&ctx))?;
        }
        for st in self.sharded.states_mut() {
            st.step = 12345;
        }
        let report = {
            let mut params: Vec<&mut B::Buf<P>> =
                self.params.iter_mut().map(|p| p.borrow_mut()).collect();
            self.sharded
                .load(comm, dir, &mut params, ConfigCheck::Exact)
                .map_err(e(&ctx))?
        };
        self.compare(comm.rank(), comm.size())?;
        Ok(report)
    }
}

/// The whole scenario for one configuration: `STEPS` steps (absent tensors, a NaN and an
/// Inf on one rank each), compared after every step.
pub fn run_config<B, P, S, C>(
    comm: &mut C,
    make: &dyn Fn() -> B,
    label: &str,
    cfg: Config,
) -> Result<Seen, String>
where
    B: HostBuffers + Views,
    B::Error: Send + Sync + 'static + std::fmt::Display,
    P: Element,
    S: Element,
    C: BufferComm<B>,
{
    let mut run = Run::<B, P, S>::new(comm, make, label, cfg)?;
    for _ in 0..STEPS {
        run.step(comm)?;
    }
    let mut seen = run.seen.clone();
    for p in &run.params {
        let host = run.dl.to_host::<P>(p.borrow()).map_err(e("download"))?;
        seen.final_params
            .push(host.iter().map(|x| x.to_f32()).collect());
    }
    Ok(seen)
}

/// Configurations the resharding checks use (counts differ per tensor: absent tensors and
/// skipped steps happen before the save).
pub fn reshard_configs() -> Vec<(String, Config)> {
    vec![
        (
            "AdamW reference both-clips".into(),
            Config::reference(Algorithm::adamw(), 1e-2)
                .beta0(0.75)
                .global_clip(3.0)
                .per_tensor_clip(0.9)
                .schedule(Schedule::WarmupLinearPpb {
                    warmup: 0.2,
                    t_total: 20,
                }),
        ),
        (
            "SGD(momentum) paper global-clip".into(),
            Config::paper(Algorithm::sgd(0.9), 1e-2).global_clip(2.0),
        ),
    ]
}

/// Steps before the save, and after it.
pub const SAVE_AT: u64 = 6;
pub const AFTER: u64 = 5;

/// Runs `SAVE_AT` steps, saves into `dir`, then `AFTER` more steps, all against the oracle.
pub fn save_phase<B, P, S, C>(
    comm: &mut C,
    make: &dyn Fn() -> B,
    dir: &Path,
    label: &str,
    cfg: Config,
) -> Result<(), String>
where
    B: HostBuffers + Views,
    B::Error: Send + Sync + 'static + std::fmt::Display,
    P: Element,
    S: Element,
    C: BufferComm<B>,
{
    let mut run = Run::<B, P, S>::new(comm, make, label, cfg)?;
    for _ in 0..SAVE_AT {
        run.step(comm)?;
    }
    run.save(comm, dir)?;
    for _ in 0..AFTER {
        run.step(comm)?;
    }
    Ok(())
}

/// Loads what `save_phase` saved (from any world size) into a fresh optimizer with scrambled
/// parameters, compares with the uninterrupted oracle, then steps `AFTER` more, compared after
/// every step.
pub fn resume_phase<B, P, S, C>(
    comm: &mut C,
    make: &dyn Fn() -> B,
    dir: &Path,
    label: &str,
    cfg: Config,
) -> Result<LoadReport, String>
where
    B: HostBuffers + Views,
    B::Error: Send + Sync + 'static + std::fmt::Display,
    P: Element,
    S: Element,
    C: BufferComm<B>,
{
    let mut run = Run::<B, P, S>::new(comm, make, label, cfg)?;
    let report = run.load(comm, dir, SAVE_AT)?;
    for _ in 0..AFTER {
        run.step(comm)?;
    }
    Ok(report)
}
