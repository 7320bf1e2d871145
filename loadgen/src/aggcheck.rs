//! Compares what the aggregator's query API counted with what the gateway
//! logs hold: clicks and spend per (advertiser, ad, minute), exactly.
//!
//! The logs are compared with the oracle by click id first (`oracle::compare`),
//! and what the aggregator must bill is computed from them by the cross-PoP
//! rule (`oracle::billed_across_pops`), so equality here means the aggregator
//! counted every acknowledged click once, across every gateway given.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use anyhow::{anyhow, Context};

/// (advertiser, ad, minute).
pub type Key = (String, String, u32);
/// (clicks, spend micros).
pub type Sums = (u64, u64);
/// Key -> sums.
pub type Totals = BTreeMap<Key, Sums>;

/// One HTTP/1.1 GET on loopback; returns (status, body).
fn get(addr: SocketAddr, path: &str, token: &str) -> anyhow::Result<(u16, Vec<u8>)> {
    exchange(
        addr,
        &format!(
            "GET {path} HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {token}\r\nConnection: close\r\n\r\n"
        ),
    )
}

/// One HTTP/1.1 POST of `body` on loopback; returns (status, body).
fn post(addr: SocketAddr, path: &str, body: &str) -> anyhow::Result<(u16, Vec<u8>)> {
    exchange(
        addr,
        &format!(
            "POST {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        ),
    )
}

fn exchange(addr: SocketAddr, request: &str) -> anyhow::Result<(u16, Vec<u8>)> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    s.set_read_timeout(Some(Duration::from_secs(30)))?;
    s.write_all(request.as_bytes())?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf)?;
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut r = httparse::Response::new(&mut headers);
    let httparse::Status::Complete(n) = r.parse(&buf)? else {
        return Err(anyhow!("incomplete HTTP answer"));
    };
    let chunked = r.headers.iter().any(|h| {
        h.name.eq_ignore_ascii_case("transfer-encoding") && h.value.eq_ignore_ascii_case(b"chunked")
    });
    let status = r.code.unwrap_or(0);
    let body = if chunked {
        dechunk(&buf[n..])?
    } else {
        buf[n..].to_vec()
    };
    Ok((status, body))
}

fn dechunk(mut b: &[u8]) -> anyhow::Result<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let line_end = b
            .windows(2)
            .position(|w| w == b"\r\n")
            .ok_or_else(|| anyhow!("bad chunk"))?;
        let size = usize::from_str_radix(
            std::str::from_utf8(&b[..line_end])?
                .split(';')
                .next()
                .unwrap()
                .trim(),
            16,
        )?;
        b = &b[line_end + 2..];
        if size == 0 {
            return Ok(out);
        }
        out.extend_from_slice(b.get(..size).ok_or_else(|| anyhow!("short chunk"))?);
        b = &b[size + 2..];
    }
}

/// Reads the aggregator's per-minute totals for every advertiser and minute
/// range in `expected`, and how many points in those ranges are not yet
/// `reconciled`.
pub fn fetch_states(
    addr: SocketAddr,
    token: &str,
    expected: &Totals,
) -> anyhow::Result<(Totals, u64)> {
    let mut not_reconciled = 0;
    let mut ranges: BTreeMap<&str, (u32, u32)> = BTreeMap::new();
    for (adv, _, m) in expected.keys() {
        let r = ranges.entry(adv).or_insert((*m, *m));
        r.0 = r.0.min(*m);
        r.1 = r.1.max(*m);
    }
    let mut got = Totals::new();
    for (adv, (m0, m1)) in ranges {
        let path = format!(
            "/api/v1/advertisers/analytics?advertiser_id={adv}&start_time={}&end_time={}&granularity=1m",
            m0 as i64 * 60,
            (m1 as i64 + 1) * 60
        );
        let (status, body) = get(addr, &path, token).with_context(|| format!("GET {path}"))?;
        if status != 200 {
            return Err(anyhow!(
                "GET {path}: {status} {}",
                String::from_utf8_lossy(&body)
            ));
        }
        let v: serde_json::Value = serde_json::from_slice(&body)?;
        for p in v["series"]
            .as_array()
            .ok_or_else(|| anyhow!("no series in the answer"))?
        {
            let ts = p["timestamp"].as_str().unwrap_or_default();
            let minute = (wire::time::parse_time(ts).map_err(anyhow::Error::msg)? / 60) as u32;
            if p["state"].as_str() != Some("reconciled") {
                not_reconciled += 1;
            }
            let clicks = p["clicks"].as_u64().unwrap_or(0);
            let spend = p["total_spend_micros"].as_u64().unwrap_or(0);
            if clicks > 0 || spend > 0 {
                let ad = p["ad_id"].as_str().unwrap_or_default().to_owned();
                let e = got.entry((adv.to_owned(), ad, minute)).or_default();
                e.0 += clicks;
                e.1 += spend;
            }
        }
    }
    Ok((got, not_reconciled))
}

