//! Segment files: header, record frames, and the recovery scan.
//!
//! A segment is a fixed-size, preallocated (zero-filled) file:
//!
//! ```text
//! [0, 64)      header: magic, version, shard, base seq, created, gateway id, CRC
//! [64, ..)     frames, each 8-byte aligned:
//!              len u32 | crc u32 | seq u64 | type u8 | flags u8 | 6 reserved |
//!              payload[len] | pad       (flags: 1 = first frame of a write)
//! ```
//!
//! The CRC32C covers seq, type, reserved bytes and payload. A frame whose `len`
//! is zero marks the end of the written part (the file is zero-filled past it).
//!
//! Recovery ([`scan`]) walks frames until the first one that is not whole. If no
//! valid frame with a higher seq follows, the rest is a torn or zero tail and is
//! cut. If one does follow, the damaged span is judged: when it contains a whole
//! zero-filled 4 KiB page, it is the hole a power loss leaves (pages written back
//! out of order; nothing past the hole was ever acknowledged in `sync` mode, since
//! one fdatasync covers every earlier page), and it is cut like a tail. So is
//! damage followed only by whole frames of the same write (no later frame
//! carries [`FLAG_WRITE_START`]): a power cut during the last write lands any
//! subset of its pages. Otherwise
//! bytes were damaged in place, which is corruption: the caller must stop and
//! quarantine, never silently drop the good records after it.

use thiserror::Error;

pub const MAGIC: [u8; 8] = *b"CLKGSEG\0";
pub const VERSION: u16 = 1;
pub const HEADER_LEN: usize = 64;
pub const FRAME_HEADER_LEN: usize = 24;
pub const GATEWAY_ID_MAX: usize = 24;
/// The page size power-loss holes are judged by.
pub const PAGE: usize = 4096;
/// Frame flag (byte 17): this frame is the first of a write. A power cut can
/// leave any subset of the pages of the write in flight, and nothing of a
/// later one (one write in flight at a time); so damage followed only by whole
/// frames of the same write is that write torn, while a whole frame that
/// starts a later write proves the damaged bytes had been durable: corruption.
pub const FLAG_WRITE_START: u8 = 1;

const _: () = assert!(HEADER_LEN.is_multiple_of(8));
const _: () = assert!(FRAME_HEADER_LEN.is_multiple_of(8));

/// The type byte of a frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum RecordType {
    /// A [`crate::record::EventRef`].
    Event = 1,
    /// A [`crate::record::PartialRecord`] (also used, with no rows, as heartbeat).
    Partial = 2,
}

