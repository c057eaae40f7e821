//! Registration definitions: a service instance and its health checks as a client declared
//! them (through the API or the services file), before any check has run. Persisted as-is.

use std::collections::BTreeMap;
use std::time::Duration;

use compact_str::CompactString;
use serde::{Deserialize, Serialize};
use waymark_shared::{Health, TaggedAddress};

use super::RegistryError;
use crate::dns::names;

/// A service instance as registered.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceDef {
    pub name: CompactString,
    /// Unique instance ID; defaults to the name.
    #[serde(default)]
    pub id: CompactString,
    /// Empty means the node's address.
    #[serde(default)]
    pub address: CompactString,
    #[serde(default)]
    pub port: u16,
    #[serde(default)]
    pub tags: Vec<String>,
    #[serde(default)]
    pub meta: BTreeMap<String, String>,
    #[serde(default)]
    pub weights: Weights,
    #[serde(default, rename = "check")]
    pub checks: Vec<CheckDef>,
    /// Consul's `TaggedAddresses` (`lan`, `wan`...), kept and returned.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub tagged_addresses: BTreeMap<String, TaggedAddress>,
    /// Consul's `EnableTagOverride`, kept and returned.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub enable_tag_override: bool,
    /// Set for a service registered through the catalog on a node other than this host (an
    /// external service, as Consul's ESM and `@creditkarma/consul-client` register them).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub external_node: Option<ExternalNode>,
    /// Set for an instance registered through the Eureka API: what Eureka clients registered
    /// beyond the service definition, given back to them on reads.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eureka: Option<Box<EurekaDef>>,
}

/// The part of a Eureka registration (`InstanceInfo`) that has no place in a service
/// definition: kept, persisted and answered back to Eureka clients as registered. The
/// instance's ID, address (`ipAddr`), port and metadata are the definition's own; its lease
/// is a TTL check; its effective status is the definition's maintenance.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EurekaDef {
    /// The application name as registered, uppercased (Eureka's form).
    pub app: String,
    pub app_group_name: String,
    pub host_name: String,
    /// The status the instance reports (`UP`, `DOWN`, `STARTING`, `OUT_OF_SERVICE`,
    /// `UNKNOWN`).
    pub status: String,
    /// The status an operator set over it (`PUT .../status`), if any.
    pub overridden_status: Option<String>,
    pub port: u16,
    pub port_enabled: bool,
    pub secure_port: u16,
    pub secure_port_enabled: bool,
    pub vip_address: String,
    pub secure_vip_address: String,
    pub home_page_url: String,
    pub status_page_url: String,
    pub health_check_url: String,
    pub secure_health_check_url: String,
    pub country_id: i64,
    pub data_center_class: String,
    pub data_center_name: String,
    pub data_center_metadata: BTreeMap<String, String>,
    pub renewal_interval_secs: u32,
    pub duration_secs: u32,
    pub coordinating_discovery_server: bool,
    pub asg_name: String,
    /// Milliseconds since the epoch, as Eureka counts them.
    pub registration_ms: u64,
    pub service_up_ms: u64,
    pub last_updated_ms: u64,
    pub last_dirty_ms: u64,
}

/// A node that is not a Waymark host, as a catalog registration names it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExternalNode {
    pub name: CompactString,
    /// The node's address: the service's when it has none of its own.
    #[serde(default)]
    pub address: String,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub meta: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Weights {
    pub passing: u32,
    pub warning: u32,
}

impl Default for Weights {
    fn default() -> Self {
        Weights {
            passing: 1,
            warning: 1,
        }
    }
}

/// One health check as registered. Exactly one of `http`, `tcp` and `ttl` is set.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CheckDef {
    /// Defaults to `service:<id>`, or `service:<id>:<n>` when there are several.
    #[serde(default)]
    pub id: String,
    #[serde(default)]
    pub name: String,
    /// URL probed with GET (or `method`): 2xx passing, 429 warning, anything else critical.
    #[serde(default)]
    pub http: Option<String>,
    #[serde(default)]
    pub method: Option<String>,
    #[serde(default)]
    pub header: BTreeMap<String, Vec<String>>,
    #[serde(default)]
    pub tls_skip_verify: bool,
    /// `host:port` probed with a TCP connect.
    #[serde(default)]
    pub tcp: Option<String>,
    /// The check turns critical when no heartbeat came within this time.
    #[serde(default, with = "opt_dur")]
    pub ttl: Option<Duration>,
    #[serde(default, with = "opt_dur")]
    pub interval: Option<Duration>,
    #[serde(default, with = "opt_dur")]
    pub timeout: Option<Duration>,
    /// Deregister the instance when this check has been critical for longer than this.
    #[serde(default, with = "opt_dur")]
    pub deregister_critical_after: Option<Duration>,
    #[serde(default)]
    pub failures_before_critical: Option<u32>,
    #[serde(default)]
    pub successes_before_passing: Option<u32>,
    /// Status until the check first runs (for an `external` check: its status).
    #[serde(default)]
    pub status: Option<Health>,
    /// A check that runs nowhere here: its status is what the registration says (Consul's
    /// catalog checks, which an external monitor such as ESM keeps up to date).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub external: bool,
    /// An `external` check's output, as registered.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub output: String,
    #[serde(default)]
    pub notes: String,
}

