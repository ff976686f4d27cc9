//! The client side of the seam: a tier whose next tier runs on another host (or is any HTTP
//! origin) reaches it through this service, over HTTP/1.1 connections kept alive in a pool of
//! their own.
//!
//! HTTP/1.1 is spoken by [`h1`]: the request's task writes the request and reads the response
//! on the connection itself. HTTP/2 (an `https://` origin that chooses `h2` by ALPN) is
//! hyper's, one connection shared by every request.
//!
//! The pool is a stack of idle connections (the most recently used first, so few stay warm).
//! A connection goes back when its response body has been read to the end; one whose body was
//! left unread is closed. An idle connection the origin has closed is seen before it is lent.
//! A request that a pooled connection could not take is sent again on a fresh connection: one
//! whose head could not be written, and one without a body and with an idempotent method that
//! the origin closed on before answering (the keep-alive race: it closed the connection as the
//! request went out).

mod h1;

use std::convert::Infallible;
use std::future::{poll_fn, Future};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{Request, Response, StatusCode, Uri};
use http_body::{Frame, SizeHint};
use http_body_util::BodyExt;
use hyper::client::conn::http2;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio::time::{Instant, Sleep};

use crate::seam::{
    status_response, strip_hop_by_hop, Body, BoxError, HttpService, UpstreamFailure,
};

/// Longest wait for a new connection to an origin, unless its caller says otherwise.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Idle connections kept per origin.
const MAX_IDLE: usize = 256;

/// An HTTP/1.1 origin at `base` (`http://host:port`) as a seam service: requests keep their
/// path, query and `Host`; connection failures become 502, a missing response head within
/// `timeout` 504, each marked with its [`UpstreamFailure`]. A connection not made within
/// `connect_timeout` is a connection failure (nothing was sent: the caller may retry).
pub fn upstream(base: &Uri, timeout: Duration, connect_timeout: Duration) -> HttpService {
    upstream_tls(base, timeout, connect_timeout, None)
}

/// [`upstream`] for an origin that may be `https://`: `tls` is the connector and the name
/// the origin's certificate must be valid for (the URL's host, or the name a member's
/// address was resolved from). An `https://` origin without `tls` fails every request (502).
pub fn upstream_tls(
    base: &Uri,
    timeout: Duration,
    connect_timeout: Duration,
    tls: Option<(Arc<crate::tls::Connector>, String)>,
) -> HttpService {
    let secure = base.scheme_str() == Some("https");
    let default_port = if secure { 443 } else { 80 };
    let authority = base
        .authority()
        .map_or_else(|| "localhost".to_owned(), |a| a.as_str().to_owned());
    let has_port = authority
        .rsplit_once(':')
        .is_some_and(|(_, port)| port.parse::<u16>().is_ok());
    let address = if has_port {
        authority.clone()
    } else {
        format!("{authority}:{default_port}")
    };
    if secure && tls.is_none() {
        tracing::error!(origin = %base, "an https origin without TLS settings: every request fails");
    }
    let refuse = secure && tls.is_none();
    let origin = Arc::new(Origin {
        address,
        h2: Mutex::new(None),
        connect_timeout,
        tls: if secure { tls } else { None },
        refuse,
        idle: Mutex::new(Vec::new()),
    });
    HttpService::from_fn(move |request: Request<Body>| {
        origin
            .clone()
            .send(retarget(request), Instant::now() + timeout)
    })
}

fn failed(status: StatusCode, text: &str, failure: UpstreamFailure) -> Response<Body> {
    let mut response = status_response(status, text);
    response.extensions_mut().insert(failure);
    response
}

/// One origin and its idle connections.
struct Origin {
    address: String,
    /// The HTTP/2 connection, when the origin chose `h2` by ALPN: shared by every request.
    h2: Mutex<Option<http2::SendRequest<Body>>>,
    connect_timeout: Duration,
    /// For an `https://` origin: the connector and the name its certificate must carry.
    tls: Option<(Arc<crate::tls::Connector>, String)>,
    /// An `https://` origin with no TLS settings: nothing is sent.
    refuse: bool,
    idle: Mutex<Vec<Pooled>>,
}

/// An HTTP/1.1 connection to the origin, with the timer its requests wait on.
///
/// The timer is lazy: armed for the deadline of some earlier request on this connection
/// (never a later one, as deadlines only grow), it is re-armed only when it fires before the
/// current request's own deadline. A busy connection touches the runtime's timer wheel about
/// once per timeout, where a timer per request would arm and disarm an entry every time.
struct Pooled {
    /// Boxed, with the connection's buffers: a request's future holds its connection, and
    /// moves it in and out of the pool, as one pointer.
    conn: Box<h1::Conn>,
    timer: Pin<Box<Sleep>>,
}

