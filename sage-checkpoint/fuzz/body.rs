//! What the fuzz target (`fuzz_targets/load.rs`) does with each input, and the seed
//! checkpoints it starts from. One file, included by path (`#[path]`) into the fuzz target,
//! the `fuzz_seeds` example and `tests/fuzz_body.rs`, so the stable test suite runs the same
//! body. It runs on sage-cpu's `Cpu`, a dev-dependency: the library itself depends on no
//! backend.

use sage_checkpoint::{load, save_optimizer, Checkpoint, ConfigCheck, Entry, EntryMut, Slot};
use sage_core::{
    bf16, f16, Algorithm, Buffer, Config, DType, Element, Optimizer, ParamGroup, Schedule,
    TensorState,
};
use sage_cpu::Cpu;

/// The model every seed is saved from and every input is loaded into: one SAGE tensor, one
/// plain tensor, AdamW (reference preset).
pub const NAMES: [&str; 2] = ["layer.weight", "layer.bias"];
/// Lengths of [`NAMES`].
pub const LENS: [usize; 2] = [6, 3];

/// A version-1 checkpoint (one optimizer-wide count) written by the version-1 code: the
/// fuzzer mutates the old format's path too.
pub const V1_SEED: &[u8] = include_bytes!("../tests/fixtures/v1-adamw-3steps.safetensors");

fn config() -> Config {
    Config::reference(Algorithm::adamw(), 1e-3)
        .beta0(0.7)
        .schedule(Schedule::WarmupLinearPpb {
            warmup: 0.1,
            t_total: 100,
        })
}

fn groups() -> Vec<ParamGroup> {
    vec![ParamGroup::sage().weight_decay(0.01), ParamGroup::plain()]
}

/// Valid checkpoints of the fixed model (with and without θ, at a few steps, tensors' counts
/// differing), one of another configuration (SGD with momentum), one mixing storage types,
/// and the version-1 file.
pub fn seeds() -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    for (step, with_param) in [(0u64, false), (3, true), (41, false)] {
        let p: Vec<Vec<f32>> = LENS
            .iter()
            .map(|&n| (0..n).map(|i| i as f32 * 0.25 - 0.5).collect())
            .collect();
        let states: Vec<TensorState<Vec<f32>>> = LENS
            .iter()
            .enumerate()
            .map(|(k, &n)| {
                let mut s = TensorState::new(config().state_layout(k == 0), || {
                    (0..n).map(|i| (i as f32 + step as f32) * 1e-3).collect()
                });
                // The bias was absent from a few steps.
                s.step = step - (k as u64).min(step);
                s
            })
            .collect();
        let mut opt = Optimizer::new(Cpu, config(), groups()).expect("valid config");
        opt.set_steps(step);
        let entries: Vec<Entry<'_, Cpu, f32, f32>> = (0..2)
            .map(|k| {
                let e = Entry::new(NAMES[k], &states[k]).group(k);
                if with_param {
                    e.param(&p[k][..])
                } else {
                    e
                }
            })
            .collect();
        out.push(save_optimizer(&mut opt, &entries).expect("seed saves"));
    }
    let cfg = Config::paper(Algorithm::sgd(0.9), 0.1);
    let mut st = TensorState::new(cfg.state_layout(true), || vec![0.5f32; 4]);
    st.step = 7;
    let mut opt = Optimizer::new(Cpu, cfg, [ParamGroup::sage()]).expect("valid config");
    opt.set_steps(9);
    out.push(
        save_optimizer(&mut opt, &[Entry::<Cpu, f32, f32>::new("w", &st)]).expect("seed saves"),
    );
    // Mixed storage: a bf16 weight with bf16 state, an f32 bias with f16 state.
    let w = vec![bf16::from_f32(0.25); LENS[0]];
    let b = vec![0.5f32; LENS[1]];
    let sw = TensorState::new(config().state_layout(true), || {
        vec![bf16::from_f32(1e-3); LENS[0]]
    });
    let sb = TensorState::new(config().state_layout(false), || {
        vec![f16::from_f32(2e-3); LENS[1]]
    });
    let mut opt = Optimizer::new(Cpu, config(), groups()).expect("valid config");
    let mixed = (
        [Entry::<Cpu, bf16, bf16>::new(NAMES[0], &sw).param(&w[..])],
        [Entry::<Cpu, f16, f16>::new(NAMES[1], &sb)
            .group(1)
            .param(&b[..])],
    );
    out.push(save_optimizer(&mut opt, &mixed).expect("seed saves"));
    out.push(V1_SEED.to_vec());
    out
}

