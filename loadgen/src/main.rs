//! `loadgen`: an open-loop (or closed-loop) HTTP/1.1 load generator on
//! io_uring, with a signed-click workload model and an exact-count oracle.
//!
//! ```text
//! loadgen run --target 127.0.0.1:8080 --keys keys.toml --cpus 0 --connections 64 \
//!             --duration 10 --rate 50000 --oracle oracle.json --json report.json
//! loadgen verify --oracle oracle.json --gateway-data ./data
//! ```

mod aggcheck;
mod engine;
mod oracle;
mod plot;
mod secure;
mod workload;

use std::collections::{BTreeMap, HashSet};
use std::io::IsTerminal;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use hdrhistogram::Histogram;
use serde::Serialize;

#[derive(Parser)]
#[command(version, about = "Clickgate load generator and exact-count oracle")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Send load and report latency, throughput and errors.
    Run(Box<RunArgs>),
    /// Compare oracle files with what the pipeline counted.
    Verify {
        /// What the runs against one gateway acknowledged: a file, or
        /// several separated by commas. Repeat, one per --gateway-data, in
        /// the same order.
        #[arg(long, required = true)]
        oracle: Vec<String>,
        /// A gateway data directory (counts what its logs hold); repeat for
        /// several gateways (PoPs): the aggregator must then bill each click
        /// once across all of them, once its minutes are reconciled.
        #[arg(long, required = true)]
        gateway_data: Vec<PathBuf>,
        /// The dedup horizon the rule across PoPs applies, seconds (the
        /// aggregator's reconcile.dedup_horizon_ms).
        #[arg(long, default_value_t = 900)]
        dedup_horizon_s: u32,
        /// The velocity rule across PoPs (the aggregator's
        /// reconcile.velocity_per_minute_max); 0: off.
        #[arg(long, default_value_t = 30)]
        velocity_per_minute_max: u32,
        /// Wait until every point is reconciled before comparing (always so
        /// with several gateways).
        #[arg(long)]
        reconciled: bool,
        /// Also write the comparison as JSON.
        #[arg(long)]
        json: Option<PathBuf>,
        /// The aggregator's HTTP address: also compare its per-minute clicks
        /// and spend with the logs, exactly.
        #[arg(long)]
        aggregator: Option<SocketAddr>,
        /// A query token that reads every advertiser (advertiser "*").
        #[arg(long, default_value = "")]
        token: String,
        /// Keep asking the aggregator (and ClickHouse) for up to this many
        /// seconds until it matches (it counts what the shipper has
        /// delivered so far).
        #[arg(long, default_value_t = 0.0)]
        wait_secs: f64,
        /// ClickHouse's HTTP address: also compare the final rows of the
        /// aggregator's sink table with the logs, exactly.
        #[arg(long)]
        clickhouse: Option<SocketAddr>,
        #[arg(long, default_value = "clickgate_minutes")]
        clickhouse_table: String,
        /// What a Kafka consumer read from the aggregator's sink topics
        /// (the JSON `kafka_read.py` prints): also compare its rows, highest
        /// revision per key, and its raw click events, one per event, with
        /// the logs, exactly.
        #[arg(long)]
        kafka_dump: Option<PathBuf>,
    },
    /// Open HTTP/3 connections, make one request on each, and hold them
    /// idle (to measure a server's memory per idle connection). Prints
    /// `open N` once all are up, then holds.
    Idle {
        #[arg(long, default_value = "127.0.0.1:8443")]
        target: SocketAddr,
        /// The server's CA certificate (PEM).
        #[arg(long)]
        ca: PathBuf,
        #[arg(long, default_value_t = 1000)]
        connections: usize,
        /// Seconds to hold them after all are open.
        #[arg(long, default_value_t = 10.0)]
        hold_s: f64,
    },
    /// Draw `.hgrm` files (from `run --hgrm`) side by side in one SVG
    /// percentile plot.
    Plot {
        /// Where the SVG goes.
        #[arg(long)]
        out: PathBuf,
        #[arg(long, default_value = "latency by percentile")]
        title: String,
        /// LABEL=FILE.hgrm, one per line drawn.
        #[arg(required = true)]
        series: Vec<String>,
    },
}

