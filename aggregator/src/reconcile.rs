//! Continuous reconciliation: once a minute is final and every source's raw
//! events have caught up past it, recount it from the audit trail with the
//! cross-PoP rule ([`crate::recount`]) and write the difference as
//! corrections, in the transaction that marks the minute reconciled.
//!
//! The [`Reconciler`] is driven by [`Reconciler::turn`], one bounded step at
//! a time with `now` passed in; [`spawn`] runs it on its own thread. Each turn
//! recounts at most one minute, chosen in rotation from three queues:
//!
//! - the frontier: the first minute with data that no reconcile has reached;
//! - dirty minutes: reconciled, then changed (late data), or after a minute
//!   before them gained clicks;
//! - jobs: ranges an operator asked for (`POST /api/v1/admin/reconcile`).
//!
//! Readiness. The reconciler takes a snapshot of the watermark, the
//! transaction sequence and every source's partials cursor, and waits until
//! each source's events cursor has reached that partials cursor: then every
//! raw event behind what the rows already count is in the audit trail, and
//! the minutes final under that watermark can be recounted. A source that
//! sent no partial for `source_timeout_ms`, or whose events cursor has not
//! moved for that long, is skipped and named (its events, when they come,
//! dirty the minutes again). A minute changed after the snapshot waits for
//! the next one.
//!
//! Exactly once through crashes: the recount reads a minute in one snapshot,
//! and its corrections, the minute's mark, the frontier and a job's progress
//! commit together, refused if the minute changed since the read. A restart
//! resumes from the frontier, the dirty set and the jobs in the store.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use wire::record::{Counts, EventRef, RowKey};

use crate::audit::ColdReader;
use crate::metrics::ReconcileStats;
use crate::recount::{minute_ids, Fingerprinter, Fp, FpMap, Outcome, Recount};
use crate::rows::Row;
use crate::store::{
    ColdPart, MinuteRead, ReadError, ReconCommit, ReconMark, ReconView, Store, StoreError,
};

/// `[reconcile]` in the aggregator's config.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct Settings {
    /// Reconcile continuously while serving. Default true.
    pub enabled: bool,
    /// Pause between turns when there is nothing to do, ms. Default 500.
    pub interval_ms: u64,
    /// Copies of a click id this close in event time are one click: the
    /// gateway's `dedup.horizon_s`, in ms (rounded up to whole minutes).
    /// Default 900000 (15 minutes).
    pub dedup_horizon_ms: i64,
    /// The velocity rule across PoPs: clicks per minute from one address on
    /// one ad, counted at every gateway, above which clicks are invalid; the
    /// gateway's `traffic.velocity_per_minute_max`. 0 turns it off.
    /// Default 30.
    pub velocity_per_minute_max: u32,
    /// Most click ids the lookback keeps in memory (16 bytes each, two
    /// windows): the clicks of `dedup_horizon_ms` at the peak rate must
    /// fit. Over it a minute is not reconciled, and says why. Default
    /// 67108864.
    pub lookback_entries_max: usize,
    /// Most corrected rows in one store transaction: bounds how long a
    /// reconcile holds the store's one writer. Default 2000.
    pub rows_per_txn_max: usize,
    /// The longest range one `POST /api/v1/admin/reconcile` may ask for, ms.
    /// Default 604800000 (7 days).
    pub job_span_max_ms: i64,
    /// Jobs kept (finished ones are forgotten oldest first). Default 100.
    pub jobs_max: usize,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            enabled: true,
            interval_ms: 500,
            dedup_horizon_ms: 900_000,
            velocity_per_minute_max: 30,
            lookback_entries_max: 64 << 20,
            rows_per_txn_max: 2000,
            job_span_max_ms: 7 * 86_400_000,
            jobs_max: 100,
        }
    }
}

impl Settings {
    pub fn validate(&self) -> Result<(), String> {
        if self.dedup_horizon_ms < 60_000 || self.dedup_horizon_ms > 7 * 86_400_000 {
            return Err("reconcile.dedup_horizon_ms: 60000 to 604800000".into());
        }
        if self.interval_ms == 0
            || self.lookback_entries_max == 0
            || self.rows_per_txn_max == 0
            || self.jobs_max == 0
        {
            return Err(
                "reconcile.interval_ms, lookback_entries_max, rows_per_txn_max, jobs_max: at least 1"
                    .into(),
            );
        }
        if self.job_span_max_ms < 60_000 {
            return Err("reconcile.job_span_max_ms: at least 60000".into());
        }
        Ok(())
    }

    /// The dedup horizon in whole minutes: a copy this many minutes or more
    /// after another is a click of its own (as the gateway keeps its table).
    pub fn horizon_min(&self) -> u32 {
        (self.dedup_horizon_ms as u64).div_ceil(60_000) as u32
    }
}

/// One reconcile job, as stored and as `GET /api/v1/admin/reconcile/{id}`
/// answers it.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Job {
    pub id: u64,
    /// "running" or "done".
    pub state: String,
    /// The range, as minutes since the epoch: [start, end).
    pub start_minute: u32,
    pub end_minute: u32,
    /// The next minute it looks at.
    pub next_minute: u32,
    pub created_ms: i64,
    pub finished_ms: Option<i64>,
    pub minutes_total: u64,
    /// Minutes recounted (with data).
    pub minutes_compared: u64,
    /// Minutes without any row or raw event.
    pub minutes_empty: u64,
    /// Not final yet when the job reached them: the continuous reconcile
    /// will take them.
    pub minutes_skipped_open: u64,
    /// Past the correction horizon: left as they are.
    pub minutes_skipped_horizon: u64,
    pub minutes_failed: u64,
    /// The first failures, each with its reason.
    pub failures: Vec<(u32, String)>,
    pub rows_compared: u64,
    pub rows_corrected: u64,
    pub events_read: u64,
}

const FAILURES_KEPT: usize = 100;

impl Job {
    pub fn new(id: u64, start_minute: u32, end_minute: u32, now_ms: i64) -> Job {
        Job {
            id,
            state: "running".into(),
            start_minute,
            end_minute,
            next_minute: start_minute,
            created_ms: now_ms,
            minutes_total: (end_minute - start_minute) as u64,
            ..Job::default()
        }
    }

    pub fn done(&self) -> bool {
        self.state == "done"
    }

    fn json(&self) -> String {
        serde_json::to_string(self).expect("a job serializes")
    }
}

