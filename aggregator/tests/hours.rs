//! Hour rows: once reconciliation passes an hour its minute rows are merged
//! into one row per dimension tuple, and every later change to a minute row
//! of it (late partials, reconcile corrections) keeps the hour row equal to
//! the sum of its minutes; hourly and daily answers equal the minute rows
//! summed, whether a range starts on an hour or inside one.

use std::collections::BTreeMap;
use std::sync::Arc;

use aggregator::store::{Query, Store};
use wire::record::{Counts, RowKey};

mod common;
use common::{Gw, H, T};

fn reconcile_until_idle(store: &Arc<Store>, now: i64) {
    let mut r = common::reconciler(store);
    common::reconcile_until_idle(&mut r, now);
}

/// Every hour's rows equal its minute rows summed, and the answers of the
/// query equal the minute rows summed by bucket.
fn check(store: &Store, now: i64) {
    for h in H..H + 3 {
        let mut want: BTreeMap<RowKey, (Counts, u32)> = BTreeMap::new();
        for (mut k, r) in store.rows_in(h * 60, h * 60 + 60).unwrap() {
            k.minute = h * 60;
            let e = want.entry(k).or_default();
            e.0.merge(&r.counts);
            e.1 = e.1.max(r.version);
        }
        let got: BTreeMap<RowKey, (Counts, u32)> = store
            .hour_rows(h)
            .unwrap()
            .into_iter()
            .map(|(k, r)| (k, (r.counts, r.version)))
            .collect();
        assert!(!got.is_empty(), "hour {h} merged");
        assert_eq!(got, want, "hour {h}");
    }
    let s0 = T / 1000;
    for (start, end, bucket) in [
        (s0, s0 + 3 * 3600, 3600),
        (s0 + 1800, s0 + 3 * 3600, 3600),
        (s0 - s0 % 86_400, s0 - s0 % 86_400 + 86_400, 86_400),
    ] {
        let q = Query {
            advertiser_id: "adv".into(),
            start_s: start,
            end_s: end,
            bucket_s: bucket,
            campaign_id: None,
            ad_id: None,
        };
        let got: BTreeMap<(i64, String), (Counts, u32)> = store
            .query(&q, now)
            .unwrap()
            .into_iter()
            .map(|(k, (c, _, v))| (k, (c, v)))
            .collect();
        let mut want: BTreeMap<(i64, String), (Counts, u32)> = BTreeMap::new();
        for (k, r) in store
            .rows_in((start / 60) as u32, (end / 60) as u32)
            .unwrap()
        {
            let t = k.minute as i64 * 60;
            let e = want.entry((t - t % bucket, k.ad_id)).or_default();
            e.0.merge(&r.counts);
            e.1 = e.1.max(r.version);
        }
        assert_eq!(got, want, "{start}..{end} by {bucket}");
    }
}

#[test]
fn hour_rows_stay_the_sum_of_their_minutes_through_late_data_and_corrections() {
    let d = tempfile::tempdir().unwrap();
    let store = common::open_store(d.path());
    let now = T + 4 * 3_600_000;
    let (mut a, mut b) = (Gw::new("gwa"), Gw::new("gwb"));
    for i in 0..180 {
        a.click(&format!("a{i}"), T + i * 60_000);
        b.click(&format!("b{i}"), T + i * 60_000 + 500);
    }
    // Retried at the other PoP: one copy becomes a duplicate when reconciled.
    a.click("x", T + 3_700_000);
    b.click("x", T + 3_700_100);
    a.ship(&store, now);
    b.ship(&store, now);
    reconcile_until_idle(&store, now);
    check(&store, now);
    // Late data for merged hours: a correction of each minute row it lands
    // in, and the hours follow.
    a.click("late-1", T + 3_700_200);
    a.click("late-2", T + 10);
    b.click("x2", T + 7_300_000);
    a.click("x2", T + 7_300_500);
    a.ship(&store, now);
    b.ship(&store, now);
    check(&store, now);
    // Reconciled again: the retried late click is corrected, the hours follow.
    reconcile_until_idle(&store, now);
    check(&store, now);
    let day = store
        .query(
            &Query {
                advertiser_id: "adv".into(),
                start_s: T / 1000,
                end_s: T / 1000 + 3 * 3600,
                bucket_s: 86_400,
                campaign_id: None,
                ad_id: None,
            },
            now,
        )
        .unwrap();
    let (clicks, dups) = day
        .values()
        .fold((0, 0), |(c, d), (n, _, _)| (c + n.clicks, d + n.duplicates));
    assert_eq!((clicks, dups), (360 + 1 + 2 + 1, 2));
}
