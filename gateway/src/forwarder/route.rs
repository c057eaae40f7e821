//! Where an instance is, as the forwarder sees it, and who may call this host's instances:
//! pure decisions over the registry's state, rebuilt on every change.
//!
//! - **Outbound** ([`Routes::route`]): an instance that the registry says a host registered
//!   (with etcd, every instance has its node) is on that host; any other is on the host
//!   whose forwarder announced its address. One on this host (or at a loopback address) is
//!   called directly; one on another host with a forwarder is called through that forwarder,
//!   over the mTLS tunnel; one on a host without a forwarder is called directly and counted
//!   as unmeshed.
//! - **Inbound** ([`Routes::admit`]): another host's forwarder may open a stream only to an
//!   instance registered at an address of this host, and, when the instance's service has a
//!   policy, only when the calling host is allowed by it. So the inbound listener is never an
//!   open proxy.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};

use waymark_shared::forwarders::ForwarderInfo;
use waymark_shared::ServiceView;

use crate::tunnel::{Peer, Refusal};

/// How to reach an instance.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    /// On this host: directly.
    Local,
    /// On another host with a forwarder: through it.
    Peer(Peer),
    /// On a host without a forwarder: directly, in plain text.
    Unmeshed,
}

/// The routing table of one registry state.
#[derive(Debug, Default)]
pub struct Routes {
    own: HashSet<IpAddr>,
    peers: HashMap<IpAddr, Peer>,
    /// Instances whose node the registry names: their route, by address.
    by_node: HashMap<SocketAddr, Route>,
    /// This host's instances: address → service.
    local_targets: HashMap<SocketAddr, String>,
    /// Per service (lowercase): the hosts allowed to call its instances here.
    allow: BTreeMap<String, Vec<String>>,
}

impl Routes {
    /// Builds the table for `own_host`, whose addresses are `own_addresses`, from the
    /// registry's services (the forwarders' own registrations among them). When two hosts
    /// announce one address, the first host name in order keeps it.
    pub fn build(
        own_host: &str,
        own_addresses: &[IpAddr],
        services: &[std::sync::Arc<ServiceView>],
        allow: &BTreeMap<String, Vec<String>>,
    ) -> Routes {
        let own: HashSet<IpAddr> = own_addresses.iter().copied().collect();
        let mut forwarders: Vec<ForwarderInfo> = services
            .iter()
            .flat_map(|s| s.instances.iter())
            .filter_map(|i| ForwarderInfo::from_instance(i))
            .filter(|f| !f.host.eq_ignore_ascii_case(own_host))
            .collect();
        forwarders.sort_by(|a, b| a.host.cmp(&b.host));
        let mut peers = HashMap::new();
        let mut peer_hosts: HashMap<String, Peer> = HashMap::new();
        for f in &forwarders {
            peer_hosts
                .entry(f.host.to_ascii_lowercase())
                .or_insert_with(|| Peer {
                    host: f.host.clone(),
                    addr: f.inbound,
                });
        }
        for f in forwarders {
            for a in &f.addresses {
                if own.contains(a) || a.is_loopback() {
                    continue;
                }
                peers.entry(*a).or_insert_with(|| Peer {
                    host: f.host.clone(),
                    addr: f.inbound,
                });
            }
        }
        let mut by_node = HashMap::new();
        for i in services.iter().flat_map(|s| s.instances.iter()) {
            let (Some(node), Some(ip)) = (&i.node, i.ip()) else {
                continue;
            };
            let route = if node.eq_ignore_ascii_case(own_host) {
                Route::Local
            } else {
                match peer_hosts.get(node.as_str().to_ascii_lowercase().as_str()) {
                    Some(p) => Route::Peer(p.clone()),
                    None => Route::Unmeshed,
                }
            };
            by_node.insert(SocketAddr::new(ip, i.port), route);
        }
        let mut routes = Routes {
            own,
            peers,
            by_node,
            local_targets: HashMap::new(),
            allow: allow
                .iter()
                .map(|(k, v)| (k.to_ascii_lowercase(), v.clone()))
                .collect(),
        };
        for s in services {
            for i in &s.instances {
                let Some(ip) = i.ip() else { continue };
                let target = SocketAddr::new(ip, i.port);
                if routes.route(target) == Route::Local {
                    routes.local_targets.insert(target, s.name.to_string());
                }
            }
        }
        routes
    }

    /// How to reach the instance at `target`.
    pub fn route(&self, target: SocketAddr) -> Route {
        if let Some(route) = self.by_node.get(&target) {
            return route.clone();
        }
        let ip = target.ip();
        if ip.is_loopback() || self.own.contains(&ip) {
            return Route::Local;
        }
        match self.peers.get(&ip) {
            Some(p) => Route::Peer(p.clone()),
            None => Route::Unmeshed,
        }
    }

    /// Whether the forwarder of `peer_host` may open a stream to `target` here.
    pub fn admit(&self, target: SocketAddr, peer_host: &str) -> Result<(), Refusal> {
        let Some(service) = self.local_targets.get(&target) else {
            return Err(Refusal::NotHere(format!(
                "{target} is not an instance registered on this host"
            )));
        };
        match self.allow.get(&service.to_ascii_lowercase()) {
            Some(hosts) if !hosts.iter().any(|h| h.eq_ignore_ascii_case(peer_host)) => Err(
                Refusal::Forbidden(format!("host {peer_host:?} may not call service {service}")),
            ),
            _ => Ok(()),
        }
    }