#[derive(Parser, Clone)]
struct RunArgs {
    /// Server address.
    #[arg(long, default_value = "127.0.0.1:8080")]
    target: SocketAddr,
    /// CPUs to run one worker on each, e.g. "0" or "0,1".
    #[arg(long, default_value = "0")]
    cpus: String,
    /// Connections in all (split across workers).
    #[arg(long, default_value_t = 64)]
    connections: usize,
    /// Measured seconds (after the warm-up).
    #[arg(long, default_value_t = 10.0)]
    duration: f64,
    /// Warm-up seconds (sent, not measured).
    #[arg(long, default_value_t = 1.0)]
    warmup: f64,
    /// Requests per second in all (open loop). Omit for closed loop.
    #[arg(long)]
    rate: Option<f64>,
    /// Stop after this many requests in all (warm-up included).
    #[arg(long)]
    requests: Option<u64>,
    /// A new connection per request instead of keep-alive.
    #[arg(long)]
    no_keepalive: bool,
    /// Spin between completions instead of sleeping (plain HTTP engine):
    /// the worker's core is always busy, and the server never pays to wake
    /// it. On loopback, an answer to a sleeping client costs the server's
    /// core the wakeup of another core (an IPI, a VM exit on a VM), which a
    /// remote client never costs it: `bench/hostile` runs its attacking
    /// loadgens this way.
    #[arg(long)]
    busy_poll: bool,
    /// A request with no answer after this long counts as a timeout, ms.
    #[arg(long, default_value_t = 5000)]
    timeout_ms: u64,
    /// Gateway keys file to sign with; without it, requests carry signatures
    /// no gateway accepts (fine for peers that do not verify).
    #[arg(long)]
    keys: Option<PathBuf>,
    #[arg(long, default_value = "k1")]
    kid: String,
    /// Distinct requests generated per worker (cycled; a repeat is a duplicate).
    #[arg(long, default_value_t = 200_000)]
    pool: usize,
    #[arg(long, default_value_t = 10)]
    advertisers: u32,
    #[arg(long, default_value_t = 5)]
    campaigns: u32,
    #[arg(long, default_value_t = 20)]
    ads: u32,
    /// Zipf exponent of ad popularity (1.0+: a few hot ads).
    #[arg(long, default_value_t = 1.1)]
    zipf: f64,
    #[arg(long, default_value_t = 0.0)]
    dup_rate: f64,
    #[arg(long, default_value_t = 0.0)]
    bad_sig_rate: f64,
    #[arg(long, default_value_t = 0.0)]
    expired_rate: f64,
    #[arg(long, default_value_t = 0.0)]
    unknown_kid_rate: f64,
    /// Share of valid clicks sent as batched events with an old timestamp.
    #[arg(long, default_value_t = 0.0)]
    late_rate: f64,
    #[arg(long, default_value_t = 7200)]
    late_age_s: i64,
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Write the oracle (acknowledged click ids) here.
    #[arg(long)]
    oracle: Option<PathBuf>,
    /// Write the report as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
    /// A label for the report (and the plot's legend).
    #[arg(long, default_value = "")]
    label: String,
    /// Write the latency distribution here in HdrHistogram's percentile
    /// text format (`.hgrm`, milliseconds; HdrHistogram's plotter reads it).
    #[arg(long)]
    hgrm: Option<PathBuf>,
    /// Write an SVG percentile plot of the latency here.
    #[arg(long)]
    svg: Option<PathBuf>,
    /// http (plain HTTP/1.1, the io_uring engine), https (HTTP/1.1 over
    /// TLS) or h3 (HTTP/3 over QUIC).
    #[arg(long, default_value = "http")]
    proto: String,
    /// PEM certificate(s) to trust for https and h3 (the server's
    /// self-signed certificate, or its CA).
    #[arg(long)]
    ca: Option<PathBuf>,
    /// Server name for TLS (SNI and certificate check).
    #[arg(long, default_value = "localhost")]
    sni: String,
    /// TLS session resumption (tickets, session ids) for https and h3: on or
    /// off. Matters with --no-keepalive, where every request handshakes.
    #[arg(long, default_value = "on")]
    tls_resumption: String,
    /// h3 with resumption: send requests in 0-RTT early data once a ticket
    /// allows (with --no-keepalive, every connection after the first).
    #[arg(long)]
    zero_rtt: bool,
    /// h3: every this many milliseconds, move each worker's connections to a
    /// new local port (a NAT rebinding), so that the server sees them
    /// migrate. 0: never.
    #[arg(long, default_value_t = 0)]
    rebind_every_ms: u64,
}

