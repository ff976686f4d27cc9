//! One request's trip through the app server: read the body (whole if small), queue the
//! request for the workers, relay the frames of the worker that took it into a response, give
//! the worker back to its watcher.
//!
//! Failures map to responses here and nowhere else: queue full or timed out → 503, worker died
//! → 502, worker stuck past the timeout → 504 (after its Python stack is dumped), body over the
//! limit → 413. A client that leaves mid-exchange costs nothing: the [`Lease`] finishes the
//! exchange with the worker on its own.
//!
//! # Life of a request, across the tiers
//!
//! 1. `lb::serve` accepts, hyper parses the head (bad → 400, too big → 431), a declared body over
//!    `max_body_bytes` → 413; the body is wrapped so that passing the limit later yields
//!    `BodyTooLarge`. A route to a static directory answers here.
//! 2. The accelerator answers from its store, or passes the request on (above).
//! 3. `exchange::run` builds the CGI variables in Rust (`cgi.rs`: PATH_INFO percent-decoded,
//!    SCRIPT_NAME split off, headers with `_` dropped, repeated headers joined; one buffer sized
//!    from the head, already in the request frame's format) and reads up to
//!    `buffer_body_bytes` of body.
//! 4. `Ticket::submit` puts the request frame in the shared ring (503 if `queue_length`
//!    requests wait already) and rings the futex only if a worker sleeps on it.
//! 5. The first idle worker to look takes it, without the master running in between, buffers
//!    `BEGIN id`, and builds the environ (latin-1 strings;
//!    the keys made once per worker and kept, up to 256 of them, as header names are the client's),
//!    calls the application, and sends `HEAD`, `CHUNK`s and `END` (or `ABORT` if the application
//!    failed after the head was sent). List bodies go out in one write with a `Content-Length`;
//!    other iterables are flushed chunk by chunk.
//!    A response that is whole when the application returns (a list body, nothing read from
//!    the socket) goes into the worker's answer ring; the collector hands it to the exchange.
//!    Otherwise the worker's watcher reads `BEGIN` and hands the socket to the request's
//!    exchange, which relays the rest.
//! 6. After `END` the worker goes straight to the ring for its next request (over the socket,
//!    its connection goes back to a watcher); if it reached its request limit its replacement is forked first and it is
//!    retired (its slot says leave) when that one is ready.

use std::sync::Arc;

use bytes::Bytes;
use http::{HeaderName, HeaderValue, Request, Response, StatusCode};
use http_body_util::BodyExt;
use strata_core::seam::{empty, full, status_response, Purge};
use strata_core::{Body, BodyStalled, BodyTooLarge, BoxError, ConnInfo};
use tokio::sync::mpsc;
use tokio::time::Instant;

use super::cgi;
use super::dispatch::{watch, Handoff, Ticket};
use super::pool::{Rejected, WorkerConn};
use super::supervisor::Cause;
use super::Shared;
use crate::proto::{self, kind, Encoder, ProtoError};
use strata_core::channel_body::ChannelBody;

/// What went wrong talking to a worker.
pub enum Failure {
    /// The worker closed its socket or sent garbage: it is gone.
    Died(ProtoError),
    /// The request passed its deadline.
    TimedOut,
}

/// What the worker may still ask of the exchange while it runs the request: the rest of the
/// request body (if it was not read whole), and purges of cached responses.
#[derive(Default)]
struct PendingBody {
    body: Option<Body>,
    /// The client is gone: body reads fail instead of ending early, so the application does
    /// not act on a truncated body.
    abandoned: bool,
    /// The request's host: purges of a path (`strata.purge_url("/blog/")`) mean this host.
    /// Kept as it came (a shared reference to the request's bytes) and read only by a purge.
    host: Option<HeaderValue>,
}

/// A worker lent to one exchange. Dropped before the exchange completed (the client went
/// away and the response future was dropped), it finishes the exchange in a task of its own:
/// the worker is drained and given back, or replaced if the stream cannot be trusted.
struct Lease {
    shared: Arc<Shared>,
    worker: Option<WorkerConn>,
    deadline: Instant,
}

impl Lease {
    fn worker(&mut self) -> &mut WorkerConn {
        self.worker
            .as_mut()
            .expect("a lease holds its worker until taken")
    }

    fn take(mut self) -> WorkerConn {
        self.worker
            .take()
            .expect("a lease holds its worker until taken")
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        let Some(worker) = self.worker.take() else {
            return;
        };
        let shared = self.shared.clone();
        let deadline = self.deadline;
        tokio::spawn(async move {
            let mut rest = PendingBody {
                body: None,
                abandoned: true,
                host: None,
            };
            let mut worker = worker;
            let mut payload = Vec::new();
            loop {
                match next_frame(&shared, &mut worker, &mut payload, &mut rest, deadline).await {
                    Ok(kind::END | kind::ABORT) => return finish(&shared, worker),
                    Ok(kind::HEAD | kind::CHUNK) => {}
                    Ok(other) => {
                        return lose(
                            &shared,
                            worker,
                            Failure::Died(ProtoError::UnexpectedKind(other)),
                        )
                    }
                    Err(failure) => return lose(&shared, worker, failure),
                }
            }
        });
    }
}

