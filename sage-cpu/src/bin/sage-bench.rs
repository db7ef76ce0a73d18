//! `sage-bench`: every path of the CPU step against the memory-bandwidth floor.
//!
//! ```text
//! sage-bench [--params N] [--threads 1,all] [--precision f32,bf16] [--level best|avx2|...]
//!            [--reps N] [--small N] [--json] [--list-tensors]
//! ```
//!
//! In one run, for each precision and thread count, it times in-place streaming passes with
//! each algorithm's traffic (the floors: the same buffers read and written back in place, the
//! same conversions, threads and split, one add per value), a read-only pass over the
//! gradients (`floor 1r`, the norm pass's traffic), the gradient-norm pass alone, and each
//! algorithm plain (guard and clipping off: the fused kernel's own cost), guarded (the
//! optimizer's default), clipped globally and per tensor — interleaved rep by rep so that a
//! noisy machine slows all alike; the best rep of each is reported as ns/parameter, GB/s, the
//! ratio to its floor (`x floor`) and to what it must move at the floors' speed (`x limit`:
//! floor + `floor 1r` for rows with a norm pass). Default sizes: BERT-base's tensors (about
//! 110M parameters in 199 tensors); `--params N` scales every tensor to about N in all.
//!
//! Then, unless `--small 0`: Adam-SAGE over N (default 10,000) tensors of 256–1024 elements,
//! each buffer allocated on its own (`small`) or cut from one allocation per stream (`slab`),
//! against one flat tensor of the same total (`x flat`).
//!
//! Each model and precision runs in a process of its own (the binary runs itself with
//! `SAGE_BENCH_PART` set): a model allocated after another one was freed would get its
//! buffers from glibc's heap, over which the fused steps run slower (sage-cpu/README.md).
//!
//! `--list-tensors` prints the tensor lengths, one per line, and exits (`bench/compare_torch.py`
//! steps torch's optimizers on the same tensors).

use std::process::ExitCode;
use std::time::Instant;

use sage_core::{
    bf16, f16, Algorithm, Backend, Coeffs, Config, Element, Optimizer, ParamGroup, ParamTensor,
    TensorState,
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

/// 10,000 small tensors (biases, LayerNorms, adapters): 256 to 1024 elements each (1–4 KiB
/// of f32), in a fixed pseudo-random mix.
fn small_tensors(count: usize) -> Vec<usize> {
    let mut x = 0x2545_f491_4f6c_dd1du64;
    (0..count)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            256 + (x % 769) as usize
        })
        .collect()
}

/// What a row steps.
#[derive(Clone, Copy)]
enum Kind {
    /// The optimizer's non-finite guard and clipping off: the fused kernel's own cost.
    Plain,
    /// The non-finite guard (the optimizer's default): one gradient-norm pass first.
    Guarded,
    /// Global clipping at 1.0 and the guard, as training runs (one norm pass, same kernel).
    Clipped,
    /// Per-tensor clipping at 1.0 and the guard (the authors' optimizers clip per tensor).
    TensorClipped,
}

#[derive(Clone, Copy)]
struct Algo {
    name: &'static str,
    cfg: Config,
    sage: bool,
    kind: Kind,
}

impl Algo {
    fn new(name: &'static str, cfg: Config, sage: bool, kind: Kind) -> Self {
        let cfg = match kind {
            Kind::Plain => cfg.skip_non_finite(false),
            Kind::Guarded => cfg.skip_non_finite(true),
            Kind::Clipped => cfg.skip_non_finite(true).global_clip(1.0),
            Kind::TensorClipped => cfg.skip_non_finite(true).per_tensor_clip(1.0),
        };
        Algo {
            name,
            cfg,
            sage,
            kind,
        }
    }
    fn reads_norm(&self) -> bool {
        !matches!(self.kind, Kind::Plain)
    }
}

