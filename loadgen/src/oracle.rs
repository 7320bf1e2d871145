//! The exact-count oracle: what the gateway acknowledged, and the comparison
//! with what the pipeline counted.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::Path;

use serde::{Deserialize, Serialize};
use wire::record::{EventKind, EventRef, Source, Verdict};
use wire::segment::RecordType;

use crate::engine::{Answer, BatchVerdict};
use crate::workload::{Meta, Shape};

/// Written by `loadgen run --oracle FILE`, read by `loadgen verify`.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct Oracle {
    /// Click ids acknowledged (302, or a batch item accepted/duplicate/invalid),
    /// with what was signed for them.
    pub acknowledged: BTreeMap<String, Expected>,
    /// Click ids whose every send ended without an answer: they may or may not
    /// be in the log.
    pub unknown: Vec<String>,
    /// Answers that contradict the workload (a bad signature answered 302, a
    /// valid click refused), by description.
    pub wrong_answers: BTreeMap<String, u64>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Expected {
    pub advertiser_id: String,
    pub campaign_id: String,
    pub ad_id: String,
    pub cost_micros: u64,
    /// The event-time minute when it is known in advance (batched events use
    /// the signed timestamp); browser clicks count in their receive minute.
    pub minute: Option<u32>,
}

impl Oracle {
    pub fn record(&mut self, m: &Meta, a: Answer, pending_unknown: &mut HashSet<String>) {
        let is_valid = matches!(m.shape, Shape::Valid | Shape::Duplicate | Shape::Late);
        let ok = match a {
            Answer::Status(302) => true,
            Answer::BatchItem(
                BatchVerdict::Accepted | BatchVerdict::Duplicate | BatchVerdict::Invalid,
            ) => true,
            Answer::Unknown => {
                if is_valid {
                    pending_unknown.insert(m.click_id.clone());
                }
                return;
            }
            // Back-pressure is a legitimate answer for anything.
            Answer::Status(429 | 503) | Answer::BatchItem(BatchVerdict::Unavailable) => return,
            _ => false,
        };
        if m.shape == Shape::Fixed {
            return;
        }
        match (is_valid, ok) {
            (true, true) => {
                self.acknowledged
                    .entry(m.click_id.clone())
                    .or_insert_with(|| Expected {
                        advertiser_id: m.advertiser_id.clone(),
                        campaign_id: m.campaign_id.clone(),
                        ad_id: m.ad_id.clone(),
                        cost_micros: m.cost_micros,
                        minute: (m.shape == Shape::Late).then(|| wire::minute_of(m.ts * 1000)),
                    });
            }
            (false, true) => {
                *self
                    .wrong_answers
                    .entry(format!("{:?} acknowledged ({a:?})", m.shape))
                    .or_insert(0) += 1
            }
            (true, false) => {
                *self
                    .wrong_answers
                    .entry(format!("valid click refused ({a:?})"))
                    .or_insert(0) += 1
            }
            (false, false) => {}
        }
    }

    /// Adds what another run against the same gateway acknowledged: a click
    /// acknowledged by either run was acknowledged; one unknown in one run
    /// and acknowledged in the other is known.
    pub fn merge(&mut self, o: Oracle) {
        for (id, e) in o.acknowledged {
            self.acknowledged.entry(id).or_insert(e);
        }
        let mut unknown: Vec<String> = self
            .unknown
            .drain(..)
            .chain(o.unknown)
            .filter(|id| !self.acknowledged.contains_key(id))
            .collect();
        unknown.sort();
        unknown.dedup();
        self.unknown = unknown;
        for (k, n) in o.wrong_answers {
            *self.wrong_answers.entry(k).or_insert(0) += n;
        }
    }

    pub fn finish(&mut self, pending_unknown: HashSet<String>) {
        let mut u: Vec<String> = pending_unknown
            .into_iter()
            .filter(|id| !self.acknowledged.contains_key(id))
            .collect();
        u.sort();
        self.unknown = u;
    }
}

