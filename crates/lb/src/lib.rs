//! The load balancer tier.
//!
//! Today it is the HTTP/1.1 listener in front of the next tier: it parses requests (malformed
//! → 400, oversized head → 431, body over the limit → 413, none of which reach the next tier),
//! tags each request with [`strata_core::ConnInfo`] and drains connections on shutdown.
//! TLS, HTTP/2, routing, balancing and static files build on this crate.

mod config;
mod listener;

pub use config::LbConfig;
pub use listener::serve;
