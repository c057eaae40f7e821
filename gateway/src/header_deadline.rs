//! A total deadline for reading request headers, so a client that trickles its headers
//! byte by byte (slowloris) is cut off. Pingora times out each read (60 s) but has no total,
//! so this wraps every accepted connection, after TLS, before pingora's HTTP code reads it.
//!
//! The wrapper watches the bytes the HTTP layer reads for the end of the request head (an
//! empty line after the request line; empty lines before it, which RFC 9112 lets a server
//! skip, do not end it). Until it is seen, reading past the deadline fails with `TimedOut`,
//! whether bytes keep trickling in or none arrive. Once seen, the connection reads freely
//! (bodies, upgraded streams, HTTP/2 frames: the h2 preface holds an empty line). At the end
//! of each request the proxy calls [`HeaderDeadline::next_request`]: the deadline is armed
//! again and runs from the next request's first byte.
//!
//! The wrapper also counts the bytes that cross an HTTP/2 connection (when told to, by
//! [`HeaderDeadline::count_activity`]), so that an idle one can be closed; and, when told to
//! by [`HeaderDeadline::watch_idle`] (the lean path's HTTP/1.1), ends a connection whose next
//! request head is not complete within its idle timeout of the previous request's end (or of
//! the watch's start): the read then ends as if the client had closed when no byte of the
//! head came, and fails with `TimedOut` when some did. That watch keeps one timer for the connection's whole life rather than
//! one per request: each wait only notes when it began, and the timer, when it fires early
//! for the wait under way, is moved to that wait's end.

use std::fmt;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use async_trait::async_trait;
use pingora::protocols::raw_connect::ProxyDigest;
use pingora::protocols::tls::{SslDigest, TlsRef};
use pingora::protocols::{GetProxyDigest, GetSocketDigest, GetTimingDigest};
use pingora::protocols::{Peek, Shutdown, Ssl, Stream, UniqueID, UniqueIDType, ALPN};
use pingora::protocols::{SocketDigest, TimingDigest};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};

/// Where the scan for the end of the head is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Scan {
    /// Nothing but empty lines (CR, LF) so far: the request line has not begun.
    Lead,
    /// In the head; the number is how many bytes of the terminator (`\r\n\r\n`, or `\n\n`)
    /// matched so far.
    Head(u8),
    /// The head is complete: no deadline.
    Done,
}

/// Feeds bytes to the scan; returns the new state. Only CR and LF move the terminator
/// match, so the scan jumps from one to the next (memchr) instead of stepping through the
/// bytes of each header line.
fn scan(mut state: Scan, bytes: &[u8]) -> Scan {
    let mut i = 0;
    loop {
        match state {
            Scan::Done => return Scan::Done,
            Scan::Lead => {
                while i < bytes.len() && matches!(bytes[i], b'\r' | b'\n') {
                    i += 1;
                }
                let Some(&b) = bytes.get(i) else {
                    return Scan::Lead;
                };
                state = scan_head(0, b);
                i += 1;
            }
            Scan::Head(n) => {
                let rest = &bytes[i..];
                let Some(k) = memchr::memchr2(b'\r', b'\n', rest) else {
                    return if rest.is_empty() {
                        state
                    } else {
                        Scan::Head(0)
                    };
                };
                // Any other byte before the CR or LF breaks a partial match.
                let n = if k > 0 { 0 } else { n };
                state = scan_head(n, rest[k]);
                i += k + 1;
            }
        }
    }
}

/// One byte of the head after the request line began.
fn scan_head(n: u8, b: u8) -> Scan {
    match (n, b) {
        (0 | 2, b'\r') => Scan::Head(n + 1),
        // A bare LF line ending counts as CRLF: "\n\n" ends the head too.
        (0 | 1, b'\n') => Scan::Head(2),
        (2 | 3, b'\n') => Scan::Done,
        (_, b'\r') => Scan::Head(1),
        _ => Scan::Head(0),
    }
}

