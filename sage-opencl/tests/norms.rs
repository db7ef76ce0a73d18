//! Gradient norms on sage-core's chunk grid ([`sage_core::norm`]): every path (one buffer, many
//! tensors in few launches, windows of chunks, the optimizer's partials) gives the same bits,
//! a partial depends on its chunk's contents only, and the float path of devices without
//! `cl_khr_fp64` neither overflows nor hides a NaN. Also the `HostBuffers` capability.

mod common;

use common::{device, rng, to};
use rand::Rng;
use sage_core::norm::{self, NORM_CHUNK};
use sage_core::{
    bf16, f16, Algorithm, Backend, BackendError, Config, Element, ErrorKind, GlobalNorms,
    HostBuffers, Optimizer, ParamGroup, ParamTensor, TensorState,
};
use sage_opencl::{ClBuffer, OpenCl, Select};

/// The device's backend with `per` tensors per launch, the double or the float path, and
/// `per_item` elements per work-item (1: a work-group sums each chunk, as on GPUs; more: one
/// work-item does, as on CPU devices).
fn variant(cl: &OpenCl, per: Option<usize>, fp64: bool, per_item: usize) -> OpenCl {
    let mut b = OpenCl::builder()
        .device(Select::Index {
            platform: cl.device().platform,
            device: cl.device().device,
        })
        .f64_norms(fp64)
        .elements_per_item(per_item);
    if let Some(n) = per {
        b = b.max_tensors_per_launch(n);
    }
    b.build().unwrap()
}

/// Both accumulation paths the device has (the double one only with `cl_khr_fp64`), each in
/// both forms of the kernel (a work-group per chunk, a work-item per chunk).
fn paths(cl: &OpenCl) -> Vec<OpenCl> {
    let mut v = Vec::new();
    for per_item in [1, sage_opencl::CPU_ELEMENTS_PER_ITEM] {
        let f = variant(cl, None, false, per_item);
        assert!(!f.f64_norms());
        v.push(f);
        if cl.device().fp64 {
            let d = variant(cl, None, true, per_item);
            assert!(d.f64_norms());
            v.push(d);
        }
    }
    v
}

/// Relative tolerance of a partial against the CPU's in-order f64 sum.
fn tolerance(cl: &OpenCl) -> f64 {
    if cl.f64_norms() {
        1e-12
    } else {
        1e-5
    }
}

/// Values over 2^-10 .. 2^10 times `scale` (so the order of additions shows in the bits),
/// about one in eight exactly 0.
fn spread(r: &mut rand::rngs::StdRng, n: usize, scale: f32) -> Vec<f32> {
    (0..n)
        .map(|_| {
            if r.gen_ratio(1, 8) {
                0.0
            } else {
                r.gen_range(-scale..=scale) * 2f32.powi(r.gen_range(-10..=10))
            }
        })
        .collect()
}

const LENS: [usize; 14] = [
    0,
    1,
    7,
    NORM_CHUNK - 1,
    NORM_CHUNK,
    NORM_CHUNK + 1,
    0,
    5,
    2 * NORM_CHUNK,
    3 * NORM_CHUNK + 3,
    17,
    70_001,
    9,
    NORM_CHUNK / 2,
];

fn bits(x: &[f64]) -> Vec<u64> {
    x.iter().map(|v| v.to_bits()).collect()
}

