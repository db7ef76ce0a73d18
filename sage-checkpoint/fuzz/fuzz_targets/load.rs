//! Any bytes through the checkpoint loader: errors are fine, panics and partial loads are not.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    sage_checkpoint::fuzzing::exercise(data);
});
