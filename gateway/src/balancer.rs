//! Load balancing: least outstanding requests between two random choices, weighted by the
//! registry's weights, over the instances that serve a name by the one rule that DNS applies
//! too ([`waymark_shared::select`]: healthy, non-draining, panic mode); and passive
//! outlier ejection, which takes an instance out for a while after consecutive failures.
//!
//! Two choices: draw two distinct instances with probability proportional to their weight,
//! then send to the one with fewer requests in flight per unit of weight. This keeps load even
//! without a global queue and avoids the herd that "always the least loaded" causes.
//!
//! Ejection: `consecutive_failures` 5xx answers or connect failures in a row eject an
//! instance for `base_ejection`, doubled at each further ejection up to `max_ejection`. An
//! ejection that would take out more than `max_ejected_ratio` of the service's instances does
//! not happen, and if every candidate is ejected anyway they are all used.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use dashmap::DashMap;
use waymark_shared::select::select;
use waymark_shared::{Health, Instance, ServiceView};

use crate::config::OutlierConfig;
use crate::FastHash;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PickError {
    #[error("no serving instance of {0}")]
    NoInstance(String),
    #[error("every serving instance of {0} was already tried")]
    Exhausted(String),
}

/// What the balancer keeps about one instance, by instance ID.
#[derive(Debug, Default)]
pub struct Endpoint {
    outstanding: AtomicU64,
    consecutive_failures: AtomicU32,
    ejections: AtomicU32,
    /// End of the current ejection, in nanoseconds after the balancer's epoch; 0: none.
    ejected_until: AtomicU64,
}

impl Endpoint {
    pub fn outstanding(&self) -> u64 {
        self.outstanding.load(Ordering::Relaxed)
    }

    fn ejected_at(&self, now: u64) -> bool {
        self.ejected_until.load(Ordering::Relaxed) > now
    }
}

/// A request in flight to one instance: counted while this lives.
#[derive(Debug)]
pub struct InFlight {
    pub instance: Arc<Instance>,
    pub addr: SocketAddr,
    endpoint: Arc<Endpoint>,
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.endpoint.outstanding.fetch_sub(1, Ordering::Relaxed);
    }
}

/// What an outcome did to the instance, for metrics and logs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Fine,
    /// Ejected for this long.
    Ejected(Duration),
    /// Would have been ejected, but too much of the service is out already.
    KeptForCapacity,
}

#[derive(Debug)]
pub struct Balancer {
    outlier: OutlierConfig,
    /// Times are kept as nanoseconds after this, so an ejection is one atomic.
    epoch: Instant,
    endpoints: DashMap<String, Arc<Endpoint>, FastHash>,
}

/// A candidate instance: serving, carrying the tags, weighted.
struct Candidate<'a> {
    instance: &'a Arc<Instance>,
    /// Zeroed once the draw has ruled the candidate out.
    weight: u32,
}

impl Balancer {
    pub fn new(outlier: OutlierConfig) -> Balancer {
        Balancer {
            outlier,
            epoch: Instant::now(),
            endpoints: DashMap::default(),
        }
    }

    fn nanos(&self, t: Instant) -> u64 {
        // 1 at the epoch itself, so that 0 can mean "not ejected".
        u64::try_from(t.saturating_duration_since(self.epoch).as_nanos())
            .unwrap_or(u64::MAX)
            .saturating_add(1)
    }

    fn endpoint(&self, id: &str) -> Arc<Endpoint> {
        if let Some(e) = self.endpoints.get(id) {
            return e.clone();
        }
        self.endpoints.entry(id.to_string()).or_default().clone()
    }

    /// The state kept for an instance, if any.
    pub fn endpoint_state(&self, id: &str) -> Option<Arc<Endpoint>> {
        self.endpoints.get(id).map(|e| e.clone())
    }

    /// Forgets instances that are no longer registered.
    pub fn retain(&self, live: &HashSet<String>) {
        self.endpoints
            .retain(|id, e| live.contains(id) || e.outstanding() > 0);
    }

