//! The forwarder's own registration (see `waymark_shared::forwarders`): once its listeners
//! for the current state are up it registers as an instance of `waymark-forwarder` named
//! after the host, with a TTL check it heartbeats every third of the TTL. A heartbeat the
//! registry does not know (it lost the registration) registers again; a registry that does
//! not answer is retried, counted and shown in readiness, while the listeners keep serving.
//! On shutdown the registration is removed first, so resolvers stop answering VIPs before
//! the listeners close.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use serde_json::json;
use waymark_shared::forwarders;

use super::config::ForwarderConfig;

#[derive(Debug, thiserror::Error)]
pub enum AnnounceError {
    #[error("registry unreachable: {0}")]
    Unreachable(String),
    #[error("registry answered {status}: {body}")]
    Status { status: u16, body: String },
}

/// How the registration stands, for readiness and metrics.
#[derive(Debug, Default)]
pub struct AnnounceStatus {
    registered: AtomicBool,
    last_error: Mutex<Option<String>>,
}

impl AnnounceStatus {
    pub fn registered(&self) -> bool {
        self.registered.load(Ordering::Acquire)
    }

    pub fn last_error(&self) -> Option<String> {
        self.last_error
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    fn set(&self, ok: bool, error: Option<String>) {
        self.registered.store(ok, Ordering::Release);
        *self.last_error.lock().unwrap_or_else(|e| e.into_inner()) = error;
    }
}

/// Registers, heartbeats and deregisters the forwarder.
pub struct Announcer {
    http: reqwest::Client,
    base: String,
    /// The service ID, `waymark-forwarder-<host>`.
    pub id: String,
    check_id: String,
    body: serde_json::Value,
    pub ttl: Duration,
}

impl Announcer {
    /// `inbound_port`: the mesh listener's port (0 when the forwarder is outside the mesh).
    pub fn new(config: &ForwarderConfig, inbound_port: u16) -> Announcer {
        let id = format!("{}-{}", forwarders::SERVICE, config.host_name);
        let check_id = format!("{id}:ttl");
        let addresses: Vec<String> = config
            .announced_addresses()
            .iter()
            .map(|a| a.to_string())
            .collect();
        let ttl = config.announce.ttl;
        let body = json!({
            "Name": forwarders::SERVICE,
            "ID": id,
            "Address": config.advertise_address.to_string(),
            "Port": inbound_port,
            "Meta": {
                forwarders::META_HOST: config.host_name,
                forwarders::META_ADDRESSES: addresses.join(","),
            },
            "Check": {
                "CheckID": check_id,
                "Name": "forwarder heartbeat",
                "TTL": waymark_shared::duration::format(ttl),
                "Status": "passing",
            },
        });
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(2))
            .timeout(Duration::from_secs(5))
            .build()
            .unwrap_or_else(|_| reqwest::Client::new());
        Announcer {
            http,
            base: config.registry.trim_end_matches('/').to_string(),
            id,
            check_id,
            body,
            ttl,
        }
    }

    async fn put(&self, path: &str, body: Option<&serde_json::Value>) -> Result<(), AnnounceError> {
        let mut req = self.http.put(format!("{}{path}", self.base));
        if let Some(b) = body {
            req = req.json(b);
        }
        let resp = req
            .send()
            .await
            .map_err(|e| AnnounceError::Unreachable(e.to_string()))?;
        let status = resp.status();
        if status.is_success() {
            return Ok(());
        }
        let body = resp.text().await.unwrap_or_default();
        Err(AnnounceError::Status {
            status: status.as_u16(),
            body: body.chars().take(200).collect(),
        })
    }

    pub async fn register(&self) -> Result<(), AnnounceError> {
        self.put("/v1/agent/service/register", Some(&self.body))
            .await
    }

    pub async fn heartbeat(&self) -> Result<(), AnnounceError> {
        let path = format!("/v1/agent/check/pass/{}", encode(&self.check_id));
        self.put(&path, None).await
    }

