//! Forwarder to forwarder: a call to an instance on another host travels as an HTTP/2 CONNECT
//! stream (naming the instance's `ip:port`) over one mutual-TLS connection per pair of hosts,
//! as Istio's HBONE does. In the steady state a call opens a stream and pays no handshake.
//!
//! - [`TunnelPool`] (outbound): one pooled connection per peer host, made with the host's
//!   current identity and checked against the peer's host name; a connection made with an
//!   identity since renewed takes no new streams (its open streams finish on it).
//! - [`serve_inbound`]: the inbound listener. It accepts only peers with a mesh certificate,
//!   and opens a stream only to a target that [`Admit`] allows: the forwarder allows its own
//!   host's instances, so the listener is never an open proxy. A target that does not accept
//!   the connection (502) or that this host does not know (404) tells the calling forwarder
//!   to try another instance; a refusal by policy (403) does not.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http::{Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper::client::conn::http2::SendRequest;
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::pki_types::ServerName;
use tokio::net::{TcpListener, TcpStream};

use crate::identity::{peer_host, Identity, Material};

use empty::Empty;

/// An empty body, for CONNECT requests and their answers.
mod empty {
    use std::pin::Pin;
    use std::task::{Context, Poll};

    use bytes::Bytes;
    use hyper::body::{Body, Frame, SizeHint};

    #[derive(Debug, Default, Clone, Copy)]
    pub struct Empty;

    impl Body for Empty {
        type Data = Bytes;
        type Error = std::convert::Infallible;

        fn poll_frame(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
            Poll::Ready(None)
        }

        fn is_end_stream(&self) -> bool {
            true
        }

        fn size_hint(&self) -> SizeHint {
            SizeHint::with_exact(0)
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum TunnelError {
    #[error("cannot reach the forwarder of {host} at {addr}: {message}")]
    Peer {
        host: String,
        addr: SocketAddr,
        message: String,
    },
    #[error("the forwarder of {host} refused {target}: {reason}")]
    Refused {
        host: String,
        target: SocketAddr,
        reason: String,
    },
    #[error("{target} did not accept the connection from its host's forwarder")]
    TargetUnreachable { target: SocketAddr },
    /// The peer's forwarder does not know `target` as one of its host's instances (yet, or
    /// any more): its view of the registry and the caller's differ for a moment.
    #[error("the forwarder of {host} has no instance at {target}")]
    NotHere { host: String, target: SocketAddr },
}

impl TunnelError {
    /// Whether another instance may be tried (the failure is this instance's or this path's).
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            TunnelError::Peer { .. }
                | TunnelError::TargetUnreachable { .. }
                | TunnelError::NotHere { .. }
        )
    }
}

/// A forwarder of another host.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Peer {
    pub host: String,
    pub addr: SocketAddr,
}

/// A byte stream to a target through a peer's forwarder.
pub type Stream = TokioIo<hyper::upgrade::Upgraded>;

struct Pooled {
    sender: SendRequest<Empty>,
    /// The identity the connection was made with.
    made_with: Arc<Material>,
    addr: SocketAddr,
}

/// Outbound: pooled mutual-TLS connections to peers' forwarders.
pub struct TunnelPool {
    identity: Arc<Identity>,
    pool: Mutex<HashMap<String, Pooled>>,
    /// One connect at a time per peer host: concurrent first calls share its connection.
    connecting: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    connect_timeout: Duration,
    handshakes: AtomicU64,
    /// Told the peer host of every handshake made (for per-peer metrics).
    on_handshake: Option<HandshakeHook>,
}

/// Told the peer's host name after each handshake.
type HandshakeHook = Box<dyn Fn(&str) + Send + Sync>;

impl TunnelPool {
    pub fn new(identity: Arc<Identity>, connect_timeout: Duration) -> TunnelPool {
        TunnelPool {
            identity,
            pool: Mutex::new(HashMap::new()),
            connecting: Mutex::new(HashMap::new()),
            connect_timeout,
            handshakes: AtomicU64::new(0),
            on_handshake: None,
        }
    }

    /// Calls `f` with the peer's host name after each handshake.
    pub fn on_handshake(mut self, f: impl Fn(&str) + Send + Sync + 'static) -> TunnelPool {
        self.on_handshake = Some(Box::new(f));
        self
    }

    /// The identity the pool's connections are made with.
    pub fn identity(&self) -> &Arc<Identity> {
        &self.identity
    }

    /// TLS handshakes made so far (each a new pooled connection).
    pub fn handshakes(&self) -> u64 {
        self.handshakes.load(Ordering::Relaxed)
    }

