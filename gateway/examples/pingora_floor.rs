//! The floor under the gateway's cost: a pingora HTTP proxy that does nothing but forward to
//! one fixed address, on the same runtime settings as `waymark-gateway` (one thread, no work
//! stealing, mimalloc, per-try timeouts and the header deadline). `tests/bench/gateway.sh`
//! runs it beside the gateway, so the report shows what pingora itself costs per request and
//! what Waymark's routing, balancing, headers, limits and metrics add on top.
//!
//! ```sh
//! cargo run --release -p waymark-gateway --example pingora_floor -- 127.0.0.1:8081 127.0.0.1:9000
//! ```

use std::time::Duration;

use async_trait::async_trait;
use pingora::prelude::*;
use pingora::proxy::{HttpProxy, ProxyHttp, Session};
use pingora::server::configuration::ServerConf;
use pingora::services::listening::Service;
use pingora::upstreams::peer::HttpPeer;
use waymark_gateway::connections::{ConnectionPolicy, Guarded};

#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Forwards every request to one address.
struct Floor {
    upstream: String,
}

#[async_trait]
impl ProxyHttp for Floor {
    type CTX = ();

    fn new_ctx(&self) {}

    async fn upstream_peer(&self, _: &mut Session, _: &mut ()) -> Result<Box<HttpPeer>> {
        let mut peer = HttpPeer::new(self.upstream.as_str(), false, String::new());
        // The gateway's defaults.
        peer.options.connection_timeout = Some(Duration::from_secs(1));
        peer.options.total_connection_timeout = Some(Duration::from_secs(1));
        peer.options.read_timeout = Some(Duration::from_secs(15));
        peer.options.write_timeout = Some(Duration::from_secs(15));
        peer.options.idle_timeout = Some(Duration::from_secs(60));
        Ok(Box::new(peer))
    }
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let [_, listen, upstream] = args.as_slice() else {
        anyhow::bail!("usage: pingora_floor LISTEN_ADDR UPSTREAM_ADDR");
    };
    let conf = ServerConf {
        threads: 1,
        work_stealing: false,
        // A benchmark target: stop promptly on SIGTERM.
        grace_period_seconds: Some(0),
        graceful_shutdown_timeout_seconds: Some(1),
        ..ServerConf::default()
    };
    let mut server = Server::new_with_opt_and_conf(None, conf);
    server.bootstrap();
    let app = HttpProxy::new(
        Floor {
            upstream: upstream.clone(),
        },
        server.configuration.clone(),
    );
    let mut proxy = Service::new(
        "pingora floor".into(),
        Guarded::new(
            app,
            ConnectionPolicy {
                header_read_timeout: Duration::from_secs(10),
                idle_timeout: Duration::from_secs(75),
                max_connections: 10_000,
                h2c: false,
            },
            prometheus_client::metrics::gauge::Gauge::default(),
            prometheus_client::metrics::counter::Counter::default(),
        ),
    );
    proxy.add_tcp(listen);
    server.add_service(proxy);
    println!("pingora_floor listening {listen}");
    server.run_forever();
}
