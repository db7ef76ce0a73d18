//! Sharded checkpoints: each rank writes its pieces (state, step counts and θ) as one
//! sage-checkpoint file; rank 0 writes the layout last. Loading onto any world size reshards:
//! each new rank reads, from the files of the ranks that held them, exactly the elements of
//! its new pieces.
//!
//! A checkpoint is a directory:
//!
//! | file | holds |
//! |---|---|
//! | `rank-00000-of-00004.safetensors` ... | rank r's pieces: a sage-checkpoint file (format version 2) whose entries are named by tensor and hold that rank's piece only: `{name}` (θ), `{name}.m`, `{name}.v`, `{name}.ibar`, each tensor's count, and the optimizer's count, configuration and groups |
//! | `layout.json` | `{"format": "sage-dist", "version": 1, "step": ..., "layout": {world, tensors, pieces}, "files": [...]}`; written after every rank file, so its presence means the set is complete |

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use sage_checkpoint::{Checkpoint, ConfigCheck, Entry, Slot};
use sage_core::{Buffer, Element, HostBuffers, ParamGroup};

use crate::comm::{BufferComm, Communicator};
use crate::error::DistError;
use crate::layout::{Layout, Piece};
use crate::sharded::ShardedOptimizer;
use crate::views::Views;

/// The layout file's name in a checkpoint directory.
pub const LAYOUT_FILE: &str = "layout.json";
/// The layout file's `format` value.
pub const LAYOUT_FORMAT: &str = "sage-dist";
/// The layout file's version this build writes and reads.
pub const LAYOUT_VERSION: u32 = 1;

/// The file rank `rank` of `world` writes.
pub fn rank_file(rank: usize, world: usize) -> String {
    format!("rank-{rank:05}-of-{world:05}.safetensors")
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct LayoutFile {
    format: String,
    version: u32,
    /// The optimizer's count when saved.
    step: u64,
    layout: Layout,
    files: Vec<String>,
}

/// What [`ShardedOptimizer::load`] found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LoadReport {
    /// The world size the checkpoint was saved with.
    pub saved_world: usize,
    /// The optimizer's count restored.
    pub step: u64,
    /// The saved ranks' files this rank read.
    pub files_read: Vec<usize>,
}

/// One local piece, read and checked, waiting to be written.
struct Pending<S, P> {
    state: [Option<Vec<S>>; 3],
    param: Vec<P>,
    step: u64,
}

fn read_file(path: &Path) -> Result<Vec<u8>, DistError> {
    std::fs::read(path).map_err(|e| DistError::checkpoint(path, e.to_string()))
}

