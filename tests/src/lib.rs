//! The end-to-end test harness: starts the real `waymark-resolver` binary on ephemeral
//! loopback ports (reading the bound addresses from its first line of output), talks to it
//! with real DNS and HTTP clients, and stops only the processes it started, by PID.
//!
//! - [`process`]: starting and stopping any child process (one way for all of them).
//! - [`dns`]: DNS queries over UDP and TCP with hickory.
//! - [`browser`]: headless Chromium through selenium, for the web views.
//! - [`gateway`]: the gateway, test backends and TLS material.
//! - [`netns`]: network namespaces for tests that need fixed ports or a resolv.conf.
//! - [`etcd`]: real etcd members and clusters.

pub mod browser;
pub mod dns;
pub mod etcd;
pub mod forwarder;
pub mod gateway;
pub mod hosts;
pub mod netns;
pub mod process;

use std::fmt::{Debug, Display};
use std::future::Future;
use std::io::{BufRead, BufReader};
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use serde_json::Value;
use tokio::net::{TcpListener, ToSocketAddrs};
use tokio::task::JoinHandle;

use crate::process::Proc;

/// The workspace root.
pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ is inside the workspace")
        .to_path_buf()
}

/// The `waymark-resolver` binary (see [`workspace_bin`]).
pub fn resolver_bin() -> PathBuf {
    static BUILT: Mutex<Option<PathBuf>> = Mutex::new(None);
    workspace_bin(&BUILT, "waymark-resolver", "WAYMARK_RESOLVER_BIN")
}

/// Variables cargo sets for the test process itself. A `cargo build` that inherits them
/// sees a different environment than a `cargo build` from a shell and rebuilds what depends
/// on them (ring, rustls, reqwest, the binaries) each time a person switches between the two.
fn cargo_test_only_var(name: &str) -> bool {
    const EXACT: &[&str] = &[
        "CARGO_MANIFEST_DIR",
        "CARGO_MANIFEST_PATH",
        "CARGO_CRATE_NAME",
        "CARGO_PRIMARY_PACKAGE",
        "CARGO_TARGET_TMPDIR",
        "CARGO_RUSTC_CURRENT_DIR",
        "CARGO_MAKEFLAGS",
        "OUT_DIR",
        "RUST_TEST_THREADS",
        "LD_LIBRARY_PATH",
    ];
    EXACT.contains(&name)
        || name.starts_with("CARGO_PKG_")
        || name.starts_with("CARGO_BIN_")
        || name.starts_with("__CARGO")
}

