//! Links SAGE into a bare-metal binary with no allocator (see Cargo.toml).
#![no_std]
#![no_main]

use core::panic::PanicInfo;
use sage_core::{Algorithm, Config, Optimizer, ParamGroup, ParamTensor};
use sage_cpu::Cpu;

const N: usize = 64;
static mut STATE: [[f32; N]; 5] = [[0.0; N]; 5];

/// Entry point: one AdamW-SAGE step over static buffers; the result is written out with a
/// volatile store so nothing is optimised away.
#[no_mangle]
pub extern "C" fn _start() -> ! {
    // SAFETY: single-threaded bare-metal entry; nothing else touches STATE.
    let [w, g, m, v, ibar] = unsafe { &mut *core::ptr::addr_of_mut!(STATE) };
    for (i, (w, g)) in w.iter_mut().zip(g.iter_mut()).enumerate() {
        *w = (i as f32 - 32.0) / 64.0;
        *g = 0.01 * (i % 7) as f32;
    }
    let cfg = Config::reference(Algorithm::adamw(), 1e-3).global_clip(1.0);
    let ok = match Optimizer::new(Cpu, cfg, [ParamGroup::sage().weight_decay(0.01)]) {
        Ok(mut opt) => {
            let t = ParamTensor::new(&mut w[..], &g[..])
                .m(&mut m[..])
                .v(&mut v[..])
                .ibar(&mut ibar[..]);
            opt.step(&mut [t]).map(|r| r.applied()).unwrap_or(false)
        }
        Err(_) => false,
    };
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