impl<B, P, S, G> ShardedOptimizer<B, P, S, G>
where
    B: HostBuffers + Views,
    B::Error: Send + Sync + 'static,
    P: Element,
    S: Element,
    G: AsRef<[ParamGroup]>,
{
    /// Saves this rank's pieces — state, counts and θ (`params`: every tensor of the layout,
    /// whole, in order) — into `dir` (created if missing). Collective: every rank calls it;
    /// when it returns `Ok` on any rank, every rank's file and the layout are written.
    pub fn save<C: Communicator>(
        &mut self,
        comm: &mut C,
        dir: &Path,
        params: &[&B::Buf<P>],
    ) -> Result<(), DistError> {
        let (rank, world) = (self.rank(), self.layout().world());
        {
            let b = self.optimizer().backend();
            self.check_tensors(params.iter().map(|p| (b.len(p), None)))?;
        }
        // No layout file while the rank files are being (re)written: a save that dies half
        // way leaves a set that does not load, not a mix of two saves that does.
        let mut cleared = [0.0];
        if rank == 0 {
            let path = dir.join(LAYOUT_FILE);
            let gone = match std::fs::remove_file(&path) {
                Ok(()) => true,
                Err(e) => e.kind() == std::io::ErrorKind::NotFound,
            };
            cleared[0] = (!gone) as u8 as f64;
        }
        comm.all_reduce_sum_f64(&mut cleared)
            .map_err(DistError::comm)?;
        if cleared[0] > 0.0 {
            return Err(DistError::checkpoint(
                dir.join(LAYOUT_FILE),
                "rank 0 could not remove the previous layout file",
            ));
        }
        let mine = self.write_rank_file(dir, params);
        // Every rank's outcome, so that no rank reports success for a partial set.
        let mut failed = vec![0.0; world];
        failed[rank] = mine.is_err() as u8 as f64;
        comm.all_reduce_sum_f64(&mut failed)
            .map_err(DistError::comm)?;
        mine?;
        if let Some(r) = failed.iter().position(|&f| f > 0.0) {
            return Err(DistError::Disagree {
                what: format!("rank {r} could not write its checkpoint file"),
            });
        }
        let mut done = [0.0];
        if rank == 0 {
            let file = LayoutFile {
                format: LAYOUT_FORMAT.into(),
                version: LAYOUT_VERSION,
                step: self.optimizer().steps(),
                layout: self.layout().clone(),
                files: (0..world).map(|r| rank_file(r, world)).collect(),
            };
            let path = dir.join(LAYOUT_FILE);
            let res = serde_json::to_vec_pretty(&file)
                .map_err(|e| DistError::checkpoint(&path, e.to_string()))
                .and_then(|bytes| {
                    sage_checkpoint::write_file(&path, &bytes)
                        .map_err(|e| DistError::checkpoint(&path, e.to_string()))
                });
            done[0] = res.is_err() as u8 as f64;
            comm.all_reduce_sum_f64(&mut done)
                .map_err(DistError::comm)?;
            res
        } else {
            comm.all_reduce_sum_f64(&mut done)
                .map_err(DistError::comm)?;
            if done[0] > 0.0 {
                return Err(DistError::Disagree {
                    what: "rank 0 could not write the layout file".into(),
                });
            }
            Ok(())
        }
    }

    fn write_rank_file(&mut self, dir: &Path, params: &[&B::Buf<P>]) -> Result<(), DistError> {
        let (rank, world) = (self.rank(), self.layout().world());
        let path = dir.join(rank_file(rank, world));
        std::fs::create_dir_all(dir).map_err(|e| DistError::checkpoint(dir, e.to_string()))?;
        let layout = self.layout().clone();
        let pieces = layout.pieces(rank);
        let (step, config, groups) = {
            let o = self.optimizer();
            (o.steps(), *o.config(), o.groups().to_vec())
        };
        let bytes = {
            let backend = self.opt.backend();
            let views: Vec<B::View<'_, P>> = pieces
                .iter()
                .map(|p| backend.view(params[p.tensor], p.range()))
                .collect();
            let entries: Vec<Entry<'_, B, P, S>> = pieces
                .iter()
                .zip(&self.states)
                .zip(&views)
                .map(|((p, st), v)| {
                    let spec = &layout.tensors()[p.tensor];
                    Entry::<B, S, S>::new(&spec.name, st)
                        .group(spec.group)
                        .param(&**v)
                })
                .collect();
            sage_checkpoint::save(self.opt.backend_mut(), step, &config, &groups, &entries)
        };
        let bytes = bytes.map_err(|e| DistError::checkpoint(&path, e.to_string()))?;
        sage_checkpoint::write_file(&path, &bytes)
            .map_err(|e| DistError::checkpoint(&path, e.to_string()))
    }

    /// Loads a sharded checkpoint saved with any world size into this optimizer (its state,
    /// counts and the optimizer's count) and `params` (every tensor of the layout, whole, in
    /// order: θ is restored on every rank). The saved layout's tensors (names, lengths, groups)
    /// must equal this optimizer's; the configuration is compared as `check` says.
    ///
    /// Collective. Every rank validates everything it reads before any rank writes anything:
    /// on error nothing was changed on any rank.
    pub fn load<C: BufferComm<B>>(
        &mut self,
        comm: &mut C,
        dir: &Path,
        params: &mut [&mut B::Buf<P>],
        check: ConfigCheck,
    ) -> Result<LoadReport, DistError> {
        {
            let b = self.optimizer().backend();
            self.check_tensors(params.iter().map(|p| (b.len(&**p), None)))?;
        }
        let world = self.layout().world();
        let read = self.read_pieces(dir, check);
        let mut failed = vec![0.0; world];
        failed[self.rank()] = read.is_err() as u8 as f64;
        comm.all_reduce_sum_f64(&mut failed)
            .map_err(DistError::comm)?;
        let (pending, report) = read?;
        if let Some(r) = failed.iter().position(|&f| f > 0.0) {
            return Err(DistError::Disagree {
                what: format!(
                    "rank {r} could not read the checkpoint in {}",
                    dir.display()
                ),
            });
        }
        // Write: state, counts, θ pieces; then the optimizer's count and the parameters.
        let rank = self.rank();
        let layout = self.layout().clone();
        for ((p, pend), st) in layout
            .pieces(rank)
            .iter()
            .zip(pending)
            .zip(&mut self.states)
        {
            let name = &layout.tensors()[p.tensor].name;
            let backend = self.opt.backend_mut();
            for b in Buffer::ALL {
                if let (Some(host), Some(buf)) = (&pend.state[b.index()], st.get_mut(b)) {
                    backend
                        .write_host(std::borrow::BorrowMut::borrow_mut(buf), host)
                        .map_err(|e| host_error(format!("{name}.{b}"), e))?;
                }
            }
            st.step = pend.step;
            let mut view = backend.view_mut(&mut *params[p.tensor], p.range());
            backend
                .write_host(&mut *view, &pend.param)
                .map_err(|e| host_error(name.clone(), e))?;
        }
        self.optimizer_mut().set_steps(report.step);
        let all = vec![true; layout.tensors().len()];
        self.gather_params(comm, params.iter_mut().map(|p| &mut **p), &all)?;
        Ok(report)
    }

    /// Reads and checks this rank's new pieces from the saved files.
    fn read_pieces(
        &self,
        dir: &Path,
        check: ConfigCheck,
    ) -> Result<(Vec<Pending<S, P>>, LoadReport), DistError> {
        let lpath = dir.join(LAYOUT_FILE);
        let lbytes = read_file(&lpath)?;
        let saved: LayoutFile = serde_json::from_slice(&lbytes)
            .map_err(|e| DistError::checkpoint(&lpath, format!("malformed: {e}")))?;
        if saved.format != LAYOUT_FORMAT || saved.version != LAYOUT_VERSION {
            return Err(DistError::checkpoint(
                &lpath,
                format!(
                    "format {:?} version {}, expected {LAYOUT_FORMAT:?} version {LAYOUT_VERSION}",
                    saved.format, saved.version
                ),
            ));
        }
        saved
            .layout
            .validate()
            .map_err(|e| DistError::checkpoint(&lpath, e))?;
        let old = &saved.layout;
        if saved.files.len() != old.world() {
            return Err(DistError::checkpoint(
                &lpath,
                format!("{} files for {} ranks", saved.files.len(), old.world()),
            ));
        }
        let (mine, ours) = (old.tensors(), self.layout().tensors());
        if mine.len() != ours.len() {
            return Err(DistError::checkpoint(
                &lpath,
                format!(
                    "{} tensors saved, this optimizer has {}",
                    mine.len(),
                    ours.len()
                ),
            ));
        }
        for (i, (a, b)) in mine.iter().zip(ours).enumerate() {
            if a != b {
                return Err(DistError::checkpoint(
                    &lpath,
                    format!(
                        "tensor {i} saved as {:?} ({} elements, group {}), expected {:?} ({} elements, group {})",
                        a.name, a.len, a.group, b.name, b.len, b.group
                    ),
                ));
            }
        }
        if saved.step == u64::MAX {
            return Err(DistError::checkpoint(
                &lpath,
                "optimizer count cannot advance",
            ));
        }

        // Which saved ranks hold parts of my pieces.
        let rank = self.rank();
        let pieces = self.layout().pieces(rank);
        let sources = |p: &Piece| -> Vec<(usize, Piece)> {
            (0..old.world())
                .filter_map(|q| {
                    old.pieces(q)
                        .iter()
                        .find(|o| {
                            o.tensor == p.tensor
                                && (o.start < p.end && p.start < o.end
                                    || (p.is_empty() && o.is_empty()))
                        })
                        .map(|o| (q, *o))
                })
                .collect()
        };
        let mut needed: BTreeMap<usize, Vec<u8>> = BTreeMap::new();
        for p in pieces {
            for (q, _) in sources(p) {
                if let std::collections::btree_map::Entry::Vacant(e) = needed.entry(q) {
                    e.insert(read_file(&dir.join(&saved.files[q]))?);
                }
            }
        }
        let mut parsed: BTreeMap<usize, (PathBuf, Checkpoint<'_>)> = BTreeMap::new();
        for (&q, bytes) in &needed {
            let path = dir.join(&saved.files[q]);
            let ck = Checkpoint::parse(bytes)
                .map_err(|e| DistError::checkpoint(&path, e.to_string()))?;
            let opt = self.optimizer();
            ck.check_config(opt.config(), opt.groups(), check)
                .map_err(|e| DistError::checkpoint(&path, e.to_string()))?;
            if ck.step() != saved.step {
                return Err(DistError::checkpoint(
                    &path,
                    format!(
                        "optimizer count {}, the layout file says {}",
                        ck.step(),
                        saved.step
                    ),
                ));
            }
            // Exactly the pieces the layout gives this rank, no more.
            let expect = old.pieces(q);
            if ck.params().len() != expect.len() {
                return Err(DistError::checkpoint(
                    &path,
                    format!(
                        "{} entries, the layout gives rank {q} {} pieces",
                        ck.params().len(),
                        expect.len()
                    ),
                ));
            }
            for o in expect {
                let name = &old.tensors()[o.tensor].name;
                let info = ck
                    .param(name)
                    .ok_or_else(|| DistError::checkpoint(&path, format!("no entry for {name}")))?;
                if info.len != o.len() || info.group != old.tensors()[o.tensor].group {
                    return Err(DistError::checkpoint(
                        &path,
                        format!(
                            "{name}: {} elements in group {}, the layout says {} in group {}",
                            info.len,
                            info.group,
                            o.len(),
                            old.tensors()[o.tensor].group
                        ),
                    ));
                }
            }
            parsed.insert(q, (path, ck));
        }

        let mut out = Vec::with_capacity(pieces.len());
        for p in pieces {
            let spec = &ours[p.tensor];
            let state_layout = self
                .optimizer()
                .state_layout(spec.group)
                .ok_or_else(|| DistError::input(Some((p.tensor, &spec.name)), "unknown group"))?;
            let mut pend = Pending {
                state: [None, None, None],
                param: Vec::with_capacity(p.len()),
                step: 0,
            };
            for b in Buffer::ALL {
                if state_layout.needs(b) {
                    pend.state[b.index()] = Some(Vec::with_capacity(p.len()));
                }
            }
            let mut count: Option<u64> = None;
            for (q, o) in sources(p) {
                let (path, ck) = &parsed[&q];
                let info = ck.param(&spec.name).expect("checked above");
                match count {
                    None => count = Some(info.step),
                    Some(c) if c != info.step => {
                        return Err(DistError::checkpoint(
                            path,
                            format!(
                                "{}: count {} here, {c} in another rank's file",
                                spec.name, info.step
                            ),
                        ))
                    }
                    _ => {}
                }
                // The overlap, in the saved piece's coordinates.
                let a = p.start.max(o.start) - o.start;
                let z = p.end.min(o.end).max(p.start.max(o.start)) - o.start;
                let err = |e: sage_checkpoint::CheckpointError| {
                    DistError::checkpoint(path, e.to_string())
                };
                for b in Buffer::ALL {
                    if let Some(dst) = pend.state[b.index()].as_mut() {
                        let v = ck.read::<S>(&spec.name, Slot::State(b)).map_err(err)?;
                        dst.extend_from_slice(&v[a..z]);
                    }
                }
                let v = ck.read::<P>(&spec.name, Slot::Param).map_err(err)?;
                pend.param.extend_from_slice(&v[a..z]);
            }
            let step = count.ok_or_else(|| {
                DistError::checkpoint(&lpath, format!("no saved piece holds {}", spec.name))
            })?;
            if step == u64::MAX {
                return Err(DistError::checkpoint(
                    &lpath,
                    format!("{}: count cannot advance", spec.name),
                ));
            }
            if pend.param.len() != p.len() {
                return Err(DistError::checkpoint(
                    &lpath,
                    format!(
                        "{}: the saved pieces cover {} of elements {}..{}",
                        spec.name,
                        pend.param.len(),
                        p.start,
                        p.end
                    ),
                ));
            }
            pend.step = step;
            out.push(pend);
        }
        Ok((
            out,
            LoadReport {
                saved_world: old.world(),
                step: saved.step,
                files_read: parsed.keys().copied().collect(),
            },
        ))
    }
}

fn host_error<E: sage_core::BackendError>(what: String, e: sage_core::HostError<E>) -> DistError {
    let kind = match &e {
        sage_core::HostError::Length { .. } => sage_core::ErrorKind::LengthMismatch,
        sage_core::HostError::Backend(b) => b.kind(),
    };
    DistError::Backend {
        what,
        kind,
        message: e.to_string(),
    }
}
