//! The `Backend` trait: where the update runs.
//!
//! Required: buffer length, per-chunk squared norms on the contract's grid ([`norm`](crate::norm):
//! they yield the clipping coefficient and the non-finite check, and let norms be computed in
//! pieces and reduced elsewhere), and two elementwise primitives — [`Backend::accumulate`] (an EMA
//! pass over one state buffer) and [`Backend::apply`] (the parameter update). That is enough:
//! the provided [`Backend::fused_step`] composes them, so a new backend is correct once the
//! primitives are. A fast backend overrides `fused_step` (one pass, every buffer read once and
//! written once) and [`Backend::step_tensors`] (many tensors per launch).

use crate::coeffs::{kind, Coeffs};
use crate::element::Element;
use crate::error::BackendError;
pub use crate::formula::Accumulate;
use crate::norm::chunk_count;
use crate::state::StateMut;

/// A place SAGE's update can run: a CPU, a GPU through CUDA or OpenCL, ...
pub trait Backend {
    /// This backend's error (maps to the shared [`ErrorKind`](crate::ErrorKind)).
    type Error: BackendError;
    /// A buffer of `E` on this backend: `[E]` for the CPU, a device buffer for GPUs.
    type Buf<E: Element>: ?Sized;

    /// Number of elements in `buf`.
    fn len<E: Element>(&self, buf: &Self::Buf<E>) -> usize;

    /// The partial squared norms of chunks `first .. first + out.len()` of `buf` on the
    /// contract's grid ([`norm`](crate::norm): chunks of [`NORM_CHUNK`](crate::norm::NORM_CHUNK)
    /// elements from the buffer's start), one `f64` each, written to `out`. A partial must depend
    /// on its chunk's contents only, be non-finite when the chunk holds a NaN or ±Inf (the
    /// non-finite guard relies on it), and not overflow for finite inputs. Callers pass ranges
    /// within the buffer's [`chunk_count`].
    fn sq_norm_chunks<E: Element>(
        &mut self,
        buf: &Self::Buf<E>,
        first: usize,
        out: &mut [f64],
    ) -> Result<(), Self::Error>;

    /// One EMA pass: `acc[i] = accumulate(k, which, acc[i], param[i], grad[i])`
    /// ([`formula::accumulate`](crate::formula::accumulate)), rounded to `S` once.
    fn accumulate<P: Element, S: Element>(
        &mut self,
        which: Accumulate,
        acc: &mut Self::Buf<S>,
        param: &Self::Buf<P>,
        grad: &Self::Buf<P>,
        k: &Coeffs,
    ) -> Result<(), Self::Error>;

    /// The parameter update: `param[i] = apply(k, param[i], grad[i], m[i], v[i], ibar[i])`
    /// ([`formula::apply`](crate::formula::apply)), reading state already advanced this step;
    /// an absent buffer reads as 0.
    fn apply<P: Element, S: Element>(
        &mut self,
        t: ApplyArgs<'_, Self, P, S>,
        k: &Coeffs,
    ) -> Result<(), Self::Error>;

    /// `Σ x²` over `buf`: [`fold`] of its chunk partials, first to last. Override only with
    /// something that gives the same bits.
    fn sq_norm<E: Element>(&mut self, buf: &Self::Buf<E>) -> Result<f64, Self::Error> {
        let chunks = chunk_count(self.len(buf));
        let mut window = [0f64; 32];
        let (mut total, mut at) = (0f64, 0);
        while at < chunks {
            let n = window.len().min(chunks - at);
            self.sq_norm_chunks(buf, at, &mut window[..n])?;
            total = window[..n].iter().fold(total, |acc, &x| acc + x);
            at += n;
        }
        Ok(total)
    }

    /// One tensor's whole step. The default composes the primitives (three or four passes);
    /// override it with a single fused pass.
    fn fused_step<P: Element, S: Element>(
        &mut self,
        t: TensorMut<'_, Self, P, S>,
        k: &Coeffs,
    ) -> Result<(), Self::Error> {
        composed_step(self, t, k)
    }

