//! The backends this project ships, as the runner finds them on the machine. Each module
//! exposes `run(&Options) -> Vec<Row>`: the suite's rows for every variant of that backend
//! available here, or one `not available` row saying why.

pub mod cpu;
pub mod cuda;
pub mod opencl;

use crate::suite::{Options, Row};

/// Names the runner accepts for `--backend`.
pub const NAMES: [&str; 3] = ["cpu", "opencl", "cuda"];

/// Runs the suite on backend `name` (one of [`NAMES`]).
pub fn run(name: &str, opts: &Options) -> Vec<Row> {
    match name {
        "cpu" => cpu::run(opts),
        "opencl" => opencl::run(opts),
        "cuda" => cuda::run(opts),
        other => vec![Row::not_available(
            other,
            format!("unknown backend `{other}`"),
        )],
    }
}
