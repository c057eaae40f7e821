//! Several hosts on one machine, for multi-host tests: each host is a network namespace (with
//! a mount namespace of its own, for its own `/etc/resolv.conf`) that has one interface,
//! `eth0`, with the address `10.77.0.<n>/24`; the hosts are joined by a bridge that lives in a
//! namespace of its own. Nothing is added to the machine's own network, and everything goes
//! when [`Hosts`] is dropped: each namespace is held by a `sleep` process that the harness
//! started and kills by PID.
//!
//! Processes run on a host through [`Hosts::command`] (`nsenter` into its namespaces). Needs
//! root; without it (or without namespaces) [`Hosts::new`] says why and returns `None`, and
//! the test skips, unless `WAYMARK_E2E_REQUIRE_NETNS` is set.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The hosts' subnet: `10.77.0.0/24`, host `n` (from 1) at `10.77.0.<n>`.
pub fn host_addr(n: usize) -> Ipv4Addr {
    Ipv4Addr::new(10, 77, 0, n as u8)
}

/// One host: its namespaces' holder process and its address.
pub struct Host {
    pub name: String,
    pub addr: Ipv4Addr,
    holder: Child,
    resolv_conf: PathBuf,
}

impl Host {
    pub fn pid(&self) -> u32 {
        self.holder.id()
    }
}

pub struct Hosts {
    bridge: Child,
    pub hosts: Vec<Host>,
    dir: tempfile::TempDir,
}

/// How long the namespaces' holders live at most, whatever happens to the test.
const HOLD: &str = "1800";

impl Hosts {
    /// Creates the bridge and one host per name; `None` (after saying why) when this machine
    /// does not allow it.
    pub fn new(names: &[&str]) -> Option<Hosts> {
        if !crate::is_root() {
            return skip("multi-host tests need root (network namespaces, veth pairs)");
        }
        let dir = tempfile::tempdir().expect("temp dir");
        let bridge = match hold(&dir.path().join("bridge.ready"), None) {
            Ok(c) => c,
            Err(e) => return skip(&format!("cannot make a network namespace: {e}")),
        };
        let mut hosts = Hosts {
            bridge,
            hosts: Vec::new(),
            dir,
        };
        let br = hosts.bridge.id();
        hosts.run_in(
            br,
            "ip link add br0 type bridge && ip link set br0 up && ip link set lo up",
        );
        for (i, name) in names.iter().enumerate() {
            let n = i + 1;
            let resolv_conf = hosts.dir.path().join(format!("{name}.resolv.conf"));
            std::fs::write(&resolv_conf, "nameserver 127.0.0.1\n").expect("write resolv.conf");
            let holder = hold(
                &hosts.dir.path().join(format!("{name}.ready")),
                Some(&resolv_conf),
            )
            .unwrap_or_else(|e| panic!("host {name}: {e}"));
            let pid = holder.id();
            let addr = host_addr(n);
            hosts.run_in(
                br,
                &format!(
                    "ip link add v{n} type veth peer name eth0 netns {pid} && \
                     ip link set v{n} master br0 && ip link set v{n} up"
                ),
            );
            hosts.run_in(
                pid,
                &format!("ip addr add {addr}/24 dev eth0 && ip link set eth0 up"),
            );
            hosts.hosts.push(Host {
                name: name.to_string(),
                addr,
                holder,
                resolv_conf,
            });
        }
        Some(hosts)
    }

    /// A command that runs `program` on host `i` (from 0), in its network and mount
    /// namespaces.
    pub fn command(&self, i: usize, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut cmd = Command::new("nsenter");
        cmd.args(["-t", &self.hosts[i].pid().to_string(), "-n", "-m", "--"])
            .arg(program);
        cmd
    }

    /// The `nsenter` prefix for host `i`, for harness types that take a wrapper command.
    pub fn wrapper(&self, i: usize) -> Vec<String> {
        vec![
            "nsenter".into(),
            "-t".into(),
            self.hosts[i].pid().to_string(),
            "-n".into(),
            "-m".into(),
            "--".into(),
        ]
    }

    /// Points host `i`'s `/etc/resolv.conf` at `nameserver` (the file is bind-mounted there in
    /// the host's mount namespace, so writing it is enough).
    pub fn set_nameserver(&self, i: usize, nameserver: Ipv4Addr) {
        std::fs::write(
            &self.hosts[i].resolv_conf,
            format!("nameserver {nameserver}\noptions timeout:2 attempts:2\n"),
        )
        .expect("write resolv.conf");
    }

    /// Runs a shell script on host `i`, bounded to 30 s; its output, or a panic with it.
    pub fn sh(&self, i: usize, script: &str) -> String {
        let mut cmd = self.command(i, "sh");
        cmd.args(["-c", script]);
        let (status, out) = crate::netns::run_bounded(
            cmd,
            &self.dir.path().join("sh.log"),
            Duration::from_secs(30),
            None,
        );
        match status {
            Some(s) if s.success() => out,
            _ => panic!("on {}: {script}: {status:?}: {out}", self.hosts[i].name),
        }
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    fn run_in(&self, pid: u32, script: &str) {
        let out = Command::new("nsenter")
            .args(["-t", &pid.to_string(), "-n", "--", "sh", "-c", script])
            .output()
            .expect("nsenter");
        assert!(
            out.status.success(),
            "{script}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

impl Drop for Hosts {
    fn drop(&mut self) {
        for h in &mut self.hosts {
            let _ = h.holder.kill();
            let _ = h.holder.wait();
        }
        let _ = self.bridge.kill();
        let _ = self.bridge.wait();
    }
}

/// Starts a process that holds a new network namespace (and, with a resolv.conf, a new mount
/// namespace where that file is bind-mounted over `/etc/resolv.conf`), with `lo` up; returns
/// once it is ready.
fn hold(ready: &Path, resolv_conf: Option<&Path>) -> Result<Child, String> {
    let mut script = String::from("ip link set lo up");
    let mut flags = vec!["--net"];
    if let Some(rc) = resolv_conf {
        flags.extend(["--mount", "--propagation", "private"]);
        script += &format!(" && mount --bind '{}' /etc/resolv.conf", rc.display());
    }
    script += &format!(" && touch '{}' && exec sleep {HOLD}", ready.display());
    let mut child = Command::new("unshare")
        .args(&flags)
        .args(["--", "sh", "-c", &script])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("unshare: {e}"))?;
    let deadline = Instant::now() + Duration::from_secs(10);
    while !ready.exists() {
        if let Some(status) = child.try_wait().map_err(|e| e.to_string())? {
            let mut err = String::new();
            if let Some(mut e) = child.stderr.take() {
                use std::io::Read;
                let _ = e.read_to_string(&mut err);
            }
            return Err(format!("unshare {}: {status}: {err}", flags.join(" ")));
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            return Err("the namespace holder did not get ready in 10 s".into());
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    Ok(child)
}

fn skip<T>(why: &str) -> Option<T> {
    if std::env::var_os("WAYMARK_E2E_REQUIRE_NETNS").is_some() {
        panic!("{why}, and WAYMARK_E2E_REQUIRE_NETNS is set");
    }
    eprintln!("skipping: {why}");
    None
}
