//! Micro benchmark of the per-click work on the hot path, in ns per click:
//! parse, verify, dedup, append, pre-aggregate, each alone and all together
//! (the whole `App::handle` of a click, response included).
//!
//! `cargo bench -p clickgate-gateway --bench hot_path`
//! Prints `name ns_per_click` lines; `bench/run` collects them.

use std::hint::black_box;
use std::sync::Arc;
use std::time::Instant;

use gateway::config::Config;
use gateway::log::{LogConfig, ShardLog};
use gateway_core::app::{App, Shared, State};
use gateway_core::dedup::DedupTable;
use gateway_core::http::{self, Limits, Parse, ResponseWriter};
use gateway_core::limiter::VelocityTable;
use gateway_core::preagg::PreAgg;
use gateway_core::token::{self, KeyRing, Policy};
use wire::record::{Device, EventKind, EventRef, Source, Verdict};
use wire::signed::{encode_component as enc, sign};

const SECRET: [u8; 32] = [7; 32];

fn keys() -> KeyRing {
    use base64::Engine;
    let s = wire::signed::B64.encode(SECRET);
    KeyRing::parse(
        &format!("[[key]]\nkid=\"k1\"\nsecret=\"{s}\"\n"),
        0,
        None,
        0,
    )
    .unwrap()
}

fn now_ms() -> i64 {
    gateway::clock::now_ms()
}

/// A realistic ~400-byte click request.
fn request(i: u64) -> Vec<u8> {
    let q = format!(
        "ad_id=ad-{}&advertiser_id=adv-{}&campaign_id=camp-{}&click_id=01J9Z{i:016}&user_id=u-{}&cost_per_click=0.35&timestamp={}&redirect_url={}&kid=k1",
        i % 100,
        i % 10,
        i % 30,
        i % 5000,
        now_ms() / 1000,
        enc("https://shop.example.com/products/summer-sale?utm_source=clickgate&utm_medium=cpc")
    );
    format!(
        "GET /api/v1/clicks?{} HTTP/1.1\r\nHost: click.example.net\r\nUser-Agent: Mozilla/5.0 (iPhone; CPU iPhone OS 17_0 like Mac OS X) Mobile/15E148\r\nX-Country: DE\r\n\r\n",
        sign(&q, &SECRET)
    )
    .into_bytes()
}

/// An IPv4-mapped address, one of 100 000, spread like a real client mix.
fn client_addr(i: u64) -> [u8; 16] {
    let n = (i.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 40) % 100_000;
    let mut a = [0u8; 16];
    a[10] = 0xff;
    a[11] = 0xff;
    a[12] = 10;
    a[13..16].copy_from_slice(&(n as u32).to_be_bytes()[1..]);
    a
}

/// A log in `dir` for the benchmark (large segments, no rotation mid-run).
fn log_config(dir: &std::path::Path, shard: u16) -> LogConfig {
    LogConfig {
        dir: dir.join(format!("shard-{shard}")),
        shard,
        gateway_id: "bench".into(),
        segment_bytes: 256 << 20,
        disk_budget_bytes: 64 << 30,
        zero_fill: false,
        sync_on_rotate: true,
        partial_reserve_bytes: 1 << 20,
        compress: None,
    }
}

fn bench(name: &str, n: u64, f: impl FnMut(u64)) {
    bench_scaled(name, n, 1, f)
}

/// Like `bench`, for a closure that handles `per_call` clicks each time.
fn bench_scaled(name: &str, n: u64, per_call: u64, mut f: impl FnMut(u64)) {
    // `cargo bench ... -- <filter>` runs only the benchmarks whose name
    // contains the filter (for profiling one of them).
    if !wanted(name) {
        return;
    }
    // Warm up, then the best of five runs (least disturbed by the machine).
    for i in 0..n / 10 {
        f(i);
    }
    let mut best = f64::MAX;
    for r in 0..5 {
        let t = Instant::now();
        for i in 0..n {
            f(r * n + i);
        }
        best = best.min(t.elapsed().as_nanos() as f64 / (n * per_call) as f64);
    }
    println!("{name:<28} {best:>8.0} ns_per_click");
}

/// Whether `cargo bench ... -- <filter>` asks for the benchmark `name` (all
/// of them without a filter).
fn wanted(name: &str) -> bool {
    let filter: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with('-'))
        .collect();
    filter.is_empty() || filter.iter().any(|f| name.contains(f.as_str()))
}

