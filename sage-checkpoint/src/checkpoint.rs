//! Saving and loading: [`Entry`] / [`EntryMut`] name a parameter and carry its
//! [`TensorState`] (buffers on any backend, and the tensor's own step count), [`save`] writes
//! them with the optimizer's count and the configuration, [`Checkpoint::parse`] validates a
//! file completely, and [`load`] checks it against the tensors to restore before writing into
//! any of them.
//!
//! Everything is generic over [`HostBuffers`], the host-copy capability each backend
//! implements in its own crate: a checkpoint saved on one backend restores on any other.

use std::any::Any;
use std::borrow::Borrow;
use std::collections::{BTreeMap, BTreeSet};

use safetensors::tensor::{Dtype, View};
use safetensors::SafeTensors;
use serde::{Deserialize, Serialize};

use sage_core::{
    Backend, Buffer, Config, DType, Element, HostBuffers, Optimizer, ParamGroup, ParamProblem,
    StateLayout, StateMut, TensorState,
};

use crate::error::CheckpointError;
use crate::format::{
    compare_config, config_pairs, parse_config, Fnv64, FORMAT_NAME, FORMAT_VERSION, KEY_CHECKSUM,
    KEY_FORMAT, KEY_PARAMS, KEY_STEP, KEY_VERSION, OLDEST_VERSION,
};
use crate::set::{EntrySet, EntrySetMut, VisitEntries, VisitEntriesMut};

/// One stored tensor of a parameter: θ, or one of its state buffers.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Slot {
    /// The parameter θ itself (optional: frameworks often save weights elsewhere).
    Param,
    /// A state buffer: `m`, `v` or `ibar` ([`Buffer`]).
    State(Buffer),
}

impl Slot {
    /// θ and the three state buffers, in the order the index lists them.
    pub const ALL: [Slot; 4] = [
        Slot::Param,
        Slot::State(Buffer::M),
        Slot::State(Buffer::V),
        Slot::State(Buffer::Ibar),
    ];

    /// Name in the index: `param`, or the buffer's [`Buffer::name`] (`m`, `v`, `ibar`).
    pub const fn name(self) -> &'static str {
        match self {
            Slot::Param => "param",
            Slot::State(b) => b.name(),
        }
    }

    fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|b| b.name() == s)
    }

    /// The safetensors key of this slot of parameter `name`: the name itself for θ (so the
    /// file also reads as model weights), `{name}.m`, `{name}.v`, `{name}.ibar` for state (the
    /// names sage-candle uses).
    pub fn key(self, name: &str) -> String {
        match self {
            Slot::Param => name.to_string(),
            Slot::State(b) => format!("{name}.{}", b.name()),
        }
    }
}

impl From<Buffer> for Slot {
    fn from(b: Buffer) -> Self {
        Slot::State(b)
    }
}

/// A parameter to save: its name, group, optional shape, optional θ, and its
/// [`TensorState`] — the state buffers its group's layout has, and its own step count.
///
/// ```
/// use sage_checkpoint::Entry;
/// use sage_core::{Algorithm, Config, TensorState};
/// use sage_cpu::Cpu;
/// let cfg = Config::reference(Algorithm::adamw(), 2e-5);
/// let mut state = TensorState::new(cfg.state_layout(true), || vec![0f32; 6]);
/// state.step = 41;
/// let e = Entry::<Cpu, f32, f32>::new("layer0.weight", &state).shape(&[2, 3]);
/// assert_eq!((e.name, e.state.step), ("layer0.weight", 41));
/// ```
pub struct Entry<'a, B: Backend + ?Sized, P: Element, S: Element> {
    /// Stable parameter name (the key in the file).
    pub name: &'a str,
    /// Parameter group index.
    pub group: usize,
    /// Shape (default: one dimension of the parameter's length).
    pub shape: Option<&'a [usize]>,
    /// θ, when the checkpoint should carry it.
    pub param: Option<&'a B::Buf<P>>,
    /// The state buffers (borrowed) and the tensor's step count.
    pub state: TensorState<&'a B::Buf<S>>,
}

