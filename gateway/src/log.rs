//! A shard's log: a directory of fixed-size, preallocated, memory-mapped
//! segment files (`<data>/shard-<n>/<base seq>.seg`).
//!
//! Appends copy a record once, into the mapping of the active segment. The
//! log itself never syncs on the request path: the shard's event loop issues
//! one fdatasync through io_uring for everything appended in a turn (group
//! commit) and answers only when it completes. Rotation, which is rare (once
//! per segment), syncs the full segment before the next one is created, so the
//! seq chain across files is always durable in order.
//!
//! Recovery ([`ShardLog::open`]) scans every segment: whole frames are kept, a
//! torn or zero tail of the last segment is zeroed, and damage anywhere else
//! is corruption: the file is moved to `quarantine/` and opening fails with an
//! error that names it, so the operator decides, and no good record is cut.

use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::path::{Path, PathBuf};

use memmap2::{Mmap, MmapMut};
use wire::layout::{list_segment_files, segz_path, SegmentFile};
use wire::record::{EventRef, PartialRecord};
use wire::segment::{self, Frame, RecordType, SegmentHeader, Tail, HEADER_LEN};
use wire::segz::{self, SegzHeader};

pub use gateway_core::log::{AppendError, BufferStats, Log};

use crate::sys;

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum OpenError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("{path}: corrupt segment ({what}); moved to {quarantined}")]
    Corrupt {
        path: PathBuf,
        what: String,
        quarantined: PathBuf,
    },
}

struct Active {
    file: File,
    map: MmapMut,
    base_seq: u64,
    created_ms: i64,
    write_off: usize,
    /// Pages below this offset have been faulted in ahead of the writer.
    populated_to: usize,
}

/// How far ahead of the write position pages are faulted in, bytes.
const PREFAULT_AHEAD: usize = 4 << 20;

struct Sealed {
    path: PathBuf,
    base_seq: u64,
    /// Seq of the last record in the segment.
    last_seq: u64,
    sealed_ms: i64,
    created_ms: i64,
    /// The latest receive time of an event in it, Unix ms; known for a
    /// compressed segment (its header), `i64::MAX` (unknown) otherwise.
    last_event_ms: i64,
    /// A `.segz` (see [`Squeezer`]).
    compressed: bool,
    /// Bytes the file takes on disk, and bytes of frames it holds.
    disk_bytes: u64,
    raw_bytes: u64,
    /// Handed to the compressor and not yet back: neither recycled nor
    /// handed again meanwhile.
    compressing: bool,
    /// After a failed compression, not tried again before this.
    compress_retry_at_ms: i64,
}

/// How sealed segments are compressed (`log.compress_*`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CompressConfig {
    /// zstd level.
    pub level: i32,
    /// Frames per chunk, at least this many bytes (the last chunk less).
    pub chunk_bytes: usize,
}

/// What the compressor has done since the log opened, for metrics.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct CompressStats {
    pub segments: u64,
    pub failures: u64,
    /// Bytes of segment files compressed, and of the files written for them.
    pub bytes_in: u64,
    pub bytes_out: u64,
    /// CPU time of the compressor thread on those, ns.
    pub cpu_ns: u64,
}

/// Most (seq, time) marks kept for the age of the oldest unshipped record;
/// past it every other one is dropped (the span stays, the step doubles).
const MARKS_MAX: usize = 16_384;

pub struct ShardLog {
    dir: PathBuf,
    shard: u16,
    gateway_id: String,
    segment_bytes: usize,
    /// Most bytes of segments (active included) kept on disk.
    disk_budget_bytes: u64,
    active: Active,
    sealed: Vec<Sealed>,
    next_seq: u64,
    /// Set after a failed segment creation; retried no sooner than this.
    create_retry_at_ms: i64,
    /// errno of the last failed segment creation, reported again while the
    /// retry backs off (so a full disk stays "no space", not "log error").
    create_errno: Option<i32>,
    partial_buf: Vec<u8>,
    /// The background preparer of the next segment file (see [`Spare`]).
    spare: Spare,
    sync_on_rotate: bool,
    zero_fill: bool,
    /// Records appended but not yet handed to a write: the bytes of
    /// `[stage_off, write_off)` of the active segment. Appends never touch the
    /// mapping: a store into a page that the last sync cleaned would take a
    /// write-protect fault, and mmap + fdatasync measured twice the CPU of a
    /// buffered `RWF_DSYNC` write here (docs/BENCHMARKS.md).
    stage: Vec<u8>,
    stage_off: usize,
    /// Writes handed out and not yet complete, oldest first. Durability
    /// advances over the done prefix only. The log owns their bytes until
    /// `write_done`, so a rotation can write them again synchronously.
    writes: std::collections::VecDeque<InFlight>,
    write_next_id: u32,
    durable_seq: u64,
    /// Seq of the newest partial record; the segment holding it is never
    /// recycled, so that recovery always finds where the next partial starts.
    last_partial_seq: u64,
    spare_bufs: Vec<Vec<u8>>,
    /// Events may not take the last this many bytes of the active segment
    /// while no next segment fits the budget: partials (heartbeats, and the
    /// counts of unrecorded redirects) still can.
    partial_reserve_bytes: usize,
    /// The compressor of sealed segments, when `log.compress` is on.
    squeezer: Option<Squeezer>,
    compress_stats: CompressStats,
    /// Every record up to this seq is at the aggregator (the shipper's
    /// `shipped` file, as the shard last read it).
    shipped_seq: u64,
    /// (seq, Unix ms) of each partial appended: records after `seq` were
    /// appended after `ms`. For the age of the oldest unshipped record.
    marks: std::collections::VecDeque<(u64, i64)>,
}

struct InFlight {
    id: u32,
    last_seq: u64,
    done: bool,
    /// The segment it belongs to (its base seq) and where in it.
    base_seq: u64,
    offset: u64,
    buf: Vec<u8>,
}

/// Staged bytes handed to the shell to write (and, in `sync` mode, make
/// durable) at `offset` of the active segment. The bytes at `ptr` stay valid
/// and unchanged until [`ShardLog::write_done`] is called with `id`.
pub struct PendingWrite {
    pub id: u32,
    pub fd: RawFd,
    pub offset: u64,
    pub ptr: *const u8,
    pub len: usize,
}

/// Creating a segment (fallocate, fsync, directory fsync) takes milliseconds;
/// a helper thread does it ahead of time, so rotation on the request path is
/// a rename and a header write. A prepared spare is `spare-<n>.seg.tmp`,
/// zero-filled with no header; recovery deletes one that never got a header
/// and renames one that did (a crash right after rotation) to its seq name.
struct Spare {
    want: std::sync::mpsc::Sender<Job>,
    ready: std::sync::mpsc::Receiver<io::Result<(File, PathBuf)>>,
    requested: bool,
}

enum Job {
    Prepare,
    Sync(File),
    /// Bring `[from, from + len)` of the file into the page cache.
    Prefault {
        file: File,
        from: usize,
        len: usize,
    },
}

impl Spare {
    fn start(dir: PathBuf, bytes: usize, zero_fill: bool) -> Spare {
        let (want, want_rx) = std::sync::mpsc::channel::<Job>();
        let (ready_tx, ready) = std::sync::mpsc::channel();
        let name = format!(
            "segprep-{}",
            dir.file_name().and_then(|n| n.to_str()).unwrap_or("log")
        );
        let _ = std::thread::Builder::new().name(name).spawn(move || {
            // Background work must not take the core from the shard it serves.
            sys::lower_thread_priority(10);
            while let Ok(job) = want_rx.recv() {
                match job {
                    Job::Prepare => {}
                    Job::Sync(f) => {
                        if let Err(e) = f.sync_data() {
                            tracing::error!(error = %e, "background sync of a sealed segment failed");
                        }
                        continue;
                    }
                    Job::Prefault { file, from, len } => {
                        prefault_range(&file, from, len);
                        continue;
                    }
                }
                // Unique within the process too: tests (and a restarted
                // shard) may run two helpers on one directory.
                static SPARES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
                let n = SPARES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let path = dir.join(format!("spare-{}-{n}.seg.tmp", std::process::id()));
                let made = preallocate(&path, bytes, zero_fill).and_then(|f| {
                    f.sync_all()?;
                    sync_dir(&dir)?;
                    Ok((f, path.clone()))
                });
                if made.is_err() {
                    let _ = fs::remove_file(&path);
                }
                if ready_tx.send(made).is_err() {
                    return;
                }
            }
        });
        Spare {
            want,
            ready,
            requested: false,
        }
    }

    fn request(&mut self) {
        if !self.requested {
            self.requested = self.want.send(Job::Prepare).is_ok();
        }
    }

    fn prefault(&self, f: &File, from: usize, len: usize) -> bool {
        match f.try_clone() {
            Ok(file) => self.want.send(Job::Prefault { file, from, len }).is_ok(),
            Err(_) => false,
        }
    }

    fn sync_in_background(&self, f: &File) {
        if let Ok(dup) = f.try_clone() {
            let _ = self.want.send(Job::Sync(dup));
        }
    }

    /// A prepared file, if the helper has one ready now.
    fn take(&mut self) -> Option<(File, PathBuf)> {
        if !self.requested {
            return None;
        }
        match self.ready.try_recv() {
            Ok(Ok(f)) => {
                self.requested = false;
                Some(f)
            }
            Ok(Err(e)) => {
                self.requested = false;
                tracing::warn!(error = %e, "preparing the next segment failed; will create it inline");
                None
            }
            Err(_) => None,
        }
    }
}