/// Every path to the norms of many tensors, on backend `cl`: returns all partials.
fn every_path<E: Element>(cl: &mut OpenCl, host: &[Vec<E>]) -> Vec<f64> {
    let what = format!(
        "{} ({} per launch, {} per work-item, {})",
        E::DTYPE,
        cl.tensors_per_launch(),
        cl.elements_per_item(),
        if cl.f64_norms() { "double" } else { "float" }
    );
    let grads: Vec<ClBuffer<E>> = host.iter().map(|h| cl.upload(h).unwrap()).collect();
    let mut params: Vec<ClBuffer<E>> = grads.iter().map(|g| cl.zeros(g.len()).unwrap()).collect();
    let cfg = Config::paper(Algorithm::sgd(0.0), 0.1).skip_non_finite(true);
    let mut states: Vec<TensorState<ClBuffer<f32>>> = grads
        .iter()
        .map(|_| TensorState::new(cfg.state_layout(false), || unreachable!()))
        .collect();
    let mut ts: Vec<ParamTensor<'_, OpenCl, E, f32>> = params
        .iter_mut()
        .zip(&grads)
        .zip(&mut states)
        .map(|((p, g), s)| ParamTensor::new(p, g, s.view()))
        .collect();
    let total: usize = grads.iter().map(|g| norm::chunk_count(g.len())).sum();
    // All partials of all tensors (one launch per slot group, one read).
    let mut all = vec![-1f64; total];
    cl.grad_norm_partials(&ts, &mut all).unwrap();
    // == each buffer's own, back to back.
    let mut each = Vec::new();
    for g in &grads {
        let mut p = vec![-1f64; norm::chunk_count(g.len())];
        cl.sq_norm_chunks(g, 0, &mut p).unwrap();
        each.extend(p);
    }
    assert_eq!(bits(&all), bits(&each), "{what}: partials");
    // == what the driver gathers for a data-parallel step.
    let mut opt = Optimizer::new(cl.clone(), cfg, [ParamGroup::plain()]).unwrap();
    let mut gathered = vec![-1f64; opt.partials_len(&mut ts).unwrap()];
    opt.grad_norm_partials(&mut ts, &mut gathered).unwrap();
    assert_eq!(bits(&gathered), bits(&all), "{what}: optimizer partials");
    // Close to the CPU's in-order partials.
    let tol = tolerance(cl);
    let mut at = 0;
    for h in host {
        for c in h.chunks(NORM_CHUNK) {
            let want = norm::chunk_partial(c);
            assert!(
                (all[at] - want).abs() <= tol * want,
                "{what}: partial {at} is {} for {want}",
                all[at]
            );
            at += 1;
        }
    }
    // Every tensor's norm in one call == the fold of its partials == sq_norm, bit for bit.
    cl.grad_sq_norms(&mut ts).unwrap();
    let grad_refs: Vec<&ClBuffer<E>> = grads.iter().collect();
    let batch = cl.sq_norms(&grad_refs).unwrap();
    let mut at = 0;
    for (i, (t, g)) in ts.iter().zip(&grads).enumerate() {
        let n = norm::chunk_count(g.len());
        let folded = norm::fold(all[at..at + n].iter().copied());
        at += n;
        assert_eq!(
            t.grad_sq_norm().to_bits(),
            folded.to_bits(),
            "{what}: tensor {i}"
        );
        assert_eq!(cl.sq_norm(g).unwrap().to_bits(), folded.to_bits(), "{what}");
        assert_eq!(batch[i].to_bits(), folded.to_bits(), "{what}");
        if g.is_empty() {
            assert_eq!(folded.to_bits(), 0f64.to_bits());
        }
    }
    all
}

fn many_tensors<E: Element>(base: &OpenCl, scale: f32) {
    let mut r = rng(21);
    let host: Vec<Vec<E>> = LENS
        .iter()
        .map(|&n| to(&spread(&mut r, n, scale)))
        .collect();
    for mut cl in paths(base) {
        let fp64 = cl.f64_norms();
        let all = every_path::<E>(&mut cl, &host);
        // Other launch partitions (one tensor per launch, three) give the same partials.
        for per in [1, 3] {
            let mut other = variant(base, Some(per), fp64, cl.elements_per_item());
            assert_eq!(bits(&every_path::<E>(&mut other, &host)), bits(&all));
        }
        // So do the same gradients cut from one slab (packed launches).
        let (_, pieces) = cl.slab::<E>(&LENS).unwrap();
        let mut slab = Vec::new();
        for (mut piece, h) in pieces.into_iter().zip(&host) {
            cl.write(&mut piece, h).unwrap();
            slab.push(piece);
        }
        let refs: Vec<&ClBuffer<E>> = slab.iter().collect();
        let before = cl.launch_counts().packed_norms;
        let batch = cl.sq_norms(&refs).unwrap();
        assert!(
            cl.launch_counts().packed_norms > before,
            "the slab's norms are packed"
        );
        let mut at = 0;
        for (i, g) in slab.iter().enumerate() {
            let n = norm::chunk_count(g.len());
            let folded = norm::fold(all[at..at + n].iter().copied());
            assert_eq!(batch[i].to_bits(), folded.to_bits(), "slab tensor {i}");
            at += n;
        }
    }
}

