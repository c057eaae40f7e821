//! The resolver's web view at `/ui/`: a page that shows every service, its instances, their
//! checks and DNS names, and follows the change stream live.
//!
//! This module owns:
//!
//! - the page's assets (`resolver/ui/`, and the stylesheet shared with the gateway's view),
//!   built into the binary and served with their content type, an ETag, `Cache-Control`
//!   and a Content-Security-Policy that allows nothing beyond this listener;
//! - `GET /ui/api/snapshot`: the whole picture as JSON ([`snapshot`], pure), its services
//!   encoded once per change index and shared by every open page; the registry's state
//!   (source, etcd's reachability and age) is added per request. It is a read of the
//!   registry, so it takes the API token when `api.token_for_reads` is set.
//!
//! The page opens `/v1/waymark/events` (server-sent events, [`super::stream`]) and fetches
//! the snapshot again after each event, so an open page costs one stream and one fetch per
//! change, however many services there are. Its actions (maintenance on and off,
//! deregistration) are the agent API's own endpoints, with the token the operator gives the
//! page.

pub mod snapshot;

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, HeaderValue};
use axum::middleware;
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::get;
use axum::Router;
use bytes::{BufMut, Bytes, BytesMut};
use serde::Serialize;
use waymark_shared::webui::{self, Asset};

use super::encoded::Kind;
use super::{ApiError, ApiState};
use snapshot::Naming;

/// The page, its script and its stylesheets.
const ASSETS: &[Asset] = &[
    Asset::new(
        "index.html",
        webui::HTML,
        include_bytes!("../../../ui/index.html"),
    ),
    Asset::new("app.js", webui::JS, include_bytes!("../../../ui/app.js")),
    Asset::new("ui.css", webui::CSS, include_bytes!("../../../ui/ui.css")),
    webui::BASE_CSS,
];

/// The view's routes: the assets and the snapshot (guarded as a registry read).
pub fn router(state: Arc<ApiState>) -> Router<Arc<ApiState>> {
    let data = Router::new()
        .route("/ui/api/snapshot", get(snapshot_handler))
        .layer(middleware::from_fn_with_state(state, super::authorize));
    Router::new()
        .route("/ui", get(|| async { Redirect::permanent("/ui/") }))
        .route("/ui/", get(|headers: HeaderMap| async move { asset("", &headers) }))
        .route(
            "/ui/{file}",
            get(|Path(file): Path<String>, headers: HeaderMap| async move {
                asset(&file, &headers)
            }),
        )
        .merge(data)
}

/// One asset, or 304 when the browser has this version, or 404.
fn asset(path: &str, headers: &HeaderMap) -> Response {
    match webui::find(ASSETS, path) {
        Some(a) => serve_asset(a, headers),
        None => {
            ApiError::NotFound(format!("no such file in the web view: /ui/{path}")).into_response()
        }
    }
}

/// An asset with its content type, validator and the view's security headers (only the
/// view's responses carry the page's policy).
fn serve_asset(a: &Asset, headers: &HeaderMap) -> Response {
    let if_none_match = headers
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok());
    webui::asset_response(a, if_none_match)
        .map(axum::body::Body::from)
        .into_response()
}

/// Where the registry the view shows comes from, and how current it is.
#[derive(Debug, Serialize)]
struct RegistryState {
    /// `embedded`, or `etcd`.
    source: &'static str,
    zone: String,
    /// Writes (the view's actions) need the API token.
    token_required: bool,
    /// Reads (this snapshot, the change stream) need it too.
    token_for_reads: bool,
    /// With etcd: whether it answers now, and how long ago it last did.
    #[serde(skip_serializing_if = "Option::is_none")]
    connected: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    age_ms: Option<u64>,
    /// What is wrong with the source, if anything (DNS answers the last state it had).
    problems: Vec<String>,
}

fn registry_state(state: &ApiState) -> RegistryState {
    let api = &state.config.api;
    let etcd = state.etcd.as_deref();
    RegistryState {
        source: if etcd.is_some() { "etcd" } else { "embedded" },
        zone: state.config.dns.zone.trim_end_matches('.').to_string(),
        token_required: api.token.is_some(),
        token_for_reads: api.token_for_reads,
        connected: etcd.map(|l| l.follow.connected()),
        age_ms: etcd
            .and_then(|l| l.follow.since_last_ok())
            .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX)),
        problems: etcd.map(|l| l.degraded()).unwrap_or_default(),
    }
}

