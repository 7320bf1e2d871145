//! HTTP/3 against the real binary with an independent client (aioquic, from
//! PyPI, installed when missing): the same click, batch and error answers as
//! HTTP/1.1, counted once, Alt-Svc on HTTP/1.1 and HTTPS, and a clean drain.

mod common;

use std::io::Write;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;

fn ensure_aioquic() -> bool {
    test_support::python_module("aioquic", "aioquic")
}

struct Answer {
    status: u16,
    location: Option<String>,
    alt_svc: Option<String>,
    body: String,
}

/// Sends `(method, target, body)` requests over one HTTP/3 connection.
fn h3(port: u16, ca: &std::path::Path, reqs: &[(&str, String, String)]) -> Vec<Answer> {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/tools/h3_client.py");
    let mut child = Command::new("python3")
        .arg(script)
        .arg("--port")
        .arg(port.to_string())
        .arg("--cafile")
        .arg(ca)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    {
        let mut stdin = child.stdin.take().unwrap();
        for (m, t, b) in reqs {
            // A target of "PAD:<n> <path>" adds an x-pad header of n bytes.
            let (pad, t) = match t.strip_prefix("PAD:").and_then(|r| r.split_once(' ')) {
                Some((n, path)) => (n.parse::<usize>().unwrap(), path.to_string()),
                None => (0, t.clone()),
            };
            let headers = if pad > 0 {
                format!("{{\"x-pad\": \"{}\"}}", "a".repeat(pad))
            } else {
                "{}".into()
            };
            let line = format!(
                "{{\"method\": {:?}, \"target\": {:?}, \"body\": {:?}, \"headers\": {headers}}}\n",
                m, t, b
            );
            stdin.write_all(line.as_bytes()).unwrap();
        }
    }
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "h3 client failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| {
            let field = |k: &str| -> Option<String> {
                let key = format!("\"{k}\": ");
                let at = l.find(&key)? + key.len();
                let rest = &l[at..];
                if let Some(r) = rest.strip_prefix('"') {
                    // JSON string: up to the next unescaped quote.
                    let mut s = String::new();
                    let mut esc = false;
                    for ch in r.chars() {
                        match (esc, ch) {
                            (true, 'n') => s.push('\n'),
                            (true, c) => s.push(c),
                            (false, '\\') => {
                                esc = true;
                                continue;
                            }
                            (false, '"') => break,
                            (false, c) => s.push(c),
                        }
                        esc = false;
                    }
                    Some(s)
                } else {
                    Some(rest.split([',', '}']).next()?.trim().to_string())
                }
            };
            Answer {
                status: field("status").unwrap().parse().unwrap(),
                location: field("location"),
                alt_svc: field("alt-svc"),
                body: field("body").unwrap_or_default(),
            }
        })
        .collect()
}

/// A gateway with HTTPS and HTTP/3 on one port number; returns it, the port
/// and the directory holding its certificate (gw.pem).
fn start_h3(env: &[(&str, &str)]) -> (Gateway, u16, tempfile::TempDir) {
    let certs = tempfile::tempdir().unwrap();
    write_cert(certs.path(), "gw");
    let port = free_port();
    let extra = format!(
        "[tls]\ncert_file = \"{0}/gw.pem\"\nkey_file = \"{0}/gw.key\"\n",
        certs.path().display()
    );
    let mut env = env.to_vec();
    env.push(("RUST_LOG", "info,gateway::h3=debug"));
    let g = Gateway::start_listen_env(
        &extra,
        &format!("https = \"127.0.0.1:{port}\"\nhttp3 = \"127.0.0.1:{port}\"\n"),
        &env,
    );
    (g, port, certs)
}

