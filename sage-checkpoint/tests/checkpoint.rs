//! Save/load on the CPU backend: bit-exact resume with per-tensor step counts, version-1
//! files, mixed storage types, and every kind of bad file refused with an error that names
//! the tensor or field and the reason.

use std::collections::{BTreeMap, HashMap};

use safetensors::tensor::TensorView;
use safetensors::SafeTensors;
use sage_checkpoint::format::{config_pairs, Fnv64};
use sage_checkpoint::{
    load, save, save_optimizer, Checkpoint, CheckpointError, ConfigCheck, Entry, EntryMut, Slot,
    FORMAT_VERSION,
};
use sage_core::{
    bf16, Accumulate, Algorithm, ApplyArgs, Backend, BackendError, Buffer, Coeffs, Config,
    DecayMode, Element, ErrorKind, HostBuffers, Optimizer, ParamGroup, ParamTensor, Schedule,
    ScheduleCount, TensorState,
};
use sage_cpu::Cpu;

const NAMES: [&str; 3] = ["enc.weight", "enc.bias", "head.weight"];
const SHAPES: [&[usize]; 3] = [&[3, 4], &[4], &[5]];
const GROUP: [usize; 3] = [0, 1, 0];

/// Written by the version-1 code (sage-checkpoint at 9204f08): this test's model, every tensor
/// stepped at each of 3 steps, saved with θ.
const V1_FIXTURE: &[u8] = include_bytes!("fixtures/v1-adamw-3steps.safetensors");

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

/// `enc.bias` gets no gradient at steps 1 and 5 (0-based): its count falls behind.
fn sometimes(t: usize, k: usize) -> bool {
    !(k == 1 && (t == 1 || t == 5))
}

fn always(_: usize, _: usize) -> bool {
    true
}

/// Parameters and each tensor's state (ibar only where SAGE is on).
#[derive(Clone, Debug, PartialEq)]
struct Model {
    params: Vec<Vec<f32>>,
    state: Vec<TensorState<Vec<f32>>>,
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
                TensorState::new(config().state_layout(GROUP[t] == 0), || vec![0.0; p.len()])
            })
            .collect();
        Model { params, state }
    }

    fn step<G: AsRef<[ParamGroup]>>(
        &mut self,
        opt: &mut Optimizer<Cpu, G>,
        t: usize,
        present: fn(usize, usize) -> bool,
    ) {
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
            if present(t, k) {
                tensors.push(
                    ParamTensor::new(&mut p[..], &g[..], st.view())
                        .name(NAMES[k])
                        .group(GROUP[k]),
                );
            }
        }
        assert!(opt.step(&mut tensors).unwrap().applied());
    }

    fn entries(&self) -> Vec<Entry<'_, Cpu, f32, f32>> {
        (0..3)
            .map(|k| {
                Entry::new(NAMES[k], &self.state[k])
                    .group(GROUP[k])
                    .shape(SHAPES[k])
                    .param(&self.params[k][..])
            })
            .collect()
    }

    fn entries_mut(&mut self) -> Vec<EntryMut<'_, Cpu, f32, f32>> {
        self.params
            .iter_mut()
            .zip(self.state.iter_mut())
            .enumerate()
            .map(|(k, (p, st))| {
                EntryMut::new(NAMES[k], st.view())
                    .group(GROUP[k])
                    .shape(SHAPES[k])
                    .param(&mut p[..])
            })
            .collect()
    }

    fn steps(&self) -> Vec<u64> {
        self.state.iter().map(|s| s.step).collect()
    }

    /// Bit patterns of every value, and the counts: equal means bit for bit.
    fn bits(&self) -> (Vec<u32>, Vec<u64>) {
        let vals = self
            .params
            .iter()
            .flatten()
            .chain(
                self.state
                    .iter()
                    .flat_map(|s| Buffer::ALL.into_iter().filter_map(|b| s.get(b)).flatten()),
            )
            .map(|x| x.to_bits())
            .collect();
        (vals, self.steps())
    }
}

fn optimizer() -> Optimizer<Cpu, Vec<ParamGroup>> {
    Optimizer::new(Cpu, config(), groups()).unwrap()
}

