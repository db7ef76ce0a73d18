//! # sage-cuda
//!
//! SAGE ([`sage_core`]) on NVIDIA GPUs: one fused pass per step (every buffer read once and
//! written once), many tensors per launch, the gradient norms of all tensors in one launch.
//!
//! The CUDA layer is [`cudarc`]: the driver API and NVRTC are loaded at run time (the default
//! feature, `dynamic-loading`), so this crate builds with no CUDA toolkit and a program that
//! uses it starts on a machine with no driver ([`Cuda::new`] then returns a `NotAvailable`
//! error). The `dynamic-linking` feature links them at build time instead, as candle's CUDA
//! backend has cudarc do: a build that has both must use this one (one cudarc serves both). Its buffers are cudarc's
//! [`CudaSlice`], the type candle and burn hold their tensors in, so a framework's parameters
//! are stepped in place: [`Backend::Buf<E>`](sage_core::Backend::Buf) is `CudaSlice<E>`.
//! [`Cuda`] also implements [`HostBuffers`] (uploads and host copies), so checkpoints and the
//! conformance suite work on it without depending on this crate.
//!
//! Kernels come from the source shared with the OpenCL backend (`sage_core::gpu`), compiled
//! by NVRTC for the device's architecture once per process and storage combination
//! ([`kernels`]). Parameters and gradients may be f32, f16 or bf16, state f32, f16 or bf16;
//! arithmetic is f32 with no FMA contraction, so results match the CPU formula.
//!
//! Gradient norms follow sage-core's chunk grid ([`sage_core::norm`]): one block computes
//! the f64 partial of each 4096-element chunk (a fixed in-block tree, so a partial depends on
//! its chunk's contents only), all tensors' chunks in one launch; a second launch folds each
//! tensor's partials in chunk order, one thread per tensor, which is `norm::fold` bit for bit.
//!
//! ```no_run
//! use sage_core::{Algorithm, Config, Optimizer, ParamGroup, ParamTensor, TensorState};
//! use sage_cuda::Cuda;
//!
//! let gpu = Cuda::new(0)?; // Err(NotAvailable) without a driver or device
//! let (mut w, g) = (gpu.upload(&[0.5f32, -0.25, 1.0])?, gpu.upload(&[0.1f32, 0.2, 0.3])?);
//! let cfg = Config::reference(Algorithm::adamw(), 1e-3).beta0(0.8);
//! // m, v and Ī on the device, and the tensor's own step count.
//! let mut state = TensorState::try_new(cfg.state_layout(true), |_| gpu.zeros::<f32>(3))?;
//! let mut opt = Optimizer::new(gpu, cfg, [ParamGroup::sage()]).expect("valid config");
//! opt.step(&mut [ParamTensor::new(&mut w, &g, state.view())])
//!     .expect("step");
//! assert_eq!(state.step, 1);
//! let w_host = opt.backend_mut().download(&w)?;
//! # Ok::<(), sage_cuda::CudaError>(())
//! ```
#![deny(missing_docs)]

pub mod error;
pub mod kernels;
pub mod plan;

use std::any::{Any, TypeId};
use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex};

pub use cudarc;
use cudarc::driver::{
    CudaContext, CudaEvent, CudaFunction, CudaSlice, CudaStream, DevicePtr, DevicePtrMut,
    DeviceRepr, LaunchConfig, PinnedHostSlice, PushKernelArg, SyncOnDrop, ValidAsZeroBits,
};
use cudarc::nvrtc::Ptx;
use sage_core::norm;
use sage_core::{
    Accumulate, ApplyArgs, Backend, Coeffs, DType, Element, HostBuffers, ParamTensor, TensorMut,
};

pub use error::CudaError;
use kernels::Program;
use plan::{TensorEntry, CHUNK, THREADS};

/// Threads per block of the primitive (grid-stride) kernels.
const PRIMITIVE_THREADS: u32 = 256;
/// Most blocks of a primitive launch; the kernels loop over the rest.
const PRIMITIVE_MAX_BLOCKS: u64 = 1 << 16;

/// [`Coeffs`] passed by value as a kernel parameter (`const sage_coeffs k`).
#[repr(transparent)]
#[derive(Clone, Copy)]
struct KArg(Coeffs);
// SAFETY: `Coeffs` is `#[repr(C)]` with 24 four-byte fields, the layout of `sage_coeffs`.
unsafe impl DeviceRepr for KArg {}

/// Kernels of one program loaded on this context.
struct Loaded {
    funcs: HashMap<String, CudaFunction>,
}

/// Page-locked host memory the launch tables are written to, so their copy to the device is
/// truly asynchronous (a copy from pageable memory first waits for the whole stream, which
/// would stop the host from queueing the next step while the GPU runs the last one).
struct Staging {
    host: PinnedHostSlice<u8>,
    /// Recorded after the copy out of `host`: it may be rewritten once this completes.
    copied: CudaEvent,
}

impl Drop for Staging {
    fn drop(&mut self) {
        // Free the page-locked memory only after the copy reading it has run.
        let _ = self.copied.synchronize();
    }
}

/// Device scratch of one handle, grown as needed and reused across steps.
#[derive(Default)]
struct Scratch {
    /// Two staging buffers, used in turn: writing one never waits for the copy just queued.
    staging: [Option<Staging>; 2],
    next_staging: usize,
    meta: Option<CudaSlice<u8>>,
    partials: Option<CudaSlice<f64>>,
    out: Option<CudaSlice<f64>>,
    /// Each tensor's count of non-finite stored parameters, written by the step kernels.
    counts: Option<CudaSlice<u64>>,
    /// Tests: the next read-back of the counts fails (after its step's launch).
    #[cfg(test)]
    fail_read_back: bool,
}

/// The CUDA backend: a device context, the stream every launch goes to, and the kernels.
///
/// `Clone` gives another handle to the same context, stream and loaded kernels, with its own
/// scratch buffers.
pub struct Cuda {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    arch: String,
    name: String,
    loaded: Arc<Mutex<HashMap<Program, Arc<Loaded>>>>,
    scratch: Scratch,
}

impl Clone for Cuda {
    fn clone(&self) -> Self {
        Cuda {
            ctx: self.ctx.clone(),
            stream: self.stream.clone(),
            arch: self.arch.clone(),
            name: self.name.clone(),
            loaded: self.loaded.clone(),
            scratch: Scratch::default(),
        }
    }
}

