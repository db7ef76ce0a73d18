//! Kernel programs: the CUDA source (a prelude, the body shared with OpenCL, the entry
//! kernels), one program per storage combination, and their NVRTC compile, cached once per
//! process.
//!
//! NVRTC is loaded at run time like the driver. Without it the backend can still run from a
//! prebuilt image: set `SAGE_CUDA_PTX_DIR` to a directory of `<program>.ptx` files written by
//! [`write_ptx_dir`] (the `sage-cuda-bench --emit-ptx DIR` command). Each file's first line
//! records what it was built from — a hash of the program's complete source and compile
//! options ([`source_key`]) and the target architecture — and a file that does not match
//! this build's source, or targets a newer architecture than the device, is never loaded
//! ([`cached_ptx`]): NVRTC compiles the program instead where it is installed, else the
//! backend reports the stale file.

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

/// How every cached PTX file begins: this tag, then `program=<name> source=<key>
/// arch=<compute_XY>` ([`ptx_file`]). A PTX comment, so the file stays valid PTX.
pub const PTX_HEADER: &str = "// sage-cuda ptx cache v1";

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

/// What decides a program's compiled code, as 16 hex digits: FNV-1a (64-bit) over its
/// complete source ([`Program::source`]: prelude, shared body, entries) and every NVRTC
/// option ([`OPTIONS`]). A cached PTX file built from anything else is stale.
pub fn source_key(program: Program) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let mut eat = |bytes: &[u8]| {
        for &b in bytes {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
    };
    eat(program.source().as_bytes());
    for o in OPTIONS {
        eat(&[0]);
        eat(o.as_bytes());
    }
    format!("{h:016x}")
}

/// The contents of the cached PTX file of `program` compiled for `arch` (a `compute_XY`
/// target): the [`PTX_HEADER`] line with the program's name, [`source_key`] and `arch`, then
/// the PTX.
pub fn ptx_file(program: Program, arch: &str, ptx: &str) -> String {
    format!(
        "{PTX_HEADER} program={} source={} arch={arch}\n{ptx}",
        program.name(),
        source_key(program)
    )
}

/// The numeric part of an architecture name (`sm_90` → 90, `compute_100a` → 100) and whether
/// it has a letter suffix (architecture-specific features: only that exact architecture).
fn arch_number(arch: &str) -> Option<(u32, bool)> {
    let digits = arch
        .strip_prefix("compute_")
        .or_else(|| arch.strip_prefix("sm_"))?;
    let end = digits
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(digits.len());
    let n = digits[..end].parse().ok()?;
    Some((n, end < digits.len()))
}

/// A cached PTX file, checked against this build and the device.
#[derive(Debug, PartialEq)]
pub enum CachedPtx {
    /// Built from this build's source for an architecture the device runs: the PTX (without
    /// the header line).
    Fresh(String),
    /// Not to be loaded, and why: no header (written by hand or by an older sage-cuda),
    /// another program, another source or options (the kernels changed since), or an
    /// architecture newer than the device's.
    Stale(String),
}

/// Checks the contents of a cached PTX file for `program` on a device of architecture
/// `device_arch` (`sm_90`): fresh only when its header names this program, this build's
/// [`source_key`], and a `compute_XY` target the device runs (XY at most the device's; an
/// architecture-specific `compute_XYa` only on that architecture).
pub fn cached_ptx(contents: &str, program: Program, device_arch: &str) -> CachedPtx {
    let (first, ptx) = contents.split_once('\n').unwrap_or((contents, ""));
    let fields = first
        .strip_prefix(PTX_HEADER)
        .filter(|f| f.is_empty() || f.starts_with(' '));
    let Some(fields) = fields else {
        return CachedPtx::Stale(format!(
            "no `{PTX_HEADER}` header line (written by hand or by an older sage-cuda): its source is unknown"
        ));
    };
    let field = |key: &str| {
        fields
            .split_whitespace()
            .find_map(|f| f.strip_prefix(key)?.strip_prefix('='))
    };
    let name = program.name();
    if field("program") != Some(name.as_str()) {
        return CachedPtx::Stale(format!(
            "built for program {}, not {name}",
            field("program").unwrap_or("?")
        ));
    }
    let want = source_key(program);
    if field("source") != Some(want.as_str()) {
        return CachedPtx::Stale(format!(
            "built from another kernel source or options (key {}, this build's is {want})",
            field("source").unwrap_or("?")
        ));
    }
    let arch = field("arch").unwrap_or("?");
    let runs = match (arch_number(arch), arch_number(device_arch)) {
        (Some((file, specific)), Some((dev, _))) if arch.starts_with("compute_") => {
            if specific {
                file == dev
            } else {
                file <= dev
            }
        }
        _ => false,
    };
    if !runs {
        return CachedPtx::Stale(format!(
            "built for {arch}, which a {device_arch} device cannot run"
        ));
    }
    CachedPtx::Fresh(ptx.to_string())
}

