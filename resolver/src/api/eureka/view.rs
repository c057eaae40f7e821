//! The registry as Eureka clients see it: applications (one per service) of instances, in
//! Eureka's terms, kept in step with the registry's own mirror by its change index.
//!
//! Every read first brings the view up to the mirror's index ([`EurekaView::sync`]), so a
//! client reads its own writes; a task ([`follow`]) does the same on every change, so that
//! an instance that leaves is seen leaving (a delta must say `DELETED`, and by then the
//! registry has forgotten it). `/apps/delta` answers from the change index: the instances
//! whose last change is more recent than [`DELTA_WINDOW`] (Eureka's `ADDED` or `MODIFIED`),
//! and those removed within it (`DELETED`), with the `apps__hashcode` of the whole view.

use std::collections::{BTreeMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use compact_str::CompactString;
use waymark_shared::{Health, Instance, Mirror, ServiceView};

use super::codec::{self, Action, InstanceView, Status};
use super::handlers::lease_check_id;
use crate::registry::def::EurekaDef;

/// How far back a delta reaches: Eureka's `retentionTimeInMSInDeltaQueue` (3 minutes). A
/// client fetches a delta every 30 s; one that missed more falls back to a full fetch when
/// the hash code does not match.
pub const DELTA_WINDOW: Duration = Duration::from_secs(180);
/// Removals kept for deltas at most (beyond, the oldest go: clients then see a hash code
/// that does not match and fetch everything).
const MAX_DELETED: usize = 100_000;
/// One (time, index) mark per this much time at most.
const MARK_EVERY: Duration = Duration::from_secs(1);

/// One application: its name as answered and its instances in registration order.
#[derive(Debug, Clone)]
pub struct App {
    pub name: String,
    pub instances: Vec<Arc<InstanceView>>,
}

/// The Eureka view. Cheap to share behind an `Arc`. It holds an answer's worth of every
/// instance, so it is built only once a Eureka client first asks ([`EurekaView::sync`]); a
/// resolver no Eureka client talks to keeps none of it.
#[derive(Debug)]
pub struct EurekaView {
    inner: Mutex<Inner>,
    window: Duration,
    /// Set by the first sync: [`follow`] waits for it.
    active: tokio::sync::watch::Sender<bool>,
}

#[derive(Debug, Default)]
struct Inner {
    /// The mirror index the view is at; `None` before the first sync.
    seen: Option<u64>,
    /// By service key (lowercased service name).
    apps: BTreeMap<CompactString, App>,
    /// Removed instances, oldest first.
    deleted: VecDeque<Deleted>,
    /// (when, the index the view was at then), oldest first: a change after `when` has an
    /// index above it.
    marks: VecDeque<(Instant, u64)>,
}

#[derive(Debug)]
struct Deleted {
    index: u64,
    at: Instant,
    app: String,
    instance: Arc<InstanceView>,
}

/// Changed instances, by application name.
pub type Changed = Vec<(String, Vec<(Arc<InstanceView>, Action)>)>;

/// What a delta answers: the view's index, the whole view's hash code, and the changed
/// instances by application.
pub struct Delta {
    pub index: u64,
    pub hashcode: String,
    pub apps: Changed,
}

impl Default for EurekaView {
    fn default() -> Self {
        EurekaView::new(DELTA_WINDOW)
    }
}

impl EurekaView {
    pub fn new(window: Duration) -> EurekaView {
        EurekaView {
            inner: Mutex::new(Inner::default()),
            window,
            active: tokio::sync::watch::channel(false).0,
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Brings the view up to the mirror's index. `eureka` gives the Eureka part of an
    /// instance's definition, by ID.
    pub fn sync(&self, mirror: &Mirror, eureka: &dyn Fn(&str) -> Option<Box<EurekaDef>>) {
        self.active
            .send_if_modified(|active| !std::mem::replace(active, true));
        let mut inner = self.lock();
        let now = Instant::now();
        let since = match inner.seen {
            Some(seen) if seen == mirror.index() => return,
            Some(seen) => seen,
            None => 0,
        };
        let changes = mirror.changes_since(since);
        let first = inner.seen.is_none();
        let mut gone: Vec<(String, Arc<InstanceView>)> = Vec::new();
        if changes.reset {
            let old = std::mem::take(&mut inner.apps);
            for view in &changes.services {
                let app = render_app(view, eureka);
                if !app.instances.is_empty() {
                    inner.apps.insert(key(&view.name), app);
                }
            }
            for (k, app) in old {
                let still: HashSet<&str> = inner
                    .apps
                    .get(&k)
                    .map(|a| a.instances.iter().map(|i| i.id.as_str()).collect())
                    .unwrap_or_default();
                gone.extend(
                    app.instances
                        .into_iter()
                        .filter(|i| !still.contains(i.id.as_str()))
                        .map(|i| (app.name.clone(), i)),
                );
            }
        } else {
            for view in &changes.services {
                let k = key(&view.name);
                let app = render_app(view, eureka);
                let old = if app.instances.is_empty() {
                    inner.apps.remove(&k)
                } else {
                    inner.apps.insert(k, app.clone())
                };
                if let Some(old) = old {
                    let still: HashSet<&str> =
                        app.instances.iter().map(|i| i.id.as_str()).collect();
                    gone.extend(
                        old.instances
                            .into_iter()
                            .filter(|i| !still.contains(i.id.as_str()))
                            .map(|i| (old.name.clone(), i)),
                    );
                }
            }
            for name in &changes.removed {
                if let Some(old) = inner.apps.remove(&key(name)) {
                    gone.extend(old.instances.into_iter().map(|i| (old.name.clone(), i)));
                }
            }
        }
        // The first sync is the starting point: nothing was removed before it.
        if !first {
            for (app, instance) in gone {
                inner.deleted.push_back(Deleted {
                    index: changes.index,
                    at: now,
                    app,
                    instance,
                });
            }
        }
        inner.seen = Some(changes.index);
        if inner
            .marks
            .back()
            .is_none_or(|(at, _)| now.duration_since(*at) >= MARK_EVERY)
        {
            inner.marks.push_back((now, changes.index));
        }
        self.prune(&mut inner, now);
    }

    /// Forgets what is older than the window: removals, and marks but the newest one
    /// older than the window (the delta's starting point).
    fn prune(&self, inner: &mut Inner, now: Instant) {
        let Some(horizon) = now.checked_sub(self.window) else {
            return;
        };
        while inner.deleted.front().is_some_and(|d| d.at < horizon)
            || inner.deleted.len() > MAX_DELETED
        {
            inner.deleted.pop_front();
        }
        while inner.marks.len() > 1 && inner.marks[1].0 <= horizon {
            inner.marks.pop_front();
        }
    }

    /// The index the view is at.
    pub fn index(&self) -> u64 {
        self.lock().seen.unwrap_or(0)
    }

    /// Every application, by service name.
    pub fn apps(&self) -> Vec<App> {
        self.snapshot().1
    }

    /// The index the view is at, and every application as of it.
    pub fn snapshot(&self) -> (u64, Vec<App>) {
        let inner = self.lock();
        (
            inner.seen.unwrap_or(0),
            inner.apps.values().cloned().collect(),
        )
    }

    /// The application of a service, by name (any case).
    pub fn app(&self, service: &str) -> Option<App> {
        self.lock().apps.get(&key(service)).cloned()
    }

    /// The `apps__hashcode` of the whole view.
    pub fn hashcode(&self) -> String {
        hashcode_of(&self.lock())
    }

    /// What changed within the window.
    pub fn delta(&self) -> Delta {
        let inner = self.lock();
        let now = Instant::now();
        let horizon = now.checked_sub(self.window);
        // The newest mark at or before the horizon; without one (a young view), the oldest.
        let since = inner
            .marks
            .iter()
            .rev()
            .find(|(at, _)| horizon.is_some_and(|h| *at <= h))
            .or(inner.marks.front())
            .map_or(0, |(_, i)| *i);
        let mut apps: Changed = Vec::new();
        let mut present: HashSet<(&str, &str)> = HashSet::new();
        for app in inner.apps.values() {
            let changed: Vec<(Arc<InstanceView>, Action)> = app
                .instances
                .iter()
                .filter(|i| i.modify_index > since)
                .map(|i| {
                    let action = if i.create_index > since {
                        Action::Added
                    } else {
                        Action::Modified
                    };
                    (i.clone(), action)
                })
                .collect();
            for i in &app.instances {
                present.insert((app.name.as_str(), i.id.as_str()));
            }
            if !changed.is_empty() {
                apps.push((app.name.clone(), changed));
            }
        }
        // Removals, unless the instance is back (its ADDED says all).
        for d in inner.deleted.iter().filter(|d| d.index > since) {
            if present.contains(&(d.app.as_str(), d.instance.id.as_str())) {
                continue;
            }
            let entry = (d.instance.clone(), Action::Deleted);
            match apps.iter_mut().find(|(name, _)| *name == d.app) {
                Some((_, list)) => list.push(entry),
                None => apps.push((d.app.clone(), vec![entry])),
            }
        }
        Delta {
            index: inner.seen.unwrap_or(0),
            hashcode: hashcode_of(&inner),
            apps,
        }
    }
}

fn hashcode_of(inner: &Inner) -> String {
    codec::hashcode(
        inner
            .apps
            .values()
            .flat_map(|a| a.instances.iter().map(|i| i.status)),
    )
}

fn key(name: &str) -> CompactString {
    let mut k = CompactString::from(name);
    k.make_ascii_lowercase();
    k
}

/// A service as an application: named after its Eureka registrations' application when it
/// has any (`MY_APP`), else its name uppercased, as Eureka names applications.
///
/// A Eureka instance whose lease ran out is gone at once, as DNS has it: its removal from
/// the registry is the change after.
fn render_app(view: &ServiceView, eureka: &dyn Fn(&str) -> Option<Box<EurekaDef>>) -> App {
    let live: Vec<(&Arc<Instance>, Option<Box<EurekaDef>>)> = view
        .instances
        .iter()
        .filter_map(|i| {
            let lease = i.checks.iter().find(|c| c.id == lease_check_id(&i.id));
            let def = eureka(&i.id);
            match lease {
                // Expired, or no longer in the registry (being removed).
                Some(c) if c.status == Health::Critical || def.is_none() => None,
                _ => Some((i, def)),
            }
        })
        .collect();
    let name = live
        .iter()
        .filter_map(|(_, d)| d.as_ref())
        .map(|d| d.app.clone())
        .next()
        .unwrap_or_else(|| view.name.to_ascii_uppercase().to_string());
    let instances = live
        .into_iter()
        .map(|(i, def)| Arc::new(render(i, def, &name)))
        .collect();
    App { name, instances }
}

/// One instance in Eureka's terms: a Eureka registration as registered, with its effective
/// status; any other registration as Eureka would show it (`UP` while it serves,
/// `OUT_OF_SERVICE` in maintenance, `DOWN` while critical).
pub fn render(i: &Instance, eureka: Option<Box<EurekaDef>>, app: &str) -> InstanceView {
    let (mut info, status, overridden) = match eureka {
        Some(def) => {
            let own = Status::parse(&def.status).unwrap_or(Status::Unknown);
            let overridden = def.overridden_status.as_deref().and_then(Status::parse);
            let status = codec::effective(own, overridden);
            (*def, status, overridden.unwrap_or(Status::Unknown))
        }
        None => {
            let status = if i.draining {
                Status::OutOfService
            } else if i.health() == Health::Critical {
                Status::Down
            } else {
                Status::Up
            };
            let vip = i.service.to_ascii_lowercase().to_string();
            let def = EurekaDef {
                host_name: i.address.to_string(),
                status: status.as_str().into(),
                port: i.port,
                port_enabled: true,
                secure_port: 443,
                secure_port_enabled: false,
                vip_address: vip.clone(),
                secure_vip_address: vip,
                country_id: 1,
                data_center_class: "com.netflix.appinfo.InstanceInfo$DefaultDataCenterInfo".into(),
                data_center_name: "MyOwn".into(),
                renewal_interval_secs: codec::DEFAULT_RENEWAL_SECS,
                duration_secs: codec::DEFAULT_DURATION_SECS,
                ..EurekaDef::default()
            };
            (def, status, Status::Unknown)
        }
    };
    info.app = app.to_string();
    InstanceView {
        id: i.id.to_string(),
        ip_addr: i.address.to_string(),
        metadata: i.meta.clone(),
        info,
        status,
        overridden,
        create_index: i.create_index,
        modify_index: i.modify_index,
    }
}

/// Keeps the view in step with the mirror, from the first time a Eureka client asks, until
/// the mirror goes away.
pub async fn follow(
    view: Arc<EurekaView>,
    mirror: Arc<Mirror>,
    eureka: impl Fn(&str) -> Option<Box<EurekaDef>> + Send + Sync + 'static,
) {
    let mut active = view.active.subscribe();
    if active.wait_for(|a| *a).await.is_err() {
        return;
    }
    let mut rx = mirror.subscribe();
    loop {
        view.sync(&mirror, &eureka);
        if rx.changed().await.is_err() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn eureka_def(app: &str, status: &str) -> Box<EurekaDef> {
        Box::new(EurekaDef {
            app: app.into(),
            status: status.into(),
            ..EurekaDef::default()
        })
    }

    #[test]
    fn deltas_say_added_modified_and_deleted_within_the_window() {
        let mirror = Mirror::new(0);
        let view = EurekaView::new(Duration::from_secs(3600));
        let defs = |id: &str| match id {
            "e-1" | "e-2" => Some(eureka_def("MY_APP", "UP")),
            _ => None,
        };
        mirror.upsert(Instance::new("my-app", "e-1", "10.0.0.1", 80));
        view.sync(&mirror, &defs);
        // The first sync is the starting point: what was there is not news.
        assert!(view.delta().apps.is_empty());
        assert_eq!(view.hashcode(), "UP_1_");

        mirror.upsert(Instance::new("my-app", "e-2", "10.0.0.2", 80));
        let mut consul = Instance::new("my-app", "c-1", "10.0.0.3", 80);
        consul.draining = true;
        mirror.upsert(consul);
        let mut moved = Instance::new("my-app", "e-1", "10.0.0.9", 80);
        moved.meta.insert("k".into(), "v".into());
        mirror.upsert(moved);
        view.sync(&mirror, &defs);
        let delta = view.delta();
        assert_eq!(delta.index, mirror.index());
        assert_eq!(delta.hashcode, "OUT_OF_SERVICE_1_UP_2_");
        let (name, changed) = &delta.apps[0];
        assert_eq!(name, "MY_APP", "named after its Eureka registrations");
        let mut got: Vec<(&str, Action, &str)> = changed
            .iter()
            .map(|(i, a)| (i.id.as_str(), *a, i.info.app.as_str()))
            .collect();
        got.sort_by_key(|g| g.0);
        assert_eq!(
            got,
            [
                ("c-1", Action::Added, "MY_APP"),
                ("e-1", Action::Modified, "MY_APP"),
                ("e-2", Action::Added, "MY_APP"),
            ]
        );

        mirror.remove("my-app", "e-2");
        mirror.remove("my-app", "c-1");
        mirror.remove("my-app", "e-1");
        view.sync(&mirror, &defs);
        let delta = view.delta();
        assert_eq!(delta.hashcode, "");
        let mut got: Vec<(&str, Action)> = delta.apps[0]
            .1
            .iter()
            .map(|(i, a)| (i.id.as_str(), *a))
            .collect();
        got.sort_by_key(|g| g.0);
        assert_eq!(
            got,
            [
                ("c-1", Action::Deleted),
                ("e-1", Action::Deleted),
                ("e-2", Action::Deleted)
            ]
        );
        assert!(view.apps().is_empty());

        // Back again: ADDED, not DELETED.
        mirror.upsert(Instance::new("my-app", "e-2", "10.0.0.2", 80));
        view.sync(&mirror, &defs);
        let delta = view.delta();
        let e2: Vec<Action> = delta.apps[0]
            .1
            .iter()
            .filter(|(i, _)| i.id == "e-2")
            .map(|(_, a)| *a)
            .collect();
        assert_eq!(e2, [Action::Added]);
    }

    #[tokio::test]
    async fn the_view_is_built_once_asked_then_follows_every_change() {
        let mirror = Arc::new(Mirror::new(0));
        let view = Arc::new(EurekaView::new(Duration::from_secs(3600)));
        let none = |_: &str| None;
        tokio::spawn(follow(view.clone(), mirror.clone(), none));
        mirror.upsert(Instance::new("web", "w-1", "10.0.0.1", 80));
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(view.index(), 0, "nothing kept before a Eureka client asks");
        view.sync(&mirror, &none);
        assert_eq!(view.apps().len(), 1);
        // From then on it follows by itself: a removal is seen without a read.
        mirror.remove("web", "w-1");
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while view.index() != mirror.index() {
            assert!(
                std::time::Instant::now() < deadline,
                "the view never followed"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert_eq!(view.delta().apps[0].1[0].1, Action::Deleted);
    }

    #[test]
    fn an_expired_lease_is_a_removal() {
        let mirror = Mirror::new(0);
        let view = EurekaView::new(Duration::from_secs(3600));
        let defs = |_: &str| Some(eureka_def("APP", "UP"));
        let lease = |status| waymark_shared::CheckView {
            id: lease_check_id("e-1"),
            name: "Eureka lease".into(),
            kind: "ttl".into(),
            status,
            output: String::new(),
            notes: String::new(),
        };
        let mut i = Instance::new("app", "e-1", "10.0.0.1", 80);
        i.checks.push(lease(Health::Passing));
        mirror.upsert(i.clone());
        view.sync(&mirror, &defs);
        assert_eq!(view.hashcode(), "UP_1_");
        i.checks[0] = lease(Health::Critical);
        mirror.upsert(i);
        view.sync(&mirror, &defs);
        assert!(
            view.apps().is_empty(),
            "gone with its lease, before it is deregistered"
        );
        let delta = view.delta();
        assert_eq!(delta.apps[0].1[0].1, Action::Deleted);
        // Its deregistration is no further news.
        mirror.remove("app", "e-1");
        view.sync(&mirror, &defs);
        assert_eq!(view.delta().apps[0].1.len(), 1);
    }

    #[test]
    fn a_delta_leaves_out_what_is_older_than_the_window() {
        let mirror = Mirror::new(0);
        let view = EurekaView::new(Duration::from_millis(50));
        let none = |_: &str| None;
        view.sync(&mirror, &none);
        mirror.upsert(Instance::new("web", "w-1", "10.0.0.1", 80));
        view.sync(&mirror, &none);
        assert_eq!(view.delta().apps.len(), 1);
        std::thread::sleep(MARK_EVERY + Duration::from_millis(100));
        // A later change marks the time; w-1's change is now older than the window.
        mirror.upsert(Instance::new("api", "a-1", "10.0.0.2", 80));
        view.sync(&mirror, &none);
        std::thread::sleep(Duration::from_millis(100));
        let delta = view.delta();
        assert!(delta.apps.is_empty(), "{:?}", delta.apps);
        assert_eq!(delta.hashcode, "UP_2_");
    }

    #[test]
    fn other_registrations_show_their_health_as_a_status() {
        let mut i = Instance::new("Pay", "p-1", "10.0.0.1", 9000);
        assert_eq!(render(&i, None, "PAY").status, Status::Up);
        i.checks.push(waymark_shared::CheckView {
            id: "c".into(),
            name: "c".into(),
            kind: "ttl".into(),
            status: Health::Critical,
            output: String::new(),
            notes: String::new(),
        });
        let v = render(&i, None, "PAY");
        assert_eq!(v.status, Status::Down);
        assert_eq!((v.info.port, v.info.port_enabled), (9000, true));
        assert_eq!(v.info.vip_address, "pay");
        i.draining = true;
        assert_eq!(render(&i, None, "PAY").status, Status::OutOfService);
        // A Eureka registration's status is its own, overridden as Eureka would.
        let mut def = eureka_def("PAY", "UP");
        def.overridden_status = Some("OUT_OF_SERVICE".into());
        let v = render(&i, Some(def), "PAY");
        assert_eq!(
            (v.status, v.overridden),
            (Status::OutOfService, Status::OutOfService)
        );
    }
}
