//! `waymark-gateway forwarder` through its real interfaces: a real resolver (its registry and
//! DNS), the real forwarder binary, real backends as processes (`gw_backend` for HTTP,
//! `line_echo` for TCP), called on the VIPs DNS answers. Each test has a VIP range of its own
//! (`127.78.<n>.0/24`) and backends on addresses of their own (`127.79.<n>.x`), so tests
//! running in parallel never contend for an address.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use waymark_e2e::dns::a_records;
use waymark_e2e::forwarder::{forwarder_refuses, Forwarder};
use waymark_e2e::gateway::Backend;
use waymark_e2e::{have, until, Api, Options, Resolver};

const GW_BACKEND: &str = env!("CARGO_BIN_EXE_gw_backend");
const LINE_ECHO: &str = env!("CARGO_BIN_EXE_line_echo");

/// A resolver whose VIPs come from `127.78.<n>.0/24`, answered in `auto` mode (the default).
fn resolver(n: u8) -> Resolver {
    Resolver::with(Options {
        extra_args: vec!["--vip-range".into(), format!("127.78.{n}.0/24")],
        ..Options::default()
    })
}

fn in_range(a: &IpAddr, n: u8) -> bool {
    matches!(a, IpAddr::V4(v4) if v4.octets()[..3] == [127, 78, n])
}

fn at(n: u8, host: u8, port: u16) -> SocketAddr {
    SocketAddr::from(([127, 79, n, host], port))
}

/// Waits until `name` answers one VIP of test `n`'s range.
async fn vip_of(r: &Resolver, name: &str, n: u8) -> IpAddr {
    until(
        &format!("{name} answers a VIP"),
        Duration::from_secs(10),
        || a_records(r.dns, name),
        |a| a.len() == 1 && in_range(&a[0], n),
    )
    .await[0]
}

/// One line-echo exchange: connect, send a line, read the answer, half-close, read the
/// goodbye. Returns the instance's ID.
async fn echo_once(addr: SocketAddr) -> Result<String, String> {
    let s = tokio::time::timeout(Duration::from_secs(5), TcpStream::connect(addr))
        .await
        .map_err(|_| "connect timed out".to_string())?
        .map_err(|e| format!("connect: {e}"))?;
    let (r, mut w) = s.into_split();
    let mut lines = BufReader::new(r).lines();
    w.write_all(b"hello\n").await.map_err(|e| e.to_string())?;
    let first = tokio::time::timeout(Duration::from_secs(5), lines.next_line())
        .await
        .map_err(|_| "no answer".to_string())?
        .map_err(|e| e.to_string())?
        .ok_or("closed without an answer")?;
    let (id, said) = first
        .split_once(' ')
        .ok_or(format!("odd answer {first:?}"))?;
    if said != "hello" {
        return Err(format!("odd answer {first:?}"));
    }
    // Our half-close reaches the instance, whose goodbye still comes back.
    w.shutdown().await.map_err(|e| e.to_string())?;
    let bye = tokio::time::timeout(Duration::from_secs(5), lines.next_line())
        .await
        .map_err(|_| "no goodbye after the half-close".to_string())?
        .map_err(|e| e.to_string())?;
    if bye.as_deref() != Some(&format!("{id} bye")) {
        return Err(format!("expected {id} bye, got {bye:?}"));
    }
    Ok(id.to_string())
}

/// The VIP of a service as the registry's change stream carries it (whoever asks).
async fn registry_vip(api: &Api, service: &str) -> Ipv4Addr {
    let changes: Value = api
        .get("/v1/waymark/changes?index=0")
        .await
        .json()
        .await
        .expect("change stream JSON");
    let vip = changes["services"]
        .as_array()
        .expect("services")
        .iter()
        .find(|s| s["name"] == service)
        .and_then(|s| s["attrs"]["vips"][""].as_str())
        .unwrap_or_else(|| panic!("no VIP for {service} in {changes}"));
    vip.parse().expect("a VIP")
}

