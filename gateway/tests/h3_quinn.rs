//! HTTP/3 against the real binary with quinn's client (h3 over h3-quinn):
//! a client whose address changes keeps its connection, its datagrams
//! steered to the owning shard by the kernel or, without the steering
//! program, handed over by the shard they reach; the connection cap refuses
//! cleanly; a drain ends open connections with H3_NO_ERROR and loses no
//! answered click.

mod common;

use std::net::{SocketAddr, UdpSocket};
use std::sync::Arc;
use std::time::Duration;

use bytes::Buf;
use common::*;
use rustls::pki_types::pem::PemObject;

fn client(ca: &std::path::Path) -> quinn::Endpoint {
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls::pki_types::CertificateDer::pem_file_iter(ca).unwrap() {
        roots.add(c.unwrap()).unwrap();
    }
    let mut c = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(&[&rustls::version::TLS13])
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    c.alpn_protocols = vec![b"h3".to_vec()];
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(c).unwrap();
    let mut e = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    e.set_default_client_config(quinn::ClientConfig::new(Arc::new(crypto)));
    e
}

type Send = h3::client::SendRequest<h3_quinn::OpenStreams, bytes::Bytes>;

async fn open(e: &quinn::Endpoint, port: u16) -> anyhow::Result<(quinn::Connection, Send)> {
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let conn = e.connect(addr, "localhost")?.await?;
    let (mut driver, send) = h3::client::new(h3_quinn::Connection::new(conn.clone())).await?;
    tokio::spawn(async move {
        let _ = std::future::poll_fn(|cx| driver.poll_close(cx)).await;
    });
    Ok((conn, send))
}

/// GETs `target`; the status and the Location.
async fn get(send: &mut Send, target: &str) -> anyhow::Result<(u16, Option<String>)> {
    let req = http::Request::get(format!("https://localhost{target}")).body(())?;
    let mut s = send.send_request(req).await?;
    s.finish().await?;
    let resp = s.recv_response().await?;
    while let Some(mut b) = s.recv_data().await? {
        b.advance(b.remaining());
    }
    let loc = resp
        .headers()
        .get("location")
        .map(|v| v.to_str().unwrap().to_string());
    Ok((resp.status().as_u16(), loc))
}

fn start(cpus: &str, limits: &str) -> (Gateway, u16, tempfile::TempDir) {
    start_listen(cpus, limits, "")
}

