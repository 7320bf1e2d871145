//! The shard's event loop: one thread, pinned, one io_uring, shared nothing.
//!
//! This is the thin shell around [`App`]: it accepts (multishot), receives
//! into each connection's buffer, hands whole requests to the app, and sends
//! the answers, all as io_uring operations submitted in one batch per loop
//! turn. In `sync` mode it also issues one fdatasync per turn for everything
//! appended (group commit) and sends no answer before the sync covering its
//! record completes. See `docs/DESIGN.md`, "The shard".
//!
//! Buffer lifetimes: a receive targets `rbuf[rlen..]` and a send targets
//! `sending[sent..]`; neither Vec is touched (so never reallocated) while its
//! operation is in flight, and a connection's slot is only reused after both
//! have completed. That is the whole safety argument for the pushes below.

use std::io;
use std::os::fd::{AsRawFd, IntoRawFd, RawFd};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use gateway_core::app::{App, Endpoint, State};
use gateway_core::http::{self, Parse, ResponseWriter};
use gateway_core::metrics::DropReason;
use io_uring::{opcode, squeue, types, IoUring};
use rustls::ServerConnection;

use crate::clock::{mono_ms, now_ms};
use crate::config::{Config, DurabilityMode};
use crate::edge::{self, ProxyParse, TrustedProxies};
use crate::log::ShardLog;
use crate::tls::TlsHandle;

const OP_ACCEPT: u64 = 1;
const OP_RECV: u64 = 2;
const OP_SEND: u64 = 3;
const OP_SYNC: u64 = 4;
const OP_TIMER: u64 = 5;
const OP_CANCEL: u64 = 6;
const OP_H3_WAKE: u64 = 7;
const OP_COMMIT_TIMER: u64 = 8;

const TICK_MS: u64 = 50;
/// Once-a-second connection work is done a twentieth of the slots per tick,
/// so that it never comes as one burst: reading slow connections, and
/// checking timeouts (a slowloris's connections, opened together, time out
/// together: closing 1 500 of them in one turn held every other answer for
/// 10-15 ms).
const TICK_PHASES: usize = (1000 / TICK_MS) as usize;
const RBUF_INITIAL: usize = 4096;
const WBUF_INITIAL: usize = 4096;
/// Receive buffer of a TLS or PROXY-protocol connection: a TLS record is at
/// most 16 KiB plus its overhead.
const NBUF_MIN: usize = 17 * 1024;

fn ud(op: u64, slot: usize, gen: u32) -> u64 {
    op << 56 | (slot as u64 & 0xFF_FFFF) << 32 | gen as u64
}

fn ud_parts(u: u64) -> (u64, usize, u32) {
    (u >> 56, ((u >> 32) & 0xFF_FFFF) as usize, u as u32)
}

#[derive(Default)]
struct Conn {
    fd: RawFd,
    gen: u32,
    in_use: bool,
    peer: [u8; 16],
    /// HTTP bytes (plaintext) waiting to be parsed.
    rbuf: Vec<u8>,
    rlen: usize,
    /// Bytes as they came off the socket, when a layer sits below HTTP (a
    /// PROXY header still to read, or TLS); plain connections receive
    /// straight into `rbuf`.
    nbuf: Vec<u8>,
    nlen: usize,
    proxy_pending: bool,
    tls: Option<Box<ServerConnection>>,
    tls_close_sent: bool,
    tls_counted: bool,
    /// Answers not yet handed to a send; they wait for `out_wait` to be durable.
    out: Vec<u8>,
    out_wait: u64,
    /// The bytes of the send in flight (frozen while it is).
    sending: Vec<u8>,
    sent: usize,
    recv_inflight: bool,
    send_inflight: bool,
    /// No more reading: EOF, an error answer, or `Connection: close`.
    read_done: bool,
    closing: bool,
    /// When the bytes of an incomplete request started arriving.
    partial_since_ms: Option<i64>,
    /// The request has been arriving for longer than `slow_read_after_ms`:
    /// read only by the sweep, never armed to wait for the next byte.
    slow: bool,
    /// The sweep asked for one read of what the socket holds.
    slow_read_due: bool,
    last_active_ms: i64,
}

/// The header lines every answer carries: `Date`, formatted once a second,
/// and `Alt-Svc` when HTTP/3 is on.
struct DateCache {
    second: i64,
    line: Vec<u8>,
    alt_svc: Vec<u8>,
}

impl DateCache {
    fn refresh(&mut self, now_ms: i64) {
        let s = now_ms.div_euclid(1000);
        if s != self.second {
            self.second = s;
            self.line.clear();
            self.line.extend_from_slice(b"Date: ");
            self.line
                .extend_from_slice(wire::time::http_date(s).as_bytes());
            self.line.extend_from_slice(b"\r\n");
            self.line.extend_from_slice(&self.alt_svc);
        }
    }
}

/// One listening socket of a shard and how its connections start.
pub struct Listener {
    pub socket: socket2::Socket,
    pub tls: bool,
    pub proxy_protocol: bool,
}

/// The shard's side of its HTTP/3 companion (see [`crate::h3`]).
struct H3Side {
    inbox: crate::h3::Inbox,
    /// Where the eventfd read lands (boxed: the kernel writes it).
    wake_buf: Box<u64>,
    /// The companion has gone (drained): nothing more will come.
    done: bool,
    /// Answers waiting for their record to be durable: (seq, reply, answer).
    waiting: Vec<(u64, tokio::sync::oneshot::Sender<Vec<u8>>, Vec<u8>)>,
}

struct ListenerState {
    fd: Option<RawFd>,
    armed: bool,
    tls: bool,
    proxy_protocol: bool,
}

