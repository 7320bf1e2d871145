//! Per-shard traffic policing: a token bucket per client address (429 above a
//! rate) and a velocity filter per (client address, ad) (clicks above a rate
//! in one minute are flagged invalid: redirected and logged, not billable).
//!
//! Both are shard-local (shared nothing). With SO_REUSEPORT one client's
//! connections may spread over several shards, so the host-wide limit is at
//! most `shards x` the configured one; configure per shard accordingly.
//! Both maps are bounded: when full, a new address is not tracked (and that is
//! counted) rather than growing memory.

use std::collections::HashMap;
use std::hash::BuildHasher;

use wire::record::Device;

pub struct RateLimiter {
    buckets: HashMap<[u8; 16], Bucket>,
    rate_per_s: f64,
    burst: f64,
    entries_max: usize,
}

struct Bucket {
    tokens: f64,
    at_ms: i64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admit {
    Yes,
    /// Over the rate: answer 429 with Retry-After of this many seconds.
    Limited {
        retry_after_s: u32,
    },
    /// The table is full; admitted untracked.
    Untracked,
}

impl RateLimiter {
    /// `rate_per_s == 0` disables the limiter.
    pub fn new(rate_per_s: u32, burst: u32, entries_max: usize) -> Self {
        Self {
            buckets: HashMap::with_capacity(entries_max.min(1 << 16)),
            rate_per_s: rate_per_s as f64,
            burst: burst.max(1) as f64,
            entries_max,
        }
    }

    pub fn admit(&mut self, addr: [u8; 16], now_ms: i64) -> Admit {
        if self.rate_per_s == 0.0 {
            return Admit::Yes;
        }
        let len = self.buckets.len();
        let b = match self.buckets.get_mut(&addr) {
            Some(b) => b,
            None if len >= self.entries_max => return Admit::Untracked,
            None => self.buckets.entry(addr).or_insert(Bucket {
                tokens: self.burst,
                at_ms: now_ms,
            }),
        };
        let dt = (now_ms - b.at_ms).max(0) as f64 / 1000.0;
        b.tokens = (b.tokens + dt * self.rate_per_s).min(self.burst);
        b.at_ms = now_ms;
        if b.tokens >= 1.0 {
            b.tokens -= 1.0;
            Admit::Yes
        } else {
            let wait = (1.0 - b.tokens) / self.rate_per_s;
            Admit::Limited {
                retry_after_s: wait.ceil().max(1.0) as u32,
            }
        }
    }

    /// Forgets buckets that have refilled (they hold no information).
    pub fn sweep(&mut self, now_ms: i64) {
        let (rate, burst) = (self.rate_per_s, self.burst);
        self.buckets
            .retain(|_, b| b.tokens + (now_ms - b.at_ms).max(0) as f64 / 1000.0 * rate < burst);
    }

    pub fn entries(&self) -> usize {
        self.buckets.len()
    }
}

/// Counts clicks per (address, ad) per minute.
pub struct Velocity {
    /// (keyed hash of (address, ad), count): the key is already a SipHash
    /// under a per-process key, so the table does not hash it again.
    counts: hashbrown::HashTable<(u64, u32)>,
    minute: u32,
    per_minute_max: u32,
    entries_max: usize,
    hasher: std::collections::hash_map::RandomState,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pace {
    Ok,
    TooFast,
    Untracked,
}

impl Velocity {
    /// `per_minute_max == 0` disables the filter.
    pub fn new(per_minute_max: u32, entries_max: usize) -> Self {
        Self {
            counts: hashbrown::HashTable::with_capacity(entries_max.min(1 << 16)),
            minute: 0,
            per_minute_max,
            entries_max,
            hasher: Default::default(),
        }
    }