    /// Picks an instance of `service` carrying every tag in `tags`, not in `avoid`. `roll`
    /// yields random numbers in `0..1`.
    ///
    /// Draws are made by weight over the candidates; a draw that lands on an ejected
    /// instance (or one whose address is not an IP) rules it out and draws again, which is
    /// the same as drawing from the remaining candidates. So only the instances drawn are
    /// looked up, whatever the size of the service.
    pub fn pick(
        &self,
        service: &ServiceView,
        tags: &[String],
        avoid: &[String],
        now: Instant,
        roll: impl FnMut() -> f64,
    ) -> Result<InFlight, PickError> {
        self.pick_where(service, tags, |_| true, avoid, now, roll)
    }

    /// [`Balancer::pick`] among the selected instances that `keep` keeps too (the forwarder
    /// keeps those registered with the port called).
    pub fn pick_where<T: AsRef<str>>(
        &self,
        service: &ServiceView,
        tags: &[T],
        keep: impl Fn(&Instance) -> bool,
        avoid: &[String],
        now: Instant,
        mut roll: impl FnMut() -> f64,
    ) -> Result<InFlight, PickError> {
        let now = self.nanos(now);
        let mut selection = select(service, tags);
        selection.instances.retain(|i| keep(i));
        let serving = selection.instances.len();
        let cands: Vec<Candidate<'_>> = selection
            .instances
            .into_iter()
            .filter(|instance| !avoid.iter().any(|a| *a == instance.id))
            // In panic mode a selected instance may have no weight for its health.
            .map(|instance| Candidate {
                instance,
                weight: instance.weight().max(1),
            })
            .collect();
        let mut cands = cands;
        if serving == 0 {
            return Err(PickError::NoInstance(service.name.to_string()));
        }
        if cands.is_empty() {
            return Err(PickError::Exhausted(service.name.to_string()));
        }
        let untried = cands.len();
        let mut ejected: Vec<(usize, u32)> = Vec::new();
        let mut first = self.draw(&mut cands, &mut ejected, now, &mut roll);
        if first.is_none() && !ejected.is_empty() {
            // Every candidate is ejected: use them all rather than fail.
            for (k, weight) in ejected.drain(..) {
                cands[k].weight = weight;
            }
            first = self.draw(&mut cands, &mut ejected, u64::MAX, &mut roll);
        }
        let Some(first) = first else {
            // The candidates left have no IP address: nothing to connect to.
            return Err(if untried < serving {
                PickError::Exhausted(service.name.to_string())
            } else {
                PickError::NoInstance(service.name.to_string())
            });
        };
        let chosen = match self.draw(&mut cands, &mut ejected, now, &mut roll) {
            Some(second) if load(&second) < load(&first) => second,
            _ => first,
        };
        let (instance, addr, endpoint) = chosen;
        endpoint.outstanding.fetch_add(1, Ordering::Relaxed);
        Ok(InFlight {
            instance: instance.clone(),
            addr,
            endpoint,
        })
    }

