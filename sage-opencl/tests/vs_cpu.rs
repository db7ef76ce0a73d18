//! The OpenCL kernels against sage-cpu's portable backend (the scalar form of
//! `sage_core::formula`) on random data, every storage pair, every tail length.

mod common;

use common::{device, random, rng, to, worst, LENGTHS};
use sage_core::{
    bf16, composed_step, f16, Accumulate, Algorithm, ApplyArgs, Backend, Buffer, Config, Element,
    Modulation, Optimizer, ParamGroup, ParamTensor, TensorMut, TensorState,
};
use sage_cpu::Cpu;
use sage_opencl::{ClBuffer, OpenCl};

/// Configurations covering every algorithm, both presets, decay modes and an ablation.
fn configs() -> Vec<(&'static str, Config)> {
    vec![
        (
            "reference adamw",
            Config::reference(Algorithm::adamw(), 1e-2).beta0(0.8),
        ),
        (
            "paper adam",
            Config::paper(Algorithm::adam(), 1e-2).beta0(0.7),
        ),
        (
            "reference adamax",
            Config::reference(Algorithm::adamax(), 2e-3).beta0(0.6),
        ),
        (
            "paper sgd momentum",
            Config::paper(Algorithm::sgd(0.9), 5e-2).beta0(0.85),
        ),
        (
            "paper sgd plain",
            Config::paper(Algorithm::sgd(0.0), 5e-2).beta0(0.85),
        ),
        (
            "paper adam, ablation 2, clipped",
            Config::paper(Algorithm::adam(), 1e-2)
                .modulation(Modulation::ImportanceOverVariation)
                .global_clip(0.5),
        ),
    ]
}

/// PoCL computes exactly as the CPU does (same IEEE operations, no contraction): any
/// difference there is a bug. Other devices may flush subnormals: one storage ulp.
fn ulp_limit(cl: &OpenCl) -> u32 {
    if cl
        .device()
        .platform_name
        .contains("Portable Computing Language")
    {
        0
    } else {
        1
    }
}

/// One tensor on the device: parameter and state.
type DevTensor<P, S> = (ClBuffer<P>, TensorState<ClBuffer<S>>);

/// Host copies of one tensor's buffers.
#[derive(Clone)]
struct Host<P, S> {
    p: Vec<P>,
    s: TensorState<Vec<S>>,
}

/// Trains the same random model on the CPU and on `cl` for three steps (groups with SAGE on
/// and off, weight decay, every tail length), then requires every parameter and state value
/// within one storage ulp (bit-equal on PoCL).
fn same_as_cpu<P: Element, S: Element>(cl: &OpenCl, cfg: Config, what: &str) {
    let groups = vec![ParamGroup::sage().weight_decay(0.01), ParamGroup::plain()];
    same_as_cpu_in::<P, S>(cl, cfg, groups, what, Layout::Own);
}

/// How the test's device buffers are allocated.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Layout {
    /// Every buffer its own allocation (launches of `tensors_per_launch` tensors).
    Own,
    /// Every stream (parameters, gradients, each state buffer) one slab, each tensor's buffer
    /// a sub-buffer of it (packed launches).
    Slab,
    /// Two tensors of three from slabs, the third with buffers of its own: packed runs and
    /// single tensors interleaved.
    Mixed,
}

impl Layout {
    fn cuts_from_slab(self, i: usize) -> bool {
        match self {
            Layout::Own => false,
            Layout::Slab => true,
            Layout::Mixed => i % 3 != 2,
        }
    }
}

/// A buffer of tensor `i` holding `data`: its piece of `slab` when `layout` cuts it from one,
/// else an allocation of its own.
fn placed<E: Element>(
    cl: &OpenCl,
    layout: Layout,
    i: usize,
    slab: &[ClBuffer<E>],
    data: &[E],
) -> ClBuffer<E> {
    if layout.cuts_from_slab(i) {
        let mut piece = slab[i].clone();
        cl.write(&mut piece, data).unwrap();
        piece
    } else {
        cl.upload(data).unwrap()
    }
}

