//! f32, f16 and bf16 variables in one counted step (f32 and bf16 state) against sage-core's own
//! driver, bit for bit, with absent gradients; state files through sage-checkpoint: resumed
//! runs equal uninterrupted ones, each parameter's count survives, and corrupt, foreign or
//! mismatched files are refused with nothing changed.

use candle_core::{DType, Device, Tensor, Var};
use sage_candle::{ConfigCheck, GroupRules, SageOptimizer, SageParams};
use sage_checkpoint::{Buffer, Checkpoint};
use sage_core::{
    bf16, f16, Algorithm, Config, Optimizer, ParamGroup, ParamTensor, Schedule, TensorState,
};
use sage_cpu::{Cpu, SimdCpu};

/// A parameter's host copy for the reference driver, in its own storage type.
enum Host {
    F32(Vec<f32>),
    F16(Vec<f16>),
    Bf16(Vec<bf16>),
}

impl Host {
    fn of(v: &Var) -> Host {
        let t = v.as_tensor().flatten_all().unwrap();
        match t.dtype() {
            DType::F32 => Host::F32(t.to_vec1().unwrap()),
            DType::F16 => Host::F16(t.to_vec1().unwrap()),
            DType::BF16 => Host::Bf16(t.to_vec1().unwrap()),
            d => panic!("{d:?}"),
        }
    }
    fn bits(&self) -> Vec<u32> {
        match self {
            Host::F32(v) => v.iter().map(|x| x.to_bits()).collect(),
            Host::F16(v) => v.iter().map(|x| x.to_bits() as u32).collect(),
            Host::Bf16(v) => v.iter().map(|x| x.to_bits() as u32).collect(),
        }
    }
}

enum HostState {
    F32(TensorState<Vec<f32>>),
    Bf16(TensorState<Vec<bf16>>),
}

/// name, dtype, shape, group: two SAGE groups and a plain one, every storage type in each.
const PARAMS: [(&str, DType, &[usize], usize); 6] = [
    ("a.weight", DType::F32, &[4, 6], 0),
    ("a.bias", DType::F32, &[6], 1),
    ("b.weight", DType::BF16, &[6, 5], 0),
    ("b.bias", DType::F16, &[5], 1),
    ("c.weight", DType::F16, &[5, 3], 0),
    ("norm.weight", DType::BF16, &[3], 2),
];

fn rules() -> GroupRules {
    GroupRules::new(
        vec![
            ParamGroup::sage().weight_decay(0.01),
            ParamGroup::sage(),
            ParamGroup::plain().lr_scale(0.5),
        ],
        2,
    )
    .rule("norm.*", 2)
    .rule("*.weight", 0)
    .rule("*.bias", 1)
}

fn config() -> Config {
    Config::reference(Algorithm::adamw(), 2e-2)
        .beta0(0.7)
        .schedule(Schedule::WarmupLinearPpb {
            warmup: 0.3,
            t_total: 8,
        })
        .global_clip(0.5)
}

fn vars(seed: u32) -> Vec<(String, Var)> {
    PARAMS
        .iter()
        .enumerate()
        .map(|(i, &(name, dtype, shape, _))| {
            let n: usize = shape.iter().product();
            let data: Vec<f32> = (0..n)
                .map(|k| {
                    let h =
                        (k as u32).wrapping_mul(2654435761) ^ (seed + i as u32).wrapping_mul(40503);
                    let x = (h % 1000) as f32;
                    (x / 500.0 - 1.0) * 0.5 + 0.01
                })
                .collect();
            let t = Tensor::from_vec(data, shape, &Device::Cpu)
                .unwrap()
                .to_dtype(dtype)
                .unwrap();
            (name.to_string(), Var::from_tensor(&t).unwrap())
        })
        .collect()
}

/// A loss over the parameters `use_[i]` selects: a small network in f32 whose every parameter
/// is cast from its own type (its gradient comes back in that type).
fn loss(vs: &[(String, Var)], step: u64, use_: &[bool]) -> Tensor {
    let d = &Device::Cpu;
    let f = |i: usize| vs[i].1.as_tensor().to_dtype(DType::F32).unwrap();
    let x: Vec<f32> = (0..8)
        .map(|k| ((k as f32 + 1.0) * (step as f32 + 1.3)).sin())
        .collect();
    let x = Tensor::from_vec(x, (2, 4), d).unwrap();
    let mut h = x.matmul(&f(0)).unwrap();
    if use_[1] {
        h = h.broadcast_add(&f(1)).unwrap();
    }
    h = h.tanh().unwrap();
    let mut h = if use_[2] {
        h.matmul(&f(2)).unwrap()
    } else {
        h.narrow(1, 0, 5).unwrap()
    };
    if use_[3] {
        h = h.broadcast_add(&f(3)).unwrap();
    }
    let mut h = h.tanh().unwrap().matmul(&f(4)).unwrap();
    if use_[5] {
        h = h.broadcast_mul(&f(5)).unwrap();
    }
    let target = Tensor::new(&[[0.3f32, -0.2, 0.1], [-0.4, 0.5, 0.2]], d).unwrap();
    (h - target).unwrap().sqr().unwrap().sum_all().unwrap()
}