    /// One weighted draw among the candidates with weight left; the winner's weight is
    /// zeroed so a second draw is distinct. Candidates ejected at `now` (`u64::MAX`: none
    /// counts as ejected) are zeroed and remembered in `ejected`; instances without an IP
    /// address are zeroed.
    fn draw<'a>(
        &self,
        cands: &mut [Candidate<'a>],
        ejected: &mut Vec<(usize, u32)>,
        now: u64,
        roll: &mut impl FnMut() -> f64,
    ) -> Option<Drawn<'a>> {
        loop {
            let k = weighted_index(cands.iter().map(|c| c.weight), roll())?;
            let weight = std::mem::take(&mut cands[k].weight);
            let instance = cands[k].instance;
            let Some(ip) = instance.ip() else { continue };
            let endpoint = self.endpoint(&instance.id);
            if endpoint.ejected_at(now) {
                ejected.push((k, weight));
                continue;
            }
            return Some((instance, SocketAddr::new(ip, instance.port), endpoint));
        }
    }

    /// Records a success: the failure streak ends.
    pub fn success(&self, id: &str) {
        if let Some(e) = self.endpoint_state(id) {
            e.consecutive_failures.store(0, Ordering::Relaxed);
        }
    }

    /// Records a failure (a 5xx answer or a connect failure) of instance `id` of `service`;
    /// ejects it when its streak reaches the threshold and the service can spare it.
    pub fn failure(&self, service: &ServiceView, id: &str, now: Instant) -> Verdict {
        self.failures(service, id, now, 1)
    }

    /// A failure that is certain at once, such as a refused connect: it counts as a whole
    /// streak, so the instance is ejected now (when the service can spare it).
    pub fn hard_failure(&self, service: &ServiceView, id: &str, now: Instant) -> Verdict {
        self.failures(service, id, now, self.outlier.consecutive_failures)
    }

    /// Adds `n` failures to the instance's streak; see [`Balancer::failure`].
    fn failures(&self, service: &ServiceView, id: &str, now: Instant, n: u32) -> Verdict {
        let threshold = self.outlier.consecutive_failures;
        if threshold == 0 {
            return Verdict::Fine;
        }
        let now = self.nanos(now);
        let endpoint = self.endpoint(id);
        let streak = endpoint
            .consecutive_failures
            .fetch_add(n, Ordering::Relaxed)
            .saturating_add(n);
        if streak < threshold || endpoint.ejected_at(now) {
            return Verdict::Fine;
        }
        let total = service.instances.iter().filter(|i| i.is_serving()).count();
        let ejected = service
            .instances
            .iter()
            .filter(|i| i.is_serving() && i.id != id)
            .filter(|i| {
                self.endpoint_state(&i.id)
                    .is_some_and(|e| e.ejected_at(now))
            })
            .count();
        let allowed = (self.outlier.max_ejected_ratio * total as f64).floor() as usize;
        if ejected + 1 > allowed {
            return Verdict::KeptForCapacity;
        }
        let times = endpoint.ejections.fetch_add(1, Ordering::Relaxed);
        let factor = 1u32.checked_shl(times.min(16)).unwrap_or(u32::MAX);
        let length = self
            .outlier
            .base_ejection
            .saturating_mul(factor)
            .min(self.outlier.max_ejection);
        let length_ns = u64::try_from(length.as_nanos()).unwrap_or(u64::MAX);
        endpoint
            .ejected_until
            .store(now.saturating_add(length_ns), Ordering::Relaxed);
        endpoint.consecutive_failures.store(0, Ordering::Relaxed);
        Verdict::Ejected(length)
    }

    /// Whether the instance is ejected now.
    pub fn is_ejected(&self, id: &str, now: Instant) -> bool {
        let now = self.nanos(now);
        self.endpoint_state(id).is_some_and(|e| e.ejected_at(now))
    }
}

/// A drawn instance: the instance, its address and its state.
type Drawn<'a> = (&'a Arc<Instance>, SocketAddr, Arc<Endpoint>);

/// Requests in flight per unit of weight.
fn load((instance, _, endpoint): &Drawn<'_>) -> f64 {
    let weight = match instance.health() {
        Health::Passing => instance.weight_passing,
        _ => instance.weight_warning,
    };
    endpoint.outstanding() as f64 / f64::from(weight.max(1))
}

/// An index drawn with probability proportional to `weights` (`roll` in `0..1`); `None`
/// when every weight is zero.
fn weighted_index(weights: impl Iterator<Item = u32> + Clone, roll: f64) -> Option<usize> {
    let total: u64 = weights.clone().map(u64::from).sum();
    if total == 0 {
        return None;
    }
    let mut point = (roll.clamp(0.0, 1.0) * total as f64) as u64;
    let mut last = 0;
    for (k, w) in weights.enumerate() {
        if point < u64::from(w) {
            return Some(k);
        }
        point -= u64::from(w);
        if w > 0 {
            last = k;
        }
    }
    Some(last)
}

#[cfg(test)]
pub(crate) mod tests {
    use std::collections::BTreeMap;

    use waymark_shared::CheckView;

    use super::*;

    /// An instance on 127.0.0.1 (a fixture other modules' tests use too).
    pub(crate) fn inst(id: &str, port: u16, weight: u32) -> Arc<Instance> {
        Arc::new(Instance {
            id: id.into(),
            service: "web".into(),
            address: "127.0.0.1".into(),
            port,
            tags: vec![],
            meta: BTreeMap::new(),
            weight_passing: weight,
            weight_warning: 1,
            checks: vec![],
            draining: false,
            node: None,
            create_index: 0,
            modify_index: 0,
            extra: None,
        })
    }

