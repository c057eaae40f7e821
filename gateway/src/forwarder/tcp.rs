//! TCP mode: one instance per connection.
//!
//! The instance is picked among those the shared selection serves and that are registered
//! with the listener's port, by the balancer (two choices, least outstanding, ejected ones
//! left out). A refused or timed-out connect ejects that instance at once and is retried on
//! another before the client sees anything; only when every try failed is the client's
//! connection closed. Then bytes are copied both ways: an end of stream from one side is
//! passed on as a half-close (shutdown of writing) and the other direction goes on. The
//! connection ends when both directions have ended, on an error, after `tcp.idle_timeout`
//! without a byte either way, or after `tcp.max_duration`.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use waymark_shared::lifecycle::drain;

use super::listeners::Target;
use super::metrics::ServiceDirection;
use super::upstream::{Conn, UpstreamError};
use super::{Forwarder, Metrics};
use crate::balancer::{InFlight, PickError, Verdict};

#[derive(Debug, thiserror::Error)]
pub enum TcpError {
    #[error("{0}")]
    Pick(#[from] PickError),
    #[error("service {0} is not in the registry")]
    Unknown(String),
    #[error("{0}")]
    Refused(UpstreamError),
}

/// Serves one client connection.
pub async fn serve(
    fwd: &Forwarder,
    target: &Target,
    client: TcpStream,
    peer: SocketAddr,
    _drain: &drain::Watch,
) {
    let started = Instant::now();
    let (upstream, inflight, tries) = match connect(fwd, target).await {
        Ok(c) => c,
        Err(e) => {
            fwd.metrics
                .no_instance
                .get_or_create(&Metrics::service(&target.service))
                .inc();
            tracing::warn!(%peer, service = %target.service, port = target.port, error = %e, "connection closed: no instance to call");
            return;
        }
    };
    let instance = inflight.instance.id.to_string();
    let (sent, received, end) = relay(
        client,
        upstream,
        fwd.config.tcp.idle_timeout,
        fwd.config.tcp.max_duration,
    )
    .await;
    drop(inflight);
    let label = |direction| ServiceDirection {
        service: target.service.clone(),
        direction,
    };
    fwd.metrics.bytes.get_or_create(&label("sent")).inc_by(sent);
    fwd.metrics
        .bytes
        .get_or_create(&label("received"))
        .inc_by(received);
    tracing::info!(
        target: "access",
        %peer,
        service = %target.service,
        port = target.port,
        %instance,
        tries,
        sent,
        received,
        end,
        ms = started.elapsed().as_millis() as u64,
        "tcp"
    );
}

/// Connects to an instance (directly or through its host's forwarder), trying others after
/// a refused or timed-out connect (up to `retry.attempts` tries, each on an instance not
/// tried yet). A refusal by the instance's host's policy ends the tries.
async fn connect(fwd: &Forwarder, target: &Target) -> Result<(Conn, InFlight, u32), TcpError> {
    let label = Metrics::service(&target.service);
    let mut avoid: Vec<String> = Vec::new();
    for attempt in 0..fwd.config.retry.attempts {
        let view = fwd
            .mirror
            .service(&target.service)
            .ok_or_else(|| TcpError::Unknown(target.service.clone()))?;
        let pick = match fwd.balancer.pick_where(
            &view,
            target.tags(),
            |i| i.port == target.port,
            &avoid,
            Instant::now(),
            fastrand::f64,
        ) {
            Ok(p) => p,
            Err(e) => return Err(e.into()),
        };
        if attempt > 0 {
            fwd.metrics.retries.get_or_create(&label).inc();
        }
        let id = pick.instance.id.to_string();
        let e = match fwd.upstreams.connect(pick.addr).await {
            Ok(conn) => {
                fwd.balancer.success(&id);
                return Ok((conn, pick, attempt + 1));
            }
            Err(e) if e.is_refusal() => return Err(TcpError::Refused(e)),
            Err(e) => e,
        };
        tracing::info!(service = %target.service, instance = %id, addr = %pick.addr, error = %e, "connect failed; trying another instance");
        fwd.metrics.connect_failures.get_or_create(&label).inc();
        if e.ejects() {
            if let Verdict::Ejected(d) = fwd.balancer.hard_failure(&view, &id, Instant::now()) {
                fwd.metrics.ejections.get_or_create(&label).inc();
                tracing::info!(service = %target.service, instance = %id, secs = d.as_secs_f64(), "instance ejected");
            }
        }
        avoid.push(id);
    }
    Err(PickError::Exhausted(target.service.clone()).into())
}

/// The last activity on a connection, in milliseconds after `start`.
struct Activity {
    start: Instant,
    last_ms: AtomicU64,
}

impl Activity {
    fn touch(&self) {
        let ms = self.start.elapsed().as_millis() as u64;
        self.last_ms.store(ms, Ordering::Relaxed);
    }

