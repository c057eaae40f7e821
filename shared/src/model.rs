//! The registry model: a service is a name with instances; an instance is an address and port
//! with tags, metadata, health checks and a draining flag. This is what mirrors hold and what
//! DNS answers, the gateway and the change stream are computed from.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr};

use compact_str::CompactString;
use serde::{Deserialize, Serialize};

/// Health of one check or of an instance as a whole (the worst of its checks).
///
/// Ordered from best to worst, so `max` over checks gives the instance's health.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Health {
    Passing,
    Warning,
    Critical,
}

impl Health {
    /// Consul's spelling: `passing`, `warning`, `critical`.
    pub fn as_str(self) -> &'static str {
        match self {
            Health::Passing => "passing",
            Health::Warning => "warning",
            Health::Critical => "critical",
        }
    }

    /// Parses Consul's spelling, case-insensitively.
    pub fn parse(s: &str) -> Option<Health> {
        match s.to_ascii_lowercase().as_str() {
            "passing" => Some(Health::Passing),
            "warning" => Some(Health::Warning),
            "critical" => Some(Health::Critical),
            _ => None,
        }
    }
}

/// The visible state of one health check of an instance.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckView {
    pub id: String,
    pub name: String,
    /// `http`, `tcp`, `ttl`, or `maintenance`.
    pub kind: String,
    pub status: Health,
    #[serde(default)]
    pub output: String,
    #[serde(default)]
    pub notes: String,
}

/// One instance of a service, as every mirror sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Instance {
    /// Unique across the registry (Consul's service ID). Compact strings keep short ones
    /// inline: a registry of 300,000 instances saves one allocation per field.
    pub id: CompactString,
    /// The service name as registered (DNS matches it case-insensitively).
    pub service: CompactString,
    /// The address as registered: usually an IP, possibly a host name.
    pub address: CompactString,
    pub port: u16,
    #[serde(default)]
    pub tags: Vec<String>,
    #[serde(default)]
    pub meta: BTreeMap<String, String>,
    /// Relative load-balancing weight while passing.
    #[serde(default = "default_weight")]
    pub weight_passing: u32,
    /// Relative load-balancing weight while warning.
    #[serde(default = "default_weight")]
    pub weight_warning: u32,
    #[serde(default)]
    pub checks: Vec<CheckView>,
    /// Draining (maintenance mode, graceful shutdown): never answered, whatever its health.
    #[serde(default)]
    pub draining: bool,
    /// The host (node) that registered it, when the registry knows (with etcd, the node
    /// whose key holds it); the forwarders route to that host's forwarder.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<CompactString>,
    /// The change index at which the instance first appeared in this mirror (Consul's
    /// `CreateIndex`); set by the mirror, 0 before.
    #[serde(default, skip_serializing_if = "is_zero_u64")]
    pub create_index: u64,
    /// The change index of the instance's last change (Consul's `ModifyIndex`: watchers
    /// key on it); set by the mirror, 0 before.
    #[serde(default, skip_serializing_if = "is_zero_u64")]
    pub modify_index: u64,
    /// What few registrations carry (Consul's tagged addresses, tag override, an external
    /// node's address and metadata): boxed, so that the common instance stays small.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub extra: Option<Box<Extra>>,
}

/// The rarely set parts of a registration, kept and returned as registered.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Extra {
    /// Consul's service `TaggedAddresses`: `lan`, `wan`, `lan_ipv4`... to an address and port.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub tagged_addresses: BTreeMap<String, TaggedAddress>,
    /// Consul's `EnableTagOverride`: kept and returned (Waymark has no anti-entropy to apply
    /// it to).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub enable_tag_override: bool,
    /// For an instance registered through the catalog on an external node: that node's
    /// address (empty: this host's).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub node_address: String,
    /// That node's metadata (Consul's `NodeMeta`).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub node_meta: BTreeMap<String, String>,
}

/// One of a service's tagged addresses.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaggedAddress {
    pub address: String,
    pub port: u16,
}

fn is_zero_u64(x: &u64) -> bool {
    *x == 0
}

fn default_weight() -> u32 {
    1
}

/// What the registry of record says about a service as a whole, beside its instances: its
/// virtual IPs and how its instances are selected. Carried in every [`ServiceView`] so that
/// DNS, the ingress and the forwarders on every host read the same values.
///
/// [`ServiceView`]: crate::ServiceView
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceAttrs {
    /// Virtual IPs: the service's own under the key `""`, and one per tag subset under the
    /// tag, lowercased. Empty when none are allocated.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub vips: BTreeMap<CompactString, Ipv4Addr>,
    /// When fewer than this share of the service's non-draining instances serve, every
    /// non-draining instance is selected (0: never). See [`crate::select`].
    #[serde(default, skip_serializing_if = "is_zero")]
    pub panic_threshold: f64,
}

