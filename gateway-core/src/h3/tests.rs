use super::*;

const LIMITS: Limits = Limits {
    field_section_max: 2048,
    body_bytes_max: 100,
};

fn frame(out: &mut Vec<u8>, ty: u64, payload: &[u8]) {
    write_varint(out, ty);
    write_varint(out, payload.len() as u64);
    out.extend_from_slice(payload);
}

fn get_block(path: &str, extra: &[(&str, &str)]) -> Vec<u8> {
    let mut b = Vec::new();
    qpack::begin(&mut b);
    b.extend_from_slice(&[0xc0 | 17, 0xc0 | 23]);
    qpack::write_int(&mut b, 0x50, 4, 1);
    qpack::write_int(&mut b, 0, 7, path.len() as u64);
    b.extend_from_slice(path.as_bytes());
    qpack::put_literal(&mut b, b":authority", b"gw.example");
    for (n, v) in extra {
        qpack::put_literal(&mut b, n.as_bytes(), v.as_bytes());
    }
    b
}

fn http1(stream: &[u8], early: bool) -> Result<String, RequestError> {
    let Scan::Complete { headers, data } = scan_request(stream, true, &LIMITS)? else {
        panic!("incomplete")
    };
    let mut out = Vec::new();
    to_http1(
        stream,
        headers,
        &data,
        early,
        &LIMITS,
        &mut Scratch::default(),
        &mut out,
    )?;
    Ok(String::from_utf8(out).unwrap())
}

#[test]
fn varints_round_trip() {
    for v in [
        0,
        63,
        64,
        16383,
        16384,
        (1 << 30) - 1,
        1 << 30,
        (1 << 62) - 1,
    ] {
        let mut b = Vec::new();
        write_varint(&mut b, v);
        let mut at = 0;
        assert_eq!(read_varint(&b, &mut at), Some(v));
        assert_eq!(at, b.len());
        assert_eq!(read_varint(&b[..b.len() - 1], &mut 0), None);
    }
}

#[test]
fn a_click_becomes_the_http1_bytes_the_shard_parses() {
    let mut s = Vec::new();
    frame(&mut s, 0x21, b"grease before the headers");
    frame(
        &mut s,
        FRAME_HEADERS,
        &get_block("/c?a=1", &[("user-agent", "UA"), ("early-data", "1")]),
    );
    // A request is whole only at the stream's end.
    assert_eq!(scan_request(&s, false, &LIMITS), Ok(Scan::Incomplete));
    assert_eq!(
        http1(&s, false).unwrap(),
        "GET /c?a=1 HTTP/1.1\r\nHost: gw.example\r\nuser-agent: UA\r\n\r\n"
    );
    // Early data is the server's to say.
    assert!(http1(&s, true).unwrap().ends_with("Early-Data: 1\r\n\r\n"));
    // And the shard's parser takes it.
    let mut raw = http1(&s, true).unwrap().into_bytes();
    let limits = crate::http::Limits {
        header_bytes_max: 8192,
        headers_max: 64,
        body_bytes_max: 100,
    };
    let crate::http::Parse::Request(r) = crate::http::parse(&mut raw, &limits, "") else {
        panic!()
    };
    assert!(r.early_data);
    assert_eq!(&raw[r.query.clone()], b"a=1");
}

#[test]
fn a_post_body_in_several_data_frames_is_joined_and_trailers_ignored() {
    let mut b = Vec::new();
    qpack::begin(&mut b);
    b.extend_from_slice(&[0xc0 | 20, 0xc0 | 23]);
    qpack::put_literal(&mut b, b":path", b"/api/v1/events");
    let mut s = Vec::new();
    frame(&mut s, FRAME_HEADERS, &b);
    frame(&mut s, FRAME_DATA, b"{\"a\":");
    frame(&mut s, FRAME_DATA, b"1}");
    let mut t = Vec::new();
    qpack::begin(&mut t);
    qpack::put_literal(&mut t, b"x-trailer", b"1");
    frame(&mut s, FRAME_HEADERS, &t);
    let h = http1(&s, false).unwrap();
    assert!(
        h.starts_with("POST /api/v1/events HTTP/1.1\r\nHost: h3\r\n"),
        "{h}"
    );
    assert!(h.ends_with("Content-Length: 7\r\n\r\n{\"a\":1}"), "{h}");
    // DATA after trailers is not.
    frame(&mut s, FRAME_DATA, b"x");
    assert!(matches!(
        scan_request(&s, true, &LIMITS),
        Err(RequestError::Connection(ConnError {
            code: code::FRAME_UNEXPECTED,
            ..
        }))
    ));
}

