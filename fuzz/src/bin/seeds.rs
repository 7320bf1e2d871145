//! Writes the seed corpus (valid inputs of every shape) under corpus/<target>/.
//! `cargo run --bin seeds` in fuzz/; the seeds are kept in the repository.

use std::path::Path;

use wire::batch::{push_item, Ack, Batch, BatchKind, Status};
use wire::record::{Counts, Device, EventKind, EventRef, PartialRecord, RowKey, Source, Verdict};
use wire::segment::{put_frame, RecordType, SegmentHeader, HEADER_LEN};

fn put(target: &str, name: &str, bytes: &[u8]) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("corpus")
        .join(target);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join(name), bytes).unwrap();
}

fn event(id: &str) -> Vec<u8> {
    let e = EventRef {
        kind: EventKind::Click,
        verdict: Verdict::Accepted,
        source: Source::Get,
        device: Device::Mobile,
        country: *b"DE",
        event_ms: 1_795_496_400_000,
        receive_ms: 1_795_496_400_000,
        signed_ts_s: 1_795_496_400,
        cost_micros: 250_000,
        client_ip: [0; 16],
        kid: "k1",
        advertiser_id: "adv-1",
        campaign_id: "camp-1",
        ad_id: "ad-1",
        click_id: id,
        user_id: "u1",
        redirect_url: "https://example.com/landing",
    };
    let mut b = vec![0u8; e.encoded_len()];
    e.encode_into(&mut b);
    b
}

fn partial(from: u64, to: u64) -> Vec<u8> {
    let p = PartialRecord {
        from_seq: from,
        to_seq: to,
        watermark_ms: 1_795_496_400_000,
        rows: vec![(
            RowKey {
                minute: 29_924_940,
                advertiser_id: "adv-1".into(),
                campaign_id: "camp-1".into(),
                ad_id: "ad-1".into(),
                device: Device::Mobile,
                country: *b"DE",
            },
            Counts {
                clicks: 2,
                spend_micros: 500_000,
                ..Counts::default()
            },
        )],
        unrecorded: Vec::new(),
    };
    let mut b = Vec::new();
    p.encode(&mut b);
    b
}

fn main() {
    // HTTP requests.
    let q = "ad_id=ad-1&advertiser_id=adv-1&campaign_id=camp-1&click_id=c1&user_id=u1&cost_per_click=0.25&timestamp=1795496400&redirect_url=https%3A%2F%2Fexample.com%2F&kid=k1";
    let signed = wire::signed::sign(q, &[7u8; 32]);
    for (name, req) in [
        ("get", format!("GET /api/v1/clicks?{signed} HTTP/1.1\r\nHost: x\r\nUser-Agent: Mozilla/5.0 (iPhone) Mobile\r\nX-Country: de\r\n\r\n")),
        ("pipelined", format!("GET /healthz HTTP/1.1\r\nHost: x\r\n\r\nGET /api/v1/clicks?{signed} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")),
        ("post", format!("POST /api/v1/events HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n/api/v1/clicks?{signed}\n", signed.len() + 16)),
        ("chunked", "POST /api/v1/events HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n3;x=y\r\nabc\r\n0\r\n\r\n".to_string()),
        ("http10", "GET / HTTP/1.0\r\n\r\n".to_string()),
    ] {
        put("http_parse", name, req.as_bytes());
    }
    // Clicks: mode 1 = sign the rest; mode 0 = as is.
    put(
        "click_verify",
        "to_sign",
        &[&[1u8][..], q.as_bytes()].concat(),
    );
    put(
        "click_verify",
        "signed",
        &[&[0u8][..], signed.as_bytes()].concat(),
    );
    put(
        "click_verify",
        "impression",
        &[
            &[3u8][..],
            q.split("&redirect_url").next().unwrap().as_bytes(),
            b"&kid=k1",
        ]
        .concat(),
    );
    // A segment: header, events and a partial.
    let mut seg = vec![0u8; 2048];
    let h = SegmentHeader {
        shard: 0,
        base_seq: 1,
        created_ms: 0,
        gateway_id: "dev".into(),
    };
    seg[..HEADER_LEN].copy_from_slice(&h.encode());
    let mut off = HEADER_LEN;
    for (seq, ty, p) in [
        (1, RecordType::Event, event("c1")),
        (2, RecordType::Event, event("c2")),
        (3, RecordType::Partial, partial(0, 2)),
    ] {
        off += put_frame(&mut seg[off..], &p, seq, ty);
    }
    put("segment_scan", "three_records", &seg);
    put("segment_scan", "torn", &seg[..off - 5]);
    // The same segment compressed, in one chunk and in one chunk per frame.
    for (name, chunk) in [("one_chunk", 1 << 20), ("chunk_per_frame", 8)] {
        put(
            "segz_read",
            name,
            &wire::segz::compress(&seg, off, 3, chunk).unwrap(),
        );
    }
    // Batches and an answer.
    let mut unrecorded = PartialRecord::decode(&partial(0, 2)).unwrap();
    unrecorded.unrecorded = vec![(29_924_940, 3)];
    let mut u = Vec::new();
    unrecorded.encode(&mut u);
    let mut raw = Vec::new();
    push_item(&mut raw, 3, RecordType::Partial as u8, &u);
    let b = Batch::seal(BatchKind::Partials, "dev", 0, 0, 3, 1, &raw, 3).unwrap();
    put("batch_decode", "partials_unrecorded", &b.encode());
    let mut raw = Vec::new();
    push_item(&mut raw, 3, RecordType::Partial as u8, &partial(0, 2));
    let b = Batch::seal(BatchKind::Partials, "dev", 0, 0, 3, 1, &raw, 3).unwrap();
    put("batch_decode", "partials", &b.encode());
    let mut raw = Vec::new();
    push_item(&mut raw, 1, RecordType::Event as u8, &event("c1"));
    push_item(&mut raw, 2, RecordType::Event as u8, &event("c2"));
    let b = Batch::seal(BatchKind::Events, "dev", 0, 0, 3, 2, &raw, 3).unwrap();
    put("batch_decode", "events", &b.encode());
    put("batch_decode", "hello", &Batch::hello("dev", 0).encode());
    let a = Ack {
        status: Status::Gap,
        partials_cursor: 3,
        events_cursor: 3,
        reason: "resend".into(),
    };
    put("batch_decode", "ack", &a.encode());
    println!("seeds written under {}/corpus", env!("CARGO_MANIFEST_DIR"));
}
