//! The checks, each a plain public function generic over a [`Harness`].

pub mod checkpoint;
pub mod common;
pub mod contract;
pub mod equivalence;
pub mod guards;
pub mod properties;

use sage_core::{bf16, f16, DType};

use crate::failure::Failure;
use crate::harness::Harness;
use crate::suite::Check;
use common::{cases, differential};
use equivalence::need;

/// Every check, by name, in report order.
pub fn all<B: Harness + 'static>() -> Vec<(&'static str, Check<B>)> {
    vec![
        (
            "differential f32 vs float64 reference",
            differential_f32::<B>,
        ),
        (
            "differential bf16/f16 vs float64 reference",
            differential_half::<B>,
        ),
        (
            "fused == composed",
            equivalence::fused_matches_composed::<B>,
        ),
        (
            "fused == composed (bf16)",
            equivalence::fused_matches_composed_bf16::<B>,
        ),
        (
            "multi-tensor == one at a time",
            equivalence::multi_matches_single::<B>,
        ),
        (
            "resume == uninterrupted",
            equivalence::resume_matches_uninterrupted::<B>,
        ),
        (
            "resume from checkpoint == uninterrupted",
            checkpoint::resume_from_checkpoint::<B>,
        ),
        (
            "resume from checkpoint (bf16 state)",
            checkpoint::resume_from_checkpoint_bf16::<B>,
        ),
        (
            "property: SAGE off == base optimizer",
            properties::sage_off_is_base::<B>,
        ),
        (
            "property: zero gradient decays Ī",
            properties::zero_gradient_decays_ibar::<B>,
        ),
        (
            "property: reference never moves θ = 0",
            properties::reference_zero_stays::<B>,
        ),
        (
            "property: skipped steps change nothing",
            properties::skipped_step_changes_nothing::<B>,
        ),
        (
            "absent tensors keep their own step counts",
            contract::absent_tensors::<B>,
        ),
        (
            "mixed precisions in one step",
            contract::mixed_precision_step::<B>,
        ),
        (
            "norms from outside == own norms",
            contract::norms_from_outside::<B>,
        ),
        (
            "long tensors (past 65,536, odd tails) vs float64",
            contract::long_tensors::<B>,
        ),
        (
            "many tensors in one step vs float64",
            contract::many_tensors::<B>,
        ),
        (
            "huge finite gradients clip, never skip",
            contract::huge_gradients::<B>,
        ),
        (
            "subnormal values kept (no flush to zero)",
            contract::subnormals::<B>,
        ),
        ("non-finite gradients", guards::non_finite::<B>),
        (
            "non-finite parameters reported",
            contract::non_finite_params_reported::<B>,
        ),
        ("bad inputs give errors", guards::bad_inputs::<B>),
    ]
}

/// Every configuration of [`cases`], f32 parameters and state, 4 steps, against the float64
/// oracle at lengths that hit every SIMD tail.
pub fn differential_f32<B: Harness>(b: &mut B) -> Result<(), Failure> {
    let check = "differential f32 vs float64 reference";
    for (i, c) in cases().iter().enumerate() {
        // Scheduled runs go past their schedule's end (t_total ≤ 6): the end of every schedule
        // and what comes after it are checked too.
        let steps = if c.cfg.schedule == sage_core::Schedule::Constant {
            4
        } else {
            8
        };
        differential::<B, f32, f32>(b, check, c, steps, 1000 + i as u64)?;
    }
    Ok(())
}

/// Half-precision storage: bf16 and f16 parameters with f32 state, f32 parameters with bf16
/// state, and bf16 for both; and for SGD, f16 state with f32 and f16 parameters (a kernel per
/// storage pair can hide a bug in one pair only). Against the oracle rounding the same way.
pub fn differential_half<B: Harness>(b: &mut B) -> Result<(), Failure> {
    let check = "differential bf16/f16 vs float64 reference";
    need(b, DType::Bf16, check)?;
    need(b, DType::F16, check)?;
    for (i, c) in cases().iter().enumerate().step_by(3) {
        let seed = 2000 + i as u64;
        differential::<B, bf16, f32>(b, check, c, 3, seed)?;
        differential::<B, f16, f32>(b, check, c, 3, seed)?;
        differential::<B, f32, bf16>(b, check, c, 3, seed)?;
        differential::<B, bf16, bf16>(b, check, c, 3, seed)?;
    }
    // f16 state holds SGD's momentum only (sage-core refuses v and Ī in f16; the runs' groups
    // have SAGE off).
    for (i, c) in cases().iter().enumerate() {
        if c.cfg.algorithm.is_sgd() {
            let seed = 2000 + i as u64;
            differential::<B, f32, f16>(b, check, c, 3, seed)?;
            differential::<B, f16, f16>(b, check, c, 3, seed)?;
        }
    }
    Ok(())
}
