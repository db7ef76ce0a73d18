//! Errors, never panics: bad lengths, failing builds, huge allocations, unknown devices;
//! and buffers shared with code that owns them.

mod common;

use common::device;
use sage_core::{
    bf16, f16, Accumulate, Algorithm, Backend, BackendError, Config, ErrorKind, Optimizer,
    ParamGroup, ParamTensor, TensorMut, TensorState,
};
use sage_opencl::{ClBuffer, Error, OpenCl, Select};

fn coeffs() -> sage_core::Coeffs {
    Optimizer::new(
        sage_cpu::Cpu,
        Config::reference(Algorithm::adamw(), 1e-2),
        [ParamGroup::sage()],
    )
    .unwrap()
    .coeffs(1, 0, 1.0)
    .unwrap()
}

#[test]
fn mismatched_lengths_are_errors_and_change_nothing() {
    let Some(mut cl) = device() else { return };
    let k = coeffs();
    let mut p = cl.upload(&[1.0f32; 9]).unwrap();
    let g8 = cl.upload(&[0.5f32; 8]).unwrap();
    let g9 = cl.upload(&[0.5f32; 9]).unwrap();
    let (mut m, mut v) = (cl.zeros::<f32>(9).unwrap(), cl.zeros::<f32>(9).unwrap());
    let mut ib = cl.zeros::<f32>(10).unwrap();
    let e = cl
        .fused_step(
            TensorMut::<OpenCl, f32, f32> {
                param: &mut p,
                grad: &g8,
                m: Some(&mut m),
                v: Some(&mut v),
                ibar: None,
            },
            &k,
        )
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::LengthMismatch);
    assert!(e.to_string().contains("grad"), "{e}");
    // A bad tensor anywhere in a multi-tensor step stops it before anything runs.
    let mut p2 = cl.upload(&[1.0f32; 9]).unwrap();
    let (mut n0, mut n1) = (0u64, 0u64);
    let no_state = TensorState {
        m: None,
        v: None,
        ibar: None,
        step: &mut n0,
    };
    let ibar_only = TensorState {
        m: None,
        v: None,
        ibar: Some(&mut ib),
        step: &mut n1,
    };
    let mut ts = vec![
        ParamTensor::<OpenCl, f32, f32>::new(&mut p2, &g9, no_state),
        ParamTensor::new(&mut p, &g9, ibar_only),
    ];
    ts[0].set_coeffs(k);
    ts[1].set_coeffs(k);
    let e = cl.step_tensors(&mut ts).unwrap_err();
    assert_eq!(
        e,
        Error::LengthMismatch {
            buffer: "ibar",
            expected: 9,
            got: 10
        }
    );
    assert_eq!(cl.download(&p2).unwrap(), vec![1.0f32; 9]);
    assert_eq!(cl.download(&p).unwrap(), vec![1.0f32; 9]);
    let e = cl
        .accumulate(Accumulate::Moment, &mut ib, &p, &g9, &k)
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::LengthMismatch);
    let mut host = [0f32; 3];
    assert_eq!(
        cl.read(&p, &mut host).unwrap_err().kind(),
        ErrorKind::LengthMismatch
    );
}

#[test]
fn the_optimizer_reports_bad_tensors_by_name() {
    let Some(cl) = device() else { return };
    let mut opt = Optimizer::new(
        cl.clone(),
        Config::paper(Algorithm::sgd(0.0), 0.1),
        [ParamGroup::sage()],
    )
    .unwrap();
    let mut p = cl.upload(&[1.0f32; 4]).unwrap();
    let g = cl.upload(&[1.0f32; 5]).unwrap();
    let mut state =
        TensorState::try_new(opt.state_layout(0).unwrap(), |_| cl.zeros::<f32>(4)).unwrap();
    let e = opt
        .step(&mut [ParamTensor::new(&mut p, &g, state.view()).name("w")])
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::LengthMismatch);
    assert!(e.to_string().contains("`w`"), "{e}");
    assert_eq!(state.step, 0, "a refused step leaves the tensor's count");
}

