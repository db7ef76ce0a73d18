//! Links SAGE into a bare-metal binary with no allocator (see Cargo.toml).
#![no_std]
#![no_main]

use core::panic::PanicInfo;
use sage_core::{bf16, Algorithm, Config, Optimizer, ParamGroup, ParamTensor, TensorState};
use sage_cpu::Cpu;

const N: usize = 64;
static mut STATE: [[f32; N]; 5] = [[0.0; N]; 5];
// A second tensor stored in bf16 with bf16 state: a mixed-precision step needs no allocator.
static mut HALF: [[bf16; N]; 5] = [[bf16::ZERO; N]; 5];

/// Entry point: one AdamW-SAGE step over static buffers of two storage types; the result is
/// written out with a volatile store so nothing is optimised away.
#[no_mangle]
pub extern "C" fn _start() -> ! {
    // SAFETY: single-threaded bare-metal entry; nothing else touches STATE.
    let [w, g, m, v, ibar] = unsafe { &mut *core::ptr::addr_of_mut!(STATE) };
    // SAFETY: as above.
    let [hw, hg, hm, hv, hibar] = unsafe { &mut *core::ptr::addr_of_mut!(HALF) };
    for (i, (w, g)) in w.iter_mut().zip(g.iter_mut()).enumerate() {
        *w = (i as f32 - 32.0) / 64.0;
        *g = 0.01 * (i % 7) as f32;
    }
    for (i, (w, g)) in hw.iter_mut().zip(hg.iter_mut()).enumerate() {
        *w = bf16::from_f32((i as f32 - 16.0) / 64.0);
        *g = bf16::from_f32(0.02 * (i % 5) as f32);
    }
    let (mut t_full, mut t_half) = (0u64, 0u64);
    let cfg = Config::reference(Algorithm::adamw(), 1e-3).global_clip(1.0);
    let ok = match Optimizer::new(Cpu, cfg, [ParamGroup::sage().weight_decay(0.01)]) {
        Ok(mut opt) => {
            let full = TensorState {
                m: Some(&mut m[..]),
                v: Some(&mut v[..]),
                ibar: Some(&mut ibar[..]),
                step: &mut t_full,
            };
            let half = TensorState {
                m: Some(&mut hm[..]),
                v: Some(&mut hv[..]),
                ibar: Some(&mut hibar[..]),
                step: &mut t_half,
            };
            let a = ParamTensor::<Cpu, f32, f32>::new(&mut w[..], &g[..], full);
            let b = ParamTensor::<Cpu, bf16, bf16>::new(&mut hw[..], &hg[..], half);
            // One counted step over both types: one norm, one guard decision.
            opt.step(&mut ([a], [b]))
                .map(|r| r.applied())
                .unwrap_or(false)
        }
        Err(_) => false,
    };
    let ok = ok && t_full == 1 && t_half == 1;
    // SAFETY: a valid, aligned pointer into a static.
    unsafe { core::ptr::write_volatile(&mut w[0], if ok { w[1] } else { f32::NAN }) };
    halt()
}

/// Parks the core: there is nothing to return to on bare metal.
fn halt() -> ! {
    loop {
        core::hint::spin_loop();
    }
}

#[panic_handler]
fn panic(_: &PanicInfo) -> ! {
    halt()
}
