//! The contract frameworks and distributed training rely on: tensors absent from some steps
//! (per-tensor step counts), one step over mixed storage types, and norms supplied from
//! outside (equal, bit for bit, to the norms the step computes itself).

use sage_core::norm::{self, chunk_count, NORM_CHUNK};
use sage_core::{
    bf16, f16, Algorithm, Config, DType, GlobalNorms, Optimizer, Outcome, ParamGroup, Schedule,
    StepReport,
};

use rand::rngs::StdRng;
use rand::Rng;

use super::common::{
    cases, differential_with, group_of, groups, random_grads, random_params, rng, Case, Tol,
    LENGTHS,
};
use crate::failure::{Failure, Worst};
use crate::harness::Harness;
use crate::model::{backend_failure, Model};
use crate::reference::Reference;

fn widen(x: &[f32]) -> Vec<f64> {
    x.iter().map(|&v| v as f64).collect()
}

/// Compares one tensor's parameters with the oracle's.
fn see_tensor(
    worst: &mut Worst,
    tol: Tol,
    got: &[f32],
    want: &[f64],
    start: &[f64],
    place: impl Fn(usize) -> String,
) {
    for (j, (&a, &e)) in got.iter().zip(want).enumerate() {
        let abs = tol.abs + tol.moved * (e - start[j]).abs();
        worst.see(a as f64, e, abs, tol.rel, || place(j));
    }
}

/// Tensors absent from some steps (a tensor that joins late, one frozen in the middle, one
/// unused by a batch): each steps with its own count — bias corrections, Ī's `1 − β0^t` and,
/// in the reference preset, its schedule — as the float64 oracle does; an absent tensor's
/// parameters, state and count stay exactly as they were; global clipping covers the tensors
/// present.
pub fn absent_tensors<B: Harness>(b: &mut B) -> Result<(), Failure> {
    let check = "absent tensors keep their own step counts";
    let fail = |d: String| Failure::new(check, d);
    let lens = [9usize, 17, 4097, 5];
    // present[step][tensor]
    let present = [
        [false, true, true, true],
        [false, true, true, false],
        [true, true, false, true],
        [true, false, true, true],
        [true, true, true, false],
        [true, true, true, true],
    ];
    let cases = [
        (
            "reference adamw warmup",
            Config::reference(Algorithm::adamw(), 2e-3)
                .beta0(0.7)
                .global_clip(0.05)
                .schedule(Schedule::WarmupLinearPpb {
                    warmup: 0.3,
                    t_total: 8,
                }),
        ),
        (
            "reference adamax warmup",
            Config::reference(Algorithm::adamax(), 2e-3).schedule(Schedule::WarmupLinearPpb {
                warmup: 0.3,
                t_total: 8,
            }),
        ),
        (
            "paper adam linear decay",
            Config::paper(Algorithm::adam(), 2e-3).schedule(Schedule::LinearWarmupDecay {
                warmup_steps: 2,
                total_steps: 6,
            }),
        ),
        (
            "paper sgd-momentum",
            Config::paper(Algorithm::sgd(0.9), 0.05),
        ),
    ];
    let groups = vec![ParamGroup::sage().weight_decay(0.01), ParamGroup::plain()];
    let gof = vec![0, 1, 0, 0];
    let tol = Tol::for_types(DType::F32, DType::F32);
    let mut worst = Worst::default();
    for (ci, (name, cfg)) in cases.into_iter().enumerate() {
        let mut r = rng(7000 + ci as u64);
        let init = random_params(&mut r, &lens);
        let mut model = Model::<B, f32, f32>::new(b, &cfg, &groups, &init, &gof)?;
        let wide: Vec<Vec<f64>> = init.iter().map(|x| widen(x)).collect();
        let mut oracle = Reference::new(
            cfg,
            groups.clone(),
            gof.clone(),
            &wide,
            Some((DType::F32, DType::F32)),
        );
        let start = oracle.theta.clone();
        let mut opt = Optimizer::new(b.clone(), cfg, groups.clone())
            .map_err(|e| fail(format!("{name}: {e}")))?;
        for (si, pres) in present.iter().enumerate() {
            let step = si + 1;
            let grads = random_grads(&mut r, &lens, 0.05);
            let some: Vec<Option<Vec<f32>>> = grads
                .iter()
                .zip(pres)
                .map(|(g, &p)| p.then(|| g.clone()))
                .collect();
            let before_p = model
                .read_params(b)
                .map_err(|e| backend_failure(check, e))?;
            let before_s = model.read_state(b).map_err(|e| backend_failure(check, e))?;
            let before_t = model.steps();
            let rep = model
                .step_present(&mut opt, &some)
                .map_err(|e| fail(format!("{name} step {step}: {e}")))?;
            let wide_some: Vec<Option<Vec<f64>>> =
                some.iter().map(|g| g.as_ref().map(|g| widen(g))).collect();
            oracle.step_some(&wide_some);
            if !rep.applied() || rep.step != step as u64 {
                return Err(fail(format!("{name} step {step}: report {rep:?}")));
            }
            let got = model
                .read_params(b)
                .map_err(|e| backend_failure(check, e))?;
            let state = model.read_state(b).map_err(|e| backend_failure(check, e))?;
            let counts = model.steps();
            if counts != oracle.tensor_t {
                return Err(fail(format!(
                    "{name} step {step}: tensors' counts {counts:?}, expected {:?}",
                    oracle.tensor_t
                )));
            }
            for ti in 0..lens.len() {
                if !pres[ti] {
                    let same = got[ti]
                        .iter()
                        .zip(&before_p[ti])
                        .all(|(a, b)| a.to_bits() == b.to_bits())
                        && state[ti] == before_s[ti]
                        && counts[ti] == before_t[ti];
                    if !same {
                        return Err(fail(format!(
                            "{name} step {step}: tensor {ti} had no gradient but changed"
                        )));
                    }
                }
                see_tensor(
                    &mut worst,
                    tol,
                    &got[ti],
                    &oracle.theta[ti],
                    &start[ti],
                    |j| format!("{name} step {step} tensor {ti} θ[{j}]"),
                );
            }
            if !worst.ok() {
                return worst.into_result(check);
            }
        }
    }
    worst.into_result(check)
}

