//! A failed check: which check, and the worst error with where it happened.

use std::fmt;

/// Why a check failed.
#[derive(Clone, Debug, PartialEq)]
pub struct Failure {
    /// The check's name.
    pub check: String,
    /// What went wrong and where (the worst element when values differ).
    pub detail: String,
    /// The check could not run here (e.g. the backend lacks a storage type): reported as
    /// `not available`, never as a pass.
    pub not_available: bool,
}

impl Failure {
    /// A failure of `check`.
    pub fn new(check: impl Into<String>, detail: impl Into<String>) -> Self {
        Failure {
            check: check.into(),
            detail: detail.into(),
            not_available: false,
        }
    }

    /// The check cannot run on this backend, and why.
    pub fn not_available(check: impl Into<String>, why: impl Into<String>) -> Self {
        Failure {
            not_available: true,
            ..Failure::new(check, why)
        }
    }
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.check, self.detail)
    }
}

impl std::error::Error for Failure {}

/// The worst element of a comparison, as a multiple of its allowed error.
#[derive(Clone, Debug, Default)]
pub struct Worst {
    /// `|actual − expected| / (abs + rel·|expected|)`: above 1 fails. NaN where one side is NaN
    /// and the other is not.
    pub ratio: f64,
    /// Where (free text: file, step, tensor, element).
    pub place: String,
    /// The value produced.
    pub actual: f64,
    /// The value expected.
    pub expected: f64,
}

impl Worst {
    /// Compares one element, keeping the worst seen. NaN on exactly one side counts as
    /// infinitely wrong; NaN on both sides matches.
    pub fn see(
        &mut self,
        actual: f64,
        expected: f64,
        abs: f64,
        rel: f64,
        place: impl FnOnce() -> String,
    ) {
        let r = if actual.is_nan() || expected.is_nan() {
            if actual.is_nan() && expected.is_nan() {
                0.0
            } else {
                f64::INFINITY
            }
        } else if actual == expected {
            0.0
        } else {
            (actual - expected).abs() / (abs + rel * expected.abs())
        };
        if r > self.ratio || (self.place.is_empty() && r > 0.0) {
            *self = Worst {
                ratio: r,
                place: place(),
                actual,
                expected,
            };
        }
    }

    /// Whether everything seen was within tolerance.
    pub fn ok(&self) -> bool {
        self.ratio <= 1.0
    }

    /// A failure of `check` describing this worst element.
    pub fn failure(&self, check: &str) -> Failure {
        Failure::new(
            check,
            format!(
                "worst error {:.3}x the tolerance at {}: got {:e}, want {:e}",
                self.ratio, self.place, self.actual, self.expected
            ),
        )
    }

    /// `Ok` when within tolerance, else the failure.
    pub fn into_result(self, check: &str) -> Result<(), Failure> {
        if self.ok() {
            Ok(())
        } else {
            Err(self.failure(check))
        }
    }
}