impl fmt::Debug for Cuda {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Cuda")
            .field("device", &self.name)
            .field("arch", &self.arch)
            .finish()
    }
}

fn not_available(op: &str, e: cudarc::driver::DriverError) -> CudaError {
    let err = CudaError::driver(op, e);
    match sage_core::BackendError::kind(&err) {
        sage_core::ErrorKind::NotAvailable => CudaError::NotAvailable(err.to_string()),
        _ => err,
    }
}

/// Whether the driver library (`libcuda.so`) can be loaded here.
#[cfg(feature = "dynamic-loading")]
pub fn driver_present() -> bool {
    // SAFETY: only tries to dlopen the library by name and closes it.
    unsafe { cudarc::driver::sys::is_culib_present() }
}

/// Whether the driver library (`libcuda.so`) can be loaded here: always, with `dynamic-linking`
/// (the program is linked against it, so it would not have started without it).
#[cfg(not(feature = "dynamic-loading"))]
pub fn driver_present() -> bool {
    true
}

/// Runs `f`, turning a panic inside cudarc (a symbol missing from an old driver) into an error.
fn guarded<T>(what: &str, f: impl FnOnce() -> Result<T, CudaError>) -> Result<T, CudaError> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).unwrap_or_else(|p| {
        let msg = p
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_default();
        Err(CudaError::NotAvailable(format!("{what}: {msg}")))
    })
}

impl Cuda {
    /// Number of CUDA devices, or `NotAvailable` when there is no driver.
    pub fn device_count() -> Result<usize, CudaError> {
        if !driver_present() {
            return Err(CudaError::NotAvailable(
                "no NVIDIA driver (libcuda.so not found)".into(),
            ));
        }
        guarded("probing the driver", || {
            cudarc::driver::result::init().map_err(|e| not_available("cuInit", e))?;
            let n =
                CudaContext::device_count().map_err(|e| not_available("cuDeviceGetCount", e))?;
            Ok(n.max(0) as usize)
        })
    }

    /// The backend on device `ordinal`, launching on the device's default stream.
    /// `NotAvailable` when there is no driver or no such device.
    pub fn new(ordinal: usize) -> Result<Self, CudaError> {
        let n = Cuda::device_count()?;
        if ordinal >= n {
            return Err(CudaError::NotAvailable(format!(
                "no CUDA device {ordinal} ({n} found)"
            )));
        }
        let ctx = guarded("creating a context", || {
            CudaContext::new(ordinal).map_err(|e| not_available("cuDevicePrimaryCtxRetain", e))
        })?;
        let stream = ctx.default_stream();
        Cuda::with_stream(stream)
    }

    /// The backend on an existing stream (a framework's), so that steps are ordered with the
    /// framework's own work on it.
    pub fn with_stream(stream: Arc<CudaStream>) -> Result<Self, CudaError> {
        let ctx = stream.context().clone();
        guarded("querying the device", || {
            let (major, minor) = ctx
                .compute_capability()
                .map_err(|e| CudaError::driver("compute capability", e))?;
            let name = ctx
                .name()
                .map_err(|e| CudaError::driver("device name", e))?;
            Ok(Cuda {
                arch: format!("sm_{major}{minor}"),
                name: format!("cuda:{} ({name})", ctx.ordinal()),
                ctx: ctx.clone(),
                stream,
                loaded: Arc::default(),
                scratch: Scratch::default(),
            })
        })
    }

    /// `cuda:N (device name)`.
    pub fn name(&self) -> &str {
        &self.name
    }
    /// The architecture kernels are compiled for (`sm_90`).
    pub fn arch(&self) -> &str {
        &self.arch
    }
    /// The context.
    pub fn context(&self) -> &Arc<CudaContext> {
        &self.ctx
    }
    /// The stream every launch of this backend goes to.
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    /// Waits for everything queued on the stream.
    pub fn synchronize(&self) -> Result<(), CudaError> {
        self.stream
            .synchronize()
            .map_err(|e| CudaError::driver("synchronize", e))
    }

    /// Compiles (or fetches from the process cache) and loads the kernels for parameters of
    /// `P` and state of `S`, and the norm kernel of `P`, so the first step does not pay for it.
    pub fn prepare<P: Element, S: Element>(&self) -> Result<(), CudaError> {
        self.program(Program::Step {
            p: P::DTYPE,
            s: S::DTYPE,
        })?;
        self.program(Program::SqNorm { e: P::DTYPE })?;
        Ok(())
    }

    fn program(&self, p: Program) -> Result<Arc<Loaded>, CudaError> {
        let mut map = self.loaded.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(l) = map.get(&p) {
            return Ok(l.clone());
        }
        let img = kernels::image(p, &self.arch)?;
        let ptx = match &img.cubin {
            Some(c) => Ptx::from_binary(c.clone()),
            None => Ptx::from_src(img.ptx.clone()),
        };
        let module = self
            .ctx
            .load_module(ptx)
            .map_err(|e| CudaError::driver(format!("load module {}", p.name()), e))?;
        let mut funcs = HashMap::new();
        for k in p.kernels() {
            let f = module
                .load_function(&k)
                .map_err(|e| CudaError::driver(format!("kernel {k}"), e))?;
            funcs.insert(k, f);
        }
        let l = Arc::new(Loaded { funcs });
        map.insert(p, l.clone());
        Ok(l)
    }

    fn function(&self, p: Program, kernel: &str) -> Result<CudaFunction, CudaError> {
        let l = self.program(p)?;
        l.funcs
            .get(kernel)
            .cloned()
            .ok_or_else(|| CudaError::Compile {
                program: p.name(),
                log: format!("kernel {kernel} missing from the program"),
            })
    }

    /// A device buffer holding `data`.
    pub fn upload<E: Element>(&self, data: &[E]) -> Result<CudaSlice<E>, CudaError> {
        match E::DTYPE {
            DType::F32 => self.upload_as::<E, f32>(data),
            DType::F16 => self.upload_as::<E, half::f16>(data),
            DType::Bf16 => self.upload_as::<E, half::bf16>(data),
        }
    }

