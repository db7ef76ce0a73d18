//! sage-burn against sage-core's own driver, bit for bit (both step through sage-cpu): burn's
//! `ModuleOptimizer` with SAGE per group (per-tensor clipping, absent gradients, per-tensor
//! counts, a bf16 parameter, f32 and bf16 state) and the whole-module step (global clipping,
//! the optimizer's count); state through burn's records and through sage-checkpoint files.

use burn::module::{Module, ModuleVisitor, Param, ParamId};
use burn::nn::{Linear, LinearConfig};
use burn::optim::{GradientsParams, ModuleOptimizer};
use burn::tensor::{DType, Device, FloatDType, Tensor, TensorData};
use sage_burn::{
    export_checkpoint, import_checkpoint, ConfigCheck, GroupRules, SageConfig, SageModule,
};
use sage_checkpoint::Checkpoint;
use sage_core::{
    bf16, Algorithm, Config, Optimizer, ParamGroup, ParamTensor, Schedule, TensorState,
};
use sage_cpu::{Cpu, SimdCpu};

#[derive(Module, Debug)]
struct Net {
    fc1: Linear,
    fc2: Linear,
    /// A bf16 parameter: the model mixes storage types.
    scale: Param<Tensor<1>>,
}

fn net(device: &Device) -> Net {
    let fc1 = LinearConfig::new(6, 5).init(device);
    let fc2 = LinearConfig::new(5, 3).init(device);
    let scale = Tensor::<1>::from_floats([0.9, 1.1, 1.0], device).cast(FloatDType::BF16);
    Net {
        fc1,
        fc2,
        scale: Param::from_tensor(scale),
    }
}

impl Net {
    fn loss(&self, step: u64) -> Tensor<1> {
        let d = self.fc1.weight.val().device();
        let x: Vec<f32> = (0..24)
            .map(|k| ((k as f32 + 1.0) * (step as f32 + 0.7)).sin())
            .collect();
        let x = Tensor::<2>::from_data(TensorData::new(x, [4, 6]), &d);
        let h = self.fc1.forward(x).tanh();
        let y = self.fc2.forward(h) * self.scale.val().cast(FloatDType::F32).unsqueeze_dim(0);
        (y - 0.25).powi_scalar(2).sum()
    }
}

/// Every float parameter: path, id, value (host), in visiting order.
#[derive(Default)]
struct Snapshot {
    path: Vec<String>,
    out: Vec<(String, ParamId, TensorData)>,
}

impl ModuleVisitor for Snapshot {
    fn enter_module(&mut self, name: &str, _: &str) {
        self.path.push(name.to_string());
    }
    fn exit_module(&mut self, _: &str, _: &str) {
        self.path.pop();
    }
    fn visit_float<const D: usize>(&mut self, p: &Param<Tensor<D>>) {
        self.out
            .push((self.path.join("."), p.id, p.val().inner().into_data()));
    }
}

fn snapshot(m: &Net) -> Vec<(String, ParamId, TensorData)> {
    let mut s = Snapshot::default();
    m.visit(&mut s);
    s.out
}

fn bits(d: &TensorData) -> Vec<u32> {
    match d.dtype() {
        DType::F32 => d
            .as_slice::<f32>()
            .unwrap()
            .iter()
            .map(|x| x.to_bits())
            .collect(),
        DType::BF16 => d
            .as_slice::<bf16>()
            .unwrap()
            .iter()
            .map(|x| x.to_bits() as u32)
            .collect(),
        d => panic!("{d:?}"),
    }
}

/// A parameter's host copy for sage-core: f32 or bf16 values, and its state.
enum Host {
    F32(Vec<f32>, Vec<f32>),
    Bf16(Vec<bf16>, Vec<bf16>),
}

fn rules() -> GroupRules {
    GroupRules::new(
        vec![
            ParamGroup::sage().weight_decay(0.01),
            ParamGroup::sage(),
            ParamGroup::plain().lr_scale(0.5),
        ],
        2,
    )
    .rule("fc1.*", 0)
    .rule("fc2.bias", 1)
}

/// Gradients at `step`; some steps leave some parameters out.
fn grads(m: &Net, step: u64) -> GradientsParams {
    let mut g = GradientsParams::from_grads(m.loss(step).backward(), m);
    if step == 1 || step == 3 {
        let _ = g.remove::<1>(m.fc2.bias.as_ref().unwrap().id);
    }
    if step == 2 {
        let _ = g.remove::<2>(m.fc1.weight.id);
    }
    g
}

