//! On a real GPU (skipped, with a note, where there is none; `SAGE_REQUIRE_CUDA=1` makes a
//! missing device a failure): the gradient norms follow sage-core's chunk grid bit for bit
//! whichever path computes them, the host copies of `HostBuffers`, one optimizer step with
//! norms computed elsewhere equal to the step that computes its own, and the step kernels'
//! counts of non-finite parameters.

use sage_core::norm::{self, NORM_CHUNK};
use sage_core::{
    bf16, f16, Algorithm, Backend, BackendError, Config, Element, ErrorKind, GlobalNorms,
    HostBuffers, Optimizer, ParamGroup, ParamTensor, TensorState,
};
use sage_cuda::cudarc::driver::CudaSlice;
use sage_cuda::Cuda;

fn device() -> Option<Cuda> {
    match Cuda::new(0) {
        Ok(c) => Some(c),
        Err(e) if e.kind() == ErrorKind::NotAvailable => {
            if std::env::var("SAGE_REQUIRE_CUDA").is_ok_and(|v| v == "1") {
                panic!("SAGE_REQUIRE_CUDA=1 but: {e}");
            }
            eprintln!("skipped: {e}");
            None
        }
        Err(e) => panic!("opening CUDA device 0 failed: {e}"),
    }
}

/// Deterministic values over 2^-10 .. 2^10 times `scale` (so the order of additions shows in
/// the bits), every seventh exactly 0.
fn values<E: Element>(n: usize, seed: u64, scale: f32) -> Vec<E> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..n)
        .map(|i| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let u = (x >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0;
            let k = ((x >> 8) % 21) as i32 - 10;
            E::from_f32(if i % 7 == 3 {
                0.0
            } else {
                u * scale * 2f32.powi(k)
            })
        })
        .collect()
}

const LENS: [usize; 12] = [
    0,
    1,
    3,
    5,
    NORM_CHUNK - 1,
    NORM_CHUNK,
    NORM_CHUNK + 1,
    0,
    2 * NORM_CHUNK,
    3 * NORM_CHUNK + 3,
    70_001,
    300_000,
];

fn bits(x: &[f64]) -> Vec<u64> {
    x.iter().map(|v| v.to_bits()).collect()
}

fn norms_follow_the_grid<E: Element>(gpu: &mut Cuda, scale: f32) {
    let host: Vec<Vec<E>> = LENS
        .iter()
        .enumerate()
        .map(|(i, &n)| values(n, i as u64 + 1, scale))
        .collect();
    let grads: Vec<CudaSlice<E>> = host.iter().map(|h| gpu.upload(h).unwrap()).collect();
    let mut params: Vec<CudaSlice<E>> = LENS.iter().map(|&n| gpu.zeros(n).unwrap()).collect();
    // No state buffers: only the gradients matter here.
    let mut states: Vec<TensorState<CudaSlice<f32>>> = LENS
        .iter()
        .map(|_| TensorState::new(Default::default(), || unreachable!()))
        .collect();
    let mut ts: Vec<ParamTensor<'_, Cuda, E, f32>> = params
        .iter_mut()
        .zip(&grads)
        .zip(&mut states)
        .map(|((p, g), s)| ParamTensor::new(p, g, s.view()))
        .collect();
    // Every partial in one launch == each buffer's own partials, back to back.
    let total: usize = LENS.iter().map(|&n| norm::chunk_count(n)).sum();
    let mut all = vec![0f64; total];
    gpu.grad_norm_partials(&ts, &mut all).unwrap();
    let mut each = Vec::new();
    for g in &grads {
        let mut p = vec![0f64; norm::chunk_count(g.len())];
        gpu.sq_norm_chunks(g, 0, &mut p).unwrap();
        each.extend(p);
    }
    assert_eq!(bits(&all), bits(&each), "{}: partials", E::DTYPE);
    // Close to the CPU's in-order partials.
    let mut at = 0;
    for h in &host {
        for c in h.chunks(NORM_CHUNK) {
            let want = norm::chunk_partial(c);
            assert!(
                (all[at] - want).abs() <= 1e-12 * want,
                "{} partial {at}: {} vs {want}",
                E::DTYPE,
                all[at]
            );
            at += 1;
        }
    }
    // One launch for all norms == the fold of the partials == sq_norm, bit for bit.
    gpu.grad_sq_norms(&mut ts).unwrap();
    let mut at = 0;
    for (t, g) in ts.iter().zip(&grads) {
        let n = norm::chunk_count(g.len());
        let folded = norm::fold(all[at..at + n].iter().copied());
        at += n;
        assert_eq!(t.grad_sq_norm().to_bits(), folded.to_bits(), "{}", E::DTYPE);
        assert_eq!(
            gpu.sq_norm(g).unwrap().to_bits(),
            folded.to_bits(),
            "{}",
            E::DTYPE
        );
    }
    // A buffer split at a chunk boundary: the halves' partials are the whole's.
    let whole = host.last().unwrap();
    let cut = 40 * NORM_CHUNK;
    let (a, b) = (
        gpu.upload(&whole[..cut]).unwrap(),
        gpu.upload(&whole[cut..]).unwrap(),
    );
    let mut pa = vec![0f64; norm::chunk_count(cut)];
    let mut pb = vec![0f64; norm::chunk_count(whole.len() - cut)];
    gpu.sq_norm_chunks(&a, 0, &mut pa).unwrap();
    gpu.sq_norm_chunks(&b, 0, &mut pb).unwrap();
    pa.extend(pb);
    let last = &all[total - pa.len()..];
    assert_eq!(bits(&pa), bits(last), "{}: split", E::DTYPE);
    // ... and any window of the whole buffer's chunks.
    let mut w = vec![0f64; 7];
    gpu.sq_norm_chunks(grads.last().unwrap(), 60, &mut w)
        .unwrap();
    assert_eq!(bits(&w), bits(&last[60..67]), "{}: window", E::DTYPE);
    // Past the end: an error, not a panic.
    let e = gpu
        .sq_norm_chunks(grads.last().unwrap(), 70, &mut w)
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::LengthMismatch);
}

