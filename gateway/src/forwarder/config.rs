//! The forwarder's configuration: a TOML file whose every field has a default, overridden by
//! the command-line flags, checked as a whole by [`ForwarderConfig::validate`] before anything
//! binds.
//!
//! ```toml
//! registry = "http://127.0.0.1:8500"
//! admin_addr = "127.0.0.1:9902"
//! host_name = "host-a"
//! http_services = ["payment"]
//!
//! [mesh]                      # calls to other hosts' instances over mTLS
//! join_token_file = "/var/lib/waymark/join-token"
//! inbound_addr = "0.0.0.0:15008"
//! [mesh.allow]                # who may call this host's instances, per service
//! payment = ["host-a", "host-b"]
//! ```

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use waymark_shared::duration::serde_str as dur;

use crate::config::{load_toml, ConfigError, OutlierConfig, RetryConfig};

/// The whole forwarder configuration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ForwarderConfig {
    /// The local registry's HTTP address (a resolver's `--http-addr`).
    pub registry: String,
    /// Admin listener: `/metrics`, `/healthz/live`, `/healthz/ready`.
    pub admin_addr: SocketAddr,
    /// This host's name, its identity in the mesh (a DNS label). Empty: the machine's host
    /// name.
    pub host_name: String,
    /// The address this forwarder registers with (the host's address other hosts reach).
    pub advertise_address: IpAddr,
    /// The host's own addresses, announced so that instances at them count as this host's.
    /// Empty: `advertise_address` alone.
    pub host_addresses: Vec<IpAddr>,
    /// Services proxied as HTTP whatever their registrations say (otherwise a service is
    /// HTTP when an instance's `Meta` has `waymark-protocol = "http"`, and TCP if not).
    pub http_services: Vec<String>,
    /// TCP connect to an instance; a connect that takes longer is retried on another.
    #[serde(with = "dur")]
    pub connect_timeout: Duration,
    /// Client connections open at once, over every listener; beyond, new ones are closed.
    pub max_connections: usize,
    pub tcp: TcpConfig,
    pub http: HttpConfig,
    pub retry: RetryConfig,
    pub outlier: OutlierConfig,
    pub announce: AnnounceConfig,
    pub mesh: MeshConfig,
    pub shutdown: ShutdownConfig,
}

/// The mesh: this host's identity, and calls between hosts' forwarders over mutual TLS. On
/// when a join token is given; off, every instance is called directly, wherever it is.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MeshConfig {
    /// The registry's join token (`waymark-resolver ca join-token`).
    pub join_token: String,
    /// A file holding the join token (read at start), instead of `join_token`.
    pub join_token_file: Option<PathBuf>,
    /// The mutual-TLS listener other hosts' forwarders call; it is registered at
    /// `advertise_address` and this port. Port 0: any free port.
    pub inbound_addr: SocketAddr,
    /// This host's key, certificate and trust bundle.
    pub state_dir: PathBuf,
    /// A failed certificate request or renewal is tried again after this long.
    #[serde(with = "dur")]
    pub retry: Duration,
    /// Per service: the hosts whose forwarders may call its instances on this host. A
    /// service not named here may be called by any host of the mesh.
    pub allow: BTreeMap<String, Vec<String>>,
}

impl Default for MeshConfig {
    fn default() -> Self {
        MeshConfig {
            join_token: String::new(),
            join_token_file: None,
            inbound_addr: SocketAddr::from(([0, 0, 0, 0], 15008)),
            state_dir: PathBuf::from("/var/lib/waymark/forwarder"),
            retry: Duration::from_secs(5),
            allow: BTreeMap::new(),
        }
    }
}

impl MeshConfig {
    /// Whether the mesh is on: a join token or a file for it.
    pub fn enabled(&self) -> bool {
        !self.join_token.is_empty() || self.join_token_file.is_some()
    }

    /// The join token: as given, or read from its file (trimmed).
    pub fn token(&self) -> Result<String, ConfigError> {
        let Some(path) = &self.join_token_file else {
            return Ok(self.join_token.clone());
        };
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.clone(),
            source,
        })?;
        let token = text.trim().to_string();
        if token.is_empty() {
            return Err(ConfigError::Invalid(format!(
                "mesh.join_token_file {} is empty",
                path.display()
            )));
        }
        Ok(token)
    }
}

