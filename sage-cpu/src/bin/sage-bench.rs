//! `sage-bench`: the fused SAGE step on the CPU against the memory-bandwidth floor.
//!
//! ```text
//! sage-bench [--params N] [--threads 1,all] [--precision f32,bf16] [--level best|avx2|...]
//!            [--reps N] [--json] [--list-tensors]
//! ```
//!
//! In one run, for each precision and thread count, it times an in-place streaming pass with
//! each algorithm's traffic (the floor: the same buffers read and written back in place, the
//! same conversions, threads and split, one add per value), then each algorithm, interleaved
//! rep by rep so that a noisy machine slows both alike; the best rep of each is reported as
//! ns/parameter, GB/s and the ratio to its floor. Default sizes: BERT-base's tensors (about
//! 110M parameters in 199 tensors); `--params N` scales every tensor to about N in all.
//!
//! The headline rows step with the non-finite guard and clipping off (the fused kernel's own
//! cost); the `(guarded)` row adds the optimizer's default gradient-norm pass.
//! `--list-tensors` prints the tensor lengths, one per line, and exits (`bench/compare_torch.py`
//! steps torch's optimizers on the same tensors).

use std::process::ExitCode;
use std::time::Instant;

use sage_core::{
    bf16, f16, Algorithm, Coeffs, Config, Element, Optimizer, ParamGroup, ParamTensor, TensorState,
};
use sage_cpu::{Level, SimdCpu};

/// BERT-base (uncased) parameter tensors: embeddings, 12 layers, pooler.
fn bert_base() -> Vec<usize> {
    let (h, ff, vocab, pos, types, layers) = (768, 3072, 30522, 512, 2, 12);
    let mut t = vec![vocab * h, pos * h, types * h, h, h];
    for _ in 0..layers {
        for _ in 0..4 {
            t.extend([h * h, h]); // query, key, value, attention output
        }
        t.extend([h, h, h * ff, ff, ff * h, h, h, h]);
    }
    t.extend([h * h, h]);
    t
}

/// The mix scaled to about `n` parameters in all (every tensor keeps at least one).
fn scaled(n: Option<usize>) -> Vec<usize> {
    let base = bert_base();
    let Some(n) = n else { return base };
    let total: usize = base.iter().sum();
    let f = n as f64 / total as f64;
    base.iter()
        .map(|&x| ((x as f64 * f).round() as usize).max(1))
        .collect()
}

#[derive(Clone, Copy)]
struct Algo {
    name: &'static str,
    cfg: Config,
    sage: bool,
    guarded: bool,
}

fn algorithms() -> Vec<Algo> {
    let plain = |name, cfg: Config, sage| Algo {
        name,
        cfg: cfg.skip_non_finite(false),
        sage,
        guarded: false,
    };
    vec![
        plain("sgd-sage", Config::paper(Algorithm::sgd(0.9), 1e-3), true),
        plain("adam-sage", Config::paper(Algorithm::adam(), 1e-4), true),
        plain(
            "adamw-sage",
            Config::reference(Algorithm::adamw(), 1e-4),
            true,
        ),
        plain(
            "adamax-sage",
            Config::reference(Algorithm::adamax(), 1e-4),
            true,
        ),
        plain("adamw", Config::reference(Algorithm::adamw(), 1e-4), false),
        Algo {
            name: "adam-sage (guarded)",
            cfg: Config::paper(Algorithm::adam(), 1e-4).skip_non_finite(true),
            sage: true,
            guarded: true,
        },
    ]
}

struct Args {
    params: Option<usize>,
    threads: Vec<usize>,
    precisions: Vec<String>,
    level: Level,
    reps: usize,
    json: bool,
    list: bool,
}

fn usage() -> ExitCode {
    eprintln!(
        "usage: sage-bench [--params N] [--threads 1,all] [--precision f32,bf16,bf16-state,f16] \
         [--level best|portable|avx2|avx512|neon] [--reps N] [--json] [--list-tensors]"
    );
    ExitCode::from(64)
}

