//! QUIC and HTTP/3 in the shard: `quinn-proto` (sans-I/O) driven by the
//! shard's own ring. Datagrams come in by RecvMsg (several in flight, with
//! GRO: up to 64 KiB of one flow per completion) and leave by SendMsg (with
//! GSO: a connection's burst in one send); timers are ring timeouts; HTTP/3
//! is [`gateway_core::h3`]. A request goes through the same app as a TCP
//! one, and its answer is written to its stream only once its record is
//! durable.
//!
//! Buffer lifetimes: each receive and send slot is boxed, and its buffer,
//! address, iovec, msghdr and control bytes stay untouched while its
//! operation is in flight (a slot goes back to its free list only at its
//! completion).
//!
//! A datagram whose connection ID names another shard (the client's address
//! changed, so the kernel's SO_REUSEPORT hash picked another socket) is
//! handed to that shard over its bounded queue ([`crate::h3::StrayRoutes`]).

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::net::SocketAddr;
use std::os::fd::RawFd;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use gateway_core::app::{App, State};
use gateway_core::h3::{self as h3c, code};
use gateway_core::http::{self, Parse, ResponseWriter};
use io_uring::{opcode, types, IoUring};
use quinn_proto::{
    ConnectionError, ConnectionHandle, DatagramEvent, Dir, Event, StreamEvent, StreamId, VarInt,
};

use super::date::DateCache;
use super::ring::{push_to, ud, OP_QUIC_TIMER, OP_STRAY_WAKE, OP_UDP_RECV, OP_UDP_SEND};
use super::ShardLoop;
use crate::edge::TrustedProxies;
use crate::h3::{Stray, StrayInbox, StrayRoutes};
use crate::log::ShardLog;

/// Receives in flight.
const RECV_SLOTS: usize = 8;
/// One receive's buffer: with GRO, 64 KiB of one flow's datagrams.
const RECV_GRO_BYTES: usize = 64 * 1024;
const RECV_BYTES: usize = 2048;
/// Sends in flight at most; past it transmits wait for a completion.
const SEND_SLOTS_MAX: usize = 512;
/// Datagrams per GSO send (the kernel's limit is 64).
const GSO_SEGMENTS: usize = 10;
/// Ring timeouts for QUIC timers in flight at once.
const TIMER_SLOTS: usize = 4;
/// Control bytes for UDP_GRO (an int) with room to spare.
const CMSG_WORDS: usize = 8;

struct MsgSlot {
    buf: Vec<u8>,
    addr: libc::sockaddr_storage,
    iov: libc::iovec,
    msg: libc::msghdr,
    cmsg: [u64; CMSG_WORDS],
}

impl MsgSlot {
    fn new(bytes: usize) -> Box<Self> {
        Box::new(Self {
            buf: vec![0; bytes],
            // SAFETY: all-zero is a valid sockaddr_storage (a plain C struct).
            addr: unsafe { std::mem::zeroed() },
            // SAFETY: all-zero is a valid iovec (null base, length 0).
            iov: unsafe { std::mem::zeroed() },
            // SAFETY: all-zero is a valid msghdr (null pointers, zero lengths).
            msg: unsafe { std::mem::zeroed() },
            cmsg: [0; CMSG_WORDS],
        })
    }

    /// Points the msghdr at this slot's own fields (the box does not move).
    fn prepare_recv(&mut self) {
        self.iov.iov_base = self.buf.as_mut_ptr().cast();
        self.iov.iov_len = self.buf.len();
        self.msg.msg_name = (&mut self.addr as *mut libc::sockaddr_storage).cast();
        self.msg.msg_namelen = std::mem::size_of::<libc::sockaddr_storage>() as u32;
        self.msg.msg_iov = &mut self.iov;
        self.msg.msg_iovlen = 1;
        self.msg.msg_control = self.cmsg.as_mut_ptr().cast();
        self.msg.msg_controllen = std::mem::size_of_val(&self.cmsg);
        self.msg.msg_flags = 0;
    }

