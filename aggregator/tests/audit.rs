//! Sealed audit files in a local-directory object store: one Parquet file per
//! (hour, gateway) once reconciled, addenda for late events, the same object
//! (never two) when the sealer is stopped between the upload and the
//! manifest, and the files read back with the parquet reader equal to the
//! raw events.

use std::sync::Arc;

use aggregator::audit::{self, SealStats, SealedPart};
use aggregator::metrics::ReconcileStats;
use aggregator::reconcile::{self, Reconciler};
use aggregator::store::Store;

mod common;
use common::{click_ids, Gw, H, T};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn closed_hours_are_sealed_once_and_late_events_go_to_addenda() {
    let d = tempfile::tempdir().unwrap();
    let store = common::open_store(d.path());
    let cfg = audit::Settings::default();
    let target = cfg.target(&d.path().join("s.redb")).unwrap();
    let (objects, prefix) = audit::open(&cfg, &target).unwrap();
    let stats = SealStats::default();
    let now = T + 7_200_000;
    let (mut a, mut b) = (Gw::new("gwa"), Gw::new("gwb"));
    for i in 0..50 {
        a.click(&format!("a{i}"), T + i * 60_000);
        b.click(&format!("b{i}"), T + i * 60_000 + 1);
    }
    a.ship(&store, now);
    b.ship(&store, now);
    // Not reconciled yet: nothing is sealed.
    assert_eq!(
        audit::seal_pass(&store, &objects, &prefix, &cfg, &stats, now, 64)
            .await
            .unwrap(),
        0
    );
    let mut r = common::reconciler(&store);
    let rs = store.clone();
    tokio::task::spawn_blocking(move || {
        common::reconcile_until_idle(&mut r, now);
        drop(rs);
    })
    .await
    .unwrap();
    assert_eq!(
        audit::seal_pass(&store, &objects, &prefix, &cfg, &stats, now, 64)
            .await
            .unwrap(),
        2
    );
    let dir = d.path().join("audit/raw/2026-11-24/05");
    let file_a = dir.join("gateway=gwa/part-00000.parquet");
    let got = click_ids(&std::fs::read(&file_a).unwrap());
    let mut want: Vec<String> = (0..50).map(|i| format!("a{i}")).collect();
    want.sort();
    assert_eq!(got, want);
    // Nothing new: nothing more.
    assert_eq!(
        audit::seal_pass(&store, &objects, &prefix, &cfg, &stats, now, 64)
            .await
            .unwrap(),
        0
    );

    // Late events of the sealed hour: an addendum, the sealed file untouched.
    let before = std::fs::read(&file_a).unwrap();
    a.click("late-1", T + 10);
    a.click("late-2", T + 20);
    a.ship(&store, now);
    // The sealer stops between the upload and the manifest (as a crash
    // would): the part stays an intent...
    let parts_before = store.audit_parts(H, "gwa").unwrap().len();
    assert_eq!(parts_before, 1);
    let sealed = audit::seal_pass(&store, &objects, &prefix, &cfg, &stats, now, 64)
        .await
        .unwrap();
    assert_eq!(sealed, 1);
    assert_eq!(
        std::fs::read(&file_a).unwrap(),
        before,
        "a sealed file is never rewritten"
    );
    let add = std::fs::read(dir.join("gateway=gwa/part-00001.parquet")).unwrap();
    assert_eq!(
        click_ids(&add),
        vec!["late-1".to_string(), "late-2".to_string()]
    );
    // ... and a recorded intent is built again into the same bytes under the
    // same name: mark part 1 an intent again and pass.
    let (n, json) = store.audit_parts(H, "gwa").unwrap().pop().unwrap();
    let mut p: SealedPart = serde_json::from_str(&json).unwrap();
    p.state = "intent".into();
    store
        .put_audit_part(H, "gwa", n, &serde_json::to_string(&p).unwrap(), None)
        .unwrap();
    assert_eq!(
        audit::seal_pass(&store, &objects, &prefix, &cfg, &stats, now, 64)
            .await
            .unwrap(),
        1
    );
    assert_eq!(
        std::fs::read(dir.join("gateway=gwa/part-00001.parquet")).unwrap(),
        add
    );
    let files: Vec<_> = std::fs::read_dir(dir.join("gateway=gwa"))
        .unwrap()
        .collect();
    assert_eq!(files.len(), 2, "one object per part");
    assert_eq!(store.seal_backlog().unwrap(), 0);
    assert_eq!(stats.files.load(std::sync::atomic::Ordering::Relaxed), 4);
}

