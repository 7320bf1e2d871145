//! HTTP/3 against the real binary with an independent client (aioquic, from
//! PyPI, installed when missing): the same click, batch and error answers as
//! HTTP/1.1, counted once, Alt-Svc on HTTP/1.1 and HTTPS, and a clean drain.

mod common;

use std::io::Write;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;

fn ensure_aioquic() -> bool {
    let have = || {
        Command::new("python3")
            .args(["-c", "import aioquic"])
            .status()
            .is_ok_and(|s| s.success())
    };
    if !have() {
        // One pip at a time (tests run in parallel).
        let _ = Command::new("flock")
            .args([
                "/tmp/clickgate-pip.lock",
                "python3",
                "-m",
                "pip",
                "install",
                "-q",
                "aioquic",
            ])
            .status();
    }
    have()
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
    assert_eq!(metric(&m, "clickgate_h3_errors_total"), 0, "{}", g.log());

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