#[derive(Debug, Default, Clone)]
pub struct Recovery {
    pub segments: usize,
    /// Of `segments`, how many are compressed.
    pub compressed: usize,
    pub frames: u64,
    pub last_partial_seq: u64,
    /// Bytes zeroed at a torn tail.
    pub torn_bytes: u64,
    /// Compressions a crash interrupted, settled: the original removed
    /// (its compressed copy was whole) or the copy removed.
    pub compressions_settled: usize,
}

/// Configuration of one shard's log, validated.
#[derive(Debug, Clone)]
pub struct LogConfig {
    pub dir: PathBuf,
    pub shard: u16,
    pub gateway_id: String,
    pub segment_bytes: usize,
    pub disk_budget_bytes: u64,
    /// Write zeros over new segments (not only fallocate), so appends never
    /// convert unwritten extents and a group commit needs no journal commit.
    pub zero_fill: bool,
    /// Sync a full segment before starting the next (durability `sync`). In
    /// `process` mode the page cache is the promise, and the sealed segment is
    /// synced by the helper thread instead, off the request path.
    pub sync_on_rotate: bool,
    /// See [`ShardLog`]'s `partial_reserve_bytes`.
    pub partial_reserve_bytes: usize,
    /// Compress sealed segments (None: keep them as they are).
    pub compress: Option<CompressConfig>,
}

/// Creates (or truncates) `path` with `bytes` of real blocks: fallocate, and
/// with `zero_fill` zeros written over them. Removes the file on failure.
fn preallocate(path: &Path, bytes: usize, zero_fill: bool) -> io::Result<File> {
    let made = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(path)
        .and_then(|f| {
            sys::fallocate(&f, bytes as u64)?;
            if zero_fill {
                write_zeros(&f, bytes)?;
            }
            Ok(f)
        });
    if made.is_err() {
        let _ = fs::remove_file(path);
    }
    made
}

/// Overwrites a file's first `bytes` with zeros, 1 MiB at a time.
fn write_zeros(f: &File, bytes: usize) -> io::Result<()> {
    use std::os::unix::fs::FileExt;
    let z = vec![0u8; 1 << 20];
    let mut off = 0;
    while off < bytes {
        let n = z.len().min(bytes - off);
        f.write_all_at(&z[..n], off as u64)?;
        off += n;
    }
    Ok(())
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> OpenError + '_ {
    move |source| OpenError::Io {
        path: path.to_owned(),
        source,
    }
}

pub use wire::layout::{list_segments, segment_path, shard_dir};

/// Maps a segment read-only.
pub fn map_readonly(path: &Path) -> io::Result<Mmap> {
    let f = File::open(path)?;
    // SAFETY: segment files are created and owned by the gateway, preallocated
    // to their full size and never truncated while it runs; readers only see
    // bytes change from zero to a sealed frame, and validate every frame by
    // CRC before use.
    unsafe { Mmap::map(&f) }
}

fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

impl ShardLog {
    /// Opens (recovering) or creates the log of one shard.
    pub fn open(cfg: &LogConfig, now_ms: i64) -> Result<(ShardLog, Recovery), OpenError> {
        let dir = cfg.dir.clone();
        fs::create_dir_all(&dir).map_err(io_err(&dir))?;
        assert!(cfg.segment_bytes >= 64 * 1024 && cfg.segment_bytes.is_multiple_of(4096));
        adopt_or_remove_spares(&dir, cfg.shard).map_err(io_err(&dir))?;
        let mut rec = Recovery::default();
        let mut segs = settle_compressed(&dir, &mut rec).map_err(io_err(&dir))?;
        // A last segment whose header never became durable held nothing that
        // was acknowledged (its first group commit would have synced the
        // header page too): it is a spare that was being put to use.
        if let Some(last) = segs.last().filter(|s| !s.compressed) {
            let empty_header = map_readonly(&last.path)
                .map(|m| m.len() >= HEADER_LEN && m[..HEADER_LEN].iter().all(|&b| b == 0))
                .unwrap_or(false);
            if empty_header {
                fs::remove_file(&last.path).map_err(io_err(&last.path))?;
                segs.pop();
            }
        }
        let mut sealed = Vec::new();
        let mut next_seq = seq_floor(&dir);
        let mut active = None;
        let mut active_chain_next = 0;
        for (i, seg) in segs.iter().enumerate() {
            let (base, path) = (&seg.base_seq, &seg.path);
            let last = i + 1 == segs.len();
            if *base < next_seq && i > 0 {
                return Err(quarantine(&dir, seg, "seq chain goes backwards"));
            }
            if seg.compressed {
                // Sealed and whole when it got its name; any damage since
                // is found here, before anything is read from it.
                let bytes = fs::read(path).map_err(io_err(path))?;
                let h = match segz::verify(&bytes) {
                    Ok(h) if h.base_seq == *base && h.shard == cfg.shard => h,
                    Ok(_) => return Err(quarantine(&dir, seg, "header does not match file name")),
                    Err(e) => return Err(quarantine(&dir, seg, &e.to_string())),
                };
                rec.segments += 1;
                rec.compressed += 1;
                rec.frames += h.last_seq + 1 - h.base_seq;
                rec.last_partial_seq = rec.last_partial_seq.max(h.last_partial_seq);
                next_seq = next_seq.max(h.last_seq + 1);
                sealed.push(Sealed {
                    path: path.clone(),
                    base_seq: h.base_seq,
                    last_seq: h.last_seq,
                    sealed_ms: now_ms,
                    created_ms: h.created_ms,
                    last_event_ms: h.last_event_ms,
                    compressed: true,
                    disk_bytes: bytes.len() as u64,
                    raw_bytes: h.raw_bytes,
                    compressing: false,
                    compress_retry_at_ms: 0,
                });
                continue;
            }
            let file = OpenOptions::new()
                .read(true)
                .write(true)
                .open(path)
                .map_err(io_err(path))?;
            // SAFETY: as in `map_readonly`; this process is the only writer.
            let mut map = unsafe { MmapMut::map_mut(&file) }.map_err(io_err(path))?;
            let header = match SegmentHeader::decode(&map) {
                Ok(h) if h.base_seq == *base && h.shard == cfg.shard => h,
                Ok(_) => return Err(quarantine(&dir, seg, "header does not match file name")),
                Err(e) => return Err(quarantine(&dir, seg, &e.to_string())),
            };
            let scan = segment::scan(&map, header.base_seq);
            match scan.tail {
                Tail::Clean => {}
                Tail::Torn if last => {
                    let dirty = map[scan.end..]
                        .iter()
                        .rposition(|&b| b != 0)
                        .map_or(0, |p| p + 1);
                    map[scan.end..scan.end + dirty].fill(0);
                    map.flush_range(scan.end, dirty.max(1).min(map.len() - scan.end))
                        .map_err(io_err(path))?;
                    rec.torn_bytes += dirty as u64;
                }
                Tail::Torn => {
                    return Err(quarantine(
                        &dir,
                        seg,
                        &format!("torn tail in a sealed segment at byte {}", scan.end),
                    ))
                }
                Tail::Corrupt { at, resumes_at } => {
                    let what =
                        format!("damaged frame at byte {at}, whole frames resume at {resumes_at}");
                    drop(map);
                    return Err(quarantine(&dir, seg, &what));
                }
            }
            rec.segments += 1;
            rec.frames += scan.frames;
            for f in segment::frames(&map, scan.end) {
                if f.ty == RecordType::Partial as u8 {
                    rec.last_partial_seq = f.seq;
                }
            }
            let last_seq = scan.last_seq.unwrap_or(header.base_seq - 1);
            next_seq = next_seq.max(last_seq + 1);
            if last {
                active_chain_next = last_seq + 1;
                active = Some(Active {
                    file,
                    map,
                    base_seq: header.base_seq,
                    created_ms: header.created_ms,
                    write_off: scan.end,
                    populated_to: 0,
                });
            } else {
                sealed.push(Sealed {
                    path: path.clone(),
                    base_seq: header.base_seq,
                    last_seq,
                    sealed_ms: now_ms,
                    created_ms: header.created_ms,
                    last_event_ms: i64::MAX,
                    compressed: false,
                    disk_bytes: map.len() as u64,
                    raw_bytes: (scan.end - HEADER_LEN) as u64,
                    compressing: false,
                    compress_retry_at_ms: 0,
                });
            }
        }
        let fresh = active.is_none();
        let mut log = ShardLog {
            dir,
            shard: cfg.shard,
            gateway_id: cfg.gateway_id.clone(),
            segment_bytes: cfg.segment_bytes,
            disk_budget_bytes: cfg.disk_budget_bytes,
            // Replaced below when there was no segment.
            active: match active {
                Some(a) => a,
                None => Self::create_segment(
                    &cfg.dir,
                    cfg.shard,
                    &cfg.gateway_id,
                    cfg.segment_bytes,
                    next_seq.max(1),
                    now_ms,
                    cfg.zero_fill,
                )
                .map_err(io_err(&cfg.dir))?,
            },
            sealed,
            next_seq: next_seq.max(1),
            create_retry_at_ms: 0,
            create_errno: None,
            partial_buf: Vec::with_capacity(64 * 1024),
            spare: Spare::start(cfg.dir.clone(), cfg.segment_bytes, cfg.zero_fill),
            sync_on_rotate: cfg.sync_on_rotate,
            zero_fill: cfg.zero_fill,
            stage: Vec::with_capacity(64 * 1024),
            stage_off: 0,
            writes: std::collections::VecDeque::new(),
            write_next_id: 0,
            durable_seq: 0,
            last_partial_seq: rec.last_partial_seq,
            spare_bufs: Vec::new(),
            partial_reserve_bytes: cfg.partial_reserve_bytes,
            squeezer: cfg
                .compress
                .map(|c| Squeezer::start(cfg.dir.clone(), cfg.shard, c)),
            compress_stats: CompressStats::default(),
            shipped_seq: 0,
            marks: std::collections::VecDeque::new(),
        };
        // A seq floor from quarantined files may be past the active segment's
        // chain; start a fresh segment then, so the chain inside a file holds.
        if !fresh && active_chain_next < log.next_seq {
            log.rotate(now_ms).map_err(|e| OpenError::Io {
                path: log.dir.clone(),
                source: io::Error::other(e.to_string()),
            })?;
        }
        log.stage_off = log.active.write_off;
        log.durable_seq = log.next_seq - 1;
        log.maybe_request_spare();
        Ok((log, rec))
    }

