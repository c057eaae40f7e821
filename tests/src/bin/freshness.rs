//! Freshness benchmark: how soon DNS answers follow the registry, against a real (release)
//! `waymark-resolver serve` on loopback. Not a test: it measures and reports.
//!
//! 1. Registration → answerable: N registrations of distinct services, one after another; for
//!    each, the time from the HTTP 200 of the PUT to the first DNS reply (raw UDP query, sent
//!    again as soon as the previous reply is in) that contains the new instance. Target 10 ms.
//!    The PUT round trip (the acknowledgement latency) is reported too.
//! 2. Failed HTTP check → removed: M services, each with one instance whose HTTP check (Interval
//!    1s) probes its own tiny HTTP backend on 127.0.0.1. Once the instance is answered, the
//!    backend is killed (listener and connections closed, so connects are refused) at a random
//!    moment of the check interval; measured from the kill to the first DNS reply without the
//!    instance. Target: one interval + 100 ms. All M run concurrently.
//! 3. Missed TTL → removed: M services with a TTL check of 1s, passed once; measured from the
//!    pass acknowledgement + TTL to the first DNS reply without the instance. Target 100 ms.
//!
//! Prints a Markdown report (machine, date, load) and writes it to `--out`. Everything is
//! bounded in count and time, all traffic stays on 127.0.0.1, and the only processes it stops
//! are the resolver it started (by PID, through the e2e harness).

use std::collections::hash_map::RandomState;
use std::fmt::Write as _;
use std::hash::BuildHasher;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::process::{Command, ExitCode};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, ensure, Context};
use hickory_proto::op::{Message, ResponseCode};
use hickory_proto::rr::RecordType;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::oneshot;
use tokio::task::{JoinHandle, JoinSet};
use waymark_e2e::{dns, Api, Options, Resolver};

const USAGE: &str =
    "usage: freshness --resolver-bin PATH [--registrations N] [--checks M] [--out FILE]";
const ZONE: &str = "mesh.internal.";
/// Interval of the HTTP checks and TTL of the TTL checks.
const INTERVAL: Duration = Duration::from_secs(1);
const INTERVAL_TEXT: &str = "1s";
const HTTP_TIMEOUT_TEXT: &str = "500ms";
const REGISTRATION_TARGET: Duration = Duration::from_millis(10);
const REMOVAL_SLACK: Duration = Duration::from_millis(100);
/// Registrations made (and not counted) before the measured ones: connection set-up, caches.
const WARMUP: usize = 10;
const MAX_REGISTRATIONS: usize = 20_000;
const MAX_CHECKS: usize = 500;
/// How long one DNS query may go unanswered before it is sent again.
const QUERY_TIMEOUT: Duration = Duration::from_millis(500);
/// How long anything measured may take before it counts as never having happened.
const GIVE_UP: Duration = Duration::from_secs(5);

struct Args {
    resolver_bin: PathBuf,
    registrations: usize,
    checks: usize,
    out: Option<PathBuf>,
}

fn parse_args() -> anyhow::Result<Args> {
    let mut resolver_bin = None;
    let mut registrations = 300;
    let mut checks = 20;
    let mut out = None;
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        if flag == "-h" || flag == "--help" {
            println!("{USAGE}");
            std::process::exit(0);
        }
        let value = it
            .next()
            .with_context(|| format!("{flag} needs a value\n{USAGE}"))?;
        match flag.as_str() {
            "--resolver-bin" => resolver_bin = Some(PathBuf::from(value)),
            "--registrations" => registrations = value.parse().context("--registrations")?,
            "--checks" => checks = value.parse().context("--checks")?,
            "--out" => out = Some(PathBuf::from(value)),
            _ => bail!("unknown argument {flag:?}\n{USAGE}"),
        }
    }
    let resolver_bin =
        resolver_bin.with_context(|| format!("--resolver-bin is required\n{USAGE}"))?;
    ensure!(
        resolver_bin.is_file(),
        "resolver binary {} not found",
        resolver_bin.display()
    );
    ensure!(
        (1..=MAX_REGISTRATIONS).contains(&registrations),
        "--registrations must be 1..={MAX_REGISTRATIONS}"
    );
    ensure!(
        (1..=MAX_CHECKS).contains(&checks),
        "--checks must be 1..={MAX_CHECKS}"
    );
    Ok(Args {
        resolver_bin,
        registrations,
        checks,
        out,
    })
}