    /// A device buffer of `n` zeros.
    pub fn zeros<E: Element>(&self, n: usize) -> Result<CudaSlice<E>, CudaError> {
        match E::DTYPE {
            DType::F32 => self.zeros_as::<E, f32>(n),
            DType::F16 => self.zeros_as::<E, half::f16>(n),
            DType::Bf16 => self.zeros_as::<E, half::bf16>(n),
        }
    }

    /// The contents of `buf` (waits for the stream).
    pub fn download<E: Element>(&self, buf: &CudaSlice<E>) -> Result<Vec<E>, CudaError> {
        let mut out = vec![E::default(); buf.len()];
        self.read(buf, &mut out)?;
        Ok(out)
    }

    fn upload_as<E: Element, T: DeviceRepr + ValidAsZeroBits + 'static>(
        &self,
        data: &[E],
    ) -> Result<CudaSlice<E>, CudaError> {
        let host: &[T] = same_slice(data).ok_or_else(type_confusion)?;
        let dev = if host.is_empty() {
            self.empty::<T>()?
        } else {
            self.stream
                .clone_htod(host)
                .map_err(|e| CudaError::driver("upload", e))?
        };
        same_owned(dev).ok_or_else(type_confusion)
    }

    fn zeros_as<E: Element, T: DeviceRepr + ValidAsZeroBits + 'static>(
        &self,
        n: usize,
    ) -> Result<CudaSlice<E>, CudaError> {
        let dev = if n == 0 {
            self.empty::<T>()?
        } else {
            self.stream
                .alloc_zeros::<T>(n)
                .map_err(|e| CudaError::driver("alloc", e))?
        };
        same_owned(dev).ok_or_else(type_confusion)
    }

    /// A buffer of no elements (tensors may be empty).
    fn empty<T: DeviceRepr + ValidAsZeroBits>(&self) -> Result<CudaSlice<T>, CudaError> {
        match self.stream.null::<T>() {
            Ok(s) => Ok(s),
            Err(_) => {
                // A driver that refuses zero-byte allocations: own one element, expose none.
                let one = self
                    .stream
                    .alloc_zeros::<T>(1)
                    .map_err(|e| CudaError::driver("alloc", e))?;
                let p = one.leak();
                // SAFETY: `p` is a live allocation of one T, now owned by the new slice
                // (which frees it on drop); it claims none of it.
                Ok(unsafe { self.stream.upgrade_device_ptr::<T>(p, 0) })
            }
        }
    }

    /// The single-tensor step kernel over one tensor (no table upload), launched
    /// asynchronously. With `count`, it also counts its non-finite stored parameters into the
    /// first counter of the scratch ([`read_counts`](Self::read_counts) reads it). An error is
    /// a failure before or of the launch: nothing changed. Returns whether the kernel was
    /// launched (the tensor is not empty).
    fn step1<P: Element, S: Element>(
        &mut self,
        t: TensorMut<'_, Self, P, S>,
        k: &Coeffs,
        count: bool,
    ) -> Result<bool, CudaError> {
        let TensorMut {
            param,
            grad,
            m,
            v,
            ibar,
        } = t;
        let n = param.len();
        same_lens(
            n,
            grad.len(),
            [&m, &v, &ibar].map(|s| s.as_ref().map(|s| s.len())),
        )?;
        if n == 0 {
            return Ok(false);
        }
        let blocks = plan::chunks_of(n as u64);
        if blocks > plan::MAX_CHUNKS as u64 {
            return Err(CudaError::TooLarge(format!(
                "{n} elements in one tensor ({blocks} chunks of {CHUNK})"
            )));
        }
        let name = format!("sage_step1_{}_{}", P::DTYPE, S::DTYPE);
        let f = self.function(step_program::<P, S>(), &name)?;
        let stream = self.stream.clone();
        let (p, _gp) = param.device_ptr_mut(&stream);
        let (g, _gg) = grad.device_ptr(&stream);
        let (pm, _gm) = write_ptr(m, &stream);
        let (pv, _gv) = write_ptr(v, &stream);
        let (pi, _gi) = write_ptr(ibar, &stream);
        let (karg, n64) = (KArg(*k), n as u64);
        let counter = if count { self.zeroed_counts(1)? } else { 0 };
        let mut b = stream.launch_builder(&f);
        b.arg(&karg)
            .arg(&p)
            .arg(&g)
            .arg(&pm)
            .arg(&pv)
            .arg(&pi)
            .arg(&n64)
            .arg(&counter);
        // SAFETY: live buffers of n elements; one block per chunk of the tensor; the counter
        // (when not null) is one zeroed u64 of the scratch. (Every argument is a plain value:
        // `launch` does nothing after cuLaunchKernel, so its error means not launched.)
        unsafe { b.launch(grid(blocks as u32, THREADS)) }
            .map_err(|e| CudaError::driver(format!("launch {name}"), e))?;
        Ok(true)
    }

    /// `n` zeroed counters in the scratch (zeroed on the stream, before the launch that adds
    /// to them): their device address.
    fn zeroed_counts(&mut self, n: usize) -> Result<u64, CudaError> {
        let stream = self.stream.clone();
        let buf = grow(&stream, &mut self.scratch.counts, n)?;
        stream
            .memset_zeros(&mut buf.slice_mut(0..n))
            .map_err(|e| CudaError::driver("zero the non-finite counters", e))?;
        Ok(raw(buf, &stream))
    }

    /// The first `n` counters after the step kernel that wrote them: one read-back, then the
    /// wait for the stream (the step's only synchronisation).
    fn read_counts(&mut self, n: usize) -> Result<Vec<u64>, CudaError> {
        #[cfg(test)]
        if std::mem::take(&mut self.scratch.fail_read_back) {
            return Err(CudaError::driver(
                "read back the non-finite counts (injected by a test)",
                cudarc::driver::DriverError(
                    cudarc::driver::sys::CUresult::CUDA_ERROR_ILLEGAL_ADDRESS,
                ),
            ));
        }
        let stream = self.stream.clone();
        let buf = grow(&stream, &mut self.scratch.counts, n)?;
        let mut host = vec![0u64; n];
        stream
            .memcpy_dtoh(&buf.slice(0..n), &mut host)
            .map_err(|e| CudaError::driver("read back the non-finite counts", e))?;
        stream
            .synchronize()
            .map_err(|e| CudaError::driver("run the step", e))?;
        Ok(host)
    }

    /// Copies `bytes` into the scratch metadata buffer (one host-to-device copy) and returns
    /// its device address.
    fn upload_meta(&mut self, bytes: &[u8]) -> Result<u64, CudaError> {
        let stream = self.stream.clone();
        let n = bytes.len();
        let meta = raw(grow(&stream, &mut self.scratch.meta, n)?, &stream);
        let i = self.scratch.next_staging;
        self.scratch.next_staging ^= 1;
        let slot = &mut self.scratch.staging[i];
        if slot.as_ref().is_none_or(|s| s.host.len() < n) {
            *slot = None; // waits for its last copy (Staging::drop)
            let len = n.max(4096).next_power_of_two();
            // SAFETY: page-locked bytes; every byte copied is written first, below.
            let host = unsafe { self.ctx.alloc_pinned::<u8>(len) }
                .map_err(|e| CudaError::driver("alloc page-locked staging", e))?;
            let copied = self
                .ctx
                .new_event(None)
                .map_err(|e| CudaError::driver("event", e))?;
            *slot = Some(Staging { host, copied });
        }
        let st = slot
            .as_mut()
            .ok_or_else(|| CudaError::TooLarge("internal: staging".into()))?;
        st.copied
            .synchronize()
            .map_err(|e| CudaError::driver("wait for the previous table copy", e))?;
        let host = st
            .host
            .as_mut_slice()
            .map_err(|e| CudaError::driver("staging", e))?;
        host[..n].copy_from_slice(bytes);
        // SAFETY: `meta` holds at least n bytes; `host` stays alive and unwritten until
        // `copied` (recorded right after) completes.
        unsafe { cudarc::driver::result::memcpy_htod_async(meta, &host[..n], stream.cu_stream()) }
            .map_err(|e| CudaError::driver("upload launch tables", e))?;
        st.copied
            .record(&stream)
            .map_err(|e| CudaError::driver("record table copy", e))?;
        Ok(meta)
    }

    /// The chunk partials of the `grad` buffers (of storage `e`) of `entries` on sage-core's
    /// norm grid, back to back in entry order, into the scratch `partials` buffer: one launch,
    /// one block per chunk. Returns the device addresses of the launch's tensor table and of
    /// the partials, and the number of partials; `None` when there are none (all empty).
    fn norm_partials(
        &mut self,
        e: DType,
        entries: &[TensorEntry],
    ) -> Result<Option<(u64, u64, usize)>, CudaError> {
        let packed = plan::pack_norm(entries)?;
        if packed.n_chunks == 0 {
            return Ok(None);
        }
        let name = format!("sage_norm_partials_{e}");
        let f = self.function(Program::SqNorm { e }, &name)?;
        let tensors = self.upload_meta(&packed.bytes)? + packed.tensors_at as u64;
        let stream = self.stream.clone();
        let partials = raw(
            grow(&stream, &mut self.scratch.partials, packed.n_chunks)?,
            &stream,
        );
        let count = entries.len() as u32;
        let mut b = stream.launch_builder(&f);
        b.arg(&tensors).arg(&count).arg(&partials);
        // SAFETY: the table describes live buffers of the lengths given, one block per
        // partial; the scratch holds a slot for each.
        unsafe { b.launch(grid(packed.n_chunks as u32, plan::NORM_THREADS)) }
            .map_err(|e| CudaError::driver(format!("launch {name}"), e))?;
        Ok(Some((tensors, partials, packed.n_chunks)))
    }

    /// Squared norms of the `grad` buffers (of storage `e`) of `entries`: the chunk partials in
    /// one launch, each entry's partials folded in chunk order by one thread in a second
    /// (`sage_core::norm::fold`, the same bits), one read-back of one value per entry.
    fn sq_norms(&mut self, e: DType, entries: &[TensorEntry]) -> Result<Vec<f64>, CudaError> {
        let n = entries.len();
        let Some((tensors, partials, _)) = self.norm_partials(e, entries)? else {
            return Ok(vec![0.0; n]);
        };
        let name = format!("sage_norm_fold_{e}");
        let f = self.function(Program::SqNorm { e }, &name)?;
        let stream = self.stream.clone();
        let out_buf = grow(&stream, &mut self.scratch.out, n)?;
        let out = raw(out_buf, &stream);
        let count = n as u32;
        let mut b = stream.launch_builder(&f);
        b.arg(&tensors).arg(&count).arg(&partials).arg(&out);
        let threads = plan::NORM_THREADS;
        // SAFETY: the table and partials the launch before wrote, on this stream; one output
        // slot per entry (the kernel strides over them).
        unsafe { b.launch(grid(count.div_ceil(threads), threads)) }
            .map_err(|e| CudaError::driver(format!("launch {name}"), e))?;
        let mut host = vec![0f64; n];
        stream
            .memcpy_dtoh(&out_buf.slice(0..n), &mut host)
            .map_err(|e| CudaError::driver("read back norms", e))?;
        stream
            .synchronize()
            .map_err(|e| CudaError::driver(format!("run {name}"), e))?;
        Ok(host)
    }

    /// The chunk partials of the `grad` buffers of `entries` (see [`norm_partials`]) copied to
    /// `out`, which must hold exactly their number.
    fn partials_to_host(
        &mut self,
        e: DType,
        entries: &[TensorEntry],
        out: &mut [f64],
    ) -> Result<(), CudaError> {
        let expected: u64 = entries.iter().map(|t| plan::norm_chunks_of(t.n)).sum();
        same_len("norm partials", expected as usize, out.len())?;
        let Some((_, _, n)) = self.norm_partials(e, entries)? else {
            return Ok(());
        };
        let stream = self.stream.clone();
        let partials = grow(&stream, &mut self.scratch.partials, n)?;
        stream
            .memcpy_dtoh(&partials.slice(0..n), out)
            .map_err(|e| CudaError::driver("read back norm partials", e))?;
        stream
            .synchronize()
            .map_err(|e| CudaError::driver("run sage_norm_partials", e))
    }

    /// Copies `buf` into `out` (same length) and waits for the copy.
    fn read_as<E: Element, T: DeviceRepr + 'static>(
        &self,
        buf: &CudaSlice<E>,
        out: &mut [E],
    ) -> Result<(), CudaError> {
        let typed: &CudaSlice<T> = (buf as &dyn Any)
            .downcast_ref()
            .ok_or_else(type_confusion)?;
        let host: &mut [T] = same_slice_mut(out).ok_or_else(type_confusion)?;
        self.stream
            .memcpy_dtoh(typed, host)
            .map_err(|e| CudaError::driver("download", e))?;
        self.synchronize()
    }

    /// Copies `data` into `buf` (same length), in place (a framework may hold the buffer's
    /// address), and waits for the copy.
    fn write_as<E: Element, T: DeviceRepr + 'static>(
        &self,
        buf: &mut CudaSlice<E>,
        data: &[E],
    ) -> Result<(), CudaError> {
        let typed: &mut CudaSlice<T> = (buf as &mut dyn Any)
            .downcast_mut()
            .ok_or_else(type_confusion)?;
        let host: &[T] = same_slice(data).ok_or_else(type_confusion)?;
        self.stream
            .memcpy_htod(host, typed)
            .map_err(|e| CudaError::driver("upload", e))?;
        self.synchronize()
    }

    /// Copies `buf` into `out`, which must have its length (waits for the stream).
    pub fn read<E: Element>(&self, buf: &CudaSlice<E>, out: &mut [E]) -> Result<(), CudaError> {
        same_len("host slice", buf.len(), out.len())?;
        if out.is_empty() {
            return Ok(());
        }
        match E::DTYPE {
            DType::F32 => self.read_as::<E, f32>(buf, out),
            DType::F16 => self.read_as::<E, half::f16>(buf, out),
            DType::Bf16 => self.read_as::<E, half::bf16>(buf, out),
        }
    }

    /// Copies `data` into `buf`, which must have its length, in place: the allocation (and
    /// any framework's handle to it) stays. Ordered after everything queued before; returns
    /// once the copy is done.
    pub fn write<E: Element>(&self, buf: &mut CudaSlice<E>, data: &[E]) -> Result<(), CudaError> {
        same_len("host slice", buf.len(), data.len())?;
        if data.is_empty() {
            return Ok(());
        }
        match E::DTYPE {
            DType::F32 => self.write_as::<E, f32>(buf, data),
            DType::F16 => self.write_as::<E, half::f16>(buf, data),
            DType::Bf16 => self.write_as::<E, half::bf16>(buf, data),
        }
    }
}

