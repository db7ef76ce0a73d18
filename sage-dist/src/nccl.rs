//! NCCL through cudarc (feature `nccl`): [`NcclComm`] implements the communicator traits over
//! sage-cuda's buffers, and sage-cuda's [`Cuda`] gets [`Views`] (aliases of device memory),
//! so a rank steps its pieces of each tensor in place on the GPU.
//!
//! libnccl is loaded at run time, like the rest of sage-cuda: this builds with no CUDA toolkit
//! and reports "not available" on a machine without a driver or without libnccl (cudarc looks
//! for `libnccl.so` and a few versioned names; NCCL's own soname is `libnccl.so.2`, so point
//! `LD_LIBRARY_PATH` at a directory with a `libnccl.so` link to it, e.g. the one in the
//! `nvidia-nccl-cu13` wheel).
//!
//! One process per GPU (NCCL refuses two ranks on one device). Every NCCL call and every
//! sage-cuda launch go to the backend's stream, so they are ordered without events. The
//! ranks find each other through an NCCL unique id made on rank 0 and handed to the others:
//! [`NcclComm::from_mpi`] (features `nccl` and `mpi`) broadcasts it over MPI;
//! [`NcclComm::new`] takes it from wherever the launcher put it; [`NcclComm::single`] is the
//! world of one.

use std::any::Any;
use std::marker::PhantomData;
use std::mem::ManuallyDrop;
use std::ops::{Deref, DerefMut, Range};
use std::sync::Arc;

use cudarc::driver::{CudaSlice, CudaStream, DevicePtr, DevicePtrMut};
use cudarc::nccl::{group_end, group_start, Comm, Id, NcclType, ReduceOp};
use sage_core::{bf16, f16, Element};
use sage_cuda::Cuda;

use crate::comm::{
    check_gather, check_parts, check_parts_many, offsets, reduce_scatter_each, BufferComm,
    CommError, Communicator,
};
use crate::views::Views;

/// Runs `f`, turning a panic inside cudarc (a library or symbol that is not there) into an
/// error.
fn guarded<T>(what: &str, f: impl FnOnce() -> Result<T, CommError>) -> Result<T, CommError> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).unwrap_or_else(|p| {
        let msg = p
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_default();
        Err(CommError(format!("{what}: not available: {msg}")))
    })
}

fn nccl(what: &str) -> impl Fn(cudarc::nccl::result::NcclError) -> CommError + '_ {
    move |e| CommError(format!("{what}: NCCL error {:?}", e.0))
}

fn driver(what: &str) -> impl Fn(cudarc::driver::DriverError) -> CommError + '_ {
    move |e| CommError(format!("{what}: {e}"))
}

/// Whether libnccl can be loaded here.
pub fn nccl_present() -> bool {
    // SAFETY: only tries to dlopen the library by its candidate names and closes it.
    unsafe { cudarc::nccl::sys::is_culib_present() }
}

/// The NCCL version (e.g. 22903 for 2.29.3), when libnccl loads.
pub fn nccl_version() -> Result<i32, CommError> {
    if !nccl_present() {
        return Err(CommError("libnccl not found".into()));
    }
    guarded("ncclGetVersion", || {
        let mut v = 0;
        // SAFETY: writes one int.
        unsafe { cudarc::nccl::sys::ncclGetVersion(&mut v) }
            .result()
            .map_err(nccl("ncclGetVersion"))?;
        Ok(v)
    })
}

/// A new NCCL unique id (on rank 0; hand its 128 bytes to every rank).
pub fn unique_id() -> Result<Id, CommError> {
    if !nccl_present() {
        return Err(CommError("libnccl not found".into()));
    }
    guarded("ncclGetUniqueId", || {
        Id::new().map_err(nccl("ncclGetUniqueId"))
    })
}

/// An NCCL communicator on a sage-cuda backend's stream.
pub struct NcclComm {
    comm: Comm,
    stream: Arc<CudaStream>,
}

