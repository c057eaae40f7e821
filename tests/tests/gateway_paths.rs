//! Route bypass through the real listener: the gateway routes on the normalised path and
//! forwards that path, over HTTP/1.1 (raw bytes on a socket, so nothing client-side tidies
//! the path first) and HTTP/2 (the `h2` crate, prior knowledge on an h2c listener). Ambiguous
//! requests (an encoded dot segment or slash that would change the route, NUL, a backslash,
//! a path above the root, a request line with two spaces, no Host) get 400. A fully
//! qualified host matches its route, and an absolute-form target is forwarded in origin form
//! without its scheme counting for anything.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use serde_json::{json, Value};
use waymark_e2e::gateway::{Backend, Gateway, GatewayOptions};
use waymark_e2e::{Api, Resolver};

const BACKEND: &str = env!("CARGO_BIN_EXE_gw_backend");

/// `/pub` and `/pay` are public, and `/admin`; nothing exposes `/internal`.
const ROUTES: &str = r#"
[[routes]]
host = "p.test"
path = "/pub"
service = "pub"

[[routes]]
host = "p.test"
path = "/pay"
service = "payment"

[[routes]]
host = "p.test"
path = "/admin"
service = "admin"
"#;

struct Setup {
    _resolver: Resolver,
    _backends: Vec<Backend>,
    gw: Gateway,
}

async fn start() -> Setup {
    let resolver = Resolver::start();
    let api = Api::new(&resolver);
    let mut backends = Vec::new();
    for (id, service) in [("pub-1", "pub"), ("pay-1", "payment"), ("admin-1", "admin")] {
        let b = Backend::start(BACKEND, id);
        api.register(b.registration(service, &[], json!({}), 0))
            .await;
        backends.push(b);
    }
    let gw = Gateway::start(
        &resolver,
        GatewayOptions {
            config: ROUTES.into(),
            h2c: true,
            ..Default::default()
        },
    );
    let c = reqwest::Client::new();
    for path in ["/pub", "/pay", "/admin"] {
        gw.wait_status(&c, "p.test", path, 200).await;
    }
    Setup {
        _resolver: resolver,
        _backends: backends,
        gw,
    }
}

/// What came back for one request: status, and for a proxied answer the backend's ID and the
/// request target it saw.
#[derive(Debug, Clone, PartialEq)]
struct Seen {
    status: u16,
    backend: Option<String>,
    uri: Option<String>,
    headers: Value,
}

fn seen(status: u16, body: &[u8]) -> Seen {
    let v: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
    Seen {
        status,
        backend: v["id"].as_str().map(str::to_string),
        uri: v["uri"].as_str().map(str::to_string),
        headers: v["headers"].clone(),
    }
}

/// Sends raw bytes (one request, `Connection: close` is up to the caller) and parses the
/// answer.
fn raw(gw: SocketAddr, request: &[u8]) -> Seen {
    let mut s = TcpStream::connect(gw).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(request).unwrap();
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    let text = String::from_utf8_lossy(&out);
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = out
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map_or(&[][..], |i| &out[i + 4..]);
    seen(status, body)
}

fn get(gw: SocketAddr, target: &str) -> Seen {
    raw(
        gw,
        format!("GET {target} HTTP/1.1\r\nHost: p.test\r\nConnection: close\r\n\r\n").as_bytes(),
    )
}

/// One HTTP/2 GET with this `:path` and `:authority` over a fresh h2c connection.
async fn h2_get(gw: &Gateway, authority: &str, path: &str) -> Seen {
    let tcp = tokio::net::TcpStream::connect(gw.http).await.unwrap();
    let (mut client, conn) = h2::client::handshake(tcp).await.expect("h2c handshake");
    tokio::spawn(async move {
        let _ = conn.await;
    });
    let req = http::Request::builder()
        .method("GET")
        .uri(format!("http://{authority}{path}"))
        .header("te", "trailers")
        .body(())
        .unwrap();
    let (resp, _) = client.send_request(req, true).expect("send request");
    let resp = resp.await.expect("an answer");
    let status = resp.status().as_u16();
    let mut body = resp.into_body();
    let mut bytes = Vec::new();
    while let Some(chunk) = body.data().await {
        let chunk = chunk.expect("body");
        let _ = body.flow_control().release_capacity(chunk.len());
        bytes.extend_from_slice(&chunk);
    }
    seen(status, &bytes)
}