/// Which parameters get a gradient at `step`: some steps leave some out.
fn present(step: u64) -> Vec<bool> {
    match step {
        1 => vec![true, false, true, true, true, false],
        3 => vec![true, true, false, true, true, true],
        4 => vec![true, false, true, false, true, false],
        _ => vec![true; 6],
    }
}

fn mixed_vs_core<B: sage_candle::SliceBackend + Clone>(backend: B, state: sage_core::DType) {
    let vs = vars(1);
    let rules = rules();
    let mut params = SageParams::new(config(), rules.clone());
    params.state = state;
    let mut opt = SageOptimizer::with_backend(backend.clone(), vs.clone(), params).unwrap();
    let mut core = Optimizer::new(backend, config(), rules.groups().to_vec()).unwrap();
    let mut host: Vec<Host> = vs.iter().map(|(_, v)| Host::of(v)).collect();
    let mut states: Vec<HostState> = PARAMS
        .iter()
        .map(|&(name, _, shape, _)| {
            let layout = config().state_layout(rules.groups()[rules.assign(name)].sage);
            let n = shape.iter().product();
            match state {
                sage_core::DType::Bf16 => HostState::Bf16(TensorState::zeros(layout, n)),
                _ => HostState::F32(TensorState::zeros(layout, n)),
            }
        })
        .collect();
    for (i, &(name, _, _, g)) in PARAMS.iter().enumerate() {
        assert_eq!(rules.assign(name), g, "{name}");
        assert_eq!(opt.assignments()[i], (name, g));
    }
    let mut clipped = 0;
    for step in 0..6 {
        let use_ = present(step);
        let grads = loss(&vs, step, &use_).backward().unwrap();
        let gh: Vec<Option<Host>> = vs
            .iter()
            .map(|(_, v)| {
                grads.get(v.as_tensor()).map(|g| {
                    assert_eq!(g.dtype(), v.as_tensor().dtype());
                    Host::of(&Var::from_tensor(g).unwrap())
                })
            })
            .collect();
        for (i, g) in gh.iter().enumerate() {
            assert_eq!(
                g.is_some(),
                use_[i] || i == 0 || i == 4,
                "step {step} param {i}"
            );
        }
        opt.step_grads(&grads).unwrap();

        // The same step through sage-core: one set per (parameter, state) storage pair, in the
        // adapter's order.
        let mut set = (
            Vec::<ParamTensor<'_, B, f32, f32>>::new(),
            Vec::<ParamTensor<'_, B, f16, f32>>::new(),
            Vec::<ParamTensor<'_, B, bf16, f32>>::new(),
            Vec::<ParamTensor<'_, B, f32, bf16>>::new(),
            Vec::<ParamTensor<'_, B, f16, bf16>>::new(),
            Vec::<ParamTensor<'_, B, bf16, bf16>>::new(),
        );
        for (((p, st), g), &(name, _, _, group)) in
            host.iter_mut().zip(&mut states).zip(&gh).zip(&PARAMS)
        {
            let Some(g) = g else { continue };
            macro_rules! push {
                ($v:expr, $p:expr, $g:expr, $s:expr) => {
                    $v.push(
                        ParamTensor::new(&mut $p[..], &$g[..], $s.view())
                            .name(name)
                            .group(group),
                    )
                };
            }
            match (p, g, st) {
                (Host::F32(p), Host::F32(g), HostState::F32(s)) => push!(set.0, p, g, s),
                (Host::F16(p), Host::F16(g), HostState::F32(s)) => push!(set.1, p, g, s),
                (Host::Bf16(p), Host::Bf16(g), HostState::F32(s)) => push!(set.2, p, g, s),
                (Host::F32(p), Host::F32(g), HostState::Bf16(s)) => push!(set.3, p, g, s),
                (Host::F16(p), Host::F16(g), HostState::Bf16(s)) => push!(set.4, p, g, s),
                (Host::Bf16(p), Host::Bf16(g), HostState::Bf16(s)) => push!(set.5, p, g, s),
                _ => unreachable!(),
            }
        }
        let want = core.step(&mut set).unwrap();
        drop(set);
        assert_eq!(opt.last_report(), Some(&want), "step {step}");
        assert!(want.applied());
        clipped += (want.clip_scale < 1.0) as usize;
        for ((n, v), h) in vs.iter().zip(&host) {
            assert_eq!(
                Host::of(v).bits(),
                h.bits(),
                "`{n}` differs from sage-core after step {step}"
            );
        }
        let counts: Vec<u64> = states
            .iter()
            .map(|s| match s {
                HostState::F32(s) => s.step,
                HostState::Bf16(s) => s.step,
            })
            .collect();
        let got: Vec<u64> = opt.param_steps().iter().map(|p| p.1).collect();
        assert_eq!(got, counts, "step {step}");
    }
    assert!(clipped >= 2, "global clipping ran at {clipped} steps");
    // Absent at steps 1, 3, 4: the counts differ.
    assert_eq!(
        opt.param_steps().iter().map(|p| p.1).collect::<Vec<_>>(),
        [6, 4, 5, 5, 6, 4]
    );
    assert_eq!(opt.steps(), 6);
    // Ī of every SAGE parameter, widened to f32, equals the driver's.
    let sens = opt.sensitivities().unwrap();
    assert_eq!(sens.len(), 5);
    for (name, ibar) in sens {
        let i = PARAMS.iter().position(|p| p.0 == name).unwrap();
        let want: Vec<f32> = match &states[i] {
            HostState::F32(s) => s.ibar.clone().unwrap(),
            HostState::Bf16(s) => s
                .ibar
                .as_ref()
                .unwrap()
                .iter()
                .map(|x| x.to_f32())
                .collect(),
        };
        assert_eq!(ibar, want, "{name}");
    }
    let per_param = match state {
        sage_core::DType::Bf16 => 2,
        _ => 4,
    };
    // Adam's m and v everywhere, Ī on the 5 SAGE parameters.
    let elems: usize = PARAMS.iter().map(|p| p.2.iter().product::<usize>()).sum();
    let sage_elems = elems - 3;
    assert_eq!(opt.state_bytes(), per_param * (2 * elems + sage_elems));
}

