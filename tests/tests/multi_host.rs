//! Several hosts (network namespaces joined by a bridge in a namespace of its own, see
//! `tests/src/hosts.rs`): the registry's resolver on h1, `payment` instances on h1 and h2, a
//! caller on h3 whose system resolver points at h1. Plain names work across hosts with no
//! client library: glibc's resolver (`getent`) finds both instances and curl reaches them,
//! registrations made from other hosts are answered at once, and an instance that drains is
//! not called again.
//!
//! With a forwarder on every host (in the mesh, with the registry's join token), a caller
//! resolves a service to its VIP and its own host's forwarder carries each call to an
//! instance on another host through that host's forwarder, over mutual TLS: one handshake
//! per pair of hosts, a dead instance skipped without a failed call, and a service whose
//! policy names its callers refused to the others. Certificates that last seconds are
//! renewed under load without a failed call.

use std::net::SocketAddr;
use std::time::Duration;

use waymark_e2e::etcd::EtcdCluster;
use waymark_e2e::hosts::{host_addr, Hosts};
use waymark_e2e::process::Proc;
use waymark_e2e::{Options, Resolver};

const BACKEND: &str = env!("CARGO_BIN_EXE_gw_backend");
const LINE_ECHO: &str = env!("CARGO_BIN_EXE_line_echo");

/// A gw_backend on host `i` at `addr`.
fn backend(hosts: &Hosts, i: usize, addr: SocketAddr, id: &str) -> Proc {
    server(hosts, i, BACKEND, "gw_backend", addr, id)
}

/// One of the test servers (`gw_backend`, `line_echo`) on host `i` at `addr`.
fn server(hosts: &Hosts, i: usize, bin: &str, name: &str, addr: SocketAddr, id: &str) -> Proc {
    let mut cmd = hosts.command(i, bin);
    cmd.args(["--addr", &addr.to_string(), "--id", id]);
    let (proc, _) = Proc::spawn(
        cmd,
        id,
        &hosts.dir().join(format!("{id}.log")),
        &format!("{name} listening "),
        Duration::from_secs(10),
    )
    .expect("server starts");
    proc
}

/// Registers an instance from host `i` with the registry's API at `api`.
fn register(hosts: &Hosts, i: usize, api: SocketAddr, id: &str, addr: SocketAddr) {
    register_as(hosts, i, api, "payment", id, addr, "{}");
}

