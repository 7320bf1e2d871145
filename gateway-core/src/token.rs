//! Signed-click verification: HMAC-SHA256 over the exact query bytes before
//! `&sig=`, in place, in constant time, before anything else is decoded (only
//! `kid` is located first, since it names the key).
//!
//! The keyring is plain data: it is built from the keys file by the server
//! shell and handed to each shard as an `Arc`, which the shard swaps on its
//! tick when a reload happened. Grace for retired keys is judged against the
//! `now` the caller passes in.

use std::collections::HashMap;

use base64::Engine;
use ring::hmac;
use serde::Deserialize;
use wire::signed::{SIG_B64_LEN, SIG_PARAM};

use crate::fast::{for_each_special, graphic_str};

/// A secret must be at least this long (the HMAC-SHA256 block of security).
pub const SECRET_BYTES_MIN: usize = 32;

struct Key {
    key: hmac::Key,
    /// When the key stopped being current; it verifies until `retired_ms + grace`.
    retired_ms: Option<i64>,
}

/// The keys a shard verifies with.
pub struct KeyRing {
    /// Sorted by kid. A ring holds a handful of keys (current, next, retiring),
    /// where a binary search over the bytes beats hashing the kid.
    keys: Vec<(String, Key)>,
    grace_ms: i64,
}

