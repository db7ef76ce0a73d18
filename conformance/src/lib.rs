//! # sage-conformance
//!
//! The one suite every backend of [`sage_core`] runs: golden trajectories recorded from the
//! authors' code, differential tests against a float64 reference, fused == composed,
//! multi-tensor == one at a time, resume == uninterrupted, quickcheck properties, non-finite
//! inputs and bad inputs. Every check is a plain public function generic over a backend with
//! sage-core's [`HostBuffers`](sage_core::HostBuffers) (see [`Harness`]);
//! [`conformance_tests!`] turns them all into `#[test]`s for a backend with one line.
//!
//! The suite depends on sage-core (and sage-checkpoint, itself on sage-core only): a backend
//! crate outside this project runs it without linking any of the project's backends. The
//! runner that knows every shipped backend is the separate package `sage-conformance-runner`
//! (`conformance/runner`, binary `sage-conformance`).
//!
//! ```ignore
//! // tests/conformance.rs of a crate whose backend's buffers are slices:
//! sage_core::slice_host_buffers!(MyBackend);          // the host-copy capability
//! sage_conformance::conformance_tests!(MyBackend::new()); // the whole suite
//! ```

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
