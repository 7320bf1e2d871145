//! HTTP/3 (QUIC, quinn + h3) beside each shard.
//!
//! The choice, written down in docs/DESIGN.md ("HTTP/3"): every shard has a
//! companion thread pinned to the shard's core, running a single-threaded
//! tokio runtime with one quinn endpoint on a SO_REUSEPORT UDP socket. The
//! kernel spreads datagrams over the shards' sockets by 4-tuple, so a
//! connection stays with one shard (connection migration is off: a packet
//! from a new address would reach another shard's endpoint). The companion
//! owns no click state: each request is turned into the HTTP/1.1 bytes the
//! shard already parses ([`to_http1`]), handed to the shard over a bounded
//! channel, and the shard answers it with the same parser, limits, endpoints
//! and durability rule as a TCP connection: the answer comes back only once
//! its record is durable. The shard's answer is turned back into an HTTP/3
//! response ([`from_http1`]).
//!
//! The two conversions are pure and tested here; the runtime part is tested
//! against the real binary (tests/h3.rs) with an independent client.

use std::net::SocketAddr;
use std::os::fd::RawFd;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use bytes::{Buf, Bytes};

use gateway_core::app::{Shared, State};

use crate::config::Config;
use crate::tls::TlsHandle;

/// One request from the companion to its shard.
pub struct H3Request {
    /// HTTP/1.1 request bytes, parsed by the shard in place.
    pub raw: Vec<u8>,
    pub peer: [u8; 16],
    /// The shard's HTTP/1.1 answer, sent once durable; dropped (the client
    /// gets 503) when the shard fails.
    pub reply: tokio::sync::oneshot::Sender<Vec<u8>>,
}

/// The shard's end: the queue and the eventfd that wakes its ring.
pub struct Inbox {
    pub rx: crossbeam_channel::Receiver<H3Request>,
    pub efd: RawFd,
}

/// The companion's end.
#[derive(Clone)]
pub struct Outbox {
    tx: crossbeam_channel::Sender<H3Request>,
    efd: RawFd,
}

/// A queue of `capacity` requests and its wake-up eventfd.
pub fn channel(capacity: usize) -> std::io::Result<(Outbox, Inbox)> {
    // SAFETY: eventfd takes no pointers; the result is checked.
    let efd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
    if efd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    let (tx, rx) = crossbeam_channel::bounded(capacity);
    Ok((Outbox { tx, efd }, Inbox { rx, efd }))
}

impl Outbox {
    /// Queues a request and wakes the shard; gives it back when the queue
    /// is full.
    fn send(&self, r: H3Request) -> Result<(), H3Request> {
        self.tx.try_send(r).map_err(|e| e.into_inner())?;
        self.wake();
        Ok(())
    }

    fn wake(&self) {
        Self::wake_fd(self.efd);
    }

    fn wake_fd(efd: RawFd) {
        let one = 1u64;
        // SAFETY: writes 8 bytes from a live u64 to the eventfd; EAGAIN
        // (counter saturated) means the shard is already woken.
        unsafe { libc::write(efd, (&one as *const u64).cast(), 8) };
    }
}

/// Headers not passed to the shard: framing and connection handling are the
/// companion's business in HTTP/3.
/// `early-data` is the companion's to say, never the client's.
const SKIP_REQUEST: &[&str] = &[
    "content-length",
    "transfer-encoding",
    "connection",
    "host",
    "early-data",
];

/// The HTTP/1.1 form of an HTTP/3 request. `declared_len`, when larger than
/// the body (which was cut at the limit), is what Content-Length claims, so
/// the shard answers 413 as it would on TCP.
pub fn to_http1(
    req: &http::Request<()>,
    body: &[u8],
    declared_len: usize,
    early_data: bool,
) -> Vec<u8> {
    let mut raw = Vec::with_capacity(256 + body.len());
    raw.extend_from_slice(req.method().as_str().as_bytes());
    raw.push(b' ');
    let target = req.uri().path_and_query().map_or("/", |p| p.as_str());
    raw.extend_from_slice(target.as_bytes());
    raw.extend_from_slice(b" HTTP/1.1\r\nHost: ");
    raw.extend_from_slice(
        req.uri()
            .authority()
            .map_or("h3", |a| a.as_str())
            .as_bytes(),
    );
    raw.extend_from_slice(b"\r\n");
    for (name, value) in req.headers() {
        if SKIP_REQUEST.contains(&name.as_str()) {
            continue;
        }
        raw.extend_from_slice(name.as_str().as_bytes());
        raw.extend_from_slice(b": ");
        raw.extend_from_slice(value.as_bytes());
        raw.extend_from_slice(b"\r\n");
    }
    if early_data {
        raw.extend_from_slice(b"Early-Data: 1\r\n");
    }
    if declared_len > 0 || req.method() == http::Method::POST {
        raw.extend_from_slice(format!("Content-Length: {declared_len}\r\n").as_bytes());
    }
    raw.extend_from_slice(b"\r\n");
    raw.extend_from_slice(body);
    raw
}

