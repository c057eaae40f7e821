//! The lean data path (`data_path = "lean"`): each client connection, HTTP/1.1 or HTTP/2, is
//! served by hyper on the connection [`Guarded`](crate::connections::Guarded) accepted (TLS
//! or not, under the same header deadline, connection cap and HTTP/2 idle watch), and each
//! request goes through one async function: [`admission`], a try loop over the balancer's
//! picks on the [`upstream`](crate::upstream) pool's connections, the answer streamed back.
//! HTTP/1.1 instances are spoken to through the gateway's own codec ([`h1_client`]: the head
//! encoded once for every try, the answer read in this task), or through hyper's client when
//! header names keep their case; `upstream_h2c` routes through hyper's HTTP/2 client.
//! HTTP/2 streams run on [`StreamExec`], which resets a stream stalled on the client's window.
//!
//! Why: pingora boxes a future per request, clones the header and runs two channels per
//! proxied request; `tests/bench/results/gateway-pinned*.md` measure hyper's floor at about
//! 20% less CPU per request than pingora's.
//!
//! What it does, as the pingora path does:
//! - admission, request ID and trace context, forwarding headers, prefix stripping, `Host`
//!   for absolute-form targets, hop-by-hop headers removed both ways; header names in lower case unless
//!   `preserve_header_case` is set;
//! - the body limits: more than `max_body_bytes` is the client's fault (413), as is a body
//!   slower than `min_body_rate` or stalled for `body_read_timeout` (408); neither counts
//!   against the instance;
//! - tries: a failed connect goes to another instance whatever the method, free of the retry
//!   budget; a 502/503/504 answer, a reset or a per-try timeout goes to another instance when
//!   the request is idempotent, within the budget. A request is replayable when it has no
//!   body or a body of at most [`REPLAY_BYTES`] with a declared length (read before the first
//!   try); a longer body streams to the first instance only;
//! - upgrades (WebSocket): the 101 and then the two connections joined byte for byte;
//! - the access log line and the metrics when the answer's body is done.

use std::borrow::Cow;
use std::convert::Infallible;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU16, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::future::FutureExt as _;
use http::header::{HeaderValue, CONNECTION, CONTENT_LENGTH, CONTENT_TYPE, HOST};
use http::uri::PathAndQuery;
use http::{Request, Response, StatusCode, Uri, Version};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::{Body as _, Frame, Incoming, SizeHint};
use hyper::client::conn::http1::SendRequest;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use pingora::protocols::{GetSocketDigest, Ssl};
use pingora::server::ShutdownWatch;
use tokio::time::Sleep;

use crate::access_log;
use crate::admission::{self, ContentLength, Forwarding, HeaderOverlay, NO_ROUTE};
use crate::balancer::{InFlight, PickError};
use crate::h1_client::{self, H1Conn, H1Error, Outgoing};
use crate::h2_streams::{Stall, StreamExec};
use crate::header_deadline::HeaderDeadline;
use crate::headers::{self, TE, TRACEPARENT, X_REQUEST_ID};
use crate::routes::Route;
use crate::tries;
use crate::upstream::{Answered, Lease, Pool, PoolConfig};
use crate::write_deadline::WriteDeadline;
use crate::Shared;

/// Request bodies up to this size, with a declared length, are read before the first try so
/// that another instance can be tried (pingora's retry buffer holds the same).
pub const REPLAY_BYTES: u64 = 64 * 1024;

const BAD_GATEWAY: &str = "bad gateway: no instance answered\n";
const GATEWAY_TIMEOUT: &str = "gateway timeout\n";

/// What another try costs the retry budget.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Cost {
    /// Nothing reached the instance: free.
    Free,
    /// Paid already (a retried status).
    Paid,
    /// Spent from the budget, if it has any.
    Budget,
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;
/// Bodies both ways.
pub type Body = BoxBody<Bytes, BoxError>;

/// The lean path: the shared state and the pooled connections to instances.
pub struct Lean {
    shared: Arc<Shared>,
    /// Instances over HTTP/1.1.
    h1: H1,
    /// Instances of `upstream_h2c` routes (HTTP/2 by prior knowledge, one multiplexed
    /// connection per instance).
    h2c: Client<HttpConnector, Body>,
}

/// The HTTP/1.1 connections to instances: the gateway's own codec, or hyper's when header
/// names keep their case (only hyper can read the case its server kept).
enum H1 {
    Own(Arc<Pool<H1Conn>>),
    Hyper(Arc<Pool<SendRequest<Body>>>),
}

/// The instance's side of an upgraded connection.
enum InstanceSide {
    Hyper(hyper::upgrade::OnUpgrade),
    /// The socket, and what the instance sent past its 101.
    Own(tokio::net::TcpStream, Bytes),
}

/// An instance's answer: its head, its body, the hyper connection to give back at the body's
/// end (the gateway's own connections give themselves back), and the upgraded connection
/// after a 101.
struct Answer {
    resp: Response<Body>,
    lease: Option<Lease>,
    upgraded: Option<InstanceSide>,
}

/// A try that got no answer.
struct TryFailed {
    /// Nothing reached the instance: the connection was never made.
    connect: bool,
    error: BoxError,
}