pub struct ShardLoop {
    ring: IoUring,
    listeners: Vec<ListenerState>,
    /// The certificate (HTTPS), when configured; the config new connections
    /// get, and the version of it that is.
    tls: Option<Arc<TlsHandle>>,
    tls_config: Option<Arc<rustls::ServerConfig>>,
    tls_version: u64,
    trusted_proxies: TrustedProxies,
    proxy_header_max: usize,
    h3: Option<H3Side>,
    conns: Vec<Conn>,
    free: Vec<usize>,
    open: usize,
    app: App<ShardLog>,
    /// Shipped segments older than this may be deleted, ms (`log.retention_s`).
    retention_ms: i64,
    limits: http::Limits,
    country_header: String,
    connections_max: usize,
    rbuf_max: usize,
    pending_output_max: usize,
    header_timeout_ms: i64,
    slow_read_after_ms: i64,
    /// Which twentieth of the slots this tick reads (slow connections) and
    /// checks for timeouts.
    tick_phase: usize,
    idle_timeout_ms: i64,
    drain_timeout_ms: i64,
    mode: DurabilityMode,
    /// Durable writes in flight: (write id, bytes, started). The log owns
    /// the bytes until the write is done.
    syncs: Vec<(u32, usize, Instant)>,
    syncs_max: usize,
    /// `sync` mode: this thread's id and the nice value its ring's io_uring
    /// workers get (`durability.writer_nice`); None when off, or once the
    /// kernel refused it (warned once).
    writer_nice: Option<(i32, i32)>,
    waiters: Vec<(usize, u32)>,
    dirty: Vec<usize>,
    timespec: Box<types::Timespec>,
    /// Group commit pacing (`durability.commit_interval_us`): when the last
    /// durable write started, and the timer that starts the next one.
    commit_interval: Duration,
    commit_batch_bytes: usize,
    last_write_start: Option<Instant>,
    commit_timer: Box<types::Timespec>,
    commit_timer_armed: bool,
    date: DateCache,
    cqes: Vec<(u64, i32, u32)>,
    /// Timers (`last_second_ms`, connection activity, drain deadline) are on
    /// this monotonic clock ([`mono_ms`]), read once per turn.
    last_second_ms: i64,
    mono: i64,
    drain_deadline_ms: Option<i64>,
    /// When a deferred partial was last warned of (monotonic).
    last_partial_warn_ms: i64,
    shard_dir: std::path::PathBuf,
    /// `<shard dir>/durable`: the durable seq, published for the shipper.
    durable_file: Option<std::fs::File>,
    durable_published: u64,
}

impl ShardLoop {
    pub fn new(
        cfg: &Config,
        app: App<ShardLog>,
        tls: Option<Arc<TlsHandle>>,
        listeners: Vec<Listener>,
        h3: Option<crate::h3::Inbox>,
    ) -> io::Result<Self> {
        let entries = 4096;
        let ring = IoUring::builder()
            .setup_single_issuer()
            .setup_coop_taskrun()
            .setup_defer_taskrun()
            .setup_cqsize(entries * 4)
            .build(entries)?;
        let l = &cfg.limits;
        let shard_dir = crate::log::shard_dir(&cfg.data_dir, app.shard as u16);
        let durable_file = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .open(shard_dir.join(wire::layout::DURABLE_FILE))
            .map_err(|e| tracing::error!(error = %e, "cannot publish the durable seq; the shipper will not ship"))
            .ok();
        let (tls_version, tls_config) = match &tls {
            Some(t) => {
                let (v, c) = t.current();
                (v, Some(c))
            }
            None => (0, None),
        };
        let alt_svc = match cfg.listen.http3 {
            Some(a) => format!(
                "Alt-Svc: h3=\":{}\"; ma={}\r\n",
                a.port(),
                cfg.listen.alt_svc_max_age_s
            )
            .into_bytes(),
            None => Vec::new(),
        };
        Ok(Self {
            ring,
            listeners: listeners
                .into_iter()
                .map(|l| ListenerState {
                    fd: Some(l.socket.into_raw_fd()),
                    armed: false,
                    tls: l.tls,
                    proxy_protocol: l.proxy_protocol,
                })
                .collect(),
            tls,
            tls_config,
            tls_version,
            trusted_proxies: TrustedProxies::parse(&cfg.listen.trusted_proxies)
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?,
            proxy_header_max: cfg.listen.proxy_header_bytes_max,
            h3: h3.map(|inbox| H3Side {
                inbox,
                wake_buf: Box::new(0),
                done: false,
                waiting: Vec::new(),
            }),
            conns: Vec::new(),
            free: Vec::new(),
            open: 0,
            app,
            retention_ms: cfg.log.retention_s as i64 * 1000,
            limits: http::Limits {
                header_bytes_max: l.header_bytes_max,
                headers_max: l.headers_max,
                body_bytes_max: l.body_bytes_max,
            },
            country_header: cfg.traffic.country_header.to_ascii_lowercase(),
            connections_max: l.connections_max,
            rbuf_max: l.header_bytes_max + l.body_bytes_max + 8192,
            pending_output_max: l.pending_output_bytes_max,
            header_timeout_ms: l.header_timeout_ms as i64,
            slow_read_after_ms: l.slow_read_after_ms as i64,
            tick_phase: 0,
            idle_timeout_ms: l.idle_timeout_ms as i64,
            drain_timeout_ms: cfg.drain.timeout_ms as i64,
            mode: cfg.durability.mode,
            syncs: Vec::with_capacity(8),
            syncs_max: cfg.durability.syncs_in_flight_max,
            writer_nice: (cfg.durability.mode == DurabilityMode::Sync
                && cfg.durability.writer_nice != 0)
                .then(|| (crate::sys::gettid(), cfg.durability.writer_nice)),
            waiters: Vec::new(),
            dirty: Vec::new(),
            timespec: Box::new(types::Timespec::from(Duration::from_millis(TICK_MS))),
            commit_interval: Duration::from_micros(cfg.durability.commit_interval_us),
            commit_batch_bytes: cfg.durability.commit_batch_bytes,
            last_write_start: None,
            commit_timer: Box::new(types::Timespec::new()),
            commit_timer_armed: false,
            date: DateCache {
                second: -1,
                line: Vec::with_capacity(48),
                alt_svc,
            },
            cqes: Vec::with_capacity(entries as usize * 4),
            last_second_ms: 0,
            mono: mono_ms(),
            drain_deadline_ms: None,
            last_partial_warn_ms: i64::MIN / 2,
            shard_dir,
            durable_file,
            durable_published: u64::MAX,
        })
    }

