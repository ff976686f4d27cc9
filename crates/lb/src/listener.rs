//! The HTTP/1.1 listener: accept, parse, limit, hand to the next tier, drain on shutdown.

use std::time::Duration;

use http::{header, Request, Response, StatusCode};
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use strata_core::seam::status_response;
use strata_core::shutdown::Stage;
use strata_core::{Body, BodyTooLarge, BoxError, ConnInfo, HttpService, Shutdown};
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tower::ServiceExt;

use crate::LbConfig;

/// Serves HTTP/1.1 on `listener`, passing every well-formed request to `next`, until
/// `shutdown` is requested; then stops accepting and waits for open connections to finish
/// their current exchange, or until shutdown is forced.
pub async fn serve(listener: TcpListener, next: HttpService, config: LbConfig, shutdown: Shutdown) {
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(config.header_read_timeout)
        .max_buf_size(config.max_header_bytes)
        .max_headers(config.max_headers)
        .keep_alive(config.keepalive);
    let local = listener.local_addr().ok();
    // Each connection task holds a clone; `recv()` returns `None` once all have ended.
    let (open_tx, mut open_rx) = mpsc::channel::<()>(1);

    loop {
        let (stream, remote) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(pair) => pair,
                Err(error) => {
                    // Running out of file descriptors must not spin the loop.
                    tracing::warn!(%error, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = shutdown.requested() => break,
        };
        let _ = stream.set_nodelay(true);
        let info = ConnInfo {
            remote,
            local: local.unwrap_or(remote),
            secure: false,
        };
        let next = next.clone();
        let max_body = config.max_body_bytes;
        let draining = shutdown.clone();
        let service = service_fn(move |request: Request<Incoming>| {
            let next = next.clone();
            let close = draining.stage() != Stage::Running;
            handle(request, info, max_body, next, close)
        });
        let connection = builder.serve_connection(TokioIo::new(stream), service);
        let shutdown = shutdown.clone();
        let open = open_tx.clone();
        let linger = config.drain_linger;
        tokio::spawn(async move {
            let _open = open;
            let mut connection = std::pin::pin!(connection);
            tokio::select! {
                result = connection.as_mut() => return log_connection_end(result),
                () = shutdown.requested() => {}
            }
            // Draining. Closing an idle keep-alive connection now would race a request the
            // client may be sending on it; for `drain_linger`, responses say
            // `Connection: close` instead, and only then is the connection shut.
            tokio::select! {
                result = connection.as_mut() => return log_connection_end(result),
                () = tokio::time::sleep(linger) => {}
                () = shutdown.forced() => return,
            }
            connection.as_mut().graceful_shutdown();
            tokio::select! {
                result = connection.as_mut() => log_connection_end(result),
                () = shutdown.forced() => {}
            }
        });
    }
    drop(listener);
    drop(open_tx);
    tokio::select! {
        _ = open_rx.recv() => {}
        () = shutdown.forced() => {}
    }
}

fn log_connection_end(result: Result<(), hyper::Error>) {
    if let Err(error) = result {
        tracing::debug!(%error, "connection ended with an error");
    }
}

/// Applies the body limit and passes the request on.
fn handle(
    request: Request<Incoming>,
    info: ConnInfo,
    max_body: u64,
    next: HttpService,
    close: bool,
) -> ResponseFuture {
    let declared = request
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.parse::<u64>().ok());
    let (mut parts, body) = request.into_parts();
    parts.extensions.insert(info);
    let limit = usize::try_from(max_body).unwrap_or(usize::MAX);
    let body: Body = Limited::new(body, limit)
        .map_err(move |error| limit_error(error, max_body))
        .boxed_unsync();
    let next = if declared.is_some_and(|length| length > max_body) {
        HttpService::new(tower::service_fn(|_| async { Ok(too_large()) }))
    } else {
        next
    };
    let next = if close {
        HttpService::new(next.map_response(|mut response: Response<Body>| {
            response.headers_mut().insert(
                header::CONNECTION,
                header::HeaderValue::from_static("close"),
            );
            response
        }))
    } else {
        next
    };
    Box::pin(next.oneshot(Request::from_parts(parts, body)))
}

/// The boxed future of one request; boxing erases the lifetimes the compiler otherwise fails
/// to prove `Send` for inside the spawned connection task.
type ResponseFuture = std::pin::Pin<
    Box<dyn std::future::Future<Output = Result<Response<Body>, std::convert::Infallible>> + Send>,
>;

/// Names the limit error so the tier reading the body can answer 413.
fn limit_error(error: BoxError, limit: u64) -> BoxError {
    if error.is::<http_body_util::LengthLimitError>() {
        Box::new(BodyTooLarge { limit })
    } else {
        error
    }
}

fn too_large() -> Response<Body> {
    let mut response = status_response(StatusCode::PAYLOAD_TOO_LARGE, "request body too large");
    // The unread body stays on the socket, so the connection cannot be reused.
    response.headers_mut().insert(
        header::CONNECTION,
        header::HeaderValue::from_static("close"),
    );
    response
}