/// Waits for `work` until `deadline` on a connection's lazy `timer`; `None` once it has
/// passed.
async fn within<F: Future + Unpin>(
    mut work: F,
    timer: &mut Pin<Box<Sleep>>,
    deadline: Instant,
) -> Option<F::Output> {
    poll_fn(move |cx| {
        if let Poll::Ready(output) = Pin::new(&mut work).poll(cx) {
            return Poll::Ready(Some(output));
        }
        while timer.as_mut().poll(cx).is_ready() {
            if Instant::now() >= deadline {
                return Poll::Ready(None);
            }
            timer.as_mut().reset(deadline);
        }
        Poll::Pending
    })
    .await
}

impl Origin {
    fn take_idle(&self) -> Option<Pooled> {
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        while let Some(pooled) = idle.pop() {
            if pooled.conn.is_open() {
                return Some(pooled);
            }
        }
        None
    }

    fn give_back(&self, pooled: Pooled) {
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        if idle.len() < MAX_IDLE {
            idle.push(pooled);
        }
    }

    async fn connect(&self, deadline: Instant) -> Result<Connected, UpstreamFailure> {
        let connect = async {
            if self.refuse {
                return Err(std::io::Error::other("https origin without TLS settings"));
            }
            let stream = TcpStream::connect(&self.address).await?;
            stream.set_nodelay(true)?;
            match &self.tls {
                Some((connector, name)) => {
                    let secure = connector.connect(name, stream).await?;
                    if secure.get_ref().1.alpn_protocol() == Some(b"h2") {
                        return handshake_h2(TokioIo::new(secure)).await.map(Connected::H2);
                    }
                    Ok(Connected::H1(h1::Stream::Tls(Box::new(secure))))
                }
                None => Ok(Connected::H1(h1::Stream::Plain(stream))),
            }
        };
        let limit = deadline.min(Instant::now() + self.connect_timeout);
        match tokio::time::timeout_at(limit, connect).await {
            Ok(Ok(Connected::H1(stream))) => Ok(Connected::Pooled(Pooled {
                conn: Box::new(h1::Conn::new(stream)),
                timer: Box::pin(tokio::time::sleep_until(deadline)),
            })),
            Ok(Ok(connected)) => Ok(connected),
            Ok(Err(error)) => {
                tracing::warn!(%error, origin = %self.address, "cannot connect upstream");
                Err(UpstreamFailure::Connect)
            }
            Err(_) if Instant::now() >= deadline => Err(UpstreamFailure::Timeout),
            Err(_) => {
                tracing::warn!(origin = %self.address, "upstream connect timed out");
                Err(UpstreamFailure::Connect)
            }
        }
    }

    /// Sends `request` on an idle connection, or a new one; returns the response with a body
    /// that gives the connection back once read to the end.
    ///
    /// The request is taken apart before the future is made, and every await below is of a
    /// future that borrows what this one holds: each async fn's arguments get slots of their
    /// own in its future, so a request handed down by value would be held twice or three
    /// times in the future, which is boxed per request (the smaller, the cheaper).
    fn send(
        self: Arc<Self>,
        request: Request<Body>,
        deadline: Instant,
    ) -> impl Future<Output = Result<Response<Body>, Infallible>> + Send {
        let (parts, body) = request.into_parts();
        self.answer(parts, body, deadline)
    }

    async fn answer(
        self: Arc<Self>,
        parts: http::request::Parts,
        mut body: Body,
        deadline: Instant,
    ) -> Result<Response<Body>, Infallible> {
        let sent = match self.tls.as_ref().and_then(|_| self.h2_sender()) {
            Some(sender) => Err(Unsent::H2(sender)),
            None => self.send_h1(&parts, &mut body, deadline).await,
        };
        let failure = match sent {
            Ok(response) => return Ok(response),
            Err(Unsent::Failed(failure)) => failure,
            Err(Unsent::H2(sender)) => {
                let request = Request::from_parts(parts, body);
                match Box::pin(self.send_h2(sender, request, deadline)).await {
                    Ok(response) => return Ok(response),
                    Err(failure) => failure,
                }
            }
        };
        Ok(match failure {
            UpstreamFailure::Timeout => failed(
                StatusCode::GATEWAY_TIMEOUT,
                "upstream timed out",
                UpstreamFailure::Timeout,
            ),
            failure => failed(StatusCode::BAD_GATEWAY, "upstream unavailable", failure),
        })
    }

