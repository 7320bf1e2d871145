//! Counters and their Prometheus text rendering.
//!
//! Each shard keeps a plain [`Counters`] on its own thread and copies it into
//! its slot of the shared [`Registry`] once per tick (and just before it
//! renders `/metrics`), so the request path never touches shared memory.

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use wire::record::{EventKind, Verdict};

use crate::app::Endpoint;
use crate::token::Reject;

pub const STATUSES: &[u16] = &[
    200, 204, 302, 400, 403, 404, 405, 408, 413, 425, 429, 431, 503, 505,
];

/// Why a request or an event was refused or lost outside signature
/// verification (those are [`Reject`]s). Each is its own `reason` label of
/// `clickgate_drops_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DropReason {
    RateLimited,
    DiskFull,
    LogError,
    TooManyItems,
    UnknownPath,
    BadMethod,
    Malformed,
    HeaderTooLarge,
    TooManyHeaders,
    BodyTooLarge,
    DuplicateContentLength,
    ContentLengthWithTransferEncoding,
    UnsupportedTransferEncoding,
    BadContentLength,
    BadChunk,
    UnsupportedVersion,
    HeaderTimeout,
    PartialDeferred,
    DurablePublishFailed,
    ProxyHeaderInvalid,
    TlsError,
    /// A batch sent in TLS early data (0-RTT), which could be a replay.
    TooEarly,
}

impl DropReason {
    pub const ALL: [DropReason; 22] = [
        Self::RateLimited,
        Self::DiskFull,
        Self::LogError,
        Self::TooManyItems,
        Self::UnknownPath,
        Self::BadMethod,
        Self::Malformed,
        Self::HeaderTooLarge,
        Self::TooManyHeaders,
        Self::BodyTooLarge,
        Self::DuplicateContentLength,
        Self::ContentLengthWithTransferEncoding,
        Self::UnsupportedTransferEncoding,
        Self::BadContentLength,
        Self::BadChunk,
        Self::UnsupportedVersion,
        Self::HeaderTimeout,
        Self::PartialDeferred,
        Self::DurablePublishFailed,
        Self::ProxyHeaderInvalid,
        Self::TlsError,
        Self::TooEarly,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::RateLimited => "rate_limited",
            Self::DiskFull => "disk_full",
            Self::LogError => "log_error",
            Self::TooManyItems => "too_many_items",
            Self::UnknownPath => "unknown_path",
            Self::BadMethod => "bad_method",
            Self::Malformed => "malformed",
            Self::HeaderTooLarge => "header_too_large",
            Self::TooManyHeaders => "too_many_headers",
            Self::BodyTooLarge => "body_too_large",
            Self::DuplicateContentLength => "duplicate_content_length",
            Self::ContentLengthWithTransferEncoding => "content_length_with_transfer_encoding",
            Self::UnsupportedTransferEncoding => "unsupported_transfer_encoding",
            Self::BadContentLength => "bad_content_length",
            Self::BadChunk => "bad_chunk",
            Self::UnsupportedVersion => "unsupported_version",
            Self::HeaderTimeout => "header_timeout",
            Self::PartialDeferred => "partial_deferred",
            Self::DurablePublishFailed => "durable_publish_failed",
            Self::ProxyHeaderInvalid => "proxy_header_invalid",
            Self::TlsError => "tls_error",
            Self::TooEarly => "too_early",
        }
    }
}

const _: () = {
    let mut i = 0;
    while i < DropReason::ALL.len() {
        assert!(DropReason::ALL[i] as usize == i);
        i += 1;
    }
};

/// Flush (fdatasync) latency histogram bucket bounds, microseconds.
pub const FLUSH_BUCKETS_US: &[u64] =
    &[50, 100, 200, 500, 1000, 2000, 5000, 10_000, 50_000, 250_000];