/// An admitted request: what [`Lean::admit`] decided, for the tries.
struct Admitted {
    admitted: admission::Admitted,
    /// The request's host, as the forwarding headers name it.
    host: Option<String>,
    trace: headers::TraceContext,
    done: Done,
}

/// What the connection knows about its client.
struct Conn {
    client: Option<IpAddr>,
    /// `client` as `X-Real-IP` and a fresh `X-Forwarded-For` carry it, made once.
    client_value: Option<HeaderValue>,
    https: bool,
    trusted: bool,
    /// The header deadline's "a request ended" switch (HTTP/1.1; HTTP/2 has no heads to
    /// time after its preface).
    next_request: Option<Arc<AtomicBool>>,
}

impl Conn {
    fn new(lean: &Lean, stream: &HeaderDeadline, h1: bool) -> Conn {
        let client = stream
            .get_socket_digest()
            .and_then(|d| d.peer_addr().and_then(|a| a.as_inet()).map(|a| a.ip()));
        Conn {
            client,
            client_value: client.and_then(|ip| HeaderValue::try_from(headers::real_ip(ip)).ok()),
            https: stream.get_ssl_digest().is_some(),
            trusted: client.is_some_and(|ip| lean.shared.config.is_trusted_proxy(ip)),
            next_request: h1.then(|| stream.next_request_handle()),
        }
    }
}

/// Upstream connections idle this long are closed.
const UPSTREAM_IDLE: Duration = Duration::from_secs(60);

