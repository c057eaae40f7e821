//! etcd as the registry of record for many hosts: a real etcd (Debian's etcd-server, started
//! by the test on loopback) and three resolvers as three hosts (processes with their own
//! data dirs and node names, all on loopback). A registration on one host is answered by DNS
//! on every host; a failed check removes it everywhere; a host killed with SIGKILL loses its
//! instances everywhere once its lease expires, and gets them back when it restarts. After
//! each step every host's mirror equals etcd's contents, record by record.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::time::Duration;

use hickory_proto::rr::RecordType;
use serde_json::{json, Value};
use waymark_e2e::dns::{self, addresses};
use waymark_e2e::etcd::EtcdCluster;
use waymark_e2e::{until, Api, Options, Resolver};
use waymark_shared::etcd::client::{Client, GetOptions};
use waymark_shared::etcd::keys::{decode_instance, Layout};
use waymark_shared::{Changes, Instance};

/// Leases in these tests: a dead host's instances go 2 s after its last keep-alive.
const LEASE: &str = "2s";
const WAIT: Duration = Duration::from_secs(15);

/// A resolver as host `name`, with etcd as its registry of record.
fn host(etcd: &EtcdCluster, name: &str) -> Resolver {
    Resolver::with(Options {
        config: Some(format!("[etcd]\nlease_ttl = \"{LEASE}\"\n")),
        extra_args: vec![
            "--etcd".into(),
            etcd.endpoints(),
            "--node-name".into(),
            name.into(),
        ],
        ..Options::default()
    })
}

/// The A records host `r` answers for `name`.
async fn a(r: &Resolver, name: &str) -> Vec<IpAddr> {
    addresses(&dns::udp(r.dns, name, RecordType::A).await)
}

/// Every instance in etcd, keyed by (service, ID), as the registry wrote it.
async fn in_etcd(etcd: &EtcdCluster) -> BTreeMap<(String, String), Instance> {
    let layout = Layout::new("/waymark/").unwrap();
    let endpoints: Vec<String> = etcd.endpoints().split(',').map(String::from).collect();
    let mut client = Client::connect(&endpoints, None)
        .await
        .expect("etcd client");
    let listing = client
        .get(layout.instances(), Some(GetOptions::new().with_prefix()))
        .await
        .expect("etcd listing");
    listing
        .kvs()
        .iter()
        .map(|kv| {
            let key = layout.parse(kv.key()).expect("a key of the layout");
            let i = decode_instance(&key, kv.value()).expect("an instance");
            ((i.service.to_string(), i.id.to_string()), i)
        })
        .collect()
}

/// Every instance host `r`'s mirror holds (its change stream from the start).
async fn in_mirror(r: &Resolver) -> BTreeMap<(String, String), Instance> {
    let changes: Changes = reqwest::get(r.url("/v1/waymark/changes?index=0"))
        .await
        .expect("change stream")
        .json()
        .await
        .expect("a change batch");
    changes
        .services
        .iter()
        .flat_map(|v| v.instances.iter())
        .map(|i| ((i.service.to_string(), i.id.to_string()), (**i).clone()))
        .collect()
}

/// Waits until every host's mirror equals etcd's contents, record by record, and returns
/// them.
async fn converged(
    etcd: &EtcdCluster,
    hosts: &[&Resolver],
) -> BTreeMap<(String, String), Instance> {
    until(
        "every host's mirror equals etcd",
        WAIT,
        || async {
            let want = in_etcd(etcd).await;
            let mut differ = Vec::new();
            for (n, h) in hosts.iter().enumerate() {
                let got = in_mirror(h).await;
                if got != want {
                    differ.push(format!("host {n}: {got:?}"));
                }
            }
            (want, differ)
        },
        |(_, differ)| differ.is_empty(),
    )
    .await
    .0
}

#[tokio::test(flavor = "multi_thread")]
async fn a_registration_on_one_host_is_answered_everywhere_and_goes_with_its_host() {
    let etcd = EtcdCluster::start(1);
    let mut h1 = host(&etcd, "host-1");
    let h2 = host(&etcd, "host-2");
    let h3 = host(&etcd, "host-3");
    let api1 = Api::new(&h1);

    // web-1 on host-1, with a TTL check the test flips.
    api1.register(json!({
        "ID": "web-1", "Name": "web", "Address": "10.1.0.1", "Port": 80,
        "Check": {"CheckID": "web-1-ttl", "TTL": "60s", "Status": "passing"}
    }))
    .await;
    let want = vec!["10.1.0.1".parse::<IpAddr>().unwrap()];
    for h in [&h1, &h2, &h3] {
        until(
            "web answered",
            WAIT,
            || a(h, "web.mesh.internal"),
            |ips| *ips == want,
        )
        .await;
    }
    let state = converged(&etcd, &[&h1, &h2, &h3]).await;
    assert_eq!(state.len(), 1, "{state:?}");

    // A failed check on host-1: gone from every host's answers.
    let resp = api1.put_empty("/v1/agent/check/fail/web-1-ttl").await;
    assert_eq!(resp.status(), 200);
    for h in [&h1, &h2, &h3] {
        until(
            "web not answered",
            WAIT,
            || a(h, "web.mesh.internal"),
            Vec::is_empty,
        )
        .await;
    }
    let state = converged(&etcd, &[&h1, &h2, &h3]).await;
    let web = &state[&("web".to_string(), "web-1".to_string())];
    assert_eq!(web.checks[0].status.as_str(), "critical");
    api1.put_empty("/v1/agent/check/pass/web-1-ttl").await;
    for h in [&h1, &h2, &h3] {
        until(
            "web back",
            WAIT,
            || a(h, "web.mesh.internal"),
            |ips| *ips == want,
        )
        .await;
    }

    // host-1 dies without a word: once its lease expires, web-1 leaves every other host.
    h1.kill();
    for h in [&h2, &h3] {
        until(
            "web gone with its host",
            WAIT,
            || a(h, "web.mesh.internal"),
            Vec::is_empty,
        )
        .await;
    }
    converged(&etcd, &[&h2, &h3]).await;

    // host-1 comes back with its data dir: it writes its registrations again.
    h1.restart();
    for h in [&h1, &h2, &h3] {
        until(
            "web back with its host",
            WAIT,
            || a(h, "web.mesh.internal"),
            |ips| *ips == want,
        )
        .await;
    }
    let state = converged(&etcd, &[&h1, &h2, &h3]).await;
    assert_eq!(state.len(), 1, "{state:?}");

    // The agent endpoints show what this host registered; the catalog shows every host's.
    let api2 = Api::new(&h2);
    api2.register(json!({"ID": "db-1", "Name": "db", "Address": "10.2.0.1", "Port": 5432}))
        .await;
    until(
        "db on host-1",
        WAIT,
        || a(&h1, "db.mesh.internal"),
        |ips| ips.len() == 1,
    )
    .await;
    assert_eq!(api1.registered_ids().await, ["web-1"]);
    assert_eq!(api2.registered_ids().await, ["db-1"]);
    let catalog: Value = api1.get("/v1/catalog/services").await.json().await.unwrap();
    assert!(
        catalog.get("db").is_some() && catalog.get("web").is_some(),
        "{catalog}"
    );
    converged(&etcd, &[&h1, &h2, &h3]).await;
}
