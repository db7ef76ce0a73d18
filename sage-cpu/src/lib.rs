//! # sage-cpu
//!
//! The CPU backend of [`sage_core`]: buffers are slices (`Buf<E> = [E]`), so any framework
//! that can lend `&mut [f32]` embeds it. The [`portable`] path is plain scalar Rust over
//! [`sage_core::formula`], works without `std` or an allocator, and is the fallback every faster
//! path is checked against.
#![cfg_attr(not(feature = "std"), no_std)]
#![deny(missing_docs)]

#[cfg(feature = "alloc")]
extern crate alloc;

pub mod portable;
#[cfg(feature = "alloc")]
pub mod state;

pub use portable::Cpu;
#[cfg(feature = "alloc")]
pub use state::CpuState;
