//! The gateway's configuration: one TOML file, every field documented with its
//! default and unit, unknown fields refused. [`Config::load`] validates into
//! the typed values the shards use; its errors name the file and the field.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use gateway_core::token::Policy;
use serde::Deserialize;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Names this gateway in segment headers and to the aggregator (1 to 24
    /// bytes of [A-Za-z0-9_.-]). Default "dev".
    pub gateway_id: String,
    /// Where shard logs live. Default "./data".
    pub data_dir: PathBuf,
    /// The keys file (kid -> secret). Default "./keys.toml".
    pub keys_file: PathBuf,
    /// CPUs to run one shard on each: "auto" (every CPU the process may use)
    /// or a list such as [1, 2]. Default "auto".
    pub cpus: Cpus,
    /// How the process writes its log to stderr: "text" (colour only on a
    /// terminal) or "json" (one object per line, for log shippers).
    /// Default "text".
    pub log_format: daemon::logging::LogFormat,
    pub listen: Listen,
    pub durability: Durability,
    pub log: Log,
    pub aggregate: Aggregate,
    pub tokens: Tokens,
    pub dedup: Dedup,
    pub traffic: Traffic,
    pub limits: Limits,
    pub drain: Drain,
    pub tls: Tls,
}

#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(untagged)]
pub enum Cpus {
    Auto(AutoWord),
    List(Vec<usize>),
}

#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum AutoWord {
    Auto,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Listen {
    /// Plain HTTP/1.1 address, every shard binds it with SO_REUSEPORT.
    /// Default "127.0.0.1:8080".
    pub http: SocketAddr,
    /// listen(2) backlog per shard. Default 4096.
    pub backlog: u32,
    /// HTTPS (TLS 1.3 and 1.2, HTTP/1.1) address, every shard binds it with
    /// SO_REUSEPORT; needs `[tls]`. Unset: no HTTPS. Default unset.
    pub https: Option<SocketAddr>,
    /// HTTP/3 (QUIC) UDP address; needs `[tls]`. Unset: no HTTP/3 and no
    /// Alt-Svc header. Default unset.
    pub http3: Option<SocketAddr>,
    /// Every connection on the plain HTTP listener starts with a PROXY
    /// protocol header (v1 or v2) from the load balancer; one without is
    /// closed. Default false.
    pub http_proxy_protocol: bool,
    /// The same for the HTTPS listener (the header comes before TLS).
    /// Default false.
    pub https_proxy_protocol: bool,
    /// Longest PROXY header accepted, bytes (v2 may carry TLVs). Default 536.
    pub proxy_header_bytes_max: usize,
    /// Peers (addresses or CIDRs) whose X-Forwarded-For names the client:
    /// the right-most address in it that is not itself listed. Default none.
    pub trusted_proxies: Vec<String>,
    /// Alt-Svc max-age advertised for HTTP/3, seconds. Default 86400.
    pub alt_svc_max_age_s: u32,
    /// HTTP/3 requests in 0-RTT early data from resuming clients (a click
    /// a round trip sooner). Safe: a replayed click is a duplicate of its
    /// click id, and a batch in early data is answered 425. Default true.
    pub http3_zero_rtt: bool,
    /// UDP generic receive offload on the HTTP/3 socket: the kernel hands
    /// over up to 64 KiB of one flow's datagrams per receive. Default true
    /// (off where the kernel lacks it).
    pub http3_gro: bool,
    /// UDP segmentation offload: a connection's datagrams leave in one
    /// send. Default true (off where the kernel lacks it).
    pub http3_gso: bool,
    /// Steer each HTTP/3 datagram to the shard that owns its connection in
    /// the kernel, with a BPF program on the shards' SO_REUSEPORT group, so
    /// that a migrated connection's datagrams are not handed between shards.
    /// Off, or where the kernel refuses the program: the receiving shard
    /// hands them over its queue. Default true.
    pub http3_bpf_steering: bool,
}

