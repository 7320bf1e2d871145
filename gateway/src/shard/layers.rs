//! The layers a connection may have below HTTP: a PROXY protocol header
//! still to read, and TLS (rustls fed from the shard's own receives).

use std::io;

use gateway_core::metrics::DropReason;

use crate::edge::{self, ProxyParse};

use super::conn::Conn;

impl Conn {
    /// Bytes arrive below HTTP: a PROXY header still to read, or TLS.
    pub(super) fn layered(&self) -> bool {
        self.proxy_pending || self.tls.is_some()
    }

    /// Still before the first HTTP byte: the PROXY header or the TLS
    /// handshake is incomplete (the header timeout applies).
    pub(super) fn handshaking(&self) -> bool {
        self.proxy_pending || self.tls.as_ref().is_some_and(|t| t.is_handshaking())
    }

    pub(super) fn grow_rbuf(&mut self, rbuf_max: usize) -> bool {
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
    pub(super) fn unlayer(
        &mut self,
        rbuf_max: usize,
        proxy_max: usize,
    ) -> Result<bool, DropReason> {
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
    pub(super) fn closing_soon(&mut self) {
        if !self.closing {
            self.closing = true;
            // SAFETY: shutdown on our own socket; the fd stays open until the
            // in-flight operations have completed.
            unsafe { libc::shutdown(self.fd, libc::SHUT_RDWR) };
        }
    }
}
