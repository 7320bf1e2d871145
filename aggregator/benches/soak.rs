//! Retention at a steady load: does the store file level off, and what do
//! the tiers cost per click?
//!
//! Two gateways ship a steady stream of clicks; the reconciler, the sealer
//! (Parquet into a local-directory object store) and retention run as in the
//! aggregator, with retention shortened (rows and the late table 1 hour,
//! hot raw events 30 minutes after their hour is sealed, correction horizon
//! 10 minutes). Hours are sealed only once reconciliation has passed them,
//! so the soak drives the same code with a simulated clock (every step takes
//! `now` as an argument): `HOURS` hours of traffic in about a minute.
//!
//! `cargo bench -p clickgate-aggregator --bench soak` (pin it with
//! `taskset -c 1`). Prints the store file's size each simulated hour, then
//! bytes per click in the store and in object storage, and the share of the
//! time each part took.

use std::sync::Arc;
use std::time::{Duration, Instant};

use aggregator::audit::{self, SealStats};
use aggregator::merge::Rules;
use aggregator::metrics::ReconcileStats;
use aggregator::reconcile::{self, Reconciler, Turn};
use aggregator::retention::{self, RetentionStats};
use aggregator::store::{Settings, Store};

#[path = "../tests/common/mod.rs"]
mod common;
use common::{Gw, T};

const HOURS: i64 = 10;
const CLICKS_PER_MINUTE: i64 = 3000;

fn main() {
    // The same traffic without retention first: what the store would grow to.
    let without = soak(false);
    let with = soak(true);
    for (h, (a, b)) in without.iter().zip(&with).enumerate() {
        println!(
            "soak_store_file hour {:>2} without_retention {:>6.1} MB with_retention {:>6.1} MB",
            h + 1,
            *a as f64 / 1e6,
            *b as f64 / 1e6
        );
    }
}

/// Runs the soak; answers the store file's size each simulated hour.
fn soak(retain: bool) -> Vec<u64> {
    let d = tempfile::tempdir().unwrap();
    let path = d.path().join("soak.redb");
    let store = Arc::new(
        Store::open(
            &path,
            Settings {
                rules: Rules {
                    lateness_ms: 60_000,
                    horizon_ms: 600_000,
                    ..Rules::default()
                },
                export: false,
                ..Default::default()
            },
        )
        .unwrap(),
    );
    let ret = if retain {
        retention::Settings {
            rows_ms: 3_600_000,
            late_ms: 3_600_000,
            audit_hot_grace_ms: 1_800_000,
            ..retention::Settings::default()
        }
    } else {
        retention::Settings {
            audit_hot_grace_ms: i64::MAX / 4,
            ..retention::Settings::default()
        }
    };
    ret.validate(60_000, 600_000).unwrap();
    let audit_cfg = audit::Settings::default();
    let target = audit_cfg.target(&path).unwrap();
    let (objects, prefix) = audit::open(&audit_cfg, &target).unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let cold = Arc::new(audit::ColdReader {
        objects: objects.clone(),
        prefix: prefix.clone(),
        rt: rt.handle().clone(),
    });
    let mut r = Reconciler::new(
        store.clone(),
        reconcile::Settings::default(),
        Arc::new(ReconcileStats::default()),
    )
    .with_cold(Some(cold));
    let seal_stats = SealStats::default();
    let ret_stats = RetentionStats::default();
    let (mut a, mut b) = (Gw::new("gwa"), Gw::new("gwb"));
    let mut took = [Duration::ZERO; 4]; // apply, reconcile, seal, retention
    let mut sizes = Vec::new();
    let mut clicks = 0i64;
    let mut n = 0u64;
    for minute in 0..HOURS * 60 {
        let t0 = T + minute * 60_000;
        let now = t0 + 61_000;
        let t = Instant::now();
        for i in 0..CLICKS_PER_MINUTE {
            n += 1;
            let (gw, ms) = if i % 2 == 0 { (&mut a, 0) } else { (&mut b, 7) };
            gw.click_by(
                &format!("c{n}"),
                t0 + i * 60_000 / CLICKS_PER_MINUTE + ms,
                &format!("user-{}", n % 50_000),
            );
        }
        a.ship(&store, now);
        b.ship(&store, now);
        clicks += CLICKS_PER_MINUTE;
        took[0] += t.elapsed();
        let t = Instant::now();
        let mut idle = 0;
        while idle < 3 {
            match r.turn(now).unwrap() {
                Turn::Worked(_) => idle = 0,
                _ => idle += 1,
            }
        }
        took[1] += t.elapsed();
        if minute % 10 == 9 {
            let t = Instant::now();
            rt.block_on(audit::seal_pass(
                &store,
                &objects,
                &prefix,
                &audit_cfg,
                &seal_stats,
                now,
                64,
            ))
            .unwrap();
            took[2] += t.elapsed();
            let t = Instant::now();
            while retention::store_round(&store, &ret, true, &ret_stats, now, 64).unwrap() {}
            took[3] += t.elapsed();
        }
        if minute % 60 == 59 {
            sizes.push(store.file_bytes());
        }
    }
    if !retain {
        return sizes;
    }
    let total: Duration = took.iter().sum();
    let share = |x: Duration| 100.0 * x.as_secs_f64() / total.as_secs_f64();
    let object_bytes: u64 = walk(&d.path().join("audit"));
    let sealed_rows = seal_stats.rows.load(std::sync::atomic::Ordering::Relaxed);
    // The steady state holds about (hot hour + grace + the open hour) of
    // raw events and an hour of rows: bytes per click of what it holds.
    let last = *sizes.last().unwrap();
    let held_clicks = 3 * 60 * CLICKS_PER_MINUTE; // about three hours' worth at most
    println!("soak_clicks {clicks}");
    println!(
        "soak_store_growth_last_3h {:+.1} %",
        100.0 * (last as f64 - sizes[sizes.len() - 4] as f64) / sizes[sizes.len() - 4] as f64
    );
    println!(
        "soak_store_bytes_per_click_held {:.0} (file {last} B over at most {held_clicks} clicks held)",
        last as f64 / held_clicks as f64
    );
    println!(
        "soak_object_bytes_per_click {:.1} ({object_bytes} B, {sealed_rows} events sealed)",
        object_bytes as f64 / sealed_rows.max(1) as f64
    );
    println!(
        "soak_time_share apply {:.1} % reconcile {:.1} % seal {:.1} % retention {:.1} % (of {:.1} s)",
        share(took[0]),
        share(took[1]),
        share(took[2]),
        share(took[3]),
        total.as_secs_f64()
    );
    let ns = |x: Duration| x.as_nanos() as f64 / clicks as f64;
    println!(
        "soak_ns_per_click apply {:.0} reconcile {:.0} seal {:.0} retention {:.0} (one core; seal at 50 000 clicks/s = {:.1} % of a core)",
        ns(took[0]),
        ns(took[1]),
        ns(took[2]),
        ns(took[3]),
        ns(took[2]) * 50_000.0 / 1e9 * 100.0
    );
    println!(
        "soak_dropped rows {} audit_entries {} marks {}",
        ret_stats.rows.load(std::sync::atomic::Ordering::Relaxed),
        ret_stats
            .audit_entries
            .load(std::sync::atomic::Ordering::Relaxed),
        ret_stats.marks.load(std::sync::atomic::Ordering::Relaxed)
    );
    sizes
}

fn walk(dir: &std::path::Path) -> u64 {
    let mut n = 0;
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let p = e.path();
        n += if p.is_dir() {
            walk(&p)
        } else {
            e.metadata().map_or(0, |m| m.len())
        };
    }
    n
}
