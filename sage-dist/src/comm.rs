//! The communicator: the few collectives sharded SAGE needs, and two implementations that need
//! no transport library — [`SelfComm`] (one rank) and [`ThreadComm`] (ranks as threads of one
//! process, for tests and examples). MPI ([`crate::mpi`]) and NCCL ([`crate::nccl`]) implement
//! the same traits.
//!
//! Host-side collectives ([`Communicator`]) move a few `f64`s: presence flags, and the norm
//! grid's chunk partials, gathered — never summed by the transport, whose summation order is
//! its own — so that every rank reduces them in the contract's fixed order. Buffer collectives
//! ([`BufferComm`]) move parameters and gradients where they live (host slices for MPI,
//! device memory for NCCL).

use std::any::Any;
use std::fmt;
use std::sync::{Arc, Condvar, Mutex};

use sage_core::{Backend, Element};

use crate::views::HostSlices;

/// Rank, size and the host-side collectives.
pub trait Communicator {
    /// The transport's error.
    type Error: std::error::Error + Send + Sync + 'static;

    /// This process's rank, `0..size`.
    fn rank(&self) -> usize;
    /// The number of ranks.
    fn size(&self) -> usize;

    /// Element-wise sum over ranks, in place, on every rank. For a few values whose sum is
    /// exact (flags, counts): the order is the transport's.
    fn all_reduce_sum_f64(&mut self, buf: &mut [f64]) -> Result<(), Self::Error>;

    /// Every rank's `mine` concatenated in rank order, on every rank: rank `r` contributes
    /// `counts[r]` values (`mine.len() == counts[rank]`, `out.len() == Σ counts`).
    fn all_gather_f64(
        &mut self,
        mine: &[f64],
        counts: &[usize],
        out: &mut [f64],
    ) -> Result<(), Self::Error>;

    /// Waits until every rank has arrived.
    fn barrier(&mut self) -> Result<(), Self::Error>;
}

/// Collectives over a backend's buffers, in place. `counts` splits a buffer into one
/// contiguous part per rank, in rank order (rank `r`'s part starts at `Σ counts[..r]`);
/// `counts.len() == size` and `Σ counts == len(buf)`.
pub trait BufferComm<B: Backend + ?Sized>: Communicator {
    /// Element-wise sum over ranks of `buf`, on every rank (data-parallel gradients).
    fn all_reduce_sum(&mut self, backend: &mut B, buf: &mut B::Buf<f32>)
        -> Result<(), Self::Error>;

    /// [`all_reduce_sum`](Self::all_reduce_sum) of many buffers at once (a data-parallel
    /// step's gradients). The default calls it once per buffer; MPI packs them into one
    /// collective.
    fn all_reduce_sum_many(
        &mut self,
        backend: &mut B,
        bufs: &mut [&mut B::Buf<f32>],
    ) -> Result<(), Self::Error> {
        for b in bufs.iter_mut() {
            self.all_reduce_sum(backend, b)?;
        }
        Ok(())
    }

    /// Element-wise sum over ranks, but each rank receives only its own part (the rest of
    /// `buf` is left unspecified): half the traffic of [`all_reduce_sum`](Self::all_reduce_sum)
    /// when a rank reads its part only, as a sharded step does.
    fn reduce_scatter_sum(
        &mut self,
        backend: &mut B,
        buf: &mut B::Buf<f32>,
        counts: &[usize],
    ) -> Result<(), Self::Error>;

    /// [`reduce_scatter_sum`](Self::reduce_scatter_sum) of many buffers at once (`counts[i]`
    /// splits `bufs[i]`). The default calls it once per buffer, so it refuses a malformed split
    /// only when it reaches that buffer, and it steps the pairs `zip` makes: a transport that
    /// can refuse a malformed call whole, before exchanging anything, overrides it (every one
    /// in this crate does, through the same check). MPI packs them into one collective.
    fn reduce_scatter_sum_many(
        &mut self,
        backend: &mut B,
        bufs: &mut [&mut B::Buf<f32>],
        counts: &[Vec<usize>],
    ) -> Result<(), Self::Error> {
        for (b, c) in bufs.iter_mut().zip(counts) {
            self.reduce_scatter_sum(backend, b, c)?;
        }
        Ok(())
    }

    /// Every rank's own part of `buf`, copied into every rank's `buf` (the parameter
    /// all-gather after a sharded step). Any storage type, moved bit for bit.
    fn all_gather_parts<E: Element>(
        &mut self,
        backend: &mut B,
        buf: &mut B::Buf<E>,
        counts: &[usize],
    ) -> Result<(), Self::Error>;

