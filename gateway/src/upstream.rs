//! The lean path's HTTP/1.1 connections to instances: opened on demand, kept per instance
//! address while idle, and reused most recently used first. The pool keeps either kind of
//! connection the lean path makes ([`Pooled`]): its own codec's ([`H1Conn`], which gives
//! itself back when its answer's body is read) or, for `preserve_header_case`, hyper's.
//!
//! A [`Lease`] is one hyper connection lent to one request. It goes back to the pool when the
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

use crate::h1_client::{AnswerBody, AnswerHead, H1Conn, H1Error, Outgoing};
use crate::lean::Body;
use crate::FastHash;

/// At most this many idle connections are kept per instance address; more are closed.
pub const MAX_IDLE_PER_ADDR: usize = 512;

/// A connection to an instance that was not made: nothing reached it.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("connect: {0}")]
    Io(#[source] std::io::Error),
    #[error("connect: no connection within {0:?}")]
    Timeout(Duration),
}

/// A TCP connection to `addr` within `within`, Nagle off: what both HTTP/1.1 clients start
/// from.
pub async fn dial(addr: SocketAddr, within: Duration) -> Result<TcpStream, ConnectError> {
    let tcp = match tokio::time::timeout(within, TcpStream::connect(addr)).await {
        Ok(Ok(tcp)) => tcp,
        Ok(Err(e)) => return Err(ConnectError::Io(e)),
        Err(_) => return Err(ConnectError::Timeout(within)),
    };
    tcp.set_nodelay(true).map_err(ConnectError::Io)?;
    Ok(tcp)
}