    /// A send of `buf[..len]` to `to`, as datagrams of `segment` bytes
    /// (GSO) when given.
    fn prepare_send(&mut self, len: usize, to: SocketAddr, segment: Option<u16>) {
        let a = socket2::SockAddr::from(to);
        // SAFETY: a SockAddr's storage is a sockaddr_storage of its length.
        unsafe {
            std::ptr::copy_nonoverlapping(
                a.as_ptr().cast::<u8>(),
                (&mut self.addr as *mut libc::sockaddr_storage).cast::<u8>(),
                a.len() as usize,
            )
        };
        self.iov.iov_base = self.buf.as_mut_ptr().cast();
        self.iov.iov_len = len;
        self.msg.msg_name = (&mut self.addr as *mut libc::sockaddr_storage).cast();
        self.msg.msg_namelen = a.len();
        self.msg.msg_iov = &mut self.iov;
        self.msg.msg_iovlen = 1;
        self.msg.msg_flags = 0;
        match segment {
            Some(seg) => {
                let space = std::mem::size_of_val(&self.cmsg);
                self.msg.msg_control = self.cmsg.as_mut_ptr().cast();
                self.msg.msg_controllen = space;
                // SAFETY: the control buffer is 8-aligned and large enough
                // for one cmsg carrying a u16 (CMSG_SPACE(2) = 24 bytes).
                unsafe {
                    let c = libc::CMSG_FIRSTHDR(&self.msg);
                    (*c).cmsg_level = libc::SOL_UDP;
                    (*c).cmsg_type = libc::UDP_SEGMENT;
                    (*c).cmsg_len = libc::CMSG_LEN(2) as usize;
                    std::ptr::write_unaligned(libc::CMSG_DATA(c).cast::<u16>(), seg);
                    self.msg.msg_controllen = libc::CMSG_SPACE(2) as usize;
                }
            }
            None => {
                self.msg.msg_control = std::ptr::null_mut();
                self.msg.msg_controllen = 0;
            }
        }
    }

    /// The sender of a completed receive.
    fn from(&self) -> Option<SocketAddr> {
        // SAFETY: the kernel wrote msg_namelen bytes of address into addr.
        let a = unsafe { socket2::SockAddr::new(self.addr, self.msg.msg_namelen) };
        a.as_socket()
    }

    /// The GRO segment size of a completed receive, if the kernel
    /// coalesced datagrams.
    fn gro_segment(&self) -> Option<usize> {
        // SAFETY: walks the control messages the kernel wrote, within
        // msg_controllen, as the CMSG macros define.
        unsafe {
            let mut c = libc::CMSG_FIRSTHDR(&self.msg);
            while !c.is_null() {
                if (*c).cmsg_level == libc::SOL_UDP && (*c).cmsg_type == libc::UDP_GRO {
                    let v = std::ptr::read_unaligned(libc::CMSG_DATA(c).cast::<libc::c_int>());
                    return (v > 0).then_some(v as usize);
                }
                c = libc::CMSG_NXTHDR(&self.msg, c);
            }
        }
        None
    }
}

/// One HTTP/3 connection.
struct QConn {
    conn: quinn_proto::Connection,
    gen: u32,
    peer: [u8; 16],
    uni: h3c::UniStreams,
    /// Request streams still being read: their bytes so far.
    requests: HashMap<StreamId, Vec<u8>>,
    /// Answer bytes a stream's flow control has not taken yet.
    unsent: Vec<(StreamId, Vec<u8>)>,
    /// Answers waiting for durability.
    waiting: usize,
    /// Our control stream, once opened (SETTINGS, later GOAWAY).
    control: Option<StreamId>,
    goaway_sent: bool,
    /// Highest request stream accepted, for GOAWAY.
    last_request: Option<StreamId>,
    /// The deadline of the timer this connection last asked for.
    timer: Option<Instant>,
    counted_open: bool,
}

/// The connections, by quinn's handle (a dense slab index). Boxed: a
/// quinn connection is kilobytes, and a connection is taken out of the
/// table while it is driven (moving it in and out of a map was 6% of the
/// CPU of a keep-alive load).
#[derive(Default)]
struct ConnTable {
    slots: Vec<Option<Box<QConn>>>,
    len: usize,
}

impl ConnTable {
    fn get(&self, ch: &ConnectionHandle) -> Option<&QConn> {
        self.slots.get(ch.0)?.as_deref()
    }

    fn get_mut(&mut self, ch: &ConnectionHandle) -> Option<&mut QConn> {
        self.slots.get_mut(ch.0)?.as_deref_mut()
    }

    fn remove(&mut self, ch: &ConnectionHandle) -> Option<Box<QConn>> {
        let c = self.slots.get_mut(ch.0)?.take()?;
        self.len -= 1;
        Some(c)
    }

    fn insert(&mut self, ch: ConnectionHandle, c: Box<QConn>) {
        if self.slots.len() <= ch.0 {
            self.slots.resize_with(ch.0 + 1, || None);
        }
        if self.slots[ch.0].replace(c).is_none() {
            self.len += 1;
        }
    }

    fn len(&self) -> usize {
        self.len
    }

    fn keys(&self) -> impl Iterator<Item = ConnectionHandle> + '_ {
        self.slots
            .iter()
            .enumerate()
            .filter(|(_, c)| c.is_some())
            .map(|(i, _)| ConnectionHandle(i))
    }

    fn values(&self) -> impl Iterator<Item = &QConn> + '_ {
        self.slots.iter().filter_map(|c| c.as_deref())
    }
}

/// An answer waiting for its record to be durable.
struct Waiting {
    seq: u64,
    ch: ConnectionHandle,
    gen: u32,
    stream: StreamId,
    frames: Vec<u8>,
}

