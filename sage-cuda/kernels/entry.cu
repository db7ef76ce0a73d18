/*
 * sage-cuda's entry kernels, after the prelude and the shared body: storage types, the
 * chunked multi-tensor step, the single-tensor step, the two primitives and the squared norms
 * on sage_core's chunk grid (all tensors' chunk partials in one launch, folded per tensor). Host-side layouts: sage-cuda/src/plan.rs.
 */
#define SAGE_CHUNK 65536u
#define SAGE_THREADS 512

typedef unsigned long long sage_u64;

/* One tensor of a multi-tensor launch (64 bytes; plan.rs writes it). Absent buffers are 0. */
typedef struct {
    sage_u64 param, grad, m, v, ibar, n;
    SAGE_U32 coeff;       /* index into the launch's coefficient table */
    SAGE_U32 first_chunk; /* its first chunk in the chunk table (norms: its first partial) */
    sage_u64 reserved;
} sage_tensor;

/* One block's work: chunk `chunk` (SAGE_CHUNK elements) of tensor `tensor`. */
typedef struct {
    SAGE_U32 tensor, chunk;
} sage_chunk_desc;

static_assert(sizeof(sage_coeffs) == 96, "sage_coeffs must match sage_core::Coeffs");
static_assert(sizeof(sage_tensor) == 64, "sage_tensor must match plan.rs");
static_assert(sizeof(sage_chunk_desc) == 8, "sage_chunk_desc must match plan.rs");

/* Four elements moved by one load: 16 bytes of f32, 8 bytes of a 16-bit type. */
struct __align__(16) sage_v4f { float x[4]; };
struct __align__(8) sage_v4h { unsigned short x[4]; };

/* Storage types: T is what a buffer holds, V four of them; ld widens exactly, st rounds
 * to nearest even once. */
struct sage_tf32 {
    typedef float T;
    typedef sage_v4f V;
    static __device__ __forceinline__ float ld(T x) { return x; }
    static __device__ __forceinline__ T st(float x) { return x; }
};
struct sage_tf16 {
    typedef unsigned short T;
    typedef sage_v4h V;
    static __device__ __forceinline__ float ld(T h) {
        float f;
        asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
        return f;
    }
    static __device__ __forceinline__ T st(float f) {
        unsigned short h;
        asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f));
        return h;
    }
};
struct sage_tbf16 {
    typedef unsigned short T;
    typedef sage_v4h V;
    static __device__ __forceinline__ float ld(T b) { return sage_bf16_to_f32(b); }
    static __device__ __forceinline__ T st(float x) { return sage_f32_to_bf16(x); }
};

template <class E> __device__ __forceinline__ bool sage_aligned(const void* p) {
    return (((sage_u64)p) % sizeof(typename E::V)) == 0;
}

/* One element's whole step (formula::step): advances the present state values, rounding each
 * to storage once, then returns the updated parameter in f32. */
template <class S>
__device__ __forceinline__ float sage_elem(const sage_coeffs& k, int second, float th, float gr,
                                           bool hm, bool hv, bool hi,
                                           typename S::T& m, typename S::T& v, typename S::T& ib) {
    float mf = 0.0f, vf = 0.0f, bf = 0.0f;
    if (hm) {
        m = S::st(sage_accumulate(k, SAGE_ACC_MOMENT, S::ld(m), th, gr));
        mf = S::ld(m);
    }
    if (hv) {
        v = S::st(sage_accumulate(k, second, S::ld(v), th, gr));
        vf = S::ld(v);
    }
    if (hi) {
        ib = S::st(sage_accumulate(k, SAGE_ACC_SENSITIVITY, S::ld(ib), th, gr));
        bf = S::ld(ib);
    }
    return sage_apply(k, th, gr, mf, vf, bf);
}