    /// Opens a stream to `target` through `peer`.
    pub async fn open(&self, peer: &Peer, target: SocketAddr) -> Result<Stream, TunnelError> {
        let mut sender = self.sender(peer).await?;
        let request = Request::builder()
            .method(Method::CONNECT)
            .uri(target.to_string())
            .body(Empty)
            .expect("a valid CONNECT request");
        let response = match sender.send_request(request).await {
            Ok(r) => r,
            Err(e) => {
                // The pooled connection broke: drop it; the caller may try again.
                self.forget(&peer.host, &sender);
                return Err(TunnelError::Peer {
                    host: peer.host.clone(),
                    addr: peer.addr,
                    message: e.to_string(),
                });
            }
        };
        match response.status() {
            StatusCode::OK => {}
            StatusCode::BAD_GATEWAY | StatusCode::GATEWAY_TIMEOUT => {
                return Err(TunnelError::TargetUnreachable { target })
            }
            StatusCode::NOT_FOUND => {
                return Err(TunnelError::NotHere {
                    host: peer.host.clone(),
                    target,
                })
            }
            status => {
                return Err(TunnelError::Refused {
                    host: peer.host.clone(),
                    target,
                    reason: status.to_string(),
                })
            }
        }
        let upgraded = hyper::upgrade::on(response)
            .await
            .map_err(|e| TunnelError::Peer {
                host: peer.host.clone(),
                addr: peer.addr,
                message: e.to_string(),
            })?;
        Ok(TokioIo::new(upgraded))
    }

    fn forget(&self, host: &str, sender: &SendRequest<Empty>) {
        let mut pool = self.pool.lock().unwrap_or_else(|e| e.into_inner());
        if pool
            .get(host)
            .is_some_and(|p| p.sender.is_closed() || sender.is_closed())
        {
            pool.remove(host);
        }
    }

    /// The pooled connection to `peer`, or a new one.
    async fn sender(&self, peer: &Peer) -> Result<SendRequest<Empty>, TunnelError> {
        if let Some(sender) = self.pooled(peer) {
            return Ok(sender);
        }
        let gate = self
            .connecting
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(peer.host.clone())
            .or_default()
            .clone();
        let _one_at_a_time = gate.lock().await;
        // Whoever held the gate before may have made the connection.
        if let Some(sender) = self.pooled(peer) {
            return Ok(sender);
        }
        self.connect(peer).await
    }

    /// The pooled connection to `peer`, when it is usable: open, to the same address, and
    /// made with the identity in use now.
    fn pooled(&self, peer: &Peer) -> Option<SendRequest<Empty>> {
        let material = self.identity.current();
        let mut pool = self.pool.lock().unwrap_or_else(|e| e.into_inner());
        let p = pool.get(&peer.host)?;
        if !p.sender.is_closed() && p.addr == peer.addr && Arc::ptr_eq(&p.made_with, &material) {
            return Some(p.sender.clone());
        }
        pool.remove(&peer.host);
        None
    }

    async fn connect(&self, peer: &Peer) -> Result<SendRequest<Empty>, TunnelError> {
        let material = self.identity.current();
        let failed = |message: String| TunnelError::Peer {
            host: peer.host.clone(),
            addr: peer.addr,
            message,
        };
        let connect = async {
            let tcp = TcpStream::connect(peer.addr)
                .await
                .map_err(|e| failed(e.to_string()))?;
            let _ = tcp.set_nodelay(true);
            let name = ServerName::try_from(peer.host.clone())
                .map_err(|e| failed(format!("host name: {e}")))?;
            tokio_rustls::TlsConnector::from(material.client.clone())
                .connect(name, tcp)
                .await
                .map_err(|e| failed(format!("TLS: {e}")))
        };
        let tls = tokio::time::timeout(self.connect_timeout, connect)
            .await
            .map_err(|_| failed(format!("no connection within {:?}", self.connect_timeout)))??;
        self.handshakes.fetch_add(1, Ordering::Relaxed);
        if let Some(f) = &self.on_handshake {
            f(&peer.host);
        }
        let (sender, conn) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
            .handshake(TokioIo::new(tls))
            .await
            .map_err(|e| failed(format!("HTTP/2: {e}")))?;
        let host = peer.host.clone();
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(host, error = %e, "tunnel connection ended");
            }
        });
        self.pool.lock().unwrap_or_else(|e| e.into_inner()).insert(
            peer.host.clone(),
            Pooled {
                sender: sender.clone(),
                made_with: material,
                addr: peer.addr,
            },
        );
        Ok(sender)
    }
}

