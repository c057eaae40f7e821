//! Forwarding names outside the zone to the upstream resolvers.
//!
//! The client's query goes upstream as it came (its EDNS options included) under a fresh
//! random ID; upstreams are tried in order, starting from the one that last answered, each
//! within the timeout. A truncated UDP reply is retried over TCP when the client itself came
//! over TCP; a UDP client gets the truncated reply and retries over TCP on its own. Only
//! clients in the allowed networks may forward.
//!
//! Resources are bounded whatever the clients do: at most `dns.max_forwards` queries are
//! upstream at once (beyond, SERVFAIL at once, counted as `result="overload"`), and queries
//! share a few UDP sockets per upstream ([`CHANNELS`]), each with one reader that hands
//! replies to the queries waiting for them by ID. A slow or silent upstream therefore costs
//! no descriptor and no buffer per query.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hickory_proto::op::Message;
use ipnet::IpNet;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UdpSocket};
use tokio::sync::{oneshot, OnceCell};
use waymark_shared::lifecycle::bounded::Admission;

use crate::metrics::{Metrics, UpstreamLabels};

/// Shared UDP sockets per upstream (each its own random source port).
pub const CHANNELS: usize = 4;

#[derive(Debug, thiserror::Error)]
pub enum ForwardError {
    #[error("no upstream resolvers are configured")]
    NoUpstreams,
    #[error("every upstream failed; last: {0}")]
    AllFailed(String),
    #[error("{0} queries are upstream already: the limit")]
    Busy(usize),
}

pub struct Forwarder {
    upstreams: Vec<SocketAddr>,
    timeout: Duration,
    allow: Vec<IpNet>,
    /// The upstream to try first: the last one that answered.
    preferred: AtomicUsize,
    metrics: Arc<Metrics>,
    in_flight: Arc<Admission<()>>,
    /// Per upstream, its shared sockets, opened on first use.
    channels: Vec<OnceCell<Vec<Arc<Channel>>>>,
    next_channel: AtomicUsize,
}

impl Forwarder {
    pub fn new(
        upstreams: Vec<SocketAddr>,
        timeout: Duration,
        allow: Vec<IpNet>,
        max_in_flight: usize,
        metrics: Arc<Metrics>,
    ) -> Self {
        Forwarder {
            channels: upstreams.iter().map(|_| OnceCell::new()).collect(),
            upstreams,
            timeout,
            allow,
            preferred: AtomicUsize::new(0),
            metrics,
            in_flight: Admission::new(max_in_flight.max(1), None),
            next_channel: AtomicUsize::new(0),
        }
    }

    pub fn upstreams(&self) -> &[SocketAddr] {
        &self.upstreams
    }

    /// Queries upstream now.
    pub fn in_flight(&self) -> usize {
        self.in_flight.in_use()
    }

    /// Whether this client may have names forwarded.
    pub fn allowed(&self, client: IpAddr) -> bool {
        let client = match client {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(client),
            v4 => v4,
        };
        self.allow.iter().any(|net| net.contains(&client))
    }

    /// Sends a raw query upstream and returns the reply, with the client's ID restored.
    pub async fn forward(&self, query: &[u8], client_tcp: bool) -> Result<Message, ForwardError> {
        if self.upstreams.is_empty() {
            return Err(ForwardError::NoUpstreams);
        }
        if query.len() < 12 {
            return Err(ForwardError::AllFailed(
                "query shorter than a header".into(),
            ));
        }
        let Ok(_ticket) = self.in_flight.try_admit(()) else {
            let upstream = self.upstreams[self.preferred.load(Ordering::Relaxed)];
            self.count(upstream, "overload");
            return Err(ForwardError::Busy(self.in_flight.limit()));
        };
        let client_id = u16::from_be_bytes([query[0], query[1]]);
        let mut wire = query.to_vec();
        let start = self.preferred.load(Ordering::Relaxed);
        let mut last = String::new();
        for k in 0..self.upstreams.len() {
            let i = (start + k) % self.upstreams.len();
            let upstream = self.upstreams[i];
            let attempt = async {
                let channel = self.channel(i).await?;
                let (id, reply) = channel.exchange(&mut wire).await?;
                if reply.metadata.truncation && client_tcp {
                    tcp_exchange(upstream, &wire, id).await
                } else {
                    Ok(reply)
                }
            };
            let result = match tokio::time::timeout(self.timeout, attempt).await {
                Ok(Ok(mut reply)) => {
                    self.count(upstream, "ok");
                    self.preferred.store(i, Ordering::Relaxed);
                    reply.metadata.id = client_id;
                    return Ok(reply);
                }
                Ok(Err(e)) => {
                    self.count(upstream, "error");
                    e.to_string()
                }
                Err(_) => {
                    self.count(upstream, "timeout");
                    format!("{upstream}: timed out after {:?}", self.timeout)
                }
            };
            tracing::debug!(%upstream, error = %result, "upstream failed");
            last = result;
        }
        Err(ForwardError::AllFailed(last))
    }

    /// One of the shared sockets to upstream `i`, in turn.
    async fn channel(&self, i: usize) -> std::io::Result<Arc<Channel>> {
        let upstream = self.upstreams[i];
        let set = self.channels[i]
            .get_or_try_init(|| async {
                let mut set = Vec::with_capacity(CHANNELS);
                for _ in 0..CHANNELS {
                    set.push(Channel::open(upstream).await?);
                }
                Ok::<_, std::io::Error>(set)
            })
            .await?;
        let n = self.next_channel.fetch_add(1, Ordering::Relaxed);
        Ok(set[n % set.len()].clone())
    }

