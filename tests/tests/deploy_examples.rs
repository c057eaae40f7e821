//! The files in deploy/ are what people copy onto hosts: the example config and services file
//! must parse and validate, agree with the systemd unit and the systemd-resolved drop-in, and
//! pass `waymark-resolver check-config`; and a broken config must stop `serve` with a message
//! that names the problem.
//!
//! Nothing here contacts the example services (their addresses are not on this machine): the
//! services file is parsed, never loaded into a running resolver.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use waymark_e2e::{resolver_bin, root};
use waymark_resolver::config::Config;
use waymark_resolver::registry::def::CheckKind;
use waymark_resolver::services_file;

fn deploy(file: &str) -> PathBuf {
    root().join("deploy").join(file)
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The value of `key=` in a systemd-style file (unit or drop-in), if set once.
fn ini_value(text: &str, key: &str) -> Option<String> {
    let mut values = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.strip_prefix(key)?.strip_prefix('='))
        .map(|v| v.trim().to_string());
    let first = values.next();
    assert!(values.next().is_none(), "{key}= is set more than once");
    first
}

/// Runs the resolver binary with `args`; kills it if it is still running after `limit`
/// (then `None`: it did not exit by itself).
fn run_resolver(args: &[&str], limit: Duration) -> Option<Output> {
    let mut child = Command::new(resolver_bin())
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn waymark-resolver");
    let deadline = Instant::now() + limit;
    loop {
        if child.try_wait().expect("wait").is_some() {
            return Some(child.wait_with_output().expect("output"));
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn example_config_parses_and_matches_the_unit_and_the_resolved_drop_in() {
    let path = deploy("resolver.toml");
    let c = Config::load(&path).unwrap_or_else(|e| panic!("{e}"));

    let dns: SocketAddr = "127.0.0.77:53".parse().unwrap();
    assert_eq!(c.dns.addr, dns);
    assert_eq!(c.dns.zone, "mesh.internal");
    assert_eq!(c.dns.ttl, 5);
    assert!(
        c.dns.upstreams.is_empty(),
        "upstreams stay commented out behind resolved"
    );
    assert!(
        c.dns.forward_allow.is_empty(),
        "behind resolved, forwarding stays off (it would loop back to 127.0.0.53)"
    );
    assert_eq!(c.api.addr, "127.0.0.1:8500".parse::<SocketAddr>().unwrap());
    assert!(c.api.addr.ip().is_loopback(), "the API stays on loopback");
    assert_eq!(c.api.token, None, "the example token stays commented out");
    assert_eq!(c.store.data_dir, Path::new("/var/lib/waymark"));
    let sf = c.services_file.as_ref().expect("[services_file]");
    assert_eq!(sf.path, Path::new("/etc/waymark/services.toml"));
    assert_eq!(sf.reload_interval, Duration::from_secs(2));
    assert_eq!(c.health.failures_before_critical, 2);
    assert_eq!(c.panic_thresholds().get("payment"), Some(&0.5));
    assert_eq!(c.panic_thresholds().get("other"), None);

    // The unit runs this config, and its state directory is the data dir.
    let unit = read(&deploy("waymark-resolver.service"));
    assert_eq!(
        ini_value(&unit, "ExecStart").as_deref(),
        Some("/usr/local/bin/waymark-resolver serve --config /etc/waymark/resolver.toml")
    );
    let state = ini_value(&unit, "StateDirectory").expect("StateDirectory=");
    assert_eq!(Path::new("/var/lib").join(state), c.store.data_dir);
    assert!(
        unit.contains("AmbientCapabilities=CAP_NET_BIND_SERVICE"),
        "port {} needs CAP_NET_BIND_SERVICE",
        c.dns.addr.port()
    );

    // resolved sends only the zone, to this address (port 53, so DNS= names no port).
    let drop_in = read(&deploy("resolved/waymark.conf"));
    assert!(drop_in.contains("[Resolve]"));
    assert_eq!(c.dns.addr.port(), 53);
    assert_eq!(
        ini_value(&drop_in, "DNS"),
        Some(c.dns.addr.ip().to_string())
    );
    assert_eq!(
        ini_value(&drop_in, "Domains"),
        Some(format!("~{}", c.dns.zone))
    );
}

#[test]
fn example_services_file_parses() {
    let path = deploy("services.toml");
    let defs = services_file::parse(&path, &read(&path)).unwrap_or_else(|e| panic!("{e}"));
    let ids: Vec<&str> = defs.iter().map(|d| d.id.as_str()).collect();
    assert_eq!(
        ids,
        [
            "legacy-db-1",
            "billing-1",
            "billing-2",
            "exporter-1",
            "printer"
        ]
    );
    let kinds: Vec<Vec<&str>> = defs
        .iter()
        .map(|d| {
            d.checks
                .iter()
                .map(|c| c.kind().expect("valid check").name())
                .collect()
        })
        .collect();
    assert_eq!(
        kinds,
        [vec!["tcp"], vec!["http"], vec!["http"], vec!["ttl"], vec![]]
    );
    let db = &defs[0];
    assert_eq!(
        (db.name.as_str(), db.address.as_str(), db.port),
        ("legacy-db", "10.0.0.21", 5432)
    );
    assert_eq!(db.tags, ["primary"]);
    assert_eq!(db.meta.get("team").map(String::as_str), Some("data"));
    assert_eq!(db.checks[0].id, "service:legacy-db-1");
    assert_eq!(db.checks[0].interval, Some(Duration::from_secs(5)));
    assert_eq!(defs[1].weights.passing, 3);
    assert_eq!(defs[1].checks[0].failures_before_critical, Some(3));
    let Ok(CheckKind::Ttl { ttl }) = defs[3].checks[0].kind() else {
        panic!("exporter has a TTL check")
    };
    assert_eq!(ttl, Duration::from_secs(90));
}

#[test]
fn check_config_accepts_the_example() {
    // As installed (deploy/README.md): the services file it names is in place. Here it is
    // the example's own, beside it.
    let text = std::fs::read_to_string(deploy("resolver.toml")).unwrap();
    let installed = "/etc/waymark/services.toml";
    assert!(text.contains(installed), "the example names {installed}");
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("resolver.toml");
    let services = deploy("services.toml");
    std::fs::write(&path, text.replace(installed, services.to_str().unwrap())).unwrap();
    // Not installed yet: check-config refuses, as serve would, and names the file.
    let missing = dir.path().join("missing.toml");
    std::fs::write(
        &missing,
        text.replace(installed, dir.path().join("nope.toml").to_str().unwrap()),
    )
    .unwrap();
    let refused = run_resolver(
        &["check-config", missing.to_str().unwrap()],
        Duration::from_secs(30),
    )
    .expect("check-config exits");
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("nope.toml"));

    let out = run_resolver(
        &["check-config", path.to_str().unwrap()],
        Duration::from_secs(30),
    )
    .expect("check-config exits");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "check-config failed: {stderr}");
    // It prints the config with the defaults filled in.
    assert!(stdout.contains("addr = \"127.0.0.77:53\""), "{stdout}");
    assert!(stdout.contains("max_udp_payload = 1232"), "{stdout}");
    assert!(stdout.contains("[services.payment]"), "{stdout}");
}

#[test]
fn a_broken_config_stops_serve_with_a_message_naming_the_problem() {
    let dir = tempfile::tempdir().expect("temp dir");
    let cases = [
        (
            "unknown field",
            "[dns]\nzone = \"mesh.internal\"\nzoen = \"typo\"\n",
            "zoen",
        ),
        ("bad zone", "[dns]\nzone = \"bad..zone\"\n", "dns.zone"),
        ("unknown section", "[dsn]\naddr = \"127.0.0.1:53\"\n", "dsn"),
        (
            "panic threshold over 1",
            "[services.payment]\npanic_threshold = 1.5\n",
            "services.payment.panic_threshold",
        ),
    ];
    for (what, text, named) in cases {
        let bad = dir.path().join("bad.toml");
        std::fs::write(&bad, text).unwrap();
        let bad = bad.to_str().unwrap();
        let data = dir.path().join("data");
        // Should the config be accepted after all, it would serve on ephemeral loopback ports
        // and be killed at the time limit; the assertion below then fails.
        let out = run_resolver(
            &[
                "serve",
                "--config",
                bad,
                "--dns-addr",
                "127.0.0.1:0",
                "--http-addr",
                "127.0.0.1:0",
                "--data-dir",
                data.to_str().unwrap(),
            ],
            Duration::from_secs(30),
        );
        let Some(out) = out else {
            panic!("{what}: serve was still running 30 s after starting with:\n{text}")
        };
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success(),
            "{what}: serve succeeded with:\n{text}"
        );
        assert!(
            stderr.contains(named),
            "{what}: the error does not name {named:?}: {stderr}"
        );
        assert!(
            out.stdout.is_empty(),
            "{what}: serve printed {:?}",
            String::from_utf8_lossy(&out.stdout)
        );
        assert!(!data.exists(), "{what}: serve created its data dir");

        let out = run_resolver(&["check-config", bad], Duration::from_secs(30))
            .expect("check-config exits");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success(),
            "{what}: check-config accepted:\n{text}"
        );
        assert!(stderr.contains(named), "{what}: check-config: {stderr}");
    }
}