impl Lean {
    pub fn new(shared: Arc<Shared>) -> Lean {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(shared.config.timeouts.connect));
        // Host is the client's (admission requires one), never the instance's address.
        let mut builder = Client::builder(TokioExecutor::new());
        builder
            .pool_idle_timeout(UPSTREAM_IDLE)
            .pool_timer(TokioTimer::new())
            .timer(TokioTimer::new())
            .set_host(false);
        let pool = PoolConfig {
            connect_timeout: shared.config.timeouts.connect,
            idle_timeout: UPSTREAM_IDLE,
            preserve_header_case: shared.config.preserve_header_case,
        };
        let h1 = if shared.config.preserve_header_case {
            H1::Hyper(Pool::new(pool))
        } else {
            H1::Own(Pool::new(pool))
        };
        let h2c = builder.http2_only(true).build(connector);
        Lean { shared, h1, h2c }
    }

    /// Serves one HTTP/1.1 connection until it closes, idles out, or the server shuts down
    /// (then after the request in flight).
    pub async fn serve(self: &Arc<Self>, mut stream: HeaderDeadline, shutdown: &ShutdownWatch) {
        let limits = &self.shared.config.limits;
        let service = self.service(Conn::new(self, &stream, true));
        // The wait for each request head, from the previous request's end: one timer for
        // the connection's life (hyper's header timeout would make one per request). The
        // head's own deadline, from its first byte, is the header deadline's.
        stream.watch_idle(limits.idle_timeout);
        let mut builder = hyper::server::conn::http1::Builder::new();
        builder
            .timer(TokioTimer::new())
            .preserve_header_case(self.shared.config.preserve_header_case)
            .keep_alive(true)
            // A client may shut its side after the request and still read the answer.
            .half_close(true)
            .header_read_timeout(None)
            .max_buf_size((limits.max_header_bytes * 2).max(8192));
        let conn = builder
            .serve_connection(
                TokioIo::new(WriteDeadline::new(stream, limits.send_timeout)),
                service,
            )
            .with_upgrades();
        tokio::pin!(conn);
        let mut shutdown = shutdown.clone();
        if !*shutdown.borrow() {
            tokio::select! {
                r = conn.as_mut() => {
                    if let Err(e) = r {
                        tracing::debug!(error = %e, "client connection ended");
                    }
                    return;
                }
                _ = shutdown.changed() => {}
            }
        }
        conn.as_mut().graceful_shutdown();
        let _ = conn.await;
    }

    /// Serves one HTTP/2 connection until it closes, or until `shutdown` turns true (the
    /// server's shutdown, or the idle watch's): then GOAWAY, and the streams open finish.
    /// `open` counts its streams.
    pub async fn serve_h2(
        self: &Arc<Self>,
        stream: HeaderDeadline,
        mut shutdown: tokio::sync::watch::Receiver<bool>,
        open: Arc<AtomicUsize>,
    ) {
        let limits = &self.shared.config.limits;
        let service = self.service(Conn::new(self, &stream, false));
        let mut builder =
            hyper::server::conn::http2::Builder::new(StreamExec::new(limits.send_timeout, open));
        builder
            .timer(TokioTimer::new())
            .max_concurrent_streams(limits.h2_max_concurrent_streams)
            .initial_stream_window_size(limits.h2_stream_buffer_bytes)
            .max_send_buf_size(limits.h2_stream_buffer_bytes as usize)
            .max_header_list_size(u32::try_from(limits.max_header_bytes).unwrap_or(u32::MAX));
        let conn = builder.serve_connection(
            TokioIo::new(WriteDeadline::new(stream, limits.send_timeout)),
            service,
        );
        tokio::pin!(conn);
        if !*shutdown.borrow() {
            tokio::select! {
                r = conn.as_mut() => {
                    if let Err(e) = r {
                        tracing::debug!(error = %e, "HTTP/2 client connection ended");
                    }
                    return;
                }
                _ = shutdown.wait_for(|down| *down) => {}
            }
        }
        conn.as_mut().graceful_shutdown();
        let _ = conn.await;
    }

    /// The function each request of a connection goes through.
    fn service(
        self: &Arc<Self>,
        conn: Conn,
    ) -> impl hyper::service::Service<
        Request<Incoming>,
        Response = Response<Body>,
        Error = Infallible,
        Future = impl Future<Output = Result<Response<Body>, Infallible>> + Send,
    > + Clone {
        let (lean, conn) = (self.clone(), Arc::new(conn));
        hyper::service::service_fn(move |req| {
            lean.clone()
                .handle(conn.clone(), req)
                .map(Ok::<_, Infallible>)
        })
    }

    /// What is decided before a try: the request's ID and trace, its access-log record, and
    /// admission (route, limits); or the gateway's own answer.
    // The refusal is smaller than what is admitted; boxing it would cost a refused request
    // an allocation for nothing.
    #[allow(clippy::result_large_err)]
    fn admit(&self, conn: &Conn, req: &Request<Incoming>) -> Result<Admitted, Response<Body>> {
        let shared = &self.shared;
        // The request's one clock read until its first try, if nothing is awaited before.
        let now = Instant::now();
        shared.metrics.in_flight.inc();
        shared.retry_budget.deposit();
        let (request_id, _) = headers::request_id(
            req.headers()
                .get(&X_REQUEST_ID)
                .and_then(|v| v.to_str().ok()),
            || fastrand::u64(..),
        );
        let trace = headers::traceparent(
            req.headers()
                .get(&TRACEPARENT)
                .and_then(|v| v.to_str().ok()),
            || fastrand::u64(..),
        );
        let host = req
            .uri()
            .host()
            .or_else(|| req.headers().get(HOST).and_then(|v| v.to_str().ok()))
            .map(str::to_string);
        // What only the access line needs is copied only when there is one.
        let logged = shared.config.access_log != crate::config::AccessLog::Off;
        let copy = |s: &str| if logged { s.to_string() } else { String::new() };
        let mut done = Done {
            shared: shared.clone(),
            next_request: conn.next_request.clone(),
            stall: Stall::current(),
            start: now,
            client: conn.client,
            method: copy(req.method().as_str()),
            host: copy(host.as_deref().unwrap_or_default()),
            path: copy(req.uri().path()),
            version: req.version(),
            route: None,
            status: 0,
            tried: Vec::new(),
            request_id,
            trace_id: copy(trace.trace_id()),
            error: None,
        };
        let raw = raw_target(req.uri(), req.version());
        let head = admission::Head {
            method: req.method(),
            uri: req.uri(),
            version: req.version(),
            headers: req.headers(),
            raw_path: raw.as_bytes(),
        };
        let admitted = match admission::admit(shared, &head, conn.client, now) {
            Ok(a) => a,
            Err(refused) => {
                done.route = refused.route;
                let r = refused.refusal;
                return Err(done.answer(r.status, r.body, r.retry_after));
            }
        };
        done.route = Some(admitted.route.clone());
        Ok(Admitted {
            admitted,
            host,
            trace,
            done,
        })
    }

    /// One request, from its head to its answer's head: admission, then the tries. This
    /// future is the request's only one, not nested in another, and what it holds is made
    /// inside it rather than passed in: hyper moves each request's future into a box it
    /// keeps per connection, each level of nesting would be another copy of everything
    /// below it, and an async function's arguments take room twice.
    async fn handle(
        self: Arc<Self>,
        conn: Arc<Conn>,
        mut req: Request<Incoming>,
    ) -> Response<Body> {
        let Admitted {
            admitted,
            host,
            trace,
            mut done,
        } = match self.admit(&conn, &req) {
            Ok(admitted) => admitted,
            Err(refused) => return refused,
        };
        let shared = &self.shared;
        let cfg = &shared.config;
        let route = admitted.route.clone();
        let upgrade = is_upgrade(req.headers());
        let client_upgrade = upgrade.then(|| hyper::upgrade::on(&mut req));
        let (mut parts, body) = req.into_parts();
        let original_authority = parts.uri.authority().cloned();
        if let Some(uri) = admitted.rewritten {
            parts.uri = uri;
        }
        match admitted.content_length {
            ContentLength::Keep => {}
            ContentLength::Remove => {
                parts.headers.remove(CONTENT_LENGTH);
            }
            ContentLength::Canonical(n) => {
                parts.headers.insert(CONTENT_LENGTH, HeaderValue::from(n));
            }
        }
        if !parts.headers.contains_key(HOST) {
            if let Some(a) = &original_authority {
                if let Ok(v) = HeaderValue::from_str(a.as_str()) {
                    parts.headers.insert(HOST, v);
                }
            }
        }
        let te_trailers =
            headers::te_trailers(parts.headers.get(&TE).and_then(|v| v.to_str().ok()));
        let forwarding = Forwarding {
            client: conn.client,
            client_value: conn.client_value.as_ref(),
            trusted: conn.trusted,
            https: conn.https,
            host: host.as_deref(),
            request_id: &done.request_id,
            trace: Some(&trace),
            te_trailers,
            upgrade,
        };
        // On the gateway's own codec the forwarding headers go straight into the encoded
        // head, beside the client's map; for hyper's clients, into the map.
        let own_pool = match &self.h1 {
            H1::Own(pool) if !route.upstream_h2c => Some(pool),
            _ => None,
        };
        let mut set_aside = Vec::new();
        if own_pool.is_some() {
            let mut overlay = HeaderOverlay::new(&mut parts.headers);
            admission::forwarding_headers(&mut overlay, &forwarding);
            set_aside = overlay.into_set();
        } else {
            // Room for the forwarding headers, so that the map grows once if at all.
            parts.headers.reserve(8);
            admission::forwarding_headers(&mut parts.headers, &forwarding);
        }
        // The target for instances, in origin form.
        let target = match (route.strip_prefix, parts.uri.path_and_query()) {
            (false, Some(pq)) => pq.clone(),
            (false, None) => PathAndQuery::from_static("/"),
            (true, pq) => {
                let rewritten = route.rewrite(pq.map_or("/", |p| p.as_str()));
                match PathAndQuery::try_from(rewritten) {
                    Ok(t) => t,
                    Err(e) => return done.answer(400, format!("bad request: {e}\n"), None),
                }
            }
        };

        // The body: replayable when there is none or it is short and declared.
        let fault = Arc::new(AtomicU16::new(0));
        let limited = Limited::new(body, cfg, done.start, fault.clone());
        let declared = parts
            .headers
            .get(CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
        let mut body: Option<Body> = None;
        let mut replay: Option<Bytes> = None;
        // The time, read again after anything awaited.
        let mut now = done.start;
        if limited.is_end_stream() {
            replay = Some(Bytes::new());
        } else if declared.is_some_and(|n| n <= REPLAY_BYTES) && !upgrade {
            match limited.collect().await {
                Ok(c) => replay = Some(c.to_bytes()),
                Err(e) => return done.client_fault(&fault, &e.to_string()),
            }
            now = Instant::now();
        } else {
            body = Some(limited.boxed());
        }
        let idempotent = parts.method.is_idempotent();
        let head_request = parts.method == http::Method::HEAD;
        // On the gateway's own codec the head is encoded once, and every try writes it.
        let own = own_pool.map(|pool| {
            let chunked = body.is_some() && declared.is_none();
            let head = h1_client::encode_head(
                &parts.method,
                target.as_str(),
                &parts.headers,
                &set_aside,
                chunked,
            );
            (pool, head, chunked)
        });
        let deadline = done.start + cfg.timeouts.deadline;
        let mut service = admitted.service;
        let tags = admitted.tags;
        let mut head_spent = false;
        loop {
            if !done.tried.is_empty() {
                now = Instant::now();
                if now >= deadline {
                    return done.answer(504, GATEWAY_TIMEOUT.into(), None);
                }
                if head_spent {
                    // Unreachable by `tries::last_try`'s reasoning; kept safe all the same.
                    return done.answer(502, BAD_GATEWAY.into(), None);
                }
                // A retry takes the freshest view of the service.
                if let Some(fresh) = shared.mirror.service(&route.service) {
                    service = fresh;
                }
            }
            let pick = shared
                .balancer
                .pick(&service, &tags, &done.tried, now, fastrand::f64);
            let pick = match pick {
                Ok(p) => p,
                Err(PickError::NoInstance(_)) if done.tried.is_empty() => {
                    let body = format!("no healthy instance of {}\n", route.service);
                    return done.answer(503, body, None);
                }
                // The error of the last try is the request's.
                Err(_) => return done.answer(502, BAD_GATEWAY.into(), None),
            };
            if !done.tried.is_empty() {
                shared.metrics.route(&route.name).retried();
            }
            done.tried.push(pick.instance.id.to_string());
            let within = cfg
                .timeouts
                .per_try
                .min(deadline.saturating_duration_since(now));
            let try_deadline = tokio::time::Instant::from_std(now + within);
            let result = if let Some((pool, head, chunked)) = &own {
                let out = match (&replay, body.take()) {
                    (Some(bytes), _) => Outgoing::Bytes(bytes.clone()),
                    (None, Some(body)) => Outgoing::Stream {
                        body,
                        chunked: *chunked,
                    },
                    (None, None) => Outgoing::Bytes(Bytes::new()),
                };
                let exchange = pool.exchange(pick.addr, head, out, head_request, now);
                tokio::time::timeout_at(try_deadline, exchange.map(own_answer)).await
            } else {
                let this_body = match (&replay, body.take()) {
                    (Some(bytes), _) => full(bytes.clone()),
                    (None, Some(b)) => b,
                    (None, None) => full(Bytes::new()),
                };
                let mut upstream = Request::new(this_body);
                *upstream.method_mut() = parts.method.clone();
                *upstream.uri_mut() = Uri::from(target.clone());
                // The head is copied only when another try could follow; the last one
                // takes it.
                head_spent = tries::last_try(&service, &done.tried, cfg.retry.attempts);
                if head_spent {
                    *upstream.headers_mut() = std::mem::take(&mut parts.headers);
                    *upstream.extensions_mut() = std::mem::take(&mut parts.extensions);
                } else {
                    *upstream.headers_mut() = parts.headers.clone();
                    *upstream.extensions_mut() = parts.extensions.clone();
                }
                let hyper_h1 = match &self.h1 {
                    H1::Hyper(pool) if !route.upstream_h2c => Some(pool),
                    _ => None,
                };
                // Boxed: hyper's clients are the rarer path, and their future, larger than
                // the own codec's, would grow every request's future.
                let send = Box::pin(self.send(hyper_h1, pick.addr, upstream));
                tokio::time::timeout_at(try_deadline, send).await
            };
            // A failed try: what went wrong, what another try would cost the retry budget,
            // and the status to answer when there is none.
            let (failure, cost, status) = match result {
                Ok(Ok(answer)) => {
                    let status = answer.resp.status();
                    if status.is_server_error() {
                        tries::record_failure(shared, &service, &pick.instance.id);
                    } else {
                        shared.balancer.success(&pick.instance.id);
                    }
                    // A 502/503/504 goes to another instance when that is allowed and paid
                    // for; otherwise it is the answer.
                    let retry = matches!(status.as_u16(), 502..=504)
                        && idempotent
                        && replay.is_some()
                        && tries::may_retry(
                            shared,
                            &done.tried,
                            deadline,
                            Some(&service),
                            &tags,
                            false,
                        );
                    if !retry {
                        return self.answered(answer, pick, client_upgrade, done);
                    }
                    let what = format!("instance answered {status}; retrying on another");
                    (what, Cost::Paid, 502)
                }
                Ok(Err(failed)) => {
                    let e: &(dyn std::error::Error + 'static) = &*failed.error;
                    if let Some(status) = client_fault(&fault) {
                        return done.client_fault_status(status, &e.to_string());
                    }
                    // Nothing reached the instance (a failed connect), or the connection
                    // closed before any answer (an instance that died with the connection
                    // open): another instance costs nothing extra, so the budget is not
                    // spent; any method may go on after a failed connect.
                    let connect = failed.connect;
                    tries::record_failure(shared, &service, &pick.instance.id);
                    let what = format!("instance {}: {}", pick.addr, report(e));
                    if !(connect || (idempotent && replay.is_some())) {
                        done.error = Some(what);
                        return done.answer(502, BAD_GATEWAY.into(), None);
                    }
                    let cost = if connect || closed_before_answer(e) {
                        Cost::Free
                    } else {
                        Cost::Budget
                    };
                    (what, cost, 502)
                }
                Err(_) => {
                    tries::record_failure(shared, &service, &pick.instance.id);
                    let what = format!(
                        "instance {}: no answer within the per-try timeout",
                        pick.addr
                    );
                    (what, Cost::Budget, 504)
                }
            };
            tracing::debug!(error = %failure, "try failed");
            drop(pick);
            let another = replay.is_some()
                && match cost {
                    Cost::Paid => true,
                    Cost::Free | Cost::Budget => tries::may_retry(
                        shared,
                        &done.tried,
                        deadline,
                        Some(&service),
                        &tags,
                        cost == Cost::Free,
                    ),
                };
            done.error = Some(failure);
            if !another {
                let body = if status == 504 {
                    GATEWAY_TIMEOUT
                } else {
                    BAD_GATEWAY
                };
                return done.answer(status, body.into(), None);
            }
        }
    }

    /// One try on hyper's clients: the request to the instance at `addr` over HTTP/1.1 on
    /// `hyper_h1` when given, else over HTTP/2; and its answer's head.
    async fn send(
        &self,
        hyper_h1: Option<&Arc<Pool<SendRequest<Body>>>>,
        addr: SocketAddr,
        mut req: Request<Body>,
    ) -> Result<Answer, TryFailed> {
        if let Some(pool) = hyper_h1 {
            return match pool.send(addr, req).await {
                Ok((resp, lease)) => Ok(hyper_answer(resp, Some(lease))),
                Err(e) => Err(TryFailed {
                    connect: e.is_connect(),
                    error: e.into(),
                }),
            };
        }
        // HTTP/2 wants the scheme and authority (its pseudo-headers).
        let mut uri = std::mem::take(req.uri_mut()).into_parts();
        uri.scheme = Some(http::uri::Scheme::HTTP);
        uri.authority = http::uri::Authority::try_from(addr.to_string()).ok();
        *req.uri_mut() = Uri::from_parts(uri).map_err(|e| TryFailed {
            connect: true,
            error: e.into(),
        })?;
        *req.version_mut() = Version::HTTP_2;
        match self.h2c.request(req).await {
            Ok(resp) => Ok(hyper_answer(resp, None)),
            Err(e) => Err(TryFailed {
                connect: e.is_connect(),
                error: e.into(),
            }),
        }
    }

    /// The instance's answer, on its way to the client.
    fn answered(
        &self,
        answer: Answer,
        pick: InFlight,
        client_upgrade: Option<hyper::upgrade::OnUpgrade>,
        mut done: Done,
    ) -> Response<Body> {
        let Answer {
            resp,
            lease,
            upgraded,
        } = answer;
        let status = resp.status();
        done.error = None;
        let switching = status == StatusCode::SWITCHING_PROTOCOLS;
        // An upgraded connection never carries another request: the lease is dropped.
        let lease = lease.filter(|_| !switching);
        if let (true, Some(client_side), Some(instance_side)) =
            (switching, client_upgrade, upgraded)
        {
            tokio::spawn(join_upgraded(client_side, instance_side));
        }
        let (mut parts, body) = resp.into_parts();
        if headers::any_hop_by_hop(parts.headers.keys().map(|k| k.as_str())) {
            let connection = parts
                .headers
                .get(CONNECTION)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string);
            for name in headers::response_hop_by_hop(connection.as_deref(), switching) {
                parts.headers.remove(name.as_str());
            }
        }
        if !parts.headers.contains_key(&X_REQUEST_ID) {
            if let Ok(v) = HeaderValue::from_str(&done.request_id) {
                parts.headers.insert(X_REQUEST_ID, v);
            }
        }
        // An HTTP/2 instance's answer goes back as HTTP/1.1.
        parts.version = Version::HTTP_11;
        done.status = status.as_u16();
        let body = Tail::new(body, lease, Some(pick), done);
        Response::from_parts(parts, body.boxed())
    }
}