    /// Service `web` with `instances`.
    pub(crate) fn view(instances: Vec<Arc<Instance>>) -> ServiceView {
        ServiceView {
            name: "web".into(),
            index: 1,
            instances,
            attrs: Default::default(),
        }
    }

    fn outlier() -> OutlierConfig {
        OutlierConfig {
            consecutive_failures: 2,
            base_ejection: Duration::from_secs(10),
            max_ejection: Duration::from_secs(25),
            max_ejected_ratio: 0.5,
        }
    }

    fn rng(seed: u64) -> impl FnMut() -> f64 {
        let mut r = fastrand::Rng::with_seed(seed);
        move || r.f64()
    }

    #[test]
    fn only_serving_tagged_instances_with_weight_are_picked() {
        let b = Balancer::new(outlier());
        let mut draining = (*inst("d", 1, 1)).clone();
        draining.draining = true;
        let mut critical = (*inst("c", 2, 1)).clone();
        critical.checks.push(CheckView {
            id: "x".into(),
            name: "x".into(),
            kind: "ttl".into(),
            status: Health::Critical,
            output: String::new(),
            notes: String::new(),
        });
        let mut hostname = (*inst("h", 3, 1)).clone();
        hostname.address = "backend.internal".into();
        let mut tagged = (*inst("t", 4, 1)).clone();
        tagged.tags = vec!["v2".into()];
        let v = view(vec![
            Arc::new(draining),
            Arc::new(critical),
            Arc::new(hostname),
            inst("zero", 5, 0),
            Arc::new(tagged),
        ]);
        let mut r = rng(1);
        for _ in 0..50 {
            let p = b.pick(&v, &[], &[], Instant::now(), &mut r).unwrap();
            assert_eq!(p.instance.id, "t");
        }
        let p = b
            .pick(&v, &["V2".into()], &[], Instant::now(), &mut r)
            .unwrap();
        assert_eq!(p.addr, "127.0.0.1:4".parse().unwrap());
        assert_eq!(
            b.pick(&v, &["v3".into()], &[], Instant::now(), &mut r)
                .unwrap_err(),
            PickError::NoInstance("web".into())
        );
        assert_eq!(
            b.pick(&v, &[], &["t".into()], Instant::now(), &mut r)
                .unwrap_err(),
            PickError::Exhausted("web".into())
        );
    }

    #[test]
    fn weights_shape_the_share() {
        let b = Balancer::new(outlier());
        let v = view(vec![inst("a", 1, 1), inst("b", 2, 3)]);
        let mut r = rng(7);
        let mut to_b = 0;
        for _ in 0..4000 {
            // Dropped at once: nothing outstanding, so only weights decide.
            if b.pick(&v, &[], &[], Instant::now(), &mut r)
                .unwrap()
                .instance
                .id
                == "b"
            {
                to_b += 1;
            }
        }
        // Nothing in flight: a tie, which goes to the first (weighted) draw: b's share is 3/4.
        assert!((2700..=3300).contains(&to_b), "b got {to_b} of 4000");
    }

    #[test]
    fn the_less_loaded_of_two_wins() {
        let b = Balancer::new(outlier());
        let v = view(vec![inst("a", 1, 1), inst("b", 2, 1)]);
        let mut r = rng(3);
        let held: Vec<InFlight> = (0..10)
            .map(|_| {
                b.pick(&v, &[], &["b".into()], Instant::now(), &mut r)
                    .unwrap()
            })
            .collect();
        assert_eq!(b.endpoint_state("a").unwrap().outstanding(), 10);
        for _ in 0..20 {
            let p = b.pick(&v, &[], &[], Instant::now(), &mut r).unwrap();
            assert_eq!(
                p.instance.id, "b",
                "with two instances both are always compared"
            );
        }
        drop(held);
        assert_eq!(b.endpoint_state("a").unwrap().outstanding(), 0);
    }

