//! The list of checks, and running them all on one backend.

use std::fmt;
use std::path::PathBuf;

use crate::failure::Failure;
use crate::harness::Harness;
use crate::{checks, vectors};

/// What a run covers.
#[derive(Clone, Debug)]
pub struct Options {
    /// Directories of `*.json` trajectory files to replay.
    pub vector_dirs: Vec<PathBuf>,
    /// The backend counts non-finite parameters in its update pass (sage-cpu's, sage-cuda's
    /// and sage-opencl's do): adds the check `non-finite parameters counted`, which fails a
    /// step that does not say it counted (`StepReport::params_checked`), on top of the one
    /// every backend gets (a count, where there is one, must be right). Default `false`: a
    /// backend is not required to count.
    pub counts_non_finite: bool,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            vector_dirs: vec![vectors::default_dir()],
            counts_non_finite: false,
        }
    }
}

/// The outcome of one check on one backend.
#[derive(Clone, Debug, PartialEq)]
pub enum Status {
    /// Passed.
    Pass,
    /// Failed, with the worst error and where.
    Fail(String),
    /// The backend (or this check's requirement) is not available here.
    NotAvailable(String),
}

/// One line of the report: backend x check.
#[derive(Clone, Debug, PartialEq)]
pub struct Row {
    /// Backend name (with variant, e.g. `cpu/avx2`).
    pub backend: String,
    /// Check name.
    pub check: String,
    /// Outcome.
    pub status: Status,
    /// A note on a pass (e.g. the worst error of a trajectory as a fraction of its tolerance).
    pub note: String,
}

impl Row {
    /// A `not available` row for a whole backend.
    pub fn not_available(backend: impl Into<String>, why: impl Into<String>) -> Self {
        Row {
            backend: backend.into(),
            check: "*".into(),
            status: Status::NotAvailable(why.into()),
            note: String::new(),
        }
    }
}

impl fmt::Display for Row {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let status = match &self.status {
            Status::Pass if self.note.is_empty() => "pass".to_string(),
            Status::Pass => format!("pass  {}", self.note),
            Status::Fail(d) => format!("FAIL  {d}"),
            Status::NotAvailable(d) => format!("not available  {d}"),
        };
        write!(f, "{:<14} {:<44} {}", self.backend, self.check, status)
    }
}

/// A check as the suite lists it.
pub type Check<B> = fn(&mut B) -> Result<(), Failure>;

/// Every check except the vector files, by name.
pub fn checks<B: Harness + 'static>() -> Vec<(&'static str, Check<B>)> {
    checks::all::<B>()
}

/// Runs every check and every vector file of `opts` on `b`.
pub fn run_suite<B: Harness + 'static>(mut b: B, opts: &Options) -> Vec<Row> {
    let backend = b.name();
    let mut rows = Vec::new();
    let mut push = |check: String, r: Result<String, Failure>| {
        let mut note = String::new();
        rows.push(Row {
            backend: backend.clone(),
            check,
            status: match r {
                Ok(n) => {
                    note = n;
                    Status::Pass
                }
                Err(f) if f.not_available => Status::NotAvailable(f.detail),
                Err(f) => Status::Fail(f.detail),
            },
            note,
        })
    };
    for dir in &opts.vector_dirs {
        match vectors::files_in(dir) {
            Err(f) => push(format!("vectors {}", dir.display()), Err(f)),
            Ok(files) => {
                for path in files {
                    let name = format!(
                        "vectors {}",
                        path.file_name().map_or("?".into(), |n| n.to_string_lossy())
                    );
                    let r = vectors::VectorFile::load(&path)
                        .and_then(|v| vectors::replay_worst(&mut b, &v))
                        .map(|w| format!("worst {:.3}x tolerance", w.ratio));
                    push(name, r);
                }
            }
        }
    }
    let mut list = checks::<B>();
    if opts.counts_non_finite {
        list.push((
            "non-finite parameters counted",
            crate::checks::contract::non_finite_params_counted::<B>,
        ));
    }
    for (name, check) in list {
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| check(&mut b)))
            .unwrap_or_else(|_| Err(Failure::new(name, "the check panicked")));
        push(name.to_string(), r.map(|()| String::new()));
    }
    rows
}