#[derive(Serialize)]
struct Report {
    label: String,
    target: String,
    mode: &'static str,
    workers: usize,
    connections: usize,
    keepalive: bool,
    duration_s: f64,
    requested_rate: Option<f64>,
    achieved_rate: f64,
    measured_requests: u64,
    measured_completed: u64,
    latency_us: BTreeMap<String, f64>,
    statuses: BTreeMap<u16, u64>,
    errors_connect: u64,
    errors_timeout: u64,
    errors_reset: u64,
    /// CPU time the workers spent sending and receiving (warm-up
    /// included), not signing the pool before it, seconds.
    run_cpu_s: f64,
}

/// This thread's CPU time, seconds (the scheduler's exact figure).
fn thread_cpu_s() -> f64 {
    let mut t = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: passes a pointer to a live timespec.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut t) };
    t.tv_sec as f64 + t.tv_nsec as f64 / 1e9
}

fn main() {
    if let Err(e) = real_main() {
        eprintln!("error: {e:#}");
        std::process::exit(2);
    }
}

fn real_main() -> anyhow::Result<()> {
    match Cli::parse().cmd {
        Cmd::Run(a) => run(*a),
        Cmd::Idle {
            target,
            ca,
            connections,
            hold_s,
        } => secure::idle(target, &ca, connections, Duration::from_secs_f64(hold_s)),
        Cmd::Plot { out, title, series } => {
            let mut hists = Vec::new();
            for s in &series {
                let (label, file) = s
                    .split_once('=')
                    .with_context(|| format!("{s}: give LABEL=FILE.hgrm"))?;
                let text =
                    std::fs::read_to_string(file).with_context(|| format!("reading {file}"))?;
                let h = plot::read_hgrm(&text).map_err(|e| anyhow::anyhow!("{file}: {e}"))?;
                hists.push((label.to_string(), h));
            }
            let refs: Vec<(String, &hdrhistogram::Histogram<u64>)> =
                hists.iter().map(|(l, h)| (l.clone(), h)).collect();
            std::fs::write(&out, plot::svg(&title, &refs))
                .with_context(|| format!("writing {}", out.display()))?;
            Ok(())
        }
        Cmd::Verify {
            oracle,
            gateway_data,
            dedup_horizon_s,
            velocity_per_minute_max,
            reconciled,
            json,
            aggregator,
            token,
            wait_secs,
            clickhouse,
            clickhouse_table,
            kafka_dump,
        } => {
            anyhow::ensure!(
                oracle.len() == gateway_data.len(),
                "one --oracle per --gateway-data"
            );
            let mut ok = true;
            let mut records = Vec::new();
            for (files, data) in oracle.iter().zip(&gateway_data) {
                let mut o = oracle::Oracle::default();
                for f in files.split(',') {
                    let one: oracle::Oracle = serde_json::from_slice(
                        &std::fs::read(f).with_context(|| format!("reading {f}"))?,
                    )?;
                    o.merge(one);
                }
                if gateway_data.len() > 1 {
                    println!("gateway {}:", data.display());
                }
                ok &= verify_one(&o, data, json.as_deref())?;
                records.extend(oracle::read_click_records(data)?);
            }
            let expected = oracle::billed_across_pops(
                &records,
                dedup_horizon_s.div_ceil(60),
                velocity_per_minute_max,
            );
            let reconciled = reconciled || gateway_data.len() > 1;
            if let Some(addr) = aggregator {
                ok &= verify_totals("aggregator", &expected, wait_secs, |e| {
                    let (got, open) = aggcheck::fetch_states(addr, &token, e)?;
                    Ok((got, if reconciled { open } else { 0 }))
                })?;
            }
            if let Some(addr) = clickhouse {
                ok &= verify_totals("clickhouse", &expected, wait_secs, |_| {
                    Ok((aggcheck::fetch_clickhouse(addr, &clickhouse_table)?, 0))
                })?;
            }
            if let Some(p) = kafka_dump {
                let dump: serde_json::Value = serde_json::from_slice(
                    &std::fs::read(&p).with_context(|| format!("reading {}", p.display()))?,
                )?;
                ok &= verify_totals("kafka rows", &expected, 0.0, |_| {
                    Ok((aggcheck::kafka_totals(&dump)?, 0))
                })?;
                let v = aggcheck::kafka_events(&dump, &records)?;
                println!(
                    "kafka events: expected {}  found {}  missing {}  unexpected {}  wrong keys {}  every advertiser on one partition {}",
                    v.expected, v.found, v.missing.len(), v.unexpected.len(), v.wrong_keys.len(), v.partitions_ok
                );
                for (what, ids) in [
                    ("missing", &v.missing),
                    ("unexpected", &v.unexpected),
                    ("wrong key", &v.wrong_keys),
                ] {
                    for id in ids.iter().take(10) {
                        println!("  {what}: {id}");
                    }
                }
                ok &= v.ok();
            }
            if ok {
                println!("verify: OK (exact)");
                Ok(())
            } else {
                println!("verify: FAILED");
                std::process::exit(1);
            }
        }
    }
}

