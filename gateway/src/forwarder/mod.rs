//! `waymark-gateway forwarder`: the per-host forwarder, outbound side.
//!
//! It follows the local registry's change stream (the ingress's [`MirrorClient`]), listens
//! on every service's VIP at every port its instances register ([`listeners`]), and sends
//! each connection ([`tcp`]) or request ([`http`]) to a healthy instance picked by the
//! ingress's [`Balancer`] over the shared selection rule. Once its listeners for the current
//! state are up it registers itself ([`announce`]), which is what turns VIP answers on in
//! the resolvers of this host (`--vip-answers auto`).
//!
//! - [`config`]: the TOML file, its defaults and `validate()`.
//! - [`metrics`]: `/metrics`; the admin listener here serves it with `/healthz/live` and
//!   `/healthz/ready` (which names what it still waits for).
//!
//! With a join token the forwarder is in the mesh ([`config::MeshConfig`]): it gets this
//! host's certificate from the registry's CA ([`crate::identity`]), keeps it renewed, calls
//! instances on other hosts through their forwarders over the mTLS tunnel
//! ([`crate::tunnel`]), and serves the tunnel's inbound side for its own host's instances.
//! [`route`] decides which way each instance is reached and whom the inbound side admits;
//! [`upstream`] makes the connection either way.
//!
//! SIGTERM (or SIGINT): deregister first, so resolvers answer instance addresses again;
//! then close the listeners; then give open connections `shutdown.drain_timeout`.

pub mod announce;
pub mod config;
pub mod http;
pub mod listeners;
pub mod metrics;
pub mod route;
pub mod tcp;
pub mod upstream;

use std::io::Write;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use anyhow::Context;
use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use tokio::sync::{watch, Notify};
use waymark_shared::lifecycle::bounded::Admission;
use waymark_shared::lifecycle::drain;
use waymark_shared::lifecycle::readiness::Readiness;
use waymark_shared::Mirror;

use crate::balancer::Balancer;
use crate::identity::{Identity, IdentitySettings};
use crate::limits::RetryBudget;
use crate::tunnel::{self, InboundStats, TunnelPool};
use announce::{AnnounceStatus, Announcer};
use config::ForwarderConfig;
use listeners::Listeners;
pub use metrics::Metrics;
use metrics::PeerResult;
use route::Routes;
use upstream::Upstreams;
use waymark_shared::follow::{stream::MirrorClient, RegistryStatus};

/// How long one change-stream long poll waits for changes.
const POLL_WAIT: Duration = Duration::from_secs(30);

/// Readiness pieces.
const WAIT_REGISTRY: &str = "registry state";
const WAIT_LISTENERS: &str = "VIP listeners";
const WAIT_REGISTRATION: &str = "own registration";
const WAIT_IDENTITY: &str = "mesh certificate";
const WAIT_SHUTDOWN: &str = "nothing: shutting down";

/// State shared by the listeners, the connections and the admin API.
pub struct Forwarder {
    pub config: ForwarderConfig,
    pub mirror: Arc<Mirror>,
    pub status: Arc<RegistryStatus>,
    pub balancer: Balancer,
    pub retry_budget: RetryBudget,
    pub metrics: Metrics,
    pub admission: Arc<Admission<()>>,
    /// The way to instances: directly, or through other hosts' forwarders.
    pub upstreams: Arc<Upstreams>,
    pub http_client: http::Client,
    /// The inbound side's counts (in the mesh).
    pub inbound: Arc<InboundStats>,
    pub readiness: Arc<Readiness>,
    pub announce: AnnounceStatus,
    pub listeners: Listeners,
    /// Wakes the reconciler: a registry change, or a listener that failed.
    pub changed: Arc<Notify>,
}

impl Forwarder {
    fn new(config: ForwarderConfig, drain: drain::Watch) -> Forwarder {
        let metrics = Metrics::new();
        let upstreams = Arc::new(Upstreams::new(
            config.mesh.enabled(),
            config.connect_timeout,
            &metrics,
        ));
        Forwarder {
            mirror: Arc::new(Mirror::new(0)),
            status: Arc::new(RegistryStatus::default()),
            balancer: Balancer::new(config.outlier.clone()),
            retry_budget: RetryBudget::new(&config.retry),
            metrics,
            admission: Admission::new(config.max_connections, None),
            http_client: http::client(upstreams.clone()),
            upstreams,
            inbound: Arc::new(InboundStats::default()),
            readiness: Readiness::new(),
            announce: AnnounceStatus::default(),
            listeners: Listeners::new(drain),
            changed: Arc::new(Notify::new()),
            config,
        }
    }

