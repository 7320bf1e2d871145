//! QPACK (RFC 9204) as this server needs it: it advertises a dynamic table
//! capacity of 0, so a field section refers to the static table only, and
//! strings are literal (Huffman-coded or not). Decoding writes names and
//! values into one scratch buffer; encoding writes literals without Huffman
//! (smaller code, and an answer's headers are few and short).

use std::ops::Range;

/// Why a field section does not decode; each is QPACK_DECOMPRESSION_FAILED
/// for the connection (RFC 9204, 2.2.3), except `TooLarge` (the request's:
/// 431).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QpackError {
    /// The section refers to the dynamic table, whose capacity is 0.
    Dynamic,
    /// A static index past the table's 99 entries.
    StaticIndex,
    /// An integer or string that runs past the section, or overflows.
    Truncated,
    /// A Huffman string that does not decode (bad padding, EOS).
    Huffman,
    /// Decoded names and values past the limit.
    TooLarge,
}

impl QpackError {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Dynamic => "field section refers to the dynamic table (capacity 0)",
            Self::StaticIndex => "static table index past its end",
            Self::Truncated => "field section truncated",
            Self::Huffman => "Huffman string does not decode",
            Self::TooLarge => "field section too large",
        }
    }
}

/// RFC 9204 Appendix A.
pub const STATIC: [(&[u8], &[u8]); 99] = [
    (b":authority", b""),
    (b":path", b"/"),
    (b"age", b"0"),
    (b"content-disposition", b""),
    (b"content-length", b"0"),
    (b"cookie", b""),
    (b"date", b""),
    (b"etag", b""),
    (b"if-modified-since", b""),
    (b"if-none-match", b""),
    (b"last-modified", b""),
    (b"link", b""),
    (b"location", b""),
    (b"referer", b""),
    (b"set-cookie", b""),
    (b":method", b"CONNECT"),
    (b":method", b"DELETE"),
    (b":method", b"GET"),
    (b":method", b"HEAD"),
    (b":method", b"OPTIONS"),
    (b":method", b"POST"),
    (b":method", b"PUT"),
    (b":scheme", b"http"),
    (b":scheme", b"https"),
    (b":status", b"103"),
    (b":status", b"200"),
    (b":status", b"304"),
    (b":status", b"404"),
    (b":status", b"503"),
    (b"accept", b"*/*"),
    (b"accept", b"application/dns-message"),
    (b"accept-encoding", b"gzip, deflate, br"),
    (b"accept-ranges", b"bytes"),
    (b"access-control-allow-headers", b"cache-control"),
    (b"access-control-allow-headers", b"content-type"),
    (b"access-control-allow-origin", b"*"),
    (b"cache-control", b"max-age=0"),
    (b"cache-control", b"max-age=2592000"),
    (b"cache-control", b"max-age=604800"),
    (b"cache-control", b"no-cache"),
    (b"cache-control", b"no-store"),
    (b"cache-control", b"public, max-age=31536000"),
    (b"content-encoding", b"br"),
    (b"content-encoding", b"gzip"),
    (b"content-type", b"application/dns-message"),
    (b"content-type", b"application/javascript"),
    (b"content-type", b"application/json"),
    (b"content-type", b"application/x-www-form-urlencoded"),
    (b"content-type", b"image/gif"),
    (b"content-type", b"image/jpeg"),
    (b"content-type", b"image/png"),
    (b"content-type", b"text/css"),
    (b"content-type", b"text/html; charset=utf-8"),
    (b"content-type", b"text/plain"),
    (b"content-type", b"text/plain;charset=utf-8"),
    (b"range", b"bytes=0-"),
    (b"strict-transport-security", b"max-age=31536000"),
    (
        b"strict-transport-security",
        b"max-age=31536000; includesubdomains",
    ),
    (
        b"strict-transport-security",
        b"max-age=31536000; includesubdomains; preload",
    ),
    (b"vary", b"accept-encoding"),
    (b"vary", b"origin"),
    (b"x-content-type-options", b"nosniff"),
    (b"x-xss-protection", b"1; mode=block"),
    (b":status", b"100"),
    (b":status", b"204"),
    (b":status", b"206"),
    (b":status", b"302"),
    (b":status", b"400"),
    (b":status", b"403"),
    (b":status", b"421"),
    (b":status", b"425"),
    (b":status", b"500"),
    (b"accept-language", b""),
    (b"access-control-allow-credentials", b"FALSE"),
    (b"access-control-allow-credentials", b"TRUE"),
    (b"access-control-allow-headers", b"*"),
    (b"access-control-allow-methods", b"get"),
    (b"access-control-allow-methods", b"get, post, options"),
    (b"access-control-allow-methods", b"options"),
    (b"access-control-expose-headers", b"content-length"),
    (b"access-control-request-headers", b"content-type"),
    (b"access-control-request-method", b"get"),
    (b"access-control-request-method", b"post"),
    (b"alt-svc", b"clear"),
    (b"authorization", b""),
    (
        b"content-security-policy",
        b"script-src 'none'; object-src 'none'; base-uri 'none'",
    ),
    (b"early-data", b"1"),
    (b"expect-ct", b""),
    (b"forwarded", b""),
    (b"if-range", b""),
    (b"origin", b""),
    (b"purpose", b"prefetch"),
    (b"server", b""),
    (b"timing-allow-origin", b"*"),
    (b"upgrade-insecure-requests", b"1"),
    (b"user-agent", b""),
    (b"x-forwarded-for", b""),
    (b"x-frame-options", b"deny"),
    (b"x-frame-options", b"sameorigin"),
];

