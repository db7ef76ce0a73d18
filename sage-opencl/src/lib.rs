//! # sage-opencl
//!
//! The OpenCL backend of [`sage_core`]: SAGE's update on any OpenCL 1.2 device — GPUs from
//! every vendor, edge boards (Mali, Adreno, Intel integrated graphics) and CPUs through PoCL.
//!
//! - Buffers are [`ClBuffer`]s: device memory stepped in place. A framework that keeps its
//!   tensors in `ocl::Buffer`s wraps them without a copy ([`ClBuffer::from_ocl`]);
//!   [`OpenCl::upload`] and [`OpenCl::download`] serve everyone else.
//! - The per-element math is `sage_core`'s shared GPU kernel body (the one the CUDA backend
//!   uses), compiled behind a small OpenCL prelude, with FMA contraction off and correctly
//!   rounded division and square root where the device offers them, so results match the CPU.
//! - One fused pass per tensor; [`Backend::step_tensors`](sage_core::Backend::step_tensors)
//!   and gradient norms take up to 16 tensors per launch, and any number in one launch when
//!   they are cut from the same buffers ([`OpenCl::slab`]). A step whose tensors all went
//!   into one such launch keeps its launch tables on the device; the next step over the same
//!   layout (checked tensor by tensor: same buffers, offsets, lengths) uploads only its
//!   coefficients ([`LaunchCounts::reused`]).
//! - A step checks everything it can before its first launch: lengths, every buffer's context
//!   ([`Error::ForeignBuffer`]), and that no buffer it writes aliases another buffer of the
//!   step ([`Error::Aliased`]: a [`ClBuffer`] clone passed twice, θ as its own gradient,
//!   overlapping sub-buffers). A driver failure after the first launch of a multi-tensor step
//!   is [`Error::Partial`], which says how many tensors were stepped.
//! - Gradient norms follow sage-core's chunk grid ([`sage_core::norm`]): one work-group per
//!   4096-element chunk writes its partial (in `double` where the device has `cl_khr_fp64`,
//!   else in `float` scaled by a power of two so no finite input overflows; a fixed tree, so a
//!   partial depends on its chunk's contents only), all partials come back in one read, and
//!   each tensor's are folded on the host in chunk order, exactly as `norm::fold` does.
//! - [`OpenCl`] implements [`HostBuffers`](sage_core::HostBuffers): checkpoints and the
//!   conformance suite copy its buffers without depending on this crate.
//! - Storage: f32, f16 and bf16 parameters and state, computed in f32. f16 goes through
//!   `vload_half`/`vstore_half_rte`, which are core OpenCL, so it works without `cl_khr_fp16`.
//! - Device choice by index or name ([`Select`], or `SAGE_OPENCL_DEVICE=P:D|name` for
//!   [`OpenCl::new`]); no platform is [`Error::NotAvailable`], never a panic. Programs are built
//!   on first use, once per device, and a build failure returns the compiler's log.
//!
//! Linking needs the OpenCL ICD loader (`libOpenCL.so`, Debian `ocl-icd-opencl-dev`); a machine
//! with the loader but no driver builds, runs, and reports the backend as not available.
#![deny(missing_docs)]

mod backend;
mod buffer;
mod device;
mod error;
mod reuse;
pub mod source;
mod table;

pub use backend::{Builder, LaunchCounts, OpenCl, CPU_ELEMENTS_PER_ITEM};
pub use buffer::ClBuffer;
pub use device::{devices, DeviceDesc, Select};
pub use error::Error;
