//! AVX-512F + BW: 16 lanes.

use core::arch::x86_64::*;

use super::Lanes;

/// AVX-512 Foundation (which includes the 512-bit f16 conversions) and Byte/Word (masked
/// 16-bit loads for the tails of f16 and bf16 buffers). With `BF16`, also AVX512-BF16: bf16
/// stores round with its one conversion instruction where that gives `half`'s bits.
#[derive(Clone, Copy)]
pub(crate) struct Avx512<const BF16: bool>;

impl<const BF16: bool> Lanes for Avx512<BF16> {
    type F = __m512;
    const N: usize = 16;

    #[inline(always)]
    unsafe fn splat(x: f32) -> __m512 {
        _mm512_set1_ps(x)
    }
    #[inline(always)]
    unsafe fn add(a: __m512, b: __m512) -> __m512 {
        _mm512_add_ps(a, b)
    }
    #[inline(always)]
    unsafe fn sub(a: __m512, b: __m512) -> __m512 {
        _mm512_sub_ps(a, b)
    }
    #[inline(always)]
    unsafe fn mul(a: __m512, b: __m512) -> __m512 {
        _mm512_mul_ps(a, b)
    }
    #[inline(always)]
    unsafe fn div(a: __m512, b: __m512) -> __m512 {
        _mm512_div_ps(a, b)
    }
    #[inline(always)]
    unsafe fn fmadd(a: __m512, b: __m512, c: __m512) -> __m512 {
        _mm512_fmadd_ps(a, b, c)
    }
    #[inline(always)]
    unsafe fn fnmadd(a: __m512, b: __m512, c: __m512) -> __m512 {
        _mm512_fnmadd_ps(a, b, c)
    }
    #[inline(always)]
    unsafe fn all_zero_or_in(a: __m512, lo: __m512, hi: __m512) -> bool {
        // Ordered compares: a NaN lane is in no range.
        let ge = _mm512_cmp_ps_mask::<_CMP_GE_OQ>(a, lo);
        let within = _mm512_mask_cmp_ps_mask::<_CMP_LE_OQ>(ge, a, hi);
        // +0 by its bits: −0 compares equal to 0 but is not on the fused path.
        let zero = _mm512_cmpeq_epi32_mask(_mm512_castps_si512(a), _mm512_setzero_si512());
        within | zero == 0xFFFF
    }
    #[inline(always)]
    unsafe fn sqrt(a: __m512) -> __m512 {
        _mm512_sqrt_ps(a)
    }
    #[inline(always)]
    unsafe fn abs(a: __m512) -> __m512 {
        // `_mm512_and_ps` needs AVX-512DQ; the integer AND is Foundation.
        let bits = _mm512_and_si512(_mm512_castps_si512(a), _mm512_set1_epi32(0x7fff_ffff));
        _mm512_castsi512_ps(bits)
    }
    type D = __m512d;
    #[inline(always)]
    unsafe fn zero_d() -> __m512d {
        _mm512_setzero_pd()
    }
    #[inline(always)]
    unsafe fn add_d(a: __m512d, b: __m512d) -> __m512d {
        _mm512_add_pd(a, b)
    }
    #[inline(always)]
    unsafe fn add_squares(acc: [__m512d; 2], v: __m512) -> [__m512d; 2] {
        let lo = _mm512_cvtps_pd(_mm512_castps512_ps256(v));
        // `_mm512_extractf32x8_ps` needs AVX-512DQ; the f64x4 extract is Foundation.
        let hi = _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(
            _mm512_castps_pd(v),
        )));
        [
            _mm512_add_pd(acc[0], _mm512_mul_pd(lo, lo)),
            _mm512_add_pd(acc[1], _mm512_mul_pd(hi, hi)),
        ]
    }
    #[inline(always)]
    unsafe fn add_wide(acc: [__m512d; 2], v: __m512) -> [__m512d; 2] {
        let lo = _mm512_cvtps_pd(_mm512_castps512_ps256(v));
        let hi = _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(
            _mm512_castps_pd(v),
        )));
        [_mm512_add_pd(acc[0], lo), _mm512_add_pd(acc[1], hi)]
    }
    #[inline(always)]
    unsafe fn sum_d(a: __m512d) -> f64 {
        let mut x = [0f64; 8];
        _mm512_storeu_pd(x.as_mut_ptr(), a);
        ((x[0] + x[1]) + (x[2] + x[3])) + ((x[4] + x[5]) + (x[6] + x[7]))
    }
    const MASKED: bool = true;
    #[inline(always)]
    unsafe fn load_f32_first(p: *const f32, n: usize) -> __m512 {
        _mm512_maskz_loadu_ps(first(n), p)
    }
    #[inline(always)]
    unsafe fn store_f32_first(p: *mut f32, v: __m512, n: usize) {
        _mm512_mask_storeu_ps(p, first(n), v)
    }
    type C = __m512i;
    #[inline(always)]
    unsafe fn zero_c() -> __m512i {
        _mm512_setzero_si512()
    }
    #[inline(always)]
    unsafe fn add_non_finite(c: __m512i, v: __m512) -> __m512i {
        let d = _mm512_sub_ps(v, v);
        let bad = _mm512_cmp_ps_mask::<_CMP_UNORD_Q>(d, d);
        _mm512_mask_sub_epi32(c, bad, c, _mm512_set1_epi32(-1))
    }
    #[inline(always)]
    unsafe fn add_non_finite_first(c: __m512i, v: __m512, n: usize) -> __m512i {
        let d = _mm512_sub_ps(v, v);
        let bad = _mm512_cmp_ps_mask::<_CMP_UNORD_Q>(d, d) & first(n);
        _mm512_mask_sub_epi32(c, bad, c, _mm512_set1_epi32(-1))
    }
    #[inline(always)]
    unsafe fn sum_c(c: __m512i) -> u64 {
        let mut x = [0u32; 16];
        _mm512_storeu_si512(x.as_mut_ptr().cast(), c);
        x.iter().map(|&n| u64::from(n)).sum()
    }
    #[inline(always)]
    unsafe fn count_non_finite(v: __m512) -> u32 {
        // |v| < ∞ is false for ±Inf and (unordered) for NaN.
        let finite = _mm512_cmp_ps_mask::<_CMP_LT_OQ>(Self::abs(v), _mm512_set1_ps(f32::INFINITY));
        16 - (finite as u32).count_ones()
    }
    #[inline(always)]
    unsafe fn maxnum(a: __m512, b: __m512) -> __m512 {
        // As for AVX2: maxps yields its second operand on NaN; then a NaN `a` takes `b`.
        let r = _mm512_max_ps(b, a);
        _mm512_mask_blend_ps(_mm512_cmp_ps_mask::<_CMP_UNORD_Q>(a, a), r, b)
    }
    #[inline(always)]
    unsafe fn load_f32(p: *const f32) -> __m512 {
        _mm512_loadu_ps(p)
    }
    #[inline(always)]
    unsafe fn store_f32(p: *mut f32, v: __m512) {
        _mm512_storeu_ps(p, v)
    }
    #[inline(always)]
    unsafe fn load_f16(p: *const u16) -> __m512 {
        _mm512_cvtph_ps(_mm256_loadu_si256(p.cast()))
    }
    #[inline(always)]
    unsafe fn store_round_f16(p: *mut u16, v: __m512) -> __m512 {
        let h = _mm512_cvtps_ph::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(v);
        _mm256_storeu_si256(p.cast(), h);
        _mm512_cvtph_ps(h)
    }
    #[inline(always)]
    unsafe fn load_bf16(p: *const u16) -> __m512 {
        widen_bf16(_mm256_loadu_si256(p.cast()))
    }
    #[inline(always)]
    unsafe fn prefetch(p: *const u8) {
        _mm_prefetch::<_MM_HINT_T0>(p.cast())
    }
    #[inline(always)]
    unsafe fn store_round_bf16(p: *mut u16, v: __m512) -> __m512 {
        if let Some(h) = native_bf16::<BF16>(v) {
            _mm256_storeu_si256(p.cast(), h);
            return widen_bf16_bits(h);
        }
        let hi = bf16_bits(v);
        _mm256_storeu_si256(p.cast(), _mm512_cvtepi32_epi16(hi));
        _mm512_castsi512_ps(_mm512_slli_epi32::<16>(hi))
    }
    const MASKED_16: bool = true;
    #[inline(always)]
    unsafe fn load_f16_first(p: *const u16, n: usize) -> __m512 {
        _mm512_cvtph_ps(load_u16_first(p, n))
    }
    #[inline(always)]
    unsafe fn store_round_f16_first(p: *mut u16, v: __m512, n: usize) -> __m512 {
        let h = _mm512_cvtps_ph::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(v);
        _mm512_mask_cvtepi32_storeu_epi16(p.cast(), first(n), _mm512_cvtepu16_epi32(h));
        _mm512_cvtph_ps(h)
    }
    #[inline(always)]
    unsafe fn load_bf16_first(p: *const u16, n: usize) -> __m512 {
        widen_bf16(load_u16_first(p, n))
    }
    #[inline(always)]
    unsafe fn store_round_bf16_first(p: *mut u16, v: __m512, n: usize) -> __m512 {
        if let Some(h) = native_bf16::<BF16>(v) {
            _mm512_mask_cvtepi32_storeu_epi16(p.cast(), first(n), _mm512_cvtepu16_epi32(h));
            return widen_bf16_bits(h);
        }
        let hi = bf16_bits(v);
        _mm512_mask_cvtepi32_storeu_epi16(p.cast(), first(n), hi);
        _mm512_castsi512_ps(_mm512_slli_epi32::<16>(hi))
    }
}

