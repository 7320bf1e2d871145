//! Record payloads: events (clicks and impressions) and partial aggregates.
//!
//! An event record is encoded once, straight into its frame in the mapped
//! segment ([`EventRef::encode_into`]), and read back without copying
//! ([`EventRef::decode`]). Partials are small and written once per flush
//! interval, so they use an owned, allocated form.

use thiserror::Error;

/// Longest id (advertiser, campaign, ad, click, user, kid) a record carries.
pub const ID_MAX: usize = 255;

#[derive(Debug, Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum DecodeError {
    #[error("record is truncated")]
    Truncated,
    #[error("unknown {field} value {value}")]
    Enum { field: &'static str, value: u8 },
    #[error("id is not valid UTF-8")]
    Utf8,
    #[error("{0} trailing bytes after the record")]
    Trailing(usize),
}

macro_rules! byte_enum {
    ($(#[$m:meta])* $name:ident, $field:literal { $($v:ident = $n:literal => $s:literal),+ $(,)? }) => {
        $(#[$m])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
        #[repr(u8)]
        pub enum $name { $($v = $n),+ }
        impl $name {
            pub const ALL: &'static [$name] = &[$($name::$v),+];
            pub fn from_u8(v: u8) -> Result<Self, DecodeError> {
                match v { $($n => Ok(Self::$v),)+ value => Err(DecodeError::Enum { field: $field, value }) }
            }
            pub fn as_str(self) -> &'static str {
                match self { $(Self::$v => $s),+ }
            }
        }
    };
}

byte_enum!(
    /// What the event is.
    EventKind, "kind" { Click = 1 => "click", Impression = 2 => "impression" }
);
byte_enum!(
    /// What the gateway decided. Only `Accepted` is billable.
    Verdict, "verdict" {
        Accepted = 0 => "accepted",
        Duplicate = 1 => "duplicate",
        Invalid = 2 => "invalid",
    }
);
byte_enum!(
    /// How the event arrived.
    Source, "source" { Get = 0 => "get", Batch = 1 => "batch" }
);
byte_enum!(
    /// Coarse device type derived from the User-Agent.
    Device, "device" {
        Desktop = 0 => "desktop",
        Mobile = 1 => "mobile",
        Tablet = 2 => "tablet",
        Bot = 3 => "bot",
        Other = 4 => "other",
    }
);

/// A click or impression as the log keeps it: everything the signed request
/// carried, plus what the gateway derived and decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EventRef<'a> {
    pub kind: EventKind,
    pub verdict: Verdict,
    pub source: Source,
    pub device: Device,
    /// ISO 3166 alpha-2, or `ZZ` when unknown.
    pub country: [u8; 2],
    /// Event time: receive time for browser requests, the signed timestamp for
    /// batched events.
    pub event_ms: i64,
    pub receive_ms: i64,
    /// The signed `timestamp` field, in seconds.
    pub signed_ts_s: i64,
    pub cost_micros: u64,
    /// Client address, IPv4 as IPv4-mapped IPv6.
    pub client_ip: [u8; 16],
    pub kid: &'a str,
    pub advertiser_id: &'a str,
    pub campaign_id: &'a str,
    pub ad_id: &'a str,
    pub click_id: &'a str,
    pub user_id: &'a str,
    pub redirect_url: &'a str,
}

const EVENT_FIXED: usize = 72;

impl<'a> EventRef<'a> {
    fn strs(&self) -> [&'a str; 7] {
        [
            self.kid,
            self.advertiser_id,
            self.campaign_id,
            self.ad_id,
            self.click_id,
            self.user_id,
            self.redirect_url,
        ]
    }

    pub fn encoded_len(&self) -> usize {
        EVENT_FIXED + self.strs().iter().map(|s| s.len()).sum::<usize>()
    }

