//! Per-minute pre-aggregation of one shard's event records.
//!
//! The shard feeds every event record it appends ([`PreAgg::add`]); every
//! flush interval it builds a partial from the sums ([`PreAgg::partial`]),
//! appends it as a partial record covering the seq range since the previous
//! partial, and only then clears them ([`PreAgg::committed`]). The
//! partial is a pure function of the event records in its range, which is
//! what lets recovery rebuild it from the log after a crash.
//!
//! Keys are found without allocating and with one pointer-free row to look
//! at: a row holds its minute, device, country and sums inline, and its three
//! ids sit side by side in one byte arena (cleared with the rows), so a
//! lookup compares one short run of bytes instead of chasing three heap
//! strings. Only a key seen for the first time since the last flush appends
//! to the arena.

use std::hash::BuildHasher;

use hashbrown::HashTable;
use wire::record::{Counts, Device, EventRef, PartialRecord, RowKey};

struct Row {
    hash: u64,
    minute: u32,
    device: Device,
    country: [u8; 2],
    /// Where the advertiser, campaign and ad ids start in the arena, and
    /// their lengths (the ids follow each other).
    ids_at: usize,
    ids_len: [u16; 3],
    counts: Counts,
}

pub struct PreAgg {
    rows: HashTable<Row>,
    ids: Vec<u8>,
    /// foldhash, seeded per process: the ids are signed by the ad server and
    /// the table is bounded by `rows_max`, so SipHash's stronger flooding
    /// resistance buys nothing here and costs a third of a lookup.
    hasher: foldhash::fast::RandomState,
    rows_max: usize,
    /// Seq of the previous partial record (0 before the first).
    last_partial_seq: u64,
}

/// `add` could not keep a new row: the row table is at its limit. The caller
/// must flush a partial first (and then add again).
#[derive(Debug, PartialEq, Eq)]
pub struct Full;

impl PreAgg {
    pub fn new(rows_max: usize, last_partial_seq: u64) -> Self {
        Self {
            rows: HashTable::with_capacity(rows_max.min(1 << 16)),
            ids: Vec::new(),
            hasher: Default::default(),
            rows_max,
            last_partial_seq,
        }
    }

    /// The event's minute and the hash of its row key.
    fn key_hash(&self, e: &EventRef<'_>) -> (u32, u64) {
        let minute = wire::minute_of(e.event_ms);
        let h = self.hasher.hash_one((
            minute,
            e.advertiser_id,
            e.campaign_id,
            e.ad_id,
            e.device as u8,
            e.country,
        ));
        (minute, h)
    }

    /// Whether a row for this event exists or there is room for a new one.
    pub fn has_room_for(&self, e: &EventRef<'_>) -> bool {
        if self.rows.len() < self.rows_max {
            return true;
        }
        let (minute, h) = self.key_hash(e);
        self.rows
            .find(h, |r| is_row_of(r, &self.ids, minute, e))
            .is_some()
    }

    /// Counts one event record. Fails only when the row limit is reached and
    /// the event needs a new row; nothing is counted then.
    pub fn add(&mut self, e: &EventRef<'_>) -> Result<(), Full> {
        let (minute, h) = self.key_hash(e);
        let ids = &self.ids;
        if let Some(r) = self.rows.find_mut(h, |r| is_row_of(r, ids, minute, e)) {
            r.counts.add_event(e.kind, e.verdict, e.cost_micros);
            return Ok(());
        }
        if self.rows.len() >= self.rows_max {
            return Err(Full);
        }
        let ids_at = self.ids.len();
        let parts = [e.advertiser_id, e.campaign_id, e.ad_id];
        for p in parts {
            self.ids.extend_from_slice(p.as_bytes());
        }
        let mut counts = Counts::default();
        counts.add_event(e.kind, e.verdict, e.cost_micros);
        let row = Row {
            hash: h,
            minute,
            device: e.device,
            country: e.country,
            ids_at,
            // Ids are at most wire::record::ID_MAX (255) bytes: the policy
            // caps them, and records carry one-byte lengths.
            ids_len: parts.map(|p| u16::try_from(p.len()).expect("an id over 64 KiB")),
            counts,
        };
        self.rows.insert_unique(h, row, |r| r.hash);
        Ok(())
    }