#[test]
fn frames_out_of_place_close_the_connection_with_their_code() {
    let conn = |r: Result<Scan, RequestError>| match r {
        Err(RequestError::Connection(e)) => e.code,
        other => panic!("{other:?}"),
    };
    let mut s = Vec::new();
    frame(&mut s, FRAME_DATA, b"x");
    assert_eq!(
        conn(scan_request(&s, false, &LIMITS)),
        code::FRAME_UNEXPECTED
    );
    for ty in [
        FRAME_SETTINGS,
        FRAME_GOAWAY,
        FRAME_PUSH_PROMISE,
        0x02,
        FRAME_MAX_PUSH_ID,
    ] {
        let mut s = Vec::new();
        frame(&mut s, ty, b"\x00");
        assert_eq!(
            conn(scan_request(&s, false, &LIMITS)),
            code::FRAME_UNEXPECTED,
            "{ty}"
        );
    }
    // A stream that ends inside a frame.
    let mut s = Vec::new();
    frame(&mut s, FRAME_HEADERS, &get_block("/", &[]));
    s.extend_from_slice(&[0, 5, 1]);
    assert_eq!(conn(scan_request(&s, true, &LIMITS)), code::FRAME_ERROR);
    // A stream with no HEADERS at all.
    assert_eq!(
        scan_request(&[], true, &LIMITS),
        Err(RequestError::Stream(code::REQUEST_INCOMPLETE))
    );
    // Unknown frames without end.
    let mut s = Vec::new();
    frame(&mut s, 0x21, &vec![0; LIMITS.stream_bytes_max()]);
    assert_eq!(conn(scan_request(&s, false, &LIMITS)), code::EXCESSIVE_LOAD);
}

#[test]
fn limits_answer_431_and_413_from_the_frame_headers() {
    // A HEADERS frame announced past the limit: 431 before it arrives.
    let mut s = Vec::new();
    write_varint(&mut s, FRAME_HEADERS);
    write_varint(&mut s, 5000);
    assert_eq!(
        scan_request(&s, false, &LIMITS),
        Err(RequestError::Http(HttpError::HeaderTooLarge))
    );
    // Decoded past the limit (a small block can name large static values
    // many times).
    let mut b = get_block("/", &[]);
    for _ in 0..40 {
        qpack::write_int(&mut b, 0xc0, 6, 85);
    }
    let mut s = Vec::new();
    frame(&mut s, FRAME_HEADERS, &b);
    assert_eq!(
        http1(&s, false),
        Err(RequestError::Http(HttpError::HeaderTooLarge))
    );
    // DATA past the body limit, over two frames: 413 at the second header.
    let mut s = Vec::new();
    frame(&mut s, FRAME_HEADERS, &get_block("/", &[]));
    frame(&mut s, FRAME_DATA, &[b'x'; 60]);
    write_varint(&mut s, FRAME_DATA);
    write_varint(&mut s, 60);
    assert_eq!(
        scan_request(&s, false, &LIMITS),
        Err(RequestError::Http(HttpError::BodyTooLarge))
    );
}

#[test]
fn malformed_requests_are_400_and_never_reach_the_parser_as_more_lines() {
    let cases: &[&[(&str, &str)]] = &[
        &[("x-a", "1\r\nx-injected: 1")],
        &[("X-Upper", "1")],
        &[("connection", "close")],
        &[("transfer-encoding", "chunked")],
        &[("te", "gzip")],
        &[(":method", "GET")],
        &[(":unknown", "x")],
        &[("bad name", "x")],
    ];
    for extra in cases {
        let mut s = Vec::new();
        frame(&mut s, FRAME_HEADERS, &get_block("/c", extra));
        assert_eq!(
            http1(&s, false),
            Err(RequestError::Http(HttpError::Malformed)),
            "{extra:?}"
        );
    }
    // A path with a space, or none; a pseudo-header after a regular one.
    for path in ["/a b", ""] {
        let mut s = Vec::new();
        frame(&mut s, FRAME_HEADERS, &get_block(path, &[]));
        assert_eq!(
            http1(&s, false),
            Err(RequestError::Http(HttpError::Malformed))
        );
    }
    let mut b = get_block("/", &[("x-a", "1")]);
    b.push(0xc0 | 22);
    let mut s = Vec::new();
    frame(&mut s, FRAME_HEADERS, &b);
    assert_eq!(
        http1(&s, false),
        Err(RequestError::Http(HttpError::Malformed))
    );
    // te: trailers is the one allowed.
    let mut s = Vec::new();
    frame(
        &mut s,
        FRAME_HEADERS,
        &get_block("/", &[("te", "trailers")]),
    );
    assert!(http1(&s, false).is_ok());
    // A dynamic-table reference is the connection's error.
    let mut s = Vec::new();
    frame(&mut s, FRAME_HEADERS, &[1, 0, 0x80]);
    assert!(matches!(
        http1(&s, false),
        Err(RequestError::Connection(ConnError {
            code: code::QPACK_DECOMPRESSION_FAILED,
            ..
        }))
    ));
}

