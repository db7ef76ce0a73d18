//! Loading: [`Checkpoint::parse`] validates a file whole; [`load`] checks it against the
//! tensors to restore, snapshots them, and writes them all or none.

use super::*;

/// How strictly [`load`] compares the checkpoint's configuration with the optimizer's.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum ConfigCheck {
    /// Every field and group must be equal (the default: a resumed run is the same run).
    #[default]
    Exact,
    /// Only what decides the state and its meaning must agree (the algorithm, SGD momentum
    /// on/off, the number of groups and which have SAGE): for resuming with, say, a new rate,
    /// decay or schedule.
    StateCompatible,
}

// ---------------------------------------------------------------------------------------
// The index stored under `sage.params`.

/// A checkpoint read and validated completely: format, version, checksums of the header and
/// of every tensor, the configuration, and the index against the stored tensors (each
/// parameter has exactly the buffers its group's layout needs, with its shape, one storage
/// type for its state, and a step count that can advance). Borrows the file's bytes; nothing
/// is copied until a buffer is read.
///
/// Reads the current format ([`FORMAT_VERSION`]) and every older one from
/// [`OLDEST_VERSION`]: a version-1 file, which stored one optimizer-wide count, gives every
/// tensor that count (every tensor had been stepped at every update).
pub struct Checkpoint<'data> {
    pub(super) tensors: SafeTensors<'data>,
    pub(super) version: u32,
    pub(super) step: u64,
    pub(super) config: Config,
    pub(super) groups: Vec<ParamGroup>,
    pub(super) params: Vec<ParamInfo>,
    pub(super) by_name: BTreeMap<String, usize>,
}

impl std::fmt::Debug for Checkpoint<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Checkpoint")
            .field("version", &self.version)
            .field("step", &self.step)
            .field("config", &self.config)
            .field("groups", &self.groups)
            .field("params", &self.params)
            .finish()
    }
}