/// Registers an instance of `service` with this `Meta` (JSON).
fn register_as(
    hosts: &Hosts,
    i: usize,
    api: SocketAddr,
    service: &str,
    id: &str,
    addr: SocketAddr,
    meta: &str,
) {
    // TCP services get a TCP check, HTTP ones an HTTP check.
    let check = if service == "echo" {
        format!(r#"{{"TCP":"{addr}","Interval":"1s","Status":"passing"}}"#)
    } else {
        format!(r#"{{"HTTP":"http://{addr}/health","Interval":"1s","Status":"passing"}}"#)
    };
    let body = format!(
        r#"{{"ID":"{id}","Name":"{service}","Address":"{}","Port":{},"Meta":{meta},"Check":{check}}}"#,
        addr.ip(),
        addr.port()
    );
    hosts.sh(
        i,
        &format!(
            "curl -sf --max-time 10 -X PUT -d '{body}' http://{api}/v1/agent/service/register"
        ),
    );
}

#[test]
fn a_caller_on_a_third_host_finds_and_reaches_instances_on_two_others_by_name() {
    let Some(hosts) = Hosts::new(&["h1", "h2", "h3"]) else {
        return;
    };
    let registry = host_addr(1);
    let r = Resolver::with(Options {
        wrapper: hosts.wrapper(0),
        dns_addr: Some(SocketAddr::new(registry.into(), 53)),
        http_addr: Some(SocketAddr::new(registry.into(), 8500)),
        // The mesh's hosts are this resolver's clients: answered in full, not rate-limited.
        config: Some("[dns]\nlocal_clients = [\"10.77.0.0/24\", \"127.0.0.0/8\"]\n".into()),
        ..Options::default()
    });
    let p1: SocketAddr = SocketAddr::new(host_addr(1).into(), 9000);
    let p2: SocketAddr = SocketAddr::new(host_addr(2).into(), 9000);
    let _b1 = backend(&hosts, 0, p1, "payment-1");
    let _b2 = backend(&hosts, 1, p2, "payment-2");
    register(&hosts, 0, r.http, "payment-1", p1);
    // From h2, over the bridge: a host registers its own instance.
    register(&hosts, 1, r.http, "payment-2", p2);

    hosts.set_nameserver(2, registry);
    let found = hosts.sh(
        2,
        "getent ahostsv4 payment.mesh.internal | awk '{print $1}' | sort -u",
    );
    assert_eq!(found.trim(), "10.77.0.1\n10.77.0.2", "{found}");
    let calls = "for i in $(seq 1 20); do curl -sf --max-time 5 http://payment.mesh.internal:9000/; echo; done";
    let seen = hosts.sh(2, calls);
    // glibc sorts the addresses (RFC 6724: the longest prefix shared with the caller's own
    // address first), so a caller may well always pick one instance: what matters is that
    // every call reaches one.
    assert_eq!(
        seen.lines()
            .filter(|l| l.contains("\"id\":\"payment-"))
            .count(),
        20,
        "{seen}"
    );

    // payment-2 drains (maintenance, set from its own host): every new call goes to payment-1
    // at once, because the caller resolves again and DNS never answers a draining instance.
    hosts.sh(
        1,
        &format!("curl -sf --max-time 10 -X PUT 'http://{}/v1/agent/service/maintenance/payment-2?enable=true'", r.http),
    );
    let seen = hosts.sh(2, calls);
    assert_eq!(seen.matches("\"id\":\"payment-1\"").count(), 20, "{seen}");
}

/// A forwarder in the mesh on host `i` (named `h<i+1>`), its admin and inbound listeners on
/// the host's address; returns once it is ready (certificate, listeners, registration).
fn forwarder(
    hosts: &Hosts,
    i: usize,
    registry: SocketAddr,
    token: &str,
    config: &str,
) -> (Proc, SocketAddr) {
    let name = format!("h{}", i + 1);
    let addr = host_addr(i + 1);
    let file = hosts.dir().join(format!("{name}-forwarder.toml"));
    std::fs::write(
        &file,
        format!("{config}\n[shutdown]\ndrain_timeout = \"1s\"\n"),
    )
    .unwrap();
    let mut cmd = hosts.command(i, waymark_e2e::gateway::gateway_bin());
    cmd.args(["forwarder", "--config"])
        .arg(&file)
        .args(["--registry", &format!("http://{registry}")])
        .args(["--admin-addr", &format!("{addr}:0")])
        .args(["--host-name", &name])
        .args(["--advertise-address", &addr.to_string()])
        .args(["--inbound-addr", &format!("{addr}:0")])
        .args(["--join-token", token])
        .arg("--state-dir")
        .arg(hosts.dir().join(format!("{name}-state")))
        .env("RUST_LOG", "info,waymark_gateway=debug");
    let (proc, announced) = Proc::spawn(
        cmd,
        &name,
        &hosts.dir().join(format!("{name}-forwarder.log")),
        "waymark-gateway forwarder listening ",
        Duration::from_secs(60),
    )
    .expect("forwarder starts");
    let admin = announced.need("admin").unwrap();
    announced
        .need("inbound")
        .expect("in the mesh, an inbound listener");
    hosts.sh(
        i,
        &format!(
            "for n in $(seq 1 250); do curl -sf --max-time 2 http://{admin}/healthz/ready >/dev/null && exit 0; sleep 0.1; done; exit 1"
        ),
    );
    (proc, admin)
}

/// The registry on h1 (with this extra config), answering VIPs to every host, and its join
/// token.
fn mesh_registry(hosts: &Hosts, config: &str) -> (Resolver, String) {
    let registry = host_addr(1);
    let r = Resolver::with(Options {
        wrapper: hosts.wrapper(0),
        dns_addr: Some(SocketAddr::new(registry.into(), 53)),
        http_addr: Some(SocketAddr::new(registry.into(), 8500)),
        // One registry for every host, each with its forwarder: VIPs for all of them.
        extra_args: vec!["--vip-answers".into(), "all".into()],
        config: Some(format!(
            "[dns]\nlocal_clients = [\"10.77.0.0/24\", \"127.0.0.0/8\"]\n{config}"
        )),
        ..Options::default()
    });
    let out = std::process::Command::new(waymark_e2e::resolver_bin())
        .args(["ca", "join-token", "--data-dir"])
        .arg(&r.data_dir)
        .output()
        .unwrap();
    let token = String::from_utf8_lossy(&out.stdout).trim().to_string();
    assert!(!token.is_empty(), "{out:?}");
    (r, token)
}

/// The value of one series in a forwarder's metrics, read on its host.
fn metric(hosts: &Hosts, i: usize, admin: SocketAddr, series: &str) -> f64 {
    let text = hosts.sh(i, &format!("curl -sf --max-time 5 http://{admin}/metrics"));
    waymark_e2e::forwarder::metric_value(&text, series)
}

#[test]
fn forwarders_carry_calls_between_hosts_over_mutual_tls() {
    let Some(hosts) = Hosts::new(&["h1", "h2", "h3"]) else {
        return;
    };
    let registry = host_addr(1);
    let (r, token) = mesh_registry(&hosts, "");

    let p1 = SocketAddr::new(host_addr(1).into(), 9000);
    let p2 = SocketAddr::new(host_addr(2).into(), 9000);
    let l2 = SocketAddr::new(host_addr(2).into(), 9100);
    let _b1 = backend(&hosts, 0, p1, "payment-1");
    let mut b2 = backend(&hosts, 1, p2, "payment-2");
    let _l2 = backend(&hosts, 1, l2, "ledger-2");
    register(&hosts, 0, r.http, "payment-1", p1);
    register(&hosts, 1, r.http, "payment-2", p2);
    let http = r#"{"waymark-protocol":"http"}"#;
    register_as(&hosts, 1, r.http, "ledger", "ledger-2", l2, http);
    // A plain TCP service (a line echo) on h2 too.
    let e2 = SocketAddr::new(host_addr(2).into(), 7000);
    let _e2 = server(&hosts, 1, LINE_ECHO, "line_echo", e2, "echo-2");
    register_as(&hosts, 1, r.http, "echo", "echo-2", e2, "{}");

    // h2's policy: only h1 may call its ledger instances.
    let (_f1, a1) = forwarder(&hosts, 0, r.http, &token, "");
    let (mut f2, a2) = forwarder(&hosts, 1, r.http, &token, "[mesh.allow]\nledger = [\"h1\"]");
    let (_f3, a3) = forwarder(&hosts, 2, r.http, &token, "");

    // h3 resolves the service to its VIP, which its own forwarder serves.
    hosts.set_nameserver(2, registry);
    let vip = hosts.sh(
        2,
        "getent ahostsv4 payment.mesh.internal | awk '{print $1}' | sort -u",
    );
    assert!(vip.trim().starts_with("127.77."), "a VIP: {vip}");
    assert_eq!(vip.trim().lines().count(), 1, "{vip}");
    let calls = "for i in $(seq 1 30); do curl -sf --max-time 5 http://payment.mesh.internal:9000/ || echo FAILED; echo; done";
    let seen = hosts.sh(2, calls);
    assert!(!seen.contains("FAILED"), "{seen}");
    for id in ["payment-1", "payment-2"] {
        assert!(
            seen.contains(&format!("\"id\":\"{id}\"")),
            "{id} called: {seen}"
        );
    }
    // Every call from h3 went through the other hosts' forwarders, one handshake each.
    for (peer, admin, i) in [("h1", a1, 0), ("h2", a2, 1)] {
        let ok = metric(
            &hosts,
            2,
            a3,
            &format!("waymark_forwarder_peer_streams_total{{host=\"{peer}\",result=\"ok\"}}"),
        );
        assert!(ok >= 1.0, "streams to {peer}: {ok}");
        let handshakes = metric(
            &hosts,
            2,
            a3,
            &format!("waymark_forwarder_peer_handshakes_total{{host=\"{peer}\"}}"),
        );
        assert_eq!(handshakes, 1.0, "one mutual-TLS connection to {peer}");
        let admitted = metric(
            &hosts,
            i,
            admin,
            "waymark_forwarder_inbound_streams_total{host=\"h3\",result=\"admitted\"}",
        );
        assert_eq!(admitted, ok, "{peer} admitted what h3 opened");
    }
    assert_eq!(
        metric(&hosts, 2, a3, "waymark_forwarder_unmeshed_connects_total"),
        0.0
    );

    // The TCP service, by name from h3 (bash's /dev/tcp resolves through the system
    // resolver): a line goes there and back.
    let echo = hosts.sh(
        2,
        "bash -c 'exec 3<>/dev/tcp/echo.mesh.internal/7000; echo hello >&3; read -r line <&3; echo \"$line\"'",
    );
    assert_eq!(echo.trim(), "echo-2 hello");

    // payment-2 dies without a word: the calls go on, none fails.
    b2.kill();
    let seen = hosts.sh(2, calls);
    assert!(!seen.contains("FAILED"), "{seen}");
    assert_eq!(seen.matches("\"id\":\"payment-1\"").count(), 30, "{seen}");

    // The ledger on h2 admits h1's forwarder only: h3 gets 403 from its own forwarder.
    hosts.set_nameserver(0, registry);
    let code =
        "curl -s --max-time 5 -o /dev/null -w '%{http_code}' http://ledger.mesh.internal:9100/";
    let from_h1 = hosts.sh(0, code);
    assert_eq!(from_h1, "200");
    let from_h3 = hosts.sh(2, code);
    assert_eq!(from_h3, "403");
    let forbidden = metric(
        &hosts,
        1,
        a2,
        "waymark_forwarder_inbound_streams_total{host=\"h3\",result=\"forbidden\"}",
    );
    assert!(forbidden >= 1.0, "{forbidden}");

    // payment-2 is back; then h2's forwarder dies without deregistering (its registration
    // still passes for a while). From h1, whose forwarder has not ejected payment-2, every
    // call still goes through: the tunnel to h2 fails and the call goes to payment-1.
    let _b2 = backend(&hosts, 1, p2, "payment-2");
    hosts.sh(
        0,
        &format!("for n in $(seq 1 100); do curl -sf 'http://{}/v1/health/service/payment?passing' | grep -q payment-2 && exit 0; sleep 0.1; done; exit 1", r.http),
    );
    f2.kill();
    let seen = hosts.sh(0, calls);
    assert!(!seen.contains("FAILED"), "{seen}");
    assert_eq!(seen.matches("\"id\":\"payment-1\"").count(), 30, "{seen}");
    let unreachable = metric(
        &hosts,
        0,
        a1,
        "waymark_forwarder_peer_streams_total{host=\"h2\",result=\"peer_unreachable\"}",
    );
    assert!(
        unreachable >= 1.0,
        "h1 tried h2 and found it gone: {unreachable}"
    );
}

#[test]
fn certificates_renew_under_load_without_a_failed_call() {
    let Some(hosts) = Hosts::new(&["h1", "h2", "h3"]) else {
        return;
    };
    // Certificates for 4 s: each forwarder renews about every 2 s.
    let (r, token) = mesh_registry(&hosts, "[ca]\ncert_ttl = \"4s\"\n");
    let p2 = SocketAddr::new(host_addr(2).into(), 9000);
    let _b2 = backend(&hosts, 1, p2, "payment-2");
    register(&hosts, 1, r.http, "payment-2", p2);
    let (_f2, _) = forwarder(&hosts, 1, r.http, &token, "");
    let (_f3, a3) = forwarder(&hosts, 2, r.http, &token, "");
    hosts.set_nameserver(2, host_addr(1));
    // About 8 s of calls from h3 to the instance on h2, each on a new connection.
    let calls = "for i in $(seq 1 160); do curl -sf --max-time 5 http://payment.mesh.internal:9000/ >/dev/null || echo FAILED; sleep 0.05; done; echo done";
    let out = hosts.sh(2, calls);
    assert_eq!(out.trim(), "done", "no call failed: {out}");
    let handshakes = metric(
        &hosts,
        2,
        a3,
        "waymark_forwarder_peer_handshakes_total{host=\"h2\"}",
    );
    assert!(
        handshakes >= 2.0,
        "renewed certificates make new connections: {handshakes}"
    );
    let left = metric(
        &hosts,
        2,
        a3,
        "waymark_forwarder_certificate_expiry_seconds",
    );
    assert!((0.0..=4.0).contains(&left), "{left}");
}

#[test]
fn calls_never_fail_while_instances_on_two_hosts_drain_die_and_come_back() {
    let Some(hosts) = Hosts::new(&["h1", "h2", "h3"]) else {
        return;
    };
    let (r, token) = mesh_registry(&hosts, "");
    let p1 = SocketAddr::new(host_addr(1).into(), 9000);
    let p2 = SocketAddr::new(host_addr(2).into(), 9000);
    let mut b1 = backend(&hosts, 0, p1, "payment-1");
    let mut b2 = backend(&hosts, 1, p2, "payment-2");
    // HTTP: a GET that fails on a connection the instance's death broke is tried again.
    let http = r#"{"waymark-protocol":"http"}"#;
    register_as(&hosts, 0, r.http, "payment", "payment-1", p1, http);
    register_as(&hosts, 1, r.http, "payment", "payment-2", p2, http);
    let _f1 = forwarder(&hosts, 0, r.http, &token, "");
    let _f2 = forwarder(&hosts, 1, r.http, &token, "");
    let (f3, _) = forwarder(&hosts, 2, r.http, &token, "");
    hosts.set_nameserver(2, host_addr(1));

    // The load, on h3: calls one after another until told to stop (bounded in count).
    let out = hosts.dir().join("load.out");
    let stop = hosts.dir().join("load.stop");
    let script = format!(
        "n=0; while [ ! -e {stop} ] && [ $n -lt 5000 ]; do n=$((n+1)); \
         curl -sf --max-time 5 -o /dev/null http://payment.mesh.internal:9000/ && echo ok || echo FAILED; \
         done > {out}",
        stop = stop.display(),
        out = out.display()
    );
    let mut load = hosts.command(2, "sh");
    load.args(["-c", &script]);
    let mut load = load.spawn().expect("load starts");
    let lines = || {
        std::fs::read_to_string(&out)
            .unwrap_or_default()
            .lines()
            .count()
    };
    // Waits until the load has made `more` calls since now.
    let calls = |more: usize| {
        let target = lines() + more;
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while lines() < target {
            assert!(std::time::Instant::now() < deadline, "the load stalled");
            std::thread::sleep(Duration::from_millis(20));
        }
    };
    let passing = |id: &str| {
        hosts.sh(
            0,
            &format!("for n in $(seq 1 100); do curl -sf 'http://{}/v1/health/service/payment?passing' | grep -q '\"{id}\"' && exit 0; sleep 0.1; done; exit 1", r.http),
        );
    };
    let maintenance = |i: usize, id: &str, on: bool| {
        hosts.sh(
            i,
            &format!("curl -sf --max-time 10 -X PUT 'http://{}/v1/agent/service/maintenance/{id}?enable={on}'", r.http),
        );
    };
    calls(30);
    // payment-1 drains, then serves again.
    maintenance(0, "payment-1", true);
    calls(30);
    maintenance(0, "payment-1", false);
    calls(30);
    // payment-2 dies without a word and comes back; then payment-1 does.
    b2.kill();
    calls(30);
    b2 = backend(&hosts, 1, p2, "payment-2");
    passing("payment-2");
    calls(30);
    b1.kill();
    calls(30);
    b1 = backend(&hosts, 0, p1, "payment-1");
    passing("payment-1");
    calls(30);
    // payment-2 drains while payment-1 is back.
    maintenance(1, "payment-2", true);
    calls(30);

    std::fs::write(&stop, "").unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while load.try_wait().unwrap().is_none() {
        if std::time::Instant::now() > deadline {
            let _ = load.kill();
            panic!("the load did not stop");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let results = std::fs::read_to_string(&out).unwrap();
    let total = results.lines().count();
    let failed = results.lines().filter(|l| *l == "FAILED").count();
    assert_eq!(
        failed,
        0,
        "{failed} of {total} calls failed; h3's forwarder:\n{}",
        f3.log()
    );
    assert!(total >= 200, "{total} calls");
    drop((b1, b2));
}

/// The JDK's `java`, which runs a single source file (JDK 11+); the test cannot stand in for
/// it, so without one it fails and says how to get one.
fn java() -> &'static str {
    let ok = std::process::Command::new("java")
        .arg("-version")
        .output()
        .is_ok_and(|o| o.status.success());
    assert!(
        ok,
        "this test runs a Java client: install a JDK (Debian: apt-get install default-jdk-headless; tests/run.sh does as root)"
    );
    "java"
}

/// A JVM that caches DNS forever (`-Dsun.net.inetaddr.ttl=-1`, and the security property
/// `networkaddress.cache.ttl=-1`) resolves `payment` once and keeps calling it by name while
/// every instance it could have cached is replaced by new ones on new addresses (one
/// deregistered and stopped, one killed without a word): it cached the VIP, which never
/// changes, and the forwarders carry each call to an instance that is there now.
#[test]
fn a_jvm_that_caches_dns_forever_keeps_calling_while_every_instance_is_replaced() {
    let java = java();
    let Some(hosts) = Hosts::new(&["h1", "h2", "h3"]) else {
        return;
    };
    // The new instances' addresses: second addresses of h1 and h2, which their forwarders
    // announce as their own.
    let new1 = std::net::Ipv4Addr::new(10, 77, 0, 11);
    let new2 = std::net::Ipv4Addr::new(10, 77, 0, 12);
    hosts.sh(0, &format!("ip addr add {new1}/24 dev eth0"));
    hosts.sh(1, &format!("ip addr add {new2}/24 dev eth0"));
    let (r, token) = mesh_registry(&hosts, "");
    let http = r#"{"waymark-protocol":"http"}"#;
    let p1 = SocketAddr::new(host_addr(1).into(), 9000);
    let p2 = SocketAddr::new(host_addr(2).into(), 9000);
    let mut b1 = backend(&hosts, 0, p1, "payment-1");
    let mut b2 = backend(&hosts, 1, p2, "payment-2");
    register_as(&hosts, 0, r.http, "payment", "payment-1", p1, http);
    register_as(&hosts, 1, r.http, "payment", "payment-2", p2, http);
    let _f1 = forwarder(
        &hosts,
        0,
        r.http,
        &token,
        &format!("host_addresses = [\"{new1}\"]"),
    );
    let _f2 = forwarder(
        &hosts,
        1,
        r.http,
        &token,
        &format!("host_addresses = [\"{new2}\"]"),
    );
    let (f3, _) = forwarder(&hosts, 2, r.http, &token, "");
    hosts.set_nameserver(2, host_addr(1));

    let out = hosts.dir().join("java.out");
    let stop = hosts.dir().join("java.stop");
    let source = concat!(env!("CARGO_MANIFEST_DIR"), "/java/CachingCaller.java");
    let mut cmd = hosts.command(2, java);
    cmd.args(["-Dsun.net.inetaddr.ttl=-1", source])
        .arg("http://payment.mesh.internal:9000/")
        .arg(&stop)
        .args(["5000", "20"])
        .stdout(std::fs::File::create(&out).unwrap())
        .stderr(std::fs::File::create(hosts.dir().join("java.err")).unwrap());
    let mut client = cmd.spawn().expect("java starts");
    let read = || std::fs::read_to_string(&out).unwrap_or_default();
    let calls_so_far = || {
        read()
            .lines()
            .filter(|l| !l.starts_with("resolved "))
            .count()
    };
    // Waits until the client has made `more` calls since now (a JVM takes a moment to start).
    let calls = |more: usize| {
        let target = calls_so_far() + more;
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        while calls_so_far() < target {
            assert!(
                std::time::Instant::now() < deadline,
                "the Java client stalled:\n{}\n{}",
                read(),
                std::fs::read_to_string(hosts.dir().join("java.err")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    };
    let passing = |id: &str| {
        hosts.sh(
            0,
            &format!("for n in $(seq 1 100); do curl -sf 'http://{}/v1/health/service/payment?passing' | grep -q '\"{id}\"' && exit 0; sleep 0.1; done; exit 1", r.http),
        );
    };
    let deregister = |i: usize, id: &str| {
        hosts.sh(
            i,
            &format!(
                "curl -sf --max-time 10 -X PUT http://{}/v1/agent/service/deregister/{id}",
                r.http
            ),
        );
    };
    calls(20);

    // New instances on new addresses, one per host; then the old ones go.
    let p3 = SocketAddr::new(new1.into(), 9000);
    let p4 = SocketAddr::new(new2.into(), 9000);
    let _b3 = backend(&hosts, 0, p3, "payment-3");
    let _b4 = backend(&hosts, 1, p4, "payment-4");
    register_as(&hosts, 0, r.http, "payment", "payment-3", p3, http);
    register_as(&hosts, 1, r.http, "payment", "payment-4", p4, http);
    passing("payment-3");
    passing("payment-4");
    calls(20);
    deregister(0, "payment-1");
    b1.kill();
    calls(20);
    b2.kill();
    calls(20);
    deregister(1, "payment-2");
    let replaced = calls_so_far();
    calls(40);

    std::fs::write(&stop, "").unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while client.try_wait().unwrap().is_none() {
        if std::time::Instant::now() > deadline {
            let _ = client.kill();
            panic!("the Java client did not stop");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let text = read();
    let mut lines = text.lines();
    let vip = lines
        .next()
        .and_then(|l| l.strip_prefix("resolved "))
        .expect("the client resolved the name")
        .to_string();
    assert!(vip.starts_with("127.77."), "resolved {vip}, not a VIP");
    let calls: Vec<&str> = lines.collect();
    let failed: Vec<&&str> = calls.iter().filter(|l| !l.starts_with("ok ")).collect();
    assert!(
        failed.is_empty(),
        "{} of {} calls failed: {failed:?}\nh3's forwarder:\n{}",
        failed.len(),
        calls.len(),
        f3.log()
    );
    // The JVM never looked the name up again: every call went to the address it cached.
    assert!(
        calls
            .iter()
            .all(|l| l.starts_with(&format!("ok {vip} 200 "))),
        "{text}"
    );
    // Once the old instances were gone, the new ones answered every call, both of them.
    let after = &calls[replaced..];
    assert!(
        after.len() >= 40,
        "{} calls after the replacement",
        after.len()
    );
    for id in ["payment-1", "payment-2"] {
        assert!(
            !after
                .iter()
                .any(|l| l.contains(&format!("\"id\":\"{id}\""))),
            "{id} answered after it was gone:\n{text}"
        );
    }
    for id in ["payment-3", "payment-4"] {
        assert!(
            after
                .iter()
                .any(|l| l.contains(&format!("\"id\":\"{id}\""))),
            "{id} never answered:\n{text}"
        );
    }
    drop(b2);
}

/// With etcd as the registry of record, each host runs its own resolver (all holding one
/// mesh CA) and its forwarder follows that local resolver, as on one machine. A caller on h3
/// reaches `payment` on h1 and h2 by name through its own host's resolver and forwarder;
/// each call goes through the forwarder of the host that registered the instance (known
/// from etcd), even at an address that host's forwarder never announced.
#[test]
fn with_etcd_each_host_follows_its_own_resolver_and_calls_go_to_the_registering_host() {
    let Some(hosts) = Hosts::new(&["h1", "h2", "h3"]) else {
        return;
    };
    let etcd = EtcdCluster::start_on(hosts.wrapper(0), SocketAddr::new(host_addr(1).into(), 2379));
    // One CA for the mesh, made once and copied into every host's data dir.
    let ca = tempfile::tempdir().unwrap();
    let made = std::process::Command::new(waymark_e2e::resolver_bin())
        .args(["ca", "init", "--data-dir"])
        .arg(ca.path())
        .output()
        .unwrap();
    assert!(made.status.success(), "{made:?}");
    let token = std::fs::read_to_string(ca.path().join("ca/join-token")).unwrap();
    let resolvers: Vec<Resolver> = (0..3)
        .map(|i| {
            let data = hosts.dir().join(format!("h{}-data", i + 1));
            waymark_e2e::copy_dir(&ca.path().join("ca"), &data.join("ca"));
            let addr = host_addr(i + 1);
            Resolver::with(Options {
                wrapper: hosts.wrapper(i),
                dns_addr: Some(SocketAddr::new(addr.into(), 53)),
                http_addr: Some(SocketAddr::new(addr.into(), 8500)),
                data_dir: Some(data),
                extra_args: vec![
                    "--etcd".into(),
                    etcd.endpoints(),
                    "--node-name".into(),
                    format!("h{}", i + 1),
                    "--vip-answers".into(),
                    "all".into(),
                ],
                config: Some("[dns]\nlocal_clients = [\"10.77.0.0/24\", \"127.0.0.0/8\"]\n".into()),
                ..Options::default()
            })
        })
        .collect();

    // payment-1 on h1 at a second address of h1, which h1's forwarder does not announce;
    // payment-2 on h2. Each registers with its own host's resolver.
    let extra = std::net::Ipv4Addr::new(10, 77, 0, 21);
    hosts.sh(0, &format!("ip addr add {extra}/24 dev eth0"));
    let p1 = SocketAddr::new(extra.into(), 9000);
    let p2 = SocketAddr::new(host_addr(2).into(), 9000);
    let _b1 = backend(&hosts, 0, p1, "payment-1");
    let _b2 = backend(&hosts, 1, p2, "payment-2");
    let http = r#"{"waymark-protocol":"http"}"#;
    register_as(
        &hosts,
        0,
        resolvers[0].http,
        "payment",
        "payment-1",
        p1,
        http,
    );
    register_as(
        &hosts,
        1,
        resolvers[1].http,
        "payment",
        "payment-2",
        p2,
        http,
    );
    let token = token.trim();
    let _f1 = forwarder(&hosts, 0, resolvers[0].http, token, "");
    let _f2 = forwarder(&hosts, 1, resolvers[1].http, token, "");
    let (f3, a3) = forwarder(&hosts, 2, resolvers[2].http, token, "");

    // h3 asks its own resolver.
    hosts.set_nameserver(2, host_addr(3));
    let seen = hosts.sh(
        2,
        "for n in $(seq 1 100); do getent ahostsv4 payment.mesh.internal >/dev/null && break; sleep 0.1; done; \
         for i in $(seq 1 30); do curl -sf --max-time 5 http://payment.mesh.internal:9000/ || echo FAILED; echo; done",
    );
    assert!(
        !seen.contains("FAILED"),
        "{seen}\nh3's forwarder:\n{}",
        f3.log()
    );
    for id in ["payment-1", "payment-2"] {
        assert!(
            seen.contains(&format!("\"id\":\"{id}\"")),
            "{id} called: {seen}"
        );
    }
    for peer in ["h1", "h2"] {
        let ok = metric(
            &hosts,
            2,
            a3,
            &format!("waymark_forwarder_peer_streams_total{{host=\"{peer}\",result=\"ok\"}}"),
        );
        assert!(ok >= 1.0, "calls through {peer}'s forwarder: {ok}");
    }
    assert_eq!(
        metric(&hosts, 2, a3, "waymark_forwarder_unmeshed_connects_total"),
        0.0,
        "no call left the mesh"
    );
    drop(resolvers);
}