/// Compares one gateway's log with the oracle of the run that sent to it:
/// every acknowledged click logged once, nothing else.
fn verify_one(
    o: &oracle::Oracle,
    data: &std::path::Path,
    json: Option<&std::path::Path>,
) -> anyhow::Result<bool> {
    {
        {
            let counted = oracle::read_gateway_log(data)?;
            let v = oracle::compare(o, &counted);
            println!(
                "expected {}  counted {}  missing {}  duplicated {}  unexpected {}  mismatched {}  wrong_answers {}  unknown_outcome(counted {}, not {})",
                v.expected,
                v.counted,
                v.missing.len(),
                v.duplicated.len(),
                v.unexpected.len(),
                v.mismatched.len(),
                v.wrong_answers,
                v.unknown_outcome_counted,
                v.unknown_outcome_not_counted
            );
            for (what, ids) in [
                ("missing", &v.missing),
                ("duplicated", &v.duplicated),
                ("unexpected", &v.unexpected),
                ("mismatched", &v.mismatched),
            ] {
                for id in ids.iter().take(10) {
                    println!("  {what}: {id}");
                }
            }
            for (k, n) in &o.wrong_answers {
                println!("  wrong answer: {k}: {n}");
            }
            if let Some(p) = json {
                std::fs::write(p, serde_json::to_vec_pretty(&v)?)?;
            }
            Ok(v.ok())
        }
    }
}

/// Compares totals read by `fetch` (the aggregator's, ClickHouse's, with
/// how many points are still to be reconciled) with what the logs say must
/// be billed, until equal (and reconciled) or out of time.
fn verify_totals(
    what: &str,
    expected: &aggcheck::Totals,
    wait_secs: f64,
    fetch: impl Fn(&aggcheck::Totals) -> anyhow::Result<(aggcheck::Totals, u64)>,
) -> anyhow::Result<bool> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs_f64(wait_secs);
    loop {
        let (got, open) = fetch(expected)?;
        let d = aggcheck::diff(expected, &got);
        let sum = |t: &aggcheck::Totals| t.values().fold((0, 0), |a, v| (a.0 + v.0, a.1 + v.1));
        if (d.is_empty() && open == 0) || std::time::Instant::now() >= deadline {
            let (ec, es) = sum(expected);
            let (gc, gs) = sum(&got);
            println!(
                "{what}: expected clicks {ec} spend_micros {es}  counted clicks {gc} spend_micros {gs}  differing (advertiser, ad, minute) {}  points not reconciled {open}",
                d.len()
            );
            for ((adv, ad, m), e, g) in d.iter().take(10) {
                println!("  {adv}/{ad} minute {m}: expected {e:?} counted {g:?}");
            }
            return Ok(d.is_empty() && open == 0);
        }
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
}