#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct Tls {
    /// PEM certificate chain, leaf first. Re-read on SIGHUP; connections
    /// open at the time keep theirs. Default "./certs/gateway.pem".
    pub cert_file: PathBuf,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1). Default "./certs/gateway.key".
    pub key_file: PathBuf,
    /// Oldest TLS version offered: "1.2" or "1.3". Default "1.2".
    pub min_version: String,
    /// Stateless session tickets (TLS 1.3 and 1.2), one ticket key shared by
    /// the shards and rotated every 6 hours, so a resumed connection may land
    /// on any shard. Default true.
    pub session_tickets: bool,
    /// TLS 1.2 session-id cache entries, shared by the shards. 0 disables.
    /// Default 4096.
    pub session_cache_entries: usize,
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct Durability {
    /// "sync" (default): answer after one fdatasync of the turn's appends
    /// (survives power loss). "process": answer once in the page cache
    /// (survives kill -9 of any process, not power loss).
    pub mode: DurabilityMode,
    /// Durable writes a shard keeps in flight at once in `sync` mode
    /// (pipelined group commit). With 1, writes land in order, so a crash
    /// leaves at most a torn tail. With more, a crash may leave a write that
    /// never landed before one that did: recovery cuts a span of zeros, but a
    /// partly landed write before a landed one is reported as corruption.
    /// Default 1.
    pub syncs_in_flight_max: usize,
    /// `sync` mode: the least time between the starts of two durable
    /// writes, microseconds, unless `commit_batch_bytes` are waiting. Under
    /// a steady load this trades a little latency for fewer, larger
    /// fdatasyncs (each costs CPU whatever its size); a lone click is never
    /// held (the wait counts from the previous write's start). 0: start the
    /// next write as soon as the previous one completes. Default 0.
    pub commit_interval_us: u64,
    /// Bytes waiting that start a durable write at once, whatever
    /// `commit_interval_us` says. Default 65536.
    pub commit_batch_bytes: usize,
    /// `sync` mode: the nice value (-20 to 19) of the kernel's io_uring
    /// worker threads that run a shard's durable writes, set once a second.
    /// They share the shard's core; ahead of it, a flush completes sooner
    /// and the answers waiting on it go out sooner (measured: 8-11% more
    /// clicks/s at the closed-loop maximum on one core, the same CPU per
    /// click, docs/BENCHMARKS.md). A negative value needs CAP_SYS_NICE or
    /// `LimitNICE=` in the unit (30 allows -10); without it the gateway
    /// warns once and the workers keep the shard's priority. 0 leaves them
    /// alone. Default -10.
    pub writer_nice: i32,
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum DurabilityMode {
    #[default]
    Sync,
    Process,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Log {
    /// Size of each preallocated segment file, bytes (multiple of 4096, at
    /// least 64 KiB). Default 64 MiB.
    pub segment_bytes: u64,
    /// Most bytes of segments one shard keeps on disk, shipped or not. When
    /// full, new events get 503 with Retry-After. Default 8 GiB.
    pub disk_budget_bytes: u64,
    /// A shipped segment is kept at least this long after it was sealed,
    /// seconds. Default 3600.
    pub retention_s: u64,
    /// Also write zeros over each new segment in the background (like
    /// PostgreSQL's wal_init_zero), so appends never convert unwritten
    /// extents. Costs one extra write of every segment; measured on ext4 here
    /// it cut p99 at 40k clicks/s from 15-25 ms to 2-4 ms. Default true.
    pub zero_fill: bool,
    /// Compress each sealed segment with zstd into a `.segz` (synced before
    /// the original is removed), so the budget holds about eight times as
    /// many clicks while the central tier is away. Default true.
    pub compress: bool,
    /// zstd level for sealed segments, 1 to 19. Default 1 (measured at
    /// 25 000 clicks/s on loadgen's clicks: 8.6x for under 4% of the
    /// shard's core; level 3: 8.7x for 5-6%; docs/BENCHMARKS.md).
    pub compress_level: i32,
    /// Frames per compressed chunk, at least this many bytes; a reader
    /// decompresses one chunk at a time. 64 KiB to `segment_bytes`.
    /// Default 1 MiB, or `segment_bytes` if smaller.
    pub compress_chunk_bytes: Option<u64>,
    /// Bytes at the end of the active segment that events may not take while
    /// no next segment fits the budget, so partials (heartbeats carrying the
    /// watermark, and the counts of unrecorded redirects) still can. Less
    /// than a quarter of `segment_bytes`. Default 1 MiB, or a sixteenth of
    /// `segment_bytes` if smaller.
    pub partial_reserve_bytes: Option<u64>,
    /// `/readyz` answers 503 once unshipped data takes this share of the
    /// budget (any shard), so anycast or DNS sends new traffic to PoPs with
    /// room; what still arrives is served. Default 0.9.
    pub unready_at_budget_share: f64,
    /// ... and 200 again once every shard is below this share (hysteresis).
    /// Default 0.8.
    pub ready_below_budget_share: f64,
    /// What a click or impression gets when the log has no room (budget or
    /// file system full): "refuse", 503 with Retry-After; or "redirect", the
    /// 302 (an impression's 204) without a record, counted in
    /// `clickgate_unrecorded_redirects_total` and, per minute, in the
    /// partials the aggregator reports as unrecorded; never billed. Batched
    /// events get 503 either way. Default "refuse".
    pub on_full: gateway_core::app::OnFull,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Aggregate {
    /// How often a shard appends a partial (or heartbeat), ms. Default 1000.
    pub flush_interval_ms: u64,
    /// Most distinct rows a shard sums between partials; reaching it appends
    /// a partial early. Default 100000.
    pub rows_max: usize,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Tokens {
    /// Oldest signed timestamp a browser click or impression may carry,
    /// seconds. Default 86400.
    pub max_age_s: u64,
    /// Oldest signed timestamp a batched event may carry, seconds.
    /// Default 604800 (7 days).
    pub batch_max_age_s: u64,
    /// How far ahead of the gateway's clock a timestamp may be, seconds.
    /// Default 300.
    pub future_skew_s: u64,
    /// How long a key removed from the keys file (or given `retired_at`)
    /// keeps verifying, seconds. Default 86400.
    pub key_grace_s: u64,
    /// How often the keys file is checked for changes, ms (SIGHUP reloads at
    /// once). Default 1000.
    pub keys_poll_ms: u64,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Dedup {
    /// A click id counts once within this window, seconds (rounded up to
    /// whole minutes). Default 900.
    pub horizon_s: u64,
    /// Live entries the host-wide table holds (memory: 32 bytes each).
    /// Reaching it evicts the oldest in a probe window, counted. Default 4194304.
    pub entries_max: usize,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Traffic {
    /// Requests per second one client address may make to one shard; above
    /// it 429 with Retry-After. 0 disables. Default 0.
    pub rate_per_s: u32,
    /// Burst of the per-address token bucket. Default 100.
    pub rate_burst: u32,
    /// Addresses the rate limiter tracks per shard. Default 100000.
    pub rate_entries_max: usize,
    /// Clicks per minute from one address on one ad, counted for the whole
    /// host (every shard), above which clicks are flagged invalid
    /// (redirected, logged, not billed). At most 65534. 0 disables.
    /// Default 30.
    pub velocity_per_minute_max: u32,
    /// (address, ad) pairs the host tracks per minute. Memory, for the host,
    /// allocated at start: two 8-byte slots per pair, rounded up to a power
    /// of two (16 MiB at the default). Beyond it, new pairs pass untracked
    /// and are counted. Default 1048576.
    pub velocity_entries_max: usize,
    /// A trusted header carrying the client's ISO country code, set by the
    /// PoP's edge (for example "cf-ipcountry"). Empty: every click is "ZZ".
    /// Default "x-country".
    pub country_header: String,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Open connections per shard; more are accepted and closed at once,
    /// counted. Default 10000.
    pub connections_max: usize,
    /// Request line plus headers, bytes; over it 431. Default 8192.
    pub header_bytes_max: usize,
    /// Header lines per request; over it 431. Default 64 (at most 128).
    pub headers_max: usize,
    /// Request body, bytes; over it 413. Default 1 MiB.
    pub body_bytes_max: usize,
    /// Items in one POST /api/v1/events batch; over it 413. Default 1000.
    pub batch_items_max: usize,
    /// Longest id field value, bytes. Default 64.
    pub id_bytes_max: usize,
    /// Longest redirect_url, bytes. Default 2048.
    pub url_bytes_max: usize,
    /// Largest cost_per_click, micros. Default 1000000000 (1000 units).
    pub cost_micros_max: u64,
    /// A request must arrive whole within this long of its first byte, ms;
    /// else the connection is closed. Default 10000.
    pub header_timeout_ms: u64,
    /// A connection whose request has been arriving for longer than this is
    /// read once a second (at the timeout sweep, only what is already there)
    /// instead of at every byte, ms: a trickle (slowloris) then costs the
    /// shard one read a second instead of a wakeup per byte. 0 turns it off.
    /// Default 1000.
    pub slow_read_after_ms: u64,
    /// A keep-alive connection with nothing in flight is closed after this, ms.
    /// Default 60000.
    pub idle_timeout_ms: u64,
    /// Responses queued on one connection (pipelining) before it stops being
    /// read, bytes. Default 262144.
    pub pending_output_bytes_max: usize,
    /// Concurrent request streams one HTTP/3 connection may open. Default 100.
    pub h3_streams_per_connection_max: u32,
    /// Open HTTP/3 connections per shard; a new one past it is refused
    /// (CONNECTION_REFUSED) and counted. Default 10000.
    pub h3_connections_max: usize,
    /// Datagrams of one shard's connections that reached another shard's
    /// socket (after a client's address changed), queued to their shard;
    /// past it they are dropped (and counted; QUIC resends). Default 4096.
    pub h3_stray_queue_max: usize,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Drain {
    /// On SIGTERM, how long in-flight requests may take before the process
    /// exits anyway, ms. Default 10000.
    pub timeout_ms: u64,
    /// With `run --takeover` (rolling restart), how long the new process
    /// waits for the old one to drain and release the data directory, ms.
    /// Default 60000.
    pub takeover_wait_ms: u64,
    /// On SIGTERM, how long to keep serving with `/readyz` at 503 before
    /// draining, ms, so that a health-checked anycast speaker withdraws the
    /// route (or a balancer or DNS takes the host out) while connections are
    /// still accepted. Behind anycast: more than the check's fall times its
    /// interval plus the routers' convergence. A second SIGTERM drains at
    /// once. Default 0 (drain at once, as behind SO_REUSEPORT takeover).
    pub withdraw_ms: u64,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            gateway_id: "dev".into(),
            data_dir: "./data".into(),
            keys_file: "./keys.toml".into(),
            cpus: Cpus::Auto(AutoWord::Auto),
            log_format: Default::default(),
            listen: Listen::default(),
            durability: Durability::default(),
            log: Log::default(),
            aggregate: Aggregate::default(),
            tokens: Tokens::default(),
            dedup: Dedup::default(),
            traffic: Traffic::default(),
            limits: Limits::default(),
            drain: Drain::default(),
            tls: Tls::default(),
        }
    }
}

impl Default for Listen {
    fn default() -> Self {
        Self {
            http: "127.0.0.1:8080".parse().unwrap(),
            backlog: 4096,
            https: None,
            http3: None,
            http_proxy_protocol: false,
            https_proxy_protocol: false,
            proxy_header_bytes_max: 536,
            trusted_proxies: Vec::new(),
            alt_svc_max_age_s: 86_400,
            http3_zero_rtt: true,
            http3_gro: true,
            http3_gso: true,
            http3_bpf_steering: true,
        }
    }
}

impl Default for Tls {
    fn default() -> Self {
        Self {
            cert_file: "./certs/gateway.pem".into(),
            key_file: "./certs/gateway.key".into(),
            min_version: "1.2".into(),
            session_tickets: true,
            session_cache_entries: 4096,
        }
    }
}

impl Default for Durability {
    fn default() -> Self {
        Self {
            mode: DurabilityMode::Sync,
            syncs_in_flight_max: 1,
            commit_interval_us: 0,
            commit_batch_bytes: 64 * 1024,
            writer_nice: -10,
        }
    }
}

impl Default for Log {
    fn default() -> Self {
        Self {
            segment_bytes: 64 << 20,
            disk_budget_bytes: 8 << 30,
            retention_s: 3600,
            zero_fill: true,
            compress: true,
            compress_level: 1,
            compress_chunk_bytes: None,
            partial_reserve_bytes: None,
            unready_at_budget_share: 0.9,
            ready_below_budget_share: 0.8,
            on_full: gateway_core::app::OnFull::Refuse,
        }
    }
}

impl Log {
    /// `compress_chunk_bytes`, or its default for this segment size.
    pub fn chunk_bytes(&self) -> u64 {
        self.compress_chunk_bytes
            .unwrap_or((1 << 20).min(self.segment_bytes))
    }

    /// `partial_reserve_bytes`, or its default for this segment size.
    pub fn reserve_bytes(&self) -> u64 {
        self.partial_reserve_bytes
            .unwrap_or((1 << 20).min(self.segment_bytes / 16))
    }
}

impl Default for Aggregate {
    fn default() -> Self {
        Self {
            flush_interval_ms: 1000,
            rows_max: 100_000,
        }
    }
}

impl Default for Tokens {
    fn default() -> Self {
        Self {
            max_age_s: 86_400,
            batch_max_age_s: 7 * 86_400,
            future_skew_s: 300,
            key_grace_s: 86_400,
            keys_poll_ms: 1000,
        }
    }
}

impl Default for Dedup {
    fn default() -> Self {
        Self {
            horizon_s: 900,
            entries_max: 4 << 20,
        }
    }
}

impl Default for Traffic {
    fn default() -> Self {
        Self {
            rate_per_s: 0,
            rate_burst: 100,
            rate_entries_max: 100_000,
            velocity_per_minute_max: 30,
            velocity_entries_max: 1 << 20,
            country_header: "x-country".into(),
        }
    }
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            connections_max: 10_000,
            header_bytes_max: 8192,
            headers_max: 64,
            body_bytes_max: 1 << 20,
            batch_items_max: 1000,
            id_bytes_max: 64,
            url_bytes_max: 2048,
            cost_micros_max: 1_000_000_000,
            header_timeout_ms: 10_000,
            slow_read_after_ms: 1000,
            idle_timeout_ms: 60_000,
            pending_output_bytes_max: 256 * 1024,
            h3_streams_per_connection_max: 100,
            h3_connections_max: 10_000,
            h3_stray_queue_max: 4096,
        }
    }
}

impl Default for Drain {
    fn default() -> Self {
        Self {
            timeout_ms: 10_000,
            takeover_wait_ms: 60_000,
            withdraw_ms: 0,
        }
    }
}

#[derive(Debug, thiserror::Error)]
#[error("{file}: {msg}")]
pub struct ConfigError {
    pub file: String,
    pub msg: String,
}

impl Config {
    /// Reads and validates a config file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let err = |msg: String| ConfigError {
            file: path.display().to_string(),
            msg,
        };
        let text = std::fs::read_to_string(path).map_err(|e| err(e.to_string()))?;
        let cfg: Config = toml::from_str(&text).map_err(|e| err(e.to_string()))?;
        cfg.validate().map_err(err)?;
        Ok(cfg)
    }

    /// Checks relations a type can not express. The message names the field.
    pub fn validate(&self) -> Result<(), String> {
        let id_ok = !self.gateway_id.is_empty()
            && self.gateway_id.len() <= wire::segment::GATEWAY_ID_MAX
            && self
                .gateway_id
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b));
        if !id_ok {
            return Err("gateway_id: 1 to 24 characters of [A-Za-z0-9_.-]".into());
        }
        if let Cpus::List(l) = &self.cpus {
            if l.is_empty() || l.len() > 256 {
                return Err("cpus: give \"auto\" or a list of 1 to 256 CPU numbers".into());
            }
        }
        let seg = self.log.segment_bytes;
        if seg < 64 * 1024 || !seg.is_multiple_of(4096) || seg > 1 << 32 {
            return Err("log.segment_bytes: a multiple of 4096 from 65536 to 4294967296".into());
        }
        if self.log.disk_budget_bytes < 2 * seg {
            return Err(format!(
                "log.disk_budget_bytes: {} holds fewer than two segments of log.segment_bytes {seg} (the active one and the next)",
                self.log.disk_budget_bytes
            ));
        }
        if !(1..=19).contains(&self.log.compress_level) {
            return Err("log.compress_level: 1 to 19".into());
        }
        if !(64 * 1024..=seg).contains(&self.log.chunk_bytes()) {
            return Err("log.compress_chunk_bytes: 65536 to log.segment_bytes".into());
        }
        if self.log.reserve_bytes() >= seg / 4 {
            return Err(
                "log.partial_reserve_bytes: less than a quarter of log.segment_bytes".into(),
            );
        }
        let (hi, lo) = (
            self.log.unready_at_budget_share,
            self.log.ready_below_budget_share,
        );
        if !(hi > 0.0 && hi <= 1.0 && lo > 0.0 && lo < hi) {
            return Err("log.unready_at_budget_share and ready_below_budget_share: 0 < ready_below < unready_at <= 1".into());
        }
        if self.drain.withdraw_ms > 600_000 {
            return Err("drain.withdraw_ms: 0 to 600000".into());
        }
        if self.aggregate.flush_interval_ms == 0 || self.aggregate.flush_interval_ms > 60_000 {
            return Err("aggregate.flush_interval_ms: 1 to 60000".into());
        }
        if self.aggregate.rows_max == 0 {
            return Err("aggregate.rows_max: at least 1".into());
        }
        if !(1..=16).contains(&self.durability.syncs_in_flight_max) {
            return Err("durability.syncs_in_flight_max: 1 to 16".into());
        }
        let l = &self.limits;
        if l.headers_max == 0 || l.headers_max > gateway_core::http::HEADERS_HARD_MAX {
            return Err(format!(
                "limits.headers_max: 1 to {}",
                gateway_core::http::HEADERS_HARD_MAX
            ));
        }
        if l.header_bytes_max < 256 {
            return Err("limits.header_bytes_max: at least 256".into());
        }
        if l.connections_max == 0 || l.connections_max > 1 << 20 {
            return Err("limits.connections_max: 1 to 1048576".into());
        }
        if l.id_bytes_max == 0 || l.id_bytes_max > wire::record::ID_MAX {
            return Err(format!(
                "limits.id_bytes_max: 1 to {}",
                wire::record::ID_MAX
            ));
        }
        // A record must fit a segment with room to spare.
        if (l.url_bytes_max + 8 * l.id_bytes_max + 256) as u64 * 4 > seg {
            return Err("limits.url_bytes_max: too large for log.segment_bytes".into());
        }
        if l.batch_items_max == 0 {
            return Err("limits.batch_items_max: at least 1".into());
        }
        if self.dedup.entries_max == 0 || self.dedup.entries_max > 1 << 30 {
            return Err("dedup.entries_max: 1 to 1073741824".into());
        }
        if !(-20..=19).contains(&self.durability.writer_nice) {
            return Err("durability.writer_nice: -20 to 19".into());
        }
        let v = self.traffic.velocity_entries_max;
        if self.traffic.velocity_per_minute_max > gateway_core::limiter::VELOCITY_MAX {
            return Err(format!(
                "traffic.velocity_per_minute_max: at most {}",
                gateway_core::limiter::VELOCITY_MAX
            ));
        }
        if self.traffic.velocity_per_minute_max > 0 && !(1..=1 << 26).contains(&v) {
            return Err("traffic.velocity_entries_max: 1 to 67108864".into());
        }
        if self.dedup.horizon_s == 0 {
            return Err("dedup.horizon_s: at least 1".into());
        }
        crate::edge::TrustedProxies::parse(&self.listen.trusted_proxies)
            .map_err(|e| format!("listen.trusted_proxies: {e}"))?;
        if !(16..=65_551).contains(&self.listen.proxy_header_bytes_max) {
            return Err("listen.proxy_header_bytes_max: 16 to 65551".into());
        }
        if self.listen.https_proxy_protocol && self.listen.https.is_none() {
            return Err("listen.https_proxy_protocol: needs listen.https".into());
        }
        if l.h3_streams_per_connection_max == 0
            || l.h3_connections_max == 0
            || l.h3_stray_queue_max == 0
        {
            return Err(
                "limits.h3_streams_per_connection_max, h3_connections_max and h3_stray_queue_max: at least 1".into(),
            );
        }
        if !["1.2", "1.3"].contains(&self.tls.min_version.as_str()) {
            return Err("tls.min_version: \"1.2\" or \"1.3\"".into());
        }
        Ok(())
    }

    /// What a shard's request handler reads of this config.
    pub fn core_settings(&self) -> gateway_core::app::Settings {
        let click = Policy {
            max_age_ms: self.tokens.max_age_s as i64 * 1000,
            future_skew_ms: self.tokens.future_skew_s as i64 * 1000,
            id_bytes_max: self.limits.id_bytes_max,
            url_bytes_max: self.limits.url_bytes_max,
            cost_micros_max: self.limits.cost_micros_max,
            need_redirect: true,
        };
        let impression = Policy {
            need_redirect: false,
            ..click
        };
        let batch_age = self.tokens.batch_max_age_s as i64 * 1000;
        gateway_core::app::Settings {
            click_policy: click,
            impression_policy: impression,
            batch_click_policy: Policy {
                max_age_ms: batch_age,
                ..click
            },
            batch_impression_policy: Policy {
                max_age_ms: batch_age,
                ..impression
            },
            batch_items_max: self.limits.batch_items_max,
            flush_interval_ms: self.aggregate.flush_interval_ms as i64,
            rate_per_s: self.traffic.rate_per_s,
            rate_burst: self.traffic.rate_burst,
            rate_entries_max: self.traffic.rate_entries_max,
            scratch_bytes: self.limits.header_bytes_max.max(self.limits.body_bytes_max),
            on_full: self.log.on_full,
            unready_at_budget_share: self.log.unready_at_budget_share,
            ready_below_budget_share: self.log.ready_below_budget_share,
        }
    }

    /// The CPUs to run shards on.
    pub fn shard_cpus(&self) -> Vec<usize> {
        match &self.cpus {
            Cpus::Auto(_) => crate::sys::allowed_cpus(),
            Cpus::List(l) => l.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Result<Config, String> {
        let c: Config = toml::from_str(s).map_err(|e| e.to_string())?;
        c.validate()?;
        Ok(c)
    }

    #[test]
    fn writer_nice_is_a_nice_value() {
        for bad in ["-21", "20"] {
            let e = parse(&format!("[durability]\nwriter_nice = {bad}\n")).unwrap_err();
            assert!(e.contains("durability.writer_nice"), "{e}");
        }
        assert_eq!(parse("").unwrap().durability.writer_nice, -10);
    }

    #[test]
    fn velocity_table_size_is_bounded() {
        let e = parse("[traffic]\nvelocity_entries_max = 0\n").unwrap_err();
        assert!(e.contains("traffic.velocity_entries_max"), "{e}");
        assert!(parse("[traffic]\nvelocity_entries_max = 100000000\n").is_err());
        // Off needs no table.
        parse("[traffic]\nvelocity_per_minute_max = 0\nvelocity_entries_max = 0\n").unwrap();
    }

    #[test]
    fn the_default_click_policy_is_the_default_configs() {
        let s = Config::default().core_settings();
        assert_eq!(
            format!("{:?}", s.click_policy),
            format!("{:?}", Policy::DEFAULT_CLICK)
        );
    }

    #[test]
    fn the_example_config_in_deploy_is_valid_and_lists_every_default() {
        let text = include_str!("../../deploy/gateway.toml");
        let c = parse(text).unwrap();
        let d = Config::default();
        // Every documented value equals the built-in default, except the
        // fields an operator must set per host.
        assert_eq!(format!("{:?}", c.limits), format!("{:?}", d.limits));
        assert_eq!(format!("{:?}", c.tokens), format!("{:?}", d.tokens));
        assert_eq!(format!("{:?}", c.traffic), format!("{:?}", d.traffic));
        assert_eq!(format!("{:?}", c.dedup), format!("{:?}", d.dedup));
        assert_eq!(format!("{:?}", c.log), format!("{:?}", d.log));
        assert_eq!(format!("{:?}", c.aggregate), format!("{:?}", d.aggregate));
        assert_eq!(format!("{:?}", c.drain), format!("{:?}", d.drain));
        assert_eq!(c.tls, d.tls);
        assert_eq!(
            format!(
                "{:?}",
                Listen {
                    http: d.listen.http,
                    ..c.listen.clone()
                }
            ),
            format!("{:?}", d.listen)
        );
        assert_eq!(c.durability, d.durability);
    }

    #[test]
    fn empty_file_is_the_defaults() {
        let c = parse("").unwrap();
        assert_eq!(c.durability.mode, DurabilityMode::Sync);
        assert_eq!(c.cpus, Cpus::Auto(AutoWord::Auto));
    }

    #[test]
    fn unknown_fields_are_named() {
        let e = parse("[limits]\nheader_bytes = 1\n").unwrap_err();
        assert!(e.contains("header_bytes"), "{e}");
    }

    #[test]
    fn invalid_values_name_the_field() {
        let e = parse("[log]\nsegment_bytes = 1000\n").unwrap_err();
        assert!(e.starts_with("log.segment_bytes"), "{e}");
        let e = parse("gateway_id = \"has space\"\n").unwrap_err();
        assert!(e.starts_with("gateway_id"), "{e}");
        let c = parse("cpus = [1, 3]\n[durability]\nmode = \"process\"\n").unwrap();
        assert_eq!(c.cpus, Cpus::List(vec![1, 3]));
        assert_eq!(c.durability.mode, DurabilityMode::Process);
    }
}
