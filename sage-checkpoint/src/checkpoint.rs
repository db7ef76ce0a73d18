//! Saving and loading: [`Entry`] / [`EntryMut`] name a parameter's buffers on any backend,
//! [`save`] writes them with the step counter and configuration, [`Checkpoint::parse`]
//! validates a file completely, and [`load`] checks it against the tensors to restore before
//! writing into any of them.

use std::collections::{BTreeMap, BTreeSet};

use safetensors::tensor::{Dtype, View};
use safetensors::SafeTensors;
use serde::{Deserialize, Serialize};

use sage_core::{Backend, Config, DType, Element, Optimizer, ParamGroup, StateLayout};

use crate::error::CheckpointError;
use crate::format::{
    compare_config, config_pairs, parse_config, Fnv64, FORMAT_NAME, FORMAT_VERSION, KEY_CHECKSUM,
    KEY_FORMAT, KEY_PARAMS, KEY_STEP, KEY_VERSION,
};
use crate::host::HostAccess;

/// One buffer of a parameter, as stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Buffer {
    /// The parameter θ itself (optional: frameworks often save weights elsewhere).
    Param,
    /// First moment / SGD momentum buffer.
    M,
    /// Second moment / Adamax infinity norm.
    V,
    /// SAGE's smoothed sensitivity Ī.
    Ibar,
}

impl Buffer {
    /// The three state buffers, in `[m, v, ibar]` order.
    pub const STATE: [Buffer; 3] = [Buffer::M, Buffer::V, Buffer::Ibar];

    /// Name in the index (`param`, `m`, `v`, `ibar`).
    pub const fn name(self) -> &'static str {
        match self {
            Buffer::Param => "param",
            Buffer::M => "m",
            Buffer::V => "v",
            Buffer::Ibar => "ibar",
        }
    }

    fn parse(s: &str) -> Option<Self> {
        [Buffer::Param, Buffer::M, Buffer::V, Buffer::Ibar]
            .into_iter()
            .find(|b| b.name() == s)
    }

    /// The safetensors key of this buffer of parameter `name`: the name itself for θ (so the
    /// file also reads as model weights), `{name}.m`, `{name}.v`, `{name}.ibar` for state (the
    /// names sage-candle uses).
    pub fn key(self, name: &str) -> String {
        match self {
            Buffer::Param => name.to_string(),
            b => format!("{name}.{}", b.name()),
        }
    }

    fn needed(self, layout: StateLayout) -> bool {
        match self {
            Buffer::Param => false,
            Buffer::M => layout.m,
            Buffer::V => layout.v,
            Buffer::Ibar => layout.ibar,
        }
    }
}

/// A parameter's buffers to save: name, group, optional shape, optional θ, and the state
/// buffers its group's layout has. Built like [`sage_core::ParamTensor`]:
///
/// ```
/// use sage_checkpoint::Entry;
/// use sage_cpu::Cpu;
/// let (m, v, ibar) = (vec![0f32; 6], vec![0f32; 6], vec![0f32; 6]);
/// let e = Entry::<Cpu, f32, f32>::new("layer0.weight")
///     .shape(&[2, 3])
///     .m(&m[..]).v(&v[..]).ibar(&ibar[..]);
/// assert_eq!(e.name, "layer0.weight");
/// ```
pub struct Entry<'a, B: Backend + ?Sized, P: Element, S: Element> {
    /// Stable parameter name (the key in the file).
    pub name: &'a str,
    /// Parameter group index.
    pub group: usize,
    /// Shape (default: one dimension of the buffer's length).
    pub shape: Option<&'a [usize]>,
    /// θ, when the checkpoint should carry it.
    pub param: Option<&'a B::Buf<P>>,
    /// `m`, `v`, `ibar`.
    pub state: [Option<&'a B::Buf<S>>; 3],
}

impl<'a, B: Backend + ?Sized, S: Element> Entry<'a, B, S, S> {
    /// An entry named `name`, group 0, no buffers yet.
    pub fn new(name: &'a str) -> Self {
        Entry {
            name,
            group: 0,
            shape: None,
            param: None,
            state: [None, None, None],
        }
    }
}

