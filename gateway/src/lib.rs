//! `waymark-gateway`: the north-south ingress gateway, on pingora.
//!
//! It mirrors the registry through the resolver's change stream and routes public requests
//! (by host, path prefix and headers, from the config file and from registration metadata)
//! to healthy instances, balancing by least outstanding requests of two random choices.
//!
//! - [`config`]: the TOML file and its defaults, checked by `validate()`.
//! - the registry follower is `waymark_shared::follow::stream` (shared with the resolver).
//! - [`routes`]: the pure route table.
//! - [`balancer`]: two-choice least-outstanding balancing and outlier ejection.
//! - [`limits`]: token buckets for rate limits and the retry budget.
//! - [`header_deadline`]: a total deadline for reading each request head (slow clients).
//! - [`connections`]: the connection cap, and idle HTTP/2 connections closed.
//! - [`headers`]: forwarding headers, request IDs, trace context, hop-by-hop headers.
//! - [`path`]: request path normalisation before routing (dot segments, escapes, slashes).
//! - [`admission`]: what is decided before an instance is involved (limits, route,
//!   a serving instance) and the forwarding headers, for both data paths.
//! - [`tries`]: whether another try may start; a failed try counted against its instance.
//! - [`proxy`]: the pingora `ProxyHttp` that puts those together.
//! - [`lean`]: the lean data path on hyper (`data_path = "lean"`), HTTP/1.1 and HTTP/2.
//! - [`h2_streams`]: the lean path's HTTP/2 streams: counted, and reset when stalled.
//! - [`write_deadline`]: writes to a client that stops reading fail after the send timeout.
//! - [`access_log`]: the access line per request, text or JSON, buffered.
//! - [`tls`]: certificates picked by SNI from a directory, reloaded when it changes.
//! - [`identity`]: a host's mesh identity (key, CA-signed certificate, renewal) and the
//!   mutual-TLS configs made from it.
//! - [`tunnel`]: forwarder to forwarder: HTTP/2 CONNECT streams over pooled mutual TLS.
//! - [`admin`]: `/metrics`, `/healthz/live`, `/healthz/ready`.
//! - [`traffic`]: requests, errors and latency per route and per instance.
//! - [`ui`]: the web view on the admin listener (`/ui/`): routes and their traffic, live.
//! - [`listen`]: the public listeners, claimed (and refused when in use) before pingora starts.
//! - [`forwarder`]: the other mode, `waymark-gateway forwarder`: the per-host forwarder on
//!   service VIPs (plain tokio and hyper; pingora is the ingress's alone).
//!
//! [`run`] owns the process: pingora runs the proxy and the background work, handles
//! signals (SIGTERM: graceful stop, which ends as soon as no connection is left, and at the
//! latest after the configured grace period and timeout) and returns when it is done. The config file's routes reload when the file changes or on
//! SIGHUP; certificates reload when their directory changes.

/// The hasher of the maps looked up on every request (keyed by instance IDs and route
/// names, which come from the registry, not from clients): seeded per process, several
/// times faster than SipHash on short keys.
pub type FastHash = foldhash::fast::RandomState;

pub mod access_log;
pub mod admin;
pub mod admission;
pub mod balancer;
pub mod config;
pub mod connections;
pub mod forwarder;
pub mod h1_client;
pub mod h2_streams;
pub mod header_deadline;
pub mod headers;
pub mod identity;
pub mod lean;
pub mod limits;
pub mod listen;
pub mod path;
pub mod proxy;
pub mod routes;
pub mod tls;
pub mod traffic;
pub mod tries;
pub mod tunnel;
pub mod ui;
pub mod upstream;
pub mod write_deadline;

use std::collections::{HashMap, HashSet};
use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use arc_swap::ArcSwap;
use async_trait::async_trait;
use pingora::apps::HttpServerOptions;
use pingora::listeners::tls::TlsSettings;
use pingora::listeners::{L4BufferSettings, ListenerConfig, TcpSocketOptions};
use pingora::server::configuration::ServerConf;
use pingora::server::{RunArgs, Server, ShutdownWatch};
use pingora::services::background::{background_service, BackgroundService};
use pingora::services::listening::Service;
use waymark_shared::{log_sink, Mirror};

