//! The gateway part of the harness: starts the real `waymark-gateway ingress` binary on
//! loopback ports, test backends as their own processes (`gw_backend`), and makes TLS
//! material with rcgen. Stops only the processes it started, by their `Child` handles.

use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{mpsc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use serde_json::Value;

use crate::{until, workspace_bin, Resolver};

/// The `waymark-gateway` binary, built on first use (like [`crate::resolver_bin`]).
pub fn gateway_bin() -> PathBuf {
    static BUILT: Mutex<Option<PathBuf>> = Mutex::new(None);
    workspace_bin(&BUILT, "waymark-gateway", "WAYMARK_GATEWAY_BIN")
}

/// A free loopback port: bound, read and released (the gateway binds it right after).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free loopback port")
        .port()
}

fn loopback(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// How to start a gateway.
#[derive(Default, Clone)]
pub struct GatewayOptions {
    /// Config file body (TOML). A `[shutdown]` table with a short grace period is added
    /// unless the text has one.
    pub config: String,
    /// Serve TLS from this directory too.
    pub tls_dir: Option<PathBuf>,
    /// Accept HTTP/2 without TLS.
    pub h2c: bool,
    pub extra_args: Vec<String>,
}

impl GatewayOptions {
    /// Plain HTTP with this config file body.
    pub fn config(text: impl Into<String>) -> GatewayOptions {
        GatewayOptions {
            config: text.into(),
            ..Default::default()
        }
    }
}

/// A running `waymark-gateway ingress`.
pub struct Gateway {
    child: Option<Child>,
    pub http: SocketAddr,
    pub tls: Option<SocketAddr>,
    pub admin: SocketAddr,
    log: PathBuf,
    dir: tempfile::TempDir,
}

impl Gateway {
    /// Starts a gateway following `registry`; returns once it answers on every listener and
    /// has the registry's state.
    pub fn start(registry: &Resolver, opts: GatewayOptions) -> Gateway {
        let dir = tempfile::tempdir().expect("temp dir");
        let mut config = opts.config.clone();
        if !config.contains("[shutdown]") {
            config.push_str("\n[shutdown]\ngrace_period = \"0s\"\ntimeout = \"1s\"\n");
        }
        let config_path = dir.path().join("gateway.toml");
        std::fs::write(&config_path, &config).expect("write gateway config");
        let log = dir.path().join("gateway.log");
        let mut last_err = None;
        // A port picked free can be taken before the gateway binds it: try again.
        for _ in 0..3 {
            let http = loopback(free_port());
            let admin = loopback(free_port());
            let tls = opts.tls_dir.as_ref().map(|_| loopback(free_port()));
            let mut args: Vec<String> = vec![
                "ingress".into(),
                "--config".into(),
                config_path.display().to_string(),
                "--listen".into(),
                http.to_string(),
                "--admin-addr".into(),
                admin.to_string(),
                "--registry".into(),
                format!("http://{}", registry.http),
            ];
            if let (Some(d), Some(t)) = (&opts.tls_dir, tls) {
                args.extend([
                    "--tls-listen".into(),
                    t.to_string(),
                    "--tls-dir".into(),
                    d.display().to_string(),
                ]);
            }
            if opts.h2c {
                args.push("--h2c".into());
            }
            args.extend(opts.extra_args.iter().cloned());
            match Self::spawn(&args, &log, http, tls, admin) {
                Ok(child) => {
                    return Gateway {
                        child: Some(child),
                        http,
                        tls,
                        admin,
                        log,
                        dir,
                    }
                }
                Err(e) => last_err = Some(e),
            }
        }
        panic!(
            "gateway did not start: {last_err:?}; log:\n{}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
    }

    fn spawn(
        args: &[String],
        log: &Path,
        http: SocketAddr,
        tls: Option<SocketAddr>,
        admin: SocketAddr,
    ) -> anyhow::Result<Child> {
        let log_file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)?;
        let mut child = Command::new(gateway_bin())
            .args(args)
            .env("RUST_LOG", "info,waymark_gateway=debug")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(log_file)
            .spawn()
            .context("spawning waymark-gateway")?;
        let stdout = child.stdout.take().expect("piped");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut announced = false;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = child.try_wait() {
                bail!("gateway exited early with {status}");
            }
            while let Ok(line) = rx.try_recv() {
                announced |= line.starts_with("waymark-gateway listening ");
            }
            let up =
                |a: SocketAddr| TcpStream::connect_timeout(&a, Duration::from_millis(200)).is_ok();
            if announced && up(http) && tls.is_none_or(up) && ready(admin) {
                return Ok(child);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = child.kill();
        let _ = child.wait();
        bail!("gateway not ready within 30 s")
    }

    /// Starts a plain-HTTP gateway with this config file body.
    pub fn with_config(registry: &Resolver, config: &str) -> Gateway {
        Gateway::start(registry, GatewayOptions::config(config))
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.http)
    }

    /// The status of `GET path` with this `Host`, or none when the request failed.
    pub async fn status(&self, c: &reqwest::Client, host: &str, path: &str) -> Option<u16> {
        c.get(self.url(path))
            .header("host", host)
            .send()
            .await
            .map(|r| r.status().as_u16())
            .ok()
    }

    /// Waits (up to 10 s, else panics) until `GET path` with this `Host` answers `want`:
    /// the registry's state and the routes have reached the gateway.
    pub async fn wait_status(&self, c: &reqwest::Client, host: &str, path: &str, want: u16) {
        until(
            &format!("{host}{path} answers {want}"),
            Duration::from_secs(10),
            || self.status(c, host, path),
            |s| *s == Some(want),
        )
        .await;
    }

    pub fn admin_url(&self, path: &str) -> String {
        format!("http://{}{path}", self.admin)
    }

    /// The gateway's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The config file the gateway was started with (rewrite it to reload routes).
    pub fn config_path(&self) -> PathBuf {
        self.dir.path().join("gateway.toml")
    }

    /// A scratch directory that lives as long as the gateway.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
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

    /// `GET /healthz/ready`: status and JSON body.
    pub async fn ready(&self) -> (u16, Value) {
        let resp = reqwest::get(self.admin_url("/healthz/ready"))
            .await
            .expect("admin reachable");
        let status = resp.status().as_u16();
        (status, resp.json().await.unwrap_or(Value::Null))
    }

    /// SIGTERM, then waits up to `within` for the exit; returns the exit status and the time
    /// it took, or none (after a SIGKILL) when it did not exit in time.
    pub fn terminate(&mut self, within: Duration) -> Option<(ExitStatus, Duration)> {
        let mut child = self.child.take()?;
        let started = Instant::now();
        let _ = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status();
        while started.elapsed() < within {
            if let Ok(Some(status)) = child.try_wait() {
                return Some((status, started.elapsed()));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = child.kill();
        let _ = child.wait();
        None
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Whether `/healthz/ready` answers 200 (blocking; for startup).
fn ready(admin: SocketAddr) -> bool {
    use std::io::{Read, Write};
    let Ok(mut s) = TcpStream::connect_timeout(&admin, Duration::from_millis(200)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
    let req = format!("GET /healthz/ready HTTP/1.1\r\nHost: {admin}\r\nConnection: close\r\n\r\n");
    if s.write_all(req.as_bytes()).is_err() {
        return false;
    }
    let mut buf = String::new();
    let _ = s.read_to_string(&mut buf);
    buf.starts_with("HTTP/1.1 200")
}

/// A `gw_backend` process: pass the binary (`env!("CARGO_BIN_EXE_gw_backend")` in a test).
pub struct Backend {
    child: Option<Child>,
    bin: PathBuf,
    pub id: String,
    pub addr: SocketAddr,
    extra: Vec<String>,
}

impl Backend {
    pub fn start(bin: &str, id: &str) -> Backend {
        Self::with_args(bin, id, &[])
    }

    /// With extra arguments, such as `["--status", "503"]`.
    pub fn with_args(bin: &str, id: &str, extra: &[&str]) -> Backend {
        let mut b = Backend {
            child: None,
            bin: PathBuf::from(bin),
            id: id.to_string(),
            addr: loopback(0),
            extra: extra.iter().map(|s| s.to_string()).collect(),
        };
        b.spawn(loopback(0)).expect("backend starts");
        b
    }

    fn spawn(&mut self, addr: SocketAddr) -> anyhow::Result<()> {
        let mut child = Command::new(&self.bin)
            .args(["--addr", &addr.to_string(), "--id", &self.id])
            .args(&self.extra)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .context("spawning gw_backend")?;
        let stdout = child.stdout.take().expect("piped");
        let mut line = String::new();
        BufReader::new(stdout).read_line(&mut line)?;
        let Some(a) = line.trim().strip_prefix("gw_backend listening ") else {
            let _ = child.kill();
            let _ = child.wait();
            bail!("backend did not start: {line:?}");
        };
        self.addr = a.parse()?;
        self.child = Some(child);
        Ok(())
    }

    /// SIGKILL: the process dies with its connections; connects are refused afterwards.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts it again on the same address.
    pub fn restart(&mut self) {
        self.kill();
        let addr = self.addr;
        for _ in 0..50 {
            if self.spawn(addr).is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!("backend {} did not restart on {addr}", self.id);
    }

    /// The registration body for this backend: service, tags, meta and an HTTP check on
    /// `/health` every `check_ms` (none when 0).
    pub fn registration(&self, service: &str, tags: &[&str], meta: Value, check_ms: u64) -> Value {
        let mut body = serde_json::json!({
            "ID": self.id,
            "Name": service,
            "Address": self.addr.ip().to_string(),
            "Port": self.addr.port(),
            "Tags": tags,
            "Meta": meta,
        });
        if check_ms > 0 {
            body["Check"] = serde_json::json!({
                "HTTP": format!("http://{}/health", self.addr),
                "Interval": format!("{check_ms}ms"),
                "Timeout": "500ms",
                "Status": "passing",
            });
        }
        body
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A CA and the leaf certificates it signs, written as `<name>.crt` / `<name>.key`.
pub struct TestCa {
    cert: rcgen::Certificate,
    key: rcgen::KeyPair,
}

impl TestCa {
    pub fn new(name: &str) -> TestCa {
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("CA params");
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, name);
        let key = rcgen::KeyPair::generate().expect("CA key");
        let cert = params.self_signed(&key).expect("CA cert");
        TestCa { cert, key }
    }

    /// The CA certificate, PEM.
    pub fn pem(&self) -> String {
        self.cert.pem()
    }

    /// Writes `<server_name>.crt` and `<server_name>.key` into `dir`, signed by this CA.
    pub fn write_leaf(&self, dir: &Path, server_name: &str) {
        let params =
            rcgen::CertificateParams::new(vec![server_name.to_string()]).expect("leaf params");
        let key = rcgen::KeyPair::generate().expect("leaf key");
        let cert = params
            .signed_by(&key, &self.cert, &self.key)
            .expect("leaf cert");
        // Write to temporary names first so a reload never sees half a pair.
        let crt = dir.join(format!("{server_name}.crt"));
        let keyf = dir.join(format!("{server_name}.key"));
        std::fs::write(dir.join(".key.tmp"), key.serialize_pem()).expect("write key");
        std::fs::write(dir.join(".crt.tmp"), cert.pem()).expect("write cert");
        std::fs::rename(dir.join(".key.tmp"), keyf).expect("rename key");
        std::fs::rename(dir.join(".crt.tmp"), crt).expect("rename cert");
    }
}
