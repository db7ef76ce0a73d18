/*
 * SAGE's per-element update for GPUs: the body shared by the CUDA and OpenCL backends.
 * It is the device form of sage-core/src/formula.rs (same names, same order of operations)
 * and reads `sage_coeffs`, the layout of `sage_core::Coeffs` (#[repr(C)], 4-byte fields).
 *
 * The including backend provides a prelude that defines, before this file:
 *   SAGE_FN           qualifier of device helper functions (CUDA: `static __device__ __forceinline__`,
 *                     OpenCL: `static inline`)
 *   SAGE_U32          a 32-bit unsigned integer type (CUDA: `unsigned int`, OpenCL: `uint`)
 *   SAGE_U16          a 16-bit unsigned integer type (CUDA: `unsigned short`, OpenCL: `ushort`)
 *   sage_bits_to_f32(u), sage_f32_to_bits(x)   reinterpret casts (CUDA: __uint_as_float /
 *                     __float_as_uint, OpenCL: as_float / as_uint)
 *   sqrtf, fabsf, fmaxf   single-precision math (OpenCL's built-ins are sqrt, fabs, fmax)
 * and its own f16 conversions; the entry kernels (indexing, multi-tensor chunking, storage
 * types) live with each backend.
 */
#ifndef SAGE_STEP_H
#define SAGE_STEP_H

/* sage_core::coeffs::kind */
#define SAGE_KIND_SGD 0u
#define SAGE_KIND_ADAM 1u
#define SAGE_KIND_ADAMAX 2u
/* sage_core::coeffs::flags */
#define SAGE_FLAG_SAGE 1u
#define SAGE_FLAG_NESTEROV 2u
#define SAGE_FLAG_MOMENTUM 4u
/* sage_core::Modulation */
#define SAGE_MOD_SAGE 0u
#define SAGE_MOD_IMPORTANCE_TIMES_VARIATION 1u
#define SAGE_MOD_IMPORTANCE_OVER_VARIATION 2u
#define SAGE_MOD_IMPORTANCE 3u
#define SAGE_MOD_INVERSE_IMPORTANCE 4u
#define SAGE_MOD_VARIATION 5u
/* sage_core::Accumulate */
#define SAGE_ACC_MOMENT 0
#define SAGE_ACC_SECOND_MOMENT 1
#define SAGE_ACC_INF_NORM 2
#define SAGE_ACC_SENSITIVITY 3

typedef struct {
    SAGE_U32 kind, flags, modulation, reserved;
    float grad_scale, l2;
    float beta1, alpha1, beta2, alpha2, beta0, alpha0;
    float momentum, ibar_div, eps_num, eps_den;
    float step, denom_scale, denom_eps, inf_eps;
    float in_step_decay, pre_keep, post_decay, reserved2;
} sage_coeffs;

/* bf16 storage: the top half of an f32. Rounds to nearest even; a NaN stays a (quiet) NaN. */
SAGE_FN float sage_bf16_to_f32(SAGE_U16 b) { return sage_bits_to_f32(((SAGE_U32)b) << 16); }
SAGE_FN SAGE_U16 sage_f32_to_bf16(float x) {
    SAGE_U32 u = sage_f32_to_bits(x);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (SAGE_U16)((u >> 16) | 0x0040u);
    u += 0x7fffu + ((u >> 16) & 1u);
    return (SAGE_U16)(u >> 16);
}

SAGE_FN float sage_effective_grad(const sage_coeffs k, float theta, float grad) {
    return grad * k.grad_scale + k.l2 * theta;
}

SAGE_FN float sage_sensitivity(float theta, float g) { return fabsf(theta * g); }

SAGE_FN float sage_ema(float acc, float x, float beta, float alpha) { return beta * acc + alpha * x; }

SAGE_FN float sage_accumulate(const sage_coeffs k, int which, float acc, float theta, float grad) {
    float g = sage_effective_grad(k, theta, grad);
    if (which == SAGE_ACC_MOMENT) return sage_ema(acc, g, k.beta1, k.alpha1);
    if (which == SAGE_ACC_SECOND_MOMENT) return sage_ema(acc, g * g, k.beta2, k.alpha2);
    if (which == SAGE_ACC_INF_NORM) return fmaxf(k.beta2 * acc, fabsf(g) + k.inf_eps);
    return sage_ema(acc, sage_sensitivity(theta, g), k.beta0, k.alpha0);
}

SAGE_FN float sage_modulation(const sage_coeffs k, float i, float ibar) {
    float ib = ibar / k.ibar_div;
    float u = fabsf(i - ib);
    switch (k.modulation) {
    case SAGE_MOD_SAGE: return (u + k.eps_num) / (ib + k.eps_den);
    case SAGE_MOD_IMPORTANCE_TIMES_VARIATION: return (ib + k.eps_den) * (u + k.eps_num);
    case SAGE_MOD_IMPORTANCE_OVER_VARIATION: return (ib + k.eps_den) / (u + k.eps_num);
    case SAGE_MOD_IMPORTANCE: return ib + k.eps_den;
    case SAGE_MOD_INVERSE_IMPORTANCE: return 1.0f / (ib + k.eps_den);
    default: return u + k.eps_num;
    }
}

/* The parameter update, reading state values already advanced (and rounded to storage). */
SAGE_FN float sage_apply(const sage_coeffs k, float theta, float grad, float m, float v, float ibar) {
    float g = sage_effective_grad(k, theta, grad);
    float s = (k.flags & SAGE_FLAG_SAGE) ? sage_modulation(k, sage_sensitivity(theta, g), ibar) : 1.0f;
    float dir;
    if (k.kind == SAGE_KIND_ADAM) {
        dir = m / (sqrtf(v) * k.denom_scale + k.denom_eps);
    } else if (k.kind == SAGE_KIND_ADAMAX) {
        dir = m / (v + k.denom_eps) + k.in_step_decay * theta;
    } else if (!(k.flags & SAGE_FLAG_MOMENTUM)) {
        dir = g;
    } else if (k.flags & SAGE_FLAG_NESTEROV) {
        dir = g + k.momentum * m;
    } else {
        dir = m;
    }
    float updated = theta * k.pre_keep - k.step * s * dir;
    return updated - k.post_decay * updated;
}

/* 1 when x is NaN or +-Inf (all exponent bits set), else 0: what the backends count in the
 * stored parameters (StepReport::non_finite_params). On the bits, so no compiler option that
 * relaxes floating point can fold it away. */
SAGE_FN SAGE_U32 sage_non_finite(float x) {
    return (sage_f32_to_bits(x) & 0x7f800000u) == 0x7f800000u ? 1u : 0u;
}

/* Which accumulation the second state buffer gets. */
SAGE_FN int sage_second_kind(const sage_coeffs k) {
    return k.kind == SAGE_KIND_ADAMAX ? SAGE_ACC_INF_NORM : SAGE_ACC_SECOND_MOMENT;
}

#endif /* SAGE_STEP_H */
