//! The gateway's web view on its admin listener, at `/ui/`: its routes, and for each one and
//! each instance behind it the request rate, errors and latency, live.
//!
//! This module owns:
//!
//! - the page's assets (`gateway/ui/`, and the stylesheet shared with the resolver's view),
//!   built into the binary, served with their content type, an ETag, `Cache-Control` and a
//!   Content-Security-Policy that allows nothing beyond this listener;
//! - `GET /ui/api/stats`: the view as JSON ([`view`], pure, from the route table, the
//!   mirror and [`crate::traffic`]);
//! - `GET /ui/api/events`: server-sent events, one `stats` event a second. The view is built
//!   at most once a second whatever the number of open pages ([`GatewayView::current`]), so a
//!   page costs one event a second. The stream ends when the gateway shuts down.

use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::get;
use axum::Router;
use futures::{Stream, StreamExt};
use serde::Serialize;
use waymark_shared::webui::{self, Asset};
use waymark_shared::{Health, ServiceView};

use crate::routes::Route;
use crate::traffic::{Sample, Window};
use crate::Shared;

/// The page, its script and its stylesheets.
const ASSETS: &[Asset] = &[
    Asset::new(
        "index.html",
        webui::HTML,
        include_bytes!("../ui/index.html"),
    ),
    Asset::new("app.js", webui::JS, include_bytes!("../ui/app.js")),
    Asset::new("ui.css", webui::CSS, include_bytes!("../ui/ui.css")),
    webui::BASE_CSS,
];

/// How often the view is built and sent.
pub const INTERVAL: Duration = Duration::from_secs(1);

/// A window longer than this is not a rate anyone is looking at: start again from now.
const STALE: Duration = Duration::from_secs(5);

/// The route label of requests that matched no route.
const NO_ROUTE: &str = crate::admission::NO_ROUTE;

/// The view's state: the gateway's, the last view built and the sample it was built from.
pub struct GatewayView {
    shared: Arc<Shared>,
    stop: tokio::sync::watch::Receiver<bool>,
    last: Mutex<Option<Last>>,
}

struct Last {
    at: Instant,
    sample: Sample,
    json: Arc<str>,
}

impl GatewayView {
    pub fn new(shared: Arc<Shared>, stop: tokio::sync::watch::Receiver<bool>) -> GatewayView {
        GatewayView {
            shared,
            stop,
            last: Mutex::new(None),
        }
    }

    /// The view as JSON: the one built less than an interval ago, or a new one whose rates
    /// cover the time since that one.
    pub fn current(&self) -> Arc<str> {
        let mut last = self.last.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        if let Some(l) = last.as_ref() {
            if now.duration_since(l.at) < INTERVAL.mul_f64(0.9) {
                return l.json.clone();
            }
        }
        let sample = self.shared.metrics.traffic.sample();
        let (before, elapsed) = match last.as_ref() {
            Some(l) if now.duration_since(l.at) <= STALE => (&l.sample, now.duration_since(l.at)),
            _ => (&sample, Duration::ZERO),
        };
        let shared = &self.shared;
        let table = shared.routes.load();
        let routes: Vec<&Arc<Route>> = table.routes().collect();
        let out = view(
            &routes,
            |name| shared.mirror.service(name),
            |id| shared.balancer.is_ejected(id, now),
            before,
            &sample,
            elapsed,
            Registry {
                connected: shared.status.connected(),
                index: shared.mirror.index(),
                age_ms: shared
                    .status
                    .since_last_ok()
                    .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX)),
            },
        );
        let json: Arc<str> = match serde_json::to_string(&out) {
            Ok(s) => s.into(),
            Err(e) => {
                tracing::error!(error = %e, "encoding the gateway view failed");
                "{}".into()
            }
        };
        *last = Some(Last {
            at: now,
            sample,
            json: json.clone(),
        });
        json
    }
}

/// The registry link, as the view shows it.
#[derive(Debug, Clone, Serialize)]
pub struct Registry {
    pub connected: bool,
    pub index: u64,
    pub age_ms: Option<u64>,
}

