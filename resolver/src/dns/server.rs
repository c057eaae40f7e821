//! The DNS server: sockets, and the hickory [`RequestHandler`] that answers the zone from the
//! mirror and forwards the rest. Decisions live in [`super::answer`] and [`super::fit`].

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use hickory_net::xfer::Protocol;
use hickory_proto::op::Query;
use hickory_proto::op::{Edns, Metadata, OpCode, ResponseCode};
use hickory_proto::rr::{DNSClass, Name, Record};
use hickory_server::net::runtime::Time;
use hickory_server::server::{Request, RequestHandler, ResponseHandler, ResponseInfo};
use hickory_server::zone_handler::MessageResponseBuilder;
use ipnet::IpNet;
use tokio::net::TcpListener;
use waymark_shared::Mirror;

use super::answer::{self, Outcome, Source, Zone};
use super::fit::{self, Fitted, Question, Room};
use super::forward::{ForwardError, Forwarder};
use super::udp;
use crate::metrics::{DnsLabels, Metrics};

/// A zone answer with its header, fitted to the client's limit, ready to encode.
pub struct ZoneReply {
    pub metadata: Metadata,
    pub fitted: Fitted,
    pub outcome: Outcome,
    pub source: Source,
    /// Whether the encoded reply may be cached: not when it was truncated (a cut answer set
    /// would otherwise always show the same instances) or the answer says so.
    pub cacheable: bool,
}

/// Everything a query needs.
pub struct Handler {
    pub zone: Zone,
    /// Consul's names, when they are answered too.
    pub consul: Option<super::consul::ConsulNames>,
    pub mirror: Arc<Mirror>,
    pub forwarder: Forwarder,
    /// Who gets VIP answers.
    pub vips: super::vips::VipAnswers,
    pub max_udp_payload: u16,
    pub metrics: Arc<Metrics>,
    /// Clients answered in full over UDP and never rate-limited (loopback by default).
    pub local_clients: Vec<IpNet>,
    /// The largest UDP reply to other clients: a spoofed query cannot be amplified further.
    pub remote_max_udp_payload: u16,
    /// Response-rate limiting of UDP answers to other clients (none: off).
    pub rrl: Option<super::rrl::Rrl>,
}

impl Handler {
    /// Whether a (lowercased) name is answered here rather than forwarded: the zone's, or
    /// Consul's when those are on.
    pub fn serves(&self, name: &Name) -> bool {
        self.zone.contains(name) || self.consul.as_ref().is_some_and(|c| c.contains(name))
    }

    /// Whether `client` is one of the local clients.
    pub fn is_local(&self, client: IpAddr) -> bool {
        let client = match client {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(client),
            v4 => v4,
        };
        self.local_clients.iter().any(|n| n.contains(&client))
    }

    /// The largest UDP reply `client` may get from this server.
    pub fn udp_max_for(&self, client: IpAddr) -> u16 {
        if self.is_local(client) {
            self.max_udp_payload
        } else {
            self.max_udp_payload.min(self.remote_max_udp_payload)
        }
    }

    /// What to do with a UDP answer to `client` under response-rate limiting.
    pub fn rrl(&self, client: IpAddr) -> super::rrl::Decision {
        use super::rrl::Decision;
        let decision = match &self.rrl {
            Some(rrl) if !self.is_local(client) => rrl.check(client),
            _ => Decision::Send,
        };
        match decision {
            Decision::Send => {}
            Decision::Slip => self.metrics.rate_limited("slipped"),
            Decision::Drop => self.metrics.rate_limited("dropped"),
        }
        decision
    }
}

