//! Real Consul client libraries work with Waymark unchanged: PyPI `python-consul`,
//! `py-consul`, `python-consul2` and `consulate-fork`, npm `consul` and `@creditkarma/consul-client`,
//! each driving a resolver through its public API (scripts in
//! tests/clients/, installed by tests/clients/install.sh, which .ci/run runs).

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use waymark_e2e::{root, Resolver};

/// Runs a client script against a fresh resolver; fails with its output unless it exits 0.
fn run_client(program: &str, script: &str, extra: &[&str], pythonpath: Option<&Path>) {
    let r = Resolver::start();
    let clients = root().join("tests/clients");
    if let Some(p) = pythonpath {
        assert!(
            p.exists(),
            "{} is missing: run `bash tests/clients/install.sh` (.ci/run does)",
            p.display()
        );
    }
    let addr = r.http.to_string();
    let mut cmd = Command::new(program);
    cmd.arg(clients.join(script))
        // Port 0: the script serves its check target on a port of the system's choosing.
        .args(["--addr", &addr, "--backend-port", "0"])
        .args(extra)
        .current_dir(&clients)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    if let Some(p) = pythonpath {
        cmd.env("PYTHONPATH", p);
    }
    let mut child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {program}: {e}"));
    let deadline = Instant::now() + Duration::from_secs(180);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{script} did not finish within 180s");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let out = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    println!("{stdout}");
    assert!(
        status.success(),
        "{script} {extra:?} failed ({status}):\n{stdout}\n{stderr}\nresolver log:\n{}",
        r.log()
    );
}

#[test]
fn python_consul_registers_unchanged() {
    let deps = root().join("tests/clients/.deps/python-consul");
    run_client(
        "python3",
        "consul_py.py",
        &["--lib", "python-consul"],
        Some(&deps),
    );
}

#[test]
fn py_consul_registers_unchanged() {
    let deps = root().join("tests/clients/.deps/py-consul");
    run_client(
        "python3",
        "consul_py.py",
        &["--lib", "py-consul"],
        Some(&deps),
    );
}

#[test]
fn node_consul_registers_unchanged() {
    assert!(
        root().join("tests/clients/node_modules/consul").exists(),
        "npm consul is missing: run `bash tests/clients/install.sh` (.ci/run does)"
    );
    run_client("node", "consul_node.js", &[], None);
}

/// PyPI `python-consul2`: catalog, health, nodes, status, a blocking query, an external
/// service through the catalog, and an unsupported endpoint that fails loudly.
#[test]
fn python_consul2_reads_the_catalog_and_registers_external_services() {
    let deps = root().join("tests/clients/.deps/python-consul2");
    run_client(
        "python3",
        "catalog_py.py",
        &["--lib", "python-consul2"],
        Some(&deps),
    );
}

/// PyPI `consulate-fork` (consulate's maintained fork): the same walk through.
#[test]
fn consulate_reads_the_catalog_and_registers_external_services() {
    let deps = root().join("tests/clients/.deps/consulate-fork");
    run_client(
        "python3",
        "catalog_py.py",
        &["--lib", "consulate-fork"],
        Some(&deps),
    );
}

/// npm `@creditkarma/consul-client`: catalog registration, and `watchAddress` firing on a
/// change (it keys on `ModifyIndex`).
#[test]
fn creditkarma_consul_client_watches_an_address_change() {
    assert!(
        root()
            .join("tests/clients/node_modules/@creditkarma/consul-client")
            .exists(),
        "@creditkarma/consul-client is missing: run `bash tests/clients/install.sh` (.ci/run does)"
    );
    run_client("node", "creditkarma.js", &[], None);
}