    /// [`all_gather_parts`](Self::all_gather_parts) of many buffers at once (`counts[i]`
    /// splits `bufs[i]`): what a sharded step does after every update. The default calls it
    /// once per buffer (checking as it goes, as above); a transport overrides it to move everything in one collective (MPI
    /// packs the parts into one `MPI_Allgatherv`, NCCL groups the broadcasts).
    fn all_gather_parts_many<E: Element>(
        &mut self,
        backend: &mut B,
        bufs: &mut [&mut B::Buf<E>],
        counts: &[Vec<usize>],
    ) -> Result<(), Self::Error> {
        for (b, c) in bufs.iter_mut().zip(counts) {
            self.all_gather_parts(backend, b, c)?;
        }
        Ok(())
    }
}

/// Offsets of the parts `counts` describes (one more than parts: the last is the total).
pub fn offsets(counts: &[usize]) -> Vec<usize> {
    let mut out = Vec::with_capacity(counts.len() + 1);
    let mut at = 0;
    out.push(0);
    for &c in counts {
        at += c;
        out.push(at);
    }
    out
}

/// A collective called with arguments that do not fit (lengths, counts), or a rank of a
/// [`ThreadComm`] group that left while others waited.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CommError(pub String);

impl fmt::Display for CommError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for CommError {}

/// Checks the arguments every implementation shares.
pub(crate) fn check_parts(
    rank: usize,
    size: usize,
    counts: &[usize],
    len: usize,
) -> Result<(), CommError> {
    if counts.len() != size {
        return Err(CommError(format!(
            "{} part counts for {size} ranks",
            counts.len()
        )));
    }
    let total: usize = counts.iter().sum();
    if total != len {
        return Err(CommError(format!(
            "parts of {total} elements for a buffer of {len} (rank {rank})"
        )));
    }
    Ok(())
}

/// Checks the arguments of a call over several buffers: one split per buffer, each of which
/// [`check_parts`] accepts for that buffer's length.
pub(crate) fn check_parts_many<B: Backend + ?Sized, E: Element>(
    rank: usize,
    size: usize,
    backend: &B,
    bufs: &[&mut B::Buf<E>],
    counts: &[Vec<usize>],
) -> Result<(), CommError> {
    if bufs.len() != counts.len() {
        return Err(CommError(format!(
            "{} buffers, {} splits",
            bufs.len(),
            counts.len()
        )));
    }
    for (b, c) in bufs.iter().zip(counts) {
        check_parts(rank, size, c, backend.len(b))?;
    }
    Ok(())
}

/// [`BufferComm::reduce_scatter_sum`] buffer by buffer, after refusing a malformed call whole
/// (the default method checks each buffer only when it reaches it).
pub(crate) fn reduce_scatter_each<B, C>(
    comm: &mut C,
    backend: &mut B,
    bufs: &mut [&mut B::Buf<f32>],
    counts: &[Vec<usize>],
) -> Result<(), CommError>
where
    B: Backend + ?Sized,
    C: BufferComm<B, Error = CommError> + ?Sized,
{
    check_parts_many(comm.rank(), comm.size(), backend, bufs, counts)?;
    for (b, c) in bufs.iter_mut().zip(counts) {
        comm.reduce_scatter_sum(backend, b, c)?;
    }
    Ok(())
}

pub(crate) fn check_gather(
    rank: usize,
    size: usize,
    mine: usize,
    counts: &[usize],
    out: usize,
) -> Result<(), CommError> {
    check_parts(rank, size, counts, out)?;
    if counts[rank] != mine {
        return Err(CommError(format!(
            "rank {rank} gives {mine} values, the counts say {}",
            counts[rank]
        )));
    }
    Ok(())
}

/// The communicator of a single process (world size 1): every collective is a copy or nothing.
#[derive(Clone, Copy, Debug, Default)]
pub struct SelfComm;

impl Communicator for SelfComm {
    type Error = CommError;
    fn rank(&self) -> usize {
        0
    }
    fn size(&self) -> usize {
        1
    }
    fn all_reduce_sum_f64(&mut self, _: &mut [f64]) -> Result<(), CommError> {
        Ok(())
    }
    fn all_gather_f64(
        &mut self,
        mine: &[f64],
        counts: &[usize],
        out: &mut [f64],
    ) -> Result<(), CommError> {
        check_gather(0, 1, mine.len(), counts, out.len())?;
        out.copy_from_slice(mine);
        Ok(())
    }
    fn barrier(&mut self) -> Result<(), CommError> {
        Ok(())
    }
}

