//! The ceiling: a do-nothing HTTP/1.1 server on io_uring that answers every
//! request with the same 302. The most any server can reach on this core with
//! this load generator; the gateway is measured against it.
//!
//! `ceiling 127.0.0.1:8090` (pin it with taskset). Keep-alive, pipelining
//! tolerated; requests are only delimited (blank line), never parsed.

use std::os::fd::RawFd;

use io_uring::{opcode, types, IoUring};

const RESPONSE: &[u8] = b"HTTP/1.1 302 Found\r\nServer: ceiling\r\nLocation: https://shop.example.com/products/summer-sale?utm_source=clickgate&utm_medium=cpc\r\nCache-Control: no-cache, no-store, must-revalidate\r\nContent-Length: 0\r\n\r\n";

/// The receive into the unused rest of a connection's buffer.
fn recv(c: &mut Conn, slot: usize) -> io_uring::squeue::Entry {
    opcode::Recv::new(
        types::Fd(c.fd),
        c.buf[c.len..].as_mut_ptr(),
        (c.buf.len() - c.len) as u32,
    )
    .build()
    .user_data(slot as u64 * 2)
}

struct Conn {
    fd: RawFd,
    buf: Vec<u8>,
    len: usize,
    out: Vec<u8>,
    in_use: bool,
}

fn main() {
    let addr: std::net::SocketAddr = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:8090".into())
        .parse()
        .expect("usage: ceiling ADDR");
    let listener = std::net::TcpListener::bind(addr).expect("bind");
    use std::os::fd::AsRawFd;
    let lfd = listener.as_raw_fd();
    let mut ring = IoUring::builder()
        .setup_single_issuer()
        .setup_coop_taskrun()
        .setup_defer_taskrun()
        .build(4096)
        .expect("io_uring");
    let mut conns: Vec<Conn> = Vec::new();
    let mut free: Vec<usize> = Vec::new();
    const ACCEPT: u64 = u64::MAX;
    let accept = opcode::AcceptMulti::new(types::Fd(lfd))
        .build()
        .user_data(ACCEPT);
    // SAFETY: accept writes no user memory.
    unsafe { ring.submission().push(&accept).unwrap() };
    let mut cq: Vec<(u64, i32, u32)> = Vec::new();
    loop {
        ring.submit_and_wait(1).expect("submit");
        cq.clear();
        cq.extend(
            ring.completion()
                .map(|c: io_uring::cqueue::Entry| (c.user_data(), c.result(), c.flags())),
        );
        for &(u, res, flags) in &cq {
            if u == ACCEPT {
                if !io_uring::cqueue::more(flags) {
                    // SAFETY: as above.
                    unsafe { ring.submission().push(&accept).unwrap() };
                }
                if res < 0 {
                    continue;
                }
                let slot = free.pop().unwrap_or_else(|| {
                    conns.push(Conn {
                        fd: -1,
                        buf: vec![0; 8192],
                        len: 0,
                        out: Vec::with_capacity(4096),
                        in_use: false,
                    });
                    conns.len() - 1
                });
                let c = &mut conns[slot];
                c.fd = res;
                c.len = 0;
                c.in_use = true;
                let e = recv(c, slot);
                // SAFETY: the buffer is not touched until this receive completes.
                unsafe { ring.submission().push(&e).unwrap() };
                continue;
            }
            let slot = (u / 2) as usize;
            let is_send = u % 2 == 1;
            let c = &mut conns[slot];
            if res <= 0 {
                // SAFETY: our socket; its one operation has completed.
                unsafe { libc::close(c.fd) };
                c.in_use = false;
                free.push(slot);
                continue;
            }
            if is_send {
                let e = recv(c, slot);
                // SAFETY: as above.
                unsafe { ring.submission().push(&e).unwrap() };
                continue;
            }
            c.len += res as usize;
            let mut start = 0;
            c.out.clear();
            while let Some(p) = memchr::memmem::find(&c.buf[start..c.len], b"\r\n\r\n") {
                c.out.extend_from_slice(RESPONSE);
                start += p + 4;
            }
            c.buf.copy_within(start..c.len, 0);
            c.len -= start;
            if c.out.is_empty() {
                let e = recv(c, slot);
                // SAFETY: as above.
                unsafe { ring.submission().push(&e).unwrap() };
            } else {
                // A short send on loopback does not happen for responses this
                // small; the send completion re-arms the receive.
                let e = opcode::Send::new(types::Fd(c.fd), c.out.as_ptr(), c.out.len() as u32)
                    .flags(libc::MSG_NOSIGNAL)
                    .build()
                    .user_data(slot as u64 * 2 + 1);
                // SAFETY: `out` is not touched until this send completes.
                unsafe { ring.submission().push(&e).unwrap() };
            }
        }
    }
}