    /// Brings the listeners to the mirror's state; forgets balancer state of instances
    /// that are gone. Returns whether every listener is up.
    fn reconcile(self: &Arc<Self>) -> bool {
        let services = self.mirror.services();
        self.upstreams.set_routes(Routes::build(
            &self.config.host_name,
            &self.config.announced_addresses(),
            &services,
            &self.config.mesh.allow,
        ));
        let want = listeners::desired(&services, |s| self.config.is_http_service(s));
        let done = self.listeners.reconcile(self, &want);
        if done.added + done.removed + done.changed > 0 || !done.failed.is_empty() {
            tracing::info!(
                added = done.added,
                removed = done.removed,
                changed = done.changed,
                failed = done.failed.len(),
                listening = want.len() - done.failed.len(),
                "listeners reconciled"
            );
        }
        let live = services
            .iter()
            .flat_map(|s| s.instances.iter().map(|i| i.id.to_string()))
            .collect();
        self.balancer.retain(&live);
        done.failed.is_empty()
    }

    fn refresh_metrics(&self) {
        self.metrics
            .registry_connected
            .set(i64::from(self.status.connected()));
        self.metrics.registry_index.set(self.mirror.index() as i64);
        self.metrics.registry_age_ms.set(
            self.status
                .since_last_ok()
                .map_or(-1, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX)),
        );
        self.metrics
            .registered
            .set(i64::from(self.announce.registered()));
        let left = self.upstreams.identity().map_or(-1, |id| {
            id.current()
                .not_after
                .duration_since(SystemTime::now())
                .map_or(0, |d| d.as_secs() as i64)
        });
        self.metrics.certificate_expiry_seconds.set(left);
        let catch_up = |c: &prometheus_client::metrics::counter::Counter, now: u64| {
            c.inc_by(now.saturating_sub(c.get()));
        };
        let relaxed = std::sync::atomic::Ordering::Relaxed;
        catch_up(
            &self.metrics.inbound_handshakes_refused,
            self.inbound.handshakes_refused.load(relaxed),
        );
        catch_up(
            &self.metrics.inbound_unreachable,
            self.inbound.unreachable.load(relaxed),
        );
    }

    /// In the mesh: gets the host's certificate (trying again until the CA answers), keeps
    /// it renewed, starts calling other hosts through the tunnel, says so (`joined`), and
    /// serves the inbound listener until the task is dropped.
    async fn join_mesh(
        self: &Arc<Self>,
        inbound: tokio::net::TcpListener,
        joined: impl FnOnce(),
    ) -> anyhow::Result<()> {
        let mesh = &self.config.mesh;
        let settings = IdentitySettings {
            registry: self.config.registry.clone(),
            host: self.config.host_name.clone(),
            join_token: mesh.token()?,
            state_dir: mesh.state_dir.clone(),
        };
        let identity = loop {
            match Identity::obtain(settings.clone()).await {
                Ok(id) => break id,
                Err(e) => {
                    tracing::warn!(error = %e, retry_s = mesh.retry.as_secs_f64(), "no mesh certificate yet");
                    tokio::time::sleep(mesh.retry).await;
                }
            }
        };
        tracing::info!(host = identity.host(), "mesh certificate in use");
        tokio::spawn(identity.clone().keep_renewed(mesh.retry));
        let handshakes = self.metrics.peer_handshakes.clone();
        let pool = TunnelPool::new(identity.clone(), self.config.connect_timeout).on_handshake(
            move |host| {
                handshakes
                    .get_or_create(&metrics::PeerLabel {
                        host: host.to_string(),
                    })
                    .inc();
            },
        );
        self.upstreams.set_tunnels(Arc::new(pool));
        let admit = {
            let fwd = self.clone();
            move |target: SocketAddr, peer: &str| {
                let verdict = fwd.upstreams.routes().admit(target, peer);
                let result = match &verdict {
                    Ok(()) => "admitted",
                    Err(tunnel::Refusal::NotHere(_)) => "not_here",
                    Err(tunnel::Refusal::Forbidden(_)) => "forbidden",
                };
                fwd.metrics
                    .inbound_streams
                    .get_or_create(&PeerResult {
                        host: peer.to_string(),
                        result,
                    })
                    .inc();
                verdict
            }
        };
        joined();
        tunnel::serve_inbound(
            inbound,
            identity,
            Arc::new(admit),
            self.config.connect_timeout,
            self.inbound.clone(),
        )
        .await;
        Ok(())
    }
}

