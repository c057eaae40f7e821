//! Sizing a reply to what the client can take: over UDP, 512 bytes without EDNS or the
//! client's advertised payload size (capped by ours); over TCP, everything.
//!
//! When the answers do not all fit, as many as fit are kept (with their additional records)
//! and TC is set; when only additional records do not fit, they are dropped without TC, as
//! RFC 2181 §9 allows.

use hickory_proto::op::{Edns, Message, Metadata, Query};
use hickory_proto::rr::{Name, RData, Record};
use hickory_proto::serialize::binary::BinEncodable;

use super::answer::Answer;

/// A reply's records, cut to size.
#[derive(Debug, Clone, PartialEq)]
pub struct Fitted {
    pub answers: Vec<Record>,
    pub authority: Vec<Record>,
    pub additionals: Vec<Record>,
    pub truncated: bool,
}

/// The largest reply a client may get over UDP.
pub fn udp_limit(client_edns: Option<&Edns>, server_max: u16) -> usize {
    match client_edns {
        Some(edns) => edns.max_payload().clamp(512, server_max.max(512)) as usize,
        None => 512,
    }
}

/// How the question of the reply is written, which decides how much its records compress.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Question {
    /// Encoded with the reply: record names can point to the question's name.
    Encoded,
    /// Copied as the client sent it (hickory's responses do this): names cannot point to it.
    Copied,
}

/// What a reply must fit in, and how it is written.
#[derive(Debug, Clone, Copy)]
pub struct Room<'a> {
    /// Bytes.
    pub limit: usize,
    pub question: Question,
    /// The reply's EDNS, if it has one.
    pub edns: Option<&'a Edns>,
}

/// Cuts `answer` to fit in the room alongside the given header and query.
pub fn fit(answer: Answer, metadata: Metadata, query: &Query, room: Room<'_>) -> Fitted {
    let Room {
        limit,
        question,
        edns,
    } = room;
    let question_len = match question {
        Question::Encoded => 0,
        Question::Copied => query.to_bytes().map(|b| b.len()).unwrap_or(usize::MAX / 2),
    };
    let size = |answers: &[Record], additionals: &[Record], authority: &[Record]| {
        let mut m = Message::new(metadata.id, metadata.message_type, metadata.op_code);
        if question == Question::Encoded {
            m.add_query(query.clone());
        }
        m.add_answers(answers.iter().cloned());
        m.add_authorities(authority.iter().cloned());
        m.add_additionals(additionals.iter().cloned());
        if let Some(e) = edns {
            m.set_edns(e.clone());
        }
        m.to_vec()
            .map(|v| v.len() + question_len)
            .unwrap_or(usize::MAX)
    };
    let all_additionals: Vec<Record> = answer.additionals.iter().flatten().cloned().collect();
    let records = answer
        .answers
        .iter()
        .chain(&answer.authority)
        .chain(&all_additionals);
    let fits = match size_bound(query, records, edns.is_some()) {
        // Most answers are small: no trial encoding when even the uncompressed size fits.
        Some(bound) if bound <= limit => true,
        _ => size(&answer.answers, &all_additionals, &answer.authority) <= limit,
    };
    if fits {
        return Fitted {
            answers: answer.answers,
            authority: answer.authority,
            additionals: all_additionals,
            truncated: false,
        };
    }
    // The most answers that fit without additionals (binary search: sizes grow with n).
    let (mut lo, mut hi) = (0usize, answer.answers.len());
    while lo < hi {
        let mid = (lo + hi).div_ceil(2);
        if size(&answer.answers[..mid], &[], &answer.authority) <= limit {
            lo = mid;
        } else {
            hi = mid - 1;
        }
    }
    let kept = lo;
    let truncated = kept < answer.answers.len();
    // Then the additionals of the kept answers, as many as still fit.
    let mut additionals: Vec<Record> = Vec::new();
    for group in answer.additionals.iter().take(kept) {
        let mut with = additionals.clone();
        with.extend(group.iter().cloned());
        if size(&answer.answers[..kept], &with, &answer.authority) > limit {
            break;
        }
        additionals = with;
    }
    let mut answers = answer.answers;
    answers.truncate(kept);
    Fitted {
        answers,
        authority: answer.authority,
        additionals,
        truncated,
    }
}

