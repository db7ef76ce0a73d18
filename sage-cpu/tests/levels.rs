//! Every vector level (and the threaded split) against the portable path, bit for bit, at
//! lengths that hit every register tail, for every storage type and algorithm case.

use sage_core::{
    bf16, f16, Algorithm, Backend, Coeffs, Config, Element, Modulation, Optimizer, ParamGroup,
    ParamTensor, TensorMut, TensorState,
};
use sage_cpu::{Cpu, Level, SimdCpu};

const LENGTHS: [usize; 10] = [0, 1, 7, 8, 9, 15, 16, 17, 1023, 4097];

/// xorshift64*: deterministic data without a dependency.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> f32 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        let x = self.0.wrapping_mul(0x2545_f491_4f6c_dd1d);
        ((x >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }
    /// Mostly O(1) values with some tiny, some large, some exact zeros.
    fn value(&mut self) -> f32 {
        let x = self.next();
        match (self.next() * 8.0) as i32 {
            0 => 0.0,
            1 => x * 1e-6,
            2 => x * 1e3,
            _ => x,
        }
    }
    fn vec(&mut self, n: usize) -> Vec<f32> {
        (0..n).map(|_| self.value()).collect()
    }
}

/// The backends under test: each available level, alone and split across threads into
/// tiny chunks (so that even short tensors are cut, tails included).
fn backends() -> Vec<(String, SimdCpu)> {
    let mut out = Vec::new();
    for level in Level::available() {
        let one = SimdCpu::with_level(level).unwrap().threads(1);
        out.push((format!("{level}"), one));
        let many = one.threads(3).min_parallel(0).chunk(16);
        out.push((format!("{level}/3 threads"), many));
        if one.uses_native_bf16() {
            // Both ways of rounding bf16 stores where the CPU has AVX512-BF16.
            out.push((
                format!("{level} without AVX512-BF16"),
                one.native_bf16(false),
            ));
        }
    }
    out
}

/// (name, config, sage on) for every kernel case.
fn cases() -> Vec<(String, Config, bool)> {
    let nesterov = Algorithm::Sgd {
        momentum: 0.9,
        dampening: 0.0,
        nesterov: true,
    };
    let mut bases = vec![
        (
            "paper adam".to_string(),
            Config::paper(Algorithm::adam(), 1e-3),
        ),
        (
            "paper adamw".into(),
            Config::paper(Algorithm::adamw(), 1e-3),
        ),
        (
            "ref adamw".into(),
            Config::reference(Algorithm::adamw(), 1e-3),
        ),
        (
            "ref adamw nobias".into(),
            Config::reference(Algorithm::adamw(), 1e-3).bias_correction(false),
        ),
        (
            "ref adamax".into(),
            Config::reference(Algorithm::adamax(), 1e-3),
        ),
        (
            "paper adamax".into(),
            Config::paper(Algorithm::adamax(), 1e-3),
        ),
        ("paper sgd".into(), Config::paper(Algorithm::sgd(0.0), 1e-2)),
        (
            "paper sgd momentum".into(),
            Config::paper(Algorithm::sgd(0.9), 1e-2),
        ),
        ("paper sgd nesterov".into(), Config::paper(nesterov, 1e-2)),
        (
            "ref sgd momentum".into(),
            Config::reference(Algorithm::sgd(0.9), 1e-2),
        ),
    ];
    for m in [
        Modulation::ImportanceTimesVariation,
        Modulation::ImportanceOverVariation,
        Modulation::Importance,
        Modulation::InverseImportance,
        Modulation::Variation,
    ] {
        bases.push((
            format!("paper adam {m:?}"),
            Config::paper(Algorithm::adam(), 1e-3).modulation(m),
        ));
    }
    let mut out = Vec::new();
    for (name, cfg) in bases {
        out.push((format!("{name} sage"), cfg, true));
        out.push((format!("{name} plain"), cfg, false));
    }
    out
}

fn same(a: f32, b: f32) -> bool {
    a.to_bits() == b.to_bits() || (a.is_nan() && b.is_nan())
}

fn widen<E: Element>(x: &[E]) -> Vec<f32> {
    x.iter().map(|v| v.to_f32()).collect()
}

fn assert_same(what: &str, a: &[f32], b: &[f32]) {
    assert_eq!(a.len(), b.len(), "{what}: lengths");
    for (i, (x, y)) in a.iter().zip(b).enumerate() {
        assert!(
            same(*x, *y),
            "{what}: element {i}: {x:e} ({:#x}) vs portable {y:e} ({:#x})",
            x.to_bits(),
            y.to_bits()
        );
    }
}