    /// # Safety
    ///
    /// Every buffer the entry points to must stay valid and unmoved until its
    /// completion arrives (see the module comment for how the loop keeps that).
    unsafe fn push(&mut self, e: squeue::Entry) {
        loop {
            // SAFETY: forwarded from the caller.
            if unsafe { self.ring.submission().push(&e) }.is_ok() {
                return;
            }
            // The submission queue is full: hand it to the kernel and retry.
            if let Err(err) = self.ring.submit() {
                tracing::error!(error = %err, "io_uring submit failed");
            }
        }
    }

    fn arm_accept(&mut self, i: usize) {
        if let Some(fd) = self.listeners[i].fd {
            let e = opcode::AcceptMulti::new(types::Fd(fd))
                .build()
                .user_data(ud(OP_ACCEPT, i, 0));
            // SAFETY: accept writes no user memory (no address buffer).
            unsafe { self.push(e) };
            self.listeners[i].armed = true;
        }
    }

    fn arm_h3_wake(&mut self) {
        let Some(h) = self.h3.as_mut() else { return };
        if h.done {
            return;
        }
        let buf: *mut u64 = &mut *h.wake_buf;
        let e = opcode::Read::new(types::Fd(h.inbox.efd), buf.cast(), 8)
            .build()
            .user_data(ud(OP_H3_WAKE, 0, 0));
        // SAFETY: the boxed u64 lives in self as long as the ring, and is
        // only read after this completion.
        unsafe { self.push(e) };
    }

    /// Answers what the HTTP/3 companion queued, exactly as a TCP request
    /// is answered (see [`crate::h3`]).
    fn on_h3(&mut self, now: i64) {
        let Self {
            h3,
            app,
            limits,
            country_header,
            date,
            trusted_proxies,
            ..
        } = self;
        let Some(h) = h3.as_mut() else { return };
        loop {
            let r = match h.inbox.rx.try_recv() {
                Ok(r) => r,
                Err(crossbeam_channel::TryRecvError::Empty) => break,
                Err(crossbeam_channel::TryRecvError::Disconnected) => {
                    h.done = true;
                    break;
                }
            };
            let mut raw = r.raw;
            let mut out = Vec::with_capacity(512);
            let mut w = ResponseWriter {
                out: &mut out,
                common: &date.line,
            };
            let wait = match http::parse(&mut raw, limits, country_header) {
                Parse::Request(req) => {
                    let client = trusted_proxies.client(r.peer, &raw[req.forwarded_for.clone()]);
                    app.handle(&raw, &req, client, now, &mut w).wait_seq
                }
                Parse::Error(e) => {
                    app.http_error(e, &mut w);
                    0
                }
                Parse::Partial => {
                    app.http_error(http::HttpError::Malformed, &mut w);
                    0
                }
            };
            if wait <= app.durable_seq {
                let _ = r.reply.send(out);
            } else if !app.failed {
                h.waiting.push((wait, r.reply, out));
            }
        }
    }

    /// Sends the HTTP/3 answers whose records are now durable; after a
    /// failed write, drops them all (the companion answers 503).
    fn release_h3(&mut self) {
        let durable = self.app.durable_seq;
        let failed = self.app.failed;
        if let Some(h) = self.h3.as_mut() {
            if failed {
                h.waiting.clear();
                return;
            }
            let mut i = 0;
            while i < h.waiting.len() {
                if h.waiting[i].0 <= durable {
                    let (_, reply, out) = h.waiting.swap_remove(i);
                    let _ = reply.send(out);
                } else {
                    i += 1;
                }
            }
        }
    }

    fn arm_timer(&mut self) {
        let e = opcode::Timeout::new(&*self.timespec)
            .build()
            .user_data(ud(OP_TIMER, 0, 0));
        // SAFETY: the timespec is boxed in self and lives as long as the ring.
        unsafe { self.push(e) };
    }

    /// Runs until drained. Returns the counters' final state via the registry.
    pub fn run(mut self) -> io::Result<()> {
        for i in 0..self.listeners.len() {
            self.arm_accept(i);
        }
        self.arm_timer();
        self.arm_h3_wake();
        let now = now_ms();
        self.date.refresh(now);
        self.mono = mono_ms();
        self.last_second_ms = self.mono;
        loop {
            match self.ring.submit_and_wait(1) {
                Ok(_) => {}
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
                Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {}
                Err(e) => return Err(e),
            }
            let now = now_ms();
            self.mono = mono_ms();
            self.cqes.clear();
            self.cqes.extend(
                self.ring
                    .completion()
                    .map(|c| (c.user_data(), c.result(), c.flags())),
            );
            for i in 0..self.cqes.len() {
                let (u, res, flags) = self.cqes[i];
                self.complete(u, res, flags, now);
            }
            self.after_turn(now);
            if self.finished(self.mono) {
                break;
            }
        }
        self.shutdown(now_ms());
        Ok(())
    }

