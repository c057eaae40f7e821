//! The answer cache: encoded UDP replies for names in the zone, keyed by [`wire::Key`]
//! (name, type, EDNS, size limit).
//!
//! An entry remembers the [`Source`] it was computed from and is served only while that is
//! current: for a service, while the view it was computed from is still the mirror's (one
//! atomic load, see [`waymark_shared::Freshness`]); for a name whose service did not exist,
//! while no service has appeared since. Nothing has to invalidate entries when the registry
//! changes; a stale entry is simply not served and is replaced by the next answer computed.
//! The cache holds at most `capacity` entries: when full, a random quarter is dropped.

use dashmap::DashMap;
use waymark_shared::Mirror;

use super::answer::{Outcome, Source};
use super::wire::{self, Layout};

/// One cached reply.
#[derive(Debug)]
pub struct Entry {
    pub reply: Box<[u8]>,
    pub layout: Layout,
    pub outcome: Outcome,
    source: Source,
}

impl Entry {
    /// An entry for an encoded reply; `None` when the reply is not one the fast path can
    /// patch (see [`wire::layout`]).
    pub fn new(reply: Vec<u8>, source: Source, outcome: Outcome) -> Option<Entry> {
        let layout = wire::layout(&reply)?;
        Some(Entry {
            reply: reply.into_boxed_slice(),
            layout,
            outcome,
            source,
        })
    }
}

/// Encoded replies, shared by every UDP worker.
#[derive(Debug)]
pub struct AnswerCache {
    map: DashMap<Box<[u8]>, Entry, foldhash::fast::RandomState>,
    capacity: usize,
}

impl AnswerCache {
    pub fn new(capacity: usize) -> AnswerCache {
        AnswerCache {
            map: DashMap::with_hasher(Default::default()),
            capacity,
        }
    }

    /// Runs `f` on the entry for `key` if there is one and it is still current.
    pub fn with_current<R>(
        &self,
        key: &[u8],
        mirror: &Mirror,
        f: impl FnOnce(&Entry) -> R,
    ) -> Option<R> {
        let entry = self.map.get(key)?;
        entry.source.is_current(mirror).then(|| f(&entry))
    }

    /// Stores an entry, replacing any older one for the key.
    pub fn insert(&self, key: &[u8], entry: Entry) {
        if self.capacity == 0 {
            return;
        }
        if self.map.len() >= self.capacity {
            let mut rng = fastrand::Rng::new();
            self.map.retain(|_, _| rng.u8(..4) != 0);
        }
        self.map.insert(key.into(), entry);
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use hickory_proto::op::{Message, OpCode, Query};
    use hickory_proto::rr::{Name, RecordType};
    use waymark_shared::Instance;

    use super::*;

    fn instance(id: &str) -> Instance {
        serde_json::from_value(serde_json::json!({
            "id": id, "service": "web", "address": "10.0.0.1", "port": 80
        }))
        .unwrap()
    }

    fn reply() -> Vec<u8> {
        let mut m = Message::response(1, OpCode::Query);
        m.add_query(Query::query(
            Name::from_ascii("web.mesh.internal.").unwrap(),
            RecordType::A,
        ));
        m.to_vec().unwrap()
    }

    fn entry(mirror: &Mirror) -> Entry {
        let source = match mirror.service_fresh("web") {
            Some((_, fresh)) => Source::Service(fresh),
            None => Source::Absent {
                creations: mirror.creations(),
            },
        };
        Entry::new(reply(), source, Outcome::Answer).unwrap()
    }

    #[test]
    fn serves_an_entry_until_its_service_changes() {
        let mirror = Mirror::new(0);
        let cache = AnswerCache::new(10);
        cache.insert(b"k", entry(&mirror));
        assert_eq!(
            cache.with_current(b"k", &mirror, |e| e.outcome),
            Some(Outcome::Answer)
        );

        mirror.upsert(instance("web-1"));
        assert_eq!(
            cache.with_current(b"k", &mirror, |_| ()),
            None,
            "service appeared"
        );
        cache.insert(b"k", entry(&mirror));
        assert!(cache.with_current(b"k", &mirror, |_| ()).is_some());

        mirror.upsert(instance("other")).unwrap();
        mirror.upsert(instance("web-2"));
        assert_eq!(
            cache.with_current(b"k", &mirror, |_| ()),
            None,
            "service changed"
        );
        cache.insert(b"k", entry(&mirror));
        mirror.remove("web", "web-1");
        mirror.remove("web", "web-2");
        mirror.remove("web", "other");
        assert_eq!(
            cache.with_current(b"k", &mirror, |_| ()),
            None,
            "service gone"
        );
    }

    #[test]
    fn zone_entries_do_not_depend_on_services() {
        let mirror = Mirror::new(0);
        let cache = AnswerCache::new(10);
        cache.insert(
            b"z",
            Entry::new(reply(), Source::Zone, Outcome::NxDomain).unwrap(),
        );
        mirror.upsert(instance("web-1"));
        assert_eq!(
            cache.with_current(b"z", &mirror, |e| e.outcome),
            Some(Outcome::NxDomain)
        );
    }

    #[test]
    fn stays_within_its_capacity() {
        let mirror = Mirror::new(0);
        let cache = AnswerCache::new(100);
        for i in 0..1000u32 {
            cache.insert(&i.to_be_bytes(), entry(&mirror));
            assert!(cache.len() <= 100);
        }
        assert!(cache.len() > 50);
        let off = AnswerCache::new(0);
        off.insert(b"k", entry(&mirror));
        assert!(off.is_empty());
    }
}
