//! The aggregator's store, measured where an operator sizes it:
//!
//! - apply rate: partial rows merged per second on one core, durability on
//!   (every commit fsynced), one batch per transaction and grouped;
//! - query latency: one advertiser, 100 ads, one hour at 1-minute
//!   granularity, with a day of that advertiser's data (and 49 others') loaded.
//!
//! `cargo bench -p clickgate-aggregator --bench store [apply|query]` (about
//! a minute; pin it with `taskset -c 1`). Prints `name value unit` lines.

use std::time::Instant;

use aggregator::store::{Query, Settings, Store};
use wire::batch::{push_item, Batch, BatchKind, Status};
use wire::record::{Counts, Device, PartialRecord, RowKey};
use wire::segment::RecordType;

const T0_MIN: u32 = 29_924_940; // 2026-11-24T05:00Z in minutes

/// A small xorshift: reproducible dimensions without a dependency.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    /// Roughly Zipf: small indices far more often.
    fn skewed(&mut self, n: u64) -> u64 {
        let u = (self.next() % 1_000_000) as f64 / 1_000_000.0;
        ((n as f64).powf(u) - 1.0) as u64 % n
    }
}

fn row(adv: u64, camp: u64, ad: u64, minute: u32, dev: u64) -> RowKey {
    RowKey {
        minute,
        advertiser_id: format!("adv-{adv}"),
        campaign_id: format!("camp-{adv}-{camp}"),
        ad_id: format!("ad-{adv}-{camp}-{ad}"),
        device: Device::ALL[(dev % 5) as usize],
        country: *b"DE",
    }
}

fn encode_partial(p: &PartialRecord, seq: u64, raw: &mut Vec<u8>) {
    let mut enc = Vec::new();
    p.encode(&mut enc);
    push_item(raw, seq, RecordType::Partial as u8, &enc);
}

/// `n` partials batches of one shard, each `per` partials of `rows` rows
/// spread over 1000 advertisers.
fn batches(n: usize, per: usize, rows: usize, rng: &mut Rng) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    let mut seq = 0u64;
    for b in 0..n {
        let after = seq;
        let mut raw = Vec::new();
        for _ in 0..per {
            let from = seq;
            seq += 100; // 99 events and the partial itself
            let p = PartialRecord {
                from_seq: from,
                to_seq: seq - 1,
                watermark_ms: T0_MIN as i64 * 60_000,
                rows: (0..rows)
                    .map(|_| {
                        let k = row(
                            rng.skewed(1000),
                            rng.next() % 10,
                            rng.skewed(10),
                            T0_MIN + (b / 50) as u32,
                            rng.next(),
                        );
                        let c = Counts {
                            clicks: 1 + rng.next() % 5,
                            spend_micros: 250_000,
                            ..Counts::default()
                        };
                        (k, c)
                    })
                    .collect(),
            };
            encode_partial(&p, seq, &mut raw);
        }
        let b = Batch::seal(
            BatchKind::Partials,
            "gw",
            0,
            after,
            seq,
            per as u32,
            &raw,
            3,
        );
        out.push(b.unwrap().encode());
    }
    out
}

fn apply_all(store: &Store, frames: &[&[u8]], now: i64) {
    let allowed = vec!["gw".to_string()];
    let input: Vec<(&[u8], &[String])> = frames.iter().map(|b| (*b, allowed.as_slice())).collect();
    for (ack, _) in store.apply_many(&input, now) {
        assert_eq!(ack.status, Status::Applied, "{}", ack.reason);
    }
}

fn apply_rate(group: usize) {
    let d = tempfile::tempdir().unwrap();
    let store = Store::open(&d.path().join("s.redb"), Settings::default()).unwrap();
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let (n, per, rows) = (400, 4, 250);
    let bs = batches(n, per, rows, &mut rng);
    let now = T0_MIN as i64 * 60_000;
    let t = Instant::now();
    for chunk in bs.chunks(group) {
        let frames: Vec<&[u8]> = chunk.iter().map(|b| b.as_slice()).collect();
        apply_all(&store, &frames, now);
    }
    let s = t.elapsed().as_secs_f64();
    let total = (n * per * rows) as f64;
    println!("apply_rows_per_s group={group} {:.0} rows/s", total / s);
    println!(
        "apply_commits_per_s group={group} {:.0} commits/s",
        (n / group) as f64 / s
    );
}

