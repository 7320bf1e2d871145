//! The merge rules, decided without the store: given a batch, the source's
//! cursors and the watermark, what changes (which rows, which go to the late
//! table, which versions bump, what the shipper is answered). [`crate::store`]
//! applies what these functions decide, in one redb transaction; the
//! reconciler uses the same time rules.
//!
//! Nothing here reads a clock or touches a file: `now_ms` and the current
//! values are arguments, so the rules are unit-tested without a store.

use std::collections::BTreeMap;
use std::sync::Arc;

use wire::batch::{items, Ack, Batch, BatchKind, Status};
use wire::record::{Counts, EventRef, PartialRecord, RowKey};
use wire::segment::RecordType;

use crate::rows::Row;

/// The time and routing rules of one aggregator.
#[derive(Debug, Clone)]
pub struct Rules {
    /// A minute is final once the watermark is this far past its end, ms.
    pub lateness_ms: i64,
    /// Partials for minutes further than this behind the watermark go to
    /// the late table, ms.
    pub horizon_ms: i64,
    /// A source not heard from for this long stops holding the watermark, ms.
    pub source_timeout_ms: i64,
    /// Largest decompressed batch accepted, bytes.
    pub raw_max: usize,
    /// In a cluster: the instance ids and this instance's index. Rows and
    /// events of advertisers another instance owns are refused (a shipper
    /// with a different instance list would otherwise split them silently).
    pub cluster: Option<(Arc<Vec<String>>, usize)>,
}

impl Default for Rules {
    fn default() -> Self {
        Rules {
            lateness_ms: 120_000,
            horizon_ms: 24 * 3_600_000,
            source_timeout_ms: 60_000,
            raw_max: 64 << 20,
            cluster: None,
        }
    }
}

/// A source (gateway shard) as the watermark sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SourceTime {
    /// The highest partial watermark it sent, ms.
    pub watermark_ms: i64,
    /// When a partials batch of it was last applied, ms.
    pub heard_ms: i64,
}

impl Rules {
    /// The end of `minute` plus the allowed lateness is at or before the
    /// watermark.
    pub fn is_final(&self, minute: u32, watermark_ms: i64) -> bool {
        (minute as i64 + 1) * 60_000 + self.lateness_ms <= watermark_ms
    }

    /// Further behind the watermark than the correction horizon.
    pub fn is_late(&self, minute: u32, watermark_ms: i64) -> bool {
        (minute as i64 + 1) * 60_000 + self.horizon_ms < watermark_ms
    }

    /// The lowest watermark of the sources heard from within the timeout,
    /// or the highest of all when none is; never below `stored` (the
    /// watermark never goes back).
    pub fn watermark(
        &self,
        sources: impl IntoIterator<Item = SourceTime>,
        stored: i64,
        now_ms: i64,
    ) -> i64 {
        let mut active_min: Option<i64> = None;
        let mut all_max = 0i64;
        for s in sources {
            all_max = all_max.max(s.watermark_ms);
            if self.heard_recently(s.heard_ms, now_ms) {
                active_min = Some(active_min.map_or(s.watermark_ms, |a| a.min(s.watermark_ms)));
            }
        }
        stored.max(active_min.unwrap_or(all_max))
    }

    pub fn heard_recently(&self, heard_ms: i64, now_ms: i64) -> bool {
        now_ms - heard_ms <= self.source_timeout_ms
    }

    /// Why this instance must not take `advertiser`'s data, if it must not.
    pub fn misrouted(&self, advertiser: &str) -> Option<String> {
        let (ids, me) = self.cluster.as_ref()?;
        let owner = wire::partition::owner(advertiser, ids);
        (owner != *me).then(|| {
            format!(
                "misrouted: advertiser {advertiser:?} belongs to instance {:?}, this is {:?} (do the shipper's and the aggregators' [cluster] lists match?)",
                ids[owner], ids[*me]
            )
        })
    }
}

/// Why a batch is not applied.
#[derive(Debug, PartialEq, Eq)]
pub enum Refusal {
    Duplicate,
    Gap,
    Bad(String),
}

impl Refusal {
    pub fn answer(self, c: (u64, u64)) -> Ack {
        match self {
            Refusal::Duplicate => answer(Status::Duplicate, c),
            Refusal::Gap => answer(Status::Gap, c),
            Refusal::Bad(r) => refuse(r, c),
        }
    }
}

pub fn refuse(reason: String, c: (u64, u64)) -> Ack {
    Ack {
        status: Status::Refused,
        partials_cursor: c.0,
        events_cursor: c.1,
        reason,
    }
}

