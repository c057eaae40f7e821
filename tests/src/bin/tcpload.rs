//! `tcpload`: a fixed-rate (open-loop) TCP request/response load generator, the TCP
//! counterpart of `httpload` for the forwarder benchmark (`tests/bench/forwarder.sh`).
//!
//! ```text
//! tcpload --addr 10.77.0.2:7000 --rate 2000 --connections 32 --duration 10 \
//!     [--warmup 1] [--message ping] [--new-connection] [--timeout 2] [--spin-us 0] [--json]
//! ```
//!
//! Each request is one line (`--message` and `\n`); the answer is one line back (as from
//! `line_echo`, which answers `<id> <line>`). The schedule, the pacing and the measure are
//! httpload's: slot `k` is intended at `t0 + k / rate`, connection `c` owns slots `c, c + C,
//! …`, one request in flight per connection, a Linux `timerfd` per connection for µs pacing,
//! and latency counted from the slot's intended time (coordinated-omission corrected), so a
//! wait for a slow answer counts. Slots in the first `--warmup` seconds are not measured.
//!
//! - Persistent (default): each connection is opened before the schedule starts and kept.
//! - `--new-connection`: every request connects, exchanges its line and closes; the connect
//!   is part of its latency.
//!
//! An I/O failure or no answer within `--timeout` counts as an error and the connection is
//! reopened for the next slot. Output: text, or with `--json` one object with `rate_target`,
//! `rate`, `requests`, `requests_all` (warm-up included), `sent`, `unsent`, `errors`,
//! `io_errors`, `timeouts`, `p50_us`, `p90_us`, `p99_us`, `p999_us`, `max_us`, `lag_p50_us`,
//! `lag_p99_us` and `first_error`. A run takes at most warmup + duration + timeout.

use std::io;
use std::net::SocketAddr;
use std::os::fd::AsFd;
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;
use nix::sys::time::TimeSpec;
use nix::sys::timerfd::{ClockId, Expiration, TimerFd, TimerFlags, TimerSetTimeFlags};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// At most this many slots (`rate × (warmup + duration)`) per run.
const MAX_SLOTS: f64 = 20_000_000.0;

#[derive(Parser, Debug)]
#[command(
    name = "tcpload",
    about = "Fixed-rate TCP line request/response load; latency from the intended send time"
)]
struct Args {
    #[arg(long)]
    addr: SocketAddr,
    /// Requests per second, all connections together.
    #[arg(long)]
    rate: f64,
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=10_000))]
    connections: u32,
    /// Measured seconds.
    #[arg(long)]
    duration: f64,
    /// Seconds sent at the same rate before measuring.
    #[arg(long, default_value_t = 0.0)]
    warmup: f64,
    /// The request line (without its newline).
    #[arg(long, default_value = "ping")]
    message: String,
    /// A new connection for every request.
    #[arg(long)]
    new_connection: bool,
    /// Seconds to wait for a connect and the answer before counting a timeout.
    #[arg(long, default_value_t = 2.0)]
    timeout: f64,
    /// Wake this many µs before each send and spin (yielding) until its time.
    #[arg(long, default_value_t = 0)]
    spin_us: u64,
    #[arg(long)]
    json: bool,
}

struct Plan {
    addr: SocketAddr,
    request: Vec<u8>,
    rate: f64,
    connections: u64,
    t0: Instant,
    warm: u64,
    total: u64,
    end: Instant,
    timeout: Duration,
    spin: Duration,
    new_connection: bool,
}

#[derive(Default)]
struct Stats {
    completed_all: u64,
    sent: u64,
    completed: u64,
    io_errors: u64,
    timeouts: u64,
    unsent: u64,
    latencies: Vec<u32>,
    lags: Vec<u32>,
    first_error: Option<String>,
}

fn micros(d: Duration) -> u32 {
    u32::try_from(d.as_micros()).unwrap_or(u32::MAX)
}

/// A one-shot `timerfd` in tokio's reactor (as httpload's, which says why it is built so).
struct Pacer {
    timer: TimerFd,
    ready: tokio::net::unix::pipe::Receiver,
}

