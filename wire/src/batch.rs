//! The batch frame the shipper sends to the aggregator, one per QUIC stream,
//! and the answer the aggregator sends back on the same stream.
//!
//! ```text
//! request:  magic "CLKGBAT\0" | version u16 | kind u8 | gw_len u8 | shard u16 |
//!           reserved u16 | after_seq u64 | last_seq u64 | count u32 |
//!           raw_len u32 | zlen u32 | crc u32 | gateway id | payload[zlen]
//! payload:  zstd of `count` items: seq u64 | len u32 | type u8 | 3 reserved | bytes[len]
//! answer:   magic "CLKGACK\0" | status u8 | 7 reserved | partials cursor u64 |
//!           events cursor u64 | reason_len u16 | reason
//! ```
//!
//! The CRC32C covers the header before it, the gateway id and the compressed
//! payload. A batch covers the seq range `(after_seq, last_seq]` of one shard's
//! log: for partials, `after_seq` is the first partial's `from_seq` and
//! `last_seq` the last partial's own seq; for events, every event record in the
//! range is in the batch (partials in between are not).
//!
//! Decoding checks sizes against caller-given limits before it allocates, so a
//! hostile peer cannot make the aggregator reserve memory it did not send.

use thiserror::Error;

/// The ALPN protocol shipper and aggregator speak over QUIC.
pub const ALPN: &[u8] = b"clickgate/1";
pub const MAGIC: [u8; 8] = *b"CLKGBAT\0";
pub const ACK_MAGIC: [u8; 8] = *b"CLKGACK\0";
pub const VERSION: u16 = 1;
pub const HEADER_LEN: usize = 48;
/// Where the header's fields are (the layout is in the module comment).
const VERSION_AT: usize = 8;
const KIND_AT: usize = 10;
const ITEM_HEADER_LEN: usize = 16;
const ACK_FIXED: usize = 34;
/// Longest reason an answer carries; longer ones are cut.
pub const REASON_MAX: usize = 1024;

/// What a batch carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum BatchKind {
    /// No payload: asks for the aggregator's cursors of this shard.
    Hello = 0,
    /// Partial records.
    Partials = 1,
    /// Event (click and impression) records, for the audit trail.
    Events = 2,
    /// No payload: a new aggregator instance joining a cluster takes these
    /// cursors (`after_seq` = partials, `last_seq` = events) for a shard it
    /// has never heard of, so it counts from where the routing switched to
    /// it (docs/DESIGN.md, "Several aggregators"). Answered like a hello.
    Join = 3,
}

impl BatchKind {
    pub fn from_u8(v: u8) -> Option<Self> {
        match v {
            0 => Some(Self::Hello),
            3 => Some(Self::Join),
            1 => Some(Self::Partials),
            2 => Some(Self::Events),
            _ => None,
        }
    }
}

/// One record inside a batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Item<'a> {
    pub seq: u64,
    /// The segment frame type ([`crate::segment::RecordType`]).
    pub ty: u8,
    pub bytes: &'a [u8],
}

/// A batch as sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Batch {
    pub kind: BatchKind,
    pub gateway_id: String,
    pub shard: u16,
    pub after_seq: u64,
    pub last_seq: u64,
    pub count: u32,
    /// Decompressed payload length.
    pub raw_len: u32,
    /// The zstd-compressed payload.
    pub payload: Vec<u8>,
}

#[derive(Debug, Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum BatchError {
    #[error("batch is shorter than its header")]
    Short,
    #[error("bad magic: not a clickgate batch")]
    Magic,
    #[error("unsupported batch format version {0}")]
    Version(u16),
    #[error("unknown batch kind {0}")]
    Kind(u8),
    #[error("gateway id is not valid UTF-8")]
    GatewayId,
    #[error("batch length {got} does not match its header ({want})")]
    Length { got: usize, want: usize },
    #[error("batch checksum mismatch")]
    Crc,
    #[error("batch of {0} bytes decompressed is over the limit")]
    TooLarge(u64),
    #[error("seq range ({0}, {1}] is empty or backwards")]
    Range(u64, u64),
    #[error("payload: {0}")]
    Payload(String),
    #[error("reserved bytes are not zero")]
    Reserved,
    #[error("a hello carries no range and no payload (a join only its cursors)")]
    Hello,
}

