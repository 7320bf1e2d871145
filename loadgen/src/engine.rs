//! The load engine: one pinned thread per worker, each with its own io_uring
//! and its own connections, one request in flight per connection.
//!
//! Open loop: request k of a worker is due at `t0 + k / rate`; it is sent on
//! the first idle connection at or after that time, and its latency is
//! measured from when it was due, not from when it went out. A server that
//! stalls therefore shows its stall in every request scheduled during it
//! (coordinated omission corrected). Closed loop: each connection sends its
//! next request as soon as the previous answer is in (maximum throughput).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::os::fd::RawFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use io_uring::{opcode, types, IoUring};

#[derive(Debug, Clone)]
pub struct Plan {
    pub addr: SocketAddr,
    /// Connections of this worker.
    pub connections: usize,
    /// Requests per second of this worker; `None` = closed loop.
    pub rate_per_s: Option<f64>,
    pub warmup: Duration,
    pub duration: Duration,
    pub keepalive: bool,
    /// Poll for completions without ever sleeping (see `--busy-poll`).
    pub busy_poll: bool,
    pub timeout: Duration,
    /// Stop after this many requests (this worker), warm-up included.
    pub requests_max: Option<u64>,
    /// Keep every answer for the oracle.
    pub record_answers: bool,
    /// Where this worker publishes its running figures (the live line).
    pub progress: Option<std::sync::Arc<Progress>>,
}

/// One worker's running figures, for the live progress line.
#[derive(Debug, Default)]
pub struct Progress {
    pub sent: AtomicU64,
    pub answered: AtomicU64,
    pub errors: AtomicU64,
    /// p99 of the measured latencies so far, ns.
    pub p99_ns: AtomicU64,
}

impl Progress {
    /// At most four times a second (`last` is the worker's last publish).
    pub fn publish(
        &self,
        last: &mut Instant,
        sent: u64,
        statuses: &BTreeMap<u16, u64>,
        errors: &Errors,
        hist: &Histogram<u64>,
    ) {
        let now = Instant::now();
        if now.duration_since(*last) < Duration::from_millis(250) {
            return;
        }
        *last = now;
        self.sent.store(sent, Ordering::Relaxed);
        self.answered
            .store(statuses.values().sum(), Ordering::Relaxed);
        self.errors.store(
            errors.connect + errors.timeout + errors.reset,
            Ordering::Relaxed,
        );
        self.p99_ns
            .store(hist.value_at_quantile(0.99), Ordering::Relaxed);
    }
}

/// What a request got back, as the oracle needs it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Answer {
    Status(u16),
    /// A batch answered 200 with this first item verdict.
    BatchItem(BatchVerdict),
    /// Sent, but no whole answer (timeout, reset): the outcome is unknown.
    Unknown,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BatchVerdict {
    Accepted,
    Duplicate,
    Invalid,
    Rejected,
    Unavailable,
}

#[derive(Debug, Default, Clone)]
pub struct Errors {
    pub connect: u64,
    pub timeout: u64,
    pub reset: u64,
}

