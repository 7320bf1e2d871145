//! HTTPS (tokio-rustls) and HTTP/3 (quinn + h3) load, with the same plan,
//! the same open-loop timetable and the same report as the plain engine
//! ([`crate::engine`]): request k is due at `t0 + k / rate` and its latency
//! is measured from then, so a stalled server shows in every request
//! scheduled during the stall.
//!
//! One current-thread tokio runtime per worker (pinned like the plain
//! workers), one task per connection, one request in flight per connection.
//! The plain engine drives io_uring by hand to be cheaper than wrk; here the
//! cost is dominated by the cryptography, which is the same on either side.

use std::cell::{Cell, RefCell};
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use bytes::{Buf, Bytes};
use hdrhistogram::Histogram;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::time::Instant;

use crate::engine::{batch_verdict, parse_response, Answer, Errors, Plan, WorkerResult};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Proto {
    Https,
    H3,
}

#[derive(Clone)]
pub struct Secure {
    pub proto: Proto,
    pub tls: Arc<rustls::ClientConfig>,
    pub server_name: ServerName<'static>,
    /// h3: send the request in 0-RTT early data when a ticket allows it.
    pub zero_rtt: bool,
    /// h3: move the worker's endpoint to a new local port this often.
    pub rebind_every: Option<Duration>,
}

/// A client config trusting the PEM certificates in `ca` (the gateway's
/// self-signed dev certificate, say), offering `alpn`, with session
/// resumption (tickets, session ids) on or off, and early data (0-RTT) when
/// `early_data`.
pub fn client_config(
    ca: &Path,
    alpn: &[u8],
    resumption: bool,
    early_data: bool,
) -> anyhow::Result<Arc<rustls::ClientConfig>> {
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(ca).with_context(|| format!("--ca {}", ca.display()))? {
        roots.add(c?)?;
    }
    let mut c = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_root_certificates(roots)
    .with_no_client_auth();
    c.alpn_protocols = vec![alpn.to_vec()];
    if !resumption {
        c.resumption = rustls::client::Resumption::disabled();
    }
    c.enable_early_data = early_data;
    Ok(Arc::new(c))
}

struct Stats {
    hist: Histogram<u64>,
    statuses: BTreeMap<u16, u64>,
    errors: Errors,
    answers: Vec<(u32, Answer)>,
    measured_requests: u64,
    measured_completed: u64,
    last_publish: std::time::Instant,
}

#[derive(Clone, Copy)]
struct Ticket {
    req: usize,
    due: Instant,
}

/// Hands out requests: on the timetable (open loop) or as fast as they are
/// taken (closed loop).
struct Dispenser {
    t0: Instant,
    interval: Option<Duration>,
    end: Instant,
    measure_from: Instant,
    max: u64,
    next_k: Cell<u64>,
    pool: usize,
}

impl Dispenser {
    /// The next request this connection should send, waiting for its due
    /// time; None when the run is over.
    async fn next(&self, stats: &RefCell<Stats>) -> Option<Ticket> {
        let k = self.next_k.get();
        if k >= self.max {
            return None;
        }
        let due = match self.interval {
            Some(iv) => self.t0 + iv.mul_f64(k as f64),
            None => Instant::now(),
        };
        if due >= self.end {
            return None;
        }
        self.next_k.set(k + 1);
        if due >= self.measure_from {
            stats.borrow_mut().measured_requests += 1;
        }
        tokio::time::sleep_until(due).await;
        Some(Ticket {
            req: (k % self.pool as u64) as usize,
            due,
        })
    }
}

pub fn run_worker(plan: &Plan, requests: &[Vec<u8>], s: &Secure) -> anyhow::Result<WorkerResult> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let local = tokio::task::LocalSet::new();
    local.block_on(
        &rt,
        run(plan.clone(), Rc::new(requests.to_vec()), s.clone()),
    )
}

