//! What differs between the cores: output and exit over semihosting, the instruction
//! counter, and the RAM the firmware can measure about itself. Everything else is the same
//! source on every target.
//!
//! Instructions are counted under QEMU's `-icount shift=0`, where the virtual clock advances
//! exactly 1 ns per guest instruction: a timer that runs on that clock counts instructions
//! (the Cortex-M SysTick at the board's core clock), and RISC-V's `minstret` reads the
//! instruction count itself. [`Counter::calibrate`] checks the conversion against a loop of
//! known length before anything is measured.

#[cfg(target_arch = "arm")]
use core::sync::atomic::{AtomicU32, Ordering};

#[cfg(target_arch = "arm")]
pub use cortex_m_semihosting::hprintln;
#[cfg(target_arch = "riscv32")]
pub use riscv_semihosting::hprintln;

/// Ends the run with success or failure (QEMU exits with status 0 or 1).
pub fn exit(ok: bool) -> ! {
    #[cfg(target_arch = "arm")]
    {
        use cortex_m_semihosting::debug;
        debug::exit(if ok {
            debug::EXIT_SUCCESS
        } else {
            debug::EXIT_FAILURE
        });
    }
    #[cfg(target_arch = "riscv32")]
    {
        use riscv_semihosting::debug;
        debug::exit(if ok {
            debug::EXIT_SUCCESS
        } else {
            debug::EXIT_FAILURE
        });
    }
    // Semihosting exit does not return under QEMU or a debugger; on a bare board it may.
    #[allow(clippy::empty_loop)]
    loop {}
}

/// A panic prints its message over semihosting and exits with failure.
#[panic_handler]
fn panic(info: &core::panic::PanicInfo) -> ! {
    hprintln!("FAIL: panic: {}", info);
    exit(false)
}

/// The core, the board it runs on under QEMU, and its floating point.
pub const TARGET: &str = if cfg!(target_arch = "riscv32") {
    "RISC-V RV32IMC (riscv32imc-unknown-none-elf, QEMU virt held to 16 KiB of RAM), soft-float"
} else if cfg!(target_abi = "eabihf") {
    "Cortex-M4F (thumbv7em-none-eabihf, QEMU mps2-an386), single-precision FPU"
} else {
    "Cortex-M0 (thumbv6m-none-eabi, QEMU microbit: nRF51, 16 KiB of RAM), soft-float"
};

/// The RAM region the linker script gives the firmware (`memory.x`).
pub const RAM_BYTES: usize = if cfg!(target_abi = "eabihf") {
    4 << 20
} else {
    16 << 10
};

/// Wraps of the 24-bit SysTick counter (written only by its exception handler).
#[cfg(target_arch = "arm")]
static WRAPS: AtomicU32 = AtomicU32::new(0);

/// An instruction counter ([`crate::finetune::Clock`]).
pub struct Counter {
    /// Instructions = ticks × `num` / `den`, from the calibration.
    num: u64,
    den: u64,
}

/// A loop of exactly `2n` instructions (`n` iterations of a decrement and a branch).
#[inline(never)]
fn known_loop(n: u32) {
    if n == 0 {
        return;
    }
    // SAFETY: only decrements a scratch register to zero; no memory, no stack.
    unsafe {
        #[cfg(target_arch = "arm")]
        core::arch::asm!(
            "2:",
            "subs {n}, {n}, #1",
            "bne 2b",
            n = inout(reg) n => _,
            options(nomem, nostack),
        );
        #[cfg(target_arch = "riscv32")]
        core::arch::asm!(
            "2:",
            "addi {n}, {n}, -1",
            "bnez {n}, 2b",
            n = inout(reg) n => _,
            options(nomem, nostack),
        );
    }
}

impl Counter {
    /// The calibration measures this many iterations of [`known_loop`] (2,000,000
    /// instructions) beyond a first loop of as many.
    pub const CALIBRATION_LOOP: u32 = 1_000_000;

