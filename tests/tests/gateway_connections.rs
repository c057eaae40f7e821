//! Client connections the gateway must not hold forever, through its real listener with raw
//! sockets: a head behind empty lines or on a kept-alive connection stays under the header
//! deadline; idle HTTP/1.1 and HTTP/2 connections are closed (HTTP/2 with GOAWAY, also when
//! PINGs alone keep it busy); the connection cap closes new connections at once; a trickled
//! request body and a client that stops reading end their request and free the backend
//! connection, over HTTP/1.1 and over HTTP/2 (a stream stalled on a zero window); pipelined
//! requests are all answered, in order.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use serde_json::json;
use waymark_e2e::gateway::raw::{closed_within, read_response};
use waymark_e2e::gateway::{Backend, Gateway, GatewayOptions};
use waymark_e2e::{until, Api, Resolver};

const BACKEND: &str = env!("CARGO_BIN_EXE_gw_backend");

const CONFIG: &str = r#"
[limits]
header_read_timeout = "1s"
idle_timeout = "1s"
body_read_timeout = "1s"
min_body_rate = 100
send_timeout = "1s"
h2_max_concurrent_streams = 7
h2_stream_buffer_bytes = 16384

[[routes]]
host = "open.test"
service = "web"

[[routes]]
host = "slow.test"
service = "slow"
"#;

fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        // No pooled connection of the test's own is left on the gateway.
        .pool_max_idle_per_host(0)
        .build()
        .unwrap()
}

/// A resolver, a gateway, and two backends: `web` (open.test), which the start-up requests
/// reach, and `slow` (slow.test), which nothing has reached yet: it holds no connection but
/// its listener until a test's request.
struct Setup {
    _resolver: Resolver,
    slow: Backend,
    _web: Backend,
    gw: Gateway,
    c: reqwest::Client,
}

async fn start(opts: GatewayOptions) -> Setup {
    let resolver = Resolver::start();
    let api = Api::new(&resolver);
    let slow = Backend::start(BACKEND, "slow-1");
    api.register(slow.registration("slow", &[], json!({}), 0))
        .await;
    let web = Backend::start(BACKEND, "web-1");
    api.register(web.registration("web", &[], json!({}), 0))
        .await;
    let gw = Gateway::start(&resolver, opts);
    let c = client();
    // Registered after `slow`: once web is routed, so is slow.
    gw.wait_status(&c, "open.test", "/", 200).await;
    Setup {
        _resolver: resolver,
        slow,
        _web: web,
        gw,
        c,
    }
}

async fn start_plain() -> Setup {
    start(GatewayOptions::config(CONFIG)).await
}

/// With h2c on the plain listener.
async fn start_h2c() -> Setup {
    start(GatewayOptions {
        h2c: true,
        ..GatewayOptions::config(CONFIG)
    })
    .await
}

/// The value of an unlabelled metric, or none when it is not there.
fn metric(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}