/// What a check probes.
#[derive(Debug, Clone, PartialEq)]
pub enum CheckKind {
    Http {
        url: String,
        method: String,
    },
    Tcp {
        addr: String,
    },
    Ttl {
        ttl: Duration,
    },
    /// Set from outside (a catalog registration); never probed.
    External,
}

impl CheckKind {
    pub fn name(&self) -> &'static str {
        match self {
            CheckKind::Http { .. } => "http",
            CheckKind::Tcp { .. } => "tcp",
            CheckKind::Ttl { .. } => "ttl",
            CheckKind::External => "external",
        }
    }
}

impl CheckDef {
    /// The kind of check, or an error naming what is missing or conflicting.
    pub fn kind(&self) -> Result<CheckKind, RegistryError> {
        let set = [self.http.is_some(), self.tcp.is_some(), self.ttl.is_some()]
            .iter()
            .filter(|b| **b)
            .count();
        if self.external {
            return match set {
                0 => Ok(CheckKind::External),
                _ => Err(RegistryError::Invalid(format!(
                    "check {:?} is set from outside: it cannot also have HTTP, TCP or TTL",
                    self.id
                ))),
            };
        }
        if set != 1 {
            return Err(RegistryError::Invalid(format!(
                "check {:?} must have exactly one of HTTP, TCP or TTL",
                self.id
            )));
        }
        if let Some(url) = &self.http {
            if !(url.starts_with("http://") || url.starts_with("https://")) {
                return Err(RegistryError::Invalid(format!(
                    "check HTTP {url:?} is not an http:// or https:// URL"
                )));
            }
            if self.interval.is_none_or(|i| i.is_zero()) {
                return Err(RegistryError::Invalid(
                    "an HTTP check needs an Interval".into(),
                ));
            }
            let method = self.method.clone().unwrap_or_else(|| "GET".into());
            return Ok(CheckKind::Http {
                url: url.clone(),
                method: method.to_ascii_uppercase(),
            });
        }
        if let Some(addr) = &self.tcp {
            if addr
                .rsplit_once(':')
                .is_none_or(|(_, p)| p.parse::<u16>().is_err())
            {
                return Err(RegistryError::Invalid(format!(
                    "check TCP {addr:?} is not host:port"
                )));
            }
            if self.interval.is_none_or(|i| i.is_zero()) {
                return Err(RegistryError::Invalid(
                    "a TCP check needs an Interval".into(),
                ));
            }
            return Ok(CheckKind::Tcp { addr: addr.clone() });
        }
        match self.ttl {
            Some(ttl) if !ttl.is_zero() => Ok(CheckKind::Ttl { ttl }),
            _ => Err(RegistryError::Invalid(
                "a TTL check needs a TTL above zero".into(),
            )),
        }
    }
}

