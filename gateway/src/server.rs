//! Process start-up and supervision: config and keys, one pinned thread per
//! shard (recovery, then the event loop), signals (SIGTERM/SIGINT drain,
//! SIGHUP reloads keys and the TLS certificate), keys-file polling, and exit codes.

use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{bail, Context};
use gateway_core::app::{App, Shared, State};
use gateway_core::dedup::DedupTable;
use gateway_core::limiter::VelocityTable;
use gateway_core::preagg::PreAgg;
use gateway_core::token::KeyRing;
use wire::record::EventRef;
use wire::segment::RecordType;

use crate::clock::{mono_ms, now_ms};
use crate::config::Config;
use crate::log::{shard_dir, LogConfig, ShardLog};
use crate::shard::{bind_listener, Listener, ShardLoop};
use crate::sys;
use crate::tls::TlsHandle;

/// Locked memory io_uring may need (rings and, on older kernels, their
/// accounting); raised where the process may, documented in deploy/.
const MEMLOCK_BYTES: u64 = 64 << 20;

fn load_keys(path: &Path, grace_ms: i64, prev: Option<&KeyRing>) -> anyhow::Result<KeyRing> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading keys file {}", path.display()))?;
    let ring = KeyRing::parse(&text, grace_ms, prev, now_ms())
        .with_context(|| format!("keys file {}", path.display()))?;
    if ring.is_empty() {
        bail!("keys file {}: no keys", path.display());
    }
    Ok(ring)
}

fn mtime(path: &Path) -> Option<SystemTime> {
    std::fs::metadata(path).and_then(|m| m.modified()).ok()
}

