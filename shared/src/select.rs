//! Which instances serve a name: one pure rule that DNS answers, the ingress gateway and the
//! forwarder all apply, so that what a client is told and where its calls go never disagree.
//!
//! The rule, for a service view and a set of tags (all must match, case-insensitively):
//! - an instance serves when it is not draining, not critical, and its weight for its health
//!   ([`Instance::weight`]) is above zero;
//! - **panic mode**: when the service has a panic threshold and fewer than that share of its
//!   matching non-draining instances serve, every matching non-draining instance is selected
//!   (critical ones included, weights ignored), rather than overloading the few healthy ones,
//!   as Envoy's panic threshold does. Draining instances are never selected.

use std::sync::Arc;

use crate::mirror::ServiceView;
use crate::model::{Health, Instance};

/// The instances selected for a name, in registration order.
#[derive(Debug)]
pub struct Selection<'a> {
    pub instances: Vec<&'a Arc<Instance>>,
    /// True when the panic threshold selected instances that do not serve.
    pub panic: bool,
    /// How many instances matched the tags (draining or not): zero means the name has no
    /// instance at all, as opposed to none that serves.
    pub matched: usize,
}

/// Applies the rule (see the module docs) to `view` for instances that carry every tag.
pub fn select<'a, T: AsRef<str>>(view: &'a ServiceView, tags: &[T]) -> Selection<'a> {
    let matching = || {
        view.instances
            .iter()
            .filter(|i| tags.iter().all(|t| i.has_tag(t.as_ref())))
    };
    let mut matched = 0;
    let mut live = 0;
    let mut instances = Vec::new();
    for inst in matching() {
        matched += 1;
        if inst.draining {
            continue;
        }
        live += 1;
        if inst.health() != Health::Critical && inst.weight() > 0 {
            instances.push(inst);
        }
    }
    let threshold = view.attrs.panic_threshold;
    if threshold > 0.0 && live > 0 && (instances.len() as f64) < threshold * live as f64 {
        return Selection {
            instances: matching().filter(|i| !i.draining).collect(),
            panic: true,
            matched,
        };
    }
    Selection {
        instances,
        panic: false,
        matched,
    }
}

/// Whether [`select`] would select any instance, without building the selection: some
/// instance serves, or the panic threshold is on and some instance is not draining.
pub fn any_selected<T: AsRef<str>>(view: &ServiceView, tags: &[T]) -> bool {
    let panic_on = view.attrs.panic_threshold > 0.0;
    view.instances
        .iter()
        .filter(|i| !i.draining && tags.iter().all(|t| i.has_tag(t.as_ref())))
        .any(|i| panic_on || (i.health() != Health::Critical && i.weight() > 0))
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::model::{CheckView, ServiceAttrs};

    fn inst(id: &str, health: Health, draining: bool, tags: &[&str], weight: u32) -> Instance {
        Instance {
            id: id.into(),
            service: "web".into(),
            address: "10.0.0.1".into(),
            port: 80,
            tags: tags.iter().map(|t| t.to_string()).collect(),
            meta: BTreeMap::new(),
            weight_passing: weight,
            weight_warning: 1,
            checks: vec![CheckView {
                id: "c".into(),
                name: "c".into(),
                kind: "ttl".into(),
                status: health,
                output: String::new(),
                notes: String::new(),
            }],
            draining,
            node: None,
            create_index: 0,
            modify_index: 0,
            extra: None,
        }
    }

    fn view(instances: Vec<Instance>, panic_threshold: f64) -> ServiceView {
        ServiceView {
            name: "web".into(),
            index: 1,
            instances: instances.into_iter().map(Arc::new).collect(),
            attrs: ServiceAttrs {
                panic_threshold,
                ..ServiceAttrs::default()
            },
        }
    }

    fn ids(s: &Selection) -> Vec<String> {
        s.instances.iter().map(|i| i.id.to_string()).collect()
    }

    #[test]
    fn the_rule_table() {
        use Health::*;
        let all = || {
            vec![
                inst("pass", Passing, false, &["v1"], 1),
                inst("warn", Warning, false, &["V1", "canary"], 1),
                inst("crit", Critical, false, &["v1"], 1),
                inst("drain", Passing, true, &["v1"], 1),
                inst("zero", Passing, false, &["v2"], 0),
            ]
        };
        // (tags, panic threshold, selected, panic, matched)
        type Case<'a> = (&'a [&'a str], f64, &'a [&'a str], bool, usize);
        let cases: &[Case] = &[
            (&[], 0.0, &["pass", "warn"], false, 5),
            (&["v1"], 0.0, &["pass", "warn"], false, 4),
            (&["v1", "CANARY"], 0.0, &["warn"], false, 1),
            (&["v2"], 0.0, &[], false, 1),
            (&["v3"], 0.0, &[], false, 0),
            // 2 of 4 live serve: 0.5 is not below 0.5, so no panic.
            (&[], 0.5, &["pass", "warn"], false, 5),
            // 2 of 4 live is below 0.6: every live one, critical and weight 0 included.
            (&[], 0.6, &["pass", "warn", "crit", "zero"], true, 5),
            // Only draining ones: nothing, and no panic.
            (&["v2"], 1.0, &["zero"], true, 1),
        ];
        for (tags, threshold, want, panic, matched) in cases {
            let v = view(all(), *threshold);
            let s = select(&v, tags);
            assert_eq!(ids(&s), *want, "tags {tags:?} threshold {threshold}");
            assert_eq!(s.panic, *panic, "tags {tags:?} threshold {threshold}");
            assert_eq!(s.matched, *matched, "tags {tags:?}");
            assert_eq!(any_selected(&v, tags), !want.is_empty(), "tags {tags:?}");
        }
        let only_draining = view(vec![inst("d", Passing, true, &[], 1)], 1.0);
        let s = select::<&str>(&only_draining, &[]);
        assert!(s.instances.is_empty() && !s.panic && s.matched == 1);
        assert!(!any_selected::<&str>(&only_draining, &[]));
    }
}