/// [`same_as_cpu`] with the tensors alternating between `groups[0]` and `groups[1]`, their
/// buffers allocated as `layout` says.
fn same_as_cpu_in<P: Element, S: Element>(
    cl: &OpenCl,
    cfg: Config,
    groups: Vec<ParamGroup>,
    what: &str,
    layout: Layout,
) -> u64 {
    let mut r = rng(7);
    let group_of: Vec<usize> = (0..LENGTHS.len()).map(|i| i % 2).collect();
    let mut host: Vec<Host<P, S>> = LENGTHS
        .iter()
        .zip(&group_of)
        .map(|(&n, &g)| Host {
            p: to(&random(&mut r, n, 1.0)),
            s: TensorState::zeros(cfg.state_layout(groups[g].sage), n),
        })
        .collect();
    let lens = LENGTHS.to_vec();
    let (_, p_slab) = cl.slab::<P>(&lens).unwrap();
    let (_, g_slab) = cl.slab::<P>(&lens).unwrap();
    let s_slabs: Vec<Vec<ClBuffer<S>>> = Buffer::ALL
        .iter()
        .map(|_| cl.slab::<S>(&lens).unwrap().1)
        .collect();
    let place = |i: usize, slab: &[ClBuffer<P>], data: &[P]| placed(cl, layout, i, slab, data);
    let state_place = |i: usize, b: Buffer, data: &[S]| {
        let slab = &s_slabs[Buffer::ALL.iter().position(|&x| x == b).unwrap()];
        placed(cl, layout, i, slab, data)
    };
    let mut dev: Vec<DevTensor<P, S>> = host
        .iter()
        .enumerate()
        .map(|(i, h)| {
            (
                place(i, &p_slab, &h.p),
                h.s.clone()
                    .try_map(|b, data| Ok::<_, ()>(state_place(i, b, &data)))
                    .unwrap(),
            )
        })
        .collect();
    let packed_before = cl.launch_counts().packed_steps;
    let mut cpu_opt = Optimizer::new(Cpu, cfg, groups.clone()).unwrap();
    let mut cl_opt = Optimizer::new(cl.clone(), cfg, groups.clone()).unwrap();
    let mut max_ulps = 0;
    let limit = ulp_limit(cl);
    for step in 1..=3 {
        let grads: Vec<Vec<P>> = LENGTHS
            .iter()
            .map(|&n| to(&random(&mut r, n, 0.1)))
            .collect();
        let dgrads: Vec<ClBuffer<P>> = grads
            .iter()
            .enumerate()
            .map(|(i, g)| place(i, &g_slab, g))
            .collect();
        // The OpenCL step computes its own norms; the CPU step is given the same norms (from
        // OpenCL's chunk partials, which its own norm equals bit for bit by contract), so that
        // the comparison is of the update alone: the portable CPU backend sums a chunk's
        // squares in f32 blocks, OpenCL in f64, and with clipping their last bits differ.
        let mut ts: Vec<ParamTensor<'_, OpenCl, P, S>> = dev
            .iter_mut()
            .zip(&dgrads)
            .zip(&group_of)
            .map(|(((p, st), g), &gi)| ParamTensor::new(p, g, st.view()).group(gi))
            .collect();
        let mut partials = vec![0f64; cl_opt.partials_len(&mut ts).unwrap()];
        cl_opt.grad_norm_partials(&mut ts, &mut partials).unwrap();
        let mut per = vec![0f64; LENGTHS.len()];
        let total = sage_core::norm::reduce(&partials, &LENGTHS, &mut per).unwrap();
        cl_opt.step(&mut ts).unwrap();
        drop(ts);
        let mut ts: Vec<ParamTensor<'_, Cpu, P, S>> = host
            .iter_mut()
            .zip(&grads)
            .zip(&group_of)
            .map(|((h, g), &gi)| ParamTensor::new(&mut h.p[..], &g[..], h.s.view()).group(gi))
            .collect();
        cpu_opt
            .step_with_norms(
                &mut ts,
                sage_core::GlobalNorms {
                    total_sq: total,
                    per_tensor_sq: &per,
                },
            )
            .unwrap();
        drop(ts);
        for (ti, (h, (p, st))) in host.iter().zip(&dev).enumerate() {
            let got = cl.download(p).unwrap();
            let (u, i) = worst(&got, &h.p);
            max_ulps = max_ulps.max(u);
            assert!(
                u <= limit,
                "{what} {}/{}: step {step} tensor {ti} (len {}) θ[{i}] is {u} ulps off: {} vs cpu {}",
                P::DTYPE,
                S::DTYPE,
                h.p.len(),
                got[i].to_f32(),
                h.p[i].to_f32()
            );
            assert_eq!(st.step, h.s.step, "tensor {ti}: step counts");
            for b in Buffer::ALL {
                let name = b.name();
                assert_eq!(st.get(b).is_some(), h.s.get(b).is_some());
                if let (Some(d), Some(c)) = (st.get(b), h.s.get(b)) {
                    let got = cl.download(d).unwrap();
                    let (u, i) = worst(&got, c);
                    max_ulps = max_ulps.max(u);
                    assert!(
                        u <= limit,
                        "{what}: step {step} tensor {ti} {name}[{i}] {u} ulps off"
                    );
                }
            }
        }
    }
    let packed = cl.launch_counts().packed_steps - packed_before;
    eprintln!(
        "{what} {}/{} ({layout:?}, {packed} packed launches): at most {max_ulps} ulps from the CPU",
        P::DTYPE,
        S::DTYPE
    );
    packed
}