impl<'a, B: Backend + ?Sized, S: Element> Entry<'a, B, S, S> {
    /// An entry named `name`, group 0, saving `state`: whatever holds the backend's buffers —
    /// the owned `TensorState<B::Owned<S>>` a training loop keeps, a `StateMut` a step
    /// borrowed, or a `TensorState` of references.
    pub fn new<T: Borrow<B::Buf<S>>, N: Borrow<u64>>(
        name: &'a str,
        state: &'a TensorState<T, N>,
    ) -> Self {
        Entry {
            name,
            group: 0,
            shape: None,
            param: None,
            state: TensorState {
                m: state.m.as_ref().map(Borrow::borrow),
                v: state.v.as_ref().map(Borrow::borrow),
                ibar: state.ibar.as_ref().map(Borrow::borrow),
                step: *state.step.borrow(),
            },
        }
    }
}

impl<'a, B: Backend + ?Sized, P: Element, S: Element> Entry<'a, B, P, S> {
    /// Sets the group.
    pub fn group(mut self, g: usize) -> Self {
        self.group = g;
        self
    }
    /// Sets the shape (its product must be the parameter's length).
    pub fn shape(mut self, shape: &'a [usize]) -> Self {
        self.shape = Some(shape);
        self
    }
    /// Saves θ too (of any storage type).
    pub fn param<Q: Element>(self, p: &'a B::Buf<Q>) -> Entry<'a, B, Q, S> {
        Entry {
            name: self.name,
            group: self.group,
            shape: self.shape,
            param: Some(p),
            state: self.state,
        }
    }
}

/// A parameter to restore into; the mutable twin of [`Entry`]. Its state is the
/// [`StateMut`] a step takes (`state.view()`): restoring writes every buffer and sets the
/// tensor's step count.
///
/// ```
/// use sage_checkpoint::EntryMut;
/// use sage_core::{Algorithm, Config, TensorState};
/// use sage_cpu::Cpu;
/// let cfg = Config::reference(Algorithm::adamw(), 2e-5);
/// let mut state = TensorState::new(cfg.state_layout(true), || vec![0f32; 6]);
/// let e = EntryMut::<Cpu, f32, f32>::new("layer0.weight", state.view()).shape(&[2, 3]);
/// assert_eq!(e.name, "layer0.weight");
/// ```
pub struct EntryMut<'a, B: Backend + ?Sized, P: Element, S: Element> {
    /// Stable parameter name.
    pub name: &'a str,
    /// Parameter group index (must equal the checkpoint's).
    pub group: usize,
    /// Shape to check against the file (default: only the length is checked).
    pub shape: Option<&'a [usize]>,
    /// θ, when it should be restored (then the checkpoint must hold it).
    pub param: Option<&'a mut B::Buf<P>>,
    /// The state buffers to fill, and the step count to set.
    pub state: StateMut<'a, B::Buf<S>>,
}

impl<'a, B: Backend + ?Sized, S: Element> EntryMut<'a, B, S, S> {
    /// An entry named `name`, group 0, restoring into `state`.
    pub fn new(name: &'a str, state: StateMut<'a, B::Buf<S>>) -> Self {
        EntryMut {
            name,
            group: 0,
            shape: None,
            param: None,
            state,
        }
    }
}

impl<'a, B: Backend + ?Sized, P: Element, S: Element> EntryMut<'a, B, P, S> {
    /// Sets the group.
    pub fn group(mut self, g: usize) -> Self {
        self.group = g;
        self
    }
    /// Sets the shape to check.
    pub fn shape(mut self, shape: &'a [usize]) -> Self {
        self.shape = Some(shape);
        self
    }
    /// Restores θ too.
    pub fn param<Q: Element>(self, p: &'a mut B::Buf<Q>) -> EntryMut<'a, B, Q, S> {
        EntryMut {
            name: self.name,
            group: self.group,
            shape: self.shape,
            param: Some(p),
            state: self.state,
        }
    }
}

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

#[derive(Serialize, Deserialize, Clone, Debug)]
#[serde(deny_unknown_fields)]
struct IndexBuffer {
    buffer: String,
    fnv: String,
}

#[derive(Serialize, Deserialize, Clone, Debug)]
#[serde(deny_unknown_fields)]
struct IndexEntry {
    name: String,
    group: usize,
    shape: Vec<usize>,
    /// The tensor's own step count (format version 2 on; version 1 has none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    step: Option<u64>,
    buffers: Vec<IndexBuffer>,
}

/// What the checkpoint says about one parameter.
#[derive(Clone, Debug, PartialEq)]
pub struct ParamInfo {
    /// Stable name.
    pub name: String,
    /// Group index.
    pub group: usize,
    /// Shape.
    pub shape: Vec<usize>,
    /// Number of elements (product of the shape).
    pub len: usize,
    /// The tensor's own step count: updates applied to it so far (for a version-1 file, the
    /// file's optimizer count).
    pub step: u64,
    /// Which state buffers are stored (exactly those its group's layout has).
    pub layout: StateLayout,
    /// Storage type of its state buffers (`None` when it has none).
    pub state_dtype: Option<DType>,
    /// Storage type of θ (`None` when θ was not saved).
    pub param_dtype: Option<DType>,
}

impl ParamInfo {
    /// Whether `slot` is stored.
    pub fn has(&self, slot: impl Into<Slot>) -> bool {
        match slot.into() {
            Slot::Param => self.param_dtype.is_some(),
            Slot::State(b) => self.layout.needs(b),
        }
    }

