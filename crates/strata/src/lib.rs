//! Wiring: the command line, configuration, and the tiers this node runs, joined in one place.
//!
//! # Layout
//! - [`cli`]: `strata run`, `strata check`, `strata reload`.
//! - [`config`]: defaults < `strata.toml` < `STRATA_*` environment < flags, validated once.
//! - [`node`]: starts the selected tiers, listens, handles signals and shutdown.
//! - `stack`: the tiers of this node and which calls which.
//! - `admin`: the admin listener (`/status`, `/metrics`, `/healthz`, `/reload`, cache purges).
//! - `cluster`: purges that reach every node's accelerator, and catch-up for nodes that
//!   missed some.
//! - `reload`: reload in the node, and the client side of `strata reload`.
//! - `handoff`: binary upgrade, the listening sockets passed to a new master.

mod admin;
pub mod cli;
mod cluster;
pub mod config;
mod handoff;
pub mod node;
mod reload;
mod stack;