    /// Sends the request over HTTP/1.1, on an idle connection or a new one; a new one may
    /// turn out to be HTTP/2, and the request is handed back for it.
    async fn send_h1(
        self: &Arc<Self>,
        parts: &http::request::Parts,
        body: &mut Body,
        deadline: Instant,
    ) -> Result<Response<Body>, Unsent> {
        // Sent again after the origin closed on it unanswered: only what cannot have done
        // anything twice (RFC 9110 §9.2.2) and has no body to have lost.
        let again = idempotent(&parts.method);
        let mut fresh = false;
        loop {
            let mut pooled = match self.take_idle() {
                Some(pooled) => pooled,
                None => {
                    fresh = true;
                    // Boxed: a new connection (a TLS handshake's state is kilobytes) is rare;
                    // inline, its state would be copied with every request's future.
                    match Box::pin(self.connect(deadline)).await? {
                        Connected::Pooled(pooled) => pooled,
                        Connected::H2(sender) => {
                            *self.h2.lock().unwrap_or_else(|e| e.into_inner()) =
                                Some(sender.clone());
                            return Err(Unsent::H2(sender));
                        }
                        Connected::H1(_) => return Err(UpstreamFailure::Connect.into()),
                    }
                }
            };
            let exchanged = {
                let Pooled { conn, timer } = &mut pooled;
                // Boxed (a small allocation): inline, the exchange's state would take this
                // future past the size the allocator serves from its per-thread cache.
                let exchange = Box::pin(exchange(conn, parts, body));
                within(exchange, timer, deadline).await
            };
            let failure = match exchanged {
                None => return Err(UpstreamFailure::Timeout.into()),
                Some(Ok(head)) => {
                    let h1::Head {
                        parts: mut head,
                        body: reader,
                    } = head;
                    strip_hop_by_hop(&mut head.headers);
                    let body = Returning {
                        reader,
                        pooled: Some(pooled),
                        origin: self.clone(),
                    };
                    return Ok(Response::from_parts(head, body.boxed_unsync()));
                }
                Some(Err(failure)) => failure,
            };
            match failure {
                h1::Failure::Unwritten(_) if !fresh => {
                    tracing::debug!("pooled upstream connection was closed; sending again");
                }
                h1::Failure::Closed if !fresh && again => {
                    // Sent again only with all of its body in hand, as Varnish does.
                    let Some(sent) = pooled.conn.sent_body() else {
                        let reason = "the origin closed the connection before answering";
                        tracing::warn!(%reason, origin = %self.address, "upstream request failed");
                        return Err(UpstreamFailure::Broken.into());
                    };
                    tracing::debug!(
                        "upstream closed a pooled connection unanswered; sending again"
                    );
                    *body = crate::seam::full(sent);
                }
                h1::Failure::Unwritten(error) => {
                    let reason = format!("the request could not be written: {error}");
                    tracing::warn!(%reason, origin = %self.address, "upstream request failed");
                    return Err(UpstreamFailure::Connect.into());
                }
                h1::Failure::Body(reason) => {
                    // The client's side failed: nothing to hold against the origin.
                    tracing::debug!(%reason, origin = %self.address, "request body failed");
                    return Ok(status_response(
                        StatusCode::BAD_REQUEST,
                        "request body failed",
                    ));
                }
                h1::Failure::Closed => {
                    let reason = "the origin closed the connection before answering";
                    tracing::warn!(%reason, origin = %self.address, "upstream request failed");
                    return Err(UpstreamFailure::Broken.into());
                }
                h1::Failure::Broken(reason) => {
                    tracing::warn!(%reason, origin = %self.address, "upstream request failed");
                    return Err(UpstreamFailure::Broken.into());
                }
            }
        }
    }
}

/// Why [`Origin::send_h1`] returned no response.
enum Unsent {
    /// The new connection speaks HTTP/2: the request goes there.
    H2(http2::SendRequest<Body>),
    Failed(UpstreamFailure),
}

impl From<UpstreamFailure> for Unsent {
    fn from(failure: UpstreamFailure) -> Self {
        Unsent::Failed(failure)
    }
}

/// Sends a request on `conn` and reads its response head.
async fn exchange(
    conn: &mut h1::Conn,
    parts: &http::request::Parts,
    body: &mut Body,
) -> Result<h1::Head, h1::Failure> {
    let early = conn.send(parts, body).await?;
    let mut head = conn.read_head(&parts.method).await?;
    if early {
        // The origin answered before the request body had all gone out: what is left of it
        // would be read as the next request.
        head.body.close_after();
    }
    Ok(head)
}

/// Methods a request may be repeated with to the same effect (RFC 9110 §9.2.2).
fn idempotent(method: &http::Method) -> bool {
    use http::Method;
    matches!(
        *method,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::PUT | Method::DELETE | Method::TRACE
    )
}

impl Origin {
    /// The origin's HTTP/2 connection, if it has a live one.
    fn h2_sender(&self) -> Option<http2::SendRequest<Body>> {
        let mut h2 = self.h2.lock().unwrap_or_else(|e| e.into_inner());
        match h2.as_ref() {
            Some(sender) if !sender.is_closed() => Some(sender.clone()),
            Some(_) => {
                *h2 = None;
                None
            }
            None => None,
        }
    }