/// The first `n < 16` 16-bit values at `p` (the rest 0), touching no memory past them.
#[inline(always)]
unsafe fn load_u16_first(p: *const u16, n: usize) -> __m256i {
    _mm512_castsi512_si256(_mm512_maskz_loadu_epi16(
        ((1u32 << n) - 1) as __mmask32,
        p.cast(),
    ))
}

/// `v` rounded to bf16 by AVX512-BF16's `vcvtneps2bf16` (nearest even; a NaN becomes the
/// quiet NaN `half` gives) when `BF16` and no lane is subnormal: the instruction treats
/// subnormal inputs as zero, where `half::bf16::from_f32` rounds them, so those registers
/// (rare in training) take the integer path. A normal f32 never rounds to a subnormal bf16
/// (same exponent range), so the output side needs no check.
#[inline(always)]
unsafe fn native_bf16<const BF16: bool>(v: __m512) -> Option<__m256i> {
    if !BF16 {
        return None;
    }
    let mag = _mm512_and_si512(_mm512_castps_si512(v), _mm512_set1_epi32(0x7fff_ffff));
    // 1 <= mag <= 0x007f_ffff: subnormal (unsigned compare of mag - 1).
    let sub = _mm512_cmplt_epu32_mask(
        _mm512_sub_epi32(mag, _mm512_set1_epi32(1)),
        _mm512_set1_epi32(0x007f_ffff),
    );
    if sub != 0 {
        return None;
    }
    Some(core::mem::transmute::<__m256bh, __m256i>(
        _mm512_cvtneps_pbh(v),
    ))
}

