//! How merged rows are keyed and stored, and UTC time helpers.
//!
//! A row key sorts by advertiser, then minute, so one advertiser's time range
//! is one range scan:
//!
//! ```text
//! adv_len u8 | advertiser | minute u32 BE | camp_len u8 | campaign | ad_len u8 | ad |
//! device u8 | country [2]
//! ```

use wire::record::{Counts, Device, RowKey};

/// The first key of `advertiser` at `minute` (inclusive bound of a scan).
pub fn prefix(advertiser: &str, minute: u32) -> Vec<u8> {
    let a = advertiser.as_bytes();
    let mut k = Vec::with_capacity(1 + a.len() + 4);
    k.push(a.len() as u8);
    k.extend_from_slice(a);
    k.extend_from_slice(&minute.to_be_bytes());
    k
}

pub fn encode_key(r: &RowKey) -> Vec<u8> {
    let mut k = prefix(&r.advertiser_id, r.minute);
    for s in [&r.campaign_id, &r.ad_id] {
        k.push(s.len() as u8);
        k.extend_from_slice(s.as_bytes());
    }
    k.push(r.device as u8);
    k.extend_from_slice(&r.country);
    k
}

pub fn decode_key(k: &[u8]) -> Option<RowKey> {
    fn s(k: &[u8], off: &mut usize) -> Option<String> {
        let n = *k.get(*off)? as usize;
        let v = std::str::from_utf8(k.get(*off + 1..*off + 1 + n)?).ok()?;
        *off += 1 + n;
        Some(v.to_owned())
    }
    let mut off = 0;
    let advertiser_id = s(k, &mut off)?;
    let minute = u32::from_be_bytes(k.get(off..off + 4)?.try_into().ok()?);
    off += 4;
    let campaign_id = s(k, &mut off)?;
    let ad_id = s(k, &mut off)?;
    let device = Device::from_u8(*k.get(off)?).ok()?;
    let country = k.get(off + 1..off + 3)?.try_into().ok()?;
    if off + 3 != k.len() {
        return None;
    }
    Some(RowKey {
        minute,
        advertiser_id,
        campaign_id,
        ad_id,
        device,
        country,
    })
}

/// A merged row: the sums, and how many times it changed after its minute
/// became final.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Row {
    pub counts: Counts,
    /// 0 while the minute is open; +1 for each correction after it is final.
    pub version: u32,
}

pub const ROW_LEN: usize = 44;

impl Row {
    pub fn encode(&self) -> [u8; ROW_LEN] {
        let c = &self.counts;
        let mut b = [0u8; ROW_LEN];
        for (i, v) in [
            c.clicks,
            c.impressions,
            c.spend_micros,
            c.duplicates,
            c.invalid,
        ]
        .iter()
        .enumerate()
        {
            b[i * 8..i * 8 + 8].copy_from_slice(&v.to_le_bytes());
        }
        b[40..44].copy_from_slice(&self.version.to_le_bytes());
        b
    }

    pub fn decode(b: &[u8]) -> Row {
        let u = |i: usize| u64::from_le_bytes(b[i * 8..i * 8 + 8].try_into().unwrap());
        Row {
            counts: Counts {
                clicks: u(0),
                impressions: u(1),
                spend_micros: u(2),
                duplicates: u(3),
                invalid: u(4),
            },
            version: u32::from_le_bytes(b[40..44].try_into().unwrap()),
        }
    }
}

/// Days since 1970-01-01 of a civil date (proleptic Gregorian).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

fn civil_from_days(z: i64) -> (i64, i64, i64) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    (yoe + era * 400 + (m <= 2) as i64, m, d)
}

