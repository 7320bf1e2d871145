//! Builders the crate's unit tests share.

use wire::batch::{push_item, Batch, BatchKind};
use wire::record::{Counts, PartialRecord, RowKey};
use wire::segment::RecordType;

pub(crate) fn clicks(n: u64) -> Counts {
    Counts {
        clicks: n,
        spend_micros: n * 1000,
        ..Counts::default()
    }
}

/// (seq, from, watermark, rows) of one partial.
pub(crate) type P = (u64, u64, i64, Vec<(RowKey, Counts)>);

pub(crate) fn partials(gw: &str, shard: u16, ps: &[P]) -> Vec<u8> {
    let mut raw = Vec::new();
    for (seq, from, wm, rows) in ps {
        let mut b = Vec::new();
        PartialRecord {
            from_seq: *from,
            to_seq: seq - 1,
            watermark_ms: *wm,
            rows: rows.clone(),
            unrecorded: Vec::new(),
        }
        .encode(&mut b);
        push_item(&mut raw, *seq, RecordType::Partial as u8, &b);
    }
    let after = ps[0].1;
    let last = ps.last().unwrap().0;
    Batch::seal(
        BatchKind::Partials,
        gw,
        shard,
        after,
        last,
        ps.len() as u32,
        &raw,
        1,
    )
    .unwrap()
    .encode()
}
