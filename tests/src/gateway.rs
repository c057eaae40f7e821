//! The gateway part of the harness: starts the real `waymark-gateway ingress` binary on
//! loopback ports, test backends as their own processes (`gw_backend`), and makes TLS
//! material with rcgen. Stops only the processes it started, by their `Child` handles.

use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use serde_json::Value;

use crate::process::Proc;
use crate::{until, workspace_bin, Resolver};

/// The `waymark-gateway` binary, built on first use (like [`crate::resolver_bin`]).
pub fn gateway_bin() -> PathBuf {
    static BUILT: Mutex<Option<PathBuf>> = Mutex::new(None);
    workspace_bin(&BUILT, "waymark-gateway", "WAYMARK_GATEWAY_BIN")
}

fn loopback(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// A loopback port that refuses connections and that no one else can take while the
/// returned socket lives: bound, never listening.
pub fn closed_port() -> (u16, std::net::UdpSocket, tokio::net::TcpSocket) {
    let tcp = tokio::net::TcpSocket::new_v4().expect("socket");
    tcp.bind(loopback(0)).expect("bind a loopback port");
    let port = tcp.local_addr().expect("bound").port();
    // The UDP port of the same number too, for DNS-style uses.
    let udp = std::net::UdpSocket::bind(loopback(port)).unwrap_or_else(|_| {
        std::net::UdpSocket::bind(loopback(0)).expect("bind a loopback UDP port")
    });
    (port, udp, tcp)
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

/// A running `waymark-gateway ingress`, on the ports it bound (port 0 for each listener).
pub struct Gateway {
    proc: Proc,
    pub http: SocketAddr,
    pub tls: Option<SocketAddr>,
    pub admin: SocketAddr,
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
        let any = loopback(0).to_string();
        let mut args: Vec<String> = vec![
            "ingress".into(),
            "--config".into(),
            config_path.display().to_string(),
            "--listen".into(),
            any.clone(),
            "--admin-addr".into(),
            any.clone(),
            "--registry".into(),
            format!("http://{}", registry.http),
        ];
        if let Some(d) = &opts.tls_dir {
            args.extend([
                "--tls-listen".into(),
                any.clone(),
                "--tls-dir".into(),
                d.display().to_string(),
            ]);
        }
        if opts.h2c {
            args.push("--h2c".into());
        }
        // The whole suite runs on either HTTP/1.1 data path.
        if let Ok(path) = std::env::var("WAYMARK_GATEWAY_DATA_PATH") {
            args.extend(["--data-path".into(), path]);
        }
        args.extend(opts.extra_args.iter().cloned());
        let mut cmd = Command::new(gateway_bin());
        cmd.args(&args)
            .env("RUST_LOG", "info,waymark_gateway=debug");
        let started = Proc::spawn(
            cmd,
            "waymark-gateway",
            &log,
            "waymark-gateway listening ",
            Duration::from_secs(30),
        )
        .and_then(|(proc, announced)| {
            let gw = Gateway {
                http: announced.need("http")?,
                tls: announced.addr("tls"),
                admin: announced.need("admin")?,
                proc,
                dir,
            };
            if opts.tls_dir.is_some() && gw.tls.is_none() {
                bail!("no tls= address announced: {}", announced.text);
            }
            Ok(gw)
        });
        let mut gw = started.unwrap_or_else(|e| panic!("gateway did not start: {e:#}"));
        let deadline = Instant::now() + Duration::from_secs(30);
        while !ready(gw.admin) {
            assert!(
                gw.proc.running(),
                "gateway exited while starting; log:\n{}",
                gw.log()
            );
            assert!(
                Instant::now() < deadline,
                "gateway not ready within 30 s; log:\n{}",
                gw.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        gw
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
        self.proc.log()
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
        self.proc.pid()
    }

    /// Sends a signal (SIGHUP: reload) without waiting.
    pub fn signal(&self, signal: nix::sys::signal::Signal) {
        self.proc.signal(signal)
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
        self.proc.terminate(within)
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
/// Any test server bin that takes `--addr` and `--id` and prints `<bin> listening ADDR`
/// works too (`line_echo`).
pub struct Backend {
    proc: Option<Proc>,
    bin: PathBuf,
    pub id: String,
    pub addr: SocketAddr,
    extra: Vec<String>,
    log: tempfile::NamedTempFile,
}

impl Backend {
    pub fn start(bin: &str, id: &str) -> Backend {
        Self::with_args(bin, id, &[])
    }

    /// With extra arguments, such as `["--status", "503"]`.
    pub fn with_args(bin: &str, id: &str, extra: &[&str]) -> Backend {
        Self::start_on(bin, id, loopback(0), extra)
    }

    /// On this address (such as `127.0.9.2:<the port of another instance>`: instances of
    /// one service on one port, on addresses of their own).
    pub fn start_on(bin: &str, id: &str, addr: SocketAddr, extra: &[&str]) -> Backend {
        let mut b = Backend {
            proc: None,
            bin: PathBuf::from(bin),
            id: id.to_string(),
            addr,
            extra: extra.iter().map(|s| s.to_string()).collect(),
            log: tempfile::NamedTempFile::new().expect("backend log file"),
        };
        b.spawn(addr).expect("backend starts");
        b
    }

    fn spawn(&mut self, addr: SocketAddr) -> anyhow::Result<()> {
        let mut cmd = Command::new(&self.bin);
        cmd.args(["--addr", &addr.to_string(), "--id", &self.id])
            .args(&self.extra);
        let name = self
            .bin
            .file_stem()
            .map_or("gw_backend".into(), |s| s.to_string_lossy().to_string());
        let (proc, announced) = Proc::spawn(
            cmd,
            &name,
            self.log.path(),
            &format!("{name} listening "),
            Duration::from_secs(10),
        )?;
        self.addr = announced
            .text
            .parse()
            .with_context(|| format!("backend address {:?}", announced.text))?;
        self.proc = Some(proc);
        Ok(())
    }

    /// The sockets the backend process holds open now: its listener and one per connection
    /// (the gateway's pooled ones included).
    pub fn sockets(&self) -> usize {
        let Some(pid) = self.proc.as_ref().and_then(|p| p.pid()) else {
            return 0;
        };
        std::fs::read_dir(format!("/proc/{pid}/fd"))
            .map(|dir| {
                dir.filter_map(Result::ok)
                    .filter(|e| {
                        std::fs::read_link(e.path())
                            .is_ok_and(|l| l.to_string_lossy().starts_with("socket:"))
                    })
                    .count()
            })
            .unwrap_or(0)
    }

    /// SIGKILL: the process dies with its connections; connects are refused afterwards.
    pub fn kill(&mut self) {
        if let Some(mut p) = self.proc.take() {
            p.kill();
        }
    }

    /// Starts it again on the same address: an instance that comes back where it was
    /// registered. Its port was just released; binding is retried briefly.
    pub fn restart(&mut self) {
        self.kill();
        let addr = self.addr;
        let mut last = None;
        for _ in 0..50 {
            match self.spawn(addr) {
                Ok(()) => return,
                Err(e) => last = Some(e),
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!("backend {} did not restart on {addr}: {last:?}", self.id);
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

/// Raw HTTP/1.1 over a blocking `TcpStream`, for what an HTTP client library would hide
/// (pipelining, trickled heads, a client that stops reading).
pub mod raw {
    use std::io::Read;
    use std::net::TcpStream;
    use std::time::{Duration, Instant};

    /// Reads one HTTP/1.1 response with a Content-Length body (or none) from `s`.
    pub fn read_response(s: &mut TcpStream) -> String {
        let mut buf = Vec::new();
        let mut byte = [0u8; 1];
        while !buf.ends_with(b"\r\n\r\n") {
            if s.read(&mut byte).unwrap_or(0) == 0 {
                break;
            }
            buf.push(byte[0]);
        }
        let head = String::from_utf8_lossy(&buf).to_string();
        let len: usize = head
            .lines()
            .find_map(|l| {
                let (k, v) = l.split_once(':')?;
                k.eq_ignore_ascii_case("content-length")
                    .then(|| v.trim().parse().ok())?
            })
            .unwrap_or(0);
        let mut body = vec![0u8; len];
        let _ = s.read_exact(&mut body);
        head + &String::from_utf8_lossy(&body)
    }

    /// Whether the peer closed `s` (EOF or reset) within `within`, and after how long; bytes
    /// that arrive meanwhile are read and dropped.
    pub fn closed_within(s: &mut TcpStream, within: Duration) -> Option<Duration> {
        let started = Instant::now();
        s.set_read_timeout(Some(Duration::from_millis(100)))
            .expect("set a read timeout");
        let mut buf = [0u8; 4096];
        while started.elapsed() < within {
            match s.read(&mut buf) {
                Ok(0) => return Some(started.elapsed()),
                Ok(_) => {}
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) => {}
                Err(_) => return Some(started.elapsed()),
            }
        }
        None
    }
}
