//! Recounts minutes from the raw audit trail, with click-id dedup across every
//! PoP, and compares the result with the real-time rows.
//!
//! The real-time rows dedup within one gateway host; a click id accepted at
//! two PoPs counts twice there and once here. Dedup here is within the
//! recounted range: a click id first seen before it is not known.

use std::collections::{BTreeMap, HashSet};

use wire::record::{Counts, EventKind, RowKey, Verdict};

use crate::store::{Store, StoreError};

/// One row where the recount differs from the real-time row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Diff {
    pub key: RowKey,
    pub realtime: Counts,
    pub recount: Counts,
}

#[derive(Debug, Default)]
pub struct Report {
    pub rows_compared: usize,
    pub events_read: u64,
    pub diffs: Vec<Diff>,
}

/// Recounts minutes `[m0, m1)` from the audit store.
pub fn recount(
    store: &Store,
    m0: u32,
    m1: u32,
) -> Result<(BTreeMap<RowKey, Counts>, u64), StoreError> {
    let (h0, h1) = (m0 / 60, m1.div_ceil(60));
    let mut seen_clicks = HashSet::new();
    let mut seen_impressions = HashSet::new();
    let mut out: BTreeMap<RowKey, Counts> = BTreeMap::new();
    let mut n = 0;
    store.audit_events(h0, h1, |_, e| {
        let minute = wire::minute_of(e.event_ms);
        if !(m0..m1).contains(&minute) {
            return;
        }
        n += 1;
        let c = out.entry(RowKey::of(e)).or_default();
        match (e.verdict, e.kind) {
            (Verdict::Accepted, EventKind::Click) => {
                if seen_clicks.insert(e.click_id.to_owned()) {
                    c.add_event(e.kind, e.verdict, e.cost_micros);
                } else {
                    c.duplicates += 1;
                }
            }
            (Verdict::Accepted, EventKind::Impression) => {
                if seen_impressions.insert(e.click_id.to_owned()) {
                    c.add_event(e.kind, e.verdict, e.cost_micros);
                } else {
                    c.duplicates += 1;
                }
            }
            _ => c.add_event(e.kind, e.verdict, e.cost_micros),
        }
    })?;
    Ok((out, n))
}

/// Compares the recount of `[m0, m1)` with the rows; with `write`, replaces
/// each differing row by its recount (a new version).
pub fn reconcile(store: &Store, m0: u32, m1: u32, write: bool) -> Result<Report, StoreError> {
    let (recounted, events_read) = recount(store, m0, m1)?;
    let realtime = store.rows_in(m0, m1)?;
    let mut keys: Vec<&RowKey> = recounted.keys().chain(realtime.keys()).collect();
    keys.sort();
    keys.dedup();
    let mut report = Report {
        rows_compared: keys.len(),
        events_read,
        diffs: Vec::new(),
    };
    for k in keys {
        let rt = realtime.get(k).map(|r| r.counts).unwrap_or_default();
        let rc = recounted.get(k).copied().unwrap_or_default();
        if rt != rc {
            report.diffs.push(Diff {
                key: k.clone(),
                realtime: rt,
                recount: rc,
            });
        }
    }
    if write && !report.diffs.is_empty() {
        let fixes: Vec<(RowKey, Counts)> = report
            .diffs
            .iter()
            .map(|d| (d.key.clone(), d.recount))
            .collect();
        store.write_corrections(&fixes)?;
    }
    Ok(report)
}