impl<'data> Checkpoint<'data> {
    /// Reads and validates `bytes`. Any malformed, truncated or modified file is an `Err`
    /// naming what is wrong; this never panics.
    pub fn parse(bytes: &'data [u8]) -> Result<Self, CheckpointError> {
        let tensors = SafeTensors::deserialize(bytes).map_err(|e| CheckpointError::Corrupt {
            reason: e.to_string(),
        })?;
        let (_, header) =
            SafeTensors::read_metadata(bytes).map_err(|e| CheckpointError::Corrupt {
                reason: e.to_string(),
            })?;
        let meta: BTreeMap<String, String> = match header.metadata() {
            Some(m) => m.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
            None => {
                return Err(CheckpointError::format(
                    "__metadata__",
                    "missing: this safetensors file is not a SAGE checkpoint",
                ))
            }
        };
        match meta.get(KEY_FORMAT) {
            Some(f) if f == FORMAT_NAME => {}
            Some(f) => {
                return Err(CheckpointError::format(
                    KEY_FORMAT,
                    format!("is {f:?}, expected {FORMAT_NAME:?}"),
                ))
            }
            None => {
                return Err(CheckpointError::format(
                    KEY_FORMAT,
                    "missing: this safetensors file is not a SAGE checkpoint",
                ))
            }
        }
        let version_s = meta
            .get(KEY_VERSION)
            .ok_or_else(|| CheckpointError::format(KEY_VERSION, "missing"))?;
        let version = match version_s.parse::<u32>() {
            Ok(v) if (OLDEST_VERSION..=FORMAT_VERSION).contains(&v) => v,
            _ => {
                return Err(CheckpointError::Version {
                    found: version_s.clone(),
                    supported: FORMAT_VERSION,
                })
            }
        };
        let stored_sum = meta
            .get(KEY_CHECKSUM)
            .ok_or_else(|| CheckpointError::format(KEY_CHECKSUM, "missing"))?;
        let infos: Vec<(String, Dtype, Vec<usize>)> = tensors
            .iter()
            .map(|(k, v)| (k.to_string(), v.dtype(), v.shape().to_vec()))
            .collect();
        let sum = header_checksum(
            &meta,
            infos.iter().map(|(k, d, s)| (k.as_str(), *d, s.as_slice())),
        );
        if &sum != stored_sum {
            return Err(CheckpointError::Checksum {
                tensor: "header".into(),
            });
        }
        let step_s = meta
            .get(KEY_STEP)
            .ok_or_else(|| CheckpointError::format(KEY_STEP, "missing"))?;
        let step = step_s.parse::<u64>().map_err(|_| {
            CheckpointError::format(KEY_STEP, format!("not an unsigned integer: {step_s:?}"))
        })?;
        if step == u64::MAX {
            return Err(CheckpointError::format(
                KEY_STEP,
                format!("the optimizer's step count {step} cannot advance (u64 overflow)"),
            ));
        }
        let (config, groups) = parse_config(&meta, version)?;
        let index: Vec<IndexEntry> = serde_json::from_str(
            meta.get(KEY_PARAMS)
                .ok_or_else(|| CheckpointError::format(KEY_PARAMS, "missing"))?,
        )
        .map_err(|e| CheckpointError::format(KEY_PARAMS, format!("malformed index: {e}")))?;

        let mut params = Vec::with_capacity(index.len());
        let mut by_name = BTreeMap::new();
        let mut used_keys = BTreeSet::new();
        for e in index {
            let name = e.name.clone();
            if name.is_empty() {
                return Err(CheckpointError::tensor(
                    "",
                    "empty parameter name in the index",
                ));
            }
            if by_name.insert(name.clone(), params.len()).is_some() {
                return Err(CheckpointError::tensor(&name, "listed twice in the index"));
            }
            let group = groups.get(e.group).ok_or_else(|| {
                CheckpointError::tensor(
                    &name,
                    format!("group {} does not exist ({} groups)", e.group, groups.len()),
                )
            })?;
            let len = checked_len(&e.shape).ok_or_else(|| {
                CheckpointError::tensor(&name, format!("shape {:?} overflows", e.shape))
            })?;
            let tensor_step = match (version, e.step) {
                // Version 1: one count, every tensor stepped at every update.
                (1, None) => step,
                (1, Some(_)) => {
                    return Err(CheckpointError::tensor(
                        &name,
                        "a step count in a version 1 index (version 1 had none)",
                    ))
                }
                (_, Some(s)) => s,
                (_, None) => {
                    return Err(CheckpointError::tensor(&name, "no step count in the index"))
                }
            };
            check_step(&name, tensor_step)?;
            let mut info = ParamInfo {
                name,
                group: e.group,
                shape: e.shape,
                len,
                step: tensor_step,
                layout: StateLayout::default(),
                state_dtype: None,
                param_dtype: None,
            };
            let name = info.name.as_str();
            let mut present: Vec<Slot> = Vec::new();
            for b in &e.buffers {
                let slot = Slot::parse(&b.buffer).ok_or_else(|| {
                    CheckpointError::tensor(name, format!("unknown buffer {:?}", b.buffer))
                })?;
                if present.contains(&slot) {
                    return Err(CheckpointError::tensor(
                        name,
                        format!("buffer `{}` listed twice", slot.name()),
                    ));
                }
                present.push(slot);
                let key = slot.key(name);
                let view = tensors.tensor(&key).map_err(|_| {
                    CheckpointError::tensor(&key, "listed in the index but not stored")
                })?;
                if view.shape() != info.shape.as_slice() {
                    return Err(CheckpointError::tensor(
                        &key,
                        format!(
                            "stored with shape {:?}, the index says {:?}",
                            view.shape(),
                            info.shape
                        ),
                    ));
                }
                let dtype = sage_dtype(view.dtype()).ok_or_else(|| {
                    CheckpointError::tensor(
                        &key,
                        format!("dtype {} is not a SAGE storage type", view.dtype()),
                    )
                })?;
                match slot {
                    Slot::Param => info.param_dtype = Some(dtype),
                    Slot::State(buffer) => {
                        match info.state_dtype {
                            Some(d) if d != dtype => {
                                return Err(CheckpointError::tensor(
                                    &key,
                                    format!(
                                        "stored as {dtype}, the tensor's other state buffers as {d}"
                                    ),
                                ))
                            }
                            _ => info.state_dtype = Some(dtype),
                        }
                        match buffer {
                            Buffer::M => info.layout.m = true,
                            Buffer::V => info.layout.v = true,
                            Buffer::Ibar => info.layout.ibar = true,
                        }
                    }
                }
                if Fnv64::hex(view.data()) != b.fnv {
                    return Err(CheckpointError::Checksum { tensor: key });
                }
                check_values(&key, slot, config.algorithm.name(), dtype, view.data())?;
                used_keys.insert(key);
            }
            // Exactly the buffers the file's own configuration gives this tensor's group.
            let stored = info.layout;
            config
                .state_layout(group.sage)
                .check(len, config.algorithm.name(), |b| {
                    stored.needs(b).then_some(len)
                })
                .map_err(|p| {
                    state_problem(
                        name,
                        p,
                        &format!(", for the file's {}", describe(&config, e.group, group)),
                    )
                })?;
            params.push(info);
        }
        if let Some((k, _, _)) = infos.iter().find(|(k, _, _)| !used_keys.contains(k)) {
            return Err(CheckpointError::tensor(
                k,
                "stored but not listed in the index",
            ));
        }
        Ok(Checkpoint {
            tensors,
            version,
            step,
            config,
            groups,
            params,
            by_name,
        })
    }