impl std::fmt::Debug for KeyRing {
    // Never prints secrets.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyRing")
            .field(
                "kids",
                &self.keys.iter().map(|(k, _)| k).collect::<Vec<_>>(),
            )
            .field("grace_ms", &self.grace_ms)
            .finish()
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct KeysFile {
    #[serde(default)]
    key: Vec<KeyEntry>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct KeyEntry {
    kid: String,
    /// base64url (with or without padding) of the secret bytes.
    secret: String,
    /// Unix seconds when the key was retired, if it was.
    retired_at: Option<i64>,
}

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum KeysError {
    #[error("keys file is not valid TOML: {0}")]
    Toml(#[from] toml::de::Error),
    #[error("key {kid:?}: secret is not base64url")]
    Base64 { kid: String },
    #[error("key {kid:?}: secret has {len} bytes, at least {SECRET_BYTES_MIN} are required")]
    Short { kid: String, len: usize },
    #[error("key {kid:?} appears twice")]
    Duplicate { kid: String },
    #[error("kid {kid:?} must be 1 to 32 characters of [A-Za-z0-9_-]")]
    BadKid { kid: String },
}

fn decode_secret(s: &str) -> Option<Vec<u8>> {
    let s = s.trim().trim_end_matches('=');
    wire::signed::B64.decode(s).ok()
}

impl KeyRing {
    /// Parses a keys file. `previous` is the ring in force before a reload:
    /// a key it had that the file no longer lists is kept, retired at `now_ms`
    /// (or when it was retired before), so it keeps verifying for the grace.
    pub fn parse(
        text: &str,
        grace_ms: i64,
        previous: Option<&KeyRing>,
        now_ms: i64,
    ) -> Result<KeyRing, KeysError> {
        let file: KeysFile = toml::from_str(text)?;
        let mut keys = HashMap::new();
        for e in file.key {
            let kid_ok = !e.kid.is_empty()
                && e.kid.len() <= 32
                && e.kid
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
            if !kid_ok {
                return Err(KeysError::BadKid { kid: e.kid });
            }
            let secret =
                decode_secret(&e.secret).ok_or(KeysError::Base64 { kid: e.kid.clone() })?;
            if secret.len() < SECRET_BYTES_MIN {
                return Err(KeysError::Short {
                    kid: e.kid,
                    len: secret.len(),
                });
            }
            let key = Key {
                key: hmac::Key::new(hmac::HMAC_SHA256, &secret),
                retired_ms: e.retired_at.map(|s| s.saturating_mul(1000)),
            };
            if keys.insert(e.kid.clone(), key).is_some() {
                return Err(KeysError::Duplicate { kid: e.kid });
            }
        }
        if let Some(prev) = previous {
            for (kid, old) in &prev.keys {
                if !keys.contains_key(kid) {
                    keys.insert(
                        kid.clone(),
                        Key {
                            key: old.key.clone(),
                            retired_ms: Some(old.retired_ms.unwrap_or(now_ms)),
                        },
                    );
                }
            }
            // Drop keys whose grace has ended, so the ring stays bounded.
            keys.retain(|_, k| k.retired_ms.is_none_or(|r| r + grace_ms > now_ms));
        }
        let mut keys: Vec<(String, Key)> = keys.into_iter().collect();
        keys.sort_unstable_by(|a, b| a.0.cmp(&b.0));
        Ok(KeyRing { keys, grace_ms })
    }

    pub fn len(&self) -> usize {
        self.keys.len()
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    fn lookup(&self, kid: &[u8], now_ms: i64) -> Result<&hmac::Key, Reject> {
        let at = self
            .keys
            .binary_search_by(|(k, _)| k.as_bytes().cmp(kid))
            .map_err(|_| Reject::UnknownKid)?;
        let k = &self.keys[at].1;
        match k.retired_ms {
            Some(r) if now_ms >= r + self.grace_ms => Err(Reject::RetiredKid),
            _ => Ok(&k.key),
        }
    }
}

/// Why a signed event is refused. Each is counted under its `reason()`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Reject {
    MissingSignature,
    MissingField(&'static str),
    BadField(&'static str),
    DuplicateField,
    UnknownKid,
    RetiredKid,
    BadSignature,
    Expired,
    FutureTimestamp,
}

impl Reject {
    pub const REASONS: &'static [&'static str] = &[
        "missing_signature",
        "missing_field",
        "bad_field",
        "duplicate_field",
        "unknown_kid",
        "retired_kid",
        "bad_signature",
        "expired",
        "future_timestamp",
    ];

    pub fn reason(self) -> &'static str {
        match self {
            Self::MissingSignature => "missing_signature",
            Self::MissingField(_) => "missing_field",
            Self::BadField(_) => "bad_field",
            Self::DuplicateField => "duplicate_field",
            Self::UnknownKid => "unknown_kid",
            Self::RetiredKid => "retired_kid",
            Self::BadSignature => "bad_signature",
            Self::Expired => "expired",
            Self::FutureTimestamp => "future_timestamp",
        }
    }

    /// Index into [`Self::REASONS`].
    pub fn index(self) -> usize {
        match self {
            Self::MissingSignature => 0,
            Self::MissingField(_) => 1,
            Self::BadField(_) => 2,
            Self::DuplicateField => 3,
            Self::UnknownKid => 4,
            Self::RetiredKid => 5,
            Self::BadSignature => 6,
            Self::Expired => 7,
            Self::FutureTimestamp => 8,
        }
    }

    /// 400 for requests that are malformed, 403 for ones that are well formed
    /// but not authentic or no longer valid.
    pub fn status(self) -> u16 {
        match self {
            Self::MissingSignature
            | Self::MissingField(_)
            | Self::BadField(_)
            | Self::DuplicateField => 400,
            _ => 403,
        }
    }

    /// A short, plain-text explanation for the response body.
    pub fn message(self, out: &mut Vec<u8>) {
        out.extend_from_slice(self.reason().as_bytes());
        if let Self::MissingField(f) | Self::BadField(f) = self {
            out.extend_from_slice(b": ");
            out.extend_from_slice(f.as_bytes());
        }
        out.push(b'\n');
    }
}

#[derive(Debug, Clone, Copy)]
pub struct Policy {
    /// Oldest signed timestamp accepted, relative to now, ms.
    pub max_age_ms: i64,
    /// How far in the future a signed timestamp may be, ms.
    pub future_skew_ms: i64,
    /// Longest id value (advertiser, campaign, ad, click, user), bytes.
    pub id_bytes_max: usize,
    /// Longest redirect URL, bytes.
    pub url_bytes_max: usize,
    /// Largest cost per click, micros.
    pub cost_micros_max: u64,
    /// Whether `redirect_url` is required (clicks) or optional (impressions).
    pub need_redirect: bool,
}

impl Policy {
    /// The click policy of the default configuration (`deploy/gateway.toml`:
    /// `tokens.max_age_s` 86400, `tokens.future_skew_s` 300,
    /// `limits.id_bytes_max` 64, `url_bytes_max` 2048, `cost_micros_max`
    /// 1 000 000 000), for tests, benchmarks and the fuzz targets. The
    /// gateway's config test checks that its defaults give exactly this.
    pub const DEFAULT_CLICK: Policy = Policy {
        max_age_ms: 86_400_000,
        future_skew_ms: 300_000,
        id_bytes_max: 64,
        url_bytes_max: 2048,
        cost_micros_max: 1_000_000_000,
        need_redirect: true,
    };
}

/// The decoded fields of a verified click. The strings live in the caller's
/// scratch buffer (percent-decoded) for as long as it is borrowed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Signed<'a> {
    pub kid: &'a str,
    pub advertiser_id: &'a str,
    pub campaign_id: &'a str,
    pub ad_id: &'a str,
    pub click_id: &'a str,
    pub user_id: &'a str,
    pub redirect_url: &'a str,
    pub cost_micros: u64,
    pub timestamp_s: i64,
}

/// Verifies a signed query and decodes its fields into `scratch`.
///
/// `scratch` must have at least `query.len()` bytes (decoding never grows).
pub fn verify<'s>(
    query: &'s [u8],
    ring: &KeyRing,
    policy: &Policy,
    now_ms: i64,
    scratch: &'s mut [u8],
) -> Result<Signed<'s>, Reject> {
    split(query)?.verify(ring, policy, now_ms, scratch)
}

