//! Following a registry into a local [`Mirror`]: the one place that knows how. Every Waymark
//! process that is not the registry of record keeps a mirror fed by a follower:
//!
//! - [`stream`]: a Waymark registry's change stream (`/v1/waymark/changes`), which the
//!   gateway and the forwarder follow on their local resolver;
//! - `etcd` (feature `etcd`): the registry of record for many hosts, which each host's
//!   resolver follows.
//!
//! Each follower reports the state of its link in a [`RegistryStatus`], keeps serving the
//! last good state while the source is away, and resumes without losing a change.
//!
//! [`Mirror`]: crate::Mirror

#[cfg(feature = "etcd")]
pub mod etcd;
pub mod stream;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::Mirror;

/// What a follower knows about its link to the registry it follows.
#[derive(Debug, Default)]
pub struct RegistryStatus {
    connected: AtomicBool,
    synced: AtomicBool,
    failures: AtomicU64,
    last_ok: Mutex<Option<Instant>>,
    last_error: Mutex<Option<String>>,
}

impl RegistryStatus {
    /// The last poll succeeded.
    pub fn connected(&self) -> bool {
        self.connected.load(Ordering::Acquire)
    }

    /// At least one full state has been received since start.
    pub fn synced(&self) -> bool {
        self.synced.load(Ordering::Acquire)
    }

    /// Failed polls since start.
    pub fn failures(&self) -> u64 {
        self.failures.load(Ordering::Relaxed)
    }

    /// Time since the registry last answered; none before the first answer.
    pub fn since_last_ok(&self) -> Option<Duration> {
        self.last_ok
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .map(|t| t.elapsed())
    }

    pub fn last_error(&self) -> Option<String> {
        self.last_error
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    pub(crate) fn ok(&self) {
        *self.last_ok.lock().unwrap_or_else(|e| e.into_inner()) = Some(Instant::now());
        self.connected.store(true, Ordering::Release);
        self.synced.store(true, Ordering::Release);
    }

    pub(crate) fn failed(&self, e: &dyn std::fmt::Display) {
        self.failures.fetch_add(1, Ordering::Relaxed);
        self.connected.store(false, Ordering::Release);
        *self.last_error.lock().unwrap_or_else(|e| e.into_inner()) = Some(e.to_string());
    }
}

/// Called after every applied batch that changed something.
pub type OnChange = Arc<dyn Fn(&Mirror) + Send + Sync>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_tracks_link_state() {
        let s = RegistryStatus::default();
        assert!(!s.synced() && !s.connected());
        assert!(s.since_last_ok().is_none());
        s.ok();
        assert!(s.synced() && s.connected());
        s.failed(&"registry unreachable: refused");
        assert!(s.synced(), "a synced mirror stays synced");
        assert!(!s.connected());
        assert_eq!(s.failures(), 1);
        assert!(s.last_error().unwrap().contains("refused"));
    }
}
