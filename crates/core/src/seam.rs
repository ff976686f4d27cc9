//! The seam between tiers.
//!
//! Every HTTP tier is an [`HttpService`] (a `tower::Service<Request<Body>>` answering
//! `Response<Body>`, called by shared reference). Tiers never fail at the seam: a tier turns
//! its own failures into responses (502, 503, 504), so the error type is `Infallible`.
//! Co-located tiers call each other through this type directly; split across hosts, the next
//! tier is an HTTP client service of the same type.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};

use bytes::Bytes;
use http::{header, HeaderMap, HeaderName, HeaderValue, Request, Response, StatusCode};
use http_body_util::{combinators::UnsyncBoxBody, BodyExt, Empty, Full};
use tower::{Service, ServiceExt};

/// An error carried by a body or a tier.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The body type that crosses tiers, in both directions.
pub type Body = UnsyncBoxBody<Bytes, BoxError>;

/// A tier as the next tier (or the listener) sees it: cloned by reference count, called by
/// shared reference, so a request crossing it costs the boxed future of the tier's work and
/// nothing else. It is a `tower::Service` as well, always ready.
#[derive(Clone)]
pub struct HttpService(Arc<dyn Fn(Request<Body>) -> ResponseFuture + Send + Sync>);

impl HttpService {
    /// A tier written as a function from the request to the future of its response.
    pub fn from_fn<F, Fut>(tier: F) -> Self
    where
        F: Fn(Request<Body>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<Response<Body>, Infallible>> + Send + 'static,
    {
        Self(Arc::new(move |request| Box::pin(tier(request))))
    }

    /// Any tower service, cloned for each request (tower calls by `&mut`).
    pub fn new<S>(service: S) -> Self
    where
        S: Service<Request<Body>, Response = Response<Body>, Error = Infallible>
            + Clone
            + Send
            + Sync
            + 'static,
        S::Future: Send + 'static,
    {
        Self(Arc::new(move |request| {
            let mut service = service.clone();
            // Tiers are ready at once (they queue inside, never by back-pressure at the
            // seam): the check passes on its first poll and the call goes straight out.
            let mut cx = Context::from_waker(Waker::noop());
            match service.poll_ready(&mut cx) {
                Poll::Ready(Ok(())) => Box::pin(service.call(request)),
                Poll::Ready(Err(never)) => match never {},
                Poll::Pending => Box::pin(service.oneshot(request)),
            }
        }))
    }

    /// Sends `request` to the tier.
    pub fn serve(&self, request: Request<Body>) -> ResponseFuture {
        (self.0)(request)
    }
}

impl std::fmt::Debug for HttpService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("HttpService")
    }
}

impl Service<Request<Body>> for HttpService {
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = ResponseFuture;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request<Body>) -> ResponseFuture {
        self.serve(request)
    }
}

/// One invalidation: every stored variant of each URL (`host/path?query`, or with a
/// scheme), every object tagged with one of `tags`, every URL matching one of `bans` (`*`
/// matches any run); with `soft`, marked stale instead of removed. `all` drops everything (a
/// node that missed purges it can no longer learn).
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct Purge {
    pub urls: Vec<String>,
    pub tags: Vec<String>,
    pub bans: Vec<String>,
    pub soft: bool,
    pub all: bool,
}

/// What a purge did: objects affected here, and the cluster's nodes it did not reach.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Purged {
    pub count: usize,
    /// The peers that had not applied it when the purge timeout passed (they catch up when
    /// they can reach this node again).
    pub missed: Vec<String>,
}

/// A purge in progress.
pub type Purging = Pin<Box<dyn Future<Output = Purged> + Send>>;

/// Invalidation one tier offers the others, with no network hop: the accelerator implements
/// it for its own store; the cluster wraps it to reach every node. The app server's workers
/// (`strata.purge_url`), `PURGE` requests and the admin API all purge through it.
pub trait Invalidate: Send + Sync {
    /// Applies `purge` here, and wherever else this target reaches.
    fn invalidate(&self, purge: Purge) -> Purging;
}

/// The cache tier as other tiers reach it in-process: memcached protocol commands (text or
/// meta) in, the answers out, with no socket. The app server's workers use it for the Django
/// cache backend (`strata.django.StrataCache`).
pub trait Memcache: Send + Sync {
    /// Runs every command in `commands` (each complete, values included) and returns the
    /// answers as a memcached server would write them.
    fn execute(&self, commands: Vec<u8>) -> Answering;
}

/// Memcached answers on their way.
pub type Answering = Pin<Box<dyn Future<Output = Vec<u8>> + Send>>;

/// Whether a local tier can take traffic, answered out of band by its supervisor: a health
/// check never waits behind busy workers to learn it.
pub trait Readiness: Send + Sync {
    fn readiness(&self) -> Ready;
}

/// A local tier's answer to a health check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ready {
    /// Serving: warm workers connected, not shutting down.
    pub ready: bool,
    /// Workers free right now.
    pub free: usize,
}

/// Why a next tier on another host gave no response of its own, attached to the 502/504 the
/// client answers instead (a response extension): the balancer retries a request that never
/// left (`Connect`) and counts each kind against the backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpstreamFailure {
    /// No connection could be made: nothing was sent.
    Connect,
    /// The connection failed after the request was (perhaps) sent.
    Broken,
    /// No response head within the timeout.
    Timeout,
}