#[test]
fn http3_clicks_batches_and_errors_answer_as_http1_does() {
    if !ensure_aioquic() {
        eprintln!("SKIPPED: aioquic is not installed and could not be installed");
        return;
    }
    let (mut g, port, certs) = start_h3(&[]);
    // Alt-Svc on HTTP/1.1 tells browsers where HTTP/3 is.
    let r = g.get(&Click::default().target());
    assert_eq!(r.status, 302);
    assert_eq!(
        r.header("alt-svc"),
        Some(format!("h3=\":{port}\"; ma=86400").as_str())
    );
    // And on HTTPS (curl, trusting the test certificate).
    let out = Command::new("curl")
        .args(["-s", "-o", "/dev/null", "-D", "-", "--cacert"])
        .arg(certs.path().join("gw.pem"))
        .arg("--resolve")
        .arg(format!("localhost:{port}:127.0.0.1"))
        .arg(format!("https://localhost:{port}/healthz"))
        .output()
        .unwrap();
    let head = String::from_utf8_lossy(&out.stdout).to_ascii_lowercase();
    assert!(
        head.contains(&format!("alt-svc: h3=\":{port}\"; ma=86400")),
        "{head}"
    );

    let bad = Click {
        click_id: "h3-bad",
        secret: &SECRET2,
        ..Click::default()
    }
    .target();
    let batch = format!("{}\n{}\n", click("h3-b1"), click("h3-1"));
    let get = |t: String| ("GET", t, String::new());
    let answers = h3(
        port,
        &certs.path().join("gw.pem"),
        &[
            get(click("h3-1")),
            get(click("h3-1")),
            get(bad),
            get("/nope".into()),
            ("POST", "/api/v1/events".into(), batch),
            get("/healthz".into()),
            // Over limits.header_bytes_max (8 KiB): the shard's 431.
            get("PAD:9000 /healthz".into()),
        ],
    );
    let statuses: Vec<u16> = answers.iter().map(|a| a.status).collect();
    assert_eq!(statuses, vec![302, 302, 403, 404, 200, 200, 431]);
    assert_eq!(
        answers[0].location.as_deref(),
        Some("https://shop.example/landing?item=7&ref=ad")
    );
    assert_eq!(answers[0].alt_svc, None, "no Alt-Svc over HTTP/3 itself");
    assert_eq!(answers[4].body, "accepted\nduplicate\n");
    let (clicks, _, dups, _) = totals(&g.inspect(false));
    assert_eq!((clicks, dups), (3, 2), "c-1 over HTTP/1.1, h3-1 and h3-b1");
    let m = g.metrics();
    assert!(metric(&m, "clickgate_h3_connections_total") >= 1, "{m}");
    assert_eq!(
        metric_sum(&m, "clickgate_h3_errors_total"),
        0,
        "{}",
        g.log()
    );

    // Drains cleanly with HTTP/3 on.
    g.signal(libc::SIGTERM);
    assert_eq!(g.wait_exit(Duration::from_secs(20)), Some(0), "{}", g.log());
}

#[test]
fn an_http3_click_whose_write_failed_is_never_answered_302() {
    if !ensure_aioquic() {
        eprintln!("SKIPPED: aioquic is not installed and could not be installed");
        return;
    }
    // The first durable write reports EIO, as a failing disk would.
    let (g, port, certs) = start_h3(&[("CLICKGATE_INJECT_WRITE_ERROR_AFTER", "0")]);
    let answers = h3(
        port,
        &certs.path().join("gw.pem"),
        &[
            ("GET", click("h3-io-1"), String::new()),
            ("GET", click("h3-io-2"), String::new()),
        ],
    );
    let statuses: Vec<u16> = answers.iter().map(|a| a.status).collect();
    assert_eq!(statuses, vec![503, 503], "{}", g.log());
    assert!(g
        .log()
        .contains("durable write failed; shard stops acknowledging"));
}

