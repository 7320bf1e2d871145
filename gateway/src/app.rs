//! What a shard does with one parsed request: route, verify, dedup, police,
//! append, pre-aggregate, and write the answer. No sockets and no clock here:
//! the event loop passes `now` and the output buffer, and holds each answer
//! back until the log is durable up to the returned `wait_seq`.

use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};

use wire::record::{Device, EventKind, EventRef, Source, Verdict};

use crate::config::Config;
use crate::dedup::{DedupTable, Seen};
use crate::http::{HttpError, Method, Request, ResponseWriter};
use crate::limiter::{self, Admit, Pace, RateLimiter, VelocityTable};
use crate::log::{AppendError, ShardLog};
use crate::metrics::{Counters, Registry};
use crate::preagg::PreAgg;
use crate::token::{self, KeyRing, Policy, Reject};

pub const STARTING: u8 = 0;
pub const READY: u8 = 1;
pub const DRAINING: u8 = 2;

/// The current keyring, swapped by the reloader; shards copy the `Arc` on
/// their tick when `version` moved.
pub struct KeysHandle {
    pub version: AtomicU64,
    pub ring: Mutex<Arc<KeyRing>>,
}

/// What all shards of the process share.
pub struct Shared {
    pub dedup: DedupTable,
    /// Clicks per (address, ad) per minute, for the whole host.
    pub velocity: VelocityTable,
    pub registry: Registry,
    pub state: AtomicU8,
    pub keys: KeysHandle,
    /// The HTTPS / HTTP/3 certificate, when either is configured.
    pub tls: Option<crate::tls::TlsHandle>,
    /// Shards that stopped acknowledging: any makes the host not ready.
    pub shards_failed: AtomicU64,
}

/// The per-shard settings the request path reads, derived from [`Config`].
#[derive(Debug, Clone)]
pub struct Settings {
    pub click_policy: Policy,
    pub impression_policy: Policy,
    pub batch_click_policy: Policy,
    pub batch_impression_policy: Policy,
    pub batch_items_max: usize,
    pub flush_interval_ms: i64,
    pub retention_ms: i64,
    pub dedup_horizon_min: u32,
}

impl Settings {
    pub fn from_config(c: &Config) -> Self {
        let click = Policy {
            max_age_ms: c.tokens.max_age_s as i64 * 1000,
            future_skew_ms: c.tokens.future_skew_s as i64 * 1000,
            id_bytes_max: c.limits.id_bytes_max,
            url_bytes_max: c.limits.url_bytes_max,
            cost_micros_max: c.limits.cost_micros_max,
            need_redirect: true,
        };
        let impression = Policy {
            need_redirect: false,
            ..click
        };
        let batch_age = c.tokens.batch_max_age_s as i64 * 1000;
        Self {
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
            batch_items_max: c.limits.batch_items_max,
            flush_interval_ms: c.aggregate.flush_interval_ms as i64,
            retention_ms: c.log.retention_s as i64 * 1000,
            dedup_horizon_min: c.dedup.horizon_s.div_ceil(60) as u32,
        }
    }
}

/// What the event loop must do after a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Outcome {
    /// Hold the answer until the log is durable up to this seq (0: no wait).
    pub wait_seq: u64,
    /// Close the connection after the answer.
    pub close: bool,
}

const EP_CLICKS: usize = 0;
const EP_IMPRESSIONS: usize = 1;
const EP_EVENTS: usize = 2;
const EP_HEALTHZ: usize = 3;
const EP_READYZ: usize = 4;
const EP_METRICS: usize = 5;
const EP_OTHER: usize = 6;

/// One verdict of one signed event, before it is answered.
enum Item {
    /// `redirect` is where the verified redirect URL sits in the scratch buffer.
    Stored {
        seq: u64,
        verdict: Verdict,
        redirect: (usize, usize),
    },
    Refused(Reject),
    Unavailable(AppendError),
}

pub struct App {
    pub shard: usize,
    pub settings: Settings,
    pub log: ShardLog,
    pub preagg: PreAgg,
    pub shared: Arc<Shared>,
    keys: Arc<KeyRing>,
    keys_version: u64,
    limiter: RateLimiter,
    pub counters: Counters,
    scratch: Vec<u8>,
    /// Set when an fdatasync failed: nothing more is acknowledged.
    pub failed: bool,
    /// When the last partial was appended, on the monotonic clock
    /// ([`crate::shard::mono_ms`]): the flush interval must not stall when
    /// the wall clock steps back.
    last_partial_mono: i64,
    last_partial_warn_mono: i64,
    /// Reused for the short plain-text bodies of refusals.
    msg: Vec<u8>,
    /// Seq up to which a sync has completed (kept by the event loop).
    pub durable_seq: u64,
}

