//! Where an instance is, as the forwarder sees it, and who may call this host's instances:
//! pure decisions over the registry's state, rebuilt on every change.
//!
//! - **Outbound** ([`Routes::route`]): an instance at an address of this host (or loopback)
//!   is called directly; one at an address that another host's forwarder announced is
//!   called through that forwarder, over the mTLS tunnel; one at an address no forwarder
//!   announced (a host without a forwarder) is called directly and counted as unmeshed.
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
        let mut routes = Routes {
            own,
            peers,
            local_targets: HashMap::new(),
            allow: allow
                .iter()
                .map(|(k, v)| (k.to_ascii_lowercase(), v.clone()))
                .collect(),
        };
        for s in services {
            for i in &s.instances {
                let Some(ip) = i.ip() else { continue };
                if routes.route(ip) == Route::Local {
                    routes
                        .local_targets
                        .insert(SocketAddr::new(ip, i.port), s.name.to_string());
                }
            }
        }
        routes
    }

    /// How to reach an instance at `ip`.
    pub fn route(&self, ip: IpAddr) -> Route {
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
            assert_eq!(t.route(ip.parse().unwrap()), want, "{ip}");
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
    }
}
