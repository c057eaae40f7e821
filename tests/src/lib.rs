//! The end-to-end test harness: starts the real `waymark-resolver` binary on ephemeral
//! loopback ports (reading the bound addresses from its first line of output), talks to it
//! with real DNS and HTTP clients, and stops only the processes it started, by PID.

pub mod dns;
pub mod gateway;

use std::fmt::{Debug, Display};
use std::future::Future;
use std::io::{BufRead, BufReader};
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{mpsc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use serde_json::Value;
use tokio::net::{TcpListener, ToSocketAddrs};
use tokio::task::JoinHandle;

/// The workspace root.
pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ is inside the workspace")
        .to_path_buf()
}

/// The `waymark-resolver` binary, built on first use when it is not there yet.
pub fn resolver_bin() -> PathBuf {
    static BUILT: Mutex<Option<PathBuf>> = Mutex::new(None);
    workspace_bin(&BUILT, "waymark-resolver", "WAYMARK_RESOLVER_BIN")
}

/// A binary of the workspace (package and binary named `name`): the path in `env_var` when
/// set, else built with cargo once per test process (`built` remembers it) in the profile the
/// tests run in.
pub fn workspace_bin(built: &Mutex<Option<PathBuf>>, name: &str, env_var: &str) -> PathBuf {
    let mut built = built.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(p) = built.as_ref() {
        return p.clone();
    }
    if let Ok(p) = std::env::var(env_var) {
        *built = Some(PathBuf::from(&p));
        return PathBuf::from(p);
    }
    // target/<profile>/deps/<test> → target/<profile>/<name>
    let exe = std::env::current_exe().expect("test executable path");
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("test runs from target/<profile>/deps");
    let release = profile_dir.ends_with("release");
    let mut cmd = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    cmd.args(["build", "-q", "-p", name, "--bin", name])
        .current_dir(root());
    if release {
        cmd.arg("--release");
    }
    let status = cmd.status().expect("running cargo build");
    assert!(status.success(), "building {name} failed");
    let bin = profile_dir.join(name);
    assert!(bin.exists(), "{} missing after build", bin.display());
    *built = Some(bin.clone());
    bin
}

/// A running `waymark-resolver serve` process.
pub struct Resolver {
    child: Option<Child>,
    pub dns: SocketAddr,
    pub http: SocketAddr,
    pub data_dir: PathBuf,
    args: Vec<String>,
    wrapper: Vec<String>,
    log: PathBuf,
    _dir: Option<tempfile::TempDir>,
}

/// How to start a resolver.
#[derive(Default, Clone)]
pub struct Options {
    /// Config file contents (TOML); none means flags only.
    pub config: Option<String>,
    /// Upstream resolvers; none means a closed loopback port, so nothing leaves the machine.
    pub upstreams: Vec<SocketAddr>,
    pub extra_args: Vec<String>,
    pub data_dir: Option<PathBuf>,
    pub dns_addr: Option<SocketAddr>,
    pub http_addr: Option<SocketAddr>,
    /// A command the resolver runs under, such as [`PrivateTmpfs::enter`].
    pub wrapper: Vec<String>,
}

impl Resolver {
    pub fn start() -> Resolver {
        Self::with(Options::default())
    }