fn query_latency() {
    let d = tempfile::tempdir().unwrap();
    let store = Store::open(&d.path().join("q.redb"), Settings::default()).unwrap();
    let now = (T0_MIN as i64 + 1440) * 60_000;
    // A day of one advertiser: 100 ads (10 campaigns x 10), every minute,
    // 2 devices; and 49 other advertisers with 4 ads each alongside.
    let (mut seq, mut after, mut count) = (0u64, 0u64, 0u32);
    let mut raw = Vec::new();
    for minute in 0..1440u32 {
        let from = seq;
        seq += 1;
        let mut rows = Vec::new();
        for adv in 0..50u64 {
            let ads = if adv == 0 { 100 } else { 4 };
            for a in 0..ads {
                for dev in 0..2 {
                    let c = Counts {
                        clicks: 3,
                        impressions: 40,
                        spend_micros: 750_000,
                        ..Counts::default()
                    };
                    rows.push((row(adv, a / 10, a % 10, T0_MIN + minute, dev), c));
                }
            }
        }
        let p = PartialRecord {
            from_seq: from,
            to_seq: seq - 1,
            watermark_ms: 0,
            rows,
        };
        encode_partial(&p, seq, &mut raw);
        count += 1;
        if count == 20 || minute == 1439 {
            let b = Batch::seal(BatchKind::Partials, "gw", 0, after, seq, count, &raw, 1);
            apply_all(&store, &[&b.unwrap().encode()], now);
            raw.clear();
            count = 0;
            after = seq;
        }
    }
    let mut h = hdrhistogram::Histogram::<u64>::new(3).unwrap();
    for i in 0..2000u32 {
        let start_min = T0_MIN + (i * 37) % (1440 - 60);
        let q = Query {
            advertiser_id: "adv-0".into(),
            start_s: start_min as i64 * 60,
            end_s: (start_min as i64 + 60) * 60,
            bucket_s: 60,
            campaign_id: None,
            ad_id: None,
        };
        let t = Instant::now();
        let r = store.query(&q, now).unwrap();
        h.record(t.elapsed().as_micros() as u64).unwrap();
        assert_eq!(r.len(), 6000, "100 ads x 60 minutes");
    }
    println!("query_1h_1m_100ads_p50 {} us", h.value_at_quantile(0.5));
    println!("query_1h_1m_100ads_p99 {} us", h.value_at_quantile(0.99));
    println!("query_1h_1m_100ads_max {} us", h.max());
    query_over_http(store);
}

/// The same query through the real HTTP API (axum, bearer token, JSON of
/// 6 000 points), one client connection, on loopback.
fn query_over_http(store: Store) {
    use std::io::{Read, Write};
    use std::sync::Arc;
    let tokens: aggregator::config::Tokens = toml::from_str(
        "[[token]]\nadvertiser_id = \"adv-0\"\ntoken = \"bench-token-0123456789\"\n",
    )
    .unwrap();
    let api = Arc::new(aggregator::http::Api {
        store: Arc::new(store),
        tokens,
        metrics: Arc::new(aggregator::metrics::Metrics::default()),
        query_max_points: 100_000,
        ready: true.into(),
        cluster: None,
        clickhouse: None,
        clickhouse_for_all: false,
        rows_retention_ms: 35 * 86_400_000,
        forward: aggregator::http::forwarder(),
        reconcile: aggregator::reconcile::Settings::default(),
    });
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let listener = rt
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .unwrap();
    let addr = listener.local_addr().unwrap();
    rt.spawn(async move { axum::serve(listener, aggregator::http::router(api)).await });
    let mut h = hdrhistogram::Histogram::<u64>::new(3).unwrap();
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    let mut buf = vec![0u8; 4 << 20];
    for i in 0..500u32 {
        let start_min = T0_MIN + (i * 37) % (1440 - 60);
        let req = format!(
            "GET /api/v1/advertisers/analytics?advertiser_id=adv-0&start_time={}&end_time={}&granularity=1m HTTP/1.1\r\n\
             Host: b\r\nAuthorization: Bearer bench-token-0123456789\r\n\r\n",
            start_min as i64 * 60,
            (start_min as i64 + 60) * 60
        );
        let t = Instant::now();
        s.write_all(req.as_bytes()).unwrap();
        // Read one response: headers, then Content-Length bytes of body.
        let mut got = 0;
        let body_end = loop {
            let n = s.read(&mut buf[got..]).unwrap();
            assert!(n > 0, "server closed");
            got += n;
            if let Some(he) = buf[..got].windows(4).position(|w| w == b"\r\n\r\n") {
                let head = std::str::from_utf8(&buf[..he])
                    .unwrap()
                    .to_ascii_lowercase();
                assert!(head.starts_with("http/1.1 200"), "{head}");
                let len: usize = head
                    .lines()
                    .find_map(|l| l.strip_prefix("content-length:"))
                    .unwrap()
                    .trim()
                    .parse()
                    .unwrap();
                if got >= he + 4 + len {
                    break he + 4 + len;
                }
            }
        };
        h.record(t.elapsed().as_micros() as u64).unwrap();
        assert_eq!(body_end, got, "one response at a time");
    }
    println!(
        "http_query_1h_1m_100ads_p50 {} us",
        h.value_at_quantile(0.5)
    );
    println!(
        "http_query_1h_1m_100ads_p99 {} us",
        h.value_at_quantile(0.99)
    );
}

fn main() {
    let filter = std::env::args().nth(1).filter(|a| !a.starts_with('-'));
    let on = |name: &str| filter.as_deref().is_none_or(|f| name.contains(f));
    if on("apply") {
        apply_rate(1);
        apply_rate(16);
    }
    if on("query") {
        query_latency();
    }
}
