//! # sage-dist
//!
//! SAGE with its optimizer state sharded over the ranks of a data-parallel job (ZeRO stage 1),
//! over MPI (feature `mpi`) or NCCL (feature `nccl`), bit for bit the step one process takes.
//!
//! - [`Layout`]: the model's tensors flattened and cut into one contiguous range per rank on
//!   the norm grid's chunk boundaries (balanced to within 4096 elements).
//! - [`Communicator`] / [`BufferComm`]: the collectives it needs — an all-reduce of a few
//!   `f64`, an all-gather of `f64`s, and in-place all-reduce, reduce-scatter and all-gather of
//!   backend buffers — implemented by [`SelfComm`], [`ThreadComm`] (ranks as threads),
//!   `MpiComm` and `NcclComm`.
//! - [`ShardedOptimizer`]: each rank keeps the state of its pieces only, gathers the gradient
//!   norms' chunk partials and reduces them in the contract's order (so clipping and the
//!   non-finite guard decide once, identically, everywhere), steps its pieces through any
//!   sage-core backend that can lend views of its buffers ([`Views`]), and all-gathers the
//!   parameters.
//! - [`data_parallel`]: the gradient exchange before the step (DDP's all-reduce, with zeros
//!   from ranks that did not use a tensor, or a reduce-scatter).
//! - [`checkpoint`]: sharded checkpoints (sage-checkpoint files per rank plus the layout),
//!   loaded onto any world size.
#![deny(missing_docs)]

pub mod checkpoint;
pub mod comm;
pub mod data_parallel;
pub mod error;
pub mod layout;
#[cfg(feature = "mpi")]
pub mod mpi;
#[cfg(feature = "nccl")]
pub mod nccl;
pub mod sharded;
pub mod views;

pub use checkpoint::LoadReport;
pub use comm::{BufferComm, CommError, Communicator, SelfComm, ThreadComm};
pub use error::DistError;
pub use layout::{Layout, Piece, TensorSpec};
pub use sharded::{DistReport, DistTensor, ShardedOptimizer, StepTimes};
pub use views::{HostSlices, Views};