/// What is done after the launch that stepped all `tensors` tensors of a
/// [`step_tensors`](Backend::step_tensors) call: its failure is [`CudaError::Partial`] (every
/// tensor applied), never the plain error, which would say nothing was.
fn after_launch<T>(
    tensors: usize,
    then: impl FnOnce() -> Result<T, CudaError>,
) -> Result<T, CudaError> {
    then().map_err(|e| CudaError::partial(tensors, tensors, e))
}

fn type_confusion() -> CudaError {
    CudaError::TooLarge("internal: storage type does not match its DType".into())
}

/// `x` as a slice of `B`, when `A` is `B`.
fn same_slice<A: 'static, B: 'static>(x: &[A]) -> Option<&[B]> {
    if TypeId::of::<A>() == TypeId::of::<B>() {
        // SAFETY: A and B are the same type.
        Some(unsafe { std::slice::from_raw_parts(x.as_ptr().cast::<B>(), x.len()) })
    } else {
        None
    }
}

/// `x` as a mutable slice of `B`, when `A` is `B`.
fn same_slice_mut<A: 'static, B: 'static>(x: &mut [A]) -> Option<&mut [B]> {
    if TypeId::of::<A>() == TypeId::of::<B>() {
        // SAFETY: A and B are the same type.
        Some(unsafe { std::slice::from_raw_parts_mut(x.as_mut_ptr().cast::<B>(), x.len()) })
    } else {
        None
    }
}

