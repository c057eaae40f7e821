//! The resolver's HTTP interface: the registration API (the part of Consul's agent, catalog
//! and health API that client libraries use), the change stream that mirrors follow, and the
//! admin endpoints (`/metrics`, `/healthz/live`, `/healthz/ready`).
//!
//! - [`consul`]: Consul's JSON shapes, parsed and produced (pure).
//! - [`agent`]: the Consul-compatible agent handlers (this host's registrations).
//! - [`catalog`]: the catalog and health reads, and catalog registration.
//! - [`query`]: the parameters every read shares (blocking, tags, node-meta, filter, dc,
//!   consistency).
//! - [`filter`]: Consul's filter language.
//! - [`stream`]: the change stream (long-poll and server-sent events).
//! - [`admin`]: metrics, liveness and readiness.
//! - [`serve`]: the connections: caps, timeouts, drain.
//! - [`encoded`]: whole-registry answers encoded once per index, off the async workers.
//! - [`mesh`]: the mesh CA's endpoints: signing forwarders' certificates, the trust bundle.
//! - [`eureka`]: the Eureka-compatible API (`/eureka/apps/...`, `/eureka/v2/apps/...`).
//! - [`ui`]: the web view at `/ui/`.

pub mod admin;
pub mod agent;
pub mod catalog;
pub mod consul;
pub mod encoded;
pub mod eureka;
pub mod filter;
pub mod mesh;
pub mod query;
pub mod serve;
pub mod stream;
pub mod ui;

use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, put};
use axum::Router;
use serde_json::json;
use waymark_shared::{Health, Mirror};

use crate::config::Config;
use crate::metrics::{ApiLabels, Metrics};
use crate::registry::{Registry, RegistryError};

/// What every handler can reach.
pub struct ApiState {
    pub registry: Arc<Registry>,
    /// What the catalog, health and change-stream endpoints answer: the registry's own
    /// mirror, or with etcd the mirror of etcd.
    pub mirror: Arc<Mirror>,
    /// The registry's own mirror (what was registered on this host): the agent endpoints.
    pub local: Arc<Mirror>,
    /// With etcd: the link's state, for readiness.
    pub etcd: Option<Arc<crate::etcd::EtcdLink>>,
    pub config: Arc<Config>,
    pub metrics: Arc<Metrics>,
    pub ready: Arc<admin::Readiness>,
    /// Signalled at shutdown: long polls and event streams end.
    pub drain: waymark_shared::lifecycle::drain::Watch,
    /// Whole-registry answers, encoded once per index.
    pub encoded: encoded::Encoded,
    /// The mesh CA.
    pub ca: Arc<crate::ca::MeshCa>,
    /// The registry as Eureka clients see it.
    pub eureka: Arc<eureka::view::EurekaView>,
}

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    NotFound(String),
    #[error(
        "missing or wrong token: send Authorization: Bearer <token>, X-Consul-Token or ?token="
    )]
    Forbidden,
    #[error("request body is over the limit of {0} bytes")]
    TooLarge(usize),
    #[error("request body not received within {0:?}")]
    BodyTimeout(Duration),
    #[error("{0}")]
    Internal(String),
    /// Consul's answer to a `dc` it does not know.
    #[error("No path to datacenter {0:?}: this registry is one datacenter")]
    NoDatacenter(String),
    /// An endpoint of Consul's API that Waymark does not implement.
    #[error("{0} is not supported by Waymark (see the README's API table)")]
    Unsupported(String),
}

impl From<RegistryError> for ApiError {
    fn from(e: RegistryError) -> Self {
        match e {
            RegistryError::Invalid(_)
            | RegistryError::NotTtl(_)
            | RegistryError::CheckConflict { .. }
            | RegistryError::Name(_)
            | RegistryError::LabelTaken { .. } => ApiError::BadRequest(e.to_string()),
            RegistryError::UnknownService(_) | RegistryError::UnknownCheck(_) => {
                ApiError::NotFound(e.to_string())
            }
            RegistryError::Store(_) => ApiError::Internal(e.to_string()),
        }
    }
}