/// A mixed-precision model stepped once: one slice per storage pair, bundled in a tuple.
struct Mixed<B: Harness> {
    a: Model<B, f32, f32>,
    c: Model<B, bf16, f32>,
    d: Model<B, f16, f32>,
    e: Model<B, f32, bf16>,
    f: Model<B, bf16, bf16>,
}

const MIXED_TYPES: [(DType, DType); 5] = [
    (DType::F32, DType::F32),
    (DType::Bf16, DType::F32),
    (DType::F16, DType::F32),
    (DType::F32, DType::Bf16),
    (DType::Bf16, DType::Bf16),
];

impl<B: Harness> Mixed<B> {
    fn new(
        b: &mut B,
        cfg: &Config,
        groups: &[ParamGroup],
        init: &[Vec<f32>],
    ) -> Result<Self, Failure> {
        let one = |i: usize| (vec![init[i].clone()], vec![i % groups.len()]);
        macro_rules! model {
            ($i:expr) => {{
                let (x, g) = one($i);
                Model::new(b, cfg, groups, &x, &g)?
            }};
        }
        Ok(Mixed {
            a: model!(0),
            c: model!(1),
            d: model!(2),
            e: model!(3),
            f: model!(4),
        })
    }

    fn step<G: AsRef<[ParamGroup]>>(
        &mut self,
        opt: &mut Optimizer<B, G>,
        grads: &[Vec<f32>],
    ) -> Result<Result<StepReport, sage_core::Error<B::Error>>, B::Error> {
        let b = opt.backend_mut();
        let ga = self.a.upload_grads(b, &grads[0..1])?;
        let gc = self.c.upload_grads(b, &grads[1..2])?;
        let gd = self.d.upload_grads(b, &grads[2..3])?;
        let ge = self.e.upload_grads(b, &grads[3..4])?;
        let gf = self.f.upload_grads(b, &grads[4..5])?;
        let mut set = (
            self.a.tensors(&ga, None),
            self.c.tensors(&gc, None),
            self.d.tensors(&gd, None),
            self.e.tensors(&ge, None),
            self.f.tensors(&gf, None),
        );
        Ok(opt.step(&mut set))
    }

