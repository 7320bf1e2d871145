//! The HTTP/3 request layer (frames, QPACK, the HTTP/1.1 form the shard
//! parses) and the control streams on arbitrary bytes: no panic.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    gateway_core::fuzzing::h3_request(data);
});
