//! The checks, each a plain public function generic over a [`Harness`].

use crate::harness::Harness;
use crate::suite::Check;

/// Every check, by name, in report order.
pub fn all<B: Harness>() -> Vec<(&'static str, Check<B>)> {
    vec![]
}