/// Limits of proxied TCP connections.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TcpConfig {
    /// A connection with no byte in either direction for this long is closed.
    #[serde(with = "dur")]
    pub idle_timeout: Duration,
    /// A connection is closed after this long whatever it does; 0: no limit.
    #[serde(with = "dur")]
    pub max_duration: Duration,
}

impl Default for TcpConfig {
    fn default() -> Self {
        TcpConfig {
            idle_timeout: Duration::from_secs(3600),
            max_duration: Duration::ZERO,
        }
    }
}

/// Proxied HTTP requests.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HttpConfig {
    /// One try: the longest wait for an instance's response head.
    #[serde(with = "dur")]
    pub per_try_timeout: Duration,
    /// A client connection with no request in flight is closed after this long.
    #[serde(with = "dur")]
    pub idle_timeout: Duration,
}

impl Default for HttpConfig {
    fn default() -> Self {
        HttpConfig {
            per_try_timeout: Duration::from_secs(15),
            idle_timeout: Duration::from_secs(75),
        }
    }
}

/// How the forwarder registers itself (see `waymark_shared::forwarders`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AnnounceConfig {
    /// The TTL of its registration's check; it heartbeats every third of it.
    #[serde(with = "dur")]
    pub ttl: Duration,
}

impl Default for AnnounceConfig {
    fn default() -> Self {
        AnnounceConfig {
            ttl: Duration::from_secs(10),
        }
    }
}

/// SIGTERM: deregister, close the listeners, then give open connections this long.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ShutdownConfig {
    #[serde(with = "dur")]
    pub drain_timeout: Duration,
}

impl Default for ShutdownConfig {
    fn default() -> Self {
        ShutdownConfig {
            drain_timeout: Duration::from_secs(10),
        }
    }
}

impl Default for ForwarderConfig {
    fn default() -> Self {
        ForwarderConfig {
            registry: "http://127.0.0.1:8500".into(),
            admin_addr: SocketAddr::from(([127, 0, 0, 1], 9902)),
            host_name: String::new(),
            advertise_address: IpAddr::from([127, 0, 0, 1]),
            host_addresses: Vec::new(),
            http_services: Vec::new(),
            connect_timeout: Duration::from_secs(1),
            max_connections: 10_000,
            tcp: TcpConfig::default(),
            http: HttpConfig::default(),
            retry: RetryConfig::default(),
            // A refused connect ejects at once (see `tcp`); this counts 5xx answers.
            outlier: OutlierConfig::default(),
            announce: AnnounceConfig::default(),
            mesh: MeshConfig::default(),
            shutdown: ShutdownConfig::default(),
        }
    }
}

/// Whether `s` is a DNS label: 1 to 63 letters, digits and `-`, not starting or ending with `-`.
fn is_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

impl ForwarderConfig {
    /// Reads and parses a TOML file (not yet validated).
    pub fn load(path: &Path) -> Result<ForwarderConfig, ConfigError> {
        load_toml(path)
    }

    pub fn parse(text: &str) -> Result<ForwarderConfig, toml::de::Error> {
        toml::from_str(text)
    }

    /// The host's addresses as announced: `host_addresses`, with the advertised one first.
    pub fn announced_addresses(&self) -> Vec<IpAddr> {
        let mut out = vec![self.advertise_address];
        for a in &self.host_addresses {
            if !out.contains(a) {
                out.push(*a);
            }
        }
        out
    }

    /// Whether `service` is declared HTTP by config (case-insensitively).
    pub fn is_http_service(&self, service: &str) -> bool {
        self.http_services
            .iter()
            .any(|s| s.eq_ignore_ascii_case(service))
    }

