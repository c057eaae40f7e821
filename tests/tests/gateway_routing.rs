//! The gateway's routing through its real interfaces: a real resolver (the registry), backend
//! processes registered through the registration API, the real gateway binary, and reqwest
//! and curl as clients over HTTP/1.1 and HTTP/2 (h2c).
//!
//! Covers routes from the config file and from registration metadata, longest prefix, prefix
//! stripping, header matches, weighted splits, 404 for no route, 503 for no healthy instance,
//! the forwarding headers, the admin endpoints, and config routes reloading under load.

use std::collections::BTreeMap;
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use waymark_e2e::gateway::{Backend, Gateway, GatewayOptions};
use waymark_e2e::{have, until, Api, Resolver};

const BACKEND: &str = env!("CARGO_BIN_EXE_gw_backend");
const WAIT: Duration = Duration::from_secs(10);

const CONFIG: &str = r#"
access_log = "json"

[[routes]]
host = "api.test"
path = "/pay"
service = "payment"
strip_prefix = true

[[routes]]
host = "api.test"
path = "/pay/refunds"
service = "refunds"

[[routes]]
name = "canary-by-header"
host = "api.test"
path = "/pay"
service = "payment-canary"
header = { name = "x-canary", value = "yes" }

[[routes]]
host = "api.test"
path = "/empty"
service = "nobody-healthy"

[[routes]]
host = "split.test"
service = "web"
split = [{ tags = ["v1"], weight = 3 }, { tags = ["v2"], weight = 1 }]
"#;

fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap()
}