fn main() -> ExitCode {
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("freshness: {e:#}");
            return ExitCode::from(2);
        }
    };
    // The harness starts whatever this names; set before any other thread exists.
    std::env::set_var("WAYMARK_RESOLVER_BIN", &args.resolver_bin);
    // One thread: the benchmark keeps to one core and leaves the other to the resolver.
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("freshness: tokio runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let mut resolver = Resolver::with(Options::default());
    // Bounded as a whole, whatever happens inside.
    let budget = Duration::from_secs(60)
        + GIVE_UP * 4
        + Duration::from_millis(20) * (args.registrations as u32);
    let result = runtime.block_on(async {
        match tokio::time::timeout(budget, run(&resolver, &args)).await {
            Ok(r) => r,
            Err(_) => bail!("gave up after {budget:?}"),
        }
    });
    let log = resolver.log();
    resolver.stop();
    drop(runtime);
    match result {
        Ok(report) => {
            print!("{report}");
            if let Some(out) = &args.out {
                if let Some(dir) = out.parent().filter(|d| !d.as_os_str().is_empty()) {
                    let _ = std::fs::create_dir_all(dir);
                }
                if let Err(e) = std::fs::write(out, &report) {
                    eprintln!("freshness: writing {}: {e}", out.display());
                    return ExitCode::FAILURE;
                }
                eprintln!("freshness: wrote {}", out.display());
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("freshness: {e:#}");
            let tail: Vec<&str> = log.lines().rev().take(40).collect();
            eprintln!("resolver log (last lines):");
            for line in tail.iter().rev() {
                eprintln!("  {line}");
            }
            ExitCode::FAILURE
        }
    }
}

async fn run(resolver: &Resolver, args: &Args) -> anyhow::Result<String> {
    let api = Arc::new(Api::new(resolver));
    let pid = resolver.pid();
    let mut rng = Rng::new();
    let mut loads = Vec::new();
    let load_before = loadavg();

    let cpu = CpuSample::take(pid);
    let reg = registrations(resolver.dns, &api, args.registrations).await?;
    loads.push(("1. registration", cpu.until_now(pid)));

    let cpu = CpuSample::take(pid);
    let delays: Vec<Duration> = (0..args.checks)
        .map(|_| INTERVAL.mul_f64(rng.unit()))
        .collect();
    let http = failed_checks(resolver.dns, &api, delays).await;
    loads.push(("2. failed HTTP check", cpu.until_now(pid)));

    let cpu = CpuSample::take(pid);
    let delays: Vec<Duration> = (0..args.checks)
        .map(|_| INTERVAL.mul_f64(rng.unit()))
        .collect();
    let ttl = missed_ttls(resolver.dns, &api, delays).await;
    loads.push(("3. missed TTL", cpu.until_now(pid)));

    let load_after = loadavg();
    let interval_ms = ms(INTERVAL);
    let slack_ms = ms(REMOVAL_SLACK);
    let rows = vec![
        Row::new(
            "1. Registration → answerable (from PUT ack)",
            Some(ms(REGISTRATION_TARGET)),
            format!("≤ {} ms", ms(REGISTRATION_TARGET)),
            reg.answerable,
            reg.missing,
        ),
        Row::new(
            "   PUT /v1/agent/service/register round trip (ack latency)",
            None,
            "—".into(),
            reg.ack,
            0,
        ),
        Row::new(
            "2. Failed HTTP check → removed (from backend kill)",
            Some(interval_ms + slack_ms),
            format!(
                "≤ {} ms (interval + {} ms)",
                interval_ms + slack_ms,
                slack_ms
            ),
            http.from_kill,
            http.missing,
        ),
        Row::new(
            "   removed − (last probe received before the kill + interval)",
            None,
            "—".into(),
            http.from_due_probe,
            0,
        ),
        Row::new(
            "3. Missed TTL → removed (from pass ack + TTL)",
            Some(slack_ms),
            format!("≤ {slack_ms} ms past the deadline"),
            ttl.from_ack_deadline,
            ttl.missing,
        ),
        Row::new(
            "   removed − (pass sent + TTL)",
            None,
            "—".into(),
            ttl.from_sent_deadline,
            0,
        ),
        Row::new(
            "   PUT /v1/agent/check/pass round trip (ack latency)",
            None,
            "—".into(),
            ttl.pass_ack,
            0,
        ),
    ];
    let mut notes = Vec::new();
    notes.extend(reg.notes);
    notes.extend(http.notes);
    notes.extend(ttl.notes);
    Ok(report(
        args,
        &rows,
        &loads,
        &notes,
        (load_before, load_after),
    ))
}

// ---------------------------------------------------------------------------------------------
// 1. Registration → answerable

struct Registrations {
    answerable: Vec<f64>,
    ack: Vec<f64>,
    missing: usize,
    notes: Vec<String>,
}

async fn registrations(dns: SocketAddr, api: &Api, n: usize) -> anyhow::Result<Registrations> {
    let mut out = Registrations {
        answerable: Vec::with_capacity(n),
        ack: Vec::with_capacity(n),
        missing: 0,
        notes: Vec::new(),
    };
    let mut retries = 0;
    for i in 0..WARMUP + n {
        let name = format!("fresh-{i}");
        let ip = address(10, i);
        let body = json!({
            "Name": name, "ID": format!("{name}-1"), "Address": ip.to_string(), "Port": 8080,
        });
        // Everything but the PUT itself is ready before the clock starts.
        let mut poller = Poller::new(dns, &format!("{name}.{ZONE}")).await?;
        let request = api
            .client
            .put(format!("{}/v1/agent/service/register", api.base()))
            .json(&body)
            .build()?;
        let sent = Instant::now();
        let resp = api.client.execute(request).await.context("registering")?;
        let acked = Instant::now();
        ensure!(
            resp.status() == 200,
            "register {name}: HTTP {}",
            resp.status()
        );
        let seen = poller
            .until(
                |a| a.contains(&IpAddr::V4(ip)),
                acked + GIVE_UP,
                Duration::ZERO,
            )
            .await?;
        let _ = resp.bytes().await;
        retries += poller.retries;
        if i < WARMUP {
            continue;
        }
        out.ack.push(ms(acked - sent));
        match seen {
            Some(at) => out.answerable.push(signed_ms(at, acked)),
            None => {
                out.missing += 1;
                out.notes.push(format!(
                    "{name}: not answered within {GIVE_UP:?} of its acknowledgement"
                ));
            }
        }
    }
    if retries > 0 {
        out.notes.push(format!(
            "registration: {retries} DNS replies were lost or unusable and the query sent again"
        ));
    }
    Ok(out)
}

// ---------------------------------------------------------------------------------------------
// 2. Failed HTTP check → removed

#[derive(Default)]
struct FailedChecks {
    from_kill: Vec<f64>,
    from_due_probe: Vec<f64>,
    missing: usize,
    notes: Vec<String>,
}

struct KillOutcome {
    from_kill: Option<f64>,
    from_due_probe: Option<f64>,
    retries: u32,
}

async fn failed_checks(dns: SocketAddr, api: &Arc<Api>, delays: Vec<Duration>) -> FailedChecks {
    let mut tasks = JoinSet::new();
    for (j, delay) in delays.into_iter().enumerate() {
        let api = api.clone();
        tasks.spawn(async move { (j, failed_check(dns, &api, j, delay).await) });
    }
    let mut out = FailedChecks::default();
    let mut retries = 0;
    while let Some(joined) = tasks.join_next().await {
        match joined {
            Ok((j, Ok(o))) => {
                retries += o.retries;
                match o.from_kill {
                    Some(v) => out.from_kill.push(v),
                    None => {
                        out.missing += 1;
                        out.notes.push(format!(
                            "hc-{j}: still answered {:?} after its backend was killed",
                            INTERVAL + GIVE_UP
                        ));
                    }
                }
                out.from_due_probe.extend(o.from_due_probe);
            }
            Ok((j, Err(e))) => {
                out.missing += 1;
                out.notes.push(format!("hc-{j}: {e:#}"));
            }
            Err(e) => {
                out.missing += 1;
                out.notes.push(format!("an HTTP check task failed: {e}"));
            }
        }
    }
    if retries > 0 {
        out.notes.push(format!(
            "HTTP checks: {retries} DNS replies were lost or unusable and the query sent again"
        ));
    }
    out
}

async fn failed_check(
    dns: SocketAddr,
    api: &Api,
    j: usize,
    delay: Duration,
) -> anyhow::Result<KillOutcome> {
    let backend = Backend::start().await?;
    let name = format!("hc-{j}");
    let ip = IpAddr::V4(address(20, j));
    put(
        api,
        "/v1/agent/service/register",
        Some(json!({
            "Name": name, "ID": format!("{name}-1"), "Address": ip.to_string(),
            "Port": backend.port,
            "Check": {
                "HTTP": format!("http://127.0.0.1:{}/health", backend.port),
                "Interval": INTERVAL_TEXT, "Timeout": HTTP_TIMEOUT_TEXT,
            },
        })),
    )
    .await?;
    let mut poller = Poller::new(dns, &format!("{name}.{ZONE}")).await?;
    let passing = poller
        .until(
            |a| a.contains(&ip),
            Instant::now() + GIVE_UP,
            Duration::from_millis(5),
        )
        .await?;
    ensure!(passing.is_some(), "never answered (its check never passed)");
    // A random moment of the probe cycle.
    tokio::time::sleep(delay).await;
    let last_probe = backend.last_probe();
    let killed = Instant::now();
    backend.kill().await;
    let removed = poller
        .until(
            |a| !a.contains(&ip),
            killed + INTERVAL + GIVE_UP,
            Duration::ZERO,
        )
        .await?;
    Ok(KillOutcome {
        from_kill: removed.map(|at| signed_ms(at, killed)),
        from_due_probe: removed
            .zip(last_probe)
            .map(|(at, probe)| signed_ms(at, probe + INTERVAL)),
        retries: poller.retries,
    })
}

/// A tiny HTTP/1.1 server answering 200 to every request, until killed.
struct Backend {
    port: u16,
    last_probe: Arc<Mutex<Option<Instant>>>,
    kill: Option<oneshot::Sender<()>>,
    task: JoinHandle<()>,
}

impl Backend {
    async fn start() -> anyhow::Result<Backend> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let port = listener.local_addr()?.port();
        let last_probe = Arc::new(Mutex::new(None));
        let (kill, mut killed) = oneshot::channel::<()>();
        let seen = last_probe.clone();
        let task = tokio::spawn(async move {
            let mut conns = JoinSet::new();
            loop {
                tokio::select! {
                    _ = &mut killed => break,
                    accepted = listener.accept() => match accepted {
                        Ok((stream, _)) => {
                            conns.spawn(serve_connection(stream, seen.clone()));
                        }
                        Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
                    },
                    Some(_) = conns.join_next(), if !conns.is_empty() => {}
                }
            }
            // Connects are refused from here on, and open connections are closed.
            drop(listener);
            conns.shutdown().await;
        });
        Ok(Backend {
            port,
            last_probe,
            kill: Some(kill),
            task,
        })
    }

    fn last_probe(&self) -> Option<Instant> {
        *self.last_probe.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Closes the listener and every connection; returns once they are closed.
    async fn kill(mut self) {
        if let Some(k) = self.kill.take() {
            let _ = k.send(());
        }
        let _ = (&mut self.task).await;
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn serve_connection(mut stream: TcpStream, seen: Arc<Mutex<Option<Instant>>>) {
    const RESPONSE: &[u8] =
        b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: 3\r\n\r\nok\n";
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    loop {
        while let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            buf.drain(..end + 4);
            if stream.write_all(RESPONSE).await.is_err() {
                return;
            }
        }
        if buf.len() > 16 * 1024 {
            return;
        }
        match stream.read(&mut chunk).await {
            Ok(0) | Err(_) => return,
            Ok(n) => {
                *seen.lock().unwrap_or_else(|e| e.into_inner()) = Some(Instant::now());
                buf.extend_from_slice(&chunk[..n]);
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// 3. Missed TTL → removed

#[derive(Default)]
struct MissedTtls {
    from_ack_deadline: Vec<f64>,
    from_sent_deadline: Vec<f64>,
    pass_ack: Vec<f64>,
    missing: usize,
    notes: Vec<String>,
}

struct TtlOutcome {
    pass_ack: f64,
    removed: Option<(f64, f64)>,
    answered_after_pass: bool,
    retries: u32,
}

async fn missed_ttls(dns: SocketAddr, api: &Arc<Api>, delays: Vec<Duration>) -> MissedTtls {
    let mut tasks = JoinSet::new();
    for (j, delay) in delays.into_iter().enumerate() {
        let api = api.clone();
        tasks.spawn(async move { (j, missed_ttl(dns, &api, j, delay).await) });
    }
    let mut out = MissedTtls::default();
    let mut retries = 0;
    let mut unanswered = 0;
    while let Some(joined) = tasks.join_next().await {
        match joined {
            Ok((j, Ok(o))) => {
                retries += o.retries;
                out.pass_ack.push(o.pass_ack);
                if !o.answered_after_pass {
                    unanswered += 1;
                }
                match o.removed {
                    Some((from_ack, from_sent)) => {
                        out.from_ack_deadline.push(from_ack);
                        out.from_sent_deadline.push(from_sent);
                    }
                    None => {
                        out.missing += 1;
                        out.notes.push(format!(
                            "ttl-{j}: still answered {GIVE_UP:?} after its TTL ran out"
                        ));
                    }
                }
            }
            Ok((j, Err(e))) => {
                out.missing += 1;
                out.notes.push(format!("ttl-{j}: {e:#}"));
            }
            Err(e) => {
                out.missing += 1;
                out.notes.push(format!("a TTL check task failed: {e}"));
            }
        }
    }
    if unanswered > 0 {
        out.notes.push(format!(
            "TTL checks: {unanswered} instances were not answered right after their pass was acknowledged"
        ));
    }
    if retries > 0 {
        out.notes.push(format!(
            "TTL checks: {retries} DNS replies were lost or unusable and the query sent again"
        ));
    }
    out
}

async fn missed_ttl(
    dns: SocketAddr,
    api: &Api,
    j: usize,
    delay: Duration,
) -> anyhow::Result<TtlOutcome> {
    let name = format!("ttl-{j}");
    let id = format!("{name}-1");
    let ip = IpAddr::V4(address(30, j));
    put(
        api,
        "/v1/agent/service/register",
        Some(json!({
            "Name": name, "ID": id, "Address": ip.to_string(), "Port": 8080,
            "Check": {"TTL": INTERVAL_TEXT},
        })),
    )
    .await?;
    let mut poller = Poller::new(dns, &format!("{name}.{ZONE}")).await?;
    // Spread the deadlines over one TTL.
    tokio::time::sleep(delay).await;
    let request = api
        .client
        .put(format!("{}/v1/agent/check/pass/service:{id}", api.base()))
        .build()?;
    let sent = Instant::now();
    let resp = api
        .client
        .execute(request)
        .await
        .context("passing the check")?;
    let acked = Instant::now();
    ensure!(resp.status() == 200, "pass: HTTP {}", resp.status());
    let _ = resp.bytes().await;
    let answered_after_pass = poller
        .ask()
        .await?
        .is_some_and(|r| r.addresses.contains(&ip));
    // Watch closely from a little before the earliest possible deadline.
    tokio::time::sleep_until((sent + INTERVAL - Duration::from_millis(50)).into()).await;
    let removed = poller
        .until(
            |a| !a.contains(&ip),
            acked + INTERVAL + GIVE_UP,
            Duration::ZERO,
        )
        .await?;
    Ok(TtlOutcome {
        pass_ack: ms(acked - sent),
        removed: removed.map(|at| {
            (
                signed_ms(at, acked + INTERVAL),
                signed_ms(at, sent + INTERVAL),
            )
        }),
        answered_after_pass,
        retries: poller.retries,
    })
}

// ---------------------------------------------------------------------------------------------
// DNS and HTTP

/// Asks one name (type A) again and again over one UDP socket.
struct Poller {
    socket: UdpSocket,
    query: Vec<u8>,
    id: u16,
    buf: Vec<u8>,
    /// Queries that got no usable reply and were sent again.
    retries: u32,
}

struct Reply {
    at: Instant,
    addresses: Vec<IpAddr>,
}

impl Poller {
    async fn new(server: SocketAddr, name: &str) -> anyhow::Result<Poller> {
        let socket = UdpSocket::bind("127.0.0.1:0").await?;
        socket.connect(server).await?;
        let query = dns::query(name, RecordType::A, None).to_vec()?;
        Ok(Poller {
            socket,
            query,
            id: 0,
            buf: vec![0; 65535],
            retries: 0,
        })
    }

    /// One query. `None` when no usable reply came (lost, or not NOERROR/NXDOMAIN).
    async fn ask(&mut self) -> anyhow::Result<Option<Reply>> {
        self.id = self.id.wrapping_add(1);
        self.query[..2].copy_from_slice(&self.id.to_be_bytes());
        self.socket.send(&self.query).await?;
        let deadline = tokio::time::Instant::now() + QUERY_TIMEOUT;
        loop {
            let n = match tokio::time::timeout_at(deadline, self.socket.recv(&mut self.buf)).await {
                Ok(Ok(n)) => n,
                Ok(Err(_)) => {
                    // An ICMP error (nobody listening): count it, pause, let the caller retry.
                    self.retries += 1;
                    tokio::time::sleep(Duration::from_millis(1)).await;
                    return Ok(None);
                }
                Err(_) => {
                    self.retries += 1;
                    return Ok(None);
                }
            };
            let at = Instant::now();
            if n < 2 || self.buf[..2] != self.id.to_be_bytes() {
                continue; // a late reply to an earlier query
            }
            let Ok(m) = Message::from_vec(&self.buf[..n]) else {
                self.retries += 1;
                return Ok(None);
            };
            if !matches!(
                m.metadata.response_code,
                ResponseCode::NoError | ResponseCode::NXDomain
            ) {
                self.retries += 1;
                return Ok(None);
            }
            return Ok(Some(Reply {
                at,
                addresses: dns::addresses(&m),
            }));
        }
    }

    /// Asks until a reply's addresses satisfy `done`, `gap` apart (zero: as fast as replies
    /// come); the time that reply arrived, or `None` at `deadline`.
    async fn until(
        &mut self,
        done: impl Fn(&[IpAddr]) -> bool,
        deadline: Instant,
        gap: Duration,
    ) -> anyhow::Result<Option<Instant>> {
        while Instant::now() < deadline {
            if let Some(reply) = self.ask().await? {
                if done(&reply.addresses) {
                    return Ok(Some(reply.at));
                }
            }
            if !gap.is_zero() {
                tokio::time::sleep(gap).await;
            }
        }
        Ok(None)
    }
}

async fn put(api: &Api, path: &str, body: Option<Value>) -> anyhow::Result<()> {
    let mut req = api.client.put(format!("{}{path}", api.base()));
    if let Some(b) = body {
        req = req.json(&b);
    }
    let resp = req.send().await.with_context(|| format!("PUT {path}"))?;
    let status = resp.status();
    if status != 200 {
        bail!(
            "PUT {path}: HTTP {status}: {}",
            resp.text().await.unwrap_or_default()
        );
    }
    Ok(())
}

/// The address of instance `i` of a phase: 127.<block>.x.y, never contacted by anyone.
fn address(block: u8, i: usize) -> Ipv4Addr {
    Ipv4Addr::new(127, block, (i / 250) as u8, (i % 250 + 1) as u8)
}

// ---------------------------------------------------------------------------------------------
// Statistics and the report

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// `a - b` in milliseconds, negative when `a` came first.
fn signed_ms(a: Instant, b: Instant) -> f64 {
    if a >= b {
        ms(a - b)
    } else {
        -ms(b - a)
    }
}

fn fmt_ms(v: f64) -> String {
    let a = v.abs();
    if a < 10.0 {
        format!("{v:.3} ms")
    } else if a < 100.0 {
        format!("{v:.2} ms")
    } else {
        format!("{v:.1} ms")
    }
}

struct Row {
    name: &'static str,
    target: Option<f64>,
    target_text: String,
    values: Vec<f64>,
    missing: usize,
}

impl Row {
    fn new(
        name: &'static str,
        target: Option<f64>,
        target_text: String,
        mut values: Vec<f64>,
        missing: usize,
    ) -> Row {
        values.sort_by(f64::total_cmp);
        Row {
            name,
            target,
            target_text,
            values,
            missing,
        }
    }

    /// Nearest-rank percentile.
    fn percentile(&self, p: f64) -> Option<f64> {
        if self.values.is_empty() {
            return None;
        }
        let rank = ((p / 100.0) * self.values.len() as f64).ceil().max(1.0) as usize;
        Some(self.values[rank.min(self.values.len()) - 1])
    }

    fn over(&self) -> usize {
        self.target
            .map_or(0, |t| self.values.iter().filter(|v| **v > t).count())
    }

    fn verdict(&self) -> String {
        if self.target.is_none() {
            return "—".into();
        }
        let over = self.over();
        let total = self.values.len() + self.missing;
        match (over, self.missing) {
            (0, 0) if total > 0 => "**pass**".into(),
            (_, 0) => format!("**FAIL** ({over} of {total} over)"),
            _ => format!("**FAIL** ({over} of {total} over, {} never)", self.missing),
        }
    }
}

fn report(
    args: &Args,
    rows: &[Row],
    loads: &[(&str, Load)],
    notes: &[String],
    (load_before, load_after): (String, String),
) -> String {
    let nproc = std::thread::available_parallelism().map_or(0, |n| n.get());
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_string())
        })
        .unwrap_or_else(|| "unknown".into());
    let mut s = String::new();
    let _ = writeln!(s, "# Waymark freshness benchmark\n");
    let _ = writeln!(s, "- Date: {}", utc_now());
    let _ = writeln!(s, "- Machine: nproc = {nproc}, CPU: {cpu}");
    let _ = writeln!(
        s,
        "- Load average (1/5/15 min) before: {load_before}; after: {load_after}"
    );
    let _ = writeln!(
        s,
        "- Resolver: `{}`; source: {}",
        args.resolver_bin.display(),
        source_version()
    );
    let _ = writeln!(
        s,
        "- Runs: {} registrations (after {WARMUP} unmeasured warm-up ones); {} services with an HTTP \
         check (Interval {INTERVAL_TEXT}, Timeout {HTTP_TIMEOUT_TEXT}); {} services with a TTL \
         check (TTL {INTERVAL_TEXT})\n",
        args.registrations, args.checks, args.checks
    );
    let _ = writeln!(
        s,
        "| Measurement | Target | Count | Min | p50 | p99 | Max | Result |"
    );
    let _ = writeln!(s, "|---|---|---:|---:|---:|---:|---:|---|");
    for r in rows {
        let cell = |v: Option<f64>| v.map_or("—".into(), fmt_ms);
        let count = if r.missing > 0 {
            format!("{} (+{} never)", r.values.len(), r.missing)
        } else {
            r.values.len().to_string()
        };
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} | {} | {} | {} | {} |",
            r.name.trim_start(),
            r.target_text,
            count,
            cell(r.values.first().copied()),
            cell(r.percentile(50.0)),
            cell(r.percentile(99.0)),
            cell(r.values.last().copied()),
            r.verdict()
        );
    }
    let _ = writeln!(
        s,
        "\nCPU use during each phase, in cores (from /proc/stat and /proc/<pid>/stat):\n"
    );
    let _ = writeln!(
        s,
        "| Phase | Wall time | Benchmark | Resolver | Other processes | Steal |"
    );
    let _ = writeln!(s, "|---|---:|---:|---:|---:|---:|");
    for (phase, l) in loads {
        let _ = writeln!(
            s,
            "| {phase} | {:.2} s | {:.2} | {:.2} | {:.2} | {:.1} % |",
            l.wall.as_secs_f64(),
            l.ours,
            l.resolver,
            l.other,
            l.steal_percent
        );
    }
    let _ = writeln!(
        s,
        "\nMethod: one release `waymark-resolver serve` on 127.0.0.1 (ephemeral ports, temporary \
         data dir on {}); DNS is asked with raw UDP A queries, each sent as soon as the previous \
         reply is in. (1) one registration at a time; the clock starts when the PUT's 200 arrives. \
         (2) all services at once; each backend is killed at a random moment (uniform over one \
         interval) after its instance is first answered; the clock starts just before the kill. \
         (3) all services at once, passes spread uniformly over one TTL; the clock starts at the \
         pass's 200 + TTL (the server starts the TTL when it handles the pass, before the store's \
         fsync, so removal can come slightly before that point: negative values). p99 is \
         nearest-rank: with fewer than 100 samples it is the maximum.",
        std::env::temp_dir().display()
    );
    if !notes.is_empty() {
        let _ = writeln!(s, "\nNotes:\n");
        for n in notes.iter().take(50) {
            let _ = writeln!(s, "- {n}");
        }
        if notes.len() > 50 {
            let _ = writeln!(s, "- … and {} more", notes.len() - 50);
        }
    }
    s
}

fn source_version() -> String {
    let root = waymark_e2e::root();
    let git = |args: &[&str]| {
        Command::new("git")
            .arg("-C")
            .arg(&root)
            .args(args)
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
    };
    match git(&["rev-parse", "--short", "HEAD"]) {
        Some(commit) => {
            let dirty = git(&["status", "--porcelain", "--untracked-files=no"])
                .is_some_and(|s| !s.is_empty());
            if dirty {
                format!("commit {commit} plus uncommitted changes in the working tree")
            } else {
                format!("commit {commit}")
            }
        }
        None => "unknown".into(),
    }
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "unknown".into())
}

