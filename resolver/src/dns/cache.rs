//! The answer cache: encoded UDP replies for names in the zone, keyed by [`wire::Key`]
//! (name, type, EDNS, size limit).
//!
//! An entry remembers the [`Source`] it was computed from and is served only while that is
//! current: for a service, while the view it was computed from is still the mirror's (one
//! atomic load, see [`waymark_shared::Freshness`]); for a name whose service did not exist,
//! while no service has appeared since. Nothing has to invalidate entries when the registry
//! changes; a stale entry is simply not served and is replaced by the next answer computed.
//! The cache holds at most `capacity` entries: when full, a random quarter is dropped, by a
//! thread of its own, never by the UDP worker that found it full (walking 250,000 entries
//! would stall that worker for milliseconds). Meanwhile answers are served, just not cached.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;

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
    map: Arc<Map>,
    capacity: usize,
    /// Entries now (kept as inserts and evictions happen; `DashMap::len` walks the shards).
    count: Arc<AtomicUsize>,
    /// An eviction is under way.
    evicting: Arc<AtomicBool>,
}

type Map = DashMap<Box<[u8]>, Entry, foldhash::fast::RandomState>;

impl AnswerCache {
    pub fn new(capacity: usize) -> AnswerCache {
        AnswerCache {
            map: Arc::new(DashMap::with_hasher(Default::default())),
            capacity,
            count: Arc::default(),
            evicting: Arc::default(),
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

    /// Stores an entry, replacing any older one for the key. When the cache is full it
    /// starts an eviction elsewhere and stores nothing.
    pub fn insert(&self, key: &[u8], entry: Entry) {
        if self.capacity == 0 {
            return;
        }
        if self.count.load(Ordering::Relaxed) >= self.capacity {
            self.evict_in_background();
            if !self.map.contains_key(key) {
                return;
            }
        }
        if self.map.insert(key.into(), entry).is_none() {
            self.count.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Drops a random quarter of the entries on a thread of its own (one at a time).
    fn evict_in_background(&self) {
        if self.evicting.swap(true, Ordering::AcqRel) {
            return;
        }
        let (map, count, evicting) = (self.map.clone(), self.count.clone(), self.evicting.clone());
        let spawned = std::thread::Builder::new()
            .name("dns-cache-evict".into())
            .spawn(move || {
                let mut rng = fastrand::Rng::new();
                let mut removed = 0;
                map.retain(|_, _| {
                    let keep = rng.u8(..4) != 0;
                    removed += usize::from(!keep);
                    keep
                });
                count.fetch_sub(
                    removed.min(count.load(Ordering::Relaxed)),
                    Ordering::Relaxed,
                );
                evicting.store(false, Ordering::Release);
            });
        if spawned.is_err() {
            self.evicting.store(false, Ordering::Release);
        }
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

    #[test]
    fn a_full_cache_evicts_elsewhere_then_caches_again() {
        let mirror = Mirror::new(0);
        let cache = AnswerCache::new(1000);
        for i in 0..1000u32 {
            cache.insert(&i.to_be_bytes(), entry(&mirror));
        }
        assert_eq!(cache.len(), 1000);
        // Full: this insert starts the eviction and is not stored.
        cache.insert(b"new", entry(&mirror));
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while cache.evicting.load(Ordering::Acquire) && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        assert!(
            !cache.evicting.load(Ordering::Acquire),
            "eviction never ended"
        );
        let left = cache.len();
        assert!(
            (600..=900).contains(&left),
            "{left} entries after evicting a quarter"
        );
        assert_eq!(cache.count.load(Ordering::Relaxed), left);
        cache.insert(b"new", entry(&mirror));
        assert!(cache.with_current(b"new", &mirror, |_| ()).is_some());
    }
}
