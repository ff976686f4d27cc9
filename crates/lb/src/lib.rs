//! The load balancer tier.
//!
//! The HTTP/1.1 listener in front of the next tier: it parses requests (malformed → 400,
//! oversized head → 431, body over the limit → 413, none of which reach the next tier), tags
//! each request with [`strata_core::ConnInfo`] and drains connections on shutdown. Routes send
//! a host and path prefix to a static directory, served without Python, to a backend pool
//! (other Strata nodes, HTTP servers, or this node's next tier: chosen per request, checked
//! actively and passively, retried when unreachable), or to the next tier.

mod balance;
mod conditional;
mod config;
mod forwarded;
mod head_timer;
mod health;
mod listener;
mod proxy;
mod proxy_protocol;
mod routes;
mod slow_body;
mod statics;
mod upstream;

pub use config::{BackendConfig, LbConfig, RouteConfig, ServerConfig};
pub use listener::serve;
pub use proxy::{Balancer, PoolError, PoolStatus};
pub use routes::{router, RouteError};
