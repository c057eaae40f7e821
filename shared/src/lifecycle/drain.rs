//! Graceful drain.
//!
//! [`channel`] makes a [`Trigger`] and a first [`Watch`]. Whoever serves connections clones
//! the watch into each connection and each long response; a clone held is a promise to end
//! soon after [`Watch::signaled`] resolves. [`Trigger::drain`] signals every watch, then waits
//! until all of them are dropped or its deadline passes, and says which happened. The idea
//! is istio/ztunnel's drain (a signal plus a count of holders), written for Waymark.

use std::time::Duration;

use tokio::sync::{mpsc, watch};

/// Starts a drain and waits for it to finish.
#[derive(Debug)]
pub struct Trigger {
    signal: watch::Sender<bool>,
    released: mpsc::Receiver<()>,
}

/// Held by whatever must end before a drain is complete.
#[derive(Debug, Clone)]
pub struct Watch {
    signal: watch::Receiver<bool>,
    // Never sends: the channel closes when the last holder is gone.
    _hold: mpsc::Sender<()>,
}

/// How a drain ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Drained {
    /// Every holder let go.
    Complete,
    /// The deadline passed first; this many holders were left.
    TimedOut { left: usize },
}

/// A new drain: nothing is signalled until [`Trigger::drain`].
pub fn channel() -> (Trigger, Watch) {
    let (signal, signal_rx) = watch::channel(false);
    let (hold, released) = mpsc::channel(1);
    (
        Trigger { signal, released },
        Watch {
            signal: signal_rx,
            _hold: hold,
        },
    )
}

impl Trigger {
    /// Signals every watch, then waits up to `deadline` for all of them to be dropped.
    pub async fn drain(mut self, deadline: Duration) -> Drained {
        let _ = self.signal.send(true);
        match tokio::time::timeout(deadline, self.released.recv()).await {
            Ok(_) => Drained::Complete,
            Err(_) => Drained::TimedOut {
                left: self.released.sender_strong_count(),
            },
        }
    }

    /// Whether the drain has been signalled.
    pub fn is_draining(&self) -> bool {
        *self.signal.borrow()
    }
}

impl Watch {
    /// Resolves once the drain is signalled (at once if it already was, or if the trigger
    /// is gone).
    pub async fn signaled(&self) {
        let mut rx = self.signal.clone();
        let _ = rx.wait_for(|draining| *draining).await;
    }

    /// Whether the drain has been signalled.
    pub fn is_draining(&self) -> bool {
        *self.signal.borrow()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn completes_when_every_holder_lets_go() {
        let (trigger, watch) = channel();
        let held = watch.clone();
        let task = tokio::spawn(async move {
            held.signaled().await;
            // A long response finishing its last write.
            tokio::time::sleep(Duration::from_millis(20)).await;
            drop(held);
        });
        assert!(!watch.is_draining());
        drop(watch);
        assert_eq!(
            trigger.drain(Duration::from_secs(5)).await,
            Drained::Complete
        );
        task.await.unwrap();
    }

    #[tokio::test]
    async fn times_out_and_counts_who_is_left() {
        let (trigger, watch) = channel();
        let stubborn = watch.clone();
        drop(watch);
        let got = trigger.drain(Duration::from_millis(30)).await;
        assert_eq!(got, Drained::TimedOut { left: 1 });
        assert!(stubborn.is_draining());
        // Signalled already: resolves at once.
        tokio::time::timeout(Duration::from_secs(1), stubborn.signaled())
            .await
            .unwrap();
    }
}
