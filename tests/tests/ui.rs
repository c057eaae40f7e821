//! The web views in a real browser: headless Chromium, driven through selenium
//! (`tests/clients/ui_check.py`), against the real resolver and gateway binaries. The tests
//! change the registry through the real HTTP API and wait for the open page to show it,
//! without a reload; the page may reach nothing but the listener that served it. Each test
//! saves a screenshot under the tests' temporary directory and prints its path.
//!
//! Needs `chromium`, `chromium-driver` (Debian) and selenium (`tests/clients/install.sh`).

use std::path::PathBuf;
use std::time::{Duration, Instant};

use reqwest::header::{AUTHORIZATION, CACHE_CONTROL, CONTENT_SECURITY_POLICY, CONTENT_TYPE};
use serde_json::{json, Value};
use waymark_e2e::browser::Browser;
use waymark_e2e::etcd::EtcdCluster;
use waymark_e2e::gateway::{Backend, Gateway};
use waymark_e2e::{until, Options, Resolver};

const TOKEN: &str = "ui-test-token";
const BACKEND: &str = env!("CARGO_BIN_EXE_gw_backend");
/// What the issue asks: a change is on the open page within a second.
const LIVE_WITHIN_MS: u64 = 1000;

fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap()
}

fn screenshot(name: &str) -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("ui");
    std::fs::create_dir_all(&dir).expect("screenshot directory");
    dir.join(name)
}

/// A resolver whose writes need [`TOKEN`].
fn resolver(token_for_reads: bool) -> Resolver {
    Resolver::with(Options {
        config: Some(format!(
            "[api]\ntoken = \"{TOKEN}\"\ntoken_for_reads = {token_for_reads}\n"
        )),
        ..Default::default()
    })
}

/// A PUT to the registry's API with the token; panics unless 200.
async fn put(r: &Resolver, path: &str, body: Option<Value>) {
    let mut req = client()
        .put(r.url(path))
        .header(AUTHORIZATION, format!("Bearer {TOKEN}"));
    if let Some(body) = body {
        req = req.json(&body);
    }
    let resp = req.send().await.expect("API reachable");
    let status = resp.status();
    let text = resp.text().await.unwrap_or_default();
    assert_eq!(status, 200, "PUT {path}: {text}");
}

/// `/v1/health/service/<service>` (every instance, with its checks).
async fn health(r: &Resolver, service: &str) -> Value {
    client()
        .get(r.url(&format!("/v1/health/service/{service}")))
        .send()
        .await
        .expect("API reachable")
        .json()
        .await
        .expect("JSON")
}

/// Whether `id` of `service` has its maintenance check, with `reason` as its notes.
fn in_maintenance(health: &Value, id: &str, reason: &str) -> bool {
    health.as_array().into_iter().flatten().any(|e| {
        e["Service"]["ID"] == id
            && e["Checks"].as_array().into_iter().flatten().any(|c| {
                c["CheckID"]
                    .as_str()
                    .is_some_and(|c| c.starts_with("_service_maintenance:"))
                    && c["Notes"] == reason
            })
    })
}

