//! What a shard does with one parsed request: route, verify, dedup, police,
//! append, pre-aggregate, and write the answer. No sockets, no files and no
//! clock here: the event loop passes `now` (wall and monotonic) and the
//! output buffer, and holds each answer back until the log is durable up to
//! the returned `wait_seq`.

use std::collections::BTreeMap;
use std::io::Write as _;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};

use wire::record::{Device, EventKind, EventRef, Source, Verdict};

use crate::buffer::BufferGauge;
use crate::dedup::{DedupTable, Seen};
use crate::http::{HttpError, Method, Request, ResponseWriter};
use crate::limiter::{self, Admit, Pace, RateLimiter, VelocityTable};
use crate::log::{AppendError, Log};
use crate::metrics::{Counters, DropReason, Registry};
use crate::preagg::PreAgg;
use crate::token::{self, KeyRing, Policy, Reject};

/// Where the host is in its life: what `/readyz` says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum State {
    /// Recovering logs and refilling the dedup table: nothing is answered.
    Starting = 0,
    Ready = 1,
    /// Told to stop: finishing what is in flight, refusing new connections.
    Draining = 2,
    /// Told to stop, and waiting `drain.withdraw_ms` for health checks to
    /// take the host out (anycast withdraws its route, DNS stops handing it
    /// out) before draining: `/readyz` answers 503 while clicks are still
    /// served, each answer closing its connection so that the client's next
    /// one follows the new route.
    Withdrawing = 3,
}

/// The host's [`State`], shared by its shards and its supervisor.
#[derive(Debug)]
pub struct HostState(AtomicU8);

impl HostState {
    pub fn new(s: State) -> Self {
        Self(AtomicU8::new(s as u8))
    }

    pub fn get(&self) -> State {
        match self.0.load(Ordering::Acquire) {
            0 => State::Starting,
            1 => State::Ready,
            3 => State::Withdrawing,
            _ => State::Draining,
        }
    }

    pub fn set(&self, s: State) {
        self.0.store(s as u8, Ordering::Release);
    }
}

/// The gateway's routes. `Other` is every path it does not serve, and the
/// requests refused before routing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    Clicks,
    Impressions,
    Events,
    Healthz,
    Readyz,
    Metrics,
    Other,
}

impl Endpoint {
    pub const ALL: [Endpoint; 7] = [
        Self::Clicks,
        Self::Impressions,
        Self::Events,
        Self::Healthz,
        Self::Readyz,
        Self::Metrics,
        Self::Other,
    ];

    /// The route of a request path (`Other` when none).
    pub fn route(path: &[u8]) -> Endpoint {
        match path {
            b"/api/v1/clicks" => Self::Clicks,
            b"/api/v1/impressions" => Self::Impressions,
            b"/api/v1/events" => Self::Events,
            b"/healthz" => Self::Healthz,
            b"/readyz" => Self::Readyz,
            b"/metrics" => Self::Metrics,
            _ => Self::Other,
        }
    }

    /// The `endpoint` label in `/metrics`.
    pub fn name(self) -> &'static str {
        match self {
            Self::Clicks => "clicks",
            Self::Impressions => "impressions",
            Self::Events => "events",
            Self::Healthz => "healthz",
            Self::Readyz => "readyz",
            Self::Metrics => "metrics",
            Self::Other => "other",
        }
    }

    pub fn allows(self, m: Method) -> bool {
        match self {
            Self::Events => m == Method::Post,
            Self::Healthz | Self::Readyz => matches!(m, Method::Get | Method::Head),
            _ => m == Method::Get,
        }
    }

    /// The `Allow` header of a 405.
    pub fn allow_header(self) -> &'static str {
        match self {
            Self::Events => "POST",
            Self::Healthz | Self::Readyz => "GET, HEAD",
            _ => "GET",
        }
    }
}

const _: () = {
    let mut i = 0;
    while i < Endpoint::ALL.len() {
        assert!(Endpoint::ALL[i] as usize == i);
        i += 1;
    }
};

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
    pub state: HostState,
    pub keys: KeysHandle,
    /// Shards that stopped acknowledging: any makes the host not ready.
    pub shards_failed: AtomicU64,
    /// Per shard: unshipped data past `log.unready_at_budget_share` (and not
    /// yet back below the lower mark): any makes the host not ready.
    pub stepped_aside: Box<[AtomicBool]>,
    /// Per shard: unshipped bytes over the budget, in thousandths (for the
    /// `/readyz` answer).
    pub budget_permille: Box<[AtomicU32]>,
}

