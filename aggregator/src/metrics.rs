//! The aggregator's counters, rendered for Prometheus.

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

/// Histogram bounds, microseconds.
pub const LATENCY_BUCKETS_US: &[u64] = &[
    100, 250, 500, 1000, 2500, 5000, 10_000, 25_000, 100_000, 1_000_000,
];

/// Bounds for delays of seconds to minutes, microseconds.
pub const DELAY_BUCKETS_US: &[u64] = &[
    1_000_000,
    5_000_000,
    15_000_000,
    30_000_000,
    60_000_000,
    120_000_000,
    180_000_000,
    300_000_000,
    600_000_000,
    1_800_000_000,
];

/// A histogram of microsecond values, rendered in seconds.
pub struct Histogram {
    bounds: &'static [u64],
    buckets: Vec<AtomicU64>,
    sum_us: AtomicU64,
    count: AtomicU64,
}

impl Default for Histogram {
    fn default() -> Self {
        Histogram::with(LATENCY_BUCKETS_US)
    }
}

impl Histogram {
    pub fn with(bounds: &'static [u64]) -> Self {
        Histogram {
            bounds,
            buckets: (0..=bounds.len()).map(|_| AtomicU64::new(0)).collect(),
            sum_us: AtomicU64::new(0),
            count: AtomicU64::new(0),
        }
    }

    pub fn observe(&self, us: u64) {
        let i = self
            .bounds
            .iter()
            .position(|&b| us <= b)
            .unwrap_or(self.bounds.len());
        self.buckets[i].fetch_add(1, Relaxed);
        self.sum_us.fetch_add(us, Relaxed);
        self.count.fetch_add(1, Relaxed);
    }

    fn render(&self, name: &str, help: &str, s: &mut String) {
        let _ = writeln!(s, "# HELP {name} {help}\n# TYPE {name} histogram");
        let mut acc = 0;
        for (i, b) in self.bounds.iter().enumerate() {
            acc += self.buckets[i].load(Relaxed);
            let _ = writeln!(s, "{name}_bucket{{le=\"{}\"}} {acc}", *b as f64 / 1e6);
        }
        acc += self.buckets[self.bounds.len()].load(Relaxed);
        let _ = writeln!(s, "{name}_bucket{{le=\"+Inf\"}} {acc}");
        let _ = writeln!(s, "{name}_sum {}", self.sum_us.load(Relaxed) as f64 / 1e6);
        let _ = writeln!(s, "{name}_count {}", self.count.load(Relaxed));
    }
}

#[derive(Default)]
pub struct Metrics {
    /// [kind: hello, partials, events, unknown][status: applied, duplicate, gap, refused, cursors, retry]
    pub batches: [[AtomicU64; 6]; 4],
    pub rows_merged: AtomicU64,
    pub late_rows: AtomicU64,
    pub corrections: AtomicU64,
    pub events_stored: AtomicU64,
    /// Events gateways answered without a record (their log was full).
    pub unrecorded: AtomicU64,
    pub connections: AtomicU64,
    pub refused_certificates: AtomicU64,
    pub stream_errors: AtomicU64,
    pub commits: AtomicU64,
    pub commit_latency: Histogram,
    pub query_latency: Histogram,
    pub queries: AtomicU64,
    pub query_errors: AtomicU64,
    pub ch_rows_written: AtomicU64,
    pub ch_inserts: AtomicU64,
    pub ch_errors: AtomicU64,
    /// Changed rows not yet in ClickHouse (gauge).
    pub ch_backlog: AtomicU64,
    pub reconcile: std::sync::Arc<ReconcileStats>,
    pub audit: std::sync::Arc<crate::audit::SealStats>,
    pub kafka: std::sync::Arc<crate::kafka::KafkaStats>,
    pub retention: std::sync::Arc<crate::retention::RetentionStats>,
    /// Reconcile requests refused (400, 401, 403, 429).
    pub admin_errors: AtomicU64,
}

