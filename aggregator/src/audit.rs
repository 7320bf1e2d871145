//! Sealed audit files: each closed hour of raw events of each gateway, as
//! one immutable Parquet file (zstd) in object storage, named
//! deterministically and recorded in the store only after the upload.
//!
//! An hour of a gateway is sealed once reconciliation has passed its last
//! minute: then it is final and every source's raw events for it are in
//! (a source skipped as silent sends its events later). Raw events that
//! arrive for an hour already sealed go to a numbered addendum, never into
//! a rewrite of the sealed file.
//!
//! Exactly once, through crashes: a part is first recorded as an intent
//! with the exact ranges of audit entries it holds (per shard, the first
//! seqs of the entries, `[first, last]`), then built and uploaded under its
//! deterministic name, then recorded as sealed. A crash before the upload
//! or after it leaves the intent, and the next pass builds the same ranges
//! again into the same bytes under the same name: one object per part,
//! never two. Entries of a shard arrive in seq order, so later events of
//! the hour always fall past every recorded range.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;

use arrow_array::{ArrayRef, Int64Array, RecordBatch, StringArray, UInt16Array, UInt64Array};
use arrow_schema::{DataType, Field, Schema, TimeUnit};
use object_store::path::Path as ObjectPath;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload};
use serde::{Deserialize, Serialize};
use wire::record::EventRef;

use crate::store::{ReadError, Store, StoreError};

/// `[audit]` in the aggregator's config.
#[derive(Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct Settings {
    /// Seal closed hours into object storage. Needs `[reconcile] enabled`
    /// (an hour is sealed once reconciled). Default true.
    pub seal: bool,
    /// Where sealed files go: "" (a directory `audit` beside the store
    /// file), `file:///absolute/dir`, or `s3://bucket/prefix`. Default "".
    pub url: String,
    /// S3: the region. Default "us-east-1".
    pub region: String,
    /// S3-compatible storage: its endpoint, e.g. "http://10.0.0.5:9000".
    /// Default "" (AWS).
    pub endpoint: String,
    /// S3 credentials; empty: from the environment (AWS_ACCESS_KEY_ID,
    /// AWS_SECRET_ACCESS_KEY) or the instance's role. Never logged.
    pub access_key_id: String,
    pub secret_access_key: String,
    /// Allow an http:// endpoint (a test server). Default false.
    pub allow_http: bool,
    /// How often the sealer looks for hours to seal, ms. Default 5000.
    pub interval_ms: u64,
    /// zstd level of the Parquet pages. Default 3.
    pub zstd_level: i32,
    /// How often the files under the prefix are checked against the
    /// manifest (objects nobody sealed, sealed files missing or of another
    /// size), ms; 0 turns it off. Default 3600000.
    pub verify_interval_ms: u64,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            seal: true,
            url: String::new(),
            region: "us-east-1".into(),
            endpoint: String::new(),
            access_key_id: String::new(),
            secret_access_key: String::new(),
            allow_http: false,
            interval_ms: 5000,
            zstd_level: 3,
            verify_interval_ms: 3_600_000,
        }
    }
}

impl std::fmt::Debug for Settings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The secret never reaches a log line.
        f.debug_struct("Settings")
            .field("seal", &self.seal)
            .field("url", &self.url)
            .field("region", &self.region)
            .field("endpoint", &self.endpoint)
            .field("access_key_id", &self.access_key_id)
            .field(
                "secret_access_key",
                &if self.secret_access_key.is_empty() {
                    ""
                } else {
                    "(set)"
                },
            )
            .field("allow_http", &self.allow_http)
            .field("interval_ms", &self.interval_ms)
            .field("zstd_level", &self.zstd_level)
            .field("verify_interval_ms", &self.verify_interval_ms)
            .finish()
    }
}

/// Where sealed files go, parsed from `audit.url`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    Dir(std::path::PathBuf),
    S3 { bucket: String, prefix: String },
}

