//! Which aggregator instance owns an advertiser: rendezvous (highest random
//! weight) hashing over the configured instance ids. Shippers route rows and
//! events by it, aggregators check it and route queries by it, so both sides
//! must compute the same answer from the same instance list: it is a format
//! that crosses a process boundary, hence here.
//!
//! Rendezvous hashing: each (instance, advertiser) pair gets a pseudo-random
//! weight; the highest wins. Adding an instance moves only the advertisers
//! the new one wins (about 1/N of them), from every old instance alike;
//! removing one moves only its own. The hash is FNV-1a 64 finished with the
//! splitmix64 mixer: fixed forever (changing it would move every advertiser).

fn weight(instance: &str, advertiser: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in instance
        .as_bytes()
        .iter()
        .chain(&[0xFF])
        .chain(advertiser.as_bytes())
    {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    // splitmix64's finalizer: FNV's low bits alone weigh poorly.
    h = (h ^ (h >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h = (h ^ (h >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    h ^ (h >> 31)
}

/// The index in `instances` of the owner of `advertiser`. Panics on an empty
/// list (a configuration has at least one instance).
pub fn owner<S: AsRef<str>>(advertiser: &str, instances: &[S]) -> usize {
    assert!(!instances.is_empty(), "no aggregator instances");
    let mut best = (0, 0u64);
    for (i, id) in instances.iter().enumerate() {
        let w = weight(id.as_ref(), advertiser);
        // Ties (never seen, but possible) go to the lower id, so the answer
        // does not depend on the list's order.
        if i == 0 || w > best.1 || (w == best.1 && id.as_ref() < instances[best.0].as_ref()) {
            best = (i, w);
        }
    }
    best.0
}

/// Parses an instance given on a command line as `ID=HOST:PORT`.
pub fn parse_instance(s: &str) -> Result<(String, std::net::SocketAddr), String> {
    let (id, addr) = s
        .split_once('=')
        .filter(|(id, _)| !id.is_empty())
        .ok_or_else(|| format!("{s:?}: expected ID=HOST:PORT"))?;
    let addr = addr.parse().map_err(|e| format!("{s:?}: {e}"))?;
    Ok((id.to_owned(), addr))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn advertisers(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("adv-{i}")).collect()
    }

    #[test]
    fn fixed_answers_that_must_never_change() {
        // Changing these means every deployed cluster would move its
        // advertisers: a new hash needs a migration, not an edit.
        let ids = ["agg-a", "agg-b", "agg-c"];
        let got: Vec<usize> = ["adv-1", "adv-2", "adv-3", "adv-4", "acme", ""]
            .iter()
            .map(|a| owner(a, &ids))
            .collect();
        assert_eq!(got, FIXED);
    }
    const FIXED: [usize; 6] = [1, 1, 0, 2, 0, 1];

    #[test]
    fn instances_parse_from_the_command_line() {
        assert_eq!(
            parse_instance("agg-a=127.0.0.1:7400").unwrap(),
            ("agg-a".to_owned(), "127.0.0.1:7400".parse().unwrap())
        );
        assert!(parse_instance("127.0.0.1:7400").is_err());
        assert!(parse_instance("=127.0.0.1:7400").is_err());
        assert!(parse_instance("a=nowhere").is_err());
    }

    #[test]
    fn order_of_the_list_does_not_matter() {
        let a = ["x", "y", "z"];
        let b = ["z", "x", "y"];
        for adv in advertisers(500) {
            assert_eq!(a[owner(&adv, &a)], b[owner(&adv, &b)]);
        }
    }

    #[test]
    fn balanced_and_growing_moves_only_to_the_new_instance() {
        let advs = advertisers(20_000);
        let three = ["agg-a", "agg-b", "agg-c"];
        let four = ["agg-a", "agg-b", "agg-c", "agg-d"];
        let mut counts = [0usize; 3];
        let mut moved = 0;
        for a in &advs {
            let before = owner(a, &three);
            counts[before] += 1;
            let after = owner(a, &four);
            if after != before {
                assert_eq!(
                    four[after], "agg-d",
                    "an advertiser moved between old instances"
                );
                moved += 1;
            }
        }
        for c in counts {
            assert!((6_000..7_400).contains(&c), "unbalanced: {counts:?}");
        }
        // About a quarter move, all to the new instance.
        assert!((4_400..5_600).contains(&moved), "moved {moved}");
        assert_eq!(owner("anything", &["only"]), 0);
    }
}
