//! Clickgate's edge gateway: signed clicks in, a durable log out.
//!
//! One shard per core, shared nothing: each shard owns an io_uring event loop
//! ([`shard`]), a SO_REUSEPORT listener, a log of memory-mapped segments
//! ([`log`]), a per-minute pre-aggregate ([`preagg`]) and its traffic policing
//! ([`limiter`]). The host-wide click-id dedup table ([`dedup`]) is the one
//! structure shards share, lock-free.
//!
//! The cores are plain state machines, driven by tests without sockets:
//! [`http`] (framing, in place), [`token`] (HMAC verification), [`dedup`],
//! [`preagg`], [`limiter`], and [`app`] (what one request does). [`shard`]
//! and [`server`] are the shells; [`tls`] (rustls over the shard's io_uring),
//! [`h3`] (HTTP/3 on quinn beside the shards) and [`edge`] (PROXY protocol,
//! trusted forwarded addresses) sit at the edge. The shipper is its own
//! crate.

pub mod app;
pub mod config;
pub mod dedup;
pub mod edge;
pub mod fuzzing;
pub mod h3;
pub mod http;
pub mod inspect;
pub mod limiter;
pub mod log;
pub mod metrics;
pub mod preagg;
pub mod server;
pub mod shard;
pub mod sys;
pub mod tls;
pub mod token;

/// Reproducible pseudo-random numbers for tests (xorshift64).
#[cfg(test)]
pub(crate) fn xorshift64(state: &mut u64) -> u64 {
    *state ^= *state << 13;
    *state ^= *state >> 7;
    *state ^= *state << 17;
    *state
}
