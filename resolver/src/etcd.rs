//! This host's registrations in etcd, when etcd is the registry of record (`--etcd`).
//!
//! The embedded registry stays the authority for what was registered on this host: a
//! registration is durable in the local data dir when it is acknowledged and its checks run
//! here. The [`Publisher`] follows the registry's own mirror (the local one) and writes each
//! instance, health included, to `<prefix>instances/<node>/<service>/<id>`, attached to a
//! lease that it keeps alive. On every (re)connection it first makes the node's keys equal to
//! the local registrations (writing what is missing or different, deleting what the host no
//! longer has), then writes each change as it comes. If the host dies its lease expires and
//! its instances leave every host's answers; if it was only cut off it writes everything
//! again when it is back, so an acknowledged registration is never lost whether etcd is up or
//! not. What DNS and the API answer comes from etcd, through the follower
//! ([`waymark_shared::follow::etcd`]), on this host as on every other.
//!
//! Before it writes an instance, the publisher makes sure its service, and each of its tags
//! that can be a DNS label, has a VIP in etcd: where [`vip::place`] puts the name, allocated
//! in a transaction that creates the VIP key and the address key together only if neither
//! exists, so that hosts racing for one name or one address agree. VIPs carry no lease and
//! stay with the service.

use std::collections::{HashMap, HashSet};
use std::net::Ipv4Addr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use compact_str::CompactString;
use waymark_shared::etcd::client::{
    self as etcd_client, Compare, CompareOp, PutOptions, Txn, TxnOp, TxnOpResponse,
};
use waymark_shared::etcd::keys::{encode_instance, Layout};
use waymark_shared::etcd::{list_prefix, EtcdConfig, EtcdError};
use waymark_shared::follow::etcd::{load_snapshot, EtcdFollower, FollowStats};
use waymark_shared::follow::RegistryStatus;
use waymark_shared::lifecycle::readiness::Readiness;
use waymark_shared::vip::{self, VipRange};
use waymark_shared::Instance;
use waymark_shared::Mirror;

/// etcd's default limit on operations in one transaction is 128.
const TXN_OPS: usize = 100;

