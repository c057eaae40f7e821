//! Tries at instances, for both data paths: whether another try may start (or could at
//! all), and what a failed one does to its instance (outlier ejection, counted and logged).

use std::time::Instant;

use waymark_shared::select::select;
use waymark_shared::ServiceView;

use crate::admin::ServiceLabel;
use crate::balancer::Verdict;
use crate::Shared;

/// Whether another try may start now: tries left, deadline not passed, an untried serving
/// instance exists, and (unless `free`) the retry budget pays for it.
pub fn may_retry(
    shared: &Shared,
    tried: &[String],
    deadline: Instant,
    service: Option<&ServiceView>,
    tags: &[String],
    free: bool,
) -> bool {
    if tried.len() >= shared.config.retry.attempts as usize || Instant::now() >= deadline {
        return false;
    }
    let Some(service) = service else {
        return false;
    };
    let another = select(service, tags)
        .instances
        .iter()
        .any(|i| !tried.iter().any(|t| *t == i.id));
    another && (free || shared.retry_budget.try_spend())
}

/// Whether the try about to start (its instance last in `tried`) must be the last one: the
/// tries allowed are used up, or no instance of the service is left untried. A retry is
/// decided on the service as this try saw it, and [`may_retry`] selects among its
/// instances (a subset of these), so when this holds no retry can follow and the request's
/// head need not be kept for one.
pub fn last_try(service: &ServiceView, tried: &[String], attempts: u32) -> bool {
    tried.len() >= attempts as usize
        || service
            .instances
            .iter()
            .all(|i| tried.iter().any(|t| *t == i.id))
}

/// A failed try: counts against the instance, which may be ejected.
pub fn record_failure(shared: &Shared, service: &ServiceView, id: &str) {
    match shared.balancer.failure(service, id, Instant::now()) {
        Verdict::Ejected(length) => {
            tracing::warn!(service = %service.name, instance = %id, ?length, "instance ejected after consecutive failures");
            shared
                .metrics
                .ejections
                .get_or_create(&ServiceLabel {
                    service: service.name.to_string(),
                })
                .inc();
        }
        Verdict::KeptForCapacity => {
            tracing::warn!(service = %service.name, instance = %id, "instance failing, but too much of the service is ejected already");
        }
        Verdict::Fine => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn last_tries() {
        use crate::balancer::tests::{inst, view};
        let view = |ids: &[&str]| view(ids.iter().map(|id| inst(id, 80, 1)).collect());
        // (instances, tried, attempts, last)
        let table: [(&[&str], &[&str], u32, bool); 6] = [
            (&["a"], &["a"], 3, true),
            (&["a", "b"], &["a"], 3, false),
            (&["a", "b"], &["b", "a"], 3, true),
            (&["a", "b", "c"], &["a", "b"], 2, true),
            (&["a", "b", "c"], &["a"], 1, true),
            (&["a", "b", "c"], &["c"], 2, false),
        ];
        for (ids, tried, attempts, want) in table {
            let tried: Vec<String> = tried.iter().map(|t| t.to_string()).collect();
            assert_eq!(
                last_try(&view(ids), &tried, attempts),
                want,
                "{ids:?} {tried:?} {attempts}"
            );
        }
    }
}
