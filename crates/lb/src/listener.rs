//! The HTTP listeners: accept (and, on the HTTPS listener, TLS with ALPN), parse HTTP/1.1
//! or HTTP/2, limit, hand to the next tier, drain on shutdown.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use http::{header, HeaderValue, Request, Response, StatusCode, Uri};
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use strata_core::seam::{answer, call, empty, status_response, ResponseFuture};
use strata_core::shutdown::Stage;
use strata_core::tls::TlsAcceptor;
use strata_core::{Body, BodyTooLarge, BoxError, ConnInfo, HttpService, Shutdown};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tokio::sync::mpsc;

use crate::forwarded::{Forwarder, Trusted};
use crate::head_timer::{Activity, Tracked, TrackedBody};
use crate::proxy_protocol;
use crate::LbConfig;

/// The header count hyper allows when none is configured.
const HYPER_MAX_HEADERS: usize = 100;

/// Most concurrent HTTP/2 streams per connection.
const MAX_STREAMS: u32 = 256;

/// How a listener speaks HTTP.
#[derive(Clone)]
enum Protocols {
    /// HTTP/1.1 alone: hyper's HTTP/1 connection, with nothing in front of it.
    Http1(http1::Builder),
    /// HTTP/1.1 and HTTP/2, told apart by the HTTP/2 preface (over TLS, ALPN offers `h2`
    /// first).
    Both(auto::Builder<TokioExecutor>),
}

/// Applies the listener's HTTP/1.1 settings to a builder of either kind (hyper's and
/// hyper-util's builders have the same methods, but no trait in common).
macro_rules! http1_settings {
    ($builder:expr, $config:expr) => {{
        // The head timeout is the connection's own (`head_timer`), not hyper's.
        $builder
            .header_read_timeout(None)
            .max_buf_size($config.max_header_bytes)
            .keep_alive($config.keepalive)
            // Head and body in one buffer, one write: small responses are the common case,
            // and a vectored write of two pieces costs the kernel more than the copy.
            .writev(false);
        // hyper's own limit is the same 100 on the stack; a limit set explicitly, even to
        // the same number, makes it fill a fresh array of that size for every request head.
        if $config.max_headers != HYPER_MAX_HEADERS {
            $builder.max_headers($config.max_headers);
        }
    }};
}

impl Protocols {
    /// HTTP/2 alone: what a TLS connection whose ALPN chose `h2` speaks (RFC 9113 §3.2).
    /// A client that then sends anything but the HTTP/2 preface gets a `GOAWAY` with
    /// `PROTOCOL_ERROR` (§3.4), not an HTTP/1.1 answer.
    fn http2_only(self) -> Self {
        match self {
            Protocols::Both(builder) => Protocols::Both(builder.http2_only()),
            http1 => http1,
        }
    }
}

fn protocols(config: &LbConfig, http2: bool) -> Protocols {
    if !http2 {
        let mut builder = http1::Builder::new();
        http1_settings!(builder, config);
        return Protocols::Http1(builder);
    }
    let mut builder = auto::Builder::new(TokioExecutor::new());
    http1_settings!(builder.http1(), config);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(MAX_STREAMS)
        .max_header_list_size(u32::try_from(config.max_header_bytes).unwrap_or(u32::MAX));
    Protocols::Both(builder)
}