pub struct WorkerResult {
    /// Latency of measured requests, nanoseconds.
    pub hist: Histogram<u64>,
    /// Requests due in the measured window (open loop) or sent in it (closed).
    pub measured_requests: u64,
    pub measured_completed: u64,
    pub statuses: BTreeMap<u16, u64>,
    pub errors: Errors,
    /// (pool index, answer) for every request sent, warm-up included.
    pub answers: Vec<(u32, Answer)>,
    /// The worker's CPU time over the run, seconds (set by its caller).
    pub cpu_s: f64,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum St {
    Closed,
    Connecting,
    Idle,
    Busy,
}

struct Conn {
    fd: RawFd,
    st: St,
    gen: u32,
    req: usize,
    due: Instant,
    started: Instant,
    buf: Vec<u8>,
    rlen: usize,
    send_inflight: bool,
    recv_inflight: bool,
    /// Timed out or failed: close once no operation is in flight.
    dead: bool,
}

const OP_CONNECT: u64 = 1;
const OP_SEND: u64 = 2;
const OP_RECV: u64 = 3;

fn ud(op: u64, slot: usize, gen: u32) -> u64 {
    op << 56 | (slot as u64) << 32 | gen as u64
}

fn sockaddr(addr: &SocketAddr) -> (libc::sockaddr_storage, libc::socklen_t) {
    // SAFETY: sockaddr_storage is plain data, large enough for either family.
    let mut s: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    match addr {
        SocketAddr::V4(a) => {
            // SAFETY: sockaddr_storage is at least as large and aligned as sockaddr_in.
            let sin = unsafe { &mut *(&mut s as *mut _ as *mut libc::sockaddr_in) };
            sin.sin_family = libc::AF_INET as u16;
            sin.sin_port = a.port().to_be();
            sin.sin_addr.s_addr = u32::from(*a.ip()).to_be();
            (s, std::mem::size_of::<libc::sockaddr_in>() as u32)
        }
        SocketAddr::V6(a) => {
            // SAFETY: as above, for sockaddr_in6.
            let sin6 = unsafe { &mut *(&mut s as *mut _ as *mut libc::sockaddr_in6) };
            sin6.sin6_family = libc::AF_INET6 as u16;
            sin6.sin6_port = a.port().to_be();
            sin6.sin6_addr.s6_addr = a.ip().octets();
            (s, std::mem::size_of::<libc::sockaddr_in6>() as u32)
        }
    }
}

/// Parses a whole response at the front of `b`: (status, total length, body).
/// A whole response: status, total length, body.
type Parsed<'a> = (u16, usize, &'a [u8]);

pub(crate) fn parse_response(b: &[u8]) -> Option<Result<Parsed<'_>, ()>> {
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut r = httparse::Response::new(&mut headers);
    match r.parse(b) {
        Ok(httparse::Status::Complete(head)) => {
            let status = r.code.unwrap_or(0);
            let len = r
                .headers
                .iter()
                .find(|h| h.name.eq_ignore_ascii_case("content-length"))
                .and_then(|h| {
                    std::str::from_utf8(h.value)
                        .ok()?
                        .trim()
                        .parse::<usize>()
                        .ok()
                })
                .unwrap_or(0);
            if b.len() < head + len {
                return None;
            }
            Some(Ok((status, head + len, &b[head..head + len])))
        }
        Ok(httparse::Status::Partial) => None,
        Err(_) => Some(Err(())),
    }
}

pub(crate) fn batch_verdict(body: &[u8]) -> BatchVerdict {
    let first = body.split(|&c| c == b'\n').next().unwrap_or(b"");
    match first.split(|&c| c == b' ').next().unwrap_or(b"") {
        b"accepted" => BatchVerdict::Accepted,
        b"duplicate" => BatchVerdict::Duplicate,
        b"invalid" => BatchVerdict::Invalid,
        b"unavailable" => BatchVerdict::Unavailable,
        _ => BatchVerdict::Rejected,
    }
}

/// Queues a request's send and, linked behind it, the receive of its answer:
/// one submission, and only the receive completes unless the send fails.
fn push_exchange(ring: &mut IoUring, c: &mut Conn, slot: usize, req: &[u8]) {
    let send = opcode::Send::new(types::Fd(c.fd), req.as_ptr(), req.len() as u32)
        // MSG_WAITALL: io_uring retries a short send instead of completing it.
        .flags(libc::MSG_NOSIGNAL | libc::MSG_WAITALL)
        .build()
        .flags(io_uring::squeue::Flags::IO_LINK | io_uring::squeue::Flags::SKIP_SUCCESS)
        .user_data(ud(OP_SEND, slot, c.gen));
    let recv = opcode::Recv::new(types::Fd(c.fd), c.buf.as_mut_ptr(), c.buf.len() as u32)
        .build()
        .user_data(ud(OP_RECV, slot, c.gen));
    c.rlen = 0;
    c.send_inflight = true;
    c.recv_inflight = true;
    push2(ring, &send, &recv);
}