/// One tensor's buffers.
#[derive(Clone)]
struct Buffers<P: Element, S: Element> {
    p: Vec<P>,
    m: Option<Vec<S>>,
    v: Option<Vec<S>>,
    ib: Option<Vec<S>>,
}

impl<P: Element, S: Element> Buffers<P, S> {
    fn new(rng: &mut Rng, cfg: &Config, sage: bool, n: usize) -> Self {
        let layout = cfg.state_layout(sage);
        let conv = |x: Vec<f32>| -> Vec<S> { x.into_iter().map(S::from_f32).collect() };
        // Non-zero starting state exercises every term; v and u must be >= 0.
        let pos = |rng: &mut Rng| conv(rng.vec(n).into_iter().map(f32::abs).collect());
        let m = layout.m.then(|| conv(rng.vec(n)));
        let v = layout.v.then(|| pos(rng));
        let ib = layout.ibar.then(|| pos(rng));
        Buffers {
            p: rng.vec(n).into_iter().map(P::from_f32).collect(),
            m,
            v,
            ib,
        }
    }
    fn view_cpu<'a>(&'a mut self, g: &'a [P]) -> TensorMut<'a, Cpu, P, S> {
        TensorMut {
            param: &mut self.p,
            grad: g,
            m: self.m.as_deref_mut(),
            v: self.v.as_deref_mut(),
            ibar: self.ib.as_deref_mut(),
        }
    }
    fn view_simd<'a>(&'a mut self, g: &'a [P]) -> TensorMut<'a, SimdCpu, P, S> {
        TensorMut {
            param: &mut self.p,
            grad: g,
            m: self.m.as_deref_mut(),
            v: self.v.as_deref_mut(),
            ibar: self.ib.as_deref_mut(),
        }
    }
    fn check(&self, what: &str, want: &Self) {
        assert_same(&format!("{what}: param"), &widen(&self.p), &widen(&want.p));
        for (name, a, b) in [
            ("m", &self.m, &want.m),
            ("v", &self.v, &want.v),
            ("ibar", &self.ib, &want.ib),
        ] {
            if let (Some(a), Some(b)) = (a, b) {
                assert_same(&format!("{what}: {name}"), &widen(a), &widen(b));
            }
        }
    }
}

fn coeffs(cfg: Config, sage: bool, t: u64, scale: f32) -> Coeffs {
    let group = if sage {
        ParamGroup::sage()
    } else {
        ParamGroup::plain()
    }
    .weight_decay(0.01);
    Optimizer::new(Cpu, cfg, [group])
        .unwrap()
        .coeffs(t, 0, scale)
        .unwrap()
}

/// Three fused steps on every backend and the portable path, compared after each.
fn fused_matches<P: Element, S: Element>() {
    let backends = backends();
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    for (case, cfg, sage) in cases() {
        for n in LENGTHS {
            let start = Buffers::<P, S>::new(&mut rng, &cfg, sage, n);
            let grads: Vec<Vec<P>> = (0..3)
                .map(|_| rng.vec(n).into_iter().map(P::from_f32).collect())
                .collect();
            let mut want = start.clone();
            let mut got: Vec<Buffers<P, S>> = backends.iter().map(|_| start.clone()).collect();
            for (t, g) in grads.iter().enumerate() {
                let k = coeffs(cfg, sage, t as u64 + 1, if t == 1 { 0.7 } else { 1.0 });
                Cpu.fused_step(want.view_cpu(g), &k).unwrap();
                for ((name, b), buf) in backends.iter().zip(got.iter_mut()) {
                    let mut b = *b;
                    b.fused_step(buf.view_simd(g), &k).unwrap();
                    let what = format!(
                        "{name} {}/{} {case} n={n} step {}",
                        P::DTYPE,
                        S::DTYPE,
                        t + 1
                    );
                    buf.check(&what, &want);
                }
            }
        }
    }
}

macro_rules! fused_tests {
    ($($name:ident: $p:ty, $s:ty;)*) => {$(
        #[test]
        fn $name() {
            fused_matches::<$p, $s>();
        }
    )*};
}

fused_tests! {
    fused_f32_f32: f32, f32;
    fused_f16_f32: f16, f32;
    fused_bf16_f32: bf16, f32;
    fused_bf16_bf16: bf16, bf16;
    fused_f16_f16: f16, f16;
    fused_f32_bf16: f32, bf16;
    fused_f32_f16: f32, f16;
    fused_bf16_f16: bf16, f16;
    fused_f16_bf16: f16, bf16;
}

