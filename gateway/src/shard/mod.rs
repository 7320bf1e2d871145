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
//!
//! Here: the loop (start, turns, completions, the tick, drain). By concern:
//! `conn` (accept, receive, requests to the app, send, timeouts), `layers`
//! (PROXY and TLS below HTTP), `commit` (group commit and the durable seq),
//! `quic` (QUIC and HTTP/3 on the shard's UDP socket), `date` (the Date
//! line), `ring` (what each completion is).

use std::io;
use std::os::fd::IntoRawFd;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use gateway_core::app::{App, State};
use gateway_core::http;
use io_uring::{opcode, squeue, types, IoUring};

use crate::clock::{mono_ms, now_ms};
use crate::config::{Config, DurabilityMode};
use crate::edge::TrustedProxies;
use crate::log::ShardLog;
use crate::tls::TlsHandle;

mod commit;
mod conn;
mod date;
mod layers;
mod quic;
mod ring;

pub use conn::{bind_listener, Listener};
use conn::{Conn, ListenerState};
use date::DateCache;
pub use quic::QuicSetup;
use ring::{
    push_to, ud, ud_parts, OP_ACCEPT, OP_CANCEL, OP_COMMIT_TIMER, OP_QUIC_TIMER, OP_RECV, OP_SEND,
    OP_STRAY_WAKE, OP_SYNC, OP_TIMER, OP_UDP_RECV, OP_UDP_SEND,
};

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
    quic: Option<quic::Quic>,
    /// The QUIC server config (certificate) new connections get, and its
    /// version.
    h3_config: Option<Arc<crate::h3::ServerConfigSlot>>,
    h3_config_version: u64,
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
        h3: Option<(QuicSetup, Arc<crate::h3::ServerConfigSlot>)>,
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
            h3_config_version: h3.as_ref().map_or(0, |(_, slot)| slot.version()),
            h3_config: h3.as_ref().map(|(_, slot)| slot.clone()),
            quic: h3.map(|(setup, _)| {
                quic::Quic::new(
                    app.shard,
                    setup,
                    gateway_core::h3::Limits {
                        // As before: twice the shard's header limit, so that
                        // the shard, not the QUIC layer, answers 431 for
                        // heads between the two.
                        field_section_max: 2 * l.header_bytes_max,
                        body_bytes_max: l.body_bytes_max,
                    },
                    l.h3_connections_max,
                )
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
        // SAFETY: forwarded from the caller.
        unsafe { push_to(&mut self.ring, &e) }
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
        self.quic_start();
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
            OP_UDP_RECV => self.on_udp_recv(slot, res),
            OP_UDP_SEND => self.on_udp_send(slot, res),
            OP_QUIC_TIMER => self.on_quic_timer(slot),
            OP_STRAY_WAKE => self.on_stray_wake(),
            _ => unreachable!("unknown op {op}"),
        }
    }

    fn after_turn(&mut self, now: i64) {
        // QUIC requests are read here (not in their completions), so their
        // records are committed after, and answers released after that.
        self.quic_turn(now);
        self.commit();
        self.quic_turn(now);
        let mut dirty = std::mem::take(&mut self.dirty);
        dirty.sort_unstable();
        dirty.dedup();
        for &slot in &dirty {
            self.progress(slot, now);
        }
        dirty.clear();
        self.dirty = dirty;
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
        if let Some(slot) = &self.h3_config {
            if slot.version() != self.h3_config_version {
                let (v, c) = slot.current();
                self.h3_config_version = v;
                self.quic_tls_reload(c);
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

    fn finished(&self, now: i64) -> bool {
        match self.drain_deadline_ms {
            Some(deadline) => {
                (self.open == 0
                    && self.listeners.iter().all(|l| l.fd.is_none())
                    && self.syncs.is_empty()
                    && self.quic.as_ref().is_none_or(|q| q.idle()))
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
