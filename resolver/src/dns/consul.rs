//! Consul's DNS names (optional, `[dns] consul_names`), answered from the same registry, with
//! the same health rules and the same answers as Waymark's own names, for teams whose
//! configs say `payment.service.consul`:
//!
//! | Consul name | answered as |
//! |---|---|
//! | `<service>.service[.<dc>].<domain>` | `<service>.<zone>` |
//! | `<tag>.<service>.service[.<dc>].<domain>` | `<tag>.<service>.<zone>` |
//! | `_<service>._tcp.service[.<dc>].<domain>` (SRV) | `_<service>._tcp.<zone>` |
//! | `_<service>._<tag>.service[.<dc>].<domain>` (SRV) | `<tag>.<service>.<zone>` |
//! | `<node>.node[.<dc>].<domain>` | the node's address (see [`crate::nodes`]) |
//! | `*.query[.<dc>].<domain>` | REFUSED: prepared queries are not supported |
//!
//! A Consul name is translated to the Waymark name ([`classify`], pure) and answered by
//! [`super::answer::answer`]; the answer's owner names are the Consul name asked, and its
//! negative answers carry the Consul domain's SOA. SRV targets are Waymark's instance names
//! (which this server answers), not Consul's `<node>.node` names: an instance is not a node
//! here. Another datacenter's names are NXDOMAIN: this registry is one datacenter.

use std::net::IpAddr;

use hickory_proto::op::ResponseCode;
use hickory_proto::rr::{Name, RData, Record, RecordType};
use waymark_shared::Mirror;

use super::answer::{self, Answer, Source, Zone};
use crate::nodes;

/// The Consul domain's settings.
#[derive(Debug, Clone)]
pub struct ConsulNames {
    /// The Consul domain (`consul.`), as a zone of its own: its SOA, NS and TTLs.
    pub zone: Zone,
    /// The datacenter, lowercased: the optional label after `service`, `node`, `query`.
    pub datacenter: String,
    /// This host as a node (its name and address).
    pub node_name: String,
    pub node_address: String,
}

/// What a Consul name is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Lookup {
    /// The domain's apex.
    Apex,
    /// Answered as this Waymark name (labels under the zone), asked with this type.
    Mesh {
        labels: Vec<String>,
        qtype: RecordType,
    },
    /// A node's address.
    Node(String),
    /// A prepared query: refused.
    Query,
    /// A name that exists with no records (`service.consul`, an RFC 2782 name asked for
    /// another type than SRV).
    NoData,
    NxDomain,
}

/// Classifies a Consul name: `labels` are the (lowercased) labels under the domain, from the
/// leftmost.
pub fn classify(labels: &[&str], qtype: RecordType, datacenter: &str) -> Lookup {
    const KINDS: [&str; 3] = ["service", "node", "query"];
    if labels.is_empty() {
        return Lookup::Apex;
    }
    // `[...].<kind>[.<dc>]`: the kind is the last label, or the one before the datacenter.
    let n = labels.len();
    let (kind, rest) = if KINDS.contains(&labels[n - 1]) {
        (labels[n - 1], &labels[..n - 1])
    } else if n >= 2 && KINDS.contains(&labels[n - 2]) {
        if labels[n - 1] != datacenter {
            return Lookup::NxDomain;
        }
        (labels[n - 2], &labels[..n - 2])
    } else if n == 1 && labels[0] == datacenter {
        // `<dc>.<domain>`: the empty non-terminal above nothing Consul defines; NODATA keeps
        // RFC 9156 resolvers going.
        return Lookup::NoData;
    } else {
        return Lookup::NxDomain;
    };
    let mesh = |labels: Vec<&str>, qtype| Lookup::Mesh {
        labels: labels.into_iter().map(str::to_string).collect(),
        qtype,
    };
    // A label that can be a service or a tag; `ns` alone is the zone's name server, so it is
    // no service (it may be a tag).
    let plain = |l: &str| !l.is_empty() && !l.starts_with('_');
    let service_label = |l: &str| plain(l) && l != "ns";
    match (kind, rest) {
        ("query", _) => Lookup::Query,
        (_, []) => Lookup::NoData,
        ("node", [node]) => Lookup::Node(node.to_string()),
        ("service", [service]) if service_label(service) => mesh(vec![service], qtype),
        ("service", [first, second]) if first.starts_with('_') && second.starts_with('_') => {
            // RFC 2782: `_<service>._<proto or tag>`.
            let (service, tag) = (&first[1..], &second[1..]);
            if !service_label(service) || tag.is_empty() {
                return Lookup::NxDomain;
            }
            match qtype {
                RecordType::SRV | RecordType::ANY => {
                    if tag == "tcp" {
                        mesh(vec![first, "_tcp"], RecordType::SRV)
                    } else {
                        mesh(vec![tag, service], RecordType::SRV)
                    }
                }
                _ => Lookup::NoData,
            }
        }
        ("service", [tag, service]) if plain(tag) && service_label(service) => {
            mesh(vec![tag, service], qtype)
        }
        _ => Lookup::NxDomain,
    }
}

impl ConsulNames {
    /// Whether a (lowercased) name is under the Consul domain.
    pub fn contains(&self, name: &Name) -> bool {
        self.zone.contains(name)
    }

