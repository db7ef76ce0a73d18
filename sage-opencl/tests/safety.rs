//! Steps that would silently corrupt a run are refused before anything is launched: a buffer
//! the step writes that aliases another buffer of the step (a `ClBuffer` clone passed twice,
//! θ as its own gradient, one buffer in two tensors, overlapping sub-buffers), and a buffer
//! of another OpenCL context anywhere in a multi-tensor step, even in a later launch.

mod common;

use common::{device, random, rng};
use sage_core::{
    Accumulate, Algorithm, Backend, Config, Error as CoreError, Optimizer, ParamGroup, ParamTensor,
    StepReport, TensorMut, TensorState,
};
use sage_opencl::{ClBuffer, Error, OpenCl, Select};

fn config() -> Config {
    Config::reference(Algorithm::adamw(), 1e-2).beta0(0.8)
}

/// `n` tensors of assorted lengths: parameters, gradients and state on `cl`.
struct Model {
    params: Vec<ClBuffer<f32>>,
    grads: Vec<ClBuffer<f32>>,
    state: Vec<TensorState<ClBuffer<f32>>>,
}

const LENS: [usize; 7] = [5, 300, 1, 4097, 64, 9, 700];

impl Model {
    fn new(cl: &OpenCl, n: usize) -> Self {
        let mut r = rng(3);
        let lens = LENS.iter().cycle().take(n);
        let params = lens
            .clone()
            .map(|&l| cl.upload(&random(&mut r, l, 1.0)).unwrap())
            .collect();
        let grads = lens
            .clone()
            .map(|&l| cl.upload(&random(&mut r, l, 0.1)).unwrap())
            .collect();
        let state = lens
            .map(|&l| TensorState::try_new(config().state_layout(true), |_| cl.zeros(l)).unwrap())
            .collect();
        Model {
            params,
            grads,
            state,
        }
    }

    /// Every value of every buffer, and every count.
    fn host(&self, cl: &OpenCl) -> (Vec<Vec<f32>>, Vec<u64>) {
        self.host_except(cl, usize::MAX)
    }

    /// [`host`](Self::host) without tensor `skip`'s buffers.
    fn host_except(&self, cl: &OpenCl, skip: usize) -> (Vec<Vec<f32>>, Vec<u64>) {
        let mut v = Vec::new();
        for (i, (p, s)) in self.params.iter().zip(&self.state).enumerate() {
            if i != skip {
                v.push(cl.download(p).unwrap());
                for b in [&s.m, &s.v, &s.ibar].into_iter().flatten() {
                    v.push(cl.download(b).unwrap());
                }
            }
        }
        (v, self.state.iter().map(|s| s.step).collect())
    }
}

const NAMES: [&str; 20] = [
    "t0", "t1", "t2", "t3", "t4", "t5", "t6", "t7", "t8", "t9", "t10", "t11", "t12", "t13", "t14",
    "t15", "t16", "t17", "t18", "t19",
];

/// The step's tensors over `params`/`grads`/`state`, each named `t{i}`.
fn tensors<'a>(
    params: &'a mut [ClBuffer<f32>],
    grads: &'a [ClBuffer<f32>],
    state: &'a mut [TensorState<ClBuffer<f32>>],
) -> Vec<ParamTensor<'a, OpenCl, f32, f32>> {
    params
        .iter_mut()
        .zip(grads)
        .zip(state.iter_mut())
        .enumerate()
        .map(|(i, ((p, g), s))| ParamTensor::new(p, g, s.view()).name(NAMES[i]))
        .collect()
}

/// One optimizer step over `params`/`grads`/`state`, each tensor named `t{i}`.
fn step(
    opt: &mut Optimizer<OpenCl>,
    params: &mut [ClBuffer<f32>],
    grads: &[ClBuffer<f32>],
    state: &mut [TensorState<ClBuffer<f32>>],
) -> Result<StepReport, CoreError<Error>> {
    opt.step(&mut tensors(params, grads, state))
}

