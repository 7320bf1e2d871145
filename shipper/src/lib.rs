//! The shipper: tails every shard log in a gateway's data directory and sends
//! two streams per shard to the aggregator over one QUIC connection (mutual
//! TLS): partials (small batches, as soon as they are durable) and raw events
//! (large batches, for the audit trail). Each stream sends one batch at a time,
//! in seq order, and moves on only once the aggregator has committed it; the
//! aggregator's cursors are the truth, asked for at start and after any gap.
//!
//! What the shipper decides is in [`outbox`] and [`tail`], free of sockets;
//! this module wires them to quinn and the clock.

pub mod config;
pub mod outbox;
pub mod tail;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{anyhow, Context};
use rand::Rng;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::sync::Semaphore;
use wire::batch::{Ack, Batch, BatchKind, Status, ALPN};
use wire::layout;

use config::Config;
use outbox::{Next, Outbox, Policy};
use tail::Tail;

/// Longest answer the aggregator sends.
const ACK_MAX: usize = 4096;

/// Counters for /metrics.
#[derive(Default)]
pub struct Metrics {
    /// Per stream kind (0 partials, 1 events).
    pub batches: [[AtomicU64; 6]; 2],
    pub records: [AtomicU64; 2],
    pub bytes: [AtomicU64; 2],
    pub raw_bytes: [AtomicU64; 2],
    pub send_errors: AtomicU64,
    pub connects: AtomicU64,
    pub log_errors: AtomicU64,
    /// Per shard: durable seq, partials cursor, events cursor.
    pub shards: Mutex<BTreeMap<u16, [u64; 3]>>,
}

fn kind_index(k: BatchKind) -> usize {
    match k {
        BatchKind::Events => 1,
        _ => 0,
    }
}

impl Metrics {
    pub fn render(&self) -> String {
        use std::fmt::Write;
        let mut s = String::new();
        let kinds = ["partials", "events"];
        let statuses = ["applied", "duplicate", "gap", "refused", "cursors", "retry"];
        s.push_str(
            "# HELP clickgate_shipper_batches_total Batches sent, by stream and by the aggregator's answer.\n\
             # TYPE clickgate_shipper_batches_total counter\n",
        );
        for (k, kn) in kinds.iter().enumerate() {
            for (i, st) in statuses.iter().enumerate() {
                let v = self.batches[k][i].load(Ordering::Relaxed);
                let _ = writeln!(
                    s,
                    "clickgate_shipper_batches_total{{stream=\"{kn}\",status=\"{st}\"}} {v}"
                );
            }
        }
        for (name, help, arr) in [
            ("records", "Records shipped and applied", &self.records),
            ("bytes", "Bytes sent (compressed)", &self.bytes),
            (
                "raw_bytes",
                "Bytes of records before compression",
                &self.raw_bytes,
            ),
        ] {
            let _ = writeln!(
                s,
                "# HELP clickgate_shipper_{name}_total {help}, by stream.\n# TYPE clickgate_shipper_{name}_total counter"
            );
            for (k, kn) in kinds.iter().enumerate() {
                let _ = writeln!(
                    s,
                    "clickgate_shipper_{name}_total{{stream=\"{kn}\"}} {}",
                    arr[k].load(Ordering::Relaxed)
                );
            }
        }
        for (name, help, v) in [
            (
                "send_errors",
                "Batches whose sending failed (retried).",
                &self.send_errors,
            ),
            (
                "connects",
                "Connections made to aggregators.",
                &self.connects,
            ),
            (
                "log_errors",
                "Errors reading the gateway's log.",
                &self.log_errors,
            ),
        ] {
            let _ = writeln!(
                s,
                "# HELP clickgate_shipper_{name}_total {help}\n# TYPE clickgate_shipper_{name}_total counter\nclickgate_shipper_{name}_total {}",
                v.load(Ordering::Relaxed)
            );
        }
        s.push_str(
            "# HELP clickgate_shipper_lag_records Records durable in a shard's log and not yet applied by the aggregator.\n",
        );
        s.push_str("# TYPE clickgate_shipper_lag_records gauge\n");
        for (shard, [durable, p, e]) in self.shards.lock().unwrap().iter() {
            let _ = writeln!(
                s,
                "clickgate_shipper_lag_records{{shard=\"{shard}\",stream=\"partials\"}} {}\n\
                 clickgate_shipper_lag_records{{shard=\"{shard}\",stream=\"events\"}} {}",
                durable.saturating_sub(*p),
                durable.saturating_sub(*e)
            );
        }
        s
    }
}

