//! # sage-cuda
//!
//! SAGE ([`sage_core`]) on NVIDIA GPUs: one fused pass per step (every buffer read once and
//! written once), many tensors per launch, the gradient norms of all tensors in one launch.
//!
//! The CUDA layer is [`cudarc`]: the driver API and NVRTC are loaded at run time (the default
//! feature, `dynamic-loading`), so this crate builds with no CUDA toolkit and a program that
//! uses it starts on a machine with no driver ([`Cuda::new`] then returns a `NotAvailable`
//! error). The `dynamic-linking` feature links them at build time instead, as candle's CUDA
//! backend has cudarc do: a build that has both must use this one (one cudarc serves both).
//! Its buffers are cudarc's [`CudaSlice`], the type candle and burn hold their tensors in, so
//! a framework's parameters are stepped in place: [`Backend::Buf<E>`](sage_core::Backend::Buf)
//! is `CudaSlice<E>`.
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

mod backend;
mod memory;
mod norm_pass;
mod step;

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

use memory::*;
use norm_pass::*;
use step::*;

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
