//! SAGE on-device fine-tuning: a 64-32-10 MLP pretrained on the host (weights in flash) adapts
//! to the device user's handwriting from a few labelled samples, with `sage_core::Optimizer`
//! over `sage_cpu::Cpu`, on a Cortex-M4F, a Cortex-M0 or an RV32IMC core. It prints the
//! comparison table (last layer / all layers × AdamW-SAGE / AdamW × f32 / bf16 state), the
//! instructions each part took, and the RAM used, and exits with success only when every
//! setup improved held-out accuracy by more than three times its spread across seeds.
//!
//! No allocator: there is no `#[global_allocator]`, the `alloc` crate is never linked
//! (`scripts/edge-demo` checks the ELF for its symbols), and every buffer is a `static` or on
//! the stack.
#![no_std]
#![no_main]

mod finetune;
mod model;
mod platform;

// The RISC-V runtime's critical sections (semihosting output takes one): a single hart.
#[cfg(target_arch = "riscv32")]
use riscv as _;

/// What the device ships in flash.
mod data {
    include!(concat!(env!("OUT_DIR"), "/pretrained.rs"));
    /// The device user's labelled images (`edge/pretrain`: the held-out writers' digits in
    /// the user's hand).
    pub static USER: &[u8] = include_bytes!("../data/user.bin");
}

use finetune::{Arena, Clock, Cost, Experiment, Problem, Summary};
use platform::{hprintln, Counter};

/// Every setup's buffers, one setup at a time (in .bss).
static mut ARENA: Arena = Arena::Empty;

#[cfg_attr(target_arch = "arm", cortex_m_rt::entry)]
#[cfg_attr(target_arch = "riscv32", riscv_rt::entry)]
fn main() -> ! {
    platform::paint_stack();
    let (mut clock, ticks) = Counter::calibrate();
    // SAFETY: `main` runs once and is the only code that names ARENA (no interrupt handler
    // does), so this is the only reference to it, ever.
    let arena = unsafe { &mut *core::ptr::addr_of_mut!(ARENA) };
    let ok = match run(arena, &mut clock, ticks) {
        Ok(ok) => ok,
        Err(e) => {
            hprintln!("FAIL: {}", e);
            false
        }
    };
    platform::exit(ok)
}

/// Tenths of `num / den` as `whole.tenth` text.
struct Tenths(u64, u64);

impl core::fmt::Display for Tenths {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        let t = (self.0 * 10 + self.1 / 2) / self.1.max(1);
        write!(f, "{}.{}", t / 10, t % 10)
    }
}

/// A non-negative decimal with up to four places, without `core::fmt`'s float printing (its
/// exact algorithms take kilobytes of stack, which the 16 KiB parts cannot spare).
struct Dec(f64);

impl core::fmt::Display for Dec {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        let t = libm::round(self.0 * 1e4) as u64;
        write!(f, "{}", t / 10_000)?;
        let mut frac = t % 10_000;
        if frac == 0 {
            return Ok(());
        }
        f.write_str(".")?;
        let mut unit = 1000;
        while frac > 0 {
            write!(f, "{}", frac / unit)?;
            frac %= unit;
            unit /= 10;
        }
        Ok(())
    }
}

/// A fraction as per cent, one decimal (`+` on non-negative values with the `+` flag).
struct Pct(f32);

impl core::fmt::Display for Pct {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        let t = libm::roundf(self.0 * 1000.0) as i32;
        let sign = match (t < 0, f.sign_plus()) {
            (true, _) => "-",
            (false, true) => "+",
            (false, false) => "",
        };
        write!(f, "{sign}{}.{}", t.abs() / 10, t.abs() % 10)
    }
}

