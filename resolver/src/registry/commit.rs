//! Durable, then visible: what the registry does when the store has written a batch of
//! changes (publish them to the mirror, in index order) or could not (undo every change queued
//! since the last durable one, newest first, so the table is again what the mirror shows).

use std::sync::{Arc, Weak};
use std::time::Instant;

use compact_str::CompactString;
use waymark_shared::{Health, Instance, ServiceAttrs};

use super::{Inner, Registry};
use crate::store::{Sink, StoredReg};

/// A change queued to the store and not yet durable.
pub(super) struct Change {
    pub index: u64,
    pub undo: Undo,
    pub publish: Publish,
}

/// How to take a change back.
pub(super) enum Undo {
    /// Put the registration back as it was (`None`: it did not exist), restarting its checks.
    Replace {
        id: CompactString,
        before: Option<Arc<StoredReg>>,
    },
    /// Only its state changed (maintenance, check statuses): restore it in place, keeping its
    /// checks running.
    States {
        id: CompactString,
        before: Arc<StoredReg>,
    },
    /// Nothing to undo (a restart record).
    Nothing,
}

impl Undo {
    pub fn id(&self) -> &str {
        match self {
            Undo::Replace { id, .. } | Undo::States { id, .. } => id,
            Undo::Nothing => "",
        }
    }
}

/// What the mirror gets once the change is durable.
pub(super) enum Publish {
    Upsert {
        /// Boxed: an instance is large beside the other variants.
        instance: Box<Instance>,
        /// The service the instance left, when it moved.
        moved_from: Option<CompactString>,
        /// The service's attributes as of this change.
        attrs: ServiceAttrs,
    },
    Remove {
        service: CompactString,
        id: CompactString,
    },
    /// Only the index moves.
    Index,
}

/// The registry as the store's [`Sink`].
pub(super) struct Publisher(pub Weak<Registry>);

impl Sink for Publisher {
    fn durable(&self, index: u64) {
        if let Some(registry) = self.0.upgrade() {
            registry.publish_durable(index);
        }
    }

    fn failed(&self, error: &str) {
        if let Some(registry) = self.0.upgrade() {
            registry.undo_pending(error);
        }
    }
}

impl Registry {
    /// Publishes every queued change up to `index`, which the store has made durable.
    fn publish_durable(&self, index: u64) {
        let mut inner = self.lock();
        while inner.pending.front().is_some_and(|c| c.index <= index) {
            let change = inner.pending.pop_front().expect("checked");
            match change.publish {
                Publish::Upsert {
                    instance,
                    moved_from,
                    attrs,
                } => {
                    if let Some(old) = moved_from {
                        self.mirror.remove_at(change.index, &old, &instance.id);
                    }
                    self.mirror
                        .upsert_with_at(change.index, *instance, Some(attrs));
                }
                Publish::Remove { service, id } => {
                    self.mirror.remove_at(change.index, &service, &id)
                }
                Publish::Index => self.mirror.advance_to(change.index),
            }
            inner.published = change.index;
        }
        self.metrics.change_index.set(inner.published as i64);
        self.update_gauges(&inner);
    }

    /// Undoes every change not yet durable: the store will write none of them.
    fn undo_pending(&self, error: &str) {
        let mut inner = self.lock();
        // Under the lock: whatever is queued from now on is computed on the undone table.
        self.store.discard_queued();
        let undone = inner.pending.len();
        while let Some(change) = inner.pending.pop_back() {
            self.undo(&mut inner, change.undo);
        }
        inner.queued = inner.published;
        self.update_gauges(&inner);
        tracing::warn!(
            undone,
            index = inner.published,
            error,
            "changes that could not be written were undone"
        );
    }

    fn undo(&self, inner: &mut Inner, undo: Undo) {
        match undo {
            Undo::Replace { id, before } => {
                self.uninstall(inner, &id);
                if let Some(before) = before {
                    if let Err(e) = self.install(inner, before) {
                        tracing::error!(%id, error = %e, "cannot restore a registration");
                    }
                }
            }
            Undo::Nothing => {}
            Undo::States { id, before } => {
                let Some(reg) = inner.regs.get_mut(id.as_str()) else {
                    return;
                };
                for check in &mut reg.checks {
                    let Some(was) = before.checks.iter().find(|s| s.id == check.def.id) else {
                        continue;
                    };
                    if check.status != was.status {
                        check.critical_since = (was.status == Health::Critical).then(Instant::now);
                    }
                    check.status = was.status;
                    check.output = was.output.clone();
                }
                reg.stored = before;
            }
        }
    }
}