    fn params(&self, b: &mut B) -> Result<Vec<Vec<f32>>, B::Error> {
        let mut out = self.a.read_params(b)?;
        out.extend(self.c.read_params(b)?);
        out.extend(self.d.read_params(b)?);
        out.extend(self.e.read_params(b)?);
        out.extend(self.f.read_params(b)?);
        Ok(out)
    }

    fn state(&self, b: &mut B) -> Result<Vec<[Vec<f32>; 3]>, B::Error> {
        let mut out = self.a.read_state(b)?;
        out.extend(self.c.read_state(b)?);
        out.extend(self.d.read_state(b)?);
        out.extend(self.e.read_state(b)?);
        out.extend(self.f.read_state(b)?);
        Ok(out)
    }

    fn steps(&self) -> Vec<u64> {
        [
            self.a.steps(),
            self.c.steps(),
            self.d.steps(),
            self.e.steps(),
            self.f.steps(),
        ]
        .concat()
    }
}

/// One counted step over tensors of f32, bf16 and f16 parameters with f32 and bf16 state:
/// one global norm (global clipping sees them all), every count advanced once, each tensor
/// equal to the float64 oracle rounding its own types; a NaN in one tensor leaves every
/// tensor of every type untouched.
pub fn mixed_precision_step<B: Harness>(b: &mut B) -> Result<(), Failure> {
    let check = "mixed precisions in one step";
    let fail = |d: String| Failure::new(check, d);
    super::equivalence::need(b, DType::Bf16, check)?;
    super::equivalence::need(b, DType::F16, check)?;
    let lens = [4097usize, 17, 9, 1023, 33];
    let cfg = Config::reference(Algorithm::adamw(), 2e-3)
        .beta0(0.7)
        .global_clip(0.1)
        .per_tensor_clip(0.05);
    let groups = vec![ParamGroup::sage().weight_decay(0.01), ParamGroup::plain()];
    let gof: Vec<usize> = (0..lens.len()).map(|i| i % groups.len()).collect();
    let mut r = rng(8100);
    let init = random_params(&mut r, &lens);
    let mut model = Mixed::new(b, &cfg, &groups, &init)?;
    let wide: Vec<Vec<f64>> = init.iter().map(|x| widen(x)).collect();
    let storage: Vec<Option<(DType, DType)>> = MIXED_TYPES.iter().map(|&t| Some(t)).collect();
    let mut oracle = Reference::mixed(cfg, groups.clone(), gof, &wide, &storage);
    let start = oracle.theta.clone();
    let mut opt =
        Optimizer::new(b.clone(), cfg, groups.clone()).map_err(|e| fail(e.to_string()))?;
    let mut worst = Worst::default();
    for step in 1..=4u64 {
        let mut grads = random_grads(&mut r, &lens, 0.05);
        if step == 3 {
            // A NaN in the f16 tensor: nothing of any type may change.
            grads[2][4] = f32::NAN;
            let before = (
                model.params(b).map_err(|e| backend_failure(check, e))?,
                model.state(b).map_err(|e| backend_failure(check, e))?,
            );
            let rep = model
                .step(&mut opt, &grads)
                .map_err(|e| backend_failure(check, e))?
                .map_err(|e| fail(format!("step {step}: {e}")))?;
            if rep.outcome != (Outcome::SkippedNonFinite { param: Some(2) }) {
                return Err(fail(format!("step {step}: NaN in tensor 2 gave {rep:?}")));
            }
            let after = (
                model.params(b).map_err(|e| backend_failure(check, e))?,
                model.state(b).map_err(|e| backend_failure(check, e))?,
            );
            let bits = |x: &Vec<Vec<f32>>| -> Vec<Vec<u32>> {
                x.iter()
                    .map(|t| t.iter().map(|v| v.to_bits()).collect())
                    .collect()
            };
            if bits(&before.0) != bits(&after.0) || before.1 != after.1 {
                return Err(fail(format!(
                    "step {step}: a skipped step changed a tensor"
                )));
            }
            if model.steps() != vec![2; lens.len()] || opt.steps() != 2 {
                return Err(fail(format!(
                    "step {step}: a skipped step moved counts to {:?} / {}",
                    model.steps(),
                    opt.steps()
                )));
            }
            continue;
        }
        let rep = model
            .step(&mut opt, &grads)
            .map_err(|e| backend_failure(check, e))?
            .map_err(|e| fail(format!("step {step}: {e}")))?;
        let wide_g: Vec<Vec<f64>> = grads.iter().map(|g| widen(g)).collect();
        oracle.step(&wide_g);
        let done = if step < 3 { step } else { step - 1 };
        if !rep.applied() || rep.tensors != lens.len() || opt.steps() != done {
            return Err(fail(format!("step {step}: report {rep:?}")));
        }
        if model.steps() != vec![done; lens.len()] {
            return Err(fail(format!(
                "step {step}: counts {:?}, each should be {done}",
                model.steps()
            )));
        }
        let got = model.params(b).map_err(|e| backend_failure(check, e))?;
        for (ti, &(p, s)) in MIXED_TYPES.iter().enumerate() {
            let tol = Tol::for_types(p, s);
            see_tensor(
                &mut worst,
                tol,
                &got[ti],
                &oracle.theta[ti],
                &start[ti],
                |j| format!("step {step} tensor {ti} ({p} params, {s} state) θ[{j}]"),
            );
        }
        if !worst.ok() {
            break;
        }
    }
    worst.into_result(check)
}