#[tokio::test]
async fn vip_answers_follow_the_forwarder_from_ready_to_sigterm() {
    let r = resolver(1);
    let api = Api::new(&r);
    let a = Backend::start_on(GW_BACKEND, "pay-1", at(1, 1, 0), &[]);
    let b = Backend::start_on(GW_BACKEND, "pay-2", at(1, 2, a.addr.port()), &[]);
    for x in [&a, &b] {
        api.register(x.registration("payment", &[], json!({"waymark-protocol": "http"}), 0))
            .await;
    }
    let instances = vec![a.addr.ip(), b.addr.ip()];
    assert_eq!(
        a_records(r.dns, "payment.mesh.internal.").await,
        instances,
        "no forwarder: instance addresses"
    );

    // Until the forwarder is ready, instance addresses; then the VIP, whose listener is up
    // by the time it is first answered.
    let mut f = Forwarder::start_unready(&r, "host-1", "");
    let deadline = Instant::now() + Duration::from_secs(20);
    let vip = loop {
        let got = a_records(r.dns, "payment.mesh.internal.").await;
        if got.len() == 1 && in_range(&got[0], 1) {
            break got[0];
        }
        assert_eq!(got, instances, "until the VIP, instance addresses");
        assert!(Instant::now() < deadline, "no VIP; log:\n{}", f.log());
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    let listener = SocketAddr::new(vip, a.addr.port());
    TcpStream::connect(listener)
        .await
        .expect("the VIP's listener is up when the VIP is first answered");
    let (_, body) = until(
        "the forwarder reports ready",
        Duration::from_secs(5),
        || f.ready(),
        |(status, _)| *status == 200,
    )
    .await;
    assert_eq!(body["registered"], true, "{body}");
    assert_eq!(body["listeners"], 1, "{body}");
    assert_eq!(body["registry"], "connected", "{body}");

    // A call through the VIP reaches an instance.
    let url = format!("http://{}/", SocketAddr::new(vip, a.addr.port()));
    let got: Value = reqwest::get(&url)
        .await
        .expect("call")
        .json()
        .await
        .expect("JSON");
    assert!(
        ["pay-1", "pay-2"].contains(&got["id"].as_str().unwrap()),
        "{got}"
    );

    // SIGTERM: it deregisters first, and instance addresses are answered again.
    let (status, took) = f
        .terminate(Duration::from_secs(15))
        .expect("exits on SIGTERM");
    assert!(status.success(), "exit {status:?}; log:\n{}", f.log());
    assert!(took < Duration::from_secs(10), "took {took:?}");
    until(
        "instance addresses after the forwarder stopped",
        Duration::from_secs(5),
        || a_records(r.dns, "payment.mesh.internal."),
        |got| got[..] == instances[..],
    )
    .await;
}

#[tokio::test]
async fn tcp_connections_are_balanced_and_a_refused_connect_is_retried_and_ejects() {
    let r = resolver(2);
    let api = Api::new(&r);
    let mut a = Backend::start_on(LINE_ECHO, "echo-a", at(2, 1, 0), &[]);
    let b = Backend::start_on(LINE_ECHO, "echo-b", at(2, 2, a.addr.port()), &[]);
    // No health check: only the forwarder can notice a dead instance.
    for x in [&a, &b] {
        api.register(x.registration("echo", &[], json!({}), 0))
            .await;
    }
    let f = Forwarder::start(&r, "host-2", "[tcp]\nidle_timeout = \"1s\"\n");
    let vip = vip_of(&r, "echo.mesh.internal.", 2).await;
    let target = SocketAddr::new(vip, a.addr.port());

    // Bytes both ways, half-close passed on, and both instances get connections.
    let mut seen: HashMap<String, u32> = HashMap::new();
    for _ in 0..30 {
        let id = echo_once(target)
            .await
            .expect("an exchange through the VIP");
        *seen.entry(id).or_default() += 1;
    }
    assert_eq!(seen.len(), 2, "both instances get connections: {seen:?}");

    // A connection with nothing to say is closed after the idle timeout.
    let mut idle = TcpStream::connect(target).await.expect("connect");
    let t0 = Instant::now();
    let mut buf = [0u8; 16];
    let n = tokio::time::timeout(Duration::from_secs(10), idle.read(&mut buf))
        .await
        .expect("closed by the idle timeout")
        .unwrap_or(0);
    assert_eq!(n, 0);
    assert!(
        t0.elapsed() >= Duration::from_millis(900),
        "{:?}",
        t0.elapsed()
    );

    // One instance dies: no new connection fails, and after the first refused connect the
    // dead one is not tried again (ejected for 10 s, far longer than this loop).
    a.kill();
    let failures = "waymark_forwarder_connect_failures_total{service=\"echo\"}";
    assert_eq!(f.metric(failures).await, 0.0);
    let t0 = Instant::now();
    for i in 0..60 {
        let id = echo_once(target)
            .await
            .unwrap_or_else(|e| panic!("connection {i} after the kill failed: {e}"));
        assert_eq!(id, "echo-b");
    }
    assert!(t0.elapsed() < Duration::from_secs(10), "{:?}", t0.elapsed());
    let text = f.metrics().await;
    let value = |s: &str| waymark_e2e::forwarder::metric_value(&text, s);
    assert_eq!(value(failures), 1.0, "one refused connect only:\n{text}");
    assert_eq!(
        value("waymark_forwarder_outlier_ejections_total{service=\"echo\"}"),
        1.0
    );
    assert!(value("waymark_forwarder_retries_total{service=\"echo\"}") >= 1.0);
    assert_eq!(
        value("waymark_forwarder_no_instance_total{service=\"echo\"}"),
        0.0
    );
}

/// Counters shared by the load loop's workers.
#[derive(Default)]
struct Load {
    total: AtomicU64,
    failed: AtomicU64,
    by_id: Mutex<HashMap<String, u64>>,
    errors: Mutex<Vec<String>>,
    stop: AtomicBool,
}

impl Load {
    fn total(&self) -> u64 {
        self.total.load(Ordering::Relaxed)
    }

    fn served_by(&self, id: &str) -> u64 {
        self.by_id.lock().unwrap().get(id).copied().unwrap_or(0)
    }

    /// Waits until `n` more requests are done.
    async fn more(&self, n: u64) {
        let want = self.total() + n;
        until(
            &format!("{n} more requests"),
            Duration::from_secs(20),
            || async { self.total() },
            |t| *t >= want,
        )
        .await;
    }
}

/// GETs `url` until told to stop, or 1,000,000 requests, or 60 s. The count bound must stay
/// out of reach while the test waits on the load (20,000 ran out during the wait for a
/// restarted instance's check on a fast run, and the load stopped under the test's feet).
async fn load_worker(client: reqwest::Client, url: String, load: Arc<Load>) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !load.stop.load(Ordering::Relaxed)
        && load.total() < 1_000_000
        && Instant::now() < deadline
    {
        match client.get(&url).send().await {
            Ok(resp) if resp.status() == 200 => match resp.json::<Value>().await {
                Ok(v) => {
                    let id = v["id"].as_str().unwrap_or("?").to_string();
                    *load.by_id.lock().unwrap().entry(id).or_default() += 1;
                }
                Err(e) => {
                    load.failed.fetch_add(1, Ordering::Relaxed);
                    load.errors.lock().unwrap().push(format!("body: {e}"));
                }
            },
            Ok(resp) => {
                load.failed.fetch_add(1, Ordering::Relaxed);
                let status = resp.status();
                let body = resp.text().await.unwrap_or_default();
                load.errors
                    .lock()
                    .unwrap()
                    .push(format!("{status}: {body}"));
            }
            Err(e) => {
                load.failed.fetch_add(1, Ordering::Relaxed);
                load.errors.lock().unwrap().push(format!("{e:#}"));
            }
        }
        load.total.fetch_add(1, Ordering::Relaxed);
    }
}

