//! Host-wide click-id dedup: a fixed-size, lock-free table shared by all shards.
//!
//! Why shared and not owner-routed: routing each click id to an owning shard
//! would put a cross-core round trip (and a wake-up of another core's event
//! loop) inside every request's latency. A table of atomics answers "first
//! time within the horizon?" in one or two cache misses from any core, with no
//! lock and no message, and is exact across shards for the same key.
//!
//! Each slot holds a 64-bit keyed fingerprint of (kind, event id) and the
//! minute it was last claimed. A key is new when its slot's minute is outside
//! the horizon and this caller wins the compare-and-swap that sets the minute;
//! concurrent inserts of one key therefore get exactly one `New`. Probing is
//! linear over a bounded window; when the window is full of live entries the
//! oldest is evicted and the eviction counted, so memory is bounded by the
//! configured entry limit. Fingerprints are 64-bit SipHash under a per-process
//! random key: a false duplicate needs a collision, about entries / 2^64 per
//! lookup (1e-12 at 16 M entries).
//!
//! The table forgets on restart; the gateway refills it from the log's event
//! records inside the horizon before it accepts traffic.

use std::hash::{BuildHasher, Hasher};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

const PROBE: usize = 16;

/// One entry of the table. All-zero bytes are a valid, empty slot (it holds
/// only atomics), so a shell may hand [`DedupTable::new_in`] zeroed memory of
/// its own choosing (the gateway's is on transparent huge pages).
#[repr(C)]
#[derive(Default)]
pub struct Slot {
    fp: AtomicU64,
    /// Minute (since the epoch) the entry was last claimed; 0 = never.
    minute: AtomicU32,
}

pub struct DedupTable {
    slots: Box<[Slot]>,
    mask: usize,
    hasher: std::collections::hash_map::RandomState,
    horizon_min: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Seen {
    New,
    Duplicate,
    /// New, but a live entry had to be evicted to remember it.
    NewEvicted,
}

impl DedupTable {
    /// Room for `entries_max` live entries: the slot count is twice that,
    /// rounded up to a power of two, so the load factor at the limit stays at
    /// or under one half and probe windows rarely fill. `horizon_min` is the
    /// dedup horizon in whole minutes (an entry lives for at least that long).
    pub fn new(entries_max: usize, horizon_min: u32) -> Self {
        Self::new_in(entries_max, horizon_min, |n| {
            (0..n).map(|_| Slot::default()).collect()
        })
    }

    /// As [`Self::new`], with the slots from `alloc(n)`: `n` empty slots.
    pub fn new_in(
        entries_max: usize,
        horizon_min: u32,
        alloc: impl FnOnce(usize) -> Box<[Slot]>,
    ) -> Self {
        let n = (entries_max.max(PROBE) * 2).next_power_of_two();
        let slots = alloc(n);
        assert_eq!(slots.len(), n);
        Self {
            slots,
            mask: n - 1,
            hasher: Default::default(),
            horizon_min: horizon_min.max(1),
        }
    }

    pub fn capacity(&self) -> usize {
        self.slots.len()
    }

    pub fn fingerprint(&self, kind: u8, id: &[u8]) -> u64 {
        let mut h = self.hasher.build_hasher();
        h.write_u8(kind);
        h.write(id);
        // 0 marks an empty slot.
        h.finish().max(1)
    }

    /// Starts loading `fp`'s probe window, so that a later
    /// `check_and_insert` finds it in cache: the table is far larger than the
    /// caches, and a miss to memory costs a few hundred ns that the caller
    /// can spend verifying the signature instead. A new id's check reads the
    /// whole window (16 slots, four or five cache lines), so every line is
    /// asked for, not only the first.
    #[inline]
    pub fn prefetch(&self, fp: u64) {
        const PER_LINE: usize = 64 / std::mem::size_of::<Slot>();
        let start = fp as usize;
        for i in (0..PROBE).step_by(PER_LINE).chain([PROBE - 1]) {
            crate::fast::prefetch(&self.slots[(start + i) & self.mask]);
        }
    }

    fn live(&self, m: u32, now_min: u32) -> bool {
        m != 0 && now_min.saturating_sub(m) < self.horizon_min
    }