impl From<consul::ParseError> for ApiError {
    fn from(e: consul::ParseError) -> Self {
        ApiError::BadRequest(e.to_string())
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = match self {
            ApiError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::Forbidden => StatusCode::FORBIDDEN,
            ApiError::TooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::BodyTimeout(_) => StatusCode::REQUEST_TIMEOUT,
            ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
            ApiError::NoDatacenter(_) => StatusCode::INTERNAL_SERVER_ERROR,
            ApiError::Unsupported(_) => StatusCode::NOT_IMPLEMENTED,
        };
        if matches!(self, ApiError::Internal(_)) {
            tracing::error!(error = %self, "API request failed");
        }
        (status, json_body(&json!({ "error": self.to_string() }))).into_response()
    }
}

/// A JSON response body with Consul clients' expected content type.
pub fn json_body(value: &serde_json::Value) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        )],
        value.to_string(),
    )
        .into_response()
}

/// A JSON response with an `X-Consul-Index` header (never below 1).
pub fn with_index(value: &serde_json::Value, index: u64) -> Response {
    indexed(json_body(value), index)
}

/// Already encoded JSON with an `X-Consul-Index` header (never below 1).
pub fn encoded_with_index(json: bytes::Bytes, index: u64) -> Response {
    indexed(
        (
            [(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            )],
            json,
        )
            .into_response(),
        index,
    )
}

/// Every indexed read says, as Consul's do, that the registry it answers from has a leader
/// and was heard from just now (the embedded registry is its own leader; with etcd, the
/// mirror's age is in `/metrics` and readiness).
fn indexed(mut resp: Response, index: u64) -> Response {
    let headers = resp.headers_mut();
    headers.insert(
        "X-Consul-Index",
        HeaderValue::from_str(&index.max(1).to_string()).expect("digits"),
    );
    headers.insert("X-Consul-KnownLeader", HeaderValue::from_static("true"));
    headers.insert("X-Consul-LastContact", HeaderValue::from_static("0"));
    resp
}

/// Reads a request body up to the configured size, within the configured time.
pub async fn read_body(state: &ApiState, body: Body) -> Result<bytes::Bytes, ApiError> {
    let (limit, within) = (
        state.config.api.max_body_bytes,
        state.config.api.body_read_timeout,
    );
    match tokio::time::timeout(within, axum::body::to_bytes(body, limit)).await {
        Ok(Ok(bytes)) => Ok(bytes),
        Ok(Err(_)) => Err(ApiError::TooLarge(limit)),
        Err(_) => Err(ApiError::BodyTimeout(within)),
    }
}