    /// The file's format version ([`OLDEST_VERSION`] to [`FORMAT_VERSION`]).
    pub fn version(&self) -> u32 {
        self.version
    }
    /// The optimizer's step count at save time (each tensor's own count is
    /// [`ParamInfo::step`]).
    pub fn step(&self) -> u64 {
        self.step
    }
    /// The configuration saved.
    pub fn config(&self) -> &Config {
        &self.config
    }
    /// The groups saved.
    pub fn groups(&self) -> &[ParamGroup] {
        &self.groups
    }
    /// Every parameter, in save order.
    pub fn params(&self) -> &[ParamInfo] {
        &self.params
    }
    /// One parameter by name.
    pub fn param(&self, name: &str) -> Option<&ParamInfo> {
        self.by_name.get(name).map(|&i| &self.params[i])
    }

    fn bytes(&self, name: &str, slot: Slot) -> Option<(DType, &'data [u8])> {
        let d = self.param(name)?.dtype(slot)?;
        let view = self.tensors.tensor(&slot.key(name)).ok()?;
        Some((d, view.data()))
    }

    /// Slot `slot` (θ, or a [`Buffer`]) of parameter `name`, widened to f32 (`None` when it is
    /// not stored).
    pub fn read_f32(&self, name: &str, slot: impl Into<Slot>) -> Option<Vec<f32>> {
        self.bytes(name, slot.into()).map(|(d, b)| decode_f32(d, b))
    }

    /// Slot `slot` (θ, or a [`Buffer`]) of parameter `name` in its stored type `E`; an error
    /// names the tensor when it is absent or stored as another type.
    pub fn read<E: Element>(
        &self,
        name: &str,
        slot: impl Into<Slot>,
    ) -> Result<Vec<E>, CheckpointError> {
        let slot = slot.into();
        let key = slot.key(name);
        match self.bytes(name, slot) {
            Some((d, bytes)) if d == E::DTYPE => Ok(decode::<E>(bytes)),
            Some((d, _)) => Err(CheckpointError::tensor(
                key,
                format!("stored as {d}, requested as {}", E::DTYPE),
            )),
            None => Err(CheckpointError::tensor(key, "not in the checkpoint")),
        }
    }

    /// Parameter `name`'s state on the host: every stored buffer as `S`, and its step count.
    pub fn state<S: Element>(&self, name: &str) -> Result<TensorState<Vec<S>>, CheckpointError> {
        let info = self
            .param(name)
            .ok_or_else(|| CheckpointError::tensor(name, "not in the checkpoint"))?;
        let mut state = TensorState::try_new(info.layout, |b| self.read::<S>(name, b))?;
        state.step = info.step;
        Ok(state)
    }

