//! The embedded registry of record: registrations, their health checks' state, persistence.
//!
//! Every write goes through here: under one short lock it updates the registration table,
//! takes the next change index and queues the new state to the [`Store`]. The change reaches
//! the [`Mirror`] (which DNS and the API read, and the change stream serves) only once the
//! store has made it durable ([`commit`]); a write the store could not make durable is undone
//! and never seen. Writes a client waits on return once published. Health check tasks
//! ([`health`]) report back here, and hysteresis is applied here.

mod commit;
pub mod def;
pub mod health;
pub mod vips;

use std::collections::{HashMap, VecDeque};

use compact_str::CompactString;
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant};

use tokio::sync::Notify;
use tokio::task::AbortHandle;
use waymark_shared::vip::VipRange;
use waymark_shared::{CheckView, Extra, Health, Instance, Mirror, ServiceAttrs};

use crate::config::HealthConfig;
use crate::dns::names::{self, NameError};
use crate::metrics::{Metrics, TransitionLabels};
use crate::store::{Loaded, Pending, Source, Store, StoreError, StoredCheck, StoredReg};
use commit::{Change, Publish, Undo};
use def::{CheckDef, CheckKind, ServiceDef};

/// A TTL check's output once it expired.
const TTL_EXPIRED: &str = "TTL expired";

#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("{0}")]
    Invalid(String),
    #[error("unknown service ID {0:?}")]
    UnknownService(String),
    #[error("unknown check ID {0:?}")]
    UnknownCheck(String),
    #[error("check {0:?} is not a TTL check")]
    NotTtl(String),
    #[error("check ID {check:?} belongs to service {owner:?}")]
    CheckConflict { check: String, owner: String },
    #[error(transparent)]
    Name(#[from] NameError),
    #[error(
        "service ID {id:?} has the DNS label {label:?}, which instance {other:?} of service \
         {service:?} already has: choose IDs that differ in letters, digits or '-'"
    )]
    LabelTaken {
        id: String,
        other: String,
        service: String,
        label: String,
    },
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Settings the registry needs from the config.
#[derive(Debug, Clone)]
pub struct Settings {
    pub node_address: String,
    /// The DNS zone, whose length bounds the names of registrations.
    pub zone: String,
    pub health: HealthConfig,
    /// Log records after which the store is compacted, at the least (and at least twice the
    /// number of registrations).
    pub compact_after_records: u64,
    /// Where service VIPs come from.
    pub vip_range: VipRange,
    /// Panic thresholds of the services that have one, by lowercased name.
    pub panic_thresholds: HashMap<String, f64>,
}

pub struct Registry {
    inner: Mutex<Inner>,
    mirror: Arc<Mirror>,
    store: Store,
    settings: Settings,
    metrics: Arc<Metrics>,
    http: reqwest::Client,
    http_insecure: reqwest::Client,
    /// Where check tasks run (undoing a failed write restarts checks from the store's thread).
    runtime: tokio::runtime::Handle,
    this: Weak<Registry>,
}

#[derive(Default)]
struct Inner {
    /// Boxed: a `Reg` is a few hundred bytes, and the table keeps up to twice as many slots
    /// as entries.
    regs: HashMap<CompactString, Box<Reg>>,
    /// Check ID → service ID.
    check_owner: HashMap<String, String>,
    /// Bumped for every check (re)start, so stale probe results are ignored.
    generation: u64,
    /// The index of the last change queued to the store.
    queued: u64,
    /// The index of the last change published (durable).
    published: u64,
    /// Changes queued and not yet durable, oldest first.
    pending: VecDeque<Change>,
    vips: vips::VipTable,
}

struct Reg {
    /// What is persisted: definition, source, maintenance, each check's last state. Shared
    /// with queued changes (to undo them) and compactions (to write them without the lock).
    stored: Arc<StoredReg>,
    /// One per check of the definition, in its order.
    checks: Vec<CheckState>,
    tasks: Vec<AbortHandle>,
    /// The index of the last change queued for this registration (Consul's `ModifyIndex`).
    last_change: u64,
    /// The index of the change that created it (Consul's `CreateIndex`); 0 until queued.
    created: u64,
}