#[test]
fn forwarder_example_parses_and_matches_its_unit() {
    use waymark_gateway::forwarder::config::ForwarderConfig;
    let path = deploy("forwarder.toml");
    let c = ForwarderConfig::load(&path).unwrap_or_else(|e| panic!("{e}"));
    c.validate().unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(c.host_name, "host-a");
    assert_eq!(c.http_services, ["payment"]);
    assert!(c.admin_addr.ip().is_loopback(), "admin stays private");
    // Every value it says is a default is the default.
    let d = ForwarderConfig::default();
    assert!(c.mesh.enabled(), "the example is in the mesh");
    let mut examples_as_default = ForwarderConfig {
        host_name: d.host_name.clone(),
        http_services: d.http_services.clone(),
        ..c.clone()
    };
    examples_as_default.mesh.join_token_file = None;
    examples_as_default.mesh.allow.clear();
    assert_eq!(examples_as_default, d);

    let unit = read(&deploy("waymark-forwarder.service"));
    // Its key and certificate live in the unit's state directory.
    assert_eq!(
        Some(c.mesh.state_dir.clone()),
        ini_value(&unit, "StateDirectory").map(|d| std::path::Path::new("/var/lib").join(d))
    );
    assert_eq!(
        ini_value(&unit, "ExecStart").as_deref(),
        Some("/usr/local/bin/waymark-gateway forwarder --config /etc/waymark/forwarder.toml")
    );
    assert_eq!(
        ini_value(&unit, "ExecStartPre").as_deref(),
        Some("/usr/local/bin/waymark-gateway check-config --forwarder /etc/waymark/forwarder.toml")
    );
    assert_eq!(ini_value(&unit, "KillSignal").as_deref(), Some("SIGTERM"));

    // check-config --forwarder accepts it (printing the defaults) and refuses a broken one.
    let check = |file: &Path| {
        Command::new(waymark_e2e::gateway::gateway_bin())
            .args(["check-config", "--forwarder"])
            .arg(file)
            .output()
            .expect("check-config runs")
    };
    let out = check(&path);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("connect_timeout = \"1s\""), "{stdout}");
    let dir = tempfile::tempdir().unwrap();
    let broken = dir.path().join("forwarder.toml");
    std::fs::write(
        &broken,
        read(&path).replace("ttl = \"10s\"", "ttl = \"10ms\""),
    )
    .unwrap();
    let out = check(&broken);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("announce.ttl must be at least 1s"));
}