/// One click as the log holds it.
#[derive(Debug, Clone)]
pub struct Counted {
    pub advertiser_id: String,
    pub campaign_id: String,
    pub ad_id: String,
    pub cost_micros: u64,
    pub minute: u32,
}

/// One click record of a gateway's log, whatever its verdict: what the
/// cross-PoP rule reads.
#[derive(Debug, Clone)]
pub struct ClickRecord {
    pub gateway: String,
    pub shard: u16,
    pub seq: u64,
    pub verdict: Verdict,
    /// A browser click (GET), which the velocity rule counts.
    pub get: bool,
    pub event_ms: i64,
    pub client_ip: [u8; 16],
    pub click_id: String,
    pub advertiser_id: String,
    pub campaign: String,
    pub ad_id: String,
    pub cost_micros: u64,
}

/// Reads every click record (verdict accepted or invalid: the click's one
/// billable-or-flagged record) from a gateway data directory.
pub fn read_gateway_log(data: &Path) -> anyhow::Result<HashMap<String, Vec<Counted>>> {
    let mut out: HashMap<String, Vec<Counted>> = HashMap::new();
    for r in read_click_records(data)? {
        if r.verdict == Verdict::Duplicate {
            continue;
        }
        out.entry(r.click_id.clone()).or_default().push(Counted {
            advertiser_id: r.advertiser_id.clone(),
            campaign_id: r.campaign.clone(),
            ad_id: r.ad_id.clone(),
            cost_micros: r.cost_micros,
            minute: wire::minute_of(r.event_ms),
        });
    }
    Ok(out)
}

/// Every click record of a gateway data directory, duplicates included.
pub fn read_click_records(data: &Path) -> anyhow::Result<Vec<ClickRecord>> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(data)? {
        let dir = entry?.path();
        let Some(shard) = dir
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.strip_prefix("shard-"))
            .and_then(|n| n.parse::<u16>().ok())
        else {
            continue;
        };
        for seg in wire::layout::list_segments(&dir)? {
            // Read, not mapped: a segment is a few MiB to a few hundred, and
            // the oracle reads each once. Compressed or not, the same frames.
            let bytes = std::fs::read(&seg.path)?;
            let mut frames = Vec::new();
            let h = wire::segz::read_file(&bytes, seg.compressed, |f| {
                if f.ty == RecordType::Event as u8 {
                    frames.push((f.seq, f.payload.to_vec()));
                }
            })
            .map_err(|e| anyhow::anyhow!("{}: {e}", seg.path.display()))?;
            for (seq, payload) in &frames {
                let e = EventRef::decode(payload)?;
                if e.kind != EventKind::Click {
                    continue;
                }
                out.push(ClickRecord {
                    gateway: h.gateway_id.clone(),
                    shard,
                    seq: *seq,
                    verdict: e.verdict,
                    get: e.source == Source::Get,
                    event_ms: e.event_ms,
                    client_ip: e.client_ip,
                    click_id: e.click_id.into(),
                    advertiser_id: e.advertiser_id.into(),
                    campaign: e.campaign_id.into(),
                    ad_id: e.ad_id.into(),
                    cost_micros: e.cost_micros,
                });
            }
        }
    }
    Ok(out)
}

