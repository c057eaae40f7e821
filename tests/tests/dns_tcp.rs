//! DNS over TCP cannot be held or starved by clients: a cap in total and per client closes
//! what is beyond it at once, idle and trickling connections are closed, queries pipelined
//! on one connection are answered in order, and a resolver out of descriptors pauses its
//! accept loop instead of spinning a core (hickory's loop retried at once).

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use hickory_proto::op::Message;
use hickory_proto::rr::RecordType;
use waymark_e2e::gateway::raw;
use waymark_e2e::{connect_from, dns, Options, Resolver};

fn framed(name: &str, id: u16) -> Vec<u8> {
    let mut m = dns::query(name, RecordType::SOA, None);
    m.metadata.id = id;
    let wire = m.to_vec().unwrap();
    let mut out = (wire.len() as u16).to_be_bytes().to_vec();
    out.extend_from_slice(&wire);
    out
}

fn read_reply(s: &mut TcpStream) -> Message {
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut len = [0u8; 2];
    s.read_exact(&mut len).unwrap();
    let mut buf = vec![0u8; u16::from_be_bytes(len) as usize];
    s.read_exact(&mut buf).unwrap();
    Message::from_vec(&buf).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn caps_idle_timeout_and_pipelining() {
    let r = Resolver::with(Options {
        config: Some(
            "[dns]\ntcp_max_connections = 20\ntcp_max_connections_per_client = 4\ntcp_idle_timeout = \"500ms\"\n"
                .into(),
        ),
        ..Options::default()
    });
    let addr = r.dns;
    let metrics_url = r.url("/metrics");
    tokio::task::spawn_blocking(move || {
        // Three queries in one write: three answers, in order.
        let mut s = connect_from("127.0.0.1", addr);
        let mut batch = Vec::new();
        for id in [11, 12, 13] {
            batch.extend(framed("mesh.internal.", id));
        }
        s.write_all(&batch).unwrap();
        for id in [11, 12, 13] {
            let m = read_reply(&mut s);
            assert_eq!(m.metadata.id, id);
            assert_eq!(m.answers.len(), 1);
        }
        // Idle after its answers: closed.
        assert!(
            closed(&mut s, Duration::from_secs(3)),
            "idle connection kept"
        );

        // Four silent connections from one client: the fifth is closed at once.
        let mut silent: Vec<TcpStream> = (0..4).map(|_| connect_from("127.0.0.1", addr)).collect();
        let mut fifth = connect_from("127.0.0.1", addr);
        assert!(
            closed(&mut fifth, Duration::from_millis(300)),
            "a connection beyond the per-client cap stays open"
        );
        // Another client is served meanwhile, and so is UDP.
        let mut other = connect_from("127.0.0.2", addr);
        other.write_all(&framed("mesh.internal.", 7)).unwrap();
        assert_eq!(read_reply(&mut other).metadata.id, 7);
        let rt = tokio::runtime::Runtime::new().unwrap();
        let soa = rt.block_on(dns::udp(addr, "mesh.internal.", RecordType::SOA));
        assert_eq!(soa.answers.len(), 1);
        // A query trickled byte by byte does not keep its connection: the clock runs from
        // its first byte.
        let mut trickle = connect_from("127.0.0.3", addr);
        let started = Instant::now();
        for b in framed("mesh.internal.", 9).iter().take(10) {
            if trickle.write_all(&[*b]).is_err() {
                break;
            }
            std::thread::sleep(Duration::from_millis(150));
        }
        assert!(closed(&mut trickle, Duration::from_secs(3)));
        assert!(started.elapsed() < Duration::from_secs(4));
        // The silent ones are closed by the idle timeout.
        for s in &mut silent {
            assert!(closed(s, Duration::from_secs(3)), "silent connection kept");
        }
        let metrics = rt.block_on(async {
            reqwest::get(metrics_url)
                .await
                .unwrap()
                .text()
                .await
                .unwrap()
        });
        assert!(
            metrics.contains(
                r#"waymark_connections_refused_total{listener="dns_tcp",cap="per_client"}"#
            ),
            "{metrics}"
        );
    })
    .await
    .unwrap();
}

/// CPU seconds (user + system) the process has used.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let after = &stat[stat.rfind(')').unwrap() + 2..];
    let fields: Vec<&str> = after.split_whitespace().collect();
    let ticks: f64 = fields[11].parse::<f64>().unwrap() + fields[12].parse::<f64>().unwrap();
    ticks / 100.0
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn out_of_descriptors_the_accept_loop_pauses_instead_of_spinning() {
    if !waymark_e2e::have("prlimit") {
        panic!("prlimit is required (Debian: util-linux)");
    }
    // 64 descriptors, and caps high enough that the descriptors run out first.
    let r = Resolver::with(Options {
        config: Some(
            "[dns]\ntcp_max_connections = 1000\ntcp_max_connections_per_client = 1000\ntcp_idle_timeout = \"30s\"\n[api]\nmax_connections = 8\n"
                .into(),
        ),
        wrapper: vec!["prlimit".into(), "--nofile=64:64".into()],
        ..Options::default()
    });
    let pid = r.pid().unwrap();
    let addr = r.dns;
    let held = tokio::task::spawn_blocking(move || {
        // More connections than the resolver has descriptors for.
        let held: Vec<TcpStream> = (0..120)
            .filter_map(|_| TcpStream::connect_timeout(&addr, Duration::from_secs(1)).ok())
            .collect();
        held
    })
    .await
    .unwrap();
    assert!(held.len() >= 64, "only {} connections made", held.len());
    // Out of descriptors now: it must sit still, not spin.
    let before = cpu_seconds(pid);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let used = cpu_seconds(pid) - before;
    assert!(
        used < 0.5,
        "{used:.2} s of CPU in 2 s while out of descriptors"
    );
    // UDP is still answered, and TCP again once descriptors are free.
    let soa = dns::udp(addr, "mesh.internal.", RecordType::SOA).await;
    assert_eq!(soa.answers.len(), 1);
    drop(held);
    let soa = waymark_e2e::until(
        "TCP answered again",
        Duration::from_secs(10),
        || async {
            tokio::time::timeout(
                Duration::from_secs(1),
                dns::tcp(addr, "mesh.internal.", RecordType::SOA),
            )
            .await
            .ok()
        },
        |m| m.is_some(),
    )
    .await;
    assert_eq!(soa.unwrap().answers.len(), 1);
}

/// Whether the server closes `s` within `within`.
fn closed(s: &mut TcpStream, within: Duration) -> bool {
    raw::closed_within(s, within).is_some()
}
