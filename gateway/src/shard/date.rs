//! The header lines every answer carries, formatted once a second.

/// The header lines every answer carries: `Date`, formatted once a second,
/// and `Alt-Svc` when HTTP/3 is on.
pub(super) struct DateCache {
    pub(super) second: i64,
    pub(super) line: Vec<u8>,
    pub(super) alt_svc: Vec<u8>,
}

impl DateCache {
    pub(super) fn refresh(&mut self, now_ms: i64) {
        let s = now_ms.div_euclid(1000);
        if s != self.second {
            self.second = s;
            self.line.clear();
            self.line.extend_from_slice(b"Date: ");
            self.line
                .extend_from_slice(wire::time::http_date(s).as_bytes());
            self.line.extend_from_slice(b"\r\n");
            self.line.extend_from_slice(&self.alt_svc);
        }
    }
}