impl RecordType {
    pub fn from_u8(v: u8) -> Option<Self> {
        match v {
            1 => Some(Self::Event),
            2 => Some(Self::Partial),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SegmentHeader {
    pub shard: u16,
    /// Seq of the first record in this segment.
    pub base_seq: u64,
    pub created_ms: i64,
    pub gateway_id: String,
}

#[derive(Debug, Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum HeaderError {
    #[error("segment header is shorter than {HEADER_LEN} bytes")]
    Short,
    #[error("bad magic: not a clickgate segment")]
    Magic,
    #[error("unsupported segment format version {0}")]
    Version(u16),
    #[error("segment header checksum mismatch")]
    Crc,
    #[error("gateway id is not valid UTF-8 or longer than {GATEWAY_ID_MAX} bytes")]
    GatewayId,
}

impl SegmentHeader {
    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let id = self.gateway_id.as_bytes();
        assert!(id.len() <= GATEWAY_ID_MAX, "gateway id too long");
        let mut b = [0u8; HEADER_LEN];
        b[0..8].copy_from_slice(&MAGIC);
        b[8..10].copy_from_slice(&VERSION.to_le_bytes());
        b[10..12].copy_from_slice(&self.shard.to_le_bytes());
        b[12] = id.len() as u8;
        b[16..24].copy_from_slice(&self.base_seq.to_le_bytes());
        b[24..32].copy_from_slice(&self.created_ms.to_le_bytes());
        b[32..32 + id.len()].copy_from_slice(id);
        let crc = crc32c::crc32c(&b[..60]);
        b[60..64].copy_from_slice(&crc.to_le_bytes());
        b
    }

    pub fn decode(b: &[u8]) -> Result<Self, HeaderError> {
        if b.len() < HEADER_LEN {
            return Err(HeaderError::Short);
        }
        if b[0..8] != MAGIC {
            return Err(HeaderError::Magic);
        }
        let crc = u32::from_le_bytes(b[60..64].try_into().unwrap());
        if crc32c::crc32c(&b[..60]) != crc {
            return Err(HeaderError::Crc);
        }
        let version = u16::from_le_bytes([b[8], b[9]]);
        if version != VERSION {
            return Err(HeaderError::Version(version));
        }
        let id_len = b[12] as usize;
        if id_len > GATEWAY_ID_MAX {
            return Err(HeaderError::GatewayId);
        }
        let gateway_id = std::str::from_utf8(&b[32..32 + id_len])
            .map_err(|_| HeaderError::GatewayId)?
            .to_owned();
        Ok(Self {
            shard: u16::from_le_bytes([b[10], b[11]]),
            base_seq: u64::from_le_bytes(b[16..24].try_into().unwrap()),
            created_ms: i64::from_le_bytes(b[24..32].try_into().unwrap()),
            gateway_id,
        })
    }
}

/// Bytes a frame with `payload_len` bytes of payload takes, padding included.
pub const fn frame_len(payload_len: usize) -> usize {
    (FRAME_HEADER_LEN + payload_len + 7) & !7
}

/// Copies `payload` in and seals the frame at the start of `dst`; returns
/// its length. For writers that have the payload elsewhere (tests, tools);
/// the log encodes in place and calls [`seal_frame`].
pub fn put_frame(dst: &mut [u8], payload: &[u8], seq: u64, ty: RecordType) -> usize {
    dst[FRAME_HEADER_LEN..FRAME_HEADER_LEN + payload.len()].copy_from_slice(payload);
    seal_frame(dst, payload.len(), seq, ty)
}

/// Writes one frame at the start of `dst`, which must hold [`frame_len`] bytes.
/// The payload must already be in place at `dst[FRAME_HEADER_LEN..]`, so that a
/// record is encoded once, straight into the mapped segment.
pub fn seal_frame(dst: &mut [u8], payload_len: usize, seq: u64, ty: RecordType) -> usize {
    assert!(
        payload_len > 0,
        "empty payloads are reserved for the end marker"
    );
    assert!(payload_len <= u32::MAX as usize);
    let total = frame_len(payload_len);
    assert!(dst.len() >= total);
    dst[8..16].copy_from_slice(&seq.to_le_bytes());
    dst[16] = ty as u8;
    dst[17..24].fill(0);
    // (flags, byte 17, are set later by mark_write_start)
    let crc = crc32c::crc32c(&dst[8..FRAME_HEADER_LEN + payload_len]);
    dst[FRAME_HEADER_LEN + payload_len..total].fill(0);
    // Length and CRC last: a frame is only recognisable once it is complete in
    // memory (this matters to a reader of the same mapping, not to crash safety,
    // which the CRC provides).
    dst[4..8].copy_from_slice(&crc.to_le_bytes());
    dst[0..4].copy_from_slice(&(payload_len as u32).to_le_bytes());
    total
}

/// Sets [`FLAG_WRITE_START`] on the sealed frame at the start of `frame`
/// and re-seals its CRC (one frame per write, so cheap).
pub fn mark_write_start(frame: &mut [u8]) {
    let len = u32::from_le_bytes(frame[0..4].try_into().unwrap()) as usize;
    frame[17] |= FLAG_WRITE_START;
    let crc = crc32c::crc32c(&frame[8..FRAME_HEADER_LEN + len]);
    frame[4..8].copy_from_slice(&crc.to_le_bytes());
}

/// One whole frame read from a segment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Frame<'a> {
    /// Offset of the frame within the segment.
    pub offset: usize,
    pub seq: u64,
    pub ty: u8,
    /// [`FLAG_WRITE_START`] or 0.
    pub flags: u8,
    pub payload: &'a [u8],
}

impl Frame<'_> {
    pub fn end(&self) -> usize {
        self.offset + frame_len(self.payload.len())
    }
}

