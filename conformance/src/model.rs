//! A small model on a backend: owned parameter and state buffers for a list of tensors, stepped
//! through the [`Optimizer`] exactly as an embedder would.

use sage_core::{
    Buffer, Config, Element, Error, Optimizer, ParamGroup, ParamTensor, StepReport, TensorState,
};

use crate::failure::Failure;
use crate::harness::Harness;

/// Owned buffers of every tensor of a model.
pub struct Model<B: Harness, P: Element, S: Element> {
    /// Parameters.
    pub params: Vec<B::Owned<P>>,
    /// Each tensor's state: `m`, `v`, `ibar` (absent where the layout has none) and its count.
    pub state: Vec<TensorState<B::Owned<S>>>,
    /// Group of each tensor.
    pub group_of: Vec<usize>,
    /// Names of the tensors (`t0`, `t1`, ...).
    pub names: Vec<String>,
}

/// Maps a backend error to a failure of `check`.
pub fn backend_failure<E: std::fmt::Display>(check: &str, e: E) -> Failure {
    Failure::new(check, format!("backend error: {e}"))
}

impl<B: Harness, P: Element, S: Element> Model<B, P, S> {
    /// Uploads `init` (one vector per tensor) and zeroed state laid out for `cfg` and `groups`.
    pub fn new(
        b: &mut B,
        cfg: &Config,
        groups: &[ParamGroup],
        init: &[Vec<f32>],
        group_of: &[usize],
    ) -> Result<Self, Failure> {
        let fail = |e| backend_failure("setup", e);
        let mut params = Vec::new();
        let mut state = Vec::new();
        for (i, x) in init.iter().enumerate() {
            let host: Vec<P> = x.iter().map(|&v| P::from_f32(v)).collect();
            params.push(b.upload(&host).map_err(fail)?);
            let sage = groups.get(group_of[i]).is_some_and(|g| g.sage);
            let layout = cfg.state_layout(sage);
            let zeros = vec![S::default(); x.len()];
            state.push(TensorState::try_new(layout, |_| b.upload(&zeros)).map_err(fail)?);
        }
        Ok(Model {
            params,
            state,
            group_of: group_of.to_vec(),
            names: (0..init.len()).map(|i| format!("t{i}")).collect(),
        })
    }

    /// Uploads `grads` and takes one optimizer step over all tensors (one multi-tensor call).
    pub fn step<G: AsRef<[ParamGroup]>>(
        &mut self,
        opt: &mut Optimizer<B, G>,
        grads: &[Vec<f32>],
    ) -> Result<StepReport, Error<B::Error>> {
        let mut g_bufs = Vec::with_capacity(grads.len());
        for g in grads {
            let host: Vec<P> = g.iter().map(|&v| P::from_f32(v)).collect();
            g_bufs.push(opt.backend_mut().upload(&host).map_err(Error::Backend)?);
        }
        self.step_with(opt, &g_bufs, None)
    }

    /// One step over the tensors that have a gradient (`None`: absent at this step, left out
    /// of it, so its parameters, state and count stay as they are).
    pub fn step_present<G: AsRef<[ParamGroup]>>(
        &mut self,
        opt: &mut Optimizer<B, G>,
        grads: &[Option<Vec<f32>>],
    ) -> Result<StepReport, Error<B::Error>> {
        let mut g_bufs = Vec::with_capacity(grads.len());
        let mut present = Vec::new();
        for (i, g) in grads.iter().enumerate() {
            // An absent tensor still gets a placeholder so that indices line up; it is not
            // stepped.
            let host: Vec<P> = match g {
                Some(g) => {
                    present.push(i);
                    g.iter().map(|&v| P::from_f32(v)).collect()
                }
                None => vec![P::default(); 1],
            };
            g_bufs.push(opt.backend_mut().upload(&host).map_err(Error::Backend)?);
        }
        self.step_with(opt, &g_bufs, Some(&present))
    }

    /// One step over the tensors listed in `only` (all when `None`), with gradients already
    /// on the backend.
    pub fn step_with<G: AsRef<[ParamGroup]>>(
        &mut self,
        opt: &mut Optimizer<B, G>,
        grads: &[B::Owned<P>],
        only: Option<&[usize]>,
    ) -> Result<StepReport, Error<B::Error>> {
        let mut tensors = self.tensors(grads, only);
        opt.step(&mut tensors)
    }

