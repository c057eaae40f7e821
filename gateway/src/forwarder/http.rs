//! HTTP mode: one instance per request.
//!
//! The client speaks HTTP/1.1 or HTTP/2 with prior knowledge (h2c), told apart by the
//! connection preface; instances are called over HTTP/1.1 through one pooled client, whose
//! connections to instances on other hosts are streams through their forwarders. Each
//! request is balanced over the instances the shared selection serves on the listener's
//! port (the balancer's two choices). A try that cannot connect, fails on the way, times out
//! (`http.per_try_timeout`) or answers 502/503/504 is retried on another instance when the
//! request is idempotent (GET, HEAD, OPTIONS, PUT, DELETE) and has no body, within
//! `retry.attempts` and the retry budget (a failed connect, which the instance never saw,
//! spends none); the failure counts for outlier ejection, and a refused connect ejects at
//! once. `traceparent` is continued with a new span ID (or a trace
//! is started), and hop-by-hop headers are not passed on.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{HeaderName, HeaderValue, HOST};
use http::{Method, Request, Response, StatusCode, Uri};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::{Body as _, Incoming};
use hyper_util::client::legacy::Client as LegacyClient;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::TcpStream;
use waymark_shared::lifecycle::drain;

use super::listeners::Target;
use super::metrics::ServiceStatus;
use super::upstream::{Connector, UpstreamError, Upstreams};
use super::{Forwarder, Metrics};
use crate::balancer::{InFlight, Verdict};
use crate::headers;

pub type Body = BoxBody<Bytes, hyper::Error>;

/// The pooled client to instances (directly, or as streams through other hosts'
/// forwarders: see [`upstream`](super::upstream)).
pub type Client = LegacyClient<Connector, Body>;

pub fn client(upstreams: Arc<Upstreams>) -> Client {
    LegacyClient::builder(TokioExecutor::new())
        .pool_idle_timeout(Duration::from_secs(30))
        .pool_timer(TokioTimer::new())
        .build(Connector(upstreams))
}

/// Serves one client connection until it closes, is idle too long, or the drain asks it
/// to finish (HTTP/2: GOAWAY; HTTP/1.1: close after the request in flight).
pub async fn serve(
    fwd: &std::sync::Arc<Forwarder>,
    target: &std::sync::Arc<Target>,
    stream: TcpStream,
    peer: SocketAddr,
    drain: &drain::Watch,
) {
    let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(fwd.config.http.idle_timeout);
    builder
        .http2()
        .timer(TokioTimer::new())
        .keep_alive_interval(Some(fwd.config.http.idle_timeout));
    let (fwd2, target2) = (fwd.clone(), target.clone());
    let service = hyper::service::service_fn(move |req: Request<Incoming>| {
        let (fwd, target) = (fwd2.clone(), target2.clone());
        async move { Ok::<_, Infallible>(handle(&fwd, &target, peer, req).await) }
    });
    let conn = builder.serve_connection(TokioIo::new(stream), service);
    tokio::pin!(conn);
    tokio::select! {
        r = conn.as_mut() => {
            if let Err(e) = r {
                tracing::debug!(%peer, error = %e, "client connection ended");
            }
            return;
        }
        _ = drain.signaled() => {}
    }
    conn.as_mut().graceful_shutdown();
    let _ = conn.await;
}

fn error_response(status: StatusCode, message: &str) -> Response<Body> {
    let mut resp = Response::new(
        Full::new(Bytes::from(format!("{message}\n")))
            .map_err(|never| match never {})
            .boxed(),
    );
    *resp.status_mut() = status;
    resp.headers_mut()
        .insert("content-type", HeaderValue::from_static("text/plain"));
    resp
}

fn empty() -> Body {
    Empty::new().map_err(|never| match never {}).boxed()
}

/// Whether a request may be sent again: an idempotent method and no body.
fn retryable(method: &Method, body_empty: bool) -> bool {
    body_empty
        && matches!(
            *method,
            Method::GET | Method::HEAD | Method::OPTIONS | Method::PUT | Method::DELETE
        )
}

/// An answer that another instance may do better with.
fn retry_status(status: StatusCode) -> bool {
    matches!(status.as_u16(), 502..=504)
}

