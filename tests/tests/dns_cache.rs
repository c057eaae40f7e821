//! The UDP fast path and its answer cache, through the real interfaces: every answer is asked
//! for repeatedly so that it comes from the cache, and must still follow every registry
//! change at once, echo each query's ID and spelling, rotate its addresses, and carry the
//! current SOA serial.

use std::collections::BTreeSet;
use std::net::IpAddr;

use hickory_proto::op::{Message, ResponseCode};
use hickory_proto::rr::{RData, RecordType};
use serde_json::json;
use waymark_e2e::dns::{self, addresses};
use waymark_e2e::{consul_index, ip, Api, Options, Resolver};

/// Asks `n` times over UDP (raw messages, so the ID and spelling are ours).
async fn ask_n(r: &Resolver, name: &str, t: RecordType, n: usize) -> Vec<Message> {
    let mut out = Vec::new();
    for _ in 0..n {
        out.push(dns::send_udp(r.dns, &dns::query(name, t, None)).await.0);
    }
    out
}

async fn a(r: &Resolver, name: &str) -> Vec<IpAddr> {
    // The first reply may be computed; the second comes from the cache.
    let replies = ask_n(r, name, RecordType::A, 2).await;
    addresses(&replies[1])
}

fn soa_serial(m: &Message) -> u32 {
    match &m
        .authorities
        .first()
        .expect("an SOA in the authority section")
        .data
    {
        RData::SOA(soa) => soa.serial,
        other => panic!("not an SOA: {other:?}"),
    }
}

async fn cache_hits(api: &Api) -> u64 {
    let text = api.get("/metrics").await.text().await.unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix("waymark_dns_cache_hits_total "))
        .expect("the cache hit counter")
        .parse()
        .unwrap()
}

#[tokio::test]
async fn cached_answers_follow_every_registry_change_at_once() {
    let r = Resolver::start();
    let api = Api::new(&r);
    for n in 1..=2 {
        api.register(json!({"Name": "web", "ID": format!("web-{n}"),
            "Address": format!("10.5.0.{n}"), "Port": 80, "Check": {"TTL": "60s", "Status": "passing"}}))
            .await;
    }
    let hits = cache_hits(&api).await;
    assert_eq!(
        a(&r, "web.mesh.internal.").await,
        ips(&["10.5.0.1", "10.5.0.2"])
    );
    assert!(
        cache_hits(&api).await > hits,
        "the second query was a cache hit"
    );

    // No waiting anywhere below: the answer after the API's 200 must already be the new one.
    api.register(json!({"Name": "web", "ID": "web-3", "Address": "10.5.0.3", "Port": 80}))
        .await;
    assert_eq!(
        a(&r, "web.mesh.internal.").await,
        ips(&["10.5.0.1", "10.5.0.2", "10.5.0.3"])
    );
    assert_eq!(
        api.put_empty("/v1/agent/check/fail/service:web-1")
            .await
            .status(),
        200
    );
    assert_eq!(
        a(&r, "web.mesh.internal.").await,
        ips(&["10.5.0.2", "10.5.0.3"])
    );
    assert_eq!(
        api.put_empty("/v1/agent/service/maintenance/web-2?enable=true")
            .await
            .status(),
        200
    );
    assert_eq!(a(&r, "web.mesh.internal.").await, ips(&["10.5.0.3"]));
    assert_eq!(
        api.put_empty("/v1/agent/service/deregister/web-3")
            .await
            .status(),
        200
    );
    let replies = ask_n(&r, "web.mesh.internal.", RecordType::A, 2).await;
    assert!(replies[1].answers.is_empty(), "NODATA once nothing serves");
    assert_eq!(replies[1].metadata.response_code, ResponseCode::NoError);
    assert_eq!(
        api.put_empty("/v1/agent/check/pass/service:web-1")
            .await
            .status(),
        200
    );
    assert_eq!(a(&r, "web.mesh.internal.").await, ips(&["10.5.0.1"]));

    // A name that did not exist, then does, then does not.
    let gone = ask_n(&r, "new.mesh.internal.", RecordType::A, 2).await;
    assert_eq!(gone[1].metadata.response_code, ResponseCode::NXDomain);
    api.register(json!({"Name": "new", "ID": "new-1", "Address": "10.6.0.1", "Port": 80}))
        .await;
    assert_eq!(a(&r, "new.mesh.internal.").await, ips(&["10.6.0.1"]));
    assert_eq!(
        api.put_empty("/v1/agent/service/deregister/new-1")
            .await
            .status(),
        200
    );
    let gone = ask_n(&r, "new.mesh.internal.", RecordType::A, 2).await;
    assert_eq!(gone[1].metadata.response_code, ResponseCode::NXDomain);

    // SRV and per-instance names follow too.
    let srv = ask_n(&r, "_web._tcp.mesh.internal.", RecordType::SRV, 2).await;
    assert_eq!(srv[1].answers.len(), 1);
    api.register(json!({"Name": "web", "ID": "web-4", "Address": "10.5.0.4", "Port": 81}))
        .await;
    let srv = ask_n(&r, "_web._tcp.mesh.internal.", RecordType::SRV, 2).await;
    assert_eq!(srv[1].answers.len(), 2);
    assert_eq!(
        a(&r, "web-4.instance.web.mesh.internal.").await,
        ips(&["10.5.0.4"])
    );
    assert_eq!(
        api.put_empty("/v1/agent/service/deregister/web-4")
            .await
            .status(),
        200
    );
    let inst = ask_n(&r, "web-4.instance.web.mesh.internal.", RecordType::A, 2).await;
    assert_eq!(inst[1].metadata.response_code, ResponseCode::NXDomain);
}

