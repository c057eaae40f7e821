//! The registry mirror: the in-memory copy of the registry that every Waymark process reads.
//!
//! Reads are cheap and never wait on writers for long: a service's state is an immutable
//! [`ServiceView`] behind an `Arc` in a sharded map, replaced whole on every change to that
//! service. Every change takes the next value of a global change index, which starts where the
//! registry of record left off and never goes backwards. Followers either wait for the index to
//! move ([`Mirror::subscribe`]) or ask what changed since an index they saw
//! ([`Mirror::changes_since`]); the bounded change log answers that without loss, and a follower
//! that fell further behind than the log reaches is told to reset and given the whole state.

use compact_str::CompactString;
use std::collections::{BTreeSet, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use dashmap::DashMap;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::model::{Instance, ServiceAttrs};

/// The map key of a service name: lowercased.
fn key_of(name: &str) -> CompactString {
    let mut key = CompactString::from(name);
    key.make_ascii_lowercase();
    key
}

/// Changes kept for followers by default.
pub const DEFAULT_LOG_CAPACITY: usize = 65_536;

/// One service as of one change: its instances, in registration order, and what the registry
/// says about the service as a whole.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ServiceView {
    /// The service name as first registered.
    pub name: CompactString,
    /// The change index of the last change to this service.
    pub index: u64,
    pub instances: Vec<Arc<Instance>>,
    #[serde(default)]
    pub attrs: ServiceAttrs,
}

/// What changed since an index: the current state of every service touched since then.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Changes {
    /// The index this answer brings a follower up to.
    pub index: u64,
    /// True when the follower fell behind the change log: `services` is then the whole
    /// registry and the follower must drop everything it had that is not in it.
    pub reset: bool,
    /// Services that changed, with their current state.
    pub services: Vec<ServiceView>,
    /// Services that changed and no longer exist.
    pub removed: Vec<String>,
}

/// Says, without a lookup, whether a service view is still the current one: it turns false
/// once a newer view replaces it or the service is removed. Caches of answers computed from
/// a view keep its `Freshness` to know when they went stale.
#[derive(Debug, Clone)]
pub struct Freshness(Arc<AtomicBool>);

impl Freshness {
    fn new() -> Freshness {
        Freshness(Arc::new(AtomicBool::new(true)))
    }

    pub fn is_current(&self) -> bool {
        self.0.load(Ordering::Acquire)
    }

    fn end(&self) {
        self.0.store(false, Ordering::Release);
    }
}

/// A service's current view and its freshness.
#[derive(Debug)]
struct Slot {
    view: Arc<ServiceView>,
    fresh: Freshness,
}

impl Slot {
    fn new(view: ServiceView) -> Slot {
        Slot {
            view: Arc::new(view),
            fresh: Freshness::new(),
        }
    }
}

/// Service names are hashed on every DNS answer: a fast hasher, randomly seeded.
type Hasher = foldhash::fast::RandomState;

/// The in-memory registry mirror. Cheap to share behind an `Arc`.
#[derive(Debug)]
pub struct Mirror {
    /// Keyed by the lowercased service name.
    services: DashMap<CompactString, Slot, Hasher>,
    /// Bumped whenever a service name appears that was not there: an answer for an absent
    /// service stays right while this is unchanged.
    creations: AtomicU64,
    index: AtomicU64,
    /// Serializes writers so that change indexes and the log stay in order.
    log: Mutex<ChangeLog>,
    notify: watch::Sender<u64>,
}

#[derive(Debug)]
struct ChangeLog {
    capacity: usize,
    /// (index, lowercased service name), oldest first.
    entries: VecDeque<(u64, CompactString)>,
    /// Indexes at or below this are not in the log any more.
    floor: u64,
}

impl Mirror {
    /// An empty mirror whose first change will get index `start + 1`.
    pub fn new(start: u64) -> Self {
        Self::with_log_capacity(start, DEFAULT_LOG_CAPACITY)
    }

    pub fn with_log_capacity(start: u64, capacity: usize) -> Self {
        let (notify, _) = watch::channel(start);
        Mirror {
            services: DashMap::with_hasher(Hasher::default()),
            creations: AtomicU64::new(0),
            index: AtomicU64::new(start),
            log: Mutex::new(ChangeLog {
                capacity: capacity.max(1),
                entries: VecDeque::new(),
                floor: start,
            }),
            notify,
        }
    }

