//! The gateway's configuration: a TOML file whose every field has a default, overridden by
//! command-line flags, checked as a whole by [`Config::validate`] before anything starts.
//!
//! ```toml
//! listen = "0.0.0.0:8080"
//! registry = "http://127.0.0.1:8500"
//!
//! [[routes]]
//! host = "api.example.test"
//! path = "/pay"
//! service = "payment"
//! strip_prefix = true
//! ```

use std::collections::BTreeSet;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use ipnet::IpNet;
use serde::{Deserialize, Serialize};
use waymark_shared::duration::serde_str as dur;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("reading {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("parsing {path}: {source}")]
    Parse {
        path: PathBuf,
        source: Box<toml::de::Error>,
    },
    #[error("invalid config: {0}")]
    Invalid(String),
}

/// Reads and parses a TOML config file (not yet validated): the ingress's and the
/// forwarder's.
pub fn load_toml<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    toml::from_str(&text).map_err(|source| ConfigError::Parse {
        path: path.to_path_buf(),
        source: Box::new(source),
    })
}

/// The whole gateway configuration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Plain HTTP listener (HTTP/1.1, and h2c when `h2c` is set). None: no plain listener.
    pub listen: Option<SocketAddr>,
    /// TLS listener (HTTP/1.1 and HTTP/2 by ALPN); needs `tls_dir`.
    pub tls_listen: Option<SocketAddr>,
    /// A directory of `<server-name>.crt` / `<server-name>.key` pairs, picked by SNI.
    pub tls_dir: Option<PathBuf>,
    /// How often `tls_dir` is checked for changed files.
    #[serde(with = "dur")]
    pub tls_reload_interval: Duration,
    /// Accept HTTP/2 without TLS (prior knowledge) on the plain listener.
    pub h2c: bool,
    /// The registry's HTTP address (a resolver's `--http-addr`).
    pub registry: String,
    /// The admin listener: `/metrics`, `/healthz/live`, `/healthz/ready`.
    pub admin_addr: SocketAddr,
    /// Worker threads for the proxy.
    pub threads: usize,
    /// Whether idle proxy threads steal ready connections from busy ones. Off, every thread
    /// runs its own single-threaded runtime and keeps the connections it accepted, like nginx
    /// workers: about 15% less CPU per request on small requests, at the price of balance
    /// when a few connections carry most of the load.
    pub work_stealing: bool,
    /// Access log: `text`, `json` or `off`. Lines go to stderr with the other logs (under
    /// systemd, the journal, which rotates them); the gateway writes no log file.
    pub access_log: AccessLog,
    /// Which data path carries client requests, HTTP/1.1 and HTTP/2: `lean` (hyper on the
    /// connections pingora accepts; see the `lean` module: about a sixth less CPU per
    /// request) or `pingora` (pingora's proxy). Both pass the same test suite.
    pub data_path: DataPath,
    /// On the lean path, whether HTTP/1.1 header names keep the case the client (or the
    /// instance) wrote them in. Off by default: names go out in lower case, as Envoy sends
    /// them and as HTTP/2 requires (header names are case-insensitive); keeping the case
    /// costs about a tenth of the lean path's CPU per request. Turn it on for a peer that
    /// wrongly depends on the case; the lean path then talks to instances through hyper's
    /// client instead of its own codec. (The pingora path always keeps it.)
    pub preserve_header_case: bool,
    /// Networks of proxies in front of the gateway (like nginx's `set_real_ip_from`). Requests
    /// from them keep their `X-Forwarded-For`, `Forwarded`, `X-Forwarded-Proto` and
    /// `X-Real-IP` (the gateway appends to the lists); from anyone else those headers are
    /// replaced with the gateway's own. Empty by default: trust no one.
    pub trusted_proxies: Vec<IpNet>,
    pub shutdown: ShutdownConfig,
    pub timeouts: TimeoutConfig,
    pub retry: RetryConfig,
    pub outlier: OutlierConfig,
    pub limits: LimitsConfig,
    /// Per-client-IP rate limit, applied to every request; none by default.
    pub client_rate_limit: Option<RateLimit>,
    /// Whether registration metadata (`waymark-public-host`, `waymark-public-path`) makes
    /// routes.
    pub metadata_routes: bool,
    pub routes: Vec<RouteConfig>,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            listen: Some(SocketAddr::from(([0, 0, 0, 0], 8080))),
            tls_listen: None,
            tls_dir: None,
            tls_reload_interval: Duration::from_secs(2),
            h2c: false,
            registry: "http://127.0.0.1:8500".into(),
            admin_addr: SocketAddr::from(([127, 0, 0, 1], 9901)),
            threads: 2,
            work_stealing: false,
            preserve_header_case: false,
            access_log: AccessLog::Text,
            data_path: DataPath::Lean,
            trusted_proxies: Vec::new(),
            shutdown: ShutdownConfig::default(),
            timeouts: TimeoutConfig::default(),
            retry: RetryConfig::default(),
            outlier: OutlierConfig::default(),
            limits: LimitsConfig::default(),
            client_rate_limit: None,
            metadata_routes: true,
            routes: Vec::new(),
        }
    }
}