    /// Asks the helper for the next segment file if the disk budget leaves
    /// room for it beside the active and sealed ones.
    fn maybe_request_spare(&mut self) {
        if self.sealed_bytes() + 2 * self.segment_bytes as u64 <= self.disk_budget_bytes {
            self.spare.request();
        }
    }

    /// Bytes the sealed segments take on disk.
    fn sealed_bytes(&self) -> u64 {
        self.sealed.iter().map(|s| s.disk_bytes).sum()
    }

    /// Whether a next segment fits the budget beside the sealed ones and
    /// the active one, once every shipped segment is counted as free (they
    /// go, retention or not, when the room is needed: see `rotate`).
    fn next_segment_fits(&self) -> bool {
        let kept: u64 = self
            .sealed
            .iter()
            .filter(|s| !self.recyclable(s, i64::MAX, 0))
            .map(|s| s.disk_bytes)
            .sum();
        kept + 2 * self.segment_bytes as u64 <= self.disk_budget_bytes
    }

    /// Whether `s` may be deleted: every record in it shipped, sealed at
    /// least `retention_ms` before `now_ms`, not the segment holding the
    /// newest partial, not being compressed.
    fn recyclable(&self, s: &Sealed, now_ms: i64, retention_ms: i64) -> bool {
        s.last_seq <= self.shipped_seq
            && now_ms.saturating_sub(s.sealed_ms) >= retention_ms
            && !(s.base_seq..=s.last_seq).contains(&self.last_partial_seq)
            && !s.compressing
    }

    /// Puts a prepared spare to use as the segment starting at `base_seq`.
    fn adopt_spare(
        &self,
        file: File,
        tmp: &Path,
        base_seq: u64,
        now_ms: i64,
    ) -> io::Result<Active> {
        let path = segment_path(&self.dir, base_seq);
        // SAFETY: the helper created and preallocated this file for us alone.
        let mut map = unsafe { MmapMut::map_mut(&file) }?;
        let header = SegmentHeader {
            shard: self.shard,
            base_seq,
            created_ms: now_ms,
            gateway_id: self.gateway_id.clone(),
        };
        map[..HEADER_LEN].copy_from_slice(&header.encode());
        // The header page becomes durable with the first group commit of the
        // new segment; the name, with a later directory sync (recovery finds
        // a renamed-but-unsynced spare by its header either way).
        fs::rename(tmp, &path)?;
        Ok(Active {
            file,
            map,
            base_seq,
            created_ms: now_ms,
            write_off: HEADER_LEN,
            populated_to: 0,
        })
    }

    #[allow(clippy::too_many_arguments)]
    fn create_segment(
        dir: &Path,
        shard: u16,
        gateway_id: &str,
        bytes: usize,
        base_seq: u64,
        now_ms: i64,
        zero_fill: bool,
    ) -> io::Result<Active> {
        let path = segment_path(dir, base_seq);
        let tmp = path.with_extension("seg.tmp");
        let file = preallocate(&tmp, bytes, zero_fill)?;
        // SAFETY: we just created and preallocated this file; see `map_readonly`.
        let mut map = unsafe { MmapMut::map_mut(&file) }?;
        let header = SegmentHeader {
            shard,
            base_seq,
            created_ms: now_ms,
            gateway_id: gateway_id.to_owned(),
        };
        map[..HEADER_LEN].copy_from_slice(&header.encode());
        map.flush_range(0, HEADER_LEN)?;
        file.sync_all()?;
        fs::rename(&tmp, &path)?;
        sync_dir(dir)?;
        Ok(Active {
            file,
            map,
            base_seq,
            created_ms: now_ms,
            write_off: HEADER_LEN,
            populated_to: 0,
        })
    }

    /// Seals the active segment (durably) and starts the next.
    fn rotate(&mut self, now_ms: i64) -> Result<(), AppendError> {
        // The sealed segments, the one being sealed and the next must fit.
        // Shipped segments kept for retention make room when it is needed.
        let fits =
            |log: &Self| log.sealed_bytes() + 2 * log.segment_bytes as u64 <= log.disk_budget_bytes;
        if !fits(self) {
            self.recycle(self.shipped_seq, 0, now_ms);
        }
        if !fits(self) {
            return Err(AppendError::Budget);
        }
        if now_ms < self.create_retry_at_ms {
            return Err(AppendError::Io(match self.create_errno {
                Some(code) => io::Error::from_raw_os_error(code),
                None => io::Error::other("segment creation backing off"),
            }));
        }
        // Everything in the old segment becomes durable before the next one
        // exists: recovery relies on the chain being whole across files.
        let t0 = std::time::Instant::now();
        // Writes of this segment still in flight in the kernel may land after
        // a crash or never: write their bytes again here (same bytes, same
        // offsets), so the sealed segment is whole once it is synced.
        {
            use std::os::unix::fs::FileExt;
            let base = self.active.base_seq;
            for w in self.writes.iter().filter(|w| !w.done && w.base_seq == base) {
                self.active.file.write_all_at(&w.buf, w.offset)?;
            }
        }
        self.write_stage_now()?;
        if self.sync_on_rotate {
            self.active.file.sync_data()?;
        } else {
            self.spare.sync_in_background(&self.active.file);
        }
        // Done, in order behind any write of the old segment still in flight.
        let id = self.next_write_id();
        self.writes.push_back(InFlight {
            id,
            last_seq: self.next_seq - 1,
            done: true,
            base_seq: self.active.base_seq,
            offset: 0,
            buf: Vec::new(),
        });
        self.advance_durable();
        let synced_us = t0.elapsed().as_micros() as u64;
        let prepared = match self.spare.take() {
            Some((file, tmp)) => match self.adopt_spare(file, &tmp, self.next_seq, now_ms) {
                Ok(a) => Some(a),
                Err(e) => {
                    let _ = fs::remove_file(&tmp);
                    tracing::warn!(error = %e, "could not use the prepared segment");
                    None
                }
            },
            None => None,
        };
        let next = match prepared {
            Some(a) => a,
            None => match Self::create_segment(
                &self.dir,
                self.shard,
                &self.gateway_id,
                self.segment_bytes,
                self.next_seq,
                now_ms,
                self.zero_fill,
            ) {
                Ok(a) => a,
                Err(e) => {
                    self.create_retry_at_ms = now_ms + 1000;
                    self.create_errno = e.raw_os_error();
                    return Err(e.into());
                }
            },
        };
        let old = std::mem::replace(&mut self.active, next);
        self.stage_off = self.active.write_off;
        self.sealed.push(Sealed {
            path: segment_path(&self.dir, old.base_seq),
            base_seq: old.base_seq,
            last_seq: self.next_seq - 1,
            sealed_ms: now_ms,
            created_ms: old.created_ms,
            last_event_ms: i64::MAX,
            compressed: false,
            disk_bytes: old.map.len() as u64,
            raw_bytes: (old.write_off - HEADER_LEN) as u64,
            compressing: false,
            compress_retry_at_ms: 0,
        });
        self.maybe_request_spare();
        tracing::info!(
            shard = self.shard,
            base_seq = self.active.base_seq,
            sync_us = synced_us,
            total_us = t0.elapsed().as_micros() as u64,
            "segment rotated"
        );
        Ok(())
    }

    /// Room for a frame with `payload` bytes, rotating if needed.
    /// Room for a frame with `payload` bytes, rotating if needed. An event
    /// may not take the partial reserve at the end of the active segment
    /// while no next segment fits the budget.
    fn reserve(&mut self, payload: usize, now_ms: i64, event: bool) -> Result<usize, AppendError> {
        let need = segment::frame_len(payload);
        if need > self.segment_bytes - HEADER_LEN - self.partial_reserve_bytes {
            return Err(AppendError::TooLarge(payload));
        }
        let end = self.active.write_off + need;
        if end > self.active.map.len() {
            self.rotate(now_ms)?;
        } else if event
            && end > self.active.map.len() - self.partial_reserve_bytes
            && !self.next_segment_fits()
        {
            return Err(AppendError::Budget);
        }
        Ok(need)
    }

    /// Makes sure an event of `payload` bytes can be appended without failing
    /// (rotating now if needed).
    pub fn ensure_room(&mut self, payload: usize, now_ms: i64) -> Result<(), AppendError> {
        self.reserve(payload, now_ms, true).map(|_| ())
    }

    /// Appends an event record; returns its seq. Not durable until the shard's
    /// next sync completes.
    pub fn append_event(&mut self, e: &EventRef<'_>, now_ms: i64) -> Result<u64, AppendError> {
        let len = e.encoded_len();
        let need = self.reserve(len, now_ms, true)?;
        let start = self.stage.len();
        self.stage.resize(start + need, 0);
        e.encode_into(&mut self.stage[start + segment::FRAME_HEADER_LEN..]);
        Ok(self.seal(start, len, RecordType::Event))
    }

