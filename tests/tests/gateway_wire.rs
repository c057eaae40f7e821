//! The instance side of HTTP/1.1 through the real gateway binary: answers framed every way
//! RFC 9112 allows (a length, chunks with and without trailers, the connection's close, none),
//! informational answers before the final one, answers a proxy must refuse (conflicting
//! lengths, a head too large, a body cut short), streamed request bodies, and connection reuse.
//! The instance is a raw TCP server with canned answers, registered through the registration
//! API; clients are reqwest and a raw socket.

use std::io::{Read, Write};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use waymark_e2e::gateway::{Gateway, GatewayOptions};
use waymark_e2e::{Api, Resolver};

const ROUTES: &str = r#"
access_log = "json"

[retry]
attempts = 1

[[routes]]
host = "wire.test"
service = "wire"
"#;

/// The canned answer for a request target.
fn answer(target: &str) -> Vec<u8> {
    let canned: &[u8] = match target {
        "/length" => b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nhello",
        "/chunked" => {
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n\
              5\r\nhello\r\n6;ext=1\r\n world\r\n0\r\n\r\n"
        }
        "/trailers" => {
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\ntrailer: x-checksum\r\n\r\n\
              4\r\nwave\r\n0\r\nx-checksum: 42\r\n\r\n"
        }
        "/continue" => {
            b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nlink: </a>\r\n\r\n\
              HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"
        }
        "/both" => {
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\ncontent-length: 100\r\n\r\n\
              3\r\nabc\r\n0\r\n\r\n"
        }
        "/conflict" => b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\ncontent-length: 6\r\n\r\nhello",
        "/short" => b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\nconnection: close\r\n\r\nhello",
        "/close" => b"HTTP/1.0 200 OK\r\n\r\nuntil the close",
        "/huge" => {
            let mut a = b"HTTP/1.1 200 OK\r\nx-big: ".to_vec();
            a.extend(std::iter::repeat_n(b'a', 300 * 1024));
            a.extend_from_slice(b"\r\ncontent-length: 0\r\n\r\n");
            return a;
        }
        _ => b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n\r\n",
    };
    canned.to_vec()
}

/// A raw HTTP/1.1 instance: reads each request head (and a chunked or sized body, whose
/// length it answers for `POST /count`), writes the canned answer, keeps the connection
/// unless the answer ends with the close. Counts connections accepted.
async fn instance() -> (std::net::SocketAddr, Arc<AtomicUsize>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let accepted = Arc::new(AtomicUsize::new(0));
    let count = accepted.clone();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            count.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                let mut have = Vec::new();
                loop {
                    let Some(end) = read_until(&mut s, &mut have, b"\r\n\r\n").await else {
                        return;
                    };
                    let head = String::from_utf8_lossy(&have[..end]).to_string();
                    have.drain(..end + 4);
                    let target = head.split(' ').nth(1).unwrap_or("/").to_string();
                    let lower = head.to_ascii_lowercase();
                    let reply = if target == "/count" {
                        let n = if lower.contains("transfer-encoding: chunked") {
                            let Some(end) = read_until(&mut s, &mut have, b"0\r\n\r\n").await
                            else {
                                return;
                            };
                            let body = have.drain(..end + 5).collect::<Vec<u8>>();
                            dechunked_len(&body)
                        } else {
                            0
                        };
                        let te = lower.contains("transfer-encoding: chunked");
                        let text = format!("{n} chunked={te}");
                        format!(
                            "HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n{text}",
                            text.len()
                        )
                        .into_bytes()
                    } else {
                        answer(&target)
                    };
                    if s.write_all(&reply).await.is_err() {
                        return;
                    }
                    if reply.starts_with(b"HTTP/1.0") || head_says_close(&reply) {
                        return;
                    }
                }
            });
        }
    });
    (addr, accepted)
}

fn head_says_close(reply: &[u8]) -> bool {
    let end = reply.windows(4).position(|w| w == b"\r\n\r\n").unwrap_or(0);
    String::from_utf8_lossy(&reply[..end])
        .to_ascii_lowercase()
        .contains("connection: close")
}

/// Reads from `s` into `have` until `pat` is in it; where it starts.
async fn read_until(
    s: &mut tokio::net::TcpStream,
    have: &mut Vec<u8>,
    pat: &[u8],
) -> Option<usize> {
    let mut buf = [0u8; 16384];
    loop {
        if let Some(at) = have.windows(pat.len()).position(|w| w == pat) {
            return Some(at);
        }
        match s.read(&mut buf).await {
            Ok(0) | Err(_) => return None,
            Ok(n) => have.extend_from_slice(&buf[..n]),
        }
    }
}

/// The data length of a chunked body (sizes only; the test's own bodies have no extensions).
fn dechunked_len(mut body: &[u8]) -> usize {
    let mut total = 0;
    loop {
        let nl = body.windows(2).position(|w| w == b"\r\n").unwrap();
        let size = usize::from_str_radix(std::str::from_utf8(&body[..nl]).unwrap(), 16).unwrap();
        if size == 0 {
            return total;
        }
        total += size;
        body = &body[nl + 2 + size + 2..];
    }
}

struct Setup {
    _resolver: Resolver,
    gw: Gateway,
    accepted: Arc<AtomicUsize>,
}

