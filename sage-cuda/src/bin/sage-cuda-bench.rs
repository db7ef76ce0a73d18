//! `sage-cuda-bench`: time Adam-SAGE steps on a GPU against a device-to-device copy of the
//! same bytes, measured in the same run.
//!
//! ```text
//! sage-cuda-bench [--sizes 16M,110M,350M] [--iters 30] [--warmup 5] [--tensor 4194304] [--device N]
//!                 [--small 10000]
//! sage-cuda-bench --emit-ptx DIR [--arch compute_90]   # prebuilt PTX for SAGE_CUDA_PTX_DIR
//! ```
//!
//! Each size is a model of that many parameters split into tensors of at most `--tensor`
//! elements (one multi-tensor launch per step). Every step goes through
//! [`sage_core::Optimizer::step`], host work included, timed with CUDA events; the median of
//! `--iters` steps after `--warmup` is reported. Before timing, the first step of each size is
//! compared element for element with the CPU formula.
//!
//! Also timed, per size: the gradient-norm pass alone (`grad-norm`, 4 bytes read per
//! parameter; its GB/s over the copy's is how close it is to bandwidth), and once: a model of
//! `--small` tensors of 256–1024 elements (1–4 KiB of f32: biases, LayerNorms, adapters)
//! against one flat tensor of the same total (`x flat`), every tensor in the one multi-tensor
//! launch (packing is the kernel's tensor table).
//!
//! Output: a readable table, and one tab-separated `ROW` line per measurement
//! (`ROW impl storage params median_ms bytes_per_param`) that `scripts/gpu-check.sh` merges
//! with torch's numbers.

use std::process::ExitCode;
use std::sync::Arc;

use sage_core::formula;
use sage_core::{Algorithm, Config, Element, Optimizer, ParamGroup, ParamTensor, TensorState};
use sage_cuda::cudarc::driver::{sys::CUevent_flags, CudaSlice, CudaStream};
use sage_cuda::{Cuda, CudaError};

struct Args {
    sizes: Vec<usize>,
    iters: usize,
    warmup: usize,
    tensor: usize,
    device: usize,
    emit_ptx: Option<String>,
    arch: String,
    small: usize,
}

fn parse_size(s: &str) -> Option<usize> {
    let s = s.trim();
    let (num, mul) = match s.chars().last()? {
        'k' | 'K' => (&s[..s.len() - 1], 1_000),
        'm' | 'M' => (&s[..s.len() - 1], 1_000_000),
        'g' | 'G' => (&s[..s.len() - 1], 1_000_000_000),
        _ => (s, 1),
    };
    num.parse::<f64>()
        .ok()
        .filter(|x| *x > 0.0)
        .map(|x| (x * mul as f64) as usize)
}

fn parse_args() -> Result<Args, String> {
    let mut a = Args {
        sizes: vec![16_000_000, 110_000_000, 350_000_000],
        iters: 30,
        warmup: 5,
        tensor: 4 << 20,
        device: 0,
        emit_ptx: None,
        arch: "compute_90".into(),
        small: 10_000,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut val = || it.next().ok_or(format!("{flag} needs a value"));
        match flag.as_str() {
            "--sizes" => {
                a.sizes = val()?
                    .split(',')
                    .map(|s| parse_size(s).ok_or(format!("bad size `{s}`")))
                    .collect::<Result<_, _>>()?
            }
            "--iters" => a.iters = val()?.parse().map_err(|e| format!("--iters: {e}"))?,
            "--warmup" => a.warmup = val()?.parse().map_err(|e| format!("--warmup: {e}"))?,
            "--tensor" => a.tensor = parse_size(&val()?).ok_or("bad --tensor")?,
            "--device" => a.device = val()?.parse().map_err(|e| format!("--device: {e}"))?,
            "--emit-ptx" => a.emit_ptx = Some(val()?),
            "--arch" => a.arch = val()?,
            "--small" => a.small = val()?.parse().map_err(|e| format!("--small: {e}"))?,
            "-h" | "--help" => return Err(String::new()),
            other => return Err(format!("unknown argument `{other}`")),
        }
    }
    a.iters = a.iters.max(1);
    Ok(a)
}

/// Splits `n` parameters into tensors of at most `max` elements.
fn tensor_sizes(n: usize, max: usize) -> Vec<usize> {
    let mut v = vec![max; n / max];
    if !n.is_multiple_of(max) {
        v.push(n % max);
    }
    v
}

/// `n` tensors of 256 to 1024 elements, spread evenly over that range.
fn small_tensors(n: usize) -> Vec<usize> {
    (0..n).map(|i| 256 + (i * 7919) % 769).collect()
}

