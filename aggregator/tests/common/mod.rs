//! What the aggregator's integration tests share: a gateway shard that
//! ships events and partials into a store, reading click ids back from a
//! sealed file, and a real S3-compatible server.
#![allow(dead_code, unused_imports)] // each test crate uses its own part

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::SeqCst};
use std::sync::Arc;

use aggregator::store::Store;
use arrow_array::{Array, StringArray};
use wire::batch::{push_item, Batch, BatchKind, Status};
use wire::record::{Counts, Device, EventKind, EventRef, PartialRecord, RowKey, Source, Verdict};
use wire::segment::RecordType;

pub fn agg_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_clickgate-aggregator"))
}

pub use test_support::free_port as port;
pub use test_support::free_udp_port as udp_port;
pub use test_support::net::{get, post};

/// A store in `dir` whose minutes are final a minute after they end.
pub fn open_store(dir: &Path) -> Arc<Store> {
    open_store_with(dir, aggregator::store::Settings::default())
}

/// As [`open_store`], with `settings` (their rules' lateness replaced).
pub fn open_store_with(dir: &Path, settings: aggregator::store::Settings) -> Arc<Store> {
    Arc::new(
        Store::open(
            &dir.join("s.redb"),
            aggregator::store::Settings {
                rules: aggregator::merge::Rules {
                    lateness_ms: 60_000,
                    ..settings.rules.clone()
                },
                ..settings
            },
        )
        .unwrap(),
    )
}

/// A reconciler with the default settings.
pub fn reconciler(store: &Arc<Store>) -> aggregator::reconcile::Reconciler {
    aggregator::reconcile::Reconciler::new(
        store.clone(),
        aggregator::reconcile::Settings::default(),
        Arc::new(aggregator::metrics::ReconcileStats::default()),
    )
}

/// Turns `r` until it has nothing left to do.
pub fn reconcile_until_idle(r: &mut aggregator::reconcile::Reconciler, now: i64) {
    let mut idle = 0;
    while idle < 3 {
        match r.turn(now).unwrap() {
            aggregator::reconcile::Turn::Worked(_) => idle = 0,
            _ => idle += 1,
        }
    }
}

pub const H: u32 = 498_749; // 2026-11-24T05:00Z, in hours
pub const T: i64 = H as i64 * 3_600_000;

/// One gateway shard shipping: events, then a partial summing them.
pub struct Gw {
    pub name: &'static str,
    pub seq: u64,
    pub last_partial: u64,
    pub shipped: u64,
    pending: Vec<(u64, Vec<u8>)>,
    rows: BTreeMap<RowKey, Counts>,
}

impl Gw {
    pub fn new(name: &'static str) -> Gw {
        Gw {
            name,
            seq: 0,
            last_partial: 0,
            shipped: 0,
            pending: vec![],
            rows: BTreeMap::new(),
        }
    }

    pub fn click(&mut self, id: &str, ms: i64) {
        self.click_by(id, ms, "u1");
    }

    pub fn click_by(&mut self, id: &str, ms: i64, user: &str) {
        self.click_full("adv", id, ms, user);
    }

    /// A click for advertiser `adv`.
    pub fn click_for(&mut self, adv: &str, id: &str, ms: i64) {
        self.click_full(adv, id, ms, "u1");
    }

    fn click_full(&mut self, adv: &str, id: &str, ms: i64, user: &str) {
        self.seq += 1;
        let e = EventRef {
            kind: EventKind::Click,
            verdict: Verdict::Accepted,
            source: Source::Batch,
            device: Device::Mobile,
            country: *b"FR",
            event_ms: ms,
            receive_ms: ms,
            signed_ts_s: ms / 1000,
            cost_micros: 1500,
            client_ip: [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 255, 255, 192, 0, 2, 7],
            kid: "k1",
            advertiser_id: adv,
            campaign_id: "camp",
            ad_id: "ad-1",
            click_id: id,
            user_id: user,
            redirect_url: "https://example.com/",
        };
        let mut b = vec![0u8; e.encoded_len()];
        e.encode_into(&mut b);
        self.pending.push((self.seq, b));
        self.rows
            .entry(RowKey::of(&e))
            .or_default()
            .add_event(e.kind, e.verdict, e.cost_micros);
    }

    pub fn ship(&mut self, s: &Store, now: i64) {
        self.seq += 1;
        let mut raw = Vec::new();
        let mut b = Vec::new();
        PartialRecord {
            from_seq: self.last_partial,
            to_seq: self.seq - 1,
            watermark_ms: now,
            rows: std::mem::take(&mut self.rows).into_iter().collect(),
            unrecorded: Vec::new(),
        }
        .encode(&mut b);
        push_item(&mut raw, self.seq, RecordType::Partial as u8, &b);
        let p = Batch::seal(
            BatchKind::Partials,
            self.name,
            0,
            self.last_partial,
            self.seq,
            1,
            &raw,
            1,
        )
        .unwrap()
        .encode();
        self.last_partial = self.seq;
        let mut raw = Vec::new();
        let evs = std::mem::take(&mut self.pending);
        for (seq, b) in &evs {
            push_item(&mut raw, *seq, RecordType::Event as u8, b);
        }
        let e = Batch::seal(
            BatchKind::Events,
            self.name,
            0,
            self.shipped,
            self.seq,
            evs.len() as u32,
            &raw,
            1,
        )
        .unwrap()
        .encode();
        self.shipped = self.seq;
        let gws = vec!["gwa".to_string(), "gwb".to_string()];
        for f in [p, e] {
            let (a, _) = s.apply_many(&[(&f, &gws)], now).remove(0);
            assert_eq!(a.status, Status::Applied, "{}", a.reason);
        }
    }
}

