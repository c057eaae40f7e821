//! etcd as the registry of record for many hosts: how to reach it ([`EtcdConfig`],
//! [`connect`]) and where the registry lives in it ([`keys`]). The follower that mirrors it is
//! [`crate::follow::etcd`]; what a host writes is the resolver's business.
//!
//! The client is the `etcd-client` crate (gRPC over tonic, rustls): etcd's own v3 API, with
//! watches that resume from a revision, leases with keep-alive streams and transactions, the
//! three things the registry needs, and TLS and user/password as etcd's own clients take them.

pub mod keys;

/// The etcd client crate, for the resolver's writes (one version for the whole project).
pub use etcd_client as client;

use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::duration::serde_str as dur;

#[derive(Debug, thiserror::Error)]
pub enum EtcdError {
    #[error("invalid etcd config: {0}")]
    Invalid(String),
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("etcd: {0}")]
    Client(#[from] etcd_client::Error),
    #[error("etcd: {0}")]
    Unreachable(String),
}

/// How to reach etcd and where the registry lives in it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EtcdConfig {
    /// Client URLs of the cluster's members (`http://10.0.0.1:2379`, `https://...`). Empty:
    /// no etcd (the embedded registry on one machine).
    pub endpoints: Vec<String>,
    /// Every key Waymark writes starts with this.
    pub prefix: String,
    /// This host's name in the registry: its registrations are written under it. Default: the
    /// machine's host name.
    pub node_name: Option<String>,
    /// The lease that the host's registrations are attached to: they go this long after the
    /// host stops renewing it (it renews every third of it).
    #[serde(with = "dur")]
    pub lease_ttl: Duration,
    /// Connecting to an endpoint.
    #[serde(with = "dur")]
    pub dial_timeout: Duration,
    /// Each request.
    #[serde(with = "dur")]
    pub request_timeout: Duration,
    /// How often the watch is asked to show progress; a watch silent for three of these is
    /// taken as stuck and started again from a fresh listing.
    #[serde(with = "dur")]
    pub progress_interval: Duration,
    /// etcd user and password (etcdctl's --user).
    pub username: Option<String>,
    pub password: Option<String>,
    /// A file holding the password, instead of `password`.
    pub password_file: Option<PathBuf>,
    /// The CA that signed the members' certificates (etcdctl's --cacert); needed for https.
    pub ca_file: Option<PathBuf>,
    /// A client certificate and its key (etcdctl's --cert and --key), for client-cert auth.
    pub cert_file: Option<PathBuf>,
    pub key_file: Option<PathBuf>,
}

impl Default for EtcdConfig {
    fn default() -> Self {
        EtcdConfig {
            endpoints: Vec::new(),
            prefix: "/waymark/".into(),
            node_name: None,
            lease_ttl: Duration::from_secs(10),
            dial_timeout: Duration::from_secs(2),
            request_timeout: Duration::from_secs(5),
            progress_interval: Duration::from_secs(2),
            username: None,
            password: None,
            password_file: None,
            ca_file: None,
            cert_file: None,
            key_file: None,
        }
    }
}

impl EtcdConfig {
    /// Whether etcd is the registry of record.
    pub fn enabled(&self) -> bool {
        !self.endpoints.is_empty()
    }

    pub fn layout(&self) -> Result<keys::Layout, EtcdError> {
        keys::Layout::new(&self.prefix).map_err(|e| EtcdError::Invalid(e.to_string()))
    }

    /// This host's node name: the configured one, else the machine's host name.
    pub fn node(&self) -> String {
        self.node_name.clone().unwrap_or_else(machine_host_name)
    }

    pub fn validate(&self) -> Result<(), EtcdError> {
        let bad = |m: String| Err(EtcdError::Invalid(m));
        self.layout()?;
        for e in &self.endpoints {
            let rest = e
                .strip_prefix("http://")
                .or_else(|| e.strip_prefix("https://"));
            match rest {
                Some(hostport)
                    if hostport.rsplit_once(':').is_some_and(|(h, p)| {
                        !h.is_empty() && p.parse::<u16>().is_ok_and(|p| p > 0)
                    }) => {}
                _ => {
                    return bad(format!(
                        "endpoint {e:?} must be http://HOST:PORT or https://HOST:PORT"
                    ))
                }
            }
            if e.starts_with("https://") && self.ca_file.is_none() {
                return bad(format!("endpoint {e:?} is https: ca_file is needed"));
            }
        }
        if let Some(node) = &self.node_name {
            if node.is_empty() || node.contains('/') {
                return bad(format!("node_name {node:?} must be non-empty, without '/'"));
            }
        }
        if self.lease_ttl < Duration::from_secs(2) || self.lease_ttl > Duration::from_secs(300) {
            return bad(format!(
                "lease_ttl {:?} must be between 2s and 5m (10s to 15s is usual)",
                self.lease_ttl
            ));
        }
        for (name, d) in [
            ("dial_timeout", self.dial_timeout),
            ("request_timeout", self.request_timeout),
            ("progress_interval", self.progress_interval),
        ] {
            if d.is_zero() {
                return bad(format!("{name} must be above zero"));
            }
        }
        if self.cert_file.is_some() != self.key_file.is_some() {
            return bad("cert_file and key_file go together".into());
        }
        if self.password.is_some() && self.password_file.is_some() {
            return bad("password and password_file: one or the other".into());
        }
        let has_password = self.password.is_some() || self.password_file.is_some();
        if self.username.is_some() != has_password {
            return bad("username and a password (or password_file) go together".into());
        }
        Ok(())
    }
}