/// A model trained for 3 steps (`enc.bias` absent from one) and its checkpoint.
fn saved() -> (Model, Vec<u8>) {
    let mut model = Model::new();
    let mut opt = optimizer();
    for t in 0..3 {
        model.step(&mut opt, t, sometimes);
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
fn resume_with_per_tensor_counts_is_bit_exact() {
    let mut whole = Model::new();
    let mut o1 = optimizer();
    for t in 0..8 {
        whole.step(&mut o1, t, sometimes);
    }
    assert_eq!(whole.steps(), [8, 6, 8]);
    let (model, bytes) = saved();
    assert_eq!(model.steps(), [3, 2, 3]);
    let (mut resumed, mut o2) = load_fresh(&bytes).unwrap();
    assert_eq!(o2.steps(), 3);
    assert_eq!(resumed, model);
    for t in 3..8 {
        resumed.step(&mut o2, t, sometimes);
    }
    assert_eq!(resumed.bits(), whole.bits());
    assert_eq!(o2.steps(), o1.steps());
}

#[test]
fn parse_reports_contents() {
    let (model, bytes) = saved();
    let c = Checkpoint::parse(&bytes).unwrap();
    assert_eq!((c.version(), FORMAT_VERSION), (2, 2));
    assert_eq!(c.step(), 3);
    assert_eq!(*c.config(), config());
    assert_eq!(c.groups(), groups().as_slice());
    assert_eq!(c.params().len(), 3);
    let head = c.param("head.weight").unwrap();
    assert_eq!(
        (head.shape.as_slice(), head.len, head.step),
        (&[5][..], 5, 3)
    );
    assert_eq!(head.layout, config().state_layout(true));
    assert!(head.has(Buffer::Ibar) && head.has(Slot::Param));
    let bias = c.param("enc.bias").unwrap();
    assert_eq!(bias.step, 2, "the bias missed a step");
    assert!(!bias.has(Buffer::Ibar));
    assert_eq!(
        (bias.state_dtype, bias.param_dtype),
        (Some(sage_core::DType::F32), Some(sage_core::DType::F32))
    );
    assert_eq!(
        c.read::<f32>("head.weight", Buffer::Ibar).unwrap(),
        *model.state[2].ibar.as_ref().unwrap()
    );
    assert_eq!(
        c.read_f32("enc.weight", Slot::Param).unwrap(),
        model.params[0]
    );
    // The whole state of a tensor, on the host or uploaded to a backend.
    assert_eq!(c.state::<f32>("enc.bias").unwrap(), model.state[1]);
    assert_eq!(
        c.upload_state::<_, f32>(&mut Cpu, "enc.weight").unwrap(),
        model.state[0]
    );
    assert_eq!(
        c.upload::<_, f32>(&mut Cpu, "enc.weight", Slot::Param)
            .unwrap(),
        model.params[0]
    );
    let (t, why) = tensor_err(c.read::<bf16>("enc.weight", Buffer::M).unwrap_err());
    assert_eq!(t, "enc.weight.m");
    assert!(why.contains("stored as f32"), "{why}");
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
    // Loading a truncated file leaves the buffers and counts alone.
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

/// Rewrites a checkpoint's metadata; the header checksum is not updated.
fn rewrite(bytes: &[u8], edit: impl FnOnce(&mut HashMap<String, String>)) -> Vec<u8> {
    let st = SafeTensors::deserialize(bytes).unwrap();
    let (_, header) = SafeTensors::read_metadata(bytes).unwrap();
    let mut meta = header.metadata().clone().unwrap();
    edit(&mut meta);
    let views: Vec<(String, TensorView<'_>)> = st.tensors();
    safetensors::serialize(views, Some(meta)).unwrap()
}

/// Rewrites a checkpoint's metadata and recomputes `sage.checksum` the way the format
/// defines it (FNV-1a over every other metadata entry, then every tensor's key, dtype and
/// shape, all sorted): a well-formed file with the edited contents. Written out here so the
/// test also pins the checksum's definition.
fn reseal(bytes: &[u8], edit: impl FnOnce(&mut HashMap<String, String>)) -> Vec<u8> {
    let st = SafeTensors::deserialize(bytes).unwrap();
    let (_, header) = SafeTensors::read_metadata(bytes).unwrap();
    let mut meta = header.metadata().clone().unwrap();
    edit(&mut meta);
    let sorted: BTreeMap<&String, &String> = meta.iter().collect();
    let mut h = Fnv64::default();
    for (k, v) in sorted.iter().filter(|(k, _)| k.as_str() != "sage.checksum") {
        h.write(k.as_bytes());
        h.write(&[0xff]);
        h.write(v.as_bytes());
        h.write(&[0xff]);
    }
    let mut ts = st.tensors();
    ts.sort_by(|a, b| a.0.cmp(&b.0));
    for (k, v) in &ts {
        h.write(k.as_bytes());
        h.write(&[0xff]);
        h.write(v.dtype().to_string().as_bytes());
        h.write(&[0xff]);
        for &s in v.shape() {
            h.write(&(s as u64).to_le_bytes());
        }
        h.write(&[0xfe]);
    }
    meta.insert("sage.checksum".into(), format!("{:016x}", h.finish()));
    safetensors::serialize(ts, Some(meta)).unwrap()
}

/// Edits the JSON index of a checkpoint (then reseals it).
fn edit_index(bytes: &[u8], edit: impl FnOnce(&mut Vec<serde_json::Value>)) -> Vec<u8> {
    reseal(bytes, |m| {
        let mut index: Vec<serde_json::Value> = serde_json::from_str(&m["sage.params"]).unwrap();
        edit(&mut index);
        m.insert("sage.params".into(), serde_json::to_string(&index).unwrap());
    })
}

#[test]
fn reseal_reproduces_the_checksum() {
    let (_, bytes) = saved();
    let again = reseal(&bytes, |_| {});
    assert_eq!(Checkpoint::parse(&again).unwrap().step(), 3);
}

#[test]
fn version_mismatch_is_refused() {
    let (_, bytes) = saved();
    for v in ["3", "0", "two"] {
        let b = rewrite(&bytes, |m| {
            m.insert("sage.version".into(), v.into());
        });
        let e = load_fresh(&b).err().unwrap();
        assert_eq!(
            e,
            CheckpointError::Version {
                found: v.into(),
                supported: 2
            }
        );
        assert!(e.to_string().contains(&format!("version {v}")), "{e}");
        assert!(e.to_string().contains("versions 1 to 2"), "{e}");
    }
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
fn a_step_count_that_cannot_advance_is_refused_naming_the_tensor() {
    let (_, bytes) = saved();
    let b = edit_index(&bytes, |ix| ix[2]["step"] = serde_json::json!(u64::MAX));
    let mut model = Model::new();
    let mut opt = optimizer();
    let (t, why) =
        tensor_err(load(&mut opt, &b, &mut model.entries_mut(), ConfigCheck::Exact).unwrap_err());
    assert_eq!(t, "head.weight");
    assert!(
        why.contains("18446744073709551615") && why.contains("cannot advance"),
        "{why}"
    );
    assert_eq!(model, Model::new(), "nothing written");
    assert_eq!(opt.steps(), 0);
    // One below is fine: the tensor can still take a step.
    let b = edit_index(&bytes, |ix| ix[2]["step"] = serde_json::json!(u64::MAX - 1));
    let (m, _) = load_fresh(&b).unwrap();
    assert_eq!(m.state[2].step, u64::MAX - 1);
    // The optimizer's own count.
    let b = reseal(&bytes, |m| {
        m.insert("sage.step".into(), u64::MAX.to_string());
    });
    let e = load_fresh(&b).err().unwrap();
    assert!(
        matches!(&e, CheckpointError::Format { what, .. } if what == "sage.step"),
        "{e}"
    );
    // Nor does save write such a file.
    let mut model = Model::new();
    model.state[1].step = u64::MAX;
    let (t, why) = tensor_err(save_optimizer(&mut optimizer(), &model.entries()).unwrap_err());
    assert_eq!(t, "enc.bias");
    assert!(why.contains("cannot advance"), "{why}");
    let mut opt = optimizer();
    opt.set_steps(u64::MAX);
    let e = save_optimizer(&mut opt, &Model::new().entries()).unwrap_err();
    assert!(
        matches!(&e, CheckpointError::Format { what, .. } if what == "sage.step"),
        "{e}"
    );
}

#[test]
fn malformed_index_entries_are_refused() {
    let (_, bytes) = saved();
    // A version-2 index must give every tensor its count.
    let b = edit_index(&bytes, |ix| {
        ix[1].as_object_mut().unwrap().remove("step");
    });
    let (t, why) = tensor_err(load_fresh(&b).err().unwrap());
    assert_eq!(t, "enc.bias");
    assert!(why.contains("no step count"), "{why}");
    // Fields nobody reads are refused, not ignored.
    let b = edit_index(&bytes, |ix| ix[0]["steps"] = serde_json::json!(3));
    let e = load_fresh(&b).err().unwrap();
    assert!(
        matches!(&e, CheckpointError::Format { what, .. } if what == "sage.params"),
        "{e}"
    );
    let b = edit_index(&bytes, |ix| ix[0]["step"] = serde_json::json!(-1));
    assert!(load_fresh(&b).is_err());
    // A buffer the file's configuration does not give the tensor: sage-core's check.
    let b = edit_index(&bytes, |ix| {
        let bufs = ix[0]["buffers"].as_array_mut().unwrap();
        bufs.retain(|x| x["buffer"] != "ibar");
    });
    let (t, why) = tensor_err(Checkpoint::parse(&b).unwrap_err());
    assert_eq!(t, "enc.weight.ibar");
    assert!(
        why.contains("SAGE needs it") && why.contains("group 0"),
        "{why}"
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

    let mut other = config();
    other.schedule_count = ScheduleCount::Optimizer;
    let mut opt = Optimizer::new(Cpu, other, groups()).unwrap();
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
            field: "config.schedule_count".into(),
            file: "tensor".into(),
            expected: "optimizer".into()
        }
    );

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
    // A new rate, decay or schedule count keeps the state layout: allowed when asked for.
    let mut opt = Optimizer::new(Cpu, other.beta0(0.8), gs).unwrap();
    load(
        &mut opt,
        &bytes,
        &mut model.entries_mut(),
        ConfigCheck::StateCompatible,
    )
    .unwrap();
    assert_eq!(opt.steps(), 3);
    assert_eq!(model.steps(), [3, 2, 3]);
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

    // A state buffer of the wrong length (shape unchecked): sage-core's check names it.
    let mut short = [0f32; 4];
    let mut entries = model.entries_mut();
    entries[2].shape = None;
    entries[2].state.m = Some(&mut short[..]);
    let (t, why) =
        tensor_err(load(&mut opt, &bytes, &mut entries, ConfigCheck::Exact).unwrap_err());
    assert_eq!(t, "head.weight.m");
    assert!(
        why.contains("has 4 elements") && why.contains("has 5"),
        "{why}"
    );
}

#[test]
fn dtype_mismatch_is_refused() {
    let (_, bytes) = saved();
    // Same layout, bf16 state buffers: the f32 checkpoint does not silently convert.
    let mut m16: Vec<TensorState<Vec<bf16>>> = (0..3)
        .map(|k| {
            let n = SHAPES[k].iter().product();
            TensorState::new(config().state_layout(GROUP[k] == 0), || vec![bf16::ZERO; n])
        })
        .collect();
    let mut entries: Vec<EntryMut<'_, Cpu, bf16, bf16>> = m16
        .iter_mut()
        .enumerate()
        .map(|(k, st)| EntryMut::new(NAMES[k], st.view()).group(GROUP[k]))
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
    entries[0].state.ibar = None;
    let (t, why) =
        tensor_err(load(&mut opt, &bytes, &mut entries, ConfigCheck::Exact).unwrap_err());
    assert_eq!(t, "enc.weight.ibar");
    assert!(why.contains("missing") && why.contains("SAGE"), "{why}");

    let mut extra = [0f32; 4];
    let mut entries = model.entries_mut();
    entries[1].state.ibar = Some(&mut extra[..]);
    let (t, why) =
        tensor_err(load(&mut opt, &bytes, &mut entries, ConfigCheck::Exact).unwrap_err());
    assert_eq!(t, "enc.bias.ibar");
    assert!(why.contains("not used"), "{why}");
    drop(entries);
    assert_eq!(model, Model::new());
}

#[test]
fn save_refuses_inconsistent_entries() {
    let model = Model::new();
    let mut opt = optimizer();
    let mut e = model.entries();
    e[0].state.ibar = None;
    let (t, why) = tensor_err(save_optimizer(&mut opt, &e).unwrap_err());
    assert_eq!(t, "enc.weight.ibar");
    assert!(
        why.contains("missing") && why.contains("group 0 (AdamW-SAGE)"),
        "{why}"
    );

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

    let short = [0f32; 3];
    let mut e = model.entries();
    e[2].state.v = Some(&short[..]);
    let (t, why) = tensor_err(save_optimizer(&mut opt, &e).unwrap_err());
    assert_eq!(t, "head.weight.v");
    assert!(why.contains("has 3 elements"), "{why}");

    // `a` + `.m` would collide with a parameter named `a.m`.
    let p = [0f32; 2];
    let st = TensorState::new(config().state_layout(false), || vec![0f32; 2]);
    let e: Vec<Entry<'_, Cpu, f32, f32>> = vec![
        Entry::new("a", &st).group(1).param(&p[..]),
        Entry::new("a.m", &st).group(1).param(&p[..]),
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
            if j % 3 == 0 {
                cfg.schedule_count = match cfg.schedule_count {
                    ScheduleCount::Tensor => ScheduleCount::Optimizer,
                    ScheduleCount::Optimizer => ScheduleCount::Tensor,
                };
            }
            let gs = vec![ParamGroup::sage().lr_scale(1.0 / 3.0), ParamGroup::plain()];
            let mut opt = Optimizer::new(Cpu, cfg, gs.clone()).unwrap();
            opt.set_steps(u64::MAX - 1 - (i as u64));
            let bytes = save_optimizer(&mut opt, &()).unwrap();
            let c = Checkpoint::parse(&bytes).unwrap();
            assert_eq!(*c.config(), cfg);
            assert_eq!(c.groups(), gs.as_slice());
            assert_eq!(c.step(), u64::MAX - 1 - i as u64);
        }
    }
}

/// Every field sage-core's `Config::validate` can refuse is named by its checkpoint key:
/// `config.` + the `ConfigError` field (`config.beta0`, `config.betas.1`, ...).
#[test]
fn config_error_fields_are_checkpoint_keys() {
    let adam = Config::paper(Algorithm::adam(), 1e-3);
    let sgd = Config::paper(Algorithm::sgd(0.9), 1e-3);
    let warm = adam.schedule(Schedule::CosineWarmup {
        warmup_steps: 1,
        total_steps: 10,
        cycles: 0.5,
    });
    let inv = adam.schedule(Schedule::InverseSqrt {
        warmup_steps: 10,
        init_factor: 0.5,
    });
    let ppb = adam.schedule(Schedule::WarmupLinearPpb {
        warmup: 0.1,
        t_total: 10,
    });
    let mut bad: Vec<(Config, Config, &str)> = Vec::new();
    let mut push = |valid: Config, edit: &dyn Fn(&mut Config), field: &'static str| {
        let mut c = valid;
        edit(&mut c);
        bad.push((valid, c, field));
    };
    push(adam, &|c| c.lr = f64::NAN, "config.lr");
    push(adam, &|c| c.eps = 0.0, "config.eps");
    push(
        adam,
        &|c| {
            c.algorithm = Algorithm::Adam {
                beta1: 1.0,
                beta2: 0.9,
            }
        },
        "config.betas.0",
    );
    push(
        adam,
        &|c| {
            c.algorithm = Algorithm::Adam {
                beta1: 0.9,
                beta2: -0.1,
            }
        },
        "config.betas.1",
    );
    push(adam, &|c| c.sensitivity.beta0 = 1.0, "config.beta0");
    push(adam, &|c| c.sensitivity.eps_num = -1.0, "config.eps_num");
    push(adam, &|c| c.sensitivity.eps_den = 0.0, "config.eps_den");
    push(adam, &|c| c.decay = DecayMode::InStep, "config.decay");
    push(adam, &|c| c.global_clip = Some(0.0), "config.global_clip");
    push(
        adam,
        &|c| c.per_tensor_clip = Some(f64::INFINITY),
        "config.per_tensor_clip",
    );
    push(
        sgd,
        &|c| c.algorithm = Algorithm::sgd(1.5),
        "config.momentum",
    );
    push(
        sgd,
        &|c| {
            c.algorithm = Algorithm::Sgd {
                momentum: 0.9,
                dampening: 2.0,
                nesterov: false,
            }
        },
        "config.dampening",
    );
    push(
        sgd,
        &|c| {
            c.algorithm = Algorithm::Sgd {
                momentum: 0.0,
                dampening: 0.0,
                nesterov: true,
            }
        },
        "config.nesterov",
    );
    push(
        ppb,
        &|c| {
            c.schedule = Schedule::WarmupLinearPpb {
                warmup: 1.5,
                t_total: 10,
            }
        },
        "config.schedule.warmup",
    );
    push(
        ppb,
        &|c| {
            c.schedule = Schedule::WarmupLinearPpb {
                warmup: 0.1,
                t_total: 0,
            }
        },
        "config.schedule.t_total",
    );
    push(
        warm,
        &|c| {
            c.schedule = Schedule::CosineWarmup {
                warmup_steps: 1,
                total_steps: 10,
                cycles: 0.0,
            }
        },
        "config.schedule.cycles",
    );
    push(
        warm,
        &|c| {
            c.schedule = Schedule::CosineWarmup {
                warmup_steps: 11,
                total_steps: 10,
                cycles: 0.5,
            }
        },
        "config.schedule.warmup_steps",
    );
    push(
        inv,
        &|c| {
            c.schedule = Schedule::InverseSqrt {
                warmup_steps: 10,
                init_factor: 2.0,
            }
        },
        "config.schedule.init_factor",
    );
    for (valid, c, field) in bad {
        let keys: Vec<String> = config_pairs(&valid, &[])
            .into_iter()
            .map(|(k, _)| k)
            .collect();
        assert!(
            keys.iter().any(|k| k == field),
            "{field} is not a key of {keys:?}"
        );
        let e = save(&mut Cpu, 0, &c, &[], &()).unwrap_err();
        match e {
            CheckpointError::Format { what, .. } => assert_eq!(what, field),
            other => panic!("{field}: {other}"),
        }
    }
    for (g, field) in [
        (
            ParamGroup::sage().weight_decay(-1.0),
            "group.0.weight_decay",
        ),
        (ParamGroup::sage().lr_scale(f64::NAN), "group.0.lr_scale"),
    ] {
        let keys: Vec<String> = config_pairs(&adam, &[ParamGroup::sage()])
            .into_iter()
            .map(|(k, _)| k)
            .collect();
        assert!(keys.iter().any(|k| k == field), "{field}");
        match save(&mut Cpu, 0, &adam, &[g], &()).unwrap_err() {
            CheckpointError::Format { what, .. } => assert_eq!(what, field),
            other => panic!("{field}: {other}"),
        }
    }
}

#[test]
fn version_1_files_load_with_every_count_at_the_file_count() {
    let c = Checkpoint::parse(V1_FIXTURE).unwrap();
    assert_eq!((c.version(), c.step()), (1, 3));
    // The old keys read as today's fields; the preset gives the schedule count.
    assert_eq!(*c.config(), config());
    assert_eq!(c.config().schedule_count, ScheduleCount::Tensor);
    assert!(c.params().iter().all(|p| p.step == 3));

    // The v1 file holds exactly what this build computes for 3 steps with every tensor
    // present, and resuming from it equals the uninterrupted run, bit for bit.
    let mut whole = Model::new();
    let mut o1 = optimizer();
    for t in 0..3 {
        whole.step(&mut o1, t, always);
    }
    let (mut resumed, mut o2) = load_fresh(V1_FIXTURE).unwrap();
    assert_eq!(o2.steps(), 3);
    assert_eq!(resumed.steps(), [3, 3, 3]);
    assert_eq!(resumed.bits(), whole.bits());
    for t in 3..8 {
        whole.step(&mut o1, t, sometimes);
        resumed.step(&mut o2, t, sometimes);
    }
    assert_eq!(resumed.bits(), whole.bits());

    // Saved again, it is a version-2 file with the same contents.
    let (model, _) = load_fresh(V1_FIXTURE).unwrap();
    let mut opt = optimizer();
    opt.set_steps(3);
    let again = save_optimizer(&mut opt, &model.entries()).unwrap();
    let c2 = Checkpoint::parse(&again).unwrap();
    assert_eq!(c2.version(), 2);
    assert_eq!(c2.params(), c.params());

    // Keys version 1 did not have are refused, as are per-tensor counts in its index.
    let b = reseal(V1_FIXTURE, |m| {
        m.insert("config.schedule_count".into(), "optimizer".into());
    });
    let e = Checkpoint::parse(&b).unwrap_err();
    assert!(
        matches!(&e, CheckpointError::Format { what, .. } if what == "config.schedule_count"),
        "{e}"
    );
    let b = edit_index(V1_FIXTURE, |ix| ix[0]["step"] = serde_json::json!(2));
    let (t, why) = tensor_err(Checkpoint::parse(&b).unwrap_err());
    assert_eq!(t, "enc.weight");
    assert!(why.contains("version 1"), "{why}");
    // A version-1 file at the last count is refused like a version-2 one.
    let b = reseal(V1_FIXTURE, |m| {
        m.insert("sage.step".into(), u64::MAX.to_string());
    });
    assert!(Checkpoint::parse(&b).is_err());
}

#[test]
fn mixed_storage_types_save_and_restore_in_one_call() {
    // A bf16 weight with bf16 state (SAGE) and an f32 bias with f32 state (plain).
    let cfg = config();
    let gs = groups();
    let n = 12;
    let mut w: Vec<bf16> = (0..n)
        .map(|i| bf16::from_f32(i as f32 * 0.1 - 0.4))
        .collect();
    let mut b = vec![0.25f32, -0.5, 0.125];
    let mut sw = TensorState::new(cfg.state_layout(true), || vec![bf16::ZERO; n]);
    let mut sb = TensorState::new(cfg.state_layout(false), || vec![0f32; 3]);
    let mut opt = Optimizer::new(Cpu, cfg, gs.clone()).unwrap();
    let gw: Vec<bf16> = (0..n)
        .map(|i| bf16::from_f32(0.01 * i as f32 - 0.05))
        .collect();
    let gb = [0.1f32, -0.2, 0.05];
    for t in 0..3 {
        let mut ws =
            [ParamTensor::<Cpu, bf16, bf16>::new(&mut w[..], &gw[..], sw.view()).name("w")];
        if t == 1 {
            opt.step(&mut ws).unwrap();
        } else {
            let mut bs = [
                ParamTensor::<Cpu, f32, f32>::new(&mut b[..], &gb[..], sb.view())
                    .name("b")
                    .group(1),
            ];
            opt.step(&mut (&mut ws[..], &mut bs[..])).unwrap();
        }
    }
    assert_eq!((sw.step, sb.step), (3, 2));
    let set = (
        [Entry::<Cpu, bf16, bf16>::new("w", &sw).param(&w[..])],
        vec![Entry::<Cpu, f32, f32>::new("b", &sb).group(1).param(&b[..])],
    );
    let bytes = save_optimizer(&mut opt, &set).unwrap();
    let c = Checkpoint::parse(&bytes).unwrap();
    let dt = |name: &str| {
        let p = c.param(name).unwrap();
        (p.param_dtype, p.state_dtype, p.step)
    };
    use sage_core::DType;
    assert_eq!(dt("w"), (Some(DType::Bf16), Some(DType::Bf16), 3));
    assert_eq!(dt("b"), (Some(DType::F32), Some(DType::F32), 2));

    let mut w2 = vec![bf16::ZERO; n];
    let mut b2 = vec![0f32; 3];
    let mut sw2 = TensorState::new(cfg.state_layout(true), || vec![bf16::ZERO; n]);
    let mut sb2 = TensorState::new(cfg.state_layout(false), || vec![0f32; 3]);
    let mut opt2 = Optimizer::new(Cpu, cfg, gs).unwrap();
    {
        let mut targets = (
            [EntryMut::<Cpu, bf16, bf16>::new("w", sw2.view()).param(&mut w2[..])],
            [EntryMut::<Cpu, f32, f32>::new("b", sb2.view())
                .group(1)
                .param(&mut b2[..])],
        );
        load(&mut opt2, &bytes, &mut targets, ConfigCheck::Exact).unwrap();
    }
    assert_eq!((w2, b2, opt2.steps()), (w, b, 3));
    assert_eq!((sw2, sb2), (sw, sb));
}

/// A backend that delegates to `Cpu` and fails chosen host copies: the read numbered
/// `fail_read`, the write numbered `fail_write` (after writing the first half of it when
/// `half_write`), and with `fail_later_writes` every write after that one too.
#[derive(Clone, Default)]
struct Flaky {
    reads: usize,
    writes: usize,
    fail_read: Option<usize>,
    fail_write: Option<usize>,
    fail_later_writes: bool,
    half_write: bool,
}

#[derive(Debug)]
struct Lost;
impl std::fmt::Display for Lost {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("device lost")
    }
}
impl BackendError for Lost {
    fn kind(&self) -> ErrorKind {
        ErrorKind::DeviceLost
    }
}

