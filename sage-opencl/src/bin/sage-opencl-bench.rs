//! `sage-opencl-bench`: the OpenCL fused SAGE step against the device's streaming floor and
//! sage-cpu's portable step, over the same buffers, in one run.
//!
//! ```text
//! sage-opencl-bench [--params N] [--reps N] [--precision f32,bf16,f16] [--device P:D|name]
//!                   [--per-item N] [--small N] [--quick] [--list]
//! ```
//!
//! For each precision (parameters and gradients stored in it, state in f32) and each shape —
//! one tensor of N parameters, and BERT-base's 199 tensors scaled to N in all — it times, rep
//! by rep and interleaved so that a noisy machine slows all alike:
//! - `floor`: an in-place streaming pass over the same device buffers with the same launches,
//!   reading and writing everything a step does (36 bytes/parameter for f32 AdamW-SAGE);
//! - `opencl step`: the optimizer's step (AdamW-SAGE, reference preset), no norm pass;
//! - `opencl step (guarded)`: with the non-finite guard, which adds the gradient-norm pass;
//! - `cpu portable step`: sage-cpu's scalar step (one thread) over host copies.
//!
//! Each rep starts with an untimed floor pass, so that a GPU idled by the CPU row is at speed.
//! The best rep of each is printed as ns/parameter, GB/s and the ratio to the floor.
//! Exit status: 0 done, 2 no OpenCL device, 1 an error, 64 bad usage.

use std::process::ExitCode;
use std::time::Instant;

use sage_core::{
    bf16, f16, Algorithm, BackendError, Buffer, Config, Element, ErrorKind, Optimizer, ParamGroup,
    ParamTensor, TensorState,
};
use sage_cpu::Cpu;
use sage_opencl::{ClBuffer, OpenCl, Select};

/// BERT-base (uncased) parameter tensors: embeddings, 12 layers, pooler.
fn bert_base() -> Vec<usize> {
    let (h, ff, vocab, pos, types, layers) = (768, 3072, 30522, 512, 2, 12);
    let mut t = vec![vocab * h, pos * h, types * h, h, h];
    for _ in 0..layers {
        for _ in 0..4 {
            t.extend([h * h, h]);
        }
        t.extend([h, h, h * ff, ff, ff * h, h, h, h]);
    }
    t.extend([h * h, h]);
    t
}

/// BERT-base's mix scaled to about `n` parameters (every tensor keeps at least one).
fn bert_scaled(n: usize) -> Vec<usize> {
    let base = bert_base();
    let total: usize = base.iter().sum();
    let f = n as f64 / total as f64;
    base.iter()
        .map(|&x| ((x as f64 * f).round() as usize).max(1))
        .collect()
}

struct Args {
    params: usize,
    reps: usize,
    precisions: Vec<String>,
    device: Select,
    per_item: Option<usize>,
    small: usize,
    list: bool,
}

fn usage() -> ExitCode {
    eprintln!(
        "usage: sage-opencl-bench [--params N] [--reps N] [--precision f32,bf16,f16] \
         [--device P:D|name] [--per-item N] [--small N] [--quick] [--list]"
    );
    ExitCode::from(64)
}

fn parse() -> Result<Args, String> {
    let mut a = Args {
        params: 4 << 20,
        reps: 5,
        precisions: vec!["f32".into(), "bf16".into()],
        device: std::env::var("SAGE_OPENCL_DEVICE")
            .map(|s| Select::parse(&s))
            .unwrap_or_default(),
        per_item: None,
        small: 10_000,
        list: false,
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let mut val = || it.next().ok_or(format!("{arg} needs a value"));
        match arg.as_str() {
            "--params" => {
                let v = val()?;
                // Accepts 1e6 as well as 1000000; NaN and values below 1 are refused.
                let n: f64 = v
                    .parse()
                    .ok()
                    .filter(|n: &f64| *n >= 1.0)
                    .ok_or(format!("bad --params {v}"))?;
                a.params = n as usize;
            }
            "--reps" => {
                let v = val()?;
                a.reps = v
                    .parse()
                    .ok()
                    .filter(|&n| n > 0)
                    .ok_or(format!("bad --reps {v}"))?;
            }
            "--precision" => {
                a.precisions = val()?.split(',').map(String::from).collect();
                for p in &a.precisions {
                    if !["f32", "bf16", "f16"].contains(&p.as_str()) {
                        return Err(format!("unknown precision {p}"));
                    }
                }
            }
            "--device" => a.device = Select::parse(&val()?),
            "--per-item" => {
                let v = val()?;
                a.per_item = Some(
                    v.parse()
                        .ok()
                        .filter(|&n| n > 0)
                        .ok_or(format!("bad --per-item {v}"))?,
                );
            }
            "--small" => {
                let v = val()?;
                a.small = v.parse().map_err(|_| format!("bad --small {v}"))?;
            }
            "--quick" => {
                a.params = 1 << 18;
                a.reps = 2;
                a.precisions = vec!["f32".into()];
                a.small = 200;
            }
            "--list" => a.list = true,
            _ => return Err(format!("unknown argument {arg}")),
        }
    }
    Ok(a)
}