/// `App::handle` of the request `next(i)` returns, with a turn's write every
/// 32 clicks and a partial every 10 000, in a fresh app and dedup table.
fn whole_click<'r>(
    name: &str,
    n: u64,
    limits: &Limits,
    dir: &std::path::Path,
    shard: u16,
    mut next: impl FnMut(u64) -> &'r Vec<u8>,
) {
    let now = now_ms();
    // The default config, velocity filter included: each click comes from
    // one of 100 000 client addresses, so that (address, ad) pairs are about
    // as spread as real traffic's and none is over the per-minute limit.
    let cfg = Config::default();
    // The tables as the server makes them (on huge pages).
    let shared = Arc::new(Shared::new(
        DedupTable::new_in(cfg.dedup.entries_max, 15, gateway::sys::huge_dedup_slots),
        VelocityTable::new_in(
            cfg.traffic.velocity_per_minute_max,
            cfg.traffic.velocity_entries_max,
            gateway::sys::huge_atomic_words,
        ),
        1,
        keys(),
    ));
    shared.state.set(State::Ready);
    let (log, _) = ShardLog::open(&log_config(dir, shard), now).unwrap();
    let mut app = App::new(
        0,
        cfg.core_settings(),
        log,
        PreAgg::new(100_000, 0),
        shared,
        gateway::clock::mono_ms(),
    );
    let mut out = Vec::with_capacity(1 << 20);
    bench(name, n, |i| {
        let mut b = next(i).clone();
        let Parse::Request(req) = http::parse(&mut b, limits, "x-country") else {
            panic!()
        };
        if out.len() > 1 << 19 {
            out.clear();
        }
        let mut w = ResponseWriter {
            out: &mut out,
            common: b"Date: Mon, 23 Nov 2026 00:00:00 GMT\r\n",
        };
        let o = app.handle(&b, &req, client_addr(i), now, &mut w);
        assert!(o.wait_seq > 0);
        if i % 1024 == 0 {
            app.log.prefault(); // what the shard's tick does
        }
        if i % 32 == 31 {
            app.log.write_now().unwrap(); // a turn's write, into the page cache
        }
        if i % 10_000 == 0 {
            app.append_partial(now).unwrap();
        }
    });
}