impl<'a, B: Backend + ?Sized, P: Element, S: Element> Entry<'a, B, P, S> {
    /// Sets the group.
    pub fn group(mut self, g: usize) -> Self {
        self.group = g;
        self
    }
    /// Sets the shape (its product must be the buffers' length).
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
    /// Sets `m`.
    pub fn m(mut self, b: &'a B::Buf<S>) -> Self {
        self.state[0] = Some(b);
        self
    }
    /// Sets `v`.
    pub fn v(mut self, b: &'a B::Buf<S>) -> Self {
        self.state[1] = Some(b);
        self
    }
    /// Sets `ibar`.
    pub fn ibar(mut self, b: &'a B::Buf<S>) -> Self {
        self.state[2] = Some(b);
        self
    }
    /// Sets all three state slots at once (absent ones as `None`).
    pub fn state(
        mut self,
        m: Option<&'a B::Buf<S>>,
        v: Option<&'a B::Buf<S>>,
        ibar: Option<&'a B::Buf<S>>,
    ) -> Self {
        self.state = [m, v, ibar];
        self
    }
}

/// A parameter's buffers to restore into; the mutable twin of [`Entry`].
pub struct EntryMut<'a, B: Backend + ?Sized, P: Element, S: Element> {
    /// Stable parameter name.
    pub name: &'a str,
    /// Parameter group index (must equal the checkpoint's).
    pub group: usize,
    /// Shape to check against the file (default: only the length is checked).
    pub shape: Option<&'a [usize]>,
    /// θ, when it should be restored (then the checkpoint must hold it).
    pub param: Option<&'a mut B::Buf<P>>,
    /// `m`, `v`, `ibar`.
    pub state: [Option<&'a mut B::Buf<S>>; 3],
}

