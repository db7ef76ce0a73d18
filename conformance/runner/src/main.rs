//! `sage-conformance [--backend cpu|opencl|cuda|all] [--vectors DIR]...`
//!
//! Runs the conformance suite on each selected backend and prints one row per backend x check,
//! then the cross-backend checkpoint check for every ordered pair of the selected backends
//! found here (`A  checkpoint resume -> C`).
//! Exit status: 0 all passed (backends not found under `all` are reported, not failed),
//! 1 a check failed, 2 a backend named explicitly is not available here, 64 bad usage.

use std::path::PathBuf;
use std::process::ExitCode;

mod backends;

use sage_conformance::suite::{Options, Status};

fn usage() -> ExitCode {
    eprintln!("usage: sage-conformance [--backend cpu|opencl|cuda|all] [--vectors DIR]...");
    ExitCode::from(64)
}

fn main() -> ExitCode {
    let mut selected: Vec<String> = Vec::new();
    let mut dirs: Vec<PathBuf> = Vec::new();
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--backend" | "-b" => match args.next() {
                Some(b) if b == "all" || backends::NAMES.contains(&b.as_str()) => selected.push(b),
                _ => return usage(),
            },
            "--vectors" => match args.next() {
                Some(d) => dirs.push(PathBuf::from(d)),
                None => return usage(),
            },
            "-h" | "--help" => {
                usage();
                return ExitCode::SUCCESS;
            }
            _ => return usage(),
        }
    }
    let explicit: Vec<String> = selected.iter().filter(|b| *b != "all").cloned().collect();
    let names: Vec<String> = if selected.is_empty() || selected.iter().any(|b| b == "all") {
        backends::NAMES.iter().map(|s| s.to_string()).collect()
    } else {
        explicit.clone()
    };
    // Every backend this runner knows (sage-cpu's, sage-opencl, sage-cuda) counts non-finite
    // parameters in its update pass: one that stops counting fails.
    let mut opts = Options {
        counts_non_finite: true,
        ..Options::default()
    };
    if !dirs.is_empty() {
        opts.vector_dirs = dirs;
    }
    for d in &opts.vector_dirs {
        println!("vectors from {}", d.display());
    }
    let (mut failed, mut missing) = (0usize, false);
    let mut passed = 0usize;
    for name in &names {
        for row in backends::run(name, &opts) {
            println!("{row}");
            match row.status {
                Status::Pass => passed += 1,
                Status::Fail(_) => failed += 1,
                Status::NotAvailable(_) => {
                    if explicit.contains(name) && row.check == "*" {
                        missing = true;
                    }
                }
            }
        }
    }
    // Checkpoints saved on each backend found and resumed on each (itself included).
    for row in backends::cross_backend_rows(&names) {
        println!("{row}");
        match row.status {
            Status::Pass => passed += 1,
            Status::Fail(_) => failed += 1,
            Status::NotAvailable(_) => {}
        }
    }
    println!("{passed} passed, {failed} failed");
    if failed > 0 {
        ExitCode::from(1)
    } else if missing {
        ExitCode::from(2)
    } else {
        ExitCode::SUCCESS
    }
}
