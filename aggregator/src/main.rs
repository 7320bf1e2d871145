//! `clickgate-aggregator`: run the aggregator, make development certificates
//! and tokens, reconcile minutes from the raw audit trail.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;

use aggregator::config::{Config, Pops, Tokens};
use aggregator::{certs, http, reconcile, server, store};
use anyhow::Context;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "clickgate-aggregator", version, about)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Serve shippers (QUIC) and the query API (HTTP) until SIGTERM/SIGINT.
    Run {
        /// TOML config (deploy/aggregator.toml lists every option).
        #[arg(long)]
        config: Option<PathBuf>,
        #[arg(long)]
        store: Option<PathBuf>,
        #[arg(long)]
        listen_quic: Option<SocketAddr>,
        #[arg(long)]
        listen_http: Option<SocketAddr>,
        /// Directory with ca.pem, aggregator.pem, aggregator.key, pops.toml.
        #[arg(long)]
        certs: Option<PathBuf>,
        #[arg(long)]
        tokens: Option<PathBuf>,
        /// Allowed lateness, ms (overrides the config).
        #[arg(long)]
        lateness_ms: Option<i64>,
        /// ClickHouse HTTP URL for the sink, e.g. http://127.0.0.1:8123
        /// (overrides clickhouse.url).
        #[arg(long)]
        clickhouse: Option<String>,
        /// Answer every query from ClickHouse (clickhouse.serve_all_queries).
        #[arg(long)]
        queries_from_clickhouse: bool,
        /// This instance's id in a cluster (overrides cluster.self_id).
        #[arg(long)]
        instance_id: Option<String>,
        /// A cluster instance, ID=HTTP-HOST:PORT (repeat; replaces
        /// cluster.instances).
        #[arg(long = "instance")]
        instances: Vec<String>,
    },
    /// Write a development CA, server and PoP certificates and pops.toml.
    DevCerts {
        #[arg(long)]
        out: PathBuf,
        #[arg(long, default_value = "pop-dev")]
        pop: String,
        /// Gateway ids the PoP ships for (repeat). Default: "dev".
        #[arg(long = "gateway")]
        gateways: Vec<String>,
        /// Names the server certificate is valid for (repeat).
        #[arg(long = "name")]
        names: Vec<String>,
    },
    /// Write a tokens file with a random token per advertiser, one operator
    /// token (advertiser "*") that reads all, and one admin token.
    DevTokens {
        #[arg(long)]
        out: PathBuf,
        #[arg(long = "advertiser")]
        advertisers: Vec<String>,
    },
    /// Print the SHA-256 fingerprint of a PEM certificate, for pops.toml.
    Fingerprint {
        #[arg(long)]
        cert: PathBuf,
    },
    /// Recount minutes of a stopped aggregator's store from the raw audit
    /// trail, with the cross-PoP rule, and report the rows that differ (or
    /// with --write correct them). A running aggregator reconciles by itself
    /// and holds the store file locked; to recount a range there, an admin
    /// POSTs /api/v1/admin/reconcile.
    Reconcile {
        #[arg(long)]
        store: PathBuf,
        /// Unix seconds or YYYY-MM-DDTHH:MM:SSZ (inclusive).
        #[arg(long)]
        start: String,
        /// Unix seconds or YYYY-MM-DDTHH:MM:SSZ (exclusive).
        #[arg(long)]
        end: String,
        #[arg(long)]
        write: bool,
        /// TOML config: its [reconcile] (dedup horizon, velocity rule) and
        /// time rules apply.
        #[arg(long)]
        config: Option<PathBuf>,
    },
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    // `run` writes its log as its config says; the other commands as text.
    if !matches!(cli.cmd, Cmd::Run { .. }) {
        daemon::logging::init(daemon::logging::LogFormat::Text);
    }
    match cli.cmd {
        Cmd::Run {
            config,
            store,
            listen_quic,
            listen_http,
            certs,
            tokens,
            lateness_ms,
            clickhouse,
            queries_from_clickhouse,
            instance_id,
            instances,
        } => {
            let mut cfg = match config {
                Some(p) => Config::load(&p).map_err(anyhow::Error::msg)?,
                None => Config::default(),
            };
            if let Some(s) = store {
                cfg.store_path = s;
            }
            if let Some(a) = listen_quic {
                cfg.listen_quic = a;
            }
            if let Some(a) = listen_http {
                cfg.listen_http = a;
            }
            if let Some(d) = certs {
                cfg.ca_file = d.join("ca.pem");
                cfg.cert_file = d.join("aggregator.pem");
                cfg.key_file = d.join("aggregator.key");
                cfg.pops_file = d.join("pops.toml");
            }
            if let Some(t) = tokens {
                cfg.tokens_file = t;
            }
            if let Some(l) = lateness_ms {
                cfg.lateness_ms = l;
            }
            if let Some(u) = clickhouse {
                cfg.clickhouse.url = u;
            }
            if queries_from_clickhouse {
                cfg.clickhouse.serve_all_queries = true;
            }
            if let Some(id) = instance_id {
                cfg.cluster.self_id = id;
            }
            if !instances.is_empty() {
                cfg.cluster.instances = instances
                    .iter()
                    .map(|s| {
                        let (id, http) = wire::partition::parse_instance(s)
                            .map_err(|e| anyhow::anyhow!("--instance {e}"))?;
                        Ok(aggregator::config::ClusterInstance { id, http })
                    })
                    .collect::<anyhow::Result<_>>()?;
            }
            cfg.validate().map_err(anyhow::Error::msg)?;
            daemon::logging::init(cfg.log_format);
            run(cfg)
        }
        Cmd::DevCerts {
            out,
            pop,
            mut gateways,
            mut names,
        } => {
            if gateways.is_empty() {
                gateways.push("dev".into());
            }
            if names.is_empty() {
                names = vec!["localhost".into(), "127.0.0.1".into()];
            }
            certs::generate(&out, &pop, &gateways, &names)?;
            println!(
                "wrote {}/{{ca.pem, aggregator.pem, aggregator.key, pop.pem, pop.key, pops.toml}}",
                out.display()
            );
            Ok(())
        }
        Cmd::DevTokens { out, advertisers } => {
            use std::fmt::Write;
            let rng = ring::rand::SystemRandom::new();
            let mut text = String::from(
                "# Query API bearer tokens; advertiser \"*\" reads every advertiser.\n",
            );
            let token = || -> anyhow::Result<String> {
                let bytes: [u8; 16] = ring::rand::generate(&rng)
                    .map_err(|_| anyhow::anyhow!("no randomness"))?
                    .expose();
                Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
            };
            for a in advertisers.iter().map(String::as_str).chain(["*"]) {
                let _ = write!(
                    text,
                    "[[token]]\nadvertiser_id = {a:?}\ntoken = \"{}\"\n",
                    token()?
                );
            }
            let _ = write!(
                text,
                "# Admin: reconcile jobs (/api/v1/admin/...); reads no advertiser.\n[[admin]]\ntoken = \"{}\"\n",
                token()?
            );
            std::fs::write(&out, text).with_context(|| format!("writing {}", out.display()))?;
            println!("wrote {}", out.display());
            Ok(())
        }
        Cmd::Fingerprint { cert } => {
            use rustls::pki_types::pem::PemObject;
            let der = rustls::pki_types::CertificateDer::from_pem_file(&cert)
                .with_context(|| format!("reading {}", cert.display()))?;
            println!("{}", certs::fingerprint(&der));
            Ok(())
        }
        Cmd::Reconcile {
            store,
            start,
            end,
            write,
            config,
        } => {
            let cfg = match config {
                Some(p) => Config::load(&p).map_err(anyhow::Error::msg)?,
                None => Config::default(),
            };
            let s = wire::time::parse_time(&start).map_err(anyhow::Error::msg)?;
            let e = wire::time::parse_time(&end).map_err(anyhow::Error::msg)?;
            let (m0, m1) = reconcile::job_range(
                &reconcile::Settings {
                    job_span_max_ms: i64::MAX,
                    ..cfg.reconcile.clone()
                },
                s,
                e,
            )
            .map_err(anyhow::Error::msg)?;
            let st = Arc::new(
                store::Store::open(&store, store_settings(&cfg)).with_context(|| {
                    format!(
                        "opening {} (is an aggregator running on it?)",
                        store.display()
                    )
                })?,
            );
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .enable_all()
                .build()?;
            let cold = cold_reader(&cfg, &store, rt.handle())?;
            let r = reconcile::offline(
                st,
                &cfg.reconcile,
                cold,
                m0,
                m1,
                write,
                aggregator::now_ms(),
            )?;
            println!(
                "minutes {}  rows compared {}  events read {}  differing {}  failed {}",
                r.minutes,
                r.rows_compared,
                r.events_read,
                r.diffs.len(),
                r.failed.len()
            );
            for (k, now, want) in &r.diffs {
                println!(
                    "{} {}/{}/{} {:?} {}: rows clicks {} spend {} | recount clicks {} spend {} dup {} invalid {}",
                    wire::time::format_time(k.minute as i64 * 60),
                    k.advertiser_id,
                    k.campaign_id,
                    k.ad_id,
                    k.device,
                    String::from_utf8_lossy(&k.country),
                    now.clicks,
                    now.spend_micros,
                    want.clicks,
                    want.spend_micros,
                    want.duplicates,
                    want.invalid
                );
            }
            for (m, why) in &r.failed {
                println!(
                    "{} not reconciled: {why}",
                    wire::time::format_time(*m as i64 * 60)
                );
            }
            if write {
                println!("minutes written (corrections as new versions, marked reconciled)");
            }
            if (!write && !r.diffs.is_empty()) || !r.failed.is_empty() {
                std::process::exit(1);
            }
            Ok(())
        }
    }
}

