//! The request flow: classify, look up, serve fresh or stale, coalesce misses, fetch, store,
//! revalidate, invalidate.

use std::sync::Arc;
use std::time::SystemTime;

use http::header::{self, HeaderName, HeaderValue};
use http::{HeaderMap, Method, Request, Response, StatusCode, Uri, Version};
use strata_core::{seam, Body, ConnInfo, HttpService};

use crate::config::{AcceleratorConfig, Network};
use crate::fill::{self, Fill};
use crate::flight::{self, Flights, Join, Lead, Outcome};
use crate::freshness::Timing;
use crate::key::Keyer;
use crate::metrics::Metrics;
use crate::object::{strip_consumed, strip_hop_by_hop, Freshness, Object};
use crate::policy;
use crate::respond::{self, cache_status, is_safe};
use crate::store::Store;

/// Request headers that carry the client's own preconditions: a lookup answers them from the
/// stored response, so they are not sent to the origin on a fill.
const CLIENT_CONDITIONALS: &[HeaderName] = &[
    header::IF_NONE_MATCH,
    header::IF_MODIFIED_SINCE,
    header::IF_MATCH,
    header::IF_UNMODIFIED_SINCE,
    header::IF_RANGE,
];

/// Everything a request's handling shares.
pub struct Shared {
    pub next: HttpService,
    pub config: AcceleratorConfig,
    pub keyer: Keyer,
    pub store: Arc<Store>,
    pub flights: Flights,
    pub metrics: Metrics,
    pub purge_from: Vec<Network>,
}

/// A request head kept to build origin requests, including background refreshes.
#[derive(Debug, Clone)]
struct Head {
    method: Method,
    uri: Uri,
    version: Version,
    headers: HeaderMap,
    info: Option<ConnInfo>,
}

impl Head {
    fn of(request: &Request<Body>) -> Self {
        Self {
            method: request.method().clone(),
            uri: request.uri().clone(),
            version: request.version(),
            headers: request.headers().clone(),
            info: request.extensions().get::<ConnInfo>().copied(),
        }
    }

    /// A body-less GET for this head, as sent to fill the cache.
    fn fill_request(&self, keyer: &Keyer, strip_cookies: bool) -> Request<Body> {
        let mut request = Request::new(seam::empty());
        *request.method_mut() = Method::GET;
        *request.uri_mut() = self.uri.clone();
        *request.version_mut() = self.version;
        let mut headers = self.headers.clone();
        for name in CLIENT_CONDITIONALS {
            headers.remove(name);
        }
        headers.remove(header::CONTENT_LENGTH);
        headers.remove(header::TRANSFER_ENCODING);
        if strip_cookies {
            match keyer.stripped_cookies(&self.headers) {
                Some(kept) => headers.insert(header::COOKIE, kept),
                None => headers.remove(header::COOKIE),
            };
        }
        *request.headers_mut() = headers;
        if let Some(info) = self.info {
            request.extensions_mut().insert(info);
        }
        request
    }
}

impl Shared {
    pub async fn handle(self: Arc<Self>, request: Request<Body>) -> Response<Body> {
        let method = request.method().clone();
        if method.as_str() == "PURGE" {
            return self.purge_request(&request);
        }
        if method != Method::GET && method != Method::HEAD {
            return self.other_method(request).await;
        }
        if let Some(cookie) = self.keyer.pass_cookie(request.headers()) {
            return self
                .pass(request, &format!("fwd=bypass; detail=\"cookie {cookie}\""))
                .await;
        }
        if request.headers().contains_key(header::RANGE) {
            return self.range(request).await;
        }
        if !http_body::Body::is_end_stream(request.body()) {
            // A GET with a body is outside what a cache key describes: pass it untouched.
            return self.pass(request, "fwd=bypass; detail=request-body").await;
        }
        let uri = request.uri().clone();
        let response = self.get(request).await;
        let hit = response
            .headers()
            .get("cache-status")
            .is_some_and(|v| is_our_hit(v.as_bytes()));
        self.metrics.route(uri.path(), hit);
        response
    }

