//! The end-to-end test: gateway, shipper and aggregator as separate processes,
//! loadgen driving signed traffic with duplicates, invalid and late events,
//! and `loadgen verify` checking that the aggregator's query API counts
//! exactly what was acknowledged: once cleanly, once while the three are
//! killed with SIGKILL at random moments and restarted.

use std::ffi::OsString;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

mod common;

use common::{bin, free_port, free_udp_port};
use test_support::clickhouse::ClickHouse;
use test_support::kafka::Tansu;
use test_support::process::Proc;

struct Pipeline {
    dir: tempfile::TempDir,
    gateway_addr: String,
    agg_http: String,
    /// Reads every advertiser.
    token: String,
    /// Reads adv-0 only.
    adv0_token: String,
    /// AGG, GW, SHIP, and AGG2 with two aggregators.
    procs: Vec<Proc>,
    /// The second aggregator's query API, with two aggregators.
    agg2_http: Option<String>,
    /// The ClickHouse server the aggregator's sink writes to, if any.
    clickhouse: Option<ClickHouse>,
    /// The Kafka-protocol broker the aggregator's Kafka sink writes to, if any.
    kafka: Option<Tansu>,
}

const AGG: usize = 0;
const GW: usize = 1;
const SHIP: usize = 2;
const AGG2: usize = 3;

impl Pipeline {
    fn new() -> Pipeline {
        Self::build(&[], None)
    }

    /// With the aggregator's ClickHouse sink on a private server; None when
    /// no ClickHouse server can be had.
    fn with_clickhouse(envs: &[(usize, &str, &str)]) -> Option<Pipeline> {
        let ch = ClickHouse::start()?;
        Some(Self::build_with(envs, None, Some(ch), None, false, ""))
    }

    /// With the aggregator's Kafka sink on a private broker (and
    /// kafka-python to read it back); None when either cannot be had.
    fn with_kafka(envs: &[(usize, &str, &str)]) -> Option<Pipeline> {
        if !test_support::kafka::ensure_reader() {
            eprintln!("SKIPPED: kafka-python cannot be installed");
            return None;
        }
        let broker = Tansu::start()?;
        Some(Self::build_with(envs, None, None, Some(broker), false, ""))
    }

    /// With environment variables for the gateway (fault injection).
    fn with_gateway_env(gateway_env: &[(&str, &str)]) -> Pipeline {
        let envs: Vec<(usize, &str, &str)> =
            gateway_env.iter().map(|(k, v)| (GW, *k, *v)).collect();
        Self::build(&envs, None)
    }

    /// With the shipper sending through a fault proxy to the aggregator.
    fn through_proxy() -> (Pipeline, Proxy) {
        let mut proxy = None;
        let pl = Self::build(&[], Some(&mut proxy));
        (pl, proxy.unwrap())
    }

    /// `envs`: (process, variable, value) for each process's first start.
    fn build(envs: &[(usize, &str, &str)], proxy: Option<&mut Option<Proxy>>) -> Pipeline {
        Self::build_with(envs, proxy, None, None, false, "")
    }

    /// `two_aggregators`: instances agg-a (AGG) and agg-b (AGG2), the
    /// advertisers partitioned between them, the shipper sending to both.
    /// `gateway_extra`: TOML tables appended to the gateway's config.
    fn build_with(
        envs: &[(usize, &str, &str)],
        proxy: Option<&mut Option<Proxy>>,
        clickhouse: Option<ClickHouse>,
        kafka: Option<Tansu>,
        two_aggregators: bool,
        gateway_extra: &str,
    ) -> Pipeline {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().to_owned();
        let agg_bin = bin("clickgate-aggregator");
        let gw_bin = bin("clickgate-gateway");
        let ship_bin = bin("clickgate-shipper");
        let run = |b: &Path, args: &[&str]| {
            let out = Command::new(b).args(args).output().unwrap();
            assert!(out.status.success(), "{args:?}: {:?}", out);
        };
        let p = |x: &str| d.join(x).to_str().unwrap().to_owned();
        run(
            &gw_bin,
            &["keygen", "--kid", "k1", "--out", &p("keys.toml")],
        );
        run(
            &agg_bin,
            &["dev-certs", "--out", &p("certs"), "--gateway", "e2e"],
        );
        run(
            &agg_bin,
            &[
                "dev-tokens",
                "--out",
                &p("tokens.toml"),
                "--advertiser",
                "adv-0",
            ],
        );
        let tokens = std::fs::read_to_string(d.join("tokens.toml")).unwrap();
        // [[token]] advertiser_id = "..." then token = "...".
        let token_of = |adv: &str| {
            let mut lines = tokens.lines();
            lines
                .find(|l| *l == format!("advertiser_id = \"{adv}\""))
                .unwrap();
            lines
                .next()
                .and_then(|l| l.strip_prefix("token = \""))
                .unwrap()
                .trim_end_matches('"')
                .to_owned()
        };
        let token = token_of("*");
        let adv0_token = token_of("adv-0");
        let gateway_addr = format!("127.0.0.1:{}", free_port());
        let agg_http = format!("127.0.0.1:{}", free_port());
        let agg_quic = format!("127.0.0.1:{}", free_udp_port());
        // Where the shipper sends: the aggregator, or a fault proxy to it.
        let ship_to = match proxy {
            Some(slot) => {
                let p = Proxy::start(agg_quic.parse().unwrap());
                let a = p.addr.to_string();
                *slot = Some(p);
                a
            }
            None => agg_quic.clone(),
        };
        let ship_metrics = format!("127.0.0.1:{}", free_port());
        std::fs::write(
            d.join("gateway.toml"),
            format!(
                "gateway_id = \"e2e\"\ndata_dir = {:?}\nkeys_file = {:?}\ncpus = [0, 1]\n\
                 [listen]\nhttp = \"{gateway_addr}\"\n[aggregate]\nflush_interval_ms = 200\n\
                 [durability]\nmode = \"{}\"\n{gateway_extra}\n",
                p("data"),
                p("keys.toml"),
                // The long profile runs both modes (E2E_DURABILITY=process).
                std::env::var("E2E_DURABILITY").unwrap_or_else(|_| "sync".into())
            ),
        )
        .unwrap();
        let os = |v: &[&str]| v.iter().map(OsString::from).collect::<Vec<_>>();
        let (agg2_http, agg2_quic) = (
            format!("127.0.0.1:{}", free_port()),
            format!("127.0.0.1:{}", free_udp_port()),
        );
        let agg_args = |store: &str, quic: &str, http: &str, id: &str| {
            let mut a = os(&[
                "run",
                "--store",
                &p(store),
                "--certs",
                &p("certs"),
                "--tokens",
                &p("tokens.toml"),
                "--listen-quic",
                quic,
                "--listen-http",
                http,
            ]);
            if let Some(ch) = &clickhouse {
                a.push("--clickhouse".into());
                a.push(format!("http://{}", ch.addr()).into());
            }
            if let Some(k) = &kafka {
                let cfg = d.join("aggregator-kafka.toml");
                std::fs::write(
                    &cfg,
                    format!(
                        "[kafka]\nbootstrap = [\"{}\"]\npartitions = 4\nreplication_factor = 1\n\
                         flush_interval_ms = 100\ntimeout_ms = 3000\n",
                        k.addr()
                    ),
                )
                .unwrap();
                a.push("--config".into());
                a.push(cfg.into());
            }
            if two_aggregators {
                a.extend(os(&[
                    "--instance-id",
                    id,
                    "--instance",
                    &format!("agg-a={agg_http}"),
                    "--instance",
                    &format!("agg-b={agg2_http}"),
                ]));
            }
            a
        };
        let ship_targets = if two_aggregators {
            os(&[
                "--instance",
                &format!("agg-a={ship_to}"),
                "--instance",
                &format!("agg-b={agg2_quic}"),
            ])
        } else {
            os(&["--aggregator", &ship_to])
        };
        let mut procs = vec![
            Proc::new(
                "aggregator",
                agg_bin.clone(),
                agg_args("agg/store.redb", &agg_quic, &agg_http, "agg-a"),
                d.join("aggregator.log"),
                (agg_http.clone(), "/readyz"),
            ),
            Proc::new(
                "gateway",
                gw_bin,
                os(&["run", "--config", &p("gateway.toml")]),
                d.join("gateway.log"),
                (gateway_addr.clone(), "/readyz"),
            ),
            Proc::new(
                "shipper",
                ship_bin,
                [
                    os(&["run", "--data-dir", &p("data"), "--certs", &p("certs")]),
                    os(&["--metrics-listen", &ship_metrics]),
                    ship_targets,
                ]
                .concat(),
                d.join("shipper.log"),
                (ship_metrics.clone(), "/healthz"),
            ),
        ];
        if two_aggregators {
            procs.push(Proc::new(
                "aggregator-b",
                agg_bin,
                agg_args("agg2/store.redb", &agg2_quic, &agg2_http, "agg-b"),
                d.join("aggregator-b.log"),
                (agg2_http.clone(), "/readyz"),
            ));
        }
        let mut pl = Pipeline {
            dir,
            gateway_addr,
            agg_http,
            token,
            adv0_token,
            procs,
            agg2_http: two_aggregators.then_some(agg2_http),
            clickhouse,
            kafka,
        };
        for (i, k, v) in envs {
            pl.procs[*i].env.push((k.to_string(), v.to_string()));
        }
        for p in pl.procs.iter_mut() {
            p.start();
        }
        pl
    }

