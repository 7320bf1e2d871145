//! Connections: accepting them, receiving, handing whole requests to the
//! app, sending the answers once durable, and closing them (timeouts, slow
//! readers). The layers below HTTP (PROXY, TLS) are in `layers`.

use std::io;
use std::os::fd::{AsRawFd, RawFd};

use gateway_core::app::Endpoint;
use gateway_core::http::{self, Parse, ResponseWriter};
use gateway_core::metrics::DropReason;
use io_uring::{opcode, types};
use rustls::ServerConnection;

use super::ring::{ud, OP_ACCEPT, OP_RECV, OP_SEND};
use super::{ShardLoop, NBUF_MIN, RBUF_INITIAL, TICK_PHASES, WBUF_INITIAL};

#[derive(Default)]
pub(super) struct Conn {
    pub(super) fd: RawFd,
    pub(super) gen: u32,
    pub(super) in_use: bool,
    pub(super) peer: [u8; 16],
    /// HTTP bytes (plaintext) waiting to be parsed.
    pub(super) rbuf: Vec<u8>,
    pub(super) rlen: usize,
    /// Bytes as they came off the socket, when a layer sits below HTTP (a
    /// PROXY header still to read, or TLS); plain connections receive
    /// straight into `rbuf`.
    pub(super) nbuf: Vec<u8>,
    pub(super) nlen: usize,
    pub(super) proxy_pending: bool,
    pub(super) tls: Option<Box<ServerConnection>>,
    pub(super) tls_close_sent: bool,
    pub(super) tls_counted: bool,
    /// Answers not yet handed to a send; they wait for `out_wait` to be durable.
    pub(super) out: Vec<u8>,
    pub(super) out_wait: u64,
    /// The bytes of the send in flight (frozen while it is).
    pub(super) sending: Vec<u8>,
    pub(super) sent: usize,
    pub(super) recv_inflight: bool,
    pub(super) send_inflight: bool,
    /// No more reading: EOF, an error answer, or `Connection: close`.
    pub(super) read_done: bool,
    pub(super) closing: bool,
    /// When the bytes of an incomplete request started arriving.
    pub(super) partial_since_ms: Option<i64>,
    /// The request has been arriving for longer than `slow_read_after_ms`:
    /// read only by the sweep, never armed to wait for the next byte.
    pub(super) slow: bool,
    /// The sweep asked for one read of what the socket holds.
    pub(super) slow_read_due: bool,
    pub(super) last_active_ms: i64,
}

/// One listening socket of a shard and how its connections start.
pub struct Listener {
    pub socket: socket2::Socket,
    pub tls: bool,
    pub proxy_protocol: bool,
}

pub(super) struct ListenerState {
    pub(super) fd: Option<RawFd>,
    pub(super) armed: bool,
    pub(super) tls: bool,
    pub(super) proxy_protocol: bool,
}

impl ShardLoop {
    pub(super) fn arm_accept(&mut self, i: usize) {
        if let Some(fd) = self.listeners[i].fd {
            let e = opcode::AcceptMulti::new(types::Fd(fd))
                .build()
                .user_data(ud(OP_ACCEPT, i, 0));
            // SAFETY: accept writes no user memory (no address buffer).
            unsafe { self.push(e) };
            self.listeners[i].armed = true;
        }
    }

    pub(super) fn on_accept(&mut self, i: usize, res: i32, flags: u32) {
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

    pub(super) fn new_conn(&mut self, listener: usize, fd: RawFd) {
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

    pub(super) fn on_recv(&mut self, slot: usize, res: i32, now: i64) {
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

    pub(super) fn on_send(&mut self, slot: usize, res: i32) {
        let c = &mut self.conns[slot];
        if res < 0 {
            c.read_done = true;
            c.closing_soon();
            return;
        }
        c.sent += res as usize;
    }

    /// Sends what may be sent, reads if it should, closes if it is done.
    pub(super) fn progress(&mut self, slot: usize, _now: i64) {
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

    /// Reads what a twentieth of the slow connections hold (see
    /// [`TICK_PHASES`]).
    pub(super) fn read_slow_conns(&mut self) {
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
    pub(super) fn sweep_timeouts(&mut self, now: i64, draining: bool) {
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
}

/// The peer address of a connected socket as IPv6 (IPv4 mapped).
pub(super) fn peer_of(fd: RawFd) -> [u8; 16] {
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