    fn complete(&mut self, u: u64, res: i32, flags: u32, now: i64) {
        let (op, slot, gen) = ud_parts(u);
        match op {
            OP_ACCEPT => self.on_accept(slot, res, flags),
            OP_RECV | OP_SEND => {
                let c = &mut self.conns[slot];
                assert!(
                    c.in_use && c.gen == gen,
                    "completion for a freed connection"
                );
                if op == OP_RECV {
                    c.recv_inflight = false;
                    self.on_recv(slot, res, now);
                } else {
                    c.send_inflight = false;
                    self.on_send(slot, res);
                }
                self.dirty.push(slot);
            }
            OP_SYNC => self.on_sync(res, gen),
            OP_TIMER => {
                self.on_tick(now);
                self.arm_timer();
            }
            OP_CANCEL => {}
            // after_turn starts the paced write.
            OP_COMMIT_TIMER => self.commit_timer_armed = false,
            OP_H3_WAKE => {
                self.on_h3(now);
                self.arm_h3_wake();
            }
            _ => unreachable!("unknown op {op}"),
        }
    }

    fn on_accept(&mut self, i: usize, res: i32, flags: u32) {
        if !io_uring::cqueue::more(flags) {
            self.listeners[i].armed = false;
        }
        if res < 0 {
            if res == -libc::ECANCELED || self.drain_deadline_ms.is_some() {
                if let Some(fd) = self.listeners[i].fd.take() {
                    // SAFETY: we own the listener fd and nothing uses it now.
                    unsafe { libc::close(fd) };
                }
                return;
            }
            tracing::warn!(shard = self.app.shard, errno = -res, "accept failed");
        } else {
            self.new_conn(i, res);
        }
        if !self.listeners[i].armed && self.drain_deadline_ms.is_none() {
            self.arm_accept(i);
        }
    }

    fn new_conn(&mut self, listener: usize, fd: RawFd) {
        self.app.counters.connections_accepted += 1;
        if self.open >= self.connections_max || self.drain_deadline_ms.is_some() {
            self.app.counters.connections_refused += 1;
            // SAFETY: a fresh fd from accept that nothing else refers to.
            unsafe { libc::close(fd) };
            return;
        }
        let ListenerState {
            tls,
            proxy_protocol,
            ..
        } = self.listeners[listener];
        let tls = if tls {
            let config = self
                .tls_config
                .clone()
                .expect("a TLS listener has a config");
            match ServerConnection::new(config) {
                Ok(mut t) => {
                    // Output is bounded by limits.pending_output_bytes_max,
                    // which stops reading; rustls need not refuse writes.
                    t.set_buffer_limit(None);
                    Some(Box::new(t))
                }
                Err(e) => {
                    tracing::warn!(error = %e, "TLS connection not created");
                    self.app.counters.drop(DropReason::TlsError);
                    // SAFETY: a fresh fd from accept that nothing else refers to.
                    unsafe { libc::close(fd) };
                    return;
                }
            }
        } else {
            None
        };
        let peer = peer_of(fd);
        crate::sys::set_nodelay(fd);
        let slot = match self.free.pop() {
            Some(s) => s,
            None => {
                self.conns.push(Conn::default());
                self.conns.len() - 1
            }
        };
        assert!(slot < 1 << 24);
        let c = &mut self.conns[slot];
        c.fd = fd;
        c.in_use = true;
        c.peer = peer;
        c.rlen = 0;
        if c.rbuf.len() < RBUF_INITIAL {
            c.rbuf.resize(RBUF_INITIAL, 0);
        }
        c.nlen = 0;
        c.proxy_pending = proxy_protocol;
        c.tls = tls;
        c.tls_close_sent = false;
        c.tls_counted = false;
        if c.layered() {
            let n = NBUF_MIN.max(self.proxy_header_max);
            if c.nbuf.len() < n {
                c.nbuf.resize(n, 0);
            }
        }
        c.out.clear();
        c.out.reserve(WBUF_INITIAL);
        c.sending.clear();
        c.sending.reserve(WBUF_INITIAL);
        c.sent = 0;
        c.out_wait = 0;
        c.read_done = false;
        c.closing = false;
        c.partial_since_ms = None;
        c.slow = false;
        c.slow_read_due = false;
        c.last_active_ms = self.mono;
        self.open += 1;
        self.dirty.push(slot);
    }

