//! HTTP/1.1 request framing, in place, with limits; and response writing.
//!
//! [`parse`] looks at the bytes a connection has buffered and finds the next
//! whole request: its head (parsed by `httparse`, zero-copy) and its body
//! (Content-Length, or chunked, which is decoded in place by moving the chunk
//! data down over the chunk headers). It returns byte ranges into the buffer,
//! never copies. Ambiguous framing is refused, as request smuggling starts there.

use std::ops::Range;

use crate::metrics::DropReason;

/// The most header lines any configuration may allow (the parser's stack array).
pub const HEADERS_HARD_MAX: usize = 128;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Request line plus headers, bytes. Over it: 431.
    pub header_bytes_max: usize,
    /// Header lines. Over it: 431.
    pub headers_max: usize,
    /// Body bytes (decoded). Over it: 413.
    pub body_bytes_max: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    Get,
    Head,
    Post,
    Other,
}

/// Where the parts of one request are in the connection's buffer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub method: Method,
    pub path: Range<usize>,
    /// Empty when there is no `?`.
    pub query: Range<usize>,
    pub user_agent: Range<usize>,
    pub country: Option<Range<usize>>,
    /// The last `X-Forwarded-For` header's value (empty when none); believed
    /// only from a trusted proxy (`edge::TrustedProxies`).
    pub forwarded_for: Range<usize>,
    pub body: Range<usize>,
    pub keep_alive: bool,
    /// `Early-Data: 1` (RFC 8470): the request came in TLS early data
    /// (0-RTT), as the HTTP/3 companion or a terminating proxy says, and
    /// could be a replay.
    pub early_data: bool,
    /// Bytes of the buffer this request took; the next one starts there.
    pub consumed: usize,
}

/// Why a request is refused before routing. Each maps to one status code, and
/// the connection is closed after the answer, since its framing is not trusted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HttpError {
    /// Malformed request line or header.
    Malformed,
    HeaderTooLarge,
    TooManyHeaders,
    BodyTooLarge,
    DuplicateContentLength,
    ContentLengthWithTransferEncoding,
    UnsupportedTransferEncoding,
    BadContentLength,
    BadChunk,
    UnsupportedVersion,
}

impl HttpError {
    pub fn status(self) -> u16 {
        match self {
            Self::HeaderTooLarge | Self::TooManyHeaders => 431,
            Self::BodyTooLarge => 413,
            Self::UnsupportedVersion => 505,
            _ => 400,
        }
    }

    /// The drop it is counted as.
    pub fn reason(self) -> DropReason {
        match self {
            Self::Malformed => DropReason::Malformed,
            Self::HeaderTooLarge => DropReason::HeaderTooLarge,
            Self::TooManyHeaders => DropReason::TooManyHeaders,
            Self::BodyTooLarge => DropReason::BodyTooLarge,
            Self::DuplicateContentLength => DropReason::DuplicateContentLength,
            Self::ContentLengthWithTransferEncoding => {
                DropReason::ContentLengthWithTransferEncoding
            }
            Self::UnsupportedTransferEncoding => DropReason::UnsupportedTransferEncoding,
            Self::BadContentLength => DropReason::BadContentLength,
            Self::BadChunk => DropReason::BadChunk,
            Self::UnsupportedVersion => DropReason::UnsupportedVersion,
        }
    }
}

#[derive(Debug, PartialEq, Eq)]
pub enum Parse {
    /// More bytes are needed.
    Partial,
    Request(Request),
    Error(HttpError),
}

fn range_in(buf: &[u8], part: &[u8]) -> Range<usize> {
    let start = part.as_ptr() as usize - buf.as_ptr() as usize;
    start..start + part.len()
}

enum Framing {
    None,
    Length(usize),
    Chunked,
}

