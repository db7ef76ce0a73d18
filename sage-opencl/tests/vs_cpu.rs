//! The OpenCL kernels against sage-cpu's portable backend (the scalar form of
//! `sage_core::formula`) on random data, every storage pair, every tail length.

mod common;

use common::{device, random, rng, to, worst, LENGTHS};
use sage_core::{
    bf16, composed_step, f16, Accumulate, Algorithm, ApplyArgs, Backend, Config, Element,
    Modulation, Optimizer, ParamGroup, ParamTensor, TensorMut,
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

/// One tensor on the device: parameter and optional `m`, `v`, `ibar`.
type DevTensor<P, S> = (ClBuffer<P>, [Option<ClBuffer<S>>; 3]);

/// Host copies of one tensor's buffers.
#[derive(Clone)]
struct Host<P, S> {
    p: Vec<P>,
    s: [Option<Vec<S>>; 3],
}

/// Trains the same random model on the CPU and on `cl` for three steps (groups with SAGE on
/// and off, weight decay, every tail length), then requires every parameter and state value
/// within one storage ulp (bit-equal on PoCL).
fn same_as_cpu<P: Element, S: Element>(cl: &OpenCl, cfg: Config, what: &str) {
    let groups = vec![ParamGroup::sage().weight_decay(0.01), ParamGroup::plain()];
    let mut r = rng(7);
    let group_of: Vec<usize> = (0..LENGTHS.len()).map(|i| i % 2).collect();
    let mut host: Vec<Host<P, S>> = LENGTHS
        .iter()
        .zip(&group_of)
        .map(|(&n, &g)| {
            let layout = cfg.state_layout(groups[g].sage);
            let z = |on: bool| on.then(|| vec![S::default(); n]);
            Host {
                p: to(&random(&mut r, n, 1.0)),
                s: [z(layout.m), z(layout.v), z(layout.ibar)],
            }
        })
        .collect();
    let up = |h: &Host<P, S>| {
        let s = |b: &Option<Vec<S>>| b.as_ref().map(|b| cl.upload(b).unwrap());
        (
            cl.upload(&h.p).unwrap(),
            [s(&h.s[0]), s(&h.s[1]), s(&h.s[2])],
        )
    };
    let mut dev: Vec<DevTensor<P, S>> = host.iter().map(up).collect();
    let mut cpu_opt = Optimizer::new(Cpu, cfg, groups.clone()).unwrap();
    let mut cl_opt = Optimizer::new(cl.clone(), cfg, groups.clone()).unwrap();
    let mut max_ulps = 0;
    let limit = ulp_limit(cl);
    for step in 1..=3 {
        let grads: Vec<Vec<P>> = LENGTHS
            .iter()
            .map(|&n| to(&random(&mut r, n, 0.1)))
            .collect();
        let dgrads: Vec<ClBuffer<P>> = grads.iter().map(|g| cl.upload(g).unwrap()).collect();
        let mut ts: Vec<ParamTensor<'_, Cpu, P, S>> = host
            .iter_mut()
            .zip(&grads)
            .zip(&group_of)
            .map(|((h, g), &gi)| {
                let [m, v, b] = &mut h.s;
                ParamTensor::new(&mut h.p[..], &g[..]).group(gi).state(
                    m.as_deref_mut(),
                    v.as_deref_mut(),
                    b.as_deref_mut(),
                )
            })
            .collect();
        cpu_opt.step(&mut ts).unwrap();
        let mut ts: Vec<ParamTensor<'_, OpenCl, P, S>> = dev
            .iter_mut()
            .zip(&dgrads)
            .zip(&group_of)
            .map(|(((p, st), g), &gi)| {
                let [m, v, b] = st;
                ParamTensor::new(p, g)
                    .group(gi)
                    .state(m.as_mut(), v.as_mut(), b.as_mut())
            })
            .collect();
        cl_opt.step(&mut ts).unwrap();
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
            for (k, name) in ["m", "v", "ibar"].iter().enumerate() {
                assert_eq!(st[k].is_some(), h.s[k].is_some());
                if let (Some(d), Some(c)) = (&st[k], &h.s[k]) {
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
    eprintln!(
        "{what} {}/{}: at most {max_ulps} ulps from the CPU",
        P::DTYPE,
        S::DTYPE
    );
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
    all_configs::<f16, f16>();
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
