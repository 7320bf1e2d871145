//! The aggregator as a process: who may connect over QUIC (mutual TLS and
//! the pops file), and the query API's answers to good and bad requests.

use std::net::TcpStream;
use std::path::{Path, PathBuf};

mod common;
use common::{agg_bin, get, port, post, udp_port};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The shipper binary beside ours, built if missing.
fn shipper_bin() -> PathBuf {
    let dir = agg_bin().parent().unwrap().to_path_buf();
    let b = dir.join("clickgate-shipper");
    if !b.exists() {
        let mut c = Command::new(env!("CARGO"));
        c.args(["build", "-q", "-p", "clickgate-shipper"]);
        if dir.ends_with("release") {
            c.arg("--release");
        }
        assert!(c.status().unwrap().success());
    }
    b
}

struct Agg {
    child: Child,
    http: String,
    quic: String,
}

impl Drop for Agg {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start(dir: &Path, certs: &Path, tokens: &Path) -> Agg {
    let http = format!("127.0.0.1:{}", port());
    let quic = format!("127.0.0.1:{}", udp_port());
    let child = Command::new(agg_bin())
        .args(["run", "--listen-http", &http, "--listen-quic", &quic])
        .arg("--store")
        .arg(dir.join(format!("{}.redb", udp_port())))
        .arg("--certs")
        .arg(certs)
        .arg("--tokens")
        .arg(tokens)
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let t = Instant::now();
    loop {
        if TcpStream::connect(&http).is_ok() && get(&http, "/readyz", None).0 == 200 {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "aggregator not ready"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    Agg { child, http, quic }
}

fn check(agg: &Agg, certs: &Path, gateway: &str) -> (bool, String) {
    let out = Command::new(shipper_bin())
        .args(["check", "--aggregator", &agg.quic, "--gateway-id", gateway])
        .arg("--certs")
        .arg(certs)
        .stderr(Stdio::null())
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

fn run(args: &[&str], dir: &Path) {
    let st = Command::new(agg_bin())
        .args(args)
        .current_dir(dir)
        .stdout(Stdio::null())
        .status()
        .unwrap();
    assert!(st.success(), "{args:?}");
}

#[test]
fn only_listed_certificates_ship_and_only_for_their_gateways() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path();
    run(&["dev-certs", "--out", "a", "--gateway", "gw-a"], p);
    run(&["dev-certs", "--out", "b"], p);
    run(
        &[
            "dev-tokens",
            "--out",
            "tokens.toml",
            "--advertiser",
            "adv-1",
        ],
        p,
    );
    let agg = start(p, &p.join("a"), &p.join("tokens.toml"));

    let (ok, out) = check(&agg, &p.join("a"), "gw-a");
    assert!(ok, "{out}");
    assert!(out.contains("partials cursor 0, events cursor 0"), "{out}");
    // A listed PoP shipping for a gateway that is not its own.
    let (ok, out) = check(&agg, &p.join("a"), "gw-b");
    assert!(!ok);
    assert!(out.contains("may not ship for gateway"), "{out}");

    // A client certificate from another CA fails the TLS handshake.
    let mixed = p.join("mixed");
    std::fs::create_dir(&mixed).unwrap();
    std::fs::copy(p.join("a/ca.pem"), mixed.join("ca.pem")).unwrap();
    std::fs::copy(p.join("b/pop.pem"), mixed.join("pop.pem")).unwrap();
    std::fs::copy(p.join("b/pop.key"), mixed.join("pop.key")).unwrap();
    let (ok, out) = check(&agg, &mixed, "gw-a");
    assert!(!ok, "{out}");

    // Signed by the right CA but not in the pops file: refused by name.
    let unlisted = p.join("unlisted");
    std::fs::create_dir(&unlisted).unwrap();
    for f in [
        "ca.pem",
        "aggregator.pem",
        "aggregator.key",
        "pop.pem",
        "pop.key",
    ] {
        std::fs::copy(p.join("a").join(f), unlisted.join(f)).unwrap();
    }
    std::fs::write(
        unlisted.join("pops.toml"),
        format!(
            "[[pop]]\nid = \"other\"\ncert_sha256 = \"{}\"\n",
            "ab".repeat(32)
        ),
    )
    .unwrap();
    let agg2 = start(p, &unlisted, &p.join("tokens.toml"));
    let (ok, out) = check(&agg2, &unlisted, "gw-a");
    assert!(!ok);
    assert!(out.contains("unknown client certificate"), "{out}");
    let (_, m) = get(&agg2.http, "/metrics", None);
    assert!(
        m.contains("clickgate_aggregator_refused_certificates_total 1"),
        "{m}"
    );
}

#[test]
fn query_api_authorizes_per_advertiser_and_explains_bad_requests() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path();
    run(&["dev-certs", "--out", "c"], p);
    run(
        &[
            "dev-tokens",
            "--out",
            "tokens.toml",
            "--advertiser",
            "adv-1",
            "--advertiser",
            "adv-2",
        ],
        p,
    );
    let text = std::fs::read_to_string(p.join("tokens.toml")).unwrap();
    let tokens: Vec<&str> = text
        .lines()
        .filter_map(|l| l.strip_prefix("token = \""))
        .map(|t| t.trim_end_matches('"'))
        .collect();
    let (adv1, operator) = (tokens[0], tokens[2]);
    let agg = start(p, &p.join("c"), &p.join("tokens.toml"));
    let q = |adv: &str, extra: &str| {
        format!(
            "/api/v1/advertisers/analytics?advertiser_id={adv}&start_time=2026-11-24T00:00:00Z&end_time=2026-11-24T01:00:00Z{extra}"
        )
    };
    let (st, body) = get(&agg.http, &q("adv-1", "&granularity=1h"), Some(adv1));
    assert_eq!(st, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["series"].as_array().unwrap().len(), 0);
    assert_eq!(v["start_time"], "2026-11-24T00:00:00Z");
    assert_eq!(get(&agg.http, &q("adv-1", ""), None).0, 401);
    assert_eq!(get(&agg.http, &q("adv-1", ""), Some("not-a-token")).0, 401);
    let (st, body) = get(&agg.http, &q("adv-2", ""), Some(adv1));
    assert_eq!(st, 403, "{body}");
    assert_eq!(get(&agg.http, &q("adv-2", ""), Some(operator)).0, 200);
    let (st, body) = get(&agg.http, &q("adv-1", "&granularity=7m"), Some(adv1));
    assert_eq!(st, 400);
    assert!(body.contains("granularity"), "{body}");
    let (st, body) = get(
        &agg.http,
        "/api/v1/advertisers/analytics?advertiser_id=adv-1&start_time=yesterday&end_time=1",
        Some(adv1),
    );
    assert_eq!(st, 400);
    assert!(body.contains("start_time"), "{body}");
    let (st, body) = get(&agg.http, "/api/v1/openapi.yaml", None);
    assert_eq!(st, 200);
    assert!(body.contains("/api/v1/advertisers/analytics"));
    let (_, m) = get(&agg.http, "/metrics", None);
    assert!(
        m.contains("clickgate_aggregator_query_errors_total 5"),
        "{m}"
    );
    assert_eq!(get(&agg.http, "/healthz", None).0, 200);
}

#[test]
fn reconcile_jobs_are_for_admins_and_bad_ranges_say_why() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path();
    run(&["dev-certs", "--out", "c"], p);
    run(
        &[
            "dev-tokens",
            "--out",
            "tokens.toml",
            "--advertiser",
            "adv-1",
        ],
        p,
    );
    let text = std::fs::read_to_string(p.join("tokens.toml")).unwrap();
    let tokens: Vec<&str> = text
        .lines()
        .filter_map(|l| l.strip_prefix("token = \""))
        .map(|t| t.trim_end_matches('"'))
        .collect();
    let (adv1, operator, admin) = (tokens[0], tokens[1], tokens[2]);
    let agg = start(p, &p.join("c"), &p.join("tokens.toml"));
    let path = "/api/v1/admin/reconcile";
    let range = r#"{"start_time": "2026-11-24T00:00:00Z", "end_time": "2026-11-24T01:00:00Z"}"#;
    assert_eq!(post(&agg.http, path, None, range).0, 401);
    // Neither an advertiser's token nor the operator's read-all token.
    assert_eq!(post(&agg.http, path, Some(adv1), range).0, 403);
    assert_eq!(post(&agg.http, path, Some(operator), range).0, 403);
    // An admin token reads no advertiser.
    let (st, _) = get(
        &agg.http,
        "/api/v1/advertisers/analytics?advertiser_id=adv-1&start_time=0&end_time=60",
        Some(admin),
    );
    assert_eq!(st, 403);
    for (body, want) in [
        ("not json", "must be JSON"),
        (
            r#"{"start_time": "2026-11-24T00:00:00Z"}"#,
            "end_time is required",
        ),
        (
            r#"{"start_time": "2026-11-24T01:00:00Z", "end_time": "2026-11-24T00:00:00Z"}"#,
            "end must be after start",
        ),
        (
            r#"{"start_time": "2026-11-01T00:00:00Z", "end_time": "2026-11-24T00:00:00Z"}"#,
            "job_span_max_ms",
        ),
        (r#"{"start_time": "soon", "end_time": 5}"#, "start_time"),
        (
            r#"{"start_time": 0, "end_time": 60, "colour": "red"}"#,
            "unknown field",
        ),
    ] {
        let (st, b) = post(&agg.http, path, Some(admin), body);
        assert_eq!(st, 400, "{body}: {b}");
        assert!(b.contains(want), "{body}: {b}");
    }
    let (st, b) = post(&agg.http, path, Some(admin), range);
    assert_eq!(st, 202, "{b}");
    let v: serde_json::Value = serde_json::from_str(&b).unwrap();
    let id = v["job_id"].as_u64().unwrap();
    // An empty store: the job finds 60 empty minutes and is done.
    let t = Instant::now();
    let job = loop {
        let (st, b) = get(&agg.http, &format!("{path}/{id}"), Some(admin));
        assert_eq!(st, 200, "{b}");
        let j: serde_json::Value = serde_json::from_str(&b).unwrap();
        if j["state"] == "done" {
            break j;
        }
        assert!(t.elapsed() < Duration::from_secs(20), "{j}");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(job["minutes_total"], 60);
    assert_eq!(job["minutes_empty"], 60);
    assert_eq!(job["start_time"], "2026-11-24T00:00:00Z");
    assert_eq!(
        get(&agg.http, &format!("{path}/{}", id + 1), Some(admin)).0,
        404
    );
    assert_eq!(get(&agg.http, &format!("{path}/{id}"), Some(adv1)).0, 403);
    let (st, b) = get(&agg.http, path, Some(admin));
    assert_eq!(st, 200);
    assert!(b.contains("\"jobs\""), "{b}");
    // What gateways answered without a record: admins only, a range.
    let u = "/api/v1/admin/unrecorded";
    let q = format!("{u}?start_time=2026-11-24T00:00:00Z&end_time=2026-11-24T01:00:00Z");
    let (st, b) = get(&agg.http, &q, Some(admin));
    assert_eq!(st, 200, "{b}");
    let v: serde_json::Value = serde_json::from_str(&b).unwrap();
    assert_eq!(
        (
            v["total"].as_u64(),
            v["minutes"].as_array().map(|a| a.len())
        ),
        (Some(0), Some(0))
    );
    assert_eq!(get(&agg.http, &q, Some(adv1)).0, 403);
    let (st, b) = get(&agg.http, &format!("{u}?start_time=0"), Some(admin));
    assert_eq!(st, 400);
    assert!(b.contains("end_time"), "{b}");
    let (_, m) = get(&agg.http, "/metrics", None);
    assert!(
        m.contains("clickgate_aggregator_admin_errors_total 12"),
        "{m}"
    );
    assert!(
        m.contains("clickgate_aggregator_unrecorded_redirects_total 0"),
        "{m}"
    );
    assert!(
        m.contains("clickgate_aggregator_reconcile_lag_seconds"),
        "{m}"
    );
}