/// Parses the next request at the front of `buf`. `country_header` is the
/// (lower-case) name of the trusted header that carries the client's country.
pub fn parse(buf: &mut [u8], limits: &Limits, country_header: &str) -> Parse {
    // Uninitialised: zeroing 128 headers (4 KiB) on every request cost more
    // than parsing a click's head.
    let mut headers =
        [const { std::mem::MaybeUninit::<httparse::Header>::uninit() }; HEADERS_HARD_MAX];
    let headers = &mut headers[..limits.headers_max.min(HEADERS_HARD_MAX)];
    let mut req = httparse::Request::new(&mut []);
    let head_len = match req.parse_with_uninit_headers(buf, headers) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => {
            return if buf.len() >= limits.header_bytes_max {
                Parse::Error(HttpError::HeaderTooLarge)
            } else {
                Parse::Partial
            };
        }
        Err(httparse::Error::TooManyHeaders) => return Parse::Error(HttpError::TooManyHeaders),
        Err(httparse::Error::Version) => return Parse::Error(HttpError::UnsupportedVersion),
        Err(_) => return Parse::Error(HttpError::Malformed),
    };
    if head_len > limits.header_bytes_max {
        return Parse::Error(HttpError::HeaderTooLarge);
    }
    let method = match req.method.unwrap_or("") {
        "GET" => Method::Get,
        "HEAD" => Method::Head,
        "POST" => Method::Post,
        _ => Method::Other,
    };
    let target = req.path.unwrap_or("").as_bytes();
    let (path, query) = match target.iter().position(|&b| b == b'?') {
        Some(q) => (range_in(buf, &target[..q]), range_in(buf, &target[q + 1..])),
        None => {
            let p = range_in(buf, target);
            (p.clone(), p.end..p.end)
        }
    };
    let http10 = req.version == Some(0);
    let mut keep_alive = !http10;
    let mut user_agent = 0..0;
    let mut country = None;
    let mut forwarded_for = 0..0;
    let mut content_length: Option<usize> = None;
    let mut chunked = false;
    let mut transfer_encoding = false;
    let mut early_data = false;
    for h in req.headers.iter() {
        let name = h.name;
        if name.eq_ignore_ascii_case("content-length") {
            if content_length.is_some() {
                return Parse::Error(HttpError::DuplicateContentLength);
            }
            match parse_decimal(h.value) {
                Some(n) => content_length = Some(n),
                None => return Parse::Error(HttpError::BadContentLength),
            }
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            if transfer_encoding {
                return Parse::Error(HttpError::UnsupportedTransferEncoding);
            }
            transfer_encoding = true;
            if trim(h.value).eq_ignore_ascii_case(b"chunked") {
                chunked = true;
            } else {
                return Parse::Error(HttpError::UnsupportedTransferEncoding);
            }
        } else if name.eq_ignore_ascii_case("connection") {
            let v = trim(h.value);
            if v.eq_ignore_ascii_case(b"close") {
                keep_alive = false;
            } else if v.eq_ignore_ascii_case(b"keep-alive") {
                keep_alive = true;
            }
        } else if name.eq_ignore_ascii_case("user-agent") {
            user_agent = range_in(buf, h.value);
        } else if name.eq_ignore_ascii_case("x-forwarded-for") {
            forwarded_for = range_in(buf, h.value);
        } else if !country_header.is_empty() && name.eq_ignore_ascii_case(country_header) {
            country = Some(range_in(buf, trim(h.value)));
        } else if name.eq_ignore_ascii_case("early-data") {
            early_data = trim(h.value) == b"1";
        }
    }
    if content_length.is_some() && transfer_encoding {
        return Parse::Error(HttpError::ContentLengthWithTransferEncoding);
    }
    let framing = match (content_length, chunked) {
        (Some(n), _) => Framing::Length(n),
        (None, true) => Framing::Chunked,
        (None, false) => Framing::None,
    };
    let (body, consumed) = match framing {
        Framing::None => (head_len..head_len, head_len),
        Framing::Length(n) => {
            if n > limits.body_bytes_max {
                return Parse::Error(HttpError::BodyTooLarge);
            }
            if buf.len() < head_len + n {
                return Parse::Partial;
            }
            (head_len..head_len + n, head_len + n)
        }
        Framing::Chunked => match dechunk(buf, head_len, limits.body_bytes_max) {
            Ok(Some(x)) => x,
            Ok(None) => return Parse::Partial,
            Err(e) => return Parse::Error(e),
        },
    };
    Parse::Request(Request {
        method,
        path,
        query,
        user_agent,
        country,
        forwarded_for,
        body,
        keep_alive,
        early_data,
        consumed,
    })
}

