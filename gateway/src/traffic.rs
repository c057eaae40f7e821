//! Requests, errors and latency per route and per instance, for the gateway's web view.
//!
//! Counting is a map lookup by a borrowed name and a few relaxed atomic adds per request
//! (no allocation once a route or instance has been seen). Reading takes a [`Sample`] of
//! every counter; the rates and the latency of the last interval are the difference of two
//! samples ([`Window::between`], pure).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use dashmap::DashMap;

use crate::FastHash;
use serde::Serialize;

/// Latency buckets: the first ends at 0.5 ms, each next one at twice the last; the last
/// one has no end.
pub const BUCKETS: usize = 18;
const FIRST_BUCKET_US: u64 = 500;

/// Which bucket a latency falls in.
fn bucket(us: u64) -> usize {
    if us <= FIRST_BUCKET_US {
        return 0;
    }
    // The smallest k with 500 * 2^k >= us.
    let ratio = us.div_ceil(FIRST_BUCKET_US);
    let k = (64 - (ratio - 1).leading_zeros()) as usize;
    k.min(BUCKETS - 1)
}

/// Where bucket `i` ends, in milliseconds (`None`: the last, open one).
fn bucket_end_ms(i: usize) -> Option<f64> {
    (i < BUCKETS - 1).then(|| (FIRST_BUCKET_US << i) as f64 / 1000.0)
}

/// The counters of one route or instance.
#[derive(Debug, Default)]
struct Counters {
    requests: AtomicU64,
    errors: AtomicU64,
    latency_us: AtomicU64,
    buckets: [AtomicU64; BUCKETS],
}

impl Counters {
    fn record(&self, error: bool, us: u64) {
        self.requests.fetch_add(1, Ordering::Relaxed);
        if error {
            self.errors.fetch_add(1, Ordering::Relaxed);
        }
        self.latency_us.fetch_add(us, Ordering::Relaxed);
        self.buckets[bucket(us)].fetch_add(1, Ordering::Relaxed);
    }

    fn read(&self) -> Totals {
        Totals {
            requests: self.requests.load(Ordering::Relaxed),
            errors: self.errors.load(Ordering::Relaxed),
            latency_us: self.latency_us.load(Ordering::Relaxed),
            buckets: std::array::from_fn(|i| self.buckets[i].load(Ordering::Relaxed)),
        }
    }
}

/// Whether a finished request counts as an error: a 5xx, or no answer at all (0).
pub fn is_error(status: u16) -> bool {
    status == 0 || status >= 500
}

/// Every route's and instance's counters.
#[derive(Debug, Default)]
pub struct Traffic {
    routes: DashMap<String, Counters, FastHash>,
    instances: DashMap<String, Counters, FastHash>,
}

impl Traffic {
    /// Counts one finished request under its route and, when one was tried, the instance
    /// that answered last.
    pub fn record(&self, route: &str, instance: Option<&str>, status: u16, elapsed: Duration) {
        let us = u64::try_from(elapsed.as_micros()).unwrap_or(u64::MAX);
        let error = is_error(status);
        record_in(&self.routes, route, error, us);
        if let Some(id) = instance.filter(|i| !i.is_empty()) {
            record_in(&self.instances, id, error, us);
        }
    }

    /// Forgets the counters of routes and instances that are gone.
    pub fn retain(&self, routes: impl Fn(&str) -> bool, instances: impl Fn(&str) -> bool) {
        self.routes.retain(|k, _| routes(k));
        self.instances.retain(|k, _| instances(k));
    }

    /// Every counter now.
    pub fn sample(&self) -> Sample {
        let read = |m: &DashMap<String, Counters, FastHash>| {
            m.iter()
                .map(|e| (e.key().clone(), e.value().read()))
                .collect()
        };
        Sample {
            routes: read(&self.routes),
            instances: read(&self.instances),
        }
    }
}

fn record_in(map: &DashMap<String, Counters, FastHash>, key: &str, error: bool, us: u64) {
    if let Some(c) = map.get(key) {
        c.record(error, us);
        return;
    }
    map.entry(key.to_string()).or_default().record(error, us);
}

/// One counter set's values.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Totals {
    pub requests: u64,
    pub errors: u64,
    pub latency_us: u64,
    pub buckets: [u64; BUCKETS],
}

/// Every counter at one moment.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Sample {
    pub routes: BTreeMap<String, Totals>,
    pub instances: BTreeMap<String, Totals>,
}

/// What a route or an instance did: in all, and over the last interval.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Window {
    pub requests: u64,
    pub errors: u64,
    /// Per second, over the interval.
    pub rps: f64,
    pub errors_per_s: f64,
    /// Over the interval's requests (none: no request in it).
    pub mean_ms: Option<f64>,
    /// An upper bound: the end of the bucket the 99th percentile falls in (none: no request,
    /// or beyond the last bucket's start).
    pub p99_ms: Option<f64>,
}

