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

/// Counts clicks per (address, ad) per minute, in a table allocated once.
///
/// A slot holds a keyed hash of (address, ad), the minute it was claimed
/// and its count; a slot of an older minute is free, so the minute's turn
/// forgets everything without touching memory. The table has twice as many
/// slots as pairs it tracks, in transparent huge pages: it is probed at
/// random, and a grown heap table missed the TLB on most clicks (and stalled
/// one click per minute while it rehashed).
pub struct Velocity {
    slots: Box<[VelocitySlot]>,
    mask: usize,
    minute: u32,
    /// Pairs claimed in `minute`.
    live: usize,
    per_minute_max: u32,
    entries_max: usize,
    hasher: std::collections::hash_map::RandomState,
}

/// All-zero bytes are a free slot (see `sys::zeroed_huge_slice`).
#[derive(Clone, Copy)]
#[repr(C, align(16))]
struct VelocitySlot {
    key: u64,
    minute: u32,
    count: u32,
}

/// Slots looked at before a pair is left untracked. At the table's load of
/// at most one half a run this long is vanishingly rare (a window of 8 failed
/// this module's test at that load), and the scan stops at the first
/// free slot, so the bound costs nothing in the usual case.
const VELOCITY_PROBE: usize = 64;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pace {
    Ok,
    TooFast,
    Untracked,
}

impl Velocity {
    /// `per_minute_max == 0` disables the filter (and allocates nothing).
    pub fn new(per_minute_max: u32, entries_max: usize) -> Self {
        let n = if per_minute_max == 0 {
            1
        } else {
            (entries_max.max(VELOCITY_PROBE) * 2).next_power_of_two()
        };
        Self {
            slots: crate::sys::zeroed_huge_slice::<VelocitySlot>(n),
            mask: n - 1,
            minute: 0,
            live: 0,
            per_minute_max,
            entries_max,
            hasher: Default::default(),
        }
    }

    pub fn enabled(&self) -> bool {
        self.per_minute_max > 0
    }

    /// The key `check_key` takes for (address, ad): SipHash under a
    /// per-process key, since clients choose their addresses.
    pub fn key(&self, addr: &[u8; 16], ad_id: &[u8]) -> u64 {
        self.hasher.hash_one((addr, ad_id))
    }

    /// Starts loading the slot of `key`, so the miss overlaps other work.
    pub fn prefetch(&self, key: u64) {
        crate::sys::prefetch(&self.slots[key as usize & self.mask]);
    }

    pub fn check(&mut self, addr: &[u8; 16], ad_id: &str, minute: u32) -> Pace {
        self.check_key(self.key(addr, ad_id.as_bytes()), minute)
    }

    /// `check` for a key from [`Self::key`].
    pub fn check_key(&mut self, key: u64, minute: u32) -> Pace {
        if self.per_minute_max == 0 {
            return Pace::Ok;
        }
        // Minute 0 would match the table's zeroed slots (never a real minute).
        let minute = minute.max(1);
        if minute != self.minute {
            self.minute = minute;
            self.live = 0;
        }
        // Nothing is removed within a minute, so a pair is always before the
        // first free slot of its window: the scan stops there.
        for i in 0..VELOCITY_PROBE {
            let s = &mut self.slots[(key as usize).wrapping_add(i) & self.mask];
            if s.minute != minute {
                if self.live >= self.entries_max {
                    return Pace::Untracked;
                }
                self.live += 1;
                *s = VelocitySlot {
                    key,
                    minute,
                    count: 1,
                };
                return self.pace(1);
            }
            if s.key == key {
                s.count = s.count.saturating_add(1);
                let count = s.count;
                return self.pace(count);
            }
        }
        Pace::Untracked
    }

    fn pace(&self, count: u32) -> Pace {
        if count > self.per_minute_max {
            Pace::TooFast
        } else {
            Pace::Ok
        }
    }

    /// Pairs tracked in the current minute.
    pub fn entries(&self) -> usize {
        self.live
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
    fn velocity_counts_match_a_map_and_stay_within_the_entry_limit() {
        // 3 000 pairs drawn with repeats into a table for 2 000: each answer
        // must be what an unbounded map would say, or Untracked once the
        // limit is reached (never a wrong count).
        let mut v = Velocity::new(5, 2_000);
        let mut model = std::collections::HashMap::<(u8, u16), u32>::new();
        let mut seed = 0x2545_F491_4F6C_DD1Du64;
        let (mut untracked, mut too_fast) = (0, 0);
        for minute in [100u32, 101] {
            model.clear();
            for _ in 0..20_000 {
                crate::xorshift64(&mut seed);
                let (a, ad) = ((seed % 30) as u8, ((seed >> 8) % 100) as u16);
                let addr = [a; 16];
                let got = v.check(&addr, &ad.to_string(), minute);
                let known = model.len();
                let n = model.entry((a, ad)).or_insert(0);
                if *n == 0 && known >= 2_000 {
                    assert_eq!(got, Pace::Untracked);
                    model.remove(&(a, ad));
                    untracked += 1;
                    continue;
                }
                *n += 1;
                let want = if *n > 5 { Pace::TooFast } else { Pace::Ok };
                too_fast += usize::from(want == Pace::TooFast);
                assert_eq!(got, want, "pair {a}/{ad} in minute {minute}");
            }
            assert!(v.entries() <= 2_000);
        }
        assert!(untracked > 0 && too_fast > 0, "{untracked} {too_fast}");
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
