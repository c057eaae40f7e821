//! The gateway's protections through its real listener: per-route and per-client-IP rate
//! limits (429 with Retry-After), oversized headers (431) and bodies (413, declared or
//! streamed), slow clients (a total deadline for the request head), and bad input that must
//! never take the gateway down.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use serde_json::json;
use waymark_e2e::gateway::raw::{closed_within, read_response};
use waymark_e2e::gateway::{Backend, Gateway};
use waymark_e2e::{Api, Resolver};

const BACKEND: &str = env!("CARGO_BIN_EXE_gw_backend");

const CONFIG: &str = r#"
[limits]
max_header_bytes = 4096
max_body_bytes = 1000
header_read_timeout = "1s"

[[routes]]
host = "limited.test"
service = "web"
rate_limit = { rate = 1.0, burst = 3 }

[[routes]]
host = "open.test"
service = "web"
"#;

fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap()
}

async fn start() -> (Resolver, Backend, reqwest::Client) {
    let resolver = Resolver::start();
    let api = Api::new(&resolver);
    let web = Backend::start(BACKEND, "web-1");
    api.register(web.registration("web", &[], json!({}), 0))
        .await;
    (resolver, web, client())
}

/// Sends raw bytes and returns what came back until the gateway closed or 3 s passed.
fn raw(gw: &Gateway, bytes: &[u8]) -> String {
    let mut s = TcpStream::connect(gw.http).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
    let _ = s.write_all(bytes);
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    String::from_utf8_lossy(&out).to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn route_rate_limit_answers_429_with_retry_after() {
    let (resolver, _web, c) = start().await;
    let gw = Gateway::with_config(&resolver, CONFIG);
    gw.wait_status(&c, "open.test", "/", 200).await;
    let mut statuses = Vec::new();
    let mut retry_after = None;
    for _ in 0..6 {
        let r = c
            .get(gw.url("/"))
            .header("host", "limited.test")
            .send()
            .await
            .unwrap();
        statuses.push(r.status().as_u16());
        if r.status() == 429 {
            retry_after = r
                .headers()
                .get("retry-after")
                .map(|v| v.to_str().unwrap().to_string());
            assert_eq!(r.text().await.unwrap(), "too many requests\n");
        }
    }
    // A burst of three, then refused (the bucket refills at 1/s, far slower than the loop).
    assert_eq!(&statuses[..3], &[200, 200, 200], "{statuses:?}");
    assert!(statuses[3..].iter().all(|s| *s == 429), "{statuses:?}");
    assert_eq!(retry_after.as_deref(), Some("1"));
    // Another route is not affected.
    let r = c
        .get(gw.url("/"))
        .header("host", "open.test")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    // The bucket refills.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let r = c
        .get(gw.url("/"))
        .header("host", "limited.test")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let m = gw.metrics().await;
    assert!(
        m.contains("waymark_gateway_rate_limited_total{route=\"limited.test/\",scope=\"route\"}"),
        "{m}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_rate_limit_is_per_ip() {
    let (resolver, _web, c) = start().await;
    let gw = Gateway::with_config(
        &resolver,
        "client_rate_limit = { rate = 0.5, burst = 5 }\n[[routes]]\nservice = \"web\"\n",
    );
    // Waiting spends tokens from 127.0.0.1's bucket; count from there.
    gw.wait_status(&c, "any.test", "/", 200).await;
    let mut refused = 0;
    for _ in 0..10 {
        let r = c.get(gw.url("/")).send().await.unwrap();
        if r.status() == 429 {
            refused += 1;
            assert!(r.headers().contains_key("retry-after"));
        }
    }
    assert!(refused >= 5, "only {refused} of 10 refused");
    // Another client address (all of 127.0.0.0/8 is loopback) has its own bucket.
    let other = reqwest::Client::builder()
        .local_address(Some("127.0.0.2".parse().unwrap()))
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap();
    let r = other.get(gw.url("/")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let m = gw.metrics().await;
    assert!(m.contains("scope=\"client\""), "{m}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_headers_and_bodies_are_refused() {
    let (resolver, _web, c) = start().await;
    let gw = Gateway::with_config(&resolver, CONFIG);
    gw.wait_status(&c, "open.test", "/", 200).await;
    // Headers over 4 KiB: 431.
    let r = c
        .get(gw.url("/"))
        .header("host", "open.test")
        .header("x-big", "a".repeat(5000))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 431);
    // A declared body over the limit: 413 before anything is forwarded.
    let r = c
        .post(gw.url("/"))
        .header("host", "open.test")
        .body(vec![b'x'; 2000])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 413);
    // A chunked body that grows past the limit: 413 too.
    let chunked = format!(
        "POST / HTTP/1.1\r\nHost: open.test\r\nTransfer-Encoding: chunked\r\n\r\n{:x}\r\n{}\r\n{:x}\r\n{}\r\n0\r\n\r\n",
        800,
        "y".repeat(800),
        800,
        "y".repeat(800)
    );
    let answer = raw(&gw, chunked.as_bytes());
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    // Within the limits it goes through, body and all.
    let r = c
        .post(gw.url("/"))
        .header("host", "open.test")
        .body(vec![b'x'; 900])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let v: serde_json::Value = r.json().await.unwrap();
    assert_eq!(v["body_len"], 900);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_never_takes_the_gateway_down() {
    let (resolver, _web, c) = start().await;
    let gw = Gateway::with_config(&resolver, CONFIG);
    gw.wait_status(&c, "open.test", "/", 200).await;
    let inputs: Vec<Vec<u8>> = vec![
        b"\x00\x01\x02\xff\r\n\r\n".to_vec(),
        b"GET\r\n\r\n".to_vec(),
        b"GET / HTTP/9.9\r\n\r\n".to_vec(),
        b"GET / HTTP/1.1\r\nHost: open.test\r\nContent-Length: -1\r\n\r\n".to_vec(),
        b"GET / HTTP/1.1\r\nHost: open.test\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello".to_vec(),
        b"GET /%zz HTTP/1.1\r\nHost: \xff\xfe\r\n\r\n".to_vec(),
        b"GET / HTTP/1.1\r\nHost: open.test\r\ntraceparent: 00-zz-zz-zz\r\nx-request-id: \x01\r\n\r\n".to_vec(),
        format!("GET /{} HTTP/1.1\r\nHost: open.test\r\n\r\n", "a".repeat(100_000)).into_bytes(),
        b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00".to_vec(),
    ];
    for input in &inputs {
        let _ = raw(&gw, input);
    }
    // Still serving.
    let r = c
        .get(gw.url("/"))
        .header("host", "open.test")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let live = reqwest::get(gw.admin_url("/healthz/live")).await.unwrap();
    assert_eq!(live.status(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_clients_are_cut_off_at_the_header_deadline() {
    let (resolver, _web, c) = start().await;
    let gw = Gateway::with_config(&resolver, CONFIG);
    gw.wait_status(&c, "open.test", "/", 200).await;
    let addr = gw.http;
    let outcome = tokio::task::spawn_blocking(move || {
        // Trickling headers: a line every 200 ms, never the empty line that ends them.
        let mut slow = TcpStream::connect(addr).unwrap();
        slow.write_all(b"GET / HTTP/1.1\r\nHost: open.test\r\n")
            .unwrap();
        let started = std::time::Instant::now();
        let mut cut_after = None;
        for i in 0..25 {
            std::thread::sleep(Duration::from_millis(200));
            if slow
                .write_all(format!("X-Slow-{i}: y\r\n").as_bytes())
                .is_err()
            {
                cut_after = Some(started.elapsed());
                break;
            }
            if closed_within(&mut slow, Duration::from_millis(1)).is_some() {
                cut_after = Some(started.elapsed());
                break;
            }
        }
        // Silent: connects and sends nothing.
        let mut silent = TcpStream::connect(addr).unwrap();
        let silent_cut = closed_within(&mut silent, Duration::from_secs(5));

        // A kept-alive connection idle longer than the deadline between requests is fine:
        // the clock runs from each request's first byte.
        let mut keep = TcpStream::connect(addr).unwrap();
        keep.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let req = b"GET /one HTTP/1.1\r\nHost: open.test\r\n\r\n";
        keep.write_all(req).unwrap();
        let first = read_response(&mut keep);
        std::thread::sleep(Duration::from_millis(1500));
        keep.write_all(b"GET /two HTTP/1.1\r\nHost: open.test\r\n\r\n")
            .unwrap();
        let second = read_response(&mut keep);
        (cut_after, silent_cut, first, second)
    })
    .await
    .unwrap();
    let (cut_after, silent_cut, first, second) = outcome;
    let cut_after = cut_after.expect("the trickling client was cut off");
    assert!(
        cut_after < Duration::from_secs(3),
        "cut after {cut_after:?}"
    );
    let silent_cut = silent_cut.expect("the silent client was cut off");
    assert!(
        silent_cut < Duration::from_secs(3),
        "cut after {silent_cut:?}"
    );
    assert!(first.starts_with("HTTP/1.1 200"), "{first}");
    assert!(second.starts_with("HTTP/1.1 200"), "{second}");
    // Still serving everyone else.
    let r = c
        .get(gw.url("/"))
        .header("host", "open.test")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
}