impl Pacer {
    fn new() -> io::Result<Pacer> {
        let timer = TimerFd::new(
            ClockId::CLOCK_MONOTONIC,
            TimerFlags::TFD_NONBLOCK | TimerFlags::TFD_CLOEXEC,
        )?;
        let dup = timer.as_fd().try_clone_to_owned()?;
        let ready = tokio::net::unix::pipe::Receiver::from_owned_fd_unchecked(dup)?;
        Ok(Pacer { timer, ready })
    }

    async fn until(&self, at: Instant) -> io::Result<()> {
        loop {
            let now = Instant::now();
            if now >= at {
                return Ok(());
            }
            let left = (at - now).max(Duration::from_nanos(1));
            self.timer.set(
                Expiration::OneShot(TimeSpec::from_duration(left)),
                TimerSetTimeFlags::empty(),
            )?;
            self.ready.readable().await?;
            match self.ready.try_read(&mut [0u8; 8]) {
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(e),
            }
        }
    }
}

async fn connect(addr: SocketAddr) -> io::Result<TcpStream> {
    let s = TcpStream::connect(addr)
        .await
        .map_err(|e| io::Error::new(e.kind(), format!("connect {addr}: {e}")))?;
    s.set_nodelay(true)?;
    Ok(s)
}

/// Sends the request line and reads up to the answer's newline.
async fn exchange(stream: &mut TcpStream, request: &[u8], buf: &mut [u8]) -> io::Result<()> {
    stream.write_all(request).await?;
    let mut got = 0;
    loop {
        let n = stream.read(&mut buf[got..]).await?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "closed before the answer's newline",
            ));
        }
        if buf[got..got + n].contains(&b'\n') {
            // One request in flight: the newline ends the answer (and nothing follows it).
            return Ok(());
        }
        got += n;
        if got == buf.len() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "answer line too long",
            ));
        }
    }
}

async fn run_connection(plan: Arc<Plan>, c: u64, mut conn: Option<TcpStream>) -> Stats {
    let mut st = Stats::default();
    let pacer = Pacer::new().ok();
    let mut buf = vec![0u8; 4096];
    let mut free_at = plan.t0;
    let mut slot = c;
    while slot < plan.total {
        let intended = plan.t0 + Duration::from_secs_f64(slot as f64 / plan.rate);
        let wake = intended.checked_sub(plan.spin).unwrap_or(intended);
        match &pacer {
            Some(p) if p.until(wake).await.is_ok() => {}
            _ => tokio::time::sleep_until(wake.into()).await,
        }
        while Instant::now() < intended {
            tokio::task::yield_now().await;
        }
        let sent_at = Instant::now();
        if sent_at >= plan.end {
            // The slots left that would have been measured.
            let mut s = slot;
            while s < plan.total {
                if s >= plan.warm {
                    st.unsent += 1;
                }
                s += plan.connections;
            }
            break;
        }
        let measured = slot >= plan.warm;
        if measured {
            st.sent += 1;
            st.lags.push(micros(sent_at - intended.max(free_at)));
        }
        let outcome = tokio::time::timeout_at((sent_at + plan.timeout).into(), async {
            if conn.is_none() {
                conn = Some(connect(plan.addr).await?);
            }
            match conn.as_mut() {
                Some(s) => exchange(s, &plan.request, &mut buf).await,
                None => Err(io::Error::other("no connection")),
            }
        })
        .await;
        let done = Instant::now();
        free_at = done;
        if plan.new_connection {
            conn = None;
        }
        match outcome {
            Ok(Ok(())) => {
                st.completed_all += 1;
                if measured {
                    st.completed += 1;
                    st.latencies.push(micros(done - intended));
                }
            }
            Ok(Err(e)) => {
                conn = None;
                if measured {
                    st.io_errors += 1;
                    st.first_error.get_or_insert_with(|| e.to_string());
                }
            }
            Err(_) => {
                conn = None;
                if measured {
                    st.timeouts += 1;
                    st.first_error
                        .get_or_insert_with(|| format!("no answer within {:?}", plan.timeout));
                }
            }
        }
        slot += plan.connections;
    }
    st
}