impl std::fmt::Debug for NcclComm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NcclComm")
            .field("rank", &self.comm.rank())
            .field("size", &self.comm.world_size())
            .finish()
    }
}

impl NcclComm {
    /// Joins the communicator `id` as rank `rank` of `world`, on `cuda`'s stream (collective:
    /// every rank calls it).
    pub fn new(cuda: &Cuda, rank: usize, world: usize, id: Id) -> Result<Self, CommError> {
        if !nccl_present() {
            return Err(CommError("libnccl not found".into()));
        }
        let stream = cuda.stream().clone();
        guarded("ncclCommInitRank", || {
            let comm = Comm::from_rank(stream.clone(), rank, world, id)
                .map_err(nccl("ncclCommInitRank"))?;
            Ok(NcclComm { comm, stream })
        })
    }

    /// The world of one process.
    pub fn single(cuda: &Cuda) -> Result<Self, CommError> {
        NcclComm::new(cuda, 0, 1, unique_id()?)
    }

    /// Joins the NCCL communicator spanning the ranks of `mpi` (rank 0 makes the id and MPI
    /// broadcasts it).
    #[cfg(feature = "mpi")]
    pub fn from_mpi(cuda: &Cuda, mpi: &crate::mpi::MpiComm) -> Result<Self, CommError> {
        use mpi::traits::{Communicator as _, Root};
        let root = mpi.raw().process_at_rank(0);
        let mut bytes = [0u8; 128];
        let ok = if mpi.raw().rank() == 0 {
            match unique_id() {
                Ok(id) => {
                    for (b, c) in bytes.iter_mut().zip(id.internal()) {
                        *b = *c as u8;
                    }
                    1u8
                }
                Err(_) => 0,
            }
        } else {
            0
        };
        let mut flag = [ok];
        root.broadcast_into(&mut flag[..]);
        if flag[0] == 0 {
            return Err(CommError("rank 0 could not make an NCCL id".into()));
        }
        root.broadcast_into(&mut bytes[..]);
        let mut internal = [0 as core::ffi::c_char; 128];
        for (c, b) in internal.iter_mut().zip(bytes) {
            *c = b as core::ffi::c_char;
        }
        NcclComm::new(
            cuda,
            mpi.raw().rank() as usize,
            mpi.raw().size() as usize,
            Id::uninit(internal),
        )
    }

    /// The cudarc communicator.
    pub fn raw(&self) -> &Comm {
        &self.comm
    }

    fn sync(&self) -> Result<(), CommError> {
        self.stream.synchronize().map_err(driver("synchronize"))
    }
}

impl Communicator for NcclComm {
    type Error = CommError;
    fn rank(&self) -> usize {
        self.comm.rank()
    }
    fn size(&self) -> usize {
        self.comm.world_size()
    }
    fn all_reduce_sum_f64(&mut self, buf: &mut [f64]) -> Result<(), CommError> {
        if buf.is_empty() {
            return Ok(());
        }
        let mut d = self.stream.clone_htod(buf).map_err(driver("upload"))?;
        self.comm
            .all_reduce_in_place(&mut d, &ReduceOp::Sum)
            .map_err(nccl("all-reduce"))?;
        self.stream
            .memcpy_dtoh(&d, buf)
            .map_err(driver("download"))?;
        self.sync()
    }
    fn all_gather_f64(
        &mut self,
        mine: &[f64],
        counts: &[usize],
        out: &mut [f64],
    ) -> Result<(), CommError> {
        let (rank, size) = (self.rank(), self.size());
        check_gather(rank, size, mine.len(), counts, out.len())?;
        // NCCL's all-gather moves equal blocks: pad every part to the largest.
        let m = counts.iter().copied().max().unwrap_or(0);
        if m == 0 {
            return Ok(());
        }
        let mut send = vec![0f64; m];
        send[..mine.len()].copy_from_slice(mine);
        let send = self.stream.clone_htod(&send).map_err(driver("upload"))?;
        let mut recv = self
            .stream
            .alloc_zeros::<f64>(m * size)
            .map_err(driver("alloc"))?;
        self.comm
            .all_gather(&send, &mut recv)
            .map_err(nccl("all-gather"))?;
        let host = self.stream.clone_dtoh(&recv).map_err(driver("download"))?;
        let off = offsets(counts);
        for r in 0..size {
            out[off[r]..off[r + 1]].copy_from_slice(&host[r * m..r * m + counts[r]]);
        }
        Ok(())
    }
    fn barrier(&mut self) -> Result<(), CommError> {
        let mut x = [0.0];
        self.all_reduce_sum_f64(&mut x)
    }
}

