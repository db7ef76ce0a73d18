//! What the fuzz target (`fuzz/`) does with each input, and the seed checkpoints it starts
//! from. Public so the stable test suite and the fuzz target share one body; not part of the
//! API.

use crate::{load, save_optimizer, Buffer, Checkpoint, ConfigCheck, Entry, EntryMut};
use sage_core::{Algorithm, Config, Optimizer, ParamGroup, Schedule};
use sage_cpu::Cpu;

/// The model every seed is saved from and every input is loaded into: one SAGE tensor, one
/// plain tensor, AdamW (reference preset).
pub const NAMES: [&str; 2] = ["layer.weight", "layer.bias"];
/// Lengths of [`NAMES`].
pub const LENS: [usize; 2] = [6, 3];

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

/// Valid checkpoints of the fixed model (with and without θ, at a few steps) plus one of
/// another configuration (SGD with momentum).
pub fn seeds() -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    for (step, with_param) in [(0u64, false), (3, true), (41, false)] {
        let p: Vec<Vec<f32>> = LENS
            .iter()
            .map(|&n| (0..n).map(|i| i as f32 * 0.25 - 0.5).collect())
            .collect();
        let s: Vec<Vec<f32>> = LENS
            .iter()
            .map(|&n| (0..n).map(|i| (i as f32 + step as f32) * 1e-3).collect())
            .collect();
        let mut opt = Optimizer::new(Cpu, config(), groups()).expect("valid config");
        opt.set_steps(step);
        let entries: Vec<Entry<'_, Cpu, f32, f32>> = (0..2)
            .map(|k| {
                let e = Entry::new(NAMES[k]).group(k).m(&s[k][..]).v(&s[k][..]);
                let e = if k == 0 { e.ibar(&s[k][..]) } else { e };
                if with_param {
                    e.param(&p[k][..])
                } else {
                    e
                }
            })
            .collect();
        out.push(save_optimizer(&mut opt, &entries).expect("seed saves"));
    }
    let m = [0.5f32; 4];
    let mut opt = Optimizer::new(
        Cpu,
        Config::paper(Algorithm::sgd(0.9), 0.1),
        [ParamGroup::sage()],
    )
    .expect("valid config");
    let e: Vec<Entry<'_, Cpu, f32, f32>> = vec![Entry::new("w").m(&m[..]).ibar(&m[..])];
    out.push(save_optimizer(&mut opt, &e).expect("seed saves"));
    out
}

/// Parses `data`, and loads it into the fixed model: any input may be refused, none may
/// panic. A file that parses must restore into buffers laid out as it says.
pub fn exercise(data: &[u8]) {
    if let Ok(c) = Checkpoint::parse(data) {
        for p in c.params() {
            for b in [Buffer::Param, Buffer::M, Buffer::V, Buffer::Ibar] {
                if let Some(x) = c.read_f32(&p.name, b) {
                    assert_eq!(x.len(), p.len);
                }
            }
        }
        if c.state_dtype().unwrap_or(sage_core::DType::F32) == sage_core::DType::F32
            && c.param_dtype().unwrap_or(sage_core::DType::F32) == sage_core::DType::F32
        {
            // Buffers exactly as the file describes them: restoring must succeed.
            let mut bufs: Vec<[Option<Vec<f32>>; 4]> = c
                .params()
                .iter()
                .map(|p| {
                    let has = |b| p.buffers.contains(&b).then(|| vec![0f32; p.len]);
                    [
                        has(Buffer::Param),
                        has(Buffer::M),
                        has(Buffer::V),
                        has(Buffer::Ibar),
                    ]
                })
                .collect();
            let mut entries: Vec<EntryMut<'_, Cpu, f32, f32>> = c
                .params()
                .iter()
                .zip(bufs.iter_mut())
                .map(|(p, [th, m, v, ib])| {
                    let e = EntryMut::new(p.name.as_str()).group(p.group).state(
                        m.as_deref_mut(),
                        v.as_deref_mut(),
                        ib.as_deref_mut(),
                    );
                    match th.as_deref_mut() {
                        Some(t) => e.param(t),
                        None => e,
                    }
                })
                .collect();
            c.restore(&mut Cpu, &mut entries)
                .expect("a checkpoint that parses restores into buffers of its own layout");
        }
    }
    // Into the fixed model, through the optimizer: refusals are fine, panics are not.
    let mut opt = Optimizer::new(Cpu, config(), groups()).expect("valid config");
    let mut bufs: Vec<[Vec<f32>; 3]> = LENS
        .iter()
        .map(|&n| [vec![0f32; n], vec![0f32; n], vec![0f32; n]])
        .collect();
    let mut entries: Vec<EntryMut<'_, Cpu, f32, f32>> = bufs
        .iter_mut()
        .enumerate()
        .map(|(k, [m, v, ib])| {
            EntryMut::new(NAMES[k]).group(k).state(
                Some(&mut m[..]),
                Some(&mut v[..]),
                (k == 0).then_some(&mut ib[..]),
            )
        })
        .collect();
    let _ = load(&mut opt, data, &mut entries, ConfigCheck::Exact);
}
