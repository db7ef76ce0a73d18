//! Save/load on the CPU backend: bit-exact resume, and every kind of bad file refused with an
//! error that names the tensor or field and the reason.

use std::collections::HashMap;

use safetensors::tensor::TensorView;
use safetensors::SafeTensors;
use sage_checkpoint::{
    load, save_optimizer, Buffer, Checkpoint, CheckpointError, ConfigCheck, Entry, EntryMut,
};
use sage_core::{bf16, Algorithm, Config, Optimizer, ParamGroup, ParamTensor, Schedule};
use sage_cpu::Cpu;

const NAMES: [&str; 3] = ["enc.weight", "enc.bias", "head.weight"];
const SHAPES: [&[usize]; 3] = [&[3, 4], &[4], &[5]];
const GROUP: [usize; 3] = [0, 1, 0];

fn config() -> Config {
    Config::reference(Algorithm::adamw(), 2e-3)
        .beta0(0.75)
        .schedule(Schedule::WarmupLinearPpb {
            warmup: 0.1,
            t_total: 50,
        })
        .global_clip(1.0)
}

fn groups() -> Vec<ParamGroup> {
    vec![ParamGroup::sage().weight_decay(0.01), ParamGroup::plain()]
}

/// Parameters and state of the three tensors, `[m, v, ibar]` (ibar empty where SAGE is off).
#[derive(Clone, Debug, PartialEq)]
struct Model {
    params: Vec<Vec<f32>>,
    state: Vec<[Vec<f32>; 3]>,
}

impl Model {
    fn new() -> Self {
        let params = SHAPES
            .iter()
            .enumerate()
            .map(|(t, s)| {
                let n: usize = s.iter().product();
                (0..n)
                    .map(|i| ((i * 7 + t * 3) % 11) as f32 * 0.1 - 0.5)
                    .collect()
            })
            .collect::<Vec<Vec<f32>>>();
        let state = params
            .iter()
            .enumerate()
            .map(|(t, p)| {
                let ib = if GROUP[t] == 0 { p.len() } else { 0 };
                [vec![0.0; p.len()], vec![0.0; p.len()], vec![0.0; ib]]
            })
            .collect();
        Model { params, state }
    }

    fn step(&mut self, opt: &mut Optimizer<Cpu, Vec<ParamGroup>>, t: usize) {
        let grads: Vec<Vec<f32>> = self
            .params
            .iter()
            .enumerate()
            .map(|(k, p)| {
                p.iter()
                    .enumerate()
                    .map(|(i, x)| x * 0.3 + (((i + k + t) % 5) as f32 - 2.0) * 0.01)
                    .collect()
            })
            .collect();
        let mut tensors: Vec<ParamTensor<'_, Cpu, f32, f32>> = Vec::new();
        for (k, ((p, st), g)) in self
            .params
            .iter_mut()
            .zip(self.state.iter_mut())
            .zip(&grads)
            .enumerate()
        {
            let [m, v, ib] = st;
            tensors.push(
                ParamTensor::new(&mut p[..], &g[..])
                    .name(NAMES[k])
                    .group(GROUP[k])
                    .state(
                        Some(&mut m[..]),
                        Some(&mut v[..]),
                        (GROUP[k] == 0).then_some(&mut ib[..]),
                    ),
            );
        }
        assert!(opt.step(&mut tensors).unwrap().applied());
    }

    fn entries(&self) -> Vec<Entry<'_, Cpu, f32, f32>> {
        (0..3)
            .map(|k| {
                let [m, v, ib] = &self.state[k];
                Entry::new(NAMES[k])
                    .group(GROUP[k])
                    .shape(SHAPES[k])
                    .param(&self.params[k][..])
                    .state(
                        Some(&m[..]),
                        Some(&v[..]),
                        (GROUP[k] == 0).then_some(&ib[..]),
                    )
            })
            .collect()
    }

    fn entries_mut(&mut self) -> Vec<EntryMut<'_, Cpu, f32, f32>> {
        self.params
            .iter_mut()
            .zip(self.state.iter_mut())
            .enumerate()
            .map(|(k, (p, [m, v, ib]))| {
                EntryMut::new(NAMES[k])
                    .group(GROUP[k])
                    .shape(SHAPES[k])
                    .param(&mut p[..])
                    .state(
                        Some(&mut m[..]),
                        Some(&mut v[..]),
                        (GROUP[k] == 0).then_some(&mut ib[..]),
                    )
            })
            .collect()
    }
}

fn optimizer() -> Optimizer<Cpu, Vec<ParamGroup>> {
    Optimizer::new(Cpu, config(), groups()).unwrap()
}