enum Stepper {
    PerTensor(ModuleOptimizer),
    Whole(Box<SageModule<Cpu>>),
}

/// Steps `net` with sage-burn and, beside it, sage-core's driver over host copies with the
/// same gradients; after every step every parameter (and the driver's report, for the whole
/// module step) must agree bit for bit.
fn against_core(cfg: SageConfig, whole: bool, steps: u64) {
    let device = Device::default().autodiff();
    let mut model = net(&device);
    let mut stepper = if whole {
        Stepper::Whole(Box::new(cfg.module_with(Cpu, &model).unwrap()))
    } else {
        Stepper::PerTensor(cfg.init_with(Cpu).unwrap())
    };
    let snap = snapshot(&model);
    let paths: Vec<String> = snap.iter().map(|s| s.0.clone()).collect();
    assert_eq!(
        paths,
        ["fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias", "scale"]
    );
    let groups: Vec<usize> = paths.iter().map(|p| cfg.rules.assign(p)).collect();
    assert_eq!(groups, [0, 0, 2, 1, 2]);
    let mut host: Vec<Host> = snap
        .iter()
        .map(|(_, _, d)| match d.dtype() {
            DType::F32 => Host::F32(d.as_slice::<f32>().unwrap().to_vec(), vec![]),
            _ => Host::Bf16(d.as_slice::<bf16>().unwrap().to_vec(), vec![]),
        })
        .collect();
    let mut st32: Vec<TensorState<Vec<f32>>> = Vec::new();
    let mut st16: Vec<TensorState<Vec<bf16>>> = Vec::new();
    for (i, (_, _, d)) in snap.iter().enumerate() {
        let layout = cfg.config.state_layout(cfg.rules.groups()[groups[i]].sage);
        st32.push(TensorState::zeros(layout, d.num_elements()));
        st16.push(TensorState::zeros(layout, d.num_elements()));
    }
    let mut core = Optimizer::new(Cpu, cfg.config, cfg.rules.groups().to_vec()).unwrap();
    let lr = cfg.config.lr;
    for step in 0..steps {
        let g = grads(&model, step);
        for (h, (_, id, d)) in host.iter_mut().zip(&snap) {
            let gd = match d.rank() {
                2 => g.get::<2>(*id).map(|t| t.into_data()),
                _ => g.get::<1>(*id).map(|t| t.into_data()),
            };
            match h {
                Host::F32(_, gv) => {
                    *gv = gd.map_or(vec![], |d| d.as_slice::<f32>().unwrap().to_vec())
                }
                Host::Bf16(_, gv) => {
                    *gv = gd.map_or(vec![], |d| d.as_slice::<bf16>().unwrap().to_vec())
                }
            }
        }
        model = match &mut stepper {
            Stepper::PerTensor(o) => o.step(lr, model, g),
            Stepper::Whole(o) => o.step(lr, model, &g).map_err(|r| r.error).unwrap(),
        };
        // The same step through sage-core, in the order the whole-module step uses: one set
        // per (parameter, state) storage pair, each in module order.
        let bf16_state = cfg.state == sage_core::DType::Bf16;
        let mut set = (
            Vec::<ParamTensor<'_, Cpu, f32, f32>>::new(),
            Vec::<ParamTensor<'_, Cpu, bf16, f32>>::new(),
            Vec::<ParamTensor<'_, Cpu, f32, bf16>>::new(),
            Vec::<ParamTensor<'_, Cpu, bf16, bf16>>::new(),
        );
        for (((h, s32), s16), (i, p)) in host
            .iter_mut()
            .zip(&mut st32)
            .zip(&mut st16)
            .zip(paths.iter().enumerate())
        {
            let g = groups[i];
            match h {
                Host::F32(v, gv) if !gv.is_empty() => {
                    if bf16_state {
                        set.2.push(
                            ParamTensor::new(&mut v[..], &gv[..], s16.view())
                                .name(p)
                                .group(g),
                        );
                    } else {
                        set.0.push(
                            ParamTensor::new(&mut v[..], &gv[..], s32.view())
                                .name(p)
                                .group(g),
                        );
                    }
                }
                Host::Bf16(v, gv) if !gv.is_empty() => {
                    if bf16_state {
                        set.3.push(
                            ParamTensor::new(&mut v[..], &gv[..], s16.view())
                                .name(p)
                                .group(g),
                        );
                    } else {
                        set.1.push(
                            ParamTensor::new(&mut v[..], &gv[..], s32.view())
                                .name(p)
                                .group(g),
                        );
                    }
                }
                _ => {}
            }
        }
        let want = core.step(&mut set).unwrap();
        drop(set);
        assert!(want.applied());
        if let Stepper::Whole(o) = &stepper {
            assert_eq!(o.last_report(), Some(&want), "step {step}");
        }
        for ((path, _, d), h) in snapshot(&model).iter().zip(&host) {
            let want = match h {
                Host::F32(v, _) => v.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
                Host::Bf16(v, _) => v.iter().map(|x| x.to_bits() as u32).collect(),
            };
            assert_eq!(
                bits(d),
                want,
                "`{path}` differs from sage-core after step {step}"
            );
        }
    }
    let counts: Vec<u64> = if cfg.state == sage_core::DType::Bf16 {
        st16.iter().map(|s| s.step).collect()
    } else {
        st32.iter().map(|s| s.step).collect()
    };
    // fc1.weight was left out at step 2, fc2.bias at steps 1 and 3.
    assert_eq!(counts, [steps - 1, steps, steps, steps - 2, steps]);
    match &stepper {
        Stepper::Whole(o) => {
            let own: Vec<u64> = o.param_steps().iter().map(|p| p.1).collect();
            assert_eq!(own, [steps - 1, steps, steps, steps - 2, steps]);
        }
        Stepper::PerTensor(o) => {
            let bytes = export_checkpoint(o, &model, &cfg).unwrap();
            let ck = Checkpoint::parse(&bytes).unwrap();
            let own: Vec<u64> = ck.params().iter().map(|p| p.step).collect();
            assert_eq!(own, [steps - 1, steps, steps, steps - 2, steps]);
        }
    }
}

