//! Registrations across restarts of the real binary: a clean stop (SIGTERM) and a crash
//! (SIGKILL), both restarted on the same data dir. Everything acknowledged with 200 before
//! the stop is there after it, with its tags, metadata, checks and last health state; the
//! change index never goes back; and a crash in the middle of hundreds of concurrent
//! registrations loses none that were acknowledged.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hickory_proto::rr::RecordType;
use serde_json::{json, Value};
use waymark_e2e::dns::{self, addresses};
use waymark_e2e::{consul_index, eventually, ips, tcp_listener, Api, Resolver};

const WAIT: Duration = Duration::from_secs(10);

/// `GET /v1/agent/services` and its X-Consul-Index.
async fn services(api: &Api) -> (Value, u64) {
    let resp = api.get("/v1/agent/services").await;
    assert_eq!(resp.status(), 200);
    let i = consul_index(&resp);
    (resp.json().await.unwrap(), i)
}

async fn checks(api: &Api) -> Value {
    api.get("/v1/agent/checks").await.json().await.unwrap()
}

fn ok(resp: reqwest::Response) {
    assert_eq!(resp.status(), 200);
}

/// What a client can see of the registry, for comparing before and after a restart.
#[derive(Debug)]
struct View {
    services: Value,
    index: u64,
    checks: Value,
    payment_dns: Vec<IpAddr>,
    payment_passing: Vec<String>,
}

async fn view(r: &Resolver, api: &Api) -> View {
    let (services, index) = services(api).await;
    View {
        services,
        index,
        checks: checks(api).await,
        payment_dns: dns::a_records(r.dns, "payment.mesh.internal.").await,
        payment_passing: api.passing_ids("payment").await,
    }
}

