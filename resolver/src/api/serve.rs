//! Serving the HTTP API's connections: the one place that decides how many there may be and
//! how long each may take.
//!
//! - **Caps.** At most `api.max_connections` at once, and `api.max_connections_per_client`
//!   from one address; beyond them a new connection is closed at once (counted in
//!   `waymark_connections_refused_total{listener="http"}`), so idle or slow clients cannot take every
//!   descriptor that DNS and forwarding need.
//! - **Time.** A request's head must arrive within `api.header_read_timeout`; the same limit
//!   applies to a kept-alive connection waiting for its next request (hyper starts the clock
//!   when it is ready to read a head), so idle connections are closed. Bodies have
//!   `api.body_read_timeout` (see [`super::read_body`]).
//! - **Out of descriptors.** The accept loop pauses instead of spinning
//!   ([`waymark_shared::lifecycle::accept`]).
//! - **Shutdown.** Every connection holds the drain watch; on drain the listener closes,
//!   connections finish the request in hand and close, and long polls and event streams end
//!   (they watch the same drain).

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use waymark_shared::lifecycle::accept::Acceptor;
use waymark_shared::lifecycle::bounded::Admission;
use waymark_shared::lifecycle::drain;

use crate::metrics::Metrics;

/// The limits of the HTTP listener.
#[derive(Debug, Clone)]
pub struct Limits {
    pub max_connections: usize,
    pub max_connections_per_client: usize,
    pub header_read_timeout: Duration,
}

/// Accepts and serves connections until the drain is signalled.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    limits: Limits,
    metrics: Arc<Metrics>,
    drain: drain::Watch,
) {
    let admission: Arc<Admission<IpAddr>> = Admission::new(
        limits.max_connections,
        Some(limits.max_connections_per_client),
    );
    let mut acceptor = Acceptor::new();
    loop {
        let (stream, peer) = tokio::select! {
            accepted = acceptor.accept(&listener) => match accepted {
                Ok(c) => c,
                Err(e) => {
                    tracing::error!(error = %e, "the HTTP listener failed");
                    return;
                }
            },
            _ = drain.signaled() => return,
        };
        let ticket = match admission.try_admit(peer.ip()) {
            Ok(t) => t,
            Err(refused) => {
                metrics.connection_refused("http", refused);
                tracing::debug!(%peer, %refused, "HTTP connection refused");
                drop(stream);
                continue;
            }
        };
        metrics.set_connections("http", admission.in_use());
        let app = app.clone();
        let drain = drain.clone();
        let metrics = metrics.clone();
        let admission = admission.clone();
        let header_read_timeout = limits.header_read_timeout;
        tokio::spawn(async move {
            serve_one(stream, peer, app, header_read_timeout, drain).await;
            drop(ticket);
            metrics.set_connections("http", admission.in_use());
        });
    }
}

async fn serve_one(
    stream: tokio::net::TcpStream,
    peer: SocketAddr,
    app: Router,
    header_read_timeout: Duration,
    drain: drain::Watch,
) {
    let _ = stream.set_nodelay(true);
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(header_read_timeout)
        .keep_alive(true);
    let conn = builder.serve_connection(TokioIo::new(stream), TowerToHyperService::new(app));
    tokio::pin!(conn);
    let result = tokio::select! {
        r = conn.as_mut() => r,
        _ = drain.signaled() => {
            // Finish the request in hand (long responses end on the same signal), then close.
            conn.as_mut().graceful_shutdown();
            conn.await
        }
    };
    if let Err(e) = result {
        tracing::debug!(%peer, error = %e, "HTTP connection ended with an error");
    }
}
