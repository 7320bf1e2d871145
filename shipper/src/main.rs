//! `clickgate-shipper run`: ships a gateway's logs to the aggregator.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::Ordering;

use clap::{Parser, Subcommand};
use shipper::config::Config;

#[derive(Parser)]
#[command(name = "clickgate-shipper", version, about)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Tail the gateway's data directory and ship to the aggregator until
    /// SIGTERM or SIGINT.
    Run {
        /// TOML config (deploy/shipper.toml lists every option).
        #[arg(long)]
        config: Option<PathBuf>,
        #[arg(long)]
        data_dir: Option<PathBuf>,
        #[arg(long)]
        aggregator: Option<SocketAddr>,
        /// Directory holding ca.pem, pop.pem and pop.key (overrides the
        /// three file options).
        #[arg(long)]
        certs: Option<PathBuf>,
        #[arg(long)]
        metrics_listen: Option<SocketAddr>,
    },
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let Cmd::Run {
        config,
        data_dir,
        aggregator,
        certs,
        metrics_listen,
    } = Cli::parse().cmd;
    let mut cfg = match config {
        Some(p) => Config::load(&p).map_err(anyhow::Error::msg)?,
        None => Config::default(),
    };
    if let Some(d) = data_dir {
        cfg.data_dir = d;
    }
    if let Some(a) = aggregator {
        cfg.aggregator = a;
    }
    if let Some(c) = certs {
        cfg.ca_file = c.join("ca.pem");
        cfg.cert_file = c.join("pop.pem");
        cfg.key_file = c.join("pop.key");
    }
    if let Some(m) = metrics_listen {
        cfg.metrics_listen = m;
    }
    cfg.validate().map_err(anyhow::Error::msg)?;
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