    /// Slot `slot` of parameter `name` as a new buffer on `backend`
    /// ([`HostBuffers::upload`]).
    pub fn upload<B: HostBuffers, E: Element>(
        &self,
        backend: &mut B,
        name: &str,
        slot: impl Into<Slot>,
    ) -> Result<B::Owned<E>, CheckpointError> {
        let slot = slot.into();
        let data = self.read::<E>(name, slot)?;
        backend
            .upload(&data)
            .map_err(|e| CheckpointError::backend(slot.key(name), e))
    }

    /// Parameter `name`'s state as new buffers on `backend`, with its step count: resuming
    /// on a backend without allocating the buffers first. ([`restore`](Self::restore) fills
    /// buffers that exist, checking the whole model first.)
    pub fn upload_state<B: HostBuffers, S: Element>(
        &self,
        backend: &mut B,
        name: &str,
    ) -> Result<TensorState<B::Owned<S>>, CheckpointError> {
        self.state::<S>(name)?.try_map(|b, data| {
            backend
                .upload(&data)
                .map_err(|e| CheckpointError::backend(Slot::State(b).key(name), e))
        })
    }

    /// Checks `entries` against this checkpoint — the same names (none missing, none extra),
    /// groups, shapes or lengths, state buffers ([`TensorState::check`] against the layout
    /// stored), storage types — and only then copies every buffer into them through
    /// `backend` and sets every entry's step count to the tensor's stored count.
    ///
    /// `entries` is a slice, array or `Vec` of [`EntryMut`]s, or a tuple of them for a model
    /// that mixes storage types ([`EntrySetMut`]).
    ///
    /// Nothing is written unless every check passes, and the writes are all or nothing:
    ///
    /// 1. every target buffer is first read back to the host (a snapshot of what it holds);
    ///    a read that fails is a [`CheckpointError::Backend`] and nothing was written;
    /// 2. every buffer is written; the step counts are set only once every write succeeded;
    /// 3. a write that fails (a device error, not a file problem) puts every buffer written so
    ///    far, and the one that failed, back to its snapshot, and returns the write's
    ///    [`CheckpointError::Backend`] naming the buffer: every buffer and count then holds
    ///    what it held before the call. Only when putting one back fails too is the error
    ///    [`CheckpointError::Partial`], which lists exactly the buffers whose contents are
    ///    unspecified; every other buffer holds what it held before, and no count changed.
    ///
    /// The snapshot costs host memory the size of the buffers restored, held for the call,
    /// and one device-to-host copy of each. (A backend-side copy between two of its own
    /// buffers, which [`HostBuffers`] does not have, would let it stage on the device instead.)
    pub fn restore<'a, B: HostBuffers, E: EntrySetMut<'a, B> + ?Sized>(
        &self,
        backend: &mut B,
        entries: &mut E,
    ) -> Result<(), CheckpointError> {
        let mut check = CheckTargets {
            ckpt: self,
            backend: &*backend,
            seen: BTreeSet::new(),
        };
        entries.visit_mut(&mut check)?;
        let seen = check.seen;
        if let Some(missing) = self.params.iter().find(|p| !seen.contains(&p.name)) {
            return Err(CheckpointError::tensor(
                &missing.name,
                "in the checkpoint but not among the tensors to restore (a partial load is refused)",
            ));
        }
        // Everything checked. Snapshot every target, write, put back on failure; the counts
        // are set last.
        let mut snap = Snapshot {
            backend: &mut *backend,
            saved: Vec::new(),
        };
        entries.visit_mut(&mut snap)?;
        let saved = snap.saved;
        let mut write = WriteTargets {
            ckpt: self,
            backend: &mut *backend,
            done: 0,
        };
        if let Err(cause) = entries.visit_mut(&mut write) {
            // The buffer whose write failed may hold part of the new values: put it back too.
            let upto = write.done + 1;
            let mut back = Rollback {
                backend,
                saved: &saved,
                upto,
                at: 0,
                unknown: Vec::new(),
            };
            let Ok(()) = entries.visit_mut(&mut back);
            return Err(if back.unknown.is_empty() {
                cause
            } else {
                CheckpointError::Partial {
                    cause: Box::new(cause),
                    unknown: back.unknown,
                }
            });
        }
        entries.visit_mut(&mut SetCounts { ckpt: self })
    }

