//! The real gateway binary on loopback.

mod common;

use std::io::Write;
use std::time::{Duration, Instant};

use common::*;
use test_support::fs::SmallFs;

#[test]
fn click_redirects_with_the_signed_url_and_no_cache() {
    let g = Gateway::start("");
    let r = g.get(&Click::default().target());
    assert_eq!(r.status, 302, "{}", r.body_str());
    assert_eq!(
        r.header("location"),
        Some("https://shop.example/landing?item=7&ref=ad")
    );
    assert_eq!(
        r.header("cache-control"),
        Some("no-cache, no-store, must-revalidate")
    );
    assert!(r.header("date").is_some());
    let ins = g.inspect(false);
    assert_eq!(totals(&ins), (1, 0, 0, 0), "{ins}");
}

#[test]
fn duplicate_is_redirected_but_not_counted_across_shards() {
    let g = Gateway::start("cpus = [0, 1]");
    let target = Click::default().target();
    // Many connections, so both shards see the same click id.
    let mut statuses = Vec::new();
    for _ in 0..20 {
        statuses.push(g.get(&target).status);
    }
    assert!(statuses.iter().all(|&s| s == 302), "{statuses:?}");
    let ins = g.inspect(false);
    assert_eq!(totals(&ins), (1, 0, 19, 0), "{ins}");
    assert!(ins.contains("shard 1:"), "{ins}");
}

#[test]
fn a_click_id_is_the_same_click_escaped_or_not() {
    // The shard fingerprints a plain click id before the MAC (to prefetch its
    // dedup slot) and an escaped one after decoding: both must agree.
    use wire::signed::{encode_component as enc, sign};
    let g = Gateway::start("");
    let target = |id: &str| {
        let q = format!(
            "ad_id=ad-1&advertiser_id=adv-1&campaign_id=camp-1&click_id={id}&user_id=u-1&cost_per_click=0.25&timestamp={}&redirect_url={}&kid=k1",
            now_s(),
            enc("https://shop.example/landing")
        );
        format!("/api/v1/clicks?{}", sign(&q, &SECRET1))
    };
    for id in ["c-9", "c%2D9", "%63-9", "c-9"] {
        let r = g.get(&target(id));
        assert_eq!(r.status, 302, "{id}: {}", r.body_str());
    }
    let ins = g.inspect(false);
    assert_eq!(totals(&ins), (1, 0, 3, 0), "{ins}");
}

#[test]
fn impression_is_204_and_counted_as_impression() {
    let g = Gateway::start("");
    let c = Click {
        kind: "impressions",
        click_id: "imp-1",
        ..Click::default()
    };
    let r = g.get(&c.target());
    assert_eq!(r.status, 204);
    assert_eq!(totals(&g.inspect(false)), (0, 1, 0, 0));
}

