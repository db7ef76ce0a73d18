/*
 * CUDA prelude of the shared kernel body (sage-core/kernels/sage_step.h): what that body needs
 * from the language. Compiled by NVRTC with --fmad=false, so a*b+c is not contracted into an
 * FMA and every value matches the CPU formula (sage-core/src/formula.rs) bit for bit.
 */
#define SAGE_FN static __device__ __forceinline__
#define SAGE_U32 unsigned int
#define SAGE_U16 unsigned short
#define sage_bits_to_f32(u) __uint_as_float(u)
#define sage_f32_to_bits(x) __float_as_uint(x)
