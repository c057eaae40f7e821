//! The forwarder part of the harness: starts the real `waymark-gateway forwarder` binary
//! (`WAYMARK_GATEWAY_BIN` respected, like the gateway's) following a test resolver, with
//! its admin listener on port 0, and runs it with bad configs to see it refuse. Stops only
//! the process it started, by its `Child` handle.

use std::net::SocketAddr;
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::gateway::gateway_bin;
use crate::process::Proc;
use crate::Resolver;

/// A running `waymark-gateway forwarder`.
pub struct Forwarder {
    proc: Proc,
    pub admin: SocketAddr,
    pub host_name: String,
    _dir: tempfile::TempDir,
}

impl Forwarder {
    /// Starts a forwarder named `host_name` following `registry`, with this config file
    /// body (a short drain is added unless it has a `[shutdown]` table); returns once it is
    /// ready (its listeners are up and it is registered).
    pub fn start(registry: &Resolver, host_name: &str, config: &str) -> Forwarder {
        let f = Self::start_unready(registry, host_name, config);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let (status, body) = ready_blocking(f.admin);
            if status == 200 {
                return f;
            }
            assert!(
                Instant::now() < deadline,
                "forwarder not ready within 30 s: {body}; log:\n{}",
                f.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Starts it and returns once it prints its listening line (before it is ready).
    pub fn start_unready(registry: &Resolver, host_name: &str, config: &str) -> Forwarder {
        Self::start_following(&format!("http://{}", registry.http), host_name, config)
    }

    /// Starts it following the registry at `url` (which may be one that never answers) and
    /// returns once it prints its listening line.
    pub fn start_following(url: &str, host_name: &str, config: &str) -> Forwarder {
        let dir = tempfile::tempdir().expect("temp dir");
        let mut config = config.to_string();
        if !config.contains("[shutdown]") {
            config.push_str("\n[shutdown]\ndrain_timeout = \"2s\"\n");
        }
        let path = dir.path().join("forwarder.toml");
        std::fs::write(&path, &config).expect("write forwarder config");
        let mut cmd = Command::new(gateway_bin());
        cmd.args(["forwarder", "--config"])
            .arg(&path)
            .args(["--admin-addr", "127.0.0.1:0", "--host-name", host_name])
            .args(["--registry", url])
            .env("RUST_LOG", "info,waymark_gateway=debug");
        let (proc, announced) = Proc::spawn(
            cmd,
            "waymark-gateway forwarder",
            &dir.path().join("forwarder.log"),
            "waymark-gateway forwarder listening ",
            Duration::from_secs(60),
        )
        .unwrap_or_else(|e| panic!("forwarder did not start: {e:#}"));
        Forwarder {
            admin: announced.need("admin").unwrap_or_else(|e| panic!("{e:#}")),
            proc,
            host_name: host_name.to_string(),
            _dir: dir,
        }
    }

    pub fn admin_url(&self, path: &str) -> String {
        format!("http://{}{path}", self.admin)
    }

    /// `GET /healthz/ready`: status and JSON body.
    pub async fn ready(&self) -> (u16, Value) {
        match reqwest::get(self.admin_url("/healthz/ready")).await {
            Ok(resp) => {
                let status = resp.status().as_u16();
                (status, resp.json().await.unwrap_or(Value::Null))
            }
            Err(e) => (0, Value::String(e.to_string())),
        }
    }

    /// `GET /metrics` as text.
    pub async fn metrics(&self) -> String {
        reqwest::get(self.admin_url("/metrics"))
            .await
            .expect("admin reachable")
            .text()
            .await
            .expect("metrics body")
    }

    /// The value of one metric line (`name{labels}` exactly as exported), 0 when absent.
    pub async fn metric(&self, series: &str) -> f64 {
        metric_value(&self.metrics().await, series)
    }

    pub fn log(&self) -> String {
        self.proc.log()
    }

    pub fn pid(&self) -> Option<u32> {
        self.proc.pid()
    }

    /// Sends a signal without waiting.
    pub fn signal(&self, signal: nix::sys::signal::Signal) {
        self.proc.signal(signal)
    }

    /// SIGTERM, then waits up to `within` for the exit.
    pub fn terminate(&mut self, within: Duration) -> Option<(ExitStatus, Duration)> {
        self.proc.terminate(within)
    }
}

/// `GET /healthz/ready` over a blocking socket (for use at start, inside or outside a
/// runtime): the status (0 when unreachable) and the body.
fn ready_blocking(admin: SocketAddr) -> (u16, String) {
    use std::io::{Read, Write};
    let Ok(mut s) = std::net::TcpStream::connect_timeout(&admin, Duration::from_millis(200)) else {
        return (0, String::new());
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
    let req = format!("GET /healthz/ready HTTP/1.1\r\nHost: {admin}\r\nConnection: close\r\n\r\n");
    if s.write_all(req.as_bytes()).is_err() {
        return (0, String::new());
    }
    let mut buf = String::new();
    let _ = s.read_to_string(&mut buf);
    let status = buf
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    (status, buf)
}

/// The value of the series `series` in Prometheus text, 0 when absent.
pub fn metric_value(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|l| {
            let (name, value) = l.rsplit_once(' ')?;
            (name == series).then(|| value.parse().ok())?
        })
        .unwrap_or(0.0)
}

/// Runs `waymark-gateway forwarder` with these arguments, expecting it to refuse to start;
/// returns its exit code and stderr. Panics if it prints its listening line or has not
/// exited within 30 s.
pub fn forwarder_refuses(args: &[&str]) -> (Option<i32>, String) {
    let out = Command::new(gateway_bin())
        .arg("forwarder")
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawning waymark-gateway");
    let pid = out.id();
    let waiter = std::thread::spawn(move || out.wait_with_output());
    let deadline = Instant::now() + Duration::from_secs(30);
    while !waiter.is_finished() {
        if Instant::now() >= deadline {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid as i32),
                nix::sys::signal::Signal::SIGKILL,
            );
            panic!("waymark-gateway forwarder {args:?} did not exit");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = waiter.join().expect("waiter").expect("output");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        !stdout.contains("listening"),
        "forwarder {args:?} started: {stdout}"
    );
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into(),
    )
}
