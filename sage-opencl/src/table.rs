//! Launch tables: what a step's kernels read besides its buffers — one slot per tensor and
//! the step's distinct coefficients (`SAGE_CL_TABLE_ARGS` in the kernel source).
//!
//! Tensors of a group share their coefficients, so a slot holds an index into them rather than
//! a copy: 64 bytes per tensor instead of 160, which is most of what a step of thousands of
//! small tensors uploads.

use sage_core::Coeffs;

/// One tensor of a launch, laid out as `sage_cl_slot` in the kernel source.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Slot {
    /// Elements.
    pub len: u64,
    /// Work-groups of its launch up to and including this tensor.
    pub end_group: u64,
    /// Bit 0: m, bit 1: v, bit 2: ibar.
    pub present: u32,
    /// Its coefficients: an index into the table's.
    pub k: u32,
    /// Packed launches: elements from the start of the shared param, grad, m, v, ibar.
    pub off: [u64; 5],
}

/// A slot's `present` bits from which state buffers a tensor has.
pub(crate) fn present(m: bool, v: bool, b: bool) -> u32 {
    m as u32 | (v as u32) << 1 | (b as u32) << 2
}

/// Bytes of a [`Slot`].
const SLOT_BYTES: usize = 64;
const _: () = assert!(std::mem::size_of::<Slot>() == SLOT_BYTES);
const COEFFS_BYTES: usize = std::mem::size_of::<Coeffs>();
// The kernels' `sage_coeffs` is 24 four-byte fields with no padding: so must `Coeffs` be, for
// its bytes (`coeffs_bytes`) to be the device's array of them.
const _: () = assert!(COEFFS_BYTES == 96 && std::mem::align_of::<Coeffs>() == 4);

/// Distinct coefficients looked back over for a tensor's: tensors of a group come together,
/// and models alternate between a few groups (weights with decay, biases and norms without).
const LOOKBACK: usize = 4;

/// A step's launch table, built tensor by tensor and uploaded once.
#[derive(Debug, Default)]
pub(crate) struct Table {
    coeffs: Vec<Coeffs>,
    /// One per tensor of the step, in item order.
    pub slots: Vec<Slot>,
}

/// The bytes of `k` in the device layout: `Coeffs` is `repr(C)` of 4-byte fields (sage-core's
/// contract with GPU kernels), so its memory is that layout.
fn coeffs_bytes(k: &Coeffs) -> &[u8; COEFFS_BYTES] {
    // SAFETY: `Coeffs` is repr(C) with only 4-byte plain fields: no padding, every byte
    // initialised; u8 has alignment 1.
    unsafe { &*(k as *const Coeffs).cast::<[u8; COEFFS_BYTES]>() }
}

fn slots_bytes(s: &[Slot]) -> &[u8] {
    // SAFETY: `Slot` is repr(C) of 4- and 8-byte plain fields with no padding (size asserted).
    unsafe { std::slice::from_raw_parts(s.as_ptr().cast::<u8>(), std::mem::size_of_val(s)) }
}

impl Table {
    /// An empty table with room for `tensors` slots.
    pub fn with_capacity(tensors: usize) -> Self {
        Table {
            coeffs: Vec::new(),
            slots: Vec::with_capacity(tensors),
        }
    }

    /// A table of one tensor: `len` elements, its `present` state buffers, coefficients `k`.
    pub fn single(k: &Coeffs, len: usize, present: u32) -> Self {
        let mut t = Table::with_capacity(1);
        let k = t.coeffs_index(k);
        t.slots.push(Slot {
            len: len as u64,
            present,
            k,
            ..Slot::default()
        });
        t
    }

    /// The index of `k` among the table's coefficients, added unless the same bits are among
    /// the last few added. The caller keeps the number of tensors within `u32`.
    pub fn coeffs_index(&mut self, k: &Coeffs) -> u32 {
        let n = self.coeffs.len();
        let bytes = coeffs_bytes(k);
        let seen = (n.saturating_sub(LOOKBACK)..n)
            .rev()
            .find(|&i| coeffs_bytes(&self.coeffs[i]) == bytes);
        seen.unwrap_or_else(|| {
            self.coeffs.push(*k);
            n
        }) as u32
    }

    /// The slots as the kernels read them.
    pub fn slot_bytes(&self) -> &[u8] {
        slots_bytes(&self.slots)
    }

    /// The coefficients as the kernels read them.
    pub fn coeff_bytes(&self) -> &[u8] {
        // SAFETY: as `coeffs_bytes`, for a slice of them.
        unsafe {
            std::slice::from_raw_parts(
                self.coeffs.as_ptr().cast::<u8>(),
                std::mem::size_of_val(&self.coeffs[..]),
            )
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn k(lr: f32) -> Coeffs {
        Coeffs {
            alpha1: lr,
            ..Coeffs::default()
        }
    }

    #[test]
    fn equal_coefficients_are_stored_once() {
        let mut t = Table::with_capacity(5);
        let idx: Vec<u32> = [k(1.0), k(1.0), k(2.0), k(1.0), k(2.0), k(3.0)]
            .iter()
            .map(|c| t.coeffs_index(c))
            .collect();
        assert_eq!(idx, [0, 0, 1, 0, 1, 2]);
        let b = t.coeff_bytes();
        assert_eq!(b.len(), 3 * COEFFS_BYTES);
        assert_eq!(&b[2 * COEFFS_BYTES..], coeffs_bytes(&k(3.0)));
        t.slots.push(Slot {
            len: 7,
            k: 2,
            ..Slot::default()
        });
        let s = t.slot_bytes();
        assert_eq!(s.len(), SLOT_BYTES);
        assert_eq!(s[..8], 7u64.to_le_bytes());
        assert_eq!(s[20..24], 2u32.to_le_bytes());
    }

    #[test]
    fn only_identical_bits_are_shared() {
        let mut t = Table::default();
        // Equal as floats, different coefficients for a kernel: never merged.
        assert_eq!(t.coeffs_index(&k(0.0)), 0);
        assert_eq!(t.coeffs_index(&k(-0.0)), 1);
        // NaN bits equal their own: merged although NaN != NaN.
        assert_eq!(t.coeffs_index(&k(f32::NAN)), 2);
        assert_eq!(t.coeffs_index(&k(f32::NAN)), 2);
    }

    #[test]
    fn coefficients_beyond_the_lookback_are_added_again() {
        let mut t = Table::default();
        for i in 0..=LOOKBACK {
            assert_eq!(t.coeffs_index(&k(i as f32)), i as u32);
        }
        // k(0.0) is LOOKBACK + 1 records back: a new record, same values (correct, larger).
        assert_eq!(t.coeffs_index(&k(0.0)), LOOKBACK as u32 + 1);
    }
}
