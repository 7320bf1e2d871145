//! The recovery scan and record decoders on an arbitrary segment image.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    wire::fuzzing::segment_scan(data);
});