struct CheckState {
    def: CheckDef,
    kind: CheckKind,
    generation: u64,
    status: Health,
    output: String,
    successes: u32,
    failures: u32,
    critical_since: Option<Instant>,
    ttl_deadline: Instant,
    ttl_notify: Arc<Notify>,
}

impl Drop for Reg {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

impl Registry {
    /// Builds the registry over a mirror and a store, restoring what the store loaded: every
    /// instance keeps its last known health until its checks run again. Must be called
    /// within a tokio runtime (check tasks run on it).
    pub fn new(
        mirror: Arc<Mirror>,
        store: Store,
        loaded: Loaded,
        settings: Settings,
        metrics: Arc<Metrics>,
    ) -> Arc<Registry> {
        let reg = Arc::new_cyclic(|this| Registry {
            inner: Mutex::new(Inner {
                queued: loaded.index,
                published: loaded.index,
                vips: vips::VipTable::new(settings.vip_range),
                ..Inner::default()
            }),
            mirror,
            store,
            settings,
            metrics,
            http: reqwest::Client::builder()
                .user_agent("waymark-health-check")
                .build()
                .expect("tls backend available"),
            http_insecure: reqwest::Client::builder()
                .user_agent("waymark-health-check")
                .danger_accept_invalid_certs(true)
                .build()
                .expect("tls backend available"),
            runtime: tokio::runtime::Handle::current(),
            this: this.clone(),
        });
        reg.store
            .attach(Arc::new(commit::Publisher(Arc::downgrade(&reg))));
        {
            let mut inner = reg.lock();
            // Registrations stored without their VIPs (older stores, a changed range) are
            // written again once they have them.
            let mut rewrite = Vec::new();
            for stored in loaded.registrations {
                let vips = stored.vips.clone();
                match reg.install(&mut inner, Arc::new(stored)) {
                    Ok(id) => {
                        // Its change indexes as they were (without them: the restart's).
                        let [created, changed] = loaded
                            .indexes
                            .get(id.as_str())
                            .copied()
                            .unwrap_or([loaded.index, loaded.index]);
                        let installed = inner.regs.get_mut(&id).expect("installed");
                        installed.created = created;
                        installed.last_change = changed;
                        if installed.stored.vips != vips {
                            rewrite.push(id.clone());
                        }
                        let mut instance = reg.instance(installed);
                        instance.create_index = created;
                        instance.modify_index = changed;
                        let attrs = reg.attrs(&inner, &instance.service);
                        reg.mirror
                            .upsert_with_at(loaded.index, instance, Some(attrs));
                    }
                    Err(e) => tracing::error!(error = %e, "dropping a stored registration"),
                }
            }
            reg.metrics.change_index.set(loaded.index as i64);
            reg.update_gauges(&inner);
            // A registry that has a history records its restart as a change: followers that
            // resume from the index they last saw get an answer at once.
            if loaded.index > 0 {
                drop(
                    reg.queue(&mut inner, Undo::Nothing, Publish::Index, |index| {
                        reg.store.restart(index)
                    }),
                );
            }
            for id in rewrite {
                let stored = inner.regs[&id].stored.clone();
                drop(reg.queue(
                    &mut inner,
                    Undo::States {
                        id,
                        before: stored.clone(),
                    },
                    Publish::Index,
                    |index| reg.store.put(index, &stored),
                ));
            }
        }
        reg
    }

    pub fn mirror(&self) -> &Arc<Mirror> {
        &self.mirror
    }