/// `x` as a `B`, when `A` is `B`.
fn same_owned<A: 'static, B: 'static>(x: A) -> Option<B> {
    let b: Box<dyn Any> = Box::new(x);
    b.downcast::<B>().ok().map(|b| *b)
}

/// The scratch buffer in `slot`, reallocated (zeroed) when shorter than `n`.
fn grow<'s, T: DeviceRepr + ValidAsZeroBits>(
    stream: &Arc<CudaStream>,
    slot: &'s mut Option<CudaSlice<T>>,
    n: usize,
) -> Result<&'s mut CudaSlice<T>, CudaError> {
    if slot.as_ref().is_none_or(|s| s.len() < n) {
        *slot = None;
        let len = n.max(64).next_power_of_two();
        *slot = Some(
            stream
                .alloc_zeros::<T>(len)
                .map_err(|e| CudaError::driver("alloc scratch", e))?,
        );
    }
    slot.as_mut()
        .ok_or_else(|| CudaError::TooLarge("internal: scratch".into()))
}

/// The address of an optional buffer read on `stream` (0 when absent), with the guard that
/// orders other streams' later writes after this use.
fn read_ptr<'a, T>(
    s: Option<&'a CudaSlice<T>>,
    stream: &'a CudaStream,
) -> (u64, Option<SyncOnDrop<'a>>) {
    match s {
        Some(s) => {
            let (p, g) = s.device_ptr(stream);
            (p, Some(g))
        }
        None => (0, None),
    }
}

/// [`read_ptr`] for a buffer written on `stream`.
fn write_ptr<'a, T>(
    s: Option<&'a mut CudaSlice<T>>,
    stream: &'a CudaStream,
) -> (u64, Option<SyncOnDrop<'a>>) {
    match s {
        Some(s) => {
            let (p, g) = s.device_ptr_mut(stream);
            (p, Some(g))
        }
        None => (0, None),
    }
}

/// The device address of a scratch buffer used only on `stream`.
fn raw<T>(s: &CudaSlice<T>, stream: &CudaStream) -> u64 {
    s.device_ptr(stream).0
}

fn grid(blocks: u32, threads: u32) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (blocks, 1, 1),
        block_dim: (threads, 1, 1),
        shared_mem_bytes: 0,
    }
}

fn primitive_grid(n: u64) -> LaunchConfig {
    let blocks = n
        .div_ceil(PRIMITIVE_THREADS as u64)
        .min(PRIMITIVE_MAX_BLOCKS) as u32;
    grid(blocks.max(1), PRIMITIVE_THREADS)
}

