//! Reads one shard's log in seq order, following the gateway as it appends
//! and rotates, with positioned reads (no mapping: the gateway may recycle a
//! file under us, and a read of an unlinked file stays valid).
//!
//! Only whole frames (length in bounds, CRC good, seq the one expected next)
//! are returned, and only up to the seq the caller says is durable. A sealed
//! segment the gateway compressed (`.segz`) is read a chunk at a time, each
//! chunk checked and decompressed whole; chunks before the seq asked for are
//! passed over by their headers alone.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use wire::layout::list_segments;
use wire::segment::{self, SegmentHeader, FRAME_HEADER_LEN, HEADER_LEN};
use wire::segz::{self, ChunkHeader, SegzHeader, CHUNK_HEADER_LEN};

const CHUNK: usize = 1 << 20;

#[derive(Debug, thiserror::Error)]
pub enum TailError {
    #[error("records after seq {after} are gone: the oldest segment starts at {first}")]
    Recycled { after: u64, first: u64 },
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("{path}: {what}")]
    Format { path: PathBuf, what: String },
}

struct Open {
    base: u64,
    path: PathBuf,
    file: File,
    len: u64,
    /// Set for a compressed segment.
    z: Option<Compressed>,
}

/// Where a reader of a compressed segment stands.
struct Compressed {
    header: SegzHeader,
    /// File offset of the next chunk not yet loaded.
    next_chunk_off: u64,
    /// The loaded chunk, decompressed, and the offset of its next frame.
    raw: Vec<u8>,
    pos: usize,
}

/// A reader positioned just after a seq of one shard's log.
pub struct Tail {
    dir: PathBuf,
    cur: Option<Open>,
    /// File offset of the next frame in `cur`.
    off: u64,
    /// The seq the next frame must carry.
    next_seq: u64,
    buf: Vec<u8>,
    /// File offset of `buf[0]`.
    buf_off: u64,
    gateway_id: Option<String>,
    /// Records below this seq are walked over, not returned (set by a seek
    /// that could not reach its target yet).
    skip_below: u64,
}

impl Tail {
    /// A reader whose first record will be `after + 1`.
    pub fn open_after(dir: &Path, after: u64) -> Result<Tail, TailError> {
        let mut t = Tail {
            dir: dir.to_owned(),
            cur: None,
            off: 0,
            next_seq: after + 1,
            buf: Vec::new(),
            buf_off: 0,
            gateway_id: None,
            skip_below: after + 1,
        };
        t.seek()?;
        Ok(t)
    }

    /// The seq the next record returned will have.
    pub fn next_seq(&self) -> u64 {
        self.next_seq
    }

    /// The gateway id from the segment headers, once a segment was opened.
    pub fn gateway_id(&self) -> Option<&str> {
        self.gateway_id.as_deref()
    }

    fn io(&self, path: &Path) -> impl FnOnce(io::Error) -> TailError {
        let path = path.to_owned();
        move |source| TailError::Io { path, source }
    }

    /// Opens the segment that holds `next_seq` (or will: the newest one) and
    /// walks to it. Without any segment, stays closed and retries later.
    fn seek(&mut self) -> Result<(), TailError> {
        self.cur = None;
        let segs = list_segments(&self.dir).map_err(self.io(&self.dir.clone()))?;
        let Some(idx) = segs.iter().rposition(|s| s.base_seq <= self.next_seq) else {
            return match segs.first() {
                Some(first) => Err(TailError::Recycled {
                    after: self.next_seq - 1,
                    first: first.base_seq,
                }),
                None => Ok(()),
            };
        };
        let s = segs[idx].clone();
        self.open_segment(&s.path, s.base_seq, s.compressed)?;
        self.skip_below = self.skip_below.max(self.next_seq);
        self.next_seq = s.base_seq;
        Ok(())
    }

    fn format(path: &Path, what: impl ToString) -> TailError {
        TailError::Format {
            path: path.to_owned(),
            what: what.to_string(),
        }
    }

