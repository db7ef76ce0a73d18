//! The adapter against plain sage-core on a small randomly initialised BERT, gradients reach
//! every parameter, state round-trips, bad input is refused. No download needed.

use std::collections::HashMap;

use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{Optimizer as _, VarBuilder, VarMap};
use sage_candle::bert::{init_random, BertClassifier, BertConfig, Rng};
use sage_candle::{named_vars, ConfigCheck, GroupRules, SageOptimizer, SageParams, SliceBackend};
use sage_checkpoint::{Buffer, Checkpoint};
use sage_core::{Algorithm, Config, Optimizer, ParamGroup, ParamTensor, Schedule, TensorState};
use sage_cpu::{Cpu, SimdCpu};

const VOCAB: usize = 50;

fn model(seed: u64) -> (VarMap, BertClassifier) {
    let vm = VarMap::new();
    let vb = VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu);
    let m = BertClassifier::new(&BertConfig::tiny(VOCAB), 2, vb).unwrap();
    init_random(&vm, &mut Rng::new(seed)).unwrap();
    (vm, m)
}

/// A batch of 4 sequences of 8 tokens, the last two padded, and labels.
fn batch(seed: u64) -> (Tensor, Tensor, Tensor) {
    let mut r = Rng::new(seed);
    let ids: Vec<u32> = (0..32).map(|_| r.below(VOCAB) as u32).collect();
    let lens = [8, 8, 5, 3];
    let mask: Vec<f32> = lens
        .iter()
        .flat_map(|&l| (0..8).map(move |i| if i < l { 1.0 } else { 0.0 }))
        .collect();
    let d = &Device::Cpu;
    (
        Tensor::from_vec(ids, (4, 8), d).unwrap(),
        Tensor::from_vec(mask, (4, 8), d).unwrap(),
        Tensor::new(&[0u32, 1, 1, 0], d).unwrap(),
    )
}

fn grads(m: &BertClassifier, step: u64, dropout: bool) -> GradStore {
    let (ids, mask, y) = batch(100 + step);
    let mut rng = Rng::new(7 + step);
    let logits = m.forward(&ids, &mask, dropout.then_some(&mut rng)).unwrap();
    candle_nn::loss::cross_entropy(&logits, &y)
        .unwrap()
        .backward()
        .unwrap()
}

fn config() -> Config {
    Config::reference(Algorithm::adamw(), 1e-3)
        .beta0(0.7)
        .schedule(Schedule::WarmupLinearPpb {
            warmup: 0.2,
            t_total: 10,
        })
        .global_clip(1.0)
}

fn values(v: &Var) -> Vec<f32> {
    v.as_tensor().flatten_all().unwrap().to_vec1().unwrap()
}

/// Steps the adapter and, beside it, sage-core's own driver on the same backend over host
/// copies of every parameter with the same gradients and groups; they must agree bit for bit.
fn adapter_vs_core<B: SliceBackend + Clone>(backend: B, freeze_embeddings: bool) {
    let (vm, mut m) = model(1);
    m.freeze_embeddings = freeze_embeddings;
    let rules = GroupRules::authors(0.01);
    let vars = named_vars(&vm, |_| true);
    let mut opt = SageOptimizer::with_backend(
        backend.clone(),
        vars.clone(),
        SageParams::new(config(), rules.clone()),
    )
    .unwrap();
    let mut core = Optimizer::new(backend, config(), rules.groups().to_vec()).unwrap();
    let mut host: Vec<Vec<f32>> = vars.iter().map(|(_, v)| values(v)).collect();
    let mut states: Vec<TensorState<Vec<f32>>> = vars
        .iter()
        .map(|(n, v)| {
            let sage = rules.groups()[rules.assign(n)].sage;
            TensorState::zeros(config().state_layout(sage), v.as_tensor().elem_count())
        })
        .collect();
    let before: Vec<Vec<f32>> = host.clone();
    for step in 0..4 {
        let g = grads(&m, step, true);
        let gh: Vec<Option<Vec<f32>>> = vars
            .iter()
            .map(|(_, v)| {
                g.get(v.as_tensor())
                    .map(|t| t.flatten_all().unwrap().to_vec1().unwrap())
            })
            .collect();
        opt.step_grads(&g).unwrap();
        let mut ts: Vec<ParamTensor<'_, B, f32, f32>> = Vec::new();
        for ((((n, _), p), st), gv) in vars.iter().zip(&mut host).zip(&mut states).zip(&gh) {
            if let Some(gv) = gv {
                ts.push(
                    ParamTensor::new(&mut p[..], &gv[..], st.view())
                        .name(n)
                        .group(rules.assign(n)),
                );
            }
        }
        let want = core.step(&mut ts).unwrap();
        assert_eq!(opt.last_report(), Some(&want), "step {step}");
        for ((n, v), h) in vars.iter().zip(&host) {
            assert!(
                values(v) == *h,
                "`{n}` differs from sage-core after step {step}"
            );
        }
    }
    assert_eq!(opt.steps(), 4);
    for (((n, _), b), h) in vars.iter().zip(&before).zip(&host) {
        let frozen = freeze_embeddings && n.starts_with("embeddings.");
        // Reference preset: θ = 0 has no sensitivity, so SAGE never moves the zero-initialised
        // biases of its group (the authors' code does the same).
        let stuck = rules.assign(n) == 1;
        assert_eq!(stuck, stuck && b.iter().all(|&x| x == 0.0), "`{n}`");
        assert_eq!(b == h, frozen || stuck, "`{n}` moved: {}", b != h);
    }
}