    /// The step's tensors for the ones listed in `only` (all when `None`), to step together
    /// with other models' (mixed precisions) or with norms from outside.
    pub fn tensors<'s>(
        &'s mut self,
        grads: &'s [B::Owned<P>],
        only: Option<&[usize]>,
    ) -> Vec<ParamTensor<'s, B, P, S>> {
        let mut tensors: Vec<ParamTensor<'s, B, P, S>> = Vec::new();
        for (i, ((p, st), g)) in self
            .params
            .iter_mut()
            .zip(self.state.iter_mut())
            .zip(grads)
            .enumerate()
        {
            if only.is_some_and(|o| !o.contains(&i)) {
                continue;
            }
            tensors.push(
                ParamTensor::new(B::buf_mut(p), B::buf(g), st.view())
                    .name(&self.names[i])
                    .group(self.group_of[i]),
            );
        }
        tensors
    }

    /// Uploads host gradients in this model's parameter type.
    pub fn upload_grads(
        &self,
        b: &mut B,
        grads: &[Vec<f32>],
    ) -> Result<Vec<B::Owned<P>>, B::Error> {
        grads
            .iter()
            .map(|g| {
                let host: Vec<P> = g.iter().map(|&v| P::from_f32(v)).collect();
                b.upload(&host)
            })
            .collect()
    }

    /// The parameters, widened to f32.
    pub fn read_params(&self, b: &mut B) -> Result<Vec<Vec<f32>>, B::Error> {
        self.params
            .iter()
            .map(|p| Ok(b.download(p)?.iter().map(|x| x.to_f32()).collect()))
            .collect()
    }

    /// The state buffers (`[m, v, ibar]` per tensor, empty where absent), widened to f32.
    pub fn read_state(&self, b: &mut B) -> Result<Vec<[Vec<f32>; 3]>, B::Error> {
        let mut out = Vec::new();
        for st in &self.state {
            let mut one: [Vec<f32>; 3] = Default::default();
            for (k, buf) in Buffer::ALL.into_iter().enumerate() {
                if let Some(s) = st.get(buf) {
                    one[k] = b.download(s)?.iter().map(|x| x.to_f32()).collect();
                }
            }
            out.push(one);
        }
        Ok(out)
    }
}

impl<B: Harness, P: Element, S: Element> Model<B, P, S> {
    /// Each tensor's own step count.
    pub fn steps(&self) -> Vec<u64> {
        self.state.iter().map(|s| s.step).collect()
    }

    /// A model restored from host copies of its parameters, state and counts (as read by
    /// [`read_params`](Self::read_params), [`read_state`](Self::read_state) and
    /// [`steps`](Self::steps)).
    pub fn restore(
        b: &mut B,
        params: &[Vec<f32>],
        state: &[[Vec<f32>; 3]],
        steps: &[u64],
        group_of: &[usize],
        layouts: &[[bool; 3]],
    ) -> Result<Self, Failure> {
        let fail = |e| backend_failure("restore", e);
        let mut model = Model {
            params: Vec::new(),
            state: Vec::new(),
            group_of: group_of.to_vec(),
            names: (0..params.len()).map(|i| format!("t{i}")).collect(),
        };
        for (i, p) in params.iter().enumerate() {
            let host: Vec<P> = p.iter().map(|&v| P::from_f32(v)).collect();
            model.params.push(b.upload(&host).map_err(fail)?);
            let layout = sage_core::StateLayout {
                m: layouts[i][0],
                v: layouts[i][1],
                ibar: layouts[i][2],
            };
            let mut one = TensorState::try_new(layout, |buf| {
                let host: Vec<S> = state[i][buf.index()]
                    .iter()
                    .map(|&v| S::from_f32(v))
                    .collect();
                b.upload(&host)
            })
            .map_err(fail)?;
            one.step = steps[i];
            model.state.push(one);
        }
        Ok(model)
    }

    /// Which state buffers each tensor holds (`[m, v, ibar]`).
    pub fn layouts(&self) -> Vec<[bool; 3]> {
        self.state
            .iter()
            .map(|s| Buffer::ALL.map(|b| s.get(b).is_some()))
            .collect()
    }
}
