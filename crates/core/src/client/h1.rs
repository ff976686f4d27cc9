//! One HTTP/1.1 connection to an origin, driven by the request that holds it.
//!
//! The request's own task writes the request and reads the response head; the response body
//! reads the rest as the listener's connection asks for it. There is no connection task and
//! no channel between the two: a proxied request is polled where it was received, and its
//! response never changes hands (a client with a connection task of its own wakes that task,
//! sends the request over a channel, and gets the head and every body chunk back over two
//! more).
//!
//! Framing follows RFC 9112 §6. A response to `HEAD`, and a 1xx, 204 or 304, has no body; a
//! `Transfer-Encoding` ending in `chunked` is decoded chunk by chunk (its trailer fields become
//! a trailers frame); otherwise a `Content-Length` counts the body (several that disagree, or
//! one that is not a number, fail the response); a message with neither ends when the origin
//! closes. Interim responses (100, 103) are skipped. A connection is lent again only when its
//! response ended where its framing said, nothing followed it, and the origin kept it open
//! (HTTP/1.1 without `Connection: close`, or 1.0 with `keep-alive`).
//!
//! A request body is sent as it comes, with a `Content-Length` when its size is known and
//! chunked otherwise. An origin may answer before the body has all gone out (a 413, a 401):
//! while a write waits, the connection is read too, and a final response stops the upload.
//! The connection is then closed after that response.

use std::future::{poll_fn, Future};
use std::io;
use std::mem::MaybeUninit;
use std::pin::Pin;
use std::task::{ready, Context, Poll, Waker};

use bytes::{Buf, Bytes, BytesMut};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, StatusCode, Version};
use http_body::{Body as _, Frame, SizeHint};
use tokio::io::{AsyncReadExt, AsyncWrite};

use crate::seam::Body;
pub use crate::tls::ClientStream as Stream;

/// Longest response head (status line and fields) accepted.
const MAX_HEAD: usize = 64 * 1024;
/// Most fields in a response head.
const MAX_FIELDS: usize = 128;
/// Longest chunk-size line (with its extensions).
const MAX_CHUNK_LINE: usize = 4096;
/// Longest trailer section, and most trailer fields.
const MAX_TRAILERS: usize = 16 * 1024;
const MAX_TRAILER_FIELDS: usize = 32;
/// Room made in the read buffer before a read.
const READ_SIZE: usize = 8 * 1024;
/// Body pieces up to this size are copied out of the read buffer (see [`take`]).
const COPY_LIMIT: usize = 2 * 1024;
/// A request body's first bytes go out in the head's write when they are ready and this
/// small.
const COALESCE: usize = 16 * 1024;

/// How a request failed on a connection.
#[derive(Debug)]
pub enum Failure {
    /// The request head could not be written, and no byte of the request body was taken:
    /// nothing reached the origin that it could act on, and the request is whole.
    Unwritten(io::Error),
    /// The origin closed the connection after the request was written, before any byte of
    /// a response. On a connection lent before, this is the keep-alive race: the origin
    /// closed it as the request went out.
    Closed,
    /// The request body failed on the client's side (its client went away mid-upload).
    Body(String),
    /// Anything else: a read or write error, or a response that is not HTTP/1.1.
    Broken(String),
}

/// How a request body is framed on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outgoing {
    /// No body.
    Empty,
    /// A body of this many bytes.
    Length(u64),
    /// A body of unknown size, chunked.
    Chunked,
}

