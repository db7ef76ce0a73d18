//! # sage-cpu
//!
//! The CPU backends of [`sage_core`]: buffers are slices (`Buf<E> = [E]`), so any framework
//! that can lend `&mut [f32]` embeds them.
//!
//! - [`Cpu`] ([`portable`]): plain scalar Rust over [`sage_core::formula`]; works without
//!   `std` or an allocator, and is the fallback every faster path is checked against.
//! - [`SimdCpu`]: the fused step as AVX2 (+FMA, F16C), AVX-512 (F + BW) or NEON vector code, one
//!   kernel per case with no branch in the loop, f16 and bf16 converted in registers; the
//!   [`Level`] is detected at run time and can be forced. With `std`, large multi-tensor steps
//!   are shared by a persistent thread pool: small tensors in runs stepped whole, large ones
//!   cut into cache-line-aligned pieces. Results equal [`Cpu`]'s bit for bit.
//!
//! An optimizer step is memory-bound: `sage-bench` (this crate's binary) measures each
//! algorithm against an in-place streaming pass with the same traffic.
#![cfg_attr(not(feature = "std"), no_std)]
#![deny(missing_docs)]

#[cfg(feature = "alloc")]
extern crate alloc;

mod kernel;
mod lanes;
mod level;
#[cfg(feature = "std")]
mod pool;
pub mod portable;
mod simd;
#[cfg(feature = "std")]
mod split;

pub use level::Level;
pub use portable::Cpu;
pub use simd::{SimdCpu, Unavailable, DEFAULT_CHUNK, DEFAULT_MIN_PARALLEL};

// The project README's examples compile and run as doc tests of this crate (they use
// sage-core and sage-cpu).
#[cfg(doctest)]
#[doc = include_str!("../../README.md")]
struct ReadmeDoctests;