/* The fused step over one chunk of `len` (<= SAGE_CHUNK) elements, by the whole block.
 * 32-bit indices; four elements per load where every buffer is aligned, one at a time for
 * the tail and for unaligned buffers. Returns how many of this thread's stored parameters are
 * NaN or +-Inf (read back from storage, so an f32 that overflows f16 counts), taken from the
 * registers the store writes: no extra memory traffic. */
template <class P, class S>
__device__ __forceinline__ unsigned sage_chunk_step(const sage_coeffs& k,
                                                typename P::T* __restrict__ param,
                                                const typename P::T* __restrict__ grad,
                                                typename S::T* __restrict__ m,
                                                typename S::T* __restrict__ v,
                                                typename S::T* __restrict__ ib,
                                                unsigned len) {
    const int second = sage_second_kind(k);
    const bool hm = m != 0, hv = v != 0, hi = ib != 0;
    unsigned start = 0, bad = 0;
    if (sage_aligned<P>(param) && sage_aligned<P>(grad) && (!hm || sage_aligned<S>(m)) &&
        (!hv || sage_aligned<S>(v)) && (!hi || sage_aligned<S>(ib))) {
        const unsigned len4 = len & ~3u;
        for (unsigned i = threadIdx.x * 4u; i < len4; i += blockDim.x * 4u) {
            typename P::V pv = *reinterpret_cast<const typename P::V*>(param + i);
            const typename P::V gv = *reinterpret_cast<const typename P::V*>(grad + i);
            typename S::V mv = {}, vv = {}, iv = {};
            if (hm) mv = *reinterpret_cast<const typename S::V*>(m + i);
            if (hv) vv = *reinterpret_cast<const typename S::V*>(v + i);
            if (hi) iv = *reinterpret_cast<const typename S::V*>(ib + i);
#pragma unroll
            for (int j = 0; j < 4; ++j) {
                pv.x[j] = P::st(sage_elem<S>(k, second, P::ld(pv.x[j]), P::ld(gv.x[j]), hm, hv, hi,
                                             mv.x[j], vv.x[j], iv.x[j]));
                bad += sage_non_finite(P::ld(pv.x[j]));
            }
            if (hm) *reinterpret_cast<typename S::V*>(m + i) = mv;
            if (hv) *reinterpret_cast<typename S::V*>(v + i) = vv;
            if (hi) *reinterpret_cast<typename S::V*>(ib + i) = iv;
            *reinterpret_cast<typename P::V*>(param + i) = pv;
        }
        start = len4;
    }
    for (unsigned i = start + threadIdx.x; i < len; i += blockDim.x) {
        typename S::T ms = hm ? m[i] : (typename S::T)0;
        typename S::T vs = hv ? v[i] : (typename S::T)0;
        typename S::T is = hi ? ib[i] : (typename S::T)0;
        const float out = sage_elem<S>(k, second, P::ld(param[i]), P::ld(grad[i]), hm, hv, hi, ms, vs, is);
        if (hm) m[i] = ms;
        if (hv) v[i] = vs;
        if (hi) ib[i] = is;
        const typename P::T stored = P::st(out);
        param[i] = stored;
        bad += sage_non_finite(P::ld(stored));
    }
    return bad;
}

/* Adds one thread's count of non-finite parameters to its tensor's counter (`counts` null: not
 * counted). Non-finite values are rare, so the atomic is too: a thread with none skips it, and
 * one that has some adds them once per chunk (at most SAGE_CHUNK / SAGE_THREADS values). */
__device__ __forceinline__ void sage_count(sage_u64* counts, unsigned bad) {
    if (counts && bad) atomicAdd(counts, (sage_u64)bad);
}

template <class E> __device__ __forceinline__ typename E::T* sage_at(sage_u64 p, sage_u64 off) {
    return p ? reinterpret_cast<typename E::T*>(p) + off : (typename E::T*)0;
}

/* Multi-tensor step: block b steps chunk b of the chunk table; counts[t] (when not null, zeroed
 * before the launch) receives tensor t's non-finite stored parameters. */
