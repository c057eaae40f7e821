use std::collections::BTreeMap;

use super::*;
use crate::store::Store;

fn def(n: usize) -> ServiceDef {
    ServiceDef {
        name: format!("svc-{}", n % 1000).into(),
        id: format!("inst-{n}").into(),
        address: format!("10.{}.{}.{}", n >> 16, (n >> 8) & 255, n & 255).into(),
        port: 9000,
        tags: vec!["v1".into(), "blue".into()],
        meta: BTreeMap::from([
            ("team".to_string(), "payments".to_string()),
            ("build".to_string(), format!("build-{n}")),
        ]),
        weights: def::Weights::default(),
        checks: vec![],
        tagged_addresses: BTreeMap::new(),
        enable_tag_override: false,
        external_node: None,
        eureka: None,
    }
}

fn settings() -> Settings {
    Settings {
        node_address: "127.0.0.1".into(),
        zone: "mesh.internal".into(),
        health: HealthConfig::default(),
        compact_after_records: 10_000,
        vip_range: Default::default(),
        panic_thresholds: Default::default(),
    }
}

/// The registry's lock is held only to take a pointer to each registration; serializing and
/// writing the snapshot happen elsewhere, so writes go on (and are durable) meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registrations_complete_while_a_large_compaction_runs() {
    const INSTANCES: usize = 100_000;
    let dir = tempfile::tempdir().unwrap();
    let metrics = Arc::new(Metrics::new());
    let (store, mut loaded) = Store::open(dir.path(), false, metrics.clone()).unwrap();
    loaded.registrations = (0..INSTANCES)
        .map(|n| StoredReg {
            def: Arc::new(def(n)),
            source: Source::Api,
            maintenance: None,
            checks: vec![],
            vips: Default::default(),
        })
        .collect();
    let registry = Registry::new(Arc::new(Mirror::new(0)), store, loaded, settings(), metrics);

    let started = Instant::now();
    registry.compact();
    let locked = started.elapsed();
    let mut during = Vec::new();
    let mut after = 0;
    for n in INSTANCES..INSTANCES + 200 {
        let t = Instant::now();
        registry.register(def(n), Source::Api).await.unwrap();
        if registry.compacting() {
            during.push(t.elapsed());
        } else {
            after += 1;
            break;
        }
    }
    for _ in 0..6000 {
        if !registry.compacting() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(!registry.compacting(), "the compaction never finished");
    let compaction = started.elapsed();
    during.sort();
    eprintln!(
        "compaction of {INSTANCES} instances: {compaction:?}, lock held {locked:?}; \
         {} registrations completed during it: median {:?}, max {:?}",
        during.len(),
        during.get(during.len() / 2),
        during.last()
    );
    assert!(
        !during.is_empty(),
        "no registration completed while the compaction ran ({compaction:?})"
    );
    assert!(
        during.len() + after > 1,
        "registrations stalled behind the compaction"
    );

    // Everything is on disk: the snapshot, and the log records that follow it.
    let written = INSTANCES + during.len() + after;
    let index = registry.mirror().index();
    drop(registry);
    let mut loaded = None;
    for _ in 0..500 {
        match Store::open(dir.path(), false, Arc::new(Metrics::new())) {
            Ok((_, l)) => {
                loaded = Some(l);
                break;
            }
            Err(StoreError::Locked(_)) => std::thread::sleep(Duration::from_millis(10)),
            Err(e) => panic!("{e}"),
        }
    }
    let loaded = loaded.expect("the store was released");
    assert_eq!(loaded.registrations.len(), written);
    assert_eq!(loaded.index, index);
}

/// A TTL check with `DeregisterCriticalServiceAfter` of zero (a Eureka lease) removes its
/// instance as soon as the TTL passes without a heartbeat: not at the reaper's next round.
/// Heartbeats keep it; `register_with` sets maintenance in the same change as the
/// registration, so no reader sees the instance without it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lease_ends_when_its_ttl_passes_and_maintenance_comes_with_the_registration() {
    let dir = tempfile::tempdir().unwrap();
    let metrics = Arc::new(Metrics::new());
    let (store, loaded) = Store::open(dir.path(), false, metrics.clone()).unwrap();
    let mirror = Arc::new(Mirror::new(0));
    let registry = Registry::new(mirror.clone(), store, loaded, settings(), metrics);
    let ttl = Duration::from_millis(300);
    let mut d = def(1);
    d.checks = vec![CheckDef {
        id: "lease".into(),
        ttl: Some(ttl),
        deregister_critical_after: Some(Duration::ZERO),
        status: Some(Health::Passing),
        ..CheckDef::default()
    }];
    let index = registry
        .register_with(d.clone(), Source::Api, Some(Some("starting".into())))
        .await
        .unwrap();
    let view = mirror.service(&d.name).unwrap();
    assert!(
        view.instances[0].draining,
        "in maintenance from its first change"
    );
    assert_eq!(view.index, index);
    registry
        .register_with(d.clone(), Source::Api, Some(None))
        .await
        .unwrap();
    assert!(!mirror.service(&d.name).unwrap().instances[0].draining);

    // Heartbeats at half the TTL keep it for three TTLs.
    let started = Instant::now();
    while started.elapsed() < ttl * 3 {
        registry
            .ttl_update("lease", Health::Passing, None)
            .await
            .unwrap();
        tokio::time::sleep(ttl / 2).await;
        assert!(
            mirror.instance(&d.name, &d.id).is_some(),
            "gone while renewed"
        );
    }
    // Then none: gone within the TTL and 100 ms of the last one.
    registry
        .ttl_update("lease", Health::Passing, None)
        .await
        .unwrap();
    let last = Instant::now();
    while mirror.instance(&d.name, &d.id).is_some() {
        assert!(
            last.elapsed() < ttl + Duration::from_millis(100),
            "still there {:?} after the last heartbeat",
            last.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert!(
        last.elapsed() >= ttl,
        "gone {:?} after the last heartbeat, before its TTL",
        last.elapsed()
    );
    assert!(registry.definition(&d.id).is_none());
}
