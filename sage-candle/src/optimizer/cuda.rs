//! The CUDA path: candle CUDA tensors stepped in place by sage-cuda on candle's own stream.
//! (candle 0.9 and sage-cuda share cudarc 0.19, so candle's `CudaSlice` is sage-cuda's buffer.)

use candle_core::cuda_backend::CudaStorageSlice;
use candle_core::{CudaStorage, Layout, Result, Storage};
use sage_cuda::Cuda;

use super::{sage_err, GradRef, Lender, Raw};

/// CUDA tensors as `CudaSlice`s, for sage-cuda.
pub(crate) struct CudaLender;

/// sage-cuda steps whole buffers: a tensor must be its whole storage.
fn whole(layout: &Layout, len: usize, what: &str) -> Result<()> {
    let n = layout.shape().elem_count();
    if !layout.is_contiguous() || layout.start_offset() != 0 || len != n {
        return Err(sage_err(format!("{what} is a view, not its whole storage")));
    }
    Ok(())
}

impl Lender for CudaLender {
    type X = Cuda;

    fn lend_cuda(storage: &mut CudaStorage, layout: &Layout) -> Result<Raw<Cuda>> {
        Ok(match &mut storage.slice {
            CudaStorageSlice::F32(s) => {
                whole(layout, s.len(), "parameter")?;
                Raw::F32(s as *mut _)
            }
            CudaStorageSlice::F16(s) => {
                whole(layout, s.len(), "parameter")?;
                Raw::F16(s as *mut _)
            }
            CudaStorageSlice::BF16(s) => {
                whole(layout, s.len(), "parameter")?;
                Raw::Bf16(s as *mut _)
            }
            _ => return Err(sage_err("parameter storage is not f32, f16 or bf16")),
        })
    }

    fn grad<'g>(s: &'g Storage, l: &Layout) -> Result<GradRef<'g, Cuda>> {
        let Storage::Cuda(cs) = s else {
            return Err(sage_err("a gradient is not on the CUDA device"));
        };
        Ok(match &cs.slice {
            CudaStorageSlice::F32(g) => {
                whole(l, g.len(), "gradient")?;
                GradRef::F32(g)
            }
            CudaStorageSlice::F16(g) => {
                whole(l, g.len(), "gradient")?;
                GradRef::F16(g)
            }
            CudaStorageSlice::BF16(g) => {
                whole(l, g.len(), "gradient")?;
                GradRef::Bf16(g)
            }
            _ => return Err(sage_err("gradient is not f32, f16 or bf16")),
        })
    }
}
