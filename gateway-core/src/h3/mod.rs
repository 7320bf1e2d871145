//! HTTP/3 (RFC 9114) as a click server needs it, without I/O: the shard
//! hands it the bytes of each QUIC stream and gets back whole requests as
//! the HTTP/1.1 bytes its parser already takes, so a request over HTTP/3
//! meets the same limits, verification, dedup and durability rule as one
//! over TCP; and it turns the shard's HTTP/1.1 answers into HEADERS and DATA
//! frames.
//!
//! Why not the `h3` crate: it is driven by async tasks (its server waits in
//! `accept().await` on a connection trait of futures), and the shard runs
//! no executor. What a click server needs is small: requests that end with
//! the stream (a click is one HEADERS frame), no push, no dynamic QPACK
//! table (SETTINGS_QPACK_MAX_TABLE_CAPACITY 0, so the encoder and decoder
//! streams carry nothing), one control stream each way.

mod huffman;
pub mod qpack;

use std::ops::Range;

use crate::http::HttpError;

/// HTTP/3 and QPACK error codes (RFC 9114, 8.1; RFC 9204, 6).
pub mod code {
    pub const NO_ERROR: u64 = 0x100;
    pub const GENERAL_PROTOCOL_ERROR: u64 = 0x101;
    pub const INTERNAL_ERROR: u64 = 0x102;
    pub const STREAM_CREATION_ERROR: u64 = 0x103;
    pub const CLOSED_CRITICAL_STREAM: u64 = 0x104;
    pub const FRAME_UNEXPECTED: u64 = 0x105;
    pub const FRAME_ERROR: u64 = 0x106;
    pub const EXCESSIVE_LOAD: u64 = 0x107;
    pub const ID_ERROR: u64 = 0x108;
    pub const SETTINGS_ERROR: u64 = 0x109;
    pub const MISSING_SETTINGS: u64 = 0x10a;
    pub const REQUEST_REJECTED: u64 = 0x10b;
    pub const REQUEST_CANCELLED: u64 = 0x10c;
    pub const REQUEST_INCOMPLETE: u64 = 0x10d;
    pub const MESSAGE_ERROR: u64 = 0x10e;
    pub const QPACK_DECOMPRESSION_FAILED: u64 = 0x200;
    pub const QPACK_ENCODER_STREAM_ERROR: u64 = 0x201;
    /// Not an HTTP/3 code: the connection ended by a QUIC transport error
    /// (a malformed packet, a flow-control violation), either side's.
    pub const TRANSPORT: u64 = 0x1;

    /// The codes counted by name in /metrics (`clickgate_h3_errors_total`).
    pub const COUNTED: [(u64, &str); 14] = [
        (TRANSPORT, "QUIC_TRANSPORT"),
        (GENERAL_PROTOCOL_ERROR, "H3_GENERAL_PROTOCOL_ERROR"),
        (INTERNAL_ERROR, "H3_INTERNAL_ERROR"),
        (STREAM_CREATION_ERROR, "H3_STREAM_CREATION_ERROR"),
        (CLOSED_CRITICAL_STREAM, "H3_CLOSED_CRITICAL_STREAM"),
        (FRAME_UNEXPECTED, "H3_FRAME_UNEXPECTED"),
        (FRAME_ERROR, "H3_FRAME_ERROR"),
        (EXCESSIVE_LOAD, "H3_EXCESSIVE_LOAD"),
        (SETTINGS_ERROR, "H3_SETTINGS_ERROR"),
        (MISSING_SETTINGS, "H3_MISSING_SETTINGS"),
        (REQUEST_REJECTED, "H3_REQUEST_REJECTED"),
        (REQUEST_INCOMPLETE, "H3_REQUEST_INCOMPLETE"),
        (QPACK_DECOMPRESSION_FAILED, "QPACK_DECOMPRESSION_FAILED"),
        (QPACK_ENCODER_STREAM_ERROR, "QPACK_ENCODER_STREAM_ERROR"),
    ];

    /// Where `code` is in [`COUNTED`]; unknown codes count as the general one.
    pub fn counted_index(code: u64) -> usize {
        COUNTED.iter().position(|c| c.0 == code).unwrap_or(1)
    }
}

