//! cargo-fuzz target: the userspace API parser (`parse_request`, then `Device::apply`) on arbitrary request text.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| kwire_fuzz::uapi_parse(data));