/// Appends one item to an uncompressed payload being built.
pub fn push_item(payload: &mut Vec<u8>, seq: u64, ty: u8, bytes: &[u8]) {
    payload.extend_from_slice(&seq.to_le_bytes());
    payload.extend_from_slice(&(bytes.len() as u32).to_le_bytes());
    payload.push(ty);
    payload.extend_from_slice(&[0; 3]);
    payload.extend_from_slice(bytes);
}

/// Walks the items of a decompressed payload; checks that there are exactly
/// `count`, with seqs strictly increasing inside `(after, last]`.
pub fn items(raw: &[u8], count: u32, after: u64, last: u64) -> Result<Vec<Item<'_>>, BatchError> {
    let bad = |m: &str| BatchError::Payload(m.to_owned());
    let mut out = Vec::with_capacity((count as usize).min(raw.len() / ITEM_HEADER_LEN));
    let mut off = 0;
    let mut prev = after;
    while off < raw.len() {
        if raw.len() - off < ITEM_HEADER_LEN {
            return Err(bad("truncated item header"));
        }
        let seq = u64::from_le_bytes(raw[off..off + 8].try_into().unwrap());
        let len = u32::from_le_bytes(raw[off + 8..off + 12].try_into().unwrap()) as usize;
        let ty = raw[off + 12];
        let body = raw
            .get(off + ITEM_HEADER_LEN..off + ITEM_HEADER_LEN + len)
            .ok_or_else(|| bad("truncated item"))?;
        if seq <= prev || seq > last {
            return Err(bad("item seqs must increase inside the batch range"));
        }
        prev = seq;
        out.push(Item {
            seq,
            ty,
            bytes: body,
        });
        off += ITEM_HEADER_LEN + len;
    }
    if out.len() != count as usize {
        return Err(bad("item count does not match the header"));
    }
    Ok(out)
}

impl Batch {
    /// Compresses `raw` (built with [`push_item`]) into a batch.
    #[allow(clippy::too_many_arguments)]
    pub fn seal(
        kind: BatchKind,
        gateway_id: &str,
        shard: u16,
        after_seq: u64,
        last_seq: u64,
        count: u32,
        raw: &[u8],
        level: i32,
    ) -> std::io::Result<Batch> {
        Ok(Batch {
            kind,
            gateway_id: gateway_id.to_owned(),
            shard,
            after_seq,
            last_seq,
            count,
            raw_len: raw.len() as u32,
            payload: if raw.is_empty() {
                Vec::new()
            } else {
                zstd::bulk::compress(raw, level)?
            },
        })
    }

    pub fn hello(gateway_id: &str, shard: u16) -> Batch {
        Batch {
            kind: BatchKind::Hello,
            gateway_id: gateway_id.to_owned(),
            shard,
            after_seq: 0,
            last_seq: 0,
            count: 0,
            raw_len: 0,
            payload: Vec::new(),
        }
    }

    /// A join at (partials cursor, events cursor).
    pub fn join(gateway_id: &str, shard: u16, partials: u64, events: u64) -> Batch {
        Batch {
            kind: BatchKind::Join,
            after_seq: partials,
            last_seq: events,
            ..Batch::hello(gateway_id, shard)
        }
    }