/// A UDP relay between a QUIC client and the gateway that keeps every
/// datagram the client sent, per connection, as an attacker on the path
/// could. Of a resent connection the gateway can read only the Initial and
/// the 0-RTT packets: the rest is under keys of a handshake the replay
/// never has.
struct Recorder {
    addr: std::net::SocketAddr,
    flights: std::sync::Arc<std::sync::Mutex<Vec<Vec<Vec<u8>>>>>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl Recorder {
    fn start(gateway: std::net::SocketAddr) -> Recorder {
        use std::net::UdpSocket;
        use std::sync::atomic::Ordering::Relaxed;
        let front = UdpSocket::bind("127.0.0.1:0").unwrap();
        front.set_nonblocking(true).unwrap();
        let addr = front.local_addr().unwrap();
        let flights = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (f2, s2) = (flights.clone(), stop.clone());
        std::thread::spawn(move || {
            // One client (loadgen's endpoint), one connection at a time: a
            // long-header Initial with a new destination CID starts the next
            // connection's record.
            let up = UdpSocket::bind("127.0.0.1:0").unwrap();
            up.connect(gateway).unwrap();
            up.set_nonblocking(true).unwrap();
            let mut client = None;
            let mut recording = false;
            let mut last_dcid = Vec::new();
            let mut server_cids = std::collections::HashSet::new();
            let mut late = std::collections::VecDeque::<(std::time::Instant, Vec<u8>)>::new();
            let rtt = Duration::from_millis(30);
            let mut buf = vec![0u8; 65536];
            loop {
                if s2.load(Relaxed) {
                    break;
                }
                let mut idle = true;
                while let Ok((n, from)) = front.recv_from(&mut buf) {
                    idle = false;
                    client = Some(from);
                    let d = &buf[..n];
                    // Long header (0x80), type Initial (0x30 bits 00); the
                    // fixed bit (0x40) may be greased (RFC 9287).
                    if n > 6 && d[0] & 0xb0 == 0x80 {
                        let len = d[5] as usize;
                        let dcid = d[6..(6 + len).min(n)].to_vec();
                        // Not new: the client's later Initials go to the
                        // CID the gateway chose.
                        if dcid != last_dcid && !server_cids.contains(&dcid) {
                            last_dcid = dcid;
                            f2.lock().unwrap().push(Vec::new());
                            recording = true;
                        }
                    }
                    if recording {
                        if let Some(f) = f2.lock().unwrap().last_mut() {
                            f.push(d.to_vec());
                        }
                    }
                    let _ = up.send(d);
                }
                while let Ok(n) = up.recv(&mut buf) {
                    idle = false;
                    let d = &buf[..n];
                    late.push_back((std::time::Instant::now() + rtt, d.to_vec()));
                    // A long header names the gateway's own CID (source).
                    if n > 6 && d[0] & 0x80 != 0 {
                        let at = 6 + d[5] as usize;
                        if at < n {
                            let len = d[at] as usize;
                            if at + 1 + len <= n {
                                server_cids.insert(d[at + 1..at + 1 + len].to_vec());
                            }
                        }
                    }
                }
                // The gateway's datagrams reach the client a round trip
                // late, as over a wide-area network: the client's 0-RTT
                // requests are in before its handshake can complete.
                while late
                    .front()
                    .is_some_and(|(t, _)| *t <= std::time::Instant::now())
                {
                    let (_, d) = late.pop_front().unwrap();
                    if let Some(c) = client {
                        let _ = front.send_to(&d, c);
                    }
                }
                if !late.is_empty() {
                    idle = false;
                }
                if idle {
                    std::thread::sleep(Duration::from_micros(200));
                }
            }
        });
        Recorder {
            addr,
            flights,
            stop,
        }
    }

    /// Sends each recorded connection again from a new address, and never
    /// answers the gateway: a replay, whose handshake cannot complete.
    fn replay(&self, gateway: std::net::SocketAddr) -> usize {
        let flights = self.flights.lock().unwrap().clone();
        let mut sockets = Vec::new();
        for f in &flights {
            let s = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
            s.connect(gateway).unwrap();
            for d in f {
                s.send(d).unwrap();
            }
            sockets.push(s);
        }
        // Long enough for the gateway to take what came in early data.
        std::thread::sleep(Duration::from_millis(1500));
        flights.len()
    }
}

impl Drop for Recorder {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
    }
}

