//! HTTP/3's edges: the UDP socket each shard binds, the QUIC configuration
//! every shard's endpoint shares, connection IDs that name their shard, and
//! the queue that hands a datagram to the shard owning its connection.
//!
//! The shard drives QUIC itself (`quinn-proto`, the sans-I/O core of quinn)
//! from its own io_uring (`shard/quic.rs`), and HTTP/3 is
//! [`gateway_core::h3`]. See docs/DESIGN.md, "HTTP/3".

use std::net::SocketAddr;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use quinn_proto::{ConnectionId, ConnectionIdGenerator};

use crate::config::Config;
use crate::tls::TlsHandle;

/// Length of the connection IDs this server issues: one byte names the
/// shard, seven are random.
pub const CID_LEN: usize = 8;

/// The UDP socket a shard's endpoint uses, bound before start-up ends so
/// that an address in use fails the start. Returns it and whether GRO and
/// GSO are on.
pub fn bind(addr: SocketAddr, cfg: &Config) -> anyhow::Result<(std::net::UdpSocket, bool, bool)> {
    use socket2::{Domain, Protocol, Socket, Type};
    let s = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    s.set_reuse_port(true)?;
    s.set_nonblocking(true)?;
    // QUIC bursts: a deeper receive queue than the default 208 KiB.
    let _ = s.set_recv_buffer_size(4 << 20);
    let _ = s.set_send_buffer_size(4 << 20);
    s.bind(&addr.into())
        .with_context(|| format!("binding listen.http3 {addr} (UDP)"))?;
    let fd = s.as_raw_fd();
    let gro = cfg.listen.http3_gro && set_udp_opt(fd, libc::UDP_GRO, 1);
    // GSO is asked per send; whether the kernel has it is known by setting
    // the socket's default segment size (and clearing it again).
    let gso = cfg.listen.http3_gso && set_udp_opt(fd, libc::UDP_SEGMENT, 1200) && {
        set_udp_opt(fd, libc::UDP_SEGMENT, 0);
        true
    };
    Ok((s.into(), gro, gso))
}

/// What the steering program answers for a datagram it cannot place: an
/// index past every socket, so the kernel falls back to its 4-tuple hash.
const STEER_HASH: u32 = u32::MAX;

/// A classic BPF program for the shards' SO_REUSEPORT group: a datagram
/// whose destination connection ID is one of ours goes to the socket of
/// the shard it names (the group's socket `i` is shard `i`'s, bound in
/// order), the rest to the kernel's hash. It reads what [`owner`] reads,
/// from the UDP payload: a short header's ID starts at byte 1; a long
/// header's (other than Initial and 0-RTT, whose ID the client chose) at
/// byte 6, after its length at byte 5. A datagram too short to read is
/// steered to socket 0 (classic BPF returns 0), which drops it as any
/// shard would.
pub fn steering_program() -> Vec<libc::sock_filter> {
    const LDB_ABS: u16 = (libc::BPF_LD | libc::BPF_B | libc::BPF_ABS) as u16;
    const AND_K: u16 = (libc::BPF_ALU | libc::BPF_AND | libc::BPF_K) as u16;
    const JSET_K: u16 = (libc::BPF_JMP | libc::BPF_JSET | libc::BPF_K) as u16;
    const JGE_K: u16 = (libc::BPF_JMP | libc::BPF_JGE | libc::BPF_K) as u16;
    const JEQ_K: u16 = (libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K) as u16;
    const RET_A: u16 = (libc::BPF_RET | libc::BPF_A) as u16;
    const RET_K: u16 = (libc::BPF_RET | libc::BPF_K) as u16;
    let op = |code, k| libc::sock_filter {
        code,
        jt: 0,
        jf: 0,
        k,
    };
    // Jumps are forward, relative to the next instruction.
    let jump = |code, k, jt, jf| libc::sock_filter { code, jt, jf, k };
    vec![
        /* 0 */ op(LDB_ABS, 0),
        /* 1 */ jump(JSET_K, 0x80, 0, 6), // short header: to 8
        /* 2 */ op(AND_K, 0x30),
        /* 3 */ jump(JGE_K, 0x20, 0, 6), // Initial or 0-RTT: to 10
        /* 4 */ op(LDB_ABS, 5),
        /* 5 */ jump(JEQ_K, CID_LEN as u32, 0, 4), // not our length: to 10
        /* 6 */ op(LDB_ABS, 6),
        /* 7 */ op(RET_A, 0),
        /* 8 */ op(LDB_ABS, 1),
        /* 9 */ op(RET_A, 0),
        /* 10 */ op(RET_K, STEER_HASH),
    ]
}