const NAMES: [&str; 9] = [
    "kid",
    "advertiser_id",
    "campaign_id",
    "ad_id",
    "click_id",
    "user_id",
    "redirect_url",
    "cost_per_click",
    "timestamp",
];
const KID: usize = 0;
const AD_ID: usize = 3;
const CLICK_ID: usize = 4;
const REDIRECT_URL: usize = 6;

/// A signed query taken apart, nothing decoded and nothing trusted yet: the
/// signature, the signed bytes and where each known field's raw value is.
/// `split` then `Split::verify` is `verify` in two steps, so that a caller can
/// start work that needs no trust (a prefetch) before paying for the MAC.
pub struct Split<'q> {
    signed: &'q [u8],
    sig: [u8; 32],
    raw: [Option<&'q [u8]>; 9],
    /// Bit i: field i's raw value has a `%` escape (found once, here).
    escaped: u16,
    duplicate: bool,
}

/// Finds the signature and the known fields of `query` in one pass.
pub fn split<'q>(query: &'q [u8]) -> Result<Split<'q>, Reject> {
    // The signature must be the final parameter. A well-formed query has it
    // exactly SIG_B64_LEN bytes from the end; only a malformed one pays for
    // the search (to tell missing from bad).
    let at = match query.len().checked_sub(SIG_B64_LEN + SIG_PARAM.len()) {
        Some(at) if &query[at..at + SIG_PARAM.len()] == SIG_PARAM => at,
        _ => rfind(query, SIG_PARAM).ok_or(Reject::MissingSignature)?,
    };
    let signed = &query[..at];
    let sig_b64 = &query[at + SIG_PARAM.len()..];
    if sig_b64.len() != SIG_B64_LEN {
        return Err(Reject::BadSignature);
    }
    let mut sig = [0u8; 33];
    let n = wire::signed::B64
        .decode_slice(sig_b64, &mut sig)
        .map_err(|_| Reject::BadSignature)?;
    if n != 32 {
        return Err(Reject::BadSignature);
    }
    let mut raw: [Option<&[u8]>; 9] = [None; 9];
    let mut duplicate = false;
    let mut escaped = 0u16;
    let mut take = |pair: &'q [u8], eq: Option<usize>, has_escape: bool| {
        let eq = eq.unwrap_or(pair.len());
        let (name, value) = (&pair[..eq], pair.get(eq + 1..).unwrap_or(b""));
        // (A match compiles to a length-then-bytes decision, not nine compares.)
        let i = match name {
            b"kid" => KID,
            b"advertiser_id" => 1,
            b"campaign_id" => 2,
            b"ad_id" => AD_ID,
            b"click_id" => CLICK_ID,
            b"user_id" => 5,
            b"redirect_url" => REDIRECT_URL,
            b"cost_per_click" => 7,
            b"timestamp" => 8,
            _ => return, // Unknown parameters are signed too; they are ignored.
        };
        // The first one counts; a repeat is refused, but only once the
        // signature is known good (a forgery is told it is a forgery).
        match raw[i] {
            None => {
                raw[i] = Some(value);
                escaped |= u16::from(has_escape) << i;
            }
            Some(_) => duplicate = true,
        }
    };
    // One pass finds every separator and every escape: the parameters are
    // short, and a search per parameter costs more in calls than in bytes.
    let (mut start, mut eq, mut has_escape) = (0, None, false);
    for_each_special(signed, |at, b| match b {
        b'&' => {
            take(&signed[start..at], eq, has_escape);
            (start, eq, has_escape) = (at + 1, None, false);
        }
        b'=' if eq.is_none() => eq = Some(at - start),
        b'%' if eq.is_some() => has_escape = true,
        _ => {}
    });
    take(&signed[start..], eq, has_escape);
    let mut sig32 = [0u8; 32];
    sig32.copy_from_slice(&sig[..32]);
    Ok(Split {
        signed,
        sig: sig32,
        raw,
        escaped,
        duplicate,
    })
}