/// Host buffers of one tensor: parameter, gradient, state (m, v, Ī).
struct HostT<P, S> {
    p: Vec<P>,
    g: Vec<P>,
    s: TensorState<Vec<S>>,
}

/// Device buffers of one tensor.
struct DevT<P: Element, S: Element> {
    p: ClBuffer<P>,
    g: ClBuffer<P>,
    s: TensorState<ClBuffer<S>>,
}

/// Deterministic, finite values in about ±scale (no need for a random-number crate).
fn values<E: Element>(n: usize, seed: u64, scale: f32) -> Vec<E> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let u = (x >> 40) as f32 / (1u64 << 24) as f32; // [0, 1)
            E::from_f32((2.0 * u - 1.0) * scale)
        })
        .collect()
}

/// A step's tensors over the device buffers.
fn dev_tensors<P: Element, S: Element>(
    dev: &mut [DevT<P, S>],
) -> Vec<ParamTensor<'_, OpenCl, P, S>> {
    dev.iter_mut()
        .map(|d| ParamTensor::new(&mut d.p, &d.g, d.s.view()))
        .collect()
}

/// One timed line: its best time, the bytes it must move, and the row it is compared to.
struct Row {
    name: &'static str,
    best: f64,
    bytes: f64,
    base: usize,
}

fn time<E>(mut f: impl FnMut() -> Result<(), E>) -> Result<f64, E> {
    let t = Instant::now();
    f()?;
    Ok(t.elapsed().as_secs_f64())
}

fn config(guarded: bool) -> Config {
    Config::reference(Algorithm::adamw(), 1e-4)
        .beta0(0.8)
        .skip_non_finite(guarded)
}

