//! `clickgate-gateway`: run the gateway, inspect a data directory, or make and
//! use dev keys.

use std::path::PathBuf;

use anyhow::Context;
use base64::Engine;
use clap::{Parser, Subcommand};
use gateway::config::{Config, Cpus, DurabilityMode};

#[derive(Parser)]
#[command(
    version,
    about = "Clickgate edge gateway: signed clicks in, durable log out"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the gateway.
    Run {
        /// TOML config file (see deploy/gateway.toml). Without it, defaults.
        #[arg(short, long)]
        config: Option<PathBuf>,
        /// Override listen.http, e.g. 127.0.0.1:8080.
        #[arg(long)]
        listen: Option<std::net::SocketAddr>,
        /// Override data_dir.
        #[arg(long)]
        data_dir: Option<PathBuf>,
        /// Override keys_file.
        #[arg(long)]
        keys: Option<PathBuf>,
        /// Override cpus: "auto" or a comma-separated list, e.g. 1 or 0,1.
        #[arg(long)]
        cpus: Option<String>,
        /// Override durability.mode: sync or process.
        #[arg(long)]
        durability: Option<String>,
        /// Rolling restart: start beside the running gateway of this
        /// data_dir. Binds the listeners at once (SO_REUSEPORT), logs
        /// "listening; waiting for the data directory", then waits for the old
        /// process to drain (send it SIGTERM) and release the directory, and
        /// serves. Needs net.ipv4.tcp_migrate_req=1 so connections queued on
        /// the old listeners move over (deploy/RUNBOOK.md).
        #[arg(long)]
        takeover: bool,
    },
    /// Print what is in a data directory's logs, without starting the server.
    Inspect {
        /// The gateway's data_dir.
        data_dir: PathBuf,
        /// Also print one line per event record.
        #[arg(long)]
        events: bool,
        /// The gateway's config file, for the disk budget the buffer figures
        /// are reckoned against (without it, the default budget).
        #[arg(short, long)]
        config: Option<PathBuf>,
    },
    /// Write a new keys file with one random key (for development).
    Keygen {
        /// Key id.
        #[arg(long, default_value = "k1")]
        kid: String,
        /// Where to write; refuses to overwrite.
        #[arg(long, default_value = "keys.toml")]
        out: PathBuf,
    },
    /// Write a self-signed TLS certificate (gateway.pem, gateway.key) for
    /// development and benchmarks; production brings its own.
    DevCert {
        /// Directory to write into; existing files are kept.
        #[arg(long, default_value = "certs")]
        out: PathBuf,
        /// Names the certificate is valid for (DNS names or IP addresses).
        #[arg(long, default_values_t = ["localhost".to_string(), "127.0.0.1".to_string()])]
        name: Vec<String>,
    },
    /// Sign a click or impression URL with a key from a keys file.
    Sign {
        #[arg(long, default_value = "keys.toml")]
        keys: PathBuf,
        #[arg(long, default_value = "k1")]
        kid: String,
        /// Base URL, e.g. http://127.0.0.1:8080/api/v1/clicks
        #[arg(long, default_value = "http://127.0.0.1:8080/api/v1/clicks")]
        base: String,
        #[arg(long, default_value = "adv-1")]
        advertiser_id: String,
        #[arg(long, default_value = "camp-1")]
        campaign_id: String,
        #[arg(long, default_value = "ad-1")]
        ad_id: String,
        /// Click id; default: random.
        #[arg(long)]
        click_id: Option<String>,
        #[arg(long, default_value = "user-1")]
        user_id: String,
        #[arg(long, default_value = "0.25")]
        cost_per_click: String,
        #[arg(long, default_value = "https://example.com/landing")]
        redirect_url: String,
        /// Unix seconds; default: now.
        #[arg(long)]
        timestamp: Option<i64>,
    },
}

