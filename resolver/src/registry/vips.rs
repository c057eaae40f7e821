//! The registry's VIP table: which virtual IP each service, and each tag subset of it, has.
//!
//! A service gets its VIP when its first instance is installed, and each tag that is a valid
//! DNS label (so that `<tag>.<service>.<zone>` can name it) gets one when the first instance
//! carrying it is installed. The VIPs of a service stay while the service exists, and are freed
//! when its last instance goes. Persistence rides on the registrations: every stored
//! registration carries its service's VIP and those of its own tags ([`crate::store::StoredReg`]),
//! so a restart, a compaction and an undone write all keep the table consistent with no record
//! type of its own. Where in the range a VIP goes is [`waymark_shared::vip::place`]'s rule.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::Ipv4Addr;

use compact_str::CompactString;
use waymark_shared::vip::{self, VipRange};

use crate::dns::names;

/// VIPs by tag (`""` for the service's own), lowercased.
pub type VipMap = BTreeMap<CompactString, Ipv4Addr>;

#[derive(Debug)]
pub struct VipTable {
    range: VipRange,
    /// By lowercased service name.
    services: HashMap<CompactString, Entry>,
    taken: HashSet<Ipv4Addr>,
    /// Keys for which the range had no address left (warned once each).
    exhausted: HashSet<String>,
}

#[derive(Debug, Default)]
struct Entry {
    vips: VipMap,
    /// Installed registrations of the service.
    members: usize,
}

impl Default for VipTable {
    fn default() -> Self {
        VipTable::new(VipRange::default())
    }
}

impl VipTable {
    pub fn new(range: VipRange) -> VipTable {
        VipTable {
            range,
            services: HashMap::new(),
            taken: HashSet::new(),
            exhausted: HashSet::new(),
        }
    }

    /// Adds a registration of `service` with `tags`, which was stored with `stored` VIPs:
    /// keeps those that are in the range and free (or already this service's), allocates the
    /// missing ones, and returns the VIPs the registration must carry.
    pub fn install(&mut self, service: &str, tags: &[String], stored: &VipMap) -> VipMap {
        let key = CompactString::from(service.to_ascii_lowercase());
        let mut entry = self.services.remove(&key).unwrap_or_default();
        entry.members += 1;
        let wanted = std::iter::once(CompactString::default()).chain(
            tags.iter()
                .filter(|t| names::check_tag(t))
                .map(|t| CompactString::from(t.to_ascii_lowercase())),
        );
        let mut carried = VipMap::new();
        for tag in wanted {
            if let Some(ip) = entry.vips.get(&tag) {
                carried.insert(tag, *ip);
                continue;
            }
            let reusable = stored
                .get(&tag)
                .copied()
                .filter(|ip| self.range.contains(*ip) && !self.taken.contains(ip));
            let alloc_key = vip::key(service, (!tag.is_empty()).then_some(tag.as_str()));
            let ip = reusable
                .or_else(|| vip::place(&self.range, &alloc_key, |ip| self.taken.contains(&ip)));
            match ip {
                Some(ip) => {
                    self.taken.insert(ip);
                    entry.vips.insert(tag.clone(), ip);
                    carried.insert(tag, ip);
                }
                None => {
                    if self.exhausted.insert(alloc_key.clone()) {
                        tracing::warn!(
                            name = alloc_key,
                            range = %self.range,
                            "the VIP range is full: this name gets no VIP"
                        );
                    }
                }
            }
        }
        self.services.insert(key, entry);
        carried
    }

    /// Removes a registration of `service`; the service's VIPs are freed with its last one.
    pub fn uninstall(&mut self, service: &str) {
        let key = CompactString::from(service.to_ascii_lowercase());
        let Some(entry) = self.services.get_mut(&key) else {
            return;
        };
        entry.members = entry.members.saturating_sub(1);
        if entry.members == 0 {
            let entry = self.services.remove(&key).expect("present");
            for ip in entry.vips.values() {
                self.taken.remove(ip);
            }
        }
    }

    /// Every VIP of the service, by tag.
    pub fn of(&self, service: &str) -> VipMap {
        self.services
            .get(service.to_ascii_lowercase().as_str())
            .map(|e| e.vips.clone())
            .unwrap_or_default()
    }

    pub fn allocated(&self) -> usize {
        self.taken.len()
    }

    pub fn range(&self) -> &VipRange {
        &self.range
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tags(t: &[&str]) -> Vec<String> {
        t.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn services_and_tags_get_vips_kept_while_the_service_lives() {
        let mut t = VipTable::new(VipRange::default());
        let a = t.install(
            "Payment",
            &tags(&["v1", "not a label", "a.b"]),
            &VipMap::new(),
        );
        assert_eq!(a.len(), 2, "the service's and v1's: {a:?}");
        let b = t.install("payment", &tags(&["V2"]), &VipMap::new());
        assert_eq!(b[""], a[""], "one VIP per service");
        assert_ne!(b["v2"], a["v1"]);
        assert_eq!(t.of("PAYMENT").len(), 3);
        assert_eq!(t.allocated(), 3);
        // The tag's VIP stays while the service exists, even without the tag.
        t.uninstall("payment");
        assert_eq!(t.of("payment").len(), 3);
        t.uninstall("payment");
        assert!(t.of("payment").is_empty());
        assert_eq!(t.allocated(), 0);
    }

    #[test]
    fn stored_vips_are_kept_when_free_and_in_range() {
        let mut t = VipTable::new(VipRange::default());
        let mut stored = VipMap::new();
        stored.insert("".into(), "127.77.9.9".parse().unwrap());
        stored.insert("v1".into(), "10.0.0.1".parse().unwrap());
        let got = t.install("web", &tags(&["v1"]), &stored);
        assert_eq!(got[""], "127.77.9.9".parse::<Ipv4Addr>().unwrap());
        assert!(
            VipRange::default().contains(got["v1"]),
            "out of range: allocated again"
        );
        // Another service that was stored with a taken address gets another one.
        let other = t.install("api", &[], &stored);
        assert_ne!(other[""], got[""]);
    }

    #[test]
    fn a_full_range_leaves_names_without_vips() {
        let mut t = VipTable::new("127.77.0.0/30".parse().unwrap());
        assert_eq!(t.install("a", &[], &VipMap::new()).len(), 1);
        assert_eq!(t.install("b", &[], &VipMap::new()).len(), 1);
        assert!(t.install("c", &[], &VipMap::new()).is_empty());
        t.uninstall("a");
        assert_eq!(t.install("d", &[], &VipMap::new()).len(), 1);
    }
}
