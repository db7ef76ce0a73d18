//! Which rank owns which elements: the model's tensors, flattened in order, cut into one
//! contiguous range per rank on the norm grid's chunk boundaries.
//!
//! Rank `r` owns the flat range `[b_r, b_{r+1})`, where `b_r` is the chunk start (a multiple of
//! [`NORM_CHUNK`] inside some tensor, or a tensor's first element) nearest to `r/N` of the
//! model's weight: its elements ([`Layout::new`]), or its optimizer state in bytes
//! ([`Layout::weighted`], what [`ShardedOptimizer`](crate::ShardedOptimizer) uses). So:
//!
//! - every rank holds its share to within one chunk (balanced whatever the tensor sizes: one
//!   embedding of a third of the model is split like everything else);
//! - a tensor is split into at most one contiguous piece per rank, in rank order, and every
//!   piece starts on a chunk boundary of its tensor, so each rank's chunk partials are a
//!   contiguous run of the single-process partials and gathering them in rank order gives
//!   exactly the sequence one process reduces ([`sage_core::norm`]);
//! - an empty tensor belongs, as an empty piece, to the rank owning its flat position (it has
//!   no elements, but it has a step count, which that rank keeps).

use serde::{Deserialize, Serialize};

use sage_core::norm::{chunk_count, NORM_CHUNK};

use crate::error::DistError;

/// One tensor of the model, as the layout knows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TensorSpec {
    /// Stable, unique name (checkpoint key, error messages).
    pub name: String,
    /// Number of elements.
    pub len: usize,
    /// The optimizer group it belongs to.
    pub group: usize,
}

impl TensorSpec {
    /// A tensor of group 0.
    pub fn new(name: impl Into<String>, len: usize) -> Self {
        TensorSpec {
            name: name.into(),
            len,
            group: 0,
        }
    }
    /// Puts it in group `g`.
    pub fn group(mut self, g: usize) -> Self {
        self.group = g;
        self
    }
}

/// A rank's share of one tensor: elements `start..end` of tensor `tensor`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Piece {
    /// Index of the tensor in the layout.
    pub tensor: usize,
    /// First element (a multiple of [`NORM_CHUNK`]).
    pub start: usize,
    /// One past the last element.
    pub end: usize,
}

impl Piece {
    /// Number of elements.
    pub fn len(&self) -> usize {
        self.end - self.start
    }
    /// Whether it holds no element (an empty tensor's piece).
    pub fn is_empty(&self) -> bool {
        self.end == self.start
    }
    /// The element range within the tensor.
    pub fn range(&self) -> std::ops::Range<usize> {
        self.start..self.end
    }
    /// Number of norm-grid chunks it covers.
    pub fn chunks(&self) -> usize {
        chunk_count(self.len())
    }
}

/// The partition of a model's tensors over `world` ranks.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Layout {
    world: usize,
    tensors: Vec<TensorSpec>,
    /// Per rank, its pieces in tensor order.
    pieces: Vec<Vec<Piece>>,
}

impl Layout {
    /// Partitions `tensors` (in step order) over `world` ranks, balancing elements. Refused:
    /// `world == 0`, an empty or repeated name, a total length that overflows.
    pub fn new(tensors: Vec<TensorSpec>, world: usize) -> Result<Self, DistError> {
        Layout::weighted(tensors, world, |_| 1)
    }

