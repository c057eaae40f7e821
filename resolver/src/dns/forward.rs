//! Forwarding names outside the zone to the upstream resolvers.
//!
//! The client's query goes upstream as it came (its EDNS options included) under a fresh
//! random ID; upstreams are tried in order, starting from the one that last answered, each
//! within the timeout. A truncated UDP reply is retried over TCP when the client itself came
//! over TCP; a UDP client gets the truncated reply and retries over TCP on its own. Only
//! clients in the allowed networks may forward.

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use hickory_proto::op::Message;
use ipnet::IpNet;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UdpSocket};

use crate::metrics::{Metrics, UpstreamLabels};

#[derive(Debug, thiserror::Error)]
pub enum ForwardError {
    #[error("no upstream resolvers are configured")]
    NoUpstreams,
    #[error("every upstream failed; last: {0}")]
    AllFailed(String),
}

pub struct Forwarder {
    upstreams: Vec<SocketAddr>,
    timeout: Duration,
    allow: Vec<IpNet>,
    /// The upstream to try first: the last one that answered.
    preferred: AtomicUsize,
    metrics: Arc<Metrics>,
}

impl Forwarder {
    pub fn new(
        upstreams: Vec<SocketAddr>,
        timeout: Duration,
        allow: Vec<IpNet>,
        metrics: Arc<Metrics>,
    ) -> Self {
        Forwarder {
            upstreams,
            timeout,
            allow,
            preferred: AtomicUsize::new(0),
            metrics,
        }
    }

    pub fn upstreams(&self) -> &[SocketAddr] {
        &self.upstreams
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
        let client_id = u16::from_be_bytes([query[0], query[1]]);
        let mut wire = query.to_vec();
        let start = self.preferred.load(Ordering::Relaxed);
        let mut last = String::new();
        for k in 0..self.upstreams.len() {
            let i = (start + k) % self.upstreams.len();
            let upstream = self.upstreams[i];
            let id = fastrand::u16(..);
            wire[..2].copy_from_slice(&id.to_be_bytes());
            let attempt = async {
                let reply = udp_exchange(upstream, &wire, id).await?;
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

async fn udp_exchange(upstream: SocketAddr, wire: &[u8], id: u16) -> std::io::Result<Message> {
    let bind: SocketAddr = if upstream.is_ipv4() {
        "0.0.0.0:0".parse().expect("valid")
    } else {
        "[::]:0".parse().expect("valid")
    };
    let socket = UdpSocket::bind(bind).await?;
    socket.connect(upstream).await?;
    socket.send(wire).await?;
    let mut buf = vec![0u8; 65535];
    loop {
        let n = socket.recv(&mut buf).await?;
        // Ignore anything that is not the reply to this query (late or spoofed datagrams).
        if n < 2 || u16::from_be_bytes([buf[0], buf[1]]) != id {
            continue;
        }
        return Message::from_vec(&buf[..n]).map_err(|e| {
            std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("{upstream}: bad reply: {e}"),
            )
        });
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
            Arc::new(Metrics::new()),
        );
        assert!(f.allowed("127.0.0.9".parse().unwrap()));
        assert!(f.allowed("::ffff:127.0.0.1".parse().unwrap()));
        assert!(!f.allowed("10.0.0.1".parse().unwrap()));
    }
}
