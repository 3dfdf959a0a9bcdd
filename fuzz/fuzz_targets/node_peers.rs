//! cargo-fuzz target: see `kwire_fuzz::node_peers`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| kwire_fuzz::node_peers(data));
