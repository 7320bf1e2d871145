//! The workload model: signed clicks with Zipf-popular ads, unique click ids,
//! and configured rates of duplicates, bad signatures, expired tokens, unknown
//! kids and late batched events. A seed makes a run reproducible.
//!
//! Requests are generated ahead into a pool (signing costs about a microsecond,
//! which would otherwise be on the load generator's hot path); each entry
//! keeps what the oracle needs to know about it.

use rand::{Rng, SeedableRng};
use rand_distr::{Distribution, Zipf};
use serde::{Deserialize, Serialize};

use wire::signed::{encode_component as enc, sign};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Shape {
    /// A new, valid click.
    Valid,
    /// A re-send of an earlier valid click (same signed URL).
    Duplicate,
    BadSignature,
    Expired,
    UnknownKid,
    /// A valid click sent as a batched event with a timestamp hours old.
    Late,
    /// Not a click: the fixed request given with --fixed-request.
    Fixed,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Meta {
    pub shape: Shape,
    pub click_id: String,
    pub advertiser_id: String,
    pub campaign_id: String,
    pub ad_id: String,
    pub cost_micros: u64,
    /// Signed timestamp, Unix seconds.
    pub ts: i64,
}

#[derive(Debug, Clone)]
pub struct Model {
    pub host: String,
    pub kid: String,
    pub secret: Vec<u8>,
    pub advertisers: u32,
    pub campaigns_per_advertiser: u32,
    pub ads_per_campaign: u32,
    pub zipf_s: f64,
    pub dup_rate: f64,
    pub bad_sig_rate: f64,
    pub expired_rate: f64,
    pub unknown_kid_rate: f64,
    pub late_rate: f64,
    /// How old a late event is, seconds.
    pub late_age_s: i64,
    pub seed: u64,
}

pub struct Pool {
    pub requests: Vec<Vec<u8>>,
    pub meta: Vec<Meta>,
}

impl Model {
    /// `n` requests for worker `worker` (seeded by seed and worker).
    pub fn generate(&self, n: usize, worker: usize, now_s: i64) -> Pool {
        let mut rng = rand::rngs::StdRng::seed_from_u64(
            self.seed ^ (worker as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15),
        );
        let total_ads =
            (self.advertisers * self.campaigns_per_advertiser * self.ads_per_campaign).max(1);
        let zipf = Zipf::new(total_ads as u64, self.zipf_s.max(0.0001)).expect("zipf parameters");
        let mut requests: Vec<Vec<u8>> = Vec::with_capacity(n);
        let mut meta: Vec<Meta> = Vec::with_capacity(n);
        let mut valid_idx: Vec<usize> = Vec::new();
        for i in 0..n {
            let r: f64 = rng.gen();
            let mut shape = pick(
                r,
                &[
                    (self.dup_rate, Shape::Duplicate),
                    (self.bad_sig_rate, Shape::BadSignature),
                    (self.expired_rate, Shape::Expired),
                    (self.unknown_kid_rate, Shape::UnknownKid),
                    (self.late_rate, Shape::Late),
                ],
            );
            if shape == Shape::Duplicate && valid_idx.is_empty() {
                shape = Shape::Valid;
            }
            if shape == Shape::Duplicate {
                let j = valid_idx[rng.gen_range(0..valid_idx.len())];
                requests.push(requests[j].clone());
                let mut m: Meta = meta[j].clone();
                m.shape = Shape::Duplicate;
                meta.push(m);
                continue;
            }
            // Ad rank 1 is the hottest (the viral campaign).
            let rank = zipf.sample(&mut rng) as u32 - 1;
            let ad = rank % self.ads_per_campaign;
            let camp = rank / self.ads_per_campaign % self.campaigns_per_advertiser;
            let adv = rank / (self.ads_per_campaign * self.campaigns_per_advertiser);
            let m = Meta {
                shape,
                click_id: format!("w{worker}-s{}-{i}", self.seed),
                advertiser_id: format!("adv-{adv}"),
                campaign_id: format!("camp-{adv}-{camp}"),
                ad_id: format!("ad-{adv}-{camp}-{ad}"),
                cost_micros: 10_000 * (1 + (rank as u64 % 50)),
                ts: match shape {
                    Shape::Expired => now_s - 30 * 86_400,
                    Shape::Late => now_s - self.late_age_s,
                    _ => now_s,
                },
            };
            let kid = if shape == Shape::UnknownKid {
                "nokey"
            } else {
                self.kid.as_str()
            };
            let q = format!(
                "ad_id={}&advertiser_id={}&campaign_id={}&click_id={}&user_id=u{}&cost_per_click={}.{:06}&timestamp={}&redirect_url={}&kid={}",
                m.ad_id,
                m.advertiser_id,
                m.campaign_id,
                m.click_id,
                rng.gen_range(0..1_000_000u32),
                m.cost_micros / 1_000_000,
                m.cost_micros % 1_000_000,
                m.ts,
                enc("https://shop.example.com/products/summer-sale?utm_source=clickgate&utm_medium=cpc"),
                kid
            );
            let mut signed = sign(&q, &self.secret);
            if shape == Shape::BadSignature {
                // Flip one character of the signature.
                let last = signed.pop().unwrap();
                signed.push(if last == 'A' { 'B' } else { 'A' });
            }
            let path = format!("/api/v1/clicks?{signed}");
            let req = if shape == Shape::Late {
                let body = format!("{path}\n");
                format!(
                    "POST /api/v1/events HTTP/1.1\r\nHost: {}\r\nUser-Agent: loadgen-sdk/1.0 (Linux; Android 14) Mobile\r\nContent-Length: {}\r\n\r\n{body}",
                    self.host,
                    body.len()
                )
            } else {
                format!(
                    "GET {path} HTTP/1.1\r\nHost: {}\r\nUser-Agent: Mozilla/5.0 (Windows NT 10.0; Win64; x64) loadgen/1.0\r\n\r\n",
                    self.host
                )
            };
            if shape == Shape::Valid {
                valid_idx.push(i);
            }
            requests.push(req.into_bytes());
            meta.push(m);
        }
        Pool { requests, meta }
    }
}

fn pick(r: f64, shapes: &[(f64, Shape)]) -> Shape {
    let mut acc = 0.0;
    for (p, s) in shapes {
        acc += p;
        if r < acc {
            return *s;
        }
    }
    Shape::Valid
}

/// Reads `kid`'s secret from a gateway keys file.
pub fn secret_from_keys_file(path: &std::path::Path, kid: &str) -> anyhow::Result<Vec<u8>> {
    use base64::Engine;
    let text = std::fs::read_to_string(path)?;
    let v: toml::Value = toml::from_str(&text)?;
    let keys = v
        .get("key")
        .and_then(|k| k.as_array())
        .ok_or_else(|| anyhow::anyhow!("no [[key]] in {}", path.display()))?;
    for k in keys {
        if k.get("kid").and_then(|x| x.as_str()) == Some(kid) {
            let s = k
                .get("secret")
                .and_then(|x| x.as_str())
                .unwrap_or("")
                .trim_end_matches('=');
            return Ok(base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(s)?);
        }
    }
    anyhow::bail!("{}: no key {kid:?}", path.display())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn model() -> Model {
        Model {
            host: "h".into(),
            kid: "k1".into(),
            secret: vec![1; 32],
            advertisers: 3,
            campaigns_per_advertiser: 2,
            ads_per_campaign: 5,
            zipf_s: 1.1,
            dup_rate: 0.1,
            bad_sig_rate: 0.05,
            expired_rate: 0.05,
            unknown_kid_rate: 0.05,
            late_rate: 0.05,
            late_age_s: 7200,
            seed: 42,
        }
    }

    #[test]
    fn same_seed_same_requests() {
        let a = model().generate(500, 0, 1_800_000_000);
        let b = model().generate(500, 0, 1_800_000_000);
        assert_eq!(a.requests, b.requests);
        let c = model().generate(500, 1, 1_800_000_000);
        assert_ne!(a.requests, c.requests);
    }

    #[test]
    fn shapes_follow_their_rates_and_the_hot_ad_dominates() {
        let p = model().generate(20_000, 0, 1_800_000_000);
        let count = |s: Shape| p.meta.iter().filter(|m| m.shape == s).count() as f64 / 20_000.0;
        assert!((count(Shape::Duplicate) - 0.1).abs() < 0.02);
        assert!((count(Shape::BadSignature) - 0.05).abs() < 0.01);
        assert!((count(Shape::Late) - 0.05).abs() < 0.01);
        let hot = p.meta.iter().filter(|m| m.ad_id == "ad-0-0-0").count();
        let cold = p.meta.iter().filter(|m| m.ad_id == "ad-2-1-4").count();
        assert!(hot > 5 * cold.max(1), "hot {hot} cold {cold}");
        // Duplicates repeat an earlier valid request byte for byte.
        let d = p
            .meta
            .iter()
            .position(|m| m.shape == Shape::Duplicate)
            .unwrap();
        let orig = p
            .meta
            .iter()
            .position(|m| m.click_id == p.meta[d].click_id)
            .unwrap();
        assert_eq!(p.requests[d], p.requests[orig]);
    }
}
