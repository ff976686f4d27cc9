//! One request's trip through the app server: read the body (whole if small), wait for an idle
//! worker, send the request, relay the worker's frames into a response, give the worker back.
//!
//! Failures map to responses here and nowhere else: queue full or timed out → 503, worker died
//! → 502, worker stuck past the timeout → 504 (after its Python stack is dumped), body over the
//! limit → 413.

use std::sync::Arc;

use bytes::Bytes;
use http::{HeaderName, HeaderValue, Request, Response, StatusCode};
use http_body_util::BodyExt;
use strata_core::seam::{full, status_response};
use strata_core::{Body, BodyTooLarge, BoxError, ConnInfo};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;
use tokio::time::Instant;

use super::body::ChannelBody;
use super::cgi;
use super::pool::{Rejected, WorkerConn};
use super::supervisor::Cause;
use super::Shared;
use crate::proto::{self, kind, Encoder, ProtoError};

/// What went wrong talking to a worker.
enum Failure {
    /// The worker closed its socket or sent garbage: it is gone.
    Died(ProtoError),
    /// The request passed its deadline.
    TimedOut,
}

/// The request body still to be sent to the worker, if it was not read whole.
struct PendingBody(Option<Body>);

/// Serves one request.
pub async fn run(shared: Arc<Shared>, request: Request<Body>) -> Response<Body> {
    let started = Instant::now();
    let response = serve(&shared, request, started).await;
    shared.metrics.requests.inc(response.status().as_u16());
    response
}

async fn serve(shared: &Arc<Shared>, request: Request<Body>, started: Instant) -> Response<Body> {
    let (parts, body) = request.into_parts();
    let mut vars = cgi::build(
        &parts,
        parts.extensions.get::<ConnInfo>(),
        &shared.config.script_name,
    );
    let (start, complete, rest) = match read_start(body, shared.config.buffer_body_bytes).await {
        Ok(read) => read,
        Err(error) if error.is::<BodyTooLarge>() => {
            return status_response(StatusCode::PAYLOAD_TOO_LARGE, &error.to_string())
        }
        Err(error) => {
            return status_response(StatusCode::BAD_REQUEST, &format!("request body: {error}"))
        }
    };
    if complete && vars.get("CONTENT_LENGTH").is_none() && !start.is_empty() {
        // A chunked body read whole: give frameworks that rely on it a length.
        vars.set("CONTENT_LENGTH", start.len().to_string());
    }
    let mut enc = Encoder::new();
    let mut rest = PendingBody(rest);
    for _attempt in 0..3 {
        let waited = Instant::now();
        let mut worker = match shared.pool.acquire().await {
            Ok(worker) => worker,
            Err(rejected) => return rejected_response(shared, rejected),
        };
        shared.metrics.queue_wait.observe(waited.elapsed());
        let seq = worker.served as u32;
        enc.clear();
        proto::encode_request(&mut enc, seq, complete, vars.iter(), &start);
        if let Err(error) = worker.writer.write_all(enc.bytes()).await {
            // The worker died while idle and never saw this request: try another one.
            tracing::warn!(worker = worker.id, %error, "worker gone before the request was sent");
            shared.worker_gone(worker.id, Cause::Crash);
            continue;
        }
        let deadline = started + shared.config.timeout;
        let response = relay(shared, worker, &mut rest, deadline, &parts.method).await;
        shared.metrics.latency.observe(started.elapsed());
        return response;
    }
    status_response(StatusCode::BAD_GATEWAY, "no worker could take the request")
}

/// Reads the body up to `limit` bytes; returns what was read, whether that is all of it, and
/// the rest of the body otherwise.
async fn read_start(
    mut body: Body,
    limit: usize,
) -> Result<(Vec<u8>, bool, Option<Body>), BoxError> {
    let mut start = Vec::new();
    if http_body::Body::is_end_stream(&body) {
        return Ok((start, true, None));
    }
    while start.len() <= limit {
        match body.frame().await {
            None => return Ok((start, true, None)),
            Some(frame) => {
                if let Ok(data) = frame?.into_data() {
                    start.extend_from_slice(&data);
                }
            }
        }
    }
    Ok((start, false, Some(body)))
}

