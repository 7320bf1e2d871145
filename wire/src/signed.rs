//! The signed click URL, as the ad server writes it and the gateway reads it:
//!
//! ```text
//! /api/v1/clicks?ad_id=..&advertiser_id=..&campaign_id=..&click_id=..&user_id=..
//!     &cost_per_click=..&timestamp=..&redirect_url=..&kid=..&sig=<base64url HMAC-SHA256>
//! ```
//!
//! The MAC is over the exact query bytes before `&sig=`, under the key that
//! `kid` names. This module writes such URLs (loadgen, tests, the `sign`
//! command, the fuzz seeds); the gateway core verifies them in place.

use base64::Engine;
use ring::hmac;

/// What separates the signed bytes from the signature; the signature is the
/// query's last parameter.
pub const SIG_PARAM: &[u8] = b"&sig=";
/// Length of the base64url (unpadded) HMAC-SHA256 tag.
pub const SIG_B64_LEN: usize = 43;

/// The base64url alphabet, unpadded: the encoding of secrets and tags.
pub const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::URL_SAFE_NO_PAD;

/// Signs a query the way the ad server does: appends `&sig=` and the
/// base64url HMAC-SHA256 of the query bytes.
pub fn sign(query: &str, secret: &[u8]) -> String {
    let key = hmac::Key::new(hmac::HMAC_SHA256, secret);
    let tag = hmac::sign(&key, query.as_bytes());
    format!("{query}&sig={}", B64.encode(tag.as_ref()))
}

/// Percent-encodes a value for a query (unreserved characters stay).
pub fn encode_component(v: &str) -> String {
    let mut out = String::with_capacity(v.len() * 3);
    for b in v.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// The fields of a click or impression URL, before signing.
#[derive(Debug, Clone, Copy)]
pub struct Click<'a> {
    pub ad_id: &'a str,
    pub advertiser_id: &'a str,
    pub campaign_id: &'a str,
    pub click_id: &'a str,
    pub user_id: &'a str,
    /// A decimal amount, e.g. `0.25` (at most six fractional digits).
    pub cost_per_click: &'a str,
    /// Unix seconds.
    pub timestamp: i64,
    /// Empty for an impression.
    pub redirect_url: &'a str,
    pub kid: &'a str,
}

impl Click<'_> {
    /// The query, every value percent-encoded, in the ad server's order.
    pub fn query(&self) -> String {
        let e = encode_component;
        let mut q = format!(
            "ad_id={}&advertiser_id={}&campaign_id={}&click_id={}&user_id={}&cost_per_click={}&timestamp={}",
            e(self.ad_id),
            e(self.advertiser_id),
            e(self.campaign_id),
            e(self.click_id),
            e(self.user_id),
            e(self.cost_per_click),
            self.timestamp,
        );
        if !self.redirect_url.is_empty() {
            q.push_str("&redirect_url=");
            q.push_str(&e(self.redirect_url));
        }
        q.push_str("&kid=");
        q.push_str(&e(self.kid));
        q
    }

    /// The signed query (`query()` then `&sig=`).
    pub fn signed_query(&self, secret: &[u8]) -> String {
        sign(&self.query(), secret)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_signature_is_the_last_parameter_and_verifies() {
        let c = Click {
            ad_id: "ad 1",
            advertiser_id: "adv-1",
            campaign_id: "c",
            click_id: "x/y",
            user_id: "u",
            cost_per_click: "0.25",
            timestamp: 1_795_496_400,
            redirect_url: "https://shop.example/?a=1&b=2",
            kid: "k1",
        };
        let s = c.signed_query(&[7; 32]);
        let at = s.len() - SIG_B64_LEN - SIG_PARAM.len();
        assert_eq!(&s.as_bytes()[at..at + SIG_PARAM.len()], SIG_PARAM);
        assert!(s.starts_with("ad_id=ad%201&"));
        assert!(
            s.contains("&redirect_url=https%3A%2F%2Fshop.example%2F%3Fa%3D1%26b%3D2&kid=k1&sig=")
        );
        let tag = B64.decode(&s[at + SIG_PARAM.len()..]).unwrap();
        let key = hmac::Key::new(hmac::HMAC_SHA256, &[7; 32]);
        hmac::verify(&key, &s.as_bytes()[..at], &tag).unwrap();
        assert!(!Click {
            redirect_url: "",
            ..c
        }
        .query()
        .contains("redirect_url"));
    }
}
