//! The PoP edge against the real binary: HTTPS (curl and a rustls client:
//! resumption, certificate reload), the PROXY protocol (v1, v2, and haproxy
//! from Debian sending v2), and X-Forwarded-For from trusted proxies.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use common::*;
use rustls::pki_types::{CertificateDer, ServerName};

struct TlsGateway {
    g: Gateway,
    https: std::net::SocketAddr,
    certs: tempfile::TempDir,
    der: CertificateDer<'static>,
}

fn start_tls(listen_extra: &str) -> TlsGateway {
    start_tls_with("", listen_extra)
}

fn start_tls_with(extra: &str, listen_extra: &str) -> TlsGateway {
    let certs = tempfile::tempdir().unwrap();
    let der = CertificateDer::from(write_cert(certs.path(), "gw"));
    let https: std::net::SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let extra = format!(
        "{extra}\n[tls]\ncert_file = \"{0}/gw.pem\"\nkey_file = \"{0}/gw.key\"\n",
        certs.path().display()
    );
    let g = Gateway::start_listen(&extra, &format!("https = \"{https}\"\n{listen_extra}"));
    TlsGateway {
        g,
        https,
        certs,
        der,
    }
}

fn client_config(trust: &CertificateDer<'static>, tls12: bool) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(trust.clone()).unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let versions: &[&rustls::SupportedProtocolVersion] = if tls12 {
        &[&rustls::version::TLS12]
    } else {
        &[&rustls::version::TLS13]
    };
    let mut c = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(versions)
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    c.alpn_protocols = vec![b"http/1.1".to_vec()];
    Arc::new(c)
}

type Tls = rustls::StreamOwned<rustls::ClientConnection, TcpStream>;

fn tls_connect(addr: std::net::SocketAddr, config: &Arc<rustls::ClientConfig>) -> Tls {
    tls_connect_after(addr, config, b"")
}

/// A TLS connection that first sends `prefix` in clear (a PROXY header).
fn tls_connect_after(
    addr: std::net::SocketAddr,
    config: &Arc<rustls::ClientConfig>,
    prefix: &[u8],
) -> Tls {
    let mut tcp = TcpStream::connect(addr).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    tcp.write_all(prefix).unwrap();
    let conn =
        rustls::ClientConnection::new(config.clone(), ServerName::try_from("localhost").unwrap())
            .unwrap();
    let mut s = rustls::StreamOwned::new(conn, tcp);
    while s.conn.is_handshaking() {
        s.conn.complete_io(&mut s.sock).unwrap();
    }
    s
}

fn tls_get(s: &mut Tls, target: &str) -> Response {
    s.write_all(format!("GET {target} HTTP/1.1\r\nHost: localhost\r\n\r\n").as_bytes())
        .unwrap();
    read_response(s).unwrap()
}

#[test]
fn https_clicks_with_curl_and_resumed_sessions_on_tls_13_and_12() {
    let t = start_tls("");
    let url = format!("https://localhost:{}{}", t.https.port(), click("tls-curl"));
    let out = Command::new("curl")
        .args([
            "-s",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code} %{redirect_url} %{http_version}",
        ])
        .arg("--cacert")
        .arg(t.certs.path().join("gw.pem"))
        .arg("--resolve")
        .arg(format!("localhost:{}:127.0.0.1", t.https.port()))
        .arg(&url)
        .output()
        .expect("curl runs");
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert_eq!(
        text,
        "302 https://shop.example/landing?item=7&ref=ad 1.1",
        "curl: {}",
        String::from_utf8_lossy(&out.stderr)
    );

    for (tls12, prefix) in [(false, "r13"), (true, "r12")] {
        let config = client_config(&t.der, tls12);
        let mut first = tls_connect(t.https, &config);
        let r = tls_get(&mut first, &click(&format!("{prefix}-1")));
        assert_eq!(r.status, 302);
        assert_eq!(r.header("alt-svc"), None, "no HTTP/3 configured");
        // Keep-alive and pipelining work through TLS as they do in clear.
        first
            .write_all(
                format!(
                    "GET {} HTTP/1.1\r\nHost: l\r\n\r\nGET {} HTTP/1.1\r\nHost: l\r\n\r\n",
                    click(&format!("{prefix}-2")),
                    click(&format!("{prefix}-3"))
                )
                .as_bytes(),
            )
            .unwrap();
        assert_eq!(read_response(&mut first).unwrap().status, 302);
        assert_eq!(read_response(&mut first).unwrap().status, 302);
        assert_eq!(
            first.conn.handshake_kind(),
            Some(rustls::HandshakeKind::Full)
        );
        drop(first);
        let mut second = tls_connect(t.https, &config);
        assert_eq!(
            tls_get(&mut second, &click(&format!("{prefix}-4"))).status,
            302
        );
        assert_eq!(
            second.conn.handshake_kind(),
            Some(rustls::HandshakeKind::Resumed),
            "tls12={tls12}: the ticket (or session id) is honoured"
        );
    }
    let m = t.g.metrics();
    assert!(metric(&m, "clickgate_tls_handshakes_total") >= 5, "{m}");
    assert!(metric(&m, "clickgate_tls_resumed_total") >= 2, "{m}");
    let (clicks, _, dups, _) = totals(&t.g.inspect(false));
    assert_eq!((clicks, dups), (9, 0));

    // Plain HTTP on the TLS port: closed, counted; HTTP on its own port is fine.
    let mut s = TcpStream::connect(t.https).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    let mut buf = Vec::new();
    let _ = s.read_to_end(&mut buf);
    assert!(!buf.starts_with(b"HTTP/"), "no HTTP answer on the TLS port");
    assert_eq!(
        metric(
            &t.g.metrics(),
            "clickgate_drops_total{reason=\"tls_error\"}"
        ),
        1
    );
    assert_eq!(t.g.get("/healthz").status, 200);
}