#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    #[error(transparent)]
    Etcd(#[from] EtcdError),
    #[error("etcd: {0}")]
    Client(#[from] etcd_client::Error),
    #[error("the lease expired (etcd did not hear from this host in time)")]
    LeaseExpired,
    #[error("the lease keep-alive stream ended")]
    KeepAliveEnded,
    #[error("etcd has not answered a lease keep-alive for {0:?}")]
    KeepAliveSilent(Duration),
}

/// How the link to etcd stands, for readiness and metrics.
#[derive(Debug, Default)]
pub struct PublishStatus {
    /// Every local registration is in etcd as of the last sync.
    synced: AtomicBool,
    /// Instance writes and deletions sent.
    pub writes: AtomicU64,
    /// Full syncs (at start and after every reconnection).
    pub syncs: AtomicU64,
    /// Sessions that failed (etcd unreachable, lease lost).
    pub failures: AtomicU64,
    last_error: Mutex<Option<(Instant, String)>>,
}

impl PublishStatus {
    pub fn synced(&self) -> bool {
        self.synced.load(Ordering::Acquire)
    }

    /// Why the last session failed and how long ago, while not synced.
    pub fn problem(&self) -> Option<String> {
        if self.synced() {
            return None;
        }
        let last = self.last_error.lock().unwrap_or_else(|e| e.into_inner());
        last.as_ref()
            .map(|(at, e)| format!("{e} ({:.0?} ago)", at.elapsed()))
    }

    fn failed(&self, e: &PublishError) {
        self.synced.store(false, Ordering::Release);
        self.failures.fetch_add(1, Ordering::Relaxed);
        *self.last_error.lock().unwrap_or_else(|e| e.into_inner()) =
            Some((Instant::now(), e.to_string()));
    }
}

/// What this host has in etcd: the value under each of its keys, and its keys by service
/// (lowercased), so that a change to one service looks at that service's keys only.
#[derive(Default)]
struct Written {
    values: HashMap<String, Vec<u8>>,
    by_service: HashMap<String, HashSet<String>>,
}

impl Written {
    fn insert(&mut self, service: &str, key: String, value: Vec<u8>) {
        self.by_service
            .entry(service.to_ascii_lowercase())
            .or_default()
            .insert(key.clone());
        self.values.insert(key, value);
    }

    fn remove(&mut self, service: &str, key: &str) {
        let service = service.to_ascii_lowercase();
        if let Some(keys) = self.by_service.get_mut(&service) {
            keys.remove(key);
            if keys.is_empty() {
                self.by_service.remove(&service);
            }
        }
        self.values.remove(key);
    }

    fn get(&self, key: &str) -> Option<&Vec<u8>> {
        self.values.get(key)
    }

    fn len(&self) -> usize {
        self.values.len()
    }
}

/// What a session knows of the VIPs in etcd: the VIP keys that exist and the addresses
/// taken.
#[derive(Default)]
struct VipsKnown {
    keys: HashSet<String>,
    taken: HashSet<Ipv4Addr>,
}

pub struct Publisher {
    config: EtcdConfig,
    range: VipRange,
    members: waymark_shared::etcd::Members,
    layout: Layout,
    node: String,
    local: Arc<Mirror>,
    status: Arc<PublishStatus>,
}

impl Publisher {
    pub fn new(
        config: EtcdConfig,
        range: VipRange,
        local: Arc<Mirror>,
        status: Arc<PublishStatus>,
    ) -> Result<Publisher, EtcdError> {
        Ok(Publisher {
            range,
            members: Default::default(),
            layout: config.layout()?,
            node: config.node(),
            config,
            local,
            status,
        })
    }

    /// Publishes until `stop` turns true; then revokes nothing (a restart writes the same
    /// keys again, and a host that is gone for good leaves when its lease expires).
    pub async fn run(&self, stop: tokio::sync::watch::Receiver<bool>) {
        let failed = |e: &PublishError| {
            if self.status.synced() {
                tracing::warn!(error = %e, node = %self.node, "etcd publisher: lost etcd; registrations are kept here and written again when it is back");
            } else {
                tracing::debug!(error = %e, "etcd publisher: still failing");
            }
            self.status.failed(e);
        };
        waymark_shared::etcd::run_sessions(stop, || self.session(), failed).await;
    }

    /// One lease: grant it, sync everything, then write changes and keep it alive until
    /// something fails.
    async fn session(&self) -> Result<(), PublishError> {
        let mut client = self.members.connect(&self.config).await?;
        let ttl = self.config.lease_ttl.as_secs().max(1) as i64;
        let lease = client.lease_grant(ttl, None).await?.id();
        let (mut keeper, mut alive) = client.lease_keep_alive(lease).await?;
        let mut changed = self.local.subscribe();
        // Everything as of now; changes after it come through `changed`.
        let mut index = self.local.index();
        changed.borrow_and_update();
        let mut vips = self.load_vips(&mut client).await?;
        let mut written = self.full_sync(&mut client, lease, &mut vips).await?;
        self.status.syncs.fetch_add(1, Ordering::Relaxed);
        self.status.synced.store(true, Ordering::Release);
        tracing::info!(node = %self.node, lease, instances = written.len(), "etcd publisher: in sync");

        let every = self.config.lease_ttl / 3;
        let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
        // A keep-alive stream to a member that died answers nothing and fails nothing: the
        // lease would expire, and with it this host's keys, while nothing here noticed.
        let mut answered = Instant::now();
        loop {
            tokio::select! {
                r = changed.changed() => {
                    if r.is_err() {
                        return Ok(());
                    }
                    let changes = self.local.changes_since(index);
                    index = changes.index;
                    if changes.reset {
                        written = self.full_sync(&mut client, lease, &mut vips).await?;
                    } else {
                        let mut touched: Vec<CompactString> =
                            changes.services.iter().map(|v| v.name.clone()).collect();
                        touched.extend(changes.removed.iter().map(CompactString::from));
                        self.sync_services(&mut client, lease, &touched, &mut written, &mut vips)
                            .await?;
                    }
                }
                _ = tick.tick() => {
                    let silent = answered.elapsed();
                    if silent > every * 2 {
                        return Err(PublishError::KeepAliveSilent(silent));
                    }
                    keeper.keep_alive().await?;
                }
                message = alive.message() => match message? {
                    None => return Err(PublishError::KeepAliveEnded),
                    Some(r) if r.ttl() <= 0 => return Err(PublishError::LeaseExpired),
                    Some(_) => answered = Instant::now(),
                },
            }
        }
    }

    /// The keys and values the local registrations should have, for some services (all when
    /// `services` is `None`).
    fn wanted(&self, services: Option<&[CompactString]>) -> (Written, Vec<Arc<Instance>>) {
        let views = match services {
            None => self.local.services(),
            Some(names) => names.iter().filter_map(|n| self.local.service(n)).collect(),
        };
        let instances: Vec<Arc<Instance>> = views
            .iter()
            .flat_map(|v| v.instances.iter().cloned())
            .collect();
        let mut written = Written::default();
        for i in &instances {
            let key = self.layout.instance_key(&self.node, &i.service, &i.id);
            written.insert(&i.service, key, encode_instance(i));
        }
        (written, instances)
    }

    /// The VIP keys and taken addresses in etcd now.
    async fn load_vips(&self, client: &mut etcd_client::Client) -> Result<VipsKnown, PublishError> {
        let mut known = VipsKnown::default();
        let (_, keys) = list_prefix(client, &self.layout.vips(), true).await?;
        for kv in &keys {
            if let Ok(k) = kv.key_str() {
                known.keys.insert(k.to_string());
            }
        }
        let (_, addresses) = list_prefix(client, &self.layout.vip_addresses(), true).await?;
        for kv in &addresses {
            let ip = kv
                .key_str()
                .ok()
                .and_then(|k| k.rsplit('/').next()?.parse().ok());
            if let Some(ip) = ip {
                known.taken.insert(ip);
            }
        }
        Ok(known)
    }

    /// Makes sure the service of each instance, and each of its tags that can be a DNS
    /// label, has a VIP in etcd.
    async fn ensure_vips(
        &self,
        client: &mut etcd_client::Client,
        instances: &[Arc<Instance>],
        known: &mut VipsKnown,
    ) -> Result<(), PublishError> {
        for i in instances {
            let names = std::iter::once(None).chain(
                i.tags
                    .iter()
                    .filter(|t| crate::dns::names::check_tag(t))
                    .map(|t| Some(t.as_str())),
            );
            for tag in names {
                let key = self.layout.vip_key(&i.service, tag);
                if !known.keys.contains(&key) {
                    self.allocate(client, &i.service, tag, &key, known).await?;
                }
            }
        }
        Ok(())
    }

    /// Creates one VIP: at the name's place in the range, or the next address free there,
    /// in a transaction that fails if another host made the key, or took the address, first.
    async fn allocate(
        &self,
        client: &mut etcd_client::Client,
        service: &str,
        tag: Option<&str>,
        key: &str,
        known: &mut VipsKnown,
    ) -> Result<(), PublishError> {
        let name = vip::key(service, tag);
        for _ in 0..self.range.capacity().min(1024) {
            let Some(ip) = vip::place(&self.range, &name, |ip| known.taken.contains(&ip)) else {
                break;
            };
            let address = self.layout.vip_address_key(ip);
            let txn = Txn::new()
                .when([
                    Compare::create_revision(key, CompareOp::Equal, 0),
                    Compare::create_revision(address.as_str(), CompareOp::Equal, 0),
                ])
                .and_then([
                    TxnOp::put(key, ip.to_string(), None),
                    TxnOp::put(address.as_str(), name.as_str(), None),
                ])
                .or_else([TxnOp::get(key, None)]);
            let resp = client.txn(txn).await?;
            if resp.succeeded() {
                tracing::info!(name, %ip, "VIP allocated in etcd");
                known.keys.insert(key.to_string());
                known.taken.insert(ip);
                return Ok(());
            }
            let exists = resp
                .op_responses()
                .into_iter()
                .any(|r| matches!(r, TxnOpResponse::Get(g) if !g.kvs().is_empty()));
            if exists {
                // Another host allocated this name first.
                known.keys.insert(key.to_string());
                return Ok(());
            }
            // The address went to another name meanwhile: the next one.
            known.taken.insert(ip);
        }
        tracing::warn!(name, range = %self.range, "no VIP left in the range for this name");
        // Do not try again for every write of the service.
        known.keys.insert(key.to_string());
        Ok(())
    }

    /// Makes the node's keys in etcd equal to the local registrations.
    async fn full_sync(
        &self,
        client: &mut etcd_client::Client,
        lease: i64,
        vips: &mut VipsKnown,
    ) -> Result<Written, PublishError> {
        let prefix = self.layout.node_instances(&self.node);
        let (_, existing) = list_prefix(client, &prefix, false).await?;
        let mut current: HashMap<String, Vec<u8>> = HashMap::new();
        for kv in &existing {
            if let Ok(key) = kv.key_str() {
                // Keys under another lease (a previous run's) are written again under this
                // one, even when the value is the same.
                if kv.lease() == lease {
                    current.insert(key.to_string(), kv.value().to_vec());
                } else {
                    current.insert(key.to_string(), Vec::new());
                }
            }
        }
        let (wanted, instances) = self.wanted(None);
        self.ensure_vips(client, &instances, vips).await?;
        let mut ops = Vec::new();
        for (key, value) in &wanted.values {
            if current.get(key) != Some(value) {
                ops.push(TxnOp::put(
                    key.as_str(),
                    value.clone(),
                    Some(PutOptions::new().with_lease(lease)),
                ));
            }
        }
        for key in current.keys() {
            if !wanted.values.contains_key(key) {
                ops.push(TxnOp::delete(key.as_str(), None));
            }
        }
        self.send(client, ops).await?;
        Ok(wanted)
    }

    /// Writes the local state of some services: their instances' keys, and deletes this
    /// node's keys of instances they no longer have.
    async fn sync_services(
        &self,
        client: &mut etcd_client::Client,
        lease: i64,
        services: &[CompactString],
        written: &mut Written,
        vips: &mut VipsKnown,
    ) -> Result<(), PublishError> {
        let (wanted, instances) = self.wanted(Some(services));
        self.ensure_vips(client, &instances, vips).await?;
        let mut ops = Vec::new();
        let mut gone = Vec::new();
        for service in services {
            let Some(keys) = written
                .by_service
                .get(service.as_str().to_ascii_lowercase().as_str())
            else {
                continue;
            };
            for key in keys {
                if !wanted.values.contains_key(key) {
                    ops.push(TxnOp::delete(key.as_str(), None));
                    gone.push((service.clone(), key.clone()));
                }
            }
        }
        let mut put = Vec::new();
        for i in &instances {
            let key = self.layout.instance_key(&self.node, &i.service, &i.id);
            let value = &wanted.values[&key];
            if written.get(&key) != Some(value) {
                ops.push(TxnOp::put(
                    key.as_str(),
                    value.clone(),
                    Some(PutOptions::new().with_lease(lease)),
                ));
                put.push((i.service.clone(), key, value.clone()));
            }
        }
        self.send(client, ops).await?;
        for (service, key) in gone {
            written.remove(&service, &key);
        }
        for (service, key, value) in put {
            written.insert(&service, key, value);
        }
        Ok(())
    }

    /// Sends operations in transactions of at most [`TXN_OPS`]. A put under a lease that
    /// expired fails (etcd refuses an unknown lease), which ends the session: the next one
    /// writes everything again under a new lease.
    async fn send(
        &self,
        client: &mut etcd_client::Client,
        ops: Vec<TxnOp>,
    ) -> Result<(), PublishError> {
        let count = ops.len() as u64;
        let mut ops = ops.into_iter().peekable();
        while ops.peek().is_some() {
            let chunk: Vec<TxnOp> = ops.by_ref().take(TXN_OPS).collect();
            client.txn(Txn::new().and_then(chunk)).await?;
        }
        self.status.writes.fetch_add(count, Ordering::Relaxed);
        Ok(())
    }
}

/// The resolver's link to etcd: the follower that feeds what DNS and the API answer, and the
/// publisher that writes this host's registrations.
pub struct EtcdLink {
    /// The revision of the saved mirror loaded at start, if one was.
    pub loaded: Option<u64>,
    pub follow: Arc<RegistryStatus>,
    pub stats: Arc<FollowStats>,
    pub publish: Arc<PublishStatus>,
    pub node: String,
    serving: Arc<Mirror>,
}

impl EtcdLink {
    /// Starts following etcd (`resolver.etcd`) into `serving` and publishing `local` to it,
    /// until `stop`. The mirror is saved in the data dir and, when a saved one is there, put back first: then
    /// DNS answers it at once. Otherwise `ready` waits for "etcd" until the first listing.
    pub fn start(
        resolver: &crate::config::Config,
        local: Arc<Mirror>,
        serving: Arc<Mirror>,
        ready: Arc<Readiness>,
        stop: tokio::sync::watch::Receiver<bool>,
    ) -> Result<(EtcdLink, Vec<tokio::task::JoinHandle<()>>), EtcdError> {
        let config = &resolver.etcd;
        let (range, thresholds) = (resolver.vips.range, resolver.panic_thresholds());
        let snapshot = resolver.store.data_dir.join(SNAPSHOT);
        let loaded = load_snapshot(&snapshot, &serving);
        match loaded {
            Some(revision) => {
                tracing::info!(revision, path = %snapshot.display(), "answering the saved etcd mirror until etcd answers")
            }
            None => ready.waiting_for(READY),
        }
        let follow = Arc::new(RegistryStatus::default());
        let stats = Arc::new(FollowStats::default());
        let publish = Arc::new(PublishStatus::default());
        let follower = EtcdFollower::new(
            config.clone(),
            thresholds,
            serving.clone(),
            follow.clone(),
            stats.clone(),
            Arc::new(move |_m: &Mirror| ready.done(READY)),
        )?
        .with_snapshot(snapshot);
        let publisher = Publisher::new(config.clone(), range, local, publish.clone())?;
        let tasks = vec![
            tokio::spawn({
                let stop = stop.clone();
                async move { follower.run(stop).await }
            }),
            tokio::spawn(async move { publisher.run(stop).await }),
        ];
        let link = EtcdLink {
            loaded,
            follow,
            stats,
            publish,
            node: config.node(),
            serving,
        };
        Ok((link, tasks))
    }

    /// Copies the link's state into its metrics (at every scrape).
    pub fn observe(&self, m: &crate::metrics::EtcdMetrics) {
        use crate::metrics::EtcdMetrics;
        m.connected.set(i64::from(self.follow.connected()));
        m.synced.set(i64::from(self.publish.synced()));
        m.revision
            .set(self.stats.revision.load(Ordering::Relaxed) as i64);
        if let Some(age) = self.follow.since_last_ok() {
            m.age_ms.set(age.as_millis() as i64);
        }
        EtcdMetrics::catch_up(&m.listings, self.stats.listings.load(Ordering::Relaxed));
        EtcdMetrics::catch_up(&m.events, self.stats.events.load(Ordering::Relaxed));
        EtcdMetrics::catch_up(&m.bad_values, self.stats.bad_values.load(Ordering::Relaxed));
        EtcdMetrics::catch_up(&m.writes, self.publish.writes.load(Ordering::Relaxed));
        EtcdMetrics::catch_up(
            &m.failures,
            self.follow.failures() + self.publish.failures.load(Ordering::Relaxed),
        );
    }

    /// What is wrong with the link, if anything: DNS keeps answering the last state it had.
    pub fn degraded(&self) -> Vec<String> {
        let mut out = Vec::new();
        if !self.follow.synced() {
            if let Some(revision) = self.loaded {
                out.push(format!(
                    "etcd not reached since the start ({}): answering the mirror saved at revision {revision}",
                    self.follow.last_error().unwrap_or_default()
                ));
            }
        } else if !self.follow.connected() {
            let age = self.follow.since_last_ok().map_or(String::new(), |d| {
                format!(", last heard {:.1}s ago", d.as_secs_f64())
            });
            out.push(format!(
                "etcd unreachable ({}{age}): answering the state at revision {}",
                self.follow.last_error().unwrap_or_default(),
                self.serving.index()
            ));
        }
        if let Some(p) = self.publish.problem() {
            out.push(format!(
                "this host's registrations are not all in etcd: {p}; they are kept here and written when etcd is back"
            ));
        }
        out
    }
}

/// What readiness waits for until the first listing is in.
const READY: &str = "etcd";

/// The saved mirror, in the data dir.
const SNAPSHOT: &str = "etcd-mirror.json";