    pub fn with(opts: Options) -> Resolver {
        let dir = tempfile::tempdir().expect("temp dir");
        let data_dir = opts
            .data_dir
            .clone()
            .unwrap_or_else(|| dir.path().join("data"));
        let mut args: Vec<String> = vec![
            "serve".into(),
            "--dns-addr".into(),
            opts.dns_addr
                .map_or("127.0.0.1:0".into(), |a| a.to_string()),
            "--http-addr".into(),
            opts.http_addr
                .map_or("127.0.0.1:0".into(), |a| a.to_string()),
            "--data-dir".into(),
            data_dir.display().to_string(),
        ];
        if let Some(config) = &opts.config {
            let path = dir.path().join("resolver.toml");
            std::fs::write(&path, config).expect("write config");
            args.push("--config".into());
            args.push(path.display().to_string());
        }
        let upstreams = if opts.upstreams.is_empty() {
            // Port 9 (discard) on loopback: forwarding fails fast and stays on this machine.
            vec!["127.0.0.1:9".parse().expect("valid")]
        } else {
            opts.upstreams.clone()
        };
        for u in upstreams {
            args.push("--upstream".into());
            args.push(u.to_string());
        }
        args.extend(opts.extra_args.iter().cloned());
        let log = dir.path().join("resolver.log");
        let mut r = Resolver {
            wrapper: opts.wrapper.clone(),
            child: None,
            dns: "0.0.0.0:0".parse().expect("valid"),
            http: "0.0.0.0:0".parse().expect("valid"),
            data_dir,
            args,
            log,
            _dir: Some(dir),
        };
        r.spawn().expect("resolver starts");
        r
    }

    fn spawn(&mut self) -> anyhow::Result<()> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)?;
        let mut cmd = match self.wrapper.split_first() {
            Some((first, rest)) => {
                let mut cmd = Command::new(first);
                cmd.args(rest).arg(resolver_bin());
                cmd
            }
            None => Command::new(resolver_bin()),
        };
        let mut child = cmd
            .args(&self.args)
            .env(
                "RUST_LOG",
                "info,hickory_server=warn,waymark_resolver=debug",
            )
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()
            .context("spawning waymark-resolver")?;
        let stdout = child.stdout.take().expect("piped");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let line = match rx.recv_timeout(left) {
                Ok(line) => line,
                Err(_) => bail!(
                    "resolver did not report its addresses; log:\n{}",
                    self.log()
                ),
            };
            if let Some(rest) = line.strip_prefix("waymark-resolver listening ") {
                for word in rest.split_whitespace() {
                    if let Some(a) = word.strip_prefix("dns=") {
                        self.dns = a.parse()?;
                    } else if let Some(a) = word.strip_prefix("http=") {
                        self.http = a.parse()?;
                    }
                }
                return Ok(());
            }
        }
    }

    /// The resolver's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.http)
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// SIGKILL: a crash, with no chance to flush anything.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM and wait: a clean stop.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = Command::new("kill")
                .args(["-TERM", &c.id().to_string()])
                .status();
            let deadline = Instant::now() + Duration::from_secs(15);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = c.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts the same resolver again (same data dir) on the same addresses.
    pub fn restart(&mut self) {
        self.kill();
        self.restart_stopped();
    }

    /// Starts a stopped resolver again, keeping its addresses and data dir.
    pub fn restart_stopped(&mut self) {
        let pin = |args: &mut Vec<String>, flag: &str, addr: SocketAddr| {
            if let Some(i) = args.iter().position(|a| a == flag) {
                args[i + 1] = addr.to_string();
            }
        };
        let (dns, http) = (self.dns, self.http);
        pin(&mut self.args, "--dns-addr", dns);
        pin(&mut self.args, "--http-addr", http);
        // The ports were just released; retry briefly if the kernel has not let go yet.
        for _ in 0..50 {
            if self.spawn().is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!("resolver did not restart; log:\n{}", self.log());
    }
}

