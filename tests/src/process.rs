//! One way to start and stop the processes a test runs (the resolver, the gateway, test
//! backends): stdin closed, stderr appended to a log file, stdout read line by line until
//! the process announces what it bound (`<name> listening key=addr ...`), and stopped only
//! through its own `Child` handle: SIGTERM (a clean stop) or SIGKILL (a crash), never by
//! name. Dropping a [`Proc`] kills it.

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

/// A running child process.
pub struct Proc {
    child: Option<Child>,
    name: String,
    log: PathBuf,
}

/// What a process announced: the text after its `listening` prefix, and its `key=value`
/// words.
#[derive(Debug, Clone, Default)]
pub struct Announced {
    pub text: String,
    words: HashMap<String, String>,
}

impl Announced {
    /// Parses `key=value` words; other words are ignored.
    pub fn parse(text: &str) -> Announced {
        Announced {
            text: text.trim().to_string(),
            words: text
                .split_whitespace()
                .filter_map(|w| w.split_once('='))
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        }
    }

    /// The address announced as `key`, or none (absent, or `-`).
    pub fn addr(&self, key: &str) -> Option<SocketAddr> {
        self.words.get(key).and_then(|v| v.parse().ok())
    }

    /// The address announced as `key`; an error when it is missing.
    pub fn need(&self, key: &str) -> anyhow::Result<SocketAddr> {
        self.addr(key)
            .with_context(|| format!("no {key}= address announced in {:?}", self.text))
    }
}

impl Proc {
    /// Starts `cmd` and waits up to `within` for a stdout line that begins with `announce`;
    /// returns the process and what followed the prefix. Fails (and kills the process) when
    /// it exits first or says nothing in time; the error holds the end of its log.
    pub fn spawn(
        cmd: Command,
        name: &str,
        log: &Path,
        announce: &str,
        within: Duration,
    ) -> anyhow::Result<(Proc, Announced)> {
        let announce = announce.to_string();
        let matcher = move |line: &str| line.strip_prefix(announce.as_str()).map(Announced::parse);
        Self::spawn_matching(cmd, name, log, matcher, within, false)
    }

    /// [`Proc::spawn`] for programs that do not announce themselves on a line of their own
    /// (etcd): `matcher` reads what each stdout line announces, if anything. With
    /// `stdout_to_log`, every stdout line is appended to the log too (for programs that log
    /// to stdout).
    pub fn spawn_matching(
        mut cmd: Command,
        name: &str,
        log: &Path,
        matcher: impl Fn(&str) -> Option<Announced>,
        within: Duration,
        stdout_to_log: bool,
    ) -> anyhow::Result<(Proc, Announced)> {
        let log_file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .with_context(|| format!("opening {}", log.display()))?;
        let mut copy = if stdout_to_log {
            Some(log_file.try_clone().context("cloning the log file")?)
        } else {
            None
        };
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(log_file)
            .spawn()
            .with_context(|| format!("spawning {name}"))?;
        let stdout = child.stdout.take().expect("piped");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Some(f) = copy.as_mut() {
                    use std::io::Write;
                    let _ = writeln!(f, "{line}");
                }
                let _ = tx.send(line);
            }
        });
        let mut proc = Proc {
            child: Some(child),
            name: name.to_string(),
            log: log.to_path_buf(),
        };
        let deadline = Instant::now() + within;
        loop {
            match rx.recv_timeout(Duration::from_millis(50)) {
                Ok(line) => {
                    if let Some(announced) = matcher(&line) {
                        return Ok((proc, announced));
                    }
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    let status = proc.wait_exit(Duration::from_secs(5));
                    bail!(
                        "{name} exited ({status:?}) before announcing itself; log:\n{}",
                        proc.log()
                    );
                }
            }
            if Instant::now() >= deadline {
                proc.kill();
                bail!(
                    "{name} did not announce itself within {within:?}; log:\n{}",
                    proc.log()
                );
            }
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Whether it is still running.
    pub fn running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    /// The process's stderr so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn wait_exit(&mut self, within: Duration) -> Option<ExitStatus> {
        let child = self.child.as_mut()?;
        let deadline = Instant::now() + within;
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                self.child = None;
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// SIGKILL and reap: a crash, nothing flushed.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM, then waits up to `within` for the exit; returns the exit status and the
    /// time it took, or none (after a SIGKILL) when it did not exit in time.
    pub fn terminate(&mut self, within: Duration) -> Option<(ExitStatus, Duration)> {
        let pid = self.pid()?;
        let started = Instant::now();
        let _ = kill(Pid::from_raw(pid as i32), Signal::SIGTERM);
        match self.wait_exit(within) {
            Some(status) => Some((status, started.elapsed())),
            None => {
                self.kill();
                None
            }
        }
    }

    /// Sends a signal (SIGHUP, SIGSTOP...) without waiting.
    pub fn signal(&self, signal: Signal) {
        if let Some(pid) = self.pid() {
            let _ = kill(Pid::from_raw(pid as i32), signal);
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}