const FRAME_DATA: u64 = 0x00;
const FRAME_HEADERS: u64 = 0x01;
const FRAME_CANCEL_PUSH: u64 = 0x03;
const FRAME_SETTINGS: u64 = 0x04;
const FRAME_PUSH_PROMISE: u64 = 0x05;
const FRAME_GOAWAY: u64 = 0x07;
const FRAME_MAX_PUSH_ID: u64 = 0x0d;

const STREAM_CONTROL: u64 = 0x00;
const STREAM_PUSH: u64 = 0x01;
const STREAM_QPACK_ENCODER: u64 = 0x02;
const STREAM_QPACK_DECODER: u64 = 0x03;

const SETTINGS_QPACK_MAX_TABLE_CAPACITY: u64 = 0x01;
const SETTINGS_MAX_FIELD_SECTION_SIZE: u64 = 0x06;
const SETTINGS_QPACK_BLOCKED_STREAMS: u64 = 0x07;

/// A control-stream frame larger than this is an attack, not SETTINGS.
const CONTROL_FRAME_MAX: u64 = 16 * 1024;

/// A connection error: the code to close the connection with, and why.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnError {
    pub code: u64,
    pub what: &'static str,
}

fn conn_err(code: u64, what: &'static str) -> ConnError {
    ConnError { code, what }
}

/// What ends a request stream other than a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequestError {
    /// The whole connection is closed with this code.
    Connection(ConnError),
    /// Answered as the HTTP/1.1 parser would answer it (400, 413, 431),
    /// and the rest of the stream is not read.
    Http(HttpError),
    /// The stream is reset with this code (no answer can be framed).
    Stream(u64),
}

/// What the HTTP/3 layer allows.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Decoded field section bytes (RFC 9114's size: name + value + 32 per
    /// field), advertised as SETTINGS_MAX_FIELD_SECTION_SIZE.
    pub field_section_max: usize,
    pub body_bytes_max: usize,
}

impl Limits {
    /// Request stream bytes kept before the request is complete: the
    /// largest HEADERS and body allowed plus their framing. The encoded
    /// section is at most the decoded one (Huffman only shrinks; a static
    /// reference is shorter than what it names).
    pub fn stream_bytes_max(&self) -> usize {
        self.field_section_max + self.body_bytes_max + 64
    }
}

/// A QUIC variable-length integer at `b[*at]` (RFC 9000, 16); None if the
/// buffer ends first.
pub fn read_varint(b: &[u8], at: &mut usize) -> Option<u64> {
    let first = *b.get(*at)?;
    let len = 1usize << (first >> 6);
    let bytes = b.get(*at..*at + len)?;
    let mut v = (first & 0x3f) as u64;
    for &x in &bytes[1..] {
        v = v << 8 | x as u64;
    }
    *at += len;
    Some(v)
}

pub fn write_varint(out: &mut Vec<u8>, v: u64) {
    if v < 1 << 6 {
        out.push(v as u8);
    } else if v < 1 << 14 {
        out.extend_from_slice(&(v as u16 | 0x4000).to_be_bytes());
    } else if v < 1 << 30 {
        out.extend_from_slice(&(v as u32 | 0x8000_0000).to_be_bytes());
    } else {
        out.extend_from_slice(&(v | 0xc000_0000_0000_0000).to_be_bytes());
    }
}

/// One frame's type and payload range, if the whole frame is in `b[at..]`.
/// `Err(len)` when the header is there but the payload is not yet.
fn read_frame(b: &[u8], at: &mut usize) -> Option<Result<(u64, Range<usize>), u64>> {
    let mut p = *at;
    let ty = read_varint(b, &mut p)?;
    let len = read_varint(b, &mut p)?;
    let end = p.checked_add(usize::try_from(len).ok()?)?;
    if end > b.len() {
        return Some(Err(len));
    }
    *at = end;
    Some(Ok((ty, p..end)))
}

/// Frame types that HTTP/3 reserves from HTTP/2 or gives to other streams.
fn unexpected_on_request(ty: u64) -> bool {
    matches!(
        ty,
        0x02 | 0x06
            | 0x08
            | 0x09
            | FRAME_CANCEL_PUSH
            | FRAME_SETTINGS
            | FRAME_PUSH_PROMISE
            | FRAME_GOAWAY
            | FRAME_MAX_PUSH_ID
    )
}