    /// Checks the configuration as a whole.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |m: String| Err(ConfigError::Invalid(m));
        if !(self.registry.starts_with("http://") || self.registry.starts_with("https://")) {
            return bad(format!(
                "registry {:?} must be an http:// or https:// URL",
                self.registry
            ));
        }
        if !is_label(&self.host_name) {
            return bad(format!(
                "host_name {:?} must be a DNS label (1 to 63 letters, digits and -)",
                self.host_name
            ));
        }
        if self.advertise_address.is_unspecified() {
            return bad(
                "advertise_address must be an address of this host, not 0.0.0.0 or ::".into(),
            );
        }
        for s in &self.http_services {
            if !is_label(s) {
                return bad(format!("http_services: {s:?} is not a service name"));
            }
        }
        if self.connect_timeout.is_zero() {
            return bad("connect_timeout must be positive".into());
        }
        if self.max_connections == 0 {
            return bad("max_connections must be at least 1".into());
        }
        if self.tcp.idle_timeout.is_zero() {
            return bad("tcp.idle_timeout must be positive".into());
        }
        if self.http.per_try_timeout.is_zero() || self.http.idle_timeout.is_zero() {
            return bad("http.per_try_timeout and http.idle_timeout must be positive".into());
        }
        if self.retry.attempts == 0 {
            return bad("retry.attempts must be at least 1".into());
        }
        if !(0.0..=1.0).contains(&self.retry.budget_ratio) {
            return bad("retry.budget_ratio must be within 0..1".into());
        }
        if !(0.0..=1.0).contains(&self.outlier.max_ejected_ratio) {
            return bad("outlier.max_ejected_ratio must be within 0..1".into());
        }
        if self.outlier.base_ejection > self.outlier.max_ejection {
            return bad("outlier.base_ejection is longer than outlier.max_ejection".into());
        }
        if self.announce.ttl < Duration::from_secs(1) {
            return bad("announce.ttl must be at least 1s".into());
        }
        let mesh = &self.mesh;
        if !mesh.join_token.is_empty() && mesh.join_token_file.is_some() {
            return bad("mesh: give join_token or join_token_file, not both".into());
        }
        let inbound = mesh.inbound_addr.ip();
        if mesh.enabled() && !inbound.is_unspecified() && inbound != self.advertise_address {
            return bad(format!(
                "mesh.inbound_addr {} must listen on advertise_address {} (or on 0.0.0.0), \
                 where other hosts are told to call it",
                mesh.inbound_addr, self.advertise_address
            ));
        }
        if mesh.retry.is_zero() {
            return bad("mesh.retry must be positive".into());
        }
        for (service, hosts) in &mesh.allow {
            if !is_label(service) {
                return bad(format!("mesh.allow: {service:?} is not a service name"));
            }
            if let Some(h) = hosts.iter().find(|h| !is_label(h)) {
                return bad(format!("mesh.allow.{service}: {h:?} is not a host name"));
            }
        }
        Ok(())
    }
}

/// The machine's host name up to its first dot, lowercased, as a default for `host_name`
/// (empty when unknown).
pub fn machine_host_name() -> String {
    nix::unistd::gethostname()
        .ok()
        .and_then(|h| h.into_string().ok())
        .map(|h| h.split('.').next().unwrap_or("").to_ascii_lowercase())
        .unwrap_or_default()
}

