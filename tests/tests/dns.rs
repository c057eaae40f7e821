//! DNS answers through the real interfaces: instances registered over HTTP, queried with
//! hickory's client over UDP and TCP, raw messages for EDNS sizes and garbage, and `dig`.

use std::time::Duration;

use hickory_proto::op::{Message, ResponseCode};
use hickory_proto::rr::{RData, RecordType};
use serde_json::json;
use waymark_e2e::dns::{self, addresses};
use waymark_e2e::{have, ip, Api, Resolver};

async fn mesh() -> (Resolver, Api) {
    let r = Resolver::start();
    let api = Api::new(&r);
    for (id, addr, tags) in [
        ("pay-1", "10.1.0.1", json!(["v1"])),
        ("pay-2", "10.1.0.2", json!(["v1"])),
        ("pay-3", "10.1.0.3", json!(["v2", "canary"])),
        ("pay-6", "fd00::6", json!([])),
    ] {
        api.register(
            json!({"Name": "payment", "ID": id, "Address": addr, "Port": 9000, "Tags": tags}),
        )
        .await;
    }
    api.register(
        json!({"Name": "ledger", "ID": "ledger-1", "Address": "10.2.0.1", "Port": 80,
        "Check": {"TTL": "30s"}}),
    )
    .await;
    (r, api)
}

#[tokio::test]
async fn services_tags_and_instances_over_udp_and_tcp() {
    let (r, _api) = mesh().await;
    for m in [
        dns::udp(r.dns, "payment.mesh.internal.", RecordType::A).await,
        dns::tcp(r.dns, "payment.mesh.internal.", RecordType::A).await,
        dns::udp(r.dns, "PayMent.MESH.internal.", RecordType::A).await,
    ] {
        assert_eq!(m.metadata.response_code, ResponseCode::NoError);
        assert!(m.metadata.authoritative);
        assert_eq!(
            addresses(&m),
            [ip("10.1.0.1"), ip("10.1.0.2"), ip("10.1.0.3")]
        );
        assert!(m.answers.iter().all(|a| a.ttl == 5), "short positive TTL");
    }
    let m = dns::udp(r.dns, "payment.mesh.internal.", RecordType::AAAA).await;
    assert_eq!(addresses(&m), [ip("fd00::6")]);
    let m = dns::udp(r.dns, "v1.payment.mesh.internal.", RecordType::A).await;
    assert_eq!(addresses(&m), [ip("10.1.0.1"), ip("10.1.0.2")]);
    let m = dns::tcp(r.dns, "canary.payment.mesh.internal.", RecordType::A).await;
    assert_eq!(addresses(&m), [ip("10.1.0.3")]);
    let m = dns::udp(
        r.dns,
        "pay-2.instance.payment.mesh.internal.",
        RecordType::A,
    )
    .await;
    assert_eq!(addresses(&m), [ip("10.1.0.2")]);
}

#[tokio::test]
async fn srv_records_carry_target_addresses() {
    let (r, _api) = mesh().await;
    for name in ["payment.mesh.internal.", "_payment._tcp.mesh.internal."] {
        let m = dns::udp(r.dns, name, RecordType::SRV).await;
        assert_eq!(m.answers.len(), 4, "{name}");
        for a in &m.answers {
            let RData::SRV(srv) = &a.data else {
                panic!("not SRV: {a:?}")
            };
            assert_eq!(srv.port, 9000);
            let glue: Vec<_> = m
                .additionals
                .iter()
                .filter(|g| g.name == srv.target)
                .collect();
            assert_eq!(glue.len(), 1, "one address for {}", srv.target);
        }
    }
}

#[tokio::test]
async fn zone_apex_nxdomain_and_nodata() {
    let (r, _api) = mesh().await;
    let m = dns::udp(r.dns, "mesh.internal.", RecordType::SOA).await;
    assert_eq!(m.answers[0].record_type(), RecordType::SOA);
    let m = dns::tcp(r.dns, "mesh.internal.", RecordType::NS).await;
    assert_eq!(m.answers[0].record_type(), RecordType::NS);

    let m = dns::udp(r.dns, "nope.mesh.internal.", RecordType::A).await;
    assert_eq!(m.metadata.response_code, ResponseCode::NXDomain);
    assert_eq!(m.authorities[0].record_type(), RecordType::SOA);

    // ledger's TTL check starts critical: a known service with nothing to answer is NODATA.
    let m = dns::udp(r.dns, "ledger.mesh.internal.", RecordType::A).await;
    assert_eq!(m.metadata.response_code, ResponseCode::NoError);
    assert!(m.answers.is_empty());
    let soa = &m.authorities[0];
    let RData::SOA(s) = &soa.data else {
        panic!("SOA in authority")
    };
    assert_eq!(soa.ttl, s.minimum, "negative TTL is the SOA minimum");
}

