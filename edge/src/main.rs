//! SAGE fine-tuning on a Cortex-M4F: trains a 64-32-10 MLP on the 8x8 handwritten digits with
//! `sage_core::Optimizer` over `sage_cpu::Cpu`, prints each epoch over semihosting, and exits
//! with success only when the loss and the held-out accuracy reached the stated bounds.
//!
//! No allocator: there is no `#[global_allocator]`, the `alloc` crate is never linked
//! (`scripts/edge-demo` checks the ELF for its symbols), and every buffer is one `static`.
#![no_std]
#![no_main]

mod train;

use cortex_m_rt::entry;
use cortex_m_semihosting::{debug, hprintln};
// A panic prints its message over semihosting and exits with failure.
use panic_semihosting as _;

extern "C" {
    // Bounds from cortex-m-rt's link.x: the stack grows down from `_stack_start` towards
    // `_stack_end` (the end of .bss); `__sdata` starts the static RAM.
    static _stack_start: u32;
    static _stack_end: u32;
    static __sdata: u32;
}

/// Bytes of RAM taken by statics (.data and .bss).
fn static_ram() -> usize {
    // Only the symbols' addresses are taken (safe), never their contents.
    let (start, end) = (
        core::ptr::addr_of!(__sdata) as usize,
        core::ptr::addr_of!(_stack_end) as usize,
    );
    end - start
}

/// Deepest stack use so far: cortex-m-rt (`paint-stack`) filled the free RAM with a pattern at
/// reset; the lowest word no longer holding it marks the peak.
fn peak_stack() -> usize {
    let (top, bottom) = (
        core::ptr::addr_of!(_stack_start) as usize,
        core::ptr::addr_of!(_stack_end) as usize,
    );
    let mut p = bottom;
    // SAFETY: [bottom, top) is the stack region, RAM that is always readable; volatile, since
    // the compiler cannot know the pattern was written before main.
    while p < top
        && unsafe { core::ptr::read_volatile(p as *const u32) } == cortex_m_rt::STACK_PAINT_VALUE
    {
        p += 4;
    }
    top - p
}

#[entry]
fn main() -> ! {
    // cortex-m-rt hands this to us as `&'static mut`, once: safe, and placed in .bss.
    static mut WORKSPACE: train::Workspace = train::Workspace::new();

    let cfg = train::config();
    hprintln!(
        "SAGE on-device training: MLP {}-{}-{}, {} train / {} held-out digits, {} epochs x {} steps (batch {})",
        train::INPUTS,
        train::HIDDEN,
        train::CLASSES,
        train::TRAIN,
        train::HELD_OUT,
        train::EPOCHS,
        train::STEPS / train::EPOCHS,
        train::BATCH,
    );
    hprintln!(
        "optimizer: {}-SAGE ({:?} preset), lr {}, beta0 {}, state {:?}, {} bytes of optimizer state",
        cfg.algorithm.name(),
        cfg.preset,
        cfg.lr,
        cfg.sensitivity.beta0,
        <train::State as sage_core::Element>::DTYPE,
        train::STATE_BYTES,
    );
    let result = train::train(WORKSPACE, |e| {
        hprintln!(
            "epoch {}: train loss {:.4}  held-out loss {:.4}  held-out accuracy {:.1}%  (steps {}, skipped {})",
            e.epoch,
            e.train_loss,
            e.held_out_loss,
            e.held_out_accuracy * 100.0,
            e.steps,
            e.skipped,
        );
    });
    let ok = match result {
        Ok(last) => {
            let ok = last.succeeded();
            hprintln!(
                "{}: final train loss {:.4} (bound < {}), held-out accuracy {:.1}% (bound > {}%)",
                if ok { "PASS" } else { "FAIL" },
                last.train_loss,
                train::MAX_FINAL_LOSS,
                last.held_out_accuracy * 100.0,
                train::MIN_HELD_OUT_ACCURACY * 100.0,
            );
            ok
        }
        Err(e) => {
            hprintln!("FAIL: optimizer error: {:?}", e);
            false
        }
    };
    hprintln!(
        "RAM: {} bytes static (.bss/.data), peak stack {} bytes",
        static_ram(),
        peak_stack()
    );
    debug::exit(if ok {
        debug::EXIT_SUCCESS
    } else {
        debug::EXIT_FAILURE
    });
    // Semihosting exit does not return under QEMU or a debugger; on a bare board it may.
    loop {
        cortex_m::asm::wfi();
    }
}
