//! The ClickHouse sink: merged rows written to a ReplacingMergeTree, in bulk,
//! idempotently, and read back for queries.
//!
//! The store records every row a transaction changes, with the transaction's
//! revision (`Store::export_pending`). The sink thread writes those rows as
//! they stand, with their revision as the ReplacingMergeTree version, in one
//! INSERT, then forgets the changes it wrote (`Store::export_done`). A crash
//! or a failed answer between the two writes the same rows again with the
//! same revisions: ClickHouse keeps one of each (same key, same version, same
//! values), so a re-sent batch leaves the same rows. A later change has a
//! higher revision and replaces the earlier one; corrections after a minute
//! is final carry their own `version` column too. Readers use `FINAL`.
//!
//! The client is ClickHouse's HTTP interface with JSONEachRow, through the
//! hyper the aggregator already serves HTTP with: it is the interface every
//! server version keeps, including Debian's 18.16 the tests run against,
//! which predates what the native Rust clients speak.

use std::fmt::Write as _;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use wire::record::Counts;

use crate::config::ClickHouse;
use crate::store::{ExportRow, Query, Series, Sink, Store};

/// A SQL string literal.
fn quote(s: &str) -> String {
    let mut q = String::with_capacity(s.len() + 2);
    q.push('\'');
    for c in s.chars() {
        match c {
            '\'' => q.push_str("\\'"),
            '\\' => q.push_str("\\\\"),
            c => q.push(c),
        }
    }
    q.push('\'');
    q
}

/// A JSON string literal (serde_json does the escaping).
pub(crate) fn js(s: &str) -> String {
    serde_json::Value::String(s.to_string()).to_string()
}

pub fn schema(table: &str) -> [String; 2] {
    [
        format!(
            "CREATE TABLE IF NOT EXISTS {table} (\
             minute DateTime, advertiser_id String, campaign_id String, ad_id String, \
             device String, country String, \
             clicks UInt64, impressions UInt64, spend_micros UInt64, duplicates UInt64, invalid UInt64, \
             version UInt32, revision UInt64, instance String) \
             ENGINE = ReplacingMergeTree(revision) PARTITION BY toYYYYMM(minute) \
             ORDER BY (advertiser_id, minute, campaign_id, ad_id, device, country, instance)"
        ),
        // The aggregator's watermark, so readers of ClickHouse alone can tell
        // final minutes (end + lateness <= watermark) from provisional ones.
        format!(
            "CREATE TABLE IF NOT EXISTS {table}_watermark (instance String, watermark_ms UInt64, lateness_ms UInt64) \
             ENGINE = ReplacingMergeTree(watermark_ms) ORDER BY instance"
        ),
    ]
}

/// The rows as JSONEachRow lines. `instance` (the writing store's id,
/// `Store::store_id`) is part of the key: each store's revisions only order
/// its own rows, so instances never replace each other's; readers sum over
/// them.
pub fn rows_json(rows: &[ExportRow], instance: &str) -> String {
    let mut s = String::with_capacity(rows.len() * 220);
    for r in rows {
        write_row_json(&mut s, r, instance, "");
        s.push('\n');
    }
    s
}

/// One row as a JSON object: its dimensions, counts, correction version,
/// revision and writing instance, then `extra` (more `,"field":value`
/// pairs, or nothing). The ClickHouse and Kafka sinks write the same fields.
pub(crate) fn write_row_json(s: &mut String, r: &ExportRow, instance: &str, extra: &str) {
    let (k, c) = (&r.key, &r.row.counts);
    let _ = write!(
        s,
        "{{\"minute\":{},\"advertiser_id\":{},\"campaign_id\":{},\"ad_id\":{},\"device\":{},\"country\":{},\
         \"clicks\":{},\"impressions\":{},\"spend_micros\":{},\"duplicates\":{},\"invalid\":{},\
         \"version\":{},\"revision\":{},\"instance\":{}{extra}}}",
        k.minute as u64 * 60,
        js(&k.advertiser_id),
        js(&k.campaign_id),
        js(&k.ad_id),
        js(k.device.as_str()),
        js(country(&k.country)),
        c.clicks,
        c.impressions,
        c.spend_micros,
        c.duplicates,
        c.invalid,
        r.row.version,
        r.revision,
        js(instance)
    );
}

/// A stored country code as text (`ZZ` if it is not).
pub(crate) fn country(c: &[u8; 2]) -> &str {
    std::str::from_utf8(c).unwrap_or("ZZ")
}

pub struct Client {
    cfg: ClickHouse,
    instance: String,
    http: hyper_util::client::legacy::Client<
        hyper_util::client::legacy::connect::HttpConnector,
        http_body_util::Full<bytes::Bytes>,
    >,
    auth: Option<String>,
}

impl Client {
    /// `instance`: the writing store's id (`Store::store_id`).
    pub fn new(cfg: &ClickHouse, instance: &str) -> Client {
        use base64::Engine;
        let http =
            hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
                .build_http();
        let auth = (!cfg.user.is_empty()).then(|| {
            format!(
                "Basic {}",
                base64::engine::general_purpose::STANDARD
                    .encode(format!("{}:{}", cfg.user, cfg.password))
            )
        });
        Client {
            cfg: cfg.clone(),
            instance: instance.to_owned(),
            http,
            auth,
        }
    }