/// An upper bound of a reply's encoded size, without name compression; `None` when a
/// record's data has no cheap bound. The OPT record is counted generously.
fn size_bound<'a>(
    query: &Query,
    records: impl Iterator<Item = &'a Record>,
    edns: bool,
) -> Option<usize> {
    let name = |n: &Name| n.len() + 1;
    let mut total = 12 + name(query.name()) + 4 + if edns { 64 } else { 0 };
    for r in records {
        let rdata = match &r.data {
            RData::A(_) => 4,
            RData::AAAA(_) => 16,
            RData::SRV(srv) => 6 + name(&srv.target),
            RData::NS(ns) => name(&ns.0),
            RData::CNAME(cname) => name(&cname.0),
            RData::SOA(soa) => name(&soa.mname) + name(&soa.rname) + 20,
            _ => return None,
        };
        total += name(&r.name) + 10 + rdata;
    }
    Some(total)
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use hickory_proto::op::{MessageType, OpCode, ResponseCode};
    use hickory_proto::rr::rdata::{A, SRV};
    use hickory_proto::rr::{Name, RData, RecordType};

    use super::*;
    use crate::dns::answer::Source;

    fn name(s: &str) -> Name {
        Name::from_ascii(s).unwrap()
    }

    fn a_records(n: u8) -> Answer {
        let answers = (0..n)
            .map(|i| {
                Record::from_rdata(
                    name("svc.mesh.internal."),
                    5,
                    RData::A(A(Ipv4Addr::new(10, 0, 0, i))),
                )
            })
            .collect();
        Answer {
            rcode: ResponseCode::NoError,
            answers,
            additionals: vec![vec![]; n as usize],
            authority: vec![],
            source: Source::Zone,
            cacheable: true,
        }
    }

    fn room(question: Question, limit: usize) -> Room<'static> {
        Room {
            limit,
            question,
            edns: None,
        }
    }

    fn meta() -> Metadata {
        Metadata::new(1, MessageType::Response, OpCode::Query)
    }

    #[test]
    fn small_answers_are_whole() {
        let q = Query::query(name("svc.mesh.internal."), RecordType::A);
        let f = fit(a_records(3), meta(), &q, room(Question::Encoded, 512));
        assert_eq!(f.answers.len(), 3);
        assert!(!f.truncated);
    }

    #[test]
    fn large_answers_are_cut_to_512_with_tc() {
        let q = Query::query(name("svc.mesh.internal."), RecordType::A);
        let f = fit(a_records(100), meta(), &q, room(Question::Encoded, 512));
        assert!(f.truncated);
        assert!(
            f.answers.len() > 10 && f.answers.len() < 100,
            "{}",
            f.answers.len()
        );
        let more = fit(a_records(100), meta(), &q, room(Question::Encoded, 1232));
        assert!(more.answers.len() > f.answers.len());
        let all = fit(a_records(100), meta(), &q, room(Question::Encoded, 65535));
        // A question the records cannot point to leaves room for fewer of them.
        let copied = fit(a_records(100), meta(), &q, room(Question::Copied, 512));
        assert!(copied.answers.len() < f.answers.len());
        assert!(copied.truncated);
        assert_eq!(all.answers.len(), 100);
        assert!(!all.truncated);
    }

    #[test]
    fn additionals_are_dropped_without_tc() {
        let q = Query::query(name("svc.mesh.internal."), RecordType::SRV);
        let mut answers = Vec::new();
        let mut additionals = Vec::new();
        for i in 0..6u8 {
            let target = name(&format!(
                "instance-with-a-long-name-{i}.instance.svc.mesh.internal."
            ));
            answers.push(Record::from_rdata(
                name("svc.mesh.internal."),
                5,
                RData::SRV(SRV::new(1, 1, 80, target.clone())),
            ));
            additionals.push(vec![Record::from_rdata(
                target,
                5,
                RData::A(A(Ipv4Addr::new(10, 0, 0, i))),
            )]);
        }
        let answer = Answer {
            rcode: ResponseCode::NoError,
            answers,
            additionals,
            authority: vec![],
            source: Source::Zone,
            cacheable: true,
        };
        let f = fit(answer, meta(), &q, room(Question::Encoded, 512));
        assert!(!f.truncated, "all SRV answers fit: {}", f.answers.len());
        assert_eq!(f.answers.len(), 6);
        assert!(f.additionals.len() < 6);
    }

    #[test]
    fn the_size_bound_is_never_below_the_encoding() {
        use hickory_proto::rr::rdata::{NS, SOA};
        let q = Query::query(name("svc.mesh.internal."), RecordType::SRV);
        let target = name("an-instance.instance.svc.mesh.internal.");
        let records = [
            Record::from_rdata(
                name("svc.mesh.internal."),
                5,
                RData::SRV(SRV::new(1, 1, 80, target.clone())),
            ),
            Record::from_rdata(target, 5, RData::A(A(Ipv4Addr::new(10, 0, 0, 1)))),
            Record::from_rdata(
                name("mesh.internal."),
                5,
                RData::NS(NS(name("ns.mesh.internal."))),
            ),
            Record::from_rdata(
                name("mesh.internal."),
                5,
                RData::SOA(SOA::new(
                    name("ns.mesh.internal."),
                    name("hostmaster.mesh.internal."),
                    1,
                    2,
                    3,
                    4,
                    5,
                )),
            ),
        ];
        let mut e = Edns::new();
        e.set_max_payload(1232);
        let mut m = Message::new(1, MessageType::Response, OpCode::Query);
        m.add_query(q.clone());
        m.add_answers(records.iter().cloned());
        m.set_edns(e);
        let encoded = m.to_vec().unwrap().len();
        let bound = size_bound(&q, records.iter(), true).unwrap();
        assert!(bound >= encoded, "bound {bound} < encoded {encoded}");
    }

    #[test]
    fn udp_limit_follows_edns() {
        let mut e = Edns::new();
        e.set_max_payload(4096);
        assert_eq!(udp_limit(Some(&e), 1232), 1232);
        e.set_max_payload(100);
        assert_eq!(udp_limit(Some(&e), 1232), 512);
        assert_eq!(udp_limit(None, 1232), 512);
    }
}