impl Backend for Flaky {
    type Error = Lost;
    type Buf<E: Element> = [E];
    fn len<E: Element>(&self, b: &[E]) -> usize {
        b.len()
    }
    fn sq_norm_chunks<E: Element>(
        &mut self,
        b: &[E],
        first: usize,
        out: &mut [f64],
    ) -> Result<(), Lost> {
        Cpu.sq_norm_chunks(b, first, out).map_err(|e| match e {})
    }
    fn accumulate<P: Element, S: Element>(
        &mut self,
        which: Accumulate,
        acc: &mut [S],
        param: &[P],
        grad: &[P],
        k: &Coeffs,
    ) -> Result<(), Lost> {
        Cpu.accumulate(which, acc, param, grad, k)
            .map_err(|e| match e {})
    }
    fn apply<P: Element, S: Element>(
        &mut self,
        t: ApplyArgs<'_, Self, P, S>,
        k: &Coeffs,
    ) -> Result<(), Lost> {
        let t = ApplyArgs::<Cpu, P, S> {
            param: t.param,
            grad: t.grad,
            m: t.m,
            v: t.v,
            ibar: t.ibar,
        };
        Cpu.apply(t, k).map_err(|e| match e {})
    }
}

impl HostBuffers for Flaky {
    type Owned<E: Element> = Vec<E>;
    fn describe(&self, out: &mut dyn std::fmt::Write) -> std::fmt::Result {
        out.write_str("flaky")
    }
    fn upload<E: Element>(&mut self, data: &[E]) -> Result<Vec<E>, Lost> {
        Ok(data.to_vec())
    }
    fn copy_to_host<E: Element>(&mut self, buf: &[E], out: &mut [E]) -> Result<(), Lost> {
        let i = self.reads;
        self.reads += 1;
        if self.fail_read == Some(i) {
            return Err(Lost);
        }
        out.copy_from_slice(buf);
        Ok(())
    }
    fn copy_from_host<E: Element>(&mut self, buf: &mut [E], data: &[E]) -> Result<(), Lost> {
        let i = self.writes;
        self.writes += 1;
        let fails = match self.fail_write {
            Some(k) => i == k || (self.fail_later_writes && i > k),
            None => false,
        };
        if fails {
            if self.half_write {
                let h = data.len() / 2;
                buf[..h].copy_from_slice(&data[..h]);
            }
            return Err(Lost);
        }
        buf.copy_from_slice(data);
        Ok(())
    }
}

