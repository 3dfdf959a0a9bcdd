//! cargo-fuzz target: see `kwire_fuzz::policy_state`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| kwire_fuzz::policy_state(data));