/// Nearest-rank percentile of sorted values (`per_100k`: 99.9 → 99_900).
fn percentile(sorted: &[u32], per_100k: usize) -> Option<u32> {
    let n = sorted.len();
    if n == 0 {
        return None;
    }
    Some(sorted[(per_100k * n).div_ceil(100_000).clamp(1, n) - 1])
}

async fn run(args: &Args) -> anyhow::Result<serde_json::Value> {
    let timeout = Duration::from_secs_f64(args.timeout);
    let mut conns = Vec::new();
    for _ in 0..args.connections {
        conns.push(if args.new_connection {
            None
        } else {
            tokio::time::timeout(timeout, connect(args.addr))
                .await
                .ok()
                .and_then(Result::ok)
        });
    }
    let t0 = Instant::now() + Duration::from_millis(5);
    let plan = Arc::new(Plan {
        addr: args.addr,
        request: format!("{}\n", args.message).into_bytes(),
        rate: args.rate,
        connections: u64::from(args.connections),
        t0,
        warm: (args.warmup * args.rate).ceil() as u64,
        total: ((args.warmup + args.duration) * args.rate).ceil() as u64,
        end: t0 + Duration::from_secs_f64(args.warmup + args.duration),
        timeout,
        spin: Duration::from_micros(args.spin_us),
        new_connection: args.new_connection,
    });
    let mut tasks = tokio::task::JoinSet::new();
    for (c, conn) in conns.into_iter().enumerate() {
        tasks.spawn(run_connection(Arc::clone(&plan), c as u64, conn));
    }
    let mut all = Stats::default();
    while let Some(joined) = tasks.join_next().await {
        let st = joined?;
        all.completed_all += st.completed_all;
        all.sent += st.sent;
        all.completed += st.completed;
        all.io_errors += st.io_errors;
        all.timeouts += st.timeouts;
        all.unsent += st.unsent;
        all.latencies.extend_from_slice(&st.latencies);
        all.lags.extend_from_slice(&st.lags);
        all.first_error = all.first_error.or(st.first_error);
    }
    all.latencies.sort_unstable();
    all.lags.sort_unstable();
    let lat = |p| percentile(&all.latencies, p);
    Ok(serde_json::json!({
        "addr": args.addr.to_string(),
        "new_connection": args.new_connection,
        "rate_target": args.rate,
        "connections": args.connections,
        "rate": all.completed as f64 / args.duration,
        "requests": all.completed,
        "requests_all": all.completed_all,
        "sent": all.sent,
        "unsent": all.unsent,
        "errors": all.io_errors + all.timeouts,
        "io_errors": all.io_errors,
        "timeouts": all.timeouts,
        "p50_us": lat(50_000),
        "p90_us": lat(90_000),
        "p99_us": lat(99_000),
        "p999_us": lat(99_900),
        "max_us": all.latencies.last(),
        "lag_p50_us": percentile(&all.lags, 50_000),
        "lag_p99_us": percentile(&all.lags, 99_000),
        "first_error": all.first_error,
    }))
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let valid = |v: f64| v.is_finite() && v > 0.0;
    if !valid(args.rate) || !valid(args.duration) || !valid(args.timeout) || args.warmup < 0.0 {
        anyhow::bail!("--rate, --duration and --timeout must be positive, --warmup ≥ 0");
    }
    if args.rate * (args.warmup + args.duration) > MAX_SLOTS {
        anyhow::bail!("--rate × (--warmup + --duration): at most {MAX_SLOTS} requests");
    }
    let report = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?
        .block_on(run(&args))?;
    if args.json {
        println!("{report}");
    } else {
        let n = |k: &str| report[k].to_string();
        println!(
            "{} at {} req/s, {} connections{}: {} completed, {} errors, {} unsent\n  \
             latency from intended send (µs): p50 {} p90 {} p99 {} p99.9 {} max {}; lag p99 {}",
            args.addr,
            args.rate,
            args.connections,
            if args.new_connection {
                " (new connection per request)"
            } else {
                ""
            },
            n("requests"),
            n("errors"),
            n("unsent"),
            n("p50_us"),
            n("p90_us"),
            n("p99_us"),
            n("p999_us"),
            n("max_us"),
            n("lag_p99_us"),
        );
        if let Some(e) = report["first_error"].as_str() {
            println!("  first error: {e}");
        }
    }
    Ok(())
}