fn reference() -> Config {
    Config::reference(Algorithm::adamw(), 3e-2)
        .beta0(0.7)
        .schedule(Schedule::WarmupLinearPpb {
            warmup: 0.3,
            t_total: 8,
        })
}

#[test]
fn module_optimizer_equals_sage_core() {
    // Per-tensor clipping (the authors' max_grad_norm), warm-up on each tensor's own count.
    let cfg = SageConfig::new(reference().per_tensor_clip(0.3), rules());
    against_core(cfg.clone(), false, 6);
    against_core(cfg.bf16_state(), false, 6);
}

#[test]
fn whole_module_step_equals_sage_core() {
    // Global clipping and the optimizer's count (the paper preset schedules on it).
    let paper = Config::paper(Algorithm::adam(), 1e-2)
        .schedule(Schedule::LinearWarmupDecay {
            warmup_steps: 2,
            total_steps: 8,
        })
        .global_clip(0.5);
    against_core(SageConfig::new(paper, rules()), true, 6);
    against_core(
        SageConfig::new(reference().global_clip(0.5), rules()).bf16_state(),
        true,
        6,
    );
}

#[test]
fn global_clipping_is_refused_per_tensor() {
    let cfg = SageConfig::new(reference().global_clip(1.0), rules());
    let err = cfg.init().err().unwrap().to_string();
    assert!(err.contains("global clipping"), "{err}");
    let mut f16 = SageConfig::new(reference(), rules());
    f16.state = sage_core::DType::F16;
    assert!(f16.init().err().unwrap().to_string().contains("f16"));
}

fn values(m: &Net) -> Vec<Vec<u32>> {
    snapshot(m).iter().map(|(_, _, d)| bits(d)).collect()
}