#[derive(Debug, Serialize)]
pub struct ViewOut<'a> {
    pub interval_ms: u64,
    pub registry: Registry,
    pub routes: Vec<RouteOut<'a>>,
    /// Requests that matched no route.
    pub unrouted: Window,
}

#[derive(Debug, Serialize)]
pub struct RouteOut<'a> {
    pub name: &'a str,
    /// `*` when the route takes any host.
    pub host: &'a str,
    pub prefix: &'a str,
    pub header: Option<String>,
    pub service: &'a str,
    /// Tags each backend needs, with its weight when the route splits.
    pub backends: Vec<String>,
    pub from_metadata: bool,
    pub traffic: Window,
    pub instances: Vec<InstanceOut>,
}

/// Owned: the instances come from the mirror's services, looked up as the view is built.
#[derive(Debug, Serialize)]
pub struct InstanceOut {
    pub id: String,
    pub address: String,
    pub port: u16,
    pub health: Health,
    pub draining: bool,
    /// Ejected by outlier detection right now.
    pub ejected: bool,
    /// The instance's requests through every route (an instance behind two routes shows the
    /// same figures under both).
    pub traffic: Window,
}

/// The view: every route by name, each with the instances its backends select; the figures
/// are the differences between `before` and `now`, taken `elapsed` apart.
pub fn view<'a>(
    routes: &[&'a Arc<Route>],
    service: impl Fn(&str) -> Option<Arc<ServiceView>>,
    ejected: impl Fn(&str) -> bool,
    before: &Sample,
    now: &Sample,
    elapsed: Duration,
    registry: Registry,
) -> ViewOut<'a> {
    let window = |b: Option<&crate::traffic::Totals>, n: Option<&crate::traffic::Totals>| {
        n.map_or_else(Window::default, |n| Window::between(b, n, elapsed))
    };
    let mut out: Vec<RouteOut<'a>> = routes
        .iter()
        .map(|r| {
            let instances = service(&r.service)
                .map(|s| {
                    s.instances
                        .iter()
                        .filter(|i| {
                            r.backends
                                .iter()
                                .any(|b| b.tags.iter().all(|t| i.has_tag(t)))
                        })
                        .map(|i| InstanceOut {
                            id: i.id.to_string(),
                            address: i.address.to_string(),
                            port: i.port,
                            health: i.health(),
                            draining: i.draining,
                            ejected: ejected(&i.id),
                            traffic: window(
                                before.instances.get(i.id.as_str()),
                                now.instances.get(i.id.as_str()),
                            ),
                        })
                        .collect::<Vec<_>>()
                })
                .unwrap_or_default();
            RouteOut {
                name: &r.name,
                host: r.host.as_deref().unwrap_or("*"),
                prefix: &r.prefix,
                header: r.header.as_ref().map(|(k, v)| format!("{k}: {v}")),
                service: &r.service,
                backends: r
                    .backends
                    .iter()
                    .map(|b| {
                        let tags = if b.tags.is_empty() {
                            "any instance".to_string()
                        } else {
                            format!("tags {}", b.tags.join(", "))
                        };
                        if r.backends.len() > 1 {
                            format!("{tags} (weight {})", b.weight)
                        } else {
                            tags
                        }
                    })
                    .collect(),
                from_metadata: r.from_metadata,
                traffic: window(before.routes.get(&r.name), now.routes.get(&r.name)),
                instances,
            }
        })
        .collect();
    out.sort_by(|a, b| a.name.cmp(b.name));
    ViewOut {
        interval_ms: INTERVAL.as_millis() as u64,
        registry,
        routes: out,
        unrouted: window(before.routes.get(NO_ROUTE), now.routes.get(NO_ROUTE)),
    }
}