    /// The index of the latest change.
    pub fn index(&self) -> u64 {
        self.index.load(Ordering::Acquire)
    }

    /// A receiver that sees the index after every change.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.notify.subscribe()
    }

    /// The service, looked up case-insensitively.
    pub fn service(&self, name: &str) -> Option<Arc<ServiceView>> {
        if name.bytes().any(|b| b.is_ascii_uppercase()) {
            self.services
                .get(name.to_ascii_lowercase().as_str())
                .map(|s| s.view.clone())
        } else {
            self.services.get(name).map(|s| s.view.clone())
        }
    }

    /// The service by its lowercased name, with the view's freshness.
    pub fn service_fresh(&self, key: &str) -> Option<(Arc<ServiceView>, Freshness)> {
        self.services
            .get(key)
            .map(|s| (s.view.clone(), s.fresh.clone()))
    }

    /// How many times a service name has appeared (see [`Freshness`] for views).
    pub fn creations(&self) -> u64 {
        self.creations.load(Ordering::Acquire)
    }

    /// Every service, in no particular order.
    pub fn services(&self) -> Vec<Arc<ServiceView>> {
        self.services
            .iter()
            .map(|e| e.value().view.clone())
            .collect()
    }

    pub fn service_count(&self) -> usize {
        self.services.len()
    }

    /// Finds an instance by ID in the named service.
    pub fn instance(&self, service: &str, id: &str) -> Option<Arc<Instance>> {
        self.service(service)?
            .instances
            .iter()
            .find(|i| i.id == id)
            .cloned()
    }

    /// Inserts or replaces an instance (matched by ID within its service). Returns the change
    /// index, or `None` when the instance was already exactly so (no change is recorded).
    pub fn upsert(&self, instance: Instance) -> Option<u64> {
        let mut log = self.log.lock().unwrap_or_else(|e| e.into_inner());
        let index = self.index.load(Ordering::Acquire) + 1;
        self.upsert_locked(&mut log, index, instance, None)
            .then_some(index)
    }

    /// Sets a service's attributes (VIPs, selection settings). Returns the change index, or
    /// `None` when the service does not exist or already had exactly these.
    pub fn set_attrs(&self, service: &str, attrs: ServiceAttrs) -> Option<u64> {
        let mut log = self.log.lock().unwrap_or_else(|e| e.into_inner());
        let key = key_of(service);
        let current = self.services.get(&key).map(|s| s.view.clone())?;
        if current.attrs == attrs {
            return None;
        }
        let index = self.index.load(Ordering::Acquire) + 1;
        self.commit(
            &mut log,
            index,
            key,
            Some((current.name.clone(), current.instances.clone(), attrs)),
        );
        Some(index)
    }

    /// Sets a service's attributes as the change the registry of record made at `index` (see
    /// [`Mirror::upsert_at`]); nothing when the service does not exist or has exactly these.
    /// Returns whether anything changed.
    pub fn set_attrs_at(&self, index: u64, service: &str, attrs: ServiceAttrs) -> bool {
        let mut log = self.log.lock().unwrap_or_else(|e| e.into_inner());
        let key = key_of(service);
        let Some(current) = self.services.get(&key).map(|s| s.view.clone()) else {
            return false;
        };
        if current.attrs == attrs {
            return false;
        }
        let index = index.max(self.index.load(Ordering::Acquire));
        self.commit(
            &mut log,
            index,
            key,
            Some((current.name.clone(), current.instances.clone(), attrs)),
        );
        true
    }

    /// Removes an instance. Returns the change index, or `None` if there was no such instance.
    pub fn remove(&self, service: &str, id: &str) -> Option<u64> {
        let mut log = self.log.lock().unwrap_or_else(|e| e.into_inner());
        let index = self.index.load(Ordering::Acquire) + 1;
        self.remove_locked(&mut log, index, service, id)
            .then_some(index)
    }

    /// Inserts or replaces an instance as the change the registry of record made at `index`:
    /// the mirror's index becomes `index` (it never goes back: a lower one counts as the
    /// current one), even when the instance was already exactly so.
    pub fn upsert_at(&self, index: u64, instance: Instance) {
        self.upsert_with_at(index, instance, None)
    }

    /// [`Mirror::upsert_at`], setting the service's attributes in the same change (`None`:
    /// they stay as they are; a new service starts with the defaults).
    pub fn upsert_with_at(&self, index: u64, instance: Instance, attrs: Option<ServiceAttrs>) {
        let mut log = self.log.lock().unwrap_or_else(|e| e.into_inner());
        let index = index.max(self.index.load(Ordering::Acquire));
        if !self.upsert_locked(&mut log, index, instance, attrs) {
            self.advance(index);
        }
    }

    /// Removes an instance as the change the registry of record made at `index` (see
    /// [`Mirror::upsert_at`]).
    pub fn remove_at(&self, index: u64, service: &str, id: &str) {
        let mut log = self.log.lock().unwrap_or_else(|e| e.into_inner());
        let index = index.max(self.index.load(Ordering::Acquire));
        if !self.remove_locked(&mut log, index, service, id) {
            self.advance(index);
        }
    }

    /// Whether anything changed.
    fn upsert_locked(
        &self,
        log: &mut ChangeLog,
        index: u64,
        instance: Instance,
        attrs: Option<ServiceAttrs>,
    ) -> bool {
        let key = key_of(&instance.service);
        let current = self.services.get(&key).map(|s| s.view.clone());
        let mut instances = current
            .as_ref()
            .map(|v| v.instances.clone())
            .unwrap_or_default();
        let attrs = match (attrs, &current) {
            (Some(attrs), _) => attrs,
            (None, Some(view)) => view.attrs.clone(),
            (None, None) => ServiceAttrs::default(),
        };
        let same_attrs = current.as_ref().is_some_and(|v| v.attrs == attrs);
        let mut instance = instance;
        match instances.iter_mut().find(|i| i.id == instance.id) {
            Some(existing) if existing.same_as(&instance) => {
                if same_attrs {
                    return false;
                }
                // Only the service's attributes changed: the instance keeps its indexes.
            }
            Some(existing) => {
                instance.create_index = existing.create_index;
                instance.modify_index = index;
                *existing = Arc::new(instance);
            }
            None => {
                // Indexes the source gives (a registry restoring its state) are kept.
                if instance.create_index == 0 {
                    instance.create_index = index;
                }
                if instance.modify_index == 0 {
                    instance.modify_index = index;
                }
                instances.push(Arc::new(instance));
            }
        }
        let name = current
            .map(|v| v.name.clone())
            .unwrap_or_else(|| instances[instances.len() - 1].service.clone());
        self.commit(log, index, key, Some((name, instances, attrs)));
        true
    }

    /// Whether anything changed.
    fn remove_locked(&self, log: &mut ChangeLog, index: u64, service: &str, id: &str) -> bool {
        let key = key_of(service);
        let Some(current) = self.services.get(&key).map(|s| s.view.clone()) else {
            return false;
        };
        if !current.instances.iter().any(|i| i.id == id) {
            return false;
        }
        let instances: Vec<_> = current
            .instances
            .iter()
            .filter(|i| i.id != id)
            .cloned()
            .collect();
        let next = (!instances.is_empty())
            .then(|| (current.name.clone(), instances, current.attrs.clone()));
        self.commit(log, index, key, next);
        true
    }

    /// Moves the index to `index` (when above it) without changing any service: a change of
    /// the registry of record that no service shows.
    pub fn advance_to(&self, index: u64) {
        let _log = self.log.lock().unwrap_or_else(|e| e.into_inner());
        self.advance(index.max(self.index.load(Ordering::Acquire)));
    }

    /// Moves the index without changing any service.
    fn advance(&self, index: u64) {
        if index != self.index.load(Ordering::Acquire) {
            self.index.store(index, Ordering::Release);
            self.notify.send_replace(index);
        }
    }

    /// Applies a follower's batch: replaces the named services whole and drops removed ones.
    /// With `reset`, every service not in the batch is dropped too. Indexes are the source's.
    pub fn apply(&self, changes: &Changes) {
        let mut log = self.log.lock().unwrap_or_else(|e| e.into_inner());
        if changes.reset {
            let keep: BTreeSet<CompactString> =
                changes.services.iter().map(|s| key_of(&s.name)).collect();
            self.services.retain(|k, s| {
                let keep = keep.contains(k);
                if !keep {
                    s.fresh.end();
                }
                keep
            });
        }
        for view in &changes.services {
            self.replace(key_of(&view.name), Some(view.clone()));
        }
        for name in &changes.removed {
            self.replace(key_of(name), None);
        }
        // A follower's log restarts at the source's index: older indexes are unknown here.
        log.entries.clear();
        log.floor = changes.index;
        self.index.store(changes.index, Ordering::Release);
        self.notify.send_replace(changes.index);
    }

    fn commit(
        &self,
        log: &mut ChangeLog,
        index: u64,
        key: CompactString,
        next: Option<(CompactString, Vec<Arc<Instance>>, ServiceAttrs)>,
    ) {
        let view = next.map(|(name, instances, attrs)| ServiceView {
            name,
            index,
            instances,
            attrs,
        });
        self.replace(key.clone(), view);
        if log.entries.len() == log.capacity {
            if let Some((dropped, _)) = log.entries.pop_front() {
                log.floor = dropped;
            }
        }
        log.entries.push_back((index, key));
        self.index.store(index, Ordering::Release);
        self.notify.send_replace(index);
    }

    /// Installs a service's new view (or removes it), then ends the old view's freshness.
    fn replace(&self, key: CompactString, view: Option<ServiceView>) {
        let old = match view {
            Some(view) => {
                let old = self.services.insert(key, Slot::new(view));
                if old.is_none() {
                    self.creations.fetch_add(1, Ordering::AcqRel);
                }
                old
            }
            None => self.services.remove(&key).map(|(_, s)| s),
        };
        if let Some(old) = old {
            old.fresh.end();
        }
    }

    /// What changed after `since`. When `since` is older than the change log reaches, or newer
    /// than the mirror's index (the follower saw another registry's history), the answer is a
    /// reset with the whole state.
    pub fn changes_since(&self, since: u64) -> Changes {
        let log = self.log.lock().unwrap_or_else(|e| e.into_inner());
        let index = self.index();
        if since < log.floor || since > index {
            let services = self.services().iter().map(|v| (**v).clone()).collect();
            return Changes {
                index,
                reset: true,
                services,
                removed: Vec::new(),
            };
        }
        let touched: BTreeSet<&str> = log
            .entries
            .iter()
            .rev()
            .take_while(|(i, _)| *i > since)
            .map(|(_, k)| k.as_str())
            .collect();
        let mut services = Vec::new();
        let mut removed = Vec::new();
        for key in touched {
            match self.services.get(key).map(|s| s.view.clone()) {
                Some(view) => services.push((*view).clone()),
                None => removed.push(key.to_string()),
            }
        }
        Changes {
            index,
            reset: false,
            services,
            removed,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn inst(service: &str, id: &str, port: u16) -> Instance {
        Instance::new(service, id, "127.0.0.1", port)
    }

    #[test]
    fn upsert_and_remove_move_the_index() {
        let m = Mirror::new(10);
        assert_eq!(m.upsert(inst("Web", "a", 1)), Some(11));
        assert_eq!(m.upsert(inst("web", "b", 2)), Some(12));
        assert_eq!(m.upsert(inst("web", "b", 2)), None, "no-op is not a change");
        let view = m.service("WEB").unwrap();
        assert_eq!(view.name, "Web");
        assert_eq!(view.index, 12);
        assert_eq!(view.instances.len(), 2);
        assert_eq!(m.remove("web", "a"), Some(13));
        assert_eq!(m.remove("web", "a"), None);
        assert_eq!(m.remove("web", "b"), Some(14));
        assert!(m.service("web").is_none());
        assert_eq!(m.index(), 14);
    }

    #[test]
    fn changes_at_an_index_take_it_and_never_go_back() {
        let m = Mirror::new(5);
        // Restoring at the current index changes services but not the index.
        m.upsert_at(5, inst("web", "a", 1));
        assert_eq!(m.index(), 5);
        assert_eq!(m.service("web").unwrap().index, 5);
        m.upsert_at(6, inst("web", "b", 1));
        assert_eq!((m.index(), m.service("web").unwrap().index), (6, 6));
        // A change that changes nothing visible still moves the index to the registry's.
        m.upsert_at(7, inst("web", "b", 1));
        assert_eq!((m.index(), m.service("web").unwrap().index), (7, 6));
        // One change can touch two services (an instance that moves) at one index.
        m.remove_at(8, "web", "b");
        m.upsert_at(8, inst("api", "b", 1));
        assert_eq!(m.index(), 8);
        assert_eq!(m.service("api").unwrap().index, 8);
        assert_eq!(m.changes_since(7).services.len(), 2);
        // An index below the current one counts as the current one.
        m.upsert_at(3, inst("api", "c", 1));
        assert_eq!((m.index(), m.service("api").unwrap().index), (8, 8));
        m.remove_at(9, "nope", "x");
        assert_eq!(m.index(), 9);
        m.advance_to(10);
        m.advance_to(4);
        assert_eq!(m.index(), 10);
        assert!(!m.changes_since(9).reset);
    }

    #[test]
    fn changes_since_reports_touched_and_removed() {
        let m = Mirror::new(0);
        m.upsert(inst("a", "a1", 1));
        m.upsert(inst("b", "b1", 1));
        let mark = m.index();
        m.upsert(inst("a", "a2", 2));
        m.remove("b", "b1");
        let c = m.changes_since(mark);
        assert!(!c.reset);
        assert_eq!(c.index, 4);
        assert_eq!(c.services.len(), 1);
        assert_eq!(c.services[0].instances.len(), 2);
        assert_eq!(c.removed, vec!["b".to_string()]);
        assert!(m.changes_since(4).services.is_empty());
    }

    #[test]
    fn a_follower_behind_the_log_gets_a_reset() {
        let m = Mirror::with_log_capacity(0, 2);
        for p in 1..=5 {
            m.upsert(inst("a", "a1", p));
        }
        m.upsert(inst("b", "b1", 1));
        let c = m.changes_since(1);
        assert!(c.reset);
        assert_eq!(c.services.len(), 2);
        assert!(!m.changes_since(5).reset);
        assert!(m.changes_since(99).reset, "an index from the future resets");
    }

    #[test]
    fn a_follower_applies_changes_and_converges() {
        let source = Mirror::new(0);
        let follower = Mirror::new(0);
        source.upsert(inst("a", "a1", 1));
        source.upsert(inst("b", "b1", 1));
        follower.apply(&source.changes_since(follower.index()));
        source.remove("a", "a1");
        source.upsert(inst("b", "b2", 2));
        follower.apply(&source.changes_since(follower.index()));
        assert!(follower.service("a").is_none());
        assert_eq!(follower.service("b").unwrap().instances.len(), 2);
        assert_eq!(follower.index(), source.index());
    }

    #[test]
    fn attributes_change_with_an_instance_or_alone_and_reach_followers() {
        let m = Mirror::new(0);
        let mut attrs = ServiceAttrs::default();
        attrs.vips.insert("".into(), "127.77.0.9".parse().unwrap());
        m.upsert_with_at(1, inst("web", "a", 1), Some(attrs.clone()));
        assert_eq!(
            m.service("web").unwrap().attrs.service_vip(),
            attrs.service_vip()
        );
        // An upsert without attributes keeps them; the same ones again are no change.
        m.upsert_at(2, inst("web", "b", 1));
        assert_eq!(m.service("web").unwrap().attrs, attrs);
        m.upsert_with_at(3, inst("web", "b", 1), Some(attrs.clone()));
        assert_eq!(m.service("web").unwrap().index, 2);
        assert_eq!(m.set_attrs("web", attrs.clone()), None);
        attrs.panic_threshold = 0.5;
        assert_eq!(m.set_attrs("WEB", attrs.clone()), Some(4));
        assert_eq!(m.set_attrs("nope", attrs.clone()), None);
        let follower = Mirror::new(0);
        let wire = serde_json::to_string(&m.changes_since(0)).unwrap();
        follower.apply(&serde_json::from_str(&wire).unwrap());
        assert_eq!(follower.service("web").unwrap().attrs, attrs);
    }

    #[tokio::test]
    async fn subscribers_see_every_change() {
        let m = Mirror::new(0);
        let mut rx = m.subscribe();
        m.upsert(inst("a", "a1", 1));
        rx.changed().await.unwrap();
        assert_eq!(*rx.borrow(), 1);
    }
}
