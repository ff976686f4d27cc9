//! The load balancer tier.
//!
//! The HTTP/1.1 listener in front of the next tier: it parses requests (malformed → 400,
//! oversized head → 431, body over the limit → 413, none of which reach the next tier), tags
//! each request with [`strata_core::ConnInfo`] and drains connections on shutdown. Routes send
//! a host and path prefix to a static directory, served without Python, to a backend pool
//! (other Strata nodes, HTTP servers, or this node's next tier: chosen per request, checked
//! actively and passively, retried when unreachable), or to the next tier.
//!
//! # How it works
//!
//! The HTTP listeners (hyper, `listener.rs`): `lb.bind` speaks HTTP/1.1 (hyper's HTTP/1
//! connection alone; with `lb.h2c`, HTTP/2 with prior knowledge too, by hyper-util's auto
//! builder), `lb.tls_bind` TLS (the core's `tls.rs`: rustls with ring,
//! ALPN `h2` then `http/1.1`, a certificate resolver whose PEM files are checked every 2 s and
//! swapped when they change) with HTTP/1.1 or HTTP/2 by the auto builder; a connection whose
//! ALPN chose `h2` is HTTP/2 alone, its preface checked first (`preface.rs`: anything else gets
//! `GOAWAY` with `PROTOCOL_ERROR`). The request-head
//! timeout (`header_read_timeout`, which also bounds idle keep-alive) is the connection's own
//! (`head_timer.rs`): requests record that they began, their response bodies' ends record
//! when, and one lazy timer per connection reads those records when it fires and sleeps on
//! when the connection is not overdue — hyper's own timer would arm and disarm a timer-wheel
//! entry for every request. HTTP/2 connections have no head timeout. It enforces
//! the head and body limits so that malformed or oversized requests never reach a tier behind
//! it (an HTTP/1.1 request without `Host`, or any with two, is a 400; the head's size is counted
//! from the parsed request, so the limit holds however TCP cut it), gives HTTP/2 requests a
//! `Host` header and an origin-form path as HTTP/1.1 has, tags
//! requests with `ConnInfo` (`secure` on the TLS listener; with `lb.proxy_protocol`, the client
//! named by the PROXY v1/v2 header that `proxy_protocol.rs` reads off the socket before anything
//! else, peeking so no byte after it is consumed), holds at most `max_connections` per listener
//! (a semaphore taken before `accept`, so the rest wait in the kernel's queue), ends a request
//! body that pauses past `body_read_timeout` with the core's `BodyStalled` (`slow_body.rs`; the
//! app server answers 408), and drains connections when
//! shutdown is requested (HTTP/1.1 responses say `Connection: close`, HTTP/2 gets GOAWAY). `routes.rs` puts `[[lb.routes]]` (host,
//! path prefix) in front of the next tier: a route either names a static directory or passes the
//! request on; `crates/strata/src/stack.rs` wraps the node's front service with it. `statics.rs`
//! serves a directory (Django's `STATIC_ROOT`) without Python: the path is percent-decoded once
//! and checked per segment (no `..`, no hidden names, no encoded `/`, `\` or NUL), and the file
//! must canonicalise inside the root, so symlinks cannot lead out; `.br`/`.gz` siblings are
//! chosen by `Accept-Encoding` (a range request always gets the file itself); the validators are
//! an ETag of mtime and length and `Last-Modified`; `conditional.rs` evaluates the RFC 9110
//! preconditions and single byte ranges as pure functions. Files up to 1 MiB are read whole;
//! larger ones stream from a blocking reader through the core's `ChannelBody`.
//!
//! Backend pools (`[[lb.backends]]`): `members.rs` makes each pool's servers (a remote one is
//! the core's HTTP client, `url = "local"` is the node's next tier with the app server's
//! `Readiness`, a host name is one member per address, followed every `resolve_interval`),
//! `proxy.rs` gives routes a seam service per pool, handles `X-Strata-Backend` (direct
//! access, trusted networks or the admin token) and retries: a request whose response carries
//! `UpstreamFailure::Connect` (nothing was sent) is sent once more to another server when it is
//! idempotent and bodiless and the pool's retry budget (20 % of requests in flight, at least 3)
//! allows. `upstream.rs` keeps what is known of each server (up from active checks, ejection from
//! passive ones, peak-EWMA latency, requests in flight), the choice per request and the pool's
//! queue (a `Notify` woken as leases end; `max_queue`, `queue_timeout` → 503). Candidates are the
//! healthy servers, or all of them below `panic_threshold`; a passive ejection that would pass
//! `max_ejection` is refused. `balance.rs` holds the algorithms as pure functions (p2c on
//! latency × (in flight + 1) ÷ weight, least-requests, round-robin, weighted), slow start (weight
//! from 10 % to full over `slow_start` since a server joined or recovered) and the peak-EWMA
//! (jumps to peaks, decays over 10 s, fades without samples so no server is starved for good).
//! `health.rs` checks every server each `health_interval`, side by side: `GET health_path` for
//! remote ones, the supervisor's readiness for the local one (never a request queued behind
//! workers). `forwarded.rs` sets `X-Forwarded-For`/`-Proto`, keeping the client's own only from
//! `trusted_networks`.

mod balance;
mod conditional;
mod config;
mod forwarded;
#[cfg(fuzzing)]
pub mod fuzz;
mod head_timer;
mod health;
mod listener;
mod members;
mod preface;
mod proxy;
mod proxy_protocol;
mod routes;
mod slow_body;
mod statics;
mod upstream;

pub use config::{BackendConfig, LbConfig, RouteConfig, ServerConfig};
pub use listener::serve;
pub use members::PoolError;
pub use proxy::{Balancer, PoolStatus};
pub use routes::{router, RouteError};
