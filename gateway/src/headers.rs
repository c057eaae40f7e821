//! Forwarding headers, pure: what the gateway adds to or removes from a request on its way to
//! an instance, and from a response on its way back.
//!
//! - `X-Forwarded-For`: the client address, appended to the list (all its lines, merged) when
//!   the peer is a trusted proxy; alone otherwise.
//! - `X-Forwarded-Proto`: `http` or `https`, as the client reached the gateway (a trusted
//!   proxy's own value is kept).
//! - `X-Real-IP`: the client address (a trusted proxy's own value is kept).
//! - `Forwarded` (RFC 7239): one element `for=…;proto=…;host=…`, appended for a trusted proxy.
//! - `Content-Length`: one canonical value (`5, 5` and `005` are `5`); values that disagree
//!   are refused.
//! - `TE`: only `trailers` is forwarded (gRPC needs it), and only when the client sent it.
//! - `X-Request-Id`: kept when the client sent a sane one, else a new random ID.
//! - `traceparent` (W3C Trace Context): a valid one is continued (same trace ID and flags,
//!   the gateway's own span ID as parent); otherwise a new trace is started.
//! - Hop-by-hop headers (`Connection`, the headers it names, `Keep-Alive`,
//!   `Proxy-Connection`, `Proxy-Authorization`, `TE` other than `trailers`, `Upgrade`) are
//!   removed, except `Connection: upgrade` and `Upgrade` on an upgrade request (WebSocket).

use std::net::IpAddr;

use http::HeaderName;

/// Request headers that apply to one connection only.
// Header names made once: a name given as a string is parsed and checked at every use.
pub const TE: HeaderName = HeaderName::from_static("te");
pub const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
pub const FORWARDED: HeaderName = HeaderName::from_static("forwarded");
pub const X_REAL_IP: HeaderName = HeaderName::from_static("x-real-ip");
pub const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
pub const X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
pub const TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");

const HOP_BY_HOP: &[&str] = &[
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authorization",
    "te",
    "upgrade",
];

/// Response headers that apply to one connection only.
const RESPONSE_HOP_BY_HOP: &[&str] = &[
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authenticate",
    "upgrade",
];

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum HeaderError {
    #[error("Content-Length values disagree or are not numbers")]
    BadContentLength,
}

/// Appends every non-empty line of a list header (lines merged as one list), then `, `.
fn push_list<'a>(out: &mut String, lines: impl Iterator<Item = &'a str>) {
    for list in lines.map(str::trim).filter(|s| !s.is_empty()) {
        out.push_str(list);
        out.push_str(", ");
    }
}

/// The value of `X-Forwarded-For` to send: the client appended to what came in (every line
/// of it; pass none when the peer is not trusted).
pub fn x_forwarded_for<'a>(existing: impl Iterator<Item = &'a str>, client: IpAddr) -> String {
    let mut out = String::with_capacity(48);
    push_list(&mut out, existing);
    push_ip(&mut out, client);
    out
}

/// An address as `X-Real-IP` carries it.
pub fn real_ip(client: IpAddr) -> String {
    let mut out = String::with_capacity(40);
    push_ip(&mut out, client);
    out
}

/// The value of `Forwarded` to send: one element appended to what came in.
pub fn forwarded<'a>(
    existing: impl Iterator<Item = &'a str>,
    client: IpAddr,
    proto: &str,
    host: Option<&str>,
) -> String {
    let mut out = String::with_capacity(64);
    push_list(&mut out, existing);
    out.push_str("for=");
    match client {
        IpAddr::V4(_) => push_ip(&mut out, client),
        IpAddr::V6(_) => {
            out.push_str("\"[");
            push_ip(&mut out, client);
            out.push_str("]\"");
        }
    }
    out.push_str(";proto=");
    out.push_str(proto);
    if let Some(h) = host.filter(|h| is_token_or_host(h)) {
        let quote = h.contains(':');
        out.push_str(if quote { ";host=\"" } else { ";host=" });
        out.push_str(h);
        if quote {
            out.push('"');
        }
    }
    out
}

/// Appends an address in its usual text form (IPv4 without the formatting machinery).
fn push_ip(out: &mut String, ip: IpAddr) {
    match ip {
        IpAddr::V4(v4) => {
            for (i, octet) in v4.octets().iter().enumerate() {
                if i > 0 {
                    out.push('.');
                }
                let o = *octet;
                if o >= 100 {
                    out.push(char::from(b'0' + o / 100));
                }
                if o >= 10 {
                    out.push(char::from(b'0' + o / 10 % 10));
                }
                out.push(char::from(b'0' + o % 10));
            }
        }
        IpAddr::V6(v6) => {
            use std::fmt::Write;
            let _ = write!(out, "{v6}");
        }
    }
}