async fn run(plan: Plan, requests: Rc<Vec<Vec<u8>>>, s: Secure) -> anyhow::Result<WorkerResult> {
    let stats = Rc::new(RefCell::new(Stats {
        hist: Histogram::<u64>::new_with_bounds(1_000, 60_000_000_000, 3)?,
        statuses: BTreeMap::new(),
        errors: Errors::default(),
        answers: Vec::new(),
        measured_requests: 0,
        measured_completed: 0,
        last_publish: std::time::Instant::now(),
    }));
    let t0 = Instant::now();
    let measure_from = t0 + plan.warmup;
    let end = measure_from + plan.duration;
    let disp = Rc::new(Dispenser {
        t0,
        interval: plan.rate_per_s.map(|r| Duration::from_secs_f64(1.0 / r)),
        end,
        measure_from,
        max: plan.requests_max.unwrap_or(u64::MAX),
        next_k: Cell::new(0),
        pool: requests.len(),
    });
    let endpoint = match s.proto {
        Proto::H3 => {
            let bind: SocketAddr = if plan.addr.is_ipv4() {
                "0.0.0.0:0".parse()?
            } else {
                "[::]:0".parse()?
            };
            let mut e = quinn::Endpoint::client(bind)?;
            let crypto = quinn::crypto::rustls::QuicClientConfig::try_from((*s.tls).clone())?;
            e.set_default_client_config(quinn::ClientConfig::new(Arc::new(crypto)));
            if let Some(every) = s.rebind_every {
                // Every connection of the endpoint moves at once: the
                // server sees each one's datagrams from a new port.
                let e = e.clone();
                tokio::task::spawn_local(async move {
                    let mut tick = tokio::time::interval_at(Instant::now() + every, every);
                    while Instant::now() < end {
                        tick.tick().await;
                        match std::net::UdpSocket::bind(bind) {
                            Ok(s) => {
                                if let Err(err) = e.rebind(s) {
                                    eprintln!("loadgen: rebinding the h3 endpoint: {err}");
                                }
                            }
                            Err(err) => eprintln!("loadgen: binding a new h3 port: {err}"),
                        }
                    }
                });
            }
            Some(e)
        }
        Proto::Https => None,
    };
    let mut tasks = Vec::new();
    for _ in 0..plan.connections {
        let (plan, requests, s, stats, disp, endpoint) = (
            plan.clone(),
            requests.clone(),
            s.clone(),
            stats.clone(),
            disp.clone(),
            endpoint.clone(),
        );
        tasks.push(tokio::task::spawn_local(async move {
            let mut conn: Option<Conn> = None;
            while let Some(t) = disp.next(&stats).await {
                let result = tokio::time::timeout(plan.timeout, async {
                    if conn.is_none() {
                        conn = Some(
                            Conn::open(&plan, &s, endpoint.as_ref())
                                .await
                                .map_err(|e| (Fail::Connect, e))?,
                        );
                    }
                    let c = conn.as_mut().expect("just opened");
                    c.exchange(&requests[t.req], &plan.addr)
                        .await
                        .map_err(|e| (Fail::Reset, e))
                })
                .await;
                let now = Instant::now();
                {
                    let mut st = stats.borrow_mut();
                    let answer = match result {
                        Ok(Ok((status, body))) => {
                            *st.statuses.entry(status).or_insert(0) += 1;
                            if t.due >= measure_from && t.due < end {
                                let ns = now.duration_since(t.due).as_nanos() as u64;
                                st.hist.saturating_record(ns.max(1_000));
                                st.measured_completed += 1;
                            }
                            if status == 200 && requests[t.req].starts_with(b"POST") {
                                Answer::BatchItem(batch_verdict(&body))
                            } else {
                                Answer::Status(status)
                            }
                        }
                        Ok(Err((kind, _))) => {
                            match kind {
                                Fail::Connect => st.errors.connect += 1,
                                Fail::Reset => st.errors.reset += 1,
                            }
                            conn = None;
                            Answer::Unknown
                        }
                        Err(_) => {
                            st.errors.timeout += 1;
                            conn = None;
                            Answer::Unknown
                        }
                    };
                    if plan.record_answers {
                        st.answers.push((t.req as u32, answer));
                    }
                    if let Some(p) = &plan.progress {
                        let sent = st.statuses.values().sum::<u64>()
                            + st.errors.connect
                            + st.errors.timeout
                            + st.errors.reset;
                        let st = &mut *st;
                        p.publish(
                            &mut st.last_publish,
                            sent,
                            &st.statuses,
                            &st.errors,
                            &st.hist,
                        );
                    }
                }
                if !plan.keepalive {
                    if let Some(c) = conn.take() {
                        c.close().await;
                    }
                }
            }
            if let Some(c) = conn.take() {
                c.close().await;
            }
        }));
    }
    for t in tasks {
        let _ = t.await;
    }
    if let Some(e) = endpoint {
        let _ = tokio::time::timeout(Duration::from_secs(1), e.wait_idle()).await;
    }
    let st = Rc::try_unwrap(stats)
        .map_err(|_| anyhow::anyhow!("a connection task outlived the run"))?
        .into_inner();
    Ok(WorkerResult {
        hist: st.hist,
        measured_requests: st.measured_requests,
        measured_completed: st.measured_completed,
        statuses: st.statuses,
        errors: st.errors,
        answers: st.answers,
        cpu_s: 0.0,
    })
}

