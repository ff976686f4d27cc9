//! Routing: `[[lb.routes]]` in order, by host and path prefix, to a static directory, a
//! backend pool or the next tier; a request no route claims goes to `lb.default_backend`, or
//! to the next tier.

use std::sync::Arc;

use http::{header, Request};
use strata_core::{Body, HttpService};

use crate::config::LbConfig;
use crate::proxy::Balancer;
use crate::statics::StaticDir;

/// Why the routes could not be set up.
#[derive(Debug, thiserror::Error)]
#[error("lb.routes[{index}].static_dir = {dir:?}: {source}")]
pub struct RouteError {
    index: usize,
    dir: std::path::PathBuf,
    source: std::io::Error,
}

enum Target {
    Static(StaticDir),
    Service(HttpService),
}

struct Route {
    host: Option<String>,
    prefix: String,
    target: Target,
}

/// The host a request names, lower-cased and without its port.
fn request_host<B>(request: &Request<B>) -> Option<String> {
    let host = request
        .headers()
        .get(header::HOST)
        .and_then(|v| v.to_str().ok())
        .or_else(|| request.uri().host())?;
    let without_port = match host.rsplit_once(':') {
        Some((name, port)) if port.bytes().all(|b| b.is_ascii_digit()) => name,
        _ => host,
    };
    Some(without_port.to_ascii_lowercase())
}

impl Route {
    fn matches(&self, host: Option<&str>, path: &str) -> bool {
        let host_ok = match (&self.host, host) {
            (None, _) => true,
            (Some(pattern), Some(host)) => match pattern.strip_prefix("*.") {
                Some(suffix) => host
                    .strip_suffix(suffix)
                    .is_some_and(|head| head.ends_with('.') && head.len() > 1),
                None => host == pattern,
            },
            (Some(_), None) => false,
        };
        host_ok && path.starts_with(&self.prefix)
    }
}

/// The listener's service: the routes of `config` in front of `next` (this node's next tier)
/// and the pools of `balancer`.
pub fn router(
    config: &LbConfig,
    next: HttpService,
    balancer: &Balancer,
) -> Result<HttpService, RouteError> {
    let pool = |name: &str| {
        balancer
            .pool(name)
            .map(|pool| balancer.service(pool))
            .expect("backend names are checked by LbConfig::validate")
    };
    let fallback = config.default_backend.as_deref().map_or(next.clone(), pool);
    let mut built = Vec::with_capacity(config.routes.len());
    for (index, route) in config.routes.iter().enumerate() {
        let target = match (&route.static_dir, &route.backend) {
            (Some(dir), _) => Target::Static(
                StaticDir::open(dir, &route.path_prefix, route.max_age).map_err(|source| {
                    RouteError {
                        index,
                        dir: dir.clone(),
                        source,
                    }
                })?,
            ),
            (None, Some(name)) => Target::Service(pool(name)),
            (None, None) => Target::Service(next.clone()),
        };
        built.push(Route {
            host: route.host.as_ref().map(|h| h.to_ascii_lowercase()),
            prefix: route.path_prefix.clone(),
            target,
        });
    }
    if built.is_empty() {
        return Ok(fallback);
    }
    let built = Arc::new(built);
    Ok(HttpService::from_fn(move |request: Request<Body>| {
        let built = built.clone();
        let fallback = fallback.clone();
        async move {
            let host = request_host(&request);
            let path = request.uri().path();
            let route = built.iter().find(|r| r.matches(host.as_deref(), path));
            match route.map(|r| &r.target) {
                Some(Target::Static(dir)) => Ok(dir.serve(&request)),
                Some(Target::Service(service)) => strata_core::seam::call(service, request).await,
                None => strata_core::seam::call(&fallback, request).await,
            }
        }
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn route(host: Option<&str>, prefix: &str) -> Route {
        Route {
            host: host.map(str::to_owned),
            prefix: prefix.into(),
            target: Target::Service(HttpService::from_fn(|_: Request<Body>| async {
                Ok(strata_core::seam::status_response(http::StatusCode::OK, ""))
            })),
        }
    }

    #[test]
    fn hosts_and_prefixes_match_as_written() {
        let any = route(None, "/static/");
        assert!(any.matches(None, "/static/a.css"));
        assert!(!any.matches(None, "/staticfoo"));
        let exact = route(Some("www.example.com"), "/");
        assert!(exact.matches(Some("www.example.com"), "/x"));
        assert!(!exact.matches(Some("example.com"), "/x"));
        assert!(!exact.matches(None, "/x"));
        let wild = route(Some("*.example.com"), "/");
        assert!(wild.matches(Some("cdn.example.com"), "/"));
        assert!(!wild.matches(Some("example.com"), "/"));
        assert!(!wild.matches(Some("badexample.com"), "/"));
    }

    #[test]
    fn the_host_header_loses_its_port_and_case() {
        let request = Request::builder()
            .uri("/")
            .header("host", "WWW.Example.com:8443")
            .body(())
            .unwrap();
        assert_eq!(request_host(&request).as_deref(), Some("www.example.com"));
        let h2 = Request::builder()
            .uri("https://cdn.example.com/x")
            .body(())
            .unwrap();
        assert_eq!(request_host(&h2).as_deref(), Some("cdn.example.com"));
    }
}
