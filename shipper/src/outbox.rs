//! What one stream (partials or events) of one shard has to send, and what
//! an answer means for it. No I/O: the shipper feeds records in and acts on
//! the [`Next`] it gets back.

use std::sync::Arc;

use wire::batch::{push_item, Ack, Batch, BatchKind, Status};
use wire::record::{EventRef, PartialRecord};
use wire::segment::RecordType;

/// With several aggregator instances, a stream per instance carries only
/// what that instance owns (`wire::partition`): partials keep their range
/// and watermark with the other instances' rows taken out; events of other
/// instances' advertisers are passed over (their seqs still extend the
/// range, so every instance's cursor moves over the whole log).
#[derive(Debug, Clone)]
pub struct Route {
    pub me: usize,
    pub instances: Arc<Vec<String>>,
}

impl Route {
    fn owns(&self, advertiser: &str) -> bool {
        wire::partition::owner(advertiser, &self.instances) == self.me
    }
}

/// When a stream's pending records become a batch.
#[derive(Debug, Clone)]
pub struct Policy {
    /// Most items in one batch.
    pub max_items: u32,
    /// A batch is sent once its uncompressed payload reaches this many bytes...
    pub max_bytes: usize,
    /// ...or once its oldest record has waited this long.
    pub max_age_ms: i64,
    pub zstd_level: i32,
}

/// The records read for the next batch of one stream.
pub struct Outbox {
    pub kind: BatchKind,
    gateway_id: String,
    shard: u16,
    policy: Policy,
    /// The aggregator's cursor for this stream, as last answered.
    pub acked: u64,
    /// `after_seq` of the batch being built.
    after: Option<u64>,
    /// The last seq read into this batch (events: read, even if not kept).
    last: u64,
    raw: Vec<u8>,
    count: u32,
    oldest_ms: Option<i64>,
    route: Option<Route>,
    /// Scratch for a partial re-encoded without other instances' rows.
    scratch: Vec<u8>,
}

/// What to do after an answer.
#[derive(Debug, PartialEq, Eq)]
pub enum Next {
    /// Committed (or already was): go on reading from where the reader is.
    Continue,
    /// The aggregator wants everything after this seq: reposition the reader.
    Resend { after: u64 },
    /// Not accepted, nothing changed: send the same batch again after a pause.
    Retry { reason: String },
}

impl Outbox {
    pub fn new(kind: BatchKind, gateway_id: &str, shard: u16, policy: Policy, acked: u64) -> Self {
        Outbox {
            kind,
            gateway_id: gateway_id.to_owned(),
            shard,
            policy,
            acked,
            after: None,
            last: acked,
            raw: Vec::new(),
            count: 0,
            oldest_ms: None,
            route: None,
            scratch: Vec::new(),
        }
    }

    /// Keeps only what the instance `route.me` owns.
    pub fn with_route(mut self, route: Option<Route>) -> Self {
        self.route = route;
        self
    }

    /// Takes one record read from the log. For partials, records of other
    /// types are passed over; for events, partials in between still extend
    /// the range the batch covers.
    pub fn offer(&mut self, seq: u64, ty: u8, bytes: &[u8], now_ms: i64) -> Result<(), String> {
        let mut bytes = bytes;
        let mut keep = match self.kind {
            BatchKind::Partials => ty == RecordType::Partial as u8,
            BatchKind::Events => ty == RecordType::Event as u8,
            BatchKind::Hello | BatchKind::Join => false,
        };
        if self.kind == BatchKind::Partials {
            if !keep {
                return Ok(());
            }
            let mut p = PartialRecord::decode(bytes).map_err(|e| format!("partial {seq}: {e}"))?;
            if self.after.is_none() {
                self.after = Some(p.from_seq);
            } else if p.from_seq != self.last {
                return Err(format!(
                    "partial {seq} starts after {} but the previous partial is {}",
                    p.from_seq, self.last
                ));
            }
            if let Some(r) = &self.route {
                let n = p.rows.len();
                p.rows.retain(|(k, _)| r.owns(&k.advertiser_id));
                if p.rows.len() != n {
                    self.scratch.clear();
                    p.encode(&mut self.scratch);
                    bytes = &self.scratch;
                }
            }
        } else {
            if self.after.is_none() {
                self.after = Some(self.last);
            }
            if let (true, Some(r)) = (keep, &self.route) {
                let e = EventRef::decode(bytes).map_err(|e| format!("event {seq}: {e}"))?;
                keep = r.owns(e.advertiser_id);
            }
        }
        self.last = seq;
        if keep {
            push_item(&mut self.raw, seq, ty, bytes);
            self.count += 1;
            self.oldest_ms.get_or_insert(now_ms);
        }
        Ok(())
    }

