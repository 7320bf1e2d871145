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
}