impl Settings {
    /// Checks the fields and parses the URL; errors name the field.
    pub fn target(&self, store_path: &std::path::Path) -> Result<Target, String> {
        if !(1..=22).contains(&self.zstd_level) {
            return Err("audit.zstd_level: 1 to 22".into());
        }
        if self.interval_ms == 0 {
            return Err("audit.interval_ms: at least 1".into());
        }
        let u = self.url.trim();
        if u.is_empty() {
            let dir = store_path
                .parent()
                .filter(|d| !d.as_os_str().is_empty())
                .unwrap_or(std::path::Path::new("."));
            return Ok(Target::Dir(dir.join("audit")));
        }
        if let Some(path) = u.strip_prefix("file://") {
            if !path.starts_with('/') {
                return Err(format!(
                    "audit.url {u:?}: file:// needs an absolute path (file:///var/lib/clickgate/audit)"
                ));
            }
            return Ok(Target::Dir(path.into()));
        }
        if let Some(rest) = u.strip_prefix("s3://") {
            let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
            let ok = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '.';
            if bucket.len() < 3 || bucket.len() > 63 || !bucket.chars().all(ok) {
                return Err(format!(
                    "audit.url {u:?}: a bucket name is 3 to 63 of [a-z0-9.-]"
                ));
            }
            let https = self.endpoint.starts_with("https://");
            let http_allowed = self.allow_http && self.endpoint.starts_with("http://");
            if !self.endpoint.is_empty() && !https && !http_allowed {
                return Err(format!(
                    "audit.endpoint {:?}: https://host[:port] (http:// with audit.allow_http)",
                    self.endpoint
                ));
            }
            return Ok(Target::S3 {
                bucket: bucket.into(),
                prefix: prefix.trim_end_matches('/').into(),
            });
        }
        Err(format!(
            "audit.url {u:?}: unknown scheme; \"\" (beside the store), file:///dir or s3://bucket/prefix"
        ))
    }
}

/// Opens the object store of a target, and the prefix objects go under.
pub fn open(cfg: &Settings, target: &Target) -> Result<(Arc<dyn ObjectStore>, ObjectPath), String> {
    match target {
        Target::Dir(dir) => {
            std::fs::create_dir_all(dir)
                .map_err(|e| format!("audit directory {}: {e}", dir.display()))?;
            let fs = object_store::local::LocalFileSystem::new_with_prefix(dir)
                .map_err(|e| format!("audit directory {}: {e}", dir.display()))?;
            Ok((Arc::new(fs), ObjectPath::from("")))
        }
        Target::S3 { bucket, prefix } => {
            let mut b = object_store::aws::AmazonS3Builder::from_env()
                .with_bucket_name(bucket)
                .with_region(&cfg.region)
                .with_allow_http(cfg.allow_http);
            if !cfg.endpoint.is_empty() {
                b = b.with_endpoint(&cfg.endpoint);
            }
            if !cfg.access_key_id.is_empty() {
                b = b
                    .with_access_key_id(&cfg.access_key_id)
                    .with_secret_access_key(&cfg.secret_access_key);
            }
            let s3 = b
                .build()
                .map_err(|e| format!("audit.url s3://{bucket}: {e}"))?;
            Ok((Arc::new(s3), ObjectPath::from(prefix.as_str())))
        }
    }
}

/// One sealed (or intended) part, as the store records it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct SealedPart {
    /// The object's name under the store's prefix.
    pub object: String,
    /// Per shard, the first seqs of the audit entries it holds:
    /// `[first, last]`.
    pub ranges: BTreeMap<u16, (u64, u64)>,
    /// "intent" until uploaded, then "sealed".
    pub state: String,
    pub rows: u64,
    pub bytes: u64,
    pub sealed_ms: Option<i64>,
    /// Minutes of the hour (0 to 60) below which retention has dropped this
    /// part's events from the hot store: they are read from the file.
    #[serde(default)]
    pub cold_below: u8,
}