    fn on_recv(&mut self, slot: usize, res: i32, now: i64) {
        let Self {
            conns,
            app,
            limits,
            country_header,
            date,
            rbuf_max,
            trusted_proxies,
            proxy_header_max,
            slow_read_after_ms,
            ..
        } = self;
        let c = &mut conns[slot];
        if c.closing {
            return;
        }
        if res == -libc::EAGAIN && c.slow {
            // The sweep's read found nothing new.
            return;
        }
        if res <= 0 {
            // EOF or error: finish what is queued, then close.
            c.read_done = true;
            if res < 0 {
                c.closing_soon();
            }
            return;
        }
        c.last_active_ms = self.mono;
        let mut peer_closed = false;
        if c.layered() {
            c.nlen += res as usize;
            match c.unlayer(*rbuf_max, *proxy_header_max) {
                Ok(eof) => peer_closed = eof,
                Err(reason) => {
                    // A TLS error has queued its alert; progress() sends it,
                    // then closes.
                    app.counters.drop(reason);
                    c.read_done = true;
                    return;
                }
            }
            if let Some(t) = &c.tls {
                if !c.tls_counted && !t.is_handshaking() {
                    c.tls_counted = true;
                    app.counters.tls_handshakes += 1;
                    if t.handshake_kind() == Some(rustls::HandshakeKind::Resumed) {
                        app.counters.tls_resumed += 1;
                    }
                }
            }
        } else {
            c.rlen += res as usize;
        }
        let mut start = 0;
        while start < c.rlen && !c.read_done {
            let mut w = ResponseWriter {
                out: &mut c.out,
                common: &date.line,
            };
            match http::parse(&mut c.rbuf[start..c.rlen], limits, country_header) {
                Parse::Partial => break,
                Parse::Request(req) => {
                    let raw = &c.rbuf[start..c.rlen];
                    let client = trusted_proxies.client(c.peer, &raw[req.forwarded_for.clone()]);
                    let o = app.handle(raw, &req, client, now, &mut w);
                    c.out_wait = c.out_wait.max(o.wait_seq);
                    start += req.consumed;
                    if o.close {
                        c.read_done = true;
                    }
                }
                Parse::Error(e) => {
                    app.http_error(e, &mut w);
                    c.read_done = true;
                }
            }
        }
        if start > 0 {
            c.rbuf.copy_within(start..c.rlen, 0);
            c.rlen -= start;
        }
        if peer_closed {
            c.read_done = true;
        }
        if start > 0 {
            // A request was answered: the next one's clock starts now.
            c.partial_since_ms = None;
        }
        c.partial_since_ms = if c.rlen > 0 || c.handshaking() {
            Some(c.partial_since_ms.unwrap_or(self.mono))
        } else {
            None
        };
        c.slow = *slow_read_after_ms > 0
            && c.partial_since_ms
                .is_some_and(|t| self.mono - t >= *slow_read_after_ms);
        // A request larger than the buffer: grow it (never while a receive is
        // in flight; none is now). The parser refuses anything over the limits
        // before the buffer reaches `rbuf_max`.
        if c.rlen == c.rbuf.len() {
            c.grow_rbuf(*rbuf_max);
        }
    }

    fn on_send(&mut self, slot: usize, res: i32) {
        let c = &mut self.conns[slot];
        if res < 0 {
            c.read_done = true;
            c.closing_soon();
            return;
        }
        c.sent += res as usize;
    }

    fn on_sync(&mut self, res: i32, id: u32) {
        let i = self
            .syncs
            .iter()
            .position(|s| s.0 == id)
            .expect("completion for a write that was not in flight");
        let (_, len, started) = self.syncs.swap_remove(i);
        let res = if daemon::faults::fail_durable_write() {
            -libc::EIO
        } else {
            res
        };
        if res < 0 || res as usize != len {
            // The kernel may have dropped the dirty pages: nothing since the
            // last good write can be called durable, now or by a later one.
            tracing::error!(
                shard = self.app.shard,
                result = res,
                bytes = len,
                "durable write failed; shard stops acknowledging"
            );
            self.app.fail();
            self.app.counters.flush_errors += 1;
            for (slot, gen) in std::mem::take(&mut self.waiters) {
                let c = &mut self.conns[slot];
                if c.in_use && c.gen == gen {
                    c.out.clear();
                    c.read_done = true;
                    c.closing_soon();
                    self.dirty.push(slot);
                }
            }
            return;
        }
        self.app
            .counters
            .flush(started.elapsed().as_micros() as u64);
        let seq = self.app.log.write_done(id);
        self.made_durable(seq);
    }

    /// The log is durable through `seq` (in `process` mode: in the page
    /// cache); the connections waiting on it may now be answered.
    fn made_durable(&mut self, seq: u64) {
        self.app.durable_seq = seq;
        daemon::faults::crash_point("gateway_durable_before_answer");
        for w in std::mem::take(&mut self.waiters) {
            self.dirty.push(w.0);
        }
    }

    fn after_turn(&mut self, now: i64) {
        match self.mode {
            DurabilityMode::Process => {
                if self.app.log.last_seq() > self.app.durable_seq && !self.app.failed {
                    match self.app.log.write_now() {
                        Ok(seq) => self.made_durable(seq),
                        Err(e) => {
                            tracing::error!(shard = self.app.shard, error = %e, "log write failed; shard stops acknowledging");
                            self.app.fail();
                            self.app.counters.flush_errors += 1;
                        }
                    }
                }
            }
            DurabilityMode::Sync => {
                // Group commit, pipelined: one buffered write with RWF_DSYNC
                // of everything appended since the previous write, up to
                // `syncs_max` in flight; durability advances over the
                // completed prefix (ShardLog::write_done).
                if self.syncs.len() < self.syncs_max && !self.app.failed && self.commit_due() {
                    if let Some(w) = self.app.log.take_write() {
                        self.last_write_start = Some(Instant::now());
                        let e = opcode::Write::new(types::Fd(w.fd), w.ptr, w.len as u32)
                            .offset(w.offset)
                            .rw_flags(libc::RWF_DSYNC)
                            .build()
                            .user_data(ud(OP_SYNC, 0, w.id));
                        // SAFETY: the log keeps these bytes unchanged until
                        // write_done(w.id), called at this write's completion;
                        // the kernel takes its own file reference at
                        // submission, before any rotation.
                        unsafe { self.push(e) };
                        self.syncs.push((w.id, w.len, Instant::now()));
                    }
                }
            }
        }
        if self.h3.as_ref().is_some_and(|h| !h.waiting.is_empty()) {
            self.release_h3();
        }
        let mut dirty = std::mem::take(&mut self.dirty);
        dirty.sort_unstable();
        dirty.dedup();
        for &slot in &dirty {
            self.progress(slot, now);
        }
        dirty.clear();
        self.dirty = dirty;
    }