/// Stored bf16 bits widened to f32 lanes (as stored: `half::bf16::to_f32` of what
/// `from_f32` gave, so no quieting is needed).
#[inline(always)]
unsafe fn widen_bf16_bits(h: __m256i) -> __m512 {
    _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(h)))
}

/// bf16 bits widened to f32 lanes, NaNs quieted as `half::bf16::to_f32` does.
#[inline(always)]
unsafe fn widen_bf16(h: __m256i) -> __m512 {
    let x = _mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(h));
    let q = _mm512_mask_or_epi32(x, is_nan_bits(x), x, _mm512_set1_epi32(0x0040_0000));
    _mm512_castsi512_ps(q)
}

/// `v` rounded to bf16 exactly as `half::bf16::from_f32` (nearest even, NaN kept quiet): the
/// bf16 bits in the low half of each 32-bit lane.
#[inline(always)]
unsafe fn bf16_bits(v: __m512) -> __m512i {
    let x = _mm512_castps_si512(v);
    // Nearest even: add 0x7fff plus the lowest kept bit, then truncate.
    let lsb = _mm512_and_si512(_mm512_srli_epi32::<16>(x), _mm512_set1_epi32(1));
    let rounded = _mm512_add_epi32(x, _mm512_add_epi32(_mm512_set1_epi32(0x7fff), lsb));
    let quiet = _mm512_or_si512(x, _mm512_set1_epi32(0x0040_0000));
    let r = _mm512_mask_blend_epi32(is_nan_bits(x), rounded, quiet);
    _mm512_srli_epi32::<16>(r)
}

/// The first `n < 16` lanes.
#[inline(always)]
fn first(n: usize) -> __mmask16 {
    ((1u32 << n) - 1) as __mmask16
}

/// Lanes where the f32 bits `x` are a NaN.
#[inline(always)]
unsafe fn is_nan_bits(x: __m512i) -> __mmask16 {
    let mag = _mm512_and_si512(x, _mm512_set1_epi32(0x7fff_ffff));
    _mm512_cmpgt_epi32_mask(mag, _mm512_set1_epi32(0x7f80_0000))
}
