//! Sending requests to backend pools: the pools of `[[lb.backends]]` built (`members.rs`) and
//! checked, a
//! server chosen per request, a request that never reached its server retried on another
//! (idempotent, without a body, within the budget), and direct access to one named server
//! (`X-Strata-Backend`) for whoever may debug it.

use std::convert::Infallible;
use std::sync::Arc;

use http::{HeaderName, Method, Request, Response, StatusCode};
use strata_core::seam::{call, empty, status_response};
use strata_core::{Body, ConnInfo, HttpService, Readiness, Shutdown, UpstreamFailure};

use crate::config::LbConfig;
use crate::forwarded::Trusted;
use crate::members::{Members, PoolError};
use crate::upstream::{Pool, Refused, ServerStatus};

/// Names the one server a request asks for.
pub static BACKEND_HEADER: HeaderName = HeaderName::from_static("x-strata-backend");
/// The admin token that lets a client outside the trusted networks ask for one server.
pub static TOKEN_HEADER: HeaderName = HeaderName::from_static("x-strata-token");

/// Who may ask for one server.
#[derive(Debug)]
struct Access {
    trusted: Trusted,
    token: Option<String>,
}

/// The pools of one node.
#[derive(Debug)]
pub struct Balancer {
    pub pools: Vec<Arc<Pool>>,
    access: Arc<Access>,
}

/// A pool as `/status` shows it.
#[derive(Debug, serde::Serialize)]
pub struct PoolStatus {
    pub name: String,
    pub servers: Vec<ServerStatus>,
}

impl Balancer {
    /// Builds the pools (`local` is this node's next tier and its supervisor, if it has
    /// one) and starts their health checks.
    pub fn start(
        config: &LbConfig,
        local: &HttpService,
        readiness: Option<Arc<dyn Readiness>>,
        token: Option<String>,
        shutdown: &Shutdown,
    ) -> Result<Self, PoolError> {
        let mut pools = Vec::new();
        for (index, backend) in config.backends.iter().enumerate() {
            let members = Members::new(index, backend, local, readiness.clone())?;
            let pool = Arc::new(Pool::new(backend.clone(), members.initial()));
            tokio::spawn(crate::health::watch(pool.clone(), shutdown.clone()));
            if let Some(tls) = members.tls() {
                tokio::spawn(tls.watch(shutdown.clone()));
            }
            if members.follows_names() {
                tokio::spawn(members.follow(pool.clone(), shutdown.clone()));
            }
            pools.push(pool);
        }
        let access = Arc::new(Access {
            trusted: Trusted::new(&config.trusted_networks),
            token,
        });
        Ok(Self { pools, access })
    }

    pub fn pool(&self, name: &str) -> Option<Arc<Pool>> {
        self.pools.iter().find(|p| p.name == name).cloned()
    }

    /// The seam service sending requests to pool `pool`.
    pub fn service(&self, pool: Arc<Pool>) -> HttpService {
        let access = self.access.clone();
        HttpService::from_fn(move |request: Request<Body>| {
            forward(pool.clone(), access.clone(), request)
        })
    }

    pub fn status(&self) -> Vec<PoolStatus> {
        self.pools
            .iter()
            .map(|pool| PoolStatus {
                name: pool.name.clone(),
                servers: pool
                    .servers()
                    .iter()
                    .map(|s| s.status(pool.config.slow_start))
                    .collect(),
            })
            .collect()
    }

    /// The pools' metrics in Prometheus text format.
    pub fn render_metrics(&self, out: &mut String) {
        use std::fmt::Write;
        let _ = writeln!(out, "# HELP strata_lb_backend_requests_total Requests sent to each backend server.\n# TYPE strata_lb_backend_requests_total counter");
        for pool in &self.pools {
            for s in pool.servers().iter() {
                let labels = format!("pool=\"{}\",server=\"{}\"", pool.name, s.name);
                let _ = writeln!(
                    out,
                    "strata_lb_backend_requests_total{{{labels}}} {}",
                    s.requests.get()
                );
            }
        }
        let _ = writeln!(out, "# HELP strata_lb_backend_events_total Failures, ejections, retries, panics and queue timeouts.\n# TYPE strata_lb_backend_events_total counter");
        for pool in &self.pools {
            let name = &pool.name;
            for s in pool.servers().iter() {
                for (event, count) in [
                    ("failure", s.failures.get()),
                    ("ejection", s.ejections.get()),
                ] {
                    let _ = writeln!(out, "strata_lb_backend_events_total{{pool=\"{name}\",server=\"{}\",event=\"{event}\"}} {count}", s.name);
                }
            }
            for (event, count) in [
                ("retry", pool.retries.get()),
                ("panic", pool.panics.get()),
                ("queue_timeout", pool.queue_timeouts.get()),
            ] {
                let _ = writeln!(
                    out,
                    "strata_lb_backend_events_total{{pool=\"{name}\",event=\"{event}\"}} {count}"
                );
            }
        }
    }
}