impl App {
    pub fn new(
        shard: usize,
        cfg: &Config,
        log: ShardLog,
        preagg: PreAgg,
        shared: Arc<Shared>,
    ) -> Self {
        let keys = shared.keys.ring.lock().unwrap().clone();
        let keys_version = shared.keys.version.load(Ordering::Acquire);
        let durable_seq = log.last_seq();
        Self {
            shard,
            settings: Settings::from_config(cfg),
            log,
            preagg,
            shared,
            keys,
            keys_version,
            limiter: RateLimiter::new(
                cfg.traffic.rate_per_s,
                cfg.traffic.rate_burst,
                cfg.traffic.rate_entries_max,
            ),
            counters: Counters::default(),
            scratch: vec![0u8; cfg.limits.header_bytes_max.max(cfg.limits.body_bytes_max)],
            failed: false,
            last_partial_mono: crate::shard::mono_ms(),
            last_partial_warn_mono: i64::MIN / 2,
            msg: Vec::with_capacity(128),
            durable_seq,
        }
    }

    fn draining(&self) -> bool {
        self.shared.state.load(Ordering::Relaxed) == DRAINING
    }

    /// Answers a request the framing layer refused; the connection closes.
    pub fn http_error(&mut self, e: HttpError, w: &mut ResponseWriter<'_>) -> Outcome {
        self.counters.drop(e.reason());
        self.counters.request(EP_OTHER, e.status());
        self.msg.clear();
        self.msg.extend_from_slice(e.reason().as_bytes());
        self.msg.push(b'\n');
        w.text(e.status(), &self.msg, false, None, None);
        Outcome {
            wait_seq: 0,
            close: true,
        }
    }

    /// Handles one whole request whose bytes are `buf` (ranges in `req`).
    pub fn handle(
        &mut self,
        buf: &[u8],
        req: &Request,
        peer: [u8; 16],
        now_ms: i64,
        w: &mut ResponseWriter<'_>,
    ) -> Outcome {
        let keep = req.keep_alive && !self.draining();
        let close = Outcome {
            wait_seq: 0,
            close: !keep,
        };
        let path = &buf[req.path.clone()];
        let (ep, allow): (usize, &str) = match path {
            b"/api/v1/clicks" => (EP_CLICKS, "GET"),
            b"/api/v1/impressions" => (EP_IMPRESSIONS, "GET"),
            b"/api/v1/events" => (EP_EVENTS, "POST"),
            b"/healthz" => (EP_HEALTHZ, "GET, HEAD"),
            b"/readyz" => (EP_READYZ, "GET, HEAD"),
            b"/metrics" => (EP_METRICS, "GET"),
            _ => {
                self.counters.drop("unknown_path");
                self.counters.request(EP_OTHER, 404);
                w.text(404, b"unknown path\n", keep, None, None);
                return close;
            }
        };
        let method_ok = match ep {
            EP_EVENTS => req.method == Method::Post,
            EP_HEALTHZ | EP_READYZ => matches!(req.method, Method::Get | Method::Head),
            _ => req.method == Method::Get,
        };
        if !method_ok {
            self.counters.drop("bad_method");
            self.counters.request(ep, 405);
            w.text(405, b"method not allowed\n", keep, None, Some(allow));
            return close;
        }
        match ep {
            EP_HEALTHZ => {
                self.counters.request(ep, 200);
                w.text(200, b"ok\n", keep, None, None);
                close
            }
            EP_READYZ => {
                let (status, body): (u16, &[u8]) = match self.shared.state.load(Ordering::Relaxed) {
                    _ if self.shared.shards_failed.load(Ordering::Relaxed) > 0 => {
                        (503, b"failed: a shard's durable write failed\n")
                    }
                    READY => (200, b"ready\n"),
                    DRAINING => (503, b"draining\n"),
                    _ => (503, b"starting\n"),
                };
                self.counters.request(ep, status);
                w.text(status, body, keep, None, None);
                close
            }
            EP_METRICS => {
                self.counters.request(ep, 200);
                self.publish();
                let at = w.begin_body(b"text/plain; version=0.0.4", keep);
                self.shared.registry.render(w.out);
                w.finish_body(at);
                close
            }
            // Event endpoints are rate-limited per client address first.
            _ if !self.admit(ep, peer, now_ms, keep, w) => close,
            EP_CLICKS | EP_IMPRESSIONS => self.single_event(ep, buf, req, peer, now_ms, keep, w),
            EP_EVENTS => self.batch(buf, req, peer, now_ms, keep, w),
            _ => unreachable!(),
        }
    }

