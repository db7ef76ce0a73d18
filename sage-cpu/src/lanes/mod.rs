//! Vector registers of f32 lanes, one implementation per instruction set.
//!
//! The kernels in [`crate::kernel`] are written once over [`Lanes`]; each instruction set
//! supplies the handful of operations they use. Every method is `#[inline(always)]` and
//! `unsafe`: it may only run on a CPU with the instruction set, inside a function compiled
//! with its `#[target_feature]`s (so the intrinsics inline), and pointer arguments must be
//! valid for [`Lanes::N`] elements. Arithmetic is plain IEEE mul/add/sub/div/sqrt, never
//! fused, so a lane computes exactly what [`sage_core::formula`] computes for one element.

#[cfg(target_arch = "x86_64")]
pub(crate) mod avx2;
#[cfg(target_arch = "x86_64")]
pub(crate) mod avx512;
#[cfg(target_arch = "aarch64")]
pub(crate) mod neon;

use sage_core::{DType, Element};

/// A vector of `N` f32 lanes and the operations the kernels need.
pub(crate) trait Lanes: Copy {
    /// The register type.
    type F: Copy;
    /// Lanes per register.
    const N: usize;
    unsafe fn splat(x: f32) -> Self::F;
    unsafe fn add(a: Self::F, b: Self::F) -> Self::F;
    unsafe fn sub(a: Self::F, b: Self::F) -> Self::F;
    unsafe fn mul(a: Self::F, b: Self::F) -> Self::F;
    unsafe fn div(a: Self::F, b: Self::F) -> Self::F;
    unsafe fn sqrt(a: Self::F) -> Self::F;
    unsafe fn abs(a: Self::F) -> Self::F;
    /// `f32::max` per lane: a NaN operand yields the other operand.
    unsafe fn maxnum(a: Self::F, b: Self::F) -> Self::F;
    unsafe fn load_f32(p: *const f32) -> Self::F;
    unsafe fn store_f32(p: *mut f32, v: Self::F);
    unsafe fn load_f16(p: *const u16) -> Self::F;
    /// Rounds to f16 (nearest even), stores, and returns the stored values widened.
    unsafe fn store_round_f16(p: *mut u16, v: Self::F) -> Self::F;
    unsafe fn load_bf16(p: *const u16) -> Self::F;
    /// Rounds to bf16 exactly as `half::bf16::from_f32` (nearest even, NaN kept quiet),
    /// stores, and returns the stored values widened as `half::bf16::to_f32` would.
    unsafe fn store_round_bf16(p: *mut u16, v: Self::F) -> Self::F;
    /// How many lanes of `v` are NaN or ±Inf.
    unsafe fn count_non_finite(v: Self::F) -> u32;
    /// Hints that the cache line at `p` will be read soon (never faults).
    #[inline(always)]
    unsafe fn prefetch(p: *const u8) {
        let _ = p;
    }
}

/// Loads `N` elements of storage type `E` widened to f32. `E::DTYPE` is a constant, so the
/// match folds away.
#[inline(always)]
pub(crate) unsafe fn load<L: Lanes, E: Element>(p: *const E) -> L::F {
    match E::DTYPE {
        DType::F32 => L::load_f32(p.cast()),
        DType::F16 => L::load_f16(p.cast()),
        DType::Bf16 => L::load_bf16(p.cast()),
    }
}

/// Stores `v` rounded to `E` and returns what was stored, widened: the value a later read of
/// the buffer gives (as `formula::step` reads a state value back after storing it).
#[inline(always)]
pub(crate) unsafe fn store_round<L: Lanes, E: Element>(p: *mut E, v: L::F) -> L::F {
    match E::DTYPE {
        DType::F32 => {
            L::store_f32(p.cast(), v);
            v
        }
        DType::F16 => L::store_round_f16(p.cast(), v),
        DType::Bf16 => L::store_round_bf16(p.cast(), v),
    }
}