#[derive(Debug, Clone, Default)]
pub struct Counters {
    pub requests: [[u64; STATUSES.len()]; Endpoint::ALL.len()],
    pub rejects: [u64; Reject::REASONS.len()],
    pub drops: [u64; DropReason::ALL.len()],
    /// `[kind][verdict]`
    pub events: [[u64; 3]; 2],
    pub bytes_appended: u64,
    pub records_appended: u64,
    pub partials_appended: u64,
    pub flush_buckets: [u64; 11],
    pub flush_sum_us: u64,
    pub flush_count: u64,
    pub flush_errors: u64,
    pub connections_open: u64,
    pub connections_accepted: u64,
    pub connections_refused: u64,
    pub connections_idle_closed: u64,
    pub slow_reads: u64,
    pub tls_handshakes: u64,
    pub tls_resumed: u64,
    pub dedup_evictions: u64,
    pub dedup_untracked: u64,
    pub velocity_untracked: u64,
    pub rate_untracked: u64,
    pub preagg_rows: u64,
    pub log_segments: u64,
    pub log_disk_bytes: u64,
    pub log_last_seq: u64,
    pub log_durable_seq: u64,
    pub segments_recycled: u64,
    /// Clicks and impressions answered without a record (`log.on_full`).
    pub unrecorded_redirects: u64,
    /// Per shard: unshipped bytes on disk and the budget.
    pub log_unshipped_bytes: u64,
    pub log_budget_bytes: u64,
    /// Per shard: unshipped over the budget, thousandths.
    pub log_buffer_share_permille: u64,
    /// Per shard: seconds until the budget is full if nothing ships from
    /// now on (`u64::MAX`: nothing is being appended).
    pub log_buffer_left_s: u64,
    pub log_oldest_unshipped_age_ms: u64,
    /// Per shard: 1 while stepped aside.
    pub log_stepped_aside: u64,
    /// Sealed segments compressed (set by the shell from its log).
    pub log_compressed_segments: u64,
    pub log_compressions: u64,
    pub log_compression_failures: u64,
    pub log_compress_bytes_in: u64,
    pub log_compress_bytes_out: u64,
    pub log_compress_cpu_ns: u64,
}

const _: () = assert!(FLUSH_BUCKETS_US.len() + 1 == 11);

impl Counters {
    pub fn request(&mut self, endpoint: Endpoint, status: u16) {
        let s = STATUSES
            .iter()
            .position(|&x| x == status)
            .expect("every status the gateway answers is listed");
        self.requests[endpoint as usize][s] += 1;
    }

    pub fn reject(&mut self, r: Reject) {
        self.rejects[r.index()] += 1;
    }

    pub fn drop(&mut self, reason: DropReason) {
        self.drops[reason as usize] += 1;
    }

    pub fn event(&mut self, kind: EventKind, verdict: Verdict) {
        self.events[kind as usize - 1][verdict as usize] += 1;
    }

    pub fn flush(&mut self, us: u64) {
        let b = FLUSH_BUCKETS_US
            .iter()
            .position(|&x| us <= x)
            .unwrap_or(FLUSH_BUCKETS_US.len());
        self.flush_buckets[b] += 1;
        self.flush_sum_us += us;
        self.flush_count += 1;
    }

    fn add(&mut self, o: &Counters) {
        for (a, b) in self
            .requests
            .iter_mut()
            .flatten()
            .zip(o.requests.iter().flatten())
        {
            *a += b;
        }
        for (a, b) in self
            .events
            .iter_mut()
            .flatten()
            .zip(o.events.iter().flatten())
        {
            *a += b;
        }
        let pairs = [
            (&mut self.rejects[..], &o.rejects[..]),
            (&mut self.drops[..], &o.drops[..]),
            (&mut self.flush_buckets[..], &o.flush_buckets[..]),
        ];
        for (a, b) in pairs {
            a.iter_mut().zip(b).for_each(|(x, y)| *x += y);
        }
        self.bytes_appended += o.bytes_appended;
        self.records_appended += o.records_appended;
        self.partials_appended += o.partials_appended;
        self.flush_sum_us += o.flush_sum_us;
        self.flush_count += o.flush_count;
        self.flush_errors += o.flush_errors;
        self.connections_open += o.connections_open;
        self.connections_accepted += o.connections_accepted;
        self.connections_refused += o.connections_refused;
        self.connections_idle_closed += o.connections_idle_closed;
        self.slow_reads += o.slow_reads;
        self.tls_handshakes += o.tls_handshakes;
        self.tls_resumed += o.tls_resumed;
        self.dedup_evictions += o.dedup_evictions;
        self.dedup_untracked += o.dedup_untracked;
        self.velocity_untracked += o.velocity_untracked;
        self.rate_untracked += o.rate_untracked;
        self.preagg_rows += o.preagg_rows;
        self.log_segments += o.log_segments;
        self.log_disk_bytes += o.log_disk_bytes;
        self.segments_recycled += o.segments_recycled;
        self.unrecorded_redirects += o.unrecorded_redirects;
        self.log_unshipped_bytes += o.log_unshipped_bytes;
        self.log_budget_bytes += o.log_budget_bytes;
        self.log_compressed_segments += o.log_compressed_segments;
        self.log_compressions += o.log_compressions;
        self.log_compression_failures += o.log_compression_failures;
        self.log_compress_bytes_in += o.log_compress_bytes_in;
        self.log_compress_bytes_out += o.log_compress_bytes_out;
        self.log_compress_cpu_ns += o.log_compress_cpu_ns;
    }
}