fn is_token_or_host(h: &str) -> bool {
    !h.is_empty()
        && h.len() <= 255
        && h.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-._:[]".contains(&b))
}

/// Appends `v` as 16 lowercase hex digits.
fn push_hex(out: &mut String, v: u64) {
    let digits = hex16(v);
    // One append instead of sixteen (hex digits are ASCII: the check cannot fail).
    out.push_str(std::str::from_utf8(&digits).unwrap_or_default());
}

/// `v` as 16 lowercase hex digits, all at once in a 128-bit word rather than a digit at a
/// time (a request makes five of these).
fn hex16(v: u64) -> [u8; 16] {
    const LANES: [u128; 4] = [
        0x0000_0000_ffff_ffff_0000_0000_ffff_ffff,
        0x0000_ffff_0000_ffff_0000_ffff_0000_ffff,
        0x00ff_00ff_00ff_00ff_00ff_00ff_00ff_00ff,
        0x0f0f_0f0f_0f0f_0f0f_0f0f_0f0f_0f0f_0f0f,
    ];
    const ONES: u128 = 0x0101_0101_0101_0101_0101_0101_0101_0101;
    // Spread the nibbles, one per byte, the most significant in the highest byte.
    let mut x = u128::from(v);
    x = (x | (x << 32)) & LANES[0];
    x = (x | (x << 16)) & LANES[1];
    x = (x | (x << 8)) & LANES[2];
    x = (x | (x << 4)) & LANES[3];
    // Bytes of 10 and more get a 1 (adding 6 carries them into the high nibble)...
    let letters = ((x + 6 * ONES) >> 4) & ONES;
    // ...and go to 'a'.. instead of past '9'.
    (x + u128::from(b'0') * ONES + letters * u128::from(b'a' - b'0' - 10)).to_be_bytes()
}

/// The request ID to use: the client's when it is printable and short, else a new one.
pub fn request_id(existing: Option<&str>, mut rand: impl FnMut() -> u64) -> (String, bool) {
    match existing {
        Some(id)
            if !id.is_empty() && id.len() <= 128 && id.bytes().all(|b| b.is_ascii_graphic()) =>
        {
            (id.to_string(), false)
        }
        _ => {
            let mut id = String::with_capacity(32);
            push_hex(&mut id, rand());
            push_hex(&mut id, rand());
            (id, true)
        }
    }
}

/// A W3C trace context: the `traceparent` value to send on, which holds this hop's span.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TraceContext {
    /// `00-<trace id>-<span id>-<flags>`: what the instance gets.
    header: String,
    /// Whether the client sent a valid trace context that this continues.
    pub continued: bool,
}

impl TraceContext {
    /// The `traceparent` value for the instance: version 00, this hop's span as parent.
    pub fn header_value(&self) -> &str {
        &self.header
    }

    /// The trace ID, 32 hex digits, for logs.
    pub fn trace_id(&self) -> &str {
        &self.header[3..35]
    }

    /// This hop's span ID, the parent ID the instance sees.
    pub fn span_id(&self) -> &str {
        &self.header[36..52]
    }

    /// The trace flags, 2 hex digits.
    pub fn flags(&self) -> &str {
        &self.header[53..55]
    }
}

/// Continues the client's `traceparent` when it is valid, else starts a trace.
pub fn traceparent(existing: Option<&str>, mut rand: impl FnMut() -> u64) -> TraceContext {
    let mut header = String::with_capacity(55);
    header.push_str("00-");
    let continued = match existing.and_then(parse_traceparent) {
        Some((trace_id, flags)) => {
            header.push_str(trace_id);
            header.push('-');
            push_nonzero_hex(&mut header, &mut rand, 1);
            header.push('-');
            header.push_str(flags);
            true
        }
        None => {
            let span = rand();
            push_nonzero_hex(&mut header, &mut rand, 2);
            header.push('-');
            push_hex(&mut header, if span == 0 { 1 } else { span });
            header.push_str("-00");
            false
        }
    };
    TraceContext { header, continued }
}