/// Norms from outside: each gradient cut into pieces on the chunk grid (as ranks holding
/// shards would), the pieces' chunk partials computed separately, gathered and reduced with
/// `norm::reduce`, and the step given those norms — equal bit for bit to the step that
/// computes its own norms, with global and per-tensor clipping. The optimizer's own partials
/// equal the pieces' gathered partials, and a non-finite total given from outside skips the
/// step with nothing changed.
pub fn norms_from_outside<B: Harness>(b: &mut B) -> Result<(), Failure> {
    let check = "norms from outside == own norms";
    let fail = |d: String| Failure::new(check, d);
    let lens = [3 * NORM_CHUNK + 5, 2 * NORM_CHUNK, 17, NORM_CHUNK + 1];
    let cfg = Config::reference(Algorithm::adamw(), 2e-3)
        .global_clip(0.5)
        .per_tensor_clip(0.2);
    let groups = vec![ParamGroup::sage().weight_decay(0.01), ParamGroup::plain()];
    let gof = vec![0, 1, 0, 1];
    let mut r = rng(8200);
    let init = random_params(&mut r, &lens);
    let mut own = Model::<B, f32, f32>::new(b, &cfg, &groups, &init, &gof)?;
    let mut given = Model::<B, f32, f32>::new(b, &cfg, &groups, &init, &gof)?;
    let mut o1 = Optimizer::new(b.clone(), cfg, groups.clone()).map_err(|e| fail(e.to_string()))?;
    let mut o2 = Optimizer::new(b.clone(), cfg, groups.clone()).map_err(|e| fail(e.to_string()))?;
    for step in 1..=3 {
        let grads = random_grads(&mut r, &lens, 0.05);
        // Every piece's partials, computed on its own buffer, gathered in order.
        let mut gathered = Vec::new();
        for g in &grads {
            let cuts = [
                0,
                NORM_CHUNK.min(g.len()),
                (2 * NORM_CHUNK).min(g.len()),
                g.len(),
            ];
            for w in cuts.windows(2) {
                if w[0] == w[1] {
                    continue;
                }
                let piece = b
                    .upload(&g[w[0]..w[1]])
                    .map_err(|e| backend_failure(check, e))?;
                let mut out = vec![0f64; chunk_count(w[1] - w[0])];
                b.sq_norm_chunks(B::buf(&piece), 0, &mut out)
                    .map_err(|e| backend_failure(check, e))?;
                gathered.extend(out);
            }
        }
        let gb = given
            .upload_grads(b, &grads)
            .map_err(|e| backend_failure(check, e))?;
        let mut ts = given.tensors(&gb, None);
        let mut partials = vec![0f64; o2.partials_len(&mut ts).map_err(|e| fail(e.to_string()))?];
        o2.grad_norm_partials(&mut ts, &mut partials)
            .map_err(|e| fail(format!("step {step}: {e}")))?;
        if partials
            .iter()
            .map(|x| x.to_bits())
            .ne(gathered.iter().map(|x| x.to_bits()))
        {
            return Err(fail(format!(
                "step {step}: the optimizer's chunk partials differ from the pieces' gathered partials"
            )));
        }
        let mut per = vec![0f64; lens.len()];
        let total = norm::reduce(&gathered, &lens, &mut per)
            .ok_or_else(|| fail("norm::reduce refused matching lengths".into()))?;
        let r2 = o2
            .step_with_norms(
                &mut ts,
                GlobalNorms {
                    total_sq: total,
                    per_tensor_sq: &per,
                },
            )
            .map_err(|e| fail(format!("step {step}: {e}")))?;
        drop(ts);
        let r1 = own
            .step(&mut o1, &grads)
            .map_err(|e| fail(format!("step {step}: {e}")))?;
        if r1.grad_norm.map(f64::to_bits) != r2.grad_norm.map(f64::to_bits)
            || r1.clip_scale.to_bits() != r2.clip_scale.to_bits()
        {
            return Err(fail(format!(
                "step {step}: reports differ: {r1:?} vs {r2:?}"
            )));
        }
        let (p1, p2) = (
            own.read_params(b).map_err(|e| backend_failure(check, e))?,
            given
                .read_params(b)
                .map_err(|e| backend_failure(check, e))?,
        );
        for (ti, (a, c)) in p1.iter().zip(&p2).enumerate() {
            if let Some(j) = a
                .iter()
                .zip(c)
                .position(|(x, y)| x.to_bits() != y.to_bits())
            {
                return Err(fail(format!(
                    "step {step} tensor {ti}[{j}]: own norms {} vs given norms {}",
                    a[j], c[j]
                )));
            }
        }
    }
    // A non-finite gradient elsewhere (another rank): the given total says so.
    let grads = random_grads(&mut r, &lens, 0.05);
    let gb = given
        .upload_grads(b, &grads)
        .map_err(|e| backend_failure(check, e))?;
    let before = given
        .read_params(b)
        .map_err(|e| backend_failure(check, e))?;
    let counts = given.steps();
    let mut ts = given.tensors(&gb, None);
    let per = vec![1.0; lens.len()];
    let rep = o2
        .step_with_norms(
            &mut ts,
            GlobalNorms {
                total_sq: f64::NAN,
                per_tensor_sq: &per,
            },
        )
        .map_err(|e| fail(e.to_string()))?;
    drop(ts);
    if rep.outcome != (Outcome::SkippedNonFinite { param: None })
        || given
            .read_params(b)
            .map_err(|e| backend_failure(check, e))?
            != before
        || given.steps() != counts
    {
        return Err(fail(format!(
            "a NaN reported from outside did not skip cleanly: {rep:?}"
        )));
    }
    // Wrong number of per-tensor norms: an error naming the counts, nothing changed.
    let mut ts = given.tensors(&gb, None);
    match o2.step_with_norms(
        &mut ts,
        GlobalNorms {
            total_sq: 1.0,
            per_tensor_sq: &per[..2],
        },
    ) {
        Err(e) if e.kind() == sage_core::ErrorKind::LengthMismatch => Ok(()),
        other => Err(fail(format!("2 norms for 4 tensors: {other:?}"))),
    }
}