/// NaN, ±Inf, subnormals, signed zeros and values at bf16/f16 rounding boundaries in every
/// input: the same NaN-ness and the same bits elsewhere.
fn specials_match<P: Element, S: Element>() {
    let specials = [
        f32::NAN,
        -f32::NAN,
        f32::INFINITY,
        f32::NEG_INFINITY,
        0.0,
        -0.0,
        1e-40,
        -1e-40,
        f32::MIN_POSITIVE,
        f32::MAX,
        1.0 + 1.0 / 256.0,
        1.0 + 3.0 / 256.0,
        f32::from_bits(0x3f80_8001),
        f32::from_bits(0x7f7f_ffff),
        65504.0,
        65520.0,
        6e-8,
        1.0,
        -2.5,
    ];
    let mut rng = Rng(7);
    let pick = |rng: &mut Rng| {
        specials[((rng.next() * 0.5 + 0.5) * specials.len() as f32) as usize % specials.len()]
    };
    for (case, cfg, sage) in cases() {
        let n = 257;
        let mut start = Buffers::<P, S>::new(&mut rng, &cfg, sage, n);
        for x in start.p.iter_mut() {
            *x = P::from_f32(pick(&mut rng));
        }
        for b in [&mut start.m, &mut start.v, &mut start.ib]
            .into_iter()
            .flatten()
        {
            for x in b.iter_mut().step_by(3) {
                *x = S::from_f32(pick(&mut rng));
            }
        }
        let g: Vec<P> = (0..n).map(|_| P::from_f32(pick(&mut rng))).collect();
        let k = coeffs(cfg, sage, 2, 1.0);
        let mut want = start.clone();
        Cpu.fused_step(want.view_cpu(&g), &k).unwrap();
        for (name, mut b) in backends() {
            let mut got = start.clone();
            b.fused_step(got.view_simd(&g), &k).unwrap();
            got.check(
                &format!("{name} {}/{} {case} specials", P::DTYPE, S::DTYPE),
                &want,
            );
        }
    }
}

#[test]
fn specials_f32() {
    specials_match::<f32, f32>();
}
#[test]
fn specials_bf16() {
    specials_match::<bf16, f32>();
    specials_match::<bf16, bf16>();
}
#[test]
fn specials_f16() {
    specials_match::<f16, f32>();
    specials_match::<f16, f16>();
}