/// Where a request stream stands.
#[derive(Debug, PartialEq, Eq)]
pub enum Scan {
    /// More bytes are needed.
    Incomplete,
    /// The stream ended with a whole request: the HEADERS block and the
    /// DATA payloads, ranges into the stream's bytes.
    Complete {
        headers: Range<usize>,
        data: Vec<Range<usize>>,
    },
}

/// Checks a request stream's bytes so far (all of them, from its start):
/// frames in the order RFC 9114 (4.1) allows, the field section and body
/// within the limits as soon as their frame headers say otherwise.
pub fn scan_request(b: &[u8], fin: bool, limits: &Limits) -> Result<Scan, RequestError> {
    let mut at = 0;
    let mut headers: Option<Range<usize>> = None;
    let mut trailers = false;
    let mut data = Vec::new();
    let mut body = 0usize;
    let unexpected = |what| RequestError::Connection(conn_err(code::FRAME_UNEXPECTED, what));
    while at < b.len() {
        let start = at;
        let Some(frame) = read_frame(b, &mut at) else {
            // Not even the frame header yet.
            at = start;
            break;
        };
        let (ty, range, partial_len) = match frame {
            Ok((ty, r)) => (ty, Some(r), 0),
            Err(len) => {
                let mut p = start;
                let ty = read_varint(b, &mut p).unwrap_or(u64::MAX);
                (ty, None, len)
            }
        };
        let len = range.as_ref().map_or(partial_len, |r| r.len() as u64);
        let whole = range.is_some();
        match ty {
            FRAME_HEADERS if headers.is_none() => {
                if len > limits.field_section_max as u64 {
                    return Err(RequestError::Http(HttpError::HeaderTooLarge));
                }
                if let Some(r) = range {
                    headers = Some(r);
                }
            }
            FRAME_HEADERS if !trailers => {
                // Trailers: allowed, read, ignored.
                if len > limits.field_section_max as u64 {
                    return Err(RequestError::Http(HttpError::HeaderTooLarge));
                }
                if range.is_some() {
                    trailers = true;
                }
            }
            FRAME_HEADERS => return Err(unexpected("HEADERS after trailers")),
            FRAME_DATA if headers.is_none() => return Err(unexpected("DATA before HEADERS")),
            FRAME_DATA if trailers => return Err(unexpected("DATA after trailers")),
            FRAME_DATA => {
                if body as u64 + len > limits.body_bytes_max as u64 {
                    return Err(RequestError::Http(HttpError::BodyTooLarge));
                }
                if let Some(r) = range {
                    body += r.len();
                    data.push(r);
                }
            }
            t if unexpected_on_request(t) => {
                return Err(unexpected("a control frame on a request stream"))
            }
            // Unknown and reserved (grease) types are ignored (RFC 9114, 9).
            _ => {}
        }
        if !whole {
            at = start;
            break;
        }
    }
    if !fin {
        if b.len() > limits.stream_bytes_max() {
            // Unknown frames past every limit.
            return Err(RequestError::Connection(conn_err(
                code::EXCESSIVE_LOAD,
                "request stream past its limit",
            )));
        }
        return Ok(Scan::Incomplete);
    }
    if at < b.len() {
        return Err(RequestError::Connection(conn_err(
            code::FRAME_ERROR,
            "request stream ends inside a frame",
        )));
    }
    match headers {
        Some(headers) => Ok(Scan::Complete { headers, data }),
        None => Err(RequestError::Stream(code::REQUEST_INCOMPLETE)),
    }
}

/// Reusable buffers for decoding requests.
#[derive(Default)]
pub struct Scratch {
    strings: Vec<u8>,
    fields: Vec<qpack::Field>,
}

/// Headers a request over HTTP/3 must not carry (RFC 9114, 4.2).
const CONNECTION_SPECIFIC: &[&[u8]] = &[
    b"connection",
    b"keep-alive",
    b"proxy-connection",
    b"transfer-encoding",
    b"upgrade",
];