/// Removes hop-by-hop headers (and those `Connection` names).
fn strip_hop_by_hop(headers: &mut http::HeaderMap, response: bool) {
    if !headers::any_hop_by_hop(headers.keys().map(HeaderName::as_str))
        && !headers.contains_key(http::header::TRANSFER_ENCODING)
    {
        return;
    }
    let connection = headers
        .get(http::header::CONNECTION)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let names = if response {
        headers::response_hop_by_hop(connection.as_deref(), false)
    } else {
        let te = headers
            .get(http::header::TE)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        headers::request_hop_by_hop(connection.as_deref(), te.as_deref(), false)
    };
    for n in names {
        headers.remove(n.as_str());
    }
    // The framing is the sending side's own.
    headers.remove(http::header::TRANSFER_ENCODING);
}

async fn handle(
    fwd: &Forwarder,
    target: &Target,
    peer: SocketAddr,
    req: Request<Incoming>,
) -> Response<Body> {
    let started = Instant::now();
    let label = Metrics::service(&target.service);
    fwd.retry_budget.deposit();
    let (mut parts, body) = req.into_parts();
    let can_retry = retryable(&parts.method, body.is_end_stream());
    let mut body = Some(body.boxed());
    // An HTTP/2 client names the authority in the URI; HTTP/1.1 instances want Host.
    if !parts.headers.contains_key(HOST) {
        if let Some(a) = parts.uri.authority() {
            if let Ok(v) = HeaderValue::from_str(a.as_str()) {
                parts.headers.insert(HOST, v);
            }
        }
    }
    strip_hop_by_hop(&mut parts.headers, false);
    let trace = headers::traceparent(
        parts
            .headers
            .get("traceparent")
            .and_then(|v| v.to_str().ok()),
        || fastrand::u64(..),
    );
    if let Ok(v) = HeaderValue::from_str(trace.header_value()) {
        parts.headers.insert("traceparent", v);
    }
    let path = parts
        .uri
        .path_and_query()
        .map_or("/", |p| p.as_str())
        .to_string();
    let mut avoid: Vec<String> = Vec::new();
    let mut tries = 0u32;
    let mut last_error = String::new();
    // Whether the last try failed before the instance got the request (a failed connect):
    // trying another then puts no extra load anywhere, so it spends no retry budget.
    let mut never_sent = false;
    let response = loop {
        let Some(view) = fwd.mirror.service(&target.service) else {
            break error_response(StatusCode::SERVICE_UNAVAILABLE, "no such service");
        };
        let pick = match fwd.balancer.pick_where(
            &view,
            target.tags(),
            |i| i.port == target.port,
            &avoid,
            Instant::now(),
            fastrand::f64,
        ) {
            Ok(p) => p,
            Err(e) => {
                fwd.metrics.no_instance.get_or_create(&label).inc();
                let message = if last_error.is_empty() {
                    e.to_string()
                } else {
                    last_error.clone()
                };
                let status = if tries == 0 {
                    StatusCode::SERVICE_UNAVAILABLE
                } else {
                    StatusCode::BAD_GATEWAY
                };
                break error_response(status, &message);
            }
        };
        // A retry, once there is another instance to try: within the budget.
        if tries > 0 {
            if !never_sent && !fwd.retry_budget.try_spend() {
                break error_response(StatusCode::BAD_GATEWAY, &last_error);
            }
            fwd.metrics.retries.get_or_create(&label).inc();
        }
        tries += 1;
        let id = pick.instance.id.to_string();
        let uri = match Uri::builder()
            .scheme("http")
            .authority(pick.addr.to_string())
            .path_and_query(path.as_str())
            .build()
        {
            Ok(u) => u,
            Err(e) => break error_response(StatusCode::BAD_REQUEST, &e.to_string()),
        };
        let mut upstream = Request::new(body.take().unwrap_or_else(empty));
        *upstream.method_mut() = parts.method.clone();
        *upstream.uri_mut() = uri;
        *upstream.headers_mut() = parts.headers.clone();
        let result = tokio::time::timeout(
            fwd.config.http.per_try_timeout,
            fwd.http_client.request(upstream),
        )
        .await;
        let now = Instant::now();
        never_sent = matches!(&result, Ok(Err(e)) if e.is_connect());
        let failure = match result {
            Ok(Ok(resp)) if !(retry_status(resp.status()) && can_retry) => {
                if resp.status().is_server_error() {
                    note_failure(fwd, target, &view, &id, false, now);
                } else {
                    fwd.balancer.success(&id);
                }
                let (mut rparts, rbody) = resp.into_parts();
                strip_hop_by_hop(&mut rparts.headers, true);
                // The instance counts this request as outstanding until the body is done.
                let tracked = Tracked {
                    body: rbody,
                    _inflight: pick,
                };
                break Response::from_parts(rparts, tracked.boxed());
            }
            Ok(Ok(resp)) => {
                note_failure(fwd, target, &view, &id, false, now);
                format!("instance {id} answered {}", resp.status())
            }
            Ok(Err(e)) => {
                let cause = UpstreamError::find(&e);
                if let Some(refusal) = cause.filter(|u| u.is_refusal()) {
                    // The instance's host does not let this host call it: no fault of the
                    // instance, and the same answer from any of that host's instances.
                    break error_response(StatusCode::FORBIDDEN, &refusal.to_string());
                }
                let hard = cause.map_or(e.is_connect(), UpstreamError::ejects);
                note_failure(fwd, target, &view, &id, hard, now);
                if e.is_connect() {
                    fwd.metrics.connect_failures.get_or_create(&label).inc();
                }
                match cause {
                    Some(u) => format!("instance {id}: {u}"),
                    None => format!("instance {id}: {e}"),
                }
            }
            Err(_) => {
                note_failure(fwd, target, &view, &id, false, now);
                format!("instance {id} did not answer within the per-try timeout")
            }
        };
        tracing::debug!(service = %target.service, instance = %id, error = %failure, "try failed");
        last_error = failure;
        drop(pick);
        if !(can_retry && tries < fwd.config.retry.attempts) {
            break error_response(StatusCode::BAD_GATEWAY, &last_error);
        }
        avoid.push(id);
    };
    fwd.metrics
        .requests
        .get_or_create(&ServiceStatus {
            service: target.service.clone(),
            status: response.status().as_str().to_string(),
        })
        .inc();
    tracing::debug!(
        target: "access",
        %peer,
        service = %target.service,
        method = %parts.method,
        path = %path,
        status = response.status().as_u16(),
        tries,
        trace_id = trace.trace_id(),
        ms = started.elapsed().as_millis() as u64,
        "http"
    );
    response
}