/// More tensors than one launch takes, empty ones among them: `grad_sq_norms` over them all
/// equals the fold of their `sq_norm_chunks` partials, bit for bit, on every path and every
/// launch partition.
#[test]
fn grad_sq_norms_are_the_fold_of_the_chunk_partials() {
    let Some(cl) = device() else { return };
    many_tensors::<f32>(&cl, 3.0);
    many_tensors::<f16>(&cl, 0.05);
    many_tensors::<bf16>(&cl, 1e30);
}

/// A buffer cut at a chunk boundary into two buffers: their partials, back to back, are the
/// whole buffer's; so is any window of the whole buffer's chunks.
#[test]
fn partials_of_a_split_buffer_are_the_partials_of_the_whole() {
    let Some(base) = device() else { return };
    let mut r = rng(5);
    let whole: Vec<f32> = spread(&mut r, 10 * NORM_CHUNK + 123, 2.0);
    for mut cl in paths(&base) {
        let d = cl.upload(&whole).unwrap();
        let mut want = vec![0f64; 11];
        cl.sq_norm_chunks(&d, 0, &mut want).unwrap();
        for cut in [1, 4, 10] {
            let (a, b) = whole.split_at(cut * NORM_CHUNK);
            let (da, db) = (cl.upload(a).unwrap(), cl.upload(b).unwrap());
            let mut got = vec![0f64; 11];
            let (ga, gb) = got.split_at_mut(cut);
            cl.sq_norm_chunks(&da, 0, ga).unwrap();
            cl.sq_norm_chunks(&db, 0, gb).unwrap();
            assert_eq!(bits(&got), bits(&want), "cut at chunk {cut}");
            // The second piece's partials as a window of the whole buffer.
            let mut w = vec![0f64; 11 - cut];
            cl.sq_norm_chunks(&d, cut, &mut w).unwrap();
            assert_eq!(bits(&w), bits(&want[cut..]), "window from chunk {cut}");
        }
        // The same chunk contents at a different place of another buffer.
        let mut shifted = spread(&mut r, NORM_CHUNK, 1.0);
        shifted.extend_from_slice(&whole[3 * NORM_CHUNK..4 * NORM_CHUNK]);
        let ds = cl.upload(&shifted).unwrap();
        let mut p = [0f64; 2];
        cl.sq_norm_chunks(&ds, 0, &mut p).unwrap();
        assert_eq!(p[1].to_bits(), want[3].to_bits());
        // An empty window is fine; one past the end is an error that changes nothing.
        cl.sq_norm_chunks(&d, 11, &mut []).unwrap();
        let mut w = [7f64; 2];
        let e = cl.sq_norm_chunks(&d, 10, &mut w).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::LengthMismatch, "{e}");
        assert_eq!(w, [7.0; 2]);
        let e = cl
            .grad_norm_partials::<f32, f32>(&[], &mut [0.0])
            .unwrap_err();
        assert_eq!(e.kind(), ErrorKind::LengthMismatch, "{e}");
    }
}

/// NaN and ±Inf make exactly their chunk's partial non-finite, on both paths; huge finite
/// values do not overflow even without doubles; tiny ones are not lost.
#[test]
fn non_finite_chunks_and_extreme_magnitudes() {
    let Some(base) = device() else { return };
    let n = 3 * NORM_CHUNK + 5;
    for mut cl in paths(&base) {
        let path = if cl.f64_norms() { "double" } else { "float" };
        for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
            for at in [0, NORM_CHUNK + 17, n - 1] {
                let mut x = vec![0.5f32; n];
                x[at] = bad;
                // NaN hides behind fmax: put the largest finite value in the same chunk.
                x[(at / NORM_CHUNK) * NORM_CHUNK + 1] = 1e30;
                let d = cl.upload(&x).unwrap();
                let mut p = [0f64; 4];
                cl.sq_norm_chunks(&d, 0, &mut p).unwrap();
                for (c, v) in p.iter().enumerate() {
                    let hit = c == at / NORM_CHUNK;
                    assert_eq!(!v.is_finite(), hit, "{path}: {bad} at {at}: {p:?}");
                    if hit && bad.is_nan() {
                        assert!(v.is_nan(), "{path}: {p:?}");
                    }
                    if hit && bad.is_infinite() {
                        assert_eq!(*v, f64::INFINITY, "{path}: {p:?}");
                    }
                }
                let h = cl.upload(&to::<bf16>(&x)).unwrap();
                assert!(!cl.sq_norm(&h).unwrap().is_finite(), "{path} bf16");
                let h = cl.upload(&to::<f16>(&x)).unwrap();
                assert!(!cl.sq_norm(&h).unwrap().is_finite(), "{path} f16");
            }
        }
        let tol = tolerance(&cl);
        for (v, len) in [(3.0e38f32, 5000usize), (1e19, 8), (1e-40, 4096), (1e-20, 3)] {
            let d = cl.upload(&vec![v; len]).unwrap();
            let got = cl.sq_norm(&d).unwrap();
            let want = len as f64 * (v as f64) * (v as f64);
            assert!(
                got.is_finite() && (got - want).abs() <= tol * want,
                "{path}: {len} x {v:e}: {got:e} vs {want:e}"
            );
        }
    }
}