pub fn answer(status: Status, c: (u64, u64)) -> Ack {
    Ack {
        status,
        partials_cursor: c.0,
        events_cursor: c.1,
        reason: String::new(),
    }
}

/// The rows a partials batch adds, and the cursor and watermark after it.
#[derive(Debug, PartialEq, Eq)]
pub struct PartialsPlan {
    pub rows: Vec<(RowKey, Counts)>,
    pub cursor: u64,
    pub watermark_ms: i64,
    /// (event minute, events) answered without a record at the gateway
    /// (its log was full): reported, never billed.
    pub unrecorded: Vec<(u32, u64)>,
}

/// The audit entries an events batch becomes: one batch frame per event
/// minute, each keyed by its minute and the first seq it covers.
#[derive(Debug, PartialEq, Eq)]
pub struct EventsPlan {
    /// (minute, after seq, batch frame).
    pub audit: Vec<(u32, u64, Vec<u8>)>,
    pub events: u64,
    /// The events cursor after the batch.
    pub cursor: u64,
    /// Users of the accepted clicks, by sketch key (minute, advertiser,
    /// campaign, ad): what unique users counts.
    pub users: BTreeMap<Vec<u8>, Vec<u64>>,
}

/// What one batch asks of the store.
#[derive(Debug, PartialEq, Eq)]
pub enum Decision {
    /// Nothing to write: answer this (hello, duplicate, gap, refused, a
    /// join of a source already known).
    Answer(Ack),
    /// A source this instance never heard of starts at these cursors.
    Join {
        cursors: (u64, u64),
    },
    Partials(PartialsPlan),
    Events(EventsPlan),
}

/// Decides what a batch does, from the batch, the gateway ids its PoP may
/// ship for, and the source's cursors (partials, events) as they stand.
pub fn decide(rules: &Rules, batch: &Batch, allowed: &[String], cur: (u64, u64)) -> Decision {
    if !allowed.contains(&batch.gateway_id) {
        return Decision::Answer(refuse(
            format!(
                "this certificate may not ship for gateway {:?}",
                batch.gateway_id
            ),
            (0, 0),
        ));
    }
    match batch.kind {
        BatchKind::Hello => Decision::Answer(answer(Status::Cursors, cur)),
        // A shard this instance has never heard of starts where the routing
        // switched to it; one it knows keeps its cursors (a repeated or late
        // join changes nothing).
        BatchKind::Join if cur == (0, 0) => Decision::Join {
            cursors: (batch.after_seq, batch.last_seq),
        },
        BatchKind::Join => Decision::Answer(answer(Status::Cursors, cur)),
        BatchKind::Partials => match plan_partials(batch, cur.0).and_then(|p| {
            match p
                .rows
                .iter()
                .find_map(|(k, _)| rules.misrouted(&k.advertiser_id))
            {
                Some(why) => Err(Refusal::Bad(why)),
                None => Ok(p),
            }
        }) {
            Err(r) => Decision::Answer(r.answer(cur)),
            Ok(p) => Decision::Partials(p),
        },
        BatchKind::Events => match plan_events(rules, batch, cur.1) {
            Err(r) => Decision::Answer(r.answer(cur)),
            Ok(p) => Decision::Events(p),
        },
    }
}

/// The decompressed payload of a batch that ends after `cursor` and starts at
/// or before it; otherwise the batch is a duplicate or a gap.
fn payload_after(batch: &Batch, cursor: u64) -> Result<Vec<u8>, Refusal> {
    if batch.last_seq <= cursor {
        return Err(Refusal::Duplicate);
    }
    if batch.after_seq > cursor {
        return Err(Refusal::Gap);
    }
    batch.decompress().map_err(|e| Refusal::Bad(e.to_string()))
}