/// The HTTP/3 form of the shard's HTTP/1.1 answer: status, headers (less
/// the connection-level ones HTTP/3 forbids) and body.
pub fn from_http1(raw: &[u8]) -> Option<(http::Response<()>, Bytes)> {
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut resp = httparse::Response::new(&mut headers);
    let head_len = match resp.parse(raw) {
        Ok(httparse::Status::Complete(n)) => n,
        _ => return None,
    };
    let mut b = http::Response::builder().status(resp.code?);
    for h in resp.headers.iter() {
        let n = h.name.to_ascii_lowercase();
        if matches!(
            n.as_str(),
            "connection" | "keep-alive" | "transfer-encoding" | "alt-svc"
        ) {
            continue;
        }
        b = b.header(n, h.value);
    }
    let resp = b.body(()).ok()?;
    Some((resp, Bytes::copy_from_slice(&raw[head_len..])))
}

/// What the companion needs from the config.
#[derive(Clone)]
struct Limits {
    body_bytes_max: usize,
    /// QPACK-decoded header bytes h3 accepts: twice the shard's
    /// `header_bytes_max`, so the shard, not the QUIC layer, answers 431
    /// for heads between the two (the HTTP/1.1 form is a little larger).
    field_section_max: u64,
    header_timeout: Duration,
    connections_max: usize,
    drain_timeout: Duration,
}

/// The UDP socket a shard's endpoint uses, bound before start-up ends so
/// that an address in use fails the start.
pub fn bind(addr: SocketAddr) -> anyhow::Result<std::net::UdpSocket> {
    use socket2::{Domain, Protocol, Socket, Type};
    let s = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    s.set_reuse_port(true)?;
    s.set_nonblocking(true)?;
    // QUIC bursts: a deeper receive queue than the default 208 KiB.
    let _ = s.set_recv_buffer_size(4 << 20);
    s.bind(&addr.into())
        .with_context(|| format!("binding listen.http3 {addr} (UDP)"))?;
    Ok(s.into())
}

/// No stateless tickets, so that rustls resumes from its session cache.
#[derive(Debug)]
struct NoTickets;

impl rustls::server::ProducesTickets for NoTickets {
    fn enabled(&self) -> bool {
        false
    }
    fn lifetime(&self) -> u32 {
        0
    }
    fn encrypt(&self, _: &[u8]) -> Option<Vec<u8>> {
        None
    }
    fn decrypt(&self, _: &[u8]) -> Option<Vec<u8>> {
        None
    }
}

fn server_config(cfg: &Config, tls: &TlsHandle) -> anyhow::Result<quinn::ServerConfig> {
    let mut c = (*tls.current().1).clone();
    // QUIC is TLS 1.3 only; rustls checks that when quinn wraps the config.
    c.alpn_protocols = vec![crate::tls::ALPN_H3.to_vec()];
    if cfg.listen.http3_zero_rtt {
        // QUIC allows 0 (no early data) or all of it (RFC 9001). rustls
        // accepts early data only with stateful resumption: the session is
        // taken from the cache (`tls.session_cache_entries`, shared by every
        // shard) when used, so a ticket opens early data once, and a replay
        // of a client's first flight to this host gets none.
        c.max_early_data_size = u32::MAX;
        c.ticketer = Arc::new(NoTickets);
    } else {
        c.max_early_data_size = 0;
    }
    let crypto = quinn::crypto::rustls::QuicServerConfig::try_from(c)
        .context("the TLS config does not allow TLS 1.3, which QUIC needs")?;
    let mut sc = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    let mut t = quinn::TransportConfig::default();
    t.max_concurrent_bidi_streams(quinn::VarInt::from_u32(
        cfg.limits.h3_streams_per_connection_max,
    ));
    t.max_idle_timeout(Some(
        Duration::from_millis(cfg.limits.idle_timeout_ms)
            .try_into()
            .context("limits.idle_timeout_ms too large for QUIC")?,
    ));
    sc.transport_config(Arc::new(t));
    sc.migration(false);
    Ok(sc)
}