    fn open_segment(&mut self, path: &Path, base: u64, compressed: bool) -> Result<(), TailError> {
        let file = File::open(path).map_err(self.io(path))?;
        let len = file.metadata().map_err(self.io(path))?.len();
        let (gateway_id, header_base, z) = if compressed {
            let mut h = [0u8; segz::HEADER_LEN];
            file.read_exact_at(&mut h, 0).map_err(self.io(path))?;
            let header = SegzHeader::decode(&h).map_err(|e| Self::format(path, e))?;
            (
                header.gateway_id.clone(),
                header.base_seq,
                Some(Compressed {
                    header,
                    next_chunk_off: segz::HEADER_LEN as u64,
                    raw: Vec::new(),
                    pos: 0,
                }),
            )
        } else {
            let mut h = [0u8; HEADER_LEN];
            file.read_exact_at(&mut h, 0).map_err(self.io(path))?;
            let header = SegmentHeader::decode(&h).map_err(|e| Self::format(path, e))?;
            (header.gateway_id, header.base_seq, None)
        };
        if header_base != base {
            return Err(Self::format(path, "header does not match the file name"));
        }
        self.gateway_id = Some(gateway_id);
        self.cur = Some(Open {
            base,
            path: path.to_owned(),
            file,
            len,
            z,
        });
        self.off = HEADER_LEN as u64;
        self.buf.clear();
        self.buf_off = 0;
        Ok(())
    }

    /// Makes `buf` hold the file bytes `[off, off + need)` if the file has
    /// them; false if it does not.
    fn fill(&mut self, off: u64, need: usize) -> Result<bool, TailError> {
        let cur = self.cur.as_ref().expect("open segment");
        if off + need as u64 > cur.len {
            return Ok(false);
        }
        let have = off >= self.buf_off && off + need as u64 <= self.buf_off + self.buf.len() as u64;
        if have {
            return Ok(true);
        }
        let n = need.max(CHUNK).min((cur.len - off) as usize);
        self.buf.resize(n, 0);
        cur.file
            .read_exact_at(&mut self.buf, off)
            .map_err(|source| TailError::Io {
                path: cur.path.clone(),
                source,
            })?;
        self.buf_off = off;
        Ok(true)
    }

    /// Reads at most one record at the current position; hands it to `f` if
    /// its seq is at most `upto`. False when there is nothing more for now.
    fn step(&mut self, upto: u64, f: &mut dyn FnMut(u64, u8, &[u8])) -> Result<bool, TailError> {
        if self.next_seq > upto {
            return Ok(false);
        }
        if self.cur.is_none() {
            self.seek()?;
            if self.cur.is_none() {
                return Ok(false);
            }
        }
        if self.cur.as_ref().is_some_and(|c| c.z.is_some()) {
            return self.step_compressed(f);
        }
        // Refresh the buffer from the file when the frame is not in it: the
        // gateway may have written since the last read.
        let off = self.off;
        let whole = self.frame_at(off)?;
        let Some((seq, len)) = whole else {
            // Nothing whole here: the gateway has not written it yet, or the
            // segment was sealed and the next one starts with our seq.
            return self.open_next();
        };
        let start = (off - self.buf_off) as usize;
        let payload = &self.buf[start + FRAME_HEADER_LEN..start + FRAME_HEADER_LEN + len];
        let ty = self.buf[start + 16];
        if seq >= self.skip_below {
            f(seq, ty, payload);
        }
        self.off += segment::frame_len(len) as u64;
        self.next_seq += 1;
        Ok(true)
    }

    /// Moves on to the segment that starts at `next_seq`, if there is one
    /// yet (true), other than the one open.
    fn open_next(&mut self) -> Result<bool, TailError> {
        let segs = list_segments(&self.dir).map_err(self.io(&self.dir.clone()))?;
        let cur_base = self.cur.as_ref().map(|c| c.base);
        if let Some(s) = segs
            .iter()
            .find(|s| s.base_seq == self.next_seq && Some(s.base_seq) != cur_base)
        {
            let s = s.clone();
            self.open_segment(&s.path, s.base_seq, s.compressed)?;
            return Ok(true);
        }
        Ok(false)
    }

