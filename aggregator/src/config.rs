//! The aggregator's configuration (one TOML file, every field with its
//! default, unknown fields refused), the PoPs file (which client certificate
//! may ship for which gateways) and the tokens file (who may read which
//! advertiser).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// How the process writes its log to stderr: "text" (colour only on a
    /// terminal) or "json" (one object per line, for log shippers).
    /// Default "text".
    pub log_format: daemon::logging::LogFormat,
    /// The embedded store's file. Default "./aggregator.redb".
    pub store_path: PathBuf,
    /// QUIC (shippers). Default "127.0.0.1:7400".
    pub listen_quic: SocketAddr,
    /// HTTP: query API, /metrics, /healthz, /readyz. Default "127.0.0.1:7401".
    pub listen_http: SocketAddr,
    /// The CA that signs PoP client certificates, and this server's
    /// certificate chain and key (PEM).
    pub ca_file: PathBuf,
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
    /// Which client certificate is which PoP (see [`Pops`]).
    pub pops_file: PathBuf,
    /// Bearer tokens of the query API (see [`Tokens`]).
    pub tokens_file: PathBuf,
    /// A minute is final once the watermark is this far past its end, ms.
    /// Default 120000 (2 minutes).
    pub lateness_ms: i64,
    /// Partials for minutes further than this behind the watermark go to the
    /// late table instead of the rows, ms. Default 86400000 (24 h).
    pub horizon_ms: i64,
    /// A source (gateway shard) not heard from for this long stops holding
    /// the watermark back, ms. Default 60000.
    pub source_timeout_ms: i64,
    /// Largest batch frame accepted on a stream, bytes. Default 16 MiB.
    pub max_batch_bytes: usize,
    /// Largest decompressed batch, bytes. Default 64 MiB.
    pub max_raw_bytes: usize,
    /// Concurrent streams (batches) per shipper connection. Default 64.
    pub max_streams_per_connection: u32,
    /// Most batches committed in one store transaction. Default 64.
    pub group_commit_max: usize,
    /// Most points one query may return. Default 100000.
    pub query_max_points: usize,
    /// The ClickHouse sink; off unless `clickhouse.url` is set.
    pub clickhouse: ClickHouse,
    /// The Kafka sink; off unless `kafka.bootstrap` is set.
    pub kafka: crate::kafka::Settings,
    /// Several instances, advertisers partitioned among them; off unless
    /// `cluster.instances` is set.
    pub cluster: Cluster,
    /// Continuous reconciliation across PoPs (docs/DESIGN.md, "Across PoPs").
    pub reconcile: crate::reconcile::Settings,
    /// Sealed hourly audit files in object storage.
    pub audit: crate::audit::Settings,
    /// How long each tier keeps data: rows, late table, hot raw events,
    /// sealed files.
    pub retention: crate::retention::Settings,
}

/// `[cluster]`: this instance's id and every instance (the same list, in any
/// order, on every aggregator and in every shipper's `[[cluster]]`). An
/// advertiser belongs to one instance (`wire::partition`); the others refuse
/// its data and answer its queries from ClickHouse or from its owner.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq, Default)]
#[serde(deny_unknown_fields, default)]
pub struct Cluster {
    pub self_id: String,
    pub instances: Vec<ClusterInstance>,
}

/// `[[cluster.instances]] id = "agg-a", http = "10.0.0.1:7401"`.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ClusterInstance {
    pub id: String,
    /// Its query API, where queries for its advertisers are forwarded.
    pub http: SocketAddr,
}

impl Cluster {
    /// (instance ids, this instance's index), when clustered.
    pub fn route(&self) -> Option<(std::sync::Arc<Vec<String>>, usize)> {
        let ids: Vec<String> = self.instances.iter().map(|i| i.id.clone()).collect();
        let me = ids.iter().position(|i| *i == self.self_id)?;
        Some((std::sync::Arc::new(ids), me))
    }
}