#[tokio::test]
async fn http_calls_are_balanced_traced_and_never_fail_while_instances_die_and_drain() {
    let r = resolver(3);
    let api = Api::new(&r);
    let mut a = Backend::start_on(GW_BACKEND, "pay-a", at(3, 1, 0), &[]);
    let b = Backend::start_on(GW_BACKEND, "pay-b", at(3, 2, a.addr.port()), &[]);
    for x in [&a, &b] {
        api.register(x.registration("payment", &[], json!({"waymark-protocol": "http"}), 200))
            .await;
    }
    let f = Forwarder::start(
        &r,
        "host-3",
        "[outlier]\nbase_ejection = \"1s\"\nmax_ejection = \"2s\"\n",
    );
    let vip = vip_of(&r, "payment.mesh.internal.", 3).await;
    let url = format!("http://{}/hello?x=1", SocketAddr::new(vip, a.addr.port()));

    // traceparent: the same trace, a new span; the path and query as sent.
    let client = reqwest::Client::new();
    let incoming = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let got: Value = client
        .get(&url)
        .header("traceparent", incoming)
        .send()
        .await
        .expect("call")
        .json()
        .await
        .expect("JSON");
    let sent = got["headers"]["traceparent"].as_str().expect("traceparent");
    assert!(
        sent.starts_with("00-4bf92f3577b34da6a3ce929d0e0e4736-"),
        "{sent}"
    );
    assert!(sent.ends_with("-01") && sent != incoming, "{sent}");
    assert_eq!(got["uri"], "/hello?x=1");
    // Without one, a trace is started.
    let got: Value = client.get(&url).send().await.unwrap().json().await.unwrap();
    assert_eq!(
        got["headers"]["traceparent"].as_str().map(str::len),
        Some(55)
    );

    // HTTP/2 with prior knowledge (h2c), and curl.
    let h2 = reqwest::Client::builder()
        .http2_prior_knowledge()
        .build()
        .unwrap();
    let resp = h2.get(&url).send().await.expect("h2c call");
    assert_eq!(resp.version(), reqwest::Version::HTTP_2);
    assert_eq!(resp.status(), 200);
    if have("curl") {
        let out = tokio::process::Command::new("curl")
            .args(["-sS", "--max-time", "5", &url])
            .output()
            .await
            .expect("curl");
        let body: Value = serde_json::from_slice(&out.stdout)
            .unwrap_or_else(|e| panic!("curl: {e}: {}", String::from_utf8_lossy(&out.stderr)));
        assert!(body["id"].as_str().unwrap().starts_with("pay-"), "{body}");
    }

    // The load: four workers of idempotent GETs, bounded in count and time.
    let load = Arc::new(Load::default());
    let workers: Vec<_> = (0..4)
        .map(|_| tokio::spawn(load_worker(client.clone(), url.clone(), load.clone())))
        .collect();
    load.more(200).await;
    assert!(
        load.served_by("pay-a") > 0 && load.served_by("pay-b") > 0,
        "balanced over both"
    );

    // Killed: retried on the other, ejected, then out of the selection by its check.
    a.kill();
    load.more(300).await;
    // Restarted where it was: back in the selection once its check passes.
    a.restart();
    until(
        "pay-a passing again",
        Duration::from_secs(10),
        || api.passing_ids("payment"),
        |ids| ids.contains(&"pay-a".to_string()),
    )
    .await;
    let before = load.served_by("pay-a");
    until(
        "pay-a answers again",
        Duration::from_secs(15),
        || async { load.served_by("pay-a") },
        |n| *n > before,
    )
    .await;
    // Drained (maintenance): no new request; then back.
    let drain = "/v1/agent/service/maintenance/pay-b?enable=true";
    assert_eq!(api.put_empty(drain).await.status(), 200);
    load.more(100).await;
    let drained_at = load.served_by("pay-b");
    load.more(300).await;
    assert_eq!(
        load.served_by("pay-b"),
        drained_at,
        "a draining instance gets no request"
    );
    let undrain = "/v1/agent/service/maintenance/pay-b?enable=false";
    assert_eq!(api.put_empty(undrain).await.status(), 200);
    until(
        "pay-b answers again",
        Duration::from_secs(10),
        || async { load.served_by("pay-b") },
        |n| *n > drained_at,
    )
    .await;
    load.stop.store(true, Ordering::Relaxed);
    for w in workers {
        w.await.unwrap();
    }
    let total = load.total();
    let failed = load.failed.load(Ordering::Relaxed);
    let errors = load.errors.lock().unwrap().clone();
    assert_eq!(failed, 0, "{failed} of {total} failed: {errors:?}");
    assert!(total >= 1000, "{total} requests");
    let text = f.metrics().await;
    assert!(
        text.contains("waymark_forwarder_requests_total{service=\"payment\",status=\"200\"}"),
        "{text}"
    );
    // The kill was met by retries (not by luck): requests to the dead instance were retried.
    let retries = waymark_e2e::forwarder::metric_value(
        &text,
        "waymark_forwarder_retries_total{service=\"payment\"}",
    );
    assert!(retries >= 1.0, "{text}");
    eprintln!(
        "{total} requests, 0 failed, {retries} retries; by instance: {:?}",
        load.by_id.lock().unwrap()
    );
}

