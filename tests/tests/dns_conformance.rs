//! DNS conformance, each case found by comparing with Knot DNS on the same data: empty
//! non-terminals, EDNS versions and the DO bit, truncation that always parses and fits, zone
//! transfers, ANY at the apex, a literal `*`, and what forwarding may relay. Real queries over
//! UDP (the fast path, and the slow path for what it leaves) and TCP, to the real binary; a
//! fake upstream on loopback counts what reaches it.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use hickory_proto::op::{Edns, Message, MessageType, OpCode, ResponseCode};
use hickory_proto::rr::rdata::A;
use hickory_proto::rr::{DNSClass, RData, Record, RecordType};
use serde_json::json;
use waymark_e2e::dns::{self, parse_strict};
use waymark_e2e::{have, Api, Options, Resolver};

async fn mesh() -> (Resolver, Api) {
    let r = Resolver::start();
    let api = Api::new(&r);
    for (id, addr, tags) in [
        ("pay-1", "10.1.0.1", json!(["v1"])),
        ("pay-2", "10.1.0.2", json!(["v1"])),
    ] {
        api.register(
            json!({"Name": "payment", "ID": id, "Address": addr, "Port": 9000, "Tags": tags}),
        )
        .await;
    }
    (r, api)
}

/// A query with the given class, EDNS (payload size, version, DO) and RD.
fn query(name: &str, rtype: RecordType, class: DNSClass, edns: Option<(u16, u8, bool)>) -> Message {
    let mut m = dns::query(name, rtype, None);
    m.queries[0].set_query_class(class);
    if let Some((size, version, dnssec_ok)) = edns {
        let mut e = Edns::new();
        e.set_max_payload(size);
        e.set_version(version);
        e.set_dnssec_ok(dnssec_ok);
        m.set_edns(e);
    }
    m
}

/// Asks over UDP and TCP; returns both replies, parsed strictly.
async fn both(server: SocketAddr, m: &Message) -> [Message; 2] {
    let udp = parse_strict(&dns::send_udp_bytes(server, m).await).expect("UDP reply parses");
    let tcp = parse_strict(&dns::send_tcp_bytes(server, m).await).expect("TCP reply parses");
    [udp, tcp]
}

fn has_soa(m: &Message) -> bool {
    m.authorities
        .iter()
        .any(|r| r.record_type() == RecordType::SOA)
}

#[tokio::test]
async fn every_ancestor_of_a_name_that_exists_exists() {
    let (r, _api) = mesh().await;
    // A resolver that minimises query names (RFC 9156) asks for each ancestor in turn.
    for name in [
        "_payment._tcp.mesh.internal.",
        "pay-1.instance.payment.mesh.internal.",
        "v1.payment.mesh.internal.",
    ] {
        let labels: Vec<&str> = name.trim_end_matches('.').split('.').collect();
        for start in (0..labels.len() - 1).rev() {
            let ancestor = format!("{}.", labels[start..].join("."));
            for qtype in [RecordType::A, RecordType::NS] {
                for m in both(r.dns, &dns::query(&ancestor, qtype, None)).await {
                    assert_eq!(
                        m.metadata.response_code,
                        ResponseCode::NoError,
                        "{ancestor} {qtype} (ancestor of {name})"
                    );
                }
            }
        }
    }
    // The empty non-terminals are NODATA with the SOA, over both transports.
    for ent in ["_tcp.mesh.internal.", "instance.payment.mesh.internal."] {
        for m in both(r.dns, &dns::query(ent, RecordType::A, Some(1232))).await {
            assert_eq!(m.metadata.response_code, ResponseCode::NoError, "{ent}");
            assert!(m.answers.is_empty(), "{ent}");
            assert!(has_soa(&m), "{ent}: negative answers carry the SOA");
            assert!(m.metadata.authoritative);
        }
    }
    // Below an unknown service nothing exists.
    for name in [
        "instance.nosuch.mesh.internal.",
        "_nosuch._tcp.mesh.internal.",
    ] {
        for m in both(r.dns, &dns::query(name, RecordType::A, None)).await {
            assert_eq!(m.metadata.response_code, ResponseCode::NXDomain, "{name}");
        }
    }
}