    /// Appends the partial produced by `make` with the seq it will have.
    pub fn append_partial(&mut self, p: &PartialRecord, now_ms: i64) -> Result<u64, AppendError> {
        assert_eq!(
            p.to_seq + 1,
            self.next_seq,
            "partial must end just before its own seq"
        );
        let mut buf = std::mem::take(&mut self.partial_buf);
        buf.clear();
        p.encode(&mut buf);
        let r = self.reserve(buf.len(), now_ms, false).map(|need| {
            let start = self.stage.len();
            self.stage.resize(start + need, 0);
            self.stage
                [start + segment::FRAME_HEADER_LEN..start + segment::FRAME_HEADER_LEN + buf.len()]
                .copy_from_slice(&buf);
            self.seal(start, buf.len(), RecordType::Partial)
        });
        self.partial_buf = buf;
        if let Ok(s) = r {
            self.last_partial_seq = s;
            self.mark(s, p.watermark_ms);
            assert_eq!(
                s,
                p.to_seq + 1,
                "rotation must not change the partial's seq"
            );
            daemon::faults::crash_point("gateway_partial_staged");
        }
        r
    }

    /// The seq the next record will get.
    pub fn next_seq(&self) -> u64 {
        self.next_seq
    }

    /// Seals the frame staged at `start` of the stage buffer.
    fn seal(&mut self, start: usize, len: usize, ty: RecordType) -> u64 {
        let seq = self.next_seq;
        let n = segment::seal_frame(&mut self.stage[start..], len, seq, ty);
        debug_assert_eq!(start + n, self.stage.len());
        // Pair assertion: what we wrote reads back whole (frames are 8-byte
        // aligned in the file, and the stage starts at an aligned offset).
        debug_assert_eq!(
            segment::read_frame(&self.stage, start).map(|f| f.seq),
            Some(seq)
        );
        self.active.write_off += n;
        self.next_seq += 1;
        debug_assert_eq!(self.stage_off + self.stage.len(), self.active.write_off);
        seq
    }

    fn next_write_id(&mut self) -> u32 {
        let id = self.write_next_id;
        self.write_next_id = self.write_next_id.wrapping_add(1);
        id
    }

    fn advance_durable(&mut self) {
        while self.writes.front().is_some_and(|w| w.done) {
            let mut w = self.writes.pop_front().unwrap();
            self.durable_seq = self.durable_seq.max(w.last_seq);
            w.buf.clear();
            if self.spare_bufs.len() < 4 && w.buf.capacity() > 0 && w.buf.capacity() <= 1 << 20 {
                self.spare_bufs.push(w.buf);
            }
        }
    }

    /// Bytes appended but not yet handed to a write.
    pub fn staged_bytes(&self) -> usize {
        self.stage.len()
    }

    /// Hands the staged bytes to the shell to write, if there are any.
    pub fn take_write(&mut self) -> Option<PendingWrite> {
        if self.stage.is_empty() {
            return None;
        }
        let fresh = self
            .spare_bufs
            .pop()
            .unwrap_or_else(|| Vec::with_capacity(64 * 1024));
        let mut buf = std::mem::replace(&mut self.stage, fresh);
        segment::mark_write_start(&mut buf);
        let offset = self.stage_off as u64;
        self.stage_off = self.active.write_off;
        let id = self.next_write_id();
        let (ptr, len) = (buf.as_ptr(), buf.len());
        self.writes.push_back(InFlight {
            id,
            last_seq: self.next_seq - 1,
            done: false,
            base_seq: self.active.base_seq,
            offset,
            buf,
        });
        Some(PendingWrite {
            id,
            fd: self.active.file.as_raw_fd(),
            offset,
            ptr,
            len,
        })
    }

    /// A write from [`Self::take_write`] completed (durably, in `sync` mode).
    /// Returns the seq up to which every record is now written.
    pub fn write_done(&mut self, id: u32) -> u64 {
        let w = self
            .writes
            .iter_mut()
            .find(|w| w.id == id)
            .expect("completion for a write that was handed out");
        w.done = true;
        self.advance_durable();
        self.durable_seq
    }

    /// Writes the staged bytes now, synchronously, into the page cache.
    fn write_stage_now(&mut self) -> io::Result<()> {
        use std::os::unix::fs::FileExt;
        if self.stage.is_empty() {
            return Ok(());
        }
        segment::mark_write_start(&mut self.stage);
        self.active
            .file
            .write_all_at(&self.stage, self.stage_off as u64)?;
        self.stage.clear();
        self.stage_off = self.active.write_off;
        Ok(())
    }

    /// `process` durability: the staged bytes go to the page cache now.
    /// Returns the seq up to which every record is written.
    pub fn write_now(&mut self) -> io::Result<u64> {
        self.write_stage_now()?;
        if self.writes.is_empty() {
            self.durable_seq = self.next_seq - 1;
        }
        Ok(self.durable_seq)
    }

    /// Seq up to which every record has been written (and, in `sync` mode,
    /// made durable) through this log.
    pub fn durable_seq(&self) -> u64 {
        self.durable_seq
    }

    /// Has the helper thread bring the next pages the appends will write into
    /// the page cache, so the writer takes only minor faults. Measured: doing
    /// this on the shard thread (MADV_POPULATE_READ of a few MiB) sometimes
    /// took over 20 ms, which showed as the p99 of every request behind it.
    /// Called from the shard's tick; harmless to skip.
    pub fn prefault(&mut self) {
        let a = &mut self.active;
        let want = (a.write_off + PREFAULT_AHEAD).min(a.map.len());
        // Ask in steps of at least 1 MiB, so the helper gets few, large jobs.
        if a.populated_to >= want
            || (want - a.populated_to.max(a.write_off)) < (1 << 20) && want < a.map.len()
        {
            return;
        }
        let from = a.populated_to.max(a.write_off) & !4095;
        if self.spare.prefault(&a.file, from, want - from) {
            a.populated_to = want;
        }
    }

    /// The fd a group commit syncs (the active segment).
    pub fn sync_fd(&self) -> RawFd {
        self.active.file.as_raw_fd()
    }

    /// Seq of the last record appended.
    pub fn last_seq(&self) -> u64 {
        self.next_seq - 1
    }

    /// Writes what is staged and fdatasyncs the active segment, synchronously
    /// (start-up, drain and shutdown only; the event loop uses io_uring).
    pub fn sync_now(&mut self) -> io::Result<()> {
        self.write_stage_now()?;
        self.active.file.sync_data()?;
        if self.writes.is_empty() {
            self.durable_seq = self.next_seq - 1;
        }
        Ok(())
    }

    /// Bytes of segments on disk: the sealed ones, the active one, and a
    /// spare being or already prepared.
    pub fn disk_bytes(&self) -> u64 {
        let spare = if self.spare.requested {
            self.segment_bytes as u64
        } else {
            0
        };
        self.sealed_bytes() + self.segment_bytes as u64 + spare
    }

    pub fn segments(&self) -> usize {
        self.sealed.len() + 1
    }

    /// Of the sealed segments, how many are compressed.
    pub fn compressed_segments(&self) -> usize {
        self.sealed.iter().filter(|s| s.compressed).count()
    }

    pub fn compress_stats(&self) -> CompressStats {
        self.compress_stats
    }

    /// Deletes sealed segments whose every record the shipper acknowledged
    /// (`shipped_seq`) and that are older than `retention_ms`. Returns how many.
    pub fn recycle(&mut self, shipped_seq: u64, retention_ms: i64, now_ms: i64) -> usize {
        self.shipped_seq = self.shipped_seq.max(shipped_seq);
        let mut n = 0;
        while let Some(s) = self.sealed.first() {
            if !self.recyclable(s, now_ms, retention_ms) {
                break;
            }
            if fs::remove_file(&s.path).is_err() {
                break;
            }
            self.sealed.remove(0);
            n += 1;
        }
        if n > 0 {
            let _ = sync_dir(&self.dir);
            self.maybe_request_spare();
        }
        let shipped = self.shipped_seq;
        // Marks at or before the newest one not past the shipped seq are
        // no longer needed: that one bounds the oldest unshipped record.
        while self.marks.len() > 1 && self.marks[1].0 <= shipped {
            self.marks.pop_front();
        }
        n
    }

    fn mark(&mut self, seq: u64, ms: i64) {
        if self.marks.len() >= MARKS_MAX {
            // Keep the oldest, drop every other one after it.
            let mut keep = 0;
            self.marks.retain(|_| {
                keep += 1;
                keep % 2 == 1
            });
        }
        self.marks.push_back((seq, ms));
    }

    /// The budget and what holds it.
    pub fn buffer(&self) -> BufferStats {
        let shipped = self.shipped_seq;
        let unshipped_sealed: u64 = self
            .sealed
            .iter()
            .filter(|s| s.last_seq > shipped)
            .map(|s| s.disk_bytes)
            .sum();
        let all = self.disk_bytes();
        let oldest_unshipped_ms = (self.last_seq() > shipped).then(|| {
            // The newest mark not past the shipped seq: every record after
            // it, the oldest unshipped one included, came after its time.
            // Without one, the segment that holds the record: it was
            // created before it.
            let mark = self
                .marks
                .iter()
                .rev()
                .find(|(seq, _)| *seq <= shipped)
                .map(|m| m.1);
            let seg = self
                .sealed
                .iter()
                .find(|s| s.last_seq > shipped)
                .map_or(self.active.created_ms, |s| s.created_ms);
            mark.map_or(seg, |m| m.max(seg))
        });
        let (raw, disk) = self
            .sealed
            .iter()
            .filter(|s| s.compressed)
            .fold((0u64, 0u64), |(r, d), s| {
                (r + s.raw_bytes, d + s.disk_bytes)
            });
        BufferStats {
            budget_bytes: self.disk_budget_bytes,
            unshipped_bytes: unshipped_sealed + (all - self.sealed_bytes()),
            disk_bytes: all,
            oldest_unshipped_ms,
            disk_per_raw: if raw > 0 {
                disk as f64 / raw as f64
            } else {
                1.0
            },
        }
    }

