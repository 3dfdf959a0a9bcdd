//! cargo-fuzz target: `offload::tso::split` on an arbitrary tun frame (virtio-net header + packet).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| kwire_fuzz::tso_split(data));