    /// Encodes into the front of `dst`, returning the bytes written.
    pub fn encode_into(&self, dst: &mut [u8]) -> usize {
        let len = self.encoded_len();
        assert!(dst.len() >= len);
        dst[0] = self.kind as u8;
        dst[1] = self.verdict as u8;
        dst[2] = self.source as u8;
        dst[3] = self.device as u8;
        dst[4..6].copy_from_slice(&self.country);
        dst[6..8].fill(0);
        dst[8..16].copy_from_slice(&self.event_ms.to_le_bytes());
        dst[16..24].copy_from_slice(&self.receive_ms.to_le_bytes());
        dst[24..32].copy_from_slice(&self.signed_ts_s.to_le_bytes());
        dst[32..40].copy_from_slice(&self.cost_micros.to_le_bytes());
        dst[40..56].copy_from_slice(&self.client_ip);
        let mut off = EVENT_FIXED;
        for (i, s) in self.strs().iter().enumerate() {
            assert!(s.len() <= u16::MAX as usize);
            dst[56 + 2 * i..58 + 2 * i].copy_from_slice(&(s.len() as u16).to_le_bytes());
            dst[off..off + s.len()].copy_from_slice(s.as_bytes());
            off += s.len();
        }
        dst[70..72].fill(0);
        debug_assert_eq!(off, len);
        len
    }

    /// The receive time of an encoded event, without decoding the rest
    /// (None if `b` is too short to be one).
    pub fn receive_ms_of(b: &[u8]) -> Option<i64> {
        (b.len() >= EVENT_FIXED).then(|| i64::from_le_bytes(b[16..24].try_into().unwrap()))
    }

    pub fn decode(b: &'a [u8]) -> Result<Self, DecodeError> {
        if b.len() < EVENT_FIXED {
            return Err(DecodeError::Truncated);
        }
        let i64_at = |o: usize| i64::from_le_bytes(b[o..o + 8].try_into().unwrap());
        let mut off = EVENT_FIXED;
        let mut strs = [""; 7];
        for (i, slot) in strs.iter_mut().enumerate() {
            let n = u16::from_le_bytes([b[56 + 2 * i], b[57 + 2 * i]]) as usize;
            let bytes = b.get(off..off + n).ok_or(DecodeError::Truncated)?;
            *slot = std::str::from_utf8(bytes).map_err(|_| DecodeError::Utf8)?;
            off += n;
        }
        if off != b.len() {
            return Err(DecodeError::Trailing(b.len() - off));
        }
        Ok(Self {
            kind: EventKind::from_u8(b[0])?,
            verdict: Verdict::from_u8(b[1])?,
            source: Source::from_u8(b[2])?,
            device: Device::from_u8(b[3])?,
            country: [b[4], b[5]],
            event_ms: i64_at(8),
            receive_ms: i64_at(16),
            signed_ts_s: i64_at(24),
            cost_micros: i64_at(32) as u64,
            client_ip: b[40..56].try_into().unwrap(),
            kid: strs[0],
            advertiser_id: strs[1],
            campaign_id: strs[2],
            ad_id: strs[3],
            click_id: strs[4],
            user_id: strs[5],
            redirect_url: strs[6],
        })
    }
}

/// The dimensions partials are summed by.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RowKey {
    /// Event-time minute, minutes since the Unix epoch (UTC).
    pub minute: u32,
    pub advertiser_id: String,
    pub campaign_id: String,
    pub ad_id: String,
    pub device: Device,
    pub country: [u8; 2],
}

impl RowKey {
    /// The row an event is summed into.
    pub fn of(e: &EventRef<'_>) -> RowKey {
        RowKey {
            minute: crate::minute_of(e.event_ms),
            advertiser_id: e.advertiser_id.to_owned(),
            campaign_id: e.campaign_id.to_owned(),
            ad_id: e.ad_id.to_owned(),
            device: e.device,
            country: e.country,
        }
    }
}

/// The sums kept per [`RowKey`]. Money is integer micros.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counts {
    pub clicks: u64,
    pub impressions: u64,
    pub spend_micros: u64,
    pub duplicates: u64,
    pub invalid: u64,
}

impl Counts {
    /// Adds one event as the partial counts it.
    pub fn add_event(&mut self, kind: EventKind, verdict: Verdict, cost_micros: u64) {
        match (verdict, kind) {
            (Verdict::Accepted, EventKind::Click) => {
                self.clicks += 1;
                self.spend_micros += cost_micros;
            }
            (Verdict::Accepted, EventKind::Impression) => self.impressions += 1,
            (Verdict::Duplicate, _) => self.duplicates += 1,
            (Verdict::Invalid, _) => self.invalid += 1,
        }
    }

    pub fn merge(&mut self, o: &Counts) {
        self.clicks += o.clicks;
        self.impressions += o.impressions;
        self.spend_micros += o.spend_micros;
        self.duplicates += o.duplicates;
        self.invalid += o.invalid;
    }
}

