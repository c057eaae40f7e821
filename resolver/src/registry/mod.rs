//! The embedded registry of record: registrations, their health checks' state, persistence.
//!
//! Every write goes through here: it updates the registration table under one short lock,
//! publishes the resulting instance to the [`Mirror`] (which DNS and the API read, and the
//! change stream serves), queues the new state to the [`Store`], and — for writes a client is
//! waiting on — returns only once the store has made it durable. Health check tasks
//! ([`health`]) report back here, and hysteresis is applied here.

pub mod def;
pub mod health;

use std::collections::HashMap;

use compact_str::CompactString;
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant};

use tokio::sync::Notify;
use tokio::task::AbortHandle;
use waymark_shared::{CheckView, Health, Instance, Mirror};

use crate::config::HealthConfig;
use crate::dns::names::{self, NameError};
use crate::metrics::{Metrics, TransitionLabels};
use crate::store::{
    Pending, Source, Store, StoreError, StoredCheck, StoredCheckRef, StoredReg, StoredRegRef,
};
use def::{CheckDef, CheckKind, ServiceDef};

/// Log records after which the store is compacted, at the least.
const COMPACT_MIN_RECORDS: u64 = 10_000;

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
}

pub struct Registry {
    inner: Mutex<Inner>,
    mirror: Arc<Mirror>,
    store: Store,
    settings: Settings,
    metrics: Arc<Metrics>,
    http: reqwest::Client,
    http_insecure: reqwest::Client,
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
}

struct Reg {
    def: ServiceDef,
    source: Source,
    maintenance: Option<String>,
    checks: Vec<CheckState>,
    tasks: Vec<AbortHandle>,
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
    /// instance keeps its last known health until its checks run again.
    pub fn new(
        mirror: Arc<Mirror>,
        store: Store,
        restored: Vec<StoredReg>,
        settings: Settings,
        metrics: Arc<Metrics>,
    ) -> Arc<Registry> {
        let reg = Arc::new_cyclic(|this| Registry {
            inner: Mutex::new(Inner::default()),
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
            this: this.clone(),
        });
        {
            let mut inner = reg.lock();
            for stored in restored {
                let statuses: HashMap<_, _> = stored
                    .checks
                    .iter()
                    .map(|c| (c.id.clone(), (c.status, c.output.clone())))
                    .collect();
                match reg.install(
                    &mut inner,
                    stored.def,
                    stored.source,
                    stored.maintenance,
                    statuses,
                ) {
                    Ok(id) => {
                        reg.publish(&inner.regs[&id]);
                    }
                    Err(e) => tracing::error!(error = %e, "dropping a stored registration"),
                }
            }
            reg.update_gauges(&inner);
        }
        reg
    }

