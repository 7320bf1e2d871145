//! Who the client is when the gateway sits behind a load balancer: the PROXY
//! protocol header (v1 text, v2 binary; parsed by `ppp`) at the start of a
//! connection, and `X-Forwarded-For` from a trusted proxy. Pure functions over
//! bytes; the shard feeds them. Addresses are IPv6 (IPv4 mapped), as the
//! velocity filter and the rate limiter key them.

use std::net::IpAddr;

use ipnet::IpNet;
use ppp::{v1, v2, HeaderResult, PartialResult};

/// The longest v1 header, CRLF included (the PROXY protocol spec).
const V1_LEN_MAX: usize = 107;

/// What the start of a PROXY-protocol connection holds.
#[derive(Debug, PartialEq, Eq)]
pub enum ProxyParse {
    /// More bytes are needed.
    Partial,
    /// A whole header of `len` bytes. `client` is None for a LOCAL command or
    /// an UNKNOWN / unspecified address (health checks of the balancer
    /// itself): the socket's own peer stands.
    Done {
        len: usize,
        client: Option<[u8; 16]>,
    },
    /// Not a PROXY header, or a malformed one, or longer than allowed.
    Invalid,
}

/// Parses the PROXY header at the front of `buf`, refusing one longer than
/// `len_max` bytes (v1 is at most 107 by its spec; v2 may carry TLVs).
pub fn parse_proxy(buf: &[u8], len_max: usize) -> ProxyParse {
    let window = &buf[..buf.len().min(len_max)];
    // A v1 header is whole at its CRLF; ppp judges some cuts of a partial
    // line (after the source port) invalid rather than incomplete.
    let v1_line = window.starts_with(b"PROXY ");
    if v1_line && memchr::memmem::find(window, b"\r\n").is_none() {
        return if window.len() >= V1_LEN_MAX.min(len_max) {
            ProxyParse::Invalid
        } else {
            ProxyParse::Partial
        };
    }
    let parsed = HeaderResult::parse(window);
    if parsed.is_incomplete() {
        if v1_line {
            return ProxyParse::Invalid;
        }
        return if buf.len() >= len_max {
            ProxyParse::Invalid
        } else {
            ProxyParse::Partial
        };
    }
    match parsed {
        HeaderResult::V1(Ok(h)) => ProxyParse::Done {
            len: h.header.len(),
            client: match h.addresses {
                v1::Addresses::Tcp4(a) => Some(a.source_address.to_ipv6_mapped().octets()),
                v1::Addresses::Tcp6(a) => Some(a.source_address.octets()),
                v1::Addresses::Unknown => None,
            },
        },
        HeaderResult::V2(Ok(h)) => ProxyParse::Done {
            len: h.len(),
            client: match (h.command, h.addresses) {
                (v2::Command::Local, _) => None,
                (_, v2::Addresses::IPv4(a)) => Some(a.source_address.to_ipv6_mapped().octets()),
                (_, v2::Addresses::IPv6(a)) => Some(a.source_address.octets()),
                (_, v2::Addresses::Unspecified | v2::Addresses::Unix(_)) => None,
            },
        },
        HeaderResult::V1(Err(_)) | HeaderResult::V2(Err(_)) => ProxyParse::Invalid,
    }
}

/// The proxies whose `X-Forwarded-For` is believed.
#[derive(Debug, Clone, Default)]
pub struct TrustedProxies {
    nets: Vec<IpNet>,
}

impl TrustedProxies {
    /// From CIDRs ("10.0.0.0/8") or single addresses ("192.0.2.7").
    pub fn parse(list: &[String]) -> Result<Self, String> {
        let nets = list
            .iter()
            .map(|s| {
                s.parse::<IpNet>()
                    .or_else(|_| s.parse::<IpAddr>().map(IpNet::from))
                    .map_err(|_| format!("{s:?} is not an address or a CIDR"))
            })
            .collect::<Result<_, _>>()?;
        Ok(Self { nets })
    }

    pub fn is_empty(&self) -> bool {
        self.nets.is_empty()
    }

