//! How long a shard's log can keep taking clicks while nothing ships, and
//! when the host should step aside: arithmetic over what the log reports
//! ([`BufferStats`]) and the bytes appended, with the times passed in.
//!
//! - The append rate is an exponentially weighted average of the bytes
//!   appended per second (time constant [`RATE_TAU_MS`]), so one busy second
//!   neither hides nor raises the alarm by itself.
//! - Seconds left: the budget not held by unshipped data, over the rate at
//!   which appends take disk once sealed segments are compressed (the ratio
//!   the log measured so far; 1.0 before its first compressed segment, so
//!   the figure starts pessimistic). It answers "how long could this PoP
//!   ride out a central outage that starts now".
//! - Stepping aside: once unshipped data takes `unready_at` of the budget,
//!   the shard says so (the host's `/readyz` turns 503 and anycast or DNS
//!   moves new traffic elsewhere); it comes back only below `ready_below`,
//!   so a PoP at the mark does not flap.

use crate::log::BufferStats;

/// Time constant of the append rate, ms.
pub const RATE_TAU_MS: f64 = 30_000.0;

#[derive(Debug, Clone)]
pub struct BufferGauge {
    unready_at: f64,
    ready_below: f64,
    stepped_aside: bool,
    /// Appended bytes per second, smoothed.
    rate: f64,
    /// (monotonic ms, bytes appended) at the previous update.
    last: Option<(i64, u64)>,
}

/// What [`BufferGauge::update`] found.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BufferReport {
    /// Unshipped bytes over the budget.
    pub share: f64,
    /// Past `unready_at`, and not yet back below `ready_below`.
    pub stepped_aside: bool,
    /// Seconds until the budget is full at the current rate if nothing
    /// ships from now on (infinite while nothing is appended).
    pub seconds_left: f64,
    /// Age of the oldest record not yet shipped, ms (0 when none).
    pub oldest_unshipped_age_ms: u64,
    /// The smoothed append rate, bytes per second.
    pub append_bytes_per_s: f64,
}

impl BufferGauge {
    /// `0 < ready_below < unready_at <= 1` (the config checks it).
    pub fn new(unready_at: f64, ready_below: f64) -> Self {
        assert!(0.0 < ready_below && ready_below < unready_at && unready_at <= 1.0);
        Self {
            unready_at,
            ready_below,
            stepped_aside: false,
            rate: 0.0,
            last: None,
        }
    }

    /// Takes in the log's state at `mono_ms` (monotonic) and `now_ms`
    /// (wall), with `appended_bytes` the shard's running total.
    pub fn update(
        &mut self,
        mono_ms: i64,
        now_ms: i64,
        appended_bytes: u64,
        stats: &BufferStats,
    ) -> BufferReport {
        if let Some((t, b)) = self.last {
            let dt = (mono_ms - t) as f64;
            if dt > 0.0 {
                let inst = appended_bytes.saturating_sub(b) as f64 * 1000.0 / dt;
                let alpha = 1.0 - (-dt / RATE_TAU_MS).exp();
                self.rate += alpha * (inst - self.rate);
            }
        }
        self.last = Some((mono_ms, appended_bytes));
        let budget = stats.budget_bytes.max(1) as f64;
        let share = stats.unshipped_bytes as f64 / budget;
        if share >= self.unready_at {
            self.stepped_aside = true;
        } else if share < self.ready_below {
            self.stepped_aside = false;
        }
        let free = stats.budget_bytes.saturating_sub(stats.unshipped_bytes) as f64;
        let disk_rate = self.rate * stats.disk_per_raw;
        // Below a byte a second nothing is really being appended.
        let seconds_left = if disk_rate < 1.0 {
            f64::INFINITY
        } else {
            free / disk_rate
        };
        BufferReport {
            share,
            stepped_aside: self.stepped_aside,
            seconds_left,
            oldest_unshipped_age_ms: stats
                .oldest_unshipped_ms
                .map_or(0, |t| now_ms.saturating_sub(t).max(0) as u64),
            append_bytes_per_s: self.rate,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stats(unshipped: u64, disk_per_raw: f64) -> BufferStats {
        BufferStats {
            budget_bytes: 1000,
            unshipped_bytes: unshipped,
            disk_bytes: unshipped,
            oldest_unshipped_ms: Some(10_000),
            disk_per_raw,
        }
    }

    #[test]
    fn steps_aside_at_the_mark_and_back_only_below_the_lower_one() {
        let mut g = BufferGauge::new(0.9, 0.8);
        let path = [
            (500, false),
            (899, false),
            (900, true),
            (950, true),
            (850, true), // between the marks: stays aside
            (800, true),
            (799, false),
            (850, false), // between the marks, coming up: stays ready
            (900, true),
        ];
        for (i, (unshipped, aside)) in path.into_iter().enumerate() {
            let r = g.update(i as i64 * 50, 0, 0, &stats(unshipped, 1.0));
            assert_eq!(r.stepped_aside, aside, "step {i} at {unshipped}");
        }
    }

    #[test]
    fn seconds_left_follow_the_rate_and_the_compression() {
        let mut g = BufferGauge::new(0.9, 0.8);
        // 100 bytes a second for long enough that the average settles.
        let mut r = g.update(0, 0, 0, &stats(400, 1.0));
        assert!(r.seconds_left.is_infinite());
        for s in 1..=600 {
            r = g.update(s * 1000, s * 1000, s as u64 * 100, &stats(400, 1.0));
        }
        assert!((r.append_bytes_per_s - 100.0).abs() < 0.1, "{r:?}");
        assert!((r.seconds_left - 6.0).abs() < 0.01, "{r:?}");
        // Sealed segments compress 8x: the same free room lasts 8x longer.
        let r = g.update(601_000, 601_000, 60_100, &stats(400, 0.125));
        assert!((r.seconds_left - 48.0).abs() < 0.1, "{r:?}");
        assert_eq!(r.oldest_unshipped_age_ms, 591_000);
        // The rate falls away once appends stop.
        let mut r = r;
        for s in 602..=1200 {
            r = g.update(s * 1000, s * 1000, 60_100, &stats(400, 0.125));
        }
        assert!(r.append_bytes_per_s < 0.01, "{r:?}");
        assert!(r.seconds_left.is_infinite());
    }
}
