//! The few parts of the DNS wire format the UDP fast path reads and writes itself, without
//! allocating: a query's header, question and EDNS payload size (and from them the answer
//! cache's key), the layout of an encoded reply, and patching a cached reply for the query
//! at hand: its ID, its flags, the question as the client spelled it, the SOA serial and the
//! order of its address records. Everything else about messages is hickory's job; anything
//! this module does not recognise goes the slow way.

/// Size of the fixed header.
pub const HEADER: usize = 12;
/// Longest name in wire form (RFC 1035 §3.1).
const MAX_NAME: usize = 255;
/// Key bytes after the name: type (2), EDNS flag (1), reply size limit (2).
const KEY_TAIL: usize = 5;

const TYPE_A: u16 = 1;
const TYPE_SOA: u16 = 6;
const TYPE_AAAA: u16 = 28;
const TYPE_OPT: u16 = 41;
const CLASS_IN: u16 = 1;
/// The DO bit, in the high byte of an OPT record's flags.
const DO_BIT: u8 = 0x80;

/// What the fast path needs to know about a query it can answer from the cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Query {
    pub id: [u8; 2],
    pub recursion_desired: bool,
    pub checking_disabled: bool,
    pub qtype: u16,
    /// Where the question section ends (it starts right after the header).
    pub question_end: usize,
    /// The client's advertised UDP payload size, when it sent EDNS.
    pub edns_payload: Option<u16>,
    /// The client's EDNS DO bit, echoed in the reply (RFC 3225).
    pub dnssec_ok: bool,
}

/// The answer cache's key: the lowercased name in wire form, the type, whether the client
/// sent EDNS and the reply size limit. Built in place, without allocating.
#[derive(Clone)]
pub struct Key {
    buf: [u8; MAX_NAME + KEY_TAIL],
    name_len: usize,
    len: usize,
}

impl Default for Key {
    fn default() -> Self {
        Key {
            buf: [0; MAX_NAME + KEY_TAIL],
            name_len: 0,
            len: 0,
        }
    }
}

impl Key {
    /// The lowercased query name, in wire form.
    pub fn name(&self) -> &[u8] {
        &self.buf[..self.name_len]
    }

    /// The whole key; valid after [`Key::seal`].
    pub fn as_bytes(&self) -> &[u8] {
        &self.buf[..self.len]
    }

    /// Completes the key with what, besides the name, a reply depends on: the type, EDNS,
    /// whether the client is answered VIPs, and the size limit.
    pub fn seal(&mut self, qtype: u16, edns: bool, vip: bool, limit: u16) {
        let n = self.name_len;
        self.buf[n..n + 2].copy_from_slice(&qtype.to_be_bytes());
        self.buf[n + 2] = edns as u8 | (vip as u8) << 1;
        self.buf[n + 3..n + 5].copy_from_slice(&limit.to_be_bytes());
        self.len = n + KEY_TAIL;
    }

    /// Whether the name is `origin` or under it; `origin` is lowercased wire form.
    pub fn is_under(&self, origin: &[u8]) -> bool {
        let name = self.name();
        if origin.len() > name.len() {
            return false;
        }
        let start = name.len() - origin.len();
        if name[start..] != *origin {
            return false;
        }
        // The suffix must start at a label boundary.
        let mut at = 0;
        while at < start {
            at += 1 + name[at] as usize;
        }
        at == start
    }
}

