// Runs the multi-tensor and single-tensor step kernels (the real source, through shim.h) on the
// CPU and checks them element for element against a plain loop over the shared body's
// per-element functions: every tail, unaligned buffers, absent state, all storage pairs; and
// each tensor's count of non-finite stored parameters against the reference's (planted NaN and
// +-Inf parameters, and a value that is +Inf once stored as f16).
#include <cstdio>
#include <vector>
#include <random>
#include "shim.h"
#include "kernel_source.cu"

template <class E> typename E::T enc(float x) { return E::st(x); }

static void launch(unsigned blocks, unsigned threads, void (*body)()) { sage_emu_launch_serial(blocks, threads, body); }

static int failures = 0;

template <class P, class S>
struct Case {
    std::vector<typename P::T> p, g; std::vector<typename S::T> m, v, ib;
};

// Reference: formula::step, element by element; returns how many stored parameters are NaN
// or +-Inf.
template <class P, class S>
static sage_u64 reference(const sage_coeffs& k, Case<P, S>& c, size_t off, size_t n, bool hm, bool hv, bool hi) {
    sage_u64 bad = 0;
    for (size_t i = off; i < off + n; ++i) {
        float th = P::ld(c.p[i]), gr = P::ld(c.g[i]);
        float mf = 0, vf = 0, bf = 0;
        if (hm) { c.m[i] = S::st(sage_accumulate(k, SAGE_ACC_MOMENT, S::ld(c.m[i]), th, gr)); mf = S::ld(c.m[i]); }
        if (hv) { c.v[i] = S::st(sage_accumulate(k, sage_second_kind(k), S::ld(c.v[i]), th, gr)); vf = S::ld(c.v[i]); }
        if (hi) { c.ib[i] = S::st(sage_accumulate(k, SAGE_ACC_SENSITIVITY, S::ld(c.ib[i]), th, gr)); bf = S::ld(c.ib[i]); }
        c.p[i] = P::st(sage_apply(k, th, gr, mf, vf, bf));
        if (!std::isfinite(P::ld(c.p[i]))) ++bad;
    }
    return bad;
}

template <class T> static bool same(const std::vector<T>& a, const std::vector<T>& b) {
    return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * sizeof(T)) == 0;
}

static const sage_coeffs* g_coeffs; static const sage_tensor* g_tensors; static const sage_chunk_desc* g_chunks;
static sage_u64* g_counts;

template <class P, class S> static void mt_body() { sage_mt_step<P, S>(g_coeffs, g_tensors, g_chunks, g_counts); }
static sage_coeffs g_k; static sage_u64 g_a[5], g_n;
template <class P, class S> static void step1_body() { sage_step1<P, S>(g_k, g_a[0], g_a[1], g_a[2], g_a[3], g_a[4], g_n, g_counts); }