    /// Whether the staged bytes may become a durable write now; if not, arms
    /// the timer for when they may (`durability.commit_interval_us`).
    fn commit_due(&mut self) -> bool {
        let staged = self.app.log.staged_bytes();
        if staged == 0 || self.commit_interval.is_zero() || staged >= self.commit_batch_bytes {
            return true;
        }
        let since = self.last_write_start.map_or(Duration::MAX, |t| t.elapsed());
        if since >= self.commit_interval {
            return true;
        }
        if !self.commit_timer_armed {
            *self.commit_timer = types::Timespec::from(self.commit_interval - since);
            let e = opcode::Timeout::new(&*self.commit_timer)
                .build()
                .user_data(ud(OP_COMMIT_TIMER, 0, 0));
            // SAFETY: the timespec is boxed in self and is not changed while
            // this timeout is armed (re-armed only after it fired).
            unsafe { self.push(e) };
            self.commit_timer_armed = true;
        }
        false
    }

    /// Sends what may be sent, reads if it should, closes if it is done.
    fn progress(&mut self, slot: usize, _now: i64) {
        let durable = self.app.durable_seq;
        let pending_max = self.pending_output_max;
        let c = &mut self.conns[slot];
        if !c.in_use {
            return;
        }
        if !c.send_inflight && !c.closing {
            if c.sent == c.sending.len() {
                c.sending.clear();
                c.sent = 0;
                if !c.out.is_empty() {
                    if c.out_wait <= durable {
                        match &mut c.tls {
                            None => std::mem::swap(&mut c.out, &mut c.sending),
                            Some(t) => {
                                use std::io::Write;
                                // Cannot fail: the buffer limit is off.
                                let _ = t.writer().write_all(&c.out);
                                c.out.clear();
                            }
                        }
                        c.out_wait = 0;
                    } else {
                        self.waiters.push((slot, c.gen));
                    }
                }
                if let Some(t) = &mut c.tls {
                    if c.read_done && c.out.is_empty() && !c.tls_close_sent {
                        c.tls_close_sent = true;
                        t.send_close_notify();
                    }
                    // Handshake messages, alerts, tickets and records.
                    while t.wants_write() {
                        if t.write_tls(&mut c.sending).is_err() {
                            break;
                        }
                    }
                }
            }
            if c.sent < c.sending.len() {
                let buf = &c.sending[c.sent..];
                let e = opcode::Send::new(types::Fd(c.fd), buf.as_ptr(), buf.len() as u32)
                    .flags(libc::MSG_NOSIGNAL)
                    .build()
                    .user_data(ud(OP_SEND, slot, c.gen));
                c.send_inflight = true;
                // SAFETY: `sending` is not touched until this send completes.
                unsafe { self.push(e) };
            }
        }
        let c = &mut self.conns[slot];
        let queued = c.out.len() + c.sending.len() - c.sent;
        let room = if c.layered() {
            c.nlen < c.nbuf.len()
        } else {
            c.rlen < c.rbuf.len()
        };
        let may_read = !c.slow || c.slow_read_due;
        if !c.recv_inflight
            && !c.read_done
            && !c.closing
            && queued < pending_max
            && room
            && may_read
        {
            let buf = if c.layered() {
                &mut c.nbuf[c.nlen..]
            } else {
                &mut c.rbuf[c.rlen..]
            };
            // A slow connection's read takes what is there and never waits
            // (MSG_DONTWAIT: io_uring completes it with EAGAIN instead of
            // polling), so its next byte wakes nobody until the next sweep.
            let flags = if c.slow { libc::MSG_DONTWAIT } else { 0 };
            c.slow_read_due = false;
            let e = opcode::Recv::new(types::Fd(c.fd), buf.as_mut_ptr(), buf.len() as u32)
                .flags(flags)
                .build()
                .user_data(ud(OP_RECV, slot, c.gen));
            c.recv_inflight = true;
            // SAFETY: `rbuf` / `nbuf` is not touched (nor resized) until this
            // receive completes.
            unsafe { self.push(e) };
        }
        let c = &mut self.conns[slot];
        let idle_out = c.out.is_empty() && c.sent == c.sending.len() && !c.send_inflight;
        if c.read_done && idle_out && !c.closing {
            c.closing_soon();
        }
        if c.closing && !c.recv_inflight && !c.send_inflight {
            // SAFETY: the fd is ours and no operation refers to it any more.
            unsafe { libc::close(c.fd) };
            c.in_use = false;
            c.closing = false;
            c.gen = c.gen.wrapping_add(1);
            c.out.clear();
            c.sending.clear();
            c.sent = 0;
            c.rlen = 0;
            c.nlen = 0;
            c.tls = None;
            // Give back memory a large request made this connection take.
            if c.rbuf.len() > 64 * 1024 {
                c.rbuf = vec![0; RBUF_INITIAL];
            }
            self.free.push(slot);
            self.open -= 1;
        }
    }

    /// Keeps the io_uring workers that run this shard's durable writes at
    /// `durability.writer_nice` (they come and go with the load).
    fn renice_writers(&mut self) {
        let Some((owner, nice)) = self.writer_nice else {
            return;
        };
        if let Err(e) = crate::sys::renice_io_workers(owner, nice) {
            tracing::warn!(
                shard = self.app.shard,
                nice,
                error = %e,
                "could not set the nice value of the durable writes' io_uring workers \
                 (durability.writer_nice; a negative value needs CAP_SYS_NICE or LimitNICE); \
                 they keep the shard's"
            );
            self.writer_nice = None;
        }
    }

