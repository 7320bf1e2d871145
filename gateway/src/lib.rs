//! Clickgate's edge gateway: the shell around the request path of
//! `gateway_core`, which is where parsing, verification, dedup, policing and
//! pre-aggregation live, free of I/O.
//!
//! One shard per core, shared nothing: each shard owns an io_uring event loop
//! ([`shard`]), its SO_REUSEPORT listeners, a log of memory-mapped segments
//! ([`log`]) and the core's request handler over it. The host-wide click-id
//! dedup and velocity tables are the structures shards share, lock-free.
//! Around the loop: [`server`] (start-up, recovery, signals, key and
//! certificate reloads), [`tls`] (rustls fed by the shard's io_uring), [`h3`]
//! (HTTP/3 on quinn beside the shards), [`edge`] (PROXY protocol, trusted
//! forwarded addresses), [`clock`], [`sys`] (the system calls std lacks) and
//! [`inspect`] (reading a data directory offline). The shipper is its own
//! crate.

pub mod clock;
pub mod config;
pub mod edge;
pub mod h3;
pub mod inspect;
pub mod log;
pub mod server;
pub mod shard;
pub mod sys;
pub mod tls;

/// Reproducible pseudo-random numbers for tests (xorshift64).
#[cfg(test)]
pub(crate) fn xorshift64(state: &mut u64) -> u64 {
    *state ^= *state << 13;
    *state ^= *state >> 7;
    *state ^= *state << 17;
    *state
}
