//! Turns the 8x8 handwritten digits (1,797 images; smartcore's copy of the UCI/scikit-learn set)
//! into `edge/data/digits.bin`, the array the firmware compiles into flash.
//!
//! Layout: 1,797 × 64 pixel bytes (row-major, each 0..=16 as in the source), then 1,797 label
//! bytes (0..=9). u8 keeps every one of the 17 grey levels (4 bits would not) and the whole
//! file is 116,805 bytes, well inside the 4 MB code memory of the emulated board.
//!
//! Run from the repository root (not from inside `edge/`, whose cargo config targets the MCU):
//! `cargo run --release --manifest-path edge/digits-gen/Cargo.toml`

use std::path::PathBuf;

const SAMPLES: usize = 1797;
const PIXELS: usize = 64;

fn main() {
    let d = smartcore::dataset::digits::load_dataset();
    assert_eq!(
        (d.num_samples, d.num_features),
        (SAMPLES, PIXELS),
        "unexpected shape"
    );
    let mut out = Vec::with_capacity(SAMPLES * (PIXELS + 1));
    for &x in &d.data {
        // The source holds integer grey levels stored as floats; refuse anything else rather
        // than silently rounding a changed data set.
        assert!(
            x.fract() == 0.0 && (0.0..=16.0).contains(&x),
            "pixel {x} is not an integer in 0..=16"
        );
        out.push(x as u8);
    }
    for &y in &d.target {
        assert!(y.fract() == 0.0 && (0.0..=9.0).contains(&y), "label {y}");
        out.push(y as u8);
    }
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../data/digits.bin");
    std::fs::create_dir_all(path.parent().unwrap()).expect("create edge/data");
    std::fs::write(&path, &out).expect("write digits.bin");
    println!("wrote {} bytes to {}", out.len(), path.display());
}
