//! [`SageState`]: one parameter's SAGE state inside burn — sage-core's `TensorState` (`m`, `v`,
//! `Ī`, the parameter's own step count) kept on the host, recorded through burn's
//! [`RecordState`] as named tensors and scalars.

use burn::optim::{RecordState, StateSink, StateSource};
use burn::tensor::{DType, Device, TensorData};
use burn_pack::Scalar;
use sage_core::{bf16, Buffer, StateLayout, TensorState};

/// A parameter's state buffers, in the optimizer's state type.
#[derive(Clone, Debug, PartialEq)]
pub enum HostState {
    /// f32 buffers.
    F32(TensorState<Vec<f32>>),
    /// bf16 buffers (half the memory; arithmetic stays f32).
    Bf16(TensorState<Vec<bf16>>),
}

impl HostState {
    /// Fresh state (count 0) of `len` elements of `dtype` (`F32` or `BF16`).
    pub fn zeros(layout: StateLayout, len: usize, dtype: sage_core::DType) -> Self {
        match dtype {
            sage_core::DType::Bf16 => HostState::Bf16(TensorState::zeros(layout, len)),
            _ => HostState::F32(TensorState::zeros(layout, len)),
        }
    }

    /// The parameter's own step count.
    pub fn steps(&self) -> u64 {
        match self {
            HostState::F32(s) => s.step,
            HostState::Bf16(s) => s.step,
        }
    }

    /// Which buffers are present.
    pub fn layout(&self) -> StateLayout {
        match self {
            HostState::F32(s) => s.layout(),
            HostState::Bf16(s) => s.layout(),
        }
    }

    /// The storage type.
    pub fn dtype(&self) -> sage_core::DType {
        match self {
            HostState::F32(_) => sage_core::DType::F32,
            HostState::Bf16(_) => sage_core::DType::Bf16,
        }
    }

    /// Buffer `b` widened to f32, if present.
    pub fn read_f32(&self, b: Buffer) -> Option<Vec<f32>> {
        match self {
            HostState::F32(s) => s.get(b).cloned(),
            HostState::Bf16(s) => s.get(b).map(|v| v.iter().map(|x| x.to_f32()).collect()),
        }
    }

    /// Bytes held.
    pub fn bytes(&self) -> usize {
        match self {
            HostState::F32(s) => s.bytes(),
            HostState::Bf16(s) => s.bytes(),
        }
    }
}

/// One parameter's state in burn's per-tensor optimizer contract (`Optimizer::State<D>`): the
/// buffers and count on the host, the parameter's shape, and the index of its SAGE group.
///
/// Recorded by burn (`ModuleOptimizer::to_record`, burn's `Learner` checkpoints) as the tensors
/// `{id}.m`, `{id}.v`, `{id}.ibar` (those present, in the state's type, of the parameter's
/// shape) and the scalars `{id}.step` and `{id}.group`.
#[derive(Clone, Debug, PartialEq)]
pub struct SageState<const D: usize> {
    /// The buffers and the count.
    pub state: HostState,
    /// The parameter's shape.
    pub shape: [usize; D],
    /// Its SAGE group.
    pub group: usize,
}

impl<const D: usize> RecordState for SageState<D> {
    fn state_flatten(&self, prefix: &str, out: &mut StateSink) {
        for b in Buffer::ALL {
            let data = match &self.state {
                HostState::F32(s) => s.get(b).map(|v| TensorData::new(v.clone(), self.shape)),
                HostState::Bf16(s) => s.get(b).map(|v| TensorData::new(v.clone(), self.shape)),
            };
            if let Some(d) = data {
                out.push_tensor(prefix, b.name(), d);
            }
        }
        out.push_scalar(prefix, "step", Scalar::from(self.state.steps()));
        out.push_scalar(prefix, "group", Scalar::from(self.group));
    }

    /// Rebuilds the state; `None` (burn then starts the parameter afresh) when the count or
    /// group is missing, a buffer is not of rank `D`, the buffers disagree in shape or type, or
    /// their type is neither f32 nor bf16.
    fn state_unflatten(prefix: &str, src: &mut StateSource, _device: &Device) -> Option<Self> {
        let (state, shape, group) = unflatten(prefix, src)?;
        let shape: [usize; D] = match shape {
            Some(s) => s.as_slice().try_into().ok()?,
            // No buffer (plain SGD without momentum): the shape is not recorded, nor needed.
            None => [0; D],
        };
        Some(SageState {
            state,
            shape,
            group,
        })
    }
}

/// A parameter's state from a record under `prefix`: the state, its buffers' shape (`None`
/// when it has none), its group.
pub(crate) fn unflatten(
    prefix: &str,
    src: &mut StateSource,
) -> Option<(HostState, Option<Vec<usize>>, usize)> {
    let step = u64::try_from(src.take_scalar(prefix, "step")?).ok()?;
    let group = usize::try_from(src.take_scalar(prefix, "group")?).ok()?;
    let mut bufs: [Option<TensorData>; 3] = Default::default();
    for b in Buffer::ALL {
        bufs[b.index()] = src.take_tensor(prefix, b.name());
    }
    let first = bufs.iter().flatten().next();
    let shape = first.map(|d| d.shape().as_slice().to_vec());
    let dtype = first.map_or(DType::F32, |d| d.dtype());
    if bufs
        .iter()
        .flatten()
        .any(|d| Some(d.shape().as_slice()) != shape.as_deref() || d.dtype() != dtype)
    {
        return None;
    }
    macro_rules! build {
        ($t:ty, $variant:ident) => {{
            let mut s = TensorState::<Vec<$t>>::new(StateLayout::default(), Vec::new);
            for b in Buffer::ALL {
                if let Some(d) = &bufs[b.index()] {
                    *slot(&mut s, b) = Some(d.as_slice::<$t>().ok()?.to_vec());
                }
            }
            s.step = step;
            HostState::$variant(s)
        }};
    }
    let state = match dtype {
        DType::F32 => build!(f32, F32),
        DType::BF16 => build!(bf16, Bf16),
        _ => return None,
    };
    Some((state, shape, group))
}

fn slot<T>(s: &mut TensorState<T>, b: Buffer) -> &mut Option<T> {
    match b {
        Buffer::M => &mut s.m,
        Buffer::V => &mut s.v,
        Buffer::Ibar => &mut s.ibar,
    }
}