/// Everything the stream tasks share.
pub struct Shipper {
    cfg: Config,
    endpoint: quinn::Endpoint,
    /// One per aggregator instance (one without a cluster).
    links: Vec<Link>,
    /// The instance ids, when advertisers are partitioned among several.
    instances: Option<Arc<Vec<String>>>,
    in_flight: Semaphore,
    pub metrics: Metrics,
    pub stopping: AtomicBool,
}

/// One aggregator instance and its connection.
struct Link {
    id: String,
    addr: std::net::SocketAddr,
    /// Joins at the other instances' cursors (see `config::Instance`).
    joining: bool,
    conn: tokio::sync::Mutex<Option<quinn::Connection>>,
}

fn load_certs(path: &Path) -> anyhow::Result<Vec<CertificateDer<'static>>> {
    CertificateDer::pem_file_iter(path)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .with_context(|| format!("reading certificates from {}", path.display()))
}

fn client_config(cfg: &Config) -> anyhow::Result<quinn::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    for c in load_certs(&cfg.ca_file)? {
        roots.add(c).context("adding the CA certificate")?;
    }
    let key = PrivateKeyDer::from_pem_file(&cfg.key_file)
        .with_context(|| format!("reading the key {}", cfg.key_file.display()))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(roots)
        .with_client_auth_cert(load_certs(&cfg.cert_file)?, key)
        .context("the client certificate and key do not match")?;
    tls.alpn_protocols = vec![ALPN.to_vec()];
    let quic = quinn::crypto::rustls::QuicClientConfig::try_from(tls)?;
    let mut c = quinn::ClientConfig::new(Arc::new(quic));
    let mut t = quinn::TransportConfig::default();
    // A restarted aggregator does not know the old connection and cannot
    // reset it: find out by silence within seconds, not the default 30 s.
    t.keep_alive_interval(Some(Duration::from_secs(1)));
    t.max_idle_timeout(Some(Duration::from_secs(5).try_into()?));
    c.transport_config(Arc::new(t));
    Ok(c)
}

impl Shipper {
    pub fn new(cfg: Config) -> anyhow::Result<Arc<Shipper>> {
        let mut endpoint = quinn::Endpoint::client("0.0.0.0:0".parse()?)?;
        endpoint.set_default_client_config(client_config(&cfg)?);
        let link = |id: &str, addr, joining| Link {
            id: id.to_owned(),
            addr,
            joining,
            conn: tokio::sync::Mutex::new(None),
        };
        let (links, instances) = if cfg.cluster.is_empty() {
            (vec![link("aggregator", cfg.aggregator, false)], None)
        } else {
            (
                cfg.cluster
                    .iter()
                    .map(|i| link(&i.id, i.quic, i.joining))
                    .collect(),
                Some(Arc::new(cfg.cluster.iter().map(|i| i.id.clone()).collect())),
            )
        };
        Ok(Arc::new(Shipper {
            in_flight: Semaphore::new(cfg.max_in_flight),
            cfg,
            endpoint,
            links,
            instances,
            metrics: Metrics::default(),
            stopping: AtomicBool::new(false),
        }))
    }

    /// How many aggregator instances this shipper ships to.
    pub fn links(&self) -> usize {
        self.links.len()
    }

    /// "id (address)" of one instance, for messages.
    pub fn link_name(&self, link: usize) -> String {
        let l = &self.links[link];
        format!("{} ({})", l.id, l.addr)
    }

