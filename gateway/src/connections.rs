//! The client connections as a whole: every accepted connection goes through [`Guarded`],
//! which counts it, refuses it at once beyond the cap, puts it under the header deadline
//! ([`HeaderDeadline`]) and, for HTTP/2, closes it when idle.
//!
//! HTTP/1.1 idle connections are closed by the keep-alive timeout of the data path (hyper's
//! wait for the next head on the lean path, pingora's keep-alive timeout on the other).
//! HTTP/2 has no request between which to wait, so `Guarded` watches the connection's
//! traffic with one timer per connection, ticking every quarter of `idle_timeout`: after
//! `idle_timeout` without a byte either way (to within a tick) it asks for a graceful close
//! (GOAWAY, through a shutdown signal of the connection's own that also follows the
//! server's), and after another `idle_timeout` of silence it drops the connection (a peer
//! that never answers GOAWAY). A client that keeps the connection busy with PINGs alone is
//! sent GOAWAY after three times `idle_timeout` with no stream open (so that it comes after
//! the GOAWAY of a silent connection): by the watch itself on the lean path, which counts
//! the streams, and by pingora's stream-aware idle timeout, which the gateway sets, on the
//! pingora path.

use std::future::Future;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
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
    /// The lean path, when it carries the connections instead of `inner`.
    lean: Option<Arc<Lean>>,
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
            lean: None,
            policy,
            connections: Arc::new(AtomicU64::new(0)),
            open,
            refused,
        }
    }

    /// Connections go to `lean` instead of the wrapped app.
    pub fn with_lean(mut self, lean: Arc<Lean>) -> Guarded<A> {
        self.lean = Some(lean);
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

/// Ticks with no stream open after which a connection busy with anything else (PINGs) is
/// sent GOAWAY: three times `idle_timeout`.
const STREAMLESS_TICKS: u32 = 3 * TICKS;

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

/// The decision at a tick after `silent` ticks in a row without traffic and `streamless`
/// ticks in a row with no stream open (this one included in both; both counted again from
/// GOAWAY), before or after GOAWAY was sent (whose own bytes count as traffic). After
/// GOAWAY, `idle_timeout` of either ends the connection: a client that keeps it busy
/// without a stream (PINGs, and no answer to the graceful close's own PING) is not waited
/// for longer.
fn idle_step(silent: u32, streamless: u32, goaway_sent: bool) -> IdleStep {
    let streamless_limit = if goaway_sent { TICKS } else { STREAMLESS_TICKS };
    match (
        silent >= TICKS || streamless >= streamless_limit,
        goaway_sent,
    ) {
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
    /// Runs an HTTP/2 connection under the idle watch (see the module docs): `serve` gets
    /// the connection and its own shutdown signal. `streams`, when the data path counts
    /// them, is the number of streams open.
    async fn serve_h2<F: Future<Output = Option<Stream>>>(
        mut stream: HeaderDeadline,
        policy: &ConnectionPolicy,
        shutdown: &ShutdownWatch,
        streams: Option<Arc<AtomicUsize>>,
        serve: impl FnOnce(HeaderDeadline, ShutdownWatch) -> F,
    ) -> Option<Stream> {
        let activity = Arc::new(AtomicU64::new(0));
        stream.count_activity(activity.clone());
        let (tx, rx) = tokio::sync::watch::channel(*shutdown.borrow());
        let inner = serve(stream, rx);
        tokio::pin!(inner);
        let mut server = shutdown.clone();
        let mut server_open = true;
        let every = policy.idle_timeout / TICKS;
        let mut last = activity.load(Ordering::Relaxed);
        let mut silent = 0;
        let mut streamless = 0;
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
                    let open = streams.as_ref().map_or(1, |s| s.load(Ordering::Relaxed));
                    streamless = if open == 0 { streamless + 1 } else { 0 };
                    match idle_step(silent, streamless, goaway_sent) {
                        IdleStep::Wait => {}
                        IdleStep::GoAway => {
                            tracing::debug!(silent, streamless, "idle HTTP/2 connection: GOAWAY");
                            goaway_sent = true;
                            silent = 0;
                            streamless = 0;
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
        let h2 = is_h2(&mut wrapped, self.policy.h2c).await;
        match (&self.lean, h2) {
            (Some(lean), true) => {
                let streams = Arc::new(AtomicUsize::new(0));
                let open = Some(streams.clone());
                let serve = |stream, rx| async move {
                    lean.serve_h2(stream, rx, streams).await;
                    None
                };
                return Self::serve_h2(wrapped, &self.policy, shutdown, open, serve).await;
            }
            (Some(lean), false) => {
                lean.serve(wrapped, shutdown).await;
                return None;
            }
            (None, true) => {
                let inner = &self.inner;
                let serve =
                    |stream, rx| async move { inner.process_new(Box::new(stream), &rx).await };
                return Self::serve_h2(wrapped, &self.policy, shutdown, None, serve).await;
            }
            (None, false) => {}
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
        // (silent ticks in a row, ticks with no stream in a row, GOAWAY sent) → step;
        // traffic resets the first count to 0, an open stream the second.
        let s = STREAMLESS_TICKS;
        let cases = [
            ((0, 0, false), IdleStep::Wait),
            ((1, 1, false), IdleStep::Wait),
            ((TICKS - 1, TICKS - 1, false), IdleStep::Wait),
            ((TICKS, 0, false), IdleStep::GoAway),
            ((TICKS, TICKS, false), IdleStep::GoAway),
            // Busy (PINGs) but with no stream for three idle timeouts.
            ((0, s - 1, false), IdleStep::Wait),
            ((0, s, false), IdleStep::GoAway),
            // After GOAWAY open streams may still finish: another idle_timeout of silence,
            // or of no stream open, ends the connection.
            ((0, 0, true), IdleStep::Wait),
            ((TICKS - 1, TICKS - 1, true), IdleStep::Wait),
            ((0, TICKS, true), IdleStep::Drop),
            ((TICKS, 0, true), IdleStep::Drop),
        ];
        for ((silent, streamless, sent), want) in cases {
            assert_eq!(
                idle_step(silent, streamless, sent),
                want,
                "{silent} {streamless} {sent}"
            );
        }
    }
}
