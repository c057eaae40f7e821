//! Health transitions driven through real interfaces and observed over real DNS: HTTP checks
//! against a local HTTP server the test controls, TCP checks against a listener the test opens
//! and closes, TTL checks fed (or starved) through the API, hysteresis, deregistration of
//! long-critical instances, maintenance mode and the panic threshold.
//!
//! Every wait is a bounded poll; checks run every few hundred milliseconds.

use std::collections::VecDeque;
use std::fmt::Debug;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use hickory_proto::op::ResponseCode;
use hickory_proto::rr::{RData, RecordType};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::{JoinHandle, JoinSet};
use waymark_e2e::dns::{self, addresses};
use waymark_e2e::{ip, ips, tcp_listener, until, Api, Options, Resolver};

/// The longest any single transition may take; checks run every 200–500 ms.
const WAIT: Duration = Duration::from_secs(10);

/// A status that makes the check server never answer (the probe times out).
const HANG: u16 = 0;

/// A check's status and output from `GET /v1/agent/checks` ("absent" when it is not there).
async fn check(api: &Api, id: &str) -> (String, String) {
    let v: Value = api.get("/v1/agent/checks").await.json().await.unwrap();
    match v.get(id) {
        Some(c) => (
            c["Status"].as_str().unwrap().to_string(),
            c["Output"].as_str().unwrap().to_string(),
        ),
        None => ("absent".into(), String::new()),
    }
}

/// One look at an instance through every interface that shows its health.
#[derive(Debug, Clone)]
struct Seen {
    /// A records of the service.
    dns: Vec<IpAddr>,
    /// `?passing` instance IDs of the service.
    passing: Vec<String>,
    /// The check's status and output.
    status: String,
    output: String,
}

async fn seen(r: &Resolver, api: &Api, service: &str, check_id: &str) -> Seen {
    let dns = dns::a_records(r.dns, &format!("{service}.mesh.internal.")).await;
    let passing = api.passing_ids(service).await;
    let (status, output) = check(api, check_id).await;
    Seen {
        dns,
        passing,
        status,
        output,
    }
}

/// What the check server answers, and what it has answered.
#[derive(Default)]
struct Script {
    /// The status answered when `queue` is empty ([`HANG`]: no answer at all).
    default: u16,
    /// Statuses answered first, one per request.
    queue: VecDeque<u16>,
    /// Every status chosen, in the order requests came in.
    served: Vec<u16>,
}

/// A tiny HTTP/1.1 server for HTTP checks: answers every request with a status the test
/// switches, can be killed (connection refused) and started again on the same port.
struct CheckServer {
    addr: SocketAddr,
    script: Arc<Mutex<Script>>,
    task: Option<JoinHandle<()>>,
}

impl CheckServer {
    async fn start(status: u16) -> CheckServer {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().unwrap();
        let script = Arc::new(Mutex::new(Script {
            default: status,
            ..Default::default()
        }));
        let task = Some(tokio::spawn(serve_http(listener, script.clone())));
        CheckServer { addr, script, task }
    }

    fn url(&self) -> String {
        format!("http://{}/health", self.addr)
    }

    fn script(&self) -> MutexGuard<'_, Script> {
        self.script.lock().unwrap()
    }

    /// Answers `status` from now on (after anything queued).
    fn set(&self, status: u16) {
        self.script().default = status;
    }

    /// Answers these statuses to the next requests; returns how many were served before.
    fn queue(&self, statuses: &[u16]) -> usize {
        let mut s = self.script();
        s.queue.extend(statuses);
        s.served.len()
    }

    fn served(&self) -> Vec<u16> {
        self.script().served.clone()
    }

    /// How many of the latest answers in a row were `status`.
    fn trailing(&self, status: u16) -> usize {
        self.script()
            .served
            .iter()
            .rev()
            .take_while(|s| **s == status)
            .count()
    }

    /// Stops listening and drops every open connection: probes get connection refused.
    async fn kill(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
            let _ = task.await;
        }
    }

    /// Listens again on the same port.
    async fn restart(&mut self) {
        assert!(self.task.is_none(), "still running");
        for _ in 0..50 {
            if let Ok(listener) = TcpListener::bind(self.addr).await {
                self.task = Some(tokio::spawn(serve_http(listener, self.script.clone())));
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("cannot listen on {} again", self.addr);
    }
}

impl Drop for CheckServer {
    fn drop(&mut self) {
        if let Some(task) = &self.task {
            task.abort();
        }
    }
}

/// Accepts connections until aborted; aborting drops the listener and every connection.
async fn serve_http(listener: TcpListener, script: Arc<Mutex<Script>>) {
    let mut conns = JoinSet::new();
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                conns.spawn(answer_http(stream, script.clone()));
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
        }
        while conns.try_join_next().is_some() {}
    }
}