/// Runs shard `shard`'s companion on `cpu` until the gateway drains.
pub fn spawn(
    shard: usize,
    cpu: usize,
    cfg: &Config,
    shared: Arc<Shared>,
    tls: Arc<TlsHandle>,
    socket: std::net::UdpSocket,
    outbox: Outbox,
) -> anyhow::Result<std::thread::JoinHandle<()>> {
    let server = server_config(cfg, &tls)?;
    let limits = Limits {
        body_bytes_max: cfg.limits.body_bytes_max,
        field_section_max: 2 * cfg.limits.header_bytes_max as u64,
        header_timeout: Duration::from_millis(cfg.limits.header_timeout_ms),
        connections_max: cfg.limits.connections_max,
        drain_timeout: Duration::from_millis(cfg.drain.timeout_ms),
    };
    let cfg = cfg.clone();
    Ok(std::thread::Builder::new()
        .name(format!("h3-{shard}"))
        .spawn(move || {
            if let Err(e) = crate::sys::pin_to_cpu(cpu) {
                tracing::warn!(shard, cpu, error = %e, "could not pin the HTTP/3 thread");
            }
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("tokio runtime");
            rt.block_on(serve(
                shard,
                cfg,
                server,
                shared,
                tls,
                socket,
                outbox.clone(),
                limits,
            ));
            // Wake the shard once more: it sees the queue disconnected.
            let efd = outbox.efd;
            drop(outbox);
            Outbox::wake_fd(efd);
            tracing::info!(shard, "HTTP/3 drained");
        })?)
}

#[allow(clippy::too_many_arguments)]
async fn serve(
    shard: usize,
    cfg: Config,
    server: quinn::ServerConfig,
    shared: Arc<Shared>,
    tls: Arc<TlsHandle>,
    socket: std::net::UdpSocket,
    outbox: Outbox,
    limits: Limits,
) {
    let endpoint = match quinn::Endpoint::new(
        quinn::EndpointConfig::default(),
        Some(server),
        socket,
        Arc::new(quinn::TokioRuntime),
    ) {
        Ok(e) => e,
        Err(e) => {
            tracing::error!(shard, error = %e, "HTTP/3 endpoint not started");
            return;
        }
    };
    let open = Arc::new(AtomicUsize::new(0));
    let (drain_tx, drain_rx) = tokio::sync::watch::channel(false);
    let mut tls_version = tls.version.load(Ordering::Acquire);
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    loop {
        tokio::select! {
            incoming = endpoint.accept() => {
                let Some(incoming) = incoming else { break };
                shared.registry.h3_connections.fetch_add(1, Ordering::Relaxed);
                if open.load(Ordering::Relaxed) >= limits.connections_max {
                    shared.registry.h3_refused.fetch_add(1, Ordering::Relaxed);
                    incoming.refuse();
                    continue;
                }
                open.fetch_add(1, Ordering::Relaxed);
                let (open, outbox, shared, limits, drain) =
                    (open.clone(), outbox.clone(), shared.clone(), limits.clone(), drain_rx.clone());
                tokio::spawn(async move {
                    if let Err(e) = connection(incoming, &outbox, &shared, &limits, drain).await {
                        tracing::debug!(error = %format!("{e:#}"), "HTTP/3 connection ended by an error");
                        shared.registry.h3_errors.fetch_add(1, Ordering::Relaxed);
                    }
                    open.fetch_sub(1, Ordering::Relaxed);
                });
            }
            _ = tick.tick() => {
                if shared.state.get() == State::Draining {
                    break;
                }
                let v = tls.version.load(Ordering::Acquire);
                if v != tls_version {
                    tls_version = v;
                    match server_config(&cfg, &tls) {
                        Ok(sc) => endpoint.set_server_config(Some(sc)),
                        Err(e) => tracing::error!(shard, error = %format!("{e:#}"), "HTTP/3 certificate not reloaded"),
                    }
                }
            }
        }
    }
    // Drain: no new connections, GOAWAY on the open ones, let their requests
    // finish within the drain timeout.
    endpoint.set_server_config(None);
    let _ = drain_tx.send(true);
    let deadline = tokio::time::Instant::now() + limits.drain_timeout;
    while open.load(Ordering::Relaxed) > 0 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    endpoint.close(quinn::VarInt::from_u32(0x100), b"draining");
    let _ = tokio::time::timeout(Duration::from_secs(1), endpoint.wait_idle()).await;
}

