//! How the forwarder reaches an instance, for both modes: directly over TCP when the
//! instance is on this host (or on a host without a forwarder, counted as unmeshed), or as
//! a stream through the instance's host's forwarder over the mTLS tunnel ([`TunnelPool`]).
//! The route comes from the [`Routes`] of the current registry state.
//!
//! TCP mode calls [`Upstreams::connect`]; HTTP mode's pooled client uses [`Connector`], the
//! same connect as a hyper connector, so a pooled HTTP/1.1 connection to a remote instance
//! is one stream of the tunnel.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};
use std::time::Duration;

use arc_swap::ArcSwap;
use http::Uri;
use hyper_util::client::legacy::connect::{Connected, Connection};
use hyper_util::rt::TokioIo;
use prometheus_client::metrics::counter::Counter;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

use super::metrics::{Metrics, PeerDirection, PeerResult};
use super::route::{Route, Routes};
use crate::tunnel::{self, TunnelError, TunnelPool};

#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("connect to {addr}: {source}")]
    Connect { addr: SocketAddr, source: io::Error },
    #[error("connect to {addr}: no connection within {timeout:?}")]
    Timeout { addr: SocketAddr, timeout: Duration },
    #[error("{0}")]
    Tunnel(#[from] TunnelError),
    #[error("{addr} is on host {host}, and this forwarder has no mesh certificate yet")]
    NoIdentity { addr: SocketAddr, host: String },
}

impl UpstreamError {
    /// A refusal by the instance's host's policy: the same on every instance of that host,
    /// and no fault of the instance.
    pub fn is_refusal(&self) -> bool {
        matches!(self, UpstreamError::Tunnel(TunnelError::Refused { .. }))
    }

    /// Whether the instance (or the way to it) failed hard: it is ejected at once.
    pub fn ejects(&self) -> bool {
        match self {
            UpstreamError::Connect { .. } | UpstreamError::Timeout { .. } => true,
            UpstreamError::Tunnel(e) => matches!(
                e,
                TunnelError::Peer { .. } | TunnelError::TargetUnreachable { .. }
            ),
            UpstreamError::NoIdentity { .. } => false,
        }
    }

    /// Finds an `UpstreamError` in an error's chain (hyper's client wraps it).
    pub fn find<'a>(e: &'a (dyn std::error::Error + 'static)) -> Option<&'a UpstreamError> {
        let mut next = Some(e);
        while let Some(e) = next {
            if let Some(u) = e.downcast_ref::<UpstreamError>() {
                return Some(u);
            }
            next = e.source();
        }
        None
    }
}

/// A connection to an instance: a TCP connection, or a stream through a peer's forwarder
/// (whose bytes are counted for that peer).
pub enum Conn {
    Direct(TcpStream),
    Tunnel {
        io: tunnel::Stream,
        sent: Counter,
        received: Counter,
    },
}

impl AsyncRead for Conn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Conn::Direct(s) => Pin::new(s).poll_read(cx, buf),
            Conn::Tunnel { io, received, .. } => {
                let before = buf.filled().len();
                let r = Pin::new(io).poll_read(cx, buf);
                received.inc_by((buf.filled().len() - before) as u64);
                r
            }
        }
    }
}

impl AsyncWrite for Conn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Conn::Direct(s) => Pin::new(s).poll_write(cx, data),
            Conn::Tunnel { io, sent, .. } => {
                let r = Pin::new(io).poll_write(cx, data);
                if let Poll::Ready(Ok(n)) = r {
                    sent.inc_by(n as u64);
                }
                r
            }
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Conn::Direct(s) => Pin::new(s).poll_flush(cx),
            Conn::Tunnel { io, .. } => Pin::new(io).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Conn::Direct(s) => Pin::new(s).poll_shutdown(cx),
            Conn::Tunnel { io, .. } => Pin::new(io).poll_shutdown(cx),
        }
    }
}

/// The way to instances: the routes of the current registry state and, once the host has
/// its mesh certificate, the tunnels to other hosts' forwarders.
pub struct Upstreams {
    routes: ArcSwap<Routes>,
    tunnels: OnceLock<Arc<TunnelPool>>,
    /// Whether this forwarder is in the mesh (has a join token). Out of it, every instance
    /// is called directly.
    mesh: bool,
    connect_timeout: Duration,
    metrics: PeerMetrics,
}