/// Checks a partials batch against the cursor (the seq of the last partial
/// applied): what is at or before it is skipped, the first new partial must
/// start exactly at it, and each must start where the previous ended.
pub fn plan_partials(batch: &Batch, cursor: u64) -> Result<PartialsPlan, Refusal> {
    let raw = payload_after(batch, cursor)?;
    let its = items(&raw, batch.count, batch.after_seq, batch.last_seq)
        .map_err(|e| Refusal::Bad(e.to_string()))?;
    let mut plan = PartialsPlan {
        rows: Vec::new(),
        cursor,
        watermark_ms: 0,
        unrecorded: Vec::new(),
    };
    let mut prev = batch.after_seq;
    for it in &its {
        if it.ty != RecordType::Partial as u8 {
            return Err(Refusal::Bad(format!(
                "item {} is not a partial record",
                it.seq
            )));
        }
        let p = PartialRecord::decode(it.bytes)
            .map_err(|e| Refusal::Bad(format!("partial {}: {e}", it.seq)))?;
        if p.from_seq != prev || p.to_seq + 1 != it.seq {
            return Err(Refusal::Bad(format!(
                "partial {} covers ({}, {}], which does not continue from {prev}",
                it.seq, p.from_seq, p.to_seq
            )));
        }
        prev = it.seq;
        if it.seq <= cursor {
            continue;
        }
        if p.from_seq != plan.cursor {
            return Err(Refusal::Gap);
        }
        plan.cursor = it.seq;
        plan.watermark_ms = plan.watermark_ms.max(p.watermark_ms);
        plan.rows.extend(p.rows);
        plan.unrecorded.extend(p.unrecorded);
    }
    if plan.cursor != batch.last_seq {
        return Err(Refusal::Bad(
            "the last partial does not end the batch range".into(),
        ));
    }
    Ok(plan)
}

/// Checks an events batch against the events cursor and files its new
/// events by event minute: the audit trail is read a minute at a time.
pub fn plan_events(rules: &Rules, batch: &Batch, cursor: u64) -> Result<EventsPlan, Refusal> {
    let raw = payload_after(batch, cursor)?;
    let its = items(&raw, batch.count, batch.after_seq, batch.last_seq)
        .map_err(|e| Refusal::Bad(e.to_string()))?;
    let mut by_minute: BTreeMap<u32, (Vec<u8>, u32)> = BTreeMap::new();
    let mut users: BTreeMap<Vec<u8>, Vec<u64>> = BTreeMap::new();
    let mut n = 0u64;
    for it in its.iter().filter(|i| i.seq > cursor) {
        if it.ty != RecordType::Event as u8 {
            return Err(Refusal::Bad(format!(
                "item {} is not an event record",
                it.seq
            )));
        }
        let e = EventRef::decode(it.bytes)
            .map_err(|e| Refusal::Bad(format!("event {}: {e}", it.seq)))?;
        if let Some(why) = rules.misrouted(e.advertiser_id) {
            return Err(Refusal::Bad(why));
        }
        let minute = wire::minute_of(e.event_ms);
        if counts_user(&e) {
            users
                .entry(crate::uniques::key(
                    minute,
                    e.advertiser_id,
                    e.campaign_id,
                    e.ad_id,
                ))
                .or_default()
                .push(crate::uniques::user_hash(e.user_id));
        }
        let slot = by_minute.entry(minute).or_default();
        wire::batch::push_item(&mut slot.0, it.seq, it.ty, it.bytes);
        slot.1 += 1;
        n += 1;
    }
    let after = batch.after_seq.max(cursor);
    let audit = if by_minute.len() == 1 && n == batch.count as u64 {
        // The common case: the whole batch is one minute's. Keep it as it
        // came (already checked and compressed).
        let minute = *by_minute.keys().next().unwrap();
        vec![(minute, batch.after_seq, batch.encode())]
    } else {
        let mut v = Vec::with_capacity(by_minute.len());
        for (minute, (raw, count)) in by_minute {
            let b = Batch::seal(
                BatchKind::Events,
                &batch.gateway_id,
                batch.shard,
                after,
                batch.last_seq,
                count,
                &raw,
                3,
            )
            .map_err(|e| Refusal::Bad(e.to_string()))?;
            v.push((minute, after, b.encode()));
        }
        v
    };
    Ok(EventsPlan {
        audit,
        events: n,
        cursor: batch.last_seq,
        users,
    })
}

/// Whether an event's user counts as a unique user: an accepted click with
/// a user id.
pub fn counts_user(e: &EventRef<'_>) -> bool {
    e.kind == wire::record::EventKind::Click
        && e.verdict == wire::record::Verdict::Accepted
        && !e.user_id.is_empty()
}

/// What one partial row does to the store.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RowChange {
    /// Past the correction horizon: the late table's row becomes this.
    Late(Row),
    /// The minute row becomes this; `correction` when its minute was final
    /// (a new version).
    Merge { row: Row, correction: bool },
}