#[test]
fn norms_follow_the_chunk_grid_bit_for_bit() {
    let Some(mut gpu) = device() else { return };
    norms_follow_the_grid::<f32>(&mut gpu, 3.0);
    norms_follow_the_grid::<f16>(&mut gpu, 0.05);
    norms_follow_the_grid::<bf16>(&mut gpu, 1e30);
}

#[test]
fn non_finite_chunks_and_huge_values() {
    let Some(mut gpu) = device() else { return };
    let n = 3 * NORM_CHUNK + 5;
    for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
        for at in [0, NORM_CHUNK + 17, n - 1] {
            let mut x = vec![0.5f32; n];
            x[at] = bad;
            let d = gpu.upload(&x).unwrap();
            let mut p = vec![0f64; 4];
            gpu.sq_norm_chunks(&d, 0, &mut p).unwrap();
            for (c, v) in p.iter().enumerate() {
                assert_eq!(v.is_finite(), c != at / NORM_CHUNK, "{bad} at {at}: {p:?}");
            }
            assert!(!gpu.sq_norm(&d).unwrap().is_finite());
            let h = gpu.upload(&x.iter().map(|&v| bf16::from_f32(v)).collect::<Vec<_>>());
            assert!(!gpu.sq_norm(&h.unwrap()).unwrap().is_finite());
        }
    }
    let big = gpu.upload(&vec![3.0e38f32; 5000]).unwrap();
    let s = gpu.sq_norm(&big).unwrap();
    // The f32 value stored (3e38 rounds to 3.0000000054977558e38), squared in f64.
    let v = 3.0e38f32 as f64;
    let want = 5000.0 * v * v;
    assert!((s - want).abs() <= 1e-12 * want, "{s}");
}

#[test]
fn host_buffers_round_trip() {
    let Some(mut gpu) = device() else { return };
    let mut name = String::new();
    gpu.describe(&mut name).unwrap();
    assert!(name.starts_with("cuda:0 ("), "{name}");
    let x: Vec<bf16> = values(1000, 9, 1.0);
    let mut buf = HostBuffers::upload(&mut gpu, &x).unwrap();
    assert_eq!(gpu.to_host::<bf16>(&buf).unwrap(), x);
    let y: Vec<bf16> = values(1000, 10, 1.0);
    gpu.write_host(&mut buf, &y).unwrap();
    let mut back = vec![bf16::ZERO; 1000];
    gpu.read_host(&buf, &mut back).unwrap();
    assert_eq!(back, y);
    assert!(gpu.read_host(&buf, &mut back[..3]).is_err());
    let empty = HostBuffers::upload::<f32>(&mut gpu, &[]).unwrap();
    assert!(gpu.to_host::<f32>(&empty).unwrap().is_empty());
}