/// What one turn did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Turn {
    /// Nothing is ready to recount.
    Idle,
    /// Waiting for sources' raw events to catch up with a snapshot.
    Waiting,
    /// A minute recounted (or skipped, or failed, or a job moved).
    Worked(MinuteOutcome),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MinuteOutcome {
    Reconciled {
        minute: u32,
        rows_compared: u64,
        rows_corrected: u64,
        events: u64,
    },
    /// Changed after the snapshot, or while being recounted: later.
    NotYet {
        minute: u32,
    },
    Failed {
        minute: u32,
        reason: String,
    },
    Skipped {
        minute: u32,
        reason: &'static str,
    },
    /// The frontier passed minutes without data, final: `[from, to)`.
    Empty {
        from: u32,
        to: u32,
    },
    JobStep {
        job: u64,
    },
}

/// The ids of the minutes before one: which clicks had a copy there.
struct Lookback {
    /// Minutes `[from, to)` are in `latest`.
    from: u32,
    to: u32,
    /// Click -> the latest minute in the window with a copy of it.
    latest: FpMap<u32>,
}

impl Lookback {
    fn new() -> Self {
        Lookback {
            from: 0,
            to: 0,
            latest: FpMap::default(),
        }
    }

    fn earlier(&self, f: &Fp, m: u32, h: u32) -> bool {
        self.latest.get(f).is_some_and(|&l| l < m && l + h > m)
    }

    fn add(&mut self, m: u32, ids: &[Fp]) {
        for f in ids {
            let l = self.latest.entry(*f).or_insert(m);
            *l = (*l).max(m);
        }
    }

    fn clear(&mut self, at: u32) {
        self.latest.clear();
        self.from = at;
        self.to = at;
    }

    /// Forgets minutes that no minute from `to` on looks back to.
    fn prune(&mut self, h: u32) {
        let min = self.to.saturating_sub(h.saturating_sub(1));
        if min > self.from {
            self.latest.retain(|_, l| *l >= min);
            self.from = min;
        }
    }
}

enum Window {
    /// Slides with the frontier.
    Front,
    /// Rebuilt where dirty minutes and jobs need it.
    Back,
}

/// A snapshot the reconciler waits on.
struct Pending {
    watermark_ms: i64,
    txn_seq: u64,
    /// (gateway, shard) -> the partials cursor the events must reach.
    targets: Vec<((String, u16), u64)>,
}

/// A snapshot whose raw events are all in.
#[derive(Debug, Clone)]
struct Ready {
    watermark_ms: i64,
    txn_seq: u64,
    skipped: Vec<String>,
}

pub struct Reconciler {
    store: Arc<Store>,
    cfg: Settings,
    fp: Fingerprinter,
    pending: Option<Pending>,
    ready: Option<Ready>,
    /// (gateway, shard) -> (events cursor, when it last moved).
    events_moved: HashMap<(String, u16), (u64, i64)>,
    front: Lookback,
    back: Lookback,
    turns: u64,
    stats: Arc<ReconcileStats>,
    skipped_logged: Vec<String>,
    /// Reads raw events retention has dropped from the hot store back from
    /// their sealed files.
    cold: Option<Arc<ColdReader>>,
}

#[derive(Debug, thiserror::Error)]
pub enum ReconcileError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Read(#[from] ReadError),
}

impl Reconciler {
    pub fn new(store: Arc<Store>, cfg: Settings, stats: Arc<ReconcileStats>) -> Self {
        Reconciler {
            store,
            cfg,
            fp: Fingerprinter::default(),
            pending: None,
            ready: None,
            events_moved: HashMap::new(),
            front: Lookback::new(),
            back: Lookback::new(),
            turns: 0,
            stats,
            skipped_logged: Vec::new(),
            cold: None,
        }
    }

    /// Reads minutes no longer hot from their sealed files through `cold`.
    pub fn with_cold(mut self, cold: Option<Arc<ColdReader>>) -> Self {
        self.cold = cold;
        self
    }

    /// One bounded step: at most one minute recounted.
    pub fn turn(&mut self, now_ms: i64) -> Result<Turn, ReconcileError> {
        self.turns += 1;
        let view = self.store.reconcile_view(now_ms)?;
        self.advance_readiness(&view, now_ms);
        self.stats.publish_view(&view, now_ms);
        self.stats.dirty.store(self.store.dirty_count()?, Relaxed);
        self.stats.lookback_entries.store(
            (self.front.latest.len() + self.back.latest.len()) as u64,
            Relaxed,
        );
        let Some(ready) = self.ready.clone() else {
            return Ok(Turn::Waiting);
        };
        for k in 0..3 {
            let got = match (self.turns + k) % 3 {
                0 => self.frontier_step(&view, &ready, now_ms)?,
                1 => self.dirty_step(&view, &ready, now_ms)?,
                _ => self.job_step(&ready, now_ms)?,
            };
            if let Some(o) = got {
                return Ok(Turn::Worked(o));
            }
        }
        Ok(if self.pending.is_some() && self.ready.is_none() {
            Turn::Waiting
        } else {
            Turn::Idle
        })
    }

    /// Keeps one snapshot pending; when every source's raw events have
    /// reached it, it becomes the ready one.
    fn advance_readiness(&mut self, view: &ReconView, now_ms: i64) {
        for s in &view.sources {
            let k = (s.gateway.clone(), s.shard);
            let e = self.events_moved.entry(k).or_insert((s.cursors.1, now_ms));
            if e.0 != s.cursors.1 {
                *e = (s.cursors.1, now_ms);
            }
        }
        for _ in 0..2 {
            if let Some(p) = &self.pending {
                let mut skipped = Vec::new();
                let mut all_in = true;
                for ((gw, shard), target) in &p.targets {
                    let Some(s) = view
                        .sources
                        .iter()
                        .find(|s| s.gateway == *gw && s.shard == *shard)
                    else {
                        continue;
                    };
                    if s.cursors.1 >= *target {
                        continue;
                    }
                    let partials_silent = !self.store.rules().heard_recently(s.heard_ms, now_ms);
                    let events_silent =
                        self.events_moved
                            .get(&(gw.clone(), *shard))
                            .is_some_and(|(_, since)| {
                                now_ms - since > self.store.rules().source_timeout_ms
                            });
                    if partials_silent || events_silent {
                        skipped.push(format!("{gw}/{shard}"));
                    } else {
                        all_in = false;
                    }
                }
                if !all_in {
                    return;
                }
                if skipped != self.skipped_logged {
                    if skipped.is_empty() {
                        tracing::info!("reconcile: every source's raw events are in again");
                    } else {
                        tracing::warn!(sources = ?skipped, timeout_ms = self.store.rules().source_timeout_ms, "reconcile: skipping silent sources; their late events will dirty the minutes again");
                    }
                    self.skipped_logged = skipped.clone();
                }
                self.stats
                    .skipped_sources
                    .store(skipped.len() as u64, Relaxed);
                self.ready = Some(Ready {
                    watermark_ms: p.watermark_ms,
                    txn_seq: p.txn_seq,
                    skipped,
                });
                self.pending = None;
            }
            self.pending = Some(Pending {
                watermark_ms: view.watermark_ms,
                txn_seq: view.txn_seq,
                targets: view
                    .sources
                    .iter()
                    .map(|s| ((s.gateway.clone(), s.shard), s.cursors.0))
                    .collect(),
            });
        }
    }