/// One decoded field: ranges into the decoder's scratch buffer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Field {
    pub name: Range<usize>,
    pub value: Range<usize>,
}

/// An integer with an `n`-bit prefix (RFC 7541, 5.1) at `b[*at]`; the
/// prefix's upper bits are the caller's.
pub fn read_int(b: &[u8], at: &mut usize, n: u8) -> Result<u64, QpackError> {
    let first = *b.get(*at).ok_or(QpackError::Truncated)?;
    *at += 1;
    let max = (1u64 << n) - 1;
    let mut v = first as u64 & max;
    if v < max {
        return Ok(v);
    }
    let mut shift = 0u32;
    loop {
        let byte = *b.get(*at).ok_or(QpackError::Truncated)?;
        *at += 1;
        // 62 bits is more than any length or index here can be.
        if shift > 56 {
            return Err(QpackError::Truncated);
        }
        v += ((byte & 0x7f) as u64) << shift;
        shift += 7;
        if byte & 0x80 == 0 {
            return Ok(v);
        }
    }
}

/// Writes `v` with an `n`-bit prefix; `flags` fills the first byte's upper bits.
pub fn write_int(out: &mut Vec<u8>, flags: u8, n: u8, mut v: u64) {
    let max = (1u64 << n) - 1;
    if v < max {
        out.push(flags | v as u8);
        return;
    }
    out.push(flags | max as u8);
    v -= max;
    while v >= 0x80 {
        out.push((v as u8 & 0x7f) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

/// Decodes a field section into `fields`, names and values into `scratch`,
/// at most `max_bytes` of them (each field also counts 32, as RFC 9114's
/// field section size does).
pub fn decode(
    block: &[u8],
    scratch: &mut Vec<u8>,
    fields: &mut Vec<Field>,
    max_bytes: usize,
) -> Result<(), QpackError> {
    scratch.clear();
    fields.clear();
    let mut at = 0;
    // Encoded Required Insert Count, then the sign bit and Delta Base: with
    // no dynamic table both are 0.
    if read_int(block, &mut at, 8)? != 0 {
        return Err(QpackError::Dynamic);
    }
    let _delta_base = read_int(block, &mut at, 7)?;
    let mut size = 0usize;
    while at < block.len() {
        let b = block[at];
        let field = if b & 0x80 != 0 {
            // Indexed field line: 1 T index(6).
            if b & 0x40 == 0 {
                return Err(QpackError::Dynamic);
            }
            let (n, v) = static_entry(read_int(block, &mut at, 6)?)?;
            Field {
                name: push(scratch, n),
                value: push(scratch, v),
            }
        } else if b & 0x40 != 0 {
            // Literal field line with name reference: 0 1 N T index(4).
            if b & 0x10 == 0 {
                return Err(QpackError::Dynamic);
            }
            let (n, _) = static_entry(read_int(block, &mut at, 4)?)?;
            let name = push(scratch, n);
            let value = read_string(block, &mut at, 7, scratch)?;
            Field { name, value }
        } else if b & 0x20 != 0 {
            // Literal field line with literal name: 0 0 1 N H len(3).
            let name = read_string(block, &mut at, 3, scratch)?;
            let value = read_string(block, &mut at, 7, scratch)?;
            Field { name, value }
        } else {
            // Indexed field line with post-base index, or literal with
            // post-base name reference: both are the dynamic table's.
            return Err(QpackError::Dynamic);
        };
        size += field.name.len() + field.value.len() + 32;
        if size > max_bytes {
            return Err(QpackError::TooLarge);
        }
        fields.push(field);
    }
    Ok(())
}

fn static_entry(i: u64) -> Result<(&'static [u8], &'static [u8]), QpackError> {
    STATIC
        .get(usize::try_from(i).map_err(|_| QpackError::StaticIndex)?)
        .copied()
        .ok_or(QpackError::StaticIndex)
}

fn push(scratch: &mut Vec<u8>, s: &[u8]) -> Range<usize> {
    let start = scratch.len();
    scratch.extend_from_slice(s);
    start..scratch.len()
}

/// A string literal whose length has an `n`-bit prefix and whose Huffman
/// flag is the bit just above it.
fn read_string(
    b: &[u8],
    at: &mut usize,
    n: u8,
    scratch: &mut Vec<u8>,
) -> Result<Range<usize>, QpackError> {
    let huffman = b.get(*at).ok_or(QpackError::Truncated)? & (1 << n) != 0;
    let len = read_int(b, at, n)? as usize;
    let end = at.checked_add(len).ok_or(QpackError::Truncated)?;
    let s = b.get(*at..end).ok_or(QpackError::Truncated)?;
    *at = end;
    let start = scratch.len();
    if huffman {
        super::huffman::decode(s, scratch).map_err(|_| QpackError::Huffman)?;
    } else {
        scratch.extend_from_slice(s);
    }
    Ok(start..scratch.len())
}

/// Starts a field section: Required Insert Count 0, Delta Base 0.
pub fn begin(out: &mut Vec<u8>) {
    out.extend_from_slice(&[0, 0]);
}

/// `:status`: indexed when the static table has it, else a literal with
/// the static name `:status`.
pub fn put_status(out: &mut Vec<u8>, status: u16) {
    let mut digits = [0u8; 3];
    let s = status.min(999);
    digits[0] = b'0' + (s / 100) as u8;
    digits[1] = b'0' + (s / 10 % 10) as u8;
    digits[2] = b'0' + (s % 10) as u8;
    if let Some(i) = STATIC
        .iter()
        .position(|(n, v)| *n == b":status" && *v == digits)
    {
        write_int(out, 0xc0, 6, i as u64);
    } else {
        // 0 1 N=0 T=1, index 24 (":status").
        write_int(out, 0x50, 4, 24);
        write_int(out, 0, 7, 3);
        out.extend_from_slice(&digits);
    }
}

/// A field as a literal name and value, neither Huffman-coded. The name
/// must already be lowercase.
pub fn put_literal(out: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    write_int(out, 0x20, 3, name.len() as u64);
    out.extend_from_slice(name);
    write_int(out, 0, 7, value.len() as u64);
    out.extend_from_slice(value);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decoded(block: &[u8]) -> Result<Vec<(String, String)>, QpackError> {
        let (mut s, mut f) = (Vec::new(), Vec::new());
        decode(block, &mut s, &mut f, 4096)?;
        Ok(f.iter()
            .map(|f| {
                (
                    String::from_utf8(s[f.name.clone()].to_vec()).unwrap(),
                    String::from_utf8(s[f.value.clone()].to_vec()).unwrap(),
                )
            })
            .collect())
    }

    #[test]
    fn integers_round_trip_at_every_prefix() {
        for n in 1..=8u8 {
            for v in [
                0,
                1,
                30,
                31,
                126,
                127,
                128,
                255,
                256,
                1337,
                1 << 20,
                u32::MAX as u64,
            ] {
                let mut out = Vec::new();
                write_int(&mut out, 0, n, v);
                let mut at = 0;
                assert_eq!(read_int(&out, &mut at, n), Ok(v), "n={n} v={v}");
                assert_eq!(at, out.len());
            }
        }
        // RFC 7541 C.1.2: 1337 with a 5-bit prefix.
        let mut out = Vec::new();
        write_int(&mut out, 0, 5, 1337);
        assert_eq!(out, [31, 154, 10]);
        // Runs on past the buffer, or past 62 bits.
        assert_eq!(
            read_int(&[0xff, 0x80], &mut 0, 8),
            Err(QpackError::Truncated)
        );
        assert_eq!(read_int(&[0xff; 12], &mut 0, 8), Err(QpackError::Truncated));
    }

    #[test]
    fn every_line_form_of_the_static_table_and_literals_decodes() {
        let mut b = Vec::new();
        begin(&mut b);
        // Indexed static: :method GET (17), :scheme https (23).
        b.extend_from_slice(&[0xc0 | 17, 0xc0 | 23]);
        // Name reference (static :path, 1) with a literal value.
        write_int(&mut b, 0x50, 4, 1);
        write_int(&mut b, 0, 7, 10);
        b.extend_from_slice(b"/c?id=1&x=");
        // Name reference past a 4-bit prefix: user-agent (95).
        write_int(&mut b, 0x50, 4, 95);
        write_int(&mut b, 0, 7, 2);
        b.extend_from_slice(b"UA");
        // Literal name, Huffman-coded value ("www.example.com", RFC 7541 C.4.1).
        put_literal(&mut b, b"x-country", b"DE");
        write_int(&mut b, 0x20, 3, 10);
        b.extend_from_slice(b":authority");
        let huff = [
            0xf1, 0xe3, 0xc2, 0xe5, 0xf2, 0x3a, 0x6b, 0xa0, 0xab, 0x90, 0xf4, 0xff,
        ];
        write_int(&mut b, 0x80, 7, huff.len() as u64);
        b.extend_from_slice(&huff);
        let f = decoded(&b).unwrap();
        let f: Vec<(&str, &str)> = f.iter().map(|(n, v)| (n.as_str(), v.as_str())).collect();
        assert_eq!(
            f,
            [
                (":method", "GET"),
                (":scheme", "https"),
                (":path", "/c?id=1&x="),
                ("user-agent", "UA"),
                ("x-country", "DE"),
                (":authority", "www.example.com"),
            ]
        );
    }

    #[test]
    fn dynamic_references_bad_indexes_and_truncation_are_refused() {
        // Required Insert Count 1.
        assert_eq!(decoded(&[1, 0, 0xc1]), Err(QpackError::Dynamic));
        // Indexed, dynamic (T=0).
        assert_eq!(decoded(&[0, 0, 0x81]), Err(QpackError::Dynamic));
        // Name reference, dynamic.
        assert_eq!(decoded(&[0, 0, 0x40, 0]), Err(QpackError::Dynamic));
        // Post-base forms.
        assert_eq!(decoded(&[0, 0, 0x10]), Err(QpackError::Dynamic));
        assert_eq!(decoded(&[0, 0, 0x00, 0]), Err(QpackError::Dynamic));
        // Static index 99 is one past the end.
        let mut b = vec![0, 0];
        write_int(&mut b, 0xc0, 6, 99);
        assert_eq!(decoded(&b), Err(QpackError::StaticIndex));
        let mut b = vec![0, 0];
        write_int(&mut b, 0xc0, 6, 98);
        assert_eq!(decoded(&b).unwrap()[0].1, "sameorigin");
        // A literal longer than the block.
        assert_eq!(
            decoded(&[0, 0, 0x23, b'a', b'b']),
            Err(QpackError::Truncated)
        );
        // Huffman with EOS-like padding past 7 bits.
        assert_eq!(
            decoded(&[0, 0, 0x21, b'a', 0x82, 0xff, 0xff]),
            Err(QpackError::Huffman)
        );
        // Over the size limit.
        let mut b = vec![0, 0];
        put_literal(&mut b, b"x", &[b'v'; 5000]);
        assert_eq!(decoded(&b), Err(QpackError::TooLarge));
    }

    #[test]
    fn what_is_encoded_decodes() {
        for status in [200, 204, 302, 400, 404, 413, 425, 429, 503] {
            let mut b = Vec::new();
            begin(&mut b);
            put_status(&mut b, status);
            put_literal(&mut b, b"location", b"https://a.example/x");
            let f = decoded(&b).unwrap();
            assert_eq!(f[0], (":status".to_string(), status.to_string()));
            assert_eq!(f[1].1, "https://a.example/x");
        }
    }
}
