//! Retention as the query API shows it: a range reaching past the rows kept
//! is refused with the retention named (no ClickHouse configured), never
//! answered in part; and a failing upload is named in /readyz.

use std::sync::Arc;

mod common;
use common::get;

const TOKEN: Option<&str> = Some("test-token-0123456789");

use aggregator::store::{Settings, Store};

#[test]
fn queries_past_the_rows_kept_are_refused_with_the_retention_named() {
    let d = tempfile::tempdir().unwrap();
    let store = Arc::new(Store::open(&d.path().join("s.redb"), Settings::default()).unwrap());
    // Rows of minutes before 2026-11-24T05:00Z have been dropped.
    let kept_from = 29_924_940u32;
    store.drop_rows_step(kept_from, 100).unwrap();
    let tokens: aggregator::config::Tokens =
        toml::from_str("[[token]]\nadvertiser_id = \"adv\"\ntoken = \"test-token-0123456789\"\n")
            .unwrap();
    let metrics = Arc::new(aggregator::metrics::Metrics::default());
    let api = Arc::new(aggregator::http::Api {
        store,
        tokens,
        metrics: metrics.clone(),
        query_max_points: 100_000,
        ready: true.into(),
        cluster: None,
        clickhouse: None,
        clickhouse_for_all: false,
        rows_retention_ms: 3_600_000 * 48,
        forward: aggregator::http::forwarder(),
        reconcile: aggregator::reconcile::Settings::default(),
    });
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let listener = rt
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    rt.spawn(async move { axum::serve(listener, aggregator::http::router(api)).await });
    let q = |start: &str| {
        format!("/api/v1/advertisers/analytics?advertiser_id=adv&start_time={start}&end_time=2026-11-24T06:00:00Z&granularity=1h")
    };
    let (st, body) = get(&addr, &q("2026-11-24T04:59:00Z"), TOKEN);
    assert_eq!(st, 422, "{body}");
    assert!(
        body.contains("retention.rows_ms = 172800000") && body.contains("2026-11-24T05:00:00Z"),
        "{body}"
    );
    let (st, body) = get(&addr, &q("2026-11-24T05:00:00Z"), TOKEN);
    assert_eq!(st, 200, "{body}");

    let (st, body) = get(&addr, "/readyz", TOKEN);
    assert_eq!((st, body.as_str()), (200, "ready\n"));
    *metrics.audit.last_error.lock().unwrap() =
        "raw/2026-11-24/05/gateway=a/part-00000.parquet: InvalidAccessKeyId".into();
    let (st, body) = get(&addr, "/readyz", TOKEN);
    assert_eq!(st, 200);
    assert!(
        body.contains("audit upload failing") && body.contains("InvalidAccessKeyId"),
        "{body}"
    );
}
