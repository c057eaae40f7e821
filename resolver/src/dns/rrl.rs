//! Response-rate limiting (RRL), as Knot and BIND do it, so that the resolver cannot be used
//! to flood a third party whose address a query spoofs.
//!
//! Answers to one client network (a /24 for IPv4, a /56 for IPv6) are counted per second in
//! a fixed table of counters (`BUCKETS`, hashed; no allocation, no lock). Past `rate`
//! answers in a second, answers are dropped, except every `slip`-th, which is sent truncated
//! (header and question, TC set): a real client retries over TCP, which cannot be spoofed,
//! while a spoofed flood gets nothing bigger than the query. Clients in the exempt networks
//! (loopback by default) are never limited. [`slip`] cuts a reply in place.

use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use ipnet::IpNet;

const BUCKETS: usize = 1 << 16;

/// What to do with one answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    Send,
    /// Send it truncated (see [`slip`]).
    Slip,
    Drop,
}

pub struct Rrl {
    /// Per bucket: the second (high 32 bits) and the answers counted in it (low 32 bits).
    buckets: Box<[AtomicU64]>,
    rate: u32,
    slip: u32,
    exempt: Vec<IpNet>,
}

impl Rrl {
    /// `rate` answers per second per client network; every `slip`-th answer over it is sent
    /// truncated (0: none); clients in `exempt` are not limited.
    pub fn new(rate: u32, slip: u32, exempt: Vec<IpNet>) -> Rrl {
        Rrl {
            buckets: (0..BUCKETS).map(|_| AtomicU64::new(0)).collect(),
            rate,
            slip,
            exempt,
        }
    }

    pub fn is_exempt(&self, client: IpAddr) -> bool {
        let client = match client {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(client),
            v4 => v4,
        };
        self.exempt.iter().any(|n| n.contains(&client))
    }

    /// The decision for one more answer to `client` now.
    pub fn check(&self, client: IpAddr) -> Decision {
        if self.is_exempt(client) {
            return Decision::Send;
        }
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs() as u32);
        self.check_at(client, now)
    }

    /// [`Rrl::check`] at a given second (tests).
    pub fn check_at(&self, client: IpAddr, second: u32) -> Decision {
        let bucket = &self.buckets[bucket_of(client)];
        let mut current = bucket.load(Ordering::Relaxed);
        let count = loop {
            let (at, n) = ((current >> 32) as u32, current as u32);
            let n = if at == second { n.saturating_add(1) } else { 1 };
            let next = ((second as u64) << 32) | n as u64;
            match bucket.compare_exchange_weak(current, next, Ordering::Relaxed, Ordering::Relaxed)
            {
                Ok(_) => break n,
                Err(seen) => current = seen,
            }
        };
        if count <= self.rate {
            Decision::Send
        } else if self.slip > 0 && (count - self.rate).is_multiple_of(self.slip) {
            Decision::Slip
        } else {
            Decision::Drop
        }
    }
}

/// The table slot of a client's network: a /24 for IPv4, a /56 for IPv6.
fn bucket_of(client: IpAddr) -> usize {
    let key: u64 = match client {
        IpAddr::V4(v4) => u32::from(v4) as u64 >> 8,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => u32::from(v4) as u64 >> 8,
            None => (u128::from(v6) >> 72) as u64 | (1 << 63),
        },
    };
    // A multiplicative hash: spreads neighbouring networks over the table.
    (key.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 48) as usize % BUCKETS
}

/// Cuts the reply in `buf[..len]` to its header and question, with TC set and no records
/// (OPT included); returns the new length, or none when the question cannot be walked.
pub fn slip(buf: &mut [u8], len: usize) -> Option<usize> {
    if len < 12 || u16::from_be_bytes([buf[4], buf[5]]) != 1 {
        return None;
    }
    let mut at = 12;
    loop {
        let l = *buf.get(at)? as usize;
        if l == 0 {
            at += 1;
            break;
        }
        if l & 0xC0 != 0 {
            return None;
        }
        at += 1 + l;
    }
    let end = at + 4;
    if end > len {
        return None;
    }
    buf[2] |= 0x02; // TC
    for b in &mut buf[6..12] {
        *b = 0;
    }
    Some(end)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn limits_per_network_per_second_with_slip() {
        let rrl = Rrl::new(3, 2, vec!["127.0.0.0/8".parse().unwrap()]);
        let got: Vec<Decision> = (0..8)
            .map(|_| rrl.check_at(ip("198.51.100.7"), 10))
            .collect();
        use Decision::*;
        assert_eq!(got, [Send, Send, Send, Drop, Slip, Drop, Slip, Drop]);
        // The same /24 shares the budget; another network has its own.
        assert_eq!(rrl.check_at(ip("198.51.100.200"), 10), Slip);
        assert_eq!(rrl.check_at(ip("203.0.113.1"), 10), Send);
        // A new second starts afresh.
        assert_eq!(rrl.check_at(ip("198.51.100.7"), 11), Send);
        // Exempt networks are never limited.
        for _ in 0..100 {
            assert_eq!(rrl.check(ip("127.0.0.1")), Send);
        }
        // slip = 0: everything over the rate is dropped.
        let strict = Rrl::new(1, 0, vec![]);
        assert_eq!(strict.check_at(ip("192.0.2.1"), 5), Send);
        assert_eq!(strict.check_at(ip("192.0.2.1"), 5), Drop);
        assert_eq!(strict.check_at(ip("192.0.2.1"), 5), Drop);
    }

    #[test]
    fn ipv6_networks_are_slash_56() {
        let a = bucket_of(ip("2001:db8:0:100::1"));
        assert_eq!(a, bucket_of(ip("2001:db8:0:1ff::9")));
        assert_ne!(a, bucket_of(ip("2001:db8:0:200::1")));
    }

    #[test]
    fn slip_keeps_header_and_question_only() {
        use hickory_proto::op::{Message, MessageType, OpCode, Query};
        use hickory_proto::rr::{Name, RData, Record, RecordType};
        let mut m = Message::new(7, MessageType::Response, OpCode::Query);
        m.add_query(Query::query(
            Name::from_ascii("web.mesh.internal.").unwrap(),
            RecordType::A,
        ));
        for i in 0..5u8 {
            m.add_answer(Record::from_rdata(
                Name::from_ascii("web.mesh.internal.").unwrap(),
                5,
                RData::A(std::net::Ipv4Addr::new(10, 0, 0, i).into()),
            ));
        }
        let mut bytes = m.to_vec().unwrap();
        let len = bytes.len();
        let cut = slip(&mut bytes, len).unwrap();
        let back = Message::from_vec(&bytes[..cut]).unwrap();
        assert!(back.metadata.truncation);
        assert_eq!(back.metadata.id, 7);
        assert_eq!(back.queries.len(), 1);
        assert!(back.answers.is_empty() && back.additionals.is_empty());
        assert!(slip(&mut [0u8; 5], 5).is_none());
    }
}
