//! Host-side packing of a multi-tensor launch: the coefficient table, the tensor table and
//! the chunk list, laid out in one byte buffer so one host-to-device copy carries them all.
//!
//! Layouts (little-endian, as the device reads them; `kernels/entry.cu` checks the sizes):
//! - coefficients: [`Coeffs`] as `#[repr(C)]`, 96 bytes each;
//! - tensor: `param, grad, m, v, ibar, n: u64; coeff, first_chunk: u32; reserved: u64` (64 bytes),
//!   absent buffers as 0;
//! - chunk: `tensor, chunk: u32` (8 bytes): one per block, 65536 elements each.
//!
//! A norm launch ([`pack_norm`]) has only the tensor table: there `first_chunk` is the
//! tensor's first partial on sage-core's norm grid ([`NORM_CHUNK`] elements per partial, one
//! block each), and a block finds its tensor by binary search over it.

use sage_core::Coeffs;

use crate::error::CudaError;

/// Elements per chunk (one block's work), as PyTorch's multi-tensor apply.
pub const CHUNK: usize = 65536;
/// Threads per block of the chunked kernels.
pub const THREADS: u32 = 512;
/// Bytes of one coefficient record.
pub const COEFFS_BYTES: usize = 96;
/// Bytes of one tensor record.
pub const TENSOR_BYTES: usize = 64;
/// Bytes of one chunk record.
pub const CHUNK_BYTES: usize = 8;
/// Most blocks in one launch's x dimension.
pub const MAX_CHUNKS: usize = (1 << 31) - 1;
/// Elements per chunk of the norm grid: one block's partial (`sage_core::norm::NORM_CHUNK`,
/// `SAGE_NORM_CHUNK` in the kernel source).
pub const NORM_CHUNK: usize = sage_core::norm::NORM_CHUNK;
/// Threads per block of the norm kernel (`SAGE_NORM_THREADS`).
pub const NORM_THREADS: u32 = 256;

/// One tensor of a launch, as raw device addresses (0 = absent).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TensorEntry {
    /// Parameter buffer.
    pub param: u64,
    /// Gradient buffer (the norm kernel reads only this one).
    pub grad: u64,
    /// First-moment buffer.
    pub m: u64,
    /// Second-moment buffer.
    pub v: u64,
    /// Ī buffer.
    pub ibar: u64,
    /// Elements.
    pub n: u64,
}

/// A packed launch: the bytes to upload and where each table starts.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Packed {
    /// Everything, to be copied to the device in one go.
    pub bytes: Vec<u8>,
    /// Offset of the coefficient table.
    pub coeffs_at: usize,
    /// Offset of the tensor table.
    pub tensors_at: usize,
    /// Offset of the chunk list.
    pub chunks_at: usize,
    /// Number of distinct coefficient records.
    pub n_coeffs: usize,
    /// Number of tensors.
    pub n_tensors: usize,
    /// Number of chunks: the launch's grid size.
    pub n_chunks: usize,
}

/// Chunks covering `n` elements.
pub fn chunks_of(n: u64) -> u64 {
    n.div_ceil(CHUNK as u64)
}

/// Norm chunks (partials) covering `n` elements.
pub fn norm_chunks_of(n: u64) -> u64 {
    n.div_ceil(NORM_CHUNK as u64)
}

/// The bytes of `k` in the device layout (`sage_coeffs`).
pub fn coeffs_bytes(k: &Coeffs) -> [u8; COEFFS_BYTES] {
    let words: [u32; 24] = [
        k.kind,
        k.flags,
        k.modulation,
        k.reserved,
        k.grad_scale.to_bits(),
        k.l2.to_bits(),
        k.beta1.to_bits(),
        k.alpha1.to_bits(),
        k.beta2.to_bits(),
        k.alpha2.to_bits(),
        k.beta0.to_bits(),
        k.alpha0.to_bits(),
        k.momentum.to_bits(),
        k.ibar_div.to_bits(),
        k.eps_num.to_bits(),
        k.eps_den.to_bits(),
        k.step.to_bits(),
        k.denom_scale.to_bits(),
        k.denom_eps.to_bits(),
        k.inf_eps.to_bits(),
        k.in_step_decay.to_bits(),
        k.pre_keep.to_bits(),
        k.post_decay.to_bits(),
        k.reserved2.to_bits(),
    ];
    let mut out = [0u8; COEFFS_BYTES];
    for (dst, w) in out.chunks_exact_mut(4).zip(words) {
        dst.copy_from_slice(&w.to_le_bytes());
    }
    out
}

