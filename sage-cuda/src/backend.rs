//! [`Backend`] and [`HostBuffers`] for [`Cuda`]: sage-core's calls, mapped onto the launches
//! of [`crate::step`] and [`crate::norm_pass`].

use crate::*;

impl Backend for Cuda {
    type Error = CudaError;
    type Buf<E: Element> = CudaSlice<E>;

    fn len<E: Element>(&self, buf: &CudaSlice<E>) -> usize {
        buf.len()
    }

    fn sq_norm_chunks<E: Element>(
        &mut self,
        buf: &CudaSlice<E>,
        first: usize,
        out: &mut [f64],
    ) -> Result<(), CudaError> {
        let chunks = norm::chunk_count(buf.len());
        let end = first.saturating_add(out.len());
        if end > chunks {
            return Err(CudaError::LengthMismatch {
                what: "norm chunks (first + count)",
                expected: chunks,
                got: end,
            });
        }
        if out.is_empty() {
            return Ok(());
        }
        // The range as a buffer of its own: a partial depends on its chunk's contents only.
        let start = first * norm::NORM_CHUNK;
        let stream = self.stream.clone();
        let (grad, _g) = buf.device_ptr(&stream);
        let e = TensorEntry {
            grad: grad + (start * E::DTYPE.size()) as u64,
            n: (buf.len() - start).min(out.len() * norm::NORM_CHUNK) as u64,
            ..TensorEntry::default()
        };
        self.partials_to_host(E::DTYPE, &[e], out)
    }

    /// One launch for the partials and one for their fold, whatever the length (the provided
    /// method would read the partials back 32 at a time); the same bits.
    fn sq_norm<E: Element>(&mut self, buf: &CudaSlice<E>) -> Result<f64, CudaError> {
        let stream = self.stream.clone();
        let (grad, _g) = buf.device_ptr(&stream);
        let e = TensorEntry {
            grad,
            n: buf.len() as u64,
            ..TensorEntry::default()
        };
        Ok(self.sq_norms(E::DTYPE, &[e])?[0])
    }

    fn accumulate<P: Element, S: Element>(
        &mut self,
        which: Accumulate,
        acc: &mut CudaSlice<S>,
        param: &CudaSlice<P>,
        grad: &CudaSlice<P>,
        k: &Coeffs,
    ) -> Result<(), CudaError> {
        let n = param.len();
        same_len("grad", n, grad.len())?;
        same_len("state", n, acc.len())?;
        if n == 0 {
            return Ok(());
        }
        let name = format!("sage_accumulate_{}_{}", P::DTYPE, S::DTYPE);
        let f = self.function(step_program::<P, S>(), &name)?;
        let stream = self.stream.clone();
        let (a, _ga) = acc.device_ptr_mut(&stream);
        let (p, _gp) = param.device_ptr(&stream);
        let (g, _gg) = grad.device_ptr(&stream);
        let (karg, code, n64) = (KArg(*k), acc_code(which), n as u64);
        let mut b = stream.launch_builder(&f);
        b.arg(&karg).arg(&code).arg(&a).arg(&p).arg(&g).arg(&n64);
        // SAFETY: three live buffers of n elements of the kernel's storage types.
        unsafe { b.launch(primitive_grid(n64)) }
            .map_err(|e| CudaError::driver(format!("launch {name}"), e))?;
        Ok(())
    }

    fn apply<P: Element, S: Element>(
        &mut self,
        t: ApplyArgs<'_, Self, P, S>,
        k: &Coeffs,
    ) -> Result<(), CudaError> {
        let ApplyArgs {
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
            return Ok(());
        }
        let name = format!("sage_apply_{}_{}", P::DTYPE, S::DTYPE);
        let f = self.function(step_program::<P, S>(), &name)?;
        let stream = self.stream.clone();
        let (p, _gp) = param.device_ptr_mut(&stream);
        let (g, _gg) = grad.device_ptr(&stream);
        let (pm, _gm) = read_ptr(m, &stream);
        let (pv, _gv) = read_ptr(v, &stream);
        let (pi, _gi) = read_ptr(ibar, &stream);
        let (karg, n64) = (KArg(*k), n as u64);
        let mut b = stream.launch_builder(&f);
        b.arg(&karg)
            .arg(&p)
            .arg(&g)
            .arg(&pm)
            .arg(&pv)
            .arg(&pi)
            .arg(&n64);
        // SAFETY: live buffers of n elements (absent state as null, which the kernel skips).
        unsafe { b.launch(primitive_grid(n64)) }
            .map_err(|e| CudaError::driver(format!("launch {name}"), e))?;
        Ok(())
    }

    fn fused_step<P: Element, S: Element>(
        &mut self,
        t: TensorMut<'_, Self, P, S>,
        k: &Coeffs,
    ) -> Result<(), CudaError> {
        // No count wanted here: the launch stays asynchronous, and it is the only thing done
        // after the checks, so an error means nothing changed (no partial step to report).
        self.step1(t, k, false).map(|_| ())
    }