/// One broadcast per non-empty part, from its owner, in place (call inside a group).
fn broadcast_parts<T: NcclType>(
    comm: &Comm,
    buf: &mut CudaSlice<T>,
    counts: &[usize],
) -> Result<(), CommError> {
    let off = offsets(counts);
    for (r, &c) in counts.iter().enumerate() {
        if c > 0 {
            let mut part = buf.slice_mut(off[r]..off[r + 1]);
            comm.broadcast_in_place(&mut part, r as i32)
                .map_err(nccl("broadcast"))?;
        }
    }
    Ok(())
}

/// [`broadcast_parts`] for a buffer of any sage-core element type.
fn broadcast_any<E: Element>(
    comm: &Comm,
    buf: &mut CudaSlice<E>,
    counts: &[usize],
) -> Result<(), CommError> {
    let any: &mut dyn Any = buf;
    if let Some(b) = any.downcast_mut::<CudaSlice<f32>>() {
        return broadcast_parts(comm, b, counts);
    }
    if let Some(b) = any.downcast_mut::<CudaSlice<bf16>>() {
        return broadcast_parts(comm, b, counts);
    }
    if let Some(b) = any.downcast_mut::<CudaSlice<f16>>() {
        return broadcast_parts(comm, b, counts);
    }
    Err(CommError(format!("no NCCL type for {}", E::DTYPE)))
}

/// Runs `f` inside one NCCL group (its operations are launched together at the end).
fn grouped(f: impl FnOnce() -> Result<(), CommError>) -> Result<(), CommError> {
    group_start().map_err(nccl("group start"))?;
    let res = f();
    let end = group_end().map_err(nccl("group end"));
    res.and(end.map(|_| ()))
}

impl BufferComm<Cuda> for NcclComm {
    fn all_reduce_sum(&mut self, _: &mut Cuda, buf: &mut CudaSlice<f32>) -> Result<(), CommError> {
        self.comm
            .all_reduce_in_place(buf, &ReduceOp::Sum)
            .map_err(nccl("all-reduce"))?;
        Ok(())
    }

    fn reduce_scatter_sum(
        &mut self,
        _: &mut Cuda,
        buf: &mut CudaSlice<f32>,
        counts: &[usize],
    ) -> Result<(), CommError> {
        check_parts(self.rank(), self.size(), counts, buf.len())?;
        // Parts differ in length (NCCL's reduce-scatter wants equal blocks): one reduce per
        // part to its owner, in one group.
        let off = offsets(counts);
        let comm = &self.comm;
        grouped(|| {
            for (r, &c) in counts.iter().enumerate() {
                if c > 0 {
                    let mut part = buf.slice_mut(off[r]..off[r + 1]);
                    comm.reduce_in_place(&mut part, &ReduceOp::Sum, r as i32)
                        .map_err(nccl("reduce"))?;
                }
            }
            Ok(())
        })
    }

    fn reduce_scatter_sum_many(
        &mut self,
        backend: &mut Cuda,
        bufs: &mut [&mut CudaSlice<f32>],
        counts: &[Vec<usize>],
    ) -> Result<(), CommError> {
        reduce_scatter_each(self, backend, bufs, counts)
    }

    fn all_gather_parts<E: Element>(
        &mut self,
        _: &mut Cuda,
        buf: &mut CudaSlice<E>,
        counts: &[usize],
    ) -> Result<(), CommError> {
        check_parts(self.rank(), self.size(), counts, buf.len())?;
        grouped(|| broadcast_any(&self.comm, buf, counts))
    }