/// The totals ClickHouse's final rows hold, per (advertiser, ad, minute),
/// read over its HTTP interface from the sink's table.
pub fn fetch_clickhouse(addr: SocketAddr, table: &str) -> anyhow::Result<Totals> {
    let q = format!(
        "SELECT advertiser_id, ad_id, intDiv(toUInt32(minute), 60), sum(clicks), sum(spend_micros) \
         FROM {table} FINAL GROUP BY advertiser_id, ad_id, minute FORMAT TSV"
    );
    let (status, body) = post(addr, "/", &q)?;
    let text = String::from_utf8_lossy(&body);
    if status != 200 {
        return Err(anyhow!("ClickHouse: {status} {}", text.trim()));
    }
    let mut got = Totals::new();
    for line in text.lines().filter(|l| !l.is_empty()) {
        let f: Vec<&str> = line.split('\t').collect();
        if f.len() != 5 {
            return Err(anyhow!("unexpected ClickHouse row {line:?}"));
        }
        let (clicks, spend): (u64, u64) = (f[3].parse()?, f[4].parse()?);
        if clicks > 0 || spend > 0 {
            let e = got
                .entry((f[0].to_owned(), f[1].to_owned(), f[2].parse()?))
                .or_default();
            e.0 += clicks;
            e.1 += spend;
        }
    }
    Ok(got)
}

/// The totals a Kafka consumer's rows hold (highest revision per row key,
/// as `kafka_read.py` keeps them), per (advertiser, ad, minute).
pub fn kafka_totals(dump: &serde_json::Value) -> anyhow::Result<Totals> {
    let rows = dump["rows"]
        .as_object()
        .ok_or_else(|| anyhow!("no rows in the Kafka dump"))?;
    let mut got = Totals::new();
    for r in rows.values() {
        let n = |f: &str| r[f].as_u64().ok_or_else(|| anyhow!("row without {f}: {r}"));
        let (clicks, spend) = (n("clicks")?, n("spend_micros")?);
        if clicks > 0 || spend > 0 {
            let s = |f: &str| r[f].as_str().unwrap_or_default().to_owned();
            let e = got
                .entry((s("advertiser_id"), s("ad_id"), (n("minute")? / 60) as u32))
                .or_default();
            e.0 += clicks;
            e.1 += spend;
        }
    }
    Ok(got)
}

/// Raw click events in Kafka against the click records of the logs, by
/// event (gateway, shard, seq).
#[derive(Debug, Default)]
pub struct KafkaEvents {
    pub expected: usize,
    pub found: usize,
    pub missing: Vec<String>,
    pub unexpected: Vec<String>,
    /// Events whose key is not their click id (accepted) or click id and
    /// verdict (the rest).
    pub wrong_keys: Vec<String>,
    pub partitions_ok: bool,
}

impl KafkaEvents {
    pub fn ok(&self) -> bool {
        self.missing.is_empty()
            && self.unexpected.is_empty()
            && self.wrong_keys.is_empty()
            && self.partitions_ok
    }
}

pub fn kafka_events(
    dump: &serde_json::Value,
    records: &[crate::oracle::ClickRecord],
) -> anyhow::Result<KafkaEvents> {
    let events = dump["events"]
        .as_object()
        .ok_or_else(|| anyhow!("no events in the Kafka dump"))?;
    let mut v = KafkaEvents {
        partitions_ok: dump["partitions_ok"].as_bool() == Some(true),
        ..KafkaEvents::default()
    };
    let mut seen = BTreeSet::new();
    for r in records {
        let id = format!("{}/{}/{}", r.gateway, r.shard, r.seq);
        v.expected += 1;
        match events.get(&id) {
            None => v.missing.push(id.clone()),
            Some(e) => {
                v.found += 1;
                let key = match r.verdict {
                    wire::record::Verdict::Accepted => r.click_id.clone(),
                    other => format!("{}#{}", r.click_id, other.as_str()),
                };
                if e["key"].as_str() != Some(key.as_str()) {
                    v.wrong_keys
                        .push(format!("{id}: {} (want {key})", e["key"]));
                }
            }
        }
        seen.insert(id);
    }
    for (id, e) in events {
        if e["kind"] == "click" && !seen.contains(id) {
            v.unexpected.push(id.clone());
        }
    }
    Ok(v)
}

/// The keys where the two differ, with (expected, counted).
pub fn diff(expected: &Totals, got: &Totals) -> Vec<(Key, Sums, Sums)> {
    let keys: BTreeSet<_> = expected.keys().chain(got.keys()).collect();
    keys.into_iter()
        .filter_map(|k| {
            let e = expected.get(k).copied().unwrap_or_default();
            let g = got.get(k).copied().unwrap_or_default();
            (e != g).then(|| (k.clone(), e, g))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dechunks_and_diffs() {
        assert_eq!(
            dechunk(b"3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n").unwrap(),
            b"abcde"
        );
        let mut e = Totals::new();
        e.insert(("a".into(), "x".into(), 1), (2, 20));
        let mut g = e.clone();
        assert!(diff(&e, &g).is_empty());
        g.insert(("a".into(), "y".into(), 1), (1, 1));
        g.insert(("a".into(), "x".into(), 1), (3, 30));
        assert_eq!(diff(&e, &g).len(), 2);
    }
}
