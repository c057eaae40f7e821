//! The pingora proxy: each request is limited, routed, balanced, forwarded with the
//! forwarding headers, retried when that is safe, logged and counted.
//!
//! The phases, in pingora's order:
//! - `request_filter`: the client connection's timeouts (keep-alive idle, body reads,
//!   response writes) and in-order pipelining, request ID and trace context, then
//!   [`admission`](crate::admission): size limits, rate limits, the route, a serving
//!   instance.
//! - `request_body_filter`: the body size limit (413) and minimum rate (408), the client's
//!   faults.
//! - `upstream_peer`: an instance by least-outstanding of two random choices, never one this
//!   request already tried; no new try after the overall deadline (504).
//! - `upstream_request_filter`: prefix stripping, then hop-by-hop removal and forwarding
//!   headers ([`admission::forwarding_headers`]).
//! - `fail_to_connect`: a connect failure counts against the instance and is retried on
//!   another one, whatever the method; nothing reached the instance, so the retry budget
//!   (which keeps retries from piling load on struggling instances) does not apply.
//! - `upstream_response_filter`: a 5xx counts against the instance; a 502/503/504 to an
//!   idempotent request is retried on another instance within the retry budget, before
//!   anything was sent to the client.
//! - `error_while_proxy`: for errors after connecting, whose fault it was: the client's never
//!   counts against the instance nor is retried; a stale pooled connection is retried free;
//!   the instance's counts and is retried within the budget.
//! - `fail_to_proxy`: a short error body.
//! - `logging`: the access log line and metrics; the connection's next request head goes
//!   under the header deadline.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bytes::Bytes;
use pingora::http::{RequestHeader, ResponseHeader};
use pingora::prelude::*;
use pingora::protocols::ALPN;
use pingora::proxy::{FailToProxy, ProxyHttp, Session};
use pingora::upstreams::peer::HttpPeer;
use waymark_shared::ServiceView;

use crate::access_log;
use crate::admission::{self, ContentLength, NO_ROUTE};
use crate::balancer::{InFlight, PickError};
use crate::config::AccessLog;
use crate::header_deadline::HeaderDeadline;
use crate::headers;
use crate::routes::Route;
use crate::tries;
use crate::Shared;

/// Per-request state.
pub struct Ctx {
    start: Instant,
    deadline: Instant,
    route: Option<Arc<Route>>,
    tags: Vec<String>,
    service: Option<Arc<ServiceView>>,
    /// Instance IDs tried so far, in order.
    tried: Vec<String>,
    current: Option<InFlight>,
    /// Set when `upstream_response_filter` turned a 502/503/504 into a retry.
    retry_on_status: Option<u16>,
    retries: u32,
    request_id: String,
    trace: Option<headers::TraceContext>,
    client: Option<IpAddr>,
    /// The peer is a trusted proxy: its forwarding headers are kept.
    trusted: bool,
    https: bool,
    /// The current try got a response head from the instance.
    answered: bool,
    body_bytes: u64,
    /// The status this gateway answered itself, when it did.
    local_status: Option<u16>,
    counted_in_flight: bool,
}

/// The gateway's `ProxyHttp`.
pub struct Gateway {
    pub shared: Arc<Shared>,
}

impl Gateway {
    fn route_label(ctx: &Ctx) -> &str {
        ctx.route.as_ref().map_or(NO_ROUTE, |r| r.name.as_str())
    }

    /// Answers the request from the gateway itself with a short text body.
    async fn answer(
        &self,
        session: &mut Session,
        ctx: &mut Ctx,
        status: u16,
        body: String,
        retry_after: Option<Duration>,
    ) -> Result<bool> {
        let mut resp = ResponseHeader::build(status, Some(4))?;
        resp.insert_header("content-type", "text/plain; charset=utf-8")?;
        resp.insert_header("content-length", body.len().to_string())?;
        if !ctx.request_id.is_empty() {
            resp.insert_header("x-request-id", ctx.request_id.clone())?;
        }
        if let Some(wait) = retry_after {
            let secs = admission::retry_after_secs(wait);
            resp.insert_header("retry-after", secs.to_string())?;
        }
        ctx.local_status = Some(status);
        session.set_keepalive(None);
        session.write_response_header(Box::new(resp), false).await?;
        session
            .write_response_body(Some(Bytes::from(body)), true)
            .await?;
        Ok(true)
    }

