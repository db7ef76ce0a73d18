//! Kernel programs: the CUDA source (a prelude, the body shared with OpenCL, the entry
//! kernels), one program per storage combination, and their NVRTC compile, cached once per
//! process.
//!
//! NVRTC is loaded at run time like the driver. Without it the backend can still run from a
//! prebuilt image: set `SAGE_CUDA_PTX_DIR` to a directory of `<program>.ptx` files written by
//! [`write_ptx_dir`] (the `sage-cuda-bench --emit-ptx DIR` command).

use std::collections::HashMap;
use std::ffi::{c_char, CStr, CString};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};

use cudarc::nvrtc::sys as nvrtc;
use sage_core::DType;

use crate::error::CudaError;

/// The CUDA prelude: defines what the shared body needs.
pub const PRELUDE: &str = include_str!("../kernels/prelude.cuh");
/// The entry kernels (templates and the instantiation macros).
pub const ENTRY: &str = include_str!("../kernels/entry.cu");

/// NVRTC options of every program. `--fmad=false`: no contraction of `a*b + c` into an FMA,
/// so the f32 results match the CPU formula exactly (the step is memory-bound: FMA would buy
/// no speed). IEEE division and square root, denormals kept: also as on the CPU.
pub const OPTIONS: [&str; 4] = [
    "--fmad=false",
    "--prec-div=true",
    "--prec-sqrt=true",
    "--ftz=false",
];

/// Environment variable naming a directory of prebuilt `<program>.ptx` files, used when NVRTC
/// is not installed.
pub const PTX_DIR_ENV: &str = "SAGE_CUDA_PTX_DIR";

/// Every storage type a buffer may hold.
pub const DTYPES: [DType; 3] = [DType::F32, DType::F16, DType::Bf16];

/// One NVRTC program: the step kernels of one parameter/state storage combination, or the
/// squared-norm kernels of one storage type.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Program {
    /// `sage_{mt_step,step1,accumulate,apply}_<P>_<S>`.
    Step {
        /// Parameter and gradient storage.
        p: DType,
        /// State storage.
        s: DType,
    },
    /// `sage_norm_partials_<E>` (chunk partials on sage-core's norm grid) and
    /// `sage_norm_fold_<E>` (each tensor's partials added in chunk order).
    SqNorm {
        /// Buffer storage.
        e: DType,
    },
}

fn tag(d: DType) -> &'static str {
    match d {
        DType::F32 => "sage_tf32",
        DType::F16 => "sage_tf16",
        DType::Bf16 => "sage_tbf16",
    }
}

impl Program {
    /// Every program: 9 step combinations and 3 norms.
    pub fn all() -> Vec<Program> {
        let mut v = Vec::new();
        for p in DTYPES {
            for s in DTYPES {
                v.push(Program::Step { p, s });
            }
        }
        v.extend(DTYPES.iter().map(|&e| Program::SqNorm { e }));
        v
    }

    /// A file-name-safe name: `step_f32_bf16`, `sqnorm_f16`.
    pub fn name(&self) -> String {
        match self {
            Program::Step { p, s } => format!("step_{p}_{s}"),
            Program::SqNorm { e } => format!("sqnorm_{e}"),
        }
    }

    /// The `extern "C"` kernels this program defines.
    pub fn kernels(&self) -> Vec<String> {
        match self {
            Program::Step { p, s } => ["mt_step", "step1", "accumulate", "apply"]
                .iter()
                .map(|k| format!("sage_{k}_{p}_{s}"))
                .collect(),
            Program::SqNorm { e } => ["norm_partials", "norm_fold"]
                .iter()
                .map(|k| format!("sage_{k}_{e}"))
                .collect(),
        }
    }

    /// The complete CUDA source of this program.
    pub fn source(&self) -> String {
        let inst = match self {
            Program::Step { p, s } => format!("SAGE_ENTRIES({p}, {}, {s}, {})\n", tag(*p), tag(*s)),
            Program::SqNorm { e } => format!("SAGE_NORM_ENTRY({e}, {})\n", tag(*e)),
        };
        format!(
            "{PRELUDE}\n{}\n{ENTRY}\n{inst}",
            sage_core::gpu::KERNEL_BODY
        )
    }
}

/// A compiled program: PTX text, and the CUBIN when compiled for a real architecture (`sm_XY`).
#[derive(Clone, Debug)]
pub struct Image {
    /// PTX (empty when NVRTC produced only a CUBIN).
    pub ptx: String,
    /// CUBIN for `sm_XY` targets.
    pub cubin: Option<Vec<u8>>,
}

/// Whether the NVRTC library can be loaded (searched by cudarc's names: `libnvrtc.so`,
/// `libnvrtc.so.13`, ... on the loader's path).
pub fn nvrtc_available() -> bool {
    // SAFETY: only tries to dlopen the library by name and closes it.
    unsafe { nvrtc::is_culib_present() }
}