/// A step with norms gathered from partials equals the step that computes its own, bit for
/// bit (global and per-tensor clipping on).
#[test]
fn step_with_gathered_norms_equals_the_step() {
    let Some(cl) = device() else { return };
    let cfg = Config::reference(Algorithm::adamw(), 1e-2)
        .beta0(0.8)
        .global_clip(0.5)
        .per_tensor_clip(0.3);
    let lens = [5usize, NORM_CHUNK + 9, 0, 20_001];
    let mut r = rng(9);
    let host: Vec<(Vec<f32>, Vec<f32>)> = lens
        .iter()
        .map(|&n| (spread(&mut r, n, 1.0), spread(&mut r, n, 0.01)))
        .collect();
    let run = |given: bool| -> (Vec<Vec<f32>>, f64) {
        let mut opt = Optimizer::new(cl.clone(), cfg, [ParamGroup::sage()]).unwrap();
        let mut ps: Vec<ClBuffer<f32>> = host.iter().map(|h| cl.upload(&h.0).unwrap()).collect();
        let gs: Vec<ClBuffer<f32>> = host.iter().map(|h| cl.upload(&h.1).unwrap()).collect();
        let mut st: Vec<TensorState<ClBuffer<f32>>> = lens
            .iter()
            .map(|&n| TensorState::try_new(cfg.state_layout(true), |_| cl.zeros(n)).unwrap())
            .collect();
        let mut ts: Vec<ParamTensor<'_, OpenCl, f32, f32>> = ps
            .iter_mut()
            .zip(&gs)
            .zip(&mut st)
            .map(|((p, g), s)| ParamTensor::new(p, g, s.view()))
            .collect();
        let report = if given {
            let mut parts = vec![0f64; opt.partials_len(&mut ts).unwrap()];
            opt.grad_norm_partials(&mut ts, &mut parts).unwrap();
            let mut per = vec![0f64; lens.len()];
            let total = norm::reduce(&parts, &lens, &mut per).unwrap();
            opt.step_with_norms(
                &mut ts,
                GlobalNorms {
                    total_sq: total,
                    per_tensor_sq: &per,
                },
            )
            .unwrap()
        } else {
            opt.step(&mut ts).unwrap()
        };
        assert!(report.applied());
        assert_eq!(report.tensors, lens.len());
        drop(ts);
        assert!(st.iter().all(|s| s.step == 1));
        let host = ps.iter().map(|p| cl.download(p).unwrap()).collect();
        (host, report.grad_norm.unwrap())
    };
    let (a, na) = run(false);
    let (b, nb) = run(true);
    assert_eq!(na.to_bits(), nb.to_bits());
    assert_eq!(a, b);
}

/// `HostBuffers`: the name reports use, uploads, copies both ways, length errors.
#[test]
fn host_buffers_round_trip() {
    let Some(mut cl) = device() else { return };
    let mut name = String::new();
    cl.describe(&mut name).unwrap();
    let d = cl.device();
    assert_eq!(
        name,
        format!("opencl:{}:{} ({})", d.platform, d.device, d.name)
    );
    assert!(cl.supports(sage_core::DType::F16));
    let x: Vec<bf16> = to(&spread(&mut rng(1), 1000, 1.0));
    let mut buf = HostBuffers::upload(&mut cl, &x).unwrap();
    assert_eq!(cl.to_host::<bf16>(&buf).unwrap(), x);
    let y: Vec<bf16> = to(&spread(&mut rng(2), 1000, 1.0));
    cl.write_host(&mut buf, &y).unwrap();
    let mut back = vec![bf16::ZERO; 1000];
    cl.read_host(&buf, &mut back).unwrap();
    assert_eq!(back, y);
    assert!(cl.read_host(&buf, &mut back[..3]).is_err());
    assert!(cl.write_host(&mut buf, &y[..3]).is_err());
    let empty = HostBuffers::upload::<f32>(&mut cl, &[]).unwrap();
    assert!(cl.to_host::<f32>(&empty).unwrap().is_empty());
}