impl ForwarderConfig {
    /// Fills `host_name` with the machine's when it is empty.
    pub fn with_host_name_default(mut self) -> ForwarderConfig {
        if self.host_name.is_empty() {
            self.host_name = machine_host_name();
        }
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn valid() -> ForwarderConfig {
        ForwarderConfig {
            host_name: "host-a".into(),
            ..ForwarderConfig::default()
        }
    }

    #[test]
    fn defaults_are_valid_once_the_host_has_a_name() {
        assert!(
            ForwarderConfig::default().validate().is_err(),
            "no host name"
        );
        valid().validate().unwrap();
        let c =
            ForwarderConfig::parse("host_name = \"h1\"\n[tcp]\nidle_timeout = \"30s\"\n").unwrap();
        assert_eq!(c.tcp.idle_timeout, Duration::from_secs(30));
        assert_eq!(c.connect_timeout, Duration::from_secs(1));
        c.validate().unwrap();
    }

    #[test]
    fn an_empty_host_name_defaults_to_the_machines() {
        let named = valid().with_host_name_default();
        assert_eq!(named.host_name, "host-a");
        let unnamed = ForwarderConfig::default().with_host_name_default();
        assert_eq!(unnamed.host_name, machine_host_name());
        assert!(!unnamed.host_name.contains('.'));
    }

    #[test]
    fn the_mesh_is_on_with_a_join_token_from_the_config_or_a_file() {
        let mut c = valid();
        assert!(!c.mesh.enabled());
        c.mesh.join_token = "secret".into();
        assert!(c.mesh.enabled());
        assert_eq!(c.mesh.token().unwrap(), "secret");
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("token");
        std::fs::write(&file, "from-file\n").unwrap();
        let mut c = valid();
        c.mesh.join_token_file = Some(file.clone());
        assert!(c.mesh.enabled());
        assert_eq!(c.mesh.token().unwrap(), "from-file");
        std::fs::write(&file, "\n").unwrap();
        assert!(c.mesh.token().unwrap_err().to_string().contains("empty"));
        c.mesh.join_token_file = Some(dir.path().join("absent"));
        assert!(c.mesh.token().unwrap_err().to_string().contains("absent"));
        let parsed = ForwarderConfig::parse(
            "host_name = \"h\"\n[mesh]\njoin_token = \"t\"\n[mesh.allow]\npayment = [\"h2\"]\n",
        )
        .unwrap();
        assert_eq!(parsed.mesh.allow["payment"], ["h2"]);
        parsed.validate().unwrap();
    }

    #[test]
    fn unknown_keys_are_refused() {
        let e = ForwarderConfig::parse("host_nmae = \"x\"\n").unwrap_err();
        assert!(e.to_string().contains("host_nmae"), "{e}");
    }

    #[test]
    fn the_validation_table() {
        type Edit = fn(&mut ForwarderConfig);
        let cases: &[(Edit, &str)] = &[
            (|c| c.registry = "127.0.0.1:8500".into(), "registry"),
            (|c| c.host_name = "a.b".into(), "host_name"),
            (|c| c.host_name = "-a".into(), "host_name"),
            (
                |c| c.advertise_address = "0.0.0.0".parse().unwrap(),
                "advertise_address",
            ),
            (|c| c.http_services = vec!["".into()], "http_services"),
            (|c| c.connect_timeout = Duration::ZERO, "connect_timeout"),
            (|c| c.max_connections = 0, "max_connections"),
            (|c| c.tcp.idle_timeout = Duration::ZERO, "tcp.idle_timeout"),
            (
                |c| c.http.per_try_timeout = Duration::ZERO,
                "per_try_timeout",
            ),
            (|c| c.retry.attempts = 0, "retry.attempts"),
            (|c| c.retry.budget_ratio = 2.0, "budget_ratio"),
            (|c| c.outlier.max_ejected_ratio = -1.0, "max_ejected_ratio"),
            (
                |c| c.outlier.base_ejection = Duration::from_secs(999),
                "base_ejection",
            ),
            (
                |c| c.announce.ttl = Duration::from_millis(10),
                "announce.ttl",
            ),
            (
                |c| {
                    c.mesh.join_token = "t".into();
                    c.mesh.join_token_file = Some("/t".into());
                },
                "not both",
            ),
            (
                |c| {
                    c.mesh.join_token = "t".into();
                    c.mesh.inbound_addr = "10.9.9.9:15008".parse().unwrap();
                },
                "must listen on advertise_address",
            ),
            (|c| c.mesh.retry = Duration::ZERO, "mesh.retry"),
            (
                |c| {
                    c.mesh.allow.insert("pay".into(), vec!["a.b".into()]);
                },
                "mesh.allow.pay",
            ),
        ];
        for (edit, says) in cases {
            let mut c = valid();
            edit(&mut c);
            let e = c.validate().unwrap_err().to_string();
            assert!(e.contains(says), "{says}: {e}");
        }
    }

    #[test]
    fn announced_addresses_lead_with_the_advertised_one() {
        let mut c = valid();
        c.advertise_address = "10.0.0.2".parse().unwrap();
        c.host_addresses = vec!["10.0.1.2".parse().unwrap(), "10.0.0.2".parse().unwrap()];
        assert_eq!(
            c.announced_addresses(),
            [
                "10.0.0.2".parse::<IpAddr>().unwrap(),
                "10.0.1.2".parse().unwrap()
            ]
        );
        assert!(!c.is_http_service("x"));
        c.http_services = vec!["Payment".into()];
        assert!(c.is_http_service("payment"));
    }
}
