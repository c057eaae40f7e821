//! The client's HTTP/2 streams on the lean path, one task each: [`StreamExec`] is the
//! executor hyper's HTTP/2 server spawns every stream on. It counts the streams open on its
//! connection (the idle watch closes a connection that has had none for a long time, however
//! many PINGs keep it busy) and resets a stream whose answer is stalled on the client's
//! flow-control window for `send_timeout`, so that a client that opens streams and never
//! reads them (a zero window) cannot hold the instances' connections and the gateway's
//! buffers. The socket-level send timeout cannot see this: the connection itself keeps
//! moving.
//!
//! How a stall is seen: the answer's body (the lean path's `Tail`) marks its stream's
//! [`Stall`] as waiting on the client each time it hands hyper a frame, and as moving each
//! time hyper asks for the next one. hyper asks only once the client's window has room, so
//! a mark left in place for `send_timeout` is a stream stalled on the client; a stream
//! waiting on its instance is not marked. The stream's task ends then, and h2 resets the
//! stream (`RST_STREAM`, `CANCEL`). The body finds its stream's mark through a task-local
//! that the executor sets around the stream's task.

use std::future::{poll_fn, Future};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::task::Poll;
use std::time::Duration;

use tokio::time::Instant;

tokio::task_local! {
    static STREAM: Arc<Stall>;
}

/// The origin of the nanosecond stamps in [`Stall`].
fn epoch() -> Instant {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

/// Whether one stream's answer waits on the client, and since when.
#[derive(Debug, Default)]
pub struct Stall {
    /// Nanoseconds since [`epoch`] plus one when the wait began; 0: not waiting on the client.
    since: AtomicU64,
}

impl Stall {
    /// The stream that runs the caller's code, when it is one of [`StreamExec`]'s.
    pub fn current() -> Option<Arc<Stall>> {
        STREAM.try_with(Arc::clone).ok()
    }

    /// A frame (or the head) was handed to hyper: the stream waits on the client until
    /// hyper asks for the next one.
    pub fn waiting(&self) {
        let now = Instant::now().saturating_duration_since(epoch()).as_nanos() as u64;
        self.since.store(now + 1, Ordering::Relaxed);
    }

    /// hyper asked for the next frame: the client's window has room.
    pub fn moving(&self) {
        self.since.store(0, Ordering::Relaxed);
    }

    fn since(&self) -> Option<Instant> {
        match self.since.load(Ordering::Relaxed) {
            0 => None,
            n => Some(epoch() + Duration::from_nanos(n - 1)),
        }
    }
}

/// When a stream that has waited on the client since `since` is to be reset.
fn reset_at(since: Option<Instant>, limit: Duration) -> Option<Instant> {
    since.map(|t| t + limit)
}

/// hyper's executor for one client connection's HTTP/2 streams (see the module docs).
#[derive(Clone)]
pub struct StreamExec {
    /// How long a stream may wait on the client's window.
    send_timeout: Duration,
    /// Streams open on the connection now.
    open: Arc<AtomicUsize>,
}

impl StreamExec {
    /// `open` counts the connection's streams.
    pub fn new(send_timeout: Duration, open: Arc<AtomicUsize>) -> StreamExec {
        StreamExec { send_timeout, open }
    }
}

/// One open stream, for as long as its task lives.
struct Open(Arc<AtomicUsize>);

impl Drop for Open {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl<F> hyper::rt::Executor<F> for StreamExec
where
    F: Future<Output = ()> + Send + 'static,
{
    fn execute(&self, stream: F) {
        self.open.fetch_add(1, Ordering::Relaxed);
        let open = Open(self.open.clone());
        let limit = self.send_timeout;
        tokio::spawn(async move {
            let _open = open;
            watched(stream, limit).await
        });
    }
}

/// Runs one stream's task until it ends or stalls on the client for `limit`.
async fn watched<F: Future<Output = ()>>(stream: F, limit: Duration) {
    let stall = Arc::new(Stall::default());
    let stream = STREAM.scope(stall.clone(), stream);
    let mut stream = std::pin::pin!(stream);
    // Armed only while the stream waits on the client.
    let mut timer: Option<(Instant, std::pin::Pin<Box<tokio::time::Sleep>>)> = None;
    poll_fn(|cx| {
        if stream.as_mut().poll(cx).is_ready() {
            return Poll::Ready(());
        }
        let Some(at) = reset_at(stall.since(), limit) else {
            timer = None;
            return Poll::Pending;
        };
        if Instant::now() >= at {
            tracing::debug!("HTTP/2 stream stalled on the client's window: reset");
            return Poll::Ready(());
        }
        match &mut timer {
            Some((armed, sleep)) if *armed == at => {
                if sleep.as_mut().poll(cx).is_ready() {
                    return Poll::Ready(());
                }
            }
            _ => {
                let mut sleep = Box::pin(tokio::time::sleep_until(at));
                if sleep.as_mut().poll(cx).is_ready() {
                    return Poll::Ready(());
                }
                timer = Some((at, sleep));
            }
        }
        Poll::Pending
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stream_is_reset_only_while_it_waits_on_the_client() {
        let t = Instant::now();
        let limit = Duration::from_secs(1);
        assert_eq!(reset_at(None, limit), None);
        assert_eq!(reset_at(Some(t), limit), Some(t + limit));
    }

    #[test]
    fn the_mark_reads_back() {
        let s = Stall::default();
        assert_eq!(s.since(), None);
        let before = Instant::now();
        s.waiting();
        let since = s.since().unwrap();
        assert!(since + Duration::from_millis(1) >= before && since <= Instant::now());
        s.moving();
        assert_eq!(s.since(), None);
    }

    /// A stream that waits on the client for the limit ends; one that waits on anything
    /// else (unmarked) does not; the open count follows the tasks.
    #[tokio::test]
    async fn the_executor_ends_stalled_streams_and_counts_open_ones() {
        use hyper::rt::Executor;
        let open = Arc::new(AtomicUsize::new(0));
        let exec = StreamExec::new(Duration::from_millis(50), open.clone());
        let (stalled_tx, stalled_rx) = tokio::sync::oneshot::channel::<()>();
        exec.execute(async move {
            Stall::current().unwrap().waiting();
            let _tx = stalled_tx;
            std::future::pending::<()>().await
        });
        let (waiting_tx, mut waiting_rx) = tokio::sync::oneshot::channel::<()>();
        exec.execute(async move {
            Stall::current().unwrap().moving();
            let _tx = waiting_tx;
            std::future::pending::<()>().await
        });
        // The stalled stream's task is dropped (its sender with it) after the limit.
        let ended = tokio::time::timeout(Duration::from_secs(5), stalled_rx).await;
        assert!(matches!(ended, Ok(Err(_))), "{ended:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(waiting_rx
            .try_recv()
            .is_err_and(|e| e == tokio::sync::oneshot::error::TryRecvError::Empty));
        assert_eq!(open.load(Ordering::Relaxed), 1);
    }
}
