//! The answers of the mesh zone, computed from the registry mirror without any I/O.
//!
//! Names, under the zone (`mesh.internal.` by default), matched case-insensitively:
//!
//! | name | types | answer |
//! |---|---|---|
//! | `<zone>` | SOA, NS | the zone's SOA and NS (`ns.<zone>`) |
//! | `ns.<zone>` | A, AAAA | the resolver's own address, when known |
//! | `<service>.<zone>` | A, AAAA, SRV, ANY | the service's serving instances |
//! | `<tag>.<service>.<zone>` | A, AAAA, SRV, ANY | the serving instances with that tag |
//! | `_<service>._tcp.<zone>` | SRV | RFC 2782 form of the service's SRV records |
//! | `<instance>.instance.<service>.<zone>` | A, AAAA | one instance, while it serves |
//!
//! SRV targets are instance names, with their addresses in the additional section. A name
//! that exists with no record of the asked type (or a service with no serving instance) is
//! NODATA; anything else under the zone is NXDOMAIN. Negative answers carry the SOA, whose
//! TTL is the zone's negative TTL.

use std::net::IpAddr;
use std::sync::Arc;

use hickory_proto::op::ResponseCode;
use hickory_proto::rr::rdata::{A, AAAA, NS, SOA, SRV};
use hickory_proto::rr::{Name, RData, Record, RecordType};
use waymark_shared::{Freshness, Instance, Mirror, ServiceView};

/// The label that introduces per-instance names.
pub const INSTANCE_LABEL: &str = "instance";

/// The zone's fixed parts, built once from the config.
#[derive(Debug, Clone)]
pub struct Zone {
    /// Lowercased, fully qualified.
    pub origin: Name,
    pub ttl: u32,
    pub negative_ttl: u32,
    pub ns_name: Name,
    pub ns_address: Option<IpAddr>,
    hostmaster: Name,
}

impl Zone {
    pub fn new(origin: &str, ttl: u32, negative_ttl: u32, ns_address: Option<IpAddr>) -> Zone {
        let mut origin = Name::from_ascii(origin.trim_end_matches('.'))
            .expect("zone validated by config")
            .to_lowercase();
        origin.set_fqdn(true);
        let child = |label: &str| {
            Name::from_ascii(label)
                .and_then(|l| l.append_name(&origin))
                .expect("a label under a valid zone")
        };
        Zone {
            ns_name: child("ns"),
            hostmaster: child("hostmaster"),
            origin,
            ttl,
            negative_ttl,
            ns_address,
        }
    }

    /// The zone's SOA; the serial follows the registry's change index.
    pub fn soa(&self, serial: u64) -> Record {
        Record::from_rdata(
            self.origin.clone(),
            self.negative_ttl,
            RData::SOA(SOA::new(
                self.ns_name.clone(),
                self.hostmaster.clone(),
                serial as u32,
                3600,
                600,
                86400,
                self.negative_ttl,
            )),
        )
    }

    /// Whether a (lowercased) name is in the zone.
    pub fn contains(&self, name: &Name) -> bool {
        self.origin.zone_of(name)
    }
}

/// An authoritative answer. `additionals[i]` holds the addresses of `answers[i]`'s target,
/// so a truncated reply can drop answers together with their additional records.
#[derive(Debug, Clone)]
pub struct Answer {
    pub rcode: ResponseCode,
    pub answers: Vec<Record>,
    pub additionals: Vec<Vec<Record>>,
    pub authority: Vec<Record>,
    pub source: Source,
}

impl Answer {
    fn records(answers: Vec<Record>, additionals: Vec<Vec<Record>>) -> Answer {
        Answer {
            rcode: ResponseCode::NoError,
            answers,
            additionals,
            authority: Vec::new(),
            source: Source::Zone,
        }
    }

    fn negative(zone: &Zone, serial: u64, rcode: ResponseCode) -> Answer {
        Answer {
            rcode,
            answers: Vec::new(),
            additionals: Vec::new(),
            authority: vec![zone.soa(serial)],
            source: Source::Zone,
        }
    }

    fn from(mut self, source: Source) -> Answer {
        self.source = source;
        self
    }

    /// What kind of answer this is.
    pub fn outcome(&self) -> Outcome {
        match self.rcode {
            ResponseCode::NXDomain => Outcome::NxDomain,
            _ if self.is_nodata() => Outcome::NoData,
            _ => Outcome::Answer,
        }
    }

    /// Whether this is NODATA (a name that exists, with nothing of the asked type).
    pub fn is_nodata(&self) -> bool {
        self.rcode == ResponseCode::NoError && self.answers.is_empty()
    }
}