#[derive(Debug, Clone, Copy)]
enum Fail {
    Connect,
    Reset,
}

type H3Send = h3::client::SendRequest<h3_quinn::OpenStreams, Bytes>;

enum Conn {
    Https {
        stream: Box<tokio_rustls::client::TlsStream<tokio::net::TcpStream>>,
        buf: Vec<u8>,
    },
    H3 {
        quic: quinn::Connection,
        send: H3Send,
    },
}

impl Conn {
    async fn open(
        plan: &Plan,
        s: &Secure,
        endpoint: Option<&quinn::Endpoint>,
    ) -> anyhow::Result<Conn> {
        match s.proto {
            Proto::Https => {
                let tcp = tokio::net::TcpStream::connect(plan.addr).await?;
                tcp.set_nodelay(true)?;
                let stream = tokio_rustls::TlsConnector::from(s.tls.clone())
                    .connect(s.server_name.clone(), tcp)
                    .await?;
                Ok(Conn::Https {
                    stream: Box::new(stream),
                    buf: vec![0; 16 * 1024],
                })
            }
            Proto::H3 => {
                let endpoint = endpoint.context("no QUIC endpoint")?;
                let name = match &s.server_name {
                    ServerName::DnsName(d) => d.as_ref().to_string(),
                    other => format!("{other:?}"),
                };
                let connecting = endpoint.connect(plan.addr, &name)?;
                // With a ticket that allows it, the request goes out in the
                // first flight (0-RTT); otherwise after the handshake.
                let quic = match s.zero_rtt {
                    true => match connecting.into_0rtt() {
                        Ok((quic, _accepted)) => quic,
                        Err(connecting) => connecting.await?,
                    },
                    false => connecting.await?,
                };
                let (mut driver, send) =
                    h3::client::new(h3_quinn::Connection::new(quic.clone())).await?;
                tokio::task::spawn_local(async move {
                    let _ = std::future::poll_fn(|cx| driver.poll_close(cx)).await;
                });
                Ok(Conn::H3 { quic, send })
            }
        }
    }

    /// Sends one HTTP/1.1-formed request and reads its answer.
    async fn exchange(&mut self, req: &[u8], addr: &SocketAddr) -> anyhow::Result<(u16, Vec<u8>)> {
        match self {
            Conn::Https { stream, buf } => {
                stream.write_all(req).await?;
                let mut len = 0;
                loop {
                    if len == buf.len() {
                        buf.resize(buf.len() * 2, 0);
                    }
                    let n = stream.read(&mut buf[len..]).await?;
                    anyhow::ensure!(n > 0, "connection closed");
                    len += n;
                    match parse_response(&buf[..len]) {
                        Some(Ok((status, total, body))) => {
                            anyhow::ensure!(total == len, "more than one answer");
                            return Ok((status, body.to_vec()));
                        }
                        Some(Err(())) => anyhow::bail!("malformed answer"),
                        None => {}
                    }
                }
            }
            Conn::H3 { send, .. } => {
                let (head, body) = to_h3(req, addr)?;
                let mut stream = send.send_request(head).await?;
                if !body.is_empty() {
                    stream.send_data(body).await?;
                }
                stream.finish().await?;
                let resp = stream.recv_response().await?;
                let mut out = Vec::new();
                while let Some(mut chunk) = stream.recv_data().await? {
                    while chunk.has_remaining() {
                        let c = chunk.chunk();
                        out.extend_from_slice(c);
                        let n = c.len();
                        chunk.advance(n);
                    }
                }
                Ok((resp.status().as_u16(), out))
            }
        }
    }