/// Why the inbound side opens no stream to a target.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// Not an instance of this host (answered 404: the caller may try another instance).
    NotHere(String),
    /// This host's policy does not let the caller reach it (403: no other instance of this
    /// host will do better).
    Forbidden(String),
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Refusal::NotHere(m) | Refusal::Forbidden(m) => f.write_str(m),
        }
    }
}

/// Which targets the inbound side opens streams to: `Ok` or why not, given the target and
/// the calling host.
pub trait Admit: Send + Sync + 'static {
    fn admit(&self, target: SocketAddr, peer_host: &str) -> Result<(), Refusal>;
}

impl<F> Admit for F
where
    F: Fn(SocketAddr, &str) -> Result<(), Refusal> + Send + Sync + 'static,
{
    fn admit(&self, target: SocketAddr, peer_host: &str) -> Result<(), Refusal> {
        self(target, peer_host)
    }
}

/// Counts of the inbound side.
#[derive(Debug, Default)]
pub struct InboundStats {
    pub handshakes_refused: AtomicU64,
    pub streams: AtomicU64,
    pub refused: AtomicU64,
    pub unreachable: AtomicU64,
}

/// Serves the inbound listener until the task is dropped: TLS with the identity's current
/// server config at each accept, then HTTP/2 CONNECT streams to admitted targets.
pub async fn serve_inbound(
    listener: TcpListener,
    identity: Arc<Identity>,
    admit: Arc<dyn Admit>,
    connect_timeout: Duration,
    stats: Arc<InboundStats>,
) {
    loop {
        let (tcp, from) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(error = %e, "inbound accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let acceptor = tokio_rustls::TlsAcceptor::from(identity.current().server.clone());
        let (admit, stats) = (admit.clone(), stats.clone());
        tokio::spawn(async move {
            let _ = tcp.set_nodelay(true);
            let tls =
                match tokio::time::timeout(Duration::from_secs(10), acceptor.accept(tcp)).await {
                    Ok(Ok(tls)) => tls,
                    Ok(Err(e)) => {
                        stats.handshakes_refused.fetch_add(1, Ordering::Relaxed);
                        tracing::info!(%from, error = %e, "inbound handshake refused");
                        return;
                    }
                    Err(_) => {
                        stats.handshakes_refused.fetch_add(1, Ordering::Relaxed);
                        return;
                    }
                };
            let peer =
                peer_host(tls.get_ref().1.peer_certificates().unwrap_or(&[])).unwrap_or_default();
            let service = hyper::service::service_fn(move |req| {
                stream(
                    req,
                    peer.clone(),
                    admit.clone(),
                    connect_timeout,
                    stats.clone(),
                )
            });
            let served = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(tls), service)
                .await;
            if let Err(e) = served {
                tracing::debug!(%from, error = %e, "inbound connection ended");
            }
        });
    }
}

async fn stream(
    req: Request<Incoming>,
    peer: String,
    admit: Arc<dyn Admit>,
    connect_timeout: Duration,
    stats: Arc<InboundStats>,
) -> Result<Response<Empty>, std::convert::Infallible> {
    let answer = |status: StatusCode| {
        let mut r = Response::new(Empty);
        *r.status_mut() = status;
        Ok(r)
    };
    let target: Option<SocketAddr> = (req.method() == Method::CONNECT)
        .then(|| req.uri().authority()?.as_str().parse().ok())
        .flatten();
    let Some(target) = target else {
        stats.refused.fetch_add(1, Ordering::Relaxed);
        return answer(StatusCode::BAD_REQUEST);
    };
    if let Err(refusal) = admit.admit(target, &peer) {
        stats.refused.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(peer, %target, reason = %refusal, "inbound stream refused");
        return answer(match refusal {
            Refusal::NotHere(_) => StatusCode::NOT_FOUND,
            Refusal::Forbidden(_) => StatusCode::FORBIDDEN,
        });
    }
    let tcp = match tokio::time::timeout(connect_timeout, TcpStream::connect(target)).await {
        Ok(Ok(tcp)) => tcp,
        _ => {
            stats.unreachable.fetch_add(1, Ordering::Relaxed);
            return answer(StatusCode::BAD_GATEWAY);
        }
    };
    let _ = tcp.set_nodelay(true);
    stats.streams.fetch_add(1, Ordering::Relaxed);
    tokio::spawn(async move {
        match hyper::upgrade::on(req).await {
            Ok(upgraded) => {
                let mut upgraded = TokioIo::new(upgraded);
                let mut tcp = tcp;
                let _ = tokio::io::copy_bidirectional(&mut upgraded, &mut tcp).await;
            }
            Err(e) => tracing::debug!(error = %e, "inbound stream not upgraded"),
        }
    });
    answer(StatusCode::OK)
}