fn is_zero(x: &f64) -> bool {
    *x == 0.0
}

impl ServiceAttrs {
    /// The service's own VIP.
    pub fn service_vip(&self) -> Option<Ipv4Addr> {
        self.vips.get("").copied()
    }

    /// The VIP of the subset with `tag` (matched case-insensitively).
    pub fn tag_vip(&self, tag: &str) -> Option<Ipv4Addr> {
        if tag.bytes().any(|b| b.is_ascii_uppercase()) {
            self.vips.get(tag.to_ascii_lowercase().as_str()).copied()
        } else {
            self.vips.get(tag).copied()
        }
    }
}

impl Instance {
    /// An instance of `service` at `address:port`, with no tags, metadata or checks, weight
    /// 1 and not draining.
    pub fn new(service: &str, id: &str, address: &str, port: u16) -> Instance {
        Instance {
            id: id.into(),
            service: service.into(),
            address: address.into(),
            port,
            tags: Vec::new(),
            meta: BTreeMap::new(),
            weight_passing: 1,
            weight_warning: 1,
            checks: Vec::new(),
            draining: false,
            node: None,
            create_index: 0,
            modify_index: 0,
            extra: None,
        }
    }

    /// The service's tagged addresses (none for most).
    pub fn tagged_addresses(&self) -> Option<&BTreeMap<String, TaggedAddress>> {
        self.extra.as_ref().map(|e| &e.tagged_addresses)
    }

    /// Whether two states of an instance say the same thing, whatever their change indexes.
    pub fn same_as(&self, other: &Instance) -> bool {
        // Destructured, so that a new field cannot be forgotten here.
        let Instance {
            id,
            service,
            address,
            port,
            tags,
            meta,
            weight_passing,
            weight_warning,
            checks,
            draining,
            node,
            create_index: _,
            modify_index: _,
            extra,
        } = self;
        *id == other.id
            && *service == other.service
            && *address == other.address
            && *port == other.port
            && *tags == other.tags
            && *meta == other.meta
            && *weight_passing == other.weight_passing
            && *weight_warning == other.weight_warning
            && *checks == other.checks
            && *draining == other.draining
            && *node == other.node
            && *extra == other.extra
    }

    /// The instance's health: the worst of its checks, passing when it has none.
    pub fn health(&self) -> Health {
        self.checks
            .iter()
            .map(|c| c.status)
            .max()
            .unwrap_or(Health::Passing)
    }

    /// Whether the instance may receive traffic: not draining and not critical.
    /// Warning instances still serve, as in Consul's DNS interface.
    pub fn is_serving(&self) -> bool {
        !self.draining && self.health() != Health::Critical
    }

    /// The address as an IP, when it is one.
    pub fn ip(&self) -> Option<IpAddr> {
        self.address.parse().ok()
    }

    pub fn has_tag(&self, tag: &str) -> bool {
        self.tags.iter().any(|t| t.eq_ignore_ascii_case(tag))
    }

    /// The load-balancing weight for its current health: the passing weight while passing,
    /// the warning weight otherwise (a critical instance is only selected in panic mode).
    pub fn weight(&self) -> u32 {
        match self.health() {
            Health::Passing => self.weight_passing,
            _ => self.weight_warning,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(status: Health) -> CheckView {
        CheckView {
            id: "c".into(),
            name: "c".into(),
            kind: "ttl".into(),
            status,
            output: String::new(),
            notes: String::new(),
        }
    }

    fn instance(checks: Vec<CheckView>, draining: bool) -> Instance {
        Instance {
            id: "a".into(),
            service: "web".into(),
            address: "10.0.0.1".into(),
            port: 80,
            tags: vec!["V1".into()],
            meta: BTreeMap::new(),
            weight_passing: 1,
            weight_warning: 1,
            checks,
            draining,
            node: None,
            create_index: 0,
            modify_index: 0,
            extra: None,
        }
    }

    #[test]
    fn health_is_the_worst_check() {
        assert_eq!(instance(vec![], false).health(), Health::Passing);
        let i = instance(vec![check(Health::Passing), check(Health::Warning)], false);
        assert_eq!(i.health(), Health::Warning);
        assert!(i.is_serving());
        let i = instance(vec![check(Health::Critical), check(Health::Warning)], false);
        assert_eq!(i.health(), Health::Critical);
        assert!(!i.is_serving());
    }

    #[test]
    fn draining_never_serves() {
        assert!(!instance(vec![], true).is_serving());
    }

    #[test]
    fn tags_match_case_insensitively() {
        assert!(instance(vec![], false).has_tag("v1"));
        assert!(!instance(vec![], false).has_tag("v2"));
    }

    #[test]
    fn health_parses_consul_spelling() {
        assert_eq!(Health::parse("Passing"), Some(Health::Passing));
        assert_eq!(Health::parse("bogus"), None);
        assert_eq!(Health::Warning.as_str(), "warning");
    }
}