    /// [`Self::step`] in a compressed segment: the next frame of the loaded
    /// chunk, loading the next chunk (past those wholly below `skip_below`)
    /// when it is used up.
    fn step_compressed(&mut self, f: &mut dyn FnMut(u64, u8, &[u8])) -> Result<bool, TailError> {
        let cur = self.cur.as_mut().expect("open segment");
        let z = cur.z.as_mut().expect("compressed segment");
        if z.pos >= z.raw.len() {
            if self.next_seq > z.header.last_seq {
                return self.open_next();
            }
            let path = cur.path.clone();
            loop {
                let at = z.next_chunk_off;
                let mut hb = [0u8; CHUNK_HEADER_LEN];
                cur.file
                    .read_exact_at(&mut hb, at)
                    .map_err(|source| TailError::Io {
                        path: path.clone(),
                        source,
                    })?;
                let c =
                    ChunkHeader::decode(&hb, at as usize).map_err(|e| Self::format(&path, e))?;
                if c.first_seq != self.next_seq {
                    return Err(Self::format(
                        &path,
                        format!(
                            "chunk at byte {at} starts at seq {}, {} expected",
                            c.first_seq, self.next_seq
                        ),
                    ));
                }
                z.next_chunk_off += c.total_len() as u64;
                if c.last_seq < self.skip_below {
                    // Wholly before what is wanted: not even read.
                    self.next_seq = c.last_seq + 1;
                    if self.next_seq > z.header.last_seq {
                        return Ok(true);
                    }
                    continue;
                }
                self.buf.resize(c.zlen as usize, 0);
                cur.file
                    .read_exact_at(&mut self.buf, at + CHUNK_HEADER_LEN as u64)
                    .map_err(|source| TailError::Io {
                        path: path.clone(),
                        source,
                    })?;
                segz::check_chunk_data(&c, &self.buf, at as usize)
                    .map_err(|e| Self::format(&path, e))?;
                segz::decompress_chunk(&c, &self.buf, at as usize, &mut z.raw)
                    .map_err(|e| Self::format(&path, e))?;
                // The buffer held compressed bytes, not the file's.
                self.buf.clear();
                self.buf_off = 0;
                z.pos = 0;
                break;
            }
        }
        // decompress_chunk checked the chain; a frame that is not the one
        // expected here is an error named with its place, never a panic.
        let fr = match segment::read_frame(&z.raw, z.pos) {
            Some(fr) if fr.seq == self.next_seq => fr,
            _ => {
                let at = z.pos;
                z.raw.clear();
                z.pos = 0;
                return Err(Self::format(
                    &cur.path,
                    format!(
                        "decompressed chunk holds no frame with seq {} at byte {at}",
                        self.next_seq
                    ),
                ));
            }
        };
        if fr.seq >= self.skip_below {
            f(fr.seq, fr.ty, fr.payload);
        }
        z.pos = fr.end();
        self.next_seq += 1;
        Ok(true)
    }

    /// The seq and payload length of the whole frame at `off` that carries
    /// `next_seq`, re-reading the file once if the buffer is stale.
    fn frame_at(&mut self, off: u64) -> Result<Option<(u64, usize)>, TailError> {
        for fresh in [false, true] {
            if fresh {
                // Force a re-read.
                self.buf.clear();
            }
            if !self.fill(off, FRAME_HEADER_LEN)? {
                return Ok(None);
            }
            let s = (off - self.buf_off) as usize;
            let len = u32::from_le_bytes(self.buf[s..s + 4].try_into().unwrap()) as usize;
            if len == 0 {
                continue;
            }
            if !self.fill(off, segment::frame_len(len))? {
                return Ok(None);
            }
            let s = (off - self.buf_off) as usize;
            // read_frame wants the frame 8-aligned in the slice it checks.
            let end = (s + segment::frame_len(len)).min(self.buf.len());
            let frame = if s.is_multiple_of(8) {
                segment::read_frame(&self.buf[..end], s)
            } else {
                None
            };
            match frame {
                Some(fr) if fr.seq == self.next_seq => return Ok(Some((fr.seq, len))),
                _ => continue,
            }
        }
        Ok(None)
    }

