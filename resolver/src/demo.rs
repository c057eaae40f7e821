//! `waymark-resolver demo`: a working local mesh in one command. Starts the resolver with the
//! embedded registry, starts small demo HTTP services on loopback addresses, registers them
//! through the real registration API with HTTP health checks, checks the answers over real
//! DNS, and prints what to try.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use anyhow::{bail, Context};
use axum::routing::get;
use serde_json::json;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

use crate::app::{self, Bound};
use crate::config::Config;

/// Demo services: (service, instance number, tags). Instance n of a service listens on
/// 127.0.<subnet>.<n>, all on one port, so an A record is enough to call it.
const SERVICES: &[(&str, u8, &[&str])] = &[
    ("payment", 1, &["v1"]),
    ("payment", 2, &["v1"]),
    ("payment", 3, &["v2", "canary"]),
    ("orders", 1, &["v1"]),
    ("orders", 2, &["v1"]),
];

pub struct Running {
    bound: Bound,
    port: u16,
    zone: String,
    backends: Vec<JoinHandle<()>>,
}

fn backend_ip(service: &str, n: u8) -> IpAddr {
    let subnet = if service == "payment" { 10 } else { 11 };
    IpAddr::V4(Ipv4Addr::new(127, 0, subnet, n))
}

/// Binds every demo backend on one port, the first free one from 9000.
async fn bind_backends() -> anyhow::Result<(u16, Vec<TcpListener>)> {
    'port: for port in 9000..9100u16 {
        let mut listeners = Vec::new();
        for (service, n, _) in SERVICES {
            match TcpListener::bind(SocketAddr::new(backend_ip(service, *n), port)).await {
                Ok(l) => listeners.push(l),
                Err(_) => continue 'port,
            }
        }
        return Ok((port, listeners));
    }
    bail!("no port from 9000 to 9099 is free on the demo addresses 127.0.10.x / 127.0.11.x")
}

pub async fn start(config: Config) -> anyhow::Result<Running> {
    let zone = config.dns.zone.trim_end_matches('.').to_string();
    let bound = app::build(config)
        .await
        .context("cannot start the resolver")?;
    let (port, listeners) = bind_backends().await?;
    let mut backends = Vec::new();
    for ((service, n, _), listener) in SERVICES.iter().zip(listeners) {
        let addr = listener.local_addr()?;
        let hello = format!("hello from {service}-{n} at {addr}\n");
        let app = axum::Router::new()
            .route("/", get(move || async move { hello }))
            .route("/health", get(|| async { "ok\n" }));
        backends.push(tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        }));
    }

    let http = reqwest::Client::new();
    for (service, n, tags) in SERVICES {
        let ip = backend_ip(service, *n);
        let body = json!({
            "Name": service,
            "ID": format!("{service}-{n}"),
            "Address": ip.to_string(),
            "Port": port,
            "Tags": tags,
            "Check": {
                "HTTP": format!("http://{ip}:{port}/health"),
                "Interval": "2s",
                "Timeout": "1s",
                "Status": "passing",
            },
        });
        let resp = http
            .put(format!(
                "http://{}/v1/agent/service/register",
                bound.http_addr
            ))
            .json(&body)
            .send()
            .await
            .context("registering a demo service")?;
        if !resp.status().is_success() {
            bail!("registering {service}-{n}: {}", resp.status());
        }
    }
    let running = Running {
        bound,
        port,
        zone,
        backends,
    };
    running.self_check().await?;
    Ok(running)
}

impl Running {
    /// Asks the resolver, over real DNS, for the demo services, and checks the answers.
    async fn self_check(&self) -> anyhow::Result<()> {
        use hickory_proto::op::{Message, Query};
        use hickory_proto::rr::{Name, RecordType};
        let socket = tokio::net::UdpSocket::bind("127.0.0.1:0").await?;
        let name = Name::from_ascii(format!("payment.{}.", self.zone))?;
        let mut q = Message::query();
        q.metadata.id = 4242;
        q.add_query(Query::query(name, RecordType::A));
        socket.send_to(&q.to_vec()?, self.bound.dns_addr).await?;
        let mut buf = [0u8; 1500];
        let n = tokio::time::timeout(Duration::from_secs(2), socket.recv(&mut buf))
            .await
            .context("the resolver did not answer the demo's own query")??;
        let reply = Message::from_vec(&buf[..n])?;
        if reply.answers.len() != 3 {
            bail!(
                "expected 3 payment instances over DNS, got {}",
                reply.answers.len()
            );
        }
        Ok(())
    }

    pub fn instructions(&self) -> String {
        let dns = self.bound.dns_addr;
        let http = self.bound.http_addr;
        let (ip, port) = (dns.ip(), dns.port());
        let z = &self.zone;
        let p = self.port;
        format!(
            "\
Waymark demo is running.
  DNS (UDP+TCP)      {dns}   zone {z}.
  Registration API   http://{http}   (Consul agent API: any Consul client library works)
  Demo services      payment: 3 instances (tags v1, v1, v2+canary), orders: 2 instances, HTTP on port {p}

Try:
  dig @{ip} -p {port} payment.{z} +short
  dig @{ip} -p {port} v2.payment.{z} +short
  dig @{ip} -p {port} SRV _payment._tcp.{z}
  curl http://$(dig @{ip} -p {port} +short payment.{z} | head -1):{p}/
  curl -s 'http://{http}/v1/health/service/payment?passing'
  curl -X PUT 'http://{http}/v1/agent/service/maintenance/payment-1?enable=true'   # drain payment-1
  dig @{ip} -p {port} payment.{z} +short                                     # now two answers
  curl -s http://{http}/metrics | grep waymark_dns

Press Ctrl-C to stop."
        )
    }

    pub async fn stop(self) {
        for b in &self.backends {
            b.abort();
        }
        self.bound.shutdown(Duration::from_secs(5)).await;
    }
}