/// A connection whose request head must arrive within a deadline.
pub struct HeaderDeadline {
    inner: Stream,
    limit: Duration,
    state: Scan,
    /// Armed at the request's first byte (or at accept for the first request).
    timer: Option<Pin<Box<Sleep>>>,
    /// Set by the proxy when a request ends: the next read starts a new head.
    next: Arc<AtomicBool>,
    /// Bytes read and written, when counted (HTTP/2 idle detection).
    activity: Option<Arc<AtomicU64>>,
    /// The wait for the next request on a kept-alive connection, when watched.
    idle: Option<Idle>,
}

/// The keep-alive idle watch.
struct Idle {
    limit: Duration,
    /// When the wait for the next request head began; `None` once the head is complete.
    since: Option<Instant>,
    /// Made at the first wait and kept; it may fire before the wait under way has lasted
    /// the limit (it was set for an earlier one), and is then moved to this one's end.
    timer: Option<Pin<Box<Sleep>>>,
}

impl Idle {
    /// After a read found nothing while waiting for the next request head: whether the wait
    /// has lasted the limit. Until it has, the timer is armed to wake the reader at its end.
    fn expired(&mut self, cx: &mut Context<'_>) -> bool {
        let Some(since) = self.since else {
            return false;
        };
        let end = since + self.limit;
        let timer = self
            .timer
            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(end)));
        loop {
            if timer.as_mut().poll(cx).is_pending() {
                return false;
            }
            if timer.deadline() >= end {
                return true;
            }
            timer.as_mut().reset(end);
        }
    }
}

impl fmt::Debug for HeaderDeadline {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HeaderDeadline")
            .field("inner", &self.inner)
            .field("limit", &self.limit)
            .field("state", &self.state)
            .finish()
    }
}

impl HeaderDeadline {
    /// Wraps a freshly accepted connection: the clock starts now.
    pub fn new(inner: Stream, limit: Duration) -> HeaderDeadline {
        HeaderDeadline {
            inner,
            limit,
            state: Scan::Lead,
            timer: Some(Box::pin(tokio::time::sleep(limit))),
            next: Arc::new(AtomicBool::new(false)),
            activity: None,
            idle: None,
        }
    }

    /// Ends the connection once a request head is not complete within `limit` of the
    /// previous request's end (the first head: of now). For HTTP/1.1 only, where
    /// [`HeaderDeadline::next_request`] marks each request's end.
    pub fn watch_idle(&mut self, limit: Duration) {
        self.idle = Some(Idle {
            limit,
            since: Some(Instant::now()),
            timer: None,
        });
    }

    /// Counts every byte read or written into `activity` from now on.
    pub fn count_activity(&mut self, activity: Arc<AtomicU64>) {
        self.activity = Some(activity);
    }

    /// Called by the proxy when a request on this connection ends: the next request's head
    /// is under the deadline again, its clock starting at its first byte.
    pub fn next_request(&self) {
        self.next.store(true, Ordering::Relaxed);
    }

    /// A handle that does what [`HeaderDeadline::next_request`] does, for a data path that
    /// hands the stream itself away (hyper).
    pub fn next_request_handle(&self) -> Arc<AtomicBool> {
        self.next.clone()
    }

    /// The wrapper under a pingora stream, if the stream is one.
    pub fn of(stream: &Stream) -> Option<&HeaderDeadline> {
        (**stream).as_any().downcast_ref::<HeaderDeadline>()
    }

    fn rearm(&mut self) {
        self.state = Scan::Lead;
        self.timer = None;
    }

    fn count(&self, n: usize) {
        if let Some(a) = &self.activity {
            a.fetch_add(n as u64, Ordering::Relaxed);
        }
    }
}