/// Runs the gateway until it is told to stop. Returns Ok after a clean drain.
pub fn run(cfg: Config, takeover: bool) -> anyhow::Result<()> {
    let cpus = cfg.shard_cpus();
    let memlock = sys::raise_memlock(MEMLOCK_BYTES);
    let nofile = sys::raise_nofile();
    tracing::info!(
        gateway_id = %cfg.gateway_id,
        shards = cpus.len(),
        listen = %cfg.listen.http,
        durability = ?cfg.durability.mode,
        memlock,
        nofile,
        "starting"
    );
    let grace_ms = cfg.tokens.key_grace_s as i64 * 1000;
    let ring = load_keys(&cfg.keys_file, grace_ms, None)?;
    // One process per data directory: SO_REUSEPORT would happily let a second
    // gateway share the port, and two writers would corrupt the logs.
    std::fs::create_dir_all(&cfg.data_dir)
        .with_context(|| format!("creating data_dir {}", cfg.data_dir.display()))?;
    let lock_path = cfg.data_dir.join("LOCK");
    // Listeners are bound before recovery, so that connections made while
    // the logs are read wait in the backlog rather than being refused; in a
    // takeover, before the lock, so that the old process's queued
    // connections can move to them when it closes its listeners.
    let (_lock, mut listeners) = if takeover {
        let listeners = bind_listeners(&cfg, cpus.len())?;
        tracing::info!("listening; waiting for the data directory (takeover)");
        let deadline = Instant::now() + Duration::from_millis(cfg.drain.takeover_wait_ms);
        let lock = loop {
            match sys::lock_exclusive(&lock_path) {
                Ok(l) => break l,
                Err(_) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(20))
                }
                Err(e) => bail!(
                    "takeover: {} still locked after drain.takeover_wait_ms: {e}",
                    lock_path.display()
                ),
            }
        };
        (lock, listeners)
    } else {
        let lock = sys::lock_exclusive(&lock_path).with_context(|| {
            format!(
                "locking {}: is another gateway using this data_dir? (a rolling restart uses run --takeover)",
                lock_path.display()
            )
        })?;
        (lock, bind_listeners(&cfg, cpus.len())?)
    };
    let tls = if cfg.listen.https.is_some() || cfg.listen.http3.is_some() {
        Some(Arc::new(
            TlsHandle::load(&cfg.tls).context("loading the TLS certificate")?,
        ))
    } else {
        None
    };
    // The host-wide tables, on transparent huge pages.
    let dedup = DedupTable::new_in(
        cfg.dedup.entries_max,
        cfg.dedup.horizon_s.div_ceil(60) as u32,
        sys::huge_dedup_slots,
    );
    let velocity = VelocityTable::new_in(
        cfg.traffic.velocity_per_minute_max,
        cfg.traffic.velocity_entries_max,
        sys::huge_atomic_words,
    );
    let shared = Arc::new(Shared::new(dedup, velocity, cpus.len(), ring));

    // Signals first, so a SIGTERM during recovery is not lost.
    let mut signals = signal_hook::iterator::Signals::new([
        signal_hook::consts::SIGTERM,
        signal_hook::consts::SIGINT,
        signal_hook::consts::SIGHUP,
    ])?;

    // HTTP/3: each shard's UDP socket is bound now, so an address in use
    // fails the start; every shard's endpoint shares one server config
    // (token key, session cache) and one stateless reset key.
    let mut quic_setups: Vec<Option<_>> = Vec::new();
    let h3_slot = match (cfg.listen.http3, &tls) {
        (Some(addr), Some(tls)) => {
            let server_config = crate::h3::server_config(&cfg, tls)?;
            let reset_key = crate::h3::reset_key();
            let (routes, inboxes) =
                crate::h3::StrayRoutes::new(cpus.len(), cfg.limits.h3_stray_queue_max)?;
            let slot = Arc::new(crate::h3::ServerConfigSlot::new(server_config.clone()));
            let mut offloads = (false, false);
            for (i, strays) in inboxes.into_iter().enumerate() {
                let (socket, gro, gso) = crate::h3::bind(addr, &cfg)?;
                offloads = (gro, gso);
                quic_setups.push(Some((
                    crate::shard::QuicSetup {
                        socket,
                        gro,
                        gso,
                        server_config: server_config.clone(),
                        endpoint_config: crate::h3::endpoint_config(i, reset_key.clone()),
                        strays,
                        routes: routes.clone(),
                    },
                    slot.clone(),
                )));
            }
            let steering = match quic_setups.first() {
                Some(Some((first, _))) if cfg.listen.http3_bpf_steering => {
                    match crate::h3::attach_steering(&first.socket) {
                        Ok(()) => "bpf",
                        Err(e) => {
                            tracing::warn!(error = %e, "HTTP/3 BPF steering refused by the kernel; shards hand migrated datagrams over");
                            "queue"
                        }
                    }
                }
                _ => "queue",
            };
            let (gro, gso) = offloads;
            tracing::info!(%addr, gro, gso, steering, "HTTP/3 on every shard");
            Some(slot)
        }
        (Some(_), None) => bail!("listen.http3 needs [tls]"),
        (None, _) => {
            quic_setups.resize_with(cpus.len(), || None);
            None
        }
    };
    let inboxes = quic_setups;
    let (started_tx, started_rx) = mpsc::channel::<(usize, anyhow::Result<()>)>();
    let mut handles = Vec::new();
    for ((i, &cpu), inbox) in cpus.iter().enumerate().zip(inboxes) {
        let cfg = cfg.clone();
        let listeners = std::mem::take(&mut listeners[i]);
        let shared = shared.clone();
        let shared_go = shared.clone();
        let tls = tls.clone();
        let tx = started_tx.clone();
        let h = std::thread::Builder::new()
            .name(format!("shard-{i}"))
            .spawn(move || -> anyhow::Result<()> {
                let lp = match start_shard(i, cpu, &cfg, shared, tls, listeners, inbox) {
                    Ok(lp) => {
                        let _ = tx.send((i, Ok(())));
                        // Answer nothing until every shard has refilled the
                        // host-wide dedup table from its log: a shard that
                        // accepted early could take a retried click whose
                        // first copy is in a log not yet read.
                        while shared_go.state.get() == State::Starting {
                            std::thread::sleep(Duration::from_millis(1));
                        }
                        lp
                    }
                    Err(e) => {
                        let _ = tx.send((i, Err(anyhow::anyhow!("{e:#}"))));
                        return Err(e);
                    }
                };
                lp.run().context("shard event loop")
            })?;
        handles.push(h);
    }
    drop(started_tx);
    for _ in 0..cpus.len() {
        let (i, r) = started_rx
            .recv()
            .context("a shard thread died during start-up")?;
        if let Err(e) = r {
            shared.state.set(State::Draining);
            bail!("shard {i} failed to start: {e:#}");
        }
    }
    shared.state.set(State::Ready);
    tracing::info!(listen = %cfg.listen.http, "ready");

    let mut keys_mtime = mtime(&cfg.keys_file);
    let mut last_poll = Instant::now();
    // A pass over the dedup table every ~10 s (500 loop turns of 20 ms), a
    // slice per turn, so that counting never stalls the shard on this core.
    let mut live_scan = gateway_core::dedup::LiveScan::default();
    let scan_slice = shared.dedup.capacity().div_ceil(500);
    let mut drain_started: Option<Instant> = None;
    let mut withdraw_until: Option<Instant> = None;
    loop {
        for sig in signals.pending() {
            match sig {
                signal_hook::consts::SIGHUP => {
                    reload_keys(&cfg, &shared, grace_ms, "SIGHUP");
                    reload_tls(tls.as_deref());
                    if let (Some(slot), Some(tls)) = (&h3_slot, tls.as_deref()) {
                        if let Err(e) = slot.reload(&cfg, tls) {
                            tracing::error!(error = %format!("{e:#}"), "HTTP/3 certificate not reloaded");
                        }
                    }
                }
                _ => {
                    if drain_started.is_none()
                        && withdraw_until.is_none()
                        && cfg.drain.withdraw_ms > 0
                    {
                        tracing::info!(signal = sig, withdraw_ms = cfg.drain.withdraw_ms, "withdrawing: /readyz answers 503, still serving; draining after drain.withdraw_ms");
                        shared.state.set(State::Withdrawing);
                        withdraw_until =
                            Some(Instant::now() + Duration::from_millis(cfg.drain.withdraw_ms));
                    } else if drain_started.is_none() {
                        tracing::info!(signal = sig, "draining");
                        shared.state.set(State::Draining);
                        drain_started = Some(Instant::now());
                    }
                }
            }
        }
        if drain_started.is_none() && withdraw_until.is_some_and(|t| Instant::now() >= t) {
            tracing::info!("draining");
            shared.state.set(State::Draining);
            drain_started = Some(Instant::now());
        }
        if last_poll.elapsed() >= Duration::from_millis(cfg.tokens.keys_poll_ms) {
            last_poll = Instant::now();
            let m = mtime(&cfg.keys_file);
            if m != keys_mtime {
                keys_mtime = m;
                reload_keys(&cfg, &shared, grace_ms, "file changed");
            }
        }
        let now_min = wire::minute_of(now_ms());
        if let Some(live) = live_scan.step(&shared.dedup, scan_slice, now_min) {
            shared
                .registry
                .dedup_entries
                .store(live as u64, Ordering::Relaxed);
        }
        if handles.iter().all(|h| h.is_finished()) {
            break;
        }
        if drain_started.is_none() && handles.iter().any(|h| h.is_finished()) {
            // A shard stopped on its own: that is a failure; stop the rest.
            shared.state.set(State::Draining);
            drain_started = Some(Instant::now());
            tracing::error!("a shard stopped unexpectedly; draining the others");
        }
        if let Some(t) = drain_started {
            if t.elapsed() > Duration::from_millis(cfg.drain.timeout_ms + 5000) {
                bail!("drain did not finish within drain.timeout_ms + 5 s");
            }
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let mut failed = false;
    for (i, h) in handles.into_iter().enumerate() {
        match h.join() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                tracing::error!(shard = i, error = %format!("{e:#}"), "shard failed");
                failed = true;
            }
            Err(_) => {
                tracing::error!(shard = i, "shard panicked");
                failed = true;
            }
        }
    }
    if failed || drain_started.is_none() {
        bail!("gateway stopped with errors");
    }
    tracing::info!("drained; exiting");
    Ok(())
}