fn run(a: RunArgs) -> anyhow::Result<()> {
    let cpus: Vec<usize> = a
        .cpus
        .split(',')
        .map(|c| c.trim().parse())
        .collect::<Result<_, _>>()
        .context("--cpus: a list like 0 or 0,1")?;
    let workers = cpus.len();
    anyhow::ensure!(
        a.connections >= workers,
        "--connections must be at least the number of workers"
    );
    // Output paths are opened before any load is sent: a path that cannot
    // be written fails now, named, not after the run.
    let mut plot_files = Vec::new();
    for p in [&a.hgrm, &a.svg].into_iter().flatten() {
        let f =
            std::fs::File::create(p).with_context(|| format!("cannot write {}", p.display()))?;
        plot_files.push(f);
    }
    let secret = match &a.keys {
        Some(p) => workload::secret_from_keys_file(p, &a.kid)?,
        None => vec![0x55; 32],
    };
    let model = workload::Model {
        host: a.target.to_string(),
        kid: a.kid.clone(),
        secret,
        advertisers: a.advertisers,
        campaigns_per_advertiser: a.campaigns,
        ads_per_campaign: a.ads,
        zipf_s: a.zipf,
        dup_rate: a.dup_rate,
        bad_sig_rate: a.bad_sig_rate,
        expired_rate: a.expired_rate,
        unknown_kid_rate: a.unknown_kid_rate,
        late_rate: a.late_rate,
        late_age_s: a.late_age_s,
        seed: a.seed,
    };
    let now_s = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_secs() as i64;
    let record = a.oracle.is_some();
    let secure = match a.proto.as_str() {
        "http" => None,
        p @ ("https" | "h3") => {
            let ca = a.ca.as_deref().context("--ca is needed for https and h3")?;
            let resumption = match a.tls_resumption.as_str() {
                "on" => true,
                "off" => false,
                _ => anyhow::bail!("--tls-resumption: on or off"),
            };
            let (proto, alpn): (_, &[u8]) = if p == "h3" {
                (secure::Proto::H3, b"h3")
            } else {
                (secure::Proto::Https, b"http/1.1")
            };
            anyhow::ensure!(
                !a.zero_rtt || (p == "h3" && resumption),
                "--zero-rtt needs --proto h3 and --tls-resumption on"
            );
            anyhow::ensure!(
                a.rebind_every_ms == 0 || p == "h3",
                "--rebind-every-ms needs --proto h3"
            );
            Some(secure::Secure {
                proto,
                zero_rtt: a.zero_rtt,
                rebind_every: (a.rebind_every_ms > 0)
                    .then(|| std::time::Duration::from_millis(a.rebind_every_ms)),
                tls: secure::client_config(ca, alpn, resumption, a.zero_rtt)?,
                server_name: rustls::pki_types::ServerName::try_from(a.sni.clone())
                    .context("--sni")?,
            })
        }
        _ => anyhow::bail!("--proto: http, https or h3"),
    };
    // A live line on a terminal (none when stderr is a file or a pipe).
    let progress: Vec<std::sync::Arc<engine::Progress>> = if std::io::stderr().is_terminal() {
        cpus.iter().map(|_| Default::default()).collect()
    } else {
        Vec::new()
    };
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let printer = (!progress.is_empty()).then(|| {
        let (progress, done) = (progress.clone(), done.clone());
        std::thread::spawn(move || live_line(&progress, &done))
    });
    let handles: Vec<_> = cpus
        .iter()
        .enumerate()
        .map(|(w, &cpu)| {
            let progress = progress.get(w).cloned();
            let model = model.clone();
            let a = a.clone();
            let secure = secure.clone();
            std::thread::spawn(
                move || -> anyhow::Result<(workload::Pool, engine::WorkerResult)> {
                    core_affinity::set_for_current(core_affinity::CoreId { id: cpu });
                    let pool = model.generate(a.pool, w, now_s);
                    let conns = a.connections / workers + usize::from(w < a.connections % workers);
                    let plan = engine::Plan {
                        addr: a.target,
                        connections: conns,
                        rate_per_s: a.rate.map(|r| r / workers as f64),
                        warmup: Duration::from_secs_f64(a.warmup),
                        duration: Duration::from_secs_f64(a.duration),
                        keepalive: !a.no_keepalive,
                        busy_poll: a.busy_poll,
                        timeout: Duration::from_millis(a.timeout_ms),
                        requests_max: a.requests.map(|r| {
                            r / workers as u64 + u64::from((w as u64) < r % workers as u64)
                        }),
                        record_answers: record,
                        progress,
                    };
                    let cpu0 = thread_cpu_s();
                    let mut r = match &secure {
                        None => engine::run_worker(&plan, &pool.requests)?,
                        Some(s) => secure::run_worker(&plan, &pool.requests, s)?,
                    };
                    r.cpu_s = thread_cpu_s() - cpu0;
                    Ok((pool, r))
                },
            )
        })
        .collect();
    let mut hist = Histogram::<u64>::new_with_bounds(1_000, 60_000_000_000, 3)?;
    let mut statuses = BTreeMap::new();
    let (mut mreq, mut mdone, mut ec, mut et, mut er) = (0, 0, 0, 0, 0);
    let mut cpu_s = 0.0;
    let mut orc = oracle::Oracle::default();
    let mut unknown = HashSet::new();
    for h in handles {
        let (pool, r) = h.join().map_err(|_| anyhow::anyhow!("worker panicked"))??;
        hist.add(&r.hist)?;
        for (s, n) in r.statuses {
            *statuses.entry(s).or_insert(0) += n;
        }
        cpu_s += r.cpu_s;
        mreq += r.measured_requests;
        mdone += r.measured_completed;
        ec += r.errors.connect;
        et += r.errors.timeout;
        er += r.errors.reset;
        for (idx, ans) in &r.answers {
            orc.record(&pool.meta[*idx as usize], *ans, &mut unknown);
        }
    }
    done.store(true, std::sync::atomic::Ordering::Relaxed);
    if let Some(p) = printer {
        let _ = p.join();
    }
    orc.finish(unknown);
    let q = |p: f64| hist.value_at_quantile(p) as f64 / 1000.0;
    let mut lat = BTreeMap::new();
    for (k, p) in [
        ("p50", 0.5),
        ("p90", 0.9),
        ("p99", 0.99),
        ("p99.9", 0.999),
        ("p99.99", 0.9999),
    ] {
        lat.insert(k.to_string(), q(p));
    }
    lat.insert("max".into(), hist.max() as f64 / 1000.0);
    lat.insert("mean".into(), hist.mean() / 1000.0);
    let report = Report {
        label: a.label.clone(),
        target: a.target.to_string(),
        mode: if a.rate.is_some() { "open" } else { "closed" },
        workers,
        connections: a.connections,
        keepalive: !a.no_keepalive,
        duration_s: a.duration,
        requested_rate: a.rate,
        achieved_rate: mdone as f64 / a.duration,
        measured_requests: mreq,
        measured_completed: mdone,
        latency_us: lat,
        statuses,
        errors_connect: ec,
        errors_timeout: et,
        errors_reset: er,
        run_cpu_s: cpu_s,
    };
    print_report(&report);
    let mut files = plot_files.into_iter();
    if let Some(p) = &a.hgrm {
        use std::io::Write;
        files
            .next()
            .unwrap()
            .write_all(plot::hgrm(&hist).as_bytes())
            .with_context(|| format!("writing {}", p.display()))?;
    }
    if let Some(p) = &a.svg {
        use std::io::Write;
        let label = if a.label.is_empty() {
            a.target.to_string()
        } else {
            a.label.clone()
        };
        let title = format!(
            "{} {}",
            report.mode,
            match a.rate {
                Some(r) => format!("loop at {r:.0}/s"),
                None => "loop".into(),
            }
        );
        files
            .next()
            .unwrap()
            .write_all(plot::svg(&title, &[(label, &hist)]).as_bytes())
            .with_context(|| format!("writing {}", p.display()))?;
    }
    if let Some(p) = &a.json {
        std::fs::write(p, serde_json::to_vec_pretty(&report)?)?;
    }
    if let Some(p) = &a.oracle {
        std::fs::write(p, serde_json::to_vec(&orc)?)?;
        println!(
            "oracle: {} acknowledged click ids, {} unknown outcomes, {} wrong answers -> {}",
            orc.acknowledged.len(),
            orc.unknown.len(),
            orc.wrong_answers.values().sum::<u64>(),
            p.display()
        );
    }
    Ok(())
}