/// Serves `listener` (in TLS when `tls` is given), passing every well-formed request to
/// `next`, until `shutdown` is requested; then stops accepting and waits for open
/// connections to finish their current exchange, or until shutdown is forced.
pub async fn serve(
    listener: TcpListener,
    tls: Option<TlsAcceptor>,
    next: HttpService,
    config: LbConfig,
    shutdown: Shutdown,
) {
    let http2 = tls.is_some() || config.h2c;
    let protocols = protocols(&config, http2);
    let local = listener.local_addr().ok();
    let trusted = Trusted::new(&config.trusted_networks);
    // At `max_connections`, accepting waits and new connections queue in the kernel.
    let slots = Arc::new(tokio::sync::Semaphore::new(config.max_connections));
    // Each connection task holds a clone; `recv()` returns `None` once all have ended.
    let (open_tx, mut open_rx) = mpsc::channel::<()>(1);
    let mut failures = strata_core::listen::AcceptFailures::default();

    loop {
        // Once shutdown is requested, the connections the kernel already queued are still
        // taken (they were accepted before the stop); then the socket stops listening.
        let stopping = shutdown.stage() >= Stage::Graceful;
        let permit = if stopping {
            match slots.clone().try_acquire_owned() {
                Ok(permit) => permit,
                Err(_) => break,
            }
        } else {
            tokio::select! {
                permit = slots.clone().acquire_owned() => permit.expect("never closed"),
                () = shutdown.requested() => continue,
            }
        };
        let accepted = if stopping {
            match tokio::time::timeout(Duration::ZERO, listener.accept()).await {
                Ok(accepted) => accepted,
                Err(_) => break,
            }
        } else {
            tokio::select! {
                accepted = listener.accept() => accepted,
                () = shutdown.requested() => continue,
            }
        };
        let (mut stream, peer) = match accepted {
            Ok(pair) => {
                failures.succeeded();
                pair
            }
            Err(error) => {
                // Running out of file descriptors must not spin the loop, nor the log.
                if !stopping && failures.pause("lb", &error, &shutdown).await {
                    continue;
                }
                break;
            }
        };
        let _ = stream.set_nodelay(true);
        let next = next.clone();
        let limits = Limits {
            max_body: config.max_body_bytes,
            body_timeout: config.body_read_timeout,
            max_head: config.max_header_bytes,
        };
        let draining = shutdown.clone();
        let trusted = trusted.contains(peer.ip());
        let open = open_tx.clone();
        let activity = Activity::new();
        let connection = Connection {
            protocols: protocols.clone(),
            shutdown: shutdown.clone(),
            linger: config.drain_linger,
            activity: activity.clone(),
            head_timeout: config.header_read_timeout,
        };
        let tls = tls.clone();
        let handshake_timeout = config.header_read_timeout;
        let proxy_protocol = config.proxy_protocol;
        tokio::spawn(async move {
            let (_open, _permit) = (open, permit);
            // Behind a balancer that speaks the PROXY protocol, its header names the client.
            let remote = if proxy_protocol {
                match proxy_protocol::read(&mut stream, handshake_timeout).await {
                    Ok(client) => client.unwrap_or(peer),
                    Err(error) => return tracing::debug!(%error, %peer, "connection refused"),
                }
            } else {
                peer
            };
            let info = ConnInfo {
                remote,
                local: local.unwrap_or(peer),
                secure: tls.is_some(),
            };
            let forwarder = Forwarder::new(remote.ip(), info.secure, trusted);
            let service = service_fn(move |mut request: Request<Incoming>| {
                let guard = activity.begin(request.version());
                let close = draining.stage() != Stage::Running;
                forwarder.apply(request.headers_mut());
                Tracked::new(handle(request, info, limits, &next, close), guard)
            });
            let Some(tls) = tls else {
                return connection.drive(TokioIo::new(stream), service).await;
            };
            match tokio::time::timeout(handshake_timeout, tls.accept(stream)).await {
                Ok(Ok(secure)) if secure.get_ref().1.alpn_protocol() == Some(b"h2") => {
                    let mut connection = connection;
                    connection.protocols = connection.protocols.http2_only();
                    match crate::preface::expect(secure, handshake_timeout).await {
                        Ok(Some(secure)) => connection.drive(TokioIo::new(secure), service).await,
                        Ok(None) => tracing::debug!(%remote, "no HTTP/2 preface after ALPN h2"),
                        Err(error) => tracing::debug!(%error, %remote, "connection failed"),
                    }
                }
                Ok(Ok(secure)) => connection.drive(TokioIo::new(secure), service).await,
                Ok(Err(error)) => tracing::debug!(%error, %remote, "TLS handshake failed"),
                Err(_) => tracing::debug!(%remote, "TLS handshake timed out"),
            }
        });
    }
    strata_core::listen::stop_listening(&listener, &shutdown);
    drop(listener);
    drop(open_tx);
    tokio::select! {
        _ = open_rx.recv() => {}
        () = shutdown.forced() => {}
    }
}

