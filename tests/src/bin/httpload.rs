//! `httpload`: a fixed-rate (open-loop) HTTP/1.1 load generator in the manner of wrk2, for the
//! gateway benchmark (`tests/bench/gateway.sh`). wrk sends as fast as the target answers, so
//! it cannot say what latency a proxy adds at a given rate below saturation; this can.
//!
//! ```text
//! httpload --url http://127.0.0.1:8080/path --rate 10000 --connections 32 --duration 10 \
//!     [--warmup 1] [--header 'Host: bench.test' ...] [--timeout 2] [--spin-us 0] [--json]
//! ```
//!
//! What it owns and how it measures:
//!
//! - **Schedule.** `--rate` is requests per second over all connections. Slot `k` of the run
//!   is intended at `t0 + k / rate`; connection `c` owns slots `c, c + C, c + 2C, …`, so each
//!   connection runs at `rate / C` and the connections' starts are staggered by `1 / rate`.
//!   One request is in flight per connection (keep-alive HTTP/1.1, no pipelining).
//! - **Latency** is measured from the slot's *intended* time to the end of the response, not
//!   from the actual send (coordinated-omission correction, as wrk2): when a connection falls
//!   behind it sends at once and the wait counts in the latency. Slots still unsent when the
//!   run ends are reported as `unsent` (the target or the generator could not keep up).
//! - **Window.** Slots intended in the first `--warmup` seconds are sent but not counted; the
//!   next `--duration` seconds are measured. Every latency of the window is kept (µs, `u32`,
//!   one `Vec` per connection, merged and sorted at the end); `rate × (warmup + duration)` is
//!   capped at 20 million slots. Percentiles are nearest-rank.
//! - **Pacing.** One thread (tokio `current_thread`; pin it, e.g. `taskset -c 1`). tokio's
//!   timer has 1 ms granularity, and since latency counts from the intended time, waking up to
//!   1 ms late would be measured as latency. So each connection waits on its own Linux
//!   `timerfd` (ns resolution, no timer slack) registered with tokio's reactor, and does not
//!   spin: the generator's core stays free between requests. What remains is the kernel's
//!   wake-up latency from idle (on the 2-core VM this was written on, ~30–50 µs at the median,
//!   the same for every target, so it cancels in a comparison with the backend alone).
//!   `--spin-us N` wakes N µs early and yields in a loop until the intended time, which takes
//!   most of that out at the cost of a busy core (it then competes with anything else on that
//!   core). The pacing lag is reported so the generator's own share is visible: how late a
//!   request went out after both its intended time and the end of the connection's previous
//!   exchange (a wait for a slow answer is the target's doing and is not lag). Linux only.
//! - **Protocol.** Raw `GET <path> HTTP/1.1` with `Host` (from the URL, or a `--header Host`)
//!   and the extra headers, over `TcpStream` with `TCP_NODELAY`. Responses are parsed: status
//!   line, headers, then a `Content-Length`, `Transfer-Encoding: chunked` (with trailers) or
//!   read-to-close body; 1xx interim responses are skipped. `Connection: close` reconnects.
//! - **Errors.** A non-2xx answer is a completed request (its latency is recorded) and counts
//!   in `non2xx`. An I/O or protocol failure (connect refused, close mid-response, bad framing)
//!   or no complete answer within `--timeout` of the send counts in `io_errors`/`timeouts`,
//!   and the connection is reopened for the next slot. `errors` = non-2xx + I/O + timeouts.
//! - **Bounds.** Sending stops at the end of the window; the last answers are awaited at most
//!   `--timeout`; so a run takes at most warmup + duration + timeout (+ the initial connects,
//!   bounded by the timeout too).
//!
//! Output: plain text, or with `--json` one object with `rate_target`, `rate` (completed per
//! second of the window), `requests` (completed in the window), `requests_all` (completed,
//! warm-up included), `sent`, `unsent`, `errors`,
//! `non2xx`, `io_errors`, `timeouts`, `reconnects`, `p50_us`, `p90_us`, `p99_us`, `p999_us`,
//! `max_us` (null when nothing completed), `lag_p50_us`, `lag_p99_us`, `lag_max_us`, and
//! `first_error`. Exit status: 0 after a run (whatever the errors), 2 for bad arguments, 1 when
//! the run could not start (the host does not resolve).