impl Metrics {
    /// `watermark_lag_ms`: now minus the global watermark.
    pub fn render(&self, watermark_lag_ms: i64, sources: usize) -> String {
        let mut s = String::new();
        let kinds = ["hello", "partials", "events", "unknown"];
        let statuses = ["applied", "duplicate", "gap", "refused", "cursors", "retry"];
        s.push_str(
            "# HELP clickgate_aggregator_batches_total Batches answered, by stream and answer.\n",
        );
        s.push_str("# TYPE clickgate_aggregator_batches_total counter\n");
        for (k, kn) in kinds.iter().enumerate() {
            for (i, st) in statuses.iter().enumerate() {
                let v = self.batches[k][i].load(Relaxed);
                if v > 0 || (k == 1 && i < 4) {
                    let _ = writeln!(
                        s,
                        "clickgate_aggregator_batches_total{{stream=\"{kn}\",status=\"{st}\"}} {v}"
                    );
                }
            }
        }
        for (name, help, v) in [
            (
                "rows_merged_total",
                "Partial rows merged into minute rows.",
                &self.rows_merged,
            ),
            (
                "late_rows_total",
                "Partial rows past the correction horizon, kept in the late table.",
                &self.late_rows,
            ),
            (
                "corrections_total",
                "Rows changed after their minute was final (new version).",
                &self.corrections,
            ),
            (
                "unrecorded_redirects_total",
                "Clicks and impressions gateways answered without a record while their log was full (log.on_full = \"redirect\"), as their partials reported them: never billed.",
                &self.unrecorded,
            ),
            (
                "events_stored_total",
                "Raw events kept in the audit store.",
                &self.events_stored,
            ),
            (
                "connections_total",
                "Shipper connections accepted.",
                &self.connections,
            ),
            (
                "refused_certificates_total",
                "Connections refused: client certificate not in the pops file.",
                &self.refused_certificates,
            ),
            (
                "stream_errors_total",
                "Streams that failed before an answer (reset, too large, timeout).",
                &self.stream_errors,
            ),
            (
                "commits_total",
                "Store transactions committed.",
                &self.commits,
            ),
            (
                "queries_total",
                "Query API requests answered.",
                &self.queries,
            ),
            (
                "query_errors_total",
                "Query API requests refused (400, 401, 403).",
                &self.query_errors,
            ),
            (
                "admin_errors_total",
                "Admin requests refused (400, 401, 403, 429).",
                &self.admin_errors,
            ),
            (
                "clickhouse_rows_written_total",
                "Rows written to ClickHouse (a row again after each change).",
                &self.ch_rows_written,
            ),
            (
                "clickhouse_inserts_total",
                "INSERT statements ClickHouse accepted.",
                &self.ch_inserts,
            ),
            (
                "clickhouse_errors_total",
                "ClickHouse statements that failed (retried with back-off).",
                &self.ch_errors,
            ),
        ] {
            metric(&mut s, name, help, "counter", v.load(Relaxed));
        }
        metric(
            &mut s,
            "watermark_lag_seconds",
            "Now minus the global event-time watermark.",
            "gauge",
            watermark_lag_ms as f64 / 1000.0,
        );
        let _ = writeln!(
            s,
            "# HELP clickgate_aggregator_sources Sources (gateway, shard) the aggregator has partials from.\n# TYPE clickgate_aggregator_sources gauge\nclickgate_aggregator_sources {sources}"
        );
        let _ = writeln!(
            s,
            "# HELP clickgate_aggregator_clickhouse_backlog_rows Changed rows not yet written to ClickHouse.\n# TYPE clickgate_aggregator_clickhouse_backlog_rows gauge\nclickgate_aggregator_clickhouse_backlog_rows {}",
            self.ch_backlog.load(Relaxed)
        );
        self.commit_latency.render(
            "clickgate_aggregator_store_commit_seconds",
            "Time to commit one store transaction.",
            &mut s,
        );
        self.query_latency.render(
            "clickgate_aggregator_query_seconds",
            "Time to answer one metrics query.",
            &mut s,
        );
        self.reconcile.render(&mut s);
        self.kafka.render(&mut s, crate::now_ms());
        let a = &self.audit;
        for (name, help, v) in [
            (
                "audit_sealed_files_total",
                "Sealed audit files (parts) uploaded.",
                a.files.load(Relaxed),
            ),
            (
                "audit_sealed_rows_total",
                "Raw events in sealed audit files.",
                a.rows.load(Relaxed),
            ),
            (
                "audit_sealed_bytes_total",
                "Bytes of sealed audit files uploaded.",
                a.bytes.load(Relaxed),
            ),
            (
                "audit_upload_errors_total",
                "Sealed-file uploads that failed (retried with back-off).",
                a.upload_errors.load(Relaxed),
            ),
        ] {
            metric(&mut s, name, help, "counter", v);
        }
        for (name, help, v) in [
            ("audit_foreign_objects", "Objects under the audit prefix that no sealed part names (last check): reported, never read.", &a.foreign_objects),
            ("audit_missing_objects", "Sealed parts whose object is absent or of another size (last check).", &a.missing_objects),
        ] {
            metric(&mut s, name, help, "gauge", v.load(Relaxed));
        }
        metric(
            &mut s,
            "audit_backlog_hour_buckets",
            "(hour, gateway) pairs with raw events not yet sealed.",
            "gauge",
            a.backlog_hours.load(Relaxed),
        );
        let r = &self.retention;
        for (name, help, v) in [
            (
                "retention_rows_dropped_total",
                "Minute rows dropped past retention.rows_ms.",
                &r.rows,
            ),
            (
                "retention_late_rows_dropped_total",
                "Late-table rows dropped past retention.late_ms.",
                &r.late_rows,
            ),
            (
                "retention_audit_entries_dropped_total",
                "Raw-event entries dropped from the store after their sealed file's grace.",
                &r.audit_entries,
            ),
            (
                "retention_sealed_files_deleted_total",
                "Sealed files deleted past retention.sealed_ms.",
                &r.files_deleted,
            ),
            (
                "retention_errors_total",
                "Retention steps that failed (retried).",
                &r.errors,
            ),
        ] {
            metric(&mut s, name, help, "counter", v.load(Relaxed));
        }
        for (name, help, v) in [
            ("rows_kept_from_seconds", "Rows of minutes before this time are dropped; queries before it go to ClickHouse or are refused.", &r.rows_kept_from_s),
            ("store_file_bytes", "The store file's size.", &r.store_bytes),
        ] {
            metric(&mut s, name, help, "gauge", v.load(Relaxed));
        }
        s
    }
}