    async fn connection(&self, link: usize) -> anyhow::Result<quinn::Connection> {
        let l = &self.links[link];
        let mut g = l.conn.lock().await;
        if let Some(c) = g.as_ref() {
            if c.close_reason().is_none() {
                return Ok(c.clone());
            }
        }
        let c = self
            .endpoint
            .connect(l.addr, &self.cfg.server_name)?
            .await
            .with_context(|| format!("connecting to aggregator {} at {}", l.id, l.addr))?;
        self.metrics.connects.fetch_add(1, Ordering::Relaxed);
        tracing::info!(aggregator = %l.addr, instance = %l.id, "connected");
        *g = Some(c.clone());
        Ok(c)
    }

    /// Sends one frame to one instance on its own stream and waits for the
    /// answer.
    async fn exchange(&self, link: usize, frame: &[u8]) -> anyhow::Result<Ack> {
        let _permit = self.in_flight.acquire().await?;
        let conn = self.connection(link).await?;
        let work = async {
            let (mut send, mut recv) = conn.open_bi().await?;
            send.write_all(frame).await?;
            send.finish()?;
            let answer = recv.read_to_end(ACK_MAX).await?;
            Ack::decode(&answer).map_err(|e| anyhow!("bad answer from the aggregator: {e}"))
        };
        match tokio::time::timeout(Duration::from_millis(self.cfg.ack_timeout_ms), work).await {
            Ok(r) => r,
            Err(_) => Err(anyhow!("no answer within {} ms", self.cfg.ack_timeout_ms)),
        }
    }

    /// Asks one aggregator instance for one shard's cursors (one exchange,
    /// no retry): checks certificates, the PoP's entry and reachability.
    pub async fn hello(&self, link: usize, gateway_id: &str, shard: u16) -> anyhow::Result<Ack> {
        self.exchange(link, &Batch::hello(gateway_id, shard).encode())
            .await
    }

    /// Sends until the aggregator answers anything but Retry/Refused or an
    /// error, backing off with full jitter in between.
    async fn send_until_answered(
        &self,
        link: usize,
        frame: &[u8],
        what: &str,
        ki: usize,
    ) -> Option<Ack> {
        let mut backoff = self.cfg.backoff_min_ms;
        loop {
            if self.stopping.load(Ordering::Relaxed) {
                return None;
            }
            match self.exchange(link, frame).await {
                Ok(a) if !matches!(a.status, Status::Retry | Status::Refused) => return Some(a),
                Ok(a) => {
                    tracing::warn!(batch = what, status = ?a.status, reason = %a.reason, "batch not accepted; will retry");
                    if a.status == Status::Refused {
                        self.metrics.batches[ki][Status::Refused as usize]
                            .fetch_add(1, Ordering::Relaxed);
                    }
                }
                Err(e) => {
                    self.metrics.send_errors.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(batch = what, error = %format!("{e:#}"), "send failed; will retry");
                }
            }
            let pause = rand::thread_rng().gen_range(0..=backoff);
            tokio::time::sleep(Duration::from_millis(pause)).await;
            backoff = (backoff * 2).min(self.cfg.backoff_max_ms);
        }
    }
}

/// A shard's cursors, kept on disk beside its log (for the operator and for
/// the shipped seq the gateway recycles by).
struct ShardState {
    dir: PathBuf,
    /// Per instance, per stream (partials, events): the cursor, once that
    /// instance gave one.
    cursors: Mutex<Vec<[Option<u64>; 2]>>,
    /// Per instance: its (partials, events) cursors as its first hello
    /// answered, where this shipper's routing took over: where a joining
    /// instance starts.
    initial: Mutex<Vec<Option<(u64, u64)>>>,
}

impl ShardState {
    fn new(dir: PathBuf, links: usize) -> ShardState {
        ShardState {
            dir,
            cursors: Mutex::new(vec![[None; 2]; links]),
            initial: Mutex::new(vec![None; links]),
        }
    }

