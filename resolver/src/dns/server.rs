//! The DNS server: sockets, and the hickory [`RequestHandler`] that answers the zone from the
//! mirror and forwards the rest. Decisions live in [`super::answer`] and [`super::fit`].

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hickory_net::xfer::Protocol;
use hickory_proto::op::{Edns, Metadata, OpCode, ResponseCode};
use hickory_proto::rr::{DNSClass, Record};
use hickory_server::net::runtime::Time;
use hickory_server::server::{Request, RequestHandler, ResponseHandler, ResponseInfo, Server};
use hickory_server::zone_handler::MessageResponseBuilder;
use tokio::net::{TcpListener, UdpSocket};
use waymark_shared::Mirror;

use super::answer::{self, Zone};
use super::fit;
use super::forward::Forwarder;
use crate::metrics::{DnsLabels, Metrics};

/// Everything a query needs.
pub struct Handler {
    pub zone: Zone,
    pub mirror: Arc<Mirror>,
    pub forwarder: Forwarder,
    pub panic_threshold: Box<dyn Fn(&str) -> f64 + Send + Sync>,
    pub max_udp_payload: u16,
    pub metrics: Arc<Metrics>,
}

/// Binds UDP and TCP on the same address; with port 0, on the same free port.
pub async fn bind(addr: SocketAddr) -> std::io::Result<(UdpSocket, TcpListener)> {
    let mut last = None;
    for _ in 0..20 {
        let udp = UdpSocket::bind(addr).await?;
        let port = udp.local_addr()?.port();
        match TcpListener::bind(SocketAddr::new(addr.ip(), port)).await {
            Ok(tcp) => return Ok((udp, tcp)),
            Err(e) if addr.port() == 0 && e.kind() == std::io::ErrorKind::AddrInUse => {
                last = Some(e)
            }
            Err(e) => return Err(e),
        }
    }
    Err(last.unwrap_or_else(|| std::io::Error::other("no free port")))
}

/// Starts serving DNS on the bound sockets.
pub fn serve(
    handler: Handler,
    udp: UdpSocket,
    tcp: TcpListener,
    tcp_idle: Duration,
) -> Server<Handler> {
    let mut server = Server::new(handler);
    server.register_socket(udp);
    server.register_listener(tcp, tcp_idle, 64);
    server
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
        let our_edns = request.edns.as_ref().map(|_| {
            let mut e = Edns::new();
            e.set_max_payload(self.max_udp_payload);
            e
        });
        let error = |code: ResponseCode| {
            MessageResponseBuilder::new(&request.queries, our_edns.as_ref())
                .error_msg(&request.metadata, code)
        };
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
        let in_zone = self.zone.contains(&qname);
        if !in_zone {
            return self.forward(request, response, &our_edns).await;
        }
        if !matches!(query.query_class(), DNSClass::IN | DNSClass::ANY) {
            return (
                "refused",
                response.send_response(error(ResponseCode::Refused)).await,
            );
        }
        let answer = answer::answer(
            &self.zone,
            &self.mirror,
            &*self.panic_threshold,
            &qname,
            query.query_type(),
            &mut fastrand::Rng::new(),
        );
        let outcome = match answer.rcode {
            ResponseCode::NXDomain => "nxdomain",
            _ if answer.is_nodata() => "nodata",
            _ => "answer",
        };
        let mut metadata = Metadata::response_from_request(&request.metadata);
        metadata.authoritative = true;
        metadata.recursion_available = self.forwarder.allowed(request.src().ip());
        metadata.response_code = answer.rcode;
        let limit = match request.protocol() {
            Protocol::Udp => fit::udp_limit(request.edns.as_ref(), self.max_udp_payload),
            _ => u16::MAX as usize,
        };
        let fitted = fit::fit(answer, metadata, query.original(), our_edns.as_ref(), limit);
        if fitted.truncated {
            metadata.truncation = true;
            self.metrics.dns_truncated.inc();
        }
        let msg = MessageResponseBuilder::new(&request.queries, our_edns.as_ref()).build(
            metadata,
            fitted.answers.iter(),
            fitted.authority.iter(),
            std::iter::empty::<&Record>(),
            fitted.additionals.iter(),
        );
        (outcome, response.send_response(msg).await)
    }

    async fn forward<R: ResponseHandler>(
        &self,
        request: &Request,
        response: &mut R,
        our_edns: &Option<Edns>,
    ) -> (&'static str, Sent) {
        let error = |code: ResponseCode| {
            MessageResponseBuilder::new(&request.queries, our_edns.as_ref())
                .error_msg(&request.metadata, code)
        };
        if !self.forwarder.allowed(request.src().ip()) {
            return (
                "refused",
                response.send_response(error(ResponseCode::Refused)).await,
            );
        }
        let tcp = request.protocol() != Protocol::Udp;
        match self.forwarder.forward(request.as_slice(), tcp).await {
            Ok(reply) => {
                let msg = MessageResponseBuilder::new(&request.queries, reply.edns.as_ref()).build(
                    reply.metadata,
                    reply.answers.iter(),
                    reply.authorities.iter(),
                    std::iter::empty::<&Record>(),
                    reply.additionals.iter(),
                );
                ("forwarded", response.send_response(msg).await)
            }
            Err(e) => {
                tracing::warn!(error = %e, "forwarding failed");
                (
                    "servfail",
                    response.send_response(error(ResponseCode::ServFail)).await,
                )
            }
        }
    }
}
