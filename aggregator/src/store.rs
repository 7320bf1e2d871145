//! The embedded store (redb): merged rows, the late table, per-shard cursors
//! and watermarks, and the raw audit trail, each batch applied in the same
//! write transaction as the cursor it moves.
//!
//! Several batches can share one transaction (group commit); each is checked
//! against the cursor as the earlier ones left it, before anything of it is
//! written, so a refused batch never leaves half its rows behind.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{RwLock, RwLockReadGuard};

use redb::{Database, ReadableTable, ReadableTableMetadata, TableDefinition};
use wire::batch::{items, Ack, Batch, BatchKind, Status};
use wire::record::{Counts, EventRef, PartialRecord, RowKey};
use wire::segment::RecordType;

use crate::rows::{decode_key, encode_key, prefix, Row};

/// (gateway id, shard) -> (partials cursor, events cursor).
const CURSORS: TableDefinition<(&str, u16), (u64, u64)> = TableDefinition::new("cursors");
/// (gateway id, shard) -> (watermark ms, last heard ms).
const SOURCES: TableDefinition<(&str, u16), (i64, i64)> = TableDefinition::new("sources");
/// Row key -> [`Row`].
const ROWS: TableDefinition<&[u8], &[u8]> = TableDefinition::new("rows");
/// Row key -> [`Row`] of partial rows that came past the correction horizon.
const LATE: TableDefinition<&[u8], &[u8]> = TableDefinition::new("late");
/// (event hour, gateway id, shard, after seq) -> a batch frame of the events of
/// that hour, zstd.
const AUDIT: TableDefinition<(u32, &str, u16, u64), &[u8]> = TableDefinition::new("audit");
/// Named counters and the monotonic global watermark.
const META: TableDefinition<&str, i64> = TableDefinition::new("meta");
/// Rows changed since they were last written to ClickHouse: row key -> the
/// revision (`meta["revision"]`, one per write transaction) of the change.
/// Filled only when a sink is configured (`Settings::export`).
const EXPORT: TableDefinition<&[u8], u64> = TableDefinition::new("export");

#[derive(Debug, Clone)]
pub struct Settings {
    /// A minute is final once the watermark is this far past its end.
    pub lateness_ms: i64,
    /// Partials for minutes older than this (behind the watermark) go to the
    /// late table.
    pub horizon_ms: i64,
    /// A source not heard from for this long stops holding the watermark.
    pub source_timeout_ms: i64,
    /// Largest decompressed batch accepted.
    pub raw_max: usize,
    /// Record changed rows for the ClickHouse sink.
    pub export: bool,
    /// In a cluster: the instance ids and this instance's index. Rows and
    /// events of advertisers another instance owns are refused (a shipper
    /// with a different instance list would otherwise split them silently).
    pub cluster: Option<(std::sync::Arc<Vec<String>>, usize)>,
}

impl Settings {
    /// Why this instance must not take `advertiser`'s data, if it must not.
    fn misrouted(&self, advertiser: &str) -> Option<String> {
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

impl Default for Settings {
    fn default() -> Self {
        Settings {
            lateness_ms: 120_000,
            horizon_ms: 24 * 3_600_000,
            source_timeout_ms: 60_000,
            raw_max: 64 << 20,
            export: false,
            cluster: None,
        }
    }
}

/// What applying one batch did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Effect {
    pub rows: u64,
    pub late_rows: u64,
    pub corrections: u64,
    pub events: u64,
}

pub struct Store {
    /// None between an I/O error and a successful reopen: after one, redb
    /// refuses every transaction until the database is closed and reopened.
    db: RwLock<Option<Database>>,
    path: PathBuf,
    pub settings: Settings,
}

/// A read lock on the open database, held for the length of a transaction so
/// a reopen never closes it under one.
struct Db<'a>(RwLockReadGuard<'a, Option<Database>>);

impl std::ops::Deref for Db<'_> {
    type Target = Database;
    fn deref(&self) -> &Database {
        self.0.as_ref().expect("checked open")
    }
}

fn open_db(path: &Path) -> Result<Database> {
    let db = Database::create(path).map_err(se)?;
    // Create every table, so readers never find one missing.
    let tx = db.begin_write().map_err(se)?;
    tx.open_table(CURSORS).map_err(se)?;
    tx.open_table(SOURCES).map_err(se)?;
    tx.open_table(ROWS).map_err(se)?;
    tx.open_table(LATE).map_err(se)?;
    tx.open_table(AUDIT).map_err(se)?;
    tx.open_table(META).map_err(se)?;
    tx.open_table(EXPORT).map_err(se)?;
    tx.commit().map_err(se)?;
    Ok(db)
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("store: {0}")]
    Redb(String),
}

fn se<E: std::fmt::Display>(e: E) -> StoreError {
    StoreError::Redb(e.to_string())
}

type Result<T> = std::result::Result<T, StoreError>;

/// One query's answer rows: (bucket start s, ad id) -> sums, whether every
/// minute in it is final, highest version.
pub type Series = BTreeMap<(i64, String), (Counts, bool, u32)>;

/// One gateway shard as the store knows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SourceInfo {
    pub gateway: String,
    pub shard: u16,
    /// (partials cursor, events cursor).
    pub cursors: (u64, u64),
    pub watermark_ms: i64,
    pub heard_ms: i64,
}

/// What an analytics query asks for.
#[derive(Debug, Clone)]
pub struct Query {
    pub advertiser_id: String,
    pub start_s: i64,
    pub end_s: i64,
    /// Bucket width in seconds: 60, 3600 or 86400.
    pub bucket_s: i64,
    pub campaign_id: Option<String>,
    pub ad_id: Option<String>,
}

fn refuse(reason: String, c: (u64, u64)) -> Ack {
    Ack {
        status: Status::Refused,
        partials_cursor: c.0,
        events_cursor: c.1,
        reason,
    }
}

fn answer(status: Status, c: (u64, u64)) -> Ack {
    Ack {
        status,
        partials_cursor: c.0,
        events_cursor: c.1,
        reason: String::new(),
    }
}

impl Store {
    pub fn open(path: &Path, settings: Settings) -> Result<Store> {
        let s = Store {
            db: RwLock::new(Some(open_db(path)?)),
            path: path.to_owned(),
            settings,
        };
        s.track_exports()?;
        Ok(s)
    }