async fn start() -> Setup {
    let resolver = Resolver::start();
    let api = Api::new(&resolver);
    let (addr, accepted) = instance().await;
    api.register(json!({
        "ID": "wire-1", "Name": "wire", "Address": "127.0.0.1", "Port": addr.port(),
    }))
    .await;
    let gw = Gateway::start(
        &resolver,
        GatewayOptions {
            config: ROUTES.into(),
            ..Default::default()
        },
    );
    let c = reqwest::Client::new();
    gw.wait_status(&c, "wire.test", "/length", 200).await;
    Setup {
        _resolver: resolver,
        gw,
        accepted,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answers_framed_every_way_reach_the_client_whole() {
    let s = start().await;
    let c = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap();
    let get = |path: &str| c.get(s.gw.url(path)).header("host", "wire.test").send();
    // (target, status, body): what the client gets for each framing.
    let table = [
        ("/length", 200, "hello"),
        ("/chunked", 200, "hello world"),
        ("/trailers", 200, "wave"),
        ("/continue", 200, "ok"),
        ("/both", 200, "abc"),
        ("/close", 200, "until the close"),
    ];
    for (path, status, body) in table {
        let r = get(path).await.unwrap();
        assert_eq!(r.status(), status, "{path}");
        // A length the instance sent beside chunks never reaches the client.
        if path == "/both" {
            assert_eq!(r.content_length(), None, "{path}");
        }
        assert_eq!(r.text().await.unwrap(), body, "{path}");
    }
    // Answers a proxy must not pass on: 502. (pingora's own head limit is larger than the
    // lean path's 64 KiB, nginx's 4-8 KiB and Envoy's 60 KiB.)
    let refused: &[&str] = if lean_path() {
        &["/conflict", "/huge"]
    } else {
        &["/conflict"]
    };
    for path in refused {
        let r = get(path).await.unwrap();
        assert_eq!(r.status(), 502, "{path}");
    }
    // A body cut short is an error the client sees (before or after the head), never a
    // shorter answer that looks whole.
    if let Ok(r) = get("/short").await {
        assert!(r.bytes().await.is_err(), "a truncated body must fail");
    }
    // A HEAD's answer has no body, whatever its framing says.
    let r = c
        .head(s.gw.url("/chunked"))
        .header("host", "wire.test")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert!(r.bytes().await.unwrap().is_empty());

    // Kept-alive answers read to their end keep their connections: sequential requests
    // open far fewer connections than they make requests (the lean path one; pingora gives
    // a connection back to its pool after the answer, so a request may beat it there).
    let before = s.accepted.load(Ordering::SeqCst);
    for _ in 0..20 {
        assert_eq!(get("/length").await.unwrap().text().await.unwrap(), "hello");
    }
    let opened = s.accepted.load(Ordering::SeqCst) - before;
    assert!(
        opened <= 10,
        "{opened} connections for 20 sequential requests"
    );
}

/// The lean data path (the default) is under test, not pingora's.
fn lean_path() -> bool {
    std::env::var("WAYMARK_GATEWAY_DATA_PATH").map_or(true, |p| p == "lean")
}

/// On the lean path only: pingora's proxy does not pass HTTP/1.1 trailers on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trailers_reach_a_client_that_asks_for_them() {
    if !lean_path() {
        return;
    }
    let s = start().await;
    let request =
        b"GET /trailers HTTP/1.1\r\nhost: wire.test\r\nte: trailers\r\nconnection: close\r\n\r\n";
    let answer = raw(&s.gw, vec![request.to_vec()])
        .await
        .to_ascii_lowercase();
    assert!(answer.starts_with("http/1.1 200"), "{answer}");
    assert!(answer.contains("transfer-encoding: chunked"), "{answer}");
    let body = &answer[answer.find("\r\n\r\n").unwrap()..];
    assert!(body.contains("wave"), "{answer}");
    assert!(body.contains("x-checksum: 42"), "trailers lost: {answer}");
}

/// Writes `pieces` to the gateway on a fresh connection and reads everything until it
/// closes.
async fn raw(gw: &Gateway, pieces: Vec<Vec<u8>>) -> String {
    let addr = gw
        .url("/")
        .trim_start_matches("http://")
        .trim_end_matches('/')
        .to_string();
    tokio::task::spawn_blocking(move || {
        let mut t = std::net::TcpStream::connect(addr).unwrap();
        t.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        for piece in pieces {
            t.write_all(&piece).unwrap();
        }
        let mut all = Vec::new();
        let _ = t.read_to_end(&mut all);
        String::from_utf8_lossy(&all).to_string()
    })
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_body_of_unknown_length_streams_to_the_instance_chunked() {
    let s = start().await;
    // 200 KiB in chunks, no length: more than the gateway reads ahead for a retry.
    let mut pieces = vec![b"POST /count HTTP/1.1\r\nhost: wire.test\r\n\
        transfer-encoding: chunked\r\nconnection: close\r\n\r\n"
        .to_vec()];
    for _ in 0..50 {
        let mut chunk = b"1000\r\n".to_vec();
        chunk.extend(std::iter::repeat_n(b'x', 4096));
        chunk.extend_from_slice(b"\r\n");
        pieces.push(chunk);
    }
    pieces.push(b"0\r\n\r\n".to_vec());
    let answer = raw(&s.gw, pieces).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(
        answer.ends_with(&format!("{} chunked=true", 50 * 4096)),
        "{answer}"
    );
}
