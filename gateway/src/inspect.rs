//! `clickgate-gateway inspect`: what is in a data directory's logs, read-only,
//! without starting the server (and without repairing anything).

use std::collections::BTreeMap;
use std::fmt::Write;
use std::path::Path;

use anyhow::Context;
use wire::record::{Counts, EventRef, PartialRecord, RowKey, Verdict};
use wire::segment::{self, RecordType, SegmentHeader, Tail};

use crate::log::{list_segments, map_readonly};

#[derive(Debug, Default, Clone, Copy)]
pub struct Options {
    /// One line per event record.
    pub events: bool,
}

/// Per-minute totals summed over devices and countries.
type MinuteKey = (u32, String, String, String);

pub fn inspect(data: &Path, opts: Options) -> anyhow::Result<String> {
    let mut out = String::new();
    let mut shards: Vec<(u16, std::path::PathBuf)> = std::fs::read_dir(data)
        .with_context(|| format!("reading {}", data.display()))?
        .flatten()
        .filter_map(|e| {
            let n = e
                .file_name()
                .to_str()?
                .strip_prefix("shard-")?
                .parse()
                .ok()?;
            Some((n, e.path()))
        })
        .collect();
    shards.sort();
    let _ = writeln!(
        out,
        "data dir: {} ({} shards)",
        data.display(),
        shards.len()
    );
    let mut minutes: BTreeMap<MinuteKey, Counts> = BTreeMap::new();
    let mut total = Counts::default();
    let mut all_match = true;
    for (shard, dir) in &shards {
        let segs = list_segments(dir)?;
        let mut events = 0u64;
        let mut partials = 0u64;
        let mut last_partial: Option<PartialRecord> = None;
        let mut covered: BTreeMap<RowKey, Counts> = BTreeMap::new();
        let mut recount: BTreeMap<RowKey, Counts> = BTreeMap::new();
        let mut pending: Vec<(u64, RowKey, Counts)> = Vec::new();
        let mut seg_lines = String::new();
        for (base, path) in &segs {
            let map = map_readonly(path)?;
            let header = match SegmentHeader::decode(&map) {
                Ok(h) => h,
                Err(e) => {
                    let _ = writeln!(seg_lines, "  {}  BAD HEADER: {e}", path.display());
                    continue;
                }
            };
            let scan = segment::scan(&map, header.base_seq);
            let tail = match scan.tail {
                Tail::Clean => "clean".to_string(),
                Tail::Torn => "torn (cut on next start)".to_string(),
                Tail::Corrupt { at, resumes_at } => {
                    format!("CORRUPT at byte {at}, whole frames resume at {resumes_at}")
                }
            };
            let _ = writeln!(
                seg_lines,
                "  {:020}.seg  gateway {}  base seq {}  records {}  bytes {}/{}  tail {}",
                base,
                header.gateway_id,
                header.base_seq,
                scan.frames,
                scan.end,
                map.len(),
                tail
            );
            for f in segment::frames(&map, scan.end) {
                match RecordType::from_u8(f.ty) {
                    Some(RecordType::Event) => {
                        let e = EventRef::decode(f.payload)
                            .with_context(|| format!("event at seq {}", f.seq))?;
                        events += 1;
                        let k = RowKey::of(&e);
                        let mut c = Counts::default();
                        c.add_event(e.kind, e.verdict, e.cost_micros);
                        pending.push((f.seq, k.clone(), c));
                        recount.entry(k.clone()).or_default().merge(&c);
                        let mk = (k.minute, k.advertiser_id, k.campaign_id, k.ad_id);
                        minutes.entry(mk).or_default().merge(&c);
                        total.merge(&c);
                        if opts.events {
                            let _ = writeln!(
                                out,
                                "event shard={shard} seq={} kind={} verdict={} click_id={} minute={} cost_micros={} client={}",
                                f.seq,
                                e.kind.as_str(),
                                e.verdict.as_str(),
                                e.click_id,
                                wire::minute_of(e.event_ms),
                                e.cost_micros,
                                std::net::Ipv6Addr::from(e.client_ip).to_canonical()
                            );
                        }
                        let _ = Verdict::Accepted;
                    }
                    Some(RecordType::Partial) => {
                        let p = PartialRecord::decode(f.payload)
                            .with_context(|| format!("partial at seq {}", f.seq))?;
                        partials += 1;
                        for (k, c) in &p.rows {
                            covered.entry(k.clone()).or_default().merge(c);
                        }
                        pending.retain(|(s, _, _)| *s > p.to_seq);
                        last_partial = Some(p);
                    }
                    None => {
                        let _ =
                            writeln!(seg_lines, "  unknown record type {} at seq {}", f.ty, f.seq);
                    }
                }
            }
        }
        // Partials must equal the recount of the events they cover.
        for (_, k, c) in &pending {
            if let Some(e) = recount.get_mut(k) {
                e.clicks -= c.clicks;
                e.impressions -= c.impressions;
                e.spend_micros -= c.spend_micros;
                e.duplicates -= c.duplicates;
                e.invalid -= c.invalid;
            }
        }
        recount.retain(|_, c| *c != Counts::default());
        let matches = recount == covered;
        all_match &= matches;
        let _ = writeln!(
            out,
            "shard {shard}: {} segments, {events} events, {partials} partials; partials cover seq (0, {}], {} events after the last partial; partials equal recount: {}",
            segs.len(),
            last_partial.as_ref().map_or(0, |p| p.to_seq),
            pending.len(),
            if matches { "yes" } else { "NO" }
        );
        out.push_str(&seg_lines);
    }
    let _ = writeln!(
        out,
        "\n{:<18} {:<14} {:<14} {:<14} {:>8} {:>11} {:>16} {:>10} {:>8}",
        "minute (UTC)",
        "advertiser",
        "campaign",
        "ad",
        "clicks",
        "impressions",
        "spend",
        "duplicates",
        "invalid"
    );
    for ((m, adv, camp, ad), c) in &minutes {
        let _ = writeln!(
            out,
            "{:<18} {:<14} {:<14} {:<14} {:>8} {:>11} {:>16} {:>10} {:>8}",
            minute_label(*m),
            adv,
            camp,
            ad,
            c.clicks,
            c.impressions,
            micros(c.spend_micros),
            c.duplicates,
            c.invalid
        );
    }
    let _ = writeln!(
        out,
        "\ntotals: clicks={} impressions={} spend={} duplicates={} invalid={}",
        total.clicks,
        total.impressions,
        micros(total.spend_micros),
        total.duplicates,
        total.invalid
    );
    let _ = writeln!(
        out,
        "partials consistent: {}",
        if all_match { "yes" } else { "NO" }
    );
    Ok(out)
}

fn micros(m: u64) -> String {
    format!("{}.{:06}", m / 1_000_000, m % 1_000_000)
}

fn minute_label(m: u32) -> String {
    let s = wire::time::http_date(m as i64 * 60);
    // "Mon, 23 Nov 2026 01:10:00 GMT" -> "23 Nov 2026 01:10"
    s.get(5..22).unwrap_or(&s).to_string()
}
