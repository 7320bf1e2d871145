//! The ClickHouse sink against a real clickhouse-server (Debian's, started
//! privately by scripts/clickhouse-local, installed when missing): rows land
//! in bulk; a batch re-sent after a crash, or an older state arriving after
//! a newer one, leaves the same final rows; corrections show as new
//! versions; and a query answered from ClickHouse equals the store's.

use aggregator::clickhouse::Client;
use aggregator::config::ClickHouse;
use aggregator::store::{ExportRow, Query, Settings, Sink, Store};
use wire::batch::{push_item, Batch, BatchKind};
use wire::record::{Counts, Device, PartialRecord, RowKey};
use wire::segment::RecordType;

const M0: u32 = 29_925_000; // a minute in 2026

fn key(ad: &str, minute: u32, device: Device) -> RowKey {
    RowKey {
        minute,
        advertiser_id: "adv-1".into(),
        campaign_id: "camp-1".into(),
        ad_id: ad.into(),
        device,
        country: *b"DE",
    }
}

fn clicks(n: u64) -> Counts {
    Counts {
        clicks: n,
        impressions: 10 * n,
        spend_micros: 250_000 * n,
        ..Counts::default()
    }
}

/// A partials batch of one partial (at `seq`) covering the events after the
/// previous partial (at `after`).
fn partial(after: u64, seq: u64, rows: Vec<(RowKey, Counts)>) -> Vec<u8> {
    let mut b = Vec::new();
    PartialRecord {
        from_seq: after,
        to_seq: seq - 1,
        watermark_ms: M0 as i64 * 60_000,
        rows,
        unrecorded: Vec::new(),
    }
    .encode(&mut b);
    let mut raw = Vec::new();
    push_item(&mut raw, seq, RecordType::Partial as u8, &b);
    Batch::seal(BatchKind::Partials, "gw", 0, after, seq, 1, &raw, 1)
        .unwrap()
        .encode()
}

/// (rows, sum of clicks, sum of spend, max version) of the final rows.
async fn final_state(c: &Client) -> String {
    c.exec(
        "SELECT count(), sum(clicks), sum(spend_micros), max(version) FROM clickgate_minutes FINAL FORMAT TSV",
        "",
    )
    .await
    .unwrap()
    .trim()
    .to_string()
}

