//! Unique users through the store: minute, hour and day buckets merge
//! sketches (never add counts), a range that starts inside an hour uses
//! that hour's minutes only, and a reconciled minute's sketch is rebuilt
//! from the deduplicated events.

use std::collections::BTreeMap;

use aggregator::store::{Query, Store};

mod common;
use common::{Gw, T};

fn uniques(s: &Store, start_s: i64, end_s: i64, bucket_s: i64) -> BTreeMap<i64, u64> {
    s.unique_users(&Query {
        advertiser_id: "adv".into(),
        start_s,
        end_s,
        bucket_s,
        campaign_id: None,
        ad_id: None,
    })
    .unwrap()
    .into_iter()
    .map(|((t, ad), n)| {
        assert_eq!(ad, "ad-1");
        (t - T / 1000, n)
    })
    .collect()
}

#[test]
fn buckets_merge_sketches_and_reconciled_minutes_are_rebuilt() {
    let d = tempfile::tempdir().unwrap();
    let store = common::open_store(d.path());
    let now = T + 7_200_000;
    let (mut a, mut b) = (Gw::new("gwa"), Gw::new("gwb"));
    // Minute 0: users 0..50; minute 1: users 30..90 (30 seen in both).
    for u in 0..50 {
        a.click_by(&format!("c0-{u}"), T + u * 100, &format!("user-{u}"));
    }
    for u in 30..90 {
        a.click_by(
            &format!("c1-{u}"),
            T + 60_000 + u * 100,
            &format!("user-{u}"),
        );
    }
    // A click retried at the other PoP, its copy there under another user
    // id: each gateway accepted its copy, so until reconciled it counts.
    a.click_by("x", T + 120_000, "user-0");
    b.click_by("x", T + 120_500, "user-elsewhere");
    a.ship(&store, now);
    b.ship(&store, now);
    let (s0, hour, day) = (T / 1000, 3600, 86_400);
    let by_minute = uniques(&store, s0, s0 + hour, 60);
    assert_eq!(by_minute, BTreeMap::from([(0, 50), (60, 60), (120, 2)]));
    // An hour and a day merge the sketches: 90 users and the one elsewhere,
    // where adding the minutes would say 112.
    assert_eq!(
        uniques(&store, s0, s0 + hour, hour),
        BTreeMap::from([(0, 91)])
    );
    let day_start = s0 - s0 % day;
    let per_day = uniques(&store, day_start, day_start + day, day);
    assert_eq!(per_day.values().copied().collect::<Vec<_>>(), vec![91]);
    // From inside the hour: only minutes 1 and 2 count (60, and the two
    // of minute 2).
    assert_eq!(
        uniques(&store, s0 + 60, s0 + hour, hour),
        BTreeMap::from([(0, 62)])
    );

    let mut r = common::reconciler(&store);
    common::reconcile_until_idle(&mut r, now);
    // Reconciled: the copy at the other PoP is a duplicate, and its user
    // is gone from the minute and from the hour.
    let by_minute = uniques(&store, s0, s0 + hour, 60);
    assert_eq!(by_minute, BTreeMap::from([(0, 50), (60, 60), (120, 1)]));
    assert_eq!(
        uniques(&store, s0, s0 + hour, hour),
        BTreeMap::from([(0, 90)])
    );
    let per_day = uniques(&store, day_start, day_start + day, day);
    assert_eq!(per_day.values().copied().collect::<Vec<_>>(), vec![90]);
    // A range of 56 years of minutes (empty stretches are skipped in one
    // step, not visited a minute at a time).
    let all = uniques(&store, 0, s0 + day, day);
    assert_eq!(all.values().copied().collect::<Vec<_>>(), vec![90]);
}