    /// Sends `request` as one stream of the origin's HTTP/2 connection.
    async fn send_h2(
        &self,
        mut sender: http2::SendRequest<Body>,
        request: Request<Body>,
        deadline: Instant,
    ) -> Result<Response<Body>, UpstreamFailure> {
        // HTTP/2 names the origin in `:authority` (from the URI), not in `Host`.
        let (mut parts, body) = request.into_parts();
        let authority = parts
            .headers
            .remove(header::HOST)
            .and_then(|h| h.to_str().ok().map(str::to_owned))
            .unwrap_or_else(|| self.address.clone());
        let path = parts
            .uri
            .path_and_query()
            .map_or("/", |p| p.as_str())
            .to_owned();
        parts.uri = Uri::builder()
            .scheme("https")
            .authority(authority)
            .path_and_query(path)
            .build()
            .map_err(|_| UpstreamFailure::Connect)?;
        parts.version = http::Version::HTTP_2;
        let request = Request::from_parts(parts, body);
        let sent = async {
            poll_fn(|cx| sender.poll_ready(cx))
                .await
                .map_err(|_| UpstreamFailure::Connect)?;
            sender.send_request(request).await.map_err(|error| {
                tracing::warn!(%error, origin = %self.address, "upstream request failed");
                UpstreamFailure::Broken
            })
        };
        match tokio::time::timeout_at(deadline, sent).await {
            Ok(Ok(response)) => {
                let (mut parts, body) = response.into_parts();
                strip_hop_by_hop(&mut parts.headers);
                Ok(Response::from_parts(
                    parts,
                    body.map_err(Into::into).boxed_unsync(),
                ))
            }
            Ok(Err(failure)) => Err(failure),
            Err(_) => Err(UpstreamFailure::Timeout),
        }
    }
}

/// A new connection to the origin.
enum Connected {
    /// HTTP/1.1, before it has its timer.
    H1(h1::Stream),
    /// HTTP/1.1, ready to be lent.
    Pooled(Pooled),
    /// HTTP/2: shared.
    H2(http2::SendRequest<Body>),
}

/// An HTTP/2 client connection over `io`, its connection task spawned.
async fn handshake_h2<I>(io: I) -> std::io::Result<http2::SendRequest<Body>>
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let (sender, connection) = http2::Builder::new(hyper_util::rt::TokioExecutor::new())
        .handshake(io)
        .await
        .map_err(std::io::Error::other)?;
    tokio::spawn(async move {
        if let Err(error) = connection.await {
            tracing::debug!(%error, "upstream HTTP/2 connection ended");
        }
    });
    Ok(sender)
}

/// A response body read from its connection, which goes back to the pool at its end.
struct Returning {
    reader: h1::Reader,
    /// Until the body has ended, or failed (the connection is then closed).
    pooled: Option<Pooled>,
    origin: Arc<Origin>,
}

impl http_body::Body for Returning {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        let Some(pooled) = this.pooled.as_mut() else {
            return Poll::Ready(None);
        };
        let polled = this.reader.poll_frame(&mut pooled.conn, cx);
        match &polled {
            Poll::Ready(None) => {
                if let Some(pooled) = this.pooled.take() {
                    if this.reader.reusable(&pooled.conn) {
                        this.origin.give_back(pooled);
                    }
                }
            }
            Poll::Ready(Some(Err(_))) => this.pooled = None,
            _ => {}
        }
        polled.map_err(Into::into)
    }

    fn is_end_stream(&self) -> bool {
        self.reader.is_end()
    }

    fn size_hint(&self) -> SizeHint {
        self.reader.size_hint()
    }
}

impl Drop for Returning {
    /// A body with nothing left to read (empty, or HEAD's) may never be polled to its end:
    /// its connection goes back all the same. One left half-read is closed.
    fn drop(&mut self) {
        if let Some(pooled) = self.pooled.take() {
            if self.reader.reusable(&pooled.conn) {
                self.origin.give_back(pooled);
            }
        }
    }
}

/// Puts the request in origin form for the connection, keeping the client's `Host`.
fn retarget(mut request: Request<Body>) -> Request<Body> {
    if !request.headers().contains_key(header::HOST) {
        if let Some(host) = request
            .uri()
            .authority()
            .and_then(|a| HeaderValue::from_str(a.as_str()).ok())
        {
            request.headers_mut().insert(header::HOST, host);
        }
    }
    if request.uri().authority().is_some() || request.uri().path_and_query().is_none() {
        let path = request.uri().path_and_query().map_or("/", |p| p.as_str());
        if let Ok(uri) = Uri::try_from(path.to_owned()) {
            *request.uri_mut() = uri;
        }
    }
    *request.version_mut() = http::Version::HTTP_11;
    strip_hop_by_hop(request.headers_mut());
    request
}

