//! # sage-candle
//!
//! SAGE for [candle](https://docs.rs/candle-core): [`SageOptimizer`] implements
//! [`candle_nn::Optimizer`] over named [`Var`](candle_core::Var)s (a `VarMap`), puts each
//! parameter in a group by its name ([`GroupRules`], by default the authors' split: SAGE on the
//! encoder's attention and feed-forward linear layers, the plain optimizer elsewhere, no decay
//! on biases and LayerNorm), and steps the variables' storage in place — CPU tensors through a
//! sage-cpu backend, CUDA tensors through sage-cuda (feature `cuda`). Variables may be f32, f16
//! or bf16 in any mix (one counted step over all of them), state f32 or bf16; the state is saved
//! and loaded as a sage-checkpoint file (atomic, checksummed, validated before anything is
//! written), the one checkpoint format every adapter of this project reads.
//!
//! [`bert`] is a BERT encoder on candle-nn whose every parameter gets a gradient (candle-nn's
//! fused layer norm has no backward pass; this one is built from differentiable ops).
#![deny(missing_docs)]

pub mod bert;
mod groups;
mod optimizer;

pub use groups::{glob_match, GroupRules, AUTHORS_WEIGHT_DECAY};
pub use optimizer::{named_vars, SageOptimizer, SageParams, SliceBackend};
/// How strictly a loaded state file's configuration must match (re-exported from sage-checkpoint).
pub use sage_checkpoint::ConfigCheck;
