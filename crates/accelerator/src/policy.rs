//! Whether and for how long a response may be stored by a shared cache (RFC 9111 §3, §4.2,
//! RFC 5861, RFC 9213), with the reason when it may not, for `Cache-Status`.

use std::time::Duration;

use http::header::{self, HeaderName};
use http::{HeaderMap, StatusCode};

use crate::config::AcceleratorConfig;
use crate::directives::{list, Directives};
use crate::freshness::{lifetime, Timing};
use crate::object::Windows;

static CDN_CACHE_CONTROL: HeaderName = HeaderName::from_static("cdn-cache-control");
static SURROGATE_CONTROL: HeaderName = HeaderName::from_static("surrogate-control");

/// How a response may be stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    pub windows: Windows,
    /// Lower-cased request header names of `Vary`.
    pub vary: Vec<HeaderName>,
}

/// The directives that govern this cache: a targeted field when the response has one
/// (`CDN-Cache-Control`, then `Surrogate-Control`), else `Cache-Control`; and whether the
/// targeted field was the source. A `CDN-Cache-Control` that is not a valid structured
/// Dictionary is ignored as a whole (RFC 9213 §2.1), never obeyed in the parts that parse.
pub fn effective(headers: &HeaderMap) -> (Directives, bool) {
    for name in [&CDN_CACHE_CONTROL, &SURROGATE_CONTROL] {
        if name == CDN_CACHE_CONTROL && headers.contains_key(name) && !dictionary(headers, name) {
            continue;
        }
        let targeted = Directives::parse(headers, name);
        if targeted.present {
            return (targeted, true);
        }
    }
    (Directives::parse(headers, &header::CACHE_CONTROL), false)
}

/// Whether the lines of `name` together form a structured Dictionary (RFC 8941 §4.2.2).
fn dictionary(headers: &HeaderMap, name: &HeaderName) -> bool {
    let lines: Option<Vec<&str>> = headers
        .get_all(name)
        .iter()
        .map(|v| v.to_str().ok())
        .collect();
    lines.is_some_and(|lines| crate::sfv::is_dictionary(&lines.join(",")))
}

/// Status codes cacheable without explicit freshness (RFC 9110 §15.1).
fn heuristically_cacheable(status: StatusCode) -> bool {
    matches!(
        status.as_u16(),
        200 | 203 | 204 | 300 | 301 | 308 | 404 | 405 | 410 | 414 | 501
    )
}

