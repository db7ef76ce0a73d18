//! `sage-finetune`: AdamW vs AdamW-SAGE fine-tuning all-MiniLM-L6-v2 on Rotten Tomatoes
//! sentences; prints the comparison, writes `results.json` and `finetune.png`.

use std::path::PathBuf;
use std::process::ExitCode;

use indicatif::{MultiProgress, ProgressBar};
use sage_finetune::data::{read_ground_truth, split, subset};
use sage_finetune::text::TextEncoder;
use sage_finetune::train::{run, Encoded, RunConfig, RunResult};

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
  --only NAME         run only AdamW or AdamW-SAGE";

struct Args {
    data: PathBuf,
    out: PathBuf,
    train: usize,
    dev: usize,
    max_len: usize,
    epochs: usize,
    batch: usize,
    seeds: Vec<u64>,
    lr: f64,
    sage_lr: f64,
    beta0: f64,
    warmup: f64,
    weight_decay: f64,
    freeze: bool,
    only: Option<String>,
    simd: bool,
    device: String,
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
        seeds: vec![1, 2, 3],
        lr: 3e-4,
        sage_lr: 6e-4,
        beta0: 0.7,
        warmup: 0.1,
        weight_decay: 0.01,
        freeze: true,
        only: None,
        simd: true,
        device: "cpu".into(),
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        if flag == "--help" || flag == "-h" {
            return Err(String::new());
        }
        if flag == "--unfreeze-embeddings" {
            a.freeze = false;
            continue;
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
        match flag.as_str() {
            "--data" => a.data = v.into(),
            "--out" => a.out = v.into(),
            "--train" => a.train = int(&v)?,
            "--dev" => a.dev = int(&v)?,
            "--max-len" => a.max_len = int(&v)?,
            "--epochs" => a.epochs = int(&v)?.max(1),
            "--batch" => a.batch = int(&v)?.max(1),
            "--seeds" => {
                a.seeds = v
                    .split(',')
                    .map(|s| {
                        s.trim()
                            .parse()
                            .map_err(|_| format!("--seeds: `{s}` is not a seed"))
                    })
                    .collect::<Result<_, _>>()?
            }
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
            _ => return Err(format!("unknown option {flag}")),
        }
    }
    Ok(a)
}

fn mean_std(x: &[f64]) -> (f64, f64) {
    let n = x.len() as f64;
    let m = x.iter().sum::<f64>() / n.max(1.0);
    let var = if x.len() > 1 {
        x.iter().map(|v| (v - m) * (v - m)).sum::<f64>() / (n - 1.0)
    } else {
        0.0
    };
    (m, var.sqrt())
}

fn encode(enc: &TextEncoder, ex: &[sage_finetune::data::Example]) -> Result<Encoded, String> {
    Ok(Encoded {
        ids: ex
            .iter()
            .map(|e| enc.encode(&e.text))
            .collect::<Result<_, _>>()?,
        labels: ex.iter().map(|e| e.label).collect(),
    })
}

fn main() -> ExitCode {
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

fn real_main(a: Args) -> Result<(), String> {
    let model_dir = a.data.join("model");
    let device = match a.device.as_str() {
        "cpu" => candle_core::Device::Cpu,
        d if d.starts_with("cuda") => {
            let n = d.strip_prefix("cuda").unwrap_or("").trim_start_matches(':');
            let n = if n.is_empty() {
                0
            } else {
                n.parse().map_err(|_| format!("--device `{d}`"))?
            };
            candle_core::Device::new_cuda(n).map_err(|e| format!("--device {d}: {e}"))?
        }
        d => return Err(format!("--device `{d}`: cpu or cuda[:N]")),
    };
    let all = read_ground_truth(&a.data.join("movieReviewSnippets_GroundTruth.txt"))?;
    let (train_all, dev_all) = split(all);
    let take = |v: &[_], n: usize| {
        if n == 0 || n >= v.len() {
            v.to_vec()
        } else {
            subset(v, n, 0)
        }
    };
    let (train_ex, dev_ex) = (take(&train_all, a.train), take(&dev_all, a.dev));
    let enc = TextEncoder::from_file(&model_dir.join("tokenizer.json"), a.max_len)?;
    let (train, dev) = (encode(&enc, &train_ex)?, encode(&enc, &dev_ex)?);
    let tokens: usize = train.ids.iter().map(Vec::len).sum();
    let pos = train.labels.iter().filter(|&&l| l == 1).count();
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
        "model: all-MiniLM-L6-v2, embeddings {}, {} epochs of batch {}, max {} tokens, seeds {:?}, optimizer on {}",
        if a.freeze { "frozen" } else { "trained" },
        a.epochs,
        a.batch,
        a.max_len,
        a.seeds,
        if !device.is_cpu() {
            format!("{device:?} through sage-cuda")
        } else if a.simd {
            let b = sage_cpu::SimdCpu::new();
            format!("SimdCpu ({}, {} threads)", b.level(), b.thread_count())
        } else {
            "the portable Cpu backend".to_string()
        }
    );

    let mut runs = Vec::new();
    for &seed in &a.seeds {
        for sage in [false, true] {
            let cfg = RunConfig {
                sage,
                lr: if sage { a.sage_lr } else { a.lr },
                beta0: a.beta0,
                epochs: a.epochs,
                batch: a.batch,
                seed,
                weight_decay: a.weight_decay,
                warmup: a.warmup,
                freeze_embeddings: a.freeze,
                model_dir: model_dir.clone(),
                device: device.clone(),
            };
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
        let r = if a.simd {
            run(sage_cpu::SimdCpu::new(), cfg, &enc, &train, &dev, &bar)
        } else {
            run(sage_cpu::Cpu, cfg, &enc, &train, &dev, &bar)
        }
        .map_err(|e| e.to_string())?;
        // A line per run also where the bar is hidden (output not a terminal).
        bars.suspend(|| {
            println!(
                "{} seed {}: dev accuracy by epoch {}, {:.0} s",
                r.label,
                r.seed,
                r.epoch_dev_acc
                    .iter()
                    .map(|a| format!("{:.1}%", 100.0 * a))
                    .collect::<Vec<_>>()
                    .join(" "),
                t.elapsed().as_secs_f64()
            )
        });
        results.push(r);
    }

    println!();
    println!("| optimizer | lr | β0 | seeds | dev accuracy (mean ± std) | per seed | step (ms) | optimizer (ms, share) |");
    println!("|---|---|---|---|---|---|---|---|");
    for label in ["AdamW", "AdamW-SAGE"] {
        let rs: Vec<&RunResult> = results.iter().filter(|r| r.label == label).collect();
        if rs.is_empty() {
            continue;
        }
        let acc: Vec<f64> = rs
            .iter()
            .map(|r| 100.0 * r.epoch_dev_acc.last().copied().unwrap_or(0.0))
            .collect();
        let (m, s) = mean_std(&acc);
        let step = rs.iter().map(|r| r.step_secs).sum::<f64>() / rs.len() as f64;
        let opt = rs.iter().map(|r| r.opt_secs).sum::<f64>() / rs.len() as f64;
        println!(
            "| {label} | {:.0e} | {} | {} | {m:.2} ± {s:.2} | {} | {:.0} | {:.1} ({:.1}%) |",
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