/// One try's outcome on the gateway's own codec.
fn own_answer(exchanged: Result<Answered, H1Error>) -> Result<Answer, TryFailed> {
    match exchanged {
        Ok(Answered::Response(parts, body)) => Ok(Answer {
            resp: Response::from_parts(parts, body.boxed()),
            lease: None,
            upgraded: None,
        }),
        Ok(Answered::Upgraded(parts, io, rest)) => Ok(Answer {
            resp: Response::from_parts(parts, full(Bytes::new())),
            lease: None,
            upgraded: Some(InstanceSide::Own(io, rest)),
        }),
        Err(e) => Err(TryFailed {
            connect: e.is_connect(),
            error: e.into(),
        }),
    }
}

/// An answer from hyper's client, and its upgrade when it is a 101.
fn hyper_answer(mut resp: Response<Incoming>, lease: Option<Lease>) -> Answer {
    let upgraded = (resp.status() == StatusCode::SWITCHING_PROTOCOLS)
        .then(|| InstanceSide::Hyper(hyper::upgrade::on(&mut resp)));
    Answer {
        resp: resp.map(|b| b.map_err(BoxError::from).boxed()),
        lease,
        upgraded,
    }
}

/// The client's and the instance's upgraded connections, joined byte for byte.
async fn join_upgraded(client_side: hyper::upgrade::OnUpgrade, instance_side: InstanceSide) {
    let Ok(client) = client_side.await else {
        return;
    };
    let mut client = TokioIo::new(client);
    match instance_side {
        InstanceSide::Hyper(instance) => {
            if let Ok(instance) = instance.await {
                let mut instance = TokioIo::new(instance);
                let _ = tokio::io::copy_bidirectional(&mut client, &mut instance).await;
            }
        }
        InstanceSide::Own(mut instance, rest) => {
            use tokio::io::AsyncWriteExt;
            if client.write_all(&rest).await.is_ok() {
                let _ = tokio::io::copy_bidirectional(&mut client, &mut instance).await;
            }
        }
    }
}

