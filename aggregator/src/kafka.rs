//! The Kafka sink: raw click and impression events, and merged minute rows,
//! produced to two topics, exported from the store the way the ClickHouse
//! sink is.
//!
//! The store marks what changed in the same transaction as the change (a
//! row's revision, an audit entry's key: `Store::export_pending(Sink::Kafka)`
//! and `Store::kafka_events_pending`). The sink produces the marked records
//! in bulk, acks=all, and forgets a mark only once the broker acknowledged
//! every record made from it. A crash, a timeout or a lost answer between
//! the two produces the same records again, with the same keys and
//! revisions: a consumer that keeps the highest revision per row key ends
//! with exactly the store's rows, and one that keeps one event per event
//! key with exactly the audit trail. That discipline is what makes the
//! output exact, so the client needs no idempotent producer or transaction
//! (rskafka has neither; docs/KAFKA.md says why it was chosen).
//!
//! Both topics are partitioned by advertiser (Kafka's murmur2 of the
//! advertiser id, as the Java client places a record keyed by it), so one
//! advertiser's records stay in order on one partition. The record format
//! is JSON, one record per message, documented in docs/KAFKA.md.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rskafka::client::error::{Error as KafkaError, ProtocolError};
use rskafka::client::partition::{Compression, PartitionClient, UnknownTopicHandling};
use rskafka::client::{Client, ClientBuilder, Credentials, SaslConfig};
use rskafka::record::Record;
use serde::Deserialize;
use wire::record::EventRef;

use crate::clickhouse::{country, js, write_row_json};
use crate::store::{AuditKey, ExportRow, Sink, Store};

/// `[kafka]` in the aggregator's config. Off unless `bootstrap` is set.
#[derive(Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct Settings {
    /// Brokers to bootstrap from, "host:port". Empty: no sink. Default [].
    pub bootstrap: Vec<String>,
    /// Raw click and impression events, keyed by event id. Default
    /// "clickgate.events".
    pub events_topic: String,
    /// Merged minute rows, keyed by their dimension tuple. Default
    /// "clickgate.minutes".
    pub rows_topic: String,
    /// Create the topics when missing, with `partitions` partitions and
    /// `replication_factor` replicas. Default true.
    pub create_topics: bool,
    /// Default 12.
    pub partitions: i32,
    /// Default 3 (a single test broker takes 1).
    pub replication_factor: i16,
    /// TLS to the brokers (rustls, the system's roots unless `ca_file`).
    /// Default false.
    pub tls: bool,
    /// A CA (PEM) to trust instead of the system's roots. Default "".
    pub ca_file: String,
    /// "" (none), "PLAIN", "SCRAM-SHA-256" or "SCRAM-SHA-512". Default "".
    pub sasl_mechanism: String,
    /// SASL credentials; never logged.
    pub sasl_username: String,
    pub sasl_password: String,
    /// How often marked records are produced, ms. Default 500.
    pub flush_interval_ms: u64,
    /// Most rows, and most audit entries (a gateway shard's batch of raw
    /// events), taken from the store per round. Default 2000.
    pub batch_entries_max: usize,
    /// Largest produce request to one partition, bytes (uncompressed);
    /// keep it under the broker's `message.max.bytes`. Default 900000.
    pub request_bytes_max: usize,
    /// zstd-compress record batches. Default true.
    pub compress: bool,
    /// One broker request's time limit, ms. Default 10000.
    pub timeout_ms: u64,
    /// Most audit entries waiting for Kafka while the broker is down or
    /// slow; past it new entries are passed over and marked again once the
    /// sink caught up (their raw events stay hot until then). Rows need no
    /// bound: a row is marked at most once. Default 1000000.
    pub backlog_entries_max: u64,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            bootstrap: Vec::new(),
            events_topic: "clickgate.events".into(),
            rows_topic: "clickgate.minutes".into(),
            create_topics: true,
            partitions: 12,
            replication_factor: 3,
            tls: false,
            ca_file: String::new(),
            sasl_mechanism: String::new(),
            sasl_username: String::new(),
            sasl_password: String::new(),
            flush_interval_ms: 500,
            batch_entries_max: 2000,
            request_bytes_max: 900_000,
            compress: true,
            timeout_ms: 10_000,
            backlog_entries_max: 1_000_000,
        }
    }
}

impl std::fmt::Debug for Settings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Settings")
            .field("bootstrap", &self.bootstrap)
            .field("events_topic", &self.events_topic)
            .field("rows_topic", &self.rows_topic)
            .field("tls", &self.tls)
            .field("sasl_mechanism", &self.sasl_mechanism)
            .finish_non_exhaustive()
    }
}

impl Settings {
    pub fn enabled(&self) -> bool {
        !self.bootstrap.is_empty()
    }

