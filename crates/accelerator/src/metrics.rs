//! The accelerator's counters, rendered on the admin listener's `/metrics`.

use std::fmt::Write;

use strata_core::metrics::{header, render_labeled, Counter};

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
}

impl Metrics {
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
            header(out, name, help, "counter");
            let _ = writeln!(out, "{name} {value}");
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
            header(out, name, help, "gauge");
            let _ = writeln!(out, "{name} {value}");
        }
    }
}