type H3Conn = h3::server::Connection<h3_quinn::Connection, Bytes>;

async fn connection(
    incoming: quinn::Incoming,
    outbox: &Outbox,
    shared: &Arc<Shared>,
    limits: &Limits,
    mut drain: tokio::sync::watch::Receiver<bool>,
) -> anyhow::Result<()> {
    // With 0-RTT, requests can arrive before the handshake completes. They
    // may be replays (an attacker can resend a client's first flight, and a
    // replayed connection never completes its handshake), so until it is
    // complete each request is passed on with `Early-Data: 1` (RFC 8470).
    let early = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let conn = match incoming.accept()?.into_0rtt() {
        Ok((conn, confirmed)) => {
            // A server may always answer before the handshake completes
            // (0.5-RTT); what it reads before then is the client's 0-RTT.
            early.store(true, Ordering::Release);
            let early = early.clone();
            let timeout = limits.header_timeout;
            tokio::spawn(async move {
                if tokio::time::timeout(timeout, confirmed).await.is_ok() {
                    early.store(false, Ordering::Release);
                }
            });
            conn
        }
        Err(connecting) => tokio::time::timeout(limits.header_timeout, connecting)
            .await
            .context("QUIC handshake timed out")??,
    };
    let peer = match conn.remote_address().ip() {
        std::net::IpAddr::V4(a) => a.to_ipv6_mapped().octets(),
        std::net::IpAddr::V6(a) => a.octets(),
    };
    let quic = conn.clone();
    let mut h3: H3Conn = h3::server::builder()
        .max_field_section_size(limits.field_section_max)
        .build(h3_quinn::Connection::new(conn))
        .await?;
    let mut draining = *drain.borrow();
    loop {
        if draining {
            // GOAWAY: requests already accepted finish; no new ones.
            let _ = h3.shutdown(0).await;
        }
        let next = tokio::select! {
            r = h3.accept() => r,
            _ = drain.changed(), if !draining => {
                draining = true;
                continue;
            }
        };
        match next {
            Ok(Some(resolver)) => {
                let (outbox, shared, limits) = (outbox.clone(), shared.clone(), limits.clone());
                let early = early.clone();
                tokio::spawn(async move {
                    if let Err(e) = request(resolver, peer, &early, &shared, &outbox, &limits).await
                    {
                        tracing::debug!(error = %format!("{e:#}"), "HTTP/3 request ended by an error");
                        shared.registry.h3_errors.fetch_add(1, Ordering::Relaxed);
                    }
                });
            }
            Ok(None) => return Ok(()),
            Err(e) if ended_normally(&e, &quic) => return Ok(()),
            Err(e) => return Err(e.into()),
        }
    }
}

/// The client closed the connection (whatever application code it chose;
/// aioquic sends 0, browsers H3_NO_ERROR) or it went idle: not an error of
/// ours. Read from quinn, whose error kinds are public.
fn ended_normally(e: &h3::error::ConnectionError, conn: &quinn::Connection) -> bool {
    use quinn::ConnectionError as Q;
    e.is_h3_no_error()
        || match conn.close_reason() {
            Some(Q::ApplicationClosed(_) | Q::TimedOut) => true,
            Some(Q::ConnectionClosed(c)) => c.error_code == quinn::TransportErrorCode::NO_ERROR,
            _ => false,
        }
}