    /// Refuses what would fail later, naming the field.
    pub fn validate(&self) -> Result<(), String> {
        if !self.enabled() {
            return Ok(());
        }
        for b in &self.bootstrap {
            let ok = b
                .rsplit_once(':')
                .is_some_and(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok_and(|p| p > 0));
            if !ok {
                return Err(format!("kafka.bootstrap: \"{b}\" is not host:port"));
            }
        }
        // Kafka's own rule for topic names.
        let topic = |t: &str| {
            !t.is_empty()
                && t.len() <= 249
                && t != "."
                && t != ".."
                && t.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
        };
        for (field, t) in [
            ("kafka.events_topic", &self.events_topic),
            ("kafka.rows_topic", &self.rows_topic),
        ] {
            if !topic(t) {
                return Err(format!(
                    "{field}: \"{t}\" is not a Kafka topic name ([A-Za-z0-9._-], 1 to 249)"
                ));
            }
        }
        if self.events_topic == self.rows_topic {
            return Err("kafka.events_topic and kafka.rows_topic: must differ".into());
        }
        if self.partitions < 1 || self.replication_factor < 1 {
            return Err("kafka.partitions and kafka.replication_factor: at least 1".into());
        }
        match self.sasl_mechanism.as_str() {
            "" => {}
            "PLAIN" | "SCRAM-SHA-256" | "SCRAM-SHA-512" => {
                if self.sasl_username.is_empty() {
                    return Err("kafka.sasl_username: required with sasl_mechanism".into());
                }
            }
            m => {
                return Err(format!(
                "kafka.sasl_mechanism: \"{m}\" (one of \"\", PLAIN, SCRAM-SHA-256, SCRAM-SHA-512)"
            ))
            }
        }
        if !self.ca_file.is_empty() && !self.tls {
            return Err("kafka.ca_file: set tls = true to use it".into());
        }
        for (field, v) in [
            ("kafka.flush_interval_ms", self.flush_interval_ms),
            ("kafka.batch_entries_max", self.batch_entries_max as u64),
            ("kafka.timeout_ms", self.timeout_ms),
            ("kafka.backlog_entries_max", self.backlog_entries_max),
        ] {
            if v == 0 {
                return Err(format!("{field}: at least 1"));
            }
        }
        if self.request_bytes_max < 1024 {
            return Err("kafka.request_bytes_max: at least 1024".into());
        }
        Ok(())
    }
}

/// What the sink did, for /metrics and /readyz.
#[derive(Default)]
pub struct KafkaStats {
    pub event_records: AtomicU64,
    pub row_records: AtomicU64,
    pub produce_requests: AtomicU64,
    pub errors: AtomicU64,
    /// Records the broker refused as too large even alone: reported, then
    /// passed over so the rest can go.
    pub too_large: AtomicU64,
    /// Gauges.
    pub backlog_rows: AtomicU64,
    pub backlog_entries: AtomicU64,
    /// When the sink last had nothing waiting, ms since the epoch (0: never
    /// yet); the backlog's age is now minus this while anything waits.
    pub caught_up_ms: AtomicI64,
    /// The last error, named, for /readyz; empty once a round succeeds.
    pub last_error: Mutex<String>,
    /// The last record passed over as too large, for /readyz (kept).
    pub last_too_large: Mutex<String>,
}

impl KafkaStats {
    pub fn render(&self, s: &mut String, now_ms: i64) {
        for (name, help, v) in [
            (
                "kafka_event_records_total",
                "Raw-event records the broker acknowledged.",
                &self.event_records,
            ),
            (
                "kafka_row_records_total",
                "Minute-row records the broker acknowledged (a row again after each change).",
                &self.row_records,
            ),
            (
                "kafka_produce_requests_total",
                "Produce requests the broker acknowledged.",
                &self.produce_requests,
            ),
            (
                "kafka_errors_total",
                "Sink rounds that failed (retried with back-off).",
                &self.errors,
            ),
            (
                "kafka_records_too_large_total",
                "Records the broker refused as too large even alone: logged with their key, not produced.",
                &self.too_large,
            ),
        ] {
            crate::metrics::metric(s, name, help, "counter", v.load(Relaxed));
        }
        let (rows, entries) = (
            self.backlog_rows.load(Relaxed),
            self.backlog_entries.load(Relaxed),
        );
        crate::metrics::metric(
            s,
            "kafka_backlog_rows",
            "Changed rows not yet acknowledged by Kafka.",
            "gauge",
            rows,
        );
        crate::metrics::metric(
            s,
            "kafka_backlog_event_entries",
            "Audit entries (batches of raw events) not yet acknowledged by Kafka.",
            "gauge",
            entries,
        );
        let since = self.caught_up_ms.load(Relaxed);
        let age = if rows + entries == 0 || since == 0 {
            0.0
        } else {
            (now_ms - since).max(0) as f64 / 1000.0
        };
        crate::metrics::metric(
            s,
            "kafka_backlog_age_seconds",
            "At most how long the oldest record waiting for Kafka has waited (0 when none waits).",
            "gauge",
            age,
        );
    }
}

// ---- records ----

/// Kafka's murmur2 (the Java client's `Utils.murmur2`).
pub fn murmur2(data: &[u8]) -> i32 {
    const M: u32 = 0x5bd1_e995;
    let mut h: u32 = 0x9747_b28c ^ data.len() as u32;
    let mut chunks = data.chunks_exact(4);
    for c in &mut chunks {
        let mut k = u32::from_le_bytes([c[0], c[1], c[2], c[3]]);
        k = k.wrapping_mul(M);
        k ^= k >> 24;
        k = k.wrapping_mul(M);
        h = h.wrapping_mul(M);
        h ^= k;
    }
    let rest = chunks.remainder();
    if !rest.is_empty() {
        for (i, &b) in rest.iter().enumerate().rev() {
            h ^= u32::from(b) << (8 * i);
        }
        h = h.wrapping_mul(M);
    }
    h ^= h >> 13;
    h = h.wrapping_mul(M);
    h ^= h >> 15;
    h as i32
}

/// The partition an advertiser's records go to: where the Java client's
/// default partitioner puts a record keyed by the advertiser id.
pub fn partition_of(advertiser_id: &str, partitions: i32) -> i32 {
    (murmur2(advertiser_id.as_bytes()) & 0x7fff_ffff) % partitions.max(1)
}

fn ip_text(ip: &[u8; 16]) -> String {
    let v6 = std::net::Ipv6Addr::from(*ip);
    match v6.to_ipv4_mapped() {
        Some(v4) => v4.to_string(),
        None => v6.to_string(),
    }
}

