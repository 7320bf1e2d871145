//! Replays the kept fuzz corpus (`fuzz/corpus/`) through every fuzz target's
//! body: the decoders of `wire` and the gateway core's parsers.

use test_support::fuzz::replay_corpus;

#[test]
fn segment_corpus_replays() {
    assert!(replay_corpus("segment_scan", wire::fuzzing::segment_scan) >= 2);
}

#[test]
fn segz_corpus_replays() {
    assert!(replay_corpus("segz_read", wire::fuzzing::segz_read) >= 2);
}

#[test]
fn batch_corpus_replays() {
    assert!(replay_corpus("batch_decode", wire::fuzzing::batch_decode) >= 5);
}

#[test]
fn http_corpus_replays() {
    assert!(replay_corpus("http_parse", gateway_core::fuzzing::http_parse) >= 5);
}

#[test]
fn click_corpus_replays() {
    assert!(replay_corpus("click_verify", gateway_core::fuzzing::click_verify) >= 3);
}

#[test]
fn the_signed_seed_verifies() {
    // The corpus reaches past the signature check: the seed signed by the
    // harness verifies (else the fuzzer would only ever see rejections).
    let q = std::fs::read(test_support::workspace_root().join("fuzz/corpus/click_verify/signed"))
        .unwrap();
    let ring = gateway_core::fuzzing::ring();
    let policy = gateway_core::fuzzing::policy(true);
    let mut scratch = vec![0u8; q.len()];
    let s = gateway_core::token::verify(
        &q[1..],
        ring,
        &policy,
        gateway_core::fuzzing::NOW_MS,
        &mut scratch,
    )
    .unwrap();
    assert_eq!(s.redirect_url, "https://example.com/");
}

#[test]
fn h3_corpus_replays() {
    assert!(replay_corpus("h3_request", gateway_core::fuzzing::h3_request) >= 5);
}
