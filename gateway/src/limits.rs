//! Token buckets: per-route and per-client-IP rate limits, and the retry budget.
//!
//! A bucket holds up to `burst` tokens and refills at `rate` tokens per second; a request
//! takes one token or is refused with the time until the next one. Per-client buckets live in
//! a map that forgets clients whose buckets have been full for a while, so the map stays
//! bounded by recent clients.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::config::{RateLimit, RetryConfig};

/// One token bucket.
#[derive(Debug, Clone, Copy)]
pub struct Bucket {
    tokens: f64,
    at: Instant,
}

impl Bucket {
    pub fn full(limit: &RateLimit, now: Instant) -> Bucket {
        Bucket {
            tokens: f64::from(limit.burst),
            at: now,
        }
    }

    fn refill(&mut self, limit: &RateLimit, now: Instant) {
        let elapsed = now.saturating_duration_since(self.at).as_secs_f64();
        self.tokens = (self.tokens + elapsed * limit.rate).min(f64::from(limit.burst));
        self.at = now;
    }

    /// Takes a token, or says how long until one is there.
    pub fn take(&mut self, limit: &RateLimit, now: Instant) -> Result<(), Duration> {
        self.refill(limit, now);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            Ok(())
        } else {
            Err(Duration::from_secs_f64((1.0 - self.tokens) / limit.rate))
        }
    }

    fn is_full(&self, limit: &RateLimit, now: Instant) -> bool {
        let mut b = *self;
        b.refill(limit, now);
        b.tokens >= f64::from(limit.burst)
    }
}

/// A limit shared by every request that hits it (one route).
#[derive(Debug)]
pub struct SharedLimit {
    limit: RateLimit,
    bucket: Mutex<Bucket>,
}

impl SharedLimit {
    pub fn new(limit: RateLimit) -> SharedLimit {
        SharedLimit {
            limit,
            bucket: Mutex::new(Bucket::full(&limit, Instant::now())),
        }
    }

    pub fn limit(&self) -> RateLimit {
        self.limit
    }

    pub fn take(&self, now: Instant) -> Result<(), Duration> {
        self.bucket
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take(&self.limit, now)
    }
}

/// One bucket per client IP.
#[derive(Debug)]
pub struct PerClientLimit {
    limit: RateLimit,
    buckets: Mutex<HashMap<IpAddr, Bucket>>,
    /// The map is swept for full buckets when it grows past this.
    sweep_at: usize,
}

impl PerClientLimit {
    pub fn new(limit: RateLimit) -> PerClientLimit {
        PerClientLimit {
            limit,
            buckets: Mutex::new(HashMap::new()),
            sweep_at: 4096,
        }
    }

    pub fn take(&self, client: IpAddr, now: Instant) -> Result<(), Duration> {
        let mut map = self.buckets.lock().unwrap_or_else(|e| e.into_inner());
        if map.len() >= self.sweep_at && !map.contains_key(&client) {
            let limit = self.limit;
            map.retain(|_, b| !b.is_full(&limit, now));
        }
        map.entry(client)
            .or_insert_with(|| Bucket::full(&self.limit, now))
            .take(&self.limit, now)
    }

    pub fn tracked(&self) -> usize {
        self.buckets.lock().unwrap_or_else(|e| e.into_inner()).len()
    }
}

/// Retries allowed as a share of requests: every request adds `ratio` of a token, every
/// retry spends one; the reserve is there from the start and caps what can be saved up.
#[derive(Debug)]
pub struct RetryBudget {
    /// Thousandths of a token.
    milli: AtomicU64,
    per_request: u64,
    cap: u64,
}

impl RetryBudget {
    pub fn new(c: &RetryConfig) -> RetryBudget {
        let cap = u64::from(c.budget_reserve.max(1)) * 1000;
        RetryBudget {
            milli: AtomicU64::new(cap),
            per_request: (c.budget_ratio * 1000.0).round() as u64,
            cap,
        }
    }

    /// A new request came in.
    pub fn deposit(&self) {
        let _ = self
            .milli
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |m| {
                Some((m + self.per_request).min(self.cap))
            });
    }

    /// Whether a retry may happen now (spending a token when it may).
    pub fn try_spend(&self) -> bool {
        self.milli
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |m| {
                m.checked_sub(1000)
            })
            .is_ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bucket_allows_a_burst_then_the_rate() {
        let limit = RateLimit {
            rate: 10.0,
            burst: 3,
        };
        let t0 = Instant::now();
        let mut b = Bucket::full(&limit, t0);
        for _ in 0..3 {
            b.take(&limit, t0).unwrap();
        }
        let wait = b.take(&limit, t0).unwrap_err();
        assert!((wait.as_secs_f64() - 0.1).abs() < 1e-9, "{wait:?}");
        assert!(b.take(&limit, t0 + Duration::from_millis(50)).is_err());
        b.take(&limit, t0 + Duration::from_millis(101)).unwrap();
        // Refill stops at the burst.
        let later = t0 + Duration::from_secs(60);
        for _ in 0..3 {
            b.take(&limit, later).unwrap();
        }
        assert!(b.take(&limit, later).is_err());
    }

    #[test]
    fn clients_have_their_own_buckets_and_idle_ones_are_forgotten() {
        let limit = RateLimit {
            rate: 1.0,
            burst: 1,
        };
        let mut l = PerClientLimit::new(limit);
        l.sweep_at = 2;
        let t0 = Instant::now();
        let a: IpAddr = "127.0.0.2".parse().unwrap();
        let b: IpAddr = "127.0.0.3".parse().unwrap();
        l.take(a, t0).unwrap();
        assert!(l.take(a, t0).is_err());
        l.take(b, t0).unwrap();
        assert_eq!(l.tracked(), 2);
        // Both refilled after 2 s: a third client sweeps them out.
        l.take("127.0.0.4".parse().unwrap(), t0 + Duration::from_secs(2))
            .unwrap();
        assert_eq!(l.tracked(), 1);
    }

    #[test]
    fn shared_limits_count_every_request() {
        let l = SharedLimit::new(RateLimit {
            rate: 1.0,
            burst: 2,
        });
        let t0 = Instant::now();
        assert!(l.take(t0).is_ok());
        assert!(l.take(t0).is_ok());
        assert!(l.take(t0).is_err());
    }

    #[test]
    fn the_retry_budget_is_a_share_of_requests() {
        let b = RetryBudget::new(&RetryConfig {
            attempts: 3,
            budget_ratio: 0.2,
            budget_reserve: 2,
        });
        assert!(b.try_spend());
        assert!(b.try_spend());
        assert!(!b.try_spend(), "reserve spent");
        for _ in 0..4 {
            b.deposit();
        }
        assert!(!b.try_spend(), "four requests earn 0.8 of a retry");
        b.deposit();
        assert!(b.try_spend(), "five earn one");
        assert!(!b.try_spend());
        for _ in 0..1000 {
            b.deposit();
        }
        assert!(
            b.try_spend() && b.try_spend() && !b.try_spend(),
            "capped at the reserve"
        );
    }
}