#[test]
fn mixed_precisions_equal_sage_core_f32_state() {
    mixed_vs_core(Cpu, sage_core::DType::F32);
    mixed_vs_core(
        SimdCpu::new().threads(3).min_parallel(0).chunk(8),
        sage_core::DType::F32,
    );
}

#[test]
fn mixed_precisions_equal_sage_core_bf16_state() {
    mixed_vs_core(Cpu, sage_core::DType::Bf16);
    mixed_vs_core(SimdCpu::new(), sage_core::DType::Bf16);
}

fn run(opt: &mut SageOptimizer<Cpu>, vs: &[(String, Var)], steps: std::ops::Range<u64>) {
    for step in steps {
        let g = loss(vs, step, &present(step)).backward().unwrap();
        opt.step_grads(&g).unwrap();
    }
}

/// Two state files hold the same state: counts, configuration, every buffer bit for bit (the
/// files' bytes may differ: safetensors orders its metadata as a hash map does).
pub fn same_state(a: &[u8], b: &[u8]) -> bool {
    let (a, b) = (Checkpoint::parse(a).unwrap(), Checkpoint::parse(b).unwrap());
    a.step() == b.step()
        && a.config() == b.config()
        && a.groups() == b.groups()
        && a.params() == b.params()
        && a.params().iter().all(|p| {
            [Buffer::M, Buffer::V, Buffer::Ibar].into_iter().all(|buf| {
                let bits = |c: &Checkpoint<'_>| {
                    c.read_f32(&p.name, buf)
                        .map(|v| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>())
                };
                bits(&a) == bits(&b)
            })
        })
}

fn bits(vs: &[(String, Var)]) -> Vec<Vec<u32>> {
    vs.iter().map(|(_, v)| Host::of(v).bits()).collect()
}

#[test]
fn state_files_resume_exactly_and_keep_each_count() {
    for state in [sage_core::DType::F32, sage_core::DType::Bf16] {
        let params = || {
            let mut p = SageParams::new(config(), rules());
            p.state = state;
            p
        };
        let (va, vb) = (vars(2), vars(2));
        let mut a = SageOptimizer::with_backend(Cpu, va.clone(), params()).unwrap();
        let mut b = SageOptimizer::with_backend(Cpu, vb.clone(), params()).unwrap();
        run(&mut a, &va, 0..5);
        run(&mut b, &vb, 0..5);
        let path = std::env::temp_dir().join(format!(
            "sage-candle-mixed-{}-{state}.safetensors",
            std::process::id()
        ));
        b.save_state(&path).unwrap();
        let bytes = std::fs::read(&path).unwrap();
        std::fs::remove_file(&path).unwrap();

        // The file is a sage-checkpoint file: counts per parameter, the state's type.
        let ckpt = Checkpoint::parse(&bytes).unwrap();
        assert_eq!(ckpt.step(), 5);
        for ((name, t), info) in b.param_steps().into_iter().zip(ckpt.params()) {
            assert_eq!((name, t), (info.name.as_str(), info.step));
            assert_eq!(info.state_dtype, Some(state));
        }
        assert_eq!(ckpt.param("b.weight").unwrap().shape, [6, 5]);
        assert!(!ckpt.param("norm.weight").unwrap().layout.ibar);

        let mut c = SageOptimizer::with_backend(Cpu, vb.clone(), params()).unwrap();
        c.load_state_bytes(&bytes, ConfigCheck::Exact).unwrap();
        assert_eq!(c.param_steps(), b.param_steps());
        drop(b);
        run(&mut a, &va, 5..8);
        run(&mut c, &vb, 5..8);
        assert_eq!(bits(&va), bits(&vb), "resumed run differs ({state} state)");
        assert!(same_state(
            &a.state_to_bytes().unwrap(),
            &c.state_to_bytes().unwrap()
        ));
    }
}