    pub fn rows(&self) -> usize {
        self.rows.len()
    }

    /// The partial record to append with seq `own_seq`, without changing the
    /// sums: they are cleared by [`Self::committed`] only once the record is
    /// in the log (an append that fails, say on a full disk, loses nothing).
    /// Rows are sorted so a partial's bytes are a function of its records.
    pub fn partial(&self, own_seq: u64, watermark_ms: i64) -> PartialRecord {
        assert!(own_seq > self.last_partial_seq);
        let mut rows: Vec<(RowKey, Counts)> = self
            .rows
            .iter()
            .map(|r| {
                let [adv, camp, ad] = ids_of(r, &self.ids);
                let owned =
                    |b: &[u8]| String::from_utf8(b.to_vec()).expect("the arena holds whole ids");
                let key = RowKey {
                    minute: r.minute,
                    advertiser_id: owned(adv),
                    campaign_id: owned(camp),
                    ad_id: owned(ad),
                    device: r.device,
                    country: r.country,
                };
                (key, r.counts)
            })
            .collect();
        rows.sort_by(|a, b| a.0.cmp(&b.0));
        PartialRecord {
            from_seq: self.last_partial_seq,
            to_seq: own_seq - 1,
            watermark_ms,
            rows,
            unrecorded: Vec::new(),
        }
    }

    /// The partial made by [`Self::partial`] for `own_seq` is in the log.
    pub fn committed(&mut self, own_seq: u64) {
        assert!(own_seq > self.last_partial_seq);
        self.rows.clear();
        self.ids.clear();
        self.last_partial_seq = own_seq;
    }

    /// [`Self::partial`] then [`Self::committed`], for callers that cannot fail.
    pub fn take_partial(&mut self, own_seq: u64, watermark_ms: i64) -> PartialRecord {
        let p = self.partial(own_seq, watermark_ms);
        self.committed(own_seq);
        p
    }

    pub fn last_partial_seq(&self) -> u64 {
        self.last_partial_seq
    }
}

/// A row's advertiser, campaign and ad ids, from the arena.
fn ids_of<'a>(r: &Row, arena: &'a [u8]) -> [&'a [u8]; 3] {
    let [a, c, d] = r.ids_len.map(|l| l as usize);
    let s = &arena[r.ids_at..][..a + c + d];
    [&s[..a], &s[a..a + c], &s[a + c..]]
}

fn is_row_of(r: &Row, arena: &[u8], minute: u32, e: &EventRef<'_>) -> bool {
    let parts = [e.advertiser_id, e.campaign_id, e.ad_id];
    r.minute == minute
        && r.device == e.device
        && r.country == e.country
        && r.ids_len.map(usize::from) == parts.map(str::len)
        && ids_of(r, arena)
            .iter()
            .zip(parts)
            .all(|(have, want)| *have == want.as_bytes())
}

