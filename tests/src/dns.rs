//! DNS clients for tests: hickory's own client over UDP and TCP, and raw messages for the
//! cases a client library hides (EDNS sizes, garbage).

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use hickory_net::client::{Client, ClientHandle};
use hickory_net::runtime::TokioRuntimeProvider;
use hickory_net::tcp::TcpClientStream;
use hickory_net::udp::UdpClientStream;
use hickory_proto::op::{Edns, Message, Query};
use hickory_proto::rr::{DNSClass, Name, RData, RecordType};
use hickory_proto::serialize::binary::{BinDecodable, BinDecoder};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Asks with hickory's client over UDP.
pub async fn udp(server: SocketAddr, name: &str, rtype: RecordType) -> Message {
    let conn = UdpClientStream::builder(server, TokioRuntimeProvider::default()).build();
    let (mut client, bg) = Client::<TokioRuntimeProvider>::from_sender(conn);
    let bg = tokio::spawn(bg);
    let resp = client
        .query(Name::from_ascii(name).expect("name"), DNSClass::IN, rtype)
        .await
        .expect("UDP query answered");
    bg.abort();
    resp.into_message()
}

/// Asks with hickory's client over TCP.
pub async fn tcp(server: SocketAddr, name: &str, rtype: RecordType) -> Message {
    let (stream, sender) = TcpClientStream::new(server, None, None, TokioRuntimeProvider::new());
    let (mut client, bg) =
        Client::<TokioRuntimeProvider>::new(stream.await.expect("TCP connect"), sender);
    let bg = tokio::spawn(bg);
    let resp = client
        .query(Name::from_ascii(name).expect("name"), DNSClass::IN, rtype)
        .await
        .expect("TCP query answered");
    bg.abort();
    resp.into_message()
}

/// A query message; `edns` gives the advertised UDP payload size, if any.
pub fn query(name: &str, rtype: RecordType, edns: Option<u16>) -> Message {
    let mut m = Message::query();
    m.metadata.id = fastrand_id();
    m.metadata.recursion_desired = true;
    m.add_query(Query::query(Name::from_ascii(name).expect("name"), rtype));
    if let Some(size) = edns {
        let mut e = Edns::new();
        e.set_max_payload(size);
        m.set_edns(e);
    }
    m
}

fn fastrand_id() -> u16 {
    (std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .subsec_nanos()
        & 0xffff) as u16
}

/// Sends raw bytes over UDP; returns the reply bytes, or None after `wait`.
pub async fn raw_udp(server: SocketAddr, bytes: &[u8], wait: Duration) -> Option<Vec<u8>> {
    let socket = tokio::net::UdpSocket::bind("127.0.0.1:0")
        .await
        .expect("bind");
    socket.send_to(bytes, server).await.expect("send");
    let mut buf = vec![0u8; 65535];
    match tokio::time::timeout(wait, socket.recv(&mut buf)).await {
        Ok(Ok(n)) => Some(buf[..n].to_vec()),
        _ => None,
    }
}

/// Sends a message over UDP and parses the reply, also returning its size in bytes.
pub async fn send_udp(server: SocketAddr, m: &Message) -> (Message, usize) {
    let reply = raw_udp(server, &m.to_vec().expect("encode"), Duration::from_secs(5))
        .await
        .expect("UDP reply");
    (Message::from_vec(&reply).expect("valid reply"), reply.len())
}

/// Parses a reply strictly: the counts in the header match the records, and nothing follows
/// them (hickory's own parser ignores trailing bytes).
pub fn parse_strict(bytes: &[u8]) -> Result<Message, String> {
    let mut decoder = BinDecoder::new(bytes);
    let m = Message::read(&mut decoder).map_err(|e| e.to_string())?;
    match decoder.len() {
        0 => Ok(m),
        n => Err(format!("{n} bytes after the last record")),
    }
}

/// Sends a message over UDP; returns the reply's bytes (panics after 5 s without one).
pub async fn send_udp_bytes(server: SocketAddr, m: &Message) -> Vec<u8> {
    raw_udp(server, &m.to_vec().expect("encode"), Duration::from_secs(5))
        .await
        .expect("UDP reply")
}

/// Sends a message over TCP and parses the reply.
pub async fn send_tcp(server: SocketAddr, m: &Message) -> Message {
    parse_strict(&send_tcp_bytes(server, m).await).expect("valid reply")
}

/// Sends a message over TCP; returns the reply's bytes.
pub async fn send_tcp_bytes(server: SocketAddr, m: &Message) -> Vec<u8> {
    let mut s = tokio::net::TcpStream::connect(server)
        .await
        .expect("connect");
    let bytes = m.to_vec().expect("encode");
    s.write_all(&(bytes.len() as u16).to_be_bytes())
        .await
        .expect("write");
    s.write_all(&bytes).await.expect("write");
    let len = s.read_u16().await.expect("reply length") as usize;
    let mut buf = vec![0u8; len];
    s.read_exact(&mut buf).await.expect("reply");
    buf
}

/// The A/AAAA addresses in a message's answer section, sorted.
pub fn addresses(m: &Message) -> Vec<IpAddr> {
    let mut v: Vec<IpAddr> = m
        .answers
        .iter()
        .filter_map(|r| match &r.data {
            RData::A(a) => Some(IpAddr::V4(a.0)),
            RData::AAAA(a) => Some(IpAddr::V6(a.0)),
            _ => None,
        })
        .collect();
    v.sort();
    v
}

/// The A records answered over UDP for `name`, sorted.
pub async fn a_records(server: SocketAddr, name: &str) -> Vec<IpAddr> {
    addresses(&udp(server, name, RecordType::A).await)
}