    /// The lowest slot of `fp`'s probe window that holds `fp`.
    fn find(&self, start: usize, fp: u64) -> Option<usize> {
        (0..PROBE)
            .map(|i| (start + i) & self.mask)
            .find(|&idx| self.slots[idx].fp.load(Ordering::Acquire) == fp)
    }

    /// Records `fp` as seen at `now_min` and says whether it was seen before
    /// within the horizon.
    ///
    /// The canonical slot of a key is the lowest slot of its window holding
    /// it, and the compare-and-swap on that slot's minute decides `New` versus
    /// `Duplicate`. Two shards inserting one key at once may both write it
    /// (into different free slots), but both then claim the same lowest one.
    pub fn check_and_insert(&self, fp: u64, now_min: u32) -> Seen {
        assert!(fp != 0);
        let now_min = now_min.max(1);
        let start = fp as usize & self.mask;
        for _ in 0..4 {
            // One pass over the window: the key, else the first free slot,
            // else the oldest live one.
            let mut target = None;
            let mut oldest: Option<(usize, u64, u32)> = None;
            for i in 0..PROBE {
                let idx = (start + i) & self.mask;
                let slot = &self.slots[idx];
                let cur = slot.fp.load(Ordering::Acquire);
                if cur == fp {
                    return self.claim(slot, now_min, false);
                }
                if target.is_some() {
                    continue;
                }
                let m = slot.minute.load(Ordering::Acquire);
                if cur == 0 || !self.live(m, now_min) {
                    target = Some((idx, cur, false));
                } else if oldest.is_none_or(|(_, _, om)| m < om) {
                    oldest = Some((idx, cur, m));
                }
            }
            let (idx, cur, evict) =
                target.unwrap_or_else(|| oldest.map(|(i, c, _)| (i, c, true)).unwrap());
            let slot = &self.slots[idx];
            if slot
                .fp
                .compare_exchange(cur, fp, Ordering::AcqRel, Ordering::Acquire)
                .is_err()
            {
                continue;
            }
            if evict {
                // The minute belongs to the evicted key; forget it.
                slot.minute.store(0, Ordering::Release);
            }
            let j = self.find(start, fp).unwrap_or(idx);
            return self.claim(&self.slots[j], now_min, evict);
        }
        // The window changed under us four times: admit without remembering
        // (counted as an eviction by the caller).
        Seen::NewEvicted
    }