fn reload_keys(cfg: &Config, shared: &Shared, grace_ms: i64, why: &str) {
    let prev = shared.keys.ring.lock().unwrap().clone();
    match load_keys(&cfg.keys_file, grace_ms, Some(&prev)) {
        Ok(ring) => {
            let n = ring.len();
            *shared.keys.ring.lock().unwrap() = Arc::new(ring);
            shared.keys.version.fetch_add(1, Ordering::AcqRel);
            shared
                .registry
                .keys_loaded
                .store(n as u64, Ordering::Relaxed);
            shared
                .registry
                .key_reloads_ok
                .fetch_add(1, Ordering::Relaxed);
            tracing::info!(keys = n, why, "keys reloaded");
        }
        Err(e) => {
            shared
                .registry
                .key_reloads_failed
                .fetch_add(1, Ordering::Relaxed);
            tracing::error!(error = %format!("{e:#}"), why, "keys reload failed; keeping the old keys");
        }
    }
}

/// Each shard's SO_REUSEPORT listeners: plain HTTP, and HTTPS when set.
fn bind_listeners(cfg: &Config, shards: usize) -> anyhow::Result<Vec<Vec<Listener>>> {
    (0..shards)
        .map(|_| {
            let mut l = vec![Listener {
                socket: bind_listener(cfg.listen.http, cfg.listen.backlog)
                    .with_context(|| format!("binding listen.http {}", cfg.listen.http))?,
                tls: false,
                proxy_protocol: cfg.listen.http_proxy_protocol,
            }];
            if let Some(addr) = cfg.listen.https {
                l.push(Listener {
                    socket: bind_listener(addr, cfg.listen.backlog)
                        .with_context(|| format!("binding listen.https {addr}"))?,
                    tls: true,
                    proxy_protocol: cfg.listen.https_proxy_protocol,
                });
            }
            Ok(l)
        })
        .collect()
}

