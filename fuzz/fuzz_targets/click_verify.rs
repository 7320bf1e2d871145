//! The signed-click verifier. Odd first byte: the rest, signed with the test
//! key, so the fuzzer reaches the decoding behind a good signature; even: the
//! rest as it is.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    gateway_core::fuzzing::click_verify(data);
});