    fn trusts(&self, ip: IpAddr) -> bool {
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
            v4 => v4,
        };
        self.nets.iter().any(|n| n.contains(&ip))
    }

    /// The client a request came from. When `peer` is a trusted proxy, that
    /// is the right-most address of `X-Forwarded-For` that is not itself a
    /// trusted proxy (entries left of it could be forged by the client);
    /// otherwise, or when the header is missing or unreadable, `peer`.
    pub fn client(&self, peer: [u8; 16], forwarded_for: &[u8]) -> [u8; 16] {
        if self.nets.is_empty() || forwarded_for.is_empty() {
            return peer;
        }
        if !self.trusts(IpAddr::from(peer)) {
            return peer;
        }
        let Ok(text) = std::str::from_utf8(forwarded_for) else {
            return peer;
        };
        for entry in text.rsplit(',') {
            let Ok(ip) = entry.trim().parse::<IpAddr>() else {
                return peer;
            };
            if !self.trusts(ip) {
                return match ip {
                    IpAddr::V4(v4) => v4.to_ipv6_mapped().octets(),
                    IpAddr::V6(v6) => v6.octets(),
                };
            }
        }
        peer
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{Ipv4Addr, Ipv6Addr};

    fn v4(a: [u8; 4]) -> [u8; 16] {
        Ipv4Addr::from(a).to_ipv6_mapped().octets()
    }

    fn v2_header(cmd: u8, fam: u8, addr: &[u8], tlvs: &[u8]) -> Vec<u8> {
        let mut h = b"\r\n\r\n\0\r\nQUIT\n".to_vec();
        h.push(0x20 | cmd);
        h.push(fam);
        h.extend_from_slice(&((addr.len() + tlvs.len()) as u16).to_be_bytes());
        h.extend_from_slice(addr);
        h.extend_from_slice(tlvs);
        h
    }

    #[test]
    fn proxy_v1_tcp4_and_tcp6_and_unknown() {
        let h = b"PROXY TCP4 198.51.100.7 203.0.113.1 51234 443\r\nGET / HTTP/1.1\r\n";
        assert_eq!(
            parse_proxy(h, 536),
            ProxyParse::Done {
                len: 47,
                client: Some(v4([198, 51, 100, 7]))
            }
        );
        let h = b"PROXY TCP6 2001:db8::1 2001:db8::2 1 2\r\nGET";
        let ProxyParse::Done { len, client } = parse_proxy(h, 536) else {
            panic!("not parsed")
        };
        assert_eq!(&h[len..], b"GET");
        assert_eq!(
            client,
            Some("2001:db8::1".parse::<Ipv6Addr>().unwrap().octets())
        );
        assert_eq!(
            parse_proxy(b"PROXY UNKNOWN\r\nGET", 536),
            ProxyParse::Done {
                len: 15,
                client: None
            }
        );
    }

    #[test]
    fn proxy_v2_proxy_and_local() {
        let mut addr = vec![192, 0, 2, 9, 10, 0, 0, 1];
        addr.extend_from_slice(&[0x1F, 0x90, 0x01, 0xBB]);
        let tlv = [0x04, 0x00, 0x01, 0x00]; // a NOOP TLV
        let mut h = v2_header(1, 0x11, &addr, &tlv);
        let len = h.len();
        h.extend_from_slice(b"\x16\x03\x01");
        assert_eq!(
            parse_proxy(&h, 536),
            ProxyParse::Done {
                len,
                client: Some(v4([192, 0, 2, 9]))
            }
        );
        let local = v2_header(0, 0x00, &[], &[]);
        assert_eq!(
            parse_proxy(&local, 536),
            ProxyParse::Done {
                len: 16,
                client: None
            }
        );
    }

    #[test]
    fn proxy_partial_invalid_and_too_long() {
        let h = b"PROXY TCP4 198.51.100.7 203.0.113.1 51234 443\r\n";
        for cut in 0..h.len() {
            assert_eq!(parse_proxy(&h[..cut], 536), ProxyParse::Partial, "{cut}");
        }
        assert_eq!(
            parse_proxy(b"GET / HTTP/1.1\r\n\r\n", 536),
            ProxyParse::Invalid
        );
        assert_eq!(
            parse_proxy(b"PROXY TCP4 nonsense here\r\n", 536),
            ProxyParse::Invalid
        );
        let big = v2_header(1, 0x11, &[0; 12], &[0x04, 0x03, 0x00, 0, 0, 0, 0]);
        assert!(matches!(parse_proxy(&big, 536), ProxyParse::Done { .. }));
        assert_eq!(parse_proxy(&big, 20), ProxyParse::Invalid);
        assert_eq!(parse_proxy(&big[..10], 20), ProxyParse::Partial);
    }

    #[test]
    fn forwarded_for_believed_only_from_trusted_proxies() {
        let t = TrustedProxies::parse(&["10.0.0.0/8".into(), "192.0.2.1".into()]).unwrap();
        let lb = v4([10, 1, 2, 3]);
        let stranger = v4([198, 51, 100, 1]);
        assert_eq!(t.client(lb, b"203.0.113.5"), v4([203, 0, 113, 5]));
        // A client-forged entry on the left is skipped; the right-most
        // untrusted hop is the client.
        assert_eq!(
            t.client(lb, b"1.1.1.1, 203.0.113.5, 10.9.9.9"),
            v4([203, 0, 113, 5])
        );
        assert_eq!(t.client(stranger, b"203.0.113.5"), stranger);
        assert_eq!(t.client(lb, b"not an address"), lb);
        assert_eq!(t.client(lb, b""), lb);
        assert_eq!(t.client(lb, b"10.1.1.1, 192.0.2.1"), lb);
        assert_eq!(
            t.client(lb, b"2001:db8::7"),
            "2001:db8::7".parse::<Ipv6Addr>().unwrap().octets()
        );
        assert!(TrustedProxies::parse(&["10.0.0.0/33".into()]).is_err());
        assert_eq!(
            TrustedProxies::default().client(lb, b"203.0.113.5"),
            lb,
            "no trusted proxies: the header is ignored"
        );
    }
}
