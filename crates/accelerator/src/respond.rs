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

/// `entry` with `detail` added. `Cache-Status` is a structured field (RFC 9211): a parameter
/// given twice keeps only its last value, so an entry that already has a `detail` gets one
/// `detail` string carrying both (`detail="hit-for-miss no-freshness"`).
pub fn with_detail(entry: &str, detail: &str) -> String {
    match entry.split_once("; detail=") {
        None => format!("{entry}; detail={detail}"),
        Some((head, first)) => {
            let first = first.trim_matches('"');
            let both = format!("{first} {}", detail.trim_matches('"'));
            let quoted = both.replace('\\', "\\\\").replace('"', "\\\"");
            format!("{head}; detail=\"{quoted}\"")
        }
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
    if !not_modified {
        if let Some(response) = ranged(object, method, request, now, entry) {
            return Some(response);
        }
    }
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
    annotate(&mut response, object, now, entry);
    Some(response)
}

fn annotate(response: &mut Response<Body>, object: &Object, now: SystemTime, entry: &str) {
    let headers = response.headers_mut();
    headers.insert(header::AGE, HeaderValue::from(object.age(now).as_secs()));
    let ttl = object.ttl(now);
    cache_status(headers, &format!("{entry}; ttl={ttl}"));
}

/// A 206 (or 416) for a single-range request on a whole stored 200 (RFC 9110 §14); `None`
/// when the full response is the answer (no range, several ranges, a stale `If-Range`, or a
/// body still filling).
fn ranged(
    object: &Object,
    method: &Method,
    request: &HeaderMap,
    now: SystemTime,
    entry: &str,
) -> Option<Response<Body>> {
    let range = request.get(header::RANGE)?.to_str().ok()?;
    if object.status != StatusCode::OK || !object.body.is_complete() {
        return None;
    }
    if let Some(condition) = request.get(header::IF_RANGE) {
        let current = object
            .headers
            .get(header::ETAG)
            .or_else(|| object.headers.get(header::LAST_MODIFIED));
        if current != Some(condition) || condition.as_bytes().starts_with(b"W/") {
            return None;
        }
    }
    let whole = object.body.whole()?;
    let len = whole.len() as u64;
    let mut response = match byte_range(range, len)? {
        Some((first, last)) => {
            let part = whole.slice(first as usize..=last as usize);
            let mut response = Response::new(if method == Method::HEAD {
                seam::empty()
            } else {
                seam::full(part)
            });
            *response.status_mut() = StatusCode::PARTIAL_CONTENT;
            *response.headers_mut() = object.headers.clone();
            let headers = response.headers_mut();
            headers.insert(header::CONTENT_LENGTH, HeaderValue::from(last - first + 1));
            headers.insert(
                header::CONTENT_RANGE,
                HeaderValue::from_str(&format!("bytes {first}-{last}/{len}")).ok()?,
            );
            response
        }
        None => {
            let mut response =
                seam::status_response(StatusCode::RANGE_NOT_SATISFIABLE, "range not satisfiable");
            response.headers_mut().insert(
                header::CONTENT_RANGE,
                HeaderValue::from_str(&format!("bytes */{len}")).ok()?,
            );
            response
        }
    };
    annotate(&mut response, object, now, entry);
    Some(response)
}

/// Parses a single `bytes=` range against a body of `len` bytes: `Some(Some((first, last)))`
/// when satisfiable, `Some(None)` when not, `None` when the full body is the answer.
fn byte_range(spec: &str, len: u64) -> Option<Option<(u64, u64)>> {
    let set = spec.trim().strip_prefix("bytes=")?;
    if set.contains(',') {
        return None;
    }
    let (first, last) = set.trim().split_once('-')?;
    let number = |s: &str| -> Option<u64> {
        let s = s.trim();
        (!s.is_empty() && s.bytes().all(|b| b.is_ascii_digit())).then(|| s.parse().ok())?
    };
    let range = match (first.trim().is_empty(), last.trim().is_empty()) {
        (true, false) => {
            let suffix = number(last)?;
            (suffix > 0 && len > 0).then(|| (len.saturating_sub(suffix), len - 1))
        }
        (false, true) => {
            let first = number(first)?;
            (first < len).then(|| (first, len - 1))
        }
        (false, false) => {
            let (first, last) = (number(first)?, number(last)?);
            if last < first {
                return None;
            }
            (first < len).then(|| (first, last.min(len - 1)))
        }
        (true, true) => return None,
    };
    Some(range)
}

/// Whether the request's preconditions say the client's copy is current.
fn not_modified(object: &Object, request: &HeaderMap) -> bool {
    if let Some(inm) = request.get(header::IF_NONE_MATCH) {
        let Some(etag) = object.headers.get(header::ETAG) else {
            return false;
        };
        return etag_matches(inm.as_bytes(), etag.as_bytes());
    }
    let Some(since) = parse_date(request, &header::IF_MODIFIED_SINCE) else {
        return false;
    };
    parse_date(&object.headers, &header::LAST_MODIFIED)
        .or_else(|| parse_date(&object.headers, &header::DATE))
        .is_some_and(|modified| modified <= since)
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
    fn single_byte_ranges() {
        assert_eq!(byte_range("bytes=0-1", 10), Some(Some((0, 1))));
        assert_eq!(byte_range("bytes=4-", 10), Some(Some((4, 9))));
        assert_eq!(byte_range("bytes=-3", 10), Some(Some((7, 9))));
        assert_eq!(byte_range("bytes=5-100", 10), Some(Some((5, 9))));
        assert_eq!(byte_range("bytes=10-", 10), Some(None));
        assert_eq!(byte_range("bytes=0-1,3-4", 10), None);
        assert_eq!(byte_range("bytes=3-1", 10), None);
        assert_eq!(byte_range("items=0-1", 10), None);
    }

    #[test]
    fn cache_status_appends_after_upstream_caches() {
        let mut headers = HeaderMap::new();
        cache_status(&mut headers, "hit");
        assert_eq!(headers["cache-status"], "strata; hit");
        cache_status(&mut headers, "fwd=uri-miss");
        assert_eq!(headers["cache-status"], "strata; hit, strata; fwd=uri-miss");
    }

    #[test]
    fn an_entry_carries_one_detail() {
        assert_eq!(
            with_detail("fwd=uri-miss", "no-freshness"),
            "fwd=uri-miss; detail=no-freshness"
        );
        let both = with_detail("fwd=miss; detail=hit-for-miss", "no-freshness");
        assert_eq!(both, "fwd=miss; detail=\"hit-for-miss no-freshness\"");
        assert_eq!(both.matches("detail=").count(), 1);
    }
}
