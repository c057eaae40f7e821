//! Health check tasks: one task per check, probing on its interval (HTTP, TCP) or watching its
//! deadline (TTL), and reporting each result to the [`Registry`], which applies hysteresis.
//!
//! HTTP: 2xx is passing, 429 warning, anything else (or no answer in time) critical.
//! TCP: a completed connect is passing. TTL: critical as soon as the deadline passes without a
//! heartbeat; the task sleeps until exactly that deadline, so expiry is not rounded to a tick.

use std::collections::BTreeMap;
use std::sync::Weak;
use std::time::Duration;

use tokio::task::AbortHandle;
use tokio::time::Instant;
use waymark_shared::Health;

use super::def::{CheckDef, CheckKind};
use super::Registry;
use crate::config::HealthConfig;

/// When and for how long a check probes.
#[derive(Debug, Clone, Copy)]
pub struct Timing {
    pub interval: Duration,
    pub timeout: Duration,
}

impl Timing {
    /// The check's own interval and timeout, or the defaults; each raised to its floor
    /// (`min_interval`, `min_timeout`), and the timeout never above the interval.
    pub fn of(def: &CheckDef, defaults: &HealthConfig) -> Timing {
        let interval = def
            .interval
            .unwrap_or(defaults.default_interval)
            .max(defaults.min_interval);
        let timeout = def
            .timeout
            .unwrap_or(defaults.default_timeout)
            .max(defaults.min_timeout)
            .min(interval);
        Timing { interval, timeout }
    }
}

/// Starts the task of one check on `runtime`. It stops by itself once the check is gone or
/// replaced.
#[allow(clippy::too_many_arguments)]
pub fn spawn(
    runtime: &tokio::runtime::Handle,
    registry: Weak<Registry>,
    check_id: String,
    generation: u64,
    kind: CheckKind,
    timing: Timing,
    headers: BTreeMap<String, Vec<String>>,
    http: reqwest::Client,
) -> AbortHandle {
    let task = async move {
        match kind {
            CheckKind::Ttl { .. } => watch_ttl(registry, check_id, generation).await,
            probe => {
                let mut next = Instant::now();
                loop {
                    let (status, output) = run_probe(&probe, timing.timeout, &headers, &http).await;
                    let Some(reg) = registry.upgrade() else {
                        return;
                    };
                    reg.probe_result(&check_id, generation, status, output);
                    drop(reg);
                    next += timing.interval;
                    let now = Instant::now();
                    if next < now {
                        next = now;
                    }
                    tokio::time::sleep_until(next).await;
                }
            }
        }
    };
    runtime.spawn(task).abort_handle()
}

/// How long an expired TTL check whose expiry was undone waits before recording it again.
const TTL_RETRY: Duration = Duration::from_secs(1);

/// What a TTL check's task watches: see [`Registry::ttl_state`].
pub(super) struct TtlState {
    pub deadline: std::time::Instant,
    pub notify: std::sync::Arc<tokio::sync::Notify>,
    pub recorded: bool,
    pub deregister_at: Option<std::time::Instant>,
}

async fn watch_ttl(registry: Weak<Registry>, check_id: String, generation: u64) {
    loop {
        let Some(reg) = registry.upgrade() else {
            return;
        };
        let Some(ttl) = reg.ttl_state(&check_id, generation) else {
            return;
        };
        let notified = ttl.notify.notified();
        let now = std::time::Instant::now();
        if now >= ttl.deadline {
            if ttl.recorded {
                match ttl.deregister_at {
                    // Deregistered when due, to the millisecond (a Eureka lease).
                    Some(at) if now >= at => {
                        reg.reap_check(&check_id, generation);
                        drop(reg);
                        tokio::select! {
                            _ = tokio::time::sleep(TTL_RETRY) => {}
                            _ = notified => {}
                        }
                    }
                    Some(at) => {
                        drop(reg);
                        tokio::select! {
                            _ = tokio::time::sleep_until(Instant::from_std(at)) => {}
                            _ = notified => {}
                        }
                    }
                    None => {
                        drop(reg);
                        notified.await;
                    }
                }
                continue;
            }
            reg.ttl_expired(&check_id, generation);
            // Recorded, and its instance to be deregistered: see to that at once.
            if reg
                .ttl_state(&check_id, generation)
                .is_some_and(|t| t.recorded && t.deregister_at.is_some())
            {
                continue;
            }
            drop(reg);
            // Until a heartbeat; but look again in a while: an expiry the store could not
            // write is undone, and must be recorded once it can.
            tokio::select! {
                _ = tokio::time::sleep(TTL_RETRY) => {}
                _ = notified => {}
            }
            continue;
        }
        drop(reg);
        tokio::select! {
            _ = tokio::time::sleep_until(Instant::from_std(ttl.deadline)) => {}
            _ = notified => {}
        }
    }
}

