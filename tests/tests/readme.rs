//! Every shell example in the README runs as written against the demo, and prints what the
//! README says it prints.
//!
//! The README's ```` ```sh ```` blocks are taken in order, except those right after a
//! `<!-- readme-test: skip (why) -->` line (the quick start itself, installs, development
//! commands). Each command of a block runs in bash as written; a `# → text` comment on a
//! command says that its output contains `text`. They run against `waymark-resolver demo` on
//! its default addresses (127.0.0.1:8600 and :8500, the demo backends on 127.0.10.x:9000...),
//! which is why everything runs inside a network and mount namespace of its own: no port of
//! the machine is taken, and the demo's resolv.conf (a bind mount) names only loopback, so no
//! query can leave. `waymark-resolver` and `waymark-gateway` are on the PATH, as after
//! `cargo install`.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use waymark_e2e::gateway::gateway_bin;
use waymark_e2e::netns::{namespace_command, run_bounded};
use waymark_e2e::{have, resolver_bin, root};

/// One command of a README block: its text (possibly several lines) and what its output
/// must contain.
#[derive(Debug, Clone, PartialEq)]
struct Example {
    command: String,
    expect: Option<String>,
}

/// The `sh` blocks of a markdown text that are not marked to skip, each split into commands.
fn blocks(markdown: &str) -> Vec<Vec<Example>> {
    let mut out = Vec::new();
    let mut lines = markdown.lines().peekable();
    let mut skip_next = false;
    while let Some(line) = lines.next() {
        let t = line.trim();
        if t.starts_with("<!-- readme-test: skip") {
            skip_next = true;
            continue;
        }
        if t == "```sh" {
            let mut body = Vec::new();
            for l in lines.by_ref() {
                if l.trim() == "```" {
                    break;
                }
                body.push(l);
            }
            if !std::mem::take(&mut skip_next) {
                out.push(commands(&body));
            }
        } else if !t.is_empty() {
            skip_next = false;
        }
    }
    out
}

/// Splits a block into commands: a command goes on while a quote is open or a line ends
/// with a backslash.
fn commands(lines: &[&str]) -> Vec<Example> {
    let mut out = Vec::new();
    let mut current: Vec<&str> = Vec::new();
    let mut quote: Option<char> = None;
    for line in lines {
        if current.is_empty() && line.trim().is_empty() {
            continue;
        }
        current.push(line);
        let mut escaped = false;
        let mut comment = false;
        let mut prev = ' ';
        for c in line.chars() {
            match quote {
                Some('\'') if c == '\'' => quote = None,
                Some('\'') => {}
                Some(q) => {
                    if escaped {
                        escaped = false;
                    } else if c == '\\' {
                        escaped = true;
                    } else if c == q {
                        quote = None;
                    }
                }
                None => {
                    if escaped {
                        escaped = false;
                    } else if c == '\\' {
                        escaped = true;
                    } else if c == '#' && prev.is_whitespace() {
                        comment = true;
                        break;
                    } else if c == '\'' || c == '"' {
                        quote = Some(c);
                    }
                }
            }
            prev = c;
        }
        let continued = !comment && line.trim_end().ends_with('\\');
        if quote.is_none() && !continued {
            let command = current.join("\n");
            let expect = command
                .lines()
                .find_map(|l| l.split_once("# → "))
                .map(|(_, e)| e.trim().to_string());
            out.push(Example { command, expect });
            current.clear();
        }
    }
    assert!(current.is_empty(), "unfinished command: {current:?}");
    out
}

/// The script for one block: each command between markers, its exit status after it (on a
/// line of its own, whether or not the command ended its output with a newline); whatever it
/// left in the background is stopped at the end.
fn block_script(examples: &[Example]) -> String {
    let mut s = String::from("set -uo pipefail\ntrap 'kill $(jobs -p) 2>/dev/null; wait' EXIT\n");
    for (i, e) in examples.iter().enumerate() {
        s.push_str(&format!(
            "echo '@@@ {i}'\n{}\nprintf '\\n@@@ rc %s\\n' \"$?\"\n",
            e.command
        ));
    }
    s
}

/// What each command printed and its exit status, from a block's output.
fn results(output: &str, count: usize) -> Vec<(String, Option<i32>)> {
    let mut out = vec![(String::new(), None); count];
    let mut at: Option<usize> = None;
    for line in output.lines() {
        if let Some(n) = line.strip_prefix("@@@ rc ") {
            if let Some(i) = at.take() {
                out[i].1 = n.trim().parse().ok();
            }
        } else if let Some(n) = line.strip_prefix("@@@ ") {
            at = n.trim().parse().ok().filter(|i| *i < count);
        } else if let Some(i) = at {
            out[i].0.push_str(line);
            out[i].0.push('\n');
        }
    }
    out
}

