//! Invalidation by requests: `PURGE` from trusted addresses, and successful unsafe methods,
//! which invalidate their target and the URLs they point to (RFC 9111 §4.4).

use std::collections::HashMap;
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use http::header::{self, HeaderValue};
use http::{HeaderMap, Request, Response, StatusCode, Uri};
use strata_core::seam::{Purge, Purged};
use strata_core::{seam, Body, ConnInfo};

use crate::respond::{self, cache_status, is_safe};
use crate::service::Shared;

impl Shared {
    /// Applies `purge` to this store; returns how many objects were affected.
    pub(crate) fn apply_here(&self, purge: &Purge) -> usize {
        let purged = if purge.all {
            self.store.ban("*", false)
        } else {
            let urls: usize = purge
                .urls
                .iter()
                .map(|url| self.store.purge(&self.url_key(url), purge.soft))
                .sum();
            let bans: usize = purge
                .bans
                .iter()
                .map(|pattern| self.store.ban(pattern, purge.soft))
                .sum();
            self.store.purge_tags(&purge.tags, purge.soft) + urls + bans
        };
        for _ in 0..purged {
            self.metrics.purged.inc();
        }
        purged
    }

    /// The primary key of `url` (`http://host/path?query` or `host/path?query`).
    fn url_key(&self, url: &str) -> String {
        let rest = url.split_once("://").map_or(url, |(_, rest)| rest);
        let (host, path) = rest.find('/').map_or((rest, "/"), |i| rest.split_at(i));
        let (path, query) = path
            .split_once('?')
            .map_or((path, None), |(p, q)| (p, Some(q)));
        self.keyer
            .primary_for(&host.to_ascii_lowercase(), path, query)
    }

    /// Any method but GET, HEAD and PURGE: passed through; a successful unsafe one
    /// invalidates the target URI and its `Location`/`Content-Location` (RFC 9111 §4.4).
    pub(crate) async fn other_method(&self, request: Request<Body>) -> Response<Body> {
        self.metrics.passes.inc();
        let method = request.method().clone();
        let target = self.keyer.primary(request.uri(), request.headers());
        let host = host_of(request.uri(), request.headers());
        let mut response = self.forward(request).await;
        if !is_safe(&method)
            && (response.status().is_success() || response.status().is_redirection())
        {
            let mut keys = vec![target];
            for name in [header::LOCATION, header::CONTENT_LOCATION] {
                if let Some(key) = response
                    .headers()
                    .get(&name)
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| self.same_host_key(v, &host))
                {
                    keys.push(key);
                }
            }
            let purged: usize = keys.iter().map(|k| self.store.purge(k, false)).sum();
            for _ in 0..purged {
                self.metrics.purged.inc();
            }
        }
        cache_status(response.headers_mut(), "fwd=method");
        response
    }

    /// The key of a `Location`-style reference if it points at `host`.
    fn same_host_key(&self, reference: &str, host: &str) -> Option<String> {
        let uri: Uri = reference.parse().ok()?;
        match uri.authority() {
            Some(authority) if !authority.as_str().eq_ignore_ascii_case(host) => None,
            _ if !reference.starts_with('/') && uri.authority().is_none() => None,
            _ => Some(self.keyer.primary_for(host, uri.path(), uri.query())),
        }
    }

    /// `PURGE <url>`: from trusted addresses, removes every variant of the URL, or with a
    /// `Surrogate-Key`/`xkey` header every object tagged with one of its keys; with
    /// `Strata-Purge: soft` marks them stale instead (they are refreshed in the background).
    pub(crate) async fn purge_request(&self, request: Request<Body>) -> Response<Body> {
        let trusted = request
            .extensions()
            .get::<ConnInfo>()
            .is_some_and(|info| self.purge_from.iter().any(|n| n.contains(info.remote.ip())));
        if !trusted {
            return respond::own(
                StatusCode::FORBIDDEN,
                "PURGE is not allowed from this address",
                "fwd=method",
            );
        }
        let headers = request.headers();
        let soft = headers
            .get("strata-purge")
            .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"soft"));
        let tags: Vec<String> = ["surrogate-key", "xkey", "cache-tag"]
            .iter()
            .flat_map(|name| headers.get_all(*name).iter())
            .filter_map(|v| v.to_str().ok())
            .flat_map(split_tags)
            .collect();
        let host = host_of(request.uri(), headers);
        let path = request.uri().path().to_owned();
        let purge = if tags.is_empty() {
            let query = request
                .uri()
                .query()
                .map(|q| format!("?{q}"))
                .unwrap_or_default();
            Purge {
                urls: vec![format!("{host}{path}{query}")],
                soft,
                ..Purge::default()
            }
        } else {
            Purge {
                tags,
                soft,
                ..Purge::default()
            }
        };
        // Not held across the wait: a request body is not `Sync`.
        drop(request);
        let Purged {
            count: purged,
            missed,
        } = match self.invalidate.get() {
            Some(target) => target.invalidate(purge.clone()).await,
            None => Purged {
                count: self.apply_here(&purge),
                missed: Vec::new(),
            },
        };
        if purged == 0
            && missed.is_empty()
            && self.empty_purges.first_in_a_while(&host, Instant::now())
        {
            // The usual cause: the purging app names the site by another Host than the one
            // visitors use (Wagtail sends its Site's `hostname:port`).
            tracing::warn!(
                host,
                path,
                tags = purge.tags.join(" "),
                "PURGE found nothing to remove; is this the Host visitors use? \
                 (said once a minute per host)"
            );
        }
        let mut response = seam::status_response(StatusCode::OK, &format!("Purged {purged}"));
        response
            .headers_mut()
            .insert("strata-purged", HeaderValue::from(purged as u64));
        if let Ok(missed) = HeaderValue::from_str(&missed.join(", ")) {
            if !missed.is_empty() {
                response.headers_mut().insert("strata-purge-missed", missed);
            }
        }
        response
    }
}