fn algorithms() -> Vec<Algo> {
    use Kind::*;
    let adam = Config::paper(Algorithm::adam(), 1e-4);
    let adamw_ref = Config::reference(Algorithm::adamw(), 1e-4);
    vec![
        Algo::new(
            "sgd-sage",
            Config::paper(Algorithm::sgd(0.9), 1e-3),
            true,
            Plain,
        ),
        Algo::new("adam-sage", adam, true, Plain),
        Algo::new("adamw-sage", adamw_ref, true, Plain),
        Algo::new(
            "adamax-sage",
            Config::reference(Algorithm::adamax(), 1e-4),
            true,
            Plain,
        ),
        Algo::new("adamw", adamw_ref, false, Plain),
        Algo::new("adam-sage (guarded)", adam, true, Guarded),
        Algo::new("adam-sage (clipped)", adam, true, Clipped),
        Algo::new("adamw-sage (tensor-clip)", adamw_ref, true, TensorClipped),
        Algo::new("adamw (guarded)", adamw_ref, false, Guarded),
        Algo::new("adamw (clipped)", adamw_ref, false, Clipped),
    ]
}

struct Args {
    params: Option<usize>,
    threads: Vec<usize>,
    precisions: Vec<String>,
    level: Level,
    reps: usize,
    small: usize,
    json: bool,
    list: bool,
}

fn usage() -> ExitCode {
    eprintln!(
        "usage: sage-bench [--params N] [--threads 1,all] [--precision f32,bf16,bf16-state,f16] \
         [--level best|portable|avx2|avx512|neon] [--reps N] [--small N] [--json] [--list-tensors]"
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
        reps: 5,
        small: 10_000,
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
            "--small" => {
                let v = val()?;
                a.small = v.parse().map_err(|_| format!("bad --small {v}"))?;
            }
            "--json" => a.json = true,
            "--list-tensors" => a.list = true,
            "-h" | "--help" => return Err(String::new()),
            other => return Err(format!("unknown argument {other}")),
        }
    }
    Ok(a)
}

/// Every buffer of a model in one precision: parameters, gradients, and m, v, Ī. Allocated as
/// a framework does: every parameter, then every gradient, then each tensor's state (m, v, Ī
/// together, as `TensorState::zeros` and torch's optimizers allocate it) — or, for a slab
/// model, each of the five streams as one allocation cut into the tensors (as frameworks with
/// flat parameter and gradient buffers do).
struct Model<P: Element, S: Element> {
    p: Vec<Vec<P>>,
    g: Vec<Vec<P>>,
    st: Vec<[Vec<S>; 3]>,
    steps: Vec<u64>,
    /// Slab model: the tensors' lengths (every `Vec` above holds one slab).
    cut: Option<Vec<usize>>,
}

