// Runs the norm kernels (the real source, through shim.h: one std::thread per CUDA thread for
// the chunk partials, whose block tree needs barriers and warp shuffles) on the CPU and checks
// the contract of sage_core::norm: a partial per 4096-element chunk, close to the exact sum of
// squares, depending on the chunk's contents only (the same bits at any alignment, in any
// launch, for any split of a buffer at chunk boundaries), non-finite exactly when the chunk
// holds NaN or +-Inf, finite for huge finite values; each tensor's norm the fold of its partials
// first to last, bit for bit; empty tensors 0.
#include <cstdio>
#include <random>
#include <vector>
#include "shim.h"
#include "kernel_source.cu"

static int failures = 0;
#define CHECK(cond, ...)                        \
    do {                                        \
        if (!(cond)) {                          \
            std::printf("FAIL: " __VA_ARGS__);  \
            std::printf("\n");                  \
            ++failures;                         \
        }                                       \
    } while (0)

static bool same_bits(double a, double b) { return std::memcmp(&a, &b, sizeof a) == 0; }

// One launch of the partials kernel over (pointer, length) pairs; the partials, back to back.
template <class E>
static std::vector<double> partials(const std::vector<std::pair<const typename E::T*, size_t>>& bufs) {
    std::vector<sage_tensor> ts;
    unsigned first = 0;
    for (auto& [p, n] : bufs) {
        sage_tensor t = {};
        t.grad = (sage_u64)(uintptr_t)p;
        t.n = n;
        t.first_chunk = first;
        first += (unsigned)((n + SAGE_NORM_CHUNK - 1) / SAGE_NORM_CHUNK);
        ts.push_back(t);
    }
    std::vector<double> out(first, -1.0);
    if (first == 0) return out;
    const sage_tensor* tp = ts.data();
    const unsigned count = (unsigned)ts.size();
    double* op = out.data();
    sage_emu_launch_threads(first, SAGE_NORM_THREADS, [=] { sage_norm_partials<E>(tp, count, op); });
    return out;
}

// The fold kernel over the same tables (serial launch: no barriers in it).
template <class E>
static std::vector<double> folded(const std::vector<std::pair<const typename E::T*, size_t>>& bufs,
                                  const std::vector<double>& parts) {
    std::vector<sage_tensor> ts;
    unsigned first = 0;
    for (auto& [p, n] : bufs) {
        sage_tensor t = {};
        t.grad = (sage_u64)(uintptr_t)p;
        t.n = n;
        t.first_chunk = first;
        first += (unsigned)((n + SAGE_NORM_CHUNK - 1) / SAGE_NORM_CHUNK);
        ts.push_back(t);
    }
    std::vector<double> out(ts.size(), -1.0);
    const sage_tensor* tp = ts.data();
    const unsigned count = (unsigned)ts.size();
    const double* pp = parts.data();
    double* op = out.data();
    // Fewer threads than tensors: the grid-stride loop covers the rest.
    sage_emu_launch_serial(2, 4, [=] { sage_norm_fold(tp, count, pp, op); });
    return out;
}

