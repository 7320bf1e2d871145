//! The Kafka sink's drain rate against a real broker on this machine: a
//! store holding `EVENTS` raw events (100 advertisers, 2 gateways'
//! batches, their minute rows) is produced to a private tansu broker
//! (scripts/tansu-local) from empty to caught up; prints events and rows
//! per second, the sink's CPU per event (the bench process's, which does
//! nothing else meanwhile) and the broker's.
//!
//! `cargo bench -p clickgate-aggregator --bench kafka` (pin it with
//! `taskset -c 1`; the broker runs wherever the scheduler puts it).
//! `KAFKA_BENCH_EVENTS` overrides the count (default 200000).

use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use aggregator::kafka::{self, KafkaStats};
use aggregator::store::{Settings, Sink, Store};

#[path = "../tests/common/mod.rs"]
mod common;
use common::{Gw, T};

fn ticks(pid: u32) -> f64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let f: Vec<&str> = s.rsplit_once(')').unwrap().1.split_whitespace().collect();
    (f[11].parse::<f64>().unwrap() + f[12].parse::<f64>().unwrap()) / 100.0
}

fn main() {
    let events: usize = std::env::var("KAFKA_BENCH_EVENTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(200_000);
    let Some(broker) = test_support::kafka::Tansu::start_release() else {
        return;
    };
    let d = tempfile::tempdir().unwrap();
    let store = Arc::new(
        Store::open(
            &d.path().join("s.redb"),
            Settings {
                kafka: true,
                ..Settings::default()
            },
        )
        .unwrap(),
    );
    let now = T + 3_600_000;
    let names = ["gwa", "gwb"];
    let mut gws: Vec<Gw> = names.iter().map(|n| Gw::new(n)).collect();
    let per_ship = 2000;
    for i in 0..events {
        let g = &mut gws[i % names.len()];
        g.click_for(
            &format!("adv-{}", i % 100),
            &format!("c{i}"),
            T + (i as i64 % 3_000_000),
        );
        if (i + 1) % (per_ship * names.len()) == 0 {
            for g in gws.iter_mut() {
                g.ship(&store, now);
            }
        }
    }
    for g in gws.iter_mut() {
        g.ship(&store, now);
    }
    let rows = store.export_backlog(Sink::Kafka).unwrap();
    let (entries, _) = store.kafka_events_backlog().unwrap();
    println!("kafka_bench store: {events} events in {entries} entries, {rows} rows");
    let cfg = kafka::Settings {
        bootstrap: vec![broker.addr()],
        replication_factor: 1,
        ..kafka::Settings::default()
    };
    let stats = Arc::new(KafkaStats::default());
    let stop = Arc::new(AtomicBool::new(false));
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let (me, b) = (std::process::id(), broker.pid.unwrap() as u32);
    let (cpu0, bcpu0, t0) = (ticks(me), ticks(b), Instant::now());
    let sink = rt.spawn(kafka::run_sink(
        store.clone(),
        cfg,
        store.store_id().unwrap(),
        stats.clone(),
        stop.clone(),
    ));
    while store.export_backlog(Sink::Kafka).unwrap() + store.kafka_events_backlog().unwrap().0 > 0 {
        assert!(
            t0.elapsed() < Duration::from_secs(600),
            "not drained in 10 minutes"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    let secs = t0.elapsed().as_secs_f64();
    let (cpu, bcpu) = (ticks(me) - cpu0, ticks(b) - bcpu0);
    stop.store(true, Relaxed);
    rt.block_on(sink).unwrap();
    let ev = stats.event_records.load(Relaxed);
    let rw = stats.row_records.load(Relaxed);
    println!(
        "kafka_bench drained {ev} event and {rw} row records in {secs:.2} s: events_per_s={:.0} rows_per_s={:.0} \
         sink_cpu_us_per_event={:.2} broker_cpu_us_per_event={:.2} produce_requests={} errors={}",
        ev as f64 / secs,
        rw as f64 / secs,
        cpu * 1e6 / ev as f64,
        bcpu * 1e6 / ev as f64,
        stats.produce_requests.load(Relaxed),
        stats.errors.load(Relaxed)
    );
}