impl<B: Backend + ?Sized> BufferComm<B> for SelfComm {
    fn all_reduce_sum(&mut self, _: &mut B, _: &mut B::Buf<f32>) -> Result<(), CommError> {
        Ok(())
    }
    fn reduce_scatter_sum(
        &mut self,
        b: &mut B,
        buf: &mut B::Buf<f32>,
        counts: &[usize],
    ) -> Result<(), CommError> {
        check_parts(0, 1, counts, b.len(buf))
    }
    fn all_gather_parts<E: Element>(
        &mut self,
        b: &mut B,
        buf: &mut B::Buf<E>,
        counts: &[usize],
    ) -> Result<(), CommError> {
        check_parts(0, 1, counts, b.len(buf))
    }
    fn reduce_scatter_sum_many(
        &mut self,
        b: &mut B,
        bufs: &mut [&mut B::Buf<f32>],
        counts: &[Vec<usize>],
    ) -> Result<(), CommError> {
        check_parts_many(0, 1, b, bufs, counts)
    }
    fn all_gather_parts_many<E: Element>(
        &mut self,
        b: &mut B,
        bufs: &mut [&mut B::Buf<E>],
        counts: &[Vec<usize>],
    ) -> Result<(), CommError> {
        check_parts_many(0, 1, b, bufs, counts)
    }
}

// ---------------------------------------------------------------------------------------------
// Ranks as threads.

struct Round {
    arrived: usize,
    generation: u64,
    left: usize,
    slots: Vec<Option<Box<dyn Any + Send>>>,
}

struct Shared {
    size: usize,
    round: Mutex<Round>,
    cv: Condvar,
}

/// `size` ranks as threads of one process, exchanging through shared memory: the same
/// collectives as MPI, for tests and examples that run without a launcher. Sums are folded in
/// rank order. A rank that leaves (drops its communicator, or panics) while others wait in a
/// collective makes theirs fail instead of hanging.
///
/// ```
/// use sage_dist::{Communicator, ThreadComm};
/// let sums = ThreadComm::run(3, |mut comm| {
///     let mut x = [comm.rank() as f64];
///     comm.all_reduce_sum_f64(&mut x).unwrap();
///     x[0]
/// });
/// assert_eq!(sums, [3.0, 3.0, 3.0]);
/// ```
pub struct ThreadComm {
    rank: usize,
    shared: Arc<Shared>,
}

impl fmt::Debug for ThreadComm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ThreadComm")
            .field("rank", &self.rank)
            .field("size", &self.shared.size)
            .finish()
    }
}

impl ThreadComm {
    /// A group of `size` communicators, one per rank (move each into its thread).
    pub fn group(size: usize) -> Vec<ThreadComm> {
        let shared = Arc::new(Shared {
            size,
            round: Mutex::new(Round {
                arrived: 0,
                generation: 0,
                left: 0,
                slots: (0..size).map(|_| None).collect(),
            }),
            cv: Condvar::new(),
        });
        (0..size)
            .map(|rank| ThreadComm {
                rank,
                shared: shared.clone(),
            })
            .collect()
    }