impl<'q> Split<'q> {
    /// The click id as it will decode, if it needs no decoding (the usual
    /// case): what the dedup table will be asked about, known before the MAC.
    pub fn plain_click_id(&self) -> Option<&'q [u8]> {
        self.plain(CLICK_ID)
    }

    /// The ad id, likewise (the velocity filter's key).
    pub fn plain_ad_id(&self) -> Option<&'q [u8]> {
        self.plain(AD_ID)
    }

    fn plain(&self, i: usize) -> Option<&'q [u8]> {
        self.raw[i].filter(|_| self.escaped & (1 << i) == 0)
    }

    /// Checks the MAC (constant time, in ring), then decodes and checks every
    /// field. Values without escapes are borrowed from the query; the
    /// redirect URL and escaped values are decoded into `scratch`, which must
    /// have at least the query's length.
    pub fn verify<'s>(
        self,
        ring: &KeyRing,
        policy: &Policy,
        now_ms: i64,
        scratch: &'s mut [u8],
    ) -> Result<Signed<'s>, Reject>
    where
        'q: 's,
    {
        // A key id never needs percent-decoding: [A-Za-z0-9_-].
        let kid = self.raw[KID].ok_or(Reject::MissingField("kid"))?;
        let key = ring.lookup(kid, now_ms)?;
        hmac::verify(key, self.signed, &self.sig).map_err(|_| Reject::BadSignature)?;
        if self.duplicate {
            return Err(Reject::DuplicateField);
        }
        self.decode(policy, now_ms, scratch)
    }

    fn decode<'s>(
        self,
        policy: &Policy,
        now_ms: i64,
        scratch: &'s mut [u8],
    ) -> Result<Signed<'s>, Reject>
    where
        'q: 's,
    {
        assert!(scratch.len() >= self.signed.len());
        // Decoded into scratch: the redirect URL always (the caller finds it
        // there to answer), any other value only if it has an escape.
        let mut at: [Option<(usize, usize)>; 9] = [None; 9];
        let mut w = 0usize;
        for (i, v) in self.raw.iter().enumerate() {
            let Some(v) = *v else { continue };
            if i == REDIRECT_URL || self.escaped & (1 << i) != 0 {
                let n = percent_decode(v, &mut scratch[w..]).ok_or(Reject::BadField(NAMES[i]))?;
                at[i] = Some((w, w + n));
                w += n;
            }
        }
        let scratch: &'s [u8] = scratch;
        let raw = self.raw;
        let bytes = |i: usize| -> Result<&'s [u8], Reject> {
            match (at[i], raw[i]) {
                (Some((s, e)), _) => Ok(&scratch[s..e]),
                (None, Some(v)) => Ok(v),
                (None, None) => Err(Reject::MissingField(NAMES[i])),
            }
        };
        let id = |i: usize| -> Result<&'s str, Reject> {
            let v = bytes(i)?;
            let ok = !v.is_empty() && v.len() <= policy.id_bytes_max && all_graphic(v);
            if !ok {
                return Err(Reject::BadField(NAMES[i]));
            }
            Ok(graphic_str(v))
        };
        let timestamp_s = parse_i64(bytes(8)?).ok_or(Reject::BadField("timestamp"))?;
        let ts_ms = timestamp_s.saturating_mul(1000);
        if ts_ms < now_ms - policy.max_age_ms {
            return Err(Reject::Expired);
        }
        if ts_ms > now_ms + policy.future_skew_ms {
            return Err(Reject::FutureTimestamp);
        }
        let redirect_url = match bytes(REDIRECT_URL) {
            Ok(u) => {
                let ok = (u.starts_with(b"https://") || u.starts_with(b"http://"))
                    && u.len() <= policy.url_bytes_max
                    && all_graphic(u);
                if !ok {
                    return Err(Reject::BadField("redirect_url"));
                }
                graphic_str(u)
            }
            Err(Reject::MissingField(_)) if !policy.need_redirect => "",
            Err(e) => return Err(e),
        };
        let cost_micros = match bytes(7) {
            Ok(c) => parse_micros(c)
                .filter(|&m| m <= policy.cost_micros_max)
                .ok_or(Reject::BadField("cost_per_click"))?,
            Err(Reject::MissingField(_)) if !policy.need_redirect => 0,
            Err(e) => return Err(e),
        };
        Ok(Signed {
            kid: id(KID)?,
            advertiser_id: id(1)?,
            campaign_id: id(2)?,
            ad_id: id(AD_ID)?,
            click_id: id(CLICK_ID)?,
            user_id: id(5)?,
            redirect_url,
            cost_micros,
            timestamp_s,
        })
    }
}