/// Writes the request line and fields of `parts` to `out`: the target in origin form, every
/// field as it is but `Content-Length` and `Transfer-Encoding`, which follow the body. The
/// caller has removed the hop-by-hop fields.
pub fn encode_head(parts: &http::request::Parts, body: &Body, out: &mut Vec<u8>) -> Outgoing {
    let hint = body.size_hint();
    let had_length = parts.headers.contains_key(header::CONTENT_LENGTH);
    let outgoing = match hint.exact() {
        Some(0) => Outgoing::Empty,
        Some(n) => Outgoing::Length(n),
        None => Outgoing::Chunked,
    };
    let target = parts.uri.path_and_query().map_or("/", |p| p.as_str());
    out.extend_from_slice(parts.method.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(target.as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\n");
    for (name, value) in &parts.headers {
        if name == header::CONTENT_LENGTH || name == header::TRANSFER_ENCODING {
            continue;
        }
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    match outgoing {
        Outgoing::Length(n) => {
            out.extend_from_slice(b"content-length: ");
            out.extend_from_slice(itoa(n, &mut [0; 20]));
            out.extend_from_slice(b"\r\n");
        }
        // An empty body is announced where the method usually has one, or the client said
        // so itself (RFC 9110 §8.6).
        Outgoing::Empty if had_length || !bodiless_method(&parts.method) => {
            out.extend_from_slice(b"content-length: 0\r\n");
        }
        Outgoing::Empty => {}
        Outgoing::Chunked => out.extend_from_slice(b"transfer-encoding: chunked\r\n"),
    }
    out.extend_from_slice(b"\r\n");
    outgoing
}

/// Methods whose requests have no body as a rule.
fn bodiless_method(method: &Method) -> bool {
    matches!(
        *method,
        Method::GET | Method::HEAD | Method::DELETE | Method::OPTIONS | Method::TRACE
    )
}

/// `n` in decimal, in `buf`.
fn itoa(mut n: u64, buf: &mut [u8; 20]) -> &[u8] {
    let mut at = buf.len();
    loop {
        at -= 1;
        buf[at] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            return &buf[at..];
        }
    }
}

/// A response head as read, and the reader of its body.
pub struct Head {
    pub parts: http::response::Parts,
    pub body: Reader,
}

/// One connection, what has been read from it but not yet used, and the buffer its
/// requests are written from (kept, so a request costs no allocation for its head).
pub struct Conn {
    io: Stream,
    buf: BytesMut,
    out: Vec<u8>,
    /// While `out` holds the whole of the last request sent (its head, then all of a body of
    /// known length), where its body starts: what [`Conn::sent_body`] gives back.
    whole: Option<usize>,
    /// Where each field of the head being read lies (kept, as `out` is).
    places: Vec<(HeaderName, usize, usize)>,
}

impl Conn {
    pub fn new(io: Stream) -> Self {
        Self {
            io,
            buf: BytesMut::new(),
            out: Vec::new(),
            whole: None,
            places: Vec::new(),
        }
    }

    /// Whether an idle connection can take a request: the origin has neither closed it nor
    /// sent anything unasked. Costs no system call while the runtime has seen no event on it.
    pub fn is_open(&self) -> bool {
        self.buf.is_empty() && self.io.is_quiet()
    }

    /// Reads what the connection has into the buffer; `Ok(0)` at its end.
    fn poll_fill(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        if self.buf.capacity() - self.buf.len() < READ_SIZE / 4 {
            self.buf.reserve(READ_SIZE);
        }
        std::pin::pin!(self.io.read_buf(&mut self.buf)).poll(cx)
    }

    /// Writes the request of `parts` with `body`, framed as [`encode_head`] says; `Ok(true)`
    /// when the origin answered before the body had all gone out. On
    /// [`Failure::Unwritten`] the body is untouched and the request can be sent again.
    pub async fn send(
        &mut self,
        parts: &http::request::Parts,
        body: &mut Body,
    ) -> Result<bool, Failure> {
        let mut out = std::mem::take(&mut self.out);
        out.clear();
        let outgoing = encode_head(parts, body, &mut out);
        let head_length = out.len();
        let mut sender = Sender {
            whole: outgoing != Outgoing::Chunked,
            out,
            written: 0,
            left: match outgoing {
                Outgoing::Length(n) => n,
                _ => 0,
            },
            outgoing,
            body_done: outgoing == Outgoing::Empty,
            body_taken: false,
            head_out: false,
            flushed: false,
        };
        let mut result = Ok(false);
        if !sender.body_done {
            // The body's first bytes, if they are here already, go out with the head.
            let mut cx = Context::from_waker(Waker::noop());
            if let Err(failure) = sender.next_frame(body, &mut cx, COALESCE) {
                result = Err(failure);
            }
        }
        if result.is_ok() {
            result = poll_fn(|cx| sender.poll_send(self, body, cx)).await;
        }
        self.whole = sender.whole.then_some(head_length);
        self.out = sender.out;
        result
    }

    /// The body of the last request sent, when it all went out in one piece with its head
    /// (an empty body, or a small one that was there at once): a request the origin closed
    /// on unanswered can be sent again with it.
    pub fn sent_body(&self) -> Option<Bytes> {
        let start = self.whole?;
        Some(Bytes::copy_from_slice(self.out.get(start..)?))
    }

    /// Reads the response head to a request with `method`.
    pub async fn read_head(&mut self, method: &Method) -> Result<Head, Failure> {
        poll_fn(|cx| self.poll_head(method, cx)).await
    }

    fn poll_head(&mut self, method: &Method, cx: &mut Context<'_>) -> Poll<Result<Head, Failure>> {
        loop {
            if !self.buf.is_empty() {
                if let Some(head) = self.parse_head(method)? {
                    return Poll::Ready(Ok(head));
                }
            }
            let before = self.buf.len();
            match ready!(self.poll_fill(cx)) {
                Ok(0) if before == 0 => return Poll::Ready(Err(Failure::Closed)),
                Ok(0) => return Poll::Ready(Err(broken("the origin closed mid-head"))),
                Ok(_) => {}
                Err(error) if before == 0 && gone(&error) => {
                    return Poll::Ready(Err(Failure::Closed))
                }
                Err(error) => return Poll::Ready(Err(Failure::Broken(error.to_string()))),
            }
        }
    }

    /// Parses a final response head from the buffer, skipping interim ones; `None` when
    /// more is needed.
    fn parse_head(&mut self, method: &Method) -> Result<Option<Head>, Failure> {
        loop {
            let mut fields = [const { MaybeUninit::uninit() }; MAX_FIELDS];
            let (response, length) = match scan(&self.buf, &mut fields)? {
                Scan::Partial => return Ok(None),
                Scan::Interim(length) => {
                    self.buf.advance(length);
                    continue;
                }
                Scan::Final(response, length) => (response, length),
            };
            let code = response.code.unwrap_or(0);
            let status =
                StatusCode::from_u16(code).map_err(|_| broken("bad response status code"))?;
            let version = match response.version {
                Some(0) => Version::HTTP_10,
                _ => Version::HTTP_11,
            };
            // Where each field lies in the head, so its value can share the head's bytes.
            let base = self.buf.as_ptr() as usize;
            let mut places = std::mem::take(&mut self.places);
            places.clear();
            for field in response.headers.iter() {
                let name = HeaderName::from_bytes(field.name.as_bytes())
                    .map_err(|_| broken("bad response field name"))?;
                let start = field.value.as_ptr() as usize - base;
                places.push((name, start, start + field.value.len()));
            }
            // Copied out (a small allocation, from the allocator's per-thread cache): shared
            // with the read buffer, the head would keep the buffer from being reused.
            let head = Bytes::copy_from_slice(&self.buf[..length]);
            self.buf.advance(length);
            let mut headers = HeaderMap::with_capacity(places.len());
            for (name, start, end) in places.drain(..) {
                let value = HeaderValue::from_maybe_shared(head.slice(start..end))
                    .map_err(|_| broken("bad response field value"))?;
                headers.append(name, value);
            }
            self.places = places;
            let body = Reader::for_response(method, status, version, &mut headers)?;
            let mut response = http::Response::new(());
            *response.status_mut() = status;
            *response.version_mut() = version;
            *response.headers_mut() = headers;
            let (parts, ()) = response.into_parts();
            return Ok(Some(Head { parts, body }));
        }
    }

    /// Whether a final response has begun to arrive (while the request is still going
    /// out); interim responses are consumed. Pending when nothing more can be told.
    fn poll_early(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Failure>> {
        loop {
            let mut fields = [const { MaybeUninit::uninit() }; MAX_FIELDS];
            match scan(&self.buf, &mut fields) {
                Ok(Scan::Interim(length)) => {
                    self.buf.advance(length);
                    continue;
                }
                // A final head, or one that will fail: reading it tells.
                Ok(Scan::Final(..)) | Err(_) => return Poll::Ready(Ok(())),
                Ok(Scan::Partial) => {}
            }
            match ready!(self.poll_fill(cx)) {
                Ok(0) => return Poll::Ready(Ok(())),
                Ok(_) => {}
                Err(error) => return Poll::Ready(Err(Failure::Broken(error.to_string()))),
            }
        }
    }
}

/// What the start of a connection's read buffer holds.
enum Scan<'h, 'b> {
    /// Not yet a whole head.
    Partial,
    /// An interim (1xx) head of this many bytes, to be skipped.
    Interim(usize),
    /// A final head and its length.
    Final(httparse::Response<'h, 'b>, usize),
}

/// Reads the response head at the start of `buf`: a 101 (never asked for), a bad head or one
/// past [`MAX_HEAD`] is a failure.
fn scan<'h, 'b>(
    buf: &'b [u8],
    fields: &'h mut [MaybeUninit<httparse::Header<'b>>],
) -> Result<Scan<'h, 'b>, Failure> {
    let mut response = httparse::Response::new(&mut []);
    match httparse::ParserConfig::default().parse_response_with_uninit_headers(
        &mut response,
        buf,
        fields,
    ) {
        Ok(httparse::Status::Complete(length)) => match response.code.unwrap_or(0) {
            101 => Err(broken("the origin switched protocols unasked")),
            100..200 => Ok(Scan::Interim(length)),
            _ => Ok(Scan::Final(response, length)),
        },
        Ok(httparse::Status::Partial) if buf.len() > MAX_HEAD => {
            Err(broken("the response head is too large"))
        }
        Ok(httparse::Status::Partial) => Ok(Scan::Partial),
        Err(error) => Err(Failure::Broken(format!("bad response head: {error}"))),
    }
}

/// A request on its way out.
struct Sender {
    /// Whether `out` has held the whole request (not cleared for more of the body).
    whole: bool,
    /// Bytes to write: the head, then each piece of body with its framing.
    out: Vec<u8>,
    written: usize,
    outgoing: Outgoing,
    /// Body bytes still owed, for a `Content-Length` body.
    left: u64,
    body_done: bool,
    /// Whether a body frame has been taken (a failed request can no longer be sent again).
    body_taken: bool,
    /// Whether the whole head has been written.
    head_out: bool,
    flushed: bool,
}

impl Sender {
    fn poll_send(
        &mut self,
        conn: &mut Conn,
        body: &mut Body,
        cx: &mut Context<'_>,
    ) -> Poll<Result<bool, Failure>> {
        loop {
            while self.written < self.out.len() {
                match Pin::new(&mut conn.io).poll_write(cx, &self.out[self.written..]) {
                    Poll::Ready(Ok(0)) => {
                        return Poll::Ready(Err(broken("the origin took nothing")))
                    }
                    Poll::Ready(Ok(n)) => self.written += n,
                    Poll::Ready(Err(error)) => return Poll::Ready(Err(self.write_failed(error))),
                    Poll::Pending => return self.poll_early(conn, cx),
                }
            }
            self.head_out = true;
            if self.body_done {
                // `out` keeps what went out: a request sent whole can be sent again.
                if !self.flushed {
                    match Pin::new(&mut conn.io).poll_flush(cx) {
                        Poll::Ready(Ok(())) => self.flushed = true,
                        Poll::Ready(Err(error)) => {
                            return Poll::Ready(Err(self.write_failed(error)))
                        }
                        Poll::Pending => return self.poll_early(conn, cx),
                    }
                }
                return Poll::Ready(Ok(false));
            }
            self.out.clear();
            self.written = 0;
            self.whole = false;
            match self.next_frame(body, cx, usize::MAX) {
                Ok(true) => {}
                Ok(false) => return self.poll_early(conn, cx),
                Err(failure) => return Poll::Ready(Err(failure)),
            }
        }
    }

    /// While the request waits (on the origin, or on its own body), a final response that
    /// arrives ends it.
    fn poll_early(&mut self, conn: &mut Conn, cx: &mut Context<'_>) -> Poll<Result<bool, Failure>> {
        match conn.poll_early(cx) {
            Poll::Ready(Ok(())) => Poll::Ready(Ok(true)),
            Poll::Ready(Err(failure)) => Poll::Ready(Err(failure)),
            Poll::Pending => Poll::Pending,
        }
    }

    /// A write failed: before the head had all gone out (and no body was taken), nothing
    /// the origin could act on was sent.
    fn write_failed(&self, error: io::Error) -> Failure {
        if !self.head_out && !self.body_taken {
            return Failure::Unwritten(error);
        }
        Failure::Broken(error.to_string())
    }

    /// Takes the body's next frame into `out` if it is ready (and, for the coalescing
    /// first look, no larger than `limit`); `Ok(false)` when it is not ready.
    fn next_frame(
        &mut self,
        body: &mut Body,
        cx: &mut Context<'_>,
        limit: usize,
    ) -> Result<bool, Failure> {
        if limit != usize::MAX && body.size_hint().lower() > limit as u64 {
            return Ok(false);
        }
        let frame = match Pin::new(&mut *body).poll_frame(cx) {
            Poll::Pending => return Ok(false),
            Poll::Ready(None) => {
                self.finish()?;
                return Ok(true);
            }
            Poll::Ready(Some(Err(error))) => return Err(Failure::Body(error.to_string())),
            Poll::Ready(Some(Ok(frame))) => frame,
        };
        self.body_taken = true;
        match frame.into_data() {
            Ok(data) => self.data(&data)?,
            Err(frame) => {
                if let Ok(trailers) = frame.into_trailers() {
                    if self.outgoing == Outgoing::Chunked {
                        self.out.extend_from_slice(b"0\r\n");
                        for (name, value) in &trailers {
                            self.out.extend_from_slice(name.as_str().as_bytes());
                            self.out.extend_from_slice(b": ");
                            self.out.extend_from_slice(value.as_bytes());
                            self.out.extend_from_slice(b"\r\n");
                        }
                        self.out.extend_from_slice(b"\r\n");
                        self.body_done = true;
                        return Ok(true);
                    }
                    self.finish()?;
                }
            }
        }
        Ok(true)
    }

    fn data(&mut self, data: &[u8]) -> Result<(), Failure> {
        if data.is_empty() {
            return Ok(());
        }
        match self.outgoing {
            Outgoing::Length(_) => {
                if data.len() as u64 > self.left {
                    return Err(Failure::Body(
                        "the request body is longer than announced".into(),
                    ));
                }
                self.left -= data.len() as u64;
                self.out.extend_from_slice(data);
                // All of it: the body is done, whether or not its end has been seen yet.
                self.body_done = self.left == 0;
            }
            Outgoing::Chunked => {
                let mut size = data.len();
                let mut digits = [0u8; 16];
                let mut at = digits.len();
                loop {
                    at -= 1;
                    digits[at] = b"0123456789abcdef"[size % 16];
                    size /= 16;
                    if size == 0 {
                        break;
                    }
                }
                self.out.extend_from_slice(&digits[at..]);
                self.out.extend_from_slice(b"\r\n");
                self.out.extend_from_slice(data);
                self.out.extend_from_slice(b"\r\n");
            }
            Outgoing::Empty => {
                return Err(Failure::Body(
                    "the request body is longer than announced".into(),
                ))
            }
        }
        Ok(())
    }

    /// The body has ended: its framing closes.
    fn finish(&mut self) -> Result<(), Failure> {
        match self.outgoing {
            Outgoing::Length(_) if self.left > 0 => {
                return Err(Failure::Body("the request body ended early".into()))
            }
            Outgoing::Chunked => self.out.extend_from_slice(b"0\r\n\r\n"),
            _ => {}
        }
        self.body_done = true;
        Ok(())
    }
}

fn broken(reason: &str) -> Failure {
    Failure::Broken(reason.to_owned())
}

/// Whether an error says the origin had closed or reset the connection.
fn gone(error: &io::Error) -> bool {
    matches!(
        error.kind(),
        io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::BrokenPipe
            | io::ErrorKind::UnexpectedEof
    )
}

/// Where a response body is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// This many bytes of a `Content-Length` body are still to come.
    Length(u64),
    /// A chunk-size line is next.
    Size,
    /// This many bytes of the current chunk are still to come.
    Chunk(u64),
    /// The CRLF that ends a chunk's data is next.
    ChunkEnd,
    /// The trailer section is next.
    Trailers,
    /// The body ends when the origin closes.
    Close,
    Done,
}

/// Reads one response body from its connection.
#[derive(Debug)]
pub struct Reader {
    state: State,
    /// The origin keeps the connection open after this response.
    keep_alive: bool,
}

impl Reader {
    /// How the body of a response with this head is framed (RFC 9112 §6.3); a
    /// `Content-Length` that the framing overrides is removed.
    fn for_response(
        method: &Method,
        status: StatusCode,
        version: Version,
        headers: &mut HeaderMap,
    ) -> Result<Self, Failure> {
        let mut close = false;
        let mut keep = false;
        for value in headers.get_all(header::CONNECTION) {
            for token in value.as_bytes().split(|b| *b == b',') {
                let token = token.trim_ascii();
                close |= token.eq_ignore_ascii_case(b"close");
                keep |= token.eq_ignore_ascii_case(b"keep-alive");
            }
        }
        let mut keep_alive = !close && (version == Version::HTTP_11 || keep);
        let state = if *method == Method::HEAD
            || status == StatusCode::NO_CONTENT
            || status == StatusCode::NOT_MODIFIED
        {
            State::Done
        } else if headers.contains_key(header::TRANSFER_ENCODING) {
            if version == Version::HTTP_10 {
                return Err(broken("Transfer-Encoding in an HTTP/1.0 response"));
            }
            let chunked = headers
                .get_all(header::TRANSFER_ENCODING)
                .iter()
                .flat_map(|v| v.as_bytes().split(|b| *b == b','))
                .map(<[u8]>::trim_ascii)
                .rfind(|coding| !coding.is_empty())
                .is_some_and(|c| c.eq_ignore_ascii_case(b"chunked"));
            if headers.remove(header::CONTENT_LENGTH).is_some() {
                keep_alive = false;
            }
            if chunked {
                State::Size
            } else {
                keep_alive = false;
                State::Close
            }
        } else if headers.contains_key(header::CONTENT_LENGTH) {
            match content_length(headers) {
                Some(0) => State::Done,
                Some(n) => State::Length(n),
                None => return Err(broken("bad Content-Length in the response")),
            }
        } else {
            keep_alive = false;
            State::Close
        };
        Ok(Self { state, keep_alive })
    }

    pub fn is_end(&self) -> bool {
        self.state == State::Done
    }

    pub fn size_hint(&self) -> SizeHint {
        match self.state {
            State::Length(n) => SizeHint::with_exact(n),
            State::Done => SizeHint::with_exact(0),
            _ => SizeHint::default(),
        }
    }

    /// Whether `conn` can carry another request: this body ended where its framing said,
    /// nothing followed it, and the origin keeps the connection open.
    pub fn reusable(&self, conn: &Conn) -> bool {
        self.keep_alive && self.state == State::Done && conn.buf.is_empty()
    }

    /// The connection can carry no other request (the request's upload was cut short).
    pub fn close_after(&mut self) {
        self.keep_alive = false;
    }

    /// The body's next frame.
    pub fn poll_frame(
        &mut self,
        conn: &mut Conn,
        cx: &mut Context<'_>,
    ) -> Poll<Option<io::Result<Frame<Bytes>>>> {
        loop {
            match self.state {
                State::Done => return Poll::Ready(None),
                State::Length(left) | State::Chunk(left) => {
                    if conn.buf.is_empty() {
                        if let Err(error) = ready!(self.fill(conn, cx)) {
                            return Poll::Ready(Some(Err(error)));
                        }
                        continue;
                    }
                    let n = (conn.buf.len() as u64).min(left);
                    let data = take(&mut conn.buf, n as usize);
                    self.state = match self.state {
                        State::Length(_) if n == left => State::Done,
                        State::Length(_) => State::Length(left - n),
                        _ if n == left => State::ChunkEnd,
                        _ => State::Chunk(left - n),
                    };
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                State::Size => {
                    let Some(end) = conn.buf.windows(2).position(|w| w == b"\r\n") else {
                        if conn.buf.len() > MAX_CHUNK_LINE {
                            return Poll::Ready(Some(Err(bad("chunk-size line too long"))));
                        }
                        if let Err(error) = ready!(self.fill(conn, cx)) {
                            return Poll::Ready(Some(Err(error)));
                        }
                        continue;
                    };
                    let Some(size) = chunk_size(&conn.buf[..end]) else {
                        return Poll::Ready(Some(Err(bad("bad chunk-size line"))));
                    };
                    conn.buf.advance(end + 2);
                    self.state = if size == 0 {
                        State::Trailers
                    } else {
                        State::Chunk(size)
                    };
                }
                State::ChunkEnd => {
                    if conn.buf.len() < 2 {
                        if let Err(error) = ready!(self.fill(conn, cx)) {
                            return Poll::Ready(Some(Err(error)));
                        }
                        continue;
                    }
                    if &conn.buf[..2] != b"\r\n" {
                        return Poll::Ready(Some(Err(bad("chunk data not followed by CRLF"))));
                    }
                    conn.buf.advance(2);
                    self.state = State::Size;
                }
                State::Trailers => {
                    if conn.buf.starts_with(b"\r\n") {
                        conn.buf.advance(2);
                        self.state = State::Done;
                        return Poll::Ready(None);
                    }
                    let mut fields = [httparse::EMPTY_HEADER; MAX_TRAILER_FIELDS];
                    match httparse::parse_headers(&conn.buf, &mut fields) {
                        Ok(httparse::Status::Complete((length, fields))) => {
                            let mut trailers = HeaderMap::with_capacity(fields.len());
                            for field in fields.iter() {
                                let name = HeaderName::from_bytes(field.name.as_bytes());
                                let value = HeaderValue::from_bytes(field.value);
                                if let (Ok(name), Ok(value)) = (name, value) {
                                    trailers.append(name, value);
                                }
                            }
                            conn.buf.advance(length);
                            self.state = State::Done;
                            return Poll::Ready(Some(Ok(Frame::trailers(trailers))));
                        }
                        Ok(httparse::Status::Partial) if conn.buf.len() <= MAX_TRAILERS => {
                            if let Err(error) = ready!(self.fill(conn, cx)) {
                                return Poll::Ready(Some(Err(error)));
                            }
                        }
                        _ => return Poll::Ready(Some(Err(bad("bad trailer section")))),
                    }
                }
                State::Close => {
                    if conn.buf.is_empty() {
                        match ready!(conn.poll_fill(cx)) {
                            Ok(0) => {
                                self.state = State::Done;
                                return Poll::Ready(None);
                            }
                            Ok(_) => {}
                            Err(error) => return Poll::Ready(Some(Err(error))),
                        }
                    }
                    let all = conn.buf.len();
                    let data = take(&mut conn.buf, all);
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
            }
        }
    }

    /// Reads more of a body that has not ended; the connection's end is an error here.
    fn fill(&mut self, conn: &mut Conn, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match ready!(conn.poll_fill(cx)) {
            Ok(0) => {
                self.keep_alive = false;
                Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "the origin closed before the end of the response body",
                )))
            }
            Ok(_) => Poll::Ready(Ok(())),
            Err(error) => {
                self.keep_alive = false;
                Poll::Ready(Err(error))
            }
        }
    }
}