    fn frontier_step(
        &mut self,
        view: &ReconView,
        ready: &Ready,
        now_ms: i64,
    ) -> Result<Option<MinuteOutcome>, ReconcileError> {
        let rules = self.store.rules();
        // The first minute not final under the ready watermark.
        let open = ((ready.watermark_ms - rules.lateness_ms).max(0) / 60_000) as u32;
        let next = self.store.next_data_minute(view.frontier)?;
        let m = match next {
            Some(m) if m < open => m,
            // Nothing to recount before the first open minute: the frontier
            // passes the empty final minutes (so a closed hour without data
            // at its end is known complete). Data that comes for them later
            // marks them dirty, like any late data.
            _ if view.frontier < open => {
                self.store.commit_reconcile(&ReconCommit {
                    frontier_to: Some(open),
                    ..ReconCommit::default()
                })?;
                return Ok(Some(MinuteOutcome::Empty {
                    from: view.frontier,
                    to: open,
                }));
            }
            _ => return Ok(None),
        };
        if rules.is_late(m, ready.watermark_ms) {
            // First reached past the correction horizon (a store that was
            // down that long): its late partials went to the late table, so
            // a recount would not compare like with like.
            let why = "past the correction horizon when first reached";
            self.store.commit_reconcile(&ReconCommit {
                minute: Some(m),
                failed: Some(why),
                frontier_to: Some(m + 1),
                ..ReconCommit::default()
            })?;
            self.stats.minutes_skipped.fetch_add(1, Relaxed);
            return Ok(Some(MinuteOutcome::Skipped {
                minute: m,
                reason: why,
            }));
        }
        let o = self.reconcile_minute(m, Window::Front, ready, now_ms, None, true)?;
        Ok(Some(o))
    }

    fn dirty_step(
        &mut self,
        view: &ReconView,
        ready: &Ready,
        now_ms: i64,
    ) -> Result<Option<MinuteOutcome>, ReconcileError> {
        let rules = self.store.rules().clone();
        let mut past = Vec::new();
        let mut pick = None;
        for (m, changed_at) in self.store.dirty_minutes(64)? {
            if m >= view.frontier {
                continue;
            }
            if rules.is_late(m, ready.watermark_ms) {
                past.push(m);
                continue;
            }
            if changed_at <= ready.txn_seq {
                pick = Some(m);
                break;
            }
        }
        if !past.is_empty() {
            // Their partials go to the late table now: the rows stay as
            // they are, final, not reconciled.
            self.store.commit_reconcile(&ReconCommit {
                undirty: &past,
                ..ReconCommit::default()
            })?;
            self.stats
                .minutes_skipped
                .fetch_add(past.len() as u64, Relaxed);
        }
        let Some(m) = pick else {
            return Ok(None);
        };
        Ok(Some(self.reconcile_minute(
            m,
            Window::Back,
            ready,
            now_ms,
            None,
            false,
        )?))
    }

    fn job_step(
        &mut self,
        ready: &Ready,
        now_ms: i64,
    ) -> Result<Option<MinuteOutcome>, ReconcileError> {
        let Some(mut job) = self
            .store
            .jobs()?
            .into_iter()
            .filter_map(|(_, j)| serde_json::from_str::<Job>(&j).ok())
            .find(|j| !j.done())
        else {
            return Ok(None);
        };
        let rules = self.store.rules().clone();
        // Minutes without data are passed over in one step.
        let next = self
            .store
            .next_data_minute(job.next_minute)?
            .filter(|&m| m < job.end_minute);
        let Some(m) = next else {
            job.minutes_empty += (job.end_minute - job.next_minute) as u64;
            job.next_minute = job.end_minute;
            job.state = "done".into();
            job.finished_ms = Some(now_ms);
            let json = job.json();
            self.store.commit_reconcile(&ReconCommit {
                job: Some((job.id, &json)),
                ..ReconCommit::default()
            })?;
            tracing::info!(
                job = job.id,
                rows_corrected = job.rows_corrected,
                minutes = job.minutes_compared,
                "reconcile job done"
            );
            return Ok(Some(MinuteOutcome::JobStep { job: job.id }));
        };
        job.minutes_empty += (m - job.next_minute) as u64;
        job.next_minute = m;
        let skip = if !rules.is_final(m, ready.watermark_ms) {
            job.minutes_skipped_open += 1;
            true
        } else if rules.is_late(m, ready.watermark_ms) {
            job.minutes_skipped_horizon += 1;
            true
        } else {
            false
        };
        if skip {
            job.next_minute = m + 1;
            let json = job.json();
            self.store.commit_reconcile(&ReconCommit {
                job: Some((job.id, &json)),
                ..ReconCommit::default()
            })?;
            return Ok(Some(MinuteOutcome::JobStep { job: job.id }));
        }
        let o = self.reconcile_minute(m, Window::Back, ready, now_ms, Some(&mut job), false)?;
        Ok(Some(o))
    }