    /// Hands every record with seq at most `upto` to `f`, in order, until
    /// `f` has seen `max` records or there is nothing more for now.
    pub fn read(
        &mut self,
        upto: u64,
        max: usize,
        mut f: impl FnMut(u64, u8, &[u8]),
    ) -> Result<usize, TailError> {
        let mut n = 0;
        while n < max {
            let mut got = false;
            let more = self.step(upto, &mut |seq, ty, b| {
                got = true;
                f(seq, ty, b)
            })?;
            n += got as usize;
            if !more {
                break;
            }
        }
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use wire::segment::{put_frame, RecordType};

    /// Writes a segment file holding records `base..base+n` (payload = seq
    /// as text) in `size` bytes.
    fn write_segment(dir: &Path, base: u64, n: u64, size: usize) {
        let mut seg = vec![0u8; size];
        let h = SegmentHeader {
            shard: 0,
            base_seq: base,
            created_ms: 0,
            gateway_id: "gw".into(),
        };
        seg[..HEADER_LEN].copy_from_slice(&h.encode());
        let mut off = HEADER_LEN;
        for seq in base..base + n {
            let p = seq.to_string();
            let ty = if seq % 3 == 0 {
                RecordType::Partial
            } else {
                RecordType::Event
            };
            off += put_frame(&mut seg[off..], p.as_bytes(), seq, ty);
        }
        std::fs::write(wire::layout::segment_path(dir, base), seg).unwrap();
    }

    fn collect(t: &mut Tail, upto: u64) -> Vec<u64> {
        let mut v = Vec::new();
        t.read(upto, usize::MAX, |seq, _, b| {
            assert_eq!(std::str::from_utf8(b).unwrap(), seq.to_string());
            v.push(seq)
        })
        .unwrap();
        v
    }

    #[test]
    fn follows_across_segments_up_to_the_durable_seq() {
        let d = tempfile::tempdir().unwrap();
        write_segment(d.path(), 1, 10, 4096);
        write_segment(d.path(), 11, 5, 4096);
        let mut t = Tail::open_after(d.path(), 0).unwrap();
        assert_eq!(collect(&mut t, 7), (1..=7).collect::<Vec<_>>());
        assert_eq!(collect(&mut t, 100), (8..=15).collect::<Vec<_>>());
        assert_eq!(t.gateway_id(), Some("gw"));
        // The gateway appends more to the active segment: picked up.
        write_segment(d.path(), 11, 8, 4096);
        assert_eq!(collect(&mut t, 100), vec![16, 17, 18]);
        assert!(collect(&mut t, 100).is_empty());
    }

    #[test]
    fn opens_in_the_middle_and_reports_recycled_records() {
        let d = tempfile::tempdir().unwrap();
        write_segment(d.path(), 5, 10, 4096);
        write_segment(d.path(), 15, 3, 4096);
        let mut t = Tail::open_after(d.path(), 12).unwrap();
        assert_eq!(collect(&mut t, 100), vec![13, 14, 15, 16, 17]);
        assert!(matches!(
            Tail::open_after(d.path(), 2),
            Err(TailError::Recycled { after: 2, first: 5 })
        ));
        // No segment yet: nothing, no error.
        let e = tempfile::tempdir().unwrap();
        let mut t = Tail::open_after(e.path(), 0).unwrap();
        assert!(collect(&mut t, 100).is_empty());
        write_segment(e.path(), 1, 2, 4096);
        assert_eq!(collect(&mut t, 100), vec![1, 2]);
    }

    #[test]
    fn stops_at_a_damaged_frame() {
        let d = tempfile::tempdir().unwrap();
        write_segment(d.path(), 1, 4, 4096);
        let p = wire::layout::segment_path(d.path(), 1);
        let mut b = std::fs::read(&p).unwrap();
        // Damage record 3's payload: records 1 and 2 come out, then nothing.
        let off = HEADER_LEN + 2 * segment::frame_len(1) + FRAME_HEADER_LEN;
        b[off] ^= 1;
        std::fs::write(&p, b).unwrap();
        let mut t = Tail::open_after(d.path(), 0).unwrap();
        assert_eq!(collect(&mut t, 100), vec![1, 2]);
    }

    /// Replaces the segment at `base` by its compressed copy, in chunks of
    /// about `chunk` bytes of frames.
    fn compress_segment(dir: &Path, base: u64, chunk: usize) {
        let p = wire::layout::segment_path(dir, base);
        let b = std::fs::read(&p).unwrap();
        let end = segment::scan(&b, base).end;
        let z = wire::segz::compress(&b, end, 3, chunk).unwrap();
        std::fs::write(wire::layout::segz_path(dir, base), z).unwrap();
        std::fs::remove_file(p).unwrap();
    }

    #[test]
    fn reads_compressed_segments_as_plain_ones() {
        let d = tempfile::tempdir().unwrap();
        write_segment(d.path(), 1, 300, 1 << 16);
        write_segment(d.path(), 301, 100, 1 << 16);
        compress_segment(d.path(), 1, 256);
        let mut t = Tail::open_after(d.path(), 0).unwrap();
        assert_eq!(collect(&mut t, 1000), (1..=400).collect::<Vec<_>>());
        assert_eq!(t.gateway_id(), Some("gw"));
        // From the middle of a compressed segment: the chunks before are
        // passed over.
        let mut t = Tail::open_after(d.path(), 137).unwrap();
        assert_eq!(collect(&mut t, 150), (138..=150).collect::<Vec<_>>());
        assert_eq!(collect(&mut t, 1000), (151..=400).collect::<Vec<_>>());
        // A segment compressed while a reader is in it (the original goes
        // from under it): the reader finishes from what it has open.
        write_segment(d.path(), 401, 50, 1 << 16);
        let mut t = Tail::open_after(d.path(), 350).unwrap();
        assert_eq!(collect(&mut t, 360), (351..=360).collect::<Vec<_>>());
        compress_segment(d.path(), 301, 512);
        assert_eq!(collect(&mut t, 1000), (361..=450).collect::<Vec<_>>());
    }

    #[test]
    fn a_damaged_compressed_chunk_stops_the_reader_with_the_file_named() {
        let d = tempfile::tempdir().unwrap();
        write_segment(d.path(), 1, 300, 1 << 16);
        write_segment(d.path(), 301, 10, 1 << 16);
        compress_segment(d.path(), 1, 256);
        let p = wire::layout::segz_path(d.path(), 1);
        let mut b = std::fs::read(&p).unwrap();
        let n = b.len();
        b[n - 30] ^= 4;
        std::fs::write(&p, b).unwrap();
        let mut t = Tail::open_after(d.path(), 0).unwrap();
        let mut got = Vec::new();
        let err = t.read(1000, usize::MAX, |s, _, _| got.push(s)).unwrap_err();
        assert!(
            err.to_string().contains("00000000000000000001.segz"),
            "{err}"
        );
        assert!(err.to_string().contains("checksum"), "{err}");
        // What came before the damaged chunk came out, in order; nothing after.
        assert!(!got.is_empty() && got.len() < 300);
        assert_eq!(got, (1..=got.len() as u64).collect::<Vec<_>>());
    }

    #[test]
    fn max_bounds_one_read() {
        let d = tempfile::tempdir().unwrap();
        write_segment(d.path(), 1, 10, 4096);
        let mut t = Tail::open_after(d.path(), 0).unwrap();
        let mut v = Vec::new();
        t.read(100, 4, |s, _, _| v.push(s)).unwrap();
        assert_eq!(v, vec![1, 2, 3, 4]);
        assert_eq!(t.next_seq(), 5);
    }
}
