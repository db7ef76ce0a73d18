//! Saving: [`save`] and [`save_optimizer`] collect every entry's buffers to host memory and
//! write one safetensors file.

use super::*;

/// Writes a checkpoint: the optimizer's step count `step`, `config` and `groups`, and every
/// entry of `entries` — its buffers (read from `backend`) keyed by parameter name, and its own
/// step count.
///
/// `entries` is a slice, array or `Vec` of [`Entry`]s, or a tuple of them for a model that
/// mixes storage types ([`EntrySet`]); `&()` saves none.
///
/// Refused with an error naming the tensor (or field), before anything is returned: an
/// invalid configuration, an empty or repeated name, an unknown group, state buffers that do
/// not match the group's layout ([`TensorState::check`]), lengths that disagree with each
/// other or with the shape, two keys that collide, a step count of `u64::MAX` (the tensor's,
/// or the optimizer's: the next update could not be counted, and [`load`] would refuse the
/// file).
pub fn save<'a, B: HostBuffers, E: EntrySet<'a, B> + ?Sized>(
    backend: &mut B,
    step: u64,
    config: &Config,
    groups: &[ParamGroup],
    entries: &E,
) -> Result<Vec<u8>, CheckpointError> {
    config
        .validate()
        .map_err(|e| CheckpointError::format(format!("config.{}", e.field), e.to_string()))?;
    for (i, g) in groups.iter().enumerate() {
        g.validate(i).map_err(|e| {
            CheckpointError::format(format!("group.{i}.{}", e.field), e.to_string())
        })?;
    }
    if step == u64::MAX {
        return Err(CheckpointError::format(
            KEY_STEP,
            format!("the optimizer's step count {step} cannot advance (u64 overflow)"),
        ));
    }
    let mut c = Collect {
        backend,
        config,
        groups,
        names: BTreeSet::new(),
        keys: BTreeSet::new(),
        index: Vec::new(),
        views: Vec::new(),
    };
    entries.visit(&mut c)?;
    let Collect { index, views, .. } = c;
    let mut meta: BTreeMap<String, String> = config_pairs(config, groups).into_iter().collect();
    meta.insert(KEY_FORMAT.into(), FORMAT_NAME.into());
    meta.insert(KEY_VERSION.into(), FORMAT_VERSION.to_string());
    meta.insert(KEY_STEP.into(), step.to_string());
    meta.insert(
        KEY_PARAMS.into(),
        serde_json::to_string(&index).map_err(|e| CheckpointError::Write {
            reason: e.to_string(),
        })?,
    );
    let sum = header_checksum(
        &meta,
        views
            .iter()
            .map(|(k, v)| (k.as_str(), v.dtype, v.shape.as_slice())),
    );
    meta.insert(KEY_CHECKSUM.into(), sum);
    safetensors::serialize(
        views.iter().map(|(k, v)| (k.as_str(), v)),
        Some(meta.into_iter().collect()),
    )
    .map_err(|e| CheckpointError::Write {
        reason: e.to_string(),
    })
}

/// [`save`] with the optimizer's step count, configuration and groups.
pub fn save_optimizer<'a, B: HostBuffers, G: AsRef<[ParamGroup]>, E: EntrySet<'a, B> + ?Sized>(
    opt: &mut Optimizer<B, G>,
    entries: &E,
) -> Result<Vec<u8>, CheckpointError> {
    let (step, config, groups) = (opt.steps(), *opt.config(), opt.groups().to_vec());
    save(opt.backend_mut(), step, &config, &groups, entries)
}

/// Validates each entry and reads its buffers to the host.
pub(super) struct Collect<'c, B> {
    pub(super) backend: &'c mut B,
    pub(super) config: &'c Config,
    pub(super) groups: &'c [ParamGroup],
    pub(super) names: BTreeSet<String>,
    pub(super) keys: BTreeSet<String>,
    pub(super) index: Vec<IndexEntry>,
    pub(super) views: Vec<(String, OwnedView)>,
}

impl<'a, B: HostBuffers> VisitEntries<'a, B> for Collect<'_, B> {
    type Error = CheckpointError;
    fn entries<P: Element, S: Element>(
        &mut self,
        entries: &[Entry<'a, B, P, S>],
    ) -> Result<(), CheckpointError> {
        entries.iter().try_for_each(|e| self.entry(e))
    }
}

impl<B: HostBuffers> Collect<'_, B> {
    fn entry<P: Element, S: Element>(
        &mut self,
        e: &Entry<'_, B, P, S>,
    ) -> Result<(), CheckpointError> {
        let name = e.name;
        if name.is_empty() {
            return Err(CheckpointError::tensor("", "empty parameter name"));
        }
        if !self.names.insert(name.to_string()) {
            return Err(CheckpointError::tensor(name, "name given twice"));
        }
        let group = self.groups.get(e.group).ok_or_else(|| {
            CheckpointError::tensor(
                name,
                format!(
                    "group {} does not exist ({} groups)",
                    e.group,
                    self.groups.len()
                ),
            )
        })?;
        check_step(name, e.state.step)?;
        let backend = &mut *self.backend;
        // The parameter's length: θ's, else the shape's, else its state's.
        let len = match (e.param, e.shape) {
            (Some(p), _) => backend.len(p),
            (None, Some(s)) => checked_len(s)
                .ok_or_else(|| CheckpointError::tensor(name, format!("shape {s:?} overflows")))?,
            (None, None) => Buffer::ALL
                .iter()
                .find_map(|&b| e.state.get(b))
                .map_or(0, |b| backend.len(*b)),
        };
        let layout = self.config.state_layout(group.sage);
        e.state
            .check(layout, len, self.config.algorithm.name(), |b| {
                backend.len(*b)
            })
            .map_err(|p| {
                state_problem(
                    name,
                    p,
                    &format!(", for {}", describe(self.config, e.group, group)),
                )
            })?;
        let shape = match e.shape {
            Some(s) if checked_len(s) != Some(len) => {
                return Err(CheckpointError::tensor(
                    name,
                    format!("shape {s:?} does not hold its {len} elements"),
                ))
            }
            Some(s) => s.to_vec(),
            None => vec![len],
        };
        let mut buffers = Vec::new();
        let mut stored = Vec::new();
        if let Some(p) = e.param {
            let key = Slot::Param.key(name);
            let host = backend
                .to_host(p)
                .map_err(|err| CheckpointError::backend(&key, err))?;
            stored.push((Slot::Param, P::DTYPE, encode(&host)));
        }
        for b in Buffer::ALL {
            if let Some(buf) = e.state.get(b) {
                let key = Slot::State(b).key(name);
                let host = backend
                    .to_host(*buf)
                    .map_err(|err| CheckpointError::backend(&key, err))?;
                stored.push((Slot::State(b), S::DTYPE, encode(&host)));
            }
        }
        for (slot, dtype, data) in stored {
            let key = slot.key(name);
            check_values(&key, slot, self.config.algorithm.name(), dtype, &data)?;
            if !self.keys.insert(key.clone()) {
                return Err(CheckpointError::tensor(
                    key,
                    "this key is taken by another parameter's buffer (rename one)",
                ));
            }
            buffers.push(IndexBuffer {
                buffer: slot.name().into(),
                fnv: Fnv64::hex(&data),
            });
            self.views.push((
                key,
                OwnedView {
                    dtype: st_dtype(dtype),
                    shape: shape.clone(),
                    data,
                },
            ));
        }
        self.index.push(IndexEntry {
            name: name.to_string(),
            group: e.group,
            shape,
            step: Some(e.state.step),
            buffers,
        });
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------
// Parse.