/// A model trained for 3 steps and its checkpoint.
fn saved() -> (Model, Vec<u8>) {
    let mut model = Model::new();
    let mut opt = optimizer();
    for t in 0..3 {
        model.step(&mut opt, t);
    }
    let bytes = save_optimizer(&mut opt, &model.entries()).unwrap();
    (model, bytes)
}

fn load_fresh(bytes: &[u8]) -> Result<(Model, Optimizer<Cpu, Vec<ParamGroup>>), CheckpointError> {
    let mut model = Model::new();
    let mut opt = optimizer();
    load(
        &mut opt,
        bytes,
        &mut model.entries_mut(),
        ConfigCheck::Exact,
    )?;
    Ok((model, opt))
}

fn tensor_err(e: CheckpointError) -> (String, String) {
    match e {
        CheckpointError::Tensor { tensor, reason } => (tensor, reason),
        other => panic!("expected a tensor error, got {other:?}"),
    }
}

#[test]
fn resume_on_cpu_is_bit_exact() {
    let mut whole = Model::new();
    let mut o1 = optimizer();
    for t in 0..8 {
        whole.step(&mut o1, t);
    }
    let (_, bytes) = saved();
    let (mut resumed, mut o2) = load_fresh(&bytes).unwrap();
    assert_eq!(o2.steps(), 3);
    for t in 3..8 {
        resumed.step(&mut o2, t);
    }
    // Bit for bit: compare the bit patterns, not the values with a tolerance.
    let bits = |m: &Model| -> Vec<u32> {
        m.params
            .iter()
            .flatten()
            .chain(m.state.iter().flat_map(|s| s.iter().flatten()))
            .map(|x| x.to_bits())
            .collect()
    };
    assert_eq!(bits(&resumed), bits(&whole));
    assert_eq!(o2.steps(), o1.steps());
}

#[test]
fn parse_reports_contents() {
    let (model, bytes) = saved();
    let c = Checkpoint::parse(&bytes).unwrap();
    assert_eq!(c.step(), 3);
    assert_eq!(*c.config(), config());
    assert_eq!(c.groups(), groups().as_slice());
    assert_eq!(c.params().len(), 3);
    let head = c.param("head.weight").unwrap();
    assert_eq!(head.shape, vec![5]);
    assert!(head.buffers.contains(&Buffer::Ibar));
    assert!(!c.param("enc.bias").unwrap().buffers.contains(&Buffer::Ibar));
    assert_eq!(
        c.read::<f32>("head.weight", Buffer::Ibar).unwrap(),
        model.state[2][2]
    );
    assert_eq!(
        c.read_f32("enc.weight", Buffer::Param).unwrap(),
        model.params[0]
    );
    // The file reads as plain safetensors with the same names sage-candle uses.
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let mut names = st.names();
    names.sort();
    assert_eq!(
        names,
        [
            "enc.bias",
            "enc.bias.m",
            "enc.bias.v",
            "enc.weight",
            "enc.weight.ibar",
            "enc.weight.m",
            "enc.weight.v",
            "head.weight",
            "head.weight.ibar",
            "head.weight.m",
            "head.weight.v"
        ]
    );
}

#[test]
fn every_truncation_is_an_error() {
    let (_, bytes) = saved();
    for n in 0..bytes.len() {
        match Checkpoint::parse(&bytes[..n]) {
            Ok(_) => panic!("a file truncated to {n} of {} bytes parsed", bytes.len()),
            Err(e) => assert!(!e.to_string().is_empty()),
        }
    }
    // Loading a truncated file leaves the buffers alone.
    let mut model = Model::new();
    let before = model.clone();
    let mut opt = optimizer();
    let e = load(
        &mut opt,
        &bytes[..bytes.len() - 3],
        &mut model.entries_mut(),
        ConfigCheck::Exact,
    )
    .unwrap_err();
    assert!(matches!(e, CheckpointError::Corrupt { .. }), "{e}");
    assert_eq!(model, before);
    assert_eq!(opt.steps(), 0);
}

#[test]
fn every_bit_flip_is_an_error() {
    let (_, bytes) = saved();
    let mut data_flips = 0;
    let data_start = 8 + u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    for i in 0..bytes.len() {
        for bit in 0..8 {
            let mut b = bytes.clone();
            b[i] ^= 1 << bit;
            let e = match Checkpoint::parse(&b) {
                Ok(_) => panic!("flipping bit {bit} of byte {i} went unnoticed"),
                Err(e) => e,
            };
            if i >= data_start {
                // A flip in tensor data is caught by that tensor's checksum, which names it.
                match e {
                    CheckpointError::Checksum { tensor } => {
                        assert!(NAMES.iter().any(|n| tensor.starts_with(n)), "{tensor}");
                        data_flips += 1;
                    }
                    other => panic!("data flip at {i}: {other}"),
                }
            }
        }
    }
    assert!(data_flips > 0);
}