    fn may_retry(&self, ctx: &Ctx, free: bool) -> bool {
        tries::may_retry(
            &self.shared,
            &ctx.tried,
            ctx.deadline,
            ctx.service.as_deref(),
            &ctx.tags,
            free,
        )
    }

    fn record_failure(&self, ctx: &Ctx) {
        if let (Some(service), Some(current)) = (&ctx.service, &ctx.current) {
            tries::record_failure(&self.shared, service, &current.instance.id);
        }
    }
}

/// Whose fault an error after connecting was.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fault {
    /// The client's (its connection failed, or its request could not be forwarded), or the
    /// gateway's own: never held against the instance.
    Client,
    /// A reused connection that was closed or reset before any answer.
    StalePool,
    /// The instance's: reset, timeout or garbage on a fresh connection, or after answering.
    Upstream,
}

/// Classifies an error after connecting: only errors on the instance's side count.
fn fault(e: &Error, reused: bool, answered: bool) -> Fault {
    if e.esource() != &ErrorSource::Upstream {
        return Fault::Client;
    }
    let closed = matches!(
        e.etype(),
        ConnectionClosed | ReadError | WriteError | ConnectError
    );
    if reused && !answered && closed {
        Fault::StalePool
    } else {
        Fault::Upstream
    }
}

#[async_trait]
impl ProxyHttp for Gateway {
    type CTX = Ctx;

    fn new_ctx(&self) -> Ctx {
        let now = Instant::now();
        Ctx {
            start: now,
            deadline: now + self.shared.config.timeouts.deadline,
            route: None,
            tags: Vec::new(),
            service: None,
            tried: Vec::new(),
            current: None,
            retry_on_status: None,
            retries: 0,
            request_id: String::new(),
            trace: None,
            client: None,
            trusted: false,
            https: false,
            answered: false,
            body_bytes: 0,
            local_status: None,
            counted_in_flight: false,
        }
    }

    async fn request_filter(&self, session: &mut Session, ctx: &mut Ctx) -> Result<bool> {
        let shared = &self.shared;
        let cfg = &shared.config;
        ctx.client = session
            .client_addr()
            .and_then(|a| a.as_inet())
            .map(|a| a.ip());
        ctx.https = session.digest().is_some_and(|d| d.ssl_digest.is_some());
        ctx.trusted = ctx.client.is_some_and(|ip| cfg.is_trusted_proxy(ip));
        // Client connection timeouts (HTTP/1.1; the HTTP/2 stream takes the send timeout):
        // the idle wait for the next request, each read of the body, each write of the
        // answer. Pipelined requests are read one after the other, in order.
        let limits = &cfg.limits;
        if session.get_keepalive().is_some() {
            session.set_keepalive(Some(limits.idle_timeout.as_secs()));
        }
        session.set_pipelining_enabled(true);
        session.set_read_timeout(Some(limits.body_read_timeout));
        session.set_total_drain_timeout(Some(limits.body_read_timeout));
        session.set_write_timeout(Some(limits.send_timeout));
        shared.metrics.in_flight.inc();
        ctx.counted_in_flight = true;
        shared.retry_budget.deposit();

        let req = session.req_header();
        let (request_id, _) = headers::request_id(
            req.headers
                .get("x-request-id")
                .and_then(|v| v.to_str().ok()),
            || fastrand::u64(..),
        );
        ctx.request_id = request_id;
        ctx.trace = Some(headers::traceparent(
            req.headers.get("traceparent").and_then(|v| v.to_str().ok()),
            || fastrand::u64(..),
        ));

        let head = admission::Head {
            method: &req.method,
            uri: &req.uri,
            version: req.version,
            headers: &req.headers,
            raw_path: req.raw_path(),
        };
        match admission::admit(shared, &head, ctx.client, Instant::now()) {
            Ok(admitted) => {
                let req = session.req_header_mut();
                if let Some(uri) = admitted.rewritten {
                    req.set_uri(uri);
                }
                match admitted.content_length {
                    ContentLength::Keep => {}
                    ContentLength::Remove => {
                        req.remove_header("content-length");
                    }
                    ContentLength::Canonical(n) => {
                        // A number is always a valid header value.
                        let _ = req.insert_header("content-length", n.to_string());
                    }
                }
                ctx.route = Some(admitted.route);
                ctx.tags = admitted.tags;
                ctx.service = Some(admitted.service);
                Ok(false)
            }
            Err(refused) => {
                ctx.route = refused.route;
                let r = refused.refusal;
                self.answer(session, ctx, r.status, r.body, r.retry_after)
                    .await
            }
        }
    }

