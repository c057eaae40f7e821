//! Network namespaces for tests that need a machine of their own: fixed ports (53, the
//! demo's 8600 and 8500), a resolv.conf of their own, nothing reachable but loopback.
//! [`namespace_command`] finds the `unshare` flags that work here (or says why none do and
//! the test skips); [`run_bounded`] runs a script in it with a time limit and stops it, and
//! what it listed, when the limit passes.

use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

/// The `unshare` flags that work here, or None (after saying why) when network namespaces are
/// not permitted. Anything other than a permission error is a failure, not a skip.
pub fn namespace_command(dir: &Path) -> Option<Vec<String>> {
    let root = std::fs::metadata("/proc/self")
        .map(|m| m.uid() == 0)
        .unwrap_or(false);
    let plain = ["--net", "--mount"];
    let user = ["--user", "--map-root-user", "--net", "--mount"];
    let candidates: Vec<&[&str]> = if root {
        vec![&plain[..], &user[..]]
    } else {
        vec![&user[..], &plain[..]]
    };
    // What the script needs privileges for: lo up and a bind mount over /etc/resolv.conf.
    let probe_file = dir.join("probe-resolv.conf");
    std::fs::write(&probe_file, "nameserver 127.0.0.1\n").expect("write probe file");
    let probe = format!(
        "ip link set lo up && mount --bind '{}' /etc/resolv.conf && grep -q 127.0.0.1 /etc/resolv.conf",
        probe_file.display()
    );
    let mut errors = Vec::new();
    for flags in candidates {
        let mut cmd = Command::new("unshare");
        cmd.args(flags).args(["--", "sh", "-c", &probe]);
        let (status, output) =
            run_bounded(cmd, &dir.join("probe.log"), Duration::from_secs(20), None);
        let line = format!("unshare {}: {}", flags.join(" "), output.trim());
        match status {
            Some(s) if s.success() => return Some(flags.iter().map(|s| s.to_string()).collect()),
            Some(_) if is_permission_error(&output, flags.contains(&"--user")) => errors.push(line),
            Some(s) => {
                panic!("network namespace probe failed ({s}), not with a permission error: {line}")
            }
            None => panic!("network namespace probe hung: {line}"),
        }
    }
    let why = errors.join("; ");
    if std::env::var_os("WAYMARK_E2E_REQUIRE_NETNS").is_some() {
        panic!(
            "network namespaces not permitted here, and WAYMARK_E2E_REQUIRE_NETNS is set: {why}"
        );
    }
    eprintln!("skipping: network namespaces not permitted here: {why}");
    None
}

/// EPERM and EACCES; for user namespaces also ENOSPC (user.max_user_namespaces = 0).
pub fn is_permission_error(output: &str, user_namespace: bool) -> bool {
    output.contains("Operation not permitted")
        || output.contains("Permission denied")
        || (user_namespace && output.contains("No space left on device"))
}

/// Runs `cmd` with its output (stdout and stderr together) in `log`, for at most `limit`.
/// Output goes to a file, not a pipe, so that nothing left running can keep the test waiting.
/// Past the limit: SIGTERM, so that the script's trap stops what it started (every command
/// it waits on is bounded by 20 s); 30 s later, SIGKILL, and then SIGKILL to each PID the
/// script listed in `pids`. Returns the exit status (None on timeout) and the output.
pub fn run_bounded(
    mut cmd: Command,
    log: &Path,
    limit: Duration,
    pids: Option<&Path>,
) -> (Option<ExitStatus>, String) {
    let out = std::fs::File::create(log).expect("create log");
    let err = out.try_clone().expect("clone log");
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .spawn()
        .expect("spawn unshare");
    let wait_until = |child: &mut std::process::Child, deadline: Instant| loop {
        if let Some(s) = child.try_wait().expect("wait") {
            return Some(s);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    if let Some(s) = wait_until(&mut child, Instant::now() + limit) {
        return (Some(s), std::fs::read_to_string(log).unwrap_or_default());
    }
    let _ = kill(Pid::from_raw(child.id() as i32), Signal::SIGTERM);
    if wait_until(&mut child, Instant::now() + Duration::from_secs(30)).is_none() {
        let _ = child.kill();
        let _ = child.wait();
        let listed = pids.and_then(|p| std::fs::read_to_string(p).ok());
        for pid in listed.iter().flat_map(|l| l.split_whitespace()) {
            if let Ok(pid) = pid.parse::<i32>() {
                let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
            }
        }
    }
    (None, std::fs::read_to_string(log).unwrap_or_default())
}