#[test]
fn a_reloaded_certificate_serves_new_connections_and_open_ones_keep_going() {
    let t = start_tls("");
    let old = client_config(&t.der, false);
    let mut open = tls_connect(t.https, &old);
    assert_eq!(tls_get(&mut open, &click("rl-1")).status, 302);

    let new_der = CertificateDer::from(write_cert(t.certs.path(), "gw"));
    assert_ne!(new_der, t.der);
    t.g.signal(libc::SIGHUP);
    std::thread::sleep(Duration::from_millis(400));
    let fresh = tls_connect(t.https, &client_config(&new_der, false));
    assert_eq!(
        fresh.conn.peer_certificates().unwrap()[0],
        new_der,
        "new connections get the new certificate"
    );
    assert_eq!(
        tls_get(&mut open, &click("rl-2")).status,
        302,
        "the connection opened before the reload still answers"
    );
    // A broken pair keeps the running certificate.
    std::fs::write(t.certs.path().join("gw.key"), "not a key").unwrap();
    t.g.signal(libc::SIGHUP);
    std::thread::sleep(Duration::from_millis(400));
    let mut again = tls_connect(t.https, &client_config(&new_der, false));
    assert_eq!(tls_get(&mut again, &click("rl-3")).status, 302);
    assert!(t.g.log().contains("TLS reload failed"));
}

fn proxy_v2(client: [u8; 4]) -> Vec<u8> {
    let mut h = b"\r\n\r\n\0\r\nQUIT\n".to_vec();
    h.extend_from_slice(&[0x21, 0x11, 0, 12]);
    h.extend_from_slice(&client);
    h.extend_from_slice(&[127, 0, 0, 1, 0x30, 0x39, 0x1F, 0x90]);
    h
}

/// A click on a new connection that first sends `header` (a PROXY header).
fn click_after(g: &Gateway, header: &[u8], id: &str) -> std::io::Result<Response> {
    let mut s = TcpStream::connect(g.addr)?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    s.write_all(header)?;
    s.write_all(format!("GET {} HTTP/1.1\r\nHost: t\r\n\r\n", click(id)).as_bytes())?;
    read_response(&mut s)
}