async fn answer_http(mut stream: TcpStream, script: Arc<Mutex<Script>>) {
    let mut head = Vec::new();
    let mut chunk = [0u8; 1024];
    let read_head = async {
        while !head.windows(4).any(|w| w == b"\r\n\r\n") {
            if head.len() > 16 * 1024 {
                return false;
            }
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => return false,
                Ok(n) => head.extend_from_slice(&chunk[..n]),
            }
        }
        true
    };
    if !matches!(
        tokio::time::timeout(Duration::from_secs(5), read_head).await,
        Ok(true)
    ) {
        return;
    }
    let status = {
        let mut s = script.lock().unwrap();
        let status = s.queue.pop_front().unwrap_or(s.default);
        s.served.push(status);
        status
    };
    if status == HANG {
        tokio::time::sleep(Duration::from_secs(30)).await;
        return;
    }
    let reason = match status {
        200 => "OK",
        429 => "Too Many Requests",
        500 => "Internal Server Error",
        503 => "Service Unavailable",
        _ => "Whatever",
    };
    let resp = format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Type: text/plain\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok"
    );
    let _ = stream.write_all(resp.as_bytes()).await;
    let _ = stream.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_check_follows_the_status_code_and_the_server_coming_and_going() {
    let r = Resolver::start();
    let api = Api::new(&r);
    let mut srv = CheckServer::start(200).await;
    api.register(json!({"Name": "web", "ID": "web-1", "Address": "127.0.1.1", "Port": 8080,
        "Check": {"CheckID": "web-1-http", "HTTP": srv.url(), "Interval": "300ms", "Timeout": "300ms"}}))
        .await;
    // A neighbour without checks: always answered, whatever happens to web-1.
    api.register(json!({"Name": "web", "ID": "web-2", "Address": "127.0.1.2", "Port": 8080}))
        .await;
    let both = ips(&["127.0.1.1", "127.0.1.2"]);
    let only_2 = ips(&["127.0.1.2"]);
    let look = || seen(&r, &api, "web", "web-1-http");

    let s = until("200 → passing", WAIT, look, |s: &Seen| {
        s.status == "passing" && s.dns == both && s.passing == ["web-1", "web-2"]
    })
    .await;
    assert!(s.output.contains("200"), "{s:?}");
    assert!(!srv.served().is_empty(), "the check probed our server");

    srv.set(429);
    let s = until("429 → warning", WAIT, look, |s: &Seen| {
        s.status == "warning" && s.passing == ["web-2"]
    })
    .await;
    assert_eq!(s.dns, both, "a warning instance is still answered: {s:?}");
    assert!(s.output.contains("429"), "{s:?}");

    srv.set(500);
    let s = until("500 → critical", WAIT, look, |s: &Seen| {
        s.status == "critical" && s.dns == only_2
    })
    .await;
    assert_eq!(s.passing, ["web-2"]);
    assert!(s.output.contains("500"), "{s:?}");
    // The instance is still registered, just not answered.
    let m = dns::udp(r.dns, "web-1.instance.web.mesh.internal.", RecordType::A).await;
    assert_eq!(m.metadata.response_code, ResponseCode::NoError);
    assert!(m.answers.is_empty(), "NODATA for a critical instance");

    srv.set(200);
    until("200 again → passing", WAIT, look, |s: &Seen| {
        s.status == "passing" && s.dns == both && s.passing == ["web-1", "web-2"]
    })
    .await;

    srv.kill().await;
    let s = until("server gone → critical", WAIT, look, |s: &Seen| {
        s.status == "critical" && s.dns == only_2
    })
    .await;
    assert!(
        s.output.to_lowercase().contains("refused"),
        "a refused connection is what failed: {s:?}"
    );

    srv.restart().await;
    until("server back → passing", WAIT, look, |s: &Seen| {
        s.status == "passing" && s.dns == both && s.passing == ["web-1", "web-2"]
    })
    .await;

    // A server that accepts but never answers fails by the check's timeout.
    srv.set(HANG);
    let s = until("no answer → critical", WAIT, look, |s: &Seen| {
        s.status == "critical" && s.dns == only_2
    })
    .await;
    assert!(s.output.contains("timed out"), "{s:?}");
    srv.set(200);
    until("answers again → passing", WAIT, look, |s: &Seen| {
        s.status == "passing" && s.dns == both
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_check_follows_a_listener_opening_and_closing() {
    let r = Resolver::start();
    let api = Api::new(&r);
    let (addr, listener) = tcp_listener("127.0.0.1:0").await;
    api.register(
        json!({"Name": "db", "ID": "db-1", "Address": "127.0.2.1", "Port": 5432,
        "Check": {"CheckID": "db-1-tcp", "TCP": addr.to_string(), "Interval": "200ms"}}),
    )
    .await;
    let look = || seen(&r, &api, "db", "db-1-tcp");
    let up = ips(&["127.0.2.1"]);

    let s = until("listening → passing", WAIT, look, |s: &Seen| {
        s.status == "passing" && s.dns == up && s.passing == ["db-1"]
    })
    .await;
    assert!(s.output.contains(&addr.to_string()), "{s:?}");

    listener.abort();
    let _ = listener.await;
    let s = until("closed → critical", WAIT, look, |s: &Seen| {
        s.status == "critical" && s.dns.is_empty() && s.passing.is_empty()
    })
    .await;
    assert!(s.output.to_lowercase().contains("refused"), "{s:?}");
    // A known service with nothing to answer is NODATA, not NXDOMAIN.
    let m = dns::udp(r.dns, "db.mesh.internal.", RecordType::A).await;
    assert_eq!(m.metadata.response_code, ResponseCode::NoError);

    let (_addr, listener) = tcp_listener(addr).await;
    until("listening again → passing", WAIT, look, |s: &Seen| {
        s.status == "passing" && s.dns == up && s.passing == ["db-1"]
    })
    .await;
    listener.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ttl_checks_pass_expire_warn_and_fail() {
    let r = Resolver::start();
    let api = Api::new(&r);
    api.register(
        json!({"Name": "worker", "ID": "w-1", "Address": "127.0.3.1", "Port": 1,
        "Check": {"CheckID": "w-1-ttl", "TTL": "1s"}}),
    )
    .await;
    api.register(
        json!({"Name": "worker", "ID": "w-2", "Address": "127.0.3.2", "Port": 1,
        "Check": {"CheckID": "w-2-ttl", "TTL": "60s"}}),
    )
    .await;
    let ok = |resp: reqwest::Response| assert_eq!(resp.status(), 200);

    // TTL checks start critical: nothing answered until the first heartbeat.
    let s = seen(&r, &api, "worker", "w-1-ttl").await;
    assert_eq!(s.status, "critical");
    assert!(s.dns.is_empty() && s.passing.is_empty(), "{s:?}");

    // A heartbeat is visible as soon as it is acknowledged.
    ok(api
        .put_empty("/v1/agent/check/pass/w-1-ttl?note=alive")
        .await);
    let s = seen(&r, &api, "worker", "w-1-ttl").await;
    assert_eq!(s.status, "passing");
    assert_eq!(s.output, "alive");
    assert_eq!(s.dns, ips(&["127.0.3.1"]));
    assert_eq!(s.passing, ["w-1"]);

    // Heartbeats well within the TTL keep it answered for several TTLs.
    let started = Instant::now();
    let mut beats = 0;
    while started.elapsed() < Duration::from_millis(2500) && beats < 50 {
        ok(api
            .put_empty("/v1/agent/check/pass/w-1-ttl?note=alive")
            .await);
        beats += 1;
        tokio::time::sleep(Duration::from_millis(250)).await;
        assert!(
            dns::a_records(r.dns, "worker.mesh.internal.")
                .await
                .contains(&ip("127.0.3.1")),
            "dropped while heartbeating (beat {beats})"
        );
    }

    // Without heartbeats it expires: gone from DNS after the TTL, within a margin.
    ok(api.put_empty("/v1/agent/check/pass/w-1-ttl").await);
    let last_beat = Instant::now();
    let s = until(
        "TTL expiry",
        Duration::from_secs(4),
        || seen(&r, &api, "worker", "w-1-ttl"),
        |s: &Seen| s.dns.is_empty(),
    )
    .await;
    let after = last_beat.elapsed();
    assert!(
        after >= Duration::from_millis(900),
        "expired after {after:?}, before its 1s TTL"
    );
    assert_eq!(s.status, "critical");
    assert!(s.output.contains("TTL expired"), "{s:?}");

    // warn: still answered, but not passing; fail: gone at once; update: back.
    ok(api
        .put_empty("/v1/agent/check/warn/w-2-ttl?note=slow%20disk")
        .await);
    let s = seen(&r, &api, "worker", "w-2-ttl").await;
    assert_eq!(
        (s.status.as_str(), s.output.as_str()),
        ("warning", "slow disk")
    );
    assert_eq!(s.dns, ips(&["127.0.3.2"]), "a warning instance is answered");
    assert!(s.passing.is_empty(), "but not as passing: {s:?}");

    ok(api
        .put_empty("/v1/agent/check/fail/w-2-ttl?note=down")
        .await);
    let s = seen(&r, &api, "worker", "w-2-ttl").await;
    assert_eq!((s.status.as_str(), s.output.as_str()), ("critical", "down"));
    assert!(s.dns.is_empty(), "{s:?}");

    ok(api
        .put(
            "/v1/agent/check/update/w-2-ttl",
            json!({"Status": "passing", "Output": "recovered"}),
        )
        .await);
    let s = seen(&r, &api, "worker", "w-2-ttl").await;
    assert_eq!(
        (s.status.as_str(), s.output.as_str()),
        ("passing", "recovered")
    );
    assert_eq!(s.dns, ips(&["127.0.3.2"]));
    assert_eq!(s.passing, ["w-2"]);

    // An expired check comes back with the next heartbeat.
    ok(api.put_empty("/v1/agent/check/pass/w-1-ttl").await);
    assert_eq!(
        dns::a_records(r.dns, "worker.mesh.internal.").await,
        ips(&["127.0.3.1", "127.0.3.2"])
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_failure_does_not_remove_an_instance_but_three_do() {
    let r = Resolver::with(Options {
        config: Some("[health]\nfailures_before_critical = 3\n".into()),
        ..Default::default()
    });
    let api = Api::new(&r);
    let steady = CheckServer::start(200).await;
    let twitchy = CheckServer::start(200).await;
    // h-1 follows the config (3 failures); h-2 overrides it with 1.
    api.register(
        json!({"Name": "flaky", "ID": "h-1", "Address": "127.0.4.1", "Port": 1,
        "Check": {"CheckID": "h-1-http", "HTTP": steady.url(), "Interval": "300ms"}}),
    )
    .await;
    api.register(
        json!({"Name": "flaky", "ID": "h-2", "Address": "127.0.4.2", "Port": 1,
        "Check": {"CheckID": "h-2-http", "HTTP": twitchy.url(), "Interval": "500ms",
            "FailuresBeforeCritical": 1}}),
    )
    .await;
    let h1 = ip("127.0.4.1");
    let h2 = ip("127.0.4.2");
    until(
        "both passing",
        WAIT,
        || dns::a_records(r.dns, "flaky.mesh.internal."),
        |d: &Vec<IpAddr>| *d == [h1, h2],
    )
    .await;

    // Two failures in a row, then success: h-1 is never dropped, though the failures were
    // seen (the check's output shows the 500 while its status stays passing).
    let base = steady.queue(&[500, 500]);
    let started = Instant::now();
    let mut saw_failure_while_passing = false;
    loop {
        assert!(
            started.elapsed() < WAIT,
            "the queued failures were never probed"
        );
        let d = dns::a_records(r.dns, "flaky.mesh.internal.").await;
        assert!(
            d.contains(&h1),
            "dropped after fewer than 3 failures; served {:?}",
            &steady.served()[base..]
        );
        let (status, output) = check(&api, "h-1-http").await;
        assert_eq!(status, "passing", "{output}");
        saw_failure_while_passing |= output.contains("500");
        let served = steady.served();
        if served.len() >= base + 4 {
            assert_eq!(served[base..base + 2], [500, 500]);
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(
        saw_failure_while_passing,
        "the failed probes were never reported"
    );

    // Failing for good: dropped, but only after the third failure.
    steady.set(500);
    let started = Instant::now();
    loop {
        assert!(started.elapsed() < WAIT, "never dropped");
        let d = dns::a_records(r.dns, "flaky.mesh.internal.").await;
        if !d.contains(&h1) {
            let failures = steady.trailing(500);
            assert!(
                failures >= 3,
                "dropped after {failures} failures; served {:?}",
                steady.served()
            );
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(check(&api, "h-1-http").await.0, "critical");
    assert_eq!(dns::a_records(r.dns, "flaky.mesh.internal.").await, [h2]);

    // The per-check override wins over the config: h-2 goes at its first failure, long
    // before a third one is even probed (its probes are 500 ms apart).
    twitchy.set(500);
    let started = Instant::now();
    loop {
        assert!(started.elapsed() < WAIT, "h-2 never dropped");
        let d = dns::a_records(r.dns, "flaky.mesh.internal.").await;
        let failures = twitchy.trailing(500);
        if !d.contains(&h2) {
            assert!(
                (1..3).contains(&failures),
                "dropped after {failures} probes served 500 (expected the first)"
            );
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(check(&api, "h-2-http").await.0, "critical");
    let m = dns::udp(r.dns, "flaky.mesh.internal.", RecordType::A).await;
    assert!(m.answers.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn success_before_passing_holds_back_a_recovering_instance() {
    let r = Resolver::start();
    let api = Api::new(&r);
    let slow = CheckServer::start(500).await;
    let quick = CheckServer::start(500).await;
    // r-1 needs 3 successes in a row to pass; r-2 (default) needs one.
    api.register(
        json!({"Name": "rising", "ID": "r-1", "Address": "127.0.5.1", "Port": 1,
        "Check": {"CheckID": "r-1-http", "HTTP": slow.url(), "Interval": "300ms",
            "SuccessBeforePassing": 3}}),
    )
    .await;
    api.register(
        json!({"Name": "rising", "ID": "r-2", "Address": "127.0.5.2", "Port": 1,
        "Check": {"CheckID": "r-2-http", "HTTP": quick.url(), "Interval": "500ms"}}),
    )
    .await;
    let r1 = ip("127.0.5.1");
    let r2 = ip("127.0.5.2");
    until(
        "both probed and failing",
        WAIT,
        || async { (slow.served().len(), quick.served().len()) },
        |n: &(usize, usize)| n.0 >= 2 && n.1 >= 1,
    )
    .await;
    assert!(dns::a_records(r.dns, "rising.mesh.internal.")
        .await
        .is_empty());

    // Two successes, then failures again: r-1 never comes up, though the successes were
    // seen (the output shows the 200 while the status stays critical).
    let base = slow.queue(&[200, 200]);
    let started = Instant::now();
    let mut saw_success_while_critical = false;
    loop {
        assert!(
            started.elapsed() < WAIT,
            "the queued successes were never probed"
        );
        let d = dns::a_records(r.dns, "rising.mesh.internal.").await;
        assert!(
            !d.contains(&r1),
            "answered after fewer than 3 successes; served {:?}",
            &slow.served()[base..]
        );
        let (status, output) = check(&api, "r-1-http").await;
        assert_eq!(status, "critical", "{output}");
        saw_success_while_critical |= output.contains("200");
        let served = slow.served();
        if served.len() >= base + 4 {
            assert_eq!(served[base..base + 2], [200, 200]);
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(
        saw_success_while_critical,
        "the successful probes were never reported"
    );

    // Passing for good: answered, but only after the third success in a row.
    slow.set(200);
    let started = Instant::now();
    loop {
        assert!(started.elapsed() < WAIT, "never answered");
        let d = dns::a_records(r.dns, "rising.mesh.internal.").await;
        if d.contains(&r1) {
            let successes = slow.trailing(200);
            assert!(
                successes >= 3,
                "answered after {successes} successes; served {:?}",
                slow.served()
            );
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(check(&api, "r-1-http").await.0, "passing");
    assert_eq!(api.passing_ids("rising").await, ["r-1"]);

    // Without the setting, one success is enough.
    quick.set(200);
    let started = Instant::now();
    loop {
        assert!(started.elapsed() < WAIT, "r-2 never answered");
        let d = dns::a_records(r.dns, "rising.mesh.internal.").await;
        let successes = quick.trailing(200);
        if d.contains(&r2) {
            assert!(
                (1..3).contains(&successes),
                "answered after {successes} probes served 200 (expected the first)"
            );
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(
        dns::a_records(r.dns, "rising.mesh.internal.").await,
        [r1, r2]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn long_critical_instances_are_deregistered() {
    let r = Resolver::start();
    let api = Api::new(&r);
    let mut srv = CheckServer::start(200).await;
    let t0 = Instant::now();
    // Never passes: critical from the start.
    api.register(
        json!({"Name": "reap", "ID": "never", "Address": "127.0.6.1", "Port": 1,
        "Check": {"CheckID": "never-ttl", "TTL": "60s", "DeregisterCriticalServiceAfter": "1s"}}),
    )
    .await;
    // Passes; fails later through the API.
    api.register(
        json!({"Name": "reap", "ID": "later", "Address": "127.0.6.2", "Port": 1,
        "Check": {"CheckID": "later-ttl", "TTL": "60s", "Status": "passing",
            "DeregisterCriticalServiceAfter": "1s"}}),
    )
    .await;
    // An HTTP check whose server goes away.
    api.register(
        json!({"Name": "reap-web", "ID": "web", "Address": "127.0.6.3", "Port": 1,
        "Check": {"CheckID": "web-http", "HTTP": srv.url(), "Interval": "200ms",
            "DeregisterCriticalServiceAfter": "1s"}}),
    )
    .await;
    // Critical for good, but nobody asked for it to be reaped.
    api.register(
        json!({"Name": "reap", "ID": "kept", "Address": "127.0.6.4", "Port": 1,
        "Check": {"CheckID": "kept-ttl", "TTL": "60s"}}),
    )
    .await;
    let all = ["kept", "later", "never", "web"];
    assert_eq!(api.registered_ids().await, all);
    until(
        "web passing",
        WAIT,
        || dns::a_records(r.dns, "reap-web.mesh.internal."),
        |d: &Vec<IpAddr>| *d == [ip("127.0.6.3")],
    )
    .await;

    // web's server dies now; its reaping overlaps the others'.
    srv.kill().await;

    let ids = until(
        "the never-passing instance reaped",
        WAIT,
        || api.registered_ids(),
        |ids: &Vec<String>| !ids.contains(&"never".to_string()),
    )
    .await;
    assert!(
        t0.elapsed() >= Duration::from_secs(1),
        "reaped after {:?}, before DeregisterCriticalServiceAfter",
        t0.elapsed()
    );
    assert!(
        ids.contains(&"later".to_string()),
        "a passing instance was reaped: {ids:?}"
    );
    assert_eq!(check(&api, "never-ttl").await.0, "absent");
    let m = dns::udp(r.dns, "never.instance.reap.mesh.internal.", RecordType::A).await;
    assert_eq!(m.metadata.response_code, ResponseCode::NXDomain);

    // Passing for over a second does not count: it is the time critical that does.
    let failed = Instant::now();
    let resp = api.put_empty("/v1/agent/check/fail/later-ttl").await;
    assert_eq!(resp.status(), 200);
    until(
        "the failed instance reaped",
        WAIT,
        || api.registered_ids(),
        |ids: &Vec<String>| !ids.contains(&"later".to_string()),
    )
    .await;
    assert!(
        failed.elapsed() >= Duration::from_secs(1),
        "reaped {:?} after failing",
        failed.elapsed()
    );
    until(
        "the instance whose server died reaped",
        WAIT,
        || api.registered_ids(),
        |ids: &Vec<String>| *ids == ["kept"],
    )
    .await;
    let m = dns::udp(r.dns, "reap-web.mesh.internal.", RecordType::A).await;
    assert_eq!(
        m.metadata.response_code,
        ResponseCode::NXDomain,
        "the service is gone with its last instance"
    );

    // The one without DeregisterCriticalServiceAfter has been critical all along and stays.
    assert_eq!(check(&api, "kept-ttl").await.0, "critical");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn maintenance_drains_an_instance_and_disabling_brings_it_back() {
    let r = Resolver::start();
    let api = Api::new(&r);
    for n in 1..=2 {
        api.register(json!({"Name": "api", "ID": format!("api-{n}"),
            "Address": format!("127.0.7.{n}"), "Port": 80, "Tags": ["v1"]}))
            .await;
    }
    let both = ips(&["127.0.7.1", "127.0.7.2"]);
    assert_eq!(dns::a_records(r.dns, "api.mesh.internal.").await, both);
    let ok = |resp: reqwest::Response| assert_eq!(resp.status(), 200);

    ok(api
        .put_empty("/v1/agent/service/maintenance/api-1?enable=true&reason=deploy%2042")
        .await);
    // Acknowledged means drained: no wait needed.
    assert_eq!(
        dns::a_records(r.dns, "api.mesh.internal.").await,
        ips(&["127.0.7.2"])
    );
    assert_eq!(
        dns::a_records(r.dns, "v1.api.mesh.internal.").await,
        ips(&["127.0.7.2"])
    );
    let m = dns::udp(r.dns, "api-1.instance.api.mesh.internal.", RecordType::A).await;
    assert_eq!(m.metadata.response_code, ResponseCode::NoError);
    assert!(m.answers.is_empty(), "a draining instance is NODATA");
    let m = dns::udp(r.dns, "api.mesh.internal.", RecordType::SRV).await;
    assert_eq!(m.answers.len(), 1);
    assert_eq!(api.passing_ids("api").await, ["api-2"]);
    let (status, _) = check(&api, "_service_maintenance:api-1").await;
    assert_eq!(status, "critical");
    let all: Value = api
        .get("/v1/health/service/api")
        .await
        .json()
        .await
        .unwrap();
    let entry = all
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["Service"]["ID"] == "api-1")
        .expect("still registered");
    let maint = entry["Checks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["CheckID"] == "_service_maintenance:api-1")
        .expect("maintenance check");
    assert_eq!(maint["Notes"], "deploy 42");

    // Re-registering (as client libraries do) does not undo an operator's drain.
    api.register(
        json!({"Name": "api", "ID": "api-1", "Address": "127.0.7.1", "Port": 80,
        "Tags": ["v1"]}),
    )
    .await;
    assert_eq!(
        dns::a_records(r.dns, "api.mesh.internal.").await,
        ips(&["127.0.7.2"])
    );

    ok(api
        .put_empty("/v1/agent/service/maintenance/api-1?enable=false")
        .await);
    assert_eq!(dns::a_records(r.dns, "api.mesh.internal.").await, both);
    assert_eq!(api.passing_ids("api").await, ["api-1", "api-2"]);
    assert_eq!(check(&api, "_service_maintenance:api-1").await.0, "absent");
    let m = dns::udp(r.dns, "api-1.instance.api.mesh.internal.", RecordType::A).await;
    assert_eq!(addresses(&m), ips(&["127.0.7.1"]));

    // Draining every instance leaves a service with nothing to answer.
    for n in 1..=2 {
        ok(api
            .put_empty(&format!(
                "/v1/agent/service/maintenance/api-{n}?enable=true"
            ))
            .await);
    }
    let m = dns::udp(r.dns, "api.mesh.internal.", RecordType::A).await;
    assert_eq!(m.metadata.response_code, ResponseCode::NoError);
    assert!(m.answers.is_empty());
    let resp = api
        .put_empty("/v1/agent/service/maintenance/nope?enable=true")
        .await;
    assert_eq!(resp.status(), 404);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn panic_threshold_answers_all_non_draining_instances() {
    let r = Resolver::with(Options {
        config: Some("[services.payment]\npanic_threshold = 0.5\n".into()),
        ..Default::default()
    });
    let api = Api::new(&r);
    for n in 1..=4 {
        api.register(json!({"Name": "payment", "ID": format!("p{n}"),
            "Address": format!("127.0.8.{n}"), "Port": 9000,
            "Check": {"CheckID": format!("p{n}-ttl"), "TTL": "60s", "Status": "passing"}}))
            .await;
    }
    // A service without a threshold, mostly critical: only its healthy instance answers.
    for n in 1..=3 {
        let status = if n == 1 { "passing" } else { "critical" };
        api.register(json!({"Name": "ledger", "ID": format!("l{n}"),
            "Address": format!("127.0.9.{n}"), "Port": 80,
            "Check": {"CheckID": format!("l{n}-ttl"), "TTL": "60s", "Status": status}}))
            .await;
    }
    let ok = |resp: reqwest::Response| assert_eq!(resp.status(), 200);
    let pay = |list: &[u8]| -> Vec<IpAddr> {
        list.iter()
            .map(|n| format!("127.0.8.{n}").parse().unwrap())
            .collect()
    };
    let payment = || dns::a_records(r.dns, "payment.mesh.internal.");

    assert_eq!(payment().await, pay(&[1, 2, 3, 4]));
    assert_eq!(
        dns::a_records(r.dns, "ledger.mesh.internal.").await,
        ips(&["127.0.9.1"])
    );

    // p4 drains: never answered from here on, panic or not.
    ok(api
        .put_empty("/v1/agent/service/maintenance/p4?enable=true")
        .await);
    assert_eq!(payment().await, pay(&[1, 2, 3]));

    // 2 of 3 non-draining healthy: at or above half, only the healthy ones.
    ok(api.put_empty("/v1/agent/check/fail/p1-ttl").await);
    assert_eq!(payment().await, pay(&[2, 3]));

    // 1 of 3 healthy: below half, so every non-draining instance is answered.
    ok(api.put_empty("/v1/agent/check/fail/p2-ttl").await);
    assert_eq!(payment().await, pay(&[1, 2, 3]));
    let m = dns::udp(r.dns, "payment.mesh.internal.", RecordType::SRV).await;
    let mut targets: Vec<String> = m
        .answers
        .iter()
        .map(|a| match &a.data {
            RData::SRV(s) => s.target.to_string(),
            other => panic!("not SRV: {other:?}"),
        })
        .collect();
    targets.sort();
    assert_eq!(
        targets,
        [
            "p1.instance.payment.mesh.internal.",
            "p2.instance.payment.mesh.internal.",
            "p3.instance.payment.mesh.internal."
        ]
    );
    // The health API is not in panic: it reports what is really passing.
    assert_eq!(api.passing_ids("payment").await, ["p3"]);

    // None healthy: still every non-draining instance, still never the draining one, even
    // when it is the only one whose check passes.
    ok(api.put_empty("/v1/agent/check/fail/p3-ttl").await);
    assert_eq!(payment().await, pay(&[1, 2, 3]));
    for _ in 0..20 {
        assert!(
            !payment().await.contains(&ip("127.0.8.4")),
            "a draining instance answered"
        );
    }

    // p4 back from maintenance, but critical: it joins the panic set.
    ok(api.put_empty("/v1/agent/check/fail/p4-ttl").await);
    ok(api
        .put_empty("/v1/agent/service/maintenance/p4?enable=false")
        .await);
    assert_eq!(payment().await, pay(&[1, 2, 3, 4]));

    // 2 of 4 healthy is exactly half: out of panic, only the healthy ones.
    ok(api.put_empty("/v1/agent/check/pass/p1-ttl").await);
    assert_eq!(
        payment().await,
        pay(&[1, 2, 3, 4]),
        "1 of 4: still in panic"
    );
    ok(api.put_empty("/v1/agent/check/pass/p2-ttl").await);
    assert_eq!(payment().await, pay(&[1, 2]));
    // Warning instances count as healthy.
    ok(api.put_empty("/v1/agent/check/warn/p3-ttl").await);
    assert_eq!(payment().await, pay(&[1, 2, 3]));

    // The other service never panicked.
    assert_eq!(
        dns::a_records(r.dns, "ledger.mesh.internal.").await,
        ips(&["127.0.9.1"])
    );
}
