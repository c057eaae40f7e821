//! Virtual IPs: the range they come from and where in it a name's VIP goes.
//!
//! A service's VIP, and each of its tag subsets' VIPs, is an address in a range of loopback
//! addresses (default `127.77.0.0/16`: all of 127.0.0.0/8 is local on Linux, so a forwarder
//! listens there with no root and no iptables). The registry of record allocates them and
//! persists the allocation; this module is the pure part: parsing the range and
//! [`place`]-ing a name. A name's preferred address is a hash of the name, and when that is
//! taken the next free one after it, so a service keeps the same VIP if it is removed and
//! registered again, and an address freed by one service is seldom handed to another.

use std::fmt;
use std::net::Ipv4Addr;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// The default VIP range.
pub const DEFAULT_RANGE: &str = "127.77.0.0/16";

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VipError {
    #[error("VIP range {0:?} is not an IPv4 CIDR such as 127.77.0.0/16")]
    Syntax(String),
    #[error("VIP range {0}: the prefix must be between /8 and /30")]
    Prefix(String),
    #[error("VIP range {range}: {address} has host bits set (did you mean {network}/{prefix}?)")]
    HostBits {
        range: String,
        address: Ipv4Addr,
        network: Ipv4Addr,
        prefix: u8,
    },
}

/// An IPv4 range for VIPs. Its first (network) and last (broadcast) addresses are never
/// handed out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VipRange {
    network: Ipv4Addr,
    prefix: u8,
}

impl VipRange {
    pub fn network(&self) -> Ipv4Addr {
        self.network
    }

    pub fn prefix(&self) -> u8 {
        self.prefix
    }

    /// How many addresses can be handed out.
    pub fn capacity(&self) -> u32 {
        (1u32 << (32 - self.prefix)) - 2
    }

    /// Whether `ip` is one the range hands out.
    pub fn contains(&self, ip: Ipv4Addr) -> bool {
        let offset = u32::from(ip).wrapping_sub(u32::from(self.network));
        (1..=self.capacity()).contains(&offset)
    }

    /// Whether the range is loopback (127.0.0.0/8): addresses a forwarder binds without
    /// assigning them to an interface.
    pub fn is_loopback(&self) -> bool {
        self.network.is_loopback()
    }

    fn nth(&self, k: u32) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.network) + 1 + k)
    }
}

impl Default for VipRange {
    fn default() -> Self {
        DEFAULT_RANGE.parse().expect("the default range parses")
    }
}

impl FromStr for VipRange {
    type Err = VipError;

    fn from_str(s: &str) -> Result<Self, VipError> {
        let (addr, prefix) = s
            .trim()
            .split_once('/')
            .ok_or_else(|| VipError::Syntax(s.into()))?;
        let address: Ipv4Addr = addr.parse().map_err(|_| VipError::Syntax(s.into()))?;
        let prefix: u8 = prefix.parse().map_err(|_| VipError::Syntax(s.into()))?;
        if !(8..=30).contains(&prefix) {
            return Err(VipError::Prefix(s.into()));
        }
        let mask = u32::MAX << (32 - prefix);
        let network = Ipv4Addr::from(u32::from(address) & mask);
        if network != address {
            return Err(VipError::HostBits {
                range: s.into(),
                address,
                network,
                prefix,
            });
        }
        Ok(VipRange { network, prefix })
    }
}

impl fmt::Display for VipRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.network, self.prefix)
    }
}

impl Serialize for VipRange {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for VipRange {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// The allocation key of a service's VIP (`tag` `None`) or of one of its tag subsets:
/// lowercased, `tag.service`, the way the DNS name reads.
pub fn key(service: &str, tag: Option<&str>) -> String {
    match tag {
        Some(tag) => format!("{}.{}", tag, service).to_ascii_lowercase(),
        None => service.to_ascii_lowercase(),
    }
}

/// Where the VIP for `key` goes in `range`: its preferred address if free, else the next free
/// one after it (wrapping); `None` when every address is taken.
pub fn place(range: &VipRange, key: &str, taken: impl Fn(Ipv4Addr) -> bool) -> Option<Ipv4Addr> {
    let capacity = range.capacity();
    let start = (fnv1a(key.as_bytes()) % u64::from(capacity)) as u32;
    (0..capacity)
        .map(|step| range.nth((start + step) % capacity))
        .find(|ip| !taken(*ip))
}

/// FNV-1a, 64 bits: stable across builds and platforms, which a std hasher is not.
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use super::*;

    #[test]
    fn ranges_parse_and_refuse() {
        let r: VipRange = "127.77.0.0/16".parse().unwrap();
        assert_eq!(r, VipRange::default());
        assert_eq!(r.capacity(), 65_534);
        assert!(r.is_loopback());
        assert!(r.contains("127.77.0.1".parse().unwrap()));
        assert!(r.contains("127.77.255.254".parse().unwrap()));
        assert!(!r.contains("127.77.0.0".parse().unwrap()));
        assert!(!r.contains("127.77.255.255".parse().unwrap()));
        assert!(!r.contains("127.78.0.1".parse().unwrap()));
        assert_eq!(r.to_string(), "127.77.0.0/16");
        for (bad, says) in [
            ("127.77.0.0", "not an IPv4 CIDR"),
            ("fd00::/64", "not an IPv4 CIDR"),
            ("127.77.0.0/31", "between /8 and /30"),
            ("127.77.0.0/4", "between /8 and /30"),
            ("127.77.1.0/16", "did you mean 127.77.0.0/16"),
        ] {
            let err = bad.parse::<VipRange>().unwrap_err().to_string();
            assert!(err.contains(says), "{bad}: {err}");
        }
    }

    #[test]
    fn placement_is_stable_and_probes_past_taken_addresses() {
        let r = VipRange::default();
        let a = place(&r, "payment", |_| false).unwrap();
        assert_eq!(
            place(&r, "payment", |_| false),
            Some(a),
            "the same name, the same VIP"
        );
        assert!(r.contains(a));
        let b = place(&r, "payment", |ip| ip == a).unwrap();
        assert_eq!(u32::from(b), u32::from(a) + 1);
        assert_ne!(place(&r, "orders", |_| false), Some(a));
        assert_eq!(key("Payment", Some("V2")), "v2.payment");
    }

    #[test]
    fn a_full_range_has_no_room_and_a_small_one_fills_exactly() {
        let r: VipRange = "127.77.0.0/30".parse().unwrap();
        let mut taken = HashSet::new();
        for name in ["a", "b"] {
            let ip = place(&r, name, |ip| taken.contains(&ip)).unwrap();
            assert!(r.contains(ip));
            assert!(taken.insert(ip));
        }
        assert_eq!(place(&r, "c", |ip| taken.contains(&ip)), None);
    }
}