/// The configurations the size checks run: one per base algorithm, with clipping.
fn size_cases() -> Vec<Case> {
    cases()
        .into_iter()
        .filter(|c| {
            matches!(
                c.name.as_str(),
                "paper sgd-momentum"
                    | "paper adam clip global+tensor"
                    | "reference adamw"
                    | "reference adamax"
            )
        })
        .collect()
}

/// Tensors past a GPU backend's chunk of 65,536 elements and a CPU backend's thread split, with
/// odd tails, against the float64 oracle: parameters, state, norms and the report.
pub fn long_tensors<B: Harness>(b: &mut B) -> Result<(), Failure> {
    let check = "long tensors (past 65,536, odd tails) vs float64";
    let lens = [65_536 + 4_099, 5];
    for (i, c) in size_cases().iter().enumerate() {
        let mut c2 = Case {
            name: c.name.clone(),
            cfg: c.cfg.global_clip(0.5),
            ill_conditioned: c.ill_conditioned,
            weight_decay: c.weight_decay,
        };
        c2.name.push_str(" +global clip");
        differential_with::<B, f32, f32>(b, check, &c2, 2, 9000 + i as u64, &lens, 0.02)?;
    }
    Ok(())
}

/// More tensors in one step than a GPU backend launches at once (OpenCL batches 16): 40 small
/// tensors of every tail length, against the float64 oracle.
pub fn many_tensors<B: Harness>(b: &mut B) -> Result<(), Failure> {
    let check = "many tensors in one step vs float64";
    let lens: Vec<usize> = (0..40).map(|i| 1 + (i * 37) % 300).collect();
    for (i, c) in size_cases().iter().enumerate() {
        differential_with::<B, f32, f32>(b, check, c, 3, 9100 + i as u64, &lens, 0.02)?;
    }
    Ok(())
}