/// What the aggregator must bill once reconciled, per (advertiser, ad,
/// minute) in clicks and spend: the cross-PoP rule (docs/DESIGN.md, "Across
/// PoPs") applied to the click records of every gateway, written here from
/// its statement, click id by click id, independently of the aggregator's
/// minute-by-minute implementation.
///
/// A copy its gateway marked duplicate never carries the verdict. Another
/// copy carries it when no such copy is earlier in its minute (event time,
/// gateway id, shard, seq) and none lies in the `horizon_min - 1` minutes
/// before. Its verdict is its gateway's, except that a GET click of an
/// (address, ad) stream seen at more than one gateway in the minute is
/// invalid past the stream's `velocity_max`-th click in that order.
pub fn billed_across_pops(
    recs: &[ClickRecord],
    horizon_min: u32,
    velocity_max: u32,
) -> crate::aggcheck::Totals {
    type Order<'a> = (i64, &'a str, u16, u64);
    let order = |r: &ClickRecord| -> (i64, String, u16, u64) {
        (r.event_ms, r.gateway.clone(), r.shard, r.seq)
    };
    let minute = |r: &ClickRecord| wire::minute_of(r.event_ms);
    let mut too_fast: HashSet<(String, u16, u64)> = HashSet::new();
    if velocity_max > 0 {
        let mut streams: HashMap<([u8; 16], &str, u32), Vec<&ClickRecord>> = HashMap::new();
        for r in recs.iter().filter(|r| r.get) {
            streams
                .entry((r.client_ip, r.ad_id.as_str(), minute(r)))
                .or_default()
                .push(r);
        }
        for s in streams.values_mut() {
            let gws: HashSet<&str> = s.iter().map(|r| r.gateway.as_str()).collect();
            if gws.len() < 2 {
                continue;
            }
            s.sort_by_key(|r| -> Order<'_> { (r.event_ms, r.gateway.as_str(), r.shard, r.seq) });
            for r in s.iter().skip(velocity_max as usize) {
                too_fast.insert((r.gateway.clone(), r.shard, r.seq));
            }
        }
    }
    let mut by_id: HashMap<&str, Vec<&ClickRecord>> = HashMap::new();
    for r in recs.iter().filter(|r| r.verdict != Verdict::Duplicate) {
        by_id.entry(r.click_id.as_str()).or_default().push(r);
    }
    let mut out = crate::aggcheck::Totals::new();
    for copies in by_id.values() {
        for c in copies {
            let m = minute(c);
            let shadowed = copies.iter().any(|o| {
                let om = minute(o);
                (om == m && order(o) < order(c)) || (om < m && om + horizon_min > m)
            });
            if shadowed || c.verdict != Verdict::Accepted {
                continue;
            }
            if too_fast.contains(&(c.gateway.clone(), c.shard, c.seq)) {
                continue;
            }
            let e = out
                .entry((c.advertiser_id.clone(), c.ad_id.clone(), m))
                .or_default();
            e.0 += 1;
            e.1 += c.cost_micros;
        }
    }
    out
}

#[derive(Debug, Default, Serialize)]
pub struct Verdicts {
    pub expected: u64,
    pub counted: u64,
    pub missing: Vec<String>,
    pub duplicated: Vec<String>,
    /// Counted, never acknowledged, and not among the unknown outcomes.
    pub unexpected: Vec<String>,
    /// Counted with other dimensions, cost or (for batched events) minute than signed.
    pub mismatched: Vec<String>,
    pub unknown_outcome_counted: u64,
    pub unknown_outcome_not_counted: u64,
    pub wrong_answers: u64,
    /// (advertiser, campaign, ad) -> (expected clicks, counted clicks, expected spend, counted spend)
    pub per_ad: BTreeMap<String, (u64, u64, u64, u64)>,
}

impl Verdicts {
    pub fn ok(&self) -> bool {
        self.missing.is_empty()
            && self.duplicated.is_empty()
            && self.unexpected.is_empty()
            && self.mismatched.is_empty()
            && self.wrong_answers == 0
    }
}