/// Builds the router.
pub fn router(state: Arc<ApiState>) -> Router {
    let consul = Router::new()
        .route("/v1/agent/service/register", put(agent::register))
        .route("/v1/agent/service/deregister/{*id}", put(agent::deregister))
        .route(
            "/v1/agent/service/maintenance/{*id}",
            put(agent::maintenance),
        )
        .route("/v1/agent/check/register", put(agent::register_check))
        .route(
            "/v1/agent/check/deregister/{*id}",
            put(agent::deregister_check),
        )
        .route(
            "/v1/agent/check/pass/{*id}",
            put(|s, p, q| agent::heartbeat(Health::Passing, s, p, q)),
        )
        .route(
            "/v1/agent/check/warn/{*id}",
            put(|s, p, q| agent::heartbeat(Health::Warning, s, p, q)),
        )
        .route(
            "/v1/agent/check/fail/{*id}",
            put(|s, p, q| agent::heartbeat(Health::Critical, s, p, q)),
        )
        .route("/v1/agent/check/update/{*id}", put(agent::check_update))
        .route("/v1/agent/self", get(agent::agent_self))
        .route("/v1/agent/service/{id}", get(agent::agent_service))
        .route(
            "/v1/agent/health/service/name/{name}",
            get(agent::agent_health_by_name),
        )
        .route(
            "/v1/agent/health/service/id/{id}",
            get(agent::agent_health_by_id),
        )
        .route("/v1/agent/members", get(agent::members))
        .route("/v1/agent/services", get(agent::services))
        .route("/v1/agent/checks", get(agent::checks))
        .route("/v1/catalog/register", put(catalog::catalog_register))
        .route("/v1/catalog/deregister", put(catalog::catalog_deregister))
        .route("/v1/catalog/datacenters", get(catalog::datacenters))
        .route("/v1/catalog/nodes", get(catalog::catalog_nodes))
        .route("/v1/catalog/node/{name}", get(catalog::catalog_node))
        .route(
            "/v1/catalog/node-services/{name}",
            get(catalog::catalog_node_services),
        )
        .route("/v1/catalog/services", get(catalog::catalog_services))
        .route("/v1/catalog/service/{name}", get(catalog::catalog_service))
        .route("/v1/health/service/{name}", get(catalog::health_service))
        .route("/v1/health/checks/{name}", get(catalog::health_checks))
        .route("/v1/health/state/{state}", get(catalog::health_state))
        .route("/v1/health/node/{name}", get(catalog::health_node))
        .route("/v1/status/leader", get(agent::leader))
        .route("/v1/status/peers", get(agent::peers))
        .route("/v1/waymark/changes", get(stream::changes))
        .route("/v1/waymark/events", get(stream::events))
        .merge(eureka::router())
        .layer(middleware::from_fn_with_state(state.clone(), authorize));
    Router::new()
        .merge(consul)
        // Its own credential (the join token), so outside the API token's guard.
        .route("/v1/mesh/sign", axum::routing::post(mesh::sign))
        .route("/v1/mesh/bundle", get(mesh::bundle))
        .route("/metrics", get(admin::metrics))
        .route("/healthz/live", get(admin::live))
        .route("/healthz/ready", get(admin::ready))
        .merge(ui::router(state.clone()))
        .fallback(not_found)
        .layer(middleware::from_fn_with_state(state.clone(), count))
        .with_state(state)
}

async fn not_found(method: Method, uri: axum::http::Uri) -> ApiError {
    let path = uri.path();
    match unsupported(path) {
        Some(what) => ApiError::Unsupported(format!("{method} {path}: {what}")),
        None => ApiError::NotFound(format!("no such endpoint: {method} {path}")),
    }
}

/// The parts of Consul's API that Waymark does not implement, by path prefix.
const UNSUPPORTED: &[(&str, &str)] = &[
    ("/v1/kv", "Consul's key/value store"),
    ("/v1/txn", "Consul's transactions"),
    ("/v1/session", "Consul's sessions"),
    ("/v1/event", "Consul's events"),
    ("/v1/query", "Consul's prepared queries"),
    (
        "/v1/acl",
        "Consul's ACL system (Waymark has one bearer token: api.token)",
    ),
    (
        "/v1/connect",
        "Consul Connect (Waymark's mesh is the per-host forwarder)",
    ),
    (
        "/v1/agent/connect",
        "Consul Connect (Waymark's mesh is the per-host forwarder)",
    ),
    ("/v1/config", "Consul's configuration entries"),
    ("/v1/discovery-chain", "Consul's discovery chains"),
    ("/v1/coordinate", "Consul's network coordinates"),
    ("/v1/operator", "Consul's operator endpoints"),
    (
        "/v1/snapshot",
        "Consul's snapshots (the store's files are the backup)",
    ),
    ("/v1/peering", "Consul's cluster peering"),
    ("/v1/namespace", "Consul Enterprise's namespaces"),
    ("/v1/partition", "Consul Enterprise's admin partitions"),
    ("/v1/agent/token", "Consul's ACL tokens"),
    ("/v1/agent/join", "Consul's gossip membership"),
    ("/v1/agent/leave", "Consul's gossip membership"),
    ("/v1/agent/force-leave", "Consul's gossip membership"),
    (
        "/v1/agent/check/ttl",
        "the deprecated TTL path: use /v1/agent/check/pass|warn|fail",
    ),
    ("/v1/internal", "Consul's internal UI endpoints"),
];