    /// Every tensor's chunk partials in one launch, each tensor's fold by one thread in a
    /// second, one read-back of one value per tensor.
    fn grad_sq_norms<P: Element, S: Element>(
        &mut self,
        tensors: &mut [ParamTensor<'_, Self, P, S>],
    ) -> Result<(), CudaError> {
        if tensors.is_empty() {
            return Ok(());
        }
        let stream = self.stream.clone();
        let norms = {
            let (entries, _guards) = grad_entries(tensors, &stream);
            self.sq_norms(P::DTYPE, &entries)?
        };
        for (t, x) in tensors.iter_mut().zip(norms) {
            t.set_grad_sq_norm(x);
        }
        Ok(())
    }

    /// Every tensor's chunk partials in one launch and one read-back.
    fn grad_norm_partials<P: Element, S: Element>(
        &mut self,
        tensors: &[ParamTensor<'_, Self, P, S>],
        out: &mut [f64],
    ) -> Result<(), CudaError> {
        let stream = self.stream.clone();
        let (entries, _guards) = grad_entries(tensors, &stream);
        self.partials_to_host(P::DTYPE, &entries, out)
    }

    /// One launch for every tensor (one non-empty tensor: the single-tensor kernel), then one
    /// read-back of the tensors' counts of non-finite stored parameters, which waits for the
    /// step. A failure before the launch or of the launch is the plain error: nothing changed.
    /// A failure after it (the read-back, the wait) is [`CudaError::Partial`] with every tensor
    /// of the call applied (the kernel was queued; if it faulted, they may have been), so the
    /// optimizer counts the step as made and does not invite a retry that would step twice.
    fn step_tensors<P: Element, S: Element>(
        &mut self,
        tensors: &mut [ParamTensor<'_, Self, P, S>],
    ) -> Result<(), CudaError> {
        // Every tensor's non-finite stored parameters are counted by the step kernel (an
        // empty tensor has none) and read back once the step has run.
        // One non-empty tensor: the single-tensor kernel needs no table upload.
        let mut live = tensors.iter().filter(|t| !t.param().is_empty());
        if let (Some(_), None) = (live.next(), live.next()) {
            let at = tensors
                .iter()
                .position(|t| !t.param().is_empty())
                .unwrap_or(0);
            let k = *tensors[at].coeffs();
            let bad = if self.step1(tensors[at].view(), &k, true)? {
                // Launched: the tensor is stepped whatever happens next (the others are
                // empty: nothing to step).
                let all = tensors.len();
                after_launch(all, || self.read_counts(1))?[0]
            } else {
                0
            };
            for (i, t) in tensors.iter_mut().enumerate() {
                t.set_non_finite(if i == at { bad } else { 0 });
            }
            return Ok(());
        }
        let stream = self.stream.clone();
        let mut guards = Vec::with_capacity(tensors.len() * 5);
        let mut entries = Vec::with_capacity(tensors.len());
        for t in tensors.iter_mut() {
            let k = *t.coeffs();
            let TensorMut {
                param,
                grad,
                m,
                v,
                ibar,
            } = t.view();
            let n = param.len();
            same_lens(
                n,
                grad.len(),
                [&m, &v, &ibar].map(|s| s.as_ref().map(|s| s.len())),
            )?;
            let mut e = TensorEntry {
                n: n as u64,
                ..TensorEntry::default()
            };
            let (p, g) = param.device_ptr_mut(&stream);
            e.param = p;
            guards.push(g);
            let (p, g) = grad.device_ptr(&stream);
            e.grad = p;
            guards.push(g);
            for (slot, s) in [(&mut e.m, m), (&mut e.v, v), (&mut e.ibar, ibar)] {
                let (p, g) = write_ptr(s, &stream);
                *slot = p;
                guards.extend(g);
            }
            entries.push((e, k));
        }
        let packed = plan::pack(&entries)?;
        if packed.n_chunks == 0 {
            drop(guards);
            for t in tensors.iter_mut() {
                t.set_non_finite(0);
            }
            return Ok(());
        }
        let name = format!("sage_mt_step_{}_{}", P::DTYPE, S::DTYPE);
        let f = self.function(step_program::<P, S>(), &name)?;
        let meta = self.upload_meta(&packed.bytes)?;
        let coeffs = meta + packed.coeffs_at as u64;
        let tables = meta + packed.tensors_at as u64;
        let chunks = meta + packed.chunks_at as u64;
        let n = entries.len();
        let counts = self.zeroed_counts(n)?;
        let mut b = stream.launch_builder(&f);
        b.arg(&coeffs).arg(&tables).arg(&chunks).arg(&counts);
        // SAFETY: the tables describe live buffers of the lengths checked above; `counts`
        // holds one zeroed u64 per tensor of the table.
        unsafe { b.launch(grid(packed.n_chunks as u32, THREADS)) }
            .map_err(|e| CudaError::driver(format!("launch {name}"), e))?;
        drop(guards);
        // Launched (one launch for every tensor): every tensor is stepped whatever happens next.
        let bad = after_launch(n, || self.read_counts(n))?;
        for (t, bad) in tensors.iter_mut().zip(bad) {
            t.set_non_finite(bad);
        }
        Ok(())
    }
}

/// Host copies for checkpoints, the conformance suite and anything else generic over
/// [`HostBuffers`]: owned buffers are cudarc's `CudaSlice`s, every copy waits for the stream.
impl HostBuffers for Cuda {
    type Owned<E: Element> = CudaSlice<E>;

    /// `cuda:N (device name)`.
    fn describe(&self, out: &mut dyn fmt::Write) -> fmt::Result {
        out.write_str(&self.name)
    }

    /// Every storage type: f16 and bf16 are converted with PTX instructions and bit
    /// arithmetic that every supported GPU has.
    fn supports(&self, d: DType) -> bool {
        let _ = d;
        true
    }

    fn upload<E: Element>(&mut self, data: &[E]) -> Result<CudaSlice<E>, CudaError> {
        Cuda::upload(self, data)
    }

    fn copy_to_host<E: Element>(
        &mut self,
        buf: &CudaSlice<E>,
        out: &mut [E],
    ) -> Result<(), CudaError> {
        self.read(buf, out)
    }

    fn copy_from_host<E: Element>(
        &mut self,
        buf: &mut CudaSlice<E>,
        data: &[E],
    ) -> Result<(), CudaError> {
        self.write(buf, data)
    }
}