template <class P, class S>
static void run(const char* name, unsigned kind, unsigned flags, bool hm, bool hv, bool hi) {
    std::mt19937 rng(7);
    std::uniform_real_distribution<float> u(-1.f, 1.f);
    const size_t lens[] = {0, 1, 3, 4, 5, 7, 8, 9, 4097, 65535, 65536, 65537, 200003};
    const size_t offs[] = {0, 1, 2};  // element offsets: 1 and 2 break 16-byte (and 8-byte) alignment
    sage_coeffs k = {};
    k.kind = kind; k.flags = flags; k.modulation = SAGE_MOD_SAGE;
    k.grad_scale = 0.75f; k.l2 = 0.01f; k.beta1 = 0.9f; k.alpha1 = 0.1f; k.beta2 = 0.999f; k.alpha2 = 0.001f;
    k.beta0 = 0.8f; k.alpha0 = 0.2f; k.momentum = 0.9f; k.ibar_div = 0.8f; k.eps_num = 1e-6f; k.eps_den = 1e-6f;
    k.step = 1e-3f; k.denom_scale = 1.1f; k.denom_eps = 1e-8f; k.inf_eps = 1e-8f; k.pre_keep = 0.999f; k.post_decay = 1e-5f;
    for (int mode = 0; mode < 2; ++mode) {  // 0: multi-tensor, 1: one tensor at a time
        for (size_t off : offs) {
            std::vector<Case<P, S>> cs; std::vector<Case<P, S>> ref;
            for (size_t n : lens) {
                Case<P, S> c; size_t tot = n + off;
                for (size_t i = 0; i < tot; ++i) {
                    c.p.push_back(enc<P>(u(rng))); c.g.push_back(enc<P>(u(rng) * 0.1f));
                    c.m.push_back(enc<S>(u(rng) * 0.01f)); c.v.push_back(enc<S>(std::fabs(u(rng)) * 1e-4f));
                    c.ib.push_back(enc<S>(std::fabs(u(rng)) * 0.01f));
                }
                // Non-finite parameters planted at a few places (vector lanes, tails, later
                // chunks), and 1e5: +Inf stored as f16, finite in bf16 and f32.
                const float planted[] = {NAN, INFINITY, -INFINITY, 1e5f};
                const size_t at[] = {0, 2, 5, 4096, 65536, 131075, 200000};
                for (size_t j = 0; j < sizeof at / sizeof at[0]; ++j)
                    if (at[j] < n) c.p[off + at[j]] = enc<P>(planted[j % 4]);
                cs.push_back(c);
            }
            ref = cs;
            std::vector<sage_u64> want(cs.size()), counts(cs.size(), 0);
            for (size_t t = 0; t < cs.size(); ++t) want[t] = reference<P, S>(k, ref[t], off, lens[t], hm, hv, hi);
            // The runs at offset 1 pass no counter: the kernels must step the same without one.
            g_counts = off == 1 ? nullptr : counts.data();
            auto addr = [&](void* p, bool on) -> sage_u64 { return on ? (sage_u64)(uintptr_t)p : 0; };
            if (mode == 0) {
                std::vector<sage_tensor> ts; std::vector<sage_chunk_desc> ch; unsigned first = 0;
                for (size_t t = 0; t < cs.size(); ++t) {
                    auto& c = cs[t]; size_t n = lens[t];
                    sage_tensor e = {};
                    e.param = addr(c.p.data() + off, true); e.grad = addr(c.g.data() + off, true);
                    e.m = addr(c.m.data() + off, hm); e.v = addr(c.v.data() + off, hv); e.ibar = addr(c.ib.data() + off, hi);
                    e.n = n; e.coeff = 0; e.first_chunk = first;
                    unsigned nc = (unsigned)((n + SAGE_CHUNK - 1) / SAGE_CHUNK);
                    for (unsigned j = 0; j < nc; ++j) ch.push_back({(unsigned)t, j});
                    first += nc; ts.push_back(e);
                }
                g_coeffs = &k; g_tensors = ts.data(); g_chunks = ch.data();
                launch((unsigned)ch.size(), SAGE_THREADS, mt_body<P, S>);
            } else {
                for (size_t t = 0; t < cs.size(); ++t) {
                    auto& c = cs[t]; size_t n = lens[t]; if (!n) continue;
                    g_k = k; g_n = n;
                    g_a[0] = addr(c.p.data() + off, true); g_a[1] = addr(c.g.data() + off, true);
                    g_a[2] = addr(c.m.data() + off, hm); g_a[3] = addr(c.v.data() + off, hv); g_a[4] = addr(c.ib.data() + off, hi);
                    g_counts = off == 1 ? nullptr : counts.data() + t;
                    launch((unsigned)((n + SAGE_CHUNK - 1) / SAGE_CHUNK), SAGE_THREADS, step1_body<P, S>);
                }
            }
            for (size_t t = 0; t < cs.size(); ++t) {
                const sage_u64 got = counts[t], exp = off == 1 ? 0 : want[t];
                if (got != exp) {
                    std::printf("COUNT %s %s offset %zu length %zu: %llu non-finite, expected %llu\n", name,
                                mode ? "step1" : "mt_step", off, lens[t], got, exp);
                    ++failures;
                }
            }
            // The planted values reach the stored parameters (the check above is not vacuous).
            if (off == 0 && want.back() < 4) {
                std::printf("VACUOUS %s: %llu non-finite in the longest tensor\n", name, want.back());
                ++failures;
            }
            for (size_t t = 0; t < cs.size(); ++t) {
                if (!same(cs[t].p, ref[t].p) || !same(cs[t].m, ref[t].m) || !same(cs[t].v, ref[t].v) || !same(cs[t].ib, ref[t].ib)) {
                    std::printf("MISMATCH %s %s offset %zu length %zu\n", name, mode ? "step1" : "mt_step", off, lens[t]);
                    ++failures;
                }
            }
        }
    }
    std::printf("%s done\n", name);
}

int main() {
    run<sage_tf32, sage_tf32>("adam-sage f32/f32", SAGE_KIND_ADAM, SAGE_FLAG_SAGE, true, true, true);
    run<sage_tbf16, sage_tf32>("adam-sage bf16/f32", SAGE_KIND_ADAM, SAGE_FLAG_SAGE, true, true, true);
    run<sage_tf16, sage_tf32>("adam-sage f16/f32", SAGE_KIND_ADAM, SAGE_FLAG_SAGE, true, true, true);
    run<sage_tf32, sage_tbf16>("adam-sage f32/bf16", SAGE_KIND_ADAM, SAGE_FLAG_SAGE, true, true, true);
    run<sage_tbf16, sage_tbf16>("adam-sage bf16/bf16", SAGE_KIND_ADAM, SAGE_FLAG_SAGE, true, true, true);
    run<sage_tf16, sage_tf16>("adamax f16/f16", SAGE_KIND_ADAMAX, SAGE_FLAG_SAGE, true, true, true);
    run<sage_tf32, sage_tf32>("adam plain f32/f32 (no ibar)", SAGE_KIND_ADAM, 0, true, true, false);
    run<sage_tf32, sage_tf32>("sgd-sage no momentum (ibar only)", SAGE_KIND_SGD, SAGE_FLAG_SAGE, false, false, true);
    run<sage_tf32, sage_tf32>("sgd plain (no state)", SAGE_KIND_SGD, 0, false, false, false);
    run<sage_tbf16, sage_tf16>("sgd momentum bf16/f16", SAGE_KIND_SGD, SAGE_FLAG_SAGE | SAGE_FLAG_MOMENTUM, true, false, true);
    std::printf("%d failures\n", failures);
    return failures ? 1 : 0;
}