/// The DNS label of an instance: its ID, lowercased, with anything outside `[a-z0-9-]`
/// replaced by `-`, cut to 63 bytes.
pub fn instance_label(id: &str) -> String {
    let mut label: String = id
        .chars()
        .map(|c| {
            let c = c.to_ascii_lowercase();
            if c.is_ascii_alphanumeric() || c == '-' {
                c
            } else {
                '-'
            }
        })
        .collect();
    label.truncate(63);
    label
}

/// The kind of an answer, as metrics count it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Answer,
    NoData,
    NxDomain,
}

impl Outcome {
    /// The `outcome` label of `dns_queries`.
    pub fn label(self) -> &'static str {
        match self {
            Outcome::Answer => "answer",
            Outcome::NoData => "nodata",
            Outcome::NxDomain => "nxdomain",
        }
    }
}

/// What an answer was computed from: a cached copy of it stays right exactly as long as
/// its source is current.
#[derive(Debug, Clone)]
pub enum Source {
    /// The zone's fixed parts only. (Negative answers and the apex SOA carry the mirror's
    /// index as the SOA serial, which a cached copy must refresh.)
    Zone,
    /// One service's view, current while its freshness lasts.
    Service(Freshness),
    /// A service that did not exist, as long as no service has appeared since: the mirror's
    /// count of [`Mirror::creations`] then.
    Absent { creations: u64 },
}

impl Source {
    /// Whether an answer from this source is still right.
    pub fn is_current(&self, mirror: &Mirror) -> bool {
        match self {
            Source::Zone => true,
            Source::Service(fresh) => fresh.is_current(),
            Source::Absent { creations } => mirror.creations() == *creations,
        }
    }
}

/// Answers a query for a name inside the zone. `qname` must be lowercased and inside the
/// zone. `panic_threshold` gives a service's panic threshold (0 = off).
pub fn answer(
    zone: &Zone,
    mirror: &Mirror,
    panic_threshold: &dyn Fn(&str) -> f64,
    qname: &Name,
    qtype: RecordType,
    rng: &mut fastrand::Rng,
) -> Answer {
    let serial = mirror.index();
    let depth = qname.num_labels() as usize - zone.origin.num_labels() as usize;
    let labels: Vec<&[u8]> = qname.iter().take(depth).collect();
    let label = |i: usize| std::str::from_utf8(labels[i]).unwrap_or("");
    let nxdomain = || Answer::negative(zone, serial, ResponseCode::NXDomain);
    let nodata = || Answer::negative(zone, serial, ResponseCode::NoError);

    // The one service the name is about, if any: every answer below reads only its view.
    let service_key = match depth {
        1 if label(0) != "ns" => Some(label(0)),
        2 if label(1) == "_tcp" && label(0).starts_with('_') => Some(&label(0)[1..]),
        2 => Some(label(1)),
        3 if label(1) == INSTANCE_LABEL => Some(label(2)),
        _ => None,
    };
    let Some(key) = service_key else {
        return match depth {
            0 => match qtype {
                RecordType::SOA => Answer::records(vec![zone.soa(serial)], vec![vec![]]),
                RecordType::NS => {
                    let ns = Record::from_rdata(
                        zone.origin.clone(),
                        zone.ttl,
                        RData::NS(NS(zone.ns_name.clone())),
                    );
                    let glue = zone
                        .ns_address
                        .map(|ip| address_record(&zone.ns_name, ip, zone.ttl))
                        .into_iter()
                        .collect();
                    Answer::records(vec![ns], vec![glue])
                }
                _ => nodata(),
            },
            1 => match (qtype, zone.ns_address) {
                (RecordType::A, Some(ip @ IpAddr::V4(_)))
                | (RecordType::AAAA, Some(ip @ IpAddr::V6(_))) => {
                    Answer::records(vec![address_record(qname, ip, zone.ttl)], vec![vec![]])
                }
                _ => nodata(),
            },
            _ => nxdomain(),
        };
    };
    // Read before the lookup, so that a service created after it is always noticed.
    let creations = mirror.creations();
    let Some((view, fresh)) = mirror.service_fresh(key) else {
        return nxdomain().from(Source::Absent { creations });
    };
    let source = Source::Service(fresh);
    let answer = match depth {
        1 => service_answer(
            zone,
            &view,
            panic_threshold,
            qname,
            None,
            qtype,
            serial,
            rng,
        ),
        2 if label(1) == "_tcp" && label(0).starts_with('_') => match qtype {
            RecordType::SRV | RecordType::ANY => service_answer(
                zone,
                &view,
                panic_threshold,
                qname,
                None,
                RecordType::SRV,
                serial,
                rng,
            ),
            _ => Some(nodata()),
        },
        2 => service_answer(
            zone,
            &view,
            panic_threshold,
            qname,
            Some(label(0)),
            qtype,
            serial,
            rng,
        ),
        _ => view
            .instances
            .iter()
            .find(|i| instance_label(&i.id) == label(0))
            .map(|inst| match (inst.is_serving(), inst.ip(), qtype) {
                (true, Some(ip @ IpAddr::V4(_)), RecordType::A | RecordType::ANY)
                | (true, Some(ip @ IpAddr::V6(_)), RecordType::AAAA | RecordType::ANY) => {
                    Answer::records(vec![address_record(qname, ip, zone.ttl)], vec![vec![]])
                }
                _ => nodata(),
            }),
    };
    answer.unwrap_or_else(nxdomain).from(source)
}

