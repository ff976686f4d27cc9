//! Answers from the store: `Age`, `Cache-Status` (RFC 9211), and conditional requests
//! evaluated against the stored response (RFC 9110 §13.2.2).

use std::sync::Arc;
use std::time::SystemTime;

use http::header::{self, HeaderName, HeaderValue};
use http::{HeaderMap, Method, Response, StatusCode};
use strata_core::{seam, Body};

use crate::freshness::parse_date;
use crate::object::Object;

/// The name this cache gives itself in `Cache-Status`.
const CACHE_NAME: &str = "strata";

static CACHE_STATUS: HeaderName = HeaderName::from_static("cache-status");

/// Appends this cache's entry to `Cache-Status` (caches closer to the origin come first).
pub fn cache_status(headers: &mut HeaderMap, entry: &str) {
    let ours = format!("{CACHE_NAME}; {entry}");
    let value = match headers.get(&CACHE_STATUS).and_then(|v| v.to_str().ok()) {
        Some(upstream) if !upstream.trim().is_empty() => format!("{upstream}, {ours}"),
        _ => ours,
    };
    if let Ok(value) = HeaderValue::from_str(&value) {
        headers.insert(CACHE_STATUS.clone(), value);
    }
}

/// The response for `request` from `object`, or `None` when its body can no longer be read
/// (the fill failed), in which case the caller goes to the origin.
pub fn serve(
    object: &Arc<Object>,
    method: &Method,
    request: &HeaderMap,
    now: SystemTime,
    entry: &str,
) -> Option<Response<Body>> {
    let not_modified = object.status == StatusCode::OK && not_modified(object, request);
    let body = if not_modified || method == Method::HEAD {
        seam::empty()
    } else {
        object.body.reader()?
    };
    let mut response = Response::new(body);
    if not_modified {
        *response.status_mut() = StatusCode::NOT_MODIFIED;
        let headers = response.headers_mut();
        for (name, value) in &object.headers {
            if name != header::CONTENT_LENGTH && name != header::CONTENT_TYPE {
                headers.append(name.clone(), value.clone());
            }
        }
    } else {
        *response.status_mut() = object.status;
        *response.headers_mut() = object.headers.clone();
        if method == Method::HEAD && object.body.is_complete() {
            let len = object.body.len();
            response
                .headers_mut()
                .insert(header::CONTENT_LENGTH, HeaderValue::from(len));
        }
    }
    let headers = response.headers_mut();
    headers.insert(header::AGE, HeaderValue::from(object.age(now).as_secs()));
    let ttl = object.ttl(now);
    cache_status(headers, &format!("{entry}; ttl={ttl}"));
    Some(response)
}

/// Whether the request's preconditions say the client's copy is current.
fn not_modified(object: &Object, request: &HeaderMap) -> bool {
    if let Some(inm) = request.get(header::IF_NONE_MATCH) {
        let Some(etag) = object.headers.get(header::ETAG) else {
            return false;
        };
        return etag_matches(inm.as_bytes(), etag.as_bytes());
    }
    match (
        parse_date(request, &header::IF_MODIFIED_SINCE),
        parse_date(&object.headers, &header::LAST_MODIFIED)
            .or_else(|| parse_date(&object.headers, &header::DATE)),
    ) {
        (Some(since), Some(modified)) => modified <= since,
        _ => false,
    }
}

/// Weak comparison of `If-None-Match` members with an entity tag.
fn etag_matches(list: &[u8], etag: &[u8]) -> bool {
    let opaque = |tag: &[u8]| -> Vec<u8> {
        let tag = tag.trim_ascii();
        tag.strip_prefix(b"W/").unwrap_or(tag).to_vec()
    };
    let etag = opaque(etag);
    list.split(|b| *b == b',')
        .map(|member| member.trim_ascii())
        .any(|member| member == b"*" || opaque(member) == etag)
}

/// Whether `method` is safe (RFC 9110 §9.2.1): unsafe and unknown methods invalidate.
pub fn is_safe(method: &Method) -> bool {
    matches!(
        *method,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE
    )
}

/// A status response with this cache's `Cache-Status`.
pub fn own(status: StatusCode, message: &str, entry: &str) -> Response<Body> {
    let mut response = seam::status_response(status, message);
    cache_status(response.headers_mut(), entry);
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn weak_comparison_and_star() {
        assert!(etag_matches(b"\"a\"", b"\"a\""));
        assert!(etag_matches(b"W/\"a\"", b"\"a\""));
        assert!(etag_matches(b"\"x\", W/\"a\"", b"W/\"a\""));
        assert!(etag_matches(b"*", b"\"zzz\""));
        assert!(!etag_matches(b"\"b\"", b"\"a\""));
    }

    #[test]
    fn cache_status_appends_after_upstream_caches() {
        let mut headers = HeaderMap::new();
        cache_status(&mut headers, "hit");
        assert_eq!(headers["cache-status"], "strata; hit");
        cache_status(&mut headers, "fwd=uri-miss");
        assert_eq!(headers["cache-status"], "strata; hit, strata; fwd=uri-miss");
    }
}