#[test]
fn zero_rtt_clicks_are_taken_early_batches_get_425_and_replays_get_nothing() {
    // loadgen's quinn client through a relay that adds a 30 ms round trip
    // and records every datagram: a new connection per request, each after
    // the first resuming and sending its request in 0-RTT, which reaches
    // the gateway before the handshake can complete. Clicks are taken;
    // batches are answered 425. Every recorded connection is then replayed
    // from another address, as an attacker on the path could: a session
    // opens early data once, so the replays get none and count nothing.
    let (mut g, port, certs) = start_h3(&[]);
    let gateway: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let relay = Recorder::start(gateway);
    let loadgen = test_support::process::bin("loadgen");
    let out = Command::new(&loadgen)
        .args(["run", "--proto", "h3", "--no-keepalive", "--zero-rtt"])
        .args(["--target", &relay.addr.to_string(), "--cpus", "0"])
        .args(["--connections", "1", "--requests", "60", "--duration", "30"])
        .args(["--warmup", "0", "--pool", "1000", "--late-rate", "0.3"])
        .arg("--ca")
        .arg(certs.path().join("gw.pem"))
        .arg("--keys")
        .arg(g.keys_path())
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let statuses = text.lines().find(|l| l.starts_with("statuses:")).unwrap();
    assert!(
        statuses.contains("timeout=0 reset=0"),
        "{statuses}\n{}",
        g.log()
    );
    let m = g.metrics();
    let zero_rtt = metric(&m, "clickgate_h3_early_data_requests_total");
    // Not every one: a connection closed at its answer can miss the tickets
    // that follow a round trip later, and a ticket opens early data once.
    assert!(
        zero_rtt >= 20,
        "{zero_rtt} of 60 requests in 0-RTT\n{statuses}"
    );
    let too_early = metric(&m, "clickgate_drops_total{reason=\"too_early\"}");
    assert!(too_early > 0, "{statuses}");
    assert!(statuses.contains(&format!("425={too_early}")), "{statuses}");
    let before = totals(&g.inspect(false));
    assert!(
        before.0 + too_early >= 55,
        "{before:?}, {too_early} batches refused"
    );

    let replayed = relay.replay(gateway);
    assert_eq!(replayed, 60);
    let m = g.metrics();
    assert_eq!(
        metric(&m, "clickgate_h3_early_data_requests_total"),
        zero_rtt
    );
    assert_eq!(
        metric(&m, "clickgate_drops_total{reason=\"too_early\"}"),
        too_early
    );
    assert_eq!(totals(&g.inspect(false)), before, "a replay was counted");
    eprintln!("{zero_rtt} of 60 requests in 0-RTT, {too_early} early batches 425; {replayed} replays counted nothing");
    g.signal(libc::SIGTERM);
    assert_eq!(g.wait_exit(Duration::from_secs(20)), Some(0), "{}", g.log());
}

/// Runs tests/tools/h3_hostile.py with one abuse; its JSON line.
fn hostile(port: u16, ca: &std::path::Path, abuse: &str) -> String {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/tools/h3_hostile.py");
    let out = Command::new("python3")
        .arg(script)
        .arg("--port")
        .arg(port.to_string())
        .arg("--cafile")
        .arg(ca)
        .arg(abuse)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{abuse}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn hostile_http3_input_closes_with_the_right_code_and_is_counted() {
    if !ensure_aioquic() {
        eprintln!("SKIPPED: aioquic is not installed and could not be installed");
        return;
    }
    let (g, port, certs) = start_h3(&[]);
    let ca = certs.path().join("gw.pem");
    let cases = [
        ("data-before-headers", 0x105, "H3_FRAME_UNEXPECTED"),
        ("settings-on-request", 0x105, "H3_FRAME_UNEXPECTED"),
        ("dynamic-qpack", 0x200, "QPACK_DECOMPRESSION_FAILED"),
        ("static-index-past", 0x200, "QPACK_DECOMPRESSION_FAILED"),
        ("second-control", 0x103, "H3_STREAM_CREATION_ERROR"),
        ("push-stream", 0x103, "H3_STREAM_CREATION_ERROR"),
    ];
    for (abuse, code, _) in cases {
        let out = hostile(port, &ca, abuse);
        assert!(
            out.contains("\"closed\": true") && out.contains(&format!("\"error_code\": {code},")),
            "{abuse}: {out}\n{}",
            g.log()
        );
    }
    // Datagrams of random bytes are dropped; the next client is served.
    let out = hostile(port, &ca, "garbage");
    assert!(out.contains("\"status\": 200"), "{out}");
    let m = g.metrics();
    for (name, n) in [
        ("H3_FRAME_UNEXPECTED", 2),
        ("QPACK_DECOMPRESSION_FAILED", 2),
        ("H3_STREAM_CREATION_ERROR", 2),
    ] {
        assert_eq!(
            metric(&m, &format!("clickgate_h3_errors_total{{code=\"{name}\"}}")),
            n,
            "{name}: {m}"
        );
    }
    assert!(!g.log().contains("panicked"), "{}", g.log());
}