/// The image of `program` for `device_arch` from the PTX directory `dir`: the cached file
/// when it is fresh ([`cached_ptx`]); when it is stale, NVRTC's compile where NVRTC is
/// installed, else `NotAvailable` saying why the file was refused. A missing or unreadable
/// file is `NotAvailable`.
fn image_from_dir(dir: &Path, program: Program, device_arch: &str) -> Result<Image, CudaError> {
    let path = dir.join(format!("{}.ptx", program.name()));
    let contents = std::fs::read_to_string(&path).map_err(|e| {
        CudaError::NotAvailable(format!(
            "{PTX_DIR_ENV}: cannot read {}: {e}",
            path.display()
        ))
    })?;
    match cached_ptx(&contents, program, device_arch) {
        CachedPtx::Fresh(ptx) => Ok(Image { ptx, cubin: None }),
        CachedPtx::Stale(_) if nvrtc_available() => compile(program, device_arch),
        CachedPtx::Stale(why) => Err(CudaError::NotAvailable(format!(
            "{PTX_DIR_ENV}: {} is stale, not loaded: {why}; rebuild the directory with \
             `sage-cuda-bench --emit-ptx DIR --arch compute_XY` from this build",
            path.display()
        ))),
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
#[cfg(feature = "dynamic-loading")]
pub fn nvrtc_available() -> bool {
    // SAFETY: only tries to dlopen the library by name and closes it.
    unsafe { nvrtc::is_culib_present() }
}

/// Whether the NVRTC library can be loaded: always, with `dynamic-linking` (the program is
/// linked against it, so it would not have started without it).
#[cfg(not(feature = "dynamic-loading"))]
pub fn nvrtc_available() -> bool {
    true
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
/// With `SAGE_CUDA_PTX_DIR` set, `<dir>/<program>.ptx` is used instead of NVRTC when it was
/// built from this build's source for an architecture the device runs ([`cached_ptx`]).
pub fn image(program: Program, arch: &str) -> Result<Arc<Image>, CudaError> {
    let key = (program, arch.to_string());
    if let Some(img) = cache().lock().unwrap_or_else(|e| e.into_inner()).get(&key) {
        return Ok(img.clone());
    }
    let img = match std::env::var_os(PTX_DIR_ENV) {
        Some(dir) => image_from_dir(Path::new(&dir), program, arch)?,
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
/// into `dir`, for machines without NVRTC (`SAGE_CUDA_PTX_DIR`), each headed by what it was
/// built from ([`ptx_file`]). Returns the files written.
pub fn write_ptx_dir(dir: &Path, arch: &str) -> Result<Vec<PathBuf>, CudaError> {
    if !arch.starts_with("compute_") {
        return Err(CudaError::NotAvailable(format!(
            "PTX needs a compute_XY target, not {arch}"
        )));
    }
    std::fs::create_dir_all(dir)
        .map_err(|e| CudaError::NotAvailable(format!("cannot create {}: {e}", dir.display())))?;
    let mut out = Vec::new();
    for p in Program::all() {
        let img = compile(p, arch)?;
        let path = dir.join(format!("{}.ptx", p.name()));
        std::fs::write(&path, ptx_file(p, arch, &img.ptx).as_bytes()).map_err(|e| {
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

    /// A cached PTX file is loaded only when its header names this program, this build's
    /// source and options, and an architecture the device runs.
    #[test]
    fn cached_ptx_is_keyed_by_source_and_arch() {
        let p = Program::Step {
            p: DType::F32,
            s: DType::Bf16,
        };
        let body = ".version 8.0\n.target sm_90\n// kernels\n";
        let file = ptx_file(p, "compute_90", body);
        assert!(file.starts_with(PTX_HEADER));
        let fresh = CachedPtx::Fresh(body.to_string());
        assert_eq!(cached_ptx(&file, p, "sm_90"), fresh);
        assert_eq!(
            cached_ptx(&file, p, "sm_100"),
            fresh,
            "PTX runs on newer GPUs"
        );
        let stale = |c: CachedPtx, what: &str| match c {
            CachedPtx::Stale(why) => assert!(why.contains(what), "{why}"),
            CachedPtx::Fresh(_) => panic!("a stale file ({what}) would be loaded"),
        };
        stale(cached_ptx(&file, p, "sm_80"), "cannot run");
        // The kernel source changed since the file was written: another key.
        let key = source_key(p);
        let other = file.replacen(&key, "0123456789abcdef", 1);
        stale(cached_ptx(&other, p, "sm_90"), "another kernel source");
        // Another program's file under this name.
        let q = Program::SqNorm { e: DType::F32 };
        stale(
            cached_ptx(&ptx_file(q, "compute_90", body), p, "sm_90"),
            "program",
        );
        // A file from before the header (what write_ptx_dir used to write), or by hand.
        stale(
            cached_ptx(
                "//\n// Generated by NVIDIA NVVM Compiler\n.version 8.0\n",
                p,
                "sm_90",
            ),
            "header",
        );
        stale(
            cached_ptx(&file.replacen("cache v1", "cache v10", 1), p, "sm_90"),
            "header",
        );
        // Architecture-specific PTX runs on its own architecture only; a CUBIN target is not
        // PTX.
        let a = ptx_file(p, "compute_90a", body);
        assert_eq!(cached_ptx(&a, p, "sm_90"), fresh);
        stale(cached_ptx(&a, p, "sm_100"), "cannot run");
        stale(
            cached_ptx(&ptx_file(p, "sm_90", body), p, "sm_90"),
            "cannot run",
        );
        // Every program has its own key, and the key follows the options too.
        let mut keys: Vec<String> = Program::all().into_iter().map(source_key).collect();
        keys.sort();
        keys.dedup();
        assert_eq!(keys.len(), 12);
    }

    /// The lookup on a directory: a fresh file is loaded as it is; a stale one never is
    /// (NVRTC compiles the program where it is installed, else the error says why).
    #[test]
    fn a_stale_file_in_the_ptx_dir_is_never_loaded() {
        let dir = std::env::temp_dir().join(format!("sage-cuda-ptx-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = Program::SqNorm { e: DType::Bf16 };
        let path = dir.join(format!("{}.ptx", p.name()));
        let body = "// fresh body\n";
        std::fs::write(&path, ptx_file(p, "compute_75", body)).unwrap();
        let img = image_from_dir(&dir, p, "sm_90").unwrap();
        assert_eq!((img.ptx.as_str(), img.cubin.is_none()), (body, true));
        let old = "// Generated by NVIDIA NVVM Compiler\n.version 8.0\n// stale body\n";
        std::fs::write(&path, old).unwrap();
        match image_from_dir(&dir, p, "sm_90") {
            Ok(img) => {
                assert!(nvrtc_available());
                assert!(!img.ptx.contains("stale body"), "the stale file was loaded");
            }
            Err(e) => {
                assert!(!nvrtc_available());
                let msg = e.to_string();
                assert!(msg.contains("stale") && msg.contains("--emit-ptx"), "{msg}");
            }
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn program_names_are_distinct() {
        let mut names: Vec<String> = Program::all().iter().map(|p| p.name()).collect();
        names.sort();
        names.dedup();
        assert_eq!(names.len(), 12);
    }
}