/// Recounts event records into rows (the reference partials are checked
/// against, and what `inspect` prints).
pub fn recount<'a>(events: impl IntoIterator<Item = EventRef<'a>>) -> Vec<(RowKey, Counts)> {
    let mut m = std::collections::BTreeMap::<RowKey, Counts>::new();
    for e in events {
        m.entry(RowKey::of(&e))
            .or_default()
            .add_event(e.kind, e.verdict, e.cost_micros);
    }
    m.into_iter().collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use wire::record::{Device, EventKind, Source, Verdict};

    fn ev(i: u64) -> (String, String, EventRef<'static>) {
        let ad = format!("ad{}", i % 7);
        let adv = format!("adv{}", i % 3);
        let e = EventRef {
            kind: if i.is_multiple_of(5) {
                EventKind::Impression
            } else {
                EventKind::Click
            },
            verdict: match i % 11 {
                0 => Verdict::Duplicate,
                1 => Verdict::Invalid,
                _ => Verdict::Accepted,
            },
            source: Source::Get,
            device: Device::ALL[(i % 5) as usize],
            country: if i.is_multiple_of(2) { *b"DE" } else { *b"ZZ" },
            event_ms: 1_800_000_000_000 + (i as i64 * 7_919) % 300_000,
            receive_ms: 0,
            signed_ts_s: 0,
            cost_micros: 1000 + i % 13,
            client_ip: [0; 16],
            kid: "k",
            advertiser_id: "",
            campaign_id: "c",
            ad_id: "",
            click_id: "x",
            user_id: "u",
            redirect_url: "",
        };
        (ad, adv, e)
    }

    #[test]
    fn partials_equal_a_recount_of_their_records() {
        let mut agg = PreAgg::new(10_000, 0);
        let data: Vec<_> = (0..5_000).map(ev).collect();
        let events: Vec<EventRef<'_>> = data
            .iter()
            .map(|(ad, adv, e)| EventRef {
                ad_id: ad,
                advertiser_id: adv,
                ..*e
            })
            .collect();
        let mut partials = Vec::new();
        let mut seq = 0u64;
        for chunk in events.chunks(700) {
            for e in chunk {
                seq += 1;
                agg.add(e).unwrap();
            }
            seq += 1;
            partials.push(agg.take_partial(seq, 0));
        }
        // Ranges tile the log.
        let mut from = 0;
        for p in &partials {
            assert_eq!(p.from_seq, from);
            from = p.to_seq + 1;
        }
        // Summed partials equal the recount.
        let mut merged = std::collections::BTreeMap::<RowKey, Counts>::new();
        for p in partials {
            for (k, c) in p.rows {
                merged.entry(k).or_default().merge(&c);
            }
        }
        let want = recount(events.iter().copied());
        assert_eq!(merged.into_iter().collect::<Vec<_>>(), want);
    }

    #[test]
    fn a_partial_that_was_not_written_loses_nothing() {
        let mut agg = PreAgg::new(100, 0);
        let (ad, adv, e) = ev(2);
        let a = EventRef {
            ad_id: &ad,
            advertiser_id: &adv,
            ..e
        };
        agg.add(&a).unwrap();
        // The append of seq 2 failed (say, disk full): the sums stay.
        let first = agg.partial(2, 0);
        assert_eq!(agg.rows(), 1);
        agg.add(&a).unwrap();
        // The retry, at the same seq, carries both events.
        let retry = agg.partial(3, 0);
        assert_eq!(retry.from_seq, first.from_seq);
        assert_eq!(
            retry.rows[0].1.clicks + retry.rows[0].1.invalid + retry.rows[0].1.duplicates,
            2
        );
        agg.committed(3);
        assert_eq!(agg.rows(), 0);
        assert_eq!(agg.partial(5, 0).from_seq, 3);
    }

    #[test]
    fn ids_that_concatenate_alike_are_different_rows() {
        let mut agg = PreAgg::new(100, 0);
        let (_, _, e) = ev(2);
        let splits = [
            ("ab", "c", "d"),
            ("a", "bc", "d"),
            ("a", "b", "cd"),
            ("abcd", "", ""),
        ];
        for (adv, camp, ad) in splits {
            let x = EventRef {
                advertiser_id: adv,
                campaign_id: camp,
                ad_id: ad,
                ..e
            };
            agg.add(&x).unwrap();
            agg.add(&x).unwrap();
        }
        let p = agg.take_partial(10, 0);
        assert_eq!(p.rows.len(), splits.len());
        for (k, c) in &p.rows {
            let total = c.clicks + c.impressions + c.duplicates + c.invalid;
            assert_eq!(total, 2, "{k:?}");
            assert!(splits.contains(&(&*k.advertiser_id, &*k.campaign_id, &*k.ad_id)));
        }
    }

    #[test]
    fn row_limit_refuses_new_rows_but_counts_existing() {
        let mut agg = PreAgg::new(2, 0);
        let (ad, adv, e) = ev(2);
        let a = EventRef {
            ad_id: &ad,
            advertiser_id: &adv,
            ..e
        };
        let b = EventRef {
            ad_id: "other",
            ..a
        };
        let c = EventRef {
            ad_id: "third",
            ..a
        };
        agg.add(&a).unwrap();
        agg.add(&b).unwrap();
        assert!(!agg.has_room_for(&c));
        assert_eq!(agg.add(&c), Err(Full));
        assert!(agg.has_room_for(&a));
        agg.add(&a).unwrap();
        let p = agg.take_partial(10, 0);
        assert_eq!(p.rows.len(), 2);
        assert_eq!(agg.rows(), 0);
    }
}
