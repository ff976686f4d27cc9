//! The request flow: classify, look up, serve fresh or stale, coalesce misses. Fetching and
//! storing are in `fetch.rs`, invalidation in `invalidate.rs`.

use std::sync::Arc;
use std::time::SystemTime;

use http::header::{self, HeaderName};
use http::{HeaderMap, Method, Request, Response, StatusCode, Uri, Version};
use strata_core::{seam, Body, ConnInfo, HttpService};

use crate::config::{AcceleratorConfig, Network};
use crate::flight::{self, Flights, Join, Outcome};
use crate::key::Keyer;
use crate::metrics::Metrics;
use crate::object::{strip_consumed, strip_hop_by_hop, Freshness, Object};
use crate::respond::{self, cache_status};
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
    /// PURGEs that found nothing, logged at most once a minute per host.
    pub empty_purges: crate::invalidate::EmptyPurges,
    /// Where a `PURGE` goes when the stack gives one (the cluster: this store and every
    /// other node's); this store alone otherwise.
    pub invalidate: std::sync::OnceLock<Arc<dyn strata_core::seam::Invalidate>>,
}

/// A request head kept to build origin requests, including background refreshes.
#[derive(Debug, Clone)]
pub(crate) struct Head {
    pub(crate) method: Method,
    pub(crate) uri: Uri,
    version: Version,
    pub(crate) headers: HeaderMap,
    info: Option<ConnInfo>,
}

impl Head {
    pub(crate) fn of(request: &Request<Body>) -> Self {
        Self {
            method: request.method().clone(),
            uri: request.uri().clone(),
            version: request.version(),
            headers: request.headers().clone(),
            info: request.extensions().get::<ConnInfo>().copied(),
        }
    }

    /// A body-less GET for this head, as sent to fill the cache.
    pub(crate) fn fill_request(&self, keyer: &Keyer, strip_cookies: bool) -> Request<Body> {
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
            return self.purge_request(request).await;
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

    async fn pass(&self, request: Request<Body>, entry: &str) -> Response<Body> {
        self.metrics.passes.inc();
        let mut response = self.forward(request).await;
        cache_status(response.headers_mut(), entry);
        response
    }

    pub(crate) async fn forward(&self, request: Request<Body>) -> Response<Body> {
        let mut response = seam::answer(seam::call(&self.next, request)).await;
        strip_hop_by_hop(response.headers_mut());
        strip_consumed(response.headers_mut());
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
