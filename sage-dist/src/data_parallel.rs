//! The gradient exchange of data-parallel training, done before a sharded step: what
//! torch's DistributedDataParallel does (sum over ranks; a tensor some ranks did not use gets
//! zeros from them), or the cheaper reduce-scatter when the step reads each rank's own part
//! only.
//!
//! Gradients are summed, not averaged: scale the loss by `1 / global batch` (as the examples
//! do) for a mean.

use sage_core::HostBuffers;

use crate::comm::{BufferComm, Communicator};
use crate::error::DistError;
use crate::layout::Layout;

/// One tensor's gradient buffer on this rank, and whether this rank computed it.
pub struct Grad<'a, B: HostBuffers + ?Sized> {
    /// The whole gradient. Overwritten with zeros first when this rank has none but another
    /// rank has one.
    pub grad: &'a mut B::Buf<f32>,
    /// Whether this rank has a gradient for it at this step.
    pub present: bool,
}

impl<'a, B: HostBuffers + ?Sized> Grad<'a, B> {
    /// A gradient this rank computed.
    pub fn new(grad: &'a mut B::Buf<f32>) -> Self {
        Grad {
            grad,
            present: true,
        }
    }
    /// A tensor this rank has no gradient for (its buffer gets zeros if another rank has one).
    pub fn absent(grad: &'a mut B::Buf<f32>) -> Self {
        Grad {
            grad,
            present: false,
        }
    }
}

/// Agrees on presence: a tensor is present when any rank has its gradient. Ranks without it
/// get zeros in its buffer. Returns the global presence, the same on every rank.
fn agree<B: HostBuffers, C: Communicator>(
    comm: &mut C,
    backend: &mut B,
    grads: &mut [Grad<'_, B>],
) -> Result<Vec<bool>, DistError> {
    let mut flags: Vec<f64> = grads.iter().map(|g| g.present as u8 as f64).collect();
    comm.all_reduce_sum_f64(&mut flags)
        .map_err(DistError::comm)?;
    let present: Vec<bool> = flags.iter().map(|&f| f > 0.0).collect();
    for (i, g) in grads.iter_mut().enumerate() {
        if present[i] && !g.present {
            let zeros = vec![0f32; backend.len(&*g.grad)];
            backend
                .write_host(&mut *g.grad, &zeros)
                .map_err(|e| DistError::Backend {
                    what: format!("zeros into gradient {i}"),
                    kind: match &e {
                        sage_core::HostError::Length { .. } => sage_core::ErrorKind::LengthMismatch,
                        sage_core::HostError::Backend(b) => sage_core::BackendError::kind(b),
                    },
                    message: e.to_string(),
                })?;
            g.present = true;
        }
    }
    Ok(present)
}

/// DDP's exchange: every present gradient becomes the sum over ranks, on every rank. Returns
/// which tensors are present (the same on every rank): pass the others as absent to the step.
pub fn all_reduce_grads<B: HostBuffers, C: BufferComm<B>>(
    comm: &mut C,
    backend: &mut B,
    grads: &mut [Grad<'_, B>],
) -> Result<Vec<bool>, DistError> {
    let present = agree(comm, backend, grads)?;
    let mut bufs: Vec<&mut B::Buf<f32>> = grads
        .iter_mut()
        .zip(&present)
        .filter(|(_, &p)| p)
        .map(|(g, _)| &mut *g.grad)
        .collect();
    comm.all_reduce_sum_many(backend, &mut bufs)
        .map_err(DistError::comm)?;
    Ok(present)
}

/// As [`all_reduce_grads`], but each rank receives the sum on its own pieces only (`layout`'s
/// split of each tensor); the rest of its buffers is left unspecified. A sharded step reads
/// exactly those pieces, so the result is the same at half the traffic.
pub fn reduce_scatter_grads<B: HostBuffers, C: BufferComm<B>>(
    comm: &mut C,
    backend: &mut B,
    layout: &Layout,
    grads: &mut [Grad<'_, B>],
) -> Result<Vec<bool>, DistError> {
    if grads.len() != layout.tensors().len() {
        return Err(DistError::input(
            None,
            format!(
                "{} gradients, the layout has {} tensors",
                grads.len(),
                layout.tensors().len()
            ),
        ));
    }
    let present = agree(comm, backend, grads)?;
    let mut bufs: Vec<&mut B::Buf<f32>> = Vec::new();
    let mut splits = Vec::new();
    for (i, (g, &p)) in grads.iter_mut().zip(&present).enumerate() {
        if p {
            bufs.push(&mut *g.grad);
            splits.push(layout.split(i));
        }
    }
    comm.reduce_scatter_sum_many(backend, &mut bufs, &splits)
        .map_err(DistError::comm)?;
    Ok(present)
}