    /// Checks this checkpoint's configuration against `config` and `groups` under `check`.
    pub fn check_config(
        &self,
        config: &Config,
        groups: &[ParamGroup],
        check: ConfigCheck,
    ) -> Result<(), CheckpointError> {
        match check {
            ConfigCheck::Exact => compare_config((&self.config, &self.groups), (config, groups)),
            ConfigCheck::StateCompatible => {
                let mismatch = |field: String, file: String, expected: String| {
                    Err(CheckpointError::Config {
                        field,
                        file,
                        expected,
                    })
                };
                // Adam's `v` and Adamax's `u` share a slot but not a meaning.
                if self.config.algorithm.name() != config.algorithm.name() {
                    return mismatch(
                        "config.algorithm".into(),
                        self.config.algorithm.name().into(),
                        config.algorithm.name().into(),
                    );
                }
                if self.groups.len() != groups.len() {
                    return mismatch(
                        "groups".into(),
                        self.groups.len().to_string(),
                        groups.len().to_string(),
                    );
                }
                for (i, (a, b)) in self.groups.iter().zip(groups).enumerate() {
                    let (la, lb) = (
                        self.config.state_layout(a.sage),
                        config.state_layout(b.sage),
                    );
                    if la != lb {
                        return mismatch(
                            format!("group.{i} state layout"),
                            format!("{la:?}"),
                            format!("{lb:?}"),
                        );
                    }
                }
                Ok(())
            }
        }
    }
}

/// Restore, first pass: every entry against the checkpoint, nothing written.
pub(super) struct CheckTargets<'c, 'data, B> {
    pub(super) ckpt: &'c Checkpoint<'data>,
    pub(super) backend: &'c B,
    pub(super) seen: BTreeSet<String>,
}

impl<'a, B: HostBuffers> VisitEntriesMut<'a, B> for CheckTargets<'_, '_, B> {
    type Error = CheckpointError;
    fn entries<P: Element, S: Element>(
        &mut self,
        entries: &mut [EntryMut<'a, B, P, S>],
    ) -> Result<(), CheckpointError> {
        entries.iter().try_for_each(|e| self.entry(e))
    }
}

impl<B: HostBuffers> CheckTargets<'_, '_, B> {
    fn entry<P: Element, S: Element>(
        &mut self,
        e: &EntryMut<'_, B, P, S>,
    ) -> Result<(), CheckpointError> {
        let name = e.name;
        if !self.seen.insert(name.to_string()) {
            return Err(CheckpointError::tensor(name, "given twice"));
        }
        let info = self.ckpt.param(name).ok_or_else(|| {
            CheckpointError::tensor(name, "not in the checkpoint (no state saved for it)")
        })?;
        if info.group != e.group {
            return Err(CheckpointError::tensor(
                name,
                format!(
                    "group {} in the checkpoint, group {} here",
                    info.group, e.group
                ),
            ));
        }
        if let Some(s) = e.shape {
            if s != info.shape.as_slice() {
                return Err(CheckpointError::tensor(
                    name,
                    format!("shape {:?} in the checkpoint, {s:?} here", info.shape),
                ));
            }
        }
        let key = Slot::Param.key(name);
        match (info.param_dtype, e.param.as_deref()) {
            // θ in the file but not asked for: the framework restores weights itself.
            (_, None) => {}
            (None, Some(_)) => {
                return Err(CheckpointError::tensor(
                    key,
                    "a buffer was given for θ, but the checkpoint has none",
                ))
            }
            (Some(have), Some(p)) => {
                let n = self.backend.len(p);
                if n != info.len {
                    return Err(CheckpointError::tensor(
                        key,
                        format!(
                            "{} elements in the checkpoint, the buffer has {n}",
                            info.len
                        ),
                    ));
                }
                if have != P::DTYPE {
                    return Err(CheckpointError::tensor(
                        key,
                        format!("stored as {have}, the buffer holds {}", P::DTYPE),
                    ));
                }
            }
        }
        let backend = self.backend;
        let file_group = &self.ckpt.groups[info.group];
        e.state
            .check(
                info.layout,
                info.len,
                self.ckpt.config.algorithm.name(),
                |b| backend.len(&**b),
            )
            .map_err(|p| {
                state_problem(
                    name,
                    p,
                    &format!(
                        ", for the checkpoint's {}",
                        describe(&self.ckpt.config, info.group, file_group)
                    ),
                )
            })?;
        if let (Some(have), Some(b)) = (
            info.state_dtype,
            Buffer::ALL.into_iter().find(|&b| info.layout.needs(b)),
        ) {
            if have != S::DTYPE {
                return Err(CheckpointError::tensor(
                    Slot::State(b).key(name),
                    format!("stored as {have}, the buffer holds {}", S::DTYPE),
                ));
            }
        }
        Ok(())
    }
}

/// An entry's restore targets: θ (when it is restored), then each state buffer.
pub(super) type Targets<'e, B, P, S> = (
    Option<&'e mut <B as Backend>::Buf<P>>,
    [(Buffer, Option<&'e mut <B as Backend>::Buf<S>>); 3],
);

/// The buffers an entry restores, in the order every restore pass walks them: θ (when it
/// is restored), then each present state buffer.
pub(super) fn targets<'e, B: HostBuffers, P: Element, S: Element>(
    e: &'e mut EntryMut<'_, B, P, S>,
) -> Targets<'e, B, P, S> {
    let st = &mut e.state;
    (
        e.param.as_deref_mut(),
        [
            (Buffer::M, st.m.as_deref_mut()),
            (Buffer::V, st.v.as_deref_mut()),
            (Buffer::Ibar, st.ibar.as_deref_mut()),
        ],
    )
}

