//! OpenCL C program text: the OpenCL prelude, the shared kernel body
//! ([`sage_core::gpu::KERNEL_BODY`], the device form of `sage_core::formula`) and this
//! backend's entry kernels. Programs are generated per storage pair and built lazily.

use std::fmt::Write;

use sage_core::DType;

/// Defines what `sage_step.h` expects from its including language.
const PRELUDE: &str = r#"
/* The CPU formula rounds after every f32 mul and add: no contraction into FMAs. */
#pragma OPENCL FP_CONTRACT OFF
/* The step's helpers are inlined into each case of the entry kernel, whose loops a CPU
 * device's compiler then vectorizes; left to its budget, PoCL's clang calls them once per
 * element for 16-bit storage. */
#if defined(__clang__)
#define SAGE_FN static inline __attribute__((always_inline))
#else
#define SAGE_FN static inline
#endif
#define SAGE_U32 uint
#define SAGE_U16 ushort
#define sage_bits_to_f32(u) as_float(u)
#define sage_f32_to_bits(x) as_uint(x)
#define sqrtf(x) sqrt(x)
#define fabsf(x) fabs(x)
#define fmaxf(a, b) fmax(a, b)
"#;

/// One tensor of a launch, as the kernels read it. Must match [`crate::table::Slot`].
const SLOT: &str = r#"
typedef struct {
    ulong len;        /* elements */
    ulong end_group;  /* work-groups of this launch up to and including this tensor */
    uint present;     /* bit 0: m, bit 1: v, bit 2: ibar */
    uint k;           /* its coefficients: an index into the table's coefficients */
    ulong off[5];     /* packed launches: elements from the start of the shared p, g, m, v, b */
} sage_cl_slot;

/* A launch's tables: one slot per tensor of the step (`base`: the launch's first) and the
 * step's distinct coefficients, which the slots index. Tensors of a group share theirs, so a
 * slot stays small however many tensors there are, and a layout that repeats keeps its slots
 * on the device while only the coefficients change. */
#define SAGE_CL_TABLE_ARGS                                                    \
    __global const sage_cl_slot* slots, __global const sage_coeffs* ks, uint base
#define SAGE_CL_OPEN_TABLE slots += base;

/* The slot of work-group `grp` in an unpacked launch: slots are few, a linear scan is cheapest. */
static inline uint sage_cl_find(__global const sage_cl_slot* slots, uint count, size_t grp) {
    uint s = 0;
    while (s + 1u < count && grp >= slots[s].end_group) s++;
    return s;
}
"#;

/// Loads, stores and the pointer type of one storage type, as macros named `{prefix}_T`,
/// `{prefix}_LD(p, i)`, `{prefix}_LD8(p, i)` (elements `i .. i + 8` as a `float8`),
/// `{prefix}_ST(p, i, x)`. f16 goes through `vload_half` /
/// `vstore_half_rte`, which are core OpenCL (no `cl_khr_fp16` needed); bf16 is stored as
/// `ushort` bits and converted by the shared body's helpers.
fn storage_macros(prefix: &str, d: DType) -> String {
    let (t, ld, ld8, st) = match d {
        DType::F32 => (
            "float",
            "((p)[i])",
            "vload8(0, (p) + (i))",
            "((p)[i] = (x))",
        ),
        DType::F16 => (
            "half",
            "vload_half((i), (p))",
            "vload_half8(0, (p) + (i))",
            "vstore_half_rte((x), (i), (p))",
        ),
        DType::Bf16 => (
            "ushort",
            "sage_bf16_to_f32((p)[i])",
            "as_float8(convert_uint8(vload8(0, (p) + (i))) << 16)",
            "((p)[i] = sage_f32_to_bf16(x))",
        ),
    };
    format!(
        "#define {prefix}_T {t}\n#define {prefix}_LD(p, i) {ld}\n#define {prefix}_LD8(p, i) {ld8}\n#define {prefix}_ST(p, i, x) {st}\n"
    )
}

fn header() -> String {
    let mut s = String::from(PRELUDE);
    s.push_str(sage_core::gpu::KERNEL_BODY);
    s.push_str(SLOT);
    s
}