#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error(transparent)]
    Connect(#[from] ConnectError),
    /// The error itself is the source, so that walking the causes finds it (what went wrong
    /// decides whether another try is free).
    #[error("instance connection")]
    Http(#[from] hyper::Error),
}

impl UpstreamError {
    /// Nothing reached the instance: the connection was never made.
    pub fn is_connect(&self) -> bool {
        matches!(self, UpstreamError::Connect(_))
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

/// A connection the pool can keep.
pub trait Pooled: Send + 'static {
    /// Closed by the instance, or otherwise unfit for another request.
    fn is_closed(&self) -> bool;
}

impl Pooled for SendRequest<Body> {
    fn is_closed(&self) -> bool {
        SendRequest::is_closed(self)
    }
}

/// Idle connections by instance address.
pub struct Pool<C> {
    config: PoolConfig,
    idle: Mutex<Idle<C>>,
}

struct Idle<C> {
    by_addr: HashMap<SocketAddr, VecDeque<Parked<C>>, FastHash>,
    /// When every address's list was last swept for expired and closed connections.
    swept: Instant,
}

struct Parked<C> {
    conn: C,
    since: Instant,
}

/// A hyper connection lent to one request.
pub struct Lease {
    pool: Arc<Pool<SendRequest<Body>>>,
    addr: SocketAddr,
    sender: SendRequest<Body>,
}

impl Lease {
    /// The answer was read to its end: the connection may carry another request.
    pub fn give_back(self) {
        let Lease { pool, addr, sender } = self;
        pool.park(addr, sender);
    }
}

impl<C: Pooled> Pool<C> {
    pub fn new(config: PoolConfig) -> Arc<Pool<C>> {
        Arc::new(Pool {
            config,
            idle: Mutex::new(Idle {
                by_addr: HashMap::default(),
                swept: Instant::now(),
            }),
        })
    }

    /// The most recently parked live connection to `addr`, if any.
    fn checkout(&self, addr: SocketAddr, now: Instant) -> Option<C> {
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        let list = idle.by_addr.get_mut(&addr)?;
        while let Some(parked) = list.pop_back() {
            if now.saturating_duration_since(parked.since) >= self.config.idle_timeout {
                // The rest are older still.
                list.clear();
                break;
            }
            if !parked.conn.is_closed() {
                return Some(parked.conn);
            }
        }
        idle.by_addr.remove(&addr);
        None
    }

    /// Keeps `conn`, read to the end of its last answer, for another request to `addr`.
    pub fn park(&self, addr: SocketAddr, conn: C) {
        self.park_at(addr, conn, Instant::now())
    }

    fn park_at(&self, addr: SocketAddr, conn: C, now: Instant) {
        if conn.is_closed() {
            return;
        }
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        let timeout = self.config.idle_timeout;
        if now.saturating_duration_since(idle.swept) >= timeout {
            idle.swept = now;
            idle.by_addr.retain(|_, list| {
                list.retain(|p| {
                    now.saturating_duration_since(p.since) < timeout && !p.conn.is_closed()
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
        list.push_back(Parked { conn, since: now });
    }

    /// Idle connections kept, over every address.
    pub fn idle_count(&self) -> usize {
        let idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        idle.by_addr.values().map(VecDeque::len).sum()
    }
}

/// An answer from an instance on the gateway's own codec.
pub enum Answered {
    /// Its body reads from the connection, and gives it back to the pool at its end.
    Response(http::response::Parts, AnswerBody),
    /// 101: the connection, and what the instance sent past the head, for the tunnel.
    Upgraded(http::response::Parts, TcpStream, bytes::Bytes),
}

impl Pool<H1Conn> {
    /// Sends a request (`head` from [`encode_head`](crate::h1_client::encode_head), then
    /// `out`) to `addr` on an idle connection (one idle since before `now` less the idle
    /// timeout is closed), or on a new one when none is left.
    pub async fn exchange(
        self: &Arc<Self>,
        addr: SocketAddr,
        head: &[u8],
        out: Outgoing,
        head_request: bool,
        now: Instant,
    ) -> Result<Answered, H1Error> {
        let mut conn = match self.checkout(addr, now) {
            Some(conn) => conn,
            None => H1Conn::connect(addr, self.config.connect_timeout).await?,
        };
        let AnswerHead {
            parts,
            framing,
            keep_alive,
        } = conn.exchange(head, out, head_request).await?;
        if parts.status == http::StatusCode::SWITCHING_PROTOCOLS {
            let (io, rest) = conn.into_upgraded();
            return Ok(Answered::Upgraded(parts, io, rest));
        }
        let body = AnswerBody::new(conn, framing, keep_alive, Some((self.clone(), addr)));
        Ok(Answered::Response(parts, body))
    }
}

impl Pool<SendRequest<Body>> {
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
        let tcp = dial(addr, self.config.connect_timeout).await?;
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
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::h1_client::encode_head;
    use bytes::Bytes;
    use http_body_util::{BodyExt, Empty};
    use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    /// Either kind of pool, driven the same way.
    enum Kind {
        Hyper(Arc<Pool<SendRequest<Body>>>),
        Own(Arc<Pool<H1Conn>>),
    }

    fn pools(idle_timeout: Duration) -> [Kind; 2] {
        let config = PoolConfig {
            connect_timeout: Duration::from_secs(2),
            idle_timeout,
            preserve_header_case: true,
        };
        [
            Kind::Hyper(Pool::new(config.clone())),
            Kind::Own(Pool::new(config)),
        ]
    }

    impl Kind {
        /// One GET; its answer's body read to the end when `read` (then the connection
        /// goes back), or dropped unread.
        async fn get(&self, addr: SocketAddr, read: bool) -> Result<Bytes, String> {
            match self {
                Kind::Hyper(pool) => {
                    let req = Request::builder()
                        .uri("/")
                        .header("host", "t.test")
                        .body(Empty::new().map_err(|never| match never {}).boxed())
                        .unwrap();
                    let (resp, lease) = pool.send(addr, req).await.map_err(|e| e.to_string())?;
                    if !read {
                        return Ok(Bytes::new());
                    }
                    let body = resp.into_body().collect().await.unwrap().to_bytes();
                    lease.give_back();
                    Ok(body)
                }
                Kind::Own(pool) => {
                    let mut headers = http::HeaderMap::new();
                    headers.insert("host", "t.test".parse().unwrap());
                    let head = encode_head(&http::Method::GET, "/", &headers, &[], false);
                    let answered = pool
                        .exchange(
                            addr,
                            &head,
                            Outgoing::Bytes(Bytes::new()),
                            false,
                            Instant::now(),
                        )
                        .await
                        .map_err(|e| e.to_string())?;
                    let Answered::Response(_, body) = answered else {
                        return Err("upgraded".into());
                    };
                    if !read {
                        return Ok(Bytes::new());
                    }
                    Ok(body.collect().await.unwrap().to_bytes())
                }
            }
        }

        fn idle_count(&self) -> usize {
            match self {
                Kind::Hyper(pool) => pool.idle_count(),
                Kind::Own(pool) => pool.idle_count(),
            }
        }

        fn name(&self) -> &'static str {
            match self {
                Kind::Hyper(_) => "hyper",
                Kind::Own(_) => "own",
            }
        }
    }

    /// A keep-alive instance that answers every request on a connection with `answer` and
    /// counts the connections it accepted; with `close_after`, it closes each connection
    /// after its first answer and counts the closes in `closed`.
    async fn instance(
        answer: &'static [u8],
        close_after: bool,
    ) -> (SocketAddr, Arc<AtomicUsize>, Arc<AtomicUsize>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let closed = Arc::new(AtomicUsize::new(0));
        let (count, closes) = (accepted.clone(), closed.clone());
        tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                count.fetch_add(1, SeqCst);
                let closes = closes.clone();
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
                            if s.write_all(answer).await.is_err() {
                                return;
                            }
                            if close_after {
                                drop(s);
                                closes.fetch_add(1, SeqCst);
                                return;
                            }
                        }
                    }
                });
            }
        });
        (addr, accepted, closed)
    }

    const HI: &[u8] = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nhi";

    #[tokio::test]
    async fn a_connection_read_to_its_end_is_reused() {
        for pool in pools(Duration::from_secs(60)) {
            let (addr, accepted, _) = instance(HI, false).await;
            for _ in 0..3 {
                assert_eq!(&pool.get(addr, true).await.unwrap()[..], b"hi");
                assert_eq!(pool.idle_count(), 1, "{}", pool.name());
            }
            assert_eq!(accepted.load(SeqCst), 1, "{}", pool.name());
        }
    }

    #[tokio::test]
    async fn a_connection_dropped_before_the_end_is_not_reused() {
        for pool in pools(Duration::from_secs(60)) {
            let (addr, accepted, _) = instance(HI, false).await;
            pool.get(addr, false).await.unwrap();
            assert_eq!(pool.idle_count(), 0, "{}", pool.name());
            pool.get(addr, true).await.unwrap();
            assert_eq!(accepted.load(SeqCst), 2, "{}", pool.name());
        }
    }

    #[tokio::test]
    async fn an_expired_connection_is_not_reused() {
        for pool in pools(Duration::ZERO) {
            let (addr, accepted, _) = instance(HI, false).await;
            for _ in 0..2 {
                pool.get(addr, true).await.unwrap();
            }
            assert_eq!(accepted.load(SeqCst), 2, "{}", pool.name());
        }
    }

    #[tokio::test]
    async fn a_connection_that_says_close_is_not_kept() {
        const CLOSE: &[u8] = b"HTTP/1.1 200 OK\r\nconnection: close\r\ncontent-length: 2\r\n\r\nhi";
        for pool in pools(Duration::from_secs(60)) {
            let (addr, accepted, _) = instance(CLOSE, true).await;
            for _ in 0..3 {
                assert_eq!(&pool.get(addr, true).await.unwrap()[..], b"hi");
            }
            assert_eq!(accepted.load(SeqCst), 3, "{}", pool.name());
        }
    }

    #[tokio::test]
    async fn a_kept_connection_the_instance_closed_is_passed_over() {
        for pool in pools(Duration::from_secs(60)) {
            // Answers as if it kept the connection, then closes it.
            let (addr, accepted, closed) = instance(HI, true).await;
            for round in 1..=3 {
                assert_eq!(&pool.get(addr, true).await.unwrap()[..], b"hi");
                while closed.load(SeqCst) < round {
                    tokio::task::yield_now().await;
                }
                // The reactor sees the close.
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            assert_eq!(accepted.load(SeqCst), 3, "{}", pool.name());
        }
    }

    #[tokio::test]
    async fn a_refused_connect_is_a_connect_error() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        drop(listener);
        let config = PoolConfig {
            connect_timeout: Duration::from_secs(2),
            idle_timeout: Duration::from_secs(60),
            preserve_header_case: false,
        };
        let get = Request::builder()
            .uri("/")
            .header("host", "t.test")
            .body(Empty::new().map_err(|never| match never {}).boxed())
            .unwrap();
        let hyper = Pool::<SendRequest<Body>>::new(config.clone());
        assert!(hyper.send(addr, get).await.err().unwrap().is_connect());
        let own = Pool::<H1Conn>::new(config);
        let out = Outgoing::Bytes(Bytes::new());
        let err = own
            .exchange(addr, b"GET / HTTP/1.1\r\n\r\n", out, false, Instant::now())
            .await;
        assert!(err.err().unwrap().is_connect());
    }
}