/// What the reconciler has done, and where it stands.
pub struct ReconcileStats {
    pub minutes_reconciled: AtomicU64,
    pub minutes_failed: AtomicU64,
    /// Past the correction horizon: left as they are.
    pub minutes_skipped: AtomicU64,
    pub rows_corrected: AtomicU64,
    pub events_read: AtomicU64,
    pub errors: AtomicU64,
    /// Sources skipped as silent in the last ready snapshot (gauge).
    pub skipped_sources: AtomicU64,
    /// Reconciled minutes waiting to be recounted again (gauge).
    pub dirty: AtomicU64,
    pub lookback_entries: AtomicU64,
    /// Now minus the start of the first minute not yet reached, ms (gauge;
    /// 0 before any data).
    pub frontier_lag_ms: AtomicU64,
    /// How long one reconcile transaction held the store's writer.
    pub write_held: Histogram,
    /// Wall time to recount and commit one minute.
    pub minute_seconds: Histogram,
    /// From a minute's end to its first reconcile.
    pub delay: Histogram,
}

impl Default for ReconcileStats {
    fn default() -> Self {
        ReconcileStats {
            minutes_reconciled: AtomicU64::new(0),
            minutes_failed: AtomicU64::new(0),
            minutes_skipped: AtomicU64::new(0),
            rows_corrected: AtomicU64::new(0),
            events_read: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            skipped_sources: AtomicU64::new(0),
            dirty: AtomicU64::new(0),
            lookback_entries: AtomicU64::new(0),
            frontier_lag_ms: AtomicU64::new(0),
            write_held: Histogram::default(),
            minute_seconds: Histogram::with(&[
                1000, 10_000, 50_000, 100_000, 250_000, 500_000, 1_000_000, 2_500_000, 5_000_000,
                10_000_000,
            ]),
            delay: Histogram::with(DELAY_BUCKETS_US),
        }
    }
}

