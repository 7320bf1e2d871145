//! Bodies of the fuzz targets (`fuzz/`) for the gateway's parsers, kept here
//! so the normal tests replay the kept corpus through the same code
//! (test-support's `tests/fuzz_corpus.rs`). Never panic; check what must hold.

use std::sync::OnceLock;

use crate::http::{self, Limits, Parse};
use crate::token::{self, KeyRing, Policy};

/// The key the click target signs with (base64url of 32 bytes of 7).
pub const SECRET_B64: &str = "BwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwc";
/// The clock the click target verifies at: 2026-11-24T05:00:00Z.
pub const NOW_MS: i64 = 1_795_496_400_000;

/// The request parser on arbitrary bytes.
pub fn http_parse(data: &[u8]) {
    let limits = Limits {
        header_bytes_max: 8192,
        headers_max: 64,
        body_bytes_max: 1 << 20,
    };
    let mut buf = data.to_vec();
    if let Parse::Request(r) = http::parse(&mut buf, &limits, "x-country") {
        // Every range it reports is inside what it says it consumed.
        assert!(r.consumed <= buf.len());
        for range in [&r.path, &r.query, &r.user_agent, &r.body] {
            assert!(range.start <= range.end && range.end <= r.consumed);
        }
        assert!(r.body.len() <= limits.body_bytes_max);
    }
}

/// The key ring the click target verifies with (kid "k1", [`SECRET_B64`]).
pub fn ring() -> &'static KeyRing {
    static RING: OnceLock<KeyRing> = OnceLock::new();
    RING.get_or_init(|| {
        KeyRing::parse(
            &format!("[[key]]\nkid=\"k1\"\nsecret=\"{SECRET_B64}\"\n"),
            0,
            None,
            0,
        )
        .expect("test key")
    })
}

/// The limits the click target verifies under (the defaults of
/// `deploy/gateway.toml`).
pub fn policy(need_redirect: bool) -> Policy {
    Policy {
        need_redirect,
        ..Policy::DEFAULT_CLICK
    }
}

/// The signed-click verifier. An odd first byte signs the rest with the test
/// key first, so the fuzzer reaches the field decoding behind a good
/// signature; an even one verifies the rest as it is.
pub fn click_verify(data: &[u8]) {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let policy = policy(mode & 2 == 0);
    let query: Vec<u8> = if mode & 1 == 1 {
        let Ok(text) = std::str::from_utf8(rest) else {
            return;
        };
        let secret = [7u8; 32];
        wire::signed::sign(text, &secret).into_bytes()
    } else {
        rest.to_vec()
    };
    let mut scratch = vec![0u8; query.len()];
    if let Ok(s) = token::verify(&query, ring(), &policy, NOW_MS, &mut scratch) {
        // Whatever verified carries the key's HMAC of the bytes before its
        // last `&sig=`: nothing unsigned gets through, so the redirect and
        // ids come from signed bytes only.
        let text = std::str::from_utf8(&query).expect("a verified query is UTF-8");
        let at = text
            .rfind("&sig=")
            .expect("a verified query has a signature");
        assert_eq!(
            wire::signed::sign(&text[..at], &[7u8; 32]),
            text,
            "verified without the key's signature"
        );
        assert!(s.kid == "k1");
        assert!(s.redirect_url.len() <= policy.url_bytes_max);
        for id in [
            s.advertiser_id,
            s.campaign_id,
            s.ad_id,
            s.click_id,
            s.user_id,
        ] {
            assert!(id.len() <= policy.id_bytes_max);
        }
    }
}

/// The HTTP/3 request layer on arbitrary bytes. The first byte picks the
/// stream (even: a request stream, odd: a client unidirectional stream) and
/// how the rest is cut into arrivals. Never a panic; a request it accepts is
/// one whole HTTP/1.1 request to the shard's parser, with no more header
/// lines than fields it decoded.
pub fn h3_request(data: &[u8]) {
    use crate::h3;
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let limits = h3::Limits {
        field_section_max: 4096,
        body_bytes_max: 1024,
    };
    let step = (mode as usize >> 1).max(1);
    if mode & 1 == 1 {
        let mut u = h3::UniStreams::default();
        let mut chunks = rest.chunks(step).peekable();
        while let Some(c) = chunks.next() {
            if u.on_data(2, c, chunks.peek().is_none()).is_err() {
                return;
            }
        }
        return;
    }
    // Arrivals as the shard sees them: the bytes so far, scanned each time.
    let mut seen = 0;
    while seen < rest.len() {
        seen = (seen + step).min(rest.len());
        let fin = seen == rest.len();
        match h3::scan_request(&rest[..seen], fin, &limits) {
            Ok(h3::Scan::Incomplete) => assert!(!fin),
            Ok(h3::Scan::Complete { headers, data }) => {
                let mut out = Vec::new();
                let r = h3::to_http1(
                    rest,
                    headers,
                    &data,
                    mode & 2 == 2,
                    &limits,
                    &mut h3::Scratch::default(),
                    &mut out,
                );
                if r.is_ok() {
                    let http_limits = Limits {
                        header_bytes_max: 2 * limits.field_section_max + 64,
                        headers_max: 256,
                        body_bytes_max: limits.body_bytes_max,
                    };
                    let p = http::parse(&mut out, &http_limits, "x-country");
                    assert!(!matches!(p, Parse::Partial), "a whole request parses whole");
                }
                return;
            }
            Err(_) => return,
        }
    }
    let mut q = Vec::new();
    let mut out = Vec::new();
    h3::response_frames(rest, &mut q, &mut out);
}