    fn record_initial(&self, link: usize, ack: &Ack) {
        self.initial.lock().unwrap()[link].get_or_insert((ack.partials_cursor, ack.events_cursor));
    }

    /// Once every non-joining instance has answered its first hello: the
    /// lowest of their cursors, and whether they differed.
    fn join_point(&self, links: &[Link]) -> Option<((u64, u64), bool)> {
        let init = self.initial.lock().unwrap();
        let known: Vec<(u64, u64)> = links
            .iter()
            .zip(init.iter())
            .filter(|(l, _)| !l.joining)
            .map(|(_, c)| *c)
            .collect::<Option<_>>()?;
        let low = (
            known.iter().map(|c| c.0).min()?,
            known.iter().map(|c| c.1).min()?,
        );
        Some((low, known.iter().any(|c| *c != low)))
    }

    /// Records one instance's cursor; returns the lowest cursor of that
    /// stream over the instances (what is shipped everywhere).
    fn set(&self, link: usize, kind: BatchKind, cursor: u64) -> u64 {
        let mut c = self.cursors.lock().unwrap();
        let i = kind_index(kind);
        let low = |c: &Vec<[Option<u64>; 2]>, i: usize| {
            c.iter().map(|l| l[i].unwrap_or(0)).min().unwrap_or(0)
        };
        if c[link][i] == Some(cursor) {
            return low(&c, i);
        }
        c[link][i] = Some(cursor);
        let (p, e) = (low(&c, 0), low(&c, 1));
        if let Err(err) = layout::write_shipper_cursors(&self.dir, p, e) {
            tracing::warn!(error = %err, "cannot persist the shipper cursors");
        }
        // Only once every stream of every instance has heard from it: a
        // segment may go once every instance has what it holds.
        if c.iter().all(|l| l[0].is_some() && l[1].is_some()) {
            if let Err(err) = layout::write_shipped(&self.dir, p.min(e)) {
                tracing::warn!(error = %err, "cannot write the shipped seq");
            }
        }
        low(&c, i)
    }
}

