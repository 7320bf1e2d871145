//! Formats that cross a Clickgate process boundary.
//!
//! Everything here is plain bytes in, plain values out: no clock, no unsafe,
//! and no I/O but [`layout`]'s directory listing. Every integer is
//! little-endian and fixed-width.
//!
//! - [`segment`]: the segment file header, the record frame (length, CRC32C, seq,
//!   type), and the recovery scan that tells a torn tail from mid-file damage.
//! - [`segz`]: a sealed segment's frames, zstd-compressed in checked chunks.
//! - [`record`]: the payloads carried in frames: [`record::EventRef`] (a
//!   click or impression, with its verdict) and [`record::PartialRecord`] (the
//!   per-minute sums of a seq range of one shard).
//!
//! - [`batch`]: the zstd batch frame the shipper sends the aggregator over QUIC,
//!   and the aggregator's answer (status and cursors).
//! - [`layout`]: file names in a gateway's data directory, shared by gateway and
//!   shipper.
//! - [`partition`]: which aggregator instance owns an advertiser.
//! - [`signed`]: the signed click URL, as the ad server writes it.
//! - [`time`]: UTC civil time as the query API and HTTP write it.

#![forbid(unsafe_code)]

pub mod batch;
#[cfg(feature = "fuzzing")]
pub mod fuzzing;
pub mod layout;
pub mod partition;
pub mod record;
pub mod segment;
pub mod segz;
pub mod signed;
pub mod time;

/// Milliseconds since the Unix epoch, UTC.
pub type UnixMs = i64;

/// The event-time minute (minutes since the Unix epoch, UTC) of a timestamp.
pub fn minute_of(ms: UnixMs) -> u32 {
    (ms.max(0) / 60_000) as u32
}