/// A step with norms computed elsewhere (partials gathered and reduced) equals the step that
/// computes its own, bit for bit, with global clipping on.
#[test]
fn step_with_gathered_norms_equals_the_step() {
    let Some(gpu) = device() else { return };
    let cfg = Config::reference(Algorithm::adamw(), 1e-2)
        .beta0(0.8)
        .global_clip(0.5)
        .per_tensor_clip(0.3);
    let lens = [5usize, NORM_CHUNK + 9, 70_001];
    let run = |given: bool| -> (Vec<Vec<f32>>, f64) {
        let mut opt = Optimizer::new(gpu.clone(), cfg, [ParamGroup::sage()]).unwrap();
        let mut ps: Vec<CudaSlice<f32>> = lens
            .iter()
            .map(|&n| gpu.upload(&values::<f32>(n, n as u64, 1.0)).unwrap())
            .collect();
        let gs: Vec<CudaSlice<f32>> = lens
            .iter()
            .map(|&n| gpu.upload(&values::<f32>(n, n as u64 + 1, 0.1)).unwrap())
            .collect();
        let mut st: Vec<TensorState<CudaSlice<f32>>> = lens
            .iter()
            .map(|&n| TensorState::try_new(cfg.state_layout(true), |_| gpu.zeros(n)).unwrap())
            .collect();
        let mut ts: Vec<ParamTensor<'_, Cuda, f32, f32>> = ps
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
        drop(ts);
        assert!(st.iter().all(|s| s.step == 1));
        let host = ps.iter().map(|p| gpu.download(p).unwrap()).collect();
        (host, report.grad_norm.unwrap())
    };
    let (a, na) = run(false);
    let (b, nb) = run(true);
    assert_eq!(na.to_bits(), nb.to_bits());
    assert_eq!(a, b);
}

/// The step kernels count each tensor's non-finite stored parameters exactly (what sage-cpu
/// reports): NaN and ±Inf planted in vector lanes, tails and later chunks, on the multi-tensor
/// path and the single-tensor one (one non-empty tensor among empty ones), for f32 and f16
/// parameters (1e5 is +Inf in f16). Each count equals the non-finite values of the downloaded
/// parameters.
fn counts_non_finite<P: Element>(gpu: &Cuda) {
    let cfg = Config::reference(Algorithm::adamw(), 1e-2);
    let k = Optimizer::new(gpu.clone(), cfg, [ParamGroup::sage()])
        .unwrap()
        .coeffs(1, 0, 1.0)
        .unwrap();
    let planted = [f32::NAN, f32::INFINITY, f32::NEG_INFINITY, 1e5];
    let at = [0usize, 2, 5, 4096, 65_536, 131_075, 199_999];
    for lens in [vec![0usize, 5, 65_537, 0, 200_003, 3], vec![0, 200_003, 0]] {
        let host: Vec<Vec<P>> = lens
            .iter()
            .enumerate()
            .map(|(t, &n)| {
                let mut v = values::<P>(n, t as u64 + 7, 1.0);
                for (j, &i) in at.iter().enumerate() {
                    if i < n {
                        v[i] = P::from_f32(planted[j % planted.len()]);
                    }
                }
                v
            })
            .collect();
        let mut ps: Vec<CudaSlice<P>> = host.iter().map(|h| gpu.upload(h).unwrap()).collect();
        let gs: Vec<CudaSlice<P>> = lens
            .iter()
            .map(|&n| gpu.upload(&values::<P>(n, n as u64 + 1, 0.1)).unwrap())
            .collect();
        let mut st: Vec<TensorState<CudaSlice<f32>>> = lens
            .iter()
            .map(|&n| TensorState::try_new(cfg.state_layout(true), |_| gpu.zeros(n)).unwrap())
            .collect();
        let mut ts: Vec<ParamTensor<'_, Cuda, P, f32>> = ps
            .iter_mut()
            .zip(&gs)
            .zip(&mut st)
            .map(|((p, g), s)| {
                let mut t = ParamTensor::new(p, g, s.view());
                t.set_coeffs(k);
                t
            })
            .collect();
        let mut backend = gpu.clone();
        backend.step_tensors(&mut ts).unwrap();
        let counted: Vec<Option<u64>> = ts.iter().map(|t| t.non_finite()).collect();
        drop(ts);
        for (t, p) in ps.iter().enumerate() {
            let stored = gpu.download(p).unwrap();
            let want = stored.iter().filter(|x| !x.to_f32().is_finite()).count() as u64;
            assert_eq!(
                counted[t],
                Some(want),
                "{} tensor {t} of {lens:?}",
                P::DTYPE
            );
            // Exactly the planted non-finite values (1e5 is one in f16 only): the update is
            // elementwise, and the others stay finite.
            let planted_bad = at
                .iter()
                .enumerate()
                .filter(|&(j, &i)| {
                    i < lens[t] && !P::from_f32(planted[j % planted.len()]).to_f32().is_finite()
                })
                .count() as u64;
            assert_eq!(want, planted_bad, "{} tensor {t}", P::DTYPE);
        }
    }
}

#[test]
fn step_kernels_count_non_finite_parameters() {
    let Some(gpu) = device() else { return };
    counts_non_finite::<f32>(&gpu);
    counts_non_finite::<f16>(&gpu);
    counts_non_finite::<bf16>(&gpu);
}