fn same_len(what: &'static str, expected: usize, got: usize) -> Result<(), CudaError> {
    if expected == got {
        Ok(())
    } else {
        Err(CudaError::LengthMismatch {
            what,
            expected,
            got,
        })
    }
}

/// Checks that the gradient and every present state buffer have the parameter's `n` elements.
fn same_lens(n: usize, grad: usize, state: [Option<usize>; 3]) -> Result<(), CudaError> {
    same_len("grad", n, grad)?;
    for (what, len) in ["m", "v", "ibar"].into_iter().zip(state) {
        if let Some(len) = len {
            same_len(what, n, len)?;
        }
    }
    Ok(())
}

fn acc_code(which: Accumulate) -> i32 {
    // SAGE_ACC_* in sage_step.h
    match which {
        Accumulate::Moment => 0,
        Accumulate::SecondMoment => 1,
        Accumulate::InfNorm => 2,
        Accumulate::Sensitivity => 3,
    }
}

fn step_program<P: Element, S: Element>() -> Program {
    Program::Step {
        p: P::DTYPE,
        s: S::DTYPE,
    }
}

/// The norm-launch entries of the tensors' gradients, with the guards that order other
/// streams' later writes after the launch reads them.
fn grad_entries<'s, P: Element, S: Element>(
    tensors: &'s [ParamTensor<'_, Cuda, P, S>],
    stream: &'s CudaStream,
) -> (Vec<TensorEntry>, Vec<SyncOnDrop<'s>>) {
    tensors
        .iter()
        .map(|t| {
            let g = t.grad();
            let (grad, guard) = g.device_ptr(stream);
            let e = TensorEntry {
                grad,
                n: g.len() as u64,
                ..TensorEntry::default()
            };
            (e, guard)
        })
        .unzip()
}

impl Backend for Cuda {
    type Error = CudaError;
    type Buf<E: Element> = CudaSlice<E>;

    fn len<E: Element>(&self, buf: &CudaSlice<E>) -> usize {
        buf.len()
    }

    fn sq_norm_chunks<E: Element>(
        &mut self,
        buf: &CudaSlice<E>,
        first: usize,
        out: &mut [f64],
    ) -> Result<(), CudaError> {
        let chunks = norm::chunk_count(buf.len());
        let end = first.saturating_add(out.len());
        if end > chunks {
            return Err(CudaError::LengthMismatch {
                what: "norm chunks (first + count)",
                expected: chunks,
                got: end,
            });
        }
        if out.is_empty() {
            return Ok(());
        }
        // The range as a buffer of its own: a partial depends on its chunk's contents only.
        let start = first * norm::NORM_CHUNK;
        let stream = self.stream.clone();
        let (grad, _g) = buf.device_ptr(&stream);
        let e = TensorEntry {
            grad: grad + (start * E::DTYPE.size()) as u64,
            n: (buf.len() - start).min(out.len() * norm::NORM_CHUNK) as u64,
            ..TensorEntry::default()
        };
        self.partials_to_host(E::DTYPE, &[e], out)
    }

    /// One launch for the partials and one for their fold, whatever the length (the provided
    /// method would read the partials back 32 at a time); the same bits.
    fn sq_norm<E: Element>(&mut self, buf: &CudaSlice<E>) -> Result<f64, CudaError> {
        let stream = self.stream.clone();
        let (grad, _g) = buf.device_ptr(&stream);
        let e = TensorEntry {
            grad,
            n: buf.len() as u64,
            ..TensorEntry::default()
        };
        Ok(self.sq_norms(E::DTYPE, &[e])?[0])
    }

    fn accumulate<P: Element, S: Element>(
        &mut self,
        which: Accumulate,
        acc: &mut CudaSlice<S>,
        param: &CudaSlice<P>,
        grad: &CudaSlice<P>,
        k: &Coeffs,
    ) -> Result<(), CudaError> {
        let n = param.len();
        same_len("grad", n, grad.len())?;
        same_len("state", n, acc.len())?;
        if n == 0 {
            return Ok(());
        }
        let name = format!("sage_accumulate_{}_{}", P::DTYPE, S::DTYPE);
        let f = self.function(step_program::<P, S>(), &name)?;
        let stream = self.stream.clone();
        let (a, _ga) = acc.device_ptr_mut(&stream);
        let (p, _gp) = param.device_ptr(&stream);
        let (g, _gg) = grad.device_ptr(&stream);
        let (karg, code, n64) = (KArg(*k), acc_code(which), n as u64);
        let mut b = stream.launch_builder(&f);
        b.arg(&karg).arg(&code).arg(&a).arg(&p).arg(&g).arg(&n64);
        // SAFETY: three live buffers of n elements of the kernel's storage types.
        unsafe { b.launch(primitive_grid(n64)) }
            .map_err(|e| CudaError::driver(format!("launch {name}"), e))?;
        Ok(())
    }

    fn apply<P: Element, S: Element>(
        &mut self,
        t: ApplyArgs<'_, Self, P, S>,
        k: &Coeffs,
    ) -> Result<(), CudaError> {
        let ApplyArgs {
            param,
            grad,
            m,
            v,
            ibar,
        } = t;
        let n = param.len();
        same_lens(
            n,
            grad.len(),
            [&m, &v, &ibar].map(|s| s.as_ref().map(|s| s.len())),
        )?;
        if n == 0 {
            return Ok(());
        }
        let name = format!("sage_apply_{}_{}", P::DTYPE, S::DTYPE);
        let f = self.function(step_program::<P, S>(), &name)?;
        let stream = self.stream.clone();
        let (p, _gp) = param.device_ptr_mut(&stream);
        let (g, _gg) = grad.device_ptr(&stream);
        let (pm, _gm) = read_ptr(m, &stream);
        let (pv, _gv) = read_ptr(v, &stream);
        let (pi, _gi) = read_ptr(ibar, &stream);
        let (karg, n64) = (KArg(*k), n as u64);
        let mut b = stream.launch_builder(&f);
        b.arg(&karg)
            .arg(&p)
            .arg(&g)
            .arg(&pm)
            .arg(&pv)
            .arg(&pi)
            .arg(&n64);
        // SAFETY: live buffers of n elements (absent state as null, which the kernel skips).
        unsafe { b.launch(primitive_grid(n64)) }
            .map_err(|e| CudaError::driver(format!("launch {name}"), e))?;
        Ok(())
    }