/// Where a request came from, inserted into request extensions by the listener.
#[derive(Debug, Clone, Copy)]
pub struct ConnInfo {
    /// The peer's address.
    pub remote: SocketAddr,
    /// The local address the connection was accepted on.
    pub local: SocketAddr,
    /// Whether the connection was TLS (`wsgi.url_scheme` = `https`).
    pub secure: bool,
}

/// The error a request body yields once it passes the configured size limit; the tier that
/// reads the body answers 413.
#[derive(Debug, Clone, Copy)]
pub struct BodyTooLarge {
    /// The limit that was passed, in bytes.
    pub limit: u64,
}

impl std::fmt::Display for BodyTooLarge {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "request body is larger than {} bytes", self.limit)
    }
}

impl std::error::Error for BodyTooLarge {}

/// The error a request body yields when the client stops sending it for longer than the
/// listener allows (`lb.body_read_timeout`); the tier reading the body answers 408.
#[derive(Debug, Clone, Copy)]
pub struct BodyStalled {
    pub after: std::time::Duration,
}

impl std::fmt::Display for BodyStalled {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "the client sent no request body data for {:?}",
            self.after
        )
    }
}

impl std::error::Error for BodyStalled {}

/// A future answering a request through a seam service.
pub type ResponseFuture =
    Pin<Box<dyn Future<Output = Result<Response<Body>, Infallible>> + Send + 'static>>;

/// Sends `request` to `service` (await it with [`answer`]). Boxed with its type spelled out:
/// this keeps the compiler from losing the lifetime of the body's error type inside callers'
/// async state machines.
pub fn call(service: &HttpService, request: Request<Body>) -> ResponseFuture {
    service.serve(request)
}

/// Awaits a [`call`]; tiers answer every request, so there is no error to handle.
pub async fn answer(future: ResponseFuture) -> Response<Body> {
    match future.await {
        Ok(response) => response,
        Err(never) => match never {},
    }
}

/// Header fields that describe one connection (RFC 9110 §7.6.1): never stored, never
/// forwarded.
static HOP_BY_HOP: [HeaderName; 9] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::TE,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TRAILER,
];

/// Whether `name` is one of [`HOP_BY_HOP`] (a match on the text: a jump on its length and a
/// comparison or two, where comparing with each name in turn costs nine).
fn is_hop_by_hop(name: &HeaderName) -> bool {
    matches!(
        name.as_str(),
        "connection"
            | "keep-alive"
            | "proxy-connection"
            | "te"
            | "transfer-encoding"
            | "upgrade"
            | "proxy-authenticate"
            | "proxy-authorization"
            | "trailer"
    )
}

/// Removes the hop-by-hop fields and the fields `Connection` names.
///
/// Most messages carry none: one pass over the names (comparisons of known names, no
/// hashing) finds that out. A field named by `Connection` needs a `Connection` field, itself
/// hop-by-hop, so the pass cannot miss one.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    if !headers.keys().any(is_hop_by_hop) {
        return;
    }
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok())
        .collect();
    for name in named.iter().chain(HOP_BY_HOP.iter()) {
        headers.remove(name);
    }
}

/// A body holding `bytes` whole.
pub fn full(bytes: impl Into<Bytes>) -> Body {
    Full::new(bytes.into())
        .map_err(|never| match never {})
        .boxed_unsync()
}

/// An empty body.
pub fn empty() -> Body {
    Empty::new().map_err(|never| match never {}).boxed_unsync()
}

/// A short plain-text response for an error a tier produces itself.
pub fn status_response(status: StatusCode, message: &str) -> Response<Body> {
    let text = format!("{} {}\n", status.as_u16(), message);
    let mut response = Response::new(full(text));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn status_response_has_code_and_text() {
        let response = status_response(StatusCode::SERVICE_UNAVAILABLE, "queue full");
        assert_eq!(response.status(), 503);
        let body = response.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(&body[..], b"503 queue full\n");
    }

    fn headers(fields: &[(&str, &str)]) -> HeaderMap {
        fields
            .iter()
            .map(|(n, v)| {
                (
                    HeaderName::from_bytes(n.as_bytes()).unwrap(),
                    HeaderValue::from_str(v).unwrap(),
                )
            })
            .collect()
    }

    #[test]
    fn hop_by_hop_fields_and_those_connection_names_go() {
        let mut map = headers(&[
            ("connection", "close, X-Trace ,"),
            ("keep-alive", "timeout=5"),
            ("x-trace", "1"),
            ("te", "trailers"),
            ("transfer-encoding", "chunked"),
            ("content-type", "text/plain"),
            ("x-kept", "2"),
        ]);
        strip_hop_by_hop(&mut map);
        let left: Vec<&str> = map.keys().map(HeaderName::as_str).collect();
        assert_eq!(left, ["content-type", "x-kept"]);
    }

    #[test]
    fn the_quick_check_knows_every_hop_by_hop_name() {
        assert!(HOP_BY_HOP.iter().all(is_hop_by_hop));
        assert!(!is_hop_by_hop(&header::HOST));
        assert!(!is_hop_by_hop(&HeaderName::from_static(
            "x-forwarded-proto"
        )));
    }

    #[test]
    fn messages_without_hop_by_hop_fields_are_left_alone() {
        let mut map = headers(&[("x-trace", "1"), ("host", "a")]);
        strip_hop_by_hop(&mut map);
        assert_eq!(map.len(), 2);
    }
}