/// Every buffer a restore of the test model writes, in the order it writes them.
const WRITE_ORDER: [&str; 11] = [
    "enc.weight",
    "enc.weight.m",
    "enc.weight.v",
    "enc.weight.ibar",
    "enc.bias",
    "enc.bias.m",
    "enc.bias.v",
    "head.weight",
    "head.weight.m",
    "head.weight.v",
    "head.weight.ibar",
];

/// Loads the test checkpoint through `backend` into a fresh model whose counts are 17.
fn load_flaky(bytes: &[u8], backend: Flaky) -> (Result<(), CheckpointError>, Model, u64, Flaky) {
    let mut model = Model::new();
    for s in &mut model.state {
        s.step = 17;
    }
    let mut opt = Optimizer::new(backend, config(), groups()).unwrap();
    opt.set_steps(17);
    let mut entries: Vec<EntryMut<'_, Flaky, f32, f32>> = model
        .params
        .iter_mut()
        .zip(model.state.iter_mut())
        .enumerate()
        .map(|(k, (p, st))| {
            EntryMut::new(NAMES[k], st.view())
                .group(GROUP[k])
                .param(&mut p[..])
        })
        .collect();
    let r = load(&mut opt, bytes, &mut entries, ConfigCheck::Exact).map(|_| ());
    drop(entries);
    let steps = opt.steps();
    (r, model, steps, opt.into_backend())
}

