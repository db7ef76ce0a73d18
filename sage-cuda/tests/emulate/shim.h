// Host stand-ins for the CUDA built-ins the kernels use, so the real kernel source runs on the
// CPU. Two ways to launch:
// - sage_emu_launch_serial: a loop over blocks and, inside each, over threads one after
//   another; for kernels without barriers or shuffles (the step kernels, the norm fold);
// - sage_emu_launch_threads: one std::thread per CUDA thread, blocks one after another, with
//   __syncthreads a barrier of the block and __shfl_down_sync an exchange through a barrier of
//   the warp (every lane of a warp calls it together, as the kernels do); for the norm's chunk
//   partials.
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <thread>
#include <vector>
struct sage_dim { unsigned x; };
static thread_local sage_dim threadIdx, blockIdx;
static sage_dim blockDim, gridDim;
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

// The step kernels' counter: a serial launch runs one thread at a time, so a plain add is atomic.
static inline unsigned long long atomicAdd(unsigned long long* a, unsigned long long x) {
    const unsigned long long old = *a;
    *a = old + x;
    return old;
}

// Barriers of the threaded launch (none in a serial one, where no kernel may use them).
static std::barrier<>* sage_emu_block_barrier = nullptr;
static std::vector<std::unique_ptr<std::barrier<>>> sage_emu_warp_barriers;
static double sage_emu_exchange[1024];

static inline void __syncthreads() {
    if (!sage_emu_block_barrier) std::abort();
    sage_emu_block_barrier->arrive_and_wait();
}

static inline double __shfl_down_sync(unsigned, double x, int offset) {
    if (!sage_emu_block_barrier) std::abort();
    const unsigned t = threadIdx.x, lane = t & 31u;
    std::barrier<>& warp = *sage_emu_warp_barriers[t >> 5];
    sage_emu_exchange[t] = x;
    warp.arrive_and_wait();
    // A source lane past the warp's end reads the caller's own value, as on the device.
    const double y = (lane + offset < 32u && t + offset < blockDim.x) ? sage_emu_exchange[t + offset] : x;
    warp.arrive_and_wait();
    return y;
}

template <class F> static void sage_emu_launch_serial(unsigned blocks, unsigned threads, F body) {
    gridDim.x = blocks; blockDim.x = threads;
    for (unsigned b = 0; b < blocks; ++b) {
        blockIdx.x = b;
        for (unsigned t = 0; t < threads; ++t) { threadIdx.x = t; body(); }
    }
}

template <class F> static void sage_emu_launch_threads(unsigned blocks, unsigned threads, F body) {
    if (threads % 32u != 0 || threads > 1024u) std::abort();  // whole warps, as the kernels launch
    gridDim.x = blocks; blockDim.x = threads;
    std::barrier<> block(threads);
    sage_emu_block_barrier = &block;
    sage_emu_warp_barriers.clear();
    for (unsigned w = 0; w < threads / 32u; ++w) sage_emu_warp_barriers.emplace_back(new std::barrier<>(32));
    std::vector<std::thread> pool;
    for (unsigned t = 0; t < threads; ++t) {
        pool.emplace_back([&, t] {
            threadIdx.x = t;
            for (unsigned b = 0; b < blocks; ++b) {
                blockIdx.x = b;
                body();
                block.arrive_and_wait();  // the block's shared memory is reused by the next
            }
        });
    }
    for (auto& th : pool) th.join();
    sage_emu_block_barrier = nullptr;
}
