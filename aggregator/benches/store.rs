//! The aggregator's store, measured where an operator sizes it:
//!
//! - apply rate: partial rows merged per second on one core, durability on
//!   (every commit fsynced), one batch per transaction and grouped;
//! - query latency: one advertiser, 100 ads, one hour at 1-minute
//!   granularity, with a day of that advertiser's data (and 49 others') loaded.
//!
//! - unique users: what building the sketches from raw events costs per
//!   click (apply with and without users to count), their bytes per click,
//!   and a 1-day, 100-ad, 1-hour-granularity query with uniques.
//!
//! `cargo bench -p clickgate-aggregator --bench store [apply|query|uniques]` (about
//! a minute; pin it with `taskset -c 1`). Prints `name value unit` lines.

use std::collections::BTreeMap;
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
                unrecorded: Vec::new(),
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
            unrecorded: Vec::new(),
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

/// Exact distinct users per (hour, ad).
type ExactUsers = BTreeMap<(u32, u64), u64>;

/// Events batches of one shard: `minutes` minutes of `ads` ads of adv-0,
/// `per_minute` clicks per (minute, ad) by users drawn from `pool` per ad;
/// `verdict` of every click (a duplicate counts no user).
fn click_batches(
    minutes: u32,
    ads: u64,
    per_minute: u64,
    pool: u64,
    verdict: wire::record::Verdict,
    rng: &mut Rng,
) -> (Vec<Vec<u8>>, ExactUsers) {
    use wire::record::{EventKind, EventRef, Source};
    let mut exact: BTreeMap<(u32, u64), std::collections::HashSet<u64>> = BTreeMap::new();
    let mut out = Vec::new();
    let (mut seq, mut after) = (0u64, 0u64);
    for minute in 0..minutes {
        let mut raw = Vec::new();
        let mut n = 0;
        for ad in 0..ads {
            let ad_id = format!("ad-0-{}-{}", ad / 10, ad % 10);
            let camp = format!("camp-0-{}", ad / 10);
            for i in 0..per_minute {
                seq += 1;
                let u = rng.next() % pool;
                exact.entry((minute / 60, ad)).or_default().insert(u);
                let user = format!("user-{u}");
                let click = format!("c-{seq}");
                let ms = (T0_MIN + minute) as i64 * 60_000 + (i * 997 % 60_000) as i64;
                let e = EventRef {
                    kind: EventKind::Click,
                    verdict,
                    source: Source::Get,
                    device: Device::Mobile,
                    country: *b"DE",
                    event_ms: ms,
                    receive_ms: ms,
                    signed_ts_s: ms / 1000,
                    cost_micros: 1000,
                    client_ip: [1; 16],
                    kid: "k1",
                    advertiser_id: "adv-0",
                    campaign_id: &camp,
                    ad_id: &ad_id,
                    click_id: &click,
                    user_id: &user,
                    redirect_url: "https://example.com/landing",
                };
                let mut b = vec![0u8; e.encoded_len()];
                e.encode_into(&mut b);
                push_item(&mut raw, seq, RecordType::Event as u8, &b);
                n += 1;
            }
        }
        let b = Batch::seal(BatchKind::Events, "gw", 0, after, seq, n, &raw, 1).unwrap();
        out.push(b.encode());
        after = seq;
    }
    let exact = exact
        .into_iter()
        .map(|(k, v)| (k, v.len() as u64))
        .collect();
    (out, exact)
}