/// Writes `head` then one header line every 200 ms, up to 5 s; returns when the gateway cut
/// the connection off, if it did.
fn trickle(s: &mut TcpStream, head: &[u8]) -> Option<Duration> {
    s.write_all(head).unwrap();
    let started = Instant::now();
    for i in 0..25 {
        std::thread::sleep(Duration::from_millis(200));
        if s.write_all(format!("X-Slow-{i}: y\r\n").as_bytes())
            .is_err()
            || closed_within(s, Duration::from_millis(1)).is_some()
        {
            return Some(started.elapsed());
        }
    }
    None
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn empty_lines_before_the_request_line_do_not_stop_the_header_clock() {
    let setup = start_plain().await;
    let gw = &setup.gw;
    let addr = gw.http;
    let (cut, served) = tokio::task::spawn_blocking(move || {
        let mut slow = TcpStream::connect(addr).unwrap();
        let cut = trickle(
            &mut slow,
            b"\r\n\r\n\r\n\r\nGET / HTTP/1.1\r\nHost: open.test\r\n",
        );
        // A request behind an empty line that arrives in time is served (RFC 9112 §2.2).
        let mut ok = TcpStream::connect(addr).unwrap();
        ok.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        ok.write_all(b"\r\nGET / HTTP/1.1\r\nHost: open.test\r\n\r\n")
            .unwrap();
        (cut, read_response(&mut ok))
    })
    .await
    .unwrap();
    let cut = cut.expect("the trickling client behind empty lines was cut off");
    assert!(cut < Duration::from_secs(3), "cut after {cut:?}");
    assert!(served.starts_with("HTTP/1.1 200"), "{served}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_head_on_a_kept_alive_connection_is_under_the_header_deadline() {
    let setup = start_plain().await;
    let gw = &setup.gw;
    let addr = gw.http;
    let (first, cut) = tokio::task::spawn_blocking(move || {
        let mut s = TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        s.write_all(b"GET /one HTTP/1.1\r\nHost: open.test\r\n\r\n")
            .unwrap();
        let first = read_response(&mut s);
        let cut = trickle(&mut s, b"GET /two HTTP/1.1\r\nHost: open.test\r\n");
        (first, cut)
    })
    .await
    .unwrap();
    assert!(first.starts_with("HTTP/1.1 200"), "{first}");
    let cut = cut.expect("the second head, trickled, was cut off");
    assert!(cut < Duration::from_secs(3), "cut after {cut:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_requests_are_all_answered_in_order() {
    let setup = start_plain().await;
    let gw = &setup.gw;
    let addr = gw.http;
    let answers = tokio::task::spawn_blocking(move || {
        let mut s = TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        // Three requests, one with a body, in one write.
        s.write_all(
            b"GET /one HTTP/1.1\r\nHost: open.test\r\n\r\n\
              POST /two HTTP/1.1\r\nHost: open.test\r\nContent-Length: 3\r\n\r\nabc\
              GET /three HTTP/1.1\r\nHost: open.test\r\n\r\n",
        )
        .unwrap();
        (0..3).map(|_| read_response(&mut s)).collect::<Vec<_>>()
    })
    .await
    .unwrap();
    let mut uris = Vec::new();
    for a in &answers {
        assert!(a.starts_with("HTTP/1.1 200"), "{answers:#?}");
        let body = &a[a.find("\r\n\r\n").unwrap() + 4..];
        let v: serde_json::Value = serde_json::from_str(body).unwrap();
        uris.push((
            v["uri"].as_str().unwrap().to_string(),
            v["body_len"].clone(),
        ));
    }
    assert_eq!(
        uris,
        vec![
            ("/one".to_string(), json!(0)),
            ("/two".to_string(), json!(3)),
            ("/three".to_string(), json!(0)),
        ]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_kept_alive_connection_is_closed() {
    let setup = start_plain().await;
    let gw = &setup.gw;
    let addr = gw.http;
    let (first, closed) = tokio::task::spawn_blocking(move || {
        let mut s = TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        s.write_all(b"GET / HTTP/1.1\r\nHost: open.test\r\n\r\n")
            .unwrap();
        let first = read_response(&mut s);
        (first, closed_within(&mut s, Duration::from_secs(5)))
    })
    .await
    .unwrap();
    assert!(first.starts_with("HTTP/1.1 200"), "{first}");
    let closed = closed.expect("the idle connection was closed");
    assert!(
        closed >= Duration::from_millis(900) && closed < Duration::from_secs(3),
        "closed after {closed:?}"
    );
    let m = gw.metrics().await;
    until(
        "no connection left open",
        Duration::from_secs(5),
        || async { metric(&gw.metrics().await, "waymark_gateway_connections") },
        |v| *v == Some(0.0),
    )
    .await;
    assert!(m.contains("waymark_gateway_connections "), "{m}");
}

/// The idle timeout counts from the end of the last request: a connection used more often
/// than that stays open well past it (here 2.4 s with a 1 s timeout), and closes once it
/// rests that long.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kept_alive_connection_in_use_outlives_the_idle_timeout() {
    let setup = start_plain().await;
    let addr = setup.gw.http;
    let (answers, closed) = tokio::task::spawn_blocking(move || {
        let mut s = TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut answers = Vec::new();
        for i in 0..7 {
            if i > 0 {
                // The client's pause between requests: shorter than the idle timeout.
                std::thread::sleep(Duration::from_millis(400));
            }
            s.write_all(b"GET / HTTP/1.1\r\nHost: open.test\r\n\r\n")
                .unwrap();
            answers.push(read_response(&mut s));
        }
        (answers, closed_within(&mut s, Duration::from_secs(5)))
    })
    .await
    .unwrap();
    for (i, a) in answers.iter().enumerate() {
        assert!(a.starts_with("HTTP/1.1 200"), "answer {i}: {a}");
    }
    let closed = closed.expect("the connection, once idle, was closed");
    assert!(
        closed >= Duration::from_millis(900) && closed < Duration::from_secs(3),
        "closed after {closed:?}"
    );
}

/// Reads HTTP/2 frames from `s` until EOF or `within`; returns (type, flags, payload) of each
/// and whether the gateway closed the connection.
fn h2_frames(s: &mut TcpStream, within: Duration) -> (Vec<(u8, u8, Vec<u8>)>, bool) {
    let (frames, closed) = h2_session(s, within, None);
    let frames = frames.into_iter().map(|(_, t, f, p)| (t, f, p)).collect();
    (frames, closed.is_some())
}

/// Reads HTTP/2 frames from `s` until EOF or `within`, sending a PING every `ping_every`
/// when asked; returns (when, type, flags, payload) of each frame and when the gateway closed
/// the connection (EOF, or a failed write), if it did.
#[allow(clippy::type_complexity)]
fn h2_session(
    s: &mut TcpStream,
    within: Duration,
    ping_every: Option<Duration>,
) -> (Vec<(Duration, u8, u8, Vec<u8>)>, Option<Duration>) {
    let started = Instant::now();
    s.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
    let mut buf = Vec::new();
    let mut frames = Vec::new();
    let mut chunk = [0u8; 4096];
    let mut next_ping = Instant::now();
    while started.elapsed() < within {
        if let Some(every) = ping_every.filter(|_| Instant::now() >= next_ping) {
            // PING, 8 bytes of opaque data.
            if s.write_all(b"\x00\x00\x08\x06\x00\x00\x00\x00\x00waymark!")
                .is_err()
            {
                return (frames, Some(started.elapsed()));
            }
            next_ping += every;
        }
        match s.read(&mut chunk) {
            Ok(0) | Err(_) if started.elapsed() >= within => break,
            Ok(0) => return (frames, Some(started.elapsed())),
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(_) => return (frames, Some(started.elapsed())),
        }
        while buf.len() >= 9 {
            let len = usize::from(buf[0]) << 16 | usize::from(buf[1]) << 8 | usize::from(buf[2]);
            if buf.len() < 9 + len {
                break;
            }
            frames.push((started.elapsed(), buf[3], buf[4], buf[9..9 + len].to_vec()));
            buf.drain(..9 + len);
        }
    }
    (frames, None)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_http2_connection_gets_goaway_then_is_closed() {
    let setup = start_h2c().await;
    let gw = &setup.gw;
    let addr = gw.http;
    let (frames, closed, took) = tokio::task::spawn_blocking(move || {
        let mut s = TcpStream::connect(addr).unwrap();
        let started = Instant::now();
        // The preface and an empty SETTINGS frame; then nothing.
        s.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00")
            .unwrap();
        let (frames, closed) = h2_frames(&mut s, Duration::from_secs(8));
        (frames, closed, started.elapsed())
    })
    .await
    .unwrap();
    let types: Vec<u8> = frames.iter().map(|f| f.0).collect();
    assert!(types.contains(&0x7), "a GOAWAY before closing: {types:?}");
    assert!(closed, "closed: {types:?}");
    assert!(took < Duration::from_secs(6), "closed after {took:?}");
    // The gateway's SETTINGS carry its stream cap and per-stream window.
    let settings = &frames
        .iter()
        .find(|f| f.0 == 0x4 && f.1 & 0x1 == 0)
        .expect("the gateway's SETTINGS")
        .2;
    let values: Vec<(u16, u32)> = settings
        .chunks(6)
        .map(|c| {
            (
                u16::from_be_bytes([c[0], c[1]]),
                u32::from_be_bytes([c[2], c[3], c[4], c[5]]),
            )
        })
        .collect();
    assert!(
        values.contains(&(0x3, 7)),
        "MAX_CONCURRENT_STREAMS: {values:?}"
    );
    assert!(
        values.contains(&(0x4, 16384)),
        "INITIAL_WINDOW_SIZE: {values:?}"
    );
}

/// A client that keeps its HTTP/2 connection busy with PINGs alone, and never answers the
/// gateway's own PING, opens no stream: closed after three idle timeouts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http2_connection_busy_with_pings_alone_is_closed() {
    let setup = start_h2c().await;
    let addr = setup.gw.http;
    let (frames, closed_at) = tokio::task::spawn_blocking(move || {
        let mut s = TcpStream::connect(addr).unwrap();
        s.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00")
            .unwrap();
        h2_session(
            &mut s,
            Duration::from_secs(10),
            Some(Duration::from_millis(200)),
        )
    })
    .await
    .unwrap();
    // The idle timeout is 1 s: PINGs count as traffic, so not the silent connection's 1 s,
    // but three idle timeouts without a stream (to within a quarter-second tick). The lean
    // path sends GOAWAY then; pingora's closes the connection without one.
    let closed_at = closed_at.expect("the gateway closed the connection");
    let goaway_at = frames.iter().find(|f| f.1 == 0x7).map(|f| f.0);
    let first = goaway_at.unwrap_or(closed_at);
    assert!(
        first >= Duration::from_millis(2700),
        "GOAWAY or close after {first:?}"
    );
    assert!(
        closed_at < Duration::from_secs(8),
        "closed after {closed_at:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_over_the_cap_are_closed_at_once() {
    let config = CONFIG.replace(
        "header_read_timeout = \"1s\"",
        "header_read_timeout = \"30s\"\nmax_connections = 3",
    );
    let setup = start(GatewayOptions::config(config)).await;
    let (gw, c) = (&setup.gw, &setup.c);
    let open = || async { metric(&gw.metrics().await, "waymark_gateway_connections") };
    until("no connection open", Duration::from_secs(5), open, |v| {
        *v == Some(0.0)
    })
    .await;
    // Three silent connections fill the cap.
    let mut held: Vec<TcpStream> = (0..3)
        .map(|_| TcpStream::connect(gw.http).unwrap())
        .collect();
    until(
        "three connections open",
        Duration::from_secs(5),
        open,
        |v| *v == Some(3.0),
    )
    .await;
    let addr = gw.http;
    let refused = tokio::task::spawn_blocking(move || {
        let mut extra = TcpStream::connect(addr).unwrap();
        closed_within(&mut extra, Duration::from_secs(3))
    })
    .await
    .unwrap();
    let refused = refused.expect("the connection over the cap was closed");
    assert!(refused < Duration::from_secs(1), "closed after {refused:?}");
    let m = gw.metrics().await;
    assert!(
        metric(&m, "waymark_gateway_connections_refused_total").is_some_and(|v| v >= 1.0),
        "{m}"
    );
    // Room again once one goes.
    held.pop();
    until("two connections open", Duration::from_secs(5), open, |v| {
        *v == Some(2.0)
    })
    .await;
    assert_eq!(gw.status(c, "open.test", "/").await, Some(200));
    drop(held);
}

/// Waits until the number of sockets the backend holds (its own and one per connection)
/// satisfies `want`.
async fn backend_sockets(
    web: &Backend,
    what: &str,
    within: Duration,
    want: impl Fn(usize) -> bool,
) {
    until(what, within, || async { web.sockets() }, |n| want(*n)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trickled_body_ends_the_request_and_frees_the_backend_connection() {
    let setup = start_plain().await;
    let (gw, slow) = (&setup.gw, &setup.slow);
    // No request has reached the slow backend yet: its own sockets only.
    let base = slow.sockets();
    let addr = gw.http;
    let trickled = tokio::task::spawn_blocking(move || {
        let mut s = TcpStream::connect(addr).unwrap();
        // Longer than the lean path reads before its first try, so that on either data path
        // the body streams to the backend as it comes.
        s.write_all(b"POST / HTTP/1.1\r\nHost: slow.test\r\nContent-Length: 100000\r\n\r\n")
            .unwrap();
        // Five bytes a second, under the minimum of 100, until the gateway answers (or 5 s).
        let started = Instant::now();
        let mut answer = Vec::new();
        let mut buf = [0u8; 1024];
        s.set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        while started.elapsed() < Duration::from_secs(5) {
            match s.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => answer.extend_from_slice(&buf[..n]),
                Err(e)
                    if e.kind() == std::io::ErrorKind::WouldBlock
                        || e.kind() == std::io::ErrorKind::TimedOut =>
                {
                    if answer.is_empty() && s.write_all(b"x").is_err() {
                        break;
                    }
                }
                Err(_) => break,
            }
        }
        (
            String::from_utf8_lossy(&answer).to_string(),
            started.elapsed(),
        )
    });
    // Meanwhile the slow backend holds a connection for it.
    backend_sockets(
        slow,
        "the upload reaches the backend",
        Duration::from_secs(3),
        |n| n > base,
    )
    .await;
    let (answer, took) = trickled.await.unwrap();
    assert!(
        answer.starts_with("HTTP/1.1 408"),
        "{answer:?} after {took:?}"
    );
    assert!(took < Duration::from_secs(3), "answered after {took:?}");
    backend_sockets(
        slow,
        "the backend connection is closed",
        Duration::from_secs(3),
        |n| n == base,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_stops_reading_frees_the_backend_connection() {
    let setup = start_plain().await;
    let (gw, slow) = (&setup.gw, &setup.slow);
    // No request has reached the slow backend yet: its own sockets only.
    let base = slow.sockets();
    // 64 MB, far more than the socket buffers on both sides hold; never read.
    let mut s = TcpStream::connect(gw.http).unwrap();
    s.write_all(b"GET /?bytes=64000000 HTTP/1.1\r\nHost: slow.test\r\n\r\n")
        .unwrap();
    backend_sockets(
        slow,
        "the download reaches the backend",
        Duration::from_secs(3),
        |n| n > base,
    )
    .await;
    // The send timeout is 1 s.
    backend_sockets(
        slow,
        "the backend connection is closed",
        Duration::from_secs(6),
        |n| n == base,
    )
    .await;
    drop(s);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_streams_stalled_on_a_zero_window_are_reset_and_free_their_backend_connections() {
    let setup = start_h2c().await;
    let (gw, slow) = (&setup.gw, &setup.slow);
    // No request has reached the slow backend yet: its own sockets only.
    let base = slow.sockets();
    let tcp = tokio::net::TcpStream::connect(gw.http).await.unwrap();
    // A window of 0: the gateway may send headers but no data.
    let (client, conn) = h2::client::Builder::new()
        .initial_window_size(0)
        .handshake::<_, bytes::Bytes>(tcp)
        .await
        .unwrap();
    let driver = tokio::spawn(conn);
    let mut bodies = Vec::new();
    for _ in 0..5 {
        let req = http::Request::get("http://slow.test/?bytes=8000000")
            .body(())
            .unwrap();
        let (resp, _) = client
            .clone()
            .ready()
            .await
            .unwrap()
            .send_request(req, true)
            .unwrap();
        let resp = tokio::time::timeout(Duration::from_secs(5), resp)
            .await
            .expect("response headers")
            .unwrap();
        assert_eq!(resp.status(), 200);
        bodies.push(resp.into_body());
    }
    // One backend connection per stream (the first may have been freed already).
    backend_sockets(
        slow,
        "the downloads reach the backend",
        Duration::from_secs(3),
        |n| n >= base + 4,
    )
    .await;
    // After the send timeout (1 s) every stream is reset and its backend connection closed.
    backend_sockets(
        slow,
        "the backend connections are closed",
        Duration::from_secs(6),
        |n| n == base,
    )
    .await;
    for mut body in bodies {
        let end = tokio::time::timeout(Duration::from_secs(3), async {
            loop {
                match body.data().await {
                    Some(Ok(_)) => continue,
                    Some(Err(e)) => return Some(e),
                    None => return None,
                }
            }
        })
        .await
        .expect("the stream ended");
        let e = end.expect("the stalled stream was reset, not completed");
        assert!(e.is_reset() || e.is_go_away() || e.is_io(), "{e}");
    }
    driver.abort();
}

/// HTTP/2 rapid reset (CVE-2023-44487): a client that opens streams and resets each at once
/// is cut off (GOAWAY, and the connection closed) after a few dozen streams reached the
/// gateway, however many it queued; other clients are served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http2_rapid_reset_client_is_cut_off() {
    let setup = start_h2c().await;
    let gw = &setup.gw;
    let tcp = tokio::net::TcpStream::connect(gw.http).await.unwrap();
    let (client, conn) = h2::client::handshake(tcp).await.unwrap();
    let driver = tokio::spawn(conn);
    let started = Instant::now();
    let mut queued = 0;
    while queued < 20_000 && started.elapsed() < Duration::from_secs(10) {
        let Ok(mut ready) = client.clone().ready().await else {
            break;
        };
        let req = http::Request::get("http://slow.test/?sleep_ms=5000")
            .body(())
            .unwrap();
        let Ok((_resp, mut stream)) = ready.send_request(req, true) else {
            break;
        };
        stream.send_reset(h2::Reason::CANCEL);
        queued += 1;
    }
    let ended = tokio::time::timeout(Duration::from_secs(5), driver)
        .await
        .expect("the gateway ended the connection")
        .unwrap();
    assert!(ended.is_err(), "the connection ended cleanly: {ended:?}");
    // Others are served.
    let resp = setup
        .c
        .get(format!("http://{}/", gw.http))
        .header("host", "open.test")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    // The streams that reached the gateway, whatever their status.
    let m = gw.metrics().await;
    assert!(
        m.contains("waymark_gateway_requests_total{route=\"open.test/\""),
        "{m}"
    );
    let reached: f64 = m
        .lines()
        .filter(|l| l.starts_with("waymark_gateway_requests_total{route=\"slow.test/\""))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    assert!(
        reached <= 200.0,
        "{reached} of the {queued} queued streams reached the gateway"
    );
}