/// Merges one partial row into the current minute row, or into the late
/// row when the minute is past the correction horizon (`current_late` is
/// read only then).
pub fn merge_row(
    rules: &Rules,
    minute: u32,
    add: &Counts,
    watermark_ms: i64,
    current: Option<Row>,
    current_late: Option<Row>,
) -> RowChange {
    if rules.is_late(minute, watermark_ms) {
        let mut r = current_late.unwrap_or_default();
        r.counts.merge(add);
        return RowChange::Late(r);
    }
    let mut r = current.unwrap_or_default();
    r.counts.merge(add);
    let correction = rules.is_final(minute, watermark_ms);
    if correction {
        r.version += 1;
    }
    RowChange::Merge { row: r, correction }
}

/// The minute row a reconcile writes: its recount, one version above the
/// row it replaces.
pub fn corrected(current: Option<Row>, recount: Counts) -> Row {
    Row {
        counts: recount,
        version: current.map_or(0, |r| r.version) + 1,
    }
}

/// The state a point of the query API is in, for a reader who bills from it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum PointState {
    /// The watermark has not passed it plus the allowed lateness: it may
    /// still grow.
    Provisional,
    /// Final: late data would come as a correction (a new version). May
    /// still hold a click id that another PoP also counted.
    Final,
    /// Recounted from the raw events of every source with click-id dedup
    /// and the velocity rule across PoPs; corrections written.
    Reconciled,
}