    /// Storage type of `slot`, when it is stored.
    pub fn dtype(&self, slot: impl Into<Slot>) -> Option<DType> {
        let slot = slot.into();
        if !self.has(slot) {
            return None;
        }
        match slot {
            Slot::Param => self.param_dtype,
            Slot::State(_) => self.state_dtype,
        }
    }
}

// ---------------------------------------------------------------------------------------
// Bytes <-> elements (little-endian, as safetensors stores them).

fn st_dtype(d: DType) -> Dtype {
    match d {
        DType::F32 => Dtype::F32,
        DType::F16 => Dtype::F16,
        DType::Bf16 => Dtype::BF16,
    }
}

fn sage_dtype(d: Dtype) -> Option<DType> {
    match d {
        Dtype::F32 => Some(DType::F32),
        Dtype::F16 => Some(DType::F16),
        Dtype::BF16 => Some(DType::Bf16),
        _ => None,
    }
}

fn encode<E: Element>(xs: &[E]) -> Vec<u8> {
    let mut out = Vec::with_capacity(xs.len() * E::DTYPE.size());
    for x in xs {
        let f = x.to_f32();
        // `to_f32` is exact and the value came from `E`, so rounding back is the identity.
        match E::DTYPE {
            DType::F32 => out.extend_from_slice(&f.to_le_bytes()),
            DType::F16 => out.extend_from_slice(&half::f16::from_f32(f).to_bits().to_le_bytes()),
            DType::Bf16 => out.extend_from_slice(&half::bf16::from_f32(f).to_bits().to_le_bytes()),
        }
    }
    out
}

/// Decodes `bytes` stored as `E` (the caller checked the dtype and length).
fn decode<E: Element>(bytes: &[u8]) -> Vec<E> {
    match E::DTYPE {
        DType::F32 => bytes
            .chunks_exact(4)
            .map(|c| E::from_f32(f32::from_le_bytes([c[0], c[1], c[2], c[3]])))
            .collect(),
        DType::F16 => bytes
            .chunks_exact(2)
            .map(|c| E::from_f32(half::f16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32()))
            .collect(),
        DType::Bf16 => bytes
            .chunks_exact(2)
            .map(|c| E::from_f32(half::bf16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32()))
            .collect(),
    }
}

/// Decodes any stored float tensor to f32.
fn decode_f32(dtype: DType, bytes: &[u8]) -> Vec<f32> {
    match dtype {
        DType::F32 => decode::<f32>(bytes),
        DType::F16 => decode::<half::f16>(bytes)
            .into_iter()
            .map(|x| x.to_f32())
            .collect(),
        DType::Bf16 => decode::<half::bf16>(bytes)
            .into_iter()
            .map(|x| x.to_f32())
            .collect(),
    }
}

struct OwnedView {
    dtype: Dtype,
    shape: Vec<usize>,
    data: Vec<u8>,
}

impl View for &OwnedView {
    fn dtype(&self) -> Dtype {
        self.dtype
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> std::borrow::Cow<'_, [u8]> {
        std::borrow::Cow::Borrowed(&self.data)
    }
    fn data_len(&self) -> usize {
        self.data.len()
    }
}

/// The header checksum: every metadata entry but the checksum itself, then every tensor's
/// key, dtype and shape, in sorted order. Tensor bytes have their own checksums in the index,
/// which this covers.
fn header_checksum<'k>(
    meta: &BTreeMap<String, String>,
    tensors: impl Iterator<Item = (&'k str, Dtype, &'k [usize])>,
) -> String {
    let mut h = Fnv64::default();
    for (k, v) in meta.iter().filter(|(k, _)| k.as_str() != KEY_CHECKSUM) {
        h.write(k.as_bytes());
        h.write(&[0xff]);
        h.write(v.as_bytes());
        h.write(&[0xff]);
    }
    let mut ts: Vec<_> = tensors.collect();
    ts.sort_by(|a, b| a.0.cmp(b.0));
    for (k, d, shape) in ts {
        h.write(k.as_bytes());
        h.write(&[0xff]);
        h.write(d.to_string().as_bytes());
        h.write(&[0xff]);
        for &s in shape {
            h.write(&(s as u64).to_le_bytes());
        }
        h.write(&[0xfe]);
    }
    format!("{:016x}", h.finish())
}

