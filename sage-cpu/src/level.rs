//! Instruction-set levels and how the machine's is found.

use core::fmt;

/// The instruction set a [`SimdCpu`](crate::SimdCpu) runs its kernels with.
///
/// [`Level::best`] picks the widest this CPU has (at run time with `std`, from the compile-time
/// target features without it); any available level can be forced, so that tests run every
/// one the machine has.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Level {
    /// Scalar Rust ([`crate::portable`]): every CPU.
    Portable,
    /// x86-64 AVX2 with FMA and F16C (8 lanes; every AVX2 CPU since Haswell and Zen 1).
    Avx2,
    /// x86-64 AVX-512 Foundation and Byte/Word (16 lanes; every AVX-512 CPU since Skylake-SP).
    Avx512,
    /// aarch64 NEON (4 lanes).
    Neon,
}

impl Level {
    /// Every level, in order of preference from least to most.
    pub const ALL: [Level; 4] = [Level::Portable, Level::Neon, Level::Avx2, Level::Avx512];

    /// Short lowercase name: `portable`, `avx2`, `avx512`, `neon`.
    pub const fn name(self) -> &'static str {
        match self {
            Level::Portable => "portable",
            Level::Avx2 => "avx2",
            Level::Avx512 => "avx512",
            Level::Neon => "neon",
        }
    }

    /// The level called `name` (as [`Level::name`] writes it).
    pub fn from_name(name: &str) -> Option<Level> {
        Level::ALL.into_iter().find(|l| l.name() == name)
    }

    /// Whether this CPU (and this build) can run the level.
    pub fn is_available(self) -> bool {
        match self {
            Level::Portable => true,
            Level::Avx2 => x86_has_avx2(),
            Level::Avx512 => x86_has_avx512(),
            Level::Neon => arm_has_neon(),
        }
    }

    /// The widest available level.
    pub fn best() -> Level {
        Level::ALL
            .into_iter()
            .rev()
            .find(|l| l.is_available())
            .unwrap_or(Level::Portable)
    }

    /// The available levels, narrowest first.
    pub fn available() -> impl Iterator<Item = Level> {
        Level::ALL.into_iter().filter(|l| l.is_available())
    }
}

impl fmt::Display for Level {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

#[cfg(all(target_arch = "x86_64", feature = "std"))]
fn x86_has_avx2() -> bool {
    std::is_x86_feature_detected!("avx2")
        && std::is_x86_feature_detected!("fma")
        && std::is_x86_feature_detected!("f16c")
}
#[cfg(all(target_arch = "x86_64", not(feature = "std")))]
fn x86_has_avx2() -> bool {
    cfg!(all(
        target_feature = "avx2",
        target_feature = "fma",
        target_feature = "f16c"
    ))
}
#[cfg(not(target_arch = "x86_64"))]
fn x86_has_avx2() -> bool {
    false
}

#[cfg(all(target_arch = "x86_64", feature = "std"))]
fn x86_has_avx512() -> bool {
    x86_has_avx2()
        && std::is_x86_feature_detected!("avx512f")
        && std::is_x86_feature_detected!("avx512bw")
}
#[cfg(all(target_arch = "x86_64", not(feature = "std")))]
fn x86_has_avx512() -> bool {
    x86_has_avx2() && cfg!(all(target_feature = "avx512f", target_feature = "avx512bw"))
}
#[cfg(not(target_arch = "x86_64"))]
fn x86_has_avx512() -> bool {
    false
}

/// Whether the `avx512` level can also use AVX512-BF16 (`vcvtneps2bf16`) for bf16 stores.
#[cfg(all(target_arch = "x86_64", feature = "std"))]
pub(crate) fn has_avx512_bf16() -> bool {
    x86_has_avx512() && std::is_x86_feature_detected!("avx512bf16")
}
#[cfg(all(target_arch = "x86_64", not(feature = "std")))]
pub(crate) fn has_avx512_bf16() -> bool {
    x86_has_avx512() && cfg!(target_feature = "avx512bf16")
}
#[cfg(not(target_arch = "x86_64"))]
pub(crate) fn has_avx512_bf16() -> bool {
    false
}

#[cfg(all(target_arch = "aarch64", feature = "std"))]
fn arm_has_neon() -> bool {
    std::arch::is_aarch64_feature_detected!("neon")
}
#[cfg(all(target_arch = "aarch64", not(feature = "std")))]
fn arm_has_neon() -> bool {
    cfg!(target_feature = "neon")
}
#[cfg(not(target_arch = "aarch64"))]
fn arm_has_neon() -> bool {
    false
}