fn parse() -> Result<Args, String> {
    let hw = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mut a = Args {
        params: None,
        threads: vec![1, hw],
        precisions: vec!["f32".into(), "bf16".into()],
        level: Level::best(),
        reps: 3,
        json: false,
        list: false,
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let mut val = || it.next().ok_or(format!("{arg} needs a value"));
        match arg.as_str() {
            "--params" => {
                let v = val()?;
                let n: f64 = v.parse().map_err(|_| format!("bad --params {v}"))?;
                if n.is_nan() || n < 1.0 {
                    return Err(format!("bad --params {v}"));
                }
                a.params = Some(n as usize);
            }
            "--threads" => {
                let v = val()?;
                a.threads = v
                    .split(',')
                    .map(|t| match t {
                        "all" => Ok(hw),
                        t => t
                            .parse::<usize>()
                            .ok()
                            .filter(|&n| n > 0)
                            .ok_or(format!("bad thread count {t}")),
                    })
                    .collect::<Result<_, _>>()?;
                a.threads.dedup();
            }
            "--precision" => {
                a.precisions = val()?.split(',').map(String::from).collect();
                for p in &a.precisions {
                    if !["f32", "bf16", "bf16-state", "f16"].contains(&p.as_str()) {
                        return Err(format!("unknown precision {p}"));
                    }
                }
            }
            "--level" => {
                let v = val()?;
                a.level = if v == "best" {
                    Level::best()
                } else {
                    Level::from_name(&v).ok_or(format!("unknown level {v}"))?
                };
                if !a.level.is_available() {
                    return Err(format!("level {v} is not available on this machine"));
                }
            }
            "--reps" => {
                let v = val()?;
                a.reps = v
                    .parse()
                    .ok()
                    .filter(|&n| n > 0)
                    .ok_or(format!("bad --reps {v}"))?;
            }
            "--json" => a.json = true,
            "--list-tensors" => a.list = true,
            "-h" | "--help" => return Err(String::new()),
            other => return Err(format!("unknown argument {other}")),
        }
    }
    Ok(a)
}

/// Every buffer of the model in one precision: parameters, gradients, and m, v, Ī.
struct Model<P: Element, S: Element> {
    p: Vec<Vec<P>>,
    g: Vec<Vec<P>>,
    st: Vec<[Vec<S>; 3]>,
    steps: Vec<u64>,
}

/// Cheap deterministic fill in [-scale, scale).
fn fill<E: Element>(n: usize, seed: u64, scale: f32, abs: bool) -> Vec<E> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let u = (x >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0;
            E::from_f32(if abs { u.abs() } else { u } * scale)
        })
        .collect()
}

impl<P: Element, S: Element> Model<P, S> {
    fn new(sizes: &[usize]) -> Self {
        let mut m = Model {
            p: vec![],
            g: vec![],
            st: vec![],
            steps: vec![0; sizes.len()],
        };
        for (i, &n) in sizes.iter().enumerate() {
            let s = i as u64 * 8;
            m.p.push(fill(n, s + 1, 0.05, false));
            m.g.push(fill(n, s + 2, 1e-3, false));
            m.st.push([
                fill(n, s + 3, 1e-4, false),
                fill(n, s + 4, 1e-8, true),
                fill(n, s + 5, 1e-5, true),
            ]);
        }
        m
    }

    /// The step's tensors with the buffers `layout` asks for.
    fn tensors(&mut self, layout: [bool; 3]) -> Vec<ParamTensor<'_, SimdCpu, P, S>> {
        self.p
            .iter_mut()
            .zip(&self.g)
            .zip(self.st.iter_mut())
            .zip(self.steps.iter_mut())
            .map(|(((p, g), [m, v, ib]), step)| {
                let state = TensorState {
                    m: layout[0].then_some(&mut m[..]),
                    v: layout[1].then_some(&mut v[..]),
                    ibar: layout[2].then_some(&mut ib[..]),
                    step,
                };
                ParamTensor::new(&mut p[..], &g[..], state)
            })
            .collect()
    }
}

/// What one row measures.
enum Job {
    Floor([bool; 3]),
    Step(usize),
}

struct Row {
    label: String,
    sage: bool,
    layout: [bool; 3],
    guarded: bool,
    best: f64,
}

fn bytes_per_param(layout: [bool; 3], p: usize, s: usize, guarded: bool) -> f64 {
    let states = layout.iter().filter(|&&b| b).count();
    // read θ, g and each state; write θ and each state; the guard reads g once more
    (2 * p + states * s + p + states * s + if guarded { p } else { 0 }) as f64
}

