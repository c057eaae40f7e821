//! Readiness made of named pieces: each piece that is not ready yet holds a [`Token`] (or is
//! marked with [`Readiness::waiting_for`]) and the process is ready when none is left.
//! `/healthz/ready` lists what it still waits for. A piece can become unready again (a store
//! that cannot write) by taking a token once more.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

/// What a process waits for. Share it in an `Arc`.
#[derive(Debug, Default)]
pub struct Readiness {
    pending: Mutex<BTreeMap<String, usize>>,
}

/// Not ready while this lives; dropping it (or [`Token::ready`]) releases it.
#[derive(Debug)]
pub struct Token {
    of: Arc<Readiness>,
    what: String,
}

impl Readiness {
    pub fn new() -> Arc<Readiness> {
        Arc::new(Readiness::default())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, usize>> {
        self.pending.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A token for `what`: not ready until it is dropped.
    pub fn token(self: &Arc<Self>, what: impl Into<String>) -> Token {
        let what = what.into();
        *self.lock().entry(what.clone()).or_default() += 1;
        Token {
            of: self.clone(),
            what,
        }
    }

    /// Marks `what` pending, without a token; [`Readiness::done`] clears it.
    pub fn waiting_for(&self, what: impl Into<String>) {
        *self.lock().entry(what.into()).or_default() += 1;
    }

    /// Clears one mark of `what` (made by [`Readiness::waiting_for`]).
    pub fn done(&self, what: &str) {
        let mut pending = self.lock();
        if let Some(n) = pending.get_mut(what) {
            *n -= 1;
            if *n == 0 {
                pending.remove(what);
            }
        }
    }

    /// What is still pending, sorted; empty means ready.
    pub fn pending(&self) -> Vec<String> {
        self.lock().keys().cloned().collect()
    }

    pub fn is_ready(&self) -> bool {
        self.lock().is_empty()
    }
}

impl Token {
    /// Releases the token: this piece is ready.
    pub fn ready(self) {}
}

impl Drop for Token {
    fn drop(&mut self) {
        self.of.done(&self.what);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_what_is_pending_until_every_token_is_released() {
        let r = Readiness::new();
        assert!(r.is_ready());
        let store = r.token("store");
        let dns = r.token("dns");
        r.waiting_for("services file");
        assert_eq!(r.pending(), ["dns", "services file", "store"]);
        dns.ready();
        r.done("services file");
        assert_eq!(r.pending(), ["store"]);
        // Two holders of one name: pending until both let go.
        let again = r.token("store");
        drop(store);
        assert_eq!(r.pending(), ["store"]);
        drop(again);
        assert!(r.is_ready());
        // done() of something not pending changes nothing.
        r.done("nothing");
        assert!(r.is_ready());
    }
}
