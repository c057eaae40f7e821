//! Service VIPs through the real interfaces: instances registered over HTTP, names asked over
//! UDP and TCP. A service and each of its tags get a stable loopback VIP that survives a crash
//! of the registry; who is answered VIPs follows `--vip-answers` (and, in `auto`, whether a
//! forwarder on this host is heartbeating).

use std::net::{IpAddr, Ipv4Addr};
use std::time::Duration;

use hickory_proto::op::ResponseCode;
use hickory_proto::rr::{RData, RecordType};
use serde_json::json;
use waymark_e2e::dns::{self, a_records, addresses};
use waymark_e2e::{ip, resolver_refuses, until, Api, Options, Resolver};

fn with_args(args: &[&str]) -> Resolver {
    Resolver::with(Options {
        extra_args: args.iter().map(|a| a.to_string()).collect(),
        ..Options::default()
    })
}

async fn register_mesh(api: &Api) {
    for (id, addr, tags) in [
        ("pay-1", "10.1.0.1", json!(["v1"])),
        ("pay-2", "10.1.0.2", json!(["v2", "not a label"])),
    ] {
        api.register(
            json!({"Name": "payment", "ID": id, "Address": addr, "Port": 9000, "Tags": tags}),
        )
        .await;
    }
    api.register(json!({"Name": "ledger", "ID": "ledger-1", "Address": "10.2.0.1", "Port": 80}))
        .await;
}

/// The single VIP a name answers, checked to be one address in `range`.
async fn vip_of(r: &Resolver, name: &str, range: (Ipv4Addr, u8)) -> Ipv4Addr {
    let got = a_records(r.dns, name).await;
    let [IpAddr::V4(vip)] = got[..] else {
        panic!("{name}: expected one VIP, got {got:?}");
    };
    let mask = u32::MAX << (32 - range.1);
    assert_eq!(
        u32::from(vip) & mask,
        u32::from(range.0),
        "{name}: {vip} outside the range"
    );
    vip
}

const DEFAULT_RANGE: (Ipv4Addr, u8) = (Ipv4Addr::new(127, 77, 0, 0), 16);

#[tokio::test]
async fn services_and_tags_get_distinct_vips_that_survive_a_crash() {
    let mut r = with_args(&["--vip-answers", "local"]);
    let api = Api::new(&r);
    register_mesh(&api).await;
    let names = [
        "payment.mesh.internal.",
        "v1.payment.mesh.internal.",
        "V2.Payment.mesh.internal.",
        "ledger.mesh.internal.",
    ];
    let mut vips = Vec::new();
    for name in names {
        vips.push(vip_of(&r, name, DEFAULT_RANGE).await);
    }
    let mut distinct = vips.clone();
    distinct.sort();
    distinct.dedup();
    assert_eq!(distinct.len(), vips.len(), "one VIP per name: {vips:?}");

    // A long TTL, the same over TCP; AAAA is NODATA; SRV points at the name, VIP as glue.
    let m = dns::udp(r.dns, names[0], RecordType::A).await;
    assert!(m.answers.iter().all(|a| a.ttl == 300), "{:?}", m.answers);
    let m = dns::tcp(r.dns, names[0], RecordType::A).await;
    assert_eq!(addresses(&m), [IpAddr::V4(vips[0])]);
    let m = dns::udp(r.dns, names[0], RecordType::AAAA).await;
    assert_eq!(m.metadata.response_code, ResponseCode::NoError);
    assert!(m.answers.is_empty());
    let m = dns::udp(r.dns, "_payment._tcp.mesh.internal.", RecordType::SRV).await;
    let [srv] = &m.answers[..] else {
        panic!("one SRV record per port: {:?}", m.answers)
    };
    let RData::SRV(srv) = &srv.data else { panic!() };
    assert_eq!(srv.port, 9000);
    assert_eq!(srv.target.to_ascii(), "payment.mesh.internal.");
    assert_eq!(
        addresses(&dns::udp(r.dns, "payment.mesh.internal.", RecordType::SRV).await).len(),
        0
    );
    let glue: Vec<IpAddr> = m
        .additionals
        .iter()
        .filter_map(|r| match &r.data {
            RData::A(a) => Some(IpAddr::V4(a.0)),
            _ => None,
        })
        .collect();
    assert_eq!(glue, [IpAddr::V4(vips[0])]);
    // An instance name still answers the instance; an unknown tag is still unknown.
    assert_eq!(
        a_records(r.dns, "pay-1.instance.payment.mesh.internal.").await,
        [ip("10.1.0.1")]
    );
    let m = dns::udp(r.dns, "v9.payment.mesh.internal.", RecordType::A).await;
    assert_eq!(m.metadata.response_code, ResponseCode::NXDomain);

    // A crash (SIGKILL) and a restart: every VIP is where it was.
    r.restart();
    for (name, vip) in names.iter().zip(&vips) {
        assert_eq!(
            vip_of(&r, name, DEFAULT_RANGE).await,
            *vip,
            "{name} after a restart"
        );
    }
    // A service that leaves and comes back gets its VIP again (it is placed by name), and
    // a new service gets one of its own.
    let api = Api::new(&r);
    assert_eq!(
        api.put_empty("/v1/agent/service/deregister/ledger-1")
            .await
            .status(),
        200
    );
    let m = dns::udp(r.dns, "ledger.mesh.internal.", RecordType::A).await;
    assert_eq!(m.metadata.response_code, ResponseCode::NXDomain);
    api.register(json!({"Name": "ledger", "ID": "ledger-2", "Address": "10.2.0.2", "Port": 80}))
        .await;
    assert_eq!(
        vip_of(&r, "ledger.mesh.internal.", DEFAULT_RANGE).await,
        vips[3]
    );
    api.register(json!({"Name": "orders", "ID": "orders-1", "Address": "10.3.0.1", "Port": 80}))
        .await;
    let orders = vip_of(&r, "orders.mesh.internal.", DEFAULT_RANGE).await;
    assert!(!vips.contains(&orders));
}