    /// Runs one statement: the query text, then (for an INSERT) its data, in
    /// the POST body, as ClickHouse's HTTP interface takes it.
    pub async fn exec(&self, query: &str, data: &str) -> anyhow::Result<String> {
        use http_body_util::BodyExt;
        let body = if data.is_empty() {
            query.to_string()
        } else {
            format!("{query}\n{data}")
        };
        let mut req = hyper::Request::post(format!(
            "{}/?database={}",
            self.cfg.url.trim_end_matches('/'),
            self.cfg.database
        ));
        if let Some(a) = &self.auth {
            req = req.header("authorization", a);
        }
        let req = req.body(http_body_util::Full::new(bytes::Bytes::from(body)))?;
        let timeout = Duration::from_millis(self.cfg.timeout_ms);
        let (status, text) = tokio::time::timeout(timeout, async {
            let resp = self.http.request(req).await?;
            let status = resp.status();
            let bytes = resp.into_body().collect().await?.to_bytes();
            anyhow::Ok((status, String::from_utf8_lossy(&bytes).into_owned()))
        })
        .await
        .map_err(|_| anyhow::anyhow!("ClickHouse did not answer within {timeout:?}"))??;
        anyhow::ensure!(
            status.is_success(),
            "ClickHouse answered {status}: {}",
            text.trim()
        );
        Ok(text)
    }

    pub async fn create_tables(&self) -> anyhow::Result<()> {
        for q in schema(&self.cfg.table) {
            self.exec(&q, "").await?;
        }
        Ok(())
    }

    pub async fn insert_rows(&self, rows: &[ExportRow]) -> anyhow::Result<()> {
        self.exec(
            &format!("INSERT INTO {} FORMAT JSONEachRow", self.cfg.table),
            &rows_json(rows, &self.instance),
        )
        .await
        .map(|_| ())
    }

    pub async fn write_watermark(&self, watermark_ms: i64, lateness_ms: i64) -> anyhow::Result<()> {
        self.exec(
            &format!(
                "INSERT INTO {}_watermark FORMAT JSONEachRow",
                self.cfg.table
            ),
            &format!(
                "{{\"instance\":{},\"watermark_ms\":{},\"lateness_ms\":{}}}\n",
                js(&self.instance),
                watermark_ms.max(0),
                lateness_ms.max(0)
            ),
        )
        .await
        .map(|_| ())
    }

    /// One advertiser's buckets, as `Store::query` answers them, read from
    /// ClickHouse's final rows (for advertisers this instance does not own),
    /// and the watermark ClickHouse holds.
    pub async fn query(&self, q: &Query) -> anyhow::Result<(Series, i64)> {
        let wm = self
            .exec(
                &format!(
                    // The slowest instance's: final only where all agree.
                    "SELECT min(watermark_ms), max(lateness_ms) FROM {}_watermark FINAL FORMAT TSV",
                    self.cfg.table
                ),
                "",
            )
            .await?;
        let mut fields = wm.split_whitespace().map(|x| x.parse::<i64>().unwrap_or(0));
        let (wm, lateness) = (fields.next().unwrap_or(0), fields.next().unwrap_or(0));
        let mut filter = format!(
            "advertiser_id = {} AND minute >= toDateTime({}) AND minute < toDateTime({})",
            quote(&q.advertiser_id),
            q.start_s,
            q.end_s
        );
        if let Some(c) = &q.campaign_id {
            let _ = write!(filter, " AND campaign_id = {}", quote(c));
        }
        if let Some(a) = &q.ad_id {
            let _ = write!(filter, " AND ad_id = {}", quote(a));
        }
        let b = q.bucket_s;
        let text = self.exec(
            &format!(
                "SELECT intDiv(toUInt32(minute), {b}) * {b} AS bucket, ad_id, sum(clicks), sum(impressions), \
                 sum(spend_micros), sum(duplicates), sum(invalid), max(version) \
                 FROM {} FINAL WHERE {filter} GROUP BY bucket, ad_id ORDER BY bucket, ad_id FORMAT TSV",
                self.cfg.table
            ),
            "",
        ).await?;
        let mut out = Series::new();
        for line in text.lines().filter(|l| !l.is_empty()) {
            let f: Vec<&str> = line.split('\t').collect();
            anyhow::ensure!(f.len() == 8, "unexpected ClickHouse row: {line}");
            let n = |i: usize| f[i].parse::<u64>().unwrap_or(0);
            let bucket: i64 = f[0].parse()?;
            // Final when the bucket's last minute is (as the store answers).
            // Reconciled corrections are in the rows; which minutes are
            // reconciled is the owning store's knowledge, not ClickHouse's.
            let state = if (bucket + b) * 1000 + lateness <= wm {
                crate::merge::PointState::Final
            } else {
                crate::merge::PointState::Provisional
            };
            out.insert(
                (bucket, unescape_tsv(f[1])),
                (
                    Counts {
                        clicks: n(2),
                        impressions: n(3),
                        spend_micros: n(4),
                        duplicates: n(5),
                        invalid: n(6),
                    },
                    state,
                    n(7) as u32,
                ),
            );
        }
        Ok((out, wm))
    }
}