    fn on_tick(&mut self, now: i64) {
        self.date.refresh(now);
        self.app.log.prefault();
        let report = self.app.tick(now, self.mono);
        if let (Some(aside), Some(b)) = (report.stepped_aside, report.buffer) {
            if aside {
                tracing::warn!(
                    shard = self.app.shard,
                    budget_used = format!("{:.1}%", b.share * 100.0),
                    oldest_unshipped_s = b.oldest_unshipped_age_ms / 1000,
                    "unshipped data past log.unready_at_budget_share: /readyz answers 503 so new traffic goes elsewhere; still serving"
                );
            } else {
                tracing::info!(
                    shard = self.app.shard,
                    budget_used = format!("{:.1}%", b.share * 100.0),
                    "unshipped data below log.ready_below_budget_share: ready again"
                );
            }
        }
        if let Some(e) = report.partial_deferred {
            // Once a minute at most: a full disk would otherwise log this
            // every flush interval. Counted every time.
            if self.mono - self.last_partial_warn_ms >= 60_000 {
                self.last_partial_warn_ms = self.mono;
                tracing::warn!(shard = self.app.shard, error = %e, "partial not appended; will retry");
            }
        }
        let draining = self.app.shared.state.get() == State::Draining;
        if draining && self.drain_deadline_ms.is_none() {
            self.drain_deadline_ms = Some(self.mono + self.drain_timeout_ms);
            for i in 0..self.listeners.len() {
                if self.listeners[i].armed {
                    let e = opcode::AsyncCancel::new(ud(OP_ACCEPT, i, 0))
                        .build()
                        .user_data(ud(OP_CANCEL, 0, 0));
                    // SAFETY: no user memory.
                    unsafe { self.push(e) };
                } else if let Some(fd) = self.listeners[i].fd.take() {
                    // SAFETY: our listener, no accept in flight.
                    unsafe { libc::close(fd) };
                }
            }
        }
        if let Some(t) = &self.tls {
            if t.version.load(Ordering::Acquire) != self.tls_version {
                let (v, c) = t.current();
                self.tls_version = v;
                self.tls_config = Some(c);
            }
        }
        self.tick_phase = (self.tick_phase + 1) % TICK_PHASES;
        self.read_slow_conns();
        self.sweep_timeouts(self.mono, draining);
        if self.mono - self.last_second_ms >= 1000 || draining {
            self.last_second_ms = self.mono;
            self.renice_writers();
            if let Some(seq) = wire::layout::read_shipped(&self.shard_dir) {
                let n = self.app.log.recycle(seq, self.retention_ms, now);
                self.app.counters.segments_recycled += n as u64;
            }
        }
        self.app.log.compress_step(now, self.retention_ms);
        let z = self.app.log.compress_stats();
        let c = &mut self.app.counters;
        c.log_compressed_segments = self.app.log.compressed_segments() as u64;
        c.log_compressions = z.segments;
        c.log_compression_failures = z.failures;
        c.log_compress_bytes_in = z.bytes_in;
        c.log_compress_bytes_out = z.bytes_out;
        c.log_compress_cpu_ns = z.cpu_ns;
        self.publish_durable();
        self.app.counters.connections_open = self.open as u64;
        self.app.publish();
    }

    /// Tells the shipper how far the log is durable: one 8-byte pwrite per
    /// tick at most, so shipping waits a tick (50 ms) at worst.
    fn publish_durable(&mut self) {
        let seq = self.app.log.durable_seq();
        if seq == self.durable_published {
            return;
        }
        if let Some(f) = &self.durable_file {
            use std::os::unix::fs::FileExt;
            match f.write_at(&seq.to_le_bytes(), 0) {
                Ok(8) => self.durable_published = seq,
                Ok(_) | Err(_) => self.app.counters.drop(DropReason::DurablePublishFailed),
            }
        }
    }

    /// Reads what a twentieth of the slow connections hold (see
    /// [`TICK_PHASES`]).
    fn read_slow_conns(&mut self) {
        for slot in (self.tick_phase..self.conns.len()).step_by(TICK_PHASES) {
            let c = &mut self.conns[slot];
            if c.in_use && c.slow && !c.recv_inflight && !c.closing {
                c.slow_read_due = true;
                self.app.counters.slow_reads += 1;
                self.dirty.push(slot);
            }
        }
    }

    /// Closes the connections past a timeout among this tick's twentieth of
    /// the slots (all of them when draining): each is checked once a second.
    fn sweep_timeouts(&mut self, now: i64, draining: bool) {
        let (first, step) = if draining {
            (0, 1)
        } else {
            (self.tick_phase, TICK_PHASES)
        };
        for slot in (first..self.conns.len()).step_by(step) {
            let c = &mut self.conns[slot];
            if !c.in_use || c.closing {
                continue;
            }
            let nothing_queued = c.out.is_empty() && c.sent == c.sending.len();
            let header_late = c
                .partial_since_ms
                .is_some_and(|t| now - t > self.header_timeout_ms);
            let idle =
                c.rlen == 0 && nothing_queued && now - c.last_active_ms > self.idle_timeout_ms;
            if header_late {
                self.app.counters.drop(DropReason::HeaderTimeout);
                self.app.counters.request(Endpoint::Other, 408);
                c.closing_soon();
            } else if idle || (draining && c.rlen == 0 && nothing_queued) {
                if idle {
                    self.app.counters.connections_idle_closed += 1;
                }
                c.read_done = true;
                c.closing_soon();
            }
            self.dirty.push(slot);
        }
    }

    fn finished(&self, now: i64) -> bool {
        match self.drain_deadline_ms {
            Some(deadline) => {
                (self.open == 0
                    && self.listeners.iter().all(|l| l.fd.is_none())
                    && self.syncs.is_empty()
                    && self
                        .h3
                        .as_ref()
                        .is_none_or(|h| h.done && h.waiting.is_empty()))
                    || now >= deadline
            }
            None => false,
        }
    }

    fn shutdown(&mut self, now: i64) {
        if !self.app.failed {
            if let Err(e) = self.app.append_partial(now) {
                tracing::warn!(shard = self.app.shard, error = %e, "final partial not written");
            }
            if let Err(e) = self.app.log.sync_now() {
                tracing::error!(shard = self.app.shard, error = %e, "final sync failed");
            } else {
                self.publish_durable();
            }
        }
        self.app.publish();
        tracing::info!(
            shard = self.app.shard,
            last_seq = self.app.log.last_seq(),
            open = self.open,
            "shard drained"
        );
    }
}