#[test]
fn etcd_example_config_parses_and_passes_check_config() {
    let path = deploy("resolver-etcd.toml");
    let c = Config::load(&path).unwrap_or_else(|e| panic!("{e}"));
    c.validate().unwrap_or_else(|e| panic!("{e}"));
    assert!(c.etcd.enabled());
    assert_eq!(c.etcd.endpoints.len(), 3);
    assert!(c.etcd.endpoints.iter().all(|e| e.starts_with("https://")));
    assert!(c.etcd.ca_file.is_some() && c.etcd.cert_file.is_some() && c.etcd.key_file.is_some());
    assert_eq!(c.etcd.prefix, "/waymark/");
    assert_eq!(c.etcd.lease_ttl, Duration::from_secs(10));
    assert_eq!(c.etcd.node_name, None, "each host takes its host name");
    // The same DNS and API addresses as the single-host example, which the unit and the
    // resolved drop-in expect.
    let single = Config::load(&deploy("resolver.toml")).unwrap();
    assert_eq!(c.dns.addr, single.dns.addr);
    assert_eq!(c.api.addr, single.api.addr);
    assert_eq!(c.store.data_dir, single.store.data_dir);
    assert_eq!(c.vips.range, single.vips.range);

    let out = run_resolver(
        &["check-config", path.to_str().unwrap()],
        Duration::from_secs(30),
    )
    .expect("check-config exits");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "check-config failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("[etcd]") && stdout.contains("lease_ttl = \"10s\""),
        "{stdout}"
    );
}
