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
//!
//! ```
//! use sage_core::{Algorithm, Config, ParamGroup};
//! use sage_cpu::Cpu;
//! use sage_dist::{DistTensor, ShardedOptimizer, TensorSpec, ThreadComm};
//!
//! let tensors = vec![TensorSpec::new("w", 10_000), TensorSpec::new("b", 100).group(1)];
//! let cfg = Config::reference(Algorithm::adamw(), 1e-3).global_clip(1.0);
//! let groups = vec![ParamGroup::sage().weight_decay(0.01), ParamGroup::plain()];
//! // Two ranks (threads here; `mpiexec -n 2` with `sage_dist::mpi::MpiComm` in a real job).
//! let out = ThreadComm::run(2, |mut comm| {
//!     let mut opt =
//!         ShardedOptimizer::<Cpu, f32, f32>::new(Cpu, cfg, groups.clone(), tensors.clone(), &comm)
//!             .unwrap();
//!     // Every rank holds the whole parameters and the (data-parallel, summed) gradients.
//!     let (mut w, mut b) = (vec![0.5f32; 10_000], vec![0.1f32; 100]);
//!     let (gw, gb) = (vec![1e-3f32; 10_000], vec![2e-3f32; 100]);
//!     let report = opt
//!         .step(
//!             &mut comm,
//!             &mut [DistTensor::new(&mut w[..], &gw[..]), DistTensor::new(&mut b[..], &gb[..])],
//!         )
//!         .unwrap();
//!     assert!(report.report.applied());
//!     (w, b, opt.state_bytes(), opt.total_state_bytes())
//! });
//! // The same parameters on every rank; each rank holds about half of the state.
//! assert_eq!((&out[0].0, &out[0].1), (&out[1].0, &out[1].1));
//! assert_eq!(out[0].2 + out[1].2, out[0].3);
//! ```
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