/// `[clickhouse]`: merged rows written to a ClickHouse ReplacingMergeTree.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct ClickHouse {
    /// HTTP interface, e.g. "http://127.0.0.1:8123". Empty: no sink. Default "".
    pub url: String,
    /// Database (created beforehand). Default "default".
    pub database: String,
    /// Table for the rows; `<table>_watermark` holds the watermark. Created
    /// if missing. Default "clickgate_minutes".
    pub table: String,
    /// HTTP basic auth; empty user: none. Default "".
    pub user: String,
    pub password: String,
    /// How often changed rows are written, ms. Default 1000.
    pub flush_interval_ms: u64,
    /// Most rows in one INSERT. Default 50000.
    pub batch_rows_max: usize,
    /// One statement's time limit, ms. Default 10000.
    pub timeout_ms: u64,
    /// Answer queries for advertisers this instance does not own from
    /// ClickHouse (see `[cluster]`). Default true.
    pub serve_queries: bool,
    /// Answer every query from ClickHouse, own advertisers too: after a
    /// cluster grew, a moved advertiser's history is in ClickHouse (written
    /// by its old owner), not in its new owner's store. Answers lag by up
    /// to `flush_interval_ms`. Default false.
    pub serve_all_queries: bool,
}

impl Default for ClickHouse {
    fn default() -> Self {
        ClickHouse {
            url: String::new(),
            database: "default".into(),
            table: "clickgate_minutes".into(),
            user: String::new(),
            password: String::new(),
            flush_interval_ms: 1000,
            batch_rows_max: 50_000,
            timeout_ms: 10_000,
            serve_queries: true,
            serve_all_queries: false,
        }
    }
}

impl ClickHouse {
    pub fn enabled(&self) -> bool {
        !self.url.is_empty()
    }
}

impl Default for Config {
    fn default() -> Self {
        Config {
            log_format: Default::default(),
            store_path: "./aggregator.redb".into(),
            listen_quic: "127.0.0.1:7400".parse().unwrap(),
            listen_http: "127.0.0.1:7401".parse().unwrap(),
            ca_file: "./certs/ca.pem".into(),
            cert_file: "./certs/aggregator.pem".into(),
            key_file: "./certs/aggregator.key".into(),
            pops_file: "./certs/pops.toml".into(),
            tokens_file: "./tokens.toml".into(),
            lateness_ms: 120_000,
            horizon_ms: 24 * 3_600_000,
            source_timeout_ms: 60_000,
            max_batch_bytes: 16 << 20,
            max_raw_bytes: 64 << 20,
            max_streams_per_connection: 64,
            group_commit_max: 64,
            query_max_points: 100_000,
            clickhouse: ClickHouse::default(),
            kafka: crate::kafka::Settings::default(),
            cluster: Cluster::default(),
            reconcile: crate::reconcile::Settings::default(),
            audit: crate::audit::Settings::default(),
            retention: crate::retention::Settings::default(),
        }
    }
}

