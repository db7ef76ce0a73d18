//! Summary statistics and the paired Student t-test the paper uses for its gains.

use statrs::distribution::{ContinuousCDF, StudentsT};

/// Mean and sample standard deviation (n − 1; 0 for fewer than two values).
pub fn mean_std(x: &[f64]) -> (f64, f64) {
    let n = x.len() as f64;
    let m = x.iter().sum::<f64>() / n.max(1.0);
    let var = if x.len() > 1 {
        x.iter().map(|v| (v - m) * (v - m)).sum::<f64>() / (n - 1.0)
    } else {
        0.0
    };
    (m, var.sqrt())
}

/// A paired t-test of `b − a` over matched pairs (the same seeds).
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct PairedT {
    /// Pairs.
    pub n: usize,
    /// Mean difference `b − a`.
    pub mean_diff: f64,
    /// t statistic (infinite when every difference is the same non-zero value).
    pub t: f64,
    /// Two-sided p-value (1 when every difference is zero; needs n ≥ 2).
    pub p: f64,
}

/// Paired Student t-test of `b` against `a`; `None` with fewer than two pairs or unequal
/// lengths.
pub fn paired_t(a: &[f64], b: &[f64]) -> Option<PairedT> {
    if a.len() != b.len() || a.len() < 2 {
        return None;
    }
    let d: Vec<f64> = a.iter().zip(b).map(|(a, b)| b - a).collect();
    let (m, s) = mean_std(&d);
    let n = d.len();
    let se = s / (n as f64).sqrt();
    let (t, p) = if se == 0.0 {
        if m == 0.0 {
            (0.0, 1.0)
        } else {
            (m.signum() * f64::INFINITY, 0.0)
        }
    } else {
        let t = m / se;
        let dist = StudentsT::new(0.0, 1.0, (n - 1) as f64).ok()?;
        (t, 2.0 * (1.0 - dist.cdf(t.abs())))
    };
    Some(PairedT {
        n,
        mean_diff: m,
        t,
        p,
    })
}
