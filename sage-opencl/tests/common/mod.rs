//! Shared by the integration tests: opening a device, random data, comparing with the CPU.

#![allow(dead_code)]

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use sage_core::{BackendError, DType, Element, ErrorKind};
use sage_opencl::OpenCl;

/// The default OpenCL device, or `None` (with a note) where the machine has none. With
/// `SAGE_REQUIRE_OPENCL` set, a missing device fails the test instead.
pub fn device() -> Option<OpenCl> {
    match OpenCl::new() {
        Ok(cl) => Some(cl),
        Err(e) if e.kind() == ErrorKind::NotAvailable => {
            if std::env::var_os("SAGE_REQUIRE_OPENCL").is_some() {
                panic!("SAGE_REQUIRE_OPENCL is set but: {e}");
            }
            eprintln!("skipped: {e}");
            None
        }
        Err(e) => panic!("opening the OpenCL device failed: {e}"),
    }
}

/// The lengths that hit every vector tail and work-group edge.
pub const LENGTHS: [usize; 10] = [0, 1, 7, 8, 9, 15, 16, 17, 1023, 4097];

/// `n` values in `[-scale, scale]`, about one in eight exactly zero.
pub fn random(rng: &mut StdRng, n: usize, scale: f32) -> Vec<f32> {
    (0..n)
        .map(|_| {
            if rng.gen_ratio(1, 8) {
                0.0
            } else {
                rng.gen_range(-scale..=scale)
            }
        })
        .collect()
}

pub fn rng(seed: u64) -> StdRng {
    StdRng::seed_from_u64(seed)
}

pub fn to<E: Element>(x: &[f32]) -> Vec<E> {
    x.iter().map(|&v| E::from_f32(v)).collect()
}

/// Distance between two stored values in units in the last place of their storage type.
pub fn ulps<E: Element>(a: E, b: E) -> u32 {
    let (x, y) = (a.to_f32(), b.to_f32());
    if x.is_nan() || y.is_nan() {
        return if x.is_nan() && y.is_nan() {
            0
        } else {
            u32::MAX
        };
    }
    if x == y {
        return 0;
    }
    // Ordered integer images of the storage bits (sign-magnitude to two's complement).
    let key = |v: f32| -> i64 {
        let bits = match E::DTYPE {
            DType::F32 => v.to_bits() as i64,
            DType::F16 => sage_core::f16::from_f32(v).to_bits() as i64,
            DType::Bf16 => sage_core::bf16::from_f32(v).to_bits() as i64,
        };
        let sign = match E::DTYPE {
            DType::F32 => 1i64 << 31,
            _ => 1i64 << 15,
        };
        if bits & sign != 0 {
            -(bits & !sign)
        } else {
            bits
        }
    };
    (key(x) - key(y)).unsigned_abs().min(u32::MAX as u64) as u32
}

/// The largest distance in ulps over two equally long slices, with where it is.
pub fn worst<E: Element>(got: &[E], want: &[E]) -> (u32, usize) {
    assert_eq!(got.len(), want.len());
    got.iter()
        .zip(want)
        .enumerate()
        .map(|(i, (a, b))| (ulps(*a, *b), i))
        .max()
        .unwrap_or((0, 0))
}
