//! MPI through rsmpi (feature `mpi`): [`MpiComm`] implements the communicator traits over host
//! slices ([`HostSlices`] backends: `sage_cpu::Cpu`, `sage_cpu::SimdCpu`).
//!
//! Built with `default-features = false` (no libffi: only MPI's built-in sum is used). Tested
//! with MPICH from Debian (`apt-get install mpich libmpich-dev libclang-dev`), which runs
//! `mpiexec -n 4` on a 2-core machine; Open MPI works too (it needs `--oversubscribe` for more
//! ranks than cores).
//!
//! ```ignore
//! let universe = mpi::initialize().expect("MPI initialised twice");
//! let mut comm = sage_dist::mpi::MpiComm::new(universe.world());
//! ```
//!
//! The collectives are MPI's (`MPI_Iallgatherv`, `MPI_Iallreduce`, `MPI_Ireduce_scatter`),
//! started and then polled with `MPI_Test`, yielding the processor between polls: MPICH's
//! ranks otherwise spin while they wait, and with more ranks than cores (`mpiexec -n 4` on 2
//! cores) a spinning rank takes the core the rank it waits for needs ([`MpiComm::spin`] turns
//! the yield off). rsmpi does not expose `MPI_IN_PLACE`, so a rank's own part is copied to a
//! scratch buffer first (`1/N` of the parameters for the all-gather, which packs every tensor
//! into one collective; the whole buffer for the all-reduce). Counts are `int`s in MPI: a part
//! above 2^31 − 1 elements is refused.

use std::ffi::c_void;

use mpi::datatype::PartitionMut;
use mpi::raw::AsRaw;
use mpi::request::{scope, Request, Scope};
use mpi::topology::SimpleCommunicator;
use mpi::traits::{Communicator as _, CommunicatorCollectives, Equivalence};
use mpi::Count;
use sage_core::Element;

use crate::comm::{
    check_gather, check_parts, check_parts_many, offsets, BufferComm, CommError, Communicator,
};
use crate::views::HostSlices;

/// An MPI communicator (usually `universe.world()`). Errors are MPI's default (fatal) plus
/// [`CommError`] for arguments that do not fit.
pub struct MpiComm {
    comm: SimpleCommunicator,
    rank: usize,
    size: usize,
    scratch32: Vec<u32>,
    scratch16: Vec<u16>,
    recv32: Vec<u32>,
    recv16: Vec<u16>,
    scratch_f32: Vec<f32>,
    recv_f32: Vec<f32>,
    spin: bool,
}

/// Waits for `req`: polls, yielding the processor between polls unless `spin`.
fn finish<'a, R: ?Sized, S: Scope<'a>>(mut req: Request<'a, R, S>, spin: bool) {
    loop {
        match req.test() {
            Ok(_) => return,
            Err(r) => {
                req = r;
                if !spin {
                    std::thread::yield_now();
                }
            }
        }
    }
}

/// Polls a raw request until it completes (yielding between polls unless `spin`).
///
/// # Safety
/// `req` is an active request of this process.
unsafe fn test_until_done(req: &mut mpi::ffi::MPI_Request, spin: bool) {
    loop {
        let mut flag = 0;
        mpi::ffi::MPI_Test(req, &mut flag, mpi::ffi::RSMPI_STATUS_IGNORE);
        if flag != 0 {
            return;
        }
        if !spin {
            std::thread::yield_now();
        }
    }
}

impl std::fmt::Debug for MpiComm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MpiComm")
            .field("rank", &self.rank)
            .field("size", &self.size)
            .finish()
    }
}

impl MpiComm {
    /// Wraps an MPI communicator.
    pub fn new(comm: SimpleCommunicator) -> Self {
        let rank = comm.rank() as usize;
        let size = comm.size() as usize;
        MpiComm {
            comm,
            rank,
            size,
            scratch32: Vec::new(),
            scratch16: Vec::new(),
            recv32: Vec::new(),
            recv16: Vec::new(),
            scratch_f32: Vec::new(),
            recv_f32: Vec::new(),
            spin: false,
        }
    }

    /// Waits in collectives by spinning (`true`, MPI's own way: lowest latency when every rank
    /// has a core) or by polling and yielding the processor (`false`, the default: ranks that
    /// share cores let each other run).
    pub fn spin(mut self, on: bool) -> Self {
        self.spin = on;
        self
    }

    /// The wrapped communicator (for the application's own MPI calls).
    pub fn raw(&self) -> &SimpleCommunicator {
        &self.comm
    }