/// `buf` cut into consecutive pieces of `sizes`.
fn cut<'a, E>(mut buf: &'a mut [E], sizes: &[usize]) -> Vec<&'a mut [E]> {
    sizes
        .iter()
        .map(|&n| {
            let (head, rest) = std::mem::take(&mut buf).split_at_mut(n);
            buf = rest;
            head
        })
        .collect()
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
        let seed = |i: usize, k: u64| i as u64 * 8 + k;
        Model {
            p: (sizes.iter().enumerate())
                .map(|(i, &n)| fill(n, seed(i, 1), 0.05, false))
                .collect(),
            g: (sizes.iter().enumerate())
                .map(|(i, &n)| fill(n, seed(i, 2), 1e-3, false))
                .collect(),
            st: (sizes.iter().enumerate())
                .map(|(i, &n)| {
                    [
                        fill(n, seed(i, 3), 1e-4, false),
                        fill(n, seed(i, 4), 1e-8, true),
                        fill(n, seed(i, 5), 1e-5, true),
                    ]
                })
                .collect(),
            steps: vec![0; sizes.len()],
            cut: None,
        }
    }

    /// The slab model of `sizes`.
    fn slab(sizes: &[usize]) -> Self {
        let total = sizes.iter().sum();
        let mut m = Model::new(&[total]);
        m.steps = vec![0; sizes.len()];
        m.cut = Some(sizes.to_vec());
        m
    }

    fn len(&self) -> usize {
        self.p.iter().map(Vec::len).sum()
    }

    fn count(&self) -> usize {
        self.steps.len()
    }

    /// The step's tensors with the buffers `layout` asks for.
    fn tensors(&mut self, layout: [bool; 3]) -> Vec<ParamTensor<'_, SimdCpu, P, S>> {
        type Bufs<'a, P, S> = (&'a mut [P], &'a [P], [&'a mut [S]; 3]);
        let bufs: Vec<Bufs<'_, P, S>> = match &self.cut {
            None => self
                .p
                .iter_mut()
                .zip(&self.g)
                .zip(self.st.iter_mut())
                .map(|((p, g), [m, v, ib])| {
                    (&mut p[..], &g[..], [&mut m[..], &mut v[..], &mut ib[..]])
                })
                .collect(),
            Some(sizes) => {
                let [m, v, ib] = &mut self.st[0];
                let g: Vec<&mut [P]> = cut(&mut self.g[0], sizes);
                cut(&mut self.p[0], sizes)
                    .into_iter()
                    .zip(g)
                    .zip(
                        cut(m, sizes)
                            .into_iter()
                            .zip(cut(v, sizes))
                            .zip(cut(ib, sizes)),
                    )
                    .map(|((p, g), ((m, v), ib))| (p, &*g, [m, v, ib]))
                    .collect()
            }
        };
        bufs.into_iter()
            .zip(self.steps.iter_mut())
            .map(|((p, g, [m, v, ib]), step)| {
                let state = TensorState {
                    m: layout[0].then_some(m),
                    v: layout[1].then_some(v),
                    ibar: layout[2].then_some(ib),
                    step,
                };
                ParamTensor::new(p, g, state)
            })
            .collect()
    }
}

/// What one row times.
#[derive(Clone, Copy, PartialEq)]
enum Job {
    /// The in-place streaming pass over the buffers of a layout.
    Floor([bool; 3]),
    /// Every gradient read once (the norm pass's traffic).
    ReadFloor,
    /// The gradient-norm pass alone (`Backend::grad_sq_norms`, as the guarded step runs it).
    Norm,
    /// An optimizer step of algorithm `i`.
    Step(usize),
}

struct Row {
    /// Which model (index into the run's models).
    model: usize,
    job: Job,
    label: String,
    sage: bool,
    layout: [bool; 3],
    /// Reads the gradients once more (a norm pass).
    norm: bool,
    best: f64,
}

impl Row {
    fn new(
        model: usize,
        job: Job,
        label: String,
        sage: bool,
        layout: [bool; 3],
        norm: bool,
    ) -> Self {
        Row {
            model,
            job,
            label,
            sage,
            layout,
            norm,
            best: f64::INFINITY,
        }
    }
}

/// Bytes a row moves per parameter.
fn bytes_per_param(row: &Row, p: usize, s: usize) -> f64 {
    let states = row.layout.iter().filter(|&&b| b).count();
    let norm = if row.norm { p } else { 0 };
    match row.job {
        Job::ReadFloor | Job::Norm => p as f64,
        // read θ, g and each state; write θ and each state; a norm pass reads g once more
        _ => (2 * p + states * s + p + states * s + norm) as f64,
    }
}

fn floor_name(l: [bool; 3]) -> String {
    let states = l.iter().filter(|&&b| b).count();
    format!("floor {}r{}w", 2 + states, 1 + states)
}