#[test]
fn a_failing_build_returns_the_compiler_log() {
    let Some(cl) = device() else { return };
    let d = cl.device();
    // A macro that breaks the shared body: the build fails on the first step, not at open.
    let mut bad = OpenCl::builder()
        .device(Select::Index {
            platform: d.platform,
            device: d.device,
        })
        .build_options("-D sage_effective_grad=@")
        .build()
        .unwrap();
    let mut p = bad.upload(&[1.0f32; 4]).unwrap();
    let g = bad.upload(&[1.0f32; 4]).unwrap();
    let e = bad
        .fused_step(
            TensorMut::<OpenCl, f32, f32> {
                param: &mut p,
                grad: &g,
                m: None,
                v: None,
                ibar: None,
            },
            &coeffs(),
        )
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::KernelBuild);
    let log = e.build_log().expect("a build error carries its log");
    assert!(!log.trim().is_empty());
    assert!(e.to_string().contains("step f32/f32"), "{e}");
    // The failure is not cached as success: it fails again, and the good backend still works.
    assert_eq!(
        bad.prepare::<f32, f32>().unwrap_err().kind(),
        ErrorKind::KernelBuild
    );
}

#[test]
fn impossible_allocations_are_errors() {
    let Some(cl) = device() else { return };
    let e = cl.zeros::<f32>(usize::MAX / 2).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::TooLarge, "{e}");
    let e = cl.zeros::<f32>(1 << 60).unwrap_err();
    assert!(
        matches!(e.kind(), ErrorKind::TooLarge | ErrorKind::OutOfMemory),
        "{e}"
    );
}

#[test]
fn unknown_devices_are_not_available() {
    if device().is_none() {
        return;
    }
    let e = OpenCl::with_device(Select::Index {
        platform: 99,
        device: 0,
    })
    .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::NotAvailable);
    let e = OpenCl::with_device(Select::Name("no such device, surely".into())).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::NotAvailable);
    assert!(e.to_string().contains("found:"), "{e}");
    // A name that is there opens it.
    let first = sage_opencl::devices().unwrap().remove(0);
    let cl = OpenCl::with_device(Select::Name(first.name.clone())).unwrap();
    assert_eq!(cl.device().name, first.name);
}

#[test]
fn uploads_round_trip_bit_for_bit() {
    let Some(cl) = device() else { return };
    let x = [
        0.0f32,
        -0.0,
        1.5,
        f32::NAN,
        f32::INFINITY,
        -1e-40,
        65504.0,
        3.0e38,
    ];
    assert_eq!(
        cl.download(&cl.upload(&x).unwrap())
            .unwrap()
            .iter()
            .map(|v| v.to_bits())
            .collect::<Vec<_>>(),
        x.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
    );
    let h: Vec<f16> = x.iter().map(|&v| f16::from_f32(v)).collect();
    let back = cl.download(&cl.upload(&h).unwrap()).unwrap();
    assert_eq!(
        back.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
        h.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
    );
    let b: Vec<bf16> = x.iter().map(|&v| bf16::from_f32(v)).collect();
    let back = cl.download(&cl.upload(&b).unwrap()).unwrap();
    assert_eq!(
        back.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
        b.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
    );
    let empty = cl.upload::<f32>(&[]).unwrap();
    assert!(empty.is_empty() && empty.as_mem().is_none());
    assert!(cl.download(&empty).unwrap().is_empty());
}

/// A framework's own `ocl::Buffer`s, on its own queue, are stepped in place without copies.
#[test]
fn steps_buffers_a_framework_owns() {
    let Some(cl) = device() else { return };
    // The framework's context and queue on the same device.
    let dev = ocl::Device::from(cl.device().device_id());
    let ctx = ocl::Context::builder()
        .platform(ocl::Platform::new(cl.device().platform_id()))
        .devices(dev)
        .build()
        .unwrap();
    let q = ocl::Queue::new(&ctx, dev, None).unwrap();
    let mut mine = OpenCl::builder().queue(q.clone()).build().unwrap();
    assert_eq!(mine.device().name, cl.device().name);
    let w = ocl::Buffer::<f32>::builder()
        .queue(q.clone())
        .len(5)
        .copy_host_slice(&[1.0f32, 2.0, 3.0, 4.0, 5.0])
        .build()
        .unwrap();
    let g = ocl::Buffer::<f32>::builder()
        .queue(q.clone())
        .len(5)
        .copy_host_slice(&[1.0f32; 5])
        .build()
        .unwrap();
    let mut p = ClBuffer::<f32>::from_ocl(&w).unwrap();
    let gb = ClBuffer::<f32>::from_ocl(&g).unwrap();
    assert_eq!(p.len(), 5);
    assert!(
        ClBuffer::<bf16>::from_ocl(&w).is_err(),
        "4-byte elements are not bf16"
    );
    let mut k = coeffs();
    k.flags = 0; // plain SGD: θ − step·g
    k.kind = sage_core::coeffs::kind::SGD;
    k.step = 0.5;
    mine.fused_step(
        TensorMut::<OpenCl, f32, f32> {
            param: &mut p,
            grad: &gb,
            m: None,
            v: None,
            ibar: None,
        },
        &k,
    )
    .unwrap();
    // The framework reads its own buffer, updated in place.
    let mut host = vec![0f32; 5];
    w.read(&mut host).enq().unwrap();
    assert_eq!(host, vec![0.5f32, 1.5, 2.5, 3.5, 4.5]);
    // bf16 tensors kept as u16 bits.
    let bits = ocl::Buffer::<u16>::builder()
        .queue(q.clone())
        .len(3)
        .copy_host_slice(&[bf16::from_f32(2.0).to_bits(); 3])
        .build()
        .unwrap();
    let b = ClBuffer::<bf16>::from_ocl(&bits).unwrap();
    assert_eq!(mine.download(&b).unwrap(), vec![bf16::from_f32(2.0); 3]);
    assert_eq!(mine.sq_norm(&b).unwrap(), 12.0);
    // An out-of-order queue is refused: the backend relies on the queue's order.
    let ooo = ocl::Queue::new(
        &ctx,
        dev,
        Some(ocl::flags::QUEUE_OUT_OF_ORDER_EXEC_MODE_ENABLE),
    );
    if let Ok(ooo) = ooo {
        let e = OpenCl::builder().queue(ooo).build().unwrap_err();
        assert_eq!(e.kind(), ErrorKind::NotAvailable);
    }
}

