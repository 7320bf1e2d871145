//! Replays the kept fuzz corpus (`fuzz/corpus/`: seeds, and any input a fuzz
//! run found crashing) through the fuzz targets' bodies, so a fixed crash stays
//! fixed without libFuzzer in the normal build.

use std::path::Path;

fn replay(target: &str, f: fn(&[u8])) -> usize {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../fuzz/corpus")
        .join(target);
    let mut n = 0;
    for e in std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
        let data = std::fs::read(e.unwrap().path()).unwrap();
        f(&data);
        n += 1;
    }
    n
}

#[test]
fn segment_corpus_replays() {
    assert!(replay("segment_scan", wire::fuzzing::segment_scan) >= 2);
}

#[test]
fn batch_corpus_replays() {
    assert!(replay("batch_decode", wire::fuzzing::batch_decode) >= 4);
}