    fn count(&self, upstream: SocketAddr, result: &'static str) {
        self.metrics
            .upstream_queries
            .get_or_create(&UpstreamLabels {
                upstream: upstream.to_string(),
                result,
            })
            .inc();
    }
}

/// Queries waiting on one shared socket, by the ID they were sent with.
type Waiting = Mutex<HashMap<u16, oneshot::Sender<Vec<u8>>>>;

/// A UDP socket connected to one upstream, shared by many queries; its reader task hands
/// each reply to the query that waits for its ID and drops the rest (late or spoofed).
struct Channel {
    upstream: SocketAddr,
    socket: Arc<UdpSocket>,
    waiting: Arc<Waiting>,
    reader: tokio::task::JoinHandle<()>,
}

impl Drop for Channel {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

/// Removes a query's entry however its wait ends (answer, timeout, cancellation).
struct Registered<'a> {
    waiting: &'a Waiting,
    id: u16,
}

impl Drop for Registered<'_> {
    fn drop(&mut self) {
        self.waiting
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&self.id);
    }
}

impl Channel {
    async fn open(upstream: SocketAddr) -> std::io::Result<Arc<Channel>> {
        let bind: SocketAddr = if upstream.is_ipv4() {
            "0.0.0.0:0".parse().expect("valid")
        } else {
            "[::]:0".parse().expect("valid")
        };
        let socket = Arc::new(UdpSocket::bind(bind).await?);
        socket.connect(upstream).await?;
        let waiting: Arc<Waiting> = Arc::default();
        let reader = tokio::spawn(read_replies(socket.clone(), waiting.clone()));
        Ok(Arc::new(Channel {
            upstream,
            socket,
            waiting,
            reader,
        }))
    }

    /// Sends `wire` under a fresh ID no other waiting query has (written into `wire`), and
    /// waits for its reply (the caller bounds the wait).
    async fn exchange(&self, wire: &mut [u8]) -> std::io::Result<(u16, Message)> {
        let (tx, rx) = oneshot::channel();
        let id = {
            let mut waiting = self.waiting.lock().unwrap_or_else(|e| e.into_inner());
            let mut id = fastrand::u16(..);
            let mut tries = 0;
            while waiting.contains_key(&id) {
                tries += 1;
                if tries > 64 {
                    return Err(std::io::Error::other("no free query ID on the socket"));
                }
                id = fastrand::u16(..);
            }
            waiting.insert(id, tx);
            id
        };
        let _registered = Registered {
            waiting: &self.waiting,
            id,
        };
        wire[..2].copy_from_slice(&id.to_be_bytes());
        self.socket.send(wire).await?;
        let bytes = rx
            .await
            .map_err(|_| std::io::Error::other("the socket's reader stopped"))?;
        let reply = Message::from_vec(&bytes).map_err(|e| {
            std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("{}: bad reply: {e}", self.upstream),
            )
        })?;
        Ok((id, reply))
    }
}

/// The reader of one shared socket: one buffer for every reply.
async fn read_replies(socket: Arc<UdpSocket>, waiting: Arc<Waiting>) {
    let mut buf = vec![0u8; 65535];
    loop {
        let n = match socket.recv(&mut buf).await {
            Ok(n) => n,
            // An ICMP "port unreachable" for an earlier query, and the like: that query
            // times out; keep reading.
            Err(e) => {
                tracing::debug!(error = %e, "upstream socket");
                tokio::time::sleep(Duration::from_millis(5)).await;
                continue;
            }
        };
        if n < 12 {
            continue;
        }
        let id = u16::from_be_bytes([buf[0], buf[1]]);
        let waiter = waiting
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&id);
        if let Some(tx) = waiter {
            let _ = tx.send(buf[..n].to_vec());
        }
    }
}

async fn tcp_exchange(upstream: SocketAddr, wire: &[u8], id: u16) -> std::io::Result<Message> {
    let mut stream = TcpStream::connect(upstream).await?;
    let mut framed = Vec::with_capacity(wire.len() + 2);
    framed.extend_from_slice(&(wire.len() as u16).to_be_bytes());
    framed.extend_from_slice(wire);
    stream.write_all(&framed).await?;
    let len = stream.read_u16().await? as usize;
    let mut buf = vec![0u8; len];
    stream.read_exact(&mut buf).await?;
    let reply = Message::from_vec(&buf).map_err(|e| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("{upstream}: bad reply: {e}"),
        )
    })?;
    if reply.metadata.id != id {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("{upstream}: reply ID does not match"),
        ));
    }
    Ok(reply)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_allowed_networks_forward() {
        let f = Forwarder::new(
            vec![],
            Duration::from_secs(1),
            vec!["127.0.0.0/8".parse().unwrap()],
            16,
            Arc::new(Metrics::new()),
        );
        assert!(f.allowed("127.0.0.9".parse().unwrap()));
        assert!(f.allowed("::ffff:127.0.0.1".parse().unwrap()));
        assert!(!f.allowed("10.0.0.1".parse().unwrap()));
    }
}