#[test]
fn clones_share_the_device_and_queue() {
    let Some(cl) = device() else { return };
    let mut other = cl.clone();
    let mut p = cl.upload(&[2.0f32; 3]).unwrap();
    let g = cl.upload(&[1.0f32; 3]).unwrap();
    let mut k = coeffs();
    k.flags = 0;
    k.kind = sage_core::coeffs::kind::SGD;
    k.step = 1.0;
    other
        .fused_step(
            TensorMut::<OpenCl, f32, f32> {
                param: &mut p,
                grad: &g,
                m: None,
                v: None,
                ibar: None,
            },
            &k,
        )
        .unwrap();
    assert_eq!(cl.download(&p).unwrap(), vec![1.0f32; 3]);
    // Owned buffers move across threads with their backend.
    let h = std::thread::spawn(move || {
        let n = other.sq_norm(&p).unwrap();
        (n, other.download(&p).unwrap())
    });
    assert_eq!(h.join().unwrap(), (3.0, vec![1.0f32; 3]));
}

/// Sub-buffers: a region past the parent's end, one off the device's base-address alignment,
/// or one cut from a sub-buffer is an error that names the numbers, and nothing is made. A
/// piece is the parent's memory (a write through it shows there); a slab's pieces are zeroed,
/// aligned and of the lengths asked for.
#[test]
fn sub_buffer_regions_are_checked() {
    let Some(cl) = device() else { return };
    let unit = (cl.sub_buffer_alignment() / 4).max(1);
    let parent = cl.upload(&vec![1f32; 4 * unit]).unwrap();
    let e = cl.sub_buffer(&parent, 3 * unit, 2 * unit).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::LengthMismatch, "{e}");
    assert!(
        e.to_string()
            .contains(&format!("of a buffer of {}", 4 * unit)),
        "{e}"
    );
    if unit > 1 {
        let e = cl.sub_buffer(&parent, 1, 4).unwrap_err();
        assert!(e.to_string().contains("alignment"), "{e}");
    }
    let mut piece = cl.sub_buffer(&parent, unit, unit).unwrap();
    let e = cl.sub_buffer(&piece, 0, 1).unwrap_err();
    assert!(e.to_string().contains("itself a sub-buffer"), "{e}");
    assert!(cl.sub_buffer(&parent, 4 * unit, 0).unwrap().is_empty());
    cl.write(&mut piece, &vec![2f32; unit]).unwrap();
    let all = cl.download(&parent).unwrap();
    assert!(all[..unit].iter().all(|&x| x == 1.0));
    assert!(all[unit..2 * unit].iter().all(|&x| x == 2.0));
    assert!(all[2 * unit..].iter().all(|&x| x == 1.0));

    let (whole, pieces) = cl.slab::<bf16>(&[5, 0, 300]).unwrap();
    let lens: Vec<usize> = pieces.iter().map(|p| p.len()).collect();
    assert_eq!(lens, [5, 0, 300]);
    assert!(whole.len() >= 305);
    assert!(cl
        .download(&whole)
        .unwrap()
        .iter()
        .all(|x| x.to_f32() == 0.0));
}