/// [`step`] with the tensors in two slices, `..at` and `at..`: two calls of the backend's
/// `step_tensors` per step.
fn step_split(
    opt: &mut Optimizer<OpenCl>,
    params: &mut [ClBuffer<f32>],
    grads: &[ClBuffer<f32>],
    state: &mut [TensorState<ClBuffer<f32>>],
    at: usize,
) -> Result<StepReport, CoreError<Error>> {
    let mut ts = tensors(params, grads, state);
    let (a, b) = ts.split_at_mut(at);
    opt.step(&mut (a, b))
}

fn backend_error(e: CoreError<Error>) -> Error {
    match e {
        CoreError::Backend(e) => e,
        other => panic!("expected a backend error, got {other}"),
    }
}

/// A buffer of another context in a tensor of a later launch (launch 3 of 4 tensors each)
/// is found before the first launch: nothing is stepped, no count advances. (Before, the
/// earlier launches ran, then the step failed, and a retry stepped them twice.)
#[test]
fn a_foreign_buffer_in_a_later_launch_changes_nothing() {
    let Some(cl) = device() else { return };
    let d = cl.device();
    let cl = OpenCl::builder()
        .device(Select::Index {
            platform: d.platform,
            device: d.device,
        })
        .max_tensors_per_launch(4)
        .build()
        .unwrap();
    // The same device opened again: another context.
    let other = OpenCl::new().unwrap();
    assert_ne!(other.context().as_ptr(), cl.context().as_ptr());
    for (which, bad) in [("grad", 9usize), ("v", 13), ("param", 12)] {
        let mut m = Model::new(&cl, 14);
        let len = m.params[bad].len();
        let foreign = other.zeros::<f32>(len).unwrap();
        match which {
            "grad" => m.grads[bad] = foreign,
            "v" => m.state[bad].v = Some(foreign),
            _ => m.params[bad] = foreign,
        }
        let before = m.host_except(&cl, bad);
        let mut opt = Optimizer::new(cl.clone(), config(), [ParamGroup::sage()]).unwrap();
        let e = backend_error(step(&mut opt, &mut m.params, &m.grads, &mut m.state).unwrap_err());
        assert_eq!(
            e,
            Error::ForeignBuffer {
                tensor: bad,
                name: Some(NAMES[bad].into()),
                buffer: which,
            }
        );
        assert!(e.to_string().contains(NAMES[bad]), "{e}");
        assert_eq!(m.host_except(&cl, bad), before, "{which}: nothing stepped");
        assert_eq!(opt.steps(), 0);
    }
}