/// Every level's bf16 and f16 conversions against `half`, over a spread of f32 bit patterns
/// (rounding ties, subnormals, overflow, NaN payloads): SGD momentum at its first step stores
/// `m = 0·m + 1·(g·1 + 0·θ)` rounded to the state type; with m = θ = −0 that is g exactly,
/// signed zeros and NaN included.
#[test]
fn conversions_match_half() {
    let mut bits: Vec<u32> = (0..=u32::MAX).step_by(65_521).collect();
    for hi in [
        0x0000u32, 0x3f80, 0x3f81, 0x7f7f, 0x7f80, 0x7fc0, 0x8000, 0xff80, 0x0001,
    ] {
        for lo in [
            0x0000u32, 0x0001, 0x7fff, 0x8000, 0x8001, 0xffff, 0x1000, 0x2000,
        ] {
            bits.push(hi << 16 | lo);
        }
    }
    let x: Vec<f32> = bits.iter().map(|&b| f32::from_bits(b)).collect();
    let n = x.len();
    let mut k = coeffs(Config::paper(Algorithm::sgd(0.0), 0.0), false, 1, 0.0);
    k.step = 0.0;
    k.l2 = 0.0;
    for (name, mut b) in backends() {
        // bf16 parameters through a step that changes nothing finite (θ·1 − 0·g): loads and
        // stores every pattern, and must agree with the portable path.
        let mut pb: Vec<bf16> = x.iter().map(|&v| bf16::from_f32(v)).collect();
        let g = vec![bf16::from_f32(0.0); n];
        let mut want = pb.clone();
        Cpu.fused_step(
            TensorMut::<Cpu, bf16, f32> {
                param: &mut want,
                grad: &g,
                m: None,
                v: None,
                ibar: None,
            },
            &k,
        )
        .unwrap();
        b.fused_step(
            TensorMut::<SimdCpu, bf16, f32> {
                param: &mut pb,
                grad: &g,
                m: None,
                v: None,
                ibar: None,
            },
            &k,
        )
        .unwrap();
        assert_same(
            &format!("{name} bf16 round trip"),
            &widen(&pb),
            &widen(&want),
        );
        // f32 → S rounding: SGD momentum with β1 = 0, α1 = 1 stores m = g (an f32 θ-free
        // gradient through l2 = 0, grad_scale = 1) rounded to S.
        let mut km = coeffs(Config::paper(Algorithm::sgd(0.9), 0.0), false, 1, 1.0);
        km.step = 0.0;
        let mut p = vec![-0f32; n];
        let mut m_bf = vec![bf16::from_f32(-0.0); n];
        b.fused_step(
            TensorMut::<SimdCpu, f32, bf16> {
                param: &mut p,
                grad: &x,
                m: Some(&mut m_bf),
                v: None,
                ibar: None,
            },
            &km,
        )
        .unwrap();
        let want: Vec<u16> = x.iter().map(|&v| bf16::from_f32(v).to_bits()).collect();
        let got: Vec<u16> = m_bf.iter().map(|v| v.to_bits()).collect();
        for i in 0..n {
            assert_eq!(got[i], want[i], "{name}: bf16::from_f32({:#x})", bits[i]);
        }
        let mut p = vec![-0f32; n];
        let mut m_h = vec![f16::from_f32(-0.0); n];
        b.fused_step(
            TensorMut::<SimdCpu, f32, f16> {
                param: &mut p,
                grad: &x,
                m: Some(&mut m_h),
                v: None,
                ibar: None,
            },
            &km,
        )
        .unwrap();
        for i in 0..n {
            let w = f16::from_f32(x[i]);
            let gt = m_h[i];
            assert!(
                w.to_bits() == gt.to_bits() || (w.is_nan() && gt.is_nan()),
                "{name}: f16::from_f32({:#x}): {:#x} vs {:#x}",
                bits[i],
                gt.to_bits(),
                w.to_bits()
            );
        }
    }
}

/// A multi-tensor step through the optimizer (two groups, clipping, the non-finite guard,
/// tensors of every tail length) equals the portable backend's, at every level and with
/// threads; and a NaN gradient skips the step on both.
#[test]
fn optimizer_multi_tensor_matches() {
    let cfg = Config::reference(Algorithm::adamw(), 1e-3).global_clip(1.0);
    let groups = [ParamGroup::sage().weight_decay(0.01), ParamGroup::plain()];
    let mut rng = Rng(42);
    let lens: Vec<usize> = LENGTHS.iter().chain(&[70_000, 3]).copied().collect();
    let init: Vec<Vec<f32>> = lens.iter().map(|&n| rng.vec(n)).collect();
    let grads: Vec<Vec<Vec<f32>>> = (0..3)
        .map(|_| lens.iter().map(|&n| rng.vec(n)).collect())
        .collect();
    let run = |b: SimdCpu, portable: bool, nan_at: Option<usize>| -> Vec<Vec<f32>> {
        let mut params = init.clone();
        let mut state: Vec<TensorState<Vec<f32>>> = lens
            .iter()
            .enumerate()
            .map(|(i, &n)| TensorState::zeros(cfg.state_layout(i % 2 == 0), n))
            .collect();
        let mut opt_s = Optimizer::new(b, cfg, groups).unwrap();
        let mut opt_p = Optimizer::new(Cpu, cfg, groups).unwrap();
        for (s, g) in grads.iter().enumerate() {
            let mut g = g.clone();
            if nan_at == Some(s) {
                g[lens.len() - 2][123] = f32::NAN;
            }
            macro_rules! tensors {
                () => {
                    params
                        .iter_mut()
                        .zip(state.iter_mut())
                        .zip(&g)
                        .enumerate()
                        .map(|(i, ((p, st), g))| {
                            ParamTensor::new(&mut p[..], &g[..], st.view()).group(i % 2)
                        })
                        .collect::<Vec<_>>()
                };
            }
            let report = if portable {
                opt_p.step(&mut tensors!()).unwrap()
            } else {
                opt_s.step(&mut tensors!()).unwrap()
            };
            assert_eq!(report.applied(), nan_at != Some(s));
        }
        params
    };
    let want = run(SimdCpu::new(), true, None);
    let want_nan = run(SimdCpu::new(), true, Some(1));
    for (name, b) in backends()
        .into_iter()
        .chain([("default".to_string(), SimdCpu::new())])
    {
        for (got, want) in [
            (run(b, false, None), &want),
            (run(b, false, Some(1)), &want_nan),
        ] {
            for (i, (a, w)) in got.iter().zip(want).enumerate() {
                assert_same(&format!("{name} tensor {i}"), a, w);
            }
        }
    }
}