/// The machine's host name (`/proc/sys/kernel/hostname`, else `$HOSTNAME`, else "localhost").
pub fn machine_host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok().filter(|s| !s.is_empty()))
        .unwrap_or_else(|| "localhost".into())
}

fn read(path: &PathBuf) -> Result<Vec<u8>, EtcdError> {
    std::fs::read(path).map_err(|source| EtcdError::Read {
        path: path.clone(),
        source,
    })
}

/// A client for one member of the cluster: the first that answers, trying them in turn from
/// endpoint `start` (a caller whose member failed passes the next one). Returns the client
/// and the index of its endpoint.
///
/// One member per client, not the client's own balancing over all of them: a balanced
/// channel sends some requests to a member that is down, and they fail (connection refused)
/// for as long as it stays down.
pub async fn connect(
    config: &EtcdConfig,
    start: usize,
) -> Result<(etcd_client::Client, usize), EtcdError> {
    let mut options = etcd_client::ConnectOptions::new()
        .with_connect_timeout(config.dial_timeout)
        .with_timeout(config.request_timeout)
        .with_keep_alive(config.dial_timeout, config.dial_timeout)
        .with_keep_alive_while_idle(true)
        // A member cut off from the quorum fails requests and watches rather than serving
        // an old state.
        .with_require_leader(true);
    if let Some(user) = &config.username {
        let password = match (&config.password, &config.password_file) {
            (Some(p), _) => p.clone(),
            (None, Some(file)) => String::from_utf8_lossy(&read(file)?).trim().to_string(),
            (None, None) => String::new(),
        };
        options = options.with_user(user.clone(), password);
    }
    if let Some(ca) = &config.ca_file {
        let mut tls = etcd_client::TlsOptions::new()
            .ca_certificate(etcd_client::Certificate::from_pem(read(ca)?));
        if let (Some(cert), Some(key)) = (&config.cert_file, &config.key_file) {
            tls = tls.identity(etcd_client::Identity::from_pem(read(cert)?, read(key)?));
        }
        options = options.with_tls(tls);
    }
    let n = config.endpoints.len().max(1);
    let mut last = None;
    for k in 0..n {
        let i = (start + k) % n;
        let Some(endpoint) = config.endpoints.get(i) else {
            break;
        };
        let tried = async {
            let mut client =
                etcd_client::Client::connect([endpoint.as_str()], Some(options.clone())).await?;
            client.status().await?;
            Ok::<_, etcd_client::Error>(client)
        };
        match tokio::time::timeout(config.dial_timeout + config.request_timeout, tried).await {
            Ok(Ok(client)) => return Ok((client, i)),
            Ok(Err(e)) => last = Some(EtcdError::Client(e)),
            Err(_) => {
                last = Some(EtcdError::Unreachable(format!(
                    "{endpoint} did not answer within {:?}",
                    config.dial_timeout + config.request_timeout
                )))
            }
        }
    }
    Err(last.unwrap_or_else(|| EtcdError::Unreachable("no endpoints".into())))
}

/// Which member the next session tries first: the one after the member the last session
/// used, whatever ended it. Hosts start at different members, to spread over the cluster.
#[derive(Debug)]
pub struct Members(std::sync::atomic::AtomicUsize);

impl Default for Members {
    fn default() -> Self {
        Members(std::sync::atomic::AtomicUsize::new(
            std::process::id() as usize
        ))
    }
}

impl Members {
    /// A client for the first member that answers, from the next one in turn ([`connect`]).
    pub async fn connect(&self, config: &EtcdConfig) -> Result<etcd_client::Client, EtcdError> {
        use std::sync::atomic::Ordering;
        let (client, used) = connect(config, self.0.load(Ordering::Relaxed)).await?;
        self.0.store(used + 1, Ordering::Relaxed);
        Ok(client)
    }
}

