//! The lean path's HTTP/1.1 connections to instances: opened on demand, kept per instance
//! address while idle, and reused most recently used first.
//!
//! A [`Lease`] is one connection lent to one request. It goes back to the pool when the
//! instance's answer has been read to its end ([`Lease::give_back`]); dropped before that (an
//! abandoned answer, an upgrade, an error) it closes its connection, since an HTTP/1.1
//! connection in the middle of a message cannot carry another.
//!
//! Why not hyper-util's pooled client: it keys its pool by scheme and authority strings
//! (formatted and SipHashed per request), spawns a task per request to return a connection
//! whose answer still has a body, and wraps each body to delay its end; the gateway knows the
//! instance's socket address and when the answer's body ends, so none of that is needed
//! (`tests/bench/results/gateway-profile.md`, step 4).

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use http::{Request, Response};
use hyper::body::Incoming;
use hyper::client::conn::http1::{Builder, SendRequest};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use crate::lean::Body;
use crate::FastHash;

/// At most this many idle connections are kept per instance address; more are closed.
pub const MAX_IDLE_PER_ADDR: usize = 512;

#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("connect: {0}")]
    Connect(#[source] std::io::Error),
    #[error("connect: no connection within {0:?}")]
    ConnectTimeout(Duration),
    /// The error itself is the source, so that walking the causes finds it (what went wrong
    /// decides whether another try is free).
    #[error("instance connection")]
    Http(#[from] hyper::Error),
}

impl UpstreamError {
    /// Nothing reached the instance: the connection was never made.
    pub fn is_connect(&self) -> bool {
        matches!(
            self,
            UpstreamError::Connect(_) | UpstreamError::ConnectTimeout(_)
        )
    }
}

/// How connections are made and kept.
#[derive(Debug, Clone)]
pub struct PoolConfig {
    pub connect_timeout: Duration,
    /// An idle connection older than this is closed rather than reused.
    pub idle_timeout: Duration,
    /// Header names go to instances in the case the client wrote them.
    pub preserve_header_case: bool,
}

/// Idle connections by instance address.
pub struct Pool {
    config: PoolConfig,
    idle: Mutex<Idle>,
}

struct Idle {
    by_addr: HashMap<SocketAddr, VecDeque<Parked>, FastHash>,
    /// When every address's list was last swept for expired and closed connections.
    swept: Instant,
}

struct Parked {
    sender: SendRequest<Body>,
    since: Instant,
}

/// A connection lent to one request.
pub struct Lease {
    pool: Arc<Pool>,
    addr: SocketAddr,
    sender: SendRequest<Body>,
}

impl Lease {
    /// The answer was read to its end: the connection may carry another request.
    pub fn give_back(self) {
        let Lease { pool, addr, sender } = self;
        pool.park(addr, sender, Instant::now());
    }
}

impl Pool {
    pub fn new(config: PoolConfig) -> Arc<Pool> {
        Arc::new(Pool {
            config,
            idle: Mutex::new(Idle {
                by_addr: HashMap::default(),
                swept: Instant::now(),
            }),
        })
    }

    /// Sends `req` (origin-form target, `Host` set) to `addr` on an idle connection, or on a
    /// new one when none is left. A pooled connection that turns out closed before the
    /// request was written to it is set aside and the next one tried: that costs the
    /// instance nothing.
    pub async fn send(
        self: &Arc<Self>,
        addr: SocketAddr,
        mut req: Request<Body>,
    ) -> Result<(Response<Incoming>, Lease), UpstreamError> {
        while let Some(mut sender) = self.checkout(addr, Instant::now()) {
            if !sender.is_ready() && sender.ready().await.is_err() {
                continue;
            }
            match sender.try_send_request(req).await {
                Ok(resp) => return Ok((resp, self.lease(addr, sender))),
                Err(mut e) => match e.take_message() {
                    Some(back) => req = back,
                    None => return Err(e.into_error().into()),
                },
            }
        }
        let mut sender = self.connect(addr).await?;
        let resp = sender.send_request(req).await?;
        Ok((resp, self.lease(addr, sender)))
    }

    fn lease(self: &Arc<Self>, addr: SocketAddr, sender: SendRequest<Body>) -> Lease {
        Lease {
            pool: self.clone(),
            addr,
            sender,
        }
    }

    async fn connect(&self, addr: SocketAddr) -> Result<SendRequest<Body>, UpstreamError> {
        let within = self.config.connect_timeout;
        let tcp = match tokio::time::timeout(within, TcpStream::connect(addr)).await {
            Ok(Ok(tcp)) => tcp,
            Ok(Err(e)) => return Err(UpstreamError::Connect(e)),
            Err(_) => return Err(UpstreamError::ConnectTimeout(within)),
        };
        tcp.set_nodelay(true).map_err(UpstreamError::Connect)?;
        let (sender, conn) = Builder::new()
            .preserve_header_case(self.config.preserve_header_case)
            .handshake(TokioIo::new(tcp))
            .await?;
        tokio::spawn(async move {
            if let Err(e) = conn.with_upgrades().await {
                tracing::debug!(error = %e, %addr, "instance connection ended");
            }
        });
        Ok(sender)
    }

    /// The most recently parked live connection to `addr`, if any.
    fn checkout(&self, addr: SocketAddr, now: Instant) -> Option<SendRequest<Body>> {
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        let list = idle.by_addr.get_mut(&addr)?;
        while let Some(parked) = list.pop_back() {
            if now.saturating_duration_since(parked.since) >= self.config.idle_timeout {
                // The rest are older still.
                list.clear();
                break;
            }
            if !parked.sender.is_closed() {
                return Some(parked.sender);
            }
        }
        idle.by_addr.remove(&addr);
        None
    }

    fn park(&self, addr: SocketAddr, sender: SendRequest<Body>, now: Instant) {
        if sender.is_closed() {
            return;
        }
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        let timeout = self.config.idle_timeout;
        if now.saturating_duration_since(idle.swept) >= timeout {
            idle.swept = now;
            idle.by_addr.retain(|_, list| {
                list.retain(|p| {
                    now.saturating_duration_since(p.since) < timeout && !p.sender.is_closed()
                });
                !list.is_empty()
            });
        }
        let list = idle.by_addr.entry(addr).or_default();
        while list
            .front()
            .is_some_and(|p| now.saturating_duration_since(p.since) >= timeout)
        {
            list.pop_front();
        }
        if list.len() >= MAX_IDLE_PER_ADDR {
            list.pop_front();
        }
        list.push_back(Parked { sender, since: now });
    }

    /// Idle connections kept, over every address.
    pub fn idle_count(&self) -> usize {
        let idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        idle.by_addr.values().map(VecDeque::len).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::{BodyExt, Empty};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    fn pool(idle_timeout: Duration) -> Arc<Pool> {
        Pool::new(PoolConfig {
            connect_timeout: Duration::from_secs(2),
            idle_timeout,
            preserve_header_case: true,
        })
    }

    fn get(path: &str) -> Request<Body> {
        Request::builder()
            .uri(path)
            .header("host", "t.test")
            .body(Empty::new().map_err(|never| match never {}).boxed())
            .unwrap()
    }

    /// A keep-alive instance that answers every request on a connection with `hi` and
    /// counts the connections it accepted.
    async fn instance() -> (SocketAddr, Arc<std::sync::atomic::AtomicUsize>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let accepted = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let count = accepted.clone();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 4096];
                    let mut have = Vec::new();
                    loop {
                        let Ok(n) = s.read(&mut buf).await else {
                            return;
                        };
                        if n == 0 {
                            return;
                        }
                        have.extend_from_slice(&buf[..n]);
                        while let Some(end) = have.windows(4).position(|w| w == b"\r\n\r\n") {
                            have.drain(..end + 4);
                            let answer = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nhi";
                            if s.write_all(answer).await.is_err() {
                                return;
                            }
                        }
                    }
                });
            }
        });
        (addr, accepted)
    }

    #[tokio::test]
    async fn a_connection_read_to_its_end_is_reused() {
        let (addr, accepted) = instance().await;
        let pool = pool(Duration::from_secs(60));
        for _ in 0..3 {
            let (resp, lease) = pool.send(addr, get("/")).await.unwrap();
            let body = resp.into_body().collect().await.unwrap().to_bytes();
            assert_eq!(&body[..], b"hi");
            lease.give_back();
            assert_eq!(pool.idle_count(), 1);
        }
        assert_eq!(accepted.load(std::sync::atomic::Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn a_lease_dropped_before_the_end_is_not_reused() {
        let (addr, accepted) = instance().await;
        let pool = pool(Duration::from_secs(60));
        let (_resp, lease) = pool.send(addr, get("/")).await.unwrap();
        drop(lease);
        assert_eq!(pool.idle_count(), 0);
        let (resp, lease) = pool.send(addr, get("/")).await.unwrap();
        resp.into_body().collect().await.unwrap();
        lease.give_back();
        assert_eq!(accepted.load(std::sync::atomic::Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn an_expired_connection_is_not_reused() {
        let (addr, accepted) = instance().await;
        let pool = pool(Duration::ZERO);
        for _ in 0..2 {
            let (resp, lease) = pool.send(addr, get("/")).await.unwrap();
            resp.into_body().collect().await.unwrap();
            lease.give_back();
        }
        assert_eq!(accepted.load(std::sync::atomic::Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn a_connection_the_instance_closed_is_passed_over() {
        // An instance that answers one request per connection and says it closes it.
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                let mut buf = vec![0u8; 4096];
                let _ = s.read(&mut buf).await;
                let _ = s
                    .write_all(
                        b"HTTP/1.1 200 OK\r\nconnection: close\r\ncontent-length: 2\r\n\r\nhi",
                    )
                    .await;
            }
        });
        let pool = pool(Duration::from_secs(60));
        for _ in 0..3 {
            let (resp, lease) = pool.send(addr, get("/")).await.unwrap();
            resp.into_body().collect().await.unwrap();
            lease.give_back();
        }
    }

    #[tokio::test]
    async fn a_refused_connect_is_a_connect_error() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        drop(listener);
        let err = pool(Duration::from_secs(60))
            .send(addr, get("/"))
            .await
            .err()
            .unwrap();
        assert!(err.is_connect(), "{err}");
    }
}