/// Appends `words` random u64s as lowercase hex, never all zeros (which the spec forbids).
fn push_nonzero_hex(out: &mut String, rand: &mut impl FnMut() -> u64, words: usize) {
    let mut parts = [0u64; 2];
    for p in parts.iter_mut().take(words) {
        *p = rand();
    }
    if parts[..words].iter().all(|p| *p == 0) {
        parts[0] = 1;
    }
    for p in &parts[..words] {
        push_hex(out, *p);
    }
}

/// The trace ID and flags of a valid version-00 (or later) `traceparent`.
fn parse_traceparent(v: &str) -> Option<(&str, &str)> {
    let v = v.trim();
    let mut parts = v.split('-');
    let version = parts.next()?;
    let trace_id = parts.next()?;
    let parent_id = parts.next()?;
    let flags = parts.next()?;
    let is_hex = |s: &str, n: usize| {
        s.len() == n
            && s.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    };
    if !is_hex(version, 2) || version == "ff" || !is_hex(trace_id, 32) || !is_hex(parent_id, 16) {
        return None;
    }
    if !is_hex(flags, 2) {
        return None;
    }
    // Version 00 has exactly four fields; later versions may add more.
    if version == "00" && parts.next().is_some() {
        return None;
    }
    if trace_id.bytes().all(|b| b == b'0') || parent_id.bytes().all(|b| b == b'0') {
        return None;
    }
    Some((trace_id, flags))
}

/// A request's `Content-Length`, from all its lines and comma-separated values: `Ok(None)`
/// when absent, the value and whether the header is already in canonical form (one line, one
/// value, no leading zeros), or an error when the values disagree or are not numbers.
pub fn content_length<'a>(
    mut lines: impl Iterator<Item = &'a [u8]>,
) -> Result<Option<(u64, bool)>, HeaderError> {
    let Some(first) = lines.next() else {
        return Ok(None);
    };
    let canonical_digits = |v: &[u8]| {
        !v.is_empty() && v.iter().all(u8::is_ascii_digit) && (v[0] != b'0' || v.len() == 1)
    };
    let mut canonical = canonical_digits(first);
    let mut value: Option<u64> = None;
    for line in std::iter::once(first).chain(lines) {
        for part in line.split(|c| *c == b',') {
            let part = part.trim_ascii();
            if part.is_empty() || part.len() > 19 || !part.iter().all(u8::is_ascii_digit) {
                return Err(HeaderError::BadContentLength);
            }
            let n = part.iter().fold(0u64, |n, d| n * 10 + u64::from(d - b'0'));
            match value {
                Some(v) if v != n => return Err(HeaderError::BadContentLength),
                Some(_) => canonical = false,
                None => value = Some(n),
            }
        }
    }
    Ok(value.map(|v| (v, canonical)))
}

/// Whether a `TE` header asks for trailers (`trailers` among its tokens).
pub fn te_trailers(te: Option<&str>) -> bool {
    te.is_some_and(|v| {
        v.split(',').any(|t| {
            t.split(';')
                .next()
                .unwrap_or("")
                .trim()
                .eq_ignore_ascii_case("trailers")
        })
    })
}

/// Whether a request or response may carry a hop-by-hop header at all: none of the listed
/// names is present (a header named in `Connection` needs `Connection` itself). Lets the
/// common case skip building the removal list.
pub fn any_hop_by_hop<'a>(mut names: impl Iterator<Item = &'a str>) -> bool {
    names.any(|n| HOP_BY_HOP.contains(&n) || RESPONSE_HOP_BY_HOP.contains(&n))
}

/// The request headers to remove, given the `Connection` header's value. On an upgrade
/// request `Connection` and `Upgrade` stay (the instance must see them); `TE: trailers`
/// stays (gRPC needs it).
pub fn request_hop_by_hop(
    connection: Option<&str>,
    te: Option<&str>,
    upgrade: bool,
) -> Vec<String> {
    let mut names: Vec<String> = HOP_BY_HOP
        .iter()
        .filter(|h| !(upgrade && (**h == "connection" || **h == "upgrade")))
        .filter(|h| !(**h == "te" && te.is_some_and(|v| v.trim().eq_ignore_ascii_case("trailers"))))
        .map(|h| h.to_string())
        .collect();
    names.extend(named_in_connection(connection, upgrade));
    names.sort();
    names.dedup();
    names
}

/// The response headers to remove; a `101 Switching Protocols` keeps its upgrade headers.
pub fn response_hop_by_hop(connection: Option<&str>, switching: bool) -> Vec<String> {
    let mut names: Vec<String> = RESPONSE_HOP_BY_HOP
        .iter()
        .filter(|h| !(switching && (**h == "connection" || **h == "upgrade")))
        .map(|h| h.to_string())
        .collect();
    names.extend(named_in_connection(connection, switching));
    names.sort();
    names.dedup();
    names
}