use std::io;
use std::net::SocketAddr;
use std::os::fd::AsFd;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Parser;
use nix::sys::time::TimeSpec;
use nix::sys::timerfd::{ClockId, Expiration, TimerFd, TimerFlags, TimerSetTimeFlags};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// At most this many slots (`rate × (warmup + duration)`) per run.
const MAX_SLOTS: f64 = 20_000_000.0;
/// Read buffer per connection; also the longest status line, header block or chunk line.
const BUF: usize = 64 * 1024;

#[derive(Parser, Debug)]
#[command(
    name = "httpload",
    about = "Fixed-rate (open-loop) HTTP/1.1 load generator; latency from the intended send time"
)]
struct Args {
    /// Target: http://HOST[:PORT][/PATH[?QUERY]] (plain HTTP only).
    #[arg(long)]
    url: String,
    /// Requests per second, all connections together.
    #[arg(long, value_parser = positive_f64)]
    rate: f64,
    /// Keep-alive connections, one request in flight on each.
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=10_000))]
    connections: u32,
    /// Measured seconds.
    #[arg(long, value_parser = positive_f64)]
    duration: f64,
    /// Seconds sent at the same rate before measuring.
    #[arg(long, default_value_t = 0.0, value_parser = non_negative_f64)]
    warmup: f64,
    /// An extra request header, `Name: value` (repeatable); `Host` replaces the URL's.
    #[arg(long = "header", value_name = "NAME: VALUE")]
    headers: Vec<String>,
    /// Seconds to wait for a connect or a complete answer before counting a timeout.
    #[arg(long, default_value_t = 2.0, value_parser = positive_f64)]
    timeout: f64,
    /// Print one JSON object instead of text.
    #[arg(long)]
    json: bool,
    /// Wake this many µs before each send and spin (yielding) until its time.
    #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u64).range(0..=10_000))]
    spin_us: u64,
}

fn positive_f64(s: &str) -> Result<f64, String> {
    match s.trim().parse::<f64>() {
        Ok(v) if v.is_finite() && v > 0.0 && v <= 1e9 => Ok(v),
        _ => Err(format!("{s:?} is not a positive number")),
    }
}

fn non_negative_f64(s: &str) -> Result<f64, String> {
    match s.trim().parse::<f64>() {
        Ok(v) if v.is_finite() && (0.0..=1e9).contains(&v) => Ok(v),
        _ => Err(format!("{s:?} is not a number ≥ 0")),
    }
}

/// What the URL names.
#[derive(Debug, PartialEq, Eq)]
struct Target {
    host: String,
    port: u16,
    /// The `Host` header value: the URL's authority.
    authority: String,
    path: String,
}

fn parse_url(url: &str) -> anyhow::Result<Target> {
    let Some(rest) = url.strip_prefix("http://") else {
        if url.starts_with("https://") {
            bail!("{url:?}: https is not supported (plain HTTP/1.1 only)");
        }
        bail!("{url:?}: the URL must start with http://");
    };
    let rest = rest.split('#').next().unwrap_or_default();
    let (authority, path) = match rest.find(['/', '?']) {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    let path = if path.starts_with('?') {
        format!("/{path}")
    } else {
        path.to_string()
    };
    if path.bytes().any(|b| b <= b' ' || b == 0x7f) {
        bail!("{url:?}: the path has spaces or control characters");
    }
    if authority.is_empty() || authority.contains('@') {
        bail!("{url:?}: expected http://HOST[:PORT]/PATH");
    }
    let (host, port) = if let Some(r) = authority.strip_prefix('[') {
        let (h, after) = r
            .split_once(']')
            .with_context(|| format!("{url:?}: unclosed [ in the host"))?;
        match after {
            "" => (h, None),
            p => (
                h,
                Some(
                    p.strip_prefix(':')
                        .with_context(|| format!("{url:?}: bad port"))?,
                ),
            ),
        }
    } else {
        match authority.split_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (authority, None),
        }
    };
    let port = match port {
        None => 80,
        Some(p) => p
            .parse::<u16>()
            .ok()
            .filter(|p| *p != 0)
            .with_context(|| format!("{url:?}: bad port {p:?}"))?,
    };
    if host.is_empty() || host.bytes().any(|b| b <= b' ' || b == 0x7f) {
        bail!("{url:?}: bad host");
    }
    Ok(Target {
        host: host.to_string(),
        port,
        authority: authority.to_string(),
        path,
    })
}