#[test]
fn adapter_equals_sage_core_on_small_bert() {
    adapter_vs_core(Cpu, false);
    // Many threads and a small split, so the multi-threaded path runs on this small model.
    adapter_vs_core(SimdCpu::new().threads(3).min_parallel(0).chunk(64), false);
}

#[test]
fn frozen_embeddings_get_no_gradient_and_stay() {
    adapter_vs_core(Cpu, true);
    adapter_vs_core(SimdCpu::new(), true);
}

#[test]
fn every_parameter_receives_a_gradient() {
    let (vm, m) = model(2);
    let g = grads(&m, 0, true);
    let vars = named_vars(&vm, |_| true);
    // 5 embedding tensors, 16 per layer, 2 for the classifier.
    assert_eq!(vars.len(), 5 + 2 * 16 + 2);
    for (n, v) in vars {
        let t = g
            .get(v.as_tensor())
            .unwrap_or_else(|| panic!("no gradient for `{n}`"));
        let norm: f32 = t.sqr().unwrap().sum_all().unwrap().to_scalar().unwrap();
        assert!(norm > 0.0 && norm.is_finite(), "`{n}` gradient norm {norm}");
    }
}

#[test]
fn authors_groups_on_bert_names() {
    let (vm, _) = model(3);
    let mut opt = SageOptimizer::from_varmap(&vm, SageParams::authors(config(), 0.01)).unwrap();
    let a: HashMap<&str, usize> = opt.assignments().into_iter().collect();
    assert_eq!(a["encoder.layer.1.attention.self.key.weight"], 0);
    assert_eq!(a["encoder.layer.1.output.dense.bias"], 1);
    assert_eq!(a["classifier.weight"], 2);
    assert_eq!(a["embeddings.LayerNorm.weight"], 3);
    // 12 SAGE tensors per layer (6 linear layers, weight and bias).
    assert_eq!(a.values().filter(|&&g| g <= 1).count(), 2 * 12);
    let bytes = opt.state_to_bytes().unwrap();
    let ckpt = Checkpoint::parse(&bytes).unwrap();
    let q = ckpt
        .param("encoder.layer.0.attention.self.query.weight")
        .unwrap();
    assert!(q.has(Buffer::Ibar) && q.group == 0);
    let c = ckpt.param("classifier.weight").unwrap();
    assert!(c.has(Buffer::M) && !c.has(Buffer::Ibar));
}

