//! The client connections as a whole: every accepted connection goes through [`Guarded`],
//! which counts it, refuses it at once beyond the cap, puts it under the header deadline
//! ([`HeaderDeadline`]) and, for HTTP/2, closes it when idle.
//!
//! HTTP/1.1 idle connections are closed by pingora's keep-alive timeout, which the proxy sets
//! on each request. HTTP/2 has no request between which to wait, so `Guarded` watches the
//! connection's traffic with one timer per connection, ticking every quarter of
//! `idle_timeout`: after `idle_timeout` without a byte either way (to within a tick) it asks
//! for a graceful close (GOAWAY, through a shutdown signal of the connection's own that also
//! follows the server's), and after another `idle_timeout` of silence it drops the
//! connection (a peer that never answers GOAWAY). A client that keeps
//! the connection busy with PINGs alone is closed by pingora's stream-aware idle timeout
//! (three times `idle_timeout` with no stream open, so that it comes after the GOAWAY of a
//! silent connection), which the gateway also sets.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use pingora::apps::ServerApp;
use pingora::protocols::{Peek, Ssl, Stream, ALPN};
use pingora::server::ShutdownWatch;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;

use crate::header_deadline::HeaderDeadline;
use crate::lean::Lean;

/// The HTTP/2 connection preface (RFC 9113 §3.4).
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// What [`Guarded`] needs to know about the connections it takes.
#[derive(Debug, Clone)]
pub struct ConnectionPolicy {
    /// Total deadline for each request head.
    pub header_read_timeout: Duration,
    /// Idle HTTP/2 connections: GOAWAY after this without traffic.
    pub idle_timeout: Duration,
    /// Connections open at once; more are closed at once.
    pub max_connections: usize,
    /// Whether the plain listener takes HTTP/2 by prior knowledge.
    pub h2c: bool,
}

/// A pingora server app that guards every connection (see the module docs), then hands it
/// to the wrapped app (the proxy). Its count of open connections lets a graceful shutdown
/// end as soon as none is left.
pub struct Guarded<A> {
    inner: Arc<A>,
    /// The lean HTTP/1.1 path, when it carries HTTP/1.1 instead of `inner`.
    h1: Option<Arc<Lean>>,
    policy: ConnectionPolicy,
    connections: Arc<AtomicU64>,
    open: Gauge,
    refused: Counter,
}

impl<A> Guarded<A> {
    /// `open` and `refused` are the metrics to keep: connections open now, and those closed
    /// at once for being over the cap.
    pub fn new(inner: A, policy: ConnectionPolicy, open: Gauge, refused: Counter) -> Guarded<A> {
        Guarded {
            inner: Arc::new(inner),
            h1: None,
            policy,
            connections: Arc::new(AtomicU64::new(0)),
            open,
            refused,
        }
    }

    /// HTTP/1.1 connections go to `lean` instead of the wrapped app.
    pub fn with_lean_h1(mut self, lean: Arc<Lean>) -> Guarded<A> {
        self.h1 = Some(lean);
        self
    }

    pub fn inner(&self) -> &A {
        &self.inner
    }

    /// The number of connections inside the app now (idle kept-alive ones included).
    pub fn connections(&self) -> Arc<AtomicU64> {
        self.connections.clone()
    }
}

/// Counts one connection for as long as it lives (however its future ends).
struct Counted {
    count: Arc<AtomicU64>,
    open: Gauge,
}

impl Counted {
    /// Counts the connection; returns it with the number open now, itself included.
    fn new(count: &Arc<AtomicU64>, open: &Gauge) -> (Counted, u64) {
        let now = count.fetch_add(1, Ordering::AcqRel) + 1;
        open.inc();
        (
            Counted {
                count: count.clone(),
                open: open.clone(),
            },
            now,
        )
    }
}

impl Drop for Counted {
    fn drop(&mut self) {
        self.count.fetch_sub(1, Ordering::AcqRel);
        self.open.dec();
    }
}

/// Ticks of the HTTP/2 idle watch per `idle_timeout`.
const TICKS: u32 = 4;

/// What the HTTP/2 idle watch decides at a tick.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum IdleStep {
    /// Traffic since the last tick, or not silent long enough yet: keep watching.
    Wait,
    /// Silent for `idle_timeout`: send GOAWAY.
    GoAway,
    /// Silent for `idle_timeout` again after GOAWAY: drop the connection.
    Drop,
}