use crate::admin::{AdminState, Metrics};
use crate::balancer::Balancer;
use crate::config::{Config, ConfigError, DataPath, RouteConfig};
use crate::connections::{ConnectionPolicy, Guarded};
use crate::limits::{PerClientLimit, RetryBudget, SharedLimit};
use crate::listen::Reserved;
use crate::routes::{RouteError, RouteTable};
use crate::tls::CertStore;
use waymark_shared::follow::{stream::MirrorClient, RegistryStatus};

/// The write buffer under each client connection on pingora's data path (pingora's default:
/// one segment).
const L4_WRITE_BUFFER: usize = 1460;

/// How long one change-stream long poll waits for changes.
const POLL_WAIT: Duration = Duration::from_secs(30);

/// The routes from the config file and their rate limits: what a config reload replaces.
pub struct RouteSet {
    pub routes: Vec<RouteConfig>,
    /// By route name.
    pub limits: HashMap<String, Arc<SharedLimit>>,
}

impl RouteSet {
    /// Builds the set, keeping the buckets of `previous` routes whose name and limit stayed.
    fn new(routes: Vec<RouteConfig>, previous: Option<&RouteSet>) -> RouteSet {
        let limits = routes
            .iter()
            .filter_map(|r| {
                let limit = r.rate_limit?;
                let name = r.display_name();
                let kept = previous
                    .and_then(|p| p.limits.get(&name))
                    .filter(|l| l.limit() == limit)
                    .cloned();
                Some((
                    name,
                    kept.unwrap_or_else(|| Arc::new(SharedLimit::new(limit))),
                ))
            })
            .collect();
        RouteSet { routes, limits }
    }
}

/// State shared by the proxy, the mirror follower and the admin API.
pub struct Shared {
    /// The config as started (its `routes` are the first route set; see `route_set`).
    pub config: Config,
    /// Where the config came from; reloads read it again.
    pub config_path: Option<PathBuf>,
    pub route_set: ArcSwap<RouteSet>,
    pub mirror: Arc<Mirror>,
    pub status: Arc<RegistryStatus>,
    pub routes: ArcSwap<RouteTable>,
    pub route_count: Arc<AtomicU64>,
    pub balancer: Balancer,
    pub metrics: Arc<Metrics>,
    pub retry_budget: RetryBudget,
    pub client_limit: Option<PerClientLimit>,
    last_route_errors: Mutex<Vec<RouteError>>,
}

impl Shared {
    pub fn new(config: Config, config_path: Option<PathBuf>) -> Shared {
        let shared = Shared {
            config_path,
            route_set: ArcSwap::from_pointee(RouteSet::new(config.routes.clone(), None)),
            mirror: Arc::new(Mirror::new(0)),
            status: Arc::new(RegistryStatus::default()),
            routes: ArcSwap::from_pointee(RouteTable::default()),
            route_count: Arc::new(AtomicU64::new(0)),
            balancer: Balancer::new(config.outlier.clone()),
            metrics: Arc::new(Metrics::new()),
            retry_budget: RetryBudget::new(&config.retry),
            client_limit: config.client_rate_limit.map(PerClientLimit::new),
            last_route_errors: Mutex::new(Vec::new()),
            config,
        };
        shared.rebuild_routes();
        shared
    }

    /// Reads the config file again and puts its routes in force when it is valid; an invalid
    /// file changes nothing. Only routes (and their rate limits) reload: other settings take
    /// a restart. Returns whether the routes changed.
    pub fn reload_routes(&self) -> Result<bool, ConfigError> {
        let Some(path) = &self.config_path else {
            return Ok(false);
        };
        let next = Config::load(path)?;
        next.validate()?;
        let current = self.route_set.load_full();
        if current.routes == next.routes {
            return Ok(false);
        }
        self.route_set
            .store(Arc::new(RouteSet::new(next.routes, Some(&current))));
        self.rebuild_routes();
        Ok(true)
    }