/// Registers a little of everything, restarts the resolver with `restart`, and checks that
/// every registration, check and health state came back as it was.
async fn survives(restart: impl FnOnce(&mut Resolver)) {
    let mut r = Resolver::start();
    let api = Api::new(&r);
    let (tcp_addr, listener) = tcp_listener("127.0.0.1:0").await;

    api.register(
        json!({"Name": "payment", "ID": "pay-1", "Address": "127.0.10.1", "Port": 9000,
        "Tags": ["v1", "blue"], "Meta": {"team": "payments", "build": "42"},
        "Weights": {"Passing": 3, "Warning": 1},
        "Check": {"CheckID": "pay-1-ttl", "Name": "heartbeat", "TTL": "60s",
            "Notes": "the app sends a heartbeat"}}),
    )
    .await;
    api.register(
        json!({"Name": "payment", "ID": "pay-2", "Address": "127.0.10.2", "Port": 9001,
        "Tags": ["v2"], "Meta": {"team": "payments"},
        "Checks": [
            {"CheckID": "pay-2-ttl", "TTL": "60s"},
            {"CheckID": "pay-2-tcp", "TCP": tcp_addr.to_string(), "Interval": "200ms"}
        ]}),
    )
    .await;
    api.register(
        json!({"Name": "payment", "ID": "pay-3", "Address": "127.0.10.3", "Port": 9000,
        "Tags": ["v1"]}),
    )
    .await;
    api.register(
        json!({"Name": "ledger", "ID": "ledger-1", "Address": "127.0.10.10", "Port": 80,
        "Check": {"CheckID": "ledger-1-ttl", "TTL": "60s"}}),
    )
    .await;
    api.register(
        json!({"Name": "blink", "ID": "blink-1", "Address": "127.0.10.20", "Port": 80,
        "Check": {"CheckID": "blink-1-ttl", "TTL": "3s"}}),
    )
    .await;
    api.register(json!({"Name": "gone", "ID": "gone-1", "Address": "127.0.10.30", "Port": 80}))
        .await;
    ok(api.put_empty("/v1/agent/service/deregister/gone-1").await);

    ok(api
        .put_empty("/v1/agent/check/pass/pay-1-ttl?note=all%20good")
        .await);
    ok(api
        .put_empty("/v1/agent/check/warn/pay-2-ttl?note=slow")
        .await);
    ok(api
        .put_empty("/v1/agent/service/maintenance/pay-3?enable=true&reason=deploying")
        .await);
    let (a_ref, r_ref) = (&api, &r);
    assert!(
        eventually(WAIT, move || async move {
            checks(a_ref).await["pay-2-tcp"]["Status"] == "passing"
        })
        .await,
        "TCP check never passed: {:#?}",
        checks(&api).await
    );
    ok(api.put_empty("/v1/agent/check/pass/blink-1-ttl").await);

    let before = view(r_ref, &api).await;
    // pay-1 passing, pay-2 warning (answered, not passing), pay-3 draining.
    assert_eq!(before.payment_dns, ips(&["127.0.10.1", "127.0.10.2"]));
    assert_eq!(before.payment_passing, ["pay-1"]);
    assert_eq!(
        before.services.as_object().unwrap().len(),
        5,
        "{:#?}",
        before.services
    );

    // blink's 3s TTL has just been fed: it must not expire before the restart is done.
    restart(&mut r);

    // No polling: restored state is served from the first request on.
    let blink_right_after = dns::a_records(r.dns, "blink.mesh.internal.").await;
    let after = view(&r, &api).await;
    assert!(
        after.index >= before.index,
        "X-Consul-Index went back: {} → {}",
        before.index,
        after.index
    );
    assert_eq!(
        after.services, before.services,
        "registrations (tags, meta, weights, ports) changed"
    );
    assert!(
        after.services.get("gone-1").is_none(),
        "a deregistration came back"
    );
    assert_eq!(after.payment_dns, before.payment_dns);
    assert_eq!(after.payment_passing, before.payment_passing);
    // Every check is back with its status; TTL and maintenance checks with their output and
    // notes too (only probes rewrite those).
    for (id, c) in before.checks.as_object().unwrap() {
        let c2 = &after.checks[id];
        assert_eq!(c2["Status"], c["Status"], "{id}: {c2:#?}");
        if id != "pay-2-tcp" {
            assert_eq!(c2, c, "{id}");
        }
    }
    assert_eq!(
        after.checks.as_object().unwrap().len(),
        before.checks.as_object().unwrap().len()
    );
    assert_eq!(after.checks["pay-1-ttl"]["Output"], "all good");
    assert_eq!(after.checks["pay-2-ttl"]["Status"], "warning");
    assert_eq!(
        after.checks["_service_maintenance:pay-3"]["Notes"],
        "deploying"
    );
    assert_eq!(after.checks["ledger-1-ttl"]["Status"], "critical");
    assert!(dns::a_records(r.dns, "ledger.mesh.internal.")
        .await
        .is_empty());

    // The restored passing TTL check answered at once, then expires when its TTL runs out
    // with no heartbeat: the restored state lasts until the check runs again.
    assert_eq!(blink_right_after, ips(&["127.0.10.20"]));
    let restarted = Instant::now();
    let r_ref = &r;
    assert!(
        eventually(Duration::from_secs(8), move || async move {
            dns::a_records(r_ref.dns, "blink.mesh.internal.")
                .await
                .is_empty()
        })
        .await,
        "the restored TTL check never expired"
    );
    assert!(
        restarted.elapsed() >= Duration::from_secs(1),
        "expired {:?} after the restart",
        restarted.elapsed()
    );

    // Checks still run after the restart: the TCP check follows the listener.
    listener.abort();
    let _ = listener.await;
    let a_ref = &api;
    assert!(
        eventually(WAIT, move || async move {
            checks(a_ref).await["pay-2-tcp"]["Status"] == "critical"
        })
        .await,
        "the restored TCP check does not run"
    );
    assert!(dns::a_records(r.dns, "payment.mesh.internal.").await == ips(&["127.0.10.1"]));
    // TTL checks take heartbeats, maintenance can be lifted.
    ok(api.put_empty("/v1/agent/check/pass/ledger-1-ttl").await);
    assert_eq!(
        dns::a_records(r.dns, "ledger.mesh.internal.").await,
        ips(&["127.0.10.10"])
    );
    ok(api
        .put_empty("/v1/agent/service/maintenance/pay-3?enable=false")
        .await);
    assert_eq!(
        dns::a_records(r.dns, "payment.mesh.internal.").await,
        ips(&["127.0.10.1", "127.0.10.3"])
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registrations_and_health_survive_a_clean_restart() {
    survives(|r| {
        r.stop();
        r.restart_stopped();
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registrations_and_health_survive_a_crash() {
    survives(|r| {
        r.kill();
        r.restart_stopped();
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_change_index_never_goes_back_across_restarts() {
    let mut r = Resolver::start();
    let api = Api::new(&r);
    let mut last = services(&api).await.1;
    for round in 0..3 {
        api.register(json!({"Name": "idx", "ID": format!("i{round}"), "Port": 1}))
            .await;
        api.register(json!({"Name": "tmp", "ID": format!("t{round}"), "Port": 1,
            "Check": {"TTL": "60s"}}))
            .await;
        ok(api
            .put_empty(&format!("/v1/agent/check/pass/service:t{round}"))
            .await);
        let before = services(&api).await.1;
        assert!(before > last);
        if round % 2 == 0 {
            r.kill();
        } else {
            r.stop();
        }
        r.restart_stopped();
        let after = services(&api).await.1;
        assert!(
            after >= before,
            "round {round}: X-Consul-Index {before} → {after}"
        );
        // Blocking queries from before the restart do not wait on a stale index forever.
        let resp = api
            .get(&format!("/v1/catalog/services?index={before}&wait=100ms"))
            .await;
        assert!(consul_index(&resp) >= before);
        last = after;
    }
    // With everything deregistered, nothing is left to restore: the index still holds.
    let (all, _) = services(&api).await;
    for id in all.as_object().unwrap().keys() {
        ok(api
            .put_empty(&format!("/v1/agent/service/deregister/{id}"))
            .await);
    }
    let (all, before) = services(&api).await;
    assert!(all.as_object().unwrap().is_empty());
    r.kill();
    r.restart_stopped();
    let (all, after) = services(&api).await;
    assert!(all.as_object().unwrap().is_empty());
    assert!(after >= before, "X-Consul-Index {before} → {after}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_during_concurrent_registrations_loses_nothing_acknowledged() {
    const WORKERS: usize = 200;
    const PER_WORKER: usize = 25;
    const KILL_AFTER: usize = 300;

    let mut r = Resolver::start();
    let api = Api::new(&r);
    // Something registered before the storm must survive it too.
    api.register(json!({"Name": "anchor", "ID": "anchor-1", "Address": "127.0.11.1", "Port": 1}))
        .await;

    let url = r.url("/v1/agent/service/register");
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap();
    let acked = Arc::new(Mutex::new(Vec::<(String, u16)>::new()));
    let acked_count = Arc::new(AtomicUsize::new(0));
    let refused = Arc::new(Mutex::new(Vec::<String>::new()));
    let mut workers = Vec::new();
    for w in 0..WORKERS {
        let (url, client) = (url.clone(), client.clone());
        let (acked, acked_count, refused) = (acked.clone(), acked_count.clone(), refused.clone());
        workers.push(tokio::spawn(async move {
            for n in 0..PER_WORKER {
                let id = format!("w{w}-{n}");
                let port = (1000 + w * PER_WORKER + n) as u16;
                let body = json!({"Name": format!("storm-{}", w % 10), "ID": id,
                    "Address": format!("127.0.12.{}", w % 250 + 1), "Port": port,
                    "Tags": [format!("w{w}")], "Meta": {"worker": w.to_string(), "seq": n.to_string()},
                    "Check": {"TTL": "60s", "Status": "passing"}});
                match client.put(&url).json(&body).send().await {
                    Ok(resp) if resp.status() == 200 => {
                        acked.lock().unwrap().push((id, port));
                        acked_count.fetch_add(1, Ordering::SeqCst);
                    }
                    Ok(resp) => {
                        refused
                            .lock()
                            .unwrap()
                            .push(format!("{id}: HTTP {}", resp.status()));
                        return false;
                    }
                    // The crash: the connection was refused or cut.
                    Err(_) => return true,
                }
            }
            false
        }));
    }
    let counter = acked_count.clone();
    assert!(
        eventually(Duration::from_secs(60), move || {
            let counter = counter.clone();
            async move { counter.load(Ordering::SeqCst) >= KILL_AFTER }
        })
        .await,
        "registrations too slow: {} acknowledged",
        acked_count.load(Ordering::SeqCst)
    );
    r.kill();
    let mut cut = 0;
    for w in workers {
        if tokio::time::timeout(Duration::from_secs(30), w)
            .await
            .expect("a worker hung")
            .unwrap()
        {
            cut += 1;
        }
    }
    let acked = acked.lock().unwrap().clone();
    let refused = refused.lock().unwrap().clone();
    assert!(refused.is_empty(), "non-200 answers: {refused:?}");
    assert!(
        cut > 0,
        "the crash came after every registration was done: nothing was in flight"
    );
    assert!(acked.len() >= KILL_AFTER);
    eprintln!(
        "{} registrations acknowledged, {cut} workers cut off by the crash",
        acked.len()
    );

    r.restart_stopped();
    let (all, _) = services(&api).await;
    let all = all.as_object().unwrap();
    let missing: Vec<&String> = acked
        .iter()
        .map(|(id, _)| id)
        .filter(|id| !all.contains_key(*id))
        .collect();
    assert!(
        missing.is_empty(),
        "{} of {} acknowledged registrations lost, e.g. {:?}",
        missing.len(),
        acked.len(),
        &missing[..missing.len().min(5)]
    );
    for (id, port) in &acked {
        let s = &all[id];
        assert_eq!(s["Port"], *port, "{id}: {s}");
        let (w, n) = id[1..].split_once('-').unwrap();
        assert_eq!(s["Meta"], json!({"worker": w, "seq": n}), "{id}");
        assert_eq!(s["Tags"], json!([format!("w{w}")]), "{id}");
    }
    assert!(all.contains_key("anchor-1"));
    let checks = checks(&api).await;
    for (id, _) in &acked {
        assert_eq!(
            checks[format!("service:{id}")]["Status"],
            "passing",
            "{id}'s check"
        );
    }
    // Every storm service answers over DNS, with every acknowledged instance's address.
    let mut want: BTreeMap<String, BTreeSet<IpAddr>> = BTreeMap::new();
    for (id, _) in &acked {
        let w: usize = id[1..].split_once('-').unwrap().0.parse().unwrap();
        want.entry(format!("storm-{}", w % 10))
            .or_default()
            .insert(format!("127.0.12.{}", w % 250 + 1).parse().unwrap());
    }
    for (service, addrs) in &want {
        let m = dns::tcp(r.dns, &format!("{service}.mesh.internal."), RecordType::A).await;
        let got: BTreeSet<IpAddr> = addresses(&m).into_iter().collect();
        assert!(
            got.is_superset(addrs),
            "{service}: {got:?} lacks some of {addrs:?}"
        );
    }

    // The store is still good after the torn tail: new writes land and survive a clean
    // restart along with everything before them.
    let count = all.len();
    api.register(json!({"Name": "after", "ID": "after-1", "Address": "127.0.11.2", "Port": 1}))
        .await;
    r.stop();
    r.restart_stopped();
    let (again, _) = services(&api).await;
    let again = again.as_object().unwrap();
    assert_eq!(again.len(), count + 1);
    assert!(again.contains_key("after-1"));
    assert_eq!(
        dns::a_records(r.dns, "after.mesh.internal.").await,
        ips(&["127.0.11.2"])
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_after_log_compaction_loses_nothing_acknowledged() {
    const WORKERS: usize = 40;
    const PER_WORKER: usize = 2_000;
    /// Past the store's compaction threshold (10,000 log records), with more after it.
    const KILL_AFTER: usize = 15_000;

    let mut r = Resolver::start();
    let api = Api::new(&r);
    for w in 0..WORKERS {
        api.register(json!({"Name": "busy", "ID": format!("b{w}"), "Port": 1,
            "Address": format!("127.0.13.{}", w + 1),
            "Check": {"CheckID": format!("b{w}-ttl"), "TTL": "60s", "Status": "passing"}}))
            .await;
    }
    let snapshot = r.data_dir.join("registry.snapshot.json");
    assert!(!snapshot.exists(), "compacted before the test began");

    // Each worker flips its instance's TTL check between warning and passing with a new note
    // each time (every flip is a log record), and registers an extra instance now and then.
    let base = r.url("");
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap();
    let writes = Arc::new(AtomicUsize::new(0));
    let mut workers = Vec::new();
    for w in 0..WORKERS {
        let (base, client, writes) = (base.clone(), client.clone(), writes.clone());
        workers.push(tokio::spawn(async move {
            let mut last_acked: Option<String> = None;
            let mut in_flight: Option<String> = None;
            let mut registered = Vec::new();
            for n in 0..PER_WORKER {
                let note = format!("w{w}-n{n}");
                let verb = if n.is_multiple_of(2) { "warn" } else { "pass" };
                let url = format!("{base}/v1/agent/check/{verb}/b{w}-ttl?note={note}");
                match client.put(&url).send().await {
                    Ok(resp) if resp.status() == 200 => {
                        last_acked = Some(note);
                        writes.fetch_add(1, Ordering::SeqCst);
                    }
                    Ok(resp) => return Err(format!("{url}: HTTP {}", resp.status())),
                    Err(_) => {
                        in_flight = Some(note);
                        break;
                    }
                }
                if n % 50 == 49 {
                    let id = format!("b{w}-extra-{n}");
                    let body = json!({"Name": "busy-extra", "ID": id, "Port": 2});
                    let url = format!("{base}/v1/agent/service/register");
                    match client.put(&url).json(&body).send().await {
                        Ok(resp) if resp.status() == 200 => registered.push(id),
                        Ok(resp) => return Err(format!("register {id}: HTTP {}", resp.status())),
                        Err(_) => break,
                    }
                }
            }
            Ok((last_acked, in_flight, registered))
        }));
    }
    let (writes_ref, snapshot_ref) = (writes.clone(), snapshot.clone());
    assert!(
        eventually(Duration::from_secs(120), move || {
            let (writes, snapshot) = (writes_ref.clone(), snapshot_ref.clone());
            async move { writes.load(Ordering::SeqCst) >= KILL_AFTER && snapshot.exists() }
        })
        .await,
        "no compaction after {} writes",
        writes.load(Ordering::SeqCst)
    );
    r.kill();
    let mut results = Vec::new();
    for w in workers {
        let result = tokio::time::timeout(Duration::from_secs(30), w)
            .await
            .expect("a worker hung")
            .unwrap();
        results.push(result.unwrap_or_else(|e| panic!("{e}")));
    }
    let cut = results.iter().filter(|(_, f, _)| f.is_some()).count();
    assert!(cut > 0, "nothing was in flight at the crash");

    r.restart_stopped();
    let (all, _) = services(&api).await;
    let checks = checks(&api).await;
    for (w, (last_acked, in_flight, registered)) in results.iter().enumerate() {
        assert!(all.get(format!("b{w}")).is_some(), "b{w} lost");
        for id in registered {
            assert!(all.get(id).is_some(), "{id} lost");
        }
        // The check is as the last acknowledged write left it, or as the write in flight at
        // the crash did (it may have become durable without being acknowledged).
        let c = &checks[format!("b{w}-ttl")];
        let output = c["Output"].as_str().unwrap();
        let allowed: Vec<&str> = last_acked
            .iter()
            .chain(in_flight.iter())
            .map(String::as_str)
            .collect();
        assert!(
            allowed.contains(&output),
            "b{w}-ttl: output {output:?}, expected one of {allowed:?}"
        );
        let n: usize = output.rsplit_once("-n").unwrap().1.parse().unwrap();
        let want = if n.is_multiple_of(2) {
            "warning"
        } else {
            "passing"
        };
        assert_eq!(c["Status"], want, "b{w}-ttl after {output}");
    }
}