impl Window {
    /// From the totals at the start (`before`, none: not seen then) and at the end of an
    /// interval of `elapsed`. Counters that went back (forgotten, then seen again) count
    /// from zero.
    pub fn between(before: Option<&Totals>, now: &Totals, elapsed: Duration) -> Window {
        let zero = Totals::default();
        let before = match before {
            Some(b) if b.requests <= now.requests => b,
            _ => &zero,
        };
        let secs = elapsed.as_secs_f64();
        let requests = now.requests - before.requests;
        let errors = now.errors.saturating_sub(before.errors);
        let per_s = |n: u64| if secs > 0.0 { n as f64 / secs } else { 0.0 };
        let mean_ms = (requests > 0).then(|| {
            now.latency_us.saturating_sub(before.latency_us) as f64 / requests as f64 / 1000.0
        });
        let deltas: Vec<u64> = (0..BUCKETS)
            .map(|i| now.buckets[i].saturating_sub(before.buckets[i]))
            .collect();
        Window {
            requests: now.requests,
            errors: now.errors,
            rps: per_s(requests),
            errors_per_s: per_s(errors),
            mean_ms,
            p99_ms: percentile(&deltas, 0.99),
        }
    }
}

/// The end of the bucket where the `q` quantile falls.
fn percentile(buckets: &[u64], q: f64) -> Option<f64> {
    let total: u64 = buckets.iter().sum();
    if total == 0 {
        return None;
    }
    let rank = (q * total as f64).ceil().max(1.0) as u64;
    let mut seen = 0;
    for (i, n) in buckets.iter().enumerate() {
        seen += n;
        if seen >= rank {
            return bucket_end_ms(i);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_double_from_half_a_millisecond() {
        assert_eq!(bucket(0), 0);
        assert_eq!(bucket(500), 0);
        assert_eq!(bucket(501), 1);
        assert_eq!(bucket(1000), 1);
        assert_eq!(bucket(1001), 2);
        assert_eq!(bucket(2000), 2);
        assert_eq!(bucket(64_000), 7);
        assert_eq!(bucket(u64::MAX), BUCKETS - 1);
        assert_eq!(bucket_end_ms(0), Some(0.5));
        assert_eq!(bucket_end_ms(3), Some(4.0));
        assert_eq!(bucket_end_ms(BUCKETS - 1), None);
        // Every latency is at most its bucket's end, and over the one before.
        for us in [1, 499, 500, 777, 1000, 3000, 10_000, 1_000_000] {
            let b = bucket(us);
            assert!(us as f64 / 1000.0 <= bucket_end_ms(b).unwrap(), "{us}");
            if b > 0 {
                assert!(us as f64 / 1000.0 > bucket_end_ms(b - 1).unwrap(), "{us}");
            }
        }
    }

    #[test]
    fn counts_by_route_and_instance() {
        let t = Traffic::default();
        let ms = Duration::from_millis;
        t.record("shop", Some("shop-1"), 200, ms(2));
        t.record("shop", Some("shop-1"), 503, ms(4));
        t.record("shop", Some("shop-2"), 200, ms(1));
        t.record("-", None, 404, ms(0));
        t.record("shop", Some(""), 0, ms(0));
        let s = t.sample();
        assert_eq!(s.routes["shop"].requests, 4);
        assert_eq!(s.routes["shop"].errors, 2, "a 503 and no answer");
        assert_eq!(s.routes["-"].errors, 0, "a 404 is not the gateway's error");
        assert_eq!(s.instances["shop-1"].requests, 2);
        assert_eq!(s.instances["shop-1"].errors, 1);
        assert_eq!(s.instances["shop-1"].latency_us, 6000);
        assert_eq!(s.instances.len(), 2);
        t.retain(|r| r == "shop", |i| i == "shop-2");
        let s = t.sample();
        assert_eq!(s.routes.keys().collect::<Vec<_>>(), vec!["shop"]);
        assert_eq!(s.instances.keys().collect::<Vec<_>>(), vec!["shop-2"]);
    }

    #[test]
    fn windows_are_differences_of_samples() {
        let t = Traffic::default();
        for _ in 0..98 {
            t.record("r", Some("i"), 200, Duration::from_micros(300));
        }
        let before = t.sample();
        for _ in 0..99 {
            t.record("r", Some("i"), 200, Duration::from_micros(800));
        }
        t.record("r", Some("i"), 502, Duration::from_millis(30));
        let now = t.sample();
        let w = Window::between(
            before.routes.get("r"),
            &now.routes["r"],
            Duration::from_secs(2),
        );
        assert_eq!(w.requests, 198);
        assert_eq!(w.errors, 1);
        assert_eq!(w.rps, 50.0);
        assert_eq!(w.errors_per_s, 0.5);
        let mean = w.mean_ms.unwrap();
        assert!((mean - (99.0 * 0.8 + 30.0) / 100.0).abs() < 1e-9, "{mean}");
        assert_eq!(w.p99_ms, Some(1.0), "99 of 100 at 0.8 ms: the 1 ms bucket");
        // Nothing in the interval: no latency to tell.
        let idle = Window::between(
            Some(&now.routes["r"]),
            &now.routes["r"],
            Duration::from_secs(1),
        );
        assert_eq!((idle.rps, idle.mean_ms, idle.p99_ms), (0.0, None, None));
        assert_eq!(idle.requests, 198);
        // First seen in this interval, or counted from zero again.
        let fresh = Window::between(None, &now.instances["i"], Duration::from_secs(1));
        assert_eq!(fresh.rps, 198.0);
        let reset = Window::between(
            Some(&now.instances["i"]),
            &before.instances["i"],
            Duration::from_secs(1),
        );
        assert_eq!(reset.rps, 98.0);
    }
}