/// Layouts no kernel covers (a SAGE tensor without Ī, an Ī on a plain tensor, unequal
/// lengths) fall back to the portable path and give its results.
#[test]
fn uncovered_layouts_fall_back() {
    let cfg = Config::paper(Algorithm::adam(), 1e-3);
    let mut rng = Rng(3);
    let n = 33;
    let p0 = rng.vec(n);
    let g = rng.vec(n);
    for sage in [true, false] {
        let k = coeffs(cfg, sage, 1, 1.0);
        for (name, mut b) in backends() {
            // ibar present iff not sage: the opposite of the canonical layout
            let (mut p1, mut m1, mut v1, mut i1) = (
                p0.clone(),
                vec![0.1f32; n],
                vec![0.2f32; n],
                vec![0.3f32; n],
            );
            let (mut p2, mut m2, mut v2, mut i2) = (p1.clone(), m1.clone(), v1.clone(), i1.clone());
            let ib1 = (!sage).then_some(&mut i1[..]);
            let ib2 = (!sage).then_some(&mut i2[..]);
            Cpu.fused_step(
                TensorMut {
                    param: &mut p1,
                    grad: &g,
                    m: Some(&mut m1),
                    v: Some(&mut v1),
                    ibar: ib1,
                },
                &k,
            )
            .unwrap();
            b.fused_step(
                TensorMut {
                    param: &mut p2,
                    grad: &g,
                    m: Some(&mut m2),
                    v: Some(&mut v2),
                    ibar: ib2,
                },
                &k,
            )
            .unwrap();
            assert_same(&format!("{name} sage={sage} odd layout"), &p2, &p1);
            assert_same(&format!("{name} sage={sage} odd layout m"), &m2, &m1);
        }
    }
    // A gradient shorter than the parameter: both step the common prefix.
    let k = coeffs(cfg, false, 1, 1.0);
    for (name, mut b) in backends() {
        let (mut p1, mut m1, mut v1) = (p0.clone(), vec![0f32; n], vec![0f32; n]);
        let (mut p2, mut m2, mut v2) = (p0.clone(), vec![0f32; n], vec![0f32; n]);
        Cpu.fused_step(
            TensorMut {
                param: &mut p1,
                grad: &g[..20],
                m: Some(&mut m1),
                v: Some(&mut v1),
                ibar: None,
            },
            &k,
        )
        .unwrap();
        b.fused_step(
            TensorMut {
                param: &mut p2,
                grad: &g[..20],
                m: Some(&mut m2),
                v: Some(&mut v2),
                ibar: None,
            },
            &k,
        )
        .unwrap();
        assert_same(&format!("{name} short grad"), &p2, &p1);
    }
}

/// Gradient norms: the SIMD levels and the portable backend sum in different orders and
/// precisions (see `sage_cpu::portable::chunk_partial` and the kernels' `sq_norm_lanes`), so
/// they agree within the stated error bound, and both are non-finite whenever an element is.
#[test]
fn sq_norms() {
    let mut rng = Rng(5);
    for n in LENGTHS.iter().chain(&[200_000]) {
        let x = rng.vec(*n);
        let want = sage_cpu::portable::sq_norm(&x);
        for (name, mut b) in backends() {
            let got = b.sq_norm(&x[..]).unwrap();
            assert!(
                (got - want).abs() <= sage_cpu::portable::NORM_REL_ERROR * want,
                "{name} n={n}: {got} vs {want}"
            );
            if *n > 0 {
                let mut y = x.clone();
                y[n / 2] = f32::INFINITY;
                assert!(!b.sq_norm(&y[..]).unwrap().is_finite(), "{name}: Inf");
                y[n / 2] = f32::NAN;
                assert!(b.sq_norm(&y[..]).unwrap().is_nan(), "{name}: NaN");
            }
        }
    }
}