    pub fn mirror(&self) -> &Arc<Mirror> {
        &self.mirror
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Registers (or replaces) an instance. Returns the change index once it is durable.
    pub async fn register(&self, def: ServiceDef, source: Source) -> Result<u64, RegistryError> {
        let def = def.normalize()?;
        names::check_lengths(&def.name, &def.id, &self.settings.zone)?;
        let (index, pending) = {
            let mut inner = self.lock();
            let id = def.id.clone();
            self.check_label_free(&def)?;
            let mut carried = HashMap::new();
            if let Some(old) = inner.regs.get(&id) {
                for c in &old.checks {
                    carried.insert(c.def.id.clone(), (c.status, c.output.clone()));
                }
            }
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
            let old_service = inner.regs.get(&id).map(|r| r.def.name.clone());
            let maintenance = inner.regs.get(&id).and_then(|r| r.maintenance.clone());
            self.uninstall(&mut inner, &id);
            // An instance that moves to another service leaves the old one.
            if let Some(old) = old_service.filter(|o| !o.eq_ignore_ascii_case(&def.name)) {
                self.mirror.remove(&old, &id);
            }
            let id = self.install(&mut inner, def, source, maintenance, carried)?;
            let out = self.persist(&inner.regs[&id]);
            self.update_gauges(&inner);
            out
        };
        self.committed(index, pending).await
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

    /// Removes an instance. Returns the change index once it is durable.
    pub async fn deregister(&self, id: &str) -> Result<u64, RegistryError> {
        let (index, pending) = {
            let mut inner = self.lock();
            let Some(reg) = self.uninstall(&mut inner, id) else {
                return Err(RegistryError::UnknownService(id.to_string()));
            };
            let index = self
                .mirror
                .remove(&reg.def.name, id)
                .unwrap_or_else(|| self.mirror.index());
            self.update_gauges(&inner);
            (index, self.store.delete(index, id))
        };
        self.committed(index, pending).await
    }

    /// Sets a TTL check's status (a heartbeat) and restarts its TTL.
    pub async fn ttl_update(
        &self,
        check_id: &str,
        status: Health,
        note: Option<String>,
    ) -> Result<u64, RegistryError> {
        let (index, pending) = {
            let mut inner = self.lock();
            let (reg, i) = find_check(&mut inner, check_id)?;
            let check = &mut reg.checks[i];
            let CheckKind::Ttl { ttl } = check.kind else {
                return Err(RegistryError::NotTtl(check_id.to_string()));
            };
            check.ttl_deadline = Instant::now() + ttl;
            check.ttl_notify.notify_one();
            let output = note.unwrap_or_default();
            let changed = set_status(check, status, output, &self.metrics);
            if !changed {
                return Ok(self.mirror.index());
            }
            self.persist(reg)
        };
        self.committed(index, pending).await
    }

    /// Puts an instance in or out of maintenance (draining: never answered).
    pub async fn maintenance(
        &self,
        id: &str,
        enable: bool,
        reason: Option<String>,
    ) -> Result<u64, RegistryError> {
        let (index, pending) = {
            let mut inner = self.lock();
            let reg = inner
                .regs
                .get_mut(id)
                .ok_or_else(|| RegistryError::UnknownService(id.to_string()))?;
            reg.maintenance = enable.then(|| {
                reason
                    .filter(|r| !r.is_empty())
                    .unwrap_or_else(|| "Maintenance mode is enabled for this service".into())
            });
            self.persist(reg)
        };
        self.committed(index, pending).await
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
            .filter(|r| r.source == source)
            .map(|r| r.def.id.to_string())
            .collect()
    }

    /// The registration's definition as given, when it exists.
    pub fn definition(&self, id: &str) -> Option<(ServiceDef, Source)> {
        self.lock().regs.get(id).map(|r| (r.def.clone(), r.source))
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
            .map(|r| r.def.id.to_string())
            .collect();
        for id in expired {
            tracing::info!(id, "deregistering an instance critical for too long");
            if let Err(e) = self.deregister(&id).await {
                tracing::warn!(id, error = %e, "reaping failed");
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
            // Nobody waits on health flips: durability follows in the next group commit.
            drop(self.persist(reg));
            drop(inner);
            self.maybe_compact();
        }
    }

    /// The TTL deadline of a check, and the notifier a heartbeat pokes.
    fn ttl_state(&self, check_id: &str, generation: u64) -> Option<(Instant, Arc<Notify>)> {
        let mut inner = self.lock();
        let (reg, i) = find_check(&mut inner, check_id).ok()?;
        let c = &reg.checks[i];
        (c.generation == generation).then(|| (c.ttl_deadline, c.ttl_notify.clone()))
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
        if set_status(check, Health::Critical, "TTL expired".into(), &self.metrics) {
            drop(self.persist(reg));
            drop(inner);
            self.maybe_compact();
        }
    }

    /// Adds a registration to the table and starts its checks; the caller publishes it.
    /// `statuses` carries check states over from before (a re-registration, a restart).
    fn install(
        &self,
        inner: &mut Inner,
        def: ServiceDef,
        source: Source,
        maintenance: Option<String>,
        statuses: HashMap<String, (Health, String)>,
    ) -> Result<CompactString, RegistryError> {
        let now = Instant::now();
        let mut checks = Vec::with_capacity(def.checks.len());
        for check in &def.checks {
            let kind = check.kind()?;
            inner.generation += 1;
            let (status, output) = statuses.get(&check.id).cloned().unwrap_or_else(|| {
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
            .map(|c| {
                health::spawn(
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
        let reg = Reg {
            def,
            source,
            maintenance,
            checks,
            tasks,
        };
        inner.regs.insert(id.clone(), Box::new(reg));
        Ok(id)
    }

    fn uninstall(&self, inner: &mut Inner, id: &str) -> Option<Box<Reg>> {
        let reg = inner.regs.remove(id)?;
        for c in &reg.checks {
            inner.check_owner.remove(&c.def.id);
        }
        Some(reg)
    }

    /// Publishes a registration's instance to the mirror; returns the change index.
    fn publish(&self, reg: &Reg) -> u64 {
        let index = self
            .mirror
            .upsert(self.instance(reg))
            .unwrap_or_else(|| self.mirror.index());
        self.metrics.change_index.set(index as i64);
        index
    }

    /// Publishes and queues the registration's state for the store.
    fn persist(&self, reg: &Reg) -> (u64, Pending) {
        let index = self.publish(reg);
        let pending = self.store.put(index, &stored(reg));
        (index, pending)
    }

    fn instance(&self, reg: &Reg) -> Instance {
        let def = &reg.def;
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
        if let Some(reason) = &reg.maintenance {
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
                self.settings.node_address.as_str().into()
            } else {
                def.address.clone()
            },
            port: def.port,
            tags: def.tags.clone(),
            meta: def.meta.clone(),
            weight_passing: def.weights.passing,
            weight_warning: def.weights.warning,
            checks,
            draining: reg.maintenance.is_some(),
        }
    }

    fn update_gauges(&self, inner: &Inner) {
        self.metrics.instances.set(inner.regs.len() as i64);
        self.metrics
            .services
            .set(self.mirror.service_count() as i64);
    }

    /// Snapshots the whole table into the store when its log has grown long.
    fn maybe_compact(&self) {
        let inner = self.lock();
        let threshold = COMPACT_MIN_RECORDS.max(2 * inner.regs.len() as u64);
        if self.store.records_since_compaction() < threshold {
            return;
        }
        self.store
            .compact(self.mirror.index(), AllRegs(&inner.regs));
    }

    /// Finishes a client's write: compacts the store when due, then waits until the write is
    /// durable and returns its change index.
    async fn committed(&self, index: u64, pending: Pending) -> Result<u64, RegistryError> {
        self.maybe_compact();
        pending.wait().await.inspect_err(|_| {
            self.metrics.store_errors.inc();
        })?;
        Ok(index)
    }

    /// Waits until every queued write is durable (used at shutdown).
    pub async fn flush(&self) -> Result<(), StoreError> {
        self.store.flush().await
    }
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

/// Every registration, serialized in place for a snapshot (no copy of the table).
struct AllRegs<'a>(&'a HashMap<CompactString, Box<Reg>>);

impl serde::Serialize for AllRegs<'_> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_seq(self.0.values().map(|reg| {
            StoredRegRef {
                def: &reg.def,
                source: reg.source,
                maintenance: &reg.maintenance,
                checks: reg
                    .checks
                    .iter()
                    .map(|c| StoredCheckRef {
                        id: &c.def.id,
                        status: c.status,
                        output: &c.output,
                    })
                    .collect(),
            }
        }))
    }
}

fn stored(reg: &Reg) -> StoredReg {
    StoredReg {
        def: reg.def.clone(),
        source: reg.source,
        maintenance: reg.maintenance.clone(),
        checks: reg
            .checks
            .iter()
            .map(|c| StoredCheck {
                id: c.def.id.clone(),
                status: c.status,
                output: c.output.clone(),
            })
            .collect(),
    }
}
