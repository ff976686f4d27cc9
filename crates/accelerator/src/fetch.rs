//! Fetching from the origin: the fill request (conditional when a stale copy has a
//! validator), what a 304 or a failure means for the stale copy, storing what policy allows,
//! and the task that fills a stored body.

use std::sync::Arc;
use std::time::SystemTime;

use http::header::{self, HeaderValue};
use http::{HeaderMap, Method, Response, StatusCode};
use strata_core::{seam, Body};

use crate::fill::{self, Fill};
use crate::flight::{Lead, Outcome};
use crate::freshness::Timing;
use crate::invalidate::split_tags;
use crate::object::{strip_consumed, strip_hop_by_hop, Object};
use crate::policy;
use crate::respond::{self, cache_status, with_detail};
use crate::service::{Head, Shared};

impl Shared {
    /// Fetches `head` from the origin (conditionally when `candidate` has validators),
    /// stores what may be stored, releases the waiters of `lead`, and answers.
    pub(crate) async fn fetch(
        &self,
        head: &Head,
        key: &str,
        candidate: Option<Arc<Object>>,
        lead: Option<Lead>,
        forward: &str,
    ) -> Response<Body> {
        let mut request = head.fill_request(&self.keyer, self.config.strip_ignored_cookies);
        if let Some(stale) = candidate.as_ref().filter(|c| c.has_validator()) {
            for (from, to) in [
                (header::ETAG, header::IF_NONE_MATCH),
                (header::LAST_MODIFIED, header::IF_MODIFIED_SINCE),
            ] {
                if let Some(value) = stale.headers.get(&from) {
                    request.headers_mut().insert(to, value.clone());
                }
            }
        }
        let request_time = SystemTime::now();
        let response = seam::answer(seam::call(&self.next, request)).await;
        let response_time = SystemTime::now();
        let (mut parts, body) = response.into_parts();
        strip_hop_by_hop(&mut parts.headers);
        let timing = Timing::new(&parts.headers, request_time, response_time);

        if let Some(stale) = &candidate {
            if parts.status == StatusCode::NOT_MODIFIED && stale.has_validator() {
                return self.revalidated(head, key, stale, &parts.headers, timing, lead);
            }
            if parts.status.is_server_error() && stale.usable_on_error(response_time) {
                if let Some(response) = respond::serve(
                    stale,
                    &head.method,
                    &head.headers,
                    response_time,
                    &format!(
                        "fwd=stale; fwd-status={}; detail=stale-if-error",
                        parts.status.as_u16()
                    ),
                ) {
                    self.metrics.stale_error.inc();
                    if let Some(lead) = lead {
                        lead.publish(Outcome::Object(stale.clone()));
                    }
                    return response;
                }
            }
        }

        let length = content_length(&parts.headers);
        let plan = policy::plan(
            &self.config,
            &head.headers,
            parts.status,
            &parts.headers,
            &timing,
        )
        .and_then(|plan| match length {
            Some(n) if n > self.config.max_object_bytes => Err("too-large"),
            _ => Ok(plan),
        });
        let plan = match plan {
            Ok(plan) => plan,
            Err(reason) => {
                if let Some(stale) = &candidate {
                    if !parts.status.is_server_error() {
                        self.store.remove_object(key, stale);
                    }
                }
                self.metrics.uncacheable.inc();
                self.store.mark_hit_for_miss(key);
                if let Some(lead) = lead {
                    lead.publish(Outcome::Uncacheable);
                }
                strip_consumed(&mut parts.headers);
                cache_status(&mut parts.headers, &with_detail(forward, reason));
                let body = if head.method == Method::HEAD {
                    seam::empty()
                } else {
                    body
                };
                return Response::from_parts(parts, body);
            }
        };

        let tags = surrogate_keys(&parts.headers);
        let set_cookies: Vec<HeaderValue> = parts
            .headers
            .get_all(header::SET_COOKIE)
            .iter()
            .cloned()
            .collect();
        let mut stored = parts.headers.clone();
        strip_consumed(&mut stored);
        stored.remove(header::SET_COOKIE);
        let vary_values = self.keyer.vary_values(&plan.vary, &head.headers);
        let fill = Arc::new(Fill::new(length));
        let object = Arc::new(Object::new(
            parts.status,
            stored,
            fill.clone(),
            timing,
            plan.windows,
            plan.vary,
            vary_values,
            tags,
        ));
        self.store.insert(key, object.clone());
        self.spawn_pump(key, body, fill, &object);
        if let Some(lead) = lead {
            lead.publish(Outcome::Object(object.clone()));
        }
        let now = SystemTime::now();
        let mut response = respond::serve(
            &object,
            &head.method,
            &head.headers,
            now,
            &format!("{forward}; stored"),
        )
        .unwrap_or_else(|| {
            respond::own(
                StatusCode::BAD_GATEWAY,
                "origin response broke off",
                forward,
            )
        });
        // The requester gets its own cookies; the stored copy never carries them.
        for cookie in set_cookies {
            response.headers_mut().append(header::SET_COOKIE, cookie);
        }
        response
    }

    fn spawn_pump(&self, key: &str, body: Body, fill: Arc<Fill>, object: &Arc<Object>) {
        let limit = self.config.max_object_bytes;
        let key = key.to_owned();
        let object = object.clone();
        let store = self.store.clone();
        tokio::spawn(async move {
            let whole = fill::pump(body, fill, limit).await;
            if whole {
                store.settle(&key, &object);
            } else {
                store.remove_object(&key, &object);
            }
        });
    }

    /// A 304 for a stale object: merge the new headers, store, serve (RFC 9111 §4.3.4).
    fn revalidated(
        &self,
        head: &Head,
        key: &str,
        stale: &Arc<Object>,
        update: &HeaderMap,
        timing: Timing,
        lead: Option<Lead>,
    ) -> Response<Body> {
        self.metrics.revalidated.inc();
        let merged = stale.merged_headers(update);
        let windows = policy::plan(&self.config, &head.headers, stale.status, &merged, &timing)
            .map(|plan| plan.windows)
            .unwrap_or_default();
        let object = Arc::new(stale.refreshed(merged, timing, windows));
        if windows.lifetime.is_zero() && windows.after_stale().is_zero() {
            self.store.remove_object(key, stale);
        } else {
            self.store.insert(key, object.clone());
        }
        if let Some(lead) = lead {
            lead.publish(Outcome::Object(object.clone()));
        }
        let now = SystemTime::now();
        respond::serve(
            &object,
            &head.method,
            &head.headers,
            now,
            "fwd=stale; fwd-status=304",
        )
        .unwrap_or_else(|| {
            respond::own(
                StatusCode::BAD_GATEWAY,
                "stored body unavailable",
                "fwd=stale",
            )
        })
    }
}

fn content_length(headers: &HeaderMap) -> Option<u64> {
    headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse().ok())
}

/// Surrogate keys of a response: `Surrogate-Key` and `Cache-Tag`, space or comma separated.
fn surrogate_keys(headers: &HeaderMap) -> Vec<String> {
    let mut tags: Vec<String> = ["surrogate-key", "cache-tag"]
        .iter()
        .flat_map(|name| headers.get_all(*name).iter())
        .filter_map(|v| v.to_str().ok())
        .flat_map(split_tags)
        .collect();
    tags.sort_unstable();
    tags.dedup();
    tags
}