    /// Takes back what the compressor finished and hands it the next sealed
    /// segment worth compressing: the oldest one not compressed that is not
    /// about to be deleted (`retention_ms`, as `recycle` judges). One at a
    /// time. Called from the shard's tick.
    pub fn compress_step(&mut self, now_ms: i64, retention_ms: i64) {
        let Some(sq) = &self.squeezer else { return };
        while let Ok(done) = sq.done.try_recv() {
            let Some(s) = self.sealed.iter_mut().find(|s| s.base_seq == done.base_seq) else {
                continue;
            };
            s.compressing = false;
            match done.result {
                Ok(d) => {
                    self.compress_stats.segments += 1;
                    self.compress_stats.bytes_in += s.disk_bytes;
                    self.compress_stats.bytes_out += d.disk_bytes;
                    self.compress_stats.cpu_ns += d.cpu_ns;
                    s.path = d.path;
                    s.compressed = true;
                    s.disk_bytes = d.disk_bytes;
                    s.raw_bytes = d.raw_bytes;
                    s.last_event_ms = d.last_event_ms;
                }
                Err(e) => {
                    self.compress_stats.failures += 1;
                    s.compress_retry_at_ms = now_ms + 60_000;
                    tracing::error!(shard = self.shard, segment = %s.path.display(), error = %e, "compressing a sealed segment failed; it stays as it is, retried in a minute");
                }
            }
        }
        if self.sealed.iter().any(|s| s.compressing) {
            return;
        }
        let next = self.sealed.iter().position(|s| {
            !s.compressed
                && s.compress_retry_at_ms <= now_ms
                && s.last_seq >= s.base_seq
                && !self.recyclable(s, now_ms, retention_ms)
        });
        if let Some(i) = next {
            let s = &self.sealed[i];
            let job = SqueezeJob {
                base_seq: s.base_seq,
                src: s.path.clone(),
                dst: segz_path(&self.dir, s.base_seq),
            };
            if sq.jobs.send(job).is_ok() {
                self.sealed[i].compressing = true;
            }
        }
    }

    /// Visits every whole frame of every segment, oldest first (what is
    /// written; call before appending, as start-up does).
    pub fn replay(&self, f: impl FnMut(&Frame<'_>)) -> io::Result<()> {
        self.replay_from(i64::MIN, 0, f)
    }

    /// Like [`Self::replay`], except that a compressed segment is skipped
    /// when every event in it was received before `since_ms` and every
    /// record in it is at or before `after_seq` (start-up wants the dedup
    /// horizon and what follows the last partial; decompressing hours of
    /// buffered clicks for neither would only slow the start).
    pub fn replay_from(
        &self,
        since_ms: i64,
        after_seq: u64,
        mut f: impl FnMut(&Frame<'_>),
    ) -> io::Result<()> {
        for s in &self.sealed {
            if s.compressed {
                if s.last_event_ms < since_ms && s.last_seq <= after_seq {
                    continue;
                }
                let bytes = fs::read(&s.path)?;
                segz::for_each_frame(&bytes, &mut f)
                    .map_err(|e| io::Error::other(format!("{}: {e}", s.path.display())))?;
                continue;
            }
            let map = map_readonly(&s.path)?;
            let scan = segment::scan(&map, s.base_seq);
            segment::frames(&map, scan.end).for_each(|fr| f(&fr));
        }
        // The active segment up to what is written (staged bytes, and writes
        // still in flight, are not in the file yet).
        let map = &self.active.map[..];
        let scan = segment::scan(map, self.active.base_seq);
        segment::frames(map, scan.end).for_each(|fr| f(&fr));
        Ok(())
    }
}

/// The compressor of one shard's sealed segments: a thread of its own
/// (`segz-shard-<n>`, niced like the spare preparer), one segment at a time.
///
/// For a segment it compresses the whole frames ([`wire::segz`]), checks
/// that the result decodes to exactly those frames (pair assertion), writes
/// `<base>.segz.tmp`, syncs it, renames it to `<base>.segz`, syncs the
/// directory, and only then removes the `.seg` and syncs the directory
/// again. A crash at any step leaves the original, or a whole compressed
/// copy, or both; recovery ([`settle_compressed`]) keeps exactly one.
struct Squeezer {
    jobs: std::sync::mpsc::Sender<SqueezeJob>,
    done: std::sync::mpsc::Receiver<SqueezeDone>,
}

struct SqueezeJob {
    base_seq: u64,
    src: PathBuf,
    dst: PathBuf,
}

struct SqueezeDone {
    base_seq: u64,
    result: io::Result<Squeezed>,
}

struct Squeezed {
    path: PathBuf,
    disk_bytes: u64,
    raw_bytes: u64,
    last_event_ms: i64,
    cpu_ns: u64,
}

impl Squeezer {
    fn start(dir: PathBuf, shard: u16, cfg: CompressConfig) -> Squeezer {
        let (jobs, jobs_rx) = std::sync::mpsc::channel::<SqueezeJob>();
        let (done_tx, done) = std::sync::mpsc::channel();
        let _ = std::thread::Builder::new()
            .name(format!("segz-shard-{shard}"))
            .spawn(move || {
                sys::lower_thread_priority(10);
                while let Ok(job) = jobs_rx.recv() {
                    let result = squeeze(&dir, &job, cfg);
                    if result.is_err() {
                        let _ = fs::remove_file(job.dst.with_extension("segz.tmp"));
                    }
                    let done = SqueezeDone {
                        base_seq: job.base_seq,
                        result,
                    };
                    if done_tx.send(done).is_err() {
                        return;
                    }
                }
            });
        Squeezer { jobs, done }
    }
}

/// Compresses one sealed segment (see [`Squeezer`]).
fn squeeze(dir: &Path, job: &SqueezeJob, cfg: CompressConfig) -> io::Result<Squeezed> {
    let cpu0 = sys::thread_cpu_ns();
    let map = map_readonly(&job.src)?;
    let header = SegmentHeader::decode(&map).map_err(io::Error::other)?;
    let scan = segment::scan(&map, header.base_seq);
    if scan.tail != Tail::Clean || header.base_seq != job.base_seq {
        return Err(io::Error::other("the sealed segment is not whole"));
    }
    let bytes =
        segz::compress(&map, scan.end, cfg.level, cfg.chunk_bytes).map_err(io::Error::other)?;
    // Pair assertion: the copy reads back as exactly the frames it was made
    // from, before the original may go.
    let mut originals = segment::frames(&map, scan.end);
    let mut same = true;
    let h = segz::for_each_frame(&bytes, |f| {
        same &= originals.next().is_some_and(|o| {
            o.seq == f.seq && o.ty == f.ty && o.flags == f.flags && o.payload == f.payload
        });
    })
    .map_err(io::Error::other)?;
    if !same || originals.next().is_some() {
        return Err(io::Error::other(
            "the compressed copy does not read back as the original",
        ));
    }
    let cpu_ns = sys::thread_cpu_ns().saturating_sub(cpu0);
    let tmp = job.dst.with_extension("segz.tmp");
    {
        use std::io::Write;
        let mut f = File::create(&tmp)?;
        f.write_all(&bytes)?;
        f.sync_all()?;
    }
    daemon::faults::crash_point("gateway_segz_written");
    fs::rename(&tmp, &job.dst)?;
    sync_dir(dir)?;
    daemon::faults::crash_point("gateway_segz_renamed");
    fs::remove_file(&job.src)?;
    daemon::faults::crash_point("gateway_segz_original_removed");
    sync_dir(dir)?;
    Ok(Squeezed {
        path: job.dst.clone(),
        disk_bytes: bytes.len() as u64,
        raw_bytes: h.raw_bytes,
        last_event_ms: h.last_event_ms,
        cpu_ns,
    })
}

/// Settles what a crash during compression left, and lists the segments:
/// a `.segz.tmp` is removed (never renamed, so never whole for sure); where
/// a base has both files, a compressed copy that verifies replaces the
/// original, and one that does not is removed (the original is whole).
fn settle_compressed(dir: &Path, rec: &mut Recovery) -> io::Result<Vec<SegmentFile>> {
    let mut changed = false;
    for entry in fs::read_dir(dir)? {
        let p = entry?.path();
        if p.file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.ends_with(".segz.tmp"))
        {
            fs::remove_file(&p)?;
            rec.compressions_settled += 1;
            changed = true;
        }
    }
    let mut segs: Vec<SegmentFile> = Vec::new();
    for f in list_segment_files(dir)? {
        let Some(prev) = segs.last().filter(|p| p.base_seq == f.base_seq) else {
            segs.push(f);
            continue;
        };
        // `prev` is the original, `f` its compressed copy (listed after it).
        let whole = fs::read(&f.path)
            .ok()
            .and_then(|b| segz::verify(&b).ok())
            .is_some_and(|h| h.base_seq == f.base_seq);
        if whole {
            fs::remove_file(&prev.path)?;
            segs.pop();
            segs.push(f);
        } else {
            tracing::warn!(path = %f.path.display(), "a compressed copy left by a crash does not verify; the original is kept");
            fs::remove_file(&f.path)?;
        }
        rec.compressions_settled += 1;
        changed = true;
    }
    if changed {
        sync_dir(dir)?;
    }
    Ok(segs)
}

/// Reads a range of a segment into the page cache through a mapping of the
/// helper's own (the shard's mapping is untouched).
fn prefault_range(file: &File, from: usize, len: usize) {
    // SAFETY: see `map_readonly`; the mapping is read-only and dropped here.
    let map = unsafe {
        memmap2::MmapOptions::new()
            .offset(from as u64)
            .len(len)
            .map(file)
    };
    if let Ok(m) = map {
        let _ = m.advise(memmap2::Advice::PopulateRead);
    }
}

/// Deals with spare files left by an earlier run: one with a valid header was
/// in use (renamed back to its seq name), one without was never used (removed).
fn adopt_or_remove_spares(dir: &Path, shard: u16) -> io::Result<()> {
    for entry in fs::read_dir(dir)? {
        let p = entry?.path();
        let name = p.file_name().and_then(|n| n.to_str()).unwrap_or("");
        if !name.ends_with(".seg.tmp") {
            continue;
        }
        let header = map_readonly(&p)
            .ok()
            .and_then(|m| SegmentHeader::decode(&m).ok());
        match header {
            Some(h) if h.shard == shard => fs::rename(&p, segment_path(dir, h.base_seq))?,
            _ => fs::remove_file(&p)?,
        }
    }
    sync_dir(dir)
}

/// The seq after any record ever seen in a quarantined file of this shard, so
/// seqs never repeat after a quarantine.
fn seq_floor(dir: &Path) -> u64 {
    let q = dir.join("quarantine");
    let mut floor = 1;
    if let Ok(rd) = fs::read_dir(&q) {
        for e in rd.flatten() {
            if let Some(s) = e
                .path()
                .extension()
                .filter(|x| *x == "seqfloor")
                .and_then(|_| fs::read_to_string(e.path()).ok())
                .and_then(|s| s.trim().parse::<u64>().ok())
            {
                floor = floor.max(s + 1);
            }
        }
    }
    floor
}

fn quarantine(dir: &Path, seg: &SegmentFile, what: &str) -> OpenError {
    let path = &seg.path;
    let q = dir.join("quarantine");
    let name = path.file_name().unwrap_or_default();
    let dest = q.join(name);
    // The highest seq of any record the file may hold, so the log never
    // reuses a seq that might have been shipped.
    let max_seq = if seg.compressed {
        compressed_seq_floor(path).unwrap_or(seg.base_seq)
    } else {
        let mut max_seq = 0;
        if let Ok(map) = map_readonly(path) {
            let mut off = HEADER_LEN;
            while off + segment::FRAME_HEADER_LEN <= map.len() {
                if let Some(f) = segment::read_frame(&map, off) {
                    max_seq = max_seq.max(f.seq);
                    off = f.end();
                } else {
                    off += 8;
                }
            }
        }
        max_seq
    };
    let moved = fs::create_dir_all(&q)
        .and_then(|_| {
            fs::write(
                q.join(name).with_extension("seqfloor"),
                format!("{max_seq}\n"),
            )
        })
        .and_then(|_| fs::rename(path, &dest))
        .and_then(|_| sync_dir(dir));
    OpenError::Corrupt {
        path: path.to_owned(),
        what: match moved {
            Ok(()) => what.to_owned(),
            Err(e) => format!("{what}; moving it to quarantine failed: {e}"),
        },
        quarantined: dest,
    }
}

/// The last seq a damaged compressed segment may hold: its header's, or,
/// with the header damaged, the highest its readable chunk headers name.
fn compressed_seq_floor(path: &Path) -> Option<u64> {
    let b = fs::read(path).ok()?;
    if let Ok(h) = SegzHeader::decode(&b) {
        return Some(h.last_seq);
    }
    let mut top = None;
    let mut off = segz::HEADER_LEN;
    while off + segz::CHUNK_HEADER_LEN <= b.len() {
        if let Ok(c) = segz::ChunkHeader::decode(&b[off..], off) {
            top = top.max(Some(c.last_seq));
        }
        off += 8;
    }
    top
}

/// The request handler's view of the log (its inherent methods, by name).
impl Log for ShardLog {
    fn ensure_room(&mut self, payload: usize, now_ms: i64) -> Result<(), AppendError> {
        ShardLog::ensure_room(self, payload, now_ms)
    }

