//! The gradient-norm contract: how a squared norm is reduced, so that it can be computed in
//! pieces (shards, ranks, devices) and still come out bit for bit the same.
//!
//! - A tensor's elements are cut into chunks of [`NORM_CHUNK`] elements from its first element
//!   (the last chunk may be shorter).
//! - A backend computes each chunk's partial `Σ x²` as an `f64`. How it sums *within* a chunk
//!   (f64, or f32 blocks folded into f64, in any lane order) is the backend's choice, but the
//!   result must depend on the chunk's contents only, be non-finite when the chunk holds a NaN
//!   or ±Inf, and never overflow for finite inputs.
//! - A tensor's squared norm is [`fold`] of its partials: an `f64` sum from the first chunk to
//!   the last. The step's total is [`fold`] of the tensors' squared norms in step order.
//!
//! So a caller that splits tensors on chunk boundaries ([`chunk_count`], [`chunk_range`]),
//! computes the pieces' partials anywhere, and gathers them in order gets exactly the norm a
//! single process computes ([`Optimizer::step_with_norms`](crate::Optimizer::step_with_norms)).

/// Elements per chunk of the norm grid (a constant of the contract).
pub const NORM_CHUNK: usize = 4096;

/// How many chunks a tensor of `len` elements has (0 for an empty tensor).
///
/// ```
/// use sage_core::norm::{chunk_count, NORM_CHUNK};
/// assert_eq!(chunk_count(0), 0);
/// assert_eq!(chunk_count(NORM_CHUNK), 1);
/// assert_eq!(chunk_count(NORM_CHUNK + 1), 2);
/// ```
pub const fn chunk_count(len: usize) -> usize {
    len.div_ceil(NORM_CHUNK)
}

/// The element range of chunk `c` of a tensor of `len` elements.
pub fn chunk_range(len: usize, c: usize) -> core::ops::Range<usize> {
    let start = (c * NORM_CHUNK).min(len);
    start..(start + NORM_CHUNK).min(len)
}

/// The contract's reduction: an `f64` sum in order, first to last.
///
/// ```
/// use sage_core::norm::fold;
/// assert_eq!(fold([1.0, 2.0, 3.0]), 6.0);
/// assert!(fold([1.0, f64::NAN]).is_nan());
/// ```
pub fn fold(partials: impl IntoIterator<Item = f64>) -> f64 {
    partials.into_iter().fold(0.0, |acc, x| acc + x)
}

/// Reduces gathered partials to per-tensor squared norms and the total: `partials` holds each
/// tensor's chunk partials back to back, in step order, for tensors of the lengths `lens`;
/// each tensor's squared norm is written to `per_tensor`. Returns the total, or `None` when
/// the lengths do not add up (`partials` must hold exactly `Σ chunk_count(len)` values and
/// `per_tensor` one slot per tensor).
///
/// ```
/// use sage_core::norm::{reduce, NORM_CHUNK};
/// let partials = [1.0, 2.0, 4.0]; // tensor 0: two chunks, tensor 1: one
/// let mut per = [0.0; 2];
/// let total = reduce(&partials, &[NORM_CHUNK + 1, 3], &mut per).unwrap();
/// assert_eq!((per, total), ([3.0, 4.0], 7.0));
/// ```
pub fn reduce(partials: &[f64], lens: &[usize], per_tensor: &mut [f64]) -> Option<f64> {
    if per_tensor.len() != lens.len() {
        return None;
    }
    let mut at = 0usize;
    for (slot, &len) in per_tensor.iter_mut().zip(lens) {
        let end = at.checked_add(chunk_count(len))?;
        *slot = fold(partials.get(at..end)?.iter().copied());
        at = end;
    }
    (at == partials.len()).then(|| fold(per_tensor.iter().copied()))
}

/// Squares of a chunk's elements summed in `f64`, in order: the reference partial, and what
/// portable backends compute.
pub fn chunk_partial<E: crate::Element>(chunk: &[E]) -> f64 {
    chunk.iter().fold(0.0f64, |acc, x| {
        let x = x.to_f32() as f64;
        acc + x * x
    })
}