impl Shared {
    /// What the shards of one host share, starting up, with `keys` in force.
    pub fn new(dedup: DedupTable, velocity: VelocityTable, shards: usize, keys: KeyRing) -> Self {
        let registry = Registry::new(shards);
        registry
            .dedup_capacity
            .store(dedup.capacity() as u64, Ordering::Relaxed);
        registry
            .keys_loaded
            .store(keys.len() as u64, Ordering::Relaxed);
        Self {
            dedup,
            velocity,
            registry,
            state: HostState::new(State::Starting),
            keys: KeysHandle {
                version: AtomicU64::new(1),
                ring: Mutex::new(Arc::new(keys)),
            },
            shards_failed: AtomicU64::new(0),
            stepped_aside: (0..shards).map(|_| AtomicBool::new(false)).collect(),
            budget_permille: (0..shards).map(|_| AtomicU32::new(0)).collect(),
        }
    }
}

/// What a click or impression gets when the log has no room for its record
/// (`log.on_full`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnFull {
    /// 503 with Retry-After: nothing is answered without its record.
    #[default]
    Refuse,
    /// The 302 (an impression's 204) without a record: counted as
    /// unrecorded, per minute, and never billed.
    Redirect,
}

/// The per-shard settings the request path reads (the shell derives them
/// from its config).
#[derive(Debug, Clone)]
pub struct Settings {
    pub click_policy: Policy,
    pub impression_policy: Policy,
    pub batch_click_policy: Policy,
    pub batch_impression_policy: Policy,
    pub batch_items_max: usize,
    /// How often a partial is appended, ms (monotonic clock).
    pub flush_interval_ms: i64,
    /// Requests per second per client address (0: no limit), its burst, and
    /// how many addresses the limiter tracks.
    pub rate_per_s: u32,
    pub rate_burst: u32,
    pub rate_entries_max: usize,
    /// The decode buffer: at least the longest query or body a request may
    /// carry.
    pub scratch_bytes: usize,
    /// When the log is full.
    pub on_full: OnFull,
    /// Step aside (`/readyz` 503) past this share of the disk budget held
    /// by unshipped data; come back below the second.
    pub unready_at_budget_share: f64,
    pub ready_below_budget_share: f64,
}

/// What the periodic work did that the shell should know of.
#[derive(Debug, Default)]
pub struct TickReport {
    /// A partial was due and could not be appended (it is retried next
    /// tick, and counted under `partial_deferred`).
    pub partial_deferred: Option<AppendError>,
    /// The shard just stepped aside (true) or came back (false).
    pub stepped_aside: Option<bool>,
    /// The buffer gauges as this tick found them.
    pub buffer: Option<crate::buffer::BufferReport>,
}

/// What the event loop must do after a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Outcome {
    /// Hold the answer until the log is durable up to this seq (0: no wait).
    pub wait_seq: u64,
    /// Close the connection after the answer.
    pub close: bool,
}

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
    /// Verified, but the log was full and `log.on_full` is `redirect`:
    /// answered without a record.
    Unrecorded {
        redirect: (usize, usize),
    },
}

/// Most minutes of unrecorded counts held for the next partial; past it the
/// newest minute takes the rest (a week of minutes: partials that cannot be
/// written for that long have bigger problems).
const UNRECORDED_MINUTES_MAX: usize = 7 * 24 * 60;

pub struct App<L> {
    pub shard: usize,
    pub settings: Settings,
    pub log: L,
    pub preagg: PreAgg,
    pub shared: Arc<Shared>,
    keys: Arc<KeyRing>,
    keys_version: u64,
    limiter: RateLimiter,
    pub counters: Counters,
    scratch: Vec<u8>,
    /// Set when an fdatasync failed: nothing more is acknowledged.
    pub failed: bool,
    /// When the last partial was appended, on the monotonic clock: the
    /// flush interval must not stall when the wall clock steps back.
    last_partial_mono: i64,
    /// Reused for the short plain-text bodies of refusals.
    msg: Vec<u8>,
    /// Seq up to which a sync has completed (kept by the event loop).
    pub durable_seq: u64,
    /// Events answered without a record since the last partial, per
    /// event-time minute (see [`OnFull::Redirect`]).
    unrecorded: BTreeMap<u32, u64>,
    buffer: BufferGauge,
}

impl<L: Log> App<L> {
    /// A shard's request handler over `log` (whose records up to its last
    /// seq are taken as durable), at `mono_ms` on the monotonic clock.
    pub fn new(
        shard: usize,
        settings: Settings,
        log: L,
        preagg: PreAgg,
        shared: Arc<Shared>,
        mono_ms: i64,
    ) -> Self {
        let keys = shared.keys.ring.lock().unwrap().clone();
        let keys_version = shared.keys.version.load(Ordering::Acquire);
        let durable_seq = log.last_seq();
        let buffer = BufferGauge::new(
            settings.unready_at_budget_share,
            settings.ready_below_budget_share,
        );
        Self {
            shard,
            limiter: RateLimiter::new(
                settings.rate_per_s,
                settings.rate_burst,
                settings.rate_entries_max,
            ),
            scratch: vec![0u8; settings.scratch_bytes],
            settings,
            log,
            preagg,
            shared,
            keys,
            keys_version,
            counters: Counters::default(),
            failed: false,
            last_partial_mono: mono_ms,
            msg: Vec::with_capacity(128),
            durable_seq,
            unrecorded: BTreeMap::new(),
            buffer,
        }
    }