    /// The MPI library's version string.
    pub fn library_version() -> String {
        mpi::environment::library_version().unwrap_or_default()
    }
}

fn counts_i32(counts: &[usize]) -> Result<(Vec<Count>, Vec<Count>), CommError> {
    let too_big = |n: usize| CommError(format!("{n} elements exceed MPI's int counts"));
    let c = counts
        .iter()
        .map(|&n| Count::try_from(n).map_err(|_| too_big(n)))
        .collect::<Result<Vec<_>, _>>()?;
    let d = offsets(counts)[..counts.len()]
        .iter()
        .map(|&n| Count::try_from(n).map_err(|_| too_big(n)))
        .collect::<Result<Vec<_>, _>>()?;
    Ok((c, d))
}

/// Where each rank's parts of many buffers go when they are packed rank by rank (rank 0's
/// part of buffer 0, of buffer 1, ..., then rank 1's ...): the per-rank totals, and for each
/// rank and buffer the offset in the packed array.
fn packing(counts: &[Vec<usize>], size: usize) -> (Vec<usize>, Vec<Vec<usize>>) {
    let mut per_rank = vec![0usize; size];
    let mut at = vec![vec![0usize; counts.len()]; size];
    let mut pos = 0;
    for r in 0..size {
        for (i, c) in counts.iter().enumerate() {
            at[r][i] = pos;
            pos += c[r];
            per_rank[r] += c[r];
        }
    }
    (per_rank, at)
}

/// The bits of a slice of an [`Element`] (`f32`, `f16`, `bf16`), to move without arithmetic.
enum Bits<'a> {
    W32(&'a mut [u32]),
    W16(&'a mut [u16]),
}

fn bits<E: Element>(x: &mut [E]) -> Bits<'_> {
    use std::mem::{align_of, size_of};
    let (ptr, n) = (x.as_mut_ptr(), x.len());
    if size_of::<E>() == 4 && align_of::<E>() >= align_of::<u32>() {
        // SAFETY: `E` is f32 (sage-core's elements are sealed: f32, f16, bf16), four plain
        // bytes, aligned for u32; the borrow of `x` is carried over.
        Bits::W32(unsafe { std::slice::from_raw_parts_mut(ptr as *mut u32, n) })
    } else {
        assert!(size_of::<E>() == 2 && align_of::<E>() >= align_of::<u16>());
        // SAFETY: `E` is f16 or bf16: two plain bytes (repr(transparent) over u16).
        Bits::W16(unsafe { std::slice::from_raw_parts_mut(ptr as *mut u16, n) })
    }
}

impl Communicator for MpiComm {
    type Error = CommError;
    fn rank(&self) -> usize {
        self.rank
    }
    fn size(&self) -> usize {
        self.size
    }
    fn all_reduce_sum_f64(&mut self, buf: &mut [f64]) -> Result<(), CommError> {
        let send = buf.to_vec();
        let (comm, spin) = (&self.comm, self.spin);
        scope(|sc| {
            let req = comm.immediate_all_reduce_into(
                sc,
                &send[..],
                buf,
                mpi::collective::SystemOperation::sum(),
            );
            finish(req, spin);
        });
        Ok(())
    }
    fn all_gather_f64(
        &mut self,
        mine: &[f64],
        counts: &[usize],
        out: &mut [f64],
    ) -> Result<(), CommError> {
        check_gather(self.rank, self.size, mine.len(), counts, out.len())?;
        let (c, d) = counts_i32(counts)?;
        let mut part = PartitionMut::new(out, c, d);
        let (comm, spin) = (&self.comm, self.spin);
        scope(|sc| {
            let req = comm.immediate_all_gather_varcount_into(sc, mine, &mut part);
            finish(req, spin);
        });
        Ok(())
    }
    fn barrier(&mut self) -> Result<(), CommError> {
        finish(self.comm.immediate_barrier(), self.spin);
        Ok(())
    }
}

impl<B: HostSlices + ?Sized> BufferComm<B> for MpiComm {
    fn all_reduce_sum(&mut self, _: &mut B, buf: &mut B::Buf<f32>) -> Result<(), CommError> {
        let buf = B::host_mut(buf);
        Count::try_from(buf.len())
            .map_err(|_| CommError(format!("{} elements exceed MPI's int counts", buf.len())))?;
        self.scratch_f32.clear();
        self.scratch_f32.extend_from_slice(buf);
        let (comm, spin, send) = (&self.comm, self.spin, &self.scratch_f32);
        scope(|sc| {
            let req = comm.immediate_all_reduce_into(
                sc,
                &send[..],
                buf,
                mpi::collective::SystemOperation::sum(),
            );
            finish(req, spin);
        });
        Ok(())
    }