/// Runs `change`, then the browser command that waits for it; the page must show it within
/// [`LIVE_WITHIN_MS`] of the API's answer.
async fn live<F: std::future::Future<Output = ()>>(b: &mut Browser, change: F, wait: &str) {
    change.await;
    let started = Instant::now();
    let out = b.must(wait);
    let ms = started.elapsed().as_millis() as u64;
    println!("{wait}: on the page {ms} ms after the API answered ({out})");
    assert!(
        ms <= LIVE_WITHIN_MS,
        "{wait}: the page took {ms} ms (over {LIVE_WITHIN_MS}) to show the change\n{}",
        b.transcript()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registry_view_follows_changes_live_and_acts_with_the_token() {
    let r = resolver(false);
    let mut b = Browser::start();
    b.must(&format!("open {}", r.url("/ui/")));
    assert_eq!(b.must("text #services"), "No service is registered.");

    // A service appears when it registers.
    let web = |id: &str, ttl: bool| {
        let mut body = json!({
            "ID": id, "Name": "web", "Address": "127.0.0.1", "Port": 8080,
            "Tags": ["v2", "canary"], "Meta": {"team": "storefront", "version": "2.4.1"},
        });
        if ttl {
            body["Check"] = json!({"TTL": "10m", "Status": "passing", "Name": "heartbeat"});
        }
        body
    };
    live(
        &mut b,
        put(&r, "/v1/agent/service/register", Some(web("web-1", true))),
        "wait-service web healthy 1/1",
    )
    .await;
    live(
        &mut b,
        put(&r, "/v1/agent/service/register", Some(web("web-2", false))),
        "wait-service web healthy 2/2",
    )
    .await;
    b.must("check-output web-1 service:web-1 heartbeat");

    // It turns unhealthy when its check fails, with the check's output.
    live(
        &mut b,
        put(
            &r,
            "/v1/agent/check/fail/service:web-1?note=disk%20full%20on%20%2Fvar",
            None,
        ),
        "wait-service web degraded 1/2",
    )
    .await;
    b.must("wait-instance web-1 health critical");
    b.must("wait-instance web-1 serving false");
    b.must("check-output web-1 service:web-1 disk full on /var");
    let text = b.must("text details[data-service=\"web\"] summary");
    assert!(text.contains("1/2 healthy"), "{text}");
    assert!(text.contains("web.mesh.internal"), "{text}");

    // A service with no instance answered comes first.
    put(
        &r,
        "/v1/agent/service/register",
        Some(json!({
            "ID": "orders-1", "Name": "orders", "Address": "127.0.0.2", "Port": 9000,
            "Check": {"TTL": "10m", "Status": "critical", "Notes": "waiting for its database"},
        })),
    )
    .await;
    b.must("wait-service orders down 0/1");
    let first = b.must("text #services > details");
    assert!(first.contains("orders"), "worst first: {first}");
    let names = b.must("text details[data-service=\"web\"] .names");
    for name in [
        "_web._tcp.mesh.internal",
        "v2.web.mesh.internal",
        "canary.web.mesh.internal",
    ] {
        assert!(names.contains(name), "{name} in {names}");
    }
    let row = b.must("text tr[data-instance=\"web-2\"]");
    for shown in [
        "web-2.instance.web.mesh.internal",
        "127.0.0.1:8080",
        "team=storefront",
        "canary",
    ] {
        assert!(row.contains(shown), "{shown} in {row}");
    }

    // The actions need the token: without it the page says it was refused, and nothing
    // changes.
    b.must("maintenance web-2 deploy");
    b.must("wait-notice refused");
    assert!(!in_maintenance(&health(&r, "web").await, "web-2", "deploy"));

    // With it: maintenance on, seen by the API and by the page.
    b.must(&format!("token {TOKEN}"));
    b.must("maintenance web-2 deploy 2.4.2");
    until(
        "web-2 in maintenance through the API",
        Duration::from_secs(5),
        || health(&r, "web"),
        |h| in_maintenance(h, "web-2", "deploy 2.4.2"),
    )
    .await;
    b.must("wait-instance web-2 maintenance true");
    b.must("wait-service web down 0/2");
    let row = b.must("text tr[data-instance=\"web-2\"]");
    assert!(row.contains("maintenance: deploy 2.4.2"), "{row}");
    let shot = screenshot("registry.png");
    b.must(&format!("screenshot {}", shot.display()));
    println!("screenshot of the registry view: {}", shot.display());

    // And off again.
    b.must("maintenance-off web-2");
    b.must("wait-instance web-2 maintenance false");
    b.must("wait-service web degraded 1/2");
    assert!(!in_maintenance(
        &health(&r, "web").await,
        "web-2",
        "deploy 2.4.2"
    ));

    // Deregistration, from the page.
    b.must("deregister orders-1");
    b.must("wait-gone orders");
    let ids: Vec<String> = client()
        .get(r.url("/v1/agent/services"))
        .send()
        .await
        .unwrap()
        .json::<Value>()
        .await
        .unwrap()
        .as_object()
        .unwrap()
        .keys()
        .cloned()
        .collect();
    assert_eq!(ids, vec!["web-1", "web-2"]);

    // The check passes again: the page follows.
    live(
        &mut b,
        put(&r, "/v1/agent/check/pass/service:web-1", None),
        "wait-service web healthy 2/2",
    )
    .await;
}

/// With `token_for_reads`, the page's snapshot and event stream take the token too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registry_view_asks_for_the_token_when_reads_need_it() {
    let r = resolver(true);
    put(
        &r,
        "/v1/agent/service/register",
        Some(json!({"ID": "api-1", "Name": "api", "Address": "127.0.0.1", "Port": 80})),
    )
    .await;
    let mut b = Browser::start();
    // The page loads (its assets need no token) and says what it needs.
    let loaded = b.must(&format!("load {}", r.url("/ui/")));
    assert!(loaded.ends_with("token needed"), "{loaded}");
    b.must("wait-notice needs the API token");
    b.must(&format!("token {TOKEN}"));
    b.must("wait-service api healthy 1/1");
    live(
        &mut b,
        put(
            &r,
            "/v1/agent/service/register",
            Some(json!({"ID": "api-2", "Name": "api", "Address": "127.0.0.1", "Port": 81})),
        ),
        "wait-service api healthy 2/2",
    )
    .await;
}

/// The view's responses over plain HTTP: types, caching, policy, the snapshot's shape.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registry_view_assets_and_snapshot() {
    let r = resolver(true);
    let c = client();
    for (path, kind) in [
        ("/ui/", "text/html"),
        ("/ui/app.js", "text/javascript"),
        ("/ui/ui.css", "text/css"),
        ("/ui/base.css", "text/css"),
    ] {
        let resp = c.get(r.url(path)).send().await.unwrap();
        assert_eq!(resp.status(), 200, "{path}");
        let h = resp.headers();
        assert!(
            h[CONTENT_TYPE].to_str().unwrap().starts_with(kind),
            "{path}"
        );
        assert_eq!(h[CACHE_CONTROL], "no-cache", "{path}");
        let csp = h[CONTENT_SECURITY_POLICY].to_str().unwrap();
        assert!(
            csp.contains("default-src 'none'") && !csp.contains("http"),
            "{csp}"
        );
        let etag = h["etag"].clone();
        let again = c
            .get(r.url(path))
            .header("if-none-match", etag)
            .send()
            .await
            .unwrap();
        assert_eq!(again.status(), 304, "{path}");
    }
    let redirect = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap()
        .get(r.url("/ui"))
        .send()
        .await
        .unwrap();
    assert_eq!(redirect.status(), 308);
    assert_eq!(redirect.headers()["location"], "/ui/");
    assert_eq!(
        c.get(r.url("/ui/nope.js")).send().await.unwrap().status(),
        404
    );

    // The snapshot is a read: it takes the token when reads do.
    let snapshot = r.url("/ui/api/snapshot");
    assert_eq!(c.get(&snapshot).send().await.unwrap().status(), 403);
    put(
        &r,
        "/v1/agent/service/register",
        Some(json!({"ID": "db-1", "Name": "db", "Address": "127.0.0.3", "Port": 5432})),
    )
    .await;
    let resp = c.get(&snapshot).bearer_auth(TOKEN).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()[CACHE_CONTROL], "no-store");
    let v: Value = resp.json().await.unwrap();
    assert!(v["index"].as_u64().unwrap() >= 1);
    assert_eq!(v["registry"]["source"], "embedded");
    assert_eq!(v["registry"]["token_required"], true);
    assert_eq!(v["services"][0]["name"], "db");
    assert_eq!(
        v["services"][0]["instances"][0]["dns"],
        "db-1.instance.db.mesh.internal"
    );
}