/// An instance's response body, which keeps the request counted against the instance (for
/// the balancer's least-outstanding choice) until it is read to the end or dropped.
struct Tracked {
    body: Incoming,
    _inflight: InFlight,
}

impl hyper::body::Body for Tracked {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Bytes>, hyper::Error>>> {
        std::pin::Pin::new(&mut self.get_mut().body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.body.size_hint()
    }
}

fn note_failure(
    fwd: &Forwarder,
    target: &Target,
    view: &waymark_shared::ServiceView,
    id: &str,
    hard: bool,
    now: Instant,
) {
    let verdict = if hard {
        fwd.balancer.hard_failure(view, id, now)
    } else {
        fwd.balancer.failure(view, id, now)
    };
    if let Verdict::Ejected(d) = verdict {
        fwd.metrics
            .ejections
            .get_or_create(&Metrics::service(&target.service))
            .inc();
        tracing::info!(service = %target.service, instance = %id, secs = d.as_secs_f64(), "instance ejected");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn what_may_be_retried() {
        let cases = [
            (Method::GET, true, true),
            (Method::HEAD, true, true),
            (Method::OPTIONS, true, true),
            (Method::PUT, true, true),
            (Method::DELETE, true, true),
            (Method::PUT, false, false),
            (Method::POST, true, false),
            (Method::PATCH, true, false),
        ];
        for (m, empty, want) in cases {
            assert_eq!(retryable(&m, empty), want, "{m} empty={empty}");
        }
        for (code, want) in [
            (500, false),
            (502, true),
            (503, true),
            (504, true),
            (404, false),
        ] {
            assert_eq!(
                retry_status(StatusCode::from_u16(code).unwrap()),
                want,
                "{code}"
            );
        }
    }

    #[test]
    fn hop_by_hop_headers_are_not_passed_on() {
        let mut h = http::HeaderMap::new();
        h.insert("connection", HeaderValue::from_static("x-private, close"));
        h.insert("x-private", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert("transfer-encoding", HeaderValue::from_static("chunked"));
        h.insert("x-kept", HeaderValue::from_static("1"));
        strip_hop_by_hop(&mut h, false);
        let names: Vec<&str> = h.keys().map(|k| k.as_str()).collect();
        assert_eq!(names, ["x-kept"]);
    }
}