#[cfg(test)]
mod tests {
    //! The HTTP/1.1 client against a scripted origin on a real socket: framing, reuse, the
    //! keep-alive race, uploads answered early, and origins that break the protocol.

    use std::sync::atomic::{AtomicUsize, Ordering};

    use http_body_util::BodyExt;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    use super::*;
    use crate::seam::{answer, call, full};

    /// What the origin does with a request it has read.
    enum Act {
        /// Writes these bytes and waits for the next request.
        Reply(&'static [u8]),
        /// Writes these bytes and closes.
        ReplyClose(&'static [u8]),
        /// Writes these bytes a byte at a time, flushing each.
        Trickle(&'static [u8]),
        /// Closes without answering.
        Close,
        /// Reads only the head, answers, and keeps the connection open unread.
        ReplyUnread(&'static [u8]),
    }

    /// A scripted origin: `script(connection, request)` says what to do with the n-th
    /// connection's request, given its bytes (head and decoded body). Returns the address,
    /// the count of connections and the requests seen.
    async fn origin<F>(script: F) -> (String, Arc<AtomicUsize>, Arc<Mutex<Vec<Vec<u8>>>>)
    where
        F: Fn(usize, &[u8]) -> Act + Send + Sync + 'static,
    {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap().to_string();
        let connections = Arc::new(AtomicUsize::new(0));
        let seen = Arc::new(Mutex::new(Vec::new()));
        let script = Arc::new(script);
        let (count, log) = (connections.clone(), seen.clone());
        tokio::spawn(async move {
            loop {
                let (mut stream, _) = listener.accept().await.unwrap();
                let index = count.fetch_add(1, Ordering::SeqCst);
                let (script, log) = (script.clone(), log.clone());
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    loop {
                        let Some(request) = read_request(&mut stream, &mut buf).await else {
                            return;
                        };
                        let act = script(index, &request);
                        log.lock().unwrap().push(request);
                        match act {
                            Act::Reply(bytes) => stream.write_all(bytes).await.unwrap(),
                            Act::ReplyClose(bytes) => {
                                stream.write_all(bytes).await.unwrap();
                                return;
                            }
                            Act::Trickle(bytes) => {
                                for byte in bytes {
                                    stream.write_all(&[*byte]).await.unwrap();
                                    stream.flush().await.unwrap();
                                    tokio::task::yield_now().await;
                                }
                            }
                            Act::Close => return,
                            Act::ReplyUnread(bytes) => {
                                stream.write_all(bytes).await.unwrap();
                                std::future::pending::<()>().await;
                            }
                        }
                    }
                });
            }
        });
        (address, connections, seen)
    }

    /// Reads one request: its head, then its body as `Content-Length` or chunked framing
    /// says, decoded, appended after the head. With an `X-Unread: 1` field the body is left
    /// unread.
    async fn read_request(stream: &mut TcpStream, buf: &mut Vec<u8>) -> Option<Vec<u8>> {
        async fn more(stream: &mut TcpStream, buf: &mut Vec<u8>) -> Option<()> {
            let mut chunk = [0u8; 65536];
            let n = stream.read(&mut chunk).await.ok()?;
            (n > 0).then(|| buf.extend_from_slice(&chunk[..n]))
        }
        let end = loop {
            if let Some(at) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break at + 4;
            }
            more(stream, buf).await?;
        };
        let mut request: Vec<u8> = buf.drain(..end).collect();
        let head = String::from_utf8_lossy(&request).to_lowercase();
        if head.contains("x-unread: 1") {
            return Some(request);
        }
        if let Some(line) = head.lines().find(|l| l.starts_with("content-length:")) {
            let n: usize = line[15..].trim().parse().unwrap();
            while buf.len() < n {
                more(stream, buf).await?;
            }
            request.extend(buf.drain(..n));
        } else if head.contains("transfer-encoding: chunked") {
            loop {
                let line_end = loop {
                    if let Some(at) = buf.windows(2).position(|w| w == b"\r\n") {
                        break at;
                    }
                    more(stream, buf).await?;
                };
                let size = usize::from_str_radix(
                    std::str::from_utf8(&buf[..line_end]).unwrap().trim(),
                    16,
                )
                .unwrap();
                buf.drain(..line_end + 2);
                if size == 0 {
                    while !buf.windows(2).any(|w| w == b"\r\n") {
                        more(stream, buf).await?;
                    }
                    let at = buf.windows(2).position(|w| w == b"\r\n").unwrap();
                    buf.drain(..at + 2);
                    break;
                }
                while buf.len() < size + 2 {
                    more(stream, buf).await?;
                }
                request.extend(buf.drain(..size));
                buf.drain(..2);
            }
        }
        Some(request)
    }