template <class P, class S>
__device__ __forceinline__ void sage_mt_step(const sage_coeffs* __restrict__ coeffs,
                                             const sage_tensor* __restrict__ tensors,
                                             const sage_chunk_desc* __restrict__ chunks,
                                             sage_u64* __restrict__ counts) {
    const sage_chunk_desc c = chunks[blockIdx.x];
    const sage_tensor t = tensors[c.tensor];
    const sage_coeffs k = coeffs[t.coeff];
    const sage_u64 base = (sage_u64)c.chunk * SAGE_CHUNK;
    if (base >= t.n) return;
    const sage_u64 rest = t.n - base;
    const unsigned len = rest < SAGE_CHUNK ? (unsigned)rest : SAGE_CHUNK;
    const unsigned bad = sage_chunk_step<P, S>(k, sage_at<P>(t.param, base), sage_at<P>(t.grad, base),
                                               sage_at<S>(t.m, base), sage_at<S>(t.v, base),
                                               sage_at<S>(t.ibar, base), len);
    sage_count(counts ? counts + c.tensor : (sage_u64*)0, bad);
}

/* One tensor, coefficients and pointers as kernel parameters (no upload): block b steps
 * elements [b*SAGE_CHUNK, (b+1)*SAGE_CHUNK); *count (when not null, zeroed before the launch)
 * receives its non-finite stored parameters. */
template <class P, class S>
__device__ __forceinline__ void sage_step1(const sage_coeffs& k, sage_u64 param, sage_u64 grad, sage_u64 m,
                                           sage_u64 v, sage_u64 ibar, sage_u64 n, sage_u64* count) {
    const sage_u64 base = (sage_u64)blockIdx.x * SAGE_CHUNK;
    if (base >= n) return;
    const sage_u64 rest = n - base;
    const unsigned len = rest < SAGE_CHUNK ? (unsigned)rest : SAGE_CHUNK;
    const unsigned bad = sage_chunk_step<P, S>(k, sage_at<P>(param, base), sage_at<P>(grad, base),
                                               sage_at<S>(m, base), sage_at<S>(v, base),
                                               sage_at<S>(ibar, base), len);
    sage_count(count, bad);
}