/// The answer for a service (or its tagged subset); `None` when no such name exists.
#[allow(clippy::too_many_arguments)]
fn service_answer(
    zone: &Zone,
    view: &ServiceView,
    panic_threshold: &dyn Fn(&str) -> f64,
    qname: &Name,
    tag: Option<&str>,
    qtype: RecordType,
    serial: u64,
    rng: &mut fastrand::Rng,
) -> Option<Answer> {
    let candidates: Vec<&Arc<Instance>> = view
        .instances
        .iter()
        .filter(|i| tag.is_none_or(|t| i.has_tag(t)))
        .collect();
    if candidates.is_empty() {
        return None;
    }
    let mut chosen = select(&candidates, panic_threshold(&view.name));
    rng.shuffle(&mut chosen);

    let mut answers = Vec::new();
    let mut additionals = Vec::new();
    for inst in chosen {
        let Some(ip) = inst.ip() else { continue };
        match qtype {
            RecordType::A | RecordType::AAAA | RecordType::ANY => {
                let wanted = match ip {
                    IpAddr::V4(_) => qtype != RecordType::AAAA,
                    IpAddr::V6(_) => qtype != RecordType::A,
                };
                if wanted {
                    answers.push(address_record(qname, ip, zone.ttl));
                    additionals.push(Vec::new());
                }
            }
            RecordType::SRV => {
                let target = instance_name(zone, &view.name, &inst.id);
                let weight = if inst.health() == waymark_shared::Health::Warning {
                    inst.weight_warning
                } else {
                    inst.weight_passing
                };
                answers.push(Record::from_rdata(
                    qname.clone(),
                    zone.ttl,
                    RData::SRV(SRV::new(
                        1,
                        weight.min(65535) as u16,
                        inst.port,
                        target.clone(),
                    )),
                ));
                additionals.push(vec![address_record(&target, ip, zone.ttl)]);
            }
            _ => {}
        }
    }
    if answers.is_empty() {
        return Some(Answer::negative(zone, serial, ResponseCode::NoError));
    }
    Some(Answer::records(answers, additionals))
}

/// The instances to answer: the serving ones, or — when fewer than the panic threshold's
/// share of non-draining instances serve — every non-draining instance.
fn select<'a>(candidates: &[&'a Arc<Instance>], panic_threshold: f64) -> Vec<&'a Arc<Instance>> {
    let serving: Vec<_> = candidates
        .iter()
        .copied()
        .filter(|i| i.is_serving())
        .collect();
    if panic_threshold > 0.0 {
        let live: Vec<_> = candidates.iter().copied().filter(|i| !i.draining).collect();
        if !live.is_empty() && (serving.len() as f64) < panic_threshold * live.len() as f64 {
            return live;
        }
    }
    serving
}

fn instance_name(zone: &Zone, service: &str, id: &str) -> Name {
    Name::from_labels([
        instance_label(id).as_bytes(),
        INSTANCE_LABEL.as_bytes(),
        service.to_ascii_lowercase().as_bytes(),
    ])
    .and_then(|n| n.append_name(&zone.origin))
    .unwrap_or_else(|_| zone.origin.clone())
}

