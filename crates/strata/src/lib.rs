//! Wiring: the command line, configuration, and the tiers this node runs, joined in one place.
//!
//! # Layout
//! - [`cli`]: `strata run`, `strata check`, `strata reload`.
//! - [`config`]: defaults < `strata.toml` < `STRATA_*` environment < flags, validated once.
//! - [`node`]: starts the selected tiers, listens, handles signals and shutdown.
//! - `admin`: the admin listener (`/status`, `/metrics`, `/healthz`, `/reload`).
//! - `reload`: the client side of `strata reload`.

mod admin;
pub mod cli;
pub mod config;
pub mod node;
mod reload;