fn main() {
    if let Err(e) = real_main() {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

fn real_main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    if !matches!(cli.cmd, Cmd::Run { .. }) {
        daemon::logging::init(daemon::logging::LogFormat::Text);
    }
    match cli.cmd {
        Cmd::Run {
            config,
            listen,
            data_dir,
            keys,
            cpus,
            durability,
            takeover,
        } => {
            let mut cfg = match config {
                Some(p) => Config::load(&p)?,
                None => Config::default(),
            };
            if let Some(l) = listen {
                cfg.listen.http = l;
            }
            if let Some(d) = data_dir {
                cfg.data_dir = d;
            }
            if let Some(k) = keys {
                cfg.keys_file = k;
            }
            if let Some(c) = cpus {
                if c != "auto" {
                    let list = c
                        .split(',')
                        .map(|x| x.trim().parse::<usize>())
                        .collect::<Result<Vec<_>, _>>()
                        .context("--cpus: \"auto\" or a list like 0,1")?;
                    cfg.cpus = Cpus::List(list);
                }
            }
            if let Some(d) = durability {
                cfg.durability.mode = match d.as_str() {
                    "sync" => DurabilityMode::Sync,
                    "process" => DurabilityMode::Process,
                    _ => anyhow::bail!("--durability: sync or process"),
                };
            }
            cfg.validate().map_err(|m| anyhow::anyhow!("config: {m}"))?;
            daemon::logging::init(cfg.log_format);
            gateway::server::run(cfg, takeover)
        }
        Cmd::Inspect {
            data_dir,
            events,
            config,
        } => {
            let cfg = match &config {
                Some(p) => Config::load(p)?,
                None => Config::default(),
            };
            let opts = gateway::inspect::Options {
                events,
                disk_budget_bytes: cfg.log.disk_budget_bytes,
                now_ms: gateway::clock::now_ms(),
            };
            let out = gateway::inspect::inspect(&data_dir, opts)?;
            print!("{out}");
            Ok(())
        }
        Cmd::Keygen { kid, out } => {
            let mut secret = [0u8; 32];
            ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut secret)
                .map_err(|_| anyhow::anyhow!("no randomness"))?;
            let s = wire::signed::B64.encode(secret);
            let text = format!(
                "# Clickgate signing keys: kid -> base64url secret (32+ bytes).\n\
                 # Remove a key (or set retired_at = <unix seconds>) to retire it;\n\
                 # it keeps verifying for tokens.key_grace_s.\n\
                 [[key]]\nkid = \"{kid}\"\nsecret = \"{s}\"\n"
            );
            use std::io::Write;
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&out)
                .with_context(|| format!("creating {}", out.display()))?;
            f.write_all(text.as_bytes())?;
            eprintln!("wrote {} with key {kid}", out.display());
            Ok(())
        }
        Cmd::DevCert { out, name } => {
            let (pem, key) = (out.join("gateway.pem"), out.join("gateway.key"));
            if pem.exists() || key.exists() {
                eprintln!("{} exists; kept", pem.display());
                return Ok(());
            }
            std::fs::create_dir_all(&out)?;
            let k = rcgen::KeyPair::generate()?;
            let cert = rcgen::CertificateParams::new(name)?.self_signed(&k)?;
            std::fs::write(&pem, cert.pem())?;
            std::fs::write(&key, k.serialize_pem())?;
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600))?;
            eprintln!("wrote {} and {}", pem.display(), key.display());
            Ok(())
        }
        Cmd::Sign {
            keys,
            kid,
            base,
            advertiser_id,
            campaign_id,
            ad_id,
            click_id,
            user_id,
            cost_per_click,
            redirect_url,
            timestamp,
        } => {
            let text = std::fs::read_to_string(&keys)
                .with_context(|| format!("reading {}", keys.display()))?;
            let secret = secret_of(&text, &kid)
                .with_context(|| format!("{}: no key {kid:?}", keys.display()))?;
            let ts = timestamp.unwrap_or_else(|| gateway::clock::now_ms() / 1000);
            let click_id = click_id.unwrap_or_else(|| {
                let mut b = [0u8; 9];
                let _ = ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut b);
                wire::signed::B64.encode(b)
            });
            let click = wire::signed::Click {
                ad_id: &ad_id,
                advertiser_id: &advertiser_id,
                campaign_id: &campaign_id,
                click_id: &click_id,
                user_id: &user_id,
                cost_per_click: &cost_per_click,
                timestamp: ts,
                redirect_url: &redirect_url,
                kid: &kid,
            };
            println!("{base}?{}", click.signed_query(&secret));
            Ok(())
        }
    }
}

/// The secret of `kid` in a keys file (dev tooling; the server parses keys
/// with `token::KeyRing`).
fn secret_of(text: &str, kid: &str) -> Option<Vec<u8>> {
    let v: toml::Value = toml::from_str(text).ok()?;
    v.get("key")?.as_array()?.iter().find_map(|k| {
        if k.get("kid")?.as_str()? != kid {
            return None;
        }
        let s = k.get("secret")?.as_str()?.trim_end_matches('=');
        wire::signed::B64.decode(s).ok()
    })
}