/// What a path of Consul's API that Waymark does not implement is.
fn unsupported(path: &str) -> Option<&'static str> {
    UNSUPPORTED
        .iter()
        .find(|(prefix, _)| {
            path.strip_prefix(prefix).is_some_and(|rest| {
                rest.is_empty() || rest.starts_with('/') || rest.starts_with('?')
            })
        })
        .map(|(_, what)| *what)
}

/// Guards writes (and, with `token_for_reads`, reads) with the configured token, if any.
/// Every place a client may put the token is looked at: a wrong or foreign `Authorization`
/// header does not hide a right `X-Consul-Token`.
async fn authorize(State(state): State<Arc<ApiState>>, req: Request, next: Next) -> Response {
    let Some(token) = state.config.api.token.as_deref() else {
        return next.run(req).await;
    };
    let read = req.method() == Method::GET || req.method() == Method::HEAD;
    if read && !state.config.api.token_for_reads {
        return next.run(req).await;
    }
    let presented = presented_tokens(req.headers(), req.uri().query());
    if presented.iter().any(|t| constant_eq(t, token)) {
        next.run(req).await
    } else {
        ApiError::Forbidden.into_response()
    }
}

/// Every token the request carries: `Authorization: Bearer`, the password of
/// `Authorization: Basic` (Eureka clients and Spring put credentials in the server URL,
/// `http://user:<token>@host/eureka/`), `X-Consul-Token` and `?token=` (percent-decoded).
fn presented_tokens(headers: &HeaderMap, query: Option<&str>) -> Vec<String> {
    let mut tokens: Vec<String> = headers
        .get_all(header::AUTHORIZATION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .filter_map(|v| {
            let (scheme, rest) = v.trim().split_once(' ')?;
            if scheme.eq_ignore_ascii_case("bearer") {
                Some(rest.trim().to_string())
            } else if scheme.eq_ignore_ascii_case("basic") {
                let decoded = String::from_utf8(base64_decode(rest.trim())?).ok()?;
                Some(decoded.split_once(':')?.1.to_string())
            } else {
                None
            }
        })
        .collect();
    tokens.extend(
        headers
            .get_all("x-consul-token")
            .iter()
            .filter_map(|v| v.to_str().ok())
            .map(|v| v.trim().to_string()),
    );
    if let Some(query) = query {
        tokens.extend(
            query
                .split('&')
                .filter_map(|kv| kv.strip_prefix("token="))
                .filter_map(percent_decode),
        );
    }
    tokens
}

/// Decodes a query value (`%XX` and `+`); `None` when it is not valid UTF-8 or escapes.
fn percent_decode(s: &str) -> Option<String> {
    let mut out = Vec::with_capacity(s.len());
    let mut bytes = s.bytes();
    while let Some(b) = bytes.next() {
        out.push(match b {
            b'%' => {
                let hex = [bytes.next()?, bytes.next()?];
                u8::from_str_radix(std::str::from_utf8(&hex).ok()?, 16).ok()?
            }
            b'+' => b' ',
            b => b,
        });
    }
    String::from_utf8(out).ok()
}

/// Standard base64 (with or without padding); `None` when it is not.
fn base64_decode(s: &str) -> Option<Vec<u8>> {
    let s = s.trim_end_matches('=');
    let mut out = Vec::with_capacity(s.len() * 3 / 4);
    let (mut acc, mut bits) = (0u32, 0u32);
    for c in s.bytes() {
        let v = match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => return None,
        };
        acc = (acc << 6) | u32::from(v);
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
            acc &= (1 << bits) - 1;
        }
    }
    Some(out)
}

fn constant_eq(a: &str, b: &str) -> bool {
    a.len() == b.len()
        && a.bytes()
            .zip(b.bytes())
            .fold(0u8, |acc, (x, y)| acc | (x ^ y))
            == 0
}

