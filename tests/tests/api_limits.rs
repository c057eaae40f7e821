//! The registration API cannot be held by idle or slow clients, and ends everything at
//! shutdown: silent connections, idle kept-alive ones and trickled bodies are cut off; a cap
//! in total and per client closes what is beyond it at once, while other clients and DNS
//! keep working; long polls and event streams end at SIGTERM, which completes quickly.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use hickory_proto::rr::RecordType;
use waymark_e2e::gateway::raw;
use waymark_e2e::{connect_from, dns, Options, Resolver};

const CONFIG: &str = r#"
[api]
header_read_timeout = "500ms"
body_read_timeout = "500ms"
max_connections = 20
max_connections_per_client = 8
"#;

fn start() -> Resolver {
    Resolver::with(Options {
        config: Some(CONFIG.into()),
        ..Options::default()
    })
}

fn http_get(to: SocketAddr, path: &str) -> String {
    let mut s = TcpStream::connect(to).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_and_idle_connections_are_closed_and_caps_hold() {
    let r = start();
    let http = r.http;
    let dns_addr = r.dns;
    tokio::task::spawn_blocking(move || {
        // Eight silent connections from one client: the ninth is closed at once.
        let mut silent: Vec<TcpStream> = (0..8).map(|_| connect_from("127.0.0.1", http)).collect();
        let mut ninth = connect_from("127.0.0.1", http);
        assert!(
            closed(&mut ninth, Duration::from_millis(300)),
            "a connection beyond the per-client cap stays open"
        );
        // Another client is still served, and DNS answers meanwhile.
        let mut other = connect_from("127.0.0.2", http);
        write!(other, "GET /healthz/live HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
        other
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        let mut buf = [0u8; 256];
        let n = other.read(&mut buf).unwrap();
        assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));
        let rt = tokio::runtime::Runtime::new().unwrap();
        rt.block_on(async {
            let soa = dns::tcp(dns_addr, "mesh.internal.", RecordType::SOA).await;
            assert_eq!(soa.answers.len(), 1, "{soa:?}");
        });

        // The silent ones are cut off by the header deadline (500 ms), with margin.
        let started = Instant::now();
        for s in &mut silent {
            assert!(
                closed(s, Duration::from_secs(3)),
                "a silent connection outlived the header deadline"
            );
        }
        assert!(started.elapsed() < Duration::from_secs(3));
        // The kept-alive one, idle after its answer, is closed too.
        assert!(
            closed(&mut other, Duration::from_secs(3)),
            "an idle kept-alive connection stays open"
        );
        // With everything closed, the client gets in again.
        let page = http_get(http, "/healthz/live");
        assert!(page.starts_with("HTTP/1.1 200"), "{page}");
        // The refusals are counted.
        let metrics = http_get(http, "/metrics");
        assert!(
            metrics
                .contains(r#"waymark_connections_refused_total{listener="http",cap="per_client"}"#),
            "{metrics}"
        );
    })
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trickled_body_gets_408_and_frees_the_connection() {
    let r = start();
    let http = r.http;
    tokio::task::spawn_blocking(move || {
        let mut s = TcpStream::connect(http).unwrap();
        write!(
            s,
            "PUT /v1/agent/service/register HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 200\r\n\r\n{{\"Name\""
        )
        .unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let started = Instant::now();
        let mut out = Vec::new();
        let mut buf = [0u8; 1024];
        // One more byte now and then, never the whole body.
        loop {
            let _ = s.write_all(b" ");
            s.set_read_timeout(Some(Duration::from_millis(100))).unwrap();
            match s.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => {
                    out.extend_from_slice(&buf[..n]);
                    if out.windows(4).any(|w| w == b"\r\n\r\n") {
                        break;
                    }
                }
                Err(_) => {}
            }
            assert!(started.elapsed() < Duration::from_secs(5), "no answer");
        }
        let text = String::from_utf8_lossy(&out);
        assert!(text.starts_with("HTTP/1.1 408"), "{text}");
    })
    .await
    .unwrap();
    let body: serde_json::Value = reqwest::get(r.url("/v1/agent/services"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(body, serde_json::json!({}), "nothing was registered");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn long_polls_and_event_streams_end_at_shutdown() {
    let mut r = start();
    let c = reqwest::Client::new();
    // Wait for the first index, then block on it for up to a minute.
    let first = c.get(r.url("/v1/catalog/services")).send().await.unwrap();
    let index = waymark_e2e::consul_index(&first);
    let poll = tokio::spawn(
        c.get(r.url(&format!("/v1/catalog/services?index={index}&wait=60s")))
            .send(),
    );
    let mut events = c
        .get(r.url("/v1/waymark/events?index=0"))
        .send()
        .await
        .unwrap();
    // The first event (the whole state) arrives.
    let chunk = tokio::time::timeout(Duration::from_secs(5), events.chunk())
        .await
        .unwrap()
        .unwrap();
    assert!(chunk.is_some());
    let started = Instant::now();
    tokio::task::block_in_place(|| r.stop());
    let took = started.elapsed();
    assert!(took < Duration::from_secs(3), "shutdown took {took:?}");
    // The long poll got its answer, and the event stream ended.
    let answered = tokio::time::timeout(Duration::from_secs(2), poll).await;
    assert!(answered.is_ok(), "the long poll never ended");
    let rest = tokio::time::timeout(Duration::from_secs(2), async {
        while let Ok(Some(_)) = events.chunk().await {}
    })
    .await;
    assert!(rest.is_ok(), "the event stream never ended");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn checks_are_floored_and_capped_so_a_target_cannot_be_flooded() {
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::Arc;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    // Production floors (1 s), set explicitly: the harness lowers them otherwise.
    let r = Resolver::with(Options {
        config: Some(
            "[health]\nmin_interval = \"1s\"\nmin_timeout = \"1s\"\nmax_checks_per_instance = 4\n"
                .into(),
        ),
        ..Options::default()
    });
    let api = waymark_e2e::Api::new(&r);
    // A check target that counts its probes.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let target = listener.local_addr().unwrap();
    let probes = Arc::new(AtomicU64::new(0));
    let counter = probes.clone();
    let server = tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = listener.accept().await else {
                return;
            };
            counter.fetch_add(1, Ordering::Relaxed);
            tokio::spawn(async move {
                let mut buf = [0u8; 1024];
                let _ = s.read(&mut buf).await;
                let _ = s
                    .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
                    .await;
            });
        }
    });
    let check = |n: usize| {
        serde_json::json!({"CheckID": format!("c{n}"), "HTTP": format!("http://{target}/"),
            "Interval": "10ms", "Timeout": "5ms"})
    };
    // Five checks: over the cap of four, refused with the reason.
    let resp = api
        .put(
            "/v1/agent/service/register",
            serde_json::json!({"Name": "flood", "ID": "flood-1", "Port": 1,
                "Checks": (0..5).map(check).collect::<Vec<_>>()}),
        )
        .await;
    assert_eq!(resp.status(), 400);
    assert!(resp
        .text()
        .await
        .unwrap()
        .contains("max_checks_per_instance"));
    // One check asking for 10 ms runs at the 1 s floor.
    api.register(
        serde_json::json!({"Name": "flood", "ID": "flood-1", "Port": 1,
        "Check": check(0)}),
    )
    .await;
    waymark_e2e::until(
        "the check passes",
        Duration::from_secs(5),
        || api.passing_ids("flood"),
        |ids| ids.len() == 1,
    )
    .await;
    let before = probes.load(Ordering::Relaxed);
    tokio::time::sleep(Duration::from_millis(2_500)).await;
    let during = probes.load(Ordering::Relaxed) - before;
    // 10 ms would be ~250 probes; the 1 s floor gives 2 or 3.
    assert!(during <= 4, "{during} probes in 2.5 s");
    assert!(during >= 1, "the check stopped probing");
    server.abort();
}

/// Whether the server closes `s` within `within`.
fn closed(s: &mut TcpStream, within: Duration) -> bool {
    raw::closed_within(s, within).is_some()
}