/// The per-minute sums of the event records of one shard in the seq range
/// `(from_seq, to_seq]`. `from_seq` is the seq of the previous partial record
/// (0 for the first), `to_seq` is this record's own seq minus one, so the
/// partials of a shard tile its whole log. A partial with no rows is a
/// heartbeat: it still advances the range and carries the watermark.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PartialRecord {
    pub from_seq: u64,
    pub to_seq: u64,
    /// The shard's event-time watermark when it wrote this partial, Unix ms.
    pub watermark_ms: i64,
    pub rows: Vec<(RowKey, Counts)>,
    /// Clicks and impressions answered without a record while the log was
    /// full (`log.on_full = "redirect"`), per event-time minute: never
    /// billed, reported as unrecorded. Not a function of the records (there
    /// are none); a crash loses what had not yet been written in a partial.
    pub unrecorded: Vec<(u32, u64)>,
}

const PARTIAL_FIXED: usize = 32;
const ROW_FIXED: usize = 48;
/// Byte 28 of a partial: flags. Bit 0: an unrecorded trailer follows the
/// rows (`count u32`, then `minute u32 | events u64` each). Without it the
/// bytes are what they were before the trailer existed.
const FLAG_UNRECORDED: u8 = 1;

impl PartialRecord {
    pub fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.from_seq.to_le_bytes());
        out.extend_from_slice(&self.to_seq.to_le_bytes());
        out.extend_from_slice(&self.watermark_ms.to_le_bytes());
        out.extend_from_slice(&(self.rows.len() as u32).to_le_bytes());
        let flags = if self.unrecorded.is_empty() {
            0
        } else {
            FLAG_UNRECORDED
        };
        out.extend_from_slice(&[flags, 0, 0, 0]);
        for (k, c) in &self.rows {
            out.extend_from_slice(&k.minute.to_le_bytes());
            out.push(k.device as u8);
            out.extend_from_slice(&k.country);
            out.push(0);
            for v in [
                c.clicks,
                c.impressions,
                c.spend_micros,
                c.duplicates,
                c.invalid,
            ] {
                out.extend_from_slice(&v.to_le_bytes());
            }
            for s in [&k.advertiser_id, &k.campaign_id, &k.ad_id] {
                assert!(s.len() <= ID_MAX);
                out.push(s.len() as u8);
                out.extend_from_slice(s.as_bytes());
            }
        }
        if !self.unrecorded.is_empty() {
            out.extend_from_slice(&(self.unrecorded.len() as u32).to_le_bytes());
            for (minute, n) in &self.unrecorded {
                out.extend_from_slice(&minute.to_le_bytes());
                out.extend_from_slice(&n.to_le_bytes());
            }
        }
    }

    pub fn decode(b: &[u8]) -> Result<Self, DecodeError> {
        if b.len() < PARTIAL_FIXED {
            return Err(DecodeError::Truncated);
        }
        let u64_at = |o: usize| u64::from_le_bytes(b[o..o + 8].try_into().unwrap());
        let n = u32::from_le_bytes(b[24..28].try_into().unwrap()) as usize;
        // Each row takes at least ROW_FIXED + 3 bytes; refuse counts the input
        // cannot hold before allocating for them.
        if n > (b.len() - PARTIAL_FIXED) / (ROW_FIXED + 3) {
            return Err(DecodeError::Truncated);
        }
        let mut rows = Vec::with_capacity(n);
        let mut off = PARTIAL_FIXED;
        for _ in 0..n {
            let r = b.get(off..off + ROW_FIXED).ok_or(DecodeError::Truncated)?;
            let c = |i: usize| u64::from_le_bytes(r[8 + 8 * i..16 + 8 * i].try_into().unwrap());
            let counts = Counts {
                clicks: c(0),
                impressions: c(1),
                spend_micros: c(2),
                duplicates: c(3),
                invalid: c(4),
            };
            let minute = u32::from_le_bytes(r[0..4].try_into().unwrap());
            let device = Device::from_u8(r[4])?;
            let country = [r[5], r[6]];
            off += ROW_FIXED;
            let mut ids: [String; 3] = Default::default();
            for id in ids.iter_mut() {
                let len = *b.get(off).ok_or(DecodeError::Truncated)? as usize;
                let s = b
                    .get(off + 1..off + 1 + len)
                    .ok_or(DecodeError::Truncated)?;
                *id = std::str::from_utf8(s)
                    .map_err(|_| DecodeError::Utf8)?
                    .to_owned();
                off += 1 + len;
            }
            let [advertiser_id, campaign_id, ad_id] = ids;
            rows.push((
                RowKey {
                    minute,
                    advertiser_id,
                    campaign_id,
                    ad_id,
                    device,
                    country,
                },
                counts,
            ));
        }
        let mut unrecorded = Vec::new();
        if b[28] & FLAG_UNRECORDED != 0 {
            let n = b.get(off..off + 4).ok_or(DecodeError::Truncated)?;
            let n = u32::from_le_bytes(n.try_into().unwrap()) as usize;
            off += 4;
            if n == 0 || n > (b.len() - off) / 12 {
                return Err(DecodeError::Truncated);
            }
            unrecorded.reserve(n);
            for _ in 0..n {
                let minute = u32::from_le_bytes(b[off..off + 4].try_into().unwrap());
                let count = u64::from_le_bytes(b[off + 4..off + 12].try_into().unwrap());
                unrecorded.push((minute, count));
                off += 12;
            }
        }
        if off != b.len() {
            return Err(DecodeError::Trailing(b.len() - off));
        }
        Ok(Self {
            from_seq: u64_at(0),
            to_seq: u64_at(8),
            watermark_ms: u64_at(16) as i64,
            rows,
            unrecorded,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event() -> EventRef<'static> {
        EventRef {
            kind: EventKind::Click,
            verdict: Verdict::Accepted,
            source: Source::Get,
            device: Device::Mobile,
            country: *b"DE",
            event_ms: 1_700_000_000_123,
            receive_ms: 1_700_000_000_123,
            signed_ts_s: 1_700_000_000,
            cost_micros: 250_000,
            client_ip: [9; 16],
            kid: "k1",
            advertiser_id: "adv-1",
            campaign_id: "camp-9",
            ad_id: "ad-77",
            click_id: "c-0001",
            user_id: "u-5",
            redirect_url: "https://example.com/landing?x=1",
        }
    }

    #[test]
    fn event_round_trips() {
        let e = event();
        let mut buf = vec![0u8; e.encoded_len()];
        assert_eq!(e.encode_into(&mut buf), buf.len());
        assert_eq!(EventRef::decode(&buf), Ok(e));
        assert_eq!(EventRef::receive_ms_of(&buf), Some(e.receive_ms));
    }

    #[test]
    fn event_decode_never_panics_on_prefixes_or_garbage() {
        let e = event();
        let mut buf = vec![0u8; e.encoded_len()];
        e.encode_into(&mut buf);
        for n in 0..buf.len() {
            assert!(EventRef::decode(&buf[..n]).is_err());
        }
        let mut bad = buf.clone();
        bad[0] = 9;
        assert!(matches!(
            EventRef::decode(&bad),
            Err(DecodeError::Enum { .. })
        ));
    }

    #[test]
    fn partial_round_trips_and_rejects_truncation() {
        let key = |ad: &str| RowKey {
            minute: 28_333_333,
            advertiser_id: "adv".into(),
            campaign_id: "c".into(),
            ad_id: ad.into(),
            device: Device::Desktop,
            country: *b"US",
        };
        let p = PartialRecord {
            from_seq: 5,
            to_seq: 19,
            watermark_ms: 42,
            rows: vec![
                (
                    key("a"),
                    Counts {
                        clicks: 3,
                        spend_micros: 30,
                        ..Counts::default()
                    },
                ),
                (
                    key("b"),
                    Counts {
                        impressions: 7,
                        duplicates: 1,
                        invalid: 2,
                        ..Counts::default()
                    },
                ),
            ],
            unrecorded: Vec::new(),
        };
        let mut buf = Vec::new();
        p.encode(&mut buf);
        assert_eq!(PartialRecord::decode(&buf), Ok(p.clone()));
        for n in 0..buf.len() {
            assert!(PartialRecord::decode(&buf[..n]).is_err(), "prefix {n}");
        }
        // With unrecorded counts: a trailer, flagged; the rows' bytes unchanged.
        let q = PartialRecord {
            unrecorded: vec![(28_333_333, 12), (28_333_334, 1)],
            ..p
        };
        let mut with = Vec::new();
        q.encode(&mut with);
        assert_eq!(with.len(), buf.len() + 4 + 2 * 12);
        assert_eq!(&with[29..buf.len()], &buf[29..]);
        assert_eq!(PartialRecord::decode(&with), Ok(q));
        for n in 0..with.len() {
            assert!(PartialRecord::decode(&with[..n]).is_err(), "prefix {n}");
        }
    }
}
