//! Checkpoints across backends through each backend's own host copies: OpenCL <-> CPU, both
//! ways, when an OpenCL device is here (PoCL on CI). With `SAGE_REQUIRE_OPENCL` set, a missing
//! device fails the test.

use sage_conformance::checks::checkpoint::{cross_backend, resume_from_checkpoint};
use sage_cpu::Cpu;

#[test]
fn opencl_and_cpu_resume_each_other() {
    let mut cl = match sage_opencl::OpenCl::new() {
        Ok(b) => b,
        Err(e) => {
            assert!(
                std::env::var_os("SAGE_REQUIRE_OPENCL").is_none(),
                "SAGE_REQUIRE_OPENCL is set but: {e}"
            );
            eprintln!("skipped: no OpenCL device ({e})");
            return;
        }
    };
    let w = cross_backend(&mut cl.clone(), &mut Cpu).unwrap();
    println!("opencl -> cpu: worst {:e}x tolerance", w.ratio);
    let w = cross_backend(&mut Cpu, &mut cl).unwrap();
    println!("cpu -> opencl: worst {:e}x tolerance", w.ratio);
    resume_from_checkpoint(&mut cl).unwrap();
}