/// Decodes a chunked body in place: chunk data is moved down to start at
/// `start`. Returns the decoded body range and the bytes consumed, or `None`
/// when the body is not complete yet (the buffer is left as it was, since a
/// partial decode is simply redone when more bytes arrive).
fn dechunk(
    buf: &mut [u8],
    start: usize,
    max: usize,
) -> Result<Option<(Range<usize>, usize)>, HttpError> {
    // First pass, read only: find the chunks and the end, so that a partial
    // body leaves the buffer untouched.
    let mut pos = start;
    let mut total = 0usize;
    loop {
        let (size_len, size) = match httparse::parse_chunk_size(&buf[pos..]) {
            Ok(httparse::Status::Complete(x)) => x,
            Ok(httparse::Status::Partial) => {
                return if buf.len() - start > max + 4096 {
                    Err(HttpError::BodyTooLarge)
                } else {
                    Ok(None)
                };
            }
            Err(_) => return Err(HttpError::BadChunk),
        };
        let size = usize::try_from(size).map_err(|_| HttpError::BodyTooLarge)?;
        total = total.checked_add(size).ok_or(HttpError::BodyTooLarge)?;
        if total > max {
            return Err(HttpError::BodyTooLarge);
        }
        pos += size_len;
        if size == 0 {
            // Trailers are not supported: the body must end with CRLF.
            if buf.len() < pos + 2 {
                return Ok(None);
            }
            if &buf[pos..pos + 2] != b"\r\n" {
                return Err(HttpError::BadChunk);
            }
            pos += 2;
            break;
        }
        if buf.len() < pos + size + 2 {
            return Ok(None);
        }
        if &buf[pos + size..pos + size + 2] != b"\r\n" {
            return Err(HttpError::BadChunk);
        }
        pos += size + 2;
    }
    let consumed = pos;
    // Second pass: move the data down.
    let mut rd = start;
    let mut wr = start;
    loop {
        let Ok(httparse::Status::Complete((size_len, size))) =
            httparse::parse_chunk_size(&buf[rd..])
        else {
            unreachable!("validated in the first pass")
        };
        rd += size_len;
        let size = size as usize;
        if size == 0 {
            break;
        }
        buf.copy_within(rd..rd + size, wr);
        wr += size;
        rd += size + 2;
    }
    Ok(Some((start..wr, consumed)))
}

fn trim(v: &[u8]) -> &[u8] {
    let s = v
        .iter()
        .position(|b| !b.is_ascii_whitespace())
        .unwrap_or(v.len());
    let e = v
        .iter()
        .rposition(|b| !b.is_ascii_whitespace())
        .map_or(s, |e| e + 1);
    &v[s..e]
}

fn parse_decimal(v: &[u8]) -> Option<usize> {
    let v = trim(v);
    if v.is_empty() || v.len() > 18 || !v.iter().all(u8::is_ascii_digit) {
        return None;
    }
    Some(v.iter().fold(0usize, |n, &d| n * 10 + (d - b'0') as usize))
}

/// The status line reason for the codes the gateway sends.
pub fn reason_phrase(status: u16) -> &'static str {
    match status {
        200 => "OK",
        204 => "No Content",
        302 => "Found",
        400 => "Bad Request",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        413 => "Content Too Large",
        425 => "Too Early",
        429 => "Too Many Requests",
        431 => "Request Header Fields Too Large",
        503 => "Service Unavailable",
        505 => "HTTP Version Not Supported",
        _ => "Error",
    }
}

