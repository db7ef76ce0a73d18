//! The fuzz target's body on stable: every seed, and every truncation and single-bit flip of
//! one seed, goes through the parser and the loader without a panic.

#[path = "../fuzz/body.rs"]
mod body;

use body::{exercise, seeds};
use sage_checkpoint::Checkpoint;

#[test]
fn seeds_parse_and_restore() {
    for s in seeds() {
        Checkpoint::parse(&s).unwrap();
        exercise(&s);
    }
}

#[test]
fn mutated_seeds_never_panic() {
    for s in [&seeds()[1], &seeds()[4]] {
        for n in 0..s.len() {
            exercise(&s[..n]);
        }
        for i in (0..s.len()).step_by(3) {
            let mut b = s.clone();
            b[i] ^= 0x80 >> (i % 8);
            exercise(&b);
        }
    }
}
