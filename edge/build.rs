//! Per target: puts the board's memory layout where the runtime's linker script finds it as
//! `memory.x`, and turns on all-layer fine-tuning where the RAM allows it (the Cortex-M4F
//! board). For every target: compiles the pretrained weights (`data/pretrained.bin`, written
//! by `edge/pretrain`) into a `static [f32; 2410]` in flash.
use std::{env, fmt::Write, fs, path::PathBuf};

/// Parameters of the 64-32-10 MLP (`src/model.rs`).
const PARAMS: usize = 64 * 32 + 32 + 32 * 10 + 10;

fn main() {
    let out = PathBuf::from(env::var_os("OUT_DIR").expect("OUT_DIR"));
    let target = env::var("TARGET").expect("TARGET");
    // The memory layout, and whether all 2,410 parameters' training buffers (48 KB with f32
    // state) fit beside everything else.
    let (memory, all_layers) = match target.as_str() {
        "thumbv6m-none-eabi" => ("memory-microbit.x", false),
        t if t.starts_with("riscv32") => ("memory-riscv-virt.x", false),
        // thumbv7em-none-eabihf, and the other Cortex-M4F/M7/M33F targets (README.md).
        _ => ("memory-mps2-an386.x", true),
    };
    fs::copy(memory, out.join("memory.x")).expect("copy the memory layout");
    println!("cargo:rustc-link-search={}", out.display());
    println!("cargo::rustc-check-cfg=cfg(edge_all_layers)");
    if all_layers {
        println!("cargo:rustc-cfg=edge_all_layers");
    }

    let bytes = fs::read("data/pretrained.bin").expect(
        "data/pretrained.bin (run `cargo run --release --manifest-path edge/pretrain/Cargo.toml`)",
    );
    assert_eq!(bytes.len(), PARAMS * 4, "data/pretrained.bin: wrong length");
    let mut src = format!(
        "/// The host-pretrained weights (`w1, b1, w2, b2`), from `data/pretrained.bin`.\n\
         pub static PRETRAINED: [f32; {PARAMS}] = [\n"
    );
    for b in bytes.chunks_exact(4) {
        let bits = u32::from_le_bytes([b[0], b[1], b[2], b[3]]);
        assert!(
            f32::from_bits(bits).is_finite(),
            "data/pretrained.bin: non-finite weight"
        );
        writeln!(src, "    f32::from_bits({bits:#010x}),").unwrap();
    }
    src.push_str("];\n");
    fs::write(out.join("pretrained.rs"), src).expect("write pretrained.rs");

    for f in [
        "memory-mps2-an386.x",
        "memory-microbit.x",
        "memory-riscv-virt.x",
        "data/pretrained.bin",
        "build.rs",
    ] {
        println!("cargo:rerun-if-changed={f}");
    }
}