impl ServiceDef {
    /// Fills defaults (ID, check IDs and names) and checks the definition.
    pub fn normalize(mut self) -> Result<ServiceDef, RegistryError> {
        self.name = self.name.trim().into();
        if self.name.is_empty() {
            return Err(RegistryError::Invalid("missing service Name".into()));
        }
        // Nothing is accepted that DNS could never answer.
        names::check_service(&self.name)?;
        if self.id.trim().is_empty() {
            self.id = self.name.clone();
        }
        if self.id.len() > 255 {
            return Err(RegistryError::Invalid(
                "service ID is over 255 bytes".into(),
            ));
        }
        if !self.address.is_empty() {
            names::check_address(&self.address)?;
        }
        for (tag, a) in &self.tagged_addresses {
            if tag.is_empty() || a.address.is_empty() {
                return Err(RegistryError::Invalid(format!(
                    "tagged address {tag:?}: a tag and an address are required"
                )));
            }
            names::check_address(&a.address)?;
        }
        if let Some(node) = &self.external_node {
            if node.name.trim().is_empty() {
                return Err(RegistryError::Invalid("missing Node name".into()));
            }
            if !node.address.is_empty() {
                names::check_address(&node.address)?;
            }
        }
        let several = self.checks.len() > 1;
        for (n, check) in self.checks.iter_mut().enumerate() {
            if check.id.is_empty() {
                check.id = if several {
                    format!("service:{}:{}", self.id, n + 1)
                } else {
                    format!("service:{}", self.id)
                };
            }
            if check.name.is_empty() {
                check.name = format!("Service '{}' check", self.name);
            }
            check.kind()?;
        }
        let mut ids: Vec<&str> = self.checks.iter().map(|c| c.id.as_str()).collect();
        ids.sort_unstable();
        if ids.windows(2).any(|w| w[0] == w[1]) {
            return Err(RegistryError::Invalid("two checks share an ID".into()));
        }
        Ok(self)
    }
}

/// Serde for optional Go-style durations.
mod opt_dur {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
        match d {
            Some(d) => s.serialize_str(&waymark_shared::duration::format(*d)),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
        let s = Option::<String>::deserialize(d)?;
        s.map(|s| waymark_shared::duration::parse(&s).map_err(serde::de::Error::custom))
            .transpose()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn def() -> ServiceDef {
        ServiceDef {
            name: "pay".into(),
            id: CompactString::new(""),
            address: CompactString::new(""),
            port: 80,
            tags: vec![],
            meta: BTreeMap::new(),
            weights: Weights::default(),
            checks: vec![],
            tagged_addresses: BTreeMap::new(),
            enable_tag_override: false,
            external_node: None,
            eureka: None,
        }
    }

    #[test]
    fn ids_default_like_consul() {
        let mut d = def();
        d.checks = vec![CheckDef {
            ttl: Some(Duration::from_secs(5)),
            ..Default::default()
        }];
        let d = d.normalize().unwrap();
        assert_eq!(d.id, "pay");
        assert_eq!(d.checks[0].id, "service:pay");

        let mut d = def();
        d.id = "pay-1".into();
        let ttl = CheckDef {
            ttl: Some(Duration::from_secs(5)),
            ..Default::default()
        };
        d.checks = vec![ttl.clone(), ttl];
        let d = d.normalize().unwrap();
        assert_eq!(d.checks[0].id, "service:pay-1:1");
        assert_eq!(d.checks[1].id, "service:pay-1:2");
    }

    #[test]
    fn checks_need_one_kind_and_an_interval() {
        let mut d = def();
        d.checks = vec![CheckDef::default()];
        assert!(d.clone().normalize().is_err());
        d.checks = vec![CheckDef {
            http: Some("http://127.0.0.1/".into()),
            ..Default::default()
        }];
        let err = d.clone().normalize().unwrap_err().to_string();
        assert!(err.contains("Interval"), "{err}");
        d.checks[0].interval = Some(Duration::from_secs(1));
        assert!(d.normalize().is_ok());
    }

    #[test]
    fn a_name_is_required() {
        let mut d = def();
        d.name = " ".into();
        assert!(d.normalize().is_err());
    }

    #[test]
    fn names_and_addresses_dns_cannot_answer_are_refused() {
        let cases: &[(&str, &str, Option<&str>)] = &[
            ("pay", "10.0.0.1", None),
            ("pay", "", None),
            ("pay", "db.example.com", None),
            ("Pay-2", "fd00::1", None),
            ("my_svc", "10.0.0.1", Some("cannot be a DNS label")),
            ("a.b", "10.0.0.1", Some("cannot be a DNS label")),
            (&"x".repeat(64), "10.0.0.1", Some("cannot be a DNS label")),
            ("ns", "10.0.0.1", Some("reserved")),
            (
                "pay",
                "not an ip!",
                Some("neither an IP address nor a valid host name"),
            ),
            ("pay", "10.0.0.300", Some("neither an IP address")),
        ];
        for (name, address, err) in cases {
            let mut d = def();
            d.name = (*name).into();
            d.address = (*address).into();
            match (d.normalize(), err) {
                (Ok(_), None) => {}
                (Err(e), Some(want)) => assert!(e.to_string().contains(want), "{name}: {e}"),
                (got, want) => panic!("{name} {address}: got {got:?}, want {want:?}"),
            }
        }
    }
}