/// The values of buffer `key` of `model`.
fn buffer<'m>(model: &'m Model, key: &str) -> &'m [f32] {
    let k = NAMES.iter().position(|n| key.starts_with(n)).unwrap();
    match &key[NAMES[k].len()..] {
        "" => &model.params[k],
        ".m" => model.state[k].m.as_deref().unwrap(),
        ".v" => model.state[k].v.as_deref().unwrap(),
        ".ibar" => model.state[k].ibar.as_deref().unwrap(),
        other => panic!("{other}"),
    }
}

/// Restore is all or nothing: a device copy that fails at any write — having written part
/// of that buffer or none of it — leaves every buffer and every count as it was, and the
/// error names the buffer whose copy failed.
#[test]
fn a_failed_copy_at_any_write_changes_nothing() {
    let (trained, bytes) = saved();
    let (ok, restored, steps, b) = load_flaky(&bytes, Flaky::default());
    ok.unwrap();
    assert_eq!((restored.bits().0, steps), (trained.bits().0, 3));
    assert_eq!(b.writes, WRITE_ORDER.len());
    let mut fresh = Model::new();
    for s in &mut fresh.state {
        s.step = 17;
    }
    for (k, key) in WRITE_ORDER.iter().enumerate() {
        for half_write in [false, true] {
            let flaky = Flaky {
                fail_write: Some(k),
                half_write,
                ..Flaky::default()
            };
            let (r, model, steps, _) = load_flaky(&bytes, flaky);
            let e = r.unwrap_err();
            assert_eq!(
                e,
                CheckpointError::Backend {
                    tensor: key.to_string(),
                    kind: ErrorKind::DeviceLost,
                    message: "device lost".into()
                },
                "write {k}"
            );
            assert!(e.to_string().contains(key), "{e}");
            assert_eq!(model.bits(), fresh.bits(), "write {k} (half: {half_write})");
            assert_eq!(steps, 17);
        }
    }
    // A failed read of the snapshot: nothing was written at all.
    let (r, model, steps, b) = load_flaky(
        &bytes,
        Flaky {
            fail_read: Some(6),
            ..Flaky::default()
        },
    );
    assert!(
        matches!(r, Err(CheckpointError::Backend { ref tensor, .. }) if tensor == WRITE_ORDER[6]),
        "{r:?}"
    );
    assert_eq!(b.writes, 0);
    assert_eq!((model.bits(), steps), (fresh.bits(), 17));
}

