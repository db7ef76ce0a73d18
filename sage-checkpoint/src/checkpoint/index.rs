//! The checkpoint's index of parameters, as stored in its metadata ([`ParamInfo`]).

use super::*;

#[derive(Serialize, Deserialize, Clone, Debug)]
#[serde(deny_unknown_fields)]
pub(super) struct IndexBuffer {
    pub(super) buffer: String,
    pub(super) fnv: String,
}

#[derive(Serialize, Deserialize, Clone, Debug)]
#[serde(deny_unknown_fields)]
pub(super) struct IndexEntry {
    pub(super) name: String,
    pub(super) group: usize,
    pub(super) shape: Vec<usize>,
    /// The tensor's own step count (format version 2 on; version 1 has none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(super) step: Option<u64>,
    pub(super) buffers: Vec<IndexBuffer>,
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