impl<'a, B: Backend + ?Sized, S: Element> EntryMut<'a, B, S, S> {
    /// An entry named `name`, group 0, no buffers yet.
    pub fn new(name: &'a str) -> Self {
        EntryMut {
            name,
            group: 0,
            shape: None,
            param: None,
            state: [None, None, None],
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
    /// Sets `m`.
    pub fn m(mut self, b: &'a mut B::Buf<S>) -> Self {
        self.state[0] = Some(b);
        self
    }
    /// Sets `v`.
    pub fn v(mut self, b: &'a mut B::Buf<S>) -> Self {
        self.state[1] = Some(b);
        self
    }
    /// Sets `ibar`.
    pub fn ibar(mut self, b: &'a mut B::Buf<S>) -> Self {
        self.state[2] = Some(b);
        self
    }
    /// Sets all three state slots at once (absent ones as `None`).
    pub fn state(
        mut self,
        m: Option<&'a mut B::Buf<S>>,
        v: Option<&'a mut B::Buf<S>>,
        ibar: Option<&'a mut B::Buf<S>>,
    ) -> Self {
        self.state = [m, v, ibar];
        self
    }
}

/// How strictly [`load`] compares the checkpoint's configuration with the optimizer's.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum ConfigCheck {
    /// Every field and group must be equal (the default: a resumed run is the same run).
    #[default]
    Exact,
    /// Only what decides the state and its meaning must agree (the algorithm, SGD momentum
    /// on/off, the number of groups and which have SAGE): for resuming with, say, a new rate.
    StateCompatible,
}

// ---------------------------------------------------------------------------------------
// The index stored under `sage.params`.

#[derive(Serialize, Deserialize, Clone, Debug)]
struct IndexBuffer {
    buffer: String,
    fnv: String,
}

#[derive(Serialize, Deserialize, Clone, Debug)]
struct IndexEntry {
    name: String,
    group: usize,
    shape: Vec<usize>,
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
    /// Which buffers are stored.
    pub buffers: BTreeSet<Buffer>,
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

// ---------------------------------------------------------------------------------------
// Save.

/// Writes a checkpoint: the step counter, `config` and `groups`, and every buffer of
/// `entries` (read from `backend`), keyed by parameter name.
///
/// Refused with an error naming the tensor: an empty or repeated name, an unknown group,
/// state buffers that do not match the group's layout, lengths that disagree with each other
/// or with the shape, two keys that collide.
pub fn save<B: HostAccess, P: Element, S: Element>(
    backend: &mut B,
    step: u64,
    config: &Config,
    groups: &[ParamGroup],
    entries: &[Entry<'_, B, P, S>],
) -> Result<Vec<u8>, CheckpointError> {
    config
        .validate()
        .map_err(|e| CheckpointError::format(format!("config.{}", e.field), e.to_string()))?;
    for (i, g) in groups.iter().enumerate() {
        g.validate(i).map_err(|e| {
            CheckpointError::format(format!("group.{i}.{}", e.field), e.to_string())
        })?;
    }
    let mut names = BTreeSet::new();
    let mut keys = BTreeSet::new();
    let mut index = Vec::with_capacity(entries.len());
    let mut views: Vec<(String, OwnedView)> = Vec::new();
    for e in entries {
        let name = e.name;
        if name.is_empty() {
            return Err(CheckpointError::tensor("", "empty parameter name"));
        }
        if !names.insert(name) {
            return Err(CheckpointError::tensor(name, "name given twice"));
        }
        let group = groups.get(e.group).ok_or_else(|| {
            CheckpointError::tensor(
                name,
                format!("group {} does not exist ({} groups)", e.group, groups.len()),
            )
        })?;
        let layout = config.state_layout(group.sage);
        // Every buffer's length, to agree with each other and with the shape.
        let mut len: Option<usize> = None;
        let mut agree = |what: Buffer, n: usize| -> Result<(), CheckpointError> {
            match len {
                Some(l) if l != n => Err(CheckpointError::tensor(
                    what.key(name),
                    format!("{n} elements, but the parameter's other buffers have {l}"),
                )),
                _ => {
                    len = Some(n);
                    Ok(())
                }
            }
        };
        if let Some(p) = e.param {
            agree(Buffer::Param, backend.len(p))?;
        }
        for (k, which) in Buffer::STATE.into_iter().enumerate() {
            match (which.needed(layout), e.state[k]) {
                (true, None) => {
                    return Err(CheckpointError::tensor(
                        name,
                        format!(
                            "no `{}` buffer given, but group {} ({}{}) has one",
                            which.name(),
                            e.group,
                            config.algorithm.name(),
                            if group.sage { "-SAGE" } else { "" }
                        ),
                    ))
                }
                (false, Some(_)) => {
                    return Err(CheckpointError::tensor(
                        name,
                        format!(
                            "a `{}` buffer was given, but group {} ({}{}) has none",
                            which.name(),
                            e.group,
                            config.algorithm.name(),
                            if group.sage { "-SAGE" } else { "" }
                        ),
                    ))
                }
                (true, Some(b)) => agree(which, backend.len(b))?,
                (false, None) => {}
            }
        }
        let shape: Vec<usize> = match (e.shape, len) {
            (Some(s), Some(n)) => {
                if checked_len(s) != Some(n) {
                    return Err(CheckpointError::tensor(
                        name,
                        format!("shape {s:?} does not hold its {n} elements"),
                    ));
                }
                s.to_vec()
            }
            (Some(s), None) => s.to_vec(),
            (None, n) => vec![n.unwrap_or(0)],
        };
        let mut buffers = Vec::new();
        let mut push =
            |which: Buffer, dtype: DType, data: Vec<u8>| -> Result<(), CheckpointError> {
                let key = which.key(name);
                if !keys.insert(key.clone()) {
                    return Err(CheckpointError::tensor(
                        key,
                        "this key is taken by another parameter's buffer (rename one)",
                    ));
                }
                buffers.push(IndexBuffer {
                    buffer: which.name().into(),
                    fnv: Fnv64::hex(&data),
                });
                views.push((
                    key,
                    OwnedView {
                        dtype: st_dtype(dtype),
                        shape: shape.clone(),
                        data,
                    },
                ));
                Ok(())
            };
        if let Some(p) = e.param {
            let host = backend
                .to_host(p)
                .map_err(|error| CheckpointError::Backend {
                    tensor: Buffer::Param.key(name),
                    error,
                })?;
            push(Buffer::Param, P::DTYPE, encode(&host))?;
        }
        for (k, which) in Buffer::STATE.into_iter().enumerate() {
            if let Some(b) = e.state[k] {
                let host = backend
                    .to_host(b)
                    .map_err(|error| CheckpointError::Backend {
                        tensor: which.key(name),
                        error,
                    })?;
                push(which, S::DTYPE, encode(&host))?;
            }
        }
        index.push(IndexEntry {
            name: name.to_string(),
            group: e.group,
            shape,
            buffers,
        });
    }
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

/// [`save`] with the optimizer's step counter, configuration and groups.
pub fn save_optimizer<B: HostAccess, G: AsRef<[ParamGroup]>, P: Element, S: Element>(
    opt: &mut Optimizer<B, G>,
    entries: &[Entry<'_, B, P, S>],
) -> Result<Vec<u8>, CheckpointError> {
    let (step, config, groups) = (opt.steps(), *opt.config(), opt.groups().to_vec());
    save(opt.backend_mut(), step, &config, &groups, entries)
}

// ---------------------------------------------------------------------------------------
// Parse.

/// A checkpoint read and validated completely: format, version, checksums of the header and
/// of every tensor, the configuration, and the index against the stored tensors (each
/// parameter has exactly the buffers its group's layout needs, with its shape and one
/// storage type per kind). Borrows the file's bytes; nothing is copied until a buffer is read.
pub struct Checkpoint<'data> {
    tensors: SafeTensors<'data>,
    step: u64,
    config: Config,
    groups: Vec<ParamGroup>,
    params: Vec<ParamInfo>,
    by_name: BTreeMap<String, usize>,
    state_dtype: Option<DType>,
    param_dtype: Option<DType>,
}

impl std::fmt::Debug for Checkpoint<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Checkpoint")
            .field("step", &self.step)
            .field("config", &self.config)
            .field("groups", &self.groups)
            .field("params", &self.params)
            .field("state_dtype", &self.state_dtype)
            .field("param_dtype", &self.param_dtype)
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
        let version = meta
            .get(KEY_VERSION)
            .ok_or_else(|| CheckpointError::format(KEY_VERSION, "missing"))?;
        if version.parse::<u32>().ok() != Some(FORMAT_VERSION) {
            return Err(CheckpointError::Version {
                found: version.clone(),
                supported: FORMAT_VERSION,
            });
        }
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
        let (config, groups) = parse_config(&meta)?;
        let index: Vec<IndexEntry> = serde_json::from_str(
            meta.get(KEY_PARAMS)
                .ok_or_else(|| CheckpointError::format(KEY_PARAMS, "missing"))?,
        )
        .map_err(|e| CheckpointError::format(KEY_PARAMS, format!("malformed index: {e}")))?;

        let mut params = Vec::with_capacity(index.len());
        let mut by_name = BTreeMap::new();
        let mut used_keys = BTreeSet::new();
        let (mut state_dtype, mut param_dtype) = (None, None);
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
            let layout = config.state_layout(group.sage);
            let mut present = BTreeSet::new();
            for b in &e.buffers {
                let which = Buffer::parse(&b.buffer).ok_or_else(|| {
                    CheckpointError::tensor(&name, format!("unknown buffer {:?}", b.buffer))
                })?;
                if !present.insert(which) {
                    return Err(CheckpointError::tensor(
                        &name,
                        format!("buffer `{}` listed twice", which.name()),
                    ));
                }
                let key = which.key(&name);
                let view = tensors.tensor(&key).map_err(|_| {
                    CheckpointError::tensor(&key, "listed in the index but not stored")
                })?;
                if view.shape() != e.shape.as_slice() {
                    return Err(CheckpointError::tensor(
                        &key,
                        format!(
                            "stored with shape {:?}, the index says {:?}",
                            view.shape(),
                            e.shape
                        ),
                    ));
                }
                let dtype = sage_dtype(view.dtype()).ok_or_else(|| {
                    CheckpointError::tensor(
                        &key,
                        format!("dtype {} is not a SAGE storage type", view.dtype()),
                    )
                })?;
                let slot = if which == Buffer::Param {
                    &mut param_dtype
                } else {
                    &mut state_dtype
                };
                match *slot {
                    Some(d) if d != dtype => {
                        return Err(CheckpointError::tensor(
                            &key,
                            format!("stored as {dtype}, other buffers of its kind as {d}"),
                        ))
                    }
                    _ => *slot = Some(dtype),
                }
                if Fnv64::hex(view.data()) != b.fnv {
                    return Err(CheckpointError::Checksum { tensor: key });
                }
                used_keys.insert(key);
            }
            for which in Buffer::STATE {
                match (which.needed(layout), present.contains(&which)) {
                    (true, false) => {
                        return Err(CheckpointError::tensor(
                            &name,
                            format!("no `{}` buffer stored, but its group has one", which.name()),
                        ))
                    }
                    (false, true) => {
                        return Err(CheckpointError::tensor(
                            &name,
                            format!(
                                "a `{}` buffer is stored, but its group has none",
                                which.name()
                            ),
                        ))
                    }
                    _ => {}
                }
            }
            params.push(ParamInfo {
                name,
                group: e.group,
                shape: e.shape,
                len,
                buffers: present,
            });
        }
        if let Some((k, _, _)) = infos.iter().find(|(k, _, _)| !used_keys.contains(k)) {
            return Err(CheckpointError::tensor(
                k,
                "stored but not listed in the index",
            ));
        }
        Ok(Checkpoint {
            tensors,
            step,
            config,
            groups,
            params,
            by_name,
            state_dtype,
            param_dtype,
        })
    }