fn checked_len(shape: &[usize]) -> Option<usize> {
    shape.iter().try_fold(1usize, |a, &b| a.checked_mul(b))
}

/// `Group 1 (AdamW-SAGE)`-style description for errors.
fn describe(config: &Config, index: usize, g: &ParamGroup) -> String {
    format!(
        "group {index} ({}{})",
        config.algorithm.name(),
        if g.sage { "-SAGE" } else { "" }
    )
}

/// A state problem from sage-core's check ([`StateLayout::check`]) as an error naming the
/// buffer's key, with `context` after sage-core's wording.
fn state_problem(name: &str, p: ParamProblem, context: &str) -> CheckpointError {
    let tensor = match p {
        ParamProblem::MissingState { buffer, .. }
        | ParamProblem::UnexpectedState { buffer }
        | ParamProblem::StateLength { buffer, .. } => format!("{name}.{buffer}"),
        _ => name.to_string(),
    };
    CheckpointError::tensor(tensor, format!("{p}{context}"))
}

/// Refuses a count that cannot advance (its next update could not be counted).
fn check_step(tensor: &str, step: u64) -> Result<(), CheckpointError> {
    if step == u64::MAX {
        Err(CheckpointError::tensor(
            tensor,
            format!(
                "{}: its next update could not be counted",
                ParamProblem::StepOverflow { step }
            ),
        ))
    } else {
        Ok(())
    }
}

/// The first stored value of `slot` that a run cannot resume from, as `(index, value)`:
/// NaN or ±Inf anywhere (θ, `m`, `v`, `ibar`), and a negative value in `v` (Adam's second
/// moment, Adamax's `u`: both are ≥ 0 by construction, and `√v` of a negative one is NaN) or
/// in `ibar` (a mean of `|θ·g|`). `-0.0` is 0. `bytes` are little-endian `dtype` elements.
fn first_bad_value(slot: Slot, dtype: DType, bytes: &[u8]) -> Option<(usize, f32)> {
    let nonneg = matches!(slot, Slot::State(Buffer::V) | Slot::State(Buffer::Ibar));
    let bad = |x: f32| !x.is_finite() || (nonneg && x < 0.0);
    let size = dtype.size();
    bytes
        .chunks_exact(size)
        .map(|c| match dtype {
            DType::F32 => f32::from_le_bytes([c[0], c[1], c[2], c[3]]),
            DType::F16 => half::f16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32(),
            DType::Bf16 => half::bf16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32(),
        })
        .enumerate()
        .find(|&(_, x)| bad(x))
}

/// Refuses stored values that would poison the next step ([`first_bad_value`]), naming the
/// buffer's key (`enc.weight.v`), the element and the value.
fn check_values(
    key: &str,
    slot: Slot,
    algorithm: &str,
    dtype: DType,
    bytes: &[u8],
) -> Result<(), CheckpointError> {
    let Some((i, x)) = first_bad_value(slot, dtype, bytes) else {
        return Ok(());
    };
    let what = match slot {
        Slot::Param => "the parameter θ must be finite".to_string(),
        Slot::State(Buffer::M) => "`m` (the first moment or momentum buffer) must be finite".into(),
        Slot::State(Buffer::V) if algorithm == "Adamax" => {
            "`v` (Adamax's infinity norm u) must be finite and ≥ 0".to_string()
        }
        Slot::State(Buffer::V) => {
            format!("`v` ({algorithm}'s second moment) must be finite and ≥ 0")
        }
        Slot::State(Buffer::Ibar) => {
            "`ibar` (SAGE's smoothed sensitivity) must be finite and ≥ 0".to_string()
        }
    };
    Err(CheckpointError::tensor(
        key,
        format!("element {i} is {x}: {what}; resuming from it would make the parameters NaN"),
    ))
}

