//! sage-opencl: the suite on every OpenCL device found (or the one `SAGE_OPENCL_DEVICE` names).

use sage_opencl::{OpenCl, Select};

use sage_conformance::suite::{run_suite, Options, Row};

/// The suite on each OpenCL device here: all of them, or only the one `SAGE_OPENCL_DEVICE`
/// selects (`P:D` or part of a name). One `not available` row when there is none.
pub fn run(opts: &Options) -> Vec<Row> {
    let list = match sage_opencl::devices() {
        Ok(l) => l,
        Err(e) => return vec![Row::not_available("opencl", e.to_string())],
    };
    let chosen: Vec<_> = match std::env::var("SAGE_OPENCL_DEVICE") {
        Ok(s) => match Select::parse(&s).pick(&list) {
            Ok(d) => vec![d.clone()],
            Err(e) => return vec![Row::not_available("opencl", e.to_string())],
        },
        Err(_) => list,
    };
    let mut rows = Vec::new();
    for d in chosen {
        let select = Select::Index {
            platform: d.platform,
            device: d.device,
        };
        match OpenCl::with_device(select) {
            Ok(b) => rows.extend(run_suite(b, opts)),
            Err(e) => rows.push(Row::not_available(
                format!("opencl:{}:{}", d.platform, d.device),
                e.to_string(),
            )),
        }
    }
    rows
}