    /// Partitions `tensors` over `world` ranks balancing `Σ weight(tensor)` over each rank's
    /// elements: with the bytes of state an element of the tensor's group needs, every rank
    /// holds about `1/N` of the optimizer state ([`ShardedOptimizer::new`](crate::ShardedOptimizer::new)
    /// does this; elements of weight 0 go to whichever rank the boundary leaves them).
    /// Boundaries stay on the chunk grid, so a rank is within one chunk's weight of its share.
    pub fn weighted(
        tensors: Vec<TensorSpec>,
        world: usize,
        weight: impl Fn(&TensorSpec) -> usize,
    ) -> Result<Self, DistError> {
        if world == 0 {
            return Err(DistError::input(None, "world size 0"));
        }
        let mut names = std::collections::BTreeSet::new();
        for (i, t) in tensors.iter().enumerate() {
            if t.name.is_empty() {
                return Err(DistError::input(Some((i, "")), "empty tensor name"));
            }
            if !names.insert(t.name.as_str()) {
                return Err(DistError::input(
                    Some((i, &t.name)),
                    "name given twice (names key the checkpoint)",
                ));
            }
        }
        let mut offsets = Vec::with_capacity(tensors.len());
        let mut total = 0usize;
        for (i, t) in tensors.iter().enumerate() {
            offsets.push(total);
            total = total
                .checked_add(t.len)
                .ok_or_else(|| DistError::input(Some((i, &t.name)), "total length overflows"))?;
        }
        // Every chunk start in flat coordinates, ascending, then the end.
        let mut starts = Vec::with_capacity(total / NORM_CHUNK + tensors.len() + 1);
        for (t, &off) in tensors.iter().zip(&offsets) {
            starts.extend((0..chunk_count(t.len)).map(|c| off + c * NORM_CHUNK));
        }
        starts.push(total);
        // The cumulative weight at each chunk start (weights are per element, per tensor).
        let mut cum = Vec::with_capacity(starts.len());
        let mut acc = 0u128;
        for t in &tensors {
            let w = weight(t) as u128;
            cum.extend((0..chunk_count(t.len)).map(|c| acc + (c * NORM_CHUNK) as u128 * w));
            acc += t.len as u128 * w;
        }
        cum.push(acc);
        let mut bounds = vec![0usize; world + 1];
        bounds[world] = total;
        for r in 1..world {
            let target = r as u128 * acc / world as u128;
            let lo = bounds[r - 1];
            // The first chunk start at or past the target weight, and the one before it;
            // `cum` ends with the total, so `i` is in range.
            let i = cum.partition_point(|&c| c < target);
            let pick = match i.checked_sub(1) {
                Some(j) if target - cum[j] <= cum[i] - target => starts[j],
                _ => starts[i],
            };
            bounds[r] = pick.max(lo).min(total);
        }
        let mut pieces = vec![Vec::new(); world];
        for (ti, (t, &off)) in tensors.iter().zip(&offsets).enumerate() {
            if t.len == 0 {
                // The rank owning flat position `off` (the last rank at the very end).
                let r = (0..world)
                    .find(|&r| bounds[r] <= off && off < bounds[r + 1])
                    .unwrap_or(world - 1);
                pieces[r].push(Piece {
                    tensor: ti,
                    start: 0,
                    end: 0,
                });
                continue;
            }
            for (r, rank_pieces) in pieces.iter_mut().enumerate() {
                let a = bounds[r].max(off);
                let b = bounds[r + 1].min(off + t.len);
                if a < b {
                    rank_pieces.push(Piece {
                        tensor: ti,
                        start: a - off,
                        end: b - off,
                    });
                }
            }
        }
        let layout = Layout {
            world,
            tensors,
            pieces,
        };
        debug_assert!(layout.validate().is_ok());
        Ok(layout)
    }

    /// Checks a layout read from elsewhere (a checkpoint): every tensor covered exactly once,
    /// in rank order, each piece on the chunk grid, at most one piece per tensor and rank,
    /// pieces in tensor order.
    pub fn validate(&self) -> Result<(), String> {
        if self.world == 0 || self.pieces.len() != self.world {
            return Err(format!(
                "{} ranks of pieces for a world of {}",
                self.pieces.len(),
                self.world
            ));
        }
        let mut next = vec![0usize; self.tensors.len()];
        let mut seen_empty = vec![false; self.tensors.len()];
        for (r, ps) in self.pieces.iter().enumerate() {
            let mut last: Option<usize> = None;
            for p in ps {
                let t = self
                    .tensors
                    .get(p.tensor)
                    .ok_or_else(|| format!("rank {r}: piece of tensor {} (none)", p.tensor))?;
                if last.is_some_and(|l| l >= p.tensor) {
                    return Err(format!("rank {r}: pieces out of tensor order"));
                }
                last = Some(p.tensor);
                if t.len == 0 {
                    if !p.is_empty() || seen_empty[p.tensor] {
                        return Err(format!("rank {r}: bad piece of empty tensor {}", t.name));
                    }
                    seen_empty[p.tensor] = true;
                    continue;
                }
                if p.start != next[p.tensor]
                    || p.end <= p.start
                    || p.end > t.len
                    || p.start % NORM_CHUNK != 0
                {
                    return Err(format!(
                        "rank {r}: piece {}..{} of {} ({} elements) does not continue at {} on the chunk grid",
                        p.start, p.end, t.name, t.len, next[p.tensor]
                    ));
                }
                next[p.tensor] = p.end;
            }
        }
        for (i, t) in self.tensors.iter().enumerate() {
            if (t.len > 0 && next[i] != t.len) || (t.len == 0 && !seen_empty[i]) {
                return Err(format!("tensor {} is not covered", t.name));
            }
        }
        Ok(())
    }

