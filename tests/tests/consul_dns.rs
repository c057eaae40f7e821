//! Consul's DNS names (`[dns] consul_names = true`), asked with `dig` over UDP and TCP:
//! services, tags, RFC 2782 SRV, nodes (this host and an external node registered through
//! the catalog), the datacenter label, prepared queries refused, and the same health rules as
//! Waymark's own names.

use serde_json::json;
use waymark_e2e::{have, Api, Options, Resolver};

fn dig(r: &Resolver, args: &[&str]) -> String {
    let out = std::process::Command::new("dig")
        .arg("@127.0.0.1")
        .args(["-p", &r.dns.port().to_string(), "+time=6", "+tries=1"])
        .args(args)
        .output()
        .expect("dig runs");
    assert!(
        out.status.success(),
        "dig {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// `dig +short` lines, sorted.
fn short(r: &Resolver, args: &[&str]) -> Vec<String> {
    let mut a = vec!["+short"];
    a.extend_from_slice(args);
    let mut lines: Vec<String> = dig(r, &a).lines().map(str::to_string).collect();
    lines.sort();
    lines
}

fn status(r: &Resolver, args: &[&str]) -> String {
    let out = dig(r, args);
    out.split("status: ")
        .nth(1)
        .and_then(|s| s.split(',').next())
        .unwrap_or_else(|| panic!("no status in {out}"))
        .to_string()
}

#[tokio::test]
async fn consul_names_answer_from_the_same_registry() {
    assert!(
        have("dig"),
        "dig is required (Debian package dnsutils; .ci/run installs it)"
    );
    let r = Resolver::with(Options {
        config: Some(
            "[dns]\nconsul_names = true\n[api]\ndatacenter = \"east\"\nnode_name = \"host-a\"\nnode_address = \"10.9.0.1\"\n"
                .into(),
        ),
        ..Options::default()
    });
    let api = Api::new(&r);
    for (id, addr, tags) in [
        ("pay-1", "10.1.0.1", vec!["v1"]),
        ("pay-2", "10.1.0.2", vec!["v2"]),
        ("pay-3", "10.1.0.3", vec!["v1"]),
    ] {
        api.register(json!({
            "ID": id, "Name": "payment", "Address": addr, "Port": 9000, "Tags": tags,
            "Check": {"CheckID": format!("{id}-ttl"), "TTL": "60s", "Status": "passing"}
        }))
        .await;
    }
    let all = ["10.1.0.1", "10.1.0.2", "10.1.0.3"];
    for name in [
        "payment.service.consul",
        "payment.service.east.consul",
        "PAYMENT.Service.Consul",
    ] {
        assert_eq!(short(&r, &[name]), all, "{name}");
        assert_eq!(short(&r, &["+tcp", name]), all, "{name} over TCP");
    }
    assert_eq!(
        short(&r, &["v1.payment.service.consul"]),
        ["10.1.0.1", "10.1.0.3"]
    );
    assert_eq!(short(&r, &["v2.payment.service.east.consul"]), ["10.1.0.2"]);

    // The owner name is the Consul name asked.
    let out = dig(&r, &["payment.service.consul"]);
    assert!(out.contains("\npayment.service.consul."), "{out}");

    // RFC 2782: `_<service>._tcp` and `_<service>._<tag>`, SRV targets with their addresses.
    let srv = short(&r, &["SRV", "_payment._tcp.service.consul"]);
    assert_eq!(srv.len(), 3, "{srv:?}");
    assert!(srv.iter().all(|l| l.contains(" 9000 ")), "{srv:?}");
    let srv = short(&r, &["SRV", "_payment._v2.service.east.consul"]);
    assert_eq!(srv.len(), 1, "{srv:?}");
    let target = srv[0].split_whitespace().last().unwrap().to_string();
    assert_eq!(
        short(&r, &[&target]),
        ["10.1.0.2"],
        "the SRV target resolves"
    );
    let out = dig(&r, &["SRV", "_payment._v2.service.east.consul"]);
    assert!(out.contains("ADDITIONAL SECTION"), "{out}");

    // The same health rules: a failing instance leaves both name schemes.
    api.put_empty("/v1/agent/check/fail/pay-2-ttl").await;
    assert_eq!(
        short(&r, &["payment.service.consul"]),
        ["10.1.0.1", "10.1.0.3"]
    );
    assert_eq!(status(&r, &["v2.payment.service.consul"]), "NOERROR");
    assert_eq!(
        short(&r, &["v2.payment.service.consul"]),
        Vec::<String>::new()
    );

    // Nodes: this host, and an external node registered through the catalog.
    assert_eq!(short(&r, &["host-a.node.consul"]), ["10.9.0.1"]);
    assert_eq!(short(&r, &["host-a.node.east.consul"]), ["10.9.0.1"]);
    let resp = api
        .put(
            "/v1/catalog/register",
            json!({"Node": "ext-db", "Address": "192.0.2.7",
                   "Service": {"Service": "pg", "Port": 5432}}),
        )
        .await;
    assert_eq!(resp.status(), 200);
    assert_eq!(short(&r, &["ext-db.node.consul"]), ["192.0.2.7"]);
    assert_eq!(short(&r, &["pg.service.consul"]), ["192.0.2.7"]);
    assert_eq!(status(&r, &["nope.node.consul"]), "NXDOMAIN");

    // Another datacenter, unknown services and shapes: NXDOMAIN; the empty non-terminals and
    // the apex exist; prepared queries are refused.
    for name in [
        "payment.service.west.consul",
        "nope.service.consul",
        "a.b.payment.service.consul",
        "payment.consul",
    ] {
        assert_eq!(status(&r, &[name]), "NXDOMAIN", "{name}");
    }
    for name in ["service.consul", "node.east.consul", "consul"] {
        assert_eq!(status(&r, &[name]), "NOERROR", "{name}");
    }
    let out = dig(&r, &["payment.query.consul"]);
    assert!(out.contains("status: REFUSED"), "{out}");
    let soa = short(&r, &["SOA", "consul"]);
    assert_eq!(soa.len(), 1, "{soa:?}");
    let out = dig(&r, &["nope.service.consul"]);
    assert!(
        out.contains("AUTHORITY SECTION") && out.contains("\nconsul."),
        "negative answers carry the Consul domain's SOA: {out}"
    );
    // Waymark's own names are unchanged.
    assert_eq!(
        short(&r, &["payment.mesh.internal"]),
        ["10.1.0.1", "10.1.0.3"]
    );
}

/// Off by default: Consul's names are then not this server's (forwarded, here to a closed port:
/// SERVFAIL after the upstream timeout, 2 s; dig waits up to 6 s),
/// never answered from the registry).
#[tokio::test]
async fn consul_names_are_off_by_default() {
    let r = Resolver::start();
    let api = Api::new(&r);
    api.register(json!({"ID": "pay-1", "Name": "payment", "Address": "10.1.0.1", "Port": 80}))
        .await;
    assert_eq!(short(&r, &["payment.mesh.internal"]), ["10.1.0.1"]);
    let out = dig(&r, &["payment.service.consul"]);
    assert!(!out.contains("10.1.0.1"), "{out}");
    assert!(!out.contains(" aa"), "not authoritative: {out}");
}