fn all_configs<P: Element, S: Element>() {
    let Some(cl) = device() else { return };
    for (what, cfg) in configs() {
        same_as_cpu::<P, S>(&cl, cfg, what);
    }
}

#[test]
fn f32_params_f32_state() {
    all_configs::<f32, f32>();
}

#[test]
fn f16_params_f32_state() {
    all_configs::<f16, f32>();
}

#[test]
fn bf16_params_f32_state() {
    all_configs::<bf16, f32>();
}

#[test]
fn f32_params_bf16_state() {
    all_configs::<f32, bf16>();
}

#[test]
fn bf16_params_bf16_state() {
    all_configs::<bf16, bf16>();
}

#[test]
fn f16_params_f16_state() {
    // sage-core refuses f16 for `v` and Ī (their values underflow there): f16 state holds
    // momentum only, and the refusal comes before anything runs.
    let Some(cl) = device() else { return };
    let plain = vec![ParamGroup::plain().weight_decay(0.01), ParamGroup::plain()];
    same_as_cpu_in::<f16, f16>(
        &cl,
        Config::paper(Algorithm::sgd(0.9), 5e-2),
        plain,
        "paper sgd momentum",
        Layout::Own,
    );
    let cfg = Config::reference(Algorithm::adamw(), 1e-2);
    let mut opt = Optimizer::new(cl.clone(), cfg, [ParamGroup::sage()]).unwrap();
    let mut p = cl.upload(&[f16::ONE; 5]).unwrap();
    let g = cl.upload(&[f16::ONE; 5]).unwrap();
    let mut st = TensorState::try_new(cfg.state_layout(true), |_| cl.zeros::<f16>(5)).unwrap();
    let e = opt
        .step(&mut [ParamTensor::new(&mut p, &g, st.view())])
        .unwrap_err();
    assert_eq!(e.kind(), sage_core::ErrorKind::StateMismatch, "{e}");
    assert_eq!(cl.download(&p).unwrap(), vec![f16::ONE; 5]);
    assert_eq!(st.step, 0);
}

/// More tensors than one launch takes, many tiny, some empty: the multi-tensor path.
#[test]
fn many_tensors_span_several_launches() {
    let Some(cl) = device() else { return };
    let cl = OpenCl::builder()
        .device(sage_opencl::Select::Index {
            platform: cl.device().platform,
            device: cl.device().device,
        })
        .max_tensors_per_launch(3)
        .build()
        .unwrap();
    assert_eq!(cl.tensors_per_launch(), 3);
    let cfg = Config::reference(Algorithm::adamw(), 1e-2)
        .beta0(0.8)
        .per_tensor_clip(0.05);
    same_as_cpu::<f32, f32>(&cl, cfg, "3 per launch");
}