/// Reads a standard query with one question of class IN, no answer or authority records and
/// at most an EDNS(0) OPT record, nothing after it. Writes the lowercased name into `key`.
/// `None` for anything else (including malformed packets): those take the slow path.
pub fn parse_query(packet: &[u8], key: &mut Key) -> Option<Query> {
    if packet.len() < HEADER {
        return None;
    }
    let (flags_hi, flags_lo) = (packet[2], packet[3]);
    // QR = 0 (a query), opcode 0 (QUERY), TC = 0.
    if flags_hi & 0xfa != 0 {
        return None;
    }
    let count = |i: usize| u16::from_be_bytes([packet[4 + 2 * i], packet[5 + 2 * i]]);
    let (qd, an, ns, ar) = (count(0), count(1), count(2), count(3));
    if qd != 1 || an != 0 || ns != 0 || ar > 1 {
        return None;
    }
    // The name: plain labels (no compression pointer in a lone question), lowercased.
    let mut at = HEADER;
    let mut out = 0;
    loop {
        let len = *packet.get(at)? as usize;
        if len > 63 || out + 1 + len > MAX_NAME {
            return None;
        }
        let label = packet.get(at + 1..at + 1 + len)?;
        key.buf[out] = len as u8;
        for (dst, src) in key.buf[out + 1..out + 1 + len].iter_mut().zip(label) {
            *dst = src.to_ascii_lowercase();
        }
        out += 1 + len;
        at += 1 + len;
        if len == 0 {
            break;
        }
    }
    key.name_len = out;
    let fixed = packet.get(at..at + 4)?;
    let qtype = u16::from_be_bytes([fixed[0], fixed[1]]);
    let qclass = u16::from_be_bytes([fixed[2], fixed[3]]);
    if qclass != CLASS_IN {
        return None;
    }
    let question_end = at + 4;
    let (edns_payload, dnssec_ok) = match ar {
        0 if packet.len() == question_end => (None, false),
        1 => {
            let (payload, dnssec_ok) = read_opt(packet, question_end)?;
            (Some(payload), dnssec_ok)
        }
        _ => return None,
    };
    Some(Query {
        id: [packet[0], packet[1]],
        recursion_desired: flags_hi & 0x01 != 0,
        checking_disabled: flags_lo & 0x10 != 0,
        qtype,
        question_end,
        edns_payload,
        dnssec_ok,
    })
}

/// An OPT record at `at` that ends the packet: returns its payload size and DO bit. Only
/// EDNS version 0: other versions get BADVERS from the slow path.
fn read_opt(packet: &[u8], at: usize) -> Option<(u16, bool)> {
    let rr = packet.get(at..at + 11)?;
    let (name, rtype) = (rr[0], u16::from_be_bytes([rr[1], rr[2]]));
    let payload = u16::from_be_bytes([rr[3], rr[4]]);
    let version = rr[6];
    let dnssec_ok = rr[7] & DO_BIT != 0;
    let rdlen = u16::from_be_bytes([rr[9], rr[10]]) as usize;
    (name == 0 && rtype == TYPE_OPT && version == 0 && packet.len() == at + 11 + rdlen)
        .then_some((payload, dnssec_ok))
}

/// The UDP reply size limit: 512 without EDNS, else the client's size within [512, ours].
pub fn udp_limit(edns_payload: Option<u16>, server_max: u16) -> u16 {
    match edns_payload {
        Some(size) => size.clamp(512, server_max.max(512)),
        None => 512,
    }
}

/// Where the parts of an encoded reply that vary per query are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Layout {
    pub question_end: u16,
    /// Offset of the SOA serial, when the reply has an SOA record.
    pub serial_at: Option<u16>,
    /// The answer records, when they are address records that can be served in any order.
    pub rotation: Option<Rotation>,
    /// Offset of the high byte of the OPT record's flags (where DO is), when there is one.
    pub opt_flags_at: Option<u16>,
}

/// A run of equally long, self-contained answer records.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rotation {
    pub start: u16,
    pub record_len: u16,
    pub count: u16,
}

/// Reads the layout of a reply encoded by hickory. `None` when it is not what this module
/// can patch (the reply is then served but not cached).
pub fn layout(reply: &[u8]) -> Option<Layout> {
    if reply.len() < HEADER || reply.len() > u16::MAX as usize {
        return None;
    }
    let count = |i: usize| u16::from_be_bytes([reply[4 + 2 * i], reply[5 + 2 * i]]) as usize;
    let (qd, an, ns, ar) = (count(0), count(1), count(2), count(3));
    if qd != 1 {
        return None;
    }
    let mut at = skip_name(reply, HEADER)? + 4;
    if at > reply.len() {
        return None;
    }
    let question_end = at;
    let answers_start = at;
    let mut serial_at = None;
    let mut opt_flags_at = None;
    let mut rotatable = an >= 2 && ns == 0;
    let mut record_len = None;
    for i in 0..an + ns + ar {
        let rr_start = at;
        let name_end = skip_name(reply, at)?;
        let fixed = reply.get(name_end..name_end + 10)?;
        let rtype = u16::from_be_bytes([fixed[0], fixed[1]]);
        let rdlen = u16::from_be_bytes([fixed[8], fixed[9]]) as usize;
        let rdata = name_end + 10;
        let end = rdata + rdlen;
        if end > reply.len() {
            return None;
        }
        if rtype == TYPE_SOA && serial_at.is_none() && rdlen >= 22 {
            serial_at = Some((end - 20) as u16);
        }
        if rtype == TYPE_OPT && i >= an + ns {
            // TTL: extended RCODE, version, then the flags.
            opt_flags_at = Some((name_end + 6) as u16);
        }
        if i < an {
            // A rotatable record: an address, owned by a pointer to an earlier name.
            let owner_is_pointer = name_end - rr_start == 2
                && reply[rr_start] & 0xc0 == 0xc0
                && pointer(reply, rr_start) < answers_start;
            let len = end - rr_start;
            rotatable &= (rtype == TYPE_A || rtype == TYPE_AAAA)
                && owner_is_pointer
                && *record_len.get_or_insert(len) == len;
        } else if i >= an + ns && rtype != TYPE_OPT {
            // Additional records might point into the answers.
            rotatable = false;
        }
        at = end;
    }
    if at != reply.len() {
        return None;
    }
    let rotation = match (rotatable, record_len) {
        (true, Some(len)) => Some(Rotation {
            start: answers_start as u16,
            record_len: len as u16,
            count: an as u16,
        }),
        _ => None,
    };
    Some(Layout {
        question_end: question_end as u16,
        serial_at,
        rotation,
        opt_flags_at,
    })
}

