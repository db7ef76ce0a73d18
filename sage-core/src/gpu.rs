//! The GPU kernel source shared by the CUDA and OpenCL backends: one kernel body, written in the
//! common subset of CUDA C and OpenCL C, behind a small prelude per language. It mirrors
//! [`formula`](crate::formula) and reads [`Coeffs`](crate::Coeffs) with the same layout.

/// The shared kernel body (`kernels/sage_step.h`), without a language prelude.
pub const KERNEL_BODY: &str = include_str!("../kernels/sage_step.h");
