//! The Kafka sink against a real Kafka-protocol broker (tansu 0.6, built
//! once by scripts/tansu-local, its storage a SQLite file), read back with an
//! independent client (kafka-python): the topics hold exactly the store's
//! rows (highest revision per key) and raw events (one per event), through
//! a broker killed and restarted mid-run and a backlog that overflowed its
//! bound, over TLS (a terminator in front of the broker) and with SCRAM
//! credentials; an unknown topic, a certificate from the wrong CA and a
//! wrong password are named, and nothing is forgotten.

mod common;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use aggregator::kafka::{self, KafkaStats};
use aggregator::store::{Sink, Store};
use common::{Gw, H, T};
use test_support::kafka::Tansu;

fn settings(broker: &Tansu) -> kafka::Settings {
    kafka::Settings {
        bootstrap: vec![broker.addr()],
        partitions: 4,
        replication_factor: 1,
        flush_interval_ms: 50,
        timeout_ms: 3000,
        ..kafka::Settings::default()
    }
}

fn open_store(dir: &std::path::Path, cap: u64) -> Arc<Store> {
    common::open_store_with(
        dir,
        aggregator::store::Settings {
            kafka: true,
            kafka_backlog_entries_max: cap,
            ..Default::default()
        },
    )
}

/// A broker and kafka-python, or None (SKIPPED, with the reason).
fn peers() -> Option<Tansu> {
    if !test_support::kafka::ensure_reader() {
        eprintln!("SKIPPED: kafka-python cannot be installed");
        return None;
    }
    Tansu::start()
}

/// Both topics as kafka-python reads them (`kafka_read.py`).
fn read_topics(broker: &Tansu, cfg: &kafka::Settings) -> serde_json::Value {
    read_topics_at(&broker.addr(), cfg, &[])
}

