//! The VIP listeners: which `VIP:port` addresses the forwarder must listen on for the
//! registry's current state ([`desired`], pure), and the set of running listeners that is
//! brought to that state after every change ([`Listeners::reconcile`]).
//!
//! A service with a VIP gets a listener on it for every port its instances register; each
//! tag VIP gets one for every port of the instances with that tag. The forwarder's own
//! service is skipped. A service is proxied as HTTP when the config names it or one of the
//! instances behind the listener has `Meta` `waymark-protocol = "http"`; otherwise as TCP.
//! A listener that cannot bind is logged and counted and tried again at the next
//! reconciliation, never fatal; one whose target goes away is closed (its open connections
//! go on).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};

use tokio::net::TcpListener;
use tokio::sync::watch;
use waymark_shared::forwarders;
use waymark_shared::lifecycle::accept::Acceptor;
use waymark_shared::lifecycle::drain;
use waymark_shared::ServiceView;

use super::Forwarder;

/// Registration metadata that declares a service's protocol.
pub const META_PROTOCOL: &str = "waymark-protocol";

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Protocol {
    Tcp,
    Http,
}

impl Protocol {
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Tcp => "tcp",
            Protocol::Http => "http",
        }
    }
}

/// What one `VIP:port` listener serves.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Target {
    /// The service's name, lowercased (the mirror's key).
    pub service: String,
    /// The tag subset, for a tag VIP.
    pub tag: Option<String>,
    /// Instances registered with this port are called.
    pub port: u16,
    pub protocol: Protocol,
}

impl Target {
    /// The tags the selection must match.
    pub fn tags(&self) -> &[String] {
        self.tag.as_slice()
    }
}

/// The listeners the registry's state asks for, by address. `http_by_config` says whether
/// the config declares a service HTTP.
pub fn desired(
    services: &[Arc<ServiceView>],
    http_by_config: impl Fn(&str) -> bool,
) -> BTreeMap<SocketAddr, Target> {
    let mut out = BTreeMap::new();
    for view in services {
        if view.name.eq_ignore_ascii_case(forwarders::SERVICE) {
            continue;
        }
        let service = view.name.to_ascii_lowercase().to_string();
        let by_config = http_by_config(&service);
        for (tag, vip) in &view.attrs.vips {
            let tag = (!tag.is_empty()).then(|| tag.to_string());
            // Port → protocol (HTTP if any instance behind it says so).
            let mut ports: BTreeMap<u16, bool> = BTreeMap::new();
            for inst in &view.instances {
                if inst.port == 0 || tag.as_ref().is_some_and(|t| !inst.has_tag(t)) {
                    continue;
                }
                let http = inst
                    .meta
                    .get(META_PROTOCOL)
                    .is_some_and(|p| p.eq_ignore_ascii_case("http"));
                *ports.entry(inst.port).or_default() |= http;
            }
            for (port, http) in ports {
                let protocol = if http || by_config {
                    Protocol::Http
                } else {
                    Protocol::Tcp
                };
                out.insert(
                    SocketAddr::new(IpAddr::V4(*vip), port),
                    Target {
                        service: service.clone(),
                        tag: tag.clone(),
                        port,
                        protocol,
                    },
                );
            }
        }
    }
    out
}

/// One running listener.
struct Running {
    /// What it serves; a change (a protocol declared, a tag subset's VIP reused) is handed
    /// to the running listener, never a rebind, so the address is never closed meanwhile.
    target: watch::Sender<Arc<Target>>,
    stop: watch::Sender<bool>,
    /// Tells this listener apart from a later one on the same address.
    generation: u64,
}

/// What a reconciliation did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Reconciled {
    pub added: usize,
    pub removed: usize,
    /// Listeners kept whose target changed.
    pub changed: usize,
    /// Addresses that could not be bound this time.
    pub failed: BTreeSet<SocketAddr>,
}

/// The running listeners.
pub struct Listeners {
    running: Mutex<HashMap<SocketAddr, Running>>,
    generation: std::sync::atomic::AtomicU64,
    /// Handed to every listener (and by it to every connection); taken at shutdown.
    drain: Mutex<Option<drain::Watch>>,
}

