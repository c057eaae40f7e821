//! The admin listener and the gateway's metrics.
//!
//! - `GET /metrics`: Prometheus text format: requests by route and status, latency by
//!   route, retries, outlier ejections, rate-limited requests, client errors, client
//!   connections open and refused, and the registry link.
//! - `GET /healthz/live`: 200 while the process serves.
//! - `GET /healthz/ready`: 200 once the gateway has received the registry's state, and while
//!   it keeps serving that state; the JSON body says whether the registry is reachable right
//!   now and how old the state is. 503 before the first state arrives.
//! - `/ui/`: the web view ([`crate::ui`]).

use std::sync::atomic::AtomicU64;
use std::sync::{Arc, RwLock};

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use dashmap::DashMap;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

use waymark_shared::follow::RegistryStatus;

use crate::FastHash;

#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error("admin listener: {0}")]
    Io(#[from] std::io::Error),
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteStatus {
    pub route: String,
    /// Encoded as its digits, as a string label would be.
    pub status: u16,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteLabel {
    pub route: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ServiceLabel {
    pub service: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct LimitLabel {
    pub route: String,
    /// `client` or `route`.
    pub scope: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabel {
    /// `bad_request` (refused by the gateway) or `aborted` (the client went away mid-request).
    pub reason: &'static str,
}

/// Every metric the gateway exports.
pub struct Metrics {
    registry: Registry,
    pub requests: Family<RouteStatus, Counter>,
    pub duration: Family<RouteLabel, Histogram>,
    pub retries: Family<RouteLabel, Counter>,
    pub ejections: Family<ServiceLabel, Counter>,
    pub rate_limited: Family<LimitLabel, Counter>,
    pub client_errors: Family<ReasonLabel, Counter>,
    pub in_flight: Gauge,
    pub routes: Gauge,
    pub registry_connected: Gauge,
    pub registry_index: Gauge,
    pub registry_age_ms: Gauge,
    pub certificates: Gauge,
    pub connections: Gauge,
    pub connections_refused: Counter,
    /// Per route and per instance, for the web view (not exported to Prometheus: instance
    /// IDs would make its series unbounded).
    pub traffic: crate::traffic::Traffic,
    /// Each route's series, by route name.
    by_route: DashMap<String, Arc<RouteMetrics>, FastHash>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

/// One route's Prometheus series, looked up by name once and then counted into directly:
/// a request's end costs one map lookup by a borrowed name instead of two labelled lookups
/// (each hashing an owned label set).
pub struct RouteMetrics {
    route: String,
    duration: Histogram,
    retries: Counter,
    /// By status, added on first use (a route answers with a handful of statuses).
    statuses: RwLock<Vec<(u16, Counter)>>,
    requests: Family<RouteStatus, Counter>,
}

impl RouteMetrics {
    pub fn route(&self) -> &str {
        &self.route
    }

    /// A try after the first.
    pub fn retried(&self) {
        self.retries.inc();
    }

    fn done(&self, status: u16, elapsed: std::time::Duration) {
        self.duration.observe(elapsed.as_secs_f64());
        let known = {
            let statuses = self.statuses.read().unwrap_or_else(|p| p.into_inner());
            statuses
                .iter()
                .find(|(s, _)| *s == status)
                .map(|(_, c)| c.inc())
        };
        if known.is_none() {
            let counter = self
                .requests
                .get_or_create(&RouteStatus {
                    route: self.route.clone(),
                    status,
                })
                .clone();
            counter.inc();
            let mut statuses = self.statuses.write().unwrap_or_else(|p| p.into_inner());
            if !statuses.iter().any(|(s, _)| *s == status) {
                statuses.push((status, counter));
            }
        }
    }
}

impl Metrics {
    /// The series of the route named `route`, made on first use and kept while the route is
    /// in the table ([`Metrics::retain_routes`]). A request still holding the handle of a
    /// route just removed counts into its removed series (a status that route had not
    /// answered before would add one series back, until the process restarts).
    pub fn route(&self, route: &str) -> Arc<RouteMetrics> {
        if let Some(m) = self.by_route.get(route) {
            return m.clone();
        }
        let label = RouteLabel {
            route: route.to_string(),
        };
        let metrics = Arc::new(RouteMetrics {
            duration: self.duration.get_or_create(&label).clone(),
            retries: self.retries.get_or_create(&label).clone(),
            statuses: RwLock::new(Vec::new()),
            requests: self.requests.clone(),
            route: label.route,
        });
        self.by_route
            .entry(route.to_string())
            .or_insert(metrics)
            .clone()
    }

    /// Forgets the series of routes that are gone (`keep` false), so that routes which come
    /// and go with registrations do not pile up series; a route that comes back starts
    /// from zero, which Prometheus reads as a counter reset.
    pub fn retain_routes(&self, keep: impl Fn(&str) -> bool) {
        self.by_route.retain(|name, metrics| {
            if keep(name) {
                return true;
            }
            let statuses = metrics.statuses.read().unwrap_or_else(|p| p.into_inner());
            for (status, _) in statuses.iter() {
                self.requests.remove(&RouteStatus {
                    route: name.clone(),
                    status: *status,
                });
            }
            let label = RouteLabel {
                route: name.clone(),
            };
            self.duration.remove(&label);
            self.retries.remove(&label);
            false
        });
    }

    /// Counts a finished request and its duration under its route and the instance that
    /// answered it last.
    pub fn request_done(
        &self,
        route: &RouteMetrics,
        instance: Option<&str>,
        status: u16,
        elapsed: std::time::Duration,
    ) {
        self.traffic
            .record(route.route(), instance, status, elapsed);
        route.done(status, elapsed);
    }

    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("waymark_gateway");
        let requests = Family::<RouteStatus, Counter>::default();
        registry.register(
            "requests",
            "Requests answered, by route and status (route \"-\": none matched)",
            requests.clone(),
        );
        let duration = Family::<RouteLabel, Histogram>::new_with_constructor(|| {
            Histogram::new(exponential_buckets(0.0005, 2.0, 16))
        });
        registry.register(
            "request_duration_seconds",
            "Time from request to the end of the response, by route",
            duration.clone(),
        );
        let retries = Family::<RouteLabel, Counter>::default();
        registry.register(
            "retries",
            "Tries after the first, by route",
            retries.clone(),
        );
        let ejections = Family::<ServiceLabel, Counter>::default();
        registry.register(
            "outlier_ejections",
            "Instances ejected after consecutive failures, by service",
            ejections.clone(),
        );
        let rate_limited = Family::<LimitLabel, Counter>::default();
        registry.register(
            "rate_limited",
            "Requests refused with 429, by route and limit",
            rate_limited.clone(),
        );
        let client_errors = Family::<ReasonLabel, Counter>::default();
        registry.register(
            "client_errors",
            "Requests that failed by the client's fault, by reason; never counted against instances",
            client_errors.clone(),
        );
        let in_flight = Gauge::default();
        registry.register(
            "in_flight_requests",
            "Requests being proxied",
            in_flight.clone(),
        );
        let routes = Gauge::default();
        registry.register("routes", "Routes in the table", routes.clone());
        let registry_connected = Gauge::default();
        registry.register(
            "registry_connected",
            "1 while the registry answers the change stream, 0 while the gateway serves its last good state",
            registry_connected.clone(),
        );
        let registry_index = Gauge::default();
        registry.register(
            "registry_index",
            "The registry change index the gateway has applied",
            registry_index.clone(),
        );
        let registry_age_ms = Gauge::default();
        registry.register(
            "registry_state_age_milliseconds",
            "Time since the registry last answered (-1 before it ever did)",
            registry_age_ms.clone(),
        );
        let certificates = Gauge::default();
        registry.register(
            "tls_certificates",
            "Server names with a loaded certificate",
            certificates.clone(),
        );
        let connections = Gauge::default();
        registry.register(
            "connections",
            "Client connections open",
            connections.clone(),
        );
        let connections_refused = Counter::default();
        registry.register(
            "connections_refused",
            "Client connections closed at once because limits.max_connections were open",
            connections_refused.clone(),
        );
        Metrics {
            registry,
            requests,
            duration,
            retries,
            ejections,
            rate_limited,
            client_errors,
            in_flight,
            routes,
            registry_connected,
            registry_index,
            registry_age_ms,
            certificates,
            connections,
            connections_refused,
            traffic: Default::default(),
            by_route: DashMap::default(),
        }
    }

    pub fn encode(&self) -> String {
        let mut out = String::new();
        if prometheus_client::encoding::text::encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }
}

/// What the admin handlers read.
pub struct AdminState {
    pub metrics: Arc<Metrics>,
    pub status: Arc<RegistryStatus>,
    pub mirror: Arc<waymark_shared::Mirror>,
    pub routes: Arc<AtomicU64>,
    pub view: Arc<crate::ui::GatewayView>,
}

fn refresh(s: &AdminState) {
    s.metrics
        .registry_connected
        .set(i64::from(s.status.connected()));
    s.metrics.registry_index.set(s.mirror.index() as i64);
    s.metrics.registry_age_ms.set(
        s.status
            .since_last_ok()
            .map_or(-1, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX)),
    );
}

async fn metrics(State(s): State<Arc<AdminState>>) -> Response {
    refresh(&s);
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        s.metrics.encode(),
    )
        .into_response()
}

async fn live() -> &'static str {
    "live\n"
}

async fn ready(State(s): State<Arc<AdminState>>) -> Response {
    refresh(&s);
    let synced = s.status.synced();
    let body = serde_json::json!({
        "ready": synced,
        "registry": if s.status.connected() { "connected" } else { "unreachable" },
        "state_age_ms": s.status.since_last_ok().map(|d| d.as_millis() as u64),
        "index": s.mirror.index(),
        "services": s.mirror.service_count(),
        "routes": s.routes.load(std::sync::atomic::Ordering::Relaxed),
        "last_error": if s.status.connected() { None } else { s.status.last_error() },
    });
    let code = if synced {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (code, axum::Json(body)).into_response()
}

pub fn router(state: Arc<AdminState>) -> Router {
    let view = crate::ui::router(state.view.clone());
    Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz/live", get(live))
        .route("/healthz/ready", get(ready))
        .with_state(state)
        .merge(view)
}

/// Serves the admin API on an already bound listener until `stop` turns true.
pub async fn serve(
    listener: std::net::TcpListener,
    state: Arc<AdminState>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) -> Result<(), AdminError> {
    listener.set_nonblocking(true)?;
    let listener = tokio::net::TcpListener::from_std(listener)?;
    axum::serve(listener, router(state))
        .with_graceful_shutdown(async move {
            let _ = stop.wait_for(|s| *s).await;
        })
        .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metrics_encode_with_labels() {
        let m = Metrics::new();
        m.requests
            .get_or_create(&RouteStatus {
                route: "api.test/pay".into(),
                status: 200,
            })
            .inc();
        m.duration
            .get_or_create(&RouteLabel {
                route: "api.test/pay".into(),
            })
            .observe(0.002);
        let text = m.encode();
        assert!(
            text.contains(
                "waymark_gateway_requests_total{route=\"api.test/pay\",status=\"200\"} 1"
            ),
            "{text}"
        );
        assert!(text.contains("waymark_gateway_request_duration_seconds_bucket"));
        assert!(text.contains("waymark_gateway_registry_connected"));
    }

    /// Requests counted through a route's handles land in the same series as the labelled
    /// families, whichever handle counted them, and each status in its own series.
    #[test]
    fn route_handles_count_into_the_labelled_series() {
        let m = Metrics::new();
        let ms = std::time::Duration::from_millis(1);
        let (shop, again) = (m.route("shop"), m.route("shop"));
        m.request_done(&shop, Some("shop-1"), 200, ms);
        m.request_done(&again, Some("shop-2"), 200, ms);
        m.request_done(&shop, Some("shop-2"), 502, ms);
        m.request_done(&m.route("-"), None, 404, ms);
        shop.retried();
        let text = m.encode();
        let table = [
            "waymark_gateway_requests_total{route=\"shop\",status=\"200\"} 2",
            "waymark_gateway_requests_total{route=\"shop\",status=\"502\"} 1",
            "waymark_gateway_requests_total{route=\"-\",status=\"404\"} 1",
            "waymark_gateway_request_duration_seconds_count{route=\"shop\"} 3",
            "waymark_gateway_retries_total{route=\"shop\"} 1",
        ];
        for line in table {
            assert!(text.contains(line), "{line} in\n{text}");
        }
        let sample = m.traffic.sample();
        assert_eq!(sample.routes["shop"].requests, 3);
        assert_eq!(sample.routes["shop"].errors, 1);
        assert_eq!(sample.instances["shop-2"].requests, 2);

        // The route goes away: its series go with it; "-" stays. Back, it starts afresh.
        m.retain_routes(|r| r == "-");
        let text = m.encode();
        assert!(!text.contains("route=\"shop\""), "{text}");
        assert!(text.contains("route=\"-\",status=\"404\"} 1"), "{text}");
        m.request_done(&m.route("shop"), None, 200, ms);
        let text = m.encode();
        assert!(
            text.contains("waymark_gateway_requests_total{route=\"shop\",status=\"200\"} 1"),
            "{text}"
        );
    }
}