impl AsyncRead for HeaderDeadline {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if this.next.load(Ordering::Relaxed) {
            this.next.store(false, Ordering::Relaxed);
            this.rearm();
            if let Some(idle) = &mut this.idle {
                idle.since = Some(Instant::now());
            }
        }
        let before = buf.filled().len();
        if this.state == Scan::Done {
            let res = Pin::new(&mut this.inner).poll_read(cx, buf);
            if this.activity.is_some() {
                this.count(buf.filled().len() - before);
            }
            return res;
        }
        if let Some(timer) = this.timer.as_mut() {
            if timer.as_mut().poll(cx).is_ready() {
                return Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("request headers not complete within {:?}", this.limit),
                )));
            }
        }
        let res = Pin::new(&mut this.inner).poll_read(cx, buf);
        if res.is_pending() {
            let expired = this.idle.as_mut().and_then(|idle| {
                let limit = idle.limit;
                idle.expired(cx).then_some(limit)
            });
            let Some(limit) = expired else {
                return res;
            };
            tracing::debug!(?limit, "no request head within the idle timeout");
            return Poll::Ready(if this.state == Scan::Lead {
                // Nothing of a head came: the end of the stream, as when a client closes.
                Ok(())
            } else {
                Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("request head not complete within {limit:?}"),
                ))
            });
        }
        if let Poll::Ready(Ok(())) = &res {
            let read = &buf.filled()[before..];
            if !read.is_empty() {
                this.state = scan(this.state, read);
                if this.state == Scan::Done {
                    this.timer = None;
                    if let Some(idle) = &mut this.idle {
                        idle.since = None;
                    }
                } else if this.timer.is_none() {
                    // A kept-alive connection's next head began and is not complete in this
                    // read: its clock starts now. (Most heads come whole in one read, and
                    // then no timer is made at all.)
                    let mut t = Box::pin(tokio::time::sleep(this.limit));
                    // Register the new timer with this task so a stall still wakes us.
                    let _ = t.as_mut().poll(cx);
                    this.timer = Some(t);
                }
                this.count(read.len());
            }
        }
        res
    }
}

