//! `clickgate-gateway inspect`: what is in a data directory's logs, read-only,
//! without starting the server (and without repairing anything).

use std::collections::BTreeMap;
use std::fmt::Write;
use std::path::Path;

use anyhow::Context;
use wire::record::{Counts, EventRef, PartialRecord, RowKey};
use wire::segment::{Frame, RecordType, Tail};

use crate::log::list_segments;

#[derive(Debug, Default, Clone, Copy)]
pub struct Options {
    /// One line per event record.
    pub events: bool,
    /// The shard's disk budget, for the buffer left (`log.disk_budget_bytes`).
    pub disk_budget_bytes: u64,
    /// Now, Unix ms (ages are reckoned from it).
    pub now_ms: i64,
}

/// Seconds of appends the buffer-left estimate averages.
const RATE_WINDOW_MS: i64 = 60_000;

/// Per-minute totals summed over devices and countries.
type MinuteKey = (u32, String, String, String);

/// A segment's bytes and whether they are compressed, or `None` when it is
/// gone. A running gateway may compress a sealed segment (its .segz replaces
/// the .seg) or recycle a shipped one between listing and reading.
fn read_segment(
    dir: &Path,
    seg: &wire::layout::SegmentFile,
) -> anyhow::Result<Option<(Vec<u8>, bool)>> {
    let mut tries = vec![(seg.path.clone(), seg.compressed)];
    if !seg.compressed {
        tries.push((wire::layout::segz_path(dir, seg.base_seq), true));
    }
    for (path, compressed) in tries {
        match std::fs::read(&path) {
            Ok(b) => return Ok(Some((b, compressed))),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e).context(format!("reading {}", path.display())),
        }
    }
    Ok(None)
}

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
        let mut unrecorded = 0u64;
        let mut seg_lines = String::new();
        let shipped = wire::layout::read_shipped(dir).unwrap_or(0);
        let (mut disk, mut unshipped_disk) = (0u64, 0u64);
        let (mut raw_z, mut disk_z) = (0u64, 0u64);
        let mut oldest_unshipped_ms: Option<i64> = None;
        // (receive ms, frame bytes) of recent events, for the append rate.
        let mut newest_ms = i64::MIN;
        let mut recent: Vec<(i64, u64)> = Vec::new();
        for (i, seg) in segs.iter().enumerate() {
            let Some((bytes, compressed)) = read_segment(dir, seg)? else {
                let _ = writeln!(
                    seg_lines,
                    "  {:020}  removed while reading (recycled)",
                    seg.base_seq
                );
                continue;
            };
            let mut failed: Option<anyhow::Error> = None;
            let mut on_frame = |f: &Frame<'_>| {
                if failed.is_some() {
                    return;
                }
                match RecordType::from_u8(f.ty) {
                    Some(RecordType::Event) => {
                        let e = match EventRef::decode(f.payload) {
                            Ok(e) => e,
                            Err(err) => {
                                failed = Some(anyhow::anyhow!("event at seq {}: {err}", f.seq));
                                return;
                            }
                        };
                        events += 1;
                        if f.seq > shipped && oldest_unshipped_ms.is_none() {
                            oldest_unshipped_ms = Some(e.receive_ms);
                        }
                        newest_ms = newest_ms.max(e.receive_ms);
                        recent.push((
                            e.receive_ms,
                            wire::segment::frame_len(f.payload.len()) as u64,
                        ));
                        if recent.len() > 1 << 16 && recent[0].0 < newest_ms - RATE_WINDOW_MS {
                            recent.retain(|(t, _)| *t >= newest_ms - RATE_WINDOW_MS);
                        }
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
                    }
                    Some(RecordType::Partial) => {
                        let p = match PartialRecord::decode(f.payload) {
                            Ok(p) => p,
                            Err(err) => {
                                failed = Some(anyhow::anyhow!("partial at seq {}: {err}", f.seq));
                                return;
                            }
                        };
                        partials += 1;
                        unrecorded += p.unrecorded.iter().map(|u| u.1).sum::<u64>();
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
            };
            let name = seg.path.file_name().and_then(|n| n.to_str()).unwrap_or("?");
            let summary = match wire::segz::read_file(&bytes, compressed, &mut on_frame) {
                Ok(s) => s,
                Err(e) => {
                    let _ = writeln!(seg_lines, "  {name}  DAMAGED: {e}");
                    continue;
                }
            };
            if let Some(e) = failed {
                return Err(e);
            }
            disk += bytes.len() as u64;
            let last = i + 1 == segs.len();
            if summary.last_seq.is_some_and(|l| l > shipped) || last {
                unshipped_disk += bytes.len() as u64;
            }
            if compressed {
                raw_z += summary.raw_bytes;
                disk_z += bytes.len() as u64;
            }
            let tail = match summary.tail {
                None => "compressed".to_string(),
                Some(Tail::Clean) => "clean".to_string(),
                Some(Tail::Torn) => "torn (cut on next start)".to_string(),
                Some(Tail::Corrupt { at, resumes_at }) => {
                    format!("CORRUPT at byte {at}, whole frames resume at {resumes_at}")
                }
            };
            let _ = writeln!(
                seg_lines,
                "  {name}  gateway {}  base seq {}  records {}  bytes {} of frames in {} on disk  tail {}",
                summary.gateway_id,
                summary.base_seq,
                summary.frames,
                summary.raw_bytes,
                bytes.len(),
                tail
            );
        }
        // What an outage that starts now would have to work with.
        let rate_raw = {
            let from = newest_ms.saturating_sub(RATE_WINDOW_MS);
            let b: u64 = recent.iter().filter(|(t, _)| *t >= from).map(|r| r.1).sum();
            let span = recent
                .iter()
                .find(|(t, _)| *t >= from)
                .map_or(0, |(t, _)| newest_ms - t)
                .max(1000);
            b as f64 * 1000.0 / span as f64
        };
        let disk_per_raw = if raw_z > 0 {
            disk_z as f64 / raw_z as f64
        } else {
            1.0
        };
        let left = opts.disk_budget_bytes.saturating_sub(unshipped_disk) as f64;
        let seconds_left = if rate_raw * disk_per_raw >= 1.0 {
            format!("{:.0}", left / (rate_raw * disk_per_raw))
        } else {
            "unbounded (nothing appended)".to_string()
        };
        let _ = writeln!(
            seg_lines,
            "  buffer: {disk} bytes on disk, {unshipped_disk} unshipped (shipped up to seq {shipped}) of a {} budget ({:.1}%); oldest unshipped event {}; compressed segments hold {:.1}x; at the last minute's rate ({:.0} bytes/s appended) {seconds_left} s left if nothing ships",
            opts.disk_budget_bytes,
            unshipped_disk as f64 * 100.0 / opts.disk_budget_bytes.max(1) as f64,
            oldest_unshipped_ms.map_or("none".to_string(), |t| format!("{:.0} s old", (opts.now_ms - t) as f64 / 1000.0)),
            1.0 / disk_per_raw,
            rate_raw
        );
        if unrecorded > 0 {
            let _ = writeln!(
                seg_lines,
                "  unrecorded redirects reported in partials: {unrecorded}"
            );
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