/// Reads the frame at `off`, if it is whole (length in bounds and CRC matches).
pub fn read_frame(seg: &[u8], off: usize) -> Option<Frame<'_>> {
    if !off.is_multiple_of(8) || off + FRAME_HEADER_LEN > seg.len() {
        return None;
    }
    let len = u32::from_le_bytes(seg[off..off + 4].try_into().unwrap()) as usize;
    if len == 0 || len > seg.len() - off - FRAME_HEADER_LEN {
        return None;
    }
    let crc = u32::from_le_bytes(seg[off + 4..off + 8].try_into().unwrap());
    let body = &seg[off + 8..off + FRAME_HEADER_LEN + len];
    if crc32c::crc32c(body) != crc {
        return None;
    }
    Some(Frame {
        offset: off,
        seq: u64::from_le_bytes(seg[off + 8..off + 16].try_into().unwrap()),
        ty: seg[off + 16],
        flags: seg[off + 17],
        payload: &seg[off + FRAME_HEADER_LEN..off + FRAME_HEADER_LEN + len],
    })
}

/// How the written part of a segment ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tail {
    /// The frames end cleanly, followed by zeros (or the end of the file).
    Clean,
    /// A partly written frame, or a power-loss hole, starts at `end`; every byte
    /// from `end` on must be zeroed before appending.
    Torn,
    /// A damaged frame at `at` is followed by valid frames at `resumes_at`:
    /// corruption, not a crash artefact.
    Corrupt { at: usize, resumes_at: usize },
}

/// The result of scanning a segment's frames.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Scan {
    /// Offset just past the last whole frame (where the next frame goes).
    pub end: usize,
    /// Number of whole frames before `end`.
    pub frames: u64,
    /// Seq of the last whole frame, if any.
    pub last_seq: Option<u64>,
    pub tail: Tail,
}

/// Walks the frames of a whole segment file (header included).
///
/// Seqs must increase by one from frame to frame, starting at `base_seq`; a
/// frame that breaks the chain is not whole (it can only be left-over garbage).
pub fn scan(seg: &[u8], base_seq: u64) -> Scan {
    let mut off = HEADER_LEN;
    let mut frames = 0u64;
    let mut expect = base_seq;
    while let Some(f) = read_frame(seg, off) {
        if f.seq != expect {
            break;
        }
        frames += 1;
        expect += 1;
        off = f.end();
    }
    let end = off;
    let last_seq = frames.checked_sub(1).map(|_| expect - 1);
    if end + FRAME_HEADER_LEN > seg.len() || seg[end..].iter().all(|&b| b == 0) {
        let tail = if seg[end.min(seg.len())..].iter().all(|&b| b == 0) {
            Tail::Clean
        } else {
            Tail::Torn
        };
        return Scan {
            end,
            frames,
            last_seq,
            tail,
        };
    }
    // Something non-zero follows the last whole frame. Is there a later whole
    // frame that continues the chain, or one past it (a hole may have eaten a
    // whole frame)?
    let mut probe = end + 8;
    let mut resumes_at = None;
    while probe + FRAME_HEADER_LEN <= seg.len() {
        if let Some(f) = read_frame(seg, probe) {
            if f.seq >= expect {
                resumes_at = Some(probe);
                break;
            }
        }
        probe += 8;
    }
    // Whole frames after the damage that all belong to the write the damage
    // is in: that write was in flight at a power cut. One that starts a later
    // write means the damaged bytes had been written (and synced) before.
    let same_write = |r: usize| {
        let mut off = r;
        let mut prev = None;
        while let Some(f) = read_frame(seg, off) {
            if prev.is_some_and(|p| f.seq != p + 1) {
                break;
            }
            if f.flags & FLAG_WRITE_START != 0 {
                return false;
            }
            prev = Some(f.seq);
            off = f.end();
        }
        true
    };
    let tail = match resumes_at {
        None => Tail::Torn,
        Some(r) if same_write(r) => Tail::Torn,
        // A span of zeros is a write that never landed (power loss, or a
        // crash with writes in flight out of order); nothing after it was
        // acknowledged, since durability advances over written prefixes only.
        Some(r) if contains_zero_page(seg, end, r) || seg[end..r].iter().all(|&b| b == 0) => {
            Tail::Torn
        }
        Some(r) => Tail::Corrupt {
            at: end,
            resumes_at: r,
        },
    };
    Scan {
        end,
        frames,
        last_seq,
        tail,
    }
}

fn contains_zero_page(seg: &[u8], from: usize, to: usize) -> bool {
    let first = from.div_ceil(PAGE) * PAGE;
    let mut p = first;
    while p + PAGE <= to {
        if seg[p..p + PAGE].iter().all(|&b| b == 0) {
            return true;
        }
        p += PAGE;
    }
    false
}