#[tokio::test]
async fn listeners_come_and_go_with_services_and_a_busy_address_is_not_fatal() {
    let r = resolver(4);
    let api = Api::new(&r);
    // A service whose VIP:port is taken before the forwarder starts.
    let busy = Backend::start_on(LINE_ECHO, "busy-1", at(4, 1, 0), &[]);
    api.register(busy.registration("busy", &[], json!({}), 0))
        .await;
    let busy_vip = registry_vip(&api, "busy").await;
    let squatter = std::net::TcpListener::bind((busy_vip, busy.addr.port())).expect("squat");

    let f = Forwarder::start(&r, "host-4", "");
    let bind_failures = "waymark_forwarder_listener_bind_failures_total{service=\"busy\"}";
    assert!(
        f.metric(bind_failures).await >= 1.0,
        "counted; log:\n{}",
        f.log()
    );
    // Once the address is free, the listener comes up (retried without a change).
    drop(squatter);
    let busy_addr = SocketAddr::new(IpAddr::V4(busy_vip), busy.addr.port());
    let _ = until(
        "the busy service's listener once the address is free",
        Duration::from_secs(15),
        || echo_once(busy_addr),
        |r| r.as_deref() == Ok("busy-1"),
    )
    .await;

    // A new service (and its tag subset) is served within a change.
    let late = Backend::start_on(LINE_ECHO, "late-1", at(4, 2, 0), &[]);
    api.register(late.registration("late", &["v2"], json!({}), 0))
        .await;
    for name in ["late.mesh.internal.", "v2.late.mesh.internal."] {
        let vip = vip_of(&r, name, 4).await;
        let addr = SocketAddr::new(vip, late.addr.port());
        let _ = until(
            &format!("{name} on {addr} accepts"),
            Duration::from_secs(5),
            || echo_once(addr),
            |r| r.as_deref() == Ok("late-1"),
        )
        .await;
    }
    let late_addr = SocketAddr::new(vip_of(&r, "late.mesh.internal.", 4).await, late.addr.port());

    // A service that turns HTTP (its registration says so) keeps its listener, which now
    // proxies per request: the instance sees the trace header only the HTTP mode adds.
    let web = Backend::start_on(GW_BACKEND, "web-1", at(4, 3, 0), &[]);
    api.register(web.registration("web", &[], json!({}), 0))
        .await;
    let web_url = format!(
        "http://{}/",
        SocketAddr::new(vip_of(&r, "web.mesh.internal.", 4).await, web.addr.port())
    );
    let traced = || async {
        let v: Value = reqwest::get(&web_url).await.ok()?.json().await.ok()?;
        Some(v["headers"].get("traceparent").is_some())
    };
    let _ = until("web through TCP", Duration::from_secs(5), traced, |t| {
        *t == Some(false)
    })
    .await;
    api.register(web.registration("web", &[], json!({"waymark-protocol": "http"}), 0))
        .await;
    let _ = until("web through HTTP", Duration::from_secs(5), traced, |t| {
        *t == Some(true)
    })
    .await;
    api.put_empty("/v1/agent/service/deregister/web-1").await;
    // busy, late and v2.late: web's listener closes with its service.
    until(
        "three listeners once web is gone",
        Duration::from_secs(5),
        || f.metric("waymark_forwarder_listeners"),
        |n| *n == 3.0,
    )
    .await;

    // Deregistered: its listeners close.
    let status = api
        .put_empty("/v1/agent/service/deregister/late-1")
        .await
        .status();
    assert_eq!(status, 200);
    let _ = until(
        "the removed service's listener refuses",
        Duration::from_secs(5),
        || async {
            TcpStream::connect(late_addr)
                .await
                .map(|_| ())
                .map_err(|e| e.kind())
        },
        |r| *r == Err(std::io::ErrorKind::ConnectionRefused),
    )
    .await;
    assert_eq!(f.metric("waymark_forwarder_listeners").await, 1.0);
    assert_eq!(echo_once(busy_addr).await.as_deref(), Ok("busy-1"));
}

