//! Replays the kept fuzz corpus (`fuzz/corpus/`: seeds, and any input a fuzz
//! run found crashing) through the fuzz targets' bodies, so a fixed crash stays
//! fixed without libFuzzer in the normal build.

use std::path::Path;

use wire::fuzzing::replay_corpus;

fn root() -> &'static Path {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
}

#[test]
fn segment_corpus_replays() {
    assert!(replay_corpus(root(), "segment_scan", wire::fuzzing::segment_scan) >= 2);
}

#[test]
fn batch_corpus_replays() {
    assert!(replay_corpus(root(), "batch_decode", wire::fuzzing::batch_decode) >= 5);
}