    /// This store's identity, made once when the store is created: the name
    /// its rows carry in ClickHouse. It follows the data, not the
    /// configuration, so an instance renamed (or joining a cluster) keeps
    /// replacing its own rows rather than adding a second copy.
    pub fn store_id(&self) -> Result<String> {
        let db = self.db()?;
        let tx = db.begin_write().map_err(se)?;
        let id = {
            let mut meta = tx.open_table(META).map_err(se)?;
            let existing = meta.get("store_id").map_err(se)?.map(|v| v.value());
            match existing {
                Some(id) => id,
                None => {
                    let mut b = [0u8; 8];
                    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut b)
                        .map_err(|_| StoreError::Redb("no randomness for the store id".into()))?;
                    // Positive, so it reads the same as i64 and u64.
                    let id = i64::from_le_bytes(b) & i64::MAX;
                    meta.insert("store_id", id).map_err(se)?;
                    id
                }
            }
        };
        tx.commit().map_err(se)?;
        Ok(format!("{id:016x}"))
    }

    /// When the sink is turned on for a store that had it off, every row
    /// is marked for export (changes made while it was off were not
    /// tracked); when turned off, the store remembers, so that turning it on
    /// again backfills again.
    fn track_exports(&self) -> Result<()> {
        let db = self.db()?;
        let tx = db.begin_write().map_err(se)?;
        {
            let mut meta = tx.open_table(META).map_err(se)?;
            let on = meta.get("exporting").map_err(se)?.map_or(0, |v| v.value()) == 1;
            if self.settings.export && !on {
                let rows = tx.open_table(ROWS).map_err(se)?;
                let mut export = tx.open_table(EXPORT).map_err(se)?;
                let revision = meta.get("revision").map_err(se)?.map_or(0, |v| v.value()) + 1;
                let mut n = 0u64;
                for r in rows.iter().map_err(se)? {
                    let (k, _) = r.map_err(se)?;
                    export.insert(k.value(), revision as u64).map_err(se)?;
                    n += 1;
                }
                meta.insert("revision", revision).map_err(se)?;
                meta.insert("exporting", 1).map_err(se)?;
                if n > 0 {
                    tracing::info!(
                        rows = n,
                        "ClickHouse sink turned on: every row marked for export"
                    );
                }
            } else if !self.settings.export && on {
                meta.insert("exporting", 0).map_err(se)?;
            }
        }
        tx.commit().map_err(se)
    }

    /// The open database, reopening it first if an I/O error closed it.
    fn db(&self) -> Result<Db<'_>> {
        {
            let g = self.db.read().unwrap();
            if g.is_some() {
                return Ok(Db(g));
            }
        }
        self.reopen();
        let g = self.db.read().unwrap();
        if g.is_some() {
            Ok(Db(g))
        } else {
            Err(StoreError::Redb(
                "store closed after an I/O error; reopen failed".into(),
            ))
        }
    }

    /// Closes and reopens the database (what redb asks for after an I/O
    /// error such as a full disk). Waits for transactions in progress.
    fn reopen(&self) {
        let mut g = self.db.write().unwrap();
        *g = None;
        match open_db(&self.path) {
            Ok(d) => {
                tracing::info!(path = %self.path.display(), "store reopened");
                *g = Some(d);
            }
            Err(e) => {
                tracing::error!(path = %self.path.display(), error = %e, "store reopen failed; will retry")
            }
        }
    }

    /// The cursors of one source.
    pub fn cursors(&self, gateway: &str, shard: u16) -> Result<(u64, u64)> {
        let db = self.db()?;
        let tx = db.begin_read().map_err(se)?;
        let t = tx.open_table(CURSORS).map_err(se)?;
        Ok(t.get((gateway, shard))
            .map_err(se)?
            .map(|v| v.value())
            .unwrap_or((0, 0)))
    }

    /// Every source (gateway shard) the store has heard of.
    pub fn sources(&self) -> Result<Vec<SourceInfo>> {
        let db = self.db()?;
        let tx = db.begin_read().map_err(se)?;
        let c = tx.open_table(CURSORS).map_err(se)?;
        let s = tx.open_table(SOURCES).map_err(se)?;
        let mut out = Vec::new();
        for r in c.iter().map_err(se)? {
            let (k, v) = r.map_err(se)?;
            let (g, sh) = k.value();
            let (wm, heard) = s
                .get((g, sh))
                .map_err(se)?
                .map(|x| x.value())
                .unwrap_or((0, 0));
            out.push(SourceInfo {
                gateway: g.to_owned(),
                shard: sh,
                cursors: v.value(),
                watermark_ms: wm,
                heard_ms: heard,
            });
        }
        Ok(out)
    }

    /// The global watermark: the lowest of the sources heard from recently
    /// (or the highest of all when none is), never going back.
    pub fn watermark(&self, now_ms: i64) -> Result<i64> {
        let db = self.db()?;
        let tx = db.begin_read().map_err(se)?;
        let s = tx.open_table(SOURCES).map_err(se)?;
        let m = tx.open_table(META).map_err(se)?;
        let stored = m
            .get("watermark")
            .map_err(se)?
            .map(|v| v.value())
            .unwrap_or(0);
        Ok(stored.max(self.compute_watermark(&s, now_ms)?))
    }

    fn compute_watermark(
        &self,
        s: &impl ReadableTable<(&'static str, u16), (i64, i64)>,
        now_ms: i64,
    ) -> Result<i64> {
        let mut active_min: Option<i64> = None;
        let mut all_max = 0i64;
        for r in s.iter().map_err(se)? {
            let (_, v) = r.map_err(se)?;
            let (wm, heard) = v.value();
            all_max = all_max.max(wm);
            if now_ms - heard <= self.settings.source_timeout_ms {
                active_min = Some(active_min.map_or(wm, |a| a.min(wm)));
            }
        }
        Ok(active_min.unwrap_or(all_max))
    }

    pub fn is_final(&self, minute: u32, watermark_ms: i64) -> bool {
        (minute as i64 + 1) * 60_000 + self.settings.lateness_ms <= watermark_ms
    }

    fn is_late(&self, minute: u32, watermark_ms: i64) -> bool {
        (minute as i64 + 1) * 60_000 + self.settings.horizon_ms < watermark_ms
    }

    /// Applies batches (frames as received, each with the gateway ids its
    /// PoP may ship for) in one transaction. Answers one [`Ack`] per batch;
    /// on a store error nothing is committed and every answer is Retry.
    pub fn apply_many(&self, batches: &[(&[u8], &[String])], now_ms: i64) -> Vec<(Ack, Effect)> {
        match self.try_apply_many(batches, now_ms) {
            Ok(v) => v,
            Err(e) => {
                tracing::error!(error = %e, "store commit failed; reopening the store");
                self.reopen();
                batches
                    .iter()
                    .map(|_| {
                        let mut a = answer(Status::Retry, (0, 0));
                        a.reason = e.to_string();
                        (a, Effect::default())
                    })
                    .collect()
            }
        }
    }

    fn try_apply_many(
        &self,
        batches: &[(&[u8], &[String])],
        now_ms: i64,
    ) -> Result<Vec<(Ack, Effect)>> {
        let db = self.db()?;
        let tx = db.begin_write().map_err(se)?;
        let mut out = Vec::with_capacity(batches.len());
        {
            let mut cursors = tx.open_table(CURSORS).map_err(se)?;
            let mut sources = tx.open_table(SOURCES).map_err(se)?;
            let mut rows = tx.open_table(ROWS).map_err(se)?;
            let mut late = tx.open_table(LATE).map_err(se)?;
            let mut audit = tx.open_table(AUDIT).map_err(se)?;
            let mut meta = tx.open_table(META).map_err(se)?;
            let mut export = tx.open_table(EXPORT).map_err(se)?;
            let revision = meta.get("revision").map_err(se)?.map_or(0, |v| v.value()) + 1;
            let mut exported = false;
            let mut wm = meta
                .get("watermark")
                .map_err(se)?
                .map(|v| v.value())
                .unwrap_or(0)
                .max(self.compute_watermark(&sources, now_ms)?);
            for (bytes, allowed) in batches {
                let batch = match Batch::decode(bytes, self.settings.raw_max) {
                    Ok(b) => b,
                    Err(e) => {
                        out.push((
                            refuse(format!("malformed batch: {e}"), (0, 0)),
                            Effect::default(),
                        ));
                        continue;
                    }
                };
                if !allowed.contains(&batch.gateway_id) {
                    out.push((
                        refuse(
                            format!(
                                "this certificate may not ship for gateway {:?}",
                                batch.gateway_id
                            ),
                            (0, 0),
                        ),
                        Effect::default(),
                    ));
                    continue;
                }
                let key = (batch.gateway_id.as_str(), batch.shard);
                let cur = cursors
                    .get(key)
                    .map_err(se)?
                    .map(|v| v.value())
                    .unwrap_or((0, 0));
                let (ack, effect) = match batch.kind {
                    BatchKind::Hello => (answer(Status::Cursors, cur), Effect::default()),
                    // A shard this instance has never heard of starts where
                    // the routing switched to it; one it knows keeps its
                    // cursors (a repeated or late join changes nothing).
                    BatchKind::Join if cur == (0, 0) => {
                        let at = (batch.after_seq, batch.last_seq);
                        cursors.insert(key, at).map_err(se)?;
                        tracing::info!(gateway = %batch.gateway_id, shard = batch.shard, partials = at.0, events = at.1, "joined: counting from these cursors");
                        (answer(Status::Cursors, at), Effect::default())
                    }
                    BatchKind::Join => (answer(Status::Cursors, cur), Effect::default()),
                    BatchKind::Partials => match plan_partials(&batch, cur.0).and_then(|p| match p
                        .rows
                        .iter()
                        .find_map(|(k, _)| self.settings.misrouted(&k.advertiser_id))
                    {
                        Some(why) => Err(Refusal::Bad(why)),
                        None => Ok(p),
                    }) {
                        Err(a) => (a.with(cur), Effect::default()),
                        Ok(plan) => {
                            let mut eff = Effect::default();
                            for (k, c) in &plan.rows {
                                let kb = encode_key(k);
                                if self.is_late(k.minute, wm) {
                                    let mut r = late
                                        .get(kb.as_slice())
                                        .map_err(se)?
                                        .map(|v| Row::decode(v.value()))
                                        .unwrap_or_default();
                                    r.counts.merge(c);
                                    late.insert(kb.as_slice(), r.encode().as_slice())
                                        .map_err(se)?;
                                    eff.late_rows += 1;
                                    continue;
                                }
                                let mut r = rows
                                    .get(kb.as_slice())
                                    .map_err(se)?
                                    .map(|v| Row::decode(v.value()))
                                    .unwrap_or_default();
                                r.counts.merge(c);
                                if self.is_final(k.minute, wm) {
                                    r.version += 1;
                                    eff.corrections += 1;
                                }
                                rows.insert(kb.as_slice(), r.encode().as_slice())
                                    .map_err(se)?;
                                if self.settings.export {
                                    export.insert(kb.as_slice(), revision as u64).map_err(se)?;
                                    exported = true;
                                }
                                eff.rows += 1;
                            }
                            let new = (plan.cursor, cur.1);
                            cursors.insert(key, new).map_err(se)?;
                            let (old_wm, _) = sources
                                .get(key)
                                .map_err(se)?
                                .map(|v| v.value())
                                .unwrap_or((0, 0));
                            sources
                                .insert(key, (old_wm.max(plan.watermark_ms), now_ms))
                                .map_err(se)?;
                            (answer(Status::Applied, new), eff)
                        }
                    },
                    BatchKind::Events => match self.store_events(&batch, cur.1, &mut audit) {
                        Err(a) => (a.with(cur), Effect::default()),
                        Ok(n) => {
                            let new = (cur.0, batch.last_seq);
                            cursors.insert(key, new).map_err(se)?;
                            (
                                answer(Status::Applied, new),
                                Effect {
                                    events: n,
                                    ..Effect::default()
                                },
                            )
                        }
                    },
                };
                if ack.status == Status::Applied {
                    wm = wm.max(self.compute_watermark(&sources, now_ms)?);
                }
                out.push((ack, effect));
            }
            let stored = meta
                .get("watermark")
                .map_err(se)?
                .map(|v| v.value())
                .unwrap_or(0);
            if wm > stored {
                meta.insert("watermark", wm).map_err(se)?;
            }
            if exported {
                meta.insert("revision", revision).map_err(se)?;
            }
            for (name, v) in [
                (
                    "late_rows",
                    out.iter().map(|(_, e)| e.late_rows).sum::<u64>(),
                ),
                (
                    "corrections",
                    out.iter().map(|(_, e)| e.corrections).sum::<u64>(),
                ),
            ] {
                if v > 0 {
                    let old = meta.get(name).map_err(se)?.map(|x| x.value()).unwrap_or(0);
                    meta.insert(name, old + v as i64).map_err(se)?;
                }
            }
        }
        tx.commit().map_err(se)?;
        Ok(out)
    }

    /// Checks an events batch against the cursor and files its events by
    /// event hour.
    fn store_events(
        &self,
        batch: &Batch,
        cursor: u64,
        audit: &mut redb::Table<(u32, &str, u16, u64), &[u8]>,
    ) -> std::result::Result<u64, Refusal> {
        let raw = payload_after(batch, cursor)?;
        let its = items(&raw, batch.count, batch.after_seq, batch.last_seq)
            .map_err(|e| Refusal::Bad(e.to_string()))?;
        let mut by_hour: BTreeMap<u32, (Vec<u8>, u32)> = BTreeMap::new();
        let mut n = 0;
        for it in its.iter().filter(|i| i.seq > cursor) {
            if it.ty != RecordType::Event as u8 {
                return Err(Refusal::Bad(format!(
                    "item {} is not an event record",
                    it.seq
                )));
            }
            let e = EventRef::decode(it.bytes)
                .map_err(|e| Refusal::Bad(format!("event {}: {e}", it.seq)))?;
            if let Some(why) = self.settings.misrouted(e.advertiser_id) {
                return Err(Refusal::Bad(why));
            }
            let hour = (e.event_ms.max(0) / 3_600_000) as u32;
            let slot = by_hour.entry(hour).or_default();
            wire::batch::push_item(&mut slot.0, it.seq, it.ty, it.bytes);
            slot.1 += 1;
            n += 1;
        }
        if by_hour.len() == 1 && n == batch.count as u64 {
            // The common case: the whole batch is one hour's. Keep it as it
            // came (already checked and compressed).
            let hour = *by_hour.keys().next().unwrap();
            audit
                .insert(
                    (
                        hour,
                        batch.gateway_id.as_str(),
                        batch.shard,
                        batch.after_seq,
                    ),
                    batch.encode().as_slice(),
                )
                .map_err(|e| Refusal::Store(e.to_string()))?;
            return Ok(n);
        }
        for (hour, (raw, count)) in by_hour {
            let b = Batch::seal(
                BatchKind::Events,
                &batch.gateway_id,
                batch.shard,
                batch.after_seq.max(cursor),
                batch.last_seq,
                count,
                &raw,
                3,
            )
            .map_err(|e| Refusal::Bad(e.to_string()))?;
            audit
                .insert(
                    (
                        hour,
                        batch.gateway_id.as_str(),
                        batch.shard,
                        batch.after_seq.max(cursor),
                    ),
                    b.encode().as_slice(),
                )
                .map_err(|e| Refusal::Store(e.to_string()))?;
        }
        Ok(n)
    }

    /// Sums one advertiser's rows into buckets.
    pub fn query(&self, q: &Query, now_ms: i64) -> Result<Series> {
        let wm = self.watermark(now_ms)?;
        let db = self.db()?;
        let tx = db.begin_read().map_err(se)?;
        let t = tx.open_table(ROWS).map_err(se)?;
        let m0 = (q.start_s.max(0) / 60) as u32;
        let m1 = (q.end_s.max(0) as u64).div_ceil(60).min(u32::MAX as u64) as u32;
        let lo = prefix(&q.advertiser_id, m0);
        let hi = prefix(&q.advertiser_id, m1);
        let mut out = Series::new();
        for r in t.range(lo.as_slice()..hi.as_slice()).map_err(se)? {
            let (k, v) = r.map_err(se)?;
            let Some(key) = decode_key(k.value()) else {
                continue;
            };
            if q.campaign_id
                .as_ref()
                .is_some_and(|c| *c != key.campaign_id)
                || q.ad_id.as_ref().is_some_and(|a| *a != key.ad_id)
            {
                continue;
            }
            let row = Row::decode(v.value());
            let t_s = key.minute as i64 * 60;
            let bucket = t_s - t_s.rem_euclid(q.bucket_s);
            let e = out
                .entry((bucket, key.ad_id))
                .or_insert((Counts::default(), true, 0));
            e.0.merge(&row.counts);
            e.1 &= self.is_final(key.minute, wm);
            e.2 = e.2.max(row.version);
        }
        // A bucket is final only if its last minute is: a bucket with rows in
        // early minutes only may still get rows in later ones.
        for ((bucket, _), v) in out.iter_mut() {
            let last_minute = ((bucket + q.bucket_s) / 60 - 1) as u32;
            v.1 &= self.is_final(last_minute, wm);
        }
        Ok(out)
    }

    /// Every row in `[m0, m1)` minutes, all advertisers (for reconcile).
    pub fn rows_in(&self, m0: u32, m1: u32) -> Result<BTreeMap<RowKey, Row>> {
        let db = self.db()?;
        let tx = db.begin_read().map_err(se)?;
        let t = tx.open_table(ROWS).map_err(se)?;
        let mut out = BTreeMap::new();
        for r in t.iter().map_err(se)? {
            let (k, v) = r.map_err(se)?;
            if let Some(key) = decode_key(k.value()) {
                if (m0..m1).contains(&key.minute) {
                    out.insert(key, Row::decode(v.value()));
                }
            }
        }
        Ok(out)
    }

    /// The late table, all of it.
    pub fn late_rows(&self) -> Result<Vec<(RowKey, Row)>> {
        let db = self.db()?;
        let tx = db.begin_read().map_err(se)?;
        let t = tx.open_table(LATE).map_err(se)?;
        let mut out = Vec::new();
        for r in t.iter().map_err(se)? {
            let (k, v) = r.map_err(se)?;
            if let Some(key) = decode_key(k.value()) {
                out.push((key, Row::decode(v.value())));
            }
        }
        Ok(out)
    }

    pub fn meta(&self, name: &str) -> Result<i64> {
        let db = self.db()?;
        let tx = db.begin_read().map_err(se)?;
        let t = tx.open_table(META).map_err(se)?;
        Ok(t.get(name).map_err(se)?.map(|v| v.value()).unwrap_or(0))
    }

    /// Visits every audited event whose event hour is in `[h0, h1)`.
    pub fn audit_events(
        &self,
        h0: u32,
        h1: u32,
        mut f: impl FnMut(&str, &EventRef<'_>),
    ) -> Result<()> {
        let db = self.db()?;
        let tx = db.begin_read().map_err(se)?;
        let t = tx.open_table(AUDIT).map_err(se)?;
        for r in t
            .range((h0, "", 0u16, 0u64)..(h1, "", 0u16, 0u64))
            .map_err(se)?
        {
            let (k, v) = r.map_err(se)?;
            let (_, gw, _, _) = k.value();
            let b = Batch::decode(v.value(), usize::MAX).map_err(se)?;
            let raw = b.decompress().map_err(se)?;
            for it in items(&raw, b.count, b.after_seq, b.last_seq).map_err(se)? {
                let e = EventRef::decode(it.bytes).map_err(se)?;
                f(gw, &e);
            }
        }
        Ok(())
    }

    /// Replaces rows with recounted ones, each a new version.
    pub fn write_corrections(&self, fixes: &[(RowKey, Counts)]) -> Result<()> {
        let db = self.db()?;
        let tx = db.begin_write().map_err(se)?;
        {
            let mut t = tx.open_table(ROWS).map_err(se)?;
            let mut meta = tx.open_table(META).map_err(se)?;
            let mut export = tx.open_table(EXPORT).map_err(se)?;
            let revision = meta.get("revision").map_err(se)?.map_or(0, |v| v.value()) + 1;
            if self.settings.export && !fixes.is_empty() {
                meta.insert("revision", revision).map_err(se)?;
            }
            for (k, c) in fixes {
                let kb = encode_key(k);
                let old = t
                    .get(kb.as_slice())
                    .map_err(se)?
                    .map(|v| Row::decode(v.value()));
                let r = Row {
                    counts: *c,
                    version: old.map_or(0, |o| o.version) + 1,
                };
                t.insert(kb.as_slice(), r.encode().as_slice()).map_err(se)?;
                if self.settings.export {
                    export.insert(kb.as_slice(), revision as u64).map_err(se)?;
                }
            }
        }
        tx.commit().map_err(se)
    }

    /// Up to `max` changed rows not yet in ClickHouse, in key order, as they
    /// stand now.
    pub fn export_pending(&self, max: usize) -> Result<Vec<ExportRow>> {
        let db = self.db()?;
        let tx = db.begin_read().map_err(se)?;
        let export = tx.open_table(EXPORT).map_err(se)?;
        let rows = tx.open_table(ROWS).map_err(se)?;
        let mut out = Vec::new();
        for e in export.iter().map_err(se)?.take(max) {
            let (k, rev) = e.map_err(se)?;
            let kb = k.value().to_vec();
            let Some(key) = decode_key(&kb) else { continue };
            let row = rows
                .get(kb.as_slice())
                .map_err(se)?
                .map(|v| Row::decode(v.value()))
                .unwrap_or_default();
            out.push(ExportRow {
                key_bytes: kb,
                key,
                row,
                revision: rev.value(),
            });
        }
        Ok(out)
    }

    /// Forgets exported changes, unless the row changed again since (its
    /// revision moved): that change is exported next time.
    pub fn export_done(&self, done: &[(Vec<u8>, u64)]) -> Result<()> {
        let db = self.db()?;
        let tx = db.begin_write().map_err(se)?;
        {
            let mut export = tx.open_table(EXPORT).map_err(se)?;
            for (kb, rev) in done {
                let same = export
                    .get(kb.as_slice())
                    .map_err(se)?
                    .is_some_and(|v| v.value() == *rev);
                if same {
                    export.remove(kb.as_slice()).map_err(se)?;
                }
            }
        }
        tx.commit().map_err(se)
    }

    /// Changed rows waiting for ClickHouse.
    pub fn export_backlog(&self) -> Result<u64> {
        let db = self.db()?;
        let tx = db.begin_read().map_err(se)?;
        let export = tx.open_table(EXPORT).map_err(se)?;
        export.len().map_err(se)
    }
}

/// A row changed since it was last written to ClickHouse.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportRow {
    pub key_bytes: Vec<u8>,
    pub key: RowKey,
    pub row: Row,
    /// The store revision of its last change: ClickHouse's version column.
    pub revision: u64,
}

