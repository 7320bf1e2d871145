//! The aggregator's counters, rendered for Prometheus.

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

/// Histogram bounds, microseconds.
pub const LATENCY_BUCKETS_US: &[u64] = &[
    100, 250, 500, 1000, 2500, 5000, 10_000, 25_000, 100_000, 1_000_000,
];

#[derive(Default)]
pub struct Histogram {
    buckets: [AtomicU64; 11],
    sum_us: AtomicU64,
    count: AtomicU64,
}

const _: () = assert!(LATENCY_BUCKETS_US.len() + 1 == 11);

impl Histogram {
    pub fn observe(&self, us: u64) {
        let i = LATENCY_BUCKETS_US
            .iter()
            .position(|&b| us <= b)
            .unwrap_or(LATENCY_BUCKETS_US.len());
        self.buckets[i].fetch_add(1, Relaxed);
        self.sum_us.fetch_add(us, Relaxed);
        self.count.fetch_add(1, Relaxed);
    }

    fn render(&self, name: &str, s: &mut String) {
        let _ = writeln!(s, "# TYPE {name} histogram");
        let mut acc = 0;
        for (i, b) in LATENCY_BUCKETS_US.iter().enumerate() {
            acc += self.buckets[i].load(Relaxed);
            let _ = writeln!(s, "{name}_bucket{{le=\"{}\"}} {acc}", *b as f64 / 1e6);
        }
        acc += self.buckets[LATENCY_BUCKETS_US.len()].load(Relaxed);
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
            let _ = writeln!(s, "# HELP clickgate_aggregator_{name} {help}\n# TYPE clickgate_aggregator_{name} counter\nclickgate_aggregator_{name} {}", v.load(Relaxed));
        }
        let _ = writeln!(s, "# HELP clickgate_aggregator_watermark_lag_seconds Now minus the global event-time watermark.\n# TYPE clickgate_aggregator_watermark_lag_seconds gauge\nclickgate_aggregator_watermark_lag_seconds {}", watermark_lag_ms as f64 / 1000.0);
        let _ = writeln!(
            s,
            "# TYPE clickgate_aggregator_sources gauge\nclickgate_aggregator_sources {sources}"
        );
        let _ = writeln!(
            s,
            "# HELP clickgate_aggregator_clickhouse_backlog_rows Changed rows not yet written to ClickHouse.\n# TYPE clickgate_aggregator_clickhouse_backlog_rows gauge\nclickgate_aggregator_clickhouse_backlog_rows {}",
            self.ch_backlog.load(Relaxed)
        );
        self.commit_latency
            .render("clickgate_aggregator_store_commit_seconds", &mut s);
        self.query_latency
            .render("clickgate_aggregator_query_seconds", &mut s);
        s
    }
}
