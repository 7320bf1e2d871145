//! Every binary writes its log as one JSON object per line when its config
//! says `log_format = "json"`, and as plain text (no colour codes) to a file
//! otherwise.

use std::ffi::OsString;
use std::path::Path;
use std::process::Command;

use test_support::process::{bin, Proc};
use test_support::{free_port, free_udp_port};

fn run(b: &Path, args: &[&str]) {
    let out = Command::new(b).args(args).output().unwrap();
    assert!(out.status.success(), "{args:?}: {out:?}");
}

fn os(v: &[&str]) -> Vec<OsString> {
    v.iter().map(OsString::from).collect()
}

/// Starts the three processes on `format`, stops them, and returns each
/// one's log.
fn logs(format: &str) -> Vec<(&'static str, String)> {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let p = |x: &str| d.join(x).to_str().unwrap().to_owned();
    let (gw, ship, agg) = (
        bin("clickgate-gateway"),
        bin("clickgate-shipper"),
        bin("clickgate-aggregator"),
    );
    run(&gw, &["keygen", "--out", &p("keys.toml")]);
    run(&agg, &["dev-certs", "--out", &p("certs")]);
    run(&agg, &["dev-tokens", "--out", &p("tokens.toml")]);
    let (gw_http, agg_http, agg_quic, ship_http) = (
        format!("127.0.0.1:{}", free_port()),
        format!("127.0.0.1:{}", free_port()),
        format!("127.0.0.1:{}", free_udp_port()),
        format!("127.0.0.1:{}", free_port()),
    );
    let c = p("certs");
    let configs = [
        (
            "gateway.toml",
            format!(
                "log_format = \"{format}\"\ndata_dir = \"{}\"\nkeys_file = \"{}\"\ncpus = [0]\n[listen]\nhttp = \"{gw_http}\"\n",
                p("data"),
                p("keys.toml")
            ),
        ),
        (
            "aggregator.toml",
            format!(
                "log_format = \"{format}\"\nstore_path = \"{}\"\nlisten_http = \"{agg_http}\"\nlisten_quic = \"{agg_quic}\"\n\
                 ca_file = \"{c}/ca.pem\"\ncert_file = \"{c}/aggregator.pem\"\nkey_file = \"{c}/aggregator.key\"\n\
                 pops_file = \"{c}/pops.toml\"\ntokens_file = \"{}\"\n",
                p("agg.redb"),
                p("tokens.toml")
            ),
        ),
        (
            "shipper.toml",
            format!(
                "log_format = \"{format}\"\ndata_dir = \"{}\"\naggregator = \"{agg_quic}\"\nmetrics_listen = \"{ship_http}\"\n\
                 ca_file = \"{c}/ca.pem\"\ncert_file = \"{c}/pop.pem\"\nkey_file = \"{c}/pop.key\"\n",
                p("data")
            ),
        ),
    ];
    for (name, text) in &configs {
        std::fs::write(d.join(name), text).unwrap();
    }
    let mut procs = [
        Proc::new(
            "aggregator",
            agg,
            os(&["run", "--config", &p("aggregator.toml")]),
            d.join("aggregator.log"),
            (agg_http, "/readyz"),
        ),
        Proc::new(
            "gateway",
            gw,
            os(&["run", "--config", &p("gateway.toml")]),
            d.join("gateway.log"),
            (gw_http, "/readyz"),
        ),
        Proc::new(
            "shipper",
            ship,
            os(&["run", "--config", &p("shipper.toml")]),
            d.join("shipper.log"),
            (ship_http, "/healthz"),
        ),
    ];
    for pr in procs.iter_mut() {
        pr.start();
    }
    for pr in procs.iter_mut().rev() {
        pr.stop();
    }
    procs
        .iter()
        .map(|pr| (pr.name, std::fs::read_to_string(&pr.log).unwrap()))
        .collect()
}

#[test]
fn every_binary_logs_json_lines_when_asked_and_plain_text_otherwise() {
    for (name, log) in logs("json") {
        let lines: Vec<&str> = log.lines().collect();
        assert!(lines.len() >= 2, "{name} logged {log:?}");
        for l in lines {
            let v: serde_json::Value = serde_json::from_str(l)
                .unwrap_or_else(|e| panic!("{name}: not a JSON line ({e}): {l}"));
            for field in ["timestamp", "level", "message"] {
                assert!(v.get(field).is_some(), "{name}: no {field} in {l}");
            }
        }
    }
    for (name, log) in logs("text") {
        assert!(log.lines().count() >= 2, "{name} logged {log:?}");
        assert!(!log.contains('\u{1b}'), "{name}: colour codes in a file");
        assert!(!log.starts_with('{'), "{name}: JSON without asking");
    }
}