/// Serves one request.
pub async fn run(shared: Arc<Shared>, request: Request<Body>) -> Response<Body> {
    let started = Instant::now();
    let response = serve(&shared, request).await;
    shared.metrics.requests.inc(response.status().as_u16());
    shared.metrics.latency.observe(started.elapsed());
    response
}

async fn serve(shared: &Arc<Shared>, request: Request<Body>) -> Response<Body> {
    let config = shared.config();
    let (parts, body) = request.into_parts();
    let mut vars = cgi::build(
        &parts,
        parts.extensions.get::<ConnInfo>(),
        &config.script_name,
    );
    let (start, complete, body) = match read_start(body, config.buffer_body_bytes).await {
        Ok(read) => read,
        Err(error) if error.is::<BodyTooLarge>() => {
            return status_response(StatusCode::PAYLOAD_TOO_LARGE, &error.to_string())
        }
        Err(error) if error.is::<BodyStalled>() => {
            return status_response(StatusCode::REQUEST_TIMEOUT, &error.to_string())
        }
        Err(error) => {
            return status_response(StatusCode::BAD_REQUEST, &format!("request body: {error}"))
        }
    };
    if complete && !start.is_empty() && !parts.headers.contains_key(http::header::CONTENT_LENGTH) {
        // A chunked body read whole: give frameworks that rely on it a length.
        vars.push(b"CONTENT_LENGTH", start.len().to_string().as_bytes());
    }
    let host = parts.headers.get(http::header::HOST).cloned().or_else(|| {
        parts
            .uri
            .authority()
            .and_then(|a| HeaderValue::from_str(a.as_str()).ok())
    });
    let mut rest = PendingBody {
        body,
        abandoned: false,
        host,
    };
    let frame = vars.into_frame(complete, &start);
    let ticket = match Ticket::submit(shared, frame.bytes(), config.queue_length) {
        Ok(ticket) => ticket,
        Err(rejected) => return rejected_response(shared, rejected),
    };
    drop(frame);
    match ticket.wait().await {
        Ok(Handoff::Worker(worker, deadline)) => {
            let lease = Lease {
                shared: shared.clone(),
                worker: Some(worker),
                deadline,
            };
            relay(shared, lease, &mut rest, &parts.method).await
        }
        Ok(Handoff::Answer(frames)) => match answer_response(frames) {
            Ok(response) => response,
            Err(failure) => failure_response(None, &failure, &parts.method),
        },
        Ok(Handoff::Gone(failure)) => failure_response(None, &failure, &parts.method),
        Ok(Handoff::Closed) => rejected_response(shared, Rejected::Closed),
        Ok(Handoff::Expired) => rejected_response(shared, Rejected::Timeout),
        Err(rejected) => rejected_response(shared, rejected),
    }
}

/// Finishes an exchange whose client is gone (its response future was dropped after a
/// worker had taken the request): the worker is drained and given back.
pub fn abandon(shared: &Arc<Shared>, worker: WorkerConn, deadline: Instant) {
    drop(Lease {
        shared: shared.clone(),
        worker: Some(worker),
        deadline,
    });
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
            "no worker took the request within {}",
            strata_core::duration::format(shared.config().queue_timeout)
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
    mut lease: Lease,
    rest: &mut PendingBody,
    method: &http::Method,
) -> Response<Body> {
    let mut payload = Vec::new();
    let deadline = lease.deadline;
    let first = next_frame(shared, lease.worker(), &mut payload, rest, deadline).await;
    let mut response = match first.and_then(|kind| head_response(kind, &payload)) {
        Ok(response) => response,
        Err(failure) => return failed(shared, lease.take(), failure, method),
    };
    // Fast path: the whole body is already buffered (most pages): no task, no channel.
    // Anything else (a body read after `write()`, a chunk still on its way) streams.
    let mut chunks = Vec::new();
    while let Some(frame) = lease
        .worker()
        .buffered_frame(&mut payload, &[kind::CHUNK, kind::END])
    {
        if frame == kind::END {
            finish(shared, lease.take());
            *response.body_mut() = whole_body(chunks);
            return response;
        }
        chunks.push(Bytes::copy_from_slice(&payload));
    }
    let (tx, rx) = mpsc::channel(16);
    *response.body_mut() = ChannelBody::new(chunks, rx, None).boxed_unsync();
    let rest = std::mem::take(rest);
    tokio::spawn(stream(lease, rest, tx));
    response
}