#[test]
fn a_flipped_value_names_its_tensor() {
    let (_, mut bytes) = saved();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let (_, header) = SafeTensors::read_metadata(&bytes).unwrap();
    let info = header.info("head.weight.ibar").unwrap();
    let at = bytes.len()
        - st.tensors()
            .iter()
            .map(|(_, v)| v.data().len())
            .sum::<usize>()
        + info.data_offsets.0
        + 5;
    bytes[at] ^= 0x10;
    let e = load_fresh(&bytes).err().unwrap();
    assert_eq!(
        e,
        CheckpointError::Checksum {
            tensor: "head.weight.ibar".into()
        }
    );
    assert!(e.to_string().contains("head.weight.ibar"), "{e}");
    assert!(e.to_string().contains("checksum"), "{e}");
}

/// Rewrites a checkpoint's metadata (the checksum is not updated unless `fix_sum`).
fn rewrite(bytes: &[u8], edit: impl FnOnce(&mut HashMap<String, String>)) -> Vec<u8> {
    let st = SafeTensors::deserialize(bytes).unwrap();
    let (_, header) = SafeTensors::read_metadata(bytes).unwrap();
    let mut meta = header.metadata().clone().unwrap();
    edit(&mut meta);
    let views: Vec<(String, TensorView<'_>)> = st.tensors();
    safetensors::serialize(views, Some(meta)).unwrap()
}

#[test]
fn version_mismatch_is_refused() {
    let (_, bytes) = saved();
    let b = rewrite(&bytes, |m| {
        m.insert("sage.version".into(), "2".into());
    });
    let e = load_fresh(&b).err().unwrap();
    assert_eq!(
        e,
        CheckpointError::Version {
            found: "2".into(),
            supported: 1
        }
    );
    assert!(e.to_string().contains("version 2"), "{e}");
}

#[test]
fn edited_metadata_fails_the_header_checksum() {
    let (_, bytes) = saved();
    let b = rewrite(&bytes, |m| {
        m.insert("sage.step".into(), "4".into());
    });
    assert_eq!(
        load_fresh(&b).err().unwrap(),
        CheckpointError::Checksum {
            tensor: "header".into()
        }
    );
}

#[test]
fn not_a_sage_checkpoint() {
    let (_, bytes) = saved();
    let b = rewrite(&bytes, |m| {
        m.remove("sage.format");
    });
    let e = load_fresh(&b).err().unwrap();
    assert!(
        matches!(&e, CheckpointError::Format { what, .. } if what == "sage.format"),
        "{e}"
    );
}

#[test]
fn config_mismatch_names_the_field() {
    let (_, bytes) = saved();
    let mut model = Model::new();
    let mut opt = Optimizer::new(Cpu, config().beta0(0.8), groups()).unwrap();
    let e = load(
        &mut opt,
        &bytes,
        &mut model.entries_mut(),
        ConfigCheck::Exact,
    )
    .unwrap_err();
    assert_eq!(
        e,
        CheckpointError::Config {
            field: "config.beta0".into(),
            file: "0.75".into(),
            expected: "0.8".into()
        }
    );
    assert!(e.to_string().contains("config.beta0"), "{e}");
    assert_eq!(model, Model::new(), "nothing written");

    let gs = vec![ParamGroup::sage().weight_decay(0.02), ParamGroup::plain()];
    let mut opt = Optimizer::new(Cpu, config(), gs.clone()).unwrap();
    let e = load(
        &mut opt,
        &bytes,
        &mut model.entries_mut(),
        ConfigCheck::Exact,
    )
    .unwrap_err();
    assert!(
        matches!(&e, CheckpointError::Config { field, .. } if field == "group.0.weight_decay"),
        "{e}"
    );
    // A new rate or decay keeps the state layout: allowed when asked for.
    let mut opt = Optimizer::new(Cpu, config().beta0(0.8), gs).unwrap();
    load(
        &mut opt,
        &bytes,
        &mut model.entries_mut(),
        ConfigCheck::StateCompatible,
    )
    .unwrap();
    assert_eq!(opt.steps(), 3);
    // Another algorithm with the same buffers (Adamax's `u` in Adam's `v` slot) never is.
    let mut opt =
        Optimizer::new(Cpu, Config::reference(Algorithm::adamax(), 2e-3), groups()).unwrap();
    let e = load(
        &mut opt,
        &bytes,
        &mut Model::new().entries_mut(),
        ConfigCheck::StateCompatible,
    )
    .unwrap_err();
    assert!(
        matches!(&e, CheckpointError::Config { field, .. } if field == "config.algorithm"),
        "{e}"
    );
    // Nor is a layout change.
    let mut opt = Optimizer::new(Cpu, config(), vec![ParamGroup::sage(); 2]).unwrap();
    let e = load(
        &mut opt,
        &bytes,
        &mut Model::new().entries_mut(),
        ConfigCheck::StateCompatible,
    )
    .unwrap_err();
    assert!(matches!(e, CheckpointError::Config { .. }), "{e}");
}

#[test]
fn name_mismatch_is_refused() {
    let (_, bytes) = saved();
    let mut model = Model::new();
    let mut opt = optimizer();
    let mut entries = model.entries_mut();
    entries[2].name = "head.kernel";
    let (t, why) =
        tensor_err(load(&mut opt, &bytes, &mut entries, ConfigCheck::Exact).unwrap_err());
    assert_eq!(t, "head.kernel");
    assert!(why.contains("not in the checkpoint"), "{why}");
    drop(entries);
    assert_eq!(model, Model::new());

    // A parameter of the file left out: no partial load.
    let mut model = Model::new();
    let mut entries = model.entries_mut();
    entries.pop();
    let (t, why) =
        tensor_err(load(&mut opt, &bytes, &mut entries, ConfigCheck::Exact).unwrap_err());
    assert_eq!(t, "head.weight");
    assert!(why.contains("partial load"), "{why}");
    assert_eq!(opt.steps(), 0);
}

#[test]
fn shape_and_length_mismatch_is_refused() {
    let (_, bytes) = saved();
    let mut model = Model::new();
    let mut opt = optimizer();
    let mut entries = model.entries_mut();
    entries[0].shape = Some(&[4, 3]);
    let (t, why) =
        tensor_err(load(&mut opt, &bytes, &mut entries, ConfigCheck::Exact).unwrap_err());
    assert_eq!(t, "enc.weight");
    assert!(why.contains("[3, 4]") && why.contains("[4, 3]"), "{why}");

    // Buffers of the wrong length (shape unchecked).
    let mut short = [0f32; 4];
    let mut entries = model.entries_mut();
    entries[2].shape = None;
    entries[2].state[0] = Some(&mut short[..]);
    let (t, why) =
        tensor_err(load(&mut opt, &bytes, &mut entries, ConfigCheck::Exact).unwrap_err());
    assert_eq!(t, "head.weight.m");
    assert!(why.contains("5 elements") && why.contains("has 4"), "{why}");
}

#[test]
fn dtype_mismatch_is_refused() {
    let (model, bytes) = saved();
    // Same layout, bf16 state buffers: the f32 checkpoint does not silently convert.
    let mut m16: Vec<[Vec<bf16>; 3]> = model
        .state
        .iter()
        .map(|s| s.clone().map(|b| vec![bf16::ZERO; b.len()]))
        .collect();
    let mut entries: Vec<EntryMut<'_, Cpu, bf16, bf16>> = m16
        .iter_mut()
        .enumerate()
        .map(|(k, [m, v, ib])| {
            EntryMut::new(NAMES[k]).group(GROUP[k]).state(
                Some(&mut m[..]),
                Some(&mut v[..]),
                (GROUP[k] == 0).then_some(&mut ib[..]),
            )
        })
        .collect();
    let mut opt = optimizer();
    let (t, why) =
        tensor_err(load(&mut opt, &bytes, &mut entries, ConfigCheck::Exact).unwrap_err());
    assert_eq!(t, "enc.weight.m");
    assert!(
        why.contains("stored as f32") && why.contains("bf16"),
        "{why}"
    );
}

#[test]
fn group_and_buffer_mismatch_is_refused() {
    let (_, bytes) = saved();
    let mut model = Model::new();
    let mut opt = optimizer();
    let mut entries = model.entries_mut();
    entries[1].group = 0;
    let (t, why) =
        tensor_err(load(&mut opt, &bytes, &mut entries, ConfigCheck::Exact).unwrap_err());
    assert_eq!(t, "enc.bias");
    assert!(why.contains("group 1 in the checkpoint"), "{why}");

    let mut entries = model.entries_mut();
    entries[0].state[2] = None;
    let (t, why) =
        tensor_err(load(&mut opt, &bytes, &mut entries, ConfigCheck::Exact).unwrap_err());
    assert_eq!(t, "enc.weight.ibar");
    assert!(why.contains("no buffer was given"), "{why}");
}

#[test]
fn save_refuses_inconsistent_entries() {
    let model = Model::new();
    let mut opt = optimizer();
    let mut e = model.entries();
    e[0].state[2] = None;
    let (t, why) = tensor_err(save_optimizer(&mut opt, &e).unwrap_err());
    assert_eq!(t, "enc.weight");
    assert!(why.contains("`ibar`"), "{why}");

    let mut e = model.entries();
    e[1].name = "enc.weight";
    let (t, why) = tensor_err(save_optimizer(&mut opt, &e).unwrap_err());
    assert_eq!(
        (t.as_str(), why.as_str()),
        ("enc.weight", "name given twice")
    );

    let mut e = model.entries();
    e[0].shape = Some(&[2, 2]);
    let (t, _) = tensor_err(save_optimizer(&mut opt, &e).unwrap_err());
    assert_eq!(t, "enc.weight");

    // `a` + `.m` would collide with a parameter named `a.m`.
    let (p, m, v) = (vec![0f32; 2], vec![0f32; 2], vec![0f32; 2]);
    let e: Vec<Entry<'_, Cpu, f32, f32>> = vec![
        Entry::new("a").group(1).param(&p[..]).m(&m[..]).v(&v[..]),
        Entry::new("a.m").group(1).param(&p[..]).m(&m[..]).v(&v[..]),
    ];
    let (t, why) = tensor_err(save_optimizer(&mut opt, &e).unwrap_err());
    assert_eq!(t, "a.m");
    assert!(why.contains("taken"), "{why}");
}