pub fn click_ids(bytes: &[u8]) -> Vec<String> {
    let r = parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(
        bytes::Bytes::copy_from_slice(bytes),
    )
    .unwrap()
    .build()
    .unwrap();
    let mut ids = Vec::new();
    for b in r {
        let b = b.unwrap();
        let c = b.column_by_name("click_id").unwrap();
        let c = c.as_any().downcast_ref::<StringArray>().unwrap();
        for i in 0..c.len() {
            ids.push(c.value(i).to_owned());
        }
    }
    ids.sort();
    ids
}

/// An S3-compatible server (s3s-fs over a directory) on loopback, in this
/// process, checking SigV4 signatures; it can be taken down, or slowed.
pub struct S3 {
    pub addr: SocketAddr,
    /// Objects of bucket `b` are files under `root/b`.
    pub root: PathBuf,
    /// Connections are closed as soon as accepted.
    pub down: Arc<AtomicBool>,
    /// Each PUT waits this long before it is served.
    pub put_delay_ms: Arc<AtomicU64>,
    pub puts_started: Arc<AtomicU64>,
    pub puts_done: Arc<AtomicU64>,
    _rt: tokio::runtime::Runtime,
}

pub const S3_KEY: &str = "clickgate-test-key";
pub const S3_SECRET: &str = "clickgate-test-secret-0123456789";

impl S3 {
    pub fn start(root: &Path, bucket: &str) -> S3 {
        use hyper_util::rt::{TokioExecutor, TokioIo};
        std::fs::create_dir_all(root.join(bucket)).unwrap();
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let service = {
            let fs = s3s_fs::FileSystem::new(root).unwrap();
            let mut b = s3s::service::S3ServiceBuilder::new(fs);
            b.set_auth(s3s::auth::SimpleAuth::from_single(S3_KEY, S3_SECRET));
            b.build()
        };
        let listener = rt
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .unwrap();
        let addr = listener.local_addr().unwrap();
        let down = Arc::new(AtomicBool::new(false));
        let put_delay_ms = Arc::new(AtomicU64::new(0));
        let puts_started = Arc::new(AtomicU64::new(0));
        let puts_done = Arc::new(AtomicU64::new(0));
        let (d, delay, started, done) = (
            down.clone(),
            put_delay_ms.clone(),
            puts_started.clone(),
            puts_done.clone(),
        );
        rt.spawn(async move {
            loop {
                let Ok((sock, _)) = listener.accept().await else {
                    continue;
                };
                if d.load(SeqCst) {
                    drop(sock);
                    continue;
                }
                let (svc, delay, started, done) = (
                    service.clone(),
                    delay.clone(),
                    started.clone(),
                    done.clone(),
                );
                let handler = hyper::service::service_fn(
                    move |req: hyper::Request<hyper::body::Incoming>| {
                        let (svc, delay, started, done) =
                            (svc.clone(), delay.clone(), started.clone(), done.clone());
                        async move {
                            let put = req.method() == hyper::Method::PUT;
                            if put {
                                started.fetch_add(1, SeqCst);
                                let ms = delay.load(SeqCst);
                                tokio::time::sleep(std::time::Duration::from_millis(ms)).await;
                            }
                            let r = hyper::service::Service::call(&svc, req).await;
                            if put {
                                done.fetch_add(1, SeqCst);
                            }
                            r
                        }
                    },
                );
                tokio::spawn(async move {
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(sock), handler)
                        .await;
                });
            }
        });
        S3 {
            addr,
            root: root.to_owned(),
            down,
            put_delay_ms,
            puts_started,
            puts_done,
            _rt: rt,
        }
    }

    /// Every object of `bucket` whose name ends in `.parquet`, by key.
    pub fn objects(&self, bucket: &str) -> Vec<String> {
        fn walk(dir: &Path, base: &Path, out: &mut Vec<String>) {
            for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
                let p = e.path();
                if p.is_dir() {
                    walk(&p, base, out);
                } else if p.extension().is_some_and(|x| x == "parquet") {
                    out.push(p.strip_prefix(base).unwrap().to_string_lossy().into_owned());
                }
            }
        }
        let mut out = Vec::new();
        let base = self.root.join(bucket);
        walk(&base, &base, &mut out);
        out.sort();
        out
    }
}
