//! sage-opencl: the suite on every OpenCL device found (or the one `SAGE_OPENCL_DEVICE` names).

use sage_core::{DType, Element};
use sage_opencl::{ClBuffer, OpenCl, Select};

use crate::harness::Harness;
use crate::suite::{run_suite, Options, Row};

impl Harness for OpenCl {
    type Owned<E: Element> = ClBuffer<E>;
    fn name(&self) -> String {
        let d = self.device();
        format!("opencl:{}:{} ({})", d.platform, d.device, d.name)
    }
    fn supports(&self, d: DType) -> bool {
        // f16 is stored through vload_half/vstore_half_rte, core OpenCL on every device.
        let _ = d;
        true
    }
    fn upload<E: Element>(&mut self, data: &[E]) -> Result<ClBuffer<E>, Self::Error> {
        OpenCl::upload(self, data)
    }
    fn download<E: Element>(&mut self, buf: &ClBuffer<E>) -> Result<Vec<E>, Self::Error> {
        OpenCl::download(self, buf)
    }
    fn buf<E: Element>(o: &ClBuffer<E>) -> &ClBuffer<E> {
        o
    }
    fn buf_mut<E: Element>(o: &mut ClBuffer<E>) -> &mut ClBuffer<E> {
        o
    }
}

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