    fn service(address: &str, timeout: Duration) -> HttpService {
        let base: Uri = format!("http://{address}").parse().unwrap();
        upstream(&base, timeout, CONNECT_TIMEOUT)
    }

    fn get(path: &str) -> Request<Body> {
        Request::builder()
            .uri(path)
            .header("host", "example.test")
            .body(crate::seam::empty())
            .unwrap()
    }

    async fn fetch(
        service: &HttpService,
        request: Request<Body>,
    ) -> (Response<()>, Bytes, Option<http::HeaderMap>) {
        let response = answer(call(service, request)).await;
        let (parts, body) = response.into_parts();
        let collected = body.collect().await.unwrap();
        let trailers = collected.trailers().cloned();
        (
            Response::from_parts(parts, ()),
            collected.to_bytes(),
            trailers,
        )
    }

    const OK: &[u8] = b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\nx-a: 1\r\n\r\nhello";

    #[tokio::test]
    async fn a_request_goes_out_in_origin_form_and_its_connection_is_kept() {
        let (address, connections, seen) = origin(|_, _| Act::Reply(OK)).await;
        let service = service(&address, Duration::from_secs(5));
        for _ in 0..3 {
            let (head, body, _) = fetch(&service, get("http://ignored.test/a?b=1")).await;
            assert_eq!(head.status(), 200);
            assert_eq!(head.headers()["x-a"], "1");
            assert_eq!(body, "hello");
        }
        assert_eq!(connections.load(Ordering::SeqCst), 1);
        let first = String::from_utf8(seen.lock().unwrap()[0].clone()).unwrap();
        assert!(first.starts_with("GET /a?b=1 HTTP/1.1\r\n"), "{first}");
        assert!(first.contains("host: example.test\r\n"), "{first}");
        assert!(!first.contains("content-length"), "{first}");
    }