/// The request target as the client sent it, as far as admission needs it: origin form
/// (and `*`) as they are; an absolute form (a scheme) rebuilt.
/// HTTP/2's target is its `:path`, in origin form (`:scheme` and `:authority` apart).
fn raw_target(uri: &Uri, version: Version) -> Cow<'_, str> {
    match uri.scheme() {
        Some(_) if version != Version::HTTP_2 => Cow::Owned(uri.to_string()),
        _ => Cow::Borrowed(uri.path_and_query().map_or("/", |p| p.as_str())),
    }
}

/// An upgrade request: `Upgrade`, and `Connection` naming it.
fn is_upgrade(headers: &http::HeaderMap) -> bool {
    headers.contains_key(http::header::UPGRADE)
        && headers
            .get_all(CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .any(|t| t.trim().eq_ignore_ascii_case("upgrade"))
}

fn full(bytes: Bytes) -> Body {
    Full::new(bytes).map_err(|never| match never {}).boxed()
}

/// An error and its causes, each said once.
fn report(e: &(dyn std::error::Error + 'static)) -> String {
    waymark_shared::report::chain(e)
}

/// Whether a try failed because the instance's connection closed (or reset) before any
/// answer: what an instance that died with pooled connections open looks like.
fn closed_before_answer(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(c) = cause {
        if let Some(h) = c.downcast_ref::<H1Error>() {
            if h.closed_before_answer() {
                return true;
            }
        }
        if let Some(h) = c.downcast_ref::<hyper::Error>() {
            if h.is_incomplete_message() || h.is_canceled() {
                return true;
            }
        }
        if let Some(io) = c.downcast_ref::<std::io::Error>() {
            use std::io::ErrorKind::{BrokenPipe, ConnectionAborted, ConnectionReset};
            if matches!(io.kind(), ConnectionReset | ConnectionAborted | BrokenPipe) {
                return true;
            }
        }
        cause = c.source();
    }
    false
}

fn client_fault(fault: &AtomicU16) -> Option<u16> {
    match fault.load(Ordering::Acquire) {
        0 => None,
        s => Some(s),
    }
}

/// The client's body, under the body limits (see the module docs). A fault is recorded in
/// `fault` (413, 408, or 499 for a client that went away) before the error is returned, so
/// that the try's failure is not held against the instance.
struct Limited {
    inner: Incoming,
    read: u64,
    max: u64,
    min_rate: u64,
    read_timeout: Duration,
    start: Instant,
    stall: Pin<Box<Sleep>>,
    fault: Arc<AtomicU16>,
}

impl Limited {
    fn new(
        inner: Incoming,
        cfg: &crate::config::Config,
        start: Instant,
        fault: Arc<AtomicU16>,
    ) -> Limited {
        let limits = &cfg.limits;
        Limited {
            inner,
            read: 0,
            max: limits.max_body_bytes,
            min_rate: limits.min_body_rate,
            read_timeout: limits.body_read_timeout,
            start,
            stall: Box::pin(tokio::time::sleep(limits.body_read_timeout)),
            fault,
        }
    }

    fn fail(&self, status: u16, why: &str) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        self.fault.store(status, Ordering::Release);
        Poll::Ready(Some(Err(why.to_string().into())))
    }
}

impl hyper::body::Body for Limited {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match Pin::new(&mut self.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    self.read += data.len() as u64;
                    if self.read > self.max {
                        return self.fail(413, "request body too large");
                    }
                    if self.min_rate > 0 {
                        let earned =
                            Duration::from_secs_f64(self.read as f64 / self.min_rate as f64);
                        if self.start.elapsed() > self.read_timeout + earned {
                            let why = format!("request body slower than {} bytes/s", self.min_rate);
                            return self.fail(408, &why);
                        }
                    }
                }
                let next = tokio::time::Instant::now() + self.read_timeout;
                self.stall.as_mut().reset(next);
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => {
                self.fault.store(499, Ordering::Release);
                Poll::Ready(Some(Err(e.into())))
            }
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => {
                if self.stall.as_mut().poll(cx).is_ready() {
                    return self.fail(408, "request body stalled");
                }
                Poll::Pending
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// An answer's body, which keeps the try counted against its instance (when an instance
/// answered) and the request's log line and metrics until the body is done, and gives the
/// instance's connection back to the pool once the body has been read to its end.
struct Tail {
    inner: Body,
    lease: Option<Lease>,
    /// The HTTP/2 stream's stall mark: waiting on the client from each frame handed over
    /// until hyper asks for the next.
    stall: Option<Arc<Stall>>,
    _inflight: Option<InFlight>,
    _done: Done,
}

impl Tail {
    fn new(inner: Body, lease: Option<Lease>, inflight: Option<InFlight>, done: Done) -> Tail {
        let stall = done.stall.clone();
        if let Some(s) = &stall {
            s.waiting();
        }
        let mut tail = Tail {
            inner,
            lease,
            stall,
            _inflight: inflight,
            _done: done,
        };
        // An answer without a body (204, 304, a HEAD's, a zero length) is read already.
        tail.give_back_at_end();
        tail
    }

    fn give_back_at_end(&mut self) {
        if self.inner.is_end_stream() {
            if let Some(lease) = self.lease.take() {
                lease.give_back();
            }
        }
    }
}

impl hyper::body::Body for Tail {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        if let Some(s) = &self.stall {
            s.moving();
        }
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(_))) => {
                if let Some(s) = &self.stall {
                    s.waiting();
                }
                self.give_back_at_end()
            }
            Poll::Ready(None) => {
                if let Some(lease) = self.lease.take() {
                    lease.give_back();
                }
            }
            // An error: the connection is not reused.
            Poll::Ready(Some(Err(_))) => self.lease = None,
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// A request's end: when dropped (its answer's body done, or the request abandoned), it is
/// counted, logged, and the connection's next request head goes under the header deadline.
struct Done {
    shared: Arc<Shared>,
    next_request: Option<Arc<AtomicBool>>,
    /// The HTTP/2 stream's stall mark, for the answer's body.
    stall: Option<Arc<Stall>>,
    start: Instant,
    client: Option<IpAddr>,
    method: String,
    host: String,
    path: String,
    version: Version,
    route: Option<Arc<Route>>,
    /// The status answered (0: none reached the client).
    status: u16,
    tried: Vec<String>,
    request_id: String,
    trace_id: String,
    error: Option<String>,
}

impl Done {
    /// Answers from the gateway itself with a short text body; the connection closes after.
    fn answer(
        mut self,
        status: u16,
        body: String,
        retry_after: Option<Duration>,
    ) -> Response<Body> {
        self.status = status;
        let mut resp = Response::new(Bytes::from(body));
        *resp.status_mut() =
            StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let h = resp.headers_mut();
        h.insert(
            CONTENT_TYPE,
            HeaderValue::from_static("text/plain; charset=utf-8"),
        );
        // HTTP/2 has no Connection header; the stream ends with the answer.
        if self.version != Version::HTTP_2 {
            h.insert(CONNECTION, HeaderValue::from_static("close"));
        }
        if let Ok(v) = HeaderValue::from_str(&self.request_id) {
            if !self.request_id.is_empty() {
                h.insert(X_REQUEST_ID, v);
            }
        }
        if let Some(wait) = retry_after {
            h.insert(
                "retry-after",
                HeaderValue::from(admission::retry_after_secs(wait)),
            );
        }
        let (parts, bytes) = resp.into_parts();
        let body = Tail::new(full(bytes), None, None, self);
        Response::from_parts(parts, body.boxed())
    }

    /// The client's fault in its body: counted as such, answered if it is still there.
    fn client_fault(self, fault: &AtomicU16, why: &str) -> Response<Body> {
        let status = client_fault(fault).unwrap_or(400);
        self.client_fault_status(status, why)
    }

    fn client_fault_status(mut self, status: u16, why: &str) -> Response<Body> {
        admission::client_error(
            &self.shared,
            if status == 499 {
                "aborted"
            } else {
                "bad_request"
            },
        );
        self.error = Some(why.to_string());
        match status {
            413 => self.answer(413, "request body too large\n".into(), None),
            408 => self.answer(408, "request timeout\n".into(), None),
            _ => self.answer(400, format!("bad request: {why}\n"), None),
        }
    }
}

impl Drop for Done {
    fn drop(&mut self) {
        let shared = &self.shared;
        if let Some(next) = &self.next_request {
            next.store(true, Ordering::Relaxed);
        }
        shared.metrics.in_flight.dec();
        let elapsed = self.start.elapsed();
        let route = shared
            .metrics
            .route(self.route.as_ref().map_or(NO_ROUTE, |r| r.name.as_str()));
        shared.metrics.request_done(
            &route,
            self.tried.last().map(String::as_str),
            self.status,
            elapsed,
        );
        if shared.config.access_log == crate::config::AccessLog::Off {
            return;
        }
        let client = self.client.map(|c| c.to_string()).unwrap_or_default();
        let entry = access_log::Entry {
            client: &client,
            method: &self.method,
            host: &self.host,
            path: &self.path,
            version: access_log::version_str(self.version),
            status: self.status,
            route: route.route(),
            instance: self.tried.last().map_or("", String::as_str),
            tries: self.tried.len(),
            duration_ms: elapsed.as_secs_f64() * 1000.0,
            request_id: &self.request_id,
            trace_id: &self.trace_id,
            error: self.error.as_deref(),
        };
        access_log::log(shared.config.access_log, &entry);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn raw_targets() {
        let table = [
            ("/a/b?c=d", "/a/b?c=d"),
            ("*", "*"),
            ("http://h.test/x?y", "http://h.test/x?y"),
            ("http://h.test", "http://h.test/"),
        ];
        for (target, want) in table {
            let uri: Uri = target.parse().unwrap();
            assert_eq!(raw_target(&uri, Version::HTTP_11), want, "{target}");
            let path = uri.path_and_query().map_or("/", |p| p.as_str());
            assert_eq!(raw_target(&uri, Version::HTTP_2), path, "{target}");
        }
    }

    /// An instance that closes its connection without answering is told apart from other
    /// failures through the pool's error (the retry that follows is free).
    #[tokio::test]
    async fn a_connection_closed_before_the_answer_is_recognised() {
        use tokio::io::AsyncReadExt;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            for _ in 0..2 {
                let (mut s, _) = listener.accept().await.unwrap();
                let mut buf = [0u8; 1024];
                let _ = s.read(&mut buf).await;
            }
        });
        let config = PoolConfig {
            connect_timeout: Duration::from_secs(2),
            idle_timeout: Duration::from_secs(60),
            preserve_header_case: false,
        };
        let req = Request::builder()
            .uri("/")
            .header(HOST, "t.test")
            .body(full(Bytes::new()))
            .unwrap();
        let err = Pool::<SendRequest<Body>>::new(config.clone())
            .send(addr, req)
            .await
            .err()
            .unwrap();
        assert!(!err.is_connect());
        assert!(closed_before_answer(&err), "{}", report(&err));
        let out = Outgoing::Bytes(Bytes::new());
        let head = b"GET / HTTP/1.1\r\nhost: t.test\r\n\r\n";
        let err = Pool::<H1Conn>::new(config)
            .exchange(addr, head, out, false, Instant::now())
            .await
            .err()
            .unwrap();
        assert!(!err.is_connect());
        assert!(closed_before_answer(&err), "{}", report(&err));
    }

    #[test]
    fn upgrades() {
        let table: [(&[(&str, &str)], bool); 5] = [
            (&[("upgrade", "websocket"), ("connection", "Upgrade")], true),
            (
                &[
                    ("upgrade", "websocket"),
                    ("connection", "keep-alive, upgrade"),
                ],
                true,
            ),
            (&[("upgrade", "websocket")], false),
            (&[("connection", "upgrade")], false),
            (&[("upgrade", "h2c"), ("connection", "close")], false),
        ];
        for (headers, want) in table {
            let mut map = http::HeaderMap::new();
            for (k, v) in headers {
                map.append(*k, v.parse().unwrap());
            }
            assert_eq!(is_upgrade(&map), want, "{headers:?}");
        }
    }
}