/// Times every row for one precision and shape.
fn run_case<P: Element, S: Element>(
    cl: &mut OpenCl,
    lens: &[usize],
    reps: usize,
    slab: bool,
) -> Result<Vec<Row>, String> {
    let err = |e: sage_opencl::Error| e.to_string();
    let groups = [ParamGroup::sage().weight_decay(0.01)];
    let mut host: Vec<HostT<P, S>> = lens
        .iter()
        .enumerate()
        .map(|(i, &n)| HostT {
            p: values(n, 2 * i as u64 + 1, 0.5),
            g: values(n, 2 * i as u64 + 2, 0.01),
            s: TensorState::zeros(config(false).state_layout(true), n),
        })
        .collect();
    let mut dev: Vec<DevT<P, S>> = Vec::with_capacity(host.len());
    if slab {
        // One allocation per stream, every tensor's buffer a sub-buffer of it.
        let cut_p = || cl.slab::<P>(lens).map(|(_, pieces)| pieces);
        let cut_s = || cl.slab::<S>(lens).map(|(_, pieces)| pieces);
        let (ps, gs) = (cut_p().map_err(err)?, cut_p().map_err(err)?);
        let (ms, vs, bs) = (
            cut_s().map_err(err)?,
            cut_s().map_err(err)?,
            cut_s().map_err(err)?,
        );
        for (i, h) in host.iter().enumerate() {
            let (mut p, mut g) = (ps[i].clone(), gs[i].clone());
            cl.write(&mut p, &h.p).map_err(err)?;
            cl.write(&mut g, &h.g).map_err(err)?;
            let s = TensorState::new(config(false).state_layout(true), || ())
                .try_map(|b, ()| {
                    Ok::<_, sage_opencl::Error>(match b {
                        Buffer::M => ms[i].clone(),
                        Buffer::V => vs[i].clone(),
                        _ => bs[i].clone(),
                    })
                })
                .map_err(err)?;
            dev.push(DevT { p, g, s });
        }
    } else {
        for h in &host {
            let n = h.p.len();
            dev.push(DevT {
                p: cl.upload(&h.p).map_err(err)?,
                g: cl.upload(&h.g).map_err(err)?,
                s: TensorState::try_new(config(false).state_layout(true), |_| cl.zeros(n))
                    .map_err(err)?,
            });
        }
    }
    let bytes_per_param = (3 * P::DTYPE.size() + 6 * S::DTYPE.size()) as f64;
    let total: usize = lens.iter().sum();
    let bytes = bytes_per_param * total as f64;

    let mut fast = Optimizer::new(cl.clone(), config(false), groups).map_err(|e| e.to_string())?;
    let mut guarded =
        Optimizer::new(cl.clone(), config(true), groups).map_err(|e| e.to_string())?;
    let mut cpu = Optimizer::new(Cpu, config(false), groups).map_err(|e| e.to_string())?;
    let cpu_step = |cpu: &mut Optimizer<Cpu, [ParamGroup; 1]>, host: &mut Vec<HostT<P, S>>| {
        let mut ts: Vec<ParamTensor<'_, Cpu, P, S>> = host
            .iter_mut()
            .map(|h| ParamTensor::new(&mut h.p[..], &h.g[..], h.s.view()))
            .collect();
        cpu.step(&mut ts).map(|_| ()).map_err(|e| e.to_string())
    };

    // Warm-up: builds the programs, faults the pages in.
    cl.floor_tensors(&mut dev_tensors(&mut dev)).map_err(err)?;
    fast.step(&mut dev_tensors(&mut dev))
        .map_err(|e| e.to_string())?;
    guarded
        .step(&mut dev_tensors(&mut dev))
        .map_err(|e| e.to_string())?;
    cl.finish().map_err(err)?;
    cpu_step(&mut cpu, &mut host)?;

    let norm_pass = |cl: &mut OpenCl, dev: &[DevT<P, S>]| {
        let grads: Vec<&ClBuffer<P>> = dev.iter().map(|d| &d.g).collect();
        cl.sq_norms(&grads).map(|_| ())
    };
    let read_floor = |cl: &mut OpenCl, dev: &[DevT<P, S>]| {
        let grads: Vec<&ClBuffer<P>> = dev.iter().map(|d| &d.g).collect();
        cl.floor_read(&grads)?;
        cl.finish()
    };
    norm_pass(cl, &dev).map_err(err)?;
    read_floor(cl, &dev).map_err(err)?;

    let mut best = [f64::INFINITY; 6];
    for _ in 0..reps {
        // Untimed: a GPU lowers its clocks while the CPU row runs; this brings them back up
        // so that the floor is not timed cold.
        cl.floor_tensors(&mut dev_tensors(&mut dev)).map_err(err)?;
        cl.finish().map_err(err)?;
        let t = time(|| {
            cl.floor_tensors(&mut dev_tensors(&mut dev))?;
            cl.finish()
        })
        .map_err(err)?;
        best[0] = best[0].min(t);
        let t = time(|| {
            fast.step(&mut dev_tensors(&mut dev))
                .map_err(|e| e.to_string())?;
            cl.finish().map_err(err)
        })?;
        best[1] = best[1].min(t);
        let t = time(|| {
            guarded
                .step(&mut dev_tensors(&mut dev))
                .map_err(|e| e.to_string())?;
            cl.finish().map_err(err)
        })?;
        best[2] = best[2].min(t);
        let t = time(|| read_floor(cl, &dev)).map_err(err)?;
        best[4] = best[4].min(t);
        let t = time(|| norm_pass(cl, &dev)).map_err(err)?;
        best[5] = best[5].min(t);
        let t = time(|| cpu_step(&mut cpu, &mut host))?;
        best[3] = best[3].min(t);
    }
    let grad_bytes = (P::DTYPE.size() * total) as f64;
    let rows = [
        ("floor (in-place stream)", bytes, 0),
        ("opencl step", bytes, 0),
        ("opencl step (guarded)", bytes + grad_bytes, 0),
        ("cpu portable step", bytes, 0),
        ("floor 1r (gradients)", grad_bytes, 4),
        ("grad-norm pass", grad_bytes, 4),
    ];
    Ok(rows
        .iter()
        .zip(best)
        .map(|(&(name, bytes, base), best)| Row {
            name,
            best,
            bytes,
            base,
        })
        .collect())
}