/// Runs `session` again and again until `stop` turns true (or a session ends without an
/// error), telling `failed` of each error: at once after a session that ran over ten
/// seconds, else after a backoff from 100 ms doubling up to 2 s.
pub async fn run_sessions<E, Fut>(
    mut stop: tokio::sync::watch::Receiver<bool>,
    mut session: impl FnMut() -> Fut,
    mut failed: impl FnMut(&E),
) where
    Fut: std::future::Future<Output = Result<(), E>>,
{
    let mut backoff = Duration::from_millis(100);
    loop {
        if *stop.borrow() {
            return;
        }
        let started = std::time::Instant::now();
        let e = tokio::select! {
            r = session() => match r {
                Ok(()) => return,
                Err(e) => e,
            },
            _ = stop.changed() => return,
        };
        failed(&e);
        if started.elapsed() > Duration::from_secs(10) {
            backoff = Duration::from_millis(100);
        }
        tokio::select! {
            _ = tokio::time::sleep(backoff) => {}
            _ = stop.changed() => return,
        }
        backoff = (backoff * 2).min(Duration::from_secs(2));
    }
}

/// Keys read per request when listing a prefix: far below gRPC's 4 MiB message limit for
/// instances of a few hundred bytes.
const PAGE: i64 = 2000;

/// Every key under `prefix` (with values unless `keys_only`), at one revision, read in pages
/// so that no answer outgrows gRPC's message limit however many there are. Returns the
/// revision and the keys, in key order.
pub async fn list_prefix(
    client: &mut etcd_client::Client,
    prefix: &str,
    keys_only: bool,
) -> Result<(i64, Vec<etcd_client::KeyValue>), EtcdError> {
    let end = prefix_end(prefix.as_bytes());
    let mut out = Vec::new();
    let mut from = prefix.as_bytes().to_vec();
    let mut revision = 0;
    loop {
        let mut options = etcd_client::GetOptions::new()
            .with_range(end.clone())
            .with_limit(PAGE);
        if revision > 0 {
            options = options.with_revision(revision);
        }
        if keys_only {
            options = options.with_keys_only();
        }
        let mut page = client.get(from.clone(), Some(options)).await?;
        if revision == 0 {
            revision = page.header().map_or(0, |h| h.revision());
        }
        let more = page.more();
        let kvs = page.take_kvs();
        let Some(last) = kvs.last() else { break };
        // The next page starts just after the last key of this one.
        from = last.key().to_vec();
        from.push(0);
        out.extend(kvs);
        if !more {
            break;
        }
    }
    Ok((revision, out))
}

/// The first key after every key that starts with `prefix` (etcd's range end for a prefix).
fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    // All 0xff: to the end of the keyspace.
    vec![0]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_prefix_ends_just_after_its_last_key() {
        assert_eq!(prefix_end(b"/waymark/"), b"/waymark0");
        assert_eq!(prefix_end(b"a\xff"), b"b");
        assert_eq!(prefix_end(b"\xff\xff"), vec![0]);
    }

    fn valid() -> EtcdConfig {
        EtcdConfig {
            endpoints: vec!["http://127.0.0.1:2379".into()],
            ..EtcdConfig::default()
        }
    }

    #[test]
    fn defaults_are_off_and_valid() {
        let c = EtcdConfig::default();
        assert!(!c.enabled());
        c.validate().unwrap();
        valid().validate().unwrap();
        assert!(!valid().node().is_empty());
    }

    #[test]
    fn bad_settings_are_refused_with_the_reason() {
        type Change = fn(&mut EtcdConfig);
        let cases: Vec<(Change, &str)> = vec![
            (
                |c| c.endpoints = vec!["127.0.0.1:2379".into()],
                "http://HOST:PORT",
            ),
            (
                |c| c.endpoints = vec!["http://host".into()],
                "http://HOST:PORT",
            ),
            (|c| c.endpoints = vec!["https://h:2379".into()], "ca_file"),
            (|c| c.prefix = "waymark".into(), "prefix"),
            (|c| c.node_name = Some("a/b".into()), "node_name"),
            (|c| c.lease_ttl = Duration::from_secs(1), "lease_ttl"),
            (|c| c.request_timeout = Duration::ZERO, "request_timeout"),
            (|c| c.cert_file = Some("c.pem".into()), "key_file"),
            (|c| c.username = Some("u".into()), "password"),
            (|c| c.password = Some("p".into()), "username"),
        ];
        for (change, want) in cases {
            let mut c = valid();
            change(&mut c);
            let e = c.validate().unwrap_err().to_string();
            assert!(e.contains(want), "{e} should mention {want}");
        }
    }

    #[test]
    fn config_reads_from_toml_with_go_durations() {
        let c: EtcdConfig =
            toml_like(r#"{"endpoints": ["http://a:2379"], "lease_ttl": "15s", "node_name": "h1"}"#);
        assert_eq!(c.lease_ttl, Duration::from_secs(15));
        assert_eq!(c.node(), "h1");
        assert!(serde_json::from_str::<EtcdConfig>(r#"{"endpoint": []}"#).is_err());
    }

    fn toml_like(json: &str) -> EtcdConfig {
        serde_json::from_str(json).unwrap()
    }
}
