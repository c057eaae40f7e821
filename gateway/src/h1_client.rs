//! The lean path's HTTP/1.1 client side toward instances (RFC 9112), in the request's own
//! task: no connection task, no channel to one, no second header map.
//!
//! What it owns: the wire format toward instances. A request's head is encoded once into
//! bytes ([`encode_head`]) that every try writes as they are; the instance's answer head is
//! parsed in place and its body ([`AnswerBody`]) read straight from the socket as the client
//! takes it, framed by length, chunks or the connection's close ([`answer_framing`]); 1xx
//! answers other than 101 are passed over; [`keep_alive`] says whether the connection may
//! carry another request once the answer is read to its end, and the body then gives it back
//! to its [`Pool`](crate::upstream::Pool) itself. Which connection and which instance are the
//! pool's and the lean path's.
//!
//! Why: hyper's client runs a task per connection and hands each request and answer across
//! a channel to it, and builds the head from a header map the gateway has just edited; the
//! profile had that at about a quarter of the lean path's instructions per request
//! (`tests/bench/results/gateway-profile.md`, step 7). hyper's client stays for
//! `preserve_header_case`, whose original case only hyper can read.

use std::future::poll_fn;
use std::io;
use std::mem::MaybeUninit;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll, Waker};
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use http::header::TRANSFER_ENCODING;
use http::header::{HeaderMap, HeaderName, HeaderValue, CONNECTION, CONTENT_LENGTH};
use http::{Method, StatusCode, Version};
use http_body_util::BodyExt;
use hyper::body::{Frame, SizeHint};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::lean::Body;
use crate::upstream::{dial, ConnectError, Pool, Pooled};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// At most this many header fields in an answer head (hyper's limit is 100).
pub const MAX_HEADERS: usize = 128;
/// An answer head larger than this is refused (hyper's default buffer limit is about 400 KiB;
/// nginx's `proxy_buffer_size` is 4–8 KiB).
pub const MAX_HEAD_BYTES: usize = 64 * 1024;
/// Reads from an instance take at most this much at once.
const READ_SIZE: usize = 16 * 1024;
/// A chunk-size line (with its extensions) longer than this is refused.
const MAX_CHUNK_LINE: usize = 4096;
/// A chunked body's trailer section larger than this is refused.
const MAX_TRAILER_BYTES: usize = 16 * 1024;
/// A short body goes out in the head's write.
const COALESCE_BYTES: usize = 16 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum H1Error {
    #[error(transparent)]
    Connect(#[from] ConnectError),
    #[error("write to instance")]
    Write(#[source] io::Error),
    #[error("read from instance")]
    Read(#[source] io::Error),
    /// The connection ended before a whole answer head: what an instance that died, or
    /// closed an idle connection as it was reused, looks like.
    #[error("instance closed the connection before answering")]
    ClosedBeforeAnswer,
    #[error("instance closed the connection in the middle of its answer's body")]
    ClosedMidBody,
    #[error("instance's answer head is larger than {MAX_HEAD_BYTES} bytes")]
    HeadTooLarge,
    #[error("instance's answer head")]
    Parse(#[from] httparse::Error),
    #[error("instance's answer: {0}")]
    Malformed(&'static str),
    #[error("request body")]
    Body(#[source] BoxError),
}

impl H1Error {
    /// Nothing reached the instance: the connection was never made.
    pub fn is_connect(&self) -> bool {
        matches!(self, H1Error::Connect(_))
    }

    /// No answer came because the connection closed or reset first.
    pub fn closed_before_answer(&self) -> bool {
        use io::ErrorKind::{BrokenPipe, ConnectionAborted, ConnectionReset};
        match self {
            H1Error::ClosedBeforeAnswer => true,
            H1Error::Write(e) | H1Error::Read(e) => {
                matches!(e.kind(), ConnectionReset | ConnectionAborted | BrokenPipe)
            }
            _ => false,
        }
    }
}

/// The request line and header fields, in origin form, each name as the map holds it (lower
/// case): the map's fields but those `set` names, then `set`'s (see
/// [`HeaderOverlay`](crate::admission::HeaderOverlay)); `chunked` adds
/// `Transfer-Encoding: chunked` for a body of unknown length.
pub fn encode_head(
    method: &Method,
    target: &str,
    headers: &HeaderMap,
    set: &[(HeaderName, HeaderValue)],
    chunked: bool,
) -> Bytes {
    let mut size = method.as_str().len() + target.len() + 16;
    for (name, value) in headers.iter().chain(set.iter().map(|(n, v)| (n, v))) {
        size += name.as_str().len() + value.len() + 4;
    }
    let mut b = Vec::with_capacity(size + if chunked { 28 } else { 0 });
    b.extend_from_slice(method.as_str().as_bytes());
    b.push(b' ');
    b.extend_from_slice(target.as_bytes());
    b.extend_from_slice(b" HTTP/1.1\r\n");
    let replaced = |name: &HeaderName| set.iter().any(|(n, _)| n == name);
    let kept = headers.iter().filter(|(name, _)| !replaced(name));
    for (name, value) in kept.chain(set.iter().map(|(n, v)| (n, v))) {
        push_field(&mut b, name, value);
    }
    if chunked {
        b.extend_from_slice(b"transfer-encoding: chunked\r\n");
    }
    b.extend_from_slice(b"\r\n");
    Bytes::from(b)
}

/// One header (or trailer) field line.
fn push_field(b: &mut Vec<u8>, name: &HeaderName, value: &HeaderValue) {
    b.extend_from_slice(name.as_str().as_bytes());
    b.extend_from_slice(b": ");
    b.extend_from_slice(value.as_bytes());
    b.extend_from_slice(b"\r\n");
}

/// How an answer's body is delimited (RFC 9112 §6.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    /// No body: a HEAD's answer, 1xx, 204, 304, or a zero length.
    Empty,
    Length(u64),
    Chunked,
    /// Until the instance closes the connection.
    UntilClose,
}

/// Which of the fields that frame an answer and rule its connection's reuse the head has:
/// noted while its fields are parsed, so that framing and keep-alive look up in the map only
/// the fields that are there (most answers have a length and nothing else of these).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FramingFields {
    pub transfer_encoding: bool,
    pub content_length: bool,
    pub connection: bool,
}

impl FramingFields {
    /// Read off a map (the tests' way to state what a head has).
    #[cfg(test)]
    pub fn of(headers: &HeaderMap) -> FramingFields {
        FramingFields {
            transfer_encoding: headers.contains_key(TRANSFER_ENCODING),
            content_length: headers.contains_key(CONTENT_LENGTH),
            connection: headers.contains_key(CONNECTION),
        }
    }

    /// Notes one field's name.
    fn note(&mut self, name: &HeaderName) {
        if *name == CONTENT_LENGTH {
            self.content_length = true;
        } else if *name == TRANSFER_ENCODING {
            self.transfer_encoding = true;
        } else if *name == CONNECTION {
            self.connection = true;
        }
    }
}

/// The framing of an answer with `status` and `headers` (of which `fields` says which framing
/// fields are there) to a request that was a HEAD or not.
pub fn answer_framing(
    head_request: bool,
    status: u16,
    headers: &HeaderMap,
    fields: FramingFields,
) -> Result<Framing, H1Error> {
    if head_request || (100..200).contains(&status) || status == 204 || status == 304 {
        return Ok(Framing::Empty);
    }
    if fields.transfer_encoding {
        // The final coding decides; anything but chunked runs to the close.
        let last = headers
            .get_all(TRANSFER_ENCODING)
            .iter()
            .flat_map(|v| v.as_bytes().split(|b| *b == b','))
            .map(<[u8]>::trim_ascii)
            .rfind(|t| !t.is_empty());
        return Ok(match last {
            Some(t) if t.eq_ignore_ascii_case(b"chunked") => Framing::Chunked,
            _ => Framing::UntilClose,
        });
    }
    let mut length = None;
    let lengths = fields
        .content_length
        .then(|| headers.get_all(CONTENT_LENGTH));
    for value in lengths.into_iter().flatten() {
        for item in value.as_bytes().split(|b| *b == b',') {
            let n = parse_decimal(item.trim_ascii())
                .ok_or(H1Error::Malformed("invalid Content-Length"))?;
            if length.is_some_and(|l| l != n) {
                return Err(H1Error::Malformed("conflicting Content-Length values"));
            }
            length = Some(n);
        }
    }
    Ok(match length {
        Some(0) => Framing::Empty,
        Some(n) => Framing::Length(n),
        None => Framing::UntilClose,
    })
}

fn parse_decimal(digits: &[u8]) -> Option<u64> {
    if digits.is_empty() || digits.len() > 19 || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    Some(digits.iter().fold(0, |n, d| n * 10 + u64::from(d - b'0')))
}

/// Whether the connection may carry another request after this answer: HTTP/1.1 unless it
/// says `close`, HTTP/1.0 only if it says `keep-alive`; never after a body read to the close,
/// nor after an answer framed by both a length and chunks (RFC 9112 §6.3: a smuggling sign).
pub fn keep_alive(
    minor_version: u8,
    headers: &HeaderMap,
    fields: FramingFields,
    framing: Framing,
) -> bool {
    if framing == Framing::UntilClose || (fields.transfer_encoding && fields.content_length) {
        return false;
    }
    let mut close = minor_version == 0;
    let connection = fields.connection.then(|| headers.get_all(CONNECTION));
    for token in connection
        .into_iter()
        .flatten()
        .flat_map(|v| v.as_bytes().split(|b| *b == b','))
        .map(<[u8]>::trim_ascii)
    {
        if token.eq_ignore_ascii_case(b"close") {
            return false;
        }
        if token.eq_ignore_ascii_case(b"keep-alive") {
            close = false;
        }
    }
    !close
}

/// What a chunked body's decoder found.
#[derive(Debug, PartialEq)]
pub enum Piece {
    Data(Bytes),
    /// The trailer section; the body ends with it.
    Trailers(HeaderMap),
    /// The last chunk, with no trailers.
    End,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ChunkState {
    Size,
    Data(u64),
    DataEnd,
    Trailers,
    Done,
}

/// The chunked coding's decoder, fed from the connection's read buffer.
#[derive(Debug)]
pub struct Chunked {
    state: ChunkState,
}

impl Default for Chunked {
    fn default() -> Self {
        Chunked {
            state: ChunkState::Size,
        }
    }
}

impl Chunked {
    /// The next piece `buf` holds, taken from it; `None` when more bytes are needed.
    pub fn decode(&mut self, buf: &mut BytesMut) -> Result<Option<Piece>, H1Error> {
        loop {
            match self.state {
                ChunkState::Size => {
                    let Some(nl) = memchr::memchr(b'\n', buf) else {
                        if buf.len() > MAX_CHUNK_LINE {
                            return Err(H1Error::Malformed("chunk-size line too long"));
                        }
                        return Ok(None);
                    };
                    let size = chunk_size(&buf[..nl])?;
                    buf.advance(nl + 1);
                    self.state = match size {
                        0 => ChunkState::Trailers,
                        n => ChunkState::Data(n),
                    };
                }
                ChunkState::Data(left) => {
                    if buf.is_empty() {
                        return Ok(None);
                    }
                    let take = left.min(buf.len() as u64);
                    self.state = match left - take {
                        0 => ChunkState::DataEnd,
                        n => ChunkState::Data(n),
                    };
                    return Ok(Some(Piece::Data(buf.split_to(take as usize).freeze())));
                }
                ChunkState::DataEnd => {
                    if buf.len() < 2 {
                        return Ok(None);
                    }
                    if &buf[..2] != b"\r\n" {
                        return Err(H1Error::Malformed("chunk data not followed by CRLF"));
                    }
                    buf.advance(2);
                    self.state = ChunkState::Size;
                }
                ChunkState::Trailers => {
                    if buf.len() < 2 {
                        return Ok(None);
                    }
                    if buf.starts_with(b"\r\n") {
                        buf.advance(2);
                        self.state = ChunkState::Done;
                        return Ok(Some(Piece::End));
                    }
                    let Some(end) = memchr::memmem::find(buf, b"\r\n\r\n") else {
                        if buf.len() > MAX_TRAILER_BYTES {
                            return Err(H1Error::Malformed("trailer section too large"));
                        }
                        return Ok(None);
                    };
                    let section = buf.split_to(end + 4).freeze();
                    self.state = ChunkState::Done;
                    return Ok(Some(Piece::Trailers(trailers(&section)?)));
                }
                ChunkState::Done => return Ok(Some(Piece::End)),
            }
        }
    }
}

/// A chunk-size line (without its LF): hex digits, then optional extensions, then CR.
fn chunk_size(line: &[u8]) -> Result<u64, H1Error> {
    let line = line
        .strip_suffix(b"\r")
        .ok_or(H1Error::Malformed("chunk-size line not ended by CRLF"))?;
    let digits = line
        .iter()
        .position(|b| !b.is_ascii_hexdigit())
        .unwrap_or(line.len());
    let rest = line[digits..].trim_ascii_start();
    if digits == 0 || digits > 16 || !(rest.is_empty() || rest[0] == b';') {
        return Err(H1Error::Malformed("invalid chunk size"));
    }
    let mut n: u64 = 0;
    for d in &line[..digits] {
        let v = (*d as char).to_digit(16).unwrap_or(0);
        n = n << 4 | u64::from(v);
    }
    Ok(n)
}

fn trailers(section: &Bytes) -> Result<HeaderMap, H1Error> {
    let mut fields = [httparse::EMPTY_HEADER; 32];
    let (_, parsed) = match httparse::parse_headers(section, &mut fields)? {
        httparse::Status::Complete(done) => done,
        httparse::Status::Partial => return Err(H1Error::Malformed("trailer section")),
    };
    let mut map = HeaderMap::with_capacity(parsed.len());
    for field in parsed {
        let name = HeaderName::from_bytes(field.name.as_bytes())
            .map_err(|_| H1Error::Malformed("trailer field name"))?;
        let value = HeaderValue::from_maybe_shared(section.slice_ref(field.value))
            .map_err(|_| H1Error::Malformed("trailer field value"))?;
        map.append(name, value);
    }
    Ok(map)
}

/// What a try sends after the head.
pub enum Outgoing {
    /// A body already read (or none): written with the head, and again on another try.
    Bytes(Bytes),
    /// A body streamed from the client, chunked when its length is unknown.
    Stream { body: Body, chunked: bool },
}

/// One HTTP/1.1 connection to an instance and what has been read from it but not yet used.
pub struct H1Conn {
    io: TcpStream,
    read: BytesMut,
}

/// An answer's head, and how its body is to be read.
pub struct AnswerHead {
    pub parts: http::response::Parts,
    pub framing: Framing,
    pub keep_alive: bool,
}

impl H1Conn {
    pub async fn connect(addr: SocketAddr, within: Duration) -> Result<H1Conn, H1Error> {
        let io = dial(addr, within).await?;
        Ok(H1Conn {
            io,
            read: BytesMut::new(),
        })
    }

    /// Sends one request (`head` from [`encode_head`], then `out`) and reads the answer's
    /// head. A streamed body goes out while the answer is awaited: an instance may answer
    /// before it has read the whole body (then the rest is not sent and the connection is
    /// not reused).
    pub async fn exchange(
        &mut self,
        head: &[u8],
        out: Outgoing,
        head_request: bool,
    ) -> Result<AnswerHead, H1Error> {
        let io = &mut self.io;
        match out {
            Outgoing::Bytes(body) if body.is_empty() => {
                io.write_all(head).await.map_err(H1Error::Write)?
            }
            Outgoing::Bytes(body) if head.len() + body.len() <= COALESCE_BYTES => {
                let mut both = Vec::with_capacity(head.len() + body.len());
                both.extend_from_slice(head);
                both.extend_from_slice(&body);
                io.write_all(&both).await.map_err(H1Error::Write)?
            }
            Outgoing::Bytes(body) => {
                io.write_all(head).await.map_err(H1Error::Write)?;
                io.write_all(&body).await.map_err(H1Error::Write)?
            }
            Outgoing::Stream { body, chunked } => {
                io.write_all(head).await.map_err(H1Error::Write)?;
                let H1Conn { io, read } = self;
                let (mut reader, mut writer) = io.split();
                let send = send_body(&mut writer, body, chunked);
                let answer = read_head(&mut reader, read, head_request);
                tokio::pin!(send, answer);
                let mut sent = false;
                loop {
                    tokio::select! {
                        biased;
                        r = &mut send, if !sent => match r {
                            Ok(()) => sent = true,
                            Err(H1Error::Write(e)) => {
                                // The instance may have answered and closed: its answer
                                // is the try's if it comes.
                                sent = true;
                                tracing::debug!(error = %e, "request body write failed");
                            }
                            Err(e) => return Err(e),
                        },
                        a = &mut answer => {
                            let mut a = a?;
                            a.keep_alive &= sent;
                            return Ok(a);
                        }
                    }
                }
            }
        }
        read_head(&mut self.io, &mut self.read, head_request).await
    }

    /// The socket and what was read past the 101's head, for the upgraded connection.
    pub fn into_upgraded(self) -> (TcpStream, Bytes) {
        (self.io, self.read.freeze())
    }
}

impl Pooled for H1Conn {
    /// Closed, or unusable: the instance closed it or sent bytes nobody asked for. Costs no
    /// system call unless the reactor has seen the socket readable.
    fn is_closed(&self) -> bool {
        let mut cx = Context::from_waker(Waker::noop());
        match self.io.poll_read_ready(&mut cx) {
            Poll::Pending => false,
            Poll::Ready(Err(_)) => true,
            Poll::Ready(Ok(())) => {
                let mut probe = [0u8; 1];
                !matches!(self.io.try_read(&mut probe), Err(e) if e.kind() == io::ErrorKind::WouldBlock)
            }
        }
    }
}

async fn send_body(
    io: &mut (impl AsyncWrite + Unpin),
    mut body: Body,
    chunked: bool,
) -> Result<(), H1Error> {
    let mut trailers = None;
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(H1Error::Body)?;
        match frame.into_data() {
            Ok(data) if data.is_empty() => {}
            Ok(data) if chunked => {
                let mut piece = Vec::with_capacity(data.len() + 20);
                piece.extend_from_slice(format!("{:x}\r\n", data.len()).as_bytes());
                piece.extend_from_slice(&data);
                piece.extend_from_slice(b"\r\n");
                io.write_all(&piece).await.map_err(H1Error::Write)?;
            }
            Ok(data) => io.write_all(&data).await.map_err(H1Error::Write)?,
            Err(frame) => trailers = frame.into_trailers().ok(),
        }
    }
    if chunked {
        let mut last = b"0\r\n".to_vec();
        for (name, value) in trailers.iter().flatten() {
            push_field(&mut last, name, value);
        }
        last.extend_from_slice(b"\r\n");
        io.write_all(&last).await.map_err(H1Error::Write)?;
    }
    Ok(())
}

/// Reads into `buf`; `Ok(0)` is the instance's close. Through the socket's `AsyncRead`,
/// which takes a short read as the socket drained (no read to learn it would block: the
/// system call hyper's connections do not make either).
fn poll_fill(
    io: &mut (impl AsyncRead + Unpin),
    buf: &mut BytesMut,
    cx: &mut Context<'_>,
) -> Poll<io::Result<usize>> {
    if buf.capacity() - buf.len() < READ_SIZE / 4 {
        buf.reserve(READ_SIZE);
    }
    tokio_util::io::poll_read_buf(Pin::new(io), cx, buf)
}

/// The answer's head, past any 1xx but a 101.
async fn read_head(
    io: &mut (impl AsyncRead + Unpin),
    buf: &mut BytesMut,
    head_request: bool,
) -> Result<AnswerHead, H1Error> {
    loop {
        if !buf.is_empty() {
            if let Some(head) = parse_head(buf, head_request)? {
                return Ok(head);
            }
            if buf.len() > MAX_HEAD_BYTES {
                return Err(H1Error::HeadTooLarge);
            }
        }
        if poll_fn(|cx| poll_fill(io, buf, cx))
            .await
            .map_err(H1Error::Read)?
            == 0
        {
            return Err(H1Error::ClosedBeforeAnswer);
        }
    }
}

/// The answer head at the front of `buf`, taken from it once whole; `None` while partial.
/// A 1xx other than 101 is dropped and the next head looked for.
fn parse_head(buf: &mut BytesMut, head_request: bool) -> Result<Option<AnswerHead>, H1Error> {
    loop {
        let mut fields = [const { MaybeUninit::uninit() }; MAX_HEADERS];
        let mut resp = httparse::Response::new(&mut []);
        let parsed = httparse::ParserConfig::default().parse_response_with_uninit_headers(
            &mut resp,
            buf,
            &mut fields,
        )?;
        let len = match parsed {
            httparse::Status::Complete(len) => len,
            httparse::Status::Partial => return Ok(None),
        };
        let status = resp.code.unwrap_or(0);
        let minor = resp.version.unwrap_or(1);
        if (100..200).contains(&status) && status != 101 {
            buf.advance(len);
            if buf.is_empty() {
                return Ok(None);
            }
            continue;
        }
        let status = StatusCode::from_u16(status).map_err(|_| H1Error::Malformed("status"))?;
        let reason = resp
            .reason
            .filter(|r| Some(*r) != status.canonical_reason());
        // Names now (they are copied or static); values sliced from the head once it is
        // taken out of the buffer.
        let mut names = Vec::with_capacity(resp.headers.len());
        let mut fields = FramingFields::default();
        let base = buf.as_ptr() as usize;
        for field in resp.headers.iter() {
            let name = HeaderName::from_bytes(field.name.as_bytes())
                .map_err(|_| H1Error::Malformed("header field name"))?;
            fields.note(&name);
            let at = field.value.as_ptr() as usize - base;
            names.push((name, at, field.value.len()));
        }
        let reason = reason.and_then(|r| hyper::ext::ReasonPhrase::try_from(r.as_bytes()).ok());
        let head = buf.split_to(len).freeze();
        let mut headers = HeaderMap::with_capacity(names.len());
        for (name, at, n) in names {
            let value = HeaderValue::from_maybe_shared(head.slice(at..at + n))
                .map_err(|_| H1Error::Malformed("header field value"))?;
            headers.append(name, value);
        }
        let framing = answer_framing(head_request, status.as_u16(), &headers, fields)?;
        let keep_alive = status != StatusCode::SWITCHING_PROTOCOLS
            && keep_alive(minor, &headers, fields, framing);
        if fields.transfer_encoding {
            // The coding frames the body; a length beside it is wrong (RFC 9112 §6.3) and
            // must not reach the client, whose framing the gateway chooses anew.
            headers.remove(CONTENT_LENGTH);
        }
        let (mut parts, ()) = http::Response::new(()).into_parts();
        parts.status = status;
        parts.version = Version::HTTP_11;
        parts.headers = headers;
        if let Some(r) = reason {
            parts.extensions.insert(r);
        }
        return Ok(Some(AnswerHead {
            parts,
            framing,
            keep_alive,
        }));
    }
}

#[derive(Debug)]
enum Reading {
    Length(u64),
    Chunked(Chunked),
    UntilClose,
    Done,
}

/// An answer's body, read from the instance's connection as the client takes it. Read to
/// its end on a connection that may carry another request, it gives the connection back to
/// its pool; dropped before that, it closes it.
pub struct AnswerBody {
    conn: Option<H1Conn>,
    reading: Reading,
    keep_alive: bool,
    home: Option<(Arc<Pool<H1Conn>>, SocketAddr)>,
}

impl AnswerBody {
    pub fn new(
        conn: H1Conn,
        framing: Framing,
        keep_alive: bool,
        home: Option<(Arc<Pool<H1Conn>>, SocketAddr)>,
    ) -> AnswerBody {
        let reading = match framing {
            Framing::Empty => Reading::Done,
            Framing::Length(n) => Reading::Length(n),
            Framing::Chunked => Reading::Chunked(Chunked::default()),
            Framing::UntilClose => Reading::UntilClose,
        };
        let mut body = AnswerBody {
            conn: Some(conn),
            reading,
            keep_alive,
            home,
        };
        if matches!(body.reading, Reading::Done) {
            body.finish();
        }
        body
    }

    /// The answer is read: the connection goes home if it may carry another request (and
    /// the instance sent nothing past the answer), else it closes.
    fn finish(&mut self) {
        self.reading = Reading::Done;
        let Some(conn) = self.conn.take() else {
            return;
        };
        if self.keep_alive && conn.read.is_empty() {
            if let Some((pool, addr)) = self.home.take() {
                pool.park(addr, conn);
            }
        }
    }
}

fn data_frame(data: Bytes) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
    Poll::Ready(Some(Ok(Frame::data(data))))
}

impl hyper::body::Body for AnswerBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        loop {
            let Some(conn) = this.conn.as_mut() else {
                return Poll::Ready(None);
            };
            match &mut this.reading {
                Reading::Done => return Poll::Ready(None),
                Reading::Length(left) => {
                    if !conn.read.is_empty() {
                        let take = (*left).min(conn.read.len() as u64);
                        *left -= take;
                        let data = conn.read.split_to(take as usize).freeze();
                        if *left == 0 {
                            this.finish();
                        }
                        return data_frame(data);
                    }
                }
                Reading::Chunked(decoder) => match decoder.decode(&mut conn.read) {
                    Ok(Some(Piece::Data(d))) => return data_frame(d),
                    Ok(Some(Piece::Trailers(t))) => {
                        this.finish();
                        return Poll::Ready(Some(Ok(Frame::trailers(t))));
                    }
                    Ok(Some(Piece::End)) => {
                        this.finish();
                        return Poll::Ready(None);
                    }
                    Ok(None) => {}
                    Err(e) => {
                        this.conn = None;
                        return Poll::Ready(Some(Err(e.into())));
                    }
                },
                Reading::UntilClose => {
                    if !conn.read.is_empty() {
                        let data = conn.read.split().freeze();
                        return data_frame(data);
                    }
                }
            }
            let filled = ready!(poll_fill(&mut conn.io, &mut conn.read, cx));
            match filled {
                Ok(0) if matches!(this.reading, Reading::UntilClose) => {
                    this.conn = None;
                    this.reading = Reading::Done;
                    return Poll::Ready(None);
                }
                Ok(0) => {
                    this.conn = None;
                    return Poll::Ready(Some(Err(H1Error::ClosedMidBody.into())));
                }
                Ok(_) => {}
                Err(e) => {
                    this.conn = None;
                    return Poll::Ready(Some(Err(H1Error::Read(e).into())));
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        // A length read to zero finishes at once.
        matches!(self.reading, Reading::Done)
    }

    fn size_hint(&self) -> SizeHint {
        match self.reading {
            Reading::Done => SizeHint::with_exact(0),
            Reading::Length(n) => SizeHint::with_exact(n),
            _ => SizeHint::default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Header fields, for the tables.
    type Fields = &'static [(&'static str, &'static str)];

    fn map(fields: &[(&str, &str)]) -> HeaderMap {
        let mut m = HeaderMap::new();
        for (k, v) in fields {
            m.append(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                v.parse().unwrap(),
            );
        }
        m
    }

    #[test]
    fn heads_are_encoded_in_origin_form() {
        let headers = map(&[("host", "a.test"), ("x-many", "1"), ("x-many", "2")]);
        let head = encode_head(&Method::POST, "/p?q=1", &headers, &[], true);
        assert_eq!(
            &head[..],
            b"POST /p?q=1 HTTP/1.1\r\nhost: a.test\r\nx-many: 1\r\nx-many: 2\r\n\
              transfer-encoding: chunked\r\n\r\n"
        );
        // Fields set aside replace the map's of their name, every line of it.
        let set = [
            (
                HeaderName::from_static("x-many"),
                HeaderValue::from_static("3"),
            ),
            (
                HeaderName::from_static("x-new"),
                HeaderValue::from_static("n"),
            ),
        ];
        let head = encode_head(&Method::GET, "/", &headers, &set, false);
        assert_eq!(
            &head[..],
            b"GET / HTTP/1.1\r\nhost: a.test\r\nx-many: 3\r\nx-new: n\r\n\r\n"
        );
    }

    #[test]
    fn framings() {
        use Framing::*;
        let table: [(bool, u16, Fields, Result<Framing, ()>); 14] = [
            (false, 200, &[("content-length", "5")], Ok(Length(5))),
            (false, 200, &[("content-length", "0")], Ok(Empty)),
            (true, 200, &[("content-length", "5")], Ok(Empty)),
            (false, 204, &[], Ok(Empty)),
            (false, 304, &[("content-length", "5")], Ok(Empty)),
            (false, 101, &[], Ok(Empty)),
            (false, 200, &[], Ok(UntilClose)),
            (false, 200, &[("transfer-encoding", "chunked")], Ok(Chunked)),
            (
                false,
                200,
                &[("transfer-encoding", "gzip, Chunked")],
                Ok(Chunked),
            ),
            (
                false,
                200,
                &[("transfer-encoding", "chunked, gzip")],
                Ok(UntilClose),
            ),
            (
                false,
                200,
                &[("transfer-encoding", "chunked"), ("content-length", "3")],
                Ok(Chunked),
            ),
            (false, 200, &[("content-length", "5, 5")], Ok(Length(5))),
            (
                false,
                200,
                &[("content-length", "5"), ("content-length", "6")],
                Err(()),
            ),
            (false, 200, &[("content-length", "+5")], Err(())),
        ];
        for (head, status, fields, want) in table {
            let headers = map(fields);
            let got =
                answer_framing(head, status, &headers, FramingFields::of(&headers)).map_err(|_| ());
            assert_eq!(got, want, "{head} {status} {fields:?}");
        }
    }

    #[test]
    fn framing_fields_noted_by_name_match_the_map() {
        let heads: [&[(&str, &str)]; 5] = [
            &[],
            &[("Content-Length", "3")],
            &[("transfer-encoding", "chunked"), ("x-other", "1")],
            &[("CONNECTION", "close"), ("content-length", "0")],
            &[
                ("te", "trailers"),
                ("content-type", "text/plain"),
                ("keep-alive", "5"),
            ],
        ];
        for fields in heads {
            let mut noted = FramingFields::default();
            for (name, _) in fields {
                noted.note(&HeaderName::from_bytes(name.as_bytes()).unwrap());
            }
            assert_eq!(noted, FramingFields::of(&map(fields)), "{fields:?}");
        }
    }

    #[test]
    fn keep_alives() {
        let table: [(u8, Fields, Framing, bool); 7] = [
            (1, &[], Framing::Length(3), true),
            (1, &[("connection", "close")], Framing::Length(3), false),
            (
                1,
                &[("connection", "Keep-Alive, Close")],
                Framing::Empty,
                false,
            ),
            (0, &[], Framing::Length(3), false),
            (0, &[("connection", "keep-alive")], Framing::Length(3), true),
            (1, &[], Framing::UntilClose, false),
            (
                1,
                &[("transfer-encoding", "chunked"), ("content-length", "3")],
                Framing::Chunked,
                false,
            ),
        ];
        for (minor, fields, framing, want) in table {
            let headers = map(fields);
            assert_eq!(
                keep_alive(minor, &headers, FramingFields::of(&headers), framing),
                want,
                "{minor} {fields:?}"
            );
        }
    }

    /// Decodes `wire` fed `step` bytes at a time; the data joined, and the trailers.
    fn dechunk(wire: &[u8], step: usize) -> Result<(Vec<u8>, Option<HeaderMap>), H1Error> {
        let mut decoder = Chunked::default();
        let mut buf = BytesMut::new();
        let (mut data, mut fed) = (Vec::new(), 0);
        loop {
            match decoder.decode(&mut buf)? {
                Some(Piece::Data(d)) => data.extend_from_slice(&d),
                Some(Piece::Trailers(t)) => return Ok((data, Some(t))),
                Some(Piece::End) => return Ok((data, None)),
                None if fed < wire.len() => {
                    let to = (fed + step).min(wire.len());
                    buf.extend_from_slice(&wire[fed..to]);
                    fed = to;
                }
                None => return Err(H1Error::ClosedMidBody),
            }
        }
    }

    #[test]
    fn chunked_bodies_decode_whatever_the_reads() {
        let wire = b"5\r\nhello\r\n6;ext=1\r\n world\r\nA \r\n0123456789\r\n0\r\n\r\n";
        for step in [1, 2, 3, 7, wire.len()] {
            let (data, trailers) = dechunk(wire, step).unwrap();
            assert_eq!(data, b"hello world0123456789", "step {step}");
            assert!(trailers.is_none());
        }
        let wire = b"3\r\nabc\r\n0\r\ngrpc-status: 0\r\nx-t: a\r\n\r\n";
        for step in [1, 4, wire.len()] {
            let (data, trailers) = dechunk(wire, step).unwrap();
            assert_eq!(data, b"abc");
            let t = trailers.unwrap();
            assert_eq!(t["grpc-status"], "0");
            assert_eq!(t["x-t"], "a");
        }
    }

    #[test]
    fn malformed_chunks_are_refused() {
        let table: [&[u8]; 7] = [
            b"z\r\nabc\r\n0\r\n\r\n",
            b"3\r\nabcd\r\n0\r\n\r\n",
            b"3\nabc\r\n0\r\n\r\n",
            b"-3\r\nabc\r\n0\r\n\r\n",
            b"11111111111111111\r\n",
            b"3 x\r\nabc\r\n0\r\n\r\n",
            b"0\r\nbad header\r\n\r\n",
        ];
        for wire in table {
            assert!(
                dechunk(wire, wire.len()).is_err(),
                "{}",
                String::from_utf8_lossy(wire)
            );
        }
        let long = vec![b'1'; MAX_CHUNK_LINE + 1];
        assert!(dechunk(&long, long.len()).is_err());
    }

    #[test]
    fn heads_parse_past_informational_answers() {
        let mut buf = BytesMut::from(
            &b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 201 Made It\r\nContent-Length: 2\r\n\
               X-A: b\r\n\r\nhi"[..],
        );
        let head = parse_head(&mut buf, false).unwrap().unwrap();
        assert_eq!(head.parts.status, 201);
        assert_eq!(head.parts.headers["x-a"], "b");
        assert_eq!(head.framing, Framing::Length(2));
        assert!(head.keep_alive);
        let reason = head.parts.extensions.get::<hyper::ext::ReasonPhrase>();
        assert_eq!(reason.map(|r| r.as_bytes()), Some(&b"Made It"[..]));
        assert_eq!(&buf[..], b"hi");

        let mut partial = BytesMut::from(&b"HTTP/1.1 200 OK\r\nContent-Le"[..]);
        assert!(parse_head(&mut partial, false).unwrap().is_none());
        let mut bad = BytesMut::from(&b"HTTP/1.1 2x0 OK\r\n\r\n"[..]);
        assert!(parse_head(&mut bad, false).is_err());
    }

    #[test]
    fn a_length_beside_chunks_is_dropped_and_the_connection_not_kept() {
        let mut buf = BytesMut::from(
            &b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\ncontent-length: 9\r\n\r\n"[..],
        );
        let head = parse_head(&mut buf, false).unwrap().unwrap();
        assert_eq!(head.framing, Framing::Chunked);
        assert!(!head.parts.headers.contains_key(CONTENT_LENGTH));
        assert!(!head.keep_alive);
    }

    /// An instance on a real socket that reads one request (up to `until`) and sends
    /// `answer`, then closes or waits for the gateway to; what it received comes back on the
    /// channel.
    async fn instance(
        until: &'static [u8],
        answer: &'static [u8],
        close: bool,
    ) -> (SocketAddr, tokio::sync::oneshot::Receiver<Vec<u8>>) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, rx) = tokio::sync::oneshot::channel();
        tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            let mut got = Vec::new();
            let mut buf = [0u8; 4096];
            while !got.ends_with(until) {
                match s.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => got.extend_from_slice(&buf[..n]),
                }
            }
            s.write_all(answer).await.unwrap();
            if close {
                drop(s);
            } else {
                let _ = s.read(&mut buf).await;
            }
            let _ = tx.send(got);
        });
        (addr, rx)
    }

    fn pool() -> Arc<Pool<H1Conn>> {
        Pool::new(crate::upstream::PoolConfig {
            connect_timeout: Duration::from_secs(2),
            idle_timeout: Duration::from_secs(60),
            preserve_header_case: false,
        })
    }

    #[tokio::test]
    async fn a_streamed_body_goes_out_chunked_and_a_chunked_answer_comes_back_whole() {
        let answer = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n\
                       4\r\nwave\r\n2\r\n, \r\n5\r\nhello\r\n0\r\nx-sum: 11\r\n\r\n";
        let (addr, got) = instance(b"0\r\n\r\n", answer, false).await;
        let pool = pool();
        let (tx, rx) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, BoxError>>(4);
        let body = http_body_util::StreamBody::new(tokio_stream_from(rx)).boxed();
        for piece in ["ab", "cde"] {
            tx.send(Ok(Frame::data(Bytes::from(piece)))).await.unwrap();
        }
        drop(tx);
        let mut headers = HeaderMap::new();
        headers.insert("host", "t.test".parse().unwrap());
        let head = encode_head(&Method::POST, "/up", &headers, &[], true);
        let out = Outgoing::Stream {
            body,
            chunked: true,
        };
        let answered = pool
            .exchange(addr, &head, out, false, std::time::Instant::now())
            .await
            .unwrap();
        let crate::upstream::Answered::Response(parts, body) = answered else {
            panic!("upgraded");
        };
        assert_eq!(parts.status, 200);
        let collected = body.collect().await.unwrap();
        assert_eq!(collected.trailers().unwrap()["x-sum"], "11");
        assert_eq!(&collected.to_bytes()[..], b"wave, hello");
        assert_eq!(pool.idle_count(), 1, "read to its end: kept");
        drop(pool);
        let sent = got.await.unwrap();
        let sent = String::from_utf8(sent).unwrap();
        assert!(
            sent.starts_with(
                "POST /up HTTP/1.1\r\nhost: t.test\r\ntransfer-encoding: chunked\r\n\r\n"
            ),
            "{sent:?}"
        );
        assert!(
            sent.ends_with("2\r\nab\r\n3\r\ncde\r\n0\r\n\r\n"),
            "{sent:?}"
        );
    }

    /// A GET to an instance that sends `answer` and closes: the body as read, and how many
    /// connections the pool kept after.
    async fn get_from(answer: &'static [u8]) -> (Result<Bytes, BoxError>, usize) {
        let (addr, _got) = instance(b"\r\n\r\n", answer, true).await;
        let pool = pool();
        let head = encode_head(&Method::GET, "/", &HeaderMap::new(), &[], false);
        let answered = pool
            .exchange(
                addr,
                &head,
                Outgoing::Bytes(Bytes::new()),
                false,
                std::time::Instant::now(),
            )
            .await
            .unwrap();
        let crate::upstream::Answered::Response(_, body) = answered else {
            panic!("upgraded");
        };
        let read = body.collect().await.map(|c| c.to_bytes());
        (read, pool.idle_count())
    }

    #[tokio::test]
    async fn an_answer_without_a_length_runs_to_the_close() {
        let (read, kept) = get_from(b"HTTP/1.0 200 OK\r\n\r\nall of it").await;
        assert_eq!(&read.unwrap()[..], b"all of it");
        assert_eq!(kept, 0);
    }

    #[tokio::test]
    async fn an_answer_cut_short_is_an_error() {
        let (read, kept) = get_from(b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nshort").await;
        assert!(read.is_err());
        assert_eq!(kept, 0);
    }

    fn tokio_stream_from<T: Send + 'static>(
        mut rx: tokio::sync::mpsc::Receiver<T>,
    ) -> impl futures::Stream<Item = T> + Send {
        futures::stream::poll_fn(move |cx| rx.poll_recv(cx))
    }
}
