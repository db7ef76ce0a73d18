//! The whole conformance suite (every trajectory file, every check) on the outsider's backend.

sage_conformance::conformance_tests!(third_party_backend::Outsider);
