//! A compressed segment, as recovery and the shipper read it.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    wire::fuzzing::segz_read(data);
});
