//! The gateway under failure, through its real interfaces: zero failed requests while backend
//! processes are killed and restarted, one is drained and routes are rebuilt; retries of 503s for idempotent
//! requests only; outlier ejection; graceful stop on SIGTERM.
//!
//! Every load loop is bounded in request count and in time.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use waymark_e2e::gateway::{Backend, Gateway};
use waymark_e2e::{until, Api, Resolver};

const BACKEND: &str = env!("CARGO_BIN_EXE_gw_backend");

fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap()
}

/// Outcome counts of a load run.
#[derive(Debug, Default)]
struct Tally {
    ok: AtomicU64,
    failed: AtomicU64,
}

/// Runs `workers` loops of GETs to `url` with `host` until `stop` is set, `max` requests
/// were sent in total, or `limit` passed. Every non-200 (or transport error) is a failure.
fn load(
    url: String,
    host: &'static str,
    workers: usize,
    max: u64,
    limit: Duration,
    stop: Arc<AtomicBool>,
) -> (Arc<Tally>, Vec<tokio::task::JoinHandle<Vec<String>>>) {
    let tally = Arc::new(Tally::default());
    let sent = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let tasks = (0..workers)
        .map(|_| {
            let (url, tally, sent, stop) = (url.clone(), tally.clone(), sent.clone(), stop.clone());
            tokio::spawn(async move {
                let c = client();
                let mut errors = Vec::new();
                while !stop.load(Ordering::Relaxed)
                    && started.elapsed() < limit
                    && sent.fetch_add(1, Ordering::Relaxed) < max
                {
                    match c.get(&url).header("host", host).send().await {
                        Ok(r) if r.status() == 200 => {
                            tally.ok.fetch_add(1, Ordering::Relaxed);
                        }
                        Ok(r) => {
                            tally.failed.fetch_add(1, Ordering::Relaxed);
                            let s = r.status();
                            errors.push(format!("{s}: {}", r.text().await.unwrap_or_default()));
                        }
                        Err(e) => {
                            tally.failed.fetch_add(1, Ordering::Relaxed);
                            errors.push(e.to_string());
                        }
                    }
                }
                errors
            })
        })
        .collect();
    (tally, tasks)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn zero_failed_requests_while_instances_die_and_drain() {
    let resolver = Resolver::start();
    let api = Api::new(&resolver);
    let mut backends: Vec<Backend> = (1..=3)
        .map(|i| Backend::start(BACKEND, &format!("web-{i}")))
        .collect();
    for b in &backends {
        api.register(b.registration("web", &[], json!({"waymark-public-host": "z.test"}), 200))
            .await;
    }
    let gw = Gateway::with_config(
        &resolver,
        "access_log = \"off\"\n[timeouts]\nconnect = \"300ms\"\n",
    );
    gw.wait_status(&client(), "z.test", "/", 200).await;

    let stop = Arc::new(AtomicBool::new(false));
    let (tally, tasks) = load(
        gw.url("/work?x=1"),
        "z.test",
        4,
        20_000,
        Duration::from_secs(40),
        stop.clone(),
    );
    let pause = || tokio::time::sleep(Duration::from_millis(700));
    pause().await;
    // Crash one instance (its check notices within the interval; until then connects fail
    // and the gateway retries elsewhere), bring it back.
    backends[0].kill();
    pause().await;
    backends[0].restart();
    pause().await;
    // Crash another and keep it down for a while.
    backends[1].kill();
    pause().await;
    pause().await;
    backends[1].restart();
    pause().await;
    // Drain one (maintenance), as a graceful shutdown would, then undrain it.
    api.put_empty("/v1/agent/service/maintenance/web-3?enable=true")
        .await;
    pause().await;
    api.put_empty("/v1/agent/service/maintenance/web-3?enable=false")
        .await;
    pause().await;
    // Routes rebuild while the load runs: another service exposes itself and goes away.
    let other = Backend::start(BACKEND, "other-1");
    api.register(other.registration(
        "other",
        &[],
        json!({"waymark-public-host": "other.test"}),
        0,
    ))
    .await;
    pause().await;
    api.put_empty("/v1/agent/service/deregister/other-1").await;
    pause().await;
    // Two at once, one after the other back.
    backends[0].kill();
    backends[2].kill();
    pause().await;
    backends[0].restart();
    backends[2].restart();
    pause().await;
    stop.store(true, Ordering::Relaxed);
    let mut errors = Vec::new();
    for t in tasks {
        errors.extend(t.await.unwrap());
    }
    let ok = tally.ok.load(Ordering::Relaxed);
    let failed = tally.failed.load(Ordering::Relaxed);
    assert!(ok > 200, "the load ran: {ok} ok");
    assert_eq!(
        failed,
        0,
        "failed requests: {:?}\ngateway log tail:\n{}",
        &errors[..errors.len().min(10)],
        tail(&gw.log())
    );
    let m = gw.metrics().await;
    assert!(m.contains("waymark_gateway_retries_total"), "{m}");
}

fn tail(s: &str) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(40)..].join("\n")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_503_only_for_idempotent_methods_and_ejects_the_outlier() {
    let resolver = Resolver::start();
    let api = Api::new(&resolver);
    let good = Backend::start(BACKEND, "good");
    let bad = Backend::with_args(BACKEND, "bad", &["--status", "503"]);
    for b in [&good, &bad] {
        api.register(b.registration("svc", &[], json!({"waymark-public-host": "r.test"}), 0))
            .await;
    }
    let gw = Gateway::with_config(
        &resolver,
        r#"
[retry]
attempts = 2
budget_ratio = 0.2
budget_reserve = 1000
[outlier]
consecutive_failures = 3
base_ejection = "30s"
max_ejected_ratio = 0.5
"#,
    );
    let c = client();
    gw.wait_status(&c, "r.test", "/", 200).await;
    // POST is not idempotent: a 503 from the bad instance is passed on, never retried.
    let mut post_503 = 0;
    for _ in 0..40 {
        let r = c
            .post(gw.url("/p"))
            .header("host", "r.test")
            .body("x")
            .send()
            .await
            .unwrap();
        if r.status() == 503 {
            post_503 += 1;
            let v: Value = r.json().await.unwrap();
            assert_eq!(v["id"], "bad", "the instance's own 503");
        }
        if post_503 > 0 {
            break;
        }
    }
    // Ejection may already have happened from the probes above; then POSTs see no 503.
    let ejected_early = gw
        .metrics()
        .await
        .contains("waymark_gateway_outlier_ejections_total{service=\"svc\"} 1");
    assert!(
        post_503 > 0 || ejected_early,
        "a POST reached the bad instance and got its 503"
    );
    // GET is idempotent: every one succeeds, retried on the good instance when needed.
    for _ in 0..60 {
        let r = c
            .get(gw.url("/g"))
            .header("host", "r.test")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        assert_eq!(r.json::<Value>().await.unwrap()["id"], "good");
    }
    // Three 503s in a row ejected the bad instance: afterwards nothing is retried.
    let m = gw.metrics().await;
    assert!(
        m.contains("waymark_gateway_outlier_ejections_total{service=\"svc\"} 1"),
        "{m}"
    );
    let retries_before = retries(&m);
    for _ in 0..20 {
        let r = c
            .post(gw.url("/p"))
            .header("host", "r.test")
            .body("x")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "the ejected instance gets no traffic");
    }
    assert_eq!(retries(&gw.metrics().await), retries_before);
    // Never more than half: the good one is not ejected however it fails.
    let r = c
        .get(gw.url("/g?status=500"))
        .header("host", "r.test")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 500, "a 500 is not retried");
}