/// With etcd, the view shows the source and its age, every host's instances with their
/// node, and actions only for this host's own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registry_view_with_etcd_shows_nodes_and_the_mirror() {
    let etcd = EtcdCluster::start(1);
    let host = |name: &str| {
        Resolver::with(Options {
            extra_args: vec![
                "--etcd".into(),
                etcd.endpoints(),
                "--node-name".into(),
                name.into(),
            ],
            ..Options::default()
        })
    };
    let (a, b) = (host("host-a"), host("host-b"));
    let register = |r: &Resolver, id: &str| {
        let body = json!({"ID": id, "Name": "ledger", "Address": "127.0.0.9", "Port": 7000});
        let url = r.url("/v1/agent/service/register");
        async move {
            let resp = client().put(url).json(&body).send().await.unwrap();
            assert_eq!(resp.status(), 200);
        }
    };
    register(&a, "ledger-a").await;
    register(&b, "ledger-b").await;
    let mut br = Browser::start();
    br.must(&format!("open {}", b.url("/ui/")));
    br.must("wait-service ledger healthy 2/2");
    assert_eq!(br.must("text #source"), "etcd");
    let age = br.must("text #age-wrap");
    assert!(age.starts_with("mirror age"), "{age}");
    let remote = br.must("text tr[data-instance=\"ledger-a\"]");
    assert!(remote.contains("host-a"), "its node: {remote}");
    assert!(remote.contains("registered on another host"), "{remote}");
    let local = br.must("text tr[data-instance=\"ledger-b\"]");
    assert!(
        local.contains("host-b") && local.contains("Maintenance"),
        "{local}"
    );
    // A change on another host reaches this host's page through etcd.
    live(
        &mut br,
        register(&a, "ledger-a2"),
        "wait-service ledger healthy 3/3",
    )
    .await;
}

