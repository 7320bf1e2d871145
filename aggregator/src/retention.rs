//! Retention per tier, enforced online in bounded steps: minute rows hot in
//! the store, the late table, raw events hot until their hour is sealed and
//! uploaded plus a grace, and the sealed files themselves.
//!
//! Every step is one short write transaction (at most `step_keys_max` keys),
//! so applying batches and queries never wait long behind it. Cut-offs
//! follow the watermark, not the wall clock: a minute is dropped only once
//! data for it can no longer change its rows (the retention is longer than
//! the correction horizon, checked at start), and rows are dropped only
//! below the reconcile frontier, so a recount never resurrects them.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;

use object_store::path::Path as ObjectPath;
use object_store::{ObjectStore, ObjectStoreExt};
use serde::Deserialize;

use crate::store::{Store, StoreError};

const DAY_MS: i64 = 86_400_000;

/// `[retention]` in the aggregator's config.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct Settings {
    /// Minute rows kept in the store, ms behind the watermark. Queries
    /// reaching further are answered from ClickHouse when it is configured,
    /// refused otherwise. Default 35 days.
    pub rows_ms: i64,
    /// The late table (partials past the correction horizon), ms behind the
    /// watermark. Default 35 days.
    pub late_ms: i64,
    /// Raw events stay in the store this long after their hour's file is
    /// sealed and uploaded, ms; then reconciliation reads them from the
    /// file. Default 24 hours.
    pub audit_hot_grace_ms: i64,
    /// Sealed files, ms behind the watermark; 0 keeps them for ever (an
    /// object store's own lifecycle rules may tier them). Default 0.
    pub sealed_ms: i64,
    /// Most keys one step removes (one write transaction). Default 5000.
    pub step_keys_max: usize,
    /// Pause between rounds when nothing is due, ms. Default 10000.
    pub interval_ms: u64,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            rows_ms: 35 * DAY_MS,
            late_ms: 35 * DAY_MS,
            audit_hot_grace_ms: DAY_MS,
            sealed_ms: 0,
            step_keys_max: 5000,
            interval_ms: 10_000,
        }
    }
}

impl Settings {
    /// Refuses retentions that would drop what can still change: anything
    /// shorter than the correction horizon (itself at least the allowed
    /// lateness), and sealed files kept for less time than the rows they
    /// recount.
    pub fn validate(&self, lateness_ms: i64, horizon_ms: i64) -> Result<(), String> {
        for (name, v) in [("rows_ms", self.rows_ms), ("late_ms", self.late_ms)] {
            if v <= horizon_ms {
                return Err(format!(
                    "retention.{name} = {v} is not longer than horizon_ms = {horizon_ms} \
                     (lateness_ms = {lateness_ms}): data that late still changes what it would drop"
                ));
            }
        }
        if self.sealed_ms != 0 && self.sealed_ms < self.rows_ms {
            return Err(format!(
                "retention.sealed_ms = {} is shorter than retention.rows_ms = {}: \
                 a recount of a kept minute needs its raw events (0 keeps sealed files for ever)",
                self.sealed_ms, self.rows_ms
            ));
        }
        if self.audit_hot_grace_ms < 0 {
            return Err("retention.audit_hot_grace_ms: at least 0".into());
        }
        if self.step_keys_max == 0 || self.interval_ms == 0 {
            return Err("retention.step_keys_max, retention.interval_ms: at least 1".into());
        }
        Ok(())
    }

    /// Rows of minutes below this are dropped: `rows_ms` behind the
    /// watermark, and never at or past the reconcile frontier.
    pub fn rows_below(&self, watermark_ms: i64, frontier: Option<u32>) -> u32 {
        let by_age = minute_below(watermark_ms - self.rows_ms);
        frontier.map_or(by_age, |f| by_age.min(f))
    }

    pub fn late_below(&self, watermark_ms: i64) -> u32 {
        minute_below(watermark_ms - self.late_ms)
    }

    /// Sealed files of hours below this are deleted (`None`: kept for ever).
    pub fn sealed_before_hour(&self, watermark_ms: i64) -> Option<u32> {
        (self.sealed_ms > 0).then(|| minute_below(watermark_ms - self.sealed_ms) / 60)
    }
}

/// The minutes that end at or before `ms`.
fn minute_below(ms: i64) -> u32 {
    ms.max(0).div_euclid(60_000).min(u32::MAX as i64) as u32
}

/// What retention has done.
#[derive(Default)]
pub struct RetentionStats {
    pub rows: AtomicU64,
    pub late_rows: AtomicU64,
    pub audit_entries: AtomicU64,
    pub marks: AtomicU64,
    pub files_deleted: AtomicU64,
    pub errors: AtomicU64,
    /// Rows of minutes below this are gone (gauge).
    pub rows_kept_from_s: AtomicU64,
    /// The store file's size (gauge).
    pub store_bytes: AtomicU64,
}