#[test]
fn saved_state_resumes_like_an_uninterrupted_run() {
    let params = || SageParams::authors(config(), 0.01);
    let (vm_a, m_a) = model(4);
    let (vm_b, m_b) = model(4);
    let mut a = SageOptimizer::from_varmap(&vm_a, params()).unwrap();
    let mut b = SageOptimizer::from_varmap(&vm_b, params()).unwrap();
    for s in 0..2 {
        a.step(&grads(&m_a, s, false)).unwrap();
        b.step(&grads(&m_b, s, false)).unwrap();
    }
    let path = std::env::temp_dir().join(format!(
        "sage-candle-state-{}.safetensors",
        std::process::id()
    ));
    b.save_state(&path).unwrap();
    drop(b);
    let mut c = SageOptimizer::from_varmap(&vm_b, params()).unwrap();
    c.load_state(&path).unwrap();
    std::fs::remove_file(&path).unwrap();
    assert_eq!(c.steps(), 2);
    for s in 2..4 {
        a.step(&grads(&m_a, s, false)).unwrap();
        c.step(&grads(&m_b, s, false)).unwrap();
    }
    for ((n, va), (_, vb)) in named_vars(&vm_a, |_| true)
        .iter()
        .zip(&named_vars(&vm_b, |_| true))
    {
        assert!(values(va) == values(vb), "`{n}` differs after resuming");
    }
    // A file for fewer parameters is refused by name, and nothing changes.
    let few = named_vars(&vm_a, |n| n != "classifier.weight");
    let mut d = SageOptimizer::new_named(few, params()).unwrap();
    let bytes = d.state_to_bytes().unwrap();
    let before = a.param_steps().into_iter().map(|(n, t)| (n.to_string(), t));
    let before: Vec<_> = before.collect();
    let sens = a.sensitivities().unwrap();
    let err = a
        .load_state_bytes(&bytes, ConfigCheck::Exact)
        .unwrap_err()
        .to_string();
    assert!(err.contains("classifier.weight"), "{err}");
    let after = a.param_steps().into_iter().map(|(n, t)| (n.to_string(), t));
    assert!(after.eq(before));
    assert!(a.sensitivities().unwrap() == sens);
    assert_eq!(a.steps(), 4);
}

#[test]
fn candle_optimizer_trait_and_errors() {
    let w = Var::from_tensor(&Tensor::new(&[1.0f32, -2.0], &Device::Cpu).unwrap()).unwrap();
    let single = SageParams::new(
        Config::reference(Algorithm::adamw(), 0.1),
        GroupRules::single(ParamGroup::plain()),
    );
    let mut opt = SageOptimizer::<Cpu>::new(vec![w.clone()], single.clone()).unwrap();
    assert_eq!(opt.learning_rate(), 0.1);
    opt.set_learning_rate(0.05);
    assert_eq!(opt.learning_rate(), 0.05);
    opt.set_learning_rate(f64::NAN); // refused: the rate stays
    assert_eq!(opt.learning_rate(), 0.05);
    opt.backward_step(&w.as_tensor().sqr().unwrap().sum_all().unwrap())
        .unwrap();
    let v = values(&w);
    assert!(v[0] < 1.0 && v[1] > -2.0);
    // A gradient store without this parameter: nothing happens.
    let other = Var::new(&[3.0f32], &Device::Cpu).unwrap();
    opt.backward_step(&other.as_tensor().sqr().unwrap().sum_all().unwrap())
        .unwrap();
    assert_eq!(values(&w), v);
    assert_eq!(opt.steps(), 1);

    let e = SageOptimizer::<Cpu>::new(vec![w.clone(), w.clone()], single.clone());
    assert!(e.err().unwrap().to_string().contains("twice"));
    let d = Var::new(&[1.0f64], &Device::Cpu).unwrap();
    let e = SageOptimizer::<Cpu>::new(vec![d], single.clone());
    assert!(e.err().unwrap().to_string().contains("f32, f16 or bf16"));
    let mut f16_state = single.clone();
    f16_state.state = sage_core::DType::F16;
    let e = SageOptimizer::<Cpu>::new(vec![w.clone()], f16_state);
    assert!(e.err().unwrap().to_string().contains("f16"));
    let bad = SageParams {
        config: Config::reference(Algorithm::adamw(), -1.0),
        ..single
    };
    assert!(SageOptimizer::<Cpu>::new(vec![w], bad).is_err());
}

#[test]
fn non_finite_gradient_skips_the_step() {
    let w = Var::new(&[1.0f32, 2.0], &Device::Cpu).unwrap();
    let p = SageParams::new(
        Config::reference(Algorithm::adamw(), 0.1),
        GroupRules::single(ParamGroup::sage()),
    );
    let mut opt = SageOptimizer::new_named(vec![("w".into(), w.clone())], p).unwrap();
    let loss = w.as_tensor().log().unwrap().sum_all().unwrap();
    // d/dw of log(w) * inf: an infinite gradient.
    let loss = (loss * f64::INFINITY).unwrap();
    opt.backward_step(&loss).unwrap();
    assert!(!opt.last_report().unwrap().applied());
    assert_eq!(values(&w), vec![1.0, 2.0]);
    assert_eq!(opt.steps(), 0);
}