/// A copy of the request without its (empty) body, for a retry (boxed: held across the
/// request's await, inline it would grow every request's future by a request's size).
fn copy_head(request: &Request<Body>) -> Option<Box<Request<Body>>> {
    let idempotent = matches!(
        *request.method(),
        Method::GET | Method::HEAD | Method::OPTIONS | Method::PUT | Method::DELETE | Method::TRACE
    );
    let empty_body = http_body::Body::size_hint(request.body()).exact() == Some(0);
    (idempotent && empty_body).then(|| {
        let mut copy = Request::new(empty());
        *copy.method_mut() = request.method().clone();
        *copy.uri_mut() = request.uri().clone();
        *copy.version_mut() = request.version();
        *copy.headers_mut() = request.headers().clone();
        *copy.extensions_mut() = request.extensions().clone();
        Box::new(copy)
    })
}

/// Sends the request to a server of the pool. Returns the response as the seam wants it,
/// with no async block around it: an async block holding this future would hold it twice
/// (the future is boxed per request; the smaller, the cheaper).
async fn forward(
    pool: Arc<Pool>,
    access: Arc<Access>,
    mut request: Request<Body>,
) -> Result<Response<Body>, Infallible> {
    Ok('forward: {
        // One pass over the names finds out whether there is anything to remove (there rarely
        // is), where two removals would hash both names every time.
        let strata_fields = request
            .headers()
            .keys()
            .any(|name| name.as_str().starts_with("x-strata-"));
        let (asked, token) = if strata_fields {
            let headers = request.headers_mut();
            (
                headers.remove(&BACKEND_HEADER),
                headers.remove(&TOKEN_HEADER),
            )
        } else {
            (None, None)
        };
        if let Some(asked) = asked {
            let trusted = request
                .extensions()
                .get::<ConnInfo>()
                .is_some_and(|info| access.trusted.contains(info.remote.ip()));
            let has_token = access.token.as_deref().is_some_and(|t| {
                token
                    .as_ref()
                    .is_some_and(|given| given.as_bytes() == t.as_bytes())
            });
            if !(trusted || has_token) {
                break 'forward status_response(
                    StatusCode::FORBIDDEN,
                    "asking for one backend server needs a trusted network or the admin token",
                );
            }
            let name = asked.to_str().unwrap_or_default();
            break 'forward match pool.lease_named(name) {
                Ok(lease) => {
                    let response = call(&lease.server().service, request).await;
                    let response = response.unwrap_or_else(|never| match never {});
                    lease.finish(is_failure(&response));
                    response
                }
                Err(_) => status_response(StatusCode::NOT_FOUND, "no backend server of that name"),
            };
        }
        let mut tried = Vec::new();
        let mut _permit = None;
        loop {
            let lease = match pool.lease(&tried).await {
                Ok(lease) => lease,
                Err(refused @ (Refused::QueueFull | Refused::QueueTimeout)) => {
                    break 'forward status_response(
                        StatusCode::SERVICE_UNAVAILABLE,
                        &refused.to_string(),
                    )
                }
                Err(refused) => {
                    break 'forward status_response(StatusCode::BAD_GATEWAY, &refused.to_string())
                }
            };
            // A copy for a retry only where there is a retry to make and a server to make it on.
            let again = (tried.len() < pool.config.retries as usize
                && tried.len() + 1 < pool.len())
            .then(|| copy_head(&request))
            .flatten();
            let response = call(&lease.server().service, request).await;
            let response = response.unwrap_or_else(|never| match never {});
            let id = lease.server().id;
            lease.finish(is_failure(&response));
            let unsent =
                response.extensions().get::<UpstreamFailure>() == Some(&UpstreamFailure::Connect);
            match again {
                Some(copy) if unsent => {
                    let Some(permit) = pool.retry_permit() else {
                        break 'forward response;
                    };
                    _permit = Some(permit);
                    tried.push(id);
                    request = *copy;
                }
                _ => break 'forward response,
            }
        }
    })
}

/// What counts against a server: no connection, a broken one, a timeout, or a 502/503/504.
fn is_failure(response: &Response<Body>) -> bool {
    response.extensions().get::<UpstreamFailure>().is_some()
        || matches!(response.status().as_u16(), 502..=504)
}