    pub fn encode(&self) -> Vec<u8> {
        let id = self.gateway_id.as_bytes();
        assert!(id.len() <= u8::MAX as usize, "gateway id too long");
        let mut b = Vec::with_capacity(HEADER_LEN + id.len() + self.payload.len());
        b.extend_from_slice(&MAGIC);
        b.extend_from_slice(&VERSION.to_le_bytes());
        b.push(self.kind as u8);
        b.push(id.len() as u8);
        b.extend_from_slice(&self.shard.to_le_bytes());
        b.extend_from_slice(&[0; 2]);
        b.extend_from_slice(&self.after_seq.to_le_bytes());
        b.extend_from_slice(&self.last_seq.to_le_bytes());
        b.extend_from_slice(&self.count.to_le_bytes());
        b.extend_from_slice(&self.raw_len.to_le_bytes());
        b.extend_from_slice(&(self.payload.len() as u32).to_le_bytes());
        let mut crc = crc32c::crc32c(&b[..44]);
        crc = crc32c::crc32c_append(crc, id);
        crc = crc32c::crc32c_append(crc, &self.payload);
        b.extend_from_slice(&crc.to_le_bytes());
        b.extend_from_slice(id);
        b.extend_from_slice(&self.payload);
        b
    }

    /// The kind a frame says it is, from its header alone (nothing else is
    /// checked: for routing and metrics before the whole frame is decoded).
    /// None when it is too short, not a batch, of another version or kind.
    pub fn peek_kind(b: &[u8]) -> Option<BatchKind> {
        if b.len() < HEADER_LEN || b[..MAGIC.len()] != MAGIC {
            return None;
        }
        if u16::from_le_bytes([b[VERSION_AT], b[VERSION_AT + 1]]) != VERSION {
            return None;
        }
        BatchKind::from_u8(b[KIND_AT])
    }

    /// Decodes and checks a whole batch; `raw_max` bounds the decompressed size.
    pub fn decode(b: &[u8], raw_max: usize) -> Result<Batch, BatchError> {
        if b.len() < HEADER_LEN {
            return Err(BatchError::Short);
        }
        if b[0..8] != MAGIC {
            return Err(BatchError::Magic);
        }
        let version = u16::from_le_bytes([b[VERSION_AT], b[VERSION_AT + 1]]);
        if version != VERSION {
            return Err(BatchError::Version(version));
        }
        let kind = BatchKind::from_u8(b[KIND_AT]).ok_or(BatchError::Kind(b[KIND_AT]))?;
        if b[14..16] != [0, 0] {
            return Err(BatchError::Reserved);
        }
        let id_len = b[11] as usize;
        let u64_at = |o: usize| u64::from_le_bytes(b[o..o + 8].try_into().unwrap());
        let u32_at = |o: usize| u32::from_le_bytes(b[o..o + 4].try_into().unwrap());
        let zlen = u32_at(40) as usize;
        let want = HEADER_LEN + id_len + zlen;
        if b.len() != want {
            return Err(BatchError::Length { got: b.len(), want });
        }
        let mut crc = crc32c::crc32c(&b[..44]);
        crc = crc32c::crc32c_append(crc, &b[HEADER_LEN..]);
        if crc != u32_at(44) {
            return Err(BatchError::Crc);
        }
        let gateway_id = std::str::from_utf8(&b[HEADER_LEN..HEADER_LEN + id_len])
            .map_err(|_| BatchError::GatewayId)?
            .to_owned();
        let raw_len = u32_at(36);
        if raw_len as usize > raw_max {
            return Err(BatchError::TooLarge(raw_len as u64));
        }
        let (after_seq, last_seq) = (u64_at(16), u64_at(24));
        if kind == BatchKind::Hello {
            if after_seq != 0 || last_seq != 0 || u32_at(32) != 0 || raw_len != 0 || zlen != 0 {
                return Err(BatchError::Hello);
            }
        } else if kind == BatchKind::Join {
            if u32_at(32) != 0 || raw_len != 0 || zlen != 0 {
                return Err(BatchError::Hello);
            }
        } else if last_seq <= after_seq {
            return Err(BatchError::Range(after_seq, last_seq));
        }
        Ok(Batch {
            kind,
            gateway_id,
            shard: u16::from_le_bytes([b[12], b[13]]),
            after_seq,
            last_seq,
            count: u32_at(32),
            raw_len,
            payload: b[HEADER_LEN + id_len..].to_vec(),
        })
    }

