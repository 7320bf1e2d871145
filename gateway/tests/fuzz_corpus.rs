//! Replays the kept fuzz corpus (`fuzz/corpus/`) through the gateway's fuzz
//! targets' bodies; see wire/tests/fuzz_corpus.rs.

use std::path::Path;

use wire::fuzzing::replay_corpus;

fn root() -> &'static Path {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
}

#[test]
fn http_corpus_replays() {
    assert!(replay_corpus(root(), "http_parse", gateway::fuzzing::http_parse) >= 5);
}

#[test]
fn click_corpus_replays() {
    assert!(replay_corpus(root(), "click_verify", gateway::fuzzing::click_verify) >= 3);
}

#[test]
fn the_signed_seed_verifies() {
    // The corpus reaches past the signature check: the seed signed by the
    // harness verifies (else the fuzzer would only ever see rejections).
    let q = std::fs::read(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus/click_verify/signed"),
    )
    .unwrap();
    let ring = gateway::token::KeyRing::parse(
        &format!(
            "[[key]]\nkid=\"k1\"\nsecret=\"{}\"\n",
            gateway::fuzzing::SECRET_B64
        ),
        0,
        None,
        0,
    )
    .unwrap();
    let policy = gateway::token::Policy {
        max_age_ms: 86_400_000,
        future_skew_ms: 300_000,
        id_bytes_max: 64,
        url_bytes_max: 2048,
        cost_micros_max: 1_000_000_000,
        need_redirect: true,
    };
    let mut scratch = vec![0u8; q.len()];
    let s = gateway::token::verify(
        &q[1..],
        &ring,
        &policy,
        gateway::fuzzing::NOW_MS,
        &mut scratch,
    )
    .unwrap();
    assert_eq!(s.redirect_url, "https://example.com/");
}