/// What serving one accepted connection needs.
struct Connection {
    protocols: Protocols,
    shutdown: Shutdown,
    linger: Duration,
    activity: Arc<Activity>,
    head_timeout: Duration,
}

impl Connection {
    async fn drive<I, S>(self, io: TokioIo<I>, service: S)
    where
        I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
        S: hyper::service::Service<
                Request<Incoming>,
                Response = Response<TrackedBody>,
                Error = std::convert::Infallible,
            > + Send
            + 'static,
        S::Future: Send + 'static,
    {
        match &self.protocols {
            Protocols::Http1(builder) => {
                let connection = builder.serve_connection(io, service);
                self.run(connection, |c| c.graceful_shutdown()).await;
            }
            Protocols::Both(builder) => {
                let connection = builder.serve_connection(io, service);
                self.run(connection, |c| c.graceful_shutdown()).await;
            }
        }
    }

    /// Serves `connection` until it ends, its head timeout passes, or shutdown: then drains
    /// it (`graceful` asks it to finish its exchange and close).
    async fn run<C, E>(&self, connection: C, graceful: impl FnOnce(Pin<&mut C>))
    where
        C: Future<Output = Result<(), E>>,
        E: Into<BoxError>,
    {
        let mut connection = std::pin::pin!(connection);
        let serving = self.shutdown.unless(Stage::Graceful, connection.as_mut());
        tokio::select! {
            biased;
            served = serving => if let Some(result) = served {
                return log_connection_end(result);
            },
            () = self.activity.overdue(self.head_timeout) => {
                return tracing::debug!("no whole request head within header_read_timeout");
            }
        }
        // Draining. Closing an idle keep-alive connection now would race a request the
        // client may be sending on it; for `drain_linger`, responses say
        // `Connection: close` instead (HTTP/2 gets GOAWAY), and only then is the connection
        // shut.
        tokio::select! {
            result = connection.as_mut() => return log_connection_end(result),
            () = tokio::time::sleep(self.linger) => {}
            () = self.shutdown.forced() => return,
        }
        graceful(connection.as_mut());
        // A connection still waiting for a request head (hyper leaves one that has not sent
        // its first bytes open) is closed once it has waited `drain_linger`; one serving a
        // request finishes it.
        tokio::select! {
            result = connection.as_mut() => log_connection_end(result),
            () = self.activity.overdue(self.linger) => tracing::debug!("idle while draining: closed"),
            () = self.shutdown.forced() => {}
        }
    }
}

fn log_connection_end<E: Into<BoxError>>(result: Result<(), E>) {
    if let Err(error) = result {
        let error: BoxError = error.into();
        tracing::debug!(%error, "connection ended with an error");
    }
}

/// What a request may be.
#[derive(Debug, Clone, Copy)]
struct Limits {
    max_body: u64,
    body_timeout: Duration,
    /// `lb.max_header_bytes`.
    max_head: usize,
}

/// The request's head as it came on the wire, near enough: request line and header lines.
/// hyper checks its read buffer against the limit only while a head is incomplete, so a head
/// that arrives in one burst could pass a limit the same head in pieces does not; counting
/// the parsed head makes the limit the same however TCP cuts it.
fn head_bytes<B>(request: &Request<B>) -> usize {
    let uri = request.uri();
    let target = uri.scheme_str().map_or(0, |s| s.len() + 3)
        + uri.authority().map_or(0, |a| a.as_str().len())
        + uri.path_and_query().map_or(1, |p| p.as_str().len());
    let line = request.method().as_str().len() + target + 12;
    request.headers().iter().fold(line, |total, (name, value)| {
        total + name.as_str().len() + value.len() + 4
    })
}