    /// Decompresses the payload, refusing one that does not inflate to exactly
    /// `raw_len` bytes.
    pub fn decompress(&self) -> Result<Vec<u8>, BatchError> {
        if self.payload.is_empty() {
            return if self.raw_len == 0 {
                Ok(Vec::new())
            } else {
                Err(BatchError::Payload("empty payload".into()))
            };
        }
        let raw = zstd::bulk::decompress(&self.payload, self.raw_len as usize)
            .map_err(|e| BatchError::Payload(format!("zstd: {e}")))?;
        if raw.len() != self.raw_len as usize {
            return Err(BatchError::Payload(format!(
                "inflated to {} bytes, header says {}",
                raw.len(),
                self.raw_len
            )));
        }
        Ok(raw)
    }
}

/// How the aggregator answered a batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Status {
    /// Committed; the cursors are the new ones.
    Applied = 0,
    /// Every record was already applied: acknowledged, no effect.
    Duplicate = 1,
    /// The batch starts after the aggregator's cursor: resend from the cursor.
    Gap = 2,
    /// Malformed or not allowed; the reason says why. Not applied.
    Refused = 3,
    /// The answer to a hello: the cursors.
    Cursors = 4,
    /// The aggregator could not commit (store error, shutting down): retry.
    Retry = 5,
}

impl Status {
    pub fn from_u8(v: u8) -> Option<Self> {
        Some(match v {
            0 => Self::Applied,
            1 => Self::Duplicate,
            2 => Self::Gap,
            3 => Self::Refused,
            4 => Self::Cursors,
            5 => Self::Retry,
            _ => return None,
        })
    }
}

/// The aggregator's answer to one batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ack {
    pub status: Status,
    /// Seq of the last partial applied for this shard (0: none).
    pub partials_cursor: u64,
    /// Last seq covered by the events stored for this shard (0: none).
    pub events_cursor: u64,
    pub reason: String,
}

impl Ack {
    pub fn encode(&self) -> Vec<u8> {
        let mut r = self.reason.as_bytes();
        if r.len() > REASON_MAX {
            let mut cut = REASON_MAX;
            while !self.reason.is_char_boundary(cut) {
                cut -= 1;
            }
            r = &r[..cut];
        }
        let mut b = Vec::with_capacity(ACK_FIXED + r.len());
        b.extend_from_slice(&ACK_MAGIC);
        b.push(self.status as u8);
        b.extend_from_slice(&[0; 7]);
        b.extend_from_slice(&self.partials_cursor.to_le_bytes());
        b.extend_from_slice(&self.events_cursor.to_le_bytes());
        b.extend_from_slice(&(r.len() as u16).to_le_bytes());
        b.extend_from_slice(r);
        b
    }