/// The request every slot sends.
fn build_request(target: &Target, headers: &[String]) -> anyhow::Result<Vec<u8>> {
    let mut host = target.authority.clone();
    let mut extra = String::new();
    for h in headers {
        let (name, value) = h
            .split_once(':')
            .with_context(|| format!("header {h:?}: expected `Name: value`"))?;
        let (name, value) = (name.trim(), value.trim());
        let token = |b: u8| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b);
        if name.is_empty() || !name.bytes().all(token) {
            bail!("header {h:?}: bad name");
        }
        if value.bytes().any(|b| (b < b' ' && b != b'\t') || b == 0x7f) {
            bail!("header {h:?}: control characters in the value");
        }
        if name.eq_ignore_ascii_case("content-length")
            || name.eq_ignore_ascii_case("transfer-encoding")
        {
            bail!("header {h:?}: requests have no body; framing headers are not allowed");
        }
        if name.eq_ignore_ascii_case("host") {
            host = value.to_string();
        } else {
            extra.push_str(&format!("{name}: {value}\r\n"));
        }
    }
    Ok(format!(
        "GET {} HTTP/1.1\r\nHost: {host}\r\n{extra}\r\n",
        target.path
    )
    .into_bytes())
}

/// Everything the connections share.
struct Plan {
    addr: SocketAddr,
    request: Vec<u8>,
    rate: f64,
    connections: usize,
    t0: Instant,
    /// Slots `0..total` are sent; `warm..total` are measured.
    warm: u64,
    total: u64,
    /// End of the window: nothing is sent after it.
    end: Instant,
    timeout: Duration,
    spin: Duration,
}

impl Plan {
    fn intended(&self, slot: u64) -> Instant {
        self.t0 + Duration::from_secs_f64(slot as f64 / self.rate)
    }
}

/// What one connection saw (in the measured window, except `completed_all`).
#[derive(Default)]
struct Stats {
    /// Completed over the whole run, warm-up included (for CPU per request).
    completed_all: u64,
    sent: u64,
    completed: u64,
    non2xx: u64,
    io_errors: u64,
    timeouts: u64,
    unsent: u64,
    reconnects: u64,
    latencies: Vec<u32>,
    lags: Vec<u32>,
    first_error: Option<String>,
}

fn micros(d: Duration) -> u32 {
    u32::try_from(d.as_micros()).unwrap_or(u32::MAX)
}

