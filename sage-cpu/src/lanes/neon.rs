//! NEON (aarch64 Advanced SIMD): 4 lanes.

use core::arch::aarch64::*;

use sage_core::{f16, Element};

use super::Lanes;

/// aarch64 NEON.
#[derive(Clone, Copy)]
pub(crate) struct Neon;

impl Lanes for Neon {
    type F = float32x4_t;
    const N: usize = 4;

    #[inline(always)]
    unsafe fn splat(x: f32) -> float32x4_t {
        vdupq_n_f32(x)
    }
    #[inline(always)]
    unsafe fn add(a: float32x4_t, b: float32x4_t) -> float32x4_t {
        vaddq_f32(a, b)
    }
    #[inline(always)]
    unsafe fn sub(a: float32x4_t, b: float32x4_t) -> float32x4_t {
        vsubq_f32(a, b)
    }
    #[inline(always)]
    unsafe fn mul(a: float32x4_t, b: float32x4_t) -> float32x4_t {
        vmulq_f32(a, b)
    }
    #[inline(always)]
    unsafe fn div(a: float32x4_t, b: float32x4_t) -> float32x4_t {
        vdivq_f32(a, b)
    }
    #[inline(always)]
    unsafe fn fmadd(a: float32x4_t, b: float32x4_t, c: float32x4_t) -> float32x4_t {
        vfmaq_f32(c, a, b)
    }
    #[inline(always)]
    unsafe fn fnmadd(a: float32x4_t, b: float32x4_t, c: float32x4_t) -> float32x4_t {
        vfmsq_f32(c, a, b)
    }
    #[inline(always)]
    unsafe fn all_zero_or_in(a: float32x4_t, lo: float32x4_t, hi: float32x4_t) -> bool {
        // Ordered compares: a NaN lane is in no range.
        let within = vandq_u32(vcgeq_f32(a, lo), vcleq_f32(a, hi));
        // +0 by its bits: −0 compares equal to 0 but is not on the fused path.
        let zero = vceqzq_u32(vreinterpretq_u32_f32(a));
        vminvq_u32(vorrq_u32(within, zero)) == u32::MAX
    }
    #[inline(always)]
    unsafe fn sqrt(a: float32x4_t) -> float32x4_t {
        vsqrtq_f32(a)
    }
    #[inline(always)]
    unsafe fn abs(a: float32x4_t) -> float32x4_t {
        vabsq_f32(a)
    }
    type C = uint32x4_t;
    #[inline(always)]
    unsafe fn zero_c() -> uint32x4_t {
        vdupq_n_u32(0)
    }
    #[inline(always)]
    unsafe fn add_non_finite(c: uint32x4_t, v: float32x4_t) -> uint32x4_t {
        let d = vsubq_f32(v, v);
        // All-ones where `d` is not NaN (v finite); their complement counts.
        vsubq_u32(c, vmvnq_u32(vceqq_f32(d, d)))
    }
    #[inline(always)]
    unsafe fn add_non_finite_first(c: uint32x4_t, v: float32x4_t, n: usize) -> uint32x4_t {
        let d = vsubq_f32(v, v);
        let idx: [u32; 4] = [0, 1, 2, 3];
        let first = vcltq_u32(vld1q_u32(idx.as_ptr()), vdupq_n_u32(n as u32));
        vsubq_u32(c, vandq_u32(vmvnq_u32(vceqq_f32(d, d)), first))
    }
    #[inline(always)]
    unsafe fn sum_c(c: uint32x4_t) -> u64 {
        let mut x = [0u32; 4];
        vst1q_u32(x.as_mut_ptr(), c);
        x.iter().map(|&n| u64::from(n)).sum()
    }
    type D = float64x2_t;
    #[inline(always)]
    unsafe fn zero_d() -> float64x2_t {
        vdupq_n_f64(0.0)
    }
    #[inline(always)]
    unsafe fn add_d(a: float64x2_t, b: float64x2_t) -> float64x2_t {
        vaddq_f64(a, b)
    }
    #[inline(always)]
    unsafe fn add_squares(acc: [float64x2_t; 2], v: float32x4_t) -> [float64x2_t; 2] {
        let lo = vcvt_f64_f32(vget_low_f32(v));
        let hi = vcvt_high_f64_f32(v);
        [
            vaddq_f64(acc[0], vmulq_f64(lo, lo)),
            vaddq_f64(acc[1], vmulq_f64(hi, hi)),
        ]
    }
    #[inline(always)]
    unsafe fn add_wide(acc: [float64x2_t; 2], v: float32x4_t) -> [float64x2_t; 2] {
        let lo = vcvt_f64_f32(vget_low_f32(v));
        let hi = vcvt_high_f64_f32(v);
        [vaddq_f64(acc[0], lo), vaddq_f64(acc[1], hi)]
    }
    #[inline(always)]
    unsafe fn sum_d(a: float64x2_t) -> f64 {
        vgetq_lane_f64::<0>(a) + vgetq_lane_f64::<1>(a)
    }
    #[inline(always)]
    unsafe fn count_non_finite(v: float32x4_t) -> u32 {
        // |v| < ∞ is all-ones for finite lanes, 0 for ±Inf and NaN.
        let finite = vcltq_f32(vabsq_f32(v), vdupq_n_f32(f32::INFINITY));
        4 - vaddvq_u32(vshrq_n_u32::<31>(finite))
    }
    #[inline(always)]
    unsafe fn maxnum(a: float32x4_t, b: float32x4_t) -> float32x4_t {
        // FMAXNM is IEEE maxNum: a NaN operand yields the other, as f32::max.
        vmaxnmq_f32(a, b)
    }
    #[inline(always)]
    unsafe fn load_f32(p: *const f32) -> float32x4_t {
        vld1q_f32(p)
    }
    #[inline(always)]
    unsafe fn store_f32(p: *mut f32, v: float32x4_t) {
        vst1q_f32(p, v)
    }
    // The f16 NEON conversions need the unstable `f16` vector types, so f16 goes lane by
    // lane through the same conversion the portable path uses.
    #[inline(always)]
    unsafe fn load_f16(p: *const u16) -> float32x4_t {
        let mut w = [0f32; 4];
        for (i, x) in w.iter_mut().enumerate() {
            *x = f16::from_bits(*p.add(i)).to_f32();
        }
        vld1q_f32(w.as_ptr())
    }
    #[inline(always)]
    unsafe fn store_round_f16(p: *mut u16, v: float32x4_t) -> float32x4_t {
        let mut w = [0f32; 4];
        vst1q_f32(w.as_mut_ptr(), v);
        for (i, x) in w.iter_mut().enumerate() {
            let h = <f16 as Element>::from_f32(*x);
            *p.add(i) = h.to_bits();
            *x = h.to_f32();
        }
        vld1q_f32(w.as_ptr())
    }
    #[inline(always)]
    unsafe fn load_bf16(p: *const u16) -> float32x4_t {
        let x = vshll_n_u16::<16>(vld1_u16(p));
        // Quiet NaN lanes, as `half::bf16::to_f32` does.
        let q = vandq_u32(is_nan_bits(x), vdupq_n_u32(0x0040_0000));
        vreinterpretq_f32_u32(vorrq_u32(x, q))
    }
    #[inline(always)]
    unsafe fn store_round_bf16(p: *mut u16, v: float32x4_t) -> float32x4_t {
        let x = vreinterpretq_u32_f32(v);
        // Nearest even: add 0x7fff plus the lowest kept bit, then truncate.
        let lsb = vandq_u32(vshrq_n_u32::<16>(x), vdupq_n_u32(1));
        let rounded = vaddq_u32(x, vaddq_u32(vdupq_n_u32(0x7fff), lsb));
        let quiet = vorrq_u32(x, vdupq_n_u32(0x0040_0000));
        let r = vbslq_u32(is_nan_bits(x), quiet, rounded);
        vst1_u16(p, vshrn_n_u32::<16>(r));
        vreinterpretq_f32_u32(vandq_u32(r, vdupq_n_u32(0xffff_0000)))
    }
}

/// All-ones lanes where the f32 bits `x` are a NaN.
#[inline(always)]
unsafe fn is_nan_bits(x: uint32x4_t) -> uint32x4_t {
    vcgtq_u32(
        vandq_u32(x, vdupq_n_u32(0x7fff_ffff)),
        vdupq_n_u32(0x7f80_0000),
    )
}
