//! Owning optimizer state for CPU tensors (needs an allocator).

use alloc::vec;
use alloc::vec::Vec;
use sage_core::{Element, ParamTensor, StateLayout};

use crate::Cpu;

/// The state buffers of one parameter tensor, allocated for a [`StateLayout`].
///
/// ```
/// use sage_core::{Algorithm, Config};
/// use sage_cpu::CpuState;
/// let cfg = Config::paper(Algorithm::adam(), 1e-3);
/// let st = CpuState::<f32>::new(cfg.state_layout(true), 10);
/// assert_eq!(st.bytes(), 3 * 10 * 4);
/// ```
#[derive(Clone, Debug, PartialEq, Default)]
pub struct CpuState<S: Element> {
    /// First moment / momentum buffer.
    pub m: Option<Vec<S>>,
    /// Second moment / Adamax infinity norm.
    pub v: Option<Vec<S>>,
    /// SAGE's Ī.
    pub ibar: Option<Vec<S>>,
}

impl<S: Element> CpuState<S> {
    /// Zeroed buffers of `len` elements for every buffer `layout` asks for.
    pub fn new(layout: StateLayout, len: usize) -> Self {
        let z = |on: bool| on.then(|| vec![S::default(); len]);
        CpuState {
            m: z(layout.m),
            v: z(layout.v),
            ibar: z(layout.ibar),
        }
    }

    /// Bytes of state held.
    pub fn bytes(&self) -> usize {
        [&self.m, &self.v, &self.ibar]
            .iter()
            .map(|b| {
                b.as_ref()
                    .map_or(0, |b| b.len() * core::mem::size_of::<S>())
            })
            .sum()
    }

    /// A step slot for `param` and `grad` with this state attached.
    pub fn tensor<'a, P: Element>(
        &'a mut self,
        param: &'a mut [P],
        grad: &'a [P],
    ) -> ParamTensor<'a, Cpu, P, S> {
        ParamTensor::new(param, grad).state(
            self.m.as_deref_mut(),
            self.v.as_deref_mut(),
            self.ibar.as_deref_mut(),
        )
    }
}