impl Config {
    pub fn load(path: &Path) -> Result<Config, String> {
        let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
        let c: Config = toml::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))?;
        c.validate()
            .map_err(|e| format!("{}: {e}", path.display()))?;
        Ok(c)
    }

    pub fn validate(&self) -> Result<(), String> {
        if self.lateness_ms < 0 || self.horizon_ms < self.lateness_ms {
            return Err("lateness_ms at least 0, horizon_ms at least lateness_ms".into());
        }
        if self.source_timeout_ms <= 0 {
            return Err("source_timeout_ms: at least 1".into());
        }
        if self.max_batch_bytes < 1024 || self.max_raw_bytes < self.max_batch_bytes {
            return Err(
                "max_batch_bytes at least 1024, max_raw_bytes at least max_batch_bytes".into(),
            );
        }
        let ch = &self.clickhouse;
        let ident =
            |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_');
        if ch.enabled() {
            if !ch.url.starts_with("http://") {
                return Err("clickhouse.url: http://host:port".into());
            }
            if !ident(&ch.database) || !ident(&ch.table) {
                return Err("clickhouse.database and clickhouse.table: [A-Za-z0-9_]+".into());
            }
            if ch.batch_rows_max == 0 || ch.flush_interval_ms == 0 || ch.timeout_ms == 0 {
                return Err(
                    "clickhouse.batch_rows_max, flush_interval_ms, timeout_ms: at least 1".into(),
                );
            }
        }
        self.kafka.validate()?;
        let cl = &self.cluster;
        if !cl.instances.is_empty() {
            let mut ids: Vec<&str> = cl.instances.iter().map(|i| i.id.as_str()).collect();
            ids.sort_unstable();
            ids.dedup();
            if ids.len() != cl.instances.len() || ids.iter().any(|i| i.is_empty()) {
                return Err("cluster.instances: every instance needs its own non-empty id".into());
            }
            if cl.route().is_none() {
                return Err("cluster.self_id: must be one of cluster.instances' ids".into());
            }
        }
        self.reconcile.validate()?;
        self.retention.validate(self.lateness_ms, self.horizon_ms)?;
        self.audit.target(&self.store_path)?;
        if self.audit.seal && !self.reconcile.enabled {
            return Err(
                "audit.seal: an hour is sealed once reconciled; set [reconcile] enabled = true or [audit] seal = false"
                    .into(),
            );
        }
        if self.max_streams_per_connection == 0
            || self.group_commit_max == 0
            || self.query_max_points == 0
        {
            return Err(
                "max_streams_per_connection, group_commit_max, query_max_points: at least 1".into(),
            );
        }
        Ok(())
    }
}

/// `pops.toml`: `[[pop]] id = "pop-1", cert_sha256 = "<hex of the DER>",
/// gateways = ["gw-a", "gw-b"]`. A certificate not listed is refused even if
/// the CA signed it, so a PoP is revoked by removing its line.
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct Pops {
    #[serde(default)]
    pub pop: Vec<Pop>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Pop {
    pub id: String,
    pub cert_sha256: String,
    /// Gateway ids this PoP ships for. Default: the PoP id alone.
    #[serde(default)]
    pub gateways: Vec<String>,
}

impl Pops {
    pub fn load(path: &Path) -> Result<Pops, String> {
        let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
        let mut p: Pops = toml::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))?;
        for pop in &mut p.pop {
            pop.cert_sha256 = pop.cert_sha256.to_ascii_lowercase();
            if pop.cert_sha256.len() != 64
                || !pop.cert_sha256.bytes().all(|b| b.is_ascii_hexdigit())
            {
                return Err(format!(
                    "{}: pop {:?}: cert_sha256 must be 64 hex digits",
                    path.display(),
                    pop.id
                ));
            }
            if pop.gateways.is_empty() {
                pop.gateways.push(pop.id.clone());
            }
        }
        Ok(p)
    }

    /// Fingerprint (lowercase hex) -> (PoP id, gateway ids).
    pub fn by_fingerprint(&self) -> HashMap<String, (String, Vec<String>)> {
        self.pop
            .iter()
            .map(|p| (p.cert_sha256.clone(), (p.id.clone(), p.gateways.clone())))
            .collect()
    }
}

