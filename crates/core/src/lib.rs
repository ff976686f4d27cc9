//! What every Strata tier shares.
//!
//! # Layout
//! - [`seam`]: the tier service seam (`Request<Body>` → `Response<Body>`), bodies, connection info.
//! - [`channel_body`]: a body fed through a channel by the task producing it.
//! - [`client`]: the seam's client side, for a next tier on another host or any HTTP origin.
//! - [`shutdown`]: shutdown passed as a value to every `run()`.
//! - [`metrics`]: lock-free counters and histograms rendered in Prometheus text format.
//! - [`listen`]: accept loops for tiers with protocols of their own (TCP and Unix).
//! - [`tls`]: TLS towards clients (rustls), certificates reloaded when their files change.
//! - [`duration`]: human durations (`"30s"`, `"250ms"`) for configuration files.
//!
//! This crate never depends on a tier; tiers depend on it.

pub mod channel_body;
pub mod client;
pub mod duration;
pub mod listen;
pub mod logging;
pub mod metrics;
pub mod resolve;
pub mod seam;
pub mod shutdown;
pub mod tls;

pub use seam::{
    Body, BodyStalled, BodyTooLarge, BoxError, ConnInfo, HttpService, Readiness, Ready,
    UpstreamFailure,
};
pub use shutdown::Shutdown;