/// Pointer arguments of `slots` tensors: `{ty} {name}{i}` for each name, comma separated.
fn slot_args(slots: usize, per: &[(&str, &str)]) -> String {
    let mut s = String::new();
    for i in 0..slots {
        for (ty, name) in per {
            let _ = write!(s, ",\n    {ty} {name}{i}");
        }
    }
    s
}

/// `case i: a = a{i}; b = b{i}; break;` for each slot.
fn slot_switch(slots: usize, names: &[&str]) -> String {
    let mut s = String::from("switch (s) {\n");
    for i in 0..slots {
        let _ = write!(s, "    case {i}:");
        for n in names {
            let _ = write!(s, " {n} = {n}{i};");
        }
        s.push_str(" break;\n");
    }
    s.push_str("    default: return;\n    }\n");
    s
}

/// The program of parameter storage `p` and state storage `s`: the multi-tensor fused step
/// (`sage_cl_step`, up to `slots` tensors per launch, `per_item` consecutive elements per
/// work-item), its bandwidth floor (`sage_cl_floor`), both packed (`…_packed`: any number of
/// tensors cut from the same five buffers) and the primitives `sage_cl_accumulate` and
/// `sage_cl_apply`.
pub fn step_program(p: DType, s: DType, slots: usize, per_item: usize) -> String {
    let mut src = header();
    let _ = writeln!(src, "#define SAGE_WPI {}", per_item.max(1));
    src.push_str(&storage_macros("P", p));
    src.push_str(&storage_macros("S", s));
    src.push_str(
        r#"
/* One element's whole step, in the order of sage_core::formula::step: each present state
 * value advanced and rounded to storage (the update reads the stored value), then θ. Returns 1
 * when the stored θ is NaN or ±Inf (read back as stored: an f32 that overflows f16 counts). */
SAGE_FN uint sage_cl_elem(const sage_coeffs k, const uint present, __global P_T* p,
                                __global const P_T* g, __global S_T* m, __global S_T* v,
                                __global S_T* b, size_t i) {
    float th = P_LD(p, i);
    float gr = P_LD(g, i);
    float mv = 0.0f, vv = 0.0f, bv = 0.0f;
    if (present & 1u) {
        S_ST(m, i, sage_accumulate(k, SAGE_ACC_MOMENT, S_LD(m, i), th, gr));
        mv = S_LD(m, i);
    }
    if (present & 2u) {
        S_ST(v, i, sage_accumulate(k, sage_second_kind(k), S_LD(v, i), th, gr));
        vv = S_LD(v, i);
    }
    if (present & 4u) {
        S_ST(b, i, sage_accumulate(k, SAGE_ACC_SENSITIVITY, S_LD(b, i), th, gr));
        bv = S_LD(b, i);
    }
    P_ST(p, i, sage_apply(k, th, gr, mv, vv, bv));
    /* The work-item's own store: read back from its cache, not another pass over memory. */
    return sage_non_finite(P_LD(p, i));
}

/* The bandwidth floor of a step: the same loads and stores, in place, one add per value.
 * k.reserved2 is 0 at run time; the compiler cannot know it, so every value is stored. */
SAGE_FN uint sage_cl_touch(const sage_coeffs k, const uint present, __global P_T* p,
                                 __global const P_T* g, __global S_T* m, __global S_T* v,
                                 __global S_T* b, size_t i) {
    const float d = P_LD(g, i) * k.reserved2;
    if (present & 1u) S_ST(m, i, S_LD(m, i) + d);
    if (present & 2u) S_ST(v, i, S_LD(v, i) + d);
    if (present & 4u) S_ST(b, i, S_LD(b, i) + d);
    P_ST(p, i, P_LD(p, i) + d);
    return 0u;
}

/* A work-item's run of elements [lo, hi) (SAGE_WPI of them, fewer at a tensor's end). A loop
 * of contiguous elements without branches is what a CPU device's compiler turns into vector
 * code; on a GPU SAGE_WPI is 1 and neighbouring work-items take neighbouring elements. */
#define SAGE_CL_RUN(ELEM, K, PRESENT)                                         \
    for (size_t i = lo; i < hi; i++) bad += ELEM((K), (PRESENT), p, g, m, v, b, i);

/* The step over [lo, hi): the presets' cases with their switches fixed, so that the compiler
 * folds every branch of the shared body away (the same code as the general case, with
 * constants), then the general case for everything else (ablations, SGD variants). */
#define SAGE_CL_CASE(KIND, FLAGS, MOD, PRESENT)                               \
    if (k0.kind == (KIND) && k0.flags == (FLAGS) && present == (PRESENT) &&   \
        (!((FLAGS) & SAGE_FLAG_SAGE) || k0.modulation == (MOD))) {            \
        sage_coeffs k = k0;                                                   \
        k.kind = (KIND); k.flags = (FLAGS); k.modulation = (MOD);             \
        SAGE_CL_RUN(sage_cl_elem, k, (PRESENT))                               \
    }
#define SAGE_CL_STEP_CASES                                                    \
    SAGE_CL_CASE(SAGE_KIND_ADAM, SAGE_FLAG_SAGE, SAGE_MOD_SAGE, 7u)           \
    else SAGE_CL_CASE(SAGE_KIND_ADAMAX, SAGE_FLAG_SAGE, SAGE_MOD_SAGE, 7u)    \
    else SAGE_CL_CASE(SAGE_KIND_ADAM, 0u, SAGE_MOD_SAGE, 3u)                  \
    else SAGE_CL_CASE(SAGE_KIND_ADAMAX, 0u, SAGE_MOD_SAGE, 3u)                \
    else SAGE_CL_CASE(SAGE_KIND_SGD, SAGE_FLAG_SAGE, SAGE_MOD_SAGE, 4u)       \
    else { SAGE_CL_RUN(sage_cl_elem, k0, present) }
#define SAGE_CL_FLOOR_CASES SAGE_CL_RUN(sage_cl_touch, k0, present)

/* One EMA pass over one state buffer (Backend::accumulate). */
__kernel void sage_cl_accumulate(SAGE_CL_TABLE_ARGS, int which, __global S_T* acc,
                                 __global const P_T* p, __global const P_T* g) {
    SAGE_CL_OPEN_TABLE
    size_t i = get_global_id(0);
    if (i >= slots->len) return;
    S_ST(acc, i, sage_accumulate(ks[slots->k], which, S_LD(acc, i), P_LD(p, i), P_LD(g, i)));
}

/* The parameter update from advanced state (Backend::apply); absent buffers read as 0. */
__kernel void sage_cl_apply(SAGE_CL_TABLE_ARGS, __global P_T* p, __global const P_T* g,
                            __global const S_T* m, __global const S_T* v,
                            __global const S_T* b) {
    SAGE_CL_OPEN_TABLE
    size_t i = get_global_id(0);
    if (i >= slots->len) return;
    const uint present = slots->present;
    float mv = (present & 1u) ? S_LD(m, i) : 0.0f;
    float vv = (present & 2u) ? S_LD(v, i) : 0.0f;
    float bv = (present & 4u) ? S_LD(b, i) : 0.0f;
    P_ST(p, i, sage_apply(ks[slots->k], P_LD(p, i), P_LD(g, i), mv, vv, bv));
}
"#,
    );
    multi_entry(&mut src, "sage_cl_step", "SAGE_CL_STEP_CASES", slots);
    multi_entry(&mut src, "sage_cl_floor", "SAGE_CL_FLOOR_CASES", slots);
    multi_entry(&mut src, "sage_cl_step_packed", "SAGE_CL_STEP_CASES", 0);
    multi_entry(&mut src, "sage_cl_floor_packed", "SAGE_CL_FLOOR_CASES", 0);
    src
}