async fn request(
    resolver: h3::server::RequestResolver<h3_quinn::Connection, Bytes>,
    peer: [u8; 16],
    early: &std::sync::atomic::AtomicBool,
    shared: &Shared,
    outbox: &Outbox,
    limits: &Limits,
) -> anyhow::Result<()> {
    let deadline = tokio::time::Instant::now() + limits.header_timeout;
    let (req, mut stream) = tokio::time::timeout_at(deadline, resolver.resolve_request())
        .await
        .context("request headers timed out")??;
    let mut body = Vec::new();
    let mut declared = 0usize;
    loop {
        let chunk = tokio::time::timeout_at(deadline, stream.recv_data())
            .await
            .context("request body timed out")??;
        let Some(mut chunk) = chunk else { break };
        declared += chunk.remaining();
        if declared > limits.body_bytes_max {
            // Read no more; the shard answers 413 from the declared length.
            break;
        }
        while chunk.has_remaining() {
            let c = chunk.chunk();
            body.extend_from_slice(c);
            let n = c.len();
            chunk.advance(n);
        }
    }
    // Read once the whole request is in: a request completed before the
    // handshake is early data.
    let early = early.load(Ordering::Acquire);
    if early {
        shared
            .registry
            .h3_early_requests
            .fetch_add(1, Ordering::Relaxed);
    }
    let raw = to_http1(&req, &body, declared, early);
    let (tx, rx) = tokio::sync::oneshot::channel();
    let answer = match outbox.send(H3Request {
        raw,
        peer,
        reply: tx,
    }) {
        Ok(()) => rx.await.ok(),
        Err(_) => None,
    };
    let (resp, body) = match answer.as_deref().and_then(from_http1) {
        Some(x) => x,
        None => (
            http::Response::builder()
                .status(503)
                .header("retry-after", "1")
                .header("content-type", "text/plain; charset=utf-8")
                .body(())?,
            Bytes::from_static(b"service unavailable: the shard is busy or failed\n"),
        ),
    };
    stream.send_response(resp).await?;
    if !body.is_empty() {
        stream.send_data(body).await?;
    }
    stream.finish().await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_request_becomes_the_http1_bytes_the_shard_parses() {
        let req = http::Request::builder()
            .method("GET")
            .uri("https://gw.example/api/v1/clicks?a=1&b=%2F")
            .header("user-agent", "UA")
            .header("x-country", "DE")
            .header("connection", "close")
            .body(())
            .unwrap();
        let mut raw = to_http1(&req, b"", 0, false);
        assert_eq!(
            String::from_utf8(raw.clone()).unwrap(),
            "GET /api/v1/clicks?a=1&b=%2F HTTP/1.1\r\nHost: gw.example\r\nuser-agent: UA\r\nx-country: DE\r\n\r\n"
        );
        let limits = gateway_core::http::Limits {
            header_bytes_max: 8192,
            headers_max: 64,
            body_bytes_max: 100,
        };
        let gateway_core::http::Parse::Request(r) =
            gateway_core::http::parse(&mut raw, &limits, "x-country")
        else {
            panic!("the shard's parser takes it")
        };
        assert_eq!(&raw[r.query.clone()], b"a=1&b=%2F");
        assert_eq!(&raw[r.country.clone().unwrap()], b"DE");
        assert!(!r.early_data);
        // Early data is the companion's to say: a client's own header is
        // dropped, the companion's is what the shard sees.
        let claimed = http::Request::builder()
            .method("GET")
            .uri("https://gw.example/api/v1/clicks?a=1")
            .header("early-data", "1")
            .body(())
            .unwrap();
        for (early, want) in [(false, false), (true, true)] {
            let mut raw = to_http1(&claimed, b"", 0, early);
            let gateway_core::http::Parse::Request(r) =
                gateway_core::http::parse(&mut raw, &limits, "x-country")
            else {
                panic!()
            };
            assert_eq!(r.early_data, want);
        }

        let post = http::Request::builder()
            .method("POST")
            .uri("/api/v1/events")
            .body(())
            .unwrap();
        let mut raw = to_http1(&post, b"{}", 2, false);
        assert!(raw.ends_with(b"Content-Length: 2\r\n\r\n{}"));
        let gateway_core::http::Parse::Request(r) =
            gateway_core::http::parse(&mut raw, &limits, "")
        else {
            panic!()
        };
        assert_eq!(&raw[r.body.clone()], b"{}");
        // A body cut at the limit declares its real length: 413 from the parser.
        let mut raw = to_http1(&post, b"", 5000, false);
        assert_eq!(
            gateway_core::http::parse(&mut raw, &limits, ""),
            gateway_core::http::Parse::Error(gateway_core::http::HttpError::BodyTooLarge)
        );
    }

    #[test]
    fn the_shards_answer_becomes_an_h3_response() {
        let raw = b"HTTP/1.1 302 Found\r\nServer: clickgate\r\nDate: x\r\nAlt-Svc: h3=\":8443\"\r\nConnection: close\r\nLocation: https://a.example/\r\nContent-Length: 0\r\n\r\n";
        let (r, body) = from_http1(raw).unwrap();
        assert_eq!(r.status(), 302);
        assert_eq!(r.headers()["location"], "https://a.example/");
        assert!(r.headers().get("connection").is_none());
        assert!(r.headers().get("alt-svc").is_none());
        assert!(body.is_empty());
        let raw = b"HTTP/1.1 403 Forbidden\r\nContent-Length: 4\r\n\r\nnope";
        let (r, body) = from_http1(raw).unwrap();
        assert_eq!((r.status().as_u16(), &body[..]), (403, &b"nope"[..]));
        assert!(from_http1(b"garbage").is_none());
    }
}
