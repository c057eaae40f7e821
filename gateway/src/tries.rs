//! Tries at instances, for both data paths: whether another try may start, and what a
//! failed one does to its instance (outlier ejection, counted and logged).

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