/// A multi-tensor entry kernel `name` running `cases` (a macro of the source above over the
/// elements `[lo, hi)`). Each work-group covers `local_size · SAGE_WPI` elements of one
/// tensor, so the tensor (and its pointers) are uniform across the group; each work-item takes
/// `SAGE_WPI` consecutive ones.
///
/// Unpacked (`slots` > 0): up to `slots` tensors, each with its own buffer arguments. Packed
/// (`slots` = 0): any number of tensors whose buffers are sub-buffers of the same five
/// memory objects, passed once, each tensor at its offsets (`sage_cl_slot::off`), with a
/// table of each work-group's slot (`group_slot`).
///
/// `bad_counts` (when not null) holds two `uint`s per tensor of the step (`base + s`): the low
/// and high words of its count of non-finite stored parameters. Such elements are rare, so a
/// work-item that found any adds its count atomically (32-bit atomics are core OpenCL; 64-bit
/// ones an extension), carrying into the high word when the low one wraps.
fn multi_entry(src: &mut String, name: &str, cases: &str, slots: usize) {
    let _ = write!(
        src,
        "\n__kernel void {name}(SAGE_CL_TABLE_ARGS, uint count,\n    __global uint* bad_counts"
    );
    let args = [
        ("__global P_T*", "p"),
        ("__global const P_T*", "g"),
        ("__global S_T*", "m"),
        ("__global S_T*", "v"),
        ("__global S_T*", "b"),
    ];
    if slots == 0 {
        // Packed: the slot of each work-group, from the host (one load, where a search over
        // thousands of slots would cost more than a small tensor's whole step).
        src.push_str(",\n    __global const uint* group_slot");
        for (ty, n) in args {
            let _ = write!(src, ",\n    {ty} {n}0");
        }
    } else {
        src.push_str(&slot_args(slots, &args));
    }
    src.push_str(if slots == 0 {
        ") {\n    SAGE_CL_OPEN_TABLE\n    size_t grp = get_group_id(0);\n    uint s = group_slot[grp];\n"
    } else {
        ") {\n    SAGE_CL_OPEN_TABLE\n    size_t grp = get_group_id(0);\n    uint s = sage_cl_find(slots, count, grp);\n"
    });
    src.push_str(
        r#"    size_t first = s ? slots[s - 1].end_group : 0;
    const size_t len = slots[s].len;
    const size_t lo = ((grp - first) * get_local_size(0) + get_local_id(0)) * SAGE_WPI;
    if (lo >= len) return;
    const size_t hi = min(lo + (size_t)SAGE_WPI, len);
    const sage_coeffs k0 = ks[slots[s].k];
    const uint present = slots[s].present;
    __global P_T* p; __global const P_T* g; __global S_T* m; __global S_T* v; __global S_T* b;
    "#,
    );
    if slots == 0 {
        // Absent buffers have offset 0 on a null argument: never dereferenced.
        src.push_str(
            "{\n        __global const ulong* o = slots[s].off;\n        \
             p = p0 + o[0]; g = g0 + o[1]; m = m0 + o[2]; v = v0 + o[3]; b = b0 + o[4];\n    }\n",
        );
    } else {
        src.push_str(&slot_switch(slots, &["p", "g", "m", "v", "b"]));
    }
    let _ = writeln!(
        src,
        "    uint bad = 0;\n    {cases}\n    if (bad && bad_counts) {{\n        \
         __global uint* c = bad_counts + 2 * ((size_t)base + s);\n        \
         if (atomic_add(c, bad) > 0xffffffffu - bad) atomic_inc(c + 1);\n    }}\n}}"
    );
}