    /// Makes `w` hold the clicks of the minutes `[m - h + 1, m)`.
    fn ensure_window(&mut self, which: &Window, m: u32) -> Result<(), String> {
        let h = self.cfg.horizon_min();
        let want = m.saturating_sub(h - 1);
        let max = self.cfg.lookback_entries_max;
        let (w, fp, store, cold) = match which {
            Window::Front => (&mut self.front, &self.fp, &self.store, &self.cold),
            Window::Back => (&mut self.back, &self.fp, &self.store, &self.cold),
        };
        if w.to == m && w.from <= want {
            return Ok(());
        }
        let read_from = if w.to < m && w.to >= want && w.from <= want {
            w.to
        } else {
            w.clear(want);
            want
        };
        for x in read_from..m {
            let mut ids = Vec::new();
            let mut add = |_: &str, _: u16, _: u64, e: &EventRef<'_>| {
                if let Some(f) = minute_ids(fp, e) {
                    ids.push(f);
                }
            };
            let cold_parts = store
                .audit_events(x, x + 1, &mut add)
                .map_err(|e| format!("lookback minute {x}: {e}"))?;
            read_cold(cold, &cold_parts, &mut add)
                .map_err(|e| format!("lookback minute {x}: {e}"))?;
            w.add(x, &ids);
            if w.latest.len() > max {
                w.clear(0);
                return Err(format!(
                    "the lookback holds more than reconcile.lookback_entries_max ({max}) click ids"
                ));
            }
        }
        w.to = m;
        w.prune(h);
        Ok(())
    }

    /// Recounts minute `m` and commits what it found.
    fn reconcile_minute(
        &mut self,
        m: u32,
        which: Window,
        ready: &Ready,
        now_ms: i64,
        mut job: Option<&mut Job>,
        frontier: bool,
    ) -> Result<MinuteOutcome, ReconcileError> {
        let t0 = Instant::now();
        let h = self.cfg.horizon_min();
        let (read, out) = match self.recount(m, &which)? {
            Ok(r) => r,
            Err(why) => return self.fail(m, why, job, frontier),
        };
        if read.rev > ready.txn_seq {
            return Ok(MinuteOutcome::NotYet { minute: m });
        }
        let (rows_compared, diffs) = differences(&read.rows, &out.rows);
        let fixes: Vec<(RowKey, Counts)> =
            diffs.into_iter().map(|(k, _, want)| (k, want)).collect();
        // The minutes after it counted against this minute's click set: if
        // it changed (or the minute is counted for the first time behind
        // the frontier), they are counted again.
        let changed_set = !frontier
            && read
                .mark
                .map_or(!out.ids.is_empty(), |mk| mk.digest != out.digest);
        let dirty_more: Vec<u32> = if changed_set {
            (m + 1..m + h).collect()
        } else {
            Vec::new()
        };
        let mark = ReconMark {
            rev: read.rev,
            at_ms: now_ms,
            events: out.events,
            rows_corrected: fixes.len() as u64,
            skipped_sources: ready.skipped.len() as u32,
            digest: out.digest,
        };
        let job_json = job.as_deref_mut().map(|j| {
            j.minutes_compared += 1;
            j.rows_compared += rows_compared;
            j.rows_corrected += fixes.len() as u64;
            j.events_read += out.events;
            j.next_minute = m + 1;
            j.json()
        });
        // Corrections in bounded transactions; the last one marks the minute.
        let chunks: Vec<&[(RowKey, Counts)]> = if fixes.is_empty() {
            vec![&[]]
        } else {
            fixes.chunks(self.cfg.rows_per_txn_max).collect()
        };
        let n = chunks.len();
        daemon::faults::crash_point("aggregator_reconcile_before_commit");
        for (i, chunk) in chunks.into_iter().enumerate() {
            let last = i + 1 == n;
            let c = ReconCommit {
                minute: Some(m),
                rev: Some(read.rev),
                fixes: chunk,
                mark: last.then_some(mark),
                frontier_to: (last && frontier).then_some(m + 1),
                dirty_more: if last { &dirty_more } else { &[] },
                job: if last {
                    job.as_ref().map(|j| (j.id, job_json.as_deref().unwrap()))
                } else {
                    None
                },
                users: last.then_some(&out.users),
                ..ReconCommit::default()
            };
            match self.store.commit_reconcile(&c)? {
                Some(held) => self.stats.write_held.observe(held.as_micros() as u64),
                None => return Ok(MinuteOutcome::NotYet { minute: m }),
            }
            if !last {
                // Some corrections written, the minute not yet marked: a
                // crash here recounts it after the restart.
                daemon::faults::crash_point("aggregator_reconcile_chunk_committed");
            }
        }
        // The windows learn this minute's clicks.
        match which {
            Window::Front => {
                self.front.add(m, &out.ids);
                self.front.to = m + 1;
                self.front.prune(h);
            }
            Window::Back => {
                self.back.add(m, &out.ids);
                self.back.to = m + 1;
                self.back.prune(h);
                if self.front.from <= m && m < self.front.to {
                    self.front.add(m, &out.ids);
                }
            }
        }
        let s = &self.stats;
        s.minutes_reconciled.fetch_add(1, Relaxed);
        s.rows_corrected.fetch_add(fixes.len() as u64, Relaxed);
        s.events_read.fetch_add(out.events, Relaxed);
        s.minute_seconds.observe(t0.elapsed().as_micros() as u64);
        if frontier {
            let end_ms = (m as i64 + 1) * 60_000;
            s.delay.observe(((now_ms - end_ms).max(0) * 1000) as u64);
        }
        if !fixes.is_empty() {
            tracing::info!(
                minute = %wire::time::format_time(m as i64 * 60),
                rows_corrected = fixes.len(),
                events = out.events,
                "reconciled"
            );
        }
        Ok(MinuteOutcome::Reconciled {
            minute: m,
            rows_compared,
            rows_corrected: fixes.len() as u64,
            events: out.events,
        })
    }

    /// Records that minute `m` cannot be reconciled (nothing of it is
    /// corrected), and moves on.
    fn fail(
        &mut self,
        m: u32,
        reason: String,
        job: Option<&mut Job>,
        frontier: bool,
    ) -> Result<MinuteOutcome, ReconcileError> {
        tracing::error!(minute = %wire::time::format_time(m as i64 * 60), reason = %reason, "reconcile: minute not reconciled; nothing of it corrected");
        let json = job.map(|j| {
            j.minutes_failed += 1;
            if j.failures.len() < FAILURES_KEPT {
                j.failures.push((m, reason.clone()));
            }
            j.next_minute = m + 1;
            (j.id, j.json())
        });
        // No stamp check: whatever changes later dirties the minute, and it
        // is tried again.
        self.store.commit_reconcile(&ReconCommit {
            minute: Some(m),
            failed: Some(&reason),
            frontier_to: frontier.then_some(m + 1),
            job: json.as_ref().map(|(id, j)| (*id, j.as_str())),
            ..ReconCommit::default()
        })?;
        self.stats.minutes_failed.fetch_add(1, Relaxed);
        Ok(MinuteOutcome::Failed { minute: m, reason })
    }
}