#[test]
fn bad_config_and_flags_are_refused_with_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let write = |name: &str, text: &str| {
        let p = dir.path().join(name);
        std::fs::write(&p, text).unwrap();
        p.display().to_string()
    };
    let unknown = write(
        "unknown.toml",
        "host_name = \"h\"\nconect_timeout = \"1s\"\n",
    );
    let invalid = write(
        "invalid.toml",
        "host_name = \"h\"\nconnect_timeout = \"0s\"\n",
    );
    let bad_duration = write(
        "dur.toml",
        "host_name = \"h\"\n[tcp]\nidle_timeout = \"10\"\n",
    );
    let cases: &[(&[&str], i32, &str)] = &[
        (
            &["--config", "/nonexistent/forwarder.toml"],
            1,
            "reading /nonexistent",
        ),
        (&["--config", &unknown], 1, "unknown field `conect_timeout`"),
        (
            &["--config", &invalid],
            1,
            "connect_timeout must be positive",
        ),
        (&["--config", &bad_duration], 1, "the unit is missing"),
        (&["--host-name", "not a label"], 1, "host_name"),
        (
            &["--host-name", "h", "--registry", "localhost:8500"],
            1,
            "http://",
        ),
        (&["--admin-addr", "nowhere"], 2, "--admin-addr"),
        (&["--host-name", "h", "--bogus"], 2, "--bogus"),
    ];
    for (args, code, says) in cases {
        let (got, stderr) = forwarder_refuses(args);
        assert_eq!(got, Some(*code), "{args:?}: {stderr}");
        assert!(stderr.contains(says), "{args:?}: {stderr}");
        assert!(!stderr.contains("panicked"), "{args:?}: {stderr}");
    }
}

