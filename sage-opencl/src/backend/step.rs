//! The fused step: launches over a step's items, the non-finite counters, kept launches, and
//! the step's traffic floor.

use super::*;

impl OpenCl {
    /// Multi-tensor kernel `name` (the fused step or its floor) over `items` (the non-empty
    /// ones of `tensors` tensors), `slots` tensors per launch.
    ///
    /// Everything that can be checked is checked before the first launch: lengths (by
    /// [`item`]), every buffer's context and that no buffer the step writes is also another
    /// buffer of the step ([`check_items`](Self::check_items)), the launch table, the work
    /// sizes, the kernel's build. A failure after the first launch (a driver error setting an
    /// argument or enqueuing a later launch) is [`Error::Partial`]: the tensors of the
    /// launches already enqueued were stepped, the others not.
    ///
    /// With `count`, each item's count of non-finite stored parameters (the kernel's counters,
    /// read once every launch was enqueued: the read waits for them) is returned in item order;
    /// a failure of that read is [`Error::Partial`] with every tensor applied (the launches
    /// were enqueued and may have run).
    pub(super) fn step_items<P: Element, S: Element>(
        &mut self,
        items: &[Item<'_>],
        tensors: usize,
        name: &'static str,
        count: bool,
    ) -> Result<Vec<u64>, Error> {
        if items.is_empty() {
            return Ok(Vec::new());
        }
        let (psize, ssize) = (P::DTYPE.size(), S::DTYPE.size());
        let Placements { keys, offsets } = self.check_items(items, psize, ssize)?;
        let per = self.shared.slots;
        if items.len() > u32::MAX as usize {
            return Err(Error::TooLarge(format!(
                "{} tensors in one step",
                items.len()
            )));
        }
        let mut launches = plan_launches(&keys, per);
        let key = ProgramKey::Step(P::DTYPE, S::DTYPE);
        let (k, mut wg) = self.kernel(key, name)?;
        let packed_kernel = if launches.iter().any(|l| l.packed) {
            let (pk, pwg) = self.kernel(key, packed_name(name))?;
            // One work-group size for both, so that the table's group counts fit either.
            wg = wg.min(pwg);
            Some(pk)
        } else {
            None
        };
        // Elements per work-group: the work-group size times each work-item's run.
        let span = wg
            .checked_mul(self.shared.per_item)
            .ok_or_else(|| Error::TooLarge(format!("{} elements per work-item", wg)))?;
        let mut table = Table::with_capacity(items.len());
        for l in &mut launches {
            let mut end = 0u64;
            for (it, off) in items[l.first..l.first + l.count]
                .iter()
                .zip(&offsets[l.first..])
            {
                end += it.len.div_ceil(span) as u64;
                let k = table.coeffs_index(it.k);
                table.slots.push(Slot {
                    len: it.len as u64,
                    end_group: end,
                    present: present(it.m.is_some(), it.v.is_some(), it.b.is_some()),
                    k,
                    off: *off,
                });
            }
            l.groups = usize::try_from(end)
                .ok()
                .filter(|g| g.checked_mul(wg).is_some())
                .ok_or_else(|| Error::TooLarge(format!("{end} work-groups in one launch")))?;
        }
        let slots = &table.slots;
        let table = self.upload_table(&table)?;
        let counters = self.counters(count, items.len())?;
        let mut group_slot = None;
        for (li, l) in launches.iter().enumerate() {
            let chunk = &items[l.first..l.first + l.count];
            self.count_launch(false, l.packed);
            let launched =
                self.injected_failure(li)
                    .and_then(|()| match (&packed_kernel, l.packed) {
                        (Some(pk), true) => self
                            .launch_packed(
                                pk,
                                &table,
                                &slots[l.first..l.first + l.count],
                                counters.as_ref(),
                                l,
                                &items[l.first],
                                wg,
                            )
                            .map(|g| group_slot = Some(g)),
                        _ => self.launch_chunk(
                            &k,
                            &table,
                            counters.as_ref(),
                            l.first as u32,
                            chunk,
                            l.groups,
                            wg,
                        ),
                    });
            if let Err(cause) = launched {
                return Err(if li == 0 {
                    // Nothing was enqueued: nothing changed.
                    cause
                } else {
                    Error::Partial {
                        applied: chunk[0].tensor,
                        tensors,
                        cause: Box::new(cause),
                    }
                });
            }
        }
        // One packed launch over every tensor of the step: kept for the next step.
        if let ([l], Some(group_slot), Some(roots)) = (&launches[..], group_slot, keys[0]) {
            if l.packed && l.count == tensors {
                let kept = items.iter().zip(slots).map(|(it, sl)| {
                    let mut at = [0; 5];
                    for (j, b) in it.bufs().into_iter().enumerate() {
                        at[j] = b.map_or(0, |b| b.place.offset);
                    }
                    (it.len, at, sl.k)
                });
                let kept = Kept::new(
                    (P::DTYPE, S::DTYPE),
                    roots,
                    kept,
                    table.slots,
                    group_slot,
                    l.groups,
                    wg,
                );
                let all = &mut self.kept[kept_index(name)];
                if all.len() == KEPT_PER_KERNEL {
                    all.remove(0);
                }
                all.push(kept);
            }
        }
        self.read_back(counters, items.len(), tensors)
    }

    /// A step's non-finite counters for `n` items, when `count`: two zeroed words per item
    /// (low and high halves of its count), written by the kernel.
    pub(super) fn counters(&self, count: bool, n: usize) -> Result<Option<Mem>, Error> {
        if count {
            self.mem(2 * n, 4, Some(&vec![0u8; 8 * n]))
        } else {
            Ok(None)
        }
    }

    /// The counts of `n` items from the step's counters (`None`: not counted, no counts).
    /// Every launch is enqueued: a failure from here on is after the update (or while it
    /// ran), so it is a partial step of all `tensors`, never an error inviting a retry.
    pub(super) fn read_back(
        &self,
        counters: Option<Mem>,
        n: usize,
        tensors: usize,
    ) -> Result<Vec<u64>, Error> {
        let Some(counters) = counters else {
            return Ok(Vec::new());
        };
        let mut words = vec![0u32; 2 * n];
        let read = self.read_counts(&counters, &mut words);
        if let Err(cause) = read {
            return Err(Error::Partial {
                applied: tensors,
                tensors,
                cause: Box::new(cause),
            });
        }
        Ok(words
            .chunks_exact(2)
            .map(|w| u64::from(w[0]) | u64::from(w[1]) << 32)
            .collect())
    }

    /// The multi-tensor kernel `name` over `tensors` (each with the coefficients `k` gives
    /// it) through the kept launch, when they are laid out as it was ([`Kept::matches`]);
    /// `None` otherwise. With `count`, the tensors' non-finite counts, as
    /// [`step_items`](Self::step_items) returns them.
    pub(super) fn step_kept<'a, P: Element, S: Element>(
        &mut self,
        tensors: &'a [ParamTensor<'_, OpenCl, P, S>],
        name: &'static str,
        count: bool,
        k: impl Fn(&'a ParamTensor<'_, OpenCl, P, S>) -> &'a Coeffs,
    ) -> Option<Result<Vec<u64>, Error>> {
        let i = kept_index(name);
        let mut all = std::mem::take(&mut self.kept[i]);
        let context = self.context_addr();
        // Most recent first; a launch of other tensors fails at its first tensor.
        let found = all
            .iter()
            .enumerate()
            .rev()
            .find_map(|(at, kept)| kept.matches(context, tensors, &k).map(|table| (at, table)));
        let ran = found.map(|(at, table)| {
            let kept = all.remove(at);
            let ran = self.launch_kept(&kept, &table, tensors, name, count);
            all.push(kept);
            ran
        });
        self.kept[i] = all;
        ran
    }

    /// Launches `kept` with this step's coefficients (`table`) over `tensors`.
    pub(super) fn launch_kept<P: Element, S: Element>(
        &mut self,
        kept: &Kept,
        table: &Table,
        tensors: &[ParamTensor<'_, OpenCl, P, S>],
        name: &'static str,
        count: bool,
    ) -> Result<Vec<u64>, Error> {
        let n = tensors.len();
        let (k, _) = self.kernel(ProgramKey::Step(P::DTYPE, S::DTYPE), packed_name(name))?;
        let coeffs = self.table(table.coeff_bytes())?;
        let counters = self.counters(count, n)?;
        self.count_launch(false, true);
        self.shared.launches[REUSED].fetch_add(1, Ordering::Relaxed);
        self.injected_failure(0)?;
        let a = set_table(&k, &kept.slots, &coeffs, 0)?;
        let roots = Kept::roots_of(&tensors[0]);
        set_packed(&k, a, n, counters.as_ref(), &kept.group_slot, roots)?;
        self.enqueue(&k, kept.groups, kept.wg)?;
        self.read_back(counters, n, n)
    }

    /// Unit tests: launch `li` of a step fails as a driver error would.
    pub(super) fn injected_failure(&self, li: usize) -> Result<(), Error> {
        #[cfg(test)]
        if self.fail_launch == Some(li) {
            return Err(Error::Cl {
                op: "launching a kernel",
                status: Some(ocl::core::Status::CL_OUT_OF_RESOURCES as i32),
                message: "injected by a test".into(),
            });
        }
        let _ = li;
        Ok(())
    }

    /// Reads the step's non-finite counters (waits for the launches).
    pub(super) fn read_counts(&self, counters: &Mem, words: &mut [u32]) -> Result<(), Error> {
        #[cfg(test)]
        if self.fail_read_back {
            return Err(Error::Cl {
                op: "reading the non-finite counts",
                status: Some(ocl::core::Status::CL_OUT_OF_RESOURCES as i32),
                message: "injected by a test".into(),
            });
        }
        self.read_raw(counters, words, "reading the non-finite counts")
    }

    /// Sets the arguments of one packed launch (the tensors' shared root buffers, once) and
    /// enqueues it; returns its table of each work-group's slot.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn launch_packed(
        &self,
        k: &Kernel,
        table: &DeviceTable,
        slots: &[Slot],
        bad: Option<&Mem>,
        l: &Launch,
        first: &Item<'_>,
        wg: usize,
    ) -> Result<Mem, Error> {
        // Each work-group's slot in the launch, from the table's running group counts.
        let mut group_slot = Vec::with_capacity(l.groups);
        for (i, sl) in slots.iter().enumerate() {
            group_slot.resize(sl.end_group as usize, i as u32);
        }
        let group_slot = self.table(u32_bytes(&group_slot))?;
        let a = set_table(k, &table.slots, &table.coeffs, l.first as u32)?;
        set_packed(k, a, l.count, bad, &group_slot, first.roots())?;
        self.enqueue(k, l.groups, wg)?;
        Ok(group_slot)
    }

    /// Sets the arguments of one multi-tensor launch and enqueues it. `bad`: the step's
    /// non-finite counters, or `None` (a null argument: not counted).
    #[allow(clippy::too_many_arguments)]
    pub(super) fn launch_chunk(
        &self,
        k: &Kernel,
        table: &DeviceTable,
        bad: Option<&Mem>,
        base: u32,
        chunk: &[Item<'_>],
        groups: usize,
        wg: usize,
    ) -> Result<(), Error> {
        let set = |i: u32, a: ArgVal| {
            core::set_kernel_arg(k, i, a).map_err(|e| Error::cl("setting a kernel argument", e))
        };
        let count = chunk.len() as u32;
        let first = set_table(k, &table.slots, &table.coeffs, base)?;
        set(first, ArgVal::scalar(&count))?;
        set(first + 1, opt_mem(bad))?;
        for s in 0..self.shared.slots {
            let a = first + 2 + 5 * s as u32;
            match chunk.get(s) {
                Some(it) => {
                    set(a, ArgVal::mem(it.p.mem))?;
                    set(a + 1, ArgVal::mem(it.g.mem))?;
                    set(a + 2, opt_mem(it.m.map(|b| b.mem)))?;
                    set(a + 3, opt_mem(it.v.map(|b| b.mem)))?;
                    set(a + 4, opt_mem(it.b.map(|b| b.mem)))?;
                }
                None => {
                    for j in 0..5 {
                        set(a + j, ArgVal::mem_null())?;
                    }
                }
            }
        }
        self.enqueue(k, groups, wg)
    }

    /// The bandwidth floor of [`Backend::step_tensors`] over the same tensors: one pass that
    /// reads and writes every buffer a step touches, in place, with the same launches, and
    /// adds 0 to each value. For benchmarks: a step cannot move less memory than this.
    pub fn floor_tensors<P: Element, S: Element>(
        &mut self,
        tensors: &mut [ParamTensor<'_, Self, P, S>],
    ) -> Result<(), Error> {
        // Default coefficients: `reserved2` is the 0 the floor adds.
        let zero = Coeffs::default();
        if let Some(done) = self.step_kept(tensors, "sage_cl_floor", false, |_| &zero) {
            return done.map(|_| ());
        }
        let items = items(tensors, |_| &zero)?;
        self.step_items::<P, S>(&items, tensors.len(), "sage_cl_floor", false)
            .map(|_| ())
    }
}
