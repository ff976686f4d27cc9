//! The client side of the seam: a tier whose next tier runs on another host (or is any HTTP
//! origin) reaches it through this service, over HTTP/1.1 connections kept alive in a pool of
//! their own.
//!
//! The pool is a stack of idle connections (the most recently used first, so few stay warm).
//! A connection goes back when its response body has been read to the end; one whose body was
//! left unread is closed. A request that a pooled connection could not take (the origin had
//! closed it: the keep-alive race) is sent again on a fresh connection: hyper hands such a
//! request back unsent.

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
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tower::util::BoxCloneSyncService;

use crate::seam::{
    status_response, strip_hop_by_hop, Body, BoxError, HttpService, UpstreamFailure,
};

/// Longest wait for a new connection to an origin.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Idle connections kept per origin.
const MAX_IDLE: usize = 256;

/// An HTTP/1.1 origin at `base` (`http://host:port`) as a seam service: requests keep their
/// path, query and `Host`; connection failures become 502, a missing response head within
/// `timeout` 504, each marked with its [`UpstreamFailure`].
pub fn upstream(base: &Uri, timeout: Duration) -> HttpService {
    let authority = base
        .authority()
        .map_or_else(|| "localhost:80".to_owned(), |a| a.as_str().to_owned());
    let address = if authority.contains(':') {
        authority.clone()
    } else {
        format!("{authority}:80")
    };
    let origin = Arc::new(Origin {
        address,
        idle: Mutex::new(Vec::new()),
    });
    BoxCloneSyncService::new(tower::service_fn(move |request: Request<Body>| {
        let origin = origin.clone();
        async move {
            let request = retarget(request);
            let answer = tokio::time::timeout(timeout, origin.send(request)).await;
            Ok(match answer {
                Ok(Ok(response)) => response,
                Ok(Err(failure)) => {
                    failed(StatusCode::BAD_GATEWAY, "upstream unavailable", failure)
                }
                Err(_) => failed(
                    StatusCode::GATEWAY_TIMEOUT,
                    "upstream timed out",
                    UpstreamFailure::Timeout,
                ),
            })
        }
    }))
}

fn failed(status: StatusCode, text: &str, failure: UpstreamFailure) -> Response<Body> {
    let mut response = status_response(status, text);
    response.extensions_mut().insert(failure);
    response
}

/// One origin and its idle connections.
struct Origin {
    address: String,
    idle: Mutex<Vec<SendRequest<Body>>>,
}

impl Origin {
    fn take_idle(&self) -> Option<SendRequest<Body>> {
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        while let Some(sender) = idle.pop() {
            if !sender.is_closed() {
                return Some(sender);
            }
        }
        None
    }

    fn give_back(&self, sender: SendRequest<Body>) {
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        if idle.len() < MAX_IDLE {
            idle.push(sender);
        }
    }

    async fn connect(&self) -> Result<SendRequest<Body>, UpstreamFailure> {
        let connect = async {
            let stream = TcpStream::connect(&self.address).await?;
            stream.set_nodelay(true)?;
            // One buffer, one write per request (see the listener's writev).
            let (sender, connection) = http1::Builder::new()
                .writev(false)
                .handshake(TokioIo::new(stream))
                .await
                .map_err(std::io::Error::other)?;
            tokio::spawn(async move {
                if let Err(error) = connection.await {
                    tracing::debug!(%error, "upstream connection ended");
                }
            });
            Ok::<_, std::io::Error>(sender)
        };
        match tokio::time::timeout(CONNECT_TIMEOUT, connect).await {
            Ok(Ok(sender)) => Ok(sender),
            Ok(Err(error)) => {
                tracing::warn!(%error, origin = %self.address, "cannot connect upstream");
                Err(UpstreamFailure::Connect)
            }
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
    ) -> Result<Response<Body>, UpstreamFailure> {
        let mut fresh = false;
        loop {
            let mut sender = match self.take_idle() {
                Some(sender) => sender,
                None => {
                    fresh = true;
                    self.connect().await?
                }
            };
            if sender.ready().await.is_err() {
                if fresh {
                    return Err(UpstreamFailure::Connect);
                }
                continue;
            }
            match sender.try_send_request(request).await {
                Ok(response) => {
                    let (mut parts, body) = response.into_parts();
                    strip_hop_by_hop(&mut parts.headers);
                    let body = Returning {
                        body,
                        sender: Some(sender),
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

/// A response body that gives its connection back to the pool at its end.
struct Returning {
    body: Incoming,
    sender: Option<SendRequest<Body>>,
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
            if let Some(sender) = self.sender.take() {
                self.origin.give_back(sender);
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
        if let Some(sender) = self.sender.take() {
            if self.body.is_end_stream() {
                self.origin.give_back(sender);
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