/// The HTTP/1.1 bytes of a complete request stream `b` (see
/// [`scan_request`]): request line, Host from `:authority`, the fields as
/// sent (less framing ones), `Early-Data: 1` when it came in 0-RTT (a
/// client's own early-data field is dropped: it is the server's to say),
/// Content-Length, body.
pub fn to_http1(
    b: &[u8],
    headers: Range<usize>,
    data: &[Range<usize>],
    early: bool,
    limits: &Limits,
    scratch: &mut Scratch,
    out: &mut Vec<u8>,
) -> Result<(), RequestError> {
    use RequestError::Http;
    let malformed = Http(HttpError::Malformed);
    let Scratch { strings, fields } = scratch;
    qpack::decode(&b[headers], strings, fields, limits.field_section_max).map_err(|e| match e {
        qpack::QpackError::TooLarge => Http(HttpError::HeaderTooLarge),
        e => RequestError::Connection(conn_err(code::QPACK_DECOMPRESSION_FAILED, e.as_str())),
    })?;
    let s = &strings[..];
    let (mut method, mut path, mut authority, mut scheme) = (None, None, None, false);
    let mut regular = false;
    for f in fields.iter() {
        let (name, value) = (&s[f.name.clone()], &s[f.value.clone()]);
        // No field may smuggle a line into the HTTP/1.1 form, or be empty.
        if name.is_empty()
            || name.iter().any(|&c| !is_token(c) || c.is_ascii_uppercase()) && name[0] != b':'
            || value.iter().any(|&c| c == b'\r' || c == b'\n' || c == 0)
        {
            return Err(malformed);
        }
        if name[0] == b':' {
            if regular {
                return Err(malformed);
            }
            let slot = match name {
                b":method" => &mut method,
                b":path" => &mut path,
                b":authority" => &mut authority,
                b":scheme" => {
                    if scheme {
                        return Err(malformed);
                    }
                    scheme = true;
                    continue;
                }
                _ => return Err(malformed),
            };
            if slot.replace(value).is_some() {
                return Err(malformed);
            }
        } else {
            regular = true;
            if CONNECTION_SPECIFIC.contains(&name) || name == b"te" && value != b"trailers" {
                return Err(malformed);
            }
        }
    }
    let (Some(method), Some(path), true) = (method, path, scheme) else {
        return Err(malformed);
    };
    if method.is_empty()
        || !method.iter().all(|&c| is_token(c))
        || path.is_empty()
        || path.iter().any(|&c| c <= b' ' || c == 0x7f)
    {
        return Err(malformed);
    }
    out.clear();
    out.extend_from_slice(method);
    out.push(b' ');
    out.extend_from_slice(path);
    out.extend_from_slice(b" HTTP/1.1\r\n");
    let host = authority.or_else(|| {
        fields
            .iter()
            .find(|f| &s[f.name.clone()] == b"host")
            .map(|f| &s[f.value.clone()])
    });
    out.extend_from_slice(b"Host: ");
    out.extend_from_slice(host.unwrap_or(b"h3"));
    out.extend_from_slice(b"\r\n");
    for f in fields.iter() {
        let name = &s[f.name.clone()];
        if name[0] == b':' || matches!(name, b"content-length" | b"host" | b"early-data") {
            continue;
        }
        out.extend_from_slice(name);
        out.extend_from_slice(b": ");
        out.extend_from_slice(&s[f.value.clone()]);
        out.extend_from_slice(b"\r\n");
    }
    if early {
        out.extend_from_slice(b"Early-Data: 1\r\n");
    }
    let body: usize = data.iter().map(|r| r.len()).sum();
    if body > 0 || method == b"POST" {
        out.extend_from_slice(b"Content-Length: ");
        crate::http::push_u64(out, body as u64);
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"\r\n");
    for r in data {
        out.extend_from_slice(&b[r.clone()]);
    }
    Ok(())
}

fn is_token(c: u8) -> bool {
    c.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&c)
}

/// Header lines of the shard's answers that HTTP/3 has no place for.
const SKIP_RESPONSE: &[&[u8]] = &[
    b"connection",
    b"keep-alive",
    b"transfer-encoding",
    b"alt-svc",
];