fn run_precision<P: Element, S: Element>(args: &Args, sizes: &[usize], precision: &str) {
    let n: usize = sizes.iter().sum();
    let mut model = Model::<P, S>::new(sizes);
    let algos = algorithms();
    for &threads in &args.threads {
        let backend = SimdCpu::with_level(args.level)
            .expect("level checked available")
            .threads(threads);
        let mut opts: Vec<(Optimizer<SimdCpu>, [bool; 3])> = algos
            .iter()
            .map(|a| {
                let group = if a.sage {
                    ParamGroup::sage()
                } else {
                    ParamGroup::plain()
                }
                .weight_decay(0.01);
                let l = a.cfg.state_layout(a.sage);
                (
                    Optimizer::new(backend, a.cfg, [group]).expect("valid config"),
                    [l.m, l.v, l.ibar],
                )
            })
            .collect();
        let mut floors: Vec<[bool; 3]> = Vec::new();
        for (_, l) in &opts {
            if !floors.contains(l) {
                floors.push(*l);
            }
        }
        let mut rows: Vec<(Job, Row)> = Vec::new();
        for l in &floors {
            let name = format!(
                "floor {}r{}w",
                2 + l.iter().filter(|&&b| b).count(),
                1 + l.iter().filter(|&&b| b).count()
            );
            rows.push((
                Job::Floor(*l),
                Row {
                    label: name,
                    sage: l[2],
                    layout: *l,
                    guarded: false,
                    best: f64::INFINITY,
                },
            ));
        }
        for (i, a) in algos.iter().enumerate() {
            rows.push((
                Job::Step(i),
                Row {
                    label: a.name.into(),
                    sage: a.sage,
                    layout: opts[i].1,
                    guarded: a.guarded,
                    best: f64::INFINITY,
                },
            ));
        }
        let mut floor_backend = backend;
        // Rep 0 warms up (page faults, the thread pool); the best of the rest counts.
        for rep in 0..=args.reps {
            for (job, row) in rows.iter_mut() {
                let dt = match job {
                    Job::Floor(l) => {
                        let mut ts = model.tensors(*l);
                        for t in ts.iter_mut() {
                            t.set_coeffs(Coeffs {
                                step: 1e-9,
                                ..Coeffs::default()
                            });
                        }
                        let t0 = Instant::now();
                        floor_backend.stream_floor(&mut ts);
                        t0.elapsed().as_secs_f64()
                    }
                    Job::Step(i) => {
                        let (opt, l) = &mut opts[*i];
                        let mut ts = model.tensors(*l);
                        let t0 = Instant::now();
                        opt.step(&mut ts).expect("step");
                        t0.elapsed().as_secs_f64()
                    }
                };
                if rep > 0 {
                    row.best = row.best.min(dt);
                }
            }
        }
        for (_, row) in &rows {
            let floor = rows
                .iter()
                .find(|(j, r)| matches!(j, Job::Floor(_)) && r.layout == row.layout)
                .map(|(_, r)| r.best)
                .unwrap_or(f64::NAN);
            let bpp = bytes_per_param(row.layout, P::DTYPE.size(), S::DTYPE.size(), row.guarded);
            let ns = row.best * 1e9 / n as f64;
            let gbps = bpp * n as f64 / row.best / 1e9;
            let ratio = row.best / floor;
            if args.json {
                println!(
                    "{{\"backend\":\"cpu/{}\",\"algorithm\":\"{}\",\"sage\":{},\"precision\":\"{}\",\"threads\":{},\"params\":{},\"tensors\":{},\"ns_per_param\":{:.4},\"gbps\":{:.2},\"floor_ratio\":{:.3}}}",
                    args.level, row.label, row.sage, precision, threads, n, sizes.len(), ns, gbps, ratio
                );
            } else {
                println!(
                    "{:<10} {:<22} {:<5} {:<10} {:>7} {:>9.3} {:>8.2} {:>8.3}",
                    format!("cpu/{}", args.level),
                    row.label,
                    if row.sage { "on" } else { "off" },
                    precision,
                    threads,
                    ns,
                    gbps,
                    ratio
                );
            }
        }
    }
}

fn main() -> ExitCode {
    let args = match parse() {
        Ok(a) => a,
        Err(e) => {
            if !e.is_empty() {
                eprintln!("sage-bench: {e}");
            }
            return usage();
        }
    };
    let sizes = scaled(args.params);
    if args.list {
        for s in &sizes {
            println!("{s}");
        }
        return ExitCode::SUCCESS;
    }
    let n: usize = sizes.iter().sum();
    if !args.json {
        println!(
            "sage-bench: {n} parameters in {} tensors, level {}, {} reps (best of), threads {:?}",
            sizes.len(),
            args.level,
            args.reps,
            args.threads
        );
        println!(
            "{:<10} {:<22} {:<5} {:<10} {:>7} {:>9} {:>8} {:>8}",
            "backend", "algorithm", "sage", "precision", "threads", "ns/param", "GB/s", "floor"
        );
    }
    for p in &args.precisions {
        match p.as_str() {
            "f32" => run_precision::<f32, f32>(&args, &sizes, p),
            "bf16" => run_precision::<bf16, f32>(&args, &sizes, p),
            "bf16-state" => run_precision::<bf16, bf16>(&args, &sizes, p),
            "f16" => run_precision::<f16, f32>(&args, &sizes, p),
            _ => unreachable!("checked in parse"),
        }
    }
    ExitCode::SUCCESS
}