fn rejected_response(shared: &Shared, rejected: Rejected) -> Response<Body> {
    let message = match rejected {
        Rejected::Full => "all workers are busy and the queue is full".to_owned(),
        Rejected::Timeout => format!(
            "no worker became free within {}",
            strata_core::duration::format(shared.config.queue_timeout)
        ),
        Rejected::Closed => "shutting down".to_owned(),
    };
    let mut response = status_response(StatusCode::SERVICE_UNAVAILABLE, &message);
    response
        .headers_mut()
        .insert(http::header::RETRY_AFTER, HeaderValue::from_static("1"));
    response
}

/// Talks to the worker until the response head arrives; returns the response, whose body the
/// rest of the exchange feeds.
async fn relay(
    shared: &Arc<Shared>,
    mut worker: WorkerConn,
    rest: &mut PendingBody,
    deadline: Instant,
    method: &http::Method,
) -> Response<Body> {
    let mut payload = Vec::new();
    match next_frame(&mut worker, &mut payload, rest, deadline).await {
        Ok(kind::HEAD) => {}
        Ok(other) => {
            let error = ProtoError::UnexpectedKind(other);
            return failed(shared, worker, Failure::Died(error), method);
        }
        Err(failure) => return failed(shared, worker, failure, method),
    }
    let mut response = match build_response(&payload) {
        Ok(response) => response,
        Err(error) => {
            return failed(shared, worker, Failure::Died(error), method);
        }
    };
    // Fast path: the whole body is already buffered (most pages): no task, no channel.
    let mut chunks = Vec::new();
    loop {
        match buffered_frame(&mut worker, &mut payload) {
            Some(kind::CHUNK) => chunks.push(Bytes::copy_from_slice(&payload)),
            Some(kind::END) => {
                finish(shared, worker);
                let body = match chunks.len() {
                    0 => strata_core::seam::empty(),
                    1 => full(chunks.pop().expect("one chunk")),
                    _ => full(chunks.concat()),
                };
                *response.body_mut() = body;
                return response;
            }
            Some(other) => {
                let error = ProtoError::UnexpectedKind(other);
                return failed(shared, worker, Failure::Died(error), method);
            }
            None => break,
        }
    }
    let (tx, rx) = mpsc::channel(16);
    *response.body_mut() = ChannelBody::new(chunks, rx).boxed_unsync();
    let shared = shared.clone();
    let rest = PendingBody(rest.0.take());
    tokio::spawn(stream(shared, worker, rest, deadline, tx));
    response
}

/// Relays body chunks after the head until the worker ends the response.
async fn stream(
    shared: Arc<Shared>,
    mut worker: WorkerConn,
    mut rest: PendingBody,
    deadline: Instant,
    tx: mpsc::Sender<Result<Bytes, BoxError>>,
) {
    let mut payload = Vec::new();
    let mut client_gone = false;
    loop {
        match next_frame(&mut worker, &mut payload, &mut rest, deadline).await {
            Ok(kind::CHUNK) => {
                // A client that went away still lets the worker finish; its bytes are dropped.
                if !client_gone && tx.send(Ok(Bytes::copy_from_slice(&payload))).await.is_err() {
                    client_gone = true;
                }
            }
            Ok(kind::END) => return finish(&shared, worker),
            Ok(kind::ABORT) => {
                let _ = tx
                    .send(Err("the application failed mid-response".into()))
                    .await;
                return finish(&shared, worker);
            }
            Ok(other) => {
                let _ = tx.send(Err("worker protocol error".into())).await;
                return lose(
                    &shared,
                    worker,
                    Failure::Died(ProtoError::UnexpectedKind(other)),
                );
            }
            Err(failure) => {
                let _ = tx.send(Err("the worker stopped mid-response".into())).await;
                return lose(&shared, worker, failure);
            }
        }
    }
}

