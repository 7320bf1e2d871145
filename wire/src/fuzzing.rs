//! Bodies of the fuzz targets (`fuzz/`) for this crate's decoders, kept here
//! so the normal tests replay the kept corpus through the same code
//! (test-support's `tests/fuzz_corpus.rs`). Each must never panic on any input, and checks
//! what must hold of what it accepts.

use crate::batch::{items, Ack, Batch};
use crate::record::{EventRef, PartialRecord};
use crate::segment::{self, read_frame, RecordType, SegmentHeader};
use crate::segz;

/// The recovery scan and the record decoders on a segment image.
pub fn segment_scan(data: &[u8]) {
    let base = SegmentHeader::decode(data).map(|h| h.base_seq).unwrap_or(1);
    let s = segment::scan(data, base);
    let mut n = 0;
    for f in segment::frames(data, s.end) {
        // Only whole frames (length in bounds, CRC good) come out of a scan.
        assert_eq!(read_frame(data, f.offset), Some(f));
        assert_eq!(f.seq, base + n);
        n += 1;
        match RecordType::from_u8(f.ty) {
            Some(RecordType::Event) => {
                let _ = EventRef::decode(f.payload);
            }
            Some(RecordType::Partial) => {
                let _ = PartialRecord::decode(f.payload);
            }
            None => {}
        }
    }
    assert_eq!(n, s.frames);
}

/// Everything the aggregator decodes from a shipper, and the answer the
/// shipper decodes.
pub fn batch_decode(data: &[u8]) {
    if let Ok(b) = Batch::decode(data, 1 << 20) {
        // What decodes re-encodes to the same bytes.
        assert_eq!(b.encode(), data);
        if let Ok(raw) = b.decompress() {
            assert_eq!(raw.len(), b.raw_len as usize);
            if let Ok(its) = items(&raw, b.count, b.after_seq, b.last_seq) {
                for it in its {
                    assert!(it.seq > b.after_seq && it.seq <= b.last_seq);
                    let _ = EventRef::decode(it.bytes);
                    if let Ok(p) = PartialRecord::decode(it.bytes) {
                        let mut again = Vec::new();
                        p.encode(&mut again);
                        assert_eq!(PartialRecord::decode(&again).as_ref(), Ok(&p));
                    }
                }
            }
        }
    }
    if let Ok(a) = Ack::decode(data) {
        let _ = Ack::decode(&a.encode());
    }
    let _ = EventRef::decode(data);
    let _ = PartialRecord::decode(data);
}

/// A compressed segment as the gateway's recovery, the shipper and the
/// offline readers take it: verified, then every chunk decompressed and its
/// frames checked.
pub fn segz_read(data: &[u8]) {
    let verified = segz::verify(data);
    let mut next = None;
    let read = segz::for_each_frame(data, |f| {
        // Frames come out in seq order, one after the other.
        if let Some(n) = next {
            assert_eq!(f.seq, n);
        }
        next = Some(f.seq + 1);
        let _ = EventRef::decode(f.payload);
        let _ = PartialRecord::decode(f.payload);
    });
    // Reading succeeds only on what verifies, and then ends where the
    // header says.
    if let Ok(h) = &read {
        assert_eq!(verified.as_ref(), Ok(h));
        if let Some(n) = next {
            assert_eq!(n - 1, h.last_seq);
        }
    }
    if verified.is_err() {
        assert!(read.is_err());
    }
}
