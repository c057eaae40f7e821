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
//! SRV targets are instance names, with their addresses in the additional section. An
//! instance whose address is a host name is answered with a CNAME to it (see
//! [`super::names`]), and is its own SRV target. A name that exists with no record of the
//! asked type (or a service with no serving instance) is NODATA, and so are the empty
//! non-terminals `_tcp.<zone>` and `instance.<service>.<zone>` (RFC 9156 resolvers ask for
//! every ancestor of a name); anything else under the zone is NXDOMAIN. Negative answers
//! carry the SOA, whose TTL is the zone's negative TTL. Zone transfers (AXFR, IXFR) are
//! REFUSED.

use std::net::IpAddr;

use hickory_proto::op::ResponseCode;
use hickory_proto::rr::rdata::{A, AAAA, CNAME, NS, SOA, SRV};
use hickory_proto::rr::{Name, RData, Record, RecordType};
use waymark_shared::select::select;
use waymark_shared::{Freshness, Instance, Mirror, ServiceView};

use super::names::{self, Target};
pub use super::names::{instance_label, INSTANCE_LABEL};

/// The empty non-terminal above every `_<service>._tcp.<zone>` name.
const TCP_LABEL: &str = "_tcp";

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
    /// False when the answer is one of several equally right ones that a cached copy would
    /// pin (a CNAME chosen among several host names).
    pub cacheable: bool,
}

impl Answer {
    pub(super) fn records(answers: Vec<Record>, additionals: Vec<Vec<Record>>) -> Answer {
        Answer {
            rcode: ResponseCode::NoError,
            answers,
            additionals,
            authority: Vec::new(),
            source: Source::Zone,
            cacheable: true,
        }
    }

    pub(super) fn negative(zone: &Zone, serial: u64, rcode: ResponseCode) -> Answer {
        Answer {
            rcode,
            answers: Vec::new(),
            additionals: Vec::new(),
            authority: vec![zone.soa(serial)],
            source: Source::Zone,
            cacheable: true,
        }
    }

    /// A refusal: no records at all.
    pub(super) fn refused() -> Answer {
        Answer {
            rcode: ResponseCode::Refused,
            answers: Vec::new(),
            additionals: Vec::new(),
            authority: Vec::new(),
            source: Source::Zone,
            cacheable: true,
        }
    }

    pub(super) fn from(mut self, source: Source) -> Answer {
        self.source = source;
        self
    }

    /// An answer no cached copy may serve (its source does not track what it reads).
    pub(super) fn uncacheable(mut self) -> Answer {
        self.cacheable = false;
        self
    }

    /// What kind of answer this is.
    pub fn outcome(&self) -> Outcome {
        match self.rcode {
            ResponseCode::NXDomain => Outcome::NxDomain,
            ResponseCode::Refused => Outcome::Refused,
            _ if self.is_nodata() => Outcome::NoData,
            _ => Outcome::Answer,
        }
    }

    /// Whether this is NODATA (a name that exists, with nothing of the asked type).
    pub fn is_nodata(&self) -> bool {
        self.rcode == ResponseCode::NoError && self.answers.is_empty()
    }
}

/// The kind of an answer, as metrics count it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Answer,
    NoData,
    NxDomain,
    Refused,
}