    /// Rebuilds the route table from the config and the mirror; forgets balancer state of
    /// instances that are gone. Bad metadata is logged once per change of the error set.
    pub fn rebuild_routes(&self) {
        let services = self.mirror.services();
        let (table, errors) = RouteTable::build(
            &self.route_set.load().routes,
            &services,
            self.config.metadata_routes,
        );
        {
            let mut last = self
                .last_route_errors
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            if *last != errors {
                for e in &errors {
                    tracing::warn!(error = %e, "registration metadata makes no route");
                }
                *last = errors;
            }
        }
        self.route_count
            .store(table.len() as u64, Ordering::Relaxed);
        self.metrics.routes.set(table.len() as i64);
        self.routes.store(Arc::new(table));
        let live: HashSet<String> = services
            .iter()
            .flat_map(|s| s.instances.iter().map(|i| i.id.to_string()))
            .collect();
        self.balancer.retain(&live);
        let table = self.routes.load();
        let routes: HashSet<&str> = table.routes().map(|r| r.name.as_str()).collect();
        let keep = |r: &str| r == admission::NO_ROUTE || routes.contains(r);
        self.metrics.traffic.retain(keep, |i| live.contains(i));
        self.metrics.retain_routes(keep);
    }
}

/// The background work: following the registry, serving the admin API, reloading
/// certificates. Stops when pingora signals shutdown.
struct Control {
    shared: Arc<Shared>,
    admin: Mutex<Option<std::net::TcpListener>>,
    certs: Option<Arc<CertStore>>,
    /// The public listeners' reservations, dropped once pingora listens on them.
    reserved: Mutex<Option<Vec<Reserved>>>,
    /// Connections pingora is serving (the header-deadline wrapper counts them).
    connections: Arc<AtomicU64>,
    /// The admin listener's bound address.
    admin_addr: SocketAddr,
}

impl Control {
    /// Waits until pingora accepts on every public listener, then prints the addresses (the
    /// line scripts and tests wait for) and releases the reservations. A listener that never
    /// comes up ends the process with an error.
    async fn announce(&self) {
        let reserved = self
            .reserved
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
            .unwrap_or_default();
        let waited = tokio::task::spawn_blocking(move || {
            listen::wait_listening(&reserved, Duration::from_secs(30)).map(|()| reserved)
        })
        .await;
        let reserved = match waited {
            Ok(Ok(r)) => r,
            Ok(Err(e)) => {
                log_sink::sink().flush();
                eprintln!("waymark-gateway: {e}");
                std::process::exit(1);
            }
            Err(e) => {
                log_sink::sink().flush();
                eprintln!("waymark-gateway: waiting for the listeners failed: {e}");
                std::process::exit(1);
            }
        };
        let find = |what: &str| {
            reserved
                .iter()
                .find(|r| r.what == what)
                .map_or("-".to_string(), |r| r.addr.to_string())
        };
        let admin = self.admin_addr;
        println!(
            "waymark-gateway listening http={} tls={} admin={admin}",
            find("http"),
            find("tls")
        );
        let _ = std::io::stdout().flush();
        tracing::info!(http = %find("http"), tls = %find("tls"), %admin, "listening");
    }