fn align16(x: usize) -> usize {
    x.div_ceil(16) * 16
}

/// Packs `tensors` (each with its coefficients) into one buffer. Tensors with no elements
/// get a record but no chunk. Equal coefficients of neighbouring tensors share one record
/// (tensors of a group come together), so the table stays small.
pub fn pack(tensors: &[(TensorEntry, Coeffs)]) -> Result<Packed, CudaError> {
    let mut coeffs: Vec<Coeffs> = Vec::new();
    let mut index = Vec::with_capacity(tensors.len());
    for (_, k) in tensors {
        if coeffs.last() != Some(k) {
            coeffs.push(*k);
        }
        index.push(coeffs.len() - 1);
    }
    let total: u64 = tensors.iter().map(|(t, _)| chunks_of(t.n)).sum();
    if total > MAX_CHUNKS as u64 || tensors.len() > u32::MAX as usize {
        return Err(CudaError::TooLarge(format!(
            "{total} chunks of {CHUNK} elements in {} tensors (at most {MAX_CHUNKS})",
            tensors.len()
        )));
    }
    let n_chunks = total as usize;
    let coeffs_at = 0;
    let tensors_at = align16(coeffs.len() * COEFFS_BYTES);
    let chunks_at = align16(tensors_at + tensors.len() * TENSOR_BYTES);
    let mut bytes = Vec::with_capacity(chunks_at + n_chunks * CHUNK_BYTES);
    for k in &coeffs {
        bytes.extend_from_slice(&coeffs_bytes(k));
    }
    bytes.resize(tensors_at, 0);
    let mut first = 0u32;
    for ((t, _), &ci) in tensors.iter().zip(&index) {
        tensor_record(&mut bytes, t, ci as u32, first);
        // Fits: the total was checked against MAX_CHUNKS above.
        first += chunks_of(t.n) as u32;
    }
    bytes.resize(chunks_at, 0);
    for (ti, (t, _)) in tensors.iter().enumerate() {
        for c in 0..chunks_of(t.n) as u32 {
            bytes.extend_from_slice(&(ti as u32).to_le_bytes());
            bytes.extend_from_slice(&c.to_le_bytes());
        }
    }
    Ok(Packed {
        bytes,
        coeffs_at,
        tensors_at,
        chunks_at,
        n_coeffs: coeffs.len(),
        n_tensors: tensors.len(),
        n_chunks,
    })
}

/// Appends the 64-byte record of `t` (`sage_tensor`).
fn tensor_record(bytes: &mut Vec<u8>, t: &TensorEntry, coeff: u32, first: u32) {
    for w in [t.param, t.grad, t.m, t.v, t.ibar, t.n] {
        bytes.extend_from_slice(&w.to_le_bytes());
    }
    bytes.extend_from_slice(&coeff.to_le_bytes());
    bytes.extend_from_slice(&first.to_le_bytes());
    bytes.extend_from_slice(&0u64.to_le_bytes());
}