/// Parses `2026-11-24T05:00:00Z` (UTC, optional fraction ignored) or Unix
/// seconds, into Unix seconds.
pub fn parse_time(s: &str) -> Result<i64, String> {
    if let Ok(n) = s.parse::<i64>() {
        return Ok(n);
    }
    let bad = || format!("{s:?}: expected Unix seconds or YYYY-MM-DDTHH:MM:SSZ");
    let b = s.as_bytes();
    if b.len() < 20 || !s.ends_with('Z') || b[4] != b'-' || b[7] != b'-' || b[10] != b'T' {
        return Err(bad());
    }
    let num = |r: std::ops::Range<usize>| s.get(r).and_then(|x| x.parse::<i64>().ok());
    let (y, mo, d) = (num(0..4), num(5..7), num(8..10));
    let (h, mi, se) = (num(11..13), num(14..16), num(17..19));
    let (Some(y), Some(mo), Some(d), Some(h), Some(mi), Some(se)) = (y, mo, d, h, mi, se) else {
        return Err(bad());
    };
    if b[13] != b':' || b[16] != b':' || !(1..=12).contains(&mo) || !(1..=31).contains(&d) {
        return Err(bad());
    }
    if h > 23 || mi > 59 || se > 60 {
        return Err(bad());
    }
    let frac = &s[19..s.len() - 1];
    if !(frac.is_empty()
        || (frac.starts_with('.') && frac[1..].bytes().all(|c| c.is_ascii_digit())))
    {
        return Err(bad());
    }
    Ok(days_from_civil(y, mo, d) * 86_400 + h * 3600 + mi * 60 + se)
}

/// Formats Unix seconds as `2026-11-24T05:00:00Z`.
pub fn format_time(secs: i64) -> String {
    let (y, m, d) = civil_from_days(secs.div_euclid(86_400));
    let t = secs.rem_euclid(86_400);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        t / 3600,
        t % 3600 / 60,
        t % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_round_trip_and_sort_by_advertiser_then_minute() {
        let k = |adv: &str, minute, ad: &str| RowKey {
            minute,
            advertiser_id: adv.into(),
            campaign_id: "c".into(),
            ad_id: ad.into(),
            device: Device::Mobile,
            country: *b"DE",
        };
        let a = k("adv", 10, "zz");
        assert_eq!(decode_key(&encode_key(&a)), Some(a.clone()));
        assert!(encode_key(&k("adv", 9, "zzz")) < encode_key(&k("adv", 10, "a")));
        assert!(encode_key(&k("adv", 10, "a")) < prefix("adv", 11));
        // Another advertiser never falls inside adv's range.
        let lo = prefix("adv", 0);
        let hi = prefix("adv", u32::MAX);
        for other in ["ad", "adva", "b", ""] {
            let o = encode_key(&k(other, 10, "a"));
            assert!(!(lo <= o && o < hi), "{other}");
        }
        assert_eq!(decode_key(&encode_key(&a)[..5]), None);
    }

    #[test]
    fn rows_round_trip() {
        let r = Row {
            counts: Counts {
                clicks: 1,
                impressions: 2,
                spend_micros: 3,
                duplicates: 4,
                invalid: 5,
            },
            version: 6,
        };
        assert_eq!(Row::decode(&r.encode()), r);
    }

    #[test]
    fn times_parse_and_format() {
        assert_eq!(parse_time("1970-01-01T00:00:00Z"), Ok(0));
        assert_eq!(parse_time("2026-11-24T05:00:00Z"), Ok(1_795_496_400));
        assert_eq!(parse_time("2026-11-24T05:00:00.250Z"), Ok(1_795_496_400));
        assert_eq!(parse_time("1795496400"), Ok(1_795_496_400));
        assert_eq!(format_time(1_795_496_400), "2026-11-24T05:00:00Z");
        assert_eq!(format_time(951_782_400), "2000-02-29T00:00:00Z");
        for bad in [
            "yesterday",
            "2026-11-24 05:00:00Z",
            "2026-13-01T00:00:00Z",
            "2026-11-24T05:00:00+01:00",
        ] {
            assert!(parse_time(bad).is_err(), "{bad}");
        }
    }
}
