//! sage-opencl (not built yet: see its issue).

use crate::suite::{Options, Row};

/// Reports the backend as not available.
pub fn run(_opts: &Options) -> Vec<Row> {
    vec![Row::not_available(
        "opencl",
        "backend not implemented in this build",
    )]
}
