//! Device memory: buffers, sub-buffers and slabs, host copies, launch tables.

use super::*;

impl OpenCl {
    pub(super) fn mem(
        &self,
        len: usize,
        size: usize,
        init: Option<&[u8]>,
    ) -> Result<Option<Mem>, Error> {
        if len == 0 {
            return Ok(None);
        }
        let n = len
            .checked_mul(size)
            .filter(|&n| n as u64 <= self.shared.max_alloc)
            .ok_or_else(|| {
                Error::TooLarge(format!(
                    "{len} elements of {size} bytes exceed the device's largest allocation ({} bytes)",
                    self.shared.max_alloc
                ))
            })?;
        let flags = match init {
            Some(_) => MemFlags::new().read_write().copy_host_ptr(),
            None => MemFlags::new().read_write(),
        };
        // SAFETY: with COPY_HOST_PTR the data is copied before create_buffer returns; without
        // it no host pointer is passed.
        let mem = unsafe { core::create_buffer(&self.shared.context, flags, n, init) }
            .map_err(|e| Error::cl("allocating a buffer", e))?;
        Ok(Some(mem))
    }

    /// A new device buffer holding a copy of `data`.
    pub fn upload<E: Element>(&self, data: &[E]) -> Result<ClBuffer<E>, Error> {
        let mem = self.mem(data.len(), E::DTYPE.size(), Some(bytes(data)))?;
        Ok(ClBuffer::own(mem, data.len(), self.context_addr()))
    }

    /// A new device buffer of `len` zeros (what fresh optimizer state holds).
    pub fn zeros<E: Element>(&self, len: usize) -> Result<ClBuffer<E>, Error> {
        let mem = self.mem(len, E::DTYPE.size(), None)?;
        let mut buf = ClBuffer::own(mem, len, self.context_addr());
        if let Some(m) = &buf.mem {
            let filled = core::enqueue_fill_buffer(
                &self.shared.queue,
                m,
                0u8,
                0,
                len * E::DTYPE.size(),
                None::<()>,
                None::<()>,
                None,
            );
            if filled.is_err() {
                // OpenCL 1.1 has no fill: write zeros from the host.
                self.write(&mut buf, &vec![E::default(); len])?;
            }
        }
        Ok(buf)
    }

    /// Bytes a sub-buffer's start must be a multiple of on this device
    /// (`CL_DEVICE_MEM_BASE_ADDR_ALIGN`; 128 on PoCL, 512 or more on many GPUs).
    pub fn sub_buffer_alignment(&self) -> usize {
        self.shared.align
    }

    /// Elements `offset .. offset + len` of `parent` as a buffer of their own: an OpenCL
    /// sub-buffer, the same device memory (no copy). Tensors whose parameter, gradient and
    /// state buffers are each cut from one parent per stream (as frameworks with flat
    /// parameter and gradient buffers have them) step in one packed launch however many they
    /// are: see [`slab`](Self::slab). An error, before anything is made, when the region runs
    /// past the parent or starts off [`sub_buffer_alignment`](Self::sub_buffer_alignment).
    pub fn sub_buffer<E: Element>(
        &self,
        parent: &ClBuffer<E>,
        offset: usize,
        len: usize,
    ) -> Result<ClBuffer<E>, Error> {
        let size = E::DTYPE.size();
        let end = offset.checked_add(len).filter(|&e| e <= parent.len);
        if end.is_none() {
            return Err(Error::Region(format!(
                "elements {offset}..{offset}+{len} of a buffer of {}",
                parent.len
            )));
        }
        if len == 0 {
            return Ok(ClBuffer::own(None, 0, self.context_addr()));
        }
        if !(offset * size).is_multiple_of(self.shared.align) {
            return Err(Error::Region(format!(
                "element {offset} of {} starts at byte {}, not a multiple of the device's \
                 {}-byte base-address alignment",
                E::DTYPE,
                offset * size,
                self.shared.align
            )));
        }
        let root = parent
            .place
            .as_ref()
            .expect("non-empty ClBuffer has a place");
        if root.offset != 0 || root.root.as_ptr() != mem_of(parent).as_ptr() {
            // OpenCL makes no sub-buffer of a sub-buffer.
            return Err(Error::Region(
                "the parent is itself a sub-buffer: cut from its own parent instead".into(),
            ));
        }
        let region = core::BufferRegion::<u8>::new(offset * size, len * size);
        let mem = core::create_sub_buffer(mem_of(parent), MemFlags::new().read_write(), &region)
            .map_err(|e| Error::cl("creating a sub-buffer", e))?;
        let place = crate::buffer::Place {
            root: mem_of(parent).clone(),
            offset: offset * size,
            context: root.context,
        };
        Ok(ClBuffer::sub(mem, len, place))
    }

