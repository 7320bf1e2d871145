//! The HTTP/1.1 request parser (in place, chunked decoding included) on
//! arbitrary bytes: no panic, and what it reports stays inside the buffer.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    gateway_core::fuzzing::http_parse(data);
});