    async fn request_body_filter(
        &self,
        _session: &mut Session,
        body: &mut Option<Bytes>,
        _end_of_stream: bool,
        ctx: &mut Ctx,
    ) -> Result<()> {
        let limits = &self.shared.config.limits;
        if let Some(b) = body {
            ctx.body_bytes += b.len() as u64;
            if ctx.body_bytes > self.shared.config.limits.max_body_bytes {
                // The client's fault: counted as such, never against the instance.
                return Err(Error::explain(HTTPStatus(413), "request body too large").into_down());
            }
        }
        if limits.min_body_rate > 0 {
            // The body's deadline: body_read_timeout, plus a second per min_body_rate bytes.
            let earned =
                Duration::from_secs_f64(ctx.body_bytes as f64 / limits.min_body_rate as f64);
            if ctx.start.elapsed() > limits.body_read_timeout + earned {
                // The client's fault: counted as such, never against the instance.
                return Err(Error::explain(
                    HTTPStatus(408),
                    format!("request body slower than {} bytes/s", limits.min_body_rate),
                )
                .into_down());
            }
        }
        Ok(())
    }

    async fn upstream_peer(&self, _session: &mut Session, ctx: &mut Ctx) -> Result<Box<HttpPeer>> {
        let cfg = &self.shared.config;
        if !ctx.tried.is_empty() && Instant::now() >= ctx.deadline {
            return Error::e_explain(HTTPStatus(504), "request deadline passed");
        }
        let Some(route) = ctx.route.clone() else {
            return Error::e_explain(HTTPStatus(404), "no route");
        };
        // A retry takes the freshest view of the service, so that it sees instances that just
        // changed; the first try has the one request_filter just read.
        if !ctx.tried.is_empty() || ctx.service.is_none() {
            if let Some(fresh) = self.shared.mirror.service(&route.service) {
                ctx.service = Some(fresh);
            }
        }
        let Some(service) = ctx.service.clone() else {
            return Error::e_explain(HTTPStatus(503), "service not registered");
        };
        let picked = self.shared.balancer.pick(
            &service,
            &ctx.tags,
            &ctx.tried,
            Instant::now(),
            fastrand::f64,
        );
        let inflight = match picked {
            Ok(p) => p,
            Err(PickError::NoInstance(s)) => {
                return Error::e_explain(HTTPStatus(503), format!("no serving instance of {s}"))
            }
            Err(PickError::Exhausted(s)) => {
                return Error::e_explain(
                    HTTPStatus(502),
                    format!("every instance of {s} tried and failed"),
                )
            }
        };
        if !ctx.tried.is_empty() {
            ctx.retries += 1;
            self.shared.metrics.route(&route.name).retried();
        }
        ctx.tried.push(inflight.instance.id.to_string());
        let mut peer = HttpPeer::new(inflight.addr, false, String::new());
        let left = ctx.deadline.saturating_duration_since(Instant::now());
        peer.options.connection_timeout =
            Some(cfg.timeouts.connect.min(left.max(Duration::from_millis(1))));
        peer.options.total_connection_timeout = Some(cfg.timeouts.connect);
        peer.options.read_timeout = Some(cfg.timeouts.per_try);
        peer.options.write_timeout = Some(cfg.timeouts.per_try);
        peer.options.idle_timeout = Some(Duration::from_secs(60));
        peer.options.alpn = if route.upstream_h2c {
            ALPN::H2
        } else {
            ALPN::H1
        };
        ctx.current = Some(inflight);
        ctx.retry_on_status = None;
        ctx.answered = false;
        Ok(Box::new(peer))
    }