/// The decision at a tick after `silent` ticks in a row without traffic (this one included),
/// before or after GOAWAY was sent (whose own bytes count as traffic).
fn idle_step(silent: u32, goaway_sent: bool) -> IdleStep {
    match (silent >= TICKS, goaway_sent) {
        (false, _) => IdleStep::Wait,
        (true, false) => IdleStep::GoAway,
        (true, true) => IdleStep::Drop,
    }
}

/// Whether the connection speaks HTTP/2: by ALPN on TLS, by the preface with h2c.
async fn is_h2(stream: &mut HeaderDeadline, h2c: bool) -> bool {
    if stream.get_ssl_digest().is_some() {
        return matches!(stream.selected_alpn_proto(), Some(ALPN::H2));
    }
    if !h2c {
        return false;
    }
    let mut buf = [0u8; H2_PREFACE.len()];
    // Peeking is bounded by the header deadline; pingora peeks the same bytes next.
    matches!(stream.try_peek(&mut buf).await, Ok(true)) && buf == H2_PREFACE
}

impl<A: ServerApp + Send + Sync + 'static> Guarded<A> {
    /// Runs an HTTP/2 connection under the idle watch (see the module docs).
    async fn serve_h2(
        self: &Arc<Self>,
        mut stream: HeaderDeadline,
        shutdown: &ShutdownWatch,
    ) -> Option<Stream> {
        let activity = Arc::new(AtomicU64::new(0));
        stream.count_activity(activity.clone());
        let (tx, rx) = tokio::sync::watch::channel(*shutdown.borrow());
        let inner = self.inner.process_new(Box::new(stream), &rx);
        tokio::pin!(inner);
        let mut server = shutdown.clone();
        let mut server_open = true;
        let every = self.policy.idle_timeout / TICKS;
        let mut last = activity.load(Ordering::Relaxed);
        let mut silent = 0;
        let mut goaway_sent = false;
        let mut tick = Box::pin(tokio::time::sleep(every));
        loop {
            tokio::select! {
                done = &mut inner => return done,
                changed = server.changed(), if server_open => match changed {
                    Ok(()) => {
                        if *server.borrow() {
                            let _ = tx.send(true);
                        }
                    }
                    Err(_) => server_open = false,
                },
                () = &mut tick => {
                    let now = activity.load(Ordering::Relaxed);
                    silent = if now == last { silent + 1 } else { 0 };
                    last = now;
                    match idle_step(silent, goaway_sent) {
                        IdleStep::Wait => {}
                        IdleStep::GoAway => {
                            tracing::debug!("idle HTTP/2 connection: GOAWAY");
                            goaway_sent = true;
                            silent = 0;
                            let _ = tx.send(true);
                        }
                        IdleStep::Drop => {
                            tracing::debug!("HTTP/2 connection silent after GOAWAY: closed");
                            return None;
                        }
                    }
                    tick.as_mut().reset(tokio::time::Instant::now() + every);
                }
            }
        }
    }
}

#[async_trait]
impl<A: ServerApp + Send + Sync + 'static> ServerApp for Guarded<A> {
    async fn process_new(
        self: &Arc<Self>,
        stream: Stream,
        shutdown: &ShutdownWatch,
    ) -> Option<Stream> {
        let (_counted, open) = Counted::new(&self.connections, &self.open);
        if open > self.policy.max_connections as u64 {
            self.refused.inc();
            tracing::debug!(
                max = self.policy.max_connections,
                "connection refused: too many open"
            );
            return None;
        }
        let mut wrapped = HeaderDeadline::new(stream, self.policy.header_read_timeout);
        if is_h2(&mut wrapped, self.policy.h2c).await {
            return self.serve_h2(wrapped, shutdown).await;
        }
        if let Some(lean) = &self.h1 {
            lean.serve(wrapped, shutdown).await;
            return None;
        }
        self.inner.process_new(Box::new(wrapped), shutdown).await
    }

    async fn cleanup(&self) {
        self.inner.cleanup().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_idle_watch_goes_away_then_drops() {
        // (silent ticks in a row, GOAWAY sent) → step; traffic resets the count to 0.
        let cases = [
            ((0, false), IdleStep::Wait),
            ((1, false), IdleStep::Wait),
            ((TICKS - 1, false), IdleStep::Wait),
            ((TICKS, false), IdleStep::GoAway),
            // After GOAWAY streams may still finish: another idle_timeout of silence.
            ((0, true), IdleStep::Wait),
            ((TICKS - 1, true), IdleStep::Wait),
            ((TICKS, true), IdleStep::Drop),
        ];
        for ((silent, sent), want) in cases {
            assert_eq!(idle_step(silent, sent), want, "{silent} {sent}");
        }
    }
}
