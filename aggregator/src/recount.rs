//! Which copy of a click counts: the rule reconciliation applies to the raw
//! events of one minute from every PoP and gateway. Pure: records in, rows
//! out; the reconciler ([`crate::reconcile`]) feeds it from the audit trail.
//!
//! The rule (docs/DESIGN.md, "Across PoPs"):
//!
//! - The copies of a click are the records with the same kind and id. A
//!   record its gateway marked `duplicate` never carries the verdict (that
//!   gateway logged an earlier copy itself).
//! - Among the other copies, the earliest by (event time, gateway id, shard,
//!   seq) carries the verdict, unless a copy of the same click lies in one of
//!   the `horizon_min - 1` minutes before (the dedup horizon, as the gateway
//!   applies it): then every copy in this minute is a duplicate.
//! - The verdict is the one its gateway gave (accepted or invalid), except
//!   that a click from a (client address, ad) stream seen at more than one
//!   gateway in the minute is invalid when it is past the stream's
//!   `velocity_per_minute_max`-th click, counting every GET click of the
//!   stream at every gateway in the same order. A stream seen at one gateway
//!   only keeps that gateway's verdicts: its host counted the stream whole,
//!   in arrival order.
//! - Every copy that does not carry the verdict counts as a duplicate.
//!
//! On one gateway host this is what the gateway itself did, so reconciling a
//! single PoP changes nothing; across PoPs it removes the second copy.

use std::collections::{BTreeMap, HashMap};
use std::hash::{BuildHasher, Hash, Hasher};

use wire::record::{Counts, EventKind, EventRef, RowKey, Source, Verdict};

use crate::rows::{decode_key, encode_key};

/// A 96-bit keyed fingerprint: of a click (kind and id) or of a velocity
/// stream (address and ad). With a few tens of millions of clicks in the
/// lookback, a false match needs about 2^-70 per lookup.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Fp(pub u64, pub u32);

impl Hash for Fp {
    fn hash<H: Hasher>(&self, h: &mut H) {
        // Already uniform: the map's hasher passes it through.
        h.write_u64(self.0);
    }
}

/// A hasher for [`Fp`] keys: the first word is the hash.
#[derive(Default, Clone, Copy)]
pub struct FpHasher(u64);

impl Hasher for FpHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        // Not used by Fp; kept total for safety.
        for b in bytes {
            self.0 = (self.0.rotate_left(8)) ^ *b as u64;
        }
    }
    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }
}

#[derive(Default, Clone, Copy)]
pub struct FpBuild;

impl BuildHasher for FpBuild {
    type Hasher = FpHasher;
    fn build_hasher(&self) -> FpHasher {
        FpHasher(0)
    }
}

pub type FpMap<V> = HashMap<Fp, V, FpBuild>;

/// Makes fingerprints under per-process random keys (SipHash twice), so
/// nobody can choose ids that collide.
#[derive(Default)]
pub struct Fingerprinter {
    a: std::collections::hash_map::RandomState,
    b: std::collections::hash_map::RandomState,
}

impl Fingerprinter {
    pub fn click(&self, kind: EventKind, id: &str) -> Fp {
        let t = (kind as u8, id.as_bytes());
        Fp(self.a.hash_one(t), self.b.hash_one(t) as u32)
    }

    pub fn stream(&self, addr: &[u8; 16], ad: &str) -> Fp {
        let t = (addr, ad.as_bytes());
        Fp(self.a.hash_one(t), self.b.hash_one(t) as u32)
    }
}

/// Where a record sits in the order that decides which copy is earliest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Order {
    event_ms: i64,
    /// Index into the recount's gateway ids.
    gateway: u16,
    shard: u16,
    seq: u64,
}

/// One record as the recount keeps it (no strings: the minute's rows and
/// gateways are interned).
struct Rec {
    order: Order,
    kind: EventKind,
    verdict: Verdict,
    cost_micros: u64,
    /// Index into the recount's row keys.
    row: u32,
    click: Fp,
    /// The velocity stream of a GET click.
    stream: Option<Fp>,
    /// The user's hash, for a click that may count as a unique user.
    user: Option<u64>,
}