/// The gateway id in a shard's oldest segment header, once there is one.
fn gateway_id_of(dir: &Path) -> Option<String> {
    let segs = layout::list_segments(dir).ok()?;
    let first = segs.first()?;
    let mut b = [0u8; wire::segz::HEADER_LEN];
    let mut f = std::fs::File::open(&first.path).ok()?;
    if first.compressed {
        std::io::Read::read_exact(&mut f, &mut b).ok()?;
        return wire::segz::SegzHeader::decode(&b)
            .ok()
            .map(|h| h.gateway_id);
    }
    std::io::Read::read_exact(&mut f, &mut b[..wire::segment::HEADER_LEN]).ok()?;
    wire::segment::SegmentHeader::decode(&b)
        .ok()
        .map(|h| h.gateway_id)
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

async fn run_stream(
    sh: Arc<Shipper>,
    state: Arc<ShardState>,
    shard: u16,
    kind: BatchKind,
    link: usize,
) {
    let dir = state.dir.clone();
    let poll = Duration::from_millis(sh.cfg.poll_ms);
    let ki = kind_index(kind);
    let gw = loop {
        if let Some(g) = gateway_id_of(&dir) {
            break g;
        }
        if sh.stopping.load(Ordering::Relaxed) {
            return;
        }
        tokio::time::sleep(poll).await;
    };
    let s = if kind == BatchKind::Partials {
        &sh.cfg.partials
    } else {
        &sh.cfg.events
    };
    let policy = Policy {
        max_items: s.max_items,
        max_bytes: s.max_bytes,
        max_age_ms: s.max_age_ms,
        zstd_level: sh.cfg.zstd_level,
    };
    // Where to start: the aggregator's cursor.
    let hello = Batch::hello(&gw, shard).encode();
    let Some(mut ack) = sh.send_until_answered(link, &hello, "hello", ki).await else {
        return;
    };
    state.record_initial(link, &ack);
    if sh.links[link].joining && (ack.partials_cursor, ack.events_cursor) == (0, 0) {
        // A new instance that has never heard of this shard: it counts
        // from where the other instances stood when this routing began.
        let ((p, e), differed) = loop {
            if let Some(j) = state.join_point(&sh.links) {
                break j;
            }
            if sh.stopping.load(Ordering::Relaxed) {
                return;
            }
            tokio::time::sleep(poll).await;
        };
        if differed {
            tracing::warn!(shard, instance = %sh.links[link].id, "the other instances' cursors differ; joining at the lowest: advertisers moving from an instance that was ahead may count the difference twice (stop shippers gracefully before growing)");
        }
        let join = Batch::join(&gw, shard, p, e).encode();
        let Some(a) = sh.send_until_answered(link, &join, "join", ki).await else {
            return;
        };
        tracing::info!(shard, instance = %sh.links[link].id, partials = a.partials_cursor, events = a.events_cursor, "joined the cluster");
        ack = a;
    }
    let route = sh.instances.as_ref().map(|ids| outbox::Route {
        me: link,
        instances: ids.clone(),
    });
    let mut outbox = Outbox::new(kind, &gw, shard, policy, 0).with_route(route);
    let mut after = match outbox.on_ack(0, &ack) {
        Next::Resend { after } => after,
        _ => outbox.acked,
    };
    state.set(link, kind, after);
    let instance = sh.links[link].id.as_str();
    tracing::info!(shard, stream = ?kind, instance, cursor = after, "starting from the aggregator's cursor");
    let mut tail: Option<Tail> = None;
    while !sh.stopping.load(Ordering::Relaxed) {
        let t = match tail.as_mut() {
            Some(t) => t,
            None => match Tail::open_after(&dir, after) {
                Ok(t) => tail.insert(t),
                Err(e) => {
                    sh.metrics.log_errors.fetch_add(1, Ordering::Relaxed);
                    tracing::error!(shard, stream = ?kind, error = %e, "cannot read the log");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    continue;
                }
            },
        };
        let durable = match layout::read_durable(&dir) {
            Ok(d) => d,
            Err(e) => {
                tracing::warn!(shard, error = %e, "cannot read the durable seq");
                0
            }
        };
        if let Some(m) = sh.metrics.shards.lock().unwrap().get_mut(&shard) {
            m[0] = durable;
        }
        let now = now_ms();
        let mut bad = None;
        while !outbox.full() && bad.is_none() {
            let room = 4096;
            let n = t.read(durable, room, |seq, ty, b| {
                if bad.is_none() {
                    if let Err(e) = outbox.offer(seq, ty, b, now) {
                        bad = Some(e);
                    }
                }
            });
            match n {
                Ok(0) => break,
                Ok(_) => {}
                Err(e) => {
                    bad = Some(e.to_string());
                }
            }
        }
        if let Some(e) = bad {
            sh.metrics.log_errors.fetch_add(1, Ordering::Relaxed);
            tracing::error!(shard, stream = ?kind, error = %e, "log read failed; re-reading from the cursor");
            outbox.reset(outbox.acked);
            after = outbox.acked;
            tail = None;
            tokio::time::sleep(Duration::from_secs(1)).await;
            continue;
        }
        if t.next_seq() > durable {
            outbox.touch_idle(now);
        }
        if !outbox.ready(now) {
            tokio::time::sleep(poll).await;
            continue;
        }
        let batch = match outbox.seal() {
            Ok(b) => b,
            Err(e) => {
                tracing::error!(error = %e, "compressing a batch failed");
                outbox.reset(outbox.acked);
                after = outbox.acked;
                tail = None;
                continue;
            }
        };
        let frame = batch.encode();
        let what = format!(
            "{kind:?} shard {shard} ({}, {}] to {instance}",
            batch.after_seq, batch.last_seq
        );
        let Some(ack) = sh.send_until_answered(link, &frame, &what, ki).await else {
            break;
        };
        daemon::faults::crash_point("shipper_answered_before_cursor");
        sh.metrics.batches[ki][ack.status as usize].fetch_add(1, Ordering::Relaxed);
        if ack.status == Status::Applied {
            sh.metrics.records[ki].fetch_add(batch.count as u64, Ordering::Relaxed);
            sh.metrics.bytes[ki].fetch_add(frame.len() as u64, Ordering::Relaxed);
            sh.metrics.raw_bytes[ki].fetch_add(batch.raw_len as u64, Ordering::Relaxed);
        }
        match outbox.on_ack(batch.last_seq, &ack) {
            Next::Continue => {}
            Next::Resend { after: a } => {
                tracing::info!(shard, stream = ?kind, status = ?ack.status, cursor = a, "resending from the aggregator's cursor");
                after = a;
                tail = None;
            }
            Next::Retry { .. } => unreachable!("send_until_answered returns only final answers"),
        }
        let shipped = state.set(link, kind, outbox.acked);
        if let Some(m) = sh.metrics.shards.lock().unwrap().get_mut(&shard) {
            m[1 + ki] = shipped;
        }
    }
}

/// Runs until `stopping` is set: finds shard directories as the gateway
/// creates them and ships each.
pub async fn run(sh: Arc<Shipper>) -> anyhow::Result<()> {
    let mut started = std::collections::BTreeSet::new();
    let mut tasks = Vec::new();
    while !sh.stopping.load(Ordering::Relaxed) {
        match layout::list_shards(&sh.cfg.data_dir) {
            Ok(shards) => {
                for shard in shards {
                    if !started.insert(shard) {
                        continue;
                    }
                    tracing::info!(shard, "shipping shard");
                    sh.metrics.shards.lock().unwrap().insert(shard, [0; 3]);
                    let state = Arc::new(ShardState::new(
                        layout::shard_dir(&sh.cfg.data_dir, shard),
                        sh.links.len(),
                    ));
                    for link in 0..sh.links.len() {
                        for kind in [BatchKind::Partials, BatchKind::Events] {
                            tasks.push(tokio::spawn(run_stream(
                                sh.clone(),
                                state.clone(),
                                shard,
                                kind,
                                link,
                            )));
                        }
                    }
                }
            }
            Err(e) => {
                tracing::warn!(dir = %sh.cfg.data_dir.display(), error = %e, "cannot list shards")
            }
        }
        // A stream ends only when stopping: one that ended before has
        // panicked, and its shard would silently stop shipping. Exit
        // instead, named, so the supervisor restarts the shipper (which
        // resumes from the aggregator's cursors).
        if let Some(i) = tasks.iter().position(|t| t.is_finished()) {
            let t = tasks.swap_remove(i);
            sh.stopping.store(true, Ordering::Relaxed);
            return Err(match t.await {
                Err(e) if e.is_panic() => {
                    anyhow::anyhow!(
                        "a shipping stream panicked: {}",
                        panic_message(e.into_panic())
                    )
                }
                _ => anyhow::anyhow!("a shipping stream ended before the shipper was stopped"),
            });
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    for t in tasks {
        if let Err(e) = t.await {
            if e.is_panic() {
                anyhow::bail!(
                    "a shipping stream panicked: {}",
                    panic_message(e.into_panic())
                );
            }
        }
    }
    for l in &sh.links {
        if let Some(c) = l.conn.lock().await.take() {
            c.close(0u32.into(), b"shipper stopping");
        }
    }
    sh.endpoint.wait_idle().await;
    Ok(())
}

fn panic_message(p: Box<dyn std::any::Any + Send>) -> String {
    match p.downcast::<String>() {
        Ok(s) => *s,
        Err(p) => p
            .downcast::<&'static str>()
            .map_or_else(|_| "(no message)".to_string(), |s| s.to_string()),
    }
}