/// `tokens.toml`: `[[token]] advertiser_id = "adv-1", token = "..."`. An
/// `advertiser_id` of `"*"` is an operator token that reads every advertiser.
/// `[[admin]] token = "..."`: an administrator, who may start reconcile jobs
/// (`/api/v1/admin/...`) and reads no advertiser's data by it.
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct Tokens {
    #[serde(default)]
    pub token: Vec<Token>,
    #[serde(default)]
    pub admin: Vec<AdminToken>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminToken {
    pub token: String,
}

/// Who a bearer token is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Bearer<'a> {
    Advertiser(&'a str),
    Admin,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Token {
    pub advertiser_id: String,
    pub token: String,
}

impl Tokens {
    pub fn load(path: &Path) -> Result<Tokens, String> {
        let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
        let t: Tokens = toml::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))?;
        if let Some(short) = t.token.iter().find(|t| t.token.len() < 16) {
            return Err(format!(
                "{}: the token of {:?} is shorter than 16 characters",
                path.display(),
                short.advertiser_id
            ));
        }
        if t.admin.iter().any(|a| a.token.len() < 16) {
            return Err(format!(
                "{}: an admin token is shorter than 16 characters",
                path.display()
            ));
        }
        let mut all: Vec<&str> = t
            .token
            .iter()
            .map(|x| x.token.as_str())
            .chain(t.admin.iter().map(|a| a.token.as_str()))
            .collect();
        all.sort_unstable();
        if all.windows(2).any(|w| w[0] == w[1]) {
            return Err(format!(
                "{}: the same token is listed twice",
                path.display()
            ));
        }
        Ok(t)
    }

    /// Who a bearer token is. Digests are compared, not the tokens, so the
    /// time a comparison takes says nothing about a token.
    pub fn bearer(&self, presented: &str) -> Option<Bearer<'_>> {
        let sha = |b: &[u8]| ring::digest::digest(&ring::digest::SHA256, b);
        let p = sha(presented.as_bytes());
        if let Some(t) = self
            .token
            .iter()
            .find(|t| sha(t.token.as_bytes()).as_ref() == p.as_ref())
        {
            return Some(Bearer::Advertiser(t.advertiser_id.as_str()));
        }
        self.admin
            .iter()
            .any(|a| sha(a.token.as_bytes()).as_ref() == p.as_ref())
            .then_some(Bearer::Admin)
    }

    /// The advertiser a bearer token reads (none for an admin token).
    pub fn advertiser_of(&self, presented: &str) -> Option<&str> {
        match self.bearer(presented)? {
            Bearer::Advertiser(a) => Some(a),
            Bearer::Admin => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn example_config_is_the_defaults() {
        let c: Config = toml::from_str(include_str!("../../deploy/aggregator.toml")).unwrap();
        c.validate().unwrap();
        assert_eq!(format!("{c:?}"), format!("{:?}", Config::default()));
        assert!(toml::from_str::<Config>("colour = 1\n").is_err());
        let bad: Config = toml::from_str("horizon_ms = 10\n").unwrap();
        assert!(bad.validate().is_err());
        // A retention not longer than the horizon is refused, named.
        let short: Config = toml::from_str("[retention]\nrows_ms = 3600000\n").unwrap();
        let e = short.validate().unwrap_err();
        assert!(e.contains("retention.rows_ms"), "{e}");
    }

    #[test]
    fn tokens_map_to_advertisers() {
        let t: Tokens = toml::from_str(
            "[[token]]\nadvertiser_id = \"a\"\ntoken = \"0123456789abcdef\"\n\
             [[token]]\nadvertiser_id = \"*\"\ntoken = \"fedcba9876543210\"\n",
        )
        .unwrap();
        assert_eq!(t.advertiser_of("0123456789abcdef"), Some("a"));
        assert_eq!(t.advertiser_of("fedcba9876543210"), Some("*"));
        assert_eq!(t.advertiser_of("0123456789abcdeX"), None);
        assert_eq!(t.advertiser_of(""), None);
    }

    #[test]
    fn admin_tokens_are_not_advertiser_tokens() {
        let t: Tokens = toml::from_str(
            "[[token]]\nadvertiser_id = \"*\"\ntoken = \"fedcba9876543210\"\n\
             [[admin]]\ntoken = \"aaaabbbbccccdddd\"\n",
        )
        .unwrap();
        assert_eq!(t.bearer("aaaabbbbccccdddd"), Some(Bearer::Admin));
        assert_eq!(t.advertiser_of("aaaabbbbccccdddd"), None);
        assert_eq!(t.bearer("fedcba9876543210"), Some(Bearer::Advertiser("*")));
    }
}