/// Relays body chunks after the head until the worker ends the response.
async fn stream(
    mut lease: Lease,
    mut rest: PendingBody,
    tx: mpsc::Sender<Result<Bytes, BoxError>>,
) {
    let mut payload = Vec::new();
    let deadline = lease.deadline;
    let shared = lease.shared.clone();
    loop {
        let frame = next_frame(&shared, lease.worker(), &mut payload, &mut rest, deadline).await;
        match frame {
            Ok(kind::CHUNK) => {
                if tx.send(Ok(Bytes::copy_from_slice(&payload))).await.is_err() {
                    return; // The client left; dropping the lease drains the rest.
                }
            }
            Ok(kind::END) => return finish(&shared, lease.take()),
            Ok(kind::ABORT) => {
                let _ = tx
                    .send(Err("the application failed mid-response".into()))
                    .await;
                return finish(&shared, lease.take());
            }
            Ok(other) => {
                let _ = tx.send(Err("worker protocol error".into())).await;
                let failure = Failure::Died(ProtoError::UnexpectedKind(other));
                return lose(&shared, lease.take(), failure);
            }
            Err(failure) => {
                let _ = tx.send(Err("the worker stopped mid-response".into())).await;
                return lose(&shared, lease.take(), failure);
            }
        }
    }
}

/// Reads the next frame, answering body reads, purges and cache commands on the way. Waiting on the worker has no timer
/// of its own: the supervisor's watchdog kills a worker past its deadline, which ends the read.
async fn next_frame(
    shared: &Shared,
    worker: &mut WorkerConn,
    payload: &mut Vec<u8>,
    rest: &mut PendingBody,
    deadline: Instant,
) -> Result<u8, Failure> {
    loop {
        let kind = match worker.read_frame(payload).await {
            Ok(kind) => kind,
            Err(_) if shared.pool.timed_out(worker.id) => return Err(Failure::TimedOut),
            Err(error) => return Err(Failure::Died(error)),
        };
        let mut enc = Encoder::new();
        match kind {
            kind::READ => body_reply(&mut enc, rest, deadline).await?,
            kind::PURGE => {
                let purged = purge(shared, payload, rest.host.as_ref())
                    .await
                    .map_err(Failure::Died)?;
                enc.begin(kind::PURGED).u32(purged as u32).finish();
            }
            kind::CACHE => {
                let answer = match shared.memcache.get() {
                    Some(cache) => cache.execute(std::mem::take(payload)).await,
                    None => b"SERVER_ERROR this node runs no cache tier\r\n".to_vec(),
                };
                enc.frame(kind::CACHE_REPLY, &answer);
            }
            _ => return Ok(kind),
        }
        worker
            .send(enc.bytes())
            .await
            .map_err(|e| Failure::Died(e.into()))?;
    }
}

/// Applies a worker's `PURGE`; paths are taken relative to the request's host. Without an
/// accelerator in this node nothing is stored, so nothing is purged. In a cluster the target
/// reaches every node: this waits until they applied it or the cluster's purge timeout passed.
async fn purge(
    shared: &Shared,
    payload: &[u8],
    host: Option<&HeaderValue>,
) -> Result<usize, ProtoError> {
    let (flags, items) = proto::decode_purge(payload)?;
    let Some(target) = shared.invalidate.get() else {
        return Ok(0);
    };
    let soft = flags & proto::PURGE_SOFT != 0;
    let purge = if flags & proto::PURGE_TAGS != 0 {
        Purge {
            tags: items,
            soft,
            ..Purge::default()
        }
    } else {
        let host = host
            .and_then(|h| h.to_str().ok())
            .unwrap_or_default()
            .to_ascii_lowercase();
        let urls = items
            .into_iter()
            .map(|url| {
                if url.starts_with('/') {
                    format!("{host}{url}")
                } else {
                    url
                }
            })
            .collect();
        Purge {
            urls,
            soft,
            ..Purge::default()
        }
    };
    Ok(target.invalidate(purge).await.count)
}

