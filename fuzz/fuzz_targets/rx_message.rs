//! cargo-fuzz target: `RxPath::message` on arbitrary datagrams against a device with a peer.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| kwire_fuzz::rx_message(data));