/// The view's routes, on the admin listener.
pub fn router(view: Arc<GatewayView>) -> Router {
    Router::new()
        .route("/ui", get(|| async { Redirect::permanent("/ui/") }))
        .route("/ui/", get(|headers: HeaderMap| async move { asset("", &headers) }))
        .route("/ui/api/stats", get(stats))
        .route("/ui/api/events", get(events))
        .route(
            "/ui/{file}",
            get(|Path(file): Path<String>, headers: HeaderMap| async move {
                asset(&file, &headers)
            }),
        )
        .with_state(view)
}

/// One asset (304 when the browser has this version), or 404.
fn asset(path: &str, headers: &HeaderMap) -> Response {
    let Some(a) = webui::find(ASSETS, path) else {
        return (
            StatusCode::NOT_FOUND,
            format!("no such file in the web view: /ui/{path}\n"),
        )
            .into_response();
    };
    let if_none_match = headers
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok());
    webui::asset_response(a, if_none_match)
        .map(axum::body::Body::from)
        .into_response()
}

/// `GET /ui/api/stats`: the view once.
async fn stats(State(view): State<Arc<GatewayView>>) -> Response {
    let json = view.current();
    let mut resp = (
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        )],
        json.to_string(),
    )
        .into_response();
    let h = resp.headers_mut();
    h.insert(
        header::CACHE_CONTROL,
        HeaderValue::from_static(webui::DATA_CACHE),
    );
    webui::secure(h);
    resp
}