fn pointer(msg: &[u8], at: usize) -> usize {
    (((msg[at] & 0x3f) as usize) << 8) | msg[at + 1] as usize
}

/// The offset just past the name at `at`.
fn skip_name(msg: &[u8], mut at: usize) -> Option<usize> {
    loop {
        let len = *msg.get(at)?;
        match len & 0xc0 {
            0xc0 => {
                msg.get(at + 1)?;
                return Some(at + 2);
            }
            0 if len == 0 => return Some(at + 1),
            0 => at += 1 + len as usize,
            _ => return None,
        }
    }
}

/// Per-query values written into a cached reply.
#[derive(Debug, Clone, Copy)]
pub struct Patch<'a> {
    pub query: &'a Query,
    /// The query packet, whose question is copied (the client's spelling of the name).
    pub packet: &'a [u8],
    pub recursion_available: bool,
    pub serial: u32,
    /// Which rotation of the address records to serve.
    pub turn: usize,
}

/// Copies `reply` into `out` adapted to one query; returns the reply's length. `out` must be
/// at least as long as `reply`, and the query's question as long as the cached one (the same
/// name and type, as the cache key guarantees).
pub fn patch_into(reply: &[u8], layout: &Layout, p: Patch<'_>, out: &mut [u8]) -> usize {
    let out = &mut out[..reply.len()];
    out.copy_from_slice(reply);
    out[..2].copy_from_slice(&p.query.id);
    out[2] = (out[2] & !0x01) | p.query.recursion_desired as u8;
    out[3] = (out[3] & !0x90)
        | if p.recursion_available { 0x80 } else { 0 }
        | if p.query.checking_disabled { 0x10 } else { 0 };
    let q_end = layout.question_end as usize;
    out[HEADER..q_end].copy_from_slice(&p.packet[HEADER..q_end]);
    if let Some(at) = layout.serial_at {
        let at = at as usize;
        out[at..at + 4].copy_from_slice(&p.serial.to_be_bytes());
    }
    if let Some(at) = layout.opt_flags_at {
        let at = at as usize;
        out[at] = (out[at] & !DO_BIT) | if p.query.dnssec_ok { DO_BIT } else { 0 };
    }
    if let Some(r) = layout.rotation {
        let (start, len) = (r.start as usize, r.record_len as usize);
        let run = &mut out[start..start + len * r.count as usize];
        run.rotate_left((p.turn % r.count as usize) * len);
    }
    reply.len()
}

/// A FORMERR reply to a packet whose header is readable but whose body is not: the header
/// alone, with the query's ID and opcode. `None` for packets too short to have a header, or
/// that are responses (never answered: no reflection).
pub fn formerr(packet: &[u8]) -> Option<[u8; HEADER]> {
    if packet.len() < HEADER || packet[2] & 0x80 != 0 {
        return None;
    }
    let mut out = [0u8; HEADER];
    out[..2].copy_from_slice(&packet[..2]);
    out[2] = 0x80 | (packet[2] & 0x78) | (packet[2] & 0x01);
    out[3] = 1; // FORMERR
    Some(out)
}