/// The HEADERS and DATA frames of the shard's HTTP/1.1 answer `raw`; false
/// if `raw` is not one (a bug; the caller answers 500).
pub fn response_frames(raw: &[u8], qpack_buf: &mut Vec<u8>, out: &mut Vec<u8>) -> bool {
    let mut headers = [httparse::EMPTY_HEADER; 24];
    let mut resp = httparse::Response::new(&mut headers);
    let (head_len, status) = match resp.parse(raw) {
        Ok(httparse::Status::Complete(n)) => match resp.code {
            Some(c) => (n, c),
            None => return false,
        },
        _ => return false,
    };
    qpack_buf.clear();
    qpack::begin(qpack_buf);
    qpack::put_status(qpack_buf, status);
    let mut name = [0u8; 64];
    for h in resp.headers.iter() {
        let n = h.name.as_bytes();
        if n.len() > name.len() {
            continue;
        }
        let lower = &mut name[..n.len()];
        lower.copy_from_slice(n);
        lower.make_ascii_lowercase();
        if SKIP_RESPONSE.contains(&&*lower) {
            continue;
        }
        qpack::put_literal(qpack_buf, lower, h.value);
    }
    out.clear();
    write_varint(out, FRAME_HEADERS);
    write_varint(out, qpack_buf.len() as u64);
    out.extend_from_slice(qpack_buf);
    let body = &raw[head_len..];
    if !body.is_empty() {
        write_varint(out, FRAME_DATA);
        write_varint(out, body.len() as u64);
        out.extend_from_slice(body);
    }
    true
}

/// The first bytes of the server's control stream: its type and SETTINGS
/// (no dynamic table, no blocked streams, the field section limit).
pub fn control_stream_start(limits: &Limits) -> Vec<u8> {
    let mut settings = Vec::new();
    for (id, v) in [
        (SETTINGS_QPACK_MAX_TABLE_CAPACITY, 0),
        (SETTINGS_QPACK_BLOCKED_STREAMS, 0),
        (
            SETTINGS_MAX_FIELD_SECTION_SIZE,
            limits.field_section_max as u64,
        ),
    ] {
        write_varint(&mut settings, id);
        write_varint(&mut settings, v);
    }
    let mut out = Vec::new();
    write_varint(&mut out, STREAM_CONTROL);
    write_varint(&mut out, FRAME_SETTINGS);
    write_varint(&mut out, settings.len() as u64);
    out.extend_from_slice(&settings);
    out
}

