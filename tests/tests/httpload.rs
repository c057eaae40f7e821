//! `httpload`, the benchmark's fixed-rate load generator, run as its own process against real
//! servers on loopback: a `gw_backend` (Content-Length answers, 2xx and non-2xx), a small
//! server here that answers chunked and closes every other connection, a closed port, and
//! bad arguments. Each run takes a second or two.

use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::process::{Command, Output};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::Value;
use waymark_e2e::gateway::{closed_port, Backend};

const HTTPLOAD: &str = env!("CARGO_BIN_EXE_httpload");
const BACKEND: &str = env!("CARGO_BIN_EXE_gw_backend");

fn httpload(args: &[&str]) -> Output {
    Command::new(HTTPLOAD)
        .args(args)
        .output()
        .expect("httpload runs")
}

/// Runs with `--json` and returns the report; panics unless it exits 0 with one JSON object.
fn report(args: &[&str]) -> Value {
    let mut all = args.to_vec();
    all.push("--json");
    let out = httpload(&all);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "httpload {args:?}: {}\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_str(stdout.trim()).unwrap_or_else(|e| panic!("not JSON ({e}): {stdout}"))
}

fn num(r: &Value, key: &str) -> f64 {
    r[key]
        .as_f64()
        .unwrap_or_else(|| panic!("{key} is not a number in {r}"))
}

fn assert_percentiles_ordered(r: &Value) {
    let keys = ["p50_us", "p90_us", "p99_us", "p999_us", "max_us"];
    let v: Vec<f64> = keys.iter().map(|k| num(r, k)).collect();
    assert!(v.windows(2).all(|w| w[0] <= w[1]), "percentiles {v:?}");
}

#[test]
fn holds_the_rate_against_a_real_backend() {
    let backend = Backend::start(BACKEND, "load");
    let url = format!("http://{}/load", backend.addr);
    let r = report(&[
        "--url",
        &url,
        "--rate",
        "500",
        "--connections",
        "4",
        "--duration",
        "2",
        "--warmup",
        "0.5",
        "--header",
        "Host: bench.test",
        "--header",
        "X-Extra: 1",
    ]);
    let requests = num(&r, "requests");
    assert!(
        (900.0..=1100.0).contains(&requests),
        "500/s for 2 s completed {requests}: {r}"
    );
    assert_eq!(num(&r, "errors"), 0.0, "{r}");
    // A slot can go unsent only when its connection still waits for an answer as the window
    // closes: at most one per connection, and only on a stalled machine.
    assert!(num(&r, "unsent") <= 4.0, "{r}");
    assert_eq!(num(&r, "reconnects"), 0.0, "{r}");
    assert!((450.0..=550.0).contains(&num(&r, "rate")), "{r}");
    assert_eq!(num(&r, "rate_target"), 500.0);
    assert_percentiles_ordered(&r);
    assert!(num(&r, "lag_p50_us") <= num(&r, "lag_max_us"), "{r}");
}

#[test]
fn counts_non_2xx_answers_as_errors() {
    let backend = Backend::start(BACKEND, "failing");
    let url = format!("http://{}/x?status=503", backend.addr);
    let r = report(&[
        "--url",
        &url,
        "--rate",
        "200",
        "--connections",
        "2",
        "--duration",
        "1",
    ]);
    let requests = num(&r, "requests");
    assert!((180.0..=220.0).contains(&requests), "{r}");
    assert_eq!(num(&r, "non2xx"), requests, "{r}");
    assert_eq!(num(&r, "errors"), requests, "{r}");
    assert_eq!(num(&r, "io_errors"), 0.0, "{r}");
    assert_percentiles_ordered(&r);
}