/// The per-peer metric families, shared with [`Metrics`].
#[derive(Clone)]
struct PeerMetrics {
    streams: prometheus_client::metrics::family::Family<PeerResult, Counter>,
    bytes: prometheus_client::metrics::family::Family<PeerDirection, Counter>,
    unmeshed: Counter,
}

impl Upstreams {
    pub fn new(mesh: bool, connect_timeout: Duration, metrics: &Metrics) -> Upstreams {
        Upstreams {
            routes: ArcSwap::from_pointee(Routes::default()),
            tunnels: OnceLock::new(),
            mesh,
            connect_timeout,
            metrics: PeerMetrics {
                streams: metrics.peer_streams.clone(),
                bytes: metrics.peer_bytes.clone(),
                unmeshed: metrics.unmeshed_connects.clone(),
            },
        }
    }

    /// The routes now.
    pub fn routes(&self) -> Arc<Routes> {
        self.routes.load_full()
    }

    pub fn set_routes(&self, routes: Routes) {
        self.routes.store(Arc::new(routes));
    }

    /// The host's mesh identity, once it has one.
    pub fn identity(&self) -> Option<Arc<crate::identity::Identity>> {
        self.tunnels.get().map(|p| p.identity().clone())
    }

    /// Starts calling peers through `pool` (once: the pool follows the identity's renewals).
    pub fn set_tunnels(&self, pool: Arc<TunnelPool>) {
        let _ = self.tunnels.set(pool);
    }

    /// Connects to the instance at `addr`, the way its route says.
    pub async fn connect(&self, addr: SocketAddr) -> Result<Conn, UpstreamError> {
        let route = self.routes.load().route(addr);
        match route {
            Route::Peer(peer) if self.mesh => {
                let Some(pool) = self.tunnels.get() else {
                    return Err(UpstreamError::NoIdentity {
                        addr,
                        host: peer.host,
                    });
                };
                let result = pool.open(&peer, addr).await;
                let outcome = match &result {
                    Ok(_) => "ok",
                    Err(TunnelError::Peer { .. }) => "peer_unreachable",
                    Err(TunnelError::TargetUnreachable { .. }) => "target_unreachable",
                    Err(TunnelError::NotHere { .. }) => "not_here",
                    Err(TunnelError::Refused { .. }) => "refused",
                };
                self.metrics
                    .streams
                    .get_or_create(&PeerResult {
                        host: peer.host.clone(),
                        result: outcome,
                    })
                    .inc();
                let io = result?;
                let bytes = |direction| {
                    self.metrics
                        .bytes
                        .get_or_create(&PeerDirection {
                            host: peer.host.clone(),
                            direction,
                        })
                        .clone()
                };
                Ok(Conn::Tunnel {
                    io,
                    sent: bytes("sent"),
                    received: bytes("received"),
                })
            }
            route => {
                if route != Route::Local {
                    self.metrics.unmeshed.inc();
                }
                let stream = tokio::time::timeout(self.connect_timeout, TcpStream::connect(addr))
                    .await
                    .map_err(|_| UpstreamError::Timeout {
                        addr,
                        timeout: self.connect_timeout,
                    })?
                    .map_err(|source| UpstreamError::Connect { addr, source })?;
                let _ = stream.set_nodelay(true);
                Ok(Conn::Direct(stream))
            }
        }
    }
}

/// [`Upstreams::connect`] as a connector for hyper's pooled client (URIs name the
/// instance's `ip:port`).
#[derive(Clone)]
pub struct Connector(pub Arc<Upstreams>);

/// A [`Conn`] as hyper's client wants it.
pub struct HyperConn(TokioIo<Conn>);

impl Connection for HyperConn {
    fn connected(&self) -> Connected {
        Connected::new()
    }
}

impl hyper::rt::Read for HyperConn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: hyper::rt::ReadBufCursor<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().0).poll_read(cx, buf)
    }
}

impl hyper::rt::Write for HyperConn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().0).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().0).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().0).poll_shutdown(cx)
    }
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

impl tower_service::Service<Uri> for Connector {
    type Response = HyperConn;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<HyperConn, BoxError>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let upstreams = self.0.clone();
        Box::pin(async move {
            let addr: SocketAddr = uri
                .authority()
                .and_then(|a| a.as_str().parse().ok())
                .ok_or_else(|| format!("{uri}: not an instance address"))?;
            let conn = upstreams.connect(addr).await?;
            Ok(HyperConn(TokioIo::new(conn)))
        })
    }
}