/// The step's geometry changes no bit: one element per work-item (what GPUs run), an odd run
/// (a tensor's tail inside a work-item's run), and a run longer than most tensors here.
#[test]
fn every_run_per_work_item_gives_the_same_bits() {
    let Some(cl) = device() else { return };
    for per_item in [1, 7, 300] {
        let v = OpenCl::builder()
            .device(sage_opencl::Select::Index {
                platform: cl.device().platform,
                device: cl.device().device,
            })
            .elements_per_item(per_item)
            .build()
            .unwrap();
        assert_eq!(v.elements_per_item(), per_item);
        for (what, cfg) in configs() {
            same_as_cpu::<f32, f32>(&v, cfg, what);
            same_as_cpu::<bf16, f32>(&v, cfg, what);
        }
    }
}

/// Tensors cut from one slab per stream step in packed launches (every tensor of a run at its
/// offsets, with its own coefficients) and give the CPU's bits; so do runs interleaved with
/// tensors of their own buffers, and groups whose state buffers differ (which end a run).
#[test]
fn packed_launches_give_the_same_bits() {
    let Some(cl) = device() else { return };
    let two_sage = || vec![ParamGroup::sage().weight_decay(0.01), ParamGroup::sage()];
    let sage_and_plain = || vec![ParamGroup::sage().weight_decay(0.01), ParamGroup::plain()];
    for (what, cfg) in configs() {
        for layout in [Layout::Slab, Layout::Mixed] {
            let packed = same_as_cpu_in::<f32, f32>(&cl, cfg, two_sage(), what, layout)
                + same_as_cpu_in::<bf16, f32>(&cl, cfg, two_sage(), what, layout);
            assert!(packed > 0, "{what}, {layout:?}: no packed launch");
        }
        // Alternating groups with and without Ī: every run is one tensor, none is packed.
        let packed = same_as_cpu_in::<f32, bf16>(&cl, cfg, sage_and_plain(), what, Layout::Slab);
        let plain_has_ibar = cfg.state_layout(false) == cfg.state_layout(true);
        assert!(
            plain_has_ibar || packed == 0,
            "{what}: {packed} packed launches"
        );
    }
}

/// The primitives and the composed step they make agree with the CPU's.
#[test]
fn primitives_match_cpu() {
    let Some(mut cl) = device() else { return };
    let limit = ulp_limit(&cl);
    let mut r = rng(11);
    for (what, cfg) in configs() {
        for &n in &LENGTHS {
            let k = Optimizer::new(Cpu, cfg, [ParamGroup::sage().weight_decay(0.02)])
                .unwrap()
                .coeffs(2, 0, 0.9)
                .unwrap();
            let mut p = random(&mut r, n, 1.0);
            let g = random(&mut r, n, 0.1);
            let mut st: Vec<Vec<f32>> = (0..3).map(|_| random(&mut r, n, 0.01)).collect();
            for x in st[1].iter_mut() {
                *x = x.abs(); // v ≥ 0
            }
            let mut dp = cl.upload(&p).unwrap();
            let dg = cl.upload(&g).unwrap();
            let mut ds: Vec<ClBuffer<f32>> = st.iter().map(|s| cl.upload(s).unwrap()).collect();
            let layout = cfg.state_layout(true);
            let on = [layout.m, layout.v, layout.ibar];
            {
                let [m, v, b] = &mut st[..] else {
                    unreachable!()
                };
                composed_step(
                    &mut Cpu,
                    TensorMut::<Cpu, f32, f32> {
                        param: &mut p[..],
                        grad: &g[..],
                        m: on[0].then_some(&mut m[..]),
                        v: on[1].then_some(&mut v[..]),
                        ibar: on[2].then_some(&mut b[..]),
                    },
                    &k,
                )
                .unwrap();
            }
            {
                let [m, v, b] = &mut ds[..] else {
                    unreachable!()
                };
                composed_step(
                    &mut cl,
                    TensorMut::<OpenCl, f32, f32> {
                        param: &mut dp,
                        grad: &dg,
                        m: on[0].then_some(m),
                        v: on[1].then_some(v),
                        ibar: on[2].then_some(b),
                    },
                    &k,
                )
                .unwrap();
            }
            let (u, i) = worst(&cl.download(&dp).unwrap(), &p);
            assert!(u <= limit, "{what} len {n}: composed θ[{i}] {u} ulps off");
            for j in 0..3 {
                let (u, i) = worst(&cl.download(&ds[j]).unwrap(), &st[j]);
                assert!(u <= limit, "{what} len {n}: state {j}[{i}] {u} ulps off");
            }
            // One accumulate pass alone, into a state buffer that is not yet advanced.
            let mut acc = random(&mut r, n, 0.01);
            let mut dacc = cl.upload(&acc).unwrap();
            Cpu.accumulate(Accumulate::Sensitivity, &mut acc[..], &p[..], &g[..], &k)
                .unwrap();
            cl.accumulate(Accumulate::Sensitivity, &mut dacc, &dp, &dg, &k)
                .unwrap();
            let (u, _) = worst(&cl.download(&dacc).unwrap(), &acc);
            assert!(u <= limit, "{what} len {n}: accumulate {u} ulps off");
            // apply with every state buffer absent reads them as 0.
            Cpu.apply(
                ApplyArgs::<Cpu, f32, f32> {
                    param: &mut p[..],
                    grad: &g[..],
                    m: None,
                    v: None,
                    ibar: None,
                },
                &k,
            )
            .unwrap();
            cl.apply(
                ApplyArgs::<OpenCl, f32, f32> {
                    param: &mut dp,
                    grad: &dg,
                    m: None,
                    v: None,
                    ibar: None,
                },
                &k,
            )
            .unwrap();
            let (u, _) = worst(&cl.download(&dp).unwrap(), &p);
            assert!(
                u <= limit,
                "{what} len {n}: apply without state {u} ulps off"
            );
        }
    }
}

