//! The demo's mesh: the per-host forwarder and the ingress gateway, run by
//! `waymark-resolver demo` as child processes of the `waymark-gateway` binary (the one beside
//! this executable, as `cargo build` and `cargo install` leave them, or the one on the PATH).
//! Each child is started as an operator would start it, with flags; its announce line
//! (`... listening ...`) gives its addresses, its `/healthz/ready` says when it serves, its
//! log goes to a file in the demo's data dir, and it is stopped with SIGTERM (then SIGKILL
//! after a grace period), by PID.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{bail, Context};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

/// How long a child may take to print its announce line, and then to be ready.
const START_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a child gets to drain and exit after SIGTERM.
const STOP_GRACE: Duration = Duration::from_secs(10);

/// The demo's public routes: `/pay/...` and `/orders/...` on any host.
const INGRESS_CONFIG: &str = "\
# Written by `waymark-resolver demo`: the demo's public routes.
[[routes]]
path = \"/pay\"
service = \"payment\"
strip_prefix = true

[[routes]]
path = \"/orders\"
service = \"orders\"
strip_prefix = true
";

/// Where the demo's mesh listens: the gateway's and the forwarder's defaults.
pub const INGRESS_LISTEN: &str = "127.0.0.1:8080";
pub const INGRESS_ADMIN: &str = "127.0.0.1:9901";
pub const FORWARDER_ADMIN: &str = "127.0.0.1:9902";

/// `waymark-gateway`: the explicit path, else the one beside this executable, else the first
/// on the PATH.
pub fn find_gateway(explicit: Option<&Path>) -> Option<PathBuf> {
    if let Some(p) = explicit {
        return Some(p.to_path_buf());
    }
    let beside = std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent().map(|d| d.join("waymark-gateway")));
    let on_path = std::env::var_os("PATH")
        .into_iter()
        .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .map(|d| d.join("waymark-gateway"));
    beside.into_iter().chain(on_path).find(|p| p.is_file())
}

/// One running child: its name, process, announce line and log file.
struct Proc {
    name: &'static str,
    child: Child,
    announce: String,
    log: PathBuf,
}

impl Proc {
    /// Starts `bin args`, with stderr to `log`, and waits for its announce line.
    async fn start(
        name: &'static str,
        bin: &Path,
        args: &[String],
        log: PathBuf,
    ) -> anyhow::Result<Proc> {
        let log_file =
            std::fs::File::create(&log).with_context(|| format!("creating {}", log.display()))?;
        let mut child = Command::new(bin)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(log_file)
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting {} ({name})", bin.display()))?;
        let stdout = child.stdout.take().context("the child's stdout")?;
        let mut lines = BufReader::new(stdout).lines();
        let announce = tokio::time::timeout(START_TIMEOUT, async {
            while let Some(line) = lines.next_line().await? {
                if line.contains(" listening ") {
                    return Ok(Some(line));
                }
            }
            Ok::<_, std::io::Error>(None)
        })
        .await;
        let announce = match announce {
            Ok(Ok(Some(line))) => line,
            Ok(Ok(None)) | Ok(Err(_)) => {
                let status = child.wait().await.ok();
                bail!(
                    "the {name} exited ({}) before it listened:\n{}",
                    status.map_or("unknown status".into(), |s| s.to_string()),
                    tail(&log)
                );
            }
            Err(_) => bail!(
                "the {name} did not announce its listeners within {START_TIMEOUT:?}:\n{}",
                tail(&log)
            ),
        };
        // Nothing else comes on stdout, but keep the pipe drained.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        Ok(Proc {
            name,
            child,
            announce,
            log,
        })
    }

    /// The address after `key=` on the announce line.
    fn addr(&self, key: &str) -> anyhow::Result<SocketAddr> {
        announced(&self.announce, key)
            .with_context(|| format!("no {key}= on the {}'s line: {}", self.name, self.announce))
    }

    /// Waits until `http://admin/healthz/ready` answers 200.
    async fn wait_ready(
        &mut self,
        http: &reqwest::Client,
        admin: SocketAddr,
    ) -> anyhow::Result<()> {
        let url = format!("http://{admin}/healthz/ready");
        let deadline = tokio::time::Instant::now() + START_TIMEOUT;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                bail!("the {} exited ({status}):\n{}", self.name, tail(&self.log));
            }
            let last = match http.get(&url).send().await {
                Ok(r) if r.status().is_success() => return Ok(()),
                Ok(r) => r.text().await.unwrap_or_default(),
                Err(e) => e.to_string(),
            };
            if tokio::time::Instant::now() >= deadline {
                bail!(
                    "the {} was not ready within {START_TIMEOUT:?}: {last}",
                    self.name
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// SIGTERM, then SIGKILL if it has not exited after `STOP_GRACE`.
    async fn stop(mut self) {
        use nix::sys::signal::{kill, Signal};
        use nix::unistd::Pid;
        if let Some(pid) = self.child.id().and_then(|p| i32::try_from(p).ok()) {
            let _ = kill(Pid::from_raw(pid), Signal::SIGTERM);
        }
        if tokio::time::timeout(STOP_GRACE, self.child.wait())
            .await
            .is_err()
        {
            tracing::warn!(child = self.name, "did not stop after SIGTERM; killing it");
            let _ = self.child.kill().await;
        }
    }
}

/// The address after `key=` on an announce line such as
/// `waymark-gateway listening http=127.0.0.1:8080 tls=- admin=127.0.0.1:9901`.
fn announced(line: &str, key: &str) -> Option<SocketAddr> {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(key)?.strip_prefix('='))
        .and_then(|a| a.parse().ok())
}

