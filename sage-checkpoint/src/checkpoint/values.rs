//! Tensor bytes: storage types to and from safetensors, encoding, the header checksum, and
//! the checks every restored value passes.

use super::*;

pub(super) fn st_dtype(d: DType) -> Dtype {
    match d {
        DType::F32 => Dtype::F32,
        DType::F16 => Dtype::F16,
        DType::Bf16 => Dtype::BF16,
    }
}

pub(super) fn sage_dtype(d: Dtype) -> Option<DType> {
    match d {
        Dtype::F32 => Some(DType::F32),
        Dtype::F16 => Some(DType::F16),
        Dtype::BF16 => Some(DType::Bf16),
        _ => None,
    }
}

pub(super) fn encode<E: Element>(xs: &[E]) -> Vec<u8> {
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
pub(super) fn decode<E: Element>(bytes: &[u8]) -> Vec<E> {
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
pub(super) fn decode_f32(dtype: DType, bytes: &[u8]) -> Vec<f32> {
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

pub(super) struct OwnedView {
    pub(super) dtype: Dtype,
    pub(super) shape: Vec<usize>,
    pub(super) data: Vec<u8>,
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
pub(super) fn header_checksum<'k>(
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

pub(super) fn checked_len(shape: &[usize]) -> Option<usize> {
    shape.iter().try_fold(1usize, |a, &b| a.checked_mul(b))
}

/// `Group 1 (AdamW-SAGE)`-style description for errors.
pub(super) fn describe(config: &Config, index: usize, g: &ParamGroup) -> String {
    format!(
        "group {index} ({}{})",
        config.algorithm.name(),
        if g.sage { "-SAGE" } else { "" }
    )
}

/// A state problem from sage-core's check ([`StateLayout::check`]) as an error naming the
/// buffer's key, with `context` after sage-core's wording.
pub(super) fn state_problem(name: &str, p: ParamProblem, context: &str) -> CheckpointError {
    let tensor = match p {
        ParamProblem::MissingState { buffer, .. }
        | ParamProblem::UnexpectedState { buffer }
        | ParamProblem::StateLength { buffer, .. } => format!("{name}.{buffer}"),
        _ => name.to_string(),
    };
    CheckpointError::tensor(tensor, format!("{p}{context}"))
}

/// Refuses a count that cannot advance (its next update could not be counted).
pub(super) fn check_step(tensor: &str, step: u64) -> Result<(), CheckpointError> {
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
pub(super) fn first_bad_value(slot: Slot, dtype: DType, bytes: &[u8]) -> Option<(usize, f32)> {
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
pub(super) fn check_values(
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