    #[test]
    fn failures_eject_for_a_growing_time_but_never_more_than_half() {
        let b = Balancer::new(outlier());
        let v = view(vec![inst("a", 1, 1), inst("b", 2, 1), inst("c", 3, 1)]);
        let t0 = Instant::now();
        let mut r = rng(5);
        // Picks create the endpoint states.
        for _ in 0..10 {
            drop(b.pick(&v, &[], &[], t0, &mut r).unwrap());
        }
        assert_eq!(b.failure(&v, "a", t0), Verdict::Fine);
        assert_eq!(
            b.failure(&v, "a", t0),
            Verdict::Ejected(Duration::from_secs(10))
        );
        assert!(b.is_ejected("a", t0 + Duration::from_secs(9)));
        for _ in 0..30 {
            assert_ne!(b.pick(&v, &[], &[], t0, &mut r).unwrap().instance.id, "a");
        }
        // One of three ejected already: floor(1.5) = 1, so b stays in.
        b.failure(&v, "b", t0);
        assert_eq!(b.failure(&v, "b", t0), Verdict::KeptForCapacity);
        // After the ejection ends, the next one is twice as long, then capped.
        let t1 = t0 + Duration::from_secs(11);
        assert!(!b.is_ejected("a", t1));
        b.failure(&v, "a", t1);
        assert_eq!(
            b.failure(&v, "a", t1),
            Verdict::Ejected(Duration::from_secs(20))
        );
        let t2 = t1 + Duration::from_secs(21);
        b.failure(&v, "a", t2);
        assert_eq!(
            b.failure(&v, "a", t2),
            Verdict::Ejected(Duration::from_secs(25))
        );
        // A success ends a streak.
        let t3 = t2 + Duration::from_secs(26);
        b.failure(&v, "c", t3);
        b.success("c");
        assert_eq!(b.failure(&v, "c", t3), Verdict::Fine);
    }

    #[test]
    fn picks_keep_to_the_filter_and_hard_failures_eject_at_once() {
        let b = Balancer::new(outlier());
        let v = view(vec![inst("a", 80, 1), inst("b", 81, 1), inst("c", 81, 1)]);
        let t0 = Instant::now();
        let mut r = rng(9);
        for _ in 0..30 {
            let p = b
                .pick_where(&v, &[] as &[&str], |i| i.port == 81, &[], t0, &mut r)
                .unwrap();
            assert_ne!(p.instance.id, "a");
        }
        assert_eq!(
            b.pick_where(&v, &[] as &[&str], |i| i.port == 82, &[], t0, &mut r)
                .unwrap_err(),
            PickError::NoInstance("web".into())
        );
        assert_eq!(
            b.hard_failure(&v, "b", t0),
            Verdict::Ejected(Duration::from_secs(10))
        );
        for _ in 0..30 {
            let p = b
                .pick_where(&v, &[] as &[&str], |i| i.port == 81, &[], t0, &mut r)
                .unwrap();
            assert_eq!(p.instance.id, "c");
        }
    }

    #[test]
    fn all_ejected_still_serves() {
        let b = Balancer::new(OutlierConfig {
            max_ejected_ratio: 1.0,
            ..outlier()
        });
        let v = view(vec![inst("a", 1, 1)]);
        let t0 = Instant::now();
        drop(b.pick(&v, &[], &[], t0, rng(1)).unwrap());
        b.failure(&v, "a", t0);
        assert!(matches!(b.failure(&v, "a", t0), Verdict::Ejected(_)));
        assert_eq!(b.pick(&v, &[], &[], t0, rng(2)).unwrap().instance.id, "a");
    }

    #[test]
    fn weighted_index_covers_the_range() {
        let w = |ws: &'static [u32]| ws.iter().copied();
        assert_eq!(weighted_index(w(&[1, 0, 1]), 0.0), Some(0));
        assert_eq!(weighted_index(w(&[1, 0, 1]), 0.5), Some(2));
        assert_eq!(weighted_index(w(&[1, 0, 1]), 1.0), Some(2));
        assert_eq!(weighted_index(w(&[0, 5]), 0.3), Some(1));
        assert_eq!(weighted_index(w(&[0, 0]), 0.3), None);
        assert_eq!(weighted_index(w(&[]), 0.3), None);
    }
}