#[test]
fn bad_state_files_are_refused_and_change_nothing() {
    let vs = vars(3);
    let mut opt =
        SageOptimizer::with_backend(Cpu, vs.clone(), SageParams::new(config(), rules())).unwrap();
    run(&mut opt, &vs, 0..3);
    let good = opt.state_to_bytes().unwrap();
    // A second run, one step further along: its file would change everything if loaded.
    let ov = vars(3);
    let mut further =
        SageOptimizer::with_backend(Cpu, ov.clone(), SageParams::new(config(), rules())).unwrap();
    run(&mut further, &ov, 0..4);
    let later = further.state_to_bytes().unwrap();

    let expect_refusal = |opt: &mut SageOptimizer<Cpu>, bytes: &[u8], check, needle: &str| {
        let err = opt.load_state_bytes(bytes, check).unwrap_err().to_string();
        assert!(err.contains(needle), "`{needle}` not in: {err}");
        assert!(
            same_state(&opt.state_to_bytes().unwrap(), &good),
            "state changed by a refused load"
        );
    };
    // A flipped bit in the data and a truncated file are refused (sage-checkpoint's own tests
    // flip every bit).
    let mut flipped = later.clone();
    let at = later.len() - 3;
    flipped[at] ^= 0x10;
    expect_refusal(&mut opt, &flipped, ConfigCheck::Exact, "");
    expect_refusal(&mut opt, &later[..later.len() / 2], ConfigCheck::Exact, "");
    // Another configuration: refused under Exact, accepted under StateCompatible.
    let mut lr = SageOptimizer::with_backend(
        Cpu,
        ov.clone(),
        SageParams::new(
            Config {
                lr: 1e-3,
                ..config()
            },
            rules(),
        ),
    )
    .unwrap();
    let other_lr = lr.state_to_bytes().unwrap();
    expect_refusal(&mut opt, &other_lr, ConfigCheck::Exact, "lr");
    // bf16 state in the file, f32 here: refused by name.
    let mut b16 = SageParams::new(config(), rules());
    b16.state = sage_core::DType::Bf16;
    let mut bf = SageOptimizer::with_backend(Cpu, ov.clone(), b16).unwrap();
    expect_refusal(
        &mut opt,
        &bf.state_to_bytes().unwrap(),
        ConfigCheck::Exact,
        "bf16",
    );
    // A file with one more parameter than this optimizer (extra keys are not ignored).
    let fewer: Vec<(String, Var)> = vs[..5].to_vec();
    let mut small =
        SageOptimizer::with_backend(Cpu, fewer, SageParams::new(config(), rules())).unwrap();
    let err = small
        .load_state_bytes(&later, ConfigCheck::Exact)
        .unwrap_err()
        .to_string();
    assert!(err.contains("norm.weight"), "{err}");
    // Other groups: refused naming the parameter.
    let swapped = rules().rule("a.bias", 0);
    let mut g = SageOptimizer::with_backend(
        Cpu,
        vars(3),
        SageParams::new(
            config(),
            GroupRules::new(swapped.groups().to_vec(), 2).rule("a.*", 0),
        ),
    )
    .unwrap();
    assert!(g.load_state_bytes(&later, ConfigCheck::Exact).is_err());
    // The good file still loads, and then the later one does too.
    lr.load_state_bytes(&later, ConfigCheck::StateCompatible)
        .unwrap();
    assert_eq!(lr.steps(), 4);
    opt.load_state_bytes(&later, ConfigCheck::Exact).unwrap();
    assert_eq!(opt.steps(), 4);
    assert_eq!(Checkpoint::parse(&good).unwrap().step(), 3);
    assert!(Checkpoint::parse(&good)
        .unwrap()
        .param("a.weight")
        .unwrap()
        .has(Buffer::Ibar));
}
