//! Sealed files uploaded to a real S3-compatible server (s3s-fs, checking
//! signatures) by the aggregator as a process: wrong credentials, the server
//! down, then slow, and the aggregator killed with SIGKILL in the middle of
//! an upload. Through all of it the aggregator keeps answering queries, the
//! backlog shows in /metrics and the failure in /readyz, and afterwards
//! there is exactly one object per (hour, gateway), holding exactly the
//! events shipped.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::Ordering::SeqCst;
use std::sync::Arc;
use std::time::{Duration, Instant};

use aggregator::store::{Settings, Store};

mod common;
use common::{agg_bin, click_ids, get, port, udp_port, Gw, S3, S3_KEY, S3_SECRET, T};

const BUCKET: &str = "audit-bucket";

/// A store with hours 05:00 and 06:00 of gateways gwa and gwb reconciled,
/// ready to seal; answers the click ids per (hour, gateway).
fn prepare(path: &Path) -> Vec<(String, Vec<String>)> {
    let store = Arc::new(Store::open(path, Settings::default()).unwrap());
    let now = T + 4 * 3_600_000;
    let (mut a, mut b) = (Gw::new("gwa"), Gw::new("gwb"));
    let mut want = Vec::new();
    for (h, hour) in ["05", "06"].iter().enumerate() {
        let t0 = T + h as i64 * 3_600_000;
        for (gw, name) in [(&mut a, "gwa"), (&mut b, "gwb")] {
            let mut ids: Vec<String> = (0..300).map(|i| format!("{name}-{hour}-{i}")).collect();
            for (i, id) in ids.iter().enumerate() {
                gw.click(id, t0 + i as i64 * 11_000);
            }
            ids.sort();
            want.push((
                format!("raw/2026-11-24/{hour}/gateway={name}/part-00000.parquet"),
                ids,
            ));
        }
    }
    a.ship(&store, now);
    b.ship(&store, now);
    let mut r = common::reconciler(&store);
    common::reconcile_until_idle(&mut r, now);
    want.sort();
    want
}

struct Agg {
    child: Child,
    http: String,
    log: std::path::PathBuf,
}

impl Drop for Agg {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Agg {
    fn start(dir: &Path, s3: &S3, secret: &str, n: u32) -> Agg {
        let http = format!("127.0.0.1:{}", port());
        let cfg = dir.join(format!("agg-{n}.toml"));
        std::fs::write(
            &cfg,
            format!(
                "store_path = \"{store}\"\nlisten_http = \"{http}\"\nlisten_quic = \"127.0.0.1:{quic}\"\n\
                 ca_file = \"{c}/ca.pem\"\ncert_file = \"{c}/aggregator.pem\"\nkey_file = \"{c}/aggregator.key\"\n\
                 pops_file = \"{c}/pops.toml\"\ntokens_file = \"{d}/tokens.toml\"\n\
                 [audit]\nurl = \"s3://{BUCKET}/\"\nendpoint = \"http://{addr}\"\nallow_http = true\n\
                 access_key_id = \"{S3_KEY}\"\nsecret_access_key = \"{secret}\"\ninterval_ms = 200\n",
                store = dir.join("agg.redb").display(),
                quic = udp_port(),
                c = dir.join("certs").display(),
                d = dir.display(),
                addr = s3.addr,
            ),
        )
        .unwrap();
        let log = dir.join(format!("agg-{n}.log"));
        let child = Command::new(agg_bin())
            .args(["run", "--config"])
            .arg(&cfg)
            .env("RUST_LOG", "info")
            .stderr(std::fs::File::create(&log).unwrap())
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        let a = Agg { child, http, log };
        a.wait_for("ready", |a| {
            std::net::TcpStream::connect(&a.http).is_ok() && get(&a.http, "/readyz", None).0 == 200
        });
        a
    }