    fn fail_to_connect(
        &self,
        _session: &mut Session,
        peer: &HttpPeer,
        ctx: &mut Ctx,
        mut e: Box<Error>,
    ) -> Box<Error> {
        tracing::debug!(%peer, error = %e, "connect failed");
        self.record_failure(ctx);
        // Nothing reached the instance: any method may go to another one, and the retry
        // costs the instances nothing, so the budget (which protects them from retry storms)
        // does not apply.
        e.set_retry(self.may_retry(ctx, true));
        e
    }

    async fn upstream_request_filter(
        &self,
        session: &mut Session,
        upstream: &mut RequestHeader,
        ctx: &mut Ctx,
    ) -> Result<()> {
        if let Some(route) = &ctx.route {
            if route.strip_prefix {
                let pq = upstream
                    .uri
                    .path_and_query()
                    .map_or("/", |p| p.as_str())
                    .to_string();
                let rewritten = route.rewrite(&pq);
                let uri = rewritten
                    .parse::<http::Uri>()
                    .or_err(InvalidHTTPHeader, "rewritten path")?;
                upstream.set_uri(uri);
            }
        }
        // An HTTP/2 request names its host in :authority; an HTTP/1.1 instance needs Host.
        let h1_upstream = ctx.route.as_ref().is_none_or(|r| !r.upstream_h2c);
        if h1_upstream && upstream.headers.get("host").is_none() {
            if let Some(authority) = session.req_header().uri.authority() {
                upstream.insert_header("host", authority.as_str())?;
            }
        }
        let req = session.req_header();
        let host = req.uri.host().map(str::to_string).or_else(|| {
            upstream
                .headers
                .get("host")
                .and_then(|v| v.to_str().ok())
                .map(str::to_string)
        });
        let forwarding = admission::Forwarding {
            client: ctx.client,
            client_value: None,
            trusted: ctx.trusted,
            https: ctx.https,
            host: host.as_deref(),
            request_id: &ctx.request_id,
            trace: ctx.trace.as_ref(),
            // Pingora's own hop-by-hop removal takes TE whole; trailers are end to end (gRPC).
            te_trailers: headers::te_trailers(req.headers.get("te").and_then(|v| v.to_str().ok())),
            upgrade: session.is_upgrade_req(),
        };
        admission::forwarding_headers(upstream, &forwarding);
        Ok(())
    }