/// Gradients near f32's largest values: their squared norm is far past f32's range but
/// finite in f64, so clipping must scale them and the guard must not skip the step.
pub fn huge_gradients<B: Harness>(b: &mut B) -> Result<(), Failure> {
    let check = "huge finite gradients clip, never skip";
    let lens = [NORM_CHUNK + 9, 17];
    for (i, c) in size_cases().iter().enumerate() {
        let c2 = Case {
            name: format!("{} grads ~1e30", c.name),
            cfg: c.cfg.global_clip(1.0),
            ill_conditioned: c.ill_conditioned,
            weight_decay: c.weight_decay,
        };
        differential_with::<B, f32, f32>(b, check, &c2, 2, 9200 + i as u64, &lens, 1e30)?;
    }
    Ok(())
}

/// A magnitude of class `class`: 0, subnormal (2⁻¹³⁰..2⁻¹²⁶, at least 17 bits of precision
/// left), the smallest normals (2⁻¹²⁶..2⁻¹²⁰), or up to `big`.
fn magnitude(r: &mut StdRng, class: usize, big: f32) -> f32 {
    let min = f32::MIN_POSITIVE;
    match class % 4 {
        0 => 0.0,
        1 => r.gen_range(min / 16.0..min),
        2 => r.gen_range(min..min * 64.0),
        _ => r.gen_range(big / 10.0..big),
    }
}

fn random_sign(r: &mut StdRng) -> f32 {
    if r.gen_bool(0.5) {
        1.0
    } else {
        -1.0
    }
}

