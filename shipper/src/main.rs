//! `clickgate-shipper run`: ships a gateway's logs to the aggregator.
//! `clickgate-shipper check`: one hello, to test certificates and the path.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::Ordering;

use clap::{Args, Parser, Subcommand};
use shipper::config::Config;

#[derive(Parser)]
#[command(name = "clickgate-shipper", version, about)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Args)]
struct Common {
    /// TOML config (deploy/shipper.toml lists every option).
    #[arg(long)]
    config: Option<PathBuf>,
    #[arg(long)]
    aggregator: Option<SocketAddr>,
    /// An aggregator instance of a cluster, ID=HOST:PORT (repeat; replaces
    /// the config's `[[cluster]]` list).
    #[arg(long = "instance")]
    instances: Vec<String>,
    /// An instance (by id) that joins the cluster now (see `[[cluster]]`
    /// joining in deploy/shipper.toml; repeat).
    #[arg(long = "joining")]
    joining: Vec<String>,
    /// Directory holding ca.pem, pop.pem and pop.key (overrides the three
    /// file options).
    #[arg(long)]
    certs: Option<PathBuf>,
}

#[derive(Subcommand)]
enum Cmd {
    /// Tail the gateway's data directory and ship to the aggregator until
    /// SIGTERM or SIGINT.
    Run {
        #[command(flatten)]
        common: Common,
        #[arg(long)]
        data_dir: Option<PathBuf>,
        #[arg(long)]
        metrics_listen: Option<SocketAddr>,
    },
    /// Connect once and print the aggregator's cursors for a shard: checks
    /// the certificates, this PoP's entry in the aggregator's pops file and
    /// the network path. Exits 1 with the reason if any of them fails.
    Check {
        #[command(flatten)]
        common: Common,
        #[arg(long, default_value = "dev")]
        gateway_id: String,
        #[arg(long, default_value_t = 0)]
        shard: u16,
    },
}

fn build(c: Common) -> anyhow::Result<Config> {
    let mut cfg = match c.config {
        Some(p) => Config::load(&p).map_err(anyhow::Error::msg)?,
        None => Config::default(),
    };
    if let Some(a) = c.aggregator {
        cfg.aggregator = a;
    }
    if let Some(j) = c
        .joining
        .iter()
        .find(|j| !c.instances.iter().any(|i| i.starts_with(&format!("{j}="))))
    {
        anyhow::bail!("--joining {j:?}: not one of the --instance ids");
    }
    if !c.instances.is_empty() {
        cfg.cluster = c
            .instances
            .iter()
            .map(|s| {
                let (id, quic) = wire::partition::parse_instance(s)
                    .map_err(|e| anyhow::anyhow!("--instance {e}"))?;
                let joining = c.joining.contains(&id);
                Ok(shipper::config::Instance { id, quic, joining })
            })
            .collect::<anyhow::Result<_>>()?;
    }
    if let Some(d) = c.certs {
        cfg.ca_file = d.join("ca.pem");
        cfg.cert_file = d.join("pop.pem");
        cfg.key_file = d.join("pop.key");
    }
    Ok(cfg)
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    // `run` writes its log as its config says; the other commands as text.
    if !matches!(cli.cmd, Cmd::Run { .. }) {
        daemon::logging::init(daemon::logging::LogFormat::Text);
    }
    match cli.cmd {
        Cmd::Run {
            common,
            data_dir,
            metrics_listen,
        } => {
            let mut cfg = build(common)?;
            if let Some(d) = data_dir {
                cfg.data_dir = d;
            }
            if let Some(m) = metrics_listen {
                cfg.metrics_listen = m;
            }
            cfg.validate().map_err(anyhow::Error::msg)?;
            daemon::logging::init(cfg.log_format);
            run(cfg)
        }
        Cmd::Check {
            common,
            gateway_id,
            shard,
        } => {
            let cfg = build(common)?;
            cfg.validate().map_err(anyhow::Error::msg)?;
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            rt.block_on(async move {
                let sh = shipper::Shipper::new(cfg.clone())?;
                // Every instance of a cluster: a PoP must reach them all.
                let mut failed = false;
                for link in 0..sh.links() {
                    match sh.hello(link, &gateway_id, shard).await {
                        Ok(a) if a.status == wire::batch::Status::Cursors => println!(
                            "ok: {} answers for {gateway_id} shard {shard}: partials cursor {}, events cursor {}",
                            sh.link_name(link), a.partials_cursor, a.events_cursor
                        ),
                        Ok(a) => {
                            println!("refused by {}: {:?}: {}", sh.link_name(link), a.status, a.reason);
                            failed = true;
                        }
                        Err(e) => {
                            println!("failed: {e:#}");
                            failed = true;
                        }
                    }
                }
                if failed {
                    std::process::exit(1)
                }
                Ok(())
            })
        }
    }
}

fn run(cfg: Config) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let listen = cfg.metrics_listen;
        let sh = shipper::Shipper::new(cfg)?;
        let m = sh.clone();
        let app = axum::Router::new()
            .route("/healthz", axum::routing::get(|| async { "ok\n" }))
            .route(
                "/metrics",
                axum::routing::get(move || {
                    let m = m.clone();
                    async move { m.metrics.render() }
                }),
            );
        let listener = tokio::net::TcpListener::bind(listen).await?;
        tokio::spawn(async move { axum::serve(listener, app).await });
        let stop = sh.clone();
        tokio::spawn(async move {
            use tokio::signal::unix::{signal, SignalKind};
            let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
            let mut int = signal(SignalKind::interrupt()).expect("SIGINT handler");
            tokio::select! { _ = term.recv() => {}, _ = int.recv() => {} }
            tracing::info!("stopping");
            stop.stopping.store(true, Ordering::Relaxed);
        });
        tracing::info!(metrics = %listen, "shipper running");
        shipper::run(sh).await
    })
}