    /// Whether the reader should stop adding records to this batch.
    pub fn full(&self) -> bool {
        self.count >= self.policy.max_items || self.raw.len() >= self.policy.max_bytes
    }

    /// Whether the batch should go now.
    pub fn ready(&self, now_ms: i64) -> bool {
        let Some(after) = self.after else {
            return false;
        };
        if self.last <= after {
            return false;
        }
        match self.kind {
            // Partials go as soon as there is one: they are what freshness
            // is made of, and small.
            BatchKind::Partials => self.count > 0,
            _ => {
                self.full()
                    || self
                        .oldest_ms
                        .is_some_and(|t| now_ms - t >= self.policy.max_age_ms)
            }
        }
    }

    /// Marks an event range with no events as old enough to send, so that
    /// the shipped seq (and segment recycling) does not stall on quiet shards.
    pub fn touch_idle(&mut self, now_ms: i64) {
        if self.after.is_some() && self.count == 0 {
            self.oldest_ms.get_or_insert(now_ms);
        }
    }

    /// Seals the pending records into a batch; the outbox starts a new one
    /// after it.
    pub fn seal(&mut self) -> std::io::Result<Batch> {
        let after = self.after.take().expect("ready batch");
        let b = Batch::seal(
            self.kind,
            &self.gateway_id,
            self.shard,
            after,
            self.last,
            self.count,
            &self.raw,
            self.policy.zstd_level,
        );
        self.raw.clear();
        self.count = 0;
        self.oldest_ms = None;
        b
    }

    /// Forgets what was read but not sent (before a reposition).
    pub fn reset(&mut self, after: u64) {
        self.after = None;
        self.last = after;
        self.raw.clear();
        self.count = 0;
        self.oldest_ms = None;
    }