fn named_in_connection(connection: Option<&str>, upgrade: bool) -> Vec<String> {
    connection
        .unwrap_or("")
        .split(',')
        .map(|t| t.trim().to_ascii_lowercase())
        .filter(|t| !t.is_empty() && t != "close" && t != "keep-alive")
        .filter(|t| !(upgrade && t == "upgrade"))
        // Never let a client name the headers the gateway itself sets.
        .filter(|t| !PROTECTED.contains(&t.as_str()))
        .collect()
}

/// Headers a client cannot have removed by naming them in `Connection`.
const PROTECTED: &[&str] = &[
    "host",
    "content-length",
    "transfer-encoding",
    "x-forwarded-for",
    "x-forwarded-proto",
    "forwarded",
    "x-request-id",
    "traceparent",
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_digits() {
        let cases = [
            0,
            1,
            9,
            10,
            15,
            16,
            0x0123_4567_89ab_cdef,
            0xfedc_ba98_7654_3210,
            0x9999_9999_9999_9999,
            0xaaaa_aaaa_aaaa_aaaa,
            u64::MAX,
        ];
        for v in cases
            .into_iter()
            .chain((0..1000).map(|_| fastrand::u64(..)))
        {
            let mut s = String::new();
            push_hex(&mut s, v);
            assert_eq!(s, format!("{v:016x}"), "{v:#x}");
        }
    }

    fn counter() -> impl FnMut() -> u64 {
        let mut n = 0u64;
        move || {
            n += 1;
            n
        }
    }

    #[test]
    fn x_forwarded_for_appends() {
        let ip: IpAddr = "127.0.0.9".parse().unwrap();
        assert_eq!(x_forwarded_for([].into_iter(), ip), "127.0.0.9");
        assert_eq!(x_forwarded_for([" "].into_iter(), ip), "127.0.0.9");
        assert_eq!(
            x_forwarded_for(["10.1.1.1"].into_iter(), ip),
            "10.1.1.1, 127.0.0.9"
        );
        // Two lines are one list.
        assert_eq!(
            x_forwarded_for(["10.1.1.1, 10.1.1.2", "10.1.1.3"].into_iter(), ip),
            "10.1.1.1, 10.1.1.2, 10.1.1.3, 127.0.0.9"
        );
        assert_eq!(real_ip(ip), "127.0.0.9");
        for text in [
            "0.0.0.0",
            "10.200.99.255",
            "192.168.100.1",
            "::1",
            "2001:db8::7",
        ] {
            let ip: IpAddr = text.parse().unwrap();
            assert_eq!(x_forwarded_for([].into_iter(), ip), text);
        }
    }

    #[test]
    fn forwarded_quotes_v6_and_hosts_with_ports() {
        let v4: IpAddr = "127.0.0.9".parse().unwrap();
        let v6: IpAddr = "::1".parse().unwrap();
        assert_eq!(
            forwarded([].into_iter(), v4, "http", Some("api.test")),
            "for=127.0.0.9;proto=http;host=api.test"
        );
        assert_eq!(
            forwarded(
                ["for=1.2.3.4"].into_iter(),
                v6,
                "https",
                Some("api.test:8443")
            ),
            "for=1.2.3.4, for=\"[::1]\";proto=https;host=\"api.test:8443\""
        );
        assert_eq!(
            forwarded(["for=1.1.1.1", "for=2.2.2.2"].into_iter(), v4, "http", None),
            "for=1.1.1.1, for=2.2.2.2, for=127.0.0.9;proto=http"
        );
        assert_eq!(
            forwarded([].into_iter(), v4, "http", Some("bad\"host")),
            "for=127.0.0.9;proto=http"
        );
    }

    #[test]
    fn content_length_has_one_canonical_value() {
        let cl = |lines: &[&str]| content_length(lines.iter().map(|l| l.as_bytes()));
        type Want = Result<Option<(u64, bool)>, HeaderError>;
        let cases: &[(&[&str], Want)] = &[
            (&[], Ok(None)),
            (&["5"], Ok(Some((5, true)))),
            (&["0"], Ok(Some((0, true)))),
            (&["1048576"], Ok(Some((1_048_576, true)))),
            (&["5, 5"], Ok(Some((5, false)))),
            (&["5,5,5"], Ok(Some((5, false)))),
            (&["5", "5"], Ok(Some((5, false)))),
            (&["005"], Ok(Some((5, false)))),
            (&["00"], Ok(Some((0, false)))),
            (&[" 7 "], Ok(Some((7, false)))),
            (&["5, 6"], Err(HeaderError::BadContentLength)),
            (&["5", "6"], Err(HeaderError::BadContentLength)),
            (&["5", "005"], Ok(Some((5, false)))),
            (&["-1"], Err(HeaderError::BadContentLength)),
            (&["+5"], Err(HeaderError::BadContentLength)),
            (&["5,"], Err(HeaderError::BadContentLength)),
            (&[""], Err(HeaderError::BadContentLength)),
            (&["0x10"], Err(HeaderError::BadContentLength)),
            (
                &["99999999999999999999"],
                Err(HeaderError::BadContentLength),
            ),
        ];
        for (lines, want) in cases {
            assert_eq!(cl(lines), *want, "{lines:?}");
        }
    }

    #[test]
    fn te_trailers_is_found_among_tokens() {
        assert!(te_trailers(Some("trailers")));
        assert!(te_trailers(Some("gzip, Trailers")));
        assert!(te_trailers(Some("trailers;q=1")));
        assert!(!te_trailers(Some("gzip")));
        assert!(!te_trailers(Some("trailersx")));
        assert!(!te_trailers(None));
    }

    #[test]
    fn request_ids_are_kept_or_made() {
        assert_eq!(
            request_id(Some("abc-1"), counter()),
            ("abc-1".into(), false)
        );
        let (id, new) = request_id(None, counter());
        assert!(new);
        assert_eq!(id, "00000000000000010000000000000002");
        assert!(request_id(Some("has space"), counter()).1);
        assert!(request_id(Some(&"x".repeat(200)), counter()).1);
    }

    #[test]
    fn traceparent_is_continued_or_started() {
        let incoming = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let t = traceparent(Some(incoming), counter());
        assert!(t.continued);
        assert_eq!(t.trace_id(), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(t.flags(), "01");
        assert_eq!(t.span_id(), "0000000000000001");
        assert_eq!(
            t.header_value(),
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000001-01"
        );
        for bad in [
            "garbage",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
        ] {
            let t = traceparent(Some(bad), counter());
            assert!(!t.continued, "{bad}");
            assert_eq!(t.trace_id().len(), 32);
            assert_ne!(t.trace_id(), "4bf92f3577b34da6a3ce929d0e0e4736");
            assert_eq!(t.header_value().len(), 55);
            assert_eq!(t.flags(), "00");
        }
        // A later version with extra fields is continued.
        assert!(
            traceparent(
                Some("01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra"),
                counter()
            )
            .continued
        );
        // All-zero random words still make a valid ID.
        assert_eq!(
            traceparent(None, || 0).trace_id(),
            format!("{:016x}{:016x}", 1, 0)
        );
        assert_eq!(traceparent(None, || 0).span_id(), format!("{:016x}", 1));
    }

    #[test]
    fn only_listed_names_count_as_hop_by_hop() {
        assert!(!any_hop_by_hop(
            ["host", "user-agent", "accept"].into_iter()
        ));
        assert!(any_hop_by_hop(["host", "connection"].into_iter()));
        assert!(any_hop_by_hop(["te"].into_iter()));
        assert!(any_hop_by_hop(["proxy-authenticate"].into_iter()));
    }

    #[test]
    fn hop_by_hop_headers_go_but_upgrades_and_trailers_stay() {
        let plain =
            request_hop_by_hop(Some("keep-alive, X-Secret, Forwarded"), Some("gzip"), false);
        assert!(plain.contains(&"x-secret".to_string()));
        assert!(plain.contains(&"te".to_string()));
        assert!(plain.contains(&"upgrade".to_string()));
        assert!(!plain.contains(&"forwarded".to_string()));
        let ws = request_hop_by_hop(Some("Upgrade"), Some("trailers"), true);
        assert!(!ws.contains(&"connection".to_string()));
        assert!(!ws.contains(&"upgrade".to_string()));
        assert!(!ws.contains(&"te".to_string()));
        assert!(ws.contains(&"keep-alive".to_string()));
        let resp = response_hop_by_hop(Some("x-internal"), false);
        assert!(resp.contains(&"x-internal".to_string()));
        assert!(resp.contains(&"proxy-authenticate".to_string()));
        assert!(!response_hop_by_hop(None, true).contains(&"upgrade".to_string()));
    }
}
