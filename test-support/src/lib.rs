//! Helpers Clickgate's integration tests share, so each is written once:
//! free ports, small HTTP requests, Prometheus text, a tmpfs of a chosen
//! size, a process harness, the workspace's binaries, a private ClickHouse
//! server, a private Kafka-protocol broker, keys and certificates, and the fuzz corpus replay.
//!
//! A dev-dependency of every crate with integration tests. Depending on it
//! also turns on, for the test build only, the test hooks
//! (`daemon/fault-injection`) and the fuzz targets' bodies (`fuzzing` of
//! `wire` and `gateway-core`); a release build has neither.

pub mod clickhouse;
pub mod fs;
pub mod fuzz;
pub mod kafka;
pub mod keys;
pub mod net;
pub mod process;

pub use net::{free_port, free_udp_port};

/// One metric's value in a Prometheus text page: the first sample whose
/// name and labels are `name_and_labels` exactly (0 when absent).
pub fn metric(text: &str, name_and_labels: &str) -> u64 {
    metric_f64(text, name_and_labels) as u64
}

/// As [`metric`], unrounded.
pub fn metric_f64(text: &str, name_and_labels: &str) -> f64 {
    text.lines()
        .find_map(|l| {
            let rest = l.strip_prefix(name_and_labels)?;
            // The whole name: `x_total` is not a sample of `x`.
            rest.starts_with(' ')
                .then(|| rest.trim().parse::<f64>().ok())?
        })
        .unwrap_or(0.0)
}

/// The sum of every series of metric `name`, whatever its labels; panics if
/// the page has none (a renamed metric must not make a check vacuous).
pub fn metric_sum(text: &str, name: &str) -> u64 {
    let mut found = false;
    let sum = text
        .lines()
        .filter_map(|l| {
            let rest = l.strip_prefix(name)?;
            let rest = match rest.strip_prefix('{') {
                Some(r) => &r[r.find('}')? + 1..],
                None => rest,
            };
            rest.starts_with(' ')
                .then(|| rest.trim().parse::<f64>().ok())?
        })
        .inspect(|_| found = true)
        .sum::<f64>();
    assert!(found, "no series of {name} on the page");
    sum as u64
}

/// The workspace's root directory.
pub fn workspace_root() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("test-support sits in the workspace root")
        .to_owned()
}

/// `target/test-artifacts/`: screenshots and the like a test keeps for a
/// person to look at. Created if missing.
pub fn artifacts_dir() -> std::path::PathBuf {
    let d = workspace_root().join("target/test-artifacts");
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// Unix seconds now.
pub fn now_s() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

/// Whether `python3` can import `module`, installing `package` from PyPI
/// first when it cannot (one pip at a time: tests run in parallel).
pub fn python_module(module: &str, package: &str) -> bool {
    let have = || {
        std::process::Command::new("python3")
            .args(["-c", &format!("import {module}")])
            .status()
            .is_ok_and(|s| s.success())
    };
    if !have() {
        let _ = std::process::Command::new("flock")
            .args([
                "/tmp/clickgate-pip.lock",
                "python3",
                "-m",
                "pip",
                "install",
                "-q",
                package,
            ])
            .status();
    }
    have()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_metric_is_found_by_its_whole_name_and_labels() {
        let page = "# HELP x_total t\nx_total_more 9\nx_total{a=\"1\"} 3\nx_total 5\ny 2.5\n";
        assert_eq!(metric(page, "x_total"), 5);
        assert_eq!(metric(page, "x_total{a=\"1\"}"), 3);
        assert_eq!(metric(page, "absent"), 0);
        assert_eq!(metric_f64(page, "y"), 2.5);
    }
}