fn run(cfg: Config) -> anyhow::Result<()> {
    let pops = Pops::load(&cfg.pops_file).map_err(anyhow::Error::msg)?;
    let tokens = Tokens::load(&cfg.tokens_file).map_err(anyhow::Error::msg)?;
    if let Some(dir) = cfg
        .store_path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
    {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let st = Arc::new(
        store::Store::open(&cfg.store_path, store_settings(&cfg))
            .with_context(|| format!("opening the store {}", cfg.store_path.display()))?,
    );
    let store_id = st.store_id()?;
    let metrics = Arc::new(aggregator::metrics::Metrics::default());
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let reconcile_stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let cold = cold_reader(&cfg, &cfg.store_path, rt.handle())?;
    let reconciler = cfg.reconcile.enabled.then(|| {
        reconcile::spawn(
            st.clone(),
            cfg.reconcile.clone(),
            metrics.reconcile.clone(),
            cold,
            reconcile_stop.clone(),
        )
    });
    rt.block_on(async move {
        let writer = server::spawn_writer(st.clone(), metrics.clone(), cfg.group_commit_max);
        let sink_stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let sink = cfg.clickhouse.enabled().then(|| {
            tracing::info!(url = %cfg.clickhouse.url, table = %cfg.clickhouse.table, "ClickHouse sink on");
            tokio::spawn(aggregator::clickhouse::run_sink(
                st.clone(),
                cfg.clickhouse.clone(),
                store_id.clone(),
                metrics.clone(),
                sink_stop.clone(),
            ))
        });
        let kafka = cfg.kafka.enabled().then(|| {
            tracing::info!(bootstrap = ?cfg.kafka.bootstrap, events = %cfg.kafka.events_topic, rows = %cfg.kafka.rows_topic, "Kafka sink on");
            tokio::spawn(aggregator::kafka::run_sink(
                st.clone(),
                cfg.kafka.clone(),
                store_id.clone(),
                metrics.kafka.clone(),
                sink_stop.clone(),
            ))
        });
        let audit_stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let objects = if cfg.audit.seal {
            let target = cfg.audit.target(&cfg.store_path).map_err(anyhow::Error::msg)?;
            let o = aggregator::audit::open(&cfg.audit, &target).map_err(anyhow::Error::msg)?;
            tracing::info!(target = ?target, "audit sealing on");
            Some(o)
        } else {
            None
        };
        let sealer = objects.clone().map(|(objects, prefix)| {
            tokio::spawn(aggregator::audit::run(
                st.clone(),
                objects,
                prefix,
                cfg.audit.clone(),
                metrics.audit.clone(),
                audit_stop.clone(),
            ))
        });
        let retention = tokio::spawn(aggregator::retention::run(
            st.clone(),
            cfg.retention.clone(),
            cfg.reconcile.enabled,
            objects,
            metrics.retention.clone(),
            audit_stop.clone(),
        ));
        let endpoint = quinn::Endpoint::server(server::server_config(&cfg)?, cfg.listen_quic)
            .with_context(|| format!("binding QUIC on {}", cfg.listen_quic))?;
        let api = Arc::new(http::Api {
            store: st.clone(),
            tokens,
            metrics: metrics.clone(),
            query_max_points: cfg.query_max_points,
            ready: false.into(),
            cluster: cfg.cluster.route().map(|(ids, me)| http::ClusterRoute {
                ids,
                me,
                http: cfg.cluster.instances.iter().map(|i| i.http).collect(),
            }),
            clickhouse: (cfg.clickhouse.enabled()
                && (cfg.clickhouse.serve_queries || cfg.clickhouse.serve_all_queries))
                .then(|| aggregator::clickhouse::Client::new(&cfg.clickhouse, &store_id)),
            clickhouse_for_all: cfg.clickhouse.enabled() && cfg.clickhouse.serve_all_queries,
            rows_retention_ms: cfg.retention.rows_ms,
            forward: http::forwarder(),
            reconcile: cfg.reconcile.clone(),
        });
        let listener = tokio::net::TcpListener::bind(cfg.listen_http)
            .await
            .with_context(|| format!("binding HTTP on {}", cfg.listen_http))?;
        let app = http::router(api.clone());
        tokio::spawn(async move { axum::serve(listener, app).await });
        let quic = tokio::spawn(server::serve(
            endpoint.clone(),
            Arc::new(pops.by_fingerprint()),
            writer,
            metrics.clone(),
            cfg.max_batch_bytes,
        ));
        api.ready.store(true, Relaxed);
        tracing::info!(quic = %cfg.listen_quic, http = %cfg.listen_http, store = %cfg.store_path.display(), pops = pops.pop.len(), "aggregator running");
        use tokio::signal::unix::{signal, SignalKind};
        let mut term = signal(SignalKind::terminate())?;
        let mut int = signal(SignalKind::interrupt())?;
        tokio::select! { _ = term.recv() => {}, _ = int.recv() => {} }
        tracing::info!("stopping: refusing new batches, finishing those in flight");
        api.ready.store(false, Relaxed);
        endpoint.close(0u32.into(), b"aggregator stopping");
        let _ = tokio::time::timeout(std::time::Duration::from_secs(5), quic).await;
        endpoint.wait_idle().await;
        // Last rows to the sinks: one more round, then stop (what is not
        // written stays marked in the store for the next start).
        sink_stop.store(true, Relaxed);
        for sink in [sink, kafka].into_iter().flatten() {
            let _ = tokio::time::timeout(std::time::Duration::from_secs(10), sink).await;
        }
        // An upload in progress finishes or is redone after the next start
        // (its intent is recorded).
        audit_stop.store(true, Relaxed);
        if let Some(s) = sealer {
            let _ = tokio::time::timeout(std::time::Duration::from_secs(10), s).await;
        }
        let _ = tokio::time::timeout(std::time::Duration::from_secs(10), retention).await;
        // A reconcile turn in progress finishes its transaction; what it had
        // not committed is redone after the next start.
        reconcile_stop.store(true, Relaxed);
        if let Some(r) = reconciler {
            let _ = r.join();
        }
        Ok(())
    })
}

/// Reads sealed files back for reconciliation, when sealing is on.
fn cold_reader(
    cfg: &Config,
    store_path: &std::path::Path,
    rt: &tokio::runtime::Handle,
) -> anyhow::Result<Option<Arc<aggregator::audit::ColdReader>>> {
    if !cfg.audit.seal {
        return Ok(None);
    }
    let target = cfg.audit.target(store_path).map_err(anyhow::Error::msg)?;
    let (objects, prefix) =
        aggregator::audit::open(&cfg.audit, &target).map_err(anyhow::Error::msg)?;
    Ok(Some(Arc::new(aggregator::audit::ColdReader {
        objects,
        prefix,
        rt: rt.clone(),
    })))
}

fn store_settings(cfg: &Config) -> store::Settings {
    store::Settings {
        rules: aggregator::merge::Rules {
            lateness_ms: cfg.lateness_ms,
            horizon_ms: cfg.horizon_ms,
            source_timeout_ms: cfg.source_timeout_ms,
            raw_max: cfg.max_raw_bytes,
            cluster: cfg.cluster.route(),
        },
        export: cfg.clickhouse.enabled(),
        kafka: cfg.kafka.enabled(),
        kafka_backlog_entries_max: cfg.kafka.backlog_entries_max,
    }
}