/// Once a second until `done`: the rate sent and answered over the last
/// second, errors so far and the worst worker's p99 so far, on one line
/// rewritten in place.
fn live_line(progress: &[std::sync::Arc<engine::Progress>], done: &std::sync::atomic::AtomicBool) {
    use std::sync::atomic::Ordering::Relaxed;
    let t0 = std::time::Instant::now();
    let (mut sent0, mut answered0) = (0u64, 0u64);
    let mut last = t0;
    while !done.load(Relaxed) {
        std::thread::sleep(Duration::from_millis(100));
        if last.elapsed() < Duration::from_secs(1) {
            continue;
        }
        let dt = last.elapsed().as_secs_f64();
        last = std::time::Instant::now();
        let sum = |f: fn(&engine::Progress) -> &std::sync::atomic::AtomicU64| -> u64 {
            progress.iter().map(|p| f(p).load(Relaxed)).sum()
        };
        let (sent, answered, errors) = (sum(|p| &p.sent), sum(|p| &p.answered), sum(|p| &p.errors));
        let p99 = progress
            .iter()
            .map(|p| p.p99_ns.load(Relaxed))
            .max()
            .unwrap_or(0);
        eprint!(
            "\r{:>5.0} s  sent {:>8.0}/s  answered {:>8.0}/s  errors {errors}  p99 so far {:.3} ms   ",
            t0.elapsed().as_secs_f64(),
            (sent - sent0.min(sent)) as f64 / dt,
            (answered - answered0.min(answered)) as f64 / dt,
            p99 as f64 / 1e6
        );
        (sent0, answered0) = (sent, answered);
    }
    eprintln!();
}