    fn path(&self, x: &str) -> PathBuf {
        self.dir.path().join(x)
    }

    fn loadgen(&self, oracle: &str, extra: &[&str]) -> Command {
        let mut c = Command::new(env!("CARGO_BIN_EXE_loadgen"));
        c.args(["run", "--target", &self.gateway_addr, "--cpus", "0"])
            .args(["--warmup", "0", "--timeout-ms", "2000"])
            .args(["--dup-rate", "0.1", "--bad-sig-rate", "0.05"])
            .args(["--expired-rate", "0.05", "--unknown-kid-rate", "0.05"])
            // Late batched events: hours old, inside the 24 h correction horizon.
            .args(["--late-rate", "0.05", "--late-age-s", "7200"])
            .arg("--keys")
            .arg(self.path("keys.toml"))
            .arg("--oracle")
            .arg(self.path(oracle))
            .args(extra);
        c
    }

    /// `loadgen verify` against the logs and the aggregator; its stdout.
    fn verify(&self, oracle: &str) -> (bool, String) {
        self.verify_at(oracle, &self.agg_http)
    }

    /// As [`Self::verify`], asking the aggregator at `agg_http`.
    fn verify_at(&self, oracle: &str, agg_http: &str) -> (bool, String) {
        let out = Command::new(env!("CARGO_BIN_EXE_loadgen"))
            .arg("verify")
            .arg("--oracle")
            .arg(self.path(oracle))
            .arg("--gateway-data")
            .arg(self.path("data"))
            .args(["--aggregator", agg_http, "--token", &self.token])
            .args(["--wait-secs", "60"])
            .args(
                self.clickhouse
                    .iter()
                    .flat_map(|c| ["--clickhouse".to_string(), c.addr()]),
            )
            .output()
            .unwrap();
        (
            out.status.success(),
            format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
        )
    }

    fn logs(&self) -> String {
        self.procs
            .iter()
            .map(|p| format!("--- {} ---\n{}", p.name, p.log_text()))
            .collect()
    }
}

impl Drop for Pipeline {
    fn drop(&mut self) {
        for p in self.procs.iter_mut() {
            p.kill9();
        }
    }
}

/// The clicks the aggregator was expected to count, from verify's output.
fn expected_clicks(text: &str) -> u64 {
    let line = text
        .lines()
        .find(|l| l.starts_with("aggregator: expected clicks"))
        .unwrap_or_else(|| panic!("no aggregator line:\n{text}"));
    line.split_whitespace().nth(3).unwrap().parse().unwrap()
}