    /// Squared gradient norms of many tensors, written into each tensor's slot
    /// ([`ParamTensor::grad_sq_norm`]); each must equal [`sq_norm`](Self::sq_norm) of the
    /// gradient bit for bit. Override to reduce them all in one launch.
    fn grad_sq_norms<P: Element, S: Element>(
        &mut self,
        tensors: &mut [ParamTensor<'_, Self, P, S>],
    ) -> Result<(), Self::Error> {
        for t in tensors.iter_mut() {
            t.sq_norm = self.sq_norm(t.grad)?;
        }
        Ok(())
    }

    /// Every chunk partial of every tensor's gradient, back to back in tensor order (`out`
    /// holds exactly `Σ chunk_count(len)` slots). Override to compute them in one launch.
    fn grad_norm_partials<P: Element, S: Element>(
        &mut self,
        tensors: &[ParamTensor<'_, Self, P, S>],
        out: &mut [f64],
    ) -> Result<(), Self::Error> {
        let mut at = 0;
        for t in tensors {
            let n = chunk_count(self.len(t.grad));
            self.sq_norm_chunks(t.grad, 0, &mut out[at..at + n])?;
            at += n;
        }
        Ok(())
    }

    /// Steps many tensors, each with its own coefficients ([`ParamTensor::coeffs`]).
    /// Override to step them in one launch or across threads. The driver advances the
    /// tensors' step counts afterwards; backends leave them alone. A backend that can count the
    /// updated parameters that are NaN or ±Inf while it stores them records the count with
    /// [`ParamTensor::set_non_finite`]; the step's report then names the first such tensor.
    fn step_tensors<P: Element, S: Element>(
        &mut self,
        tensors: &mut [ParamTensor<'_, Self, P, S>],
    ) -> Result<(), Self::Error> {
        for t in tensors.iter_mut() {
            let k = t.coeffs;
            self.fused_step(t.view(), &k)?;
        }
        Ok(())
    }
}

/// The buffers of one tensor's step.
pub struct TensorMut<'a, B: Backend + ?Sized, P: Element, S: Element> {
    /// Parameter θ, updated in place.
    pub param: &'a mut B::Buf<P>,
    /// Gradient (read only).
    pub grad: &'a B::Buf<P>,
    /// First moment / momentum buffer.
    pub m: Option<&'a mut B::Buf<S>>,
    /// Second moment / Adamax infinity norm.
    pub v: Option<&'a mut B::Buf<S>>,
    /// SAGE's smoothed sensitivity Ī.
    pub ibar: Option<&'a mut B::Buf<S>>,
}

/// The buffers [`Backend::apply`] reads and writes.
pub struct ApplyArgs<'a, B: Backend + ?Sized, P: Element, S: Element> {
    /// Parameter θ, updated in place.
    pub param: &'a mut B::Buf<P>,
    /// Gradient.
    pub grad: &'a B::Buf<P>,
    /// First moment, already advanced.
    pub m: Option<&'a B::Buf<S>>,
    /// Second moment / infinity norm, already advanced.
    pub v: Option<&'a B::Buf<S>>,
    /// Ī, already advanced.
    pub ibar: Option<&'a B::Buf<S>>,
}

/// The composed step: each present state buffer advanced by [`Backend::accumulate`], then
/// [`Backend::apply`]. The default body of [`Backend::fused_step`], public so that the
/// conformance suite can compare a backend's fused step with it.
pub fn composed_step<B: Backend + ?Sized, P: Element, S: Element>(
    b: &mut B,
    t: TensorMut<'_, B, P, S>,
    k: &Coeffs,
) -> Result<(), B::Error> {
    let TensorMut {
        param,
        grad,
        mut m,
        mut v,
        mut ibar,
    } = t;
    // Ī first: every pass reads θ before the update, which only `apply` writes.
    if let Some(ib) = ibar.as_deref_mut() {
        b.accumulate(Accumulate::Sensitivity, ib, param, grad, k)?;
    }
    if let Some(m) = m.as_deref_mut() {
        b.accumulate(Accumulate::Moment, m, param, grad, k)?;
    }
    if let Some(v) = v.as_deref_mut() {
        let which = if k.kind == kind::ADAMAX {
            Accumulate::InfNorm
        } else {
            Accumulate::SecondMoment
        };
        b.accumulate(which, v, param, grad, k)?;
    }
    b.apply(
        ApplyArgs {
            param,
            grad,
            m: m.map(|x| &*x),
            v: v.map(|x| &*x),
            ibar: ibar.map(|x| &*x),
        },
        k,
    )
}

/// Read-only state buffers `(m, v, ibar)` of a [`ParamTensor`].
pub type StateRefs<'s, X> = (Option<&'s X>, Option<&'s X>, Option<&'s X>);