/// The last lines of a child's log, for an error message.
fn tail(log: &Path) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(15)..].join("\n")
}

/// The forwarder and the ingress, running and ready.
pub struct Mesh {
    forwarder: Proc,
    ingress: Proc,
    pub forwarder_admin: SocketAddr,
    pub ingress_http: SocketAddr,
    pub ingress_admin: SocketAddr,
}

impl Mesh {
    /// Starts the forwarder and the ingress against the registry at `registry`, keeping
    /// their logs and state in `dir`, and waits until both are ready.
    pub async fn start(gateway: &Path, registry: SocketAddr, dir: &Path) -> anyhow::Result<Mesh> {
        let registry = format!("http://{registry}");
        let routes = dir.join("gateway.toml");
        std::fs::write(&routes, INGRESS_CONFIG)
            .with_context(|| format!("writing {}", routes.display()))?;
        let path = |p: &Path| p.display().to_string();
        let forwarder_args: Vec<String> = [
            "forwarder",
            "--registry",
            &registry,
            "--admin-addr",
            FORWARDER_ADMIN,
            "--host-name",
            "demo",
            "--state-dir",
            &path(&dir.join("forwarder")),
        ]
        .map(String::from)
        .to_vec();
        let ingress_args: Vec<String> = [
            "ingress",
            "--config",
            &path(&routes),
            "--registry",
            &registry,
            "--listen",
            INGRESS_LISTEN,
            "--admin-addr",
            INGRESS_ADMIN,
        ]
        .map(String::from)
        .to_vec();

        let mut forwarder = Proc::start(
            "forwarder",
            gateway,
            &forwarder_args,
            dir.join("forwarder.log"),
        )
        .await?;
        let mut ingress =
            match Proc::start("gateway", gateway, &ingress_args, dir.join("gateway.log")).await {
                Ok(p) => p,
                Err(e) => {
                    forwarder.stop().await;
                    return Err(e);
                }
            };
        let started = async {
            let forwarder_admin = forwarder.addr("admin")?;
            let ingress_http = ingress.addr("http")?;
            let ingress_admin = ingress.addr("admin")?;
            let http = reqwest::Client::new();
            forwarder.wait_ready(&http, forwarder_admin).await?;
            ingress.wait_ready(&http, ingress_admin).await?;
            Ok::<_, anyhow::Error>((forwarder_admin, ingress_http, ingress_admin))
        }
        .await;
        match started {
            Ok((forwarder_admin, ingress_http, ingress_admin)) => Ok(Mesh {
                forwarder,
                ingress,
                forwarder_admin,
                ingress_http,
                ingress_admin,
            }),
            Err(e) => {
                ingress.stop().await;
                forwarder.stop().await;
                Err(e)
            }
        }
    }

    /// The children's log files.
    pub fn logs(&self) -> [&Path; 2] {
        [&self.forwarder.log, &self.ingress.log]
    }

    /// Stops the ingress, then the forwarder (which deregisters itself first, so DNS goes
    /// back to instance addresses before its listeners close).
    pub async fn stop(self) {
        self.ingress.stop().await;
        self.forwarder.stop().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn announce_lines_give_addresses() {
        let gw = "waymark-gateway listening http=127.0.0.1:8080 tls=- admin=127.0.0.1:9901";
        assert_eq!(
            announced(gw, "http"),
            Some("127.0.0.1:8080".parse().unwrap())
        );
        assert_eq!(
            announced(gw, "admin"),
            Some("127.0.0.1:9901".parse().unwrap())
        );
        assert_eq!(announced(gw, "tls"), None);
        let fwd = "waymark-gateway forwarder listening admin=127.0.0.1:9902";
        assert_eq!(
            announced(fwd, "admin"),
            Some("127.0.0.1:9902".parse().unwrap())
        );
        assert_eq!(announced(fwd, "inbound"), None);
        assert_eq!(announced("x listening xadmin=1.2.3.4:5", "admin"), None);
    }

    #[test]
    fn an_explicit_gateway_binary_wins() {
        let p = Path::new("/opt/w/waymark-gateway");
        assert_eq!(find_gateway(Some(p)), Some(p.to_path_buf()));
    }
}