/// Subnormal parameters, gradients and state (every pairing of zero, subnormal, smallest
/// normal and ordinary θ and g) under the paper preset, whose ε keeps s well conditioned
/// for tiny sensitivities: against the float64 oracle with an absolute floor of a few
/// subnormal steps, so a backend that flushes subnormals to zero (FTZ/DAZ) fails — a flushed
/// value is 100% off, where the differential checks' floor of 1e-7 hides it.
///
/// A value computed from subnormals keeps only their bits, and Adam's `m/(√v + ε)` scales an
/// absolute error of a few subnormal steps up by ~1e4: each element's gradient keeps its sign
/// and no group decays, so no step cancels (`m` of opposite terms, `g + wd·θ`) down to those
/// few steps. The relative tolerance is then 1e-3.
pub fn subnormals<B: Harness>(b: &mut B) -> Result<(), Failure> {
    let check = "subnormal values kept (no flush to zero)";
    let floor = 64.0 * f64::from(f32::from_bits(1));
    let rel = 1e-3;
    let mut gs = groups();
    for g in &mut gs {
        g.weight_decay = 0.0;
    }
    let gof = group_of(LENGTHS.len());
    let names = [
        "paper sgd",
        "paper sgd-momentum",
        "paper adam",
        "paper adamw",
        "paper adamax",
    ];
    let mut worst = Worst::default();
    for (ci, c) in cases()
        .iter()
        .filter(|c| names.contains(&c.name.as_str()))
        .enumerate()
    {
        let mut r = rng(9400 + ci as u64);
        // θ's class cycles fastest, g's next: 16 consecutive elements hold every pairing.
        let init: Vec<Vec<f32>> = LENGTHS
            .iter()
            .map(|&n| {
                let mut x = |j| magnitude(&mut r, j, 0.1) * random_sign(&mut r);
                (0..n).map(&mut x).collect()
            })
            .collect();
        let sign: Vec<Vec<f32>> = LENGTHS
            .iter()
            .map(|&n| (0..n).map(|_| random_sign(&mut r)).collect())
            .collect();
        let mut model = Model::<B, f32, f32>::new(b, &c.cfg, &gs, &init, &gof)?;
        let wide: Vec<Vec<f64>> = init.iter().map(|x| widen(x)).collect();
        let storage = Some((DType::F32, DType::F32));
        let mut oracle = Reference::new(c.cfg, gs.clone(), gof.clone(), &wide, storage);
        let start = oracle.theta.clone();
        let mut opt = Optimizer::new(b.clone(), c.cfg, gs.clone())
            .map_err(|e| Failure::new(check, format!("{}: {e}", c.name)))?;
        for step in 1..=3 {
            let grads: Vec<Vec<f32>> = sign
                .iter()
                .map(|s| {
                    let mut g = |j: usize| s[j] * magnitude(&mut r, j / 4, 0.02);
                    (0..s.len()).map(&mut g).collect()
                })
                .collect();
            let before = [oracle.m.clone(), oracle.v.clone(), oracle.ibar.clone()];
            model
                .step(&mut opt, &grads)
                .map_err(|e| Failure::new(check, format!("{} step {step}: {e}", c.name)))?;
            oracle.step(&grads.iter().map(|g| widen(g)).collect::<Vec<_>>());
            let got = model
                .read_params(b)
                .map_err(|e| backend_failure(check, e))?;
            let state = model.read_state(b).map_err(|e| backend_failure(check, e))?;
            let after = [&oracle.m, &oracle.v, &oracle.ibar];
            for (ti, t) in got.iter().enumerate() {
                for (j, &a) in t.iter().enumerate() {
                    let e = oracle.theta[ti][j];
                    let abs = floor + 1e-4 * (e - start[ti][j]).abs();
                    worst.see(a as f64, e, abs, rel, || {
                        format!("{} step {step} tensor {ti} θ[{j}]", c.name)
                    });
                }
                for (k, name) in ["m", "v", "ibar"].iter().enumerate() {
                    for (j, &a) in state[ti][k].iter().enumerate() {
                        // A state value is a sum: its rounding follows its larger term.
                        let (e, old) = (after[k][ti][j], before[k][ti][j]);
                        let abs = floor + 1e-5 * e.abs().max(old.abs());
                        worst.see(a as f64, e, abs, rel, || {
                            format!("{} step {step} tensor {ti} {name}[{j}]", c.name)
                        });
                    }
                }
            }
            if !worst.ok() {
                return worst.into_result(check);
            }
        }
    }
    worst.into_result(check)
}

/// A NaN or ±Inf already in a parameter (not the gradient): the guard cannot see it before the
/// update, so the step applies; a backend that counts non-finite parameters in its update
/// pass must name the tensor (and only when it counts may it say it checked). Clean steps
/// report nothing. A backend that does not count passes; [`non_finite_params_counted`] is the
/// same check for one that must.
pub fn non_finite_params_reported<B: Harness>(b: &mut B) -> Result<(), Failure> {
    non_finite_params(b, "non-finite parameters reported", false)
}

/// [`non_finite_params_reported`] for a backend that counts non-finite parameters in its update
/// pass ([`Options::counts_non_finite`](crate::suite::Options)): every step must say it
/// counted (`params_checked`), so a backend that stops counting fails.
pub fn non_finite_params_counted<B: Harness>(b: &mut B) -> Result<(), Failure> {
    non_finite_params(b, "non-finite parameters counted", true)
}