/// The buffer's first `n` bytes. Small pieces are copied, so the read buffer stays the
/// connection's alone and is used again for the next response: a piece shared with it would
/// make the next read allocate a buffer of its own. Large ones are handed over as they are.
fn take(buf: &mut BytesMut, n: usize) -> Bytes {
    if n <= COPY_LIMIT {
        let piece = Bytes::copy_from_slice(&buf[..n]);
        buf.advance(n);
        piece
    } else {
        buf.split_to(n).freeze()
    }
}

fn bad(reason: &'static str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, reason)
}

/// The size on a chunk-size line (hex digits, then optional extensions after `;`).
fn chunk_size(line: &[u8]) -> Option<u64> {
    let digits = line.iter().take_while(|b| b.is_ascii_hexdigit()).count();
    if digits == 0 || digits > 15 {
        return None;
    }
    let rest = line[digits..].trim_ascii_start();
    if !(rest.is_empty() || rest.starts_with(b";")) {
        return None;
    }
    let text = std::str::from_utf8(&line[..digits]).ok()?;
    u64::from_str_radix(text, 16).ok()
}

/// The one length every `Content-Length` value states (RFC 9110 §8.6: a list of the same
/// number is that number); `None` when they disagree or one is not a number.
fn content_length(headers: &HeaderMap) -> Option<u64> {
    let mut length = None;
    for value in headers.get_all(header::CONTENT_LENGTH) {
        for part in value.as_bytes().split(|b| *b == b',') {
            let part = part.trim_ascii();
            if part.is_empty() || part.len() > 19 || !part.iter().all(u8::is_ascii_digit) {
                return None;
            }
            let n: u64 = std::str::from_utf8(part).ok()?.parse().ok()?;
            if length.is_some_and(|l| l != n) {
                return None;
            }
            length = Some(n);
        }
    }
    length
}
