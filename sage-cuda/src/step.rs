//! The fused step's launches: launch tables, grids, the non-finite counters and their
//! read-back.

use crate::*;

/// What is done after the launch that stepped all `tensors` tensors of a
/// [`step_tensors`](Backend::step_tensors) call: its failure is [`CudaError::Partial`] (every
/// tensor applied), never the plain error, which would say nothing was.
pub(crate) fn after_launch<T>(
    tensors: usize,
    then: impl FnOnce() -> Result<T, CudaError>,
) -> Result<T, CudaError> {
    then().map_err(|e| CudaError::partial(tensors, tensors, e))
}

pub(crate) fn grid(blocks: u32, threads: u32) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (blocks, 1, 1),
        block_dim: (threads, 1, 1),
        shared_mem_bytes: 0,
    }
}

pub(crate) fn primitive_grid(n: u64) -> LaunchConfig {
    let blocks = n
        .div_ceil(PRIMITIVE_THREADS as u64)
        .min(PRIMITIVE_MAX_BLOCKS) as u32;
    grid(blocks.max(1), PRIMITIVE_THREADS)
}

pub(crate) fn acc_code(which: Accumulate) -> i32 {
    // SAGE_ACC_* in sage_step.h
    match which {
        Accumulate::Moment => 0,
        Accumulate::SecondMoment => 1,
        Accumulate::InfNorm => 2,
        Accumulate::Sensitivity => 3,
    }
}

pub(crate) fn step_program<P: Element, S: Element>() -> Program {
    Program::Step {
        p: P::DTYPE,
        s: S::DTYPE,
    }
}

impl Cuda {
    /// The single-tensor step kernel over one tensor (no table upload), launched
    /// asynchronously. With `count`, it also counts its non-finite stored parameters into the
    /// first counter of the scratch ([`read_counts`](Self::read_counts) reads it). An error is
    /// a failure before or of the launch: nothing changed. Returns whether the kernel was
    /// launched (the tensor is not empty).
    pub(crate) fn step1<P: Element, S: Element>(
        &mut self,
        t: TensorMut<'_, Self, P, S>,
        k: &Coeffs,
        count: bool,
    ) -> Result<bool, CudaError> {
        let TensorMut {
            param,
            grad,
            m,
            v,
            ibar,
        } = t;
        let n = param.len();
        same_lens(
            n,
            grad.len(),
            [&m, &v, &ibar].map(|s| s.as_ref().map(|s| s.len())),
        )?;
        if n == 0 {
            return Ok(false);
        }
        let blocks = plan::chunks_of(n as u64);
        if blocks > plan::MAX_CHUNKS as u64 {
            return Err(CudaError::TooLarge(format!(
                "{n} elements in one tensor ({blocks} chunks of {CHUNK})"
            )));
        }
        let name = format!("sage_step1_{}_{}", P::DTYPE, S::DTYPE);
        let f = self.function(step_program::<P, S>(), &name)?;
        let stream = self.stream.clone();
        let (p, _gp) = param.device_ptr_mut(&stream);
        let (g, _gg) = grad.device_ptr(&stream);
        let (pm, _gm) = write_ptr(m, &stream);
        let (pv, _gv) = write_ptr(v, &stream);
        let (pi, _gi) = write_ptr(ibar, &stream);
        let (karg, n64) = (KArg(*k), n as u64);
        let counter = if count { self.zeroed_counts(1)? } else { 0 };
        let mut b = stream.launch_builder(&f);
        b.arg(&karg)
            .arg(&p)
            .arg(&g)
            .arg(&pm)
            .arg(&pv)
            .arg(&pi)
            .arg(&n64)
            .arg(&counter);
        // SAFETY: live buffers of n elements; one block per chunk of the tensor; the counter
        // (when not null) is one zeroed u64 of the scratch. (Every argument is a plain value:
        // `launch` does nothing after cuLaunchKernel, so its error means not launched.)
        unsafe { b.launch(grid(blocks as u32, THREADS)) }
            .map_err(|e| CudaError::driver(format!("launch {name}"), e))?;
        Ok(true)
    }

    /// `n` zeroed counters in the scratch (zeroed on the stream, before the launch that adds
    /// to them): their device address.
    pub(crate) fn zeroed_counts(&mut self, n: usize) -> Result<u64, CudaError> {
        let stream = self.stream.clone();
        let buf = grow(&stream, &mut self.scratch.counts, n)?;
        stream
            .memset_zeros(&mut buf.slice_mut(0..n))
            .map_err(|e| CudaError::driver("zero the non-finite counters", e))?;
        Ok(raw(buf, &stream))
    }

    /// The first `n` counters after the step kernel that wrote them: one read-back, then the
    /// wait for the stream (the step's only synchronisation).
    pub(crate) fn read_counts(&mut self, n: usize) -> Result<Vec<u64>, CudaError> {
        #[cfg(test)]
        if std::mem::take(&mut self.scratch.fail_read_back) {
            return Err(CudaError::driver(
                "read back the non-finite counts (injected by a test)",
                cudarc::driver::DriverError(
                    cudarc::driver::sys::CUresult::CUDA_ERROR_ILLEGAL_ADDRESS,
                ),
            ));
        }
        let stream = self.stream.clone();
        let buf = grow(&stream, &mut self.scratch.counts, n)?;
        let mut host = vec![0u64; n];
        stream
            .memcpy_dtoh(&buf.slice(0..n), &mut host)
            .map_err(|e| CudaError::driver("read back the non-finite counts", e))?;
        stream
            .synchronize()
            .map_err(|e| CudaError::driver("run the step", e))?;
        Ok(host)
    }

    /// Copies `bytes` into the scratch metadata buffer (one host-to-device copy) and returns
    /// its device address.
    pub(crate) fn upload_meta(&mut self, bytes: &[u8]) -> Result<u64, CudaError> {
        let stream = self.stream.clone();
        let n = bytes.len();
        let meta = raw(grow(&stream, &mut self.scratch.meta, n)?, &stream);
        let i = self.scratch.next_staging;
        self.scratch.next_staging ^= 1;
        let slot = &mut self.scratch.staging[i];
        if slot.as_ref().is_none_or(|s| s.host.len() < n) {
            *slot = None; // waits for its last copy (Staging::drop)
            let len = n.max(4096).next_power_of_two();
            // SAFETY: page-locked bytes; every byte copied is written first, below.
            let host = unsafe { self.ctx.alloc_pinned::<u8>(len) }
                .map_err(|e| CudaError::driver("alloc page-locked staging", e))?;
            let copied = self
                .ctx
                .new_event(None)
                .map_err(|e| CudaError::driver("event", e))?;
            *slot = Some(Staging { host, copied });
        }
        let st = slot
            .as_mut()
            .ok_or_else(|| CudaError::TooLarge("internal: staging".into()))?;
        st.copied
            .synchronize()
            .map_err(|e| CudaError::driver("wait for the previous table copy", e))?;
        let host = st
            .host
            .as_mut_slice()
            .map_err(|e| CudaError::driver("staging", e))?;
        host[..n].copy_from_slice(bytes);
        // SAFETY: `meta` holds at least n bytes; `host` stays alive and unwritten until
        // `copied` (recorded right after) completes.
        unsafe { cudarc::driver::result::memcpy_htod_async(meta, &host[..n], stream.cu_stream()) }
            .map_err(|e| CudaError::driver("upload launch tables", e))?;
        st.copied
            .record(&stream)
            .map_err(|e| CudaError::driver("record table copy", e))?;
        Ok(meta)
    }
}