    /// GET and HEAD, once personal requests and ranges are set aside. A fresh hit is
    /// answered straight from the request; anything else keeps a copy of its head for the
    /// origin request (and a possible background refresh).
    async fn get(self: &Arc<Self>, request: Request<Body>) -> Response<Body> {
        let key = self.keyer.primary(request.uri(), request.headers());
        if request.headers().contains_key(header::AUTHORIZATION) {
            // Personal by default: never answered from the store, stored only when the
            // response explicitly allows it (RFC 9111 §3.5).
            self.metrics.passes.inc();
            let head = Head::of(&request);
            return self.fetch(&head, &key, None, None, "fwd=request").await;
        }
        let now = SystemTime::now();
        if let Some(object) = self.store.lookup(&key, &self.keyer, request.headers()) {
            if object.freshness(now) == Freshness::Fresh {
                let (method, headers) = (request.method(), request.headers());
                if let Some(response) = respond::serve(&object, method, headers, now, "hit") {
                    self.metrics.hits.inc();
                    return response;
                }
            }
        }
        let head = Head::of(&request);
        drop(request);
        self.lookup(head, key).await
    }

    async fn lookup(self: &Arc<Self>, head: Head, key: String) -> Response<Body> {
        let only_if_cached =
            crate::directives::Directives::parse(&head.headers, &header::CACHE_CONTROL)
                .only_if_cached;
        let mut collapsed = false;
        for _ in 0..3 {
            let now = SystemTime::now();
            let stored = self.store.lookup(&key, &self.keyer, &head.headers);
            let candidate = match stored {
                Some(object) => match object.freshness(now) {
                    Freshness::Fresh => {
                        let entry = if collapsed { "hit; collapsed" } else { "hit" };
                        if let Some(response) =
                            respond::serve(&object, &head.method, &head.headers, now, entry)
                        {
                            self.metrics.hits.inc();
                            return response;
                        }
                        None
                    }
                    Freshness::Grace => {
                        self.refresh_in_background(&head, &key, &object);
                        if let Some(response) = respond::serve(
                            &object,
                            &head.method,
                            &head.headers,
                            now,
                            "hit; detail=stale-while-revalidate",
                        ) {
                            self.metrics.stale_grace.inc();
                            return response;
                        }
                        None
                    }
                    Freshness::Stale => Some(object),
                },
                None => None,
            };
            if only_if_cached {
                return respond::own(
                    StatusCode::GATEWAY_TIMEOUT,
                    "not in cache (only-if-cached)",
                    "fwd=miss; detail=only-if-cached",
                );
            }
            let forward = if candidate.is_some() {
                "fwd=stale"
            } else {
                "fwd=uri-miss"
            };
            if self.store.is_hit_for_miss(&key) {
                self.metrics.misses.inc();
                return self
                    .fetch(
                        &head,
                        &key,
                        candidate,
                        None,
                        "fwd=miss; detail=hit-for-miss",
                    )
                    .await;
            }
            match self.flights.join(&key) {
                Join::Lead(lead) => {
                    self.metrics.misses.inc();
                    return self
                        .fetch(&head, &key, candidate, Some(lead), forward)
                        .await;
                }
                Join::Wait(wait) => {
                    self.metrics.coalesced.inc();
                    collapsed = true;
                    match flight::outcome(wait).await {
                        Outcome::Object(object) => {
                            let matches = self.keyer.vary_values(&object.vary_names, &head.headers)
                                == object.vary_values;
                            if matches {
                                let now = SystemTime::now();
                                if let Some(response) = respond::serve(
                                    &object,
                                    &head.method,
                                    &head.headers,
                                    now,
                                    "hit; collapsed",
                                ) {
                                    return response;
                                }
                            }
                            // Another variant, or a body that broke: look again.
                        }
                        Outcome::Uncacheable => {
                            return self
                                .fetch(&head, &key, None, None, "fwd=miss; collapsed")
                                .await;
                        }
                    }
                }
            }
        }
        self.fetch(&head, &key, None, None, "fwd=vary-miss").await
    }

