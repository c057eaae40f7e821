//! Real Consul client libraries register with Waymark unchanged: PyPI `python-consul` and
//! `py-consul`, and npm `consul`, each driving a resolver through its public API (scripts in
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