    pub fn check(&mut self, addr: &[u8; 16], ad_id: &str, minute: u32) -> Pace {
        if self.per_minute_max == 0 {
            return Pace::Ok;
        }
        if minute != self.minute {
            self.counts.clear();
            self.minute = minute;
        }
        let key = self.hasher.hash_one((addr, ad_id));
        let len = self.counts.len();
        let n = match self.counts.find_mut(key, |&(k, _)| k == key) {
            Some((_, n)) => n,
            None if len >= self.entries_max => return Pace::Untracked,
            None => {
                &mut self
                    .counts
                    .insert_unique(key, (key, 0), |&(k, _)| k)
                    .into_mut()
                    .1
            }
        };
        *n += 1;
        if *n > self.per_minute_max {
            Pace::TooFast
        } else {
            Pace::Ok
        }
    }
}

/// Coarse device type from a User-Agent: one lower-casing copy of its first
/// 512 bytes, then SIMD substring searches in order of precedence, with the
/// searchers built once per process (building one per call was the cost).
pub fn device_of(ua: &[u8]) -> Device {
    use memchr::memmem::Finder;
    use std::sync::OnceLock;
    const PATTERNS: [&[u8]; 13] = [
        b"bot",
        b"crawl",
        b"spider",
        b"curl/",
        b"wget", // 0..5: bot
        b"ipad",
        b"tablet", // 5..7: tablet
        b"android",
        b"mobile",
        b"mobi",
        b"iphone", // 7..11
        b"windows",
        b"macintosh", // desktop (with x11, linux, cros below)
    ];
    const DESKTOP_MORE: [&[u8]; 3] = [b"x11", b"linux", b"cros"];
    static FINDERS: OnceLock<Vec<Finder<'static>>> = OnceLock::new();
    let f = FINDERS.get_or_init(|| {
        PATTERNS
            .iter()
            .chain(DESKTOP_MORE.iter())
            .map(|p| Finder::new(p).into_owned())
            .collect()
    });
    if ua.is_empty() {
        return Device::Other;
    }
    let mut low = [0u8; 512];
    let n = ua.len().min(low.len());
    for (d, s) in low[..n].iter_mut().zip(ua) {
        *d = s.to_ascii_lowercase();
    }
    let ua = &low[..n];
    let has = |i: usize| f[i].find(ua).is_some();
    if (0..5).any(has) {
        Device::Bot
    } else if has(5) || has(6) {
        Device::Tablet
    } else if has(7) {
        if has(8) {
            Device::Mobile
        } else {
            Device::Tablet
        }
    } else if has(9) || has(10) {
        Device::Mobile
    } else if (11..16).any(has) {
        Device::Desktop
    } else {
        Device::Other
    }
}

/// Country from the trusted header: two ASCII letters, upper-cased; else `ZZ`.
pub fn country_of(v: Option<&[u8]>) -> [u8; 2] {
    match v {
        Some([a, b]) if a.is_ascii_alphabetic() && b.is_ascii_alphabetic() => {
            [a.to_ascii_uppercase(), b.to_ascii_uppercase()]
        }
        _ => *b"ZZ",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bucket_limits_and_refills() {
        let mut l = RateLimiter::new(10, 5, 100);
        let a = [1; 16];
        for _ in 0..5 {
            assert_eq!(l.admit(a, 0), Admit::Yes);
        }
        assert!(matches!(l.admit(a, 0), Admit::Limited { retry_after_s: 1 }));
        assert_eq!(l.admit(a, 100), Admit::Yes);
        assert_eq!(l.admit([2; 16], 100), Admit::Yes);
    }

    #[test]
    fn limiter_table_is_bounded_and_swept() {
        let mut l = RateLimiter::new(10, 5, 2);
        assert_eq!(l.admit([1; 16], 0), Admit::Yes);
        assert_eq!(l.admit([2; 16], 0), Admit::Yes);
        assert_eq!(l.admit([3; 16], 0), Admit::Untracked);
        l.sweep(10_000);
        assert_eq!(l.entries(), 0);
    }

    #[test]
    fn velocity_flags_above_the_rate_and_resets_each_minute() {
        let mut v = Velocity::new(3, 100);
        let a = [1; 16];
        for _ in 0..3 {
            assert_eq!(v.check(&a, "ad", 1), Pace::Ok);
        }
        assert_eq!(v.check(&a, "ad", 1), Pace::TooFast);
        assert_eq!(v.check(&a, "other", 1), Pace::Ok);
        assert_eq!(v.check(&a, "ad", 2), Pace::Ok);
    }

    #[test]
    fn devices_are_classified_coarsely() {
        let cases: &[(&str, Device)] = &[
            (
                "Mozilla/5.0 (iPhone; CPU iPhone OS 17_0 like Mac OS X) Mobile/15E148",
                Device::Mobile,
            ),
            (
                "Mozilla/5.0 (Linux; Android 14; Pixel 8) Mobile Safari/537.36",
                Device::Mobile,
            ),
            (
                "Mozilla/5.0 (Linux; Android 13; SM-X200) Safari/537.36",
                Device::Tablet,
            ),
            (
                "Mozilla/5.0 (iPad; CPU OS 17_0 like Mac OS X)",
                Device::Tablet,
            ),
            (
                "Mozilla/5.0 (Windows NT 10.0; Win64; x64) Chrome/120",
                Device::Desktop,
            ),
            (
                "Googlebot/2.1 (+http://www.google.com/bot.html)",
                Device::Bot,
            ),
            ("curl/8.5.0", Device::Bot),
            ("", Device::Other),
            ("SomethingElse/1.0", Device::Other),
        ];
        for (ua, d) in cases {
            assert_eq!(device_of(ua.as_bytes()), *d, "{ua}");
        }
    }

    #[test]
    fn country_header_is_checked() {
        assert_eq!(country_of(Some(b"de")), *b"DE");
        assert_eq!(country_of(Some(b"DEU")), *b"ZZ");
        assert_eq!(country_of(Some(b"1A")), *b"ZZ");
        assert_eq!(country_of(None), *b"ZZ");
    }
}