/// The checks a new job's range must pass; the job's minutes.
pub fn job_range(cfg: &Settings, start_s: i64, end_s: i64) -> Result<(u32, u32), String> {
    if start_s < 0 || end_s < 0 {
        return Err("start and end must be after 1970".into());
    }
    if end_s <= start_s {
        return Err("end must be after start".into());
    }
    if (end_s - start_s) * 1000 > cfg.job_span_max_ms {
        return Err(format!(
            "the range spans {} s; at most reconcile.job_span_max_ms ({} ms)",
            end_s - start_s,
            cfg.job_span_max_ms
        ));
    }
    Ok((
        (start_s / 60) as u32,
        (end_s as u64).div_ceil(60).min(u32::MAX as u64) as u32,
    ))
}

/// Creates a job; refuses when `jobs_max` jobs are still running.
pub fn create_job(
    store: &Store,
    cfg: &Settings,
    start_minute: u32,
    end_minute: u32,
    now_ms: i64,
) -> Result<Result<u64, String>, StoreError> {
    let jobs: Vec<Job> = store
        .jobs()?
        .into_iter()
        .filter_map(|(_, j)| serde_json::from_str(&j).ok())
        .collect();
    let running = jobs.iter().filter(|j| !j.done()).count();
    if running >= cfg.jobs_max {
        return Ok(Err(format!(
            "{running} reconcile jobs are running; at most reconcile.jobs_max ({})",
            cfg.jobs_max
        )));
    }
    let excess = (jobs.len() + 1).saturating_sub(cfg.jobs_max);
    let forget: Vec<u64> = jobs
        .iter()
        .filter(|j| j.done())
        .take(excess)
        .map(|j| j.id)
        .collect();
    let id = store.job_create(
        |id| Job::new(id, start_minute, end_minute, now_ms).json(),
        &forget,
    )?;
    Ok(Ok(id))
}

/// One job as stored.
pub fn job(store: &Store, id: u64) -> Result<Option<Job>, StoreError> {
    Ok(store
        .jobs()?
        .into_iter()
        .find(|(i, _)| *i == id)
        .and_then(|(_, j)| serde_json::from_str(&j).ok()))
}

/// Runs the reconciler on its own thread until `stop` is set.
pub fn spawn(
    store: Arc<Store>,
    cfg: Settings,
    stats: Arc<ReconcileStats>,
    cold: Option<Arc<ColdReader>>,
    stop: Arc<AtomicBool>,
) -> std::thread::JoinHandle<()> {
    std::thread::Builder::new()
        .name("reconciler".into())
        .spawn(move || {
            let idle = Duration::from_millis(cfg.interval_ms);
            let mut r = Reconciler::new(store, cfg, stats.clone()).with_cold(cold);
            let mut last_error: Option<Instant> = None;
            while !stop.load(Relaxed) {
                let pause = match r.turn(crate::now_ms()) {
                    Ok(Turn::Worked(MinuteOutcome::NotYet { .. })) => idle,
                    Ok(Turn::Worked(_)) => Duration::ZERO,
                    Ok(Turn::Idle | Turn::Waiting) => idle,
                    Err(e) => {
                        stats.errors.fetch_add(1, Relaxed);
                        if last_error.is_none_or(|t| t.elapsed() > Duration::from_secs(60)) {
                            tracing::error!(error = %e, "reconcile turn failed; will retry");
                            last_error = Some(Instant::now());
                        }
                        idle
                    }
                };
                // Sleep in short steps so a stop is seen quickly.
                let until = Instant::now() + pause;
                while Instant::now() < until && !stop.load(Relaxed) {
                    std::thread::sleep((until - Instant::now()).min(Duration::from_millis(50)));
                }
            }
        })
        .expect("spawn the reconciler")
}

/// What an offline reconcile of a range found (the store not served).
#[derive(Debug, Default)]
pub struct Report {
    pub minutes: u64,
    pub rows_compared: u64,
    pub events_read: u64,
    /// (key, rows as they stand, recount) where they differ.
    pub diffs: Vec<(RowKey, Counts, Counts)>,
    pub failed: Vec<(u32, String)>,
}

/// Recounts `[m0, m1)` of a store nobody else writes to; with `write`,
/// corrects the rows that differ and marks the minutes reconciled.
pub fn offline(
    store: Arc<Store>,
    cfg: &Settings,
    cold: Option<Arc<ColdReader>>,
    m0: u32,
    m1: u32,
    write: bool,
    now_ms: i64,
) -> Result<Report, ReconcileError> {
    let mut r = Reconciler::new(
        store.clone(),
        cfg.clone(),
        Arc::new(ReconcileStats::default()),
    )
    .with_cold(cold);
    let view = store.reconcile_view(now_ms)?;
    let ready = Ready {
        watermark_ms: view.watermark_ms,
        txn_seq: view.txn_seq,
        skipped: Vec::new(),
    };
    let mut report = Report::default();
    let mut m = m0;
    while let Some(next) = store.next_data_minute(m)?.filter(|&x| x < m1) {
        report.minutes += 1;
        if write {
            match r.reconcile_minute(next, Window::Back, &ready, now_ms, None, false)? {
                MinuteOutcome::Reconciled {
                    rows_compared,
                    events,
                    ..
                } => {
                    report.rows_compared += rows_compared;
                    report.events_read += events;
                }
                MinuteOutcome::Failed { minute, reason } => report.failed.push((minute, reason)),
                _ => {}
            }
        } else {
            match r.recount_only(next) {
                Ok((rows, events, diffs)) => {
                    report.rows_compared += rows;
                    report.events_read += events;
                    report.diffs.extend(diffs);
                }
                Err(why) => report.failed.push((next, why)),
            }
        }
        m = next + 1;
    }
    Ok(report)
}

