//! The UDP fast path's wire code (resolver/src/dns/wire.rs): the query parser, the reply
//! layout reader, reply patching and FORMERR replies.
//!
//! Input: 8 control bytes, then a packet. The packet is read both as a query and as a reply.
//! - As a query that `parse_query` takes: the key is the lowercased name, and a reply that
//!   hickory encodes for it (as the fast path's cache miss does) has a layout; patched for
//!   the query, it parses with hickory and carries the query's ID, flags and spelling of the
//!   name, the same answers (rotated), the patched SOA serial and the query's DO bit.
//! - As a reply that `layout` takes: patching it never panics and keeps it as long, and its
//!   rotated records are the same records.

#![no_main]

use hickory_proto::op::{Edns, Message, MessageType, OpCode, Query, ResponseCode};
use hickory_proto::rr::rdata::{A, AAAA, SOA};
use hickory_proto::rr::{Name, RData, Record, RecordType};
use hickory_proto::serialize::binary::{BinDecodable, BinDecoder};
use libfuzzer_sys::fuzz_target;
use waymark_resolver::dns::wire::{self, Key, Layout, Patch, HEADER};

fuzz_target!(|data: &[u8]| {
    let Some((ctl, packet)) = data.split_first_chunk::<8>() else {
        return;
    };
    as_query(ctl, packet);
    as_reply(ctl, packet);
    if let Some(f) = wire::formerr(packet) {
        assert_eq!(f[..2], packet[..2], "FORMERR keeps the ID");
        let m = Message::from_vec(&f).expect("a FORMERR reply parses");
        assert_eq!(m.metadata.response_code, ResponseCode::FormErr);
        assert_eq!(m.metadata.message_type, MessageType::Response);
    }
});

fn as_query(ctl: &[u8; 8], packet: &[u8]) {
    let mut key = Key::default();
    let Some(q) = wire::parse_query(packet, &mut key) else {
        return;
    };
    assert!(q.question_end > HEADER + 4 && q.question_end <= packet.len());
    let spelled = &packet[HEADER..q.question_end - 4];
    assert_eq!(
        key.name(),
        spelled.to_ascii_lowercase(),
        "the key is the name, lowercased"
    );
    assert!(key.name().len() <= 255 && key.name().last() == Some(&0));
    assert!(key.is_under(&[0]), "every name is under the root");
    let limit = wire::udp_limit(q.edns_payload, 1232);
    assert!((512..=1232).contains(&limit));
    key.seal(q.qtype, q.edns_payload.is_some(), false, limit);
    assert_eq!(key.as_bytes().len(), key.name().len() + 5);

    // The reply the fast path would cache, encoded by hickory.
    let Ok(qname) = Name::read(&mut BinDecoder::new(key.name())) else {
        return;
    };
    let qtype = RecordType::from(q.qtype);
    let mut m = Message::new(
        u16::from_be_bytes(q.id),
        MessageType::Response,
        OpCode::Query,
    );
    m.metadata.authoritative = true;
    m.metadata.recursion_desired = q.recursion_desired;
    m.add_query(Query::query(qname.clone(), qtype));
    let n = (ctl[0] % 6) as usize;
    for i in 0..n {
        let rdata = match qtype {
            RecordType::A => RData::A(A::new(10, ctl[1], ctl[2], i as u8)),
            RecordType::AAAA => {
                RData::AAAA(AAAA::new(0xfd00, ctl[1] as u16, 0, 0, 0, 0, 0, i as u16))
            }
            _ => break,
        };
        m.add_answer(Record::from_rdata(qname.clone(), 5, rdata));
    }
    let with_soa = m.answers.is_empty() || ctl[3] & 1 != 0;
    if m.answers.is_empty() && ctl[3] & 2 != 0 {
        m.metadata.response_code = ResponseCode::NXDomain;
    }
    if with_soa {
        let zone = qname.base_name();
        let soa = SOA::new(
            Name::from_ascii("ns.mesh.internal.").unwrap(),
            Name::from_ascii("hostmaster.mesh.internal.").unwrap(),
            41,
            3600,
            600,
            86400,
            5,
        );
        m.add_authority(Record::from_rdata(zone, 5, RData::SOA(soa)));
    }
    if q.edns_payload.is_some() {
        let mut e = Edns::new();
        e.set_max_payload(1232);
        m.set_edns(e);
    }
    let Ok(reply) = m.to_vec() else {
        return;
    };
    let layout = wire::layout(&reply).expect("a reply hickory encoded has a layout");
    assert_eq!(layout.question_end as usize, q.question_end);
    assert_eq!(layout.serial_at.is_some(), with_soa);
    assert_eq!(layout.opt_flags_at.is_some(), q.edns_payload.is_some());
    // (Records owned by the root are not compressed; the zone is never the root.)
    if m.answers.len() >= 2 && !with_soa && !qname.is_root() {
        assert!(layout.rotation.is_some(), "two or more addresses rotate");
    }

    let serial = u32::from_be_bytes([ctl[4], ctl[5], ctl[6], 0]);
    let recursion_available = ctl[3] & 4 != 0;
    let turn = ctl[7] as usize;
    let mut out = vec![0u8; reply.len() + ctl[3] as usize % 3];
    let len = wire::patch_into(
        &reply,
        &layout,
        Patch {
            query: &q,
            packet,
            recursion_available,
            serial,
            turn,
        },
        &mut out,
    );
    assert_eq!(len, reply.len());
    let patched = &out[..len];
    assert_eq!(
        patched[HEADER..q.question_end],
        packet[HEADER..q.question_end],
        "the client's spelling"
    );
    let got = Message::from_vec(patched).expect("a patched reply parses");
    assert_eq!(got.metadata.id, u16::from_be_bytes(q.id));
    assert_eq!(got.metadata.recursion_desired, q.recursion_desired);
    assert_eq!(got.metadata.checking_disabled, q.checking_disabled);
    assert_eq!(got.metadata.recursion_available, recursion_available);
    assert_eq!(got.metadata.response_code, m.metadata.response_code);
    assert_eq!(got.queries.len(), 1);
    assert_eq!(got.queries[0].query_type(), qtype);
    let mut want: Vec<&RData> = m.answers.iter().map(|r| &r.data).collect();
    let mut have: Vec<&RData> = got.answers.iter().map(|r| &r.data).collect();
    if let Some(r) = layout.rotation {
        assert_eq!(
            have[0],
            want[turn % r.count as usize],
            "rotated by the turn"
        );
    }
    want.sort();
    have.sort();
    assert_eq!(have, want, "the same answers");
    if with_soa {
        let Some(RData::SOA(soa)) = got.authorities.first().map(|r| &r.data) else {
            panic!("the SOA record is kept");
        };
        assert_eq!(soa.serial, serial);
    }
    match (&got.edns, q.edns_payload) {
        (Some(e), Some(_)) => assert_eq!(e.flags().dnssec_ok, q.dnssec_ok),
        (None, None) => {}
        (e, p) => panic!("EDNS in the reply {e:?} for EDNS in the query {p:?}"),
    }
}

