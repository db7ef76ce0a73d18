//! The whole conformance suite on sage-cpu's SIMD backend at the best level of the machine
//! (AVX-512, AVX2 or NEON), split across three threads with small chunks so that even the
//! suite's short tensors cross thread boundaries.

sage_conformance::conformance_tests!(sage_cpu::SimdCpu::new()
    .threads(3)
    .min_parallel(0)
    .chunk(16));