    #[tokio::test]
    async fn chunked_bodies_come_whole_with_their_trailers_however_they_are_cut() {
        const CHUNKED: &[u8] = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n\
            5;ext=1\r\nhello\r\n7\r\n, world\r\n0\r\nx-sum: 12\r\n\r\n";
        let (address, connections, _) = origin(|n, _| {
            if n == 0 {
                Act::Reply(CHUNKED)
            } else {
                Act::Trickle(CHUNKED)
            }
        })
        .await;
        let service = service(&address, Duration::from_secs(5));
        let (head, body, trailers) = fetch(&service, get("/")).await;
        assert!(head.headers().get("transfer-encoding").is_none());
        assert_eq!(body, "hello, world");
        assert_eq!(trailers.unwrap()["x-sum"], "12");
        // The same connection serves the next request: the body ended where it said.
        let (_, body, _) = fetch(&service, get("/")).await;
        assert_eq!(body, "hello, world");
        assert_eq!(connections.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn a_trickled_head_and_body_are_read_whole() {
        let (address, _, _) = origin(|_, _| Act::Trickle(OK)).await;
        let service = service(&address, Duration::from_secs(5));
        let (head, body, _) = fetch(&service, get("/")).await;
        assert_eq!(
            (head.status().as_u16(), body.as_ref()),
            (200, &b"hello"[..])
        );
    }

    #[tokio::test]
    async fn a_body_without_length_ends_when_the_origin_closes_and_the_connection_goes() {
        let (address, connections, _) =
            origin(|_, _| Act::ReplyClose(b"HTTP/1.1 200 OK\r\n\r\nuntil the end")).await;
        let service = service(&address, Duration::from_secs(5));
        for _ in 0..2 {
            let (_, body, _) = fetch(&service, get("/")).await;
            assert_eq!(body, "until the end");
        }
        assert_eq!(connections.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn responses_without_a_body_keep_their_fields_and_the_connection() {
        let (address, connections, _) = origin(|_, request| {
            if request.starts_with(b"HEAD") {
                Act::Reply(b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\n")
            } else if request.starts_with(b"GET /304") {
                Act::Reply(b"HTTP/1.1 304 Not Modified\r\netag: \"x\"\r\ncontent-length: 5\r\n\r\n")
            } else {
                Act::Reply(b"HTTP/1.1 204 No Content\r\n\r\n")
            }
        })
        .await;
        let service = service(&address, Duration::from_secs(5));
        let mut head = get("/");
        *head.method_mut() = http::Method::HEAD;
        let (response, body, _) = fetch(&service, head).await;
        assert_eq!(response.headers()["content-length"], "5");
        assert!(body.is_empty());
        let (response, body, _) = fetch(&service, get("/304")).await;
        assert_eq!((response.status().as_u16(), body.len()), (304, 0));
        let (response, body, _) = fetch(&service, get("/204")).await;
        assert_eq!((response.status().as_u16(), body.len()), (204, 0));
        assert_eq!(connections.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn interim_responses_are_skipped() {
        let (address, _, _) = origin(|_, _| {
            Act::Reply(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nlink: </a>\r\n\r\nHTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
        })
        .await;
        let service = service(&address, Duration::from_secs(5));
        let (head, body, _) = fetch(&service, get("/")).await;
        assert_eq!((head.status().as_u16(), body.as_ref()), (200, &b"ok"[..]));
        assert!(head.headers().get("link").is_none());
    }

    #[tokio::test]
    async fn faulty_framing_is_a_502_never_a_guess() {
        for reply in [
            &b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\ncontent-length: 6\r\n\r\nhello!"[..],
            b"HTTP/1.1 200 OK\r\ncontent-length: five\r\n\r\nhello",
            b"HTTP/1.0 200 OK\r\ntransfer-encoding: chunked\r\n\r\n0\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nbad header\r\n\r\n",
            b"HTTP/1.1 101 Switching Protocols\r\nupgrade: x\r\n\r\n",
            b"SMTP ready\r\n\r\n",
        ] {
            let (address, _, _) = origin(move |_, _| Act::ReplyClose(reply)).await;
            let service = service(&address, Duration::from_secs(5));
            let response = answer(call(&service, get("/"))).await;
            assert_eq!(response.status(), 502, "{}", String::from_utf8_lossy(reply));
            assert_eq!(
                response.extensions().get::<UpstreamFailure>(),
                Some(&UpstreamFailure::Broken)
            );
        }
    }

    #[tokio::test]
    async fn a_bad_chunk_or_a_body_cut_short_fails_the_body() {
        for reply in [
            &b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n"[..],
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhelloXX0\r\n\r\n",
            b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nhello",
        ] {
            let (address, _, _) = origin(move |_, _| Act::ReplyClose(reply)).await;
            let service = service(&address, Duration::from_secs(5));
            let response = answer(call(&service, get("/"))).await;
            assert_eq!(response.status(), 200);
            assert!(response.into_body().collect().await.is_err());
        }
    }

    #[tokio::test]
    async fn both_lengths_mean_chunked_and_a_closed_connection() {
        let (address, connections, _) = origin(|_, _| {
            Act::Reply(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\ntransfer-encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n")
        })
        .await;
        let service = service(&address, Duration::from_secs(5));
        for _ in 0..2 {
            let (head, body, _) = fetch(&service, get("/")).await;
            assert_eq!(body, "ok");
            assert!(head.headers().get("content-length").is_none());
        }
        assert_eq!(connections.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn bytes_after_a_response_mean_the_connection_is_not_lent_again() {
        let (address, connections, _) =
            origin(|_, _| Act::Reply(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nokEXTRA")).await;
        let service = service(&address, Duration::from_secs(5));
        for _ in 0..2 {
            let (_, body, _) = fetch(&service, get("/")).await;
            assert_eq!(body, "ok");
        }
        assert_eq!(connections.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn connection_close_and_http_1_0_are_honoured() {
        let (address, connections, _) = origin(|n, _| {
            Act::Reply(match n {
                0 => b"HTTP/1.1 200 OK\r\nconnection: close\r\ncontent-length: 2\r\n\r\nok",
                1 => b"HTTP/1.0 200 OK\r\ncontent-length: 2\r\n\r\nok",
                _ => b"HTTP/1.0 200 OK\r\nconnection: keep-alive\r\ncontent-length: 2\r\n\r\nok",
            })
        })
        .await;
        let service = service(&address, Duration::from_secs(5));
        for _ in 0..4 {
            assert_eq!(fetch(&service, get("/")).await.1, "ok");
        }
        // Closed after the first and the second; the third's kept for the fourth.
        assert_eq!(connections.load(Ordering::SeqCst), 3);
    }

    #[tokio::test]
    async fn an_idle_connection_the_origin_closed_is_not_lent() {
        let (address, connections, _) = origin(|_, _| Act::ReplyClose(OK)).await;
        let service = service(&address, Duration::from_secs(5));
        for method in ["GET", "POST", "POST"] {
            // Seen closed before it is lent: even a POST, which is never sent twice, goes
            // out on a new connection.
            let mut request = get("/");
            *request.method_mut() = method.parse().unwrap();
            let (head, body, _) = fetch(&service, request).await;
            assert_eq!(
                (head.status().as_u16(), body.as_ref()),
                (200, &b"hello"[..])
            );
        }
        assert_eq!(connections.load(Ordering::SeqCst), 3);
    }

    #[tokio::test]
    async fn the_keep_alive_race_resends_what_is_safe_and_only_that() {
        // Each connection answers its first request and closes on its second unanswered,
        // as an origin does that closes an idle connection as a request arrives.
        let answered = Arc::new(Mutex::new(std::collections::HashSet::new()));
        let marks = answered.clone();
        let (address, _, seen) = origin(move |n, _| {
            if marks.lock().unwrap().insert(n) {
                Act::Reply(OK)
            } else {
                Act::Close
            }
        })
        .await;
        let service = service(&address, Duration::from_secs(5));
        assert_eq!(fetch(&service, get("/")).await.1, "hello");
        // A GET on the kept connection meets the close, and is sent again on a new one.
        let (head, body, _) = fetch(&service, get("/")).await;
        assert_eq!(
            (head.status().as_u16(), body.as_ref()),
            (200, &b"hello"[..])
        );
        // So is a PUT whose small body went out whole with its head: it is in hand.
        let put = Request::builder()
            .method("PUT")
            .uri("/put")
            .header("content-length", "3")
            .body(full("abc"))
            .unwrap();
        let (head, body, _) = fetch(&service, put).await;
        assert_eq!(
            (head.status().as_u16(), body.as_ref()),
            (200, &b"hello"[..])
        );
        let puts: Vec<Vec<u8>> = seen
            .lock()
            .unwrap()
            .iter()
            .filter(|r| r.starts_with(b"PUT"))
            .cloned()
            .collect();
        assert_eq!(puts.len(), 2);
        assert!(puts.iter().all(|r| r.ends_with(b"\r\n\r\nabc")));
        // A POST is not: the origin may have acted on it.
        let post = Request::builder()
            .method("POST")
            .uri("/")
            .body(crate::seam::empty())
            .unwrap();
        let response = answer(call(&service, post)).await;
        assert_eq!(response.status(), 502);
    }

    #[tokio::test]
    async fn request_bodies_go_out_with_their_length_or_chunked() {
        let (address, _, seen) = origin(|_, _| Act::Reply(OK)).await;
        let service = service(&address, Duration::from_secs(5));
        let known = Request::builder()
            .method("POST")
            .uri("/known")
            .header("content-length", "4")
            .body(full("abcd"))
            .unwrap();
        assert_eq!(fetch(&service, known).await.0.status(), 200);
        let frames = futures_frames(vec![Bytes::from_static(b"ab"), Bytes::from_static(b"cde")]);
        let streamed = Request::builder()
            .method("PUT")
            .uri("/streamed")
            .body(frames)
            .unwrap();
        assert_eq!(fetch(&service, streamed).await.0.status(), 200);
        let empty_post = Request::builder()
            .method("POST")
            .uri("/empty")
            .body(crate::seam::empty())
            .unwrap();
        assert_eq!(fetch(&service, empty_post).await.0.status(), 200);
        let seen = seen.lock().unwrap();
        let text: Vec<String> = seen
            .iter()
            .map(|r| String::from_utf8_lossy(r).into())
            .collect();
        assert!(text[0].contains("content-length: 4\r\n") && text[0].ends_with("\r\n\r\nabcd"));
        assert!(
            text[1].contains("transfer-encoding: chunked\r\n"),
            "{}",
            text[1]
        );
        assert!(text[1].ends_with("\r\n\r\nabcde"), "{}", text[1]);
        assert!(text[2].contains("content-length: 0\r\n"), "{}", text[2]);
    }

    /// A body of these frames, of unknown length.
    fn futures_frames(frames: Vec<Bytes>) -> Body {
        Frames(frames.into()).boxed_unsync()
    }

    struct Frames(std::collections::VecDeque<Bytes>);

    impl http_body::Body for Frames {
        type Data = Bytes;
        type Error = BoxError;

        fn poll_frame(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
            Poll::Ready(self.0.pop_front().map(|b| Ok(Frame::data(b))))
        }
    }

    #[tokio::test]
    async fn an_upload_answered_early_gets_its_answer_and_the_connection_goes() {
        let (address, connections, _) = origin(|_, _| {
            Act::ReplyUnread(b"HTTP/1.1 413 Content Too Large\r\ncontent-length: 3\r\n\r\nbig")
        })
        .await;
        let service = service(&address, Duration::from_secs(10));
        // Far more than the socket buffers hold: the upload cannot finish unread.
        let big = vec![b'x'; 32 << 20];
        let upload = Request::builder()
            .method("POST")
            .uri("/")
            .header("x-unread", "1")
            .header("content-length", big.len().to_string())
            .body(full(big))
            .unwrap();
        let (head, body, _) = fetch(&service, upload).await;
        assert_eq!((head.status().as_u16(), body.as_ref()), (413, &b"big"[..]));
        let _ = fetch(&service, get("/")).await;
        assert_eq!(connections.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn a_head_later_than_the_timeout_is_a_504() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap().to_string();
        tokio::spawn(async move {
            let (_silent, _) = listener.accept().await.unwrap();
            std::future::pending::<()>().await;
        });
        let service = service(&address, Duration::from_millis(100));
        let response = answer(call(&service, get("/"))).await;
        assert_eq!(response.status(), 504);
    }
}
