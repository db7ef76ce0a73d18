//! The whole conformance suite on the portable CPU backend, as `#[test]`s.

sage_conformance::conformance_tests!(sage_cpu::Cpu);
