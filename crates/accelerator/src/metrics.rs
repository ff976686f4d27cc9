//! The accelerator's counters, rendered on the admin listener's `/metrics`.

use std::collections::HashMap;

use std::sync::Mutex;

use serde::Serialize;
use strata_core::metrics::{render_labeled, render_value, Counter};

use crate::store::Store;

/// What the accelerator counts.
#[derive(Debug, Default)]
pub struct Metrics {
    /// Served from the store, fresh.
    pub hits: Counter,
    /// Fetched because nothing usable was stored.
    pub misses: Counter,
    /// Sent to the origin without a lookup (personal requests, unsafe methods).
    pub passes: Counter,
    /// Waited for another request's fetch instead of going to the origin.
    pub coalesced: Counter,
    /// Served stale while a background refresh ran.
    pub stale_grace: Counter,
    /// Served stale because the origin failed.
    pub stale_error: Counter,
    /// Stale objects revalidated by a 304.
    pub revalidated: Counter,
    /// Fetched answers that could not be stored.
    pub uncacheable: Counter,
    /// Objects removed or marked stale by purges, bans and unsafe methods.
    pub purged: Counter,
    /// Lookups and hits per route (first path segment).
    routes: Mutex<HashMap<String, RouteCount>>,
}

/// At most this many routes are tracked; later ones count under `(other)`.
const MAX_ROUTES: usize = 200;

#[derive(Debug, Default, Clone, Copy)]
struct RouteCount {
    lookups: u64,
    hits: u64,
}

/// One route's line in `/status`.
#[derive(Debug, Serialize)]
pub struct RouteStatus {
    pub route: String,
    pub lookups: u64,
    pub hits: u64,
    pub hit_ratio: f64,
}

/// The route of a path: its first segment (`/blog/2024/x` → `/blog/`).
fn route_of(path: &str) -> &str {
    match path[1.min(path.len())..].find('/') {
        Some(i) => &path[..i + 2],
        None => path,
    }
}

impl Metrics {
    /// Counts one lookup of `path`, and whether it was answered from the store.
    pub fn route(&self, path: &str, hit: bool) {
        let route = route_of(path);
        let mut routes = self.routes.lock().unwrap_or_else(|e| e.into_inner());
        let key = if routes.contains_key(route) || routes.len() < MAX_ROUTES {
            route
        } else {
            "(other)"
        };
        if !routes.contains_key(key) {
            routes.insert(key.to_owned(), RouteCount::default());
        }
        if let Some(count) = routes.get_mut(key) {
            count.lookups += 1;
            count.hits += u64::from(hit);
        }
    }

    /// Hit ratio per route, busiest first.
    pub fn routes(&self) -> Vec<RouteStatus> {
        let routes = self.routes.lock().unwrap_or_else(|e| e.into_inner());
        let mut out: Vec<RouteStatus> = routes
            .iter()
            .map(|(route, c)| RouteStatus {
                route: route.clone(),
                lookups: c.lookups,
                hits: c.hits,
                hit_ratio: c.hits as f64 / c.lookups.max(1) as f64,
            })
            .collect();
        out.sort_by(|a, b| {
            b.lookups
                .cmp(&a.lookups)
                .then_with(|| a.route.cmp(&b.route))
        });
        out
    }

    pub fn render(&self, store: &Store, out: &mut String) {
        render_labeled(
            out,
            "strata_accelerator_requests_total",
            "Requests by what the cache did with them.",
            "counter",
            "result",
            [
                ("hit", self.hits.get()),
                ("miss", self.misses.get()),
                ("pass", self.passes.get()),
                ("coalesced", self.coalesced.get()),
                ("stale_grace", self.stale_grace.get()),
                ("stale_error", self.stale_error.get()),
                ("revalidated", self.revalidated.get()),
            ],
        );
        let simple: [(&str, &str, u64); 2] = [
            (
                "strata_accelerator_uncacheable_total",
                "Fetched responses that could not be stored (then remembered as hit-for-miss).",
                self.uncacheable.get(),
            ),
            (
                "strata_accelerator_purged_objects_total",
                "Objects removed or marked stale by purges, bans and unsafe methods.",
                self.purged.get(),
            ),
        ];
        for (name, help, value) in simple {
            render_value(out, name, help, "counter", value);
        }
        render_labeled(
            out,
            "strata_accelerator_evictions_total",
            "Objects the store dropped, by cause.",
            "counter",
            "cause",
            [
                ("size", store.evictions.size.get()),
                ("expired", store.evictions.expired.get()),
            ],
        );
        let (bytes, urls) = store.size();
        for (name, help, value) in [
            (
                "strata_accelerator_stored_bytes",
                "Bytes held by stored responses.",
                bytes,
            ),
            (
                "strata_accelerator_stored_urls",
                "URLs with at least one stored response.",
                urls,
            ),
        ] {
            render_value(out, name, help, "gauge", value);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_are_first_segments() {
        assert_eq!(route_of("/blog/2024/x"), "/blog/");
        assert_eq!(route_of("/about"), "/about");
        assert_eq!(route_of("/"), "/");
        let metrics = Metrics::default();
        metrics.route("/blog/a", true);
        metrics.route("/blog/b", false);
        let routes = metrics.routes();
        assert_eq!(routes[0].route, "/blog/");
        assert_eq!((routes[0].lookups, routes[0].hits), (2, 1));
    }
}
