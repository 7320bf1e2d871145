//! The log as a buffer through a central outage, against the real binary:
//! sealed segments compressed at the PoP, and a crash at every step of it.

use std::collections::HashMap;
use std::io::Write;
use std::time::Duration;

mod common;
use common::*;

/// How often each click id appears among the log's event records.
fn id_counts(inspect: &str) -> HashMap<String, usize> {
    let mut m = HashMap::new();
    for l in inspect.lines().filter(|l| l.starts_with("event ")) {
        let id = l
            .split(' ')
            .find_map(|kv| kv.strip_prefix("click_id="))
            .unwrap();
        *m.entry(id.to_owned()).or_insert(0) += 1;
    }
    m
}

/// Clicks on one keep-alive connection (reconnecting every 100) until the
/// process stops answering or `n` were sent; the ids that got their 302.
fn click_until_gone(g: &Gateway, prefix: &str, n: usize) -> Vec<String> {
    let mut acked = Vec::new();
    let mut i = 0;
    while i < n {
        let Ok(mut s) = std::net::TcpStream::connect(g.addr) else {
            return acked;
        };
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        for _ in 0..100 {
            let id = format!("{prefix}-{i}");
            i += 1;
            let t = click(&id);
            if s.write_all(format!("GET {t} HTTP/1.1\r\nHost: t\r\n\r\n").as_bytes())
                .is_err()
            {
                return acked;
            }
            match read_response(&mut s) {
                Ok(r) if r.status == 302 => acked.push(id),
                _ => return acked,
            }
        }
    }
    acked
}

const SMALL_SEGMENTS: &str = "[log]\nsegment_bytes = 65536\ncompress_chunk_bytes = 65536\n\
     partial_reserve_bytes = 4096\n[traffic]\nvelocity_per_minute_max = 0\n";

#[test]
fn a_crash_at_each_step_of_compression_leaves_every_record_once() {
    if !daemon::faults::ENABLED {
        panic!("this test needs the fault-injection feature (test-support turns it on)");
    }
    for point in [
        "gateway_segz_written",
        "gateway_segz_renamed",
        "gateway_segz_original_removed",
    ] {
        // The second compression aborts the process at `point`: one segment
        // is already compressed, the next is half way.
        let mut g = Gateway::start_env(
            SMALL_SEGMENTS,
            &[("CLICKGATE_CRASH_AT", &format!("{point}:2"))],
        );
        let mut acked = click_until_gone(&g, point, 20_000);
        let code = g.wait_exit(Duration::from_secs(10));
        assert!(
            g.child.is_none(),
            "{point}: the gateway did not stop at the crash point ({code:?}):\n{}",
            g.log()
        );
        assert!(
            g.log().contains(&format!("crash point {point} reached")),
            "{}",
            g.log()
        );
        assert!(
            acked.len() > 300,
            "{point}: {} clicks before the crash",
            acked.len()
        );
        g.env.clear();
        g.spawn();
        // After recovery, compression carries on where it stopped (800
        // clicks fill more than two 64 KiB segments).
        acked.extend(click_until_gone(&g, &format!("{point}-after"), 800));
        let t = std::time::Instant::now();
        while metric(&g.metrics(), "clickgate_log_compressions_total") < 1 {
            if t.elapsed() > Duration::from_secs(10) {
                let files: Vec<_> = std::fs::read_dir(g.data_dir().join("shard-0"))
                    .unwrap()
                    .flatten()
                    .map(|e| (e.file_name(), e.metadata().unwrap().len()))
                    .collect();
                panic!(
                    "{point}: nothing compressed after the restart; {} clicks; files {files:?}\n{}",
                    acked.len(),
                    g.log()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let inspect = g.inspect(true);
        // inspect reads both kinds of segment and says what the buffer holds.
        assert!(
            inspect.contains(".segz") && inspect.contains("tail compressed"),
            "{inspect}"
        );
        assert!(
            inspect.contains("  buffer: ") && inspect.contains("oldest unshipped event"),
            "{inspect}"
        );
        let seen = id_counts(&inspect);
        let twice: Vec<_> = seen.iter().filter(|(_, n)| **n > 1).collect();
        assert!(twice.is_empty(), "{point}: records twice: {twice:?}");
        let lost: Vec<_> = acked.iter().filter(|id| !seen.contains_key(*id)).collect();
        assert!(lost.is_empty(), "{point}: acknowledged and lost: {lost:?}");
        let files: Vec<String> = std::fs::read_dir(g.data_dir().join("shard-0"))
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        assert!(files.iter().any(|f| f.ends_with(".segz")), "{files:?}");
        assert!(!files.iter().any(|f| f.ends_with(".segz.tmp")), "{files:?}");
        // Exactly one file per base seq.
        let mut bases: Vec<&str> = files
            .iter()
            .filter(|f| f.ends_with(".seg") || f.ends_with(".segz"))
            .map(|f| f.split('.').next().unwrap())
            .collect();
        let n = bases.len();
        bases.dedup();
        assert_eq!(bases.len(), n, "{point}: {files:?}");
    }
}

#[test]
fn a_budget_too_small_for_two_segments_is_refused_at_start() {
    let g = Gateway::build_only("[log]\nsegment_bytes = 65536\ndisk_budget_bytes = 100000\n");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_clickgate-gateway"))
        .args(["run", "--config"])
        .arg(g.config_path())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("log.disk_budget_bytes") && err.contains("two segments"),
        "{err}"
    );
}
