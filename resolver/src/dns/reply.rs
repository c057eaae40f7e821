//! One reply, computed by hickory's parser and the [`Handler`] and kept as bytes: what the
//! UDP slow path and DNS over TCP send. Over UDP a reply must fit the client's size (see
//! [`super::fit::udp_limit`]): one over it is cut to its header and question with TC set, so
//! that what is sent always parses and always fits; over TCP the limit is the message size.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use hickory_net::runtime::TokioTime;
use hickory_net::xfer::Protocol;
use hickory_net::NetError;
use hickory_proto::op::{Edns, Header, Message, MessageType, ResponseCode};
use hickory_proto::rr::Record;
use hickory_proto::serialize::binary::BinEncoder;
use hickory_server::server::{Request, RequestHandler, ResponseHandler, ResponseInfo};
use hickory_server::zone_handler::MessageResponse;

use super::fit;
use super::server::Handler;
use super::wire;

/// The reply to `packet` from `src`, or none (a response, not a query; or too short to
/// answer at all). A packet hickory cannot parse gets FORMERR.
pub async fn answer(
    packet: Vec<u8>,
    src: SocketAddr,
    protocol: Protocol,
    handler: &Handler,
) -> Option<Vec<u8>> {
    let header: Option<[u8; wire::HEADER]> = packet.get(..wire::HEADER).map(|h| {
        let mut a = [0u8; wire::HEADER];
        a.copy_from_slice(h);
        a
    });
    match Request::from_bytes(packet, src, protocol) {
        Ok(request) if request.metadata.message_type == MessageType::Response => None,
        Ok(request) => {
            let limit = match protocol {
                Protocol::Udp => {
                    fit::udp_limit(request.edns.as_ref(), handler.udp_max_for(src.ip()))
                }
                _ => u16::MAX as usize,
            };
            let capture = Capture::new(limit);
            handler
                .handle_request::<_, TokioTime>(&request, capture.clone())
                .await;
            capture.take()
        }
        Err(_) => header.and_then(|h| wire::formerr(&h)).map(|h| h.to_vec()),
    }
}

/// A [`ResponseHandler`] that keeps the encoded reply for the caller to send. A reply over
/// the client's size limit (a relayed upstream answer, say) is replaced by its header and
/// question with TC set, so that what is sent always parses and always fits.
#[derive(Clone)]
struct Capture {
    reply: Arc<Mutex<Option<Vec<u8>>>>,
    limit: usize,
}

impl Capture {
    fn new(limit: usize) -> Capture {
        Capture {
            reply: Arc::default(),
            limit,
        }
    }

    fn take(&self) -> Option<Vec<u8>> {
        self.reply.lock().ok()?.take()
    }
}

/// `reply` cut to its header, question and EDNS (without options), with TC set.
fn truncated(reply: &[u8]) -> Result<Vec<u8>, hickory_proto::ProtoError> {
    let full = Message::from_vec(reply)?;
    let mut m = Message::new(
        full.metadata.id,
        MessageType::Response,
        full.metadata.op_code,
    );
    m.metadata = full.metadata;
    m.metadata.truncation = true;
    m.add_queries(full.queries);
    if let Some(edns) = full.edns {
        let mut ours = Edns::new();
        ours.set_max_payload(edns.max_payload());
        ours.set_dnssec_ok(edns.flags().dnssec_ok);
        m.set_edns(ours);
    }
    m.to_vec()
}

#[async_trait::async_trait]
impl ResponseHandler for Capture {
    async fn send_response<'a>(
        &mut self,
        response: MessageResponse<
            '_,
            'a,
            impl Iterator<Item = &'a Record> + Send + 'a,
            impl Iterator<Item = &'a Record> + Send + 'a,
            impl Iterator<Item = &'a Record> + Send + 'a,
            impl Iterator<Item = &'a Record> + Send + 'a,
        >,
    ) -> Result<ResponseInfo, NetError> {
        let metadata = *response.metadata();
        let servfail = || -> Result<(ResponseInfo, Vec<u8>), NetError> {
            let mut m = Message::new(metadata.id, MessageType::Response, metadata.op_code);
            m.metadata.response_code = ResponseCode::ServFail;
            let bytes = m.to_vec()?;
            let info = ResponseInfo::from(Header {
                metadata: m.metadata,
                counts: Default::default(),
            });
            Ok((info, bytes))
        };
        // Encoded whole (an encoder's size limit leaves the bytes of a record that did not
        // fit behind), then cut if it is over the client's limit.
        let mut bytes = Vec::with_capacity(512);
        let mut encoder = BinEncoder::new(&mut bytes);
        let result = response.destructive_emit(&mut encoder);
        let (info, bytes) = match result {
            Ok(info) if bytes.len() <= self.limit => (info, bytes),
            Ok(info) => match truncated(&bytes) {
                Ok(cut) if cut.len() <= self.limit => (info, cut),
                _ => servfail()?,
            },
            Err(e) => {
                tracing::warn!(error = %e, "could not encode a reply; sending SERVFAIL");
                servfail()?
            }
        };
        if let Ok(mut slot) = self.reply.lock() {
            *slot = Some(bytes);
        }
        Ok(info)
    }
}
