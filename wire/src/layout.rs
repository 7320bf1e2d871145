//! Where a gateway's data directory keeps what the shipper reads and writes.
//!
//! ```text
//! <data>/LOCK                       held (flock) by the running gateway
//! <data>/shard-<n>/<base:020>.seg   segments, by the seq of their first record
//! <data>/shard-<n>/<base:020>.segz  a sealed segment, compressed (`crate::segz`);
//!                                   it replaces the `.seg` of the same base
//! <data>/shard-<n>/durable          u64 LE: every record up to this seq is durable
//!                                   (written by the gateway, read by the shipper)
//! <data>/shard-<n>/shipped          decimal: every record up to this seq is at the
//!                                   aggregator (written by the shipper; segments
//!                                   wholly below it may be recycled)
//! <data>/shard-<n>/shipper.cursors  the shipper's two cursors, for operators
//! ```
//!
//! The only I/O in this crate: listing a directory, and reading and replacing
//! these tiny files.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

pub const DURABLE_FILE: &str = "durable";
pub const SHIPPED_FILE: &str = "shipped";
pub const SHIPPER_CURSORS_FILE: &str = "shipper.cursors";

pub fn shard_dir(data: &Path, shard: u16) -> PathBuf {
    data.join(format!("shard-{shard}"))
}

pub fn segment_path(dir: &Path, base_seq: u64) -> PathBuf {
    dir.join(format!("{base_seq:020}.seg"))
}

pub fn segz_path(dir: &Path, base_seq: u64) -> PathBuf {
    dir.join(format!("{base_seq:020}.segz"))
}

/// One segment file in a shard directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SegmentFile {
    pub base_seq: u64,
    pub path: PathBuf,
    /// A `.segz` (compressed, sealed) rather than a `.seg`.
    pub compressed: bool,
}

/// The shard numbers that have a directory under `data`, sorted.
pub fn list_shards(data: &Path) -> io::Result<Vec<u16>> {
    let mut out = Vec::new();
    for entry in fs::read_dir(data)? {
        let name = entry?.file_name();
        if let Some(n) = name
            .to_str()
            .and_then(|n| n.strip_prefix("shard-"))
            .and_then(|n| n.parse::<u16>().ok())
        {
            out.push(n);
        }
    }
    out.sort_unstable();
    Ok(out)
}

/// Every segment file of a shard directory, by base seq. A base can have
/// both files for a moment (the compressed one renamed into place, the
/// original not yet removed, or a crash between the two): then both are
/// listed, the `.seg` first.
pub fn list_segment_files(dir: &Path) -> io::Result<Vec<SegmentFile>> {
    let mut segs = Vec::new();
    for entry in fs::read_dir(dir)? {
        let p = entry?.path();
        let Some(name) = p.file_name().and_then(|n| n.to_str()) else {
            continue;
        };
        let (stem, compressed) = match (name.strip_suffix(".seg"), name.strip_suffix(".segz")) {
            (Some(s), _) => (s, false),
            (_, Some(s)) => (s, true),
            _ => continue,
        };
        if let Ok(base_seq) = stem.parse::<u64>() {
            segs.push(SegmentFile {
                base_seq,
                path: p,
                compressed,
            });
        }
    }
    segs.sort_by_key(|s| (s.base_seq, s.compressed));
    Ok(segs)
}

/// The segments to read, one per base seq, by base seq: where both files
/// exist, the compressed one (it was synced whole before it got its name;
/// the original is about to be removed).
pub fn list_segments(dir: &Path) -> io::Result<Vec<SegmentFile>> {
    let mut segs = list_segment_files(dir)?;
    // Sorted with the compressed one last for a base: keep the last of each.
    segs.reverse();
    segs.dedup_by_key(|s| s.base_seq);
    segs.reverse();
    Ok(segs)
}

/// Reads the durable seq a gateway published (0 when there is none yet).
pub fn read_durable(shard_dir: &Path) -> io::Result<u64> {
    match fs::read(shard_dir.join(DURABLE_FILE)) {
        Ok(b) if b.len() >= 8 => Ok(u64::from_le_bytes(b[..8].try_into().unwrap())),
        Ok(_) => Ok(0),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(0),
        Err(e) => Err(e),
    }
}

/// Reads the shipped seq (None when there is no file or it does not parse).
pub fn read_shipped(shard_dir: &Path) -> Option<u64> {
    fs::read_to_string(shard_dir.join(SHIPPED_FILE))
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// Replaces a small file atomically (write a temporary file, rename).
fn replace(shard_dir: &Path, name: &str, text: String) -> io::Result<()> {
    let tmp = shard_dir.join(format!("{name}.tmp"));
    fs::write(&tmp, text)?;
    fs::rename(&tmp, shard_dir.join(name))
}

/// Replaces the shipped seq atomically.
pub fn write_shipped(shard_dir: &Path, seq: u64) -> io::Result<()> {
    replace(shard_dir, SHIPPED_FILE, format!("{seq}\n"))
}

/// Replaces the shipper's cursors file atomically.
pub fn write_shipper_cursors(shard_dir: &Path, partials: u64, events: u64) -> io::Result<()> {
    replace(
        shard_dir,
        SHIPPER_CURSORS_FILE,
        format!("partials {partials}\nevents {events}\n"),
    )
}