/// CPU counters at one moment: the whole machine, this process and the resolver.
struct CpuSample {
    at: Instant,
    total: u64,
    busy: u64,
    steal: u64,
    cpus: usize,
    ours: u64,
    resolver: u64,
}

/// CPU use over a phase, in cores.
struct Load {
    wall: Duration,
    ours: f64,
    resolver: f64,
    other: f64,
    steal_percent: f64,
}

impl CpuSample {
    fn take(resolver: Option<u32>) -> CpuSample {
        let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
        let fields: Vec<u64> = stat
            .lines()
            .next()
            .unwrap_or("")
            .split_whitespace()
            .skip(1)
            .filter_map(|f| f.parse().ok())
            .collect();
        let get = |i: usize| fields.get(i).copied().unwrap_or(0);
        // user nice system idle iowait irq softirq steal
        let total: u64 = fields.iter().take(8).sum();
        let idle = get(3) + get(4);
        let steal = get(7);
        let cpus = stat
            .lines()
            .filter(|l| l.starts_with("cpu") && l.as_bytes().get(3).is_some_and(u8::is_ascii_digit))
            .count()
            .max(1);
        CpuSample {
            at: Instant::now(),
            total,
            busy: total.saturating_sub(idle + steal),
            steal,
            cpus,
            ours: process_ticks("self"),
            resolver: resolver.map_or(0, |p| process_ticks(&p.to_string())),
        }
    }