/// Squared norms: every tail, every storage type, and many buffers in one call.
#[test]
fn sq_norms_match_cpu() {
    let Some(mut cl) = device() else { return };
    let mut r = rng(3);
    let lens: Vec<usize> = LENGTHS.iter().copied().chain([70_001, 5]).collect();
    let data: Vec<Vec<f32>> = lens.iter().map(|&n| random(&mut r, n, 3.0)).collect();
    fn check<E: Element>(cl: &mut OpenCl, data: &[Vec<f32>]) {
        let host: Vec<Vec<E>> = data.iter().map(|d| to(d)).collect();
        let dev: Vec<ClBuffer<E>> = host.iter().map(|h| cl.upload(h).unwrap()).collect();
        let refs: Vec<&ClBuffer<E>> = dev.iter().collect();
        let all = cl.sq_norms(&refs).unwrap();
        for ((h, d), got) in host.iter().zip(&dev).zip(all) {
            let want = sage_cpu::portable::sq_norm(h);
            let one = cl.sq_norm(d).unwrap();
            let tol = 1e-6 * want + 1e-30;
            assert!(
                (got - want).abs() <= tol,
                "{} len {}: {got} vs {want}",
                E::DTYPE,
                h.len()
            );
            assert!(
                (one - want).abs() <= tol,
                "{} len {}: {one} vs {want}",
                E::DTYPE,
                h.len()
            );
        }
    }
    check::<f32>(&mut cl, &data);
    check::<f16>(&mut cl, &data);
    check::<bf16>(&mut cl, &data);
}

/// NaN and ±Inf anywhere make the norm non-finite (the skip-on-non-finite guard needs it).
#[test]
fn non_finite_values_make_the_norm_non_finite() {
    let Some(mut cl) = device() else { return };
    for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
        for at in [0, 16, 4096] {
            let mut x = vec![0.5f32; 4097];
            x[at] = bad;
            let d = cl.upload(&x).unwrap();
            assert!(!cl.sq_norm(&d).unwrap().is_finite(), "{bad} at {at}");
            let h = cl.upload(&to::<f16>(&x)).unwrap();
            assert!(!cl.sq_norm(&h).unwrap().is_finite(), "f16 {bad} at {at}");
        }
    }
    // Large finite values do not overflow (accumulation in at least f32, f64 here when the
    // device has it).
    let big = cl.upload(&[1e19f32; 8]).unwrap();
    let n = cl.sq_norm(&big).unwrap();
    if cl.device().fp64 {
        assert!((n - 8e38).abs() / 8e38 < 1e-6, "{n}");
    }
}
