//! What the gateway decides about a request before any instance is involved, whichever data
//! path carries it (pingora's proxy, or the lean HTTP/1.1 path): the size limits (431, 413;
//! `Content-Length` checked and made canonical, 400 when its values disagree), the
//! per-client and per-route rate limits (429 with `Retry-After`), the route on the
//! normalised path (see [`crate::path`]; 400 for no Host or an ambiguous path, 404 when no
//! route matches), and that a serving instance exists (503 when none does). Also the
//! forwarding headers an admitted request gets on its way to the instance.
//!
//! Counting (metrics) happens here too, so that both paths count alike.

use std::borrow::Cow;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use http::header::{CONNECTION, CONTENT_LENGTH, HOST, TRANSFER_ENCODING};
use http::{HeaderMap, HeaderName, HeaderValue, Method, Uri, Version};
use waymark_shared::select::any_selected;
use waymark_shared::ServiceView;

use crate::admin::{LimitLabel, ReasonLabel};
use crate::headers::{
    self, TraceContext, FORWARDED, TE, TRACEPARENT, X_FORWARDED_FOR, X_FORWARDED_PROTO, X_REAL_IP,
    X_REQUEST_ID,
};
use crate::path;
use crate::routes::Route;
use crate::Shared;

/// The route label for requests that matched no route.
pub const NO_ROUTE: &str = "-";

/// A request's head, as both data paths see it.
pub struct Head<'a> {
    pub method: &'a Method,
    pub uri: &'a Uri,
    pub version: Version,
    pub headers: &'a HeaderMap,
    /// The request target as sent (absolute form, non-UTF-8 bytes and all).
    pub raw_path: &'a [u8],
}

/// An answer the gateway gives itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub status: u16,
    pub body: String,
    pub retry_after: Option<Duration>,
}

impl Refusal {
    fn new(status: u16, body: impl Into<String>) -> Refusal {
        Refusal {
            status,
            body: body.into(),
            retry_after: None,
        }
    }
}

/// A request that may go to an instance.
pub struct Admitted {
    pub route: Arc<Route>,
    /// The tags of the backend picked for this request (weighted split).
    pub tags: Vec<String>,
    pub service: Arc<ServiceView>,
    /// The target, when normalising changed it (or made an absolute form origin-form).
    pub rewritten: Option<Uri>,
    /// The one canonical `Content-Length` to send, when the client's was not canonical.
    pub content_length: ContentLength,
}

/// What to do with the request's `Content-Length` on the way.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ContentLength {
    /// Keep it as it is (absent, or one canonical value).
    Keep,
    /// Send this one value instead.
    Canonical(u64),
    /// Remove it: `Transfer-Encoding` frames the body.
    Remove,
}

/// The route a refusal counts under, when it matched one.
pub struct Refused {
    pub route: Option<Arc<Route>>,
    pub refusal: Refusal,
}