/// A one-shot `timerfd` in tokio's reactor: waits until an instant with µs precision.
///
/// tokio's safe way to put an arbitrary fd in its reactor (`AsyncFd::new`) is deprecated for
/// I/O safety and its replacement is `unsafe`, which the workspace forbids; so the reactor
/// gets a duplicate of the timer's fd through `pipe::Receiver::from_owned_fd_unchecked`,
/// which takes an owned fd and needs only a non-blocking readable one (a timerfd reads as
/// an 8-byte expiry count). The timer is armed through the original.
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

    /// Returns at `at` or just after (at once when it has passed).
    async fn until(&self, at: Instant) -> io::Result<()> {
        // Bounded: every round either returns or waits on a timer armed for the time left;
        // a stale readiness costs one extra round.
        loop {
            let now = Instant::now();
            if now >= at {
                return Ok(());
            }
            // `Instant` is CLOCK_MONOTONIC on Linux; a relative timer is exact to the ~µs
            // between `now` and the syscall. Never zero (that would disarm it).
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

/// One keep-alive connection and its read buffer (`buf[start..end]` is unread).
struct Conn {
    stream: TcpStream,
    buf: Box<[u8]>,
    start: usize,
    end: usize,
}

/// A complete response.
struct Answer {
    status: u16,
    /// The server closes the connection after it.
    close: bool,
}

fn protocol(msg: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.into())
}

fn eof() -> io::Error {
    io::Error::new(
        io::ErrorKind::UnexpectedEof,
        "connection closed before the response was complete",
    )
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

fn header_has_token(value: &str, token: &str) -> bool {
    value
        .split(',')
        .any(|t| t.trim().eq_ignore_ascii_case(token))
}

impl Conn {
    async fn open(addr: SocketAddr) -> io::Result<Conn> {
        let stream = TcpStream::connect(addr).await?;
        stream.set_nodelay(true)?;
        Ok(Conn {
            stream,
            buf: vec![0; BUF].into_boxed_slice(),
            start: 0,
            end: 0,
        })
    }

    /// Reads more bytes; false at end of stream. Fails when the unread part fills the buffer.
    async fn fill(&mut self) -> io::Result<bool> {
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        } else if self.end == self.buf.len() {
            if self.start == 0 {
                return Err(protocol(format!(
                    "a status line, header block or chunk line longer than {BUF} bytes"
                )));
            }
            self.buf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
        let n = self.stream.read(&mut self.buf[self.end..]).await?;
        self.end += n;
        Ok(n > 0)
    }

    /// Sends the request and reads the whole response.
    async fn exchange(&mut self, request: &[u8]) -> io::Result<Answer> {
        if self.start != self.end {
            return Err(protocol("bytes arrived before the request was sent"));
        }
        self.stream.write_all(request).await?;
        loop {
            let (status, close, framing) = self.head().await?;
            // 1xx other than 101 are interim: the real answer follows.
            if (100..200).contains(&status) && status != 101 {
                continue;
            }
            if status == 101 {
                return Err(protocol("101 Switching Protocols to a plain GET"));
            }
            let close = match framing {
                _ if status == 204 || status == 304 => close,
                Framing::Chunked => {
                    self.chunked().await?;
                    close
                }
                Framing::Length(n) => {
                    self.skip(n).await?;
                    close
                }
                Framing::ToClose => {
                    while self.fill().await? {
                        self.start = self.end;
                    }
                    true
                }
            };
            if !close && self.start != self.end {
                return Err(protocol("bytes after the response"));
            }
            return Ok(Answer { status, close });
        }
    }

    /// Status line and headers: (status, connection closes after, body framing).
    async fn head(&mut self) -> io::Result<(u16, bool, Framing)> {
        let mut scanned = self.start;
        let at = loop {
            if let Some(i) = find(&self.buf[scanned..self.end], b"\r\n\r\n") {
                break scanned + i;
            }
            scanned = self.end.saturating_sub(3).max(self.start);
            let before = self.start;
            if !self.fill().await? {
                return Err(eof());
            }
            // `fill` may have moved the unread bytes to the front.
            scanned = scanned - before + self.start;
        };
        let head = std::str::from_utf8(&self.buf[self.start..at])
            .map_err(|_| protocol("response head is not UTF-8"))?;
        let mut lines = head.split("\r\n");
        let status_line = lines.next().unwrap_or_default();
        let (version, rest) = status_line
            .split_once(' ')
            .ok_or_else(|| protocol(format!("bad status line {status_line:?}")))?;
        let http10 = match version {
            "HTTP/1.1" => false,
            "HTTP/1.0" => true,
            _ => return Err(protocol(format!("bad status line {status_line:?}"))),
        };
        let code = rest.get(..3).unwrap_or_default();
        let status = code
            .parse::<u16>()
            .ok()
            .filter(|s| (100..=999).contains(s) && code.bytes().all(|b| b.is_ascii_digit()))
            .ok_or_else(|| protocol(format!("bad status line {status_line:?}")))?;
        let mut close = http10;
        let mut length: Option<u64> = None;
        let mut chunked = false;
        for line in lines {
            let (name, value) = line
                .split_once(':')
                .ok_or_else(|| protocol(format!("bad header line {line:?}")))?;
            let (name, value) = (name.trim(), value.trim());
            if name.eq_ignore_ascii_case("content-length") {
                let n = value
                    .parse::<u64>()
                    .map_err(|_| protocol(format!("bad Content-Length {value:?}")))?;
                if length.is_some_and(|l| l != n) {
                    return Err(protocol("conflicting Content-Length headers"));
                }
                length = Some(n);
            } else if name.eq_ignore_ascii_case("transfer-encoding") {
                chunked = value
                    .rsplit(',')
                    .next()
                    .is_some_and(|t| t.trim().eq_ignore_ascii_case("chunked"));
            } else if name.eq_ignore_ascii_case("connection") {
                if header_has_token(value, "close") {
                    close = true;
                } else if http10 && header_has_token(value, "keep-alive") {
                    close = false;
                }
            }
        }
        self.start = at + 4;
        let framing = match (chunked, length) {
            (true, _) => Framing::Chunked,
            (false, Some(n)) => Framing::Length(n),
            (false, None) => Framing::ToClose,
        };
        Ok((status, close, framing))
    }

    /// Consumes `n` body bytes.
    async fn skip(&mut self, mut n: u64) -> io::Result<()> {
        loop {
            let avail = (self.end - self.start) as u64;
            let take = avail.min(n);
            self.start += take as usize;
            n -= take;
            if n == 0 {
                return Ok(());
            }
            if !self.fill().await? {
                return Err(eof());
            }
        }
    }

    /// The next line (without CRLF) as `buf[range]`, consumed.
    async fn line(&mut self) -> io::Result<std::ops::Range<usize>> {
        let mut scanned = self.start;
        loop {
            if let Some(i) = find(&self.buf[scanned..self.end], b"\r\n") {
                let line = self.start..scanned + i;
                self.start = scanned + i + 2;
                return Ok(line);
            }
            scanned = self.end.saturating_sub(1).max(self.start);
            let before = self.start;
            if !self.fill().await? {
                return Err(eof());
            }
            scanned = scanned - before + self.start;
        }
    }

    /// A chunked body: chunks, the last chunk, trailers, the final CRLF.
    async fn chunked(&mut self) -> io::Result<()> {
        loop {
            let r = self.line().await?;
            let line = &self.buf[r];
            let size = line.split(|b| *b == b';').next().unwrap_or_default();
            let size = std::str::from_utf8(size)
                .ok()
                .map(str::trim)
                .filter(|s| !s.is_empty() && s.len() <= 15)
                .and_then(|s| u64::from_str_radix(s, 16).ok())
                .ok_or_else(|| {
                    protocol(format!(
                        "bad chunk size line {:?}",
                        String::from_utf8_lossy(line)
                    ))
                })?;
            if size == 0 {
                // Trailers, up to the empty line; each costs at least two bytes of the
                // stream, so this ends with the stream.
                loop {
                    let r = self.line().await?;
                    if r.is_empty() {
                        return Ok(());
                    }
                }
            }
            self.skip(size).await?;
            if !self.line().await?.is_empty() {
                return Err(protocol("chunk data not followed by CRLF"));
            }
        }
    }
}

enum Framing {
    Chunked,
    Length(u64),
    ToClose,
}

async fn connect(addr: SocketAddr, timeout: Duration) -> io::Result<Conn> {
    match tokio::time::timeout(timeout, Conn::open(addr)).await {
        Ok(r) => r.map_err(|e| io::Error::new(e.kind(), format!("connect {addr}: {e}"))),
        Err(_) => Err(io::Error::new(
            io::ErrorKind::TimedOut,
            format!("connect {addr}: timed out"),
        )),
    }
}

/// How many of the slots `from, from + step, …` below `total` are `≥ warm`.
fn measured_slots(from: u64, step: u64, warm: u64, total: u64) -> u64 {
    let first = if from >= warm {
        from
    } else {
        from + (warm - from).div_ceil(step) * step
    };
    if first >= total {
        0
    } else {
        (total - 1 - first) / step + 1
    }
}

/// Connection `c`: its slots, in order, until the window ends.
async fn run_connection(plan: Arc<Plan>, c: usize, mut conn: Option<Conn>) -> Stats {
    let step = plan.connections as u64;
    let mut st = Stats::default();
    let expected = measured_slots(c as u64, step, plan.warm, plan.total);
    // Bounded by MAX_SLOTS over all connections.
    st.latencies.reserve(expected as usize);
    st.lags.reserve(expected as usize);
    let pacer = match Pacer::new() {
        Ok(p) => Some(p),
        Err(e) => {
            if c == 0 {
                eprintln!("httpload: no timerfd ({e}); pacing on tokio's 1 ms timer instead");
            }
            None
        }
    };
    let mut opened_before = conn.is_some();
    // When the connection's previous exchange ended: a send can be late because of it
    // (queueing, which the latency counts) or because the generator woke late (lag).
    let mut free_at = plan.t0;
    let mut slot = c as u64;
    while slot < plan.total {
        let intended = plan.intended(slot);
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
            st.unsent += measured_slots(slot, step, plan.warm, plan.total);
            break;
        }
        let measured = slot >= plan.warm;
        if measured {
            st.sent += 1;
            st.lags.push(micros(sent_at - intended.max(free_at)));
        }
        let outcome = tokio::time::timeout_at((sent_at + plan.timeout).into(), async {
            if conn.is_none() {
                conn = Some(connect(plan.addr, plan.timeout).await?);
                if opened_before && measured {
                    st.reconnects += 1;
                }
                opened_before = true;
            }
            match conn.as_mut() {
                Some(k) => k.exchange(&plan.request).await,
                None => Err(io::Error::other("no connection")),
            }
        })
        .await;
        let done = Instant::now();
        free_at = done;
        match outcome {
            Ok(Ok(answer)) => {
                st.completed_all += 1;
                if answer.close {
                    conn = None;
                }
                if measured {
                    st.completed += 1;
                    st.latencies.push(micros(done - intended));
                    if !(200..300).contains(&answer.status) {
                        st.non2xx += 1;
                    }
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
        slot += step;
    }
    st
}

/// Nearest-rank percentile of sorted values; `per_100k` is the percentile × 1000 (99.9 →
/// 99_900), integer so that no rounding moves the rank.
fn percentile(sorted: &[u32], per_100k: usize) -> Option<u32> {
    let n = sorted.len();
    if n == 0 {
        return None;
    }
    let rank = (per_100k * n).div_ceil(100_000);
    Some(sorted[rank.clamp(1, n) - 1])
}

async fn run(args: Args, target: Target, request: Vec<u8>) -> anyhow::Result<serde_json::Value> {
    let addr = tokio::net::lookup_host((target.host.as_str(), target.port))
        .await
        .with_context(|| format!("resolving {}", target.host))?
        .next()
        .with_context(|| format!("{} has no address", target.host))?;
    let timeout = Duration::from_secs_f64(args.timeout);
    let connections = args.connections as usize;

    // Open the connections before the schedule starts, so the first slots do not pay for
    // the handshakes; one that fails is opened again by its first slot (and counted then).
    let mut opening = tokio::task::JoinSet::new();
    for c in 0..connections {
        opening.spawn(async move { (c, connect(addr, timeout).await) });
    }
    let mut conns: Vec<Option<Conn>> = (0..connections).map(|_| None).collect();
    let mut connect_error = None;
    while let Some(joined) = opening.join_next().await {
        match joined {
            Ok((c, Ok(conn))) => conns[c] = Some(conn),
            Ok((_, Err(e))) => {
                connect_error.get_or_insert_with(|| e.to_string());
            }
            Err(e) => bail!("a connect task failed: {e}"),
        }
    }

    let t0 = Instant::now() + Duration::from_millis(5);
    let total = ((args.warmup + args.duration) * args.rate).ceil() as u64;
    let warm = (args.warmup * args.rate).ceil() as u64;
    let plan = Arc::new(Plan {
        addr,
        request,
        rate: args.rate,
        connections,
        t0,
        warm,
        total,
        end: t0 + Duration::from_secs_f64(args.warmup + args.duration),
        timeout,
        spin: Duration::from_micros(args.spin_us),
    });
    let mut tasks = tokio::task::JoinSet::new();
    for (c, conn) in conns.into_iter().enumerate() {
        tasks.spawn(run_connection(Arc::clone(&plan), c, conn));
    }
    let mut all = Stats::default();
    while let Some(joined) = tasks.join_next().await {
        let st = joined.map_err(|e| anyhow::anyhow!("a connection task failed: {e}"))?;
        all.completed_all += st.completed_all;
        all.sent += st.sent;
        all.completed += st.completed;
        all.non2xx += st.non2xx;
        all.io_errors += st.io_errors;
        all.timeouts += st.timeouts;
        all.unsent += st.unsent;
        all.reconnects += st.reconnects;
        all.latencies.extend_from_slice(&st.latencies);
        all.lags.extend_from_slice(&st.lags);
        if all.first_error.is_none() {
            all.first_error = st.first_error;
        }
    }
    if all.first_error.is_none() && all.io_errors + all.timeouts > 0 {
        all.first_error = connect_error;
    }
    all.latencies.sort_unstable();
    all.lags.sort_unstable();
    let lat = |p| percentile(&all.latencies, p);
    let lag = |p| percentile(&all.lags, p);
    Ok(serde_json::json!({
        "url": args.url,
        "rate_target": args.rate,
        "connections": connections,
        "duration_s": args.duration,
        "warmup_s": args.warmup,
        "rate": all.completed as f64 / args.duration,
        "requests": all.completed,
        "requests_all": all.completed_all,
        "sent": all.sent,
        "unsent": all.unsent,
        "errors": all.non2xx + all.io_errors + all.timeouts,
        "non2xx": all.non2xx,
        "io_errors": all.io_errors,
        "timeouts": all.timeouts,
        "reconnects": all.reconnects,
        "p50_us": lat(50_000),
        "p90_us": lat(90_000),
        "p99_us": lat(99_000),
        "p999_us": lat(99_900),
        "max_us": all.latencies.last(),
        "lag_p50_us": lag(50_000),
        "lag_p99_us": lag(99_000),
        "lag_max_us": all.lags.last(),
        "first_error": all.first_error,
    }))
}

fn text(r: &serde_json::Value) -> String {
    let n = |k: &str| match &r[k] {
        serde_json::Value::Null => "-".to_string(),
        v => v.to_string(),
    };
    let mut out = format!(
        "{} at {} req/s over {} connections, {} s measured after {} s warmup\n",
        r["url"].as_str().unwrap_or_default(),
        n("rate_target"),
        n("connections"),
        n("duration_s"),
        n("warmup_s"),
    );
    out += &format!(
        "  requests: {} sent, {} completed, {} unsent; rate {:.1} req/s\n",
        n("sent"),
        n("requests"),
        n("unsent"),
        r["rate"].as_f64().unwrap_or_default(),
    );
    out += &format!(
        "  errors: {} (non-2xx {}, I/O {}, timeouts {}); reconnects {}\n",
        n("errors"),
        n("non2xx"),
        n("io_errors"),
        n("timeouts"),
        n("reconnects"),
    );
    out += &format!(
        "  latency from intended send (µs): p50 {}  p90 {}  p99 {}  p99.9 {}  max {}\n",
        n("p50_us"),
        n("p90_us"),
        n("p99_us"),
        n("p999_us"),
        n("max_us"),
    );
    out += &format!(
        "  pacing lag of the generator (µs): p50 {}  p99 {}  max {}\n",
        n("lag_p50_us"),
        n("lag_p99_us"),
        n("lag_max_us"),
    );
    if let Some(e) = r["first_error"].as_str() {
        out += &format!("  first error: {e}\n");
    }
    out
}

fn main() -> ExitCode {
    let args = match Args::try_parse() {
        Ok(a) => a,
        Err(e) => e.exit(), // usage errors exit 2, --help 0
    };
    let prepared = parse_url(&args.url).and_then(|t| {
        let slots = args.rate * (args.warmup + args.duration);
        if slots > MAX_SLOTS {
            bail!("--rate × (--warmup + --duration) = {slots:.0} requests; at most {MAX_SLOTS:.0}");
        }
        let request = build_request(&t, &args.headers)?;
        Ok((t, request))
    });
    let (target, request) = match prepared {
        Ok(p) => p,
        Err(e) => {
            eprintln!("httpload: {e:#}");
            return ExitCode::from(2);
        }
    };
    let json = args.json;
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("httpload: starting the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(args, target, request)) {
        Ok(report) => {
            if json {
                println!("{report}");
            } else {
                print!("{}", text(&report));
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("httpload: {e:#}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        let t = parse_url("http://127.0.0.1:8080/a/b?c=d#frag").unwrap();
        assert_eq!(
            t,
            Target {
                host: "127.0.0.1".into(),
                port: 8080,
                authority: "127.0.0.1:8080".into(),
                path: "/a/b?c=d".into(),
            }
        );
        let t = parse_url("http://[::1]:81").unwrap();
        assert_eq!((t.host.as_str(), t.port, t.path.as_str()), ("::1", 81, "/"));
        let t = parse_url("http://example.test?x=1").unwrap();
        assert_eq!((t.port, t.path.as_str()), (80, "/?x=1"));
        for bad in [
            "https://a/",
            "ftp://a/",
            "http://",
            "http://a:0/",
            "http://a:x/",
            "http://a:70000/",
            "http://[::1/",
            "http://u@a/",
            "http://a/b c",
        ] {
            assert!(parse_url(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn requests() {
        let t = parse_url("http://127.0.0.1:1/p").unwrap();
        let r = build_request(&t, &["Host: bench.test".into(), "X-A:  b ".into()]).unwrap();
        assert_eq!(
            String::from_utf8(r).unwrap(),
            "GET /p HTTP/1.1\r\nHost: bench.test\r\nX-A: b\r\n\r\n"
        );
        for bad in ["nocolon", ": v", "A B: v", "X: a\rb", "Content-Length: 3"] {
            assert!(build_request(&t, &[bad.into()]).is_err(), "{bad}");
        }
    }

    #[test]
    fn slots_and_percentiles() {
        // Slots 0..10 over 3 connections, 4 warm-up slots: connection 1 owns 1, 4, 7.
        assert_eq!(measured_slots(1, 3, 4, 10), 2);
        assert_eq!(measured_slots(0, 3, 4, 10), 2); // 6, 9
        assert_eq!(measured_slots(2, 3, 4, 10), 2); // 5, 8
        assert_eq!(measured_slots(9, 3, 4, 10), 1);
        assert_eq!(measured_slots(12, 3, 4, 10), 0);
        let v: Vec<u32> = (1..=1000).collect();
        assert_eq!(percentile(&v, 50_000), Some(500));
        assert_eq!(percentile(&v, 99_000), Some(990));
        assert_eq!(percentile(&v, 99_900), Some(999));
        assert_eq!(percentile(&v, 100_000), Some(1000));
        assert_eq!(percentile(&[], 50_000), None);
        assert_eq!(percentile(&[7], 0), Some(7));
        assert_eq!(percentile(&[1, 2, 3], 50_000), Some(2));
    }
}