fn proxied(s: &Seen, backend: &str, uri: &str) -> bool {
    s.status == 200 && s.backend.as_deref() == Some(backend) && s.uri.as_deref() == Some(uri)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dot_segments_and_escapes_cannot_reach_unrouted_paths_over_http1() {
    let s = start().await;
    let gw = &s.gw;
    let addr = gw.http;
    let results = tokio::task::spawn_blocking({
        move || {
            let gw = addr;
            vec![
                // The issue's cases.
                ("/pub/../internal/x", get(gw, "/pub/../internal/x")),
                ("/pub/%2e%2e/internal/x", get(gw, "/pub/%2e%2e/internal/x")),
                ("/pay/../admin", get(gw, "/pay/../admin")),
                // Normalised and forwarded as normalised; the query is kept verbatim.
                (
                    "/pub//a/./b/%7euser?q=%2e%2e&x=../y",
                    get(gw, "/pub//a/./b/%7euser?q=%2e%2e&x=../y"),
                ),
                ("/pub/a/%2fb", get(gw, "/pub/a/%2fb")),
                ("/pub/%2E%2E/pub/z", get(gw, "/pub/%2E%2E/pub/z")),
                // Ambiguous or malformed.
                ("/pub%2Fx", get(gw, "/pub%2Fx")),
                (
                    "/pub/x%2F..%2F..%2Fadmin",
                    get(gw, "/pub/x%2F..%2F..%2Fadmin"),
                ),
                ("/pub/%00", get(gw, "/pub/%00")),
                ("/pub/a%zz", get(gw, "/pub/a%zz")),
                ("/../pub/x", get(gw, "/../pub/x")),
                ("/pub/..;/admin", get(gw, "/pub/..;/admin")),
                ("/pub\\..\\admin", get(gw, "/pub\\..\\admin")),
                (
                    "NUL in the target",
                    raw(
                        gw,
                        b"GET /pub/a\x00b HTTP/1.1\r\nHost: p.test\r\nConnection: close\r\n\r\n",
                    ),
                ),
                (
                    "two spaces after the target",
                    raw(
                        gw,
                        b"GET /pub/x  HTTP/1.1\r\nHost: p.test\r\nConnection: close\r\n\r\n",
                    ),
                ),
                (
                    "two spaces before the target",
                    raw(
                        gw,
                        b"GET  /pub/x HTTP/1.1\r\nHost: p.test\r\nConnection: close\r\n\r\n",
                    ),
                ),
            ]
        }
    })
    .await
    .unwrap();
    let want = |name: &str| results.iter().find(|(n, _)| *n == name).unwrap().1.clone();
    assert_eq!(want("/pub/../internal/x").status, 404, "{results:#?}");
    assert_eq!(want("/pub/%2e%2e/internal/x").status, 400, "{results:#?}");
    assert!(
        proxied(&want("/pay/../admin"), "admin-1", "/admin"),
        "{results:#?}"
    );
    assert!(
        proxied(
            &want("/pub//a/./b/%7euser?q=%2e%2e&x=../y"),
            "pub-1",
            "/pub/a/b/~user?q=%2e%2e&x=../y"
        ),
        "{results:#?}"
    );
    // An encoded slash that changes no route is kept, in canonical form.
    assert!(
        proxied(&want("/pub/a/%2fb"), "pub-1", "/pub/a/%2Fb"),
        "{results:#?}"
    );
    // An encoded dot segment that lands on the same route is simply normalised.
    assert!(
        proxied(&want("/pub/%2E%2E/pub/z"), "pub-1", "/pub/z"),
        "{results:#?}"
    );
    for bad in [
        "/pub%2Fx",
        "/pub/x%2F..%2F..%2Fadmin",
        "/pub/%00",
        "/pub/a%zz",
        "/../pub/x",
        "/pub/..;/admin",
        "/pub\\..\\admin",
        "NUL in the target",
        "two spaces after the target",
        "two spaces before the target",
    ] {
        assert_eq!(want(bad).status, 400, "{bad}: {results:#?}");
    }
    let m = gw.metrics().await;
    assert!(
        m.contains("waymark_gateway_client_errors_total{reason=\"bad_request\"}"),
        "{m}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_rules_hold_over_http2() {
    let s = start().await;
    let gw = &s.gw;
    let r = h2_get(gw, "p.test", "/pub/../internal/x").await;
    assert_eq!(r.status, 404, "{r:?}");
    let r = h2_get(gw, "p.test", "/pub/%2e%2e/internal/x").await;
    assert_eq!(r.status, 400, "{r:?}");
    let r = h2_get(gw, "p.test", "/pay/../admin").await;
    assert!(proxied(&r, "admin-1", "/admin"), "{r:?}");
    // The rewritten request still names its host.
    assert_eq!(r.headers["host"], "p.test", "{r:?}");
    let r = h2_get(gw, "p.test", "/pub//a/%7e?x=..").await;
    assert!(proxied(&r, "pub-1", "/pub/a/~?x=.."), "{r:?}");
    // TE: trailers (what gRPC clients send) reaches the instance.
    assert_eq!(r.headers["te"], "trailers", "{r:?}");
    let r = h2_get(gw, "p.test", "/pub/%00").await;
    assert_eq!(r.status, 400, "{r:?}");
    let r = h2_get(gw, "p.test", "/pub%2Fx").await;
    assert_eq!(r.status, 400, "{r:?}");
    // A fully qualified authority matches its route.
    let r = h2_get(gw, "p.test.", "/pub/fq").await;
    assert!(proxied(&r, "pub-1", "/pub/fq"), "{r:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn host_rules_missing_trailing_dot_and_absolute_form() {
    let s = start().await;
    let gw = s.gw.http;
    let (no_host, http10, fq, absolute) = tokio::task::spawn_blocking(move || {
        (
            raw(gw, b"GET /pub/x HTTP/1.1\r\nConnection: close\r\n\r\n"),
            raw(gw, b"GET /pub/x HTTP/1.0\r\n\r\n"),
            raw(gw, b"GET /pub/x HTTP/1.1\r\nHost: P.test.\r\nConnection: close\r\n\r\n"),
            raw(
                gw,
                b"GET https://p.test/pub/abs?q=1 HTTP/1.1\r\nHost: p.test\r\nConnection: close\r\n\r\n",
            ),
        )
    })
    .await
    .unwrap();
    // HTTP/1.1 without Host is refused; HTTP/1.0 without it reaches no host's route.
    assert_eq!(no_host.status, 400, "{no_host:?}");
    assert!(http10.backend.is_none(), "{http10:?}");
    assert!(proxied(&fq, "pub-1", "/pub/x"), "{fq:?}");
    // An absolute-form target is forwarded in origin form, and its https:// scheme does not
    // make the plain listener claim https.
    assert!(proxied(&absolute, "pub-1", "/pub/abs?q=1"), "{absolute:?}");
    assert_eq!(
        absolute.headers["x-forwarded-proto"], "http",
        "{absolute:?}"
    );
    assert!(
        absolute.headers["forwarded"]
            .as_str()
            .is_some_and(|f| f.contains("proto=http;")),
        "{absolute:?}"
    );
}