/// Why a request cannot be taken, as the RFCs name it.
fn refuse<B>(request: &Request<B>, limits: Limits) -> Option<Response<Body>> {
    // RFC 9112 §3.2: an HTTP/1.1 request without `Host`, or any request with more than
    // one, is a 400. (HTTP/2 names the host in `:authority`; HTTP/1.0 may omit it.)
    let mut hosts = request.headers().get_all(header::HOST).iter();
    let (first, more) = (hosts.next(), hosts.next().is_some());
    let version = request.version();
    let reason = match first {
        _ if more => Some("more than one Host header"),
        None if version == http::Version::HTTP_11 => {
            Some("an HTTP/1.1 request needs a Host header")
        }
        // A Host with `/`, `@`, spaces... would also make one cache key stand for another
        // (`Host: example.com/admin` and `/` against `example.com` and `/admin/`).
        Some(host) if !valid_host(host.as_bytes()) => Some("invalid Host header"),
        _ => None,
    };
    if let Some(reason) = reason {
        return Some(closing(status_response(StatusCode::BAD_REQUEST, reason)));
    }
    if head_bytes(request) > limits.max_head {
        return Some(closing(status_response(
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            "request head too large",
        )));
    }
    None
}

/// RFC 3986's `host [ ":" port ]`, loosely: the characters of a reg-name, an IP literal
/// and a port, nothing else (no `/`, `?`, `#`, `@`, spaces or controls). Empty is allowed
/// (RFC 9110 §7.2: a target without an authority).
fn valid_host(host: &[u8]) -> bool {
    host.iter()
        .all(|b| b.is_ascii_alphanumeric() || b"-._~!$&'()*+,;=%:[]".contains(b))
}

/// `response` with `Connection: close`: the request's body, if any, stays unread on the
/// socket, so the connection cannot be reused.
fn closing(mut response: Response<Body>) -> Response<Body> {
    response
        .headers_mut()
        .insert(header::CONNECTION, HeaderValue::from_static("close"));
    response
}

/// Applies the body limits and passes the request on.
fn handle(
    request: Request<Incoming>,
    info: ConnInfo,
    limits: Limits,
    next: &HttpService,
    close: bool,
) -> ResponseFuture {
    if let Some(refused) = refuse(&request, limits) {
        return Box::pin(async { Ok(refused) });
    }
    let max_body = limits.max_body;
    let http1 = request.version() <= http::Version::HTTP_11;
    let declared = request
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.parse::<u64>().ok());
    let (mut parts, body) = request.into_parts();
    parts.extensions.insert(info);
    // HTTP/2 names the host in the URI's authority: the tiers behind read `Host`, and the
    // path in origin form, as HTTP/1.1 gives them.
    if let Some(authority) = parts.uri.authority() {
        if !parts.headers.contains_key(header::HOST) {
            if let Ok(host) = HeaderValue::from_str(authority.as_str()) {
                parts.headers.insert(header::HOST, host);
            }
        }
        if let Some(path) = parts.uri.path_and_query() {
            if let Ok(uri) = Uri::builder().path_and_query(path.clone()).build() {
                parts.uri = uri;
            }
        }
    }
    // A request without a body (most of them) passes an empty one, which costs no
    // allocation; a body is limited in size and in pauses.
    let body: Body = if http_body::Body::is_end_stream(&body) {
        empty()
    } else {
        let limit = usize::try_from(max_body).unwrap_or(usize::MAX);
        let limited = Limited::new(body, limit)
            .map_err(move |error| limit_error(error, max_body))
            .boxed_unsync();
        crate::slow_body::Timed::new(limited, limits.body_timeout).boxed_unsync()
    };
    if declared.is_some_and(|length| length > max_body) {
        return Box::pin(async { Ok(too_large()) });
    }
    let response = call(next, Request::from_parts(parts, body));
    if !close {
        return response;
    }
    Box::pin(async move {
        let mut response = answer(response).await;
        // HTTP/2 has no Connection header: its drain is the GOAWAY.
        if http1 {
            response
                .headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        Ok(response)
    })
}

/// Names the limit error so the tier reading the body can answer 413.
fn limit_error(error: BoxError, limit: u64) -> BoxError {
    if error.is::<http_body_util::LengthLimitError>() {
        Box::new(BodyTooLarge { limit })
    } else {
        error
    }
}

fn too_large() -> Response<Body> {
    closing(status_response(
        StatusCode::PAYLOAD_TOO_LARGE,
        "request body too large",
    ))
}