/* Primitive: one EMA pass over a state buffer (grid-stride, 64-bit indices). */
template <class P, class S>
__device__ __forceinline__ void sage_accumulate_pass(const sage_coeffs& k, int which, sage_u64 acc, sage_u64 param,
                                                     sage_u64 grad, sage_u64 n) {
    typename S::T* a = reinterpret_cast<typename S::T*>(acc);
    const typename P::T* p = reinterpret_cast<const typename P::T*>(param);
    const typename P::T* g = reinterpret_cast<const typename P::T*>(grad);
    const sage_u64 stride = (sage_u64)gridDim.x * blockDim.x;
    for (sage_u64 i = (sage_u64)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {
        a[i] = S::st(sage_accumulate(k, which, S::ld(a[i]), P::ld(p[i]), P::ld(g[i])));
    }
}

/* Primitive: the parameter update from state already advanced; absent state reads as 0. */
template <class P, class S>
__device__ __forceinline__ void sage_apply_pass(const sage_coeffs& k, sage_u64 param, sage_u64 grad, sage_u64 m,
                                                sage_u64 v, sage_u64 ibar, sage_u64 n) {
    typename P::T* p = reinterpret_cast<typename P::T*>(param);
    const typename P::T* g = reinterpret_cast<const typename P::T*>(grad);
    const typename S::T* ms = reinterpret_cast<const typename S::T*>(m);
    const typename S::T* vs = reinterpret_cast<const typename S::T*>(v);
    const typename S::T* is = reinterpret_cast<const typename S::T*>(ibar);
    const sage_u64 stride = (sage_u64)gridDim.x * blockDim.x;
    for (sage_u64 i = (sage_u64)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {
        p[i] = P::st(sage_apply(k, P::ld(p[i]), P::ld(g[i]), ms ? S::ld(ms[i]) : 0.0f,
                                vs ? S::ld(vs[i]) : 0.0f, is ? S::ld(is[i]) : 0.0f));
    }
}

/* Sum over the block in a fixed order (deterministic); the result is valid in thread 0. */
__device__ __forceinline__ double sage_block_sum(double x, double* smem) {
    for (int o = 16; o > 0; o >>= 1) x += __shfl_down_sync(0xffffffffu, x, o);
    const unsigned lane = threadIdx.x & 31u, warp = threadIdx.x >> 5;
    if (lane == 0) smem[warp] = x;
    __syncthreads();
    const unsigned warps = (blockDim.x + 31u) >> 5;
    x = threadIdx.x < warps ? smem[threadIdx.x] : 0.0;
    if (warp == 0) {
        for (int o = 16; o > 0; o >>= 1) x += __shfl_down_sync(0xffffffffu, x, o);
    }
    __syncthreads();
    return x;
}

/* Squared norms on sage_core's chunk grid (sage_core::norm): a tensor is cut into chunks of
 * SAGE_NORM_CHUNK elements from its first element; each chunk's partial sum of squares is one
 * f64, computed by one block of SAGE_NORM_THREADS threads; a tensor's squared norm is its
 * partials added first to last. */
#define SAGE_NORM_CHUNK 4096u
#define SAGE_NORM_THREADS 256
static_assert(SAGE_NORM_CHUNK % (4u * SAGE_NORM_THREADS) == 0, "whole quads per thread");

/* Sum of squares of one chunk of `len` (<= SAGE_NORM_CHUNK) elements, by the whole block, in
 * f64 (each square is exact there: it cannot overflow, and NaN or +-Inf propagate). Thread t
 * adds the quads t, t + T, t + 2T, ... (elements 4q .. 4q + 3, in order), loaded four at a
 * time where the chunk is aligned and one at a time otherwise: the same additions in the same
 * order either way, and then the same block tree, so the partial depends on the chunk's
 * contents only, never on where it lies in memory or which launch computes it. Valid in
 * thread 0. */
template <class E>
__device__ __forceinline__ double sage_chunk_sq(const typename E::T* __restrict__ x, unsigned len, double* smem) {
    const bool vec = sage_aligned<E>(x);
    double acc = 0.0;
    for (unsigned i = threadIdx.x * 4u; i < len; i += blockDim.x * 4u) {
        if (vec && i + 4u <= len) {
            const typename E::V v = *reinterpret_cast<const typename E::V*>(x + i);
#pragma unroll
            for (int j = 0; j < 4; ++j) {
                const double d = (double)E::ld(v.x[j]);
                acc += d * d;
            }
        } else {
            for (unsigned j = i; j < i + 4u && j < len; ++j) {
                const double d = (double)E::ld(x[j]);
                acc += d * d;
            }
        }
    }
    return sage_block_sum(acc, smem);
}

/* The chunk partials of `count` (>= 1) tensors' `grad` buffers in one launch, back to back in
 * tensor order (sage_core's Backend::grad_norm_partials): block b writes partials[b], a chunk
 * of the last tensor whose first partial (`first_chunk`, counted in norm chunks here) is <= b.
 * An empty tensor has no partial and is never that last one. */
template <class E>
__device__ __forceinline__ void sage_norm_partials(const sage_tensor* __restrict__ tensors, unsigned count,
                                                   double* __restrict__ partials) {
    __shared__ double smem[32];
    const unsigned b = blockIdx.x;
    unsigned lo = 0, hi = count - 1u;
    while (lo < hi) {
        const unsigned mid = lo + (hi - lo + 1u) / 2u;
        if (tensors[mid].first_chunk <= b) lo = mid;
        else hi = mid - 1u;
    }
    const sage_tensor t = tensors[lo];
    const sage_u64 base = (sage_u64)(b - t.first_chunk) * SAGE_NORM_CHUNK;
    const sage_u64 rest = t.n - base;
    const unsigned len = rest < SAGE_NORM_CHUNK ? (unsigned)rest : SAGE_NORM_CHUNK;
    const double s = sage_chunk_sq<E>(reinterpret_cast<const typename E::T*>(t.grad) + base, len, smem);
    if (threadIdx.x == 0) partials[b] = s;
}

/* Each tensor's squared norm: its partials added in f64 from the first chunk to the last, as
 * sage_core::norm::fold does (the same IEEE additions in the same order: the same bits); an
 * empty tensor gets 0. One thread per tensor, after sage_norm_partials on the same stream. */
__device__ __forceinline__ void sage_norm_fold(const sage_tensor* __restrict__ tensors, unsigned count,
                                               const double* __restrict__ partials, double* __restrict__ out) {
    for (unsigned i = blockIdx.x * blockDim.x + threadIdx.x; i < count; i += gridDim.x * blockDim.x) {
        const sage_tensor t = tensors[i];
        const sage_u64 chunks = (t.n + SAGE_NORM_CHUNK - 1u) / SAGE_NORM_CHUNK;
        const double* p = partials + t.first_chunk;
        double s = 0.0;
        for (sage_u64 c = 0; c < chunks; ++c) s += p[c];
        out[i] = s;
    }
}

/* extern "C" entry points, instantiated per storage combination by the lines kernels.rs
 * appends (one NVRTC program per combination, compiled when first used): names are
 * `<kernel>_<P>_<S>`, and `sage_norm_partials_<E>` and `sage_norm_fold_<E>`. */
#define SAGE_ENTRIES(PN, PT, SN, ST)                                                                      \
    extern "C" __global__ void __launch_bounds__(SAGE_THREADS)                                           \
        sage_mt_step_##PN##_##SN(const sage_coeffs* coeffs, const sage_tensor* tensors,                  \
                                 const sage_chunk_desc* chunks, sage_u64* counts) {                      \
        sage_mt_step<PT, ST>(coeffs, tensors, chunks, counts);                                           \
    }                                                                                                    \
    extern "C" __global__ void __launch_bounds__(SAGE_THREADS)                                           \
        sage_step1_##PN##_##SN(const sage_coeffs k, sage_u64 param, sage_u64 grad, sage_u64 m,           \
                               sage_u64 v, sage_u64 ibar, sage_u64 n, sage_u64* count) {                 \
        sage_step1<PT, ST>(k, param, grad, m, v, ibar, n, count);                                        \
    }                                                                                                    \
    extern "C" __global__ void sage_accumulate_##PN##_##SN(const sage_coeffs k, int which, sage_u64 acc, \
                                                            sage_u64 param, sage_u64 grad, sage_u64 n) { \
        sage_accumulate_pass<PT, ST>(k, which, acc, param, grad, n);                                     \
    }                                                                                                    \
    extern "C" __global__ void sage_apply_##PN##_##SN(const sage_coeffs k, sage_u64 param, sage_u64 grad, \
                                                       sage_u64 m, sage_u64 v, sage_u64 ibar, sage_u64 n) { \
        sage_apply_pass<PT, ST>(k, param, grad, m, v, ibar, n);                                          \
    }

#define SAGE_NORM_ENTRY(EN, ET)                                                                   \
    extern "C" __global__ void __launch_bounds__(SAGE_NORM_THREADS)                              \
        sage_norm_partials_##EN(const sage_tensor* tensors, unsigned count, double* partials) {  \
        sage_norm_partials<ET>(tensors, count, partials);                                        \
    }                                                                                            \
    extern "C" __global__ void sage_norm_fold_##EN(const sage_tensor* tensors, unsigned count,    \
                                                   const double* partials, double* out) {        \
        sage_norm_fold(tensors, count, partials, out);                                           \
    }