#[cfg(test)]
mod tests {
    use hickory_proto::op::{Edns, Message, Query as HQuery};
    use hickory_proto::rr::rdata::{A, SOA};
    use hickory_proto::rr::{Name, RData, Record, RecordType};

    use super::*;

    fn query(name: &str, rtype: RecordType, edns: Option<u16>) -> Vec<u8> {
        let mut m = Message::query();
        m.metadata.id = 0xbeef;
        m.metadata.recursion_desired = true;
        m.add_query(HQuery::query(Name::from_ascii(name).unwrap(), rtype));
        if let Some(size) = edns {
            let mut e = Edns::new();
            e.set_max_payload(size);
            m.set_edns(e);
        }
        m.to_vec().unwrap()
    }

    fn wire_name(name: &str) -> Vec<u8> {
        let mut out = Vec::new();
        for label in name.trim_end_matches('.').split('.') {
            out.push(label.len() as u8);
            out.extend_from_slice(label.as_bytes());
        }
        out.push(0);
        out
    }

    #[test]
    fn parses_a_query_and_lowercases_its_name() {
        let mut key = Key::default();
        let q = parse_query(&query("Web.Mesh.Internal.", RecordType::A, None), &mut key).unwrap();
        assert_eq!(q.id, [0xbe, 0xef]);
        assert!(q.recursion_desired);
        assert_eq!(q.qtype, 1);
        assert_eq!(q.edns_payload, None);
        assert_eq!(key.name(), wire_name("web.mesh.internal"));
        assert!(key.is_under(&wire_name("mesh.internal")));
        assert!(!key.is_under(&wire_name("esh.internal")));
        assert!(!key.is_under(&wire_name("other")));
        assert!(key.is_under(&[0]), "everything is under the root");
    }

    #[test]
    fn reads_the_edns_payload_size() {
        let mut key = Key::default();
        let packet = query("web.mesh.internal.", RecordType::SRV, Some(4096));
        let q = parse_query(&packet, &mut key).unwrap();
        assert_eq!(q.edns_payload, Some(4096));
        assert_eq!(udp_limit(q.edns_payload, 1232), 1232);
        assert_eq!(udp_limit(Some(100), 1232), 512);
        assert_eq!(udp_limit(None, 1232), 512);
    }

    #[test]
    fn keys_differ_by_type_and_size_but_not_by_case() {
        let key_of = |name: &str, t: RecordType, edns: Option<u16>| {
            let mut key = Key::default();
            let q = parse_query(&query(name, t, edns), &mut key).unwrap();
            key.seal(
                q.qtype,
                q.edns_payload.is_some(),
                false,
                udp_limit(q.edns_payload, 1232),
            );
            key.as_bytes().to_vec()
        };
        let mut vip = Key::default();
        let q = parse_query(&query("a.mesh.internal.", RecordType::A, None), &mut vip).unwrap();
        vip.seal(q.qtype, false, true, 512);
        let base = key_of("a.mesh.internal.", RecordType::A, None);
        assert_eq!(base, key_of("A.MESH.internal.", RecordType::A, None));
        assert_ne!(base, key_of("a.mesh.internal.", RecordType::AAAA, None));
        assert_ne!(base, vip.as_bytes(), "VIP answers are cached apart");
        assert_ne!(base, key_of("a.mesh.internal.", RecordType::A, Some(1232)));
        assert_ne!(
            key_of("a.mesh.internal.", RecordType::A, Some(1232)),
            key_of("a.mesh.internal.", RecordType::A, Some(800))
        );
    }

    #[test]
    fn leaves_everything_unusual_to_the_slow_path() {
        let mut key = Key::default();
        let good = query("web.mesh.internal.", RecordType::A, None);
        let mut bad = Vec::new();
        // Too short, a response, another opcode, truncated name, trailing garbage.
        bad.push(good[..11].to_vec());
        let mut resp = good.clone();
        resp[2] |= 0x80;
        bad.push(resp);
        let mut notify = good.clone();
        notify[2] |= 4 << 3;
        bad.push(notify);
        bad.push(good[..good.len() - 3].to_vec());
        let mut trailing = good.clone();
        trailing.push(0);
        bad.push(trailing);
        // Two questions.
        let mut two = good.clone();
        two[5] = 2;
        bad.push(two);
        // Class CH.
        let mut ch = good.clone();
        let n = ch.len();
        ch[n - 1] = 3;
        bad.push(ch);
        // EDNS version 1.
        let mut v1 = query("web.mesh.internal.", RecordType::A, Some(1232));
        let n = v1.len();
        v1[n - 5] = 1;
        bad.push(v1);
        // A compression pointer in the question.
        let mut ptr = good[..HEADER].to_vec();
        ptr.extend_from_slice(&[0xc0, 0x0c, 0, 1, 0, 1]);
        bad.push(ptr);
        for (i, p) in bad.iter().enumerate() {
            assert_eq!(parse_query(p, &mut key), None, "case {i}");
        }
        assert!(parse_query(&good, &mut key).is_some());
    }

