//! Storage number types: what a buffer holds. All arithmetic happens in `f32`; a value is
//! rounded to its storage type once, when it is stored.
//!
//! Generic `Float` code over `f16` would round after every operation, which is both slow and
//! less accurate than computing in `f32`, so the math never runs in the storage type.

use half::{bf16, f16};

/// The storage types a buffer can hold, as a value (GPU backends pick kernels by it).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DType {
    /// IEEE binary32.
    F32,
    /// IEEE binary16.
    F16,
    /// bfloat16 (8-bit exponent, 7-bit mantissa).
    Bf16,
}

impl DType {
    /// Bytes per element.
    pub const fn size(self) -> usize {
        match self {
            DType::F32 => 4,
            DType::F16 | DType::Bf16 => 2,
        }
    }

    /// Short lowercase name (`f32`, `f16`, `bf16`), as used in kernel names and reports.
    pub const fn name(self) -> &'static str {
        match self {
            DType::F32 => "f32",
            DType::F16 => "f16",
            DType::Bf16 => "bf16",
        }
    }
}

impl core::fmt::Display for DType {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str(self.name())
    }
}

mod sealed {
    pub trait Sealed {}
    impl Sealed for f32 {}
    impl Sealed for half::f16 {}
    impl Sealed for half::bf16 {}
}

/// A number type a parameter, gradient or state buffer may be stored in: `f32`, `f16`, `bf16`.
///
/// Conversions round to nearest even and keep NaN a NaN.
///
/// ```
/// use sage_core::Element;
/// use half::bf16;
/// let x = <bf16 as Element>::from_f32(1.0 + 1.0 / 256.0); // halfway: ties to even
/// assert_eq!(x.to_f32(), 1.0);
/// assert!(<bf16 as Element>::from_f32(f32::NAN).to_f32().is_nan());
/// ```
pub trait Element: sealed::Sealed + Copy + Default + PartialEq + Send + Sync + 'static {
    /// This type as a value.
    const DTYPE: DType;
    /// Widen to `f32` (exact).
    fn to_f32(self) -> f32;
    /// Round an `f32` to this type (nearest even).
    fn from_f32(x: f32) -> Self;
}

impl Element for f32 {
    const DTYPE: DType = DType::F32;
    #[inline(always)]
    fn to_f32(self) -> f32 {
        self
    }
    #[inline(always)]
    fn from_f32(x: f32) -> Self {
        x
    }
}

impl Element for f16 {
    const DTYPE: DType = DType::F16;
    #[inline(always)]
    fn to_f32(self) -> f32 {
        f16::to_f32(self)
    }
    #[inline(always)]
    fn from_f32(x: f32) -> Self {
        f16::from_f32(x)
    }
}

impl Element for bf16 {
    const DTYPE: DType = DType::Bf16;
    #[inline(always)]
    fn to_f32(self) -> f32 {
        bf16::to_f32(self)
    }
    #[inline(always)]
    fn from_f32(x: f32) -> Self {
        bf16::from_f32(x)
    }
}

/// Round an `f32` through storage type `E` and back: the value a buffer of `E` would hold.
#[inline(always)]
pub fn round_through<E: Element>(x: f32) -> f32 {
    E::from_f32(x).to_f32()
}