    fn append_event(&mut self, e: &EventRef<'_>, now_ms: i64) -> Result<u64, AppendError> {
        ShardLog::append_event(self, e, now_ms)
    }

    fn append_partial(&mut self, p: &PartialRecord, now_ms: i64) -> Result<u64, AppendError> {
        ShardLog::append_partial(self, p, now_ms)
    }

    fn next_seq(&self) -> u64 {
        ShardLog::next_seq(self)
    }

    fn last_seq(&self) -> u64 {
        ShardLog::last_seq(self)
    }

    fn segments(&self) -> usize {
        ShardLog::segments(self)
    }

    fn disk_bytes(&self) -> u64 {
        ShardLog::disk_bytes(self)
    }

    fn buffer(&self) -> BufferStats {
        ShardLog::buffer(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use wire::record::{Device, EventKind, Source, Verdict};

    fn cfg(dir: &Path) -> LogConfig {
        LogConfig {
            dir: dir.to_owned(),
            shard: 0,
            gateway_id: "test".into(),
            segment_bytes: 64 * 1024,
            disk_budget_bytes: 1 << 30,
            zero_fill: false,
            sync_on_rotate: true,
            partial_reserve_bytes: 4096,
            compress: None,
        }
    }

    fn event(id: &str) -> EventRef<'_> {
        EventRef {
            kind: EventKind::Click,
            verdict: Verdict::Accepted,
            source: Source::Get,
            device: Device::Desktop,
            country: *b"ZZ",
            event_ms: 1_800_000_000_000,
            receive_ms: 1_800_000_000_000,
            signed_ts_s: 1_800_000_000,
            cost_micros: 1,
            client_ip: [0; 16],
            kid: "k",
            advertiser_id: "a",
            campaign_id: "c",
            ad_id: "d",
            click_id: id,
            user_id: "u",
            redirect_url: "https://x/",
        }
    }

    fn ids(log: &ShardLog) -> Vec<String> {
        let mut v = Vec::new();
        log.replay(|f| {
            if f.ty == RecordType::Event as u8 {
                v.push(EventRef::decode(f.payload).unwrap().click_id.to_owned());
            }
        })
        .unwrap();
        v
    }

    #[test]
    fn appends_survive_reopen_across_rotations() {
        let d = tempfile::tempdir().unwrap();
        let (mut log, _) = ShardLog::open(&cfg(d.path()), 0).unwrap();
        let names: Vec<String> = (0..2000).map(|i| format!("click-{i}")).collect();
        for n in &names {
            log.append_event(&event(n), 0).unwrap();
        }
        assert!(log.segments() > 2, "should have rotated");
        let last = log.last_seq();
        log.sync_now().unwrap();
        drop(log);
        let (log, rec) = ShardLog::open(&cfg(d.path()), 0).unwrap();
        assert_eq!(rec.frames, 2000);
        assert_eq!(log.last_seq(), last);
        assert_eq!(ids(&log), names);
    }

    #[test]
    fn rotation_uses_prepared_spares_and_recovery_cleans_up_after_them() {
        let d = tempfile::tempdir().unwrap();
        let (mut log, _) = ShardLog::open(&cfg(d.path()), 0).unwrap();
        let mut names = Vec::new();
        for i in 0..3000 {
            names.push(format!("c{i}"));
            log.append_event(&event(&names[i]), 0).unwrap();
            if i % 100 == 0 {
                // Give the helper a moment, as a running shard would have.
                std::thread::sleep(std::time::Duration::from_millis(2));
            }
        }
        assert!(log.segments() >= 4);
        log.sync_now().unwrap();
        drop(log);
        // A spare that was renamed but whose header never became durable
        // (power loss right after rotation) must not stop recovery.
        let segs = list_segments(d.path()).unwrap();
        let last_base = segs.last().unwrap().base_seq;
        let fake = segment_path(d.path(), last_base + 1_000_000);
        let f = File::create(&fake).unwrap();
        sys::fallocate(&f, 64 * 1024).unwrap();
        // And an unused spare left behind.
        File::create(d.path().join("spare-1-9.seg.tmp"))
            .unwrap()
            .set_len(4096)
            .unwrap();
        let (log, rec) = ShardLog::open(&cfg(d.path()), 0).unwrap();
        assert_eq!(rec.frames, 3000);
        assert_eq!(ids(&log), names);
        assert!(!fake.exists());
        assert!(!d.path().join("spare-1-9.seg.tmp").exists());
    }

    #[test]
    fn torn_tail_is_zeroed_and_appending_resumes() {
        let d = tempfile::tempdir().unwrap();
        let (mut log, _) = ShardLog::open(&cfg(d.path()), 0).unwrap();
        for i in 0..10 {
            log.append_event(&event(&format!("c{i}")), 0).unwrap();
        }
        log.sync_now().unwrap();
        let off = log.active.write_off;
        // A torn record: garbage where the 11th would go.
        log.active.map[off..off + 40].fill(0x5A);
        drop(log);
        let (mut log, rec) = ShardLog::open(&cfg(d.path()), 0).unwrap();
        assert_eq!(rec.frames, 10);
        assert_eq!(rec.torn_bytes, 40);
        assert_eq!(log.append_event(&event("after"), 0).unwrap(), 11);
        log.sync_now().unwrap();
        drop(log);
        let (log, _) = ShardLog::open(&cfg(d.path()), 0).unwrap();
        assert_eq!(ids(&log).last().unwrap(), "after");
    }

    #[test]
    fn mid_file_damage_is_quarantined_and_reported() {
        let d = tempfile::tempdir().unwrap();
        let (mut log, _) = ShardLog::open(&cfg(d.path()), 0).unwrap();
        for i in 0..10 {
            log.append_event(&event(&format!("c{i}")), 0).unwrap();
            if i == 4 {
                // Two writes: damage in the first, when the second is whole,
                // cannot be a power cut.
                log.sync_now().unwrap();
            }
        }
        log.sync_now().unwrap();
        log.active.map[HEADER_LEN + 30] ^= 0x10;
        drop(log);
        let err = ShardLog::open(&cfg(d.path()), 0).err().unwrap();
        assert!(matches!(err, OpenError::Corrupt { .. }), "{err}");
        assert!(err.to_string().contains("damaged frame"), "{err}");
        assert!(d.path().join("quarantine").read_dir().unwrap().count() >= 2);
        // Restarting continues past every seq ever written.
        let (mut log, _) = ShardLog::open(&cfg(d.path()), 0).unwrap();
        assert_eq!(log.append_event(&event("new"), 0).unwrap(), 11);
    }

    #[test]
    fn durability_advances_over_completed_writes_in_order_only() {
        let d = tempfile::tempdir().unwrap();
        let (mut log, _) = ShardLog::open(&cfg(d.path()), 0).unwrap();
        log.append_event(&event("a"), 0).unwrap();
        let w1 = log.take_write().unwrap();
        log.append_event(&event("b"), 0).unwrap();
        log.append_event(&event("c"), 0).unwrap();
        let w2 = log.take_write().unwrap();
        assert!(log.take_write().is_none(), "nothing staged");
        assert_eq!(w2.offset as usize, w1.offset as usize + w1.len);
        // The shell performs the writes; the later one finishing first proves
        // nothing about the earlier.
        use std::os::unix::fs::FileExt;
        let bytes = |w: &PendingWrite| {
            // SAFETY: the log keeps these bytes until write_done(w.id).
            unsafe { std::slice::from_raw_parts(w.ptr, w.len) }.to_vec()
        };
        log.active
            .file
            .write_all_at(&bytes(&w2), w2.offset)
            .unwrap();
        assert_eq!(log.write_done(w2.id), 0);
        log.active
            .file
            .write_all_at(&bytes(&w1), w1.offset)
            .unwrap();
        assert_eq!(log.write_done(w1.id), 3);
        assert_eq!(log.durable_seq(), 3);
        // Staged bytes are only in the file once written.
        log.append_event(&event("d"), 0).unwrap();
        let mut seen = Vec::new();
        log.replay(|f| seen.push(f.seq)).unwrap();
        assert!(!seen.contains(&4));
        log.write_now().unwrap();
        let mut seen = Vec::new();
        log.replay(|f| seen.push(f.seq)).unwrap();
        assert!(seen.contains(&4));
    }

    #[test]
    fn budget_full_refuses_instead_of_growing() {
        let d = tempfile::tempdir().unwrap();
        let mut c = cfg(d.path());
        c.disk_budget_bytes = 2 * 64 * 1024;
        let (mut log, _) = ShardLog::open(&c, 0).unwrap();
        let mut err = None;
        for i in 0..10_000 {
            if let Err(e) = log.append_event(&event(&format!("c{i}")), 0) {
                err = Some(e);
                break;
            }
        }
        assert!(matches!(err, Some(AppendError::Budget)));
        assert_eq!(log.segments(), 2);
        // Once the shipper acknowledges the sealed segment, room comes back.
        assert_eq!(log.recycle(log.last_seq(), 0, 0), 1);
        log.append_event(&event("again"), 0).unwrap();
    }

    fn compressing(dir: &Path) -> LogConfig {
        LogConfig {
            compress: Some(CompressConfig {
                level: 3,
                chunk_bytes: 16 * 1024,
            }),
            ..cfg(dir)
        }
    }

    /// Lets the compressor finish every sealed segment (bounded: a stuck
    /// compressor fails the test instead of hanging it).
    fn compress_all(log: &mut ShardLog) {
        for _ in 0..2000 {
            log.compress_step(0, 0);
            if log.compressed_segments() == log.sealed.len() {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        panic!(
            "{} of {} sealed segments compressed",
            log.compressed_segments(),
            log.sealed.len()
        );
    }

    /// Events with ids `c{from}..c{to}`, appended and written.
    fn fill(log: &mut ShardLog, from: usize, to: usize) -> Vec<String> {
        let names: Vec<String> = (from..to).map(|i| format!("click-{i:06}")).collect();
        for n in &names {
            log.append_event(&event(n), 0).unwrap();
        }
        log.sync_now().unwrap();
        names
    }

    fn files(dir: &Path, ext: &str) -> usize {
        fs::read_dir(dir)
            .unwrap()
            .flatten()
            .filter(|e| e.path().extension().is_some_and(|x| x == ext))
            .count()
    }

    #[test]
    fn sealed_segments_are_compressed_and_read_back_whole() {
        let d = tempfile::tempdir().unwrap();
        let (mut log, _) = ShardLog::open(&compressing(d.path()), 0).unwrap();
        let names = fill(&mut log, 0, 3000);
        let sealed = log.sealed.len();
        assert!(sealed >= 3, "should have rotated");
        let before = log.disk_bytes();
        compress_all(&mut log);
        assert_eq!(files(d.path(), "segz"), sealed);
        assert_eq!(files(d.path(), "seg"), 1, "only the active segment stays");
        let z = log.compress_stats();
        assert_eq!((z.segments, z.failures), (sealed as u64, 0));
        assert!(z.bytes_out * 4 < z.bytes_in, "{z:?}");
        assert!(log.disk_bytes() < before);
        assert!(log.buffer().disk_per_raw < 0.5);
        assert_eq!(ids(&log), names);
        drop(log);
        let (log, rec) = ShardLog::open(&compressing(d.path()), 0).unwrap();
        assert_eq!((rec.frames, rec.compressed), (3000, sealed));
        assert_eq!(ids(&log), names);
        // A start-up replay that wants neither the dedup horizon nor
        // anything after the last partial skips the compressed segments.
        let mut n = 0;
        log.replay_from(i64::MAX, u64::MAX, |_| n += 1).unwrap();
        assert!(n < 3000 / sealed as u64 + 1, "{n}");
    }

    #[test]
    fn a_failed_compression_is_counted_keeps_the_segment_and_is_retried() {
        let d = tempfile::tempdir().unwrap();
        let (mut log, _) = ShardLog::open(&compressing(d.path()), 0).unwrap();
        let names = fill(&mut log, 0, 1500);
        assert!(log.sealed.len() >= 2);
        // The compressor cannot create its temporary file where a directory
        // stands (as with a full or failing disk).
        let base = log.sealed[0].base_seq;
        let blocker = segz_path(d.path(), base).with_extension("segz.tmp");
        fs::create_dir(&blocker).unwrap();
        let mut failed = false;
        for _ in 0..2000 {
            log.compress_step(0, 0);
            if log.compress_stats().failures > 0 {
                failed = true;
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        assert!(failed, "the failure was not reported");
        assert!(!log.sealed[0].compressed);
        assert!(log.sealed[0].path.exists());
        assert_eq!(ids(&log), names);
        // Not retried within the minute, retried after it.
        fs::remove_dir(&blocker).unwrap();
        for _ in 0..200 {
            log.compress_step(30_000, 0);
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        assert!(!log.sealed[0].compressed);
        for _ in 0..2000 {
            log.compress_step(61_000, 0);
            if log.sealed[0].compressed {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        assert!(log.sealed[0].compressed);
        assert_eq!(log.compress_stats().failures, 1);
        assert_eq!(ids(&log), names);
    }

    #[test]
    fn a_crash_at_any_step_of_compression_leaves_every_record_once() {
        // The images a crash can leave, built from a real sealed segment:
        // (.seg, .segz.tmp), (.seg, .segz), (.segz), and a copy that does
        // not verify beside its original.
        for case in 0..4 {
            let d = tempfile::tempdir().unwrap();
            let (mut log, _) = ShardLog::open(&cfg(d.path()), 0).unwrap();
            let names = fill(&mut log, 0, 800);
            let first = &log.sealed[0];
            let (src, base) = (first.path.clone(), first.base_seq);
            drop(log);
            let bytes = fs::read(&src).unwrap();
            let scan = segment::scan(&bytes, base);
            let z = segz::compress(&bytes, scan.end, 3, 16 * 1024).unwrap();
            let dst = segz_path(d.path(), base);
            match case {
                0 => fs::write(dst.with_extension("segz.tmp"), &z[..z.len() / 2]).unwrap(),
                1 => fs::write(&dst, &z).unwrap(),
                2 => {
                    fs::write(&dst, &z).unwrap();
                    fs::remove_file(&src).unwrap();
                }
                _ => {
                    let mut bad = z.clone();
                    let n = bad.len();
                    bad[n - 20] ^= 0x40;
                    fs::write(&dst, &bad).unwrap();
                }
            }
            let (log, rec) = ShardLog::open(&compressing(d.path()), 0).unwrap();
            assert_eq!(ids(&log), names, "case {case}");
            assert_eq!(rec.frames, 800, "case {case}");
            let plain = src.exists();
            let compressed = dst.exists();
            assert!(plain != compressed, "case {case}: exactly one of the two");
            assert_eq!(compressed, case == 1 || case == 2, "case {case}");
            let leftover = fs::read_dir(d.path()).unwrap().flatten().any(|e| {
                e.file_name()
                    .to_str()
                    .is_some_and(|n| n.ends_with(".segz.tmp"))
            });
            assert!(!leftover, "case {case}");
        }
    }

    #[test]
    fn a_damaged_compressed_segment_is_quarantined_and_named() {
        let d = tempfile::tempdir().unwrap();
        let (mut log, _) = ShardLog::open(&compressing(d.path()), 0).unwrap();
        fill(&mut log, 0, 2000);
        compress_all(&mut log);
        let victim = log.sealed[1].path.clone();
        let last_seq = log.sealed[1].last_seq;
        drop(log);
        let mut b = fs::read(&victim).unwrap();
        let at = segz::HEADER_LEN + segz::CHUNK_HEADER_LEN + 10;
        b[at] ^= 1;
        fs::write(&victim, b).unwrap();
        let err = ShardLog::open(&compressing(d.path()), 0).err().unwrap();
        let msg = err.to_string();
        assert!(
            msg.contains(victim.file_name().unwrap().to_str().unwrap()) && msg.contains("checksum"),
            "{msg}"
        );
        assert!(!victim.exists());
        let floor = d
            .path()
            .join("quarantine")
            .join(victim.file_name().unwrap())
            .with_extension("seqfloor");
        assert_eq!(
            fs::read_to_string(floor).unwrap().trim(),
            last_seq.to_string()
        );
    }

    #[test]
    fn compression_multiplies_what_the_budget_holds() {
        // The same budget, filled with and without compression: the
        // records it took before refusing.
        let held = |compress: bool| {
            let d = tempfile::tempdir().unwrap();
            let mut c = if compress {
                compressing(d.path())
            } else {
                cfg(d.path())
            };
            c.disk_budget_bytes = 8 * 64 * 1024;
            let (mut log, _) = ShardLog::open(&c, 0).unwrap();
            let mut n = 0;
            for i in 0..1_000_000 {
                match log.append_event(&event(&format!("click-{i:08}")), 0) {
                    Ok(_) => n += 1,
                    Err(AppendError::Budget) => {
                        // Give the compressor its turn, as the shard's tick
                        // does, before taking the refusal as final.
                        log.sync_now().unwrap();
                        if compress && log.compressed_segments() < log.sealed.len() {
                            compress_all(&mut log);
                            continue;
                        }
                        break;
                    }
                    Err(e) => panic!("{e}"),
                }
            }
            n
        };
        let (plain, squeezed) = (held(false), held(true));
        // This test's ids compress far better than real ones; the 8x target
        // is measured on loadgen's clicks (docs/BENCHMARKS.md).
        assert!(squeezed > 4 * plain, "{plain} plain, {squeezed} compressed");
    }

    #[test]
    fn a_full_budget_keeps_room_for_partials_and_shipped_segments_make_room() {
        let d = tempfile::tempdir().unwrap();
        let mut c = cfg(d.path());
        c.disk_budget_bytes = 3 * 64 * 1024;
        c.partial_reserve_bytes = 8 * 1024;
        let (mut log, _) = ShardLog::open(&c, 0).unwrap();
        let mut i = 0;
        let err = loop {
            match log.append_event(&event(&format!("c{i}")), 0) {
                Ok(_) => i += 1,
                Err(e) => break e,
            }
        };
        assert!(matches!(err, AppendError::Budget));
        // Events stop short of the reserve; a partial still fits.
        assert!(log.active.write_off <= log.active.map.len() - 8 * 1024 + 512);
        let p = PartialRecord {
            from_seq: 0,
            to_seq: log.next_seq() - 1,
            watermark_ms: 7,
            rows: vec![],
            unrecorded: vec![(1, 5)],
        };
        log.append_partial(&p, 0).unwrap();
        // Shipped segments kept for retention go when the room is needed:
        // retention is a floor for idle disks, not a reason to refuse.
        assert_eq!(log.recycle(log.last_seq() - 1, i64::MAX, 0), 0);
        log.append_event(&event("after"), 0).unwrap();
        assert!(log.segments() <= 3);
    }

    #[test]
    fn the_oldest_unshipped_record_is_dated_by_the_partials_around_it() {
        let d = tempfile::tempdir().unwrap();
        let (mut log, _) = ShardLog::open(&cfg(d.path()), 1_000).unwrap();
        assert_eq!(log.buffer().oldest_unshipped_ms, None);
        let mut from = 0;
        for t in [10_000, 20_000, 30_000] {
            log.append_event(&event("x"), t).unwrap();
            let p = PartialRecord {
                from_seq: from,
                to_seq: log.next_seq() - 1,
                watermark_ms: t + 500,
                rows: vec![],
                unrecorded: vec![],
            };
            from = log.append_partial(&p, t).unwrap();
        }
        // Nothing shipped: the segment's creation bounds it.
        assert_eq!(log.buffer().oldest_unshipped_ms, Some(1_000));
        // Shipped through the first partial (seq 2): the next record came
        // after that partial was written.
        log.recycle(2, i64::MAX, 40_000);
        assert_eq!(log.buffer().oldest_unshipped_ms, Some(10_500));
        log.recycle(4, i64::MAX, 40_000);
        assert_eq!(log.buffer().oldest_unshipped_ms, Some(20_500));
        log.recycle(log.last_seq(), i64::MAX, 40_000);
        assert_eq!(log.buffer().oldest_unshipped_ms, None);
        let b = log.buffer();
        assert_eq!(b.unshipped_bytes, log.disk_bytes());
    }

    #[test]
    fn partials_carry_their_range() {
        let d = tempfile::tempdir().unwrap();
        let (mut log, _) = ShardLog::open(&cfg(d.path()), 0).unwrap();
        log.append_event(&event("a"), 0).unwrap();
        let p = PartialRecord {
            from_seq: 0,
            to_seq: log.next_seq() - 1,
            watermark_ms: 5,
            rows: vec![],
            unrecorded: Vec::new(),
        };
        let s = log.append_partial(&p, 0).unwrap();
        assert_eq!(s, 2);
        log.sync_now().unwrap();
        drop(log);
        let (_, rec) = ShardLog::open(&cfg(d.path()), 0).unwrap();
        assert_eq!(rec.last_partial_seq, 2);
    }

    #[test]
    fn segment_with_the_newest_partial_is_kept() {
        let d = tempfile::tempdir().unwrap();
        let (mut log, _) = ShardLog::open(&cfg(d.path()), 0).unwrap();
        let partial = |log: &ShardLog, from| PartialRecord {
            from_seq: from,
            to_seq: log.next_seq() - 1,
            watermark_ms: 0,
            rows: vec![],
            unrecorded: Vec::new(),
        };
        let p1 = log.append_partial(&partial(&log, 0), 0).unwrap();
        let mut i = 0;
        while log.segments() < 2 {
            log.append_event(&event(&format!("c{i}")), 0).unwrap();
            i += 1;
        }
        log.write_now().unwrap();
        // Everything is shipped, but the sealed segment holds the only partial:
        // without it a restart would not know where the next partial starts.
        assert_eq!(log.recycle(log.last_seq(), 0, 0), 0);
        log.append_partial(&partial(&log, p1), 0).unwrap();
        log.write_now().unwrap();
        assert_eq!(log.recycle(log.last_seq(), 0, 0), 1);
    }

    /// A power cut, simulated: the segment files on disk are the durable
    /// bytes (every completed write reached them), and the write in flight at
    /// the cut lands page by page, any subset of its 4 KiB pages. From many
    /// such images, recovery must keep every acknowledged record, in order,
    /// and never take the cut for corruption.
    #[test]
    fn power_cut_images_keep_every_acknowledged_record() {
        use std::os::unix::fs::FileExt;
        let seeds: u64 = std::env::var("POWER_CUT_SEEDS")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(150);
        let mut rng = 0x2545_f491_4f6c_dd1du64;
        let mut next = move |n: u64| crate::xorshift64(&mut rng) % n;
        for seed in 0..seeds {
            let d = tempfile::tempdir().unwrap();
            let mut c = cfg(d.path());
            c.zero_fill = true;
            c.segment_bytes = 128 * 1024;
            let (mut log, _) = ShardLog::open(&c, 0).unwrap();
            let mut acked = 0u64;
            let mut n = 0u64;
            let (w, target) = loop {
                // A turn: some appends (long ids make multi-page writes).
                for _ in 0..1 + next(60) {
                    n += 1;
                    let id = format!("{n}-{}", "x".repeat(next(200) as usize));
                    log.append_event(&event(&id), 0).unwrap();
                }
                let w = log.take_write().unwrap();
                // SAFETY: the log keeps the bytes until write_done(w.id).
                let bytes = unsafe { std::slice::from_raw_parts(w.ptr, w.len) }.to_vec();
                if next(4) == 0 && acked > 0 {
                    break (w, bytes);
                }
                log.active.file.write_all_at(&bytes, w.offset).unwrap();
                acked = log.write_done(w.id);
            };
            // The cut: copy what is on disk, then land a subset of the
            // in-flight write's pages into the active segment's copy.
            let img = tempfile::tempdir().unwrap();
            for e in fs::read_dir(d.path()).unwrap() {
                let p = e.unwrap().path();
                if p.extension().is_some_and(|x| x == "seg") {
                    fs::copy(&p, img.path().join(p.file_name().unwrap())).unwrap();
                }
            }
            let active = segment_path(img.path(), log.active.base_seq);
            let f = OpenOptions::new().write(true).open(&active).unwrap();
            let (start, end) = (w.offset as usize, w.offset as usize + target.len());
            let mut page = start / wire::segment::PAGE * wire::segment::PAGE;
            let mut landed = 0;
            while page < end {
                let (a, b) = (page.max(start), (page + wire::segment::PAGE).min(end));
                if next(2) == 0 {
                    f.write_all_at(&target[a - start..b - start], a as u64)
                        .unwrap();
                    landed += 1;
                }
                page += wire::segment::PAGE;
            }
            drop(f);
            drop(log);
            let mut rc = cfg(img.path());
            rc.zero_fill = true;
            rc.segment_bytes = 128 * 1024;
            let (log, rec) = ShardLog::open(&rc, 0).unwrap_or_else(|e| {
                panic!("seed {seed}: recovery refused a power-cut image ({landed} of the in-flight write's pages landed): {e}")
            });
            let mut seqs = Vec::new();
            log.replay(|f| seqs.push(f.seq)).unwrap();
            assert!(
                seqs.len() as u64 >= acked && seqs.iter().copied().eq(1..=seqs.len() as u64),
                "seed {seed}: acknowledged up to {acked}, recovered {:?}..{:?} ({} frames, torn {} bytes)",
                seqs.first(),
                seqs.last(),
                seqs.len(),
                rec.torn_bytes
            );
        }
    }
}