/// An event's key: its event id (`click_id`) when accepted; with the
/// verdict appended otherwise, so a compacted topic keeps the accepted
/// record of every id and never lets a later duplicate replace it.
pub fn event_key(e: &EventRef<'_>) -> String {
    match e.verdict {
        wire::record::Verdict::Accepted => e.click_id.to_owned(),
        v => format!("{}#{}", e.click_id, v.as_str()),
    }
}

/// An event's record (docs/KAFKA.md).
pub fn event_json(gateway: &str, shard: u16, seq: u64, e: &EventRef<'_>) -> String {
    let mut s = String::with_capacity(400);
    let _ = write!(
        s,
        "{{\"event_id\":{},\"kind\":\"{}\",\"verdict\":\"{}\",\"source\":\"{}\",\
         \"advertiser_id\":{},\"campaign_id\":{},\"ad_id\":{},\"user_id\":{},\
         \"device\":\"{}\",\"country\":{},\"cost_micros\":{},\"event_ms\":{},\"receive_ms\":{},\
         \"signed_ts_s\":{},\"client_ip\":\"{}\",\"kid\":{},\"redirect_url\":{},\
         \"gateway_id\":{},\"shard\":{},\"seq\":{}}}",
        js(e.click_id),
        e.kind.as_str(),
        e.verdict.as_str(),
        e.source.as_str(),
        js(e.advertiser_id),
        js(e.campaign_id),
        js(e.ad_id),
        js(e.user_id),
        e.device.as_str(),
        js(country(&e.country)),
        e.cost_micros,
        e.event_ms,
        e.receive_ms,
        e.signed_ts_s,
        ip_text(&e.client_ip),
        js(e.kid),
        js(e.redirect_url),
        js(gateway),
        shard,
        seq
    );
    s
}

/// A row's key: its whole dimension tuple with the writing store's id, as a
/// JSON array (unambiguous whatever the ids hold).
pub fn row_key(r: &ExportRow, instance: &str) -> String {
    let k = &r.key;
    serde_json::json!([
        instance,
        k.minute as u64 * 60,
        k.advertiser_id,
        k.campaign_id,
        k.ad_id,
        k.device.as_str(),
        country(&k.country),
    ])
    .to_string()
}

/// A row's record (docs/KAFKA.md): the ClickHouse sink's fields and the
/// row's state, `final_` as of the export.
pub fn row_json(r: &ExportRow, instance: &str, final_: bool) -> String {
    let state = if r.reconciled {
        "reconciled"
    } else if final_ {
        "final"
    } else {
        "provisional"
    };
    let mut s = String::with_capacity(300);
    write_row_json(&mut s, r, instance, &format!(",\"state\":\"{state}\""));
    s
}

/// One record to produce, with the index of the store mark it came from.
struct Pending {
    partition: i32,
    key: String,
    value: String,
    origin: usize,
}

/// Records grouped per partition (in the order they were made), each group
/// cut into requests of at most `bytes_max` (a record alone may be more).
fn requests(records: Vec<Pending>, bytes_max: usize) -> BTreeMap<i32, Vec<Vec<Pending>>> {
    let mut out: BTreeMap<i32, Vec<Vec<Pending>>> = BTreeMap::new();
    let mut size: BTreeMap<i32, usize> = BTreeMap::new();
    for r in records {
        // Key, value and the record's own framing (varints, headers).
        let n = r.key.len() + r.value.len() + 24;
        let groups = out.entry(r.partition).or_default();
        let s = size.entry(r.partition).or_default();
        if groups.is_empty() || *s + n > bytes_max {
            groups.push(Vec::new());
            *s = 0;
        }
        *s += n;
        groups.last_mut().expect("pushed").push(r);
    }
    out
}

// ---- the sink ----

/// Why a round failed, named for the log and /readyz.
fn name_error(e: &KafkaError) -> String {
    let what = match e {
        KafkaError::ServerError {
            protocol_error: p, ..
        } => match p {
            ProtocolError::UnknownTopicOrPartition => "unknown topic or partition",
            ProtocolError::TopicAuthorizationFailed | ProtocolError::ClusterAuthorizationFailed => {
                "authorization failed"
            }
            ProtocolError::SaslAuthenticationFailed => "SASL authentication failed",
            ProtocolError::MessageTooLarge | ProtocolError::RecordListTooLarge => {
                "message too large"
            }
            _ => "broker error",
        },
        KafkaError::Connection(c) => connection_failure(&c.to_string()),
        _ => "request failed",
    };
    format!("{what}: {e}")
}

/// The stage a failed connection broke at. rskafka carries the cause of a
/// failed connect as text (its retry loop boxes the errors), so it is read
/// from there.
fn connection_failure(text: &str) -> &'static str {
    let t = text.to_ascii_lowercase();
    if t.contains("sasl") {
        "SASL authentication failed"
    } else if t.contains("certificate") || t.contains("tls") {
        "TLS handshake failed"
    } else {
        "broker unreachable"
    }
}

/// Names a connect that did not finish in time, by whether the broker took
/// the TCP connection at all. One that takes it and never finishes the
/// handshake is most often refusing the credentials without a word (tansu
/// answers a wrong SCRAM proof with silence).
async fn unfinished_connect(cfg: &Settings, timeout: Duration) -> String {
    for addr in &cfg.bootstrap {
        let probe = tokio::net::TcpStream::connect(addr.as_str());
        if let Ok(Ok(_)) = tokio::time::timeout(Duration::from_secs(1), probe).await {
            let stage = if !cfg.sasl_mechanism.is_empty() {
                "SASL authentication did not complete (check kafka.sasl_username and kafka.sasl_password)"
            } else if cfg.tls {
                "TLS handshake did not complete"
            } else {
                "no answer to the Kafka handshake"
            };
            return format!(
                "{stage}: {addr} took the connection but did not finish within {timeout:?}"
            );
        }
    }
    format!(
        "broker unreachable: no connection to {} within {timeout:?}",
        cfg.bootstrap.join(", ")
    )
}