/// What every shard publishes, plus process-wide gauges.
pub struct Registry {
    shards: Vec<Mutex<Counters>>,
    pub dedup_entries: AtomicU64,
    pub dedup_capacity: AtomicU64,
    pub keys_loaded: AtomicU64,
    /// Shards that stopped acknowledging after a failed durable write.
    pub shards_failed: AtomicU64,
    pub key_reloads_ok: AtomicU64,
    pub key_reloads_failed: AtomicU64,
    pub h3_connections: AtomicU64,
    pub h3_refused: AtomicU64,
    /// HTTP/3 requests read in 0-RTT early data (before the handshake).
    pub h3_early_requests: AtomicU64,
    /// Connections or streams closed with an error, by code
    /// ([`crate::h3::code::COUNTED`]).
    pub h3_errors: [AtomicU64; crate::h3::code::COUNTED.len()],
    /// HTTP/3 connections open, over the shards.
    pub h3_open: AtomicU64,
    /// Datagrams handed to the shard owning their connection, and dropped
    /// because its queue was full.
    pub h3_strays_forwarded: AtomicU64,
    pub h3_strays_dropped: AtomicU64,
}

impl Registry {
    pub fn new(shards: usize) -> Self {
        Self {
            shards: (0..shards)
                .map(|_| Mutex::new(Counters::default()))
                .collect(),
            dedup_entries: AtomicU64::new(0),
            dedup_capacity: AtomicU64::new(0),
            keys_loaded: AtomicU64::new(0),
            shards_failed: AtomicU64::new(0),
            key_reloads_ok: AtomicU64::new(0),
            key_reloads_failed: AtomicU64::new(0),
            h3_connections: AtomicU64::new(0),
            h3_refused: AtomicU64::new(0),
            h3_early_requests: AtomicU64::new(0),
            h3_errors: std::array::from_fn(|_| AtomicU64::new(0)),
            h3_open: AtomicU64::new(0),
            h3_strays_forwarded: AtomicU64::new(0),
            h3_strays_dropped: AtomicU64::new(0),
        }
    }

    /// Counts a connection or stream closed with HTTP/3 error `code`.
    pub fn h3_error(&self, code: u64) {
        self.h3_errors[crate::h3::code::counted_index(code)].fetch_add(1, Ordering::Relaxed);
    }

    pub fn publish(&self, shard: usize, c: &Counters) {
        self.shards[shard].lock().unwrap().clone_from(c);
    }

    /// Sum over shards (for tests and `inspect`-like tools).
    pub fn total(&self) -> Counters {
        let mut t = Counters::default();
        for s in &self.shards {
            t.add(&s.lock().unwrap());
        }
        t
    }

