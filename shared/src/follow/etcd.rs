//! Follows the registry in etcd into a local [`Mirror`].
//!
//! It lists every key of the registry (instances and VIPs) at one revision, makes the
//! mirror equal to that listing
//! (removals included: whatever the mirror holds that etcd does not is dropped), then watches
//! the prefix from the next revision. A broken watch, a compacted revision (the watch is
//! cancelled), a watch that stops showing progress, or an event that cannot be read starts
//! over from a new listing, so no change is ever lost and a follower that was away converges.
//! While etcd is unreachable the mirror keeps the last good state and the status says so.
//!
//! The mirror's change index is etcd's revision: every host's mirror of one cluster counts
//! alike, and followers of this mirror (the gateway, the forwarders) resume from it.
//!
//! With a snapshot file ([`EtcdFollower::with_snapshot`]), the mirror is saved after every
//! listing and, when it changed, every five progress intervals, and [`load_snapshot`] puts
//! it back at start: a host restarted while etcd is away answers the last state it saw
//! rather than nothing, until etcd answers again.

use std::collections::{BTreeMap, HashMap};
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use compact_str::CompactString;
use etcd_client::{EventType, WatchOptions};

use super::{OnChange, RegistryStatus};
use crate::etcd::keys::{decode_instance, Key, Layout};
use crate::etcd::{EtcdConfig, EtcdError};
use crate::mirror::{Changes, ServiceView};
use crate::{Instance, Mirror, ServiceAttrs};

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

/// The VIPs in etcd: by lowercased service, by tag (`""` for the service's own).
type Vips = HashMap<CompactString, BTreeMap<CompactString, Ipv4Addr>>;

/// What the follower knows beyond the mirror: who owns each instance, and the VIPs (kept
/// for services that have no instance yet too).
#[derive(Default)]
struct Known {
    owners: Owners,
    vips: Vips,
}

pub struct EtcdFollower {
    config: EtcdConfig,
    /// Panic thresholds by lowercased service name: the rest of a service's attributes,
    /// which come from this host's config rather than from etcd.
    thresholds: HashMap<String, f64>,
    members: crate::etcd::Members,
    layout: Layout,
    mirror: Arc<Mirror>,
    status: Arc<RegistryStatus>,
    stats: Arc<FollowStats>,
    on_change: OnChange,
    /// Where the mirror is saved, if anywhere.
    snapshot: Option<PathBuf>,
}

/// Puts a saved mirror back (see [`EtcdFollower::with_snapshot`]); its revision, or `None`
/// when there is none or it cannot be read (then the mirror waits for etcd, and why is
/// logged).
pub fn load_snapshot(path: &Path, mirror: &Mirror) -> Option<u64> {
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return None,
        Err(e) => {
            tracing::warn!(path = %path.display(), error = %e, "cannot read the saved etcd mirror");
            return None;
        }
    };
    match serde_json::from_slice::<Changes>(&bytes) {
        Ok(changes) => {
            mirror.apply(&changes);
            Some(changes.index)
        }
        Err(e) => {
            tracing::warn!(path = %path.display(), error = %e, "the saved etcd mirror does not read; ignored");
            None
        }
    }
}

impl EtcdFollower {
    /// Saves the mirror to `path` as it follows (see the module's docs).
    pub fn with_snapshot(mut self, path: PathBuf) -> Self {
        self.snapshot = Some(path);
        self
    }

    /// Writes the mirror to the snapshot file, off the async threads.
    async fn save(&self) {
        let Some(path) = self.snapshot.clone() else {
            return;
        };
        let changes = self.mirror.changes_since(0);
        let saved = tokio::task::spawn_blocking(move || {
            let bytes = serde_json::to_vec(&changes).map_err(std::io::Error::other)?;
            crate::files::write_atomic(&path, &bytes, 0o600)
        })
        .await;
        match saved {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::warn!(error = %e, "cannot save the etcd mirror"),
            Err(e) => tracing::warn!(error = %e, "saving the etcd mirror failed"),
        }
    }