/// Decides whether the request is refused or may be proxied (see the module docs).
pub fn admit(
    shared: &Shared,
    head: &Head<'_>,
    client: Option<IpAddr>,
    now: Instant,
) -> Result<Admitted, Refused> {
    let cfg = &shared.config;
    let refuse = |refusal: Refusal| Refused {
        route: None,
        refusal,
    };
    if header_bytes(head) > cfg.limits.max_header_bytes {
        return Err(refuse(Refusal::new(431, "request headers too large\n")));
    }
    if head
        .headers
        .get_all(CONTENT_LENGTH)
        .iter()
        .any(|v| v.as_bytes().contains(&b','))
    {
        // RFC 9110 §8.6 lets a recipient take a list of equal values or refuse it; the
        // gateway refuses it, as nginx and hyper do (one framing, read one way everywhere).
        return Err(refuse(bad_request(shared, "a Content-Length list")));
    }
    let content_length = match headers::content_length(
        head.headers
            .get_all(CONTENT_LENGTH)
            .iter()
            .map(|v| v.as_bytes()),
    ) {
        Err(e) => return Err(refuse(bad_request(shared, &e.to_string()))),
        Ok(None) => (None, ContentLength::Keep),
        Ok(Some(_)) if head.headers.contains_key(TRANSFER_ENCODING) => {
            (None, ContentLength::Remove)
        }
        Ok(Some((n, true))) => (Some(n), ContentLength::Keep),
        Ok(Some((n, false))) => (Some(n), ContentLength::Canonical(n)),
    };
    let (declared, content_length) = content_length;
    if names_host(head.headers) {
        // Removing what Connection names would take Host away from the instance.
        return Err(refuse(bad_request(shared, "Connection names Host")));
    }
    if declared.is_some_and(|n| n > cfg.limits.max_body_bytes) {
        return Err(refuse(Refusal::new(413, "request body too large\n")));
    }
    if let (Some(limit), Some(ip)) = (&shared.client_limit, client) {
        if let Err(wait) = limit.take(ip, now) {
            rate_limited(shared, NO_ROUTE, "client");
            return Err(refuse(too_many(wait)));
        }
    }
    let (route, rewritten) = match route(shared, head) {
        Ok(found) => found,
        Err(why) => return Err(refuse(bad_request(shared, &why))),
    };
    let Some(route) = route else {
        return Err(refuse(Refusal::new(404, "no route\n")));
    };
    let refuse_on = |refusal: Refusal| Refused {
        route: Some(route.clone()),
        refusal,
    };
    let route_limit = shared.route_set.load().limits.get(&route.name).cloned();
    if let Some(limit) = route_limit {
        if let Err(wait) = limit.take(now) {
            rate_limited(shared, &route.name, "route");
            return Err(refuse_on(too_many(wait)));
        }
    }
    let tags = route.pick_backend(fastrand::f64()).tags.clone();
    let service = shared.mirror.service(&route.service);
    let Some(service) = service.filter(|s| any_selected(s, &tags)) else {
        let body = format!("no healthy instance of {}\n", route.service);
        return Err(refuse_on(Refusal::new(503, body)));
    };
    Ok(Admitted {
        route,
        tags,
        service,
        rewritten,
        content_length,
    })
}

/// Whether `Connection` lists `Host` as hop-by-hop.
fn names_host(headers: &HeaderMap) -> bool {
    headers
        .get_all(CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case("host"))
}

fn too_many(wait: Duration) -> Refusal {
    Refusal {
        status: 429,
        body: "too many requests\n".into(),
        retry_after: Some(wait),
    }
}

fn rate_limited(shared: &Shared, route: &str, scope: &str) {
    shared
        .metrics
        .rate_limited
        .get_or_create(&LimitLabel {
            route: route.into(),
            scope: scope.into(),
        })
        .inc();
}

/// A 400 for a request the gateway refuses, counted as the client's error.
pub fn bad_request(shared: &Shared, why: &str) -> Refusal {
    tracing::debug!(why, "bad request");
    client_error(shared, "bad_request");
    Refusal::new(400, format!("bad request: {why}\n"))
}

/// Counts a client's fault (`bad_request`, `aborted`).
pub fn client_error(shared: &Shared, reason: &'static str) {
    shared
        .metrics
        .client_errors
        .get_or_create(&ReasonLabel { reason })
        .inc();
}

/// `Retry-After` for a wait: whole seconds, rounded up, at least 1.
pub fn retry_after_secs(wait: Duration) -> u64 {
    (wait.as_secs() + u64::from(wait.subsec_nanos() > 0)).max(1)
}

/// The size of the request head as the limit counts it.
fn header_bytes(head: &Head<'_>) -> usize {
    let u = head.uri;
    let uri = u.scheme_str().map_or(0, |s| s.len() + 3)
        + u.authority().map_or(0, |a| a.as_str().len())
        + u.path_and_query().map_or(1, |p| p.as_str().len());
    let headers: usize = head
        .headers
        .iter()
        .map(|(k, v)| k.as_str().len() + v.len() + 4)
        .sum();
    uri + headers + head.method.as_str().len() + 12
}

