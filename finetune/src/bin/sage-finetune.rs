//! `sage-finetune`: AdamW vs AdamW-SAGE fine-tuning all-MiniLM-L6-v2 on Rotten Tomatoes
//! sentences; prints the comparison and the paper's claims 2 and 3, writes `results.json` and
//! `finetune.png`. `--protocol paper` runs the paper's protocol (grid, selection, seeds, test,
//! t-test) with a resumable journal.

use std::path::PathBuf;
use std::process::ExitCode;

use indicatif::{MultiProgress, ProgressBar, ProgressStyle};
use sage_finetune::analysis::PRUNE_RATIOS;
use sage_finetune::data::{read_ground_truth, split, subset, Example};
use sage_finetune::protocol::{self, Grid, Planned, Record};
use sage_finetune::stats::{mean_std, paired_t};
use sage_finetune::text::TextEncoder;
use sage_finetune::train::{run, Encoded, EvalSets, Family, RunConfig, RunResult};

const USAGE: &str = "\
sage-finetune [options]
  --data DIR          model/ (config.json, model.safetensors, tokenizer.json) and
                      movieReviewSnippets_GroundTruth.txt      [.cache/finetune]
  --out DIR           results.json and finetune.png            [target/finetune]
  --train N           training sentences (0: all 9,514)        [512]
  --dev N             dev sentences (0: all 1,054)             [400]
  --max-len N         tokens per sentence, [CLS]/[SEP] included [32]
  --epochs N                                                   [3]
  --batch N                                                    [32]
  --seeds A,B,...                                              [1,2,3]
  --lr X              AdamW rate                               [3e-4]
  --sage-lr X         AdamW-SAGE rate (paper: 2-5x AdamW's)    [6e-4]
  --beta0 X           SAGE's β0 (paper: 0.6-0.9)               [0.7]
  --warmup X          warm-up fraction, then linear decay      [0.1]
  --weight-decay X    not on biases and LayerNorm              [0.01]
  --unfreeze-embeddings  train the embeddings too (frozen by default)
  --backend NAME      simd (sage-cpu's SimdCpu) or portable    [simd]
  --device NAME       cpu, or cuda[:N] (a build with --features cuda; untested) [cpu]
  --only NAME         run only AdamW or AdamW-SAGE
  --no-claims         skip claims 2 and 3 (full-set sensitivity, pruning curve)
  --family NAME       adamw or adamax (default mode)               [adamw]
  --plot-only         redraw OUT/finetune.png from OUT/results.json, train nothing

--protocol paper: the paper's protocol, resumable (every finished run is appended to
DIR/runs.jsonl; a rerun skips those and resumes an interrupted run from its last epoch):
  --sizes A,B,...     training sizes (0: all 9,514)              [2500,0]
  --families A,B      optimizer families, each with and without SAGE [adamw,adamax]
  --rates A,B,...     rate grid of every optimizer                [1e-4,3e-4,8e-4]
  --beta0s A,B,...    SAGE's β0 grid                              [0.6,0.8]
  --seeds A,B,...     the first trains the grid; all report       [1,2,3,4,5]
  --journal DIR       runs.jsonl, report.md, claims-n<size>.png   [finetune/results/paper]
  --report-only       write report.md and the figures from the journal, train nothing
  dev accuracy (selection) on the dev sentences with id % 20 = 0, test accuracy (report,
  pruning) on those with id % 20 = 10; --epochs, --batch, --max-len as above.";

struct Args {
    data: PathBuf,
    out: PathBuf,
    train: usize,
    dev: usize,
    max_len: usize,
    epochs: usize,
    batch: usize,
    seeds: Option<Vec<u64>>,
    lr: f64,
    sage_lr: f64,
    beta0: f64,
    warmup: f64,
    weight_decay: f64,
    freeze: bool,
    only: Option<String>,
    simd: bool,
    device: String,
    claims: bool,
    family: Family,
    paper: bool,
    sizes: Vec<usize>,
    families: Vec<Family>,
    rates: Vec<f64>,
    beta0s: Vec<f64>,
    journal: PathBuf,
    report_only: bool,
    plot_only: bool,
}

fn list<T: std::str::FromStr>(flag: &str, v: &str) -> Result<Vec<T>, String> {
    let out: Vec<T> = v
        .split(',')
        .map(|s| {
            s.trim()
                .parse()
                .map_err(|_| format!("{flag}: `{s}` is not valid"))
        })
        .collect::<Result<_, _>>()?;
    if out.is_empty() {
        return Err(format!("{flag}: empty list"));
    }
    Ok(out)
}

fn parse() -> Result<Args, String> {
    let mut a = Args {
        data: ".cache/finetune".into(),
        out: "target/finetune".into(),
        train: 512,
        dev: 400,
        max_len: 32,
        epochs: 3,
        batch: 32,
        seeds: None,
        lr: 3e-4,
        sage_lr: 6e-4,
        beta0: 0.7,
        warmup: 0.1,
        weight_decay: 0.01,
        freeze: true,
        only: None,
        simd: true,
        device: "cpu".into(),
        claims: true,
        family: Family::AdamW,
        paper: false,
        sizes: vec![2500, 0],
        families: vec![Family::AdamW, Family::Adamax],
        rates: vec![1e-4, 3e-4, 8e-4],
        beta0s: vec![0.6, 0.8],
        journal: "finetune/results/paper".into(),
        report_only: false,
        plot_only: false,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        match flag.as_str() {
            "--help" | "-h" => return Err(String::new()),
            "--unfreeze-embeddings" => {
                a.freeze = false;
                continue;
            }
            "--no-claims" => {
                a.claims = false;
                continue;
            }
            "--plot-only" => {
                a.plot_only = true;
                continue;
            }
            "--report-only" => {
                a.report_only = true;
                continue;
            }
            _ => {}
        }
        let v = it.next().ok_or_else(|| format!("{flag} needs a value"))?;
        let num = |v: &str| {
            v.parse::<f64>()
                .map_err(|_| format!("{flag}: `{v}` is not a number"))
        };
        let int = |v: &str| {
            v.parse::<usize>()
                .map_err(|_| format!("{flag}: `{v}` is not a count"))
        };
        let family = |v: &str| {
            Family::parse(v).ok_or_else(|| format!("{flag}: `{v}` is not adamw or adamax"))
        };
        match flag.as_str() {
            "--data" => a.data = v.into(),
            "--out" => a.out = v.into(),
            "--train" => a.train = int(&v)?,
            "--dev" => a.dev = int(&v)?,
            "--max-len" => a.max_len = int(&v)?,
            "--epochs" => a.epochs = int(&v)?.max(1),
            "--batch" => a.batch = int(&v)?.max(1),
            "--seeds" => a.seeds = Some(list(&flag, &v)?),
            "--lr" => a.lr = num(&v)?,
            "--sage-lr" => a.sage_lr = num(&v)?,
            "--beta0" => a.beta0 = num(&v)?,
            "--warmup" => a.warmup = num(&v)?,
            "--weight-decay" => a.weight_decay = num(&v)?,
            "--backend" => {
                a.simd = match v.as_str() {
                    "simd" => true,
                    "portable" => false,
                    _ => return Err(format!("--backend `{v}`: simd or portable")),
                }
            }
            "--only" => a.only = Some(v),
            "--device" => a.device = v,
            "--family" => a.family = family(&v)?,
            "--protocol" => {
                a.paper = match v.as_str() {
                    "paper" => true,
                    "default" => false,
                    _ => return Err(format!("--protocol `{v}`: default or paper")),
                }
            }
            "--sizes" => a.sizes = list(&flag, &v)?,
            "--families" => {
                a.families = v.split(',').map(family).collect::<Result<_, _>>()?;
            }
            "--rates" => a.rates = list(&flag, &v)?,
            "--beta0s" => a.beta0s = list(&flag, &v)?,
            "--journal" => a.journal = v.into(),
            _ => return Err(format!("unknown option {flag}")),
        }
    }
    Ok(a)
}

fn encode(enc: &TextEncoder, ex: &[Example]) -> Result<Encoded, String> {
    Ok(Encoded {
        ids: ex
            .iter()
            .map(|e| enc.encode(&e.text))
            .collect::<Result<_, _>>()?,
        labels: ex.iter().map(|e| e.label).collect(),
    })
}

/// candle allocates and frees buffers of a few MB for every operation; glibc hands such
/// buffers back to the kernel on free (`munmap`, heap trimming) and the next operation faults
/// its pages in again — a fifth of a training step here went to the kernel. Keeping freed
/// memory in the process removes that (the numbers are unchanged: only where buffers live).
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn keep_freed_memory() {
    // SAFETY: mallopt only changes allocator parameters; called before any thread starts.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
        libc::mallopt(libc::M_TOP_PAD, 512 << 20);
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn keep_freed_memory() {}

fn main() -> ExitCode {
    keep_freed_memory();
    let args = match parse() {
        Ok(a) => a,
        Err(e) => {
            if !e.is_empty() {
                eprintln!("error: {e}\n");
            }
            eprintln!("{USAGE}");
            return ExitCode::from(2);
        }
    };
    match real_main(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

/// The CPU model and its thread count, to name the machine beside every figure.
fn machine() -> String {
    let model = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|m| m.trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    format!("{model}, {threads} threads")
}

fn device_of(name: &str) -> Result<candle_core::Device, String> {
    match name {
        "cpu" => Ok(candle_core::Device::Cpu),
        d if d.starts_with("cuda") => {
            let n = d.strip_prefix("cuda").unwrap_or("").trim_start_matches(':');
            let n = if n.is_empty() {
                0
            } else {
                n.parse().map_err(|_| format!("--device `{d}`"))?
            };
            candle_core::Device::new_cuda(n).map_err(|e| format!("--device {d}: {e}"))
        }
        d => Err(format!("--device `{d}`: cpu or cuda[:N]")),
    }
}

/// Everything a run needs besides its own settings.
struct Shared<'a> {
    args: &'a Args,
    enc: TextEncoder,
    device: candle_core::Device,
    model_dir: PathBuf,
}

impl Shared<'_> {
    fn config(&self, family: Family, sage: bool, lr: f64, beta0: f64, seed: u64) -> RunConfig {
        let a = self.args;
        RunConfig {
            family,
            sage,
            lr,
            beta0,
            epochs: a.epochs,
            batch: a.batch,
            seed,
            weight_decay: a.weight_decay,
            warmup: a.warmup,
            freeze_embeddings: a.freeze,
            model_dir: self.model_dir.clone(),
            device: self.device.clone(),
            claims: a.claims,
            eval_every_epoch: true,
            stop_after: None,
            checkpoint: None,
        }
    }

    fn run(
        &self,
        cfg: &RunConfig,
        train: &Encoded,
        sets: EvalSets<'_>,
        bar: &ProgressBar,
    ) -> Result<RunResult, String> {
        if self.args.simd {
            run(sage_cpu::SimdCpu::new(), cfg, &self.enc, train, sets, bar)
        } else {
            run(sage_cpu::Cpu, cfg, &self.enc, train, sets, bar)
        }
        .map_err(|e| e.to_string())
    }

    fn describe(&self) -> String {
        if !self.device.is_cpu() {
            format!("{:?} through sage-cuda", self.device)
        } else if self.args.simd {
            let b = sage_cpu::SimdCpu::new();
            format!("SimdCpu ({}, {} threads)", b.level(), b.thread_count())
        } else {
            "the portable Cpu backend".to_string()
        }
    }
}

fn real_main(a: Args) -> Result<(), String> {
    if a.plot_only {
        let rpath = a.out.join("results.json");
        let bytes = std::fs::read(&rpath).map_err(|e| format!("{}: {e}", rpath.display()))?;
        let results: Vec<RunResult> =
            serde_json::from_slice(&bytes).map_err(|e| format!("{}: {e}", rpath.display()))?;
        let png = a.out.join("finetune.png");
        sage_finetune::plot::draw(&png, &results).map_err(|e| e.to_string())?;
        println!("wrote {}", png.display());
        return Ok(());
    }
    let model_dir = a.data.join("model");
    let device = device_of(&a.device)?;
    let all = read_ground_truth(&a.data.join("movieReviewSnippets_GroundTruth.txt"))?;
    let (train_all, dev_all) = split(all);
    let enc = TextEncoder::from_file(&model_dir.join("tokenizer.json"), a.max_len)?;
    let shared = Shared {
        args: &a,
        enc,
        device,
        model_dir,
    };
    if a.paper {
        paper(&shared, &train_all, &dev_all)
    } else {
        default_mode(&shared, &train_all, &dev_all)
    }
}

fn take(v: &[Example], n: usize) -> Vec<Example> {
    if n == 0 || n >= v.len() {
        v.to_vec()
    } else {
        subset(v, n, 0)
    }
}

fn pct_list(v: &[f64]) -> String {
    v.iter()
        .map(|a| format!("{:.1}%", 100.0 * a))
        .collect::<Vec<_>>()
        .join(" ")
}

fn default_mode(s: &Shared<'_>, train_all: &[Example], dev_all: &[Example]) -> Result<(), String> {
    let a = s.args;
    let (train_ex, dev_ex) = (take(train_all, a.train), take(dev_all, a.dev));
    let (train, dev) = (encode(&s.enc, &train_ex)?, encode(&s.enc, &dev_ex)?);
    let tokens: usize = train.ids.iter().map(Vec::len).sum();
    let pos = train.labels.iter().filter(|&&l| l == 1).count();
    let seeds = a.seeds.clone().unwrap_or_else(|| vec![1, 2, 3]);
    println!(
        "data: {} train sentences ({:.1} tokens on average, {:.0}% positive), {} dev; of {} train / {} dev",
        train.ids.len(),
        tokens as f64 / train.ids.len().max(1) as f64,
        100.0 * pos as f64 / train.ids.len().max(1) as f64,
        dev.ids.len(),
        train_all.len(),
        dev_all.len()
    );
    println!(
        "model: all-MiniLM-L6-v2, embeddings {}, {} epochs of batch {}, max {} tokens, seeds {:?}, optimizer on {}; machine: {}",
        if a.freeze { "frozen" } else { "trained" },
        a.epochs,
        a.batch,
        a.max_len,
        seeds,
        s.describe(),
        machine()
    );

    let mut runs = Vec::new();
    for &seed in &seeds {
        for sage in [false, true] {
            let lr = if sage { a.sage_lr } else { a.lr };
            let cfg = s.config(a.family, sage, lr, a.beta0, seed);
            if a.only.as_deref().is_some_and(|o| o != cfg.label()) {
                continue;
            }
            runs.push(cfg);
        }
    }
    let bars = MultiProgress::new();
    let mut results: Vec<RunResult> = Vec::new();
    for cfg in &runs {
        let bar = bars.add(ProgressBar::new(0));
        let t = std::time::Instant::now();
        let sets = EvalSets {
            dev: &dev,
            report: None,
        };
        let r = s.run(cfg, &train, sets, &bar)?;
        // A line per run also where the bar is hidden (output not a terminal).
        bars.suspend(|| {
            println!(
                "{} seed {}: dev accuracy by epoch {}{}, {:.0} s",
                r.label,
                r.seed,
                pct_list(&r.epoch_dev_acc),
                r.claims.as_ref().map_or(String::new(), |c| format!(
                    ", pruned 10-40%: {}",
                    pct_list(&c.pruning.iter().skip(1).map(|p| p.1).collect::<Vec<_>>())
                )),
                t.elapsed().as_secs_f64()
            )
        });
        results.push(r);
    }

    let labels: Vec<String> = [false, true]
        .iter()
        .map(|&sage| sage_finetune::train::label(a.family, sage))
        .collect();
    println!();
    println!("| optimizer | lr | β0 | seeds | dev accuracy (mean ± std) | per seed | step (ms) | optimizer (ms, share) |");
    println!("|---|---|---|---|---|---|---|---|");
    for label in &labels {
        let rs: Vec<&RunResult> = results.iter().filter(|r| &r.label == label).collect();
        if rs.is_empty() {
            continue;
        }
        let acc: Vec<f64> = rs
            .iter()
            .map(|r| 100.0 * r.epoch_dev_acc.last().copied().unwrap_or(0.0))
            .collect();
        let (m, sd) = mean_std(&acc);
        let step = rs.iter().map(|r| r.step_secs).sum::<f64>() / rs.len() as f64;
        let opt = rs.iter().map(|r| r.opt_secs).sum::<f64>() / rs.len() as f64;
        println!(
            "| {label} | {:.0e} | {} | {} | {m:.2} ± {sd:.2} | {} | {:.0} | {:.1} ({:.1}%) |",
            rs[0].lr,
            rs[0].beta0.map_or("–".into(), |b| format!("{b}")),
            rs.iter()
                .map(|r| r.seed.to_string())
                .collect::<Vec<_>>()
                .join(","),
            acc.iter()
                .map(|x| format!("{x:.1}"))
                .collect::<Vec<_>>()
                .join(" / "),
            1e3 * step,
            1e3 * opt,
            100.0 * opt / step
        );
    }
    let trained = results.first().map_or(0, |r| r.trained_params);
    println!("\n{trained} parameters trained; dev accuracy after the last epoch; step = forward + backward + optimizer.");
    if a.claims {
        print_claims(&labels, &results);
    }

    std::fs::create_dir_all(&a.out).map_err(|e| format!("{}: {e}", a.out.display()))?;
    let json = serde_json::to_string_pretty(&results).map_err(|e| e.to_string())?;
    let rpath = a.out.join("results.json");
    std::fs::write(&rpath, json).map_err(|e| format!("{}: {e}", rpath.display()))?;
    let png = a.out.join("finetune.png");
    match sage_finetune::plot::draw(&png, &results) {
        Ok(()) => println!("wrote {} and {}", rpath.display(), png.display()),
        Err(e) => println!("wrote {}; no plot: {e}", rpath.display()),
    }
    Ok(())
}

/// Claims 2 and 3 of the default mode: the sensitivity variance per seed and the pruning
/// curve on the dev set, SAGE against its baseline paired by seed.
fn print_claims(labels: &[String], results: &[RunResult]) {
    println!("\nClaims 2 and 3 (sensitivity |θ·g| of the encoder's linear weights, g over the whole training set):");
    println!("| optimizer | sensitivity variance (mean over seeds) | mean |θ·g| | std/mean | dev accuracy pruned 0/10/20/30/40% | change at 10/20/30/40% |");
    println!("|---|---|---|---|---|---|");
    let mut per_label: Vec<Vec<(u64, f64)>> = Vec::new();
    for label in labels {
        let rs: Vec<&RunResult> = results
            .iter()
            .filter(|r| &r.label == label && r.claims.is_some())
            .collect();
        let cl: Vec<_> = rs.iter().filter_map(|r| r.claims.as_ref()).collect();
        per_label.push(
            rs.iter()
                .filter_map(|r| r.claims.as_ref().map(|c| (r.seed, c.sensitivity.variance)))
                .collect(),
        );
        if cl.is_empty() {
            continue;
        }
        let var = mean_std(
            &cl.iter()
                .map(|c| c.sensitivity.variance)
                .collect::<Vec<_>>(),
        )
        .0;
        let mean = mean_std(&cl.iter().map(|c| c.sensitivity.mean).collect::<Vec<_>>()).0;
        let cv = mean_std(&cl.iter().map(|c| c.sensitivity.cv()).collect::<Vec<_>>()).0;
        let curve: Vec<f64> = (0..PRUNE_RATIOS.len())
            .map(|i| mean_std(&cl.iter().map(|c| c.pruning[i].1).collect::<Vec<_>>()).0)
            .collect();
        println!(
            "| {label} | {var:.3e} | {mean:.3e} | {cv:.2} | {} | {} |",
            curve
                .iter()
                .map(|x| format!("{:.1}", 100.0 * x))
                .collect::<Vec<_>>()
                .join(" / "),
            curve
                .iter()
                .skip(1)
                .map(|x| format!("{:+.1}", 100.0 * (x - curve[0])))
                .collect::<Vec<_>>()
                .join(" / ")
        );
    }
    if let [a, b] = &per_label[..] {
        let (x, y): (Vec<f64>, Vec<f64>) = a
            .iter()
            .filter_map(|(s, va)| {
                b.iter()
                    .find(|(t, _)| t == s)
                    .map(|(_, vb)| (va.log10(), vb.log10()))
            })
            .unzip();
        let lower = x.iter().zip(&y).filter(|(a, b)| b < a).count();
        match paired_t(&x, &y) {
            Some(t) => println!(
                "\n{} has the lower sensitivity variance in {lower} of {} seeds; log10 variance {} − {}: {:+.3}, paired t = {:.2}, p = {:.3}.",
                labels[1], x.len(), labels[1], labels[0], t.mean_diff, t.t, t.p
            ),
            None => println!(
                "\n{} has the lower sensitivity variance in {lower} of {} seeds.",
                labels[1],
                x.len()
            ),
        }
    }
}

/// `--protocol paper`.
fn paper(s: &Shared<'_>, train_all: &[Example], dev_all: &[Example]) -> Result<(), String> {
    let a = s.args;
    let grid = Grid {
        sizes: a.sizes.clone(),
        families: a.families.clone(),
        rates: a.rates.clone(),
        beta0s: a.beta0s.clone(),
        seeds: a.seeds.clone().unwrap_or_else(|| vec![1, 2, 3, 4, 5]),
        epochs: a.epochs,
        batch: a.batch,
        max_len: a.max_len,
        warmup: a.warmup,
        weight_decay: a.weight_decay,
        freeze: a.freeze,
    };
    // Selection and report on different sentences: the dev ids split by id % 20.
    let (dev_sel, test): (Vec<Example>, Vec<Example>) =
        dev_all.iter().cloned().partition(|e| e.id % 20 == 0);
    let (dev_sel, test) = (encode(&s.enc, &dev_sel)?, encode(&s.enc, &test)?);
    let journal = a.journal.join("runs.jsonl");
    let mut done = protocol::read_journal(&journal)?;
    let ckpt_root = a.out.join("paper-checkpoints");
    let machine = machine();
    println!(
        "protocol paper: sizes {:?}, {:?} with and without SAGE, rates {:?}, β0 {:?}, seeds {:?}; selection on {} dev sentences, report on {} test sentences; optimizer on {}; machine: {machine}",
        grid.sizes,
        grid.families.iter().map(|f| f.name()).collect::<Vec<_>>(),
        grid.rates,
        grid.beta0s,
        grid.seeds,
        dev_sel.ids.len(),
        test.ids.len(),
        s.describe()
    );
    let planned = protocol::planned_count(&grid);
    println!(
        "{planned} runs planned, {} already in {}",
        done.len(),
        journal.display()
    );

    let bars = MultiProgress::new();
    // The overall bar counts training steps of the runs still to do (claims included in the
    // rate, so its estimate covers them).
    let mut remaining_steps = 0u64;
    for &size in &grid.sizes {
        let n = if size == 0 || size >= train_all.len() {
            train_all.len()
        } else {
            size
        };
        let per_run = (n.div_ceil(grid.batch) * grid.epochs) as u64;
        for &family in &grid.families {
            let grid_runs = protocol::selection(&grid, size, family);
            let todo = grid_runs
                .iter()
                .filter(|p| !done.iter().any(|r| r.key == p.key(&grid)))
                .count();
            let mut reports = 2 * (grid.seeds.len() - 1);
            for sage in [false, true] {
                if let Some(c) = protocol::selected(&grid, &grid_runs, sage, &done) {
                    reports -= protocol::report_runs(&grid, &c)
                        .iter()
                        .filter(|p| {
                            p.phase == "report" && done.iter().any(|r| r.key == p.key(&grid))
                        })
                        .count();
                }
            }
            remaining_steps += per_run * (todo + reports) as u64;
        }
    }
    let overall = bars.add(ProgressBar::new(remaining_steps));
    overall.set_style(
        ProgressStyle::with_template(
            "{prefix:>24} [{bar:30}] {percent}% of the steps left at start {elapsed_precise} eta {eta}",
        )
        .expect("valid template")
        .progress_chars("=> "),
    );
    overall.set_prefix("protocol");

    let write_report = |done: &[Record]| -> Result<(), String> {
        let md = protocol::report_markdown(&grid, done, &machine);
        let path = a.journal.join("report.md");
        std::fs::create_dir_all(&a.journal).map_err(|e| format!("{}: {e}", a.journal.display()))?;
        std::fs::write(&path, md).map_err(|e| format!("{}: {e}", path.display()))?;
        for &size in &grid.sizes {
            let png = a.journal.join(format!("claims-n{size}.png"));
            let rs: Vec<&RunResult> = done
                .iter()
                .filter(|r| r.size == size && (r.phase == "report" || is_chosen(&grid, r, done)))
                .map(|r| &r.result)
                .collect();
            if rs.is_empty() {
                continue;
            }
            if let Err(e) = sage_finetune::plot::draw_claims(&png, &rs) {
                println!("no claims plot: {e}");
            }
        }
        Ok(())
    };
    write_report(&done)?;
    if a.report_only {
        overall.finish_and_clear();
        print!("{}", protocol::report_markdown(&grid, &done, &machine));
        return Ok(());
    }

    for &size in &grid.sizes {
        let train_ex = take(train_all, size);
        let train = encode(&s.enc, &train_ex)?;
        for &family in &grid.families {
            let grid_runs = protocol::selection(&grid, size, family);
            let mut todo: Vec<Planned> = grid_runs.clone();
            loop {
                for p in &todo {
                    let key = p.key(&grid);
                    if done.iter().any(|r| r.key == key) {
                        continue;
                    }
                    let mut cfg =
                        s.config(family, p.sage, p.lr, p.beta0.unwrap_or(a.beta0), p.seed);
                    cfg.claims = true;
                    // Selection reads the last epoch's dev accuracy only.
                    cfg.eval_every_epoch = false;
                    let dir = protocol::checkpoint_dir(&ckpt_root, &key);
                    cfg.checkpoint = Some(dir.clone());
                    let bar = bars.add(ProgressBar::new(0));
                    let before = bar.position();
                    let t = std::time::Instant::now();
                    let sets = EvalSets {
                        dev: &dev_sel,
                        report: Some(&test),
                    };
                    let r = s.run(&cfg, &train, sets, &bar)?;
                    overall.inc(r.steps.saturating_sub(before));
                    let rec = Record {
                        key,
                        phase: p.phase.into(),
                        size,
                        seconds: t.elapsed().as_secs_f64(),
                        result: r,
                    };
                    protocol::append_journal(&journal, &rec)?;
                    let _ = std::fs::remove_dir_all(&dir);
                    bars.suspend(|| {
                        println!(
                            "n={size} {} lr {:e}{} seed {}: dev {} test {:.1}%, variance {:.3e}, pruned 10-40% {}, {:.0} s",
                            rec.result.label,
                            rec.result.lr,
                            rec.result.beta0.map_or(String::new(), |b| format!(" β0 {b}")),
                            rec.result.seed,
                            pct_list(&rec.result.epoch_dev_acc),
                            100.0 * rec.result.test_acc.unwrap_or(0.0),
                            rec.result.claims.as_ref().map_or(0.0, |c| c.sensitivity.variance),
                            pct_list(&rec.result.claims.as_ref().map_or(Vec::new(), |c| c.pruning.iter().skip(1).map(|p| p.1).collect())),
                            rec.seconds
                        )
                    });
                    bar.finish_and_clear();
                    done.push(rec);
                    write_report(&done)?;
                }
                // Once the grid is done: every seed at each optimizer's selected setting.
                let mut next = Vec::new();
                for sage in [false, true] {
                    if let Some(c) = protocol::selected(&grid, &grid_runs, sage, &done) {
                        next.extend(
                            protocol::report_runs(&grid, &c)
                                .into_iter()
                                .filter(|p| !done.iter().any(|r| r.key == p.key(&grid))),
                        );
                    }
                }
                if next.is_empty() {
                    break;
                }
                todo = next;
            }
        }
    }
    overall.finish();
    println!(
        "\nprotocol done: {} runs in {}; report in {}",
        done.len(),
        journal.display(),
        a.journal.join("report.md").display()
    );
    print!("{}", protocol::report_markdown(&grid, &done, &machine));
    Ok(())
}

/// Whether `r` is the selection run at its optimizer's selected setting (the first seed's
/// report run).
fn is_chosen(grid: &Grid, r: &Record, done: &[Record]) -> bool {
    grid.families.iter().any(|&family| {
        let g = protocol::selection(grid, r.size, family);
        [false, true].iter().any(|&sage| {
            protocol::selected(grid, &g, sage, done).is_some_and(|c| c.key(grid) == r.key)
        })
    })
}