    /// Draining or withdrawing: answers close their connections.
    fn draining(&self) -> bool {
        matches!(
            self.shared.state.get(),
            State::Draining | State::Withdrawing
        )
    }

    /// Answers a request the framing layer refused; the connection closes.
    pub fn http_error(&mut self, e: HttpError, w: &mut ResponseWriter<'_>) -> Outcome {
        self.counters.drop(e.reason());
        self.counters.request(Endpoint::Other, e.status());
        self.msg.clear();
        self.msg.extend_from_slice(e.reason().as_str().as_bytes());
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
        let ep = Endpoint::route(&buf[req.path.clone()]);
        if ep == Endpoint::Other {
            self.counters.drop(DropReason::UnknownPath);
            self.counters.request(ep, 404);
            w.text(404, b"unknown path\n", keep, None, None);
            return close;
        }
        if !ep.allows(req.method) {
            self.counters.drop(DropReason::BadMethod);
            self.counters.request(ep, 405);
            w.text(
                405,
                b"method not allowed\n",
                keep,
                None,
                Some(ep.allow_header()),
            );
            return close;
        }
        match ep {
            Endpoint::Healthz => {
                self.counters.request(ep, 200);
                w.text(200, b"ok\n", keep, None, None);
                close
            }
            Endpoint::Readyz => {
                let aside = self
                    .shared
                    .stepped_aside
                    .iter()
                    .position(|a| a.load(Ordering::Relaxed));
                self.msg.clear();
                let status = match self.shared.state.get() {
                    _ if self.shared.shards_failed.load(Ordering::Relaxed) > 0 => {
                        self.msg
                            .extend_from_slice(b"failed: a shard's durable write failed\n");
                        503
                    }
                    State::Ready if aside.is_some() => {
                        let i = aside.unwrap_or(0);
                        let permille = self.shared.budget_permille[i].load(Ordering::Relaxed);
                        let _ = writeln!(
                            self.msg,
                            "stepping aside: shard {i} holds unshipped data at {}.{}% of log.disk_budget_bytes (ready again below {}%)",
                            permille / 10,
                            permille % 10,
                            (self.settings.ready_below_budget_share * 100.0).round()
                        );
                        503
                    }
                    State::Ready => {
                        self.msg.extend_from_slice(b"ready\n");
                        200
                    }
                    State::Draining => {
                        self.msg.extend_from_slice(b"draining\n");
                        503
                    }
                    State::Withdrawing => {
                        self.msg.extend_from_slice(
                            b"withdrawing: stopping; serving until drain.withdraw_ms has passed\n",
                        );
                        503
                    }
                    State::Starting => {
                        self.msg.extend_from_slice(b"starting\n");
                        503
                    }
                };
                self.counters.request(ep, status);
                w.text(status, &self.msg, keep, None, None);
                close
            }
            Endpoint::Metrics => {
                self.counters.request(ep, 200);
                self.publish();
                let at = w.begin_body(b"text/plain; version=0.0.4", keep);
                self.shared.registry.render(w.out);
                w.finish_body(at);
                close
            }
            // Event endpoints are rate-limited per client address first.
            _ if !self.admit(ep, peer, now_ms, keep, w) => close,
            Endpoint::Clicks => {
                self.single_event(EventKind::Click, buf, req, peer, now_ms, keep, w)
            }
            Endpoint::Impressions => {
                self.single_event(EventKind::Impression, buf, req, peer, now_ms, keep, w)
            }
            Endpoint::Events => self.batch(buf, req, peer, now_ms, keep, w),
            Endpoint::Other => unreachable!("refused above"),
        }
    }

