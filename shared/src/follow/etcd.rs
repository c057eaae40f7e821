//! Follows the registry in etcd into a local [`Mirror`].
//!
//! It lists every instance key at one revision, makes the mirror equal to that listing
//! (removals included: whatever the mirror holds that etcd does not is dropped), then watches
//! the prefix from the next revision. A broken watch, a compacted revision (the watch is
//! cancelled), a watch that stops showing progress, or an event that cannot be read starts
//! over from a new listing, so no change is ever lost and a follower that was away converges.
//! While etcd is unreachable the mirror keeps the last good state and the status says so.
//!
//! The mirror's change index is etcd's revision: every host's mirror of one cluster counts
//! alike, and followers of this mirror (the gateway, the forwarders) resume from it.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use compact_str::CompactString;
use etcd_client::{EventType, GetOptions, WatchOptions};

use super::{OnChange, RegistryStatus};
use crate::etcd::keys::{decode_instance, Key, Layout};
use crate::etcd::{EtcdConfig, EtcdError};
use crate::mirror::{Changes, ServiceView};
use crate::{Instance, Mirror};

#[derive(Debug, thiserror::Error)]
pub enum FollowError {
    #[error(transparent)]
    Etcd(#[from] EtcdError),
    #[error("etcd: {0}")]
    Client(#[from] etcd_client::Error),
    #[error("the watch ended")]
    WatchEnded,
    #[error("the watch was cancelled: revision {0} is compacted; listing again")]
    Compacted(i64),
    #[error("the watch was cancelled: {0}")]
    Cancelled(String),
    #[error("the watch showed no progress for {0:?}; listing again")]
    Stuck(Duration),
}

/// Counters of what the follower did, for metrics.
#[derive(Debug, Default)]
pub struct FollowStats {
    /// Full listings (the first one, and one after every broken watch).
    pub listings: AtomicU64,
    /// Watch events applied.
    pub events: AtomicU64,
    /// Keys under the prefix whose value could not be read (left out, and logged).
    pub bad_values: AtomicU64,
    /// The last etcd revision the mirror is known to be complete at.
    pub revision: AtomicU64,
}

/// Who wrote each instance, by (lowercased service, ID): a key deleted by a host that no
/// longer owns the instance (another host registered the same ID since) removes nothing.
type Owners = HashMap<(CompactString, CompactString), String>;

pub struct EtcdFollower {
    config: EtcdConfig,
    /// The endpoint the next session tries first.
    member: AtomicUsize,
    layout: Layout,
    mirror: Arc<Mirror>,
    status: Arc<RegistryStatus>,
    stats: Arc<FollowStats>,
    on_change: OnChange,
}

impl EtcdFollower {
    pub fn new(
        config: EtcdConfig,
        mirror: Arc<Mirror>,
        status: Arc<RegistryStatus>,
        stats: Arc<FollowStats>,
        on_change: OnChange,
    ) -> Result<EtcdFollower, EtcdError> {
        let layout = config.layout()?;
        Ok(EtcdFollower {
            config,
            // Hosts spread over the members from the start.
            member: AtomicUsize::new(std::process::id() as usize),
            layout,
            mirror,
            status,
            stats,
            on_change,
        })
    }

    /// Follows etcd until `stop` turns true.
    pub async fn run(&self, mut stop: tokio::sync::watch::Receiver<bool>) {
        let mut backoff = Duration::from_millis(100);
        loop {
            if *stop.borrow() {
                return;
            }
            let started = Instant::now();
            let result = tokio::select! {
                r = self.follow() => r,
                _ = stop.changed() => return,
            };
            let e = match result {
                Ok(()) => return,
                Err(e) => e,
            };
            if self.status.connected() {
                tracing::warn!(error = %e, "etcd follower: serving the last good state; starting again");
            } else {
                tracing::debug!(error = %e, "etcd follower: still failing");
            }
            self.status.failed(&e);
            // A watch that ran a while starts again at once; repeated failures back off.
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

    /// One listing, then the watch until it fails.
    async fn follow(&self) -> Result<(), FollowError> {
        let start = self.member.load(Ordering::Relaxed);
        let (mut client, member) = crate::etcd::connect(&self.config, start).await?;
        // The next session starts with the next member, whatever ends this one.
        self.member.store(member + 1, Ordering::Relaxed);
        let prefix = self.layout.instances();
        let listing = client
            .get(prefix.as_str(), Some(GetOptions::new().with_prefix()))
            .await?;
        let revision = listing.header().map_or(0, |h| h.revision());
        let mut owners = Owners::new();
        let mut wanted: HashMap<CompactString, Vec<Arc<Instance>>> = HashMap::new();
        for kv in listing.kvs() {
            let Some((node, instance)) = self.read(kv.key(), kv.value()) else {
                continue;
            };
            let key = (lower(&instance.service), instance.id.clone());
            if let Some(previous) = owners.insert(key, node) {
                tracing::warn!(service = %instance.service, id = %instance.id, %previous, "two hosts registered one instance ID; the last listed wins");
                let list = wanted.entry(lower(&instance.service)).or_default();
                list.retain(|i| i.id != instance.id);
            }
            wanted
                .entry(lower(&instance.service))
                .or_default()
                .push(Arc::new(instance));
        }
        self.install(revision, wanted);
        self.stats.listings.fetch_add(1, Ordering::Relaxed);
        self.stats
            .revision
            .store(revision as u64, Ordering::Relaxed);
        self.status.ok();
        tracing::info!(revision, instances = owners.len(), "etcd follower: listed");

        let options = WatchOptions::new()
            .with_prefix()
            .with_start_revision(revision + 1)
            .with_progress_notify();
        let mut stream = client.watch(prefix.as_str(), Some(options)).await?;
        let every = self.config.progress_interval;
        let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
        let mut heard = Instant::now();
        loop {
            tokio::select! {
                message = stream.message() => {
                    let Some(resp) = message? else {
                        return Err(FollowError::WatchEnded);
                    };
                    if resp.canceled() {
                        if resp.compact_revision() > 0 {
                            return Err(FollowError::Compacted(resp.compact_revision()));
                        }
                        return Err(FollowError::Cancelled(resp.cancel_reason().to_string()));
                    }
                    heard = Instant::now();
                    let mut changed = false;
                    for event in resp.events() {
                        let Some(kv) = event.kv() else { continue };
                        let at = kv.mod_revision().max(0) as u64;
                        changed |= match event.event_type() {
                            EventType::Put => self.put(&mut owners, at, kv.key(), kv.value()),
                            EventType::Delete => self.delete(&mut owners, at, kv.key()),
                        };
                        self.stats.events.fetch_add(1, Ordering::Relaxed);
                    }
                    // A response without events is progress: every change up to its revision
                    // has been delivered.
                    if resp.events().is_empty() {
                        if let Some(h) = resp.header() {
                            self.mirror.advance_to(h.revision().max(0) as u64);
                        }
                    }
                    self.stats.revision.store(self.mirror.index(), Ordering::Relaxed);
                    self.status.ok();
                    if changed {
                        (self.on_change)(&self.mirror);
                    }
                }
                _ = tick.tick() => {
                    let silent = heard.elapsed();
                    if silent > every * 3 {
                        return Err(FollowError::Stuck(silent));
                    }
                    stream.request_progress().await?;
                }
            }
        }
    }

    /// The node and instance of a key and value; `None` (logged, counted) for a value that
    /// cannot be read, and silently for keys outside the layout.
    fn read(&self, key: &[u8], value: &[u8]) -> Option<(String, Instance)> {
        let parsed = self.layout.parse(key)?;
        match decode_instance(&parsed, value) {
            Ok(instance) => {
                let Key::Instance { node, .. } = parsed;
                Some((node, instance))
            }
            Err(e) => {
                self.stats.bad_values.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(key = %String::from_utf8_lossy(key), error = %e, "etcd follower: a value that does not read as an instance; left out");
                None
            }
        }
    }

    /// Makes the mirror equal to a listing, at its revision.
    fn install(&self, revision: i64, wanted: HashMap<CompactString, Vec<Arc<Instance>>>) {
        let index = (revision.max(0) as u64).max(self.mirror.index());
        let services = wanted
            .into_values()
            .filter_map(|instances| {
                let name = instances.first()?.service.clone();
                let attrs = self
                    .mirror
                    .service(&name)
                    .map(|v| v.attrs.clone())
                    .unwrap_or_default();
                Some(ServiceView {
                    name,
                    index,
                    instances,
                    attrs,
                })
            })
            .collect();
        self.mirror.apply(&Changes {
            index,
            reset: true,
            services,
            removed: Vec::new(),
        });
        (self.on_change)(&self.mirror);
    }

    fn put(&self, owners: &mut Owners, at: u64, key: &[u8], value: &[u8]) -> bool {
        let Some((node, instance)) = self.read(key, value) else {
            return false;
        };
        owners.insert((lower(&instance.service), instance.id.clone()), node);
        self.mirror.upsert_at(at, instance);
        true
    }

    fn delete(&self, owners: &mut Owners, at: u64, key: &[u8]) -> bool {
        let Some(Key::Instance { node, service, id }) = self.layout.parse(key) else {
            return false;
        };
        let owner = (lower(&service), CompactString::from(id.as_str()));
        if owners.get(&owner) != Some(&node) {
            // Another host owns this ID now (or nothing does): its key stays.
            return false;
        }
        owners.remove(&owner);
        self.mirror.remove_at(at, &service, &id);
        true
    }
}

fn lower(s: &str) -> CompactString {
    let mut k = CompactString::from(s);
    k.make_ascii_lowercase();
    k
}