/// Elements per chunk of sage-core's norm grid (`sage_core::norm::NORM_CHUNK`).
pub const NORM_CHUNK: usize = sage_core::norm::NORM_CHUNK;

/// The squared-norm program of storage `e`: `sage_cl_norm_partials` writes the partial sum of
/// squares of each chunk of sage-core's norm grid ([`NORM_CHUNK`] elements from a buffer's
/// start), one work-group per chunk, for up to `slots` buffers per launch.
///
/// With `fp64` (the device has `cl_khr_fp64`) a partial is a `double`: each square is exact
/// there and cannot overflow. Without it a partial is a pair of floats `(sum, k)` meaning
/// `sum · 2^(2k)`: the chunk's largest magnitude `m` is found first and every element scaled
/// by `2^-k` (`k = ilogb(m)`, exact) before it is squared, so no finite input overflows either;
/// the host widens the pair to f64. Either way each work-item adds the elements
/// `lid, lid + local_size, ...` of the chunk in order and the work-group sums them in a fixed
/// tree, so a partial depends on its chunk's contents only (for a given work-group size, fixed
/// per device). NaN and ±Inf make the partial non-finite.
///
/// With `item_per_chunk` (CPU devices) one work-item sums a whole chunk instead, in eight
/// interleaved accumulators (element `j` of the chunk into accumulator `j % 8`) added in a
/// fixed tree at the end: a loop a CPU device's compiler turns into vector code, with no
/// barriers (each is a pass over the work-group on a CPU device). The partial then depends on
/// its chunk alone.
pub fn norm_program(e: DType, slots: usize, fp64: bool, item_per_chunk: bool) -> String {
    let mut src = String::from(PRELUDE);
    src.push_str(sage_core::gpu::KERNEL_BODY);
    let _ = writeln!(src, "#define SAGE_NORM_CHUNK {NORM_CHUNK}");
    if fp64 {
        src.push_str(
            "#pragma OPENCL EXTENSION cl_khr_fp64 : enable\ntypedef double sage_acc;\ntypedef double sage_part;\n",
        );
    } else {
        src.push_str("typedef float sage_acc;\ntypedef float sage_part;\n");
    }
    src.push_str(&storage_macros("E", e));
    if !item_per_chunk {
        src.push_str(
            r#"
/* A work-group's values in `scratch` summed (or maxed) in a fixed tree (local_size is a power
 * of two); the result is in scratch[0] for every work-item. */
#define SAGE_TREE(OP)                                                   \
    for (size_t off = lsz / 2; off > 0; off >>= 1) {                    \
        if (lid < off) scratch[lid] = OP(scratch[lid], scratch[lid + off]); \
        barrier(CLK_LOCAL_MEM_FENCE);                                   \
    }
#define SAGE_ADD(a, b) ((a) + (b))
"#,
        );
    }
    src.push_str(
        r#"
/* Eight interleaved accumulators added in a fixed tree. */
#define SAGE_SUM8(a) (((a[0] + a[1]) + (a[2] + a[3])) + ((a[4] + a[5]) + (a[6] + a[7])))
"#,
    );
    let body = match (item_per_chunk, fp64) {
        (false, true) => {
            r#"    double acc = 0.0;
    for (size_t i = start + lid; i < end; i += lsz) {
        double v = (double)E_LD(x, i);
        acc += v * v;
    }
    scratch[lid] = acc;
    barrier(CLK_LOCAL_MEM_FENCE);
    SAGE_TREE(SAGE_ADD)
    if (lid == 0) partials[pbase + c] = scratch[0];
"#
        }
        (false, false) => {
            r#"    /* The largest magnitude; +Inf when any element is NaN or ±Inf (fmax drops NaN). */
    float m = 0.0f;
    for (size_t i = start + lid; i < end; i += lsz) {
        float v = E_LD(x, i);
        m = isfinite(v) ? fmax(m, fabs(v)) : INFINITY;
    }
    scratch[lid] = m;
    barrier(CLK_LOCAL_MEM_FENCE);
    SAGE_TREE(fmax)
    m = scratch[0];
    barrier(CLK_LOCAL_MEM_FENCE);
    /* Scaled by 2^-k, every finite element is below 2 in magnitude: no square overflows. A
     * non-finite chunk is summed unscaled, so that its partial is NaN or +Inf. */
    int k = (m > 0.0f && isfinite(m)) ? ilogb(m) : 0;
    float acc = 0.0f;
    for (size_t i = start + lid; i < end; i += lsz) {
        float v = ldexp(E_LD(x, i), -k);
        acc += v * v;
    }
    scratch[lid] = acc;
    barrier(CLK_LOCAL_MEM_FENCE);
    SAGE_TREE(SAGE_ADD)
    if (lid == 0) {
        partials[2 * (size_t)(pbase + c)] = scratch[0];
        partials[2 * (size_t)(pbase + c) + 1] = (float)k;
    }
"#
        }
        (true, true) => {
            r#"    /* Lane j of the vector sums elements j, j + 8, ... of the chunk. */
    double8 acc = (double8)(0.0);
    size_t i = start;
    for (; i + 8 <= end; i += 8) {
        double8 v = convert_double8(E_LD8(x, i));
        acc += v * v;
    }
    double a[8];
    vstore8(acc, 0, a);
    for (int j = 0; i < end; i++, j++) {
        double v = (double)E_LD(x, i);
        a[j] += v * v;
    }
    partials[pbase + c] = SAGE_SUM8(a);
"#
        }
        (true, false) => {
            r#"    /* As the work-group form: the largest magnitude (+Inf when any element is not
     * finite), then the squares scaled by 2^-k so that none overflows. */
    float m = 0.0f;
    for (size_t i = start; i < end; i++) {
        float v = E_LD(x, i);
        m = isfinite(v) ? fmax(m, fabs(v)) : INFINITY;
    }
    int k = (m > 0.0f && isfinite(m)) ? ilogb(m) : 0;
    float a[8] = {0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f};
    for (size_t i = start; i < end; i++) {
        float v = ldexp(E_LD(x, i), -k);
        a[(i - start) & 7u] += v * v;
    }
    partials[2 * (size_t)(pbase + c)] = SAGE_SUM8(a);
    partials[2 * (size_t)(pbase + c) + 1] = (float)k;
"#
        }
    };
    chunk_kernel(
        &mut src,
        "sage_cl_norm_partials",
        slots,
        item_per_chunk,
        body,
    );
    chunk_kernel(
        &mut src,
        "sage_cl_norm_partials_packed",
        0,
        item_per_chunk,
        body,
    );
    // The read floor: each element read once in the same launches, summed in float (no
    // conversion to double, no squares, no tree); the sum is stored only when it equals a
    // value it practically never has, so the loads stay and no store is made.
    let floor = if item_per_chunk {
        r#"    float8 lanes = (float8)(0.0f);
    size_t i = start;
    for (; i + 8 <= end; i += 8) lanes += E_LD8(x, i);
    float a[8];
    vstore8(lanes, 0, a);
    for (int j = 0; i < end; i++, j++) a[j] += E_LD(x, i);
    float acc = SAGE_SUM8(a);
    if (acc == -1.5f) ((__global float*)partials)[pbase + c] = acc;
"#
    } else {
        r#"    float acc = 0.0f;
    for (size_t i = start + lid; i < end; i += lsz) acc += E_LD(x, i);
    if (acc == -1.5f) ((__global float*)partials)[pbase + c] = acc;
"#
    };
    chunk_kernel(&mut src, "sage_cl_read_floor", slots, item_per_chunk, floor);
    chunk_kernel(
        &mut src,
        "sage_cl_read_floor_packed",
        0,
        item_per_chunk,
        floor,
    );
    src
}