// Boxed slots: the kernel holds pointers into them while the Vec may grow.
#[allow(clippy::vec_box)]
pub(super) struct Quic {
    fd: RawFd,
    shard: usize,
    endpoint: quinn_proto::Endpoint,
    conns: ConnTable,
    next_gen: u32,
    recv: Vec<Box<MsgSlot>>,
    recv_armed: Vec<bool>,
    send_slots: Vec<Box<MsgSlot>>,
    send_free: Vec<usize>,
    /// A transmit found no free send slot: drive every connection again
    /// when one frees.
    send_starved: bool,
    gro: bool,
    gso: bool,
    timers: BinaryHeap<Reverse<(Instant, usize, u32)>>,
    timer_specs: Vec<Box<types::Timespec>>,
    /// Per timer slot, the deadline of its ring timeout in flight.
    timer_slots: [Option<Instant>; TIMER_SLOTS],
    dirty: Vec<ConnectionHandle>,
    waiting: Vec<Waiting>,
    limits: h3c::Limits,
    connections_max: usize,
    scratch: h3c::Scratch,
    http1: Vec<u8>,
    answer: Vec<u8>,
    qpack: Vec<u8>,
    frames: Vec<u8>,
    tx: Vec<u8>,
    control_start: Vec<u8>,
    strays: StrayInbox,
    routes: StrayRoutes,
    wake_buf: Box<u64>,
    server_config: Arc<quinn_proto::ServerConfig>,
    /// Draining: new connections refused, GOAWAY on the open ones.
    draining: bool,
}

/// What a shard needs to run HTTP/3.
pub struct QuicSetup {
    pub socket: std::net::UdpSocket,
    pub gro: bool,
    pub gso: bool,
    pub server_config: Arc<quinn_proto::ServerConfig>,
    pub endpoint_config: quinn_proto::EndpointConfig,
    pub strays: StrayInbox,
    pub routes: StrayRoutes,
}

impl Quic {
    pub(super) fn new(
        shard: usize,
        setup: QuicSetup,
        limits: h3c::Limits,
        connections_max: usize,
    ) -> Self {
        use std::os::fd::IntoRawFd;
        let endpoint = quinn_proto::Endpoint::new(
            Arc::new(setup.endpoint_config),
            Some(setup.server_config.clone()),
            true,
            None,
        );
        let bytes = if setup.gro {
            RECV_GRO_BYTES
        } else {
            RECV_BYTES
        };
        Self {
            fd: setup.socket.into_raw_fd(),
            shard,
            endpoint,
            conns: ConnTable::default(),
            next_gen: 0,
            recv: (0..RECV_SLOTS).map(|_| MsgSlot::new(bytes)).collect(),
            recv_armed: vec![false; RECV_SLOTS],
            send_slots: Vec::new(),
            send_free: Vec::new(),
            send_starved: false,
            gro: setup.gro,
            gso: setup.gso,
            timers: BinaryHeap::new(),
            timer_specs: (0..TIMER_SLOTS)
                .map(|_| Box::new(types::Timespec::new()))
                .collect(),
            timer_slots: [None; TIMER_SLOTS],
            dirty: Vec::new(),
            waiting: Vec::new(),
            limits,
            connections_max,
            scratch: h3c::Scratch::default(),
            http1: Vec::with_capacity(1024),
            answer: Vec::with_capacity(512),
            qpack: Vec::with_capacity(256),
            frames: Vec::with_capacity(512),
            tx: Vec::with_capacity(64 * 1024),
            control_start: h3c::control_stream_start(&limits),
            strays: setup.strays,
            routes: setup.routes,
            wake_buf: Box::new(0),
            server_config: setup.server_config,
            draining: false,
        }
    }

    /// Whether the shard may stop: every connection closed and no send in
    /// flight.
    pub(super) fn idle(&self) -> bool {
        self.conns.values().all(|c| c.conn.is_closed())
            && self.send_free.len() == self.send_slots.len()
    }

    fn arm_recv(&mut self, ring: &mut IoUring, i: usize) {
        let s = &mut self.recv[i];
        s.prepare_recv();
        let e = opcode::RecvMsg::new(types::Fd(self.fd), &mut s.msg)
            .build()
            .user_data(ud(OP_UDP_RECV, i, 0));
        // SAFETY: the slot is boxed and untouched until this completes.
        unsafe { push_to(ring, &e) };
        self.recv_armed[i] = true;
    }

    fn arm_stray_wake(&mut self, ring: &mut IoUring) {
        let buf: *mut u64 = &mut *self.wake_buf;
        let e = opcode::Read::new(types::Fd(self.strays.efd), buf.cast(), 8)
            .build()
            .user_data(ud(OP_STRAY_WAKE, 0, 0));
        // SAFETY: the boxed u64 lives as long as the ring and is only read
        // after this completion.
        unsafe { push_to(ring, &e) };
    }

