//! Forwarding headers, pure: what the gateway adds to or removes from a request on its way to
//! an instance, and from a response on its way back.
//!
//! - `X-Forwarded-For`: the client address appended to any list the client sent.
//! - `X-Forwarded-Proto`: `http` or `https`, as the client reached the gateway.
//! - `Forwarded` (RFC 7239): one element `for=…;proto=…;host=…` appended.
//! - `X-Request-Id`: kept when the client sent a sane one, else a new random ID.
//! - `traceparent` (W3C Trace Context): a valid one is continued (same trace ID and flags,
//!   the gateway's own span ID as parent); otherwise a new trace is started.
//! - Hop-by-hop headers (`Connection`, the headers it names, `Keep-Alive`,
//!   `Proxy-Connection`, `Proxy-Authorization`, `TE` other than `trailers`, `Upgrade`) are
//!   removed, except `Connection: upgrade` and `Upgrade` on an upgrade request (WebSocket).

use std::net::IpAddr;

/// Request headers that apply to one connection only.
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

/// The value of `X-Forwarded-For` to send: the client appended to what came in.
pub fn x_forwarded_for(existing: Option<&str>, client: IpAddr) -> String {
    match existing.map(str::trim).filter(|s| !s.is_empty()) {
        Some(list) => format!("{list}, {client}"),
        None => client.to_string(),
    }
}

/// The value of `Forwarded` to send: one element appended to what came in.
pub fn forwarded(
    existing: Option<&str>,
    client: IpAddr,
    proto: &str,
    host: Option<&str>,
) -> String {
    let node = match client {
        IpAddr::V4(v4) => v4.to_string(),
        IpAddr::V6(v6) => format!("\"[{v6}]\""),
    };
    let mut element = format!("for={node};proto={proto}");
    if let Some(h) = host.filter(|h| is_token_or_host(h)) {
        if h.contains(':') {
            element.push_str(&format!(";host=\"{h}\""));
        } else {
            element.push_str(&format!(";host={h}"));
        }
    }
    match existing.map(str::trim).filter(|s| !s.is_empty()) {
        Some(list) => format!("{list}, {element}"),
        None => element,
    }
}

fn is_token_or_host(h: &str) -> bool {
    !h.is_empty()
        && h.len() <= 255
        && h.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-._:[]".contains(&b))
}

/// The request ID to use: the client's when it is printable and short, else a new one.
pub fn request_id(existing: Option<&str>, mut rand: impl FnMut() -> u64) -> (String, bool) {
    match existing {
        Some(id)
            if !id.is_empty() && id.len() <= 128 && id.bytes().all(|b| b.is_ascii_graphic()) =>
        {
            (id.to_string(), false)
        }
        _ => (format!("{:016x}{:016x}", rand(), rand()), true),
    }
}

/// A W3C trace context: what to send on, and the trace ID for logs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TraceContext {
    pub trace_id: String,
    /// This hop's span ID, the parent ID the instance sees.
    pub span_id: String,
    pub flags: String,
    /// Whether the client sent a valid trace context that this continues.
    pub continued: bool,
}

impl TraceContext {
    pub fn header_value(&self) -> String {
        format!("00-{}-{}-{}", self.trace_id, self.span_id, self.flags)
    }
}

/// Continues the client's `traceparent` when it is valid, else starts a trace.
pub fn traceparent(existing: Option<&str>, mut rand: impl FnMut() -> u64) -> TraceContext {
    let span_id = nonzero_hex(&mut rand, 1);
    if let Some((trace_id, flags)) = existing.and_then(parse_traceparent) {
        return TraceContext {
            trace_id,
            span_id,
            flags,
            continued: true,
        };
    }
    TraceContext {
        trace_id: nonzero_hex(&mut rand, 2),
        span_id,
        flags: "00".into(),
        continued: false,
    }
}

/// `words` random u64s as lowercase hex, never all zeros (which the spec forbids).
fn nonzero_hex(rand: &mut impl FnMut() -> u64, words: usize) -> String {
    let mut parts: Vec<u64> = (0..words).map(|_| rand()).collect();
    if parts.iter().all(|p| *p == 0) {
        parts[0] = 1;
    }
    parts.iter().map(|p| format!("{p:016x}")).collect()
}

/// The trace ID and flags of a valid version-00 (or later) `traceparent`.
fn parse_traceparent(v: &str) -> Option<(String, String)> {
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
    Some((trace_id.to_string(), flags.to_string()))
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
        assert_eq!(x_forwarded_for(None, ip), "127.0.0.9");
        assert_eq!(x_forwarded_for(Some(" "), ip), "127.0.0.9");
        assert_eq!(x_forwarded_for(Some("10.1.1.1"), ip), "10.1.1.1, 127.0.0.9");
    }

    #[test]
    fn forwarded_quotes_v6_and_hosts_with_ports() {
        let v4: IpAddr = "127.0.0.9".parse().unwrap();
        let v6: IpAddr = "::1".parse().unwrap();
        assert_eq!(
            forwarded(None, v4, "http", Some("api.test")),
            "for=127.0.0.9;proto=http;host=api.test"
        );
        assert_eq!(
            forwarded(Some("for=1.2.3.4"), v6, "https", Some("api.test:8443")),
            "for=1.2.3.4, for=\"[::1]\";proto=https;host=\"api.test:8443\""
        );
        assert_eq!(
            forwarded(None, v4, "http", Some("bad\"host")),
            "for=127.0.0.9;proto=http"
        );
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
        assert_eq!(t.trace_id, "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(t.flags, "01");
        assert_eq!(t.span_id, "0000000000000001");
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
            assert_eq!(t.trace_id.len(), 32);
            assert_ne!(t.trace_id, "4bf92f3577b34da6a3ce929d0e0e4736");
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
            traceparent(None, || 0).trace_id,
            format!("{:016x}{:016x}", 1, 0)
        );
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