    /// The step counter at save time (the next update is `step() + 1`).
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
    /// Storage type of the state buffers (`None` when there are none).
    pub fn state_dtype(&self) -> Option<DType> {
        self.state_dtype
    }
    /// Storage type of the parameters (`None` when θ was not saved).
    pub fn param_dtype(&self) -> Option<DType> {
        self.param_dtype
    }

    fn dtype_of(&self, which: Buffer) -> Option<DType> {
        if which == Buffer::Param {
            self.param_dtype
        } else {
            self.state_dtype
        }
    }

    fn bytes(&self, name: &str, which: Buffer) -> Option<&'data [u8]> {
        let info = self.param(name)?;
        if !info.buffers.contains(&which) {
            return None;
        }
        self.tensors.tensor(&which.key(name)).ok().map(|v| v.data())
    }

    /// Buffer `which` of parameter `name`, widened to f32 (`None` when it is not stored).
    pub fn read_f32(&self, name: &str, which: Buffer) -> Option<Vec<f32>> {
        let d = self.dtype_of(which)?;
        self.bytes(name, which).map(|b| decode_f32(d, b))
    }

    /// Buffer `which` of parameter `name` in its stored type `E`; an error names the tensor
    /// when it is absent or stored as another type.
    pub fn read<E: Element>(&self, name: &str, which: Buffer) -> Result<Vec<E>, CheckpointError> {
        let key = which.key(name);
        let bytes = self
            .bytes(name, which)
            .ok_or_else(|| CheckpointError::tensor(&key, "not in the checkpoint"))?;
        match self.dtype_of(which) {
            Some(d) if d == E::DTYPE => Ok(decode::<E>(bytes)),
            Some(d) => Err(CheckpointError::tensor(
                key,
                format!("stored as {d}, requested as {}", E::DTYPE),
            )),
            None => Err(CheckpointError::tensor(key, "not in the checkpoint")),
        }
    }