async fn metrics_handler(State(f): State<Arc<Forwarder>>) -> Response {
    f.refresh_metrics();
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        f.metrics.encode(),
    )
        .into_response()
}

async fn live() -> &'static str {
    "live\n"
}

/// 200 once the registry's state is in, the listeners for it are up and the forwarder is
/// registered; afterwards it stays 200 while the registry is unreachable (the last state is
/// served) and says so. 503 names what it waits for.
async fn ready(State(f): State<Arc<Forwarder>>) -> Response {
    let pending = f.readiness.pending();
    let connected = f.status.connected();
    let body = serde_json::json!({
        "ready": pending.is_empty(),
        "waiting_for": pending,
        "registry": if connected { "connected" } else { "unreachable" },
        "registry_error": if connected { None } else { f.status.last_error() },
        "state_age_ms": f.status.since_last_ok().map(|d| d.as_millis() as u64),
        "registered": f.announce.registered(),
        "registration_error": f.announce.last_error(),
        "index": f.mirror.index(),
        "listeners": f.listeners.addresses().len(),
    });
    let code = if pending.is_empty() {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (code, axum::Json(body)).into_response()
}

fn admin_router(f: Arc<Forwarder>) -> Router {
    Router::new()
        .route("/metrics", get(metrics_handler))
        .route("/healthz/live", get(live))
        .route("/healthz/ready", get(ready))
        .with_state(f)
}

/// Runs the forwarder until SIGTERM or SIGINT, then deregisters and drains.
pub fn run(config: ForwarderConfig) -> anyhow::Result<()> {
    config.validate()?;
    let admin = std::net::TcpListener::bind(config.admin_addr)
        .with_context(|| format!("admin listener {}", config.admin_addr))?;
    admin.set_nonblocking(true)?;
    // In the mesh: the join token is read and the inbound listener bound before anything
    // starts, so that a wrong path or a taken port is an error at once.
    let inbound = if config.mesh.enabled() {
        config.mesh.token()?;
        let l = std::net::TcpListener::bind(config.mesh.inbound_addr)
            .with_context(|| format!("mesh inbound listener {}", config.mesh.inbound_addr))?;
        l.set_nonblocking(true)?;
        Some(l)
    } else {
        None
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("waymark-forwarder")
        .build()
        .context("starting the runtime")?;
    runtime.block_on(serve(config, admin, inbound))
}

async fn serve(
    config: ForwarderConfig,
    admin: std::net::TcpListener,
    inbound: Option<std::net::TcpListener>,
) -> anyhow::Result<()> {
    let admin_addr: SocketAddr = admin.local_addr()?;
    let admin = tokio::net::TcpListener::from_std(admin)?;
    let inbound_addr = inbound.as_ref().map(|l| l.local_addr()).transpose()?;
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("SIGTERM handler")?;
    let mut int = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())
        .context("SIGINT handler")?;
    let (trigger, watch) = drain::channel();
    let fwd = Arc::new(Forwarder::new(config, watch));
    fwd.readiness.waiting_for(WAIT_REGISTRY);
    fwd.readiness.waiting_for(WAIT_LISTENERS);
    fwd.readiness.waiting_for(WAIT_REGISTRATION);
    let (stop_tx, stop) = watch::channel(false);

    // The mesh: the certificate first (local instances are served meanwhile).
    let (identity_tx, mut has_identity) = watch::channel(inbound.is_none());
    let mesh_task = match inbound {
        Some(l) => {
            fwd.readiness.waiting_for(WAIT_IDENTITY);
            let l = tokio::net::TcpListener::from_std(l)?;
            let fwd = fwd.clone();
            Some(tokio::spawn(async move {
                let joined = || {
                    fwd.readiness.done(WAIT_IDENTITY);
                    let _ = identity_tx.send(true);
                };
                if let Err(e) = fwd.join_mesh(l, joined).await {
                    tracing::error!(error = %e, "cannot join the mesh");
                }
            }))
        }
        None => None,
    };

    // The admin API, until the very end.
    let (admin_stop_tx, admin_stop) = watch::channel(false);
    let admin_task = tokio::spawn({
        let (router, mut stop) = (admin_router(fwd.clone()), admin_stop);
        async move {
            let served = axum::serve(admin, router)
                .with_graceful_shutdown(async move {
                    let _ = stop.wait_for(|s| *s).await;
                })
                .await;
            if let Err(e) = served {
                tracing::error!(error = %e, "admin listener failed");
            }
        }
    });

    // The registry follower wakes the reconciler on every change.
    let changed = fwd.changed.clone();
    let follower = MirrorClient::new(
        &fwd.config.registry,
        fwd.mirror.clone(),
        fwd.status.clone(),
        Arc::new({
            let changed = changed.clone();
            move |_m: &Mirror| changed.notify_one()
        }),
        POLL_WAIT,
    );
    let follower_task = tokio::spawn({
        let stop = stop.clone();
        async move { follower.run(stop).await }
    });

    // The reconciler: listeners follow the mirror; the first time they are up (after the
    // first state arrived) the announcer starts.
    let (listening_tx, mut listening) = watch::channel(false);
    let reconciler = tokio::spawn({
        let (fwd, changed, mut stop) = (fwd.clone(), changed.clone(), stop.clone());
        async move {
            let mut all_up = true;
            loop {
                // Listeners that could not bind are tried again every few seconds too.
                let retry = async {
                    if all_up {
                        std::future::pending::<()>().await
                    } else {
                        tokio::time::sleep(Duration::from_secs(5)).await
                    }
                };
                tokio::select! {
                    _ = changed.notified() => {}
                    _ = retry => {}
                    _ = stop.wait_for(|s| *s) => return,
                }
                if !fwd.status.synced() {
                    continue;
                }
                all_up = fwd.reconcile();
                if !*listening_tx.borrow() {
                    fwd.readiness.done(WAIT_REGISTRY);
                    fwd.readiness.done(WAIT_LISTENERS);
                    let _ = listening_tx.send(true);
                }
            }
        }
    });

    let announcer = Arc::new(Announcer::new(
        &fwd.config,
        inbound_addr.map_or(0, |a| a.port()),
    ));
    let announce_task = tokio::spawn({
        let (fwd, announcer, stop) = (fwd.clone(), announcer.clone(), stop.clone());
        async move {
            // Registered once it serves the current state and, in the mesh, can answer
            // other hosts' forwarders.
            if listening.wait_for(|l| *l).await.is_err()
                || has_identity.wait_for(|i| *i).await.is_err()
            {
                return;
            }
            let on_failure = || {
                fwd.metrics.announce_failures.inc();
            };
            // Readiness waits for the first registration only (later calls change nothing).
            let on_success = || fwd.readiness.done(WAIT_REGISTRATION);
            announcer
                .run(&fwd.announce, on_success, on_failure, stop)
                .await;
        }
    });

    match inbound_addr {
        Some(inbound) => {
            println!("waymark-gateway forwarder listening admin={admin_addr} inbound={inbound}")
        }
        None => println!("waymark-gateway forwarder listening admin={admin_addr}"),
    }
    let _ = std::io::stdout().flush();
    tracing::info!(admin = %admin_addr, inbound = ?inbound_addr, host = %fwd.config.host_name, "forwarder started");

    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM: deregistering, then draining"),
        _ = int.recv() => tracing::info!("SIGINT: deregistering, then draining"),
    }
    fwd.readiness.waiting_for(WAIT_SHUTDOWN);
    // Deregister first: resolvers stop answering VIPs before the listeners close.
    let _ = stop_tx.send(true);
    // A registration or heartbeat in flight is abandoned, not waited for.
    announce_task.abort();
    let _ = announce_task.await;
    if let Some(t) = mesh_task {
        t.abort();
        let _ = t.await;
    }
    let _ = reconciler.await;
    let _ = follower_task.await;
    match tokio::time::timeout(Duration::from_secs(3), announcer.deregister()).await {
        Ok(Ok(())) => tracing::info!(id = %announcer.id, "deregistered"),
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "could not deregister; the registration's TTL will lapse")
        }
        Err(_) => tracing::warn!("deregistering timed out; the registration's TTL will lapse"),
    }
    fwd.listeners.shutdown();
    let drained = trigger.drain(fwd.config.shutdown.drain_timeout).await;
    tracing::info!(?drained, "forwarder stopped");
    let _ = admin_stop_tx.send(true);
    let _ = admin_task.await;
    Ok(())
}