    /// After shutdown begins, ends the process as soon as no connection is left (pingora
    /// would otherwise sleep through its whole grace period).
    async fn exit_when_idle(&self, mut shutdown: ShutdownWatch) {
        while !*shutdown.borrow() {
            if shutdown.changed().await.is_err() {
                return;
            }
        }
        loop {
            let open = self.connections.load(Ordering::Acquire);
            if open == 0 {
                tracing::info!("shutdown: no connection left; stopping");
                let _ = std::io::stdout().flush();
                log_sink::sink().flush();
                std::process::exit(0);
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

#[async_trait]
impl BackgroundService for Control {
    async fn start(&self, shutdown: ShutdownWatch) {
        let shared = self.shared.clone();
        let follower_shared = shared.clone();
        let follower = MirrorClient::new(
            &shared.config.registry,
            shared.mirror.clone(),
            shared.status.clone(),
            Arc::new(move |_m: &Mirror| follower_shared.rebuild_routes()),
            POLL_WAIT,
        );
        let admin_listener = self.admin.lock().unwrap_or_else(|e| e.into_inner()).take();
        let admin_state = Arc::new(AdminState {
            metrics: shared.metrics.clone(),
            status: shared.status.clone(),
            mirror: shared.mirror.clone(),
            routes: shared.route_count.clone(),
            view: Arc::new(ui::GatewayView::new(shared.clone(), shutdown.clone())),
        });
        let admin_task = async {
            if let Some(l) = admin_listener {
                if let Err(e) = admin::serve(l, admin_state, shutdown.clone()).await {
                    tracing::error!(error = %e, "admin listener failed");
                }
            }
        };
        let certs_task = async {
            if let Some(store) = self.certs.clone() {
                store
                    .watch(shared.config.tls_reload_interval, shutdown.clone())
                    .await;
            }
        };
        let config_task = async {
            if shared.config_path.is_some() {
                watch_config(&shared, shutdown.clone()).await;
            }
        };
        tokio::join!(
            self.announce(),
            follower.run(shutdown.clone()),
            admin_task,
            certs_task,
            config_task,
            self.exit_when_idle(shutdown.clone())
        );
        tracing::info!("background work stopped");
    }
}

/// Reloads the routes when the config file changes (checked every `tls_reload_interval`) or
/// on SIGHUP, until `stop` turns true.
async fn watch_config(shared: &Shared, mut stop: ShutdownWatch) {
    let Some(path) = shared.config_path.clone() else {
        return;
    };
    let stamp = |p: &std::path::Path| {
        std::fs::metadata(p)
            .ok()
            .map(|m| (m.len(), m.modified().ok()))
    };
    let mut seen = stamp(&path);
    let mut hup = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
        Ok(s) => Some(s),
        Err(e) => {
            tracing::warn!(error = %e, "no SIGHUP handler; config reloads on file change only");
            None
        }
    };
    loop {
        let signalled = tokio::select! {
            _ = tokio::time::sleep(shared.config.tls_reload_interval) => false,
            Some(()) = async { match hup.as_mut() { Some(h) => h.recv().await, None => std::future::pending().await } } => true,
            _ = stop.changed() => return,
        };
        if *stop.borrow() {
            return;
        }
        let now = stamp(&path);
        if !signalled && now == seen {
            continue;
        }
        seen = now;
        match shared.reload_routes() {
            Ok(true) => {
                tracing::info!(path = %path.display(), routes = shared.route_set.load().routes.len(), "config routes reloaded")
            }
            Ok(false) => {
                tracing::info!(path = %path.display(), "config reloaded; routes unchanged")
            }
            Err(e) => {
                tracing::error!(error = %e, "config not reloaded; keeping the routes in force")
            }
        }
    }
}

/// Runs the gateway until pingora is told to stop (SIGTERM: graceful; SIGINT: at once).
pub fn run(config: Config, config_path: Option<PathBuf>) -> anyhow::Result<()> {
    config.validate()?;
    // Every listener is claimed before anything starts: an address in use is refused here.
    let mut reserved = Vec::new();
    if let Some(addr) = config.listen {
        reserved.push(listen::reserve("http", addr)?);
    }
    if let (Some(addr), Some(_)) = (config.tls_listen, &config.tls_dir) {
        reserved.push(listen::reserve("tls", addr)?);
    }
    let admin = std::net::TcpListener::bind(config.admin_addr)
        .with_context(|| format!("admin listener {}", config.admin_addr))?;
    let admin_addr = admin.local_addr()?;
    let certs = match &config.tls_dir {
        Some(dir) if config.tls_listen.is_some() => {
            Some(Arc::new(CertStore::load(dir).with_context(|| {
                format!("loading certificates from {}", dir.display())
            })?))
        }
        _ => None,
    };

    let conf = ServerConf {
        threads: config.threads,
        work_stealing: config.work_stealing,
        grace_period_seconds: Some(config.shutdown.grace_period.as_secs()),
        graceful_shutdown_timeout_seconds: Some(config.shutdown.timeout.as_secs()),
        // Pingora's own bound on tries; the gateway's policy decides below it.
        max_retries: config.retry.attempts as usize,
        ..ServerConf::default()
    };
    let mut server = Server::new_with_opt_and_conf(None, conf);
    server.bootstrap();

    let bound = |what: &str| reserved.iter().find(|r| r.what == what).map(|r| r.addr);
    let (listen, tls_listen) = (bound("http"), bound("tls"));
    let h2c = config.h2c;
    let limits = config.limits.clone();
    let max_connections = connection_cap(limits.max_connections, open_files_limit());
    if max_connections < limits.max_connections {
        tracing::warn!(
            configured = limits.max_connections,
            max_connections,
            "limits.max_connections lowered to what the descriptor limit (RLIMIT_NOFILE) holds"
        );
    }
    let data_path = config.data_path;
    let shared = Arc::new(Shared::new(config, config_path));
    if let Some(store) = &certs {
        shared.metrics.certificates.set(store.names().len() as i64);
    }
    let mut app = pingora::proxy::HttpProxy::new(
        proxy::Gateway {
            shared: shared.clone(),
        },
        server.configuration.clone(),
    );
    app.handle_init_modules();
    let mut options = HttpServerOptions::default();
    options.h2c = h2c;
    // The stream-aware backstop for HTTP/2 connections that stay busy without a stream
    // (PINGs); the GOAWAY after `idle_timeout` of silence comes first (connections.rs).
    options.h2_idle_timeout = Some(limits.idle_timeout * 3);
    app.server_options = Some(options);
    let mut h2 = pingora::protocols::http::v2::server::default_h2_options();
    h2.max_concurrent_streams(limits.h2_max_concurrent_streams)
        .initial_window_size(limits.h2_stream_buffer_bytes)
        .max_send_buffer_size(limits.h2_stream_buffer_bytes as usize);
    app.h2_options = Some(h2);
    let policy = ConnectionPolicy {
        header_read_timeout: limits.header_read_timeout,
        idle_timeout: limits.idle_timeout,
        max_connections,
        h2c,
    };
    let guarded = Guarded::new(
        app,
        policy,
        shared.metrics.connections.clone(),
        shared.metrics.connections_refused.clone(),
    );
    let guarded = match data_path {
        DataPath::Pingora => guarded,
        DataPath::Lean => guarded.with_lean(Arc::new(lean::Lean::new(shared.clone()))),
    };
    let connections = guarded.connections();
    let mut proxy = Service::new("waymark gateway".to_string(), guarded);
    // The same port as the reservation, which SO_REUSEPORT lets pingora share.
    let mut sock_opt = TcpSocketOptions::default();
    sock_opt.so_reuseport = Some(true);
    // No read buffer under the HTTP codecs, which have their own: pingora's default of
    // 64 KiB per connection made an idle connection cost about 100 KiB (gateway-memory.md).
    // The write buffer gathers the small writes of pingora's HTTP/1.1 codec into segments;
    // hyper (the lean path) gathers its own, and under it the buffer would be one more copy
    // of every answer and 1.4 KiB more per connection.
    let write_buffer = match data_path {
        DataPath::Pingora => L4_WRITE_BUFFER,
        DataPath::Lean => 0,
    };
    let l4_buffer = L4BufferSettings::new(0, write_buffer);
    if let Some(addr) = listen {
        proxy.add_listener(
            ListenerConfig::tcp(addr.to_string())
                .tcp_socket_options(sock_opt.clone())
                .l4_buffer(l4_buffer),
        );
    }
    if let (Some(addr), Some(store)) = (tls_listen, &certs) {
        let mut tls = TlsSettings::intermediate("", "")?;
        tls.enable_h2();
        tls.set_cert_resolver(store.clone());
        proxy.add_listener(
            ListenerConfig::tcp(addr.to_string())
                .tcp_socket_options(sock_opt)
                .tls(tls)
                .l4_buffer(l4_buffer),
        );
    }
    server.add_service(proxy);
    server.add_service(background_service(
        "waymark control",
        Control {
            shared,
            admin: Mutex::new(Some(admin)),
            certs,
            reserved: Mutex::new(Some(reserved)),
            connections,
            admin_addr,
        },
    ));
    server.run(RunArgs::default());
    tracing::info!("waymark-gateway stopped");
    Ok(())
}

/// The soft limit on open files (`RLIMIT_NOFILE`), first raised to the hard limit (as Go
/// programs and nginx's `worker_rlimit_nofile` do: the soft default of 1024 is for programs
/// that use `select`), if it can be read.
fn open_files_limit() -> Option<u64> {
    use nix::sys::resource::{getrlimit, setrlimit, Resource, RLIM_INFINITY};
    let (mut soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).ok()?;
    if soft < hard && setrlimit(Resource::RLIMIT_NOFILE, hard, hard).is_ok() {
        soft = hard;
    }
    (soft != RLIM_INFINITY).then_some(soft)
}

/// Descriptors kept aside for listeners, the admin API, the registry link, logs.
const RESERVED_FDS: u64 = 64;

/// The connection cap in force: the configured one, lowered so that every client connection
/// can hold an upstream connection too within the descriptor limit.
fn connection_cap(configured: usize, nofile: Option<u64>) -> usize {
    match nofile {
        Some(n) => {
            let fits = (n.saturating_sub(RESERVED_FDS) / 2).max(1);
            configured.min(usize::try_from(fits).unwrap_or(usize::MAX))
        }
        None => configured,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::RateLimit;

    #[test]
    fn the_connection_cap_fits_the_descriptor_limit() {
        let cases = [
            ((10_000, Some(1_048_576)), 10_000),
            ((10_000, Some(1024)), 480),
            ((10_000, None), 10_000),
            ((100, Some(20_000)), 100),
            ((10_000, Some(10)), 1),
        ];
        for ((configured, nofile), want) in cases {
            assert_eq!(
                connection_cap(configured, nofile),
                want,
                "{configured} {nofile:?}"
            );
        }
    }

    fn route(path: &str, limit: Option<RateLimit>) -> RouteConfig {
        RouteConfig {
            name: None,
            host: Some("a.test".into()),
            path: path.into(),
            header: None,
            service: "svc".into(),
            tags: vec![],
            strip_prefix: false,
            split: vec![],
            upstream_h2c: false,
            rate_limit: limit,
        }
    }

    #[test]
    fn a_route_set_keeps_buckets_of_unchanged_limits() {
        let l = RateLimit {
            rate: 1.0,
            burst: 1,
        };
        let first = RouteSet::new(vec![route("/a", Some(l)), route("/b", Some(l))], None);
        let a = first.limits["a.test/a"].clone();
        let b = first.limits["a.test/b"].clone();
        let faster = RateLimit {
            rate: 2.0,
            burst: 1,
        };
        let next = RouteSet::new(
            vec![
                route("/a", Some(l)),
                route("/b", Some(faster)),
                route("/c", None),
            ],
            Some(&first),
        );
        assert!(
            Arc::ptr_eq(&a, &next.limits["a.test/a"]),
            "same limit: same bucket"
        );
        assert!(
            !Arc::ptr_eq(&b, &next.limits["a.test/b"]),
            "changed limit: new bucket"
        );
        assert!(!next.limits.contains_key("a.test/c"));
    }

    #[test]
    fn reload_takes_a_valid_file_and_refuses_a_broken_one() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("gateway.toml");
        std::fs::write(&path, "[[routes]]\nhost = \"a.test\"\nservice = \"one\"\n").unwrap();
        let config = Config::load(&path).unwrap();
        let shared = Shared::new(config, Some(path.clone()));
        assert_eq!(shared.routes.load().len(), 1);
        assert!(!shared.reload_routes().unwrap(), "unchanged");
        std::fs::write(
            &path,
            "[[routes]]\nhost = \"a.test\"\nservice = \"one\"\n[[routes]]\nhost = \"b.test\"\nservice = \"two\"\n",
        )
        .unwrap();
        assert!(shared.reload_routes().unwrap());
        assert_eq!(shared.routes.load().len(), 2);
        std::fs::write(&path, "[[routes]]\nservice = \"\"\n").unwrap();
        assert!(shared.reload_routes().is_err());
        assert_eq!(
            shared.routes.load().len(),
            2,
            "a broken file changes nothing"
        );
    }
}