    async fn upstream_response_filter(
        &self,
        session: &mut Session,
        resp: &mut ResponseHeader,
        ctx: &mut Ctx,
    ) -> Result<()> {
        let status = resp.status.as_u16();
        ctx.answered = true;
        if resp.status.is_informational() && status != 101 {
            return Ok(());
        }
        if resp.status.is_server_error() {
            self.record_failure(ctx);
        } else if let Some(c) = &ctx.current {
            self.shared.balancer.success(&c.instance.id);
        }
        let idempotent = session.req_header().method.is_idempotent();
        if matches!(status, 502..=504)
            && idempotent
            && !session.as_ref().retry_buffer_truncated()
            && self.may_retry(ctx, false)
        {
            ctx.retry_on_status = Some(status);
            return Error::e_explain(
                HTTPStatus(status),
                format!("instance answered {status}; retrying on another"),
            );
        }
        if headers::any_hop_by_hop(resp.headers.keys().map(|k| k.as_str())) {
            let connection = resp
                .headers
                .get("connection")
                .and_then(|v| v.to_str().ok())
                .map(str::to_string);
            for name in headers::response_hop_by_hop(connection.as_deref(), status == 101) {
                resp.remove_header(&name);
            }
        }
        Ok(())
    }

    async fn response_filter(
        &self,
        _session: &mut Session,
        resp: &mut ResponseHeader,
        ctx: &mut Ctx,
    ) -> Result<()> {
        if resp.headers.get("x-request-id").is_none() && !ctx.request_id.is_empty() {
            resp.insert_header("x-request-id", ctx.request_id.clone())?;
        }
        Ok(())
    }

    fn error_while_proxy(
        &self,
        peer: &HttpPeer,
        session: &mut Session,
        e: Box<Error>,
        ctx: &mut Ctx,
        client_reused: bool,
    ) -> Box<Error> {
        let mut e = e.more_context(format!("instance {peer}"));
        if ctx.retry_on_status.is_some() {
            // Decided (and paid for) in upstream_response_filter.
            e.set_retry(true);
            return e;
        }
        let idempotent = session.req_header().method.is_idempotent();
        let replayable = idempotent
            && !session.as_ref().retry_buffer_truncated()
            && session.response_written().is_none();
        match fault(&e, client_reused, ctx.answered) {
            Fault::Client => {
                // The client's doing (it went away, or sent what cannot be forwarded): not
                // held against the instance, never retried.
                e.set_retry(false);
            }
            Fault::StalePool => {
                // A pooled connection the instance had closed (it died, or timed the
                // connection out): nothing was answered, so an idempotent request goes to
                // another instance, free like a connect failure. Not counted against the
                // instance either: a fresh connect to a dead one fails, and counts.
                e.set_retry(replayable && self.may_retry(ctx, true));
            }
            Fault::Upstream => {
                self.record_failure(ctx);
                // An idempotent request may go to another instance as long as nothing of the
                // answer has reached the client, within the budget.
                e.set_retry(replayable && self.may_retry(ctx, false));
            }
        }
        e
    }

    async fn fail_to_proxy(&self, session: &mut Session, e: &Error, ctx: &mut Ctx) -> FailToProxy {
        let downstream = *e.esource() == ErrorSource::Downstream;
        let code = match e.etype() {
            HTTPStatus(code) => *code,
            // The client's own slowness: its body stalled (408), or it stopped reading (no
            // answer can reach it).
            ReadTimedout if downstream => 408,
            WriteTimedout if downstream => 0,
            ConnectTimedout | ConnectRefused | ConnectNoRoute | ConnectError
            | TLSHandshakeFailure => 502,
            ReadTimedout | WriteTimedout => 504,
            _ => match e.esource() {
                ErrorSource::Upstream => 502,
                ErrorSource::Downstream => match e.etype() {
                    WriteError | ReadError | ConnectionClosed => 0,
                    _ => 400,
                },
                ErrorSource::Internal | ErrorSource::Unset => 500,
            },
        };
        if code > 0 && session.response_written().is_none() {
            let body = match code {
                404 => "no route\n".to_string(),
                413 => "request body too large\n".to_string(),
                502 => "bad gateway: no instance answered\n".to_string(),
                503 => match &ctx.route {
                    Some(r) => format!("no healthy instance of {}\n", r.service),
                    None => "service unavailable\n".to_string(),
                },
                408 => "request timeout\n".to_string(),
                504 => "gateway timeout\n".to_string(),
                _ => format!("error {code}\n"),
            };
            if let Err(err) = self.answer(session, ctx, code, body, None).await {
                tracing::debug!(error = %err, "could not send the error response");
            }
        }
        ctx.local_status = Some(code);
        FailToProxy {
            error_code: code,
            can_reuse_downstream: false,
        }
    }