    fn wait_for(&self, what: &str, ok: impl Fn(&Agg) -> bool) {
        let t = Instant::now();
        while !ok(self) {
            assert!(
                t.elapsed() < Duration::from_secs(40),
                "waited 40 s for: {what}\nlog:\n{}",
                std::fs::read_to_string(&self.log).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn metric(&self, name: &str) -> u64 {
        let (_, m) = get(&self.http, "/metrics", None);
        m.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
            .unwrap_or_else(|| panic!("{name} not in /metrics"))
    }

    fn readyz(&self) -> String {
        get(&self.http, "/readyz", None).1
    }

    /// A query for the sealed hours answers 200 with every click.
    fn answers_queries(&self, token: &str) -> bool {
        let (st, body) = get(
            &self.http,
            "/api/v1/advertisers/analytics?advertiser_id=adv&start_time=2026-11-24T05:00:00Z&end_time=2026-11-24T07:00:00Z&granularity=1d",
            Some(token),
        );
        st == 200 && body.contains("\"clicks\":1200")
    }
}

#[test]
fn sealed_files_reach_s3_once_through_bad_credentials_outages_and_kill_9() {
    let d = tempfile::tempdir().unwrap();
    let dir = d.path();
    let run = |args: &[&str]| {
        let st = Command::new(agg_bin())
            .args(args)
            .current_dir(dir)
            .stdout(Stdio::null())
            .status()
            .unwrap();
        assert!(st.success(), "{args:?}");
    };
    run(&["dev-certs", "--out", "certs"]);
    run(&["dev-tokens", "--out", "tokens.toml", "--advertiser", "adv"]);
    let tokens = std::fs::read_to_string(dir.join("tokens.toml")).unwrap();
    let token = tokens
        .lines()
        .find_map(|l| l.strip_prefix("token = \""))
        .unwrap()
        .trim_end_matches('"')
        .to_owned();
    let want = prepare(&dir.join("agg.redb"));
    let s3 = S3::start(&dir.join("s3"), BUCKET);

    // Wrong credentials: refused by the server, said in the log and in
    // /readyz, retried; nothing uploaded, the backlog in /metrics.
    let agg = Agg::start(dir, &s3, "not-the-secret", 1);
    agg.wait_for("/readyz to name the failing upload", |a| {
        a.readyz().contains("audit upload failing")
    });
    let r = agg.readyz();
    assert!(
        r.contains("SignatureDoesNotMatch") || r.contains("403"),
        "{r}"
    );
    assert!(!r.contains("not-the-secret"), "a secret in /readyz: {r}");
    assert!(agg.answers_queries(&token));
    assert_eq!(
        agg.metric("clickgate_aggregator_audit_backlog_hour_buckets"),
        4
    );
    assert!(agg.metric("clickgate_aggregator_audit_upload_errors_total") >= 1);
    agg.wait_for("a retry", |a| {
        a.metric("clickgate_aggregator_audit_upload_errors_total") >= 2
    });
    let log = std::fs::read_to_string(&agg.log).unwrap();
    assert!(log.contains("audit sealing failed"), "{log}");
    assert!(!log.contains("not-the-secret"), "a secret in the log");
    assert!(!log.contains('\x1b'), "colour codes in a log file");
    assert!(s3.objects(BUCKET).is_empty());
    drop(agg);

    // The server down: the same, and queries still answered.
    s3.down.store(true, SeqCst);
    let agg = Agg::start(dir, &s3, S3_SECRET, 2);
    agg.wait_for("/readyz to name the failing upload", |a| {
        a.readyz().contains("audit upload failing")
    });
    assert!(agg.answers_queries(&token));
    assert_eq!(
        agg.metric("clickgate_aggregator_audit_backlog_hour_buckets"),
        4
    );

    // Back, but slow: the aggregator is killed (SIGKILL) while an upload
    // is in flight.
    s3.put_delay_ms.store(1500, SeqCst);
    s3.down.store(false, SeqCst);
    agg.wait_for("an upload in flight", |_| {
        s3.puts_started.load(SeqCst) > s3.puts_done.load(SeqCst)
    });
    // Slow uploads hold nothing else up.
    let t = Instant::now();
    assert!(agg.answers_queries(&token));
    assert!(t.elapsed() < Duration::from_millis(1000));
    drop(agg);

    // Restarted, the server fast again: every hour sealed, one object each.
    s3.put_delay_ms.store(0, SeqCst);
    let agg = Agg::start(dir, &s3, S3_SECRET, 3);
    // The backlog gauge reads 0 until the restarted aggregator's first pass
    // sets it: wait for the objects themselves too.
    let names: Vec<String> = want.iter().map(|(n, _)| n.clone()).collect();
    agg.wait_for("every hour sealed", |_| {
        s3.objects(BUCKET).len() >= names.len()
    });
    agg.wait_for("the backlog to drain", |a| {
        a.metric("clickgate_aggregator_audit_backlog_hour_buckets") == 0
    });
    agg.wait_for("/readyz to clear", |a| a.readyz() == "ready\n");
    let objects = s3.objects(BUCKET);
    assert_eq!(objects, names, "exactly one object per hour and gateway");
    for (name, ids) in &want {
        let bytes = std::fs::read(s3.root.join(BUCKET).join(name)).unwrap();
        assert_eq!(&click_ids(&bytes), ids, "{name}");
    }
    assert!(agg.answers_queries(&token));
}