#[tokio::test]
async fn udp_replies_fit_the_payload_size_and_tcp_has_everything() {
    let r = Resolver::start();
    let api = Api::new(&r);
    for n in 0..100 {
        api.register(json!({"Name": "big", "ID": format!("big-{n}"),
            "Address": format!("10.9.{}.{}", n / 250, n % 250 + 1), "Port": 80}))
            .await;
    }
    let (m, size) = dns::send_udp(
        r.dns,
        &dns::query("big.mesh.internal.", RecordType::A, None),
    )
    .await;
    assert!(size <= 512, "{size} bytes without EDNS");
    assert!(m.metadata.truncation, "TC set when answers were cut");
    let cut = m.answers.len();
    assert!(cut > 10 && cut < 100);

    let (m, size) = dns::send_udp(
        r.dns,
        &dns::query("big.mesh.internal.", RecordType::A, Some(1232)),
    )
    .await;
    assert!(size <= 1232, "{size}");
    assert!(m.answers.len() > cut);

    let m = dns::send_tcp(
        r.dns,
        &dns::query("big.mesh.internal.", RecordType::A, None),
    )
    .await;
    assert_eq!(m.answers.len(), 100);
    assert!(!m.metadata.truncation);

    // A small answer is never marked truncated.
    let (m, _) = dns::send_udp(
        r.dns,
        &dns::query("big-1.instance.big.mesh.internal.", RecordType::A, None),
    )
    .await;
    assert_eq!(m.answers.len(), 1);
    assert!(!m.metadata.truncation);

    // Answers are shuffled per query.
    let mut firsts = std::collections::HashSet::new();
    for _ in 0..10 {
        let m = dns::send_tcp(
            r.dns,
            &dns::query("big.mesh.internal.", RecordType::A, None),
        )
        .await;
        firsts.insert(format!("{:?}", m.answers[0].data));
    }
    assert!(firsts.len() > 1, "the first answer changes between queries");
}

#[tokio::test]
async fn garbage_gets_formerr_or_nothing_and_the_server_keeps_serving() {
    let (r, _api) = mesh().await;
    let wait = Duration::from_millis(300);
    // Shorter than a header: dropped.
    assert!(dns::raw_udp(r.dns, b"\x01\x02\x03", wait).await.is_none());
    // A header that promises a question that is not there: FORMERR.
    let bad = [
        0x12, 0x34, 0x01, 0x00, 0x00, 0x01, 0, 0, 0, 0, 0, 0, 0x05, b'a',
    ];
    let reply = dns::raw_udp(r.dns, &bad, Duration::from_secs(2))
        .await
        .expect("a reply");
    let m = Message::from_vec(&reply).unwrap();
    assert_eq!(m.metadata.id, 0x1234);
    assert_eq!(m.metadata.response_code, ResponseCode::FormErr);
    // Random bytes, over UDP and TCP.
    let mut seed = 7u32;
    for len in [12usize, 40, 300, 1400] {
        let junk: Vec<u8> = (0..len)
            .map(|_| {
                seed = seed.wrapping_mul(1_103_515_245).wrapping_add(12345);
                (seed >> 16) as u8
            })
            .collect();
        let _ = dns::raw_udp(r.dns, &junk, Duration::from_millis(100)).await;
        if let Ok(mut s) = tokio::net::TcpStream::connect(r.dns).await {
            use tokio::io::AsyncWriteExt;
            let _ = s.write_all(&(junk.len() as u16).to_be_bytes()).await;
            let _ = s.write_all(&junk).await;
        }
    }
    let m = dns::udp(r.dns, "payment.mesh.internal.", RecordType::A).await;
    assert_eq!(addresses(&m).len(), 3, "still serving");
    let m = dns::tcp(r.dns, "payment.mesh.internal.", RecordType::A).await;
    assert_eq!(addresses(&m).len(), 3, "still serving over TCP");
}

#[tokio::test]
async fn dig_sees_answers_srv_and_truncation() {
    assert!(
        have("dig"),
        "dig is required (Debian package dnsutils; .ci/run installs it)"
    );
    let (r, api) = mesh().await;
    for n in 0..60 {
        api.register(json!({"Name": "wide", "ID": format!("w{n}"), "Address": format!("10.8.0.{}", n + 1), "Port": 80}))
            .await;
    }
    let dig = |args: Vec<String>| {
        let out = std::process::Command::new("dig")
            .args(&args)
            .output()
            .expect("dig runs");
        assert!(
            out.status.success(),
            "dig failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    };
    let base = vec![
        "@127.0.0.1".to_string(),
        "-p".into(),
        r.dns.port().to_string(),
    ];
    let with = |extra: &[&str]| {
        let mut a = base.clone();
        a.extend(extra.iter().map(|s| s.to_string()));
        a
    };
    let out = dig(with(&["+short", "payment.mesh.internal"]));
    let mut lines: Vec<&str> = out.lines().collect();
    lines.sort();
    assert_eq!(lines, ["10.1.0.1", "10.1.0.2", "10.1.0.3"]);
    let out = dig(with(&["+short", "SRV", "_payment._tcp.mesh.internal"]));
    assert_eq!(out.lines().count(), 4, "{out}");
    let out = dig(with(&["nope.mesh.internal"]));
    assert!(out.contains("status: NXDOMAIN"), "{out}");
    // Without EDNS over UDP and no TCP retry: a truncated reply with the TC flag.
    let out = dig(with(&["+noedns", "+ignore", "wide.mesh.internal"]));
    assert!(out.contains(" tc"), "TC flag expected: {out}");
    // dig's default: retries over TCP on TC and gets all 60.
    let out = dig(with(&["+short", "+noedns", "wide.mesh.internal"]));
    assert_eq!(out.lines().count(), 60, "{out}");
}
