//! cargo-fuzz target: `offload::gro::Coalescer` push and drain on arbitrary packets.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| kwire_fuzz::gro_coalesce(data));