fn too_large(e: &KafkaError) -> bool {
    matches!(
        e,
        KafkaError::ServerError {
            protocol_error: ProtocolError::MessageTooLarge | ProtocolError::RecordListTooLarge,
            ..
        }
    )
}

struct Conn {
    client: Client,
    /// (topic, partition) -> its client, made on first use.
    partitions: BTreeMap<(String, i32), Arc<PartitionClient>>,
    /// topic -> its partition count.
    counts: BTreeMap<String, i32>,
}

fn tls_config(cfg: &Settings) -> anyhow::Result<Arc<rustls::ClientConfig>> {
    let mut roots = rustls::RootCertStore::empty();
    if cfg.ca_file.is_empty() {
        for c in rustls_native_certs::load_native_certs().certs {
            let _ = roots.add(c);
        }
    } else {
        use rustls::pki_types::pem::PemObject;
        for c in rustls::pki_types::CertificateDer::pem_file_iter(&cfg.ca_file)
            .map_err(|e| anyhow::anyhow!("kafka.ca_file {}: {e}", cfg.ca_file))?
        {
            roots.add(c.map_err(|e| anyhow::anyhow!("kafka.ca_file {}: {e}", cfg.ca_file))?)?;
        }
    }
    // The provider named: both ring and aws-lc-rs are linked (object_store
    // brings the second), so rustls has no process default to fall back on.
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    Ok(Arc::new(
        rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .with_root_certificates(roots)
            .with_no_client_auth(),
    ))
}

async fn connect(cfg: &Settings) -> anyhow::Result<Conn> {
    let timeout = Duration::from_millis(cfg.timeout_ms);
    let mut b = ClientBuilder::new(cfg.bootstrap.clone())
        .client_id("clickgate-aggregator")
        .backoff_config(rskafka::BackoffConfig {
            init_backoff: Duration::from_millis(50),
            max_backoff: Duration::from_secs(1),
            base: 2.0,
            // Half the connect's deadline: a broker that answers with an
            // error (SASL, TLS) is then reported with rskafka's own cause
            // before the outer timeout names only the stage.
            deadline: Some(timeout / 2),
        });
    if cfg.tls {
        b = b.tls_config(tls_config(cfg)?);
    }
    if !cfg.sasl_mechanism.is_empty() {
        let c = Credentials::new(cfg.sasl_username.clone(), cfg.sasl_password.clone());
        b = b.sasl_config(match cfg.sasl_mechanism.as_str() {
            "PLAIN" => SaslConfig::Plain(c),
            "SCRAM-SHA-256" => SaslConfig::ScramSha256(c),
            _ => SaslConfig::ScramSha512(c),
        });
    }
    let client = match tokio::time::timeout(timeout, b.build()).await {
        Ok(built) => built.map_err(|e| anyhow::anyhow!(name_error(&e)))?,
        Err(_) => anyhow::bail!(unfinished_connect(cfg, timeout).await),
    };
    let mut counts: BTreeMap<String, i32> = client
        .list_topics()
        .await
        .map_err(|e| anyhow::anyhow!(name_error(&e)))?
        .into_iter()
        .map(|t| (t.name, t.partitions.len() as i32))
        .collect();
    for topic in [&cfg.events_topic, &cfg.rows_topic] {
        if counts.get(topic.as_str()).is_some_and(|&n| n > 0) {
            continue;
        }
        anyhow::ensure!(
            cfg.create_topics,
            "unknown topic: {topic} does not exist (create it, or set kafka.create_topics = true)"
        );
        client
            .controller_client()
            .map_err(|e| anyhow::anyhow!(name_error(&e)))?
            .create_topic(
                topic.as_str(),
                cfg.partitions,
                cfg.replication_factor,
                cfg.timeout_ms as i32,
            )
            .await
            .map_err(|e| anyhow::anyhow!("creating topic {topic}: {}", name_error(&e)))?;
        tracing::info!(topic = %topic, partitions = cfg.partitions, "Kafka: topic created");
        counts.insert(topic.clone(), cfg.partitions);
    }
    Ok(Conn {
        client,
        partitions: BTreeMap::new(),
        counts,
    })
}

impl Conn {
    async fn partition(&mut self, topic: &str, p: i32) -> Result<Arc<PartitionClient>, KafkaError> {
        if let Some(c) = self.partitions.get(&(topic.to_owned(), p)) {
            return Ok(c.clone());
        }
        let c = Arc::new(
            self.client
                .partition_client(topic, p, UnknownTopicHandling::Error)
                .await?,
        );
        self.partitions.insert((topic.to_owned(), p), c.clone());
        Ok(c)
    }

    fn count(&self, topic: &str) -> i32 {
        self.counts.get(topic).copied().unwrap_or(1)
    }
}

/// What producing a set of records came to: the origins not all of whose
/// records the broker acknowledged, the records acknowledged, and the first
/// error.
#[derive(Default)]
struct Produced {
    failed: std::collections::BTreeSet<usize>,
    acked: u64,
    error: Option<String>,
}