    fn all_gather_parts_many<E: Element>(
        &mut self,
        backend: &mut Cuda,
        bufs: &mut [&mut CudaSlice<E>],
        counts: &[Vec<usize>],
    ) -> Result<(), CommError> {
        check_parts_many(self.rank(), self.size(), backend, bufs, counts)?;
        grouped(|| {
            for (b, c) in bufs.iter_mut().zip(counts) {
                broadcast_any(&self.comm, b, c)?;
            }
            Ok(())
        })
    }
}

// ---------------------------------------------------------------------------------------------
// Views of device buffers.

/// Part of a device buffer, lent as a `CudaSlice` of its own (an alias of the same memory
/// that is never freed: it is leaked back when the view ends). Borrows the buffer it views.
pub struct CudaPart<'b, E> {
    alias: ManuallyDrop<CudaSlice<E>>,
    _borrow: PhantomData<&'b CudaSlice<E>>,
}

/// Part of a device buffer, lent mutably ([`CudaPart`]'s mutable twin).
pub struct CudaPartMut<'b, E> {
    alias: ManuallyDrop<CudaSlice<E>>,
    _borrow: PhantomData<&'b mut CudaSlice<E>>,
}

impl<E> Deref for CudaPart<'_, E> {
    type Target = CudaSlice<E>;
    fn deref(&self) -> &CudaSlice<E> {
        &self.alias
    }
}

impl<E> Deref for CudaPartMut<'_, E> {
    type Target = CudaSlice<E>;
    fn deref(&self) -> &CudaSlice<E> {
        &self.alias
    }
}

impl<E> DerefMut for CudaPartMut<'_, E> {
    fn deref_mut(&mut self) -> &mut CudaSlice<E> {
        &mut self.alias
    }
}

impl<E> Drop for CudaPart<'_, E> {
    fn drop(&mut self) {
        // SAFETY: taken once, here; `leak` gives the memory back to nobody (the viewed buffer
        // owns it) after ordering the alias's pending work on its stream.
        let _ = unsafe { ManuallyDrop::take(&mut self.alias) }.leak();
    }
}

impl<E> Drop for CudaPartMut<'_, E> {
    fn drop(&mut self) {
        // SAFETY: as for `CudaPart`.
        let _ = unsafe { ManuallyDrop::take(&mut self.alias) }.leak();
    }
}

fn alias<E: Element>(stream: &Arc<CudaStream>, base: u64, range: Range<usize>) -> CudaSlice<E> {
    let ptr = base + (range.start * std::mem::size_of::<E>()) as u64;
    // SAFETY: `ptr .. ptr + len` lies inside a live allocation that the returned view borrows
    // (checked by the callers' asserts); the alias is never freed (see `CudaPart::drop`).
    unsafe { stream.upgrade_device_ptr::<E>(ptr, range.len()) }
}

impl Views for Cuda {
    type View<'b, E: Element> = CudaPart<'b, E>;
    type ViewMut<'b, E: Element> = CudaPartMut<'b, E>;

    fn view<'b, E: Element>(&self, buf: &'b CudaSlice<E>, range: Range<usize>) -> CudaPart<'b, E> {
        assert!(range.start <= range.end && range.end <= buf.len());
        let base = buf.device_ptr(self.stream()).0;
        CudaPart {
            alias: ManuallyDrop::new(alias(self.stream(), base, range)),
            _borrow: PhantomData,
        }
    }

    fn view_mut<'b, E: Element>(
        &self,
        buf: &'b mut CudaSlice<E>,
        range: Range<usize>,
    ) -> CudaPartMut<'b, E> {
        assert!(range.start <= range.end && range.end <= buf.len());
        let base = buf.device_ptr_mut(self.stream()).0;
        CudaPartMut {
            alias: ManuallyDrop::new(alias(self.stream(), base, range)),
            _borrow: PhantomData,
        }
    }
}
