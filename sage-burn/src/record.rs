//! burn's optimizer records ↔ sage-checkpoint files: the state a [`ModuleOptimizer`] built by
//! [`SageConfig::init`] keeps (burn's `to_record`, keyed by parameter id) exported as a
//! sage-checkpoint file keyed by module path — the file sage-candle and sage-core users load —
//! and such a file imported back into a `ModuleOptimizer`.

use std::collections::BTreeMap;

use burn::module::Module;
use burn::optim::{ModuleOptimizer, OptimizerRecord, StateSource};
use burn::tensor::TensorData;
use burn_pack::{Reader, Scalar, Writer};
use sage_checkpoint::{Checkpoint, ConfigCheck};
use sage_core::{bf16, Buffer};
use sage_cpu::Cpu;

use crate::module::{entry, entry_mut, Params, Slot};
use crate::state::{unflatten, HostState};
use crate::{Error, SageConfig};

/// The module's parameters with the state `optim` holds for each (fresh state for those it
/// has never stepped), as `cfg` assigns groups.
fn slots<M: Module>(
    optim: &ModuleOptimizer,
    module: &M,
    cfg: &SageConfig,
) -> Result<Vec<Slot>, Error> {
    cfg.validate()?;
    let bytes = optim.to_record().into_bytes().map_err(Error::dbg)?;
    let reader = Reader::from_bytes(bytes).map_err(Error::dbg)?;
    let mut src = StateSource::new(reader.scalars().clone());
    for t in reader.into_tensors().map_err(Error::dbg)? {
        let (name, dtype, shape, _, bytes) = t.into_parts().map_err(Error::dbg)?;
        src.insert_tensor(name, TensorData::from_bytes(bytes, shape, dtype));
    }
    let mut params = Params::default();
    module.visit(&mut params);
    let mut out = Vec::new();
    for (path, id, shape) in params.found {
        let prefix = id.val().to_string();
        let group = cfg.rules.assign(&path);
        let n = shape.iter().product();
        let state = if src.has_under(&prefix) {
            let (state, got, g) = unflatten(&prefix, &mut src).ok_or_else(|| {
                Error::msg(format!(
                    "the record's state of `{path}` is not a SAGE state"
                ))
            })?;
            if g != group {
                return Err(Error::msg(format!(
                    "`{path}`: recorded for group {g}, the rules give group {group}"
                )));
            }
            if got.is_some_and(|s| s != shape) {
                return Err(Error::msg(format!("`{path}`: recorded for another shape")));
            }
            state
        } else {
            let layout = cfg.config.state_layout(cfg.rules.groups()[group].sage);
            HostState::zeros(layout, n, cfg.state)
        };
        out.push(Slot {
            path,
            shape,
            group,
            state,
        });
    }
    Ok(out)
}

/// The state of `optim` (a [`ModuleOptimizer`] from [`SageConfig::init`] that has been
/// stepping `module`) as a sage-checkpoint file: every float parameter of `module` by its
/// path, with its buffers and its own count (parameters never stepped have count 0). The
/// per-tensor contract keeps no optimizer-wide count; the file's is the largest tensor count.
pub fn export_checkpoint<M: Module>(
    optim: &ModuleOptimizer,
    module: &M,
    cfg: &SageConfig,
) -> Result<Vec<u8>, Error> {
    let slots = slots(optim, module, cfg)?;
    let step = slots.iter().map(|s| s.state.steps()).max().unwrap_or(0);
    let mut f32s = Vec::new();
    let mut bf16s = Vec::new();
    for s in &slots {
        match &s.state {
            HostState::F32(t) => f32s.push(entry::<Cpu, f32>(s, t)),
            HostState::Bf16(t) => bf16s.push(entry::<Cpu, bf16>(s, t)),
        }
    }
    sage_checkpoint::save(
        &mut Cpu,
        step,
        &cfg.config,
        cfg.rules.groups(),
        &(f32s, bf16s),
    )
    .map_err(Error::msg)
}

/// Loads a sage-checkpoint file (from any adapter) into `optim` for `module`: the file is
/// validated completely, its configuration compared with `cfg`'s under `check`, and every
/// parameter of `module` matched by path, group, shape, buffers and state type — none missing,
/// none extra — before the state is handed to burn (`ModuleOptimizer::load_record`).
pub fn import_checkpoint<M: Module>(
    optim: ModuleOptimizer,
    module: &M,
    cfg: &SageConfig,
    bytes: &[u8],
    check: ConfigCheck,
) -> Result<ModuleOptimizer, Error> {
    cfg.validate()?;
    let ckpt = Checkpoint::parse(bytes).map_err(Error::msg)?;
    ckpt.check_config(&cfg.config, cfg.rules.groups(), check)
        .map_err(Error::msg)?;
    let mut params = Params::default();
    module.visit(&mut params);
    let mut slots: Vec<Slot> = params
        .found
        .iter()
        .map(|(path, _, shape)| {
            let group = cfg.rules.assign(path);
            let layout = cfg.config.state_layout(cfg.rules.groups()[group].sage);
            Slot {
                path: path.clone(),
                shape: shape.clone(),
                group,
                state: HostState::zeros(layout, shape.iter().product(), cfg.state),
            }
        })
        .collect();
    {
        let mut states: Vec<HostState> = slots.iter().map(|s| s.state.clone()).collect();
        let mut f32s = Vec::new();
        let mut bf16s = Vec::new();
        for (s, st) in slots.iter().zip(states.iter_mut()) {
            match st {
                HostState::F32(t) => f32s.push(entry_mut::<Cpu, f32>(s, t)),
                HostState::Bf16(t) => bf16s.push(entry_mut::<Cpu, bf16>(s, t)),
            }
        }
        ckpt.restore(&mut Cpu, &mut (f32s, bf16s))
            .map_err(Error::msg)?;
        for (s, st) in slots.iter_mut().zip(states) {
            s.state = st;
        }
    }
    // burn's record: tensors `{id}.{buffer}`, scalars `{id}.step`, `{id}.group`, `{id}.__rank`,
    // metadata `{id}` = path.
    let mut tensors = Vec::new();
    let mut scalars: BTreeMap<String, Scalar> = BTreeMap::new();
    let mut meta = BTreeMap::new();
    for (s, (_, id, _)) in slots.iter().zip(&params.found) {
        let id = id.val();
        for b in Buffer::ALL {
            let data = match &s.state {
                HostState::F32(t) => t
                    .get(b)
                    .map(|v| TensorData::new(v.clone(), s.shape.clone())),
                HostState::Bf16(t) => t
                    .get(b)
                    .map(|v| TensorData::new(v.clone(), s.shape.clone())),
            };
            if let Some(d) = data {
                let (bytes, shape, dtype) = d.into_parts();
                tensors.push(burn_pack::Tensor::new(
                    format!("{id}.{}", b.name()),
                    dtype,
                    shape,
                    Some(id),
                    bytes,
                ));
            }
        }
        scalars.insert(format!("{id}.step"), Scalar::from(s.state.steps()));
        scalars.insert(format!("{id}.group"), Scalar::from(s.group));
        scalars.insert(format!("{id}.__rank"), Scalar::from(s.shape.len()));
        meta.insert(id.to_string(), s.path.clone());
    }
    let mut w = Writer::new(tensors);
    for (k, v) in &scalars {
        w = w.with_scalar(k, *v);
    }
    for (k, v) in &meta {
        w = w.with_metadata(k, v);
    }
    let record =
        OptimizerRecord::from_bytes(w.into_bytes().map_err(Error::dbg)?).map_err(Error::dbg)?;
    Ok(optim.load_record(record))
}