    fn admit(
        &mut self,
        ep: usize,
        peer: [u8; 16],
        now_ms: i64,
        keep: bool,
        w: &mut ResponseWriter<'_>,
    ) -> bool {
        match self.limiter.admit(peer, now_ms) {
            Admit::Yes => true,
            Admit::Untracked => {
                self.counters.rate_untracked += 1;
                true
            }
            Admit::Limited { retry_after_s } => {
                self.counters.drop("rate_limited");
                self.counters.request(ep, 429);
                w.text(429, b"rate limited\n", keep, Some(retry_after_s), None);
                false
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn single_event(
        &mut self,
        ep: usize,
        buf: &[u8],
        req: &Request,
        peer: [u8; 16],
        now_ms: i64,
        keep: bool,
        w: &mut ResponseWriter<'_>,
    ) -> Outcome {
        let close = Outcome {
            wait_seq: 0,
            close: !keep,
        };
        let (kind, policy) = if ep == EP_CLICKS {
            (EventKind::Click, self.settings.click_policy)
        } else {
            (EventKind::Impression, self.settings.impression_policy)
        };
        let device = limiter::device_of(&buf[req.user_agent.clone()]);
        let country = limiter::country_of(req.country.clone().map(|r| &buf[r]));
        let query = &buf[req.query.clone()];
        let mut scratch = std::mem::take(&mut self.scratch);
        let item = self.one_item(
            kind,
            query,
            &policy,
            Source::Get,
            device,
            country,
            peer,
            now_ms,
            &mut scratch,
        );
        let out = match item {
            Item::Stored {
                seq,
                redirect: (s, e),
                ..
            } => {
                if kind == EventKind::Click {
                    w.redirect(&scratch[s..e], keep);
                    self.counters.request(ep, 302);
                } else {
                    w.no_content(keep);
                    self.counters.request(ep, 204);
                }
                Outcome {
                    wait_seq: seq,
                    close: !keep,
                }
            }
            Item::Refused(r) => {
                // A reused buffer: a flood of bad requests allocates nothing.
                self.msg.clear();
                r.message(&mut self.msg);
                self.counters.request(ep, r.status());
                w.text(r.status(), &self.msg, keep, None, None);
                close
            }
            Item::Unavailable(e) => {
                self.counters.request(ep, 503);
                let body: &[u8] = match e {
                    AppendError::Budget => b"log full: unshipped data at disk budget\n",
                    ref e if e.is_no_space() => b"log full: no space left on the device\n",
                    _ => b"log unavailable\n",
                };
                w.text(503, body, keep, Some(1), None);
                close
            }
        };
        self.scratch = scratch;
        out
    }

    /// Verifies, dedups, polices and appends one signed event.
    #[allow(clippy::too_many_arguments)]
    fn one_item(
        &mut self,
        kind: EventKind,
        query: &[u8],
        policy: &Policy,
        source: Source,
        device: Device,
        country: [u8; 2],
        peer: [u8; 16],
        now_ms: i64,
        scratch: &mut [u8],
    ) -> Item {
        let scratch_base = scratch.as_ptr() as usize;
        if self.failed {
            self.counters.drop("log_error");
            return Item::Unavailable(AppendError::Io(std::io::Error::other("log failed")));
        }
        // The dedup and velocity slots' misses to memory overlap the MAC. (An
        // id with escapes, unusual, is hashed once decoded instead.)
        let paced =
            kind == EventKind::Click && source == Source::Get && self.shared.velocity.enabled();
        let (mut early_fp, mut early_pace) = (None, None);
        let s = match token::split(query).and_then(|split| {
            if let Some(id) = split.plain_click_id() {
                let fp = self.shared.dedup.fingerprint(kind as u8, id);
                self.shared.dedup.prefetch(fp);
                early_fp = Some(fp);
            }
            if let Some(ad) = split.plain_ad_id().filter(|_| paced) {
                let key = self.shared.velocity.key(&peer, ad);
                self.shared.velocity.prefetch(key);
                early_pace = Some(key);
            }
            split.verify(&self.keys, policy, now_ms, scratch)
        }) {
            Ok(s) => s,
            Err(r) => {
                self.counters.reject(r);
                return Item::Refused(r);
            }
        };
        let event_ms = match source {
            Source::Get => now_ms,
            Source::Batch => s.timestamp_s * 1000,
        };
        let mut e = EventRef {
            kind,
            verdict: Verdict::Accepted,
            source,
            device,
            country,
            event_ms,
            receive_ms: now_ms,
            signed_ts_s: s.timestamp_s,
            cost_micros: s.cost_micros,
            client_ip: peer,
            kid: s.kid,
            advertiser_id: s.advertiser_id,
            campaign_id: s.campaign_id,
            ad_id: s.ad_id,
            click_id: s.click_id,
            user_id: s.user_id,
            redirect_url: s.redirect_url,
        };
        // Room in the log and in the row table first: once the click id is in
        // the dedup table, the event must be written, or a retry would be
        // taken for a duplicate of a click that was never stored.
        if let Err(err) = self.log.ensure_room(e.encoded_len(), now_ms) {
            self.counters.drop(match err {
                AppendError::Budget => "disk_full",
                ref e if e.is_no_space() => "disk_full",
                _ => "log_error",
            });
            return Item::Unavailable(err);
        }
        if !self.preagg.has_room_for(&e) {
            if let Err(err) = self.append_partial(now_ms) {
                self.counters.drop("log_error");
                return Item::Unavailable(err);
            }
            if let Err(err) = self.log.ensure_room(e.encoded_len(), now_ms) {
                self.counters.drop("disk_full");
                return Item::Unavailable(err);
            }
        }
        let minute = wire::minute_of(now_ms);
        let fp = early_fp.unwrap_or_else(|| {
            self.shared
                .dedup
                .fingerprint(kind as u8, s.click_id.as_bytes())
        });
        let seen = self.shared.dedup.check_and_insert(fp, minute);
        if seen == Seen::NewEvicted {
            self.counters.dedup_evictions += 1;
        }
        let too_fast = paced
            && match self.shared.velocity.check_key(
                early_pace.unwrap_or_else(|| self.shared.velocity.key(&peer, s.ad_id.as_bytes())),
                minute,
            ) {
                Pace::Ok => false,
                Pace::TooFast => true,
                Pace::Untracked => {
                    self.counters.velocity_untracked += 1;
                    false
                }
            };
        e.verdict = if seen == Seen::Duplicate {
            Verdict::Duplicate
        } else if too_fast {
            Verdict::Invalid
        } else {
            Verdict::Accepted
        };
        let seq = self
            .log
            .append_event(&e, now_ms)
            .expect("room was ensured before the dedup insert");
        self.preagg.add(&e).expect("row room was ensured");
        self.counters.event(kind, e.verdict);
        self.counters.records_appended += 1;
        self.counters.bytes_appended += wire::segment::frame_len(e.encoded_len()) as u64;
        let redirect = if e.redirect_url.is_empty() {
            (0, 0)
        } else {
            let start = e.redirect_url.as_ptr() as usize - scratch_base;
            (start, start + e.redirect_url.len())
        };
        Item::Stored {
            seq,
            verdict: e.verdict,
            redirect,
        }
    }

    fn batch(
        &mut self,
        buf: &[u8],
        req: &Request,
        peer: [u8; 16],
        now_ms: i64,
        keep: bool,
        w: &mut ResponseWriter<'_>,
    ) -> Outcome {
        let close = Outcome {
            wait_seq: 0,
            close: !keep,
        };
        let body = &buf[req.body.clone()];
        let lines = || {
            body.split(|&b| b == b'\n')
                .map(|l| l.strip_suffix(b"\r").unwrap_or(l))
                .filter(|l| !l.is_empty())
        };
        let n = lines().count();
        if n > self.settings.batch_items_max {
            self.counters.drop("too_many_items");
            self.counters.request(EP_EVENTS, 413);
            w.text(413, b"too many items in batch\n", keep, None, None);
            return close;
        }
        let device = limiter::device_of(&buf[req.user_agent.clone()]);
        let country = limiter::country_of(req.country.clone().map(|r| &buf[r]));
        let mut scratch = std::mem::take(&mut self.scratch);
        let at = w.begin_body(b"text/plain; charset=utf-8", keep);
        let mut wait_seq = 0;
        for line in lines() {
            let (kind, policy, query) = if let Some(q) = line.strip_prefix(b"/api/v1/clicks?") {
                (EventKind::Click, self.settings.batch_click_policy, q)
            } else if let Some(q) = line.strip_prefix(b"/api/v1/impressions?") {
                (
                    EventKind::Impression,
                    self.settings.batch_impression_policy,
                    q,
                )
            } else {
                self.counters.reject(Reject::BadField("path"));
                w.out.extend_from_slice(b"rejected bad_field: path\n");
                continue;
            };
            let item = self.one_item(
                kind,
                query,
                &policy,
                Source::Batch,
                device,
                country,
                peer,
                now_ms,
                &mut scratch,
            );
            match item {
                Item::Stored { seq, verdict, .. } => {
                    wait_seq = seq;
                    w.out.extend_from_slice(verdict.as_str().as_bytes());
                    w.out.push(b'\n');
                }
                Item::Refused(r) => {
                    w.out.extend_from_slice(b"rejected ");
                    r.message(w.out);
                }
                Item::Unavailable(_) => w.out.extend_from_slice(b"unavailable retry\n"),
            }
        }
        w.finish_body(at);
        self.scratch = scratch;
        self.counters.request(EP_EVENTS, 200);
        Outcome {
            wait_seq,
            close: !keep,
        }
    }

    /// Appends the partial for everything since the previous one.
    /// A durable write failed: this shard acknowledges nothing more, and the
    /// host reports not ready (whichever shard answers /readyz).
    pub fn fail(&mut self) {
        if !self.failed {
            self.failed = true;
            self.shared.shards_failed.fetch_add(1, Ordering::Relaxed);
        }
    }

    pub fn append_partial(&mut self, now_ms: i64) -> Result<u64, AppendError> {
        let p = self.preagg.partial(self.log.next_seq(), now_ms);
        let seq = self.log.append_partial(&p, now_ms)?;
        wire::failpoint::hit("gateway_partial_staged");
        self.preagg.committed(seq);
        self.counters.partials_appended += 1;
        self.counters.records_appended += 1;
        self.last_partial_mono = crate::shard::mono_ms();
        Ok(seq)
    }

    /// Periodic work: partials, key refresh, segment recycling, metrics.
    pub fn tick(&mut self, now_ms: i64) {
        self.log.prefault();
        let mono = crate::shard::mono_ms();
        if mono - self.last_partial_mono >= self.settings.flush_interval_ms && !self.failed {
            if let Err(e) = self.append_partial(now_ms) {
                // Once a minute at most: a full disk would otherwise log this
                // every flush interval. Counted every time.
                self.counters.drop("partial_deferred");
                if mono - self.last_partial_warn_mono >= 60_000 {
                    self.last_partial_warn_mono = mono;
                    tracing::warn!(shard = self.shard, error = %e, "partial not appended; will retry");
                }
            }
        }
        let v = self.shared.keys.version.load(Ordering::Acquire);
        if v != self.keys_version {
            self.keys = self.shared.keys.ring.lock().unwrap().clone();
            self.keys_version = v;
        }
        self.limiter.sweep(now_ms);
    }

    /// Deletes segments the shipper has acknowledged (`shipped_seq`).
    pub fn recycle(&mut self, shipped_seq: u64, now_ms: i64) {
        let n = self
            .log
            .recycle(shipped_seq, self.settings.retention_ms, now_ms);
        self.counters.segments_recycled += n as u64;
    }

    /// Copies the shard's counters to the shared registry.
    pub fn publish(&mut self) {
        self.counters.preagg_rows = self.preagg.rows() as u64;
        self.counters.log_segments = self.log.segments() as u64;
        self.counters.log_disk_bytes = self.log.disk_bytes();
        self.counters.log_last_seq = self.log.last_seq();
        self.counters.log_durable_seq = self.durable_seq;
        self.shared.registry.publish(self.shard, &self.counters);
    }
}