pub fn compare(o: &Oracle, counted: &HashMap<String, Vec<Counted>>) -> Verdicts {
    let mut v = Verdicts {
        expected: o.acknowledged.len() as u64,
        wrong_answers: o.wrong_answers.values().sum(),
        ..Default::default()
    };
    let unknown: HashSet<&String> = o.unknown.iter().collect();
    for (id, recs) in counted {
        let Some(e) = o.acknowledged.get(id) else {
            if unknown.contains(id) {
                v.unknown_outcome_counted += 1;
            } else {
                v.unexpected.push(id.clone());
            }
            continue;
        };
        v.counted += 1;
        if recs.len() > 1 {
            v.duplicated.push(id.clone());
        }
        let c = &recs[0];
        let same = c.advertiser_id == e.advertiser_id
            && c.campaign_id == e.campaign_id
            && c.ad_id == e.ad_id
            && c.cost_micros == e.cost_micros
            && e.minute.is_none_or(|m| m == c.minute);
        if !same {
            v.mismatched.push(id.clone());
        }
        let k = format!("{}/{}/{}", c.advertiser_id, c.campaign_id, c.ad_id);
        let t = v.per_ad.entry(k).or_default();
        t.1 += recs.len() as u64;
        t.3 += recs.iter().map(|r| r.cost_micros).sum::<u64>();
    }
    for (id, e) in &o.acknowledged {
        let k = format!("{}/{}/{}", e.advertiser_id, e.campaign_id, e.ad_id);
        let t = v.per_ad.entry(k).or_default();
        t.0 += 1;
        t.2 += e.cost_micros;
        if !counted.contains_key(id) {
            v.missing.push(id.clone());
        }
    }
    v.unknown_outcome_not_counted = o.unknown.len() as u64 - v.unknown_outcome_counted;
    v.missing.sort();
    v.duplicated.sort();
    v.unexpected.sort();
    v.mismatched.sort();
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta(id: &str, shape: Shape) -> Meta {
        Meta {
            shape,
            click_id: id.into(),
            advertiser_id: "a".into(),
            campaign_id: "c".into(),
            ad_id: "d".into(),
            cost_micros: 5,
            ts: 1_800_000_000,
        }
    }

    fn counted(ids: &[&str]) -> HashMap<String, Vec<Counted>> {
        let mut m: HashMap<String, Vec<Counted>> = HashMap::new();
        for id in ids {
            m.entry(id.to_string()).or_default().push(Counted {
                advertiser_id: "a".into(),
                campaign_id: "c".into(),
                ad_id: "d".into(),
                cost_micros: 5,
                minute: 1,
            });
        }
        m
    }

    #[test]
    fn exact_match_passes_and_every_kind_of_difference_fails() {
        let mut o = Oracle::default();
        let mut unk = HashSet::new();
        o.record(&meta("x", Shape::Valid), Answer::Status(302), &mut unk);
        o.record(&meta("x", Shape::Duplicate), Answer::Status(302), &mut unk);
        o.record(&meta("y", Shape::Valid), Answer::Status(302), &mut unk);
        o.record(&meta("z", Shape::Valid), Answer::Unknown, &mut unk);
        o.record(
            &meta("b", Shape::BadSignature),
            Answer::Status(403),
            &mut unk,
        );
        o.finish(unk);
        assert_eq!(o.acknowledged.len(), 2);
        assert_eq!(o.unknown, vec!["z".to_string()]);
        assert!(compare(&o, &counted(&["x", "y"])).ok());
        assert!(compare(&o, &counted(&["x", "y", "z"])).ok());
        let v = compare(&o, &counted(&["x"]));
        assert_eq!(v.missing, vec!["y".to_string()]);
        assert!(!v.ok());
        assert_eq!(
            compare(&o, &counted(&["x", "y", "y"])).duplicated,
            vec!["y".to_string()]
        );
        assert_eq!(
            compare(&o, &counted(&["x", "y", "q"])).unexpected,
            vec!["q".to_string()]
        );
        let mut o2 = Oracle::default();
        let mut unk = HashSet::new();
        o2.record(
            &meta("b", Shape::BadSignature),
            Answer::Status(302),
            &mut unk,
        );
        assert!(!compare(&o2, &counted(&[])).ok());
    }
}