    fn all_reduce_sum_many(
        &mut self,
        backend: &mut B,
        bufs: &mut [&mut B::Buf<f32>],
    ) -> Result<(), CommError> {
        if self.size == 1 {
            return Ok(());
        }
        let total: usize = bufs.iter().map(|b| B::host(b).len()).sum();
        if Count::try_from(total).is_err() {
            for b in bufs.iter_mut() {
                self.all_reduce_sum(backend, b)?;
            }
            return Ok(());
        }
        // Pack, one all-reduce, unpack.
        let mut send = std::mem::take(&mut self.scratch_f32);
        send.clear();
        for b in bufs.iter() {
            send.extend_from_slice(B::host(b));
        }
        let mut recv = std::mem::take(&mut self.recv_f32);
        recv.clear();
        recv.resize(total, 0.0);
        {
            let (comm, spin) = (&self.comm, self.spin);
            scope(|sc| {
                let req = comm.immediate_all_reduce_into(
                    sc,
                    &send[..],
                    &mut recv[..],
                    mpi::collective::SystemOperation::sum(),
                );
                finish(req, spin);
            });
        }
        let mut at = 0;
        for b in bufs.iter_mut() {
            let b = B::host_mut(b);
            b.copy_from_slice(&recv[at..at + b.len()]);
            at += b.len();
        }
        self.scratch_f32 = send;
        self.recv_f32 = recv;
        Ok(())
    }

    fn reduce_scatter_sum_many(
        &mut self,
        backend: &mut B,
        bufs: &mut [&mut B::Buf<f32>],
        counts: &[Vec<usize>],
    ) -> Result<(), CommError> {
        check_parts_many(self.rank, self.size, backend, bufs, counts)?;
        if self.size == 1 {
            return Ok(());
        }
        let (per_rank, at) = packing(counts, self.size);
        let total: usize = per_rank.iter().sum();
        if Count::try_from(total).is_err() {
            for (b, c) in bufs.iter_mut().zip(counts) {
                self.reduce_scatter_sum(backend, b, c)?;
            }
            return Ok(());
        }
        let (c, _) = counts_i32(&per_rank)?;
        let rank = self.rank;
        // Pack every rank's parts rank by rank, one reduce-scatter, unpack this rank's.
        let mut send = std::mem::take(&mut self.scratch_f32);
        send.clear();
        send.resize(total, 0.0);
        for (i, (b, cnt)) in bufs.iter().zip(counts).enumerate() {
            let b = B::host(b);
            let off = offsets(cnt);
            for r in 0..self.size {
                send[at[r][i]..at[r][i] + cnt[r]].copy_from_slice(&b[off[r]..off[r + 1]]);
            }
        }
        let mut recv = std::mem::take(&mut self.recv_f32);
        recv.clear();
        recv.resize(per_rank[rank], 0.0);
        // SAFETY: `send` holds Σ per_rank f32s, `recv` per_rank[rank]; both and the counts
        // outlive the request, completed before they are touched.
        unsafe {
            let mut req = std::mem::MaybeUninit::uninit();
            mpi::ffi::MPI_Ireduce_scatter(
                send.as_ptr() as *const c_void,
                recv.as_mut_ptr() as *mut c_void,
                c.as_ptr(),
                f32::equivalent_datatype().as_raw(),
                mpi::ffi::RSMPI_SUM,
                self.comm.as_raw(),
                req.as_mut_ptr(),
            );
            let mut req = req.assume_init();
            test_until_done(&mut req, self.spin);
        }
        let base = at[rank][0];
        for (i, (b, cnt)) in bufs.iter_mut().zip(counts).enumerate() {
            let b = B::host_mut(b);
            let off = offsets(cnt);
            let from = at[rank][i] - base;
            b[off[rank]..off[rank + 1]].copy_from_slice(&recv[from..from + cnt[rank]]);
        }
        self.scratch_f32 = send;
        self.recv_f32 = recv;
        Ok(())
    }