const GATEWAY_CONFIG: &str = r#"
[[routes]]
name = "shop"
host = "shop.test"
path = "/shop"
service = "shop"
strip_prefix = true

[[routes]]
name = "closed"
host = "shop.test"
path = "/closed"
service = "nobody"
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateway_view_shows_routes_and_request_counts() {
    let r = Resolver::start();
    let backend = Backend::start(BACKEND, "shop-1");
    let api = waymark_e2e::Api::new(&r);
    api.register(backend.registration("shop", &[], json!({}), 0))
        .await;
    let gw = Gateway::with_config(&r, GATEWAY_CONFIG);
    let c = client();
    gw.wait_status(&c, "shop.test", "/shop/hello", 200).await;
    let mut b = Browser::start();
    b.must(&format!("open {}", gw.admin_url("/ui/")));
    // The page is open before the traffic: the counts it shows arrive live.
    for _ in 0..20 {
        assert_eq!(gw.status(&c, "shop.test", "/shop/hello").await, Some(200));
    }
    for _ in 0..3 {
        assert_eq!(gw.status(&c, "shop.test", "/closed/x").await, Some(503));
    }
    b.must("wait-count requests 20 tr[data-route=\"shop\"]");
    b.must("wait-count requests 20 tr[data-instance=\"shop-1\"]");
    b.must("wait-count errors 3 tr[data-route=\"closed\"]");
    let row = b.must("text tr[data-route=\"shop\"]");
    assert!(row.contains("shop.test/shop"), "{row}");
    let closed = b.must("text tr[data-route=\"closed\"]");
    assert!(closed.contains("nobody"), "{closed}");
    assert_eq!(b.must("text #route-count"), "2");
    let shot = screenshot("gateway.png");
    b.must(&format!("screenshot {}", shot.display()));
    println!("screenshot of the gateway view: {}", shot.display());
}

/// The gateway view's responses over plain HTTP: the stats JSON and the event stream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateway_view_stats_and_events() {
    let r = Resolver::start();
    let gw = Gateway::with_config(&r, GATEWAY_CONFIG);
    let c = client();
    let resp = c.get(gw.admin_url("/ui/")).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    assert!(resp.headers()[CONTENT_SECURITY_POLICY]
        .to_str()
        .unwrap()
        .contains("default-src 'none'"));
    gw.wait_status(&c, "shop.test", "/closed/x", 503).await;
    let v: Value = c
        .get(gw.admin_url("/ui/api/stats"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let names: Vec<&str> = v["routes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, vec!["closed", "shop"]);
    assert!(
        v["routes"][0]["traffic"]["errors"].as_u64().unwrap() >= 1,
        "{v}"
    );
    // The stream sends a view at once, then one a second.
    let mut events = c.get(gw.admin_url("/ui/api/events")).send().await.unwrap();
    assert_eq!(events.headers()[CONTENT_TYPE], "text/event-stream");
    let started = Instant::now();
    let mut text = String::new();
    while text.matches("event: stats").count() < 2 {
        let chunk = tokio::time::timeout(Duration::from_secs(5), events.chunk())
            .await
            .expect("an event within 5 s")
            .unwrap()
            .expect("the stream stays open");
        text.push_str(&String::from_utf8_lossy(&chunk));
    }
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(800) && took < Duration::from_secs(3),
        "two events {took:?} apart"
    );
}