    /// Runs `f` on `size` threads, each with its rank's communicator; the results in rank
    /// order. A panic in any rank is re-raised here once every thread has ended.
    pub fn run<T: Send>(size: usize, f: impl Fn(ThreadComm) -> T + Sync) -> Vec<T> {
        let comms = ThreadComm::group(size);
        std::thread::scope(|s| {
            let handles: Vec<_> = comms
                .into_iter()
                .map(|c| {
                    let f = &f;
                    s.spawn(move || f(c))
                })
                .collect();
            let results: Vec<_> = handles.into_iter().map(|h| h.join()).collect();
            results
                .into_iter()
                .map(|r| r.unwrap_or_else(|p| std::panic::resume_unwind(p)))
                .collect()
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Round> {
        self.shared
            .round
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn wait_all(&self) -> Result<(), CommError> {
        let mut r = self.lock();
        if r.left > 0 {
            return Err(CommError(format!(
                "rank {}: another rank left the group",
                self.rank
            )));
        }
        let generation = r.generation;
        r.arrived += 1;
        if r.arrived == self.shared.size {
            r.arrived = 0;
            r.generation += 1;
            self.shared.cv.notify_all();
            return Ok(());
        }
        while r.generation == generation {
            if r.left > 0 {
                return Err(CommError(format!(
                    "rank {}: another rank left the group",
                    self.rank
                )));
            }
            r = self
                .shared
                .cv
                .wait(r)
                .unwrap_or_else(|poisoned| poisoned.into_inner());
        }
        Ok(())
    }

    /// Every rank's `mine`, in rank order.
    fn exchange<T: Clone + Send + 'static>(&self, mine: Vec<T>) -> Result<Vec<Vec<T>>, CommError> {
        self.lock().slots[self.rank] = Some(Box::new(mine));
        self.wait_all()?;
        let all = {
            let r = self.lock();
            r.slots
                .iter()
                .map(|s| {
                    s.as_ref()
                        .and_then(|b| b.downcast_ref::<Vec<T>>())
                        .cloned()
                        .ok_or_else(|| CommError("ranks called different collectives".into()))
                })
                .collect::<Result<Vec<_>, _>>()
        };
        // Nobody writes the next round's slot before everyone has read this one.
        self.wait_all()?;
        all
    }
}

impl Drop for ThreadComm {
    fn drop(&mut self) {
        let mut r = self.lock();
        r.left += 1;
        self.shared.cv.notify_all();
    }
}

impl Communicator for ThreadComm {
    type Error = CommError;
    fn rank(&self) -> usize {
        self.rank
    }
    fn size(&self) -> usize {
        self.shared.size
    }
    fn all_reduce_sum_f64(&mut self, buf: &mut [f64]) -> Result<(), CommError> {
        let all = self.exchange(buf.to_vec())?;
        for (i, x) in buf.iter_mut().enumerate() {
            *x = all.iter().fold(0.0, |acc, v| acc + v[i]);
        }
        Ok(())
    }
    fn all_gather_f64(
        &mut self,
        mine: &[f64],
        counts: &[usize],
        out: &mut [f64],
    ) -> Result<(), CommError> {
        check_gather(self.rank, self.size(), mine.len(), counts, out.len())?;
        let all = self.exchange(mine.to_vec())?;
        let mut at = 0;
        for part in all {
            out[at..at + part.len()].copy_from_slice(&part);
            at += part.len();
        }
        Ok(())
    }
    fn barrier(&mut self) -> Result<(), CommError> {
        self.wait_all()
    }
}

impl<B: HostSlices + ?Sized> BufferComm<B> for ThreadComm {
    fn all_gather_parts_many<E: Element>(
        &mut self,
        backend: &mut B,
        bufs: &mut [&mut B::Buf<E>],
        counts: &[Vec<usize>],
    ) -> Result<(), CommError> {
        check_parts_many(self.rank, self.size(), backend, bufs, counts)?;
        let mut mine = Vec::new();
        for (b, c) in bufs.iter_mut().zip(counts) {
            let b = B::host_mut(b);
            let off = offsets(c);
            mine.extend_from_slice(&b[off[self.rank]..off[self.rank + 1]]);
        }
        let all = self.exchange(mine)?;
        for (r, part) in all.iter().enumerate() {
            let mut at = 0;
            for (b, c) in bufs.iter_mut().zip(counts) {
                let b = B::host_mut(b);
                let off = offsets(c);
                b[off[r]..off[r + 1]].copy_from_slice(&part[at..at + c[r]]);
                at += c[r];
            }
        }
        Ok(())
    }

    fn all_reduce_sum(&mut self, _: &mut B, buf: &mut B::Buf<f32>) -> Result<(), CommError> {
        let buf = B::host_mut(buf);
        let all = self.exchange(buf.to_vec())?;
        if all.iter().any(|v| v.len() != buf.len()) {
            return Err(CommError(
                "all-reduce of buffers of different lengths".into(),
            ));
        }
        for (i, x) in buf.iter_mut().enumerate() {
            *x = all.iter().fold(0.0, |acc, v| acc + v[i]);
        }
        Ok(())
    }
    fn reduce_scatter_sum_many(
        &mut self,
        backend: &mut B,
        bufs: &mut [&mut B::Buf<f32>],
        counts: &[Vec<usize>],
    ) -> Result<(), CommError> {
        reduce_scatter_each(self, backend, bufs, counts)
    }
    fn reduce_scatter_sum(
        &mut self,
        _: &mut B,
        buf: &mut B::Buf<f32>,
        counts: &[usize],
    ) -> Result<(), CommError> {
        let buf = B::host_mut(buf);
        check_parts(self.rank, self.size(), counts, buf.len())?;
        let all = self.exchange(buf.to_vec())?;
        let off = offsets(counts);
        for i in off[self.rank]..off[self.rank + 1] {
            buf[i] = all.iter().fold(0.0, |acc, v| acc + v[i]);
        }
        Ok(())
    }
    fn all_gather_parts<E: Element>(
        &mut self,
        _: &mut B,
        buf: &mut B::Buf<E>,
        counts: &[usize],
    ) -> Result<(), CommError> {
        let buf = B::host_mut(buf);
        check_parts(self.rank, self.size(), counts, buf.len())?;
        let off = offsets(counts);
        let all = self.exchange(buf[off[self.rank]..off[self.rank + 1]].to_vec())?;
        for (r, part) in all.into_iter().enumerate() {
            buf[off[r]..off[r + 1]].copy_from_slice(&part);
        }
        Ok(())
    }
}
