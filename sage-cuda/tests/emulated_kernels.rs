//! The kernels' own source, run on the CPU: `emulate/shim.h` stands in for the CUDA built-ins.
//! The step kernels run as a loop over blocks and threads, so the chunking, the four-wide
//! vector path, the tails, unaligned buffers, absent state and every storage pair are checked
//! element for element (bit for bit) against the shared body's per-element functions. The norm
//! kernels run with one host thread per CUDA thread (barriers and warp shuffles emulated), and
//! are checked against sage-core's norm contract: partials on the 4096-element grid that depend
//! on their chunk's contents only, the per-tensor fold bit for bit. No GPU needed. Needs a C++20
//! compiler with `_Float16` and `<barrier>` (GCC 12+); without one the tests say so and pass,
//! unless `SAGE_CUDA_REQUIRE_EMULATION=1`.

use std::path::PathBuf;
use std::process::Command;

use sage_cuda::kernels::{ENTRY, PRELUDE};

fn compiler() -> Option<&'static str> {
    ["g++", "c++", "clang++"].into_iter().find(|c| {
        Command::new(c)
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success())
    })
}

/// Compiles `emulate/<program>.cpp` against the real kernel source and runs it; it must
/// print `0 failures`.
fn emulate(program: &str) {
    let Some(cxx) = compiler() else {
        if std::env::var("SAGE_CUDA_REQUIRE_EMULATION").is_ok_and(|v| v == "1") {
            panic!("SAGE_CUDA_REQUIRE_EMULATION=1 but no C++ compiler found");
        }
        eprintln!("no C++ compiler: kernel emulation skipped");
        return;
    };
    // The two PTX conversions have host equivalents in the shim; the rest is the real source.
    let (h2f, f2h) = (
        r#"asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));"#,
        r#"asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f));"#,
    );
    assert!(
        ENTRY.contains(h2f) && ENTRY.contains(f2h),
        "f16 conversions changed: update the emulation"
    );
    let entry = ENTRY
        .replace(h2f, "f = sage_emu_h2f(h);")
        .replace(f2h, "h = sage_emu_f2h(f);");
    let prelude = PRELUDE.replace("static __device__ __forceinline__", "static inline");
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("sage-cuda-{program}"));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(
        dir.join("kernel_source.cu"),
        format!("{prelude}\n{}\n{entry}\n", sage_core::gpu::KERNEL_BODY),
    )
    .unwrap();
    let here = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/emulate");
    let exe = dir.join(program);
    let out = Command::new(cxx)
        .args(["-O2", "-std=c++20", "-pthread", "-ffp-contract=off"])
        .arg(format!("-I{}", dir.display()))
        .arg(format!("-I{}", here.display()))
        .arg("-o")
        .arg(&exe)
        .arg(here.join(format!("{program}.cpp")))
        .output()
        .expect("run the C++ compiler");
    assert!(
        out.status.success(),
        "{program} did not compile:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let run = Command::new(&exe).output().expect("run the emulator");
    let stdout = String::from_utf8_lossy(&run.stdout);
    assert!(run.status.success(), "kernel emulation failed:\n{stdout}");
    assert!(stdout.contains("0 failures"), "{stdout}");
}

#[test]
fn step_kernels_match_the_per_element_formula_on_the_cpu() {
    emulate("emulate");
}

#[test]
fn norm_kernels_keep_the_chunk_grid_contract_on_the_cpu() {
    emulate("emulate_norm");
}