impl Listeners {
    pub fn new(drain: drain::Watch) -> Listeners {
        Listeners {
            running: Mutex::new(HashMap::new()),
            generation: std::sync::atomic::AtomicU64::new(0),
            drain: Mutex::new(Some(drain)),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<SocketAddr, Running>> {
        self.running.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Addresses listened on now.
    pub fn addresses(&self) -> Vec<SocketAddr> {
        let mut a: Vec<SocketAddr> = self.lock().keys().copied().collect();
        a.sort();
        a
    }

    /// Starts the listeners `want` has and the running set lacks (or has for another
    /// target), and stops those it no longer has. Must run inside the runtime.
    pub fn reconcile(
        &self,
        fwd: &Arc<Forwarder>,
        want: &BTreeMap<SocketAddr, Target>,
    ) -> Reconciled {
        let Some(drain) = self.drain.lock().unwrap_or_else(|e| e.into_inner()).clone() else {
            return Reconciled::default();
        };
        let mut done = Reconciled::default();
        let mut running = self.lock();
        running.retain(|addr, r| match want.get(addr) {
            Some(target) => {
                if **r.target.borrow() != *target {
                    tracing::info!(%addr, service = %target.service, protocol = target.protocol.as_str(), "listener target changed");
                    let _ = r.target.send(Arc::new(target.clone()));
                    done.changed += 1;
                }
                true
            }
            None => {
                let _ = r.stop.send(true);
                done.removed += 1;
                tracing::info!(%addr, service = %r.target.borrow().service, "listener closed");
                false
            }
        });
        for (addr, target) in want {
            if running.contains_key(addr) {
                continue;
            }
            match bind(*addr) {
                Ok(listener) => {
                    let (stop, stop_rx) = watch::channel(false);
                    let (current, current_rx) = watch::channel(Arc::new(target.clone()));
                    let generation = self
                        .generation
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    tokio::spawn(accept_loop(
                        fwd.clone(),
                        listener,
                        current_rx,
                        stop_rx,
                        drain.clone(),
                        generation,
                    ));
                    tracing::info!(%addr, service = %target.service, tag = ?target.tag, protocol = target.protocol.as_str(), "listening");
                    running.insert(
                        *addr,
                        Running {
                            target: current,
                            stop,
                            generation,
                        },
                    );
                    done.added += 1;
                }
                Err(e) => {
                    tracing::warn!(%addr, service = %target.service, error = %e, "cannot listen; trying again at the next change");
                    fwd.metrics
                        .bind_failures
                        .get_or_create(&super::Metrics::service(&target.service))
                        .inc();
                    done.failed.insert(*addr);
                }
            }
        }
        fwd.metrics.listeners.set(running.len() as i64);
        done
    }

    /// Forgets the listener on `addr` of this generation (its accept loop failed), so that
    /// the next reconciliation binds it again.
    fn forget(&self, addr: SocketAddr, generation: u64) -> bool {
        let mut running = self.lock();
        if running
            .get(&addr)
            .is_some_and(|r| r.generation == generation)
        {
            running.remove(&addr);
            return true;
        }
        false
    }

    /// Closes every listener and lets go of the drain watch: no new listener starts.
    pub fn shutdown(&self) {
        self.drain.lock().unwrap_or_else(|e| e.into_inner()).take();
        let mut running = self.lock();
        for (_, r) in running.drain() {
            let _ = r.stop.send(true);
        }
    }
}

fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    // std sets SO_REUSEADDR on Unix, so a listener closed a moment ago can come back.
    let l = std::net::TcpListener::bind(addr)?;
    l.set_nonblocking(true)?;
    TcpListener::from_std(l)
}

/// Accepts until told to stop; each connection is admitted (or closed at once beyond
/// `max_connections`) and served by its protocol's handler, holding the drain watch.
async fn accept_loop(
    fwd: Arc<Forwarder>,
    listener: TcpListener,
    current: watch::Receiver<Arc<Target>>,
    mut stop: watch::Receiver<bool>,
    drain: drain::Watch,
    generation: u64,
) {
    let mut acceptor = Acceptor::new();
    loop {
        let accepted = tokio::select! {
            a = acceptor.accept(&listener) => a,
            _ = stop.wait_for(|s| *s) => break,
            _ = drain.signaled() => break,
        };
        let (stream, peer) = match accepted {
            Ok(c) => c,
            Err(e) => {
                let addr = listener.local_addr();
                tracing::error!(?addr, error = %e, "listener failed; binding it again");
                drop(listener);
                if let Ok(addr) = addr {
                    if fwd.listeners.forget(addr, generation) {
                        fwd.changed.notify_one();
                    }
                }
                break;
            }
        };
        let Ok(ticket) = fwd.admission.try_admit(()) else {
            fwd.metrics.connections_refused.inc();
            drop(stream);
            continue;
        };
        let target = current.borrow().clone();
        fwd.metrics
            .connections
            .get_or_create(&super::Metrics::service(&target.service))
            .inc();
        let _ = stream.set_nodelay(true);
        let (fwd, watch) = (fwd.clone(), drain.clone());
        tokio::spawn(async move {
            fwd.metrics.connections_open.inc();
            match target.protocol {
                Protocol::Tcp => super::tcp::serve(&fwd, &target, stream, peer, &watch).await,
                Protocol::Http => super::http::serve(&fwd, &target, stream, peer, &watch).await,
            }
            fwd.metrics.connections_open.dec();
            drop(ticket);
            drop(watch);
        });
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap as Map;
    use std::net::Ipv4Addr;

    use waymark_shared::{Instance, ServiceAttrs};

    use super::*;

    fn inst(service: &str, id: &str, port: u16, tags: &[&str], http: bool) -> Arc<Instance> {
        let mut meta = Map::new();
        if http {
            meta.insert(META_PROTOCOL.to_string(), "HTTP".to_string());
        }
        Arc::new(Instance {
            id: id.into(),
            service: service.into(),
            address: "10.0.0.1".into(),
            port,
            tags: tags.iter().map(|t| t.to_string()).collect(),
            meta,
            weight_passing: 1,
            weight_warning: 1,
            checks: vec![],
            draining: false,
            node: None,
            create_index: 0,
            modify_index: 0,
            extra: None,
        })
    }

    fn view(
        name: &str,
        instances: Vec<Arc<Instance>>,
        vips: &[(&str, [u8; 4])],
    ) -> Arc<ServiceView> {
        Arc::new(ServiceView {
            name: name.into(),
            index: 1,
            instances,
            attrs: ServiceAttrs {
                vips: vips
                    .iter()
                    .map(|(t, v)| ((*t).into(), Ipv4Addr::from(*v)))
                    .collect(),
                panic_threshold: 0.0,
            },
        })
    }

    #[test]
    fn a_failed_listener_is_forgotten_only_if_it_is_still_the_one_running() {
        let (_trigger, watch) = drain::channel();
        let l = Listeners::new(watch);
        let addr: SocketAddr = "127.77.0.1:80".parse().unwrap();
        let target = Target {
            service: "web".into(),
            tag: None,
            port: 80,
            protocol: Protocol::Tcp,
        };
        l.lock().insert(
            addr,
            Running {
                target: watch::channel(Arc::new(target)).0,
                stop: watch::channel(false).0,
                generation: 7,
            },
        );
        assert!(
            !l.forget(addr, 6),
            "an older listener's failure changes nothing"
        );
        assert_eq!(l.addresses(), [addr]);
        assert!(l.forget(addr, 7));
        assert!(l.addresses().is_empty());
        assert!(!l.forget(addr, 7));
    }

    #[test]
    fn the_desired_listeners_table() {
        let services = vec![
            view(
                "Payment",
                vec![
                    inst("Payment", "p1", 9000, &["v1"], false),
                    inst("Payment", "p2", 9000, &["v2"], true),
                    inst("Payment", "p3", 9100, &["V2"], false),
                    inst("Payment", "p0", 0, &["v1"], false),
                ],
                &[
                    ("", [127, 77, 0, 1]),
                    ("v1", [127, 77, 0, 2]),
                    ("v2", [127, 77, 0, 3]),
                ],
            ),
            view(
                "ledger",
                vec![inst("ledger", "l1", 80, &[], false)],
                &[("", [127, 77, 0, 4])],
            ),
            // No VIP: no listener.
            view("novip", vec![inst("novip", "n1", 80, &[], false)], &[]),
            view(
                forwarders::SERVICE,
                vec![inst(forwarders::SERVICE, "f", 15008, &[], false)],
                &[("", [127, 77, 0, 5])],
            ),
        ];
        let got = desired(&services, |s| s == "ledger");
        let t = |service: &str, tag: Option<&str>, port, protocol| Target {
            service: service.into(),
            tag: tag.map(Into::into),
            port,
            protocol,
        };
        let want: BTreeMap<SocketAddr, Target> = [
            ("127.77.0.1:9000", t("payment", None, 9000, Protocol::Http)),
            ("127.77.0.1:9100", t("payment", None, 9100, Protocol::Tcp)),
            (
                "127.77.0.2:9000",
                t("payment", Some("v1"), 9000, Protocol::Tcp),
            ),
            (
                "127.77.0.3:9000",
                t("payment", Some("v2"), 9000, Protocol::Http),
            ),
            (
                "127.77.0.3:9100",
                t("payment", Some("v2"), 9100, Protocol::Tcp),
            ),
            ("127.77.0.4:80", t("ledger", None, 80, Protocol::Http)),
        ]
        .into_iter()
        .map(|(a, t)| (a.parse().unwrap(), t))
        .collect();
        assert_eq!(got, want);
        assert_eq!(want[&"127.77.0.2:9000".parse().unwrap()].tags(), ["v1"]);
        assert!(want[&"127.77.0.1:9000".parse().unwrap()].tags().is_empty());
    }
}