/// When the buffers written cannot be put back either (the device is gone), the error says
/// exactly which buffers hold unspecified contents; every other one holds what it held, and
/// no count changed.
#[test]
fn a_failed_rollback_lists_exactly_the_buffers_left_unspecified() {
    let (_, bytes) = saved();
    let fresh = Model::new();
    for k in 0..WRITE_ORDER.len() {
        let flaky = Flaky {
            fail_write: Some(k),
            fail_later_writes: true,
            half_write: true,
            ..Flaky::default()
        };
        let (r, model, steps, _) = load_flaky(&bytes, flaky);
        let e = r.unwrap_err();
        let unknown: Vec<String> = WRITE_ORDER[..=k].iter().map(|s| s.to_string()).collect();
        assert_eq!(
            e,
            CheckpointError::Partial {
                cause: Box::new(CheckpointError::Backend {
                    tensor: WRITE_ORDER[k].into(),
                    kind: ErrorKind::DeviceLost,
                    message: "device lost".into()
                }),
                unknown: unknown.clone(),
            }
        );
        for key in &WRITE_ORDER[k + 1..] {
            assert_eq!(buffer(&model, key), buffer(&fresh, key), "{key} untouched");
        }
        let msg = e.to_string();
        assert!(
            msg.contains("unspecified") && msg.contains(WRITE_ORDER[k]),
            "{msg}"
        );
        assert_eq!(model.steps(), [17, 17, 17]);
        assert_eq!(steps, 17);
    }
}