#[test]
fn batch_answers_each_item_and_stores_only_good_ones() {
    let g = Gateway::start("");
    let good = Click {
        click_id: "b-1",
        ts: now_s() - 3 * 3600,
        ..Click::default()
    }
    .target();
    let bad_sig = Click {
        click_id: "b-2",
        secret: &SECRET2,
        ..Click::default()
    }
    .target();
    let imp = Click {
        kind: "impressions",
        click_id: "b-3",
        ..Click::default()
    }
    .target();
    let expired = Click {
        click_id: "b-4",
        ts: now_s() - 8 * 86_400,
        ..Click::default()
    }
    .target();
    let body = format!("{good}\n{bad_sig}\n{good}\n{imp}\n{expired}\n/nope?x=1\n");
    let raw = format!(
        "POST /api/v1/events HTTP/1.1\r\nHost: t\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    let r = g.request(raw.as_bytes()).unwrap();
    assert_eq!(r.status, 200);
    let lines: Vec<&str> = std::str::from_utf8(&r.body).unwrap().lines().collect();
    assert_eq!(
        lines,
        vec![
            "accepted",
            "rejected bad_signature",
            "duplicate",
            "accepted",
            "rejected expired",
            "rejected bad_field: path"
        ]
    );
    let ins = g.inspect(true);
    assert_eq!(totals(&ins), (1, 1, 1, 0), "{ins}");
    // A batched event counts in the minute of its signed timestamp.
    let minute = (now_s() - 3 * 3600) / 60;
    assert!(
        ins.contains(&format!("click_id=b-1 minute={minute}")),
        "{ins}"
    );
}

#[test]
fn chunked_batch_is_accepted() {
    let g = Gateway::start("");
    let t = Click {
        click_id: "ch-1",
        ..Click::default()
    }
    .target();
    let body = format!("{t}\n");
    let raw = format!(
        "POST /api/v1/events HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n{:x}\r\n{body}\r\n0\r\n\r\n",
        body.len()
    );
    let r = g.request(raw.as_bytes()).unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(r.body_str(), "accepted\n");
}

#[test]
fn rejections_have_their_status_and_are_counted() {
    let g = Gateway::start(
        "[limits]\nheader_bytes_max = 1024\nbody_bytes_max = 512\n[traffic]\nrate_per_s = 1\nrate_burst = 30\n",
    );
    // 403 bad signature, 400 missing field, 403 unknown kid, 403 expired.
    let r = g.get(
        &Click {
            secret: &SECRET2,
            ..Click::default()
        }
        .target(),
    );
    assert_eq!((r.status, r.body_str().as_str()), (403, "bad_signature\n"));
    let r = g.get("/api/v1/clicks?ad_id=1&sig=AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA");
    assert_eq!(r.status, 400, "{}", r.body_str());
    let r = g.get(
        &Click {
            kid: "k9",
            ..Click::default()
        }
        .target(),
    );
    assert_eq!((r.status, r.body_str().as_str()), (403, "unknown_kid\n"));
    let r = g.get(
        &Click {
            ts: now_s() - 2 * 86_400,
            ..Click::default()
        }
        .target(),
    );
    assert_eq!((r.status, r.body_str().as_str()), (403, "expired\n"));
    let r = g.get(
        &Click {
            ts: now_s() + 3600,
            ..Click::default()
        }
        .target(),
    );
    assert_eq!(
        (r.status, r.body_str().as_str()),
        (403, "future_timestamp\n")
    );
    // 404, 405.
    assert_eq!(g.get("/nope").status, 404);
    let r = g
        .request(b"POST /api/v1/clicks HTTP/1.1\r\nContent-Length: 0\r\n\r\n")
        .unwrap();
    assert_eq!(r.status, 405);
    assert_eq!(r.header("allow"), Some("GET"));
    // 431: headers over the limit.
    let big = format!(
        "GET /healthz HTTP/1.1\r\nX-Big: {}\r\n\r\n",
        "a".repeat(2000)
    );
    assert_eq!(g.request(big.as_bytes()).unwrap().status, 431);
    // 413: body over the limit, refused from the Content-Length alone.
    let r = g
        .request(b"POST /api/v1/events HTTP/1.1\r\nContent-Length: 100000\r\n\r\n")
        .unwrap();
    assert_eq!(r.status, 413);
    // 400: ambiguous framing.
    for raw in [
        &b"POST /api/v1/events HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab"[..],
        b"POST /api/v1/events HTTP/1.1\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n",
        b"POST /api/v1/events HTTP/1.1\r\nTransfer-Encoding: identity\r\n\r\n",
    ] {
        let r = g.request(raw).unwrap();
        assert_eq!(r.status, 400, "{}", String::from_utf8_lossy(raw));
        assert_eq!(r.header("connection"), Some("close"));
    }
    // 429 with Retry-After once the burst is spent.
    let mut limited = None;
    for i in 0..60 {
        let r = g.get(
            &Click {
                click_id: &format!("rl-{i}"),
                ..Click::default()
            }
            .target(),
        );
        if r.status == 429 {
            limited = Some(r);
            break;
        }
    }
    let r = limited.expect("rate limit never answered 429");
    assert!(r.header("retry-after").is_some());
    std::thread::sleep(Duration::from_millis(150));
    let m = g.metrics();
    assert!(
        metric(&m, "clickgate_rejects_total{reason=\"bad_signature\"}") >= 1,
        "{m}"
    );
    assert!(metric(&m, "clickgate_rejects_total{reason=\"unknown_kid\"}") >= 1);
    assert!(metric(&m, "clickgate_rejects_total{reason=\"expired\"}") >= 1);
    assert!(metric(&m, "clickgate_drops_total{reason=\"header_too_large\"}") >= 1);
    assert!(metric(&m, "clickgate_drops_total{reason=\"body_too_large\"}") >= 1);
    assert!(
        metric(
            &m,
            "clickgate_drops_total{reason=\"duplicate_content_length\"}"
        ) >= 1
    );
    assert!(metric(&m, "clickgate_drops_total{reason=\"rate_limited\"}") >= 1);
}

#[test]
fn keep_alive_and_pipelining_answer_in_order() {
    let g = Gateway::start("");
    let mut s = g.connect();
    let mut raw = Vec::new();
    for i in 0..10 {
        let t = Click {
            click_id: &format!("p-{i}"),
            ..Click::default()
        }
        .target();
        raw.extend_from_slice(format!("GET {t} HTTP/1.1\r\nHost: t\r\n\r\n").as_bytes());
        raw.extend_from_slice(b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n");
    }
    s.write_all(&raw).unwrap();
    for _ in 0..10 {
        assert_eq!(read_response(&mut s).unwrap().status, 302);
        assert_eq!(read_response(&mut s).unwrap().status, 200);
    }
    assert_eq!(totals(&g.inspect(false)).0, 10);
}

#[test]
fn a_trickling_request_is_read_once_a_second_and_still_answered() {
    let g = Gateway::start("[limits]\nslow_read_after_ms = 200\n");
    let mut s = g.connect();
    // A byte every 80 ms: past 200 ms the connection counts as slow, and
    // from then on only the shard's once-a-second reads take its bytes.
    let req = b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n";
    for b in req {
        s.write_all(&[*b]).unwrap();
        std::thread::sleep(Duration::from_millis(80));
    }
    let r = read_response(&mut s).unwrap();
    assert_eq!((r.status, r.body_str().as_str()), (200, "ok\n"));
    // Still a keep-alive connection that answers at once.
    s.write_all(b"GET /healthz HTTP/1.1\r\n\r\n").unwrap();
    assert_eq!(read_response(&mut s).unwrap().status, 200);
    let m = g.metrics();
    // About 2.5 s of trickle past the first 200 ms: two or three sweep
    // reads, not one read per byte (34), and not none.
    let reads = metric(&m, "clickgate_slow_reads_total");
    assert!((1..=5).contains(&reads), "{reads} slow reads\n{m}");
}

#[test]
fn connections_that_time_out_together_are_closed_over_a_second_not_in_one_burst() {
    // A slowloris opens its connections together, so they time out together;
    // closing them all in one turn held every other answer for 10-15 ms.
    let g = Gateway::start("[limits]\nheader_timeout_ms = 1000\n");
    let conns: Vec<_> = (0..200)
        .map(|_| {
            let mut s = g.connect();
            s.write_all(b"GET /healthz HTTP/1.1\r\n").unwrap();
            s
        })
        .collect();
    let opened = Instant::now();
    let readers: Vec<_> = conns
        .into_iter()
        .map(|mut s| {
            std::thread::spawn(move || {
                s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
                let mut answer = Vec::new();
                let _ = std::io::Read::read_to_end(&mut s, &mut answer);
                (Instant::now(), answer)
            })
        })
        .collect();
    let mut closed: Vec<Duration> = Vec::new();
    for r in readers {
        let (at, answer) = r.join().unwrap();
        assert!(answer.is_empty(), "{}", String::from_utf8_lossy(&answer));
        closed.push(at - opened);
    }
    closed.sort();
    // Within the limit: the timeout, then at most a second until its check.
    assert!(
        *closed.last().unwrap() < Duration::from_millis(3000),
        "{closed:?}"
    );
    // Spread: no 60 ms window holds more than a few ticks' share (200 / 20
    // per 50 ms tick); all at once would put 100 or more in one window.
    let most = (0..closed.len())
        .map(|i| {
            closed[i..]
                .iter()
                .take_while(|&&t| t - closed[i] < Duration::from_millis(60))
                .count()
        })
        .max()
        .unwrap();
    assert!(most <= 60, "{most} closed within 60 ms: {closed:?}");
}

#[test]
fn header_timeout_and_connection_limit_close_connections() {
    let g = Gateway::start("[limits]\nheader_timeout_ms = 300\nconnections_max = 3\n");
    let mut slow = g.connect();
    slow.write_all(b"GET /healthz HTTP/1.1\r\n").unwrap();
    let mut buf = [0u8; 64];
    let t = std::time::Instant::now();
    let n = std::io::Read::read(&mut slow, &mut buf).unwrap_or(0);
    assert_eq!(n, 0, "expected close, got {:?}", &buf[..n]);
    assert!(t.elapsed() < Duration::from_secs(3));
    // Connection limit: three held open, the fourth is closed at once.
    // (Each held connection is answered once, so it is surely accepted before
    // the fourth arrives.)
    std::thread::sleep(Duration::from_millis(200));
    let held: Vec<_> = (0..3)
        .map(|_| {
            let mut s = g.connect();
            s.write_all(b"GET /healthz HTTP/1.1\r\n\r\n").unwrap();
            assert_eq!(read_response(&mut s).unwrap().status, 200);
            s
        })
        .collect();
    let mut extra = g.connect();
    let _ = extra.write_all(b"GET /healthz HTTP/1.1\r\n\r\n");
    let n = std::io::Read::read(&mut extra, &mut buf).unwrap_or(0);
    assert_eq!(n, 0, "{}", String::from_utf8_lossy(&buf[..n]));
    drop(held);
    std::thread::sleep(Duration::from_millis(200));
    let m = g.metrics();
    assert!(
        metric(&m, "clickgate_connections_refused_total") >= 1,
        "{m}"
    );
    assert!(
        metric(&m, "clickgate_drops_total{reason=\"header_timeout\"}") >= 1,
        "{m}"
    );
}

#[test]
fn sighup_rotates_keys_without_dropping_connections() {
    let g = Gateway::start("[tokens]\nkey_grace_s = 3600\nkeys_poll_ms = 100000\n");
    let mut s = g.connect();
    let send = |s: &mut std::net::TcpStream, c: Click| {
        s.write_all(format!("GET {} HTTP/1.1\r\nHost: t\r\n\r\n", c.target()).as_bytes())
            .unwrap();
        read_response(s).unwrap().status
    };
    let k2 = |id| Click {
        kid: "k2",
        secret: &SECRET2,
        click_id: id,
        ..Click::default()
    };
    assert_eq!(send(&mut s, k2("r-1")), 403);
    // Rotate: k2 is current, k1 is removed (retired, still in grace).
    write_keys(&g.keys_path(), &[("k2", &SECRET2)]);
    g.signal(libc::SIGHUP);
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(send(&mut s, k2("r-2")), 302);
    assert_eq!(
        send(
            &mut s,
            Click {
                click_id: "r-3",
                ..Click::default()
            }
        ),
        302
    );
    let m = g.metrics();
    assert_eq!(
        metric(&m, "clickgate_key_reloads_total{result=\"ok\"}"),
        1,
        "{m}"
    );
    // A broken keys file keeps the old keys.
    std::fs::write(g.keys_path(), "not toml [").unwrap();
    g.signal(libc::SIGHUP);
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(send(&mut s, k2("r-4")), 302);
    assert_eq!(
        metric(
            &g.metrics(),
            "clickgate_key_reloads_total{result=\"error\"}"
        ),
        1
    );
}

#[test]
fn retired_key_past_grace_is_refused() {
    let g = Gateway::start("[tokens]\nkey_grace_s = 1\nkeys_poll_ms = 50\n");
    write_keys(&g.keys_path(), &[("k2", &SECRET2)]);
    std::thread::sleep(Duration::from_millis(2500));
    let r = g.get(
        &Click {
            click_id: "g-1",
            ..Click::default()
        }
        .target(),
    );
    assert_eq!(r.status, 403);
    assert!(
        r.body_str() == "retired_kid\n" || r.body_str() == "unknown_kid\n",
        "{}",
        r.body_str()
    );
}

#[test]
fn sigterm_drains_in_flight_requests_and_exits_zero() {
    let mut g = Gateway::start("");
    let t = Click {
        click_id: "d-1",
        ..Click::default()
    }
    .target();
    let raw = format!("GET {t} HTTP/1.1\r\nHost: t\r\n\r\n");
    let (head, tail) = raw.as_bytes().split_at(20);
    let mut s = g.connect();
    s.write_all(head).unwrap();
    std::thread::sleep(Duration::from_millis(100));
    g.signal(libc::SIGTERM);
    std::thread::sleep(Duration::from_millis(200));
    // New connections are refused while draining.
    assert!(g.request(b"GET /healthz HTTP/1.1\r\n\r\n").is_err());
    s.write_all(tail).unwrap();
    let r = read_response(&mut s).unwrap();
    assert_eq!(r.status, 302);
    assert_eq!(r.header("connection"), Some("close"));
    assert_eq!(g.wait_exit(Duration::from_secs(15)), Some(0), "{}", g.log());
    assert_eq!(totals(&g.inspect(false)).0, 1);
}

#[test]
fn sigterm_with_withdraw_ms_answers_unready_while_serving_then_drains() {
    let mut g = Gateway::start("[drain]\nwithdraw_ms = 1500\n");
    g.signal(libc::SIGTERM);
    std::thread::sleep(Duration::from_millis(200));
    let t = Instant::now();
    let r = g.get("/readyz");
    assert_eq!(r.status, 503);
    assert!(r.body_str().starts_with("withdrawing"), "{}", r.body_str());
    // Clicks are still taken, each answer closing its connection so that
    // the client's next one follows the route as it is now.
    let mut acked = 0;
    while t.elapsed() < Duration::from_millis(900) {
        let r = g.get(
            &Click {
                click_id: &format!("w-{acked}"),
                ..Click::default()
            }
            .target(),
        );
        assert_eq!(r.status, 302, "{}", g.log());
        assert_eq!(r.header("connection"), Some("close"));
        acked += 1;
        std::thread::sleep(Duration::from_millis(50));
    }
    // Then it drains: new connections are refused, and it exits.
    std::thread::sleep(Duration::from_millis(1200));
    assert!(g.request(b"GET /healthz HTTP/1.1\r\n\r\n").is_err());
    assert_eq!(g.wait_exit(Duration::from_secs(15)), Some(0), "{}", g.log());
    assert_eq!(totals(&g.inspect(false)).0, acked);
}

#[test]
fn a_second_sigterm_while_withdrawing_drains_at_once() {
    let mut g = Gateway::start("[drain]\nwithdraw_ms = 60000\n");
    g.signal(libc::SIGTERM);
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(g.get("/healthz").status, 200);
    g.signal(libc::SIGTERM);
    assert_eq!(g.wait_exit(Duration::from_secs(15)), Some(0), "{}", g.log());
}

#[test]
fn kill9_loses_no_acknowledged_click() {
    kill9_run("");
}

#[test]
fn kill9_loses_no_acknowledged_click_with_paced_group_commit() {
    // Durable writes at most every 2 ms: the clicks held for the next write
    // are still never answered before it.
    kill9_run("[durability]\ncommit_interval_us = 2000\n");
}

#[test]
fn kill9_loses_no_acknowledged_click_in_process_mode() {
    kill9_run("[durability]\nmode = \"process\"\n");
}

fn kill9_run(extra: &str) {
    let mut g = Gateway::start(&format!(
        "cpus = [0, 1]\n[traffic]\nvelocity_per_minute_max = 0\n{extra}"
    ));
    let addr = g.addr;
    // Four clients send clicks until the gateway dies, keeping the ids that
    // got their 302.
    let acked = std::sync::Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let workers: Vec<_> = (0..4)
        .map(|w| {
            let acked = acked.clone();
            let stop = stop.clone();
            std::thread::spawn(move || {
                let mut i = 0;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) && i < 100_000 {
                    let Ok(mut s) = std::net::TcpStream::connect(addr) else {
                        return;
                    };
                    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
                    for _ in 0..50 {
                        let id = format!("k9-{w}-{i}");
                        i += 1;
                        let t = Click {
                            click_id: &id,
                            ..Click::default()
                        }
                        .target();
                        if s.write_all(format!("GET {t} HTTP/1.1\r\nHost: t\r\n\r\n").as_bytes())
                            .is_err()
                        {
                            return;
                        }
                        match read_response(&mut s) {
                            Ok(r) if r.status == 302 => acked.lock().unwrap().push(id),
                            _ => return,
                        }
                    }
                }
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(700));
    g.kill9();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for w in workers {
        w.join().unwrap();
    }
    let acked = acked.lock().unwrap().clone();
    assert!(
        acked.len() > 100,
        "only {} clicks acknowledged",
        acked.len()
    );
    // Restart: recovery must keep every acknowledged click, once.
    g.spawn();
    let r = g.get(
        &Click {
            click_id: &acked[0],
            ..Click::default()
        }
        .target(),
    );
    assert_eq!(r.status, 302);
    let ins = g.inspect(true);
    let mut stored = std::collections::HashMap::<String, (u32, u32)>::new();
    for l in ins.lines().filter(|l| l.starts_with("event ")) {
        let id = l
            .split(' ')
            .find_map(|kv| kv.strip_prefix("click_id="))
            .unwrap();
        let e = stored.entry(id.to_string()).or_default();
        if l.contains("verdict=accepted") {
            e.0 += 1;
        } else {
            e.1 += 1;
        }
    }
    for id in &acked {
        assert_eq!(
            stored.get(id).map(|e| e.0),
            Some(1),
            "acked {id} not stored once"
        );
    }
    // The retried first click was recognised from the recovered log.
    assert_eq!(stored[&acked[0]].1, 1);
    assert!(ins.contains("partials consistent: yes"), "{ins}");
}

#[test]
fn disk_budget_full_answers_503_and_never_302_without_a_record() {
    let g = Gateway::start("[log]\nsegment_bytes = 65536\ndisk_budget_bytes = 131072\n");
    let mut acked = Vec::new();
    let mut refused = None;
    for i in 0..2000 {
        let id = format!("full-{i}");
        let t = Click {
            click_id: &id,
            ..Click::default()
        }
        .target();
        let raw = format!("GET {t} HTTP/1.1\r\nHost: t\r\n\r\n");
        let r = match g.request(raw.as_bytes()) {
            Ok(r) => r,
            Err(e) => panic!("request {i}: {e}\n{}", g.log()),
        };
        match r.status {
            302 => acked.push(id),
            503 => {
                refused = Some(r);
                break;
            }
            s => panic!("unexpected {s}"),
        }
    }
    let r = refused.expect("budget never filled");
    assert!(r.header("retry-after").is_some());
    let ins = g.inspect(true);
    for id in &acked {
        assert!(
            ins.contains(&format!("click_id={id} ")),
            "acked {id} missing"
        );
    }
    // Still alive.
    match g.request(b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n") {
        Ok(r) => assert_eq!(r.status, 200),
        Err(e) => panic!("healthz after disk full: {e}\n{}", g.log()),
    }
    std::thread::sleep(Duration::from_millis(100));
    let m = match g.request(b"GET /metrics HTTP/1.1\r\nHost: t\r\n\r\n") {
        Ok(r) => r.body_str(),
        Err(e) => panic!("metrics after disk full: {e}\n{}", g.log()),
    };
    assert!(metric(&m, "clickgate_drops_total{reason=\"disk_full\"}") >= 1);
}

#[test]
fn health_ready_and_metrics_endpoints() {
    let g = Gateway::start("");
    let r = g.get("/healthz");
    assert_eq!((r.status, r.body_str().as_str()), (200, "ok\n"));
    assert_eq!(g.get("/readyz").status, 200);
    let m = g.metrics();
    for name in [
        "clickgate_requests_total",
        "clickgate_rejects_total",
        "clickgate_log_appended_bytes_total",
        "clickgate_flush_duration_seconds_bucket",
        "clickgate_connections_open",
        "clickgate_dedup_entries",
    ] {
        assert!(m.contains(name), "{name} missing from /metrics");
    }
}

#[test]
fn a_second_gateway_on_the_same_data_dir_refuses_to_start() {
    let g = Gateway::start("");
    let cfg = std::fs::read_to_string(g.config_path())
        .unwrap()
        .replace(&g.addr.to_string(), &format!("127.0.0.1:{}", free_port()));
    let second = g.dir.path().join("second.toml");
    std::fs::write(&second, cfg).unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_clickgate-gateway"))
        .args(["run", "--config"])
        .arg(&second)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("another gateway"), "{err}");
    // The first one is unaffected.
    assert_eq!(g.get("/healthz").status, 200);
}

#[test]
fn fast_clickers_are_flagged_invalid_but_still_redirected() {
    let g = Gateway::start("[traffic]\nvelocity_per_minute_max = 3\n");
    for i in 0..8 {
        let id = format!("v-{i}");
        let r = g.get(
            &Click {
                click_id: &id,
                ..Click::default()
            }
            .target(),
        );
        assert_eq!(r.status, 302, "the user must land even when flagged");
    }
    let (clicks, _, dups, invalid) = totals(&g.inspect(false));
    // Three per minute are billable; a minute boundary during the test can
    // allow three more, never fewer than two flagged.
    assert_eq!(clicks + invalid, 8);
    assert_eq!(dups, 0);
    assert!((2..=5).contains(&invalid), "invalid {invalid}");
}

#[test]
fn the_velocity_limit_is_for_the_host_whatever_its_cores() {
    // Two shards; every click on a new connection, so SO_REUSEPORT spreads
    // one client's clicks over both. Per shard, each would allow three.
    let g = Gateway::start("cpus = [0, 1]\n[traffic]\nvelocity_per_minute_max = 3\n");
    let minute = || now_s() / 60;
    for attempt in 0.. {
        let m0 = minute();
        for i in 0..24 {
            let id = format!("h-{attempt}-{i}");
            let r = g.get(
                &Click {
                    click_id: &id,
                    ..Click::default()
                }
                .target(),
            );
            assert_eq!(r.status, 302);
        }
        if minute() == m0 || attempt == 3 {
            break;
        }
        // The minute turned during the clicks: another round, all in one.
    }
    let ev = g.inspect(true);
    let shards: std::collections::BTreeSet<&str> = ev
        .lines()
        .filter(|l| l.starts_with("event "))
        .filter_map(|l| l.split(' ').nth(1))
        .collect();
    assert_eq!(shards.len(), 2, "clicks reached both shards: {shards:?}");
    // Per minute of the last round, three accepted for the whole host.
    let last: Vec<&str> = ev
        .lines()
        .filter(|l| l.starts_with("event ") && l.contains("click_id=h-"))
        .collect();
    let mut per_minute: std::collections::BTreeMap<(String, String), (u32, u32)> =
        Default::default();
    for l in &last {
        let field = |k: &str| {
            l.split(' ')
                .find_map(|kv| kv.strip_prefix(k))
                .unwrap()
                .to_string()
        };
        let round = field("click_id=h-").split('-').next().unwrap().to_string();
        let e = per_minute.entry((round, field("minute="))).or_default();
        if field("verdict=") == "accepted" {
            e.0 += 1;
        } else {
            e.1 += 1;
        }
    }
    for ((round, m), (accepted, invalid)) in &per_minute {
        assert!(
            *accepted <= 3,
            "round {round} minute {m}: {accepted} accepted"
        );
        assert!(*accepted + *invalid > 0);
    }
    let last_round = per_minute.keys().map(|(r, _)| r.clone()).max().unwrap();
    let in_last: Vec<_> = per_minute
        .iter()
        .filter(|((r, _), _)| *r == last_round)
        .collect();
    if in_last.len() == 1 {
        assert_eq!(
            in_last[0].1,
            &(3, 21),
            "one minute: 3 accepted for the host"
        );
    }
}

#[test]
fn idle_keep_alive_connection_is_closed_after_the_idle_timeout() {
    let g = Gateway::start("[limits]\nidle_timeout_ms = 300\n");
    let mut s = g.connect();
    s.write_all(b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n")
        .unwrap();
    assert_eq!(read_response(&mut s).unwrap().status, 200);
    let t = std::time::Instant::now();
    let mut buf = [0u8; 16];
    let n = std::io::Read::read(&mut s, &mut buf).unwrap_or(0);
    assert_eq!(n, 0, "expected the server to close the idle connection");
    // Swept once a second: closed after 300 ms idle, within ~1.3 s.
    assert!(t.elapsed() < Duration::from_secs(3), "{:?}", t.elapsed());
    std::thread::sleep(Duration::from_millis(100));
    assert!(metric(&g.metrics(), "clickgate_connections_idle_closed_total") >= 1);
}

#[test]
fn a_full_filesystem_answers_503_loses_nothing_and_recovers_when_space_returns() {
    let mut fs = None;
    let g = Gateway::start_with(
        // The budget is far above the filesystem: the filesystem fills first.
        // Uncompressed, so that it fills within a few thousand clicks.
        "[log]\nsegment_bytes = 65536\ndisk_budget_bytes = 1073741824\ncompress = false\n",
        |data| {
            fs = SmallFs::mount(data, 640 * 1024);
            if fs.is_some() {
                // Room to give back later.
                std::fs::write(data.join("ballast"), vec![1u8; 192 * 1024]).unwrap();
            }
        },
    );
    let Some(_fs) = fs else {
        eprintln!("skipped: cannot mount a tmpfs here (needs root)");
        return;
    };
    let send = |id: &str| {
        let t = Click {
            click_id: id,
            ..Click::default()
        }
        .target();
        g.request(format!("GET {t} HTTP/1.1\r\nHost: t\r\n\r\n").as_bytes())
            .unwrap_or_else(|e| panic!("{id}: {e}\n{}", g.log()))
    };
    let mut acked = Vec::new();
    let mut refused = 0;
    for i in 0..20_000 {
        let id = format!("fs-{i}");
        match send(&id).status {
            302 => acked.push(id),
            503 => {
                refused += 1;
                if refused >= 20 {
                    break;
                }
            }
            s => panic!("unexpected {s}\n{}", g.log()),
        }
    }
    assert!(
        refused >= 20,
        "the filesystem never filled ({} acked)",
        acked.len()
    );
    assert!(acked.len() > 100, "{}", acked.len());
    // Alive, and every 302 has its record.
    assert_eq!(g.get("/healthz").status, 200);
    let ins = g.inspect(true);
    for id in &acked {
        assert!(
            ins.contains(&format!("click_id={id} ")),
            "acked {id} missing"
        );
    }
    // Space comes back: clicks are taken again (segment creation is retried).
    std::fs::remove_file(g.data_dir().join("ballast")).unwrap();
    let t = Instant::now();
    let mut back = None;
    for i in 0..200 {
        let id = format!("back-{i}");
        if send(&id).status == 302 {
            back = Some(id);
            break;
        }
        assert!(t.elapsed() < Duration::from_secs(20));
        std::thread::sleep(Duration::from_millis(50));
    }
    let back = back.expect("no 302 after space returned");
    assert!(g.inspect(true).contains(&format!("click_id={back} ")));
    let m = g.metrics();
    // Every refusal was for space, reported as such.
    assert!(metric(&m, "clickgate_drops_total{reason=\"disk_full\"}") >= refused as u64);
    assert_eq!(metric(&m, "clickgate_drops_total{reason=\"log_error\"}"), 0);
}

#[test]
fn a_failed_durable_write_is_never_acknowledged_nor_retried_into_a_302() {
    // The 31st durable write reports EIO, as a failing disk would.
    let mut g = Gateway::start_env("", &[("CLICKGATE_INJECT_WRITE_ERROR_AFTER", "30")]);
    let mut acked = Vec::new();
    let mut unanswered = Vec::new();
    let mut after = Vec::new();
    for i in 0..60 {
        let id = format!("io-{i}");
        let t = Click {
            click_id: &id,
            ..Click::default()
        }
        .target();
        match g.request(format!("GET {t} HTTP/1.1\r\nHost: t\r\n\r\n").as_bytes()) {
            Ok(r) if r.status == 302 => {
                assert!(
                    unanswered.is_empty() && after.is_empty(),
                    "a 302 after the failure: {id}"
                );
                acked.push(id);
            }
            Ok(r) => {
                assert_eq!(r.status, 503, "{}", r.body_str());
                after.push(id);
            }
            // The click whose write failed: its connection is closed unanswered.
            Err(_) => unanswered.push(id),
        }
    }
    assert_eq!(acked.len(), 30, "{}", g.log());
    assert_eq!(unanswered.len(), 1, "{unanswered:?}");
    assert_eq!(after.len(), 29);
    assert!(g
        .log()
        .contains("durable write failed; shard stops acknowledging"));
    assert_eq!(g.get("/readyz").status, 503);
    assert!(metric(&g.metrics(), "clickgate_flush_errors_total") >= 1);
    assert_eq!(metric(&g.metrics(), "clickgate_shards_failed"), 1);
    // Restarted without the fault: every 302 is in the log; the refused
    // clicks are not.
    g.kill9();
    g.env.clear();
    g.spawn();
    let ins = g.inspect(true);
    for id in &acked {
        assert!(
            ins.contains(&format!("click_id={id} ")),
            "acked {id} missing"
        );
    }
    for id in &after {
        assert!(
            !ins.contains(&format!("click_id={id} ")),
            "refused {id} logged"
        );
    }
}

/// The nice values of the gateway's io_uring worker threads.
fn io_worker_nices(pid: i32) -> Vec<i32> {
    gateway::sys::io_workers(pid as u32, None)
        .unwrap_or_default()
        .into_iter()
        .filter_map(|t| gateway::sys::thread_nice(t).ok())
        .collect()
}

#[test]
fn the_durable_writes_io_uring_workers_get_writer_nice() {
    // A positive value needs no privilege, so this runs anywhere; the
    // default (-10) is the same path with CAP_SYS_NICE or LimitNICE.
    let g = Gateway::start("[durability]\nwriter_nice = 3\n");
    let t = Instant::now();
    let mut seen = Vec::new();
    let mut i = 0;
    while t.elapsed() < Duration::from_secs(5) {
        // Durable writes keep a worker alive; the shard renices once a second.
        assert_eq!(g.get(&click(&format!("nice-{i}"))).status, 302);
        i += 1;
        seen = io_worker_nices(g.pid());
        if !seen.is_empty() && seen.iter().all(|&n| n == 3) {
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("io_uring workers' nice values: {seen:?}\n{}", g.log());
}