/// Produces the records: the partitions at once, each partition's requests
/// in order ([`send_in_order`]).
async fn produce(
    conn: &mut Conn,
    cfg: &Settings,
    topic: &str,
    records: Vec<Pending>,
    stats: &KafkaStats,
) -> Produced {
    let mut out = Produced::default();
    let mut work = Vec::new();
    for (p, groups) in requests(records, cfg.request_bytes_max) {
        match conn.partition(topic, p).await {
            Ok(c) => work.push(produce_partition(c, groups, cfg, topic, stats)),
            Err(e) => {
                out.error.get_or_insert(name_error(&e));
                for g in groups {
                    out.failed.extend(g.iter().map(|r| r.origin));
                }
            }
        }
    }
    for p in futures_util::future::join_all(work).await {
        out.acked += p.acked;
        out.failed.extend(p.failed);
        if out.error.is_none() {
            out.error = p.error;
        }
    }
    out
}

async fn produce_partition(
    client: Arc<PartitionClient>,
    groups: Vec<Vec<Pending>>,
    cfg: &Settings,
    topic: &str,
    stats: &KafkaStats,
) -> Produced {
    let timeout = Duration::from_millis(cfg.timeout_ms);
    let compression = if cfg.compress {
        Compression::Zstd
    } else {
        Compression::NoCompression
    };
    let send = |g: &[Pending]| {
        let now = chrono::Utc::now();
        let batch: Vec<Record> = g
            .iter()
            .map(|r| Record {
                key: Some(r.key.as_bytes().to_vec()),
                value: Some(r.value.as_bytes().to_vec()),
                headers: BTreeMap::new(),
                timestamp: now,
            })
            .collect();
        let client = client.clone();
        async move {
            match tokio::time::timeout(timeout, client.produce(batch, compression)).await {
                Ok(Ok(_)) => Sent::Acked,
                Ok(Err(e)) if too_large(&e) => Sent::TooLarge,
                Ok(Err(e)) => Sent::Failed(name_error(&e)),
                Err(_) => Sent::Failed(format!("broker did not answer within {timeout:?}")),
            }
        }
    };
    send_in_order(groups, send, topic, stats).await
}

/// What the broker made of one produce request.
enum Sent {
    Acked,
    TooLarge,
    Failed(String),
}

/// Sends one partition's requests in order; a failed one stops the
/// partition (what follows would land out of order). A request refused as
/// too large is split in two, down to one record, which is then reported,
/// counted and passed over.
async fn send_in_order<F, Fut>(
    groups: Vec<Vec<Pending>>,
    mut send: F,
    topic: &str,
    stats: &KafkaStats,
) -> Produced
where
    F: FnMut(&[Pending]) -> Fut,
    Fut: std::future::Future<Output = Sent>,
{
    let mut out = Produced::default();
    let mut queue: std::collections::VecDeque<Vec<Pending>> = groups.into();
    let mut broken = false;
    while let Some(mut g) = queue.pop_front() {
        if broken {
            out.failed.extend(g.iter().map(|r| r.origin));
            continue;
        }
        match send(&g).await {
            Sent::Acked => {
                out.acked += g.len() as u64;
                stats.produce_requests.fetch_add(1, Relaxed);
            }
            Sent::TooLarge if g.len() > 1 => {
                let back = g.split_off(g.len() / 2);
                queue.push_front(back);
                queue.push_front(g);
            }
            Sent::TooLarge => {
                let r = &g[0];
                stats.too_large.fetch_add(1, Relaxed);
                let msg = format!(
                    "message too large: {topic} refused the record with key {} ({} bytes) even alone; passed over",
                    r.key,
                    r.value.len()
                );
                tracing::error!("Kafka: {msg}");
                *stats.last_too_large.lock().unwrap() = msg;
            }
            Sent::Failed(e) => {
                out.error.get_or_insert(e);
                out.failed.extend(g.iter().map(|r| r.origin));
                broken = true;
            }
        }
    }
    out
}

/// One round: marked rows, then marked raw events. Answers how many marks
/// it took (rows, entries), or the first error, named.
async fn round(
    conn: &mut Conn,
    store: &Arc<Store>,
    cfg: &Settings,
    instance: &str,
    stats: &KafkaStats,
) -> anyhow::Result<(usize, usize)> {
    let mut first_error = None;
    // Rows.
    let (st, max) = (store.clone(), cfg.batch_entries_max);
    let rows = tokio::task::spawn_blocking(move || st.export_pending(Sink::Kafka, max)).await??;
    let taken = rows.len();
    if !rows.is_empty() {
        let wm = store.watermark(crate::now_ms())?;
        let lateness = store.rules().lateness_ms;
        let n = conn.count(&cfg.rows_topic);
        let records = rows
            .iter()
            .enumerate()
            .map(|(i, r)| {
                let end_ms = (i64::from(r.key.minute) + 1) * 60_000;
                Pending {
                    partition: partition_of(&r.key.advertiser_id, n),
                    key: row_key(r, instance),
                    value: row_json(r, instance, end_ms + lateness <= wm),
                    origin: i,
                }
            })
            .collect();
        let p = produce(conn, cfg, &cfg.rows_topic, records, stats).await;
        stats.row_records.fetch_add(p.acked, Relaxed);
        let done: Vec<(Vec<u8>, u64)> = rows
            .iter()
            .enumerate()
            .filter(|(i, _)| !p.failed.contains(i))
            .map(|(_, r)| (r.key_bytes.clone(), r.revision))
            .collect();
        daemon::faults::crash_point("aggregator_kafka_produced_before_forget");
        let st = store.clone();
        tokio::task::spawn_blocking(move || st.export_done(Sink::Kafka, &done)).await??;
        first_error = first_error.or(p.error);
    }
    // Raw events.
    let (st, max) = (store.clone(), cfg.batch_entries_max);
    let n = conn.count(&cfg.events_topic);
    let (entries, records) = tokio::task::spawn_blocking(move || {
        let mut records = Vec::new();
        let entries = st.kafka_events_pending(max, |origin, gw, shard, seq, e| {
            records.push(Pending {
                partition: partition_of(e.advertiser_id, n),
                key: event_key(e),
                value: event_json(gw, shard, seq, e),
                origin,
            });
        })?;
        anyhow::Ok((entries, records))
    })
    .await??;
    let taken = (taken, entries.len());
    if !entries.is_empty() {
        let p = produce(conn, cfg, &cfg.events_topic, records, stats).await;
        stats.event_records.fetch_add(p.acked, Relaxed);
        let done: Vec<AuditKey> = entries
            .iter()
            .enumerate()
            .filter(|(i, _)| !p.failed.contains(i))
            .map(|(_, k)| k.clone())
            .collect();
        daemon::faults::crash_point("aggregator_kafka_produced_before_forget");
        let st = store.clone();
        tokio::task::spawn_blocking(move || st.kafka_events_done(&done)).await??;
        first_error = first_error.or(p.error);
    }
    if let Some(e) = first_error {
        anyhow::bail!(e);
    }
    Ok(taken)
}