/// Runs the reconciler until it has nothing left to do.
async fn reconcile_until_idle(r: Reconciler, now: i64) -> Reconciler {
    tokio::task::spawn_blocking(move || {
        let mut r = r;
        common::reconcile_until_idle(&mut r, now);
        r
    })
    .await
    .unwrap()
}

/// Clicks and duplicates in the rows of `[m0, m1)`.
fn billed(store: &Store, m0: u32, m1: u32) -> (u64, u64) {
    store
        .rows_in(m0, m1)
        .unwrap()
        .values()
        .fold((0, 0), |(c, d), r| {
            (c + r.counts.clicks, d + r.counts.duplicates)
        })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn minutes_dropped_from_the_hot_store_are_recounted_from_their_sealed_files() {
    let d = tempfile::tempdir().unwrap();
    let store = common::open_store(d.path());
    let cfg = audit::Settings::default();
    let target = cfg.target(&d.path().join("s.redb")).unwrap();
    let (objects, prefix) = audit::open(&cfg, &target).unwrap();
    let cold = Arc::new(audit::ColdReader {
        objects: objects.clone(),
        prefix: prefix.clone(),
        rt: tokio::runtime::Handle::current(),
    });
    let stats = SealStats::default();
    let now = T + 7_200_000;
    let (mut a, mut b) = (Gw::new("gwa"), Gw::new("gwb"));
    for i in 0..40 {
        a.click(&format!("a{i}"), T + i * 60_000);
        b.click(&format!("b{i}"), T + i * 60_000 + 1);
    }
    // One click retried at the other PoP: billed once once reconciled.
    a.click("x", T + 5 * 60_000 + 100);
    b.click("x", T + 5 * 60_000 + 900);
    a.ship(&store, now);
    b.ship(&store, now);
    let settings = reconcile::Settings::default();
    let new_reconciler = |cold: Option<Arc<audit::ColdReader>>| {
        Reconciler::new(
            store.clone(),
            settings.clone(),
            Arc::new(ReconcileStats::default()),
        )
        .with_cold(cold)
    };
    let r = reconcile_until_idle(new_reconciler(Some(cold.clone())), now).await;
    drop(r);
    let (m0, m1) = (H * 60, H * 60 + 60);
    assert_eq!(billed(&store, m0, m1), (81, 1));
    assert_eq!(
        audit::seal_pass(&store, &objects, &prefix, &cfg, &stats, now, 64)
            .await
            .unwrap(),
        2
    );

    // Retention drops the hot copy (no grace): every minute of the hour is
    // now read from the files, none from the store.
    let mut dropped = 0;
    loop {
        let n = store.drop_hot_audit_step(now, 0, 7).unwrap();
        if n == 0 {
            break;
        }
        dropped += n;
    }
    assert!(dropped > 0);
    let mut hot = 0;
    let cold_parts = store.audit_events(m0, m1, |_, _, _, _| hot += 1).unwrap();
    assert_eq!(hot, 0);
    assert_eq!(cold_parts.len(), 2);
    assert!(cold_parts.iter().all(|p| (p.m0, p.m1) == (m0, m1)));

    // A late click dirties minute 5: its recount reads the late click from
    // the store and the rest, the retried click among them, from the files.
    a.click("late-1", T + 5 * 60_000 + 10);
    a.ship(&store, now);
    // Without the files the minute cannot be recounted: it fails, named,
    // and nothing is corrected.
    let r = reconcile_until_idle(new_reconciler(None), now).await;
    drop(r);
    let failed = store.failed_minutes(m0, m1).unwrap();
    assert_eq!(failed.len(), 1, "{failed:?}");
    assert!(failed[0].1.contains("no object store"), "{failed:?}");
    // The late click is merged but the retried one still counted once.
    assert_eq!(billed(&store, m0, m1), (82, 1));
    // With them: recounted, exact.
    let mut late = Gw::new("gwa");
    late.seq = a.seq;
    late.last_partial = a.last_partial;
    late.shipped = a.shipped;
    late.click("late-2", T + 5 * 60_000 + 20);
    late.ship(&store, now);
    let r = reconcile_until_idle(new_reconciler(Some(cold.clone())), now).await;
    drop(r);
    assert_eq!(billed(&store, m0, m1), (83, 1));
    assert!(store.failed_minutes(m0, m1).unwrap().is_empty());
    let report = reconcile::offline(
        store.clone(),
        &settings,
        Some(cold.clone()),
        m0,
        m1,
        false,
        now,
    );
    let report = tokio::task::spawn_blocking(move || report)
        .await
        .unwrap()
        .unwrap();
    assert!(report.diffs.is_empty() && report.failed.is_empty());
    assert_eq!(report.events_read, 83 + 1);

    // A corrupt file and a foreign one under the prefix: reported with
    // their names, never merged.
    let dir = d.path().join("audit/raw/2026-11-24/05");
    let file_b = dir.join("gateway=gwb/part-00000.parquet");
    let good = std::fs::read(&file_b).unwrap();
    let mut bad = good.clone();
    let n = bad.len();
    bad[n / 2..n - 8].fill(0x5a);
    std::fs::write(&file_b, &bad).unwrap();
    late.click("late-3", T + 5 * 60_000 + 30);
    late.ship(&store, now);
    let r = reconcile_until_idle(new_reconciler(Some(cold.clone())), now).await;
    drop(r);
    let failed = store.failed_minutes(m0, m1).unwrap();
    assert_eq!(failed.len(), 1, "{failed:?}");
    assert!(
        failed[0].1.contains("gateway=gwb/part-00000.parquet"),
        "{failed:?}"
    );

    let foreign = {
        use arrow_array::{ArrayRef, Int64Array, RecordBatch};
        let c: ArrayRef = Arc::new(Int64Array::from(vec![1, 2, 3]));
        let batch = RecordBatch::try_from_iter([("clicks", c)]).unwrap();
        let mut out = Vec::new();
        let mut w = parquet::arrow::ArrowWriter::try_new(&mut out, batch.schema(), None).unwrap();
        w.write(&batch).unwrap();
        w.close().unwrap();
        out
    };
    std::fs::write(&file_b, &foreign).unwrap();
    // The check of the prefix names it (another size than sealed), and an
    // object nobody sealed, which is never read.
    std::fs::write(dir.join("gateway=gwb/stray.parquet"), &foreign).unwrap();
    let v = audit::verify(&store, &objects, &prefix).await.unwrap();
    assert_eq!(
        v.foreign,
        vec!["raw/2026-11-24/05/gateway=gwb/stray.parquet".to_string()]
    );
    assert_eq!(v.missing.len(), 1, "{v:?}");
    assert!(v.missing[0].starts_with("raw/2026-11-24/05/gateway=gwb/part-00000.parquet"));
    assert_eq!(v.files, 1, "gwa's file as sealed: {v:?}");
    late.click("late-4", T + 5 * 60_000 + 40);
    late.ship(&store, now);
    let r = reconcile_until_idle(new_reconciler(Some(cold.clone())), now).await;
    drop(r);
    let failed = store.failed_minutes(m0, m1).unwrap();
    assert!(
        failed[0].1.contains("not a clickgate audit file"),
        "{failed:?}"
    );
    // The right file back: the minute is recounted, exact again.
    std::fs::write(&file_b, &good).unwrap();
    late.click("late-5", T + 5 * 60_000 + 50);
    late.ship(&store, now);
    let r = reconcile_until_idle(new_reconciler(Some(cold)), now).await;
    drop(r);
    assert!(store.failed_minutes(m0, m1).unwrap().is_empty());
    assert_eq!(billed(&store, m0, m1), (86, 1));
    std::fs::remove_file(dir.join("gateway=gwb/stray.parquet")).unwrap();
    let v = audit::verify(&store, &objects, &prefix).await.unwrap();
    assert!(v.foreign.is_empty() && v.missing.is_empty(), "{v:?}");
}
