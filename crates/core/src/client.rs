//! The client side of the seam: a tier whose next tier runs on another host (or is any HTTP
//! origin) reaches it through this service, with pooled keep-alive connections.

use std::time::Duration;

use http::header::{self, HeaderValue};
use http::uri::{Authority, Scheme};
use http::{Request, Response, StatusCode, Uri};
use http_body_util::BodyExt;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tower::util::BoxCloneSyncService;

use crate::seam::{status_response, strip_hop_by_hop, Body, HttpService, UpstreamFailure};

/// An HTTP/1.1 origin at `base` (`http://host:port`) as a seam service: requests keep their
/// path, query and `Host`; connection failures become 502, a missing response head within
/// `timeout` 504.
pub fn upstream(base: &Uri, timeout: Duration) -> HttpService {
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    connector.set_connect_timeout(Some(Duration::from_secs(5)));
    let client: Client<HttpConnector, Body> = Client::builder(TokioExecutor::new())
        .pool_idle_timeout(Duration::from_secs(30))
        .build(connector);
    let authority = base.authority().cloned();
    BoxCloneSyncService::new(tower::service_fn(move |request: Request<Body>| {
        let client = client.clone();
        let authority = authority.clone();
        async move {
            let request = retarget(request, authority);
            let answer = tokio::time::timeout(timeout, send(&client, request)).await;
            Ok(match answer {
                Ok(Ok(response)) => {
                    let (mut parts, body) = response.into_parts();
                    strip_hop_by_hop(&mut parts.headers);
                    Response::from_parts(parts, body.map_err(Into::into).boxed_unsync())
                }
                Ok(Err(error)) => {
                    tracing::warn!(%error, "upstream request failed");
                    let failure = if error.is_connect() {
                        UpstreamFailure::Connect
                    } else {
                        UpstreamFailure::Broken
                    };
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

/// Sends `request`; a body-less request that failed on a pooled connection the origin had
/// already closed (a keep-alive race) is sent once more on a fresh one.
async fn send(
    client: &Client<HttpConnector, Body>,
    request: Request<Body>,
) -> Result<Response<hyper::body::Incoming>, hyper_util::client::legacy::Error> {
    let replay = (http_body::Body::size_hint(request.body()).exact() == Some(0)).then(|| {
        let mut copy = Request::new(crate::seam::empty());
        *copy.method_mut() = request.method().clone();
        *copy.uri_mut() = request.uri().clone();
        *copy.headers_mut() = request.headers().clone();
        copy
    });
    match (client.request(request).await, replay) {
        (Err(error), Some(replay)) if !error.is_connect() => {
            tracing::debug!(%error, "upstream connection was closed; retrying once");
            client.request(replay).await
        }
        (answer, _) => answer,
    }
}

/// Points the request at the upstream, keeping the client's `Host`.
fn retarget(mut request: Request<Body>, authority: Option<Authority>) -> Request<Body> {
    if !request.headers().contains_key(header::HOST) {
        if let Some(host) = request
            .uri()
            .authority()
            .and_then(|a| HeaderValue::from_str(a.as_str()).ok())
        {
            request.headers_mut().insert(header::HOST, host);
        }
    }
    let mut parts = request.uri().clone().into_parts();
    parts.scheme = Some(Scheme::HTTP);
    parts.authority = authority;
    if parts.path_and_query.is_none() {
        parts.path_and_query = Some(http::uri::PathAndQuery::from_static("/"));
    }
    if let Ok(uri) = Uri::from_parts(parts) {
        *request.uri_mut() = uri;
    }
    *request.version_mut() = http::Version::HTTP_11;
    strip_hop_by_hop(request.headers_mut());
    request
}