/// The recount of one minute, built record by record.
pub struct Recount<'f> {
    minute: u32,
    fp: &'f Fingerprinter,
    rows: HashMap<Vec<u8>, u32>,
    row_keys: Vec<Vec<u8>>,
    gateways: Vec<String>,
    recs: Vec<Rec>,
    key_buf: RowKey,
}

/// What a recount found.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Outcome {
    /// The minute's rows as the rule counts them.
    pub rows: BTreeMap<RowKey, Counts>,
    /// Every click with a copy its gateway did not mark duplicate (what a
    /// later minute's lookback asks about).
    pub ids: Vec<Fp>,
    pub digest: IdDigest,
    pub events: u64,
    /// Users of the clicks the rule accepts, by sketch key: the minute's
    /// unique-user sketches, rebuilt.
    pub users: BTreeMap<Vec<u8>, Vec<u64>>,
}

/// A summary of a minute's click set: when a minute is recounted again and
/// its digest is unchanged, the minutes after it need no recount.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct IdDigest {
    pub count: u64,
    pub xor: u64,
    pub sum: u64,
}

impl IdDigest {
    pub fn of(ids: &[Fp]) -> IdDigest {
        let mut d = IdDigest {
            count: ids.len() as u64,
            ..IdDigest::default()
        };
        for f in ids {
            let x = f.0 ^ (f.1 as u64).rotate_left(17);
            d.xor ^= x;
            d.sum = d.sum.wrapping_add(x.wrapping_mul(0x9e37_79b9_7f4a_7c15));
        }
        d
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RecountError {
    #[error("event of minute {got} filed under minute {want}")]
    WrongMinute { want: u32, got: u32 },
    #[error("more than 65535 gateways in one minute")]
    TooManyGateways,
}

impl<'f> Recount<'f> {
    pub fn new(minute: u32, fp: &'f Fingerprinter) -> Self {
        Recount {
            minute,
            fp,
            rows: HashMap::new(),
            row_keys: Vec::new(),
            gateways: Vec::new(),
            recs: Vec::new(),
            key_buf: RowKey {
                minute,
                advertiser_id: String::new(),
                campaign_id: String::new(),
                ad_id: String::new(),
                device: wire::record::Device::Other,
                country: *b"ZZ",
            },
        }
    }

    /// Adds one record of the minute, as `gateway`'s shard `shard` logged
    /// it at `seq`.
    pub fn add(
        &mut self,
        gateway: &str,
        shard: u16,
        seq: u64,
        e: &EventRef<'_>,
    ) -> Result<(), RecountError> {
        let got = wire::minute_of(e.event_ms);
        if got != self.minute {
            return Err(RecountError::WrongMinute {
                want: self.minute,
                got,
            });
        }
        let gw = match self.gateways.iter().position(|g| g == gateway) {
            Some(i) => i,
            None => {
                if self.gateways.len() > u16::MAX as usize {
                    return Err(RecountError::TooManyGateways);
                }
                self.gateways.push(gateway.to_owned());
                self.gateways.len() - 1
            }
        } as u16;
        let k = &mut self.key_buf;
        k.advertiser_id.clear();
        k.advertiser_id.push_str(e.advertiser_id);
        k.campaign_id.clear();
        k.campaign_id.push_str(e.campaign_id);
        k.ad_id.clear();
        k.ad_id.push_str(e.ad_id);
        k.device = e.device;
        k.country = e.country;
        let kb = encode_key(k);
        let row = match self.rows.get(&kb) {
            Some(&i) => i,
            None => {
                let i = self.row_keys.len() as u32;
                self.rows.insert(kb.clone(), i);
                self.row_keys.push(kb);
                i
            }
        };
        let paced = e.kind == EventKind::Click && e.source == Source::Get;
        self.recs.push(Rec {
            order: Order {
                event_ms: e.event_ms,
                gateway: gw,
                shard,
                seq,
            },
            kind: e.kind,
            verdict: e.verdict,
            cost_micros: e.cost_micros,
            row,
            click: self.fp.click(e.kind, e.click_id),
            stream: paced.then(|| self.fp.stream(&e.client_ip, e.ad_id)),
            user: (e.kind == EventKind::Click && !e.user_id.is_empty())
                .then(|| crate::uniques::user_hash(e.user_id)),
        });
        Ok(())
    }

    fn before(&self, a: &Order, b: &Order) -> bool {
        (
            a.event_ms,
            &self.gateways[a.gateway as usize],
            a.shard,
            a.seq,
        ) < (
            b.event_ms,
            &self.gateways[b.gateway as usize],
            b.shard,
            b.seq,
        )
    }

    /// Applies the rule. `earlier(click)`: a copy of that click its gateway
    /// did not mark duplicate lies in the lookback minutes before this one.
    /// `velocity_per_minute_max` 0 turns the velocity rule off.
    pub fn finish(self, earlier: impl Fn(&Fp) -> bool, velocity_per_minute_max: u32) -> Outcome {
        // Velocity: streams seen at more than one gateway, in the order.
        let mut too_fast = vec![false; self.recs.len()];
        if velocity_per_minute_max > 0 {
            let mut streams: FpMap<(u16, bool, Vec<u32>)> = FpMap::default();
            for (i, r) in self.recs.iter().enumerate() {
                if let Some(s) = r.stream {
                    let e = streams
                        .entry(s)
                        .or_insert_with(|| (r.order.gateway, false, Vec::new()));
                    e.1 |= e.0 != r.order.gateway;
                    e.2.push(i as u32);
                }
            }
            for (_, (_, multi, mut idx)) in streams {
                if !multi || idx.len() <= velocity_per_minute_max as usize {
                    continue;
                }
                idx.sort_by(|&a, &b| {
                    let (a, b) = (&self.recs[a as usize].order, &self.recs[b as usize].order);
                    if self.before(a, b) {
                        std::cmp::Ordering::Less
                    } else if self.before(b, a) {
                        std::cmp::Ordering::Greater
                    } else {
                        std::cmp::Ordering::Equal
                    }
                });
                for &i in &idx[velocity_per_minute_max as usize..] {
                    too_fast[i as usize] = true;
                }
            }
        }
        // Dedup: the earliest copy not marked duplicate, unless one lies in
        // the lookback.
        let mut winner: FpMap<Option<u32>> = FpMap::default();
        for (i, r) in self.recs.iter().enumerate() {
            if r.verdict == Verdict::Duplicate {
                continue;
            }
            match winner.get_mut(&r.click) {
                Some(Some(w)) => {
                    if self.before(&r.order, &self.recs[*w as usize].order) {
                        *w = i as u32;
                    }
                }
                Some(None) => {}
                None => {
                    let w = (!earlier(&r.click)).then_some(i as u32);
                    winner.insert(r.click, w);
                }
            }
        }
        let mut counts = vec![Counts::default(); self.row_keys.len()];
        let mut users_by_row: Vec<Vec<u64>> = vec![Vec::new(); self.row_keys.len()];
        for (i, r) in self.recs.iter().enumerate() {
            let c = &mut counts[r.row as usize];
            let wins = r.verdict != Verdict::Duplicate
                && winner.get(&r.click).copied().flatten() == Some(i as u32);
            if !wins {
                c.duplicates += 1;
                continue;
            }
            let verdict = if r.verdict == Verdict::Invalid || too_fast[i] {
                Verdict::Invalid
            } else {
                Verdict::Accepted
            };
            c.add_event(r.kind, verdict, r.cost_micros);
            if let (Verdict::Accepted, Some(u)) = (verdict, r.user) {
                users_by_row[r.row as usize].push(u);
            }
        }
        let mut ids: Vec<Fp> = winner.keys().copied().collect();
        ids.sort_unstable();
        let rows: BTreeMap<RowKey, Counts> = self
            .row_keys
            .iter()
            .zip(counts)
            .map(|(kb, c)| (decode_key(kb).expect("encoded by this recount"), c))
            .collect();
        let mut users: BTreeMap<Vec<u8>, Vec<u64>> = BTreeMap::new();
        for (kb, us) in self.row_keys.iter().zip(users_by_row) {
            if us.is_empty() {
                continue;
            }
            let k = decode_key(kb).expect("encoded by this recount");
            users
                .entry(crate::uniques::key(
                    self.minute,
                    &k.advertiser_id,
                    &k.campaign_id,
                    &k.ad_id,
                ))
                .or_default()
                .extend(us);
        }
        Outcome {
            digest: IdDigest::of(&ids),
            ids,
            rows,
            events: self.recs.len() as u64,
            users,
        }
    }
}

/// The clicks of one minute that a later minute's lookback asks about:
/// every (kind, id) with a copy its gateway did not mark duplicate.
pub fn minute_ids(fp: &Fingerprinter, e: &EventRef<'_>) -> Option<Fp> {
    (e.verdict != Verdict::Duplicate).then(|| fp.click(e.kind, e.click_id))
}

#[cfg(test)]
mod tests {
    use super::*;
    use wire::record::Device;

    const M: u32 = 29_924_940; // 2026-11-24T05:00Z
    const T: i64 = M as i64 * 60_000;

    struct Ev {
        gw: &'static str,
        seq: u64,
        ms: i64,
        id: &'static str,
        verdict: Verdict,
        ip: u8,
        ad: &'static str,
        source: Source,
    }

    fn ev(gw: &'static str, seq: u64, ms: i64, id: &'static str) -> Ev {
        Ev {
            gw,
            seq,
            ms,
            id,
            verdict: Verdict::Accepted,
            ip: 1,
            ad: "x",
            source: Source::Get,
        }
    }

    fn run(fp: &Fingerprinter, evs: &[Ev], earlier: &[&str], vmax: u32) -> Outcome {
        let mut r = Recount::new(M, fp);
        for e in evs {
            let mut ip = [0u8; 16];
            ip[15] = e.ip;
            let rec = EventRef {
                kind: EventKind::Click,
                verdict: e.verdict,
                source: e.source,
                device: Device::Mobile,
                country: *b"FR",
                event_ms: e.ms,
                receive_ms: e.ms,
                signed_ts_s: e.ms / 1000,
                cost_micros: 1000,
                client_ip: ip,
                kid: "k",
                advertiser_id: "a",
                campaign_id: "c",
                ad_id: e.ad,
                click_id: e.id,
                user_id: "u",
                redirect_url: "",
            };
            r.add(e.gw, 0, e.seq, &rec).unwrap();
        }
        let earlier: Vec<Fp> = earlier
            .iter()
            .map(|id| fp.click(EventKind::Click, id))
            .collect();
        r.finish(|f| earlier.contains(f), vmax)
    }

    fn total(o: &Outcome) -> Counts {
        let mut c = Counts::default();
        for v in o.rows.values() {
            c.merge(v);
        }
        c
    }

    #[test]
    fn one_click_at_two_pops_is_billed_once_at_the_earliest() {
        let fp = Fingerprinter::default();
        let o = run(
            &fp,
            &[
                ev("gwb", 1, T + 2000, "c1"),
                ev("gwa", 1, T + 1000, "c1"),
                ev("gwa", 2, T + 1500, "c2"),
            ],
            &[],
            0,
        );
        let t = total(&o);
        assert_eq!((t.clicks, t.duplicates, t.spend_micros), (2, 1, 2000));
        assert_eq!(o.ids.len(), 2);
        assert_eq!(o.events, 3);
    }

    #[test]
    fn the_earliest_copy_carries_its_verdict_invalid_included() {
        let fp = Fingerprinter::default();
        let mut first = ev("gwa", 1, T + 1000, "c1");
        first.verdict = Verdict::Invalid;
        let o = run(&fp, &[first, ev("gwb", 1, T + 2000, "c1")], &[], 0);
        let t = total(&o);
        assert_eq!((t.clicks, t.invalid, t.duplicates), (0, 1, 1));
        // Equal times: gateway id, then seq, decide.
        let o = run(
            &fp,
            &[ev("gwb", 1, T + 1000, "c1"), {
                let mut e = ev("gwa", 9, T + 1000, "c1");
                e.verdict = Verdict::Invalid;
                e
            }],
            &[],
            0,
        );
        assert_eq!(total(&o).invalid, 1);
    }

    #[test]
    fn a_gateway_duplicate_never_carries_the_verdict() {
        let fp = Fingerprinter::default();
        // Its earlier copy is in a previous minute: here it is only a duplicate.
        let mut d = ev("gwa", 5, T + 100, "c1");
        d.verdict = Verdict::Duplicate;
        let o = run(&fp, &[d], &[], 0);
        assert_eq!(
            total(&o),
            Counts {
                duplicates: 1,
                ..Counts::default()
            }
        );
        assert!(o.ids.is_empty());
    }

    #[test]
    fn a_copy_in_the_lookback_makes_every_copy_here_a_duplicate() {
        let fp = Fingerprinter::default();
        let o = run(
            &fp,
            &[ev("gwb", 1, T + 2000, "c1"), ev("gwa", 3, T + 3000, "c2")],
            &["c1"],
            0,
        );
        let t = total(&o);
        assert_eq!((t.clicks, t.duplicates), (1, 1));
        // It is still one of this minute's ids (a later minute asks).
        assert_eq!(o.ids.len(), 2);
    }

    #[test]
    fn velocity_counts_a_stream_across_gateways_and_keeps_single_gateway_verdicts() {
        let fp = Fingerprinter::default();
        // Three clicks of one (address, ad) at two gateways, limit 2: the
        // third in order is invalid.
        let mk = |gw, seq, ms, id| ev(gw, seq, T + ms, id);
        let o = run(
            &fp,
            &[
                mk("gwa", 1, 100, "c1"),
                mk("gwb", 1, 200, "c2"),
                mk("gwa", 2, 300, "c3"),
            ],
            &[],
            2,
        );
        let t = total(&o);
        assert_eq!((t.clicks, t.invalid), (2, 1));
        // The same three at one gateway: its own verdicts stand (accepted).
        let o = run(
            &fp,
            &[
                mk("gwa", 1, 100, "c1"),
                mk("gwa", 2, 200, "c2"),
                mk("gwa", 3, 300, "c3"),
            ],
            &[],
            2,
        );
        assert_eq!(total(&o).clicks, 3);
        // Another address is another stream; batched clicks are not paced.
        let mut other = mk("gwb", 1, 200, "c2");
        other.ip = 2;
        let mut batch = mk("gwb", 2, 250, "c4");
        batch.source = Source::Batch;
        let o = run(
            &fp,
            &[
                mk("gwa", 1, 100, "c1"),
                other,
                batch,
                mk("gwa", 2, 300, "c3"),
            ],
            &[],
            2,
        );
        assert_eq!(total(&o).clicks, 4);
        // Off: nothing is invalidated.
        let o = run(
            &fp,
            &[
                mk("gwa", 1, 100, "c1"),
                mk("gwb", 1, 200, "c2"),
                mk("gwa", 2, 300, "c3"),
            ],
            &[],
            0,
        );
        assert_eq!(total(&o).clicks, 3);
    }

    #[test]
    fn records_of_another_minute_are_refused_and_digests_tell_sets_apart() {
        let fp = Fingerprinter::default();
        let mut r = Recount::new(M, &fp);
        let e = EventRef {
            kind: EventKind::Click,
            verdict: Verdict::Accepted,
            source: Source::Get,
            device: Device::Mobile,
            country: *b"FR",
            event_ms: T + 60_000,
            receive_ms: T,
            signed_ts_s: 0,
            cost_micros: 0,
            client_ip: [0; 16],
            kid: "",
            advertiser_id: "a",
            campaign_id: "c",
            ad_id: "x",
            click_id: "c1",
            user_id: "",
            redirect_url: "",
        };
        assert_eq!(
            r.add("gw", 0, 1, &e),
            Err(RecountError::WrongMinute {
                want: M,
                got: M + 1
            })
        );
        let a = fp.click(EventKind::Click, "a");
        let b = fp.click(EventKind::Click, "b");
        assert_ne!(IdDigest::of(&[a]), IdDigest::of(&[b]));
        assert_ne!(IdDigest::of(&[a]), IdDigest::of(&[a, b]));
        assert_eq!(IdDigest::of(&[a, b]), IdDigest::of(&[a, b]));
        assert_ne!(
            fp.click(EventKind::Click, "a"),
            fp.click(EventKind::Impression, "a")
        );
    }
}
