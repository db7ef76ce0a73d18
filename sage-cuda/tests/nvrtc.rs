//! Every kernel program compiles with NVRTC, on a machine with no GPU: PTX for the oldest
//! architecture CUDA 13 supports, and a CUBIN for the H100 (`sm_90`, which also runs the
//! assembler). Without NVRTC on the loader path the tests say so and pass, unless
//! `SAGE_CUDA_REQUIRE_NVRTC=1` (the test command's NVRTC step sets it), where that fails.

use sage_cuda::kernels::{self, Program};

fn nvrtc_or_skip() -> bool {
    if kernels::nvrtc_available() {
        return true;
    }
    if std::env::var("SAGE_CUDA_REQUIRE_NVRTC").is_ok_and(|v| v == "1") {
        panic!("SAGE_CUDA_REQUIRE_NVRTC=1 but libnvrtc is not on the loader path");
    }
    eprintln!(
        "NVRTC not found: kernel compile tests skipped (scripts/test.d/25-cuda-nvrtc.sh runs them)"
    );
    false
}

fn compile_all(arch: &str) {
    if !nvrtc_or_skip() {
        return;
    }
    let mut failures = Vec::new();
    for p in Program::all() {
        match kernels::compile(p, arch) {
            Ok(img) => {
                if arch.starts_with("compute_") {
                    for k in p.kernels() {
                        assert!(
                            img.ptx.contains(&format!(".entry {k}(")),
                            "{} ({arch}): no kernel {k} in the PTX",
                            p.name()
                        );
                    }
                    // --fmad=false: no contracted multiply-add anywhere.
                    assert!(!img.ptx.contains("fma.rn.f32"), "{}: FMA in PTX", p.name());
                } else {
                    let cubin = img.cubin.expect("a CUBIN for sm_ targets");
                    assert!(
                        cubin.starts_with(b"\x7fELF"),
                        "{}: CUBIN is not ELF",
                        p.name()
                    );
                }
            }
            Err(e) => failures.push(e.to_string()),
        }
    }
    assert!(
        failures.is_empty(),
        "{} programs failed:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

#[test]
fn every_program_compiles_to_ptx_for_compute_75() {
    compile_all("compute_75");
}

#[test]
fn every_program_compiles_to_cubin_for_sm_90() {
    compile_all("sm_90");
}

#[test]
fn a_broken_program_returns_the_nvrtc_log() {
    if !nvrtc_or_skip() {
        return;
    }
    // An unsupported architecture is a compile error, with NVRTC's message, not a panic.
    let e = kernels::compile(
        Program::SqNorm {
            e: sage_core::DType::F32,
        },
        "compute_10",
    )
    .unwrap_err();
    assert_eq!(
        sage_core::BackendError::kind(&e),
        sage_core::ErrorKind::KernelBuild
    );
    assert!(e.to_string().contains("compute_10"), "{e}");
}

#[test]
fn nvrtc_reports_its_version() {
    if !nvrtc_or_skip() {
        return;
    }
    let (major, _) = kernels::nvrtc_version().unwrap();
    assert!(major >= 12, "NVRTC {major}");
}
