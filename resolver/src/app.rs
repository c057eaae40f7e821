//! Assembling the resolver: store, registry, DNS and HTTP servers, background tasks. Binds
//! everything before returning, so callers (the binary, tests) read the real addresses back
//! from [`Bound`] — port 0 works everywhere.

use std::net::SocketAddr;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio::task::JoinHandle;
use waymark_shared::lifecycle::drain;
use waymark_shared::Mirror;

use crate::api::{self, admin::Readiness, ApiState};
use crate::ca::MeshCa;
use crate::config::{auto_connection_cap, resolv_conf_upstreams, Config};
use crate::dns::vips::{VipAnswers, VipMode};
use crate::dns::{self, fast::FastPath, forward::Forwarder, udp::UdpServer, Zone};
use crate::metrics::Metrics;
use crate::registry::{Registry, Settings};
use crate::services_file;
use crate::store::{Store, StoreError};

#[derive(Debug, thiserror::Error)]
pub enum AppError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("cannot listen for DNS on {addr}: {source}")]
    DnsBind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("cannot listen for HTTP on {addr}: {source}")]
    HttpBind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error(transparent)]
    ServicesFile(#[from] services_file::ServicesFileError),
    #[error("mesh CA: {0}")]
    Ca(#[from] crate::ca::CaError),
    #[error(transparent)]
    Etcd(#[from] waymark_shared::etcd::EtcdError),
}

/// A running resolver.
pub struct Bound {
    pub dns_addr: SocketAddr,
    pub http_addr: SocketAddr,
    pub upstreams: Vec<SocketAddr>,
    pub registry: Arc<Registry>,
    stop: watch::Sender<bool>,
    /// HTTP connections and long responses hold its watch.
    drain: drain::Trigger,
    tasks: Vec<JoinHandle<()>>,
}

impl Bound {
    /// Stops serving, waits for the servers to finish (up to `grace`) and for every
    /// acknowledged write to be on disk.
    pub async fn shutdown(self, grace: Duration) {
        let started = tokio::time::Instant::now();
        let _ = self.stop.send(true);
        match self.drain.drain(grace).await {
            drain::Drained::Complete => {}
            drain::Drained::TimedOut { left } => {
                tracing::warn!(
                    ?grace,
                    left,
                    "HTTP connections still open at the deadline; closing them"
                )
            }
        }
        let left = grace.saturating_sub(started.elapsed());
        let all = futures::future::join_all(self.tasks);
        if tokio::time::timeout(left, all).await.is_err() {
            tracing::warn!(?grace, "servers did not stop within the grace period");
        }
        if let Err(e) = self.registry.flush().await {
            tracing::error!(error = %e, "final store flush failed");
        }
    }
}

/// Builds and starts the resolver. The HTTP listener comes up first, so `/healthz/ready`
/// can say what is still loading (the services file, then DNS).
pub async fn build(config: Config) -> Result<Bound, AppError> {
    let config = Arc::new(config);
    let metrics = Arc::new(Metrics::new());
    let ready = Arc::new(Readiness::default());
    ready.waiting_for("services file");
    ready.waiting_for("dns");

    let (store, loaded) = Store::open(
        &config.store.data_dir,
        config.store.recover_readable,
        metrics.clone(),
    )?;
    tracing::info!(
        registrations = loaded.registrations.len(),
        index = loaded.index,
        dir = %config.store.data_dir.display(),
        "store loaded"
    );
    let ca = Arc::new(MeshCa::open(
        &MeshCa::dir_of(&config.store.data_dir),
        &config.trust_domain(),
    )?);
    // The registry's own mirror: what was registered on this host. Without etcd it is also
    // what DNS and the API answer; with etcd they answer the mirror of etcd, which every host
    // shares, and this one is what the publisher writes there.
    let local = Arc::new(Mirror::new(loaded.index));
    let registry = Registry::new(
        local.clone(),
        store,
        loaded,
        Settings {
            node_address: config.api.node_address.clone(),
            zone: config.dns.zone.clone(),
            health: config.health.clone(),
            compact_after_records: config.store.compact_after_records,
            vip_range: config.vips.range,
            panic_thresholds: config.panic_thresholds(),
        },
        metrics.clone(),
    );

    let (stop, stopped) = watch::channel(false);
    let (drain, http_drain) = drain::channel();
    let mut tasks = Vec::new();
    let (mirror, etcd) = if config.etcd.enabled() {
        let serving = Arc::new(Mirror::new(0));
        let (link, etcd_tasks) = crate::etcd::EtcdLink::start(
            &config,
            local.clone(),
            serving.clone(),
            ready.clone(),
            stopped.clone(),
        )?;
        tracing::info!(endpoints = ?config.etcd.endpoints, prefix = %config.etcd.prefix, node = %link.node, "etcd is the registry of record");
        tasks.extend(etcd_tasks);
        (serving, Some(Arc::new(link)))
    } else {
        (local.clone(), None)
    };
    let state = Arc::new(ApiState {
        registry: registry.clone(),
        mirror: mirror.clone(),
        local: local.clone(),
        etcd,
        config: config.clone(),
        metrics: metrics.clone(),
        ready: ready.clone(),
        drain: http_drain.clone(),
        encoded: Default::default(),
        ca,
        eureka: Default::default(),
    });
    // The Eureka view follows the registry's own mirror, so it sees instances leave.
    let eureka_registry = Arc::downgrade(&registry);
    tasks.push(spawn_until_stopped(
        stopped.clone(),
        api::eureka::view::follow(state.eureka.clone(), local.clone(), move |id| {
            eureka_registry
                .upgrade()?
                .definition(id)
                .and_then(|(d, _)| d.eureka)
        }),
    ));
    let (http_addr, http) = start_http(state, http_drain).await?;
    tasks.push(http);
    let started = async {
        // Third-party registrations: loaded before DNS answers, then watched.
        if let Some(sf) = &config.services_file {
            let first = services_file::load(&registry, &sf.path).await?;
            let watch = services_file::watch(
                registry.clone(),
                sf.path.clone(),
                sf.reload_interval,
                Some(first),
            );
            tasks.push(spawn_until_stopped(stopped.clone(), watch));
        }
        ready.done("services file");
        let (dns_addr, upstreams, dns) =
            start_dns(&config, mirror, local, metrics, stopped.clone()).await?;
        tasks.push(dns);
        ready.done("dns");
        Ok::<_, AppError>((dns_addr, upstreams))
    };
    let (dns_addr, upstreams) = match started.await {
        Ok(bound) => bound,
        Err(e) => {
            let _ = stop.send(true);
            drop(drain);
            return Err(e);
        }
    };

    // Deregister-after for long-critical instances.
    let reaper = registry.clone();
    tasks.push(spawn_until_stopped(stopped, async move {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            tick.tick().await;
            reaper.reap().await;
        }
    }));

    tracing::info!(%dns_addr, %http_addr, zone = %config.dns.zone, ?upstreams, "waymark-resolver serving");
    Ok(Bound {
        dns_addr,
        http_addr,
        upstreams,
        registry,
        stop,
        drain,
        tasks,
    })
}

/// Binds the HTTP listener and serves the API until the drain.
async fn start_http(
    state: Arc<ApiState>,
    drain: drain::Watch,
) -> Result<(SocketAddr, JoinHandle<()>), AppError> {
    let api = &state.config.api;
    let addr = api.addr;
    let bind_error = |source| AppError::HttpBind { addr, source };
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(bind_error)?;
    let bound = listener.local_addr().map_err(bind_error)?;
    let limits = api::serve::Limits {
        max_connections: auto_connection_cap(api.max_connections, 1024),
        max_connections_per_client: api.max_connections_per_client,
        header_read_timeout: api.header_read_timeout,
    };
    tracing::debug!(?limits, "HTTP limits");
    let metrics = state.metrics.clone();
    let app = api::router(state);
    let task = tokio::spawn(api::serve::serve(listener, app, limits, metrics, drain));
    Ok((bound, task))
}

/// Binds DNS (UDP and TCP on one port) and serves it until stopped. Returns the bound
/// address and the upstreams in use.
async fn start_dns(
    config: &Arc<Config>,
    mirror: Arc<Mirror>,
    local: Arc<Mirror>,
    metrics: Arc<Metrics>,
    mut stopped: watch::Receiver<bool>,
) -> Result<(SocketAddr, Vec<SocketAddr>, JoinHandle<()>), AppError> {
    let addr = config.dns.addr;
    let bind_error = |source| AppError::DnsBind { addr, source };
    let (udp, tcp) = dns::server::bind(
        addr,
        config.dns.udp_worker_count(),
        config.dns.udp_recv_buffer,
    )
    .map_err(bind_error)?;
    let dns_addr = udp[0].local_addr().map_err(bind_error)?;
    let upstreams = if config.dns.upstreams.is_empty() {
        let text = std::fs::read_to_string("/etc/resolv.conf").unwrap_or_default();
        resolv_conf_upstreams(&text, &[dns_addr, SocketAddr::new(dns_addr.ip(), 53)])
    } else {
        config.dns.upstreams.clone()
    };
    let ns_address = config
        .dns
        .ns_address
        .or_else(|| (!dns_addr.ip().is_unspecified()).then(|| dns_addr.ip()));
    let local_forwarder = Arc::new(AtomicBool::new(false));
    if config.vips.answers == VipMode::Auto {
        spawn_until_stopped(
            stopped.clone(),
            // This host's forwarder registers with this host's resolver.
            dns::vips::follow_local_forwarder(local, local_forwarder.clone()),
        );
    }
    let handler = Arc::new(dns::server::Handler {
        zone: Zone::new(
            &config.dns.zone,
            config.dns.ttl,
            config.dns.negative_ttl,
            ns_address,
        ),
        consul: config.dns.consul_names.then(|| dns::consul::ConsulNames {
            zone: Zone::new(
                &config.dns.consul_domain,
                config.dns.ttl,
                config.dns.negative_ttl,
                ns_address,
            ),
            datacenter: config.api.datacenter.to_ascii_lowercase(),
            node_name: if config.etcd.enabled() {
                config.etcd.node()
            } else {
                config.api.node_name.clone()
            },
            node_address: config.api.node_address.clone(),
        }),
        mirror,
        forwarder: Forwarder::new(
            upstreams.clone(),
            config.dns.upstream_timeout,
            config.dns.forward_allow.clone(),
            config.dns.max_forwards,
            metrics.clone(),
        ),
        vips: VipAnswers {
            mode: config.vips.answers,
            ttl: config.vips.ttl,
            clients: config.vips.clients.clone(),
            local_forwarder,
        },
        max_udp_payload: config.dns.max_udp_payload,
        local_clients: config.dns.local_clients.clone(),
        remote_max_udp_payload: config.dns.remote_max_udp_payload,
        rrl: (config.dns.rrl_rate > 0).then(|| {
            dns::rrl::Rrl::new(
                config.dns.rrl_rate,
                config.dns.rrl_slip,
                config.dns.local_clients.clone(),
            )
        }),
        metrics,
    });
    let fast = Arc::new(FastPath::new(
        handler.clone(),
        config.dns.answer_cache_entries,
    ));
    let udp = UdpServer::start(
        udp,
        fast,
        handler.clone(),
        tokio::runtime::Handle::current(),
    )
    .map_err(bind_error)?;
    let limits = dns::tcp::Limits {
        max_connections: auto_connection_cap(config.dns.tcp_max_connections, 1024),
        max_connections_per_client: config.dns.tcp_max_connections_per_client,
        idle_timeout: config.dns.tcp_idle_timeout,
    };
    let tcp = tokio::spawn(dns::tcp::serve(tcp, handler, limits, stopped.clone()));
    let task = tokio::spawn(async move {
        let _ = stopped.wait_for(|s| *s).await;
        let _ = tokio::task::spawn_blocking(move || udp.stop()).await;
        let _ = tcp.await;
    });
    Ok((dns_addr, upstreams, task))
}

fn spawn_until_stopped(
    mut stopped: watch::Receiver<bool>,
    task: impl std::future::Future<Output = ()> + Send + 'static,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        tokio::select! {
            _ = task => {}
            _ = stopped.wait_for(|s| *s) => {}
        }
    })
}