/// Puts [`steering_program`] on the SO_REUSEPORT group `socket` belongs
/// to (once for the group: the kernel keeps it with the group).
pub fn attach_steering(socket: &std::net::UdpSocket) -> std::io::Result<()> {
    // The generic Linux value (x86, arm, riscv); libc exports it for
    // Android only.
    const SO_ATTACH_REUSEPORT_CBPF: libc::c_int = 51;
    let mut prog = steering_program();
    let fprog = libc::sock_fprog {
        len: prog.len() as u16,
        filter: prog.as_mut_ptr(),
    };
    // SAFETY: passes a pointer to a live sock_fprog and its size; the
    // kernel copies the program before returning.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            SO_ATTACH_REUSEPORT_CBPF,
            (&fprog as *const libc::sock_fprog).cast(),
            std::mem::size_of::<libc::sock_fprog>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

fn set_udp_opt(fd: RawFd, opt: libc::c_int, v: libc::c_int) -> bool {
    // SAFETY: passes a pointer to a live c_int and its size.
    unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_UDP,
            opt,
            (&v as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        ) == 0
    }
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

/// The QUIC server configuration every shard's endpoint shares (one
/// address-validation token key, one session cache).
pub fn server_config(
    cfg: &Config,
    tls: &TlsHandle,
) -> anyhow::Result<Arc<quinn_proto::ServerConfig>> {
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
    let crypto = quinn_proto::crypto::rustls::QuicServerConfig::try_from(c)
        .context("the TLS config does not allow TLS 1.3, which QUIC needs")?;
    let mut sc = quinn_proto::ServerConfig::with_crypto(Arc::new(crypto));
    let mut t = quinn_proto::TransportConfig::default();
    t.max_concurrent_bidi_streams(quinn_proto::VarInt::from_u32(
        cfg.limits.h3_streams_per_connection_max,
    ));
    // The client's control and QPACK streams, and room for grease.
    t.max_concurrent_uni_streams(quinn_proto::VarInt::from_u32(8));
    t.max_idle_timeout(Some(
        Duration::from_millis(cfg.limits.idle_timeout_ms)
            .try_into()
            .context("limits.idle_timeout_ms too large for QUIC")?,
    ));
    // A request stream holds at most a request (the HTTP/3 layer refuses
    // more); the connection at most that many of them.
    let stream_window = (4 * cfg.limits.header_bytes_max + cfg.limits.body_bytes_max + 1024) as u32;
    t.stream_receive_window(quinn_proto::VarInt::from_u32(stream_window));
    t.receive_window(quinn_proto::VarInt::from_u32(
        stream_window.saturating_mul(cfg.limits.h3_streams_per_connection_max.min(16)),
    ));
    // Answers to clicks fit the 1200-byte minimum datagram: probing for a
    // larger path MTU would only add datagrams to short connections.
    t.mtu_discovery_config(None);
    sc.transport_config(Arc::new(t));
    // Address changes keep the connection: a packet reaching another shard
    // is handed to the connection's own (see [`owner`]).
    sc.migration(true);
    Ok(Arc::new(sc))
}

/// The QUIC server config new connections get, rebuilt when the
/// certificate is reloaded; shards pick it up at their next tick.
pub struct ServerConfigSlot {
    version: std::sync::atomic::AtomicU64,
    config: std::sync::Mutex<Arc<quinn_proto::ServerConfig>>,
}

impl ServerConfigSlot {
    pub fn new(config: Arc<quinn_proto::ServerConfig>) -> Self {
        Self {
            version: 0.into(),
            config: std::sync::Mutex::new(config),
        }
    }

    pub fn version(&self) -> u64 {
        self.version.load(std::sync::atomic::Ordering::Acquire)
    }

    pub fn current(&self) -> (u64, Arc<quinn_proto::ServerConfig>) {
        let c = self.config.lock().unwrap();
        (self.version(), c.clone())
    }

    /// Rebuilds it from the (reloaded) certificate.
    pub fn reload(&self, cfg: &Config, tls: &TlsHandle) -> anyhow::Result<()> {
        let sc = server_config(cfg, tls)?;
        *self.config.lock().unwrap() = sc;
        self.version
            .fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        Ok(())
    }
}

/// Shard `shard`'s endpoint configuration: its connection IDs carry the
/// shard; the stateless reset key is the host's, shared by every shard.
pub fn endpoint_config(
    shard: usize,
    reset_key: Arc<ring::hmac::Key>,
) -> quinn_proto::EndpointConfig {
    let mut e = quinn_proto::EndpointConfig::new(reset_key);
    let shard = shard as u8;
    e.cid_generator(move || Box::new(ShardCids { shard }));
    e
}

/// The key stateless resets are derived with, random per process.
pub fn reset_key() -> Arc<ring::hmac::Key> {
    let rng = ring::rand::SystemRandom::new();
    Arc::new(ring::hmac::Key::generate(ring::hmac::HMAC_SHA256, &rng).expect("system randomness"))
}

/// Connection IDs whose first byte is the shard (as QUIC-LB's plaintext
/// server ID: an observer learns which of a host's shards serves a
/// connection, nothing that links a client's IDs beyond that).
struct ShardCids {
    shard: u8,
}

impl ConnectionIdGenerator for ShardCids {
    fn generate_cid(&mut self) -> ConnectionId {
        let mut b = [0u8; CID_LEN];
        // The thread's ChaCha generator, seeded from the system, as
        // quinn-proto's own generator does: a system call per ID was five
        // of a new connection's fourteen getrandom calls.
        rand::Rng::fill_bytes(&mut rand::rng(), &mut b[1..]);
        b[0] = self.shard;
        ConnectionId::new(&b)
    }
    fn cid_len(&self) -> usize {
        CID_LEN
    }
    fn cid_lifetime(&self) -> Option<Duration> {
        None
    }
}

/// The shard that owns the connection a datagram belongs to, when it names
/// one of ours (a short header, or a long one other than Initial and 0-RTT,
/// whose destination ID is the client's own choice): the first byte of the
/// destination connection ID. None: the receiving shard handles it.
pub fn owner(datagram: &[u8], shards: usize) -> Option<usize> {
    let first = *datagram.first()?;
    let dcid = if first & 0x80 == 0 {
        datagram.get(1..1 + CID_LEN)?
    } else {
        // Long header: type bits 4-5 (Initial 0, 0-RTT 1; QUIC v1).
        if (first >> 4) & 0x3 < 2 {
            return None;
        }
        let len = *datagram.get(5)? as usize;
        if len != CID_LEN {
            return None;
        }
        datagram.get(6..6 + CID_LEN)?
    };
    let shard = dcid[0] as usize;
    (shard < shards).then_some(shard)
}

/// A datagram received on another shard's socket.
pub struct Stray {
    pub data: Vec<u8>,
    pub from: SocketAddr,
}

/// The receiving end of a shard's stray queue, and the eventfd that wakes
/// its ring.
pub struct StrayInbox {
    pub rx: crossbeam_channel::Receiver<Stray>,
    pub efd: RawFd,
}

/// Every shard's queue, to hand strays to.
#[derive(Clone)]
pub struct StrayRoutes {
    routes: Arc<Vec<(crossbeam_channel::Sender<Stray>, RawFd)>>,
}

impl StrayRoutes {
    /// Queues for `shards` shards of `capacity` datagrams each.
    pub fn new(shards: usize, capacity: usize) -> std::io::Result<(Self, Vec<StrayInbox>)> {
        let mut routes = Vec::new();
        let mut inboxes = Vec::new();
        for _ in 0..shards {
            // SAFETY: eventfd takes no pointers; the result is checked.
            let efd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
            if efd < 0 {
                return Err(std::io::Error::last_os_error());
            }
            let (tx, rx) = crossbeam_channel::bounded(capacity);
            routes.push((tx, efd));
            inboxes.push(StrayInbox { rx, efd });
        }
        Ok((
            Self {
                routes: Arc::new(routes),
            },
            inboxes,
        ))
    }

    pub fn shards(&self) -> usize {
        self.routes.len()
    }

    /// Hands `s` to shard `to`; false if its queue is full.
    pub fn send(&self, to: usize, s: Stray) -> bool {
        let (tx, efd) = &self.routes[to];
        if tx.try_send(s).is_err() {
            return false;
        }
        let one = 1u64;
        // SAFETY: writes 8 bytes from a live u64 to the eventfd; EAGAIN
        // (counter saturated) means the shard is already woken.
        unsafe { libc::write(*efd, (&one as *const u64).cast(), 8) };
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_datagram_names_its_shard_by_our_connection_id_only() {
        let mut g = ShardCids { shard: 3 };
        let cid = g.generate_cid();
        assert_eq!((cid.len(), cid[0]), (CID_LEN, 3));
        assert_ne!(g.generate_cid(), cid, "the rest is random");
        // Short header: flags, then our ID.
        let mut short = vec![0x40];
        short.extend_from_slice(&cid);
        short.extend_from_slice(&[0; 30]);
        assert_eq!(owner(&short, 4), Some(3));
        assert_eq!(owner(&short, 3), None, "a shard this host does not have");
        // Handshake (type 2): routed; Initial (0) and 0-RTT (1): the
        // client's ID, handled where it lands.
        for (ty, want) in [(0u8, None), (1, None), (2, Some(3))] {
            let mut long = vec![0xc0 | ty << 4, 0, 0, 0, 1, CID_LEN as u8];
            long.extend_from_slice(&cid);
            long.extend_from_slice(&[0; 30]);
            assert_eq!(owner(&long, 4), want, "type {ty}");
        }
        assert_eq!(owner(&[0x40, 1], 4), None, "too short");
        assert_eq!(owner(&[], 4), None);
    }

    /// Runs a classic BPF program as the kernel does, for the opcodes the
    /// steering program uses (a load past the end ends it with 0).
    fn run_cbpf(prog: &[libc::sock_filter], pkt: &[u8]) -> u32 {
        let (mut a, mut pc) = (0u32, 0usize);
        loop {
            let i = prog[pc];
            pc += 1;
            let code = i.code as u32;
            let jmp = |taken: bool| if taken { i.jt } else { i.jf } as usize;
            match code {
                c if c == libc::BPF_LD | libc::BPF_B | libc::BPF_ABS => match pkt.get(i.k as usize)
                {
                    Some(&b) => a = b as u32,
                    None => return 0,
                },
                c if c == libc::BPF_ALU | libc::BPF_AND | libc::BPF_K => a &= i.k,
                c if c == libc::BPF_JMP | libc::BPF_JSET | libc::BPF_K => pc += jmp(a & i.k != 0),
                c if c == libc::BPF_JMP | libc::BPF_JGE | libc::BPF_K => pc += jmp(a >= i.k),
                c if c == libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K => pc += jmp(a == i.k),
                c if c == libc::BPF_RET | libc::BPF_A => return a,
                c if c == libc::BPF_RET | libc::BPF_K => return i.k,
                c => panic!("opcode {c:#x} not modelled"),
            }
        }
    }

    #[test]
    fn the_kernel_steers_a_datagram_to_the_shard_owner_names() {
        let prog = steering_program();
        // The kernel's pick: the program's answer if it is a socket of the
        // group, else its hash (None here).
        let steer = |d: &[u8], n: usize| Some(run_cbpf(&prog, d) as usize).filter(|&i| i < n);
        let mut g = ShardCids { shard: 2 };
        let cid = g.generate_cid();
        let mut short = vec![0x41];
        short.extend_from_slice(&cid);
        short.extend_from_slice(&[7; 20]);
        assert_eq!(steer(&short, 4), Some(2));
        let mut hs = vec![0xe0, 0, 0, 0, 1, CID_LEN as u8];
        hs.extend_from_slice(&cid);
        hs.extend_from_slice(&[7; 20]);
        assert_eq!(steer(&hs, 4), Some(2), "Handshake");
        hs[0] = 0xc0;
        assert_eq!(steer(&hs, 4), None, "Initial: the hash");
        hs[0] = 0xd0;
        assert_eq!(steer(&hs, 4), None, "0-RTT: the hash");
        // Every datagram long enough to hold our ID goes where owner() says
        // (or to the hash where owner() leaves it to the receiving shard).
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        for _ in 0..20_000 {
            let mut d = Vec::new();
            for _ in 0..24 {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                d.push(x as u8);
            }
            // Often our length and a small shard number, as real traffic.
            if x & 1 == 0 {
                d[5] = CID_LEN as u8;
            }
            if x & 2 == 0 {
                d[1] %= 4;
                d[6] %= 4;
            }
            for n in [1, 2, 4, 64] {
                assert_eq!(steer(&d, n), owner(&d, n), "{d:x?} with {n} shards");
            }
        }
    }
}