    fn reduce_scatter_sum(
        &mut self,
        _: &mut B,
        buf: &mut B::Buf<f32>,
        counts: &[usize],
    ) -> Result<(), CommError> {
        let buf = B::host_mut(buf);
        check_parts(self.rank, self.size, counts, buf.len())?;
        let (c, _) = counts_i32(counts)?;
        let off = offsets(counts);
        self.scratch_f32.clear();
        self.scratch_f32.resize(counts[self.rank], 0.0);
        // SAFETY: `buf` holds Σ counts f32s (checked), the receive buffer counts[rank]; both
        // and the counts outlive the request, which is completed before they are touched; the
        // datatype is f32's, the operation MPI's sum.
        unsafe {
            let mut req = std::mem::MaybeUninit::uninit();
            mpi::ffi::MPI_Ireduce_scatter(
                buf.as_ptr() as *const c_void,
                self.scratch_f32.as_mut_ptr() as *mut c_void,
                c.as_ptr(),
                f32::equivalent_datatype().as_raw(),
                mpi::ffi::RSMPI_SUM,
                self.comm.as_raw(),
                req.as_mut_ptr(),
            );
            let mut req = req.assume_init();
            test_until_done(&mut req, self.spin);
        }
        buf[off[self.rank]..off[self.rank + 1]].copy_from_slice(&self.scratch_f32);
        Ok(())
    }

    fn all_gather_parts_many<E: Element>(
        &mut self,
        backend: &mut B,
        bufs: &mut [&mut B::Buf<E>],
        counts: &[Vec<usize>],
    ) -> Result<(), CommError> {
        check_parts_many(self.rank, self.size, backend, bufs, counts)?;
        let (per_rank, at) = packing(counts, self.size);
        let total: usize = per_rank.iter().sum();
        if Count::try_from(total).is_err() {
            // Past MPI's int displacements: one collective per buffer.
            for (b, c) in bufs.iter_mut().zip(counts) {
                self.all_gather_parts(backend, b, c)?;
            }
            return Ok(());
        }
        if self.size == 1 {
            return Ok(());
        }
        let (rank, size, spin) = (self.rank, self.size, self.spin);
        {
            let (c, d) = counts_i32(&per_rank)?;
            macro_rules! go {
                ($scratch:ident, $recv:ident, $w:ident) => {{
                    // Pack this rank's parts, gather every rank's, unpack the others'.
                    let mut send = std::mem::take(&mut self.$scratch);
                    send.clear();
                    for (b, cnt) in bufs.iter_mut().zip(counts) {
                        let Bits::$w(b) = bits(B::host_mut(b)) else {
                            unreachable!()
                        };
                        let off = offsets(cnt);
                        send.extend_from_slice(&b[off[rank]..off[rank + 1]]);
                    }
                    let mut recv = std::mem::take(&mut self.$recv);
                    recv.clear();
                    recv.resize(total, 0);
                    {
                        let mut part = PartitionMut::new(&mut recv[..], &c[..], &d[..]);
                        let comm = &self.comm;
                        scope(|sc| {
                            let req =
                                comm.immediate_all_gather_varcount_into(sc, &send[..], &mut part);
                            finish(req, spin);
                        });
                    }
                    for (i, (b, cnt)) in bufs.iter_mut().zip(counts).enumerate() {
                        let Bits::$w(b) = bits(B::host_mut(b)) else {
                            unreachable!()
                        };
                        let off = offsets(cnt);
                        for r in (0..size).filter(|&r| r != rank) {
                            b[off[r]..off[r + 1]]
                                .copy_from_slice(&recv[at[r][i]..at[r][i] + cnt[r]]);
                        }
                    }
                    self.$scratch = send;
                    self.$recv = recv;
                }};
            }
            if std::mem::size_of::<E>() == 4 {
                go!(scratch32, recv32, W32)
            } else {
                go!(scratch16, recv16, W16)
            }
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
        check_parts(self.rank, self.size, counts, buf.len())?;
        let (c, d) = counts_i32(counts)?;
        let off = offsets(counts);
        let mine = off[self.rank]..off[self.rank + 1];
        match bits(buf) {
            Bits::W32(b) => {
                self.scratch32.clear();
                self.scratch32.extend_from_slice(&b[mine]);
                let mut part = PartitionMut::new(b, c, d);
                let (comm, spin, send) = (&self.comm, self.spin, &self.scratch32);
                scope(|sc| {
                    finish(
                        comm.immediate_all_gather_varcount_into(sc, &send[..], &mut part),
                        spin,
                    )
                });
            }
            Bits::W16(b) => {
                self.scratch16.clear();
                self.scratch16.extend_from_slice(&b[mine]);
                let mut part = PartitionMut::new(b, c, d);
                let (comm, spin, send) = (&self.comm, self.spin, &self.scratch16);
                scope(|sc| {
                    finish(
                        comm.immediate_all_gather_varcount_into(sc, &send[..], &mut part),
                        spin,
                    )
                });
            }
        }
        Ok(())
    }
}
