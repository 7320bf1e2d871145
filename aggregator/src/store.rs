//! The embedded store (redb): merged rows, the late table, per-shard cursors
//! and watermarks, the raw audit trail by event minute, and what
//! reconciliation has done, each batch applied in the same write
//! transaction as the cursor it moves.
//!
//! What a batch changes is decided by [`crate::merge`] (no redb there); this
//! module applies it. Several batches can share one transaction (group
//! commit); each is decided against the cursor as the earlier ones left it,
//! before anything of it is written, so a refused batch never leaves half
//! its rows behind.
//!
//! For reconciliation every transaction that touches a minute's rows or raw
//! events stamps the minute with the transaction's sequence number
//! (`minute_rev`): a reconcile reads a minute in one snapshot and writes its
//! corrections only if the stamp has not moved since, so it never overwrites
//! a change it did not count. A change to a minute already reconciled marks
//! it dirty, to be recounted again.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::{RwLock, RwLockReadGuard};

use redb::{Database, ReadableTable, ReadableTableMetadata, TableDefinition, TableHandle};
use wire::batch::{items, Ack, Batch, Status};
use wire::record::{Counts, EventRef, RowKey};

use crate::audit::SealedPart;
use crate::merge::{self, Decision, PointState, RowChange, Rules, SourceTime};
use crate::recount::IdDigest;
use crate::rows::{decode_key, encode_key, prefix, Row};
use crate::uniques::Sketch;

/// (gateway id, shard) -> (partials cursor, events cursor).
const CURSORS: TableDefinition<(&str, u16), (u64, u64)> = TableDefinition::new("cursors");
/// (gateway id, shard) -> (watermark ms, last heard ms).
const SOURCES: TableDefinition<(&str, u16), (i64, i64)> = TableDefinition::new("sources");
/// Row key -> [`Row`].
const ROWS: TableDefinition<&[u8], &[u8]> = TableDefinition::new("rows");
/// (minute, row key) -> (): the rows of one minute, for reconciliation.
const MINUTE_ROWS: TableDefinition<(u32, &[u8]), ()> = TableDefinition::new("minute_rows");
/// Row key -> [`Row`] of partial rows that came past the correction horizon.
const LATE: TableDefinition<&[u8], &[u8]> = TableDefinition::new("late");
/// (event minute, gateway id, shard, after seq) -> a batch frame of the
/// events of that minute, zstd.
const AUDIT: TableDefinition<(u32, &str, u16, u64), &[u8]> =
    TableDefinition::new("audit_by_minute");
/// (event hour, gateway id) -> the sequence number of the last transaction
/// that stored raw events of it: hours with events not yet in a sealed file.
const AUDIT_PENDING: TableDefinition<(u32, &str), u64> = TableDefinition::new("audit_pending");
/// (event hour, gateway id, part) -> the sealed file's [`SealedPart`], JSON:
/// part 0 is the hour's file, parts 1.. its addenda.
const AUDIT_PARTS: TableDefinition<(u32, &str, u32), &str> = TableDefinition::new("audit_parts");
/// Sealed parts whose raw events are still (partly) hot: (hour, gateway,
/// part). Retention drops their hot entries once the grace has passed.
const AUDIT_HOT: TableDefinition<(u32, &str, u32), ()> = TableDefinition::new("audit_hot");
/// Minute -> the sequence number of the last transaction that changed its
/// rows or raw events.
/// Unique-user sketches by `uniques::key` (minute first): one per
/// (minute, advertiser, campaign, ad), and one per hour under the hour's
/// first minute.
const UNIQ_MIN: TableDefinition<&[u8], &[u8]> = TableDefinition::new("uniques_by_minute");
const UNIQ_HOUR: TableDefinition<&[u8], &[u8]> = TableDefinition::new("uniques_by_hour");
/// Hours merged from their minutes (rows and sketches) once reconciliation
/// passed them: a query takes such an hour whole.
const ROLLED: TableDefinition<u32, ()> = TableDefinition::new("hours_rolled_up");
/// Hour rows: the sum of an hour's minute rows per dimension tuple, keyed as
/// rows with the hour's first minute; kept equal to that sum by every
/// change to a minute row of a merged hour.
const ROWS_HOUR: TableDefinition<&[u8], &[u8]> = TableDefinition::new("rows_by_hour");
/// (hour, hour row key): the hour rows of each hour, for retention.
const HOUR_ROWS: TableDefinition<(u32, &[u8]), ()> = TableDefinition::new("hour_rows");
const MINUTE_REV: TableDefinition<u32, u64> = TableDefinition::new("minute_rev");
/// Reconciled minutes changed since: minute -> the sequence number of the
/// change (0: a minute before it changed its click set).
const DIRTY: TableDefinition<u32, u64> = TableDefinition::new("dirty");
/// Minute -> [`ReconMark`] of its last reconcile.
const RECONCILED: TableDefinition<u32, &[u8]> = TableDefinition::new("reconciled");
/// Minute -> why it could not be reconciled.
const RECON_FAILED: TableDefinition<u32, &str> = TableDefinition::new("reconcile_failed");
/// Reconcile job id -> its state, JSON.
const JOBS: TableDefinition<u64, &str> = TableDefinition::new("reconcile_jobs");
/// Named counters, the monotonic global watermark, the reconcile frontier.
const META: TableDefinition<&str, i64> = TableDefinition::new("meta");
/// (event minute, gateway id, shard) -> clicks and impressions the gateway
/// answered without a record while its log was full (`log.on_full =
/// "redirect"`): never billed, reported.
const UNRECORDED: TableDefinition<(u32, &str, u16), u64> = TableDefinition::new("unrecorded");
/// Rows changed since they were last written to ClickHouse: row key -> the
/// revision (`meta["revision"]`, one per write transaction) of the change.
/// Filled only when that sink is configured (`Settings::export`).
const EXPORT: TableDefinition<&[u8], u64> = TableDefinition::new("export");
/// The same for the Kafka sink (`Settings::kafka`); a row is also marked
/// when its minute becomes reconciled, since its record carries that state.
const EXPORT_KAFKA: TableDefinition<&[u8], u64> = TableDefinition::new("export_kafka");
/// Raw-event entries (keys of `audit_by_minute`) not yet produced to Kafka.
/// A marked entry stays hot (retention waits for it).
const EXPORT_KAFKA_EVENTS: TableDefinition<(u32, &str, u16, u64), ()> =
    TableDefinition::new("export_kafka_events");

/// Meta: the earliest minute with raw events not marked for Kafka because
/// its backlog was full (0: none).
const KAFKA_REMARK_FROM: &str = "kafka_remark_from";

/// A sink the store records changes for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sink {
    ClickHouse,
    Kafka,
}

impl Sink {
    pub const ALL: [Sink; 2] = [Sink::ClickHouse, Sink::Kafka];

    fn rows(self) -> TableDefinition<'static, &'static [u8], u64> {
        match self {
            Sink::ClickHouse => EXPORT,
            Sink::Kafka => EXPORT_KAFKA,
        }
    }

    /// The meta flag remembering the sink was on (see `track_exports`).
    fn flag(self) -> &'static str {
        match self {
            Sink::ClickHouse => "exporting",
            Sink::Kafka => "exporting_kafka",
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Sink::ClickHouse => "ClickHouse",
            Sink::Kafka => "Kafka",
        }
    }
}

/// The layout this code reads and writes. Version 1 filed raw events by
/// hour and had no reconcile tables.
const SCHEMA: i64 = 2;

#[derive(Debug, Clone, Default)]
pub struct Settings {
    pub rules: Rules,
    /// Record changed rows for the ClickHouse sink.
    pub export: bool,
    /// Record changed rows and new raw events for the Kafka sink.
    pub kafka: bool,
    /// Most audit entries waiting for Kafka (0: no bound). Past it, new
    /// entries are not marked; the store remembers the earliest minute it
    /// passed over, and once the sink has caught up it marks every hot
    /// entry from that minute on again ([`Store::kafka_events_remark`]).
    pub kafka_backlog_entries_max: u64,
}

impl Settings {
    pub fn exports(&self, sink: Sink) -> bool {
        match sink {
            Sink::ClickHouse => self.export,
            Sink::Kafka => self.kafka,
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
    /// Events the gateways answered without a record (reported in partials).
    pub unrecorded: u64,
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
    let tx = db.begin_write().map_err(se)?;
    {
        let old = tx.list_tables().map_err(se)?.any(|t| t.name() == "audit");
        let mut meta = tx.open_table(META).map_err(se)?;
        let schema = meta.get("schema").map_err(se)?.map(|v| v.value());
        match schema {
            Some(SCHEMA) => {}
            Some(v) => {
                return Err(StoreError::Redb(format!(
                    "{}: store layout {v}, this aggregator reads layout {SCHEMA}",
                    path.display()
                )))
            }
            None if old => {
                return Err(StoreError::Redb(format!(
                "{}: store layout 1 (raw events by hour), this aggregator reads layout {SCHEMA}: \
                     reconcile it with the release that wrote it, then start on a new store \
                     (deploy/RUNBOOK.md, \"Upgrading the store\")",
                path.display()
            )))
            }
            None => {
                meta.insert("schema", SCHEMA).map_err(se)?;
            }
        }
    }
    // Create every table, so readers never find one missing.
    tx.open_table(CURSORS).map_err(se)?;
    tx.open_table(SOURCES).map_err(se)?;
    tx.open_table(ROWS).map_err(se)?;
    tx.open_table(MINUTE_ROWS).map_err(se)?;
    tx.open_table(LATE).map_err(se)?;
    tx.open_table(AUDIT).map_err(se)?;
    tx.open_table(MINUTE_REV).map_err(se)?;
    tx.open_table(DIRTY).map_err(se)?;
    tx.open_table(RECONCILED).map_err(se)?;
    tx.open_table(RECON_FAILED).map_err(se)?;
    tx.open_table(JOBS).map_err(se)?;
    tx.open_table(AUDIT_PENDING).map_err(se)?;
    tx.open_table(AUDIT_PARTS).map_err(se)?;
    tx.open_table(EXPORT).map_err(se)?;
    tx.open_table(EXPORT_KAFKA).map_err(se)?;
    tx.open_table(EXPORT_KAFKA_EVENTS).map_err(se)?;
    tx.open_table(AUDIT_HOT).map_err(se)?;
    tx.open_table(UNIQ_MIN).map_err(se)?;
    tx.open_table(UNIQ_HOUR).map_err(se)?;
    tx.open_table(ROLLED).map_err(se)?;
    tx.open_table(ROWS_HOUR).map_err(se)?;
    tx.open_table(HOUR_ROWS).map_err(se)?;
    tx.open_table(EXPORT).map_err(se)?;
    tx.open_table(UNRECORDED).map_err(se)?;
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

/// (event hour, gateway id, part) of a sealed audit file.
pub type PartKey = (u32, String, u32);

/// One query's answer rows: (bucket start s, ad id) -> sums, state,
/// highest version.
pub type Series = BTreeMap<(i64, String), (Counts, PointState, u32)>;

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

/// What the last reconcile of a minute found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReconMark {
    /// The minute's `minute_rev` it counted.
    pub rev: u64,
    pub at_ms: i64,
    pub events: u64,
    pub rows_corrected: u64,
    /// Sources skipped as silent when it was counted.
    pub skipped_sources: u32,
    pub digest: IdDigest,
}

const MARK_LEN: usize = 60;

impl ReconMark {
    fn encode(&self) -> [u8; MARK_LEN] {
        let mut b = [0u8; MARK_LEN];
        let d = &self.digest;
        for (i, v) in [
            self.rev,
            self.at_ms as u64,
            self.events,
            self.rows_corrected,
            d.count,
            d.xor,
            d.sum,
        ]
        .iter()
        .enumerate()
        {
            b[i * 8..i * 8 + 8].copy_from_slice(&v.to_le_bytes());
        }
        b[56..60].copy_from_slice(&self.skipped_sources.to_le_bytes());
        b
    }

    fn decode(b: &[u8]) -> Option<ReconMark> {
        if b.len() != MARK_LEN {
            return None;
        }
        let u = |i: usize| u64::from_le_bytes(b[i * 8..i * 8 + 8].try_into().unwrap());
        Some(ReconMark {
            rev: u(0),
            at_ms: u(1) as i64,
            events: u(2),
            rows_corrected: u(3),
            digest: IdDigest {
                count: u(4),
                xor: u(5),
                sum: u(6),
            },
            skipped_sources: u32::from_le_bytes(b[56..60].try_into().unwrap()),
        })
    }
}

/// The sources, the watermark and the transaction sequence, read together
/// (one snapshot): what the reconciler decides readiness from.
#[derive(Debug, Clone)]
pub struct ReconView {
    pub sources: Vec<SourceInfo>,
    pub watermark_ms: i64,
    /// The sequence number of the last transaction that changed a minute.
    pub txn_seq: u64,
    /// Every minute below it has been reconciled, failed, or had no data.
    pub frontier: u32,
}

/// One minute read for a recount, in one snapshot.
#[derive(Debug, Clone)]
pub struct MinuteRead {
    pub rev: u64,
    pub rows: Vec<(RowKey, Row)>,
    pub mark: Option<ReconMark>,
    pub audit_entries: u64,
    /// Raw events of the minute no longer hot: in these sealed files.
    pub cold: Vec<ColdPart>,
}

/// Raw events that retention has dropped from the hot store: the sealed
/// file that holds them, and the minutes `[m0, m1)` of it now read there.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ColdPart {
    pub gateway: String,
    pub object: String,
    pub bytes: u64,
    pub m0: u32,
    pub m1: u32,
}

/// What one retention step dropped.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Dropped {
    pub rows: u64,
    pub late_rows: u64,
    pub audit_entries: u64,
    /// Minute bookkeeping: change stamps, reconcile marks, dirty marks.
    pub marks: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error(transparent)]
    Store(#[from] StoreError),
    /// An audit entry that does not decode: named, so an operator can find it.
    #[error("corrupt audit entry (minute {minute}, gateway {gateway:?}, shard {shard}, after seq {after_seq}): {why}")]
    Corrupt {
        minute: u32,
        gateway: String,
        shard: u16,
        after_seq: u64,
        why: String,
    },
}