/// Appends responses to a connection's output buffer. The buffer is reused for
/// the connection's life, so steady state allocates nothing.
pub struct ResponseWriter<'a> {
    pub out: &'a mut Vec<u8>,
    /// Header lines every answer carries: `Date: ...\r\n` (formatted once a
    /// second by the shard) and, when HTTP/3 is on, `Alt-Svc: ...\r\n`.
    pub common: &'a [u8],
}

impl ResponseWriter<'_> {
    fn head(&mut self, status: u16, keep_alive: bool) {
        self.out.extend_from_slice(b"HTTP/1.1 ");
        push_u64(self.out, status as u64);
        self.out.push(b' ');
        self.out.extend_from_slice(reason_phrase(status).as_bytes());
        self.out.extend_from_slice(b"\r\nServer: clickgate\r\n");
        self.out.extend_from_slice(self.common);
        if !keep_alive {
            self.out.extend_from_slice(b"Connection: close\r\n");
        }
    }

    pub fn redirect(&mut self, location: &[u8], keep_alive: bool) {
        self.head(302, keep_alive);
        self.out.extend_from_slice(b"Location: ");
        self.out.extend_from_slice(location);
        self.out.extend_from_slice(
            b"\r\nCache-Control: no-cache, no-store, must-revalidate\r\nContent-Length: 0\r\n\r\n",
        );
    }

    pub fn no_content(&mut self, keep_alive: bool) {
        self.head(204, keep_alive);
        self.out
            .extend_from_slice(b"Cache-Control: no-cache, no-store, must-revalidate\r\n\r\n");
    }

    /// A plain-text answer. `retry_after_s` adds Retry-After (429, 503),
    /// `allow` the Allow header (405).
    pub fn text(
        &mut self,
        status: u16,
        body: &[u8],
        keep_alive: bool,
        retry_after_s: Option<u32>,
        allow: Option<&str>,
    ) {
        self.head(status, keep_alive);
        if let Some(s) = retry_after_s {
            self.out.extend_from_slice(b"Retry-After: ");
            push_u64(self.out, s as u64);
            self.out.extend_from_slice(b"\r\n");
        }
        if let Some(a) = allow {
            self.out.extend_from_slice(b"Allow: ");
            self.out.extend_from_slice(a.as_bytes());
            self.out.extend_from_slice(b"\r\n");
        }
        self.out.extend_from_slice(
            b"Content-Type: text/plain; charset=utf-8\r\nCache-Control: no-store\r\nContent-Length: ",
        );
        push_u64(self.out, body.len() as u64);
        self.out.extend_from_slice(b"\r\n\r\n");
        self.out.extend_from_slice(body);
    }

    /// Starts a 200 whose body is written by the caller afterwards; returns the
    /// offset where the body begins, for [`Self::finish_body`].
    pub fn begin_body(&mut self, content_type: &[u8], keep_alive: bool) -> (usize, usize) {
        self.head(200, keep_alive);
        self.out.extend_from_slice(b"Content-Type: ");
        self.out.extend_from_slice(content_type);
        self.out
            .extend_from_slice(b"\r\nCache-Control: no-store\r\nContent-Length: ");
        let len_at = self.out.len();
        self.out.extend_from_slice(b"          \r\n\r\n");
        (len_at, self.out.len())
    }

    /// Fills in the Content-Length reserved by [`Self::begin_body`].
    pub fn finish_body(&mut self, (len_at, body_at): (usize, usize)) {
        let n = self.out.len() - body_at;
        let mut digits = Vec::with_capacity(10);
        push_u64(&mut digits, n as u64);
        assert!(digits.len() <= 10);
        // Right-align inside the reserved spaces would leave leading spaces,
        // which RFC 9110 allows as optional whitespace; left-align instead.
        self.out[len_at..len_at + digits.len()].copy_from_slice(&digits);
    }
}