/// Normalises the request's path and finds its route, with the target to send when it
/// changed (an absolute-form target becomes origin-form). `Err` is a reason for 400: no
/// Host, a path that is malformed, or one whose other readings would take another route.
fn route(shared: &Shared, head: &Head<'_>) -> Result<(Option<Arc<Route>>, Option<Uri>), String> {
    let host_header = head.headers.get(HOST).and_then(|v| v.to_str().ok());
    let host = head.uri.host().or(host_header).filter(|h| !h.is_empty());
    // HTTP/1.1 requires Host (RFC 9112 §3.2); HTTP/2 carries :authority or Host.
    if host.is_none() && head.version != Version::HTTP_10 && head.version != Version::HTTP_09 {
        return Err("no Host".into());
    }
    let query = head.uri.query();
    let normalized = path::normalize(head.uri.path())
        .and_then(|n| query.map_or(Ok(()), path::check_query).map(|()| n))
        .map_err(|e| e.to_string())?;
    let table = shared.routes.load();
    let header = |name: &str| head.headers.get(name).and_then(|v| v.to_str().ok());
    let route = table.find(host, &normalized.path, header);
    for other in &normalized.alternatives {
        let elsewhere = table.find(host, other, header);
        let same = match (&route, &elsewhere) {
            (Some(a), Some(b)) => Arc::ptr_eq(a, b),
            (None, None) => true,
            _ => false,
        };
        if !same {
            return Err("an encoded slash or dot segment makes the path ambiguous".into());
        }
    }
    let raw = head.raw_path;
    let absolute_form = !raw.starts_with(b"/") && raw != b"*";
    let http_scheme = |s: &[u8]| raw.len() > s.len() && raw[..s.len()].eq_ignore_ascii_case(s);
    if absolute_form && !http_scheme(b"http://") && !http_scheme(b"https://") {
        // Not origin, absolute or asterisk form: what a request line with a space too many
        // parses as, among others.
        return Err("a request target in no known form".into());
    }
    let mut rewritten = None;
    if matches!(normalized.path, Cow::Owned(_)) || absolute_form {
        let mut target =
            String::with_capacity(normalized.path.len() + query.map_or(0, |q| q.len() + 1));
        target.push_str(&normalized.path);
        if let Some(q) = query {
            target.push('?');
            target.push_str(q);
        }
        // An HTTP/2 request keeps its scheme and authority (the instance's Host comes from
        // them); an HTTP/1.1 absolute-form target has neither in the URI and becomes
        // origin-form.
        let mut parts = http::uri::Parts::default();
        parts.scheme = head.uri.scheme().cloned();
        parts.authority = head.uri.authority().cloned();
        parts.path_and_query =
            Some(http::uri::PathAndQuery::try_from(target).map_err(|e| e.to_string())?);
        rewritten = Some(Uri::from_parts(parts).map_err(|e| e.to_string())?);
    }
    Ok((route, rewritten))
}

/// Where forwarding headers are written: pingora's request header, or an `http` map.
pub trait HeaderEdit {
    fn headers(&self) -> &HeaderMap;
    fn set(&mut self, name: &HeaderName, value: HeaderValue);
    fn remove(&mut self, name: &str);
}

/// Who sent the request and how, for the forwarding headers.
pub struct Forwarding<'a> {
    pub client: Option<IpAddr>,
    /// `client` as a header value, when the connection made it once for all its requests
    /// (else it is made here).
    pub client_value: Option<&'a HeaderValue>,
    /// The peer is a trusted proxy: its forwarding headers are continued.
    pub trusted: bool,
    pub https: bool,
    /// The host the client asked for (the URI's, else `Host`).
    pub host: Option<&'a str>,
    pub request_id: &'a str,
    pub trace: Option<&'a TraceContext>,
    /// The client asked for trailers (`TE: trailers`), which are end to end.
    pub te_trailers: bool,
    pub upgrade: bool,
}

