//! The CUDA path (feature `cuda`): candle CUDA variables of every float type stepped in place by
//! sage-cuda equal the same variables on the CPU stepped by sage-cpu, bit for bit, over several
//! steps with gradients left out, global clipping and bf16 state; state files move between the
//! two. Without a CUDA device the test says so and passes, unless `SAGE_REQUIRE_CUDA=1`.
#![cfg(feature = "cuda")]

use candle_core::{DType, Device, Tensor, Var};
use sage_candle::{ConfigCheck, GroupRules, SageOptimizer, SageParams};
use sage_core::{Algorithm, Config, ParamGroup, Schedule};
use sage_cpu::Cpu;

fn device() -> Option<Device> {
    match Device::new_cuda(0) {
        Ok(d) => Some(d),
        Err(e) if std::env::var("SAGE_REQUIRE_CUDA").as_deref() == Ok("1") => {
            panic!("SAGE_REQUIRE_CUDA=1 but no CUDA device: {e}")
        }
        Err(e) => {
            eprintln!("no CUDA device ({e}): the CUDA path is not exercised");
            None
        }
    }
}

const SHAPES: [(&str, DType, &[usize]); 5] = [
    ("a.weight", DType::F32, &[64, 300]),
    ("a.bias", DType::F32, &[300]),
    ("b.weight", DType::BF16, &[300, 70]),
    ("b.bias", DType::F16, &[70]),
    ("norm.weight", DType::BF16, &[70]),
];

fn vars(device: &Device) -> Vec<(String, Var)> {
    SHAPES
        .iter()
        .enumerate()
        .map(|(i, &(n, dt, shape))| {
            let len: usize = shape.iter().product();
            let v: Vec<f32> = (0..len)
                .map(|k| (((k * 7 + i * 13) % 101) as f32 / 50.0 - 1.0) * 0.3 + 0.01)
                .collect();
            let t = Tensor::from_vec(v, shape, &Device::Cpu)
                .unwrap()
                .to_dtype(dt)
                .unwrap()
                .to_device(device)
                .unwrap();
            (n.to_string(), Var::from_tensor(&t).unwrap())
        })
        .collect()
}

/// A loss whose gradient for each parameter is a fixed tensor `G_i(step)` (the same bits on
/// either device), leaving out parameter `skip`.
fn grads(
    vs: &[(String, Var)],
    step: usize,
    skip: Option<usize>,
) -> candle_core::backprop::GradStore {
    let d = vs[0].1.device().clone();
    let mut loss = Tensor::new(0f32, &d).unwrap();
    for (i, (_, v)) in vs.iter().enumerate() {
        if Some(i) == skip {
            continue;
        }
        let n = v.elem_count();
        let g: Vec<f32> = (0..n)
            .map(|k| (((k * 31 + step * 17 + i) % 97) as f32 / 48.0 - 1.0) * 1e-2)
            .collect();
        let g = Tensor::from_vec(g, v.shape(), &Device::Cpu)
            .unwrap()
            .to_dtype(v.dtype())
            .unwrap()
            .to_device(&d)
            .unwrap();
        let term = (v.as_tensor() * g).unwrap().to_dtype(DType::F32).unwrap();
        loss = (loss + term.sum_all().unwrap()).unwrap();
    }
    loss.backward().unwrap()
}

fn bits(vs: &[(String, Var)]) -> Vec<Vec<u32>> {
    vs.iter()
        .map(|(_, v)| {
            let t = v
                .as_tensor()
                .to_device(&Device::Cpu)
                .unwrap()
                .flatten_all()
                .unwrap();
            match t.dtype() {
                DType::F32 => t
                    .to_vec1::<f32>()
                    .unwrap()
                    .iter()
                    .map(|x| x.to_bits())
                    .collect(),
                DType::F16 => t
                    .to_vec1::<sage_core::f16>()
                    .unwrap()
                    .iter()
                    .map(|x| x.to_bits() as u32)
                    .collect(),
                _ => t
                    .to_vec1::<sage_core::bf16>()
                    .unwrap()
                    .iter()
                    .map(|x| x.to_bits() as u32)
                    .collect(),
            }
        })
        .collect()
}

fn params() -> SageParams {
    let rules = GroupRules::new(
        vec![
            ParamGroup::sage().weight_decay(0.01),
            ParamGroup::sage(),
            ParamGroup::plain(),
        ],
        2,
    )
    .rule("norm.*", 2)
    .rule("*.weight", 0)
    .rule("*.bias", 1);
    let config = Config::reference(Algorithm::adamw(), 1e-2)
        .beta0(0.7)
        .schedule(Schedule::WarmupLinearPpb {
            warmup: 0.2,
            t_total: 10,
        })
        .global_clip(0.05);
    SageParams::new(config, rules).bf16_state()
}

#[test]
fn cuda_steps_in_place_and_equals_the_cpu() {
    let Some(gpu) = device() else { return };
    let (vc, vg) = (vars(&Device::Cpu), vars(&gpu));
    assert_eq!(bits(&vc), bits(&vg));
    let mut cpu = SageOptimizer::with_backend(Cpu, vc.clone(), params()).unwrap();
    let mut cuda = SageOptimizer::with_backend(Cpu, vg.clone(), params()).unwrap();
    assert!(cuda.device().is_cuda());
    let before: Vec<_> = vg.iter().map(|(_, v)| v.as_tensor().id()).collect();
    for step in 0..6 {
        let skip = [None, Some(1), None, Some(3), Some(0), None][step];
        cpu.step_grads(&grads(&vc, step, skip)).unwrap();
        cuda.step_grads(&grads(&vg, step, skip)).unwrap();
        assert_eq!(cpu.last_report(), cuda.last_report(), "step {step}");
        assert!(cuda.last_report().unwrap().clip_scale < 1.0);
        assert_eq!(
            bits(&vc),
            bits(&vg),
            "CUDA differs from the CPU after step {step}"
        );
    }
    // In place: the same tensors, their storage written by sage-cuda.
    let after: Vec<_> = vg.iter().map(|(_, v)| v.as_tensor().id()).collect();
    assert_eq!(before, after);
    assert_eq!(cpu.param_steps(), cuda.param_steps());
    assert_eq!(cpu.sensitivities().unwrap(), cuda.sensitivities().unwrap());
    // A state file saved on the GPU resumes on the CPU, and the reverse.
    let from_gpu = cuda.state_to_bytes().unwrap();
    let from_cpu = cpu.state_to_bytes().unwrap();
    cpu.load_state_bytes(&from_gpu, ConfigCheck::Exact).unwrap();
    cuda.load_state_bytes(&from_cpu, ConfigCheck::Exact)
        .unwrap();
    for step in 6..8 {
        cpu.step_grads(&grads(&vc, step, None)).unwrap();
        cuda.step_grads(&grads(&vg, step, None)).unwrap();
        assert_eq!(bits(&vc), bits(&vg), "after resuming, step {step}");
    }
    eprintln!("candle CUDA path: 8 steps on {gpu:?} equal the CPU bit for bit");
}
