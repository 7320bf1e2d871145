//! The aggregator's batch decoding (header, CRC, zstd, items, records) and
//! the shipper's answer decoding, on arbitrary bytes.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    wire::fuzzing::batch_decode(data);
});
