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

mod entry;
mod file;
mod index;
mod load;
mod save;
mod values;

pub use entry::{Entry, EntryMut, Slot};
pub use file::write_file;
pub use index::ParamInfo;
use index::*;
pub use load::{load, Checkpoint, ConfigCheck};
pub use save::{save, save_optimizer};
use values::*;