#[tokio::test]
async fn edns_versions_above_zero_get_badvers_and_do_is_echoed() {
    let (r, _api) = mesh().await;
    for name in [
        "payment.mesh.internal.",
        "nosuch.mesh.internal.",
        "www.example.test.",
    ] {
        let q = query(name, RecordType::A, DNSClass::IN, Some((1232, 1, false)));
        for m in both(r.dns, &q).await {
            assert_eq!(u16::from(m.metadata.response_code), 16, "{name}: BADVERS");
            let edns = m.edns.as_ref().expect("BADVERS comes with an OPT record");
            assert_eq!(edns.version(), 0, "our version");
            assert!(m.answers.is_empty());
        }
    }
    // DO is echoed, on a cache miss and a hit of the fast path, and over TCP; and not set
    // for a client that did not set it, even when the cached reply was made for one that did.
    for name in ["payment.mesh.internal.", "nosuch.mesh.internal."] {
        for dnssec_ok in [true, true, false, false, true] {
            let q = query(
                name,
                RecordType::A,
                DNSClass::IN,
                Some((1232, 0, dnssec_ok)),
            );
            for m in both(r.dns, &q).await {
                let edns = m.edns.as_ref().expect("EDNS answered with EDNS");
                assert_eq!(edns.flags().dnssec_ok, dnssec_ok, "{name}");
            }
        }
    }
    if have("dig") {
        let dig = |args: &[&str]| {
            let port = r.dns.port().to_string();
            let mut all = vec!["@127.0.0.1", "-p", &port];
            all.extend_from_slice(args);
            let out = std::process::Command::new("dig")
                .args(&all)
                .output()
                .expect("dig runs");
            String::from_utf8_lossy(&out.stdout).to_string()
        };
        let out = dig(&["+edns=1", "+noednsnegotiation", "payment.mesh.internal"]);
        assert!(out.contains("status: BADVERS"), "{out}");
        let out = dig(&["+dnssec", "payment.mesh.internal"]);
        assert!(out.contains("flags: do;"), "{out}");
    }
}

/// The largest reply a client may get over UDP: 512 without EDNS, else its size within
/// [512, 1232] (the resolver's `max_udp_payload`).
fn limit(edns: Option<u16>) -> usize {
    edns.map_or(512, |s| s.clamp(512, 1232) as usize)
}

const SIZES: [Option<u16>; 7] = [
    None,
    Some(512),
    Some(600),
    Some(1000),
    Some(1232),
    Some(1400),
    Some(4096),
];

#[tokio::test]
async fn truncated_replies_always_parse_and_fit() {
    let r = Resolver::start();
    let api = Api::new(&r);
    for n in 0..120 {
        // Long IDs: SRV targets and their additional records are large.
        api.register(json!({"Name": "big",
            "ID": format!("a-rather-long-instance-identifier-number-{n:03}"),
            "Address": format!("10.9.{}.{}", n / 200, n % 200 + 1), "Port": 80}))
            .await;
    }
    // Class IN takes the fast path, class ANY the slow one.
    for class in [DNSClass::IN, DNSClass::ANY] {
        for (name, qtype) in [
            ("big.mesh.internal.", RecordType::A),
            ("big.mesh.internal.", RecordType::SRV),
            ("_big._tcp.mesh.internal.", RecordType::SRV),
            ("big.mesh.internal.", RecordType::ANY),
        ] {
            for size in SIZES {
                for dnssec_ok in [false, true] {
                    let q = query(name, qtype, class, size.map(|s| (s, 0, dnssec_ok)));
                    let bytes = dns::send_udp_bytes(r.dns, &q).await;
                    let what = format!("{name} {qtype} {class} EDNS {size:?}");
                    let m = parse_strict(&bytes).unwrap_or_else(|e| panic!("{what}: {e}"));
                    assert!(bytes.len() <= limit(size), "{what}: {} bytes", bytes.len());
                    assert!(m.metadata.truncation, "{what}: 120 answers never fit");
                    assert!(!m.answers.is_empty(), "{what}: as many answers as fit");
                    assert_eq!(m.edns.is_some(), size.is_some(), "{what}");
                    let m = dns::send_tcp(r.dns, &q).await;
                    assert_eq!(m.answers.len(), 120, "{what} over TCP");
                    assert!(!m.metadata.truncation);
                }
            }
        }
    }
}

/// A fake upstream on loopback: answers every query with `records` A records (and AA set,
/// and EDNS 4096 when asked with EDNS), counting what it receives.
async fn fake_upstream(records: usize) -> (SocketAddr, Arc<AtomicUsize>) {
    let socket = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let addr = socket.local_addr().unwrap();
    let count = Arc::new(AtomicUsize::new(0));
    let seen = count.clone();
    tokio::spawn(async move {
        let mut buf = vec![0u8; 4096];
        while let Ok((n, from)) = socket.recv_from(&mut buf).await {
            seen.fetch_add(1, Ordering::SeqCst);
            let Ok(q) = Message::from_vec(&buf[..n]) else {
                continue;
            };
            let mut m = Message::new(q.metadata.id, MessageType::Response, OpCode::Query);
            m.metadata.recursion_desired = q.metadata.recursion_desired;
            m.metadata.recursion_available = true;
            m.metadata.authoritative = true;
            m.add_queries(q.queries.clone());
            let name = q.queries[0].name().clone();
            for i in 0..records {
                m.add_answer(Record::from_rdata(
                    name.clone(),
                    60,
                    RData::A(A::new(192, 0, (i / 250) as u8, (i % 250) as u8 + 1)),
                ));
            }
            if q.edns.is_some() {
                let mut e = Edns::new();
                e.set_max_payload(4096);
                m.set_edns(e);
            }
            let _ = socket.send_to(&m.to_vec().unwrap(), from).await;
        }
    });
    (addr, count)
}