impl Drop for Resolver {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Runs `waymark-resolver serve` with these arguments (addresses on port 0 are added) and
/// expects it to refuse to start: returns its exit code and what it wrote to stderr. Panics
/// if it starts serving or has not exited within 30 s (it is then killed).
pub fn resolver_refuses(args: &[&str]) -> (Option<i32>, String) {
    let mut child = Command::new(resolver_bin())
        .args([
            "serve",
            "--dns-addr",
            "127.0.0.1:0",
            "--http-addr",
            "127.0.0.1:0",
        ])
        .args(["--upstream", "127.0.0.1:9"])
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawning waymark-resolver");
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(status) = child.try_wait().expect("waiting") {
            break status;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("waymark-resolver {args:?} did not exit");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut stdout = String::new();
    let mut stderr = String::new();
    use std::io::Read;
    let _ = child
        .stdout
        .take()
        .expect("piped")
        .read_to_string(&mut stdout);
    let _ = child
        .stderr
        .take()
        .expect("piped")
        .read_to_string(&mut stderr);
    assert!(
        !stdout.contains("listening"),
        "waymark-resolver {args:?} started: {stdout}"
    );
    (status.code(), stderr)
}

/// A tmpfs of a fixed size in a private mount namespace that a process of this harness holds
/// open, so that nothing is mounted on the machine itself. Commands run in it through
/// [`PrivateTmpfs::enter`] (a command prefix) or [`PrivateTmpfs::sh`], and see the tmpfs at
/// `dir`. Needs root (see [`is_root`]); the holder is stopped, by PID, on drop.
pub struct PrivateTmpfs {
    holder: Child,
    pub dir: PathBuf,
    _tmp: tempfile::TempDir,
}

impl PrivateTmpfs {
    /// Mounts a tmpfs of `size` (`mount -o size=`, such as `1m`).
    pub fn mount(size: &str) -> anyhow::Result<PrivateTmpfs> {
        let tmp = tempfile::tempdir()?;
        let dir = tmp.path().join("tmpfs");
        std::fs::create_dir(&dir)?;
        let mut holder = Command::new("unshare")
            .args(["--mount", "--propagation", "private", "sh", "-c"])
            .arg(r#"mount -t tmpfs -o "size=$1" tmpfs "$2" && echo mounted && exec sleep 3600"#)
            .args(["sh", size])
            .arg(&dir)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .spawn()
            .context("spawning unshare")?;
        let mut line = String::new();
        BufReader::new(holder.stdout.take().expect("piped")).read_line(&mut line)?;
        let fs = PrivateTmpfs {
            holder,
            dir,
            _tmp: tmp,
        };
        if line.trim() != "mounted" {
            bail!("could not mount a tmpfs in a private mount namespace");
        }
        Ok(fs)
    }

    /// The command prefix that runs a command in the namespace.
    pub fn enter(&self) -> Vec<String> {
        [
            "nsenter",
            "--target",
            &self.holder.id().to_string(),
            "--mount",
            "--",
        ]
        .map(String::from)
        .to_vec()
    }

    /// Runs a shell script in the namespace; returns its stdout, panicking unless it succeeds.
    pub fn sh(&self, script: &str) -> Vec<u8> {
        let out = Command::new("nsenter")
            .args(["--target", &self.holder.id().to_string(), "--mount", "--"])
            .args(["sh", "-c", script])
            .output()
            .expect("running nsenter");
        assert!(
            out.status.success(),
            "{script}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        out.stdout
    }
}

impl Drop for PrivateTmpfs {
    fn drop(&mut self) {
        let _ = self.holder.kill();
        let _ = self.holder.wait();
    }
}

/// Whether the tests run as root (mounting needs it).
pub fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
}

/// A JSON HTTP client for the registration API.
pub struct Api {
    pub base: String,
    pub client: reqwest::Client,
}

impl Api {
    pub fn new(r: &Resolver) -> Api {
        Api {
            base: format!("http://{}", r.http),
            client: reqwest::Client::builder()
                .timeout(Duration::from_secs(30))
                .build()
                .expect("client"),
        }
    }

    /// The full URL of an API path.
    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    pub async fn put(&self, path: &str, body: serde_json::Value) -> reqwest::Response {
        self.client
            .put(self.url(path))
            .json(&body)
            .send()
            .await
            .expect("API reachable")
    }

    pub async fn put_empty(&self, path: &str) -> reqwest::Response {
        self.client
            .put(self.url(path))
            .send()
            .await
            .expect("API reachable")
    }

    pub async fn get(&self, path: &str) -> reqwest::Response {
        self.client
            .get(self.url(path))
            .send()
            .await
            .expect("API reachable")
    }

    /// Registers an instance with no checks (passing at once); panics unless 200.
    pub async fn register(&self, body: serde_json::Value) {
        let resp = self.put("/v1/agent/service/register", body).await;
        let status = resp.status();
        assert_eq!(
            status,
            200,
            "register: {}",
            resp.text().await.unwrap_or_default()
        );
    }

    /// The instance IDs `GET /v1/health/service/<service>?passing` returns, sorted.
    pub async fn passing_ids(&self, service: &str) -> Vec<String> {
        let v: Value = self
            .get(&format!("/v1/health/service/{service}?passing"))
            .await
            .json()
            .await
            .unwrap();
        let mut ids: Vec<String> = v
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["Service"]["ID"].as_str().unwrap().to_string())
            .collect();
        ids.sort();
        ids
    }

    /// The IDs of every registered instance (`GET /v1/agent/services`), sorted.
    pub async fn registered_ids(&self) -> Vec<String> {
        let v: Value = self.get("/v1/agent/services").await.json().await.unwrap();
        let mut ids: Vec<String> = v.as_object().unwrap().keys().cloned().collect();
        ids.sort();
        ids
    }
}

/// A response's `X-Consul-Index` header as a number; panics when it is missing or malformed.
pub fn consul_index(resp: &reqwest::Response) -> u64 {
    resp.headers()["x-consul-index"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap()
}

/// Polls `f` every 10 ms until it returns true or `timeout` passes; returns whether it did.
pub async fn eventually<F, Fut>(timeout: Duration, mut f: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if f().await {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Polls `fetch` (through [`eventually`]) until `cond` holds, within `timeout`; returns the
/// observation that satisfied it, or panics with the last one seen.
pub async fn until<T, Fut>(
    what: &str,
    timeout: Duration,
    fetch: impl Fn() -> Fut,
    cond: impl Fn(&T) -> bool,
) -> T
where
    T: Debug + Clone,
    Fut: Future<Output = T>,
{
    let last: Mutex<Option<T>> = Mutex::new(None);
    let (last_ref, fetch, cond) = (&last, &fetch, &cond);
    let ok = eventually(timeout, move || async move {
        let seen = fetch().await;
        let ok = cond(&seen);
        *last_ref.lock().unwrap() = Some(seen);
        ok
    })
    .await;
    let last = last.into_inner().unwrap();
    assert!(ok, "{what}: not within {timeout:?}; last seen: {last:#?}");
    last.expect("polled at least once")
}

/// An IP address from its text; panics when it is not one.
pub fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

/// IP addresses from their text, sorted (as [`dns::addresses`] and [`dns::a_records`] are).
pub fn ips(list: &[&str]) -> Vec<IpAddr> {
    let mut v: Vec<IpAddr> = list.iter().map(|s| ip(s)).collect();
    v.sort();
    v
}

/// A TCP listener that accepts (and drops) connections until its task is aborted; returns
/// the bound address and the task. `addr` may be `"127.0.0.1:0"` (any free port) or a fixed
/// address, such as one a listener just released: binding is retried for up to 5 s.
pub async fn tcp_listener<A>(addr: A) -> (SocketAddr, JoinHandle<()>)
where
    A: ToSocketAddrs + Display + Copy,
{
    let mut last_err = None;
    for _ in 0..50 {
        match TcpListener::bind(addr).await {
            Ok(listener) => {
                let addr = listener.local_addr().unwrap();
                let task = tokio::spawn(async move {
                    loop {
                        match listener.accept().await {
                            Ok((stream, _)) => drop(stream),
                            Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
                        }
                    }
                });
                return (addr, task);
            }
            Err(e) => last_err = Some(e),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("cannot listen on {addr}: {last_err:?}");
}

/// Whether a command is on PATH.
pub fn have(cmd: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {cmd}")])
        .stdout(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}