/// The norm contract: a multi-tensor norm (threaded or not) equals each buffer's own
/// `sq_norm` bit for bit, and the chunk partials of two pieces split on the chunk grid equal
/// the whole buffer's.
#[test]
fn norms_follow_the_chunk_grid() {
    use sage_core::norm::{chunk_count, NORM_CHUNK};
    let mut rng = Rng(9);
    let lens = [3 * NORM_CHUNK + 17, 70_000, 5, NORM_CHUNK];
    let grads: Vec<Vec<f32>> = lens.iter().map(|&n| rng.vec(n)).collect();
    let cfg = Config::paper(Algorithm::sgd(0.0), 1e-3);
    for (name, b) in backends().into_iter().chain([(
        "threaded".to_string(),
        SimdCpu::new().threads(3).min_parallel(0),
    )]) {
        let mut b2 = b;
        let mut params: Vec<Vec<f32>> = grads.clone();
        let mut states: Vec<TensorState<Vec<f32>>> = lens
            .iter()
            .map(|&n| TensorState::zeros(cfg.state_layout(false), n))
            .collect();
        let mut ts: Vec<ParamTensor<'_, SimdCpu, f32, f32>> = params
            .iter_mut()
            .zip(&grads)
            .zip(states.iter_mut())
            .map(|((p, g), s)| ParamTensor::new(&mut p[..], &g[..], s.view()))
            .collect();
        b2.grad_sq_norms(&mut ts).unwrap();
        for (t, g) in ts.iter().zip(&grads) {
            let own = b2.sq_norm(&g[..]).unwrap();
            assert_eq!(t.grad_sq_norm().to_bits(), own.to_bits(), "{name}");
        }
        let g = &grads[0];
        let mut whole = vec![0f64; chunk_count(g.len())];
        b2.sq_norm_chunks(&g[..], 0, &mut whole).unwrap();
        let cut = 2 * NORM_CHUNK;
        let (mut a, mut c) = (vec![0f64; 2], vec![0f64; chunk_count(g.len() - cut)]);
        b2.sq_norm_chunks(&g[..cut], 0, &mut a).unwrap();
        b2.sq_norm_chunks(&g[cut..], 0, &mut c).unwrap();
        a.extend(c);
        assert_eq!(a, whole, "{name}: partials of pieces");
    }
}