/// Iterates the whole frames of a segment up to `end` (as found by [`scan`]).
pub fn frames(seg: &[u8], end: usize) -> impl Iterator<Item = Frame<'_>> {
    let mut off = HEADER_LEN;
    std::iter::from_fn(move || {
        if off >= end {
            return None;
        }
        let f = read_frame(seg, off).expect("frame before scan end must be whole");
        off = f.end();
        Some(f)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A segment whose every frame was its own (synced) write.
    fn segment(payloads: &[&[u8]], size: usize) -> Vec<u8> {
        segment_writes(payloads, size, |_| true)
    }

    /// A segment whose frame `i` starts a write when `starts(i)`.
    fn segment_writes(payloads: &[&[u8]], size: usize, starts: impl Fn(usize) -> bool) -> Vec<u8> {
        let mut seg = vec![0u8; size];
        let h = SegmentHeader {
            shard: 3,
            base_seq: 10,
            created_ms: 1,
            gateway_id: "pop-1".into(),
        };
        seg[..HEADER_LEN].copy_from_slice(&h.encode());
        let mut off = HEADER_LEN;
        for (i, p) in payloads.iter().enumerate() {
            seg[off + FRAME_HEADER_LEN..off + FRAME_HEADER_LEN + p.len()].copy_from_slice(p);
            let n = seal_frame(&mut seg[off..], p.len(), 10 + i as u64, RecordType::Event);
            if starts(i) {
                mark_write_start(&mut seg[off..]);
            }
            off += n;
        }
        seg
    }

    #[test]
    fn header_round_trips_and_detects_damage() {
        let h = SegmentHeader {
            shard: 7,
            base_seq: 99,
            created_ms: 123,
            gateway_id: "fra-01".into(),
        };
        let mut b = h.encode();
        assert_eq!(SegmentHeader::decode(&b), Ok(h));
        b[20] ^= 1;
        assert_eq!(SegmentHeader::decode(&b), Err(HeaderError::Crc));
        b[0] = b'X';
        assert_eq!(SegmentHeader::decode(&b), Err(HeaderError::Magic));
    }

    #[test]
    fn clean_segment_scans_all_frames() {
        let seg = segment(&[b"one", b"two-two", b"three"], 8192);
        let s = scan(&seg, 10);
        assert_eq!(s.frames, 3);
        assert_eq!(s.last_seq, Some(12));
        assert_eq!(s.tail, Tail::Clean);
        let got: Vec<_> = frames(&seg, s.end).map(|f| f.payload.to_vec()).collect();
        assert_eq!(
            got,
            vec![b"one".to_vec(), b"two-two".to_vec(), b"three".to_vec()]
        );
    }

    #[test]
    fn torn_tail_is_truncated_at_every_byte_of_the_last_two_records() {
        let full = segment(&[b"first record", b"second record!", b"third one"], 4096);
        let whole = scan(&full, 10);
        let all: Vec<Frame> = frames(&full, whole.end).collect();
        let payload_end = |f: &Frame| f.offset + FRAME_HEADER_LEN + f.payload.len();
        for cut in all[1].offset..=whole.end {
            let mut seg = full.clone();
            seg[cut..].fill(0);
            let s = scan(&seg, 10);
            let expect = all.iter().filter(|f| payload_end(f) <= cut).count() as u64;
            assert_eq!(s.frames, expect, "cut at {cut}");
            assert!(s.end <= cut.next_multiple_of(8), "cut {cut}: end {}", s.end);
            assert!(
                matches!(s.tail, Tail::Clean | Tail::Torn),
                "cut {cut}: {:?}",
                s.tail
            );
            // What survives is byte-identical to what was written.
            for (a, b) in frames(&seg, s.end).zip(all.iter()) {
                assert_eq!(a, *b);
            }
        }
    }

    #[test]
    fn garbage_tail_is_torn_not_corrupt() {
        let mut seg = segment(&[b"a", b"b"], 4096);
        let s = scan(&seg, 10);
        seg[s.end..s.end + 30].fill(0xAB);
        let s2 = scan(&seg, 10);
        assert_eq!(s2.frames, 2);
        assert_eq!(s2.tail, Tail::Torn);
    }

    #[test]
    fn flipped_bit_mid_file_is_reported_as_corruption() {
        let payloads: Vec<Vec<u8>> = (0..20).map(|i| vec![i as u8 + 1; 50]).collect();
        let refs: Vec<&[u8]> = payloads.iter().map(|p| p.as_slice()).collect();
        let clean = segment(&refs, 8192);
        let s = scan(&clean, 10);
        // Flip every bit position of frame 5 in turn (its header and payload):
        // later writes are whole, so those bytes had been durable.
        let f5 = frames(&clean, s.end).nth(5).unwrap();
        for byte in f5.offset..f5.offset + FRAME_HEADER_LEN + 50 {
            for bit in 0..8 {
                let mut seg = clean.clone();
                seg[byte] ^= 1 << bit;
                let d = scan(&seg, 10);
                assert_eq!(d.frames, 5, "byte {byte} bit {bit}");
                assert!(
                    matches!(d.tail, Tail::Corrupt { at, .. } if at == f5.offset),
                    "byte {byte} bit {bit}: {:?}",
                    d.tail
                );
            }
        }
    }

    #[test]
    fn damage_inside_the_last_write_is_a_torn_tail() {
        // Frames 5 to 19 were one write, in flight at a power cut: some of
        // its pages landed, the one with frame 5 did not (torn sectors).
        let payloads: Vec<Vec<u8>> = (0..20).map(|i| vec![i as u8 + 1; 50]).collect();
        let refs: Vec<&[u8]> = payloads.iter().map(|p| p.as_slice()).collect();
        let mut seg = segment_writes(&refs, 8192, |i| i <= 5);
        let at = frames(&seg, scan(&seg, 10).end).nth(5).unwrap().offset;
        seg[at + FRAME_HEADER_LEN + 3..at + FRAME_HEADER_LEN + 40].fill(0);
        let d = scan(&seg, 10);
        assert_eq!((d.frames, d.tail), (5, Tail::Torn));
        // Damage in frame 4 (an earlier, completed write) is corruption.
        let mut seg = segment_writes(&refs, 8192, |i| i <= 5);
        let at4 = frames(&seg, scan(&seg, 10).end).nth(4).unwrap().offset;
        seg[at4 + FRAME_HEADER_LEN + 3] ^= 1;
        assert!(matches!(scan(&seg, 10).tail, Tail::Corrupt { .. }));
    }

    #[test]
    fn power_loss_hole_is_a_tail_not_corruption() {
        // Enough frames to span three pages; lose the middle page.
        let payloads: Vec<Vec<u8>> = (0..60).map(|i| vec![i as u8 + 1; 100]).collect();
        let refs: Vec<&[u8]> = payloads.iter().map(|p| p.as_slice()).collect();
        let mut seg = segment(&refs, 4 * PAGE);
        seg[PAGE..2 * PAGE].fill(0);
        let s = scan(&seg, 10);
        assert!(s.end <= PAGE);
        assert_eq!(s.tail, Tail::Torn);
    }

    #[test]
    fn a_write_that_never_landed_before_one_that_did_is_a_tail() {
        let payloads: Vec<Vec<u8>> = (0..6).map(|i| vec![i as u8 + 1; 40]).collect();
        let refs: Vec<&[u8]> = payloads.iter().map(|p| p.as_slice()).collect();
        let full = segment(&refs, 4096);
        let all: Vec<Frame> = frames(&full, scan(&full, 10).end).collect();
        // Frames 2 and 3 were one write that did not land; 4 and 5 did.
        let mut seg = full.clone();
        seg[all[2].offset..all[4].offset].fill(0);
        let s = scan(&seg, 10);
        assert_eq!(s.frames, 2);
        assert_eq!(s.tail, Tail::Torn);
        // Garbage over two frames, with later writes whole, is corruption.
        let mut seg = full.clone();
        seg[all[2].offset + 30..all[3].offset + 30].fill(0xEE);
        assert!(matches!(scan(&seg, 10).tail, Tail::Corrupt { .. }));
    }

    #[test]
    fn stale_seq_chain_break_stops_the_scan() {
        let seg = segment(&[b"x", b"y"], 4096);
        // Scanning with the wrong base seq finds nothing whole.
        let s = scan(&seg, 11);
        assert_eq!(s.frames, 0);
    }
}