/// Without doubles (`f64_norms(false)`, the path of devices without `cl_khr_fp64`), a finite
/// gradient is never reported non-finite however large: gradients of 1e30 everywhere (whose
/// squares overflow f32), f32::MAX, and 1e30 beside tiny values, in f32 and bf16, at lengths
/// around the chunk size. The optimizer's guard does not skip the step, the norm it reports
/// is finite and right, and clipping scales the step down instead.
#[test]
fn huge_finite_gradients_are_finite_without_doubles() {
    let Some(base) = device() else { return };
    let cl = variant(&base, None, false, base.elements_per_item());
    assert!(!cl.f64_norms());
    let cfg = Config::paper(Algorithm::sgd(0.0), 0.1)
        .skip_non_finite(true)
        .global_clip(1.0);
    let mut r = rng(30);
    for len in [1usize, 7, NORM_CHUNK, NORM_CHUNK + 1, 3 * NORM_CHUNK + 5] {
        let mixed: Vec<f32> = (0..len)
            .map(|i| {
                if i % 3 == 0 {
                    1e30
                } else {
                    r.gen_range(-1e-3f32..1e-3)
                }
            })
            .collect();
        for (what, host) in [
            ("1e30", vec![1e30f32; len]),
            ("-1e30", vec![-1e30f32; len]),
            ("f32::MAX", vec![f32::MAX; len]),
            ("1e30 among small values", mixed),
        ] {
            let want: f64 = host.iter().map(|&x| x as f64 * x as f64).sum();
            for dtype in ["f32", "bf16"] {
                if dtype == "bf16" && to::<bf16>(&host).iter().any(|x| !x.is_finite()) {
                    continue; // f32::MAX rounds to bf16's infinity
                }
                let (got, report) = if dtype == "f32" {
                    huge_step::<f32>(&cl, cfg, &host)
                } else {
                    huge_step::<bf16>(&cl, cfg, &host)
                };
                let ctx = format!("{what} x {len} ({dtype})");
                let want = if dtype == "f32" {
                    want
                } else {
                    to::<bf16>(&host)
                        .iter()
                        .map(|x| x.to_f64() * x.to_f64())
                        .sum()
                };
                assert!(got.is_finite(), "{ctx}: sq_norm {got:e}");
                assert!(
                    (got - want).abs() <= 1e-5 * want,
                    "{ctx}: {got:e} vs {want:e}"
                );
                assert!(
                    report.applied(),
                    "{ctx}: the guard skipped a finite gradient"
                );
                let norm = report.grad_norm.unwrap();
                assert!(norm.is_finite() && norm > 1e29, "{ctx}: norm {norm:e}");
                assert!(
                    report.clip_scale < 1e-29,
                    "{ctx}: clip {}",
                    report.clip_scale
                );
            }
        }
    }
}

/// `sq_norm` of `host` stored as `E`, and one guarded, clipped SGD step over it.
fn huge_step<E: Element>(cl: &OpenCl, cfg: Config, host: &[f32]) -> (f64, sage_core::StepReport) {
    let mut cl = cl.clone();
    let g = cl.upload(&to::<E>(host)).unwrap();
    let got = cl.sq_norm(&g).unwrap();
    let mut p = cl.zeros::<E>(host.len()).unwrap();
    let mut st = TensorState::<ClBuffer<E>>::new(cfg.state_layout(false), || unreachable!());
    let mut opt = Optimizer::new(cl.clone(), cfg, [ParamGroup::plain()]).unwrap();
    let report = opt
        .step(&mut [ParamTensor::<OpenCl, E, E>::new(&mut p, &g, st.view())])
        .unwrap();
    (got, report)
}