/// Deterministic values in [-1, 1) (xorshift), so runs are comparable.
fn pattern(n: usize, seed: u64) -> Vec<f32> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            ((x >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect()
}

fn median(mut v: Vec<f32>) -> f32 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// Median milliseconds of `iters` runs of `f` after `warmup`, each timed with CUDA events.
fn time_ms(
    stream: &Arc<CudaStream>,
    warmup: usize,
    iters: usize,
    mut f: impl FnMut() -> Result<(), String>,
) -> Result<f32, String> {
    let ctx = stream.context();
    let ev = |_| {
        ctx.new_event(Some(CUevent_flags::CU_EVENT_DEFAULT))
            .map_err(|e| format!("event: {e:?}"))
    };
    let (start, end) = (ev(0)?, ev(1)?);
    for _ in 0..warmup {
        f()?;
    }
    stream.synchronize().map_err(|e| format!("sync: {e:?}"))?;
    let mut ms = Vec::with_capacity(iters);
    for _ in 0..iters {
        start.record(stream).map_err(|e| format!("record: {e:?}"))?;
        f()?;
        end.record(stream).map_err(|e| format!("record: {e:?}"))?;
        end.synchronize().map_err(|e| format!("sync: {e:?}"))?;
        ms.push(
            start
                .elapsed_ms(&end)
                .map_err(|e| format!("elapsed: {e:?}"))?,
        );
    }
    Ok(median(ms))
}

struct Row {
    what: String,
    storage: &'static str,
    params: usize,
    ms: f32,
    bytes: usize,
}

fn err(e: CudaError) -> String {
    e.to_string()
}

/// Adam(W)-SAGE (or plain AdamW with `sage == false`) over `sizes` tensors with parameters of
/// `P`, state f32; checks the first step against the CPU formula, then times steps.
fn bench_adam<P: Element>(
    gpu: &Cuda,
    sizes: &[usize],
    sage: bool,
    guard: bool,
    a: &Args,
) -> Result<(f32, bool), String> {
    let cfg = Config::reference(Algorithm::adamw(), 1e-3)
        .beta0(0.8)
        .skip_non_finite(guard);
    let group = if sage {
        ParamGroup::sage()
    } else {
        ParamGroup::plain()
    }
    .weight_decay(0.01);
    let block = sizes.iter().copied().max().unwrap_or(0);
    let host_p: Vec<P> = pattern(block, 1).iter().map(|&x| P::from_f32(x)).collect();
    let host_g: Vec<P> = pattern(block, 2)
        .iter()
        .map(|&x| P::from_f32(x * 1e-2))
        .collect();
    let mut params: Vec<CudaSlice<P>> = Vec::new();
    let mut grads: Vec<CudaSlice<P>> = Vec::new();
    let mut state: Vec<TensorState<CudaSlice<f32>>> = Vec::new();
    let layout = cfg.state_layout(sage);
    for &n in sizes {
        params.push(gpu.upload(&host_p[..n]).map_err(err)?);
        grads.push(gpu.upload(&host_g[..n]).map_err(err)?);
        state.push(TensorState::try_new(layout, |_| gpu.zeros::<f32>(n)).map_err(err)?);
    }
    let mut opt = Optimizer::new(gpu.clone(), cfg, [group]).map_err(|e| e.to_string())?;
    let stream = gpu.stream().clone();
    let step = |opt: &mut Optimizer<Cuda, [ParamGroup; 1]>,
                params: &mut Vec<CudaSlice<P>>,
                state: &mut Vec<TensorState<CudaSlice<f32>>>|
     -> Result<(), String> {
        let mut ts = param_tensors(params, &grads, state);
        opt.step(&mut ts).map(|_| ()).map_err(|e| e.to_string())
    };
    // First step, checked against the CPU formula on the first tensor.
    step(&mut opt, &mut params, &mut state)?;
    let k = opt.coeffs(1, 0, 1.0).ok_or("no coefficients")?;
    let got = gpu.download(&params[0]).map_err(err)?;
    let mut ok = true;
    for (i, &out) in got.iter().enumerate() {
        let mut th = host_p[i];
        let (mut m, mut v, mut ib) = (0f32, 0f32, 0f32);
        formula::step::<P, f32>(
            &k,
            &mut th,
            host_g[i],
            layout.m.then_some(&mut m),
            layout.v.then_some(&mut v),
            layout.ibar.then_some(&mut ib),
        );
        if th.to_f32().to_bits() != out.to_f32().to_bits() {
            eprintln!(
                "check: element {i}: gpu {} cpu {}",
                out.to_f32(),
                th.to_f32()
            );
            ok = false;
            break;
        }
    }
    let ms = time_ms(&stream, a.warmup, a.iters, || {
        step(&mut opt, &mut params, &mut state)
    })?;
    Ok((ms, ok))
}

/// One step's tensors over parallel lists of parameters, gradients and state.
fn param_tensors<'a, P: Element>(
    params: &'a mut [CudaSlice<P>],
    grads: &'a [CudaSlice<P>],
    state: &'a mut [TensorState<CudaSlice<f32>>],
) -> Vec<ParamTensor<'a, Cuda, P, f32>> {
    params
        .iter_mut()
        .zip(state.iter_mut())
        .zip(grads)
        .map(|((p, st), g)| ParamTensor::new(p, g, st.view()))
        .collect()
}