/// TSV escapes ClickHouse writes in strings.
fn unescape_tsv(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut it = s.chars();
    while let Some(c) = it.next() {
        if c != '\\' {
            out.push(c);
            continue;
        }
        match it.next() {
            Some('t') => out.push('\t'),
            Some('n') => out.push('\n'),
            Some('0') => out.push('\0'),
            Some(o) => out.push(o),
            None => {}
        }
    }
    out
}

/// Writes changed rows to ClickHouse: every `flush_interval_ms`, or at once
/// while a backlog remains; once more after `stop` is set, then returns.
/// Store reads and writes are short redb transactions, run on the blocking
/// pool.
pub async fn run_sink(
    store: Arc<Store>,
    cfg: ClickHouse,
    instance: String,
    stats: Arc<crate::metrics::Metrics>,
    stop: Arc<std::sync::atomic::AtomicBool>,
) {
    let client = Client::new(&cfg, &instance);
    let mut tables_ready = false;
    let mut backoff = Duration::from_millis(100);
    loop {
        let stopping = stop.load(Ordering::Relaxed);
        let result = async {
            if !tables_ready {
                client.create_tables().await?;
                tables_ready = true;
            }
            let (st, max) = (store.clone(), cfg.batch_rows_max);
            let rows =
                tokio::task::spawn_blocking(move || st.export_pending(Sink::ClickHouse, max))
                    .await??;
            if !rows.is_empty() {
                client.insert_rows(&rows).await?;
                daemon::faults::crash_point("aggregator_exported_before_forget");
                let done = ExportRow::done(&rows);
                let st = store.clone();
                tokio::task::spawn_blocking(move || st.export_done(Sink::ClickHouse, &done))
                    .await??;
                stats.ch_inserts.fetch_add(1, Ordering::Relaxed);
                stats
                    .ch_rows_written
                    .fetch_add(rows.len() as u64, Ordering::Relaxed);
            }
            let wm = store.watermark(crate::now_ms())?;
            client
                .write_watermark(wm, store.rules().lateness_ms)
                .await?;
            stats
                .ch_backlog
                .store(store.export_backlog(Sink::ClickHouse)?, Ordering::Relaxed);
            anyhow::Ok(rows.len())
        }
        .await;
        if stopping {
            if let Err(e) = result {
                tracing::warn!(error = %format!("{e:#}"), "ClickHouse: last rows not written before stop");
            }
            return;
        }
        match result {
            Ok(n) => {
                backoff = Duration::from_millis(100);
                if n < cfg.batch_rows_max {
                    sleep_unless(&stop, Duration::from_millis(cfg.flush_interval_ms)).await;
                }
            }
            Err(e) => {
                stats.ch_errors.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(error = %format!("{e:#}"), "ClickHouse write failed; retrying");
                sleep_unless(&stop, backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(10));
            }
        }
    }
}

/// Sleeps for `d`, or until `stop` is set.
pub(crate) async fn sleep_unless(stop: &std::sync::atomic::AtomicBool, d: Duration) {
    let until = tokio::time::Instant::now() + d;
    while !stop.load(Ordering::Relaxed) && tokio::time::Instant::now() < until {
        tokio::time::sleep(Duration::from_millis(20).min(d)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rows::Row;
    use wire::record::{Device, RowKey};

    #[test]
    fn rows_become_json_lines_with_escaped_ids() {
        let k = RowKey {
            minute: 29_925_180,
            advertiser_id: "adv-\"1\"".into(),
            campaign_id: "c".into(),
            ad_id: "a\\b".into(),
            device: Device::Mobile,
            country: *b"DE",
        };
        let r = Row {
            counts: Counts {
                clicks: 3,
                impressions: 10,
                spend_micros: 750_000,
                duplicates: 1,
                invalid: 0,
            },
            version: 2,
        };
        let j = rows_json(
            &[ExportRow {
                key_bytes: vec![],
                key: k,
                row: r,
                revision: 17,
                reconciled: false,
            }],
            "agg-a",
        );
        let v: serde_json::Value = serde_json::from_str(j.trim()).unwrap();
        assert_eq!(v["minute"], 29_925_180u64 * 60);
        assert_eq!(v["advertiser_id"], "adv-\"1\"");
        assert_eq!(v["ad_id"], "a\\b");
        assert_eq!(v["device"], "mobile");
        assert_eq!(v["country"], "DE");
        assert_eq!(
            (v["clicks"].as_u64(), v["revision"].as_u64()),
            (Some(3), Some(17))
        );
        assert_eq!(v["version"], 2);
        assert_eq!(v["instance"], "agg-a");
    }

    #[test]
    fn sql_literals_and_tsv_are_escaped() {
        assert_eq!(quote("a'b\\c"), "'a\\'b\\\\c'");
        assert_eq!(unescape_tsv("a\\tb\\\\c\\'"), "a\tb\\c'");
    }
}
