//! How a forwarder announces itself in the registry, so that resolvers and other forwarders
//! find it: an instance of the service [`SERVICE`], one per host, whose address and port are
//! its inbound (mTLS) listener and whose metadata names the host and the host's addresses.
//! Its TTL check is the forwarder's heartbeat: a forwarder that stops heartbeating turns
//! critical and is no longer counted as ready.

use std::net::{IpAddr, SocketAddr};

use crate::model::Instance;

/// The service forwarders register as.
pub const SERVICE: &str = "waymark-forwarder";
/// Metadata: the host's name (its identity in the mesh).
pub const META_HOST: &str = "waymark-host";
/// Metadata: the host's own addresses, comma-separated: instances at these addresses live
/// on this host.
pub const META_ADDRESSES: &str = "waymark-addresses";

/// A forwarder as read from its registration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ForwarderInfo {
    pub host: String,
    /// Where other hosts' forwarders call it.
    pub inbound: SocketAddr,
    /// The host's addresses (the inbound address among them).
    pub addresses: Vec<IpAddr>,
    /// Heartbeating and not draining.
    pub ready: bool,
}

impl ForwarderInfo {
    /// Reads a forwarder's registration; `None` when it is not one (no host, no IP).
    pub fn from_instance(inst: &Instance) -> Option<ForwarderInfo> {
        if !inst.service.eq_ignore_ascii_case(SERVICE) {
            return None;
        }
        let host = inst.meta.get(META_HOST)?.clone();
        let ip = inst.ip()?;
        let mut addresses: Vec<IpAddr> = inst
            .meta
            .get(META_ADDRESSES)
            .map(|list| {
                list.split(',')
                    .filter_map(|a| a.trim().parse().ok())
                    .collect()
            })
            .unwrap_or_default();
        if !addresses.contains(&ip) {
            addresses.push(ip);
        }
        Some(ForwarderInfo {
            host,
            inbound: SocketAddr::new(ip, inst.port),
            addresses,
            ready: inst.is_serving(),
        })
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    #[test]
    fn a_forwarder_registration_reads_back() {
        let mut meta = BTreeMap::new();
        meta.insert(META_HOST.to_string(), "host-a".to_string());
        meta.insert(
            META_ADDRESSES.to_string(),
            "10.0.0.1, bogus,10.0.1.1".to_string(),
        );
        let inst = Instance {
            meta,
            ..Instance::new(SERVICE, "waymark-forwarder-host-a", "10.0.0.1", 15008)
        };
        let info = ForwarderInfo::from_instance(&inst).unwrap();
        assert_eq!(info.host, "host-a");
        assert_eq!(info.inbound, "10.0.0.1:15008".parse().unwrap());
        assert_eq!(info.addresses.len(), 2);
        assert!(info.ready);
        let mut other = inst.clone();
        other.service = "web".into();
        assert!(ForwarderInfo::from_instance(&other).is_none());
        let mut no_host = inst;
        no_host.meta.clear();
        assert!(ForwarderInfo::from_instance(&no_host).is_none());
    }
}