/// The same through `addr`, with `env` saying how to connect (TLS, SASL).
fn read_topics_at(addr: &str, cfg: &kafka::Settings, env: &[(&str, &str)]) -> serde_json::Value {
    let out = std::process::Command::new("python3")
        .arg(test_support::kafka::reader())
        .args([addr, &cfg.events_topic, &cfg.rows_topic, "3"])
        .envs(env.iter().copied())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "kafka_read.py: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

fn wait(what: &str, secs: u64, mut f: impl FnMut() -> bool) {
    let t = Instant::now();
    while !f() {
        assert!(
            t.elapsed() < Duration::from_secs(secs),
            "waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Runs the sink on `cfg` until it has taken every mark, or (`want_error`)
/// until it names a failure, which is returned.
async fn drive(store: &Arc<Store>, cfg: kafka::Settings, want_error: bool) -> String {
    let stats = Arc::new(KafkaStats::default());
    let stop = Arc::new(AtomicBool::new(false));
    let sink = tokio::spawn(kafka::run_sink(
        store.clone(),
        cfg,
        store.store_id().unwrap(),
        stats.clone(),
        stop.clone(),
    ));
    let (st, store2) = (stats.clone(), store.clone());
    tokio::task::spawn_blocking(move || {
        if want_error {
            wait("the failure to be named", 30, || {
                !st.last_error.lock().unwrap().is_empty()
            })
        } else {
            wait("the sink to catch up", 60, || caught_up(&store2))
        }
    })
    .await
    .unwrap();
    stop.store(true, Relaxed);
    sink.await.unwrap();
    let e = stats.last_error.lock().unwrap().clone();
    if want_error {
        eprintln!("named: {e}");
    }
    e
}

/// A TLS terminator in front of the broker (tansu 0.6 takes `--cert` but
/// serves plain TCP only): TLS on `listener`, plain bytes to `broker`.
async fn tls_proxy(listener: tokio::net::TcpListener, broker: String, dir: std::path::PathBuf) {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let certs = CertificateDer::pem_file_iter(dir.join("kafka.pem"))
        .unwrap()
        .map(Result::unwrap)
        .collect();
    let key = PrivateKeyDer::from_pem_file(dir.join("kafka.key")).unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let tls = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));
    loop {
        let (tcp, _) = listener.accept().await.unwrap();
        let (acceptor, broker) = (acceptor.clone(), broker.clone());
        tokio::spawn(async move {
            let Ok(mut tls) = acceptor.accept(tcp).await else {
                return;
            };
            let Ok(mut plain) = tokio::net::TcpStream::connect(broker).await else {
                return;
            };
            let _ = tokio::io::copy_bidirectional(&mut tls, &mut plain).await;
        });
    }
}

/// A click a minute from `gw` for each `i` in `minutes` (ids `<prefix><i>`),
/// shipped an hour after T.
fn ship_minutes(store: &Store, gw: &mut Gw, prefix: &str, minutes: std::ops::Range<i64>) {
    for i in minutes {
        gw.click(&format!("{prefix}{i}"), T + i * 60_000);
    }
    gw.ship(store, T + 3_600_000);
}

fn caught_up(store: &Store) -> bool {
    store.export_backlog(Sink::Kafka).unwrap() == 0
        && store.kafka_events_backlog().unwrap() == (0, 0)
}

/// Checks the topics against the store: every row, at its latest revision
/// and counts; every raw event once, under its key; nothing else.
fn assert_exact(store: &Store, dump: &serde_json::Value) {
    let instance = store.store_id().unwrap();
    let rows = store.rows_in(0, u32::MAX).unwrap();
    let got = dump["rows"].as_object().unwrap();
    assert_eq!(got.len(), rows.len(), "one record per row key");
    for (k, r) in &rows {
        let key = serde_json::json!([
            instance,
            k.minute as u64 * 60,
            k.advertiser_id,
            k.campaign_id,
            k.ad_id,
            k.device.as_str(),
            std::str::from_utf8(&k.country).unwrap(),
        ])
        .to_string();
        let v = &got[&key];
        assert_eq!(v["clicks"].as_u64(), Some(r.counts.clicks), "{key}");
        assert_eq!(
            v["spend_micros"].as_u64(),
            Some(r.counts.spend_micros),
            "{key}"
        );
        assert_eq!(v["version"].as_u64(), Some(u64::from(r.version)), "{key}");
    }
    let mut want = BTreeMap::new();
    store
        .audit_events(0, u32::MAX, |gw, shard, seq, e| {
            want.insert(format!("{gw}/{shard}/{seq}"), e.click_id.to_owned());
        })
        .unwrap();
    let got: BTreeMap<String, String> = dump["events"]
        .as_object()
        .unwrap()
        .iter()
        .map(|(id, e)| (id.clone(), e["key"].as_str().unwrap().to_owned()))
        .collect();
    assert_eq!(got, want, "every raw event once, keyed by its click id");
    assert_eq!(
        dump["partitions_ok"], true,
        "an advertiser on one partition"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_topics_hold_exactly_the_store_through_a_broker_restart_and_a_full_backlog() {
    let Some(mut broker) = peers() else { return };
    let d = tempfile::tempdir().unwrap();
    // At most 4 raw-event entries wait: the outage below overflows it.
    let store = open_store(d.path(), 4);
    let cfg = settings(&broker);
    let stats = Arc::new(KafkaStats::default());
    let stop = Arc::new(AtomicBool::new(false));
    let sink = tokio::spawn(kafka::run_sink(
        store.clone(),
        cfg.clone(),
        store.store_id().unwrap(),
        stats.clone(),
        stop.clone(),
    ));
    let now = T + 3_600_000;
    let (mut a, mut b) = (Gw::new("gwa"), Gw::new("gwb"));
    for round in 0..3 {
        for i in 0..50 {
            a.click(&format!("a{round}-{i}"), T + i * 60_000);
            b.click(&format!("b{round}-{i}"), T + i * 60_000 + 7);
        }
        a.ship(&store, now);
        b.ship(&store, now);
    }
    let st = store.clone();
    tokio::task::spawn_blocking(move || wait("the sink to catch up", 60, || caught_up(&st)))
        .await
        .unwrap();
    assert!(stats.event_records.load(Relaxed) >= 300);

    // The broker dies: applying goes on, the backlog grows past its bound,
    // the failure is named.
    broker.kill9();
    for round in 3..12 {
        for i in 0..5 {
            a.click(&format!("a{round}-{i}"), T + i * 60_000 + 11);
        }
        // A click into an hour before: a minute the backlog passes over
        // earlier than every other.
        b.click(&format!("b{round}-early"), T - 3_600_000 + round * 1000);
        a.ship(&store, now);
        b.ship(&store, now);
    }
    let st = stats.clone();
    tokio::task::spawn_blocking(move || {
        wait("the failure to be named", 30, || {
            !st.last_error.lock().unwrap().is_empty()
        })
    })
    .await
    .unwrap();
    let (entries, passed_over) = store.kafka_events_backlog().unwrap();
    assert_eq!(entries, 4, "bounded");
    assert_eq!(passed_over, H * 60 - 60, "the earliest minute passed over");
    assert!(stats.errors.load(Relaxed) > 0);

    // Back: everything goes, what was passed over too.
    broker.restart();
    let st = store.clone();
    tokio::task::spawn_blocking(move || wait("the sink to catch up again", 90, || caught_up(&st)))
        .await
        .unwrap();
    stop.store(true, Relaxed);
    sink.await.unwrap();
    assert!(stats.last_error.lock().unwrap().is_empty());
    // Exact, and what the broker acknowledged before its kill -9 is there.
    let dump = read_topics(&broker, &cfg);
    assert_exact(&store, &dump);
    // Records sent twice (entries marked again after the overflow, rounds
    // cut by the kill) are there, and harmless.
    let events = dump["events"].as_object().unwrap().len() as u64;
    assert!(dump["event_messages"].as_u64().unwrap() >= events);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unknown_topic_is_named_and_nothing_is_forgotten() {
    let Some(broker) = peers() else { return };
    let d = tempfile::tempdir().unwrap();
    let store = open_store(d.path(), 0);
    let cfg = kafka::Settings {
        create_topics: false,
        events_topic: "nobody-made-this".into(),
        rows_topic: "nor-this".into(),
        ..settings(&broker)
    };
    let mut a = Gw::new("gwa");
    a.click("c1", T);
    a.ship(&store, T + 60_000);
    let e = drive(&store, cfg, true).await;
    assert!(
        e.contains("unknown topic") && e.contains("nobody-made-this"),
        "{e}"
    );
    assert_eq!(
        store.export_backlog(Sink::Kafka).unwrap(),
        1,
        "kept for later"
    );
    assert_eq!(store.kafka_events_backlog().unwrap().0, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_keeps_raw_events_hot_until_kafka_has_them() {
    // No broker here: the marks alone hold the sealed hour's raw events in
    // the store past their grace, and letting them go frees it.
    let d = tempfile::tempdir().unwrap();
    let store = open_store(d.path(), 0);
    let cfg = aggregator::audit::Settings::default();
    let target = cfg.target(&d.path().join("s.redb")).unwrap();
    let (objects, prefix) = aggregator::audit::open(&cfg, &target).unwrap();
    let now = T + 7_200_000;
    let mut a = Gw::new("gwa");
    for i in 0..30 {
        a.click(&format!("a{i}"), T + i * 60_000);
    }
    a.ship(&store, now);
    let st = store.clone();
    tokio::task::spawn_blocking(move || {
        common::reconcile_until_idle(&mut common::reconciler(&st), now)
    })
    .await
    .unwrap();
    let stats = aggregator::audit::SealStats::default();
    let sealed = aggregator::audit::seal_pass(&store, &objects, &prefix, &cfg, &stats, now, 64)
        .await
        .unwrap();
    assert_eq!(sealed, 1);
    assert_eq!(
        store.drop_hot_audit_step(now, 0, 1000).unwrap(),
        0,
        "marked: kept"
    );
    let mut keys = Vec::new();
    while let (n @ 1.., _) = store.kafka_events_backlog().unwrap() {
        let k = store.kafka_events_pending(10, |_, _, _, _, _| {}).unwrap();
        assert!(!k.is_empty() && k.len() as u64 <= n);
        store.kafka_events_done(&k).unwrap();
        keys.extend(k);
    }
    assert_eq!(keys.len(), 30, "one entry per minute");
    assert_eq!(store.drop_hot_audit_step(now, 0, 1000).unwrap(), 30);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_tls_the_broker_certificate_is_checked_and_the_topics_are_exact() {
    if !test_support::kafka::ensure_reader() {
        eprintln!("SKIPPED: kafka-python cannot be installed");
        return;
    }
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let tls_addr = listener.local_addr().unwrap().to_string();
    let Some(broker) = Tansu::start_advertising(format!("tcp://{tls_addr}")) else {
        return;
    };
    let certs = tempfile::tempdir().unwrap();
    test_support::keys::write_cert(certs.path(), "kafka");
    test_support::keys::write_cert(certs.path(), "stranger");
    let proxy = tokio::spawn(tls_proxy(listener, broker.addr(), certs.path().to_owned()));
    let d = tempfile::tempdir().unwrap();
    let store = open_store(d.path(), 0);
    ship_minutes(&store, &mut Gw::new("gwa"), "t", 0..20);
    let cfg = kafka::Settings {
        bootstrap: vec![tls_addr.clone()],
        tls: true,
        ca_file: certs.path().join("kafka.pem").to_str().unwrap().into(),
        ..settings(&broker)
    };

    // A certificate the configured CA did not sign: named, nothing taken.
    let stranger = kafka::Settings {
        ca_file: certs.path().join("stranger.pem").to_str().unwrap().into(),
        ..cfg.clone()
    };
    let e = drive(&store, stranger, true).await;
    assert!(e.starts_with("TLS handshake failed"), "{e}");
    assert!(e.contains("certificate"), "{e}");
    assert!(!caught_up(&store));

    // The right CA: everything, exactly.
    assert_eq!(drive(&store, cfg.clone(), false).await, "");
    let ca = certs.path().join("kafka.pem");
    let dump = read_topics_at(
        &tls_addr,
        &cfg,
        &[("KAFKA_SSL_CAFILE", ca.to_str().unwrap())],
    );
    assert_exact(&store, &dump);
    proxy.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sasl_scram_credentials_are_checked_and_a_refusal_is_named() {
    let Some(mut broker) = peers() else { return };
    broker.create_user("clickgate", "s3cret-pass", "scram256");
    broker.create_user("clickgate512", "other-pass", "scram512");
    broker.options = vec!["--authentication".into()];
    broker.restart();
    let d = tempfile::tempdir().unwrap();
    let store = open_store(d.path(), 0);
    let mut a = Gw::new("gwa");
    ship_minutes(&store, &mut a, "s", 0..20);
    let cfg = kafka::Settings {
        sasl_mechanism: "SCRAM-SHA-256".into(),
        sasl_username: "clickgate".into(),
        sasl_password: "s3cret-pass".into(),
        ..settings(&broker)
    };

    // A wrong password: tansu answers the proof with silence, which is
    // named as the handshake that did not complete, not as a broker down.
    let wrong = kafka::Settings {
        sasl_password: "guess".into(),
        ..cfg.clone()
    };
    let e = drive(&store, wrong, true).await;
    assert!(e.starts_with("SASL authentication"), "{e}");
    assert!(!caught_up(&store));

    // The right one: everything; then more, as a SCRAM-SHA-512 user.
    assert_eq!(drive(&store, cfg.clone(), false).await, "");
    ship_minutes(&store, &mut a, "s", 20..30);
    let cfg512 = kafka::Settings {
        sasl_mechanism: "SCRAM-SHA-512".into(),
        sasl_username: "clickgate512".into(),
        sasl_password: "other-pass".into(),
        ..cfg.clone()
    };
    assert_eq!(drive(&store, cfg512, false).await, "");
    let dump = read_topics_at(
        &broker.addr(),
        &cfg,
        &[
            ("KAFKA_SASL_USERNAME", "clickgate"),
            ("KAFKA_SASL_PASSWORD", "s3cret-pass"),
        ],
    );
    assert_exact(&store, &dump);
}
