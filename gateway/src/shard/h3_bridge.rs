//! The shard's side of its HTTP/3 companion thread (see [`crate::h3`]):
//! requests arrive over a queue with an eventfd wake-up, go through the
//! same app, and their answers are released once durable.

use gateway_core::http::{self, Parse, ResponseWriter};
use io_uring::{opcode, types};

use super::ring::{ud, OP_H3_WAKE};
use super::ShardLoop;

/// The shard's side of its HTTP/3 companion (see [`crate::h3`]).
pub(super) struct H3Side {
    pub(super) inbox: crate::h3::Inbox,
    /// Where the eventfd read lands (boxed: the kernel writes it).
    pub(super) wake_buf: Box<u64>,
    /// The companion has gone (drained): nothing more will come.
    pub(super) done: bool,
    /// Answers waiting for their record to be durable: (seq, reply, answer).
    pub(super) waiting: Vec<(u64, tokio::sync::oneshot::Sender<Vec<u8>>, Vec<u8>)>,
}

impl ShardLoop {
    pub(super) fn arm_h3_wake(&mut self) {
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
    pub(super) fn on_h3(&mut self, now: i64) {
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
    pub(super) fn release_h3(&mut self) {
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
}