    pub fn decode(b: &[u8]) -> Result<Ack, BatchError> {
        if b.len() < ACK_FIXED {
            return Err(BatchError::Short);
        }
        if b[0..8] != ACK_MAGIC {
            return Err(BatchError::Magic);
        }
        let status = Status::from_u8(b[8]).ok_or(BatchError::Kind(b[8]))?;
        if b[9..16].iter().any(|&x| x != 0) {
            return Err(BatchError::Reserved);
        }
        let n = u16::from_le_bytes([b[32], b[33]]) as usize;
        if b.len() != ACK_FIXED + n {
            return Err(BatchError::Length {
                got: b.len(),
                want: ACK_FIXED + n,
            });
        }
        Ok(Ack {
            status,
            partials_cursor: u64::from_le_bytes(b[16..24].try_into().unwrap()),
            events_cursor: u64::from_le_bytes(b[24..32].try_into().unwrap()),
            reason: String::from_utf8_lossy(&b[ACK_FIXED..]).into_owned(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_frames_kind_is_read_from_its_header_alone() {
        let b = Batch::hello("gw", 3).encode();
        assert_eq!(Batch::peek_kind(&b), Some(BatchKind::Hello));
        let j = Batch::join("gw", 3, 5, 9).encode();
        assert_eq!(Batch::peek_kind(&j), Some(BatchKind::Join));
        assert_eq!(Batch::peek_kind(&b[..HEADER_LEN - 1]), None);
        let mut other = b.clone();
        other[0] ^= 1;
        assert_eq!(Batch::peek_kind(&other), None);
        let mut later = b.clone();
        later[VERSION_AT] = 2;
        assert_eq!(Batch::peek_kind(&later), None);
        let mut unknown = b;
        unknown[KIND_AT] = 0xEE;
        assert_eq!(Batch::peek_kind(&unknown), None);
    }

    fn sample() -> Batch {
        let mut raw = Vec::new();
        push_item(&mut raw, 5, 2, b"hello");
        push_item(&mut raw, 9, 2, b"world!");
        Batch::seal(BatchKind::Partials, "pop-1", 3, 1, 9, 2, &raw, 3).unwrap()
    }

    #[test]
    fn batch_round_trips_and_items_check() {
        let b = sample();
        let enc = b.encode();
        let d = Batch::decode(&enc, 1 << 20).unwrap();
        assert_eq!(d, b);
        let raw = d.decompress().unwrap();
        let it = items(&raw, d.count, d.after_seq, d.last_seq).unwrap();
        assert_eq!(it.len(), 2);
        assert_eq!((it[0].seq, it[0].bytes), (5, &b"hello"[..]));
        assert_eq!((it[1].seq, it[1].ty, it[1].bytes), (9, 2, &b"world!"[..]));
        // Wrong count, seq outside the range, or seqs out of order are refused.
        assert!(items(&raw, 3, d.after_seq, d.last_seq).is_err());
        assert!(items(&raw, 2, 5, d.last_seq).is_err());
        assert!(items(&raw, 2, d.after_seq, 8).is_err());
    }

    #[test]
    fn every_flipped_byte_is_refused() {
        let enc = sample().encode();
        for i in 0..enc.len() {
            let mut bad = enc.clone();
            bad[i] ^= 0x40;
            assert!(Batch::decode(&bad, 1 << 20).is_err(), "byte {i}");
        }
        assert_eq!(
            Batch::decode(&enc[..enc.len() - 1], 1 << 20).unwrap_err(),
            BatchError::Length {
                got: enc.len() - 1,
                want: enc.len()
            }
        );
        assert_eq!(
            Batch::decode(&enc, 10).unwrap_err(),
            BatchError::TooLarge(sample().raw_len as u64)
        );
    }

    #[test]
    fn a_join_carries_only_its_cursors() {
        let j = Batch::join("gw", 3, 40, 41);
        let d = Batch::decode(&j.encode(), 1 << 20).unwrap();
        assert_eq!(
            (d.kind, d.shard, d.after_seq, d.last_seq, d.count),
            (BatchKind::Join, 3, 40, 41, 0)
        );
        // Cursors in any order (the partials cursor may be ahead).
        assert!(Batch::decode(&Batch::join("gw", 0, 9, 2).encode(), 1 << 20).is_ok());
        let mut with_payload = sample();
        with_payload.kind = BatchKind::Join;
        assert_eq!(
            Batch::decode(&with_payload.encode(), 1 << 20).unwrap_err(),
            BatchError::Hello
        );
    }

    #[test]
    fn lying_raw_len_is_refused() {
        let mut b = sample();
        b.raw_len -= 1;
        assert!(b.decompress().is_err());
        b.raw_len += 2;
        assert!(b.decompress().is_err());
    }

    #[test]
    fn ack_round_trips_and_cuts_long_reasons() {
        let a = Ack {
            status: Status::Gap,
            partials_cursor: 7,
            events_cursor: 11,
            reason: "é".repeat(600),
        };
        let d = Ack::decode(&a.encode()).unwrap();
        assert_eq!(d.status, Status::Gap);
        assert_eq!((d.partials_cursor, d.events_cursor), (7, 11));
        assert_eq!(d.reason.len(), REASON_MAX);
        assert!(Ack::decode(&a.encode()[..20]).is_err());
    }
}