/// Produces marked rows and raw events to Kafka: every `flush_interval_ms`,
/// or at once while a backlog remains; once more after `stop` is set, then
/// returns. Store reads and writes run on the blocking pool.
pub async fn run_sink(
    store: Arc<Store>,
    cfg: Settings,
    instance: String,
    stats: Arc<KafkaStats>,
    stop: Arc<AtomicBool>,
) {
    let mut conn: Option<Conn> = None;
    let mut backoff = Duration::from_millis(100);
    loop {
        let stopping = stop.load(Relaxed);
        let started_ms = crate::now_ms();
        let result = async {
            if conn.is_none() {
                conn = Some(connect(&cfg).await?);
                tracing::info!(bootstrap = ?cfg.bootstrap, "Kafka: connected");
            }
            let c = conn.as_mut().expect("connected");
            let n = round(c, &store, &cfg, &instance, &stats).await?;
            // After the backlog was full: once caught up, mark what was
            // passed over (a bounded step per round).
            let st = store.clone();
            let (entries, remark_from) =
                tokio::task::spawn_blocking(move || st.kafka_events_backlog()).await??;
            if entries == 0 && remark_from != 0 {
                let (st, max) = (store.clone(), cfg.backlog_entries_max / 2 + 1);
                let marked =
                    tokio::task::spawn_blocking(move || st.kafka_events_remark(max)).await??;
                tracing::info!(
                    entries = marked,
                    "Kafka: raw events passed over while the backlog was full marked again"
                );
            }
            anyhow::Ok(n)
        }
        .await;
        // A round that took fewer than it may, and had every record
        // acknowledged, took everything waiting when it started: what waits
        // now is younger than that.
        let max = cfg.batch_entries_max;
        if matches!(result, Ok((r, e)) if r < max && e < max)
            || stats.caught_up_ms.load(Relaxed) == 0
        {
            stats.caught_up_ms.store(started_ms, Relaxed);
        }
        let st = store.clone();
        if let Ok(Ok((rows, (entries, _)))) = tokio::task::spawn_blocking(move || {
            anyhow::Ok((st.export_backlog(Sink::Kafka)?, st.kafka_events_backlog()?))
        })
        .await
        {
            stats.backlog_rows.store(rows, Relaxed);
            stats.backlog_entries.store(entries, Relaxed);
        }
        if stopping {
            if let Err(e) = result {
                tracing::warn!(error = %format!("{e:#}"), "Kafka: last records not produced before stop");
            }
            return;
        }
        match result {
            Ok((r, e)) => {
                backoff = Duration::from_millis(100);
                stats.last_error.lock().unwrap().clear();
                if r < max && e < max {
                    crate::clickhouse::sleep_unless(
                        &stop,
                        Duration::from_millis(cfg.flush_interval_ms),
                    )
                    .await;
                }
            }
            Err(e) => {
                let msg = format!("{e:#}");
                stats.errors.fetch_add(1, Relaxed);
                tracing::warn!(error = %msg, "Kafka: produce failed; retrying");
                *stats.last_error.lock().unwrap() = msg;
                // A new connection next time: the broker may have moved,
                // restarted or lost the topic.
                conn = None;
                crate::clickhouse::sleep_unless(&stop, backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(10));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rows::Row;
    use wire::record::{Counts, Device, EventKind, RowKey, Source, Verdict};

    #[test]
    fn murmur2_and_partitions_match_the_java_client() {
        // Kafka's own test vectors (UtilsTest.testMurmur2).
        for (s, h) in [
            ("21", -973_932_308),
            ("foobar", -790_332_482),
            ("a-little-bit-long-string", -985_981_536),
            ("a-little-bit-longer-string", -1_486_304_829),
            (
                "lkjh234lh9fiuh90y23oiuhsafujhadof229phr9h19h89h8",
                -58_897_971,
            ),
            ("abc", 479_470_107),
        ] {
            assert_eq!(murmur2(s.as_bytes()), h, "{s}");
        }
        assert_eq!(
            partition_of("foobar", 12),
            (-790_332_482i32 & 0x7fff_ffff) % 12
        );
        for a in ["a", "adv-1", "ü"] {
            assert!((0..7).contains(&partition_of(a, 7)));
        }
    }

    fn event(verdict: Verdict) -> EventRef<'static> {
        EventRef {
            kind: EventKind::Click,
            verdict,
            source: Source::Get,
            device: Device::Mobile,
            country: *b"FR",
            event_ms: 1_700_000_000_123,
            receive_ms: 1_700_000_000_200,
            signed_ts_s: 1_700_000_000,
            cost_micros: 1500,
            client_ip: std::net::Ipv4Addr::new(192, 0, 2, 7)
                .to_ipv6_mapped()
                .octets(),
            kid: "k1",
            advertiser_id: "adv \"1\"",
            campaign_id: "c",
            ad_id: "x",
            click_id: "clk-9",
            user_id: "u",
            redirect_url: "https://example.com/?a=1&b=2",
        }
    }

    #[test]
    fn events_are_json_keyed_by_event_id_accepted_ones_alone() {
        let e = event(Verdict::Accepted);
        let v: serde_json::Value = serde_json::from_str(&event_json("gw-1", 3, 42, &e)).unwrap();
        assert_eq!(v["event_id"], "clk-9");
        assert_eq!(v["advertiser_id"], "adv \"1\"");
        assert_eq!(v["client_ip"], "192.0.2.7");
        assert_eq!(
            (v["shard"].as_u64(), v["seq"].as_u64()),
            (Some(3), Some(42))
        );
        assert_eq!(v["verdict"], "accepted");
        assert_eq!(v["event_ms"], 1_700_000_000_123i64);
        assert_eq!(event_key(&e), "clk-9");
        assert_eq!(event_key(&event(Verdict::Duplicate)), "clk-9#duplicate");
    }

    #[test]
    fn rows_are_json_keyed_by_their_whole_tuple() {
        let r = ExportRow {
            key_bytes: vec![],
            key: RowKey {
                minute: 29_000_000,
                advertiser_id: "a,b".into(),
                campaign_id: "c".into(),
                ad_id: "x".into(),
                device: Device::Desktop,
                country: *b"DE",
            },
            row: Row {
                counts: Counts {
                    clicks: 5,
                    ..Counts::default()
                },
                version: 2,
            },
            revision: 77,
            reconciled: false,
        };
        let k: serde_json::Value = serde_json::from_str(&row_key(&r, "inst")).unwrap();
        assert_eq!(
            k,
            serde_json::json!(["inst", 1_740_000_000u64, "a,b", "c", "x", "desktop", "DE"])
        );
        let v: serde_json::Value = serde_json::from_str(&row_json(&r, "inst", true)).unwrap();
        assert_eq!(
            (v["clicks"].as_u64(), v["revision"].as_u64()),
            (Some(5), Some(77))
        );
        assert_eq!(
            (v["version"].as_u64(), v["state"].as_str()),
            (Some(2), Some("final"))
        );
        let v: serde_json::Value = serde_json::from_str(&row_json(&r, "inst", false)).unwrap();
        assert_eq!(v["state"], "provisional");
        let r = ExportRow {
            reconciled: true,
            ..r
        };
        let v: serde_json::Value = serde_json::from_str(&row_json(&r, "inst", true)).unwrap();
        assert_eq!(v["state"], "reconciled");
    }

    #[test]
    fn records_go_per_partition_in_order_cut_by_size() {
        let rec = |partition, n: usize, origin| Pending {
            partition,
            key: "k".into(),
            value: "v".repeat(n),
            origin,
        };
        let out = requests(
            vec![
                rec(1, 100, 0),
                rec(0, 10, 1),
                rec(1, 100, 2),
                rec(1, 5000, 3),
                rec(1, 10, 4),
            ],
            300,
        );
        let shape: Vec<(i32, Vec<Vec<usize>>)> = out
            .iter()
            .map(|(p, gs)| {
                (
                    *p,
                    gs.iter()
                        .map(|g| g.iter().map(|r| r.origin).collect())
                        .collect(),
                )
            })
            .collect();
        assert_eq!(
            shape,
            [(0, vec![vec![1]]), (1, vec![vec![0, 2], vec![3], vec![4]])]
        );
    }

    #[test]
    fn a_malformed_section_is_refused_naming_the_field() {
        let on = Settings {
            bootstrap: vec!["127.0.0.1:9092".into()],
            ..Settings::default()
        };
        assert_eq!(on.validate(), Ok(()));
        assert_eq!(Settings::default().validate(), Ok(()), "off");
        for (bad, field) in [
            (
                Settings {
                    bootstrap: vec!["nohost".into()],
                    ..on.clone()
                },
                "kafka.bootstrap",
            ),
            (
                Settings {
                    bootstrap: vec!["h:0".into()],
                    ..on.clone()
                },
                "kafka.bootstrap",
            ),
            (
                Settings {
                    rows_topic: "a b".into(),
                    ..on.clone()
                },
                "kafka.rows_topic",
            ),
            (
                Settings {
                    events_topic: String::new(),
                    ..on.clone()
                },
                "kafka.events_topic",
            ),
            (
                Settings {
                    rows_topic: on.events_topic.clone(),
                    ..on.clone()
                },
                "must differ",
            ),
            (
                Settings {
                    partitions: 0,
                    ..on.clone()
                },
                "kafka.partitions",
            ),
            (
                Settings {
                    sasl_mechanism: "GSSAPI".into(),
                    ..on.clone()
                },
                "kafka.sasl_mechanism",
            ),
            (
                Settings {
                    sasl_mechanism: "PLAIN".into(),
                    ..on.clone()
                },
                "kafka.sasl_username",
            ),
            (
                Settings {
                    ca_file: "/x.pem".into(),
                    ..on.clone()
                },
                "kafka.ca_file",
            ),
            (
                Settings {
                    timeout_ms: 0,
                    ..on.clone()
                },
                "kafka.timeout_ms",
            ),
            (
                Settings {
                    backlog_entries_max: 0,
                    ..on.clone()
                },
                "kafka.backlog_entries_max",
            ),
            (
                Settings {
                    request_bytes_max: 10,
                    ..on.clone()
                },
                "kafka.request_bytes_max",
            ),
        ] {
            let e = bad.validate().unwrap_err();
            assert!(e.contains(field), "{e}");
        }
        // Through the config file: unknown fields and wrong types named too.
        let e = toml::from_str::<crate::config::Config>("[kafka]\nbootstrap = \"h:1\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("bootstrap"), "{e}");
        let e = toml::from_str::<crate::config::Config>("[kafka]\nbrokers = [\"h:1\"]\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("brokers"), "{e}");
    }

    fn pending(sizes: &[usize]) -> Vec<Pending> {
        sizes
            .iter()
            .enumerate()
            .map(|(origin, &n)| Pending {
                partition: 0,
                key: format!("k{origin}"),
                value: "v".repeat(n),
                origin,
            })
            .collect()
    }

    /// A broker that refuses any request of more than `max` value bytes as
    /// too large, and fails the request holding origin `fail_at`; it
    /// records what it acknowledged, in order.
    fn fake(
        max: usize,
        fail_at: Option<usize>,
        acked: &std::cell::RefCell<Vec<usize>>,
    ) -> impl FnMut(&[Pending]) -> std::future::Ready<Sent> + '_ {
        move |g: &[Pending]| {
            let bytes: usize = g.iter().map(|r| r.value.len()).sum();
            std::future::ready(if g.iter().any(|r| Some(r.origin) == fail_at) {
                Sent::Failed("broker error: test".into())
            } else if bytes > max {
                Sent::TooLarge
            } else {
                acked.borrow_mut().extend(g.iter().map(|r| r.origin));
                Sent::Acked
            })
        }
    }

    #[test]
    fn a_request_refused_as_too_large_is_split_and_a_lone_record_is_counted() {
        use futures_util::FutureExt;
        let stats = KafkaStats::default();
        let acked = std::cell::RefCell::new(Vec::new());
        let groups = vec![pending(&[100, 100, 100, 300, 100, 100, 40])];
        let out = send_in_order(groups, fake(250, None, &acked), "t", &stats)
            .now_or_never()
            .expect("ready");
        // Every record but the one refused alone, each once, in order.
        assert_eq!(*acked.borrow(), vec![0, 1, 2, 4, 5, 6]);
        assert_eq!(out.acked, 6);
        assert!(out.failed.is_empty() && out.error.is_none());
        assert_eq!(stats.too_large.load(Relaxed), 1);
        let msg = stats.last_too_large.lock().unwrap().clone();
        assert!(msg.contains("k3") && msg.contains("300 bytes"), "{msg}");
    }

    #[test]
    fn a_failed_request_stops_its_partition_and_what_follows_stays_marked() {
        use futures_util::FutureExt;
        let stats = KafkaStats::default();
        let acked = std::cell::RefCell::new(Vec::new());
        let p = pending(&[10, 10, 10, 10]);
        let mut it = p.into_iter();
        let groups: Vec<Vec<Pending>> = vec![
            it.by_ref().take(1).collect(),
            it.by_ref().take(1).collect(),
            it.collect(),
        ];
        let out = send_in_order(groups, fake(1000, Some(1), &acked), "t", &stats)
            .now_or_never()
            .expect("ready");
        assert_eq!(*acked.borrow(), vec![0]);
        assert_eq!(
            out.failed.iter().copied().collect::<Vec<_>>(),
            vec![1, 2, 3]
        );
        assert_eq!(out.error.as_deref(), Some("broker error: test"));
    }

    #[test]
    fn a_failed_connection_is_named_by_its_stage() {
        // The texts rskafka gives for each, through its retry loop.
        for (text, want) in [
            (
                "all retries failed: Retry exceeded deadline. Source: Sasl handshake failed: API error: SaslAuthenticationFailed",
                "SASL authentication failed",
            ),
            (
                "all retries failed: Retry exceeded deadline. Source: IO Error: invalid peer certificate: UnknownIssuer",
                "TLS handshake failed",
            ),
            (
                "all retries failed: Retry exceeded deadline. Source: IO Error: Connection refused (os error 111)",
                "broker unreachable",
            ),
        ] {
            assert_eq!(connection_failure(text), want, "{text}");
        }
    }

    #[test]
    fn a_broker_error_is_named() {
        use rskafka::client::error::RequestContext;
        let server = |p| KafkaError::ServerError {
            protocol_error: p,
            error_message: None,
            request: RequestContext::Topic("clicks".into()),
            response: None,
            is_virtual: false,
        };
        for (p, want) in [
            (
                ProtocolError::UnknownTopicOrPartition,
                "unknown topic or partition",
            ),
            (
                ProtocolError::TopicAuthorizationFailed,
                "authorization failed",
            ),
            (
                ProtocolError::ClusterAuthorizationFailed,
                "authorization failed",
            ),
            (
                ProtocolError::SaslAuthenticationFailed,
                "SASL authentication failed",
            ),
            (ProtocolError::MessageTooLarge, "message too large"),
            (ProtocolError::RecordListTooLarge, "message too large"),
            (ProtocolError::NotLeaderOrFollower, "broker error"),
        ] {
            let e = server(p);
            let named = name_error(&e);
            assert!(named.starts_with(&format!("{want}: ")), "{named}");
            assert_eq!(too_large(&e), want == "message too large");
        }
    }
}
