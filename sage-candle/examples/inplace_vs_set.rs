//! Times one optimizer step over MiniLM-sized encoder tensors two ways: the adapter's in-place
//! step (candle lends each variable's storage to one multi-tensor sage-core step), and the
//! alternative of copying each parameter out, stepping the copy and writing it back with
//! `Var::set`, on sage-cpu's portable and SIMD backends.
//! Run: `cargo run --release -p sage-candle --example inplace_vs_set`.

use std::time::Instant;

use candle_core::{Device, Tensor, Var};
use sage_candle::bert::Rng;
use sage_candle::{GroupRules, SageOptimizer, SageParams, SliceBackend};
use sage_core::{Algorithm, Config, Optimizer, ParamGroup, ParamTensor, TensorState};
use sage_cpu::{Cpu, SimdCpu};

fn main() -> candle_core::Result<()> {
    bench("portable Cpu", Cpu)?;
    let simd = SimdCpu::new();
    let name = format!(
        "SimdCpu ({}, {} threads)",
        simd.level(),
        simd.thread_count()
    );
    bench(&name, simd)
}

fn bench<B: SliceBackend + Clone>(backend_name: &str, backend: B) -> candle_core::Result<()> {
    // 6 layers of MiniLM-L6 (hidden 384, FFN 1536): 36 weight matrices, 10.6M parameters.
    let shapes: Vec<(usize, usize)> = (0..6)
        .flat_map(|_| {
            [(384, 384); 4]
                .into_iter()
                .chain([(1536, 384), (384, 1536)])
        })
        .collect();
    let mut rng = Rng::new(1);
    let mut rand = |n: usize, s: f32| -> Vec<f32> { (0..n).map(|_| s * rng.normal()).collect() };
    let make = |data: Vec<f32>, s: (usize, usize)| Tensor::from_vec(data, s, &Device::Cpu);
    let vars: Vec<(String, Var)> = shapes
        .iter()
        .enumerate()
        .map(|(i, &s)| {
            Ok((
                format!("w{i}"),
                Var::from_tensor(&make(rand(s.0 * s.1, 0.02), s)?)?,
            ))
        })
        .collect::<candle_core::Result<_>>()?;
    let grads: Vec<Tensor> = shapes
        .iter()
        .map(|&s| make(rand(s.0 * s.1, 1e-3), s))
        .collect::<candle_core::Result<_>>()?;
    let n: usize = shapes.iter().map(|s| s.0 * s.1).sum();
    let config = Config::reference(Algorithm::adamw(), 1e-4)
        .beta0(0.7)
        .global_clip(1.0);
    let group = ParamGroup::sage().weight_decay(0.01);
    let steps = 10;

    // In place, through the adapter. The gradient store comes from a loss that is linear in
    // every parameter (so its gradient is the fixed tensor above).
    let mut loss = Tensor::new(0f32, &Device::Cpu)?;
    for ((_, v), g) in vars.iter().zip(&grads) {
        loss = (loss + (v.as_tensor() * g)?.sum_all()?)?;
    }
    let store = loss.backward()?;
    let params = SageParams::new(config, GroupRules::single(group));
    let mut opt = SageOptimizer::with_backend(backend.clone(), vars.clone(), params)?;
    opt.step_grads(&store)?;
    let t = Instant::now();
    for _ in 0..steps {
        opt.step_grads(&store)?;
    }
    let inplace = t.elapsed().as_secs_f64() / steps as f64;

    // Copy out, step, `Var::set` back.
    let mut driver = Optimizer::new(backend, config, [group]).expect("valid");
    let mut states: Vec<TensorState<Vec<f32>>> = shapes
        .iter()
        .map(|s| TensorState::zeros(config.state_layout(true), s.0 * s.1))
        .collect();
    let gv: Vec<Vec<f32>> = grads
        .iter()
        .map(|g| g.flatten_all()?.to_vec1())
        .collect::<candle_core::Result<_>>()?;
    let mut time = 0.0;
    for i in 0..=steps {
        let t = Instant::now();
        let mut host: Vec<Vec<f32>> = vars
            .iter()
            .map(|(_, v)| v.as_tensor().flatten_all()?.to_vec1())
            .collect::<candle_core::Result<_>>()?;
        let mut ts: Vec<ParamTensor<'_, B, f32, f32>> = host
            .iter_mut()
            .zip(&mut states)
            .zip(&gv)
            .map(|((p, st), g)| ParamTensor::new(&mut p[..], &g[..], st.view()))
            .collect();
        driver.step(&mut ts).expect("valid step");
        drop(ts);
        for ((_, v), h) in vars.iter().zip(host) {
            v.set(&Tensor::from_vec(h, v.as_tensor().shape(), &Device::Cpu)?)?;
        }
        if i > 0 {
            time += t.elapsed().as_secs_f64();
        }
    }
    let copied = time / steps as f64;
    println!(
        "{n} parameters in {} tensors, AdamW-SAGE, {backend_name}, mean of {steps} steps:",
        shapes.len()
    );
    println!("  in place (sage-candle)     {:7.1} ms", 1e3 * inplace);
    println!(
        "  copy out + Var::set back   {:7.1} ms  ({:.2}x)",
        1e3 * copied,
        copied / inplace
    );
    Ok(())
}