/// Times every row of `rows` over `models`, interleaved rep by rep (rep 0 warms up: page
/// faults, the thread pool); keeps each row's best.
fn time_rows<P: Element, S: Element>(
    args: &Args,
    backend: SimdCpu,
    algos: &[Algo],
    models: &mut [Model<P, S>],
    rows: &mut [Row],
) {
    let mut opts: Vec<Vec<Optimizer<SimdCpu>>> = models
        .iter()
        .map(|_| {
            algos
                .iter()
                .map(|a| {
                    let group = if a.sage {
                        ParamGroup::sage()
                    } else {
                        ParamGroup::plain()
                    }
                    .weight_decay(0.01);
                    Optimizer::new(backend, a.cfg, [group]).expect("valid config")
                })
                .collect()
        })
        .collect();
    let mut b = backend;
    let mut sink = 0f32;
    for rep in 0..=args.reps {
        for row in rows.iter_mut() {
            let model = &mut models[row.model];
            let dt = match row.job {
                Job::Floor(l) => {
                    let mut ts = model.tensors(l);
                    for t in ts.iter_mut() {
                        t.set_coeffs(Coeffs {
                            step: 1e-9,
                            ..Coeffs::default()
                        });
                    }
                    let t0 = Instant::now();
                    b.stream_floor(&mut ts);
                    t0.elapsed().as_secs_f64()
                }
                Job::ReadFloor => {
                    let ts = model.tensors([false; 3]);
                    let t0 = Instant::now();
                    sink += b.stream_read_floor(&ts);
                    t0.elapsed().as_secs_f64()
                }
                Job::Norm => {
                    let mut ts = model.tensors([false; 3]);
                    let t0 = Instant::now();
                    b.grad_sq_norms(&mut ts).expect("infallible");
                    let dt = t0.elapsed().as_secs_f64();
                    sink += ts[0].grad_sq_norm() as f32;
                    dt
                }
                Job::Step(i) => {
                    let mut ts = model.tensors(row.layout);
                    let opt = &mut opts[row.model][i];
                    let t0 = Instant::now();
                    let report = opt.step(&mut ts).expect("step");
                    let dt = t0.elapsed().as_secs_f64();
                    assert!(report.applied(), "{}: the step was skipped", row.label);
                    dt
                }
            };
            if rep > 0 {
                row.best = row.best.min(dt);
            }
        }
    }
    std::hint::black_box(sink);
}

/// One printed (or JSON) result.
struct Out<'a> {
    args: &'a Args,
    model: &'a str,
    precision: &'a str,
    threads: usize,
    params: usize,
    tensors: usize,
}

impl Out<'_> {
    fn print(&self, row: &Row, bpp: f64, floor: f64, limit: f64, vs_flat: Option<f64>) {
        let n = self.params as f64;
        let ns = row.best * 1e9 / n;
        let gbps = bpp * n / row.best / 1e9;
        let (fr, lr) = (row.best / floor, row.best / limit);
        if self.args.json {
            let flat = vs_flat.map_or(String::new(), |v| format!(",\"vs_flat\":{v:.3}"));
            println!(
                "{{\"backend\":\"cpu/{}\",\"model\":\"{}\",\"algorithm\":\"{}\",\"sage\":{},\"precision\":\"{}\",\"threads\":{},\"params\":{},\"tensors\":{},\"ns_per_param\":{:.4},\"gbps\":{:.2},\"floor_ratio\":{:.3},\"limit_ratio\":{:.3}{}}}",
                self.args.level, self.model, row.label, row.sage, self.precision, self.threads,
                self.params, self.tensors, ns, gbps, fr, lr, flat
            );
        } else {
            println!(
                "{:<10} {:<6} {:<26} {:<4} {:<10} {:>3} {:>9.3} {:>7.2} {:>7.3} {:>7.3} {:>7}",
                format!("cpu/{}", self.args.level),
                self.model,
                row.label,
                if row.sage { "on" } else { "off" },
                self.precision,
                self.threads,
                ns,
                gbps,
                fr,
                lr,
                vs_flat.map_or("-".into(), |v| format!("{v:.3}")),
            );
        }
    }
}