    /// Acts on the aggregator's answer to the batch `(after, last]`.
    pub fn on_ack(&mut self, sent_last: u64, ack: &Ack) -> Next {
        let cursor = match self.kind {
            BatchKind::Partials => ack.partials_cursor,
            _ => ack.events_cursor,
        };
        match ack.status {
            Status::Applied | Status::Duplicate => {
                self.acked = cursor;
                if cursor == sent_last {
                    Next::Continue
                } else {
                    // The aggregator is somewhere else (its store was
                    // restored, or it holds more than we sent): follow it.
                    self.reset(cursor);
                    Next::Resend { after: cursor }
                }
            }
            Status::Gap | Status::Cursors => {
                self.acked = cursor;
                self.reset(cursor);
                Next::Resend { after: cursor }
            }
            Status::Refused | Status::Retry => Next::Retry {
                reason: format!("{:?}: {}", ack.status, ack.reason),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use wire::batch::items;

    fn policy() -> Policy {
        Policy {
            max_items: 3,
            max_bytes: 1 << 20,
            max_age_ms: 1000,
            zstd_level: 1,
        }
    }

    fn partial(from: u64, to: u64) -> Vec<u8> {
        let mut b = Vec::new();
        PartialRecord {
            from_seq: from,
            to_seq: to,
            watermark_ms: 0,
            rows: vec![],
            unrecorded: Vec::new(),
        }
        .encode(&mut b);
        b
    }

    const EV: u8 = RecordType::Event as u8;
    const PA: u8 = RecordType::Partial as u8;

    #[test]
    fn partials_batch_covers_from_the_first_from_seq() {
        let mut o = Outbox::new(BatchKind::Partials, "gw", 1, policy(), 0);
        o.offer(1, EV, b"e", 0).unwrap();
        assert!(!o.ready(0));
        o.offer(2, PA, &partial(0, 1), 0).unwrap();
        o.offer(3, EV, b"e", 0).unwrap();
        o.offer(4, PA, &partial(2, 3), 0).unwrap();
        assert!(o.ready(0));
        let b = o.seal().unwrap();
        assert_eq!((b.after_seq, b.last_seq, b.count), (0, 4, 2));
        let raw = b.decompress().unwrap();
        let it = items(&raw, b.count, b.after_seq, b.last_seq).unwrap();
        assert_eq!(it.iter().map(|i| i.seq).collect::<Vec<_>>(), vec![2, 4]);
        // The next batch starts where this one ended; a chain break is an error.
        o.offer(6, PA, &partial(4, 5), 0).unwrap();
        assert!(o.offer(8, PA, &partial(5, 7), 0).is_err());
    }

    #[test]
    fn events_wait_for_size_or_age() {
        let mut o = Outbox::new(BatchKind::Events, "gw", 1, policy(), 10);
        o.offer(11, EV, b"a", 100).unwrap();
        o.offer(12, PA, &partial(0, 11), 100).unwrap();
        assert!(!o.ready(500));
        assert!(o.ready(1100));
        o.offer(13, EV, b"b", 1100).unwrap();
        o.offer(14, EV, b"c", 1100).unwrap();
        assert!(o.full());
        let b = o.seal().unwrap();
        assert_eq!((b.after_seq, b.last_seq, b.count), (10, 14, 3));
        // A range of partials only goes once marked idle and aged.
        o.offer(15, PA, &partial(12, 14), 2000).unwrap();
        assert!(!o.ready(9999));
        o.touch_idle(2000);
        assert!(!o.ready(2500));
        assert!(o.ready(3000));
        let b = o.seal().unwrap();
        assert_eq!((b.after_seq, b.last_seq, b.count), (14, 15, 0));
    }

    #[test]
    fn a_route_keeps_only_the_instances_rows_and_events_but_the_whole_range() {
        use wire::record::{Counts, Device, RowKey};
        let instances = Arc::new(vec!["agg-a".to_string(), "agg-b".to_string()]);
        // Two advertisers with different owners.
        let advs: Vec<String> = (0..50).map(|i| format!("adv-{i}")).collect();
        let a = advs
            .iter()
            .find(|x| wire::partition::owner(x, &instances) == 0)
            .unwrap();
        let b = advs
            .iter()
            .find(|x| wire::partition::owner(x, &instances) == 1)
            .unwrap();
        let row = |adv: &str| {
            (
                RowKey {
                    minute: 1,
                    advertiser_id: adv.into(),
                    campaign_id: "c".into(),
                    ad_id: "x".into(),
                    device: Device::Desktop,
                    country: *b"ZZ",
                },
                Counts {
                    clicks: 1,
                    ..Counts::default()
                },
            )
        };
        let mut pb = Vec::new();
        PartialRecord {
            from_seq: 0,
            to_seq: 3,
            watermark_ms: 77,
            rows: vec![row(a), row(b)],
            unrecorded: Vec::new(),
        }
        .encode(&mut pb);
        let event = |adv: &str| {
            use wire::record::{EventKind, Source, Verdict};
            let e = EventRef {
                kind: EventKind::Click,
                verdict: Verdict::Accepted,
                source: Source::Get,
                device: Device::Mobile,
                country: *b"DE",
                event_ms: 60_000,
                receive_ms: 60_000,
                signed_ts_s: 60,
                cost_micros: 1,
                client_ip: [0; 16],
                kid: "k1",
                advertiser_id: adv,
                campaign_id: "c",
                ad_id: "x",
                click_id: "id",
                user_id: "u",
                redirect_url: "https://a.example/",
            };
            let mut out = vec![0u8; e.encoded_len()];
            e.encode_into(&mut out);
            out
        };
        for (me, mine) in [(0usize, a), (1, b)] {
            let route = Some(Route {
                me,
                instances: instances.clone(),
            });
            let mut p =
                Outbox::new(BatchKind::Partials, "gw", 0, policy(), 0).with_route(route.clone());
            p.offer(4, PA, &pb, 0).unwrap();
            let batch = p.seal().unwrap();
            let raw = batch.decompress().unwrap();
            let it = items(&raw, batch.count, batch.after_seq, batch.last_seq).unwrap();
            let got = PartialRecord::decode(it[0].bytes).unwrap();
            assert_eq!((got.from_seq, got.to_seq, got.watermark_ms), (0, 3, 77));
            assert_eq!(got.rows, vec![row(mine)], "instance {me}");

            let mut e = Outbox::new(BatchKind::Events, "gw", 0, policy(), 0).with_route(route);
            e.offer(1, EV, &event(a), 0).unwrap();
            e.offer(2, EV, &event(b), 0).unwrap();
            let batch = e.seal().unwrap();
            assert_eq!((batch.after_seq, batch.last_seq, batch.count), (0, 2, 1));
            let raw = batch.decompress().unwrap();
            let it = items(&raw, batch.count, batch.after_seq, batch.last_seq).unwrap();
            assert_eq!(EventRef::decode(it[0].bytes).unwrap().advertiser_id, mine);
        }
    }

    #[test]
    fn answers_move_the_cursor() {
        let mut o = Outbox::new(BatchKind::Partials, "gw", 1, policy(), 0);
        let ack = |status, p| Ack {
            status,
            partials_cursor: p,
            events_cursor: 0,
            reason: "why".into(),
        };
        assert_eq!(o.on_ack(4, &ack(Status::Applied, 4)), Next::Continue);
        assert_eq!(o.acked, 4);
        assert_eq!(o.on_ack(9, &ack(Status::Duplicate, 9)), Next::Continue);
        assert_eq!(
            o.on_ack(12, &ack(Status::Gap, 9)),
            Next::Resend { after: 9 }
        );
        assert!(matches!(
            o.on_ack(12, &ack(Status::Refused, 9)),
            Next::Retry { .. }
        ));
        assert_eq!(o.acked, 9);
    }
}
