//! A real browser for the web views: headless Chromium (Debian `chromium` and
//! `chromium-driver`) driven through selenium by `tests/clients/ui_check.py`, one command
//! per line (see that script for the commands). The test says what to do and what to wait
//! for; every wait is on the page's DOM, bounded inside the script.

use std::io::{BufRead, BufReader, Write};
use std::path::PathBuf;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use crate::root;

/// How long one command may take, waits included (the script bounds each wait itself).
const ANSWER_WITHIN: Duration = Duration::from_secs(60);

/// Where `tests/clients/install.sh` puts selenium.
pub fn selenium_dir() -> PathBuf {
    root().join("tests/clients/.deps/selenium")
}

/// One browser at a time in a test process: Chromium takes a core or two of its own, and the
/// tests measure how soon a page shows a change.
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

/// A headless Chromium session.
pub struct Browser {
    child: Child,
    stdin: ChildStdin,
    lines: Receiver<String>,
    /// Every command and answer, for failure messages.
    transcript: Vec<String>,
    /// Held for the session's life (declared last: dropped after the browser has quit).
    _turn: MutexGuard<'static, ()>,
}

impl Browser {
    /// Starts Chromium; panics with what to install when something is missing.
    pub fn start() -> Browser {
        for tool in ["/usr/bin/chromium", "/usr/bin/chromedriver"] {
            assert!(
                std::path::Path::new(tool).exists(),
                "{tool} is missing: apt-get install chromium chromium-driver (tests/run.sh does, as root)"
            );
        }
        let turn = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
        let deps = selenium_dir();
        assert!(
            deps.exists(),
            "{} is missing: run `bash tests/clients/install.sh` (tests/run.sh and .ci/run do)",
            deps.display()
        );
        let mut child = Command::new("python3")
            .arg(root().join("tests/clients/ui_check.py"))
            .env("PYTHONPATH", &deps)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("python3 runs tests/clients/ui_check.py");
        let stdin = child.stdin.take().expect("piped stdin");
        let stdout = child.stdout.take().expect("piped stdout");
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut b = Browser {
            child,
            stdin,
            lines,
            transcript: Vec::new(),
            _turn: turn,
        };
        let first = b.answer("(start)");
        assert_eq!(first, Ok("ready".into()), "{}", b.transcript());
        b
    }

    fn answer(&mut self, cmd: &str) -> Result<String, String> {
        let line = match self.lines.recv_timeout(ANSWER_WITHIN) {
            Ok(line) => line,
            Err(RecvTimeoutError::Timeout) => {
                panic!(
                    "the browser did not answer {cmd:?} within {ANSWER_WITHIN:?}\n{}",
                    self.transcript()
                )
            }
            Err(RecvTimeoutError::Disconnected) => {
                panic!(
                    "the browser script ended during {cmd:?}\n{}",
                    self.transcript()
                )
            }
        };
        self.transcript.push(format!("< {line}"));
        match line.split_once(' ').unwrap_or((line.as_str(), "")) {
            ("ok", rest) => Ok(rest.to_string()),
            (_, rest) => Err(rest.to_string()),
        }
    }

    /// Sends one command; its answer (`ok …` → `Ok`, `error …` → `Err`).
    pub fn ask(&mut self, cmd: &str) -> Result<String, String> {
        self.transcript.push(format!("> {cmd}"));
        writeln!(self.stdin, "{cmd}").expect("the browser script reads its stdin");
        self.stdin.flush().expect("flush");
        self.answer(cmd)
    }

    /// Sends one command that must succeed; panics with the whole session otherwise.
    pub fn must(&mut self, cmd: &str) -> String {
        match self.ask(cmd) {
            Ok(out) => out,
            Err(e) => panic!("browser: {cmd}: {e}\n{}", self.transcript()),
        }
    }

    /// The milliseconds a wait command reports (`"123ms…"`).
    pub fn waited_ms(answer: &str) -> u64 {
        answer
            .split("ms")
            .next()
            .and_then(|n| n.trim().parse().ok())
            .unwrap_or_else(|| panic!("no milliseconds in {answer:?}"))
    }

    /// The session so far.
    pub fn transcript(&self) -> String {
        format!("browser session:\n{}", self.transcript.join("\n"))
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = writeln!(self.stdin, "quit");
        let _ = self.stdin.flush();
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while std::time::Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