/// One parameter tensor of a step: its buffers, its state (with its own step count), its
/// group, an optional name for errors, and the per-step slots the optimizer fills
/// ([`coeffs`](Self::coeffs), the gradient norm).
///
/// A tensor with no gradient at a step is simply left out of that step: its parameters, state
/// and count stay as they are.
///
/// ```
/// use sage_core::{ParamTensor, TensorState, Config, Algorithm};
/// # use sage_core::{Backend, Coeffs, Accumulate, ApplyArgs, Element, Infallible};
/// # struct Cpu;
/// # impl Backend for Cpu {
/// #   type Error = Infallible; type Buf<E: Element> = [E];
/// #   fn len<E: Element>(&self, b: &[E]) -> usize { b.len() }
/// #   fn sq_norm_chunks<E: Element>(&mut self, _: &[E], _: usize, o: &mut [f64]) -> Result<(), Infallible> { o.fill(0.0); Ok(()) }
/// #   fn accumulate<P: Element, S: Element>(&mut self, _: Accumulate, _: &mut [S], _: &[P], _: &[P], _: &Coeffs) -> Result<(), Infallible> { Ok(()) }
/// #   fn apply<P: Element, S: Element>(&mut self, _: ApplyArgs<'_, Self, P, S>, _: &Coeffs) -> Result<(), Infallible> { Ok(()) }
/// # }
/// let cfg = Config::reference(Algorithm::adamw(), 2e-5);
/// let (mut w, g) = (vec![0.5f32; 4], vec![0.1f32; 4]);
/// let mut state = TensorState::new(cfg.state_layout(true), || vec![0f32; 4]);
/// let t = ParamTensor::<Cpu, f32, f32>::new(&mut w[..], &g[..], state.view())
///     .name("layer0.weight")
///     .group(1);
/// assert_eq!(t.group_index(), 1);
/// ```
pub struct ParamTensor<'a, B: Backend + ?Sized, P: Element, S: Element> {
    pub(crate) name: Option<&'a str>,
    pub(crate) group: usize,
    pub(crate) param: &'a mut B::Buf<P>,
    pub(crate) grad: &'a B::Buf<P>,
    pub(crate) state: StateMut<'a, B::Buf<S>>,
    pub(crate) coeffs: Coeffs,
    pub(crate) sq_norm: f64,
    pub(crate) non_finite: Option<u64>,
}

impl<'a, B: Backend + ?Sized, P: Element, S: Element> ParamTensor<'a, B, P, S> {
    /// A parameter of group 0 with its gradient and its state.
    pub fn new(
        param: &'a mut B::Buf<P>,
        grad: &'a B::Buf<P>,
        state: StateMut<'a, B::Buf<S>>,
    ) -> Self {
        ParamTensor {
            name: None,
            group: 0,
            param,
            grad,
            state,
            coeffs: Coeffs::default(),
            sq_norm: 0.0,
            non_finite: None,
        }
    }
    /// Names it (errors quote the name).
    pub fn name(mut self, name: &'a str) -> Self {
        self.name = Some(name);
        self
    }
    /// Puts it in group `g`.
    pub fn group(mut self, g: usize) -> Self {
        self.group = g;
        self
    }

    /// The group index.
    pub fn group_index(&self) -> usize {
        self.group
    }
    /// The name, if one was given.
    pub fn name_str(&self) -> Option<&'a str> {
        self.name
    }
    /// Updates applied to this tensor so far (its own count).
    pub fn steps(&self) -> u64 {
        *self.state.step
    }
    /// This step's coefficients (set by the optimizer before it calls the backend).
    pub fn coeffs(&self) -> &Coeffs {
        &self.coeffs
    }
    /// Sets this tensor's coefficients (for backends and tests that drive steps directly).
    pub fn set_coeffs(&mut self, k: Coeffs) {
        self.coeffs = k;
    }
    /// The gradient's squared norm, once [`Backend::grad_sq_norms`] filled it.
    pub fn grad_sq_norm(&self) -> f64 {
        self.sq_norm
    }
    /// Records the gradient's squared norm (for [`Backend::grad_sq_norms`] overrides).
    pub fn set_grad_sq_norm(&mut self, x: f64) {
        self.sq_norm = x;
    }
    /// How many elements of the updated parameters are NaN or ±Inf, when the backend counted
    /// them in its update pass (`None`: not counted).
    pub fn non_finite(&self) -> Option<u64> {
        self.non_finite
    }
    /// Records how many updated parameters are not finite (for backends that count them while
    /// storing θ — no extra pass over memory).
    pub fn set_non_finite(&mut self, n: u64) {
        self.non_finite = Some(n);
    }
    /// The parameter buffer.
    pub fn param(&self) -> &B::Buf<P> {
        self.param
    }
    /// The gradient buffer.
    pub fn grad(&self) -> &'a B::Buf<P> {
        self.grad
    }
    /// The state buffers `(m, v, ibar)`, read only.
    pub fn state(&self) -> StateRefs<'_, B::Buf<S>> {
        (
            self.state.m.as_deref(),
            self.state.v.as_deref(),
            self.state.ibar.as_deref(),
        )
    }
    /// Reborrows the buffers for one step together with this step's coefficients, for a
    /// backend that keeps both while it steps (no copy of the coefficients per tensor).
    pub fn view_and_coeffs(&mut self) -> (TensorMut<'_, B, P, S>, &Coeffs) {
        let view = TensorMut {
            param: &mut *self.param,
            grad: self.grad,
            m: self.state.m.as_deref_mut(),
            v: self.state.v.as_deref_mut(),
            ibar: self.state.ibar.as_deref_mut(),
        };
        (view, &self.coeffs)
    }
    /// Reborrows the buffers for one step.
    pub fn view(&mut self) -> TensorMut<'_, B, P, S> {
        self.view_and_coeffs().0
    }
}