#[tokio::test]
async fn an_unreachable_registry_leaves_the_last_state_served_and_says_so() {
    let mut r = resolver(5);
    let api = Api::new(&r);
    let echo = Backend::start_on(LINE_ECHO, "echo-1", at(5, 1, 0), &[]);
    api.register(echo.registration("echo", &[], json!({}), 0))
        .await;
    let f = Forwarder::start(&r, "host-5", "[announce]\nttl = \"2s\"\n");
    let vip = vip_of(&r, "echo.mesh.internal.", 5).await;
    let addr = SocketAddr::new(vip, echo.addr.port());
    assert_eq!(echo_once(addr).await.as_deref(), Ok("echo-1"));

    r.kill();
    let (status, body) = until(
        "readiness says the registry is unreachable and the heartbeat failed",
        Duration::from_secs(10),
        || f.ready(),
        |(_, b)| b["registry"] == "unreachable" && b["registered"] == false,
    )
    .await;
    assert_eq!(status, 200, "it keeps serving its last state: {body}");
    assert!(body["registration_error"].is_string(), "{body}");
    let text = f.metrics().await;
    let value = |s: &str| waymark_e2e::forwarder::metric_value(&text, s);
    assert_eq!(value("waymark_forwarder_registry_connected"), 0.0, "{text}");
    assert_eq!(value("waymark_forwarder_registered"), 0.0, "{text}");
    assert!(
        value("waymark_forwarder_announce_failures_total") >= 1.0,
        "{text}"
    );
    assert_eq!(value("waymark_forwarder_listeners"), 1.0, "{text}");
    assert_eq!(
        echo_once(addr).await.as_deref(),
        Ok("echo-1"),
        "the last state is served"
    );

    // The registry comes back where it was: followed and heartbeated again, VIPs again.
    r.restart_in_place();
    until(
        "the registry followed and the forwarder registered again",
        Duration::from_secs(15),
        || f.ready(),
        |(s, b)| *s == 200 && b["registry"] == "connected" && b["registered"] == true,
    )
    .await;
    assert_eq!(
        vip_of(&r, "echo.mesh.internal.", 5).await,
        vip,
        "the same VIP"
    );
    assert_eq!(echo_once(addr).await.as_deref(), Ok("echo-1"));
}

