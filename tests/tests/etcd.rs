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
use waymark_shared::etcd::keys::{decode_instance, Key, Layout};
use waymark_shared::etcd::{connect, EtcdConfig};
use waymark_shared::{Changes, Instance};

/// Leases in these tests: a dead host's instances go 2 s after its last keep-alive.
const LEASE: &str = "2s";
const WAIT: Duration = Duration::from_secs(15);

/// A resolver as host `name`, with etcd as its registry of record.
fn host(etcd: &EtcdCluster, name: &str) -> Resolver {
    host_with(&etcd.endpoints(), name, &[])
}

/// A resolver as host `name` that reaches etcd through `endpoints`, with more flags.
fn host_with(endpoints: &str, name: &str, more: &[&str]) -> Resolver {
    let mut extra_args: Vec<String> = vec![
        "--etcd".into(),
        endpoints.into(),
        "--node-name".into(),
        name.into(),
    ];
    extra_args.extend(more.iter().map(|s| s.to_string()));
    Resolver::with(Options {
        config: Some(format!("[etcd]\nlease_ttl = \"{LEASE}\"\n")),
        extra_args,
        ..Options::default()
    })
}

/// The A records host `r` answers for `name`.
async fn a(r: &Resolver, name: &str) -> Vec<IpAddr> {
    addresses(&dns::udp(r.dns, name, RecordType::A).await)
}

/// Every instance in etcd, keyed by (service, ID), with the node that wrote it; an error
/// while the cluster cannot answer (a leader election).
async fn in_etcd(
    etcd: &EtcdCluster,
) -> Result<BTreeMap<(String, String), (String, Instance)>, String> {
    let layout = Layout::new("/waymark/").unwrap();
    let endpoints: Vec<String> = etcd.endpoints().split(',').map(String::from).collect();
    let mut client = Client::connect(&endpoints, None)
        .await
        .map_err(|e| e.to_string())?;
    let listing = client
        .get(layout.instances(), Some(GetOptions::new().with_prefix()))
        .await
        .map_err(|e| e.to_string())?;
    Ok(listing
        .kvs()
        .iter()
        .map(|kv| {
            let key = layout.parse(kv.key()).expect("a key of the layout");
            let mut i = decode_instance(&key, kv.value()).expect("an instance");
            let Key::Instance { node, .. } = key else {
                panic!("an instance key under instances/");
            };
            // As the follower reads it: the key's host, unless the value names a node.
            if i.node.is_none() {
                i.node = Some(node.as_str().into());
            }
            ((i.service.to_string(), i.id.to_string()), (node, i))
        })
        .collect())
}

/// Every instance host `r`'s mirror holds (its change stream from the start), without its
/// change indexes.
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
        .map(|i| {
            // Change indexes are each mirror's own (etcd's revisions here): not compared.
            let i = Instance {
                create_index: 0,
                modify_index: 0,
                ..(**i).clone()
            };
            ((i.service.to_string(), i.id.to_string()), i)
        })
        .collect()
}

/// Waits until etcd holds exactly what each host registered (under its node name), and
/// every host's mirror equals etcd's contents, record by record; returns them.
async fn converged(
    etcd: &EtcdCluster,
    hosts: &[(&str, &Resolver)],
) -> BTreeMap<(String, String), Instance> {
    let (state, _) = until(
        "etcd holds every host's registrations and every host's mirror equals etcd",
        WAIT,
        || async {
            let state = match in_etcd(etcd).await {
                Ok(s) => s,
                Err(e) => return (BTreeMap::new(), vec![format!("etcd: {e}")]),
            };
            let want: BTreeMap<_, _> = state
                .iter()
                .map(|(k, (_, i))| (k.clone(), i.clone()))
                .collect();
            let mut differ = Vec::new();
            for (name, h) in hosts {
                let got = in_mirror(h).await;
                if got != want {
                    differ.push(format!("{name}'s mirror: {:?}", got.keys()));
                }
                let mut mine: Vec<String> = state
                    .iter()
                    .filter(|(_, (node, _))| node == name)
                    .map(|((_, id), _)| id.clone())
                    .collect();
                mine.sort();
                let registered = Api::new(h).registered_ids().await;
                if mine != registered {
                    differ.push(format!(
                        "{name} registered {registered:?}, etcd has {mine:?}"
                    ));
                }
            }
            (want, differ)
        },
        |(_, differ)| differ.is_empty(),
    )
    .await;
    state
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
    let state = converged(&etcd, &[("host-1", &h1), ("host-2", &h2), ("host-3", &h3)]).await;
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
    let state = converged(&etcd, &[("host-1", &h1), ("host-2", &h2), ("host-3", &h3)]).await;
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
    converged(&etcd, &[("host-2", &h2), ("host-3", &h3)]).await;

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
    let state = converged(&etcd, &[("host-1", &h1), ("host-2", &h2), ("host-3", &h3)]).await;
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
    converged(&etcd, &[("host-1", &h1), ("host-2", &h2), ("host-3", &h3)]).await;
}