    /// Sends `self.tx[..t.size]`; false when no send slot is free.
    fn send(&mut self, ring: &mut IoUring, t: &quinn_proto::Transmit) -> bool {
        let i = match self.send_free.pop() {
            Some(i) => i,
            None if self.send_slots.len() < SEND_SLOTS_MAX => {
                self.send_slots.push(MsgSlot::new(0));
                self.send_slots.len() - 1
            }
            None => {
                self.send_starved = true;
                return false;
            }
        };
        let s = &mut self.send_slots[i];
        s.buf.clear();
        s.buf.extend_from_slice(&self.tx[..t.size]);
        let seg = t.segment_size.filter(|&n| n < t.size).map(|n| n as u16);
        s.prepare_send(t.size, t.destination, seg);
        let e = opcode::SendMsg::new(types::Fd(self.fd), &s.msg)
            .build()
            .user_data(ud(OP_UDP_SEND, i, 0));
        // SAFETY: the slot is boxed and untouched until this completes
        // (it is off the free list until then).
        unsafe { push_to(ring, &e) };
        true
    }
}

/// What handling a request needs from the shard, borrowed apart from the
/// QUIC state.
struct Ctx<'a> {
    app: &'a mut App<ShardLog>,
    limits: &'a http::Limits,
    country_header: &'a str,
    trusted: &'a TrustedProxies,
    date: &'a DateCache,
    now_ms: i64,
}

impl ShardLoop {
    pub(super) fn quic_start(&mut self) {
        let Self { quic, ring, .. } = self;
        let Some(q) = quic.as_mut() else { return };
        for i in 0..RECV_SLOTS {
            q.arm_recv(ring, i);
        }
        q.arm_stray_wake(ring);
    }

    pub(super) fn on_udp_recv(&mut self, slot: usize, res: i32) {
        let now = Instant::now();
        let Self {
            quic, ring, app, ..
        } = self;
        let Some(q) = quic.as_mut() else { return };
        q.recv_armed[slot] = false;
        if res < 0 {
            if res != -libc::ECANCELED {
                tracing::debug!(shard = q.shard, errno = -res, "UDP receive failed");
                q.arm_recv(ring, slot);
            }
            return;
        }
        let s = &q.recv[slot];
        let n = res as usize;
        let from = s.from();
        let seg = if q.gro { s.gro_segment() } else { None }.unwrap_or(n.max(1));
        let mut datagrams: Vec<BytesMut> = Vec::new();
        if from.is_some() {
            let mut at = 0;
            while at < n {
                let end = (at + seg).min(n);
                datagrams.push(BytesMut::from(&s.buf[at..end]));
                at = end;
            }
        }
        q.arm_recv(ring, slot);
        let Some(from) = from else { return };
        for d in datagrams {
            q.datagram(ring, app, d, from, now, true);
        }
    }

    pub(super) fn on_udp_send(&mut self, slot: usize, res: i32) {
        let Some(q) = self.quic.as_mut() else { return };
        if res < 0 {
            // Lost like any datagram: QUIC resends. EIO on a GSO send means
            // the device refuses segmentation: stop asking for it.
            if res == -libc::EIO && q.gso {
                tracing::warn!(
                    shard = q.shard,
                    "UDP GSO send failed; sending datagrams one by one"
                );
                q.gso = false;
            }
            tracing::debug!(shard = q.shard, errno = -res, "UDP send failed");
        }
        q.send_free.push(slot);
        if std::mem::take(&mut q.send_starved) {
            let all: Vec<_> = q.conns.keys().collect();
            q.dirty.extend(all);
        }
    }

    pub(super) fn on_stray_wake(&mut self) {
        let now = Instant::now();
        let Self {
            quic, ring, app, ..
        } = self;
        let Some(q) = quic.as_mut() else { return };
        while let Ok(s) = q.strays.rx.try_recv() {
            q.datagram(ring, app, BytesMut::from(&s.data[..]), s.from, now, false);
        }
        q.arm_stray_wake(ring);
    }

    pub(super) fn on_quic_timer(&mut self, slot: usize) {
        let Some(q) = self.quic.as_mut() else { return };
        q.timer_slots[slot] = None;
        q.expire_timers(Instant::now());
    }

    /// Runs every connection something happened to: its events, requests,
    /// answers and datagrams; then the timer.
    pub(super) fn quic_turn(&mut self, now_ms: i64) {
        let Self {
            quic,
            ring,
            app,
            limits,
            country_header,
            trusted_proxies,
            date,
            ..
        } = self;
        let Some(q) = quic.as_mut() else { return };
        // Every turn (the 50 ms tick included): deadlines past are handled
        // even when no ring timeout was free to cover them.
        q.expire_timers(Instant::now());
        let draining = app.shared.state.get() == State::Draining;
        if draining && !q.draining {
            q.draining = true;
            let all: Vec<_> = q.conns.keys().collect();
            q.dirty.extend(all);
        }
        q.release(app);
        let mut ctx = Ctx {
            app,
            limits,
            country_header,
            trusted: trusted_proxies,
            date,
            now_ms,
        };
        let now = Instant::now();
        while !q.dirty.is_empty() {
            let mut dirty = std::mem::take(&mut q.dirty);
            dirty.sort_unstable_by_key(|c| c.0);
            dirty.dedup();
            for ch in dirty.drain(..) {
                q.drive(ring, &mut ctx, ch, now);
            }
            if q.dirty.is_empty() {
                q.dirty = dirty;
            }
        }
        q.arm_timer(ring, now);
    }

