//! The gradient-norm pass on the contract's chunk grid, and its read floor.

use super::*;

impl OpenCl {
    /// Whether gradient-norm partials accumulate in `double` here ([`Builder::f64_norms`]).
    pub fn f64_norms(&self) -> bool {
        self.shared.norm_fp64
    }

    /// `Σ x²` of each buffer: every chunk partial of every buffer ([`sage_core::norm`]) with
    /// one launch per [`tensors_per_launch`](Self::tensors_per_launch) buffers and one read for
    /// all, then each buffer's partials folded on the host in chunk order
    /// ([`norm::fold`]): exactly what [`Backend::sq_norm_chunks`] and the fold give.
    pub fn sq_norms<E: Element>(&mut self, bufs: &[&ClBuffer<E>]) -> Result<Vec<f64>, Error> {
        let items: Vec<NormItem<'_>> = bufs.iter().map(|b| NormItem::whole(b)).collect();
        let mut partials = vec![0f64; items.iter().map(|i| i.chunks).sum()];
        self.norm_partials::<E>(&items, &mut partials)?;
        let mut at = 0;
        Ok(items
            .iter()
            .map(|i| {
                let s = norm::fold(partials[at..at + i.chunks].iter().copied());
                at += i.chunks;
                s
            })
            .collect())
    }

    /// The chunk partials of `items`, back to back, into `out` (exactly their number): one
    /// work-group (CPU devices: one work-item) per chunk, one launch per `slots` buffers, one
    /// blocking read.
    pub(super) fn norm_partials<E: Element>(
        &mut self,
        items: &[NormItem<'_>],
        out: &mut [f64],
    ) -> Result<(), Error> {
        let total: usize = items.iter().map(|i| i.chunks).sum();
        check_len("norm partials", total, out.len())?;
        let Some(partials) = self.chunk_launches::<E>(items, "sage_cl_norm_partials")? else {
            return Ok(());
        };
        if self.shared.norm_fp64 {
            self.read_raw(&partials, out, "reading norm partials")?;
        } else {
            let mut host = vec![0f32; 2 * total];
            self.read_raw(&partials, &mut host, "reading norm partials")?;
            for (o, p) in out.iter_mut().zip(host.chunks_exact(2)) {
                *o = source::widen_partial(p[0], p[1]);
            }
        }
        Ok(())
    }

    /// The read floor of the norm pass over `bufs` (benchmarks): the same launches reading
    /// every element once, summed in `float` and stored nowhere; queued, not waited for.
    pub fn floor_read<E: Element>(&mut self, bufs: &[&ClBuffer<E>]) -> Result<(), Error> {
        let items: Vec<NormItem<'_>> = bufs.iter().map(|b| NormItem::whole(b)).collect();
        self.chunk_launches::<E>(&items, "sage_cl_read_floor")
            .map(|_| ())
    }

    /// Enqueues kernel `name` of the norm program over the chunks of `items` (one launch per
    /// `slots` buffers); returns the partials buffer it writes, or `None` when there is no
    /// chunk.
    pub(super) fn chunk_launches<E: Element>(
        &mut self,
        items: &[NormItem<'_>],
        name: &'static str,
    ) -> Result<Option<Mem>, Error> {
        let total: usize = items.iter().map(|i| i.chunks).sum();
        let live: Vec<&NormItem<'_>> = items.iter().filter(|i| i.chunks > 0).collect();
        if live.is_empty() {
            return Ok(None);
        }
        let key = ProgramKey::Norm(E::DTYPE);
        let (k, wg) = self.kernel(key, name)?;
        let per = self.shared.slots;
        let fp64 = self.shared.norm_fp64;
        let roots: Vec<Option<usize>> = live.iter().map(|it| it.root()).collect();
        let mut launches = plan_launches(&roots, per);
        // tab[4s] = buffer length, tab[4s+1] = first chunk, tab[4s+2] = chunks of the launch
        // so far, tab[4s+3] = offset in its root (packed). `groups` counts chunks here.
        let mut tab = Vec::with_capacity(4 * live.len());
        for l in &mut launches {
            let mut end = 0usize;
            for it in &live[l.first..l.first + l.count] {
                end += it.chunks;
                let off = it.place.and_then(|(_, o)| o).unwrap_or(0);
                tab.extend([it.len as u64, it.first as u64, end as u64, off]);
            }
            l.groups = end;
        }
        if total > u32::MAX as usize {
            return Err(Error::TooLarge(format!("{total} norm chunks in one call")));
        }
        let table = self.table(u64_bytes(&tab))?;
        let packed_kernel = if launches.iter().any(|l| l.packed) {
            let packed_name = match name {
                "sage_cl_norm_partials" => "sage_cl_norm_partials_packed",
                _ => "sage_cl_read_floor_packed",
            };
            Some(self.kernel(key, packed_name)?)
        } else {
            None
        };
        // A partial is one double, or a (sum, exponent) pair of floats.
        let bytes = total * 8;
        let partials = match &self.partials {
            Some((m, n)) if *n >= bytes => m.clone(),
            _ => {
                self.partials = None;
                let n = bytes.next_power_of_two().max(1024);
                let m = self
                    .mem(n, 1, None)?
                    .ok_or_else(|| Error::TooLarge("internal: norm scratch".into()))?;
                self.partials = Some((m.clone(), n));
                m
            }
        };
        let mut pbase = 0usize;
        for l in &launches {
            let chunk = &live[l.first..l.first + l.count];
            let (kern, wg) = match (&packed_kernel, l.packed) {
                (Some((pk, pwg)), true) => (pk, *pwg),
                _ => (&k, wg),
            };
            let set = |i: u32, a: ArgVal| {
                core::set_kernel_arg(kern, i, a)
                    .map_err(|e| Error::cl("setting a kernel argument", e))
            };
            set(0, ArgVal::mem(&table))?;
            set(1, ArgVal::scalar(&(l.first as u32)))?;
            set(2, ArgVal::scalar(&(l.count as u32)))?;
            set(3, ArgVal::mem(&partials))?;
            set(4, ArgVal::scalar(&(pbase as u32)))?;
            set(
                5,
                if fp64 {
                    ArgVal::local::<f64>(&wg)
                } else {
                    ArgVal::local::<f32>(&wg)
                },
            )?;
            // Kept alive until the launch is enqueued (OpenCL retains it for the kernel).
            let chunk_slot;
            if l.packed {
                let mut slot_of = Vec::with_capacity(l.groups);
                for (s, it) in chunk.iter().enumerate() {
                    slot_of.extend(std::iter::repeat_n(s as u32, it.chunks));
                }
                chunk_slot = self.table(u32_bytes(&slot_of))?;
                set(6, ArgVal::mem(&chunk_slot))?;
                let root = chunk[0].place.map(|(p, _)| &p.root);
                set(7, opt_mem(root))?;
            } else {
                for s in 0..per {
                    let a = match chunk.get(s) {
                        Some(it) => opt_mem(it.mem),
                        None => ArgVal::mem_null(),
                    };
                    set(6 + s as u32, a)?;
                }
            }
            // One work-group per chunk, or one work-item per chunk on CPU devices.
            let groups = if self.shared.per_item > 1 {
                l.groups.div_ceil(wg)
            } else {
                l.groups
            };
            self.count_launch(true, l.packed);
            self.enqueue(kern, groups, wg)?;
            pbase += l.groups;
        }
        Ok(Some(partials))
    }
}