#[test]
fn every_config_round_trips_exactly() {
    let schedules = [
        Schedule::Constant,
        Schedule::WarmupLinearPpb {
            warmup: 0.1,
            t_total: 1000,
        },
        Schedule::LinearWarmupDecay {
            warmup_steps: 3,
            total_steps: 77,
        },
        Schedule::CosineWarmup {
            warmup_steps: 0,
            total_steps: 9,
            cycles: 0.5,
        },
        Schedule::InverseSqrt {
            warmup_steps: 4000,
            init_factor: 1e-7 / 3.0,
        },
    ];
    let algos = [
        Algorithm::Sgd {
            momentum: 0.9,
            dampening: 0.1,
            nesterov: false,
        },
        Algorithm::sgd(0.0),
        Algorithm::Adam {
            beta1: 0.1 + 0.2,
            beta2: 0.98,
        },
        Algorithm::adamw(),
        Algorithm::adamax(),
    ];
    for (i, a) in algos.into_iter().enumerate() {
        for (j, s) in schedules.into_iter().enumerate() {
            let base = if (i + j) % 2 == 0 {
                Config::paper(a, 1.0 / 3.0)
            } else {
                Config::reference(a, 2e-5)
            };
            let mut cfg = base.schedule(s).eps(1e-8 * (1.0 + j as f64 / 7.0));
            if j % 2 == 1 {
                cfg = cfg.per_tensor_clip(0.7).global_clip(1.0 / 7.0);
            }
            let gs = vec![ParamGroup::sage().lr_scale(1.0 / 3.0), ParamGroup::plain()];
            let mut opt = Optimizer::new(Cpu, cfg, gs.clone()).unwrap();
            opt.set_steps(u64::MAX - (i as u64));
            let bytes = save_optimizer::<_, _, f32, f32>(&mut opt, &[]).unwrap();
            let c = Checkpoint::parse(&bytes).unwrap();
            assert_eq!(*c.config(), cfg);
            assert_eq!(c.groups(), gs.as_slice());
            assert_eq!(c.step(), u64::MAX - i as u64);
        }
    }
}

#[test]
fn garbage_is_an_error() {
    for b in [
        &b""[..],
        b"\xff\xff\xff\xff\xff\xff\xff\xff{}",
        b"\x02\x00\x00\x00\x00\x00\x00\x00{}",
        b"\x08\x00\x00\x00\x00\x00\x00\x00{}      ",
    ] {
        assert!(Checkpoint::parse(b).is_err());
    }
    let e = Checkpoint::parse(b"\x08\x00\x00\x00\x00\x00\x00\x00{}      ").unwrap_err();
    assert!(
        matches!(&e, CheckpointError::Format { what, .. } if what == "__metadata__"),
        "{e}"
    );
}