/// What a case does to a model, and the error it must give.
type Case = (&'static str, fn(&mut Model), Error);

/// Tensor `tensor`'s (named `t{tensor}`) `buffer` shares memory with `other_tensor`'s
/// `other_buffer`.
fn aliased(
    tensor: usize,
    buffer: &'static str,
    other_tensor: usize,
    other_buffer: &'static str,
) -> Error {
    Error::Aliased {
        tensor,
        name: Some(NAMES[tensor].into()),
        buffer,
        other_tensor,
        other_buffer,
    }
}

/// Applies the case's alias to `m`: the step is refused with the case's error, naming shared
/// memory, and nothing is stepped or counted.
fn assert_refused(cl: &OpenCl, mut m: Model, (what, alias, want): Case) {
    alias(&mut m);
    let before = m.host(cl);
    let mut opt = Optimizer::new(cl.clone(), config(), [ParamGroup::sage()]).unwrap();
    let e = backend_error(step(&mut opt, &mut m.params, &m.grads, &mut m.state).unwrap_err());
    assert_eq!(e, want, "{what}: {e}");
    assert!(e.to_string().contains("same memory"), "{e}");
    assert_eq!(m.host(cl), before, "{what}: nothing stepped");
    assert_eq!(opt.steps(), 0);
}

/// `m` and `v` one buffer (a clone), θ its own gradient, one state buffer in two tensors:
/// each is refused naming the tensor and both buffers, before anything runs. Two tensors
/// sharing a gradient (read only) are fine.
#[test]
fn aliased_buffers_are_refused() {
    let Some(cl) = device() else { return };
    let cases: [Case; 4] = [
        (
            "m is v",
            |m| m.state[2].v = m.state[2].m.clone(),
            aliased(2, "v", 2, "m"),
        ),
        (
            "param is grad",
            |m| m.grads[4] = m.params[4].clone(),
            aliased(4, "grad", 4, "param"),
        ),
        (
            "one buffer in two tensors",
            |m| m.state[5].ibar = m.state[1].m.clone(),
            aliased(5, "ibar", 1, "m"),
        ),
        (
            "a gradient as another tensor's parameter",
            |m| m.grads[3] = m.params[0].clone(),
            aliased(3, "grad", 0, "param"),
        ),
    ];
    for (what, alias, want) in cases {
        // Lengths must agree for the alias to pass the length checks: 5 and 1 differ, so
        // give every tensor one length.
        let mut m = Model::new(&cl, 7);
        for i in 0..7 {
            m.params[i] = cl.upload(&vec![0.5f32; 64]).unwrap();
            m.grads[i] = cl.upload(&vec![0.25f32; 64]).unwrap();
            m.state[i] =
                TensorState::try_new(config().state_layout(true), |_| cl.zeros(64)).unwrap();
        }
        assert_refused(&cl, m, (what, alias, want));
    }
    // A shared gradient is only read: allowed.
    let mut m = Model::new(&cl, 3);
    for i in 0..3 {
        m.params[i] = cl.upload(&vec![0.5f32; 64]).unwrap();
        m.state[i] = TensorState::try_new(config().state_layout(true), |_| cl.zeros(64)).unwrap();
    }
    let g = cl.upload(&vec![0.25f32; 64]).unwrap();
    m.grads = vec![g.clone(), g.clone(), g];
    let mut opt = Optimizer::new(cl.clone(), config(), [ParamGroup::sage()]).unwrap();
    step(&mut opt, &mut m.params, &m.grads, &mut m.state).unwrap();
    assert!(m.state.iter().all(|s| s.step == 1));
}

/// The one-tensor paths check too: the fused step, and the primitives.
#[test]
fn aliasing_in_one_tensor_and_in_the_primitives() {
    let Some(mut cl) = device() else { return };
    let opt = Optimizer::new(cl.clone(), config(), [ParamGroup::sage()]).unwrap();
    let k = opt.coeffs(1, 0, 1.0).unwrap();
    let mut p = cl.upload(&[1.0f32; 9]).unwrap();
    let g = cl.upload(&[0.5f32; 9]).unwrap();
    let mut m = cl.zeros::<f32>(9).unwrap();
    let mut v = m.clone();
    let e = cl
        .fused_step(
            TensorMut::<OpenCl, f32, f32> {
                param: &mut p,
                grad: &g,
                m: Some(&mut m),
                v: Some(&mut v),
                ibar: None,
            },
            &k,
        )
        .unwrap_err();
    assert!(matches!(e, Error::Aliased { tensor: 0, .. }), "{e}");
    assert_eq!(cl.download(&p).unwrap(), [1.0f32; 9]);
    // accumulate into θ itself.
    let mut acc = p.clone();
    let e = cl
        .accumulate::<f32, f32>(Accumulate::Moment, &mut acc, &p, &g, &k)
        .unwrap_err();
    assert!(matches!(e, Error::Aliased { .. }), "{e}");
    assert_eq!(cl.download(&p).unwrap(), [1.0f32; 9]);
}

/// Sub-buffers of one memory object: overlapping ranges are aliases, disjoint ones are not.
#[test]
fn overlapping_sub_buffers_are_aliases() {
    let Some(cl) = device() else { return };
    let n = 4096usize; // elements; 16 KiB per sub-buffer, so offsets stay aligned
    let parent = cl.zeros::<f32>(4 * n).unwrap();
    let mem = parent.as_mem().unwrap();
    let sub = |at: usize| -> ClBuffer<f32> {
        let region = ocl::core::BufferRegion::<f32>::new(at, n);
        let m = ocl::core::create_sub_buffer::<f32>(
            mem,
            ocl::core::MemFlags::new().read_write(),
            &region,
        )
        .unwrap();
        ClBuffer::from_mem(&m).unwrap()
    };
    let g = cl.upload(&vec![0.25f32; n]).unwrap();
    let mut opt = Optimizer::new(
        cl.clone(),
        Config::paper(Algorithm::sgd(0.0), 0.1),
        [ParamGroup::plain()],
    )
    .unwrap();
    let empty = || TensorState::<ClBuffer<f32>>::new(Default::default(), || unreachable!());
    // Disjoint: fine.
    let (mut a, mut b) = (sub(0), sub(n));
    let (mut sa, mut sb) = (empty(), empty());
    let mut ts = [
        ParamTensor::<OpenCl, f32, f32>::new(&mut a, &g, sa.view()).name("a"),
        ParamTensor::new(&mut b, &g, sb.view()).name("b"),
    ];
    opt.step(&mut ts).unwrap();
    // Half overlapping: refused.
    let (mut a, mut c) = (sub(0), sub(n / 2));
    let mut ts = [
        ParamTensor::<OpenCl, f32, f32>::new(&mut a, &g, sa.view()).name("a"),
        ParamTensor::new(&mut c, &g, sb.view()).name("c"),
    ];
    let e = backend_error(opt.step(&mut ts).unwrap_err());
    assert_eq!(
        e,
        Error::Aliased {
            tensor: 1,
            name: Some("c".into()),
            buffer: "param",
            other_tensor: 0,
            other_buffer: "param",
        }
    );
    // A gradient that is a sub-buffer of another tensor's θ (the whole memory object).
    let mut whole = ClBuffer::<f32>::from_mem(mem).unwrap();
    let g4 = cl.upload(&vec![0.25f32; 4 * n]).unwrap();
    let inside = sub(3 * n);
    let mut x = cl.zeros::<f32>(n).unwrap();
    let mut ts = [
        ParamTensor::<OpenCl, f32, f32>::new(&mut whole, &g4, sa.view()).name("whole"),
        ParamTensor::new(&mut x, &inside, sb.view()).name("x"),
    ];
    let e = backend_error(opt.step(&mut ts).unwrap_err());
    assert_eq!(
        e,
        Error::Aliased {
            tensor: 1,
            name: Some("x".into()),
            buffer: "grad",
            other_tensor: 0,
            other_buffer: "param",
        }
    );
    drop(parent);
}

/// A model cut from slabs (one allocation per buffer position, tensors at increasing offsets)
/// is the layout checked in one pass; every way of breaking that layout is still checked in
/// full: a piece passed twice in one position or in two positions is refused, while disjoint
/// pieces of one allocation in several positions, or tensors in another order, step.
#[test]
fn slab_layouts_are_checked_like_any_other() {
    let Some(cl) = device() else { return };
    let lens = [300usize, 5, 4097, 64, 700];
    let n = lens.len();
    // Pieces of five slabs, or of one slab cut in five position runs.
    let cut = |one: bool| -> [Vec<ClBuffer<f32>>; 5] {
        if one {
            let all: Vec<usize> = (0..5).flat_map(|_| lens).collect();
            let (_, mut pieces) = cl.slab::<f32>(&all).unwrap();
            let mut out: [Vec<ClBuffer<f32>>; 5] = Default::default();
            for o in out.iter_mut().rev() {
                *o = pieces.split_off(pieces.len() - n);
            }
            out
        } else {
            std::array::from_fn(|_| cl.slab::<f32>(&lens).unwrap().1)
        }
    };
    let model = |b: &[Vec<ClBuffer<f32>>; 5]| slab_model(&cl, b, &lens);
    // Both layouts step, and to the same values as buffers of their own.
    let mut own = Model::new(&cl, 0);
    let mut r = rng(5);
    for &l in &lens {
        own.params.push(cl.upload(&random(&mut r, l, 1.0)).unwrap());
        own.grads.push(cl.upload(&random(&mut r, l, 0.1)).unwrap());
        own.state
            .push(TensorState::try_new(config().state_layout(true), |_| cl.zeros(l)).unwrap());
    }
    let mut opt = Optimizer::new(cl.clone(), config(), [ParamGroup::sage()]).unwrap();
    step(&mut opt, &mut own.params, &own.grads, &mut own.state).unwrap();
    for one in [false, true] {
        let mut m = model(&cut(one));
        let mut opt = Optimizer::new(cl.clone(), config(), [ParamGroup::sage()]).unwrap();
        step(&mut opt, &mut m.params, &m.grads, &mut m.state).unwrap();
        assert_eq!(m.host(&cl), own.host(&cl), "one slab: {one}");
    }
    // Out of order: tensors in reverse step too.
    let mut m = model(&cut(false));
    m.params.reverse();
    m.grads.reverse();
    m.state.reverse();
    let mut opt = Optimizer::new(cl.clone(), config(), [ParamGroup::sage()]).unwrap();
    step(&mut opt, &mut m.params, &m.grads, &mut m.state).unwrap();
    // Broken layouts: refused, nothing stepped.
    let cases: [Case; 3] = [
        (
            "one m piece in two tensors",
            |m| m.state[3].m = m.state[2].m.clone(),
            aliased(3, "m", 2, "m"),
        ),
        (
            "an m piece as a later tensor's ibar",
            |m| m.state[4].ibar = m.state[1].m.clone(),
            aliased(4, "ibar", 1, "m"),
        ),
        (
            "a parameter piece as a later tensor's gradient",
            |m| m.grads[3] = m.params[0].clone(),
            aliased(3, "grad", 0, "param"),
        ),
    ];
    for (what, alias, want) in cases {
        // Pieces of equal length, so that the alias passes the length checks.
        let lens = [64usize; 5];
        let b: [Vec<ClBuffer<f32>>; 5] = std::array::from_fn(|_| cl.slab::<f32>(&lens).unwrap().1);
        let m = slab_model(&cl, &b, &lens);
        assert_refused(&cl, m, (what, alias, want));
    }
}

/// A model over slab pieces `b` (param, grad, m, v, ibar; tensor `i` at `b[_][i]`), with random
/// parameters and gradients.
fn slab_model(cl: &OpenCl, b: &[Vec<ClBuffer<f32>>; 5], lens: &[usize]) -> Model {
    let mut r = rng(5);
    let mut m = Model::new(cl, 0);
    for (i, &len) in lens.iter().enumerate() {
        let (mut p, mut g) = (b[0][i].clone(), b[1][i].clone());
        cl.write(&mut p, &random(&mut r, len, 1.0)).unwrap();
        cl.write(&mut g, &random(&mut r, len, 0.1)).unwrap();
        m.params.push(p);
        m.grads.push(g);
        let mut s = TensorState::try_new(config().state_layout(true), |_| cl.zeros(len)).unwrap();
        s.m = Some(b[2][i].clone());
        s.v = Some(b[3][i].clone());
        s.ibar = Some(b[4][i].clone());
        m.state.push(s);
    }
    m
}

/// A step over the same slab layout as the last one reuses its launch tables (only the
/// coefficients are uploaded): it steps to the same bits as buffers of their own, step after
/// step, also when the step's tensors come in two calls, reports non-finite parameters as the
/// full path does, and any change of layout — after reused steps, an aliased buffer at
/// another offset, or one at the same offset and length of another object — goes through the
/// full check again and is refused, with nothing stepped.
#[test]
fn a_kept_launch_is_reused_only_for_the_same_layout() {
    let Some(cl) = device() else { return };
    let lens = [300usize, 5, 4097, 64, 700];
    let b: [Vec<ClBuffer<f32>>; 5] = std::array::from_fn(|_| cl.slab::<f32>(&lens).unwrap().1);
    let mut slab = slab_model(&cl, &b, &lens);
    let mut own = Model::new(&cl, 0);
    for (i, &l) in lens.iter().enumerate() {
        own.params
            .push(cl.upload(&cl.download(&slab.params[i]).unwrap()).unwrap());
        own.grads
            .push(cl.upload(&cl.download(&slab.grads[i]).unwrap()).unwrap());
        own.state
            .push(TensorState::try_new(config().state_layout(true), |_| cl.zeros(l)).unwrap());
    }
    // Unguarded, so that a NaN gradient reaches the update below.
    let cfg = config().skip_non_finite(false);
    let mut opt_slab = Optimizer::new(cl.clone(), cfg, [ParamGroup::sage()]).unwrap();
    let mut opt_own = Optimizer::new(cl.clone(), cfg, [ParamGroup::sage()]).unwrap();
    let reused = || cl.launch_counts().reused;
    let before = reused();
    // Each step's coefficients differ (bias corrections follow the count): the reused tables
    // must take the new ones.
    // Steps of the slab (in one call, or in two split at tensor `at`) and of its own-buffer
    // twin; each time the same values, and the launches reused since `from`.
    let mut steps = |rounds: u64, calls: u64, from: u64| {
        for n in 1..=rounds {
            let (p, g, s) = (&mut slab.params, &slab.grads, &mut slab.state);
            match calls {
                1 => step(&mut opt_slab, p, g, s),
                _ => step_split(&mut opt_slab, p, g, s, 2),
            }
            .unwrap();
            step(&mut opt_own, &mut own.params, &own.grads, &mut own.state).unwrap();
            // (Not assert_eq!: a failure would print every value of the model.)
            assert!(
                slab.host(&cl) == own.host(&cl),
                "{calls} call(s), step {n}: the slab stepped to other values"
            );
            assert_eq!(
                reused() - from,
                calls * (n - 1),
                "{calls} call(s), step {n}: the first step keeps, later ones reuse"
            );
        }
    };
    steps(4, 1, before);
    // The same tensors in two calls per step: each call's launch is kept and reused.
    steps(3, 2, reused());
    let from = reused();
    // A NaN gradient: the reused launch counts the NaN parameters it stores.
    let mut g = cl.download(&slab.grads[1]).unwrap();
    g[2] = f32::NAN;
    cl.write(&mut slab.grads[1], &g).unwrap();
    let report = step(
        &mut opt_slab,
        &mut slab.params,
        &slab.grads,
        &mut slab.state,
    )
    .unwrap();
    assert_eq!(reused() - from, 1, "the NaN step reused the launch");
    assert_eq!(report.non_finite_params, Some(1), "{report:?}");
    // Equal lengths, so that an alias passes the length checks. Each case: a new optimizer
    // (its backend, a clone of `cl`, starts with nothing kept), two steps (kept, reused),
    // then the broken layout, refused with nothing stepped and nothing reused.
    let lens = [64usize; 5];
    let b: [Vec<ClBuffer<f32>>; 5] = std::array::from_fn(|_| cl.slab::<f32>(&lens).unwrap().1);
    let cases: [Case; 2] = [
        (
            "an m piece as a later tensor's m, after reuse",
            |m| m.state[3].m = m.state[2].m.clone(),
            aliased(3, "m", 2, "m"),
        ),
        (
            // Same offset and length, another object (the slabs' layouts are equal): only
            // the roots tell it apart from the kept m.
            "tensor 2's parameter piece as its m, after reuse",
            |m| m.state[2].m = m.params.get(2).cloned(),
            aliased(2, "m", 2, "param"),
        ),
    ];
    for (what, alias, want) in cases {
        let mut m = slab_model(&cl, &b, &lens);
        let mut opt = Optimizer::new(cl.clone(), config(), [ParamGroup::sage()]).unwrap();
        let from = reused();
        for _ in 0..2 {
            step(&mut opt, &mut m.params, &m.grads, &mut m.state).unwrap();
        }
        assert_eq!(reused() - from, 1, "{what}: reused before the change");
        alias(&mut m);
        let kept = m.host(&cl);
        let e = backend_error(step(&mut opt, &mut m.params, &m.grads, &mut m.state).unwrap_err());
        assert_eq!(e, want, "{what}");
        assert_eq!(m.host(&cl), kept, "{what}: nothing stepped");
        assert_eq!(
            reused() - from,
            1,
            "{what}: the changed layout was not reused"
        );
    }
}