/// Every byte printable ASCII (`!`..=`~`). Branch-free, so it vectorises;
/// `.all(is_ascii_graphic)` stops at each byte to decide.
fn all_graphic(v: &[u8]) -> bool {
    v.iter()
        .fold(true, |ok, &b| ok & (b.wrapping_sub(b'!') <= b'~' - b'!'))
}

fn rfind(hay: &[u8], needle: &[u8]) -> Option<usize> {
    memchr::memmem::rfind(hay, needle)
}

/// Percent-decodes `src` into `dst` (`+` stays `+`: this is a URL query, not a
/// form). Returns the decoded length, or `None` on a malformed escape.
/// `dst` must be at least as long as `src` (decoding never grows).
fn percent_decode(src: &[u8], dst: &mut [u8]) -> Option<usize> {
    const LANES: usize = 8;
    const ONES: u64 = u64::from_ne_bytes([0x01; LANES]);
    const HIGHS: u64 = u64::from_ne_bytes([0x80; LANES]);
    const PCT: u64 = u64::from_ne_bytes([b'%'; LANES]);
    assert!(dst.len() >= src.len());
    let (mut r, mut w) = (0, 0);
    // Eight bytes at a time: the runs between escapes in a URL are short, so
    // a call to memchr and one to memcpy per run cost more than the run.
    while r + LANES <= src.len() {
        let chunk: [u8; LANES] = src[r..r + LANES].try_into().unwrap();
        // w <= r, so dst has room for the whole chunk; bytes past the first
        // escape are overwritten by what follows.
        dst[w..w + LANES].copy_from_slice(&chunk);
        let x = u64::from_le_bytes(chunk) ^ PCT;
        // The lowest zero byte of x (a `%` of the chunk) is exact.
        let hit = x.wrapping_sub(ONES) & !x & HIGHS;
        if hit == 0 {
            r += LANES;
            w += LANES;
            continue;
        }
        let k = (hit.trailing_zeros() / 8) as usize;
        r += k;
        w += k;
        dst[w] = unescape(src, r)?;
        r += 3;
        w += 1;
    }
    while r < src.len() {
        if src[r] == b'%' {
            dst[w] = unescape(src, r)?;
            r += 3;
        } else {
            dst[w] = src[r];
            r += 1;
        }
        w += 1;
    }
    Some(w)
}

/// The byte of the escape `%XY` at `src[at]`.
fn unescape(src: &[u8], at: usize) -> Option<u8> {
    let h = hex(*src.get(at + 1)?)?;
    let l = hex(*src.get(at + 2)?)?;
    Some(h << 4 | l)
}