fn uniques() {
    use wire::record::Verdict;
    // Building sketches at apply: the same clicks, once accepted (users
    // counted) and once marked duplicate (none), interleaved rounds.
    let (minutes, ads, per_minute, pool) = (60u32, 100u64, 20u64, 2000u64);
    let clicks = (minutes as u64 * ads * per_minute) as f64;
    let mut per_click = [Vec::new(), Vec::new()];
    for round in 0..3 {
        for (i, verdict) in [Verdict::Accepted, Verdict::Duplicate]
            .into_iter()
            .enumerate()
        {
            let d = tempfile::tempdir().unwrap();
            let store = Store::open(&d.path().join("u.redb"), Settings::default()).unwrap();
            let (bs, _) =
                click_batches(minutes, ads, per_minute, pool, verdict, &mut Rng(7 + round));
            let now = (T0_MIN as i64 + 120) * 60_000;
            let t = Instant::now();
            for b in &bs {
                apply_all(&store, &[b], now);
            }
            per_click[i].push(t.elapsed().as_secs_f64() * 1e9 / clicks);
        }
    }
    let med = |v: &mut Vec<f64>| {
        v.sort_by(|a, b| a.partial_cmp(b).unwrap());
        v[v.len() / 2]
    };
    let (with, without) = (med(&mut per_click[0]), med(&mut per_click[1]));
    println!("uniques_apply_with_users {with:.0} ns/click (median of 3)");
    println!("uniques_apply_without_users {without:.0} ns/click (median of 3)");
    println!("uniques_apply_cost {:.0} ns/click", with - without);

    // A day of adv-0 (100 ads, 20 clicks a minute each from 2000 users per
    // ad: every hour sketch past its exact range), queried for the day at
    // 1-hour granularity, uniques included.
    let d = tempfile::tempdir().unwrap();
    let store = Store::open(&d.path().join("q.redb"), Settings::default()).unwrap();
    let now = (T0_MIN as i64 + 1500) * 60_000;
    let (bs, exact) = click_batches(1440, ads, per_minute, pool, Verdict::Accepted, &mut Rng(99));
    for b in bs {
        apply_all(&store, &[&b], now);
    }
    // The shard's partial after them (no rows: the recount writes them),
    // moving the watermark past the day.
    let last = 1440 * ads * per_minute;
    let mut raw = Vec::new();
    let p = PartialRecord {
        from_seq: 0,
        to_seq: last,
        watermark_ms: now,
        rows: Vec::new(),
        unrecorded: Vec::new(),
    };
    encode_partial(&p, last + 1, &mut raw);
    let b = Batch::seal(BatchKind::Partials, "gw", 0, 0, last + 1, 1, &raw, 1).unwrap();
    apply_all(&store, &[&b.encode()], now);
    // The events stream passes the partial's seq too (as a shipper's does).
    let b = Batch::seal(BatchKind::Events, "gw", 0, last, last + 1, 0, &[], 1).unwrap();
    apply_all(&store, &[&b.encode()], now);
    // Reconciliation passes the hours and merges their hour sketches.
    let store = std::sync::Arc::new(store);
    let mut r = aggregator::reconcile::Reconciler::new(
        store.clone(),
        aggregator::reconcile::Settings::default(),
        std::sync::Arc::new(aggregator::metrics::ReconcileStats::default()),
    );
    let t = Instant::now();
    let mut idle = 0;
    while idle < 3 {
        match r.turn(now).unwrap() {
            aggregator::reconcile::Turn::Worked(_) => idle = 0,
            _ => idle += 1,
        }
    }
    println!(
        "uniques_reconcile_day {:.1} s for {} clicks",
        t.elapsed().as_secs_f64(),
        1440 * ads * per_minute
    );
    let day_clicks = (1440 * ads * per_minute) as f64;
    let [(mn, mb), (hn, hb)] = store.sketch_bytes().unwrap();
    println!(
        "uniques_minute_sketches {mn} sketches {:.1} bytes/click",
        mb as f64 / day_clicks
    );
    println!(
        "uniques_hour_sketches {hn} sketches {:.1} bytes/click",
        hb as f64 / day_clicks
    );
    let q = Query {
        advertiser_id: "adv-0".into(),
        start_s: T0_MIN as i64 * 60,
        end_s: (T0_MIN as i64 + 1440) * 60,
        bucket_s: 3600,
        campaign_id: None,
        ad_id: None,
    };
    let mut h = hdrhistogram::Histogram::<u64>::new(3).unwrap();
    let mut both = hdrhistogram::Histogram::<u64>::new(3).unwrap();
    let mut last = None;
    for _ in 0..300 {
        let t = Instant::now();
        let u = store.unique_users(&q).unwrap();
        h.record(t.elapsed().as_micros() as u64).unwrap();
        let rows = store.query(&q, now).unwrap();
        both.record(t.elapsed().as_micros() as u64).unwrap();
        assert_eq!(rows.len(), 2400);
        last = Some(u);
    }
    let u = last.unwrap();
    assert_eq!(u.len(), 2400, "100 ads x 24 hours");
    let worst = u
        .iter()
        .map(|((t, ad), &n)| {
            let hour = (*t / 60 - T0_MIN as i64) as u32 / 60;
            let a: u64 = ad.rsplit('-').next().unwrap().parse::<u64>().unwrap()
                + 10 * ad.split('-').nth(2).unwrap().parse::<u64>().unwrap();
            let want = exact[&(hour, a)] as f64;
            (n as f64 - want).abs() / want
        })
        .fold(0.0, f64::max);
    println!(
        "uniques_query_1d_1h_100ads_p50 {} us",
        h.value_at_quantile(0.5)
    );
    println!(
        "uniques_query_1d_1h_100ads_p99 {} us",
        h.value_at_quantile(0.99)
    );
    println!(
        "query_with_uniques_1d_1h_100ads_p50 {} us",
        both.value_at_quantile(0.5)
    );
    println!(
        "query_with_uniques_1d_1h_100ads_p99 {} us",
        both.value_at_quantile(0.99)
    );
    println!("uniques_hour_estimate_worst_error {:.2} %", worst * 100.0);
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
    if on("uniques") {
        uniques();
    }
}
