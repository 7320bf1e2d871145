//! What the request handler needs of a shard's log, and how appending fails.
//!
//! The gateway's log is memory-mapped segment files (`gateway::log`); the
//! core's tests use an in-memory one. Appending only stages a record: the
//! shell makes it durable (group commit) and holds each answer until then.

use std::io;

use wire::record::{EventRef, PartialRecord};

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AppendError {
    /// The disk budget for unshipped segments is used up (answer 503).
    #[error("disk budget for unshipped segments is full")]
    Budget,
    /// The file system refused to allocate a new segment (answer 503).
    #[error("could not create segment: {0}")]
    Io(#[from] io::Error),
    #[error("record of {0} bytes does not fit in a segment")]
    TooLarge(usize),
}

impl AppendError {
    /// The budget, or the file system, has no room for another segment.
    pub fn is_no_space(&self) -> bool {
        match self {
            AppendError::Budget => true,
            AppendError::Io(e) => matches!(
                e.kind(),
                io::ErrorKind::StorageFull | io::ErrorKind::QuotaExceeded
            ),
            AppendError::TooLarge(_) => false,
        }
    }
}

/// How much of its disk budget a log holds: the shard's buffer gauges and
/// its readiness are computed from it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BufferStats {
    /// `log.disk_budget_bytes`.
    pub budget_bytes: u64,
    /// Bytes on disk that shipping has not freed: segments holding a record
    /// not yet at the aggregator, the active segment and a prepared spare.
    pub unshipped_bytes: u64,
    /// Bytes on disk, all segments (shipped ones kept for retention too).
    pub disk_bytes: u64,
    /// A time at or before which the oldest record not yet shipped was
    /// appended, Unix ms (None when everything is shipped).
    pub oldest_unshipped_ms: Option<i64>,
    /// Bytes on disk per byte appended, as the compressed segments show it
    /// (1.0 before any is compressed).
    pub disk_per_raw: f64,
}

impl Default for BufferStats {
    fn default() -> Self {
        Self {
            budget_bytes: u64::MAX,
            unshipped_bytes: 0,
            disk_bytes: 0,
            oldest_unshipped_ms: None,
            disk_per_raw: 1.0,
        }
    }
}

/// A shard's append-only log of framed records, numbered by seq from 1.
pub trait Log {
    /// Makes sure a record with a payload of `payload` bytes can be appended
    /// next without failing (a segment rotated in, within the budget).
    fn ensure_room(&mut self, payload: usize, now_ms: i64) -> Result<(), AppendError>;
    /// Stages a click or impression record; returns its seq.
    fn append_event(&mut self, e: &EventRef<'_>, now_ms: i64) -> Result<u64, AppendError>;
    /// Stages a partial-aggregate record; returns its seq.
    fn append_partial(&mut self, p: &PartialRecord, now_ms: i64) -> Result<u64, AppendError>;
    /// The seq the next record will get.
    fn next_seq(&self) -> u64;
    /// The seq of the last record staged (0 when empty).
    fn last_seq(&self) -> u64 {
        self.next_seq() - 1
    }
    /// Segment files (or their like) the log holds, for metrics.
    fn segments(&self) -> usize;
    /// Bytes the log takes on disk, for metrics.
    fn disk_bytes(&self) -> u64;
    /// The budget and what holds it (see [`BufferStats`]).
    fn buffer(&self) -> BufferStats;
}

/// A log in memory: the records as encoded payloads, with an optional byte
/// budget. For tests and benchmarks of the core.
#[derive(Debug, Default)]
pub struct MemLog {
    /// (seq, record type, payload).
    pub records: Vec<(u64, wire::segment::RecordType, Vec<u8>)>,
    pub bytes: u64,
    /// Appends that would take `bytes` past this fail with `Budget`.
    pub budget_bytes: Option<u64>,
    /// The next append fails with this I/O error kind, once.
    pub fail_next: Option<io::ErrorKind>,
    first_seq: u64,
}

impl MemLog {
    /// A log whose first record will have seq `next_seq`.
    pub fn starting_at(next_seq: u64) -> Self {
        Self {
            first_seq: next_seq.max(1),
            ..Self::default()
        }
    }

    fn check(&mut self, payload: usize) -> Result<(), AppendError> {
        if let Some(kind) = self.fail_next.take() {
            return Err(AppendError::Io(kind.into()));
        }
        let frame = wire::segment::frame_len(payload) as u64;
        match self.budget_bytes {
            Some(b) if self.bytes + frame > b => Err(AppendError::Budget),
            _ => Ok(()),
        }
    }

    fn push(&mut self, ty: wire::segment::RecordType, payload: Vec<u8>) -> u64 {
        let seq = self.next_seq();
        self.bytes += wire::segment::frame_len(payload.len()) as u64;
        self.records.push((seq, ty, payload));
        seq
    }
}

impl Log for MemLog {
    fn ensure_room(&mut self, payload: usize, _now_ms: i64) -> Result<(), AppendError> {
        self.check(payload)
    }

    fn append_event(&mut self, e: &EventRef<'_>, _now_ms: i64) -> Result<u64, AppendError> {
        self.check(e.encoded_len())?;
        let mut b = vec![0u8; e.encoded_len()];
        e.encode_into(&mut b);
        Ok(self.push(wire::segment::RecordType::Event, b))
    }

    fn append_partial(&mut self, p: &PartialRecord, _now_ms: i64) -> Result<u64, AppendError> {
        assert_eq!(
            p.to_seq + 1,
            self.next_seq(),
            "partial must end just before its own seq"
        );
        let mut b = Vec::new();
        p.encode(&mut b);
        self.check(b.len())?;
        Ok(self.push(wire::segment::RecordType::Partial, b))
    }

    fn next_seq(&self) -> u64 {
        self.first_seq.max(1) + self.records.len() as u64
    }

    fn segments(&self) -> usize {
        1
    }

    fn disk_bytes(&self) -> u64 {
        self.bytes
    }

    fn buffer(&self) -> BufferStats {
        BufferStats {
            budget_bytes: self.budget_bytes.unwrap_or(u64::MAX),
            unshipped_bytes: self.bytes,
            disk_bytes: self.bytes,
            oldest_unshipped_ms: None,
            disk_per_raw: 1.0,
        }
    }
}