fn push2(ring: &mut IoUring, a: &io_uring::squeue::Entry, b: &io_uring::squeue::Entry) {
    let room = {
        let sq = ring.submission();
        sq.capacity() - sq.len()
    };
    if room < 2 {
        let _ = ring.submit();
    }
    // SAFETY: the callers' buffers (the immutable request pool, a connection's
    // receive buffer untouched until its receive completes) outlive the ops.
    unsafe {
        let mut sq = ring.submission();
        sq.push(a).expect("room was made");
        sq.push(b).expect("room was made");
    }
}

fn push1(ring: &mut IoUring, e: &io_uring::squeue::Entry) {
    if ring.submission().is_full() {
        let _ = ring.submit();
    }
    // SAFETY: as in `push2`.
    unsafe { ring.submission().push(e).expect("room was made") };
}

pub fn run_worker(plan: &Plan, requests: &[Vec<u8>]) -> anyhow::Result<WorkerResult> {
    assert!(!requests.is_empty() && plan.connections > 0);
    // Completions are run only when the loop enters the kernel to reap them
    // (DEFER_TASKRUN), not by interrupting it mid-turn; the TASKRUN flag lets
    // a plain submit see that some are pending and reap them too.
    let mut ring = IoUring::builder()
        .setup_single_issuer()
        .setup_coop_taskrun()
        .setup_defer_taskrun()
        .setup_taskrun_flag()
        .build((plan.connections * 2).next_power_of_two().max(64) as u32)?;
    let (sa, salen) = sockaddr(&plan.addr);
    let family = socket2::Domain::for_address(plan.addr);
    let mut hist = Histogram::<u64>::new_with_bounds(1_000, 60_000_000_000, 3)?;
    let mut statuses = BTreeMap::new();
    let mut errors = Errors::default();
    let mut answers = Vec::new();
    let mut conns: Vec<Conn> = (0..plan.connections)
        .map(|_| Conn {
            fd: -1,
            st: St::Closed,
            gen: 0,
            req: 0,
            due: Instant::now(),
            started: Instant::now(),
            buf: vec![0; 16 * 1024],
            rlen: 0,
            send_inflight: false,
            recv_inflight: false,
            dead: false,
        })
        .collect();
    let t0 = Instant::now();
    let measure_from = t0 + plan.warmup;
    let end = measure_from + plan.duration;
    let interval = plan.rate_per_s.map(|r| Duration::from_secs_f64(1.0 / r));
    let mut next_k: u64 = 0;
    let mut sent_total: u64 = 0;
    let mut measured_requests = 0u64;
    let mut measured_completed = 0u64;
    let mut next_req = 0usize;
    let requests_max = plan.requests_max.unwrap_or(u64::MAX);

    // Opens a connection: a blocking socket(2), then an async connect.
    let connect = |c: &mut Conn, slot: usize, ring: &mut IoUring| -> bool {
        // Requests are whole messages: Nagle's algorithm would only delay them.
        let Ok(sock) = socket2::Socket::new(family, socket2::Type::STREAM.cloexec(), None) else {
            return false;
        };
        let _ = sock.set_nodelay(true);
        let fd = std::os::fd::IntoRawFd::into_raw_fd(sock);
        c.fd = fd;
        c.st = St::Connecting;
        c.gen = c.gen.wrapping_add(1);
        c.dead = false;
        let e = opcode::Connect::new(
            types::Fd(fd),
            &sa as *const _ as *const libc::sockaddr,
            salen,
        )
        .build()
        .user_data(ud(OP_CONNECT, slot, c.gen));
        // `sa` lives on this function's stack frame for the whole run.
        push1(ring, &e);
        c.recv_inflight = true; // the connect stands in for "an op in flight"
        true
    };
    // Requests in flight (sent or connecting for one).
    let mut busy = 0usize;
    if plan.keepalive {
        for (i, c) in conns.iter_mut().enumerate() {
            if !connect(c, i, &mut ring) {
                errors.connect += 1;
            }
        }
    }
    let mut idle: Vec<usize> = if plan.keepalive {
        Vec::new()
    } else {
        (0..plan.connections).collect()
    };
    let mut cqes: Vec<(u64, i32)> = Vec::with_capacity(1024);
    let mut last_sweep = Instant::now();
    let mut last_publish = Instant::now();
    loop {
        let now = Instant::now();
        let sending_allowed = now < end && sent_total < requests_max;
        // Dispatch due requests onto idle connections.
        while sending_allowed && !idle.is_empty() {
            let due = match interval {
                Some(iv) => {
                    let due = t0 + iv.mul_f64(next_k as f64);
                    if due > now || due >= end {
                        break;
                    }
                    due
                }
                None => now,
            };
            let slot = idle.pop().unwrap();
            let c = &mut conns[slot];
            c.req = next_req;
            next_req = (next_req + 1) % requests.len();
            c.due = due;
            c.started = now;
            next_k += 1;
            sent_total += 1;
            if due >= measure_from {
                measured_requests += 1;
            }
            if plan.keepalive {
                push_exchange(&mut ring, c, slot, &requests[c.req]);
            } else if !connect(c, slot, &mut ring) {
                errors.connect += 1;
                idle.push(slot);
                break;
            }
            c.st = St::Busy;
            busy += 1;
        }
        if (!sending_allowed && busy == 0) || now > end + plan.timeout + Duration::from_secs(1) {
            break;
        }
        // Wait for completions, or until the next request is due (open loop),
        // at most 1 ms so timeouts and the end are noticed.
        let mut wait = Duration::from_millis(1);
        if let (Some(iv), true) = (interval, sending_allowed) {
            let due = t0 + iv.mul_f64(next_k as f64);
            wait = wait.min(due.saturating_duration_since(now));
        }
        if (wait.is_zero() && !idle.is_empty()) || plan.busy_poll {
            // (With TASKRUN_FLAG, a submit runs completions' deferred work
            // when there is any, and never sleeps.)
            let _ = ring.submit();
        } else {
            let ts = types::Timespec::from(wait.max(Duration::from_micros(20)));
            let args = types::SubmitArgs::new().timespec(&ts);
            match ring.submitter().submit_with_args(1, &args) {
                Ok(_) => {}
                Err(e)
                    if e.raw_os_error() == Some(libc::ETIME)
                        || e.raw_os_error() == Some(libc::EINTR) => {}
                Err(e) => return Err(e.into()),
            }
        }
        cqes.clear();
        cqes.extend(ring.completion().map(|c| (c.user_data(), c.result())));
        let now = Instant::now();
        for &(u, res) in &cqes {
            let op = u >> 56;
            let slot = ((u >> 32) & 0xFF_FFFF) as usize;
            let gen = u as u32;
            let c = &mut conns[slot];
            if c.gen != gen {
                continue;
            }
            match op {
                OP_CONNECT => {
                    c.recv_inflight = false;
                    if res < 0 {
                        errors.connect += 1;
                        c.dead = true;
                    } else if plan.keepalive {
                        c.st = St::Idle;
                        idle.push(slot);
                    } else {
                        push_exchange(&mut ring, c, slot, &requests[c.req]);
                    }
                }
                OP_SEND => {
                    // Only failures complete (success is skipped); the linked
                    // receive is cancelled and completes too.
                    c.send_inflight = false;
                    errors.reset += 1;
                    c.dead = true;
                }
                OP_RECV => {
                    c.recv_inflight = false;
                    c.send_inflight = false;
                    if res == -libc::ECANCELED {
                        c.dead = true;
                        continue;
                    }
                    if res <= 0 {
                        errors.reset += 1;
                        c.dead = true;
                        continue;
                    }
                    c.rlen += res as usize;
                    match parse_response(&c.buf[..c.rlen]) {
                        Some(Ok((status, _total, body))) => {
                            let answer = if status == 200 && requests[c.req].starts_with(b"POST") {
                                Answer::BatchItem(batch_verdict(body))
                            } else {
                                Answer::Status(status)
                            };
                            *statuses.entry(status).or_insert(0) += 1;
                            if c.due >= measure_from && c.due < end {
                                let ns = now.duration_since(c.due).as_nanos() as u64;
                                hist.saturating_record(ns.max(1_000));
                                measured_completed += 1;
                            }
                            if plan.record_answers {
                                answers.push((c.req as u32, answer));
                            }
                            c.rlen = 0;
                            busy -= 1;
                            if plan.keepalive {
                                c.st = St::Idle;
                            } else {
                                // SAFETY: our socket; nothing is in flight on it.
                                unsafe { libc::close(c.fd) };
                                c.fd = -1;
                                c.st = St::Closed;
                            }
                            idle.push(slot);
                        }
                        Some(Err(())) => {
                            errors.reset += 1;
                            c.dead = true;
                        }
                        None => {
                            if c.rlen == c.buf.len() {
                                c.buf.resize(c.buf.len() * 2, 0);
                            }
                            let e = opcode::Recv::new(
                                types::Fd(c.fd),
                                c.buf[c.rlen..].as_mut_ptr(),
                                (c.buf.len() - c.rlen) as u32,
                            )
                            .build()
                            .user_data(ud(OP_RECV, slot, c.gen));
                            push1(&mut ring, &e);
                            c.recv_inflight = true;
                        }
                    }
                }
                _ => unreachable!(),
            }
        }
        // Timeouts and dead connections: close, record, reopen. Swept once a
        // millisecond, not per completion (it walks every connection).
        let now = Instant::now();
        if now.duration_since(last_sweep) < Duration::from_millis(1) {
            continue;
        }
        last_sweep = now;
        if let Some(p) = &plan.progress {
            p.publish(&mut last_publish, sent_total, &statuses, &errors, &hist);
        }
        for (slot, c) in conns.iter_mut().enumerate() {
            if c.st == St::Busy && !c.dead && now.duration_since(c.started) > plan.timeout {
                errors.timeout += 1;
                c.dead = true;
                // SAFETY: shutdown makes the in-flight operations complete.
                unsafe { libc::shutdown(c.fd, libc::SHUT_RDWR) };
            }
            if c.dead && !c.send_inflight && !c.recv_inflight && c.st != St::Closed {
                if c.st == St::Busy {
                    busy -= 1;
                    if plan.record_answers {
                        answers.push((c.req as u32, Answer::Unknown));
                    }
                }
                if c.fd >= 0 {
                    // SAFETY: our socket, no operation in flight.
                    unsafe { libc::close(c.fd) };
                }
                c.fd = -1;
                c.st = St::Closed;
                c.gen = c.gen.wrapping_add(1);
                if plan.keepalive {
                    if now < end && !connect(c, slot, &mut ring) {
                        errors.connect += 1;
                    }
                } else {
                    idle.push(slot);
                }
            }
        }
    }
    // Open loop: requests the timetable made due inside the measured window
    // but that never went out (every connection was busy until the end).
    // They count as measured and not completed, and their latency as at
    // least the wait until now, so an overloaded server's tail is not
    // understated by leaving them out.
    if let Some(iv) = interval {
        let stopped = Instant::now();
        let cap = requests_max.saturating_sub(sent_total);
        let mut k = next_k;
        let mut left = 0u64;
        loop {
            let due = t0 + iv.mul_f64(k as f64);
            if due >= end || left == cap {
                break;
            }
            if due >= measure_from {
                measured_requests += 1;
                let ns = stopped.duration_since(due).as_nanos() as u64;
                hist.saturating_record(ns.max(1_000));
            }
            left += 1;
            k += 1;
        }
    }
    for c in &conns {
        if c.fd >= 0 {
            // SAFETY: our socket; the run is over.
            unsafe { libc::close(c.fd) };
        }
    }
    Ok(WorkerResult {
        hist,
        measured_requests,
        measured_completed,
        statuses,
        errors,
        answers,
        cpu_s: 0.0,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn responses_are_framed_by_content_length() {
        let r = b"HTTP/1.1 302 Found\r\nLocation: x\r\nContent-Length: 0\r\n\r\nHTTP/1.1";
        assert_eq!(parse_response(r), Some(Ok((302, r.len() - 8, &b""[..]))));
        let r = b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\naccepted\n";
        let (s, n, body) = parse_response(r).unwrap().unwrap();
        assert_eq!((s, n), (200, r.len()));
        assert_eq!(batch_verdict(body), BatchVerdict::Accepted);
        assert_eq!(
            parse_response(b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\nacc"),
            None
        );
        assert_eq!(
            batch_verdict(b"rejected bad_signature\n"),
            BatchVerdict::Rejected
        );
    }
}