fn start_listen(cpus: &str, limits: &str, listen: &str) -> (Gateway, u16, tempfile::TempDir) {
    let certs = tempfile::tempdir().unwrap();
    write_cert(certs.path(), "gw");
    let port = free_port();
    let extra = format!(
        "cpus = {cpus}\n[tls]\ncert_file = \"{0}/gw.pem\"\nkey_file = \"{0}/gw.key\"\n{limits}",
        certs.path().display()
    );
    let g = Gateway::start_listen_env(
        &extra,
        &format!("https = \"127.0.0.1:{port}\"\nhttp3 = \"127.0.0.1:{port}\"\n{listen}"),
        &[],
    );
    (g, port, certs)
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// Two shards, one connection whose client takes a new port after each of
/// `n` clicks; the gateway's metrics once every click is answered 302.
fn clicks_through_port_changes(listen: &str, n: usize) -> String {
    let (mut g, port, certs) = start_listen("[0, 1]", "", listen);
    let rt = rt();
    let _in = rt.enter();
    let e = client(&certs.path().join("gw.pem"));
    rt.block_on(async {
        let (conn, mut send) = open(&e, port).await.unwrap();
        let id = conn.stable_id();
        for i in 0..n {
            let (status, loc) = get(&mut send, &click(&format!("mig-{i}"))).await.unwrap();
            assert_eq!(status, 302, "click {i}");
            assert_eq!(
                loc.as_deref(),
                Some("https://shop.example/landing?item=7&ref=ad")
            );
            // A NAT rebinding: same connection, new source port.
            e.rebind(UdpSocket::bind("127.0.0.1:0").unwrap()).unwrap();
        }
        assert_eq!(conn.stable_id(), id);
        assert!(conn.close_reason().is_none(), "{:?}", conn.close_reason());
        conn.close(0u32.into(), b"done");
    });
    let m = g.metrics();
    assert_eq!(
        metric(&m, "clickgate_h3_connections_total"),
        1,
        "one connection throughout"
    );
    assert_eq!(metric(&m, "clickgate_h3_stray_datagrams_dropped_total"), 0);
    assert_eq!(
        metric_sum(&m, "clickgate_h3_errors_total"),
        0,
        "{}",
        g.log()
    );
    let (clicks, _, dups, _) = totals(&g.inspect(false));
    assert_eq!((clicks, dups), (n as u64, 0), "every click once");
    g.signal(libc::SIGTERM);
    assert_eq!(g.wait_exit(Duration::from_secs(20)), Some(0), "{}", g.log());
    m
}

#[test]
fn a_client_that_changes_port_keeps_clicking_on_one_connection_across_shards() {
    // Without the kernel's steering, after each new port the SO_REUSEPORT
    // hash picks either shard's socket, so in 24 moves some datagrams reach
    // the shard that does not own the connection (all 24 on one: 2^-24),
    // and it hands them over.
    let m = clicks_through_port_changes("http3_bpf_steering = false\n", 24);
    assert!(
        metric(&m, "clickgate_h3_stray_datagrams_total") > 0,
        "no datagram reached the other shard: {m}"
    );
}

#[test]
fn with_bpf_steering_a_moved_client_s_datagrams_reach_its_shard_directly() {
    // The same 24 moves, steered by the kernel: no datagram lands on the
    // other shard (without the program, all 24 staying put: 2^-24).
    let m = clicks_through_port_changes("", 24);
    assert_eq!(
        metric(&m, "clickgate_h3_stray_datagrams_total"),
        0,
        "handed between shards: {m}"
    );
}

#[test]
fn past_the_connection_cap_new_connections_are_refused_and_counted() {
    let (g, port, certs) = start("[0]", "[limits]\nh3_connections_max = 2\n");
    let rt = rt();
    let _in = rt.enter();
    let e = client(&certs.path().join("gw.pem"));
    rt.block_on(async {
        let (_c1, mut s1) = open(&e, port).await.unwrap();
        let (_c2, mut s2) = open(&e, port).await.unwrap();
        let refused = open(&e, port).await;
        let err = format!("{:#}", refused.err().expect("the third is refused"));
        assert!(err.contains("refused"), "{err}");
        // The two open ones still click.
        assert_eq!(get(&mut s1, &click("cap-1")).await.unwrap().0, 302);
        assert_eq!(get(&mut s2, &click("cap-2")).await.unwrap().0, 302);
    });
    let m = g.metrics();
    assert_eq!(metric(&m, "clickgate_h3_refused_total"), 1, "{m}");
    assert_eq!(metric(&m, "clickgate_h3_connections_total"), 3);
}

#[test]
fn a_drain_ends_open_connections_cleanly_and_keeps_every_answered_click() {
    let (mut g, port, certs) = start("[0]", "");
    let rt = rt();
    let _in = rt.enter();
    let e = client(&certs.path().join("gw.pem"));
    // The request handle is kept: h3's client closes the connection once
    // every handle is dropped.
    let (conn, _send, answered) = rt.block_on(async {
        let (conn, mut send) = open(&e, port).await.unwrap();
        let mut answered = 0;
        for i in 0..20 {
            if get(&mut send, &click(&format!("drain-{i}")))
                .await
                .unwrap()
                .0
                == 302
            {
                answered += 1;
            }
        }
        (conn, send, answered)
    });
    assert_eq!(answered, 20);
    g.signal(libc::SIGTERM);
    // The server says GOAWAY, then closes with H3_NO_ERROR once nothing is
    // in flight.
    let reason = rt.block_on(async {
        tokio::time::timeout(Duration::from_secs(10), conn.closed())
            .await
            .expect("the drain closes the connection")
    });
    match reason {
        quinn::ConnectionError::ApplicationClosed(c) => {
            assert_eq!(u64::from(c.error_code), 0x100, "H3_NO_ERROR");
        }
        other => panic!("closed by {other:?}"),
    }
    assert_eq!(g.wait_exit(Duration::from_secs(20)), Some(0), "{}", g.log());
    let (clicks, _, _, _) = totals(&g.inspect(false));
    assert_eq!(clicks, answered, "every answered click in the log");
}

#[test]
fn closed_connections_leave_the_table_while_an_idle_one_holds_a_long_timer() {
    // An idle connection's next deadline is its idle timeout (a minute);
    // connections that close meanwhile must still get their drain timers,
    // or they stay in the table until the cap refuses everyone.
    let (g, port, certs) = start("[0]", "");
    let rt = rt();
    let _in = rt.enter();
    let e = client(&certs.path().join("gw.pem"));
    let open_now = || metric(&g.metrics(), "clickgate_h3_connections_open");
    rt.block_on(async {
        let (_idle, mut s) = open(&e, port).await.unwrap();
        assert_eq!(get(&mut s, "/healthz").await.unwrap().0, 200);
        tokio::time::sleep(Duration::from_millis(500)).await;
        for i in 0..20 {
            let (c, mut s) = open(&e, port).await.unwrap();
            assert_eq!(
                get(&mut s, &click(&format!("short-{i}"))).await.unwrap().0,
                302
            );
            c.close(0u32.into(), b"done");
            drop(s);
        }
        let t = std::time::Instant::now();
        while open_now() != 1 && t.elapsed() < Duration::from_secs(5) {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert_eq!(open_now(), 1, "closed connections still held after 5 s");
    });
}