#[test]
fn answers_become_headers_and_data_frames() {
    let raw = b"HTTP/1.1 403 Forbidden\r\nServer: clickgate\r\nAlt-Svc: h3=\":8443\"\r\nConnection: close\r\nContent-Length: 4\r\n\r\nnope";
    let (mut q, mut out) = (Vec::new(), Vec::new());
    assert!(response_frames(raw, &mut q, &mut out));
    let mut at = 0;
    let Some(Ok((FRAME_HEADERS, h))) = read_frame(&out, &mut at) else {
        panic!()
    };
    let (mut s, mut f) = (Vec::new(), Vec::new());
    qpack::decode(&out[h], &mut s, &mut f, 4096).unwrap();
    let fields: Vec<(&[u8], &[u8])> = f
        .iter()
        .map(|f| (&s[f.name.clone()], &s[f.value.clone()]))
        .collect();
    assert_eq!(
        fields,
        [
            (&b":status"[..], &b"403"[..]),
            (b"server", b"clickgate"),
            (b"content-length", b"4")
        ]
    );
    assert_eq!(
        read_frame(&out, &mut at),
        Some(Ok((FRAME_DATA, out.len() - 4..out.len())))
    );
    assert!(!response_frames(b"garbage", &mut q, &mut out));
}

#[test]
fn the_control_stream_must_start_with_settings_and_stay_open() {
    let settings = control_stream_start(&LIMITS);
    let mut u = UniStreams::default();
    // Byte by byte: the type, then SETTINGS, arrive in pieces.
    for b in &settings {
        u.on_data(2, std::slice::from_ref(b), false).unwrap();
    }
    let mut g = Vec::new();
    frame(&mut g, FRAME_GOAWAY, &[0]);
    u.on_data(2, &g, false).unwrap();
    let e = |r: Result<(), ConnError>| r.unwrap_err().code;
    // A second SETTINGS, a request frame, closing it.
    let mut s2 = Vec::new();
    frame(&mut s2, FRAME_SETTINGS, &[]);
    assert_eq!(e(u.on_data(2, &s2, false)), code::FRAME_UNEXPECTED);
    let mut u = UniStreams::default();
    u.on_data(2, &settings, false).unwrap();
    let mut d = Vec::new();
    frame(&mut d, FRAME_HEADERS, &[0, 0]);
    assert_eq!(e(u.on_data(2, &d, false)), code::FRAME_UNEXPECTED);
    let mut u = UniStreams::default();
    u.on_data(2, &settings, false).unwrap();
    assert_eq!(e(u.on_data(2, &[], true)), code::CLOSED_CRITICAL_STREAM);
    // Not SETTINGS first; a second control stream; a push stream.
    let mut u = UniStreams::default();
    let mut g2 = vec![0];
    g2.extend_from_slice(&g);
    assert_eq!(e(u.on_data(2, &g2, false)), code::MISSING_SETTINGS);
    let mut u = UniStreams::default();
    u.on_data(2, &settings, false).unwrap();
    assert_eq!(
        e(u.on_data(6, &settings, false)),
        code::STREAM_CREATION_ERROR
    );
    assert_eq!(
        e(UniStreams::default().on_data(2, &[1], false)),
        code::STREAM_CREATION_ERROR
    );
    // HTTP/2 settings and repeated ids.
    for payload in [&[0x02u8, 0][..], &[0x01, 0, 0x01, 0]] {
        let mut c = vec![0];
        frame(&mut c, FRAME_SETTINGS, payload);
        assert_eq!(
            e(UniStreams::default().on_data(2, &c, false)),
            code::SETTINGS_ERROR
        );
    }
}

#[test]
fn qpack_streams_may_only_say_capacity_zero_and_unknown_streams_are_dropped() {
    let mut u = UniStreams::default();
    u.on_data(2, &[0x02, 0x20], false).unwrap();
    assert_eq!(
        u.on_data(2, &[0x3f, 0xe1, 0x1f], false).unwrap_err().code,
        code::QPACK_ENCODER_STREAM_ERROR
    );
    let mut u = UniStreams::default();
    u.on_data(10, &[0x03, 0x41], false).unwrap();
    // A grease stream type, with anything after it.
    u.on_data(14, &[0x40, 0x21, 0xff, 0xff], false).unwrap();
    u.on_data(14, &[0xff; 100], true).unwrap();
}
