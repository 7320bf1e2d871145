//! The gateway's request path as plain state machines: bytes and `now` in,
//! answers and records out. No sockets, no files, no clock, no executor:
//! the shell (`gateway`: the shard's io_uring loop, the mmap log, TLS, QUIC,
//! signals) feeds it and carries out what it returns, and its tests drive it
//! with an in-memory log and a fixed clock.
//!
//! - [`http`]: HTTP/1.1 framing in place, with limits; response writing.
//! - [`token`]: signed-click verification (HMAC-SHA256, constant time) and
//!   the keyring.
//! - [`dedup`]: the host-wide click-id table, lock-free.
//! - [`limiter`]: per-address rate limit, the host-wide velocity rule, the
//!   device class and country of a request.
//! - [`preagg`]: per-minute sums of what a shard appended, and its partials.
//! - [`app`]: what one request does, over the [`log::Log`] trait.
//! - [`buffer`]: how long the log can ride out a central outage, and when to
//!   step aside (readiness).
//! - [`metrics`]: plain per-shard counters and their Prometheus rendering.
//!
//! All its `unsafe` is in one private module (`fast`): a prefetch hint, an
//! SSE2 byte scan, and a `str` of checked ASCII.

#![deny(unsafe_code)]

pub mod app;
pub mod buffer;
pub mod dedup;
#[allow(unsafe_code)]
mod fast;
#[cfg(feature = "fuzzing")]
pub mod fuzzing;
pub mod h3;
pub mod http;
pub mod limiter;
pub mod log;
pub mod metrics;
pub mod preagg;
pub mod token;

/// Reproducible pseudo-random numbers for tests (xorshift64).
#[cfg(test)]
pub(crate) fn xorshift64(state: &mut u64) -> u64 {
    *state ^= *state << 13;
    *state ^= *state >> 7;
    *state ^= *state << 17;
    *state
}