    fn reply(answers: &[[u8; 4]], soa: bool) -> Vec<u8> {
        let name = Name::from_ascii("web.mesh.internal.").unwrap();
        let mut m = Message::response(7, hickory_proto::op::OpCode::Query);
        m.add_query(HQuery::query(name.clone(), RecordType::A));
        for a in answers {
            m.add_answer(Record::from_rdata(
                name.clone(),
                5,
                RData::A(A::new(a[0], a[1], a[2], a[3])),
            ));
        }
        if soa {
            let zone = Name::from_ascii("mesh.internal.").unwrap();
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
        m.to_vec().unwrap()
    }

    #[test]
    fn finds_rotatable_addresses_and_the_serial() {
        let r = reply(&[[10, 0, 0, 1], [10, 0, 0, 2], [10, 0, 0, 3]], false);
        let l = layout(&r).unwrap();
        let rot = l.rotation.unwrap();
        assert_eq!(rot.count, 3);
        assert_eq!(rot.record_len, 16);
        assert_eq!(l.serial_at, None);

        let neg = reply(&[], true);
        let l = layout(&neg).unwrap();
        assert_eq!(l.rotation, None);
        let at = l.serial_at.unwrap() as usize;
        assert_eq!(u32::from_be_bytes(neg[at..at + 4].try_into().unwrap()), 41);

        assert_eq!(layout(&r[..r.len() - 1]), None);
        assert_eq!(
            layout(&reply(&[[10, 0, 0, 1]], false)).unwrap().rotation,
            None
        );
    }

    #[test]
    fn patches_id_flags_question_serial_and_order() {
        let r = reply(&[[10, 0, 0, 1], [10, 0, 0, 2], [10, 0, 0, 3]], false);
        let l = layout(&r).unwrap();
        let packet = query("WEB.mesh.internal.", RecordType::A, None);
        let mut key = Key::default();
        let q = parse_query(&packet, &mut key).unwrap();
        let mut out = vec![0u8; 512];
        for turn in 0..3 {
            let n = patch_into(
                &r,
                &l,
                Patch {
                    query: &q,
                    packet: &packet,
                    recursion_available: true,
                    serial: 0,
                    turn,
                },
                &mut out,
            );
            let m = Message::from_vec(&out[..n]).unwrap();
            assert_eq!(m.metadata.id, 0xbeef);
            assert!(m.metadata.recursion_desired);
            assert!(m.metadata.recursion_available);
            assert_eq!(m.queries[0].name().to_ascii(), "WEB.mesh.internal.");
            let first = match &m.answers[0].data {
                RData::A(a) => a.0.octets()[3],
                _ => panic!(),
            };
            assert_eq!(first as usize, turn + 1);
            assert_eq!(m.answers.len(), 3);
        }

        let neg = reply(&[], true);
        let l = layout(&neg).unwrap();
        let n = patch_into(
            &neg,
            &l,
            Patch {
                query: &q,
                packet: &packet,
                recursion_available: false,
                serial: 99,
                turn: 0,
            },
            &mut out,
        );
        let m = Message::from_vec(&out[..n]).unwrap();
        assert!(!m.metadata.recursion_available);
        let RData::SOA(soa) = &m.authorities[0].data else {
            panic!()
        };
        assert_eq!(soa.serial, 99);
    }

    #[test]
    fn formerr_keeps_the_id_and_never_answers_responses() {
        let packet = query("web.mesh.internal.", RecordType::A, None);
        let f = formerr(&packet).unwrap();
        let m = Message::from_vec(&f).unwrap();
        assert_eq!(m.metadata.id, 0xbeef);
        assert_eq!(
            m.metadata.response_code,
            hickory_proto::op::ResponseCode::FormErr
        );
        let mut resp = packet.clone();
        resp[2] |= 0x80;
        assert_eq!(formerr(&resp), None);
        assert_eq!(formerr(&packet[..5]), None);
    }
}
