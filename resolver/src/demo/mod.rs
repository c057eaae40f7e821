//! `waymark-resolver demo`: a working local mesh in one command. Starts the resolver with the
//! embedded registry, starts small demo HTTP services on loopback addresses, registers them
//! through the real registration API with HTTP health checks, checks the answers over real
//! DNS, then starts the forwarder and the ingress gateway ([`mesh`]), checks a call by name
//! through the service's VIP and a public call through the gateway, and prints what to try.

pub mod mesh;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
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

/// What the demo runs beside the resolver.
pub struct Options {
    /// The `waymark-gateway` binary for the forwarder and the ingress; none: the resolver
    /// and the demo services alone.
    pub gateway: Option<PathBuf>,
}

pub struct Running {
    bound: Bound,
    port: u16,
    zone: String,
    backends: Vec<JoinHandle<()>>,
    mesh: Option<(mesh::Mesh, Ipv4Addr)>,
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

pub async fn start(config: Config, options: Options) -> anyhow::Result<Running> {
    let zone = config.dns.zone.trim_end_matches('.').to_string();
    let data_dir = config.store.data_dir.clone();
    let vips = config.vips.range;
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
        // payment is an HTTP service to the forwarder (one instance per request); orders is
        // plain TCP (one instance per connection).
        let meta = if *service == "payment" {
            json!({"waymark-protocol": "http"})
        } else {
            json!({})
        };
        let body = json!({
            "Name": service,
            "ID": format!("{service}-{n}"),
            "Address": ip.to_string(),
            "Port": port,
            "Tags": tags,
            "Meta": meta,
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
    let mut running = Running {
        bound,
        port,
        zone,
        backends,
        mesh: None,
    };
    let instances = running.query_a("payment").await?;
    if instances.len() != 3 {
        bail!(
            "expected 3 payment instances over DNS, got {}",
            instances.len()
        );
    }
    if let Some(gateway) = &options.gateway {
        let started = mesh::Mesh::start(gateway, running.bound.http_addr, &data_dir).await;
        let m = match started {
            Ok(m) => m,
            Err(e) => {
                running.stop().await;
                return Err(e.context("cannot start the demo's forwarder and gateway"));
            }
        };
        let checked = running.check_mesh(&m, |ip| vips.contains(ip)).await;
        match checked {
            Ok(vip) => running.mesh = Some((m, vip)),
            Err(e) => {
                m.stop().await;
                running.stop().await;
                return Err(e);
            }
        }
    }
    Ok(running)
}

impl Running {
    /// The A records the resolver answers, over real DNS, for `<name>.<zone>`.
    async fn query_a(&self, name: &str) -> anyhow::Result<Vec<Ipv4Addr>> {
        use hickory_proto::op::{Message, Query};
        use hickory_proto::rr::{Name, RData, RecordType};
        let socket = tokio::net::UdpSocket::bind("127.0.0.1:0").await?;
        let name = Name::from_ascii(format!("{name}.{}.", self.zone))?;
        let mut q = Message::query();
        q.metadata.id = 4242;
        q.add_query(Query::query(name, RecordType::A));
        socket.send_to(&q.to_vec()?, self.bound.dns_addr).await?;
        let mut buf = [0u8; 1500];
        let n = tokio::time::timeout(Duration::from_secs(2), socket.recv(&mut buf))
            .await
            .context("the resolver did not answer the demo's own query")??;
        let reply = Message::from_vec(&buf[..n])?;
        Ok(reply
            .answers
            .iter()
            .filter_map(|r| match &r.data {
                RData::A(a) => Some(a.0),
                _ => None,
            })
            .collect())
    }

    /// Once the forwarder is ready, DNS answers payment's VIP to this host; a call to it, and
    /// a public call through the gateway, reach a payment instance. Returns the VIP.
    async fn check_mesh(
        &self,
        m: &mesh::Mesh,
        is_vip: impl Fn(Ipv4Addr) -> bool,
    ) -> anyhow::Result<Ipv4Addr> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
        let vip = loop {
            let answers = self.query_a("payment").await?;
            if let [ip] = answers[..] {
                if is_vip(ip) {
                    break ip;
                }
            }
            if tokio::time::Instant::now() >= deadline {
                bail!("DNS still answers {answers:?} for payment, not its VIP, with the forwarder ready");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        let http = reqwest::Client::new();
        for (what, url) in [
            ("through the VIP", format!("http://{vip}:{}/", self.port)),
            (
                "through the gateway",
                format!("http://{}/pay/", m.ingress_http),
            ),
        ] {
            let body = async {
                http.get(&url)
                    .send()
                    .await?
                    .error_for_status()?
                    .text()
                    .await
            }
            .await
            .with_context(|| format!("calling payment {what} ({url})"))?;
            if !body.starts_with("hello from payment-") {
                bail!("calling payment {what} ({url}) answered {body:?}");
            }
        }
        Ok(vip)
    }

    pub fn instructions(&self) -> String {
        let dns = self.bound.dns_addr;
        let http = self.bound.http_addr;
        let (ip, port) = (dns.ip(), dns.port());
        let z = &self.zone;
        let p = self.port;
        let dig = format!("dig @{ip} -p {port}");
        let head = format!(
            "\
Waymark demo is running.
  DNS (UDP+TCP)      {dns}   zone {z}.
  Registration API   http://{http}   (Consul agent API: any Consul client library works)
  Web view           http://{http}/ui/   (every service, live)
  Demo services      payment: 3 instances (tags v1, v1, v2+canary; HTTP), orders: 2 instances (TCP), port {p}"
        );
        let Some((m, vip)) = &self.mesh else {
            return format!(
                "{head}
  (waymark-gateway was not started: no forwarder, no gateway; DNS answers instance addresses)

Try:
  {dig} payment.{z} +short
  {dig} v2.payment.{z} +short
  {dig} SRV _payment._tcp.{z}
  curl http://$({dig} +short payment.{z} | head -1):{p}/
  curl -s 'http://{http}/v1/health/service/payment?passing'
  curl -X PUT 'http://{http}/v1/agent/service/maintenance/payment-1?enable=true'   # drain payment-1
  {dig} payment.{z} +short                                     # now two answers
  curl -s http://{http}/metrics | grep waymark_dns

Press Ctrl-C to stop."
            );
        };
        let logs = m.logs().map(|l| l.display().to_string()).join(", ");
        format!(
            "{head}
  Forwarder          every service on a VIP (payment: {vip}), admin http://{fwd}   (waymark-gateway forwarder)
  Gateway            http://{gw}  /pay/ -> payment, /orders/ -> orders, admin http://{gwa}   (waymark-gateway ingress)
  Gateway view       http://{gwa}/ui/   (routes, request rates, errors, latency, live)
  Logs               {logs}

Try:
  {dig} payment.{z} +short                          # the VIP: it never changes
  curl http://$({dig} +short payment.{z}):{p}/      # by name: the forwarder picks a healthy instance per request
  {dig} v2.payment.{z} +short                       # a tag subset has a VIP of its own
  curl http://{gw}/pay/                                  # a public call through the gateway
  curl -s 'http://{http}/v1/health/service/payment?passing'
  curl -X PUT 'http://{http}/v1/agent/service/maintenance/payment-1?enable=true'   # drain payment-1
  for i in 1 2 3 4 5 6; do curl -s http://{vip}:{p}/; done          # payment-2 and -3 only
  curl -X PUT 'http://{http}/v1/agent/service/maintenance/payment-1?enable=false'  # and back
  curl -s http://{fwd}/metrics | grep waymark_forwarder_requests

Press Ctrl-C to stop.",
            fwd = m.forwarder_admin,
            gw = m.ingress_http,
            gwa = m.ingress_admin,
        )
    }

    /// Stops the forwarder and the gateway, then the demo services and the resolver.
    pub async fn stop(self) {
        if let Some((m, _)) = self.mesh {
            m.stop().await;
        }
        for b in &self.backends {
            b.abort();
        }
        self.bound.shutdown(Duration::from_secs(5)).await;
    }
}
