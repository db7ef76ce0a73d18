//! [`Entry`] and [`EntryMut`]: a parameter's name, its tensors and state, to save or restore;
//! [`Slot`], which of them a stored tensor is.

use super::*;

/// One stored tensor of a parameter: θ, or one of its state buffers.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Slot {
    /// The parameter θ itself (optional: frameworks often save weights elsewhere).
    Param,
    /// A state buffer: `m`, `v` or `ibar` ([`Buffer`]).
    State(Buffer),
}

impl Slot {
    /// θ and the three state buffers, in the order the index lists them.
    pub const ALL: [Slot; 4] = [
        Slot::Param,
        Slot::State(Buffer::M),
        Slot::State(Buffer::V),
        Slot::State(Buffer::Ibar),
    ];

    /// Name in the index: `param`, or the buffer's [`Buffer::name`] (`m`, `v`, `ibar`).
    pub const fn name(self) -> &'static str {
        match self {
            Slot::Param => "param",
            Slot::State(b) => b.name(),
        }
    }

    pub(super) fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|b| b.name() == s)
    }

    /// The safetensors key of this slot of parameter `name`: the name itself for θ (so the
    /// file also reads as model weights), `{name}.m`, `{name}.v`, `{name}.ibar` for state (the
    /// names sage-candle uses).
    pub fn key(self, name: &str) -> String {
        match self {
            Slot::Param => name.to_string(),
            Slot::State(b) => format!("{name}.{}", b.name()),
        }
    }
}

impl From<Buffer> for Slot {
    fn from(b: Buffer) -> Self {
        Slot::State(b)
    }
}

/// A parameter to save: its name, group, optional shape, optional θ, and its
/// [`TensorState`] — the state buffers its group's layout has, and its own step count.
///
/// ```
/// use sage_checkpoint::Entry;
/// use sage_core::{Algorithm, Config, TensorState};
/// use sage_cpu::Cpu;
/// let cfg = Config::reference(Algorithm::adamw(), 2e-5);
/// let mut state = TensorState::new(cfg.state_layout(true), || vec![0f32; 6]);
/// state.step = 41;
/// let e = Entry::<Cpu, f32, f32>::new("layer0.weight", &state).shape(&[2, 3]);
/// assert_eq!((e.name, e.state.step), ("layer0.weight", 41));
/// ```
pub struct Entry<'a, B: Backend + ?Sized, P: Element, S: Element> {
    /// Stable parameter name (the key in the file).
    pub name: &'a str,
    /// Parameter group index.
    pub group: usize,
    /// Shape (default: one dimension of the parameter's length).
    pub shape: Option<&'a [usize]>,
    /// θ, when the checkpoint should carry it.
    pub param: Option<&'a B::Buf<P>>,
    /// The state buffers (borrowed) and the tensor's step count.
    pub state: TensorState<&'a B::Buf<S>>,
}

impl<'a, B: Backend + ?Sized, S: Element> Entry<'a, B, S, S> {
    /// An entry named `name`, group 0, saving `state`: whatever holds the backend's buffers —
    /// the owned `TensorState<B::Owned<S>>` a training loop keeps, a `StateMut` a step
    /// borrowed, or a `TensorState` of references.
    pub fn new<T: Borrow<B::Buf<S>>, N: Borrow<u64>>(
        name: &'a str,
        state: &'a TensorState<T, N>,
    ) -> Self {
        Entry {
            name,
            group: 0,
            shape: None,
            param: None,
            state: TensorState {
                m: state.m.as_ref().map(Borrow::borrow),
                v: state.v.as_ref().map(Borrow::borrow),
                ibar: state.ibar.as_ref().map(Borrow::borrow),
                step: *state.step.borrow(),
            },
        }
    }
}

impl<'a, B: Backend + ?Sized, P: Element, S: Element> Entry<'a, B, P, S> {
    /// Sets the group.
    pub fn group(mut self, g: usize) -> Self {
        self.group = g;
        self
    }
    /// Sets the shape (its product must be the parameter's length).
    pub fn shape(mut self, shape: &'a [usize]) -> Self {
        self.shape = Some(shape);
        self
    }
    /// Saves θ too (of any storage type).
    pub fn param<Q: Element>(self, p: &'a B::Buf<Q>) -> Entry<'a, B, Q, S> {
        Entry {
            name: self.name,
            group: self.group,
            shape: self.shape,
            param: Some(p),
            state: self.state,
        }
    }
}

/// A parameter to restore into; the mutable twin of [`Entry`]. Its state is the
/// [`StateMut`] a step takes (`state.view()`): restoring writes every buffer and sets the
/// tensor's step count.
///
/// ```
/// use sage_checkpoint::EntryMut;
/// use sage_core::{Algorithm, Config, TensorState};
/// use sage_cpu::Cpu;
/// let cfg = Config::reference(Algorithm::adamw(), 2e-5);
/// let mut state = TensorState::new(cfg.state_layout(true), || vec![0f32; 6]);
/// let e = EntryMut::<Cpu, f32, f32>::new("layer0.weight", state.view()).shape(&[2, 3]);
/// assert_eq!(e.name, "layer0.weight");
/// ```
pub struct EntryMut<'a, B: Backend + ?Sized, P: Element, S: Element> {
    /// Stable parameter name.
    pub name: &'a str,
    /// Parameter group index (must equal the checkpoint's).
    pub group: usize,
    /// Shape to check against the file (default: only the length is checked).
    pub shape: Option<&'a [usize]>,
    /// θ, when it should be restored (then the checkpoint must hold it).
    pub param: Option<&'a mut B::Buf<P>>,
    /// The state buffers to fill, and the step count to set.
    pub state: StateMut<'a, B::Buf<S>>,
}

impl<'a, B: Backend + ?Sized, S: Element> EntryMut<'a, B, S, S> {
    /// An entry named `name`, group 0, restoring into `state`.
    pub fn new(name: &'a str, state: StateMut<'a, B::Buf<S>>) -> Self {
        EntryMut {
            name,
            group: 0,
            shape: None,
            param: None,
            state,
        }
    }
}

impl<'a, B: Backend + ?Sized, P: Element, S: Element> EntryMut<'a, B, P, S> {
    /// Sets the group.
    pub fn group(mut self, g: usize) -> Self {
        self.group = g;
        self
    }
    /// Sets the shape to check.
    pub fn shape(mut self, shape: &'a [usize]) -> Self {
        self.shape = Some(shape);
        self
    }
    /// Restores θ too.
    pub fn param<Q: Element>(self, p: &'a mut B::Buf<Q>) -> EntryMut<'a, B, Q, S> {
        EntryMut {
            name: self.name,
            group: self.group,
            shape: self.shape,
            param: Some(p),
            state: self.state,
        }
    }
}
