//! Group commit: making appended records durable (one write with
//! RWF_DSYNC per turn in `sync` mode, pipelined; a page-cache write in
//! `process` mode), releasing the answers that waited for them, and
//! publishing the durable seq for the shipper.

use std::time::{Duration, Instant};

use gateway_core::metrics::DropReason;
use io_uring::{opcode, types};

use crate::config::DurabilityMode;

use super::ring::{ud, OP_COMMIT_TIMER, OP_SYNC};
use super::ShardLoop;

impl ShardLoop {
    /// Makes what was appended durable: in `process` mode a write into the
    /// page cache now; in `sync` mode the group commit, pipelined: one
    /// buffered write with RWF_DSYNC of everything appended since the
    /// previous one, up to `syncs_max` in flight; durability advances over
    /// the completed prefix (ShardLog::write_done).
    pub(super) fn commit(&mut self) {
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
    }

    /// Whether the staged bytes may become a durable write now; if not, arms
    /// the timer for when they may (`durability.commit_interval_us`).
    pub(super) fn commit_due(&mut self) -> bool {
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

    pub(super) fn on_sync(&mut self, res: i32, id: u32) {
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
    pub(super) fn made_durable(&mut self, seq: u64) {
        self.app.durable_seq = seq;
        daemon::faults::crash_point("gateway_durable_before_answer");
        for w in std::mem::take(&mut self.waiters) {
            self.dirty.push(w.0);
        }
    }

    /// Tells the shipper how far the log is durable: one 8-byte pwrite per
    /// tick at most, so shipping waits a tick (50 ms) at worst.
    pub(super) fn publish_durable(&mut self) {
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

    /// Keeps the io_uring workers that run this shard's durable writes at
    /// `durability.writer_nice` (they come and go with the load).
    pub(super) fn renice_writers(&mut self) {
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
}