    /// Prometheus text exposition format 0.0.4.
    pub fn render(&self, out: &mut Vec<u8>) {
        let per: Vec<Counters> = self
            .shards
            .iter()
            .map(|s| s.lock().unwrap().clone())
            .collect();
        let mut t = Counters::default();
        per.iter().for_each(|c| t.add(c));
        let mut s = String::with_capacity(8192);
        let head = |s: &mut String, name: &str, ty: &str, help: &str| {
            let _ = writeln!(
                s,
                "# HELP clickgate_{name} {help}\n# TYPE clickgate_{name} {ty}"
            );
        };
        head(
            &mut s,
            "requests_total",
            "counter",
            "HTTP requests answered, by endpoint and status.",
        );
        for (e, row) in t.requests.iter().enumerate() {
            for (i, n) in row.iter().enumerate().filter(|(_, n)| **n > 0) {
                let _ = writeln!(
                    s,
                    "clickgate_requests_total{{endpoint=\"{}\",status=\"{}\"}} {n}",
                    Endpoint::ALL[e].name(),
                    STATUSES[i]
                );
            }
        }
        head(
            &mut s,
            "rejects_total",
            "counter",
            "Signed events refused, by reason.",
        );
        for (i, r) in Reject::REASONS.iter().enumerate() {
            let _ = writeln!(
                s,
                "clickgate_rejects_total{{reason=\"{r}\"}} {}",
                t.rejects[i]
            );
        }
        head(
            &mut s,
            "drops_total",
            "counter",
            "Requests refused before or outside verification, by reason.",
        );
        for r in DropReason::ALL {
            let _ = writeln!(
                s,
                "clickgate_drops_total{{reason=\"{}\"}} {}",
                r.as_str(),
                t.drops[r as usize]
            );
        }
        head(
            &mut s,
            "events_total",
            "counter",
            "Events written to the log, by kind and verdict.",
        );
        for k in EventKind::ALL {
            for v in Verdict::ALL {
                let n = t.events[*k as usize - 1][*v as usize];
                let _ = writeln!(
                    s,
                    "clickgate_events_total{{kind=\"{}\",verdict=\"{}\"}} {n}",
                    k.as_str(),
                    v.as_str()
                );
            }
        }
        let counters: &[(&str, &str, u64)] = &[
            (
                "log_appended_bytes_total",
                "Bytes appended to segment files.",
                t.bytes_appended,
            ),
            (
                "log_appended_records_total",
                "Records appended to segment files.",
                t.records_appended,
            ),
            (
                "partials_appended_total",
                "Partial-aggregate records appended.",
                t.partials_appended,
            ),
            (
                "flush_errors_total",
                "fdatasync failures (the shard stops acknowledging).",
                t.flush_errors,
            ),
            (
                "connections_accepted_total",
                "Connections accepted.",
                t.connections_accepted,
            ),
            (
                "connections_refused_total",
                "Connections closed at once: over limits.connections_max.",
                t.connections_refused,
            ),
            (
                "connections_idle_closed_total",
                "Connections closed by the idle timeout.",
                t.connections_idle_closed,
            ),
            (
                "slow_reads_total",
                "Reads of trickling connections done by the once-a-second sweep (limits.slow_read_after_ms).",
                t.slow_reads,
            ),
            (
                "tls_handshakes_total",
                "TLS handshakes completed on the HTTPS listener.",
                t.tls_handshakes,
            ),
            (
                "tls_resumed_total",
                "Of those, resumed sessions (ticket or session id).",
                t.tls_resumed,
            ),
            (
                "dedup_evictions_total",
                "Live dedup entries evicted because a probe window was full.",
                t.dedup_evictions,
            ),
            (
                "velocity_untracked_total",
                "Clicks not velocity-checked: the table was full.",
                t.velocity_untracked,
            ),
            (
                "rate_untracked_total",
                "Requests not rate-limited: the table was full.",
                t.rate_untracked,
            ),
            (
                "segments_recycled_total",
                "Shipped segments deleted.",
                t.segments_recycled,
            ),
            (
                "unrecorded_redirects_total",
                "Clicks (302) and impressions (204) answered without a record because the log was full (log.on_full = \"redirect\"); never billed.",
                t.unrecorded_redirects,
            ),
            (
                "log_compressions_total",
                "Sealed segments compressed.",
                t.log_compressions,
            ),
            (
                "log_compression_failures_total",
                "Compressions of a sealed segment that failed (it stays as it was).",
                t.log_compression_failures,
            ),
            (
                "log_compress_input_bytes_total",
                "Bytes of sealed segment files compressed.",
                t.log_compress_bytes_in,
            ),
            (
                "log_compress_output_bytes_total",
                "Bytes of the compressed files written for them.",
                t.log_compress_bytes_out,
            ),
        ];
        let h3 = [
            (
                "h3_connections_total",
                "HTTP/3 connections offered (QUIC Initial accepted for handshake).",
                self.h3_connections.load(Ordering::Relaxed),
            ),
            (
                "h3_refused_total",
                "HTTP/3 connections refused (CONNECTION_REFUSED): over limits.h3_connections_max, or draining.",
                self.h3_refused.load(Ordering::Relaxed),
            ),
            (
                "h3_stray_datagrams_total",
                "Datagrams that reached another shard's socket (the client's address changed) and were handed to their connection's shard.",
                self.h3_strays_forwarded.load(Ordering::Relaxed),
            ),
            (
                "h3_stray_datagrams_dropped_total",
                "Stray datagrams dropped: their shard's queue (limits.h3_stray_queue_max) was full.",
                self.h3_strays_dropped.load(Ordering::Relaxed),
            ),
            (
                "h3_early_data_requests_total",
                "HTTP/3 requests read in 0-RTT early data, before the handshake completed (passed on with Early-Data: 1).",
                self.h3_early_requests.load(Ordering::Relaxed),
            ),
        ];
        for (name, help, v) in counters.iter().copied().chain(h3) {
            head(&mut s, name, "counter", help);
            let _ = writeln!(s, "clickgate_{name} {v}");
        }
        head(
            &mut s,
            "h3_errors_total",
            "counter",
            "HTTP/3 connections and streams closed with an error, by code (QUIC_TRANSPORT: a QUIC transport error, either side's).",
        );
        for (i, (_, name)) in crate::h3::code::COUNTED.iter().enumerate() {
            let v = self.h3_errors[i].load(Ordering::Relaxed);
            let _ = writeln!(s, "clickgate_h3_errors_total{{code=\"{name}\"}} {v}");
        }
        head(
            &mut s,
            "h3_connections_open",
            "gauge",
            "HTTP/3 connections open, over the shards.",
        );
        let _ = writeln!(
            s,
            "clickgate_h3_connections_open {}",
            self.h3_open.load(Ordering::Relaxed)
        );
        let gauges: &[(&str, &str, u64)] = &[
            (
                "connections_open",
                "Open client connections.",
                t.connections_open,
            ),
            (
                "preagg_rows",
                "Rows summed since the last partial.",
                t.preagg_rows,
            ),
            ("log_segments", "Segment files on disk.", t.log_segments),
            (
                "log_disk_bytes",
                "Bytes of segment files on disk.",
                t.log_disk_bytes,
            ),
            (
                "log_compressed_segments",
                "Sealed segments on disk that are compressed.",
                t.log_compressed_segments,
            ),
            (
                "dedup_entries",
                "Live click ids in the dedup table (sampled).",
                self.dedup_entries.load(Ordering::Relaxed),
            ),
            (
                "dedup_capacity_entries",
                "Slots in the dedup table.",
                self.dedup_capacity.load(Ordering::Relaxed),
            ),
            (
                "keys_loaded",
                "Keys in the keyring, retired ones in grace included.",
                self.keys_loaded.load(Ordering::Relaxed),
            ),
            (
                "shards_failed",
                "Shards that stopped acknowledging after a failed durable write (the host answers /readyz 503 until restarted).",
                self.shards_failed.load(Ordering::Relaxed),
            ),
        ];
        for (name, help, v) in gauges {
            head(&mut s, name, "gauge", help);
            let _ = writeln!(s, "clickgate_{name} {v}");
        }
        head(
            &mut s,
            "key_reloads_total",
            "counter",
            "Keys file reloads, by result.",
        );
        let _ = writeln!(
            s,
            "clickgate_key_reloads_total{{result=\"ok\"}} {}\nclickgate_key_reloads_total{{result=\"error\"}} {}",
            self.key_reloads_ok.load(Ordering::Relaxed),
            self.key_reloads_failed.load(Ordering::Relaxed)
        );
        head(
            &mut s,
            "log_seq",
            "gauge",
            "Last appended and last durable seq, per shard.",
        );
        for (i, c) in per.iter().enumerate() {
            let _ = writeln!(
                s,
                "clickgate_log_seq{{shard=\"{i}\",state=\"appended\"}} {}\nclickgate_log_seq{{shard=\"{i}\",state=\"durable\"}} {}",
                c.log_last_seq, c.log_durable_seq
            );
        }
        head(
            &mut s,
            "log_compress_cpu_seconds_total",
            "counter",
            "CPU time the compressor threads spent compressing and checking sealed segments.",
        );
        let _ = writeln!(
            s,
            "clickgate_log_compress_cpu_seconds_total {}",
            t.log_compress_cpu_ns as f64 / 1e9
        );
        type PerShard = (&'static str, &'static str, fn(&Counters) -> String);
        let per_shard: [PerShard; 6] = [
            (
                "log_unshipped_bytes",
                "Bytes on disk not yet freed by shipping: segments with a record not at the aggregator, the active segment, a prepared spare.",
                |c| c.log_unshipped_bytes.to_string(),
            ),
            (
                "log_budget_bytes",
                "The shard's disk budget (log.disk_budget_bytes).",
                |c| c.log_budget_bytes.to_string(),
            ),
            (
                "log_budget_used_ratio",
                "Unshipped bytes over the budget; /readyz steps aside past log.unready_at_budget_share.",
                |c| format!("{}", c.log_buffer_share_permille as f64 / 1000.0),
            ),
            (
                "log_buffer_left_seconds",
                "Seconds until the budget is full at the current append rate if nothing ships from now on (+Inf while nothing is appended).",
                |c| {
                    if c.log_buffer_left_s == u64::MAX {
                        "+Inf".into()
                    } else {
                        c.log_buffer_left_s.to_string()
                    }
                },
            ),
            (
                "log_oldest_unshipped_age_seconds",
                "Age of the oldest record not yet at the aggregator (an upper bound, within a flush interval; 0 when all is shipped).",
                |c| format!("{}", c.log_oldest_unshipped_age_ms as f64 / 1000.0),
            ),
            (
                "log_stepped_aside",
                "1 while the shard holds unshipped data past the mark and /readyz answers 503.",
                |c| c.log_stepped_aside.to_string(),
            ),
        ];
        for (name, help, value) in per_shard {
            head(&mut s, name, "gauge", help);
            for (i, c) in per.iter().enumerate() {
                let _ = writeln!(s, "clickgate_{name}{{shard=\"{i}\"}} {}", value(c));
            }
        }
        head(
            &mut s,
            "flush_duration_seconds",
            "histogram",
            "Group-commit fdatasync latency.",
        );
        let mut cum = 0;
        for (i, n) in t.flush_buckets.iter().enumerate() {
            cum += n;
            let le = FLUSH_BUCKETS_US
                .get(i)
                .map_or("+Inf".to_string(), |us| format!("{}", *us as f64 / 1e6));
            let _ = writeln!(
                s,
                "clickgate_flush_duration_seconds_bucket{{le=\"{le}\"}} {cum}"
            );
        }
        let _ = writeln!(
            s,
            "clickgate_flush_duration_seconds_sum {}\nclickgate_flush_duration_seconds_count {}",
            t.flush_sum_us as f64 / 1e6,
            t.flush_count
        );
        out.extend_from_slice(s.as_bytes());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn render_sums_shards_and_is_prometheus_text() {
        let r = Registry::new(2);
        let mut a = Counters::default();
        a.request(Endpoint::Clicks, 302);
        a.reject(Reject::BadSignature);
        a.drop(DropReason::RateLimited);
        a.flush(120);
        a.event(EventKind::Click, Verdict::Duplicate);
        let mut b = a.clone();
        b.request(Endpoint::Clicks, 302);
        r.publish(0, &a);
        r.publish(1, &b);
        let mut out = Vec::new();
        r.render(&mut out);
        let s = String::from_utf8(out).unwrap();
        assert!(
            s.contains("clickgate_requests_total{endpoint=\"clicks\",status=\"302\"} 3"),
            "{s}"
        );
        assert!(s.contains("clickgate_rejects_total{reason=\"bad_signature\"} 2"));
        assert!(s.contains("clickgate_drops_total{reason=\"rate_limited\"} 2"));
        assert!(s.contains("clickgate_events_total{kind=\"click\",verdict=\"duplicate\"} 2"));
        assert!(s.contains("clickgate_flush_duration_seconds_bucket{le=\"0.0002\"} 2"));
        assert!(s.contains("clickgate_flush_duration_seconds_bucket{le=\"+Inf\"} 2"));
        for line in s.lines().filter(|l| !l.starts_with('#')) {
            let (name, value) = line.rsplit_once(' ').unwrap();
            assert!(name.starts_with("clickgate_"), "{line}");
            assert!(value == "+Inf" || value.parse::<f64>().is_ok(), "{line}");
        }
        assert!(s.contains("clickgate_log_buffer_left_seconds{shard=\"1\"} 0"));
    }
}
