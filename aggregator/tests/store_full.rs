//! The aggregator's store on a filesystem that fills up: batches are answered
//! Retry (never Applied) while it is full, nothing half-applied remains, and
//! once space returns the same batches apply and the totals are exact.

use aggregator::store::{Query, Settings, Store};
use test_support::fs::SmallFs;
use wire::batch::{push_item, Batch, BatchKind, Status};
use wire::record::{Counts, Device, PartialRecord, RowKey};
use wire::segment::RecordType;

const T0: i64 = 1_795_496_400_000;

/// Partials batch `i` of one shard: partial seq 2i+2 covering (2i, 2i+1], with
/// 300 rows of distinct ads (so the store grows), one click each.
fn batch(i: u64) -> Vec<u8> {
    let rows = (0..300)
        .map(|r| {
            (
                RowKey {
                    minute: (T0 / 60_000) as u32,
                    advertiser_id: "adv".into(),
                    campaign_id: format!("camp-{i}"),
                    ad_id: format!("ad-{i}-{r}-{}", "x".repeat(40)),
                    device: Device::Desktop,
                    country: *b"SE",
                },
                Counts {
                    clicks: 1,
                    spend_micros: 10,
                    ..Counts::default()
                },
            )
        })
        .collect();
    let p = PartialRecord {
        from_seq: 2 * i,
        to_seq: 2 * i + 1,
        watermark_ms: T0,
        rows,
        unrecorded: Vec::new(),
    };
    let mut enc = Vec::new();
    p.encode(&mut enc);
    let mut raw = Vec::new();
    push_item(&mut raw, 2 * i + 2, RecordType::Partial as u8, &enc);
    Batch::seal(BatchKind::Partials, "gw", 0, 2 * i, 2 * i + 2, 1, &raw, 1)
        .unwrap()
        .encode()
}

fn clicks(s: &Store) -> u64 {
    let q = Query {
        advertiser_id: "adv".into(),
        start_s: 0,
        end_s: T0 / 1000 + 3600,
        bucket_s: 86_400,
        campaign_id: None,
        ad_id: None,
    };
    s.query(&q, T0).unwrap().values().map(|v| v.0.clicks).sum()
}

#[test]
fn a_full_store_answers_retry_and_catches_up_exactly_once_space_returns() {
    let d = tempfile::tempdir().unwrap();
    let dir = d.path().join("store");
    let Some(_fs) = SmallFs::mount(&dir, 6 << 20) else {
        eprintln!("skipped: cannot mount a tmpfs here (needs root)");
        return;
    };
    std::fs::write(dir.join("ballast"), vec![1u8; 2 << 20]).unwrap();
    let store = Store::open(&dir.join("agg.redb"), Settings::default()).unwrap();
    let allowed = vec!["gw".to_string()];
    let mut applied = 0u64;
    let mut retries = 0;
    let mut i = 0u64;
    // Apply until the filesystem refuses, then keep offering the next batch.
    while retries < 5 && i < 10_000 {
        let (ack, _) = store.apply_many(&[(&batch(i), &allowed)], T0).remove(0);
        match ack.status {
            Status::Applied => {
                assert_eq!(retries, 0, "applied after a refusal without new space");
                applied += 1;
                i += 1;
            }
            Status::Retry => retries += 1,
            s => panic!("batch {i}: {s:?} {}", ack.reason),
        }
    }
    assert_eq!(
        retries, 5,
        "the filesystem never filled ({applied} batches applied)"
    );
    assert!(applied > 10);
    // Nothing of the refused batch is visible, and what was applied is whole.
    assert_eq!(clicks(&store), applied * 300);
    assert_eq!(store.cursors("gw", 0).unwrap().0, 2 * applied);
    // Space returns: the shipper's retries go through, each batch once.
    std::fs::remove_file(dir.join("ballast")).unwrap();
    for j in i..i + 5 {
        let (ack, _) = store.apply_many(&[(&batch(j), &allowed)], T0).remove(0);
        assert_eq!(ack.status, Status::Applied, "{}", ack.reason);
        let (dup, _) = store.apply_many(&[(&batch(j), &allowed)], T0).remove(0);
        assert_eq!(dup.status, Status::Duplicate);
    }
    assert_eq!(clicks(&store), (applied + 5) * 300);
    drop(store);
    // And it reopens whole.
    let store = Store::open(&dir.join("agg.redb"), Settings::default()).unwrap();
    assert_eq!(clicks(&store), (applied + 5) * 300);
}