template <class E>
static void run(const char* name, float scale) {
    std::mt19937 rng(11);
    std::uniform_real_distribution<float> u(-scale, scale);
    // Magnitudes over 2^-10 .. 2^10, so that the order of additions shows in the bits.
    std::uniform_int_distribution<int> k(-10, 10);
    const size_t lens[] = {0, 1, 3, 4, 5, 4095, 4096, 4097, 0, 8192, 12291, 70001};
    const size_t nt = sizeof lens / sizeof lens[0];
    // Contents once; copies at element offsets 0, 1, 2 (1 and 2 break 16- and 8-byte alignment).
    std::vector<std::vector<typename E::T>> data;
    for (size_t n : lens) {
        std::vector<typename E::T> d;
        for (size_t i = 0; i < n; ++i) d.push_back(E::st(i % 7 == 3 ? 0.0f : std::ldexp(u(rng), k(rng))));
        data.push_back(d);
    }
    std::vector<std::vector<typename E::T>> store[3];
    std::vector<std::pair<const typename E::T*, size_t>> bufs[3];
    std::vector<double> parts[3];
    for (int off = 0; off < 3; ++off) {
        for (size_t t = 0; t < nt; ++t) {
            std::vector<typename E::T> s(off, E::st(7.0f));
            s.insert(s.end(), data[t].begin(), data[t].end());
            store[off].push_back(std::move(s));
        }
        for (size_t t = 0; t < nt; ++t) bufs[off].push_back({store[off][t].data() + off, lens[t]});
        parts[off] = partials<E>(bufs[off]);
    }
    CHECK(parts[0].size() == 1 + 1 + 1 + 1 + 1 + 1 + 2 + 2 + 4 + 18, "%s: %zu partials", name, parts[0].size());
    for (int off = 1; off < 3; ++off)
        for (size_t i = 0; i < parts[0].size(); ++i)
            CHECK(same_bits(parts[0][i], parts[off][i]), "%s: partial %zu differs at offset %d", name, i, off);
    // Close to the exact sum of squares, chunk by chunk.
    size_t at = 0;
    for (size_t t = 0; t < nt; ++t) {
        for (size_t c = 0; c * SAGE_NORM_CHUNK < lens[t]; ++c, ++at) {
            long double exact = 0;
            for (size_t i = c * SAGE_NORM_CHUNK; i < lens[t] && i < (c + 1) * SAGE_NORM_CHUNK; ++i) {
                const long double x = E::ld(data[t][i]);
                exact += x * x;
            }
            const double got = parts[0][at];
            CHECK(std::fabs((long double)got - exact) <= 1e-13L * exact, "%s: tensor %zu chunk %zu: %.17g vs %.17Lg", name, t,
                  c, got, exact);
        }
    }
    // Any split at chunk boundaries, in any launch, gives the same partials.
    std::vector<std::pair<const typename E::T*, size_t>> split;
    std::vector<double> want;
    at = 0;
    for (size_t t = 0; t < nt; ++t) {
        const size_t chunks = (lens[t] + SAGE_NORM_CHUNK - 1) / SAGE_NORM_CHUNK;
        const typename E::T* p = bufs[1][t].first;
        if (chunks > 1) {
            const size_t cut = (chunks / 2) * SAGE_NORM_CHUNK;  // a boundary inside the tensor
            split.push_back({p + cut, lens[t] - cut});
            split.push_back({p, cut});
            for (size_t c = chunks / 2; c < chunks; ++c) want.push_back(parts[0][at + c]);
            for (size_t c = 0; c < chunks / 2; ++c) want.push_back(parts[0][at + c]);
        } else {
            split.push_back({p, lens[t]});
            for (size_t c = 0; c < chunks; ++c) want.push_back(parts[0][at + c]);
        }
        at += chunks;
    }
    const std::vector<double> got = partials<E>(split);
    CHECK(got.size() == want.size(), "%s: split gives %zu partials", name, got.size());
    for (size_t i = 0; i < got.size() && i < want.size(); ++i)
        CHECK(same_bits(got[i], want[i]), "%s: split partial %zu differs", name, i);
    // A chunk copied into a buffer of its own.
    {
        std::vector<typename E::T> alone(data[nt - 1].begin() + 3 * SAGE_NORM_CHUNK, data[nt - 1].begin() + 4 * SAGE_NORM_CHUNK);
        const std::vector<double> one = partials<E>({{alone.data(), alone.size()}});
        CHECK(one.size() == 1 && same_bits(one[0], parts[0][parts[0].size() - 18 + 3]), "%s: a chunk alone differs", name);
    }
    // The fold: norm::fold's additions, first to last.
    const std::vector<double> norms = folded<E>(bufs[0], parts[0]);
    at = 0;
    for (size_t t = 0; t < nt; ++t) {
        double s = 0.0;
        for (size_t c = 0; c * SAGE_NORM_CHUNK < lens[t]; ++c) s += parts[0][at++];
        CHECK(same_bits(norms[t], s), "%s: tensor %zu folds to %.17g, not %.17g", name, t, norms[t], s);
        if (lens[t] == 0) CHECK(norms[t] == 0.0 && !std::signbit(norms[t]), "%s: empty tensor %zu", name, t);
    }
    std::printf("%s done\n", name);
}

// NaN and +-Inf make exactly their chunk's partial non-finite; huge finite values do not
// overflow.
static void non_finite() {
    const size_t n = 3 * SAGE_NORM_CHUNK + 5;
    const float bads[] = {NAN, INFINITY, -INFINITY};
    for (float bad : bads) {
        for (size_t where : {size_t(0), size_t(SAGE_NORM_CHUNK + 17), n - 1}) {
            std::vector<float> x(n, 0.5f);
            x[where] = bad;
            std::vector<double> p = partials<sage_tf32>({{x.data(), n}});
            for (size_t c = 0; c < p.size(); ++c) {
                const bool in = where / SAGE_NORM_CHUNK == c;
                CHECK(std::isfinite(p[c]) != in, "%g at %zu: partial %zu is %g", bad, where, c, p[c]);
                if (in && std::isnan(bad)) CHECK(std::isnan(p[c]), "NaN gives %g", p[c]);
                if (in && std::isinf(bad)) CHECK(std::isinf(p[c]) && p[c] > 0, "Inf gives %g", p[c]);
            }
            std::vector<unsigned short> h(n);
            for (size_t i = 0; i < n; ++i) h[i] = sage_tf16::st(x[i]);
            p = partials<sage_tf16>({{h.data(), n}});
            CHECK(!std::isfinite(p[where / SAGE_NORM_CHUNK]), "f16 %g at %zu", bad, where);
            for (size_t i = 0; i < n; ++i) h[i] = sage_tbf16::st(x[i]);
            p = partials<sage_tbf16>({{h.data(), n}});
            CHECK(!std::isfinite(p[where / SAGE_NORM_CHUNK]), "bf16 %g at %zu", bad, where);
        }
    }
    std::vector<float> big(SAGE_NORM_CHUNK, 3.0e38f);
    const std::vector<double> p = partials<sage_tf32>({{big.data(), big.size()}});
    const double want = 4096.0 * 3.0e38 * 3.0e38;
    CHECK(std::isfinite(p[0]) && std::fabs(p[0] - want) <= 1e-6 * want, "huge values: %g", p[0]);
    std::printf("non-finite done\n");
}

int main() {
    run<sage_tf32>("f32", 3.0f);
    run<sage_tf16>("f16", 0.05f);
    run<sage_tbf16>("bf16", 1e30f);
    non_finite();
    std::printf("%d failures\n", failures);
    return failures ? 1 : 0;
}