    pub async fn deregister(&self) -> Result<(), AnnounceError> {
        let path = format!("/v1/agent/service/deregister/{}", encode(&self.id));
        self.put(&path, None).await
    }

    /// Registers, then heartbeats every third of the TTL, until `stop` turns true. Failures
    /// are retried every second until the registry answers again.
    pub async fn run(
        &self,
        status: &AnnounceStatus,
        on_success: impl Fn(),
        on_failure: impl Fn(),
        mut stop: tokio::sync::watch::Receiver<bool>,
    ) {
        let every = (self.ttl / 3).max(Duration::from_millis(300));
        let mut registered = false;
        loop {
            if *stop.borrow() {
                return;
            }
            let result = if registered {
                match self.heartbeat().await {
                    Err(AnnounceError::Status { status: 404, .. }) => {
                        tracing::warn!(id = %self.id, "the registry lost the forwarder's registration; registering again");
                        self.register().await
                    }
                    r => r,
                }
            } else {
                self.register().await
            };
            let wait = match result {
                Ok(()) => {
                    if !registered || !status.registered() {
                        tracing::info!(id = %self.id, "registered with the registry");
                    }
                    registered = true;
                    status.set(true, None);
                    on_success();
                    every
                }
                Err(e) => {
                    if status.registered() || status.last_error().is_none() {
                        tracing::warn!(id = %self.id, error = %e, "cannot register or heartbeat; retrying");
                    }
                    status.set(false, Some(e.to_string()));
                    on_failure();
                    every.min(Duration::from_secs(1))
                }
            };
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = stop.wait_for(|s| *s) => return,
            }
        }
    }
}

/// Percent-encodes what is not unreserved in a URL path segment.
fn encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use waymark_shared::forwarders::ForwarderInfo;
    use waymark_shared::Instance;

    use super::*;

    #[test]
    fn the_registration_reads_back_as_a_forwarder() {
        let config = ForwarderConfig {
            host_name: "host-a".into(),
            advertise_address: "10.0.0.2".parse().unwrap(),
            host_addresses: vec!["10.0.1.2".parse().unwrap()],
            ..ForwarderConfig::default()
        };
        let a = Announcer::new(&config, 15008);
        assert_eq!(a.id, "waymark-forwarder-host-a");
        assert_eq!(a.body["Port"], 15008, "the inbound listener's port");
        assert_eq!(a.body["Check"]["TTL"], "10s");
        // What the registry stores, read as every resolver reads it.
        let b = &a.body;
        let inst = Instance {
            id: a.id.as_str().into(),
            service: b["Name"].as_str().unwrap().into(),
            address: b["Address"].as_str().unwrap().into(),
            port: b["Port"].as_u64().unwrap() as u16,
            tags: vec![],
            meta: serde_json::from_value(b["Meta"].clone()).unwrap(),
            weight_passing: 1,
            weight_warning: 1,
            checks: vec![],
            draining: false,
            node: None,
            create_index: 0,
            modify_index: 0,
            extra: None,
        };
        let info = ForwarderInfo::from_instance(&inst).unwrap();
        assert_eq!(info.host, "host-a");
        assert_eq!(info.inbound, "10.0.0.2:15008".parse().unwrap());
        assert_eq!(
            info.addresses,
            [
                "10.0.0.2".parse::<std::net::IpAddr>().unwrap(),
                "10.0.1.2".parse().unwrap()
            ]
        );
        assert_eq!(
            encode("waymark-forwarder-a:ttl"),
            "waymark-forwarder-a%3Attl"
        );
    }

    #[tokio::test]
    async fn an_unreachable_registry_is_an_error_not_a_panic() {
        let config = ForwarderConfig {
            host_name: "h".into(),
            registry: "http://127.0.0.1:9".into(),
            ..ForwarderConfig::default()
        };
        let a = Announcer::new(&config, 0);
        assert!(matches!(
            a.register().await,
            Err(AnnounceError::Unreachable(_))
        ));
    }
}