    /// Picks up a new certificate for new connections.
    pub(super) fn quic_tls_reload(&mut self, config: Arc<quinn_proto::ServerConfig>) {
        if let Some(q) = self.quic.as_mut() {
            q.server_config = config.clone();
            q.endpoint.set_server_config(Some(config));
        }
    }
}

impl Quic {
    fn datagram(
        &mut self,
        ring: &mut IoUring,
        app: &mut App<ShardLog>,
        data: BytesMut,
        from: SocketAddr,
        now: Instant,
        may_route: bool,
    ) {
        if may_route {
            if let Some(owner) = crate::h3::owner(&data, self.routes.shards()) {
                if owner != self.shard {
                    let r = &app.shared.registry;
                    if self.routes.send(
                        owner,
                        Stray {
                            data: data.to_vec(),
                            from,
                        },
                    ) {
                        r.h3_strays_forwarded.fetch_add(1, Ordering::Relaxed);
                    } else {
                        r.h3_strays_dropped.fetch_add(1, Ordering::Relaxed);
                    }
                    return;
                }
            }
        }
        self.tx.clear();
        match self
            .endpoint
            .handle(now, from, None, None, data, &mut self.tx)
        {
            Some(DatagramEvent::ConnectionEvent(ch, ev)) => {
                if let Some(c) = self.conns.get_mut(&ch) {
                    c.conn.handle_event(ev);
                    self.dirty.push(ch);
                }
            }
            Some(DatagramEvent::NewConnection(incoming)) => {
                let r = &app.shared.registry;
                r.h3_connections.fetch_add(1, Ordering::Relaxed);
                if self.draining || self.conns.len() >= self.connections_max {
                    r.h3_refused.fetch_add(1, Ordering::Relaxed);
                    self.tx.clear();
                    let t = self.endpoint.refuse(incoming, &mut self.tx);
                    self.send(ring, &t);
                    return;
                }
                self.tx.clear();
                match self.endpoint.accept(incoming, now, &mut self.tx, None) {
                    Ok((ch, conn)) => {
                        let peer = match conn.remote_address().ip() {
                            std::net::IpAddr::V4(a) => a.to_ipv6_mapped().octets(),
                            std::net::IpAddr::V6(a) => a.octets(),
                        };
                        self.next_gen = self.next_gen.wrapping_add(1);
                        r.h3_open.fetch_add(1, Ordering::Relaxed);
                        self.conns.insert(
                            ch,
                            Box::new(QConn {
                                conn,
                                gen: self.next_gen,
                                peer,
                                uni: h3c::UniStreams::default(),
                                requests: HashMap::new(),
                                unsent: Vec::new(),
                                waiting: 0,
                                control: None,
                                goaway_sent: false,
                                last_request: None,
                                timer: None,
                                counted_open: true,
                            }),
                        );
                        self.dirty.push(ch);
                    }
                    Err(e) => {
                        r.h3_error(code::TRANSPORT);
                        if let Some(t) = e.response {
                            self.send(ring, &t);
                        }
                    }
                }
            }
            Some(DatagramEvent::Response(t)) => {
                self.send(ring, &t);
            }
            None => {}
        }
    }

    /// Writes the answers whose records are durable; after a failed write,
    /// answers 503 instead (never the success answer).
    fn release(&mut self, app: &mut App<ShardLog>) {
        if self.waiting.is_empty() {
            return;
        }
        let durable = app.durable_seq;
        let failed = app.failed;
        let mut i = 0;
        while i < self.waiting.len() {
            let w = &self.waiting[i];
            if !failed && w.seq > durable {
                i += 1;
                continue;
            }
            let mut w = self.waiting.swap_remove(i);
            let Some(c) = self.conns.get_mut(&w.ch).filter(|c| c.gen == w.gen) else {
                continue;
            };
            c.waiting -= 1;
            if failed {
                unavailable(&mut self.answer, &mut self.qpack, &mut w.frames);
            }
            write_answer(c, w.stream, &w.frames);
            self.dirty.push(w.ch);
        }
    }

    fn drive(&mut self, ring: &mut IoUring, ctx: &mut Ctx<'_>, ch: ConnectionHandle, now: Instant) {
        // Out of the table while driven, so that the request path may use
        // the rest of self.
        let Some(mut c) = self.conns.remove(&ch) else {
            return;
        };
        if self.drive_conn(ring, ctx, ch, &mut c, now) {
            if c.counted_open {
                ctx.app
                    .shared
                    .registry
                    .h3_open
                    .fetch_sub(1, Ordering::Relaxed);
            }
        } else {
            self.conns.insert(ch, c);
        }
    }