/// Host buffers laid out as the checkpoint says, for the parameters stored as (`P`, `S`).
struct Holder<P, S> {
    name: String,
    group: usize,
    param: Option<Vec<P>>,
    state: TensorState<Vec<S>>,
}

/// The storage pair a parameter is restored as: its state's type (θ's when it has no state,
/// f32 when it has neither), and θ's type (the state's when θ is not stored).
fn pair(p: &sage_checkpoint::ParamInfo) -> (DType, DType) {
    let s = p.state_dtype.or(p.param_dtype).unwrap_or(DType::F32);
    (p.param_dtype.unwrap_or(s), s)
}

fn holders<P: Element, S: Element>(c: &Checkpoint<'_>) -> Vec<Holder<P, S>> {
    c.params()
        .iter()
        .filter(|p| pair(p) == (P::DTYPE, S::DTYPE))
        .map(|p| Holder {
            name: p.name.clone(),
            group: p.group,
            param: p.has(Slot::Param).then(|| vec![P::default(); p.len]),
            state: TensorState::new(p.layout, || vec![S::default(); p.len]),
        })
        .collect()
}

fn targets<P: Element, S: Element>(hs: &mut [Holder<P, S>]) -> Vec<EntryMut<'_, Cpu, P, S>> {
    hs.iter_mut()
        .map(|h| EntryMut {
            name: h.name.as_str(),
            group: h.group,
            shape: None,
            param: h.param.as_deref_mut(),
            state: h.state.view(),
        })
        .collect()
}

/// What was restored equals what the checkpoint holds.
fn agrees<P: Element, S: Element>(c: &Checkpoint<'_>, hs: &[Holder<P, S>]) {
    for h in hs {
        let info = c.param(&h.name).expect("restored from it");
        assert_eq!(h.state.step, info.step);
        if let Some(p) = &h.param {
            assert!(*p == c.read::<P>(&h.name, Slot::Param).expect("stored"));
        }
        for b in Buffer::ALL {
            if let Some(x) = h.state.get(b) {
                assert!(*x == c.read::<S>(&h.name, b).expect("stored"));
            }
        }
    }
}

/// Parses `data`, and loads it into the fixed model: any input may be refused, none may
/// panic. A file that parses must restore into buffers laid out as it says, whatever mix of
/// storage types it holds.
pub fn exercise(data: &[u8]) {
    if let Ok(c) = Checkpoint::parse(data) {
        for p in c.params() {
            for s in Slot::ALL {
                if let Some(x) = c.read_f32(&p.name, s) {
                    assert_eq!(x.len(), p.len);
                }
            }
        }
        let (mut a, mut b, mut d) = (
            holders::<f32, f32>(&c),
            holders::<bf16, bf16>(&c),
            holders::<f16, f16>(&c),
        );
        let (mut e, mut f, mut g) = (
            holders::<f32, bf16>(&c),
            holders::<f32, f16>(&c),
            holders::<bf16, f32>(&c),
        );
        let (mut h, mut i, mut j) = (
            holders::<f16, f32>(&c),
            holders::<bf16, f16>(&c),
            holders::<f16, bf16>(&c),
        );
        {
            let mut set = (
                targets(&mut a),
                targets(&mut b),
                targets(&mut d),
                targets(&mut e),
                targets(&mut f),
                targets(&mut g),
                targets(&mut h),
                targets(&mut i),
                targets(&mut j),
            );
            c.restore(&mut Cpu, &mut set)
                .expect("a checkpoint that parses restores into buffers of its own layout");
        }
        agrees(&c, &a);
        agrees(&c, &b);
        agrees(&c, &d);
        agrees(&c, &e);
        agrees(&c, &f);
        agrees(&c, &g);
        agrees(&c, &h);
        agrees(&c, &i);
        agrees(&c, &j);
    }
    // Into the fixed model, through the optimizer: refusals are fine, panics are not.
    let mut opt = Optimizer::new(Cpu, config(), groups()).expect("valid config");
    let mut states: Vec<TensorState<Vec<f32>>> = LENS
        .iter()
        .enumerate()
        .map(|(k, &n)| TensorState::new(config().state_layout(k == 0), || vec![0f32; n]))
        .collect();
    let mut entries: Vec<EntryMut<'_, Cpu, f32, f32>> = states
        .iter_mut()
        .enumerate()
        .map(|(k, s)| EntryMut::new(NAMES[k], s.view()).group(k))
        .collect();
    let _ = load(&mut opt, data, &mut entries, ConfigCheck::Exact);
}