    /// Answers a query for a name under the Consul domain (`qname` lowercased).
    pub fn answer(
        &self,
        mesh: &Zone,
        mirror: &Mirror,
        qname: &Name,
        qtype: RecordType,
        rng: &mut fastrand::Rng,
        vip_ttl: Option<u32>,
    ) -> Answer {
        let serial = mirror.index();
        if matches!(qtype, RecordType::AXFR | RecordType::IXFR) {
            return Answer::refused();
        }
        let depth = qname.iter().count() - self.zone.origin.num_labels() as usize;
        let labels: Vec<&str> = qname
            .iter()
            .take(depth)
            .map(|l| std::str::from_utf8(l).unwrap_or(""))
            .collect();
        match classify(&labels, qtype, &self.datacenter) {
            Lookup::Apex => answer::apex(&self.zone, serial, qtype),
            Lookup::NoData => Answer::negative(&self.zone, serial, ResponseCode::NoError),
            Lookup::NxDomain => Answer::negative(&self.zone, serial, ResponseCode::NXDomain),
            Lookup::Query => Answer::refused(),
            Lookup::Node(node) => self.node_answer(mirror, qname, &node, qtype, serial),
            Lookup::Mesh { labels, qtype } => {
                let Some(name) = Name::from_labels(labels.iter().map(|l| l.as_bytes()))
                    .ok()
                    .and_then(|n| n.append_name(&mesh.origin).ok())
                else {
                    return Answer::negative(&self.zone, serial, ResponseCode::NXDomain);
                };
                let mut a = answer::answer(mesh, mirror, &name, qtype, rng, vip_ttl);
                for r in a.answers.iter_mut() {
                    if r.name == name {
                        r.name = qname.clone();
                    }
                }
                if !a.authority.is_empty() {
                    a.authority = vec![self.zone.soa(serial)];
                }
                a
            }
        }
    }

    /// `<node>.node.<domain>`: the node's address (a CNAME when it is a host name).
    fn node_answer(
        &self,
        mirror: &Mirror,
        qname: &Name,
        node: &str,
        qtype: RecordType,
        serial: u64,
    ) -> Answer {
        let views = mirror.services();
        let empty = Default::default();
        let this = nodes::This {
            name: &self.node_name,
            address: &self.node_address,
            meta: &empty,
        };
        let instances = views.iter().flat_map(|v| v.instances.iter().map(|i| &**i));
        let Some(found) = nodes::find(instances, &this, node) else {
            return Answer::negative(&self.zone, serial, ResponseCode::NXDomain)
                .from(Source::Absent {
                    creations: mirror.creations(),
                })
                .uncacheable();
        };
        let ttl = self.zone.ttl;
        let record = match (found.address.parse::<IpAddr>(), qtype) {
            (Ok(ip @ IpAddr::V4(_)), RecordType::A | RecordType::ANY)
            | (Ok(ip @ IpAddr::V6(_)), RecordType::AAAA | RecordType::ANY) => {
                Some(answer::address_record(qname, ip, ttl))
            }
            (Ok(_), _) => None,
            (Err(_), _) => answer::host_name(&found.address).map(|target| {
                Record::from_rdata(
                    qname.clone(),
                    ttl,
                    RData::CNAME(hickory_proto::rr::rdata::CNAME(target)),
                )
            }),
        };
        match record {
            Some(r) => Answer::records(vec![r], vec![vec![]]).uncacheable(),
            None => Answer::negative(&self.zone, serial, ResponseCode::NoError).uncacheable(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mesh(labels: &[&str], qtype: RecordType) -> Lookup {
        Lookup::Mesh {
            labels: labels.iter().map(|l| l.to_string()).collect(),
            qtype,
        }
    }

    #[test]
    fn consul_names_translate_to_waymark_names() {
        use RecordType::{A, AAAA, SRV};
        let cases: &[(&[&str], RecordType, Lookup)] = &[
            (&[], A, Lookup::Apex),
            (&["web", "service"], A, mesh(&["web"], A)),
            (&["web", "service", "dc1"], AAAA, mesh(&["web"], AAAA)),
            (&["web", "service", "dc2"], A, Lookup::NxDomain),
            (&["v1", "web", "service"], A, mesh(&["v1", "web"], A)),
            (
                &["v1", "web", "service", "dc1"],
                SRV,
                mesh(&["v1", "web"], SRV),
            ),
            (
                &["_web", "_tcp", "service"],
                SRV,
                mesh(&["_web", "_tcp"], SRV),
            ),
            (
                &["_web", "_v1", "service", "dc1"],
                SRV,
                mesh(&["v1", "web"], SRV),
            ),
            (&["_web", "_tcp", "service"], A, Lookup::NoData),
            (&["_web", "_", "service"], SRV, Lookup::NxDomain),
            (&["_tcp", "service"], A, Lookup::NxDomain),
            (&["ns", "service"], A, Lookup::NxDomain),
            (&["ns", "web", "service"], A, mesh(&["ns", "web"], A)),
            (&["_web", "_ns", "service"], SRV, mesh(&["ns", "web"], SRV)),
            (&["_ns", "_tcp", "service"], SRV, Lookup::NxDomain),
            (&["a", "b", "web", "service"], A, Lookup::NxDomain),
            (&["service"], A, Lookup::NoData),
            (&["service", "dc1"], A, Lookup::NoData),
            (&["dc1"], A, Lookup::NoData),
            (&["h1", "node"], A, Lookup::Node("h1".into())),
            (&["h1", "node", "dc1"], A, Lookup::Node("h1".into())),
            (&["h1", "node", "dc9"], A, Lookup::NxDomain),
            (&["node"], A, Lookup::NoData),
            (&["db", "query"], A, Lookup::Query),
            (&["db", "query", "dc1"], SRV, Lookup::Query),
            (&["web"], A, Lookup::NxDomain),
            (&["web", "addr"], A, Lookup::NxDomain),
        ];
        for (labels, qtype, want) in cases {
            assert_eq!(classify(labels, *qtype, "dc1"), *want, "{labels:?} {qtype}");
        }
    }
}