// ---------------------------------------------------------------------------------------
// Save.

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
struct Collect<'c, B> {
    backend: &'c mut B,
    config: &'c Config,
    groups: &'c [ParamGroup],
    names: BTreeSet<String>,
    keys: BTreeSet<String>,
    index: Vec<IndexEntry>,
    views: Vec<(String, OwnedView)>,
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
    tensors: SafeTensors<'data>,
    version: u32,
    step: u64,
    config: Config,
    groups: Vec<ParamGroup>,
    params: Vec<ParamInfo>,
    by_name: BTreeMap<String, usize>,
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
struct CheckTargets<'c, 'data, B> {
    ckpt: &'c Checkpoint<'data>,
    backend: &'c B,
    seen: BTreeSet<String>,
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
type Targets<'e, B, P, S> = (
    Option<&'e mut <B as Backend>::Buf<P>>,
    [(Buffer, Option<&'e mut <B as Backend>::Buf<S>>); 3],
);

/// The buffers an entry restores, in the order every restore pass walks them: θ (when it
/// is restored), then each present state buffer.
fn targets<'e, B: HostBuffers, P: Element, S: Element>(
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
struct Snapshot<'c, B> {
    backend: &'c mut B,
    /// One `Vec<E>` per target buffer, in [`targets`] order.
    saved: Vec<Box<dyn Any + Send>>,
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
struct WriteTargets<'c, 'data, B> {
    ckpt: &'c Checkpoint<'data>,
    backend: &'c mut B,
    /// Buffers written completely so far (in [`targets`] order).
    done: usize,
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
struct Rollback<'c, B> {
    backend: &'c mut B,
    saved: &'c [Box<dyn Any + Send>],
    upto: usize,
    at: usize,
    unknown: Vec<String>,
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
struct SetCounts<'c, 'data> {
    ckpt: &'c Checkpoint<'data>,
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

/// Writes `bytes` to `path` atomically and durably: a crash or power loss at any moment
/// leaves either the old file or the complete new one under `path`, never a truncated one.
///
/// - The bytes go to a new temporary file beside `path` (same directory, so the rename
///   cannot cross file systems), named `.{file name}.{pid}.{counter}.{time}.tmp` and created
///   with `create_new` (`O_EXCL`): it is never an existing file or a symlink planted there,
///   and two saves at once — threads or processes — each write their own.
/// - The file is flushed to disk (`fsync`), renamed over `path`, and then the directory is
///   flushed too (on Unix), so the rename itself survives a power loss.
/// - On any failure the temporary file is removed and the error returned; `path` is left as
///   it was (unless only the final directory flush failed: the new file is then in place).
///
/// Concurrent saves to one path leave one of them complete under `path` (the last rename).
pub fn write_file(path: impl AsRef<std::path::Path>, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    use std::sync::atomic::{AtomicU64, Ordering};
    static COUNTER: AtomicU64 = AtomicU64::new(0);

    let path = path.as_ref();
    let name = path.file_name().ok_or_else(|| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("{}: not a file path", path.display()),
        )
    })?;
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => std::path::Path::new("."),
    };
    let (mut file, tmp) = {
        let mut attempt = 0;
        loop {
            let nanos = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.subsec_nanos());
            let mut tmp_name = std::ffi::OsString::from(".");
            tmp_name.push(name);
            tmp_name.push(format!(
                ".{}.{}.{nanos:08x}.tmp",
                std::process::id(),
                COUNTER.fetch_add(1, Ordering::Relaxed)
            ));
            let tmp = dir.join(tmp_name);
            match std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&tmp)
            {
                Ok(f) => break (f, tmp),
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && attempt < 100 => {
                    attempt += 1;
                }
                Err(e) => return Err(e),
            }
        }
    };
    let written = file.write_all(bytes).and_then(|()| file.sync_all());
    drop(file);
    let written = written.and_then(|()| std::fs::rename(&tmp, path));
    if let Err(e) = written {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    sync_dir(dir)
}

/// Flushes a directory's entries (a rename in it) to disk.
#[cfg(unix)]
fn sync_dir(dir: &std::path::Path) -> std::io::Result<()> {
    std::fs::File::open(dir)?.sync_all()
}

/// Windows has no directory handle to flush: `MoveFileEx` is as durable as it gets there.
#[cfg(not(unix))]
fn sync_dir(_: &std::path::Path) -> std::io::Result<()> {
    Ok(())
}
