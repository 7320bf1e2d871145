//! The gateway's two clocks, read by the shells and passed to the core.

use std::time::{Instant, SystemTime, UNIX_EPOCH};

/// Milliseconds since the Unix epoch: event times, minutes, key grace. (Plus
/// the test hooks' offset, 0 in release builds.)
pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
        + daemon::faults::clock_offset_ms()
}

/// Milliseconds on a monotonic clock (since the process first asked): what
/// timers and intervals are measured by, so a wall-clock step (NTP, a VM
/// resumed) neither stalls nor fires them. Event times use [`now_ms`].
pub fn mono_ms() -> i64 {
    static START: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    START.get_or_init(Instant::now).elapsed().as_millis() as i64
}