#[tokio::test]
async fn sigterm_deregisters_closes_listeners_and_lets_open_connections_finish() {
    let r = resolver(6);
    let api = Api::new(&r);
    let echo = Backend::start_on(LINE_ECHO, "echo-1", at(6, 1, 0), &[]);
    api.register(echo.registration("echo", &[], json!({}), 0))
        .await;
    let f = Forwarder::start(
        &r,
        "host-6",
        "max_connections = 1\n[shutdown]\ndrain_timeout = \"20s\"\n",
    );
    let vip = vip_of(&r, "echo.mesh.internal.", 6).await;
    let addr = SocketAddr::new(vip, echo.addr.port());

    // An open connection, mid-conversation.
    let (rd, mut wr) = TcpStream::connect(addr)
        .await
        .expect("connect")
        .into_split();
    let mut lines = BufReader::new(rd).lines();
    wr.write_all(b"one\n").await.unwrap();
    assert_eq!(
        lines.next_line().await.unwrap().as_deref(),
        Some("echo-1 one")
    );

    // max_connections = 1: a second connection is closed at once, and counted.
    let mut second = TcpStream::connect(addr)
        .await
        .expect("accepted, then closed");
    let mut buf = [0u8; 8];
    let n = tokio::time::timeout(Duration::from_secs(5), second.read(&mut buf))
        .await
        .expect("closed at once")
        .unwrap_or(0);
    assert_eq!(n, 0);
    assert_eq!(
        f.metric("waymark_forwarder_connections_refused_total")
            .await,
        1.0
    );

    // SIGTERM: deregistered first (instance addresses again), the listener closed...
    f.signal(nix::sys::signal::Signal::SIGTERM);
    let instances = [echo.addr.ip()];
    until(
        "instance addresses once it deregistered",
        Duration::from_secs(5),
        || a_records(r.dns, "echo.mesh.internal."),
        |a| a[..] == instances[..],
    )
    .await;
    let _ = until(
        "the listener refuses",
        Duration::from_secs(5),
        || async {
            TcpStream::connect(addr)
                .await
                .map(|_| ())
                .map_err(|e| e.kind())
        },
        |r| *r == Err(std::io::ErrorKind::ConnectionRefused),
    )
    .await;
    // ...and the open connection goes on until its client ends it.
    wr.write_all(b"two\n").await.unwrap();
    assert_eq!(
        lines.next_line().await.unwrap().as_deref(),
        Some("echo-1 two")
    );
    let ended = Instant::now();
    wr.shutdown().await.unwrap();
    assert_eq!(
        lines.next_line().await.unwrap().as_deref(),
        Some("echo-1 bye")
    );
    let mut f = f;
    let (status, _) = tokio::task::spawn_blocking(move || {
        let out = f.terminate(Duration::from_secs(25));
        (out, f.log())
    })
    .await
    .map(|(out, log)| out.unwrap_or_else(|| panic!("did not exit; log:\n{log}")))
    .unwrap();
    assert!(status.success(), "{status:?}");
    assert!(
        ended.elapsed() < Duration::from_secs(5),
        "exited once its last connection ended, not at the drain deadline: {:?}",
        ended.elapsed()
    );
}