    /// Starts the counter (SysTick on the Cortex-M cores) and calibrates it with
    /// [`known_loop`]: returns the counter and the ticks [`Self::CALIBRATION_LOOP`]
    /// iterations took.
    pub fn calibrate() -> (Self, u64) {
        #[cfg(target_arch = "arm")]
        {
            use cortex_m::peripheral::syst::SystClkSource;
            // Taken once, at start-up (the firmware's only call).
            if let Some(mut cp) = cortex_m::Peripherals::take() {
                cp.SYST.set_clock_source(SystClkSource::Core);
                cp.SYST.set_reload(0x00ff_ffff);
                cp.SYST.clear_current();
                cp.SYST.enable_interrupt();
                cp.SYST.enable_counter();
                // The counter reads 0 until its first tick reloads it.
                while cortex_m::peripheral::SYST::get_current() == 0 {}
            }
        }
        // Two loops, n and 2n iterations: their difference is n iterations, exactly 2n
        // instructions, with the cost of reading the counter and of the calls cancelled out.
        let mut c = Counter { num: 1, den: 1 };
        let n = Self::CALIBRATION_LOOP;
        let t0 = c.ticks();
        known_loop(n);
        let t1 = c.ticks();
        known_loop(2 * n);
        let t2 = c.ticks();
        let ticks = (t2 - t1).saturating_sub(t1 - t0);
        c.num = 2 * u64::from(n);
        c.den = ticks.max(1);
        (c, ticks)
    }

    /// The raw counter.
    fn ticks(&mut self) -> u64 {
        #[cfg(target_arch = "arm")]
        loop {
            // SysTick counts down from 2^24 − 1 and its exception counts the wraps; re-read
            // when a wrap happened in between.
            let w = WRAPS.load(Ordering::Acquire);
            let v = cortex_m::peripheral::SYST::get_current();
            if WRAPS.load(Ordering::Acquire) == w {
                return (u64::from(w) << 24) + u64::from(0x00ff_ffff - v);
            }
        }
        #[cfg(target_arch = "riscv32")]
        {
            riscv::register::minstret::read64()
        }
    }
}

impl crate::finetune::Clock for Counter {
    fn now(&mut self) -> u64 {
        self.ticks() * self.num / self.den
    }
}

#[cfg(target_arch = "arm")]
#[cortex_m_rt::exception]
fn SysTick() {
    // The only writer: a load and a store (ARMv6-M has no atomic read-modify-write).
    WRAPS.store(WRAPS.load(Ordering::Relaxed) + 1, Ordering::Release);
}

// Bounds from the runtime's linker script. Cortex-M (cortex-m-rt): the stack grows down from
// `_stack_start` towards `_stack_end` (the end of .bss); RISC-V (riscv-rt): from
// `_stack_start` towards `__sheap` (the end of .bss and of the empty heap).
extern "C" {
    static _stack_start: u32;
    #[cfg(target_arch = "arm")]
    static _stack_end: u32;
    #[cfg(target_arch = "riscv32")]
    static __sheap: u32;
    static __sdata: u32;
}

fn stack_bounds() -> (usize, usize) {
    // Only the symbols' addresses are taken (safe), never their contents.
    let top = core::ptr::addr_of!(_stack_start) as usize;
    #[cfg(target_arch = "arm")]
    let bottom = core::ptr::addr_of!(_stack_end) as usize;
    #[cfg(target_arch = "riscv32")]
    let bottom = core::ptr::addr_of!(__sheap) as usize;
    (bottom, top)
}

/// Bytes of RAM taken by statics (.data and .bss).
pub fn static_ram() -> usize {
    stack_bounds().0 - core::ptr::addr_of!(__sdata) as usize
}

/// What the stack region holds where it was never written.
const PAINT: u32 = 0xcccc_cccc;

/// Fills the free stack region with [`PAINT`] (cortex-m-rt does it before `main` with its
/// `paint-stack` feature; riscv-rt has no such feature, so this does it from `main`, leaving
/// the live frames above the current stack pointer alone).
pub fn paint_stack() {
    #[cfg(target_arch = "riscv32")]
    {
        let (bottom, _) = stack_bounds();
        let sp: usize;
        // SAFETY: reads the stack pointer.
        unsafe { core::arch::asm!("mv {}, sp", out(reg) sp) };
        let mut p = bottom;
        // 256 bytes below the stack pointer stay untouched: this function's own frame and
        // whatever the writes below need.
        while p + 256 < sp {
            // SAFETY: [bottom, sp − 256) is free stack RAM no live object occupies.
            unsafe { core::ptr::write_volatile(p as *mut u32, PAINT) };
            p += 4;
        }
    }
}

/// Deepest stack use so far: the lowest word of the stack region no longer holding
/// [`PAINT`] marks the peak.
pub fn peak_stack() -> usize {
    let (bottom, top) = stack_bounds();
    let mut p = bottom;
    // SAFETY: [bottom, top) is the stack region, RAM that is always readable; volatile, since
    // the compiler cannot know the pattern was written.
    while p < top && unsafe { core::ptr::read_volatile(p as *const u32) } == PAINT {
        p += 4;
    }
    top - p
}

/// The stack region never written: the RAM still free at the peak.
pub fn stack_headroom() -> usize {
    let (bottom, top) = stack_bounds();
    top - bottom - peak_stack()
}
