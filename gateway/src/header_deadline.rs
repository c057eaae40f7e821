//! A total deadline for reading request headers, so a client that trickles its headers
//! byte by byte (slowloris) is cut off. Pingora times out each read (60 s) but has no total,
//! so this wraps every accepted connection, after TLS, before pingora's HTTP code reads it.
//!
//! The wrapper watches the bytes the HTTP layer reads for the end of the request head (an
//! empty line). Until it is seen, reading past the deadline fails with `TimedOut`, whether
//! bytes keep trickling in or none arrive. Once seen, the connection reads freely (bodies,
//! upgraded streams, HTTP/2 frames: the h2 preface holds an empty line). When pingora hands
//! the connection back for the next keep-alive request, the deadline is armed again and runs
//! from that request's first byte.

use std::fmt;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use async_trait::async_trait;
use pingora::apps::ServerApp;
use pingora::protocols::raw_connect::ProxyDigest;
use pingora::protocols::tls::{SslDigest, TlsRef};
use pingora::protocols::{GetProxyDigest, GetSocketDigest, GetTimingDigest};
use pingora::protocols::{Peek, Shutdown, Ssl, Stream, UniqueID, UniqueIDType, ALPN};
use pingora::protocols::{SocketDigest, TimingDigest};
use pingora::server::ShutdownWatch;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Sleep;

/// Where the scan for the end of the head is: how much of `\r\n\r\n` (or `\n\n`) was seen.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Scan {
    /// Reading the head; the number is how many bytes of the terminator matched so far.
    Head(u8),
    /// The head is complete: no deadline.
    Done,
}

/// Feeds bytes to the scan; returns the new state.
fn scan(mut state: Scan, bytes: &[u8]) -> Scan {
    for b in bytes {
        let Scan::Head(n) = state else {
            return Scan::Done;
        };
        state = match (n, *b) {
            (0 | 2, b'\r') => Scan::Head(n + 1),
            // A bare LF line ending counts as CRLF: "\n\n" ends the head too.
            (0 | 1, b'\n') => Scan::Head(2),
            (2 | 3, b'\n') => return Scan::Done,
            (_, b'\r') => Scan::Head(1),
            _ => Scan::Head(0),
        };
    }
    state
}

/// A connection whose request head must arrive within a deadline.
pub struct HeaderDeadline {
    inner: Stream,
    limit: Duration,
    state: Scan,
    /// Armed at the request's first byte (or at accept for the first request).
    timer: Option<Pin<Box<Sleep>>>,
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
            state: Scan::Head(0),
            timer: Some(Box::pin(tokio::time::sleep(limit))),
        }
    }

    /// For the next request on a kept-alive connection: the clock starts at its first byte.
    fn rearm(&mut self) {
        self.state = Scan::Head(0);
        self.timer = None;
    }
}

impl AsyncRead for HeaderDeadline {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if this.state == Scan::Done {
            return Pin::new(&mut this.inner).poll_read(cx, buf);
        }
        if let Some(timer) = this.timer.as_mut() {
            if timer.as_mut().poll(cx).is_ready() {
                return Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("request headers not complete within {:?}", this.limit),
                )));
            }
        }
        let before = buf.filled().len();
        let res = Pin::new(&mut this.inner).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = &res {
            let read = &buf.filled()[before..];
            if !read.is_empty() {
                if this.timer.is_none() {
                    let mut t = Box::pin(tokio::time::sleep(this.limit));
                    // Register the new timer with this task so a stall still wakes us.
                    let _ = t.as_mut().poll(cx);
                    this.timer = Some(t);
                }
                this.state = scan(this.state, read);
                if this.state == Scan::Done {
                    this.timer = None;
                }
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
        Pin::new(&mut self.inner).poll_write(cx, buf)
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
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
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

/// A pingora server app that puts every connection under a header deadline, then hands it
/// to the wrapped app (the proxy). It also counts the connections being served, so that a
/// graceful shutdown can end as soon as none is left.
pub struct Guarded<A> {
    inner: Arc<A>,
    limit: Duration,
    connections: Arc<AtomicU64>,
}

impl<A> Guarded<A> {
    pub fn new(inner: A, limit: Duration) -> Guarded<A> {
        Guarded {
            inner: Arc::new(inner),
            limit,
            connections: Arc::new(AtomicU64::new(0)),
        }
    }

    pub fn inner(&self) -> &A {
        &self.inner
    }

    /// The number of connections inside the app now (idle kept-alive ones included).
    pub fn connections(&self) -> Arc<AtomicU64> {
        self.connections.clone()
    }
}

/// Counts one connection for as long as it lives (however its future ends).
struct Counted(Arc<AtomicU64>);

impl Counted {
    fn new(count: &Arc<AtomicU64>) -> Counted {
        count.fetch_add(1, Ordering::AcqRel);
        Counted(count.clone())
    }
}

impl Drop for Counted {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

#[async_trait]
impl<A: ServerApp + Send + Sync + 'static> ServerApp for Guarded<A> {
    async fn process_new(
        self: &Arc<Self>,
        stream: Stream,
        shutdown: &ShutdownWatch,
    ) -> Option<Stream> {
        let _counted = Counted::new(&self.connections);
        let wrapped: Stream = if stream.as_any().is::<HeaderDeadline>() {
            match stream.into_any().downcast::<HeaderDeadline>() {
                Ok(mut reused) => {
                    reused.rearm();
                    reused
                }
                Err(_) => return None,
            }
        } else {
            Box::new(HeaderDeadline::new(stream, self.limit))
        };
        self.inner.process_new(wrapped, shutdown).await
    }

    async fn cleanup(&self) {
        self.inner.cleanup().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_scan_finds_the_end_of_the_head() {
        assert_eq!(
            scan(Scan::Head(0), b"GET / HTTP/1.1\r\nHost: a\r\n\r\n"),
            Scan::Done
        );
        assert_eq!(
            scan(Scan::Head(0), b"GET / HTTP/1.1\r\nHost: a\r\n"),
            Scan::Head(2)
        );
        // Split across reads.
        let s = scan(Scan::Head(0), b"GET / HTTP/1.1\r\nHost: a\r");
        let s = scan(s, b"\n\r");
        assert_eq!(scan(s, b"\n"), Scan::Done);
        assert_eq!(scan(Scan::Head(0), b"GET / HTTP/1.0\n\n"), Scan::Done);
        assert_eq!(
            scan(Scan::Head(0), b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"),
            Scan::Done
        );
        assert_eq!(scan(Scan::Head(0), b"a\r\rb\r\n"), Scan::Head(2));
    }
}