impl AsyncWrite for HeaderDeadline {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let res = Pin::new(&mut self.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = &res {
            self.count(*n);
        }
        res
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let res = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        if let Poll::Ready(Ok(n)) = &res {
            self.count(*n);
        }
        res
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

#[async_trait]
impl Shutdown for HeaderDeadline {
    async fn shutdown(&mut self) {
        self.inner.shutdown().await
    }
}

impl UniqueID for HeaderDeadline {
    fn id(&self) -> UniqueIDType {
        self.inner.id()
    }
}

impl Ssl for HeaderDeadline {
    fn get_ssl(&self) -> Option<&TlsRef> {
        self.inner.get_ssl()
    }

    fn get_ssl_digest(&self) -> Option<Arc<SslDigest>> {
        self.inner.get_ssl_digest()
    }

    fn selected_alpn_proto(&self) -> Option<ALPN> {
        self.inner.selected_alpn_proto()
    }
}

impl GetTimingDigest for HeaderDeadline {
    fn get_timing_digest(&self) -> Vec<Option<TimingDigest>> {
        self.inner.get_timing_digest()
    }

    fn get_read_pending_time(&self) -> Duration {
        self.inner.get_read_pending_time()
    }

    fn get_write_pending_time(&self) -> Duration {
        self.inner.get_write_pending_time()
    }
}

impl GetProxyDigest for HeaderDeadline {
    fn get_proxy_digest(&self) -> Option<Arc<ProxyDigest>> {
        self.inner.get_proxy_digest()
    }

    fn set_proxy_digest(&mut self, digest: ProxyDigest) {
        self.inner.set_proxy_digest(digest)
    }
}

impl GetSocketDigest for HeaderDeadline {
    fn get_socket_digest(&self) -> Option<Arc<SocketDigest>> {
        self.inner.get_socket_digest()
    }

    fn set_socket_digest(&mut self, digest: SocketDigest) {
        self.inner.set_socket_digest(digest)
    }
}

#[async_trait]
impl Peek for HeaderDeadline {
    async fn try_peek(&mut self, buf: &mut [u8]) -> io::Result<bool> {
        match self.timer.as_mut() {
            // Peeking (the h2c preface check) waits for bytes: bound it by the deadline too.
            Some(timer) => tokio::select! {
                r = self.inner.try_peek(buf) => r,
                _ = timer.as_mut() => Err(io::Error::new(io::ErrorKind::TimedOut, "no request within the header deadline")),
            },
            None => self.inner.try_peek(buf).await,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feeds `parts` in turn (as separate reads) from the start of a head.
    fn scanned(parts: &[&[u8]]) -> Scan {
        parts.iter().fold(Scan::Lead, |s, p| scan(s, p))
    }

    #[test]
    fn the_scan_finds_the_end_of_the_head() {
        let done = Scan::Done;
        let cases: &[(&[&[u8]], Scan)] = &[
            (&[b"GET / HTTP/1.1\r\nHost: a\r\n\r\n"], done),
            (&[b"GET / HTTP/1.1\r\nHost: a\r\n"], Scan::Head(2)),
            // Split across reads.
            (&[b"GET / HTTP/1.1\r\nHost: a\r", b"\n\r", b"\n"], done),
            (&[b"GET / HTTP/1.0\n\n"], done),
            (&[b"GET / HTTP/1.1\r\nHost: a\n\r\n"], done),
            (&[b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"], done),
            (&[b"a\r\rb\r\n"], Scan::Head(2)),
            // Empty lines before the request line are not the end of the head.
            (&[b"\r\n\r\n"], Scan::Lead),
            (&[b"\n\n\n"], Scan::Lead),
            (&[b"\r\n\r\n", b"\r\n"], Scan::Lead),
            (&[b"\r\n\r\nGET / HTTP/1.1\r\n"], Scan::Head(2)),
            (&[b"\r\n\r\nGET / HTTP/1.1\r\nHost: a\r\n"], Scan::Head(2)),
            (&[b"\r\n", b"\r\nG", b"ET / HTTP/1.1\r\n\r\n"], done),
            (&[b"\n\nGET / HTTP/1.1\n\n"], done),
            // The request line's first byte starts the head; its own CRLF is not an end.
            (&[b"\r\nG\r\n"], Scan::Head(2)),
            (&[b"", b""], Scan::Lead),
        ];
        for (parts, want) in cases {
            assert_eq!(scanned(parts), *want, "{parts:?}");
        }
        // Once done, nothing changes it.
        assert_eq!(scan(Scan::Done, b"\r\n\r\nxyz"), Scan::Done);
    }

    /// The byte-at-a-time definition that the memchr scan must agree with.
    fn reference(mut state: Scan, bytes: &[u8]) -> Scan {
        for b in bytes {
            state = match (state, *b) {
                (Scan::Done, _) => return Scan::Done,
                (Scan::Lead, b'\r' | b'\n') => Scan::Lead,
                (Scan::Lead, b) => scan_head(0, b),
                (Scan::Head(n), b) => scan_head(n, b),
            };
        }
        state
    }

    #[test]
    fn the_fast_scan_agrees_with_the_byte_at_a_time_one() {
        let mut rng = fastrand::Rng::with_seed(11);
        let alphabet = b"\r\nGa: ";
        for _ in 0..20_000 {
            let len = rng.usize(0..24);
            let bytes: Vec<u8> = (0..len)
                .map(|_| alphabet[rng.usize(..alphabet.len())])
                .collect();
            let cut = rng.usize(0..=len);
            let start = [
                Scan::Lead,
                Scan::Head(0),
                Scan::Head(1),
                Scan::Head(2),
                Scan::Head(3),
            ][rng.usize(..5)];
            let want = reference(reference(start, &bytes[..cut]), &bytes[cut..]);
            let got = scan(scan(start, &bytes[..cut]), &bytes[cut..]);
            assert_eq!(
                got,
                want,
                "{start:?} {:?} cut at {cut}",
                String::from_utf8_lossy(&bytes)
            );
        }
    }
}