fn as_reply(ctl: &[u8; 8], reply: &[u8]) {
    let Some(layout) = wire::layout(reply) else {
        return;
    };
    check_layout(reply, &layout);
    // A query with the reply's own question, as the cache key guarantees.
    let q_end = layout.question_end as usize;
    let mut packet = vec![
        ctl[0],
        ctl[1],
        ctl[2] & 0x01,
        ctl[3] & 0x10,
        0,
        1,
        0,
        0,
        0,
        0,
        0,
        0,
    ];
    packet.extend_from_slice(&reply[HEADER..q_end]);
    let q = wire::Query {
        id: [ctl[0], ctl[1]],
        recursion_desired: ctl[2] & 1 != 0,
        checking_disabled: ctl[3] & 0x10 != 0,
        qtype: 1,
        question_end: q_end,
        edns_payload: (ctl[4] & 1 != 0).then_some(1232),
        dnssec_ok: ctl[4] & 2 != 0,
    };
    let mut out = vec![0u8; reply.len()];
    let len = wire::patch_into(
        reply,
        &layout,
        Patch {
            query: &q,
            packet: &packet,
            recursion_available: ctl[4] & 4 != 0,
            serial: u32::from_be_bytes([ctl[5], ctl[6], ctl[7], ctl[0]]),
            turn: ctl[7] as usize,
        },
        &mut out,
    );
    assert_eq!(len, reply.len());
    assert_eq!(out[4..HEADER], reply[4..HEADER], "the counts are kept");
    if let Some(r) = layout.rotation {
        let (start, rec) = (r.start as usize, r.record_len as usize);
        let end = start + rec * r.count as usize;
        let mut before: Vec<&[u8]> = reply[start..end].chunks(rec).collect();
        let mut after: Vec<&[u8]> = out[start..end].chunks(rec).collect();
        before.sort();
        after.sort();
        assert_eq!(before, after, "rotation only reorders whole records");
    }
}

/// What `layout` says must lie inside the reply.
fn check_layout(reply: &[u8], l: &Layout) {
    let len = reply.len();
    assert!((HEADER..=len).contains(&(l.question_end as usize)));
    if let Some(at) = l.serial_at {
        assert!(at as usize >= l.question_end as usize && at as usize + 4 <= len);
    }
    if let Some(at) = l.opt_flags_at {
        assert!((at as usize) < len);
    }
    if let Some(r) = l.rotation {
        assert!(r.count >= 2 && r.record_len > 0);
        assert_eq!(r.start, l.question_end);
        assert!(r.start as usize + r.record_len as usize * r.count as usize <= len);
    }
}