/// NVRTC's version `(major, minor)`, or `NotAvailable`.
pub fn nvrtc_version() -> Result<(i32, i32), CudaError> {
    require_nvrtc()?;
    let (mut major, mut minor) = (0, 0);
    // SAFETY: two out-pointers to live locals.
    let r = unsafe { nvrtc::nvrtcVersion(&mut major, &mut minor) };
    check(r, "nvrtcVersion", "version")?;
    Ok((major, minor))
}

fn require_nvrtc() -> Result<(), CudaError> {
    if nvrtc_available() {
        Ok(())
    } else {
        Err(CudaError::NotAvailable(
            "NVRTC (libnvrtc.so) not found on the loader path: install it (e.g. `pip install \
             nvidia-cuda-nvrtc`, then add its lib/ to LD_LIBRARY_PATH) or set SAGE_CUDA_PTX_DIR \
             to prebuilt PTX"
                .into(),
        ))
    }
}

fn error_text(r: nvrtc::nvrtcResult) -> String {
    // SAFETY: NVRTC returns a static NUL-terminated string (or null).
    let p = unsafe { nvrtc::nvrtcGetErrorString(r) };
    if p.is_null() {
        format!("{r:?}")
    } else {
        unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned()
    }
}

fn check(r: nvrtc::nvrtcResult, call: &str, program: &str) -> Result<(), CudaError> {
    if r == nvrtc::nvrtcResult::NVRTC_SUCCESS {
        Ok(())
    } else {
        Err(CudaError::Compile {
            program: program.into(),
            log: format!("{call}: {}", error_text(r)),
        })
    }
}

/// Destroys the program on every exit path.
struct Prog(nvrtc::nvrtcProgram);

impl Drop for Prog {
    fn drop(&mut self) {
        // SAFETY: created by nvrtcCreateProgram, destroyed once. A failure leaks it, no more.
        unsafe {
            let _ = nvrtc::nvrtcDestroyProgram(&mut self.0);
        }
    }
}

fn read_bytes(
    prog: &Prog,
    what: &str,
    size: unsafe fn(nvrtc::nvrtcProgram, *mut usize) -> nvrtc::nvrtcResult,
    get: unsafe fn(nvrtc::nvrtcProgram, *mut c_char) -> nvrtc::nvrtcResult,
    name: &str,
) -> Result<Vec<u8>, CudaError> {
    let mut n = 0usize;
    // SAFETY: a live program; the buffer has the size NVRTC asked for.
    check(unsafe { size(prog.0, &mut n) }, what, name)?;
    let mut buf = vec![0u8; n];
    if n > 0 {
        check(unsafe { get(prog.0, buf.as_mut_ptr().cast()) }, what, name)?;
    }
    Ok(buf)
}

fn text(mut bytes: Vec<u8>) -> String {
    while bytes.last() == Some(&0) {
        bytes.pop();
    }
    String::from_utf8_lossy(&bytes).into_owned()
}

/// Compiles `program` with NVRTC for `arch` (`compute_90` gives PTX, `sm_90` a CUBIN too).
/// A compile error returns NVRTC's log.
pub fn compile(program: Program, arch: &str) -> Result<Image, CudaError> {
    require_nvrtc()?;
    let name = program.name();
    let label = format!("{name} ({arch})");
    let src = CString::new(program.source()).map_err(|_| CudaError::Compile {
        program: label.clone(),
        log: "source holds a NUL byte".into(),
    })?;
    let file = CString::new(format!("{name}.cu")).unwrap_or_default();
    let mut raw: nvrtc::nvrtcProgram = std::ptr::null_mut();
    // SAFETY: NUL-terminated strings that outlive the call; no headers.
    let r = unsafe {
        nvrtc::nvrtcCreateProgram(
            &mut raw,
            src.as_ptr(),
            file.as_ptr(),
            0,
            std::ptr::null(),
            std::ptr::null(),
        )
    };
    check(r, "nvrtcCreateProgram", &label)?;
    let prog = Prog(raw);
    let mut opts: Vec<CString> = OPTIONS
        .iter()
        .filter_map(|o| CString::new(*o).ok())
        .collect();
    opts.extend(CString::new(format!("--gpu-architecture={arch}")).ok());
    let ptrs: Vec<*const c_char> = opts.iter().map(|o| o.as_ptr()).collect();
    // SAFETY: `ptrs` points into `opts`, alive for the call.
    let r = unsafe { nvrtc::nvrtcCompileProgram(prog.0, ptrs.len() as i32, ptrs.as_ptr()) };
    if r != nvrtc::nvrtcResult::NVRTC_SUCCESS {
        let log = read_bytes(
            &prog,
            "nvrtcGetProgramLog",
            nvrtc::nvrtcGetProgramLogSize,
            nvrtc::nvrtcGetProgramLog,
            &label,
        )
        .map(text)
        .unwrap_or_default();
        return Err(CudaError::Compile {
            program: label,
            log: format!("{}\n{log}", error_text(r)),
        });
    }
    let ptx = if arch.starts_with("compute_") {
        text(read_bytes(
            &prog,
            "nvrtcGetPTX",
            nvrtc::nvrtcGetPTXSize,
            nvrtc::nvrtcGetPTX,
            &label,
        )?)
    } else {
        String::new()
    };
    let cubin = if arch.starts_with("sm_") {
        Some(read_bytes(
            &prog,
            "nvrtcGetCUBIN",
            nvrtc::nvrtcGetCUBINSize,
            nvrtc::nvrtcGetCUBIN,
            &label,
        )?)
    } else {
        None
    };
    Ok(Image { ptx, cubin })
}