#[tokio::test]
async fn auto_answers_vips_only_while_a_forwarder_on_this_host_heartbeats() {
    let r = Resolver::start();
    let api = Api::new(&r);
    register_mesh(&api).await;
    let instances = [ip("10.1.0.1"), ip("10.1.0.2")];
    assert_eq!(a_records(r.dns, "payment.mesh.internal.").await, instances);

    // A forwarder on another host does not turn VIPs on here (192.0.2.0/24 is never local).
    api.register(json!({
        "Name": "waymark-forwarder", "ID": "waymark-forwarder-far", "Address": "192.0.2.10",
        "Port": 15008, "Meta": {"waymark-host": "far"}
    }))
    .await;
    // A forwarder on this host, heartbeating through a TTL check, does.
    api.register(json!({
        "Name": "waymark-forwarder", "ID": "waymark-forwarder-here", "Address": "127.0.0.1",
        "Port": 15008, "Meta": {"waymark-host": "here"},
        "Check": {"CheckID": "fwd-here", "TTL": "1s", "Status": "passing"}
    }))
    .await;
    let got = until(
        "a VIP once the local forwarder heartbeats",
        Duration::from_secs(5),
        || a_records(r.dns, "payment.mesh.internal."),
        |a| a.len() == 1,
    )
    .await;
    let IpAddr::V4(vip) = got[0] else {
        panic!("{got:?}")
    };
    assert_eq!(vip.octets()[..2], [127, 77]);
    // Remote clients (not loopback) would still get instances: `vips.clients` decides; here
    // the heartbeat stops, the TTL check turns critical, and instances are answered again.
    until(
        "instance addresses once its heartbeat stops",
        Duration::from_secs(10),
        || a_records(r.dns, "payment.mesh.internal."),
        |a| a[..] == instances,
    )
    .await;
    // It heartbeats again: VIPs again.
    assert_eq!(
        api.put_empty("/v1/agent/check/pass/fwd-here")
            .await
            .status(),
        200
    );
    until(
        "the same VIP once it heartbeats again",
        Duration::from_secs(5),
        || a_records(r.dns, "payment.mesh.internal."),
        |a| a[..] == [IpAddr::V4(vip)],
    )
    .await;
}

#[tokio::test]
async fn the_range_and_mode_flags_take_effect_and_bad_values_are_refused() {
    let r = with_args(&["--vip-answers", "all", "--vip-range", "127.99.0.0/24"]);
    register_mesh(&Api::new(&r)).await;
    vip_of(
        &r,
        "payment.mesh.internal.",
        (Ipv4Addr::new(127, 99, 0, 0), 24),
    )
    .await;

    let r = with_args(&["--vip-answers", "off"]);
    register_mesh(&Api::new(&r)).await;
    assert_eq!(
        a_records(r.dns, "payment.mesh.internal.").await,
        [ip("10.1.0.1"), ip("10.1.0.2")]
    );

    for (args, says) in [
        (
            &["--vip-range", "127.99.1.0/16"][..],
            "did you mean 127.99.0.0/16",
        ),
        (&["--vip-range", "fd00::/64"][..], "not an IPv4 CIDR"),
        (&["--vip-answers", "sometimes"][..], "auto, local, all, off"),
    ] {
        let (code, stderr) = resolver_refuses(args);
        assert_eq!(code, Some(2), "{args:?}: {stderr}");
        assert!(stderr.contains(says), "{args:?}: {stderr}");
    }
}