/// Restore, second pass: what every target holds now, for putting it back.
pub(super) struct Snapshot<'c, B> {
    pub(super) backend: &'c mut B,
    /// One `Vec<E>` per target buffer, in [`targets`] order.
    pub(super) saved: Vec<Box<dyn Any + Send>>,
}

impl<'a, B: HostBuffers> VisitEntriesMut<'a, B> for Snapshot<'_, B> {
    type Error = CheckpointError;
    fn entries<P: Element, S: Element>(
        &mut self,
        entries: &mut [EntryMut<'a, B, P, S>],
    ) -> Result<(), CheckpointError> {
        for e in entries.iter_mut() {
            let name = e.name;
            let (param, state) = targets(e);
            if let Some(p) = param {
                let host: Vec<P> = self
                    .backend
                    .to_host(p)
                    .map_err(|err| CheckpointError::backend(Slot::Param.key(name), err))?;
                self.saved.push(Box::new(host));
            }
            for (b, buf) in state {
                if let Some(buf) = buf {
                    let host: Vec<S> = self
                        .backend
                        .to_host(buf)
                        .map_err(|err| CheckpointError::backend(Slot::State(b).key(name), err))?;
                    self.saved.push(Box::new(host));
                }
            }
        }
        Ok(())
    }
}

/// Restore, third pass: the copies, counted.
pub(super) struct WriteTargets<'c, 'data, B> {
    pub(super) ckpt: &'c Checkpoint<'data>,
    pub(super) backend: &'c mut B,
    /// Buffers written completely so far (in [`targets`] order).
    pub(super) done: usize,
}

impl<'a, B: HostBuffers> VisitEntriesMut<'a, B> for WriteTargets<'_, '_, B> {
    type Error = CheckpointError;
    fn entries<P: Element, S: Element>(
        &mut self,
        entries: &mut [EntryMut<'a, B, P, S>],
    ) -> Result<(), CheckpointError> {
        for e in entries.iter_mut() {
            let name = e.name;
            let (param, state) = targets(e);
            if let Some(p) = param {
                let data: Vec<P> = self.ckpt.read(name, Slot::Param)?;
                self.backend
                    .write_host(p, &data)
                    .map_err(|err| CheckpointError::host(Slot::Param.key(name), err))?;
                self.done += 1;
            }
            for (b, buf) in state {
                if let Some(buf) = buf {
                    let data: Vec<S> = self.ckpt.read(name, b)?;
                    self.backend
                        .write_host(buf, &data)
                        .map_err(|err| CheckpointError::host(Slot::State(b).key(name), err))?;
                    self.done += 1;
                }
            }
        }
        Ok(())
    }
}

/// After a failed write: the first `upto` targets get their snapshot back; those that cannot
/// be put back are listed.
pub(super) struct Rollback<'c, B> {
    pub(super) backend: &'c mut B,
    pub(super) saved: &'c [Box<dyn Any + Send>],
    pub(super) upto: usize,
    pub(super) at: usize,
    pub(super) unknown: Vec<String>,
}