    /// Resolves once nothing has moved for `idle`.
    async fn idle_for(&self, idle: Duration) {
        loop {
            let last = self.start + Duration::from_millis(self.last_ms.load(Ordering::Relaxed));
            let deadline = last + idle;
            if Instant::now() >= deadline {
                return;
            }
            tokio::time::sleep_until(deadline.into()).await;
        }
    }
}

/// Copies one direction until end of stream, then shuts the writer down (a half-close);
/// returns the bytes copied.
async fn pipe<R, W>(
    mut from: R,
    mut to: W,
    activity: &Activity,
    copied: &AtomicU64,
) -> std::io::Result<()>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = from.read(&mut buf).await?;
        if n == 0 {
            to.shutdown().await?;
            return Ok(());
        }
        activity.touch();
        to.write_all(&buf[..n]).await?;
        copied.fetch_add(n as u64, Ordering::Relaxed);
        activity.touch();
    }
}

/// Relays bytes both ways; returns bytes sent (client → instance), received, and how it
/// ended (`closed`, `error`, `idle`, `max_duration`, `drain`).
pub async fn relay<U>(
    mut client: TcpStream,
    upstream: U,
    idle: Duration,
    max_duration: Duration,
) -> (u64, u64, &'static str)
where
    U: AsyncRead + AsyncWrite + Unpin,
{
    let activity = Activity {
        start: Instant::now(),
        last_ms: AtomicU64::new(0),
    };
    let (sent, received) = (AtomicU64::new(0), AtomicU64::new(0));
    let end = {
        let (cr, cw) = client.split();
        let (ur, uw) = tokio::io::split(upstream);
        let both = async {
            tokio::try_join!(
                pipe(cr, uw, &activity, &sent),
                pipe(ur, cw, &activity, &received)
            )
        };
        let limit = async {
            if max_duration.is_zero() {
                std::future::pending::<()>().await
            } else {
                tokio::time::sleep(max_duration).await
            }
        };
        tokio::select! {
            r = both => if r.is_ok() { "closed" } else { "error" },
            _ = activity.idle_for(idle) => "idle",
            _ = limit => "max_duration",
        }
    };
    (
        sent.load(Ordering::Relaxed),
        received.load(Ordering::Relaxed),
        end,
    )
}

#[cfg(test)]
mod tests {
    use tokio::net::TcpListener;

    use super::*;

    /// A connected pair of TCP streams on loopback.
    async fn pair() -> (TcpStream, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let a = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        let (b, _) = l.accept().await.unwrap();
        (a, b)
    }

    #[tokio::test]
    async fn half_close_passes_through_and_the_other_way_goes_on() {
        let (mut client, client_side) = pair().await;
        let (upstream_side, mut instance) = pair().await;
        let relay = tokio::spawn(relay(
            client_side,
            upstream_side,
            Duration::from_secs(5),
            Duration::ZERO,
        ));
        client.write_all(b"ping").await.unwrap();
        client.shutdown().await.unwrap();
        let mut got = Vec::new();
        instance.read_to_end(&mut got).await.unwrap();
        assert_eq!(
            got, b"ping",
            "the instance sees the bytes, then end of stream"
        );
        instance.write_all(b"pong after your EOF").await.unwrap();
        drop(instance);
        let mut back = Vec::new();
        client.read_to_end(&mut back).await.unwrap();
        assert_eq!(back, b"pong after your EOF");
        let (sent, received, end) = relay.await.unwrap();
        assert_eq!((sent, received, end), (4, 19, "closed"));
    }

    #[tokio::test]
    async fn idle_and_total_limits_end_a_connection() {
        let (_client, client_side) = pair().await;
        let (upstream_side, _instance) = pair().await;
        let t0 = Instant::now();
        let (_, _, end) = relay(
            client_side,
            upstream_side,
            Duration::from_millis(100),
            Duration::ZERO,
        )
        .await;
        assert_eq!(end, "idle");
        assert!(t0.elapsed() < Duration::from_secs(2));

        let (mut client, client_side) = pair().await;
        let (upstream_side, _instance) = pair().await;
        let chatter = tokio::spawn(async move {
            for _ in 0..100 {
                if client.write_all(b".").await.is_err() {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        });
        let (_, _, end) = relay(
            client_side,
            upstream_side,
            Duration::from_millis(100),
            Duration::from_millis(300),
        )
        .await;
        assert_eq!(
            end, "max_duration",
            "traffic keeps it from idling, not past the limit"
        );
        chatter.abort();
    }
}
