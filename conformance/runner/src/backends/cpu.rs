//! sage-cpu: the portable backend, and the SIMD backend at every instruction-set level this
//! machine has, on one thread and split across threads.

use sage_cpu::{Cpu, Level, SimdCpu};

use sage_conformance::suite::{run_suite, Options, Row};

/// The SIMD backends the suite runs here: every available vector level on one thread, and
/// the best level on three threads with tiny chunks, so that even the suite's short tensors
/// are split across threads (tails included).
pub fn simd_variants() -> Vec<SimdCpu> {
    let mut out: Vec<SimdCpu> = Level::available()
        .filter(|l| *l != Level::Portable)
        .filter_map(|l| SimdCpu::with_level(l).ok())
        .map(|b| b.threads(1))
        .collect();
    out.push(SimdCpu::new().threads(3).min_parallel(0).chunk(16));
    out
}

/// The suite on the portable backend, then on each SIMD variant.
pub fn run(opts: &Options) -> Vec<Row> {
    let mut rows = run_suite(Cpu, opts);
    for b in simd_variants() {
        rows.extend(run_suite(b, opts));
    }
    rows
}

#[cfg(test)]
mod tests {
    use super::*;
    use sage_conformance::suite::Status;

    /// The whole suite passes on every CPU variant this machine has.
    #[test]
    fn every_cpu_level_passes() {
        let opts = Options {
            counts_non_finite: true,
            ..Options::default()
        };
        let rows = run(&opts);
        let mut names: Vec<&str> = rows.iter().map(|r| r.backend.as_str()).collect();
        names.dedup();
        assert!(names.contains(&"cpu/portable"));
        assert!(names.iter().any(|n| n.ends_with("/mt")), "{names:?}");
        for l in Level::available().filter(|l| *l != Level::Portable) {
            let want = format!("cpu/{}", l.name());
            assert!(
                names.contains(&want.as_str()),
                "{want} missing from {names:?}"
            );
        }
        let failed: Vec<String> = rows
            .iter()
            .filter(|r| matches!(r.status, Status::Fail(_)))
            .map(|r| r.to_string())
            .collect();
        assert!(failed.is_empty(), "{}", failed.join("\n"));
    }
}