    fn claim(&self, slot: &Slot, now_min: u32, evicted: bool) -> Seen {
        let new = if evicted { Seen::NewEvicted } else { Seen::New };
        loop {
            let m = slot.minute.load(Ordering::Acquire);
            if self.live(m, now_min) {
                return Seen::Duplicate;
            }
            if slot
                .minute
                .compare_exchange(m, now_min, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
            {
                return new;
            }
        }
    }

    /// Live entries (a sweep: for metrics, not the hot path).
    pub fn live_entries(&self, now_min: u32) -> usize {
        self.live_entries_in(0..self.slots.len(), now_min)
    }

    fn live_entries_in(&self, range: std::ops::Range<usize>, now_min: u32) -> usize {
        self.slots[range]
            .iter()
            .filter(|s| {
                s.fp.load(Ordering::Relaxed) != 0
                    && self.live(s.minute.load(Ordering::Relaxed), now_min)
            })
            .count()
    }
}

/// Counts a table's live entries a slice at a time: the whole table (128 MiB
/// by default) in one go holds a core for tens of ms, and the thread that
/// counts shares its core with a shard.
#[derive(Default)]
pub struct LiveScan {
    pos: usize,
    sum: usize,
}

impl LiveScan {
    /// Counts the next `slots` slots; at the end of a pass, returns the
    /// pass's total and starts the next.
    pub fn step(&mut self, t: &DedupTable, slots: usize, now_min: u32) -> Option<usize> {
        let end = (self.pos + slots.max(1)).min(t.slots.len());
        self.sum += t.live_entries_in(self.pos..end, now_min);
        self.pos = end;
        if end < t.slots.len() {
            return None;
        }
        self.pos = 0;
        Some(std::mem::take(&mut self.sum))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn live_scan_in_slices_counts_what_a_whole_scan_counts() {
        let t = DedupTable::new(4096, 15);
        for i in 0..3000u32 {
            let fp = t.fingerprint(1, &i.to_le_bytes());
            // A third of them claimed long ago: past the horizon.
            t.check_and_insert(fp, if i % 3 == 0 { 10 } else { 100 });
        }
        let whole = t.live_entries(100);
        assert!((1900..=2000).contains(&whole), "{whole}");
        let mut scan = LiveScan::default();
        let mut passes = Vec::new();
        for _ in 0..(t.capacity() / 1000 + 1) * 2 {
            passes.extend(scan.step(&t, 1000, 100));
        }
        assert_eq!(passes, vec![whole, whole]);
    }

    #[test]
    fn second_sighting_within_horizon_is_duplicate() {
        let t = DedupTable::new(1024, 15);
        let fp = t.fingerprint(1, b"click-1");
        assert_eq!(t.check_and_insert(fp, 100), Seen::New);
        assert_eq!(t.check_and_insert(fp, 100), Seen::Duplicate);
        assert_eq!(t.check_and_insert(fp, 114), Seen::Duplicate);
        // Past the horizon it is new again.
        assert_eq!(t.check_and_insert(fp, 130), Seen::New);
    }

    #[test]
    fn an_expired_slot_earlier_in_the_window_does_not_hide_a_live_key() {
        let t = DedupTable::new(64, 15);
        // Two keys in one window: A expires, B stays live behind it.
        let a = t.fingerprint(1, b"a");
        let b = a ^ 0x1_0000_0000; // same window start (low bits), other key
        assert_eq!(t.check_and_insert(a, 10), Seen::New);
        assert_eq!(t.check_and_insert(b, 20), Seen::New);
        // At minute 30, A is expired; B (minute 20) is live.
        assert_eq!(t.check_and_insert(b, 30), Seen::Duplicate);
        assert_eq!(t.check_and_insert(a, 30), Seen::New);
        assert_eq!(t.check_and_insert(b, 31), Seen::Duplicate);
    }

    #[test]
    fn kind_is_part_of_the_key() {
        let t = DedupTable::new(1024, 15);
        assert_ne!(t.fingerprint(1, b"x"), t.fingerprint(2, b"x"));
    }

    #[test]
    fn full_table_evicts_oldest_and_says_so() {
        let t = DedupTable::new(8, 15);
        let mut evicted = 0;
        for i in 0..64u32 {
            let fp = t.fingerprint(1, &i.to_le_bytes());
            match t.check_and_insert(fp, 10 + i / 16) {
                Seen::NewEvicted => evicted += 1,
                Seen::New => {}
                Seen::Duplicate => panic!("false duplicate for {i}"),
            }
        }
        assert!(evicted >= 32, "evicted {evicted}");
        assert!(t.live_entries(13) <= t.capacity());
    }

    #[test]
    fn concurrent_inserts_of_one_key_yield_exactly_one_new() {
        for round in 0..200u32 {
            let t = Arc::new(DedupTable::new(256, 15));
            let key = round.to_le_bytes();
            let handles: Vec<_> = (0..4)
                .map(|_| {
                    let t = t.clone();
                    std::thread::spawn(move || {
                        let fp = t.fingerprint(1, &key);
                        (t.check_and_insert(fp, 50) != Seen::Duplicate) as u32
                    })
                })
                .collect();
            let news: u32 = handles.into_iter().map(|h| h.join().unwrap()).sum();
            assert_eq!(news, 1, "round {round}");
        }
    }

    #[test]
    fn many_distinct_keys_under_capacity_are_all_new() {
        let t = DedupTable::new(1 << 16, 15);
        let mut evicted = 0i64;
        for i in 0..(1u32 << 16) {
            let fp = t.fingerprint(1, &i.to_le_bytes());
            match t.check_and_insert(fp, 7) {
                Seen::Duplicate => panic!("false duplicate for {i}"),
                Seen::NewEvicted => evicted += 1,
                Seen::New => {}
            }
        }
        // At the configured limit the table is half full; a 16-slot window
        // overflows in a small fraction of inserts (measured: ~0.05%).
        assert!(evicted < 65536 / 500, "evicted {evicted}");
        let mut missed = 0i64;
        for i in 0..(1u32 << 16) {
            let fp = t.fingerprint(1, &i.to_le_bytes());
            if t.check_and_insert(fp, 8) != Seen::Duplicate {
                missed += 1;
            }
        }
        // Only keys lost to evictions (and the evictions their re-insertion
        // causes) may look new the second time.
        assert!(missed <= 4 * evicted, "missed {missed}, evicted {evicted}");
    }
}