/// `GET /ui/api/snapshot`: `{"index", "registry", "services"}`.
async fn snapshot_handler(State(state): State<Arc<ApiState>>) -> Result<Response, ApiError> {
    // Read before the services, so that what is filed under an index is never older.
    let index = state.mirror.index();
    let services = {
        let (mirror, local, config) = (
            state.mirror.clone(),
            state.local.clone(),
            state.config.clone(),
        );
        state
            .encoded
            .get(Kind::UiServices, index, move || {
                let naming = Naming::new(
                    &config.dns.zone,
                    config
                        .dns
                        .consul_names
                        .then_some(config.dns.consul_domain.as_str()),
                );
                let views = mirror.services();
                let out = snapshot::services(&views, &naming, |i| {
                    local.instance(&i.service, &i.id).is_some()
                });
                serde_json::to_vec(&out).unwrap_or_else(|e| {
                    tracing::error!(error = %e, "encoding the web view's services failed");
                    b"[]".to_vec()
                })
            })
            .await
    };
    let registry = serde_json::to_vec(&registry_state(&state))
        .map_err(|e| ApiError::Internal(format!("encoding the registry state: {e}")))?;
    let body = assemble(index, &registry, &services);
    let mut resp = (
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        )],
        body,
    )
        .into_response();
    let h = resp.headers_mut();
    h.insert(
        header::CACHE_CONTROL,
        HeaderValue::from_static(webui::DATA_CACHE),
    );
    if let Ok(v) = HeaderValue::from_str(&index.max(1).to_string()) {
        h.insert("X-Consul-Index", v);
    }
    webui::secure(h);
    Ok(resp)
}

/// `{"index":…,"registry":…,"services":…}` from parts already encoded (the services are
/// shared by every reader at this index; only the small registry part is per request).
fn assemble(index: u64, registry: &[u8], services: &[u8]) -> Bytes {
    let mut out = BytesMut::with_capacity(services.len() + registry.len() + 48);
    out.put_slice(b"{\"index\":");
    out.put_slice(index.max(1).to_string().as_bytes());
    out.put_slice(b",\"registry\":");
    out.put_slice(registry);
    out.put_slice(b",\"services\":");
    out.put_slice(services);
    out.put_slice(b"}");
    out.freeze()
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::StatusCode;

    #[test]
    fn assembled_snapshot_is_json() {
        let body = assemble(0, br#"{"source":"embedded"}"#, br#"[{"name":"web"}]"#);
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v["index"], 1, "indexes are reported as at least 1");
        assert_eq!(v["registry"]["source"], "embedded");
        assert_eq!(v["services"][0]["name"], "web");
    }

    #[test]
    fn every_asset_is_served_with_its_type_and_policy() {
        for a in ASSETS {
            let resp = asset(
                if a.name == "index.html" { "" } else { a.name },
                &HeaderMap::new(),
            );
            assert_eq!(resp.status(), StatusCode::OK, "{}", a.name);
            let h = resp.headers();
            assert_eq!(h[header::CONTENT_TYPE], a.content_type);
            assert_eq!(h[header::CACHE_CONTROL], webui::ASSET_CACHE);
            assert_eq!(h[header::CONTENT_SECURITY_POLICY], webui::CSP);
            let mut again = HeaderMap::new();
            again.insert(header::IF_NONE_MATCH, h[header::ETAG].clone());
            assert_eq!(
                asset(a.name, &again).status(),
                StatusCode::NOT_MODIFIED,
                "{}",
                a.name
            );
        }
        assert_eq!(
            asset("nope.js", &HeaderMap::new()).status(),
            StatusCode::NOT_FOUND
        );
    }

    #[test]
    fn the_page_loads_nothing_from_elsewhere() {
        for a in ASSETS {
            let text = std::str::from_utf8(a.body).unwrap();
            let found = webui::foreign_references(text);
            assert!(
                found.is_empty(),
                "{} contains {found:?}: the page must load only from this listener",
                a.name
            );
        }
    }
}
