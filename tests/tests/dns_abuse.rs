//! The resolver cannot be used as an amplifier against a third party: UDP answers to
//! clients outside `dns.local_clients` are capped in size (TC beyond: a real client retries
//! over TCP, which cannot be spoofed), and response-rate limiting drops answers past the rate
//! to one client network, sending every second one truncated (slip). Local clients are
//! neither capped nor limited. Here 127.0.0.1 is local and 127.0.0.2 plays a remote client.

use std::time::Duration;

use hickory_proto::op::Message;
use hickory_proto::rr::RecordType;
use serde_json::json;
use waymark_e2e::{dns, Api, Options, Resolver};

const CONFIG: &str = r#"
[dns]
local_clients = ["127.0.0.1/32"]
remote_max_udp_payload = 512
rrl_rate = 5
rrl_slip = 2
"#;

/// Sends `m` from `from` and collects every reply that arrives within `wait`.
async fn ask(
    from: &str,
    to: std::net::SocketAddr,
    queries: &[Vec<u8>],
    wait: Duration,
) -> Vec<Vec<u8>> {
    let s = tokio::net::UdpSocket::bind(format!("{from}:0"))
        .await
        .unwrap();
    s.connect(to).await.unwrap();
    for q in queries {
        s.send(q).await.unwrap();
    }
    let mut got = Vec::new();
    let mut buf = vec![0u8; 65535];
    while let Ok(Ok(n)) = tokio::time::timeout(wait, s.recv(&mut buf)).await {
        got.push(buf[..n].to_vec());
    }
    got
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn remote_answers_are_capped_and_rate_limited() {
    let r = Resolver::with(Options {
        config: Some(CONFIG.into()),
        ..Options::default()
    });
    let api = Api::new(&r);
    for i in 0..30 {
        api.register(
            json!({"Name": "big", "ID": format!("big-instance-with-a-long-name-{i}"),
            "Address": format!("10.9.0.{i}"), "Port": 8080}),
        )
        .await;
    }
    let srv = |id: u16| {
        let mut m = dns::query("big.mesh.internal.", RecordType::SRV, Some(4096));
        m.metadata.id = id;
        m.to_vec().unwrap()
    };
    let query_len = srv(1).len();

    // Size: the local client gets everything it asked room for; the remote one at most
    // 512 bytes, truncated.
    let local = ask("127.0.0.1", r.dns, &[srv(1)], Duration::from_millis(500)).await;
    assert_eq!(local.len(), 1);
    assert!(local[0].len() > 512, "local reply {} bytes", local[0].len());
    let remote = ask("127.0.0.2", r.dns, &[srv(2)], Duration::from_millis(500)).await;
    assert_eq!(remote.len(), 1);
    assert!(
        remote[0].len() <= 512,
        "remote reply {} bytes",
        remote[0].len()
    );
    let m = Message::from_vec(&remote[0]).unwrap();
    assert!(m.metadata.truncation);
    assert!(
        remote[0].len() <= 512.max(query_len * 12),
        "amplification {}×",
        remote[0].len() / query_len
    );

    // Rate: 60 queries at once from the remote network get at most the rate in full
    // (twice, if the burst straddles a second), some truncated, the rest nothing.
    let burst: Vec<Vec<u8>> = (100..160).map(srv).collect();
    let replies = ask("127.0.0.2", r.dns, &burst, Duration::from_millis(500)).await;
    let (mut full, mut truncated) = (0, 0);
    for bytes in &replies {
        let m = Message::from_vec(bytes).unwrap();
        if m.answers.is_empty() && m.metadata.truncation {
            truncated += 1;
        } else {
            full += 1;
        }
    }
    assert!(full <= 10, "{full} full answers past a rate of 5/s");
    assert!(
        truncated >= 10,
        "only {truncated} slipped (truncated) answers"
    );
    assert!(
        replies.len() < burst.len(),
        "nothing was dropped: {}",
        replies.len()
    );
    // The local client is not limited.
    let burst: Vec<Vec<u8>> = (200..260).map(srv).collect();
    let replies = ask("127.0.0.1", r.dns, &burst, Duration::from_millis(500)).await;
    assert_eq!(replies.len(), burst.len());
    let metrics = reqwest::get(r.url("/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains(r#"waymark_dns_rate_limited_total{action="dropped"}"#),
        "{metrics}"
    );
}