fn main() {
    let n = 200_000u64;
    let reqs: Vec<Vec<u8>> = (0..4096).map(request).collect();
    let limits = Limits {
        header_bytes_max: 8192,
        headers_max: 64,
        body_bytes_max: 1 << 20,
    };
    println!("request bytes: {}", reqs[0].len());

    bench("parse", n, |i| {
        let mut b = reqs[(i % 4096) as usize].clone();
        black_box(http::parse(&mut b, &limits, "x-country"));
    });
    bench("parse (clone only)", n, |i| {
        black_box(reqs[(i % 4096) as usize].clone());
    });

    let ring = keys();
    let policy = Policy::DEFAULT_CLICK;
    let queries: Vec<Vec<u8>> = reqs
        .iter()
        .map(|r| {
            let s = std::str::from_utf8(r).unwrap();
            let q = s.split_once('?').unwrap().1.split_once(' ').unwrap().0;
            q.as_bytes().to_vec()
        })
        .collect();
    let mut scratch = vec![0u8; 4096];
    let now = now_ms();
    bench("verify (hmac + decode)", n, |i| {
        let q = &queries[(i % 4096) as usize];
        black_box(token::verify(q, &ring, &policy, now, &mut scratch).unwrap());
    });

    let hkey = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &SECRET);
    bench("verify: hmac-sha256 alone", n, |i| {
        let q = &queries[(i % 4096) as usize];
        black_box(ring::hmac::sign(&hkey, &q[..q.len() - 48]));
    });
    let uas: [&[u8]; 3] = [
        b"Mozilla/5.0 (iPhone; CPU iPhone OS 17_0 like Mac OS X) Mobile/15E148",
        b"Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/120.0.0.0 Safari/537.36",
        b"Mozilla/5.0 (Linux; Android 14; Pixel 8) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/120.0.0.0 Mobile Safari/537.36",
    ];
    bench("user-agent class", n, |i| {
        black_box(gateway_core::limiter::device_of(uas[(i % 3) as usize]));
    });

    let velocity = VelocityTable::new_in(30, 1 << 20, gateway::sys::huge_atomic_words);
    let ad_ids: Vec<String> = (0..100).map(|i| format!("ad-{i}")).collect();
    bench("velocity (100 000 addresses x 100 ads)", n, |i| {
        let addr = client_addr(i);
        black_box(velocity.check(&addr, &ad_ids[(i % 100) as usize], 29_000_000));
    });

    let dedup = DedupTable::new_in(4 << 20, 15, gateway::sys::huge_dedup_slots);
    bench("dedup", n, |i| {
        let id = format!("{i:016}");
        let fp = dedup.fingerprint(1, id.as_bytes());
        black_box(dedup.check_and_insert(fp, 1000));
    });

    let dir = tempfile::tempdir().unwrap();
    let (mut log, _) = ShardLog::open(&log_config(dir.path(), 0), now).unwrap();
    let ids: Vec<String> = (0..4096).map(|i| format!("01J9Z{i:016}")).collect();
    let ev = |i: u64| EventRef {
        kind: EventKind::Click,
        verdict: Verdict::Accepted,
        source: Source::Get,
        device: Device::Mobile,
        country: *b"DE",
        event_ms: now,
        receive_ms: now,
        signed_ts_s: now / 1000,
        cost_micros: 350_000,
        client_ip: [1; 16],
        kid: "k1",
        advertiser_id: "adv-3",
        campaign_id: "camp-12",
        ad_id: "ad-42",
        click_id: &ids[(i % 4096) as usize],
        user_id: "u-77",
        redirect_url:
            "https://shop.example.com/products/summer-sale?utm_source=clickgate&utm_medium=cpc",
    };
    bench("append (stage, crc32c, write)", n, |i| {
        if i % 1024 == 0 {
            log.prefault(); // what the shard's tick does
        }
        black_box(log.append_event(&ev(i), now).unwrap());
        if i % 32 == 31 {
            log.write_now().unwrap(); // a turn's write, into the page cache
        }
    });
    let mut agg = PreAgg::new(1 << 20, 0);
    bench("pre-aggregate", n, |i| {
        agg.add(&ev(i)).unwrap();
        black_box(());
    });

    // The whole request through App::handle (not the socket work), twice:
    // 64 Ki distinct clicks, cycled (after the first pass they are duplicates,
    // which take the same path: verify, dedup probe, append, aggregate; their
    // dedup slots stay in cache), and clicks whose ids are all new, as in
    // production, so that every dedup probe goes to memory.
    let unique: Vec<Vec<u8>> = (0..65_536).map(|i| request(1_000_000 + i)).collect();
    whole_click(
        "whole click (App::handle)",
        n,
        &limits,
        dir.path(),
        1,
        |i| &unique[(i % 65_536) as usize],
    );
    drop(unique);
    if wanted("whole click, every id new") {
        let fresh: Vec<Vec<u8>> = (0..n * 6 + n / 10)
            .map(|i| request(10_000_000 + i))
            .collect();
        let mut next = 0usize;
        whole_click(
            "whole click, every id new",
            n,
            &limits,
            dir.path(),
            2,
            |_| {
                next += 1;
                &fresh[next - 1]
            },
        );
    }

    // zstd of a batch, as the shipper will send them: 4096 raw event records
    // (level 3), and one second of partials for the same clicks.
    let mut raw = Vec::new();
    let mut agg = PreAgg::new(1 << 20, 0);
    let ads: Vec<String> = (0..1000).map(|i| format!("ad-{i}")).collect();
    for i in 0..4096u64 {
        // A skewed ad choice: a few hot ads, a long tail.
        let ad = &ads[((i * i) % 997 * (i % 7 + 1) % 1000) as usize];
        let e = EventRef { ad_id: ad, ..ev(i) };
        let mut b = vec![0u8; e.encoded_len()];
        e.encode_into(&mut b);
        raw.extend_from_slice(&b);
        agg.add(&e).unwrap();
    }
    let mut partial = Vec::new();
    agg.take_partial(4097, now).encode(&mut partial);
    let raw_z = zstd::bulk::compress(&raw, 3).unwrap();
    let part_z = zstd::bulk::compress(&partial, 3).unwrap();
    bench_scaled("zstd raw batch", 64, 4096, |_| {
        black_box(zstd::bulk::compress(&raw, 3).unwrap());
    });
    println!(
        "# zstd level 3: raw {} -> {} bytes ({:.1} bytes/click); partial {} -> {} bytes ({:.2} bytes/click)",
        raw.len(),
        raw_z.len(),
        raw_z.len() as f64 / 4096.0,
        partial.len(),
        part_z.len(),
        part_z.len() as f64 / 4096.0
    );
}