    /// Drives one connection; true once it is drained (gone for good).
    fn drive_conn(
        &mut self,
        ring: &mut IoUring,
        ctx: &mut Ctx<'_>,
        ch: ConnectionHandle,
        c: &mut QConn,
        now: Instant,
    ) -> bool {
        let mut drained = false;
        loop {
            while let Some(ev) = c.conn.poll_endpoint_events() {
                drained |= ev.is_drained();
                if let Some(ce) = self.endpoint.handle_event(ch, ev) {
                    c.conn.handle_event(ce);
                }
            }
            let mut progressed = false;
            while let Some(ev) = c.conn.poll() {
                progressed = true;
                match ev {
                    Event::Stream(StreamEvent::Opened { dir }) => {
                        while let Some(id) = c.conn.streams().accept(dir) {
                            if dir == Dir::Bi {
                                if c.goaway_sent {
                                    // Past the GOAWAY: not processed, the
                                    // client may retry elsewhere.
                                    let _ = c
                                        .conn
                                        .send_stream(id)
                                        .reset(VarInt::from_u64(code::REQUEST_REJECTED).unwrap());
                                    let _ = c
                                        .conn
                                        .recv_stream(id)
                                        .stop(VarInt::from_u64(code::REQUEST_REJECTED).unwrap());
                                    continue;
                                }
                                c.last_request = Some(id);
                                c.requests.insert(id, Vec::new());
                            }
                            self.read_stream(c, ctx, ch, id);
                        }
                    }
                    Event::Stream(StreamEvent::Readable { id }) => self.read_stream(c, ctx, ch, id),
                    Event::Stream(StreamEvent::Writable { id }) => {
                        if let Some(i) = c.unsent.iter().position(|u| u.0 == id) {
                            let (id, rest) = c.unsent.swap_remove(i);
                            write_answer(c, id, &rest);
                        }
                    }
                    Event::Stream(StreamEvent::Stopped { id, .. }) => {
                        c.unsent.retain(|u| u.0 != id);
                    }
                    Event::ConnectionLost { reason } => match reason {
                        ConnectionError::TransportError(_) => {
                            ctx.app.shared.registry.h3_error(code::TRANSPORT)
                        }
                        ConnectionError::ConnectionClosed(cc)
                            if cc.error_code != quinn_proto::TransportErrorCode::NO_ERROR =>
                        {
                            ctx.app.shared.registry.h3_error(code::TRANSPORT)
                        }
                        _ => {}
                    },
                    _ => {}
                }
            }
            if c.control.is_none() && !c.conn.is_closed() {
                // SETTINGS first thing (0.5-RTT is fine for a server).
                if let Some(id) = c.conn.streams().open(Dir::Uni) {
                    c.control = Some(id);
                    write_stream(c, id, &self.control_start, false);
                    progressed = true;
                }
            }
            if self.draining && !c.goaway_sent && !c.conn.is_closed() {
                if let Some(id) = c.control {
                    c.goaway_sent = true;
                    let next = c.last_request.map_or(0, |s| u64::from(s) + 4);
                    write_stream(c, id, &h3c::goaway(next), false);
                    progressed = true;
                }
            }
            if self.draining
                && c.goaway_sent
                && c.waiting == 0
                && c.unsent.is_empty()
                && c.requests.is_empty()
                && !c.conn.is_closed()
            {
                c.conn.close(
                    now,
                    VarInt::from_u64(code::NO_ERROR).unwrap(),
                    bytes::Bytes::from_static(b"draining"),
                );
                progressed = true;
            }
            // Datagrams.
            let max = if self.gso { GSO_SEGMENTS } else { 1 };
            loop {
                self.tx.clear();
                let Some(t) = c.conn.poll_transmit(now, max, &mut self.tx) else {
                    break;
                };
                if !self.send(ring, &t) {
                    // Starved: this connection is driven again when a send
                    // completes; the datagram is lost like any (QUIC resends).
                    break;
                }
            }
            if !progressed {
                break;
            }
        }
        let deadline = c.conn.poll_timeout();
        if deadline != c.timer {
            c.timer = deadline;
            if let Some(at) = deadline {
                self.timers.push(Reverse((at, ch.0, c.gen)));
            }
        }
        drained
    }