/// A kernel over the chunks of sage-core's norm grid with the norm pass's arguments and
/// geometry, running `body` with `x` (the buffer), `[start, end)` (the chunk's elements) and
/// `c` (the chunk's index in the launch). With `item_per_chunk` work-item `c` of the launch
/// takes chunk `c` (the table's counts are chunks, a work-group's size is free, `scratch` is
/// unused); otherwise work-group `c` does, its work-items `lid` of `lsz`.
///
/// Unpacked (`slots` > 0): up to `slots` buffers, each its own argument. Packed (`slots` = 0):
/// any number of buffers cut from one memory object `x0`, each at its offset, with the slot of
/// each chunk from the host (`chunk_slot`).
fn chunk_kernel(src: &mut String, name: &str, slots: usize, item_per_chunk: bool, body: &str) {
    let _ = write!(
        src,
        r#"
/* tab[4s] = elements of buffer s, tab[4s+1] = the grid chunk its first chunk of the launch is
 * (a window of a buffer may start past chunk 0), tab[4s+2] = chunks of this launch up to and
 * including buffer s, tab[4s+3] = (packed) its offset in elements in x0. */
__kernel void {name}(__global const ulong* tab, uint base, uint count,
                     __global sage_part* partials, uint pbase, __local sage_acc* scratch"#
    );
    if slots == 0 {
        src.push_str(",\n    __global const uint* chunk_slot, __global const E_T* x0");
    } else {
        src.push_str(&slot_args(slots, &[("__global const E_T*", "x")]));
    }
    src.push_str(") {\n    tab += 4 * (size_t)base;\n");
    if item_per_chunk {
        src.push_str(
            "    size_t c = get_global_id(0);\n    if (c >= tab[4 * (size_t)(count - 1) + 2]) return;\n",
        );
    } else {
        src.push_str(
            "    size_t c = get_group_id(0);\n    size_t lid = get_local_id(0);\n    size_t lsz = get_local_size(0);\n",
        );
    }
    if slots == 0 {
        src.push_str("    uint s = chunk_slot[c];\n");
    } else {
        src.push_str("    uint s = 0;\n    while (s + 1u < count && c >= tab[4 * s + 2]) s++;\n");
    }
    src.push_str(
        r#"    size_t first = s ? tab[4 * s - 2] : 0;
    size_t len = tab[4 * s];
    size_t start = (tab[4 * s + 1] + (c - first)) * SAGE_NORM_CHUNK;
    size_t end = min(start + SAGE_NORM_CHUNK, len);
    __global const E_T* x;
    "#,
    );
    if slots == 0 {
        src.push_str("x = x0 + tab[4 * s + 3];\n");
    } else {
        src.push_str(&slot_switch(slots, &["x"]).replace("default: return;", "default: x = x0;"));
    }
    src.push_str(body);
    src.push_str("}\n");
}

/// The `f64` value of a partial of the float path of [`norm_program`]: `sum · 2^(2k)`, exact
/// (the scale is a power of two well inside f64's range).
pub fn widen_partial(sum: f32, k: f32) -> f64 {
    let e = 2 * k as i32;
    // 2^e for |e| <= 2 * 150: a normal f64.
    sum as f64 * f64::from_bits(((1023 + e) as u64) << 52)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn programs_name_every_slot() {
        let src = step_program(DType::F16, DType::Bf16, 3, 64);
        assert!(src.contains("__global P_T* p2"));
        assert!(!src.contains("p3"));
        assert!(src.contains("vload_half"));
        assert!(src.contains("sage_f32_to_bf16"));
        assert!(src.contains("#define SAGE_WPI 64\n"));
        assert!(src.contains("__kernel void sage_cl_step_packed(") && src.contains("group_slot"));
        assert!(src.contains("__kernel void sage_cl_floor_packed("));
        for packed in [
            "sage_cl_norm_partials_packed(",
            "sage_cl_read_floor_packed(",
        ] {
            assert!(norm_program(DType::F32, 2, true, true).contains(packed));
            assert!(norm_program(DType::Bf16, 2, false, false).contains(packed));
        }
        let n = norm_program(DType::F32, 2, true, false);
        assert!(n.contains("__global const E_T* x1"));
        assert!(n.contains("cl_khr_fp64"));
        assert!(n.contains("#define SAGE_NORM_CHUNK 4096\n"));
        let n = norm_program(DType::Bf16, 2, false, false);
        assert!(!n.contains("cl_khr_fp64") && n.contains("ilogb"));
        for fp64 in [false, true] {
            let n = norm_program(DType::F16, 3, fp64, true);
            assert!(n.contains("get_global_id") && !n.contains("barrier"));
            assert!(n.contains("__global const E_T* x2"));
        }
    }

    #[test]
    fn float_partials_widen_exactly() {
        assert_eq!(widen_partial(3.0, 0.0), 3.0);
        assert_eq!(widen_partial(1.5, 100.0), 1.5 * 2f64.powi(200));
        assert_eq!(widen_partial(1.25, -140.0), 1.25 * 2f64.powi(-280));
        assert!(widen_partial(f32::NAN, 0.0).is_nan());
        assert_eq!(widen_partial(f32::INFINITY, 0.0), f64::INFINITY);
    }
}
