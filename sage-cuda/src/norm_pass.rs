//! The gradient-norm pass on the contract's chunk grid: chunk partials, then each tensor's
//! fold, all tensors in one launch each.

use crate::*;

/// The norm-launch entries of the tensors' gradients, with the guards that order other
/// streams' later writes after the launch reads them.
pub(crate) fn grad_entries<'s, P: Element, S: Element>(
    tensors: &'s [ParamTensor<'_, Cuda, P, S>],
    stream: &'s CudaStream,
) -> (Vec<TensorEntry>, Vec<SyncOnDrop<'s>>) {
    tensors
        .iter()
        .map(|t| {
            let g = t.grad();
            let (grad, guard) = g.device_ptr(stream);
            let e = TensorEntry {
                grad,
                n: g.len() as u64,
                ..TensorEntry::default()
            };
            (e, guard)
        })
        .unzip()
}

impl Cuda {
    /// The chunk partials of the `grad` buffers (of storage `e`) of `entries` on sage-core's
    /// norm grid, back to back in entry order, into the scratch `partials` buffer: one launch,
    /// one block per chunk. Returns the device addresses of the launch's tensor table and of
    /// the partials, and the number of partials; `None` when there are none (all empty).
    pub(crate) fn norm_partials(
        &mut self,
        e: DType,
        entries: &[TensorEntry],
    ) -> Result<Option<(u64, u64, usize)>, CudaError> {
        let packed = plan::pack_norm(entries)?;
        if packed.n_chunks == 0 {
            return Ok(None);
        }
        let name = format!("sage_norm_partials_{e}");
        let f = self.function(Program::SqNorm { e }, &name)?;
        let tensors = self.upload_meta(&packed.bytes)? + packed.tensors_at as u64;
        let stream = self.stream.clone();
        let partials = raw(
            grow(&stream, &mut self.scratch.partials, packed.n_chunks)?,
            &stream,
        );
        let count = entries.len() as u32;
        let mut b = stream.launch_builder(&f);
        b.arg(&tensors).arg(&count).arg(&partials);
        // SAFETY: the table describes live buffers of the lengths given, one block per
        // partial; the scratch holds a slot for each.
        unsafe { b.launch(grid(packed.n_chunks as u32, plan::NORM_THREADS)) }
            .map_err(|e| CudaError::driver(format!("launch {name}"), e))?;
        Ok(Some((tensors, partials, packed.n_chunks)))
    }

    /// Squared norms of the `grad` buffers (of storage `e`) of `entries`: the chunk partials in
    /// one launch, each entry's partials folded in chunk order by one thread in a second
    /// (`sage_core::norm::fold`, the same bits), one read-back of one value per entry.
    pub(crate) fn sq_norms(
        &mut self,
        e: DType,
        entries: &[TensorEntry],
    ) -> Result<Vec<f64>, CudaError> {
        let n = entries.len();
        let Some((tensors, partials, _)) = self.norm_partials(e, entries)? else {
            return Ok(vec![0.0; n]);
        };
        let name = format!("sage_norm_fold_{e}");
        let f = self.function(Program::SqNorm { e }, &name)?;
        let stream = self.stream.clone();
        let out_buf = grow(&stream, &mut self.scratch.out, n)?;
        let out = raw(out_buf, &stream);
        let count = n as u32;
        let mut b = stream.launch_builder(&f);
        b.arg(&tensors).arg(&count).arg(&partials).arg(&out);
        let threads = plan::NORM_THREADS;
        // SAFETY: the table and partials the launch before wrote, on this stream; one output
        // slot per entry (the kernel strides over them).
        unsafe { b.launch(grid(count.div_ceil(threads), threads)) }
            .map_err(|e| CudaError::driver(format!("launch {name}"), e))?;
        let mut host = vec![0f64; n];
        stream
            .memcpy_dtoh(&out_buf.slice(0..n), &mut host)
            .map_err(|e| CudaError::driver("read back norms", e))?;
        stream
            .synchronize()
            .map_err(|e| CudaError::driver(format!("run {name}"), e))?;
        Ok(host)
    }

    /// The chunk partials of the `grad` buffers of `entries` (see [`norm_partials`]) copied to
    /// `out`, which must hold exactly their number.
    pub(crate) fn partials_to_host(
        &mut self,
        e: DType,
        entries: &[TensorEntry],
        out: &mut [f64],
    ) -> Result<(), CudaError> {
        let expected: u64 = entries.iter().map(|t| plan::norm_chunks_of(t.n)).sum();
        same_len("norm partials", expected as usize, out.len())?;
        let Some((_, _, n)) = self.norm_partials(e, entries)? else {
            return Ok(());
        };
        let stream = self.stream.clone();
        let partials = grow(&stream, &mut self.scratch.partials, n)?;
        stream
            .memcpy_dtoh(&partials.slice(0..n), out)
            .map_err(|e| CudaError::driver("read back norm partials", e))?;
        stream
            .synchronize()
            .map_err(|e| CudaError::driver("run sage_norm_partials", e))
    }
}