    /// The number of ranks.
    pub fn world(&self) -> usize {
        self.world
    }
    /// The tensors, in step order.
    pub fn tensors(&self) -> &[TensorSpec] {
        &self.tensors
    }
    /// Rank `rank`'s pieces, in tensor order.
    pub fn pieces(&self, rank: usize) -> &[Piece] {
        &self.pieces[rank]
    }
    /// Elements rank `rank` owns.
    pub fn rank_len(&self, rank: usize) -> usize {
        self.pieces[rank].iter().map(Piece::len).sum()
    }
    /// Elements of every tensor together.
    pub fn total_len(&self) -> usize {
        self.tensors.iter().map(|t| t.len).sum()
    }
    /// How tensor `tensor` is split: the number of its elements each rank owns, in rank order
    /// (rank `r`'s part starts at the sum of the parts before it).
    pub fn split(&self, tensor: usize) -> Vec<usize> {
        self.pieces
            .iter()
            .map(|ps| ps.iter().find(|p| p.tensor == tensor).map_or(0, Piece::len))
            .collect()
    }
    /// Which rank holds tensor `tensor`'s step count: the rank of its first piece.
    pub fn count_owner(&self, tensor: usize) -> usize {
        (0..self.world)
            .find(|&r| self.pieces[r].iter().any(|p| p.tensor == tensor))
            .unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn specs(lens: &[usize]) -> Vec<TensorSpec> {
        lens.iter()
            .enumerate()
            .map(|(i, &n)| TensorSpec::new(format!("t{i}"), n))
            .collect()
    }

    #[test]
    fn balanced_on_the_grid() {
        let lens = [
            30_000, 1, 0, 4096, 8191, 70_001, 5, 0, 12_288, 999, 100_000, 3,
        ];
        let total: usize = lens.iter().sum();
        for world in 1..=9 {
            let l = Layout::new(specs(&lens), world).unwrap();
            l.validate().unwrap();
            for r in 0..world {
                let n = l.rank_len(r);
                assert!(
                    n.abs_diff(total / world) <= NORM_CHUNK,
                    "world {world} rank {r}: {n} of {total}"
                );
            }
            for (t, &len) in lens.iter().enumerate() {
                assert_eq!(l.split(t).iter().sum::<usize>(), len);
            }
            // Every chunk partial belongs to exactly one rank: the ranks' chunk runs add up.
            let chunks: usize = lens.iter().map(|&n| chunk_count(n)).sum();
            let per_rank: usize = (0..world)
                .map(|r| l.pieces(r).iter().map(Piece::chunks).sum::<usize>())
                .sum();
            assert_eq!(chunks, per_rank);
        }
    }

    #[test]
    fn weighted_balances_the_weight() {
        // An embedding-like tensor of weight 9 (no SAGE: m, v) and weights of 13 (m, v, Ī).
        let t = vec![
            TensorSpec::new("emb", 300_000).group(1),
            TensorSpec::new("w1", 100_000),
            TensorSpec::new("w2", 100_000),
        ];
        let w = |s: &TensorSpec| if s.group == 1 { 9 } else { 13 };
        let total: usize = t.iter().map(|s| s.len * w(s)).sum();
        for world in 1..=6 {
            let l = Layout::weighted(t.clone(), world, w).unwrap();
            l.validate().unwrap();
            for r in 0..world {
                let mine: usize = l
                    .pieces(r)
                    .iter()
                    .map(|p| p.len() * w(&l.tensors()[p.tensor]))
                    .sum();
                assert!(
                    mine.abs_diff(total / world) <= 13 * NORM_CHUNK,
                    "world {world} rank {r}: {mine} of {total}"
                );
            }
        }
    }

    #[test]
    fn one_huge_tensor_is_split() {
        let l = Layout::new(specs(&[1 << 20, 10, 10]), 4).unwrap();
        for r in 0..4 {
            assert!(l.rank_len(r).abs_diff((1 << 20) / 4) <= NORM_CHUNK);
        }
        assert_eq!(l.split(0).len(), 4);
    }

    #[test]
    fn more_ranks_than_chunks() {
        let l = Layout::new(specs(&[10, 0, 20]), 5).unwrap();
        l.validate().unwrap();
        assert_eq!(
            (0..5).map(|r| l.rank_len(r)).sum::<usize>(),
            30,
            "everything owned once"
        );
    }

    #[test]
    fn refuses_bad_input() {
        assert!(Layout::new(specs(&[1]), 0).is_err());
        let dup = vec![TensorSpec::new("a", 1), TensorSpec::new("a", 2)];
        assert!(Layout::new(dup, 2).is_err());
        assert!(Layout::new(vec![TensorSpec::new("", 1)], 1).is_err());
        let mut l = Layout::new(specs(&[10_000, 10]), 2).unwrap();
        l.pieces[1][0].start += 1;
        assert!(l.validate().is_err());
    }
}