#[tokio::test]
async fn relayed_replies_fit_the_client_and_never_claim_authority() {
    // 200 A records: about 3,300 bytes, more than any client may get over UDP here.
    let (up, _) = fake_upstream(200).await;
    let r = Resolver::with(Options {
        upstreams: vec![up],
        ..Default::default()
    });
    for size in SIZES {
        let q = query(
            "big.example.test.",
            RecordType::A,
            DNSClass::IN,
            size.map(|s| (s, 0, false)),
        );
        let bytes = dns::send_udp_bytes(r.dns, &q).await;
        let what = format!("EDNS {size:?}");
        let m = parse_strict(&bytes).unwrap_or_else(|e| panic!("{what}: {e}"));
        assert!(bytes.len() <= limit(size), "{what}: {} bytes", bytes.len());
        assert!(m.metadata.truncation, "{what}");
        assert_eq!(m.queries.len(), 1);
        assert_eq!(m.edns.is_some(), size.is_some(), "{what}");
        assert!(!m.metadata.authoritative, "{what}: AA from upstream");
    }
    // A small relayed answer: whole, and not authoritative either.
    let (up, _) = fake_upstream(2).await;
    let r = Resolver::with(Options {
        upstreams: vec![up],
        ..Default::default()
    });
    for m in both(r.dns, &dns::query("www.example.test.", RecordType::A, None)).await {
        assert_eq!(m.answers.len(), 2);
        assert!(!m.metadata.authoritative);
    }
}

#[tokio::test]
async fn queries_that_must_not_be_forwarded_never_reach_the_upstream() {
    let (up, count) = fake_upstream(1).await;
    let r = Resolver::with(Options {
        upstreams: vec![up],
        ..Default::default()
    });
    // No RD: a client that did not ask for recursion gets none.
    let mut no_rd = dns::query("www.example.test.", RecordType::A, None);
    no_rd.metadata.recursion_desired = false;
    for m in both(r.dns, &no_rd).await {
        assert_eq!(m.metadata.response_code, ResponseCode::Refused);
    }
    // CHAOS: the resolver's own business, and other classes.
    for (name, class) in [
        ("version.bind.", DNSClass::CH),
        ("hostname.bind.", DNSClass::CH),
        ("id.server.", DNSClass::CH),
        ("version.server.", DNSClass::CH),
        ("www.example.test.", DNSClass::CH),
        ("www.example.test.", DNSClass::HS),
        ("payment.mesh.internal.", DNSClass::CH),
    ] {
        let q = query(name, RecordType::TXT, class, None);
        for m in both(r.dns, &q).await {
            assert_eq!(
                m.metadata.response_code,
                ResponseCode::Refused,
                "{name} {class}"
            );
        }
    }
    assert_eq!(count.load(Ordering::SeqCst), 0, "nothing was forwarded");
    // A query that may be forwarded is, once per transport (TCP goes to the upstream over
    // UDP first).
    for m in both(r.dns, &dns::query("www.example.test.", RecordType::A, None)).await {
        assert_eq!(m.answers.len(), 1);
    }
    assert_eq!(count.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn transfers_are_refused_any_at_the_apex_and_star_is_a_name() {
    let (r, _api) = mesh().await;
    for (name, qtype) in [
        ("mesh.internal.", RecordType::AXFR),
        ("mesh.internal.", RecordType::IXFR),
        ("payment.mesh.internal.", RecordType::AXFR),
    ] {
        for edns in [None, Some(1232)] {
            for m in both(r.dns, &dns::query(name, qtype, edns)).await {
                assert_eq!(
                    m.metadata.response_code,
                    ResponseCode::Refused,
                    "{name} {qtype}"
                );
                assert!(m.answers.is_empty() && m.authorities.is_empty());
            }
        }
    }
    for m in both(r.dns, &dns::query("mesh.internal.", RecordType::ANY, None)).await {
        let mut types: Vec<RecordType> = m.answers.iter().map(Record::record_type).collect();
        types.sort();
        assert_eq!(types, [RecordType::NS, RecordType::SOA]);
        assert!(m.metadata.authoritative);
    }
    for name in [
        "*.mesh.internal.",
        "*.payment.mesh.internal.",
        "*.instance.payment.mesh.internal.",
        "*._tcp.mesh.internal.",
    ] {
        for m in both(r.dns, &dns::query(name, RecordType::A, None)).await {
            assert_eq!(m.metadata.response_code, ResponseCode::NXDomain, "{name}");
            assert!(has_soa(&m));
        }
    }
    if have("dig") {
        let out = std::process::Command::new("dig")
            .args([
                "@127.0.0.1",
                "-p",
                &r.dns.port().to_string(),
                "AXFR",
                "mesh.internal",
            ])
            .output()
            .expect("dig runs");
        let out = String::from_utf8_lossy(&out.stdout);
        assert!(out.contains("Transfer failed"), "{out}");
    }
}
