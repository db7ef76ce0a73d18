//! AVX2 (+FMA, F16C): 8 lanes.

use core::arch::x86_64::*;

use super::Lanes;

/// AVX2 with FMA and F16C.
#[derive(Clone, Copy)]
pub(crate) struct Avx2;

impl Lanes for Avx2 {
    type F = __m256;
    const N: usize = 8;

    #[inline(always)]
    unsafe fn splat(x: f32) -> __m256 {
        _mm256_set1_ps(x)
    }
    #[inline(always)]
    unsafe fn add(a: __m256, b: __m256) -> __m256 {
        _mm256_add_ps(a, b)
    }
    #[inline(always)]
    unsafe fn sub(a: __m256, b: __m256) -> __m256 {
        _mm256_sub_ps(a, b)
    }
    #[inline(always)]
    unsafe fn mul(a: __m256, b: __m256) -> __m256 {
        _mm256_mul_ps(a, b)
    }
    #[inline(always)]
    unsafe fn div(a: __m256, b: __m256) -> __m256 {
        _mm256_div_ps(a, b)
    }
    #[inline(always)]
    unsafe fn fmadd(a: __m256, b: __m256, c: __m256) -> __m256 {
        _mm256_fmadd_ps(a, b, c)
    }
    #[inline(always)]
    unsafe fn fnmadd(a: __m256, b: __m256, c: __m256) -> __m256 {
        _mm256_fnmadd_ps(a, b, c)
    }
    #[inline(always)]
    unsafe fn all_zero_or_in(a: __m256, lo: __m256, hi: __m256) -> bool {
        // Ordered compares: a NaN lane is in no range.
        let within = _mm256_and_ps(
            _mm256_cmp_ps::<_CMP_GE_OQ>(a, lo),
            _mm256_cmp_ps::<_CMP_LE_OQ>(a, hi),
        );
        // +0 by its bits: −0 compares equal to 0 but is not on the fused path.
        let zero = _mm256_cmpeq_epi32(_mm256_castps_si256(a), _mm256_setzero_si256());
        _mm256_movemask_ps(_mm256_or_ps(within, _mm256_castsi256_ps(zero))) == 0xFF
    }
    #[inline(always)]
    unsafe fn sqrt(a: __m256) -> __m256 {
        _mm256_sqrt_ps(a)
    }
    #[inline(always)]
    unsafe fn abs(a: __m256) -> __m256 {
        _mm256_and_ps(a, _mm256_castsi256_ps(_mm256_set1_epi32(0x7fff_ffff)))
    }
    type D = __m256d;
    #[inline(always)]
    unsafe fn zero_d() -> __m256d {
        _mm256_setzero_pd()
    }
    #[inline(always)]
    unsafe fn add_d(a: __m256d, b: __m256d) -> __m256d {
        _mm256_add_pd(a, b)
    }
    #[inline(always)]
    unsafe fn add_squares(acc: [__m256d; 2], v: __m256) -> [__m256d; 2] {
        let lo = _mm256_cvtps_pd(_mm256_castps256_ps128(v));
        let hi = _mm256_cvtps_pd(_mm256_extractf128_ps::<1>(v));
        [
            _mm256_add_pd(acc[0], _mm256_mul_pd(lo, lo)),
            _mm256_add_pd(acc[1], _mm256_mul_pd(hi, hi)),
        ]
    }
    #[inline(always)]
    unsafe fn add_wide(acc: [__m256d; 2], v: __m256) -> [__m256d; 2] {
        let lo = _mm256_cvtps_pd(_mm256_castps256_ps128(v));
        let hi = _mm256_cvtps_pd(_mm256_extractf128_ps::<1>(v));
        [_mm256_add_pd(acc[0], lo), _mm256_add_pd(acc[1], hi)]
    }
    #[inline(always)]
    unsafe fn sum_d(a: __m256d) -> f64 {
        let mut x = [0f64; 4];
        _mm256_storeu_pd(x.as_mut_ptr(), a);
        (x[0] + x[1]) + (x[2] + x[3])
    }
    const MASKED: bool = true;
    #[inline(always)]
    unsafe fn load_f32_first(p: *const f32, n: usize) -> __m256 {
        _mm256_maskload_ps(p, first(n))
    }
    #[inline(always)]
    unsafe fn store_f32_first(p: *mut f32, v: __m256, n: usize) {
        _mm256_maskstore_ps(p, first(n), v)
    }
    type C = __m256i;
    #[inline(always)]
    unsafe fn zero_c() -> __m256i {
        _mm256_setzero_si256()
    }
    #[inline(always)]
    unsafe fn add_non_finite(c: __m256i, v: __m256) -> __m256i {
        let d = _mm256_sub_ps(v, v);
        // All-ones (−1) in the non-finite lanes.
        _mm256_sub_epi32(c, _mm256_castps_si256(_mm256_cmp_ps::<_CMP_UNORD_Q>(d, d)))
    }
    #[inline(always)]
    unsafe fn add_non_finite_first(c: __m256i, v: __m256, n: usize) -> __m256i {
        let d = _mm256_sub_ps(v, v);
        let bad = _mm256_castps_si256(_mm256_cmp_ps::<_CMP_UNORD_Q>(d, d));
        _mm256_sub_epi32(c, _mm256_and_si256(bad, first(n)))
    }
    #[inline(always)]
    unsafe fn sum_c(c: __m256i) -> u64 {
        let mut x = [0u32; 8];
        _mm256_storeu_si256(x.as_mut_ptr().cast(), c);
        x.iter().map(|&n| u64::from(n)).sum()
    }
    #[inline(always)]
    unsafe fn count_non_finite(v: __m256) -> u32 {
        // |v| < ∞ is false for ±Inf and (unordered) for NaN.
        let finite = _mm256_cmp_ps::<_CMP_LT_OQ>(Self::abs(v), _mm256_set1_ps(f32::INFINITY));
        8 - (_mm256_movemask_ps(finite) as u32).count_ones()
    }
    #[inline(always)]
    unsafe fn maxnum(a: __m256, b: __m256) -> __m256 {
        // maxps returns its second operand when either is NaN: that covers a NaN `b`;
        // a NaN `a` is replaced by `b` afterwards (both NaN gives NaN either way).
        let r = _mm256_max_ps(b, a);
        _mm256_blendv_ps(r, b, _mm256_cmp_ps::<_CMP_UNORD_Q>(a, a))
    }
    #[inline(always)]
    unsafe fn load_f32(p: *const f32) -> __m256 {
        _mm256_loadu_ps(p)
    }
    #[inline(always)]
    unsafe fn store_f32(p: *mut f32, v: __m256) {
        _mm256_storeu_ps(p, v)
    }
    #[inline(always)]
    unsafe fn load_f16(p: *const u16) -> __m256 {
        _mm256_cvtph_ps(_mm_loadu_si128(p.cast()))
    }
    #[inline(always)]
    unsafe fn store_round_f16(p: *mut u16, v: __m256) -> __m256 {
        let h = _mm256_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(v);
        _mm_storeu_si128(p.cast(), h);
        _mm256_cvtph_ps(h)
    }
    #[inline(always)]
    unsafe fn load_bf16(p: *const u16) -> __m256 {
        let x = _mm256_slli_epi32::<16>(_mm256_cvtepu16_epi32(_mm_loadu_si128(p.cast())));
        _mm256_castsi256_ps(quiet_nan(x))
    }
    #[inline(always)]
    unsafe fn prefetch(p: *const u8) {
        _mm_prefetch::<_MM_HINT_T0>(p.cast())
    }
    #[inline(always)]
    unsafe fn store_round_bf16(p: *mut u16, v: __m256) -> __m256 {
        let x = _mm256_castps_si256(v);
        // Nearest even: add 0x7fff plus the lowest kept bit, then truncate.
        let lsb = _mm256_and_si256(_mm256_srli_epi32::<16>(x), _mm256_set1_epi32(1));
        let rounded = _mm256_add_epi32(x, _mm256_add_epi32(_mm256_set1_epi32(0x7fff), lsb));
        let nan = is_nan_bits(x);
        let quiet = _mm256_or_si256(x, _mm256_set1_epi32(0x0040_0000));
        let r = _mm256_blendv_epi8(rounded, quiet, nan);
        let hi = _mm256_srli_epi32::<16>(r);
        // packus works within 128-bit halves; gather qwords 0 and 2 into the low half.
        let packed = _mm256_permute4x64_epi64::<0b00_00_10_00>(_mm256_packus_epi32(hi, hi));
        _mm_storeu_si128(p.cast(), _mm256_castsi256_si128(packed));
        _mm256_castsi256_ps(_mm256_slli_epi32::<16>(hi))
    }
}

/// All-ones in the first `n < 8` lanes (the masks of `maskload`/`maskstore`).
#[inline(always)]
unsafe fn first(n: usize) -> __m256i {
    _mm256_cmpgt_epi32(
        _mm256_set1_epi32(n as i32),
        _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7),
    )
}

/// All-ones lanes where the f32 bits `x` are a NaN.
#[inline(always)]
unsafe fn is_nan_bits(x: __m256i) -> __m256i {
    let mag = _mm256_and_si256(x, _mm256_set1_epi32(0x7fff_ffff));
    _mm256_cmpgt_epi32(mag, _mm256_set1_epi32(0x7f80_0000))
}

/// Sets the quiet bit of NaN lanes, as `half::bf16::to_f32` does.
#[inline(always)]
unsafe fn quiet_nan(x: __m256i) -> __m256i {
    let q = _mm256_and_si256(is_nan_bits(x), _mm256_set1_epi32(0x0040_0000));
    _mm256_or_si256(x, q)
}