impl ExportRow {
    /// What `Store::export_done` takes back once the row is written.
    pub fn done(rows: &[ExportRow]) -> Vec<(Vec<u8>, u64)> {
        rows.iter()
            .map(|r| (r.key_bytes.clone(), r.revision))
            .collect()
    }
}

/// Why a batch is not applied.
#[derive(Debug, PartialEq, Eq)]
pub enum Refusal {
    Duplicate,
    Gap,
    Bad(String),
    Store(String),
}

impl Refusal {
    fn with(self, c: (u64, u64)) -> Ack {
        match self {
            Refusal::Duplicate => answer(Status::Duplicate, c),
            Refusal::Gap => answer(Status::Gap, c),
            Refusal::Bad(r) => refuse(r, c),
            Refusal::Store(r) => {
                let mut a = answer(Status::Retry, c);
                a.reason = r;
                a
            }
        }
    }
}

/// The rows a partials batch adds, and the cursor and watermark after it.
#[derive(Debug, PartialEq, Eq)]
pub struct Plan {
    pub rows: Vec<(RowKey, Counts)>,
    pub cursor: u64,
    pub watermark_ms: i64,
}

/// The decompressed payload of a batch that ends after `cursor` and starts at
/// or before it; otherwise the batch is a duplicate or a gap.
fn payload_after(batch: &Batch, cursor: u64) -> std::result::Result<Vec<u8>, Refusal> {
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
pub fn plan_partials(batch: &Batch, cursor: u64) -> std::result::Result<Plan, Refusal> {
    let raw = payload_after(batch, cursor)?;
    let its = items(&raw, batch.count, batch.after_seq, batch.last_seq)
        .map_err(|e| Refusal::Bad(e.to_string()))?;
    let mut plan = Plan {
        rows: Vec::new(),
        cursor,
        watermark_ms: 0,
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
    }
    if plan.cursor != batch.last_seq {
        return Err(Refusal::Bad(
            "the last partial does not end the batch range".into(),
        ));
    }
    Ok(plan)
}

#[cfg(test)]
mod tests {
    use super::*;
    use wire::batch::push_item;
    use wire::record::{Device, EventKind, Source, Verdict};

    const T0: i64 = 1_795_496_400_000; // 2026-11-24T05:00:00Z

    fn key(adv: &str, ad: &str, minute: u32) -> RowKey {
        RowKey {
            minute,
            advertiser_id: adv.into(),
            campaign_id: format!("c-{adv}"),
            ad_id: ad.into(),
            device: Device::Mobile,
            country: *b"FR",
        }
    }

    fn clicks(n: u64) -> Counts {
        Counts {
            clicks: n,
            spend_micros: n * 1000,
            ..Counts::default()
        }
    }

    /// (seq, from, watermark, rows) of one partial.
    type P = (u64, u64, i64, Vec<(RowKey, Counts)>);

    fn partials(gw: &str, shard: u16, ps: &[P]) -> Vec<u8> {
        let mut raw = Vec::new();
        for (seq, from, wm, rows) in ps {
            let mut b = Vec::new();
            PartialRecord {
                from_seq: *from,
                to_seq: seq - 1,
                watermark_ms: *wm,
                rows: rows.clone(),
            }
            .encode(&mut b);
            push_item(&mut raw, *seq, RecordType::Partial as u8, &b);
        }
        let after = ps[0].1;
        let last = ps.last().unwrap().0;
        Batch::seal(
            BatchKind::Partials,
            gw,
            shard,
            after,
            last,
            ps.len() as u32,
            &raw,
            1,
        )
        .unwrap()
        .encode()
    }

    fn store() -> (tempfile::TempDir, Store) {
        let d = tempfile::tempdir().unwrap();
        let s = Store::open(
            &d.path().join("s.redb"),
            Settings {
                lateness_ms: 120_000,
                horizon_ms: 3_600_000,
                source_timeout_ms: 60_000,
                raw_max: 1 << 20,
                export: true,
                cluster: None,
            },
        )
        .unwrap();
        (d, s)
    }

    fn apply(s: &Store, frame: &[u8], now: i64) -> Ack {
        let gws = vec!["gw".to_string(), "gw2".to_string()];
        s.apply_many(&[(frame, &gws)], now).remove(0).0
    }

    fn total(s: &Store, adv: &str) -> Counts {
        let q = Query {
            advertiser_id: adv.into(),
            start_s: 0,
            end_s: T0 / 1000 + 86_400,
            bucket_s: 86_400,
            campaign_id: None,
            ad_id: None,
        };
        let mut c = Counts::default();
        for (v, _, _) in s.query(&q, T0).unwrap().values() {
            c.merge(v);
        }
        c
    }

    #[test]
    fn changed_rows_wait_for_export_and_a_newer_change_outlives_an_older_ack() {
        let (_d, s) = store();
        let m = (T0 / 60_000) as u32;
        let b1 = partials(
            "gw",
            0,
            &[(
                2,
                0,
                T0,
                vec![(key("a", "x", m), clicks(1)), (key("a", "y", m), clicks(1))],
            )],
        );
        assert_eq!(apply(&s, &b1, T0).status, Status::Applied);
        let first = s.export_pending(10).unwrap();
        assert_eq!(first.len(), 2);
        assert_eq!(s.export_pending(1).unwrap().len(), 1, "bounded");
        // x changes again before the first export is acknowledged.
        let b2 = partials("gw", 0, &[(5, 2, T0, vec![(key("a", "x", m), clicks(2))])]);
        assert_eq!(apply(&s, &b2, T0).status, Status::Applied);
        s.export_done(&ExportRow::done(&first)).unwrap();
        let left = s.export_pending(10).unwrap();
        assert_eq!(left.len(), 1, "x's newer change is still to export");
        assert_eq!(
            (left[0].key.ad_id.as_str(), left[0].row.counts.clicks),
            ("x", 3)
        );
        assert!(left[0].revision > first[0].revision);
        // A duplicate batch changes nothing, so exports nothing new.
        assert_eq!(apply(&s, &b2, T0).status, Status::Duplicate);
        assert_eq!(s.export_pending(10).unwrap(), left);
        s.export_done(&ExportRow::done(&left)).unwrap();
        assert_eq!(s.export_backlog().unwrap(), 0);
    }

    #[test]
    fn a_join_sets_the_cursors_of_an_unknown_shard_only() {
        let (_d, s) = store();
        let m = (T0 / 60_000) as u32;
        let join = |p, e| Batch::join("gw", 0, p, e).encode();
        let a = apply(&s, &join(40, 41), T0);
        assert_eq!(
            (a.status, a.partials_cursor, a.events_cursor),
            (Status::Cursors, 40, 41)
        );
        // Counting goes on from there: the partial after 40 applies.
        let b = partials(
            "gw",
            0,
            &[(45, 40, T0, vec![(key("a", "x", m), clicks(2))])],
        );
        assert_eq!(apply(&s, &b, T0).status, Status::Applied);
        assert_eq!(total(&s, "a").clicks, 2);
        // A later join changes nothing.
        let a = apply(&s, &join(1, 1), T0);
        assert_eq!(
            (a.status, a.partials_cursor, a.events_cursor),
            (Status::Cursors, 45, 41)
        );
    }

    #[test]
    fn turning_the_sink_on_backfills_every_row() {
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("s.redb");
        let m = (T0 / 60_000) as u32;
        let settings = |export| Settings {
            export,
            ..Settings::default()
        };
        {
            let s = Store::open(&path, settings(false)).unwrap();
            let b = partials("gw", 0, &[(2, 0, T0, vec![(key("a", "x", m), clicks(1))])]);
            assert_eq!(apply(&s, &b, T0).status, Status::Applied);
            assert_eq!(s.export_backlog().unwrap(), 0, "not tracked while off");
        }
        let s = Store::open(&path, settings(true)).unwrap();
        let pending = s.export_pending(10).unwrap();
        assert_eq!(pending.len(), 1);
        assert_eq!(pending[0].row.counts.clicks, 1);
        s.export_done(&ExportRow::done(&pending)).unwrap();
        drop(s);
        // Reopened with the sink still on: nothing to backfill.
        let s = Store::open(&path, settings(true)).unwrap();
        assert_eq!(s.export_backlog().unwrap(), 0);
        // Its ClickHouse identity is made once and kept.
        let id = s.store_id().unwrap();
        assert_eq!(id.len(), 16);
        drop(s);
        assert_eq!(
            Store::open(&path, settings(true))
                .unwrap()
                .store_id()
                .unwrap(),
            id
        );
        let other = d.path().join("t.redb");
        assert_ne!(
            Store::open(&other, settings(true))
                .unwrap()
                .store_id()
                .unwrap(),
            id
        );
    }

    #[test]
    fn each_partial_applies_once_and_gaps_are_refused() {
        let (_d, s) = store();
        let m = (T0 / 60_000) as u32;
        let b1 = partials("gw", 0, &[(2, 0, T0, vec![(key("a", "x", m), clicks(1))])]);
        let b2 = partials("gw", 0, &[(5, 2, T0, vec![(key("a", "x", m), clicks(2))])]);
        let b3 = partials("gw", 0, &[(9, 5, T0, vec![(key("a", "y", m), clicks(4))])]);
        assert_eq!(apply(&s, &b1, T0).status, Status::Applied);
        // Delivered twice: acknowledged, no effect.
        let a = apply(&s, &b1, T0);
        assert_eq!((a.status, a.partials_cursor), (Status::Duplicate, 2));
        // Starts past the cursor: refused with the cursor to resend from.
        let a = apply(&s, &b3, T0);
        assert_eq!((a.status, a.partials_cursor), (Status::Gap, 2));
        assert_eq!(total(&s, "a").clicks, 1);
        assert_eq!(apply(&s, &b2, T0).status, Status::Applied);
        // A batch overlapping the cursor applies only what is new.
        let both = partials(
            "gw",
            0,
            &[
                (5, 2, T0, vec![(key("a", "x", m), clicks(2))]),
                (9, 5, T0, vec![(key("a", "y", m), clicks(4))]),
            ],
        );
        let a = apply(&s, &both, T0);
        assert_eq!((a.status, a.partials_cursor), (Status::Applied, 9));
        assert_eq!(total(&s, "a").clicks, 7);
        assert_eq!(total(&s, "a").spend_micros, 7000);
        // Another shard of the same gateway has its own cursor.
        assert_eq!(s.cursors("gw", 1).unwrap(), (0, 0));
        assert_eq!(s.cursors("gw", 0).unwrap(), (9, 0));
    }

    #[test]
    fn malformed_or_foreign_batches_change_nothing() {
        let (_d, s) = store();
        let m = (T0 / 60_000) as u32;
        let good = partials("gw", 0, &[(2, 0, T0, vec![(key("a", "x", m), clicks(1))])]);
        let mut bad = good.clone();
        let last = bad.len() - 1;
        bad[last] ^= 1;
        let a = apply(&s, &bad, T0);
        assert_eq!(a.status, Status::Refused);
        assert!(a.reason.contains("checksum"), "{}", a.reason);
        let foreign = partials(
            "other",
            0,
            &[(2, 0, T0, vec![(key("a", "x", m), clicks(1))])],
        );
        let a = apply(&s, &foreign, T0);
        assert_eq!(a.status, Status::Refused);
        assert!(a.reason.contains("may not ship"), "{}", a.reason);
        // A chain break inside a batch refuses all of it, not a prefix.
        let broken = partials(
            "gw",
            0,
            &[
                (2, 0, T0, vec![(key("a", "x", m), clicks(1))]),
                (6, 3, T0, vec![(key("a", "x", m), clicks(1))]),
            ],
        );
        assert_eq!(apply(&s, &broken, T0).status, Status::Refused);
        assert_eq!(total(&s, "a"), Counts::default());
        assert_eq!(s.cursors("gw", 0).unwrap(), (0, 0));
        // One group: a refused batch between two good ones.
        let next = partials("gw", 0, &[(4, 2, T0, vec![(key("a", "x", m), clicks(5))])]);
        let gws = vec!["gw".to_string()];
        let r = s.apply_many(&[(&good, &gws), (&bad, &gws), (&next, &gws)], T0);
        let st: Vec<_> = r.iter().map(|(a, _)| a.status).collect();
        assert_eq!(st, vec![Status::Applied, Status::Refused, Status::Applied]);
        assert_eq!(total(&s, "a").clicks, 6);
    }

    #[test]
    fn final_minutes_get_versions_and_old_ones_go_to_the_late_table() {
        let (_d, s) = store();
        let now_min = (T0 / 60_000) as u32;
        let open = now_min - 1; // ends 1 min before the watermark: not final
        let fin = now_min - 5; // final (lateness 2 min)
        let old = now_min - 120; // past the 1 h horizon
        let b1 = partials(
            "gw",
            0,
            &[(
                2,
                0,
                T0,
                vec![
                    (key("a", "x", open), clicks(1)),
                    (key("a", "x", fin), clicks(1)),
                ],
            )],
        );
        assert_eq!(apply(&s, &b1, T0).status, Status::Applied);
        // The watermark is now T0: minute `fin` is final, `open` is not.
        assert!(s.is_final(fin, s.watermark(T0).unwrap()));
        assert!(!s.is_final(open, s.watermark(T0).unwrap()));
        let b2 = partials(
            "gw",
            0,
            &[(
                4,
                2,
                T0,
                vec![
                    (key("a", "x", fin), clicks(2)),
                    (key("a", "x", old), clicks(3)),
                ],
            )],
        );
        let (a, eff) = s.apply_many(&[(&b2, &["gw".to_string()])], T0).remove(0);
        assert_eq!(a.status, Status::Applied);
        assert_eq!((eff.rows, eff.corrections, eff.late_rows), (1, 1, 1));
        let q = Query {
            advertiser_id: "a".into(),
            start_s: fin as i64 * 60,
            end_s: (now_min as i64 + 1) * 60,
            bucket_s: 60,
            campaign_id: None,
            ad_id: None,
        };
        let series = s.query(&q, T0).unwrap();
        let at = |m: u32| {
            series
                .get(&(m as i64 * 60, "x".to_string()))
                .copied()
                .unwrap()
        };
        assert_eq!(at(fin), (clicks(3), true, 1));
        assert_eq!(at(open), (clicks(1), false, 0));
        // Nothing dropped: the late row is counted and kept.
        let late = s.late_rows().unwrap();
        assert_eq!(late.len(), 1);
        assert_eq!(late[0].1.counts, clicks(3));
        assert_eq!(s.meta("late_rows").unwrap(), 1);
    }

    #[test]
    fn a_silent_source_stops_holding_the_watermark() {
        let (_d, s) = store();
        let hb = |gw: &str, wm: i64| partials(gw, 0, &[(2, 0, wm, vec![])]);
        apply(&s, &hb("gw", T0 - 600_000), T0 - 1000);
        apply(&s, &hb("gw2", T0), T0);
        // Both heard within the timeout: the slower one holds it.
        assert_eq!(s.watermark(T0).unwrap(), T0 - 600_000);
        // After the timeout only gw2 counts.
        assert_eq!(s.watermark(T0 + 70_000).unwrap(), T0);
    }

    #[test]
    fn queries_read_one_advertiser_in_buckets() {
        let (_d, s) = store();
        let m = (T0 / 60_000) as u32;
        let rows = vec![
            (key("a", "x", m), clicks(1)),
            (key("a", "x", m + 1), clicks(2)),
            (key("a", "y", m + 61), clicks(4)),
            (key("b", "x", m), clicks(8)),
        ];
        apply(&s, &partials("gw", 0, &[(2, 0, T0, rows)]), T0);
        let mut q = Query {
            advertiser_id: "a".into(),
            start_s: T0 / 1000,
            end_s: T0 / 1000 + 7200,
            bucket_s: 3600,
            campaign_id: None,
            ad_id: None,
        };
        let r = s.query(&q, T0).unwrap();
        let h = T0 / 1000;
        assert_eq!(r.len(), 2);
        assert_eq!(r[&(h, "x".into())].0.clicks, 3);
        assert_eq!(r[&(h + 3600, "y".into())].0.clicks, 4);
        q.ad_id = Some("y".into());
        assert_eq!(s.query(&q, T0).unwrap().len(), 1);
        q.ad_id = None;
        q.campaign_id = Some("c-b".into());
        assert!(s.query(&q, T0).unwrap().is_empty());
    }

    fn event_frame(gw: &str, after: u64, evs: &[(u64, &str, i64)]) -> Vec<u8> {
        let mut raw = Vec::new();
        for (seq, id, ms) in evs {
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
                campaign_id: "c-a",
                ad_id: "x",
                click_id: id,
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
            gw,
            0,
            after,
            last,
            evs.len() as u32,
            &raw,
            1,
        )
        .unwrap()
        .encode()
    }

    #[test]
    fn raw_events_are_kept_once_and_reconcile_dedups_across_pops() {
        let (_d, s) = store();
        let m = (T0 / 60_000) as u32;
        // gw and gw2 (two PoPs) both accepted click "dup".
        let e1 = event_frame("gw", 0, &[(1, "c1", T0), (2, "dup", T0 + 1000)]);
        let e2 = event_frame(
            "gw2",
            0,
            &[(1, "dup", T0 + 2000), (2, "c2", T0 - 3_600_000)],
        );
        assert_eq!(apply(&s, &e1, T0).status, Status::Applied);
        let a = apply(&s, &e1, T0);
        assert_eq!((a.status, a.events_cursor), (Status::Duplicate, 3));
        assert_eq!(apply(&s, &e2, T0).status, Status::Applied);
        // The real-time rows, as the two gateways' partials reported them.
        apply(
            &s,
            &partials("gw", 0, &[(3, 0, T0, vec![(key("a", "x", m), clicks(2))])]),
            T0,
        );
        apply(
            &s,
            &partials("gw2", 0, &[(3, 0, T0, vec![(key("a", "x", m), clicks(1))])]),
            T0,
        );
        let r = crate::reconcile::reconcile(&s, m, m + 1, false).unwrap();
        assert_eq!(r.events_read, 3);
        assert_eq!(r.diffs.len(), 1);
        assert_eq!(r.diffs[0].realtime.clicks, 3);
        assert_eq!(r.diffs[0].recount.clicks, 2);
        assert_eq!(r.diffs[0].recount.duplicates, 1);
        // Written back as a new version; a second pass finds nothing.
        crate::reconcile::reconcile(&s, m, m + 1, true).unwrap();
        assert!(crate::reconcile::reconcile(&s, m, m + 1, false)
            .unwrap()
            .diffs
            .is_empty());
        assert_eq!(s.rows_in(m, m + 1).unwrap()[&key("a", "x", m)].version, 1);
        // The event an hour earlier was filed under its own hour.
        let mut n = 0;
        s.audit_events(m / 60 - 1, m / 60, |_, _| n += 1).unwrap();
        assert_eq!(n, 1);
    }

    #[test]
    fn plan_checks_each_partial_continues_the_last() {
        let b = Batch::decode(
            &partials("gw", 0, &[(3, 1, 0, vec![]), (7, 3, 0, vec![])]),
            1 << 20,
        )
        .unwrap();
        assert_eq!(plan_partials(&b, 0), Err(Refusal::Gap));
        assert_eq!(plan_partials(&b, 1).unwrap().cursor, 7);
        assert_eq!(plan_partials(&b, 3).unwrap().cursor, 7);
        assert_eq!(plan_partials(&b, 7), Err(Refusal::Duplicate));
        // A cursor inside a partial's range (not a partial seq) is a gap.
        assert_eq!(plan_partials(&b, 2), Err(Refusal::Gap));
    }
}