/// Decides whether a response to a GET (or HEAD) may be stored, and how.
pub fn plan(
    config: &AcceleratorConfig,
    request: &HeaderMap,
    status: StatusCode,
    headers: &HeaderMap,
    timing: &Timing,
) -> Result<Plan, &'static str> {
    if status.is_informational()
        || status == StatusCode::PARTIAL_CONTENT
        || status == StatusCode::NOT_MODIFIED
    {
        return Err("status");
    }
    let (cc, targeted) = effective(headers);
    if cc.must_understand && status.canonical_reason().is_none() {
        // RFC 9111 §5.2.2.3: only status codes this cache knows the semantics of.
        return Err("must-understand");
    }
    if cc.no_store && !cc.must_understand {
        return Err("no-store");
    }
    if Directives::parse(request, &header::CACHE_CONTROL).no_store {
        return Err("request-no-store");
    }
    if cc.private {
        return Err("private");
    }
    let vary_members = list(headers, &header::VARY);
    if vary_members.iter().any(|m| m == "*") {
        return Err("vary-star");
    }
    let explicit = cc.public || cc.s_maxage.is_some() || cc.must_revalidate;
    if request.contains_key(header::AUTHORIZATION) && !explicit {
        return Err("authorization");
    }
    if headers.contains_key(header::SET_COOKIE) && !targeted {
        return Err("set-cookie");
    }
    let lifetime = match lifetime(&cc, headers, timing) {
        Some(lifetime) => lifetime,
        None if !config.default_ttl.is_zero() && heuristically_cacheable(status) => {
            config.default_ttl
        }
        None => Duration::ZERO,
    };
    let lifetime = if cc.no_cache {
        Duration::ZERO
    } else {
        lifetime
    };
    let validator =
        headers.contains_key(header::ETAG) || headers.contains_key(header::LAST_MODIFIED);
    let strict = cc.must_revalidate || cc.proxy_revalidate || cc.no_cache;
    let windows = Windows {
        lifetime,
        grace: if strict {
            Duration::ZERO
        } else {
            cc.stale_while_revalidate
                .map_or(config.grace, |d| d.duration())
        },
        stale_if_error: if strict {
            Duration::ZERO
        } else {
            cc.stale_if_error
                .map_or(config.stale_if_error, |d| d.duration())
        },
        keep: if validator {
            config.keep
        } else {
            Duration::ZERO
        },
    };
    if windows.lifetime.is_zero() && windows.after_stale().is_zero() {
        return Err(if cc.no_cache {
            "no-cache"
        } else {
            "no-freshness"
        });
    }
    let vary = vary_members
        .iter()
        .filter_map(|m| HeaderName::from_bytes(m.as_bytes()).ok())
        .collect();
    Ok(Plan { windows, vary })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::headers;
    use std::time::SystemTime;

    fn decide(request: &[(&str, &str)], response: &[(&str, &str)]) -> Result<Plan, &'static str> {
        let response = headers(response);
        let now = SystemTime::now();
        plan(
            &AcceleratorConfig::default(),
            &headers(request),
            StatusCode::OK,
            &response,
            &Timing::new(&response, now, now),
        )
    }

    #[test]
    fn refusals_name_their_reason() {
        assert_eq!(
            decide(&[], &[("cache-control", "no-store, max-age=60")]),
            Err("no-store")
        );
        assert_eq!(
            decide(&[], &[("cache-control", "private, max-age=60")]),
            Err("private")
        );
        assert_eq!(
            decide(&[], &[("cache-control", "max-age=60"), ("vary", "Foo, *")]),
            Err("vary-star")
        );
        assert_eq!(
            decide(
                &[],
                &[("cache-control", "max-age=60"), ("set-cookie", "a=b")]
            ),
            Err("set-cookie")
        );
        assert_eq!(
            decide(
                &[("authorization", "x")],
                &[("cache-control", "max-age=60")]
            ),
            Err("authorization")
        );
        assert_eq!(decide(&[], &[]), Err("no-freshness"));
        let now = SystemTime::now();
        let unknown = headers(&[("cache-control", "max-age=60, must-understand, no-store")]);
        let timing = Timing::new(&unknown, now, now);
        let config = AcceleratorConfig::default();
        let status = StatusCode::from_u16(599).unwrap();
        assert_eq!(
            plan(&config, &HeaderMap::new(), status, &unknown, &timing),
            Err("must-understand")
        );
        // must-understand overrides no-store for a status the cache understands.
        assert!(plan(
            &config,
            &HeaderMap::new(),
            StatusCode::OK,
            &unknown,
            &timing
        )
        .is_ok());
    }

    #[test]
    fn explicit_permission_overrides_defaults() {
        assert!(decide(
            &[("authorization", "x")],
            &[("cache-control", "public, max-age=60")]
        )
        .is_ok());
        // A targeted field stands in for Cache-Control and allows a Set-Cookie response.
        let plan = decide(
            &[],
            &[
                ("cache-control", "private"),
                ("cdn-cache-control", "max-age=30"),
                ("set-cookie", "a=b"),
            ],
        )
        .unwrap();
        assert_eq!(plan.windows.lifetime, Duration::from_secs(30));
        // One that is not a structured Dictionary is ignored whole: Cache-Control governs,
        // not the part that happens to parse.
        for broken in ["max-age=30, Private", "max-age=30,", "max-age=30 no-store"] {
            let plan = decide(
                &[],
                &[
                    ("cache-control", "max-age=5"),
                    ("cdn-cache-control", broken),
                ],
            )
            .unwrap();
            assert_eq!(plan.windows.lifetime, Duration::from_secs(5), "{broken}");
        }
        assert_eq!(
            decide(
                &[],
                &[
                    ("cache-control", "no-store"),
                    ("cdn-cache-control", "max-age=60, Max-Age=1")
                ]
            )
            .map(|p| p.windows.lifetime),
            Err("no-store")
        );
    }

    #[test]
    fn windows_come_from_directives() {
        let plan = decide(
            &[],
            &[
                (
                    "cache-control",
                    "max-age=10, stale-while-revalidate=20, stale-if-error=30",
                ),
                ("etag", "\"a\""),
            ],
        )
        .unwrap();
        assert_eq!(plan.windows.lifetime, Duration::from_secs(10));
        assert_eq!(plan.windows.grace, Duration::from_secs(20));
        assert_eq!(plan.windows.stale_if_error, Duration::from_secs(30));
        assert_eq!(plan.windows.keep, Duration::from_secs(3600));
        let strict = decide(
            &[],
            &[(
                "cache-control",
                "max-age=10, must-revalidate, stale-while-revalidate=20",
            )],
        )
        .unwrap();
        assert_eq!(strict.windows.grace, Duration::ZERO);
        // no-cache with a validator: stored, always revalidated.
        let revalidate = decide(&[], &[("cache-control", "no-cache"), ("etag", "\"a\"")]).unwrap();
        assert_eq!(revalidate.windows.lifetime, Duration::ZERO);
    }
}