impl PointState {
    pub fn as_str(self) -> &'static str {
        match self {
            PointState::Provisional => "provisional",
            PointState::Final => "final",
            PointState::Reconciled => "reconciled",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testkit::clicks;
    use wire::batch::push_item;
    use wire::record::{Device, EventKind, Source, Verdict};

    const T0: i64 = 1_795_496_400_000; // 2026-11-24T05:00:00Z

    fn key(ad: &str, minute: u32) -> RowKey {
        RowKey {
            minute,
            advertiser_id: "a".into(),
            campaign_id: "c".into(),
            ad_id: ad.into(),
            device: Device::Mobile,
            country: *b"FR",
        }
    }

    fn partials(ps: &[crate::testkit::P]) -> Batch {
        Batch::decode(&crate::testkit::partials("gw", 0, ps), 1 << 20).unwrap()
    }

    fn events(after: u64, evs: &[(u64, i64)]) -> Batch {
        let mut raw = Vec::new();
        for (seq, ms) in evs {
            let id = format!("c{seq}");
            let e = EventRef {
                kind: EventKind::Click,
                verdict: Verdict::Accepted,
                source: Source::Get,
                device: Device::Mobile,
                country: *b"FR",
                event_ms: *ms,
                receive_ms: *ms,
                signed_ts_s: ms / 1000,
                cost_micros: 1000,
                client_ip: [0; 16],
                kid: "k",
                advertiser_id: "a",
                campaign_id: "c",
                ad_id: "x",
                click_id: &id,
                user_id: "u",
                redirect_url: "https://example.com/",
            };
            let mut b = vec![0u8; e.encoded_len()];
            e.encode_into(&mut b);
            push_item(&mut raw, *seq, RecordType::Event as u8, &b);
        }
        let last = evs.last().unwrap().0 + 1;
        Batch::seal(
            BatchKind::Events,
            "gw",
            0,
            after,
            last,
            evs.len() as u32,
            &raw,
            1,
        )
        .unwrap()
    }

    #[test]
    fn plan_checks_each_partial_continues_the_last() {
        let b = partials(&[(3, 1, 0, vec![]), (7, 3, 0, vec![])]);
        assert_eq!(plan_partials(&b, 0), Err(Refusal::Gap));
        assert_eq!(plan_partials(&b, 1).unwrap().cursor, 7);
        assert_eq!(plan_partials(&b, 3).unwrap().cursor, 7);
        assert_eq!(plan_partials(&b, 7), Err(Refusal::Duplicate));
        // A cursor inside a partial's range (not a partial seq) is a gap.
        assert_eq!(plan_partials(&b, 2), Err(Refusal::Gap));
    }

    #[test]
    fn decisions_follow_the_cursor_and_the_certificate() {
        let r = Rules::default();
        let gws = ["gw".to_string()];
        let m = (T0 / 60_000) as u32;
        let b = partials(&[(2, 0, T0, vec![(key("x", m), clicks(1))])]);
        assert!(matches!(decide(&r, &b, &gws, (0, 0)), Decision::Partials(p) if p.cursor == 2));
        assert!(
            matches!(decide(&r, &b, &gws, (2, 0)), Decision::Answer(a) if a.status == Status::Duplicate)
        );
        let other = ["gw2".to_string()];
        assert!(
            matches!(decide(&r, &b, &other, (0, 0)), Decision::Answer(a) if a.status == Status::Refused && a.reason.contains("may not ship"))
        );
        let join = Batch::join("gw", 0, 40, 41);
        assert_eq!(
            decide(&r, &join, &gws, (0, 0)),
            Decision::Join { cursors: (40, 41) }
        );
        assert!(
            matches!(decide(&r, &join, &gws, (5, 5)), Decision::Answer(a) if a.partials_cursor == 5)
        );
        // In a cluster, another instance's advertiser is refused by name.
        let ids = Arc::new(vec!["agg-a".to_string(), "agg-b".to_string()]);
        let owner = wire::partition::owner("a", &ids);
        let r2 = Rules {
            cluster: Some((ids, 1 - owner)),
            ..Rules::default()
        };
        assert!(
            matches!(decide(&r2, &b, &gws, (0, 0)), Decision::Answer(a) if a.reason.contains("misrouted"))
        );
    }

    #[test]
    fn events_are_filed_by_minute_and_only_past_the_cursor() {
        let r = Rules::default();
        let m = (T0 / 60_000) as u32;
        // One minute: kept as it came.
        let one = events(0, &[(1, T0), (2, T0 + 1000)]);
        let p = plan_events(&r, &one, 0).unwrap();
        assert_eq!(p.audit.len(), 1);
        assert_eq!(p.audit[0].0, m);
        assert_eq!(p.audit[0].2, one.encode());
        assert_eq!((p.events, p.cursor), (2, 3));
        // Two minutes, the first event already stored: split, resealed from
        // the cursor.
        let two = events(0, &[(1, T0), (2, T0 + 60_000), (3, T0 + 61_000)]);
        let p = plan_events(&r, &two, 1).unwrap();
        assert_eq!(p.events, 2);
        assert_eq!(p.audit.len(), 1);
        assert_eq!((p.audit[0].0, p.audit[0].1), (m + 1, 1));
        let split = plan_events(&r, &two, 0).unwrap();
        let minutes: Vec<u32> = split.audit.iter().map(|a| a.0).collect();
        assert_eq!(minutes, vec![m, m + 1]);
        assert_eq!(plan_events(&r, &two, 4), Err(Refusal::Duplicate));
        assert_eq!(
            plan_events(&r, &events(2, &[(3, T0)]), 1),
            Err(Refusal::Gap)
        );
    }

    #[test]
    fn rows_merge_correct_or_go_late_by_the_watermark() {
        let r = Rules {
            lateness_ms: 120_000,
            horizon_ms: 3_600_000,
            ..Rules::default()
        };
        let now = (T0 / 60_000) as u32;
        let row = |n| Row {
            counts: clicks(n),
            version: 0,
        };
        // Open: merged, no version.
        assert_eq!(
            merge_row(&r, now - 1, &clicks(2), T0, Some(row(1)), None),
            RowChange::Merge {
                row: row(3),
                correction: false
            }
        );
        // Final: a correction.
        assert_eq!(
            merge_row(&r, now - 5, &clicks(2), T0, Some(row(1)), None),
            RowChange::Merge {
                row: Row {
                    counts: clicks(3),
                    version: 1
                },
                correction: true
            }
        );
        // Past the horizon: the late row grows, the minute row is untouched.
        assert_eq!(
            merge_row(&r, now - 120, &clicks(2), T0, Some(row(9)), Some(row(1))),
            RowChange::Late(row(3))
        );
        assert!(r.is_final(now - 3, T0) && !r.is_final(now - 2, T0));
        assert_eq!(
            corrected(
                Some(Row {
                    counts: clicks(5),
                    version: 2
                }),
                clicks(4)
            ),
            Row {
                counts: clicks(4),
                version: 3
            }
        );
    }

    #[test]
    fn the_watermark_is_the_slowest_recent_source_and_never_goes_back() {
        let r = Rules::default();
        let s = |wm, heard| SourceTime {
            watermark_ms: wm,
            heard_ms: heard,
        };
        let srcs = [s(T0 - 600_000, T0 - 1000), s(T0, T0)];
        assert_eq!(r.watermark(srcs, 0, T0), T0 - 600_000);
        // After the timeout only the recent one counts.
        assert_eq!(r.watermark(srcs, 0, T0 + 70_000), T0);
        // None recent: the highest of all; never below what was stored.
        assert_eq!(r.watermark(srcs, 0, T0 + 700_000), T0);
        assert_eq!(r.watermark(srcs, T0 + 5, T0), T0 + 5);
        assert_eq!(r.watermark([], 0, T0), 0);
    }
}
