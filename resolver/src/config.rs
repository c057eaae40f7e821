//! The resolver's configuration: a TOML file with defaults for everything, overridden by
//! command-line flags, checked by [`Config::validate`] before anything starts.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use ipnet::IpNet;
use serde::{Deserialize, Serialize};
use waymark_shared::duration::serde_str as dur;
use waymark_shared::vip::VipRange;

use crate::dns::vips::VipMode;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("invalid config file {path}: {source}")]
    Parse {
        path: PathBuf,
        source: toml::de::Error,
    },
    #[error("invalid config: {0}")]
    Invalid(String),
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    pub dns: DnsConfig,
    pub api: ApiConfig,
    pub store: StoreConfig,
    pub health: HealthConfig,
    pub services_file: Option<ServicesFileConfig>,
    /// Service VIPs and who is answered them.
    pub vips: VipConfig,
    /// The mesh certificate authority.
    pub ca: CaConfig,
    /// Per-service settings, keyed by service name.
    pub services: BTreeMap<String, ServiceConfig>,
    /// etcd as the registry of record for many hosts (none: the embedded registry alone).
    pub etcd: waymark_shared::etcd::EtcdConfig,
    /// Log JSON lines instead of text.
    pub log_json: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DnsConfig {
    /// Where DNS is served, over UDP and TCP on the same port.
    pub addr: SocketAddr,
    /// The zone Waymark is authoritative for.
    pub zone: String,
    /// TTL of positive answers, in seconds.
    pub ttl: u32,
    /// The SOA minimum: the TTL of negative answers (NXDOMAIN, NODATA), in seconds.
    pub negative_ttl: u32,
    /// The largest UDP reply Waymark sends to EDNS clients (clients without EDNS get 512).
    pub max_udp_payload: u16,
    /// The address answered for the zone's name server (`ns.<zone>`); default: the DNS
    /// listener's address when it is not a wildcard.
    pub ns_address: Option<IpAddr>,
    /// Resolvers that names outside the zone are forwarded to, tried in order. Default: the
    /// nameservers in /etc/resolv.conf other than this resolver.
    pub upstreams: Vec<SocketAddr>,
    /// How long to wait for one upstream before trying the next.
    #[serde(with = "dur")]
    pub upstream_timeout: Duration,
    /// Clients allowed to have names forwarded; others get REFUSED for names outside the zone.
    pub forward_allow: Vec<IpNet>,
    /// Queries upstream at once at most; beyond, SERVFAIL at once.
    pub max_forwards: usize,
    /// Clients answered in full over UDP and never rate-limited.
    pub local_clients: Vec<IpNet>,
    /// The largest UDP reply to other clients (TC beyond it: they retry over TCP), so that a
    /// spoofed query cannot be amplified much.
    pub remote_max_udp_payload: u16,
    /// Response-rate limiting for other clients: answers per second per /24 (IPv4) or /56
    /// (IPv6); 0 turns it off.
    pub rrl_rate: u32,
    /// Of the answers over the rate, every `rrl_slip`-th is sent truncated (TC), the others
    /// dropped; 0 drops them all.
    pub rrl_slip: u32,
    /// Idle timeout of DNS-over-TCP connections.
    #[serde(with = "dur")]
    pub tcp_idle_timeout: Duration,
    /// Open DNS-over-TCP connections at most; beyond, new ones are closed at once. 0: a
    /// quarter of the descriptor limit, at most 1024.
    pub tcp_max_connections: usize,
    /// Open DNS-over-TCP connections from one client address at most.
    pub tcp_max_connections_per_client: usize,
    /// UDP worker threads, each with its own socket; 0: one per CPU the process may use, at
    /// most 8.
    pub udp_workers: usize,
    /// Receive buffer asked for each UDP socket, in bytes (capped by net.core.rmem_max).
    pub udp_recv_buffer: usize,
    /// Encoded UDP replies kept in the answer cache; 0 turns the cache off.
    pub answer_cache_entries: usize,
    /// Also answer Consul's names (`<service>.service[.<dc>].<consul_domain>`, tags, RFC 2782
    /// SRV, `<node>.node`) from the same registry; the datacenter is `api.datacenter`.
    pub consul_names: bool,
    /// The domain of Consul's names.
    pub consul_domain: String,
}