    async fn logging(&self, session: &mut Session, e: Option<&Error>, ctx: &mut Ctx) {
        let shared = &self.shared;
        if let Some(e) = e.filter(|e| e.esource() == &ErrorSource::Downstream) {
            let refused = matches!(e.etype(), HTTPStatus(_) | InvalidHTTPHeader);
            admission::client_error(
                &self.shared,
                if refused { "bad_request" } else { "aborted" },
            );
        }
        // The next request head on this connection is under the header deadline again.
        if let Some(conn) = session.stream().and_then(HeaderDeadline::of) {
            conn.next_request();
        }
        if ctx.counted_in_flight {
            shared.metrics.in_flight.dec();
        }
        ctx.current = None;
        let status = session
            .response_written()
            .map(|r| r.status.as_u16())
            .or(ctx.local_status)
            .unwrap_or(0);
        let elapsed = ctx.start.elapsed();
        let route = shared.metrics.route(Self::route_label(ctx));
        shared.metrics.request_done(
            &route,
            ctx.tried.last().map(String::as_str),
            status,
            elapsed,
        );
        if shared.config.access_log == AccessLog::Off {
            return;
        }
        let req = session.req_header();
        let client = ctx.client.map(|c| c.to_string()).unwrap_or_default();
        let trace_id = ctx
            .trace
            .as_ref()
            .map(|t| t.trace_id().to_string())
            .unwrap_or_default();
        let error = e.map(|e| e.to_string());
        let host = req
            .uri
            .host()
            .or_else(|| req.headers.get("host").and_then(|v| v.to_str().ok()))
            .unwrap_or_default();
        let entry = access_log::Entry {
            client: &client,
            method: req.method.as_str(),
            host,
            path: req.uri.path(),
            version: access_log::version_str(req.version),
            status,
            route: route.route(),
            instance: ctx.tried.last().map_or("", String::as_str),
            tries: ctx.tried.len(),
            duration_ms: elapsed.as_secs_f64() * 1000.0,
            request_id: &ctx.request_id,
            trace_id: &trace_id,
            error: error.as_deref(),
        };
        access_log::log(shared.config.access_log, &entry);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_instances_faults_count() {
        let up = |t: ErrorType| Error::new_up(t);
        let down = |t: ErrorType| Error::new_down(t);
        // (error, reused connection, instance answered) → fault
        let cases: Vec<(Box<Error>, bool, bool, Fault)> = vec![
            (down(ReadError), false, false, Fault::Client),
            (down(ConnectionClosed), true, false, Fault::Client),
            (down(WriteError), true, true, Fault::Client),
            (down(InvalidHTTPHeader), false, false, Fault::Client),
            (down(HTTPStatus(413)), false, false, Fault::Client),
            (Error::new_in(InvalidHTTPHeader), true, false, Fault::Client),
            (Error::new(HTTPStatus(413)), false, false, Fault::Client),
            (up(ConnectionClosed), true, false, Fault::StalePool),
            (up(ReadError), true, false, Fault::StalePool),
            (up(WriteError), true, false, Fault::StalePool),
            (up(ConnectionClosed), false, false, Fault::Upstream),
            (up(ConnectionClosed), true, true, Fault::Upstream),
            (up(ReadTimedout), true, false, Fault::Upstream),
            (up(InvalidHTTPHeader), true, false, Fault::Upstream),
            (up(ReadError), false, true, Fault::Upstream),
        ];
        for (e, reused, answered, want) in cases {
            assert_eq!(
                fault(&e, reused, answered),
                want,
                "{e} reused={reused} answered={answered}"
            );
        }
    }
}