/// Removes hop-by-hop headers and writes the forwarding headers (`X-Forwarded-For`,
/// `Forwarded`, `X-Real-IP`, `X-Forwarded-Proto`, `X-Request-Id`, `traceparent`).
pub fn forwarding_headers(req: &mut impl HeaderEdit, f: &Forwarding<'_>) {
    if headers::any_hop_by_hop(req.headers().keys().map(|k| k.as_str())) {
        let text = |name: &str| {
            req.headers()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string)
        };
        let (connection, te) = (text("connection"), text("te"));
        for name in headers::request_hop_by_hop(connection.as_deref(), te.as_deref(), f.upgrade) {
            req.remove(&name);
        }
    }
    if f.te_trailers {
        req.set(&TE, HeaderValue::from_static("trailers"));
    }
    let own_proto = if f.https { "https" } else { "http" };
    let proto = if f.trusted {
        req.headers()
            .get(&X_FORWARDED_PROTO)
            .and_then(|v| v.to_str().ok())
            .filter(|p| *p == "http" || *p == "https")
            .map_or(own_proto, |p| if p == "https" { "https" } else { "http" })
    } else {
        own_proto
    };
    if let Some(ip) = f.client {
        // A trusted proxy's lists are continued (all their lines, as one list); anyone
        // else's are replaced, so a client cannot pose as another address.
        let lists = |name: &str| -> Vec<&str> {
            if f.trusted {
                req.headers()
                    .get_all(name)
                    .iter()
                    .filter_map(|v| v.to_str().ok())
                    .collect()
            } else {
                Vec::new()
            }
        };
        // Cloning a header value counts a reference; nothing is copied.
        let ip_value = f
            .client_value
            .cloned()
            .or_else(|| text(headers::real_ip(ip)));
        let continued = lists("x-forwarded-for");
        let xff = match &ip_value {
            Some(v) if continued.is_empty() => Some(v.clone()),
            _ => text(headers::x_forwarded_for(continued.into_iter(), ip)),
        };
        let fwd = headers::forwarded(lists("forwarded").into_iter(), ip, own_proto, f.host);
        let keep_real_ip = f.trusted && req.headers().contains_key(&X_REAL_IP);
        if let Some(v) = xff {
            req.set(&X_FORWARDED_FOR, v);
        }
        if let Some(v) = text(fwd) {
            req.set(&FORWARDED, v);
        }
        if let (false, Some(v)) = (keep_real_ip, ip_value) {
            req.set(&X_REAL_IP, v);
        }
    } else if !f.trusted {
        for name in ["x-forwarded-for", "forwarded", "x-real-ip"] {
            req.remove(name);
        }
    }
    req.set(&X_FORWARDED_PROTO, HeaderValue::from_static(proto));
    if let Ok(v) = HeaderValue::from_str(f.request_id) {
        req.set(&X_REQUEST_ID, v);
    }
    if let Some(v) = f
        .trace
        .and_then(|t| HeaderValue::from_str(t.header_value()).ok())
    {
        req.set(&TRACEPARENT, v);
    }
}

/// A header value made of text built here (visible ASCII; `None` would mean a bug, and
/// the header is then left out rather than sent malformed).
fn text(value: String) -> Option<HeaderValue> {
    HeaderValue::try_from(value).ok()
}

impl HeaderEdit for HeaderMap {
    fn headers(&self) -> &HeaderMap {
        self
    }

    fn set(&mut self, name: &HeaderName, value: HeaderValue) {
        self.insert(name.clone(), value);
    }

    fn remove(&mut self, name: &str) {
        HeaderMap::remove(self, name);
    }
}

/// Header fields set beside a map rather than in it, for a head encoded straight from both
/// ([`encode_head`](crate::h1_client::encode_head)): the map keeps the client's fields (less
/// those removed), and a field set here replaces the map's of that name on the wire. Saves
/// the map's inserts (a hash, a probe, often a growth each).
pub struct HeaderOverlay<'a> {
    map: &'a mut HeaderMap,
    set: Vec<(HeaderName, HeaderValue)>,
}

impl<'a> HeaderOverlay<'a> {
    pub fn new(map: &'a mut HeaderMap) -> HeaderOverlay<'a> {
        HeaderOverlay {
            map,
            set: Vec::with_capacity(8),
        }
    }

    /// The fields set, each name once.
    pub fn into_set(self) -> Vec<(HeaderName, HeaderValue)> {
        self.set
    }
}

impl HeaderEdit for HeaderOverlay<'_> {
    fn headers(&self) -> &HeaderMap {
        self.map
    }