/// When each host's last empty PURGE was logged.
#[derive(Debug, Default)]
pub struct EmptyPurges(Mutex<HashMap<String, Instant>>);

impl EmptyPurges {
    /// At most this many hosts are remembered (PURGE comes from trusted addresses only,
    /// but a client that sends many Hosts must not grow the map without end).
    const HOSTS: usize = 1024;

    /// Whether an empty PURGE for `host` at `now` should be logged: the first in a minute.
    pub fn first_in_a_while(&self, host: &str, now: Instant) -> bool {
        let mut last = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(at) = last.get(host) {
            if now.duration_since(*at) < Duration::from_secs(60) {
                return false;
            }
        }
        if last.len() >= Self::HOSTS {
            last.retain(|_, at| now.duration_since(*at) < Duration::from_secs(60));
            if last.len() >= Self::HOSTS {
                return false;
            }
        }
        last.insert(host.to_owned(), now);
        true
    }
}

fn host_of(uri: &Uri, headers: &HeaderMap) -> String {
    uri.authority()
        .map(|a| a.as_str().to_owned())
        .or_else(|| {
            headers
                .get(header::HOST)
                .and_then(|h| h.to_str().ok())
                .map(str::to_owned)
        })
        .unwrap_or_default()
        .to_ascii_lowercase()
}

pub(crate) fn split_tags(value: &str) -> Vec<String> {
    value
        .split(|c: char| c == ',' || c.is_ascii_whitespace())
        .filter(|t| !t.is_empty())
        .map(str::to_owned)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_purges_are_told_once_a_minute_per_host() {
        let log = EmptyPurges::default();
        let start = Instant::now();
        assert!(log.first_in_a_while("a", start));
        assert!(!log.first_in_a_while("a", start + Duration::from_secs(59)));
        assert!(log.first_in_a_while("b", start + Duration::from_secs(1)));
        assert!(log.first_in_a_while("a", start + Duration::from_secs(60)));
    }
}
