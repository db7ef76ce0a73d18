//! The per-tensor optimizer state — `m`, `v`, `Ī` and the tensor's own step count — as one
//! type that the driver, the backends, checkpoints, the conformance suite and the framework
//! adapters share, and the one check that a tensor's state fits the configuration.
//!
//! [`TensorState<T>`] owns (or holds handles to) the buffers: `TensorState<Vec<f32>>` on the
//! host, `TensorState<CudaSlice<f32>>` on a GPU, `TensorState<&'static mut [f32]>` on a
//! microcontroller. A step borrows it as a [`StateMut`] (the same type with borrowed fields).

use core::borrow::BorrowMut;

use crate::error::ParamProblem;

/// One of the three state buffers.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Buffer {
    /// First moment (Adam family) or SGD's momentum buffer.
    M,
    /// Second moment (Adam) or Adamax's infinity norm `u`.
    V,
    /// SAGE's smoothed sensitivity Ī.
    Ibar,
}

impl Buffer {
    /// The three buffers, in the order every layer stores them.
    pub const ALL: [Buffer; 3] = [Buffer::M, Buffer::V, Buffer::Ibar];

    /// Its position in [`ALL`](Self::ALL).
    pub const fn index(self) -> usize {
        self as usize
    }

    /// The buffer's name everywhere (errors, checkpoint keys): `m`, `v`, `ibar`.
    pub const fn name(self) -> &'static str {
        match self {
            Buffer::M => "m",
            Buffer::V => "v",
            Buffer::Ibar => "ibar",
        }
    }
}

impl core::fmt::Display for Buffer {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str(self.name())
    }
}

/// Which state buffers a parameter needs: `m` (first moment, or SGD's momentum buffer),
/// `v` (second moment, or Adamax's infinity norm `u`), `ibar` (SAGE's Ī).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct StateLayout {
    /// First moment / momentum buffer.
    pub m: bool,
    /// Second moment / infinity norm.
    pub v: bool,
    /// Smoothed sensitivity Ī.
    pub ibar: bool,
}

impl StateLayout {
    /// Number of state buffers.
    pub const fn buffers(&self) -> usize {
        self.m as usize + self.v as usize + self.ibar as usize
    }

    /// Whether `b` is needed.
    pub const fn needs(&self, b: Buffer) -> bool {
        match b {
            Buffer::M => self.m,
            Buffer::V => self.v,
            Buffer::Ibar => self.ibar,
        }
    }

    /// Bytes of optimizer state per parameter with state stored as `state`.
    ///
    /// ```
    /// use sage_core::{Algorithm, Config, DType};
    /// let adam = Config::paper(Algorithm::adam(), 1e-3);
    /// assert_eq!(adam.state_layout(true).bytes_per_param(DType::F32), 12); // m, v, Ī
    /// assert_eq!(adam.state_layout(false).bytes_per_param(DType::Bf16), 4); // m, v
    /// ```
    pub const fn bytes_per_param(&self, state: crate::DType) -> usize {
        self.buffers() * state.size()
    }

    /// The needed-vs-given check, written once for every layer: `given(b)` is the length of
    /// buffer `b` when it is present. Every needed buffer must be present with `len`
    /// elements, and no other buffer may be given. `needed_by` names the base algorithm in the
    /// error (SAGE's own buffer says `SAGE`).
    pub fn check(
        &self,
        len: usize,
        needed_by: &'static str,
        mut given: impl FnMut(Buffer) -> Option<usize>,
    ) -> Result<(), ParamProblem> {
        for b in Buffer::ALL {
            match (self.needs(b), given(b)) {
                (true, None) => {
                    return Err(ParamProblem::MissingState {
                        buffer: b.name(),
                        needed_by: if b == Buffer::Ibar { "SAGE" } else { needed_by },
                    })
                }
                (false, Some(_)) => return Err(ParamProblem::UnexpectedState { buffer: b.name() }),
                (true, Some(n)) if n != len => {
                    return Err(ParamProblem::StateLength {
                        buffer: b.name(),
                        param: len,
                        state: n,
                    })
                }
                _ => {}
            }
        }
        Ok(())
    }
}

/// The optimizer state of one tensor: its buffers (each present only when the configuration
/// needs it, see [`StateLayout`]) and its own step count (updates applied to it so far).
///
/// `T` is whatever holds a buffer (a `Vec<f32>`, a device buffer, a `&mut [bf16]`); `N` holds
/// the count (`u64` when owned, `&mut u64` in a [`StateMut`]).
///
/// ```
/// use sage_core::{Algorithm, Config, TensorState};
/// let cfg = Config::reference(Algorithm::adamw(), 2e-5);
/// let mut state = TensorState::new(cfg.state_layout(true), || vec![0f32; 8]);
/// assert!(state.m.is_some() && state.v.is_some() && state.ibar.is_some());
/// assert_eq!(state.step, 0);
/// let view = state.view::<[f32]>(); // what a step borrows
/// assert_eq!(*view.step, 0);
/// ```
#[derive(Clone, Debug, Default, PartialEq)]
pub struct TensorState<T, N = u64> {
    /// First moment / momentum buffer.
    pub m: Option<T>,
    /// Second moment / infinity norm.
    pub v: Option<T>,
    /// Smoothed sensitivity Ī.
    pub ibar: Option<T>,
    /// Updates applied to this tensor so far: its next update is `step + 1`. A tensor absent
    /// from a step keeps its count (SAGE.md, "Step counts").
    pub step: N,
}