type Cache = Mutex<HashMap<(Program, String), Arc<Image>>>;

fn cache() -> &'static Cache {
    static CACHE: OnceLock<Cache> = OnceLock::new();
    CACHE.get_or_init(|| Mutex::new(HashMap::new()))
}

/// The image of `program` for `arch`: compiled on first use in this process, then cached.
/// With `SAGE_CUDA_PTX_DIR` set, `<dir>/<program>.ptx` is used instead of NVRTC.
pub fn image(program: Program, arch: &str) -> Result<Arc<Image>, CudaError> {
    let key = (program, arch.to_string());
    if let Some(img) = cache().lock().unwrap_or_else(|e| e.into_inner()).get(&key) {
        return Ok(img.clone());
    }
    let img = match std::env::var_os(PTX_DIR_ENV) {
        Some(dir) => {
            let path = Path::new(&dir).join(format!("{}.ptx", program.name()));
            let ptx = std::fs::read_to_string(&path).map_err(|e| {
                CudaError::NotAvailable(format!(
                    "{PTX_DIR_ENV}: cannot read {}: {e}",
                    path.display()
                ))
            })?;
            Image { ptx, cubin: None }
        }
        None => compile(program, arch)?,
    };
    let img = Arc::new(img);
    cache()
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .insert(key, img.clone());
    Ok(img)
}

/// Compiles every program for `arch` (a `compute_XY` target) and writes `<program>.ptx` files
/// into `dir`, for machines without NVRTC (`SAGE_CUDA_PTX_DIR`). Returns the files written.
pub fn write_ptx_dir(dir: &Path, arch: &str) -> Result<Vec<PathBuf>, CudaError> {
    std::fs::create_dir_all(dir)
        .map_err(|e| CudaError::NotAvailable(format!("cannot create {}: {e}", dir.display())))?;
    let mut out = Vec::new();
    for p in Program::all() {
        let img = compile(p, arch)?;
        let path = dir.join(format!("{}.ptx", p.name()));
        std::fs::write(&path, img.ptx.as_bytes()).map_err(|e| {
            CudaError::NotAvailable(format!("cannot write {}: {e}", path.display()))
        })?;
        out.push(path);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_program_instantiates_its_kernels() {
        let all = Program::all();
        assert_eq!(all.len(), 12);
        for p in all {
            let src = p.source();
            assert!(src.contains("#define SAGE_FN"), "prelude first");
            assert!(
                src.contains("sage_apply(const sage_coeffs k"),
                "shared body"
            );
            let last = src.lines().last().unwrap_or_default();
            assert!(last.starts_with("SAGE_"), "{last}");
            for k in p.kernels() {
                // The macro builds the name from its first arguments.
                let stem = k.trim_start_matches("sage_");
                assert!(stem.ends_with(&match p {
                    Program::Step { p, s } => format!("{p}_{s}"),
                    Program::SqNorm { e } => e.to_string(),
                }));
            }
        }
    }

    /// The kernel source's grid constants are the host's (plan.rs) and sage-core's.
    #[test]
    fn norm_grid_constants_agree() {
        for (def, v) in [
            ("#define SAGE_NORM_CHUNK", crate::plan::NORM_CHUNK),
            (
                "#define SAGE_NORM_THREADS",
                crate::plan::NORM_THREADS as usize,
            ),
            ("#define SAGE_CHUNK", crate::plan::CHUNK),
            ("#define SAGE_THREADS", crate::plan::THREADS as usize),
        ] {
            let line = ENTRY
                .lines()
                .find(|l| l.starts_with(&format!("{def} ")))
                .unwrap_or_else(|| panic!("{def} missing"));
            let n: usize = line[def.len()..]
                .trim()
                .trim_end_matches('u')
                .parse()
                .unwrap();
            assert_eq!(n, v, "{line}");
        }
        assert_eq!(crate::plan::NORM_CHUNK, sage_core::norm::NORM_CHUNK);
    }

    #[test]
    fn program_names_are_distinct() {
        let mut names: Vec<String> = Program::all().iter().map(|p| p.name()).collect();
        names.sort();
        names.dedup();
        assert_eq!(names.len(), 12);
    }
}