fn retries(metrics: &str) -> u64 {
    metrics
        .lines()
        .filter(|l| l.starts_with("waymark_gateway_retries_total{"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_stops_gracefully_within_the_grace_period() {
    let resolver = Resolver::start();
    let api = Api::new(&resolver);
    let web = Backend::start(BACKEND, "web-1");
    api.register(web.registration("web", &[], json!({"waymark-public-host": "s.test"}), 0))
        .await;
    let mut gw = Gateway::with_config(
        &resolver,
        "[shutdown]\ngrace_period = \"2s\"\ntimeout = \"1s\"\n",
    );
    let c = client();
    let url_after = gw.url("/after");
    // A slow request in flight when SIGTERM arrives still completes.
    let slow = {
        let c = c.clone();
        let url = gw.url("/slow?sleep_ms=1000");
        tokio::spawn(async move {
            c.get(url)
                .header("host", "s.test")
                .send()
                .await
                .map(|r| r.status().as_u16())
        })
    };
    until(
        "slow request in flight",
        Duration::from_secs(5),
        || gw.metrics(),
        |m| m.contains("waymark_gateway_in_flight_requests 1"),
    )
    .await;
    let ((status, took), gw) = tokio::task::spawn_blocking(move || {
        let r = gw.terminate(Duration::from_secs(10));
        (r, gw)
    })
    .await
    .map(|(r, gw)| (r.expect("exited after SIGTERM"), gw))
    .unwrap();
    assert!(status.success(), "clean exit: {status:?}");
    assert!(took < Duration::from_secs(5), "took {took:?}");
    // New connections are refused once it has gone.
    assert!(c
        .get(url_after)
        .header("host", "s.test")
        .send()
        .await
        .is_err());
    assert_eq!(slow.await.unwrap().unwrap(), 200);
    // The access line of the request that finished during the drain was buffered, and the
    // exit wrote it.
    let log = gw.log();
    assert!(
        log.lines()
            .any(|l| l.contains("\"GET s.test/slow HTTP/1.1\" 200 route=")),
        "{log}"
    );
}

/// Sends raw bytes on a fresh connection, then closes it without reading much: a client that
/// gives up. Returns the first bytes of whatever answer came back within 2 s.
fn abort_after(addr: std::net::SocketAddr, bytes: &[u8]) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    let _ = s.write_all(bytes);
    let _ = s.shutdown(std::net::Shutdown::Write);
    let mut buf = [0u8; 64];
    let n = s.read(&mut buf).unwrap_or(0);
    String::from_utf8_lossy(&buf[..n]).to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_faults_neither_eject_instances_nor_spend_the_retry_budget() {
    let resolver = Resolver::start();
    let api = Api::new(&resolver);
    let a = Backend::start(BACKEND, "a");
    let b = Backend::start(BACKEND, "b");
    for x in [&a, &b] {
        api.register(x.registration("svc", &[], json!({"waymark-public-host": "c.test"}), 0))
            .await;
    }
    // Two failures in a row would eject; the budget holds two retries and earns none.
    let gw = Gateway::with_config(
        &resolver,
        r#"
[retry]
attempts = 2
budget_ratio = 0.0
budget_reserve = 2
[outlier]
consecutive_failures = 2
base_ejection = "60s"
max_ejected_ratio = 0.5
"#,
    );
    let c = client();
    gw.wait_status(&c, "c.test", "/", 200).await;
    let addr = gw.http;
    let answers = tokio::task::spawn_blocking(move || {
        let mut answers = Vec::new();
        for i in 0..6 {
            // An upload the client abandons: 100 kB announced, 10 bytes sent, then gone.
            answers.push(abort_after(
                addr,
                format!(
                    "PUT /upload/{i} HTTP/1.1\r\nHost: c.test\r\nContent-Length: 100000\r\n\r\n0123456789"
                )
                .as_bytes(),
            ));
            // A request the gateway cannot forward: Connection names Host.
            answers.push(abort_after(
                addr,
                b"GET /bad HTTP/1.1\r\nHost: c.test\r\nConnection: host\r\n\r\n",
            ));
        }
        answers
    })
    .await
    .unwrap();
    assert!(
        answers
            .iter()
            .skip(1)
            .step_by(2)
            .all(|a| a.starts_with("HTTP/1.1 400")),
        "{answers:?}"
    );
    let m = gw.metrics().await;
    assert!(
        !m.contains("waymark_gateway_outlier_ejections_total{"),
        "client faults ejected an instance:\n{m}"
    );
    assert!(
        m.contains("waymark_gateway_client_errors_total{reason="),
        "client faults are counted as such:\n{m}"
    );
    // Both instances still get traffic.
    let mut seen = std::collections::BTreeSet::new();
    for _ in 0..40 {
        let r = c
            .get(gw.url("/after"))
            .header("host", "c.test")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        seen.insert(
            r.json::<Value>().await.unwrap()["id"]
                .as_str()
                .unwrap()
                .to_string(),
        );
        if seen.len() == 2 {
            break;
        }
    }
    assert_eq!(
        seen.len(),
        2,
        "an instance stopped getting traffic: {seen:?}"
    );
    // The budget is untouched: a 503 is still retried (once per request, two in reserve).
    let before = retries(&gw.metrics().await);
    for _ in 0..2 {
        let r = c
            .get(gw.url("/x?status=503"))
            .header("host", "c.test")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 503);
    }
    assert_eq!(
        retries(&gw.metrics().await),
        before + 2,
        "the retry budget was spent by client faults"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn zero_failed_gets_while_instances_are_sigkilled_under_load() {
    let resolver = Resolver::start();
    let api = Api::new(&resolver);
    let mut backends: Vec<Backend> = (1..=3)
        .map(|i| Backend::start(BACKEND, &format!("k-{i}")))
        .collect();
    for b in &backends {
        api.register(b.registration("k", &[], json!({"waymark-public-host": "k.test"}), 200))
            .await;
    }
    // A small budget that earns nothing: retries of requests caught on connections to an
    // instance that just died must not depend on it.
    let gw = Gateway::with_config(
        &resolver,
        "access_log = \"off\"\n[timeouts]\nconnect = \"300ms\"\n[retry]\nbudget_ratio = 0.0\nbudget_reserve = 3\n",
    );
    gw.wait_status(&client(), "k.test", "/", 200).await;

    let stop = Arc::new(AtomicBool::new(false));
    let (tally, tasks) = load(
        gw.url("/kill?x=1"),
        "k.test",
        6,
        8_000,
        Duration::from_secs(12),
        stop.clone(),
    );
    // SIGKILL one instance at a time, every 600 ms, and bring it back: six kills.
    for round in 0..6 {
        tokio::time::sleep(Duration::from_millis(600)).await;
        let i = round % 3;
        backends[i].kill();
        tokio::time::sleep(Duration::from_millis(600)).await;
        backends[i].restart();
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, Ordering::Relaxed);
    let mut errors = Vec::new();
    for t in tasks {
        errors.extend(t.await.unwrap());
    }
    let ok = tally.ok.load(Ordering::Relaxed);
    let failed = tally.failed.load(Ordering::Relaxed);
    assert!(ok > 300, "the load ran: {ok} ok");
    assert_eq!(
        failed,
        0,
        "failed requests ({ok} ok): {:?}\ngateway log tail:\n{}",
        &errors[..errors.len().min(10)],
        tail(&gw.log())
    );
}