/// Non-finite parameters are counted in the update pass, exactly, at every level, threaded or
/// not, in whole registers and tails alike; the portable backend counts too.
#[test]
fn non_finite_parameters_are_counted_in_the_update() {
    let cfg = Config::reference(Algorithm::adamw(), 1e-3);
    let lens = [17usize, 70_001, 5];
    let bad_at: [&[usize]; 3] = [&[16], &[0, 15, 16, 33_333, 70_000], &[]];
    type Steps<'s> = &'s mut dyn FnMut(&mut [ParamTensor<'_, SimdCpu, f32, f32>]);
    let run = |b: Steps<'_>| {
        let mut rng = Rng(77);
        let mut params: Vec<Vec<f32>> = lens.iter().map(|&n| rng.vec(n)).collect();
        for (p, at) in params.iter_mut().zip(bad_at) {
            for (k, &i) in at.iter().enumerate() {
                p[i] = if k % 2 == 0 {
                    f32::NAN
                } else {
                    f32::NEG_INFINITY
                };
            }
        }
        let grads: Vec<Vec<f32>> = lens.iter().map(|&n| rng.vec(n)).collect();
        let mut states: Vec<TensorState<Vec<f32>>> = lens
            .iter()
            .map(|&n| TensorState::zeros(cfg.state_layout(true), n))
            .collect();
        let mut ts: Vec<ParamTensor<'_, SimdCpu, f32, f32>> = params
            .iter_mut()
            .zip(&grads)
            .zip(states.iter_mut())
            .map(|((p, g), s)| ParamTensor::new(&mut p[..], &g[..], s.view()))
            .collect();
        let opt = Optimizer::new(SimdCpu::new(), cfg, [ParamGroup::sage()]).unwrap();
        for t in ts.iter_mut() {
            t.set_coeffs(opt.coeffs(1, 0, 1.0).unwrap());
        }
        b(&mut ts);
        ts.iter().map(|t| t.non_finite()).collect::<Vec<_>>()
    };
    let want: Vec<Option<u64>> = bad_at.iter().map(|a| Some(a.len() as u64)).collect();
    for (name, mut b) in backends().into_iter().chain([(
        "threaded".to_string(),
        SimdCpu::new().threads(3).min_parallel(0).chunk(64),
    )]) {
        let got = run(&mut |ts| b.step_tensors(ts).unwrap());
        assert_eq!(got, want, "{name}");
    }
    // The portable backend, through the same slots.
    let mut rng = Rng(78);
    let mut p = rng.vec(9);
    p[4] = f32::NAN;
    let g = rng.vec(9);
    let mut st = TensorState::<Vec<f32>>::zeros(cfg.state_layout(true), 9);
    let mut opt = Optimizer::new(Cpu, cfg, [ParamGroup::sage()]).unwrap();
    let rep = opt
        .step(&mut [ParamTensor::new(&mut p[..], &g[..], st.view())])
        .unwrap();
    assert!(rep.params_checked);
    assert_eq!(rep.non_finite_params, Some(0));
}

#[test]
fn forcing_an_unavailable_level_is_an_error() {
    for level in Level::ALL {
        assert_eq!(SimdCpu::with_level(level).is_ok(), level.is_available());
    }
    assert!(Level::Portable.is_available());
    assert!(Level::best().is_available());
    #[cfg(target_arch = "aarch64")]
    assert!(!Level::Avx2.is_available());
    #[cfg(target_arch = "x86_64")]
    assert!(!Level::Neon.is_available());
}

/// Every tail, for every storage type a masked tail serves: a tensor cut from the middle of
/// larger buffers is stepped as the portable path steps it, and nothing before or after it
/// is read into the result or written (masked loads and stores must reach exactly `n`).
fn nothing_past_the_tensor<P: Element, S: Element>() {
    const PAD: usize = 5;
    let mut rng = Rng(0x51_7cc1_b727_220a);
    let cfg = Config::paper(Algorithm::adam(), 1e-3);
    for n in 0..=40 {
        // NaN around the tensor: a lane that read it would turn its result NaN.
        let fill = |rng: &mut Rng, pos: bool| -> Vec<f32> {
            let mut x = vec![f32::NAN; n + 2 * PAD];
            for v in &mut x[PAD..PAD + n] {
                let r = rng.value();
                *v = if pos { r.abs() } else { r };
            }
            x
        };
        let s = |x: Vec<f32>| -> Vec<S> { x.into_iter().map(S::from_f32).collect() };
        let p = |x: Vec<f32>| -> Vec<P> { x.into_iter().map(P::from_f32).collect() };
        let start = Buffers::<P, S> {
            p: p(fill(&mut rng, false)),
            m: Some(s(fill(&mut rng, false))),
            v: Some(s(fill(&mut rng, true))),
            ib: Some(s(fill(&mut rng, true))),
        };
        let g = p(fill(&mut rng, false));
        let k = coeffs(cfg, true, 3, 1.0);
        let window = PAD..PAD + n;
        let cut = |b: &mut Buffers<P, S>| Buffers::<P, S> {
            p: b.p[window.clone()].to_vec(),
            m: b.m.as_ref().map(|x| x[window.clone()].to_vec()),
            v: b.v.as_ref().map(|x| x[window.clone()].to_vec()),
            ib: b.ib.as_ref().map(|x| x[window.clone()].to_vec()),
        };
        let mut want = cut(&mut start.clone());
        Cpu.fused_step(want.view_cpu(&g[window.clone()]), &k)
            .unwrap();
        let want_norm = sage_cpu::portable::sq_norm(&g[window.clone()]);
        for (name, b) in backends() {
            let mut b = b;
            // The norm's masked tail stops at `n` too: the NaN after it stays out.
            let norm = b.sq_norm(&g[window.clone()]).unwrap();
            assert!(
                (norm - want_norm).abs() <= sage_cpu::portable::NORM_REL_ERROR * want_norm,
                "{name} {}: n={n}: norm {norm} vs portable {want_norm}",
                P::DTYPE
            );
            let mut got = start.clone();
            b.fused_step(
                TensorMut {
                    param: &mut got.p[window.clone()],
                    grad: &g[window.clone()],
                    m: got.m.as_mut().map(|x| &mut x[window.clone()]),
                    v: got.v.as_mut().map(|x| &mut x[window.clone()]),
                    ibar: got.ib.as_mut().map(|x| &mut x[window.clone()]),
                },
                &k,
            )
            .unwrap();
            let what = format!("{name} {}/{} n={n}", P::DTYPE, S::DTYPE);
            cut(&mut got).check(&what, &want);
            let outside = |x: &[f32]| -> Vec<u32> {
                x[..PAD]
                    .iter()
                    .chain(&x[PAD + n..])
                    .map(|v| v.to_bits())
                    .collect()
            };
            for (buf, a, b) in [
                ("param", widen(&got.p), widen(&start.p)),
                (
                    "m",
                    widen(got.m.as_ref().unwrap()),
                    widen(start.m.as_ref().unwrap()),
                ),
                (
                    "v",
                    widen(got.v.as_ref().unwrap()),
                    widen(start.v.as_ref().unwrap()),
                ),
                (
                    "ibar",
                    widen(got.ib.as_ref().unwrap()),
                    widen(start.ib.as_ref().unwrap()),
                ),
            ] {
                assert_eq!(outside(&a), outside(&b), "{what}: {buf} written outside");
            }
        }
    }
}

#[test]
fn tails_touch_nothing_past_the_tensor() {
    nothing_past_the_tensor::<f32, f32>();
    nothing_past_the_tensor::<bf16, f32>();
    nothing_past_the_tensor::<f16, f32>();
    nothing_past_the_tensor::<bf16, bf16>();
    nothing_past_the_tensor::<f16, f16>();
    nothing_past_the_tensor::<f32, bf16>();
}

/// `step_tensors` called directly (not through an optimizer, which refuses them first) with
/// buffers of unequal lengths, small and large, among good ones: every level and thread
/// split steps them as `Cpu` does (the common prefix), and the good ones as usual.
#[test]
fn unequal_lengths_in_a_multi_tensor_step_take_the_portable_path() {
    let cfg = Config::paper(Algorithm::adam(), 1e-3);
    let k = coeffs(cfg, false, 2, 1.0);
    let mut rng = Rng(11);
    // (parameter length, gradient length); with chunk(16), 40 and 70 are cut into pieces.
    let shapes = [(5, 5), (7, 3), (40, 40), (70, 50), (9, 9), (20, 20)];
    let mut params: Vec<Vec<f32>> = shapes.iter().map(|&(n, _)| rng.vec(n)).collect();
    // A NaN parameter in the stepped part of a short-gradient tensor, small and large, and of
    // a good large one: each tensor's count must say so.
    for (t, at) in [(1, 1), (3, 10), (2, 30)] {
        params[t][at] = f32::NAN;
    }
    let grads: Vec<Vec<f32>> = shapes.iter().map(|&(_, n)| rng.vec(n)).collect();
    type Out = (Vec<Vec<f32>>, Vec<Vec<f32>>, Vec<Option<u64>>);
    let run = |mut b: SimdCpu, portable: bool| -> Out {
        let mut p = params.clone();
        let mut m: Vec<Vec<f32>> = shapes.iter().map(|&(n, _)| vec![0.1; n]).collect();
        let mut v: Vec<Vec<f32>> = shapes.iter().map(|&(n, _)| vec![0.2; n]).collect();
        let mut steps = vec![1u64; shapes.len()];
        macro_rules! tensors {
            ($b:ty) => {
                p.iter_mut()
                    .zip(&grads)
                    .zip(m.iter_mut().zip(v.iter_mut()))
                    .zip(steps.iter_mut())
                    .map(|(((p, g), (m, v)), step)| {
                        let state: sage_core::StateMut<'_, [f32]> = TensorState {
                            m: Some(&mut m[..]),
                            v: Some(&mut v[..]),
                            ibar: None,
                            step,
                        };
                        let mut t = ParamTensor::<$b, f32, f32>::new(&mut p[..], &g[..], state);
                        t.set_coeffs(k);
                        t
                    })
                    .collect::<Vec<_>>()
            };
        }
        let counts = if portable {
            Cpu.step_tensors(&mut tensors!(Cpu)).unwrap();
            Vec::new()
        } else {
            let mut ts = tensors!(SimdCpu);
            b.step_tensors(&mut ts).unwrap();
            ts.iter().map(|t| t.non_finite()).collect()
        };
        (p, m, counts)
    };
    let want = run(SimdCpu::new(), true);
    for (name, b) in backends() {
        let got = run(b, false);
        for (i, ((p, w), (m, wm))) in got
            .0
            .iter()
            .zip(&want.0)
            .zip(got.1.iter().zip(&want.1))
            .enumerate()
        {
            assert_same(&format!("{name} tensor {i} param"), p, w);
            assert_same(&format!("{name} tensor {i} m"), m, wm);
        }
        let want_counts: Vec<Option<u64>> = want
            .0
            .iter()
            .zip(&shapes)
            .map(|(p, &(_, ng))| Some(p[..ng].iter().filter(|x| !x.is_finite()).count() as u64))
            .collect();
        assert_eq!(got.2, want_counts, "{name}: non-finite counts");
        assert_eq!(want_counts.iter().flatten().sum::<u64>(), 3);
    }
}
