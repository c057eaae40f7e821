//! The UDP fast path: a query for a name in the zone is answered from the [`AnswerCache`],
//! patched for the query at hand; on a miss the reply is computed (the same
//! [`Handler::zone_reply`] the hickory path uses), encoded, cached and served. Anything else
//! — names outside the zone, unusual or malformed packets — is handed back as
//! [`Verdict::Slow`] for hickory. No I/O here: [`super::udp`] owns the sockets.

use std::net::IpAddr;
use std::sync::Arc;

use hickory_proto::op::{Edns, Message, MessageType, Metadata, OpCode, Query};
use hickory_proto::rr::{Name, RecordType};
use hickory_proto::serialize::binary::{BinDecodable, BinDecoder, BinEncodable};
use prometheus_client::metrics::counter::Counter;

use super::answer::Outcome;
use super::cache::{AnswerCache, Entry};
use super::fit::{Question, Room};
use super::server::Handler;
use super::wire::{self, Key, Patch};
use crate::metrics::DnsLabels;

/// What to do with a datagram.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// The reply is in the output buffer, this long.
    Reply(usize),
    /// Not for the fast path: give it to hickory.
    Slow,
}

/// Per-worker scratch space, so that a hit allocates nothing.
pub struct Scratch {
    key: Key,
    rng: fastrand::Rng,
}

impl Default for Scratch {
    fn default() -> Self {
        Scratch {
            key: Key::default(),
            rng: fastrand::Rng::new(),
        }
    }
}

/// The fast path's state, shared by every UDP worker.
pub struct FastPath {
    handler: Arc<Handler>,
    /// The zone's origin, lowercased wire form.
    origin: Vec<u8>,
    /// The Consul domain's, when its names are answered.
    consul_origin: Option<Vec<u8>>,
    cache: AnswerCache,
    our_edns: Edns,
    /// `dns_queries{proto="udp",outcome}` for answer, nodata, nxdomain and refused.
    outcomes: [Counter; 4],
    hits: Counter,
    misses: Counter,
}

impl FastPath {
    pub fn new(handler: Arc<Handler>, cache_capacity: usize) -> FastPath {
        let origin = handler
            .zone
            .origin
            .to_bytes()
            .expect("a valid zone name encodes");
        debug_assert_eq!(origin.last(), Some(&0));
        let counter = |outcome| {
            handler
                .metrics
                .dns_queries
                .get_or_create(&DnsLabels {
                    proto: "udp",
                    outcome,
                })
                .clone()
        };
        let mut our_edns = Edns::new();
        our_edns.set_max_payload(handler.max_udp_payload);
        let consul_origin = handler.consul.as_ref().map(|c| {
            c.zone
                .origin
                .to_bytes()
                .expect("a valid domain name encodes")
        });
        FastPath {
            origin,
            consul_origin,
            cache: AnswerCache::new(cache_capacity),
            our_edns,
            outcomes: [
                counter("answer"),
                counter("nodata"),
                counter("nxdomain"),
                counter("refused"),
            ],
            hits: handler.metrics.dns_cache_hits.clone(),
            misses: handler.metrics.dns_cache_misses.clone(),
            handler,
        }
    }

    /// Answers `packet` from `client` into `out`, or says it is not for the fast path (also
    /// when the reply would not fit in `out`).
    pub fn answer(
        &self,
        packet: &[u8],
        client: IpAddr,
        scratch: &mut Scratch,
        out: &mut [u8],
    ) -> Verdict {
        let Some(query) = wire::parse_query(packet, &mut scratch.key) else {
            return Verdict::Slow;
        };
        if !scratch.key.is_under(&self.origin)
            && !self
                .consul_origin
                .as_ref()
                .is_some_and(|o| scratch.key.is_under(o))
        {
            return Verdict::Slow;
        }
        let handler = &self.handler;
        let limit = wire::udp_limit(query.edns_payload, handler.udp_max_for(client));
        let vip_ttl = handler.vips.ttl_for(client);
        scratch.key.seal(
            query.qtype,
            query.edns_payload.is_some(),
            vip_ttl.is_some(),
            limit,
        );
        let patch = Patch {
            query: &query,
            packet,
            recursion_available: handler.forwarder.allowed(client),
            serial: handler.mirror.index() as u32,
            turn: scratch.rng.usize(..),
        };
        let key = scratch.key.as_bytes();
        let hit = self.cache.with_current(key, &handler.mirror, |e| {
            (e.reply.len() <= out.len())
                .then(|| (wire::patch_into(&e.reply, &e.layout, patch, out), e.outcome))
        });
        if let Some(Some((len, outcome))) = hit {
            self.hits.inc();
            self.count(outcome);
            return Verdict::Reply(len);
        }
        self.misses.inc();
        let Some((entry, cacheable)) = self.compute(&query, &scratch.key, limit, vip_ttl) else {
            return Verdict::Slow;
        };
        if entry.reply.len() > out.len() {
            return Verdict::Slow;
        }
        let len = wire::patch_into(&entry.reply, &entry.layout, patch, out);
        self.count(entry.outcome);
        if cacheable {
            self.cache.insert(key, entry);
        }
        Verdict::Reply(len)
    }

    fn count(&self, outcome: Outcome) {
        let i = match outcome {
            Outcome::Answer => 0,
            Outcome::NoData => 1,
            Outcome::NxDomain => 2,
            Outcome::Refused => 3,
        };
        self.outcomes[i].inc();
    }

    /// Computes and encodes the reply for a cache miss, and says whether it may be cached
    /// (see [`super::server::ZoneReply::cacheable`]).
    fn compute(
        &self,
        query: &wire::Query,
        key: &Key,
        limit: u16,
        vip_ttl: Option<u32>,
    ) -> Option<(Entry, bool)> {
        let qname = Name::read(&mut BinDecoder::new(key.name())).ok()?;
        let qtype = RecordType::from(query.qtype);
        let hquery = Query::query(qname.clone(), qtype);
        let mut request = Metadata::new(
            u16::from_be_bytes(query.id),
            MessageType::Query,
            OpCode::Query,
        );
        request.recursion_desired = query.recursion_desired;
        request.checking_disabled = query.checking_disabled;
        let edns = query.edns_payload.map(|_| &self.our_edns);
        let reply = self.handler.zone_reply(
            &request,
            &hquery,
            &qname,
            Room {
                limit: limit as usize,
                question: Question::Encoded,
                edns,
            },
            false,
            vip_ttl,
        );
        let mut message = Message::new(request.id, MessageType::Response, OpCode::Query);
        message.metadata = reply.metadata;
        message.add_query(hquery);
        message.add_answers(reply.fitted.answers);
        message.add_authorities(reply.fitted.authority);
        message.add_additionals(reply.fitted.additionals);
        if let Some(e) = edns {
            message.set_edns(e.clone());
        }
        let bytes = message.to_vec().ok()?;
        let entry = Entry::new(bytes, reply.source, reply.outcome)?;
        Some((entry, reply.cacheable))
    }
}