/// Waits until the file at `path` holds `text`.
fn wait_for_line(path: &Path, text: &str, within: Duration) {
    let t = std::time::Instant::now();
    while !std::fs::read_to_string(path)
        .unwrap_or_default()
        .contains(text)
    {
        assert!(
            t.elapsed() < within,
            "no {text:?} in {} within {within:?}",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn events_by_client(g: &Gateway) -> Vec<(String, String)> {
    g.inspect(true)
        .lines()
        .filter(|l| l.starts_with("event "))
        .map(|l| {
            let get = |k: &str| {
                l.split(' ')
                    .find_map(|kv| kv.strip_prefix(&format!("{k}=")))
                    .unwrap()
                    .to_string()
            };
            (get("client"), get("verdict"))
        })
        .collect()
}

#[test]
fn proxy_protocol_addresses_feed_the_velocity_filter() {
    let g = Gateway::start_listen(
        "[traffic]\nvelocity_per_minute_max = 1\n",
        "http_proxy_protocol = true\n",
    );
    let send = |header: &[u8], id: &str| click_after(&g, header, id);
    assert_eq!(send(&proxy_v2([192, 0, 2, 9]), "pp-1").unwrap().status, 302);
    assert_eq!(send(&proxy_v2([192, 0, 2, 9]), "pp-2").unwrap().status, 302);
    let v1 = b"PROXY TCP4 198.51.100.4 127.0.0.1 40000 8080\r\n";
    assert_eq!(send(v1, "pp-3").unwrap().status, 302);
    // No header: closed without an answer, counted.
    assert!(send(b"", "pp-4").is_err());
    assert_eq!(
        metric(
            &g.metrics(),
            "clickgate_drops_total{reason=\"proxy_header_invalid\"}"
        ),
        1
    );
    let mut ev = events_by_client(&g);
    ev.sort();
    assert_eq!(
        ev,
        vec![
            ("192.0.2.9".to_string(), "accepted".to_string()),
            ("192.0.2.9".to_string(), "invalid".to_string()),
            ("198.51.100.4".to_string(), "accepted".to_string()),
        ],
        "the second click of 192.0.2.9 is over velocity; 198.51.100.4 is another client"
    );
}

#[test]
fn proxy_protocol_addresses_feed_the_rate_limiter() {
    // One request per second per client, burst one: the same client behind
    // the balancer is limited, another client is not.
    let g = Gateway::start_listen(
        "[traffic]\nrate_per_s = 1\nrate_burst = 1\n",
        "http_proxy_protocol = true\n",
    );
    let status = |client: [u8; 4], id: &str| click_after(&g, &proxy_v2(client), id).unwrap().status;
    assert_eq!(status([192, 0, 2, 1], "rl-1"), 302);
    assert_eq!(status([192, 0, 2, 1], "rl-2"), 429);
    assert_eq!(status([192, 0, 2, 2], "rl-3"), 302);
}

#[test]
fn forwarded_for_is_believed_from_trusted_proxies_only() {
    let trusted = Gateway::start_listen("", "trusted_proxies = [\"127.0.0.0/8\"]\n");
    let untrusted = Gateway::start_listen("", "trusted_proxies = [\"10.0.0.0/8\"]\n");
    for (g, id) in [(&trusted, "xff-1"), (&untrusted, "xff-2")] {
        let raw = format!(
            "GET {} HTTP/1.1\r\nHost: t\r\nX-Forwarded-For: 6.6.6.6, 203.0.113.8\r\n\r\n",
            click(id)
        );
        assert_eq!(g.request(raw.as_bytes()).unwrap().status, 302);
    }
    assert_eq!(events_by_client(&trusted)[0].0, "203.0.113.8");
    assert_eq!(events_by_client(&untrusted)[0].0, "127.0.0.1");
}

/// Debian's haproxy in front, sending PROXY v2, as a PoP's L4 balancer would.
/// Installs haproxy when missing (the test command runs as root on a fresh
/// box); skipped only where it cannot be installed.
#[test]
fn haproxy_sends_proxy_v2_and_clicks_pass_through() {
    if !ensure_haproxy() {
        eprintln!("SKIPPED: haproxy is not installed and could not be installed");
        return;
    }
    let g = Gateway::start_listen("", "http_proxy_protocol = true\n");
    let dir = tempfile::tempdir().unwrap();
    let front = free_port();
    let cfg = format!(
        "global\n  maxconn 100\ndefaults\n  mode tcp\n  timeout connect 2s\n  timeout client 10s\n  timeout server 10s\n\
         frontend f\n  bind 127.0.0.1:{front}\n  default_backend b\n\
         backend b\n  server gw {} send-proxy-v2\n",
        g.addr
    );
    std::fs::write(dir.path().join("haproxy.cfg"), cfg).unwrap();
    let mut hp = Command::new("haproxy")
        .arg("-f")
        .arg(dir.path().join("haproxy.cfg"))
        .arg("-db")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let addr: std::net::SocketAddr = format!("127.0.0.1:{front}").parse().unwrap();
    let mut ok = 0;
    for i in 0..50 {
        let Ok(mut s) = TcpStream::connect(addr) else {
            std::thread::sleep(Duration::from_millis(100));
            continue;
        };
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let raw = format!(
            "GET {} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n",
            click(&format!("hp-{i}"))
        );
        if s.write_all(raw.as_bytes()).is_ok() {
            if let Ok(r) = read_response(&mut s) {
                assert_eq!(r.status, 302);
                ok += 1;
                if ok == 5 {
                    break;
                }
            }
        }
    }
    let _ = hp.kill();
    let _ = hp.wait();
    assert_eq!(ok, 5, "five clicks through haproxy");
    assert_eq!(
        metric(
            &g.metrics(),
            "clickgate_drops_total{reason=\"proxy_header_invalid\"}"
        ),
        0
    );
    let ev = events_by_client(&g);
    assert_eq!(ev.len(), 5);
    assert!(ev.iter().all(|(c, _)| c == "127.0.0.1"), "{ev:?}");
}

fn ensure_haproxy() -> bool {
    let have = || Command::new("haproxy").arg("-v").output().is_ok();
    if !have() {
        let _ = Command::new(Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/apt-install"))
            .arg("haproxy")
            .status();
    }
    have()
}

/// A rolling restart: the new process binds beside the old one, the old one
/// drains, the new one takes the data directory over. A client making a new
/// connection per click all along gets a 302 for every click, and every 302
/// is in the log once.
#[test]
fn rolling_restart_with_takeover_drops_no_click() {
    // Connections queued on the old listeners move to the new ones when the
    // old ones close (Linux 5.14+); the runbook sets this too.
    if std::fs::write("/proc/sys/net/ipv4/tcp_migrate_req", "1").is_err() {
        eprintln!("SKIPPED: cannot set net.ipv4.tcp_migrate_req (not root?)");
        return;
    }
    let mut old = Gateway::start("[traffic]\nvelocity_per_minute_max = 0\n");
    let addr = old.addr;
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let answered = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    // Eight clients, so that connections are queued on the old listeners
    // when they close.
    let clients: Vec<_> = (0..8)
        .map(|t| {
            let (stop, answered) = (stop.clone(), answered.clone());
            std::thread::spawn(move || {
                let mut acked = Vec::new();
                let mut failed = Vec::new();
                let mut i = 0;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let id = format!("roll-{t}-{i}");
                    i += 1;
                    let raw = format!(
                        "GET {} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n",
                        click(&id)
                    );
                    let r = TcpStream::connect(addr).and_then(|mut s| {
                        s.set_read_timeout(Some(Duration::from_secs(15)))?;
                        s.write_all(raw.as_bytes())?;
                        read_response(&mut s)
                    });
                    match r {
                        Ok(r) if r.status == 302 => acked.push(id),
                        Ok(r) => failed.push(format!("{id}: {}", r.status)),
                        Err(e) => failed.push(format!("{id}: {e}")),
                    }
                    answered.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
                (acked, failed)
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(300));
    let new_log = old.dir.path().join("new.log");
    let mut new = Command::new(env!("CARGO_BIN_EXE_clickgate-gateway"))
        .args(["run", "--takeover", "--config"])
        .arg(old.config_path())
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&new_log).unwrap())
        .spawn()
        .unwrap();
    wait_for_line(
        &new_log,
        "waiting for the data directory",
        Duration::from_secs(20),
    );
    std::thread::sleep(Duration::from_millis(300));
    old.signal(libc::SIGTERM);
    assert_eq!(
        old.wait_exit(Duration::from_secs(20)),
        Some(0),
        "{}",
        old.log()
    );
    let at_old_exit = answered.load(std::sync::atomic::Ordering::Relaxed);
    wait_for_line(&new_log, "ready", Duration::from_secs(40));
    std::thread::sleep(Duration::from_millis(500));
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (mut acked, mut failed) = (Vec::new(), Vec::new());
    for c in clients {
        let (a, f) = c.join().unwrap();
        acked.extend(a);
        failed.extend(f);
    }
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(new.id() as i32, libc::SIGTERM) };
    let st = new.wait().unwrap();
    assert!(
        st.success(),
        "{}",
        std::fs::read_to_string(&new_log).unwrap()
    );
    assert!(failed.is_empty(), "clicks not answered 302: {failed:?}");
    assert!(
        acked.len() > at_old_exit + 100,
        "the new process answered too few: {} of {}",
        acked.len() - at_old_exit,
        acked.len()
    );
    let ins = old.inspect(false);
    let (clicks, _, dups, _) = totals(&ins);
    assert_eq!(
        (clicks, dups),
        (acked.len() as u64, 0),
        "{ins}\n{}",
        std::fs::read_to_string(&new_log).unwrap()
    );
}

/// A real browser: headless Chromium opens a publisher page, clicks the
/// signed ad link (HTTPS), follows the gateway's 302 and lands on the advertiser's
/// page; the click is in the gateway's log once. The screenshot of the
/// landing is kept in target/test-artifacts/.
#[test]
fn a_browser_clicks_a_signed_ad_and_lands_with_the_click_counted() {
    let ensure = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/ensure-browser");
    if !Command::new(ensure).status().unwrap().success() {
        eprintln!("SKIPPED: chromium, chromium-driver or selenium could not be installed");
        return;
    }
    // Over HTTPS, as browsers follow ad links (the dev certificate is
    // self-signed: the browser is told to accept it).
    let t = start_tls("");
    let g = &t.g;
    let pages = free_port();
    let landing = format!("http://127.0.0.1:{pages}/landing?item=7");
    let target = Click {
        click_id: "browser-1",
        redirect: &landing,
        ..Click::default()
    }
    .target();
    let ad_url = format!("https://localhost:{}{target}", t.https.port());
    let artifacts = test_support::artifacts_dir();
    let shot = artifacts.join("browser-click-landing.png");
    let _ = std::fs::remove_file(&shot);
    let out = Command::new("python3")
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/tools/browser_click.py"
        ))
        .args([
            "--port",
            &pages.to_string(),
            "--ad-url",
            &ad_url,
            "--screenshot",
        ])
        .arg(&shot)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains(&format!("\"url\": \"{landing}\"")), "{text}");
    assert!(text.contains("Item 7 at the advertiser's shop"), "{text}");
    assert!(
        std::fs::metadata(&shot).unwrap().len() > 1000,
        "screenshot kept"
    );
    let ins = g.inspect(true);
    assert_eq!(totals(&ins), (1, 0, 0, 0), "{ins}");
    assert!(ins.contains("click_id=browser-1 "), "{ins}");
}

/// The PROXY header comes before TLS on the HTTPS listener; a connection
/// stalled in the PROXY header or in the TLS handshake is closed by the
/// header timeout, as a stalled HTTP request is.
#[test]
fn https_behind_proxy_protocol_and_stalled_handshakes_time_out() {
    let t = start_tls_with(
        "[limits]\nheader_timeout_ms = 1000\n[traffic]\nvelocity_per_minute_max = 1\n",
        "https_proxy_protocol = true\n",
    );
    let config = client_config(&t.der, false);
    let header = b"PROXY TCP4 203.0.113.50 127.0.0.1 40000 443\r\n";
    for id in ["ppt-1", "ppt-2"] {
        let mut s = tls_connect_after(t.https, &config, header);
        assert_eq!(tls_get(&mut s, &click(id)).status, 302);
    }
    let mut ev = events_by_client(&t.g);
    ev.sort();
    assert_eq!(
        ev,
        vec![
            ("203.0.113.50".to_string(), "accepted".to_string()),
            ("203.0.113.50".to_string(), "invalid".to_string()),
        ],
        "the address from the PROXY header, before TLS, is the client"
    );

    let stalled = |bytes: &[u8]| {
        let mut s = TcpStream::connect(t.https).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        s.write_all(bytes).unwrap();
        let started = std::time::Instant::now();
        let mut buf = [0u8; 64];
        // Closed: EOF or a reset, well before the 10 s read timeout.
        loop {
            match s.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            }
        }
        started.elapsed()
    };
    // Half a PROXY header.
    assert!(stalled(b"PROXY TCP4 203.0.") < Duration::from_secs(5));
    // A whole PROXY header, then five bytes of a TLS record header.
    let mut half_hello = header.to_vec();
    half_hello.extend_from_slice(&[0x16, 0x03, 0x01, 0x02, 0x00]);
    assert!(stalled(&half_hello) < Duration::from_secs(5));
    assert_eq!(
        metric(
            &t.g.metrics(),
            "clickgate_drops_total{reason=\"header_timeout\"}"
        ),
        2
    );
}
