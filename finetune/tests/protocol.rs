//! The protocol's pieces on data built here (no download): the paired t-test against closed
//! forms, the journal's resume rules, selection, the pruning mask, the sensitivity summary,
//! and a run interrupted after an epoch resuming to exactly the uninterrupted result.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device};
use candle_nn::{VarBuilder, VarMap};
use indicatif::ProgressBar;
use sage_candle::bert::{init_random, BertClassifier, BertConfig, Rng};
use sage_finetune::analysis::{lowest, SensitivitySummary, HIST_BINS};
use sage_finetune::protocol::{
    append_journal, planned_count, read_journal, report_markdown, report_runs, selected, selection,
    Grid, Record,
};
use sage_finetune::stats::{mean_std, paired_t};
use sage_finetune::text::TextEncoder;
use sage_finetune::train::{run, Encoded, EvalSets, Family, RunConfig, RunResult};

fn tmp(name: &str) -> PathBuf {
    let p = std::env::temp_dir().join(format!("sage-ft-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&p);
    std::fs::create_dir_all(&p).unwrap();
    p
}

#[test]
fn paired_t_matches_the_closed_forms() {
    // Differences 1..5: mean 3, s = √2.5, t = 3/√0.5 = √18, 4 degrees of freedom.
    let a = [10.0, 20.0, 30.0, 40.0, 50.0];
    let b = [11.0, 22.0, 33.0, 44.0, 55.0];
    let t = paired_t(&a, &b).unwrap();
    assert_eq!(t.n, 5);
    assert!((t.mean_diff - 3.0).abs() < 1e-12);
    assert!((t.t - 18f64.sqrt()).abs() < 1e-9, "{}", t.t);
    // Student t with 4 dof: F(t) = 1/2 + (3/4)·x·(1 − x²/3), x = t/√(t² + 4).
    let x = t.t / (t.t * t.t + 4.0).sqrt();
    let p4 = 2.0 * (1.0 - (0.5 + 0.75 * x * (1.0 - x * x / 3.0)));
    assert!((t.p - p4).abs() < 1e-6, "{} vs {p4}", t.p);
    assert!((t.p - 0.013235).abs() < 1e-5);

    // Two pairs: 1 dof (Cauchy), p = 1 − (2/π)·atan|t|; differences 1 and 3: t = 2/(√2/√2) = 2.
    let t = paired_t(&[0.0, 0.0], &[1.0, 3.0]).unwrap();
    assert!((t.t - 2.0).abs() < 1e-12);
    let p1 = 1.0 - 2.0 / std::f64::consts::PI * 2f64.atan();
    assert!((t.p - p1).abs() < 1e-6, "{} vs {p1}", t.p);

    // Degenerate cases: identical pairs, a constant shift, too few or unmatched pairs.
    assert_eq!(paired_t(&[1.0, 2.0], &[1.0, 2.0]).unwrap().p, 1.0);
    let shift = paired_t(&[1.0, 2.0, 3.0], &[2.0, 3.0, 4.0]).unwrap();
    assert!(shift.t.is_infinite() && shift.p == 0.0);
    assert!(paired_t(&[1.0], &[2.0]).is_none());
    assert!(paired_t(&[1.0, 2.0], &[2.0]).is_none());
    assert_eq!(mean_std(&[2.0, 4.0, 6.0]), (4.0, 2.0));
}

fn grid() -> Grid {
    Grid {
        sizes: vec![100],
        families: vec![Family::AdamW],
        rates: vec![1e-4, 3e-4],
        beta0s: vec![0.6, 0.8],
        seeds: vec![7, 8, 9],
        epochs: 2,
        batch: 8,
        max_len: 16,
        warmup: 0.1,
        weight_decay: 0.01,
        freeze: true,
    }
}

/// The report names each size's section by its sentences, the whole pool (size 0) as "all".
#[test]
fn report_sections_name_their_training_size() {
    let g = Grid {
        sizes: vec![100, 0],
        ..grid()
    };
    let md = report_markdown(&g, &[], "test machine");
    assert!(
        md.contains("AdamW-SAGE vs AdamW — 100 training sentences (0 of "),
        "{md}"
    );
    assert!(
        md.contains("AdamW-SAGE vs AdamW — all training sentences (0 of "),
        "{md}"
    );
    assert!(!md.contains("— 0 training sentences"), "{md}");
}

fn result(label: &str, lr: f64, beta0: Option<f64>, seed: u64, dev: f64) -> RunResult {
    RunResult {
        label: label.into(),
        seed,
        lr,
        beta0,
        train_size: 100,
        epoch_loss: vec![0.5],
        epoch_dev_acc: vec![dev],
        test_acc: Some(dev),
        steps: 26,
        step_secs: 0.1,
        opt_secs: 0.01,
        fwd_secs: 0.03,
        trained_params: 10,
        claims: None,
    }
}

#[test]
fn selection_waits_for_the_whole_grid_and_takes_the_first_best() {
    let g = grid();
    let plan = selection(&g, 100, Family::AdamW);
    // 2 rates for AdamW, 2 rates × 2 β0 for AdamW-SAGE, all with the first seed.
    assert_eq!(plan.len(), 6);
    assert!(plan.iter().all(|p| p.seed == 7 && p.phase == "select"));
    assert_eq!(planned_count(&g), 6 + 2 * 2);
    let keys: Vec<String> = plan.iter().map(|p| p.key(&g)).collect();
    let mut uniq = keys.clone();
    uniq.sort();
    uniq.dedup();
    assert_eq!(uniq.len(), keys.len(), "every grid point has its own key");

    let mut done: Vec<Record> = Vec::new();
    let devs = [0.70, 0.80, 0.75, 0.81, 0.81, 0.60];
    for (p, dev) in plan.iter().zip(devs) {
        assert!(
            selected(&g, &plan, true, &done).is_none(),
            "grid incomplete"
        );
        done.push(Record {
            key: p.key(&g),
            phase: p.phase.into(),
            size: 100,
            seconds: 1.0,
            result: result(&p.label(), p.lr, p.beta0, p.seed, dev),
        });
    }
    let base = selected(&g, &plan, false, &done).unwrap();
    assert_eq!((base.lr, base.beta0), (3e-4, None));
    // 0.81 twice: the first in grid order (lr 1e-4, β0 0.8) wins the tie.
    let sage = selected(&g, &plan, true, &done).unwrap();
    assert_eq!((sage.lr, sage.beta0), (1e-4, Some(0.8)));
    // The first seed's report run is the selection run itself.
    let reps = report_runs(&g, &sage);
    assert_eq!(reps.iter().map(|p| p.seed).collect::<Vec<_>>(), [7, 8, 9]);
    assert_eq!(reps[0].key(&g), sage.key(&g));
    assert_eq!(reps[1].phase, "report");
}

#[test]
fn journal_keeps_finished_runs_and_drops_a_cut_last_line() {
    let dir = tmp("journal");
    let path = dir.join("runs.jsonl");
    assert!(read_journal(&path).unwrap().is_empty(), "no file: empty");
    let rec = |seed| Record {
        key: format!("k{seed}"),
        phase: "select".into(),
        size: 100,
        seconds: 2.0,
        result: result("AdamW", 1e-4, None, seed, 0.7),
    };
    append_journal(&path, &rec(1)).unwrap();
    append_journal(&path, &rec(2)).unwrap();
    let back = read_journal(&path).unwrap();
    assert_eq!(
        back.iter().map(|r| r.key.as_str()).collect::<Vec<_>>(),
        ["k1", "k2"]
    );
    assert_eq!(back[1].result.seed, 2);

    // An interruption mid-write leaves a partial last line: it is not a finished run.
    let mut text = std::fs::read_to_string(&path).unwrap();
    let line = serde_json::to_string(&rec(3)).unwrap();
    text.push_str(&line[..line.len() / 2]);
    std::fs::write(&path, &text).unwrap();
    assert_eq!(read_journal(&path).unwrap().len(), 2);

    // A damaged line in the middle is an error naming it.
    std::fs::write(&path, format!("{{oops\n{line}\n")).unwrap();
    let e = read_journal(&path).unwrap_err();
    assert!(e.contains("line 1"), "{e}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn lowest_marks_exactly_k_with_ties_in_order_and_nan_last() {
    let s = [0.5, 0.1, 0.3, 0.1, f32::NAN, 0.2, 0.1];
    let m = |k| {
        lowest(&s, k)
            .iter()
            .enumerate()
            .filter(|(_, &b)| b)
            .map(|(i, _)| i)
            .collect::<Vec<_>>()
    };
    assert_eq!(m(0), Vec::<usize>::new());
    assert_eq!(m(2), [1, 3], "ties at the threshold: the first ones");
    assert_eq!(m(3), [1, 3, 6]);
    assert_eq!(m(4), [1, 3, 5, 6]);
    assert_eq!(
        m(6),
        [0, 1, 2, 3, 5, 6],
        "NaN only when everything else is taken"
    );
    assert_eq!(m(100).len(), 7, "capped at the count");
}

#[test]
fn sensitivity_summary_counts_and_moments() {
    let values: [f32; 5] = [0.0, 1e-6, 1e-6, 4e-6, 1e-3];
    let mut s = values.to_vec();
    let sum = SensitivitySummary::of(&mut s);
    assert_eq!(sum.count, 5);
    assert_eq!(sum.zeros, 1);
    // The population moments, in f64 of the stored f32 values.
    let x: Vec<f64> = values.iter().map(|&v| v as f64).collect();
    let mean = x.iter().sum::<f64>() / 5.0;
    let var = x.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / 5.0;
    assert!(
        (sum.mean - mean).abs() <= 1e-12 * mean,
        "{} vs {mean}",
        sum.mean
    );
    assert!(
        (sum.variance - var).abs() <= 1e-12 * var,
        "{} vs {var}",
        sum.variance
    );
    assert!((var - 1.5952e-7).abs() < 1e-10, "hand value: {var}");
    assert_eq!(sum.median as f32, 1e-6);
    assert_eq!(sum.log10_hist.len(), HIST_BINS);
    assert_eq!(
        sum.log10_hist.iter().sum::<u64>(),
        4,
        "zeros are not binned"
    );
}

/// A tiny pretrained-model directory: config.json, model.safetensors (random weights) and a
/// WordPiece tokenizer.json.
fn tiny_model(dir: &Path) -> (TextEncoder, Encoded, Encoded) {
    use tokenizers::models::wordpiece::WordPiece;
    use tokenizers::processors::bert::BertProcessing;
    use tokenizers::Tokenizer;
    let words = [
        "[PAD]", "[UNK]", "[CLS]", "[SEP]", "good", "bad", "film", "very",
    ];
    let vocab: [(String, u32); 8] = std::array::from_fn(|i| (words[i].to_string(), i as u32));
    let wp = WordPiece::builder()
        .vocab(vocab)
        .unk_token("[UNK]".into())
        .build()
        .unwrap();
    let mut tok = Tokenizer::new(wp);
    tok.with_pre_tokenizer(Some(tokenizers::pre_tokenizers::bert::BertPreTokenizer));
    tok.with_post_processor(Some(BertProcessing::new(
        ("[SEP]".into(), 3),
        ("[CLS]".into(), 2),
    )));
    tok.save(dir.join("tokenizer.json"), false).unwrap();
    let cfg = BertConfig::tiny(8);
    let json = serde_json::json!({
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden_size,
        "num_hidden_layers": cfg.num_hidden_layers, "num_attention_heads": cfg.num_attention_heads,
        "intermediate_size": cfg.intermediate_size,
        "max_position_embeddings": cfg.max_position_embeddings,
        "type_vocab_size": cfg.type_vocab_size, "layer_norm_eps": cfg.layer_norm_eps,
        "hidden_dropout_prob": cfg.hidden_dropout_prob,
        "attention_probs_dropout_prob": cfg.attention_probs_dropout_prob
    });
    std::fs::write(dir.join("config.json"), json.to_string()).unwrap();
    let vm = VarMap::new();
    BertClassifier::new(
        &cfg,
        2,
        VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu),
    )
    .unwrap();
    init_random(&vm, &mut Rng::new(42)).unwrap();
    vm.save(dir.join("model.safetensors")).unwrap();

    let enc = TextEncoder::from_file(&dir.join("tokenizer.json"), 8).unwrap();
    let mut rng = Rng::new(5);
    let mut data = |n: usize| {
        let mut ids = Vec::new();
        let mut labels = Vec::new();
        for _ in 0..n {
            let good = rng.below(2) == 1;
            let len = 1 + rng.below(4);
            let mut s = vec![2];
            for _ in 0..len {
                s.push(if rng.below(3) == 0 {
                    6 + rng.below(2) as u32
                } else if good {
                    4
                } else {
                    5
                });
            }
            s.push(3);
            ids.push(s);
            labels.push(good as u32);
        }
        Encoded { ids, labels }
    };
    (enc, data(40), data(16))
}

#[test]
fn a_run_resumed_after_an_epoch_equals_the_uninterrupted_run() {
    let dir = tmp("resume");
    let (enc, train, dev) = tiny_model(&dir);
    let cfg = |ckpt: Option<PathBuf>, stop: Option<usize>| RunConfig {
        family: Family::AdamW,
        sage: true,
        lr: 1e-3,
        beta0: 0.7,
        epochs: 3,
        batch: 8,
        seed: 3,
        weight_decay: 0.01,
        warmup: 0.1,
        freeze_embeddings: true,
        model_dir: dir.clone(),
        device: Device::Cpu,
        eval_every_epoch: true,
        claims: true,
        stop_after: stop,
        checkpoint: ckpt,
    };
    let go = |c: &RunConfig| {
        let sets = EvalSets {
            dev: &dev,
            report: Some(&dev),
        };
        run(sage_cpu::Cpu, c, &enc, &train, sets, &ProgressBar::hidden()).unwrap()
    };
    let whole = go(&cfg(None, None));
    assert_eq!(whole.steps, 15);
    assert_eq!(whole.epoch_dev_acc.len(), 3);
    let claims = whole.claims.as_ref().expect("claims measured");
    assert_eq!(claims.pruning.len(), 5);
    assert_eq!(
        claims.pruning[0].1,
        whole.test_acc.unwrap(),
        "0% is the unpruned model"
    );
    // 2 layers × (4·16² + 2·16·32) encoder linear weights scored.
    assert_eq!(claims.sensitivity.count, 2 * (4 * 256 + 2 * 512));

    let ckpt = dir.join("ckpt");
    let first = go(&cfg(Some(ckpt.clone()), Some(1)));
    assert_eq!(first.steps, 5, "stopped after one epoch");
    assert!(first.claims.is_none() && first.test_acc.is_none());
    assert!(ckpt.join("progress.json").exists());
    let rest = go(&cfg(Some(ckpt.clone()), None));
    assert_eq!(rest.steps, 15);
    assert_eq!(rest.epoch_loss, whole.epoch_loss, "bit for bit");
    assert_eq!(rest.epoch_dev_acc, whole.epoch_dev_acc);
    assert_eq!(rest.test_acc, whole.test_acc);
    let (a, b) = (rest.claims.unwrap(), whole.claims.unwrap());
    assert_eq!(a.sensitivity.variance, b.sensitivity.variance);
    assert_eq!(a.pruning, b.pruning);
    std::fs::remove_dir_all(&dir).unwrap();
}
