//! The sharded optimizer (ZeRO stage 1): each rank keeps the state of its own pieces only,
//! steps them through sage-core's [`Optimizer`], and all-gathers the parameters.

use std::borrow::Borrow;
use std::marker::PhantomData;
use std::time::Instant;

use sage_core::norm::{chunk_count, reduce};
use sage_core::{
    Buffer, Config, Element, GlobalNorms, HostBuffers, Optimizer, Outcome, ParamGroup, ParamTensor,
    StepReport, TensorState,
};

use crate::comm::{BufferComm, Communicator};
use crate::error::DistError;
use crate::layout::{Layout, Piece, TensorSpec};
use crate::views::Views;

/// One tensor of a sharded step, as every rank holds it: the whole parameter (replicated, as
/// in data-parallel training) and its gradient, or `None` when this tensor has no gradient at
/// this step. A sharded step reads only this rank's pieces of each gradient, so gradients that
/// were reduce-scattered (correct only on their owner's part) are fine.
pub struct DistTensor<'a, B: Views + ?Sized, P: Element> {
    /// The whole parameter; updated on every rank by the step.
    pub param: &'a mut B::Buf<P>,
    /// Its gradient (the whole length; only this rank's pieces are read), or `None`.
    pub grad: Option<&'a B::Buf<P>>,
}

impl<'a, B: Views + ?Sized, P: Element> DistTensor<'a, B, P> {
    /// A tensor with a gradient.
    pub fn new(param: &'a mut B::Buf<P>, grad: &'a B::Buf<P>) -> Self {
        DistTensor {
            param,
            grad: Some(grad),
        }
    }
    /// A tensor without a gradient at this step.
    pub fn absent(param: &'a mut B::Buf<P>) -> Self {
        DistTensor { param, grad: None }
    }
}

/// Where one sharded step spent its time on this rank, in seconds.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct StepTimes {
    /// This rank's chunk partials (computation).
    pub partials: f64,
    /// All-gather of every rank's presence flags and partials, and their reduction
    /// (communication).
    pub norms: f64,
    /// The step of this rank's pieces (computation).
    pub step: f64,
    /// All-gather of the parameters (communication).
    pub gather: f64,
    /// All-gather of each rank's count of non-finite updated parameters (communication: the
    /// report's `non_finite_params`, the same on every rank).
    pub damage: f64,
}

impl StepTimes {
    /// Time spent in collectives.
    pub fn comm(&self) -> f64 {
        self.norms + self.gather + self.damage
    }
    /// Time spent computing.
    pub fn compute(&self) -> f64 {
        self.partials + self.step
    }
    /// Everything.
    pub fn total(&self) -> f64 {
        self.comm() + self.compute()
    }
}

/// What a sharded step did: the report one process stepping every tensor would give (same
/// outcome, count, norm, clipping coefficient, rate, tensor count and index of the first
/// non-finite tensor among the step's tensors), and this rank's timings.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct DistReport {
    /// As [`Optimizer::step`] reports it for the whole model.
    pub report: StepReport,
    /// The pieces this rank stepped.
    pub local_pieces: usize,
    /// Where the time went.
    pub times: StepTimes,
}

/// SAGE with its state sharded over the ranks of a communicator (ZeRO stage 1).
///
/// Every rank holds the whole parameters (replicated) and the state of its own pieces only
/// ([`Layout`]: a contiguous `1/N` of the flattened model's state, cut on the norm grid). A
/// step (1) computes this rank's chunk partials of the gradients it owns, (2) all-gathers every
/// rank's presence flags and partials — a tensor is absent only when it is absent on every
/// rank — and reduces the partials in the contract's order into the global and per-tensor
/// squared norms, the same bits one process computes whatever the partition, (3) steps its
/// pieces with [`Optimizer::step_with_norms`], so clipping and the non-finite guard make one
/// decision for every rank, and (4) all-gathers the updated parameters. Parameters, state,
/// counts and the report equal a single process stepping the whole model, bit for bit.
///
/// `P` is the parameter (and gradient) storage type, `S` the state's; every tensor of one
/// sharded optimizer has the same pair.
pub struct ShardedOptimizer<B, P, S, G = Vec<ParamGroup>>
where
    B: HostBuffers + Views,
    P: Element,
    S: Element,
    G: AsRef<[ParamGroup]>,
{
    pub(crate) opt: Optimizer<B, G>,
    pub(crate) layout: Layout,
    pub(crate) rank: usize,
    /// One per local piece, in the order of `layout.pieces(rank)`.
    pub(crate) states: Vec<TensorState<B::Owned<S>>>,
    _p: PhantomData<fn() -> P>,
}