    fn admit(
        &mut self,
        ep: Endpoint,
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
                self.counters.drop(DropReason::RateLimited);
                self.counters.request(ep, 429);
                w.text(429, b"rate limited\n", keep, Some(retry_after_s), None);
                false
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn single_event(
        &mut self,
        kind: EventKind,
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
        let (ep, policy) = match kind {
            EventKind::Click => (Endpoint::Clicks, self.settings.click_policy),
            EventKind::Impression => (Endpoint::Impressions, self.settings.impression_policy),
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
                self.answer_event(kind, ep, &scratch[s..e], keep, w);
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
            Item::Unrecorded { redirect: (s, e) } => {
                self.answer_event(kind, ep, &scratch[s..e], keep, w);
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
            self.counters.drop(DropReason::LogError);
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
        let full = |app: &mut Self, err: AppendError| {
            // The redirect is inside the signed bytes just verified, so
            // answering it without a record is never an open redirect.
            if err.is_no_space()
                && app.settings.on_full == OnFull::Redirect
                && source == Source::Get
            {
                app.counters.unrecorded_redirects += 1;
                let minute = wire::minute_of(now_ms);
                if app.unrecorded.len() < UNRECORDED_MINUTES_MAX
                    || app.unrecorded.contains_key(&minute)
                {
                    *app.unrecorded.entry(minute).or_default() += 1;
                } else if let Some(mut last) = app.unrecorded.last_entry() {
                    *last.get_mut() += 1;
                }
                let redirect = if e.redirect_url.is_empty() {
                    (0, 0)
                } else {
                    let start = e.redirect_url.as_ptr() as usize - scratch_base;
                    (start, start + e.redirect_url.len())
                };
                return Item::Unrecorded { redirect };
            }
            app.counters.drop(if err.is_no_space() {
                DropReason::DiskFull
            } else {
                DropReason::LogError
            });
            Item::Unavailable(err)
        };
        if let Err(err) = self.log.ensure_room(e.encoded_len(), now_ms) {
            return full(self, err);
        }
        if !self.preagg.has_room_for(&e) {
            if let Err(err) = self.append_partial(now_ms) {
                return full(self, err);
            }
            if let Err(err) = self.log.ensure_room(e.encoded_len(), now_ms) {
                return full(self, err);
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

    /// A click's 302 to its redirect, an impression's 204.
    fn answer_event(
        &mut self,
        kind: EventKind,
        ep: Endpoint,
        redirect: &[u8],
        keep: bool,
        w: &mut ResponseWriter<'_>,
    ) {
        if kind == EventKind::Click {
            w.redirect(redirect, keep);
            self.counters.request(ep, 302);
        } else {
            w.no_content(keep);
            self.counters.request(ep, 204);
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
        if req.early_data {
            // POST is not a safe method: replayed early data must not apply
            // a batch (RFC 8470); the client sends it again once the
            // handshake is done. A click (GET) goes through: a replay of it
            // is answered as a duplicate of its click id.
            self.counters.drop(DropReason::TooEarly);
            self.counters.request(Endpoint::Events, 425);
            w.text(
                425,
                b"too early: send the batch again after the handshake\n",
                keep,
                None,
                None,
            );
            return close;
        }
        let body = &buf[req.body.clone()];
        let lines = || {
            body.split(|&b| b == b'\n')
                .map(|l| l.strip_suffix(b"\r").unwrap_or(l))
                .filter(|l| !l.is_empty())
        };
        let n = lines().count();
        if n > self.settings.batch_items_max {
            self.counters.drop(DropReason::TooManyItems);
            self.counters.request(Endpoint::Events, 413);
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
                Item::Unavailable(_) | Item::Unrecorded { .. } => {
                    w.out.extend_from_slice(b"unavailable retry\n")
                }
            }
        }
        w.finish_body(at);
        self.scratch = scratch;
        self.counters.request(Endpoint::Events, 200);
        Outcome {
            wait_seq,
            close: !keep,
        }
    }

    /// A durable write failed: this shard acknowledges nothing more, and the
    /// host reports not ready (whichever shard answers /readyz).
    pub fn fail(&mut self) {
        if !self.failed {
            self.failed = true;
            self.shared.shards_failed.fetch_add(1, Ordering::Relaxed);
            self.shared
                .registry
                .shards_failed
                .fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Appends the partial for everything since the previous one.
    pub fn append_partial(&mut self, now_ms: i64) -> Result<u64, AppendError> {
        let mut p = self.preagg.partial(self.log.next_seq(), now_ms);
        p.unrecorded = self.unrecorded.iter().map(|(m, n)| (*m, *n)).collect();
        let seq = self.log.append_partial(&p, now_ms)?;
        self.preagg.committed(seq);
        self.unrecorded.clear();
        self.counters.partials_appended += 1;
        self.counters.records_appended += 1;
        Ok(seq)
    }

    /// Periodic work: the partial when the flush interval has passed, key
    /// refresh, the limiter's sweep.
    pub fn tick(&mut self, now_ms: i64, mono_ms: i64) -> TickReport {
        let mut report = TickReport::default();
        if mono_ms - self.last_partial_mono >= self.settings.flush_interval_ms && !self.failed {
            match self.append_partial(now_ms) {
                Ok(_) => self.last_partial_mono = mono_ms,
                Err(e) => {
                    self.counters.drop(DropReason::PartialDeferred);
                    report.partial_deferred = Some(e);
                }
            }
        }
        let v = self.shared.keys.version.load(Ordering::Acquire);
        if v != self.keys_version {
            self.keys = self.shared.keys.ring.lock().unwrap().clone();
            self.keys_version = v;
        }
        self.limiter.sweep(now_ms);
        let b = self.log.buffer();
        let r = self
            .buffer
            .update(mono_ms, now_ms, self.counters.bytes_appended, &b);
        let c = &mut self.counters;
        c.log_unshipped_bytes = b.unshipped_bytes;
        c.log_budget_bytes = b.budget_bytes;
        c.log_buffer_share_permille = (r.share * 1000.0).round() as u64;
        c.log_buffer_left_s = if r.seconds_left.is_finite() {
            r.seconds_left as u64
        } else {
            u64::MAX
        };
        c.log_oldest_unshipped_age_ms = r.oldest_unshipped_age_ms;
        c.log_stepped_aside = r.stepped_aside as u64;
        let aside = &self.shared.stepped_aside[self.shard];
        if aside.swap(r.stepped_aside, Ordering::Relaxed) != r.stepped_aside {
            report.stepped_aside = Some(r.stepped_aside);
        }
        self.shared.budget_permille[self.shard]
            .store(c.log_buffer_share_permille as u32, Ordering::Relaxed);
        report.buffer = Some(r);
        report
    }

    /// Copies the shard's counters to the shared registry (the buffer
    /// gauges as the last tick found them).
    pub fn publish(&mut self) {
        self.counters.preagg_rows = self.preagg.rows() as u64;
        self.counters.log_segments = self.log.segments() as u64;
        self.counters.log_disk_bytes = self.log.disk_bytes();
        self.counters.log_last_seq = self.log.last_seq();
        self.counters.log_durable_seq = self.durable_seq;
        self.shared.registry.publish(self.shard, &self.counters);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::http::{parse, Limits, Parse};
    use crate::log::MemLog;
    use wire::record::{EventRef, PartialRecord};
    use wire::segment::RecordType;

    const SECRET: [u8; 32] = [9; 32];
    /// 2026-11-24T05:00:00Z.
    const NOW_MS: i64 = 1_795_496_400_000;
    const LIMITS: Limits = Limits {
        header_bytes_max: 8192,
        headers_max: 64,
        body_bytes_max: 1 << 16,
    };

    fn settings() -> Settings {
        let click = Policy::DEFAULT_CLICK;
        let impression = Policy {
            need_redirect: false,
            ..click
        };
        Settings {
            click_policy: click,
            impression_policy: impression,
            batch_click_policy: click,
            batch_impression_policy: impression,
            batch_items_max: 4,
            flush_interval_ms: 1000,
            rate_per_s: 0,
            rate_burst: 100,
            rate_entries_max: 1000,
            scratch_bytes: 1 << 16,
            on_full: OnFull::Refuse,
            unready_at_budget_share: 0.9,
            ready_below_budget_share: 0.8,
        }
    }

    fn app(log: MemLog) -> App<MemLog> {
        let keys = KeyRing::parse(
            &format!(
                "[[key]]\nkid = \"k1\"\nsecret = \"{}\"\n",
                base64::Engine::encode(&wire::signed::B64, SECRET)
            ),
            0,
            None,
            NOW_MS,
        )
        .unwrap();
        let shared = Arc::new(Shared::new(
            DedupTable::new(1024, 15),
            VelocityTable::new(3, 1024),
            1,
            keys,
        ));
        shared.state.set(State::Ready);
        App::new(0, settings(), log, PreAgg::new(1000, 0), shared, 0)
    }

    fn click_query(id: &str) -> String {
        wire::signed::Click {
            ad_id: "ad-1",
            advertiser_id: "adv-1",
            campaign_id: "camp-1",
            click_id: id,
            user_id: "u-1",
            cost_per_click: "0.25",
            timestamp: NOW_MS / 1000,
            redirect_url: "https://shop.example/landing?item=7",
            kid: "k1",
        }
        .signed_query(&SECRET)
    }

    /// Sends `raw` from `peer` and returns (outcome, answer).
    fn send(a: &mut App<MemLog>, raw: &str, peer: u8) -> (Outcome, String) {
        let mut buf = raw.as_bytes().to_vec();
        let Parse::Request(req) = parse(&mut buf, &LIMITS, "x-country") else {
            panic!("not a whole request: {raw}");
        };
        let mut out = Vec::new();
        let mut w = ResponseWriter {
            out: &mut out,
            common: b"",
        };
        let o = a.handle(&buf, &req, [peer; 16], NOW_MS, &mut w);
        (o, String::from_utf8(out).unwrap())
    }

    fn get(a: &mut App<MemLog>, target: &str) -> (Outcome, String) {
        send(a, &format!("GET {target} HTTP/1.1\r\nHost: t\r\n\r\n"), 1)
    }

    fn events(log: &MemLog) -> Vec<EventRef<'_>> {
        log.records
            .iter()
            .filter(|r| r.1 == RecordType::Event)
            .map(|r| EventRef::decode(&r.2).unwrap())
            .collect()
    }

    #[test]
    fn a_signed_click_is_logged_then_redirected_once_its_record_is_durable() {
        let mut a = app(MemLog::default());
        let (o, ans) = get(&mut a, &format!("/api/v1/clicks?{}", click_query("c-1")));
        assert!(ans.starts_with("HTTP/1.1 302 "), "{ans}");
        assert!(ans.contains("Location: https://shop.example/landing?item=7\r\n"));
        // The answer waits for exactly the record it acknowledges.
        assert_eq!(o.wait_seq, 1);
        let ev = events(&a.log);
        assert_eq!(ev.len(), 1);
        assert_eq!((ev[0].click_id, ev[0].verdict), ("c-1", Verdict::Accepted));
        assert_eq!(ev[0].cost_micros, 250_000);
        // A retry is answered alike, and logged as what it is.
        let (o2, ans2) = get(&mut a, &format!("/api/v1/clicks?{}", click_query("c-1")));
        assert!(ans2.starts_with("HTTP/1.1 302 "));
        assert_eq!(o2.wait_seq, 2);
        assert_eq!(events(&a.log)[1].verdict, Verdict::Duplicate);
        assert_eq!(a.counters.events[0][Verdict::Duplicate as usize], 1);
        assert_eq!(a.counters.requests[Endpoint::Clicks as usize][2], 2);
    }

    #[test]
    fn a_forged_click_is_refused_and_nothing_is_logged() {
        let mut a = app(MemLog::default());
        let q = click_query("c-1").replace("ad-1", "ad-2");
        let (o, ans) = get(&mut a, &format!("/api/v1/clicks?{q}"));
        assert!(ans.starts_with("HTTP/1.1 403 "), "{ans}");
        assert!(ans.ends_with("bad_signature\n"));
        assert_eq!(o.wait_seq, 0);
        assert!(a.log.records.is_empty());
        assert_eq!(a.counters.rejects[Reject::BadSignature.index()], 1);
    }

    #[test]
    fn a_full_log_answers_503_and_the_click_is_new_when_it_comes_back() {
        let mut log = MemLog::default();
        log.budget_bytes = Some(0);
        let mut a = app(log);
        let target = format!("/api/v1/clicks?{}", click_query("c-1"));
        let (o, ans) = get(&mut a, &target);
        assert!(ans.starts_with("HTTP/1.1 503 "), "{ans}");
        assert!(ans.contains("Retry-After: 1\r\n"));
        assert_eq!(o.wait_seq, 0);
        assert_eq!(a.counters.drops[DropReason::DiskFull as usize], 1);
        // Nothing of it was remembered: once there is room it is accepted.
        a.log.budget_bytes = None;
        get(&mut a, &target);
        assert_eq!(events(&a.log)[0].verdict, Verdict::Accepted);
    }

    #[test]
    fn a_failed_write_stops_every_acknowledgement() {
        let mut a = app(MemLog::default());
        a.fail();
        let (o, ans) = get(&mut a, &format!("/api/v1/clicks?{}", click_query("c-1")));
        assert!(ans.starts_with("HTTP/1.1 503 "), "{ans}");
        assert_eq!(o.wait_seq, 0);
        assert!(a.log.records.is_empty());
        let (_, ready) = get(&mut a, "/readyz");
        assert!(ready.starts_with("HTTP/1.1 503 ") && ready.contains("durable write failed"));
    }

    #[test]
    fn routes_methods_and_states_are_answered_by_name() {
        let mut a = app(MemLog::default());
        assert!(get(&mut a, "/nowhere").1.starts_with("HTTP/1.1 404 "));
        let (_, ans) = send(
            &mut a,
            "POST /api/v1/clicks HTTP/1.1\r\nHost: t\r\nContent-Length: 0\r\n\r\n",
            1,
        );
        assert!(
            ans.starts_with("HTTP/1.1 405 ") && ans.contains("Allow: GET\r\n"),
            "{ans}"
        );
        assert!(get(&mut a, "/readyz").1.ends_with("ready\n"));
        a.shared.state.set(State::Draining);
        let (o, ans) = get(&mut a, "/readyz");
        assert!(ans.starts_with("HTTP/1.1 503 ") && ans.ends_with("draining\n"));
        // Draining closes keep-alive connections after their answer.
        assert!(o.close);
        assert_eq!(a.counters.drops[DropReason::UnknownPath as usize], 1);
        assert_eq!(a.counters.drops[DropReason::BadMethod as usize], 1);
    }

    #[test]
    fn a_batch_answers_each_item_and_waits_for_the_last_record() {
        let mut a = app(MemLog::default());
        let body = format!(
            "/api/v1/clicks?{}\n/api/v1/clicks?{}\n/nope?x=1\n/api/v1/clicks?{}\n",
            click_query("b-1"),
            click_query("b-1"),
            click_query("b-2").replace("u-1", "u-2"),
        );
        let raw = format!(
            "POST /api/v1/events HTTP/1.1\r\nHost: t\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        let (o, ans) = send(&mut a, &raw, 1);
        let lines: Vec<&str> = ans.split("\r\n\r\n").nth(1).unwrap().lines().collect();
        assert_eq!(
            lines,
            [
                "accepted",
                "duplicate",
                "rejected bad_field: path",
                "rejected bad_signature"
            ]
        );
        assert_eq!(o.wait_seq, 2);
        // Over batch_items_max: 413, nothing stored.
        let many = format!("/api/v1/clicks?{}\n", click_query("m")).repeat(5);
        let raw = format!(
            "POST /api/v1/events HTTP/1.1\r\nHost: t\r\nContent-Length: {}\r\n\r\n{many}",
            many.len()
        );
        assert!(send(&mut a, &raw, 1).1.starts_with("HTTP/1.1 413 "));
        assert_eq!(events(&a.log).len(), 2);
    }

    #[test]
    fn early_data_takes_clicks_as_duplicates_on_replay_and_refuses_batches() {
        let mut a = app(MemLog::default());
        let q = click_query("e-1");
        let click = format!("GET /api/v1/clicks?{q} HTTP/1.1\r\nHost: t\r\nEarly-Data: 1\r\n\r\n");
        assert!(send(&mut a, &click, 1).1.starts_with("HTTP/1.1 302 "));
        // The same early data replayed: answered, and a duplicate.
        assert!(send(&mut a, &click, 1).1.starts_with("HTTP/1.1 302 "));
        let v: Vec<Verdict> = events(&a.log).iter().map(|e| e.verdict).collect();
        assert_eq!(v, [Verdict::Accepted, Verdict::Duplicate]);
        let body = format!("/api/v1/clicks?{}\n", click_query("e-2"));
        let raw = format!(
            "POST /api/v1/events HTTP/1.1\r\nHost: t\r\nEarly-Data: 1\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        let (o, ans) = send(&mut a, &raw, 1);
        assert!(ans.starts_with("HTTP/1.1 425 Too Early\r\n"), "{ans}");
        assert_eq!(o.wait_seq, 0);
        assert_eq!(events(&a.log).len(), 2);
        assert_eq!(a.counters.drops[DropReason::TooEarly as usize], 1);
        // After the handshake (no Early-Data) the same batch is taken.
        let raw = raw.replace("Early-Data: 1\r\n", "");
        assert!(send(&mut a, &raw, 1).1.starts_with("HTTP/1.1 200 "));
        assert_eq!(events(&a.log).len(), 3);
    }

    #[test]
    fn the_velocity_rule_marks_clicks_past_the_limit_invalid() {
        let mut a = app(MemLog::default());
        for i in 0..5 {
            let r = get(
                &mut a,
                &format!("/api/v1/clicks?{}", click_query(&format!("v-{i}"))),
            );
            assert!(r.1.starts_with("HTTP/1.1 302 "));
        }
        let verdicts: Vec<Verdict> = events(&a.log).iter().map(|e| e.verdict).collect();
        use Verdict::{Accepted as A, Invalid as I};
        assert_eq!(verdicts, [A, A, A, I, I]);
    }

    #[test]
    fn partials_follow_the_monotonic_clock_and_cover_what_was_appended() {
        let mut a = app(MemLog::default());
        get(&mut a, &format!("/api/v1/clicks?{}", click_query("p-1")));
        get(&mut a, &format!("/api/v1/clicks?{}", click_query("p-2")));
        // Not due yet, whatever the wall clock says.
        assert!(a.tick(NOW_MS + 3_600_000, 999).partial_deferred.is_none());
        assert_eq!(a.log.records.len(), 2);
        a.tick(NOW_MS, 1000);
        let (seq, ty, bytes) = a.log.records.last().unwrap();
        assert_eq!((*seq, *ty), (3, RecordType::Partial));
        let p = PartialRecord::decode(bytes).unwrap();
        assert_eq!((p.from_seq, p.to_seq), (0, 2));
        assert_eq!(p.rows.iter().map(|r| r.1.clicks).sum::<u64>(), 2);
        // A partial that cannot be written is deferred, counted, and retried.
        a.log.fail_next = Some(std::io::ErrorKind::StorageFull);
        let r = a.tick(NOW_MS, 2000);
        assert!(r.partial_deferred.is_some_and(|e| e.is_no_space()));
        assert_eq!(a.counters.drops[DropReason::PartialDeferred as usize], 1);
        a.tick(NOW_MS, 2001);
        assert_eq!(a.log.records.len(), 4);
    }

    #[test]
    fn a_full_log_refuses_by_default_and_redirects_unrecorded_when_told() {
        let full = || {
            let mut log = MemLog::default();
            log.budget_bytes = Some(0);
            log
        };
        let mut a = app(full());
        let (o, ans) = get(&mut a, &format!("/api/v1/clicks?{}", click_query("f-1")));
        assert!(
            ans.starts_with("HTTP/1.1 503 ") && ans.contains("Retry-After"),
            "{ans}"
        );
        assert_eq!(o.wait_seq, 0);
        assert_eq!(a.counters.drops[DropReason::DiskFull as usize], 1);
        assert_eq!(a.counters.unrecorded_redirects, 0);

        let mut a = app(full());
        a.settings.on_full = OnFull::Redirect;
        for id in ["f-1", "f-2", "f-2"] {
            let (o, ans) = get(&mut a, &format!("/api/v1/clicks?{}", click_query(id)));
            assert!(ans.starts_with("HTTP/1.1 302 "), "{ans}");
            assert!(ans.contains("Location: https://shop.example/landing?item=7\r\n"));
            // Nothing to wait for: there is no record.
            assert_eq!(o.wait_seq, 0);
        }
        let imp = click_query("i-1");
        let (_, ans) = get(&mut a, &format!("/api/v1/impressions?{imp}"));
        assert!(ans.starts_with("HTTP/1.1 204 "), "{ans}");
        // A forgery is still refused: the redirect must be signed.
        let forged = click_query("f-3").replace("u-1", "u-9");
        let (_, ans) = get(&mut a, &format!("/api/v1/clicks?{forged}"));
        assert!(ans.starts_with("HTTP/1.1 403 "), "{ans}");
        // A batch item is never acknowledged without its record.
        let body = format!("/api/v1/clicks?{}\n", click_query("b-9"));
        let raw = format!(
            "POST /api/v1/events HTTP/1.1\r\nHost: t\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        assert!(send(&mut a, &raw, 1).1.ends_with("unavailable retry\n"));
        assert!(a.log.records.is_empty());
        assert_eq!(a.counters.unrecorded_redirects, 4);
        assert_eq!(a.counters.drops[DropReason::DiskFull as usize], 1);
        // Once there is room, the next partial carries the count, per minute,
        // and the count starts again from zero.
        a.log.budget_bytes = None;
        a.tick(NOW_MS, 1000);
        let (_, ty, bytes) = a.log.records.last().unwrap();
        assert_eq!(*ty, RecordType::Partial);
        let p = PartialRecord::decode(bytes).unwrap();
        assert_eq!(p.unrecorded, vec![(wire::minute_of(NOW_MS), 4)]);
        assert!(p.rows.is_empty());
        a.tick(NOW_MS, 2000);
        let p = PartialRecord::decode(&a.log.records.last().unwrap().2).unwrap();
        assert!(p.unrecorded.is_empty());
    }

    #[test]
    fn readyz_steps_aside_past_the_budget_mark_and_returns_below_the_lower_one() {
        let mut log = MemLog::default();
        log.budget_bytes = Some(100_000);
        let mut a = app(log);
        let ready = |a: &mut App<MemLog>| get(a, "/readyz").1;
        a.tick(NOW_MS, 10);
        assert!(ready(&mut a).ends_with("\r\n\r\nready\n"));
        a.log.bytes = 91_000;
        let r = a.tick(NOW_MS, 20);
        assert_eq!(r.stepped_aside, Some(true));
        let ans = ready(&mut a);
        assert!(ans.starts_with("HTTP/1.1 503 "), "{ans}");
        assert!(ans.contains("stepping aside: shard 0 holds unshipped data at 91.0% of log.disk_budget_bytes (ready again below 80%)"), "{ans}");
        // Clicks are still served while stepped aside.
        let (_, ans) = get(&mut a, &format!("/api/v1/clicks?{}", click_query("s-1")));
        assert!(ans.starts_with("HTTP/1.1 302 "), "{ans}");
        a.log.bytes = 85_000;
        assert_eq!(a.tick(NOW_MS, 30).stepped_aside, None);
        assert!(ready(&mut a).starts_with("HTTP/1.1 503 "));
        a.log.bytes = 79_000;
        assert_eq!(a.tick(NOW_MS, 40).stepped_aside, Some(false));
        assert!(ready(&mut a).ends_with("ready\n"));
    }
}