/// Runs one probe and says what it found.
pub async fn run_probe(
    kind: &CheckKind,
    timeout: Duration,
    headers: &BTreeMap<String, Vec<String>>,
    http: &reqwest::Client,
) -> (Health, String) {
    match kind {
        CheckKind::Http { url, method } => {
            let method =
                reqwest::Method::from_bytes(method.as_bytes()).unwrap_or(reqwest::Method::GET);
            let mut req = http.request(method.clone(), url).timeout(timeout);
            for (name, values) in headers {
                for v in values {
                    req = req.header(name, v);
                }
            }
            match req.send().await {
                Ok(resp) => {
                    let code = resp.status();
                    let status = if code.is_success() {
                        Health::Passing
                    } else if code.as_u16() == 429 {
                        Health::Warning
                    } else {
                        Health::Critical
                    };
                    (status, format!("HTTP {method} {url}: {code}"))
                }
                Err(e) if e.is_timeout() => (
                    Health::Critical,
                    format!("HTTP {method} {url}: timed out after {timeout:?}"),
                ),
                Err(e) => (
                    Health::Critical,
                    format!("HTTP {method} {url}: {}", root_cause(&e)),
                ),
            }
        }
        CheckKind::Tcp { addr } => {
            match tokio::time::timeout(timeout, tokio::net::TcpStream::connect(addr.as_str())).await
            {
                Ok(Ok(_)) => (Health::Passing, format!("TCP connect {addr}: Success")),
                Ok(Err(e)) => (Health::Critical, format!("TCP connect {addr}: {e}")),
                Err(_) => (
                    Health::Critical,
                    format!("TCP connect {addr}: timed out after {timeout:?}"),
                ),
            }
        }
        CheckKind::Ttl { .. } => (Health::Critical, "TTL checks are not probed".into()),
        CheckKind::External => (
            Health::Critical,
            "checks set from outside are not probed".into(),
        ),
    }
}

fn root_cause(e: &(dyn std::error::Error + 'static)) -> String {
    let mut cause = e;
    while let Some(next) = cause.source() {
        cause = next;
    }
    cause.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn tcp_probe_sees_a_listener_come_and_go() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let kind = CheckKind::Tcp { addr };
        let client = reqwest::Client::new();
        let t = Duration::from_secs(1);
        let (s, _) = run_probe(&kind, t, &BTreeMap::new(), &client).await;
        assert_eq!(s, Health::Passing);
        drop(listener);
        let (s, out) = run_probe(&kind, t, &BTreeMap::new(), &client).await;
        assert_eq!(s, Health::Critical, "{out}");
    }

    #[test]
    fn timing_takes_the_checks_own_values_within_the_floors() {
        let ms = Duration::from_millis;
        let defaults = HealthConfig {
            default_interval: ms(10_000),
            default_timeout: ms(5_000),
            min_interval: ms(1_000),
            min_timeout: ms(1_000),
            ..HealthConfig::default()
        };
        // (interval, timeout) asked → (interval, timeout) used.
        let cases = [
            ((None, None), (10_000, 5_000)),
            ((Some(2_000), Some(500)), (2_000, 1_000)),
            ((Some(200), None), (1_000, 1_000)),
            ((Some(1), Some(1)), (1_000, 1_000)),
            ((Some(3_000), Some(9_000)), (3_000, 3_000)),
            ((Some(60_000), Some(2_000)), (60_000, 2_000)),
        ];
        for ((interval, timeout), (want_i, want_t)) in cases {
            let def = CheckDef {
                interval: interval.map(ms),
                timeout: timeout.map(ms),
                ..CheckDef::default()
            };
            let t = Timing::of(&def, &defaults);
            assert_eq!(
                (t.interval, t.timeout),
                (ms(want_i), ms(want_t)),
                "{interval:?} {timeout:?}"
            );
        }
    }

    #[test]
    fn timeout_is_capped_at_the_interval() {
        let def = CheckDef {
            interval: Some(Duration::from_secs(1)),
            timeout: Some(Duration::from_secs(30)),
            ..Default::default()
        };
        let t = Timing::of(&def, &HealthConfig::default());
        assert_eq!(t.timeout, Duration::from_secs(1));
    }
}
