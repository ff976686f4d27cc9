//! Strata's web accelerator: an RFC 9111 shared cache as a tower service in front of the next
//! tier (the local app server, or any HTTP origin through the seam's client).
//!
//! # Layout
//! - [`config`]: the `[accelerator]` section.
//! - `directives`, `freshness`, `policy`: Cache-Control parsing, age and freshness, and
//!   whether a response may be stored (RFC 9111, 5861, 9213).
//! - `key`: primary keys and `Vary` selection, with Django's cookies in mind.
//! - `fill`, `object`, `store`: stored responses, bodies that stream while they fill, and the
//!   moka store with its surrogate-key index.
//! - `flight`: coalescing of concurrent misses.
//! - `service`, `fetch`, `invalidate`, `respond`: the request flow, origin fetches and
//!   storing, invalidation by requests, and the answers built from stored responses.
//!
//! # How it works
//!
//! Varnish's job: an RFC 9111 shared cache as a seam service wrapping the next tier.
//!
//! - `directives.rs`, `freshness.rs`, `policy.rs`: Cache-Control parsing (strict where a wrong
//!   guess would serve stale or private content), age and freshness lifetime (§4.2), and the
//!   storability decision with its reason (which `Cache-Status` reports). A targeted field
//!   (`CDN-Cache-Control`, then `Surrogate-Control`) replaces `Cache-Control` for this cache.
//! - `key.rs`: the primary key (lower-cased host, path, query without ignored parameters,
//!   sorted) and `Vary` selection; `Cookie` is compared only on `key_cookies`, and a
//!   `pass_cookies` cookie makes a request personal.
//! - `object.rs`, `fill.rs`, `store.rs`: a stored response is its head, timing, windows
//!   (lifetime, grace, stale-if-error, keep) and a `Fill`: the body as it arrives from the origin,
//!   readable by any number of clients while it fills, one `Bytes` once whole. The store is a
//!   moka cache of primary key → variants (copy-on-write), weighed in bytes, each entry expiring
//!   when its last variant is of no more use; plus a surrogate-key index kept by moka's eviction
//!   listener, and the hit-for-miss memo.
//! - `flight.rs`: coalescing. The first miss for a key leads a fetch; later ones wait for its
//!   outcome: an object (served, even at TTL 0, if its `Vary` matches) or "uncacheable" (each
//!   waiter goes to the origin itself, and the key is remembered as hit-for-miss).
//! - `service.rs` (the flow below), `fetch.rs` (origin fetches, revalidation, storing, the pump
//!   task), `invalidate.rs` (`PURGE`, unsafe methods), `respond.rs` (the answers: `Age`,
//!   `Cache-Status`, conditional requests and single ranges from the store).
//!
//! Flow: `PURGE` (trusted networks) purges a URL or surrogate keys; other unsafe methods pass
//! and, when successful, invalidate the target URI and `Location`/`Content-Location` (§4.4);
//! requests with a pass cookie or `Authorization` skip the lookup; a fresh hit is answered
//! straight from the request; a response within grace is served while one background fetch
//! refreshes it; otherwise the request joins or leads a flight. The leader's fetch is
//! conditional when the stale object has a validator (a 304 is merged into it, keeping the
//! fields that describe the stored body), serves the stale object if the origin answers 5xx
//! within stale-if-error, and otherwise stores what policy allows: the object is in the store
//! from its head on, and a pump task fills its body whether or not any client still reads it.

pub mod config;
mod directives;
mod fetch;
mod fill;
mod flight;
mod freshness;
#[cfg(fuzzing)]
pub mod fuzz;
mod invalidate;
mod key;
pub mod metrics;
mod object;
mod policy;
mod respond;
mod service;
mod sfv;
mod store;
#[cfg(test)]
mod testutil;

use std::sync::Arc;

use http::Request;
use strata_core::seam::{Invalidate, Purge, Purged, Purging};
use strata_core::{Body, HttpService};

pub use config::AcceleratorConfig;

use crate::service::Shared;

/// The accelerator tier.
#[derive(Clone)]
pub struct Accelerator {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for Accelerator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Accelerator")
            .field("store", &self.shared.store)
            .finish()
    }
}

impl Accelerator {
    /// A cache in front of `next`; `config` must have passed
    /// [`AcceleratorConfig::validate`].
    pub fn new(config: AcceleratorConfig, next: HttpService) -> Self {
        let shared = Shared {
            next,
            keyer: key::Keyer::new(&config),
            store: Arc::new(store::Store::new(
                config.capacity_bytes,
                config.hit_for_miss,
                config.soft_purge_grace,
            )),
            flights: flight::Flights::default(),
            metrics: metrics::Metrics::default(),
            purge_from: config.purge_networks(),
            empty_purges: invalidate::EmptyPurges::default(),
            invalidate: std::sync::OnceLock::new(),
            config,
        };
        Self {
            shared: Arc::new(shared),
        }
    }

    /// The tier as a seam service.
    pub fn service(&self) -> HttpService {
        let shared = self.shared.clone();
        HttpService::from_fn(move |request: Request<Body>| {
            let shared = shared.clone();
            async move { Ok(shared.handle(request).await) }
        })
    }

    /// Hit ratio per route (first path segment), busiest first, for `/status`.
    pub fn routes(&self) -> Vec<metrics::RouteStatus> {
        self.shared.metrics.routes()
    }

    /// Appends the accelerator's metrics in Prometheus text format.
    pub fn render_metrics(&self, out: &mut String) {
        self.shared.metrics.render(&self.shared.store, out);
    }
}

impl Accelerator {
    /// Applies `purge` to this store; returns how many objects were affected.
    pub fn apply(&self, purge: &Purge) -> usize {
        self.shared.apply_here(purge)
    }

    /// Sends this node's `PURGE` requests to `target` (the cluster, which applies them here
    /// and on every other node) instead of this store alone. Set once.
    pub fn set_invalidate(&self, target: Arc<dyn Invalidate>) {
        let _ = self.shared.invalidate.set(target);
    }
}

/// This store alone: the cluster wraps it to reach the other nodes.
impl Invalidate for Accelerator {
    fn invalidate(&self, purge: Purge) -> Purging {
        let count = self.apply(&purge);
        Box::pin(std::future::ready(Purged {
            count,
            missed: Vec::new(),
        }))
    }
}
