//! The load balancer tier.
//!
//! The HTTP/1.1 listener in front of the next tier: it parses requests (malformed → 400,
//! oversized head → 431, body over the limit → 413, none of which reach the next tier), tags
//! each request with [`strata_core::ConnInfo`] and drains connections on shutdown. Routes send
//! a host and path prefix to a static directory, served without Python, or to the next tier.

mod conditional;
mod config;
mod listener;
mod routes;
mod statics;

pub use config::{LbConfig, RouteConfig};
pub use listener::serve;
pub use routes::{router, RouteError};
