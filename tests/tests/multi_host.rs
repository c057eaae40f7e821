//! Several hosts (network namespaces joined by a bridge in a namespace of its own, see
//! `tests/src/hosts.rs`): the registry's resolver on h1, `payment` instances on h1 and h2, a
//! caller on h3 whose system resolver points at h1. Plain names work across hosts with no
//! client library: glibc's resolver (`getent`) finds both instances and curl reaches them,
//! registrations made from other hosts are answered at once, and an instance that drains is
//! not called again.

use std::net::SocketAddr;
use std::time::Duration;

use waymark_e2e::hosts::{host_addr, Hosts};
use waymark_e2e::process::Proc;
use waymark_e2e::{Options, Resolver};

const BACKEND: &str = env!("CARGO_BIN_EXE_gw_backend");

/// A gw_backend on host `i` at `addr`.
fn backend(hosts: &Hosts, i: usize, addr: SocketAddr, id: &str) -> Proc {
    let mut cmd = hosts.command(i, BACKEND);
    cmd.args(["--addr", &addr.to_string(), "--id", id]);
    let (proc, _) = Proc::spawn(
        cmd,
        id,
        &hosts.dir().join(format!("{id}.log")),
        "gw_backend listening ",
        Duration::from_secs(10),
    )
    .expect("backend starts");
    proc
}

/// Registers an instance from host `i` with the registry's API at `api`.
fn register(hosts: &Hosts, i: usize, api: SocketAddr, id: &str, addr: SocketAddr) {
    let body = format!(
        r#"{{"ID":"{id}","Name":"payment","Address":"{}","Port":{},"Check":{{"HTTP":"http://{addr}/health","Interval":"1s","Status":"passing"}}}}"#,
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