    /// The service an instance of this host at `target` belongs to.
    pub fn local_service(&self, target: SocketAddr) -> Option<&str> {
        self.local_targets.get(&target).map(String::as_str)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use waymark_shared::forwarders::{META_ADDRESSES, META_HOST, SERVICE};
    use waymark_shared::model::Instance;

    use super::*;

    fn instance(service: &str, id: &str, addr: &str, port: u16) -> Instance {
        Instance::new(service, id, addr, port)
    }

    fn on_node(service: &str, id: &str, addr: &str, port: u16, node: &str) -> Instance {
        let mut i = instance(service, id, addr, port);
        i.node = Some(node.into());
        i
    }

    fn forwarder(host: &str, addr: &str, others: &str) -> Instance {
        let mut i = instance(SERVICE, &format!("{SERVICE}-{host}"), addr, 15008);
        i.meta.insert(META_HOST.into(), host.into());
        i.meta.insert(META_ADDRESSES.into(), others.into());
        i
    }

    fn view(name: &str, instances: Vec<Instance>) -> Arc<ServiceView> {
        Arc::new(ServiceView {
            name: name.into(),
            index: 1,
            instances: instances.into_iter().map(Arc::new).collect(),
            attrs: Default::default(),
        })
    }

    fn table(allow: &[(&str, &[&str])]) -> Routes {
        let services = vec![
            view(
                SERVICE,
                vec![
                    forwarder("host-a", "10.0.0.1", "10.0.0.1"),
                    forwarder("host-b", "10.0.0.2", "10.0.0.2,10.0.1.2"),
                    // Claims host-b's second address too: host-b, first in order, keeps it.
                    forwarder("host-c", "10.0.0.3", "10.0.1.2"),
                ],
            ),
            view(
                "payment",
                vec![
                    instance("payment", "p-a", "10.0.0.1", 9000),
                    instance("payment", "p-lo", "127.0.0.1", 9001),
                    instance("payment", "p-b", "10.0.0.2", 9000),
                ],
            ),
            view("ledger", vec![instance("ledger", "l-a", "10.0.0.1", 7000)]),
            // With etcd the registry names each instance's node: that wins over addresses.
            view(
                "search",
                vec![
                    on_node("search", "s-b", "10.9.0.5", 9200, "host-b"),
                    on_node("search", "s-a", "10.9.0.6", 9200, "HOST-A"),
                    on_node("search", "s-x", "10.0.0.2", 9200, "host-x"),
                ],
            ),
        ];
        let allow = allow
            .iter()
            .map(|(s, h)| (s.to_string(), h.iter().map(|x| x.to_string()).collect()))
            .collect();
        Routes::build("host-a", &["10.0.0.1".parse().unwrap()], &services, &allow)
    }

    #[test]
    fn the_route_table() {
        let t = table(&[]);
        let peer = |host: &str, addr: &str| {
            Route::Peer(Peer {
                host: host.into(),
                addr: addr.parse().unwrap(),
            })
        };
        let cases = [
            ("10.0.0.1", Route::Local),
            ("127.0.0.1", Route::Local),
            ("::1", Route::Local),
            ("10.0.0.2", peer("host-b", "10.0.0.2:15008")),
            ("10.0.1.2", peer("host-b", "10.0.0.2:15008")),
            ("10.0.0.3", peer("host-c", "10.0.0.3:15008")),
            ("10.0.0.9", Route::Unmeshed),
        ];
        for (ip, want) in cases {
            let target = SocketAddr::new(ip.parse().unwrap(), 9000);
            assert_eq!(t.route(target), want, "{ip}");
        }
        let by_node = [
            ("10.9.0.5:9200", peer("host-b", "10.0.0.2:15008")),
            ("10.9.0.6:9200", Route::Local),
            // host-x has no forwarder, whoever else has the address.
            ("10.0.0.2:9200", Route::Unmeshed),
        ];
        for (target, want) in by_node {
            assert_eq!(t.route(target.parse().unwrap()), want, "{target}");
        }
    }

    #[test]
    fn the_admission_table() {
        let t = table(&[("Payment", &["host-b"])]);
        let cases: [(&str, &str, Result<(), &str>); 6] = [
            ("10.0.0.1:9000", "host-b", Ok(())),
            ("10.0.0.1:9000", "HOST-B", Ok(())),
            ("10.0.0.1:9000", "host-c", Err("forbidden")),
            // No policy for ledger: any host of the mesh.
            ("10.0.0.1:7000", "host-c", Ok(())),
            // Another host's instance, or nothing registered there: not here.
            ("10.0.0.2:9000", "host-b", Err("not here")),
            ("10.0.0.1:22", "host-b", Err("not here")),
        ];
        for (target, from, want) in cases {
            let got = match t.admit(target.parse().unwrap(), from) {
                Ok(()) => Ok(()),
                Err(Refusal::NotHere(_)) => Err("not here"),
                Err(Refusal::Forbidden(_)) => Err("forbidden"),
            };
            assert_eq!(got, want, "{target} from {from}");
        }
        assert_eq!(
            t.local_service("127.0.0.1:9001".parse().unwrap()),
            Some("payment")
        );
        // Registered by this host, at an address it did not announce: still its own.
        assert!(t.admit("10.9.0.6:9200".parse().unwrap(), "host-b").is_ok());
        assert!(t.admit("10.9.0.5:9200".parse().unwrap(), "host-c").is_err());
    }
}