/// A GOAWAY frame: requests on streams from `next_stream` on will not be
/// processed.
pub fn goaway(next_stream: u64) -> Vec<u8> {
    let mut id = Vec::new();
    write_varint(&mut id, next_stream);
    let mut out = Vec::new();
    write_varint(&mut out, FRAME_GOAWAY);
    write_varint(&mut out, id.len() as u64);
    out.extend_from_slice(&id);
    out
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum UniKind {
    /// The stream type has not arrived yet.
    Pending,
    Control {
        settings: bool,
    },
    Encoder,
    Decoder,
    /// Unknown or reserved type: read and dropped (RFC 9114, 6.2).
    Ignored,
}

struct Uni {
    id: u64,
    kind: UniKind,
    buf: Vec<u8>,
}

/// The client's unidirectional streams of one connection: its control
/// stream (SETTINGS first, then nothing a client may not send) and its
/// QPACK streams (which, with capacity 0, may only set the capacity to 0).
#[derive(Default)]
pub struct UniStreams {
    streams: Vec<Uni>,
    control: bool,
    encoder: bool,
    decoder: bool,
}

impl UniStreams {
    /// Takes more bytes of client unidirectional stream `id`.
    pub fn on_data(&mut self, id: u64, data: &[u8], fin: bool) -> Result<(), ConnError> {
        let i = match self.streams.iter().position(|s| s.id == id) {
            Some(i) => i,
            None => {
                if self.streams.len() >= 16 {
                    return Err(conn_err(
                        code::EXCESSIVE_LOAD,
                        "too many unidirectional streams",
                    ));
                }
                self.streams.push(Uni {
                    id,
                    kind: UniKind::Pending,
                    buf: Vec::new(),
                });
                self.streams.len() - 1
            }
        };
        let s = &mut self.streams[i];
        if s.kind == UniKind::Ignored {
            return Ok(());
        }
        s.buf.extend_from_slice(data);
        if s.kind == UniKind::Pending {
            let mut at = 0;
            let Some(ty) = read_varint(&s.buf, &mut at) else {
                return Ok(());
            };
            s.buf.drain(..at);
            let (seen, kind) = match ty {
                STREAM_CONTROL => (&mut self.control, UniKind::Control { settings: false }),
                STREAM_QPACK_ENCODER => (&mut self.encoder, UniKind::Encoder),
                STREAM_QPACK_DECODER => (&mut self.decoder, UniKind::Decoder),
                STREAM_PUSH => {
                    return Err(conn_err(
                        code::STREAM_CREATION_ERROR,
                        "a client opened a push stream",
                    ))
                }
                _ => {
                    s.kind = UniKind::Ignored;
                    s.buf = Vec::new();
                    return Ok(());
                }
            };
            if std::mem::replace(seen, true) {
                return Err(conn_err(
                    code::STREAM_CREATION_ERROR,
                    "a second control or QPACK stream",
                ));
            }
            s.kind = kind;
        }
        match s.kind {
            UniKind::Control { .. } => {
                Self::control(s)?;
                if fin {
                    return Err(conn_err(
                        code::CLOSED_CRITICAL_STREAM,
                        "control stream closed",
                    ));
                }
            }
            UniKind::Encoder => {
                // With capacity 0 the only instruction is Set Dynamic Table
                // Capacity to 0: 001 00000.
                if s.buf.iter().any(|&b| b != 0x20) {
                    return Err(conn_err(
                        code::QPACK_ENCODER_STREAM_ERROR,
                        "encoder stream instruction for a dynamic table of capacity 0",
                    ));
                }
                s.buf.clear();
                if fin {
                    return Err(conn_err(
                        code::CLOSED_CRITICAL_STREAM,
                        "QPACK encoder stream closed",
                    ));
                }
            }
            UniKind::Decoder => {
                // Stream cancellations are all a decoder may say about a
                // dynamic-table-free encoder; they need nothing from us.
                s.buf.clear();
                if fin {
                    return Err(conn_err(
                        code::CLOSED_CRITICAL_STREAM,
                        "QPACK decoder stream closed",
                    ));
                }
            }
            UniKind::Pending | UniKind::Ignored => {}
        }
        Ok(())
    }

    fn control(s: &mut Uni) -> Result<(), ConnError> {
        let UniKind::Control { settings } = &mut s.kind else {
            return Ok(());
        };
        let mut at = 0;
        loop {
            let start = at;
            match read_frame(&s.buf, &mut at) {
                None => {
                    at = start;
                    break;
                }
                Some(Err(len)) => {
                    if len > CONTROL_FRAME_MAX {
                        return Err(conn_err(code::EXCESSIVE_LOAD, "control frame too large"));
                    }
                    at = start;
                    break;
                }
                Some(Ok((ty, r))) => {
                    if !*settings {
                        if ty != FRAME_SETTINGS {
                            return Err(conn_err(
                                code::MISSING_SETTINGS,
                                "control stream does not start with SETTINGS",
                            ));
                        }
                        check_settings(&s.buf[r])?;
                        *settings = true;
                        continue;
                    }
                    match ty {
                        FRAME_SETTINGS => {
                            return Err(conn_err(code::FRAME_UNEXPECTED, "a second SETTINGS"))
                        }
                        FRAME_DATA | FRAME_HEADERS | FRAME_PUSH_PROMISE | 0x02 | 0x06 | 0x08
                        | 0x09 => {
                            return Err(conn_err(
                                code::FRAME_UNEXPECTED,
                                "a request frame on the control stream",
                            ))
                        }
                        // GOAWAY, MAX_PUSH_ID, CANCEL_PUSH from a client:
                        // nothing for a server without push to do.
                        _ => {}
                    }
                }
            }
        }
        s.buf.drain(..at);
        Ok(())
    }
}

fn check_settings(b: &[u8]) -> Result<(), ConnError> {
    let mut at = 0;
    let mut seen: Vec<u64> = Vec::new();
    while at < b.len() {
        let (Some(id), Some(_)) = (read_varint(b, &mut at), read_varint(b, &mut at)) else {
            return Err(conn_err(code::FRAME_ERROR, "SETTINGS frame truncated"));
        };
        // HTTP/2 settings have no place in HTTP/3 (RFC 9114, 7.2.4.1).
        if matches!(id, 0x02..=0x05) || seen.contains(&id) {
            return Err(conn_err(
                code::SETTINGS_ERROR,
                "SETTINGS with a forbidden or repeated id",
            ));
        }
        seen.push(id);
    }
    Ok(())
}

#[cfg(test)]
mod tests;