impl Reconciler {
    /// Reads minute `m` and applies the rule with the window's lookback:
    /// `Err` inside says why the minute cannot be recounted (a corrupt audit
    /// entry, a record of another minute, a full lookback).
    #[allow(clippy::type_complexity)]
    fn recount(
        &mut self,
        m: u32,
        which: &Window,
    ) -> Result<Result<(MinuteRead, Outcome), String>, ReconcileError> {
        if let Err(why) = self.ensure_window(which, m) {
            return Ok(Err(why));
        }
        let mut rc = Recount::new(m, &self.fp);
        let mut bad = None;
        let mut add = |gw: &str, shard: u16, seq: u64, e: &EventRef<'_>| {
            if bad.is_none() {
                if let Err(x) = rc.add(gw, shard, seq, e) {
                    bad = Some(format!("{x} (gateway {gw:?}, shard {shard}, seq {seq})"));
                }
            }
        };
        let read = match self.store.read_minute(m, &mut add) {
            Ok(r) => r,
            Err(ReadError::Store(e)) => return Err(e.into()),
            Err(e @ ReadError::Corrupt { .. }) => return Ok(Err(e.to_string())),
        };
        if let Err(why) = read_cold(&self.cold, &read.cold, &mut add) {
            return Ok(Err(why));
        }
        if let Some(why) = bad {
            return Ok(Err(why));
        }
        let h = self.cfg.horizon_min();
        let w = match which {
            Window::Front => &self.front,
            Window::Back => &self.back,
        };
        let out = rc.finish(|f| w.earlier(f, m, h), self.cfg.velocity_per_minute_max);
        Ok(Ok((read, out)))
    }

    /// The differences a recount of `m` finds, written nowhere.
    #[allow(clippy::type_complexity)]
    fn recount_only(
        &mut self,
        m: u32,
    ) -> Result<(u64, u64, Vec<(RowKey, Counts, Counts)>), String> {
        let (read, out) = self
            .recount(m, &Window::Back)
            .map_err(|e| e.to_string())??;
        let (rows_compared, diffs) = differences(&read.rows, &out.rows);
        let h = self.cfg.horizon_min();
        self.back.add(m, &out.ids);
        self.back.to = m + 1;
        self.back.prune(h);
        Ok((rows_compared, out.events, diffs))
    }
}

