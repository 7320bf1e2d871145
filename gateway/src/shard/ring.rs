//! io_uring plumbing: what each completion is (its user data).

pub(super) const OP_ACCEPT: u64 = 1;
pub(super) const OP_RECV: u64 = 2;
pub(super) const OP_SEND: u64 = 3;
pub(super) const OP_SYNC: u64 = 4;
pub(super) const OP_TIMER: u64 = 5;
pub(super) const OP_CANCEL: u64 = 6;
pub(super) const OP_STRAY_WAKE: u64 = 7;
pub(super) const OP_COMMIT_TIMER: u64 = 8;
pub(super) const OP_UDP_RECV: u64 = 9;
pub(super) const OP_UDP_SEND: u64 = 10;
pub(super) const OP_QUIC_TIMER: u64 = 11;

/// Queues `e`, handing the queue to the kernel first when it is full.
///
/// # Safety
///
/// Every buffer the entry points to must stay valid and unmoved until its
/// completion arrives.
pub(super) unsafe fn push_to(ring: &mut io_uring::IoUring, e: &io_uring::squeue::Entry) {
    loop {
        // SAFETY: forwarded from the caller.
        if unsafe { ring.submission().push(e) }.is_ok() {
            return;
        }
        if let Err(err) = ring.submit() {
            tracing::error!(error = %err, "io_uring submit failed");
        }
    }
}

pub(super) fn ud(op: u64, slot: usize, gen: u32) -> u64 {
    op << 56 | (slot as u64 & 0xFF_FFFF) << 32 | gen as u64
}

pub(super) fn ud_parts(u: u64) -> (u64, usize, u32) {
    (u >> 56, ((u >> 32) & 0xFF_FFFF) as usize, u as u32)
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