impl<B, P, S, G> ShardedOptimizer<B, P, S, G>
where
    B: HostBuffers + Views,
    B::Error: Send + Sync + 'static,
    P: Element,
    S: Element,
    G: AsRef<[ParamGroup]>,
{
    /// Partitions `tensors` over `comm`'s ranks and allocates this rank's state (zeros, count
    /// 0) through `backend`. Every rank must pass the same tensors, configuration and groups.
    pub fn new<C: Communicator>(
        backend: B,
        config: Config,
        groups: G,
        tensors: Vec<TensorSpec>,
        comm: &C,
    ) -> Result<Self, DistError> {
        let opt = Optimizer::new(backend, config, groups).map_err(DistError::optimizer)?;
        // Balance the state: each element weighs the bytes of state its group needs (elements
        // of stateless groups weigh nothing; a model with no state at all balances elements).
        let bytes = |t: &TensorSpec| {
            opt.state_layout(t.group)
                .map_or(0, |l| l.bytes_per_param(S::DTYPE))
        };
        let layout = if tensors.iter().any(|t| t.len > 0 && bytes(t) > 0) {
            Layout::weighted(tensors, comm.size(), bytes)?
        } else {
            Layout::new(tensors, comm.size())?
        };
        Self::with_layout(opt, layout, comm.rank())
    }

    /// As [`new`](Self::new), with a layout made elsewhere and this process's rank in it.
    pub fn with_layout(
        mut opt: Optimizer<B, G>,
        layout: Layout,
        rank: usize,
    ) -> Result<Self, DistError> {
        layout.validate().map_err(|e| DistError::input(None, e))?;
        if rank >= layout.world() {
            return Err(DistError::input(
                None,
                format!("rank {rank} in a world of {}", layout.world()),
            ));
        }
        let mut states = Vec::with_capacity(layout.pieces(rank).len());
        for p in layout.pieces(rank) {
            let spec = &layout.tensors()[p.tensor];
            let state_layout = opt.state_layout(spec.group).ok_or_else(|| {
                DistError::input(
                    Some((p.tensor, &spec.name)),
                    format!(
                        "group {} does not exist ({} groups)",
                        spec.group,
                        opt.groups().len()
                    ),
                )
            })?;
            let zeros = vec![S::default(); p.len()];
            let backend = opt.backend_mut();
            let st = TensorState::try_new(state_layout, |_| backend.upload(&zeros))
                .map_err(|e| DistError::backend(format!("state of {}", spec.name), e))?;
            states.push(st);
        }
        Ok(ShardedOptimizer {
            opt,
            layout,
            rank,
            states,
            _p: PhantomData,
        })
    }

    /// The partition.
    pub fn layout(&self) -> &Layout {
        &self.layout
    }
    /// This process's rank.
    pub fn rank(&self) -> usize {
        self.rank
    }
    /// This rank's pieces.
    pub fn pieces(&self) -> &[Piece] {
        self.layout.pieces(self.rank)
    }
    /// The state of this rank's pieces, in the order of [`pieces`](Self::pieces) (each with
    /// its tensor's step count).
    pub fn states(&self) -> &[TensorState<B::Owned<S>>] {
        &self.states
    }
    /// The state of this rank's pieces, mutably.
    pub fn states_mut(&mut self) -> &mut [TensorState<B::Owned<S>>] {
        &mut self.states
    }
    /// The wrapped single-process optimizer (configuration, groups, the optimizer's count).
    pub fn optimizer(&self) -> &Optimizer<B, G> {
        &self.opt
    }
    /// The wrapped optimizer, mutably (e.g. for a new rate: [`Optimizer::set_config`]).
    pub fn optimizer_mut(&mut self) -> &mut Optimizer<B, G> {
        &mut self.opt
    }
    /// The backend.
    pub fn backend_mut(&mut self) -> &mut B {
        self.opt.backend_mut()
    }

    /// Bytes of optimizer state this rank holds, measured on its buffers.
    pub fn state_bytes(&self) -> usize {
        let b = self.opt.backend();
        self.states
            .iter()
            .flat_map(|st| Buffer::ALL.into_iter().filter_map(|k| st.get(k)))
            .map(|buf| b.len(buf.borrow()) * std::mem::size_of::<S>())
            .sum()
    }

    /// Bytes of optimizer state the whole model has (what one process would hold).
    pub fn total_state_bytes(&self) -> usize {
        self.layout
            .tensors()
            .iter()
            .map(|t| {
                self.opt
                    .state_layout(t.group)
                    .map_or(0, |l| l.bytes_per_param(S::DTYPE))
                    * t.len
            })
            .sum()
    }

    /// Checks the tensors of a call against the layout (count and lengths) on this rank.
    pub(crate) fn check_tensors(
        &self,
        lens: impl ExactSizeIterator<Item = (usize, Option<usize>)>,
    ) -> Result<(), DistError> {
        let specs = self.layout.tensors();
        if lens.len() != specs.len() {
            return Err(DistError::input(
                None,
                format!(
                    "{} tensors given, the layout has {}",
                    lens.len(),
                    specs.len()
                ),
            ));
        }
        for (i, ((p, g), spec)) in lens.zip(specs).enumerate() {
            if p != spec.len {
                return Err(DistError::input(
                    Some((i, &spec.name)),
                    format!("parameter has {p} elements, the layout {}", spec.len),
                ));
            }
            if let Some(g) = g.filter(|&g| g != spec.len) {
                return Err(DistError::input(
                    Some((i, &spec.name)),
                    format!("gradient has {g} elements, the layout {}", spec.len),
                ));
            }
        }
        Ok(())
    }

    /// One sharded step. `tensors` holds every tensor of the layout, in order, on every rank
    /// (the same presence everywhere: a tensor absent on every rank is left out of the step and
    /// keeps its parameters, state and count). Collective: every rank calls it.
    ///
    /// Three collectives: one all-gather of every rank's presence flags and chunk partials, the
    /// parameters' all-gather, and an all-gather of two numbers per rank for the report.
    ///
    /// On [`DistError::Input`] (this rank's tensors do not fit the layout) and
    /// [`DistError::Disagree`] (presence differs between ranks, or another rank's tensors do
    /// not fit) nothing was changed on any rank: every rank still takes part in the first
    /// exchange and returns an error, none waits for a rank that gave up.
    pub fn step<C: BufferComm<B>>(
        &mut self,
        comm: &mut C,
        tensors: &mut [DistTensor<'_, B, P>],
    ) -> Result<DistReport, DistError> {
        if comm.size() != self.layout.world() || comm.rank() != self.rank {
            return Err(DistError::input(
                None,
                format!(
                    "communicator of rank {} in {}, layout for rank {} in {}",
                    comm.rank(),
                    comm.size(),
                    self.rank,
                    self.layout.world()
                ),
            ));
        }
        // A rank whose tensors do not fit still takes part in the exchange below, saying so,
        // so that every rank returns an error instead of waiting for it.
        let mut refused = {
            let b = self.opt.backend();
            self.check_tensors(
                tensors
                    .iter()
                    .map(|t| (b.len(&*t.param), t.grad.map(|g| b.len(g)))),
            )
            .err()
        };
        let mut times = StepTimes::default();
        let cfg = *self.opt.config();
        let needs_norms =
            cfg.skip_non_finite || cfg.global_clip.is_some() || cfg.per_tensor_clip.is_some();
        let (rank, world) = (self.rank, self.layout.world());
        let pieces = self.layout.pieces(rank);
        let specs = self.layout.tensors();
        let nt = specs.len();
        let local: Vec<bool> = tensors.iter().map(|t| t.grad.is_some()).collect();

        // This rank's pieces of the tensors it has gradients for: views of the parameters and
        // gradients. (If presence disagrees, the exchange below says so before any update.)
        let backend = self.opt.backend();
        let mut pviews = Vec::new();
        let mut gviews = Vec::new();
        let mut meta = Vec::new(); // (piece index, tensor index)
        if refused.is_none() {
            let mut it = pieces.iter().enumerate().peekable();
            for (ti, t) in tensors.iter_mut().enumerate() {
                let Some(&(pi, p)) = it.peek() else { break };
                if p.tensor != ti {
                    continue;
                }
                it.next();
                let Some(grad) = t.grad else { continue };
                pviews.push(backend.view_mut(&mut *t.param, p.range()));
                gviews.push(backend.view(grad, p.range()));
                meta.push((pi, ti));
            }
        }
        let mut set: Vec<ParamTensor<'_, B, P, S>> = Vec::with_capacity(meta.len());
        {
            let mut states = self.states.iter_mut().enumerate();
            for ((pv, gv), &(pi, ti)) in pviews.iter_mut().zip(gviews.iter()).zip(&meta) {
                let st = loop {
                    let (i, s) = states.next().expect("one state per piece");
                    if i == pi {
                        break s;
                    }
                };
                set.push(
                    ParamTensor::new(&mut **pv, &**gv, st.view())
                        .name(&specs[ti].name)
                        .group(specs[ti].group),
                );
            }
        }

        // Chunk partials of this rank's pieces (zeros for pieces without a gradient): a
        // contiguous run of the whole model's, each piece starting on the chunk grid.
        let t1 = Instant::now();
        let chunks_of = |r: usize| -> usize {
            if needs_norms {
                self.layout.pieces(r).iter().map(Piece::chunks).sum()
            } else {
                0
            }
        };
        // Per rank: whether it can take part, its presence flags, its partials.
        let head = 1 + nt;
        let counts: Vec<usize> = (0..world).map(|r| head + chunks_of(r)).collect();
        let mut mine = vec![0.0; counts[rank]];
        for (m, &p) in mine[1..].iter_mut().zip(&local) {
            *m = p as u8 as f64;
        }
        let mut got = Vec::new();
        if needs_norms && refused.is_none() {
            let r = self.opt.partials_len(&mut set).and_then(|n| {
                got = vec![0.0; n];
                self.opt.grad_norm_partials(&mut set, &mut got)
            });
            refused = r.err().map(DistError::optimizer);
        }
        mine[0] = refused.is_none() as u8 as f64;
        if needs_norms && refused.is_none() {
            // Spread the set's partials over the slots of all this rank's pieces.
            let mut slot = head;
            let mut from = 0;
            let mut next = meta.iter().peekable();
            for (pi, p) in pieces.iter().enumerate() {
                let c = p.chunks();
                if next.peek().is_some_and(|m| m.0 == pi) {
                    next.next();
                    mine[slot..slot + c].copy_from_slice(&got[from..from + c]);
                    from += c;
                }
                slot += c;
            }
        }
        times.partials = t1.elapsed().as_secs_f64();

        // One exchange: every rank's presence flags and partials.
        let t2 = Instant::now();
        let mut all = vec![0.0; counts.iter().sum()];
        comm.all_gather_f64(&mine, &counts, &mut all)
            .map_err(DistError::comm)?;
        let offs = crate::comm::offsets(&counts);
        if let Some(r) = (0..world).find(|&r| all[offs[r]] == 0.0) {
            return Err(refused.unwrap_or(DistError::Disagree {
                what: format!("rank {r} refused the step (its tensors do not fit the layout)"),
            }));
        }
        let mut present = vec![false; nt];
        {
            let mut at = 0;
            for (r, &c) in counts.iter().enumerate() {
                let flags = &all[at + 1..at + head];
                for (i, &f) in flags.iter().enumerate() {
                    if r == 0 {
                        present[i] = f > 0.0;
                    } else if present[i] != (f > 0.0) {
                        let have = (0..world).filter(|&q| all[offs[q] + 1 + i] > 0.0).count();
                        return Err(DistError::Disagree {
                            what: format!(
                                "tensor {i} ({}) has a gradient on {have} of {world} ranks (exchange gradients first: data_parallel::all_reduce_grads gives absent ones zeros)",
                                specs[i].name
                            ),
                        });
                    }
                }
                at += c;
            }
        }
        // Index of each tensor among the present ones (the step's order).
        let mut at = vec![usize::MAX; nt];
        let mut k = 0;
        for (i, &p) in present.iter().enumerate() {
            if p {
                at[i] = k;
                k += 1;
            }
        }
        let norms = if needs_norms {
            // The present tensors' partials in rank order, which is the model's order.
            let mut seq = Vec::with_capacity(all.len());
            let mut off = 0;
            for (r, &c) in counts.iter().enumerate() {
                let mut slot = off + head;
                for p in self.layout.pieces(r) {
                    if present[p.tensor] {
                        seq.extend_from_slice(&all[slot..slot + p.chunks()]);
                    }
                    slot += p.chunks();
                }
                off += c;
            }
            let lens: Vec<usize> = specs
                .iter()
                .zip(&present)
                .filter(|(_, &p)| p)
                .map(|(s, _)| s.len)
                .collect();
            let mut per = vec![0.0; lens.len()];
            let total = reduce(&seq, &lens, &mut per).ok_or_else(|| DistError::Disagree {
                what: format!(
                    "gathered {} chunk partials, the present tensors have {}",
                    seq.len(),
                    lens.iter().map(|&l| chunk_count(l)).sum::<usize>()
                ),
            })?;
            let local_per: Vec<f64> = meta.iter().map(|&(_, ti)| per[at[ti]]).collect();
            Some((total, per, local_per))
        } else {
            None
        };
        times.norms = t2.elapsed().as_secs_f64();

        let t3 = Instant::now();
        let report = match &norms {
            Some((total, per, local_per)) => {
                let mut r = self
                    .opt
                    .step_with_norms(
                        &mut set,
                        GlobalNorms {
                            total_sq: *total,
                            per_tensor_sq: local_per,
                        },
                    )
                    .map_err(DistError::optimizer)?;
                if let Outcome::SkippedNonFinite { .. } = r.outcome {
                    // The first non-finite tensor of the whole step, as one process names it.
                    r.outcome = Outcome::SkippedNonFinite {
                        param: per.iter().position(|x| !x.is_finite()),
                    };
                }
                r
            }
            // No clipping and no guard: the step is element-wise, nothing global to decide.
            None => self.opt.step(&mut set).map_err(DistError::optimizer)?,
        };
        times.step = t3.elapsed().as_secs_f64();
        let local_pieces = set.len();
        drop(set);
        drop(pviews);
        drop(gviews);

        let mut report = report;
        report.tensors = k;
        if report.applied() {
            let t4 = Instant::now();
            self.gather_params(comm, tensors.iter_mut().map(|t| &mut *t.param), &present)?;
            times.gather = t4.elapsed().as_secs_f64();

            // The backends count non-finite updated parameters per piece: the first damaged
            // tensor of the whole step, and whether every piece was counted, from every rank.
            let t5 = Instant::now();
            let bad = report
                .non_finite_params
                .map_or(-1.0, |local| at[meta[local].1] as f64);
            let mine = [report.params_checked as u8 as f64, bad];
            let world = self.layout.world();
            let mut all = vec![0.0; 2 * world];
            comm.all_gather_f64(&mine, &vec![2; world], &mut all)
                .map_err(DistError::comm)?;
            report.params_checked = all.chunks(2).all(|c| c[0] > 0.0);
            report.non_finite_params = all
                .chunks(2)
                .filter(|c| c[1] >= 0.0)
                .map(|c| c[1] as usize)
                .min();
            times.damage = t5.elapsed().as_secs_f64();
        }
        Ok(DistReport {
            report,
            local_pieces,
            times,
        })
    }

    /// All-gathers the parameters of the tensors marked in `which` (each rank's pieces to every
    /// rank), in one batched collective.
    pub(crate) fn gather_params<'p, C: BufferComm<B>>(
        &mut self,
        comm: &mut C,
        params: impl Iterator<Item = &'p mut B::Buf<P>>,
        which: &[bool],
    ) -> Result<(), DistError>
    where
        B::Buf<P>: 'p,
    {
        let mut bufs = Vec::new();
        let mut splits = Vec::new();
        for (i, param) in params.enumerate() {
            if which[i] {
                bufs.push(param);
                splits.push(self.layout.split(i));
            }
        }
        comm.all_gather_parts_many(self.opt.backend_mut(), &mut bufs, &splits)
            .map_err(DistError::comm)
    }
}
