//! The CUDA path: candle CUDA tensors stepped in place by sage-cuda on candle's own stream.
//! (candle 0.9 and sage-cuda share cudarc 0.19, so candle's `CudaSlice` is sage-cuda's buffer.)

use candle_core::{CpuStorage, CudaStorage, InplaceOp1, Layout, Result, Storage, Tensor};
use sage_core::{Optimizer as Driver, ParamGroup, ParamTensor, StepReport, TensorState};
use sage_cuda::cudarc::driver::CudaSlice;
use sage_cuda::Cuda;

use super::{sage_err, with_slices_mut, Nest, Slot, State};

impl InplaceOp1 for Nest<'_, '_, CudaSlice<f32>> {
    fn name(&self) -> &'static str {
        "sage-step"
    }
    fn cpu_fwd(&self, _: &mut CpuStorage, _: &Layout) -> Result<()> {
        Err(sage_err("a CPU parameter under the CUDA engine"))
    }
    fn cuda_fwd(&self, storage: &mut CudaStorage, layout: &Layout) -> Result<()> {
        let n = layout.shape().elem_count();
        let s = storage.as_cuda_slice_mut::<f32>()?;
        // sage-cuda steps whole buffers: the variable must be its whole storage.
        if !layout.is_contiguous() || layout.start_offset() != 0 || s.len() != n {
            return Err(sage_err("parameter is a view, not its whole storage"));
        }
        self.descend(s as *mut CudaSlice<f32>)
    }
}

pub(crate) fn step(
    driver: &mut Driver<Cuda, Vec<ParamGroup>>,
    slots: &mut [Slot],
    chosen: &[bool],
    params: &[Tensor],
    grads: &[Tensor],
) -> Result<StepReport> {
    let guards: Vec<_> = grads.iter().map(|g| g.storage_and_layout()).collect();
    let mut gs: Vec<&CudaSlice<f32>> = Vec::with_capacity(guards.len());
    for (s, l) in &guards {
        let Storage::Cuda(cs) = &**s else {
            return Err(sage_err("a gradient is not on the CUDA device"));
        };
        let g = cs.as_cuda_slice::<f32>()?;
        if g.len() != l.shape().elem_count() {
            return Err(sage_err("gradient is a view, not its whole storage"));
        }
        gs.push(g);
    }
    let mut states: Vec<(&str, usize, &mut TensorState<CudaSlice<f32>>)> = slots
        .iter_mut()
        .zip(chosen)
        .filter(|(_, c)| **c)
        .map(|(s, _)| match &mut s.state {
            State::Cuda(c) => (s.name.as_str(), s.group, c),
            State::Cpu(_) => unreachable!("CPU state under the CUDA engine"),
        })
        .collect();
    let mut out = None;
    let mut body = |ps: &mut [&mut CudaSlice<f32>]| -> Result<()> {
        let mut ts: Vec<ParamTensor<'_, Cuda, f32, f32>> = ps
            .iter_mut()
            .zip(states.iter_mut())
            .zip(&gs)
            .map(|((p, (name, group, st)), g)| {
                ParamTensor::new(&mut **p, *g, st.view())
                    .name(name)
                    .group(*group)
            })
            .collect();
        out = Some(driver.step(&mut ts).map_err(sage_err)?);
        Ok(())
    };
    with_slices_mut::<CudaSlice<f32>>(params, &mut body)?;
    out.ok_or_else(|| sage_err("no step ran"))
}