/// What a reconcile writes, in one transaction.
#[derive(Debug, Default)]
pub struct ReconCommit<'a> {
    /// The minute the mark or the failure is for.
    pub minute: Option<u32>,
    /// The `minute_rev` the recount read: the commit is refused (nothing
    /// written) if the minute changed since.
    pub rev: Option<u64>,
    /// Rows replaced by their recount, each one version up.
    pub fixes: &'a [(RowKey, Counts)],
    pub mark: Option<ReconMark>,
    pub failed: Option<&'a str>,
    /// The frontier moves up to this (never back).
    pub frontier_to: Option<u32>,
    /// Reconciled minutes to recount again (a minute before them changed
    /// its click set).
    pub dirty_more: &'a [u32],
    /// Minutes to drop from the dirty set without a recount (past the
    /// correction horizon).
    pub undirty: &'a [u32],
    pub job: Option<(u64, &'a str)>,
    /// The minute's unique-user sketches rebuilt from the recount (by
    /// `uniques::key`): they replace the minute's, and its hour's are
    /// merged again from its minutes.
    pub users: Option<&'a BTreeMap<Vec<u8>, Vec<u64>>>,
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

    pub fn rules(&self) -> &Rules {
        &self.settings.rules
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

    /// When a sink is turned on for a store that had it off, every row (and
    /// for Kafka every hot raw event) is marked for export: changes made
    /// while it was off were not tracked. When turned off, its marks are
    /// dropped (they would hold raw events hot) and the store remembers, so
    /// that turning it on again backfills again.
    fn track_exports(&self) -> Result<()> {
        let db = self.db()?;
        let tx = db.begin_write().map_err(se)?;
        {
            let mut meta = tx.open_table(META).map_err(se)?;
            let revision = meta_get(&meta, "revision")? + 1;
            for sink in Sink::ALL {
                let was = meta_get(&meta, sink.flag())? == 1;
                let on = self.settings.exports(sink);
                if on && !was {
                    let rows = tx.open_table(ROWS).map_err(se)?;
                    let mut export = tx.open_table(sink.rows()).map_err(se)?;
                    let mut n = 0u64;
                    for r in rows.iter().map_err(se)? {
                        let (k, _) = r.map_err(se)?;
                        export.insert(k.value(), revision as u64).map_err(se)?;
                        n += 1;
                    }
                    let mut entries = 0u64;
                    if sink == Sink::Kafka {
                        let audit = tx.open_table(AUDIT).map_err(se)?;
                        let mut marks = tx.open_table(EXPORT_KAFKA_EVENTS).map_err(se)?;
                        for r in audit.iter().map_err(se)? {
                            let (k, _) = r.map_err(se)?;
                            marks.insert(k.value(), ()).map_err(se)?;
                            entries += 1;
                        }
                    }
                    meta.insert("revision", revision).map_err(se)?;
                    meta.insert(sink.flag(), 1).map_err(se)?;
                    if n + entries > 0 {
                        tracing::info!(
                            rows = n,
                            event_entries = entries,
                            "{} sink turned on: everything marked for export",
                            sink.name()
                        );
                    }
                } else if !on && was {
                    meta.insert(sink.flag(), 0).map_err(se)?;
                    tx.delete_table(sink.rows()).map_err(se)?;
                    tx.open_table(sink.rows()).map_err(se)?;
                    if sink == Sink::Kafka {
                        tx.delete_table(EXPORT_KAFKA_EVENTS).map_err(se)?;
                        tx.open_table(EXPORT_KAFKA_EVENTS).map_err(se)?;
                    }
                }
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
        read_sources(&tx)
    }

    /// The global watermark: the lowest of the sources heard from recently
    /// (or the highest of all when none is), never going back.
    pub fn watermark(&self, now_ms: i64) -> Result<i64> {
        let db = self.db()?;
        let tx = db.begin_read().map_err(se)?;
        let s = tx.open_table(SOURCES).map_err(se)?;
        let m = tx.open_table(META).map_err(se)?;
        self.watermark_in(&s, &m, now_ms)
    }

    fn watermark_in(
        &self,
        s: &impl ReadableTable<(&'static str, u16), (i64, i64)>,
        meta: &impl ReadableTable<&'static str, i64>,
        now_ms: i64,
    ) -> Result<i64> {
        let stored = meta_get(meta, "watermark")?;
        let mut times = Vec::new();
        for r in s.iter().map_err(se)? {
            let (_, v) = r.map_err(se)?;
            let (watermark_ms, heard_ms) = v.value();
            times.push(SourceTime {
                watermark_ms,
                heard_ms,
            });
        }
        Ok(self.rules().watermark(times, stored, now_ms))
    }

    pub fn is_final(&self, minute: u32, watermark_ms: i64) -> bool {
        self.rules().is_final(minute, watermark_ms)
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
                        let mut a = merge::answer(Status::Retry, (0, 0));
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
        let rules = self.rules();
        let db = self.db()?;
        let tx = db.begin_write().map_err(se)?;
        let mut out = Vec::with_capacity(batches.len());
        {
            let mut cursors = tx.open_table(CURSORS).map_err(se)?;
            let mut sources = tx.open_table(SOURCES).map_err(se)?;
            let mut rows = tx.open_table(ROWS).map_err(se)?;
            let mut minute_rows = tx.open_table(MINUTE_ROWS).map_err(se)?;
            let mut late = tx.open_table(LATE).map_err(se)?;
            let mut audit = tx.open_table(AUDIT).map_err(se)?;
            let mut meta = tx.open_table(META).map_err(se)?;
            let mut export = tx.open_table(EXPORT).map_err(se)?;
            let mut export_kafka = tx.open_table(EXPORT_KAFKA).map_err(se)?;
            let mut kafka_events = tx.open_table(EXPORT_KAFKA_EVENTS).map_err(se)?;
            let mut unrecorded = tx.open_table(UNRECORDED).map_err(se)?;
            let mut uniq_min = tx.open_table(UNIQ_MIN).map_err(se)?;
            let mut uniq_hour = tx.open_table(UNIQ_HOUR).map_err(se)?;
            let rolled_t = tx.open_table(ROLLED).map_err(se)?;
            // Whether an hour is merged, looked up once per transaction
            // (a batch's rows are nearly all of one or two hours).
            let mut rolled_memo: BTreeMap<u32, bool> = BTreeMap::new();
            let mut rolled = |h: u32| -> Result<bool> {
                if let Some(&r) = rolled_memo.get(&h) {
                    return Ok(r);
                }
                let r = rolled_t.get(h).map_err(se)?.is_some();
                rolled_memo.insert(h, r);
                Ok(r)
            };
            let revision = meta_get(&meta, "revision")? + 1;
            let mut exported = false;
            let mut wm = self.watermark_in(&sources, &meta, now_ms)?;
            let mut touched: BTreeSet<u32> = BTreeSet::new();
            let mut audit_hours: BTreeSet<(u32, String)> = BTreeSet::new();
            for (bytes, allowed) in batches {
                let batch = match Batch::decode(bytes, rules.raw_max) {
                    Ok(b) => b,
                    Err(e) => {
                        out.push((
                            merge::refuse(format!("malformed batch: {e}"), (0, 0)),
                            Effect::default(),
                        ));
                        continue;
                    }
                };
                let key = (batch.gateway_id.as_str(), batch.shard);
                let cur = cursors
                    .get(key)
                    .map_err(se)?
                    .map(|v| v.value())
                    .unwrap_or((0, 0));
                let (ack, effect) = match merge::decide(rules, &batch, allowed, cur) {
                    Decision::Answer(a) => (a, Effect::default()),
                    Decision::Join { cursors: at } => {
                        cursors.insert(key, at).map_err(se)?;
                        tracing::info!(gateway = %batch.gateway_id, shard = batch.shard, partials = at.0, events = at.1, "joined: counting from these cursors");
                        (merge::answer(Status::Cursors, at), Effect::default())
                    }
                    Decision::Partials(plan) => {
                        let mut eff = Effect::default();
                        for (k, c) in &plan.rows {
                            let kb = encode_key(k);
                            let current = rows
                                .get(kb.as_slice())
                                .map_err(se)?
                                .map(|v| Row::decode(v.value()));
                            let current_late = if rules.is_late(k.minute, wm) {
                                late.get(kb.as_slice())
                                    .map_err(se)?
                                    .map(|v| Row::decode(v.value()))
                            } else {
                                None
                            };
                            match merge::merge_row(rules, k.minute, c, wm, current, current_late) {
                                RowChange::Late(r) => {
                                    late.insert(kb.as_slice(), r.encode().as_slice())
                                        .map_err(se)?;
                                    eff.late_rows += 1;
                                }
                                RowChange::Merge { row, correction } => {
                                    rows.insert(kb.as_slice(), row.encode().as_slice())
                                        .map_err(se)?;
                                    if rolled(k.minute / 60)? {
                                        hour_row_change(&tx, k, current, row)?;
                                    }
                                    if current.is_none() {
                                        minute_rows
                                            .insert((k.minute, kb.as_slice()), ())
                                            .map_err(se)?;
                                    }
                                    if self.settings.export {
                                        export
                                            .insert(kb.as_slice(), revision as u64)
                                            .map_err(se)?;
                                        exported = true;
                                    }
                                    if self.settings.kafka {
                                        export_kafka
                                            .insert(kb.as_slice(), revision as u64)
                                            .map_err(se)?;
                                        exported = true;
                                    }
                                    touched.insert(k.minute);
                                    eff.corrections += correction as u64;
                                    eff.rows += 1;
                                }
                            }
                        }
                        for &(m, n) in &plan.unrecorded {
                            let k = (m, batch.gateway_id.as_str(), batch.shard);
                            let old = unrecorded.get(k).map_err(se)?.map_or(0, |v| v.value());
                            unrecorded.insert(k, old + n).map_err(se)?;
                            eff.unrecorded += n;
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
                        (merge::answer(Status::Applied, new), eff)
                    }
                    Decision::Events(plan) => {
                        for (minute, after, frame) in &plan.audit {
                            audit
                                .insert(
                                    (*minute, batch.gateway_id.as_str(), batch.shard, *after),
                                    frame.as_slice(),
                                )
                                .map_err(se)?;
                            if self.settings.kafka {
                                let cap = self.settings.kafka_backlog_entries_max;
                                if cap == 0 || kafka_events.len().map_err(se)? < cap {
                                    kafka_events
                                        .insert(
                                            (
                                                *minute,
                                                batch.gateway_id.as_str(),
                                                batch.shard,
                                                *after,
                                            ),
                                            (),
                                        )
                                        .map_err(se)?;
                                } else {
                                    let from = meta_get(&meta, KAFKA_REMARK_FROM)?;
                                    if from == 0 || i64::from(*minute) < from {
                                        meta.insert(KAFKA_REMARK_FROM, i64::from(*minute))
                                            .map_err(se)?;
                                    }
                                    let n = meta_get(&meta, "kafka_entries_passed_over")?;
                                    meta.insert("kafka_entries_passed_over", n + 1)
                                        .map_err(se)?;
                                }
                            }
                            touched.insert(*minute);
                            audit_hours.insert((*minute / 60, batch.gateway_id.clone()));
                        }
                        for (k, hashes) in &plan.users {
                            add_users(&mut uniq_min, k, hashes)?;
                            let m = u32::from_be_bytes(k[..4].try_into().expect("a sketch key"));
                            // Late users of an hour already merged.
                            if rolled(m / 60)? {
                                add_users(&mut uniq_hour, &hour_key(k), hashes)?;
                            }
                        }
                        let new = (cur.0, plan.cursor);
                        cursors.insert(key, new).map_err(se)?;
                        (
                            merge::answer(Status::Applied, new),
                            Effect {
                                events: plan.events,
                                ..Effect::default()
                            },
                        )
                    }
                };
                if ack.status == Status::Applied {
                    wm = wm.max(self.watermark_in(&sources, &meta, now_ms)?);
                }
                out.push((ack, effect));
            }
            if wm > meta_get(&meta, "watermark")? {
                meta.insert("watermark", wm).map_err(se)?;
            }
            if exported {
                meta.insert("revision", revision).map_err(se)?;
            }
            if !touched.is_empty() {
                let seq = meta_get(&meta, "txn_seq")? + 1;
                meta.insert("txn_seq", seq).map_err(se)?;
                let mut pending = tx.open_table(AUDIT_PENDING).map_err(se)?;
                for (h, gw) in &audit_hours {
                    pending.insert((*h, gw.as_str()), seq as u64).map_err(se)?;
                }
                let frontier = meta_get(&meta, "reconciled_through")? as u32;
                let mut rev = tx.open_table(MINUTE_REV).map_err(se)?;
                let mut dirty = tx.open_table(DIRTY).map_err(se)?;
                for m in touched {
                    rev.insert(m, seq as u64).map_err(se)?;
                    if m < frontier {
                        dirty.insert(m, seq as u64).map_err(se)?;
                    }
                }
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
                    let old = meta_get(&meta, name)?;
                    meta.insert(name, old + v as i64).map_err(se)?;
                }
            }
        }
        tx.commit().map_err(se)?;
        Ok(out)
    }

    /// Sums one advertiser's rows into buckets, each with its state.
    pub fn query(&self, q: &Query, now_ms: i64) -> Result<Series> {
        let db = self.db()?;
        let tx = db.begin_read().map_err(se)?;
        let wm = {
            let s = tx.open_table(SOURCES).map_err(se)?;
            let m = tx.open_table(META).map_err(se)?;
            self.watermark_in(&s, &m, now_ms)?
        };
        let t = tx.open_table(ROWS).map_err(se)?;
        let hour_t = tx.open_table(ROWS_HOUR).map_err(se)?;
        let m0 = (q.start_s.max(0) / 60) as u32;
        let m1 = (q.end_s.max(0) as u64).div_ceil(60).min(u32::MAX as u64) as u32;
        let states = MinuteStates::read(&tx, m0, m1)?;
        let mut out = Series::new();
        // Sums the advertiser's rows of `t` in minutes `[a, b)` into buckets.
        let mut scan = |t: &redb::ReadOnlyTable<&[u8], &[u8]>, a: u32, b: u32| -> Result<()> {
            let lo = prefix(&q.advertiser_id, a);
            let hi = prefix(&q.advertiser_id, b);
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
                let e = out.entry((bucket, key.ad_id)).or_insert((
                    Counts::default(),
                    PointState::Reconciled,
                    0,
                ));
                e.0.merge(&row.counts);
                e.2 = e.2.max(row.version);
            }
            Ok(())
        };
        // Whole hours inside the range that are merged are read as one
        // row per dimension tuple; the rest a minute row at a time.
        let mut from = m0;
        if q.bucket_s >= 3600 {
            let rolled: Vec<u32> = tx
                .open_table(ROLLED)
                .map_err(se)?
                .range(m0.div_ceil(60)..m1 / 60)
                .map_err(se)?
                .map(|r| r.map(|(k, _)| k.value()))
                .collect::<std::result::Result<_, _>>()
                .map_err(se)?;
            for h in rolled {
                scan(&t, from, h * 60)?;
                scan(&hour_t, h * 60, h * 60 + 1)?;
                from = h * 60 + 60;
            }
        }
        scan(&t, from, m1)?;
        // A bucket is final only if its last minute is (a bucket with rows
        // in early minutes only may still get rows in later ones), and
        // reconciled only if every minute in it is.
        for ((bucket, _), v) in out.iter_mut() {
            let first = (*bucket / 60) as u32;
            let last = ((bucket + q.bucket_s) / 60 - 1) as u32;
            v.1 = if !self.is_final(last, wm) {
                PointState::Provisional
            } else if states.reconciled(first, last) {
                PointState::Reconciled
            } else {
                PointState::Final
            };
        }
        Ok(out)
    }

    /// Unique users per (bucket start s, ad id) of a query: minute sketches
    /// merged, or for every whole hour inside the range that is merged
    /// already, its hour sketch. A point of one sketch is answered from its
    /// stored estimate, without decoding it.
    pub fn unique_users(&self, q: &Query) -> Result<BTreeMap<(i64, String), u64>> {
        enum Acc {
            One(Vec<u8>),
            Many(Sketch),
        }
        let db = self.db()?;
        let tx = db.begin_read().map_err(se)?;
        let min_t = tx.open_table(UNIQ_MIN).map_err(se)?;
        let hour_t = tx.open_table(UNIQ_HOUR).map_err(se)?;
        let rolled = tx.open_table(ROLLED).map_err(se)?;
        let m0 = (q.start_s.max(0) / 60) as u32;
        let m1 = (q.end_s.max(0) as u64).div_ceil(60).min(u32::MAX as u64) as u32;
        let mut acc: BTreeMap<(i64, String), Acc> = BTreeMap::new();
        // Visits the advertiser's sketches of one unit (a minute, or an hour
        // at its first minute); answers the minute of the first key after
        // them, so empty stretches are skipped in one step.
        let mut visit = |t: &redb::ReadOnlyTable<&[u8], &[u8]>, unit: u32| -> Result<Option<u32>> {
            let p = crate::uniques::prefix(unit, &q.advertiser_id);
            for r in t.range(p.as_slice()..).map_err(se)? {
                let (k, v) = r.map_err(se)?;
                let k = k.value();
                if !k.starts_with(&p) {
                    return Ok(k
                        .get(..4)
                        .map(|b| u32::from_be_bytes(b.try_into().unwrap())));
                }
                let Some((_, _, camp, ad)) = crate::uniques::decode_key(k) else {
                    continue;
                };
                if q.campaign_id.as_deref().is_some_and(|c| c != camp)
                    || q.ad_id.as_deref().is_some_and(|a| a != ad)
                {
                    continue;
                }
                let t_s = unit as i64 * 60;
                let bucket = t_s - t_s.rem_euclid(q.bucket_s);
                match acc.entry((bucket, ad.to_owned())) {
                    std::collections::btree_map::Entry::Vacant(e) => {
                        e.insert(Acc::One(v.value().to_vec()));
                    }
                    std::collections::btree_map::Entry::Occupied(mut e) => {
                        let Some(s) = Sketch::decode(v.value()) else {
                            continue;
                        };
                        let a = e.get_mut();
                        match a {
                            Acc::Many(m) => m.merge(&s),
                            Acc::One(b) => {
                                let mut m = Sketch::decode(b).unwrap_or_default();
                                m.merge(&s);
                                *a = Acc::Many(m);
                            }
                        }
                    }
                }
            }
            Ok(None)
        };
        let mut m = m0;
        while m < m1 {
            let whole_hour = q.bucket_s >= 3600 && m.is_multiple_of(60) && m + 60 <= m1;
            if whole_hour && rolled.get(m / 60).map_err(se)?.is_some() {
                visit(&hour_t, m)?;
                m += 60;
                continue;
            }
            m = match visit(&min_t, m)? {
                Some(next) if next > m => next,
                Some(_) => m + 1,
                None => break,
            };
        }
        Ok(acc
            .into_iter()
            .map(|(k, a)| {
                let n = match a {
                    Acc::One(b) => Sketch::stored_estimate(&b).unwrap_or(0),
                    Acc::Many(s) => s.estimate(),
                };
                (k, n)
            })
            .collect())
    }

    /// The hour rows of hour `h` (merged once reconciliation passed it).
    pub fn hour_rows(&self, h: u32) -> Result<Vec<(RowKey, Row)>> {
        let db = self.db()?;
        let tx = db.begin_read().map_err(se)?;
        let idx = tx.open_table(HOUR_ROWS).map_err(se)?;
        let t = tx.open_table(ROWS_HOUR).map_err(se)?;
        let empty: &[u8] = &[];
        let mut out = Vec::new();
        for r in idx.range((h, empty)..(h + 1, empty)).map_err(se)? {
            let (k, _) = r.map_err(se)?;
            let kb = k.value().1;
            if let (Some(key), Some(v)) = (decode_key(kb), t.get(kb).map_err(se)?) {
                out.push((key, Row::decode(v.value())));
            }
        }
        Ok(out)
    }

    /// (sketches, bytes) of the minute and of the hour unique-user tables.
    pub fn sketch_bytes(&self) -> Result<[(u64, u64); 2]> {
        let db = self.db()?;
        let tx = db.begin_read().map_err(se)?;
        let mut out = [(0, 0); 2];
        for (i, def) in [UNIQ_MIN, UNIQ_HOUR].into_iter().enumerate() {
            for r in tx.open_table(def).map_err(se)?.iter().map_err(se)? {
                let (k, v) = r.map_err(se)?;
                out[i].0 += 1;
                out[i].1 += (k.value().len() + v.value().len()) as u64;
            }
        }
        Ok(out)
    }

    /// Every row in `[m0, m1)` minutes, all advertisers (a full scan: for
    /// tests and offline tools).
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
        meta_get(&t, name)
    }

    /// Visits every hot audited event whose event minute is in `[m0, m1)`,
    /// with its gateway, shard and seq; answers the sealed files that hold
    /// the rest (events retention dropped from the hot store), from the
    /// same snapshot.
    pub fn audit_events(
        &self,
        m0: u32,
        m1: u32,
        mut f: impl FnMut(&str, u16, u64, &EventRef<'_>),
    ) -> std::result::Result<Vec<ColdPart>, ReadError> {
        let db = self.db()?;
        let tx = db.begin_read().map_err(se)?;
        let t = tx.open_table(AUDIT).map_err(se)?;
        visit_audit(&t, (m0, "", 0, 0), (m1, "", 0, 0), &mut f)?;
        Ok(cold_parts(&tx, m0, m1)?)
    }

    /// Replaces rows with recounted ones, each a new version (what a
    /// reconcile writes, without its bookkeeping).
    pub fn write_corrections(&self, fixes: &[(RowKey, Counts)]) -> Result<()> {
        self.commit_reconcile(&ReconCommit {
            fixes,
            ..ReconCommit::default()
        })
        .map(|_| ())
    }

    // ---- sealed audit files ----

    /// Hours before `hour_limit` with raw events of a gateway not yet in a
    /// sealed file, with the sequence number of their last change.
    pub fn seal_candidates(&self, hour_limit: u32, max: usize) -> Result<Vec<(u32, String, u64)>> {
        let db = self.db()?;
        let tx = db.begin_read().map_err(se)?;
        let t = tx.open_table(AUDIT_PENDING).map_err(se)?;
        let mut out = Vec::new();
        for r in t.range((0u32, "")..(hour_limit, "")).map_err(se)?.take(max) {
            let (k, v) = r.map_err(se)?;
            let (h, gw) = k.value();
            out.push((h, gw.to_owned(), v.value()));
        }
        Ok(out)
    }

    /// Hours with raw events not yet sealed (a gauge: the upload backlog).
    pub fn seal_backlog(&self) -> Result<u64> {
        let db = self.db()?;
        let tx = db.begin_read().map_err(se)?;
        tx.open_table(AUDIT_PENDING).map_err(se)?.len().map_err(se)
    }

    /// The parts recorded for (hour, gateway), sealed or intended, by number.
    pub fn audit_parts(&self, hour: u32, gateway: &str) -> Result<Vec<(u32, String)>> {
        let db = self.db()?;
        let tx = db.begin_read().map_err(se)?;
        let t = tx.open_table(AUDIT_PARTS).map_err(se)?;
        let mut out = Vec::new();
        for r in t
            .range((hour, gateway, 0u32)..=(hour, gateway, u32::MAX))
            .map_err(se)?
        {
            let (k, v) = r.map_err(se)?;
            out.push((k.value().2, v.value().to_owned()));
        }
        Ok(out)
    }

    /// Every part recorded, in (hour, gateway, part) order.
    pub fn all_audit_parts(&self) -> Result<Vec<(PartKey, String)>> {
        let db = self.db()?;
        let tx = db.begin_read().map_err(se)?;
        let t = tx.open_table(AUDIT_PARTS).map_err(se)?;
        let mut out = Vec::new();
        for r in t.iter().map_err(se)? {
            let (k, v) = r.map_err(se)?;
            let (h, g, p) = k.value();
            out.push(((h, g.to_owned(), p), v.value().to_owned()));
        }
        Ok(out)
    }

    /// The audit entries of `gateway` in `hour` per shard: (shard, after
    /// seq) of each, in key order.
    pub fn audit_entry_keys(&self, hour: u32, gateway: &str) -> Result<Vec<(u16, u64)>> {
        let db = self.db()?;
        let tx = db.begin_read().map_err(se)?;
        let t = tx.open_table(AUDIT).map_err(se)?;
        let mut out = Vec::new();
        for m in hour * 60..hour * 60 + 60 {
            for r in t
                .range((m, gateway, 0u16, 0u64)..=(m, gateway, u16::MAX, u64::MAX))
                .map_err(se)?
            {
                let (k, _) = r.map_err(se)?;
                let (_, _, shard, after) = k.value();
                out.push((shard, after));
            }
        }
        out.sort_unstable();
        out.dedup();
        Ok(out)
    }

    /// Visits the events of `gateway` in `hour` whose audit entry's first
    /// seq lies in `[first, last]` of its shard's range (`ranges`: shard ->
    /// (first, last)).
    pub fn audit_events_in(
        &self,
        hour: u32,
        gateway: &str,
        ranges: &BTreeMap<u16, (u64, u64)>,
        mut f: impl FnMut(u16, u64, &EventRef<'_>),
    ) -> std::result::Result<u64, ReadError> {
        let db = self.db()?;
        let tx = db.begin_read().map_err(se)?;
        let t = tx.open_table(AUDIT).map_err(se)?;
        let mut n = 0;
        for m in hour * 60..hour * 60 + 60 {
            for (&shard, &(first, last)) in ranges {
                for r in t
                    .range((m, gateway, shard, first)..=(m, gateway, shard, last))
                    .map_err(se)?
                {
                    let (k, v) = r.map_err(se)?;
                    let (_, _, _, after_seq) = k.value();
                    let corrupt = |why: String| ReadError::Corrupt {
                        minute: m,
                        gateway: gateway.to_owned(),
                        shard,
                        after_seq,
                        why,
                    };
                    let b =
                        Batch::decode(v.value(), usize::MAX).map_err(|e| corrupt(e.to_string()))?;
                    let raw = b.decompress().map_err(|e| corrupt(e.to_string()))?;
                    for it in items(&raw, b.count, b.after_seq, b.last_seq)
                        .map_err(|e| corrupt(e.to_string()))?
                    {
                        let e = EventRef::decode(it.bytes)
                            .map_err(|e| corrupt(format!("event {}: {e}", it.seq)))?;
                        f(shard, it.seq, &e);
                        n += 1;
                    }
                }
            }
        }
        Ok(n)
    }

    /// Records a part: an intent before its upload, or the sealed part
    /// after it. Sealing also clears the hour's pending mark, unless events
    /// came for it since `pending_seq`.
    pub fn put_audit_part(
        &self,
        hour: u32,
        gateway: &str,
        part: u32,
        json: &str,
        clear_pending: Option<u64>,
    ) -> Result<()> {
        let db = self.db()?;
        let tx = db.begin_write().map_err(se)?;
        {
            let mut parts = tx.open_table(AUDIT_PARTS).map_err(se)?;
            parts.insert((hour, gateway, part), json).map_err(se)?;
            let sealed = serde_json::from_str::<SealedPart>(json)
                .is_ok_and(|p| p.state == "sealed" && p.cold_below < 60);
            if sealed {
                tx.open_table(AUDIT_HOT)
                    .map_err(se)?
                    .insert((hour, gateway, part), ())
                    .map_err(se)?;
            }
            if let Some(seq) = clear_pending {
                let mut pending = tx.open_table(AUDIT_PENDING).map_err(se)?;
                let now = pending.get((hour, gateway)).map_err(se)?.map(|v| v.value());
                if now == Some(seq) {
                    pending.remove((hour, gateway)).map_err(se)?;
                }
            }
        }
        tx.commit().map_err(se)
    }

    /// Clears the pending mark of (hour, gateway) if no events came since
    /// `seq` (everything of it is sealed).
    pub fn clear_audit_pending(&self, hour: u32, gateway: &str, seq: u64) -> Result<()> {
        let db = self.db()?;
        let tx = db.begin_write().map_err(se)?;
        {
            let mut pending = tx.open_table(AUDIT_PENDING).map_err(se)?;
            let now = pending.get((hour, gateway)).map_err(se)?.map(|v| v.value());
            if now == Some(seq) {
                pending.remove((hour, gateway)).map_err(se)?;
            }
        }
        tx.commit().map_err(se)
    }

    // ---- retention ----

    /// Rows of minutes below this have been (or are being) dropped: a query
    /// reaching below it would get a partial answer.
    pub fn rows_kept_from(&self) -> Result<u32> {
        Ok(self.meta("rows_kept_from")? as u32)
    }

    /// One bounded step of the rows' retention: drops up to `max` rows of
    /// minutes below `below`, with their index entries, and the minutes'
    /// bookkeeping (change stamps, reconcile marks and failures, dirty
    /// marks). A row whose change a sink (ClickHouse, Kafka) has not taken
    /// yet stays until it has. Records `below` first, so queries past it are refused from
    /// the first dropped row on.
    pub fn drop_rows_step(&self, below: u32, max: usize) -> Result<Dropped> {
        let db = self.db()?;
        let tx = db.begin_write().map_err(se)?;
        let mut d = Dropped::default();
        {
            let mut meta = tx.open_table(META).map_err(se)?;
            if meta_get(&meta, "rows_kept_from")? < below as i64 {
                meta.insert("rows_kept_from", below as i64).map_err(se)?;
            }
            let mut idx = tx.open_table(MINUTE_ROWS).map_err(se)?;
            let mut rows = tx.open_table(ROWS).map_err(se)?;
            let export = tx.open_table(EXPORT).map_err(se)?;
            let export_kafka = tx.open_table(EXPORT_KAFKA).map_err(se)?;
            let empty: &[u8] = &[];
            let mut doomed: Vec<(u32, Vec<u8>)> = Vec::new();
            for r in idx.range((0u32, empty)..(below, empty)).map_err(se)? {
                let (k, _) = r.map_err(se)?;
                let (m, kb) = k.value();
                if export.get(kb).map_err(se)?.is_some()
                    || export_kafka.get(kb).map_err(se)?.is_some()
                {
                    continue;
                }
                doomed.push((m, kb.to_vec()));
                if doomed.len() >= max {
                    break;
                }
            }
            for (m, kb) in &doomed {
                rows.remove(kb.as_slice()).map_err(se)?;
                idx.remove((*m, kb.as_slice())).map_err(se)?;
            }
            d.rows = doomed.len() as u64;
            let budget = max.saturating_sub(doomed.len());
            d.marks += drop_sketches_below(&tx, UNIQ_MIN, below, budget)?;
            d.marks += drop_sketches_below(&tx, UNIQ_HOUR, below - below % 60, budget)?;
            d.marks += drop_minutes_below(&tx, ROLLED, below / 60, budget)?;
            {
                // Hour rows of hours wholly below the cut-off.
                let mut idx = tx.open_table(HOUR_ROWS).map_err(se)?;
                let mut hour_rows = tx.open_table(ROWS_HOUR).map_err(se)?;
                let doomed: Vec<(u32, Vec<u8>)> = idx
                    .range((0u32, empty)..(below / 60, empty))
                    .map_err(se)?
                    .take(budget)
                    .map(|r| {
                        r.map(|(k, _)| {
                            let (h, kb) = k.value();
                            (h, kb.to_vec())
                        })
                    })
                    .collect::<std::result::Result<_, _>>()
                    .map_err(se)?;
                for (h, kb) in &doomed {
                    hour_rows.remove(kb.as_slice()).map_err(se)?;
                    idx.remove((*h, kb.as_slice())).map_err(se)?;
                }
                d.marks += doomed.len() as u64;
            }
            d.marks += drop_minutes_below(&tx, MINUTE_REV, below, budget)?;
            d.marks += drop_minutes_below(&tx, DIRTY, below, budget)?;
            d.marks += drop_minutes_below(&tx, RECONCILED, below, budget)?;
            d.marks += drop_minutes_below(&tx, RECON_FAILED, below, budget)?;
            {
                // Unrecorded counts go with the rows of their minute.
                let mut t = tx.open_table(UNRECORDED).map_err(se)?;
                let doomed: Vec<(u32, String, u16)> = t
                    .range((0u32, "", 0u16)..(below, "", 0u16))
                    .map_err(se)?
                    .take(budget)
                    .map(|r| {
                        r.map(|(k, _)| {
                            let (m, gw, shard) = k.value();
                            (m, gw.to_owned(), shard)
                        })
                    })
                    .collect::<std::result::Result<_, _>>()
                    .map_err(se)?;
                for (m, gw, shard) in &doomed {
                    t.remove((*m, gw.as_str(), *shard)).map_err(se)?;
                }
                d.marks += doomed.len() as u64;
            }
        }
        tx.commit().map_err(se)?;
        Ok(d)
    }

    /// One bounded step of the late table's retention: drops up to `max`
    /// late rows of minutes below `below`. The table is keyed by
    /// advertiser, so the rows due are found in a read snapshot (no write
    /// held while it is read whole), then removed in one short write.
    pub fn drop_late_step(&self, below: u32, max: usize) -> Result<u64> {
        let db = self.db()?;
        let doomed: Vec<Vec<u8>> = {
            let tx = db.begin_read().map_err(se)?;
            let late = tx.open_table(LATE).map_err(se)?;
            let mut out = Vec::new();
            for r in late.iter().map_err(se)? {
                let (k, _) = r.map_err(se)?;
                if decode_key(k.value()).is_some_and(|key| key.minute < below) {
                    out.push(k.value().to_vec());
                    if out.len() >= max {
                        break;
                    }
                }
            }
            out
        };
        if doomed.is_empty() {
            return Ok(0);
        }
        let tx = db.begin_write().map_err(se)?;
        {
            // A key found due stays due (its minute is in the key).
            let mut late = tx.open_table(LATE).map_err(se)?;
            for k in &doomed {
                late.remove(k.as_slice()).map_err(se)?;
            }
        }
        tx.commit().map_err(se)?;
        Ok(doomed.len() as u64)
    }

    /// One bounded step of the hot audit's retention: for sealed parts
    /// sealed at least `grace_ms` before `now_ms`, drops their raw events
    /// from the hot store a whole minute at a time (about `max` entries
    /// per step), and records in the part how far it has gone, so a reader
    /// takes each minute from exactly one place.
    pub fn drop_hot_audit_step(&self, now_ms: i64, grace_ms: i64, max: usize) -> Result<u64> {
        let db = self.db()?;
        let tx = db.begin_write().map_err(se)?;
        let mut dropped = 0u64;
        {
            let mut hot = tx.open_table(AUDIT_HOT).map_err(se)?;
            let mut parts = tx.open_table(AUDIT_PARTS).map_err(se)?;
            let mut audit = tx.open_table(AUDIT).map_err(se)?;
            let kafka_marks = tx.open_table(EXPORT_KAFKA_EVENTS).map_err(se)?;
            let kafka_remark_from =
                meta_get(&tx.open_table(META).map_err(se)?, KAFKA_REMARK_FROM)? as u32;
            // Oldest hours first; a part not yet due is passed over (its
            // addenda are sealed later than the hour's file).
            let keys: Vec<(u32, String, u32)> = hot
                .iter()
                .map_err(se)?
                .take(1024)
                .map(|r| {
                    r.map(|(k, _)| {
                        let (h, g, p) = k.value();
                        (h, g.to_owned(), p)
                    })
                })
                .collect::<std::result::Result<_, _>>()
                .map_err(se)?;
            for (h, g, pn) in keys {
                if dropped as usize >= max {
                    break;
                }
                let json = parts
                    .get((h, g.as_str(), pn))
                    .map_err(se)?
                    .map(|v| v.value().to_owned());
                let Some(mut p) = json.and_then(|j| serde_json::from_str::<SealedPart>(&j).ok())
                else {
                    hot.remove((h, g.as_str(), pn)).map_err(se)?;
                    continue;
                };
                if p.state != "sealed" || p.sealed_ms.is_none_or(|t| t + grace_ms > now_ms) {
                    continue;
                }
                while p.cold_below < 60 && (dropped as usize) < max {
                    let m = h * 60 + p.cold_below as u32;
                    // Raw events Kafka has not acknowledged stay hot, and
                    // so do those passed over while its backlog was full.
                    let waiting = kafka_marks
                        .range((m, g.as_str(), 0u16, 0u64)..=(m, g.as_str(), u16::MAX, u64::MAX))
                        .map_err(se)?
                        .next()
                        .is_some()
                        || (kafka_remark_from != 0 && m >= kafka_remark_from);
                    if waiting {
                        break;
                    }
                    for (&shard, &(first, last)) in &p.ranges {
                        let doomed: Vec<u64> = audit
                            .range((m, g.as_str(), shard, first)..=(m, g.as_str(), shard, last))
                            .map_err(se)?
                            .map(|r| r.map(|(k, _)| k.value().3))
                            .collect::<std::result::Result<_, _>>()
                            .map_err(se)?;
                        for a in doomed {
                            audit.remove((m, g.as_str(), shard, a)).map_err(se)?;
                            dropped += 1;
                        }
                    }
                    p.cold_below += 1;
                }
                let j = serde_json::to_string(&p).expect("json");
                parts.insert((h, g.as_str(), pn), j.as_str()).map_err(se)?;
                if p.cold_below >= 60 {
                    hot.remove((h, g.as_str(), pn)).map_err(se)?;
                }
            }
        }
        tx.commit().map_err(se)?;
        Ok(dropped)
    }

    /// Sealed parts of hours below `before_hour`, oldest first, at most
    /// `max`: what the sealed files' retention deletes.
    pub fn parts_before(&self, before_hour: u32, max: usize) -> Result<Vec<(PartKey, SealedPart)>> {
        let db = self.db()?;
        let tx = db.begin_read().map_err(se)?;
        let t = tx.open_table(AUDIT_PARTS).map_err(se)?;
        let mut out = Vec::new();
        for r in t
            .range((0u32, "", 0u32)..(before_hour, "", 0u32))
            .map_err(se)?
        {
            let (k, v) = r.map_err(se)?;
            let (h, g, p) = k.value();
            if let Ok(part) = serde_json::from_str::<SealedPart>(v.value()) {
                if part.state == "sealed" {
                    out.push(((h, g.to_owned(), p), part));
                    if out.len() >= max {
                        break;
                    }
                }
            }
        }
        Ok(out)
    }

    /// Forgets a part whose file has been deleted, with any of its raw
    /// events still hot.
    pub fn forget_part(&self, key: &PartKey) -> Result<()> {
        let (h, g, pn) = (key.0, key.1.as_str(), key.2);
        let db = self.db()?;
        let tx = db.begin_write().map_err(se)?;
        {
            let mut parts = tx.open_table(AUDIT_PARTS).map_err(se)?;
            let json = parts
                .get((h, g, pn))
                .map_err(se)?
                .map(|v| v.value().to_owned());
            if let Some(p) = json.and_then(|j| serde_json::from_str::<SealedPart>(&j).ok()) {
                let mut audit = tx.open_table(AUDIT).map_err(se)?;
                for m in h * 60 + p.cold_below as u32..h * 60 + 60 {
                    for (&shard, &(first, last)) in &p.ranges {
                        audit
                            .retain_in((m, g, shard, first)..=(m, g, shard, last), |_, _| false)
                            .map_err(se)?;
                    }
                }
            }
            parts.remove((h, g, pn)).map_err(se)?;
            tx.open_table(AUDIT_HOT)
                .map_err(se)?
                .remove((h, g, pn))
                .map_err(se)?;
        }
        tx.commit().map_err(se)
    }

    /// The store file's size in bytes.
    pub fn file_bytes(&self) -> u64 {
        std::fs::metadata(&self.path).map_or(0, |m| m.len())
    }

    /// Flips a byte of every audit entry of `gateway` in `minute`.
    #[cfg(test)]
    pub(crate) fn damage_audit_for_test(&self, minute: u32, gateway: &str) {
        let db = self.db().unwrap();
        let tx = db.begin_write().unwrap();
        {
            let mut t = tx.open_table(AUDIT).unwrap();
            let keys: Vec<(u32, String, u16, u64)> = t
                .range((minute, "", 0u16, 0u64)..(minute + 1, "", 0u16, 0u64))
                .unwrap()
                .map(|r| {
                    let (k, _) = r.unwrap();
                    let (m, g, s, a) = k.value();
                    (m, g.to_owned(), s, a)
                })
                .filter(|k| k.1 == gateway)
                .collect();
            for (m, g, s, a) in keys {
                let mut v = t
                    .get((m, g.as_str(), s, a))
                    .unwrap()
                    .unwrap()
                    .value()
                    .to_vec();
                let n = v.len();
                v[n - 1] ^= 0x55;
                t.insert((m, g.as_str(), s, a), v.as_slice()).unwrap();
            }
        }
        tx.commit().unwrap();
    }

    // ---- reconciliation ----

    /// Sources, watermark, transaction sequence and frontier in one snapshot.
    pub fn reconcile_view(&self, now_ms: i64) -> Result<ReconView> {
        let db = self.db()?;
        let tx = db.begin_read().map_err(se)?;
        let s = tx.open_table(SOURCES).map_err(se)?;
        let m = tx.open_table(META).map_err(se)?;
        Ok(ReconView {
            sources: read_sources(&tx)?,
            watermark_ms: self.watermark_in(&s, &m, now_ms)?,
            txn_seq: meta_get(&m, "txn_seq")? as u64,
            frontier: meta_get(&m, "reconciled_through")? as u32,
        })
    }

    /// The first minute at or after `from` with rows or raw events.
    pub fn next_data_minute(&self, from: u32) -> Result<Option<u32>> {
        let db = self.db()?;
        let tx = db.begin_read().map_err(se)?;
        let a = tx.open_table(AUDIT).map_err(se)?;
        let r = tx.open_table(MINUTE_ROWS).map_err(se)?;
        let first_audit = a
            .range((from, "", 0u16, 0u64)..)
            .map_err(se)?
            .next()
            .transpose()
            .map_err(se)?
            .map(|(k, _)| k.value().0);
        let empty: &[u8] = &[];
        let first_row = r
            .range((from, empty)..)
            .map_err(se)?
            .next()
            .transpose()
            .map_err(se)?
            .map(|(k, _)| k.value().0);
        Ok(match (first_audit, first_row) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        })
    }

    /// Up to `max` dirty minutes, oldest first, with the sequence number of
    /// the change that dirtied each.
    pub fn dirty_minutes(&self, max: usize) -> Result<Vec<(u32, u64)>> {
        let db = self.db()?;
        let tx = db.begin_read().map_err(se)?;
        let t = tx.open_table(DIRTY).map_err(se)?;
        let mut out = Vec::new();
        for r in t.iter().map_err(se)?.take(max) {
            let (k, v) = r.map_err(se)?;
            out.push((k.value(), v.value()));
        }
        Ok(out)
    }

    pub fn dirty_count(&self) -> Result<u64> {
        let db = self.db()?;
        let tx = db.begin_read().map_err(se)?;
        tx.open_table(DIRTY).map_err(se)?.len().map_err(se)
    }

    /// Reads minute `m` for a recount: its stamp, its rows, its last
    /// reconcile, and every raw event of it through `f` (gateway, shard,
    /// seq, event), all from one snapshot.
    pub fn read_minute(
        &self,
        m: u32,
        mut f: impl FnMut(&str, u16, u64, &EventRef<'_>),
    ) -> std::result::Result<MinuteRead, ReadError> {
        let db = self.db()?;
        let tx = db.begin_read().map_err(se)?;
        let rev = tx
            .open_table(MINUTE_REV)
            .map_err(se)?
            .get(m)
            .map_err(se)?
            .map_or(0, |v| v.value());
        let mark = tx
            .open_table(RECONCILED)
            .map_err(se)?
            .get(m)
            .map_err(se)?
            .and_then(|v| ReconMark::decode(v.value()));
        let idx = tx.open_table(MINUTE_ROWS).map_err(se)?;
        let rows_t = tx.open_table(ROWS).map_err(se)?;
        let mut rows = Vec::new();
        let empty: &[u8] = &[];
        for r in idx.range((m, empty)..(m + 1, empty)).map_err(se)? {
            let (k, _) = r.map_err(se)?;
            let (_, kb) = k.value();
            if let (Some(key), Some(v)) = (decode_key(kb), rows_t.get(kb).map_err(se)?) {
                rows.push((key, Row::decode(v.value())));
            }
        }
        let audit = tx.open_table(AUDIT).map_err(se)?;
        let audit_entries = visit_audit(&audit, (m, "", 0, 0), (m + 1, "", 0, 0), &mut f)?;
        Ok(MinuteRead {
            rev,
            rows,
            mark,
            audit_entries,
            cold: cold_parts(&tx, m, m + 1)?,
        })
    }

    /// Writes a reconcile's outcome in one transaction; answers how long
    /// the transaction held the store's one writer (from the moment it got
    /// it to its commit), or `None` when the minute changed since it was
    /// read and nothing was written.
    pub fn commit_reconcile(&self, c: &ReconCommit<'_>) -> Result<Option<std::time::Duration>> {
        let db = self.db()?;
        let tx = db.begin_write().map_err(se)?;
        let held = std::time::Instant::now();
        {
            let rev_t = tx.open_table(MINUTE_REV).map_err(se)?;
            if let (Some(m), Some(rev)) = (c.minute, c.rev) {
                let now_rev = rev_t.get(m).map_err(se)?.map_or(0, |v| v.value());
                if now_rev != rev {
                    drop(rev_t);
                    tx.abort().map_err(se)?;
                    return Ok(None);
                }
            }
            let mut rows = tx.open_table(ROWS).map_err(se)?;
            let mut minute_rows = tx.open_table(MINUTE_ROWS).map_err(se)?;
            let mut meta = tx.open_table(META).map_err(se)?;
            let mut export = tx.open_table(EXPORT).map_err(se)?;
            let mut export_kafka = tx.open_table(EXPORT_KAFKA).map_err(se)?;
            let mut dirty = tx.open_table(DIRTY).map_err(se)?;
            let mut marks = tx.open_table(RECONCILED).map_err(se)?;
            let mut failed = tx.open_table(RECON_FAILED).map_err(se)?;
            let rolled_t = tx.open_table(ROLLED).map_err(se)?;
            let revision = meta_get(&meta, "revision")? + 1;
            // Kafka's records carry the reconciled state: the rows of every
            // minute this commit may make reconciled go out again.
            let mut restate: Vec<Vec<u8>> = Vec::new();
            if self.settings.kafka {
                let before = meta_get(&meta, "reconciled_through")? as u32;
                let mut spans = Vec::new();
                if let (Some(m), Some(_)) = (c.minute, &c.mark) {
                    spans.push(m..m + 1);
                }
                if let Some(to) = c.frontier_to.filter(|&to| to > before) {
                    spans.push(before..to);
                }
                for span in spans {
                    let lo: (u32, &[u8]) = (span.start, &[]);
                    let hi: (u32, &[u8]) = (span.end, &[]);
                    for r in minute_rows.range(lo..hi).map_err(se)? {
                        restate.push(r.map_err(se)?.0.value().1.to_vec());
                    }
                }
            }
            if (self.settings.export && !c.fixes.is_empty())
                || (self.settings.kafka && !(c.fixes.is_empty() && restate.is_empty()))
            {
                meta.insert("revision", revision).map_err(se)?;
            }
            for kb in &restate {
                export_kafka
                    .insert(kb.as_slice(), revision as u64)
                    .map_err(se)?;
            }
            for (k, counts) in c.fixes {
                let kb = encode_key(k);
                let old = rows
                    .get(kb.as_slice())
                    .map_err(se)?
                    .map(|v| Row::decode(v.value()));
                let r = merge::corrected(old, *counts);
                rows.insert(kb.as_slice(), r.encode().as_slice())
                    .map_err(se)?;
                if rolled_t.get(k.minute / 60).map_err(se)?.is_some() {
                    hour_row_change(&tx, k, old, r)?;
                }
                if old.is_none() {
                    minute_rows
                        .insert((k.minute, kb.as_slice()), ())
                        .map_err(se)?;
                }
                if self.settings.export {
                    export.insert(kb.as_slice(), revision as u64).map_err(se)?;
                }
                if self.settings.kafka {
                    export_kafka
                        .insert(kb.as_slice(), revision as u64)
                        .map_err(se)?;
                }
            }
            if !c.fixes.is_empty() {
                let n = meta_get(&meta, "reconcile_corrections")?;
                meta.insert("reconcile_corrections", n + c.fixes.len() as i64)
                    .map_err(se)?;
            }
            if let Some(m) = c.minute {
                if let Some(mark) = &c.mark {
                    marks.insert(m, mark.encode().as_slice()).map_err(se)?;
                    failed.remove(m).map_err(se)?;
                    dirty.remove(m).map_err(se)?;
                }
                if let Some(why) = c.failed {
                    failed.insert(m, why).map_err(se)?;
                    dirty.remove(m).map_err(se)?;
                }
            }
            let frontier = meta_get(&meta, "reconciled_through")? as u32;
            let frontier_before = frontier;
            if let Some(to) = c.frontier_to.filter(|&to| to > frontier) {
                meta.insert("reconciled_through", to as i64).map_err(se)?;
            }
            let frontier = frontier.max(c.frontier_to.unwrap_or(0));
            for &m in c.dirty_more {
                if m < frontier && marks.get(m).map_err(se)?.is_some() {
                    let at = dirty.get(m).map_err(se)?.map_or(0, |v| v.value());
                    dirty.insert(m, at).map_err(se)?;
                }
            }
            for &m in c.undirty {
                dirty.remove(m).map_err(se)?;
            }
            if let Some((id, json)) = c.job {
                tx.open_table(JOBS)
                    .map_err(se)?
                    .insert(id, json)
                    .map_err(se)?;
            }
            // Close the tables the merges below open again.
            drop((rows, minute_rows, rolled_t));
            if let (Some(m), Some(users)) = (c.minute, c.users) {
                rebuild_users(&tx, m, users)?;
            }
            // Hours the frontier has passed with this commit (after this
            // minute's sketches are rebuilt): merge their hour sketches.
            if let Some(to) = c.frontier_to.filter(|&to| to > frontier_before) {
                // Only hours with sketches (the frontier may jump over
                // years of empty minutes).
                let mut h = frontier_before / 60;
                while h < to / 60 {
                    let lo = (h * 60).to_be_bytes();
                    let by_sketch = tx
                        .open_table(UNIQ_MIN)
                        .map_err(se)?
                        .range(lo.as_slice()..)
                        .map_err(se)?
                        .next()
                        .transpose()
                        .map_err(se)?
                        .map(|(k, _)| u32::from_be_bytes(k.value()[..4].try_into().unwrap()) / 60);
                    let empty: &[u8] = &[];
                    let by_row = tx
                        .open_table(MINUTE_ROWS)
                        .map_err(se)?
                        .range((h * 60, empty)..)
                        .map_err(se)?
                        .next()
                        .transpose()
                        .map_err(se)?
                        .map(|(k, _)| k.value().0 / 60);
                    let next = match (by_sketch, by_row) {
                        (Some(a), Some(b)) => Some(a.min(b)),
                        (a, b) => a.or(b),
                    };
                    match next {
                        Some(n) if n < to / 60 => {
                            roll_up_hour(&tx, n)?;
                            h = n + 1;
                        }
                        _ => break,
                    }
                }
            }
        }
        tx.commit().map_err(se)?;
        Ok(Some(held.elapsed()))
    }

    /// The last reconcile of each minute in `[m0, m1)` that has one.
    pub fn reconciled_minutes(&self, m0: u32, m1: u32) -> Result<Vec<(u32, ReconMark)>> {
        let db = self.db()?;
        let tx = db.begin_read().map_err(se)?;
        let t = tx.open_table(RECONCILED).map_err(se)?;
        let mut out = Vec::new();
        for r in t.range(m0..m1).map_err(se)? {
            let (k, v) = r.map_err(se)?;
            if let Some(mark) = ReconMark::decode(v.value()) {
                out.push((k.value(), mark));
            }
        }
        Ok(out)
    }

    /// Per event minute in `[m0, m1)`, gateway and shard: events answered
    /// without a record while that gateway's log was full.
    pub fn unrecorded(&self, m0: u32, m1: u32) -> Result<Vec<(u32, String, u16, u64)>> {
        let db = self.db()?;
        let tx = db.begin_read().map_err(se)?;
        let t = tx.open_table(UNRECORDED).map_err(se)?;
        let mut out = Vec::new();
        for r in t.range((m0, "", 0)..(m1, "", 0)).map_err(se)? {
            let (k, v) = r.map_err(se)?;
            let (m, gw, shard) = k.value();
            out.push((m, gw.to_owned(), shard, v.value()));
        }
        Ok(out)
    }

    /// Minutes in `[m0, m1)` that could not be reconciled, with why.
    pub fn failed_minutes(&self, m0: u32, m1: u32) -> Result<Vec<(u32, String)>> {
        let db = self.db()?;
        let tx = db.begin_read().map_err(se)?;
        let t = tx.open_table(RECON_FAILED).map_err(se)?;
        let mut out = Vec::new();
        for r in t.range(m0..m1).map_err(se)? {
            let (k, v) = r.map_err(se)?;
            out.push((k.value(), v.value().to_owned()));
        }
        Ok(out)
    }

    /// Every reconcile job, by id.
    pub fn jobs(&self) -> Result<Vec<(u64, String)>> {
        let db = self.db()?;
        let tx = db.begin_read().map_err(se)?;
        let t = tx.open_table(JOBS).map_err(se)?;
        let mut out = Vec::new();
        for r in t.iter().map_err(se)? {
            let (k, v) = r.map_err(se)?;
            out.push((k.value(), v.value().to_owned()));
        }
        Ok(out)
    }

    /// Stores a new job under the next id; forgets the oldest beyond
    /// `keep` (finished ones first are the caller's choice: it passes
    /// which may go).
    pub fn job_create(&self, json_of: impl FnOnce(u64) -> String, forget: &[u64]) -> Result<u64> {
        let db = self.db()?;
        let tx = db.begin_write().map_err(se)?;
        let id = {
            let mut meta = tx.open_table(META).map_err(se)?;
            let id = meta_get(&meta, "job_seq")? + 1;
            meta.insert("job_seq", id).map_err(se)?;
            let mut jobs = tx.open_table(JOBS).map_err(se)?;
            jobs.insert(id as u64, json_of(id as u64).as_str())
                .map_err(se)?;
            for &f in forget {
                jobs.remove(f).map_err(se)?;
            }
            id as u64
        };
        tx.commit().map_err(se)?;
        Ok(id)
    }

    /// Up to `max` changed rows not yet written to `sink`, in key order, as
    /// they stand now, with whether their minute is reconciled.
    pub fn export_pending(&self, sink: Sink, max: usize) -> Result<Vec<ExportRow>> {
        let db = self.db()?;
        let tx = db.begin_read().map_err(se)?;
        let export = tx.open_table(sink.rows()).map_err(se)?;
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
                reconciled: false,
            });
        }
        let (lo, hi) = out.iter().fold((u32::MAX, 0), |(lo, hi), r| {
            (lo.min(r.key.minute), hi.max(r.key.minute))
        });
        if !out.is_empty() {
            let states = MinuteStates::read(&tx, lo, hi + 1)?;
            for r in &mut out {
                r.reconciled = states.reconciled(r.key.minute, r.key.minute);
            }
        }
        Ok(out)
    }

    /// Forgets exported changes, unless the row changed again since (its
    /// revision moved): that change is exported next time.
    pub fn export_done(&self, sink: Sink, done: &[(Vec<u8>, u64)]) -> Result<()> {
        let db = self.db()?;
        let tx = db.begin_write().map_err(se)?;
        {
            let mut export = tx.open_table(sink.rows()).map_err(se)?;
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

    /// Changed rows waiting for `sink`.
    pub fn export_backlog(&self, sink: Sink) -> Result<u64> {
        let db = self.db()?;
        let tx = db.begin_read().map_err(se)?;
        let export = tx.open_table(sink.rows()).map_err(se)?;
        export.len().map_err(se)
    }

    /// Visits the raw events of up to `max` audit entries not yet produced
    /// to Kafka, oldest minute first, with the entry's index in the answer,
    /// gateway, shard and seq; answers the entries visited, for
    /// [`Store::kafka_events_done`].
    pub fn kafka_events_pending(
        &self,
        max: usize,
        mut f: impl FnMut(usize, &str, u16, u64, &EventRef<'_>),
    ) -> std::result::Result<Vec<AuditKey>, ReadError> {
        let db = self.db()?;
        let tx = db.begin_read().map_err(se)?;
        let marks = tx.open_table(EXPORT_KAFKA_EVENTS).map_err(se)?;
        let audit = tx.open_table(AUDIT).map_err(se)?;
        let mut out = Vec::new();
        for r in marks.iter().map_err(se)?.take(max) {
            let (k, _) = r.map_err(se)?;
            let (m, gw, shard, after) = k.value();
            // An entry gone from the hot store (it cannot be: retention
            // waits for marked entries) is forgotten with the mark.
            let i = out.len();
            visit_audit(
                &audit,
                (m, gw, shard, after),
                (m, gw, shard, after.saturating_add(1)),
                &mut |g: &str, s, q, e: &EventRef<'_>| f(i, g, s, q, e),
            )?;
            out.push((m, gw.to_owned(), shard, after));
        }
        Ok(out)
    }

    /// Forgets audit entries Kafka acknowledged.
    pub fn kafka_events_done(&self, done: &[AuditKey]) -> Result<()> {
        let db = self.db()?;
        let tx = db.begin_write().map_err(se)?;
        {
            let mut marks = tx.open_table(EXPORT_KAFKA_EVENTS).map_err(se)?;
            for (m, gw, shard, after) in done {
                marks
                    .remove((*m, gw.as_str(), *shard, *after))
                    .map_err(se)?;
            }
        }
        tx.commit().map_err(se)
    }

    /// Audit entries (batches of raw events) waiting for Kafka, and the
    /// earliest minute passed over while the backlog was full (0: none).
    pub fn kafka_events_backlog(&self) -> Result<(u64, u32)> {
        let db = self.db()?;
        let tx = db.begin_read().map_err(se)?;
        let marks = tx.open_table(EXPORT_KAFKA_EVENTS).map_err(se)?;
        let meta = tx.open_table(META).map_err(se)?;
        Ok((
            marks.len().map_err(se)?,
            meta_get(&meta, KAFKA_REMARK_FROM)? as u32,
        ))
    }

    /// After the backlog was full: marks the hot entries of whole minutes
    /// from the earliest one passed over, until about `max` are marked, and
    /// moves that minute on (clearing it past the last entry). Entries the
    /// sink already produced go again under the same keys: consumers that
    /// dedup by event drop them. Answers how many were marked.
    pub fn kafka_events_remark(&self, max: u64) -> Result<u64> {
        let db = self.db()?;
        let tx = db.begin_write().map_err(se)?;
        let mut n = 0u64;
        {
            let mut meta = tx.open_table(META).map_err(se)?;
            let from = meta_get(&meta, KAFKA_REMARK_FROM)? as u32;
            if from == 0 {
                return Ok(0);
            }
            let audit = tx.open_table(AUDIT).map_err(se)?;
            let mut marks = tx.open_table(EXPORT_KAFKA_EVENTS).map_err(se)?;
            let mut last = None;
            let mut stop_at = None;
            for r in audit.range((from, "", 0u16, 0u64)..).map_err(se)? {
                let (k, _) = r.map_err(se)?;
                let key = k.value();
                if n >= max && last != Some(key.0) {
                    stop_at = Some(key.0);
                    break;
                }
                marks.insert(key, ()).map_err(se)?;
                n += 1;
                last = Some(key.0);
            }
            meta.insert(KAFKA_REMARK_FROM, stop_at.map_or(0, i64::from))
                .map_err(se)?;
        }
        tx.commit().map_err(se)?;
        Ok(n)
    }
}

/// An audit entry's key: (event minute, gateway id, shard, after seq).
pub type AuditKey = (u32, String, u16, u64);

fn meta_get(t: &impl ReadableTable<&'static str, i64>, name: &str) -> Result<i64> {
    Ok(t.get(name).map_err(se)?.map_or(0, |v| v.value()))
}

fn read_sources(tx: &redb::ReadTransaction) -> Result<Vec<SourceInfo>> {
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

/// Visits the audited events of minutes `[m0, m1)`; returns how many audit
/// entries it read. A corrupt entry is named in the error.
/// Adds users to the sketch under `k`.
fn add_users(t: &mut redb::Table<&[u8], &[u8]>, k: &[u8], hashes: &[u64]) -> Result<()> {
    let mut s = t
        .get(k)
        .map_err(se)?
        .and_then(|v| Sketch::decode(v.value()))
        .unwrap_or_default();
    for &h in hashes {
        s.insert_hash(h);
    }
    t.insert(k, s.encode().as_slice()).map_err(se)?;
    Ok(())
}

/// The hour sketch's key of a minute sketch's key.
fn hour_key(k: &[u8]) -> Vec<u8> {
    let m = u32::from_be_bytes(k[..4].try_into().expect("a sketch key"));
    let mut h = k.to_vec();
    h[..4].copy_from_slice(&(m - m % 60).to_be_bytes());
    h
}

/// Replaces minute `m`'s sketches with `users`, then merges the hour's
/// sketch of every (advertiser, campaign, ad) involved again from its
/// minutes (a sketch cannot forget a user; the hour is rebuilt instead).
fn rebuild_users(
    tx: &redb::WriteTransaction,
    m: u32,
    users: &BTreeMap<Vec<u8>, Vec<u64>>,
) -> Result<()> {
    let mut min_t = tx.open_table(UNIQ_MIN).map_err(se)?;
    let mut hour_t = tx.open_table(UNIQ_HOUR).map_err(se)?;
    let lo = m.to_be_bytes();
    let hi = (m + 1).to_be_bytes();
    let old: Vec<Vec<u8>> = min_t
        .range(lo.as_slice()..hi.as_slice())
        .map_err(se)?
        .map(|r| r.map(|(k, _)| k.value().to_vec()))
        .collect::<std::result::Result<_, _>>()
        .map_err(se)?;
    for k in &old {
        min_t.remove(k.as_slice()).map_err(se)?;
    }
    for (k, hashes) in users {
        let mut s = Sketch::default();
        for &h in hashes {
            s.insert_hash(h);
        }
        min_t
            .insert(k.as_slice(), s.encode().as_slice())
            .map_err(se)?;
    }
    let h0 = m - m % 60;
    if tx
        .open_table(ROLLED)
        .map_err(se)?
        .get(m / 60)
        .map_err(se)?
        .is_none()
    {
        return Ok(());
    }
    let involved: BTreeSet<Vec<u8>> = old
        .iter()
        .chain(users.keys())
        .map(|k| hour_key(k))
        .collect();
    for hk in involved {
        let mut hour = Sketch::default();
        let mut any = false;
        for mm in h0..h0 + 60 {
            let mut k = hk.clone();
            k[..4].copy_from_slice(&mm.to_be_bytes());
            if let Some(s) = min_t
                .get(k.as_slice())
                .map_err(se)?
                .and_then(|v| Sketch::decode(v.value()))
            {
                hour.merge(&s);
                any = true;
            }
        }
        if any {
            hour_t
                .insert(hk.as_slice(), hour.encode().as_slice())
                .map_err(se)?;
        } else {
            hour_t.remove(hk.as_slice()).map_err(se)?;
        }
    }
    Ok(())
}

/// Keeps a merged hour's row equal to the sum of its minute rows when the
/// minute row of `k` changes from `old` to `new`.
fn hour_row_change(
    tx: &redb::WriteTransaction,
    k: &RowKey,
    old: Option<Row>,
    new: Row,
) -> Result<()> {
    let h = k.minute / 60;
    let mut hk = k.clone();
    hk.minute = h * 60;
    let kb = encode_key(&hk);
    let mut t = tx.open_table(ROWS_HOUR).map_err(se)?;
    let mut row = t
        .get(kb.as_slice())
        .map_err(se)?
        .map(|v| Row::decode(v.value()))
        .unwrap_or_default();
    let old = old.unwrap_or_default().counts;
    let (c, n) = (&mut row.counts, &new.counts);
    // The hour holds the old minute row, so no field goes below zero.
    c.clicks = c.clicks - old.clicks + n.clicks;
    c.impressions = c.impressions - old.impressions + n.impressions;
    c.spend_micros = c.spend_micros - old.spend_micros + n.spend_micros;
    c.duplicates = c.duplicates - old.duplicates + n.duplicates;
    c.invalid = c.invalid - old.invalid + n.invalid;
    row.version = row.version.max(new.version);
    t.insert(kb.as_slice(), row.encode().as_slice())
        .map_err(se)?;
    tx.open_table(HOUR_ROWS)
        .map_err(se)?
        .insert((h, kb.as_slice()), ())
        .map_err(se)?;
    Ok(())
}

/// Merges hour `h`'s minute sketches into its hour sketches and marks it
/// merged: from then on a query takes the hour whole.
fn roll_up_hour(tx: &redb::WriteTransaction, h: u32) -> Result<()> {
    let min_t = tx.open_table(UNIQ_MIN).map_err(se)?;
    let mut hour_t = tx.open_table(UNIQ_HOUR).map_err(se)?;
    let lo = (h * 60).to_be_bytes();
    let hi = (h * 60 + 60).to_be_bytes();
    let mut acc: BTreeMap<Vec<u8>, Sketch> = BTreeMap::new();
    for r in min_t.range(lo.as_slice()..hi.as_slice()).map_err(se)? {
        let (k, v) = r.map_err(se)?;
        if let Some(s) = Sketch::decode(v.value()) {
            match acc.entry(hour_key(k.value())) {
                std::collections::btree_map::Entry::Vacant(e) => {
                    e.insert(s);
                }
                std::collections::btree_map::Entry::Occupied(mut e) => e.get_mut().merge(&s),
            }
        }
    }
    for (k, s) in acc {
        hour_t
            .insert(k.as_slice(), s.encode().as_slice())
            .map_err(se)?;
    }
    // The hour rows: each dimension tuple's minute rows summed.
    let idx = tx.open_table(MINUTE_ROWS).map_err(se)?;
    let rows = tx.open_table(ROWS).map_err(se)?;
    let mut sums: BTreeMap<Vec<u8>, Row> = BTreeMap::new();
    let empty: &[u8] = &[];
    for r in idx
        .range((h * 60, empty)..(h * 60 + 60, empty))
        .map_err(se)?
    {
        let (k, _) = r.map_err(se)?;
        let kb = k.value().1;
        let (Some(mut key), Some(v)) = (decode_key(kb), rows.get(kb).map_err(se)?) else {
            continue;
        };
        let row = Row::decode(v.value());
        key.minute = h * 60;
        let e = sums.entry(encode_key(&key)).or_default();
        e.counts.merge(&row.counts);
        e.version = e.version.max(row.version);
    }
    let mut hour_rows = tx.open_table(ROWS_HOUR).map_err(se)?;
    let mut hour_idx = tx.open_table(HOUR_ROWS).map_err(se)?;
    for (kb, row) in sums {
        hour_rows
            .insert(kb.as_slice(), row.encode().as_slice())
            .map_err(se)?;
        hour_idx.insert((h, kb.as_slice()), ()).map_err(se)?;
    }
    tx.open_table(ROLLED)
        .map_err(se)?
        .insert(h, ())
        .map_err(se)?;
    Ok(())
}

/// Removes up to `max` sketches of minutes below `below`.
fn drop_sketches_below(
    tx: &redb::WriteTransaction,
    def: TableDefinition<&[u8], &[u8]>,
    below: u32,
    max: usize,
) -> Result<u64> {
    let mut t = tx.open_table(def).map_err(se)?;
    let hi = below.to_be_bytes();
    let doomed: Vec<Vec<u8>> = t
        .range(..hi.as_slice())
        .map_err(se)?
        .take(max)
        .map(|r| r.map(|(k, _)| k.value().to_vec()))
        .collect::<std::result::Result<_, _>>()
        .map_err(se)?;
    for k in &doomed {
        t.remove(k.as_slice()).map_err(se)?;
    }
    Ok(doomed.len() as u64)
}

/// Removes up to `max` entries of a minute-keyed table below `below`.
fn drop_minutes_below<V: redb::Value + 'static>(
    tx: &redb::WriteTransaction,
    def: TableDefinition<u32, V>,
    below: u32,
    max: usize,
) -> Result<u64> {
    let mut t = tx.open_table(def).map_err(se)?;
    let doomed: Vec<u32> = t
        .range(0..below)
        .map_err(se)?
        .take(max)
        .map(|r| r.map(|(k, _)| k.value()))
        .collect::<std::result::Result<_, _>>()
        .map_err(se)?;
    for m in &doomed {
        t.remove(*m).map_err(se)?;
    }
    Ok(doomed.len() as u64)
}

/// The sealed parts holding raw events of `[m0, m1)` that are no longer hot
/// (one pass over the parts of the range's hours, however wide the range).
fn cold_parts(tx: &redb::ReadTransaction, m0: u32, m1: u32) -> Result<Vec<ColdPart>> {
    let t = tx.open_table(AUDIT_PARTS).map_err(se)?;
    let mut out = Vec::new();
    if m1 <= m0 {
        return Ok(out);
    }
    let (h0, h1) = (m0 / 60, (m1 - 1) / 60);
    for r in t.range((h0, "", 0u32)..).map_err(se)? {
        let (k, v) = r.map_err(se)?;
        let (h, gw, _) = k.value();
        if h > h1 {
            break;
        }
        let Ok(p) = serde_json::from_str::<SealedPart>(v.value()) else {
            continue;
        };
        let lo = m0.max(h * 60);
        let hi = m1.min(h * 60 + p.cold_below as u32);
        if lo < hi {
            out.push(ColdPart {
                gateway: gw.to_owned(),
                object: p.object,
                bytes: p.bytes,
                m0: lo,
                m1: hi,
            });
        }
    }
    Ok(out)
}

/// Visits the events of the audit entries with keys in `[from, to)`.
fn visit_audit<'k>(
    t: &impl ReadableTable<(u32, &'static str, u16, u64), &'static [u8]>,
    from: (u32, &'k str, u16, u64),
    to: (u32, &'k str, u16, u64),
    f: &mut impl FnMut(&str, u16, u64, &EventRef<'_>),
) -> std::result::Result<u64, ReadError> {
    let mut n = 0;
    for r in t.range(from..to).map_err(se)? {
        let (k, v) = r.map_err(se)?;
        let (minute, gw, shard, after_seq) = k.value();
        let corrupt = |why: String| ReadError::Corrupt {
            minute,
            gateway: gw.to_owned(),
            shard,
            after_seq,
            why,
        };
        let b = Batch::decode(v.value(), usize::MAX).map_err(|e| corrupt(e.to_string()))?;
        let raw = b.decompress().map_err(|e| corrupt(e.to_string()))?;
        let its =
            items(&raw, b.count, b.after_seq, b.last_seq).map_err(|e| corrupt(e.to_string()))?;
        for it in its {
            let e = EventRef::decode(it.bytes)
                .map_err(|e| corrupt(format!("event {}: {e}", it.seq)))?;
            f(gw, shard, it.seq, &e);
        }
        n += 1;
    }
    Ok(n)
}

/// Which minutes of a query's range are reconciled.
struct MinuteStates {
    frontier: u32,
    /// Dirty or failed minutes in the range.
    not_reconciled: BTreeSet<u32>,
}

impl MinuteStates {
    fn read(tx: &redb::ReadTransaction, m0: u32, m1: u32) -> Result<MinuteStates> {
        let meta = tx.open_table(META).map_err(se)?;
        let mut not_reconciled = BTreeSet::new();
        for r in tx
            .open_table(DIRTY)
            .map_err(se)?
            .range(m0..m1)
            .map_err(se)?
        {
            not_reconciled.insert(r.map_err(se)?.0.value());
        }
        for r in tx
            .open_table(RECON_FAILED)
            .map_err(se)?
            .range(m0..m1)
            .map_err(se)?
        {
            not_reconciled.insert(r.map_err(se)?.0.value());
        }
        Ok(MinuteStates {
            frontier: meta_get(&meta, "reconciled_through")? as u32,
            not_reconciled,
        })
    }

    /// Every minute of `[first, last]` is reconciled.
    fn reconciled(&self, first: u32, last: u32) -> bool {
        last < self.frontier && self.not_reconciled.range(first..=last).next().is_none()
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
    /// Its minute is reconciled across PoPs (as of the read).
    pub reconciled: bool,
}

impl ExportRow {
    /// What `Store::export_done` takes back once the row is written.
    pub fn done(rows: &[ExportRow]) -> Vec<(Vec<u8>, u64)> {
        rows.iter()
            .map(|r| (r.key_bytes.clone(), r.revision))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testkit::{clicks, partials};
    use wire::batch::{push_item, BatchKind};
    use wire::record::{Device, EventKind, Source, Verdict};
    use wire::segment::RecordType;

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

    fn settings() -> Settings {
        Settings {
            rules: Rules {
                lateness_ms: 120_000,
                horizon_ms: 3_600_000,
                source_timeout_ms: 60_000,
                raw_max: 1 << 20,
                cluster: None,
            },
            export: true,
            ..Default::default()
        }
    }

    fn store() -> (tempfile::TempDir, Store) {
        let d = tempfile::tempdir().unwrap();
        let s = Store::open(&d.path().join("s.redb"), settings()).unwrap();
        (d, s)
    }

    fn apply(s: &Store, frame: &[u8], now: i64) -> Ack {
        let gws = vec!["gw".to_string(), "gw2".to_string()];
        s.apply_many(&[(frame, &gws)], now).remove(0).0
    }

    #[test]
    fn unrecorded_counts_are_kept_once_per_partial_whatever_is_resent() {
        let (_d, s) = store();
        let m0 = (T0 / 60_000) as u32;
        let frame = |seq: u64, from: u64, unrecorded: Vec<(u32, u64)>| {
            let mut b = Vec::new();
            wire::record::PartialRecord {
                from_seq: from,
                to_seq: seq - 1,
                watermark_ms: T0,
                rows: vec![(key("a", "ad", m0), clicks(2))],
                unrecorded,
            }
            .encode(&mut b);
            let mut raw = Vec::new();
            wire::batch::push_item(&mut raw, seq, RecordType::Partial as u8, &b);
            Batch::seal(BatchKind::Partials, "gw", 3, from, seq, 1, &raw, 1)
                .unwrap()
                .encode()
        };
        let first = frame(5, 0, vec![(m0, 7), (m0 + 1, 1)]);
        assert_eq!(apply(&s, &first, T0).status, Status::Applied);
        // The same batch again (a lost answer): a duplicate, nothing added.
        assert_eq!(apply(&s, &first, T0).status, Status::Duplicate);
        assert_eq!(
            apply(&s, &frame(9, 5, vec![(m0 + 1, 2)]), T0).status,
            Status::Applied
        );
        let got = s.unrecorded(m0, m0 + 2).unwrap();
        assert_eq!(
            got,
            vec![
                (m0, "gw".to_string(), 3, 7),
                (m0 + 1, "gw".to_string(), 3, 3)
            ]
        );
        // Billed are only the rows: unrecorded events have no record.
        assert_eq!(total(&s, "a").clicks, 4);
        assert!(s.unrecorded(m0 + 2, m0 + 10).unwrap().is_empty());
        // Retention takes them with the rows of their minute.
        s.export_done(
            Sink::ClickHouse,
            &ExportRow::done(&s.export_pending(Sink::ClickHouse, 100).unwrap()),
        )
        .unwrap();
        for _ in 0..100 {
            let d = s.drop_rows_step(m0 + 1, 1).unwrap();
            if d.rows + d.marks == 0 {
                break;
            }
        }
        assert_eq!(
            s.unrecorded(0, u32::MAX).unwrap(),
            vec![(m0 + 1, "gw".to_string(), 3, 3)]
        );
    }

    #[test]
    fn rows_past_retention_go_in_bounded_steps_and_unexported_ones_wait() {
        let (_d, s) = store();
        let m0 = (T0 / 60_000) as u32;
        let rows: Vec<(RowKey, Counts)> = (0..10)
            .map(|i| (key("a", "ad", m0 + i), clicks(1)))
            .collect();
        let ack = apply(&s, &partials("gw", 0, &[(1, 0, T0 + 600_000, rows)]), T0);
        assert_eq!(ack.status, Status::Applied);
        // ClickHouse has taken every row but the one of minute 2.
        let pending = s.export_pending(Sink::ClickHouse, 100).unwrap();
        let taken: Vec<ExportRow> = pending
            .into_iter()
            .filter(|r| r.key.minute != m0 + 2)
            .collect();
        s.export_done(Sink::ClickHouse, &ExportRow::done(&taken))
            .unwrap();
        assert_eq!(s.rows_kept_from().unwrap(), 0);
        // Below minute 5, two rows per step.
        let mut steps = 0;
        let mut gone = 0;
        loop {
            let d = s.drop_rows_step(m0 + 5, 2).unwrap();
            assert!(d.rows <= 2);
            if d.rows + d.marks == 0 {
                break;
            }
            gone += d.rows;
            steps += 1;
        }
        assert_eq!(gone, 4);
        assert!(steps >= 2);
        assert_eq!(s.rows_kept_from().unwrap(), m0 + 5);
        let left: Vec<u32> = s
            .rows_in(0, u32::MAX)
            .unwrap()
            .keys()
            .map(|k| k.minute)
            .collect();
        assert_eq!(left, vec![m0 + 2, m0 + 5, m0 + 6, m0 + 7, m0 + 8, m0 + 9]);
        // Once exported, it goes too.
        let pending = s.export_pending(Sink::ClickHouse, 100).unwrap();
        s.export_done(Sink::ClickHouse, &ExportRow::done(&pending))
            .unwrap();
        s.drop_rows_step(m0 + 5, 2).unwrap();
        assert_eq!(s.rows_in(0, m0 + 5).unwrap().len(), 0);
        assert_eq!(total(&s, "a").clicks, 5);
    }

    #[test]
    fn late_rows_past_retention_go_in_bounded_steps() {
        let (_d, s) = store();
        let m0 = (T0 / 60_000) as u32;
        // The watermark first, then rows one to four hours behind it: past
        // the one-hour horizon, into the late table (the last one is not).
        let wm = T0 + 600_000;
        let ack = apply(&s, &partials("gw", 0, &[(1, 0, wm, vec![])]), T0);
        assert_eq!(ack.status, Status::Applied);
        let rows: Vec<(RowKey, Counts)> = (0..5)
            .map(|i| (key("a", "ad", m0 - 240 + i * 60), clicks(1)))
            .collect();
        let ack = apply(&s, &partials("gw", 0, &[(2, 1, wm, rows)]), T0);
        assert_eq!(ack.status, Status::Applied);
        assert_eq!(s.late_rows().unwrap().len(), 4);
        // Below m0 - 90: the rows of m0 - 240, - 180 and - 120, two a step.
        assert_eq!(s.drop_late_step(m0 - 90, 2).unwrap(), 2);
        assert_eq!(s.drop_late_step(m0 - 90, 2).unwrap(), 1);
        assert_eq!(s.drop_late_step(m0 - 90, 2).unwrap(), 0);
        let left: Vec<u32> = s
            .late_rows()
            .unwrap()
            .iter()
            .map(|(k, _)| k.minute)
            .collect();
        assert_eq!(left, vec![m0 - 60]);
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
        let first = s.export_pending(Sink::ClickHouse, 10).unwrap();
        assert_eq!(first.len(), 2);
        assert_eq!(
            s.export_pending(Sink::ClickHouse, 1).unwrap().len(),
            1,
            "bounded"
        );
        // x changes again before the first export is acknowledged.
        let b2 = partials("gw", 0, &[(5, 2, T0, vec![(key("a", "x", m), clicks(2))])]);
        assert_eq!(apply(&s, &b2, T0).status, Status::Applied);
        s.export_done(Sink::ClickHouse, &ExportRow::done(&first))
            .unwrap();
        let left = s.export_pending(Sink::ClickHouse, 10).unwrap();
        assert_eq!(left.len(), 1, "x's newer change is still to export");
        assert_eq!(
            (left[0].key.ad_id.as_str(), left[0].row.counts.clicks),
            ("x", 3)
        );
        assert!(left[0].revision > first[0].revision);
        // A duplicate batch changes nothing, so exports nothing new.
        assert_eq!(apply(&s, &b2, T0).status, Status::Duplicate);
        assert_eq!(s.export_pending(Sink::ClickHouse, 10).unwrap(), left);
        s.export_done(Sink::ClickHouse, &ExportRow::done(&left))
            .unwrap();
        assert_eq!(s.export_backlog(Sink::ClickHouse).unwrap(), 0);
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
            assert_eq!(
                s.export_backlog(Sink::ClickHouse).unwrap(),
                0,
                "not tracked while off"
            );
        }
        let s = Store::open(&path, settings(true)).unwrap();
        let pending = s.export_pending(Sink::ClickHouse, 10).unwrap();
        assert_eq!(pending.len(), 1);
        assert_eq!(pending[0].row.counts.clicks, 1);
        s.export_done(Sink::ClickHouse, &ExportRow::done(&pending))
            .unwrap();
        drop(s);
        // Reopened with the sink still on: nothing to backfill.
        let s = Store::open(&path, settings(true)).unwrap();
        assert_eq!(s.export_backlog(Sink::ClickHouse).unwrap(), 0);
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
    fn a_store_of_the_old_layout_is_refused_by_name() {
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("old.redb");
        {
            let db = Database::create(&path).unwrap();
            let tx = db.begin_write().unwrap();
            let old: TableDefinition<(u32, &str, u16, u64), &[u8]> = TableDefinition::new("audit");
            tx.open_table(old).unwrap();
            tx.commit().unwrap();
        }
        let e = Store::open(&path, Settings::default()).err().unwrap();
        assert!(e.to_string().contains("store layout 1"), "{e}");
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
        assert_eq!(at(fin), (clicks(3), PointState::Final, 1));
        assert_eq!(at(open), (clicks(1), PointState::Provisional, 0));
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

    pub(crate) fn event_frame(gw: &str, after: u64, evs: &[(u64, &str, i64)]) -> Vec<u8> {
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

    fn kafka_store(cap: u64) -> (tempfile::TempDir, Store) {
        let d = tempfile::tempdir().unwrap();
        let settings = Settings {
            kafka: true,
            kafka_backlog_entries_max: cap,
            ..settings()
        };
        let s = Store::open(&d.path().join("s.redb"), settings).unwrap();
        (d, s)
    }

    fn kafka_ids(s: &Store, max: usize) -> (Vec<String>, Vec<AuditKey>) {
        let mut ids = Vec::new();
        let keys = s
            .kafka_events_pending(max, |_, _, _, _, e| ids.push(e.click_id.to_owned()))
            .unwrap();
        (ids, keys)
    }

    #[test]
    fn kafka_marks_rows_and_raw_events_apart_from_clickhouse_and_forgets_only_what_was_acknowledged(
    ) {
        let (_d, s) = kafka_store(0);
        let m = (T0 / 60_000) as u32;
        apply(
            &s,
            &partials("gw", 0, &[(2, 0, T0, vec![(key("a", "x", m), clicks(2))])]),
            T0,
        );
        apply(
            &s,
            &event_frame("gw", 0, &[(1, "c1", T0), (2, "c2", T0 + 1000)]),
            T0,
        );
        let a3 = apply(&s, &event_frame("gw", 3, &[(4, "c3", T0 - 60_000)]), T0);
        assert_eq!(a3.status, Status::Applied, "{a3:?}");
        // Each sink has its own marks: ClickHouse acknowledging leaves Kafka's.
        let ch = s.export_pending(Sink::ClickHouse, 10).unwrap();
        s.export_done(Sink::ClickHouse, &ExportRow::done(&ch))
            .unwrap();
        let rows = s.export_pending(Sink::Kafka, 10).unwrap();
        assert_eq!(rows.len(), 1);
        assert!(!rows[0].reconciled);
        // Oldest minute first; an entry's events together, with its index.
        let (ids, keys) = kafka_ids(&s, 10);
        assert_eq!(ids, ["c3", "c1", "c2"]);
        assert_eq!(keys.len(), 2);
        // Not acknowledged: the same again.
        assert_eq!(kafka_ids(&s, 10).0, ids);
        s.kafka_events_done(&keys[..1]).unwrap();
        assert_eq!(kafka_ids(&s, 10).0, ["c1", "c2"]);
        assert_eq!(s.kafka_events_backlog().unwrap(), (1, 0));
        s.kafka_events_done(&keys[1..]).unwrap();
        assert_eq!(s.kafka_events_backlog().unwrap(), (0, 0));
        s.export_done(Sink::Kafka, &ExportRow::done(&rows)).unwrap();
        assert_eq!(s.export_backlog(Sink::Kafka).unwrap(), 0);
    }

    #[test]
    fn kafka_sends_a_row_again_when_its_minute_becomes_reconciled() {
        let (_d, s) = kafka_store(0);
        let m = (T0 / 60_000) as u32 - 10;
        apply(
            &s,
            &partials("gw", 0, &[(2, 0, T0, vec![(key("a", "x", m), clicks(2))])]),
            T0,
        );
        let first = s.export_pending(Sink::Kafka, 10).unwrap();
        s.export_done(Sink::Kafka, &ExportRow::done(&first))
            .unwrap();
        let read = s.read_minute(m, |_, _, _, _| {}).unwrap();
        let commit = ReconCommit {
            minute: Some(m),
            rev: Some(read.rev),
            mark: Some(ReconMark {
                rev: read.rev,
                at_ms: T0,
                events: 0,
                rows_corrected: 0,
                skipped_sources: 0,
                digest: IdDigest::default(),
            }),
            frontier_to: Some(m + 1),
            ..ReconCommit::default()
        };
        assert!(s.commit_reconcile(&commit).unwrap().is_some());
        let again = s.export_pending(Sink::Kafka, 10).unwrap();
        assert_eq!(again.len(), 1, "no count changed, the state did");
        assert!(again[0].reconciled);
        assert!(again[0].revision > first[0].revision);
        assert_eq!(again[0].row, first[0].row);
        // ClickHouse carries no state: nothing new for it.
        let ch = s.export_pending(Sink::ClickHouse, 10).unwrap();
        assert_eq!(ch.len(), 1, "only the first change");
    }

    #[test]
    fn rows_past_retention_wait_for_kafka_too() {
        let (_d, s) = kafka_store(0);
        let m0 = (T0 / 60_000) as u32;
        let rows = vec![(key("a", "ad", m0), clicks(1))];
        apply(&s, &partials("gw", 0, &[(1, 0, T0 + 600_000, rows)]), T0);
        let ch = s.export_pending(Sink::ClickHouse, 10).unwrap();
        s.export_done(Sink::ClickHouse, &ExportRow::done(&ch))
            .unwrap();
        s.drop_rows_step(m0 + 5, 10).unwrap();
        assert_eq!(
            s.rows_in(0, m0 + 5).unwrap().len(),
            1,
            "Kafka has not taken it"
        );
        let k = s.export_pending(Sink::Kafka, 10).unwrap();
        s.export_done(Sink::Kafka, &ExportRow::done(&k)).unwrap();
        s.drop_rows_step(m0 + 5, 10).unwrap();
        assert_eq!(s.rows_in(0, m0 + 5).unwrap().len(), 0);
    }

    #[test]
    fn a_full_kafka_backlog_passes_entries_over_and_marks_them_again_once_caught_up() {
        let (_d, s) = kafka_store(2);
        let m = (T0 / 60_000) as u32;
        apply(&s, &event_frame("gw", 0, &[(1, "a", T0)]), T0);
        apply(&s, &event_frame("gw", 2, &[(3, "b", T0)]), T0);
        // Full: these two are passed over, the earliest minute remembered.
        apply(&s, &event_frame("gw", 4, &[(5, "c", T0 + 60_000)]), T0);
        let a = apply(&s, &event_frame("gw", 6, &[(7, "d", T0 - 120_000)]), T0);
        assert_eq!(a.status, Status::Applied, "{a:?}");
        assert_eq!(s.kafka_events_backlog().unwrap(), (2, m - 2));
        let (ids, keys) = kafka_ids(&s, 10);
        assert_eq!(ids, ["a", "b"]);
        s.kafka_events_done(&keys).unwrap();
        // Marked again, whole minutes, from the earliest passed over: the
        // first step stops after a minute once past `max`.
        assert_eq!(s.kafka_events_remark(1).unwrap(), 1);
        assert_eq!(s.kafka_events_backlog().unwrap(), (1, m));
        assert_eq!(s.kafka_events_remark(1).unwrap(), 2, "minute m whole");
        assert_eq!(s.kafka_events_remark(1).unwrap(), 1);
        assert_eq!(s.kafka_events_backlog().unwrap(), (4, 0));
        let (ids, _) = kafka_ids(&s, 10);
        assert_eq!(
            ids,
            ["d", "a", "b", "c"],
            "every event, those sent twice too"
        );
        assert_eq!(s.kafka_events_remark(1).unwrap(), 0, "nothing passed over");
    }

    #[test]
    fn turning_kafka_on_marks_every_row_and_hot_event_and_off_drops_the_marks() {
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("s.redb");
        let m = (T0 / 60_000) as u32;
        let with = |kafka| Settings {
            kafka,
            ..settings()
        };
        {
            let s = Store::open(&path, with(false)).unwrap();
            apply(
                &s,
                &partials("gw", 0, &[(2, 0, T0, vec![(key("a", "x", m), clicks(2))])]),
                T0,
            );
            apply(&s, &event_frame("gw", 0, &[(1, "c1", T0)]), T0);
            assert_eq!(s.kafka_events_backlog().unwrap(), (0, 0));
        }
        {
            let s = Store::open(&path, with(true)).unwrap();
            assert_eq!(s.export_backlog(Sink::Kafka).unwrap(), 1);
            assert_eq!(kafka_ids(&s, 10).0, ["c1"]);
        }
        let s = Store::open(&path, with(false)).unwrap();
        assert_eq!(s.export_backlog(Sink::Kafka).unwrap(), 0);
        assert_eq!(s.kafka_events_backlog().unwrap(), (0, 0));
    }

    #[test]
    fn raw_events_are_kept_once_by_minute_and_stamp_their_minute() {
        let (_d, s) = store();
        let m = (T0 / 60_000) as u32;
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
        let mut seen = Vec::new();
        s.audit_events(m, m + 1, |gw, _, seq, e| {
            seen.push((gw.to_owned(), seq, e.click_id.to_owned()))
        })
        .unwrap();
        seen.sort();
        assert_eq!(seen.len(), 3);
        // The event an hour earlier was filed under its own minute.
        let mut n = 0;
        s.audit_events(m - 60, m - 59, |_, _, _, _| n += 1).unwrap();
        assert_eq!(n, 1);
        assert_eq!(s.next_data_minute(0).unwrap(), Some(m - 60));
        assert_eq!(s.next_data_minute(m - 59).unwrap(), Some(m));
        assert_eq!(s.next_data_minute(m + 1).unwrap(), None);
        // Each event transaction stamped the minutes it touched.
        let read = s.read_minute(m, |_, _, _, _| {}).unwrap();
        assert_eq!(read.audit_entries, 2);
        assert_eq!(read.rev, s.reconcile_view(T0).unwrap().txn_seq);
    }

    #[test]
    fn a_reconcile_commit_is_refused_when_the_minute_moved_and_changes_dirty_it() {
        let (_d, s) = store();
        let m = (T0 / 60_000) as u32 - 10;
        let p1 = partials("gw", 0, &[(2, 0, T0, vec![(key("a", "x", m), clicks(2))])]);
        apply(&s, &p1, T0);
        let read = s.read_minute(m, |_, _, _, _| {}).unwrap();
        assert_eq!(read.rows.len(), 1);
        // A change lands between the read and the commit: refused.
        let p2 = partials("gw", 0, &[(4, 2, T0, vec![(key("a", "x", m), clicks(1))])]);
        apply(&s, &p2, T0);
        let mark = ReconMark {
            rev: read.rev,
            at_ms: T0,
            events: 0,
            rows_corrected: 1,
            skipped_sources: 0,
            digest: IdDigest::default(),
        };
        let fixes = [(key("a", "x", m), clicks(1))];
        let commit = |rev| ReconCommit {
            minute: Some(m),
            rev: Some(rev),
            fixes: &fixes,
            mark: Some(ReconMark { rev, ..mark }),
            frontier_to: Some(m + 1),
            ..ReconCommit::default()
        };
        assert!(s.commit_reconcile(&commit(read.rev)).unwrap().is_none());
        assert_eq!(total(&s, "a").clicks, 3, "nothing written");
        let read = s.read_minute(m, |_, _, _, _| {}).unwrap();
        assert!(s.commit_reconcile(&commit(read.rev)).unwrap().is_some());
        assert_eq!(total(&s, "a").clicks, 1);
        assert_eq!(s.rows_in(m, m + 1).unwrap()[&key("a", "x", m)].version, 2);
        let q = Query {
            advertiser_id: "a".into(),
            start_s: m as i64 * 60,
            end_s: (m as i64 + 1) * 60,
            bucket_s: 60,
            campaign_id: None,
            ad_id: None,
        };
        assert_eq!(
            s.query(&q, T0).unwrap().values().next().unwrap().1,
            PointState::Reconciled
        );
        // A later partial for the reconciled minute dirties it: final again.
        let p3 = partials("gw", 0, &[(6, 4, T0, vec![(key("a", "x", m), clicks(1))])]);
        apply(&s, &p3, T0);
        assert_eq!(s.dirty_minutes(10).unwrap().len(), 1);
        assert_eq!(
            s.query(&q, T0).unwrap().values().next().unwrap().1,
            PointState::Final
        );
        // A failed minute is named and not reconciled.
        assert!(s
            .commit_reconcile(&ReconCommit {
                minute: Some(m),
                failed: Some("corrupt audit entry"),
                ..ReconCommit::default()
            })
            .unwrap()
            .is_some());
        assert_eq!(s.dirty_count().unwrap(), 0);
        assert_eq!(
            s.failed_minutes(m, m + 1).unwrap()[0].1,
            "corrupt audit entry"
        );
        assert_eq!(
            s.query(&q, T0).unwrap().values().next().unwrap().1,
            PointState::Final
        );
    }
}