/// A step's borrow of one tensor's [`TensorState`].
pub type StateMut<'a, X> = TensorState<&'a mut X, &'a mut u64>;

impl<T, N> TensorState<T, N> {
    /// The buffer `b`, if present.
    pub fn get(&self, b: Buffer) -> Option<&T> {
        match b {
            Buffer::M => self.m.as_ref(),
            Buffer::V => self.v.as_ref(),
            Buffer::Ibar => self.ibar.as_ref(),
        }
    }

    /// The buffer `b`, mutably, if present.
    pub fn get_mut(&mut self, b: Buffer) -> Option<&mut T> {
        match b {
            Buffer::M => self.m.as_mut(),
            Buffer::V => self.v.as_mut(),
            Buffer::Ibar => self.ibar.as_mut(),
        }
    }

    /// Which buffers are present.
    pub fn layout(&self) -> StateLayout {
        StateLayout {
            m: self.m.is_some(),
            v: self.v.is_some(),
            ibar: self.ibar.is_some(),
        }
    }

    /// Checks the buffers against `layout` for a tensor of `len` elements, measuring each
    /// buffer with `buf_len` ([`StateLayout::check`]).
    pub fn check(
        &self,
        layout: StateLayout,
        len: usize,
        needed_by: &'static str,
        buf_len: impl Fn(&T) -> usize,
    ) -> Result<(), ParamProblem> {
        layout.check(len, needed_by, |b| self.get(b).map(&buf_len))
    }
}

impl<T> TensorState<T> {
    /// Fresh state (count 0) with a buffer from `make` for each buffer `layout` needs.
    pub fn new(layout: StateLayout, mut make: impl FnMut() -> T) -> Self {
        let mut s = TensorState {
            m: None,
            v: None,
            ibar: None,
            step: 0,
        };
        for b in Buffer::ALL {
            if layout.needs(b) {
                *s.slot(b) = Some(make());
            }
        }
        s
    }

    /// [`new`](Self::new) with a fallible `make` (device allocation), told which buffer it makes.
    pub fn try_new<E>(
        layout: StateLayout,
        mut make: impl FnMut(Buffer) -> Result<T, E>,
    ) -> Result<Self, E> {
        let mut s = TensorState {
            m: None,
            v: None,
            ibar: None,
            step: 0,
        };
        for b in Buffer::ALL {
            if layout.needs(b) {
                *s.slot(b) = Some(make(b)?);
            }
        }
        Ok(s)
    }

    fn slot(&mut self, b: Buffer) -> &mut Option<T> {
        match b {
            Buffer::M => &mut self.m,
            Buffer::V => &mut self.v,
            Buffer::Ibar => &mut self.ibar,
        }
    }

    /// Borrows the state for one step: `X` is the backend's buffer type (`[f32]`, a device
    /// buffer), which `T` must borrow as.
    pub fn view<X: ?Sized>(&mut self) -> StateMut<'_, X>
    where
        T: BorrowMut<X>,
    {
        TensorState {
            m: self.m.as_mut().map(|b| b.borrow_mut()),
            v: self.v.as_mut().map(|b| b.borrow_mut()),
            ibar: self.ibar.as_mut().map(|b| b.borrow_mut()),
            step: &mut self.step,
        }
    }

    /// The same state with every buffer mapped by `f` (e.g. uploaded to a device).
    pub fn try_map<U, E>(
        self,
        mut f: impl FnMut(Buffer, T) -> Result<U, E>,
    ) -> Result<TensorState<U>, E> {
        Ok(TensorState {
            m: self.m.map(|x| f(Buffer::M, x)).transpose()?,
            v: self.v.map(|x| f(Buffer::V, x)).transpose()?,
            ibar: self.ibar.map(|x| f(Buffer::Ibar, x)).transpose()?,
            step: self.step,
        })
    }
}

#[cfg(feature = "alloc")]
impl<S: crate::Element> TensorState<alloc::vec::Vec<S>> {
    /// Host state of a tensor of `len` elements: a zeroed `Vec` for every buffer `layout`
    /// needs, count 0.
    ///
    /// ```
    /// use sage_core::{Algorithm, Config, TensorState};
    /// let cfg = Config::paper(Algorithm::adam(), 1e-3);
    /// let st = TensorState::<Vec<f32>>::zeros(cfg.state_layout(true), 10);
    /// assert_eq!(st.bytes(), 3 * 10 * 4);
    /// ```
    pub fn zeros(layout: StateLayout, len: usize) -> Self {
        Self::new(layout, || alloc::vec![S::default(); len])
    }

    /// Bytes of state held.
    pub fn bytes(&self) -> usize {
        Buffer::ALL
            .iter()
            .filter_map(|&b| self.get(b))
            .map(|b| b.len() * core::mem::size_of::<S>())
            .sum()
    }
}
