//! Admission for per-connection and per-request work.
//!
//! An [`Admission`] has a cap in total and, optionally, a cap per key (a client address).
//! Work starts only with an [`Admitted`] ticket, which it holds for as long as it runs;
//! beyond a cap, [`Admission::try_admit`] says no at once (the caller closes the connection
//! or answers "busy"), so a flood can never grow tasks, buffers or descriptors past the
//! caps. Refusals are counted. The idea is mini-redis's connection semaphore, with the
//! per-client cap DNS servers have.

use std::collections::HashMap;
use std::future::Future;
use std::hash::Hash;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinHandle;

/// How much work each key has admitted.
type Counts<K> = Arc<Mutex<HashMap<K, usize>>>;

/// Why work was not admitted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    #[error("at the limit of {0} in total")]
    Total(usize),
    #[error("at the limit of {0} per client")]
    PerKey(usize),
}

/// Caps on concurrent work, in total and per key.
#[derive(Debug)]
pub struct Admission<K: Hash + Eq + Clone = std::net::IpAddr> {
    total: Arc<Semaphore>,
    limit: usize,
    per_key: Option<usize>,
    counts: Counts<K>,
    refused: AtomicU64,
}

/// A ticket for one piece of admitted work; the work is counted until it is dropped.
#[derive(Debug)]
pub struct Admitted<K: Hash + Eq + Clone = std::net::IpAddr> {
    _permit: OwnedSemaphorePermit,
    key: Option<(K, Counts<K>)>,
}

impl<K: Hash + Eq + Clone> Admission<K> {
    /// At most `total` at once, and at most `per_key` for one key (none: no per-key cap).
    pub fn new(total: usize, per_key: Option<usize>) -> Arc<Admission<K>> {
        Arc::new(Admission {
            total: Arc::new(Semaphore::new(total)),
            limit: total,
            per_key,
            counts: Arc::new(Mutex::new(HashMap::new())),
            refused: AtomicU64::new(0),
        })
    }

    /// A ticket for work on behalf of `key`, or why not.
    pub fn try_admit(&self, key: K) -> Result<Admitted<K>, Refused> {
        let permit = match self.total.clone().try_acquire_owned() {
            Ok(p) => p,
            Err(_) => {
                self.refused.fetch_add(1, Ordering::Relaxed);
                return Err(Refused::Total(self.limit));
            }
        };
        let key = match self.per_key {
            None => None,
            Some(cap) => {
                let mut counts = self.counts.lock().unwrap_or_else(|e| e.into_inner());
                let n = counts.entry(key.clone()).or_default();
                if *n >= cap {
                    drop(counts);
                    self.refused.fetch_add(1, Ordering::Relaxed);
                    return Err(Refused::PerKey(cap));
                }
                *n += 1;
                Some((key, self.counts.clone()))
            }
        };
        Ok(Admitted {
            _permit: permit,
            key,
        })
    }

    /// Spawns `work` on the current runtime if it is admitted; the ticket lives as long as
    /// the task.
    pub fn try_spawn<F>(&self, key: K, work: F) -> Result<JoinHandle<F::Output>, Refused>
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
        K: Send + 'static,
    {
        let ticket = self.try_admit(key)?;
        Ok(tokio::spawn(async move {
            let out = work.await;
            drop(ticket);
            out
        }))
    }

    /// Work admitted and not finished.
    pub fn in_use(&self) -> usize {
        self.limit - self.total.available_permits()
    }

    pub fn limit(&self) -> usize {
        self.limit
    }

    /// Refusals so far.
    pub fn refused(&self) -> u64 {
        self.refused.load(Ordering::Relaxed)
    }
}

impl<K: Hash + Eq + Clone> Drop for Admitted<K> {
    fn drop(&mut self) {
        if let Some((key, counts)) = self.key.take() {
            let mut counts = counts.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(n) = counts.get_mut(&key) {
                *n -= 1;
                if *n == 0 {
                    counts.remove(&key);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn caps_in_total_and_per_key_and_frees_on_drop() {
        let a: Arc<Admission<&str>> = Admission::new(3, Some(2));
        let a1 = a.try_admit("a").unwrap();
        let a2 = a.try_admit("a").unwrap();
        assert_eq!(a.try_admit("a").unwrap_err(), Refused::PerKey(2));
        let b1 = a.try_admit("b").unwrap();
        assert_eq!(a.try_admit("c").unwrap_err(), Refused::Total(3));
        assert_eq!(a.in_use(), 3);
        assert_eq!(a.refused(), 2);
        drop(a1);
        let a3 = a.try_admit("a").unwrap();
        drop((a2, a3, b1));
        assert_eq!(a.in_use(), 0);
        assert!(a.counts.lock().unwrap().is_empty(), "no key left behind");
    }

    #[tokio::test]
    async fn a_spawned_task_holds_its_ticket_until_it_ends() {
        let a: Arc<Admission<u8>> = Admission::new(1, None);
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let task = a
            .try_spawn(0, async move {
                let _ = rx.await;
            })
            .unwrap();
        assert_eq!(a.try_spawn(0, async {}).unwrap_err(), Refused::Total(1));
        tx.send(()).unwrap();
        task.await.unwrap();
        assert_eq!(a.in_use(), 0);
        a.try_spawn(0, async {}).unwrap().await.unwrap();
    }
}
