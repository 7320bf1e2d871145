//! Named crash points for tests. `CLICKGATE_CRASH_AT=<name>:<n>` makes the
//! process abort (as a crash would: no destructors, no flushing) the n-th time
//! it passes the point `name`. Unset in production; one relaxed atomic
//! increment per pass when set, one branch on a cached `None` when not.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

struct Armed {
    name: String,
    at: u64,
    seen: AtomicU64,
}

fn armed() -> Option<&'static Armed> {
    static ARMED: OnceLock<Option<Armed>> = OnceLock::new();
    ARMED
        .get_or_init(|| {
            let v = std::env::var("CLICKGATE_CRASH_AT").ok()?;
            let (name, at) = v.rsplit_once(':')?;
            Some(Armed {
                name: name.to_owned(),
                at: at.parse().ok()?,
                seen: AtomicU64::new(0),
            })
        })
        .as_ref()
}

/// Passes the crash point `name`; aborts the process if it is armed and due.
pub fn hit(name: &str) {
    if let Some(a) = armed() {
        if a.name == name && a.seen.fetch_add(1, Ordering::Relaxed) + 1 == a.at {
            eprintln!("crash point {name} reached (CLICKGATE_CRASH_AT): aborting");
            std::process::abort();
        }
    }
}
