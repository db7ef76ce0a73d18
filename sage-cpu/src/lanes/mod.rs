//! Vector registers of f32 lanes, one implementation per instruction set.
//!
//! The kernels in [`crate::kernel`] are written once over [`Lanes`]; each instruction set
//! supplies the handful of operations they use. Every method is `#[inline(always)]` and
//! `unsafe`: it may only run on a CPU with the instruction set, inside a function compiled
//! with its `#[target_feature]`s (so the intrinsics inline), and pointer arguments must be
//! valid for [`Lanes::N`] elements. Arithmetic is plain IEEE mul/add/sub/div/sqrt, never
//! fused, so a lane computes exactly what [`sage_core::formula`] computes for one element;
//! the one fused sequence ([`crate::kernel`]'s division by a per-step constant) rounds to
//! exactly the quotient the formula's division gives.

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
    /// `a·b + c`, rounded once.
    unsafe fn fmadd(a: Self::F, b: Self::F, c: Self::F) -> Self::F;
    /// `c − a·b`, rounded once.
    unsafe fn fnmadd(a: Self::F, b: Self::F, c: Self::F) -> Self::F;
    /// Whether every lane is +0 (not −0) or in `[lo, hi]` (false for a NaN lane).
    unsafe fn all_zero_or_in(a: Self::F, lo: Self::F, hi: Self::F) -> bool;
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
    /// A register of f64 lanes (half as many as `F`), for the squared norm.
    type D: Copy;
    unsafe fn zero_d() -> Self::D;
    unsafe fn add_d(a: Self::D, b: Self::D) -> Self::D;
    /// `[lo + a², hi + b²]`: the lanes of `v` widened to f64 (low half into `acc[0]`, high
    /// half into `acc[1]`), squared and added (plain mul and add: exact squares, one
    /// rounding per add).
    unsafe fn add_squares(acc: [Self::D; 2], v: Self::F) -> [Self::D; 2];
    /// `[lo + a, hi + b]`: the lanes of `v` widened to f64 and added (as `add_squares`,
    /// without squaring).
    unsafe fn add_wide(acc: [Self::D; 2], v: Self::F) -> [Self::D; 2];
    /// The lanes of `a` summed in a fixed order.
    unsafe fn sum_d(a: Self::D) -> f64;
    /// Per-lane counters of non-finite values (u32 lanes; a kernel call covers at most
    /// 2³⁰ elements, so they cannot wrap).
    type C: Copy;
    unsafe fn zero_c() -> Self::C;
    /// `c` plus 1 in each lane where `v` is NaN or ±Inf (`v − v` is NaN exactly there): a
    /// subtract, a compare and an integer add, with no reduction per register.
    unsafe fn add_non_finite(c: Self::C, v: Self::F) -> Self::C;
    /// As [`add_non_finite`](Self::add_non_finite) for the first `n < N` lanes only.
    unsafe fn add_non_finite_first(c: Self::C, v: Self::F, n: usize) -> Self::C;
    /// The counters summed.
    unsafe fn sum_c(c: Self::C) -> u64;
    /// How many lanes of `v` are NaN or ±Inf.
    unsafe fn count_non_finite(v: Self::F) -> u32;
    /// Whether [`load_f32_first`](Self::load_f32_first) and the other `_first` methods are
    /// masked instructions (touching no memory past `n` lanes), so that a tail of f32 buffers
    /// runs in place; otherwise the kernels take tails through stack buffers.
    const MASKED: bool = false;
    /// The first `n < N` lanes from `p` (the rest 0); `p` is valid for `n` elements only.
    #[inline(always)]
    unsafe fn load_f32_first(p: *const f32, n: usize) -> Self::F {
        let mut x = [0f32; 16];
        core::ptr::copy_nonoverlapping(p, x.as_mut_ptr(), n);
        Self::load_f32(x.as_ptr())
    }
    /// Stores the first `n < N` lanes of `v` at `p` (valid for `n` elements only).
    #[inline(always)]
    unsafe fn store_f32_first(p: *mut f32, v: Self::F, n: usize) {
        let mut x = [0f32; 16];
        Self::store_f32(x.as_mut_ptr(), v);
        core::ptr::copy_nonoverlapping(x.as_ptr(), p, n);
    }
    /// Whether the 16-bit `_first` methods are masked instructions too. The kernels use them
    /// only then (otherwise tails of f16/bf16 buffers take their copy path); the defaults
    /// below, through stack buffers, keep the methods correct for any lanes.
    const MASKED_16: bool = false;
    /// As [`load_f32_first`](Self::load_f32_first) for f16 bits.
    #[inline(always)]
    unsafe fn load_f16_first(p: *const u16, n: usize) -> Self::F {
        Self::load_f16(first_u16(p, n).as_ptr())
    }
    /// As [`store_round_f16`](Self::store_round_f16) for the first `n < N` lanes (`p` valid
    /// for `n` elements only).
    #[inline(always)]
    unsafe fn store_round_f16_first(p: *mut u16, v: Self::F, n: usize) -> Self::F {
        store_u16_first(p, n, |x| Self::store_round_f16(x, v))
    }
    /// As [`load_f32_first`](Self::load_f32_first) for bf16 bits.
    #[inline(always)]
    unsafe fn load_bf16_first(p: *const u16, n: usize) -> Self::F {
        Self::load_bf16(first_u16(p, n).as_ptr())
    }
    /// As [`store_round_bf16`](Self::store_round_bf16) for the first `n < N` lanes (`p`
    /// valid for `n` elements only).
    #[inline(always)]
    unsafe fn store_round_bf16_first(p: *mut u16, v: Self::F, n: usize) -> Self::F {
        store_u16_first(p, n, |x| Self::store_round_bf16(x, v))
    }
    /// Hints that the cache line at `p` will be read soon (never faults).
    #[inline(always)]
    unsafe fn prefetch(p: *const u8) {
        let _ = p;
    }
}