/// The HTTP/1.1 data path.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DataPath {
    Pingora,
    Lean,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AccessLog {
    Text,
    Json,
    Off,
}

/// Graceful shutdown on SIGTERM: listeners close at once and requests in flight get
/// `grace_period` to finish; then the runtimes get at most `timeout` to wind down. Whole
/// seconds (pingora's unit).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ShutdownConfig {
    #[serde(with = "dur")]
    pub grace_period: Duration,
    #[serde(with = "dur")]
    pub timeout: Duration,
}

impl Default for ShutdownConfig {
    fn default() -> Self {
        ShutdownConfig {
            grace_period: Duration::from_secs(5),
            timeout: Duration::from_secs(10),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TimeoutConfig {
    /// TCP connect to an instance.
    #[serde(with = "dur")]
    pub connect: Duration,
    /// One try: the longest wait for the instance's next bytes.
    #[serde(with = "dur")]
    pub per_try: Duration,
    /// The whole request, retries included: no new try starts after it.
    #[serde(with = "dur")]
    pub deadline: Duration,
}

impl Default for TimeoutConfig {
    fn default() -> Self {
        TimeoutConfig {
            connect: Duration::from_secs(1),
            per_try: Duration::from_secs(15),
            deadline: Duration::from_secs(30),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RetryConfig {
    /// Tries per request, the first included.
    pub attempts: u32,
    /// Retries allowed as a share of requests (0.2: one retry per five requests).
    pub budget_ratio: f64,
    /// Retries always allowed before the ratio applies (a small reserve for quiet gateways).
    pub budget_reserve: u32,
}

impl Default for RetryConfig {
    fn default() -> Self {
        RetryConfig {
            attempts: 3,
            budget_ratio: 0.2,
            budget_reserve: 10,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct OutlierConfig {
    /// Consecutive 5xx answers or connect failures that eject an instance; 0 disables.
    pub consecutive_failures: u32,
    /// The first ejection's length; each further ejection of the same instance doubles it.
    #[serde(with = "dur")]
    pub base_ejection: Duration,
    #[serde(with = "dur")]
    pub max_ejection: Duration,
    /// The largest share of a service's instances ejected at once.
    pub max_ejected_ratio: f64,
}

impl Default for OutlierConfig {
    fn default() -> Self {
        OutlierConfig {
            consecutive_failures: 5,
            base_ejection: Duration::from_secs(10),
            max_ejection: Duration::from_secs(300),
            max_ejected_ratio: 0.5,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LimitsConfig {
    /// Request line plus headers, in bytes; larger is refused with 431.
    pub max_header_bytes: usize,
    /// Request body in bytes; larger is refused with 413.
    pub max_body_bytes: u64,
    /// The whole request head (line and headers, and any empty lines before them) must
    /// arrive within this; a client that trickles it is disconnected.
    #[serde(with = "dur")]
    pub header_read_timeout: Duration,
    /// A kept-alive HTTP/1.1 connection waiting for its next request, and an HTTP/2
    /// connection with no traffic, is closed after this (HTTP/2: GOAWAY first). Whole
    /// seconds (pingora's unit for keep-alive).
    #[serde(with = "dur")]
    pub idle_timeout: Duration,
    /// Client connections open at once; beyond this a new connection is closed at once
    /// (counted in `waymark_gateway_connections_refused_total`). Lowered at start to what
    /// the descriptor limit (`RLIMIT_NOFILE`) can hold with an upstream connection each.
    pub max_connections: usize,
    /// The longest wait for the next bytes of a request body (HTTP/1.1).
    #[serde(with = "dur")]
    pub body_read_timeout: Duration,
    /// Bytes a second a request body must average: after `body_read_timeout`, the body's
    /// deadline moves one second later for every `min_body_rate` bytes received (Apache's
    /// mod_reqtimeout `MinRate`), so a trickled upload is cut. 0: no minimum.
    pub min_body_rate: u64,
    /// The longest a write of response bytes to the client may take; a client that stops
    /// reading (HTTP/2: a stream stalled on a zero flow-control window) ends the request, and
    /// its upstream connection is closed.
    #[serde(with = "dur")]
    pub send_timeout: Duration,
    /// HTTP/2 streams a client may have open at once on one connection
    /// (SETTINGS_MAX_CONCURRENT_STREAMS).
    pub h2_max_concurrent_streams: u32,
    /// HTTP/2 bytes buffered per stream, each way: the receive window offered to the client
    /// (SETTINGS_INITIAL_WINDOW_SIZE) and the send buffer towards it.
    pub h2_stream_buffer_bytes: u32,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        LimitsConfig {
            max_header_bytes: 64 * 1024,
            max_body_bytes: 16 * 1024 * 1024,
            header_read_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(75),
            max_connections: 10_000,
            body_read_timeout: Duration::from_secs(60),
            min_body_rate: 500,
            send_timeout: Duration::from_secs(60),
            h2_max_concurrent_streams: 100,
            h2_stream_buffer_bytes: 65_535,
        }
    }
}

/// A token bucket: `rate` requests per second on average, bursts of up to `burst`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimit {
    pub rate: f64,
    pub burst: u32,
}

/// One route from the config file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteConfig {
    /// Shown in metrics and logs; defaults to `host+path`.
    #[serde(default)]
    pub name: Option<String>,
    /// The `Host` (or `:authority`) to match, without port; none matches any host.
    #[serde(default)]
    pub host: Option<String>,
    /// Path prefix, matched on segment boundaries (`/pay` matches `/pay` and `/pay/x`, not
    /// `/payment`).
    #[serde(default = "root_path")]
    pub path: String,
    /// Also require this request header to have this value.
    #[serde(default)]
    pub header: Option<HeaderMatch>,
    pub service: String,
    /// Only instances with all these tags.
    #[serde(default)]
    pub tags: Vec<String>,
    /// Remove the matched prefix before forwarding.
    #[serde(default)]
    pub strip_prefix: bool,
    /// Weighted split between tag subsets (canaries); replaces `tags` when given.
    #[serde(default)]
    pub split: Vec<SplitConfig>,
    /// Speak HTTP/2 without TLS to the instances (gRPC backends).
    #[serde(default)]
    pub upstream_h2c: bool,
    #[serde(default)]
    pub rate_limit: Option<RateLimit>,
}

fn root_path() -> String {
    "/".into()
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HeaderMatch {
    pub name: String,
    pub value: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SplitConfig {
    #[serde(default)]
    pub tags: Vec<String>,
    pub weight: u32,
}

impl Config {
    /// Reads and parses a TOML file (not yet validated).
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        load_toml(path)
    }

    pub fn parse(text: &str) -> Result<Config, toml::de::Error> {
        toml::from_str(text)
    }

    /// Checks the configuration as a whole.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |m: String| Err(ConfigError::Invalid(m));
        if self.listen.is_none() && self.tls_listen.is_none() {
            return bad("neither listen nor tls_listen is set".into());
        }
        if self.tls_listen.is_some() && self.tls_dir.is_none() {
            return bad("tls_listen needs tls_dir".into());
        }
        // Port 0 is any free port: two of them are never the same one.
        if self.listen.is_some_and(|a| a.port() != 0) && self.listen == self.tls_listen {
            return bad("listen and tls_listen are the same address".into());
        }
        if !(self.registry.starts_with("http://") || self.registry.starts_with("https://")) {
            return bad(format!(
                "registry {:?} must be an http:// or https:// URL",
                self.registry
            ));
        }
        if self.threads == 0 {
            return bad("threads must be at least 1".into());
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
        if self.timeouts.connect.is_zero() || self.timeouts.per_try.is_zero() {
            return bad("timeouts must be positive".into());
        }
        if self.limits.max_header_bytes < 1024 {
            return bad("limits.max_header_bytes must be at least 1024".into());
        }
        if self.limits.header_read_timeout.is_zero() {
            return bad("limits.header_read_timeout must be positive".into());
        }
        let l = &self.limits;
        if l.idle_timeout.subsec_nanos() != 0 || l.idle_timeout.is_zero() {
            return bad(
                "limits.idle_timeout must be a whole number of seconds, at least 1s".into(),
            );
        }
        if l.max_connections == 0 {
            return bad("limits.max_connections must be at least 1".into());
        }
        if l.body_read_timeout.is_zero() || l.send_timeout.is_zero() {
            return bad("limits.body_read_timeout and limits.send_timeout must be positive".into());
        }
        if l.h2_max_concurrent_streams == 0 {
            return bad("limits.h2_max_concurrent_streams must be at least 1".into());
        }
        // RFC 9113: the window is at most 2^31-1; below 1 KiB every stream crawls.
        if !(1024..=(1 << 31) - 1).contains(&l.h2_stream_buffer_bytes) {
            return bad("limits.h2_stream_buffer_bytes must be within 1024..2147483647".into());
        }
        if self.tls_reload_interval.is_zero() {
            return bad("tls_reload_interval must be positive".into());
        }
        let check_limit = |what: &str, l: &RateLimit| {
            if !(l.rate > 0.0 && l.rate.is_finite()) || l.burst == 0 {
                Err(ConfigError::Invalid(format!(
                    "{what}: rate must be positive and burst at least 1"
                )))
            } else {
                Ok(())
            }
        };
        if let Some(l) = &self.client_rate_limit {
            check_limit("client_rate_limit", l)?;
        }
        let mut seen = BTreeSet::new();
        for (i, r) in self.routes.iter().enumerate() {
            let what = format!("route {} ({})", i + 1, r.display_name());
            if r.service.trim().is_empty() {
                return bad(format!("{what}: service is empty"));
            }
            if !r.path.starts_with('/') {
                return bad(format!("{what}: path must start with /"));
            }
            if let Some(h) = &r.host {
                if h.is_empty() || h.contains('/') || h.contains(' ') {
                    return bad(format!("{what}: host {h:?} is not a host name"));
                }
            }
            if let Some(h) = &r.header {
                if http::HeaderName::from_bytes(h.name.as_bytes()).is_err()
                    || http::HeaderValue::from_str(&h.value).is_err()
                {
                    return bad(format!("{what}: header {:?} is not a valid header", h.name));
                }
            }
            if !r.split.is_empty() && !r.tags.is_empty() {
                return bad(format!("{what}: give either tags or split, not both"));
            }
            if !r.split.is_empty() && r.split.iter().all(|s| s.weight == 0) {
                return bad(format!("{what}: every split weight is 0"));
            }
            if let Some(l) = &r.rate_limit {
                check_limit(&what, l)?;
            }
            let key = (
                r.host.as_deref().map(str::to_ascii_lowercase),
                normalize_prefix(&r.path),
                r.header
                    .as_ref()
                    .map(|h| (h.name.to_ascii_lowercase(), h.value.clone())),
            );
            if !seen.insert(key) {
                return bad(format!(
                    "{what}: another route has the same host, path and header"
                ));
            }
        }
        Ok(())
    }
}

impl Config {
    /// Whether a peer's forwarding headers are to be believed.
    pub fn is_trusted_proxy(&self, peer: IpAddr) -> bool {
        self.trusted_proxies.iter().any(|n| n.contains(&peer))
    }
}

impl RouteConfig {
    pub fn display_name(&self) -> String {
        match &self.name {
            Some(n) => n.clone(),
            None => format!("{}{}", self.host.as_deref().unwrap_or("*"), self.path),
        }
    }
}

/// A path prefix without its trailing slashes (`/` stays `/`).
pub fn normalize_prefix(p: &str) -> String {
    let t = p.trim_end_matches('/');
    if t.is_empty() {
        "/".into()
    } else {
        t.into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_validate() {
        Config::default().validate().unwrap();
    }

    #[test]
    fn parses_a_full_file() {
        let c = Config::parse(
            r#"
            listen = "127.0.0.1:8080"
            tls_listen = "127.0.0.1:8443"
            tls_dir = "/etc/waymark/tls"
            registry = "http://127.0.0.1:8500"
            access_log = "json"
            trusted_proxies = ["10.0.0.0/8", "::1/128"]
            client_rate_limit = { rate = 100, burst = 200 }
            [timeouts]
            connect = "250ms"
            [[routes]]
            host = "api.example.test"
            path = "/pay/"
            service = "payment"
            strip_prefix = true
            header = { name = "x-canary", value = "1" }
            split = [{ tags = ["v1"], weight = 90 }, { tags = ["v2"], weight = 10 }]
            "#,
        )
        .unwrap();
        c.validate().unwrap();
        assert_eq!(c.timeouts.connect, Duration::from_millis(250));
        assert_eq!(c.access_log, AccessLog::Json);
        assert!(c.is_trusted_proxy("10.2.3.4".parse().unwrap()));
        assert!(c.is_trusted_proxy("::1".parse().unwrap()));
        assert!(!c.is_trusted_proxy("11.0.0.1".parse().unwrap()));
        assert!(!Config::default().is_trusted_proxy("127.0.0.1".parse().unwrap()));
        assert_eq!(c.routes[0].split.len(), 2);
        assert_eq!(c.routes[0].path, "/pay/");
    }

    #[test]
    fn unknown_fields_are_refused() {
        assert!(Config::parse("listen_addr = \"127.0.0.1:1\"").is_err());
        assert!(Config::parse("[[routes]]\nservice = \"a\"\nprefix = \"/\"").is_err());
    }

    #[test]
    fn validate_catches_mistakes() {
        let with = |f: &dyn Fn(&mut Config)| {
            let mut c = Config::default();
            f(&mut c);
            c.validate()
        };
        assert!(with(&|c| c.tls_listen = Some("127.0.0.1:1".parse().unwrap())).is_err());
        assert!(with(&|c| c.registry = "127.0.0.1:8500".into()).is_err());
        assert!(with(&|c| c.retry.budget_ratio = 2.0).is_err());
        assert!(with(&|c| c.limits.idle_timeout = Duration::from_millis(1500)).is_err());
        assert!(with(&|c| c.limits.idle_timeout = Duration::ZERO).is_err());
        assert!(with(&|c| c.limits.max_connections = 0).is_err());
        assert!(with(&|c| c.limits.send_timeout = Duration::ZERO).is_err());
        assert!(with(&|c| c.limits.body_read_timeout = Duration::ZERO).is_err());
        assert!(with(&|c| c.limits.h2_max_concurrent_streams = 0).is_err());
        assert!(with(&|c| c.limits.h2_stream_buffer_bytes = 10).is_err());
        assert!(
            with(&|c| c.limits.min_body_rate = 0).is_ok(),
            "0: no minimum"
        );
        let route = RouteConfig {
            name: None,
            host: None,
            path: "pay".into(),
            header: None,
            service: "payment".into(),
            tags: vec![],
            strip_prefix: false,
            split: vec![],
            upstream_h2c: false,
            rate_limit: None,
        };
        let r = route.clone();
        assert!(with(&move |c| c.routes = vec![r.clone()]).is_err());
        let mut ok = route.clone();
        ok.path = "/pay".into();
        let twice = vec![ok.clone(), {
            let mut o = ok.clone();
            o.path = "/pay/".into();
            o
        }];
        assert!(with(&move |c| c.routes = twice.clone()).is_err());
        let mut bad_limit = ok.clone();
        bad_limit.rate_limit = Some(RateLimit {
            rate: 0.0,
            burst: 1,
        });
        assert!(with(&move |c| c.routes = vec![bad_limit.clone()]).is_err());
    }

    #[test]
    fn prefixes_normalize() {
        assert_eq!(normalize_prefix("/"), "/");
        assert_eq!(normalize_prefix("/pay/"), "/pay");
        assert_eq!(normalize_prefix("//"), "/");
    }
}
