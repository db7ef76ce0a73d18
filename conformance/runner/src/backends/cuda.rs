//! sage-cuda: the suite on every CUDA device found (or the one `SAGE_CUDA_DEVICE` names by
//! ordinal). One `not available` row, never a crash, where there is no driver or device.

use sage_cuda::Cuda;

use sage_conformance::suite::{run_suite, Options, Row};

/// The suite on each CUDA device here (all of them, or only `SAGE_CUDA_DEVICE=N`); one
/// `not available` row when there is none.
pub fn run(opts: &Options) -> Vec<Row> {
    let count = match Cuda::device_count() {
        Ok(0) => return vec![Row::not_available("cuda", "no CUDA device found")],
        Ok(n) => n,
        Err(e) => return vec![Row::not_available("cuda", e.to_string())],
    };
    let chosen: Vec<usize> = match std::env::var("SAGE_CUDA_DEVICE") {
        Ok(s) => match s.trim().parse::<usize>() {
            Ok(i) if i < count => vec![i],
            _ => {
                return vec![Row::not_available(
                    "cuda",
                    format!("SAGE_CUDA_DEVICE={s}: not one of the {count} devices (0..{count})"),
                )]
            }
        },
        Err(_) => (0..count).collect(),
    };
    let mut rows = Vec::new();
    for i in chosen {
        match Cuda::new(i) {
            Ok(b) => rows.extend(run_suite(b, opts)),
            Err(e) => rows.push(Row::not_available(format!("cuda:{i}"), e.to_string())),
        }
    }
    rows
}
