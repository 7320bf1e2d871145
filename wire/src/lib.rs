//! Formats that cross a Clickgate process boundary.
//!
//! Everything here is plain bytes in, plain values out: no I/O, no clock, no
//! unsafe. Every integer is little-endian and fixed-width.
//!
//! - [`segment`]: the segment file header, the record frame (length, CRC32C, seq,
//!   type), and the recovery scan that tells a torn tail from mid-file damage.
//! - [`record`]: the payloads carried in frames: [`record::ClickRecord`] (a
//!   click or impression, with its verdict) and [`record::PartialRecord`] (the
//!   per-minute sums of a seq range of one shard).
//!
//! Not here yet: the shipper's batch frame (it arrives with the shipper).

#![forbid(unsafe_code)]

pub mod record;
pub mod segment;

/// Milliseconds since the Unix epoch, UTC.
pub type UnixMs = i64;

/// The event-time minute (minutes since the Unix epoch, UTC) of a timestamp.
pub fn minute_of(ms: UnixMs) -> u32 {
    (ms.max(0) / 60_000) as u32
}