    /// Reads what stream `id` holds and acts on it.
    fn read_stream(
        &mut self,
        c: &mut QConn,
        ctx: &mut Ctx<'_>,
        ch: ConnectionHandle,
        id: StreamId,
    ) {
        let uni = id.dir() == Dir::Uni;
        if !uni && !c.requests.contains_key(&id) {
            return;
        }
        let mut fin = false;
        let mut reset = false;
        let mut got = Vec::new();
        {
            let mut rs = c.conn.recv_stream(id);
            let Ok(mut chunks) = rs.read(true) else {
                return;
            };
            loop {
                match chunks.next(usize::MAX) {
                    Ok(Some(chunk)) => got.push(chunk.bytes),
                    Ok(None) => {
                        fin = true;
                        break;
                    }
                    Err(quinn_proto::ReadError::Blocked) => break,
                    Err(quinn_proto::ReadError::Reset(_)) => {
                        reset = true;
                        break;
                    }
                }
            }
            let _ = chunks.finalize();
        }
        if uni {
            let mut r = Ok(());
            for b in &got {
                r = r.and(c.uni.on_data(id.into(), b, false));
            }
            if fin || reset {
                r = r.and(c.uni.on_data(id.into(), &[], true));
            }
            if let Err(e) = r {
                close(c, &ctx.app.shared.registry, e);
            }
            return;
        }
        if reset {
            // The client gave up on this request.
            c.requests.remove(&id);
            return;
        }
        let buf = c.requests.get_mut(&id).expect("checked above");
        for b in &got {
            buf.extend_from_slice(b);
        }
        match h3c::scan_request(buf, fin, &self.limits) {
            Ok(h3c::Scan::Incomplete) => {}
            Ok(h3c::Scan::Complete { headers, data }) => {
                let buf = c.requests.remove(&id).expect("checked above");
                // Read before the handshake completed: 0-RTT, possibly a
                // replay; a completed handshake proves the client's.
                let early = c.conn.is_handshaking();
                let r = h3c::to_http1(
                    &buf,
                    headers,
                    &data,
                    early,
                    &self.limits,
                    &mut self.scratch,
                    &mut self.http1,
                );
                match r {
                    Ok(()) => {
                        if early {
                            let r = &ctx.app.shared.registry;
                            r.h3_early_requests.fetch_add(1, Ordering::Relaxed);
                        }
                        self.answer_request(c, ctx, ch, id);
                    }
                    Err(e) => self.refuse_request(c, ctx, id, e),
                }
            }
            Err(e) => {
                c.requests.remove(&id);
                self.refuse_request(c, ctx, id, e);
            }
        }
    }

    /// Answers the request in `self.http1` as a TCP one is answered.
    fn answer_request(
        &mut self,
        c: &mut QConn,
        ctx: &mut Ctx<'_>,
        ch: ConnectionHandle,
        id: StreamId,
    ) {
        self.answer.clear();
        let mut w = ResponseWriter {
            out: &mut self.answer,
            common: &ctx.date.line,
        };
        let wait = match http::parse(&mut self.http1, ctx.limits, ctx.country_header) {
            Parse::Request(req) => {
                let client = ctx
                    .trusted
                    .client(c.peer, &self.http1[req.forwarded_for.clone()]);
                ctx.app
                    .handle(&self.http1, &req, client, ctx.now_ms, &mut w)
                    .wait_seq
            }
            Parse::Error(e) => {
                ctx.app.http_error(e, &mut w);
                0
            }
            Parse::Partial => {
                ctx.app.http_error(http::HttpError::Malformed, &mut w);
                0
            }
        };
        let mut frames = std::mem::take(&mut self.frames);
        if !h3c::response_frames(&self.answer, &mut self.qpack, &mut frames) {
            unavailable(&mut self.answer, &mut self.qpack, &mut frames);
        }
        if wait <= ctx.app.durable_seq && !ctx.app.failed {
            write_answer(c, id, &frames);
            self.frames = frames;
        } else if ctx.app.failed {
            unavailable(&mut self.answer, &mut self.qpack, &mut frames);
            write_answer(c, id, &frames);
            self.frames = frames;
        } else {
            c.waiting += 1;
            self.waiting.push(Waiting {
                seq: wait,
                ch,
                gen: c.gen,
                stream: id,
                frames,
            });
            self.frames = Vec::with_capacity(512);
        }
    }

    fn refuse_request(
        &mut self,
        c: &mut QConn,
        ctx: &mut Ctx<'_>,
        id: StreamId,
        e: h3c::RequestError,
    ) {
        match e {
            h3c::RequestError::Connection(e) => close(c, &ctx.app.shared.registry, e),
            h3c::RequestError::Stream(code) => {
                ctx.app.shared.registry.h3_error(code);
                let v = VarInt::from_u64(code).unwrap();
                let _ = c.conn.send_stream(id).reset(v);
                let _ = c.conn.recv_stream(id).stop(v);
            }
            h3c::RequestError::Http(e) => {
                self.answer.clear();
                let mut w = ResponseWriter {
                    out: &mut self.answer,
                    common: &ctx.date.line,
                };
                ctx.app.http_error(e, &mut w);
                let mut frames = std::mem::take(&mut self.frames);
                if h3c::response_frames(&self.answer, &mut self.qpack, &mut frames) {
                    write_answer(c, id, &frames);
                }
                self.frames = frames;
                // The rest of the request is not wanted.
                let _ = c
                    .conn
                    .recv_stream(id)
                    .stop(VarInt::from_u64(code::NO_ERROR).unwrap());
            }
        }
    }