    async fn close(self) {
        match self {
            Conn::Https { mut stream, .. } => {
                let _ = stream.shutdown().await;
            }
            Conn::H3 { quic, .. } => quic.close(0u32.into(), b""),
        }
    }
}

/// The HTTP/3 form of a request the workload wrote as HTTP/1.1.
fn to_h3(raw: &[u8], addr: &SocketAddr) -> anyhow::Result<(http::Request<()>, Bytes)> {
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut r = httparse::Request::new(&mut headers);
    let head = match r.parse(raw)? {
        httparse::Status::Complete(n) => n,
        httparse::Status::Partial => anyhow::bail!("partial request in the pool"),
    };
    let mut authority = addr.to_string();
    let mut b = http::Request::builder().method(r.method.unwrap_or("GET"));
    for h in r.headers.iter() {
        let n = h.name.to_ascii_lowercase();
        match n.as_str() {
            "host" => authority = String::from_utf8_lossy(h.value).into_owned(),
            "content-length" | "connection" | "transfer-encoding" => {}
            _ => b = b.header(n, h.value),
        }
    }
    let uri = format!("https://{authority}{}", r.path.unwrap_or("/"));
    Ok((b.uri(uri).body(())?, Bytes::copy_from_slice(&raw[head..])))
}

/// `loadgen idle`: `n` HTTP/3 connections, one GET /healthz on each (so
/// both sides' control streams are up), held open for `hold`.
pub fn idle(
    addr: SocketAddr,
    ca: &Path,
    n: usize,
    hold: std::time::Duration,
) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let bind: SocketAddr = if addr.is_ipv4() {
            "0.0.0.0:0".parse()?
        } else {
            "[::]:0".parse()?
        };
        let mut e = quinn::Endpoint::client(bind)?;
        let tls = client_config(ca, b"h3", false, false)?;
        let crypto = quinn::crypto::rustls::QuicClientConfig::try_from((*tls).clone())?;
        let mut cc = quinn::ClientConfig::new(Arc::new(crypto));
        let mut t = quinn::TransportConfig::default();
        // Held longer than any default idle timeout: keep-alives.
        t.keep_alive_interval(Some(std::time::Duration::from_secs(5)));
        cc.transport_config(Arc::new(t));
        e.set_default_client_config(cc);
        let mut held = Vec::with_capacity(n);
        for i in 0..n {
            let conn = e
                .connect(addr, "localhost")?
                .await
                .with_context(|| format!("connection {i}"))?;
            let (mut driver, mut send) =
                h3::client::new(h3_quinn::Connection::new(conn.clone())).await?;
            tokio::spawn(async move {
                let _ = std::future::poll_fn(|cx| driver.poll_close(cx)).await;
            });
            let req = http::Request::get("https://localhost/healthz").body(())?;
            let mut s = send.send_request(req).await?;
            s.finish().await?;
            let r = s.recv_response().await?;
            anyhow::ensure!(
                r.status() == 200,
                "connection {i}: /healthz answered {}",
                r.status()
            );
            while s.recv_data().await?.is_some() {}
            held.push((conn, send));
        }
        println!("open {n}");
        use std::io::Write;
        std::io::stdout().flush()?;
        tokio::time::sleep(hold).await;
        for (c, _) in &held {
            c.close(0u32.into(), b"done");
        }
        e.wait_idle().await;
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pool_request_becomes_an_h3_request() {
        let addr: SocketAddr = "127.0.0.1:8443".parse().unwrap();
        let raw = b"POST /api/v1/events HTTP/1.1\r\nHost: gw:8443\r\nUser-Agent: lg\r\nContent-Length: 3\r\nConnection: keep-alive\r\n\r\nabc";
        let (r, body) = to_h3(raw, &addr).unwrap();
        assert_eq!(r.method(), http::Method::POST);
        assert_eq!(r.uri().to_string(), "https://gw:8443/api/v1/events");
        assert_eq!(r.headers()["user-agent"], "lg");
        assert!(r.headers().get("content-length").is_none());
        assert_eq!(&body[..], b"abc");
    }
}