impl Conn {
    /// Bytes arrive below HTTP: a PROXY header still to read, or TLS.
    fn layered(&self) -> bool {
        self.proxy_pending || self.tls.is_some()
    }

    /// Still before the first HTTP byte: the PROXY header or the TLS
    /// handshake is incomplete (the header timeout applies).
    fn handshaking(&self) -> bool {
        self.proxy_pending || self.tls.as_ref().is_some_and(|t| t.is_handshaking())
    }

    fn grow_rbuf(&mut self, rbuf_max: usize) -> bool {
        if self.rbuf.len() >= rbuf_max {
            return false;
        }
        let n = (self.rbuf.len() * 2).min(rbuf_max);
        self.rbuf.resize(n, 0);
        true
    }

    /// Takes `nbuf[..nlen]` through the PROXY header and TLS into `rbuf`.
    /// Returns whether the peer closed its side (TLS close_notify), or the
    /// drop reason that ends the connection.
    fn unlayer(&mut self, rbuf_max: usize, proxy_max: usize) -> Result<bool, DropReason> {
        let mut start = 0;
        if self.proxy_pending {
            match edge::parse_proxy(&self.nbuf[..self.nlen], proxy_max) {
                ProxyParse::Partial => return Ok(false),
                ProxyParse::Invalid => return Err(DropReason::ProxyHeaderInvalid),
                ProxyParse::Done { len, client } => {
                    if let Some(a) = client {
                        self.peer = a;
                    }
                    self.proxy_pending = false;
                    start = len;
                }
            }
        }
        let n = self.nlen;
        self.nlen = 0;
        let Some(tls) = self.tls.as_mut() else {
            // Plain HTTP after the PROXY header: what came with it moves over;
            // later bytes are received into rbuf directly.
            let bytes = n - start;
            while self.rbuf.len() - self.rlen < bytes {
                if !self.grow_rbuf(rbuf_max.max(self.rlen + bytes)) {
                    break;
                }
            }
            self.rbuf[self.rlen..self.rlen + bytes].copy_from_slice(&self.nbuf[start..n]);
            self.rlen += bytes;
            return Ok(false);
        };
        let mut input = &self.nbuf[start..n];
        let mut eof = false;
        while !input.is_empty() {
            if tls.read_tls(&mut input).is_err() {
                return Err(DropReason::TlsError);
            }
            if tls.process_new_packets().is_err() {
                return Err(DropReason::TlsError);
            }
            loop {
                if self.rlen == self.rbuf.len() {
                    let rbuf_len = self.rbuf.len();
                    if rbuf_len >= rbuf_max {
                        // Over every limit: the parser answers 413/431.
                        return Ok(eof);
                    }
                    self.rbuf.resize((rbuf_len * 2).min(rbuf_max), 0);
                }
                match std::io::Read::read(&mut tls.reader(), &mut self.rbuf[self.rlen..]) {
                    Ok(0) => {
                        eof = true;
                        break;
                    }
                    Ok(k) => self.rlen += k,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(_) => return Err(DropReason::TlsError),
                }
            }
        }
        Ok(eof)
    }

    /// Shuts the socket down; in-flight operations then complete promptly and
    /// the slot is freed once they have.
    fn closing_soon(&mut self) {
        if !self.closing {
            self.closing = true;
            // SAFETY: shutdown on our own socket; the fd stays open until the
            // in-flight operations have completed.
            unsafe { libc::shutdown(self.fd, libc::SHUT_RDWR) };
        }
    }
}

/// The peer address of a connected socket as IPv6 (IPv4 mapped).
fn peer_of(fd: RawFd) -> [u8; 16] {
    // SAFETY: sockaddr_storage is plain data; getpeername writes at most `len`
    // bytes into it.
    let (storage, ok) = unsafe {
        let mut s: libc::sockaddr_storage = std::mem::zeroed();
        let mut len = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
        let r = libc::getpeername(fd, &mut s as *mut _ as *mut libc::sockaddr, &mut len);
        (s, r == 0)
    };
    if !ok {
        return [0; 16];
    }
    match storage.ss_family as i32 {
        libc::AF_INET => {
            // SAFETY: the family says this is a sockaddr_in.
            let a: &libc::sockaddr_in =
                unsafe { &*(&storage as *const _ as *const libc::sockaddr_in) };
            std::net::Ipv4Addr::from(u32::from_be(a.sin_addr.s_addr))
                .to_ipv6_mapped()
                .octets()
        }
        libc::AF_INET6 => {
            // SAFETY: the family says this is a sockaddr_in6.
            let a: &libc::sockaddr_in6 =
                unsafe { &*(&storage as *const _ as *const libc::sockaddr_in6) };
            a.sin6_addr.s6_addr
        }
        _ => [0; 16],
    }
}

/// Binds one shard's SO_REUSEPORT listener.
pub fn bind_listener(addr: std::net::SocketAddr, backlog: u32) -> io::Result<socket2::Socket> {
    use socket2::{Domain, Protocol, Socket, Type};
    let s = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    s.set_reuse_address(true)?;
    s.set_reuse_port(true)?;
    s.set_nodelay(true)?;
    s.bind(&addr.into())?;
    s.listen(backlog as i32)?;
    let _ = s.as_raw_fd();
    Ok(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn user_data_round_trips() {
        assert_eq!(
            ud_parts(ud(OP_SEND, 0xABCDE, 0xDEADBEEF)),
            (OP_SEND, 0xABCDE, 0xDEADBEEF)
        );
    }
}