/// GET through the gateway with a Host header; status and JSON (Null when not JSON).
async fn get(c: &reqwest::Client, gw: &Gateway, host: &str, path: &str) -> (u16, Value, String) {
    let resp = c
        .get(gw.url(path))
        .header("host", host)
        .send()
        .await
        .expect("gateway reachable");
    let status = resp.status().as_u16();
    let text = resp.text().await.unwrap_or_default();
    (
        status,
        serde_json::from_str(&text).unwrap_or(Value::Null),
        text,
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routes_from_config_and_metadata() {
    let resolver = Resolver::start();
    let api = Api::new(&resolver);
    let payment = Backend::start(BACKEND, "payment-1");
    let refunds = Backend::start(BACKEND, "refunds-1");
    let canary = Backend::start(BACKEND, "payment-canary-1");
    let www = Backend::start(BACKEND, "www-1");
    let orders = Backend::start(BACKEND, "orders-1");
    let sick = Backend::start(BACKEND, "sick-1");
    let v1 = Backend::start(BACKEND, "web-v1");
    let v2 = Backend::start(BACKEND, "web-v2");
    api.register(payment.registration("payment", &[], json!({}), 0))
        .await;
    api.register(refunds.registration("refunds", &[], json!({}), 0))
        .await;
    api.register(canary.registration("payment-canary", &[], json!({}), 0))
        .await;
    api.register(www.registration("www", &[], json!({"waymark-public-host": "www.test"}), 0))
        .await;
    api.register(orders.registration(
        "orders",
        &[],
        json!({"waymark-public-host": "api.test", "waymark-public-path": "/orders"}),
        0,
    ))
    .await;
    api.register(sick.registration("nobody-healthy", &[], json!({}), 0))
        .await;
    api.put_empty("/v1/agent/service/maintenance/sick-1?enable=true")
        .await;
    api.register(v1.registration("web", &["v1"], json!({}), 0))
        .await;
    api.register(v2.registration("web", &["v2"], json!({}), 0))
        .await;

    let gw = Gateway::with_config(&resolver, CONFIG);
    let c = client();

    // Metadata routes appear as the registry's state arrives.
    until(
        "metadata route to www",
        WAIT,
        || async { get(&c, &gw, "www.test", "/anything").await.0 },
        |s| *s == 200,
    )
    .await;

    // Config route with prefix stripping.
    let (s, v, _) = get(&c, &gw, "api.test", "/pay/charge?x=1").await;
    assert_eq!(s, 200);
    assert_eq!(v["id"], "payment-1");
    assert_eq!(v["uri"], "/charge?x=1");
    let (_, v, _) = get(&c, &gw, "api.test:8080", "/pay").await;
    assert_eq!(
        (v["id"].as_str(), v["uri"].as_str()),
        (Some("payment-1"), Some("/"))
    );

    // Longest prefix wins, and this route keeps its path.
    let (_, v, _) = get(&c, &gw, "api.test", "/pay/refunds/7").await;
    assert_eq!(v["id"], "refunds-1");
    assert_eq!(v["uri"], "/pay/refunds/7");
    // Segment boundaries: /payment is not under /pay.
    let (s, _, body) = get(&c, &gw, "api.test", "/payment").await;
    assert_eq!((s, body.as_str()), (404, "no route\n"));

    // A header match takes the request to the canary.
    let resp = c
        .get(gw.url("/pay/x"))
        .header("host", "api.test")
        .header("x-canary", "yes")
        .send()
        .await
        .unwrap();
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["id"], "payment-canary-1");

    // Metadata route with a path, next to config routes on the same host.
    let (_, v, _) = get(&c, &gw, "api.test", "/orders/12").await;
    assert_eq!(v["id"], "orders-1");
    assert_eq!(v["uri"], "/orders/12");

    // No route for an unknown host.
    let (s, _, body) = get(&c, &gw, "unknown.test", "/").await;
    assert_eq!((s, body.as_str()), (404, "no route\n"));

    // A route whose service has no serving instance.
    let (s, _, body) = get(&c, &gw, "api.test", "/empty").await;
    assert_eq!(s, 503);
    assert_eq!(body, "no healthy instance of nobody-healthy\n");

    // Weighted split: about 3:1 between the v1 and v2 subsets.
    let mut seen: BTreeMap<String, u32> = BTreeMap::new();
    for _ in 0..200 {
        let (s, v, _) = get(&c, &gw, "split.test", "/").await;
        assert_eq!(s, 200);
        *seen
            .entry(v["id"].as_str().unwrap().to_string())
            .or_default() += 1;
    }
    let v1n = seen.get("web-v1").copied().unwrap_or(0);
    assert!((110..=185).contains(&v1n), "split 3:1 gave {seen:?}");

    // Maintenance takes an instance out; the route then has nothing to serve.
    api.put_empty("/v1/agent/service/maintenance/www-1?enable=true")
        .await;
    until(
        "drained www answers 503",
        WAIT,
        || async { get(&c, &gw, "www.test", "/").await.0 },
        |s| *s == 503,
    )
    .await;
    // Deregistering removes the metadata route itself.
    api.put_empty("/v1/agent/service/deregister/www-1").await;
    until(
        "deregistered www has no route",
        WAIT,
        || async { get(&c, &gw, "www.test", "/").await.0 },
        |s| *s == 404,
    )
    .await;

    // Metrics per route and status; the access log has JSON lines.
    let m = gw.metrics().await;
    assert!(
        m.contains("waymark_gateway_requests_total{route=\"api.test/pay\",status=\"200\"} 2"),
        "{m}"
    );
    assert!(
        m.contains("waymark_gateway_requests_total{route=\"-\",status=\"404\"}"),
        "{m}"
    );
    assert!(m.contains("waymark_gateway_registry_connected 1"), "{m}");
    // Access lines are buffered (written within a second): wait for the 503's.
    let line = until(
        "a JSON access line for the 503",
        WAIT,
        || async {
            gw.log()
                .lines()
                .find(|l| l.starts_with('{') && l.contains("\"path\":\"/empty\""))
                .map(str::to_string)
        },
        Option::is_some,
    )
    .await
    .unwrap();
    let v: serde_json::Value = serde_json::from_str(&line).unwrap();
    assert_eq!(
        (v["status"].as_u64(), v["route"].as_str()),
        (Some(503), Some("api.test/empty")),
        "{line}"
    );
    assert!(
        v["time"].as_str().is_some_and(|t| t.ends_with('Z')),
        "{line}"
    );
    assert!(
        v["request_id"].as_str().is_some_and(|id| !id.is_empty()),
        "{line}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwarding_headers_and_hop_by_hop() {
    let resolver = Resolver::start();
    let api = Api::new(&resolver);
    let web = Backend::start(BACKEND, "web-1");
    api.register(web.registration("web", &[], json!({"waymark-public-host": "h.test"}), 0))
        .await;
    // 127.0.0.2 is a trusted proxy; the test's usual address, 127.0.0.1, is not.
    let gw = Gateway::with_config(&resolver, "trusted_proxies = [\"127.0.0.2/32\"]\n");
    let c = client();

    let resp = c
        .get(gw.url("/x"))
        .header("host", "h.test")
        .header("x-forwarded-for", "203.0.113.7")
        .header("x-forwarded-for", "203.0.113.8")
        .header("x-real-ip", "203.0.113.9")
        .header("x-forwarded-proto", "https")
        .header("forwarded", "for=203.0.113.7")
        .header("connection", "x-secret")
        .header("x-secret", "leak")
        .header("keep-alive", "timeout=5")
        .header("proxy-authorization", "Basic Zm9vOmJhcg==")
        .header(
            "traceparent",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        )
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let rid = resp.headers()["x-request-id"].to_str().unwrap().to_string();
    let v: Value = resp.json().await.unwrap();
    let h = &v["headers"];
    // From an untrusted client, forwarding headers are the gateway's own.
    assert_eq!(h["x-forwarded-for"], "127.0.0.1");
    assert_eq!(h["x-real-ip"], "127.0.0.1");
    assert_eq!(h["x-forwarded-proto"], "http");
    assert_eq!(h["forwarded"], "for=127.0.0.1;proto=http;host=h.test");
    assert_eq!(h["x-request-id"].as_str(), Some(rid.as_str()));
    assert_eq!(rid.len(), 32, "a new request ID: {rid}");
    let tp = h["traceparent"].as_str().unwrap();
    assert!(
        tp.starts_with("00-4bf92f3577b34da6a3ce929d0e0e4736-") && tp.ends_with("-01"),
        "trace continued: {tp}"
    );
    assert!(
        !tp.contains("00f067aa0ba902b7"),
        "the gateway's own span: {tp}"
    );
    for gone in ["x-secret", "keep-alive", "proxy-authorization"] {
        assert!(h.get(gone).is_none(), "{gone} reached the backend: {h}");
    }
    assert_eq!(h["host"], "h.test");

    // A client request ID is kept; a trace is started when none came in.
    let v: Value = c
        .get(gw.url("/y"))
        .header("host", "h.test")
        .header("x-request-id", "client-id-1")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(v["headers"]["x-request-id"], "client-id-1");
    let tp = v["headers"]["traceparent"].as_str().unwrap();
    assert_eq!(tp.len(), 55, "{tp}");
    assert!(tp.starts_with("00-"));

    // From a trusted proxy, its lists are continued (two lines merged) and its X-Real-IP and
    // X-Forwarded-Proto are kept.
    let proxy = reqwest::Client::builder()
        .local_address(Some("127.0.0.2".parse().unwrap()))
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap();
    let v: Value = proxy
        .get(gw.url("/z"))
        .header("host", "h.test")
        .header("x-forwarded-for", "203.0.113.7, 10.0.0.1")
        .header("x-forwarded-for", "10.0.0.2")
        .header("x-real-ip", "203.0.113.7")
        .header("x-forwarded-proto", "https")
        .header("forwarded", "for=203.0.113.7;proto=https")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let h = &v["headers"];
    assert_eq!(
        h["x-forwarded-for"],
        "203.0.113.7, 10.0.0.1, 10.0.0.2, 127.0.0.2"
    );
    assert_eq!(h["x-real-ip"], "203.0.113.7");
    assert_eq!(h["x-forwarded-proto"], "https");
    assert_eq!(
        h["forwarded"],
        "for=203.0.113.7;proto=https, for=127.0.0.2;proto=http;host=h.test"
    );
}

/// One raw HTTP/1.1 exchange (the request closes the connection); the backend's echo.
fn raw_echo(addr: std::net::SocketAddr, request: &[u8]) -> (u16, Value) {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(request).unwrap();
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    let text = String::from_utf8_lossy(&out).to_string();
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = text.split_once("\r\n\r\n").map_or("", |(_, b)| b);
    (status, serde_json::from_str(body).unwrap_or(Value::Null))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn content_length_is_canonical_and_te_trailers_is_kept() {
    let resolver = Resolver::start();
    let api = Api::new(&resolver);
    let web = Backend::start(BACKEND, "web-1");
    api.register(web.registration("web", &[], json!({"waymark-public-host": "cl.test"}), 0))
        .await;
    let gw = Gateway::with_config(&resolver, "");
    gw.wait_status(&client(), "cl.test", "/", 200).await;
    let addr = gw.http;
    let results = tokio::task::spawn_blocking(move || {
        let post = |cl: &str| {
            raw_echo(
                addr,
                format!(
                    "POST /cl HTTP/1.1\r\nHost: cl.test\r\n{cl}\r\nConnection: close\r\n\r\nhello"
                )
                .as_bytes(),
            )
        };
        (
            post("Content-Length: 5, 5"),
            post("Content-Length: 005"),
            post("Content-Length: 5\r\nContent-Length: 5"),
            post("Content-Length: 5\r\nContent-Length: 6"),
            raw_echo(
                addr,
                b"GET /te HTTP/1.1\r\nHost: cl.test\r\nTE: trailers\r\nConnection: close, TE\r\n\r\n",
            ),
            raw_echo(
                addr,
                b"GET /te HTTP/1.1\r\nHost: cl.test\r\nTE: gzip\r\nConnection: close\r\n\r\n",
            ),
        )
    })
    .await
    .unwrap();
    let (listed, zeros, twice, conflict, trailers, gzip) = results;
    // A list of equal values is refused (RFC 9110 §8.6 allows either), as nginx does.
    assert_eq!(listed.0, 400, "{listed:?}");
    for (what, (status, v)) in [("005", zeros), ("two lines", twice)] {
        assert_eq!(status, 200, "{what}: {v}");
        assert_eq!(v["headers"]["content-length"], "5", "{what}: {v}");
        assert_eq!(v["body_len"], 5, "{what}: {v}");
    }
    assert_eq!(conflict.0, 400, "{conflict:?}");
    assert_eq!(trailers.0, 200);
    assert_eq!(trailers.1["headers"]["te"], "trailers", "{trailers:?}");
    assert!(gzip.1["headers"].get("te").is_none(), "{gzip:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_cleartext_with_reqwest_and_curl() {
    let resolver = Resolver::start();
    let api = Api::new(&resolver);
    let web = Backend::start(BACKEND, "web-1");
    api.register(web.registration("web", &[], json!({"waymark-public-host": "h2.test"}), 0))
        .await;
    let gw = Gateway::start(
        &resolver,
        GatewayOptions {
            h2c: true,
            ..Default::default()
        },
    );
    // The URL's authority is the routed name, resolved to the gateway.
    let url = format!("http://h2.test:{}/over-h2", gw.http.port());
    let h2 = reqwest::Client::builder()
        .http2_prior_knowledge()
        .resolve("h2.test", gw.http)
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap();
    let resp = h2.get(&url).send().await.expect("h2c request");
    assert_eq!(resp.version(), reqwest::Version::HTTP_2);
    assert_eq!(resp.status(), 200);
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["id"], "web-1");
    assert_eq!(v["uri"], "/over-h2");
    assert_eq!(v["version"], "HTTP/1.1", "HTTP/1.1 to the instance");
    assert_eq!(
        v["headers"]["host"].as_str(),
        Some(format!("h2.test:{}", gw.http.port()).as_str()),
        "the :authority becomes Host"
    );
    // Many concurrent streams on one connection.
    let mut tasks = Vec::new();
    for i in 0..20 {
        let h2 = h2.clone();
        let url = format!("{url}?n={i}");
        tasks.push(tokio::spawn(async move {
            h2.get(&url).send().await.map(|r| r.status().as_u16())
        }));
    }
    for t in tasks {
        assert_eq!(t.await.unwrap().unwrap(), 200);
    }
    // HTTP/1.1 still works on the same listener.
    let resp = client()
        .get(gw.url("/over-h1"))
        .header("host", "h2.test")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.version(), reqwest::Version::HTTP_11);
    assert_eq!(resp.status(), 200);

    if have("curl") {
        let out = Command::new("curl")
            .args([
                "-s",
                "--http2-prior-knowledge",
                "-o",
                "/dev/null",
                "-w",
                "%{http_version} %{http_code}",
                "--resolve",
                &format!("h2.test:{}:127.0.0.1", gw.http.port()),
                &url,
            ])
            .output()
            .unwrap();
        assert_eq!(String::from_utf8_lossy(&out.stdout), "2 200");
        let out = Command::new("curl")
            .args([
                "-s",
                "-o",
                "/dev/null",
                "-w",
                "%{http_version} %{http_code}",
                "-H",
                "Host: nothing.test",
                &gw.url("/"),
            ])
            .output()
            .unwrap();
        assert_eq!(String::from_utf8_lossy(&out.stdout), "1.1 404");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_and_metrics_follow_the_registry_link() {
    let resolver_opts = waymark_e2e::Options::default();
    let mut resolver = Resolver::with(resolver_opts);
    let api = Api::new(&resolver);
    let web = Backend::start(BACKEND, "web-1");
    api.register(web.registration("web", &[], json!({"waymark-public-host": "r.test"}), 0))
        .await;
    let gw = Gateway::start(&resolver, GatewayOptions::default());
    let c = client();
    until(
        "route to web",
        WAIT,
        || async { get(&c, &gw, "r.test", "/").await.0 },
        |s| *s == 200,
    )
    .await;
    let (code, body) = gw.ready().await;
    assert_eq!(code, 200);
    assert_eq!(body["registry"], "connected");
    let live = reqwest::get(gw.admin_url("/healthz/live")).await.unwrap();
    assert_eq!(live.status(), 200);

    // The registry goes away: the gateway keeps serving its last good state and says so.
    resolver.kill();
    let (code, body) = until(
        "ready reports the registry unreachable",
        WAIT,
        || gw.ready(),
        |(_, b)| b["registry"] == "unreachable",
    )
    .await;
    assert_eq!(
        code, 200,
        "still ready: it serves the last good state: {body}"
    );
    assert!(gw
        .metrics()
        .await
        .contains("waymark_gateway_registry_connected 0"));
    for _ in 0..20 {
        assert_eq!(get(&c, &gw, "r.test", "/").await.0, 200);
    }

    // It comes back where it was (same data dir, so the registration is still there):
    // connected again.
    resolver.restart_in_place();
    until(
        "ready reports the registry connected again",
        Duration::from_secs(15),
        || gw.ready(),
        |(_, b)| b["registry"] == "connected",
    )
    .await;
    assert!(gw
        .metrics()
        .await
        .contains("waymark_gateway_registry_connected 1"));
    assert_eq!(get(&c, &gw, "r.test", "/").await.0, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn config_routes_reload_under_load_without_a_failed_request() {
    let resolver = Resolver::start();
    let api = Api::new(&resolver);
    let one = Backend::start(BACKEND, "one-1");
    let two = Backend::start(BACKEND, "two-1");
    api.register(one.registration("one", &[], json!({}), 0))
        .await;
    api.register(two.registration("two", &[], json!({}), 0))
        .await;
    let first = "tls_reload_interval = \"100ms\"\n[[routes]]\nhost = \"cfg.test\"\npath = \"/a\"\nservice = \"one\"\n";
    let gw = Gateway::with_config(&resolver, first);
    let c = client();
    until(
        "route /a",
        WAIT,
        || async { get(&c, &gw, "cfg.test", "/a").await.0 },
        |s| *s == 200,
    )
    .await;

    // Load on /a for the whole reload sequence.
    let stop = Arc::new(AtomicBool::new(false));
    let failed = Arc::new(AtomicU64::new(0));
    let done = Arc::new(AtomicU64::new(0));
    let load = {
        let (stop, failed, done) = (stop.clone(), failed.clone(), done.clone());
        let url = gw.url("/a/x");
        tokio::spawn(async move {
            let c = client();
            let started = Instant::now();
            while !stop.load(Ordering::Relaxed)
                && done.load(Ordering::Relaxed) < 20_000
                && started.elapsed() < Duration::from_secs(20)
            {
                match c.get(&url).header("host", "cfg.test").send().await {
                    Ok(r) if r.status() == 200 => {}
                    _ => {
                        failed.fetch_add(1, Ordering::Relaxed);
                    }
                }
                done.fetch_add(1, Ordering::Relaxed);
            }
        })
    };

    // A new route appears and /a starts stripping its prefix.
    let second = format!(
        "{first}strip_prefix = true\n[[routes]]\nhost = \"cfg.test\"\npath = \"/b\"\nservice = \"two\"\nrate_limit = {{ rate = 100.0, burst = 100 }}\n"
    );
    std::fs::write(gw.config_path(), &second).unwrap();
    until(
        "route /b after the file changed",
        WAIT,
        || async { get(&c, &gw, "cfg.test", "/b").await.0 },
        |s| *s == 200,
    )
    .await;
    let (_, v, _) = get(&c, &gw, "cfg.test", "/a/x").await;
    assert_eq!(v["uri"], "/x", "/a now strips its prefix");

    // A broken file changes nothing.
    std::fs::write(gw.config_path(), "[[routes]]\npath = \"nope\"\n").unwrap();
    until(
        "the broken config is reported",
        WAIT,
        || async { gw.log() },
        |log| log.contains("config not reloaded"),
    )
    .await;
    assert_eq!(get(&c, &gw, "cfg.test", "/b").await.0, 200);

    // Back to the first file, with SIGHUPs sent meanwhile: they must not stop the gateway
    // (the default action of SIGHUP would), and /b goes away.
    std::fs::write(gw.config_path(), first).unwrap();
    until(
        "route /b gone after SIGHUP",
        WAIT,
        || async {
            gw.signal(nix::sys::signal::Signal::SIGHUP);
            get(&c, &gw, "cfg.test", "/b").await.0
        },
        |s| *s == 404,
    )
    .await;

    // The load overlapped the reloads (a slow machine may not have sent many yet: wait for
    // enough rather than count on the time the reloads took).
    until(
        "the load ran",
        WAIT,
        || async { done.load(Ordering::Relaxed) },
        |n| *n > 50,
    )
    .await;
    stop.store(true, Ordering::Relaxed);
    load.await.unwrap();
    assert_eq!(
        failed.load(Ordering::Relaxed),
        0,
        "requests failed during reloads"
    );
    assert_eq!(get(&c, &gw, "cfg.test", "/a/y").await.0, 200);
}

/// In panic mode DNS and the gateway apply the same rule (one function in `shared`): when too
/// few instances are healthy, both send to every non-draining one, where the gateway used to
/// answer 503 while DNS answered the instances.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dns_and_the_gateway_agree_in_panic_mode() {
    let resolver = Resolver::with(waymark_e2e::Options {
        config: Some("[services.fragile]\npanic_threshold = 0.9\n".into()),
        ..Default::default()
    });
    let api = Api::new(&resolver);
    let a = Backend::start(BACKEND, "fragile-1");
    let b = Backend::start(BACKEND, "fragile-2");
    for backend in [&a, &b] {
        // A TTL check that never heartbeats: critical from the start.
        let mut body = backend.registration(
            "fragile",
            &[],
            json!({"waymark-public-host": "fragile.test"}),
            0,
        );
        body["Check"] = json!({"TTL": "60s"});
        api.register(body).await;
    }
    let srv = waymark_e2e::dns::udp(
        resolver.dns,
        "_fragile._tcp.mesh.internal.",
        hickory_proto::rr::RecordType::SRV,
    )
    .await;
    assert_eq!(srv.answers.len(), 2, "DNS answers both in panic mode");

    let gw = Gateway::start(&resolver, GatewayOptions::default());
    let c = client();
    let seen = until(
        "the gateway sends to the critical instances in panic mode",
        WAIT,
        || async {
            let mut ids = std::collections::BTreeSet::new();
            for _ in 0..20 {
                let (s, v, _) = get(&c, &gw, "fragile.test", "/").await;
                if s != 200 {
                    return (s, ids);
                }
                ids.insert(v["id"].as_str().unwrap_or("").to_string());
            }
            (200, ids)
        },
        |(s, ids)| *s == 200 && ids.len() == 2,
    )
    .await;
    assert_eq!(seen.1.len(), 2);
}