/// The gradient-norm pass alone (`Backend::grad_sq_norms`, as the guard and clipping run it)
/// over f32 gradients of `sizes`.
fn bench_norm(gpu: &Cuda, sizes: &[usize], a: &Args) -> Result<f32, String> {
    use sage_core::Backend;
    let block = sizes.iter().copied().max().unwrap_or(0);
    let host_g: Vec<f32> = pattern(block, 2).iter().map(|&x| x * 1e-2).collect();
    let mut params: Vec<CudaSlice<f32>> = Vec::new();
    let mut grads: Vec<CudaSlice<f32>> = Vec::new();
    let mut state: Vec<TensorState<CudaSlice<f32>>> = Vec::new();
    let layout = Config::paper(Algorithm::sgd(0.0), 0.1).state_layout(false);
    for &n in sizes {
        params.push(gpu.zeros::<f32>(n).map_err(err)?);
        grads.push(gpu.upload(&host_g[..n]).map_err(err)?);
        state.push(TensorState::try_new(layout, |_| gpu.zeros::<f32>(n)).map_err(err)?);
    }
    let mut backend = gpu.clone();
    let stream = gpu.stream().clone();
    time_ms(&stream, a.warmup, a.iters, || {
        let mut ts = param_tensors(&mut params, &grads, &mut state);
        backend.grad_sq_norms(&mut ts).map_err(err)
    })
}

/// A device-to-device copy moving `bytes` in total (half read, half written).
fn bench_copy(gpu: &Cuda, bytes: usize, a: &Args) -> Result<f32, String> {
    let half = bytes / 2;
    let stream = gpu.stream().clone();
    let src = stream
        .alloc_zeros::<u8>(half)
        .map_err(|e| format!("alloc: {e:?}"))?;
    let mut dst = stream
        .alloc_zeros::<u8>(half)
        .map_err(|e| format!("alloc: {e:?}"))?;
    time_ms(&stream, a.warmup, a.iters, || {
        stream
            .memcpy_dtod(&src, &mut dst)
            .map_err(|e| format!("copy: {e:?}"))
    })
}