    fn until_now(&self, resolver: Option<u32>) -> Load {
        let now = CpuSample::take(resolver);
        let total = now.total.saturating_sub(self.total).max(1) as f64;
        let cores = |ticks: u64| ticks as f64 / total * self.cpus as f64;
        let ours = now.ours.saturating_sub(self.ours);
        let resolver = now.resolver.saturating_sub(self.resolver);
        let busy = now.busy.saturating_sub(self.busy);
        Load {
            wall: now.at - self.at,
            ours: cores(ours),
            resolver: cores(resolver),
            other: cores(busy.saturating_sub(ours + resolver)),
            steal_percent: now.steal.saturating_sub(self.steal) as f64 / total * 100.0,
        }
    }
}

/// utime + stime of a process, in clock ticks.
fn process_ticks(pid: &str) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let Some((_, rest)) = stat.rsplit_once(')') else {
        return 0;
    };
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // Fields after the command name start at field 3 (state); utime is 14, stime 15.
    let get = |i: usize| {
        fields
            .get(i - 3)
            .and_then(|f| f.parse::<u64>().ok())
            .unwrap_or(0)
    };
    get(14) + get(15)
}

fn utc_now() -> String {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let (days, rem) = ((secs / 86_400) as i64, secs % 86_400);
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02} UTC",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// Random numbers without a dependency: SipHash of a counter under std's random keys.
struct Rng {
    keys: RandomState,
    n: u64,
}

impl Rng {
    fn new() -> Rng {
        Rng {
            keys: RandomState::new(),
            n: 0,
        }
    }

    /// Uniform in [0, 1).
    fn unit(&mut self) -> f64 {
        self.n += 1;
        (self.keys.hash_one(self.n) >> 11) as f64 / (1u64 << 53) as f64
    }
}
