//! The gateway files in deploy/: the example config parses, validates and names every route
//! it documents; `waymark-gateway check-config` accepts it and refuses a broken one; the
//! systemd unit runs the binary with that config, checking it first.

use std::process::Command;

use waymark_e2e::gateway::{gateway_bin, TestCa};
use waymark_e2e::root;
use waymark_gateway::config::{AccessLog, Config};

fn deploy(file: &str) -> String {
    let path = root().join("deploy").join(file);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

#[test]
fn example_config_parses_and_validates() {
    let c = Config::parse(&deploy("gateway.toml")).expect("deploy/gateway.toml parses");
    c.validate().expect("deploy/gateway.toml validates");
    assert_eq!(c.registry, "http://127.0.0.1:8500");
    assert_eq!(c.admin_addr.to_string(), "127.0.0.1:9901");
    assert!(c.admin_addr.ip().is_loopback(), "admin stays private");
    assert_eq!(c.access_log, AccessLog::Text);
    assert!(c.trusted_proxies.is_empty(), "trust no proxy by default");
    assert!(c.tls_listen.is_some() && c.tls_dir.is_some());
    assert_eq!(c.routes.len(), 4);
    assert!(c.routes.iter().any(|r| r.header.is_some()));
    assert!(c.routes.iter().any(|r| !r.split.is_empty()));
    assert!(c.routes.iter().any(|r| r.upstream_h2c));
    // The values it says are defaults are the defaults.
    let d = Config::default();
    assert_eq!(c.shutdown, d.shutdown);
    assert_eq!(c.timeouts, d.timeouts);
    assert_eq!(c.retry, d.retry);
    assert_eq!(c.outlier, d.outlier);
    assert_eq!(c.limits, d.limits);
    assert_eq!(c.listen, d.listen);
    assert_eq!(c.threads, d.threads);
}

#[test]
fn check_config_accepts_the_example_and_refuses_mistakes() {
    // As installed (deploy/README.md): the certificate directory it names exists and holds
    // a pair. Here, a temporary one.
    let text = deploy("gateway.toml");
    let installed = "/etc/waymark/tls";
    assert!(text.contains(installed), "the example names {installed}");
    let tmp = tempfile::tempdir().unwrap();
    let tls = tmp.path().join("tls");
    std::fs::create_dir(&tls).unwrap();
    TestCa::new("deploy test CA").write_leaf(&tls, "api.example.test");
    let config = tmp.path().join("gateway.toml");
    std::fs::write(&config, text.replace(installed, tls.to_str().unwrap())).unwrap();
    // Without the certificates, check-config refuses as ingress would, naming the directory.
    let missing = tmp.path().join("missing.toml");
    let nowhere = tmp.path().join("nowhere");
    std::fs::write(&missing, text.replace(installed, nowhere.to_str().unwrap())).unwrap();
    let refused = Command::new(gateway_bin())
        .arg("check-config")
        .arg(&missing)
        .output()
        .unwrap();
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("nowhere"));

    let ok = Command::new(gateway_bin())
        .args(["check-config"])
        .arg(&config)
        .output()
        .unwrap();
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    let printed = String::from_utf8_lossy(&ok.stdout);
    assert!(printed.contains("api.example.test"), "{printed}");

    let dir = tempfile::tempdir().unwrap();
    for (text, says) in [
        ("listen = \"nope\"", "listen"),
        (
            "[[routes]]\nservice = \"a\"\npath = \"no-slash\"",
            "path must start with /",
        ),
        (
            "tls_listen = \"127.0.0.1:8443\"",
            "tls_listen needs tls_dir",
        ),
        ("unknown_key = 1", "unknown field"),
    ] {
        let path = dir.path().join("bad.toml");
        std::fs::write(&path, text).unwrap();
        let out = Command::new(gateway_bin())
            .arg("check-config")
            .arg(&path)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{text:?} accepted");
        assert!(err.contains(says), "{text:?}: {err}");
    }
}

#[test]
fn systemd_unit_runs_the_checked_config() {
    let unit = deploy("waymark-gateway.service");
    assert!(unit.contains(
        "ExecStartPre=/usr/local/bin/waymark-gateway check-config /etc/waymark/gateway.toml"
    ));
    assert!(unit.contains(
        "ExecStart=/usr/local/bin/waymark-gateway ingress --config /etc/waymark/gateway.toml"
    ));
    // Logs, the access log included, go to the journal: the gateway writes no file that
    // would need rotating, and the unit gives it nowhere to write one.
    assert!(unit.contains("StandardError=journal"), "{unit}");
    assert!(unit.contains("ProtectSystem=strict"), "{unit}");
    assert!(!unit.contains("LogsDirectory"), "{unit}");
    // The stop timeout leaves room for the configured grace period and timeout.
    let c = Config::parse(&deploy("gateway.toml")).unwrap();
    let stop: u64 = unit
        .lines()
        .find_map(|l| l.strip_prefix("TimeoutStopSec="))
        .and_then(|v| v.trim_end_matches('s').parse().ok())
        .expect("TimeoutStopSec");
    assert!(stop > c.shutdown.grace_period.as_secs() + c.shutdown.timeout.as_secs());
}