impl Outcome {
    /// The `outcome` label of `dns_queries`.
    pub fn label(self) -> &'static str {
        match self {
            Outcome::Answer => "answer",
            Outcome::NoData => "nodata",
            Outcome::NxDomain => "nxdomain",
            Outcome::Refused => "refused",
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
/// zone. With `vip_ttl`, service names that have a VIP are answered with it, with that TTL
/// (VIP mode, see [`vip_answer`]); without, with their instances.
pub fn answer(
    zone: &Zone,
    mirror: &Mirror,
    qname: &Name,
    qtype: RecordType,
    rng: &mut fastrand::Rng,
    vip_ttl: Option<u32>,
) -> Answer {
    let serial = mirror.index();
    // Every label counts: hickory's `num_labels` leaves out a leading `*`, which is an
    // ordinary label here.
    let depth = qname.iter().count() - zone.origin.num_labels() as usize;
    let labels: Vec<&[u8]> = qname.iter().take(depth).collect();
    let label = |i: usize| std::str::from_utf8(labels[i]).unwrap_or("");
    let nxdomain = || Answer::negative(zone, serial, ResponseCode::NXDomain);
    let nodata = || Answer::negative(zone, serial, ResponseCode::NoError);

    if matches!(qtype, RecordType::AXFR | RecordType::IXFR) {
        return Answer::refused();
    }

    // The one service the name is about, if any: every answer below reads only its view.
    let service_key = match depth {
        1 if label(0) != "ns" && label(0) != TCP_LABEL => Some(label(0)),
        2 if label(1) == TCP_LABEL && label(0).starts_with('_') => Some(&label(0)[1..]),
        2 => Some(label(1)),
        3 if label(1) == INSTANCE_LABEL => Some(label(2)),
        _ => None,
    };
    let Some(key) = service_key else {
        return match depth {
            0 => apex(zone, serial, qtype),
            // `_tcp.<zone>`: the empty non-terminal above the RFC 2782 names.
            1 if label(0) == TCP_LABEL => nodata(),
            1 => match (qtype, zone.ns_address) {
                (RecordType::A | RecordType::ANY, Some(ip @ IpAddr::V4(_)))
                | (RecordType::AAAA | RecordType::ANY, Some(ip @ IpAddr::V6(_))) => {
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
    let service = |tag: Option<&str>, qtype: RecordType, rng: &mut fastrand::Rng| {
        service_answer(zone, &view, qname, tag, qtype, serial, rng, vip_ttl)
    };
    let answer = match depth {
        1 => service(None, qtype, rng),
        2 if label(1) == TCP_LABEL && label(0).starts_with('_') => match qtype {
            RecordType::SRV | RecordType::ANY => service(None, RecordType::SRV, rng),
            _ => Some(nodata()),
        },
        // `instance.<service>` is the empty non-terminal above the instance names (unless
        // some instance has the tag `instance`).
        2 => service(Some(label(0)), qtype, rng)
            .or_else(|| (label(0) == INSTANCE_LABEL).then(nodata)),
        _ => view
            .instances
            .iter()
            .find(|i| names::label_matches(&i.id, labels[0]))
            .map(|inst| instance_answer(zone, inst, qname, qtype).unwrap_or_else(nodata)),
    };
    answer.unwrap_or_else(nxdomain).from(source)
}

/// The zone apex: its SOA and NS, both for ANY.
pub(super) fn apex(zone: &Zone, serial: u64, qtype: RecordType) -> Answer {
    let ns = || {
        Record::from_rdata(
            zone.origin.clone(),
            zone.ttl,
            RData::NS(NS(zone.ns_name.clone())),
        )
    };
    let glue = || -> Vec<Record> {
        zone.ns_address
            .map(|ip| address_record(&zone.ns_name, ip, zone.ttl))
            .into_iter()
            .collect()
    };
    match qtype {
        RecordType::SOA => Answer::records(vec![zone.soa(serial)], vec![vec![]]),
        RecordType::NS => Answer::records(vec![ns()], vec![glue()]),
        RecordType::ANY => Answer::records(vec![zone.soa(serial), ns()], vec![vec![], glue()]),
        _ => Answer::negative(zone, serial, ResponseCode::NoError),
    }
}

/// An instance name's records, while the instance serves: its address, or a CNAME to its
/// host name (which answers every type). `None`: NODATA.
fn instance_answer(
    zone: &Zone,
    inst: &Instance,
    qname: &Name,
    qtype: RecordType,
) -> Option<Answer> {
    if !inst.is_serving() {
        return None;
    }
    let record = match (target_for(inst, qtype)?, qtype) {
        (Target::Ip(ip @ IpAddr::V4(_)), RecordType::A | RecordType::ANY)
        | (Target::Ip(ip @ IpAddr::V6(_)), RecordType::AAAA | RecordType::ANY) => {
            address_record(qname, ip, zone.ttl)
        }
        (Target::Ip(_), _) => return None,
        (Target::Host(host), _) => cname_record(qname, &host_name(&host)?, zone.ttl),
    };
    Some(Answer::records(vec![record], vec![vec![]]))
}

/// The answer for a service (or its tagged subset); `None` when no such name exists.
///
/// Addresses come from the instances whose address is an IP. When none of the chosen
/// instances has one but some have host names, the name is a CNAME to one of those host
/// names (as Consul answers), chosen at random per query, for every type but SRV.
#[allow(clippy::too_many_arguments)]
fn service_answer(
    zone: &Zone,
    view: &ServiceView,
    qname: &Name,
    tag: Option<&str>,
    qtype: RecordType,
    serial: u64,
    rng: &mut fastrand::Rng,
    vip_ttl: Option<u32>,
) -> Option<Answer> {
    let tags: &[&str] = match &tag {
        Some(t) => std::slice::from_ref(t),
        None => &[],
    };
    let selection = select(view, tags);
    if selection.matched == 0 {
        return None;
    }
    if let Some(ttl) = vip_ttl {
        let vip = match tag {
            Some(t) => view.attrs.tag_vip(t),
            None => view.attrs.service_vip(),
        };
        if let Some(vip) = vip {
            let target = service_name(zone, &view.name, tag);
            let ports = selection.instances.iter().map(|i| i.port);
            return Some(vip_answer(
                zone, qname, &target, vip, ports, qtype, ttl, serial,
            ));
        }
    }
    let mut chosen = selection.instances;
    rng.shuffle(&mut chosen);

    let mut answers = Vec::new();
    let mut additionals = Vec::new();
    let mut any_ip = false;
    let mut hosts = Vec::new();
    for inst in chosen {
        let Some(target) = target_for(inst, qtype) else {
            continue;
        };
        match (qtype, target) {
            (RecordType::A | RecordType::AAAA | RecordType::ANY, Target::Ip(ip)) => {
                any_ip = true;
                let wanted = match ip {
                    IpAddr::V4(_) => qtype != RecordType::AAAA,
                    IpAddr::V6(_) => qtype != RecordType::A,
                };
                if wanted {
                    answers.push(address_record(qname, ip, zone.ttl));
                    additionals.push(Vec::new());
                }
            }
            (RecordType::SRV, target) => {
                let weight = if inst.health() == waymark_shared::Health::Warning {
                    inst.weight_warning
                } else {
                    inst.weight_passing
                };
                let (name, glue) = match target {
                    Target::Ip(ip) => {
                        let name = instance_name(zone, &view.name, &inst.id);
                        let glue = vec![address_record(&name, ip, zone.ttl)];
                        (name, glue)
                    }
                    Target::Host(host) => {
                        let Some(name) = host_name(&host) else {
                            continue;
                        };
                        (name, Vec::new())
                    }
                };
                answers.push(Record::from_rdata(
                    qname.clone(),
                    zone.ttl,
                    RData::SRV(SRV::new(1, weight.min(65535) as u16, inst.port, name)),
                ));
                additionals.push(glue);
            }
            (_, Target::Ip(_)) => any_ip = true,
            (_, Target::Host(host)) => hosts.push(host),
        }
    }
    // A name whose instances all have host names is a CNAME, for every type but SRV.
    if !any_ip && qtype != RecordType::SRV {
        let several = hosts.len() > 1;
        if let Some(name) = hosts.first().and_then(|h| host_name(h)) {
            let mut cname =
                Answer::records(vec![cname_record(qname, &name, zone.ttl)], vec![vec![]]);
            cname.cacheable = !several;
            return Some(cname);
        }
    }
    if answers.is_empty() {
        return Some(Answer::negative(zone, serial, ResponseCode::NoError));
    }
    Some(Answer::records(answers, additionals))
}

/// The address an instance is answered with for `qtype`: as Consul's DNS does, an A query
/// takes the instance's `lan_ipv4` tagged address and an AAAA query its `lan_ipv6` one when
/// it has them (a dual-stack instance registered with one `Address`); otherwise its address.
fn target_for(inst: &Instance, qtype: RecordType) -> Option<Target> {
    let tagged = match qtype {
        RecordType::A => "lan_ipv4",
        RecordType::AAAA => "lan_ipv6",
        _ => return target_of(inst),
    };
    let ip = inst
        .tagged_addresses()
        .and_then(|t| t.get(tagged))
        .and_then(|a| a.address.parse::<IpAddr>().ok())
        .filter(|ip| ip.is_ipv4() == (qtype == RecordType::A));
    match ip {
        Some(ip) => Some(Target::Ip(ip)),
        None => target_of(inst),
    }
}

/// What an instance's address is: an IP, a host name, or (not answerable) neither.
fn target_of(inst: &Instance) -> Option<Target> {
    match inst.ip() {
        Some(ip) => Some(Target::Ip(ip)),
        None => names::check_address(&inst.address).ok(),
    }
}

/// A host name (as [`names::check_address`] returns it) as a fully qualified name.
pub(super) fn host_name(host: &str) -> Option<Name> {
    let mut name = Name::from_ascii(host).ok()?;
    name.set_fqdn(true);
    Some(name)
}

fn cname_record(name: &Name, target: &Name, ttl: u32) -> Record {
    Record::from_rdata(name.clone(), ttl, RData::CNAME(CNAME(target.clone())))
}

/// A service name (or a tag subset's) in VIP mode: the VIP, which never changes while the
/// service exists, with the long `ttl`; SRV records point at the name itself (`target`), one
/// per port that the selected instances serve, with the VIP as glue. AAAA and other types are
/// NODATA: VIPs are IPv4.
#[allow(clippy::too_many_arguments)]
fn vip_answer(
    zone: &Zone,
    qname: &Name,
    target: &Name,
    vip: std::net::Ipv4Addr,
    ports: impl Iterator<Item = u16>,
    qtype: RecordType,
    ttl: u32,
    serial: u64,
) -> Answer {
    let address = |name: &Name| Record::from_rdata(name.clone(), ttl, RData::A(A(vip)));
    match qtype {
        RecordType::A | RecordType::ANY => Answer::records(vec![address(qname)], vec![vec![]]),
        RecordType::SRV => {
            let ports: std::collections::BTreeSet<u16> = ports.collect();
            if ports.is_empty() {
                return Answer::negative(zone, serial, ResponseCode::NoError);
            }
            let answers = ports
                .iter()
                .map(|port| {
                    Record::from_rdata(
                        qname.clone(),
                        ttl,
                        RData::SRV(SRV::new(1, 1, *port, target.clone())),
                    )
                })
                .collect();
            let glue = ports.iter().map(|_| vec![address(target)]).collect();
            Answer::records(answers, glue)
        }
        _ => Answer::negative(zone, serial, ResponseCode::NoError),
    }
}

/// `<service>.<zone>`, or `<tag>.<service>.<zone>`, lowercased.
fn service_name(zone: &Zone, service: &str, tag: Option<&str>) -> Name {
    let service = service.to_ascii_lowercase();
    let tag = tag.map(str::to_ascii_lowercase);
    let labels: Vec<&[u8]> = tag
        .iter()
        .map(|t| t.as_bytes())
        .chain(std::iter::once(service.as_bytes()))
        .collect();
    Name::from_labels(labels)
        .and_then(|n| n.append_name(&zone.origin))
        .unwrap_or_else(|_| zone.origin.clone())
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

pub(super) fn address_record(name: &Name, ip: IpAddr, ttl: u32) -> Record {
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
            node: None,
            create_index: 0,
            modify_index: 0,
            extra: None,
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
        for view in m.services() {
            let attrs = waymark_shared::ServiceAttrs {
                panic_threshold: panic,
                ..view.attrs.clone()
            };
            m.set_attrs(&view.name, attrs);
        }
        ask_in(m, name, qtype, None)
    }

    fn ask_in(m: &Mirror, name: &str, qtype: RecordType, vip_ttl: Option<u32>) -> Answer {
        let q = Name::from_ascii(name).unwrap().to_lowercase();
        answer(
            &zone(),
            m,
            &q,
            qtype,
            &mut fastrand::Rng::with_seed(7),
            vip_ttl,
        )
    }

    #[test]
    fn vip_mode_answers_the_vip_with_its_ttl_and_srv_through_it() {
        let m = mirror();
        let mut attrs = m.service("payment").unwrap().attrs.clone();
        attrs.vips.insert("".into(), "127.77.0.5".parse().unwrap());
        attrs
            .vips
            .insert("v1".into(), "127.77.0.6".parse().unwrap());
        m.set_attrs("payment", attrs);
        let vip = |name, qtype| ask_in(&m, name, qtype, Some(300));
        let a = vip("payment.mesh.internal.", RecordType::A);
        assert_eq!(ips(&a), vec!["127.77.0.5"]);
        assert_eq!(a.answers[0].ttl, 300);
        assert_eq!(
            ips(&vip("V1.payment.mesh.internal.", RecordType::A)),
            vec!["127.77.0.6"]
        );
        // AAAA: NODATA (VIPs are IPv4); a tag without a VIP: its instances.
        let aaaa = vip("payment.mesh.internal.", RecordType::AAAA);
        assert!(aaaa.answers.is_empty() && aaaa.rcode == ResponseCode::NoError);
        assert_eq!(
            ips(&vip("v2.payment.mesh.internal.", RecordType::A)),
            vec!["10.0.0.2"]
        );
        // SRV: one record per port of the serving instances, targets the name, VIP as glue.
        for name in ["payment.mesh.internal.", "_payment._tcp.mesh.internal."] {
            let srv = vip(name, RecordType::SRV);
            assert_eq!(srv.answers.len(), 1, "{name}");
            let RData::SRV(r) = &srv.answers[0].data else {
                panic!()
            };
            assert_eq!(r.target.to_ascii(), "payment.mesh.internal.");
            assert_eq!(r.port, 9000);
            assert_eq!(
                ips(&Answer::records(srv.additionals[0].clone(), vec![])),
                vec!["127.77.0.5"]
            );
        }
        // A service without a VIP, and direct mode: instance addresses.
        assert_eq!(
            ips(&vip("down.mesh.internal.", RecordType::A)),
            Vec::<String>::new()
        );
        assert_eq!(
            ips(&ask(&m, "payment.mesh.internal.", RecordType::A)),
            vec!["10.0.0.1", "10.0.0.2"]
        );
        // Unknown names stay unknown.
        assert_eq!(
            vip("nope.payment.mesh.internal.", RecordType::A).rcode,
            ResponseCode::NXDomain
        );
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
        let first = answer(&zone(), &m, &q, RecordType::A, &mut rng, None);
        let differs = (0..5)
            .map(|_| answer(&zone(), &m, &q, RecordType::A, &mut rng, None).answers)
            .any(|a| a != first.answers);
        assert!(differs);
    }

    #[test]
    fn every_name_of_the_tree_is_answered_right() {
        use ResponseCode::{NXDomain, NoError, Refused};
        let m = mirror();
        m.upsert(inst(
            "tagged",
            "t-1",
            "10.0.3.1",
            &["instance"],
            Health::Passing,
        ));
        // (name, type, rcode, answers)
        let cases: &[(&str, RecordType, ResponseCode, usize)] = &[
            ("mesh.internal.", RecordType::ANY, NoError, 2),
            ("mesh.internal.", RecordType::A, NoError, 0),
            ("mesh.internal.", RecordType::AXFR, Refused, 0),
            ("mesh.internal.", RecordType::IXFR, Refused, 0),
            ("payment.mesh.internal.", RecordType::AXFR, Refused, 0),
            ("ns.mesh.internal.", RecordType::ANY, NoError, 1),
            ("ns.mesh.internal.", RecordType::AAAA, NoError, 0),
            // Empty non-terminals: NODATA, for every type.
            ("_tcp.mesh.internal.", RecordType::A, NoError, 0),
            ("_TCP.mesh.internal.", RecordType::SRV, NoError, 0),
            ("instance.payment.mesh.internal.", RecordType::A, NoError, 0),
            (
                "instance.payment.mesh.internal.",
                RecordType::NS,
                NoError,
                0,
            ),
            ("instance.down.mesh.internal.", RecordType::A, NoError, 0),
            // ... unless a tag of that name exists.
            ("instance.tagged.mesh.internal.", RecordType::A, NoError, 1),
            // Names that do not exist.
            ("instance.nosuch.mesh.internal.", RecordType::A, NXDomain, 0),
            ("_nosuch._tcp.mesh.internal.", RecordType::SRV, NXDomain, 0),
            ("x._tcp.mesh.internal.", RecordType::SRV, NXDomain, 0),
            ("_payment.mesh.internal.", RecordType::SRV, NXDomain, 0),
            (
                "a._payment._tcp.mesh.internal.",
                RecordType::SRV,
                NXDomain,
                0,
            ),
            (
                "x.pay-1.instance.payment.mesh.internal.",
                RecordType::A,
                NXDomain,
                0,
            ),
            // A literal `*` is an ordinary label.
            ("*.mesh.internal.", RecordType::A, NXDomain, 0),
            ("*.payment.mesh.internal.", RecordType::A, NXDomain, 0),
            (
                "*.instance.payment.mesh.internal.",
                RecordType::A,
                NXDomain,
                0,
            ),
            // Existing names, for comparison.
            ("_payment._tcp.mesh.internal.", RecordType::SRV, NoError, 3),
            (
                "pay-1.instance.payment.mesh.internal.",
                RecordType::ANY,
                NoError,
                1,
            ),
            (
                "pay-1.instance.payment.mesh.internal.",
                RecordType::TXT,
                NoError,
                0,
            ),
        ];
        for (name, qtype, rcode, answers) in cases {
            let a = ask(&m, name, *qtype);
            assert_eq!(a.rcode, *rcode, "{name} {qtype}");
            assert_eq!(a.answers.len(), *answers, "{name} {qtype}");
            let negative = *answers == 0 && *rcode != Refused;
            assert_eq!(
                a.authority
                    .iter()
                    .any(|r| r.record_type() == RecordType::SOA),
                negative,
                "{name} {qtype}: the SOA goes with negative answers only"
            );
        }
        let any = ask(&m, "mesh.internal.", RecordType::ANY);
        let types: Vec<_> = any.answers.iter().map(Record::record_type).collect();
        assert_eq!(types, [RecordType::SOA, RecordType::NS]);
    }

    #[test]
    fn lan_ipv4_and_lan_ipv6_tagged_addresses_answer_a_and_aaaa() {
        let m = Mirror::new(0);
        let tagged = |pairs: &[(&str, &str)]| {
            Some(Box::new(waymark_shared::Extra {
                tagged_addresses: pairs
                    .iter()
                    .map(|(k, v)| {
                        (
                            k.to_string(),
                            waymark_shared::TaggedAddress {
                                address: v.to_string(),
                                port: 80,
                            },
                        )
                    })
                    .collect(),
                ..Default::default()
            }))
        };
        let mut dual = inst("dual", "d-1", "fd00::1", &[], Health::Passing);
        dual.extra = tagged(&[("lan_ipv4", "10.0.9.1"), ("wan", "192.0.2.1")]);
        m.upsert(dual);
        let mut v4 = inst("dual", "d-2", "10.0.9.2", &[], Health::Passing);
        v4.extra = tagged(&[("lan_ipv6", "fd00::2"), ("lan_ipv4", "not an ip")]);
        m.upsert(v4);
        let ips = |name: &str, qtype| -> Vec<String> {
            let mut v: Vec<String> = ask(&m, name, qtype)
                .answers
                .iter()
                .map(|r| r.data.to_string())
                .collect();
            v.sort();
            v
        };
        let cases: [(&str, RecordType, &[&str]); 4] = [
            (
                "dual.mesh.internal.",
                RecordType::A,
                &["10.0.9.1", "10.0.9.2"],
            ),
            (
                "dual.mesh.internal.",
                RecordType::AAAA,
                &["fd00::1", "fd00::2"],
            ),
            (
                "d-1.instance.dual.mesh.internal.",
                RecordType::A,
                &["10.0.9.1"],
            ),
            (
                "d-2.instance.dual.mesh.internal.",
                RecordType::AAAA,
                &["fd00::2"],
            ),
        ];
        for (name, qtype, want) in cases {
            assert_eq!(ips(name, qtype), want, "{name} {qtype}");
        }
    }

    #[test]
    fn host_name_addresses_are_cnames() {
        let m = Mirror::new(0);
        m.upsert(inst("ext", "db-1", "DB1.example.com", &[], Health::Passing));
        m.upsert(inst(
            "ext",
            "db-2",
            "db2.example.com.",
            &["b"],
            Health::Passing,
        ));
        m.upsert(inst(
            "mixed",
            "m-1",
            "db1.example.com",
            &[],
            Health::Passing,
        ));
        m.upsert(inst("mixed", "m-2", "10.0.4.2", &[], Health::Passing));
        let cname = |a: &Answer| -> Vec<String> {
            a.answers
                .iter()
                .map(|r| match &r.data {
                    RData::CNAME(c) => c.0.to_string(),
                    other => panic!("not a CNAME: {other:?}"),
                })
                .collect()
        };
        let a = ask(&m, "db-1.instance.ext.mesh.internal.", RecordType::A);
        assert_eq!(cname(&a), ["db1.example.com."]);
        assert_eq!(
            a.answers[0].name.to_string(),
            "db-1.instance.ext.mesh.internal."
        );
        let a = ask(&m, "db-2.instance.ext.mesh.internal.", RecordType::TXT);
        assert_eq!(
            cname(&a),
            ["db2.example.com."],
            "a CNAME answers every type"
        );
        // A service of host names only: one CNAME, to one of them, not cached.
        let a = ask(&m, "ext.mesh.internal.", RecordType::A);
        assert_eq!(a.answers.len(), 1);
        assert!(cname(&a)[0].starts_with("db"));
        assert!(!a.cacheable);
        let a = ask(&m, "b.ext.mesh.internal.", RecordType::AAAA);
        assert_eq!(cname(&a), ["db2.example.com."]);
        assert!(a.cacheable, "only one host name to choose from");
        for qtype in [
            RecordType::TXT,
            RecordType::NS,
            RecordType::CNAME,
            RecordType::ANY,
        ] {
            let a = ask(&m, "b.ext.mesh.internal.", qtype);
            assert_eq!(cname(&a), ["db2.example.com."], "a CNAME answers {qtype}");
        }
        // SRV: the host name is the target, with no address to add.
        let a = ask(&m, "_ext._tcp.mesh.internal.", RecordType::SRV);
        let mut targets: Vec<String> = a
            .answers
            .iter()
            .map(|r| match &r.data {
                RData::SRV(s) => s.target.to_string(),
                other => panic!("{other:?}"),
            })
            .collect();
        targets.sort();
        assert_eq!(targets, ["db1.example.com.", "db2.example.com."]);
        assert!(a.additionals.iter().all(Vec::is_empty));
        // Beside IP addresses, a host name is not answered for A (a CNAME cannot share its
        // name), but it is an SRV target.
        assert_eq!(
            ips(&ask(&m, "mixed.mesh.internal.", RecordType::A)),
            ["10.0.4.2"]
        );
        assert!(ask(&m, "mixed.mesh.internal.", RecordType::AAAA).is_nodata());
        assert_eq!(
            ask(&m, "mixed.mesh.internal.", RecordType::SRV)
                .answers
                .len(),
            2
        );
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
