//! DNS over TCP (RFC 7766): the one place that decides how many connections there may be
//! and how long each may stay.
//!
//! - **Caps.** At most `dns.tcp_max_connections` at once and `dns.tcp_max_connections_per_client`
//!   from one address; beyond them a new connection is closed at once (counted in
//!   `waymark_connections_refused_total{listener="dns_tcp"}`), so no client can take the
//!   descriptors that UDP, forwarding and the API need.
//! - **Time.** A connection with no complete query for `dns.tcp_idle_timeout` is closed
//!   (a trickled query too: the clock runs from its first byte).
//! - **Out of descriptors.** The accept loop pauses instead of spinning
//!   ([`waymark_shared::lifecycle::accept`]); hickory's own loop retried at once.
//! - Queries on one connection are answered in order, one at a time, by the same code as the
//!   UDP slow path ([`super::reply`]), without a size limit below 64 KiB.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use hickory_net::xfer::Protocol;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use waymark_shared::lifecycle::accept::Acceptor;
use waymark_shared::lifecycle::bounded::Admission;

use super::reply;
use super::server::Handler;

/// The limits of the DNS-over-TCP listener.
#[derive(Debug, Clone)]
pub struct Limits {
    pub max_connections: usize,
    pub max_connections_per_client: usize,
    pub idle_timeout: Duration,
}

/// Accepts and serves connections until `stopped` turns true; open connections end then too.
pub async fn serve(
    listener: TcpListener,
    handler: Arc<Handler>,
    limits: Limits,
    mut stopped: watch::Receiver<bool>,
) {
    let admission: Arc<Admission<IpAddr>> = Admission::new(
        limits.max_connections,
        Some(limits.max_connections_per_client),
    );
    let mut acceptor = Acceptor::new();
    let mut tasks = tokio::task::JoinSet::new();
    loop {
        let (stream, peer) = tokio::select! {
            accepted = acceptor.accept(&listener) => match accepted {
                Ok(c) => c,
                Err(e) => {
                    tracing::error!(error = %e, "the DNS TCP listener failed");
                    break;
                }
            },
            _ = stopped.wait_for(|s| *s) => break,
            // Reap finished connections as they end.
            Some(_) = tasks.join_next(), if !tasks.is_empty() => continue,
        };
        let ticket = match admission.try_admit(peer.ip()) {
            Ok(t) => t,
            Err(refused) => {
                handler.metrics.connection_refused("dns_tcp", refused);
                tracing::debug!(%peer, %refused, "DNS TCP connection refused");
                drop(stream);
                continue;
            }
        };
        handler
            .metrics
            .set_connections("dns_tcp", admission.in_use());
        let handler = handler.clone();
        let admission = admission.clone();
        let idle = limits.idle_timeout;
        let mut stop = stopped.clone();
        tasks.spawn(async move {
            tokio::select! {
                _ = serve_one(stream, peer, &handler, idle) => {}
                _ = stop.wait_for(|s| *s) => {}
            }
            drop(ticket);
            handler
                .metrics
                .set_connections("dns_tcp", admission.in_use());
        });
    }
    tasks.shutdown().await;
}

/// Reads length-prefixed queries and answers each, until the client closes, stays idle for
/// `idle`, or sends something that is not DNS.
async fn serve_one(mut stream: TcpStream, peer: SocketAddr, handler: &Handler, idle: Duration) {
    let _ = stream.set_nodelay(true);
    loop {
        let query = match tokio::time::timeout(idle, read_message(&mut stream)).await {
            Ok(Ok(Some(q))) => q,
            Ok(Ok(None)) => return,
            Ok(Err(e)) => {
                tracing::debug!(%peer, error = %e, "DNS TCP read failed");
                return;
            }
            Err(_) => {
                tracing::debug!(%peer, ?idle, "DNS TCP connection idle; closing");
                return;
            }
        };
        let Some(answer) = reply::answer(query, peer, Protocol::Tcp, handler).await else {
            continue;
        };
        let mut framed = Vec::with_capacity(answer.len() + 2);
        framed.extend_from_slice(&(answer.len() as u16).to_be_bytes());
        framed.extend_from_slice(&answer);
        match tokio::time::timeout(idle, stream.write_all(&framed)).await {
            Ok(Ok(())) => {}
            _ => return,
        }
    }
}

/// One message: its two-byte length, then that many bytes. None at a clean end of stream.
async fn read_message(stream: &mut TcpStream) -> std::io::Result<Option<Vec<u8>>> {
    let mut len = [0u8; 2];
    match stream.read_exact(&mut len).await {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    let len = u16::from_be_bytes(len) as usize;
    let mut buf = vec![0u8; len];
    stream.read_exact(&mut buf).await?;
    Ok(Some(buf))
}