/// A binary of the workspace (package and binary named `name`).
///
/// - `env_var` set (tests/run.sh sets it after building every binary once, up front): that
///   file, and no cargo at all.
/// - Otherwise (`cargo test -p waymark-e2e --test dns` while working on the code): a
///   `cargo build` of that binary, once per test process, in the tests' profile, with the
///   variables cargo set for the test removed, so it is the same build a shell's `cargo
///   build` makes and reuses.
pub fn workspace_bin(built: &Mutex<Option<PathBuf>>, name: &str, env_var: &str) -> PathBuf {
    let mut built = built.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(p) = built.as_ref() {
        return p.clone();
    }
    if let Ok(p) = std::env::var(env_var) {
        let p = PathBuf::from(p);
        assert!(p.exists(), "{env_var}={} does not exist", p.display());
        *built = Some(p.clone());
        return p;
    }
    // target/<profile>/deps/<test> → target/<profile>/<name>
    let exe = std::env::current_exe().expect("test executable path");
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("test runs from target/<profile>/deps");
    let release = profile_dir.ends_with("release");
    let mut cmd = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    for (var, _) in std::env::vars_os() {
        if var.to_str().is_some_and(cargo_test_only_var) {
            cmd.env_remove(&var);
        }
    }
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

/// Tests run checks every few hundred milliseconds, below the production floor of 1 s
/// (`[health] min_interval`, `min_timeout`): the config every test resolver gets lowers the
/// floors to 50 ms, unless the test sets them itself.
pub fn with_test_floors(config: &str) -> String {
    const FLOORS: &str = "min_interval = \"50ms\"\nmin_timeout = \"50ms\"\n";
    if config.contains("min_interval") || config.contains("min_timeout") {
        return config.to_string();
    }
    match config.find("[health]\n") {
        Some(at) => {
            let after = at + "[health]\n".len();
            format!("{}{FLOORS}{}", &config[..after], &config[after..])
        }
        None => format!("{config}\n[health]\n{FLOORS}"),
    }
}

/// A running `waymark-resolver serve` process.
pub struct Resolver {
    proc: Option<Proc>,
    pub dns: SocketAddr,
    pub http: SocketAddr,
    /// The HTTP address, shared with every [`Api`] made for this resolver, so that they
    /// follow it across restarts.
    http_shared: Arc<Mutex<SocketAddr>>,
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
        let config = with_test_floors(opts.config.as_deref().unwrap_or(""));
        let path = dir.path().join("resolver.toml");
        std::fs::write(&path, config).expect("write config");
        args.push("--config".into());
        args.push(path.display().to_string());
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
        let unbound: SocketAddr = "0.0.0.0:0".parse().expect("valid");
        let mut r = Resolver {
            proc: None,
            dns: unbound,
            http: unbound,
            http_shared: Arc::new(Mutex::new(unbound)),
            wrapper: opts.wrapper.clone(),
            data_dir,
            args,
            log,
            _dir: Some(dir),
        };
        r.spawn().expect("resolver starts");
        r
    }

    fn spawn(&mut self) -> anyhow::Result<()> {
        let mut cmd = match self.wrapper.split_first() {
            Some((first, rest)) => {
                let mut cmd = Command::new(first);
                cmd.args(rest).arg(resolver_bin());
                cmd
            }
            None => Command::new(resolver_bin()),
        };
        cmd.args(&self.args).env(
            "RUST_LOG",
            "info,hickory_server=warn,waymark_resolver=debug",
        );
        let (proc, announced) = Proc::spawn(
            cmd,
            "waymark-resolver",
            &self.log,
            "waymark-resolver listening ",
            Duration::from_secs(30),
        )?;
        self.dns = announced.need("dns")?;
        self.http = announced.need("http")?;
        *self.http_shared.lock().unwrap_or_else(|e| e.into_inner()) = self.http;
        self.proc = Some(proc);
        Ok(())
    }

    /// The resolver's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.http)
    }

    pub fn pid(&self) -> Option<u32> {
        self.proc.as_ref().and_then(Proc::pid)
    }

    /// SIGKILL: a crash, with no chance to flush anything.
    pub fn kill(&mut self) {
        if let Some(mut p) = self.proc.take() {
            p.kill();
        }
    }

    /// SIGTERM and wait: a clean stop (SIGKILL after 15 s).
    pub fn stop(&mut self) {
        if let Some(mut p) = self.proc.take() {
            p.terminate(Duration::from_secs(15));
        }
    }

    /// Kills the resolver and starts it again on the same data dir.
    pub fn restart(&mut self) {
        self.kill();
        self.restart_stopped();
    }

    /// Starts a stopped resolver again on the same data dir. Addresses given as port 0 get
    /// new ports (never a port a parallel test may have taken since): `dns`, `http` and every
    /// [`Api`] made for this resolver follow.
    pub fn restart_stopped(&mut self) {
        if let Err(e) = self.spawn() {
            panic!("resolver did not restart: {e:#}");
        }
    }

    /// Starts a stopped resolver again on the addresses it had, for a test where something
    /// that knows the address follows it (a gateway). The ports were released when it
    /// stopped; binding is retried for up to 5 s, and a port taken meanwhile fails the test
    /// with that said.
    pub fn restart_in_place(&mut self) {
        let mut args = self.args.clone();
        for (flag, addr) in [("--dns-addr", self.dns), ("--http-addr", self.http)] {
            if let Some(i) = args.iter().position(|a| a == flag) {
                args[i + 1] = addr.to_string();
            }
        }
        let fresh = std::mem::replace(&mut self.args, args);
        let mut last = None;
        for _ in 0..50 {
            match self.spawn() {
                Ok(()) => {
                    self.args = fresh;
                    return;
                }
                Err(e) => last = Some(e),
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!(
            "resolver did not restart on dns={} http={} (taken meanwhile?): {last:?}",
            self.dns, self.http
        );
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

/// A JSON HTTP client for the registration API of one resolver (it follows restarts).
pub struct Api {
    http: Arc<Mutex<SocketAddr>>,
    pub client: reqwest::Client,
}

impl Api {
    pub fn new(r: &Resolver) -> Api {
        Api {
            http: r.http_shared.clone(),
            client: reqwest::Client::builder()
                .timeout(Duration::from_secs(30))
                .build()
                .expect("client"),
        }
    }

    /// `http://<the resolver's HTTP address>`.
    pub fn base(&self) -> String {
        format!(
            "http://{}",
            self.http.lock().unwrap_or_else(|e| e.into_inner())
        )
    }

    /// The full URL of an API path.
    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base())
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

/// Copies a directory tree (a data dir, a CA) file by file.
pub fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("create the copy's directory");
    for entry in std::fs::read_dir(from).expect("read the directory") {
        let entry = entry.expect("a directory entry");
        let target = to.join(entry.file_name());
        if entry.file_type().expect("its type").is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), target).expect("copy a file");
        }
    }
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

/// A blocking TCP connection to `to` from the loopback address `local` (such as
/// `127.0.0.2`), so that a test can play several clients.
pub fn connect_from(local: &str, to: SocketAddr) -> std::net::TcpStream {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let s = rt
        .block_on(async {
            let socket = tokio::net::TcpSocket::new_v4()?;
            socket.bind(SocketAddr::new(local.parse().expect("an IP"), 0))?;
            socket.connect(to).await?.into_std()
        })
        .unwrap_or_else(|e| panic!("connecting from {local} to {to}: {e}"));
    s.set_nonblocking(false).expect("blocking");
    s
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