    fn set(&mut self, name: &HeaderName, value: HeaderValue) {
        match self.set.iter_mut().find(|(n, _)| n == name) {
            Some(field) => field.1 = value,
            None => self.set.push((name.clone(), value)),
        }
    }

    fn remove(&mut self, name: &str) {
        self.map.remove(name);
        self.set.retain(|(n, _)| n.as_str() != name);
    }
}

impl HeaderEdit for pingora::http::RequestHeader {
    fn headers(&self) -> &HeaderMap {
        &self.headers
    }

    fn set(&mut self, name: &HeaderName, value: HeaderValue) {
        // Every value written here is made of visible ASCII.
        let _ = self.insert_header(name.clone(), value);
    }

    fn remove(&mut self, name: &str) {
        self.remove_header(name);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::h1_client::encode_head;

    /// The head's header lines, sorted (the order of fields of different names carries no
    /// meaning).
    fn lines(head: &[u8]) -> Vec<String> {
        let text = String::from_utf8_lossy(head);
        let mut lines: Vec<String> = text
            .split("\r\n")
            .skip(1)
            .filter(|l| !l.is_empty())
            .map(str::to_string)
            .collect();
        lines.sort();
        lines
    }

    /// The forwarding headers set beside the map and encoded from both make the same head as
    /// the same headers inserted into the map.
    #[test]
    fn an_overlay_encodes_as_the_edited_map_does() {
        let client: IpAddr = "192.0.2.7".parse().unwrap();
        let value = HeaderValue::from_static("192.0.2.7");
        // (client's fields, trusted peer, client address known, te_trailers, upgrade)
        type Case = (
            &'static [(&'static str, &'static str)],
            bool,
            bool,
            bool,
            bool,
        );
        let table: [Case; 5] = [
            (
                &[
                    ("host", "a.test"),
                    ("x-forwarded-for", "10.0.0.1"),
                    ("x-real-ip", "10.0.0.1"),
                    ("forwarded", "for=10.0.0.1"),
                    ("connection", "keep-alive, x-secret"),
                    ("x-secret", "s"),
                    ("te", "gzip"),
                ],
                false,
                true,
                false,
                false,
            ),
            (
                &[
                    ("host", "a.test"),
                    ("x-forwarded-for", "10.0.0.1"),
                    ("x-forwarded-for", "10.0.0.2"),
                    ("x-forwarded-proto", "https"),
                    ("x-real-ip", "10.0.0.1"),
                    ("te", "trailers"),
                    ("connection", "te"),
                ],
                true,
                true,
                true,
                false,
            ),
            (
                &[
                    ("host", "a.test"),
                    ("connection", "Upgrade"),
                    ("upgrade", "websocket"),
                ],
                false,
                true,
                false,
                true,
            ),
            (
                &[("host", "a.test"), ("x-forwarded-for", "10.0.0.1")],
                false,
                false,
                false,
                false,
            ),
            (
                &[("host", "a.test"), ("x-request-id", "mine")],
                true,
                false,
                false,
                false,
            ),
        ];
        let trace = headers::traceparent(None, || 7);
        for (fields, trusted, known, te_trailers, upgrade) in table {
            let mut map = HeaderMap::new();
            for (k, v) in fields {
                map.append(HeaderName::from_static(k), HeaderValue::from_static(v));
            }
            let f = Forwarding {
                client: known.then_some(client),
                client_value: known.then_some(&value),
                trusted,
                https: false,
                host: Some("a.test"),
                request_id: "rid",
                trace: Some(&trace),
                te_trailers,
                upgrade,
            };
            let mut edited = map.clone();
            forwarding_headers(&mut edited, &f);
            let want = encode_head(&http::Method::GET, "/", &edited, &[], false);
            let mut overlay = HeaderOverlay::new(&mut map);
            forwarding_headers(&mut overlay, &f);
            let set = overlay.into_set();
            let got = encode_head(&http::Method::GET, "/", &map, &set, false);
            assert_eq!(lines(&got), lines(&want), "{fields:?}");
        }
    }
}
