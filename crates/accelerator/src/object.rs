//! A stored response: its head, its (possibly still filling) body, and the times that decide
//! whether it is fresh, servable stale, or only good for revalidation.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use http::header::{self, HeaderName};
use http::{HeaderMap, StatusCode};
pub use strata_core::seam::strip_hop_by_hop;

use crate::fill::Fill;
use crate::freshness::Timing;

/// Header fields this cache consumes: targeted cache control (RFC 9213, and the older
/// `Surrogate-Control`) and surrogate keys.
pub const CONSUMED: &[&str] = &[
    "cdn-cache-control",
    "surrogate-control",
    "surrogate-key",
    "cache-tag",
];

/// Removes the fields this cache consumes, before a response goes downstream.
pub fn strip_consumed(headers: &mut HeaderMap) {
    for name in CONSUMED {
        headers.remove(*name);
    }
}

/// How long a stored response may be used, and how.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Windows {
    /// Freshness lifetime.
    pub lifetime: Duration,
    /// Past freshness: served stale while one background refresh runs.
    pub grace: Duration,
    /// Past freshness: served stale when the origin fails.
    pub stale_if_error: Duration,
    /// Past freshness: kept as a base for conditional revalidation.
    pub keep: Duration,
}

impl Windows {
    /// How long after becoming stale the object is still of any use.
    pub fn after_stale(&self) -> Duration {
        self.grace.max(self.stale_if_error).max(self.keep)
    }
}

/// One stored response.
#[derive(Debug)]
pub struct Object {
    pub status: StatusCode,
    /// Stored headers: hop-by-hop and consumed fields removed.
    pub headers: HeaderMap,
    pub body: Arc<Fill>,
    pub timing: Timing,
    pub windows: Windows,
    /// The request header names of the response's `Vary`, and the values the request that
    /// produced it had.
    pub vary_names: Vec<HeaderName>,
    pub vary_values: Vec<Option<String>>,
    /// Surrogate keys (`Surrogate-Key`, `Cache-Tag`).
    pub tags: Vec<String>,
    /// Set by a soft purge: until when (Unix milliseconds) the object may still be served
    /// stale while it is refreshed; 0 when not purged.
    soft_purged_until: AtomicU64,
}

/// Where an object stands at a given moment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Freshness {
    Fresh,
    /// Stale, within grace: serve it and refresh in the background.
    Grace,
    /// Stale, past grace: revalidate (or serve if the origin fails within stale-if-error).
    Stale,
}

impl Object {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        status: StatusCode,
        headers: HeaderMap,
        body: Arc<Fill>,
        timing: Timing,
        windows: Windows,
        vary_names: Vec<HeaderName>,
        vary_values: Vec<Option<String>>,
        tags: Vec<String>,
    ) -> Self {
        Self {
            status,
            headers,
            body,
            timing,
            windows,
            vary_names,
            vary_values,
            tags,
            soft_purged_until: AtomicU64::new(0),
        }
    }

    /// The stored headers with a 304's merged over them (RFC 9111 §3.2, §4.3.4): every field
    /// the 304 carries replaces the stored one, except those describing the stored body and
    /// its identity, which a 304 cannot change.
    pub fn merged_headers(&self, update: &HeaderMap) -> HeaderMap {
        const KEEP: &[&str] = &[
            "content-length",
            "content-encoding",
            "content-range",
            "content-md5",
            "etag",
        ];
        let mut headers = self.headers.clone();
        let mut replaced: Vec<&HeaderName> = Vec::new();
        for (name, value) in update {
            if KEEP.contains(&name.as_str()) || CONSUMED.contains(&name.as_str()) {
                continue;
            }
            if !replaced.contains(&name) {
                headers.remove(name);
                replaced.push(name);
            }
            headers.append(name.clone(), value.clone());
        }
        strip_hop_by_hop(&mut headers);
        headers
    }

    /// The object after a 304: `headers` from [`merged_headers`](Self::merged_headers), new
    /// timing and windows, the same body.
    pub fn refreshed(&self, headers: HeaderMap, timing: Timing, windows: Windows) -> Self {
        Self::new(
            self.status,
            headers,
            self.body.clone(),
            timing,
            windows,
            self.vary_names.clone(),
            self.vary_values.clone(),
            self.tags.clone(),
        )
    }

    pub fn age(&self, now: SystemTime) -> Duration {
        self.timing.current_age(now)
    }

    pub fn freshness(&self, now: SystemTime) -> Freshness {
        let purged_until = self.soft_purged_until.load(Ordering::Relaxed);
        if purged_until != 0 {
            return if unix_millis(now) < purged_until {
                Freshness::Grace
            } else {
                Freshness::Stale
            };
        }
        let age = self.age(now);
        let lifetime = self.windows.lifetime;
        if age < lifetime {
            Freshness::Fresh
        } else if age < lifetime + self.windows.grace {
            Freshness::Grace
        } else {
            Freshness::Stale
        }
    }

    /// Whether the object may stand in for a failed origin at `now`.
    pub fn usable_on_error(&self, now: SystemTime) -> bool {
        self.age(now) < self.windows.lifetime + self.windows.stale_if_error
    }

    /// Seconds of freshness left (negative once stale), for `Cache-Status: ttl`.
    pub fn ttl(&self, now: SystemTime) -> i64 {
        let lifetime = self.windows.lifetime.as_secs() as i64;
        lifetime - self.age(now).as_secs() as i64
    }

    /// How long the store should hold the object, from now.
    pub fn hold(&self, now: SystemTime) -> Duration {
        let total = self.windows.lifetime + self.windows.after_stale();
        total.saturating_sub(self.age(now))
    }

    /// Whether it carries a validator a conditional request can use.
    pub fn has_validator(&self) -> bool {
        self.headers.contains_key(header::ETAG) || self.headers.contains_key(header::LAST_MODIFIED)
    }

    /// Marks the object stale: for the next `grace` (or its own grace, if longer) it is still
    /// served while one background refresh replaces it, so no visitor waits for the origin.
    pub fn soft_purge(&self, grace: Duration) {
        let until = unix_millis(SystemTime::now() + grace.max(self.windows.grace));
        // A second soft purge does not extend the first one's window.
        let _ = self.soft_purged_until.compare_exchange(
            0,
            until.max(1),
            Ordering::Relaxed,
            Ordering::Relaxed,
        );
    }

    /// Bytes the object occupies, for the store's budget.
    pub fn weight(&self) -> u64 {
        let headers: usize = self
            .headers
            .iter()
            .map(|(k, v)| k.as_str().len() + v.len() + 32)
            .sum();
        let body = self.body.len().max(self.body_hint());
        256 + headers as u64 + body
    }

    fn body_hint(&self) -> u64 {
        self.headers
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    }
}

fn unix_millis(time: SystemTime) -> u64 {
    time.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}
