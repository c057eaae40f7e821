//! Follows a Waymark registry's change stream (a resolver's HTTP API) into a local
//! [`Mirror`]: how the gateway and the forwarder follow their resolver.
//!
//! `GET /v1/waymark/changes?index=N&wait=…` is a long poll that answers with what changed
//! after index `N`. The client keeps the last index it applied, so a reconnect resumes where
//! it left off and misses nothing: the registry answers from its change log, or with
//! `reset: true` and the whole state when the log no longer reaches back that far (or when it
//! restarted with another history). While the registry is unreachable the mirror keeps the
//! last good state, the status says so, and the client retries with a growing backoff.

use std::sync::Arc;
use std::time::Duration;

use super::{OnChange, RegistryStatus};
use crate::{Changes, Mirror};

#[derive(Debug, thiserror::Error)]
pub enum MirrorError {
    #[error("registry unreachable: {0}")]
    Unreachable(String),
    #[error("registry answered {status}: {body}")]
    Status { status: u16, body: String },
    #[error("registry sent a change batch that does not parse: {0}")]
    Decode(String),
}

pub struct MirrorClient {
    base: String,
    mirror: Arc<Mirror>,
    status: Arc<RegistryStatus>,
    on_change: OnChange,
    wait: Duration,
    http: reqwest::Client,
}

impl MirrorClient {
    pub fn new(
        registry: &str,
        mirror: Arc<Mirror>,
        status: Arc<RegistryStatus>,
        on_change: OnChange,
        wait: Duration,
    ) -> MirrorClient {
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(2))
            .timeout(wait + Duration::from_secs(10))
            .build()
            .unwrap_or_else(|_| reqwest::Client::new());
        MirrorClient {
            base: registry.trim_end_matches('/').to_string(),
            mirror,
            status,
            on_change,
            wait,
            http,
        }
    }

    /// One long poll from `index`.
    pub async fn poll(&self, index: u64) -> Result<Changes, MirrorError> {
        let url = format!(
            "{}/v1/waymark/changes?index={index}&wait={}ms",
            self.base,
            self.wait.as_millis()
        );
        let resp = self
            .http
            .get(&url)
            .send()
            .await
            .map_err(|e| MirrorError::Unreachable(e.to_string()))?;
        let status = resp.status();
        if !status.is_success() {
            let body = resp.text().await.unwrap_or_default();
            return Err(MirrorError::Status {
                status: status.as_u16(),
                body: body.chars().take(200).collect(),
            });
        }
        let bytes = resp
            .bytes()
            .await
            .map_err(|e| MirrorError::Unreachable(e.to_string()))?;
        serde_json::from_slice(&bytes).map_err(|e| MirrorError::Decode(e.to_string()))
    }

    /// Follows the stream until `stop` turns true.
    pub async fn run(&self, mut stop: tokio::sync::watch::Receiver<bool>) {
        // Index 0 asks for the whole state; afterwards, the last index applied.
        let mut index = 0u64;
        let mut backoff = Duration::from_millis(100);
        loop {
            if *stop.borrow() {
                return;
            }
            let result = tokio::select! {
                r = self.poll(index) => r,
                _ = stop.changed() => return,
            };
            match result {
                Ok(changes) => {
                    let was_connected = self.status.connected();
                    let changed = changes.reset
                        || !changes.services.is_empty()
                        || !changes.removed.is_empty()
                        || changes.index != index;
                    if changed {
                        self.mirror.apply(&changes);
                        (self.on_change)(&self.mirror);
                    }
                    index = changes.index;
                    self.status.ok();
                    backoff = Duration::from_millis(100);
                    if !was_connected {
                        tracing::info!(index, reset = changes.reset, "registry connected");
                    }
                }
                Err(e) => {
                    if self.status.connected() || self.status.failures() == 0 {
                        tracing::warn!(error = %e, "registry poll failed; serving the last good state");
                    } else {
                        tracing::debug!(error = %e, "registry poll failed again");
                    }
                    self.status.failed(&e);
                    tokio::select! {
                        _ = tokio::time::sleep(backoff) => {}
                        _ = stop.changed() => return,
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(2));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn an_unreachable_registry_is_an_error_not_a_panic() {
        let c = MirrorClient::new(
            "http://127.0.0.1:9",
            Arc::new(Mirror::new(0)),
            Arc::new(RegistryStatus::default()),
            Arc::new(|_| {}),
            Duration::from_millis(100),
        );
        assert!(matches!(c.poll(0).await, Err(MirrorError::Unreachable(_))));
    }
}
