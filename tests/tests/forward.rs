//! Forwarding: names outside the zone go to upstream resolvers that the test starts on
//! loopback (another waymark-resolver, authoritative for `upstream.test`), with failover past
//! a silent upstream, and REFUSED for clients outside the allowed networks.

use std::net::IpAddr;
use std::time::{Duration, Instant};

use hickory_proto::op::ResponseCode;
use hickory_proto::rr::RecordType;
use serde_json::json;
use waymark_e2e::dns::{self, addresses};
use waymark_e2e::{Api, Options, Resolver};

async fn upstream() -> Resolver {
    let up = Resolver::with(Options {
        extra_args: vec!["--zone".into(), "upstream.test".into()],
        ..Default::default()
    });
    Api::new(&up)
        .register(json!({"Name": "www", "Address": "192.0.2.10", "Port": 80}))
        .await;
    up
}

#[tokio::test]
async fn other_names_are_forwarded_and_relayed() {
    let up = upstream().await;
    let r = Resolver::with(Options {
        upstreams: vec![up.dns],
        ..Default::default()
    });
    let m = dns::udp(r.dns, "www.upstream.test.", RecordType::A).await;
    assert_eq!(m.metadata.response_code, ResponseCode::NoError);
    assert_eq!(addresses(&m), ["192.0.2.10".parse::<IpAddr>().unwrap()]);
    let m = dns::tcp(r.dns, "www.upstream.test.", RecordType::A).await;
    assert_eq!(addresses(&m), ["192.0.2.10".parse::<IpAddr>().unwrap()]);
    // The upstream's negative answers are relayed as they are.
    let m = dns::udp(r.dns, "nope.upstream.test.", RecordType::A).await;
    assert_eq!(m.metadata.response_code, ResponseCode::NXDomain);
    // The zone itself is still answered locally.
    let m = dns::udp(r.dns, "mesh.internal.", RecordType::SOA).await;
    assert!(m.metadata.authoritative);
}

#[tokio::test]
async fn a_silent_upstream_is_skipped() {
    let up = upstream().await;
    // A socket that receives queries and never answers.
    let silent = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let r = Resolver::with(Options {
        upstreams: vec![silent.local_addr().unwrap(), up.dns],
        config: Some("[dns]\nupstream_timeout = \"300ms\"\n".into()),
        ..Default::default()
    });
    let started = Instant::now();
    let m = dns::udp(r.dns, "www.upstream.test.", RecordType::A).await;
    assert_eq!(addresses(&m), ["192.0.2.10".parse::<IpAddr>().unwrap()]);
    assert!(started.elapsed() < Duration::from_secs(3));
    // The upstream that answered is tried first from now on.
    let started = Instant::now();
    let m = dns::udp(r.dns, "www.upstream.test.", RecordType::A).await;
    assert_eq!(addresses(&m).len(), 1);
    assert!(
        started.elapsed() < Duration::from_millis(250),
        "{:?}",
        started.elapsed()
    );
    let metrics = reqwest::get(r.url("/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(metrics.contains("result=\"timeout\""), "{metrics}");
}

#[tokio::test]
async fn all_upstreams_down_is_servfail() {
    let silent = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let r = Resolver::with(Options {
        upstreams: vec![silent.local_addr().unwrap()],
        config: Some("[dns]\nupstream_timeout = \"200ms\"\n".into()),
        ..Default::default()
    });
    let (m, _) = dns::send_udp(r.dns, &dns::query("www.example.test.", RecordType::A, None)).await;
    assert_eq!(m.metadata.response_code, ResponseCode::ServFail);
}

#[tokio::test]
async fn clients_outside_allowed_networks_are_refused() {
    let up = upstream().await;
    let r = Resolver::with(Options {
        upstreams: vec![up.dns],
        config: Some("[dns]\nforward_allow = [\"10.0.0.0/8\"]\n".into()),
        ..Default::default()
    });
    let (m, _) = dns::send_udp(
        r.dns,
        &dns::query("www.upstream.test.", RecordType::A, None),
    )
    .await;
    assert_eq!(m.metadata.response_code, ResponseCode::Refused);
    assert!(!m.metadata.recursion_available);
    // The mesh zone is answered for everyone.
    let (m, _) = dns::send_udp(r.dns, &dns::query("mesh.internal.", RecordType::SOA, None)).await;
    assert_eq!(m.metadata.response_code, ResponseCode::NoError);
}

/// Descriptors the process holds now.
fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_against_a_silent_upstream_is_bounded() {
    // An upstream that takes every query and never answers.
    let silent = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let r = Resolver::with(Options {
        upstreams: vec![silent.local_addr().unwrap()],
        config: Some("[dns]\nupstream_timeout = \"30s\"\nmax_forwards = 64\n".into()),
        ..Default::default()
    });
    let pid = r.pid().unwrap();
    // Warm up: the shared sockets to the upstream are opened by the first forward.
    let client = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    client.connect(r.dns).await.unwrap();
    let query = |n: u16| {
        let mut m = dns::query(&format!("q{n}.elsewhere.test."), RecordType::A, None);
        m.metadata.id = n;
        m.to_vec().unwrap()
    };
    client.send(&query(0)).await.unwrap();
    let base = open_fds(pid);

    // 2,000 queries, in bursts of 100 (so that no socket buffer on the way drops them): 64
    // go upstream and wait there, every other one gets SERVFAIL at once.
    const FLOOD: u16 = 2_000;
    let mut servfail = 0;
    let mut buf = vec![0u8; 4096];
    let deadline = Instant::now() + Duration::from_secs(20);
    for burst in 0..FLOOD / 100 {
        for n in 1..=100 {
            client.send(&query(burst * 100 + n)).await.unwrap();
        }
        while Instant::now() < deadline {
            let Ok(Ok(n)) =
                tokio::time::timeout(Duration::from_millis(300), client.recv(&mut buf)).await
            else {
                break;
            };
            let m = hickory_proto::op::Message::from_vec(&buf[..n]).unwrap();
            if m.metadata.response_code == ResponseCode::ServFail {
                servfail += 1;
            }
        }
    }
    assert!(
        servfail >= FLOOD as usize - 64 - 20,
        "only {servfail} of {FLOOD} refused at once"
    );
    // No socket per query: the descriptor count barely moved.
    let during = open_fds(pid);
    assert!(
        during <= base + 8,
        "descriptors {base} → {during} during the flood"
    );
    // The zone is still answered, and the overload is counted.
    let m = dns::udp(r.dns, "mesh.internal.", RecordType::SOA).await;
    assert!(m.metadata.authoritative);
    let metrics = reqwest::get(r.url("/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(metrics.contains(r#"result="overload""#), "{metrics}");
    // What reached the upstream: at most the cap (plus the warm-up), never the flood.
    let mut seen = 0;
    while let Ok(Ok(_)) =
        tokio::time::timeout(Duration::from_millis(200), silent.recv(&mut buf)).await
    {
        seen += 1;
    }
    assert!(seen <= 65, "{seen} queries reached the upstream");
}
