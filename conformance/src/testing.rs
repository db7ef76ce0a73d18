//! What [`conformance_tests!`](crate::conformance_tests) expands to: each check as a test
//! that panics with the failure's detail.

use std::path::PathBuf;

use crate::failure::Failure;
use crate::harness::Harness;
use crate::suite::Check;
use crate::{checks, vectors};

/// Runs one check on `b`; panics with the worst error and where. A check that cannot run on
/// this backend (e.g. a storage type it lacks) panics too: it is not a pass.
pub fn run_check<B: Harness + 'static>(mut b: B, f: Check<B>) {
    if let Err(e) = f(&mut b) {
        if e.not_available {
            panic!("{}: not available on {}: {}", e.check, b.name(), e.detail);
        }
        panic!("{} on {}: {}", e.check, b.name(), e.detail);
    }
}

/// Runs every check of [`checks::all`] on `b`, printing each outcome; panics listing every
/// failure (a check that cannot run here counts as one).
pub fn run_all_checks<B: Harness + 'static>(b: B) {
    let mut failures = Vec::new();
    for (name, f) in checks::all::<B>() {
        let mut b = b.clone();
        let t0 = std::time::Instant::now();
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(&mut b)))
            .unwrap_or_else(|_| Err(Failure::new(name, "the check panicked")));
        match r {
            Ok(()) => println!("pass {name} ({:.1} s)", t0.elapsed().as_secs_f64()),
            Err(e) => {
                println!("FAIL {name}: {}", e.detail);
                let why = if e.not_available {
                    "not available: "
                } else {
                    ""
                };
                failures.push(format!("{name}: {why}{}", e.detail));
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{} check(s) failed on {}:\n{}",
        failures.len(),
        b.name(),
        failures.join("\n")
    );
}

/// The vector directories: the project's own copy, plus every directory listed in the
/// `SAGE_VECTORS` environment variable (separated like `PATH`).
pub fn vector_dirs() -> Vec<PathBuf> {
    let mut dirs = vec![vectors::default_dir()];
    if let Some(extra) = std::env::var_os("SAGE_VECTORS") {
        dirs.extend(std::env::split_paths(&extra));
    }
    dirs
}

/// Replays every trajectory file of [`vector_dirs`] on `b`, printing each file's name and
/// panicking with every failure.
pub fn run_vectors<B: Harness + 'static>(mut b: B) {
    let mut failures = Vec::new();
    let mut replayed = 0;
    for dir in vector_dirs() {
        let files = match vectors::files_in(&dir) {
            Ok(f) => f,
            Err(e) => {
                failures.push(e.to_string());
                continue;
            }
        };
        for path in files {
            let r = vectors::VectorFile::load(&path).and_then(|v| vectors::replay(&mut b, &v));
            println!(
                "{} {}",
                if r.is_ok() { "pass" } else { "FAIL" },
                path.display()
            );
            replayed += 1;
            if let Err(e) = r {
                failures.push(e.to_string());
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {replayed} trajectory files failed on {}:\n{}",
        failures.len(),
        b.name(),
        failures.join("\n")
    );
}

/// Turns the whole suite into `#[test]`s for a backend: one line in a test file.
///
/// The argument is an expression that makes the backend. It expands to two tests:
/// `conformance_vectors` (every trajectory file, see [`vector_dirs`]) and `conformance_checks`
/// (every check of [`checks::all`], failures listed together).
///
/// ```ignore
/// // tests/conformance.rs of a crate with a backend `MyBackend: Harness`
/// sage_conformance::conformance_tests!(my_crate::MyBackend::new());
/// ```
#[macro_export]
macro_rules! conformance_tests {
    ($make:expr) => {
        #[test]
        fn conformance_vectors() {
            $crate::testing::run_vectors($make)
        }
        #[test]
        fn conformance_checks() {
            $crate::testing::run_all_checks($make)
        }
    };
}