    pub fn new(
        config: EtcdConfig,
        thresholds: HashMap<String, f64>,
        mirror: Arc<Mirror>,
        status: Arc<RegistryStatus>,
        stats: Arc<FollowStats>,
        on_change: OnChange,
    ) -> Result<EtcdFollower, EtcdError> {
        let layout = config.layout()?;
        Ok(EtcdFollower {
            config,
            thresholds,
            members: Default::default(),
            layout,
            mirror,
            status,
            stats,
            on_change,
            snapshot: None,
        })
    }

    /// Follows etcd until `stop` turns true.
    pub async fn run(&self, stop: tokio::sync::watch::Receiver<bool>) {
        let failed = |e: &FollowError| {
            if self.status.connected() {
                tracing::warn!(error = %e, "etcd follower: serving the last good state; starting again");
            } else {
                tracing::debug!(error = %e, "etcd follower: still failing");
            }
            self.status.failed(e);
        };
        crate::etcd::run_sessions(stop, || self.follow(), failed).await;
    }

    /// One listing, then the watch until it fails.
    async fn follow(&self) -> Result<(), FollowError> {
        let mut client = self.members.connect(&self.config).await?;
        let prefix = self.layout.prefix().to_string();
        let (revision, kvs) = crate::etcd::list_prefix(&mut client, &prefix, false).await?;
        let mut known = Known::default();
        let mut wanted: HashMap<CompactString, Vec<Arc<Instance>>> = HashMap::new();
        for kv in &kvs {
            match self.layout.parse(kv.key()) {
                Some(Key::Vip { service, tag }) => {
                    if let Some(ip) = self.read_vip(kv.key(), kv.value()) {
                        let tag = CompactString::from(tag.unwrap_or_default());
                        known
                            .vips
                            .entry(lower(&service))
                            .or_default()
                            .insert(tag, ip);
                    }
                    continue;
                }
                Some(Key::Instance { .. }) => {}
                Some(Key::VipAddress) | None => continue,
            }
            let Some((node, instance)) = self.read(kv.key(), kv.value()) else {
                continue;
            };
            let service = lower(&instance.service);
            let list = wanted.entry(service.clone()).or_default();
            if let Some(previous) = known.owners.insert((service, instance.id.clone()), node) {
                tracing::warn!(service = %instance.service, id = %instance.id, %previous, "two hosts registered one instance ID; the last listed wins");
                list.retain(|i| i.id != instance.id);
            }
            list.push(Arc::new(instance));
        }
        self.install(revision, wanted, &known.vips);
        self.save().await;
        let mut saved = (Instant::now(), self.mirror.index());
        self.stats.listings.fetch_add(1, Ordering::Relaxed);
        self.stats
            .revision
            .store(revision as u64, Ordering::Relaxed);
        self.status.ok();
        tracing::info!(
            revision,
            instances = known.owners.len(),
            "etcd follower: listed"
        );

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
                            EventType::Put => self.put(&mut known, at, kv.key(), kv.value()),
                            EventType::Delete => self.delete(&mut known, at, kv.key()),
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
                    if saved.1 != self.mirror.index() && saved.0.elapsed() >= every * 5 {
                        self.save().await;
                        saved = (Instant::now(), self.mirror.index());
                    }
                }
            }
        }
    }

    /// The node and instance of a key and value; `None` (logged, counted) for a value that
    /// cannot be read, and silently for keys outside the layout.
    fn read(&self, key: &[u8], value: &[u8]) -> Option<(String, Instance)> {
        let parsed = self.layout.parse(key)?;
        match decode_instance(&parsed, value) {
            Ok(mut instance) => match parsed {
                Key::Instance { node, .. } => {
                    // The host whose key holds it is its node, unless the registration names
                    // one of its own (an external node, registered through the catalog).
                    if instance.node.is_none() {
                        instance.node = Some(node.as_str().into());
                    }
                    Some((node, instance))
                }
                _ => None,
            },
            Err(e) => {
                self.stats.bad_values.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(key = %String::from_utf8_lossy(key), error = %e, "etcd follower: a value that does not read as an instance; left out");
                None
            }
        }
    }

    /// Makes the mirror equal to a listing, at its revision.
    fn install(
        &self,
        revision: i64,
        wanted: HashMap<CompactString, Vec<Arc<Instance>>>,
        vips: &Vips,
    ) {
        let index = (revision.max(0) as u64).max(self.mirror.index());
        let services = wanted
            .into_iter()
            .filter_map(|(key, instances)| {
                let name = instances.first()?.service.clone();
                let attrs = self.attrs(vips, &key);
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

    /// A service's attributes: its VIPs from etcd, its panic threshold from the config.
    fn attrs(&self, vips: &Vips, service: &str) -> ServiceAttrs {
        ServiceAttrs {
            vips: vips.get(service).cloned().unwrap_or_default(),
            panic_threshold: self.thresholds.get(service).copied().unwrap_or(0.0),
        }
    }

    /// A VIP key's address; `None` (logged, counted) when the value is not one.
    fn read_vip(&self, key: &[u8], value: &[u8]) -> Option<Ipv4Addr> {
        let ip = std::str::from_utf8(value)
            .ok()
            .and_then(|v| v.trim().parse().ok());
        if ip.is_none() {
            self.stats.bad_values.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(key = %String::from_utf8_lossy(key), "etcd follower: a VIP key whose value is not an IPv4 address; left out");
        }
        ip
    }

    fn put(&self, known: &mut Known, at: u64, key: &[u8], value: &[u8]) -> bool {
        match self.layout.parse(key) {
            Some(Key::Vip { service, tag }) => {
                let Some(ip) = self.read_vip(key, value) else {
                    return false;
                };
                let service = lower(&service);
                let tag = CompactString::from(tag.unwrap_or_default());
                known
                    .vips
                    .entry(service.clone())
                    .or_default()
                    .insert(tag, ip);
                let attrs = self.attrs(&known.vips, &service);
                self.mirror.set_attrs_at(at, &service, attrs)
            }
            Some(Key::Instance { .. }) => {
                let Some((node, instance)) = self.read(key, value) else {
                    return false;
                };
                let service = lower(&instance.service);
                known
                    .owners
                    .insert((service.clone(), instance.id.clone()), node);
                // A service new to the mirror starts with its attributes.
                let attrs = self
                    .mirror
                    .service(&service)
                    .is_none()
                    .then(|| self.attrs(&known.vips, &service));
                self.mirror.upsert_with_at(at, instance, attrs);
                true
            }
            Some(Key::VipAddress) | None => false,
        }
    }

    fn delete(&self, known: &mut Known, at: u64, key: &[u8]) -> bool {
        match self.layout.parse(key) {
            Some(Key::Instance { node, service, id }) => {
                let owner = (lower(&service), CompactString::from(id.as_str()));
                if known.owners.get(&owner) != Some(&node) {
                    // Another host owns this ID now (or nothing does): its key stays.
                    return false;
                }
                known.owners.remove(&owner);
                self.mirror.remove_at(at, &service, &id);
                true
            }
            Some(Key::Vip { service, tag }) => {
                let service = lower(&service);
                if let Some(map) = known.vips.get_mut(&service) {
                    map.remove(tag.unwrap_or_default().as_str());
                }
                let attrs = self.attrs(&known.vips, &service);
                self.mirror.set_attrs_at(at, &service, attrs)
            }
            Some(Key::VipAddress) | None => false,
        }
    }
}

fn lower(s: &str) -> CompactString {
    let mut k = CompactString::from(s);
    k.make_ascii_lowercase();
    k
}
