//! loadgen over HTTPS (with and without session resumption) and HTTP/3
//! against the real gateway: the oracle it writes is exactly what the
//! gateway's log counted, and the gateway saw the handshakes it should.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

mod common;

use common::{bin, free_port, free_udp_port, metric, metric_sum};

fn gateway_bin() -> PathBuf {
    bin("clickgate-gateway")
}

fn ok(c: &mut Command) -> String {
    let out = c.output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{text}");
    text
}

/// Runs one load through a fresh gateway (HTTPS and HTTP/3 on one port
/// number), drains it, verifies the oracle, and returns the gateway's
/// metrics text taken before the drain.
fn run_through_gateway(d: &Path, load: &[&str]) -> String {
    let keys = d.join("keys.toml");
    ok(Command::new(gateway_bin())
        .args(["keygen", "--out"])
        .arg(&keys));
    ok(Command::new(gateway_bin())
        .args(["dev-cert", "--out"])
        .arg(d.join("certs")));
    let (http, port) = (free_port(), free_udp_port());
    let cfg = d.join("gw.toml");
    std::fs::write(
        &cfg,
        format!(
            "cpus = [1]\ndata_dir = \"{0}/data\"\nkeys_file = \"{0}/keys.toml\"\n\
             [traffic]\nvelocity_per_minute_max = 0\n\
             [tls]\ncert_file = \"{0}/certs/gateway.pem\"\nkey_file = \"{0}/certs/gateway.key\"\n\
             [listen]\nhttp = \"127.0.0.1:{http}\"\nhttps = \"127.0.0.1:{port}\"\nhttp3 = \"127.0.0.1:{port}\"\n",
            d.display()
        ),
    )
    .unwrap();
    let mut gw = Command::new(gateway_bin())
        .args(["run", "--config"])
        .arg(&cfg)
        .stderr(std::fs::File::create(d.join("gw.log")).unwrap())
        .spawn()
        .unwrap();
    let metrics = || {
        Command::new("curl")
            .args(["-fs", &format!("http://127.0.0.1:{http}/metrics")])
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
    };
    let t = Instant::now();
    while metrics().is_none() {
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "gateway did not start"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let oracle = d.join("oracle.json");
    let text = ok(Command::new(env!("CARGO_BIN_EXE_loadgen"))
        .args([
            "run",
            "--target",
            &format!("127.0.0.1:{port}"),
            "--cpus",
            "0",
        ])
        .args([
            "--connections",
            "8",
            "--requests",
            "1500",
            "--duration",
            "60",
        ])
        .args(["--warmup", "0", "--pool", "1500", "--dup-rate", "0.1"])
        .args([
            "--bad-sig-rate",
            "0.05",
            "--late-rate",
            "0.05",
            "--seed",
            "3",
        ])
        .arg("--ca")
        .arg(d.join("certs/gateway.pem"))
        .arg("--keys")
        .arg(&keys)
        .arg("--oracle")
        .arg(&oracle)
        .args(load));
    assert!(text.contains("302=") && text.contains("403="), "{text}");
    assert!(text.contains("connect=0 timeout=0 reset=0"), "{text}");
    let m = metrics().unwrap();
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(gw.id() as i32, libc::SIGTERM) };
    assert!(gw.wait().unwrap().success());
    let v = ok(Command::new(env!("CARGO_BIN_EXE_loadgen"))
        .arg("verify")
        .arg("--oracle")
        .arg(&oracle)
        .arg("--gateway-data")
        .arg(d.join("data"))
        .stdout(Stdio::piped()));
    assert!(v.contains("verify: OK"), "{v}");
    m
}

#[test]
fn https_with_and_without_resumption_counts_exactly() {
    let d = tempfile::tempdir().unwrap();
    let m = run_through_gateway(
        d.path(),
        &[
            "--proto",
            "https",
            "--no-keepalive",
            "--tls-resumption",
            "on",
        ],
    );
    let (hs, resumed) = (
        metric(&m, "clickgate_tls_handshakes_total"),
        metric(&m, "clickgate_tls_resumed_total"),
    );
    assert!(hs >= 1500, "{hs}");
    assert!(resumed * 2 > hs, "resumption on: {resumed} of {hs} resumed");

    let d = tempfile::tempdir().unwrap();
    let m = run_through_gateway(
        d.path(),
        &[
            "--proto",
            "https",
            "--no-keepalive",
            "--tls-resumption",
            "off",
        ],
    );
    assert_eq!(
        metric(&m, "clickgate_tls_resumed_total"),
        0,
        "resumption off"
    );
}

#[test]
fn http3_counts_exactly() {
    let d = tempfile::tempdir().unwrap();
    let m = run_through_gateway(d.path(), &["--proto", "h3"]);
    assert!(metric(&m, "clickgate_h3_connections_total") >= 8);
    assert_eq!(metric_sum(&m, "clickgate_h3_errors_total"), 0);
    assert_eq!(
        metric(&m, "clickgate_tls_handshakes_total"),
        0,
        "no TCP TLS"
    );
}
