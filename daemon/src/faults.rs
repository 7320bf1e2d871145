//! Test hooks, one module and one switch (the `fault-injection` feature).
//!
//! - `CLICKGATE_CRASH_AT=<name>:<n>`: [`crash_point`] aborts the process
//!   (as a crash would: no destructors, no flushing) the n-th time it passes
//!   the point `name`.
//! - `CLICKGATE_INJECT_WRITE_ERROR_AFTER=<n>`: after n durable writes have
//!   succeeded, [`fail_durable_write`] says every later one failed (EIO), as
//!   a failing disk would.
//! - `CLICKGATE_INJECT_CLOCK_FILE=<path>`: [`clock_offset_ms`] is the signed
//!   number of milliseconds in that file, re-read every 20 ms: a clock that is
//!   off, or jumps.
//!
//! Without the feature every function here is an empty inline one, so a
//! release binary holds neither the variables' names nor a branch on them.

#[cfg(feature = "fault-injection")]
mod armed {
    use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
    use std::sync::OnceLock;
    use std::time::Duration;

    struct CrashAt {
        name: String,
        at: u64,
        seen: AtomicU64,
    }

    fn crash_at() -> Option<&'static CrashAt> {
        static ARMED: OnceLock<Option<CrashAt>> = OnceLock::new();
        ARMED
            .get_or_init(|| {
                let v = std::env::var("CLICKGATE_CRASH_AT").ok()?;
                let (name, at) = v.rsplit_once(':')?;
                Some(CrashAt {
                    name: name.to_owned(),
                    at: at.parse().ok()?,
                    seen: AtomicU64::new(0),
                })
            })
            .as_ref()
    }

    pub fn crash_point(name: &str) {
        if let Some(a) = crash_at() {
            if a.name == name && a.seen.fetch_add(1, Ordering::Relaxed) + 1 == a.at {
                eprintln!("crash point {name} reached (CLICKGATE_CRASH_AT): aborting");
                std::process::abort();
            }
        }
    }

    pub fn fail_durable_write() -> bool {
        // The writes left to succeed; u64::MAX when the variable is unset.
        static LEFT: OnceLock<AtomicU64> = OnceLock::new();
        let left = LEFT.get_or_init(|| {
            let n = std::env::var("CLICKGATE_INJECT_WRITE_ERROR_AFTER")
                .ok()
                .and_then(|v| v.parse().ok())
                .unwrap_or(u64::MAX);
            AtomicU64::new(n)
        });
        left.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
            (n != u64::MAX && n > 0).then(|| n - 1)
        })
        .is_err_and(|n| n == 0)
    }

    pub fn clock_offset_ms() -> i64 {
        static OFFSET: AtomicI64 = AtomicI64::new(0);
        static WATCH: OnceLock<()> = OnceLock::new();
        WATCH.get_or_init(|| {
            let Some(path) = std::env::var_os("CLICKGATE_INJECT_CLOCK_FILE") else {
                return;
            };
            let read = move || {
                if let Some(off) = std::fs::read_to_string(&path)
                    .ok()
                    .and_then(|t| t.trim().parse::<i64>().ok())
                {
                    OFFSET.store(off, Ordering::Relaxed);
                }
            };
            read();
            std::thread::Builder::new()
                .name("clock-offset".into())
                .spawn(move || loop {
                    std::thread::sleep(Duration::from_millis(20));
                    read();
                })
                .expect("spawning the clock-offset thread");
        });
        OFFSET.load(Ordering::Relaxed)
    }
}

/// Passes the crash point `name`; aborts the process if it is armed and due.
#[inline(always)]
pub fn crash_point(name: &str) {
    #[cfg(feature = "fault-injection")]
    armed::crash_point(name);
    #[cfg(not(feature = "fault-injection"))]
    let _ = name;
}

/// Whether the durable write that just completed is to be taken as failed.
#[inline(always)]
pub fn fail_durable_write() -> bool {
    #[cfg(feature = "fault-injection")]
    return armed::fail_durable_write();
    #[cfg(not(feature = "fault-injection"))]
    false
}

/// Milliseconds to add to the wall clock (0 unless a test set an offset).
#[inline(always)]
pub fn clock_offset_ms() -> i64 {
    #[cfg(feature = "fault-injection")]
    return armed::clock_offset_ms();
    #[cfg(not(feature = "fault-injection"))]
    0
}

/// Whether this build carries the hooks (a test that needs one says so
/// plainly instead of passing vacuously).
pub const ENABLED: bool = cfg!(feature = "fault-injection");