    /// Checks `entries` against this checkpoint — the same names (none missing, none extra),
    /// groups, shapes or lengths, buffers, storage types — and only then copies every buffer
    /// into them through `backend`.
    ///
    /// Nothing is written unless every check passes. A backend copy that fails midway (a
    /// device error, not a file problem) is reported naming the tensor; buffers copied before
    /// it hold the checkpoint's values.
    pub fn restore<B: HostAccess, P: Element, S: Element>(
        &self,
        backend: &mut B,
        entries: &mut [EntryMut<'_, B, P, S>],
    ) -> Result<(), CheckpointError> {
        let mut seen = BTreeSet::new();
        for e in entries.iter() {
            let name = e.name;
            if !seen.insert(name) {
                return Err(CheckpointError::tensor(name, "given twice"));
            }
            let info = self.param(name).ok_or_else(|| {
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
            let slots: [(Buffer, Option<usize>); 4] = [
                (Buffer::Param, e.param.as_deref().map(|b| backend.len(b))),
                (Buffer::M, e.state[0].as_deref().map(|b| backend.len(b))),
                (Buffer::V, e.state[1].as_deref().map(|b| backend.len(b))),
                (Buffer::Ibar, e.state[2].as_deref().map(|b| backend.len(b))),
            ];
            for (which, given) in slots {
                let key = which.key(name);
                let stored = info.buffers.contains(&which);
                match (stored, given) {
                    (true, None) if which != Buffer::Param => {
                        return Err(CheckpointError::tensor(
                            key,
                            "in the checkpoint, but no buffer was given to restore it into",
                        ))
                    }
                    // θ in the file but not asked for: the framework restores weights itself.
                    (true, None) => {}
                    (false, Some(_)) => {
                        return Err(CheckpointError::tensor(
                            key,
                            "a buffer was given, but the checkpoint has none",
                        ))
                    }
                    (true, Some(n)) => {
                        if n != info.len {
                            return Err(CheckpointError::tensor(
                                key,
                                format!(
                                    "{} elements in the checkpoint, the buffer has {n}",
                                    info.len
                                ),
                            ));
                        }
                        let want = if which == Buffer::Param {
                            P::DTYPE
                        } else {
                            S::DTYPE
                        };
                        let have = self.dtype_of(which).unwrap_or(want);
                        if have != want {
                            return Err(CheckpointError::tensor(
                                key,
                                format!("stored as {have}, the buffer holds {want}"),
                            ));
                        }
                    }
                    (false, None) => {}
                }
            }
        }
        if let Some(missing) = self.params.iter().find(|p| !seen.contains(p.name.as_str())) {
            return Err(CheckpointError::tensor(
                &missing.name,
                "in the checkpoint but not among the tensors to restore (a partial load is refused)",
            ));
        }
        // Everything checked: now write.
        for e in entries.iter_mut() {
            let name = e.name;
            if let Some(p) = e.param.as_deref_mut() {
                let data: Vec<P> = self.read(name, Buffer::Param)?;
                backend
                    .write_host(p, &data)
                    .map_err(|error| CheckpointError::Backend {
                        tensor: Buffer::Param.key(name),
                        error,
                    })?;
            }
            for (k, which) in Buffer::STATE.into_iter().enumerate() {
                if let Some(b) = e.state[k].as_deref_mut() {
                    let data: Vec<S> = self.read(name, which)?;
                    backend
                        .write_host(b, &data)
                        .map_err(|error| CheckpointError::Backend {
                            tensor: which.key(name),
                            error,
                        })?;
                }
            }
        }
        Ok(())
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

/// Loads `bytes` into `opt` and `entries`: parses and validates the whole file, compares its
/// configuration with the optimizer's under `check`, checks every entry, and only then writes
/// every buffer and sets the step counter. Returns the parsed checkpoint.
///
/// Any mismatch or corruption is an `Err` naming the tensor (or field) and the reason, and
/// leaves the optimizer and every buffer untouched.
pub fn load<'d, B: HostAccess, G: AsRef<[ParamGroup]>, P: Element, S: Element>(
    opt: &mut Optimizer<B, G>,
    bytes: &'d [u8],
    entries: &mut [EntryMut<'_, B, P, S>],
    check: ConfigCheck,
) -> Result<Checkpoint<'d>, CheckpointError> {
    let ckpt = Checkpoint::parse(bytes)?;
    ckpt.check_config(opt.config(), opt.groups(), check)?;
    ckpt.restore(opt.backend_mut(), entries)?;
    opt.set_steps(ckpt.step());
    Ok(ckpt)
}

/// Writes `bytes` to `path` atomically (a temporary file beside it, then a rename), so a crash
/// mid-write never leaves a truncated checkpoint under the real name.
pub fn write_file(path: impl AsRef<std::path::Path>, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let path = path.as_ref();
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = std::path::PathBuf::from(tmp);
    {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, path)
}
