//! The backends this project ships, as the runner finds them on the machine. Each module
//! exposes `run(&Options) -> Vec<Row>`: the suite's rows for every variant of that backend
//! available here, or one `not available` row saying why.

pub mod cpu;
pub mod cuda;
pub mod opencl;

use sage_conformance::suite::{Options, Row};

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

/// One handle of each backend the cross-backend checkpoint check pairs up.
// A handful exist per run: their size does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Clone)]
pub enum Instance {
    /// The portable CPU backend.
    Cpu(sage_cpu::Cpu),
    /// The SIMD CPU backend at its best level here.
    Simd(sage_cpu::SimdCpu),
    /// An OpenCL device.
    OpenCl(sage_opencl::OpenCl),
    /// A CUDA device.
    Cuda(sage_cuda::Cuda),
}

/// Calls `$body` with `$b` bound to the backend inside an [`Instance`].
macro_rules! with_instance {
    ($inst:expr, $b:ident => $body:expr) => {
        match $inst {
            Instance::Cpu($b) => $body,
            Instance::Simd($b) => $body,
            Instance::OpenCl($b) => $body,
            Instance::Cuda($b) => $body,
        }
    };
}

impl Instance {
    /// Short name for the report (`cpu/portable`, `cpu/avx2`, `opencl:0:0`, `cuda:0`).
    pub fn short_name(&self) -> String {
        use sage_conformance::Harness;
        match self {
            Instance::OpenCl(b) => {
                let d = b.device();
                format!("opencl:{}:{}", d.platform, d.device)
            }
            Instance::Cuda(b) => b.name().split(' ').next().unwrap_or("cuda").to_string(),
            Instance::Cpu(b) => b.name(),
            Instance::Simd(b) => b.name(),
        }
    }
}

/// The first device of each backend family in `names` that is available here (the CPU gives
/// two: portable and SIMD), with one `not available` row for each family that is not.
/// `SAGE_OPENCL_DEVICE` / `SAGE_CUDA_DEVICE` pick the device as they do for the suite.
pub fn instances(names: &[String]) -> (Vec<Instance>, Vec<Row>) {
    let (mut out, mut rows) = (Vec::new(), Vec::new());
    let na =
        |family: &str, why: String| Row::not_available(family, format!("cross-backend: {why}"));
    for name in names {
        match name.as_str() {
            "cpu" => {
                out.push(Instance::Cpu(sage_cpu::Cpu));
                out.push(Instance::Simd(sage_cpu::SimdCpu::new().threads(1)));
            }
            "opencl" => {
                let pick = match std::env::var("SAGE_OPENCL_DEVICE") {
                    Ok(s) => sage_opencl::devices()
                        .and_then(|l| sage_opencl::Select::parse(&s).pick(&l).cloned()),
                    Err(_) => sage_opencl::devices().and_then(|l| {
                        l.into_iter().next().ok_or_else(|| {
                            sage_opencl::Error::NotAvailable("no OpenCL device found".into())
                        })
                    }),
                };
                let made = pick.and_then(|d| {
                    sage_opencl::OpenCl::with_device(sage_opencl::Select::Index {
                        platform: d.platform,
                        device: d.device,
                    })
                });
                match made {
                    Ok(b) => out.push(Instance::OpenCl(b)),
                    Err(e) => rows.push(na("opencl", e.to_string())),
                }
            }
            "cuda" => {
                let i = std::env::var("SAGE_CUDA_DEVICE")
                    .ok()
                    .and_then(|s| s.trim().parse::<usize>().ok())
                    .unwrap_or(0);
                match sage_cuda::Cuda::device_count() {
                    Ok(n) if i < n => match sage_cuda::Cuda::new(i) {
                        Ok(b) => out.push(Instance::Cuda(b)),
                        Err(e) => rows.push(na("cuda", e.to_string())),
                    },
                    Ok(_) => rows.push(na("cuda", format!("no CUDA device {i}"))),
                    Err(e) => rows.push(na("cuda", e.to_string())),
                }
            }
            other => rows.push(na(other, format!("unknown backend `{other}`"))),
        }
    }
    (out, rows)
}

/// The cross-backend checkpoint check for every ordered pair of [`instances`] (a backend
/// paired with itself too: save and load through its own host copies): one row per pair,
/// `A` in the backend column, `checkpoint resume -> C` as the check.
pub fn cross_backend_rows(names: &[String]) -> Vec<Row> {
    use sage_conformance::suite::Status;
    let (list, mut rows) = instances(names);
    for a in &list {
        for c in &list {
            let (mut a, mut c) = (a.clone(), c.clone());
            let check = format!("checkpoint resume -> {}", c.short_name());
            let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                with_instance!(&mut a, x => with_instance!(&mut c, y =>
                    sage_conformance::checks::checkpoint::cross_backend(x, y)))
            }))
            .unwrap_or_else(|_| {
                Err(sage_conformance::failure::Failure::new(
                    &check,
                    "the check panicked",
                ))
            });
            let (status, note) = match r {
                Ok(w) => (Status::Pass, format!("worst {:.3}x tolerance", w.ratio)),
                Err(f) if f.not_available => (Status::NotAvailable(f.detail), String::new()),
                Err(f) => (Status::Fail(f.detail), String::new()),
            };
            rows.push(Row {
                backend: a.short_name(),
                check,
                status,
                note,
            });
        }
    }
    rows
}