/// Binds UDP (`udp_workers` sockets) and TCP on the same address; with port 0, on the same
/// free port.
pub fn bind(
    addr: SocketAddr,
    udp_workers: usize,
    recv_buffer: usize,
) -> std::io::Result<(Vec<std::net::UdpSocket>, TcpListener)> {
    let mut last = None;
    for _ in 0..20 {
        let udp = udp::bind(addr, udp_workers, recv_buffer)?;
        let port = udp[0].local_addr()?.port();
        let tcp = std::net::TcpListener::bind(SocketAddr::new(addr.ip(), port));
        match tcp {
            Ok(tcp) => {
                tcp.set_nonblocking(true)?;
                return Ok((udp, TcpListener::from_std(tcp)?));
            }
            Err(e) if addr.port() == 0 && e.kind() == std::io::ErrorKind::AddrInUse => {
                last = Some(e)
            }
            Err(e) => return Err(e),
        }
    }
    Err(last.unwrap_or_else(|| std::io::Error::other("no free port")))
}

#[async_trait::async_trait]
impl RequestHandler for Handler {
    async fn handle_request<R: ResponseHandler, T: Time>(
        &self,
        request: &Request,
        mut response: R,
    ) -> ResponseInfo {
        let proto = match request.protocol() {
            Protocol::Udp => "udp",
            _ => "tcp",
        };
        let (outcome, result) = self.respond(request, &mut response).await;
        self.metrics
            .dns_queries
            .get_or_create(&DnsLabels { proto, outcome })
            .inc();
        match result {
            Ok(info) => info,
            Err(e) => {
                tracing::debug!(error = %e, "could not send a DNS response");
                let mut m = Metadata::response_from_request(&request.metadata);
                m.response_code = ResponseCode::ServFail;
                hickory_proto::op::Header {
                    metadata: m,
                    counts: Default::default(),
                }
                .into()
            }
        }
    }
}

type Sent = Result<ResponseInfo, hickory_net::NetError>;

impl Handler {
    async fn respond<R: ResponseHandler>(
        &self,
        request: &Request,
        response: &mut R,
    ) -> (&'static str, Sent) {
        // Ours is EDNS version 0; the client's DO bit is echoed (RFC 3225).
        let our_edns = request.edns.as_ref().map(|client| {
            let mut e = Edns::new();
            e.set_max_payload(self.max_udp_payload);
            e.set_dnssec_ok(client.flags().dnssec_ok);
            e
        });
        let error = |code: ResponseCode| {
            MessageResponseBuilder::new(&request.queries, our_edns.as_ref())
                .error_msg(&request.metadata, code)
        };
        // RFC 6891 §6.1.3: a version we do not implement gets BADVERS, with our version.
        if request.edns.as_ref().is_some_and(|e| e.version() > 0) {
            return (
                "badvers",
                response.send_response(error(ResponseCode::BADVERS)).await,
            );
        }
        if request.metadata.op_code != OpCode::Query {
            return (
                "notimp",
                response.send_response(error(ResponseCode::NotImp)).await,
            );
        }
        let Ok(info) = request.request_info() else {
            return (
                "formerr",
                response.send_response(error(ResponseCode::FormErr)).await,
            );
        };
        let query = info.query;
        let qname = query.name().to_lowercase();
        let in_zone = self.serves(&qname);
        if !in_zone {
            return self
                .forward(request, query.query_class(), response, &our_edns)
                .await;
        }
        if !matches!(query.query_class(), DNSClass::IN | DNSClass::ANY) {
            return (
                "refused",
                response.send_response(error(ResponseCode::Refused)).await,
            );
        }
        let limit = match request.protocol() {
            Protocol::Udp => {
                fit::udp_limit(request.edns.as_ref(), self.udp_max_for(request.src().ip()))
            }
            _ => u16::MAX as usize,
        };
        let reply = self.zone_reply(
            &request.metadata,
            query.original(),
            &qname,
            Room {
                limit,
                question: Question::Copied,
                edns: our_edns.as_ref(),
            },
            self.forwarder.allowed(request.src().ip()),
            self.vips.ttl_for(request.src().ip()),
        );
        let msg = MessageResponseBuilder::new(&request.queries, our_edns.as_ref()).build(
            reply.metadata,
            reply.fitted.answers.iter(),
            reply.fitted.authority.iter(),
            std::iter::empty::<&Record>(),
            reply.fitted.additionals.iter(),
        );
        (reply.outcome.label(), response.send_response(msg).await)
    }