/// Which member leads the cluster now.
async fn leader(etcd: &EtcdCluster, members: usize) -> usize {
    for i in 0..members {
        let Ok(mut c) = Client::connect([etcd.endpoint(i)], None).await else {
            continue;
        };
        let Ok(s) = c.status().await else { continue };
        let me = s.header().map(|h| h.member_id());
        if me == Some(s.leader()) {
            return i;
        }
    }
    panic!("no member says it leads");
}

/// The value of one metric series on a resolver, or 0.
async fn metric(r: &Resolver, series: &str) -> f64 {
    let text = reqwest::get(r.url("/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
        .unwrap_or(0.0)
}

async fn ready(r: &Resolver) -> (u16, String) {
    let resp = reqwest::get(r.url("/healthz/ready")).await.unwrap();
    (resp.status().as_u16(), resp.text().await.unwrap())
}

#[tokio::test(flavor = "multi_thread")]
async fn killing_the_etcd_leader_loses_no_acknowledged_change() {
    let mut etcd = EtcdCluster::start(3);
    let hosts = [
        host(&etcd, "host-1"),
        host(&etcd, "host-2"),
        host(&etcd, "host-3"),
    ];
    let apis: Vec<Api> = hosts.iter().map(Api::new).collect();
    for h in &hosts {
        until("ready", WAIT, || ready(h), |(s, _)| *s == 200).await;
    }

    // Registrations and health flips on every host, 90 in all; the leader dies after a third.
    let mut expected: BTreeMap<String, &str> = BTreeMap::new();
    for n in 0..90usize {
        if n == 30 {
            let l = leader(&etcd, 3).await;
            etcd.kill(l);
        }
        let api = &apis[n % 3];
        if n % 3 == 2 && n >= 3 {
            // Flip the check of an instance this host registered three steps ago.
            let id = format!("svc-{}", n - 3);
            if let Some(state) = expected.get_mut(&id) {
                let to = if *state == "passing" { "fail" } else { "pass" };
                let resp = api
                    .put_empty(&format!("/v1/agent/check/{to}/{id}-ttl"))
                    .await;
                assert_eq!(resp.status(), 200, "{to} {id}");
                *state = if to == "fail" { "critical" } else { "passing" };
            }
        }
        let id = format!("svc-{n}");
        api.register(json!({
            "ID": id, "Name": format!("svc{}", n % 7), "Address": format!("10.9.{}.{}", n / 200, n % 200 + 1),
            "Port": 80, "Check": {"CheckID": format!("{id}-ttl"), "TTL": "600s", "Status": "passing"}
        }))
        .await;
        expected.insert(id, "passing");
    }

    let state = converged(
        &etcd,
        &[
            ("host-1", &hosts[0]),
            ("host-2", &hosts[1]),
            ("host-3", &hosts[2]),
        ],
    )
    .await;
    assert_eq!(
        state.len(),
        90,
        "every acknowledged registration is in etcd"
    );
    for ((_, id), instance) in &state {
        assert_eq!(
            instance.checks[0].status.as_str(),
            expected[id.as_str()],
            "the last acknowledged health of {id}"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn with_etcd_down_dns_keeps_answering_and_nothing_is_lost_when_it_returns() {
    let mut etcd = EtcdCluster::start(1);
    let h1 = host(&etcd, "host-1");
    let h2 = host(&etcd, "host-2");
    let (api1, api2) = (Api::new(&h1), Api::new(&h2));
    api1.register(json!({"ID": "web-1", "Name": "web", "Address": "10.1.0.1", "Port": 80}))
        .await;
    api2.register(json!({"ID": "db-1", "Name": "db", "Address": "10.2.0.1", "Port": 5432}))
        .await;
    converged(&etcd, &[("host-1", &h1), ("host-2", &h2)]).await;

    etcd.kill(0);
    // Readiness says what is wrong; DNS answers the last state, past the lease's life.
    for h in [&h1, &h2] {
        until(
            "degraded",
            WAIT,
            || ready(h),
            |(s, t)| *s == 200 && t.contains("degraded: etcd unreachable"),
        )
        .await;
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    for (name, want) in [
        ("web.mesh.internal", "10.1.0.1"),
        ("db.mesh.internal", "10.2.0.1"),
    ] {
        assert_eq!(
            a(&h2, name).await,
            [want.parse::<IpAddr>().unwrap()],
            "{name}"
        );
    }
    assert_eq!(metric(&h2, "waymark_etcd_connected").await, 0.0);
    // Local changes are accepted while etcd is away.
    api1.register(json!({"ID": "web-2", "Name": "web", "Address": "10.1.0.2", "Port": 80}))
        .await;
    let resp = api2.put_empty("/v1/agent/service/deregister/db-1").await;
    assert_eq!(resp.status(), 200);

    etcd.restart_in_place(0);
    let state = converged(&etcd, &[("host-1", &h1), ("host-2", &h2)]).await;
    let ids: Vec<&str> = state.keys().map(|(_, id)| id.as_str()).collect();
    assert_eq!(ids, ["web-1", "web-2"], "nothing lost, nothing left behind");
    for h in [&h1, &h2] {
        until(
            "ready again",
            WAIT,
            || ready(h),
            |(s, t)| *s == 200 && t == "ready\n",
        )
        .await;
        let mut web = a(h, "web.mesh.internal").await;
        web.sort();
        assert_eq!(web.len(), 2, "{web:?}");
        assert!(a(h, "db.mesh.internal").await.is_empty());
    }
    assert_eq!(metric(&h2, "waymark_etcd_connected").await, 1.0);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_host_cut_off_across_a_compaction_lists_again_and_converges() {
    let mut etcd = EtcdCluster::start(3);
    let h1 = host(&etcd, "host-1");
    let h2 = host(&etcd, "host-2");
    // host-3 reaches etcd only through member 3.
    let h3 = host_with(&etcd.endpoint(2), "host-3", &[]);
    let api1 = Api::new(&h1);
    for id in ["a-1", "a-2"] {
        api1.register(json!({"ID": id, "Name": "a", "Address": "10.3.0.1", "Port": 80}))
            .await;
    }
    converged(&etcd, &[("host-1", &h1), ("host-2", &h2), ("host-3", &h3)]).await;
    let listed = metric(&h3, "waymark_etcd_listings_total").await;

    etcd.kill(2);
    until(
        "host-3 cut off",
        WAIT,
        || ready(&h3),
        |(_, t)| t.contains("degraded"),
    )
    .await;
    assert_eq!(
        api1.put_empty("/v1/agent/service/deregister/a-1")
            .await
            .status(),
        200
    );
    api1.register(json!({"ID": "a-3", "Name": "a", "Address": "10.3.0.3", "Port": 80}))
        .await;
    until(
        "host-2 sees a-1 go",
        WAIT,
        || in_mirror(&h2),
        |m| m.len() == 2 && !m.contains_key(&("a".into(), "a-1".into())),
    )
    .await;
    // The history host-3 would watch from is compacted away.
    let live = EtcdConfig {
        endpoints: (0..2).map(|i| etcd.endpoint(i)).collect(),
        ..EtcdConfig::default()
    };
    let (mut c, _) = connect(&live, 0).await.unwrap();
    let rev = c.get("x", None).await.unwrap().header().unwrap().revision();
    c.compact(rev, None).await.unwrap();

    etcd.restart_in_place(2);
    let state = converged(&etcd, &[("host-1", &h1), ("host-2", &h2), ("host-3", &h3)]).await;
    let ids: Vec<&str> = state.keys().map(|(_, id)| id.as_str()).collect();
    assert_eq!(ids, ["a-2", "a-3"]);
    assert!(
        metric(&h3, "waymark_etcd_listings_total").await > listed,
        "host-3 listed again"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_host_restarted_with_a_stale_data_dir_converges() {
    let etcd = EtcdCluster::start(1);
    let mut h1 = host(&etcd, "host-1");
    let h2 = host(&etcd, "host-2");
    let api1 = Api::new(&h1);
    for id in ["x-1", "x-2"] {
        api1.register(json!({"ID": id, "Name": "x", "Address": "10.4.0.1", "Port": 80}))
            .await;
    }
    converged(&etcd, &[("host-1", &h1), ("host-2", &h2)]).await;
    // A copy of host-1's data dir as it is now...
    h1.stop();
    let stale = tempfile::tempdir().unwrap();
    waymark_e2e::copy_dir(&h1.data_dir, stale.path());
    h1.restart_stopped();
    // ...goes stale: x-2 leaves, x-3 comes.
    assert_eq!(
        api1.put_empty("/v1/agent/service/deregister/x-2")
            .await
            .status(),
        200
    );
    api1.register(json!({"ID": "x-3", "Name": "x", "Address": "10.4.0.3", "Port": 80}))
        .await;
    converged(&etcd, &[("host-1", &h1), ("host-2", &h2)]).await;

    // host-1 comes back with the old copy: what it holds is what every host answers.
    h1.kill();
    std::fs::remove_dir_all(&h1.data_dir).unwrap();
    waymark_e2e::copy_dir(stale.path(), &h1.data_dir);
    h1.restart_stopped();
    let state = converged(&etcd, &[("host-1", &h1), ("host-2", &h2)]).await;
    let ids: Vec<&str> = state.keys().map(|(_, id)| id.as_str()).collect();
    assert_eq!(ids, ["x-1", "x-2"]);
    assert_eq!(api1.registered_ids().await, ["x-1", "x-2"]);
}

#[tokio::test(flavor = "multi_thread")]
async fn every_host_answers_the_same_vips_allocated_once_in_etcd() {
    let etcd = EtcdCluster::start(1);
    // A range of six addresses: hosts that race for one must still agree.
    let flags = ["--vip-answers", "all", "--vip-range", "127.77.0.0/29"];
    let mut hosts = [
        host_with(&etcd.endpoints(), "host-1", &flags),
        host_with(&etcd.endpoints(), "host-2", &flags),
        host_with(&etcd.endpoints(), "host-3", &flags),
    ];
    let apis: Vec<Api> = hosts.iter().map(Api::new).collect();
    // At the same time on three hosts: payment with tag v1, payment with tag v2, orders.
    let bodies = [
        json!({"ID": "payment-1", "Name": "payment", "Tags": ["v1"], "Address": "10.5.0.1", "Port": 80}),
        json!({"ID": "payment-2", "Name": "payment", "Tags": ["v2"], "Address": "10.5.0.2", "Port": 80}),
        json!({"ID": "orders-1", "Name": "orders", "Address": "10.5.0.3", "Port": 80}),
    ];
    futures::future::join_all(apis.iter().zip(bodies).map(|(api, b)| api.register(b))).await;

    let names = [
        "payment.mesh.internal",
        "v1.payment.mesh.internal",
        "v2.payment.mesh.internal",
        "orders.mesh.internal",
    ];
    let range = |ip: &IpAddr| ip.to_string().starts_with("127.77.0.");
    let vips = until(
        "VIPs answered",
        WAIT,
        || vip_answers(&hosts[0], &names),
        |got| got.iter().all(|ips| ips.len() == 1 && range(&ips[0])),
    )
    .await;
    let distinct: std::collections::BTreeSet<_> = vips.iter().map(|v| v[0]).collect();
    assert_eq!(distinct.len(), 4, "one address per name: {vips:?}");
    for h in &hosts[1..] {
        until(
            "the same VIPs on every host",
            WAIT,
            || vip_answers(h, &names),
            |got| *got == vips,
        )
        .await;
    }
    // etcd holds each allocation once.
    let config = EtcdConfig {
        endpoints: vec![etcd.endpoint(0)],
        ..EtcdConfig::default()
    };
    let (mut c, _) = connect(&config, 0).await.unwrap();
    let keys = |prefix: &'static str| {
        let mut c = c.clone();
        async move {
            let r = c
                .get(prefix, Some(GetOptions::new().with_prefix()))
                .await
                .unwrap();
            r.kvs()
                .iter()
                .map(|kv| kv.key_str().unwrap().to_string())
                .collect::<Vec<_>>()
        }
    };
    assert_eq!(
        keys("/waymark/vips/").await,
        [
            "/waymark/vips/orders",
            "/waymark/vips/payment",
            "/waymark/vips/payment/v1",
            "/waymark/vips/payment/v2"
        ]
    );
    assert_eq!(keys("/waymark/vip-addresses/").await.len(), 4);
    let _ = c.status().await;

    // A host that restarts answers them unchanged.
    hosts[0].restart();
    until(
        "the same VIPs after a restart",
        WAIT,
        || vip_answers(&hosts[0], &names),
        |got| *got == vips,
    )
    .await;
}

/// What host `r` answers for each name.
async fn vip_answers(r: &Resolver, names: &[&str]) -> Vec<Vec<IpAddr>> {
    let mut out = Vec::new();
    for n in names {
        out.push(a(r, n).await);
    }
    out
}

#[tokio::test(flavor = "multi_thread")]
async fn a_host_restarted_while_etcd_is_down_answers_the_state_it_saved() {
    let mut etcd = EtcdCluster::start(1);
    let h1 = host(&etcd, "host-1");
    // Progress every 400 ms: the mirror is saved within 2 s of a change.
    let mut h2 = Resolver::with(Options {
        config: Some(format!(
            "[etcd]\nlease_ttl = \"{LEASE}\"\nprogress_interval = \"400ms\"\n"
        )),
        extra_args: vec![
            "--etcd".into(),
            etcd.endpoints(),
            "--node-name".into(),
            "host-2".into(),
        ],
        ..Options::default()
    });
    Api::new(&h1)
        .register(json!({"ID": "web-1", "Name": "web", "Address": "10.1.0.1", "Port": 80}))
        .await;
    let want = vec!["10.1.0.1".parse::<IpAddr>().unwrap()];
    until(
        "web on host-2",
        WAIT,
        || a(&h2, "web.mesh.internal"),
        |ips| *ips == want,
    )
    .await;
    let saved = h2.data_dir.join("etcd-mirror.json");
    until(
        "host-2 saved its mirror",
        WAIT,
        || async { std::fs::read_to_string(&saved).unwrap_or_default() },
        |text| text.contains("web-1"),
    )
    .await;

    // etcd goes, then host-2 restarts: it answers what it saved, and says so.
    etcd.kill(0);
    h2.kill();
    h2.restart_stopped();
    assert_eq!(a(&h2, "web.mesh.internal").await, want);
    let (status, text) = ready(&h2).await;
    assert_eq!(status, 200, "{text}");
    assert!(
        text.contains("answering the mirror saved at revision"),
        "{text}"
    );

    etcd.restart_in_place(0);
    until(
        "ready, etcd back",
        WAIT,
        || ready(&h2),
        |(s, t)| *s == 200 && t == "ready\n",
    )
    .await;
    converged(&etcd, &[("host-1", &h1), ("host-2", &h2)]).await;
}

/// With etcd, each host is a Consul node, and an external service registered through the
/// catalog on one host keeps its own node everywhere (not the registering host's).
#[tokio::test]
async fn hosts_are_nodes_and_external_services_keep_their_node() {
    let etcd = EtcdCluster::start(1);
    let h1 = host(&etcd, "host-1");
    let h2 = host(&etcd, "host-2");
    let (api1, api2) = (Api::new(&h1), Api::new(&h2));
    api1.register(json!({"ID": "web-1", "Name": "web", "Address": "10.1.0.1", "Port": 80}))
        .await;
    let resp = api1
        .put(
            "/v1/catalog/register",
            json!({"Node": "ext-db", "Address": "192.0.2.9",
                   "Service": {"ID": "pg-1", "Service": "pg", "Port": 5432}}),
        )
        .await;
    assert_eq!(resp.status(), 200);
    let nodes = until(
        "host-2 lists every node",
        WAIT,
        || async {
            let v: Value = api2.get("/v1/catalog/nodes").await.json().await.unwrap();
            let mut names: Vec<String> = v
                .as_array()
                .unwrap()
                .iter()
                .map(|n| n["Node"].as_str().unwrap().to_string())
                .collect();
            names.sort();
            names
        },
        |names| names.len() == 3,
    )
    .await;
    assert_eq!(nodes, ["ext-db", "host-1", "host-2"]);
    let pg: Value = api2
        .get("/v1/catalog/service/pg")
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(pg[0]["Node"], "ext-db", "{pg}");
    assert_eq!(pg[0]["Address"], "192.0.2.9", "{pg}");
    let web: Value = api2
        .get("/v1/catalog/service/web")
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(web[0]["Node"], "host-1", "{web}");
    let members: Value = api2.get("/v1/agent/members").await.json().await.unwrap();
    let mut names: Vec<&str> = members
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["Name"].as_str().unwrap())
        .collect();
    names.sort();
    assert_eq!(
        names,
        ["host-1", "host-2"],
        "external nodes are not members"
    );
}
