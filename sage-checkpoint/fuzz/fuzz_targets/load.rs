//! Any bytes through the checkpoint loader: errors are fine, panics and partial loads are not.
#![no_main]

#[path = "../body.rs"]
#[allow(dead_code)] // `seeds` is for the example and the tests.
mod body;

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    body::exercise(data);
});