fn run(a: &Args) -> Result<bool, String> {
    let gpu = Cuda::new(a.device).map_err(err)?;
    println!("device: {} ({})", gpu.name(), gpu.arch());
    let t0 = std::time::Instant::now();
    gpu.prepare::<f32, f32>().map_err(err)?;
    gpu.prepare::<half::bf16, f32>().map_err(err)?;
    println!(
        "kernels compiled and loaded in {:.1} s",
        t0.elapsed().as_secs_f32()
    );
    let mut rows = Vec::new();
    let mut all_ok = true;
    for &n in &a.sizes {
        let sizes = tensor_sizes(n, a.tensor);
        let cases: [(&str, &'static str, bool, bool, usize); 4] = [
            ("sage-adamw", "f32", true, false, 36),
            ("sage-adamw", "bf16/f32", true, false, 30),
            ("sage-adamw+guard", "f32", true, true, 40),
            ("plain-adamw", "f32", false, false, 28),
        ];
        for (what, storage, sage, guard, bytes) in cases {
            let (ms, ok) = if storage == "f32" {
                bench_adam::<f32>(&gpu, &sizes, sage, guard, a)?
            } else {
                bench_adam::<half::bf16>(&gpu, &sizes, sage, guard, a)?
            };
            if !ok {
                eprintln!("{what} {storage} {n}: first step differs from the CPU formula");
                all_ok = false;
            }
            rows.push(Row {
                what: what.into(),
                storage,
                params: n,
                ms,
                bytes,
            });
        }
        rows.push(Row {
            what: "grad-norm".into(),
            storage: "f32",
            params: n,
            ms: bench_norm(&gpu, &sizes, a)?,
            bytes: 4,
        });
        for bytes in [36usize, 30] {
            let ms = bench_copy(&gpu, bytes * n, a)?;
            rows.push(Row {
                what: "copy".into(),
                storage: if bytes == 36 { "f32" } else { "bf16/f32" },
                params: n,
                ms,
                bytes,
            });
        }
        println!(
            "{n} parameters in {} tensors: done, first steps {}",
            sizes.len(),
            if all_ok { "match the CPU" } else { "MISMATCH" }
        );
    }
    // Many small tensors against one flat tensor of the same total, side by side.
    let mut flat_ratio = Vec::new();
    if a.small > 0 {
        let small = small_tensors(a.small);
        let total: usize = small.iter().sum();
        for guard in [false, true] {
            let (ms_small, ok_small) = bench_adam::<f32>(&gpu, &small, true, guard, a)?;
            let (ms_flat, ok_flat) = bench_adam::<f32>(&gpu, &[total], true, guard, a)?;
            all_ok &= ok_small && ok_flat;
            let what = if guard {
                "sage-adamw+guard"
            } else {
                "sage-adamw"
            };
            flat_ratio.push((what, ms_small, ms_flat));
            rows.push(Row {
                what: format!("{what} {} small", a.small),
                storage: "f32",
                params: total,
                ms: ms_small,
                bytes: if guard { 40 } else { 36 },
            });
        }
        let ms = bench_copy(&gpu, 36 * total, a)?;
        rows.push(Row {
            what: "copy".into(),
            storage: "f32",
            params: total,
            ms,
            bytes: 36,
        });
    }
    println!(
        "\n{:<18} {:<9} {:>11} {:>9} {:>9} {:>8} {:>8}",
        "impl", "storage", "params", "ms", "ns/param", "GB/s", "vs copy"
    );
    for r in &rows {
        let gbs = (r.bytes * r.params) as f64 / (r.ms as f64 * 1e-3) / 1e9;
        let copy = rows
            .iter()
            .find(|c| c.what == "copy" && c.params == r.params && c.bytes == r.bytes)
            .or_else(|| {
                rows.iter()
                    .find(|c| c.what == "copy" && c.params == r.params)
            })
            .map(|c| (c.bytes * c.params) as f64 / (c.ms as f64 * 1e-3) / 1e9);
        println!(
            "{:<18} {:<9} {:>11} {:>9.3} {:>9.4} {:>8.0} {:>8}",
            r.what,
            r.storage,
            r.params,
            r.ms,
            r.ms as f64 * 1e6 / r.params as f64,
            gbs,
            copy.map_or("-".into(), |c| format!("{:.2}", gbs / c))
        );
    }
    for (what, small, flat) in &flat_ratio {
        println!(
            "{what}: {} tensors of 256-1024 elements {small:.3} ms, one flat tensor {flat:.3} ms: {:.2} x flat",
            a.small,
            small / flat
        );
    }
    for r in &rows {
        println!(
            "ROW\t{}\t{}\t{}\t{:.6}\t{}",
            r.what, r.storage, r.params, r.ms, r.bytes
        );
    }
    Ok(all_ok)
}

fn main() -> ExitCode {
    let a = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            if !e.is_empty() {
                eprintln!("error: {e}");
            }
            eprintln!(
                "usage: sage-cuda-bench [--sizes 16M,110M,350M] [--iters N] [--warmup N] \
                 [--tensor N] [--device N] | --emit-ptx DIR [--arch compute_90]"
            );
            return ExitCode::from(64);
        }
    };
    if let Some(dir) = &a.emit_ptx {
        return match sage_cuda::kernels::write_ptx_dir(std::path::Path::new(dir), &a.arch) {
            Ok(files) => {
                println!("wrote {} PTX files ({}) to {dir}", files.len(), a.arch);
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("error: {e}");
                ExitCode::from(1)
            }
        };
    }
    match run(&a) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(2)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_with_suffixes() {
        assert_eq!(parse_size("16M"), Some(16_000_000));
        assert_eq!(parse_size("1.5k"), Some(1500));
        assert_eq!(parse_size("4194304"), Some(4194304));
        assert_eq!(parse_size("x"), None);
        assert_eq!(parse_size("0"), None);
    }

    #[test]
    fn tensors_cover_the_model() {
        let v = tensor_sizes(110_000_000, 4 << 20);
        assert_eq!(v.iter().sum::<usize>(), 110_000_000);
        assert!(v.iter().all(|&n| n > 0 && n <= 4 << 20));
        assert_eq!(tensor_sizes(8, 4), vec![4, 4]);
    }

    #[test]
    fn pattern_is_deterministic_and_bounded() {
        let a = pattern(1000, 7);
        assert_eq!(a, pattern(1000, 7));
        assert!(a.iter().all(|x| (-1.0..1.0).contains(x)));
        assert_ne!(a, pattern(1000, 8));
    }
}