/// One round: steps until nothing is due or `max_steps` ran. Answers
/// whether anything was dropped.
pub fn store_round(
    store: &Store,
    cfg: &Settings,
    reconcile: bool,
    stats: &RetentionStats,
    now_ms: i64,
    max_steps: usize,
) -> Result<bool, StoreError> {
    let view = store.reconcile_view(now_ms)?;
    let wm = view.watermark_ms;
    let rows_below = cfg.rows_below(wm, reconcile.then_some(view.frontier));
    let late_below = cfg.late_below(wm);
    let mut any = false;
    for _ in 0..max_steps {
        let mut did = 0;
        let d = store.drop_rows_step(rows_below, cfg.step_keys_max)?;
        stats.rows.fetch_add(d.rows, Relaxed);
        stats.marks.fetch_add(d.marks, Relaxed);
        did += d.rows + d.marks;
        let n = store.drop_late_step(late_below, cfg.step_keys_max)?;
        stats.late_rows.fetch_add(n, Relaxed);
        did += n;
        let n = store.drop_hot_audit_step(now_ms, cfg.audit_hot_grace_ms, cfg.step_keys_max)?;
        stats.audit_entries.fetch_add(n, Relaxed);
        did += n;
        if did == 0 {
            break;
        }
        any = true;
    }
    stats
        .rows_kept_from_s
        .store(store.rows_kept_from()? as u64 * 60, Relaxed);
    stats.store_bytes.store(store.file_bytes(), Relaxed);
    Ok(any)
}

/// Deletes sealed files past their retention, oldest first: the object,
/// then its manifest row (a crash between leaves the row, and the next
/// round deletes the absent object again, which is not an error).
pub async fn sealed_round(
    store: &Arc<Store>,
    objects: &Arc<dyn ObjectStore>,
    prefix: &ObjectPath,
    before_hour: u32,
    stats: &RetentionStats,
    max: usize,
) -> Result<u64, String> {
    let st = store.clone();
    let parts = tokio::task::spawn_blocking(move || st.parts_before(before_hour, max))
        .await
        .expect("store task")
        .map_err(|e| e.to_string())?;
    let mut n = 0;
    for (key, part) in parts {
        let location =
            ObjectPath::from(format!("{prefix}/{}", part.object).trim_start_matches('/'));
        match objects.delete(&location).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => {}
            Err(e) => return Err(format!("deleting {location}: {e}")),
        }
        let st = store.clone();
        tokio::task::spawn_blocking(move || st.forget_part(&key))
            .await
            .expect("store task")
            .map_err(|e| e.to_string())?;
        stats.files_deleted.fetch_add(1, Relaxed);
        n += 1;
    }
    Ok(n)
}

/// Runs retention until `stop`.
pub async fn run(
    store: Arc<Store>,
    cfg: Settings,
    reconcile: bool,
    objects: Option<(Arc<dyn ObjectStore>, ObjectPath)>,
    stats: Arc<RetentionStats>,
    stop: Arc<AtomicBool>,
) {
    while !stop.load(Relaxed) {
        let (st, c, s) = (store.clone(), cfg.clone(), stats.clone());
        let now = crate::now_ms();
        let round =
            tokio::task::spawn_blocking(move || store_round(&st, &c, reconcile, &s, now, 64))
                .await
                .expect("retention task");
        let mut busy = match round {
            Ok(any) => any,
            Err(e) => {
                stats.errors.fetch_add(1, Relaxed);
                tracing::warn!(error = %e, "retention step failed; will retry");
                false
            }
        };
        if let (Some((objects, prefix)), Ok(v)) = (&objects, store.reconcile_view(now)) {
            if let Some(h) = cfg.sealed_before_hour(v.watermark_ms) {
                match sealed_round(&store, objects, prefix, h, &stats, 64).await {
                    Ok(n) => busy |= n > 0,
                    Err(e) => {
                        stats.errors.fetch_add(1, Relaxed);
                        tracing::warn!(error = %e, "deleting expired sealed files failed; will retry");
                    }
                }
            }
        }
        let pause = if busy {
            Duration::from_millis(10)
        } else {
            Duration::from_millis(cfg.interval_ms)
        };
        let until = tokio::time::Instant::now() + pause;
        while tokio::time::Instant::now() < until && !stop.load(Relaxed) {
            tokio::time::sleep(Duration::from_millis(100).min(pause)).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retentions_that_would_drop_changing_data_are_refused() {
        let ok = Settings::default();
        ok.validate(120_000, DAY_MS).unwrap();
        let short = Settings {
            rows_ms: 3_600_000,
            ..Settings::default()
        };
        let e = short.validate(120_000, DAY_MS).unwrap_err();
        assert!(
            e.contains("retention.rows_ms") && e.contains("horizon_ms"),
            "{e}"
        );
        let e = Settings {
            late_ms: DAY_MS,
            ..Settings::default()
        }
        .validate(120_000, DAY_MS)
        .unwrap_err();
        assert!(e.contains("retention.late_ms"), "{e}");
        let e = Settings {
            sealed_ms: 2 * DAY_MS,
            ..Settings::default()
        }
        .validate(120_000, DAY_MS)
        .unwrap_err();
        assert!(e.contains("retention.sealed_ms"), "{e}");
    }

    #[test]
    fn cutoffs_follow_the_watermark_and_stop_at_the_frontier() {
        let c = Settings {
            rows_ms: 600_000,
            late_ms: 1_200_000,
            sealed_ms: 7_200_000,
            ..Settings::default()
        };
        let wm = 100 * 60_000 + 30_000;
        assert_eq!(c.rows_below(wm, None), 90);
        assert_eq!(c.rows_below(wm, Some(85)), 85);
        assert_eq!(c.late_below(wm), 80);
        assert_eq!(c.sealed_before_hour(wm), Some(0));
        assert_eq!(c.sealed_before_hour(5 * 3_600_000), Some(3));
        assert_eq!(Settings::default().sealed_before_hour(wm), None);
        // Before the watermark has come far enough: nothing.
        assert_eq!(c.rows_below(60_000, None), 0);
    }
}
