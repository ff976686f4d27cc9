//! The client side of the seam: a tier whose next tier runs on another host (or is any HTTP
//! origin) reaches it through this service, over HTTP/1.1 connections kept alive in a pool of
//! their own.
//!
//! The pool is a stack of idle connections (the most recently used first, so few stay warm).
//! A connection goes back when its response body has been read to the end; one whose body was
//! left unread is closed. A request that a pooled connection could not take (the origin had
//! closed it: the keep-alive race) is sent again on a fresh connection: hyper hands such a
//! request back unsent.

use std::future::{poll_fn, Future};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{Request, Response, StatusCode, Uri};
use http_body::{Body as _, Frame, SizeHint};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::client::conn::http1::{self, SendRequest};
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
        let origin = origin.clone();
        async move {
            let request = retarget(request);
            Ok(match origin.send(request, Instant::now() + timeout).await {
                Ok(response) => response,
                Err(UpstreamFailure::Timeout) => failed(
                    StatusCode::GATEWAY_TIMEOUT,
                    "upstream timed out",
                    UpstreamFailure::Timeout,
                ),
                Err(failure) => failed(StatusCode::BAD_GATEWAY, "upstream unavailable", failure),
            })
        }
    })
}

fn failed(status: StatusCode, text: &str, failure: UpstreamFailure) -> Response<Body> {
    let mut response = status_response(status, text);
    response.extensions_mut().insert(failure);
    response
}

/// An HTTP/1.1 client connection over `io`, its connection task spawned.
async fn handshake<I>(io: I) -> std::io::Result<SendRequest<Body>>
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    // One buffer, one write per request (see the listener's writev).
    let (sender, connection) = http1::Builder::new()
        .writev(false)
        .handshake(io)
        .await
        .map_err(std::io::Error::other)?;
    tokio::spawn(async move {
        if let Err(error) = connection.await {
            tracing::debug!(%error, "upstream connection ended");
        }
    });
    Ok(sender)
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

/// A connection to the origin, with the timer its requests wait on.
///
/// The timer is lazy: armed for the deadline of some earlier request on this connection
/// (never a later one, as deadlines only grow), it is re-armed only when it fires before the
/// current request's own deadline. A busy connection touches the runtime's timer wheel about
/// once per timeout, where a timer per request would arm and disarm an entry every time.
struct Pooled {
    sender: SendRequest<Body>,
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
            if !pooled.sender.is_closed() {
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
                    handshake(TokioIo::new(secure)).await.map(Connected::H1)
                }
                None => handshake(TokioIo::new(stream)).await.map(Connected::H1),
            }
        };
        let limit = deadline.min(Instant::now() + self.connect_timeout);
        match tokio::time::timeout_at(limit, connect).await {
            Ok(Ok(Connected::H1(sender))) => Ok(Connected::Pooled(Pooled {
                sender,
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
    async fn send(
        self: Arc<Self>,
        mut request: Request<Body>,
        deadline: Instant,
    ) -> Result<Response<Body>, UpstreamFailure> {
        let mut fresh = false;
        loop {
            if let Some(sender) = self.tls.as_ref().and_then(|_| self.h2_sender()) {
                return Box::pin(self.send_h2(sender, request, deadline)).await;
            }
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
                            return Box::pin(self.send_h2(sender, request, deadline)).await;
                        }
                        Connected::H1(_) => return Err(UpstreamFailure::Connect),
                    }
                }
            };
            let ready = poll_fn(|cx| pooled.sender.poll_ready(cx));
            match within(std::pin::pin!(ready), &mut pooled.timer, deadline).await {
                None => return Err(UpstreamFailure::Timeout),
                Some(Err(_)) if fresh => return Err(UpstreamFailure::Connect),
                Some(Err(_)) => continue,
                Some(Ok(())) => {}
            }
            let sent = std::pin::pin!(pooled.sender.try_send_request(request));
            let Some(sent) = within(sent, &mut pooled.timer, deadline).await else {
                return Err(UpstreamFailure::Timeout);
            };
            match sent {
                Ok(response) => {
                    let (mut parts, body) = response.into_parts();
                    strip_hop_by_hop(&mut parts.headers);
                    let body = Returning {
                        body,
                        pooled: Some(pooled),
                        origin: self.clone(),
                    };
                    return Ok(Response::from_parts(parts, body.boxed_unsync()));
                }
                Err(mut error) => match error.take_message() {
                    // Never written: the pooled connection had been closed. Once more, fresh.
                    Some(unsent) if !fresh => {
                        tracing::debug!("pooled upstream connection was closed; sending again");
                        request = unsent;
                    }
                    unsent => {
                        let error = error.into_error();
                        tracing::warn!(%error, origin = %self.address, "upstream request failed");
                        return Err(if unsent.is_some() {
                            UpstreamFailure::Connect
                        } else {
                            UpstreamFailure::Broken
                        });
                    }
                },
            }
        }
    }
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
    H1(SendRequest<Body>),
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

/// A response body that gives its connection back to the pool at its end.
struct Returning {
    body: Incoming,
    pooled: Option<Pooled>,
    origin: Arc<Origin>,
}

impl http_body::Body for Returning {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let polled = Pin::new(&mut self.body).poll_frame(cx);
        if let Poll::Ready(None) = polled {
            if let Some(pooled) = self.pooled.take() {
                self.origin.give_back(pooled);
            }
        }
        polled.map_err(Into::into)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

impl Drop for Returning {
    /// A body with nothing left to read (empty, or HEAD's) may never be polled to its end:
    /// its connection goes back all the same. One left half-read is closed.
    fn drop(&mut self) {
        if let Some(pooled) = self.pooled.take() {
            if self.body.is_end_stream() {
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
