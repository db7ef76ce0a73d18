// Host stand-ins for the CUDA built-ins the step kernels use, so the real kernel source runs on
// the CPU: a launch is a loop over blocks and, inside each, over threads one after another.
// Valid for kernels without barriers or shuffles (the step kernels; not the norm reduction).
#include <cmath>
#include <cstdint>
#include <cstring>
struct sage_dim { unsigned x; };
static sage_dim threadIdx, blockIdx, blockDim, gridDim;
#define __global__
#define __device__
#define __forceinline__ inline
#define __restrict__
#define __launch_bounds__(x)
#define __align__(n) alignas(n)
#define __shared__ static
static inline float __uint_as_float(unsigned u) { float f; std::memcpy(&f, &u, 4); return f; }
static inline unsigned __float_as_uint(float f) { unsigned u; std::memcpy(&u, &f, 4); return u; }
static inline float sage_emu_h2f(unsigned short h) { _Float16 t; std::memcpy(&t, &h, 2); return (float)t; }
static inline unsigned short sage_emu_f2h(float f) { _Float16 t = (_Float16)f; unsigned short h; std::memcpy(&h, &t, 2); return h; }
// Not run here (barriers, shuffles, atomics): only declared so the norm kernel compiles.
static inline void __syncthreads() {}
static inline void __threadfence() {}
static inline double __shfl_down_sync(unsigned, double x, int) { return x; }
static inline unsigned atomicAdd(unsigned* p, unsigned v) { unsigned o = *p; *p += v; return o; }