fn run_precision<P: Element, S: Element>(args: &Args, sizes: &[usize], precision: &str) {
    let algos = algorithms();
    let mut models = vec![Model::<P, S>::new(sizes)];
    let n = models[0].len();
    for &threads in &args.threads {
        let backend = SimdCpu::with_level(args.level)
            .expect("level checked available")
            .threads(threads);
        let mut layouts: Vec<[bool; 3]> = Vec::new();
        for a in &algos {
            let l = a.cfg.state_layout(a.sage);
            if !layouts.contains(&[l.m, l.v, l.ibar]) {
                layouts.push([l.m, l.v, l.ibar]);
            }
        }
        let mut rows: Vec<Row> = layouts
            .iter()
            .map(|&l| Row::new(0, Job::Floor(l), floor_name(l), l[2], l, false))
            .collect();
        rows.push(Row::new(
            0,
            Job::ReadFloor,
            "floor 1r (gradients)".into(),
            false,
            [false; 3],
            false,
        ));
        rows.push(Row::new(
            0,
            Job::Norm,
            "grad-norm".into(),
            false,
            [false; 3],
            true,
        ));
        for (i, a) in algos.iter().enumerate() {
            let l = a.cfg.state_layout(a.sage);
            rows.push(Row::new(
                0,
                Job::Step(i),
                a.name.into(),
                a.sage,
                [l.m, l.v, l.ibar],
                a.reads_norm(),
            ));
        }
        time_rows(args, backend, &algos, &mut models, &mut rows);
        let out = Out {
            args,
            model: "bert",
            precision,
            threads,
            params: n,
            tensors: sizes.len(),
        };
        let read = rows
            .iter()
            .find(|r| r.job == Job::ReadFloor)
            .map_or(f64::NAN, |r| r.best);
        for row in &rows {
            let floor = match row.job {
                Job::ReadFloor | Job::Norm => read,
                _ => rows
                    .iter()
                    .find(|r| matches!(r.job, Job::Floor(l) if l == row.layout))
                    .map_or(f64::NAN, |r| r.best),
            };
            let limit = if row.norm && !matches!(row.job, Job::Norm) {
                floor + read
            } else {
                floor
            };
            out.print(
                row,
                bytes_per_param(row, P::DTYPE.size(), S::DTYPE.size()),
                floor,
                limit,
                None,
            );
        }
    }
}