    /// One zeroed allocation holding buffers of `lens` elements, each a sub-buffer starting on
    /// the device's alignment: returns the parent and the pieces. Cut every stream of a model
    /// this way (parameters, gradients, each state buffer) and a step packs all its tensors
    /// into one launch per kind of kernel, where buffers of their own take one launch per
    /// [`tensors_per_launch`](Self::tensors_per_launch).
    ///
    /// ```no_run
    /// # use sage_opencl::OpenCl;
    /// let cl = OpenCl::new()?;
    /// let (_params, pieces) = cl.slab::<f32>(&[768, 3072, 768])?;
    /// assert_eq!(pieces[1].len(), 3072);
    /// # Ok::<(), sage_opencl::Error>(())
    /// ```
    #[allow(clippy::type_complexity)]
    pub fn slab<E: Element>(
        &self,
        lens: &[usize],
    ) -> Result<(ClBuffer<E>, Vec<ClBuffer<E>>), Error> {
        let size = E::DTYPE.size();
        // Elements per alignment unit (the alignment is a power of two, element sizes too).
        let unit = (self.shared.align / size).max(1);
        let mut starts = Vec::with_capacity(lens.len());
        let mut at = 0usize;
        for &n in lens {
            starts.push(at);
            at = at
                .checked_add(n.div_ceil(unit) * unit)
                .ok_or_else(|| Error::TooLarge(format!("a slab past {at} elements")))?;
        }
        let parent = self.zeros::<E>(at)?;
        let pieces = starts
            .iter()
            .zip(lens)
            .map(|(&s, &n)| self.sub_buffer(&parent, s, n))
            .collect::<Result<_, _>>()?;
        Ok((parent, pieces))
    }

    /// Copies `data` into `buf` (same length), after every operation queued before.
    pub fn write<E: Element>(&self, buf: &mut ClBuffer<E>, data: &[E]) -> Result<(), Error> {
        check_len("host slice", buf.len, data.len())?;
        if let Some(m) = &buf.mem {
            // SAFETY: blocking write: `data` outlives the copy.
            unsafe {
                core::enqueue_write_buffer(
                    &self.shared.queue,
                    m,
                    true,
                    0,
                    bytes(data),
                    None::<()>,
                    None::<()>,
                )
            }
            .map_err(|e| Error::cl("writing a buffer", e))?;
        }
        Ok(())
    }

    /// Copies `buf` into `out` (same length), after every operation queued before.
    pub fn read<E: Element>(&self, buf: &ClBuffer<E>, out: &mut [E]) -> Result<(), Error> {
        check_len("host slice", buf.len, out.len())?;
        if let Some(m) = &buf.mem {
            // SAFETY: blocking read: `out` outlives the copy.
            unsafe {
                core::enqueue_read_buffer(
                    &self.shared.queue,
                    m,
                    true,
                    0,
                    bytes_mut(out),
                    None::<()>,
                    None::<()>,
                )
            }
            .map_err(|e| Error::cl("reading a buffer", e))?;
        }
        Ok(())
    }

    /// The contents of `buf`, after every operation queued before.
    pub fn download<E: Element>(&self, buf: &ClBuffer<E>) -> Result<Vec<E>, Error> {
        let mut out = vec![E::default(); buf.len];
        self.read(buf, &mut out)?;
        Ok(out)
    }

    pub(super) fn read_raw<T: core::OclPrm>(
        &self,
        mem: &Mem,
        out: &mut [T],
        op: &'static str,
    ) -> Result<(), Error> {
        // SAFETY: blocking read into `out`, which outlives it.
        unsafe {
            core::enqueue_read_buffer(
                &self.shared.queue,
                mem,
                true,
                0,
                out,
                None::<()>,
                None::<()>,
            )
        }
        .map_err(|e| Error::cl(op, e))
    }

    /// A read-only buffer holding `data`, for per-launch tables.
    pub(super) fn table(&self, data: &[u8]) -> Result<Mem, Error> {
        // SAFETY: COPY_HOST_PTR copies `data` before returning.
        unsafe {
            core::create_buffer(
                &self.shared.context,
                MemFlags::new().read_only().copy_host_ptr(),
                data.len(),
                Some(data),
            )
        }
        .map_err(|e| Error::cl("uploading a launch table", e))
    }

    /// Uploads a step's launch table.
    pub(super) fn upload_table(&self, t: &Table) -> Result<DeviceTable, Error> {
        Ok(DeviceTable {
            slots: self.table(t.slot_bytes())?,
            coeffs: self.table(t.coeff_bytes())?,
        })
    }
}
