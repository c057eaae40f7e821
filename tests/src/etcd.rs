//! Real etcd for tests (Debian's `etcd-server`, 3.4): one member or a cluster, as processes
//! the harness starts and stops by handle. Members reach each other over unix sockets named
//! `<member>:1` in the cluster's temporary directory (etcd takes `unix://host:port` and makes
//! a socket file of that name, relative to its working directory), so no peer port is
//! guessed; clients are served on 127.0.0.1, port 0, and the bound port is read from etcd's
//! log (`serving insecure client requests on 127.0.0.1:PORT`). A member restarted "in place"
//! listens on the port it had, so that clients configured with it reach it again.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::process::{Announced, Proc};

/// The `etcd` binary: `WAYMARK_ETCD_BIN`, else `etcd` on the PATH. Fails, saying how to get
/// it, when there is none (tests/run.sh installs Debian's etcd-server as root).
pub fn etcd_bin() -> PathBuf {
    let bin = std::env::var_os("WAYMARK_ETCD_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("etcd"));
    let ok = Command::new(&bin)
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    assert!(
        ok,
        "these tests need etcd ({}): apt-get install etcd-server (tests/run.sh does as root)",
        bin.display()
    );
    bin
}

struct Member {
    name: String,
    proc: Option<Proc>,
    client: SocketAddr,
}

pub struct EtcdCluster {
    dir: tempfile::TempDir,
    members: Vec<Member>,
    /// The command members run under (`nsenter` into a host's namespaces), if any.
    wrapper: Vec<String>,
}

const START: Duration = Duration::from_secs(30);

impl EtcdCluster {
    /// A cluster of `n` members (1 or 3, usually), started and serving.
    pub fn start(n: usize) -> EtcdCluster {
        let dir = tempfile::tempdir().expect("temp dir");
        let names: Vec<String> = (1..=n).map(|i| format!("n{i}")).collect();
        let initial = names
            .iter()
            .map(|m| format!("{m}=unix://{m}:1"))
            .collect::<Vec<_>>()
            .join(",");
        let mut cluster = EtcdCluster {
            dir,
            members: Vec::new(),
            wrapper: Vec::new(),
        };
        // Members of a new cluster wait for each other: start them all, then read each one's
        // client address.
        let mut starting = Vec::new();
        for name in &names {
            starting.push(std::thread::spawn({
                let (dir, name, initial) = (
                    cluster.dir.path().to_path_buf(),
                    name.clone(),
                    initial.clone(),
                );
                move || spawn_member(&dir, &name, &initial, "new", "127.0.0.1:0", &[])
            }));
        }
        for (name, t) in names.iter().zip(starting) {
            let (proc, client) = t.join().expect("member thread");
            cluster.members.push(Member {
                name: name.clone(),
                proc: Some(proc),
                client,
            });
        }
        cluster
    }

    /// One member serving clients on `client` (a fixed address inside a host's network
    /// namespace), run under `wrapper` (`Hosts::wrapper`).
    pub fn start_on(wrapper: Vec<String>, client: SocketAddr) -> EtcdCluster {
        let dir = tempfile::tempdir().expect("temp dir");
        let (proc, bound) = spawn_member(
            dir.path(),
            "n1",
            "n1=unix://n1:1",
            "new",
            &client.to_string(),
            &wrapper,
        );
        EtcdCluster {
            dir,
            members: vec![Member {
                name: "n1".into(),
                proc: Some(proc),
                client: bound,
            }],
            wrapper,
        }
    }

    /// Every member's client URL, comma-separated (what `--etcd` takes).
    pub fn endpoints(&self) -> String {
        self.members
            .iter()
            .map(|m| format!("http://{}", m.client))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// One member's client URL.
    pub fn endpoint(&self, i: usize) -> String {
        format!("http://{}", self.members[i].client)
    }

    /// SIGKILL one member.
    pub fn kill(&mut self, i: usize) {
        if let Some(mut p) = self.members[i].proc.take() {
            p.kill();
        }
    }

    /// Starts a killed member again, with its data, on the client port it had.
    pub fn restart_in_place(&mut self, i: usize) {
        assert!(self.members[i].proc.is_none(), "member {i} is running");
        let initial = self
            .members
            .iter()
            .map(|m| format!("{0}=unix://{0}:1", m.name))
            .collect::<Vec<_>>()
            .join(",");
        let m = &self.members[i];
        // The socket file of the killed member is still there; etcd would refuse to bind it.
        let _ = std::fs::remove_file(self.dir.path().join(format!("{}:1", m.name)));
        let (proc, client) = spawn_member(
            self.dir.path(),
            &m.name,
            &initial,
            "existing",
            &m.client.to_string(),
            &self.wrapper,
        );
        assert_eq!(client, m.client);
        self.members[i].proc = Some(proc);
    }
}

/// Starts one member and returns it with its client address.
fn spawn_member(
    dir: &Path,
    name: &str,
    initial: &str,
    state: &str,
    client: &str,
    wrapper: &[String],
) -> (Proc, SocketAddr) {
    let peer = format!("unix://{name}:1");
    let client = format!("http://{client}");
    let mut cmd = match wrapper.split_first() {
        Some((first, rest)) => {
            let mut c = Command::new(first);
            c.args(rest).arg("sh");
            c
        }
        None => Command::new("sh"),
    };
    // etcd logs to stderr; the harness reads what a process announces on stdout.
    cmd.current_dir(dir)
        .args(["-c", "exec \"$0\" \"$@\" 2>&1"])
        .arg(etcd_bin())
        .args(["--name", name])
        .arg("--data-dir")
        .arg(dir.join(format!("{name}.data")))
        .args(["--listen-peer-urls", &peer])
        .args(["--initial-advertise-peer-urls", &peer])
        .args(["--initial-cluster", initial])
        .args(["--initial-cluster-state", state])
        .args(["--initial-cluster-token", "waymark-test"])
        .args(["--listen-client-urls", &client])
        .args(["--advertise-client-urls", &client])
        // Quick elections: a killed leader is replaced in about a second.
        .args(["--heartbeat-interval", "50", "--election-timeout", "500"]);
    let matcher = |line: &str| {
        let rest = line.split("serving insecure client requests on ").nth(1)?;
        let addr = rest.split([',', ' ']).next()?;
        Some(Announced::parse(&format!("client={addr}")))
    };
    let (proc, announced) = Proc::spawn_matching(
        cmd,
        &format!("etcd {name}"),
        &dir.join(format!("{name}.log")),
        matcher,
        START,
        true,
    )
    .unwrap_or_else(|e| panic!("etcd member {name}: {e:#}"));
    let client = announced.need("client").expect("etcd's client address");
    (proc, client)
}