/// Rewrites element `at` of stored tensor `key` (f32) to `value`, with its checksum in the
/// index updated and the header resealed: a well-formed file holding that value.
fn with_value(bytes: &[u8], key: &str, at: usize, value: f32) -> Vec<u8> {
    let st = SafeTensors::deserialize(bytes).unwrap();
    let mut owned: Vec<(String, safetensors::Dtype, Vec<usize>, Vec<u8>)> = st
        .tensors()
        .into_iter()
        .map(|(k, v)| (k, v.dtype(), v.shape().to_vec(), v.data().to_vec()))
        .collect();
    let t = owned.iter_mut().find(|t| t.0 == key).unwrap();
    t.3[4 * at..4 * at + 4].copy_from_slice(&value.to_le_bytes());
    let fnv = Fnv64::hex(&t.3);
    let views: Vec<(String, TensorView<'_>)> = owned
        .iter()
        .map(|(k, d, s, b)| (k.clone(), TensorView::new(*d, s.clone(), b).unwrap()))
        .collect();
    let (_, header) = SafeTensors::read_metadata(bytes).unwrap();
    let meta = header.metadata().clone().unwrap();
    let rebuilt = safetensors::serialize(views, Some(meta)).unwrap();
    let (name, buf) = match NAMES.iter().find(|n| key.starts_with(**n)) {
        Some(n) if key.len() > n.len() => (*n, &key[n.len() + 1..]),
        _ => (key, "param"),
    };
    edit_index(&rebuilt, |index| {
        let e = index.iter_mut().find(|e| e["name"] == name).unwrap();
        let b = e["buffers"]
            .as_array_mut()
            .unwrap()
            .iter_mut()
            .find(|b| b["buffer"] == buf)
            .unwrap();
        b["fnv"] = serde_json::Value::String(fnv);
    })
}

/// A state a run cannot resume from — NaN or ±Inf in any buffer, a negative `v` (Adam's
/// second moment) or `ibar` — is refused naming the tensor and the buffer, before anything is
/// written. (Accepted, the next step would make θ NaN: √v of −1.)
#[test]
fn non_finite_or_negative_state_is_refused_naming_the_buffer() {
    let (_, bytes) = saved();
    let neg_nan = f32::from_bits(0xffc0_0000);
    let cases: [(&str, usize, f32); 10] = [
        ("enc.weight.v", 3, -1.0),
        ("enc.weight.v", 0, f32::NAN),
        ("enc.weight.v", 11, f32::INFINITY),
        ("enc.weight.m", 2, f32::NEG_INFINITY),
        ("enc.weight.m", 5, neg_nan),
        ("enc.weight.ibar", 7, -1e-30),
        ("enc.weight.ibar", 1, f32::NAN),
        ("enc.bias.v", 0, -0.5),
        ("head.weight.m", 4, f32::NAN),
        ("head.weight", 1, f32::INFINITY),
    ];
    for (key, at, value) in cases {
        let bad = with_value(&bytes, key, at, value);
        let what = format!("{key}[{at}] = {value}");
        let (tensor, reason) = tensor_err(Checkpoint::parse(&bad).unwrap_err());
        assert_eq!(tensor, key, "{what}: {reason}");
        assert!(
            reason.contains(&format!("element {at}")),
            "{what}: {reason}"
        );
        // `load` refuses it before writing anything.
        let mut model = Model::new();
        let before = model.clone();
        let mut opt = optimizer();
        opt.set_steps(2);
        let e = load(&mut opt, &bad, &mut model.entries_mut(), ConfigCheck::Exact).unwrap_err();
        assert_eq!(tensor_err(e).0, key, "{what}");
        assert_eq!(model, before, "{what}");
        assert_eq!(opt.steps(), 2);
    }
    // The same file with a value that is fine there loads (the edit itself is sound): −0 in
    // `v`, a negative `m`, a negative θ.
    for (key, value) in [
        ("enc.weight.v", -0.0f32),
        ("enc.weight.m", -3.0),
        ("enc.weight", -7.5),
    ] {
        let ok = with_value(&bytes, key, 2, value);
        let (model, _) = load_fresh(&ok).unwrap();
        assert_eq!(buffer(&model, key)[2].to_bits(), value.to_bits(), "{key}");
    }
}

/// `save` refuses the same values (it would write a file `load` refuses), naming the buffer;
/// Adamax's `u` (stored as `v`) must be ≥ 0 too.
#[test]
fn save_refuses_state_a_run_cannot_resume_from() {
    let cfg = config();
    let gs = groups();
    for (b, value) in [
        (Buffer::V, -1.0f32),
        (Buffer::M, f32::NAN),
        (Buffer::Ibar, -2.0),
        (Buffer::Ibar, f32::INFINITY),
    ] {
        let mut st = TensorState::new(cfg.state_layout(true), || vec![0.5f32; 4]);
        st.get_mut(b).unwrap()[2] = value;
        let e = save(
            &mut Cpu,
            3,
            &cfg,
            &gs,
            &[Entry::<Cpu, f32, f32>::new("w", &st)],
        )
        .unwrap_err();
        let (tensor, reason) = tensor_err(e);
        assert_eq!(tensor, format!("w.{}", b.name()));
        assert!(reason.contains("element 2"), "{reason}");
    }
    let theta = [1.0f32, f32::NAN];
    let st = TensorState::new(cfg.state_layout(false), || vec![0f32; 2]);
    let e = save(
        &mut Cpu,
        3,
        &cfg,
        &gs,
        &[Entry::<Cpu, f32, f32>::new("b", &st)
            .group(1)
            .param(&theta[..])],
    )
    .unwrap_err();
    assert_eq!(tensor_err(e).0, "b");
    let adamax = Config::paper(Algorithm::adamax(), 1e-3);
    let mut st = TensorState::new(adamax.state_layout(true), || vec![0.5f32; 3]);
    st.v.as_mut().unwrap()[1] = -0.25;
    let e = save(
        &mut Cpu,
        1,
        &adamax,
        &[ParamGroup::sage()],
        &[Entry::<Cpu, f32, f32>::new("u", &st)],
    )
    .unwrap_err();
    let (tensor, reason) = tensor_err(e);
    assert_eq!(tensor, "u.v");
    assert!(reason.contains("Adamax"), "{reason}");
}