fn reload_tls(tls: Option<&TlsHandle>) {
    if let Some(tls) = tls {
        match tls.reload() {
            Ok(()) => tracing::info!("TLS certificate reloaded"),
            Err(e) => {
                tracing::error!(error = %format!("{e:#}"), "TLS reload failed; keeping the old certificate")
            }
        }
    }
}

/// Pins, recovers the shard's log, refills dedup and the pre-aggregate, binds
/// the listener: everything before the shard may answer.
fn start_shard(
    i: usize,
    cpu: usize,
    cfg: &Config,
    shared: Arc<Shared>,
    tls: Option<Arc<TlsHandle>>,
    listeners: Vec<Listener>,
    h3: Option<(crate::shard::QuicSetup, Arc<crate::h3::ServerConfigSlot>)>,
) -> anyhow::Result<ShardLoop> {
    if let Err(e) = sys::pin_to_cpu(cpu) {
        tracing::warn!(shard = i, cpu, error = %e, "could not pin shard");
    }
    let now = now_ms();
    let log_cfg = LogConfig {
        dir: shard_dir(&cfg.data_dir, i as u16),
        shard: i as u16,
        gateway_id: cfg.gateway_id.clone(),
        segment_bytes: cfg.log.segment_bytes as usize,
        disk_budget_bytes: cfg.log.disk_budget_bytes,
        zero_fill: cfg.log.zero_fill,
        sync_on_rotate: cfg.durability.mode == crate::config::DurabilityMode::Sync,
        partial_reserve_bytes: cfg.log.reserve_bytes() as usize,
        compress: cfg.log.compress.then_some(crate::log::CompressConfig {
            level: cfg.log.compress_level,
            chunk_bytes: cfg.log.chunk_bytes() as usize,
        }),
    };
    let t0 = Instant::now();
    let (mut log, rec) = ShardLog::open(&log_cfg, now)?;
    // Make whatever survived in the page cache durable before answering
    // anything that depends on it.
    log.sync_now().context("syncing the recovered log")?;
    let horizon_ms = cfg.dedup.horizon_s as i64 * 1000;
    // Rebuild the sums of records after the last partial without a row limit
    // (the partial written below empties it again at once).
    let mut preagg = PreAgg::new(usize::MAX, rec.last_partial_seq);
    let mut refilled = 0u64;
    let mut rebuilt = 0u64;
    log.replay_from(now - horizon_ms, rec.last_partial_seq, |f| {
        if f.ty != RecordType::Event as u8 {
            return;
        }
        let Ok(e) = EventRef::decode(f.payload) else {
            // A whole frame (its CRC matched) that does not decode is a bug
            // in the writer, not damage.
            panic!("shard {i}: undecodable event record at seq {}", f.seq);
        };
        if now - e.receive_ms < horizon_ms {
            let fp = shared
                .dedup
                .fingerprint(e.kind as u8, e.click_id.as_bytes());
            shared
                .dedup
                .check_and_insert(fp, wire::minute_of(e.receive_ms));
            refilled += 1;
        }
        if f.seq > rec.last_partial_seq {
            preagg.add(&e).expect("no row limit during rebuild");
            rebuilt += 1;
        }
    })?;
    let mut app = App::new(
        i,
        cfg.core_settings(),
        log,
        PreAgg::new(cfg.aggregate.rows_max, 0),
        shared,
        mono_ms(),
    );
    app.preagg = preagg;
    // Write the rebuilt partial now, so live sums start from a clean slate.
    app.append_partial(now)
        .context("writing the recovered partial")?;
    app.log.sync_now()?;
    app.durable_seq = app.log.last_seq();
    app.preagg = {
        let last = app.preagg.last_partial_seq();
        PreAgg::new(cfg.aggregate.rows_max, last)
    };
    tracing::info!(
        shard = i,
        cpu,
        segments = rec.segments,
        compressed = rec.compressed,
        compressions_settled = rec.compressions_settled,
        records = rec.frames,
        torn_bytes = rec.torn_bytes,
        dedup_refilled = refilled,
        partial_rebuilt_from = rebuilt,
        ms = t0.elapsed().as_millis() as u64,
        "recovered"
    );
    app.publish();
    Ok(ShardLoop::new(cfg, app, tls, listeners, h3)?)
}