/// Reads the next frame, answering body reads on the way.
async fn next_frame(
    worker: &mut WorkerConn,
    payload: &mut Vec<u8>,
    rest: &mut PendingBody,
    deadline: Instant,
) -> Result<u8, Failure> {
    loop {
        let kind = tokio::time::timeout_at(deadline, read_frame(worker, payload))
            .await
            .map_err(|_| Failure::TimedOut)?
            .map_err(Failure::Died)?;
        if kind != kind::READ {
            return Ok(kind);
        }
        let mut enc = Encoder::new();
        let mut ended = false;
        match rest.0.as_mut() {
            None => enc.frame(kind::BODY, b""),
            Some(body) => loop {
                match tokio::time::timeout_at(deadline, body.frame()).await {
                    Err(_) => return Err(Failure::TimedOut),
                    Ok(None) => {
                        ended = true;
                        enc.frame(kind::BODY, b"");
                        break;
                    }
                    // Trailers and empty frames carry nothing for `wsgi.input`: read on.
                    Ok(Some(Ok(frame))) => match frame.into_data() {
                        Ok(data) if !data.is_empty() => {
                            enc.frame(kind::BODY, &data);
                            break;
                        }
                        _ => continue,
                    },
                    Ok(Some(Err(error))) => {
                        ended = true;
                        enc.frame(kind::BODY_ERROR, error.to_string().as_bytes());
                        break;
                    }
                }
            },
        }
        if ended {
            rest.0 = None;
        }
        worker
            .writer
            .write_all(enc.bytes())
            .await
            .map_err(|e| Failure::Died(e.into()))?;
    }
}

async fn read_frame(worker: &mut WorkerConn, payload: &mut Vec<u8>) -> Result<u8, ProtoError> {
    let mut header = [0u8; 5];
    worker.reader.read_exact(&mut header).await?;
    let (kind, len) = proto::parse_header(header)?;
    payload.clear();
    payload.resize(len, 0);
    worker.reader.read_exact(payload).await?;
    Ok(kind)
}

/// Takes a frame that is already whole in the read buffer, without waiting.
fn buffered_frame(worker: &mut WorkerConn, payload: &mut Vec<u8>) -> Option<u8> {
    let buffer = worker.reader.buffer();
    let header: [u8; 5] = buffer.get(..5)?.try_into().ok()?;
    let (kind, len) = proto::parse_header(header).ok()?;
    let frame = buffer.get(5..5 + len)?;
    payload.clear();
    payload.extend_from_slice(frame);
    tokio::io::AsyncBufRead::consume(std::pin::Pin::new(&mut worker.reader), 5 + len);
    Some(kind)
}

fn build_response(head: &[u8]) -> Result<Response<Body>, ProtoError> {
    let head = proto::decode_head(head)?;
    let status = StatusCode::from_u16(head.status).map_err(|_| ProtoError::Truncated)?;
    let mut response = Response::new(strata_core::seam::empty());
    *response.status_mut() = status;
    let headers = response.headers_mut();
    for (name, value) in head.headers {
        match (HeaderName::from_bytes(name), HeaderValue::from_bytes(value)) {
            (Ok(name), Ok(value)) => {
                headers.append(name, value);
            }
            _ => tracing::warn!(
                header = %String::from_utf8_lossy(name),
                "dropping an invalid response header"
            ),
        }
    }
    Ok(response)
}

/// A complete exchange: count it, recycle the worker if it has served enough, give it back.
fn finish(shared: &Shared, mut worker: WorkerConn) {
    worker.served += 1;
    if worker.served >= worker.limit && shared.pool.mark_retiring(worker.id) {
        shared.recycle(worker.id, Cause::MaxRequests);
    }
    shared.pool.release(worker);
}

/// The worker failed before the head: answer 502 or 504 and replace it.
fn failed(
    shared: &Shared,
    worker: WorkerConn,
    failure: Failure,
    method: &http::Method,
) -> Response<Body> {
    let response = match failure {
        Failure::TimedOut => {
            tracing::error!(
                worker = worker.id,
                pid = worker.pid,
                %method,
                "request passed the {} timeout; the worker's Python stack follows, then it is killed",
                strata_core::duration::format(shared.config.timeout)
            );
            status_response(StatusCode::GATEWAY_TIMEOUT, "the application took too long")
        }
        Failure::Died(ref error) => {
            tracing::error!(worker = worker.id, pid = worker.pid, %error, "worker died during a request");
            status_response(StatusCode::BAD_GATEWAY, "the application worker died")
        }
    };
    lose(shared, worker, failure);
    response
}

/// Replaces a worker that failed; a stuck one is killed first.
fn lose(shared: &Shared, worker: WorkerConn, failure: Failure) {
    let cause = match failure {
        Failure::TimedOut => {
            super::supervisor::kill_stuck(worker.pid);
            Cause::Timeout
        }
        Failure::Died(_) => Cause::Crash,
    };
    shared.worker_gone(worker.id, cause);
}
