//! # sage-conformance
//!
//! The one suite every backend of [`sage_core`] runs: golden trajectories recorded from the
//! authors' code, differential tests against a float64 reference, fused == composed,
//! multi-tensor == one at a time, resume == uninterrupted, quickcheck properties, non-finite
//! inputs and bad inputs. Every check is a plain public function generic over a [`Harness`];
//! [`conformance_tests!`] turns them all into `#[test]`s for a backend with one line.

pub mod backends;
pub mod checks;
pub mod failure;
pub mod harness;
pub mod model;
pub mod reference;
pub mod suite;
pub mod testing;
pub mod vectors;

pub use failure::{Failure, Worst};
pub use harness::Harness;
pub use model::Model;
pub use suite::{run_suite, Options, Row, Status};

// The README's examples compile and run as doc tests of this crate (it depends on both
// sage-core and sage-cpu).
#[cfg(doctest)]
#[doc = include_str!("../../README.md")]
struct ReadmeDoctests;