fn run(arena: &mut Arena, clock: &mut Counter, ticks: u64) -> Result<bool, Problem> {
    hprintln!("SAGE on-device fine-tuning on {}", platform::TARGET);
    hprintln!(
        "instructions: QEMU -icount shift=0 (1 ns per instruction); calibration: a {}-instruction loop = {} counter ticks",
        2 * Counter::CALIBRATION_LOOP,
        ticks
    );
    let user = model::Images::new(data::USER).ok_or(Problem::UserSet)?;
    let exp = Experiment::new(&data::PRETRAINED, user)?;
    hprintln!(
        "model: MLP 64-32-10 pretrained on the host on 1500 unshifted digits (weights in flash); the user: {} images of other writers, in the user's hand (rotated, offset, thickened strokes)",
        user.len()
    );
    hprintln!(
        "protocol: per seed, {} labelled samples ({} per class) from the user's first {} images, {} full-batch steps (AdamW-SAGE lr {}, beta0 {}; AdamW lr {}; decay {}, clip {}), accuracy on the user's other {} images; {} seeds",
        finetune::SHOTS,
        finetune::PER_CLASS,
        finetune::POOL,
        finetune::STEPS,
        Dec(finetune::LR_SAGE),
        Dec(finetune::BETA0),
        Dec(finetune::LR_ADAMW),
        Dec(finetune::WEIGHT_DECAY),
        Dec(finetune::CLIP),
        exp.held_out().len(),
        finetune::SEEDS,
    );
    let t0 = clock.now();
    let before = exp.before();
    let mut eval_before = clock.now() - t0;
    hprintln!(
        "before fine-tuning: {}% on the held-out images",
        Pct(before)
    );
    hprintln!("| layers | optimizer | state | before | after (mean) | seeds (min-max) | gain | spread | RAM buffers | norm instr/elem | update instr/elem | instr/step/param | pass |");
    hprintln!("|---|---|---|---|---|---|---|---|---|---|---|---|---|");
    let mut all = true;
    let mut total = Cost::default();
    for setup in finetune::setups() {
        let s = exp.run(setup, arena, before, clock)?;
        all &= s.passed();
        row(&s);
        let c = &s.cost;
        for (t, x) in [
            (&mut total.backprop, c.backprop),
            (&mut total.norm, c.norm),
            (&mut total.update, c.update),
            (&mut total.eval, c.eval),
        ] {
            *t += x;
        }
    }
    let t0 = clock.now();
    let k = finetune::kernel_cost(arena, clock)?;
    let bench = clock.now() - t0;
    hprintln!(
        "kernels alone, per element (320 weights x {}): norm {} instr (the f64 sum it replaces: {}), AdamW-SAGE update {}, AdamW update {}; norm = {}% of the AdamW-SAGE update",
        finetune::KernelCost::REPS,
        Tenths(k.norm, k.elements),
        Tenths(k.norm_f64, k.elements),
        Tenths(k.update_sage, k.elements),
        Tenths(k.update_adamw, k.elements),
        Tenths(100 * k.norm, k.update_sage),
    );
    eval_before += total.eval;
    let end = clock.now();
    let known = total.backprop + total.norm + total.update + eval_before + bench;
    hprintln!(
        "instruction shares of the whole run ({} instructions): forward/backward {}%, norm pass {}%, update pass {}%, evaluation {}%, kernel benchmark {}%, the rest (start-up, calibration, output) {}%",
        end,
        Tenths(100 * total.backprop, end),
        Tenths(100 * total.norm, end),
        Tenths(100 * total.update, end),
        Tenths(100 * eval_before, end),
        Tenths(100 * bench, end),
        Tenths(100 * end.saturating_sub(known), end),
    );
    let (stat, peak, arena_bytes) = (
        platform::static_ram(),
        platform::peak_stack(),
        core::mem::size_of::<Arena>(),
    );
    let headroom = platform::stack_headroom();
    hprintln!(
        "RAM: static {} B (.data/.bss; of which the arena {} B: the largest setup's buffers), peak stack {} B: {} B of {} B; never touched: {} B",
        stat,
        arena_bytes,
        peak,
        stat + peak,
        platform::RAM_BYTES,
        headroom,
    );
    // The stack must never have reached the end of .bss (it would have overwritten it).
    let fits = headroom > 0;
    if !fits {
        hprintln!("FAIL: the stack used all free RAM");
    }
    let ok = all && fits;
    hprintln!(
        "{}: every setup improved held-out accuracy by more than 3x its spread across {} seeds (spread = sample standard deviation of the accuracy after fine-tuning)",
        if ok { "PASS" } else { "FAIL" },
        finetune::SEEDS
    );
    Ok(ok)
}

fn row(s: &Summary) {
    let (min, max) = s.range();
    let c = &s.cost;
    hprintln!(
        "| {} | {} | {} | {}% | {}% | {}-{}% | {:+} | {} | {} B | {} | {} | {} | {} |",
        s.setup.layers.name(),
        s.setup.optimizer(),
        if s.setup.state == sage_core::DType::F32 {
            "f32"
        } else {
            "bf16"
        },
        Pct(s.before),
        Pct(s.mean_after()),
        Pct(min),
        Pct(max),
        Pct(s.gain()),
        Pct(s.spread()),
        s.setup.ram_bytes(),
        Tenths(c.norm, c.elements),
        Tenths(c.update, c.elements),
        Tenths(c.norm + c.update, c.elements),
        if s.passed() { "pass" } else { "FAIL" },
    );
}
