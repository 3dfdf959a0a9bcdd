//! cargo-fuzz target: see `kwire_fuzz::service_state`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| kwire_fuzz::service_state(data));
