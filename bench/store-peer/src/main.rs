//! redb against fjall on the aggregator's two jobs, same keys, same machine:
//! read-modify-write of partial rows, one fsynced commit per batch of rows;
//! and the query's range scan (one advertiser, 100 ads x 2 devices, 60
//! minutes out of a day). `cargo run --release` in bench/store-peer.

use std::time::Instant;

const ROWS_PER_COMMIT: usize = 1000;
const COMMITS: usize = 300;

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn skewed(&mut self, n: u64) -> u64 {
        let u = (self.next() % 1_000_000) as f64 / 1_000_000.0;
        ((n as f64).powf(u) - 1.0) as u64 % n
    }
}

/// The aggregator's row key layout: advertiser, minute (BE), campaign, ad, device.
fn key(adv: u64, minute: u32, camp: u64, ad: u64, dev: u8) -> Vec<u8> {
    let a = format!("adv-{adv}");
    let c = format!("camp-{adv}-{camp}");
    let d = format!("ad-{adv}-{camp}-{ad}");
    let mut k = vec![a.len() as u8];
    k.extend_from_slice(a.as_bytes());
    k.extend_from_slice(&minute.to_be_bytes());
    for s in [&c, &d] {
        k.push(s.len() as u8);
        k.extend_from_slice(s.as_bytes());
    }
    k.push(dev);
    k.extend_from_slice(b"DE");
    k
}

fn add(old: Option<&[u8]>) -> [u8; 44] {
    let mut v = [0u8; 44];
    if let Some(o) = old {
        v.copy_from_slice(o);
    }
    let c = u64::from_le_bytes(v[0..8].try_into().unwrap()) + 1;
    v[0..8].copy_from_slice(&c.to_le_bytes());
    v
}

fn batches() -> Vec<Vec<Vec<u8>>> {
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    (0..COMMITS)
        .map(|b| {
            (0..ROWS_PER_COMMIT)
                .map(|_| {
                    let adv = rng.skewed(1000);
                    key(adv, 1000 + (b / 50) as u32, rng.next() % 10, rng.skewed(10), (rng.next() % 5) as u8)
                })
                .collect()
        })
        .collect()
}

fn day() -> impl Iterator<Item = Vec<Vec<u8>>> {
    (0..1440u32).map(|m| {
        let mut v = Vec::new();
        for adv in 0..50u64 {
            let ads = if adv == 0 { 100 } else { 4 };
            for a in 0..ads {
                for dev in 0..2 {
                    v.push(key(adv, 10_000 + m, a / 10, a % 10, dev));
                }
            }
        }
        v
    })
}

fn report(name: &str, what: &str, t: Instant, n: usize) {
    let s = t.elapsed().as_secs_f64();
    println!("{name} {what} {:.0}/s", n as f64 / s);
}

fn redb_bench() {
    use redb::{Database, ReadableTable, TableDefinition};
    const T: TableDefinition<&[u8], &[u8]> = TableDefinition::new("rows");
    let d = tempfile::tempdir().unwrap();
    let db = Database::create(d.path().join("r.redb")).unwrap();
    let bs = batches();
    let t = Instant::now();
    for b in &bs {
        let tx = db.begin_write().unwrap();
        {
            let mut tab = tx.open_table(T).unwrap();
            for k in b {
                let v = add(tab.get(k.as_slice()).unwrap().map(|g| g.value().to_vec()).as_deref());
                tab.insert(k.as_slice(), v.as_slice()).unwrap();
            }
        }
        tx.commit().unwrap();
    }
    report("redb", "rows_upserted_fsync_per_1000", t, COMMITS * ROWS_PER_COMMIT);
    for rows in day().collect::<Vec<_>>().chunks(20) {
        let tx = db.begin_write().unwrap();
        {
            let mut tab = tx.open_table(T).unwrap();
            for k in rows.iter().flatten() {
                tab.insert(k.as_slice(), [1u8; 44].as_slice()).unwrap();
            }
        }
        tx.commit().unwrap();
    }
    let mut lat = Vec::new();
    for i in 0..500u32 {
        let m0 = 10_000 + (i * 37) % 1380;
        let t = Instant::now();
        let tx = db.begin_read().unwrap();
        let tab = tx.open_table(T).unwrap();
        let lo = key(0, m0, 0, 0, 0)[..10].to_vec();
        let hi = key(0, m0 + 60, 0, 0, 0)[..10].to_vec();
        let n = tab.range(lo.as_slice()..hi.as_slice()).unwrap().count();
        assert_eq!(n, 12_000);
        lat.push(t.elapsed().as_micros());
    }
    lat.sort();
    println!("redb scan_12000_rows p50 {} us p99 {} us", lat[250], lat[495]);
}

fn fjall_bench() {
    use fjall::{Config, PartitionCreateOptions, PersistMode};
    let d = tempfile::tempdir().unwrap();
    let ks = Config::new(d.path()).open_transactional().unwrap();
    let p = ks.open_partition("rows", PartitionCreateOptions::default()).unwrap();
    let bs = batches();
    let t = Instant::now();
    for b in &bs {
        let mut tx = ks.write_tx().durability(Some(PersistMode::SyncAll));
        for k in b {
            let v = add(tx.get(&p, k).unwrap().as_deref());
            tx.insert(&p, k.as_slice(), v.as_slice());
        }
        tx.commit().unwrap();
    }
    report("fjall", "rows_upserted_fsync_per_1000", t, COMMITS * ROWS_PER_COMMIT);
    for rows in day().collect::<Vec<_>>().chunks(20) {
        let mut tx = ks.write_tx().durability(Some(PersistMode::SyncAll));
        for k in rows.iter().flatten() {
            tx.insert(&p, k.as_slice(), [1u8; 44].as_slice());
        }
        tx.commit().unwrap();
    }
    let mut lat = Vec::new();
    for i in 0..500u32 {
        let m0 = 10_000 + (i * 37) % 1380;
        let t = Instant::now();
        let tx = ks.read_tx();
        let lo = key(0, m0, 0, 0, 0)[..10].to_vec();
        let hi = key(0, m0 + 60, 0, 0, 0)[..10].to_vec();
        let n = tx.range(&p, lo..hi).count();
        assert_eq!(n, 12_000);
        lat.push(t.elapsed().as_micros());
    }
    lat.sort();
    println!("fjall scan_12000_rows p50 {} us p99 {} us", lat[250], lat[495]);
}

fn main() {
    // Interleaved, twice, so drift hits both alike.
    for _ in 0..2 {
        redb_bench();
        fjall_bench();
    }
}
