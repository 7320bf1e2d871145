//! The kept fuzz corpus (`fuzz/corpus/<target>/`: seeds, and any input a fuzz
//! run found crashing), replayed through the targets' bodies by the normal
//! tests, so a fixed crash stays fixed without libFuzzer in the build.

/// Runs `f` on every file of the corpus of `target`; returns how many.
pub fn replay_corpus(target: &str, f: fn(&[u8])) -> usize {
    let dir = crate::workspace_root().join("fuzz/corpus").join(target);
    let mut n = 0;
    for e in std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
        let data = std::fs::read(e.unwrap().path()).unwrap();
        f(&data);
        n += 1;
    }
    n
}