#[test]
fn burn_records_and_checkpoints_resume_exactly() {
    let device = Device::default().autodiff();
    let cfg = SageConfig::new(reference(), rules()).bf16_state();
    let lr = cfg.config.lr;
    let (mut a, mut b) = (net(&device), net(&device));
    let mut b_params = b.clone();
    // Same initial values in both.
    b = b.load_record(a.clone().into_record());
    let mut oa = cfg.init_with(SimdCpu::new()).unwrap();
    let mut ob = cfg.init_with(SimdCpu::new()).unwrap();
    for s in 0..3 {
        a = oa.step(lr, a.clone(), grads(&a, s));
        b = ob.step(lr, b.clone(), grads(&b, s));
    }
    // Through burn's record (burnpack bytes), and through a sage-checkpoint file.
    let record = ob.to_record().into_bytes().unwrap();
    let file = export_checkpoint(&ob, &b, &cfg).unwrap();
    let mut via_record = cfg.init().unwrap().from_bytes(record).unwrap();
    let mut via_file =
        import_checkpoint(cfg.init().unwrap(), &b, &cfg, &file, ConfigCheck::Exact).unwrap();
    let (mut r, mut f) = (b.clone(), b.clone());
    for s in 3..6 {
        a = oa.step(lr, a.clone(), grads(&a, s));
        r = via_record.step(lr, r.clone(), grads(&r, s));
        f = via_file.step(lr, f.clone(), grads(&f, s));
    }
    assert_eq!(values(&a), values(&r), "resumed from burn's record");
    assert_eq!(
        values(&a),
        values(&f),
        "resumed from a sage-checkpoint file"
    );

    // A whole-module optimizer writes the same format: its file loads into burn's optimizer
    // (configurations differ only in clipping: compatible state).
    let whole_cfg = SageConfig::new(reference().global_clip(1.0), rules()).bf16_state();
    let mut w = whole_cfg.module(&b_params).unwrap();
    b_params = w
        .step(lr, b_params.clone(), &grads(&b_params, 0))
        .map_err(|r| r.error)
        .unwrap();
    let wfile = w.save_checkpoint().unwrap();
    let err = import_checkpoint(
        cfg.init().unwrap(),
        &b_params,
        &cfg,
        &wfile,
        ConfigCheck::Exact,
    )
    .err()
    .unwrap()
    .to_string();
    assert!(err.contains("global_clip"), "{err}");
    import_checkpoint(
        cfg.init().unwrap(),
        &b_params,
        &cfg,
        &wfile,
        ConfigCheck::StateCompatible,
    )
    .unwrap();
    // ...and the module optimizer's file loads back into a whole-module optimizer.
    let mut w2 = whole_cfg.module(&b_params).unwrap();
    w2.load_checkpoint(&file, ConfigCheck::StateCompatible)
        .unwrap();
    assert_eq!(w2.steps(), 3);
    // f32 state here, bf16 in the file: refused by name, nothing changed.
    let mut w3 = SageConfig::new(reference(), rules())
        .module(&b_params)
        .unwrap();
    let err = w3
        .load_checkpoint(&file, ConfigCheck::StateCompatible)
        .unwrap_err()
        .to_string();
    assert!(err.contains("bf16"), "{err}");
    assert_eq!(w3.steps(), 0);
}

#[test]
fn non_finite_gradient_skips_that_tensor_per_tensor_and_the_step_whole() {
    let device = Device::default().autodiff();
    let cfg = SageConfig::new(reference(), rules());
    let model = net(&device);
    let before = values(&model);
    let nan_grads = || {
        let mut g = grads(&model, 0);
        let id = model.fc1.weight.id;
        let w = g.remove::<2>(id).unwrap();
        g.register::<2>(id, w.mul_scalar(f32::NAN));
        g
    };
    // burn's per-tensor contract: that tensor is skipped (value and count kept), the others step.
    let mut optim = cfg.init_with(Cpu).unwrap();
    let stepped = optim.step(cfg.config.lr, model.clone(), nan_grads());
    let after = values(&stepped);
    assert_eq!(after[0], before[0], "fc1.weight must not move");
    assert!(after[1..].iter().zip(&before[1..]).any(|(a, b)| a != b));
    let file = export_checkpoint(&optim, &stepped, &cfg).unwrap();
    let counts: Vec<u64> = Checkpoint::parse(&file)
        .unwrap()
        .params()
        .iter()
        .map(|p| p.step)
        .collect();
    assert_eq!(counts, [0, 1, 1, 1, 1]);
    // The whole-module step: nothing moves, no count advances.
    let mut whole = SageConfig::new(reference().global_clip(1.0), rules())
        .module_with(Cpu, &model)
        .unwrap();
    let same = whole
        .step(cfg.config.lr, model.clone(), &nan_grads())
        .map_err(|r| r.error)
        .unwrap();
    assert_eq!(values(&same), before);
    assert!(!whole.last_report().unwrap().applied());
    assert!(whole.param_steps().iter().all(|p| p.1 == 0));
}