pub fn push_u64(out: &mut Vec<u8>, mut v: u64) {
    let mut tmp = [0u8; 20];
    let mut i = tmp.len();
    loop {
        i -= 1;
        tmp[i] = b'0' + (v % 10) as u8;
        v /= 10;
        if v == 0 {
            break;
        }
    }
    out.extend_from_slice(&tmp[i..]);
}

#[cfg(test)]
mod tests {
    use super::*;

    const L: Limits = Limits {
        header_bytes_max: 1024,
        headers_max: 8,
        body_bytes_max: 64,
    };

    fn p(s: &[u8]) -> Parse {
        parse(&mut s.to_vec(), &L, "x-country")
    }

    fn req(s: &[u8]) -> Request {
        match p(s) {
            Parse::Request(r) => r,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn get_with_query_and_headers_parses_in_place() {
        let raw = b"GET /api/v1/clicks?a=1&b=2 HTTP/1.1\r\nHost: x\r\nUser-Agent: UA\r\nX-Country: DE\r\nX-Forwarded-For: 192.0.2.1, 10.0.0.1\r\n\r\n";
        let r = req(raw);
        assert_eq!(&raw[r.forwarded_for.clone()], b"192.0.2.1, 10.0.0.1");
        assert_eq!(r.method, Method::Get);
        assert_eq!(&raw[r.path.clone()], b"/api/v1/clicks");
        assert_eq!(&raw[r.query.clone()], b"a=1&b=2");
        assert_eq!(&raw[r.user_agent.clone()], b"UA");
        assert_eq!(&raw[r.country.clone().unwrap()], b"DE");
        assert!(r.keep_alive);
        assert_eq!(r.consumed, raw.len());
    }

    #[test]
    fn pipelined_requests_are_consumed_one_at_a_time() {
        let raw = b"GET /a HTTP/1.1\r\n\r\nGET /b HTTP/1.1\r\n\r\n";
        let r = req(raw);
        assert_eq!(&raw[r.path.clone()], b"/a");
        let rest = &raw[r.consumed..];
        let r2 = req(rest);
        assert_eq!(&rest[r2.path.clone()], b"/b");
    }

    #[test]
    fn partial_head_waits_then_431_at_the_limit() {
        assert_eq!(p(b"GET / HTTP/1.1\r\nHost: x\r\n"), Parse::Partial);
        let mut big = b"GET / HTTP/1.1\r\nX-Big: ".to_vec();
        big.resize(1024, b'a');
        assert_eq!(p(&big), Parse::Error(HttpError::HeaderTooLarge));
        big.extend_from_slice(b"\r\n\r\n");
        assert_eq!(p(&big), Parse::Error(HttpError::HeaderTooLarge));
    }

    #[test]
    fn too_many_headers_is_431() {
        let mut raw = b"GET / HTTP/1.1\r\n".to_vec();
        for i in 0..9 {
            raw.extend_from_slice(format!("H{i}: v\r\n").as_bytes());
        }
        raw.extend_from_slice(b"\r\n");
        let e = p(&raw);
        assert_eq!(e, Parse::Error(HttpError::TooManyHeaders));
        assert_eq!(HttpError::TooManyHeaders.status(), 431);
    }

    #[test]
    fn ambiguous_framing_is_400() {
        let cases: &[(&[u8], HttpError)] = &[
            (
                b"POST / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 1\r\n\r\nx",
                HttpError::DuplicateContentLength,
            ),
            (
                b"POST / HTTP/1.1\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\nx",
                HttpError::ContentLengthWithTransferEncoding,
            ),
            (
                b"POST / HTTP/1.1\r\nTransfer-Encoding: gzip\r\n\r\n",
                HttpError::UnsupportedTransferEncoding,
            ),
            (
                b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n",
                HttpError::UnsupportedTransferEncoding,
            ),
            (
                b"POST / HTTP/1.1\r\nContent-Length: -1\r\n\r\n",
                HttpError::BadContentLength,
            ),
            (
                b"POST / HTTP/1.1\r\nContent-Length: 1, 1\r\n\r\n",
                HttpError::BadContentLength,
            ),
        ];
        for (raw, want) in cases {
            assert_eq!(
                p(raw),
                Parse::Error(*want),
                "{}",
                String::from_utf8_lossy(raw)
            );
            assert_eq!(want.status(), 400);
        }
    }

    #[test]
    fn body_over_limit_is_413_before_it_arrives() {
        assert_eq!(
            p(b"POST / HTTP/1.1\r\nContent-Length: 65\r\n\r\n"),
            Parse::Error(HttpError::BodyTooLarge)
        );
        assert_eq!(HttpError::BodyTooLarge.status(), 413);
    }

    #[test]
    fn content_length_body_waits_for_all_bytes() {
        assert_eq!(
            p(b"POST / HTTP/1.1\r\nContent-Length: 5\r\n\r\nabc"),
            Parse::Partial
        );
        let raw = b"POST / HTTP/1.1\r\nContent-Length: 5\r\n\r\nabcdeGET";
        let r = req(raw);
        assert_eq!(&raw[r.body.clone()], b"abcde");
        assert_eq!(r.consumed, raw.len() - 3);
    }

    #[test]
    fn chunked_body_is_decoded_in_place() {
        let mut raw = b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n4\r\ndefg\r\n0\r\n\r\nNEXT".to_vec();
        let Parse::Request(r) = parse(&mut raw, &L, "") else {
            panic!()
        };
        assert_eq!(&raw[r.body.clone()], b"abcdefg");
        assert_eq!(&raw[r.consumed..], b"NEXT");
        // Partial chunked bodies leave the buffer untouched.
        let mut part =
            b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n4\r\nde".to_vec();
        let before = part.clone();
        assert_eq!(parse(&mut part, &L, ""), Parse::Partial);
        assert_eq!(part, before);
        // Over the body limit.
        assert_eq!(
            p(b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n41\r\n"),
            Parse::Error(HttpError::BodyTooLarge)
        );
        assert_eq!(
            p(b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabcX\r\n"),
            Parse::Error(HttpError::BadChunk)
        );
    }

    #[test]
    fn http10_closes_unless_keep_alive_and_close_header_is_honoured() {
        assert!(!req(b"GET / HTTP/1.0\r\n\r\n").keep_alive);
        assert!(req(b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n").keep_alive);
        assert!(!req(b"GET / HTTP/1.1\r\nConnection: close\r\n\r\n").keep_alive);
    }

    #[test]
    fn malformed_is_400() {
        assert_eq!(
            p(b"GET\x01/ HTTP/1.1\r\n\r\n"),
            Parse::Error(HttpError::Malformed)
        );
        assert_eq!(
            p(b"GET / HTTP/1.1\r\nBad Header\r\n\r\n"),
            Parse::Error(HttpError::Malformed)
        );
    }

    #[test]
    fn responses_are_well_formed() {
        let mut out = Vec::new();
        let mut w = ResponseWriter {
            out: &mut out,
            common: b"Date: x\r\n",
        };
        w.redirect(b"https://a.example/", true);
        let s = String::from_utf8(out.clone()).unwrap();
        assert!(s.starts_with("HTTP/1.1 302 Found\r\n"));
        assert!(s.contains("Location: https://a.example/\r\n"));
        assert!(s.contains("Cache-Control: no-cache, no-store, must-revalidate\r\n"));
        assert!(s.ends_with("Content-Length: 0\r\n\r\n"));
        out.clear();
        let mut w = ResponseWriter {
            out: &mut out,
            common: b"",
        };
        let at = w.begin_body(b"text/plain", false);
        w.out.extend_from_slice(b"hello");
        w.finish_body(at);
        let s = String::from_utf8(out).unwrap();
        assert!(s.contains("Content-Length: 5"), "{s}");
        assert!(s.contains("Connection: close"));
        assert!(s.ends_with("\r\n\r\nhello"));
    }
}