/// Encodes the answer to a worker's body read: the next bytes, the end, or an error.
async fn body_reply(
    enc: &mut Encoder,
    rest: &mut PendingBody,
    deadline: Instant,
) -> Result<(), Failure> {
    if rest.abandoned {
        enc.frame(kind::BODY_ERROR, b"the client disconnected");
        return Ok(());
    }
    let Some(body) = rest.body.as_mut() else {
        enc.frame(kind::BODY, b"");
        return Ok(());
    };
    loop {
        match tokio::time::timeout_at(deadline, body.frame()).await {
            Err(_) => return Err(Failure::TimedOut),
            Ok(None) => {
                rest.body = None;
                enc.frame(kind::BODY, b"");
                return Ok(());
            }
            // Trailers and empty frames carry nothing for `wsgi.input`: read on.
            Ok(Some(Ok(frame))) => match frame.into_data() {
                Ok(data) if !data.is_empty() => {
                    enc.frame(kind::BODY, &data);
                    return Ok(());
                }
                _ => continue,
            },
            Ok(Some(Err(error))) => {
                rest.body = None;
                rest.abandoned = true;
                enc.frame(kind::BODY_ERROR, error.to_string().as_bytes());
                return Ok(());
            }
        }
    }
}

/// The response a worker wrote to its answer ring: a head, body chunks and the end.
fn answer_response(frames: Vec<u8>) -> Result<Response<Body>, Failure> {
    let frames = Bytes::from(frames);
    let mut response = None;
    let mut chunks = Vec::new();
    let mut at = 0;
    loop {
        let header: [u8; 5] = frames
            .get(at..at + 5)
            .and_then(|h| h.try_into().ok())
            .ok_or(Failure::Died(ProtoError::Truncated))?;
        let (kind, len) = proto::parse_header(header).map_err(Failure::Died)?;
        let payload = at + 5..at + 5 + len;
        if payload.end > frames.len() {
            return Err(Failure::Died(ProtoError::Truncated));
        }
        at = payload.end;
        match kind {
            kind::HEAD if response.is_none() => {
                response = Some(head_response(kind, &frames[payload])?);
            }
            kind::CHUNK if response.is_some() => chunks.push(frames.slice(payload)),
            kind::END if response.is_some() => break,
            other => return Err(Failure::Died(ProtoError::UnexpectedKind(other))),
        }
    }
    let mut response = response.expect("set before the end");
    *response.body_mut() = whole_body(chunks);
    Ok(response)
}

/// A body whose chunks are all here: one buffer, copied only if there are several.
fn whole_body(mut chunks: Vec<Bytes>) -> Body {
    match chunks.len() {
        0 => empty(),
        1 => full(chunks.pop().expect("one chunk")),
        _ => full(chunks.concat()),
    }
}

/// The response for a `HEAD` frame; any other first frame means the worker is broken.
pub(crate) fn head_response(kind: u8, payload: &[u8]) -> Result<Response<Body>, Failure> {
    if kind != kind::HEAD {
        return Err(Failure::Died(ProtoError::UnexpectedKind(kind)));
    }
    let head = proto::decode_head(payload).map_err(Failure::Died)?;
    let status =
        StatusCode::from_u16(head.status).map_err(|_| Failure::Died(ProtoError::Truncated))?;
    let mut response = Response::new(empty());
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.reserve(head.headers.len());
    for (name, value) in head.headers {
        // A field value has no leading or trailing whitespace (RFC 9110 §5.5; HTTP/2 forbids
        // it, RFC 9113 §8.2.1), but WSGI applications send some: Django's `Set-Cookie` is
        // `" csrftoken=…"`.
        let value = value.trim_ascii();
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

/// A complete exchange: count it (recycling the worker if it has served enough), give the
/// worker back to a watcher.
fn finish(shared: &Arc<Shared>, worker: WorkerConn) {
    shared.completed(worker.id);
    watch(shared.clone(), worker);
}

/// The worker failed before the head: answer 502 or 504 and replace it.
fn failed(
    shared: &Shared,
    worker: WorkerConn,
    failure: Failure,
    method: &http::Method,
) -> Response<Body> {
    let response = failure_response(Some(&worker), &failure, method);
    lose(shared, worker, failure);
    response
}

/// The answer to a request whose worker failed before the head: 504 if the watchdog killed
/// it, else 502.
fn failure_response(
    worker: Option<&WorkerConn>,
    failure: &Failure,
    method: &http::Method,
) -> Response<Body> {
    let id = worker.map(|w| w.id);
    match failure {
        Failure::TimedOut => {
            tracing::warn!(worker = ?id, %method, "answered 504: the request timed out");
            status_response(StatusCode::GATEWAY_TIMEOUT, "the application took too long")
        }
        Failure::Died(error) => {
            tracing::error!(worker = ?id, %error, "worker died during a request");
            status_response(StatusCode::BAD_GATEWAY, "the application worker died")
        }
    }
}

/// Replaces a worker that failed. A timed-out one was killed by the watchdog (or, if it was
/// waiting on a slow client body, exits when its socket closes).
fn lose(shared: &Shared, worker: WorkerConn, failure: Failure) {
    let cause = match failure {
        Failure::TimedOut => Cause::Timeout,
        Failure::Died(_) => Cause::Crash,
    };
    shared.worker_gone(worker.id, cause);
}