/// A gateway id as it goes into an object name: `[A-Za-z0-9_.-]` as is,
/// anything else percent-encoded, so no id can climb out of its folder.
fn name_part(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-') || (b == b'.' && !out.is_empty()) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// The object name of part `part` of (hour, gateway):
/// `raw/2026-11-24/05/gateway=gw-a/part-00000.parquet` (part 0 is the
/// hour's file, 1.. its addenda).
pub fn object_name(hour: u32, gateway: &str, part: u32) -> String {
    let day = wire::time::format_time(hour as i64 * 3600);
    format!(
        "raw/{}/{}/gateway={}/part-{part:05}.parquet",
        &day[..10],
        &day[11..13],
        name_part(gateway)
    )
}

fn schema() -> Arc<Schema> {
    let ts = DataType::Timestamp(TimeUnit::Millisecond, Some("UTC".into()));
    let s = |n: &str| Field::new(n, DataType::Utf8, false);
    Arc::new(Schema::new(vec![
        s("gateway_id"),
        Field::new("shard", DataType::UInt16, false),
        Field::new("seq", DataType::UInt64, false),
        s("kind"),
        s("verdict"),
        s("source"),
        s("device"),
        s("country"),
        Field::new("event_time", ts.clone(), false),
        Field::new("receive_time", ts, false),
        Field::new("signed_ts_s", DataType::Int64, false),
        Field::new("cost_micros", DataType::UInt64, false),
        s("client_ip"),
        s("kid"),
        s("advertiser_id"),
        s("campaign_id"),
        s("ad_id"),
        s("click_id"),
        s("user_id"),
        s("redirect_url"),
    ]))
}

/// Column builders for one file.
#[derive(Default)]
struct Columns {
    gateway: Vec<String>,
    shard: Vec<u16>,
    seq: Vec<u64>,
    kind: Vec<&'static str>,
    verdict: Vec<&'static str>,
    source: Vec<&'static str>,
    device: Vec<&'static str>,
    country: Vec<String>,
    event_ms: Vec<i64>,
    receive_ms: Vec<i64>,
    signed_ts_s: Vec<i64>,
    cost_micros: Vec<u64>,
    client_ip: Vec<String>,
    strs: [Vec<String>; 7],
}

impl Columns {
    fn push(&mut self, gateway: &str, shard: u16, seq: u64, e: &EventRef<'_>) {
        self.gateway.push(gateway.to_owned());
        self.shard.push(shard);
        self.seq.push(seq);
        self.kind.push(e.kind.as_str());
        self.verdict.push(e.verdict.as_str());
        self.source.push(e.source.as_str());
        self.device.push(e.device.as_str());
        self.country
            .push(String::from_utf8_lossy(&e.country).into_owned());
        self.event_ms.push(e.event_ms);
        self.receive_ms.push(e.receive_ms);
        self.signed_ts_s.push(e.signed_ts_s);
        self.cost_micros.push(e.cost_micros);
        self.client_ip.push(
            std::net::Ipv6Addr::from(e.client_ip)
                .to_canonical()
                .to_string(),
        );
        for (c, v) in self.strs.iter_mut().zip([
            e.kid,
            e.advertiser_id,
            e.campaign_id,
            e.ad_id,
            e.click_id,
            e.user_id,
            e.redirect_url,
        ]) {
            c.push(v.to_owned());
        }
    }

    fn batch(self) -> Result<RecordBatch, String> {
        let utf8 = |v: Vec<String>| Arc::new(StringArray::from(v)) as ArrayRef;
        let utf8s = |v: Vec<&'static str>| Arc::new(StringArray::from(v)) as ArrayRef;
        let ts = |v: Vec<i64>| {
            Arc::new(arrow_array::TimestampMillisecondArray::from(v).with_timezone("UTC"))
                as ArrayRef
        };
        let [kid, adv, camp, ad, click, user, url] = self.strs;
        let cols: Vec<ArrayRef> = vec![
            utf8(self.gateway),
            Arc::new(UInt16Array::from(self.shard)),
            Arc::new(UInt64Array::from(self.seq)),
            utf8s(self.kind),
            utf8s(self.verdict),
            utf8s(self.source),
            utf8s(self.device),
            utf8(self.country),
            ts(self.event_ms),
            ts(self.receive_ms),
            Arc::new(Int64Array::from(self.signed_ts_s)),
            Arc::new(UInt64Array::from(self.cost_micros)),
            utf8(self.client_ip),
            utf8(kid),
            utf8(adv),
            utf8(camp),
            utf8(ad),
            utf8(click),
            utf8(user),
            utf8(url),
        ];
        RecordBatch::try_new(schema(), cols).map_err(|e| e.to_string())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SealError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Read(#[from] ReadError),
    #[error("building the Parquet file: {0}")]
    Encode(String),
    #[error("uploading {object}: {why}")]
    Upload { object: String, why: String },
}

/// Rows per row group: the unit a reader of one minute fetches.
const ROW_GROUP_ROWS: usize = 64 * 1024;

/// Builds the Parquet file of one part: the events of its ranges, in
/// (event minute, shard, seq) order, so the same ranges always give the same bytes.
pub fn build_part(
    store: &Store,
    hour: u32,
    gateway: &str,
    ranges: &BTreeMap<u16, (u64, u64)>,
    zstd_level: i32,
) -> Result<(Vec<u8>, u64), SealError> {
    let mut rows: Vec<(u16, u64, Vec<u8>)> = Vec::new();
    store.audit_events_in(hour, gateway, ranges, |shard, seq, e| {
        let mut b = vec![0u8; e.encoded_len()];
        e.encode_into(&mut b);
        rows.push((shard, seq, b));
    })?;
    // By event minute first, so a reader of one minute reads only the row
    // groups whose event_time statistics overlap it.
    let minute_of = |b: &[u8]| EventRef::decode(b).map_or(0, |e| e.event_ms.div_euclid(60_000));
    rows.sort_by_key(|r| (minute_of(&r.2), r.0, r.1));
    let mut cols = Columns::default();
    for (shard, seq, b) in &rows {
        let e = EventRef::decode(b).expect("encoded just above");
        cols.push(gateway, *shard, *seq, &e);
    }
    let n = rows.len() as u64;
    let batch = cols.batch().map_err(SealError::Encode)?;
    let props = parquet::file::properties::WriterProperties::builder()
        .set_compression(parquet::basic::Compression::ZSTD(
            parquet::basic::ZstdLevel::try_new(zstd_level)
                .map_err(|e| SealError::Encode(e.to_string()))?,
        ))
        .set_created_by("clickgate".into())
        .set_max_row_group_row_count(Some(ROW_GROUP_ROWS))
        .build();
    let mut out = Vec::new();
    let mut w = parquet::arrow::ArrowWriter::try_new(&mut out, schema(), Some(props))
        .map_err(|e| SealError::Encode(e.to_string()))?;
    w.write(&batch)
        .map_err(|e| SealError::Encode(e.to_string()))?;
    w.close().map_err(|e| SealError::Encode(e.to_string()))?;
    Ok((out, n))
}

/// What the sealer has done.
#[derive(Default)]
pub struct SealStats {
    pub files: AtomicU64,
    pub rows: AtomicU64,
    pub bytes: AtomicU64,
    pub upload_errors: AtomicU64,
    /// Hours with raw events not yet sealed (gauge).
    pub backlog_hours: AtomicU64,
    /// The last upload error, for /readyz; empty once one succeeds.
    pub last_error: std::sync::Mutex<String>,
    /// From the last check of the files under the prefix (gauges).
    pub foreign_objects: AtomicU64,
    pub missing_objects: AtomicU64,
}

/// What a check of the files under the prefix against the manifest found.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Verified {
    /// Sealed files found as recorded.
    pub files: u64,
    /// Objects under `raw/` that no part names: reported, never read.
    pub foreign: Vec<String>,
    /// Sealed parts whose object is absent, or of another size than sealed.
    pub missing: Vec<String>,
}

/// Lists the files under the prefix and checks them against the manifest.
pub async fn verify(
    store: &Arc<Store>,
    objects: &Arc<dyn ObjectStore>,
    prefix: &ObjectPath,
) -> Result<Verified, String> {
    use futures_util::StreamExt;
    let st = store.clone();
    let parts = tokio::task::spawn_blocking(move || st.all_audit_parts())
        .await
        .expect("store task")
        .map_err(|e| e.to_string())?;
    // Object name -> Some(bytes) once sealed, None while an intent.
    let mut known: BTreeMap<String, Option<u64>> = parts
        .into_iter()
        .filter_map(|(_, j)| serde_json::from_str::<SealedPart>(&j).ok())
        .map(|p| (p.object, (p.state == "sealed").then_some(p.bytes)))
        .collect();
    let base = prefix.to_string();
    let raw = ObjectPath::from(format!("{base}/raw").trim_start_matches('/'));
    let mut out = Verified::default();
    let mut list = objects.list(Some(&raw));
    while let Some(meta) = list.next().await {
        let meta = meta.map_err(|e| format!("listing {raw}: {e}"))?;
        let full = meta.location.to_string();
        let name = full
            .strip_prefix(&base)
            .map(|n| n.trim_start_matches('/'))
            .unwrap_or(&full)
            .to_owned();
        match known.remove(&name) {
            None => out.foreign.push(name),
            Some(Some(bytes)) if bytes != meta.size => out
                .missing
                .push(format!("{name} ({} bytes, sealed {bytes})", meta.size)),
            Some(_) => out.files += 1,
        }
    }
    out.missing.extend(
        known
            .into_iter()
            .filter(|(_, b)| b.is_some())
            .map(|(n, _)| format!("{n} (absent)")),
    );
    Ok(out)
}

/// One pass: finishes recorded intents, then seals up to `max` pending
/// hours that reconciliation has passed. Returns the parts sealed.
pub async fn seal_pass(
    store: &Arc<Store>,
    objects: &Arc<dyn ObjectStore>,
    prefix: &ObjectPath,
    cfg: &Settings,
    stats: &SealStats,
    now_ms: i64,
    max: usize,
) -> Result<u64, SealError> {
    let st = store.clone();
    let (candidates, parts, backlog) = tokio::task::spawn_blocking(move || {
        let frontier = st.reconcile_view(now_ms)?.frontier;
        let candidates = st.seal_candidates(frontier / 60, max)?;
        let parts = st.all_audit_parts()?;
        Ok::<_, StoreError>((candidates, parts, st.seal_backlog()?))
    })
    .await
    .expect("store task")?;
    // Before any upload, so a pass that fails still shows what waits.
    stats.backlog_hours.store(backlog, Relaxed);
    let mut sealed = 0;
    // Intents left by a crash: the same ranges, the same bytes, the same name.
    for ((hour, gw, part), json) in parts {
        let Ok(p) = serde_json::from_str::<SealedPart>(&json) else {
            continue;
        };
        if p.state == "intent" {
            seal_one(
                store, objects, prefix, cfg, stats, hour, &gw, part, p, None, now_ms,
            )
            .await?;
            sealed += 1;
        }
    }
    for (hour, gw, pending_seq) in candidates {
        let st = store.clone();
        let gw2 = gw.clone();
        let plan = tokio::task::spawn_blocking(move || {
            let parts = st.audit_parts(hour, &gw2)?;
            // Per shard, the last entry some part holds: entries past it
            // are new (a shard's entries arrive in seq order).
            let mut covered: BTreeMap<u16, u64> = BTreeMap::new();
            for (_, j) in &parts {
                if let Ok(p) = serde_json::from_str::<SealedPart>(j) {
                    for (s, (_, last)) in p.ranges {
                        let c = covered.entry(s).or_insert(last);
                        *c = (*c).max(last);
                    }
                }
            }
            let mut ranges: BTreeMap<u16, (u64, u64)> = BTreeMap::new();
            for (shard, after) in st.audit_entry_keys(hour, &gw2)? {
                if covered.get(&shard).is_some_and(|&c| after <= c) {
                    continue;
                }
                let r = ranges.entry(shard).or_insert((after, after));
                r.0 = r.0.min(after);
                r.1 = r.1.max(after);
            }
            Ok::<_, StoreError>((parts.len() as u32, ranges))
        })
        .await
        .expect("store task")?;
        let (next_part, ranges) = plan;
        if ranges.is_empty() {
            let st = store.clone();
            let gw2 = gw.clone();
            tokio::task::spawn_blocking(move || st.clear_audit_pending(hour, &gw2, pending_seq))
                .await
                .expect("store task")?;
            continue;
        }
        let part = SealedPart {
            object: object_name(hour, &gw, next_part),
            ranges,
            state: "intent".into(),
            rows: 0,
            bytes: 0,
            sealed_ms: None,
            cold_below: 0,
        };
        let st = store.clone();
        let (gw2, json) = (gw.clone(), serde_json::to_string(&part).expect("json"));
        tokio::task::spawn_blocking(move || st.put_audit_part(hour, &gw2, next_part, &json, None))
            .await
            .expect("store task")?;
        seal_one(
            store,
            objects,
            prefix,
            cfg,
            stats,
            hour,
            &gw,
            next_part,
            part,
            Some(pending_seq),
            now_ms,
        )
        .await?;
        sealed += 1;
    }
    let st = store.clone();
    if let Ok(Ok(n)) = tokio::task::spawn_blocking(move || st.seal_backlog()).await {
        stats.backlog_hours.store(n, Relaxed);
    }
    Ok(sealed)
}

#[allow(clippy::too_many_arguments)]
async fn seal_one(
    store: &Arc<Store>,
    objects: &Arc<dyn ObjectStore>,
    prefix: &ObjectPath,
    cfg: &Settings,
    stats: &SealStats,
    hour: u32,
    gateway: &str,
    part_no: u32,
    mut part: SealedPart,
    pending_seq: Option<u64>,
    now_ms: i64,
) -> Result<(), SealError> {
    let st = store.clone();
    let (gw, ranges, level) = (gateway.to_owned(), part.ranges.clone(), cfg.zstd_level);
    let (bytes, rows) =
        tokio::task::spawn_blocking(move || build_part(&st, hour, &gw, &ranges, level))
            .await
            .expect("build task")?;
    let location = ObjectPath::from(format!("{prefix}/{}", part.object).trim_start_matches('/'));
    let n = bytes.len() as u64;
    if let Err(e) = objects.put(&location, PutPayload::from(bytes)).await {
        stats.upload_errors.fetch_add(1, Relaxed);
        *stats.last_error.lock().unwrap() = format!("{location}: {e}");
        return Err(SealError::Upload {
            object: location.to_string(),
            why: e.to_string(),
        });
    }
    daemon::faults::crash_point("aggregator_audit_uploaded_before_manifest");
    part.state = "sealed".into();
    part.rows = rows;
    part.bytes = n;
    part.sealed_ms = Some(now_ms);
    let st = store.clone();
    let (gw, json) = (
        gateway.to_owned(),
        serde_json::to_string(&part).expect("json"),
    );
    tokio::task::spawn_blocking(move || st.put_audit_part(hour, &gw, part_no, &json, pending_seq))
        .await
        .expect("store task")?;
    stats.files.fetch_add(1, Relaxed);
    stats.rows.fetch_add(rows, Relaxed);
    stats.bytes.fetch_add(n, Relaxed);
    stats.last_error.lock().unwrap().clear();
    tracing::info!(object = %location, rows, bytes = n, "audit hour sealed");
    Ok(())
}

/// Seals hours until `stop`, retrying failed uploads with back-off (1 s
/// doubling to 60 s): the aggregator keeps applying and serving meanwhile.
pub async fn run(
    store: Arc<Store>,
    objects: Arc<dyn ObjectStore>,
    prefix: ObjectPath,
    cfg: Settings,
    stats: Arc<SealStats>,
    stop: Arc<AtomicBool>,
) {
    let mut backoff = Duration::from_secs(1);
    let mut verified_at: Option<tokio::time::Instant> = None;
    while !stop.load(Relaxed) {
        let every = Duration::from_millis(cfg.verify_interval_ms);
        if cfg.verify_interval_ms > 0 && verified_at.is_none_or(|t| t.elapsed() >= every) {
            verified_at = Some(tokio::time::Instant::now());
            match verify(&store, &objects, &prefix).await {
                Ok(v) => {
                    stats.foreign_objects.store(v.foreign.len() as u64, Relaxed);
                    stats.missing_objects.store(v.missing.len() as u64, Relaxed);
                    if !v.foreign.is_empty() || !v.missing.is_empty() {
                        tracing::warn!(
                            foreign = ?v.foreign.iter().take(10).collect::<Vec<_>>(),
                            missing = ?v.missing.iter().take(10).collect::<Vec<_>>(),
                            files = v.files,
                            "audit files under the prefix differ from the manifest; foreign objects are never read"
                        );
                    }
                }
                Err(e) => tracing::warn!(error = %e, "checking the audit files failed; will retry"),
            }
        }
        let pause = match seal_pass(&store, &objects, &prefix, &cfg, &stats, crate::now_ms(), 64)
            .await
        {
            Ok(n) => {
                backoff = Duration::from_secs(1);
                if n > 0 {
                    continue;
                }
                Duration::from_millis(cfg.interval_ms)
            }
            Err(e) => {
                tracing::warn!(error = %e, retry_in_s = backoff.as_secs(), "audit sealing failed; will retry");
                let p = backoff;
                backoff = (backoff * 2).min(Duration::from_secs(60));
                p
            }
        };
        let until = tokio::time::Instant::now() + pause;
        while tokio::time::Instant::now() < until && !stop.load(Relaxed) {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// Reads raw events back from sealed files, for reconciliation of minutes
/// whose hot copy retention has dropped. Used from threads outside the
/// runtime (the reconciler), so it blocks on the runtime's handle.
pub struct ColdReader {
    pub objects: Arc<dyn ObjectStore>,
    pub prefix: ObjectPath,
    pub rt: tokio::runtime::Handle,
}

/// Why a sealed file could not be read back: named, never merged.
#[derive(Debug, thiserror::Error)]
pub enum ColdError {
    #[error("sealed file {object}: {why}")]
    Unreadable { object: String, why: String },
    #[error("sealed file {object} is not a clickgate audit file: {why}")]
    Foreign { object: String, why: String },
}

impl ColdReader {
    /// Visits the events of `part` whose event minute lies in its
    /// `[m0, m1)`, with gateway, shard and seq, reading only the row groups
    /// whose event_time statistics overlap those minutes.
    pub fn events(
        &self,
        part: &crate::store::ColdPart,
        f: &mut dyn FnMut(&str, u16, u64, &EventRef<'_>),
    ) -> Result<u64, ColdError> {
        let location =
            ObjectPath::from(format!("{}/{}", self.prefix, part.object).trim_start_matches('/'));
        let unreadable = |why: String| ColdError::Unreadable {
            object: location.to_string(),
            why,
        };
        let foreign = |why: String| ColdError::Foreign {
            object: location.to_string(),
            why,
        };
        let (lo, hi) = (part.m0 as i64 * 60_000, part.m1 as i64 * 60_000);
        let len = if part.bytes > 0 {
            part.bytes
        } else {
            block_on(&self.rt, self.objects.head(&location))
                .map_err(|e| unreadable(e.to_string()))?
                .size
        };
        let chunks = Ranged {
            objects: self.objects.clone(),
            location: location.clone(),
            rt: self.rt.clone(),
            len,
        };
        let b = parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(chunks)
            .map_err(|e| foreign(e.to_string()))?;
        let want = schema();
        let have = b.schema();
        let same = have.fields().len() == want.fields().len()
            && have
                .fields()
                .iter()
                .zip(want.fields())
                .all(|(a, w)| a.name() == w.name() && a.data_type() == w.data_type());
        if !same {
            return Err(foreign("its columns are not the audit schema".into()));
        }
        let groups: Vec<usize> = b
            .metadata()
            .row_groups()
            .iter()
            .enumerate()
            .filter(|(_, rg)| {
                use parquet::file::statistics::Statistics;
                match rg.column(8).statistics() {
                    Some(Statistics::Int64(s)) => match (s.min_opt(), s.max_opt()) {
                        (Some(&a), Some(&z)) => a < hi && z >= lo,
                        _ => true,
                    },
                    _ => true,
                }
            })
            .map(|(i, _)| i)
            .collect();
        let reader = b
            .with_row_groups(groups)
            .build()
            .map_err(|e| unreadable(e.to_string()))?;
        let mut n = 0;
        for batch in reader {
            let batch = batch.map_err(|e| unreadable(e.to_string()))?;
            n += visit_batch(&batch, &part.gateway, lo, hi, f).map_err(&foreign)?;
        }
        Ok(n)
    }
}

/// A sealed file read through ranged GETs: the footer, then only the row
/// groups asked for.
struct Ranged {
    objects: Arc<dyn ObjectStore>,
    location: ObjectPath,
    rt: tokio::runtime::Handle,
    len: u64,
}

impl parquet::file::reader::Length for Ranged {
    fn len(&self) -> u64 {
        self.len
    }
}

impl parquet::file::reader::ChunkReader for Ranged {
    type T = bytes::buf::Reader<bytes::Bytes>;

    fn get_read(&self, start: u64) -> parquet::errors::Result<Self::T> {
        use bytes::Buf;
        Ok(self
            .get_bytes(start, (self.len - start.min(self.len)) as usize)?
            .reader())
    }

    fn get_bytes(&self, start: u64, length: usize) -> parquet::errors::Result<bytes::Bytes> {
        block_on(
            &self.rt,
            self.objects
                .get_range(&self.location, start..start + length as u64),
        )
        .map_err(|e| parquet::errors::ParquetError::External(Box::new(e)))
    }
}

/// Runs `fut` on the runtime from synchronous code: directly from a thread
/// outside it (the reconciler's), through a short-lived thread from one
/// inside it (a blocking task), where blocking on it is not allowed.
fn block_on<F: std::future::Future + Send>(rt: &tokio::runtime::Handle, fut: F) -> F::Output
where
    F::Output: Send,
{
    if tokio::runtime::Handle::try_current().is_err() {
        return rt.block_on(fut);
    }
    std::thread::scope(|s| {
        s.spawn(|| rt.block_on(fut))
            .join()
            .expect("object store read")
    })
}

/// Visits the rows of one record batch of an audit file whose event time
/// is in `[lo, hi)` ms; every row must be of `gateway`.
fn visit_batch(
    b: &RecordBatch,
    gateway: &str,
    lo: i64,
    hi: i64,
    f: &mut dyn FnMut(&str, u16, u64, &EventRef<'_>),
) -> Result<u64, String> {
    fn col<T: 'static>(b: &RecordBatch, i: usize) -> Result<&T, String> {
        b.column(i)
            .as_any()
            .downcast_ref::<T>()
            .ok_or_else(|| format!("column {i} has another type"))
    }
    fn parse<T: Copy>(
        all: &[T],
        name: impl Fn(&T) -> &'static str,
        s: &str,
        what: &str,
    ) -> Result<T, String> {
        all.iter()
            .find(|v| name(v) == s)
            .copied()
            .ok_or_else(|| format!("{what} {s:?}"))
    }
    let s = |i| col::<StringArray>(b, i);
    let (gw, kind, verdict, source, device, country) = (s(0)?, s(3)?, s(4)?, s(5)?, s(6)?, s(7)?);
    let shard = col::<UInt16Array>(b, 1)?;
    let seq = col::<UInt64Array>(b, 2)?;
    let ev = col::<arrow_array::TimestampMillisecondArray>(b, 8)?;
    let rc = col::<arrow_array::TimestampMillisecondArray>(b, 9)?;
    let signed = col::<Int64Array>(b, 10)?;
    let cost = col::<UInt64Array>(b, 11)?;
    let (ip, kid, adv, camp, ad, click, user, url) = (
        s(12)?,
        s(13)?,
        s(14)?,
        s(15)?,
        s(16)?,
        s(17)?,
        s(18)?,
        s(19)?,
    );
    use wire::record::{Device, EventKind, Source, Verdict};
    let mut n = 0;
    for i in 0..b.num_rows() {
        let t = ev.value(i);
        if t < lo || t >= hi {
            continue;
        }
        if gw.value(i) != gateway {
            return Err(format!(
                "a row of gateway {:?} in a file of {gateway:?}",
                gw.value(i)
            ));
        }
        let c = country.value(i).as_bytes();
        let client_ip = match ip.value(i).parse::<std::net::IpAddr>() {
            Ok(std::net::IpAddr::V4(a)) => a.to_ipv6_mapped().octets(),
            Ok(std::net::IpAddr::V6(a)) => a.octets(),
            Err(_) => return Err(format!("client_ip {:?}", ip.value(i))),
        };
        let e = EventRef {
            kind: parse(EventKind::ALL, |v| v.as_str(), kind.value(i), "kind")?,
            verdict: parse(Verdict::ALL, |v| v.as_str(), verdict.value(i), "verdict")?,
            source: parse(Source::ALL, |v| v.as_str(), source.value(i), "source")?,
            device: parse(Device::ALL, |v| v.as_str(), device.value(i), "device")?,
            country: [
                c.first().copied().unwrap_or(b'Z'),
                c.get(1).copied().unwrap_or(b'Z'),
            ],
            event_ms: t,
            receive_ms: rc.value(i),
            signed_ts_s: signed.value(i),
            cost_micros: cost.value(i),
            client_ip,
            kid: kid.value(i),
            advertiser_id: adv.value(i),
            campaign_id: camp.value(i),
            ad_id: ad.value(i),
            click_id: click.value(i),
            user_id: user.value(i),
            redirect_url: url.value(i),
        };
        f(gateway, shard.value(i), seq.value(i), &e);
        n += 1;
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_checked_and_names_are_deterministic() {
        let cfg = |u: &str| Settings {
            url: u.into(),
            ..Settings::default()
        };
        let sp = std::path::Path::new("/var/lib/cg/agg.redb");
        assert_eq!(
            cfg("").target(sp).unwrap(),
            Target::Dir("/var/lib/cg/audit".into())
        );
        assert_eq!(
            cfg("file:///data/audit").target(sp).unwrap(),
            Target::Dir("/data/audit".into())
        );
        assert_eq!(
            cfg("s3://my-bucket/clickgate/raw/").target(sp).unwrap(),
            Target::S3 {
                bucket: "my-bucket".into(),
                prefix: "clickgate/raw".into()
            }
        );
        for (u, want) in [
            ("gs://b/p", "unknown scheme"),
            ("file://relative", "absolute"),
            ("s3://A_B", "bucket name"),
            ("https://x", "unknown scheme"),
        ] {
            let e = cfg(u).target(sp).unwrap_err();
            assert!(e.contains("audit.url") && e.contains(want), "{u}: {e}");
        }
        let e = Settings {
            url: "s3://bucket".into(),
            endpoint: "http://127.0.0.1:9000".into(),
            ..Settings::default()
        }
        .target(sp)
        .unwrap_err();
        assert!(e.contains("audit.endpoint"), "{e}");
        assert_eq!(
            object_name(498_749, "gw-a", 0),
            "raw/2026-11-24/05/gateway=gw-a/part-00000.parquet"
        );
        assert_eq!(
            object_name(498_749, "../x/y", 3),
            "raw/2026-11-24/05/gateway=%2E.%2Fx%2Fy/part-00003.parquet"
        );
        let secret = Settings {
            secret_access_key: "hunter2".into(),
            ..Settings::default()
        };
        assert!(!format!("{secret:?}").contains("hunter2"));
    }
}