fn ips(list: &[&str]) -> Vec<IpAddr> {
    let mut v: Vec<IpAddr> = list.iter().map(|s| ip(s)).collect();
    v.sort();
    v
}

#[tokio::test]
async fn cached_replies_carry_each_querys_id_spelling_and_flags() {
    let r = Resolver::start();
    let api = Api::new(&r);
    for n in 1..=3 {
        api.register(json!({"Name": "api", "ID": format!("api-{n}"),
            "Address": format!("10.7.0.{n}"), "Port": 80}))
            .await;
    }
    let mut firsts = BTreeSet::new();
    for (i, spelling) in [
        "api.mesh.internal.",
        "API.Mesh.Internal.",
        "aPi.mesh.INTERNAL.",
    ]
    .iter()
    .cycle()
    .take(60)
    .enumerate()
    {
        let mut q = dns::query(spelling, RecordType::A, None);
        q.metadata.id = 1000 + i as u16;
        q.metadata.recursion_desired = i % 2 == 0;
        let (m, _) = dns::send_udp(r.dns, &q).await;
        assert_eq!(m.metadata.id, 1000 + i as u16);
        assert_eq!(m.metadata.recursion_desired, i % 2 == 0);
        assert!(m.metadata.authoritative);
        assert!(
            m.metadata.recursion_available,
            "loopback may have names forwarded"
        );
        assert_eq!(
            m.queries[0].name().to_ascii(),
            *spelling,
            "the question as asked"
        );
        assert_eq!(addresses(&m).len(), 3);
        let first = match &m.answers[0].data {
            RData::A(a) => a.0,
            other => panic!("{other:?}"),
        };
        firsts.insert(first);
    }
    assert_eq!(firsts.len(), 3, "every instance comes first sometimes");
}

#[tokio::test]
async fn cached_negative_answers_carry_the_current_serial() {
    let r = Resolver::start();
    let api = Api::new(&r);
    api.register(json!({"Name": "one", "ID": "one-1", "Address": "10.8.0.1", "Port": 80}))
        .await;
    let before = ask_n(&r, "nosuch.mesh.internal.", RecordType::A, 2).await;
    assert_eq!(before[1].metadata.response_code, ResponseCode::NXDomain);
    let index = consul_index(&api.get("/v1/waymark/changes?index=0").await) as u32;
    assert_eq!(soa_serial(&before[1]), index);

    // A change elsewhere does not make the name exist, but the serial moves on.
    api.register(json!({"Name": "two", "ID": "two-1", "Address": "10.8.0.2", "Port": 80}))
        .await;
    let after = ask_n(&r, "nosuch.mesh.internal.", RecordType::A, 2).await;
    assert_eq!(after[1].metadata.response_code, ResponseCode::NXDomain);
    let index = consul_index(&api.get("/v1/waymark/changes?index=0").await) as u32;
    assert_eq!(soa_serial(&after[1]), index);
    assert!(soa_serial(&after[1]) > soa_serial(&before[1]));

    // With and without EDNS: each gets its own reply (OPT or not).
    for _ in 0..3 {
        let name = "one.mesh.internal.";
        let plain = dns::send_udp(r.dns, &dns::query(name, RecordType::A, None)).await;
        let edns = dns::send_udp(r.dns, &dns::query(name, RecordType::A, Some(1232))).await;
        assert!(plain.0.edns.is_none());
        assert_eq!(edns.0.edns.as_ref().map(|e| e.max_payload()), Some(1232));
        assert_eq!(addresses(&plain.0), addresses(&edns.0));
    }
}

#[tokio::test]
async fn several_udp_workers_share_the_port_and_all_answer() {
    let r = Resolver::with(Options {
        config: Some("[dns]\nudp_workers = 3\nanswer_cache_entries = 2\n".into()),
        ..Default::default()
    });
    let api = Api::new(&r);
    for n in 0..4 {
        api.register(json!({"Name": format!("s{n}"), "ID": format!("s{n}-1"),
            "Address": format!("10.9.0.{n}"), "Port": 80}))
            .await;
    }
    // Every query from its own socket (so its own source port, spread by SO_REUSEPORT over
    // the workers), over more names than the tiny cache holds.
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..120usize {
        let dns = r.dns;
        tasks.spawn(async move {
            let n = i % 4;
            let (m, _) = dns::send_udp(
                dns,
                &dns::query(&format!("s{n}.mesh.internal."), RecordType::A, None),
            )
            .await;
            (n, addresses(&m))
        });
    }
    while let Some(done) = tasks.join_next().await {
        let (n, got) = done.unwrap();
        assert_eq!(got, ips(&[&format!("10.9.0.{n}")]));
    }
    // Names outside the zone still go the slow way (REFUSED/SERVFAIL, never silence).
    let (m, _) = dns::send_udp(r.dns, &dns::query("example.org.", RecordType::A, None)).await;
    assert_ne!(m.metadata.response_code, ResponseCode::NoError);
}