/// Visits the events of minutes retention has dropped from the hot store,
/// from their sealed files; a file that cannot be read (gone, corrupt,
/// foreign) fails the minute with its name, and nothing of it is counted.
fn read_cold(
    cold: &Option<Arc<ColdReader>>,
    parts: &[ColdPart],
    f: &mut dyn FnMut(&str, u16, u64, &EventRef<'_>),
) -> Result<(), String> {
    if parts.is_empty() {
        return Ok(());
    }
    let Some(reader) = cold else {
        return Err(format!(
            "raw events of gateway {:?} are in the sealed file {}, and no object store is open",
            parts[0].gateway, parts[0].object
        ));
    };
    // Read every file fully before counting any of it, so a bad file never
    // leaves half its events counted.
    let mut events: Vec<(String, u16, u64, Vec<u8>)> = Vec::new();
    for p in parts {
        reader
            .events(p, &mut |gw, shard, seq, e| {
                let mut b = vec![0u8; e.encoded_len()];
                e.encode_into(&mut b);
                events.push((gw.to_owned(), shard, seq, b));
            })
            .map_err(|e| e.to_string())?;
    }
    for (gw, shard, seq, b) in &events {
        let e = EventRef::decode(b).expect("encoded just above");
        f(gw, *shard, *seq, &e);
    }
    Ok(())
}

/// The rows whose recount differs from what the store holds, as (key, rows,
/// recount), and how many rows were compared.
fn differences(
    current: &[(RowKey, Row)],
    recount: &BTreeMap<RowKey, Counts>,
) -> (u64, Vec<(RowKey, Counts, Counts)>) {
    let current: BTreeMap<&RowKey, Counts> = current.iter().map(|(k, r)| (k, r.counts)).collect();
    let keys: std::collections::BTreeSet<&RowKey> =
        current.keys().copied().chain(recount.keys()).collect();
    let diffs = keys
        .iter()
        .filter_map(|k| {
            let now = current.get(k).copied().unwrap_or_default();
            let want = recount.get(*k).copied().unwrap_or_default();
            (now != want).then(|| ((*k).clone(), now, want))
        })
        .collect();
    (keys.len() as u64, diffs)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::merge::{PointState, Rules};
    use crate::store::Sink;
    use crate::store::{Query, Settings as StoreSettings};
    use wire::batch::{push_item, Batch, BatchKind, Status};
    use wire::record::{Device, EventKind, EventRef, PartialRecord, Source, Verdict};
    use wire::segment::RecordType;

    const M: u32 = 29_924_940; // 2026-11-24T05:00Z
    const T: i64 = M as i64 * 60_000;

    /// A gateway shard as the aggregator sees it: events logged, then
    /// shipped as one events batch and one partial summing them.
    struct Gw {
        name: &'static str,
        seq: u64,
        last_partial: u64,
        shipped_events: u64,
        pending: Vec<(u64, Vec<u8>)>,
        rows: BTreeMap<RowKey, Counts>,
    }

    impl Gw {
        fn new(name: &'static str) -> Gw {
            Gw {
                name,
                seq: 0,
                last_partial: 0,
                shipped_events: 0,
                pending: Vec::new(),
                rows: BTreeMap::new(),
            }
        }

        fn click(&mut self, id: &str, ms: i64, verdict: Verdict) {
            self.seq += 1;
            let e = EventRef {
                kind: EventKind::Click,
                verdict,
                source: Source::Get,
                device: Device::Mobile,
                country: *b"FR",
                event_ms: ms,
                receive_ms: ms,
                signed_ts_s: ms / 1000,
                cost_micros: 1000,
                client_ip: [7; 16],
                kid: "k",
                advertiser_id: "a",
                campaign_id: "c",
                ad_id: "x",
                click_id: id,
                user_id: "u",
                redirect_url: "https://example.com/",
            };
            let mut b = vec![0u8; e.encoded_len()];
            e.encode_into(&mut b);
            self.pending.push((self.seq, b));
            self.rows.entry(RowKey::of(&e)).or_default().add_event(
                e.kind,
                e.verdict,
                e.cost_micros,
            );
        }

        /// The partial for everything since the last one (watermark `wm`).
        fn partial(&mut self, wm: i64) -> Vec<u8> {
            self.seq += 1;
            let mut raw = Vec::new();
            let mut b = Vec::new();
            PartialRecord {
                from_seq: self.last_partial,
                to_seq: self.seq - 1,
                watermark_ms: wm,
                rows: std::mem::take(&mut self.rows).into_iter().collect(),
                unrecorded: Vec::new(),
            }
            .encode(&mut b);
            push_item(&mut raw, self.seq, RecordType::Partial as u8, &b);
            let after = self.last_partial;
            self.last_partial = self.seq;
            Batch::seal(
                BatchKind::Partials,
                self.name,
                0,
                after,
                self.seq,
                1,
                &raw,
                1,
            )
            .unwrap()
            .encode()
        }

        /// Ships what was logged, as a shipper does: the partial, then the
        /// raw events through it.
        fn ship(&mut self, s: &Store, now: i64) {
            let p = self.partial(now);
            apply(s, &p, now);
            let e = self.events();
            apply(s, &e, now);
        }

        /// The events logged since the last events batch (through the
        /// last partial).
        fn events(&mut self) -> Vec<u8> {
            let mut raw = Vec::new();
            let evs = std::mem::take(&mut self.pending);
            for (seq, b) in &evs {
                push_item(&mut raw, *seq, RecordType::Event as u8, b);
            }
            let after = self.shipped_events;
            self.shipped_events = self.seq;
            Batch::seal(
                BatchKind::Events,
                self.name,
                0,
                after,
                self.seq,
                evs.len() as u32,
                &raw,
                1,
            )
            .unwrap()
            .encode()
        }
    }

    fn setup(vmax: u32) -> (tempfile::TempDir, Arc<Store>, Reconciler) {
        let d = tempfile::tempdir().unwrap();
        let store = Arc::new(
            Store::open(
                &d.path().join("s.redb"),
                StoreSettings {
                    rules: Rules {
                        lateness_ms: 60_000,
                        horizon_ms: 86_400_000,
                        source_timeout_ms: 30_000,
                        raw_max: 1 << 20,
                        cluster: None,
                    },
                    export: true,
                    ..Default::default()
                },
            )
            .unwrap(),
        );
        let cfg = Settings {
            dedup_horizon_ms: 300_000,
            velocity_per_minute_max: vmax,
            rows_per_txn_max: 1,
            ..Settings::default()
        };
        let r = Reconciler::new(store.clone(), cfg, Arc::new(ReconcileStats::default()));
        (d, store, r)
    }

    fn apply(s: &Store, frame: &[u8], now: i64) {
        let gws = vec!["gwa".to_string(), "gwb".to_string()];
        let (a, _) = s.apply_many(&[(frame, &gws)], now).remove(0);
        assert_eq!(a.status, Status::Applied, "{}", a.reason);
    }

    /// Turns until nothing is left to do (bounded); what they did, but the
    /// frontier passing empty minutes.
    fn drive(r: &mut Reconciler, now: i64) -> Vec<MinuteOutcome> {
        let mut done = Vec::new();
        let keep = |o: MinuteOutcome, done: &mut Vec<MinuteOutcome>| {
            if !matches!(o, MinuteOutcome::Empty { .. }) {
                done.push(o);
            }
        };
        for _ in 0..200 {
            match r.turn(now).unwrap() {
                Turn::Worked(o) => keep(o, &mut done),
                Turn::Idle | Turn::Waiting => {
                    // One more: a new snapshot may have become ready.
                    match r.turn(now).unwrap() {
                        Turn::Worked(o) => keep(o, &mut done),
                        _ => return done,
                    }
                }
            }
        }
        panic!("no quiescence in 200 turns: {done:?}");
    }

    fn point(s: &Store, m: u32, now: i64) -> (Counts, PointState, u32) {
        let q = Query {
            advertiser_id: "a".into(),
            start_s: m as i64 * 60,
            end_s: (m as i64 + 1) * 60,
            bucket_s: 60,
            campaign_id: None,
            ad_id: None,
        };
        s.query(&q, now)
            .unwrap()
            .values()
            .next()
            .copied()
            .unwrap_or((Counts::default(), PointState::Provisional, 0))
    }

    #[test]
    fn a_click_counted_at_two_pops_is_billed_once_once_reconciled() {
        let (_d, s, mut r) = setup(0);
        let (mut a, mut b) = (Gw::new("gwa"), Gw::new("gwb"));
        a.click("c1", T + 1000, Verdict::Accepted);
        a.click("c2", T + 2000, Verdict::Accepted);
        b.click("c1", T + 3000, Verdict::Accepted); // the retry, elsewhere
        b.click("c3", T + 4000, Verdict::Accepted);
        let now = T + 200_000;
        for g in [&mut a, &mut b] {
            let p = g.partial(now);
            apply(&s, &p, now);
        }
        let (c, state, v0) = point(&s, M, now);
        assert_eq!(
            (c.clicks, state),
            (4, PointState::Final),
            "real time counts both"
        );
        // The raw events are not in yet: nothing is recounted.
        assert!(drive(&mut r, now).is_empty());
        for g in [&mut a, &mut b] {
            let e = g.events();
            apply(&s, &e, now);
        }
        let done = drive(&mut r, now);
        assert!(
            matches!(
                done[..],
                [MinuteOutcome::Reconciled {
                    minute: M,
                    rows_corrected: 1,
                    events: 4,
                    ..
                }]
            ),
            "{done:?}"
        );
        let (c, state, version) = point(&s, M, now);
        assert_eq!(
            (c.clicks, c.duplicates, c.spend_micros, state, version),
            (3, 1, 3000, PointState::Reconciled, v0 + 1)
        );
        // The correction goes to the sink with the rest.
        assert!(s.export_backlog(Sink::ClickHouse).unwrap() > 0);
        // Nothing more to do; a second pass would change nothing.
        assert!(drive(&mut r, now).is_empty());
    }

    #[test]
    fn a_silent_source_is_skipped_and_its_late_events_dirty_the_minute_again() {
        let (_d, s, mut r) = setup(0);
        let (mut a, mut b) = (Gw::new("gwa"), Gw::new("gwb"));
        a.click("c1", T + 1000, Verdict::Accepted);
        b.click("c1", T + 2000, Verdict::Accepted);
        b.click("c2", T + 2500, Verdict::Accepted);
        let now = T + 200_000;
        for g in [&mut a, &mut b] {
            let p = g.partial(now);
            apply(&s, &p, now);
        }
        let e = a.events();
        apply(&s, &e, now);
        // gwb's events do not come; while it is heard from, the minute waits.
        assert!(drive(&mut r, now).is_empty());
        // Past the source timeout without news of gwb: skipped, named.
        let later = now + 31_000;
        a.ship(&s, later);
        let done = drive(&mut r, later);
        assert!(
            matches!(done[..], [MinuteOutcome::Reconciled { minute: M, .. }]),
            "{done:?}"
        );
        assert_eq!(r.ready.as_ref().unwrap().skipped, vec!["gwb/0".to_string()]);
        // gwb's raw events were not read: only gwa's copy is counted.
        let (c, state, _) = point(&s, M, later);
        assert_eq!((c.clicks, state), (1, PointState::Reconciled));
        // They arrive: the minute is dirty (final), then reconciled again.
        b.ship(&s, later);
        assert_eq!(point(&s, M, later).1, PointState::Final);
        let done = drive(&mut r, later);
        assert!(
            matches!(done[..], [MinuteOutcome::Reconciled { minute: M, .. }]),
            "{done:?}"
        );
        let (c, state, _) = point(&s, M, later);
        assert_eq!(
            (c.clicks, c.duplicates, state),
            (2, 1, PointState::Reconciled)
        );
    }

    #[test]
    fn an_earlier_copy_arriving_late_moves_the_bill_and_recounts_the_minutes_after() {
        let (_d, s, mut r) = setup(0);
        let (mut a, mut b) = (Gw::new("gwa"), Gw::new("gwb"));
        // gwb's copy in minute M+1 is reconciled first, as the only one.
        b.click("c1", T + 61_000, Verdict::Accepted);
        let now = T + 300_000;
        b.ship(&s, now);
        drive(&mut r, now);
        assert_eq!(point(&s, M + 1, now).0.clicks, 1);
        // gwa logged the same click in minute M (a batched, late event):
        // it is the earliest copy, so the bill moves to M.
        a.click("c1", T + 5_000, Verdict::Accepted);
        a.ship(&s, now);
        let done = drive(&mut r, now);
        let minutes: Vec<u32> = done
            .iter()
            .filter_map(|o| match o {
                MinuteOutcome::Reconciled { minute, .. } => Some(*minute),
                _ => None,
            })
            .collect();
        assert!(
            minutes.contains(&M) && minutes.contains(&(M + 1)),
            "{done:?}"
        );
        let (m0, m1) = (point(&s, M, now), point(&s, M + 1, now));
        assert_eq!((m0.0.clicks, m0.1), (1, PointState::Reconciled));
        assert_eq!(
            (m1.0.clicks, m1.0.duplicates, m1.1),
            (0, 1, PointState::Reconciled)
        );
    }

    #[test]
    fn the_velocity_rule_counts_one_stream_across_pops() {
        let (_d, s, mut r) = setup(2);
        let (mut a, mut b) = (Gw::new("gwa"), Gw::new("gwb"));
        // Each gateway saw two clicks of the stream: within its limit.
        a.click("c1", T + 1000, Verdict::Accepted);
        b.click("c2", T + 2000, Verdict::Accepted);
        a.click("c3", T + 3000, Verdict::Accepted);
        b.click("c4", T + 4000, Verdict::Accepted);
        let now = T + 200_000;
        a.ship(&s, now);
        b.ship(&s, now);
        let done = drive(&mut r, now);
        assert_eq!(done.len(), 1, "{done:?}");
        let (c, _, _) = point(&s, M, now);
        assert_eq!((c.clicks, c.invalid, c.spend_micros), (2, 2, 2000));
    }

    #[test]
    fn a_corrupt_audit_entry_fails_its_minute_by_name_and_corrects_nothing() {
        let (_d, s, mut r) = setup(0);
        let (mut a, mut b) = (Gw::new("gwa"), Gw::new("gwb"));
        a.click("c1", T + 1000, Verdict::Accepted);
        b.click("c1", T + 2000, Verdict::Accepted);
        let now = T + 200_000;
        a.ship(&s, now);
        b.ship(&s, now);
        s.damage_audit_for_test(M, "gwb");
        let done = drive(&mut r, now);
        match &done[..] {
            [MinuteOutcome::Failed { minute: M, reason }] => {
                assert!(
                    reason.contains("gwb") && reason.contains("corrupt"),
                    "{reason}"
                );
            }
            other => panic!("{other:?}"),
        }
        let (c, state, _) = point(&s, M, now);
        assert_eq!((c.clicks, state), (2, PointState::Final));
        assert_eq!(s.failed_minutes(M, M + 1).unwrap().len(), 1);
        assert_eq!(r.stats.minutes_failed.load(Relaxed), 1);
    }

    #[test]
    fn a_job_recounts_a_range_and_reports_what_it_did() {
        let (_d, s, mut r) = setup(0);
        let mut a = Gw::new("gwa");
        a.click("c1", T + 1000, Verdict::Accepted);
        a.click("c2", T + 121_000, Verdict::Accepted);
        let now = T + 400_000;
        a.ship(&s, now);
        drive(&mut r, now);
        let cfg = Settings::default();
        assert!(job_range(&cfg, 10, 5).unwrap_err().contains("after"));
        assert!(job_range(&cfg, 0, 8 * 86_400)
            .unwrap_err()
            .contains("job_span_max_ms"));
        let (m0, m1) = job_range(&cfg, T / 1000 - 600, T / 1000 + 600).unwrap();
        let id = create_job(&s, &cfg, m0, m1, now).unwrap().unwrap();
        drive(&mut r, now);
        let j = job(&s, id).unwrap().unwrap();
        assert!(j.done(), "{j:?}");
        assert_eq!(j.minutes_total, 20);
        assert_eq!(
            (j.minutes_compared, j.rows_corrected, j.events_read),
            (2, 0, 2)
        );
        assert_eq!(j.minutes_empty, 18);
        assert!(job(&s, id + 1).unwrap().is_none());
        // Jobs beyond the limit: refused while running.
        let one = Settings {
            jobs_max: 1,
            ..Settings::default()
        };
        let _ = create_job(&s, &one, m0, m1, now).unwrap().unwrap();
        assert!(create_job(&s, &one, m0, m1, now).unwrap().is_err());
    }

    #[test]
    fn a_restarted_reconciler_resumes_from_the_store() {
        let (_d, s, mut r) = setup(0);
        let (mut a, mut b) = (Gw::new("gwa"), Gw::new("gwb"));
        for i in 0..3 {
            let id = format!("c{i}");
            a.click(&id, T + 1000 + i, Verdict::Accepted);
            b.click(&id, T + 30_000 + i, Verdict::Accepted);
            a.click(&format!("d{i}"), T + 61_000 + i, Verdict::Accepted);
        }
        let now = T + 400_000;
        a.ship(&s, now);
        b.ship(&s, now);
        // One minute, then the process is gone (no state but the store's).
        let mut first = None;
        for _ in 0..10 {
            if let Turn::Worked(o) = r.turn(now).unwrap() {
                first = Some(o);
                break;
            }
        }
        assert!(matches!(
            first,
            Some(MinuteOutcome::Reconciled { minute: M, .. })
        ));
        drop(r);
        let mut r2 = Reconciler::new(
            s.clone(),
            Settings {
                dedup_horizon_ms: 300_000,
                ..Settings::default()
            },
            Arc::new(ReconcileStats::default()),
        );
        let done = drive(&mut r2, now);
        assert!(
            matches!(done[..], [MinuteOutcome::Reconciled { minute, .. }] if minute == M + 1),
            "only the minute not yet done: {done:?}"
        );
        assert_eq!(point(&s, M, now).0.clicks, 3);
        assert_eq!(point(&s, M + 1, now).0.clicks, 3);
    }
}