#[test]
fn rows_land_once_through_resends_and_corrections_and_queries_agree() {
    let Some(server) = test_support::clickhouse::ClickHouse::start() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let store = std::sync::Arc::new(
        Store::open(
            &dir.path().join("s.redb"),
            Settings {
                export: true,
                ..Settings::default()
            },
        )
        .unwrap(),
    );
    let gws = vec!["gw".to_string()];
    let now = (M0 as i64 + 1) * 60_000;
    let apply = |frame: &[u8]| {
        let (ack, _) = store.apply_many(&[(frame, &gws)], now).remove(0);
        assert_eq!(ack.status, wire::batch::Status::Applied, "{ack:?}");
    };
    let cfg = ClickHouse {
        url: format!("http://127.0.0.1:{}", server.port),
        ..ClickHouse::default()
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let c = Client::new(&cfg, "");
        c.create_tables().await.unwrap();
        c.create_tables().await.unwrap(); // idempotent

        apply(&partial(
            0,
            2,
            vec![
                (key("ad-1", M0, Device::Desktop), clicks(3)),
                (key("ad-2", M0, Device::Mobile), clicks(2)),
                (key("ad-1", M0 + 1, Device::Desktop), clicks(1)),
            ],
        ));
        let first = store.export_pending(Sink::ClickHouse, 1000).unwrap();
        assert_eq!(first.len(), 3);
        c.insert_rows(&first).await.unwrap();
        // A crash before the store forgot the export: the same rows again.
        let again = store.export_pending(Sink::ClickHouse, 1000).unwrap();
        assert_eq!(again, first);
        c.insert_rows(&again).await.unwrap();
        assert_eq!(final_state(&c).await, "3\t6\t1500000\t0");
        store.export_done(Sink::ClickHouse, &ExportRow::done(&again)).unwrap();
        assert_eq!(store.export_backlog(Sink::ClickHouse).unwrap(), 0);

        // A later partial changes one row: only it is exported, newer.
        apply(&partial(
            2,
            3,
            vec![(key("ad-1", M0, Device::Desktop), clicks(4))],
        ));
        let second = store.export_pending(Sink::ClickHouse, 1000).unwrap();
        assert_eq!(second.len(), 1);
        assert!(second[0].revision > first[0].revision, "a higher revision");
        c.insert_rows(&second).await.unwrap();
        // The older state arriving late (a stale retry) changes nothing.
        c.insert_rows(&first).await.unwrap();
        assert_eq!(final_state(&c).await, "3\t10\t2500000\t0");
        store.export_done(Sink::ClickHouse, &ExportRow::done(&second)).unwrap();

        // A correction (reconcile) is a new version.
        store
            .write_corrections(&[(key("ad-2", M0, Device::Mobile), clicks(1))])
            .unwrap();
        let fix = store.export_pending(Sink::ClickHouse, 1000).unwrap();
        c.insert_rows(&fix).await.unwrap();
        assert_eq!(final_state(&c).await, "3\t9\t2250000\t1");

        // Another instance's rows for the same key (late data after a move)
        // stand beside this instance's, whatever their revisions: readers sum.
        let other = Client::new(&cfg, "agg-b");
        let mut theirs = store.export_pending(Sink::ClickHouse, 0).unwrap();
        theirs.extend(fix.iter().cloned().map(|mut r| {
            r.revision = 1;
            r.row = aggregator::rows::Row {
                counts: clicks(2),
                version: 0,
            };
            r
        }));
        other.insert_rows(&theirs).await.unwrap();
        assert_eq!(final_state(&c).await, "4\t11\t2750000\t1");
        c.exec(
            "ALTER TABLE clickgate_minutes DELETE WHERE instance = 'agg-b'",
            "",
        )
        .await
        .unwrap();
        let t = std::time::Instant::now();
        while final_state(&c).await != "3\t9\t2250000\t1" {
            assert!(
                t.elapsed() < std::time::Duration::from_secs(10),
                "mutation not applied"
            );
            std::thread::sleep(std::time::Duration::from_millis(50));
        }

        // The same question, answered by the store and by ClickHouse.
        c.write_watermark(store.watermark(now).unwrap(), store.rules().lateness_ms)
            .await
            .unwrap();
        for bucket_s in [60, 3600] {
            let q = Query {
                advertiser_id: "adv-1".into(),
                start_s: M0 as i64 * 60 - 3600,
                end_s: M0 as i64 * 60 + 7200,
                bucket_s,
                campaign_id: None,
                ad_id: None,
            };
            let from_store = store.query(&q, now).unwrap();
            let (from_ch, wm) = c.query(&q).await.unwrap();
            assert_eq!(wm, store.watermark(now).unwrap());
            assert!(!from_store.is_empty());
            assert_eq!(from_ch, from_store, "bucket {bucket_s}");
        }

        // Retention drops the rows: the query API answers the same range
        // from ClickHouse, not in part from the store.
        store.export_done(Sink::ClickHouse, &ExportRow::done(&fix)).unwrap();
        let q = Query {
            advertiser_id: "adv-1".into(),
            start_s: M0 as i64 * 60,
            end_s: M0 as i64 * 60 + 3600,
            bucket_s: 3600,
            campaign_id: None,
            ad_id: None,
        };
        let before = store.query(&q, now).unwrap();
        let clicks_before: u64 = before.values().map(|(c, _, _)| c.clicks).sum();
        while store.drop_rows_step(M0 + 2, 100).unwrap().rows > 0 {}
        assert!(store.rows_in(0, M0 + 2).unwrap().is_empty());
        let tokens: aggregator::config::Tokens = toml::from_str(
            "[[token]]\nadvertiser_id = \"adv-1\"\ntoken = \"ch-test-token-0123456789\"\n",
        )
        .unwrap();
        let api = std::sync::Arc::new(aggregator::http::Api {
            store: store.clone(),
            tokens,
            metrics: Default::default(),
            query_max_points: 1000,
            ready: true.into(),
            cluster: None,
            clickhouse: Some(Client::new(&cfg, "")),
            clickhouse_for_all: false,
            rows_retention_ms: 3 * 86_400_000,
            forward: aggregator::http::forwarder(),
            reconcile: Default::default(),
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, aggregator::http::router(api)).await });
        let body = {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
            let req = format!(
                "GET /api/v1/advertisers/analytics?advertiser_id=adv-1&start_time={}&end_time={}&granularity=1h HTTP/1.1\r\n\
                 Host: t\r\nAuthorization: Bearer ch-test-token-0123456789\r\nConnection: close\r\n\r\n",
                q.start_s, q.end_s
            );
            s.write_all(req.as_bytes()).await.unwrap();
            let mut out = String::new();
            s.read_to_string(&mut out).await.unwrap();
            assert!(out.starts_with("HTTP/1.1 200"), "{out}");
            out.split_once("\r\n\r\n").unwrap().1.to_owned()
        };
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        let points = v["series"].as_array().unwrap();
        let clicks: u64 = points.iter().map(|p| p["clicks"].as_u64().unwrap()).sum();
        assert_eq!(clicks, clicks_before, "{body}");
        assert!(points.iter().all(|p| p["unique_users"].is_null()), "{body}");
    });
}