    /// Hands every deadline past to its connection.
    fn expire_timers(&mut self, now: Instant) {
        while let Some(Reverse((at, h, gen))) = self.timers.peek().copied() {
            if at > now {
                break;
            }
            self.timers.pop();
            let ch = ConnectionHandle(h);
            if let Some(c) = self.conns.get_mut(&ch) {
                if c.gen == gen && c.timer == Some(at) {
                    c.timer = None;
                    c.conn.handle_timeout(now);
                    self.dirty.push(ch);
                }
            }
        }
    }

    /// Arms a ring timeout for the earliest live QUIC deadline, unless one
    /// in flight already fires by then. (`expire_timers` also runs every
    /// loop turn, so a deadline is never later than the next 50 ms tick.)
    fn arm_timer(&mut self, ring: &mut IoUring, now: Instant) {
        while let Some(Reverse((at, h, gen))) = self.timers.peek().copied() {
            let live = self
                .conns
                .get(&ConnectionHandle(h))
                .is_some_and(|c| c.gen == gen && c.timer == Some(at));
            if live {
                break;
            }
            self.timers.pop();
        }
        let Some(Reverse((at, _, _))) = self.timers.peek().copied() else {
            return;
        };
        if self.timer_slots.iter().flatten().any(|&t| t <= at) {
            return;
        }
        let wait = at
            .saturating_duration_since(now)
            .max(Duration::from_micros(50));
        if let Some(slot) = self.timer_slots.iter().position(|t| t.is_none()) {
            *self.timer_specs[slot] = types::Timespec::from(wait);
            let e = opcode::Timeout::new(&*self.timer_specs[slot])
                .build()
                .user_data(ud(OP_QUIC_TIMER, slot, 0));
            // SAFETY: the timespec is boxed in self and lives as long as
            // the ring; the kernel copies it when the entry is submitted.
            unsafe { push_to(ring, &e) };
            self.timer_slots[slot] = Some(at);
            return;
        }
        // Every slot busy, each later than `at` (idle timeouts, say): move
        // the latest one to `at`. If it fires first, the update finds
        // nothing, and the slot is re-armed at the next turn.
        let (slot, _) = self
            .timer_slots
            .iter()
            .enumerate()
            .max_by_key(|(_, t)| **t)
            .expect("TIMER_SLOTS > 0");
        *self.timer_specs[slot] = types::Timespec::from(wait);
        let e = opcode::TimeoutUpdate::new(ud(OP_QUIC_TIMER, slot, 0), &*self.timer_specs[slot])
            .build()
            .user_data(ud(super::ring::OP_CANCEL, 0, 0));
        // SAFETY: the kernel copies the timespec when the update is
        // submitted; the box lives in self.
        unsafe { push_to(ring, &e) };
        self.timer_slots[slot] = Some(at);
    }
}

/// Writes an answer and ends the stream; what flow control does not take
/// now is written when the stream becomes writable.
fn write_answer(c: &mut QConn, id: StreamId, frames: &[u8]) {
    write_stream(c, id, frames, true);
}

fn write_stream(c: &mut QConn, id: StreamId, bytes: &[u8], finish: bool) {
    let mut s = c.conn.send_stream(id);
    let n = match s.write(bytes) {
        Ok(n) => n,
        Err(quinn_proto::WriteError::Blocked) => 0,
        // Stopped by the client, or the connection is gone.
        Err(_) => return,
    };
    if n < bytes.len() {
        c.unsent.push((id, bytes[n..].to_vec()));
        return;
    }
    if finish {
        let _ = s.finish();
    }
}

/// Closes the connection with an HTTP/3 error, counted by code.
fn close(c: &mut QConn, registry: &gateway_core::metrics::Registry, e: h3c::ConnError) {
    registry.h3_error(e.code);
    tracing::debug!(
        code = e.code,
        what = e.what,
        "HTTP/3 connection closed with an error"
    );
    c.conn.close(
        Instant::now(),
        VarInt::from_u64(e.code).unwrap(),
        bytes::Bytes::from_static(e.what.as_bytes()),
    );
}

/// The frames of a 503: the shard's log failed, so nothing is acknowledged.
fn unavailable(answer: &mut Vec<u8>, qpack: &mut Vec<u8>, frames: &mut Vec<u8>) {
    answer.clear();
    answer.extend_from_slice(
        b"HTTP/1.1 503 Service Unavailable\r\nRetry-After: 1\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: 49\r\n\r\nservice unavailable: the shard is busy or failed\n",
    );
    let ok = h3c::response_frames(answer, qpack, frames);
    debug_assert!(ok);
}