/// Answers every request with a chunked body (chunk extension and trailer included); every
/// second answer on a connection says `Connection: close` and closes. Stops when `stop` is set.
fn chunked_server(stop: Arc<AtomicBool>) -> std::net::SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    listener.set_nonblocking(true).expect("nonblocking");
    let addr = listener.local_addr().expect("addr");
    std::thread::spawn(move || {
        let deadline = Instant::now() + Duration::from_secs(30);
        while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
            let Ok((stream, _)) = listener.accept() else {
                std::thread::sleep(Duration::from_millis(1));
                continue;
            };
            std::thread::spawn(move || {
                let _ = stream.set_nonblocking(false);
                let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
                let mut reader = BufReader::new(stream.try_clone().expect("clone"));
                let mut writer = stream;
                for n in 0.. {
                    // The request head, up to the empty line.
                    let mut line = String::new();
                    loop {
                        line.clear();
                        match reader.read_line(&mut line) {
                            Ok(0) | Err(_) => return,
                            Ok(_) if line == "\r\n" => break,
                            Ok(_) => {}
                        }
                    }
                    let close = n % 2 == 1;
                    let answer = format!(
                        "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n{}\r\n\
                         5;ext=1\r\nhello\r\n6\r\n world\r\n0\r\nX-Trailer: y\r\n\r\n",
                        if close { "Connection: close\r\n" } else { "" }
                    );
                    if writer.write_all(answer.as_bytes()).is_err() || close {
                        return;
                    }
                }
            });
        }
    });
    addr
}

#[test]
fn reads_chunked_answers_and_reconnects_after_close() {
    let stop = Arc::new(AtomicBool::new(false));
    let addr = chunked_server(Arc::clone(&stop));
    let url = format!("http://{addr}/");
    let r = report(&[
        "--url",
        &url,
        "--rate",
        "200",
        "--connections",
        "2",
        "--duration",
        "1",
    ]);
    stop.store(true, Ordering::Relaxed);
    let requests = num(&r, "requests");
    assert!((180.0..=220.0).contains(&requests), "{r}");
    assert_eq!(num(&r, "errors"), 0.0, "{r}");
    // Every second answer closes its connection: about one reconnect per two requests.
    let reconnects = num(&r, "reconnects");
    assert!(
        (requests / 2.0 - 5.0..=requests / 2.0 + 5.0).contains(&reconnects),
        "{r}"
    );
    assert_percentiles_ordered(&r);
}

#[test]
fn a_closed_port_reports_errors_and_exits_cleanly() {
    let (port, _udp, _held) = closed_port();
    let url = format!("http://127.0.0.1:{port}/");
    let started = Instant::now();
    let r = report(&[
        "--url",
        &url,
        "--rate",
        "100",
        "--connections",
        "2",
        "--duration",
        "1",
    ]);
    assert!(started.elapsed() < Duration::from_secs(5));
    assert_eq!(num(&r, "requests"), 0.0, "{r}");
    let errors = num(&r, "io_errors");
    assert!((90.0..=110.0).contains(&errors), "{r}");
    assert_eq!(num(&r, "errors"), errors, "{r}");
    assert!(r["p99_us"].is_null(), "{r}");
    let first = r["first_error"].as_str().unwrap_or_default();
    assert!(first.contains("refused"), "{r}");
}

#[test]
fn bad_arguments_exit_non_zero_with_a_message() {
    let cases: &[(&[&str], &str)] = &[
        (&["--bogus"], "unexpected argument"),
        (
            &[
                "--url",
                "http://127.0.0.1:1/",
                "--rate",
                "0",
                "--connections",
                "1",
                "--duration",
                "1",
            ],
            "--rate",
        ),
        (
            &[
                "--url",
                "http://127.0.0.1:1/",
                "--rate",
                "10",
                "--connections",
                "0",
                "--duration",
                "1",
            ],
            "--connections",
        ),
        (
            &[
                "--url",
                "https://127.0.0.1:1/",
                "--rate",
                "10",
                "--connections",
                "1",
                "--duration",
                "1",
            ],
            "https is not supported",
        ),
        (
            &[
                "--url",
                "http://127.0.0.1:1/",
                "--rate",
                "10",
                "--connections",
                "1",
                "--duration",
                "1",
                "--header",
                "no colon",
            ],
            "Name: value",
        ),
        (
            &[
                "--url",
                "http://127.0.0.1:1/",
                "--rate",
                "1e7",
                "--connections",
                "1",
                "--duration",
                "10",
            ],
            "at most",
        ),
    ];
    for (args, message) in cases {
        let out = httpload(args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(stderr.contains(message), "{args:?}: {stderr}");
        assert!(!stderr.contains("panicked"), "{args:?}: {stderr}");
    }
}