/// Many small tensors against one flat tensor of the same total size.
fn run_small<P: Element, S: Element>(args: &Args, count: usize, precision: &str) {
    let sizes = small_tensors(count);
    let total: usize = sizes.iter().sum();
    let mut models = vec![
        Model::<P, S>::new(&sizes),
        Model::<P, S>::slab(&sizes),
        Model::<P, S>::new(&[total]),
    ];
    const NAMES: [&str; 3] = ["small", "slab", "flat"];
    let adam = Config::paper(Algorithm::adam(), 1e-4);
    let algos = [
        Algo::new("adam-sage", adam, true, Kind::Plain),
        Algo::new("adam-sage (guarded)", adam, true, Kind::Guarded),
    ];
    let sage = [true; 3];
    for &threads in &args.threads {
        let backend = SimdCpu::with_level(args.level)
            .expect("level checked available")
            .threads(threads);
        let mut rows = Vec::new();
        for model in 0..models.len() {
            rows.push(Row::new(
                model,
                Job::Floor(sage),
                floor_name(sage),
                true,
                sage,
                false,
            ));
            rows.push(Row::new(
                model,
                Job::ReadFloor,
                "floor 1r (gradients)".into(),
                false,
                [false; 3],
                false,
            ));
            rows.push(Row::new(
                model,
                Job::Norm,
                "grad-norm".into(),
                false,
                [false; 3],
                true,
            ));
            for (i, a) in algos.iter().enumerate() {
                rows.push(Row::new(
                    model,
                    Job::Step(i),
                    a.name.into(),
                    true,
                    sage,
                    a.reads_norm(),
                ));
            }
        }
        time_rows(args, backend, &algos, &mut models, &mut rows);
        let per_model = rows.len() / models.len();
        let flat = models.len() - 1;
        for (model, name) in NAMES.iter().enumerate() {
            let own = &rows[model * per_model..(model + 1) * per_model];
            let out = Out {
                args,
                model: name,
                precision,
                threads,
                params: total,
                tensors: models[model].count(),
            };
            let floor = own[0].best;
            let read = own[1].best;
            for (k, row) in own.iter().enumerate() {
                let f = match row.job {
                    Job::ReadFloor | Job::Norm => read,
                    _ => floor,
                };
                let limit = if row.norm && !matches!(row.job, Job::Norm) {
                    f + read
                } else {
                    f
                };
                let flat = rows[flat * per_model + k].best;
                out.print(
                    row,
                    bytes_per_param(row, P::DTYPE.size(), S::DTYPE.size()),
                    f,
                    limit,
                    Some(row.best / flat),
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
    // The header once, from the parent (a part's process prints only its rows).
    if !args.json && std::env::var_os(PART_VAR).is_none() {
        println!(
            "sage-bench: {n} parameters in {} tensors (model bert), level {}{}, {} reps (best of), \
             threads {:?}; model small: {} tensors of 256-1024 elements, flat: one tensor of \
             the same total",
            sizes.len(),
            args.level,
            match SimdCpu::with_level(args.level).map(|b| b.uses_native_bf16()) {
                Ok(true) => " (bf16 stores: AVX512-BF16)",
                _ => "",
            },
            args.reps,
            args.threads,
            args.small,
        );
        println!(
            "{:<10} {:<6} {:<26} {:<4} {:<10} {:>3} {:>9} {:>7} {:>7} {:>7} {:>7}",
            "backend",
            "model",
            "row",
            "sage",
            "precision",
            "thr",
            "ns/param",
            "GB/s",
            "x floor",
            "x limit",
            "x flat"
        );
    }
    // Each part in a process of its own: a model allocated after another was freed gets
    // buffers from glibc's heap (it raises its mmap threshold on the first free), and the
    // fused steps run up to a third slower over those (sage-cpu/README.md).
    let mut parts: Vec<(&str, &str)> = args
        .precisions
        .iter()
        .map(|p| ("bert", p.as_str()))
        .collect();
    if args.small > 0 {
        parts.extend(args.precisions.iter().map(|p| ("small", p.as_str())));
    }
    if let Ok(part) = std::env::var(PART_VAR) {
        let Some((what, p)) = part.split_once(':') else {
            eprintln!("sage-bench: bad {PART_VAR}={part}");
            return ExitCode::from(64);
        };
        run_part(&args, &sizes, what, p);
        return ExitCode::SUCCESS;
    }
    let exe = std::env::current_exe();
    for (what, p) in parts {
        let ran = exe.as_ref().ok().and_then(|exe| {
            std::process::Command::new(exe)
                .args(std::env::args_os().skip(1))
                .env(PART_VAR, format!("{what}:{p}"))
                .status()
                .ok()
        });
        match ran {
            Some(st) if st.success() => {}
            // No child process here (or it failed to start): run it in this one.
            None => run_part(&args, &sizes, what, p),
            Some(st) => {
                eprintln!("sage-bench: the {what} {p} part failed: {st}");
                return ExitCode::FAILURE;
            }
        }
    }
    ExitCode::SUCCESS
}

/// Set in a part's own process: `bert:PRECISION` or `small:PRECISION`.
const PART_VAR: &str = "SAGE_BENCH_PART";

/// One model and precision's rows.
fn run_part(args: &Args, sizes: &[usize], what: &str, p: &str) {
    match (what, p) {
        ("bert", "f32") => run_precision::<f32, f32>(args, sizes, p),
        ("bert", "bf16") => run_precision::<bf16, f32>(args, sizes, p),
        ("bert", "bf16-state") => run_precision::<bf16, bf16>(args, sizes, p),
        ("bert", "f16") => run_precision::<f16, f32>(args, sizes, p),
        (_, "f32") => run_small::<f32, f32>(args, args.small, p),
        (_, "bf16") => run_small::<bf16, f32>(args, args.small, p),
        (_, "bf16-state") => run_small::<bf16, bf16>(args, args.small, p),
        (_, "f16") => run_small::<f16, f32>(args, args.small, p),
        _ => unreachable!("checked in parse"),
    }
}