/// Tensors of 256 to 1024 elements (1–4 KiB of f32: biases, LayerNorms, adapters), `n` of
/// them, spread evenly over that range.
fn small_tensors(n: usize) -> Vec<usize> {
    (0..n).map(|i| 256 + (i * 7919) % 769).collect()
}

fn host_cpu() -> String {
    let model = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_string())
        })
        .unwrap_or_else(|| std::env::consts::ARCH.to_string());
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    format!("{model}, {threads} hardware threads")
}

fn main() -> ExitCode {
    let args = match parse() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("error: {e}");
            return usage();
        }
    };
    let list = match sage_opencl::devices() {
        Ok(l) => l,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(if e.kind() == ErrorKind::NotAvailable {
                2
            } else {
                1
            });
        }
    };
    if args.list {
        for d in &list {
            println!("{d}");
        }
        return ExitCode::SUCCESS;
    }
    let mut builder = OpenCl::builder().device(args.device.clone());
    if let Some(n) = args.per_item {
        builder = builder.elements_per_item(n);
    }
    let mut cl = match builder.build() {
        Ok(cl) => cl,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(if e.kind() == ErrorKind::NotAvailable {
                2
            } else {
                1
            });
        }
    };
    println!("device: {}", cl.device());
    println!("host:   {}", host_cpu());
    println!(
        "AdamW-SAGE (reference preset), state in f32, best of {} reps; {} tensors per launch, \
         {} elements per work-item",
        args.reps,
        cl.tensors_per_launch(),
        cl.elements_per_item()
    );
    // (name, tensor lengths, cut from one allocation per stream)
    let mut shapes: Vec<(String, Vec<usize>, bool)> = vec![
        ("1 tensor".into(), vec![args.params], false),
        (
            "BERT-base mix, 199 tensors".into(),
            bert_scaled(args.params),
            false,
        ),
    ];
    if args.small > 0 {
        let small = small_tensors(args.small);
        let total = small.iter().sum();
        let n = args.small;
        shapes.push((
            format!("{n} small tensors (256-1024 elements), each buffer its own allocation"),
            small.clone(),
            false,
        ));
        shapes.push((
            format!("{n} small tensors, sub-buffers of one allocation per stream (slab)"),
            small,
            true,
        ));
        shapes.push((
            "flat: one tensor of the same total".into(),
            vec![total],
            false,
        ));
    }
    for prec in &args.precisions {
        let mut done: Vec<Vec<Row>> = Vec::new();
        for (shape, lens, slab) in &shapes {
            let total: usize = lens.iter().sum();
            let r = match prec.as_str() {
                "f32" => run_case::<f32, f32>(&mut cl, lens, args.reps, *slab),
                "bf16" => run_case::<bf16, f32>(&mut cl, lens, args.reps, *slab),
                _ => run_case::<f16, f32>(&mut cl, lens, args.reps, *slab),
            };
            let rows = match r {
                Ok(x) => x,
                Err(e) => {
                    eprintln!("error: {e}");
                    return ExitCode::from(1);
                }
            };
            println!(
                "\n{prec} params/grads, {shape}: {total} parameters, {:.0} bytes/parameter",
                rows[0].bytes / total as f64
            );
            println!(
                "  {:<26} {:>10} {:>9} {:>9} {:>8}",
                "", "ms/step", "ns/param", "GB/s", "x floor"
            );
            for r in &rows {
                println!(
                    "  {:<26} {:>10.3} {:>9.3} {:>9.2} {:>8.2}",
                    r.name,
                    r.best * 1e3,
                    r.best * 1e9 / total as f64,
                    r.bytes / r.best / 1e9,
                    r.best / rows[r.base].best
                );
            }
            done.push(rows);
        }
        if args.small > 0 {
            // The small-tensor shapes against the flat one of the same total, row by row.
            let (own, slab, flat) = (&done[2], &done[3], &done[4]);
            println!(
                "\n{prec}, {} small tensors against one flat tensor (x flat): own buffers, slab",
                args.small
            );
            for ((a, b), f) in own.iter().zip(slab).zip(flat) {
                println!(
                    "  {:<26} {:>8.2} {:>8.2}",
                    a.name,
                    a.best / f.best,
                    b.best / f.best
                );
            }
        }
    }
    ExitCode::SUCCESS
}
