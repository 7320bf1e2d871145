//! The shipper's configuration: one TOML file, every field with its default,
//! unknown fields refused.

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
    /// The gateway's data directory (its `shard-<n>` directories are tailed).
    /// Default "./data".
    pub data_dir: PathBuf,
    /// The aggregator's QUIC address. Default "127.0.0.1:7400".
    pub aggregator: SocketAddr,
    /// Several aggregator instances, advertisers partitioned among them
    /// (`wire::partition`): the same ids, in any order, as every other
    /// shipper's and aggregator's. When set, `aggregator` is not used.
    /// Default none.
    pub cluster: Vec<Instance>,
    /// The name the aggregator's certificate must carry. Default "localhost".
    pub server_name: String,
    /// The CA that signed the aggregator's certificate (PEM).
    pub ca_file: PathBuf,
    /// This PoP's client certificate chain and key (PEM).
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
    /// /metrics and /healthz. Default "127.0.0.1:9301".
    pub metrics_listen: SocketAddr,
    /// How often a stream looks for new durable records, ms. Default 50.
    pub poll_ms: u64,
    pub partials: Stream,
    pub events: Stream,
    /// zstd level of batches. Default 3.
    pub zstd_level: i32,
    /// Batches in flight at once over the connection, across shards and
    /// streams (each stream sends one at a time, in order). Default 16.
    pub max_in_flight: usize,
    /// How long to wait for the aggregator to commit a batch, ms. Default 10000.
    pub ack_timeout_ms: u64,
    /// Retry back-off: doubled from min to max, with full jitter, ms.
    /// Defaults 100 and 10000.
    pub backoff_min_ms: u64,
    pub backoff_max_ms: u64,
}

/// `[[cluster]] id = "agg-a", quic = "10.0.0.1:7400"`.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Instance {
    pub id: String,
    pub quic: SocketAddr,
    /// A new instance joining the cluster: for a shard it has never heard
    /// of, it starts where the other instances stood when this shipper
    /// started (its routing switched), instead of from the start of the log
    /// (whose rows the old owners already counted). Set while growing, then
    /// remove (docs/DESIGN.md, "Several aggregators"). Default false.
    #[serde(default)]
    pub joining: bool,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Stream {
    /// Most records in one batch.
    pub max_items: u32,
    /// A batch goes once this many bytes (uncompressed) are pending...
    pub max_bytes: usize,
    /// ...or once its oldest record has waited this long, ms.
    pub max_age_ms: i64,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            log_format: Default::default(),
            data_dir: "./data".into(),
            aggregator: "127.0.0.1:7400".parse().unwrap(),
            cluster: Vec::new(),
            server_name: "localhost".into(),
            ca_file: "./certs/ca.pem".into(),
            cert_file: "./certs/pop.pem".into(),
            key_file: "./certs/pop.key".into(),
            metrics_listen: "127.0.0.1:9301".parse().unwrap(),
            poll_ms: 50,
            // Partials are small and carry freshness: one batch per poll.
            partials: Stream {
                max_items: 1000,
                max_bytes: 4 << 20,
                max_age_ms: 0,
            },
            // Raw events are the audit trail: large batches compress best.
            events: Stream {
                max_items: 100_000,
                max_bytes: 4 << 20,
                max_age_ms: 2000,
            },
            zstd_level: 3,
            max_in_flight: 16,
            ack_timeout_ms: 10_000,
            backoff_min_ms: 100,
            backoff_max_ms: 10_000,
        }
    }
}

impl Config {
    pub fn load(path: &Path) -> Result<Config, String> {
        let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
        let cfg: Config = toml::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))?;
        cfg.validate()
            .map_err(|e| format!("{}: {e}", path.display()))?;
        Ok(cfg)
    }

    pub fn validate(&self) -> Result<(), String> {
        for (name, s) in [("partials", &self.partials), ("events", &self.events)] {
            if s.max_items == 0 || s.max_bytes < 1024 || s.max_bytes > 64 << 20 {
                return Err(format!(
                    "{name}: max_items at least 1, max_bytes 1 KiB to 64 MiB"
                ));
            }
            if s.max_age_ms < 0 {
                return Err(format!("{name}.max_age_ms: not negative"));
            }
        }
        if !(1..=100).contains(&self.poll_ms) {
            return Err("poll_ms: 1 to 100".into());
        }
        if !(1..=22).contains(&self.zstd_level) {
            return Err("zstd_level: 1 to 22".into());
        }
        if self.max_in_flight == 0 || self.ack_timeout_ms == 0 {
            return Err("max_in_flight and ack_timeout_ms: at least 1".into());
        }
        if self.backoff_min_ms == 0 || self.backoff_max_ms < self.backoff_min_ms {
            return Err("backoff_min_ms at least 1 and at most backoff_max_ms".into());
        }
        let mut ids: Vec<&str> = self.cluster.iter().map(|i| i.id.as_str()).collect();
        ids.sort_unstable();
        ids.dedup();
        if ids.len() != self.cluster.len() || ids.iter().any(|i| i.is_empty()) {
            return Err("cluster: every instance needs its own non-empty id".into());
        }
        if !self.cluster.is_empty() && self.cluster.iter().all(|i| i.joining) {
            return Err("cluster: a joining instance needs one that is not joining".into());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn example_config_is_the_defaults_and_validates() {
        let text = include_str!("../../deploy/shipper.toml");
        let c: Config = toml::from_str(text).unwrap();
        c.validate().unwrap();
        let d = Config::default();
        assert_eq!(format!("{c:?}"), format!("{d:?}"));
    }

    #[test]
    fn unknown_fields_and_bad_limits_are_refused() {
        assert!(toml::from_str::<Config>("colour = 1\n").is_err());
        let c: Config = toml::from_str("poll_ms = 0\n").unwrap();
        assert!(c.validate().unwrap_err().starts_with("poll_ms"));
    }
}