/// `GET /ui/api/events`: a `stats` event at once, then one every [`INTERVAL`], until the
/// gateway stops.
async fn events(
    State(view): State<Arc<GatewayView>>,
) -> Sse<impl Stream<Item = Result<Event, Infallible>>> {
    let mut stop = view.stop.clone();
    let mut ticks = tokio::time::interval(INTERVAL);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let stream = futures::stream::unfold((view, ticks), |(view, mut ticks)| async move {
        ticks.tick().await;
        let event = Event::default().event("stats").data(&*view.current());
        Some((Ok(event), (view, ticks)))
    })
    .take_until(async move {
        let _ = stop.wait_for(|s| *s).await;
    });
    Sse::new(stream).keep_alive(KeepAlive::new().interval(Duration::from_secs(15)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::RouteConfig;
    use crate::traffic::Traffic;
    use waymark_shared::{CheckView, Instance, ServiceAttrs};

    fn route(toml: &str) -> Arc<Route> {
        let c: RouteConfig = toml::from_str(toml).unwrap();
        Arc::new(Route::from_config(&c))
    }

    fn service(name: &str, instances: Vec<Instance>) -> Arc<ServiceView> {
        Arc::new(ServiceView {
            name: name.into(),
            index: 1,
            instances: instances.into_iter().map(Arc::new).collect(),
            attrs: ServiceAttrs::default(),
        })
    }

    #[test]
    fn routes_with_their_instances_and_traffic() {
        let shop = route("name = \"shop\"\nhost = \"shop.test\"\npath = \"/shop\"\nservice = \"shop\"\ntags = [\"v2\"]");
        let any = route("path = \"/\"\nservice = \"web\"");
        let mut v1 = Instance::new("shop", "shop-1", "10.0.0.1", 80);
        v1.tags = vec!["v1".into()];
        let mut v2 = Instance::new("shop", "shop-2", "10.0.0.2", 80);
        v2.tags = vec!["v2".into()];
        v2.checks = vec![CheckView {
            id: "c".into(),
            name: "c".into(),
            kind: "http".into(),
            status: Health::Warning,
            output: String::new(),
            notes: String::new(),
        }];
        let services = [service("shop", vec![v1, v2])];
        let traffic = Traffic::default();
        let before = traffic.sample();
        for _ in 0..10 {
            traffic.record("shop", Some("shop-2"), 200, Duration::from_millis(2));
        }
        traffic.record("shop", Some("shop-2"), 502, Duration::from_millis(2));
        traffic.record(NO_ROUTE, None, 404, Duration::from_millis(1));
        let now = traffic.sample();
        let routes = [&any, &shop];
        let out = view(
            &routes,
            |name| services.iter().find(|s| s.name == name).cloned(),
            |id| id == "shop-2",
            &before,
            &now,
            Duration::from_secs(2),
            Registry {
                connected: true,
                index: 7,
                age_ms: Some(3),
            },
        );
        let v = serde_json::to_value(&out).unwrap();
        assert_eq!(v["interval_ms"], 1000);
        assert_eq!(v["registry"]["index"], 7);
        assert_eq!(v["unrouted"]["requests"], 1);
        let names: Vec<&str> = out.routes.iter().map(|r| r.name).collect();
        assert_eq!(names, vec!["*/", "shop"], "by name");
        let any = &v["routes"][0];
        assert_eq!(any["host"], "*");
        assert_eq!(
            any["instances"],
            serde_json::json!([]),
            "web has no instance"
        );
        assert_eq!(any["traffic"]["requests"], 0);
        let shop = &v["routes"][1];
        assert_eq!(shop["host"], "shop.test");
        assert_eq!(shop["prefix"], "/shop");
        assert_eq!(shop["backends"], serde_json::json!(["tags v2"]));
        assert_eq!(shop["traffic"]["requests"], 11);
        assert_eq!(shop["traffic"]["errors"], 1);
        assert_eq!(shop["traffic"]["rps"], 5.5);
        assert_eq!(shop["traffic"]["p99_ms"], 2.0);
        let instances = shop["instances"].as_array().unwrap();
        assert_eq!(
            instances.len(),
            1,
            "only the v2 instance is behind the route"
        );
        assert_eq!(instances[0]["id"], "shop-2");
        assert_eq!(instances[0]["health"], "warning");
        assert_eq!(instances[0]["ejected"], true);
        assert_eq!(instances[0]["traffic"]["requests"], 11);
    }

    #[test]
    fn built_at_most_once_an_interval_for_every_page() {
        let shared = Arc::new(Shared::new(crate::config::Config::default(), None));
        let (_stop, stopped) = tokio::sync::watch::channel(false);
        let view = GatewayView::new(shared.clone(), stopped);
        let first = view.current();
        let again = view.current();
        assert!(
            Arc::ptr_eq(&first, &again),
            "the same view within an interval"
        );
        let v: serde_json::Value = serde_json::from_str(&first).unwrap();
        assert_eq!(v["routes"], serde_json::json!([]));
        assert_eq!(v["unrouted"]["rps"], 0.0, "no interval yet: no rate");
        // An interval later, a new view whose rates cover it.
        shared
            .metrics
            .traffic
            .record(NO_ROUTE, None, 404, Duration::from_millis(1));
        // As if the last view had been built an interval ago (no waiting in a unit test).
        if let Some(l) = view.last.lock().unwrap().as_mut() {
            l.at = l.at.checked_sub(INTERVAL).expect("a second ago");
        }
        let next = view.current();
        assert!(!Arc::ptr_eq(&first, &next));
        let v: serde_json::Value = serde_json::from_str(&next).unwrap();
        assert_eq!(v["unrouted"]["requests"], 1);
        assert!(v["unrouted"]["rps"].as_f64().unwrap() > 0.0);
    }

    #[test]
    fn every_asset_is_served_with_its_type_and_policy() {
        for a in ASSETS {
            let path = if a.name == "index.html" { "" } else { a.name };
            let resp = asset(path, &HeaderMap::new());
            assert_eq!(resp.status(), StatusCode::OK, "{}", a.name);
            let h = resp.headers();
            assert_eq!(h[header::CONTENT_TYPE], a.content_type);
            assert_eq!(h[header::CONTENT_SECURITY_POLICY], webui::CSP);
            let mut again = HeaderMap::new();
            again.insert(header::IF_NONE_MATCH, h[header::ETAG].clone());
            assert_eq!(asset(a.name, &again).status(), StatusCode::NOT_MODIFIED);
            let text = std::str::from_utf8(a.body).unwrap();
            let found = webui::foreign_references(text);
            assert!(found.is_empty(), "{} contains {found:?}", a.name);
        }
        assert_eq!(
            asset("x.js", &HeaderMap::new()).status(),
            StatusCode::NOT_FOUND
        );
    }
}