fn address_record(name: &Name, ip: IpAddr, ttl: u32) -> Record {
    let rdata = match ip {
        IpAddr::V4(v4) => RData::A(A(v4)),
        IpAddr::V6(v6) => RData::AAAA(AAAA(v6)),
    };
    Record::from_rdata(name.clone(), ttl, rdata)
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use waymark_shared::{CheckView, Health};

    use super::*;

    fn zone() -> Zone {
        Zone::new("mesh.internal", 5, 7, Some("127.0.0.1".parse().unwrap()))
    }

    fn inst(service: &str, id: &str, addr: &str, tags: &[&str], health: Health) -> Instance {
        Instance {
            id: id.into(),
            service: service.into(),
            address: addr.into(),
            port: 9000,
            tags: tags.iter().map(|t| t.to_string()).collect(),
            meta: BTreeMap::new(),
            weight_passing: 3,
            weight_warning: 1,
            checks: vec![CheckView {
                id: "c".into(),
                name: "c".into(),
                kind: "ttl".into(),
                status: health,
                output: String::new(),
                notes: String::new(),
            }],
            draining: false,
        }
    }

    fn mirror() -> Mirror {
        let m = Mirror::new(0);
        m.upsert(inst(
            "Payment",
            "pay-1",
            "10.0.0.1",
            &["v1"],
            Health::Passing,
        ));
        m.upsert(inst(
            "payment",
            "pay-2",
            "10.0.0.2",
            &["v2"],
            Health::Warning,
        ));
        m.upsert(inst(
            "payment",
            "pay-3",
            "10.0.0.3",
            &["v1"],
            Health::Critical,
        ));
        m.upsert(inst("payment", "pay-6", "fd00::6", &[], Health::Passing));
        m.upsert(inst("down", "down-1", "10.0.1.1", &[], Health::Critical));
        m
    }

    fn ask(m: &Mirror, name: &str, qtype: RecordType) -> Answer {
        ask_with(m, name, qtype, 0.0)
    }

    fn ask_with(m: &Mirror, name: &str, qtype: RecordType, panic: f64) -> Answer {
        let q = Name::from_ascii(name).unwrap().to_lowercase();
        answer(
            &zone(),
            m,
            &|_| panic,
            &q,
            qtype,
            &mut fastrand::Rng::with_seed(7),
        )
    }

    fn ips(a: &Answer) -> Vec<String> {
        let mut v: Vec<String> = a
            .answers
            .iter()
            .map(|r| match &r.data {
                RData::A(a) => a.0.to_string(),
                RData::AAAA(a) => a.0.to_string(),
                other => panic!("unexpected {other:?}"),
            })
            .collect();
        v.sort();
        v
    }

    #[test]
    fn service_answers_serving_instances_only() {
        let a = ask(&mirror(), "payment.mesh.internal.", RecordType::A);
        assert_eq!(a.rcode, ResponseCode::NoError);
        assert_eq!(ips(&a), ["10.0.0.1", "10.0.0.2"]);
        assert!(a.answers.iter().all(|r| r.ttl == 5));
        let a = ask(&mirror(), "PAYMENT.Mesh.Internal.", RecordType::AAAA);
        assert_eq!(ips(&a), ["fd00::6"]);
    }

    #[test]
    fn tags_select_a_subset() {
        assert_eq!(
            ips(&ask(&mirror(), "v1.payment.mesh.internal.", RecordType::A)),
            ["10.0.0.1"]
        );
        assert_eq!(
            ips(&ask(&mirror(), "v2.payment.mesh.internal.", RecordType::A)),
            ["10.0.0.2"]
        );
        let a = ask(&mirror(), "v9.payment.mesh.internal.", RecordType::A);
        assert_eq!(a.rcode, ResponseCode::NXDomain);
    }

    #[test]
    fn known_service_without_serving_instances_is_nodata() {
        let a = ask(&mirror(), "down.mesh.internal.", RecordType::A);
        assert!(a.is_nodata());
        assert_eq!(a.authority.len(), 1);
        assert_eq!(a.authority[0].record_type(), RecordType::SOA);
        assert_eq!(a.authority[0].ttl, 7);
        let a = ask(&mirror(), "payment.mesh.internal.", RecordType::TXT);
        assert!(a.is_nodata());
    }

    #[test]
    fn unknown_names_are_nxdomain() {
        for name in [
            "nope.mesh.internal.",
            "a.b.c.d.mesh.internal.",
            "x.instance.payment.mesh.internal.",
        ] {
            let a = ask(&mirror(), name, RecordType::A);
            assert_eq!(a.rcode, ResponseCode::NXDomain, "{name}");
            assert_eq!(a.authority[0].record_type(), RecordType::SOA);
        }
    }

    #[test]
    fn srv_has_targets_and_their_addresses() {
        for name in ["payment.mesh.internal.", "_payment._tcp.mesh.internal."] {
            let a = ask(&mirror(), name, RecordType::SRV);
            assert_eq!(a.answers.len(), 3, "{name}");
            for (ans, add) in a.answers.iter().zip(&a.additionals) {
                let RData::SRV(srv) = &ans.data else { panic!() };
                assert_eq!(srv.port, 9000);
                assert!(srv
                    .target
                    .to_string()
                    .ends_with(".instance.payment.mesh.internal."));
                assert_eq!(add[0].name, srv.target);
            }
        }
        let a = ask(&mirror(), "_payment._tcp.mesh.internal.", RecordType::A);
        assert!(a.is_nodata());
    }

    #[test]
    fn instance_names_answer_while_serving() {
        let a = ask(
            &mirror(),
            "pay-1.instance.payment.mesh.internal.",
            RecordType::A,
        );
        assert_eq!(ips(&a), ["10.0.0.1"]);
        let a = ask(
            &mirror(),
            "pay-3.instance.payment.mesh.internal.",
            RecordType::A,
        );
        assert!(a.is_nodata());
    }

    #[test]
    fn apex_has_soa_and_ns() {
        let a = ask(&mirror(), "mesh.internal.", RecordType::SOA);
        assert_eq!(a.answers[0].record_type(), RecordType::SOA);
        let a = ask(&mirror(), "mesh.internal.", RecordType::NS);
        assert_eq!(a.answers[0].record_type(), RecordType::NS);
        assert_eq!(a.additionals[0].len(), 1);
        assert_eq!(
            ips(&ask(&mirror(), "ns.mesh.internal.", RecordType::A)),
            ["127.0.0.1"]
        );
        assert!(ask(&mirror(), "mesh.internal.", RecordType::A).is_nodata());
    }

    #[test]
    fn draining_is_never_answered_and_panic_mode_answers_the_rest() {
        let m = mirror();
        let mut i = inst("payment", "pay-1", "10.0.0.1", &["v1"], Health::Passing);
        i.draining = true;
        m.upsert(i);
        assert_eq!(
            ips(&ask(&m, "payment.mesh.internal.", RecordType::A)),
            ["10.0.0.2"]
        );
        // 1 of 2 non-draining IPv4 instances serve... plus one IPv6: 2 of 3 serve.
        assert_eq!(
            ips(&ask_with(&m, "payment.mesh.internal.", RecordType::A, 0.5)),
            ["10.0.0.2"]
        );
        // Under a 0.9 threshold, panic: every non-draining instance, never the draining one.
        assert_eq!(
            ips(&ask_with(&m, "payment.mesh.internal.", RecordType::A, 0.9)),
            ["10.0.0.2", "10.0.0.3"]
        );
        assert!(
            ask_with(&m, "down.mesh.internal.", RecordType::A, 0.5)
                .answers
                .len()
                == 1
        );
    }

    #[test]
    fn answers_are_shuffled() {
        let m = Mirror::new(0);
        for n in 0..10 {
            m.upsert(inst(
                "big",
                &format!("b{n}"),
                &format!("10.0.2.{n}"),
                &[],
                Health::Passing,
            ));
        }
        let q = Name::from_ascii("big.mesh.internal.").unwrap();
        let mut rng = fastrand::Rng::with_seed(1);
        let first = answer(&zone(), &m, &|_| 0.0, &q, RecordType::A, &mut rng);
        let differs = (0..5)
            .map(|_| answer(&zone(), &m, &|_| 0.0, &q, RecordType::A, &mut rng).answers)
            .any(|a| a != first.answers);
        assert!(differs);
    }

    #[test]
    fn instance_labels_are_dns_safe() {
        assert_eq!(instance_label("Web:10.0.0.1:80"), "web-10-0-0-1-80");
        assert_eq!(instance_label(&"x".repeat(80)).len(), 63);
    }

    #[test]
    fn answers_say_what_they_were_computed_from() {
        let m = mirror();
        let a = ask(&m, "payment.mesh.internal.", RecordType::A);
        assert!(matches!(a.source, Source::Service(_)));
        assert!(a.source.is_current(&m));
        let nx = ask(&m, "nosuch.mesh.internal.", RecordType::A);
        assert!(matches!(nx.source, Source::Absent { .. }));
        let apex = ask(&m, "mesh.internal.", RecordType::SOA);
        assert!(matches!(apex.source, Source::Zone));

        m.upsert(inst("payment", "pay-9", "10.0.0.9", &[], Health::Passing));
        assert!(!a.source.is_current(&m), "the service changed");
        assert!(nx.source.is_current(&m), "no service appeared");
        m.upsert(inst("other", "other-1", "10.0.0.10", &[], Health::Passing));
        assert!(!nx.source.is_current(&m), "a service appeared");
        assert!(apex.source.is_current(&m));
    }
}