    fn fused_step<P: Element, S: Element>(
        &mut self,
        t: TensorMut<'_, Self, P, S>,
        k: &Coeffs,
    ) -> Result<(), CudaError> {
        // No count wanted here: the launch stays asynchronous, and it is the only thing done
        // after the checks, so an error means nothing changed (no partial step to report).
        self.step1(t, k, false).map(|_| ())
    }

    /// Every tensor's chunk partials in one launch, each tensor's fold by one thread in a
    /// second, one read-back of one value per tensor.
    fn grad_sq_norms<P: Element, S: Element>(
        &mut self,
        tensors: &mut [ParamTensor<'_, Self, P, S>],
    ) -> Result<(), CudaError> {
        if tensors.is_empty() {
            return Ok(());
        }
        let stream = self.stream.clone();
        let norms = {
            let (entries, _guards) = grad_entries(tensors, &stream);
            self.sq_norms(P::DTYPE, &entries)?
        };
        for (t, x) in tensors.iter_mut().zip(norms) {
            t.set_grad_sq_norm(x);
        }
        Ok(())
    }

    /// Every tensor's chunk partials in one launch and one read-back.
    fn grad_norm_partials<P: Element, S: Element>(
        &mut self,
        tensors: &[ParamTensor<'_, Self, P, S>],
        out: &mut [f64],
    ) -> Result<(), CudaError> {
        let stream = self.stream.clone();
        let (entries, _guards) = grad_entries(tensors, &stream);
        self.partials_to_host(P::DTYPE, &entries, out)
    }

    /// One launch for every tensor (one non-empty tensor: the single-tensor kernel), then one
    /// read-back of the tensors' counts of non-finite stored parameters, which waits for the
    /// step. A failure before the launch or of the launch is the plain error: nothing changed.
    /// A failure after it (the read-back, the wait) is [`CudaError::Partial`] with every tensor
    /// of the call applied (the kernel was queued; if it faulted, they may have been), so the
    /// optimizer counts the step as made and does not invite a retry that would step twice.
    fn step_tensors<P: Element, S: Element>(
        &mut self,
        tensors: &mut [ParamTensor<'_, Self, P, S>],
    ) -> Result<(), CudaError> {
        // Every tensor's non-finite stored parameters are counted by the step kernel (an
        // empty tensor has none) and read back once the step has run.
        // One non-empty tensor: the single-tensor kernel needs no table upload.
        let mut live = tensors.iter().filter(|t| !t.param().is_empty());
        if let (Some(_), None) = (live.next(), live.next()) {
            let at = tensors
                .iter()
                .position(|t| !t.param().is_empty())
                .unwrap_or(0);
            let k = *tensors[at].coeffs();
            let bad = if self.step1(tensors[at].view(), &k, true)? {
                // Launched: the tensor is stepped whatever happens next (the others are
                // empty: nothing to step).
                let all = tensors.len();
                after_launch(all, || self.read_counts(1))?[0]
            } else {
                0
            };
            for (i, t) in tensors.iter_mut().enumerate() {
                t.set_non_finite(if i == at { bad } else { 0 });
            }
            return Ok(());
        }
        let stream = self.stream.clone();
        let mut guards = Vec::with_capacity(tensors.len() * 5);
        let mut entries = Vec::with_capacity(tensors.len());
        for t in tensors.iter_mut() {
            let k = *t.coeffs();
            let TensorMut {
                param,
                grad,
                m,
                v,
                ibar,
            } = t.view();
            let n = param.len();
            same_lens(
                n,
                grad.len(),
                [&m, &v, &ibar].map(|s| s.as_ref().map(|s| s.len())),
            )?;
            let mut e = TensorEntry {
                n: n as u64,
                ..TensorEntry::default()
            };
            let (p, g) = param.device_ptr_mut(&stream);
            e.param = p;
            guards.push(g);
            let (p, g) = grad.device_ptr(&stream);
            e.grad = p;
            guards.push(g);
            for (slot, s) in [(&mut e.m, m), (&mut e.v, v), (&mut e.ibar, ibar)] {
                let (p, g) = write_ptr(s, &stream);
                *slot = p;
                guards.extend(g);
            }
            entries.push((e, k));
        }
        let packed = plan::pack(&entries)?;
        if packed.n_chunks == 0 {
            drop(guards);
            for t in tensors.iter_mut() {
                t.set_non_finite(0);
            }
            return Ok(());
        }
        let name = format!("sage_mt_step_{}_{}", P::DTYPE, S::DTYPE);
        let f = self.function(step_program::<P, S>(), &name)?;
        let meta = self.upload_meta(&packed.bytes)?;
        let coeffs = meta + packed.coeffs_at as u64;
        let tables = meta + packed.tensors_at as u64;
        let chunks = meta + packed.chunks_at as u64;
        let n = entries.len();
        let counts = self.zeroed_counts(n)?;
        let mut b = stream.launch_builder(&f);
        b.arg(&coeffs).arg(&tables).arg(&chunks).arg(&counts);
        // SAFETY: the tables describe live buffers of the lengths checked above; `counts`
        // holds one zeroed u64 per tensor of the table.
        unsafe { b.launch(grid(packed.n_chunks as u32, THREADS)) }
            .map_err(|e| CudaError::driver(format!("launch {name}"), e))?;
        drop(guards);
        // Launched (one launch for every tensor): every tensor is stepped whatever happens next.
        let bad = after_launch(n, || self.read_counts(n))?;
        for (t, bad) in tensors.iter_mut().zip(bad) {
            t.set_non_finite(bad);
        }
        Ok(())
    }
}

/// Host copies for checkpoints, the conformance suite and anything else generic over
/// [`HostBuffers`]: owned buffers are cudarc's `CudaSlice`s, every copy waits for the stream.
impl HostBuffers for Cuda {
    type Owned<E: Element> = CudaSlice<E>;

    /// `cuda:N (device name)`.
    fn describe(&self, out: &mut dyn fmt::Write) -> fmt::Result {
        out.write_str(&self.name)
    }

    /// Every storage type: f16 and bf16 are converted with PTX instructions and bit
    /// arithmetic that every supported GPU has.
    fn supports(&self, d: DType) -> bool {
        let _ = d;
        true
    }

    fn upload<E: Element>(&mut self, data: &[E]) -> Result<CudaSlice<E>, CudaError> {
        Cuda::upload(self, data)
    }

    fn copy_to_host<E: Element>(
        &mut self,
        buf: &CudaSlice<E>,
        out: &mut [E],
    ) -> Result<(), CudaError> {
        self.read(buf, out)
    }

    fn copy_from_host<E: Element>(
        &mut self,
        buf: &mut CudaSlice<E>,
        data: &[E],
    ) -> Result<(), CudaError> {
        self.write(buf, data)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sage_core::{BackendError, ErrorKind};

    #[test]
    fn no_driver_means_not_available_not_a_crash() {
        if driver_present() {
            // A machine with a driver: whatever it answers, it answers without panicking.
            let _ = Cuda::device_count();
            return;
        }
        let e = Cuda::device_count().unwrap_err();
        assert_eq!(e.kind(), ErrorKind::NotAvailable);
        let e = Cuda::new(0).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::NotAvailable);
        assert!(e.to_string().contains("libcuda"), "{e}");
    }

    #[test]
    fn same_type_casts_only_between_equal_types() {
        let x = [1.0f32, 2.0];
        assert_eq!(same_slice::<f32, f32>(&x), Some(&x[..]));
        assert!(same_slice::<f32, half::f16>(&x).is_none());
        let mut y = [1.0f32, 2.0];
        assert_eq!(same_slice_mut::<f32, f32>(&mut y).map(|s| s.len()), Some(2));
        assert!(same_slice_mut::<f32, half::bf16>(&mut y).is_none());
        assert_eq!(same_owned::<Vec<f32>, Vec<f32>>(vec![3.0]), Some(vec![3.0]));
        assert!(same_owned::<Vec<f32>, Vec<half::bf16>>(vec![3.0]).is_none());
    }

    #[test]
    fn accumulate_codes_match_the_kernel_body() {
        let body = sage_core::gpu::KERNEL_BODY;
        for (which, name) in [
            (Accumulate::Moment, "SAGE_ACC_MOMENT"),
            (Accumulate::SecondMoment, "SAGE_ACC_SECOND_MOMENT"),
            (Accumulate::InfNorm, "SAGE_ACC_INF_NORM"),
            (Accumulate::Sensitivity, "SAGE_ACC_SENSITIVITY"),
        ] {
            let def = format!("#define {name} {}\n", acc_code(which));
            assert!(body.contains(&def), "{def}");
        }
    }

    /// Whatever fails after a step's launch, the step says every tensor was applied; what
    /// succeeds passes through.
    #[test]
    fn failures_after_the_launch_apply_every_tensor() {
        let failed = after_launch::<Vec<u64>>(4, || Err(CudaError::TooLarge("x".into())));
        let e = failed.unwrap_err();
        assert_eq!(e.applied_tensors(), Some(4), "{e}");
        assert!(
            matches!(&e, CudaError::Partial { applied: 4, tensors: 4, cause }
                if matches!(**cause, CudaError::TooLarge(_))),
            "{e:?}"
        );
        assert_eq!(e.kind(), ErrorKind::TooLarge);
        assert_eq!(after_launch(4, || Ok(vec![1u64, 2])).unwrap(), vec![1, 2]);
    }

    /// On a GPU (skipped without one): a read-back failing after the step's launch (injected)
    /// reaches the optimizer as `PartialStep` with every tensor applied and counted, on the
    /// multi-tensor path and the single-tensor one, and the tensors were in fact stepped.
    #[test]
    fn a_failed_read_back_is_a_partial_step_on_a_gpu() {
        use sage_core::{Algorithm, Config, Optimizer, ParamGroup, TensorState};
        let required = std::env::var("SAGE_REQUIRE_CUDA").is_ok_and(|v| v == "1");
        let gpu = match Cuda::new(0) {
            Ok(g) => g,
            // Skipped without a GPU, unless the GPU check asks for one.
            Err(e) if e.kind() == ErrorKind::NotAvailable && !required => {
                eprintln!("skipped: {e}");
                return;
            }
            Err(e) => panic!("opening CUDA device 0 failed: {e}"),
        };
        let cfg = Config::reference(Algorithm::adamw(), 1e-2);
        for lens in [vec![3usize, 0, 5000, 7], vec![0, 9, 0]] {
            let mut ps: Vec<CudaSlice<f32>> = lens
                .iter()
                .map(|&n| gpu.upload(&vec![1.0f32; n]).unwrap())
                .collect();
            let gs: Vec<CudaSlice<f32>> = lens
                .iter()
                .map(|&n| gpu.upload(&vec![0.5f32; n]).unwrap())
                .collect();
            let mut st: Vec<TensorState<CudaSlice<f32>>> = lens
                .iter()
                .map(|&n| TensorState::try_new(cfg.state_layout(true), |_| gpu.zeros(n)).unwrap())
                .collect();
            let mut backend = gpu.clone();
            backend.scratch.fail_read_back = true;
            let mut opt = Optimizer::new(backend, cfg, [ParamGroup::sage()]).unwrap();
            let mut ts: Vec<ParamTensor<'_, Cuda, f32, f32>> = ps
                .iter_mut()
                .zip(&gs)
                .zip(&mut st)
                .map(|((p, g), s)| ParamTensor::new(p, g, s.view()))
                .collect();
            let e = opt.step(&mut ts).unwrap_err();
            drop(ts);
            let sage_core::Error::PartialStep {
                applied, tensors, ..
            } = e
            else {
                panic!("{lens:?}: expected a partial step, got {e}")
            };
            assert_eq!((applied, tensors), (lens.len(), lens.len()), "{lens:?}");
            gpu.synchronize().unwrap();
            for (i, s) in st.iter().enumerate() {
                assert_eq!(s.step, 1, "{lens:?}: tensor {i}");
                let m = gpu.download(s.m.as_ref().unwrap()).unwrap();
                assert!(
                    m.iter().all(|&x| x != 0.0),
                    "{lens:?}: tensor {i} not stepped"
                );
            }
        }
    }

    #[test]
    fn primitive_grids_cover_and_cap() {
        assert_eq!(primitive_grid(1).grid_dim.0, 1);
        assert_eq!(primitive_grid(257).grid_dim.0, 2);
        assert_eq!(primitive_grid(u32::MAX as u64 * 4).grid_dim.0, 1 << 16);
    }
}