/// Tensors of the non-finite parameter checks: more than a GPU launch batch (OpenCL takes 16
/// per launch), one past a CUDA chunk (65,536 elements), tails of every kind.
fn non_finite_lens() -> Vec<usize> {
    let mut lens = vec![9usize, 4097, 17];
    lens.extend((0..14).map(|i| 1 + i * 5));
    lens.push(65_536 + 9);
    lens
}

fn non_finite_params<B: Harness>(
    b: &mut B,
    check: &'static str,
    require: bool,
) -> Result<(), Failure> {
    let fail = |d: String| Failure::new(check, d);
    let lens = non_finite_lens();
    let last = lens.len() - 1;
    let adamw = Config::reference(Algorithm::adamw(), 2e-3).global_clip(1.0);
    let sage = vec![ParamGroup::sage().weight_decay(0.01)];
    let gof = vec![0; lens.len()];
    let mut r = rng(9300);
    // (value, tensor, element): in the first chunk of a middle tensor, and only past the first
    // launch batch and the first CUDA chunk (in its tail) of the last tensor. A non-finite θ
    // stays so, whether counted as read or as stored.
    let mut cases = Vec::new();
    for (bad, tensor, at) in [
        (f32::NAN, 1, 2049),
        (f32::INFINITY, 1, 2049),
        (f32::NEG_INFINITY, last, 65_536 + 3),
    ] {
        let mut init = random_params(&mut r, &lens);
        init[tensor][at] = bad;
        let grads = random_grads(&mut r, &lens, 0.05);
        let what = format!("{bad} in θ of tensor {tensor} (element {at})");
        cases.push((what, adamw, sage.clone(), init, grads, tensor));
    }
    // A finite θ that the update itself takes past f32's range (θ = MAX minus a finite
    // gradient of −MAX/2 at rate 1: +Inf): counted as stored, not as read.
    let mut init = random_params(&mut r, &lens);
    let mut grads = random_grads(&mut r, &lens, 0.05);
    let (tensor, at) = (last, 65_536 + 5);
    (init[tensor][at], grads[tensor][at]) = (f32::MAX, -f32::MAX / 2.0);
    cases.push((
        format!("θ of tensor {tensor} (element {at}) overflowing in the update"),
        Config::paper(Algorithm::sgd(0.0), 1.0),
        vec![ParamGroup::plain()],
        init,
        grads,
        tensor,
    ));
    for (what, cfg, groups, init, grads, tensor) in cases {
        let mut model = Model::<B, f32, f32>::new(b, &cfg, &groups, &init, &gof)?;
        let mut opt =
            Optimizer::new(b.clone(), cfg, groups.clone()).map_err(|e| fail(e.to_string()))?;
        let rep = model
            .step(&mut opt, &grads)
            .map_err(|e| fail(format!("{what}: {e}")))?;
        if !rep.applied() {
            return Err(fail(format!(
                "{what} (finite gradients) skipped the step: {rep:?}"
            )));
        }
        if require && !rep.params_checked {
            return Err(fail(format!(
                "the backend counts non-finite parameters, but the step says it did not: {rep:?}"
            )));
        }
        let want = if rep.params_checked {
            Some(tensor)
        } else {
            None
        };
        if rep.non_finite_params != want {
            return Err(fail(format!(
                "{what}: report says {:?} (counted: {})",
                rep.non_finite_params, rep.params_checked
            )));
        }
        // The next step from clean parameters reports nothing.
        let mut clean =
            Model::<B, f32, f32>::new(b, &cfg, &groups, &random_params(&mut r, &lens), &gof)?;
        let clean_grads = random_grads(&mut r, &lens, 0.05);
        let rep = clean
            .step(&mut opt, &clean_grads)
            .map_err(|e| fail(format!("clean step: {e}")))?;
        if rep.non_finite_params.is_some() || (require && !rep.params_checked) {
            return Err(fail(format!(
                "a clean step reported {:?} (counted: {})",
                rep.non_finite_params, rep.params_checked
            )));
        }
    }
    Ok(())
}