/// Runs inside the namespace: brings up loopback, puts the resolv.conf in place, starts the
/// demo, runs every block in order (each bounded), and stops the demo by PID.
const DRIVER: &str = r#####"
set -euo pipefail
work=${WORK:?}
ip link set lo up
mount --bind "$work/resolv.conf" /etc/resolv.conf
export PATH="$work/bin:$PATH"
unset http_proxy https_proxy HTTP_PROXY HTTPS_PROXY all_proxy ALL_PROXY no_proxy NO_PROXY
cd "$work"
waymark-resolver demo > demo.out 2> demo.log &
demo=$!
echo "$demo" >> pids
trap 'kill "$demo" 2>/dev/null; wait "$demo" 2>/dev/null || true' EXIT
for _ in $(seq 1 1200); do
    grep -q "Waymark demo is running" demo.out && break
    kill -0 "$demo" 2>/dev/null || { echo "the demo exited:"; cat demo.log; exit 1; }
    sleep 0.05
done
grep -q "Waymark demo is running" demo.out || { echo "the demo did not start"; cat demo.log; exit 1; }
for block in block-*.sh; do
    timeout 90 bash "$block" > "${block%.sh}.out" 2>&1 || true
done
"#####;

#[test]
fn the_readme_blocks_split_into_commands_with_expectations() {
    let md = "text\n<!-- readme-test: skip (x) -->\n```sh\nskipped\n```\n\n```sh\n\
              echo a   # → a\ncurl -d '{\n  \"x\": 1}' \\\n  http://h/   # → b\n\
              cmd \"# not a comment\" # → c\n```\n```json\n{}\n```\n";
    let b = blocks(md);
    assert_eq!(b.len(), 1, "{b:#?}");
    let want = [
        ("echo a   # → a", Some("a")),
        (
            "curl -d '{\n  \"x\": 1}' \\\n  http://h/   # → b",
            Some("b"),
        ),
        ("cmd \"# not a comment\" # → c", Some("c")),
    ];
    assert_eq!(b[0].len(), want.len(), "{b:#?}");
    for (got, (cmd, exp)) in b[0].iter().zip(want) {
        assert_eq!(got.command, cmd);
        assert_eq!(got.expect.as_deref(), exp);
    }
    let r = results("@@@ 0\nx\n@@@ rc 0\n@@@ 1\ny\nz\n@@@ rc 7\n", 2);
    assert_eq!(r[0], ("x\n".to_string(), Some(0)));
    assert_eq!(r[1], ("y\nz\n".to_string(), Some(7)));
}

#[test]
fn every_readme_example_runs_as_written_against_the_demo() {
    for tool in ["unshare", "ip", "mount", "dig", "curl", "timeout"] {
        assert!(
            have(tool),
            "{tool} is required (Debian: util-linux, iproute2, mount, dnsutils, curl, coreutils; \
             tests/run.sh installs them)"
        );
    }
    let readme = std::fs::read_to_string(root().join("README.md")).expect("README.md");
    let blocks = blocks(&readme);
    assert!(
        blocks.len() >= 3,
        "expected the demo, client and gateway examples, found {} blocks",
        blocks.len()
    );

    let dir = tempfile::tempdir().expect("temp dir");
    let Some(unshare) = namespace_command(dir.path()) else {
        return;
    };
    let work = dir.path().join("work");
    let bin = work.join("bin");
    std::fs::create_dir_all(&bin).expect("bin dir");
    for (name, path) in [
        ("waymark-resolver", resolver_bin()),
        ("waymark-gateway", gateway_bin()),
    ] {
        std::os::unix::fs::symlink(&path, bin.join(name)).expect("link binary");
    }
    std::fs::write(work.join("resolv.conf"), "nameserver 127.0.0.1\n").expect("resolv.conf");
    for (i, b) in blocks.iter().enumerate() {
        std::fs::write(work.join(format!("block-{i:02}.sh")), block_script(b)).expect("block");
    }
    let script = dir.path().join("driver.sh");
    std::fs::write(&script, DRIVER).expect("driver");
    let mut cmd = Command::new("unshare");
    cmd.args(&unshare)
        .arg("--")
        .arg("bash")
        .arg(&script)
        .env("WORK", &work);
    let (status, output) = run_bounded(
        cmd,
        &dir.path().join("driver.log"),
        Duration::from_secs(240),
        Some(&work.join("pids")),
    );
    let demo_log = || read(&work.join("demo.log"));
    assert!(
        status.is_some_and(|s| s.success()),
        "the README driver failed ({status:?}):\n{output}\ndemo log:\n{}",
        demo_log()
    );

    let mut failures = Vec::new();
    let mut ran = 0;
    for (i, b) in blocks.iter().enumerate() {
        let out = read(&work.join(format!("block-{i:02}.out")));
        for (e, (printed, rc)) in b.iter().zip(results(&out, b.len())) {
            ran += 1;
            let ok = rc == Some(0)
                && e.expect
                    .as_ref()
                    .is_none_or(|want| printed.contains(want.as_str()));
            if !ok {
                failures.push(format!(
                    "block {i}: `{}`\n  exit: {rc:?}, expected output: {:?}\n  printed:\n{printed}",
                    e.command, e.expect
                ));
            }
        }
    }
    assert!(ran >= 10, "only {ran} README commands ran");
    assert!(
        failures.is_empty(),
        "README examples that do not run as written:\n{}\ndemo log:\n{}",
        failures.join("\n"),
        demo_log()
    );
}

fn read(p: &Path) -> String {
    std::fs::read_to_string(p).unwrap_or_else(|e| format!("({}: {e})", p.display()))
}