#[tokio::test]
async fn without_a_registry_it_is_live_but_not_ready_and_names_what_it_waits_for() {
    // A loopback port nobody listens on: the registry never answers.
    let (port, _udp, _tcp) = waymark_e2e::gateway::closed_port();
    let f = Forwarder::start_following(&format!("http://127.0.0.1:{port}"), "host-7", "");
    let live = reqwest::get(f.admin_url("/healthz/live"))
        .await
        .expect("admin");
    assert_eq!(live.status(), 200);
    let (status, body) = until(
        "readiness reports a failed poll",
        Duration::from_secs(10),
        || f.ready(),
        |(_, b)| b["registry_error"].is_string(),
    )
    .await;
    assert_eq!(status, 503, "{body}");
    let waiting: Vec<&str> = body["waiting_for"]
        .as_array()
        .expect("waiting_for")
        .iter()
        .filter_map(Value::as_str)
        .collect();
    assert_eq!(
        waiting,
        ["VIP listeners", "own registration", "registry state"],
        "{body}"
    );
    assert_eq!(body["registry"], "unreachable", "{body}");
    assert_eq!(f.metric("waymark_forwarder_registry_connected").await, 0.0);
    assert_eq!(
        f.metric("waymark_forwarder_registry_state_age_milliseconds")
            .await,
        -1.0
    );
}

#[tokio::test]
async fn only_idempotent_requests_are_retried_and_each_try_has_a_deadline() {
    let r = resolver(8);
    let api = Api::new(&r);
    // pay-a answers 503 to everything but its health check; pay-b answers 200.
    let a = Backend::start_on(GW_BACKEND, "pay-a", at(8, 1, 0), &["--status", "503"]);
    let b = Backend::start_on(GW_BACKEND, "pay-b", at(8, 2, a.addr.port()), &[]);
    for x in [&a, &b] {
        api.register(x.registration("payment", &[], json!({"waymark-protocol": "http"}), 0))
            .await;
    }
    // No ejection and a large budget: every 503 of pay-a meets the retry rule.
    let f = Forwarder::start(
        &r,
        "host-8",
        "[outlier]\nconsecutive_failures = 0\n[retry]\nbudget_reserve = 1000\n\
         [http]\nper_try_timeout = \"300ms\"\n",
    );
    let vip = vip_of(&r, "payment.mesh.internal.", 8).await;
    let base = format!("http://{}", SocketAddr::new(vip, a.addr.port()));
    let client = reqwest::Client::new();

    // GET (and DELETE) without a body: a 503 is retried on the other instance.
    for i in 0..40 {
        let req = if i % 2 == 0 {
            client.get(format!("{base}/"))
        } else {
            client.delete(format!("{base}/"))
        };
        let resp = req.send().await.expect("call");
        assert_eq!(resp.status(), 200, "request {i}");
        let v: Value = resp.json().await.unwrap();
        assert_eq!(v["id"], "pay-b");
    }
    let retries = "waymark_forwarder_retries_total{service=\"payment\"}";
    assert!(f.metric(retries).await >= 1.0);

    // POST with a body: never sent twice, so pay-a's 503 reaches the client.
    let mut unavailable = 0;
    for _ in 0..40 {
        let resp = client
            .post(format!("{base}/"))
            .body("an order")
            .send()
            .await
            .expect("call");
        match resp.status().as_u16() {
            200 => {}
            503 => unavailable += 1,
            other => panic!("unexpected {other}"),
        }
    }
    assert!(
        unavailable > 0,
        "some POSTs went to pay-a and were not retried"
    );

    // Each try has its deadline: both instances too slow, a 502 after two short tries.
    let before = f.metric(retries).await;
    let t0 = Instant::now();
    let resp = client
        .get(format!("{base}/?sleep_ms=3000"))
        .send()
        .await
        .expect("call");
    assert_eq!(resp.status(), 502);
    assert!(
        t0.elapsed() < Duration::from_millis(2500),
        "{:?}",
        t0.elapsed()
    );
    assert_eq!(
        f.metric(retries).await,
        before + 1.0,
        "one retry, on the other instance"
    );
}