impl<B: HostBuffers> Rollback<'_, B> {
    fn put_back<E: Element>(&mut self, buf: &mut B::Buf<E>, key: String) {
        let at = self.at;
        self.at += 1;
        if at >= self.upto {
            return;
        }
        let ok = match self.saved.get(at).and_then(|s| s.downcast_ref::<Vec<E>>()) {
            Some(old) => self.backend.write_host(buf, old).is_ok(),
            None => false,
        };
        if !ok {
            self.unknown.push(key);
        }
    }
}

impl<'a, B: HostBuffers> VisitEntriesMut<'a, B> for Rollback<'_, B> {
    type Error = std::convert::Infallible;
    fn entries<P: Element, S: Element>(
        &mut self,
        entries: &mut [EntryMut<'a, B, P, S>],
    ) -> Result<(), Self::Error> {
        for e in entries.iter_mut() {
            let name = e.name;
            let (param, state) = targets(e);
            if let Some(p) = param {
                self.put_back::<P>(p, Slot::Param.key(name));
            }
            for (b, buf) in state {
                if let Some(buf) = buf {
                    self.put_back::<S>(buf, Slot::State(b).key(name));
                }
            }
        }
        Ok(())
    }
}

/// Restore, last pass: the step counts.
pub(super) struct SetCounts<'c, 'data> {
    pub(super) ckpt: &'c Checkpoint<'data>,
}

impl<'a, B: HostBuffers> VisitEntriesMut<'a, B> for SetCounts<'_, '_> {
    type Error = CheckpointError;
    fn entries<P: Element, S: Element>(
        &mut self,
        entries: &mut [EntryMut<'a, B, P, S>],
    ) -> Result<(), CheckpointError> {
        for e in entries.iter_mut() {
            // Checked in the first pass: every entry is in the checkpoint.
            if let Some(info) = self.ckpt.param(e.name) {
                *e.state.step = info.step;
            }
        }
        Ok(())
    }
}

/// Loads `bytes` into `opt` and `entries`: parses and validates the whole file, compares its
/// configuration with the optimizer's under `check`, checks every entry, and only then writes
/// every buffer, sets every entry's step count to its tensor's stored count and the
/// optimizer's count to the file's. Returns the parsed checkpoint.
///
/// A file of format version 1 (one optimizer-wide count) sets every tensor's count to that
/// count (see [`OLDEST_VERSION`]).
///
/// Any mismatch or corruption (values a run cannot resume from included: NaN or ±Inf in any
/// buffer, a negative `v` or `ibar`) is an `Err` naming the tensor (or field) and the reason,
/// and leaves the optimizer and every buffer and count untouched. So does a backend copy
/// that fails, unless putting the buffers back fails too ([`CheckpointError::Partial`]; see
/// [`Checkpoint::restore`]).
pub fn load<'d, 'a, B: HostBuffers, G: AsRef<[ParamGroup]>, E: EntrySetMut<'a, B> + ?Sized>(
    opt: &mut Optimizer<B, G>,
    bytes: &'d [u8],
    entries: &mut E,
    check: ConfigCheck,
) -> Result<Checkpoint<'d>, CheckpointError> {
    let ckpt = Checkpoint::parse(bytes)?;
    ckpt.check_config(opt.config(), opt.groups(), check)?;
    ckpt.restore(opt.backend_mut(), entries)?;
    opt.set_steps(ckpt.step());
    Ok(ckpt)
}