fn hex(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

fn parse_i64(v: &[u8]) -> Option<i64> {
    if v.is_empty() || v.len() > 15 || !v.iter().all(u8::is_ascii_digit) {
        return None;
    }
    Some(v.iter().fold(0i64, |n, &d| n * 10 + (d - b'0') as i64))
}

/// Parses a non-negative decimal amount ("1", "0.25", "12.000001") into
/// integer micros. More than six fractional digits is an error, never rounded.
pub fn parse_micros(v: &[u8]) -> Option<u64> {
    let (int, frac) = match v.iter().position(|&b| b == b'.') {
        Some(d) => (&v[..d], &v[d + 1..]),
        None => (v, &b""[..]),
    };
    if int.is_empty() || int.len() > 12 || frac.len() > 6 {
        return None;
    }
    if !int.iter().chain(frac).all(u8::is_ascii_digit) {
        return None;
    }
    if v.contains(&b'.') && frac.is_empty() {
        return None;
    }
    let i = int.iter().fold(0u64, |n, &d| n * 10 + (d - b'0') as u64);
    let mut f = frac.iter().fold(0u64, |n, &d| n * 10 + (d - b'0') as u64);
    for _ in frac.len()..6 {
        f *= 10;
    }
    Some(i * 1_000_000 + f)
}

#[cfg(test)]
mod tests {
    use super::*;
    use wire::signed::{encode_component, sign};

    const SECRET: &[u8] = b"0123456789abcdef0123456789abcdef";
    const NOW_MS: i64 = 1_800_000_000_000;

    fn ring(text: &str) -> KeyRing {
        KeyRing::parse(text, 3_600_000, None, NOW_MS).unwrap()
    }

    fn keys_toml(kid: &str, secret: &[u8]) -> String {
        let s = wire::signed::B64.encode(secret);
        format!("[[key]]\nkid = \"{kid}\"\nsecret = \"{s}\"\n")
    }

    /// The obvious byte-at-a-time decoder the word-at-a-time one must match.
    fn percent_decode_plain(src: &[u8]) -> Option<Vec<u8>> {
        let mut out = Vec::new();
        let mut i = 0;
        while i < src.len() {
            if src[i] == b'%' {
                out.push(unescape(src, i)?);
                i += 3;
            } else {
                out.push(src[i]);
                i += 1;
            }
        }
        Some(out)
    }

    /// `len` bytes drawn from `alphabet` (xorshift64, reproducible).
    fn random_bytes(seed: &mut u64, alphabet: &[u8], len: usize) -> Vec<u8> {
        (0..len)
            .map(|_| alphabet[(crate::xorshift64(seed) % alphabet.len() as u64) as usize])
            .collect()
    }

    #[test]
    fn specials_are_found_in_order_at_every_offset() {
        let alphabet: &[u8] = b"&=%ab";
        let mut seed = 0x2545_F491_4F6C_DD1Du64;
        for len in 0..70 {
            for _ in 0..300 {
                let s = random_bytes(&mut seed, alphabet, len);
                let mut got = Vec::new();
                for_each_special(&s, |at, b| got.push((at, b)));
                let want: Vec<(usize, u8)> = s
                    .iter()
                    .enumerate()
                    .filter(|(_, b)| matches!(b, b'&' | b'=' | b'%'))
                    .map(|(i, &b)| (i, b))
                    .collect();
                assert_eq!(got, want, "{:?}", String::from_utf8_lossy(&s));
            }
        }
    }

    #[test]
    fn percent_decode_matches_the_plain_decoder_at_every_offset() {
        // Escapes (good, bad, cut short) at every position relative to the
        // eight-byte chunks, in inputs of every length up to 40.
        let alphabet: &[u8] = b"%%%aF09zG+/.";
        let mut seed = 0x9E37_79B9_7F4A_7C15u64;
        let mut dst = [0u8; 64];
        for len in 0..40 {
            for _ in 0..2000 {
                let src = random_bytes(&mut seed, alphabet, len);
                let got = percent_decode(&src, &mut dst[..len]).map(|n| dst[..n].to_vec());
                assert_eq!(
                    got,
                    percent_decode_plain(&src),
                    "{:?}",
                    String::from_utf8_lossy(&src)
                );
            }
        }
        let url = encode_component("https://shop.example.com/p?a=1&b=%zz");
        let mut dst = vec![0u8; url.len()];
        let n = percent_decode(url.as_bytes(), &mut dst).unwrap();
        assert_eq!(&dst[..n], b"https://shop.example.com/p?a=1&b=%zz");
    }

    const POLICY: Policy = Policy::DEFAULT_CLICK;

    fn query(ts: i64) -> String {
        format!(
            "ad_id=ad1&advertiser_id=adv1&campaign_id=c1&click_id=ck-1&user_id=u1&cost_per_click=0.25&timestamp={ts}&redirect_url={}&kid=k1",
            encode_component("https://shop.example/landing?item=7&ref=ad")
        )
    }

    fn check(q: &str, r: &KeyRing, now: i64) -> Result<(), Reject> {
        let mut scratch = vec![0u8; q.len()];
        verify(q.as_bytes(), r, &POLICY, now, &mut scratch).map(|_| ())
    }

    #[test]
    fn valid_signature_decodes_all_fields() {
        let r = ring(&keys_toml("k1", SECRET));
        let q = sign(&query(NOW_MS / 1000), SECRET);
        let mut scratch = vec![0u8; q.len()];
        let s = verify(q.as_bytes(), &r, &POLICY, NOW_MS, &mut scratch).unwrap();
        assert_eq!(s.ad_id, "ad1");
        assert_eq!(s.advertiser_id, "adv1");
        assert_eq!(s.click_id, "ck-1");
        assert_eq!(s.cost_micros, 250_000);
        assert_eq!(s.redirect_url, "https://shop.example/landing?item=7&ref=ad");
        assert_eq!(s.kid, "k1");
    }

    #[test]
    fn split_finds_a_plain_click_id_before_the_mac() {
        let ts = NOW_MS / 1000;
        let plain = sign(&query(ts), SECRET);
        assert_eq!(
            split(plain.as_bytes())
                .ok()
                .and_then(|s| s.plain_click_id()),
            Some(&b"ck-1"[..])
        );
        // Escaped: no early answer, and the decoded id is the same click id.
        let escaped = sign(
            &query(ts).replace("click_id=ck-1", "click_id=ck%2D1"),
            SECRET,
        );
        let sp = split(escaped.as_bytes()).unwrap();
        assert_eq!(sp.plain_click_id(), None);
        let r = ring(&keys_toml("k1", SECRET));
        let mut scratch = vec![0u8; escaped.len()];
        let s = sp.verify(&r, &POLICY, NOW_MS, &mut scratch).unwrap();
        assert_eq!(s.click_id, "ck-1");
        assert_eq!(s.ad_id, "ad1");
        assert_eq!(s.redirect_url, "https://shop.example/landing?item=7&ref=ad");
    }

    #[test]
    fn a_forgery_is_a_bad_signature_whatever_else_is_wrong_with_it() {
        let r = ring(&keys_toml("k1", SECRET));
        let ts = NOW_MS / 1000;
        let other = b"another secret of thirty-two bytes!!";
        for q in [
            format!("{}&ad_id=ad2", query(ts)),
            query(ts).replace("user_id=u1&", ""),
            query(ts).replace("0.25", "x"),
            query(ts - 86_401),
        ] {
            assert_eq!(
                check(&sign(&q, other), &r, NOW_MS),
                Err(Reject::BadSignature),
                "{q}"
            );
        }
    }

    #[test]
    fn every_single_byte_change_of_a_signed_url_is_rejected() {
        let r = ring(&keys_toml("k1", SECRET));
        let q = sign(&query(NOW_MS / 1000), SECRET);
        let bytes = q.as_bytes();
        let mut tried = 0;
        for i in 0..bytes.len() {
            for delta in [1u8, 0x20, 0x80] {
                let mut m = bytes.to_vec();
                m[i] = m[i].wrapping_add(delta);
                let mut scratch = vec![0u8; m.len()];
                let got = verify(&m, &r, &POLICY, NOW_MS, &mut scratch);
                assert!(got.is_err(), "byte {i} +{delta} accepted");
                tried += 1;
            }
            // Deleting the byte must fail too.
            let mut d = bytes.to_vec();
            d.remove(i);
            let mut scratch = vec![0u8; d.len()];
            assert!(
                verify(&d, &r, &POLICY, NOW_MS, &mut scratch).is_err(),
                "delete {i}"
            );
        }
        assert_eq!(tried, 3 * bytes.len());
    }

    #[test]
    fn each_rejection_is_counted_under_its_own_label() {
        let all = [
            Reject::MissingSignature,
            Reject::MissingField("f"),
            Reject::BadField("f"),
            Reject::DuplicateField,
            Reject::UnknownKid,
            Reject::RetiredKid,
            Reject::BadSignature,
            Reject::Expired,
            Reject::FutureTimestamp,
        ];
        assert_eq!(all.len(), Reject::REASONS.len());
        for r in all {
            assert_eq!(Reject::REASONS[r.index()], r.reason());
        }
    }

    #[test]
    fn each_rejection_has_its_reason() {
        let r = ring(&keys_toml("k1", SECRET));
        let ts = NOW_MS / 1000;
        assert_eq!(check(&query(ts), &r, NOW_MS), Err(Reject::MissingSignature));
        let other = sign(&query(ts), b"another secret of thirty-two bytes!!");
        assert_eq!(check(&other, &r, NOW_MS), Err(Reject::BadSignature));
        let unknown = sign(&query(ts).replace("kid=k1", "kid=k9"), SECRET);
        assert_eq!(check(&unknown, &r, NOW_MS), Err(Reject::UnknownKid));
        let old = sign(&query(ts - 86_401), SECRET);
        assert_eq!(check(&old, &r, NOW_MS), Err(Reject::Expired));
        let future = sign(&query(ts + 301), SECRET);
        assert_eq!(check(&future, &r, NOW_MS), Err(Reject::FutureTimestamp));
        let missing = sign(&query(ts).replace("user_id=u1&", ""), SECRET);
        assert_eq!(
            check(&missing, &r, NOW_MS),
            Err(Reject::MissingField("user_id"))
        );
        let twice = sign(&format!("{}&ad_id=ad2", query(ts)), SECRET);
        assert_eq!(check(&twice, &r, NOW_MS), Err(Reject::DuplicateField));
        let float = sign(&query(ts).replace("0.25", "0.2500001"), SECRET);
        assert_eq!(
            check(&float, &r, NOW_MS),
            Err(Reject::BadField("cost_per_click"))
        );
        let js = sign(
            &query(ts).replace(
                &encode_component("https://shop.example/landing?item=7&ref=ad"),
                "javascript:alert(1)",
            ),
            SECRET,
        );
        assert_eq!(
            check(&js, &r, NOW_MS),
            Err(Reject::BadField("redirect_url"))
        );
        let crlf = sign(
            &query(ts).replace("ref%3Dad", "ref%3Dad%0D%0ASet-Cookie:x"),
            SECRET,
        );
        assert_eq!(
            check(&crlf, &r, NOW_MS),
            Err(Reject::BadField("redirect_url"))
        );
    }

    #[test]
    fn retired_key_verifies_in_grace_and_not_after() {
        let r1 = ring(&format!(
            "{}{}",
            keys_toml("k1", SECRET),
            keys_toml("k2", &[7u8; 32])
        ));
        // Reload without k1: it is retired now, with one hour of grace.
        let r2 =
            KeyRing::parse(&keys_toml("k2", &[7u8; 32]), 3_600_000, Some(&r1), NOW_MS).unwrap();
        assert_eq!(r2.len(), 2);
        let in_grace = NOW_MS + 3_599_000;
        let q = sign(&query(in_grace / 1000), SECRET);
        assert_eq!(check(&q, &r2, in_grace), Ok(()));
        let after = NOW_MS + 3_600_000;
        let q = sign(&query(after / 1000), SECRET);
        assert_eq!(check(&q, &r2, after), Err(Reject::RetiredKid));
        // A later reload after the grace forgets it entirely.
        let r3 = KeyRing::parse(&keys_toml("k2", &[7u8; 32]), 3_600_000, Some(&r2), after).unwrap();
        assert_eq!(r3.len(), 1);
        assert_eq!(check(&q, &r3, after), Err(Reject::UnknownKid));
        // retired_at in the file works across restarts.
        let text = format!(
            "{}retired_at = {}\n",
            keys_toml("k1", SECRET),
            NOW_MS / 1000
        );
        let r4 = KeyRing::parse(&text, 3_600_000, None, NOW_MS).unwrap();
        assert_eq!(
            check(&sign(&query(in_grace / 1000), SECRET), &r4, in_grace),
            Ok(())
        );
        assert_eq!(check(&q, &r4, after), Err(Reject::RetiredKid));
    }

    #[test]
    fn bad_keys_files_name_the_problem() {
        let e = KeyRing::parse(&keys_toml("k1", b"short"), 0, None, 0).unwrap_err();
        assert!(e.to_string().contains("at least 32"), "{e}");
        let e = KeyRing::parse("[[key]]\nkid='a'\nsecret='!!'\n", 0, None, 0).unwrap_err();
        assert!(e.to_string().contains("base64"), "{e}");
        let e = KeyRing::parse("[[key]]\nkid='a'\nsecret='x'\nextra=1\n", 0, None, 0).unwrap_err();
        assert!(e.to_string().contains("extra"), "{e}");
    }

    #[test]
    fn micros_are_exact() {
        assert_eq!(parse_micros(b"0.25"), Some(250_000));
        assert_eq!(parse_micros(b"3"), Some(3_000_000));
        assert_eq!(parse_micros(b"0.000001"), Some(1));
        assert_eq!(parse_micros(b"1."), None);
        assert_eq!(parse_micros(b".5"), None);
        assert_eq!(parse_micros(b"-1"), None);
        assert_eq!(parse_micros(b"1e3"), None);
    }
}