    /// The reply to a query for a name in the zone (`qname`, lowercased), cut to fit the
    /// room. No I/O: the UDP fast path encodes
    /// it itself, the hickory path sends it.
    pub fn zone_reply(
        &self,
        request: &Metadata,
        query: &Query,
        qname: &Name,
        room: Room<'_>,
        recursion_available: bool,
        vip_ttl: Option<u32>,
    ) -> ZoneReply {
        let rng = &mut fastrand::Rng::new();
        let answer = match &self.consul {
            Some(consul) if consul.contains(qname) => consul.answer(
                &self.zone,
                &self.mirror,
                qname,
                query.query_type(),
                rng,
                vip_ttl,
            ),
            _ => answer::answer(
                &self.zone,
                &self.mirror,
                qname,
                query.query_type(),
                rng,
                vip_ttl,
            ),
        };
        let outcome = answer.outcome();
        let source = answer.source.clone();
        let cacheable = answer.cacheable;
        let mut metadata = Metadata::response_from_request(request);
        metadata.authoritative = outcome != Outcome::Refused;
        metadata.recursion_available = recursion_available;
        metadata.response_code = answer.rcode;
        let fitted = fit::fit(answer, metadata, query, room);
        if fitted.truncated {
            metadata.truncation = true;
            self.metrics.dns_truncated.inc();
        }
        ZoneReply {
            metadata,
            cacheable: cacheable && !fitted.truncated,
            fitted,
            outcome,
            source,
        }
    }

    /// Relays a query for a name outside the zone, when it may be: only class IN queries
    /// that ask for recursion (RD), from allowed clients. Anything else — CHAOS queries such
    /// as `version.bind` included — is REFUSED here and never reaches an upstream.
    async fn forward<R: ResponseHandler>(
        &self,
        request: &Request,
        class: DNSClass,
        response: &mut R,
        our_edns: &Option<Edns>,
    ) -> (&'static str, Sent) {
        let error = |code: ResponseCode| {
            MessageResponseBuilder::new(&request.queries, our_edns.as_ref())
                .error_msg(&request.metadata, code)
        };
        if class != DNSClass::IN
            || !request.metadata.recursion_desired
            || !self.forwarder.allowed(request.src().ip())
        {
            return (
                "refused",
                response.send_response(error(ResponseCode::Refused)).await,
            );
        }
        let tcp = request.protocol() != Protocol::Udp;
        match self.forwarder.forward(request.as_slice(), tcp).await {
            Ok(reply) => {
                // Not our zone: never authoritative, whatever the upstream said.
                let mut metadata = reply.metadata;
                metadata.authoritative = false;
                // The upstream's EDNS options, with our payload size; none if the client
                // sent no EDNS (RFC 6891 §7).
                let edns = reply
                    .edns
                    .clone()
                    .filter(|_| request.edns.is_some())
                    .map(|mut e| {
                        e.set_max_payload(self.max_udp_payload);
                        e.set_version(0);
                        e
                    });
                let msg = MessageResponseBuilder::new(&request.queries, edns.as_ref()).build(
                    metadata,
                    reply.answers.iter(),
                    reply.authorities.iter(),
                    std::iter::empty::<&Record>(),
                    reply.additionals.iter(),
                );
                ("forwarded", response.send_response(msg).await)
            }
            Err(e @ ForwardError::Busy(_)) => {
                tracing::debug!(error = %e, "forwarding refused");
                (
                    "servfail",
                    response.send_response(error(ResponseCode::ServFail)).await,
                )
            }
            Err(e) => {
                tracing::debug!(error = %e, "forwarding failed");
                (
                    "servfail",
                    response.send_response(error(ResponseCode::ServFail)).await,
                )
            }
        }
    }
}