fn print_report(r: &Report) {
    println!(
        "{} loop, {} worker(s), {} connections{}, {:.1} s measured{}",
        r.mode,
        r.workers,
        r.connections,
        if r.keepalive {
            ""
        } else {
            " (new connection per request)"
        },
        r.duration_s,
        if r.label.is_empty() {
            String::new()
        } else {
            format!(" [{}]", r.label)
        }
    );
    match r.requested_rate {
        Some(rr) => println!(
            "rate: requested {rr:.0}/s, achieved {:.0}/s",
            r.achieved_rate
        ),
        None => println!("rate: achieved {:.0}/s", r.achieved_rate),
    }
    println!("| p50 | p90 | p99 | p99.9 | p99.99 | max | (us)");
    println!("|---|---|---|---|---|---|");
    let l = |k: &str| r.latency_us.get(k).copied().unwrap_or(0.0);
    println!(
        "| {:.0} | {:.0} | {:.0} | {:.0} | {:.0} | {:.0} |",
        l("p50"),
        l("p90"),
        l("p99"),
        l("p99.9"),
        l("p99.99"),
        l("max")
    );
    let st: Vec<String> = r.statuses.iter().map(|(s, n)| format!("{s}={n}")).collect();
    println!(
        "statuses: {}  errors: connect={} timeout={} reset={}  measured {} of {} completed",
        st.join(" "),
        r.errors_connect,
        r.errors_timeout,
        r.errors_reset,
        r.measured_completed,
        r.measured_requests
    );
}