    /// `Err` with the reason while the store cannot write (readiness says so).
    pub fn store_status(&self) -> Result<(), String> {
        self.store.status()
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Registers (or replaces) an instance. Returns the change index once it is durable and
    /// published.
    pub async fn register(&self, def: ServiceDef, source: Source) -> Result<u64, RegistryError> {
        self.register_with(def, source, None).await
    }

    /// Registers (or replaces) an instance and, when `maintenance` is `Some`, sets its
    /// maintenance in the same change (`Some(None)`: out of maintenance), so that no reader
    /// sees the instance in between (a Eureka instance registered `STARTING` is never
    /// answered, not even for a moment). Otherwise a re-registration keeps its maintenance.
    pub async fn register_with(
        &self,
        def: ServiceDef,
        source: Source,
        maintenance: Option<Option<String>>,
    ) -> Result<u64, RegistryError> {
        let def = def.normalize()?;
        names::check_lengths(&def.name, &def.id, &self.settings.zone)?;
        let queued = {
            let mut inner = self.lock();
            let id = def.id.clone();
            self.check_label_free(&def)?;
            for check in &def.checks {
                if let Some(owner) = inner.check_owner.get(&check.id) {
                    if *owner != id {
                        return Err(RegistryError::CheckConflict {
                            check: check.id.clone(),
                            owner: owner.clone(),
                        });
                    }
                }
            }
            let old = inner.regs.get(&id);
            let checks = def
                .checks
                .iter()
                .map(|c| {
                    // A check set from outside takes the status it is registered with.
                    let carried = old
                        .filter(|_| !c.external)
                        .and_then(|o| o.stored.checks.iter().find(|s| s.id == c.id));
                    StoredCheck {
                        id: c.id.clone(),
                        status: carried.map_or_else(
                            || c.status.unwrap_or(self.settings.health.initial_status),
                            |s| s.status,
                        ),
                        output: match carried {
                            Some(s) => s.output.clone(),
                            None => c.output.clone(),
                        },
                    }
                })
                .collect();
            let stored = Arc::new(StoredReg {
                def: Arc::new(def),
                source,
                maintenance: match maintenance {
                    Some(set) => set,
                    None => old.and_then(|o| o.stored.maintenance.clone()),
                },
                checks,
                vips: old.map(|o| o.stored.vips.clone()).unwrap_or_default(),
            });
            let old = self.uninstall(&mut inner, &id);
            let before = old.as_ref().map(|o| o.stored.clone());
            let last_change = old.as_ref().map_or(0, |o| o.last_change);
            // An instance that moves to another service leaves the old one.
            let moved_from = before
                .as_ref()
                .map(|b| b.def.name.clone())
                .filter(|o| !o.eq_ignore_ascii_case(&stored.def.name));
            // A re-registration keeps its creation index, unless it moved: then it is new there.
            let created = match &moved_from {
                Some(_) => 0,
                None => old.as_ref().map_or(0, |o| o.created),
            };
            // Dropping the old registration stops its checks; the new one starts them again.
            drop(old);
            let id = match self.install(&mut inner, stored) {
                Ok(id) => id,
                Err(e) => {
                    // Put back what was there: a refused registration changes nothing.
                    if let Some(before) = before {
                        if let Err(e) = self.install(&mut inner, before) {
                            tracing::error!(error = %e, "cannot restore a registration");
                        }
                    }
                    return Err(e);
                }
            };
            let reg = inner.regs.get_mut(&id).expect("installed");
            reg.last_change = last_change;
            reg.created = created;
            let stored = reg.stored.clone();
            if before.as_deref() == Some(&*stored) {
                Err(self.waits_on(&inner, &id))
            } else {
                let instance = self.instance(&inner.regs[&id]);
                let attrs = self.attrs(&inner, &instance.service);
                Ok(self.queue(
                    &mut inner,
                    Undo::Replace { id, before },
                    Publish::Upsert {
                        instance: Box::new(instance),
                        moved_from,
                        attrs,
                    },
                    |index| self.store.put(index, &stored),
                ))
            }
        };
        self.committed(queued).await
    }

    /// Refuses an instance whose DNS label another instance of the service already has
    /// (`coll_1` and `COLL.1` are both `coll-1`): DNS could answer only one of them.
    fn check_label_free(&self, def: &ServiceDef) -> Result<(), RegistryError> {
        let Some(view) = self.mirror.service(&def.name) else {
            return Ok(());
        };
        let label = names::instance_label(&def.id);
        match view
            .instances
            .iter()
            .find(|i| i.id != def.id && names::label_matches(&i.id, label.as_bytes()))
        {
            Some(other) => Err(RegistryError::LabelTaken {
                id: def.id.to_string(),
                other: other.id.to_string(),
                service: view.name.to_string(),
                label,
            }),
            None => Ok(()),
        }
    }

    /// Removes an instance. Returns the change index once it is durable and published.
    pub async fn deregister(&self, id: &str) -> Result<u64, RegistryError> {
        let queued = {
            let mut inner = self.lock();
            let Some(reg) = self.uninstall(&mut inner, id) else {
                return Err(RegistryError::UnknownService(id.to_string()));
            };
            let before = reg.stored.clone();
            drop(reg);
            let id = before.def.id.clone();
            let service = before.def.name.clone();
            Ok(self.queue(
                &mut inner,
                Undo::Replace {
                    id: id.clone(),
                    before: Some(before),
                },
                Publish::Remove {
                    service,
                    id: id.clone(),
                },
                |index| self.store.delete(index, &id),
            ))
        };
        self.committed(queued).await
    }

    /// Sets a TTL check's status (a heartbeat) and restarts its TTL.
    pub async fn ttl_update(
        &self,
        check_id: &str,
        status: Health,
        note: Option<String>,
    ) -> Result<u64, RegistryError> {
        let queued = {
            let mut inner = self.lock();
            let (reg, i) = find_check(&mut inner, check_id)?;
            let check = &mut reg.checks[i];
            let CheckKind::Ttl { ttl } = check.kind else {
                return Err(RegistryError::NotTtl(check_id.to_string()));
            };
            check.ttl_deadline = Instant::now() + ttl;
            check.ttl_notify.notify_one();
            let output = note.unwrap_or_default();
            set_status(check, status, output, &self.metrics);
            let id = reg.stored.def.id.clone();
            self.queue_state(&mut inner, &id, None)
        };
        self.committed(queued).await
    }

    /// Puts an instance in or out of maintenance (draining: never answered).
    pub async fn maintenance(
        &self,
        id: &str,
        enable: bool,
        reason: Option<String>,
    ) -> Result<u64, RegistryError> {
        let queued = {
            let mut inner = self.lock();
            if !inner.regs.contains_key(id) {
                return Err(RegistryError::UnknownService(id.to_string()));
            }
            let maintenance = enable.then(|| {
                reason
                    .filter(|r| !r.is_empty())
                    .unwrap_or_else(|| "Maintenance mode is enabled for this service".into())
            });
            self.queue_state(&mut inner, id, Some(maintenance))
        };
        self.committed(queued).await
    }

    /// Adds (or replaces) a check on a registered instance (`/v1/agent/check/register`).
    pub async fn add_check(
        &self,
        service_id: &str,
        mut check: CheckDef,
    ) -> Result<u64, RegistryError> {
        let (mut def, source) = self
            .definition(service_id)
            .ok_or_else(|| RegistryError::UnknownService(service_id.to_string()))?;
        if check.id.is_empty() {
            check.id = check.name.clone();
        }
        if check.id.is_empty() {
            return Err(RegistryError::Invalid(
                "a check needs an ID or a Name".into(),
            ));
        }
        def.checks.retain(|c| c.id != check.id);
        def.checks.push(check);
        self.register(def, source).await
    }

    /// Removes one check from its instance (`/v1/agent/check/deregister/<id>`).
    pub async fn remove_check(&self, check_id: &str) -> Result<u64, RegistryError> {
        let owner = self
            .lock()
            .check_owner
            .get(check_id)
            .cloned()
            .ok_or_else(|| RegistryError::UnknownCheck(check_id.to_string()))?;
        let (mut def, source) = self
            .definition(&owner)
            .ok_or_else(|| RegistryError::UnknownCheck(check_id.to_string()))?;
        def.checks.retain(|c| c.id != check_id);
        self.register(def, source).await
    }

    /// IDs of the registrations that came from the given source.
    pub fn ids_from(&self, source: Source) -> Vec<String> {
        self.lock()
            .regs
            .values()
            .filter(|r| r.stored.source == source)
            .map(|r| r.stored.def.id.to_string())
            .collect()
    }

    /// The registration's definition as given, when it exists.
    pub fn definition(&self, id: &str) -> Option<(ServiceDef, Source)> {
        self.lock()
            .regs
            .get(id)
            .map(|r| (ServiceDef::clone(&r.stored.def), r.stored.source))
    }

    /// Deregisters instances whose checks have been critical for longer than their
    /// `DeregisterCriticalServiceAfter`.
    pub async fn reap(&self) {
        let now = Instant::now();
        let expired: Vec<String> = self
            .lock()
            .regs
            .values()
            .filter(|r| {
                r.checks.iter().any(|c| {
                    matches!((c.def.deregister_critical_after, c.critical_since),
                        (Some(after), Some(since)) if now.duration_since(since) >= after)
                })
            })
            .map(|r| r.stored.def.id.to_string())
            .collect();
        for id in expired {
            tracing::info!(id, "deregistering an instance critical for too long");
            match self.deregister(&id).await {
                // Its own check's task may have been first.
                Ok(_) | Err(RegistryError::UnknownService(_)) => {}
                Err(e) => tracing::warn!(id, error = %e, "reaping failed"),
            }
        }
    }

    /// Called by probe tasks with a probe's result; applies hysteresis.
    fn probe_result(&self, check_id: &str, generation: u64, result: Health, output: String) {
        let mut inner = self.lock();
        let Ok((reg, i)) = find_check(&mut inner, check_id) else {
            return;
        };
        let check = &mut reg.checks[i];
        if check.generation != generation {
            return;
        }
        self.metrics
            .check_runs
            .get_or_create(&crate::metrics::CheckLabels {
                kind: check.kind.name(),
                result: result.as_str(),
            })
            .inc();
        let fall = check
            .def
            .failures_before_critical
            .unwrap_or(self.settings.health.failures_before_critical)
            .max(1);
        let rise = check
            .def
            .successes_before_passing
            .unwrap_or(self.settings.health.successes_before_passing)
            .max(1);
        let next = match result {
            Health::Passing => {
                check.successes += 1;
                check.failures = 0;
                (check.status == Health::Passing || check.successes >= rise)
                    .then_some(Health::Passing)
            }
            Health::Critical => {
                check.failures += 1;
                check.successes = 0;
                (check.status == Health::Critical || check.failures >= fall)
                    .then_some(Health::Critical)
            }
            Health::Warning => {
                check.successes = 0;
                check.failures = 0;
                Some(Health::Warning)
            }
        };
        let status = next.unwrap_or(check.status);
        if set_status(check, status, output, &self.metrics) {
            // Nobody waits on health flips: they are published once durable.
            let id = reg.stored.def.id.clone();
            drop(self.queue_state(&mut inner, &id, None));
            drop(inner);
            self.maybe_compact();
        }
    }

    /// The TTL deadline of a check, the notifier a heartbeat pokes, whether its expiry is
    /// recorded, and when its instance is to be deregistered (critical since, plus its
    /// `DeregisterCriticalServiceAfter`), if it is.
    fn ttl_state(&self, check_id: &str, generation: u64) -> Option<health::TtlState> {
        let mut inner = self.lock();
        let (reg, i) = find_check(&mut inner, check_id).ok()?;
        let c = &reg.checks[i];
        (c.generation == generation).then(|| health::TtlState {
            deadline: c.ttl_deadline,
            notify: c.ttl_notify.clone(),
            recorded: c.status == Health::Critical && c.output == TTL_EXPIRED,
            deregister_at: deregister_at(c),
        })
    }

    /// Deregisters the instance of a check whose `DeregisterCriticalServiceAfter` has run
    /// out, at once rather than at the reaper's next round (a Eureka lease ends exactly when
    /// its duration passes). The deregistration runs on a task of its own: it stops the
    /// check's task that asked for it.
    fn reap_check(&self, check_id: &str, generation: u64) {
        let id = {
            let mut inner = self.lock();
            let Ok((reg, i)) = find_check(&mut inner, check_id) else {
                return;
            };
            let c = &reg.checks[i];
            match deregister_at(c) {
                Some(at) if c.generation == generation && Instant::now() >= at => {
                    reg.stored.def.id.to_string()
                }
                _ => return,
            }
        };
        let Some(this) = self.this.upgrade() else {
            return;
        };
        self.runtime.spawn(async move {
            tracing::info!(id, "deregistering an instance whose check stayed critical");
            match this.deregister(&id).await {
                Ok(_) | Err(RegistryError::UnknownService(_)) => {}
                Err(e) => tracing::warn!(id, error = %e, "deregistration failed"),
            }
        });
    }

    fn ttl_expired(&self, check_id: &str, generation: u64) {
        let mut inner = self.lock();
        let Ok((reg, i)) = find_check(&mut inner, check_id) else {
            return;
        };
        let check = &mut reg.checks[i];
        if check.generation != generation || Instant::now() < check.ttl_deadline {
            return;
        }
        self.metrics
            .check_runs
            .get_or_create(&crate::metrics::CheckLabels {
                kind: "ttl",
                result: "critical",
            })
            .inc();
        if set_status(check, Health::Critical, TTL_EXPIRED.into(), &self.metrics) {
            let id = reg.stored.def.id.clone();
            drop(self.queue_state(&mut inner, &id, None));
            drop(inner);
            self.maybe_compact();
        }
    }

    /// Adds a registration to the table and starts its checks, each in the state `stored`
    /// gives it (a re-registration carries states over, a restart restores them); the caller
    /// queues or publishes it.
    fn install(
        &self,
        inner: &mut Inner,
        stored: Arc<StoredReg>,
    ) -> Result<CompactString, RegistryError> {
        let now = Instant::now();
        let def = &stored.def;
        let mut checks = Vec::with_capacity(def.checks.len());
        for check in &def.checks {
            let kind = check.kind()?;
            inner.generation += 1;
            let (status, output) = stored
                .checks
                .iter()
                .find(|s| s.id == check.id)
                .map(|s| (s.status, s.output.clone()))
                .unwrap_or_else(|| {
                    (
                        check.status.unwrap_or(self.settings.health.initial_status),
                        String::new(),
                    )
                });
            let ttl = match kind {
                CheckKind::Ttl { ttl } => ttl,
                _ => Duration::ZERO,
            };
            checks.push(CheckState {
                def: check.clone(),
                kind,
                generation: inner.generation,
                status,
                output,
                successes: 0,
                failures: 0,
                critical_since: (status == Health::Critical).then_some(now),
                ttl_deadline: now + ttl,
                ttl_notify: Arc::new(Notify::new()),
            });
        }
        let tasks = checks
            .iter()
            .filter(|c| c.kind != CheckKind::External)
            .map(|c| {
                health::spawn(
                    &self.runtime,
                    self.this.clone(),
                    c.def.id.clone(),
                    c.generation,
                    c.kind.clone(),
                    health::Timing::of(&c.def, &self.settings.health),
                    c.def.header.clone(),
                    if c.def.tls_skip_verify {
                        self.http_insecure.clone()
                    } else {
                        self.http.clone()
                    },
                )
            })
            .collect();
        let id = def.id.clone();
        for c in &checks {
            inner.check_owner.insert(c.def.id.clone(), id.to_string());
        }
        let vips = inner.vips.install(&def.name, &def.tags, &stored.vips);
        // The stored form lists exactly the checks that run, with their states, and the VIPs
        // it has.
        let stored = if states(&checks) == stored.checks && vips == stored.vips {
            stored
        } else {
            Arc::new(StoredReg {
                checks: states(&checks),
                vips,
                ..StoredReg::clone(&stored)
            })
        };
        let reg = Reg {
            stored,
            checks,
            tasks,
            last_change: 0,
            created: 0,
        };
        inner.regs.insert(id.clone(), Box::new(reg));
        Ok(id)
    }

    fn uninstall(&self, inner: &mut Inner, id: &str) -> Option<Box<Reg>> {
        let reg = inner.regs.remove(id)?;
        for c in &reg.checks {
            inner.check_owner.remove(&c.def.id);
        }
        inner.vips.uninstall(&reg.stored.def.name);
        Some(reg)
    }

    /// What the mirror says about `service` as a whole: its VIPs and selection settings.
    fn attrs(&self, inner: &Inner, service: &str) -> ServiceAttrs {
        ServiceAttrs {
            vips: inner.vips.of(service),
            panic_threshold: self
                .settings
                .panic_thresholds
                .get(service.to_ascii_lowercase().as_str())
                .copied()
                .unwrap_or(0.0),
        }
    }

    /// Queues a registration's changed state (maintenance when `Some`, check statuses) as a
    /// change; `Err` with what to wait on when nothing changed.
    fn queue_state(
        &self,
        inner: &mut Inner,
        id: &str,
        maintenance: Option<Option<String>>,
    ) -> Result<(u64, Pending), Waits> {
        let Some(reg) = inner.regs.get_mut(id) else {
            return Err(self.waits_on(inner, id));
        };
        let before = reg.stored.clone();
        let next = StoredReg {
            def: before.def.clone(),
            source: before.source,
            maintenance: maintenance.unwrap_or_else(|| before.maintenance.clone()),
            checks: states(&reg.checks),
            vips: before.vips.clone(),
        };
        if next == *before {
            return Err(self.waits_on(inner, id));
        }
        reg.stored = Arc::new(next);
        let stored = reg.stored.clone();
        let instance = self.instance(reg);
        let id = before.def.id.clone();
        let attrs = self.attrs(inner, &instance.service);
        Ok(self.queue(
            inner,
            Undo::States { id, before },
            Publish::Upsert {
                instance: Box::new(instance),
                moved_from: None,
                attrs,
            },
            |index| self.store.put(index, &stored),
        ))
    }

    /// Takes the next change index for a change and queues its record (`write`) to the store;
    /// the change is published once the record is durable, or undone if it cannot be.
    fn queue(
        &self,
        inner: &mut Inner,
        undo: Undo,
        publish: Publish,
        write: impl FnOnce(u64) -> Pending,
    ) -> (u64, Pending) {
        let index = inner.queued + 1;
        inner.queued = index;
        let pending = write(index);
        if let Some(reg) = inner.regs.get_mut(undo.id()) {
            reg.last_change = index;
            if reg.created == 0 {
                reg.created = index;
            }
        }
        inner.pending.push_back(Change {
            index,
            undo,
            publish,
        });
        self.update_gauges(inner);
        (index, pending)
    }

    /// For a write that changed nothing: what it must wait for before it answers (a change
    /// to the same registration that is not durable yet).
    fn waits_on(&self, inner: &Inner, id: &str) -> Waits {
        let last = inner.regs.get(id).map_or(0, |r| r.last_change);
        Waits {
            flush: last > inner.published,
        }
    }

    fn instance(&self, reg: &Reg) -> Instance {
        let def = &reg.stored.def;
        let maintenance = &reg.stored.maintenance;
        let mut checks: Vec<CheckView> = reg
            .checks
            .iter()
            .map(|c| CheckView {
                id: c.def.id.clone(),
                name: c.def.name.clone(),
                kind: c.kind.name().into(),
                status: c.status,
                output: c.output.clone(),
                notes: c.def.notes.clone(),
            })
            .collect();
        if let Some(reason) = maintenance {
            checks.push(CheckView {
                id: format!("_service_maintenance:{}", def.id),
                name: "Service Maintenance Mode".into(),
                kind: "maintenance".into(),
                status: Health::Critical,
                output: String::new(),
                notes: reason.clone(),
            });
        }
        Instance {
            id: def.id.clone(),
            service: def.name.clone(),
            address: if def.address.is_empty() {
                // Consul's rule: a service without an address is at its node's.
                match &def.external_node {
                    Some(n) if !n.address.is_empty() => n.address.as_str().into(),
                    _ => self.settings.node_address.as_str().into(),
                }
            } else {
                def.address.clone()
            },
            port: def.port,
            tags: def.tags.clone(),
            meta: def.meta.clone(),
            weight_passing: def.weights.passing,
            weight_warning: def.weights.warning,
            checks,
            draining: maintenance.is_some(),
            node: def.external_node.as_ref().map(|n| n.name.clone()),
            create_index: 0,
            modify_index: 0,
            extra: extra(def),
        }
    }

    fn update_gauges(&self, inner: &Inner) {
        self.metrics.instances.set(inner.regs.len() as i64);
        self.metrics
            .services
            .set(self.mirror.service_count() as i64);
    }

    /// Compacts the store when its log has grown long (and no compaction is under way).
    fn maybe_compact(&self) {
        let inner = self.lock();
        let threshold = self
            .settings
            .compact_after_records
            .max(2 * inner.regs.len() as u64);
        if self.store.records_since_compaction() >= threshold && !self.store.compacting() {
            self.compact_locked(&inner);
        }
    }

    /// Compacts the store now: the snapshot is written from the registrations' shared stored
    /// forms, taken under the lock (a pointer each); it is serialized and written without it.
    pub fn compact(&self) {
        let inner = self.lock();
        self.compact_locked(&inner);
    }

    fn compact_locked(&self, inner: &Inner) {
        let regs = inner.regs.values().map(|r| r.stored.clone()).collect();
        let indexes = inner
            .regs
            .iter()
            .filter(|(_, r)| r.created > 0)
            .map(|(id, r)| (id.to_string(), [r.created, r.last_change]))
            .collect();
        self.store.compact(inner.queued, regs, indexes);
    }

    /// Whether a compaction is under way.
    pub fn compacting(&self) -> bool {
        self.store.compacting()
    }

    /// Finishes a client's write: compacts the store when due, then waits until the change is
    /// durable and published and returns its change index. A write that changed nothing waits
    /// for the change before it to the same registration, then returns the current index.
    async fn committed(&self, queued: Result<(u64, Pending), Waits>) -> Result<u64, RegistryError> {
        match queued {
            Ok((index, pending)) => {
                self.maybe_compact();
                pending.wait().await?;
                Ok(index)
            }
            Err(Waits { flush }) => {
                if flush {
                    self.store.flush().await?;
                }
                Ok(self.lock().published)
            }
        }
    }

    /// Waits until every queued write is durable (used at shutdown).
    pub async fn flush(&self) -> Result<(), StoreError> {
        self.store.flush().await
    }
}

/// What a write that changed nothing waits for.
struct Waits {
    flush: bool,
}

/// The rarely set parts of a definition, when it has any.
fn extra(def: &ServiceDef) -> Option<Box<Extra>> {
    let node = def.external_node.as_ref();
    let extra = Extra {
        tagged_addresses: def.tagged_addresses.clone(),
        enable_tag_override: def.enable_tag_override,
        node_address: node.map(|n| n.address.clone()).unwrap_or_default(),
        node_meta: node.map(|n| n.meta.clone()).unwrap_or_default(),
    };
    (extra != Extra::default()).then(|| Box::new(extra))
}

fn find_check<'a>(
    inner: &'a mut Inner,
    check_id: &str,
) -> Result<(&'a mut Reg, usize), RegistryError> {
    let owner = inner
        .check_owner
        .get(check_id)
        .ok_or_else(|| RegistryError::UnknownCheck(check_id.to_string()))?;
    let reg = inner
        .regs
        .get_mut(owner.as_str())
        .ok_or_else(|| RegistryError::UnknownCheck(check_id.to_string()))?;
    let i = reg
        .checks
        .iter()
        .position(|c| c.def.id == check_id)
        .ok_or_else(|| RegistryError::UnknownCheck(check_id.to_string()))?;
    Ok((reg, i))
}

/// Sets a check's status and output; true when anything visible changed.
fn set_status(check: &mut CheckState, status: Health, output: String, metrics: &Metrics) -> bool {
    if check.status == status && check.output == output {
        return false;
    }
    if check.status != status {
        tracing::info!(check = %check.def.id, from = check.status.as_str(), to = status.as_str(), output, "check changed status");
        metrics
            .check_transitions
            .get_or_create(&TransitionLabels {
                to: status.as_str(),
            })
            .inc();
        check.critical_since = (status == Health::Critical).then(Instant::now);
    }
    check.status = status;
    check.output = output;
    true
}

/// When a critical check's instance is due to be deregistered, if it has a
/// `DeregisterCriticalServiceAfter`.
fn deregister_at(c: &CheckState) -> Option<Instant> {
    Some(c.critical_since? + c.def.deregister_critical_after?)
}

/// The stored states of running checks.
fn states(checks: &[CheckState]) -> Vec<StoredCheck> {
    checks
        .iter()
        .map(|c| StoredCheck {
            id: c.def.id.clone(),
            status: c.status,
            output: c.output.clone(),
        })
        .collect()
}

#[cfg(test)]
mod tests;
