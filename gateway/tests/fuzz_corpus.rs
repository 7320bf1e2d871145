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
    let ring = gateway::fuzzing::ring();
    let policy = gateway::fuzzing::policy(true);
    let mut scratch = vec![0u8; q.len()];
    let s = gateway::token::verify(
        &q[1..],
        ring,
        &policy,
        gateway::fuzzing::NOW_MS,
        &mut scratch,
    )
    .unwrap();
    assert_eq!(s.redirect_url, "https://example.com/");
}