/// Packs the tensor table of a norm launch over the `grad` buffers of `tensors`: each record's
/// `first_chunk` is the tensor's first partial on the norm grid, so the partials come out back
/// to back in tensor order. `n_chunks` is the launch's grid size (the number of partials);
/// there is no coefficient table or chunk list (`tensors_at` is 0, `chunks_at` the end).
pub fn pack_norm(tensors: &[TensorEntry]) -> Result<Packed, CudaError> {
    let total: u64 = tensors.iter().map(|t| norm_chunks_of(t.n)).sum();
    if total > MAX_CHUNKS as u64 || tensors.len() > u32::MAX as usize {
        return Err(CudaError::TooLarge(format!(
            "{total} norm chunks of {NORM_CHUNK} elements in {} tensors (at most {MAX_CHUNKS})",
            tensors.len()
        )));
    }
    let mut bytes = Vec::with_capacity(tensors.len() * TENSOR_BYTES);
    let mut first = 0u32;
    for t in tensors {
        tensor_record(&mut bytes, t, 0, first);
        // Fits: the total was checked against MAX_CHUNKS above.
        first += norm_chunks_of(t.n) as u32;
    }
    Ok(Packed {
        chunks_at: bytes.len(),
        bytes,
        coeffs_at: 0,
        tensors_at: 0,
        n_coeffs: 0,
        n_tensors: tensors.len(),
        n_chunks: total as usize,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn u32_at(b: &[u8], at: usize) -> u32 {
        u32::from_le_bytes(b[at..at + 4].try_into().unwrap())
    }
    fn u64_at(b: &[u8], at: usize) -> u64 {
        u64::from_le_bytes(b[at..at + 8].try_into().unwrap())
    }

    fn k(step: f32) -> Coeffs {
        Coeffs {
            kind: 1,
            flags: 1,
            step,
            beta1: 0.9,
            reserved2: -2.5,
            ..Coeffs::default()
        }
    }

    fn entry(n: u64, base: u64) -> TensorEntry {
        TensorEntry {
            param: base,
            grad: base + 1,
            m: base + 2,
            v: 0,
            ibar: base + 4,
            n,
        }
    }

    #[test]
    fn coeffs_bytes_are_the_repr_c_layout() {
        assert_eq!(std::mem::size_of::<Coeffs>(), COEFFS_BYTES);
        let c = k(0.125);
        let b = coeffs_bytes(&c);
        // Read the struct's own memory: the device sees the same bytes.
        let raw: [u8; COEFFS_BYTES] = unsafe { std::mem::transmute(c) };
        assert_eq!(b, raw);
        assert_eq!(f32::from_bits(u32_at(&b, 64)), 0.125); // `step` is the 17th field
    }

    #[test]
    fn chunk_counts_cover_every_element() {
        assert_eq!(chunks_of(0), 0);
        assert_eq!(chunks_of(1), 1);
        assert_eq!(chunks_of(CHUNK as u64), 1);
        assert_eq!(chunks_of(CHUNK as u64 + 1), 2);
        assert_eq!(chunks_of(350_000_000), 5341);
    }

    #[test]
    fn pack_lays_out_tables_and_chunks() {
        let lens = [0u64, 1, CHUNK as u64, CHUNK as u64 + 1, 200_000];
        let ts: Vec<(TensorEntry, Coeffs)> = lens
            .iter()
            .enumerate()
            .map(|(i, &n)| {
                (
                    entry(n, 1000 * (i as u64 + 1)),
                    k(if i < 3 { 1.0 } else { 2.0 }),
                )
            })
            .collect();
        let p = pack(&ts).unwrap();
        assert_eq!(p.n_tensors, 5);
        assert_eq!(
            p.n_coeffs, 2,
            "neighbours with equal coefficients share a record"
        );
        assert_eq!(p.n_chunks, 1 + 1 + 2 + 4);
        assert_eq!(p.tensors_at % 16, 0);
        assert_eq!(p.chunks_at % 16, 0);
        assert_eq!(p.bytes.len(), p.chunks_at + p.n_chunks * CHUNK_BYTES);
        // Coefficient records.
        assert_eq!(&p.bytes[..COEFFS_BYTES], &coeffs_bytes(&k(1.0)));
        assert_eq!(
            &p.bytes[COEFFS_BYTES..2 * COEFFS_BYTES],
            &coeffs_bytes(&k(2.0))
        );
        // Tensor records: pointers, length, coefficient index, first chunk.
        let mut first = 0;
        for (i, (t, _)) in ts.iter().enumerate() {
            let at = p.tensors_at + i * TENSOR_BYTES;
            assert_eq!(u64_at(&p.bytes, at), t.param);
            assert_eq!(u64_at(&p.bytes, at + 8), t.grad);
            assert_eq!(u64_at(&p.bytes, at + 16), t.m);
            assert_eq!(u64_at(&p.bytes, at + 24), 0, "absent v");
            assert_eq!(u64_at(&p.bytes, at + 32), t.ibar);
            assert_eq!(u64_at(&p.bytes, at + 40), t.n);
            assert_eq!(u32_at(&p.bytes, at + 48), if i < 3 { 0 } else { 1 });
            assert_eq!(u32_at(&p.bytes, at + 52), first);
            first += chunks_of(t.n) as u32;
        }
        // Chunks: every tensor's chunks in order, contiguous from its first chunk.
        let chunks: Vec<(u32, u32)> = (0..p.n_chunks)
            .map(|c| {
                let at = p.chunks_at + c * CHUNK_BYTES;
                (u32_at(&p.bytes, at), u32_at(&p.bytes, at + 4))
            })
            .collect();
        assert_eq!(
            chunks,
            vec![
                (1, 0),
                (2, 0),
                (3, 0),
                (3, 1),
                (4, 0),
                (4, 1),
                (4, 2),
                (4, 3)
            ]
        );
        for (b, &(t, c)) in chunks.iter().enumerate() {
            let at = p.tensors_at + t as usize * TENSOR_BYTES;
            assert_eq!(u32_at(&p.bytes, at + 52) + c, b as u32);
        }
        // Together the chunks cover each tensor exactly.
        for (i, (t, _)) in ts.iter().enumerate() {
            let covered: u64 = chunks
                .iter()
                .filter(|&&(ti, _)| ti as usize == i)
                .map(|&(_, c)| (t.n - c as u64 * CHUNK as u64).min(CHUNK as u64))
                .sum();
            assert_eq!(covered, t.n);
        }
    }

    #[test]
    fn norm_tables_number_partials_back_to_back() {
        let n = NORM_CHUNK as u64;
        let lens = [3 * n + 1, 0, 1, n, 0];
        let ts: Vec<TensorEntry> = lens
            .iter()
            .enumerate()
            .map(|(i, &l)| entry(l, 1000 * (i as u64 + 1)))
            .collect();
        let p = pack_norm(&ts).unwrap();
        assert_eq!((p.n_tensors, p.n_chunks, p.n_coeffs), (5, 4 + 1 + 1, 0));
        assert_eq!(p.tensors_at, 0);
        assert_eq!(p.bytes.len(), 5 * TENSOR_BYTES);
        let firsts: Vec<u32> = (0..5)
            .map(|i| u32_at(&p.bytes, i * TENSOR_BYTES + 52))
            .collect();
        assert_eq!(firsts, [0, 4, 4, 5, 6]);
        for (i, t) in ts.iter().enumerate() {
            assert_eq!(u64_at(&p.bytes, i * TENSOR_BYTES + 8), t.grad);
            assert_eq!(u64_at(&p.bytes, i * TENSOR_BYTES + 40), t.n);
        }
        // The kernel's search: block b belongs to the last tensor whose first partial is <= b,
        // never an empty one, and every partial of every tensor has exactly one block.
        let mut seen = vec![0u64; 5];
        for b in 0..p.n_chunks as u32 {
            let t = firsts.iter().rposition(|&f| f <= b).unwrap();
            assert!(lens[t] > 0, "block {b} landed on empty tensor {t}");
            assert!(((b - firsts[t]) as u64) < norm_chunks_of(lens[t]));
            seen[t] += 1;
        }
        assert_eq!(seen, lens.map(norm_chunks_of));
        assert_eq!(norm_chunks_of(0), 0);
        assert_eq!(NORM_CHUNK % (4 * NORM_THREADS as usize), 0);
        assert_eq!(CHUNK % NORM_CHUNK, 0);
    }

    #[test]
    fn pack_of_nothing_is_empty() {
        let p = pack(&[]).unwrap();
        assert_eq!((p.n_chunks, p.n_tensors, p.n_coeffs), (0, 0, 0));
        assert!(p.bytes.is_empty());
    }

    #[test]
    fn too_many_chunks_is_an_error() {
        let huge = (entry(u64::MAX / 2, 0), k(1.0));
        let e = pack(&[huge]).unwrap_err();
        assert_eq!(
            sage_core::BackendError::kind(&e),
            sage_core::ErrorKind::TooLarge
        );
        let e = pack_norm(&[huge.0]).unwrap_err();
        assert_eq!(
            sage_core::BackendError::kind(&e),
            sage_core::ErrorKind::TooLarge
        );
    }
}