impl ReconcileStats {
    pub fn publish_view(&self, view: &crate::store::ReconView, now_ms: i64) {
        let lag = if view.frontier == 0 {
            0
        } else {
            (now_ms - view.frontier as i64 * 60_000).max(0) as u64
        };
        self.frontier_lag_ms.store(lag, Relaxed);
    }

    fn render(&self, s: &mut String) {
        for (name, help, v) in [
            (
                "reconcile_minute_buckets_total",
                "Minutes recounted from the raw events of every source.",
                &self.minutes_reconciled,
            ),
            (
                "reconcile_failed_minute_buckets_total",
                "Minutes that could not be reconciled (corrupt audit entry, lookback full); nothing of them corrected.",
                &self.minutes_failed,
            ),
            (
                "reconcile_skipped_minute_buckets_total",
                "Minutes past the correction horizon, left as they are.",
                &self.minutes_skipped,
            ),
            (
                "reconcile_corrected_rows_total",
                "Rows whose recount differed, written as a new version.",
                &self.rows_corrected,
            ),
            (
                "reconcile_events_read_total",
                "Raw events read by reconciliation.",
                &self.events_read,
            ),
            (
                "reconcile_errors_total",
                "Reconcile turns that failed on the store (retried).",
                &self.errors,
            ),
        ] {
            metric(s, name, help, "counter", v.load(Relaxed));
        }
        for (name, help, v) in [
            (
                "reconcile_skipped_sources",
                "Sources skipped as silent by the last ready snapshot.",
                self.skipped_sources.load(Relaxed) as f64,
            ),
            (
                "reconcile_dirty_minute_buckets",
                "Reconciled minutes changed since, waiting to be recounted.",
                self.dirty.load(Relaxed) as f64,
            ),
            (
                "reconcile_lookback_entries",
                "Click ids the reconcile lookback holds.",
                self.lookback_entries.load(Relaxed) as f64,
            ),
            (
                "reconcile_lag_seconds",
                "Now minus the start of the first minute reconciliation has not reached.",
                self.frontier_lag_ms.load(Relaxed) as f64 / 1000.0,
            ),
        ] {
            metric(s, name, help, "gauge", v);
        }
        self.write_held.render(
            "clickgate_aggregator_reconcile_write_held_seconds",
            "How long one reconcile transaction held the store's writer.",
            s,
        );
        self.minute_seconds.render(
            "clickgate_aggregator_reconcile_minute_seconds",
            "Wall time to recount and commit one minute.",
            s,
        );
        self.delay.render(
            "clickgate_aggregator_reconcile_delay_seconds",
            "From a minute's end to its first reconcile.",
            s,
        );
    }
}

/// One metric in the text exposition format: HELP, TYPE and its value.
pub(crate) fn metric(
    s: &mut String,
    name: &str,
    help: &str,
    kind: &str,
    v: impl std::fmt::Display,
) {
    let _ = writeln!(
        s,
        "# HELP clickgate_aggregator_{name} {help}\n# TYPE clickgate_aggregator_{name} {kind}\nclickgate_aggregator_{name} {v}"
    );
}