    /// A range request: answered from a fresh, whole stored response, else passed to the
    /// origin as it is (partial answers are not stored).
    async fn range(&self, request: Request<Body>) -> Response<Body> {
        let key = self.keyer.primary(request.uri(), request.headers());
        let now = SystemTime::now();
        if let Some(object) = self.store.lookup(&key, &self.keyer, request.headers()) {
            if object.freshness(now) == Freshness::Fresh {
                if let Some(response) =
                    respond::serve(&object, request.method(), request.headers(), now, "hit")
                {
                    self.metrics.hits.inc();
                    return response;
                }
            }
        }
        self.pass(request, "fwd=bypass; detail=range").await
    }

    /// Refreshes `stale` in a task of its own unless a fetch for `key` is already running.
    fn refresh_in_background(self: &Arc<Self>, head: &Head, key: &str, stale: &Arc<Object>) {
        let Join::Lead(lead) = self.flights.join(key) else {
            return;
        };
        let (this, head, key, stale) = (self.clone(), head.clone(), key.to_owned(), stale.clone());
        tokio::spawn(async move {
            // The refreshed body is filled by its own pump task; this answer has no reader.
            drop(
                this.fetch(&head, &key, Some(stale), Some(lead), "fwd=stale")
                    .await,
            );
        });
    }

    /// Fetches `head` from the origin (conditionally when `candidate` has validators),
    /// stores what may be stored, releases the waiters of `lead`, and answers.
    async fn fetch(
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
                cache_status(&mut parts.headers, &format!("{forward}; detail={reason}"));
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

    /// Any method but GET, HEAD and PURGE: passed through; a successful unsafe one
    /// invalidates the target URI and its `Location`/`Content-Location` (RFC 9111 §4.4).
    async fn other_method(&self, request: Request<Body>) -> Response<Body> {
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

    async fn pass(&self, request: Request<Body>, entry: &str) -> Response<Body> {
        self.metrics.passes.inc();
        let mut response = self.forward(request).await;
        cache_status(response.headers_mut(), entry);
        response
    }

    async fn forward(&self, request: Request<Body>) -> Response<Body> {
        let mut response = seam::answer(seam::call(&self.next, request)).await;
        strip_hop_by_hop(response.headers_mut());
        strip_consumed(response.headers_mut());
        response
    }

    /// `PURGE <url>`: from trusted addresses, removes every variant of the URL, or with a
    /// `Surrogate-Key`/`xkey` header every object tagged with one of its keys; with
    /// `Strata-Purge: soft` marks them stale instead (they are refreshed in the background).
    fn purge_request(&self, request: &Request<Body>) -> Response<Body> {
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
        let purged = if tags.is_empty() {
            self.store
                .purge(&self.keyer.primary(request.uri(), headers), soft)
        } else {
            self.store.purge_tags(&tags, soft)
        };
        for _ in 0..purged {
            self.metrics.purged.inc();
        }
        let mut response = seam::status_response(StatusCode::OK, &format!("Purged {purged}"));
        response
            .headers_mut()
            .insert("strata-purged", HeaderValue::from(purged as u64));
        response
    }
}

/// Whether this cache's `Cache-Status` entry (the last one) says hit.
fn is_our_hit(value: &[u8]) -> bool {
    let ours = value
        .rsplit(|b| *b == b',')
        .next()
        .unwrap_or(value)
        .trim_ascii();
    ours.starts_with(b"strata; hit")
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

fn split_tags(value: &str) -> Vec<String> {
    value
        .split(|c: char| c == ',' || c.is_ascii_whitespace())
        .filter(|t| !t.is_empty())
        .map(str::to_owned)
        .collect()
}
