//! Values of the schedules at hand-computed points, the presets' scalars, validation messages.

use sage_core::coeffs::{clip_coefficient, kind};
use sage_core::error::Name;
use sage_core::{
    Algorithm, Coeffs, Config, DecayMode, EpsStyle, ParamGroup, Preset, Schedule, ScheduleClock,
    StepScalars,
};

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() < 1e-12
}

#[test]
fn warmup_linear_ppb_matches_pytorch_pretrained_bert() {
    let s = Schedule::WarmupLinearPpb {
        warmup: 0.1,
        t_total: 20,
    };
    // x = t/20: 0.05 → 0.5; 0.1 is not < 0.1 → 1 − 0.1; 1.0 → 0; past the end it goes negative.
    assert!(close(s.factor(1), 0.5));
    assert!(close(s.factor(2), 0.9));
    assert!(close(s.factor(20), 0.0));
    assert!(close(s.factor(22), -0.1));
}

#[test]
fn hugging_face_schedules_count_updates_done() {
    let lin = Schedule::LinearWarmupDecay {
        warmup_steps: 2,
        total_steps: 6,
    };
    // k = t − 1 = 0, 1 in warm-up; then (6 − k)/4.
    let got: Vec<f64> = (1..=8).map(|t| lin.factor(t)).collect();
    let want = [0.0, 0.5, 1.0, 0.75, 0.5, 0.25, 0.0, 0.0];
    assert!(got.iter().zip(want).all(|(a, b)| close(*a, b)), "{got:?}");

    let cos = Schedule::CosineWarmup {
        warmup_steps: 1,
        total_steps: 5,
        cycles: 0.5,
    };
    // k = 0 warm-up; then progress (k − 1)/4: 0 → 1, 0.5 → 0.5, 1 → 0.
    assert!(close(cos.factor(1), 0.0));
    assert!(close(cos.factor(2), 1.0));
    assert!(close(cos.factor(4), 0.5));
    assert!(close(cos.factor(6), 0.0));
}

#[test]
fn fairseq_inverse_sqrt() {
    let s = Schedule::InverseSqrt {
        warmup_steps: 4,
        init_factor: 0.2,
    };
    assert!(close(s.factor(1), 0.2)); // k = 0
    assert!(close(s.factor(3), 0.2 + 0.8 * 2.0 / 4.0));
    assert!(close(s.factor(5), 1.0)); // k = 4 = warmup
    assert!(close(s.factor(17), 0.5)); // sqrt(4/16)
}

#[test]
fn reference_adamax_schedule_lags_one_step() {
    let cfg = Config::reference(Algorithm::adamax(), 1e-3).schedule(Schedule::WarmupLinearPpb {
        warmup: 0.1,
        t_total: 20,
    });
    assert_eq!(cfg.schedule_clock, ScheduleClock::Lagged);
    assert_eq!(StepScalars::new(&cfg, 1).lr, 0.0); // the authors' first Adamax step has η_t = 0
    assert!(close(StepScalars::new(&cfg, 2).lr, 1e-3 * 0.5));
}

#[test]
fn presets_set_the_documented_quirks() {
    let p = Config::paper(Algorithm::adam(), 1e-3);
    assert_eq!(p.preset, Preset::Paper);
    assert_eq!((p.sensitivity.eps_num, p.sensitivity.eps_den), (1e-6, 1e-6));
    assert!(p.sensitivity.bias_correction);
    assert_eq!(p.decay, DecayMode::L2);
    assert!(
        !Config::paper(Algorithm::sgd(0.9), 0.1)
            .sensitivity
            .bias_correction
    );

    let r = Config::reference(Algorithm::adamw(), 1e-3);
    assert_eq!((r.sensitivity.eps_num, r.sensitivity.eps_den), (0.0, 1e-12));
    assert_eq!(r.decay, DecayMode::DecoupledAfterBaseRate);
    assert_eq!(r.eps_style, EpsStyle::Authors);
    let x = Config::reference(Algorithm::adamax(), 1e-3);
    assert_eq!(x.decay, DecayMode::InStep);
    assert!(!x.bias_correction && !x.sensitivity.bias_correction);
}

#[test]
fn reference_adamw_coefficients() {
    let cfg = Config::reference(Algorithm::adamw(), 2e-3).beta0(0.75);
    let g = ParamGroup::sage().weight_decay(0.01).lr_scale(0.5);
    let k = Coeffs::new(&cfg, &StepScalars::new(&cfg, 2), &g, 0.25);
    let (bc1, bc2) = (1.0 - 0.9f64.powi(2), 1.0 - 0.999f64.powi(2));
    assert_eq!(k.kind, kind::ADAM);
    assert!(k.sage());
    assert_eq!(k.step, (1e-3 * bc2.sqrt() / bc1) as f32);
    assert_eq!(k.ibar_div, (1.0 - 0.75f64.powi(2)) as f32);
    assert_eq!(k.post_decay, (2e-3 * 0.5 * 0.01) as f32); // base rate, times the group's scale
    assert_eq!((k.l2, k.pre_keep, k.grad_scale), (0.0, 1.0, 0.25));
    assert_eq!(k.alpha2, (1.0 - 0.999f64) as f32);
}

#[test]
fn clip_coefficient_is_torchs() {
    assert_eq!(clip_coefficient(1.0, 0.5), 1.0);
    assert!(close(clip_coefficient(1.0, 4.0), 1.0 / (4.0 + 1e-6)));
}

#[test]
fn validation_names_the_field() {
    let e = Config::paper(
        Algorithm::Adam {
            beta1: 0.9,
            beta2: 1.0,
        },
        1e-3,
    )
    .validate()
    .unwrap_err();
    assert_eq!(e.field, "betas.1");
    assert!(e.to_string().contains("[0, 1)"), "{e}");
    let e = Config::paper(Algorithm::adam(), f64::NAN)
        .validate()
        .unwrap_err();
    assert_eq!(e.field, "lr");
    let e = ParamGroup::plain().lr_scale(-1.0).validate(3).unwrap_err();
    assert_eq!((e.field, e.group), ("lr_scale", Some(3)));
    let nesterov_without_momentum = Algorithm::Sgd {
        momentum: 0.0,
        dampening: 0.0,
        nesterov: true,
    };
    assert_eq!(
        Config::paper(nesterov_without_momentum, 0.1)
            .validate()
            .unwrap_err()
            .field,
        "nesterov"
    );
    let bad_schedule = Config::paper(Algorithm::adam(), 1e-3).schedule(Schedule::WarmupLinearPpb {
        warmup: 1.5,
        t_total: 10,
    });
    assert_eq!(
        bad_schedule.validate().unwrap_err().field,
        "schedule.warmup"
    );
}

#[test]
fn long_names_are_cut_at_a_character_boundary() {
    let long = "é".repeat(40); // 80 bytes
    let n = Name::new(&long);
    assert!(n.as_str().len() <= 47 && n.as_str().ends_with('…'));
    assert!(n.as_str().starts_with("éé"));
    assert_eq!(Name::new("layer.0.q").as_str(), "layer.0.q");
}