async fn count(State(state): State<Arc<ApiState>>, req: Request, next: Next) -> Response {
    let method = req.method().to_string();
    let resp = next.run(req).await;
    state
        .metrics
        .api_requests
        .get_or_create(&ApiLabels {
            method,
            status: resp.status().as_u16(),
        })
        .inc();
    resp
}

/// `index` and `wait` of a blocking query.
pub struct Blocking {
    pub index: u64,
    pub wait: Duration,
}

impl Blocking {
    pub fn parse(
        query: &std::collections::HashMap<String, String>,
        max_wait: Duration,
    ) -> Result<Blocking, ApiError> {
        let index = match query.get("index").map(String::as_str) {
            None | Some("") => 0,
            Some(s) => s
                .parse()
                .map_err(|_| ApiError::BadRequest(format!("index {s:?} is not a number")))?,
        };
        let wait = match query.get("wait").map(String::as_str) {
            None | Some("") => Duration::from_secs(300),
            Some(s) => waymark_shared::duration::parse(s)
                .map_err(|e| ApiError::BadRequest(format!("wait: {e}")))?,
        };
        Ok(Blocking {
            index,
            wait: wait.min(max_wait),
        })
    }

    /// Waits until `current()` moves past the client's index, or the wait runs out; returns
    /// the index to report. Index 0 (or an index from the future) returns at once.
    /// A shutdown (`drain`) ends the wait at once.
    pub async fn wait(
        &self,
        mirror: &Mirror,
        drain: &waymark_shared::lifecycle::drain::Watch,
        current: impl Fn() -> u64,
    ) -> u64 {
        // Indexes are reported as at least 1 (Consul's rule), so an empty registry's 1 is a
        // current index, not one from the future.
        let current = || current().max(1);
        if self.index == 0 || self.index > mirror.index().max(1) || drain.is_draining() {
            return current();
        }
        let mut rx = mirror.subscribe();
        let deadline = tokio::time::Instant::now() + self.wait;
        loop {
            let now = current();
            if now > self.index {
                return now;
            }
            tokio::select! {
                changed = tokio::time::timeout_at(deadline, rx.changed()) => match changed {
                    Ok(Ok(())) => continue,
                    _ => return current(),
                },
                _ = drain.signaled() => return current(),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_come_from_headers_or_query() {
        type Headers<'a> = &'a [(&'a str, &'a str)];
        let cases: &[(Headers, Option<&str>, &[&str])] = &[
            (&[], Some("a=1&token=s3"), &["s3"]),
            (&[], Some("token=a%2Fb%20c%2b"), &["a/b c+"]),
            (&[], Some("token=bad%zz"), &[]),
            (&[("x-consul-token", "t1")], None, &["t1"]),
            (&[("authorization", "Bearer t2")], None, &["t2"]),
            (&[("authorization", "bearer t2")], None, &["t2"]),
            (&[("authorization", "Basic dXNlcg==")], None, &[]),
            // user:s3cr:et
            (
                &[("authorization", "Basic dXNlcjpzM2NyOmV0")],
                None,
                &["s3cr:et"],
            ),
            (&[("authorization", "Basic bm9wYXNz!")], None, &[]),
            (
                &[
                    ("authorization", "Basic dXNlcg=="),
                    ("x-consul-token", "t1"),
                ],
                Some("token=q"),
                &["t1", "q"],
            ),
            (
                &[("authorization", "Bearer other"), ("x-consul-token", "t1")],
                None,
                &["other", "t1"],
            ),
        ];
        for (headers, query, want) in cases {
            let mut h = HeaderMap::new();
            for (k, v) in *headers {
                h.append(*k, v.parse().unwrap());
            }
            assert_eq!(presented_tokens(&h, *query), *want, "{headers:?} {query:?}");
        }
        assert!(constant_eq("abc", "abc"));
        assert!(!constant_eq("abc", "abd"));
        assert!(!constant_eq("abc", "ab"));
    }
}