/// The first `n` values at `p`, then zeros: a register's worth for an unmasked load.
#[inline(always)]
unsafe fn first_u16(p: *const u16, n: usize) -> [u16; 16] {
    let mut x = [0u16; 16];
    core::ptr::copy_nonoverlapping(p, x.as_mut_ptr(), n);
    x
}

/// A whole-register 16-bit store (`store` writes a register at the pointer it is given) of
/// which only the first `n` values reach `p`, through a stack buffer.
#[inline(always)]
unsafe fn store_u16_first<F>(p: *mut u16, n: usize, store: impl FnOnce(*mut u16) -> F) -> F {
    let mut x = [0u16; 16];
    let r = store(x.as_mut_ptr());
    core::ptr::copy_nonoverlapping(x.as_ptr(), p, n);
    r
}

/// Whether `L` runs a tail of buffers of `P` and `S` in place, with masked loads and stores.
#[inline(always)]
pub(crate) fn masked_tail<L: Lanes, P: Element, S: Element>() -> bool {
    let masked = |d: DType| d == DType::F32 || L::MASKED_16;
    L::MASKED && masked(P::DTYPE) && masked(S::DTYPE)
}

/// How a kernel reaches one register's elements: all of them ([`Whole`]), or the first `n`
/// ([`First`], for tails: in place where [`masked_tail`] says so).
pub(crate) trait Access<L: Lanes>: Copy {
    /// As [`load`].
    unsafe fn load<E: Element>(self, p: *const E) -> L::F;
    /// As [`store_round`].
    unsafe fn store_round<E: Element>(self, p: *mut E, v: L::F) -> L::F;
    /// `c` plus 1 in each lane reached where `v` is NaN or ±Inf.
    unsafe fn add_non_finite(self, c: L::C, v: L::F) -> L::C;
}

/// Every lane.
#[derive(Clone, Copy)]
pub(crate) struct Whole;

impl<L: Lanes> Access<L> for Whole {
    #[inline(always)]
    unsafe fn load<E: Element>(self, p: *const E) -> L::F {
        load::<L, E>(p)
    }
    #[inline(always)]
    unsafe fn store_round<E: Element>(self, p: *mut E, v: L::F) -> L::F {
        store_round::<L, E>(p, v)
    }
    #[inline(always)]
    unsafe fn add_non_finite(self, c: L::C, v: L::F) -> L::C {
        L::add_non_finite(c, v)
    }
}

/// The first `n < N` lanes.
#[derive(Clone, Copy)]
pub(crate) struct First(pub usize);

impl<L: Lanes> Access<L> for First {
    #[inline(always)]
    unsafe fn load<E: Element>(self, p: *const E) -> L::F {
        match E::DTYPE {
            DType::F32 => L::load_f32_first(p.cast(), self.0),
            DType::F16 => L::load_f16_first(p.cast(), self.0),
            DType::Bf16 => L::load_bf16_first(p.cast(), self.0),
        }
    }
    #[inline(always)]
    unsafe fn store_round<E: Element>(self, p: *mut E, v: L::F) -> L::F {
        match E::DTYPE {
            DType::F32 => {
                L::store_f32_first(p.cast(), v, self.0);
                v
            }
            DType::F16 => L::store_round_f16_first(p.cast(), v, self.0),
            DType::Bf16 => L::store_round_bf16_first(p.cast(), v, self.0),
        }
    }
    #[inline(always)]
    unsafe fn add_non_finite(self, c: L::C, v: L::F) -> L::C {
        L::add_non_finite_first(c, v, self.0)
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