#[test]
fn aggregator_counts_exactly_what_was_acknowledged_through_kills() {
    let mut pl = Pipeline::new();

    // Pass 1: nothing fails.
    let out = pl
        .loadgen(
            "oracle1.json",
            &["--connections", "8", "--requests", "3000"],
        )
        .args(["--duration", "30", "--pool", "3000", "--seed", "11"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let (ok, text) = pl.verify("oracle1.json");
    assert!(ok, "{text}\n{}", pl.logs());
    let clean = expected_clicks(&text);
    // Every click comes from 127.0.0.1, so the host's velocity limit flags
    // the hot ads' clicks beyond 30 a minute: fewer than half of the 3 000
    // sent are billable.
    assert!(clean > 1000, "{text}");
    // The shipper tells the gateway how far its log is at the aggregator,
    // once raw events (sent in batches of up to 2 s) caught up too.
    for shard in 0..2 {
        let dir = pl.path("data").join(format!("shard-{shard}"));
        let t = Instant::now();
        while wire::layout::read_shipped(&dir).unwrap_or(0) == 0 {
            assert!(
                t.elapsed() < Duration::from_secs(15),
                "shard {shard}: nothing marked shipped"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    for i in [SHIP, GW, AGG] {
        pl.procs[i].stop();
    }

    // Pass 2, on a fresh pipeline (the oracle is per run): open loop while
    // each process is killed -9 at random moments and restarted. The long
    // profile (scripts/fault-suite --long) sets E2E_KILL_SECS and E2E_RATE.
    let env = |k: &str, d: u64| {
        std::env::var(k)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(d)
    };
    let kill_secs = env("E2E_KILL_SECS", 10);
    let rate = env("E2E_RATE", 400);
    let load_secs = kill_secs + 2;
    let mut pl = Pipeline::new();
    let lg = pl
        .loadgen(
            "oracle2.json",
            &["--connections", "16", "--rate", &rate.to_string()],
        )
        .args(["--duration", &load_secs.to_string()])
        .args(["--pool", &(rate * load_secs).to_string(), "--seed", "12"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64;
    eprintln!("kill schedule seed {seed}");
    let mut rng = seed | 1;
    let mut next = move |n: u64| {
        // xorshift: a reproducible schedule from the printed seed.
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng % n
    };
    // The long profile asks for at least this many kills of each process.
    let kills_min = env("E2E_KILLS_MIN", 1) as u32;
    let t = Instant::now();
    let mut killed = [0u32; 3];
    let mut order = [AGG, GW, SHIP];
    let mut round = 0;
    while t.elapsed() < Duration::from_secs(kill_secs) {
        std::thread::sleep(Duration::from_millis(300 + next(1200)));
        // The victims come three at a time in a fresh random order (every
        // process equally often, whatever the run's length); the moments
        // stay random.
        if round % 3 == 0 {
            for i in (1..3).rev() {
                order.swap(i, next(i as u64 + 1) as usize);
            }
        }
        let victim = order[round % 3];
        round += 1;
        pl.procs[victim].kill9();
        killed[victim] += 1;
        std::thread::sleep(Duration::from_millis(50 + next(400)));
        pl.procs[victim].start();
    }
    let out = lg.wait_with_output().unwrap();
    assert!(out.status.success(), "{out:?}");
    assert!(
        killed.iter().all(|&k| k >= kills_min.max(1)),
        "kills {killed:?}, at least {kills_min} of each asked for: raise E2E_KILL_SECS"
    );
    let (ok, text) = pl.verify("oracle2.json");
    assert!(
        ok,
        "kills {killed:?} (seed {seed})\n{text}\n{}\nloadgen: {}",
        pl.logs(),
        String::from_utf8_lossy(&out.stdout)
    );
    let through_kills = expected_clicks(&text);
    assert!(through_kills > 1000, "{text}");
    eprintln!("clean pass: {clean} clicks; through kills {killed:?}:\n{text}");
    // One line for scripts/fault-suite.
    let verdicts = text
        .lines()
        .find(|l| l.starts_with("expected "))
        .unwrap_or("");
    let mut ready: Vec<u64> = pl
        .procs
        .iter()
        .flat_map(|p| p.ready_ms[1..].to_vec())
        .collect();
    ready.sort_unstable();
    let pct = |q: f64| {
        ready
            .get(((ready.len() as f64 * q) as usize).min(ready.len().saturating_sub(1)))
            .copied()
            .unwrap_or(0)
    };
    eprintln!(
        "FAULTS durability={} kills aggregator={} gateway={} shipper={} | {verdicts} | aggregator clicks {through_kills} exact | restart-to-ready ms p50={} p99={} max={}",
        std::env::var("E2E_DURABILITY").unwrap_or_else(|_| "sync".into()),
        killed[AGG],
        killed[GW],
        killed[SHIP],
        pct(0.5),
        pct(0.99),
        ready.last().copied().unwrap_or(0)
    );
}

/// `/readyz` of `addr`: (status, body).
fn readyz(addr: &str) -> (u16, String) {
    test_support::net::get(addr, "/readyz", None)
}

#[test]
fn a_pop_rides_out_a_central_outage_on_compressed_segments() {
    // Per shard: 128 KiB segments, a 2 MiB budget: uncompressed, about
    // 8 700 records. The load below logs about 25 000 per shard while the
    // aggregator is away. The PoP steps aside at 40% of the budget (the floor
    // is 12.5%: the active segment and its spare; a segment just sealed and
    // not yet compressed adds 6%) and comes back below 30%.
    let budget: u64 = 2 << 20;
    let mut pl = Pipeline::build_with(
        &[],
        None,
        None,
        None,
        false,
        &format!(
            "[log]\nsegment_bytes = 131072\ndisk_budget_bytes = {budget}\n\
             compress_chunk_bytes = 65536\npartial_reserve_bytes = 8192\n\
             unready_at_budget_share = 0.4\nready_below_budget_share = 0.3\n"
        ),
    );
    pl.procs[AGG].stop();
    let rate = 4000;
    let secs = 15;
    let lg = pl
        .loadgen(
            "oracle-outage.json",
            &["--connections", "16", "--rate", &rate.to_string()],
        )
        .args(["--duration", &secs.to_string()])
        .args(["--pool", &(rate * secs).to_string(), "--seed", "21"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // While the load runs: the gateway steps aside at the mark, and keeps
    // answering.
    let t = Instant::now();
    let mut aside = None;
    while t.elapsed() < Duration::from_secs(secs + 5) {
        let (status, body) = readyz(&pl.gateway_addr);
        if status == 503 && body.contains("stepping aside") {
            aside.get_or_insert((t.elapsed(), body));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let out = lg.wait_with_output().unwrap();
    let lg_text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(out.status.success(), "{out:?}");
    let statuses = lg_text
        .lines()
        .find(|l| l.starts_with("statuses:"))
        .unwrap_or_else(|| panic!("no statuses line: {lg_text}"));
    assert!(
        !statuses.contains("503=") && statuses.contains("302="),
        "{statuses}\n{}",
        pl.logs()
    );
    let (when, body) = aside.unwrap_or_else(|| panic!("never stepped aside\n{}", pl.logs()));
    eprintln!("stepped aside after {when:?}: {body}");
    // Still aside, with compressed segments holding what waits.
    assert_eq!(readyz(&pl.gateway_addr).0, 503);
    let segz: usize = (0..2)
        .map(|s| {
            std::fs::read_dir(pl.path("data").join(format!("shard-{s}")))
                .unwrap()
                .flatten()
                .filter(|e| e.path().extension().is_some_and(|x| x == "segz"))
                .count()
        })
        .sum();
    assert!(segz >= 10, "{segz} compressed segments");
    let m = test_support::net::get(&pl.gateway_addr, "/metrics", None).1;
    assert!(test_support::metric(&m, "clickgate_log_compressions_total") >= segz as u64);
    // More was appended, all of it unshipped, than the two shards' budgets
    // could have held uncompressed.
    let appended = test_support::metric(&m, "clickgate_log_appended_bytes_total");
    assert!(
        appended > 2 * budget + budget / 2,
        "{appended} bytes appended"
    );
    eprintln!(
        "appended {appended} bytes; compressed {} -> {} bytes in {segz} segments",
        test_support::metric(&m, "clickgate_log_compress_input_bytes_total"),
        test_support::metric(&m, "clickgate_log_compress_output_bytes_total")
    );
    assert!(
        m.contains("clickgate_log_buffer_left_seconds{shard=\"0\"}"),
        "{m}"
    );
    assert!(
        test_support::metric(
            &m,
            "clickgate_log_oldest_unshipped_age_seconds{shard=\"0\"}"
        ) >= 5,
        "{m}"
    );
    // The aggregator returns: the shipper catches up from the compressed
    // segments, the gateway comes back, and every acknowledged click is
    // counted once.
    let back = Instant::now();
    pl.procs[AGG].start();
    while readyz(&pl.gateway_addr).0 != 200 {
        assert!(
            back.elapsed() < Duration::from_secs(90),
            "still stepped aside: {}\n{}",
            readyz(&pl.gateway_addr).1,
            pl.logs()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    eprintln!(
        "ready again {:?} after the aggregator returned",
        back.elapsed()
    );
    let (ok, text) = pl.verify("oracle-outage.json");
    assert!(ok, "{text}\n{}", pl.logs());
    assert!(expected_clicks(&text) > 1000, "{text}");
}

#[test]
fn a_full_pop_told_to_redirect_reports_every_click_it_did_not_record() {
    // Two 64 KiB segments per shard and nothing shipping: the log fills
    // within a few hundred clicks. With log.on_full = "redirect" the clicks
    // after that still get their 302, without a record; the gateway counts
    // them, its partials carry them, and the aggregator reports them.
    let mut pl = Pipeline::build_with(
        &[],
        None,
        None,
        None,
        false,
        "[log]\nsegment_bytes = 65536\ndisk_budget_bytes = 131072\ncompress = false\n\
         on_full = \"redirect\"\n",
    );
    pl.procs[AGG].stop();
    let t0 = Instant::now();
    let out = pl
        .loadgen(
            "oracle-redirect.json",
            &["--connections", "8", "--rate", "1000"],
        )
        .args(["--duration", "3", "--pool", "3000", "--seed", "31"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(out.status.success(), "{out:?}");
    let statuses = text.lines().find(|l| l.starts_with("statuses:")).unwrap();
    assert!(!statuses.contains("503="), "{statuses}");
    let m = test_support::net::get(&pl.gateway_addr, "/metrics", None).1;
    let mut unrecorded = test_support::metric(&m, "clickgate_unrecorded_redirects_total");
    assert!(unrecorded > 500, "{unrecorded} unrecorded\n{statuses}");
    eprintln!("{unrecorded} unrecorded after {:?}", t0.elapsed());
    // The next partials carry the counts (they fit in the reserve).
    std::thread::sleep(Duration::from_millis(600));
    pl.procs[AGG].start();
    let tokens = std::fs::read_to_string(pl.path("tokens.toml")).unwrap();
    let admin = tokens
        .split("[[admin]]")
        .nth(1)
        .and_then(|t| t.lines().find_map(|l| l.strip_prefix("token = \"")))
        .unwrap()
        .trim_end_matches('"')
        .to_owned();
    let now = test_support::now_s();
    let path = format!(
        "/api/v1/admin/unrecorded?start_time={}&end_time={}",
        now - 1800,
        now + 600
    );
    let t = Instant::now();
    loop {
        let (st, b) = test_support::net::get(&pl.agg_http, &path, Some(&admin));
        assert_eq!(st, 200, "{b}");
        let v: serde_json::Value = serde_json::from_str(&b).unwrap();
        // Requests loadgen gave up on at its deadline may still be answered
        // after it exits: the gateway's own count is read again each round.
        let m = test_support::net::get(&pl.gateway_addr, "/metrics", None).1;
        unrecorded = test_support::metric(&m, "clickgate_unrecorded_redirects_total");
        if v["total"].as_u64() == Some(unrecorded) {
            eprintln!("reported {:?} after the aggregator returned", t.elapsed());
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "the aggregator reports {b}, the gateway counted {unrecorded}\n{}",
            pl.logs()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let am = test_support::net::get(&pl.agg_http, "/metrics", None).1;
    assert_eq!(
        test_support::metric(&am, "clickgate_aggregator_unrecorded_redirects_total"),
        unrecorded
    );
}

#[test]
fn counts_stay_exact_when_the_gateway_clock_is_off_and_jumps_back() {
    // The gateway's clock runs 5 minutes ahead, then jumps 8 minutes back,
    // then is right again: each click lands in the minute its gateway gave it
    // (a minute already final gets a new version), nothing lost or doubled.
    let clock = tempfile::NamedTempFile::new().unwrap();
    let clock_path = clock.path().to_str().unwrap().to_owned();
    std::fs::write(&clock_path, "300000").unwrap();
    let pl = Pipeline::with_gateway_env(&[("CLICKGATE_INJECT_CLOCK_FILE", &clock_path)]);
    let lg = pl
        .loadgen(
            "oracle-clock.json",
            &["--connections", "8", "--rate", "400"],
        )
        .args(["--duration", "6", "--pool", "2400", "--seed", "13"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_secs(2));
    std::fs::write(&clock_path, "-180000").unwrap();
    std::thread::sleep(Duration::from_secs(2));
    std::fs::write(&clock_path, "0").unwrap();
    let out = lg.wait_with_output().unwrap();
    assert!(out.status.success(), "{out:?}");
    let (ok, text) = pl.verify("oracle-clock.json");
    assert!(ok, "{text}\n{}", pl.logs());
    assert!(expected_clicks(&text) > 800, "{text}");
    eprintln!("clock skew and jump back:\n{text}");
}

/// A UDP proxy between the shipper and the aggregator that loses, duplicates
/// and reorders datagrams, and can cut the link entirely (a partition).
struct Proxy {
    addr: std::net::SocketAddr,
    faults: std::sync::Arc<ProxyFaults>,
}

#[derive(Default)]
struct ProxyFaults {
    partitioned: std::sync::atomic::AtomicBool,
    /// Percent of datagrams lost, duplicated, held back behind the next.
    loss: std::sync::atomic::AtomicU64,
    dup: std::sync::atomic::AtomicU64,
    reorder: std::sync::atomic::AtomicU64,
    passed: std::sync::atomic::AtomicU64,
    dropped: std::sync::atomic::AtomicU64,
}

impl Proxy {
    fn start(server: std::net::SocketAddr) -> Proxy {
        use std::net::UdpSocket;
        use std::sync::atomic::Ordering::Relaxed;
        use std::sync::{Arc, Mutex};
        let front = Arc::new(UdpSocket::bind("127.0.0.1:0").unwrap());
        let back = Arc::new(UdpSocket::bind("127.0.0.1:0").unwrap());
        let addr = front.local_addr().unwrap();
        let faults = Arc::new(ProxyFaults::default());
        let client: Arc<Mutex<Option<std::net::SocketAddr>>> = Arc::default();
        // One direction: read from `from`, apply the faults, write with `to`.
        let pump = |from: Arc<UdpSocket>, to: Arc<UdpSocket>, upstream: bool, seed: u64| {
            let faults = faults.clone();
            let client = client.clone();
            std::thread::spawn(move || {
                let mut rng = seed;
                let mut next = move |n: u64| {
                    rng ^= rng << 13;
                    rng ^= rng >> 7;
                    rng ^= rng << 17;
                    rng % n
                };
                let mut buf = vec![0u8; 65_536];
                let mut held: Option<Vec<u8>> = None;
                loop {
                    let Ok((n, src)) = from.recv_from(&mut buf) else {
                        return;
                    };
                    let dest = if upstream {
                        *client.lock().unwrap() = Some(src);
                        Some(server)
                    } else {
                        *client.lock().unwrap()
                    };
                    let Some(dest) = dest else { continue };
                    if faults.partitioned.load(Relaxed) || next(100) < faults.loss.load(Relaxed) {
                        faults.dropped.fetch_add(1, Relaxed);
                        continue;
                    }
                    let pkt = buf[..n].to_vec();
                    if held.is_none() && next(100) < faults.reorder.load(Relaxed) {
                        held = Some(pkt);
                        continue;
                    }
                    let copies = if next(100) < faults.dup.load(Relaxed) {
                        2
                    } else {
                        1
                    };
                    for _ in 0..copies {
                        let _ = to.send_to(&pkt, dest);
                    }
                    if let Some(h) = held.take() {
                        let _ = to.send_to(&h, dest);
                    }
                    faults.passed.fetch_add(1, Relaxed);
                }
            });
        };
        pump(front.clone(), back.clone(), true, 0x1234_5678_9abc_def1);
        pump(back, front, false, 0x0fed_cba9_8765_4321);
        Proxy { addr, faults }
    }

    fn set(&self, loss: u64, dup: u64, reorder: u64) {
        use std::sync::atomic::Ordering::Relaxed;
        self.faults.loss.store(loss, Relaxed);
        self.faults.dup.store(dup, Relaxed);
        self.faults.reorder.store(reorder, Relaxed);
    }

    fn partition(&self, on: bool) {
        self.faults
            .partitioned
            .store(on, std::sync::atomic::Ordering::Relaxed);
    }
}

#[test]
fn exact_through_a_lossy_link_a_partition_and_a_wiped_shipper() {
    // 5% loss, 2% duplicates, 10% reordering on the shipper-aggregator link
    // throughout; a partition of E2E_PARTITION_SECS (default 8; the long
    // profile: 120) under load, during which the shipper is killed and
    // restarted (memory wiped). Afterwards the counts must be exact, and the
    // time from healing to caught up is reported.
    let env = |k: &str, d: u64| {
        std::env::var(k)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(d)
    };
    let part_secs = env("E2E_PARTITION_SECS", 8);
    let (mut pl, proxy) = Pipeline::through_proxy();
    proxy.set(5, 2, 10);
    let load_secs = part_secs + 6;
    let lg = pl
        .loadgen("oracle-link.json", &["--connections", "8", "--rate", "300"])
        .args(["--duration", &load_secs.to_string()])
        .args(["--pool", &(300 * load_secs).to_string(), "--seed", "14"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_secs(2));
    proxy.partition(true);
    std::thread::sleep(Duration::from_secs(part_secs / 2));
    pl.procs[SHIP].kill9();
    pl.procs[SHIP].start();
    std::thread::sleep(Duration::from_secs(part_secs - part_secs / 2));
    proxy.partition(false);
    let healed = Instant::now();
    let out = lg.wait_with_output().unwrap();
    assert!(out.status.success(), "{out:?}");
    let (ok, text) = pl.verify("oracle-link.json");
    let caught_up = healed.elapsed();
    assert!(ok, "{text}\n{}", pl.logs());
    let p = &proxy.faults;
    eprintln!(
        "LINK partition_s={part_secs} loss=5% dup=2% reorder=10% datagrams passed={} dropped={} | {} | healed to exact in {:.1} s (includes the rest of the load)",
        p.passed.load(std::sync::atomic::Ordering::Relaxed),
        p.dropped.load(std::sync::atomic::Ordering::Relaxed),
        text.lines().find(|l| l.starts_with("aggregator:")).unwrap_or(""),
        caught_up.as_secs_f64()
    );
}

impl Pipeline {
    /// Restarts (without their fault-injection environment) the processes
    /// that exited; returns how many.
    /// Waits for `lg` to end, restarting any process that dies (answers how
    /// many did), and doing each of `at` once its time since the start has
    /// come; every one must have come before the load ended.
    fn ride(&mut self, lg: &mut Child, at: &mut [(Duration, Fault<'_>)]) -> usize {
        let started = Instant::now();
        let mut done = vec![false; at.len()];
        let mut crashed = 0;
        while lg.try_wait().unwrap().is_none() {
            crashed += self.restart_dead();
            for ((when, f), done) in at.iter_mut().zip(done.iter_mut()) {
                if !*done && started.elapsed() > *when {
                    f(self);
                    *done = true;
                }
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        assert!(
            done.iter().all(|d| *d),
            "the load ended before every planned fault"
        );
        crashed + self.restart_dead()
    }

    fn restart_dead(&mut self) -> usize {
        let mut n = 0;
        for p in self.procs.iter_mut() {
            let dead = p
                .child
                .as_mut()
                .is_some_and(|c| c.try_wait().unwrap().is_some());
            if dead {
                p.child = None;
                p.env.clear();
                p.start();
                n += 1;
            }
        }
        n
    }
}

#[test]
fn exact_through_crashes_at_named_points() {
    // Each process aborts at a named crash point (CLICKGATE_CRASH_AT) in the
    // middle of a loaded run and is restarted: the gateway after a durable
    // write completed but before answering it (then, on a second pipeline,
    // after staging a partial before writing it), the aggregator after a
    // commit but before answering it, the shipper after an answer but before
    // recording its cursors.
    let rounds: [&[(usize, &str, &str)]; 2] = [
        &[
            (
                GW,
                "CLICKGATE_CRASH_AT",
                "gateway_durable_before_answer:400",
            ),
            (
                AGG,
                "CLICKGATE_CRASH_AT",
                "aggregator_committed_before_answer:25",
            ),
            (
                SHIP,
                "CLICKGATE_CRASH_AT",
                "shipper_answered_before_cursor:15",
            ),
        ],
        &[(GW, "CLICKGATE_CRASH_AT", "gateway_partial_staged:12")],
    ];
    for (r, envs) in rounds.iter().enumerate() {
        let mut pl = Pipeline::build(envs, None);
        let oracle = format!("oracle-crash{r}.json");
        let mut lg = pl
            .loadgen(&oracle, &["--connections", "8", "--rate", "300"])
            .args([
                "--duration",
                "6",
                "--pool",
                "1800",
                "--seed",
                &(20 + r).to_string(),
            ])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut crashed = 0;
        while lg.try_wait().unwrap().is_none() {
            crashed += pl.restart_dead();
            std::thread::sleep(Duration::from_millis(20));
        }
        // Points downstream of the gateway (shipping, the aggregator's
        // commits) can be reached after the load ends, later on a loaded
        // machine: give them up to 30 s more.
        let t = Instant::now();
        crashed += pl.restart_dead();
        while crashed < envs.len() && t.elapsed() < Duration::from_secs(30) {
            std::thread::sleep(Duration::from_millis(20));
            crashed += pl.restart_dead();
        }
        let out = lg.wait_with_output().unwrap();
        assert!(out.status.success(), "{out:?}");
        assert_eq!(
            crashed,
            envs.len(),
            "every armed point crashed its process once\n{}",
            pl.logs()
        );
        let (ok, text) = pl.verify(&oracle);
        assert!(ok, "round {r}\n{text}\n{}", pl.logs());
        eprintln!(
            "CRASHPOINTS round {r}: {} crash(es) | {}",
            crashed,
            text.lines()
                .find(|l| l.starts_with("aggregator:"))
                .unwrap_or("")
        );
    }
}

#[test]
fn clickhouse_holds_exactly_what_was_acknowledged_through_aggregator_crashes() {
    // The aggregator writes merged rows to a real ClickHouse; it aborts once
    // after a ClickHouse INSERT succeeded but before the store forgot those
    // rows (so they are written again), and is killed with SIGKILL once more
    // during the load. ClickHouse's final rows must equal the log exactly.
    let Some(mut pl) = Pipeline::with_clickhouse(&[(
        AGG,
        "CLICKGATE_CRASH_AT",
        "aggregator_exported_before_forget:3",
    )]) else {
        eprintln!("SKIPPED: no ClickHouse server could be started");
        return;
    };
    let oracle = "oracle-ch.json";
    let mut lg = pl
        .loadgen(oracle, &["--connections", "8", "--rate", "400"])
        .args(["--duration", "8", "--pool", "3200", "--seed", "31"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let crashed = pl.ride(
        &mut lg,
        &mut [(Duration::from_secs(5), &mut kill_aggregator)],
    );
    let out = lg.wait_with_output().unwrap();
    assert!(out.status.success(), "{out:?}");
    assert_eq!(crashed, 1, "the armed crash point fired\n{}", pl.logs());
    let (ok, text) = pl.verify(oracle);
    assert!(ok, "{text}\n{}", pl.logs());
    let line = text
        .lines()
        .find(|l| l.starts_with("clickhouse:"))
        .unwrap_or_else(|| panic!("no clickhouse line:\n{text}"));
    assert!(
        line.contains("differing (advertiser, ad, minute) 0 "),
        "{line}"
    );
    eprintln!("CLICKHOUSE: {line}");
}

#[test]
fn kafka_holds_exactly_what_was_acknowledged_through_aggregator_crashes_and_a_broker_restart() {
    // The aggregator produces raw events and merged rows to a real
    // Kafka-protocol broker (tansu); it aborts once after the broker
    // acknowledged a produce but before the store forgot those records (so
    // they go again), is killed with SIGKILL once more, and the broker is
    // killed and restarted mid-run. What kafka-python reads back (rows at
    // their highest revision, events once each) must equal the logs exactly.
    let Some(mut pl) = Pipeline::with_kafka(&[(
        AGG,
        "CLICKGATE_CRASH_AT",
        "aggregator_kafka_produced_before_forget:3",
    )]) else {
        eprintln!("SKIPPED: no Kafka-protocol broker or kafka-python");
        return;
    };
    let oracle = "oracle-kafka.json";
    let mut lg = pl
        .loadgen(oracle, &["--connections", "8", "--rate", "400"])
        .args(["--duration", "8", "--pool", "3200", "--seed", "37"])
        .args(["--advertisers", "6"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let crashed = pl.ride(
        &mut lg,
        &mut [
            (Duration::from_secs(3), &mut |pl: &mut Pipeline| {
                pl.kafka.as_mut().unwrap().restart()
            }),
            (Duration::from_secs(5), &mut kill_aggregator),
        ],
    );
    let out = lg.wait_with_output().unwrap();
    assert!(out.status.success(), "{out:?}");
    assert_eq!(crashed, 1, "the armed crash point fired\n{}", pl.logs());
    // The aggregator exact first; then the sink caught up with it.
    let (ok, text) = pl.verify(oracle);
    assert!(ok, "{text}\n{}", pl.logs());
    let t = Instant::now();
    while metric_of(&pl.agg_http, "clickgate_aggregator_kafka_backlog_rows")
        + metric_of(
            &pl.agg_http,
            "clickgate_aggregator_kafka_backlog_event_entries",
        )
        > 0
    {
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "sink never caught up\n{}",
            pl.logs()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let broker = pl.kafka.as_ref().unwrap();
    let read = Command::new("python3")
        .arg(test_support::kafka::reader())
        .args([&broker.addr(), "clickgate.events", "clickgate.minutes", "3"])
        .output()
        .unwrap();
    assert!(read.status.success(), "{read:?}");
    std::fs::write(pl.path("kafka.json"), &read.stdout).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_loadgen"))
        .arg("verify")
        .arg("--oracle")
        .arg(pl.path(oracle))
        .arg("--gateway-data")
        .arg(pl.path("data"))
        .arg("--kafka-dump")
        .arg(pl.path("kafka.json"))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}\n{}", pl.logs());
    let rows = text.lines().find(|l| l.starts_with("kafka rows:")).unwrap();
    assert!(
        rows.contains("differing (advertiser, ad, minute) 0 "),
        "{rows}"
    );
    let events = text
        .lines()
        .find(|l| l.starts_with("kafka events:"))
        .unwrap();
    assert!(
        events.contains("missing 0  unexpected 0  wrong keys 0"),
        "{events}"
    );
    eprintln!("KAFKA: {rows} | {events}");
}

/// Something done to a running pipeline.
type Fault<'a> = &'a mut dyn FnMut(&mut Pipeline);

/// SIGKILL to the aggregator, and a new one started.
fn kill_aggregator(pl: &mut Pipeline) {
    pl.procs[AGG].kill9();
    pl.procs[AGG].start();
}

/// One metric's value from a Prometheus text page.
fn metric_of(addr: &str, name: &str) -> u64 {
    let mut s = TcpStream::connect(addr).unwrap();
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).unwrap();
    common::metric(&text, name)
}

#[test]
fn two_aggregators_split_the_advertisers_and_answer_for_each_other() {
    // Advertisers partitioned over agg-a and agg-b; the shipper routes each
    // row and event to its owner; agg-b is killed -9 and restarted mid-run.
    // Each instance answers for every advertiser (its own from its store,
    // the other's by forwarding), and both answers equal the log exactly.
    let mut pl = Pipeline::build_with(&[], None, None, None, true, "");
    let oracle = "oracle-two.json";
    let lg = pl
        .loadgen(oracle, &["--connections", "8", "--rate", "400"])
        .args(["--duration", "6", "--pool", "2400", "--seed", "41"])
        .args(["--advertisers", "12"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_secs(3));
    pl.procs[AGG2].kill9();
    pl.procs[AGG2].start();
    let out = lg.wait_with_output().unwrap();
    assert!(out.status.success(), "{out:?}");
    let agg2 = pl.agg2_http.clone().unwrap();
    for at in [pl.agg_http.clone(), agg2.clone()] {
        let (ok, text) = pl.verify_at(oracle, &at);
        assert!(ok, "asking {at}:\n{text}\n{}", pl.logs());
        eprintln!(
            "TWO AGGREGATORS asking {at}: {}",
            text.lines()
                .find(|l| l.starts_with("aggregator:"))
                .unwrap_or("")
        );
    }
    for at in [&pl.agg_http, &agg2] {
        assert!(
            metric_of(at, "clickgate_aggregator_rows_merged_total") > 0,
            "{at} merged nothing: the advertisers were not split"
        );
        assert_eq!(
            metric_of(
                at,
                "clickgate_aggregator_batches_total{stream=\"partials\",status=\"refused\"}"
            ),
            0,
            "nothing misrouted to {at}"
        );
    }
}

/// One GET with a bearer token; the JSON answer.
fn get_json(addr: &str, path: &str, token: &str) -> serde_json::Value {
    let mut s = TcpStream::connect(addr).unwrap();
    s.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\nConnection: close\r\n\r\n")
            .as_bytes(),
    )
    .unwrap();
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).unwrap();
    let text = String::from_utf8_lossy(&raw);
    let (head, body) = text.split_once("\r\n\r\n").unwrap();
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    // axum answers with Content-Length here (not chunked).
    serde_json::from_str(body).unwrap()
}

/// (ad, minute) -> clicks of a JSON list of points, whose ad and minute
/// fields are named `ad` and `minute`.
fn clicks_by(
    points: &serde_json::Value,
    ad: &str,
    minute: &str,
) -> std::collections::BTreeMap<(String, String), u64> {
    points
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            let s = |k: &str| p[k].as_str().unwrap().to_owned();
            ((s(ad), s(minute)), p["clicks"].as_u64().unwrap())
        })
        .collect()
}

#[test]
fn the_dashboard_in_a_browser_shows_what_was_counted() {
    // Clicks through the whole pipeline, checked exact against the oracle;
    // then headless Chromium signs in to the dashboard as adv-0 and its
    // chart must show, point for point, the clicks per (ad, minute) the
    // query API holds for the same window (which verify proved equal to the
    // oracle). The screenshot is kept in target/test-artifacts/.
    let pl = Pipeline::new();
    let oracle = "oracle-dash.json";
    let out = pl
        .loadgen(oracle, &["--connections", "8", "--rate", "300"])
        .args(["--duration", "4", "--pool", "1200", "--seed", "51"])
        .args(["--advertisers", "3"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let (ok, text) = pl.verify(oracle);
    assert!(ok, "{text}\n{}", pl.logs());
    let ensure = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/ensure-browser");
    if !Command::new(ensure).status().unwrap().success() {
        eprintln!("SKIPPED: no headless browser could be installed");
        return;
    }
    let artifacts = test_support::artifacts_dir();
    let shot = artifacts.join("dashboard-adv-0.png");
    let _ = std::fs::remove_file(&shot);
    let out = Command::new("python3")
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/tools/dashboard.py"
        ))
        .args(["--url", &format!("http://{}/dashboard", pl.agg_http)])
        .args(["--advertiser", "adv-0", "--token", &pl.adv0_token])
        .arg("--screenshot")
        .arg(&shot)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let page: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(page["error"], "", "{page}");
    let shown = clicks_by(&page["points"], "ad", "minute");
    let path = format!(
        "/api/v1/advertisers/analytics?advertiser_id=adv-0&start_time={}&end_time={}&granularity=1m",
        page["start_ms"].as_i64().unwrap() / 1000,
        page["end_ms"].as_i64().unwrap() / 1000
    );
    let api = get_json(&pl.agg_http, &path, &pl.token);
    let counted = clicks_by(&api["series"], "ad_id", "timestamp");
    let total: u64 = counted.values().sum();
    assert!(
        total > 50,
        "too few clicks for adv-0 to show anything: {total}"
    );
    assert_eq!(shown, counted, "the chart differs from what was counted");
    assert_eq!(page["clicks_card"], total.to_string());
    // Users this hour: the API's own hour point (merged sketches), per ad.
    let hour = (page["end_ms"].as_i64().unwrap() - 60_000) / 3_600_000 * 3600;
    let path = format!(
        "/api/v1/advertisers/analytics?advertiser_id=adv-0&start_time={hour}&end_time={}&granularity=1h",
        hour + 3600
    );
    let api = get_json(&pl.agg_http, &path, &pl.token);
    let users: std::collections::BTreeMap<String, String> = api["series"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            let n = p["unique_users"].as_u64().unwrap();
            assert!(n > 0 && n <= p["clicks"].as_u64().unwrap(), "{p}");
            (p["ad_id"].as_str().unwrap().to_owned(), n.to_string())
        })
        .collect();
    let page_users: std::collections::BTreeMap<String, String> =
        serde_json::from_value(page["users"].clone()).unwrap();
    assert_eq!(page_users, users, "users this hour, page and API");
    assert!(
        std::fs::metadata(&shot).unwrap().len() > 5000,
        "screenshot kept"
    );
    eprintln!(
        "DASHBOARD: {} points, {total} clicks for adv-0, screenshot {}",
        shown.len(),
        shot.display()
    );
}

/// The value after `flag` in a process's arguments.
fn arg_after(p: &Proc, flag: &str) -> String {
    let i = p.args.iter().position(|a| a == flag).unwrap();
    p.args[i + 1].to_str().unwrap().to_owned()
}

#[test]
fn growing_from_one_aggregator_to_two_under_load_counts_every_click_once() {
    // One aggregator (agg-a) writing to ClickHouse takes a steady load; in
    // the middle of it the cluster grows: the shipper stops, agg-a restarts
    // with the instance list [agg-a, agg-b], agg-b starts, and the shipper
    // restarts routing by advertiser with agg-b joining (it starts where
    // agg-a stood, not from the start of the log). ClickHouse, summed over
    // the instances, must equal the log exactly, and so must both
    // instances' answers (from ClickHouse: a moved advertiser's history was
    // written by agg-a).
    let Some(mut pl) = Pipeline::with_clickhouse(&[]) else {
        eprintln!("SKIPPED: no ClickHouse server could be started");
        return;
    };
    let oracle = "oracle-grow.json";
    let lg = pl
        .loadgen(oracle, &["--connections", "8", "--rate", "300"])
        .args(["--duration", "10", "--pool", "3000", "--seed", "61"])
        .args(["--advertisers", "12"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_secs(4));

    let (a_http, a_quic) = (
        arg_after(&pl.procs[AGG], "--listen-http"),
        arg_after(&pl.procs[AGG], "--listen-quic"),
    );
    let (b_http, b_quic) = (
        format!("127.0.0.1:{}", free_port()),
        format!("127.0.0.1:{}", free_udp_port()),
    );
    let cluster = |id: &str| -> Vec<OsString> {
        [
            "--instance-id",
            id,
            "--instance",
            &format!("agg-a={a_http}"),
            "--instance",
            &format!("agg-b={b_http}"),
            "--queries-from-clickhouse",
        ]
        .iter()
        .map(OsString::from)
        .collect()
    };
    pl.procs[SHIP].stop();
    pl.procs[AGG].stop();
    pl.procs[AGG].args.extend(cluster("agg-a"));
    pl.procs[AGG].start();
    let mut b_args = pl.procs[AGG].args.clone();
    for (flag, value) in [
        ("--listen-http", &b_http),
        ("--listen-quic", &b_quic),
        (
            "--store",
            &pl.path("agg-b/store.redb").to_str().unwrap().to_owned(),
        ),
        ("--instance-id", &"agg-b".to_owned()),
    ] {
        let i = b_args.iter().position(|a| a == flag).unwrap();
        b_args[i + 1] = value.into();
    }
    pl.procs.push(Proc::new(
        "aggregator-b",
        pl.procs[AGG].bin.clone(),
        b_args,
        pl.path("aggregator-b.log"),
        (b_http.clone(), "/readyz"),
    ));
    pl.procs[AGG2].start();
    let ship = &mut pl.procs[SHIP];
    let i = ship.args.iter().position(|a| a == "--aggregator").unwrap();
    ship.args.drain(i..i + 2);
    ship.args.extend(
        [
            "--instance",
            &format!("agg-a={a_quic}"),
            "--instance",
            &format!("agg-b={b_quic}"),
            "--joining",
            "agg-b",
        ]
        .iter()
        .map(OsString::from),
    );
    ship.start();

    let out = lg.wait_with_output().unwrap();
    assert!(out.status.success(), "{out:?}");
    for at in [a_http.clone(), b_http.clone()] {
        let (ok, text) = pl.verify_at(oracle, &at);
        assert!(ok, "asking {at}:\n{text}\n{}", pl.logs());
        let line = |p: &str| {
            text.lines()
                .find(|l| l.starts_with(p))
                .unwrap_or("")
                .to_owned()
        };
        eprintln!(
            "GROW asking {at}: {} | {}",
            line("aggregator:"),
            line("clickhouse:")
        );
    }
    assert!(
        metric_of(&b_http, "clickgate_aggregator_rows_merged_total") > 0,
        "agg-b took over some advertisers"
    );
    assert!(
        pl.procs[AGG2].log_text().contains("joined"),
        "{}",
        pl.logs()
    );
}

/// The clicks a `loadgen verify` output line says the aggregator billed.
fn counted_clicks(text: &str) -> u64 {
    let line = text
        .lines()
        .find(|l| l.starts_with("aggregator: expected clicks"))
        .unwrap_or_else(|| panic!("no aggregator line:\n{text}"));
    let f: Vec<&str> = line.split_whitespace().collect();
    let i = f.iter().position(|w| *w == "counted").unwrap();
    f[i + 2].parse().unwrap()
}

#[test]
fn a_click_retried_at_another_pop_is_billed_once_once_reconciled() {
    // Two PoPs (gateways gwa and gwb, each with its shipper) and one
    // aggregator. The same signed clicks go to both (a prefix of gwa's pool
    // goes to gwb too), some only to one, some twice to one. The aggregator
    // aborts once between two transactions of a reconcile (crash point) and
    // is killed with SIGKILL once more while it reconciles. Once every
    // minute is reconciled, the query API bills exactly what the rule gives
    // from both logs (each click id once, the velocity rule across PoPs), per
    // (advertiser, ad, minute), clicks and spend.
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_owned();
    let p = |x: &str| d.join(x).to_str().unwrap().to_owned();
    let agg_bin = bin("clickgate-aggregator");
    let gw_bin = bin("clickgate-gateway");
    let ship_bin = bin("clickgate-shipper");
    let run = |b: &Path, args: &[&str]| {
        let out = Command::new(b).args(args).output().unwrap();
        assert!(out.status.success(), "{args:?}: {out:?}");
    };
    run(
        &gw_bin,
        &["keygen", "--kid", "k1", "--out", &p("keys.toml")],
    );
    run(
        &agg_bin,
        &[
            "dev-certs",
            "--out",
            &p("certs"),
            "--gateway",
            "gwa",
            "--gateway",
            "gwb",
        ],
    );
    run(&agg_bin, &["dev-tokens", "--out", &p("tokens.toml")]);
    let tokens = std::fs::read_to_string(d.join("tokens.toml")).unwrap();
    let token = tokens
        .lines()
        .skip_while(|l| *l != "advertiser_id = \"*\"")
        .nth(1)
        .and_then(|l| l.strip_prefix("token = \""))
        .unwrap()
        .trim_end_matches('"')
        .to_owned();
    let agg_http = format!("127.0.0.1:{}", free_port());
    let agg_quic = format!("127.0.0.1:{}", free_udp_port());
    std::fs::write(
        d.join("aggregator.toml"),
        format!(
            "store_path = {:?}\nlisten_quic = \"{agg_quic}\"\nlisten_http = \"{agg_http}\"\n\
             ca_file = {:?}\ncert_file = {:?}\nkey_file = {:?}\npops_file = {:?}\ntokens_file = {:?}\n\
             lateness_ms = 3000\nsource_timeout_ms = 20000\n\
             [reconcile]\ninterval_ms = 200\nrows_per_txn_max = 2\n",
            p("agg/store.redb"),
            p("certs/ca.pem"),
            p("certs/aggregator.pem"),
            p("certs/aggregator.key"),
            p("certs/pops.toml"),
            p("tokens.toml"),
        ),
    )
    .unwrap();
    let os = |v: &[&str]| v.iter().map(OsString::from).collect::<Vec<_>>();
    let proc = |name, bin: &PathBuf, args: Vec<OsString>, ready: (String, &'static str)| {
        Proc::new(
            name,
            bin.clone(),
            args,
            d.join(format!("{name}.log")),
            ready,
        )
    };
    let mut agg = proc(
        "aggregator",
        &agg_bin,
        os(&["run", "--config", &p("aggregator.toml")]),
        (agg_http.clone(), "/readyz"),
    );
    agg.env.push((
        "CLICKGATE_CRASH_AT".into(),
        "aggregator_reconcile_chunk_committed:3".into(),
    ));
    agg.start();
    let mut others = Vec::new();
    let mut targets = Vec::new();
    for (i, gw) in ["gwa", "gwb"].iter().enumerate() {
        let addr = format!("127.0.0.1:{}", free_port());
        std::fs::write(
            d.join(format!("{gw}.toml")),
            format!(
                "gateway_id = \"{gw}\"\ndata_dir = {:?}\nkeys_file = {:?}\ncpus = [{i}]\n\
                 [listen]\nhttp = \"{addr}\"\n[aggregate]\nflush_interval_ms = 200\n",
                p(&format!("{gw}-data")),
                p("keys.toml"),
            ),
        )
        .unwrap();
        let mut g = proc(
            if i == 0 { "gateway-a" } else { "gateway-b" },
            &gw_bin,
            os(&["run", "--config", &p(&format!("{gw}.toml"))]),
            (addr.clone(), "/readyz"),
        );
        g.start();
        let metrics = format!("127.0.0.1:{}", free_port());
        let mut s = proc(
            if i == 0 { "shipper-a" } else { "shipper-b" },
            &ship_bin,
            os(&[
                "run",
                "--data-dir",
                &p(&format!("{gw}-data")),
                "--certs",
                &p("certs"),
                "--aggregator",
                &agg_quic,
                "--metrics-listen",
                &metrics,
            ]),
            (metrics.clone(), "/healthz"),
        );
        s.start();
        others.push(g);
        others.push(s);
        targets.push(addr);
    }
    // Runs with one seed share their pool: the same click ids, ads and
    // costs. gwa gets the whole pool and wraps (repeats are duplicates
    // there); gwb gets the first 1 200, then clicks of its own.
    let loadgen = |target: &str, oracle: &str, seed: &str, requests: &str| {
        let out = Command::new(env!("CARGO_BIN_EXE_loadgen"))
            .args(["run", "--target", target, "--cpus", "0"])
            .args([
                "--warmup",
                "0",
                "--timeout-ms",
                "2000",
                "--connections",
                "8",
            ])
            .args(["--dup-rate", "0.1", "--bad-sig-rate", "0.05"])
            .args(["--late-rate", "0.05", "--late-age-s", "7200"])
            .args(["--pool", "2000", "--requests", requests, "--seed", seed])
            .args(["--duration", "30"])
            .arg("--keys")
            .arg(d.join("keys.toml"))
            .arg("--oracle")
            .arg(d.join(oracle))
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
    };
    loadgen(&targets[0], "oa.json", "41", "2400");
    loadgen(&targets[1], "ob.json", "41", "1200");
    loadgen(&targets[1], "oc.json", "42", "400");
    // The crash point fires once reconciling has begun; restart without it.
    let t = Instant::now();
    while agg.child.as_mut().unwrap().try_wait().unwrap().is_none() {
        assert!(
            t.elapsed() < Duration::from_secs(150),
            "the reconcile crash point never fired:\n{}",
            agg.log_text()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(agg
        .log_text()
        .contains("aggregator_reconcile_chunk_committed"));
    agg.child = None;
    agg.env.clear();
    agg.start();
    // Then SIGKILL while it reconciles.
    let t = Instant::now();
    while metric_of(
        &agg_http,
        "clickgate_aggregator_reconcile_minute_buckets_total",
    ) == 0
    {
        assert!(t.elapsed() < Duration::from_secs(60), "{}", agg.log_text());
        std::thread::sleep(Duration::from_millis(20));
    }
    agg.kill9();
    agg.start();
    let verify = |verify_args: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_loadgen"))
            .arg("verify")
            .args(["--oracle", &p("oa.json")])
            .args(["--gateway-data", &p("gwa-data")])
            .args(["--oracle", &format!("{},{}", p("ob.json"), p("oc.json"))])
            .args(["--gateway-data", &p("gwb-data")])
            .args(["--aggregator", &agg_http, "--token", &token])
            .args(verify_args)
            .output()
            .unwrap();
        (
            out.status.success(),
            format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
        )
    };
    let (ok, text) = verify(&["--wait-secs", "150"]);
    let logs = || {
        std::iter::once(&agg)
            .chain(others.iter())
            .map(|p| format!("--- {} ---\n{}", p.name, p.log_text()))
            .collect::<String>()
    };
    assert!(ok, "{text}\n{}", logs());
    // The two PoPs' real-time counts billed the shared clicks twice; the
    // reconciled answer bills them once.
    let billed = counted_clicks(&text);
    let realtime: u64 = ["gwa-data", "gwb-data"]
        .iter()
        .map(|g| {
            let out = Command::new(&gw_bin)
                .args(["inspect", &p(g)])
                .output()
                .unwrap();
            let text = String::from_utf8_lossy(&out.stdout).to_string();
            let line = text
                .lines()
                .find(|l| l.starts_with("totals:"))
                .unwrap()
                .to_owned();
            line.split(' ')
                .find_map(|kv| kv.strip_prefix("clicks="))
                .unwrap()
                .parse::<u64>()
                .unwrap()
        })
        .sum();
    assert!(
        billed < realtime,
        "billed {billed}, the PoPs counted {realtime} between them"
    );
    sealed_files_hold_what_the_gateways_logged(&d, &gw_bin, &["gwa-data", "gwb-data"]);
    let corrected = metric_of(
        &agg_http,
        "clickgate_aggregator_reconcile_corrected_rows_total",
    );
    eprintln!(
        "ACROSS POPS: the two gateways counted {realtime} clicks, the aggregator bills {billed} once reconciled \
         (rows corrected since the last start {corrected})\n{}",
        text.lines()
            .filter(|l| l.starts_with("aggregator:") || l.starts_with("expected"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    for p in others.iter_mut() {
        p.stop();
    }
    agg.stop();
}

/// The sealed audit files of the aggregator beside `d/agg/store.redb`, read
/// with DuckDB (an independent reader of Parquet, from PyPI), hold exactly the
/// events the gateways logged for the sealed hours: the late batched events
/// of two hours ago, whose hour reconciliation has passed. SKIPPED when
/// DuckDB cannot be had.
fn sealed_files_hold_what_the_gateways_logged(d: &Path, gw_bin: &Path, data: &[&str]) {
    let audit = d.join("agg/audit/raw");
    let t = Instant::now();
    let count = || {
        walk(&audit)
            .iter()
            .filter(|p| p.extension().is_some_and(|e| e == "parquet"))
            .count()
    };
    while count() < data.len() {
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "no sealed file per gateway under {}",
            audit.display()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let have = Command::new("python3")
        .args(["-c", "import duckdb"])
        .status()
        .is_ok_and(|s| s.success())
        || Command::new("python3")
            .args(["-m", "pip", "install", "-q", "duckdb"])
            .status()
            .is_ok_and(|s| s.success());
    if !have {
        eprintln!(
            "SKIPPED: sealed files not read with DuckDB (python3 -m pip install duckdb failed)"
        );
        return;
    }
    let script = format!(
        "import duckdb\n\
         q = \"select gateway_id, kind, verdict, click_id, epoch_ms(event_time) // 3600000 \
         from read_parquet('{}/**/*.parquet')\"\n\
         for r in duckdb.sql(q).fetchall():\n    print('\\t'.join(str(x) for x in r))\n",
        audit.display()
    );
    let out = Command::new("python3")
        .args(["-c", &script])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let mut sealed: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_owned)
        .collect();
    sealed.sort();
    assert!(!sealed.is_empty());
    let hours: std::collections::BTreeSet<String> = sealed
        .iter()
        .filter_map(|l| l.rsplit('\t').next())
        .map(str::to_owned)
        .collect();
    let mut logged = Vec::new();
    for g in data {
        let out = Command::new(gw_bin)
            .arg("inspect")
            .arg(d.join(g))
            .arg("--events")
            .output()
            .unwrap();
        let gw = if g.starts_with("gwa") { "gwa" } else { "gwb" };
        for l in String::from_utf8_lossy(&out.stdout).lines() {
            if !l.starts_with("event ") {
                continue;
            }
            let f = |k: &str| {
                l.split(' ')
                    .find_map(|kv| kv.strip_prefix(k))
                    .unwrap()
                    .to_owned()
            };
            let hour = (f("minute=").parse::<u64>().unwrap() / 60).to_string();
            if hours.contains(&hour) {
                logged.push(format!(
                    "{gw}\t{}\t{}\t{}\t{hour}",
                    f("kind="),
                    f("verdict="),
                    f("click_id=")
                ));
            }
        }
    }
    logged.sort();
    assert_eq!(
        sealed.len(),
        logged.len(),
        "events in the sealed hours {hours:?}"
    );
    assert!(sealed == logged, "the sealed files differ from the logs");
    eprintln!(
        "SEALED: {} events of hours {hours:?} read back with DuckDB equal the gateways' logs",
        sealed.len()
    );
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            let p = e.path();
            if p.is_dir() {
                out.extend(walk(&p));
            } else {
                out.push(p);
            }
        }
    }
    out
}

/// Prometheus and promtool from Debian, installed if missing; None with the
/// reason when they cannot be had.
fn prometheus_tools() -> Option<()> {
    let have =
        || Path::new("/usr/bin/promtool").exists() && Path::new("/usr/bin/prometheus").exists();
    if !have() {
        let _ = Command::new(test_support::workspace_root().join("scripts/apt-install"))
            .arg("prometheus")
            .status();
    }
    if !have() {
        eprintln!("SKIPPED: promtool and prometheus are not installed (Debian: prometheus)");
        return None;
    }
    Some(())
}

#[test]
fn every_metrics_page_passes_promtool_and_a_real_prometheus_scrapes_them_and_evaluates_the_alert_rules(
) {
    if prometheus_tools().is_none() {
        return;
    }
    let pl = Pipeline::new();
    // Traffic, so that labelled series exist on every page.
    let out = pl
        .loadgen("oracle-prom.json", &["--connections", "4", "--rate", "300"])
        .args(["--duration", "2", "--pool", "1000", "--seed", "51"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let (ok, text) = pl.verify("oracle-prom.json");
    assert!(ok, "{text}\n{}", pl.logs());
    let ship_metrics = pl.procs[SHIP].ready.0.clone();
    let pages = [
        ("gateway", pl.gateway_addr.clone()),
        ("shipper", ship_metrics.clone()),
        ("aggregator", pl.agg_http.clone()),
    ];
    for (name, addr) in &pages {
        let (st, body) = test_support::net::get(addr, "/metrics", None);
        assert_eq!(st, 200);
        std::fs::write(pl.path(&format!("{name}.metrics")), &body).unwrap();
        let mut c = Command::new("promtool")
            .args(["check", "metrics"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        c.stdin.take().unwrap().write_all(body.as_bytes()).unwrap();
        let out = c.wait_with_output().unwrap();
        assert!(
            out.status.success() && out.stdout.is_empty() && out.stderr.is_empty(),
            "promtool check metrics on the {name}'s /metrics: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    // A real Prometheus scrapes the three and evaluates deploy/'s rules.
    let rules = test_support::workspace_root().join("deploy/prometheus/clickgate-alerts.yml");
    let web = format!("127.0.0.1:{}", free_port());
    std::fs::write(
        pl.path("prometheus.yml"),
        [
            "global:".to_string(),
            "  scrape_interval: 1s".into(),
            "  evaluation_interval: 1s".into(),
            "rule_files:".into(),
            format!("  - {rules:?}"),
            "scrape_configs:".into(),
            format!("  - job_name: clickgate-gateway\n    static_configs: [{{targets: ['{}']}}]", pl.gateway_addr),
            format!("  - job_name: clickgate-shipper\n    static_configs: [{{targets: ['{ship_metrics}']}}]"),
            format!("  - job_name: clickgate-aggregator\n    static_configs: [{{targets: ['{}']}}]", pl.agg_http),
        ]
        .join("\n"),
    )
    .unwrap();
    let log = std::fs::File::create(pl.path("prometheus.log")).unwrap();
    let mut prom = Command::new("prometheus")
        .arg(format!(
            "--config.file={}",
            pl.path("prometheus.yml").display()
        ))
        .arg(format!(
            "--storage.tsdb.path={}",
            pl.path("prom-data").display()
        ))
        .arg(format!("--web.listen-address={web}"))
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap();
    let prom_log = || std::fs::read_to_string(pl.path("prometheus.log")).unwrap_or_default();
    let api = |path: &str| -> serde_json::Value {
        let (st, b) = test_support::net::get(&web, path, None);
        assert_eq!(st, 200, "{path}: {b}");
        serde_json::from_str(&b).unwrap()
    };
    let t = Instant::now();
    let result = (|| {
        // Every target scraped, none with an error.
        loop {
            if test_support::net::status(&web, "/-/ready") == Some(200) {
                let v = api("/api/v1/targets");
                let targets = v["data"]["activeTargets"].as_array().unwrap().clone();
                let up = targets.iter().filter(|t| t["health"] == "up").count();
                if up == 3 && targets.iter().all(|t| t["lastError"] == "") {
                    break;
                }
                if t.elapsed() > Duration::from_secs(40) {
                    return Err(format!("targets: {targets:#?}"));
                }
            } else if t.elapsed() > Duration::from_secs(40) {
                return Err("prometheus never ready".into());
            }
            if let Ok(Some(st)) = prom.try_wait() {
                return Err(format!("prometheus exited: {st}"));
            }
            std::thread::sleep(Duration::from_millis(250));
        }
        // Every rule loaded and evaluated without an error.
        loop {
            let v = api("/api/v1/rules");
            let rules: Vec<serde_json::Value> = v["data"]["groups"]
                .as_array()
                .unwrap()
                .iter()
                .flat_map(|g| g["rules"].as_array().unwrap().clone())
                .collect();
            if rules.is_empty() {
                return Err("no rules loaded".into());
            }
            let bad: Vec<_> = rules.iter().filter(|r| r["health"] != "ok").collect();
            if bad.is_empty() {
                // Every series a rule reads exists, so no rule can stay
                // silent for a misspelt name.
                for r in &rules {
                    let q = r["query"].as_str().unwrap();
                    for name in q
                        .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                        .filter(|w| w.starts_with("clickgate_"))
                    {
                        let v = api(&format!("/api/v1/query?query=count({name})"));
                        if v["data"]["result"].as_array().unwrap().is_empty() {
                            return Err(format!(
                                "rule {}: no series named {name} is scraped",
                                r["name"]
                            ));
                        }
                    }
                }
                return Ok(rules.len());
            }
            if t.elapsed() > Duration::from_secs(60) {
                return Err(format!("rules not evaluated cleanly: {bad:#?}"));
            }
            std::thread::sleep(Duration::from_millis(250));
        }
    })();
    let _ = prom.kill();
    let _ = prom.wait();
    match result {
        Ok(n) => eprintln!("prometheus scraped 3 targets and evaluated {n} rules"),
        Err(e) => panic!("{e}\n--- prometheus ---\n{}", prom_log()),
    }
}

#[test]
fn the_alert_rules_deploy_ships_pass_their_promtool_fixtures() {
    if prometheus_tools().is_none() {
        return;
    }
    let dir = test_support::workspace_root().join("deploy/prometheus");
    for args in [
        &["check", "rules", "clickgate-alerts.yml"][..],
        &["test", "rules", "clickgate-alerts.test.yml"][..],
    ] {
        let out = Command::new("promtool")
            .args(args)
            .current_dir(&dir)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "promtool {args:?}:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}