impl DnsConfig {
    /// The number of UDP workers to run.
    pub fn udp_worker_count(&self) -> usize {
        match self.udp_workers {
            0 => std::thread::available_parallelism().map_or(1, |n| n.get().min(8)),
            n => n,
        }
    }
}

impl Default for DnsConfig {
    fn default() -> Self {
        DnsConfig {
            addr: "127.0.0.1:8600".parse().expect("valid"),
            zone: "mesh.internal".into(),
            ttl: 5,
            negative_ttl: 5,
            max_udp_payload: 1232,
            ns_address: None,
            upstreams: Vec::new(),
            upstream_timeout: Duration::from_secs(2),
            max_forwards: 1024,
            local_clients: vec![
                "127.0.0.0/8".parse().expect("valid"),
                "::1/128".parse().expect("valid"),
            ],
            remote_max_udp_payload: 512,
            rrl_rate: 20,
            rrl_slip: 2,
            forward_allow: vec![
                "127.0.0.0/8".parse().expect("valid"),
                "::1/128".parse().expect("valid"),
            ],
            tcp_idle_timeout: Duration::from_secs(10),
            tcp_max_connections: 0,
            tcp_max_connections_per_client: 32,
            udp_workers: 0,
            udp_recv_buffer: 4 << 20,
            answer_cache_entries: 250_000,
            consul_names: false,
            consul_domain: "consul".into(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ApiConfig {
    /// Where the registration API, `/metrics` and `/healthz/*` are served.
    pub addr: SocketAddr,
    /// When set, every write must carry `Authorization: Bearer <token>`, `X-Consul-Token` or
    /// `?token=`.
    pub token: Option<String>,
    /// With `token` set, reads of the registry (`/v1/...`) need it too. `/metrics` and
    /// `/healthz/*` never do.
    pub token_for_reads: bool,
    /// Request bodies over this size are refused with 413.
    pub max_body_bytes: usize,
    /// The address given to instances registered without one (Consul uses the agent's).
    pub node_address: String,
    /// The node name shown in Consul-style answers.
    pub node_name: String,
    /// This node's metadata in Consul-style answers (Consul's `node_meta`), which
    /// `?node-meta=key:value` filters on.
    pub node_meta: std::collections::BTreeMap<String, String>,
    /// The datacenter this registry is; a query for another (`?dc=`) is refused as Consul
    /// refuses an unknown one.
    pub datacenter: String,
    /// Longest `wait` a blocking query may ask for.
    #[serde(with = "dur")]
    pub max_wait: Duration,
    /// Time for a request's head to arrive; also how long a kept-alive connection may wait
    /// for its next request.
    #[serde(with = "dur")]
    pub header_read_timeout: Duration,
    /// Time for a request's whole body to arrive.
    #[serde(with = "dur")]
    pub body_read_timeout: Duration,
    /// Open connections at most; beyond, new ones are closed at once. 0: a quarter of the
    /// descriptor limit, at most 1024.
    pub max_connections: usize,
    /// Open connections from one client address at most.
    pub max_connections_per_client: usize,
}

impl Default for ApiConfig {
    fn default() -> Self {
        ApiConfig {
            addr: "127.0.0.1:8500".parse().expect("valid"),
            token: None,
            token_for_reads: false,
            max_body_bytes: 1 << 20,
            node_address: "127.0.0.1".into(),
            node_name: "waymark".into(),
            node_meta: Default::default(),
            datacenter: "dc1".into(),
            max_wait: Duration::from_secs(600),
            header_read_timeout: Duration::from_secs(10),
            body_read_timeout: Duration::from_secs(10),
            max_connections: 0,
            max_connections_per_client: 256,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct VipConfig {
    /// Where service VIPs are allocated from. Loopback ranges need no root and no iptables.
    pub range: VipRange,
    /// Who is answered VIPs: `auto` (clients on this host, while its forwarder is ready),
    /// `local` (clients on this host), `all`, or `off`.
    pub answers: VipMode,
    /// The TTL of VIP answers, in seconds: long, since a VIP never goes stale.
    pub ttl: u32,
    /// The clients that count as this host's (`auto` and `local`).
    pub clients: Vec<IpNet>,
}

impl Default for VipConfig {
    fn default() -> Self {
        VipConfig {
            range: VipRange::default(),
            answers: VipMode::Auto,
            ttl: 300,
            clients: vec![
                "127.0.0.0/8".parse().expect("valid"),
                "::1/128".parse().expect("valid"),
            ],
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CaConfig {
    /// The SPIFFE trust domain of host identities; default: the DNS zone. Fixed when the CA
    /// is created.
    pub trust_domain: Option<String>,
    /// How long a host certificate is valid (forwarders renew at half-life).
    #[serde(with = "dur")]
    pub cert_ttl: Duration,
}

impl Default for CaConfig {
    fn default() -> Self {
        CaConfig {
            trust_domain: None,
            cert_ttl: Duration::from_secs(24 * 3600),
        }
    }
}

impl Config {
    /// The CA's trust domain: as configured, or the zone.
    pub fn trust_domain(&self) -> String {
        self.ca
            .trust_domain
            .clone()
            .unwrap_or_else(|| self.dns.zone.trim_end_matches('.').to_ascii_lowercase())
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StoreConfig {
    /// Where registrations are kept across restarts.
    pub data_dir: PathBuf,
    /// Log records after which the log is compacted into a snapshot, at the least (and at
    /// least twice the number of registrations).
    pub compact_after_records: u64,
    /// Start from what is readable when the data dir is not consistent, setting the damaged
    /// files aside: set by `serve --recover-readable` for one start, never from the file.
    #[serde(skip)]
    pub recover_readable: bool,
}

impl Default for StoreConfig {
    fn default() -> Self {
        StoreConfig {
            data_dir: PathBuf::from("waymark-data"),
            compact_after_records: 10_000,
            recover_readable: false,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HealthConfig {
    /// Consecutive failures before a passing check turns critical (checks may override).
    pub failures_before_critical: u32,
    /// Consecutive successes before a failing check turns passing (checks may override).
    pub successes_before_passing: u32,
    /// Interval of HTTP and TCP checks registered without one.
    #[serde(with = "dur")]
    pub default_interval: Duration,
    /// Timeout of HTTP and TCP checks registered without one (capped at the interval).
    #[serde(with = "dur")]
    pub default_timeout: Duration,
    /// Status of a new check until it first runs (Consul starts checks critical).
    pub initial_status: waymark_shared::Health,
    /// Shortest interval a check runs at: shorter ones are raised to it, as Consul does
    /// (so that no registration turns a check's target into a flood).
    #[serde(with = "dur")]
    pub min_interval: Duration,
    /// Shortest probe timeout: shorter ones are raised to it (still capped at the interval).
    #[serde(with = "dur")]
    pub min_timeout: Duration,
    /// Checks one instance may have; a registration with more is refused (400).
    pub max_checks_per_instance: usize,
}

impl Default for HealthConfig {
    fn default() -> Self {
        HealthConfig {
            failures_before_critical: 1,
            successes_before_passing: 1,
            default_interval: Duration::from_secs(10),
            default_timeout: Duration::from_secs(5),
            initial_status: waymark_shared::Health::Critical,
            min_interval: Duration::from_secs(1),
            min_timeout: Duration::from_secs(1),
            max_checks_per_instance: 32,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServicesFileConfig {
    /// A TOML file of services registered on behalf of instances that cannot register
    /// themselves; reloaded when it changes.
    pub path: PathBuf,
    /// How often the file is checked for changes.
    #[serde(default = "default_reload", with = "dur")]
    pub reload_interval: Duration,
}

fn default_reload() -> Duration {
    Duration::from_secs(1)
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ServiceConfig {
    /// When fewer than this fraction of a service's non-draining instances are healthy,
    /// answer all non-draining instances rather than overload the few (0 = off).
    pub panic_threshold: f64,
}

impl Config {
    /// Reads and validates a config file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::parse(&text).map_err(|e| match e {
            ConfigError::Parse { source, .. } => ConfigError::Parse {
                path: path.to_path_buf(),
                source,
            },
            other => other,
        })
    }

    /// Parses and validates config text.
    pub fn parse(text: &str) -> Result<Config, ConfigError> {
        let config: Config = toml::from_str(text).map_err(|source| ConfigError::Parse {
            path: PathBuf::new(),
            source,
        })?;
        config.validate()?;
        Ok(config)
    }

    /// Checks what types cannot: names, ranges and relations between fields.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |m: String| Err(ConfigError::Invalid(m));
        self.etcd
            .validate()
            .map_err(|e| ConfigError::Invalid(format!("etcd: {e}")))?;
        let zone = self.dns.zone.trim_end_matches('.');
        if zone.is_empty() || hickory_proto::rr::Name::from_ascii(zone).is_err() {
            return bad(format!(
                "dns.zone {:?} is not a valid DNS name",
                self.dns.zone
            ));
        }
        if self.dns.consul_names {
            let domain = self.dns.consul_domain.trim_end_matches('.');
            let parsed = hickory_proto::rr::Name::from_ascii(domain);
            let Ok(parsed) = parsed.map(|n| n.to_lowercase()) else {
                return bad(format!(
                    "dns.consul_domain {:?} is not a valid DNS name",
                    self.dns.consul_domain
                ));
            };
            let zone = hickory_proto::rr::Name::from_ascii(zone)
                .map(|n| n.to_lowercase())
                .expect("checked above");
            if domain.is_empty() || parsed.zone_of(&zone) || zone.zone_of(&parsed) {
                return bad(format!(
                    "dns.consul_domain {:?} must be a domain of its own, apart from dns.zone {:?}",
                    self.dns.consul_domain, self.dns.zone
                ));
            }
            if self.api.datacenter.is_empty() || !crate::dns::names::check_tag(&self.api.datacenter)
            {
                return bad(format!(
                    "api.datacenter {:?} must be a DNS label for Consul's names (letters, digits, '-')",
                    self.api.datacenter
                ));
            }
        }
        if self.dns.ttl > 86_400 {
            return bad(format!("dns.ttl {} is over a day", self.dns.ttl));
        }
        if self.dns.negative_ttl > 86_400 {
            return bad(format!(
                "dns.negative_ttl {} is over a day",
                self.dns.negative_ttl
            ));
        }
        if self.dns.max_udp_payload < 512 {
            return bad(format!(
                "dns.max_udp_payload {} is under 512",
                self.dns.max_udp_payload
            ));
        }
        if self.dns.udp_workers > 256 {
            return bad(format!(
                "dns.udp_workers {} is over 256",
                self.dns.udp_workers
            ));
        }
        if self.dns.tcp_max_connections_per_client == 0 || self.dns.tcp_idle_timeout.is_zero() {
            return bad(
                "dns.tcp_max_connections_per_client and dns.tcp_idle_timeout must be above zero"
                    .into(),
            );
        }
        if self.dns.remote_max_udp_payload < 512 {
            return bad("dns.remote_max_udp_payload must be at least 512".into());
        }
        if self.dns.max_forwards == 0 {
            return bad("dns.max_forwards must be at least 1".into());
        }
        if self.dns.upstream_timeout.is_zero() {
            return bad("dns.upstream_timeout must be above zero".into());
        }
        if self.api.header_read_timeout.is_zero() || self.api.body_read_timeout.is_zero() {
            return bad(
                "api.header_read_timeout and api.body_read_timeout must be above zero".into(),
            );
        }
        if self.api.max_connections_per_client == 0 {
            return bad("api.max_connections_per_client must be at least 1".into());
        }
        if self.store.compact_after_records < 10 {
            return bad("store.compact_after_records must be at least 10".into());
        }
        if self.api.max_body_bytes < 1024 {
            return bad("api.max_body_bytes must be at least 1024".into());
        }
        if matches!(&self.api.token, Some(t) if t.trim().is_empty()) {
            return bad("api.token is empty: remove it or set a secret".into());
        }
        if self.api.token_for_reads && self.api.token.is_none() {
            return bad("api.token_for_reads needs api.token".into());
        }
        if self.health.failures_before_critical == 0 || self.health.successes_before_passing == 0 {
            return bad(
                "health.failures_before_critical and successes_before_passing count from 1".into(),
            );
        }
        if self.health.min_interval < Duration::from_millis(10)
            || self.health.min_timeout < Duration::from_millis(10)
        {
            return bad("health.min_interval and health.min_timeout must be at least 10ms".into());
        }
        if self.health.max_checks_per_instance == 0 {
            return bad("health.max_checks_per_instance must be at least 1".into());
        }
        if self.health.default_interval < Duration::from_millis(100) {
            return bad("health.default_interval must be at least 100ms".into());
        }
        if self.ca.cert_ttl < Duration::from_secs(2)
            || self.ca.cert_ttl > Duration::from_secs(366 * 86_400)
        {
            return bad("ca.cert_ttl must be between 2s and 366 days".into());
        }
        if self.vips.ttl == 0 || self.vips.ttl > 86_400 {
            return bad(format!(
                "vips.ttl {} must be between 1 and 86400 seconds",
                self.vips.ttl
            ));
        }
        for (name, svc) in &self.services {
            if !(0.0..=1.0).contains(&svc.panic_threshold) {
                return bad(format!(
                    "services.{name}.panic_threshold {} is not between 0 and 1",
                    svc.panic_threshold
                ));
            }
        }
        Ok(())
    }

    /// The panic thresholds of the services that have one, by lowercased name.
    pub fn panic_thresholds(&self) -> std::collections::HashMap<String, f64> {
        self.services
            .iter()
            .filter(|(_, s)| s.panic_threshold > 0.0)
            .map(|(k, s)| (k.to_ascii_lowercase(), s.panic_threshold))
            .collect()
    }
}

/// The nameservers in a resolv.conf, less the given addresses (this resolver itself).
pub fn resolv_conf_upstreams(text: &str, exclude: &[SocketAddr]) -> Vec<SocketAddr> {
    text.lines()
        .filter_map(|l| {
            let mut words = l.split_whitespace();
            (words.next() == Some("nameserver")).then(|| words.next())?
        })
        .filter_map(|ip| ip.split('%').next()?.parse::<IpAddr>().ok())
        .map(|ip| SocketAddr::new(ip, 53))
        .filter(|a| !exclude.contains(a))
        .collect()
}

/// What `0` (automatic) means for a cap on connections: a quarter of the process's
/// descriptor limit (RLIMIT_NOFILE), at least 16 and at most `most`.
pub fn auto_connection_cap(configured: usize, most: usize) -> usize {
    if configured > 0 {
        return configured;
    }
    let soft = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
        .map(|(soft, _)| soft)
        .unwrap_or(1024);
    ((soft / 4) as usize).clamp(16, most)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_config_is_all_defaults() {
        assert_eq!(Config::parse("").unwrap(), Config::default());
    }

    #[test]
    fn unknown_fields_are_refused() {
        let err = Config::parse("[dns]\nzoen = \"x\"")
            .unwrap_err()
            .to_string();
        assert!(err.contains("zoen"), "{err}");
    }

    #[test]
    fn validation_names_the_field() {
        let err = Config::parse("[services.pay]\npanic_threshold = 2.0")
            .unwrap_err()
            .to_string();
        assert!(err.contains("services.pay.panic_threshold"), "{err}");
        let err = Config::parse("[dns]\nzone = \"bad..zone\"")
            .unwrap_err()
            .to_string();
        assert!(err.contains("dns.zone"), "{err}");
    }

    #[test]
    fn durations_are_go_style() {
        let c = Config::parse("[dns]\nupstream_timeout = \"750ms\"").unwrap();
        assert_eq!(c.dns.upstream_timeout, Duration::from_millis(750));
    }

    #[test]
    fn resolv_conf_skips_ourselves() {
        let text = "# c\nnameserver 127.0.0.53\nnameserver 10.0.0.2\noptions edns0\nnameserver fe80::1%eth0\n";
        let me = ["127.0.0.53:53".parse().unwrap()];
        let ups = resolv_conf_upstreams(text, &me);
        assert_eq!(
            ups,
            vec![
                "10.0.0.2:53".parse::<SocketAddr>().unwrap(),
                "[fe80::1]:53".parse().unwrap()
            ]
        );
    }
}
